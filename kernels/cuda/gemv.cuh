/* The GEMM of a few rows (decode, short chains), where cuBLAS's kernels leave bandwidth unused.
 * C++ only; used by matmul.cu. */
#ifndef CANOPY_KERNELS_CUDA_GEMV_CUH
#define CANOPY_KERNELS_CUDA_GEMV_CUH

#include "kernels/cuda/cuda_common.cuh"

/* Rows up to which cn_gemv_bf16 is used instead of cuBLAS. */
#define CN_GEMV_MAX_ROWS 8

/* y [n][out] = (accumulate ? y : 0) + x [n][in] W^T with x and W [out][in] in bf16, fp32
 * accumulation, y fp32 or bf16; 1 <= n <= CN_GEMV_MAX_ROWS. Every row is computed in the same
 * order whatever n is, so a row's result does not depend on the rows batched with it. */
int cn_gemv_bf16(cn_cuda_ctx *ctx, void *y, cn_cuda_dtype y_dt, const cn_bf16_t *x, const cn_bf16_t *w, int n, int in,
                 int out, bool accumulate);

#endif
