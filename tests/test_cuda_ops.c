/* The bf16 CUDA ops against their fp32 CPU twins (kernels/cpu/ops.h) on fresh random inputs of
 * awkward shapes. The CPU reference is fed exactly the bf16-rounded values the device sees, so
 * the comparison measures the device arithmetic and output rounding alone: rel L2 <= 1e-2 for
 * bf16 outputs, <= 1e-4 for fp32 ones, exact for copies (embed, kv_write) and argmax. Every
 * output buffer is poisoned with NaN first and checked to be fully written.
 *
 * Skips (exit 77) when canopy was built without CUDA or no device is visible. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "tests/testing.h"

#ifdef CANOPY_HAVE_CUDA
#include "canopy.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_ops.h"

static uint64_t rng;
static cn_cuda_ctx *ctx;
static cn_threadpool *tp;

/* ---- the worst rel L2 seen per op, printed at the end ------------------------------------ */

enum {
  OP_EMBED, OP_RMSNORM, OP_MATMUL, OP_ROPE, OP_SWIGLU, OP_ADD, OP_KV_WRITE, OP_ATTENTION, OP_ARGMAX,
  OP_NORM_MATMUL, OP_SWIGLU_MM_ADD, OP_QKV_ROPE, OP_MATMUL_ADD, OP_FFN, N_OPS
};
static const char *op_names[N_OPS] = {"embed",  "rmsnorm",     "matmul", "rope",   "swiglu",
                                      "add",    "kv_write",    "attention", "argmax", "norm_mm",
                                      "swiglu_mm+", "qkv_rope", "matmul+", "ffn"};
static double worst[N_OPS][2]; /* [op][output dtype] */
static int checked[N_OPS][2];
/* Mismatches of the running test: each is printed and counted, so one run shows every failing
 * shape; the test fails at its end (END_TEST) when any were seen. */
static int mismatches;

#define END_TEST() assert_int_equal(mismatches, 0)

static const char *dt_name(cn_cuda_dtype dt) { return dt == CN_CUDA_BF16 ? "bf16" : "f32"; }

static double tol(cn_cuda_dtype out_dt) { return out_dt == CN_CUDA_BF16 ? 1e-2 : 1e-4; }

/* Records one comparison; over the output dtype's tolerance is a mismatch. */
static void check_close(int op, cn_cuda_dtype out_dt, const float *got, const float *ref, size_t n, const char *what) {
  double rel = cn_test_rel_l2(got, ref, n);
  if (rel > worst[op][out_dt]) worst[op][out_dt] = rel;
  checked[op][out_dt]++;
  int bad = !(rel <= tol(out_dt));
  printf("  %-9s %-4s out %-60s rel L2 %.3e%s\n", op_names[op], dt_name(out_dt), what, rel, bad ? "  MISMATCH" : "");
  mismatches += bad;
}

#define CK(call)                                                                                                       \
  do {                                                                                                                 \
    int st_ = (call);                                                                                                  \
    if (st_) fail_msg("%s -> %d: %s", #call, st_, canopy_last_error());                                                \
  } while (0)

/* ---- host helpers -------------------------------------------------------------------------- */

/* fp32 -> nearest bf16 (ties to even) -> fp32, for finite values: what the device rounding does. */
static float bf16_round(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  memcpy(&f, &u, 4);
  return f;
}

static void round_if_bf16(float *p, size_t n, cn_cuda_dtype dt) {
  if (dt == CN_CUDA_BF16)
    for (size_t i = 0; i < n; i++)
      p[i] = bf16_round(p[i]);
}

static float *rand_buf(size_t n, float scale) {
  float *p = malloc(sizeof *p * (n ? n : 1));
  for (size_t i = 0; i < n; i++)
    p[i] = scale * cn_test_randf(&rng);
  return p;
}

/* Random values already on the bf16 grid (weights, caches, bf16 activations). */
static float *rand_bf16_buf(size_t n, float scale) {
  float *p = rand_buf(n, scale);
  round_if_bf16(p, n, CN_CUDA_BF16);
  return p;
}

/* Every element written: the output was poisoned with NaN and inputs are finite. */
static void check_all_finite(const float *p, size_t n, const char *what) {
  for (size_t i = 0; i < n; i++)
    if (!isfinite(p[i])) {
      printf("  %s: element %zu of %zu not written (%g)  MISMATCH\n", what, i, n, p[i]);
      mismatches++;
      return;
    }
}

static int rand_int(int lo, int hi) { return lo + (int)(cn_test_rand(&rng) % (uint64_t)(hi - lo + 1)); }

/* Uniform in [0, 1) with 53 random bits. */
static double rand_u(void) { return (double)(cn_test_rand(&rng) >> 11) * 0x1.0p-53; }

/* ---- device helpers ------------------------------------------------------------------------ */

static void *dev_alloc(size_t bytes) {
  void *p = NULL;
  CK(cn_cuda_malloc(ctx, &p, bytes));
  return p;
}

/* A device buffer of n elements of dt, all NaN. */
static void *dev_poisoned(size_t n, cn_cuda_dtype dt) {
  void *p = dev_alloc(n * cn_cuda_dtype_size(dt));
  CK(cn_cuda_memset(ctx, p, 0xFF, n * cn_cuda_dtype_size(dt)));
  return p;
}

/* Host fp32 values into a new device buffer of dt (bf16 goes through the device conversion). */
static void *dev_upload(const float *h, size_t n, cn_cuda_dtype dt) {
  void *d = dev_alloc(n * cn_cuda_dtype_size(dt));
  if (dt == CN_CUDA_F32) {
    CK(cn_cuda_memcpy_h2d(ctx, d, h, n * sizeof(float)));
  } else {
    float *tmp = dev_alloc(n * sizeof(float));
    CK(cn_cuda_memcpy_h2d(ctx, tmp, h, n * sizeof(float)));
    CK(cn_cuda_f32_to_bf16(ctx, d, tmp, n));
    CK(cn_cuda_sync(ctx));
    cn_cuda_free(ctx, tmp);
  }
  return d;
}

static void *dev_upload_bytes(const void *h, size_t bytes) {
  void *d = dev_alloc(bytes);
  CK(cn_cuda_memcpy_h2d(ctx, d, h, bytes));
  return d;
}

/* n elements of dt from the device, widened to host fp32 (exact). */
static float *dev_download(const void *d, size_t n, cn_cuda_dtype dt) {
  float *h = malloc(sizeof *h * (n ? n : 1));
  CK(cn_cuda_sync(ctx));
  if (dt == CN_CUDA_F32) {
    CK(cn_cuda_memcpy_d2h(ctx, h, d, n * sizeof(float)));
  } else {
    float *tmp = dev_alloc(n * sizeof(float));
    CK(cn_cuda_bf16_to_f32(ctx, tmp, d, n));
    CK(cn_cuda_memcpy_d2h(ctx, h, tmp, n * sizeof(float)));
    cn_cuda_free(ctx, tmp);
  }
  return h;
}

static const cn_cuda_dtype dtypes[2] = {CN_CUDA_F32, CN_CUDA_BF16};

/* ---- tests ----------------------------------------------------------------------------------- */

static void test_bf16_conversion_rounds_to_nearest_even(void **state) {
  mismatches = 0;
  /* Halfway cases both ways (1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6), tiny, huge and negative. */
  const float special[] = {0.0f, -0.0f, 1.00390625f, 1.01171875f, -1.00390625f, 1e-30f, -3.4e38f, 65504.0f, 0.1f};
  size_t ns = sizeof special / sizeof special[0], n = 1000 + ns;
  float *h = rand_buf(n, 100.0f);
  memcpy(h, special, sizeof special);
  void *b = dev_upload(h, n, CN_CUDA_BF16);
  float *back = dev_download(b, n, CN_CUDA_BF16);
  for (size_t i = 0; i < n; i++)
    if (memcmp(&back[i], &(float){bf16_round(h[i])}, 4) != 0 && mismatches++ < 10)
      printf("  bf16(%a) = %a, expected %a  MISMATCH\n", h[i], back[i], bf16_round(h[i]));
  cn_cuda_free(ctx, b);
  free(h), free(back);
  END_TEST();
}

static void test_embed_copies_table_rows(void **state) {
  mismatches = 0;
  const int shapes[][2] = {{1, 1}, {3, 17}, {17, 129}, {64, 64}, {129, 576}}; /* n, dim */
  const int vocab = 1000;
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    int n = shapes[s][0], dim = shapes[s][1];
    float *table = rand_bf16_buf((size_t)vocab * dim, 1.0f);
    int32_t *tok = malloc(sizeof *tok * n);
    for (int i = 0; i < n; i++)
      tok[i] = i == 0 ? vocab - 1 : rand_int(0, vocab - 1);
    float *ref = malloc(sizeof *ref * (size_t)n * dim);
    cn_cpu_embed(ref, table, tok, n, dim);
    void *d_table = dev_upload(table, (size_t)vocab * dim, CN_CUDA_BF16);
    void *d_tok = dev_upload_bytes(tok, sizeof *tok * n);
    for (int t = 0; t < 2; t++) {
      void *d_x = dev_poisoned((size_t)n * dim, dtypes[t]);
      CK(cn_cuda_embed(ctx, d_x, dtypes[t], d_table, d_tok, n, dim));
      float *x = dev_download(d_x, (size_t)n * dim, dtypes[t]);
      check_all_finite(x, (size_t)n * dim, "embed");
      char what[64];
      snprintf(what, sizeof what, "n=%d dim=%d", n, dim);
      check_close(OP_EMBED, dtypes[t], x, ref, (size_t)n * dim, what);
      if (memcmp(x, ref, sizeof *x * (size_t)n * dim)) { /* a copy: exact */
        printf("  embed %dx%d (%s): not an exact copy  MISMATCH\n", n, dim, dt_name(dtypes[t]));
        mismatches++;
      }
      free(x);
      cn_cuda_free(ctx, d_x);
    }
    cn_cuda_free(ctx, d_table), cn_cuda_free(ctx, d_tok);
    free(table), free(tok), free(ref);
  }
  END_TEST();
}

static void test_rmsnorm_matches_cpu(void **state) {
  mismatches = 0;
  const int shapes[][2] = {{1, 1}, {1, 3}, {3, 17}, {17, 129}, {64, 576}, {129, 2049}};
  /* (x dtype, out dtype, in place) */
  const int combos[][3] = {{CN_CUDA_F32, CN_CUDA_BF16, 0},  {CN_CUDA_BF16, CN_CUDA_BF16, 0},
                           {CN_CUDA_F32, CN_CUDA_F32, 0},   {CN_CUDA_BF16, CN_CUDA_F32, 0},
                           {CN_CUDA_BF16, CN_CUDA_BF16, 1}, {CN_CUDA_F32, CN_CUDA_F32, 1}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (size_t c = 0; c < sizeof combos / sizeof combos[0]; c++) {
      int n = shapes[s][0], dim = shapes[s][1], in_place = combos[c][2];
      cn_cuda_dtype x_dt = (cn_cuda_dtype)combos[c][0], o_dt = (cn_cuda_dtype)combos[c][1];
      size_t len = (size_t)n * dim;
      float *x = rand_buf(len, 3.0f), *w = rand_bf16_buf((size_t)dim, 1.0f), *ref = malloc(sizeof *ref * len);
      round_if_bf16(x, len, x_dt);
      cn_cpu_rmsnorm(ref, x, w, n, dim, 1e-5f);
      void *d_x = dev_upload(x, len, x_dt), *d_w = dev_upload(w, (size_t)dim, CN_CUDA_BF16);
      void *d_o = in_place ? d_x : dev_poisoned(len, o_dt);
      CK(cn_cuda_rmsnorm(ctx, d_o, o_dt, d_x, x_dt, d_w, n, dim, 1e-5f));
      float *o = dev_download(d_o, len, o_dt);
      check_all_finite(o, len, "rmsnorm");
      char what[64];
      snprintf(what, sizeof what, "n=%d dim=%d x %s%s", n, dim, dt_name(x_dt), in_place ? " in place" : "");
      check_close(OP_RMSNORM, o_dt, o, ref, len, what);
      if (!in_place) cn_cuda_free(ctx, d_o);
      cn_cuda_free(ctx, d_x), cn_cuda_free(ctx, d_w);
      free(x), free(w), free(ref), free(o);
    }
  END_TEST();
}

static void test_matmul_matches_cpu(void **state) {
  mismatches = 0;
  /* n <= 8 takes the few-row kernel (gemv.cu: vector and scalar paths), more rows cuBLAS. */
  const int shapes[][3] = {{1, 7, 5},     {3, 64, 33},      {2, 1000, 77},    {5, 576, 1537}, {7, 203, 19},
                           {8, 1536, 576}, {9, 128, 40},     {17, 129, 65},    {64, 200, 250}, {129, 576, 1537}}; /* n, in, out */
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    int n = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
    /* The device rounds an fp32 x to bf16 before the GEMM, so the reference uses bf16 x always. */
    float *x = rand_bf16_buf((size_t)n * in, 1.0f), *w = rand_bf16_buf((size_t)out * in, 1.0f);
    float *b = rand_bf16_buf((size_t)out, 1.0f), *ref = malloc(sizeof *ref * (size_t)n * out);
    void *d_w = dev_upload(w, (size_t)out * in, CN_CUDA_BF16), *d_b = dev_upload(b, (size_t)out, CN_CUDA_BF16);
    for (int xt = 0; xt < 2; xt++)
      for (int yt = 0; yt < 2; yt++)
        for (int use_bias = 0; use_bias < 2; use_bias++) {
          cn_cpu_matmul(NULL, ref, x, w, use_bias ? b : NULL, n, in, out);
          void *d_x = dev_upload(x, (size_t)n * in, dtypes[xt]), *d_y = dev_poisoned((size_t)n * out, dtypes[yt]);
          CK(cn_cuda_matmul(ctx, d_y, dtypes[yt], d_x, dtypes[xt], d_w, use_bias ? d_b : NULL, n, in, out));
          float *y = dev_download(d_y, (size_t)n * out, dtypes[yt]);
          check_all_finite(y, (size_t)n * out, "matmul");
          char what[64];
          snprintf(what, sizeof what, "%dx%dx%d x %s%s", n, in, out, dt_name(dtypes[xt]), use_bias ? " +bias" : "");
          check_close(OP_MATMUL, dtypes[yt], y, ref, (size_t)n * out, what);
          cn_cuda_free(ctx, d_x), cn_cuda_free(ctx, d_y);
          free(y);
        }
    cn_cuda_free(ctx, d_w), cn_cuda_free(ctx, d_b);
    free(x), free(w), free(b), free(ref);
  }
  END_TEST();
}

static void test_rope_matches_cpu(void **state) {
  mismatches = 0;
  const int shapes[][3] = {{1, 1, 2}, {3, 4, 64}, {17, 3, 72}, {64, 2, 128}, {129, 5, 34}}; /* n, heads, head_dim */
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int t = 0; t < 2; t++) {
      int n = shapes[s][0], heads = shapes[s][1], d = shapes[s][2];
      size_t len = (size_t)n * heads * d;
      float *x = rand_buf(len, 1.0f), *inv = malloc(sizeof *inv * (size_t)(d / 2));
      round_if_bf16(x, len, dtypes[t]);
      for (int k = 0; k < d / 2; k++)
        inv[k] = powf(10000.0f, -2.0f * k / d);
      int32_t *pos = malloc(sizeof *pos * n);
      for (int i = 0; i < n; i++)
        pos[i] = rand_int(0, 8191); /* large angles: full-range sincos */
      void *d_x = dev_upload(x, len, dtypes[t]), *d_pos = dev_upload_bytes(pos, sizeof *pos * n);
      void *d_inv = dev_upload(inv, (size_t)(d / 2), CN_CUDA_F32);
      CK(cn_cuda_rope(ctx, d_x, dtypes[t], d_pos, n, heads, d, d_inv));
      cn_cpu_rope(x, pos, n, heads, d, inv);
      float *got = dev_download(d_x, len, dtypes[t]);
      check_all_finite(got, len, "rope");
      char what[64];
      snprintf(what, sizeof what, "n=%d heads=%d head_dim=%d", n, heads, d);
      check_close(OP_ROPE, dtypes[t], got, x, len, what);
      cn_cuda_free(ctx, d_x), cn_cuda_free(ctx, d_pos), cn_cuda_free(ctx, d_inv);
      free(x), free(inv), free(pos), free(got);
    }
  END_TEST();
}

static void test_swiglu_matches_cpu(void **state) {
  mismatches = 0;
  const int shapes[][2] = {{1, 1}, {3, 17}, {17, 129}, {64, 64}, {129, 1537}}; /* n, d */
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int t = 0; t < 2; t++) {
      int n = shapes[s][0], d = shapes[s][1];
      size_t len = (size_t)n * d;
      float *gu = rand_buf(2 * len, 6.0f), *ref = malloc(sizeof *ref * len);
      round_if_bf16(gu, 2 * len, dtypes[t]);
      cn_cpu_swiglu(ref, gu, n, d);
      void *d_gu = dev_upload(gu, 2 * len, dtypes[t]), *d_o = dev_poisoned(len, dtypes[t]);
      CK(cn_cuda_swiglu(ctx, d_o, d_gu, dtypes[t], n, d));
      float *o = dev_download(d_o, len, dtypes[t]);
      check_all_finite(o, len, "swiglu");
      char what[64];
      snprintf(what, sizeof what, "n=%d d=%d", n, d);
      check_close(OP_SWIGLU, dtypes[t], o, ref, len, what);
      cn_cuda_free(ctx, d_gu), cn_cuda_free(ctx, d_o);
      free(gu), free(ref), free(o);
    }
  END_TEST();
}

static void test_add_matches_cpu(void **state) {
  mismatches = 0;
  const size_t sizes[] = {1, 3, 17, 64, 129, 100003};
  const int combos[][2] = {{CN_CUDA_F32, CN_CUDA_BF16},
                           {CN_CUDA_BF16, CN_CUDA_BF16},
                           {CN_CUDA_F32, CN_CUDA_F32},
                           {CN_CUDA_BF16, CN_CUDA_F32}}; /* x dtype, y dtype */
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
    for (size_t c = 0; c < sizeof combos / sizeof combos[0]; c++) {
      size_t n = sizes[s];
      cn_cuda_dtype x_dt = (cn_cuda_dtype)combos[c][0], y_dt = (cn_cuda_dtype)combos[c][1];
      float *x = rand_buf(n, 4.0f), *y = rand_buf(n, 1.0f);
      round_if_bf16(x, n, x_dt), round_if_bf16(y, n, y_dt);
      void *d_x = dev_upload(x, n, x_dt), *d_y = dev_upload(y, n, y_dt);
      CK(cn_cuda_add(ctx, d_x, x_dt, d_y, y_dt, n));
      cn_cpu_add(x, y, n);
      float *got = dev_download(d_x, n, x_dt);
      check_all_finite(got, n, "add");
      char what[64];
      snprintf(what, sizeof what, "n=%zu y %s", n, dt_name(y_dt));
      check_close(OP_ADD, x_dt, got, x, n, what);
      cn_cuda_free(ctx, d_x), cn_cuda_free(ctx, d_y);
      free(x), free(y), free(got);
    }
  END_TEST();
}

/* A block pool laid out as the CUDA backend will store it, [n_blocks][n_layers][K, V][bs][kv_dim],
 * with a sequence's block table that is a random permutation of the pool's blocks. */
typedef struct test_pool {
  int n_blocks, n_layers, bs, kv_dim, seq_blocks;
  size_t elems;
  float *host;    /* the whole pool, fp32 on the bf16 grid */
  int32_t *table; /* [seq_blocks] */
  void *d_pool, *d_table;
  float **k_ptrs, **v_ptrs; /* the CPU twin's view of layer `layer` */
} test_pool;

static size_t pool_block_stride(const test_pool *p) { return (size_t)p->n_layers * 2 * p->bs * p->kv_dim; }

static size_t pool_layer_offset(const test_pool *p, int layer) { return (size_t)layer * 2 * p->bs * p->kv_dim; }

static void pool_init(test_pool *p, int slots, int bs, int kv_dim, int layer, int fill) {
  p->n_layers = 2, p->bs = bs, p->kv_dim = kv_dim;
  p->seq_blocks = (slots + bs - 1) / bs;
  p->n_blocks = p->seq_blocks + 3; /* spare blocks that nobody may touch */
  p->elems = (size_t)p->n_blocks * pool_block_stride(p);
  p->host = fill ? rand_bf16_buf(p->elems, 1.0f) : NULL;
  int32_t *perm = calloc((size_t)p->n_blocks, sizeof *perm);
  for (int b = 0; b < p->n_blocks; b++)
    perm[b] = b;
  for (int b = p->n_blocks - 1; b > 0; b--) {
    int j = rand_int(0, b), tmp = perm[b];
    perm[b] = perm[j], perm[j] = tmp;
  }
  p->table = perm;
  p->d_table = dev_upload_bytes(perm, sizeof *perm * p->seq_blocks);
  p->d_pool = fill ? dev_upload(p->host, p->elems, CN_CUDA_BF16) : dev_poisoned(p->elems, CN_CUDA_BF16);
  p->k_ptrs = malloc(sizeof *p->k_ptrs * p->seq_blocks);
  p->v_ptrs = malloc(sizeof *p->v_ptrs * p->seq_blocks);
  for (int b = 0; b < p->seq_blocks && fill; b++) {
    p->k_ptrs[b] = p->host + (size_t)p->table[b] * pool_block_stride(p) + pool_layer_offset(p, layer);
    p->v_ptrs[b] = p->k_ptrs[b] + (size_t)bs * kv_dim;
  }
}

static cn_cuda_paged_kv pool_view(const test_pool *p, int layer) {
  cn_bf16 *k = (cn_bf16 *)p->d_pool + pool_layer_offset(p, layer);
  return (cn_cuda_paged_kv){k, k + (size_t)p->bs * p->kv_dim, p->d_table, pool_block_stride(p), p->bs};
}

static void pool_free(test_pool *p) {
  cn_cuda_free(ctx, p->d_pool), cn_cuda_free(ctx, p->d_table);
  free(p->host), free(p->table), free(p->k_ptrs), free(p->v_ptrs);
}

/* Both launchers: slots first.. through the block table, and per-token physical slots
 * (cn_cuda_kv_write_slots, what a captured forward uses). */
static void test_kv_write_fills_exactly_its_slots(void **state) {
  mismatches = 0;
  const int cases[][4] = {{1, 0, 16, 64}, {3, 7, 16, 144}, {17, 5, 5, 17}, {64, 33, 16, 128}, {129, 1, 7, 40}};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
    for (int t = 0; t < 4; t++) {
      int by_slots = t / 2;
      int n = cases[c][0], first = cases[c][1], bs = cases[c][2], kv_dim = cases[c][3], layer = 1;
      test_pool p;
      pool_init(&p, first + n, bs, kv_dim, layer, 0);
      float *k = rand_buf((size_t)n * kv_dim, 1.0f), *v = rand_buf((size_t)n * kv_dim, 1.0f);
      round_if_bf16(k, (size_t)n * kv_dim, dtypes[t % 2]), round_if_bf16(v, (size_t)n * kv_dim, dtypes[t % 2]);
      void *d_k = dev_upload(k, (size_t)n * kv_dim, dtypes[t % 2]), *d_v = dev_upload(v, (size_t)n * kv_dim, dtypes[t % 2]);
      cn_cuda_paged_kv view = pool_view(&p, layer);
      if (by_slots) {
        int32_t *phys = malloc(sizeof *phys * (size_t)n);
        for (int i = 0; i < n; i++)
          phys[i] = p.table[(first + i) / bs] * bs + (first + i) % bs;
        int32_t *d_phys = dev_upload_bytes(phys, sizeof *phys * (size_t)n);
        view.block_table = NULL; /* unused by this launcher */
        CK(cn_cuda_kv_write_slots(ctx, &view, d_phys, d_k, d_v, dtypes[t % 2], n, kv_dim));
        cn_cuda_free(ctx, d_phys);
        free(phys);
      } else {
        CK(cn_cuda_kv_write(ctx, &view, first, d_k, d_v, dtypes[t % 2], n, kv_dim));
      }
      float *pool = dev_download(p.d_pool, p.elems, CN_CUDA_BF16);
      /* Expected: the bf16 of each new row in its slot, NaN everywhere else. */
      float *expect = malloc(sizeof *expect * p.elems);
      for (size_t e = 0; e < p.elems; e++)
        expect[e] = NAN;
      for (int i = 0; i < n; i++) {
        int slot = first + i;
        size_t at = (size_t)p.table[slot / bs] * pool_block_stride(&p) + pool_layer_offset(&p, layer) +
                    (size_t)(slot % bs) * kv_dim;
        for (int j = 0; j < kv_dim; j++) {
          expect[at + j] = bf16_round(k[(size_t)i * kv_dim + j]);
          expect[at + (size_t)bs * kv_dim + j] = bf16_round(v[(size_t)i * kv_dim + j]);
        }
      }
      size_t written = 0;
      for (size_t e = 0; e < p.elems; e++) {
        if (isnan(expect[e])) {
          if (!isnan(pool[e]) && mismatches++ < 10)
            printf("  kv_write touched pool element %zu outside its slots  MISMATCH\n", e);
        } else {
          if (pool[e] != expect[e] && mismatches++ < 10)
            printf("  kv_write: pool element %zu = %g, expected %g  MISMATCH\n", e, pool[e], expect[e]);
          written++;
        }
      }
      if (written != 2 * (size_t)n * kv_dim) {
        printf("  kv_write case %zu: %zu elements written, expected %zu  MISMATCH\n", c, written,
               2 * (size_t)n * kv_dim);
        mismatches++;
      }
      checked[OP_KV_WRITE][dtypes[t % 2]]++;
      printf("  kv_write%s %-4s in  n=%d first_slot=%d block_size=%d kv_dim=%d: %zu elements checked\n",
             by_slots ? " (slots)" : "", dt_name(dtypes[t % 2]), n, first, bs, kv_dim, p.elems);
      cn_cuda_free(ctx, d_k), cn_cuda_free(ctx, d_v);
      pool_free(&p);
      free(k), free(v), free(pool), free(expect);
    }
  END_TEST();
}

typedef struct attn_case {
  int n, ctx_len, n_heads, n_kv_heads, head_dim, block_size, tree, window;
} attn_case;

static void test_attention_matches_cpu(void **state) {
  mismatches = 0;
  const attn_case cases[] = {
      {1, 37, 4, 4, 64, 16, 0, 0},    /* decode, GQA ratio 1 */
      {3, 0, 6, 2, 48, 16, 0, 0},     /* no prefix, ratio 3 */
      {17, 129, 8, 2, 128, 16, 1, 0}, /* tree, ratio 4 */
      {64, 100, 3, 1, 80, 7, 1, 0},   /* tree, ratio 3, odd block size */
      {129, 5, 4, 1, 64, 16, 1, 50},  /* three mask words, sliding window */
      {5, 300, 6, 2, 96, 16, 0, 64},  /* causal with a window inside the prefix */
      {3, 1000, 2, 2, 256, 32, 1, 0}, /* the largest head */
      {1, 0, 1, 1, 2, 1, 0, 0},       /* one token, nothing before it */
      {17, 33, 12, 4, 36, 5, 0, 0},   /* prefill chunk, ratio 3 */
  };
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
    for (int t = 0; t < 2; t++) {
      attn_case k = cases[c];
      int n = k.n, d = k.head_dim, layer = 1, kv_dim = k.n_kv_heads * d, mw = (n + 63) / 64;
      test_pool p;
      pool_init(&p, k.ctx_len + n, k.block_size, kv_dim, layer, 1);
      size_t qlen = (size_t)n * k.n_heads * d;
      float *q = rand_buf(qlen, 4.0f); /* larger scores: a peaked softmax exercises the running max */
      round_if_bf16(q, qlen, dtypes[t]);
      int32_t *pos = malloc(sizeof *pos * n);
      uint64_t *mask = calloc((size_t)n * mw, sizeof *mask);
      if (k.tree) {
        /* A random forest in topological order; each node sees itself and its ancestors. */
        int *parent = malloc(sizeof *parent * n), *depth = malloc(sizeof *depth * n);
        for (int i = 0; i < n; i++) {
          parent[i] = i == 0 ? -1 : rand_int(-1, i - 1);
          depth[i] = parent[i] < 0 ? 0 : depth[parent[i]] + 1;
          pos[i] = k.ctx_len + depth[i];
          for (int j = i; j >= 0; j = parent[j])
            mask[(size_t)i * mw + j / 64] |= 1ull << (j % 64);
        }
        free(parent), free(depth);
      } else {
        for (int i = 0; i < n; i++)
          pos[i] = k.ctx_len + i;
      }
      float *ref = malloc(sizeof *ref * qlen);
      cn_cpu_paged_kv cpu_kv = {p.k_ptrs, p.v_ptrs, k.block_size};
      cn_cpu_attn_args ca = {.out = ref,
                             .q = q,
                             .kv = &cpu_kv,
                             .n = n,
                             .ctx_len = k.ctx_len,
                             .pos = pos,
                             .tree_mask = k.tree ? mask : NULL,
                             .mask_words = mw,
                             .n_heads = k.n_heads,
                             .n_kv_heads = k.n_kv_heads,
                             .head_dim = d,
                             .sliding_window = k.window,
                             .scale = 1.0f / sqrtf((float)d)};
      cn_cpu_attention(tp, &ca);

      void *d_q = dev_upload(q, qlen, dtypes[t]), *d_o = dev_poisoned(qlen, dtypes[t]);
      void *d_pos = dev_upload_bytes(pos, sizeof *pos * n);
      void *d_mask = dev_upload_bytes(mask, sizeof *mask * (size_t)n * mw);
      cn_cuda_attn_args ga = {.out = d_o,
                              .q = d_q,
                              .dt = dtypes[t],
                              .kv = pool_view(&p, layer),
                              .n = n,
                              .ctx_len = k.ctx_len,
                              .pos = d_pos,
                              .tree_mask = k.tree ? d_mask : NULL,
                              .mask_words = mw,
                              .n_heads = k.n_heads,
                              .n_kv_heads = k.n_kv_heads,
                              .head_dim = d,
                              .sliding_window = k.window,
                              .scale = ca.scale};
      CK(cn_cuda_attention(ctx, &ga));
      float *o = dev_download(d_o, qlen, dtypes[t]);
      check_all_finite(o, qlen, "attention");
      char what[96];
      snprintf(what, sizeof what, "case %zu (n=%d ctx=%d heads=%d/%d d=%d bs=%d tree=%d window=%d)", c, n, k.ctx_len,
               k.n_heads, k.n_kv_heads, d, k.block_size, k.tree, k.window);
      check_close(OP_ATTENTION, dtypes[t], o, ref, qlen, what);
      cn_cuda_free(ctx, d_q), cn_cuda_free(ctx, d_o), cn_cuda_free(ctx, d_pos), cn_cuda_free(ctx, d_mask);
      pool_free(&p);
      free(q), free(pos), free(mask), free(ref), free(o);
    }
  END_TEST();
}

/* Rows of random values, with row 1's maximum repeated at scattered places and row 2 all equal,
 * so that the order of ties is exercised. */
static float *rows_with_ties(int rows, int n, cn_cuda_dtype dt) {
  size_t len = (size_t)rows * n;
  float *x = rand_buf(len, 10.0f);
  if (rows > 1 && n > 1)
    for (int r = 0; r < 4; r++)
      x[(size_t)n + rand_int(0, n - 1)] = 11.0f;
  if (rows > 2)
    for (int j = 0; j < n; j++)
      x[2 * (size_t)n + j] = -2.5f;
  round_if_bf16(x, len, dt);
  return x;
}

/* argmax (k = 0 below) and top-k against the CPU twins: both sides compare the very same values,
 * so even exact ties must come out in the same order; top-k's log-softmax within 1e-5. */
static void test_argmax_and_top_k_are_exact_and_order_ties_by_index(void **state) {
  mismatches = 0;
  const int shapes[][2] = {{1, 1}, {3, 3}, {17, 17}, {64, 1000}, {129, 49153}}; /* rows, n */
  const int ks[] = {0, 1, 3, 8, 32};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int t = 0; t < 2; t++)
      for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
        int rows = shapes[s][0], n = shapes[s][1], k = ks[ki] < n ? ks[ki] : n, kk = k ? k : 1;
        if (ks[ki] > n && ks[ki - 1] >= n) continue; /* the same k as the last round */
        float *x = rows_with_ties(rows, n, dtypes[t]);
        void *d_x = dev_upload(x, (size_t)rows * n, dtypes[t]);
        size_t out = (size_t)rows * kk;
        int32_t *d_idx = dev_alloc(sizeof(int32_t) * out), *idx = malloc(sizeof *idx * out), want[32];
        float *d_lp = dev_alloc(sizeof(float) * out), *lp = malloc(sizeof *lp * out), want_lp[32];
        CK(cn_cuda_memset(ctx, d_idx, 0xFF, sizeof(int32_t) * out));
        if (k) CK(cn_cuda_top_k(ctx, d_idx, d_lp, d_x, dtypes[t], rows, n, k));
        else CK(cn_cuda_argmax(ctx, d_idx, d_x, dtypes[t], rows, n));
        CK(cn_cuda_sync(ctx));
        CK(cn_cuda_memcpy_d2h(ctx, idx, d_idx, sizeof(int32_t) * out));
        CK(cn_cuda_memcpy_d2h(ctx, lp, d_lp, sizeof(float) * out));
        for (int r = 0; r < rows; r++) {
          cn_cpu_top_k(x + (size_t)r * n, n, kk, want, want_lp);
          for (int j = 0; j < kk; j++) {
            int bad_lp = k && fabsf(lp[(size_t)r * kk + j] - want_lp[j]) > 1e-5f;
            if (idx[(size_t)r * kk + j] != want[j] || bad_lp) {
              printf("  %s row %d pick %d of %dx%d (%s): %d (logp %g), expected %d (%g)  MISMATCH\n",
                     k ? "top-k" : "argmax", r, j, rows, n, dt_name(dtypes[t]), idx[(size_t)r * kk + j],
                     k ? lp[(size_t)r * kk + j] : 0.0, want[j], k ? want_lp[j] : 0.0);
              mismatches++;
            }
          }
        }
        checked[OP_ARGMAX][dtypes[t]]++;
        printf("  %-6s k=%-2d %-4s in  rows=%d n=%d: rows checked\n", k ? "top-k" : "argmax", kk, dt_name(dtypes[t]),
               rows, n);
        cn_cuda_free(ctx, d_x), cn_cuda_free(ctx, d_idx), cn_cuda_free(ctx, d_lp);
        free(x), free(idx), free(lp);
      }
  END_TEST();
}

/* A row's product must not depend on the rows batched with it where the few-row kernel runs, within
 * each of its two forms (CUDA cores, tensor cores from cn_cuda_gemv_mma_rows rows): with either form
 * at every row count, decode (1 row) and a short chain's verification (up to 8) round alike, so
 * greedy speculation stays token-for-token the target's own decode. With the default split a row
 * of a call on tensor cores is compared with the same row computed first of the fewest rows that
 * take them. */
static void test_matmul_rows_do_not_depend_on_the_batch(void **state) {
  mismatches = 0;
  const int shapes[][2] = {{576, 1537}, {203, 19}, {4096, 100}}; /* in, out */
  const int settings[] = {9, 1, -1}; /* CUDA cores always (9 is past the kernel's 8 rows), tensor cores
                                        always, the default split */
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    int in = shapes[s][0], out = shapes[s][1], n = 8, extra = 8;
    float *x = rand_bf16_buf((size_t)(n + extra) * in, 1.0f), *w = rand_bf16_buf((size_t)out * in, 1.0f);
    void *d_w = dev_upload(w, (size_t)out * in, CN_CUDA_BF16);
    void *d_x = dev_upload(x, (size_t)(n + extra) * in, CN_CUDA_BF16);
    void *d_all = dev_poisoned((size_t)n * out, CN_CUDA_F32), *d_one = dev_poisoned((size_t)extra * out, CN_CUDA_F32);
    for (size_t k = 0; k < sizeof settings / sizeof settings[0]; k++) {
      CK(cn_cuda_set_gemv_mma_rows(ctx, settings[k]));
      int from = cn_cuda_gemv_mma_rows(ctx), differ = 0;
      for (int rows = 1; rows <= n; rows++) {
        CK(cn_cuda_matmul(ctx, d_all, CN_CUDA_F32, d_x, CN_CUDA_BF16, d_w, NULL, rows, in, out));
        float *all = dev_download(d_all, (size_t)rows * out, CN_CUDA_F32);
        int ref_rows = rows >= from && from > 1 ? from : 1;
        for (int r = 0; r < rows; r++) {
          CK(cn_cuda_matmul(ctx, d_one, CN_CUDA_F32, (const cn_bf16 *)d_x + (size_t)r * in, CN_CUDA_BF16, d_w, NULL,
                            ref_rows, in, out));
          float *one = dev_download(d_one, (size_t)out, CN_CUDA_F32);
          differ += memcmp(one, all + (size_t)r * out, sizeof(float) * (size_t)out) != 0;
          free(one);
        }
        free(all);
      }
      if (differ) {
        print_error("matmul %dx%d, tensor cores from %d rows: %d rows differ from the same row computed in %s\n", in,
                    out, from, differ, from > 1 ? "a call of the same form" : "a call of its own");
        mismatches++;
      }
    }
    CK(cn_cuda_set_gemv_mma_rows(ctx, -1));
    cn_cuda_free(ctx, d_w), cn_cuda_free(ctx, d_x), cn_cuda_free(ctx, d_all), cn_cuda_free(ctx, d_one);
    free(x), free(w);
  }
  END_TEST();
}

/* The fused forms against the CPU twins run one after the other. The device rounds the normed
 * (or SwiGLU) rows to bf16 before its GEMM where the CPU keeps fp32: within the bf16 tolerance. */
static void test_norm_matmul_matches_cpu(void **state) {
  mismatches = 0;
  const int shapes[][3] = {{1, 7, 5}, {3, 64, 33}, {17, 129, 65}, {64, 576, 250}, {129, 576, 1537}}; /* n, in, out */
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int use_bias = 0; use_bias < 2; use_bias++) {
      int n = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
      float *x = rand_buf((size_t)n * in, 3.0f), *g = rand_bf16_buf((size_t)in, 1.0f);
      float *w = rand_bf16_buf((size_t)out * in, 1.0f), *b = rand_bf16_buf((size_t)out, 1.0f);
      float *xn = malloc(sizeof *xn * (size_t)n * in), *ref = malloc(sizeof *ref * (size_t)n * out);
      cn_cpu_rmsnorm(xn, x, g, n, in, 1e-5f);
      cn_cpu_matmul(NULL, ref, xn, w, use_bias ? b : NULL, n, in, out);
      void *d_x = dev_upload(x, (size_t)n * in, CN_CUDA_F32), *d_g = dev_upload(g, (size_t)in, CN_CUDA_BF16);
      void *d_w = dev_upload(w, (size_t)out * in, CN_CUDA_BF16), *d_b = dev_upload(b, (size_t)out, CN_CUDA_BF16);
      void *d_y = dev_poisoned((size_t)n * out, CN_CUDA_F32);
      CK(cn_cuda_norm_matmul(ctx, d_y, CN_CUDA_F32, d_x, d_g, 1e-5f, d_w, use_bias ? d_b : NULL, n, in, out));
      float *y = dev_download(d_y, (size_t)n * out, CN_CUDA_F32);
      check_all_finite(y, (size_t)n * out, "norm_matmul");
      char what[64];
      snprintf(what, sizeof what, "%dx%dx%d%s", n, in, out, use_bias ? " +bias" : "");
      /* bf16 rounding inside, fp32 out: judged at the bf16 tolerance. */
      check_close(OP_NORM_MATMUL, CN_CUDA_BF16, y, ref, (size_t)n * out, what);
      cn_cuda_free(ctx, d_x), cn_cuda_free(ctx, d_g), cn_cuda_free(ctx, d_w), cn_cuda_free(ctx, d_b);
      cn_cuda_free(ctx, d_y);
      free(x), free(g), free(w), free(b), free(xn), free(ref), free(y);
    }
  END_TEST();
}

static void test_swiglu_matmul_add_matches_cpu(void **state) {
  mismatches = 0;
  const int shapes[][3] = {{1, 7, 5}, {3, 64, 33}, {17, 129, 65}, {64, 1536, 576}, {129, 344, 1537}}; /* n, d, out */
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int use_bias = 0; use_bias < 2; use_bias++) {
      int n = shapes[s][0], d = shapes[s][1], out = shapes[s][2];
      size_t ny = (size_t)n * out;
      float *gu = rand_buf((size_t)n * 2 * d, 3.0f), *w = rand_bf16_buf((size_t)out * d, 1.0f);
      float *b = rand_bf16_buf((size_t)out, 1.0f), *x = rand_buf(ny, 4.0f);
      float *act = malloc(sizeof *act * (size_t)n * d), *prod = malloc(sizeof *prod * ny), *ref = malloc(sizeof *ref * ny);
      cn_cpu_swiglu(act, gu, n, d);
      cn_cpu_matmul(NULL, prod, act, w, use_bias ? b : NULL, n, d, out);
      memcpy(ref, x, sizeof *ref * ny);
      cn_cpu_add(ref, prod, ny);
      void *d_gu = dev_upload(gu, (size_t)n * 2 * d, CN_CUDA_F32), *d_w = dev_upload(w, (size_t)out * d, CN_CUDA_BF16);
      void *d_b = dev_upload(b, (size_t)out, CN_CUDA_BF16), *d_x = dev_upload(x, ny, CN_CUDA_F32);
      CK(cn_cuda_swiglu_matmul_add(ctx, d_x, d_gu, d_w, use_bias ? d_b : NULL, n, d, out));
      float *y = dev_download(d_x, ny, CN_CUDA_F32);
      check_all_finite(y, ny, "swiglu_matmul_add");
      char what[64];
      snprintf(what, sizeof what, "%dx%dx%d%s", n, d, out, use_bias ? " +bias" : "");
      /* Compared on the product alone (the residual would hide an error in it). */
      for (size_t i = 0; i < ny; i++)
        y[i] -= x[i], ref[i] = prod[i];
      check_close(OP_SWIGLU_MM_ADD, CN_CUDA_BF16, y, ref, ny, what);
      cn_cuda_free(ctx, d_gu), cn_cuda_free(ctx, d_w), cn_cuda_free(ctx, d_b), cn_cuda_free(ctx, d_x);
      free(gu), free(w), free(b), free(x), free(act), free(prod), free(ref), free(y);
    }
  END_TEST();
}

/* x += a W^T + bias, fp32 and bf16 a, few rows (the fused kernel) and many (cuBLAS). */
static void test_matmul_add_matches_cpu(void **state) {
  mismatches = 0;
  const int shapes[][3] = {{1, 7, 5}, {3, 64, 33}, {8, 576, 250}, {6, 4096, 77}, {9, 203, 19}, {64, 1536, 576}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int xt = 0; xt < 2; xt++)
      for (int use_bias = 0; use_bias < 2; use_bias++) {
        int n = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
        size_t ny = (size_t)n * out;
        /* The device rounds an fp32 a to bf16 first, so the reference takes bf16 values. */
        float *a = rand_bf16_buf((size_t)n * in, 2.0f), *w = rand_bf16_buf((size_t)out * in, 1.0f);
        float *b = rand_bf16_buf((size_t)out, 1.0f), *x = rand_buf(ny, 4.0f), *ref = malloc(sizeof *ref * ny);
        cn_cpu_matmul(NULL, ref, a, w, use_bias ? b : NULL, n, in, out);
        void *d_a = dev_upload(a, (size_t)n * in, dtypes[xt]), *d_w = dev_upload(w, (size_t)out * in, CN_CUDA_BF16);
        void *d_b = dev_upload(b, (size_t)out, CN_CUDA_BF16), *d_x = dev_upload(x, ny, CN_CUDA_F32);
        CK(cn_cuda_matmul_add(ctx, d_x, d_a, dtypes[xt], d_w, use_bias ? d_b : NULL, n, in, out));
        float *y = dev_download(d_x, ny, CN_CUDA_F32);
        check_all_finite(y, ny, "matmul_add");
        for (size_t i = 0; i < ny; i++) y[i] -= x[i]; /* the product alone: the residual would hide it */
        char what[64];
        snprintf(what, sizeof what, "%dx%dx%d a %s%s", n, in, out, dt_name(dtypes[xt]), use_bias ? " +bias" : "");
        check_close(OP_MATMUL_ADD, CN_CUDA_BF16, y, ref, ny, what);
        cn_cuda_free(ctx, d_a), cn_cuda_free(ctx, d_w), cn_cuda_free(ctx, d_b), cn_cuda_free(ctx, d_x);
        free(a), free(w), free(b), free(x), free(ref), free(y);
      }
  END_TEST();
}

/* One tuned product (cn_cuda_matmul, or cn_cuda_matmul_add onto y0), downloaded as fp32. */
static float *tuned_product(const void *d_x, const void *d_w, const float *y0, int n, int in, int out,
                            cn_cuda_dtype yt) {
  size_t ny = (size_t)n * out;
  void *d_y = y0 ? dev_upload(y0, ny, CN_CUDA_F32) : dev_poisoned(ny, yt);
  if (y0) CK(cn_cuda_matmul_add(ctx, d_y, d_x, CN_CUDA_BF16, d_w, NULL, n, in, out));
  else CK(cn_cuda_matmul(ctx, d_y, yt, d_x, CN_CUDA_BF16, d_w, NULL, n, in, out));
  float *y = dev_download(d_y, ny, yt);
  cn_cuda_free(ctx, d_y);
  return y;
}

/* Products tuned by measurement (cn_cuda_set_gemm_tune): the first call of a shape times the
 * candidate kernels and keeps one; its result must match the CPU, and the next call (the kept
 * kernel, no timing) must repeat it bit for bit. A shape first met while a graph is being
 * captured runs untuned (timing would synchronise the stream) and is tuned at its next eager
 * call. */
static void test_tuned_products_match_cpu_and_repeat(void **state) {
  mismatches = 0;
  CK(cn_cuda_set_gemm_tune(ctx, 1));
  /* Few shapes: each is timed ~50 times over, which the sanitizers run slowly. */
  const int shapes[][3] = {{9, 128, 40}, {17, 129, 65}, {64, 1536, 576}, {300, 576, 1537}}; /* n, in, out */
  int cases = 0;
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int form = 0; form < 3; form++) { /* fp32 y, bf16 y, fp32 y += */
      int n = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
      size_t ny = (size_t)n * out;
      cn_cuda_dtype yt = form == 1 ? CN_CUDA_BF16 : CN_CUDA_F32;
      float *x = rand_bf16_buf((size_t)n * in, 1.0f), *w = rand_bf16_buf((size_t)out * in, 1.0f);
      float *y0 = form == 2 ? rand_buf(ny, 4.0f) : NULL, *ref = malloc(sizeof *ref * ny);
      cn_cpu_matmul(NULL, ref, x, w, NULL, n, in, out);
      void *d_x = dev_upload(x, (size_t)n * in, CN_CUDA_BF16), *d_w = dev_upload(w, (size_t)out * in, CN_CUDA_BF16);
      float *first = tuned_product(d_x, d_w, y0, n, in, out, yt);
      float *again = tuned_product(d_x, d_w, y0, n, in, out, yt);
      check_all_finite(first, ny, "tuned product");
      char what[64];
      snprintf(what, sizeof what, "tuned %dx%dx%d %s", n, in, out, form == 2 ? "y +=" : dt_name(yt));
      if (memcmp(first, again, sizeof *first * ny)) {
        print_error("%s: the kept kernel's second call differs from the first\n", what);
        mismatches++;
      }
      if (y0)
        for (size_t i = 0; i < ny; i++) first[i] -= y0[i]; /* the product alone */
      check_close(form == 2 ? OP_MATMUL_ADD : OP_MATMUL, form == 2 ? CN_CUDA_BF16 : yt, first, ref, ny, what);
      cases++;
      cn_cuda_free(ctx, d_x), cn_cuda_free(ctx, d_w);
      free(x), free(w), free(y0), free(ref), free(first), free(again);
    }

  cn_cuda_gemm_plan_info info[64];
  int plans = cn_cuda_gemm_plans(ctx, info, 64);
  printf("tuned shapes: %d\n", plans);
  for (int i = 0; i < plans && i < 64; i++) {
    printf("  %4dx%5dx%5d %s%s align %3d: %d kernels timed, %s (%.1f us, cublasGemmEx %.1f us)\n", info[i].n,
           info[i].in, info[i].out, info[i].y_bf16 ? "bf16" : "fp32", info[i].accumulate ? " +=" : "", info[i].align,
           info[i].candidates, info[i].lt ? "cuBLASLt kept" : "cublasGemmEx kept", info[i].us_kept,
           info[i].us_default);
    if (info[i].candidates < 1 || (info[i].lt && !(info[i].us_kept < info[i].us_default))) {
      print_error("plan %d: %d candidates, kept %.1f us against %.1f\n", i, info[i].candidates, info[i].us_kept,
                  info[i].us_default);
      mismatches++;
    }
  }
  /* Every case is its own shape (form and output type are part of the key). */
  if (plans < cases) {
    print_error("%d shapes tuned, %d expected\n", plans, cases);
    mismatches++;
  }

  /* A new shape inside a capture: untuned there, tuned at the next eager call. */
  const int n = 33, in = 200, out = 72;
  float *x = rand_bf16_buf((size_t)n * in, 1.0f), *w = rand_bf16_buf((size_t)out * in, 1.0f);
  float *ref = malloc(sizeof *ref * (size_t)n * out);
  cn_cpu_matmul(NULL, ref, x, w, NULL, n, in, out);
  void *d_x = dev_upload(x, (size_t)n * in, CN_CUDA_BF16), *d_w = dev_upload(w, (size_t)out * in, CN_CUDA_BF16);
  void *d_y = dev_poisoned((size_t)n * out, CN_CUDA_F32);
  cn_cuda_graph *g = NULL;
  CK(cn_cuda_capture_begin(ctx));
  CK(cn_cuda_matmul(ctx, d_y, CN_CUDA_F32, d_x, CN_CUDA_BF16, d_w, NULL, n, in, out));
  CK(cn_cuda_capture_end(ctx, &g));
  assert_int_equal(cn_cuda_gemm_plans(ctx, NULL, 0), plans);
  CK(cn_cuda_graph_launch(ctx, g));
  float *y = dev_download(d_y, (size_t)n * out, CN_CUDA_F32);
  check_close(OP_MATMUL, CN_CUDA_F32, y, ref, (size_t)n * out, "tuned 33x200x72 in a graph");
  CK(cn_cuda_matmul(ctx, d_y, CN_CUDA_F32, d_x, CN_CUDA_BF16, d_w, NULL, n, in, out));
  CK(cn_cuda_sync(ctx));
  assert_int_equal(cn_cuda_gemm_plans(ctx, NULL, 0), plans + 1);
  cn_cuda_graph_free(g);
  cn_cuda_free(ctx, d_x), cn_cuda_free(ctx, d_w), cn_cuda_free(ctx, d_y);
  free(x), free(w), free(ref), free(y);
  CK(cn_cuda_set_gemm_tune(ctx, 0));
  END_TEST();
}

/* The whole feed-forward block against the CPU ops one after the other, on the fused path (up to
 * 8 rows whose normed input fits the kernel's shared memory), and past it (4096 x 8 rows, 9+ rows). */
static void test_ffn_matches_cpu(void **state) {
  mismatches = 0;
  const int shapes[][3] = {{1, 7, 5}, {2, 64, 33}, {5, 576, 1536}, {8, 576, 344}, {8, 4096, 64}, {9, 129, 65},
                           {33, 200, 96}}; /* n, dim, d */
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int use_bias = 0; use_bias < 2; use_bias++) {
      int n = shapes[s][0], dim = shapes[s][1], d = shapes[s][2];
      size_t nx = (size_t)n * dim;
      float *x = rand_buf(nx, 3.0f), *g = rand_bf16_buf((size_t)dim, 1.0f);
      float *wgu = rand_bf16_buf((size_t)2 * d * dim, 0.5f), *bgu = rand_bf16_buf((size_t)2 * d, 1.0f);
      float *wd = rand_bf16_buf((size_t)dim * d, 0.5f), *bd = rand_bf16_buf((size_t)dim, 1.0f);
      float *xn = malloc(sizeof *xn * nx), *gu = malloc(sizeof *gu * (size_t)n * 2 * d);
      float *act = malloc(sizeof *act * (size_t)n * d), *ref = malloc(sizeof *ref * nx);
      cn_cpu_rmsnorm(xn, x, g, n, dim, 1e-5f);
      cn_cpu_matmul(NULL, gu, xn, wgu, use_bias ? bgu : NULL, n, dim, 2 * d);
      cn_cpu_swiglu(act, gu, n, d);
      cn_cpu_matmul(NULL, ref, act, wd, use_bias ? bd : NULL, n, d, dim);
      void *d_x = dev_upload(x, nx, CN_CUDA_F32), *d_g = dev_upload(g, (size_t)dim, CN_CUDA_BF16);
      void *d_wgu = dev_upload(wgu, (size_t)2 * d * dim, CN_CUDA_BF16);
      void *d_bgu = dev_upload(bgu, (size_t)2 * d, CN_CUDA_BF16);
      void *d_wd = dev_upload(wd, (size_t)dim * d, CN_CUDA_BF16), *d_bd = dev_upload(bd, (size_t)dim, CN_CUDA_BF16);
      void *d_gu = dev_poisoned((size_t)n * 2 * d, CN_CUDA_F32);
      CK(cn_cuda_ffn(ctx, d_x, d_gu, d_g, 1e-5f, d_wgu, use_bias ? d_bgu : NULL, d_wd, use_bias ? d_bd : NULL, n, dim,
                     d));
      float *y = dev_download(d_x, nx, CN_CUDA_F32);
      check_all_finite(y, nx, "ffn");
      for (size_t i = 0; i < nx; i++) y[i] -= x[i];
      char what[64];
      snprintf(what, sizeof what, "n=%d dim=%d d=%d%s", n, dim, d, use_bias ? " +bias" : "");
      check_close(OP_FFN, CN_CUDA_BF16, y, ref, nx, what);
      cn_cuda_free(ctx, d_x), cn_cuda_free(ctx, d_g), cn_cuda_free(ctx, d_wgu), cn_cuda_free(ctx, d_bgu);
      cn_cuda_free(ctx, d_wd), cn_cuda_free(ctx, d_bd), cn_cuda_free(ctx, d_gu);
      free(x), free(g), free(wgu), free(bgu), free(wd), free(bd), free(xn), free(gu), free(act), free(ref), free(y);
    }
  END_TEST();
}

/* The few-row kernel's fusions (RMSNorm or fp32 rounding into shared memory, SwiGLU in the
 * epilogue, also after a separate RMSNorm: F_FFN_EPILOGUE) against the separate kernels they
 * replace: the same bits, for every row count the kernel takes, scalar (in % 8 != 0) and vector
 * paths, and the largest staged input that fits. */
#define CN_GEMV_MAX_ROWS_FOR_TEST 8 /* every row count the few-row kernel takes */
enum { F_NORM_MM_F32, F_NORM_MM_BF16, F_MATMUL_F32X, F_MATMUL_ADD, F_FFN, F_FFN_EPILOGUE, N_FUSED };

static float *run_fused(int op, int fusion, const float *x, const void *d_g, const void *d_w, const void *d_b,
                        const void *d_w2, int n, int in, int out, size_t *len) {
  int rows = cn_cuda_gemv_fusion(ctx), swiglu_rows = cn_cuda_gemv_swiglu_rows(ctx);
  const int ffn = op == F_FFN || op == F_FFN_EPILOGUE;
  CK(cn_cuda_set_gemv_fusion(ctx, fusion && op != F_FFN_EPILOGUE ? CN_GEMV_MAX_ROWS_FOR_TEST : 0));
  CK(cn_cuda_set_gemv_swiglu_rows(ctx, fusion && op == F_FFN_EPILOGUE ? CN_GEMV_MAX_ROWS_FOR_TEST : 0));
  void *d_x = dev_upload(x, (size_t)n * in, CN_CUDA_F32);
  cn_cuda_dtype yt = op == F_NORM_MM_BF16 ? CN_CUDA_BF16 : CN_CUDA_F32;
  *len = ffn ? (size_t)n * in : (size_t)n * out;
  void *d_y = op == F_MATMUL_ADD ? dev_upload(x, *len, CN_CUDA_F32) : dev_poisoned(*len, yt);
  void *d_gu = dev_poisoned((size_t)n * 2 * out, CN_CUDA_F32);
  switch (op) {
  case F_NORM_MM_F32:
  case F_NORM_MM_BF16: CK(cn_cuda_norm_matmul(ctx, d_y, yt, d_x, d_g, 1e-5f, d_w, d_b, n, in, out)); break;
  case F_MATMUL_F32X: CK(cn_cuda_matmul(ctx, d_y, yt, d_x, CN_CUDA_F32, d_w, d_b, n, in, out)); break;
  case F_MATMUL_ADD: CK(cn_cuda_matmul_add(ctx, d_y, d_x, CN_CUDA_F32, d_w, d_b, n, in, out)); break;
  case F_FFN:
  case F_FFN_EPILOGUE: CK(cn_cuda_ffn(ctx, d_x, d_gu, d_g, 1e-5f, d_w, d_b, d_w2, NULL, n, in, out)); break;
  }
  float *y = dev_download(ffn ? d_x : d_y, *len, yt);
  CK(cn_cuda_set_gemv_fusion(ctx, rows));
  CK(cn_cuda_set_gemv_swiglu_rows(ctx, swiglu_rows));
  cn_cuda_free(ctx, d_x), cn_cuda_free(ctx, d_y), cn_cuda_free(ctx, d_gu);
  return y;
}

static void test_gemv_fusions_are_bit_exact(void **state) {
  mismatches = 0;
  static const char *names[N_FUSED] = {"norm_matmul f32", "norm_matmul bf16", "matmul f32 x",
                                       "matmul_add",      "ffn",              "ffn, SwiGLU epilogue only"};
  const int shapes[][2] = {{7, 5}, {203, 37}, {576, 250}, {576, 264}, {3000, 19}}; /* in, out (ffn: dim, d) */
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    int in = shapes[s][0], out = shapes[s][1];
    float *g = rand_bf16_buf((size_t)in, 1.0f), *w = rand_bf16_buf((size_t)2 * out * in, 0.5f);
    float *b = rand_bf16_buf((size_t)2 * out, 1.0f), *w2 = rand_bf16_buf((size_t)in * out, 0.5f);
    void *d_g = dev_upload(g, (size_t)in, CN_CUDA_BF16), *d_w = dev_upload(w, (size_t)2 * out * in, CN_CUDA_BF16);
    void *d_b = dev_upload(b, (size_t)2 * out, CN_CUDA_BF16), *d_w2 = dev_upload(w2, (size_t)in * out, CN_CUDA_BF16);
    for (int n = 1; n <= 8; n++) {
      float *x = rand_buf((size_t)n * in, 3.0f);
      for (int op = 0; op < N_FUSED; op++)
        for (int use_bias = 0; use_bias < 2; use_bias++) {
          size_t len, len2;
          const void *bias = use_bias ? d_b : NULL;
          float *on = run_fused(op, 1, x, d_g, d_w, bias, d_w2, n, in, out, &len);
          float *off = run_fused(op, 0, x, d_g, d_w, bias, d_w2, n, in, out, &len2);
          check_all_finite(on, len, names[op]);
          size_t differ = 0;
          for (size_t i = 0; i < len; i++) differ += memcmp(&on[i], &off[i], sizeof(float)) != 0;
          if (differ) {
            printf("  %s n=%d in=%d out=%d%s: %zu of %zu values differ from the unfused kernels  MISMATCH\n",
                   names[op], n, in, out, use_bias ? " +bias" : "", differ, len);
            mismatches++;
          }
          free(on), free(off);
        }
      free(x);
    }
    printf("  gemv fusions in=%d out=%d: n = 1..8 compared\n", in, out);
    cn_cuda_free(ctx, d_g), cn_cuda_free(ctx, d_w), cn_cuda_free(ctx, d_b), cn_cuda_free(ctx, d_w2);
    free(g), free(w), free(b), free(w2);
  }
  END_TEST();
}

static void test_qkv_rope_matches_cpu(void **state) {
  mismatches = 0;
  const int shapes[][4] = {{1, 1, 1, 2}, {3, 4, 1, 64}, {17, 9, 3, 64}, {64, 32, 8, 128}, {129, 6, 2, 34}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    int n = shapes[s][0], hq = shapes[s][1], hkv = shapes[s][2], d = shapes[s][3];
    size_t qd = (size_t)hq * d, kd = (size_t)hkv * d, row = qd + 2 * kd;
    float *qkv = rand_buf((size_t)n * row, 2.0f), *inv = malloc(sizeof *inv * (size_t)(d / 2));
    float *ref = malloc(sizeof *ref * (size_t)n * row);
    for (int k = 0; k < d / 2; k++)
      inv[k] = powf(500000.0f, -2.0f * k / d);
    int32_t *pos = malloc(sizeof *pos * n);
    for (int i = 0; i < n; i++)
      pos[i] = rand_int(0, 32767);
    /* The twin: split into [q | k | v] blocks, rotate q and k. */
    float *rq = ref, *rk = ref + (size_t)n * qd, *rv = rk + (size_t)n * kd;
    for (int i = 0; i < n; i++) {
      memcpy(rq + i * qd, qkv + i * row, sizeof(float) * qd);
      memcpy(rk + i * kd, qkv + i * row + qd, sizeof(float) * kd);
      memcpy(rv + i * kd, qkv + i * row + qd + kd, sizeof(float) * kd);
    }
    cn_cpu_rope(rq, pos, n, hq, d, inv);
    cn_cpu_rope(rk, pos, n, hkv, d, inv);
    void *d_qkv = dev_upload(qkv, (size_t)n * row, CN_CUDA_F32), *d_pos = dev_upload_bytes(pos, sizeof *pos * n);
    void *d_inv = dev_upload(inv, (size_t)(d / 2), CN_CUDA_F32), *d_o = dev_poisoned((size_t)n * row, CN_CUDA_F32);
    float *o = d_o;
    CK(cn_cuda_qkv_rope(ctx, o, o + (size_t)n * qd, o + (size_t)n * (qd + kd), d_qkv, d_pos, n, hq, hkv, d, d_inv));
    float *got = dev_download(d_o, (size_t)n * row, CN_CUDA_F32);
    check_all_finite(got, (size_t)n * row, "qkv_rope");
    char what[64];
    snprintf(what, sizeof what, "n=%d heads=%d/%d head_dim=%d", n, hq, hkv, d);
    check_close(OP_QKV_ROPE, CN_CUDA_F32, got, ref, (size_t)n * row, what);
    cn_cuda_free(ctx, d_qkv), cn_cuda_free(ctx, d_pos), cn_cuda_free(ctx, d_inv), cn_cuda_free(ctx, d_o);
    free(qkv), free(inv), free(ref), free(pos), free(got);
  }
  END_TEST();
}

/* qkv_rope with k and v written into the cache against qkv_rope and kv_write_slots one after the
 * other: q and the whole pool (written slots and untouched ones) the same bits; q written in bf16,
 * the fp32 q rounded to nearest even. */
static void test_qkv_rope_kv_matches_the_two_ops(void **state) {
  mismatches = 0;
  const int shapes[][5] = {{1, 4, 1, 64, 16}, {3, 9, 3, 64, 16}, {5, 32, 8, 128, 16}, {17, 6, 2, 34, 5}}; /* +bs */
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    int n = shapes[s][0], hq = shapes[s][1], hkv = shapes[s][2], d = shapes[s][3], bs = shapes[s][4], layer = 1;
    size_t qd = (size_t)hq * d, kd = (size_t)hkv * d, row = qd + 2 * kd;
    float *qkv = rand_buf((size_t)n * row, 2.0f), *inv = malloc(sizeof *inv * (size_t)(d / 2));
    for (int k = 0; k < d / 2; k++)
      inv[k] = powf(10000.0f, -2.0f * k / d);
    int32_t *pos = malloc(sizeof *pos * n), *phys = malloc(sizeof *phys * n);
    int first = rand_int(0, 40);
    test_pool p[2];
    pool_init(&p[0], first + n, bs, (int)kd, layer, 0);
    p[1] = p[0]; /* the same block table, a second pool */
    p[1].d_pool = dev_poisoned(p[0].elems, CN_CUDA_BF16);
    for (int i = 0; i < n; i++) {
      pos[i] = first + i;
      phys[i] = p[0].table[(first + i) / bs] * bs + (first + i) % bs;
    }
    void *d_qkv = dev_upload(qkv, (size_t)n * row, CN_CUDA_F32), *d_pos = dev_upload_bytes(pos, sizeof *pos * n);
    void *d_phys = dev_upload_bytes(phys, sizeof *phys * n), *d_inv = dev_upload(inv, (size_t)(d / 2), CN_CUDA_F32);
    float *d_o = dev_poisoned((size_t)n * row, CN_CUDA_F32), *d_q = dev_poisoned((size_t)n * qd, CN_CUDA_F32);
    cn_cuda_paged_kv v0 = pool_view(&p[0], layer), v1 = pool_view(&p[1], layer);
    CK(cn_cuda_qkv_rope(ctx, d_o, d_o + (size_t)n * qd, d_o + (size_t)n * (qd + kd), d_qkv, d_pos, n, hq, hkv, d, d_inv));
    CK(cn_cuda_kv_write_slots(ctx, &v0, d_phys, d_o + (size_t)n * qd, d_o + (size_t)n * (qd + kd), CN_CUDA_F32, n,
                              (int)kd));
    CK(cn_cuda_qkv_rope_kv(ctx, d_q, CN_CUDA_F32, d_qkv, d_pos, n, hq, hkv, d, d_inv, &v1, d_phys));
    void *d_qb = dev_poisoned((size_t)n * qd, CN_CUDA_BF16);
    CK(cn_cuda_qkv_rope_kv(ctx, d_qb, CN_CUDA_BF16, d_qkv, d_pos, n, hq, hkv, d, d_inv, &v1, d_phys));
    float *q0 = dev_download(d_o, (size_t)n * qd, CN_CUDA_F32), *q1 = dev_download(d_q, (size_t)n * qd, CN_CUDA_F32);
    float *qb = dev_download(d_qb, (size_t)n * qd, CN_CUDA_BF16);
    float *pool0 = dev_download(p[0].d_pool, p[0].elems, CN_CUDA_BF16);
    float *pool1 = dev_download(p[1].d_pool, p[1].elems, CN_CUDA_BF16);
    size_t differ = 0, written = 0;
    for (size_t e = 0; e < (size_t)n * qd; e++) {
      float r = bf16_round(q0[e]);
      differ += memcmp(&q0[e], &q1[e], sizeof(float)) != 0;
      differ += memcmp(&r, &qb[e], sizeof(float)) != 0;
    }
    for (size_t e = 0; e < p[0].elems; e++) {
      differ += memcmp(&pool0[e], &pool1[e], sizeof(float)) != 0;
      written += !isnan(pool1[e]);
    }
    printf("  qkv_rope_kv n=%d heads=%d/%d head_dim=%d block %d: %zu cache values written, %zu differ\n", n, hq, hkv,
           d, bs, written, differ);
    if (differ || written != 2 * (size_t)n * kd) {
      printf("  qkv_rope_kv: expected %zu written and 0 differing  MISMATCH\n", 2 * (size_t)n * kd);
      mismatches++;
    }
    cn_cuda_free(ctx, p[1].d_pool);
    p[1].d_pool = NULL;
    pool_free(&p[0]);
    cn_cuda_free(ctx, d_qkv), cn_cuda_free(ctx, d_pos), cn_cuda_free(ctx, d_phys), cn_cuda_free(ctx, d_inv);
    cn_cuda_free(ctx, d_o), cn_cuda_free(ctx, d_q), cn_cuda_free(ctx, d_qb);
    free(qkv), free(inv), free(pos), free(phys), free(q0), free(q1), free(qb), free(pool0), free(pool1);
  }
  END_TEST();
}

/* RMSNorm, the q/k/v projection and RoPE into q and the cache in one few-row kernel against
 * cn_cuda_norm_matmul then cn_cuda_qkv_rope_kv (the fusions off): the same bits in q and in the
 * whole pool (the untouched slots included), for every row count the kernel takes (1 and 2,
 * CN_GEMV_ROPE_ROWS), scalar and vector paths, with and without a bias, q in fp32 and in bf16. */
#define CN_GEMV_ROPE_ROWS_FOR_TEST 2
static void run_norm_qkv(int fusion, cn_cuda_dtype q_dt, const float *x, const void *d_g, const void *d_w,
                         const void *d_b, int n, int in, int hq, int hkv, int d, const void *d_pos, const void *d_slots,
                         const void *d_inv, test_pool *pool, int layer, float **q_out, float **pool_out) {
  int rows = cn_cuda_gemv_fusion(ctx);
  CK(cn_cuda_set_gemv_fusion(ctx, fusion ? CN_GEMV_MAX_ROWS_FOR_TEST : 0));
  size_t qd = (size_t)hq * d, row = qd + 2 * (size_t)hkv * d;
  void *d_x = dev_upload(x, (size_t)n * in, CN_CUDA_F32);
  void *d_q = dev_poisoned((size_t)n * qd, q_dt);
  float *d_qkv = dev_poisoned((size_t)n * row, CN_CUDA_F32);
  cn_cuda_free(ctx, pool->d_pool);
  pool->d_pool = dev_poisoned(pool->elems, CN_CUDA_BF16);
  cn_cuda_paged_kv kv = pool_view(pool, layer);
  CK(cn_cuda_norm_qkv_rope_kv(ctx, d_q, q_dt, d_qkv, d_x, d_g, 1e-5f, d_w, d_b, n, in, d_pos, hq, hkv, d, d_inv, &kv,
                              d_slots));
  *q_out = dev_download(d_q, (size_t)n * qd, q_dt);
  *pool_out = dev_download(pool->d_pool, pool->elems, CN_CUDA_BF16);
  CK(cn_cuda_set_gemv_fusion(ctx, rows));
  cn_cuda_free(ctx, d_x), cn_cuda_free(ctx, d_q), cn_cuda_free(ctx, d_qkv);
}

static void test_norm_qkv_rope_kv_is_bit_exact(void **state) {
  mismatches = 0;
  const int shapes[][5] = {{64, 4, 1, 64, 16}, {576, 9, 3, 64, 16}, {203, 6, 2, 34, 5}, {1024, 16, 4, 128, 16}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    int in = shapes[s][0], hq = shapes[s][1], hkv = shapes[s][2], d = shapes[s][3], bs = shapes[s][4], layer = 1;
    int out = (hq + 2 * hkv) * d, kd = hkv * d;
    float *g = rand_bf16_buf((size_t)in, 1.0f), *w = rand_bf16_buf((size_t)out * in, 0.5f);
    float *b = rand_bf16_buf((size_t)out, 1.0f), *inv = malloc(sizeof *inv * (size_t)(d / 2));
    for (int k = 0; k < d / 2; k++)
      inv[k] = powf(10000.0f, -2.0f * k / d);
    void *d_g = dev_upload(g, (size_t)in, CN_CUDA_BF16), *d_w = dev_upload(w, (size_t)out * in, CN_CUDA_BF16);
    void *d_b = dev_upload(b, (size_t)out, CN_CUDA_BF16), *d_inv = dev_upload(inv, (size_t)(d / 2), CN_CUDA_F32);
    for (int n = 1; n <= CN_GEMV_ROPE_ROWS_FOR_TEST; n++) {
      int first = rand_int(0, 40);
      test_pool p;
      pool_init(&p, first + n, bs, kd, layer, 0);
      int32_t pos[CN_GEMV_ROPE_ROWS_FOR_TEST], phys[CN_GEMV_ROPE_ROWS_FOR_TEST];
      for (int i = 0; i < n; i++) {
        pos[i] = 1000 * (int)s + first + i; /* late positions: large angles */
        phys[i] = p.table[(first + i) / bs] * bs + (first + i) % bs;
      }
      void *d_pos = dev_upload_bytes(pos, sizeof *pos * n), *d_phys = dev_upload_bytes(phys, sizeof *phys * n);
      float *x = rand_buf((size_t)n * in, 3.0f);
      for (int form = 0; form < 4; form++) {
        const int use_bias = form & 1;
        const cn_cuda_dtype q_dt = form & 2 ? CN_CUDA_BF16 : CN_CUDA_F32;
        float *q_on, *q_off, *pool_on, *pool_off;
        const void *bias = use_bias ? d_b : NULL;
        run_norm_qkv(1, q_dt, x, d_g, d_w, bias, n, in, hq, hkv, d, d_pos, d_phys, d_inv, &p, layer, &q_on, &pool_on);
        run_norm_qkv(0, q_dt, x, d_g, d_w, bias, n, in, hq, hkv, d, d_pos, d_phys, d_inv, &p, layer, &q_off,
                     &pool_off);
        check_all_finite(q_on, (size_t)n * hq * d, "norm_qkv_rope_kv q");
        size_t differ = 0, written = 0;
        for (size_t e = 0; e < (size_t)n * hq * d; e++)
          differ += memcmp(&q_on[e], &q_off[e], sizeof(float)) != 0;
        for (size_t e = 0; e < p.elems; e++) {
          differ += memcmp(&pool_on[e], &pool_off[e], sizeof(float)) != 0;
          written += !isnan(pool_on[e]);
        }
        if (differ || written != 2 * (size_t)n * kd) {
          printf("  norm_qkv_rope_kv n=%d in=%d heads=%d/%d head_dim=%d%s, q %s: %zu values differ, %zu cache "
                 "values written (expected %zu)  MISMATCH\n",
                 n, in, hq, hkv, d, use_bias ? " +bias" : "", dt_name(q_dt), differ, written, 2 * (size_t)n * kd);
          mismatches++;
        }
        free(q_on), free(q_off), free(pool_on), free(pool_off);
      }
      pool_free(&p);
      cn_cuda_free(ctx, d_pos), cn_cuda_free(ctx, d_phys);
      free(x);
    }
    printf("  norm_qkv_rope_kv in=%d heads=%d/%d head_dim=%d: n = 1..%d compared\n", in, hq, hkv, d,
           CN_GEMV_ROPE_ROWS_FOR_TEST);
    cn_cuda_free(ctx, d_g), cn_cuda_free(ctx, d_w), cn_cuda_free(ctx, d_b), cn_cuda_free(ctx, d_inv);
    free(g), free(w), free(b), free(inv);
  }
  END_TEST();
}

/* Acceptance results of a batch of n_seqs trees (cn_cpu_accept_greedy's layout) equal: each
 * sequence's count, bonus, and only the nodes and tokens its count says are written. Returns the
 * nodes accepted in all. */
static int same_acceptance(const int32_t *got, const int32_t *want, const int32_t *par, int n, int n_seqs) {
  int accepted = 0;
  for (int q = 0, f = 0; q < n_seqs; q++) {
    int m = cn_cpu_tree_end(par, n, f) - f;
    const int32_t *g = got + 2 * q + 2 * f, *w = want + 2 * q + 2 * f;
    assert_int_equal(g[0], w[0]);
    assert_int_equal(g[1], w[1]);
    for (int i = 0; i < w[0]; i++) {
      assert_int_equal(g[2 + i], w[2 + i]);
      assert_int_equal(g[2 + m + i], w[2 + m + i]);
    }
    accepted += w[0];
    f += m;
  }
  return accepted;
}

/* A chained speculative step's device pieces against their CPU twins: the gather of tokens from
 * earlier picks, and greedy acceptance on random trees (n 1..300, a vocabulary of 3 so that
 * children match often and siblings repeat tokens); and an event recorded on one context's
 * stream orders another's. */
static void test_gather_ids_and_tree_acceptance_match_cpu(void **state) {
  enum { MAXN = 300 };
  int32_t *d_tok = dev_alloc(sizeof(int32_t) * MAXN), *d_src = dev_alloc(sizeof(int32_t) * MAXN),
          *d_ids = dev_alloc(sizeof(int32_t) * 4 * MAXN), *d_top = dev_alloc(sizeof(int32_t) * MAXN),
          *d_par = dev_alloc(sizeof(int32_t) * MAXN), *d_out = dev_alloc(sizeof(int32_t) * 4 * MAXN);
  int32_t tok[MAXN], src[MAXN], ids[4 * MAXN], top[MAXN], par[MAXN], want[4 * MAXN], got[4 * MAXN];
  int accepted = 0, trees = 0;
  static int32_t got_tok_all[MAXN];
  for (int rep = 0; rep < 200; rep++) {
    /* A batch of trees, one after the other: each node a root with probability 1/50. */
    int n = rep < 3 ? rep + 1 : rand_int(1, MAXN), n_seqs = 0;
    for (int i = 0, f = 0; i < n; i++) {
      if (i == 0 || rand_int(0, 49) == 0) f = i, n_seqs++;
      par[i] = i == f ? -1 : rand_int(i - f > 4 ? i - f - 4 : 0, i - f - 1);
      tok[i] = rand_int(0, 2);
      src[i] = rand_int(-1, 4 * MAXN - 1);
      top[i] = rand_int(0, 2);
    }
    for (int i = 0; i < 4 * MAXN; i++)
      ids[i] = rand_int(0, 2);
    CK(cn_cuda_memcpy_h2d(ctx, d_tok, tok, sizeof *tok * (size_t)n));
    CK(cn_cuda_memcpy_h2d(ctx, d_src, src, sizeof *src * (size_t)n));
    CK(cn_cuda_memcpy_h2d(ctx, d_ids, ids, sizeof ids));
    CK(cn_cuda_memcpy_h2d(ctx, d_top, top, sizeof *top * (size_t)n));
    CK(cn_cuda_memcpy_h2d(ctx, d_par, par, sizeof *par * (size_t)n));
    CK(cn_cuda_memset(ctx, d_out, 0xFF, sizeof(int32_t) * (size_t)(2 * n_seqs + 2 * n)));
    CK(cn_cuda_gather_ids(ctx, d_tok, d_src, d_ids, n));
    CK(cn_cuda_accept_greedy(ctx, d_out, d_tok, d_top, d_par, n, n_seqs));
    cn_cpu_gather_ids(tok, src, ids, n);
    assert_int_equal(cn_cpu_accept_greedy(want, tok, top, par, n), n_seqs);
    int32_t got_tok[MAXN];
    CK(cn_cuda_memcpy_d2h(ctx, got_tok, d_tok, sizeof *tok * (size_t)n));
    CK(cn_cuda_memcpy_d2h(ctx, got, d_out, sizeof(int32_t) * (size_t)(2 * n_seqs + 2 * n)));
    assert_memory_equal(got_tok, tok, sizeof *tok * (size_t)n);
    accepted += same_acceptance(got, want, par, n, n_seqs);
    trees += n_seqs;
  }
  printf("[ accept   ] %d random trees in 200 batches, %d nodes accepted in all: device equals host\n", trees,
         accepted);
  assert_true(accepted > 0);

  /* Another context's stream waits for the event: its copy sees the first stream's memset. */
  cn_cuda_ctx *other;
  CK(cn_cuda_ctx_create(0, &other));
  cn_cuda_event *ev;
  CK(cn_cuda_event_create(ctx, &ev));
  CK(cn_cuda_memset(ctx, d_ids, 0x11, sizeof ids));
  CK(cn_cuda_event_record(ctx, ev));
  CK(cn_cuda_event_wait(other, ev));
  CK(cn_cuda_memcpy_d2d(other, d_tok, d_ids, sizeof(int32_t) * MAXN));
  CK(cn_cuda_sync(other));
  CK(cn_cuda_event_sync(ev));
  CK(cn_cuda_memcpy_d2h(ctx, got_tok_all, d_tok, sizeof(int32_t) * MAXN));
  for (int i = 0; i < MAXN; i++)
    assert_int_equal(got_tok_all[i], 0x11111111);
  cn_cuda_event_free(ev);
  cn_cuda_ctx_free(other);
  int32_t *bufs[] = {d_tok, d_src, d_ids, d_top, d_par, d_out};
  for (int i = 0; i < 6; i++)
    cn_cuda_free(ctx, bufs[i]);
}

/* ---- sampled trees (kernels/cuda/tree_sampled.cu, sample.cu's probabilities) ------------------ */

/* A random distribution over V, with about `zeros` of it exactly 0. */
static void rand_dist(float *q, int V, double zeros) {
  double sum = 0;
  for (int v = 0; v < V; v++) {
    q[v] = (double)(cn_test_rand(&rng) % 1000000) / 1e6 < zeros ? 0.0f : expf(3.0f * cn_test_randf(&rng));
    sum += q[v];
  }
  if (!(sum > 0)) q[rand_int(0, V - 1)] = 1.0f, sum = 1; /* never an empty row */
  for (int v = 0; v < V; v++) q[v] = (float)(q[v] / sum);
}

/* The device's row pointers for rows of a [rows][V] device buffer, as a device array. */
static float **dev_row_ptrs(float *d, int rows, int V) {
  float **h = malloc(sizeof *h * (size_t)rows);
  for (int r = 0; r < rows; r++) h[r] = d + (size_t)r * V;
  float **dp = dev_upload_bytes(h, sizeof *h * (size_t)rows);
  free(h);
  return dp;
}

static void test_sample_probs_and_draws_match_cpu(void **state) {
  const int Vs[] = {7, 1000, 49152, 262145, 300007};
  const cn_sample_rule rules[] = {{1.0f, 0, 1.0f}, {0.7f, 40, 1.0f}, {1.3f, 0, 0.9f}, {0.8f, 5, 0.5f}};
  int rows = 5, draws = 0, probs_rows = 0;
  double worst_probs = 0;
  for (size_t vi = 0; vi < sizeof Vs / sizeof Vs[0]; vi++) {
    int V = Vs[vi];
    size_t bytes;
    CK(cn_cuda_sample_workspace(ctx, rows, V, &bytes));
    void *ws = dev_alloc(bytes);
    float *logits = rand_buf((size_t)rows * V, 4.0f), *want = malloc(sizeof *want * (size_t)rows * V);
    float *d_logits = dev_upload(logits, (size_t)rows * V, CN_CUDA_F32), *d_q = dev_alloc(sizeof(float) * rows * V);
    float **d_ptr = dev_row_ptrs(d_q, rows, V);
    int32_t *idx = malloc(sizeof *idx * (size_t)V);
    float *prob = malloc(sizeof *prob * (size_t)V), *scratch = malloc(sizeof *scratch * (size_t)V);
    for (size_t ri = 0; ri < sizeof rules / sizeof rules[0]; ri++) {
      const cn_sample_rule *r = &rules[ri];
      CK(cn_cuda_sample_probs(ctx, d_ptr, d_logits, rows, V, r->temperature, r->top_k, r->top_p, ws, bytes));
      float *got = dev_download(d_q, (size_t)rows * V, CN_CUDA_F32);
      for (int i = 0; i < rows; i++)
        cn_cpu_sample_probs(r, logits + (size_t)i * V, V, idx, prob, want + (size_t)i * V);
      double num = 0, den = 0;
      for (size_t e = 0; e < (size_t)rows * V; e++) {
        assert_true((got[e] > 0) == (want[e] > 0)); /* the same kept set */
        num += ((double)got[e] - want[e]) * ((double)got[e] - want[e]);
        den += (double)want[e] * want[e];
      }
      double rel = sqrt(num / den);
      worst_probs = rel > worst_probs ? rel : worst_probs;
      assert_true(rel <= 1e-5);
      probs_rows += rows;
      /* Draws from the device's rows (some with fewer kept tokens than draws), bit-equal. */
      for (int k = 1; k <= 32; k = k < 4 ? k + 2 : k * 2) {
        double *u = malloc(sizeof *u * (size_t)rows * k);
        for (int e = 0; e < rows * k; e++) u[e] = rand_u();
        double *d_u = dev_upload_bytes(u, sizeof *u * (size_t)rows * k);
        int32_t *d_ids = dev_alloc(sizeof(int32_t) * (size_t)rows * k), ids[5 * 32], ref[32];
        CK(cn_cuda_draw_distinct(ctx, d_ids, (const float *const *)d_ptr, d_u, rows, V, k));
        CK(cn_cuda_sync(ctx));
        CK(cn_cuda_memcpy_d2h(ctx, ids, d_ids, sizeof(int32_t) * (size_t)rows * k));
        for (int i = 0; i < rows; i++) {
          cn_cpu_draw_distinct(got + (size_t)i * V, V, k, u + (size_t)i * k, ref, scratch);
          assert_memory_equal(ids + (size_t)i * k, ref, sizeof *ref * (size_t)k);
          draws += k;
        }
        cn_cuda_free(ctx, d_u);
        cn_cuda_free(ctx, d_ids);
        free(u);
      }
      free(got);
    }
    cn_cuda_free(ctx, ws);
    cn_cuda_free(ctx, d_logits);
    cn_cuda_free(ctx, d_q);
    cn_cuda_free(ctx, d_ptr);
    free(logits), free(want), free(idx), free(prob), free(scratch);
  }
  printf("[ sampled  ] %d rows' distributions within %.1e (rel L2) of the CPU's; %d draws equal the CPU's\n",
         probs_rows, worst_probs, draws);
}

typedef struct rows_of {
  const float *p; /* [n][V] */
  int V;
} rows_of;

static int row_at(void *ctx, int node, const float **row) {
  const rows_of *r = ctx;
  *row = r->p + (size_t)node * r->V;
  return CANOPY_OK;
}

/* Random batches of sampled trees: each node's children drawn from its own q (half the time the
 * target's p, so that walks go deep), the target rows random; the device's walk against the CPU's. */
static void test_sampled_acceptance_matches_cpu(void **state) {
  enum { MAXN = 120 };
  const int Vs[] = {11, 1000, 32003};
  int trees = 0, accepted = 0;
  for (size_t vi = 0; vi < sizeof Vs / sizeof Vs[0]; vi++) {
    int V = Vs[vi];
    float *p = malloc(sizeof *p * (size_t)MAXN * V), *q = malloc(sizeof *q * (size_t)MAXN * V);
    float *scratch = malloc(sizeof *scratch * 2 * (size_t)MAXN * V);
    float *d_p = dev_alloc(sizeof(float) * (size_t)MAXN * V), *d_q = dev_alloc(sizeof(float) * (size_t)MAXN * V);
    float *d_scratch = dev_alloc(sizeof(float) * 2 * (size_t)MAXN * V);
    int32_t *d_tok = dev_alloc(sizeof(int32_t) * MAXN), *d_par = dev_alloc(sizeof(int32_t) * MAXN);
    int32_t *d_out = dev_alloc(sizeof(int32_t) * 4 * MAXN);
    double *d_u = dev_alloc(sizeof(double) * 2 * MAXN);
    float **d_qp = dev_alloc(sizeof(float *) * MAXN);
    for (int rep = 0; rep < 30; rep++) {
      int n = rep < 2 ? rep + 1 : rand_int(1, MAXN), n_seqs = 0;
      int32_t tok[MAXN], par[MAXN], want[4 * MAXN], got[4 * MAXN];
      const float *qh[MAXN];
      float *qd[MAXN];
      double u[2 * MAXN];
      for (int i = 0, f = 0; i < n; i++) {
        if (i == 0 || rand_int(0, 29) == 0) f = i, n_seqs++;
        par[i] = i == f ? -1 : rand_int(i - f > 3 ? i - f - 3 : 0, i - f - 1);
        u[2 * i] = rand_u(), u[2 * i + 1] = rand_u();
        rand_dist(p + (size_t)i * V, V, rand_int(0, 3) == 0 ? 0.5 : 0.0);
      }
      for (int i = 0, f = 0; i < n; i++) { /* node i's children: draws from its q, in index order */
        if (par[i] == -1) f = i;
        int kids[MAXN], k = 0;
        for (int c = i + 1; c < n && par[c] != -1; c++)
          if (par[c] == i - f) kids[k++] = c;
        float *qi = q + (size_t)i * V;
        if (rand_int(0, 1)) memcpy(qi, p + (size_t)i * V, sizeof *qi * (size_t)V);
        else rand_dist(qi, V, rand_int(0, 2) == 0 ? 0.9 : 0.0);
        qh[i] = k ? qi : NULL;
        qd[i] = k ? d_q + (size_t)i * V : NULL;
        if (!k) continue;
        int32_t drawn[MAXN];
        double du[MAXN];
        for (int j = 0; j < k; j++) du[j] = rand_u();
        cn_cpu_draw_distinct(qi, V, k, du, drawn, scratch);
        for (int j = 0; j < k; j++) tok[kids[j]] = drawn[j];
      }
      if (n_seqs == 0) continue;
      tok[0] = 0;
      for (int i = 1; i < n; i++)
        if (par[i] == -1) tok[i] = rand_int(0, V - 1);
      CK(cn_cuda_memcpy_h2d(ctx, d_p, p, sizeof *p * (size_t)n * V));
      CK(cn_cuda_memcpy_h2d(ctx, d_q, q, sizeof *q * (size_t)n * V));
      CK(cn_cuda_memcpy_h2d(ctx, d_tok, tok, sizeof *tok * (size_t)n));
      CK(cn_cuda_memcpy_h2d(ctx, d_par, par, sizeof *par * (size_t)n));
      CK(cn_cuda_memcpy_h2d(ctx, d_u, u, sizeof *u * 2 * (size_t)n));
      CK(cn_cuda_memcpy_h2d(ctx, d_qp, qd, sizeof *qd * (size_t)n));
      CK(cn_cuda_memset(ctx, d_out, 0xFF, sizeof(int32_t) * (size_t)(2 * n_seqs + 2 * n)));
      CK(cn_cuda_accept_sampled(ctx, d_out, d_tok, d_par, n, n_seqs, d_p, (const float *const *)d_qp, d_u, V,
                                d_scratch));
      CK(cn_cuda_sync(ctx));
      CK(cn_cuda_memcpy_d2h(ctx, got, d_out, sizeof(int32_t) * (size_t)(2 * n_seqs + 2 * n)));
      rows_of pr = {p, V};
      assert_int_equal(cn_cpu_accept_sampled(want, tok, par, n, row_at, &pr, qh, u, V, scratch), n_seqs);
      accepted += same_acceptance(got, want, par, n, n_seqs);
      trees += n_seqs;
    }
    cn_cuda_free(ctx, d_p), cn_cuda_free(ctx, d_q), cn_cuda_free(ctx, d_scratch), cn_cuda_free(ctx, d_tok);
    cn_cuda_free(ctx, d_par), cn_cuda_free(ctx, d_out), cn_cuda_free(ctx, d_u), cn_cuda_free(ctx, d_qp);
    free(p), free(q), free(scratch);
  }
  printf("[ sampled  ] %d random trees, %d nodes accepted in all: the device's walk equals the CPU's\n", trees,
         accepted);
  assert_true(accepted > 0);
}

/* ---- a dynamic tree grown on the device (kernels/cuda/tree_dyn.cu) --------------------------- */

static float as_float(int32_t w) {
  float f;
  memcpy(&f, &w, sizeof f);
  return f;
}

/* Scores (or q) within 1e-4 of each other but not equal: the device's expf and logf may round them
 * the other way round. Such a draw is drawn again. */
static int dyn_near_tie(const int32_t *w, const cn_dyn_layout *l) {
  for (int a = 0; a < l->C; a++)
    for (int b = a + 1; b < l->C && w[l->c_valid + a]; b++) {
      if (!w[l->c_valid + b]) continue;
      float sa = as_float(w[l->c_score + a]), sb = as_float(w[l->c_score + b]);
      if (sa != sb && fabsf(sa - sb) < 1e-4f * (1 + fabsf(sa))) return 1;
    }
  return 0;
}

/* The level rows a draft would hand back: distinct ids, and log q random (some exactly repeated,
 * some -inf: no pick), or (tied) the same value everywhere. */
static void dyn_rows(int32_t *ids, float *logp, int rows, int K, int tied) {
  for (int r = 0; r < rows; r++)
    for (int i = 0; i < K; i++) {
      int32_t *row = ids + (size_t)r * K;
      int fresh;
      do {
        row[i] = rand_int(0, 999);
        fresh = 1;
        for (int j = 0; j < i; j++) fresh &= row[j] != row[i];
      } while (!fresh);
      float *lp = logp + (size_t)r * K;
      int kind = rand_int(0, 9);
      lp[i] = tied ? -logf((float)K) : kind == 0 ? -INFINITY : kind <= 2 && i ? lp[i - 1] : -8.0f * cn_test_randf(&rng);
      if (!isfinite(lp[i]) && i == 0) lp[i] = -1.0f;
    }
}

static void dyn_compare(const int32_t *got, const int32_t *want, const cn_dyn_layout *l) {
  const int ints[] = {l->f_parent, l->f_token, l->f_depth, l->f_valid};
  for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++)
    assert_memory_equal(got + ints[k], want + ints[k], sizeof *got * (size_t)l->R);
  for (int f = 0; f < l->R; f++)
    if (want[l->f_valid + f]) assert_true(fabsf(as_float(got[l->f_score + f]) - as_float(want[l->f_score + f])) < 1e-5f);
  assert_memory_equal(got + l->c_valid, want + l->c_valid, sizeof *got * (size_t)l->C);
  assert_memory_equal(got + l->c_fed, want + l->c_fed, sizeof *got * (size_t)l->C);
  for (int c = 0; c < l->C; c++)
    if (want[l->c_valid + c]) {
      assert_int_equal(got[l->c_token + c], want[l->c_token + c]);
      assert_true(fabsf(as_float(got[l->c_score + c]) - as_float(want[l->c_score + c])) < 1e-5f);
      assert_true(fabsf(as_float(got[l->c_logp + c]) - as_float(want[l->c_logp + c])) < 1e-5f);
    }
  assert_memory_equal(got + l->t_token, want + l->t_token, sizeof *got * (size_t)(4 * l->T + 1));
}

static void test_dynamic_tree_growth_and_staging_match_cpu(void **state) {
  static const int shapes[][3] = {{1, 1, 1},  {3, 1, 4},  {8, 3, 3},   {16, 4, 4},  {60, 6, 8},
                                  {25, 6, 4}, {40, 9, 2}, {100, 5, 16}, {64, 3, 32}, {7, 2, 32}}; /* N, D, K */
  int trees = 0, kept = 0;
  for (size_t sh = 0; sh < sizeof shapes / sizeof shapes[0]; sh++) {
    cn_dyn_layout l = cn_dyn_layout_make(shapes[sh][2], shapes[sh][1], shapes[sh][0]);
    int K = l.K, words_max = (l.R > l.T ? l.R : l.T) / 64 + 1, rows_max = K > l.T ? K : l.T;
    int32_t *ids = malloc(sizeof *ids * (size_t)l.R * K), *w = malloc(sizeof *w * (size_t)l.words),
            *got = malloc(sizeof *got * (size_t)l.words);
    float *logp = malloc(sizeof *logp * (size_t)l.R * K);
    uint64_t *mask = malloc(sizeof *mask * (size_t)rows_max * words_max),
             *gmask = malloc(sizeof *gmask * (size_t)rows_max * words_max);
    int32_t *pos = malloc(sizeof *pos * 1024), *apos = malloc(sizeof *apos * 1024), *par = malloc(sizeof *par * 1024),
            *gpos = malloc(sizeof *gpos * 1024), *gapos = malloc(sizeof *gapos * 1024),
            *gpar = malloc(sizeof *gpar * 1024), *tok = calloc(1024, sizeof *tok), *gtok = malloc(sizeof *gtok * 1024);
    int32_t *d_w = dev_alloc(sizeof(int32_t) * (size_t)l.words), *d_ids = dev_alloc(sizeof(int32_t) * (size_t)l.R * K),
            *d_pos = dev_alloc(sizeof(int32_t) * 1024), *d_apos = dev_alloc(sizeof(int32_t) * 1024),
            *d_par = dev_alloc(sizeof(int32_t) * 1024), *d_tok = dev_alloc(sizeof(int32_t) * 1024);
    float *d_logp = dev_alloc(sizeof(float) * (size_t)l.R * K);
    uint64_t *d_mask = dev_alloc(sizeof(uint64_t) * (size_t)rows_max * words_max);
    for (int rep = 0; rep < 4; rep++, trees++) {
      /* The host twin, level by level; a draw with near-ties is drawn again. */
      for (int tries = 0;; tries++) {
        dyn_rows(ids, logp, l.R, K, rep == 0);
        memset(w, 0, sizeof *w * (size_t)l.words);
        for (int d = 0; d < l.D; d++)
          assert_int_equal(cn_cpu_dyn_grow(w, &l, d, ids + (size_t)cn_dyn_level_first(&l, d) * K,
                                           logp + (size_t)cn_dyn_level_first(&l, d) * K, K), 0);
        if (!dyn_near_tie(w, &l) || tries == 50) break;
      }
      CK(cn_cuda_memcpy_h2d(ctx, d_ids, ids, sizeof *ids * (size_t)l.R * K));
      CK(cn_cuda_memcpy_h2d(ctx, d_logp, logp, sizeof *logp * (size_t)l.R * K));
      CK(cn_cuda_memset(ctx, d_w, 0xAB, sizeof(int32_t) * (size_t)l.words));
      memset(w, 0, sizeof *w * (size_t)l.words);
      for (int d = 0; d < l.D; d++) {
        if (d > 0) { /* level d's forward is staged from the state the level before left */
          int words = (d * K + 63) / 64;
          cn_cpu_dyn_stage(w, &l, d, 40, mask, pos, apos, NULL, tok);
          CK(cn_cuda_dyn_stage(ctx, d_w, &l, d, 40, d_mask, d_pos, d_apos, d_par, d_tok));
          CK(cn_cuda_memcpy_d2h(ctx, gtok, d_tok, sizeof *gtok * (size_t)K));
          assert_memory_equal(gtok, tok, sizeof *tok * (size_t)K);
          CK(cn_cuda_memcpy_d2h(ctx, gmask, d_mask, sizeof *gmask * (size_t)K * words));
          CK(cn_cuda_memcpy_d2h(ctx, gpos, d_pos, sizeof *gpos * (size_t)K));
          CK(cn_cuda_memcpy_d2h(ctx, gapos, d_apos, sizeof *gapos * (size_t)d * K));
          assert_memory_equal(gmask, mask, sizeof *mask * (size_t)K * words);
          assert_memory_equal(gpos, pos, sizeof *pos * (size_t)K);
          assert_memory_equal(gapos, apos, sizeof *apos * (size_t)d * K);
        }
        size_t at = (size_t)cn_dyn_level_first(&l, d) * K;
        assert_int_equal(cn_cpu_dyn_grow(w, &l, d, ids + at, logp + at, K), 0);
        CK(cn_cuda_dyn_grow(ctx, d_w, &l, d, d_ids + at, d_logp + at, K));
      }
      CK(cn_cuda_memcpy_d2h(ctx, got, d_w, sizeof *got * (size_t)l.words));
      dyn_compare(got, w, &l);
      int words = (l.T + 63) / 64;
      cn_cpu_dyn_stage(w, &l, -1, 40, mask, pos, NULL, par, tok);
      CK(cn_cuda_memcpy_h2d(ctx, d_tok, tok, sizeof *tok)); /* the root's stays */
      CK(cn_cuda_dyn_stage(ctx, d_w, &l, -1, 40, d_mask, d_pos, d_apos, d_par, d_tok));
      CK(cn_cuda_memcpy_d2h(ctx, gtok, d_tok, sizeof *gtok * (size_t)l.T));
      assert_memory_equal(gtok, tok, sizeof *tok * (size_t)l.T);
      CK(cn_cuda_memcpy_d2h(ctx, gmask, d_mask, sizeof *gmask * (size_t)l.T * words));
      CK(cn_cuda_memcpy_d2h(ctx, gpos, d_pos, sizeof *gpos * (size_t)l.T));
      CK(cn_cuda_memcpy_d2h(ctx, gapos, d_apos, sizeof *gapos * (size_t)l.T));
      CK(cn_cuda_memcpy_d2h(ctx, gpar, d_par, sizeof *gpar * (size_t)l.T));
      assert_memory_equal(gmask, mask, sizeof *mask * (size_t)l.T * words);
      assert_memory_equal(gpos, pos, sizeof *pos * (size_t)l.T);
      assert_memory_equal(gapos, pos, sizeof *pos * (size_t)l.T);
      assert_memory_equal(gpar, par, sizeof *par * (size_t)l.T);
      kept += w[l.t_n] - 1;
    }
    void *bufs[] = {d_w, d_ids, d_pos, d_apos, d_par, d_tok, d_logp, d_mask};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) cn_cuda_free(ctx, bufs[i]);
    free(ids), free(w), free(got), free(logp), free(mask), free(gmask);
    free(pos), free(apos), free(par), free(gpos), free(gapos), free(gpar), free(tok), free(gtok);
  }
  printf("[ dynamic  ] %d trees (%d kept nodes) grown and staged on the device equal the host twin's\n", trees, kept);
  assert_true(kept > trees);
}

static void test_cuda_failures_become_status_codes(void **state) {
  void *p = (void *)1;
  int st = cn_cuda_malloc(ctx, &p, (size_t)1 << 52); /* 4 PiB */
  assert_int_equal(st, CANOPY_ERR_NO_MEMORY);
  assert_null(p);
  assert_non_null(strstr(canopy_last_error(), "4503599627370496 bytes requested"));
  /* The failed allocation left nothing behind: the next call works. */
  CK(cn_cuda_malloc(ctx, &p, 64));
  cn_cuda_free(ctx, p);
  cn_cuda_attn_args a = {.n = 1, .n_heads = 1, .n_kv_heads = 1, .head_dim = 512, .kv = {.block_size = 16}};
  assert_int_equal(cn_cuda_attention(ctx, &a), CANOPY_ERR_UNSUPPORTED);
  assert_int_equal(cn_cuda_rope(ctx, NULL, CN_CUDA_F32, NULL, 1, 1, 3, NULL), CANOPY_ERR_INVALID_ARG);
  assert_int_equal(cn_cuda_add(NULL, NULL, CN_CUDA_F32, NULL, CN_CUDA_F32, 1), CANOPY_ERR_INVALID_ARG);
  assert_int_equal(cn_cuda_swiglu(ctx, NULL, NULL, (cn_cuda_dtype)7, 1, 1), CANOPY_ERR_DTYPE);
  CK(cn_cuda_sync(ctx));
}

/* ---- setup ----------------------------------------------------------------------------------- */

static int setup(void **state) {
  if (cn_cuda_ctx_create(0, &ctx)) {
    fprintf(stderr, "cn_cuda_ctx_create: %s\n", canopy_last_error());
    return -1;
  }
  return cn_threadpool_create(4, &tp);
}

static int teardown(void **state) {
  printf("\n%-10s %12s %12s   (worst rel L2 over all shapes; tolerance bf16 1e-2, f32 1e-4)\n", "op", "f32 out",
         "bf16 out");
  for (int op = 0; op < N_OPS; op++) {
    printf("%-10s", op_names[op]);
    for (int t = 0; t < 2; t++) {
      if (!checked[op][t])
        printf(" %12s", "-");
      else if (op == OP_KV_WRITE || op == OP_ARGMAX)
        printf(" %6s (x%2d)", "exact", checked[op][t]);
      else
        printf(" %.2e(x%2d)", worst[op][t], checked[op][t]);
    }
    printf("\n");
  }
  cn_threadpool_free(tp);
  cn_cuda_ctx_free(ctx);
  return 0;
}

int main(void) {
  int n_dev = cn_cuda_device_count();
  if (n_dev == 0) {
    printf("test_cuda_ops: no CUDA device visible, skipping\n");
    return CN_TEST_SKIP;
  }
  rng = cn_test_seed("test_cuda_ops");
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_bf16_conversion_rounds_to_nearest_even),
      cmocka_unit_test(test_embed_copies_table_rows),
      cmocka_unit_test(test_rmsnorm_matches_cpu),
      cmocka_unit_test(test_matmul_matches_cpu),
      cmocka_unit_test(test_matmul_rows_do_not_depend_on_the_batch),
      cmocka_unit_test(test_tuned_products_match_cpu_and_repeat),
      cmocka_unit_test(test_rope_matches_cpu),
      cmocka_unit_test(test_swiglu_matches_cpu),
      cmocka_unit_test(test_add_matches_cpu),
      cmocka_unit_test(test_kv_write_fills_exactly_its_slots),
      cmocka_unit_test(test_attention_matches_cpu),
      cmocka_unit_test(test_argmax_and_top_k_are_exact_and_order_ties_by_index),
      cmocka_unit_test(test_norm_matmul_matches_cpu),
      cmocka_unit_test(test_swiglu_matmul_add_matches_cpu),
      cmocka_unit_test(test_matmul_add_matches_cpu),
      cmocka_unit_test(test_ffn_matches_cpu),
      cmocka_unit_test(test_gemv_fusions_are_bit_exact),
      cmocka_unit_test(test_qkv_rope_matches_cpu),
      cmocka_unit_test(test_qkv_rope_kv_matches_the_two_ops),
      cmocka_unit_test(test_norm_qkv_rope_kv_is_bit_exact),
      cmocka_unit_test(test_gather_ids_and_tree_acceptance_match_cpu),
      cmocka_unit_test(test_dynamic_tree_growth_and_staging_match_cpu),
      cmocka_unit_test(test_sample_probs_and_draws_match_cpu),
      cmocka_unit_test(test_sampled_acceptance_matches_cpu),
      cmocka_unit_test(test_cuda_failures_become_status_codes),
  };
  return cn_test_run_group("test_cuda_ops", tests, sizeof tests / sizeof tests[0], setup, teardown);
}

#else /* !CANOPY_HAVE_CUDA */

int main(void) {
  printf("test_cuda_ops: canopy was built without CUDA, skipping\n");
  return CN_TEST_SKIP;
}

#endif
