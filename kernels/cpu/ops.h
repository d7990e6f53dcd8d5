/* fp32 CPU ops: the reference every CUDA op is tested against. Nothing here knows about models:
 * shapes and pointers in, results out. Row-major throughout; "[n][d]" means n rows of d floats. */
#ifndef CANOPY_KERNELS_CPU_OPS_H
#define CANOPY_KERNELS_CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/tree_dyn.h"

typedef struct cn_threadpool cn_threadpool;

/* A fixed set of worker threads for the element-wise and attention ops. n_threads <= 1 runs
 * everything on the caller's thread. */
int cn_threadpool_create(int n_threads, cn_threadpool **out);
void cn_threadpool_free(cn_threadpool *tp);
int cn_threadpool_size(const cn_threadpool *tp);
/* Calls fn(arg, i) for i in [0, n) spread over the workers; returns when all are done. */
void cn_threadpool_run(cn_threadpool *tp, int n, void (*fn)(void *arg, int i), void *arg);

/* x[i] = table[tokens[i]]: x [n][dim], table [vocab][dim]. */
void cn_cpu_embed(float *x, const float *table, const int32_t *tokens, int n, int dim);

/* out[i] = x[i] / rms(x[i]) * w: x, out [n][dim] (may alias), w [dim]. */
void cn_cpu_rmsnorm(float *out, const float *x, const float *w, int n, int dim, float eps);

/* y = x W^T (+ bias): x [n][in], W [out][in], bias [out] or NULL, y [n][out]. Streams W once for
 * any n up to CN_SKINNY_MAX (decode, verification); OpenBLAS sgemm beyond. tp may be NULL. */
#define CN_SKINNY_MAX 32
void cn_cpu_matmul(cn_threadpool *tp, float *y, const float *x, const float *w, const float *bias, int n, int in,
                   int out);

/* Rotates each head of x [n][n_heads][head_dim] in place by its token's position, in the
 * "rotate_half" pairing of HF Llama (element i pairs with i + head_dim/2). inv_freq [head_dim/2]. */
void cn_cpu_rope(float *x, const int32_t *pos, int n, int n_heads, int head_dim,
                 const float *inv_freq);

/* out [n][d] = silu(gate) * up, reading gate_up [n][2d] as [gate | up]. */
void cn_cpu_swiglu(float *out, const float *gate_up, int n, int d);

/* x += y, both [n]. */
void cn_cpu_add(float *x, const float *y, size_t n);

/* The paged KV cache as the attention op sees it: per-layer base pointers are found through
 * block ids; row `r` of block `b` holds one token's [n_kv_heads * head_dim] keys (or values). */
typedef struct cn_cpu_paged_kv {
  float *const *k_blocks;   /* [n_blocks_in_table] block pointers for this layer's K */
  float *const *v_blocks;   /* same for V */
  int block_size;
} cn_cpu_paged_kv;

/* Writes n tokens' k, v [n][kv_dim] into cache slots first_slot .. first_slot + n - 1. */
void cn_cpu_kv_write(const cn_cpu_paged_kv *kv, int first_slot, const float *k, const float *v,
                     int n, int kv_dim);

/* Attention for one sequence. q [n][n_heads][head_dim], out same shape.
 * Past the ctx_len committed slots lie q_offset + n "new" slots: q_offset written by earlier
 * forwards of the same step (a draft tree's upper levels) and then this forward's n queries.
 * New slot j has rope position pos[j]; query i is new slot q_offset + i. Query i attends to every
 * slot s < ctx_len (whose position is s) and to new slot j when
 *   tree_mask == NULL: j <= q_offset + i (causal), else bit j of tree_mask[i * mask_words + j / 64]
 *   (one row per query, columns over all q_offset + n new slots).
 * sliding_window > 0 also drops keys at positions <= pos[q_offset + i] - sliding_window.
 * GQA: query head h reads kv head h / (n_heads / n_kv_heads). head_dim <= 256.
 * scratch: cn_threadpool_size(tp) * cn_cpu_attention_scratch_floats(...) floats, 64-byte aligned,
 * owned by the caller so a forward allocates nothing; NULL allocates it per call. */
typedef struct cn_cpu_attn_args {
  float *out;
  const float *q;
  const cn_cpu_paged_kv *kv;
  int n, ctx_len, q_offset;
  const int32_t *pos;
  const uint64_t *tree_mask;
  int mask_words;
  int n_heads, n_kv_heads, head_dim;
  int sliding_window;
  float scale;
  float *scratch;
} cn_cpu_attn_args;
void cn_cpu_attention(cn_threadpool *tp, const cn_cpu_attn_args *a);
/* Scratch floats per pool thread; independent of the token count and the context length. */
size_t cn_cpu_attention_scratch_floats(int n_heads, int n_kv_heads, int head_dim);

/* Index of the largest element (the first on ties, as torch.argmax). */
int cn_cpu_argmax(const float *x, int n);

/* The k largest elements of x [n] in descending order (equal values: the lower index first, so
 * ids[0] is cn_cpu_argmax), 1 <= k <= n: ids[k], and when logp is not NULL their log-softmax
 * x[i] - log(sum_j exp(x[j])) in logp[k]. A draft level needs no more than its top children. */
void cn_cpu_top_k(const float *x, int n, int k, int32_t *ids, float *logp);

/* The sampling rule of HF's logits processors: logits / T, keep the top_k largest (0: all), keep
 * the smallest prefix (by descending logit, ties to the lower id) whose mass reaches top_p,
 * renormalise. temperature 0 means argmax. */
typedef struct cn_sample_rule {
  float temperature;
  int top_k;
  float top_p;
} cn_sample_rule;

/* probs [V] = the rule's distribution over logits [V] (zeros outside the kept set); idx [V] and
 * prob [V] are scratch. */
void cn_cpu_sample_probs(const cn_sample_rule *r, const float *logits, int V, int32_t *idx, float *prob,
                         float *probs);

/* The token a uniform u in [0, 1) picks from dist [V]: the first id (in id order) whose running
 * sum of dist exceeds u, the running sum in double; the last kept id if rounding leaves u above
 * the total. */
int32_t cn_cpu_sample_draw(const float *dist, int V, double u);

/* Both: argmax when temperature == 0, else draw(probs(logits), u). dist [V] receives the
 * distribution; idx, prob [V] are scratch. */
int32_t cn_cpu_sample(const cn_sample_rule *r, const float *logits, int V, double u, int32_t *idx, float *prob,
                      float *dist);

/* dst[i] = element i of a random weight tensor (kernels/random_init.h): mean + scale * u with u
 * uniform on [-1, 1), rounded to bf16 and widened back, so it equals the device's bf16 copy. */
void cn_cpu_random_weights(float *dst, size_t n, uint64_t stream, float scale, float mean);

/* ---- a speculative step chained between forwards (model/forward.h, token_src) ------------------ */

/* tokens[i] = ids[src[i]] where src[i] >= 0; tokens[i] unchanged where src[i] < 0. */
void cn_cpu_gather_ids(int32_t *tokens, const int32_t *src, const int32_t *ids, int n);

/* Greedy acceptance of token trees, one a sequence of a batch of n nodes. A sequence's nodes are
 * consecutive and start with its root, the one node whose parent is -1; for the others parent[i]
 * is their parent's index inside the sequence, below their own. tokens[i] is node i's token, top[i]
 * the target's choice after node i's path. From the root, at node u the walk moves to u's first
 * child (in index order) whose token is top[u]; where there is none it stops, and top[u] is the
 * bonus token. The sequence starting at node f, the s-th, writes out[2 s + 2 f ..] [2 + 2 m] (m its
 * nodes): the accepted count a, the bonus, a accepted nodes (indices inside the sequence) in path
 * order, and from 2 + m on their tokens. For one sequence, the walk of cn_accept_greedy_top
 * (spec/accept.h) over arrays instead of a cn_tree. A node with parent -2 is in no tree (padding of
 * a fixed-shape tree, kernels/tree_dyn.h): never accepted. Returns the sequence count, or -1 (out
 * untouched) when n < 1, parent[0] != -1 or some parent is not -2 or in [-1, its index in its
 * sequence). */
int cn_cpu_accept_greedy(int32_t *out, const int32_t *tokens, const int32_t *top, const int32_t *parent, int n);

/* The layout the acceptance of a batch of trees takes (above): -1 when parent [n] is one, else the
 * first node that breaks it (0: no root at node 0, n < 1 included). */
int cn_cpu_tree_batch_bad(const int32_t *parent, int n);
/* The end of the tree that starts at root f: the next root, or n. */
int cn_cpu_tree_end(const int32_t *parent, int n, int f);

/* ---- sampled token trees (stochastic speculation) over arrays: kernels/cpu/tree_sampled.c ------- */

/* Up to k distinct tokens drawn from q [vocab] without replacement (Sequoia's drafting rule):
 * draw j is from q with the earlier draws removed and renormalised, by inverse CDF in id order
 * with the uniform u[j]. Entries <= 0 (or NaN) are never drawn. out [k] receives the draws in
 * order; when q has fewer than k positive entries the rest of out repeats out[0] (0 if there is
 * none), which acceptance skips (a repeat has no mass left). Returns how many were drawn.
 * scratch: [vocab] floats. */
int cn_cpu_draw_distinct(const float *q, int vocab, int k, const double *u, int32_t *out, float *scratch);

/* The processed target distribution of a node ([vocab]), asked for only when the walk visits it;
 * returns CANOPY_OK or a status (with cn_error). */
typedef int (*cn_cpu_row_fn)(void *ctx, int node, const float **row);

/* Stochastic acceptance of one token tree of n nodes (node 0 the root; parent[c] < c, or -2 for
 * a node in no tree; the children of u are the nodes with parent u, in index order = draw
 * order): at node u with target row p_row(u) and draft q_of[u] (the distribution its children
 * were drawn from, NULL for a node without children), children are tried in order, child c
 * accepted with probability min(1, r(x)/q(x)) decided by u[2 c], else r = norm(max(r - q, 0))
 * and q loses x; if none is accepted the bonus is drawn from r with u[2 u + 1]. accepted
 * [depth] receives the accepted nodes in path order. scratch: [2 vocab]. Returns CANOPY_OK or a
 * status naming the node (no row, no q for a node with children, a row without mass). */
int cn_cpu_accept_sampled_walk(const int32_t *token, const int32_t *parent, int n, int vocab, cn_cpu_row_fn p_row,
                               void *ctx, const float *const *q_of, const double *u, float *scratch,
                               int32_t *accepted, int *n_accepted, int32_t *bonus);

/* The walk for every tree of a batch of n nodes, laid out as cn_cpu_accept_greedy's (parents
 * inside their sequence, each sequence starting at its root) and with its output format: p_row
 * gives the processed target row of batch node i, q [n] node i's draft row or NULL, u [2 n] (u[2 i]
 * tests node i, u[2 i + 1] draws the bonus at node i). Returns the sequence count or a negative
 * status. */
int cn_cpu_accept_sampled(int32_t *out, const int32_t *tokens, const int32_t *parent, int n, cn_cpu_row_fn p_row,
                          void *ctx, const float *const *q, const double *u, int vocab, float *scratch);

/* ---- a dynamic (EAGLE-2) tree grown where the picks are (kernels/tree_dyn.h) ------------------- */

/* After draft level `level`'s forward (0: the catch-up's root row): top/logp [rows][k] (k >= K) are
 * the best ids of each of the level's fed nodes, in order (1 row at level 0, K after). Expands
 * them into candidates, then readies level + 1's fed nodes, or after the last level writes the
 * verification tree (t_*). Level 0 starts a new tree. Returns 0, or -1 if the kept nodes were not
 * closed under ancestors (an internal error). */
int cn_cpu_dyn_grow(int32_t *w, const cn_dyn_layout *l, int level, const int32_t *top, const float *logp, int k);

/* The tree part of a forward from the state: draft level `level` >= 1 (K tokens after (level - 1) K
 * tree slots: mask [K][words of level K], pos [K], tree_pos [level K] of every slot, tokens [K] the
 * fed nodes') or, level -1, the verification (T tokens: mask [T][words of T], pos [T], parent [T]:
 * -1 the root, -2 padding; tokens [T] but the root's). pos0 is the root's position; tokens may be
 * NULL. */
void cn_cpu_dyn_stage(const int32_t *w, const cn_dyn_layout *l, int level, int pos0, uint64_t *mask, int32_t *pos,
                      int32_t *tree_pos, int32_t *parent, int32_t *tokens);

#endif
