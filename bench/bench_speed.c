/* SmolLM2 (or any model) CPU speed next to the machine's physical limits, measured in one run:
 *   decode  tokens/s  vs  copy bandwidth / (weight bytes + KV bytes read per token)
 *   prefill tokens/s  vs  OpenBLAS sgemm FLOP rate / (FLOPs per prompt token)
 * usage: bench_speed [-m DIR] [--threads N] [--decode N] [--prefill N] [--reps N] */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/bench_util.h"
#include "canopy.h"
#include "cli/cpu_tune.h"
#include "kernels/cpu/ops.h"

typedef struct copy_job {
  char *dst;
  const char *src;
  size_t bytes;
  int parts;
} copy_job;

static void copy_part(void *arg, int i) {
  copy_job *j = arg;
  size_t chunk = j->bytes / (size_t)j->parts;
  memcpy(j->dst + chunk * (size_t)i, j->src + chunk * (size_t)i, chunk);
}

typedef struct read_job {
  const float *src;
  size_t n;
  int parts;
  float sums[64];
} read_job;

static void read_part(void *arg, int i) {
  read_job *j = arg;
  size_t chunk = j->n / (size_t)j->parts;
  const float *p = j->src + chunk * (size_t)i;
  float acc[16] = {0};
  for (size_t k = 0; k + 16 <= chunk; k += 16)
    for (int l = 0; l < 16; l++) acc[l] += p[k + l];
  float s = 0;
  for (int l = 0; l < 16; l++) s += acc[l];
  j->sums[i % 64] += s;
}

/* Bytes read per second by a threaded sum over 1 GiB: the rate a decode step, which only
 * reads weights, could at best stream them. */
static double read_bandwidth(int threads) {
  size_t n = ((size_t)1 << 30) / sizeof(float);
  float *a = malloc(n * sizeof *a);
  for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
  cn_threadpool *tp;
  cn_threadpool_create(threads, &tp);
  read_job j = {.src = a, .n = n, .parts = threads * 4};
  double t[7];
  for (int r = 0; r < 7; r++) {
    double t0 = bench_now_s();
    cn_threadpool_run(tp, j.parts, read_part, &j);
    t[r] = bench_now_s() - t0;
  }
  cn_threadpool_free(tp);
  free(a);
  return (double)(n * sizeof(float)) / bench_median(t, 7);
}

/* Bytes read plus bytes written per second by a multi-threaded memcpy of a buffer far larger
 * than the caches: what streaming weights from memory can at best achieve. */
static double copy_bandwidth(int threads) {
  size_t bytes = (size_t)1 << 30;
  char *a = malloc(bytes), *b = malloc(bytes);
  memset(a, 1, bytes);
  memset(b, 2, bytes);
  cn_threadpool *tp;
  cn_threadpool_create(threads, &tp);
  copy_job j = {b, a, bytes, threads * 4};
  double t[7];
  for (int r = 0; r < 7; r++) {
    double t0 = bench_now_s();
    cn_threadpool_run(tp, j.parts, copy_part, &j);
    t[r] = bench_now_s() - t0;
  }
  cn_threadpool_free(tp);
  free(a);
  free(b);
  return 2.0 * (double)bytes / bench_median(t, 7);
}

/* sgemm FLOP rate at the prefill's own shape (tokens x hidden by hidden x ffn), and at a large
 * square shape, which is the best OpenBLAS does on this machine. */
static double sgemm_rate(int m, int n, int k) {
  float *a = malloc(sizeof *a * (size_t)m * k), *b = malloc(sizeof *b * (size_t)n * k), *c = malloc(sizeof *c * (size_t)m * n);
  for (size_t i = 0; i < (size_t)m * k; i++) a[i] = (float)(i % 7) * 0.1f;
  for (size_t i = 0; i < (size_t)n * k; i++) b[i] = (float)(i % 5) * 0.1f;
  double t[5];
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1, a, k, b, k, 0, c, n);
  for (int r = 0; r < 5; r++) {
    double t0 = bench_now_s();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1, a, k, b, k, 0, c, n);
    t[r] = bench_now_s() - t0;
  }
  free(a), free(b), free(c);
  return 2.0 * m * n * (double)k / bench_median(t, 5);
}

static int die(const char *what) {
  fprintf(stderr, "bench_speed: %s: %s\n", what, canopy_last_error());
  return 1;
}

int main(int argc, char **argv) {
  cli_tune_openblas(argv);
  const char *dir = "models/SmolLM2-135M-Instruct";
  int threads = 0, n_decode = 64, n_prefill = 512, reps = 3;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "-m") && i + 1 < argc) dir = argv[++i];
    else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--decode") && i + 1 < argc) n_decode = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--prefill") && i + 1 < argc) n_prefill = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
    else {
      fprintf(stderr, "usage: bench_speed [-m DIR] [--threads N] [--decode N] [--prefill N] [--reps N]\n");
      return 2;
    }
  }
  canopy_model_params mp = canopy_model_default_params();
  mp.n_threads = threads;
  canopy_model *m;
  if (canopy_model_load(dir, &mp, &m)) return die("loading the model");
  canopy_model_info info;
  canopy_model_get_info(m, &info);
  int nt = threads > 0 ? threads : openblas_get_num_threads();

  double bw = copy_bandwidth(nt), rbw = read_bandwidth(nt);
  double peak = sgemm_rate(2048, 2048, 2048);
  double shape_rate = sgemm_rate(n_prefill, info.intermediate_size, info.hidden_size);

  /* Prompt tokens: a fixed pseudo-random walk over ordinary ids (content does not change cost). */
  int32_t *ids = malloc(sizeof *ids * (size_t)n_prefill);
  uint32_t x = 12345;
  for (int i = 0; i < n_prefill; i++) ids[i] = (int32_t)(100 + (x = x * 1664525u + 1013904223u) % 20000u);

  canopy_session_params sp = canopy_session_default_params();
  sp.max_tokens = n_decode;
  sp.stop_at_eos = 0;
  double *pre = malloc(sizeof *pre * reps), *dec = malloc(sizeof *dec * reps);
  for (int r = 0; r < reps; r++) {
    canopy_session *s;
    if (canopy_session_create(m, &sp, &s)) return die("session");
    /* Vary the first token so the prefix cache cannot serve a repeated prompt. */
    ids[0] = 100 + r;
    if (canopy_session_append(s, ids, n_prefill)) return die("prefill");
    int32_t t;
    while (canopy_session_next(s, &t) == CANOPY_OK) {}
    canopy_stats st;
    canopy_session_get_stats(s, &st);
    pre[r] = (st.n_prompt - st.n_reused) / st.prefill_s;
    dec[r] = st.n_generated / st.decode_s;
    canopy_session_free(s);
  }
  double prefill_tok_s = bench_median(pre, reps), decode_tok_s = bench_median(dec, reps);

  /* Per decoded token: every weight once, plus K and V of the context (at the mean position). */
  double ctx = n_prefill + n_decode / 2.0;
  double kv_bytes = 2.0 * info.n_layers * info.n_kv_heads * info.head_dim * 4.0 * ctx;
  double bytes_per_token = (double)info.weight_bytes + kv_bytes;
  double decode_bound = bw / bytes_per_token;
  /* Per prompt token: 2 FLOPs per weight of the layers (the LM head runs for the last row
   * only), plus attention's QK^T and PV over half the prompt on average. */
  double layer_params = (double)info.n_params - (double)info.vocab_size * info.hidden_size - info.hidden_size;
  double attn_flops = 4.0 * info.n_layers * info.n_heads * info.head_dim * (n_prefill / 2.0);
  double flops_per_token = 2.0 * layer_params + attn_flops;
  double prefill_bound = peak / flops_per_token;

  printf("model            %s (%lld params, %.1f MB fp32)\n", dir, (long long)info.n_params, info.weight_bytes / 1e6);
  printf("threads          %d (OpenBLAS kernels: %s)\n", nt, openblas_get_corename());
  printf("copy bandwidth   %.2f GB/s (read + write, 1 GiB memcpy, median of 7)\n", bw / 1e9);
  printf("read bandwidth   %.2f GB/s (threaded sum over 1 GiB, median of 7)\n", rbw / 1e9);
  printf("sgemm            %.1f GFLOP/s at 2048^3; %.1f GFLOP/s at %dx%dx%d (prefill shape)\n", peak / 1e9,
         shape_rate / 1e9, n_prefill, info.intermediate_size, info.hidden_size);
  printf("decode           %.2f tok/s   bound %.2f tok/s (%.1f MB/token)   %.0f%% of bound (%.0f%% of the read-only bound)\n",
         decode_tok_s, decode_bound, bytes_per_token / 1e6, 100.0 * decode_tok_s / decode_bound,
         100.0 * decode_tok_s / (rbw / bytes_per_token));
  printf("prefill (%4d)   %.1f tok/s   bound %.1f tok/s (%.2f GFLOP/token)   %.0f%% of sgemm rate\n", n_prefill,
         prefill_tok_s, prefill_bound, flops_per_token / 1e9, 100.0 * prefill_tok_s / prefill_bound);
  free(ids), free(pre), free(dec);
  canopy_model_free(m);
  return 0;
}
