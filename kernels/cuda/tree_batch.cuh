/* A batch of token trees laid out one after the other, each starting at its root (parent -1), as
 * the acceptance kernels take them (kernels/cpu/ops.h, cn_cpu_accept_greedy). */
#ifndef CANOPY_KERNELS_CUDA_TREE_BATCH_CUH
#define CANOPY_KERNELS_CUDA_TREE_BATCH_CUH

#include <stdint.h>

/* [*first, *end): the nodes of tree `t` (the t-th root on) of a batch of n nodes. One thread's
 * walk; a kernel with a block a tree calls it from one thread and shares the result. */
__device__ __forceinline__ void cn_tree_of_batch(const int32_t *parent, int n, int t, int *first, int *end) {
  int f = 0;
  for (int seen = -1, i = 0; i < n; i++)
    if (parent[i] == -1 && ++seen == t) {
      f = i;
      break;
    }
  int e = f + 1;
  while (e < n && parent[e] != -1) e++;
  *first = f, *end = e;
}

#endif
