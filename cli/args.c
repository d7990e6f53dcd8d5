/* What the commands share: option values (one message format, exit status 2 for usage errors),
 * file reading and the run information a bench records. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "canopy.h"
#include "cli/cli.h"

int cli_parse_int(const char *cmd, const char *name, const char *s, int lo, int *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || *end || end == s || v < lo || v > 1 << 30) {
    fprintf(stderr, "canopy: %s: %s '%s' must be an integer >= %d\n", cmd, name, s, lo);
    return 2;
  }
  *out = (int)v;
  return 0;
}

int cli_parse_double(const char *cmd, const char *name, const char *s, double lo, double hi, double *out) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || *end || end == s || !(v >= lo && v <= hi)) {
    fprintf(stderr, "canopy: %s: %s '%s' must be a number in [%g, %g]\n", cmd, name, s, lo, hi);
    return 2;
  }
  *out = v;
  return 0;
}

int cli_parse_u64(const char *cmd, const char *name, const char *s, uint64_t *out) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || *end || end == s || *s == '-') {
    fprintf(stderr, "canopy: %s: %s '%s' must be a non-negative integer\n", cmd, name, s);
    return 2;
  }
  *out = (uint64_t)v;
  return 0;
}

int cli_parse_device(const char *cmd, const char *s, int *out) {
  if (!strcmp(s, "cpu")) *out = CANOPY_DEVICE_CPU;
  else if (!strcmp(s, "cuda")) *out = CANOPY_DEVICE_CUDA;
  else {
    fprintf(stderr, "canopy: %s: --device '%s' must be cpu or cuda\n", cmd, s);
    return 2;
  }
  return 0;
}

char *cli_read_file(const char *path) {
  FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
  if (!f) return NULL;
  size_t len = 0, cap = 1 << 16, got;
  char *buf = malloc(cap);
  while (buf && (got = fread(buf + len, 1, cap - len - 1, f)) > 0) {
    len += got;
    if (cap - len < 2) {
      char *bigger = realloc(buf, cap *= 2);
      if (!bigger) free(buf);
      buf = bigger;
    }
  }
  if (f != stdin) fclose(f);
  if (buf) buf[len] = '\0';
  return buf;
}

int cli_write_file(const char *cmd, const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  if (!f || fputs(text, f) == EOF || fclose(f)) {
    fprintf(stderr, "canopy: %s: cannot write '%s': %s\n", cmd, path, strerror(errno));
    return 1;
  }
  return 0;
}

int cli_add_run_info(void *o, int argc, char **argv) {
  size_t len = 32;
  for (int i = 0; i < argc; i++) len += strlen(argv[i]) + 3;
  char *cl = malloc(len);
  if (!cl) return -1;
  strcpy(cl, "canopy bench");
  for (int i = 0; i < argc; i++) strcat(strcat(cl, " "), argv[i]);
  char date[64];
  time_t now = time(NULL);
  strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
  int ok = cJSON_AddStringToObject(o, "command", cl) && cJSON_AddStringToObject(o, "date", date);
  free(cl);
  return ok ? 0 : -1;
}
