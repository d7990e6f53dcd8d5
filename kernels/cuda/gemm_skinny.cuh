/* The GEMM of a token tree's verification: 9 to 64 rows (the few-row kernel, gemv.cuh, takes up to
 * 8), where a step is still bound by the weight bytes but cuBLAS's kernels read them at 60-85% of
 * the copy bandwidth (bench/RESULTS.md, 2026-12-04) and cannot start before the kernel ahead of them
 * ends. C++ only; used by matmul.cu.
 *
 * bf16 input rows read from global memory, fp32 accumulation on tensor cores, and the few-row
 * kernel's epilogues: store (fp32 or bf16), add to an fp32 residual, SwiGLU over a fused
 * [gate | up] weight. A row's result depends neither on n nor on the other rows: the k order of
 * every output is fixed by the shape (in, out) alone. */
#ifndef CANOPY_KERNELS_CUDA_GEMM_SKINNY_CUH
#define CANOPY_KERNELS_CUDA_GEMM_SKINNY_CUH

#include "kernels/cuda/gemv.cuh"

/* Input rows a block computes: the most rows the kernel takes. */
#define CN_SKINNY_MAX_ROWS 64

/* Whether g runs here: ctx's row range (above gemv_max_rows, up to skinny_rows), bf16 x, in % 8 ==
 * 0, 16-byte aligned W and x, a store, add or SwiGLU output, and a device with cp.async and bf16
 * mma.sync (sm_80 on). Never in batch-invariant mode. */
bool cn_skinny_fits(const cn_cuda_ctx *ctx, const cn_gemv *g);

/* Runs g (cn_skinny_fits must hold). Small outputs split k across blocks; the partial tiles are
 * added in split order by the block that finishes a tile last, so the bits do not depend on which
 * block that is. */
int cn_skinny_run(cn_cuda_ctx *ctx, const cn_gemv *g);

#endif
