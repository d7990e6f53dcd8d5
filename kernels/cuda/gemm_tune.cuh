/* The cuBLAS products of matmul.cu, with each shape's kernel chosen by measurement.
 *
 * cuBLAS picks a GEMM kernel (tile, split-K or stream-K, cluster shape) by a heuristic. For the
 * skinny products of a verification step (9-512 rows against a weight of thousands) its first pick
 * leaves bandwidth unused: Llama-3-8B's products at 64 rows ran at 77% of the copy bandwidth
 * where the few-row kernel reaches 89% at one row (bench/RESULTS.md, H200). With tuning on
 * (cn_cuda_set_gemm_tune), the first eager call of a shape times cublasGemmEx's own choice and
 * cuBLASLt's heuristic candidates on the call's real operands, with L2 flushed before each run as
 * a forward finds it, and keeps the fastest; a candidate replaces cublasGemmEx only when it is
 * clearly faster, so noise cannot make a shape slower. Later calls of the shape, captured graphs
 * included, run the kept choice: a shape's result is the same bits on every call of a context.
 * C++ only; used by matmul.cu and context.cu. */
#ifndef CANOPY_KERNELS_CUDA_GEMM_TUNE_CUH
#define CANOPY_KERNELS_CUDA_GEMM_TUNE_CUH

#include "kernels/cuda/cuda_common.cuh"

/* Row counts tuned: a verification step up to a batch of trees. Larger products (prefill) are
 * compute-bound, where cuBLAS's pick is good, and each new row count would cost a tuning pass. */
#define CN_GEMM_TUNE_MAX_ROWS 512

/* Shapes remembered; past this, new shapes run cublasGemmEx untuned. */
#define CN_GEMM_TUNE_MAX_PLANS 256

/* y (out x n, column-major; row-major y [n][out]) = alpha W^T x + beta y, W [out][in] bf16 and
 * x [n][in] bf16 row-major, y fp32 or bf16, fp32 accumulation. */
typedef struct cn_gemm_call {
  const void *w, *x;
  void *y;
  cn_cuda_dtype y_dt;
  int n, in, out;
  bool accumulate; /* beta = 1 */
} cn_gemm_call;

/* Runs the product: the shape's kept cuBLASLt kernel if tuning is on and has chosen one (tuning
 * the shape first if this is its first eager call), else cublasGemmEx. Batch-invariant mode
 * (cn_cuda_set_batch_invariant) always takes cublasGemmEx. */
int cn_gemm_run(cn_cuda_ctx *ctx, const cn_gemm_call *g);

/* Creates the context's cuBLASLt handle (ctx_init) and frees it with the plans (ctx_free). */
int cn_gemm_tune_init(cn_cuda_ctx *ctx);
void cn_gemm_tune_free(cn_cuda_ctx *ctx);

#endif
