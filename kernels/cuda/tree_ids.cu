/* A speculative step's token ids chained between forwards without the host (model/forward.h,
 * token_src): the gather of a forward's tokens from an earlier forward's picks, greedy acceptance
 * of the verified tree on the device, and the events that order two models' streams. The CPU
 * twins are in kernels/cpu/tree_ids.c. */
#include <limits.h>
#include <stdlib.h>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/tree_batch.cuh"

#define IDS_THREADS 256

__global__ void gather_ids_kernel(int32_t *tokens, const int32_t *src, const int32_t *ids, int n) {
  cn_pdl_enter();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    if (src[i] >= 0) tokens[i] = ids[src[i]];
}

int cn_cuda_gather_ids(cn_cuda_ctx *ctx, int32_t *tokens, const int32_t *src, const int32_t *ids, int n) {
  CN_CUDA_ENTER(ctx);
  if (n < 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_gather_ids: n=%d", n);
  if (!n) return CANOPY_OK;
  CN_CUDA_CHECK(cn_launch(ctx, gather_ids_kernel, cn_grid_for(ctx, (size_t)n, IDS_THREADS), IDS_THREADS, 0, tokens,
                          src, ids, n));
  return CANOPY_OK;
}

/* Block s walks sequence s's tree: it finds where the sequence starts (the s-th node whose parent
 * is -1), and at each accepted node its threads look for the matching child together; the lowest
 * matching index wins (the CPU twin's first child in index order). */
__global__ void __launch_bounds__(IDS_THREADS)
    accept_greedy_kernel(int32_t *out, const int32_t *tokens, const int32_t *top, const int32_t *parent, int n) {
  cn_pdl_enter();
  __shared__ int first, end, next;
  if (threadIdx.x == 0) cn_tree_of_batch(parent, n, (int)blockIdx.x, &first, &end);
  __syncthreads();
  const int f = first, m = end - first;
  tokens += f, top += f, parent += f, out += 2 * blockIdx.x + 2 * f;
  int u = 0, a = 0;
  for (;;) {
    if (threadIdx.x == 0) next = INT_MAX;
    __syncthreads();
    int want = top[u];
    for (int c = u + 1 + (int)threadIdx.x; c < m; c += blockDim.x)
      if (parent[c] == u && tokens[c] == want) atomicMin(&next, c);
    __syncthreads();
    int v = next;
    __syncthreads(); /* everyone has read it before thread 0 resets it */
    if (v == INT_MAX) break;
    if (threadIdx.x == 0) {
      out[2 + a] = v;
      out[2 + m + a] = tokens[v];
    }
    a++;
    u = v;
  }
  if (threadIdx.x == 0) {
    out[0] = a;
    out[1] = top[u];
  }
}

int cn_cuda_accept_greedy(cn_cuda_ctx *ctx, int32_t *out, const int32_t *tokens, const int32_t *top,
                          const int32_t *parent, int n, int n_seqs) {
  CN_CUDA_ENTER(ctx);
  if (n < 1 || n_seqs < 1 || n_seqs > n)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_accept_greedy: %d trees of %d nodes in all", n_seqs, n);
  CN_CUDA_CHECK(cn_launch(ctx, accept_greedy_kernel, n_seqs, IDS_THREADS, 0, out, tokens, top, parent, n));
  return CANOPY_OK;
}

struct cn_cuda_event {
  int device;
  cudaEvent_t e;
};

int cn_cuda_event_create(cn_cuda_ctx *ctx, cn_cuda_event **out) {
  CN_CUDA_ENTER(ctx);
  cn_cuda_event *ev = (cn_cuda_event *)calloc(1, sizeof *ev);
  if (!ev) return cn_error(CANOPY_ERR_NO_MEMORY, "cn_cuda_event_create: out of host memory");
  ev->device = ctx->device;
  cudaError_t e = cudaEventCreateWithFlags(&ev->e, cudaEventDisableTiming);
  if (e != cudaSuccess) {
    free(ev);
    return cn_cuda_fail(e, __FILE__, __LINE__, "cudaEventCreateWithFlags");
  }
  *out = ev;
  return CANOPY_OK;
}

void cn_cuda_event_free(cn_cuda_event *ev) {
  if (!ev) return;
  (void)cudaSetDevice(ev->device);
  (void)cudaEventDestroy(ev->e);
  free(ev);
}

int cn_cuda_event_record(cn_cuda_ctx *ctx, cn_cuda_event *ev) {
  CN_CUDA_ENTER(ctx);
  CN_CUDA_CHECK(cudaEventRecord(ev->e, ctx->stream));
  return CANOPY_OK;
}

int cn_cuda_event_wait(cn_cuda_ctx *ctx, const cn_cuda_event *ev) {
  CN_CUDA_ENTER(ctx);
  CN_CUDA_CHECK(cudaStreamWaitEvent(ctx->stream, ev->e, 0));
  return CANOPY_OK;
}

int cn_cuda_event_sync(cn_cuda_event *ev) {
  CN_CUDA_CHECK(cudaEventSynchronize(ev->e));
  return CANOPY_OK;
}
