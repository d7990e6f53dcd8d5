/* Checks for every CUDA runtime and cuBLAS call (CONVENTIONS.md #6): a failure becomes a status
 * code and a "file:line: message" in canopy_last_error(), returned from the enclosing function;
 * library code never exits. C++ only (included by the .cu files). */
#ifndef CANOPY_KERNELS_CUDA_CUDA_CHECK_H
#define CANOPY_KERNELS_CUDA_CUDA_CHECK_H

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <string.h>

extern "C" {
#include "common/error.h"
}

/* __FILE__ is absolute under CMake; the path from the repository root is what a reader needs. */
static inline const char *cn_cuda_short_file(const char *file) {
  const char *k = strstr(file, "kernels/cuda/");
  return k ? k : file;
}

static inline int cn_cuda_fail(cudaError_t e, const char *file, int line, const char *call) {
  (void)cudaGetLastError(); /* clears a non-sticky error so the next call starts clean */
  int status = e == cudaErrorMemoryAllocation ? CANOPY_ERR_NO_MEMORY : CANOPY_ERR_DEVICE;
  return cn_error(status, "%s:%d: %s (%s)", cn_cuda_short_file(file), line, cudaGetErrorString(e), call);
}

static inline int cn_cublas_fail(cublasStatus_t s, const char *file, int line, const char *call) {
  int status = s == CUBLAS_STATUS_ALLOC_FAILED ? CANOPY_ERR_NO_MEMORY : CANOPY_ERR_DEVICE;
  return cn_error(status, "%s:%d: %s (%s)", cn_cuda_short_file(file), line, cublasGetStatusString(s), call);
}

#define CN_CUDA_CHECK(call)                                                                                            \
  do {                                                                                                                 \
    cudaError_t cn_e_ = (call);                                                                                        \
    if (cn_e_ != cudaSuccess) return cn_cuda_fail(cn_e_, __FILE__, __LINE__, #call);                                   \
  } while (0)

#define CN_CUBLAS_CHECK(call)                                                                                          \
  do {                                                                                                                 \
    cublasStatus_t cn_s_ = (call);                                                                                     \
    if (cn_s_ != CUBLAS_STATUS_SUCCESS) return cn_cublas_fail(cn_s_, __FILE__, __LINE__, #call);                       \
  } while (0)

#endif
