/* y = x W^T (+ bias) through cuBLAS (or, for a few rows, gemv.cu): bf16 operands, fp32 accumulation, bf16 or fp32 output.
 *
 * Row-major y [n][out] = x [n][in] W^T with W [out][in] is, read column-major, the product
 * y^T (out x n) = W^T' x^T where W's storage is an (in x out) column-major matrix; so one
 * GEMM with op(A) = T on W and op(B) = N on x, and no transposed copy of any weight. */
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gemm_tune.cuh"
#include "kernels/cuda/gemv.cuh"

/* Fills y's rows with the bias, so the GEMM adds onto it with beta = 1 (no second pass). */
template <typename T> __global__ void bias_rows_kernel(T *y, const cn_bf16_t *bias, int n, int out) {
  cn_pdl_enter();
  size_t total = (size_t)n * out;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x)
    cn_st(y + e, cn_ld(bias + e % out));
}

/* y += bias row by row, before a GEMM that accumulates into y (beta = 1). */
__global__ void add_bias_rows_kernel(float *y, const cn_bf16_t *bias, int n, int out) {
  cn_pdl_enter();
  size_t total = (size_t)n * out;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x)
    y[e] += cn_ld(bias + e % out);
}

/* Rows the GEMM runs with: n, or in batch-invariant mode the bucket above it (64, then powers of
 * two), so that every call of up to 64 rows is the same cuBLAS problem (cuda_ops.h). The input
 * buffer must hold that many rows; the rows past n are never read back. */
static int gemm_rows(const cn_cuda_ctx *ctx, int n) {
  if (!ctx->batch_invariant) return n;
  int m = 64;
  while (m < n) m *= 2;
  return m;
}

/* Whether the few-row kernel runs n rows with its fusions (gemv.cuh): not in batch-invariant
 * mode, where every call must be the same padded cuBLAS problem. */
static bool fused(const cn_cuda_ctx *ctx, int n, int in, cn_gemv_x kind) {
  return n <= ctx->gemv_fusion && n <= ctx->gemv_max_rows && !ctx->batch_invariant && cn_gemv_fits(n, in, kind);
}

static int gemv(cn_cuda_ctx *ctx, void *y, cn_cuda_dtype y_dt, const void *x, cn_gemv_x kind, const cn_bf16 *norm_w,
                float eps, const cn_bf16 *w, const cn_bf16 *bias, int n, int in, int out, cn_gemv_out how) {
  cn_gemv g = {y,  y_dt, x,  kind, (const cn_bf16_t *)norm_w, eps, (const cn_bf16_t *)w, (const cn_bf16_t *)bias,
               n,  in,   out, how};
  return cn_gemv_run(ctx, &g);
}

/* The GEMM proper on a bf16 x (gemm_rows(n) rows readable): y = (accumulate ? y : 0) + x W^T + bias.
 * Padded, it runs into pad_y and copies the n real rows to y. */
static int gemm_bf16(cn_cuda_ctx *ctx, void *y_out, cn_cuda_dtype y_dt, const void *xb, const cn_bf16 *w,
                     const cn_bf16 *bias, int n_real, int in, int out, bool accumulate) {
  int n = gemm_rows(ctx, n_real);
  if (n <= ctx->gemv_max_rows) /* bias and accumulation in the kernel's epilogue */
    return gemv(ctx, y_out, y_dt, xb, CN_GEMV_X_BF16, NULL, 0.0f, w, bias, n, in, out,
                accumulate ? CN_GEMV_ADD : CN_GEMV_STORE);
  size_t row_bytes = (size_t)out * (y_dt == CN_CUDA_F32 ? sizeof(float) : sizeof(cn_bf16));
  void *y = y_out;
  if (n != n_real) {
    if ((size_t)n * row_bytes > ctx->pad_y_bytes) {
      void *p = NULL;
      int st = cn_cuda_malloc(ctx, &p, (size_t)n * row_bytes);
      if (st) return st;
      if (ctx->pad_y) CN_CUDA_CHECK(cudaFree(ctx->pad_y)); /* waits for the GEMMs that used it */
      ctx->pad_y = p;
      ctx->pad_y_bytes = (size_t)n * row_bytes;
      ctx->scratch_gen++;
    }
    y = ctx->pad_y;
    if (accumulate)
      CN_CUDA_CHECK(cudaMemcpyAsync(y, y_out, (size_t)n_real * row_bytes, cudaMemcpyDeviceToDevice, ctx->stream));
  }
  bool beta_one = accumulate;
  if (bias) {
    int st = cn_dispatch(y_dt, [&](auto t) {
      using T = decltype(t);
      const int threads = 256;
      unsigned grid = cn_grid_for(ctx, (size_t)n * out, threads);
      if (accumulate)
        CN_CUDA_CHECK(
            cn_launch(ctx, add_bias_rows_kernel, grid, threads, 0, (float *)y, (const cn_bf16_t *)bias, n, out));
      else
        CN_CUDA_CHECK(cn_launch(ctx, bias_rows_kernel<T>, grid, threads, 0, (T *)y, (const cn_bf16_t *)bias, n, out));
      return (int)CANOPY_OK;
    });
    if (st) return st;
    beta_one = true;
  }
  cn_gemm_call call = {w, xb, y, y_dt, n, in, out, beta_one};
  int st = cn_gemm_run(ctx, &call);
  if (st) return st;
  if (y != y_out)
    CN_CUDA_CHECK(cudaMemcpyAsync(y_out, y, (size_t)n_real * row_bytes, cudaMemcpyDeviceToDevice, ctx->stream));
  return CANOPY_OK;
}

/* x as the bf16 operand the GEMM reads (gemm_rows(n) rows): x itself, or its rounding (fp32) or
 * padding copy (batch-invariant) in the scratch buffer. */
static int gemm_input(cn_cuda_ctx *ctx, const void *x, cn_cuda_dtype x_dt, int n, int in, const void **xb) {
  *xb = x;
  size_t elems = (size_t)n * in;
  if (x_dt != CN_CUDA_F32 && gemm_rows(ctx, n) == n) return CANOPY_OK;
  /* cuBLAS wants A and B of one type: round the (small) activation, never the weight. A padded
   * GEMM reads past n rows: those come from the scratch buffer too. */
  int st = cn_cuda_reserve_scratch(ctx, (size_t)gemm_rows(ctx, n) * in);
  if (!st && x_dt == CN_CUDA_F32) st = cn_cuda_f32_to_bf16(ctx, (cn_bf16 *)ctx->scratch, (const float *)x, elems);
  if (st) return st;
  if (x_dt != CN_CUDA_F32)
    CN_CUDA_CHECK(cudaMemcpyAsync(ctx->scratch, x, elems * sizeof(cn_bf16), cudaMemcpyDeviceToDevice, ctx->stream));
  *xb = ctx->scratch;
  return CANOPY_OK;
}

static int check_dims(const char *who, int n, int in, int out) {
  if (n < 0 || in <= 0 || out <= 0) return cn_error(CANOPY_ERR_INVALID_ARG, "%s: n=%d in=%d out=%d", who, n, in, out);
  return CANOPY_OK;
}

/* y = (add ? y : 0) + x W^T + bias: cn_cuda_matmul and cn_cuda_matmul_add (who names the caller). */
static int matmul(cn_cuda_ctx *ctx, const char *who, void *y, cn_cuda_dtype y_dt, const void *x, cn_cuda_dtype x_dt,
                  const cn_bf16 *w, const cn_bf16 *bias, int n, int in, int out, bool add) {
  CN_CUDA_ENTER(ctx);
  int st = check_dims(who, n, in, out);
  if (st) return st;
  if (!cn_dtype_ok(y_dt) || !cn_dtype_ok(x_dt))
    return cn_error(CANOPY_ERR_DTYPE, "%s: dtypes y=%d x=%d", who, (int)y_dt, (int)x_dt);
  if (y == x) return cn_error(CANOPY_ERR_INVALID_ARG, "%s: y must not alias x", who);
  if (!n) return CANOPY_OK;
  if (x_dt == CN_CUDA_F32 && fused(ctx, n, in, CN_GEMV_X_F32))
    return gemv(ctx, y, y_dt, x, CN_GEMV_X_F32, NULL, 0.0f, w, bias, n, in, out, add ? CN_GEMV_ADD : CN_GEMV_STORE);
  const void *xb;
  st = gemm_input(ctx, x, x_dt, n, in, &xb);
  return st ? st : gemm_bf16(ctx, y, y_dt, xb, w, bias, n, in, out, add);
}

int cn_cuda_matmul(cn_cuda_ctx *ctx, void *y, cn_cuda_dtype y_dt, const void *x, cn_cuda_dtype x_dt, const cn_bf16 *w,
                   const cn_bf16 *bias, int n, int in, int out) {
  return matmul(ctx, __func__, y, y_dt, x, x_dt, w, bias, n, in, out, false);
}

int cn_cuda_matmul_add(cn_cuda_ctx *ctx, float *y, const void *x, cn_cuda_dtype x_dt, const cn_bf16 *w,
                       const cn_bf16 *bias, int n, int in, int out) {
  return matmul(ctx, __func__, y, CN_CUDA_F32, x, x_dt, w, bias, n, in, out, true);
}

/* The fused forms: the GEMM's input is produced in bf16 (by the few-row kernel itself, or by the
 * op before it straight into the scratch buffer: RMSNorm, SwiGLU), so no fp32 activation is
 * written, read back and rounded in a pass of its own. */

int cn_cuda_norm_matmul(cn_cuda_ctx *ctx, void *y, cn_cuda_dtype y_dt, const float *x, const cn_bf16 *norm_w, float eps,
                        const cn_bf16 *w, const cn_bf16 *bias, int n, int in, int out) {
  CN_CUDA_ENTER(ctx);
  int st = check_dims(__func__, n, in, out);
  if (st) return st;
  if (!cn_dtype_ok(y_dt)) return cn_error(CANOPY_ERR_DTYPE, "cn_cuda_norm_matmul: y dtype %d", (int)y_dt);
  if (!n) return CANOPY_OK;
  if (fused(ctx, n, in, CN_GEMV_X_NORM))
    return gemv(ctx, y, y_dt, x, CN_GEMV_X_NORM, norm_w, eps, w, bias, n, in, out, CN_GEMV_STORE);
  st = cn_cuda_reserve_scratch(ctx, (size_t)gemm_rows(ctx, n) * in);
  if (!st) st = cn_cuda_rmsnorm(ctx, ctx->scratch, CN_CUDA_BF16, x, CN_CUDA_F32, norm_w, n, in, eps);
  return st ? st : gemm_bf16(ctx, y, y_dt, ctx->scratch, w, bias, n, in, out, false);
}

int cn_cuda_swiglu_matmul_add(cn_cuda_ctx *ctx, float *y, const float *gate_up, const cn_bf16 *w, const cn_bf16 *bias,
                              int n, int d, int out) {
  CN_CUDA_ENTER(ctx);
  int st = check_dims(__func__, n, d, out);
  if (st) return st;
  if (!n) return CANOPY_OK;
  st = cn_cuda_reserve_scratch(ctx, (size_t)gemm_rows(ctx, n) * d);
  if (!st) st = cn_cuda_swiglu_to_bf16(ctx, (cn_bf16 *)ctx->scratch, gate_up, n, d);
  return st ? st : gemm_bf16(ctx, y, CN_CUDA_F32, ctx->scratch, w, bias, n, d, out, true);
}

/* Whether ffn's n rows take the SwiGLU epilogue after a separate RMSNorm (cn_cuda_set_gemv_swiglu_rows). */
static bool swiglu_epilogue(const cn_cuda_ctx *ctx, int n, int dim) {
  return n <= ctx->gemv_swiglu_rows && n <= ctx->gemv_max_rows && !ctx->batch_invariant &&
         cn_gemv_fits(n, dim, CN_GEMV_X_BF16);
}

/* Fused: the gate/up kernel makes the SwiGLU activation (gate and up rows, silu(g) * u) into the
 * scratch buffer, a second kernel adds its down projection to x. Within the fusion limit the
 * gate/up kernel RMSNorms its input itself; past it, up to the SwiGLU-epilogue limit, an RMSNorm
 * kernel writes the normed input into the scratch first, ahead of the activation. */
int cn_cuda_ffn(cn_cuda_ctx *ctx, float *x, float *gate_up, const cn_bf16 *norm_w, float eps, const cn_bf16 *w_gu,
                const cn_bf16 *b_gu, const cn_bf16 *w_down, const cn_bf16 *b_down, int n, int dim, int d) {
  CN_CUDA_ENTER(ctx);
  int st = check_dims(__func__, n, dim, d);
  if (st) return st;
  if (!n) return CANOPY_OK;
  const bool staged = fused(ctx, n, dim, CN_GEMV_X_NORM);
  if (!staged && !swiglu_epilogue(ctx, n, dim)) {
    st = cn_cuda_norm_matmul(ctx, gate_up, CN_CUDA_F32, x, norm_w, eps, w_gu, b_gu, n, dim, 2 * d);
    return st ? st : cn_cuda_swiglu_matmul_add(ctx, x, gate_up, w_down, b_down, n, d, dim);
  }
  const size_t normed = staged ? 0 : ((size_t)n * dim + 7) / 8 * 8; /* the activation starts 16-byte aligned */
  st = cn_cuda_reserve_scratch(ctx, normed + (size_t)n * d);
  cn_bf16 *xn = (cn_bf16 *)ctx->scratch, *act = xn + normed;
  if (!st && !staged) st = cn_cuda_rmsnorm(ctx, xn, CN_CUDA_BF16, x, CN_CUDA_F32, norm_w, n, dim, eps);
  if (!st)
    st = staged ? gemv(ctx, act, CN_CUDA_BF16, x, CN_GEMV_X_NORM, norm_w, eps, w_gu, b_gu, n, dim, d, CN_GEMV_SWIGLU)
                : gemv(ctx, act, CN_CUDA_BF16, xn, CN_GEMV_X_BF16, NULL, 0.0f, w_gu, b_gu, n, dim, d, CN_GEMV_SWIGLU);
  return st ? st : gemv(ctx, x, CN_CUDA_F32, act, CN_GEMV_X_BF16, NULL, 0.0f, w_down, b_down, n, d, dim, CN_GEMV_ADD);
}

/* Fused (up to CN_GEMV_ROPE_ROWS rows): the few-row kernel RMSNorms x, projects it and rotates
 * each (k, k + d / 2) pair of the q and k heads in its epilogue, so the projection's output never
 * goes through memory; else the projection into qkv, then cn_cuda_qkv_rope_kv. */
int cn_cuda_norm_qkv_rope_kv(cn_cuda_ctx *ctx, void *q, cn_cuda_dtype q_dt, float *qkv, const float *x,
                             const cn_bf16 *norm_w, float eps, const cn_bf16 *w, const cn_bf16 *bias, int n, int in,
                             const int32_t *pos, int n_heads, int n_kv_heads, int head_dim, const float *inv_freq,
                             const cn_cuda_paged_kv *kv, const int32_t *slots) {
  CN_CUDA_ENTER(ctx);
  const int out = (n_heads + 2 * n_kv_heads) * head_dim;
  int st = check_dims(__func__, n, in, out);
  if (st) return st;
  if (n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0 || head_dim % 2 || !kv || kv->block_size <= 0)
    return cn_error(CANOPY_ERR_INVALID_ARG,
                    "cn_cuda_norm_qkv_rope_kv: n_heads=%d n_kv_heads=%d head_dim=%d (even), and a cache view", n_heads,
                    n_kv_heads, head_dim);
  if (!cn_dtype_ok(q_dt)) return cn_error(CANOPY_ERR_DTYPE, "cn_cuda_norm_qkv_rope_kv: q dtype %d", (int)q_dt);
  if (!n) return CANOPY_OK;
  if (n <= CN_GEMV_ROPE_ROWS && fused(ctx, n, in, CN_GEMV_X_NORM)) {
    cn_gemv g = {q, q_dt, x, CN_GEMV_X_NORM, (const cn_bf16_t *)norm_w, eps, (const cn_bf16_t *)w,
                 (const cn_bf16_t *)bias, n, in, out, CN_GEMV_ROPE};
    g.rope = (cn_gemv_rope){*kv, slots, pos, inv_freq, n_heads, n_kv_heads, head_dim};
    return cn_gemv_run(ctx, &g);
  }
  st = cn_cuda_norm_matmul(ctx, qkv, CN_CUDA_F32, x, norm_w, eps, w, bias, n, in, out);
  return st ? st : cn_cuda_qkv_rope_kv(ctx, q, q_dt, qkv, pos, n, n_heads, n_kv_heads, head_dim, inv_freq, kv, slots);
}
