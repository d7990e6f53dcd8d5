/* The fp32 CPU ops against straightforward double-precision references, on random inputs of
 * awkward shapes: the CPU ops are the reference for everything else, so they are checked first. */
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include "kernels/cpu/ops.h"
#include "tests/testing.h"

static uint64_t rng;

static float *rand_buf(size_t n) {
  float *p = malloc(sizeof *p * n);
  for (size_t i = 0; i < n; i++) p[i] = cn_test_randf(&rng);
  return p;
}

static float *nan_buf(size_t n) {
  float *p = malloc(sizeof *p * n);
  for (size_t i = 0; i < n; i++) p[i] = NAN;
  return p;
}

static void assert_all_finite(const float *p, size_t n) {
  for (size_t i = 0; i < n; i++) assert_true(isfinite(p[i]));
}

/* Per element against a double-precision product, within the error bound of any fp32 summation
 * order: (in + 2) eps times the sum of the terms' magnitudes (a relative L2 over a single
 * output that cancels to near zero is not a fair test). */
static void check_matmul(cn_threadpool *tp, int n, int in, int out) {
  float *x = rand_buf((size_t)n * in), *w = rand_buf((size_t)out * in), *b = rand_buf((size_t)out);
  float *y = nan_buf((size_t)n * out);
  for (int use_bias = 0; use_bias < 2; use_bias++) {
    cn_cpu_matmul(tp, y, x, w, use_bias ? b : NULL, n, in, out);
    assert_all_finite(y, (size_t)n * out);
    for (int i = 0; i < n; i++)
      for (int j = 0; j < out; j++) {
        double ref = use_bias ? b[j] : 0, mag = fabs(ref);
        for (int k = 0; k < in; k++) {
          ref += (double)x[i * in + k] * w[j * in + k];
          mag += fabs((double)x[i * in + k] * w[j * in + k]);
        }
        double err = fabs(y[(size_t)i * out + j] - ref);
        if (!(err <= (in + 2) * FLT_EPSILON * mag))
          fail_msg("matmul n=%d in=%d out=%d bias=%d: y[%d][%d] = %.9g, expected %.9g", n, in, out, use_bias, i, j,
                   y[(size_t)i * out + j], ref);
      }
  }
  free(x), free(w), free(b), free(y);
}

static void test_matmul_matches_naive_product(void **state) {
  cn_threadpool *tp;
  assert_int_equal(cn_threadpool_create(3, &tp), 0);
  /* Around the streaming kernel's edges: input groups of 4 (n), 16-wide columns with a masked
   * tail (in), 4-row blocks with leftover rows and fewer blocks than pool parts (out); sgemm
   * past CN_SKINNY_MAX. */
  int ns[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, CN_SKINNY_MAX - 1, CN_SKINNY_MAX, CN_SKINNY_MAX + 1, 64};
  int ins[] = {1, 7, 16, 17, 40, 129};
  int outs[] = {1, 3, 4, 5, 9, 70, 250};
  for (size_t a = 0; a < sizeof ns / sizeof ns[0]; a++)
    for (size_t c = 0; c < sizeof ins / sizeof ins[0]; c++)
      for (size_t d = 0; d < sizeof outs / sizeof outs[0]; d++) check_matmul(tp, ns[a], ins[c], outs[d]);
  check_matmul(NULL, 5, 576, 37); /* no pool: one part does every block and the leftover rows */
  cn_threadpool_free(tp);
}

static void test_rmsnorm_and_swiglu_match_formulas(void **state) {
  int n = 5, dim = 77;
  float *x = rand_buf((size_t)n * dim), *w = rand_buf(dim), *out = nan_buf((size_t)n * dim);
  cn_cpu_rmsnorm(out, x, w, n, dim, 1e-5f);
  for (int i = 0; i < n; i++) {
    double ss = 0;
    for (int j = 0; j < dim; j++) ss += (double)x[i * dim + j] * x[i * dim + j];
    for (int j = 0; j < dim; j++) {
      double ref = x[i * dim + j] / sqrt(ss / dim + 1e-5) * w[j];
      assert_true(fabs(out[i * dim + j] - ref) < 1e-5 * (1 + fabs(ref)));
    }
  }
  float *gu = rand_buf((size_t)n * 2 * dim), *o = nan_buf((size_t)n * dim);
  /* Gates of every size, out to where e^-g leaves the float range, in the last row. */
  for (int j = 0; j < dim; j++) gu[(n - 1) * 2 * dim + j] = (float)(j - dim / 2) * 2.5f;
  cn_cpu_swiglu(o, gu, n, dim);
  for (int i = 0; i < n; i++)
    for (int j = 0; j < dim; j++) {
      double g = gu[i * 2 * dim + j], u = gu[i * 2 * dim + dim + j], ref = g / (1 + exp(-g)) * u;
      assert_true(fabs(o[i * dim + j] - ref) < 1e-6 * (1 + fabs(ref)));
    }
  free(x), free(w), free(out), free(gu), free(o);
}

static void test_rope_rotates_half_pairs_by_position(void **state) {
  int n = 3, heads = 2, d = 8;
  float *x = rand_buf((size_t)n * heads * d), *orig = malloc(sizeof *orig * (size_t)n * heads * d);
  memcpy(orig, x, sizeof *orig * (size_t)n * heads * d);
  int32_t pos[3] = {0, 5, 1000};
  float inv_freq[4];
  for (int k = 0; k < 4; k++) inv_freq[k] = (float)pow(10000.0, -2.0 * k / d);
  cn_cpu_rope(x, pos, n, heads, d, inv_freq);
  for (int i = 0; i < n; i++)
    for (int h = 0; h < heads; h++)
      for (int k = 0; k < d / 2; k++) {
        const float *o = orig + (i * heads + h) * d;
        double ang = (double)((float)pos[i] * inv_freq[k]);
        double a = o[k] * cos(ang) - o[k + d / 2] * sin(ang), b = o[k + d / 2] * cos(ang) + o[k] * sin(ang);
        assert_true(fabs(x[(i * heads + h) * d + k] - a) < 1e-5);
        assert_true(fabs(x[(i * heads + h) * d + k + d / 2] - b) < 1e-5);
      }
  free(x), free(orig);
}

/* Reference attention in double over a flat (unpaged) key/value history. */
static void naive_attention(double *out, const float *q, const float *keys, const float *vals, int ctx, int n,
                            const int32_t *pos, const uint64_t *mask, int heads, int kv_heads, int d, int window) {
  int kv_dim = kv_heads * d, words = (n + 63) / 64;
  double *sc = malloc(sizeof *sc * (size_t)(ctx + n));
  for (int i = 0; i < n; i++)
    for (int h = 0; h < heads; h++) {
      int g = h / (heads / kv_heads);
      double mx = -INFINITY;
      for (int s = 0; s < ctx + n; s++) {
        int j = s - ctx, kp = s < ctx ? s : pos[j];
        int vis = s < ctx || (mask ? (mask[i * words + j / 64] >> (j % 64)) & 1 : j <= i);
        if (window > 0 && kp <= pos[i] - window) vis = 0;
        sc[s] = -INFINITY;
        if (!vis) continue;
        double dot = 0;
        for (int t = 0; t < d; t++) dot += (double)q[(i * heads + h) * d + t] * keys[s * kv_dim + g * d + t];
        sc[s] = dot / sqrt((double)d);
        mx = fmax(mx, sc[s]);
      }
      double sum = 0;
      for (int s = 0; s < ctx + n; s++) sum += sc[s] == -INFINITY ? 0 : exp(sc[s] - mx);
      for (int t = 0; t < d; t++) {
        double acc = 0;
        for (int s = 0; s < ctx + n; s++)
          if (sc[s] != -INFINITY) acc += exp(sc[s] - mx) / sum * vals[s * kv_dim + g * d + t];
        out[(i * heads + h) * d + t] = acc;
      }
    }
  free(sc);
}

/* qoff > 0: the first qoff new slots were written by an earlier forward (a draft tree's upper
 * levels); only the last n - qoff rows are queries of this call. */
static void check_attention_q(cn_threadpool *tp, int ctx, int n, int heads, int kv_heads, int d, int block, int tree,
                              int window, int qoff) {
  int kv_dim = kv_heads * d, total = ctx + n, nblocks = (total + block - 1) / block, words = (n + 63) / 64;
  float *keys = rand_buf((size_t)total * kv_dim), *vals = rand_buf((size_t)total * kv_dim);
  float *q = rand_buf((size_t)n * heads * d), *out = nan_buf((size_t)n * heads * d);
  /* Each block its own allocation, so a wrong block lookup reads NaN or faults. */
  float **kb = malloc(sizeof *kb * nblocks), **vb = malloc(sizeof *vb * nblocks);
  for (int b = 0; b < nblocks; b++) kb[b] = nan_buf((size_t)block * kv_dim), vb[b] = nan_buf((size_t)block * kv_dim);
  cn_cpu_paged_kv kv = {kb, vb, block};
  cn_cpu_kv_write(&kv, 0, keys, vals, total, kv_dim);
  int32_t *pos = malloc(sizeof *pos * n);
  uint64_t *mask = calloc((size_t)n * words, sizeof *mask);
  int *parent = malloc(sizeof *parent * n), *depth = malloc(sizeof *depth * n);
  for (int i = 0; i < n; i++) {
    parent[i] = tree ? (i == 0 ? -1 : (int)(cn_test_rand(&rng) % (uint64_t)i)) : i - 1;
    depth[i] = parent[i] < 0 ? 0 : depth[parent[i]] + 1;
    pos[i] = ctx + depth[i];
    for (int a = i; a >= 0; a = parent[a]) mask[i * words + a / 64] |= 1ull << (a % 64);
  }
  /* Poison the rows this call must not write. */
  for (int i = 0; i < qoff * heads * d; i++) out[i] = NAN;
  cn_cpu_attn_args args = {.out = out + (size_t)qoff * heads * d, .q = q + (size_t)qoff * heads * d, .kv = &kv,
                           .n = n - qoff, .ctx_len = ctx, .q_offset = qoff, .pos = pos,
                           .tree_mask = tree ? mask + (size_t)qoff * words : NULL, .mask_words = words, .n_heads = heads,
                           .n_kv_heads = kv_heads, .head_dim = d, .sliding_window = window,
                           .scale = 1.0f / sqrtf((float)d)};
  cn_cpu_attention(tp, &args);
  double *ref = malloc(sizeof *ref * (size_t)n * heads * d);
  naive_attention(ref, q, keys, vals, ctx, n, pos, tree ? mask : NULL, heads, kv_heads, d, window);
  float *reff = malloc(sizeof *reff * (size_t)n * heads * d);
  for (int i = 0; i < n * heads * d; i++) reff[i] = (float)ref[i];
  size_t skip = (size_t)qoff * heads * d;
  for (size_t i = 0; i < skip; i++) assert_true(isnan(out[i]));
  assert_all_finite(out + skip, (size_t)n * heads * d - skip);
  double err = cn_test_rel_l2(out + skip, reff + skip, (size_t)n * heads * d - skip);
  if (err > 1e-5) print_error("ctx %d n %d heads %d/%d d %d tree %d window %d: rel l2 %g\n", ctx, n, heads, kv_heads, d, tree, window, err);
  assert_true(err < 1e-5);
  for (int b = 0; b < nblocks; b++) free(kb[b]), free(vb[b]);
  free(kb), free(vb), free(keys), free(vals), free(q), free(out), free(pos), free(mask), free(parent), free(depth),
      free(ref), free(reff);
}

static void check_attention(cn_threadpool *tp, int ctx, int n, int heads, int kv_heads, int d, int block, int tree,
                            int window) {
  check_attention_q(tp, ctx, n, heads, kv_heads, d, block, tree, window, 0);
}

static void test_paged_attention_matches_naive_causal_tree_window_gqa(void **state) {
  cn_threadpool *tp;
  assert_int_equal(cn_threadpool_create(3, &tp), 0);
  check_attention(tp, 0, 1, 4, 4, 16, 16, 0, 0);
  check_attention(tp, 0, 17, 4, 1, 32, 16, 0, 0);
  check_attention(tp, 37, 1, 8, 2, 64, 16, 0, 0);
  check_attention(tp, 37, 13, 9, 3, 64, 7, 0, 0);
  check_attention(tp, 100, 70, 6, 3, 16, 16, 1, 0);
  check_attention(tp, 5, 129, 4, 2, 8, 32, 1, 0);
  check_attention(tp, 50, 20, 4, 2, 16, 16, 0, 8);
  check_attention(tp, 50, 30, 4, 4, 16, 5, 1, 12);
  /* Past 256 keys the softmax state is carried across key chunks. */
  check_attention(tp, 600, 1, 9, 3, 64, 16, 0, 0);
  check_attention(tp, 300, 40, 9, 3, 64, 16, 0, 0);
  check_attention(tp, 400, 60, 8, 2, 128, 16, 1, 0);
  check_attention(tp, 500, 50, 4, 2, 16, 16, 0, 300);
  check_attention(tp, 0, 300, 2, 2, 8, 7, 1, 100);
  /* Queries after new slots an earlier forward wrote (draft tree levels), both paths. */
  check_attention_q(tp, 30, 12, 4, 2, 16, 16, 1, 0, 5);
  check_attention_q(tp, 30, 70, 9, 3, 64, 16, 1, 0, 21);
  check_attention_q(tp, 300, 40, 4, 4, 16, 7, 0, 0, 10);
  check_attention_q(tp, 100, 60, 4, 2, 16, 16, 1, 40, 30);
  cn_threadpool_free(tp);
}

static void count_item(void *arg, int i) { __atomic_fetch_add((int *)arg + i, 1, __ATOMIC_RELAXED); }

static void test_threadpool_runs_every_item_exactly_once(void **state) {
  for (int threads = 1; threads <= 4; threads++) {
    cn_threadpool *tp;
    assert_int_equal(cn_threadpool_create(threads, &tp), 0);
    for (int round = 0; round < 200; round++) {
      int n = 1 + (int)(cn_test_rand(&rng) % 300), *hits = calloc((size_t)n, sizeof *hits);
      cn_threadpool_run(tp, n, count_item, hits);
      for (int i = 0; i < n; i++) assert_int_equal(hits[i], 1);
      free(hits);
      /* Now and then idle long enough for the workers to stop spinning and sleep, so jobs
       * arrive both at spinning and at sleeping workers. */
      if (cn_test_rand(&rng) % 8 == 0) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
      }
    }
    cn_threadpool_free(tp);
  }
}

/* Top-k against a full ranking: every element counted by how many come before it in the order
 * (value desc, index asc); the k picks are ranks 0..k-1 in order, their log-softmax against a
 * double-precision log-sum-exp. Values drawn from a few levels so ties are common. */
static void test_top_k_matches_a_full_ranking(void **state) {
  const int sizes[] = {1, 2, 7, 33, 1000};
  for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
    int n = sizes[si];
    float *x = rand_buf((size_t)n);
    for (int i = 0; i < n; i++) x[i] = floorf(x[i] * 6.0f);
    if (n > 3) x[n / 2] = -INFINITY;
    double mx = -INFINITY, sum = 0;
    for (int i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    for (int i = 0; i < n; i++) sum += exp((double)x[i] - mx);
    for (int k = 1; k <= n && k <= 32; k += k < 4 ? 1 : 7) {
      int32_t ids[32];
      float lp[32];
      cn_cpu_top_k(x, n, k, ids, lp);
      assert_int_equal(ids[0], cn_cpu_argmax(x, n));
      for (int j = 0; j < k; j++) {
        int before = 0;
        for (int i = 0; i < n; i++) before += x[i] > x[ids[j]] || (x[i] == x[ids[j]] && i < ids[j]);
        assert_int_equal(before, j);
        assert_true(fabs(lp[j] - (x[ids[j]] - mx - log(sum))) < 1e-5);
      }
    }
    free(x);
  }
}

int main(void) {
  rng = cn_test_seed("test_cpu_ops");
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_matmul_matches_naive_product),
      cmocka_unit_test(test_rmsnorm_and_swiglu_match_formulas),
      cmocka_unit_test(test_rope_rotates_half_pairs_by_position),
      cmocka_unit_test(test_paged_attention_matches_naive_causal_tree_window_gqa),
      cmocka_unit_test(test_threadpool_runs_every_item_exactly_once),
      cmocka_unit_test(test_top_k_matches_a_full_ranking),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
