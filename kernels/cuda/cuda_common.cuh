/* What the op files share: the context struct, bf16/fp32 loads and stores, dtype dispatch and
 * block-size helpers. C++ only. */
#ifndef CANOPY_KERNELS_CUDA_CUDA_COMMON_CUH
#define CANOPY_KERNELS_CUDA_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cublasLt.h>
#include <stddef.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_ops.h"

struct cn_cuda_ctx {
  int device;
  int n_sm;            /* multiprocessors, to size grid-stride launches */
  int cc;              /* compute capability, 10 major + minor: 90 runs the sm_90a (wgmma) kernels */
  int pdl;             /* cn_launch uses programmatic dependent launch (sm_90, unless CANOPY_CUDA_NO_PDL=1) */
  cudaStream_t stream; /* every op of this context runs on it, in order */
  cublasHandle_t blas; /* bound to `stream` */
  void *scratch;       /* bf16 copy of an fp32 GEMM input; scratch_bytes long */
  size_t scratch_bytes;
  unsigned scratch_gen; /* bumped when scratch or pad_y moves: captured graphs that read them are stale */
  void *blas_ws;       /* cuBLAS workspace of our own, so captured GEMMs allocate nothing */
  cublasLtHandle_t lt; /* the tuned products' handle (gemm_tune.cuh); shares blas_ws */
  int gemm_tune;       /* cuBLAS products tuned per shape by measurement (cn_cuda_set_gemm_tune) */
  struct cn_gemm_plans *gemm_plans; /* the shapes tuned so far, owned */
  int batch_invariant; /* GEMMs padded to a fixed row bucket (cn_cuda_set_batch_invariant) */
  int gemv_fusion;     /* rows up to which few-row GEMMs take in the ops around them (cn_cuda_set_gemv_fusion) */
  int gemv_swiglu_rows; /* rows up to which ffn's gate/up GEMM applies SwiGLU after a separate RMSNorm
                           (cn_cuda_set_gemv_swiglu_rows) */
  int gemv_mma_rows;   /* few-row GEMMs of this many rows and more on tensor cores (cn_cuda_set_gemv_mma_rows) */
  int gemv_max_rows;   /* GEMMs of up to this many rows run the few-row kernel (cn_cuda_set_gemv_max_rows) */
  int ta_split_min;    /* fewest keys a split of the tree-attention plan holds below 128 rows a KV head */
  bool ta_two_wg;      /* 128-row wgmma tree-attention tiles as two warpgroups (CANOPY_CUDA_TA_TWO_WG) */
  int ta_key_split;    /* 64-row ones of KV heads with this many rows or more as two warpgroups, half the
                          keys each (0: never; CANOPY_CUDA_TA_KEY_SPLIT_ROWS) */
  int ta_ws;           /* 128-row ones warp-specialised (3: 64-key tiles, 4: 128): a producer
                          warpgroup and two consumers, one block a multiprocessor (0: not;
                          CANOPY_CUDA_TA_WS; cn_cuda_set_ta_ws) */
  int ta_ws_max_rows;  /* ... for KV heads of at most this many query rows */
  int ta_ws_long_keys; /* mode 3's 128-key tiles for launches of one split whose sequences may hold
                          this many keys (0: never; CANOPY_CUDA_TA_WS_LONG_KEYS; cn_cuda_set_ta_ws) */
  void *pad_y;         /* the padded GEMM's output rows; pad_y_bytes long */
  size_t pad_y_bytes;
};

/* cuBLAS's workspace (NVIDIA's recommended size for Hopper). */
#define CN_BLAS_WS_BYTES ((size_t)32 << 20)

typedef __nv_bfloat16 cn_bf16_t;

/* Loads widen to fp32 and stores round from fp32 (to nearest even), so a kernel templated on the
 * element type does its arithmetic in fp32 whatever it reads and writes. */
__device__ __forceinline__ float cn_ld(const float *p) { return *p; }
__device__ __forceinline__ float cn_ld(const cn_bf16_t *p) { return __bfloat162float(*p); }
__device__ __forceinline__ void cn_st(float *p, float v) { *p = v; }
__device__ __forceinline__ void cn_st(cn_bf16_t *p, float v) { *p = __float2bfloat16_rn(v); }

static inline bool cn_dtype_ok(cn_cuda_dtype dt) { return dt == CN_CUDA_F32 || dt == CN_CUDA_BF16; }

/* Calls f(T()) with T the C++ type of `dt`; f returns a status. */
template <typename F> static int cn_dispatch(cn_cuda_dtype dt, F &&f) {
  switch (dt) {
  case CN_CUDA_F32: return f(float());
  case CN_CUDA_BF16: return f(cn_bf16_t());
  }
  return cn_error(CANOPY_ERR_DTYPE, "cuda: unknown dtype %d", (int)dt);
}

/* The same over two dtypes: f(A(), B()). */
template <typename F> static int cn_dispatch2(cn_cuda_dtype a, cn_cuda_dtype b, F &&f) {
  return cn_dispatch(a, [&](auto ta) { return cn_dispatch(b, [&](auto tb) { return f(ta, tb); }); });
}

/* Programmatic dependent launch (sm_90). Kernels go out through cn_launch, which lets each one be
 * scheduled while the kernel before it on the stream is still running; every kernel begins with
 * cn_pdl_enter: it waits there until that kernel has finished and its writes are visible (so
 * nothing is read or written early, and the order is the stream's), then lets the next kernel be
 * scheduled. What overlaps is the launch and block scheduling of a kernel with the tail of the one
 * before: in a decode step of hundreds of small kernels, that gap is most of the time. Off sm_90
 * (or with CANOPY_CUDA_NO_PDL=1 when the context is made) cn_launch is a plain launch, and the
 * device functions are no-ops off sm_90 and return at once for a plainly launched kernel. */
__device__ __forceinline__ void cn_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cn_pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cn_pdl_enter() {
  cn_pdl_wait();
  cn_pdl_trigger();
}

/* kernel<<<grid, block, smem, ctx->stream>>>(args...), as a programmatic dependent launch on sm_90.
 * The kernel must call cn_pdl_enter (or cn_pdl_wait) before it touches global memory that a kernel
 * of the stream may write (only weights are read before it: gemv.cu's first batch). Returns a bad
 * launch configuration at once (faults inside the kernel surface at the next synchronising call). */
template <typename... P, typename... A>
static inline cudaError_t cn_launch(const cn_cuda_ctx *ctx, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                                    A &&...args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = ctx->stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = ctx->pdl;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<A &&>(args)...);
}

/* Validates the context and makes its device current for the launches that follow. */
#define CN_CUDA_ENTER(ctx)                                                                                             \
  do {                                                                                                                 \
    if (!(ctx)) return cn_error(CANOPY_ERR_INVALID_ARG, "%s: NULL cuda context", __func__);                            \
    CN_CUDA_CHECK(cudaSetDevice((ctx)->device));                                                                       \
  } while (0)

/* Blocks for a grid-stride loop over n items of `threads` each: enough to fill the device, never
 * more than the items need. */
static inline unsigned cn_grid_for(const cn_cuda_ctx *ctx, size_t n, int threads) {
  size_t want = (n + (size_t)threads - 1) / (size_t)threads, cap = (size_t)ctx->n_sm * 32;
  return (unsigned)(want < cap ? (want ? want : 1) : cap);
}

#endif
