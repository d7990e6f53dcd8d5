/* The GEMM of a few rows (decode, short chains), where cuBLAS's kernels leave bandwidth unused,
 * with the small ops around it folded in: a decode step of a large model is hundreds of kernels,
 * and at that size each kernel boundary costs about what a small op does. C++ only; used by
 * matmul.cu.
 *
 * The input rows come as bf16 (read from global memory), or as fp32 rounded to bf16 into shared
 * memory by each block, or as fp32 RMSNormed into bf16 in shared memory; the output is stored,
 * added to an fp32 residual stream, (over a fused [gate | up] weight) turned into the SwiGLU
 * activation, or (over the fused q/k/v weight) rotated into q and the KV cache. Every variant rounds exactly as the
 * separate ops it replaces (cn_cuda_rmsnorm to bf16, cn_cuda_f32_to_bf16, cn_cuda_swiglu_to_bf16, the bias pass,
 * cn_cuda_add and cn_cuda_qkv_rope_kv), so fused and unfused forwards produce the same bits.
 * The products run on CUDA cores or, from CN_GEMV_MMA_ROWS rows, on tensor cores: the two round
 * differently, each the same way for every row count it serves. */
#ifndef CANOPY_KERNELS_CUDA_GEMV_CUH
#define CANOPY_KERNELS_CUDA_GEMV_CUH

#include "kernels/cuda/cuda_common.cuh"

/* Rows up to which the few-row kernel is used instead of cuBLAS. */
#define CN_GEMV_MAX_ROWS 8

/* Rows up to which the fusions run by default (cn_cuda_set_gemv_fusion): each block restages its
 * input rows, which from 3 rows on cost more than a separate RMSNorm kernel (with the tensor-core
 * kernel there), and at 2 rows too once the tensor-core kernel takes them: a 2-token verification
 * ran 2.5% (Llama-3-8B) and 8-9% (SmolLM2-135M) faster unfused on tensor cores than fused on CUDA
 * cores (H100, bench/RESULTS.md, 2026-12-06, eighteenth session). */
#define CN_GEMV_FUSE_ROWS 1

/* Rows from which the few-row GEMM runs on tensor cores by default (gemv.cu; cn_cuda_set_gemv_mma_rows):
 * from 2, outside the fusions (above). */
#define CN_GEMV_MMA_ROWS 2

/* Rows up to which the q/k/v projection takes RoPE into its epilogue (CN_GEMV_ROPE), within the
 * fusion limit (so one row by default): its warps each carry two weight rows, half as many warps
 * as the plain projection, and from 3 rows on, where the kernel is bound by instructions rather
 * than memory, that lost to the projection plus a RoPE kernel (H200, bench_step --compare-qkv,
 * bench/RESULTS.md). */
#define CN_GEMV_ROPE_ROWS 2

/* Shared memory a block may use for staged input rows (the default limit, no opt-in). */
#define CN_GEMV_STAGE_BYTES (48 * 1024)

typedef enum cn_gemv_x {
  CN_GEMV_X_BF16, /* x [n][in] bf16 */
  CN_GEMV_X_F32,  /* x [n][in] fp32, rounded to bf16 */
  CN_GEMV_X_NORM, /* x [n][in] fp32, rmsnorm(x) * norm_w rounded to bf16 */
} cn_gemv_x;

typedef enum cn_gemv_out {
  CN_GEMV_STORE,  /* y [n][out] = x W^T + bias (y fp32 or bf16) */
  CN_GEMV_ADD,    /* y [n][out] += x W^T + bias (y fp32) */
  CN_GEMV_SWIGLU, /* W [2 out][in] = [gate | up], bias [2 out]: y [n][out] bf16 = silu(g) * u */
  CN_GEMV_ROPE,   /* W [out][in] the fused q/k/v projection, out = (H + 2 H_kv) d: y [n][H d] (fp32 or bf16) =
                     q rotated, k rotated and v into their cache slots (cn_gemv_rope), as cn_cuda_qkv_rope_kv;
                     n up to CN_GEMV_ROPE_ROWS */
} cn_gemv_out;

typedef struct cn_gemv_rope {
  cn_cuda_paged_kv kv;        /* the layer's cache view (its block_table unused) */
  const int32_t *slots, *pos; /* [n] physical slot and position of each row */
  const float *inv_freq;      /* [head_dim / 2] */
  int n_heads, n_kv_heads, head_dim;
} cn_gemv_rope;

typedef struct cn_gemv {
  void *y;
  cn_cuda_dtype y_dt;
  const void *x;
  cn_gemv_x x_kind;
  const cn_bf16_t *norm_w; /* [in], CN_GEMV_X_NORM only */
  float eps;
  const cn_bf16_t *w, *bias; /* bias may be NULL */
  int n, in, out;
  cn_gemv_out how;
  cn_gemv_rope rope; /* CN_GEMV_ROPE only */
} cn_gemv;

/* Whether n rows of `in` fit the kernel: 1 <= n <= CN_GEMV_MAX_ROWS, and the staged kinds (fp32
 * inputs) within CN_GEMV_STAGE_BYTES. */
bool cn_gemv_fits(int n, int in, cn_gemv_x kind);

/* Runs g (cn_gemv_fits must hold). Every row is computed in the same order whatever n is, so a
 * row's result does not depend on the rows batched with it. */
int cn_gemv_run(cn_cuda_ctx *ctx, const cn_gemv *g);

#endif
