/* The seam between the model and the hardware (DESIGN.md, "Backends"): the forward is written
 * once over this table. Weights are backend-owned opaque pointers; activations are backend
 * buffers of fp32 (host memory on the CPU, device memory on CUDA). Index arrays handed to the
 * ops (tokens, positions, tree masks, logit rows, inv_freq) and the sequences' block tables are
 * host memory: a device backend copies them over itself. */
#ifndef CANOPY_MODEL_BACKEND_H
#define CANOPY_MODEL_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "cache/kv_cache.h"
#include "kernels/cpu/ops.h"
#include "model/safetensors.h"

/* One sequence's attention in one layer (the semantics of cn_cpu_attention in kernels/cpu/ops.h):
 * ctx_len committed slots, then q_offset slots an earlier forward of this step wrote, then the n
 * queries' own slots. */
typedef struct cn_attn_desc {
  cn_kv_pool *pool;
  const cn_kv_seq *seq;
  int layer;
  int ctx_len, q_offset, n;
  const int32_t *pos;          /* [q_offset + n] rope positions of the new slots */
  const uint64_t *tree_mask;   /* NULL: causal; else [n][(q_offset + n + 63) / 64] */
  int n_heads, n_kv_heads, head_dim, sliding_window;
  float scale;
} cn_attn_desc;

/* LM-head rows per GEMM in the forward: bounds the logits scratch to CN_LOGIT_CHUNK x vocab. */
#define CN_LOGIT_CHUNK 64

/* Everything a forward reads from the host, handed to `begin` before its first op, so that a
 * device backend can upload it at once (one copy to fixed device addresses) and replay a captured
 * graph of the forward instead of running the ops. The ops still receive the same host pointers
 * and find their device copies by address. */
typedef struct cn_fwd_io {
  int n_tokens;
  const int32_t *tokens, *pos; /* [n_tokens] */
  int n_logits;
  const int32_t *logit_rows;   /* [n_logits] */
  int32_t *top;                /* [n_logits][top_k] host: top ids wanted (then logits is NULL) */
  int top_k;                   /* >= 1 */
  float *top_logp;             /* [n_logits][top_k] host, or NULL: their log-softmax */
  int sample;                  /* top receives sampled ids under `rule`: sample_rows, or with q_out
                                * a sampled tree level's draws (draw_rows) */
  float *logits;               /* [n_logits][vocab] host, when top is NULL */
  int vocab;
  int n_seqs;
  const struct cn_attn_desc *desc; /* [n_seqs] layer 0's attention; later layers differ in .layer only */
  const float *inv_freq;       /* [head_dim / 2] */
  /* Chained forwards (model/forward.h): the batch's fields, the ids buffers as ids_create made
   * them. A backend with begin resolves token_src there and fills top_ids in `end`. */
  const int32_t *token_src;
  const void *src_ids;
  void *top_ids;
  int top_ids_at;
  const int32_t *accept_parent;
  int32_t *accept_out;
  int n_dyn;                     /* the batch's dynamic trees (model/forward.h); ids as ids_create made them */
  const struct cn_dyn_step *dyn;
  /* Sampled trees (model/forward.h): the batch's fields; rows are backend addresses. */
  const double *u;               /* [n_logits][top_k] with sample */
  float *const *q_out;           /* [n_logits] */
  const cn_sample_rule *rule;    /* with sample: the rule of its ids */
  const cn_sample_rule *accept_sample;
  float *const *accept_q;
  const double *accept_u;
  float *accept_rows;
} cn_fwd_io;

typedef struct cn_backend {
  const char *name;
  size_t weight_elem_bytes;        /* bytes of one weight element: 4 (fp32 CPU), 2 (bf16 CUDA) */
  const cn_kv_storage *kv_storage; /* where the KV pool lives; NULL: host fp32. Its ctx is the backend's */
  void (*destroy)(void *ctx);
  /* Optional (NULL on the CPU): called before the first op of each forward, and after the last
   * one. The ops return nothing; a device backend keeps the first failure and `end` returns it.
   * `begin` sets *replayed when it has already queued the whole forward (a CUDA graph captured
   * from an earlier forward of the same shape): the forward then calls no op and goes to `end`,
   * which delivers the outputs io names. A backend that replays assumes the op sequence is a
   * function of the shape: a caller that swaps ops in the table must drop its graphs first. */
  int (*begin)(void *ctx, const cn_fwd_io *io, int *replayed);
  int (*end)(void *ctx);
  /* Sizes per-sequence scratch for block tables of up to max_blocks blocks. */
  int (*reserve)(void *ctx, int max_blocks);
  void *(*alloc)(void *ctx, size_t bytes);
  void (*release)(void *ctx, void *p);
  /* Uploads rows of a checkpoint tensor (converted to the backend's weight dtype) into a
   * weight buffer at element offset `at`: used to fuse q/k/v and gate/up into one matrix. */
  int (*load)(void *ctx, void *dst, size_t at, const cn_st_tensor *t);
  /* Fills n weight elements at element offset `at` with random values (kernels/random_init.h),
   * the same on every backend: models without a checkpoint (--random-weights). */
  int (*random)(void *ctx, void *dst, size_t at, size_t n, uint64_t stream, float scale, float mean);

  void (*embed)(void *ctx, void *x, const void *table, const int32_t *tokens, int n, int dim);
  void (*rmsnorm)(void *ctx, void *out, const void *x, const void *w, int n, int dim, float eps);
  void (*matmul)(void *ctx, void *y, const void *x, const void *w, const void *bias, int n, int in, int out);
  void (*rope)(void *ctx, void *x, const int32_t *pos, int n, int n_heads, int head_dim, const float *inv_freq);
  void (*swiglu)(void *ctx, void *out, const void *gate_up, int n, int d);
  void (*add)(void *ctx, void *x, const void *y, size_t n);
  /* Splits fused projections qkv [n][q_dim + 2 kv_dim] into q [n][q_dim], k, v [n][kv_dim]. */
  void (*split_qkv)(void *ctx, void *q, void *k, void *v, const void *qkv, int n, int q_dim, int kv_dim);
  /* Copies rows [first, first + n) of a [*][dim] activation buffer, one per index in `rows`. */
  void (*gather_rows)(void *ctx, void *dst, const void *src, const int32_t *rows, int n, int dim);
  /* Optional: kv_write for every sequence of the forward in one call (d as attention_batch gets it;
   * k, v hold the sequences' rows in batch order; d[s] goes to slots ctx_len + q_offset..). */
  void (*kv_write_batch)(void *ctx, const struct cn_attn_desc *d, int n_seqs, const void *k, const void *v, int kv_dim);
  /* Writes k, v [n][kv_dim] of one layer into cache slots first_slot.. of a sequence. */
  void (*kv_write)(void *ctx, cn_kv_pool *pool, const cn_kv_seq *seq, int layer, int first_slot,
                   const void *k, const void *v, int n, int kv_dim);
  /* Attention of n_seqs sequences' new tokens over their caches, all in one layer of one pool
   * (d[s] as cn_attn_desc says): q and out hold the sequences' rows one after the other, sequence
   * s from row d[0].n + .. + d[s - 1].n (the forward's row order). One call per layer, so a device
   * backend runs the whole batch in one launch. */
  void (*attention_batch)(void *ctx, void *out, const void *q, const struct cn_attn_desc *d, int n_seqs);
  /* Optional fused forms (NULL: the forward runs the separate ops above; a device backend fills
   * them to save launches and passes over the activations). Same results up to rounding:
   *   norm_matmul: y = rmsnorm(x, norm_w) W^T + bias
   *   matmul_add:  x += a W^T + bias                     (x [n][out] the residual stream)
   *   ffn:         x += swiglu(rmsnorm(x, norm_w) W_gu^T + b_gu) W_down^T + b_down, the whole
   *                feed-forward block (W_gu [2 d][dim] = [gate | up]); gate_up [n][2 d] is
   *                workspace the backend may use
   *   qkv_rope:    split_qkv, then rope on q and on k
   *   qkv_rope_kv: qkv_rope, then kv_write_batch of k and v (d, n_seqs as it takes them): k and
   *                v go to the cache only
   *   norm_qkv_rope_kv: norm_matmul into qkv (workspace the backend may use), then qkv_rope_kv:
   *                the attention's inputs from the residual stream x */
  void (*norm_matmul)(void *ctx, void *y, const void *x, const void *norm_w, float eps, const void *w, const void *bias,
                      int n, int in, int out);
  void (*matmul_add)(void *ctx, void *x, const void *a, const void *w, const void *bias, int n, int in, int out);
  void (*ffn)(void *ctx, void *x, void *gate_up, const void *norm_w, float eps, const void *w_gu, const void *b_gu,
              const void *w_down, const void *b_down, int n, int dim, int d);
  void (*qkv_rope)(void *ctx, void *q, void *k, void *v, const void *qkv, const int32_t *pos, int n, int n_heads,
                   int n_kv_heads, int head_dim, const float *inv_freq);
  void (*qkv_rope_kv)(void *ctx, void *q, const void *qkv, const int32_t *pos, const struct cn_attn_desc *d,
                      int n_seqs, int n, int n_heads, int n_kv_heads, int head_dim, const float *inv_freq);
  void (*norm_qkv_rope_kv)(void *ctx, void *q, void *qkv, const void *x, const void *norm_w, float eps, const void *w,
                           const void *bias, int in, const int32_t *pos, const struct cn_attn_desc *d, int n_seqs,
                           int n, int n_heads, int n_kv_heads, int head_dim, const float *inv_freq);
  /* Copies n floats of a backend buffer to the host. */
  void (*to_host)(void *ctx, float *dst, const void *src, size_t n);
  /* For rows r < rows of a [rows][vocab] logits buffer: host ids [rows][k] = the k largest of
   * the row in descending order (cn_cpu_top_k's order; k = 1 is the argmax, the first on ties)
   * and, when logp is not NULL, host logp [rows][k] their log-softmax. At most 64 rows and
   * k <= 32 per call; only these cross to the host. */
  void (*top_rows)(void *ctx, int32_t *ids, float *logp, const void *logits, int rows, int vocab, int k);
  /* Host ids[r] = the token cn_cpu_sample's rule draws from row r < rows with the uniform u[r]
   * (host [rows]), at most 64 rows per call; only the ids cross to the host (the CUDA backend sorts
   * and draws on the device, kernels/cuda/sample.cu; the CPU backend runs cn_cpu_sample itself).
   * Returns a status (a device backend also keeps it for `end`). */
  int (*sample_rows)(void *ctx, int32_t *ids, const void *logits, int rows, int vocab, const cn_sample_rule *rule,
                     const double *u);
  /* Sampled trees (kernels/cpu/tree_sampled.c), all three or none. draw_rows: for rows r < rows
   * (at most 64 a call) of logits, q_out[r] (a backend row, or NULL: scratch) = the rule's
   * distribution (cn_cpu_sample_probs) and host ids [rows][k] = k draws without replacement from
   * it with u[r k + j] (cn_cpu_draw_distinct). probs_rows: dst [rows][vocab] (backend memory) =
   * what accept_sampled reads of those rows: the rule's distributions (CUDA), or the logits (CPU,
   * which processes only the rows the walk visits, as the host path does). accept_sampled:
   * cn_cpu_accept_sampled over the forward's tokens (token_src resolved) under the rule, with p the
   * forward's [n][vocab] rows from probs_rows, q [n] host pointers to backend rows, u host [2 n],
   * scratch (backend) [2 n_seqs][vocab]; out host. Each returns a status (a device backend also
   * keeps it for `end`). */
  int (*draw_rows)(void *ctx, int32_t *ids, float *const *q_out, const void *logits, int rows, int vocab,
                   const cn_sample_rule *rule, const double *u, int k);
  int (*probs_rows)(void *ctx, float *dst, const void *logits, int rows, int vocab, const cn_sample_rule *rule);
  int (*accept_sampled)(void *ctx, int32_t *out, const int32_t *tokens, const int32_t *parent, int n, const float *p,
                        float *const *q, const double *u, int vocab, float *scratch, const cn_sample_rule *rule);
  /* Chained forwards (model/forward.h, cn_ids), all three or none: a buffer of n int32 ids in
   * backend memory, NULL on failure (with cn_error); on the CPU (host_ids set) a plain host array,
   * which the forward itself reads for token_src and writes for top_ids. */
  void *(*ids_create)(void *ctx, int n);
  void (*ids_free)(void *ctx, void *ids);
  /* Greedy acceptance over the forward's tokens (token_src resolved) and its top ids, a tree a
   * sequence (cn_cpu_accept_greedy): out host [2 n_seqs + 2 n], tokens and top the forward's host
   * arrays (a device backend finds its copies), parent host [n], already checked. */
  void (*accept_greedy)(void *ctx, int32_t *out, const int32_t *tokens, const int32_t *top, const int32_t *parent,
                        int n);
  int host_ids; /* ids are host memory: the forward resolves token_src and fills top_ids itself */
  /* Whether forwards of a model with heads of head_dim grow and stage dynamic trees (cn_batch.dyn);
   * NULL: never. host_ids backends do it in the forward. */
  int (*dyn_trees)(int head_dim);
} cn_backend;

/* The fp32 CPU backend with `n_threads` workers (0 = all online cores). */
int cn_backend_cpu_create(int n_threads, const cn_backend **be, void **ctx);

/* The CUDA backend on device `device`: bf16 weights and KV, fp32 activations. CANOPY_ERR_DEVICE
 * when no such device is visible or canopy was built without CUDA. With the environment variable
 * CANOPY_CUDA_BATCH_INVARIANT=1 at creation, GEMMs run padded to a fixed row bucket
 * (cn_cuda_set_batch_invariant) and tree attention with one key split, so that a token's logits
 * depend less on how many rows its forward holds (a diagnostic and a losslessness aid for greedy
 * speculation; it costs speed). */
int cn_backend_cuda_create(int device, const cn_backend **be, void **ctx);

/* CUDA graphs of a CUDA backend context: up to max_graphs forwards kept captured (least recently
 * used dropped first), 0 = never capture (every forward launches its ops). Drops the graphs held
 * so far. Without CUDA, or for another backend, does nothing. */
void cn_backend_cuda_set_graphs(const cn_backend *be, void *ctx, int max_graphs);

/* Forwards of a CUDA backend context so far that replayed a graph, and graphs captured. */
void cn_backend_cuda_graph_stats(const cn_backend *be, void *ctx, long *replays, long *captures);

/* The cn_cuda_ctx (kernels/cuda/cuda_ops.h) a CUDA backend context runs on, for benchmarks that
 * time on its stream; NULL for other backends' contexts or without CUDA. */
struct cn_cuda_ctx *cn_backend_cuda_ctx(const cn_backend *be, void *ctx);

#endif
