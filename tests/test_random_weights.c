/* Models built from a config.json alone (canopy_model_params.random_weights): the weights are a
 * hash of (seed, tensor, element), so the same seed gives the same model and another seed another;
 * matrices have std ~0.02 and norms sit around 1; bad configs fail naming the file and field. With
 * a CUDA device the same config on CUDA holds bit-equal bf16 weights (device op against its CPU
 * twin at awkward lengths, then the model's embedding table) and gives the CPU's logits within
 * bf16 tolerance. The CUDA part skips without a device; the rest runs everywhere. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "kernels/cpu/ops.h"
#include "model/forward.h"
#include "tests/testing.h"
#ifdef CANOPY_HAVE_CUDA
#include "kernels/cuda/cuda_ops.h"
#endif

/* Weights exact in bf16; activations and K/V round on the device (as llama_bf16 in
 * test_cuda_forward). */
#define TOL 3e-2

/* GQA 4:1, head_dim 32, llama3 rope scaling, untied head: every weight kind of the Llama family. */
static const char *TINY =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 128, \"intermediate_size\": 344,"
    " \"num_hidden_layers\": 3, \"num_attention_heads\": 4, \"num_key_value_heads\": 1, \"vocab_size\": 1003,"
    " \"max_position_embeddings\": 256, \"rms_norm_eps\": 1e-5, \"rope_theta\": 500000.0,"
    " \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0,"
    " \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 64}, \"tie_word_embeddings\": false}";

static char cfg_path[256];

static const int32_t TOKENS[] = {1, 1002, 17, 500, 3, 999, 0, 42, 42, 77, 256, 1000, 5};
#define N_TOK (int)(sizeof TOKENS / sizeof TOKENS[0])


static void write_config(const char *path, const char *json) {
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fputs(json, f);
  fclose(f);
}

static canopy_model *load_random(int device, uint64_t seed) {
  canopy_model_params p = canopy_model_default_params();
  p.n_threads = 2;
  p.device = device;
  p.random_weights = cfg_path;
  p.random_seed = seed;
  canopy_model *m = NULL;
  int st = canopy_model_load(NULL, &p, &m);
  if (st) print_error("%s\n", canopy_last_error());
  assert_int_equal(st, CANOPY_OK);
  return m;
}

/* Prefill of n tokens: logits of every row into out [n][vocab], or (top != NULL) only each row's
 * best k ids into top [n][k] (k = 0: the argmax) and their log-softmax into logp. */
static void prefill_top(canopy_model *m, const int32_t *tokens, int n, float *out, int32_t *top, int k, float *logp) {
  int32_t pos[64], rows[64];
  for (int i = 0; i < n; i++)
    pos[i] = rows[i] = i;
  cn_kv_seq *kv;
  assert_int_equal(cn_kv_seq_create(m->kv, &kv), CANOPY_OK);
  cn_seq_batch sb = {.kv = kv, .first = 0, .n = n};
  cn_batch b = {.n_tokens = n, .tokens = tokens, .pos = pos, .n_seqs = 1, .seqs = &sb, .n_logits = n,
                .logit_rows = rows, .top = top, .top_k = k, .top_logp = logp};
  int st = cn_forward(m, &b, out);
  if (st) print_error("%s\n", canopy_last_error());
  assert_int_equal(st, CANOPY_OK);
  cn_kv_seq_free(kv);
}

static void prefill(canopy_model *m, const int32_t *tokens, int n, float *out) {
  prefill_top(m, tokens, n, out, NULL, 0, NULL);
}

/* The forward's top tokens (computed by the backend where the logits are) are the argmax, and
 * its best 5 the top 5 with their log-softmax, of the logits the same forward copies out; NULL
 * logits are fine then. */
static void check_top_matches_logits(canopy_model *m, const char *device) {
  enum { K = 5 };
  int V = m->cfg.vocab_size;
  float *l = malloc(sizeof(float) * N_TOK * V), logp[N_TOK * K], want_lp[K];
  int32_t top[N_TOK], best[N_TOK * K], want[K];
  memset(top, 0xff, sizeof top);
  prefill(m, TOKENS, N_TOK, l);
  prefill_top(m, TOKENS, N_TOK, NULL, top, 0, NULL);
  prefill_top(m, TOKENS, N_TOK, NULL, best, K, logp);
  for (int r = 0; r < N_TOK; r++) {
    cn_cpu_top_k(l + (size_t)r * V, V, K, want, want_lp);
    if (top[r] != want[0]) printf("  %s row %d: top %d, argmax of the logits %d\n", device, r, top[r], want[0]);
    assert_int_equal(top[r], want[0]);
    for (int j = 0; j < K; j++) {
      assert_int_equal(best[r * K + j], want[j]);
      assert_true(fabsf(logp[r * K + j] - want_lp[j]) < 1e-4f);
    }
  }
  printf("  %s: top tokens and best %d of %d rows equal those of the logits\n", device, K, N_TOK);
  free(l);
}

static void test_forward_top_is_the_argmax_of_its_logits(void **state) {
  canopy_model *m = load_random(CANOPY_DEVICE_CPU, 5);
  check_top_matches_logits(m, "cpu");
  canopy_model_free(m);
#ifdef CANOPY_HAVE_CUDA
  if (cn_cuda_device_count()) {
    m = load_random(CANOPY_DEVICE_CUDA, 5);
    check_top_matches_logits(m, "cuda");
    canopy_model_free(m);
  }
#endif
}

static void stats(const float *x, size_t n, double *mean, double *std) {
  double s = 0, ss = 0;
  for (size_t i = 0; i < n; i++)
    s += x[i], ss += (double)x[i] * x[i];
  *mean = s / n;
  *std = sqrt(ss / n - *mean * *mean);
}

static int on_bf16_grid(const float *x, size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, &x[i], 4);
    if (u & 0xffffu) return 0;
  }
  return 1;
}


static void test_same_seed_same_model_other_seed_other_model(void **state) {
  canopy_model *a = load_random(CANOPY_DEVICE_CPU, 7), *b = load_random(CANOPY_DEVICE_CPU, 7),
               *c = load_random(CANOPY_DEVICE_CPU, 8);
  int V = a->cfg.vocab_size;
  float *la = malloc(sizeof(float) * N_TOK * V), *lb = malloc(sizeof(float) * N_TOK * V),
        *lc = malloc(sizeof(float) * N_TOK * V);
  prefill(a, TOKENS, N_TOK, la);
  prefill(b, TOKENS, N_TOK, lb);
  prefill(c, TOKENS, N_TOK, lc);
  assert_memory_equal(la, lb, sizeof(float) * N_TOK * V);
  double diff = cn_test_rel_l2(lc, la, (size_t)N_TOK * V);
  printf("  seed 7 vs seed 8: logits rel L2 %.3f\n", diff);
  assert_true(diff > 0.1);
  for (size_t i = 0; i < (size_t)N_TOK * V; i++)
    assert_true(isfinite(la[i]));
  free(la), free(lb), free(lc);
  canopy_model_free(a), canopy_model_free(b), canopy_model_free(c);
}

static void test_weights_have_the_promised_statistics(void **state) {
  canopy_model *m = load_random(CANOPY_DEVICE_CPU, 1);
  const cn_config *c = &m->cfg;
  struct {
    const char *name;
    const float *w;
    size_t n;
    double mean, std;
  } t[] = {
      {"embed", m->embed, (size_t)c->vocab_size * c->hidden_size, 0.0, 0.02},
      {"lm_head", m->lm_head, (size_t)c->vocab_size * c->hidden_size, 0.0, 0.02},
      {"wqkv.0", m->layers[0].wqkv, (size_t)(c->n_heads + 2 * c->n_kv_heads) * c->head_dim * c->hidden_size, 0.0, 0.02},
      {"w_down.2", m->layers[2].w_down, (size_t)c->hidden_size * c->intermediate_size, 0.0, 0.02},
      {"attn_norm.1", m->layers[1].attn_norm, (size_t)c->hidden_size, 1.0, 0.1},
      {"final_norm", m->final_norm, (size_t)c->hidden_size, 1.0, 0.1},
  };
  assert_true(m->lm_head != m->embed);
  for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
    double mean, std;
    stats(t[i].w, t[i].n, &mean, &std);
    printf("  %-12s n=%-7zu mean %+.4f std %.4f (want %.2f, %.2f)\n", t[i].name, t[i].n, mean, std, t[i].mean,
           t[i].std);
    assert_true(fabs(mean - t[i].mean) < 0.2 * t[i].std + 4 * t[i].std / sqrt((double)t[i].n));
    assert_true(fabs(std - t[i].std) < 0.1 * t[i].std);
    assert_true(on_bf16_grid(t[i].w, t[i].n));
  }
  /* Two tensors of one model are different streams, not copies. */
  assert_true(memcmp(m->embed, m->lm_head, sizeof(float) * 64) != 0);
  canopy_model_free(m);
}

static void expect_error(const char *json, int status, const char *needle) {
  char path[300];
  snprintf(path, sizeof path, "%s.bad", cfg_path);
  write_config(path, json);
  canopy_model_params p = canopy_model_default_params();
  p.random_weights = path;
  canopy_model *m = (canopy_model *)1;
  int st = canopy_model_load(NULL, &p, &m);
  printf("  -> %d: %s\n", st, canopy_last_error());
  assert_int_equal(st, status);
  assert_non_null(strstr(canopy_last_error(), needle));
  assert_non_null(strstr(canopy_last_error(), path));
  remove(path);
}

static void test_bad_configs_fail_naming_file_and_field(void **state) {
  expect_error("{\"architectures\": [\"LlamaForCausalLM\"], \"intermediate_size\": 8, \"num_hidden_layers\": 1,"
               " \"num_attention_heads\": 2, \"vocab_size\": 10, \"max_position_embeddings\": 16}",
               CANOPY_ERR_FORMAT, "hidden_size");
  expect_error("{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 16, \"intermediate_size\": 8,"
               " \"num_hidden_layers\": 1, \"num_attention_heads\": 2, \"num_key_value_heads\": 3,"
               " \"vocab_size\": 10, \"max_position_embeddings\": 16}",
               CANOPY_ERR_FORMAT, "num_key_value_heads");
  expect_error("{\"architectures\": [\"GPT2LMHeadModel\"]}", CANOPY_ERR_UNSUPPORTED, "GPT2LMHeadModel");
  expect_error("{\"architectures\": [\"LlamaForCausalLM\"], \"vocab_size\": 10, \"hidden_size\": -4}", CANOPY_ERR_FORMAT, "hidden_size");
  expect_error("not json", CANOPY_ERR_FORMAT, "not valid JSON");
  canopy_model_params p = canopy_model_default_params();
  p.random_weights = "/nonexistent/config.json";
  canopy_model *m = NULL;
  assert_int_equal(canopy_model_load(NULL, &p, &m), CANOPY_ERR_IO);
  assert_non_null(strstr(canopy_last_error(), "/nonexistent/config.json"));
  /* Without random weights a folder is still required. */
  assert_int_equal(canopy_model_load(NULL, NULL, &m), CANOPY_ERR_INVALID_ARG);
}

#ifdef CANOPY_HAVE_CUDA
static void test_cuda_random_weights_equal_the_cpu_twin_bit_for_bit(void **state) {
  if (!cn_cuda_device_count()) {
    printf("  no CUDA device visible: skipped\n");
    skip();
  }
  cn_cuda_ctx *ctx = NULL;
  assert_int_equal(cn_cuda_ctx_create(0, &ctx), CANOPY_OK);
  const size_t lens[] = {1, 7, 255, 256, 257, 100003, 3 << 20};
  for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
    size_t n = lens[k];
    uint64_t stream = 0x1234567ull * (k + 1);
    float scale = k % 2 ? 0.0346f : 0.17f, mean = k % 3 ? 0.0f : 1.0f;
    cn_bf16 *d = NULL, *h = malloc(sizeof *h * n);
    float *ref = malloc(sizeof *ref * n);
    assert_int_equal(cn_cuda_malloc(ctx, (void **)&d, sizeof *d * n), CANOPY_OK);
    assert_int_equal(cn_cuda_memset(ctx, d, 0xFF, sizeof *d * n), CANOPY_OK);
    assert_int_equal(cn_cuda_random_bf16(ctx, d, n, stream, scale, mean), CANOPY_OK);
    assert_int_equal(cn_cuda_memcpy_d2h(ctx, h, d, sizeof *d * n), CANOPY_OK);
    cn_cpu_random_weights(ref, n, stream, scale, mean);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
      uint32_t u;
      memcpy(&u, &ref[i], 4);
      bad += h[i] != (cn_bf16)(u >> 16);
    }
    printf("  n=%-8zu scale %.4f mean %.1f: %zu of %zu differ\n", n, scale, mean, bad, n);
    assert_int_equal(bad, 0);
    cn_cuda_free(ctx, d);
    free(h), free(ref);
  }
  assert_int_equal(cn_cuda_random_bf16(ctx, NULL, 1, 0, NAN, 0), CANOPY_ERR_INVALID_ARG);
  cn_cuda_ctx_free(ctx);
}

static void test_cuda_random_model_matches_the_cpu_one(void **state) {
  if (!cn_cuda_device_count()) {
    printf("  no CUDA device visible: skipped\n");
    skip();
  }
  canopy_model *cpu = load_random(CANOPY_DEVICE_CPU, 3), *gpu = load_random(CANOPY_DEVICE_CUDA, 3);
  const cn_config *c = &cpu->cfg;
  size_t n = (size_t)c->vocab_size * c->hidden_size;
  cn_bf16 *h = malloc(sizeof *h * n);
  void *cu = NULL;
  assert_int_equal(cn_cuda_ctx_create(0, (cn_cuda_ctx **)&cu), CANOPY_OK);
  assert_int_equal(cn_cuda_memcpy_d2h(cu, h, gpu->lm_head, sizeof *h * n), CANOPY_OK);
  cn_cuda_ctx_free(cu);
  for (size_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, &((const float *)cpu->lm_head)[i], 4);
    assert_int_equal(h[i], u >> 16);
  }
  int V = c->vocab_size;
  float *lc = malloc(sizeof(float) * N_TOK * V), *lg = malloc(sizeof(float) * N_TOK * V);
  prefill(cpu, TOKENS, N_TOK, lc);
  prefill(gpu, TOKENS, N_TOK, lg);
  double err = cn_test_rel_l2(lg, lc, (size_t)N_TOK * V);
  printf("  CUDA vs CPU logits, prefill of %d: rel L2 %.2e (tolerance %.0e)\n", N_TOK, err, TOL);
  assert_true(err <= TOL);
  free(h), free(lc), free(lg);
  canopy_model_free(cpu), canopy_model_free(gpu);
}
#endif

static int setup(void **state) {
  snprintf(cfg_path, sizeof cfg_path, "/tmp/canopy_test_random_weights_%d.json", (int)getpid());
  write_config(cfg_path, TINY);
  return 0;
}

static int teardown(void **state) {
  remove(cfg_path);
  return 0;
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_same_seed_same_model_other_seed_other_model),
      cmocka_unit_test(test_weights_have_the_promised_statistics),
      cmocka_unit_test(test_bad_configs_fail_naming_file_and_field),
      cmocka_unit_test(test_forward_top_is_the_argmax_of_its_logits),
#ifdef CANOPY_HAVE_CUDA
      cmocka_unit_test(test_cuda_random_weights_equal_the_cpu_twin_bit_for_bit),
      cmocka_unit_test(test_cuda_random_model_matches_the_cpu_one),
#endif
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
