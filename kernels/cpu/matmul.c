/* y = x W^T through OpenBLAS: weights stay [out][in] as in the checkpoint, so no transpose
 * copy is made at load and one sgemm (or sgemv for a single row) streams W once. */
#include "kernels/cpu/ops.h"

#include <cblas.h>

void cn_cpu_matmul(float *y, const float *x, const float *w, const float *bias, int n, int in, int out) {
  if (n == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w, in, x, 1, 0.0f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
  }
  if (bias)
    for (int i = 0; i < n; i++)
      for (int j = 0; j < out; j++) y[(size_t)i * out + j] += bias[j];
}
