/* CUDA graphs of the context's stream: what the ops queue between capture_begin and capture_end
 * is recorded instead of run, and a launch replays it as one submission (no per-kernel launch
 * cost on the host). A captured graph holds its kernels' arguments, pointers included, by value. */
#include <stdlib.h>

#include "kernels/cuda/cuda_common.cuh"

struct cn_cuda_graph {
  cudaGraphExec_t exec;
};

int cn_cuda_capture_begin(cn_cuda_ctx *ctx) {
  CN_CUDA_ENTER(ctx);
  /* Relaxed: cuBLAS and the attention launcher make non-stream calls (attributes, queries) while
   * recording; anything that would synchronise the stream still fails the capture. */
  CN_CUDA_CHECK(cudaStreamBeginCapture(ctx->stream, cudaStreamCaptureModeRelaxed));
  return CANOPY_OK;
}

int cn_cuda_capture_end(cn_cuda_ctx *ctx, cn_cuda_graph **out) {
  if (!out) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_capture_end: NULL out");
  *out = NULL;
  CN_CUDA_ENTER(ctx);
  cudaGraph_t graph = NULL;
  cudaError_t e = cudaStreamEndCapture(ctx->stream, &graph);
  cudaGraphExec_t exec = NULL;
  if (e == cudaSuccess) e = cudaGraphInstantiate(&exec, graph, 0);
  if (graph) (void)cudaGraphDestroy(graph);
  CN_CUDA_CHECK(e);
  cn_cuda_graph *g = (cn_cuda_graph *)malloc(sizeof *g);
  if (!g) {
    (void)cudaGraphExecDestroy(exec);
    return cn_error(CANOPY_ERR_NO_MEMORY, "cuda: no host memory for a graph");
  }
  g->exec = exec;
  *out = g;
  return CANOPY_OK;
}

int cn_cuda_graph_launch(cn_cuda_ctx *ctx, const cn_cuda_graph *g) {
  CN_CUDA_ENTER(ctx);
  if (!g) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_cuda_graph_launch: NULL graph");
  CN_CUDA_CHECK(cudaGraphLaunch(g->exec, ctx->stream));
  return CANOPY_OK;
}

void cn_cuda_graph_free(cn_cuda_graph *g) {
  if (!g) return;
  (void)cudaGraphExecDestroy(g->exec);
  (void)cudaGetLastError();
  free(g);
}

unsigned cn_cuda_scratch_gen(const cn_cuda_ctx *ctx) { return ctx ? ctx->scratch_gen : 0; }
