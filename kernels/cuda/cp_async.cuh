/* cp.async (sm_80 on): 16-byte copies from global to shared memory that bypass L1 and the
 * register file, in commit groups a thread waits for. Used by the tree-attention and 9-64 row GEMM
 * kernels. */
#ifndef CANOPY_KERNELS_CUDA_CP_ASYNC_CUH
#define CANOPY_KERNELS_CUDA_CP_ASYNC_CUH

#include <stdint.h>

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* 16 bytes global -> shared; bytes = 0 writes zeros without reading. */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

#endif
