/* The CPU twin of cn_cuda_random_bf16: the same bf16 values, widened to fp32. */
#include <string.h>

#include "kernels/cpu/ops.h"
#include "kernels/random_init.h"

void cn_cpu_random_weights(float *dst, size_t n, uint64_t stream, float scale, float mean) {
  for (size_t i = 0; i < n; i++) {
    uint32_t bits = (uint32_t)cn_random_weight_bf16(stream, i, scale, mean) << 16;
    memcpy(dst + i, &bits, sizeof bits);
  }
}
