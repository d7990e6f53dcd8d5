/* canopy tokenize / detokenize: the tokenizer on the command line. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "canopy.h"
#include "cli/cli.h"

static const char *tokenize_usage =
    "usage: canopy tokenize [-m DIR] [--bos] TEXT\n"
    "\n"
    "Prints the token ids of TEXT, space-separated, on one line.\n"
    "\n"
    "  -m, --model DIR   model folder with tokenizer.json\n"
    "      --bos         add the tokenizer's special prefix tokens (as add_special_tokens=True)\n"
    "  -h, --help        show this help\n";

static const char *detokenize_usage =
    "usage: canopy detokenize [-m DIR] [--skip-special] ID...\n"
    "\n"
    "Prints the text of the given token ids.\n"
    "\n"
    "  -m, --model DIR     model folder with tokenizer.json\n"
    "      --skip-special  leave special tokens out\n"
    "  -h, --help          show this help\n";

static int parse_common(int argc, char **argv, const char *usage, const char **model, int *flag, const char *flag_name) {
  struct option opts[] = {{"model", required_argument, 0, 'm'}, {flag_name, no_argument, 0, 'f'},
                          {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
  int c;
  optind = 1;
  /* '+' stops at the first operand so negative-looking ids are not taken as options. */
  while ((c = getopt_long(argc, argv, "+m:h", opts, NULL)) != -1) {
    switch (c) {
    case 'm': *model = optarg; break;
    case 'f': *flag = 1; break;
    case 'h': fputs(usage, stdout); return 0;
    default: fputs(usage, stderr); return 2;
    }
  }
  return -1;
}

int cli_tokenize(int argc, char **argv) {
  const char *model = NULL;
  int bos = 0, rc = parse_common(argc, argv, tokenize_usage, &model, &bos, "bos");
  if (rc >= 0) return rc;
  if (optind != argc - 1) {
    fputs(tokenize_usage, stderr);
    return 2;
  }
  canopy_tokenizer *tok;
  if (canopy_tokenizer_load(cli_model_dir(model), &tok)) return cli_fail("loading the tokenizer");
  const char *text = argv[optind];
  int n = 0, cap = (int)strlen(text) + 16;
  int32_t *ids = malloc(sizeof *ids * (size_t)cap);
  int st = ids ? canopy_tokenize(tok, text, strlen(text), bos, ids, cap, &n) : CANOPY_ERR_NO_MEMORY;
  if (st == CANOPY_ERR_BUFFER) {
    int32_t *bigger = realloc(ids, sizeof *ids * (size_t)n);
    st = bigger ? canopy_tokenize(tok, text, strlen(text), bos, ids = bigger, n, &n) : CANOPY_ERR_NO_MEMORY;
  }
  if (st) {
    free(ids);
    canopy_tokenizer_free(tok);
    return cli_fail("tokenizing");
  }
  for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
  putchar('\n');
  free(ids);
  canopy_tokenizer_free(tok);
  return 0;
}

int cli_detokenize(int argc, char **argv) {
  const char *model = NULL;
  int skip = 0, rc = parse_common(argc, argv, detokenize_usage, &model, &skip, "skip-special");
  if (rc >= 0) return rc;
  int n = argc - optind;
  if (n < 1) {
    fputs(detokenize_usage, stderr);
    return 2;
  }
  int32_t *ids = malloc(sizeof *ids * (size_t)n);
  if (!ids) return 1;
  for (int i = 0; i < n; i++) {
    char *end;
    errno = 0;
    long v = strtol(argv[optind + i], &end, 10);
    if (errno || *end || end == argv[optind + i] || v < 0 || v > INT32_MAX) {
      fprintf(stderr, "canopy: detokenize: '%s' is not a token id\n", argv[optind + i]);
      free(ids);
      return 2;
    }
    ids[i] = (int32_t)v;
  }
  canopy_tokenizer *tok;
  if (canopy_tokenizer_load(cli_model_dir(model), &tok)) {
    free(ids);
    return cli_fail("loading the tokenizer");
  }
  size_t len = 0;
  int st = canopy_detokenize(tok, ids, n, skip, NULL, 0, &len);
  char *buf = NULL;
  if (st == CANOPY_OK || st == CANOPY_ERR_BUFFER) {
    buf = malloc(len + 1);
    st = buf ? canopy_detokenize(tok, ids, n, skip, buf, len + 1, &len) : CANOPY_ERR_NO_MEMORY;
  }
  if (!st) printf("%s\n", buf);
  free(buf);
  free(ids);
  canopy_tokenizer_free(tok);
  return st ? cli_fail("detokenizing") : 0;
}
