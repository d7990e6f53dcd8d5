/* Shared helpers for the cmocka programs: fixture paths, skipping, seeded randomness. */
#ifndef CANOPY_TESTS_TEST_UTIL_H
#define CANOPY_TESTS_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* CTest's SKIP_RETURN_CODE: a test that cannot run here (no GPU, no model) exits with it. */
#define CN_TEST_SKIP 77

/* The source tree (for fixtures): $CANOPY_SOURCE_DIR, else the compile-time path. */
const char *cn_test_source_dir(void);

/* Writes "<source dir>/<rel>" into buf and returns buf. */
char *cn_test_path(char *buf, size_t cap, const char *rel);

/* The converted SmolLM2 folder (models/ under the source tree, made by tools/convert_smollm2.py)
 * into buf; returns 0, or prints why and returns CN_TEST_SKIP when it is not there. */
int cn_test_smollm2_dir(char *buf, size_t cap);

/* The tokenizer of tests/fixtures/tokenizer/<style>, or NULL after printing why. */
struct canopy_tokenizer *cn_test_tokenizer(const char *style);

/* Whether a path exists. */
int cn_test_exists(const char *path);

/* Removes a scratch folder and everything in it (rm -rf); 0 on success. */
int cn_test_remove_tree(const char *dir);

/* Reads a whole file (NUL-terminated, *len bytes); NULL on failure. Caller frees. */
char *cn_test_read_file(const char *path, size_t *len);

/* A seed from $CANOPY_TEST_SEED or the clock, printed so a failure can be replayed. */
uint64_t cn_test_seed(const char *test_name);

/* Runs a cmocka group as cmocka_run_group_tests does, or with $CANOPY_TEST_SHARD=k/n only its
 * tests k, k + n, k + 2n, ...: CMake registers a long program as n ctest entries, one a shard, so
 * that ctest -j runs them side by side (test_spec under the sanitizers took 1800 s alone). With
 * $CANOPY_TEST_FILTER set, only the tests whose names match it (cmocka's pattern: * and ?). */
struct CMUnitTest;
int cn_test_run_group(const char *name, const struct CMUnitTest *tests, size_t n, int (*setup)(void **),
                      int (*teardown)(void **));

/* splitmix64: small, seedable, good enough for test inputs. */
uint64_t cn_test_rand(uint64_t *state);
/* Uniform float in [-1, 1). */
float cn_test_randf(uint64_t *state);

/* ||a - b|| / ||b|| in double precision. */
double cn_test_rel_l2(const float *a, const float *b, size_t n);

#endif
