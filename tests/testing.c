#include "tests/testing.h"

#include "canopy.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>

#include <cmocka.h>

const char *cn_test_source_dir(void) {
  const char *env = getenv("CANOPY_SOURCE_DIR");
  if (env && *env) return env;
#ifdef CANOPY_SOURCE_DIR
  return CANOPY_SOURCE_DIR;
#else
  return ".";
#endif
}

char *cn_test_path(char *buf, size_t cap, const char *rel) {
  snprintf(buf, cap, "%s/%s", cn_test_source_dir(), rel);
  return buf;
}

int cn_test_smollm2_dir(char *buf, size_t cap) {
  char probe[1200];
  cn_test_path(buf, cap, "models/SmolLM2-135M-Instruct");
  snprintf(probe, sizeof probe, "%s/model.safetensors", buf);
  if (cn_test_exists(probe)) return 0;
  printf("skipped: %s not found (run tools/convert_smollm2.py)\n", buf);
  return CN_TEST_SKIP;
}

canopy_tokenizer *cn_test_tokenizer(const char *style) {
  char path[1024], rel[256];
  snprintf(rel, sizeof rel, "tests/fixtures/tokenizer/%s", style);
  canopy_tokenizer *tok = NULL;
  if (canopy_tokenizer_load(cn_test_path(path, sizeof path, rel), &tok)) {
    printf("      load failed: %s\n", canopy_last_error());
    return NULL;
  }
  return tok;
}

int cn_test_exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0;
}

int cn_test_remove_tree(const char *dir) {
  char cmd[1100];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  return system(cmd) == 0 ? 0 : -1;
}

char *cn_test_read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = n >= 0 ? malloc((size_t)n + 1) : NULL;
  if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  if (!buf) return NULL;
  buf[n] = '\0';
  if (len) *len = (size_t)n;
  return buf;
}


int cn_test_run_group(const char *name, const struct CMUnitTest *tests, size_t n, int (*setup)(void **),
                      int (*teardown)(void **)) {
  const char *env = getenv("CANOPY_TEST_SHARD");
  int k = 0, of = 1;
  if (env && (sscanf(env, "%d/%d", &k, &of) != 2 || of < 1 || k < 0 || k >= of)) {
    fprintf(stderr, "CANOPY_TEST_SHARD=%s: want k/n with 0 <= k < n\n", env);
    return 1;
  }
  struct CMUnitTest *mine = malloc(sizeof *mine * (n ? n : 1));
  if (!mine) return 1;
  size_t m = 0;
  for (size_t i = (size_t)k; i < n; i += (size_t)of)
    mine[m++] = tests[i];
  if (of > 1) printf("[ shard    ] %s %d/%d: %zu of %zu tests\n", name, k, of, m, n);
  const char *filter = getenv("CANOPY_TEST_FILTER");
  if (filter) cmocka_set_test_filter(filter);
  int rc = _cmocka_run_group_tests(name, mine, m, setup, teardown);
  free(mine);
  return rc;
}

uint64_t cn_test_seed(const char *test_name) {
  const char *env = getenv("CANOPY_TEST_SEED");
  uint64_t seed = env ? strtoull(env, NULL, 0) : (uint64_t)time(NULL) ^ (uint64_t)clock();
  printf("[ seed     ] %s: CANOPY_TEST_SEED=%llu\n", test_name, (unsigned long long)seed);
  return seed;
}

uint64_t cn_test_rand(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

float cn_test_randf(uint64_t *s) { return (float)((cn_test_rand(s) >> 40) * 0x1p-23 - 1.0); }

double cn_test_rel_l2(const float *a, const float *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    double d = (double)a[i] - b[i];
    num += d * d;
    den += (double)b[i] * b[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}
