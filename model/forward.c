/* The transformer forward, written once over the backend table (llama2.c's forward, batched):
 * embed -> [RMSNorm -> QKV -> RoPE -> paged attention -> O -> residual ->
 *           RMSNorm -> gate/up -> SwiGLU -> down -> residual] x L -> RMSNorm -> LM head. */
#include "model/forward.h"

#include <math.h>
#include <string.h>

#include "common/error.h"

#define LOGIT_CHUNK CN_LOGIT_CHUNK

/* ---- chained forwards (cn_ids) ---------------------------------------------------------------- */

int cn_ids_create(canopy_model *m, int n, cn_ids *out) {
  *out = (cn_ids){0};
  if (!m->be->ids_create)
    return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: the %s backend cannot chain forwards", m->dir, m->be->name);
  if (n <= 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_ids_create: %d ids", n);
  if (!(out->buf = m->be->ids_create(m->be_ctx, n))) return cn_error_wrap(CANOPY_ERR_NO_MEMORY, "%s: %d ids", m->dir, n);
  out->n = n;
  return CANOPY_OK;
}

void cn_ids_free(canopy_model *m, cn_ids *ids) {
  if (ids && ids->buf) m->be->ids_free(m->be_ctx, ids->buf);
  if (ids) *ids = (cn_ids){0};
}

int cn_rows_create(canopy_model *m, int rows, cn_rows *out) {
  *out = (cn_rows){0};
  size_t bytes = sizeof(float) * (size_t)(rows > 0 ? rows : 0) * (size_t)m->cfg.vocab_size;
  if (!m->be->ids_create)
    return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: the %s backend cannot chain forwards", m->dir, m->be->name);
  if (rows <= 0) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_rows_create: %d rows", rows);
  if (!(out->buf = m->be->alloc(m->be_ctx, bytes)))
    return cn_error(CANOPY_ERR_NO_MEMORY, "%s: %d rows of %d probabilities (%zu bytes) on the %s backend", m->dir, rows,
                    m->cfg.vocab_size, bytes, m->be->name);
  out->rows = rows;
  out->vocab = m->cfg.vocab_size;
  return CANOPY_OK;
}

void cn_rows_free(canopy_model *m, cn_rows *r) {
  if (r && r->buf) m->be->release(m->be_ctx, r->buf);
  if (r) *r = (cn_rows){0};
}

int cn_rows_reserve(canopy_model *m, cn_rows *r, int rows) {
  if (r->buf && r->rows >= rows) return CANOPY_OK;
  cn_rows_free(m, r);
  return cn_rows_create(m, rows, r);
}

/* A sampled acceptance's inputs (model/forward.h, accept_sample): the target's distributions go
 * to accept_rows, each node with children names its draft row, each decision has its uniform. */
static int check_accept_sampled(canopy_model *m, const cn_batch *b) {
  const cn_rows *r = b->accept_rows;
  if (!m->be->accept_sampled)
    return cn_error(CANOPY_ERR_UNSUPPORTED, "forward: the %s backend cannot accept sampled trees", m->be->name);
  if (b->top || !b->accept_q || !b->accept_u || !r || !r->buf || r->vocab != m->cfg.vocab_size ||
      r->rows < b->n_tokens + 2 * b->n_seqs)
    return cn_error(CANOPY_ERR_INVALID_ARG, "forward: sampled acceptance needs no top ids, accept_q, accept_u and "
                    "accept_rows of %d rows of %d (has %d of %d)", b->n_tokens + 2 * b->n_seqs, m->cfg.vocab_size,
                    r ? r->rows : 0, r ? r->vocab : 0);
  for (int i = 0; i < 2 * b->n_tokens; i++)
    if (!(b->accept_u[i] >= 0 && b->accept_u[i] < 1))
      return cn_error(CANOPY_ERR_INVALID_ARG, "forward: accept_u[%d] = %g is not in [0, 1)", i, b->accept_u[i]);
  return CANOPY_OK;
}

/* token_src, top_ids and accept_parent (model/forward.h): every index inside its buffer, the
 * acceptance tree well formed. Ids themselves are checked where they are made (top ids of a
 * forward of a model with this vocabulary). */
static int check_chained(canopy_model *m, const cn_batch *b) {
  if (!m->be->ids_create)
    return cn_error(CANOPY_ERR_UNSUPPORTED, "forward: the %s backend cannot chain forwards", m->be->name);
  if (b->token_src) {
    if (!b->src_ids || !b->src_ids->buf) return cn_error(CANOPY_ERR_INVALID_ARG, "forward: token_src without src_ids");
    for (int i = 0; i < b->n_tokens; i++)
      if (b->token_src[i] >= b->src_ids->n)
        return cn_error(CANOPY_ERR_INVALID_ARG, "forward: token_src[%d] = %d is outside the %d ids", i, b->token_src[i],
                        b->src_ids->n);
  }
  int k = b->top_k > 0 ? b->top_k : 1;
  if (b->top_ids && (!b->top || (b->sample && !b->q_out) || !b->top_ids->buf || b->top_ids_at < 0 ||
                     b->top_ids_at + (int64_t)b->n_logits * k > b->top_ids->n))
    return cn_error(CANOPY_ERR_INVALID_ARG, "forward: top ids [%d][%d] at %d do not fit %d ids (or no top)",
                    b->n_logits, k, b->top_ids_at, b->top_ids ? b->top_ids->n : 0);
  if (b->accept_parent) {
    int st = b->accept_sample ? check_accept_sampled(m, b) : CANOPY_OK;
    if (st) return st;
    if ((!b->accept_sample && (!b->top || b->sample || k != 1 || b->top_logp)) || !b->accept_out ||
        b->n_logits != b->n_tokens)
      return cn_error(CANOPY_ERR_INVALID_ARG, "forward: acceptance needs every token's logit row and %s",
                      b->accept_sample ? "accept_out" : "top id");
    /* A root exactly at each sequence's first token, every other parent inside its sequence. */
    for (int q = 0, i = 0; q < b->n_seqs; q++)
      for (int f = b->seqs[q].first; i < f + b->seqs[q].n && i < b->n_tokens; i++) {
        int p = b->accept_parent[i];
        if (b->logit_rows[i] != i || (i == f ? p != -1 : p < 0 || p >= i - f))
          return cn_error(CANOPY_ERR_INVALID_ARG,
                          "forward: acceptance tree: node %d (sequence %d) has parent %d (or logit row %d)", i, q, p,
                          b->logit_rows[i]);
      }
  }
  return CANOPY_OK;
}

/* A dynamic tree's part of a forward (cn_dyn_step): its sequence, the shapes its layout fixes, its
 * logit rows, and the arrays it stages being the batch's own. */
static int check_dyn(const cn_batch *b, const cn_dyn_step *d, int i) {
  const cn_dyn_layout *l = d->layout;
  if (!l || !d->ids || !d->ids->buf || d->ids->n < l->words || d->seq < 0 || d->seq >= b->n_seqs)
    return cn_error(CANOPY_ERR_INVALID_ARG, "forward: dynamic tree %d needs its layout, ids of %d words and a "
                    "sequence of the batch (%d)", i, l ? l->words : 0, d->seq);
  for (int j = 0; j < i; j++)
    if (b->dyn[j].seq == d->seq)
      return cn_error(CANOPY_ERR_INVALID_ARG, "forward: dynamic trees %d and %d share sequence %d", j, i, d->seq);
  const cn_seq_batch *sb = &b->seqs[d->seq];
  int f = sb->first, rows = d->grow == 1 ? 1 : l->K, rows_ok = d->row >= 0 && d->row + rows <= b->n_logits;
  for (int r = 0; rows_ok && r < rows; r++)
    rows_ok = b->logit_rows[d->row + r] == (d->grow == 1 ? f + sb->n - 1 : f + r);
  if (d->grow && (d->grow > l->D || !b->top || !b->top_logp || b->sample || b->top_k < l->K || !rows_ok ||
                  (d->grow > 1 && sb->n != l->K)))
    return cn_error(CANOPY_ERR_INVALID_ARG, "forward: growing level %d of dynamic tree %d needs %d logit rows (from %d) "
                    "of the top %d ids and log-probabilities of its sequence's tokens", d->grow - 1, i, rows, d->row,
                    l->K);
  int level = d->stage > 0, verify = d->stage == -1;
  if ((level && (d->stage >= l->D || sb->n != l->K || sb->tree_prev != (d->stage - 1) * l->K ||
                 (sb->tree_prev && sb->tree_pos != d->tree_pos))) ||
      (verify && (sb->n != l->T || sb->tree_prev || !b->accept_parent || d->parent != b->accept_parent + f ||
                  !d->tree_out)) ||
      ((level || verify) && (!d->mask || sb->tree_mask != d->mask || d->pos != b->pos + f)) ||
      (!level && !verify && d->stage))
    return cn_error(CANOPY_ERR_INVALID_ARG, "forward: staging %s %d of dynamic tree %d (K %d, T %d): %d tokens after "
                    "%d, or arrays not the batch's", verify ? "the verification, stage" : "level", d->stage, i, l->K,
                    l->T, sb->n, sb->tree_prev);
  return CANOPY_OK;
}

static int check_dyns(canopy_model *m, const cn_batch *b) {
  if (!m->be->dyn_trees || !m->be->dyn_trees(m->cfg.head_dim))
    return cn_error(CANOPY_ERR_UNSUPPORTED, "forward: the %s backend cannot grow dynamic trees for heads of %d",
                    m->be->name, m->cfg.head_dim);
  if (!b->dyn || b->n_dyn > b->n_seqs)
    return cn_error(CANOPY_ERR_INVALID_ARG, "forward: %d dynamic trees for %d sequences", b->n_dyn, b->n_seqs);
  int st = CANOPY_OK;
  for (int i = 0; !st && i < b->n_dyn; i++) st = check_dyn(b, &b->dyn[i], i);
  return st;
}

static int check_batch(canopy_model *m, const cn_batch *b) {
  const cn_config *c = &m->cfg;
  if (b->n_tokens <= 0 || b->n_tokens > m->max_batch)
    return cn_error(CANOPY_ERR_INVALID_ARG, "forward: %d tokens in a batch (1..%d allowed)", b->n_tokens, m->max_batch);
  for (int i = 0; i < b->n_tokens; i++)
    if ((!b->token_src || b->token_src[i] < 0) && (b->tokens[i] < 0 || b->tokens[i] >= c->vocab_size))
      return cn_error(CANOPY_ERR_INVALID_ARG, "forward: token id %d at batch index %d is outside the vocabulary (%d)",
                      b->tokens[i], i, c->vocab_size);
  int covered = 0;
  for (int s = 0; s < b->n_seqs; s++) {
    const cn_seq_batch *sb = &b->seqs[s];
    if (sb->first != covered || sb->n <= 0)
      return cn_error(CANOPY_ERR_INVALID_ARG, "forward: sequence %d covers tokens [%d, %d), expected to start at %d",
                      s, sb->first, sb->first + sb->n, covered);
    covered += sb->n;
    int len = cn_kv_seq_len(sb->kv);
    if (sb->tree_prev < 0 || (sb->tree_prev > 0 && !sb->tree_pos))
      return cn_error(CANOPY_ERR_INVALID_ARG, "forward: sequence %d: tree_prev %d needs tree_pos", s, sb->tree_prev);
    if (len + sb->tree_prev + sb->n > m->max_context)
      return cn_error(CANOPY_ERR_CONTEXT, "sequence of %d tokens plus %d new exceeds the context length %d", len,
                      sb->tree_prev + sb->n, m->max_context);
  }
  if (covered != b->n_tokens)
    return cn_error(CANOPY_ERR_INVALID_ARG, "forward: sequences cover %d of %d tokens", covered, b->n_tokens);
  if (b->top && (b->top_k < 0 || b->top_k > 32 || b->top_k > c->vocab_size))
    return cn_error(CANOPY_ERR_INVALID_ARG, "forward: top_k %d (0..%d allowed)", b->top_k,
                    c->vocab_size < 32 ? c->vocab_size : 32);
  for (int i = 0; i < b->n_logits; i++)
    if (b->logit_rows[i] < 0 || b->logit_rows[i] >= b->n_tokens)
      return cn_error(CANOPY_ERR_INVALID_ARG, "forward: logit row %d is outside the batch", b->logit_rows[i]);
  if (b->sample && (!b->top || !b->u))
    return cn_error(CANOPY_ERR_INVALID_ARG, "forward: sampling in the forward needs top and u");
  if ((b->q_out && (!b->sample || !m->be->draw_rows)) || (b->sample && b->top_k > 1 && !b->q_out))
    return cn_error(CANOPY_ERR_INVALID_ARG, "forward: draws of a sampled tree need sample and q_out (and a backend "
                    "that draws them: %s)", m->be->draw_rows ? "yes" : "no");
  if (b->accept_sample && !b->accept_parent)
    return cn_error(CANOPY_ERR_INVALID_ARG, "forward: accept_sample without accept_parent");
  for (int i = 0; b->sample && i < b->n_logits * (b->top_k > 0 ? b->top_k : 1); i++)
    if (!(b->u[i] >= 0 && b->u[i] < 1))
      return cn_error(CANOPY_ERR_INVALID_ARG, "forward: u[%d] = %g is not in [0, 1)", i, b->u[i]);
  int st = b->token_src || b->top_ids || b->accept_parent ? check_chained(m, b) : CANOPY_OK;
  return !st && b->n_dyn ? check_dyns(m, b) : st;
}

/* Undoes the reservations of sequences [0, n) (truncating to the current length releases them). */
static void unreserve(const cn_batch *b, int n) {
  for (int r = 0; r < n; r++) cn_kv_seq_truncate(b->seqs[r].kv, cn_kv_seq_len(b->seqs[r].kv));
}

/* Reserves cache slots for every sequence, all or nothing, so a failed forward leaves no trace. */
static int reserve_all(const cn_batch *b) {
  for (int s = 0; s < b->n_seqs; s++) {
    int st = cn_kv_seq_reserve(b->seqs[s].kv, b->seqs[s].tree_prev + b->seqs[s].n);
    if (st) {
      unreserve(b, s);
      return st;
    }
  }
  return CANOPY_OK;
}

/* ---- the fused forms where the backend has them, else the separate ops ------------------------ */

/* y = rmsnorm(x) W^T + bias (through s->xn when unfused; x may be s->xn). */
static void norm_matmul(canopy_model *m, void *y, const void *x, const void *norm_w, const void *w, const void *bias,
                        int n, int in, int out) {
  const cn_backend *be = m->be;
  float eps = m->cfg.rms_norm_eps;
  if (be->norm_matmul) {
    be->norm_matmul(m->be_ctx, y, x, norm_w, eps, w, bias, n, in, out);
    return;
  }
  be->rmsnorm(m->be_ctx, m->s.xn, x, norm_w, n, in, eps);
  be->matmul(m->be_ctx, y, m->s.xn, w, bias, n, in, out);
}

/* x += a W^T + bias (through s->proj when unfused). */
static void matmul_add(canopy_model *m, void *x, const void *a, const void *w, const void *bias, int n, int in,
                       int out) {
  const cn_backend *be = m->be;
  if (be->matmul_add) {
    be->matmul_add(m->be_ctx, x, a, w, bias, n, in, out);
    return;
  }
  be->matmul(m->be_ctx, m->s.proj, a, w, bias, n, in, out);
  be->add(m->be_ctx, x, m->s.proj, (size_t)n * out);
}

/* The feed-forward block: x += swiglu(rmsnorm(x) W_gu^T + b_gu) W_down^T + b_down (through
 * s->gate_up, s->ffn and s->proj when unfused). */
static void ffn(canopy_model *m, const cn_layer *w, int n) {
  const cn_backend *be = m->be;
  const cn_scratch *s = &m->s;
  int D = m->cfg.hidden_size, F = m->cfg.intermediate_size;
  if (be->ffn) {
    be->ffn(m->be_ctx, s->x, s->gate_up, w->ffn_norm, m->cfg.rms_norm_eps, w->w_gate_up, w->b_gate_up, w->w_down,
            w->b_down, n, D, F);
    return;
  }
  norm_matmul(m, s->gate_up, s->x, w->ffn_norm, w->w_gate_up, w->b_gate_up, n, D, 2 * F);
  be->swiglu(m->be_ctx, s->ffn, s->gate_up, n, F);
  matmul_add(m, s->x, s->ffn, w->w_down, w->b_down, n, F, D);
}

/* s->q, s->k, s->v from s->qkv, q and k rotated to their positions. */
static void qkv_rope(canopy_model *m, const int32_t *pos, int n) {
  const cn_backend *be = m->be;
  const cn_config *c = &m->cfg;
  const cn_scratch *s = &m->s;
  if (be->qkv_rope) {
    be->qkv_rope(m->be_ctx, s->q, s->k, s->v, s->qkv, pos, n, c->n_heads, c->n_kv_heads, c->head_dim, m->inv_freq);
    return;
  }
  be->split_qkv(m->be_ctx, s->q, s->k, s->v, s->qkv, n, c->n_heads * c->head_dim, c->n_kv_heads * c->head_dim);
  be->rope(m->be_ctx, s->q, pos, n, c->n_heads, c->head_dim, m->inv_freq);
  be->rope(m->be_ctx, s->k, pos, n, c->n_kv_heads, c->head_dim, m->inv_freq);
}

/* s->q rotated, and the new tokens' k (rotated) and v of layer l in their cache slots: through s->k
 * and s->v unless the backend writes the cache as it rotates. */
static void qkv_rope_write_kv(canopy_model *m, const cn_batch *b, int l) {
  const cn_backend *be = m->be;
  const cn_config *c = &m->cfg;
  const cn_scratch *s = &m->s;
  int kv_dim = c->n_kv_heads * c->head_dim;
  if (be->qkv_rope_kv) {
    be->qkv_rope_kv(m->be_ctx, s->q, s->qkv, b->pos, m->attn_desc, b->n_seqs, b->n_tokens, c->n_heads, c->n_kv_heads,
                    c->head_dim, m->inv_freq);
    return;
  }
  qkv_rope(m, b->pos, b->n_tokens);
  if (be->kv_write_batch) {
    be->kv_write_batch(m->be_ctx, m->attn_desc, b->n_seqs, s->k, s->v, kv_dim);
    return;
  }
  for (int q = 0; q < b->n_seqs; q++) {
    const cn_attn_desc *a = &m->attn_desc[q];
    size_t off_kv = (size_t)b->seqs[q].first * kv_dim * sizeof(float);
    be->kv_write(m->be_ctx, m->kv, a->seq, l, a->ctx_len + a->q_offset, (char *)s->k + off_kv, (char *)s->v + off_kv,
                 a->n, kv_dim);
  }
}

/* The attention's inputs of layer l from the residual stream s->x (RMSNorm, the q/k/v projection,
 * RoPE): s->q, and the new tokens' k and v in their cache slots. */
static void attn_input(canopy_model *m, const cn_layer *w, const cn_batch *b, int l) {
  const cn_backend *be = m->be;
  const cn_config *c = &m->cfg;
  const cn_scratch *s = &m->s;
  int D = c->hidden_size, qkv_dim = (c->n_heads + 2 * c->n_kv_heads) * c->head_dim;
  for (int q = 0; q < b->n_seqs; q++)
    m->attn_desc[q].layer = l;
  if (be->norm_qkv_rope_kv) {
    be->norm_qkv_rope_kv(m->be_ctx, s->q, s->qkv, s->x, w->attn_norm, c->rms_norm_eps, w->wqkv, w->bqkv, D, b->pos,
                         m->attn_desc, b->n_seqs, b->n_tokens, c->n_heads, c->n_kv_heads, c->head_dim, m->inv_freq);
    return;
  }
  norm_matmul(m, s->qkv, s->x, w->attn_norm, w->wqkv, w->bqkv, b->n_tokens, D, qkv_dim);
  qkv_rope_write_kv(m, b, l);
}

int cn_forward(canopy_model *m, const cn_batch *b, float *logits) {
  int st = check_batch(m, b);
  if (st == CANOPY_OK) st = reserve_all(b);
  if (st) return st;
  const cn_backend *be = m->be;
  void *ctx = m->be_ctx;
  const cn_config *c = &m->cfg;
  const cn_scratch *s = &m->s;
  int n = b->n_tokens, D = c->hidden_size, d = c->head_dim;
  int q_dim = c->n_heads * d;
  float scale = 1.0f / sqrtf((float)d);

  /* Each sequence's attention, the same in every layer but for .layer. */
  for (int q = 0; q < b->n_seqs; q++) {
    const cn_seq_batch *sb = &b->seqs[q];
    m->attn_desc[q] = (cn_attn_desc){.pool = m->kv, .seq = sb->kv, .layer = 0, .ctx_len = cn_kv_seq_len(sb->kv),
                                     .q_offset = sb->tree_prev, .n = sb->n,
                                     .pos = sb->tree_prev ? sb->tree_pos : b->pos + sb->first,
                                     .tree_mask = sb->tree_mask, .n_heads = c->n_heads, .n_kv_heads = c->n_kv_heads,
                                     .head_dim = d, .sliding_window = c->sliding_window, .scale = scale};
  }
  cn_fwd_io io = {.n_tokens = n, .tokens = b->tokens, .pos = b->pos, .n_logits = b->n_logits,
                  .logit_rows = b->logit_rows, .top = b->top, .top_k = b->top_k > 0 ? b->top_k : 1,
                  .top_logp = b->top_logp, .sample = b->top && b->sample, .logits = b->top ? NULL : logits,
                  .vocab = c->vocab_size, .n_seqs = b->n_seqs, .desc = m->attn_desc, .inv_freq = m->inv_freq,
                  .token_src = b->token_src, .src_ids = b->src_ids ? b->src_ids->buf : NULL,
                  .top_ids = b->top_ids ? b->top_ids->buf : NULL, .top_ids_at = b->top_ids_at,
                  .accept_parent = b->accept_parent, .accept_out = b->accept_out, .n_dyn = b->n_dyn,
                  .dyn = b->dyn, .u = b->sample ? b->u : NULL, .q_out = b->q_out,
                  .rule = b->top ? b->sample : NULL, .accept_sample = b->accept_sample,
                  .accept_q = b->accept_q, .accept_u = b->accept_u,
                  .accept_rows = b->accept_sample ? b->accept_rows->buf : NULL};
  /* A backend with ids in host memory gets its tokens resolved here; a device backend resolves
   * them on the device (in begin) into its copy of b->tokens. */
  const int32_t *tokens = b->tokens;
  int staged = 0;
  for (int i = 0; i < b->n_dyn; i++) staged |= b->dyn[i].stage != 0;
  if ((b->token_src || staged) && be->host_ids) {
    memcpy(m->fwd_tokens, b->tokens, sizeof *tokens * (size_t)n);
    if (b->token_src) cn_cpu_gather_ids(m->fwd_tokens, b->token_src, b->src_ids->buf, n);
    for (int i = 0; i < b->n_dyn; i++) { /* into the arrays the batch names, before anything reads them */
      const cn_dyn_step *d = &b->dyn[i];
      if (d->stage)
        cn_cpu_dyn_stage(d->ids->buf, d->layout, d->stage, d->pos0, d->mask, d->pos, d->tree_pos, d->parent,
                         m->fwd_tokens + b->seqs[d->seq].first);
    }
    for (int i = 0; i < n; i++)
      if (m->fwd_tokens[i] < 0 || m->fwd_tokens[i] >= c->vocab_size) {
        unreserve(b, b->n_seqs);
        return cn_error(CANOPY_ERR_INVALID_ARG, "forward: chained token id %d at batch index %d is outside the vocabulary",
                        m->fwd_tokens[i], i);
      }
    tokens = io.tokens = m->fwd_tokens;
  }
  int replayed = 0;
  if (be->begin && (st = be->begin(ctx, &io, &replayed))) {
    unreserve(b, b->n_seqs);
    return st;
  }
  m->n_forwards++;
  if (replayed) goto done;

  be->embed(ctx, s->x, m->embed, tokens, n, D);
  for (int l = 0; l < c->n_layers; l++) {
    const cn_layer *w = &m->layers[l];
    attn_input(m, w, b, l);
    be->attention_batch(ctx, s->attn, s->q, m->attn_desc, b->n_seqs);
    matmul_add(m, s->x, s->attn, w->wo, w->bo, n, q_dim, D);
    ffn(m, w, n);
  }

  /* Only the requested rows go through the final norm and the LM head: at prefill that is one
   * row in hundreds, and the head is the largest matrix of a small model. */
  for (int r = 0; r < b->n_logits; r += LOGIT_CHUNK) {
    int rows = b->n_logits - r < LOGIT_CHUNK ? b->n_logits - r : LOGIT_CHUNK;
    be->gather_rows(ctx, s->xn, s->x, b->logit_rows + r, rows, D);
    norm_matmul(m, s->logits, s->xn, m->final_norm, m->lm_head, NULL, rows, D, c->vocab_size);
    int k = b->top_k > 0 ? b->top_k : 1;
    if (b->accept_sample) {
      if ((st = be->probs_rows(ctx, cn_rows_at(b->accept_rows, r), s->logits, rows, c->vocab_size, b->accept_sample)))
        break;
    } else if (b->top && b->q_out) {
      if ((st = be->draw_rows(ctx, b->top + (size_t)r * k, b->q_out + r, s->logits, rows, c->vocab_size, b->sample,
                              b->u + (size_t)r * k, k)))
        break;
    } else if (b->top && b->sample) {
      if ((st = be->sample_rows(ctx, b->top + r, s->logits, rows, c->vocab_size, b->sample, b->u + r))) break;
    } else if (b->top)
      be->top_rows(ctx, b->top + (size_t)r * k, b->top_logp ? b->top_logp + (size_t)r * k : NULL, s->logits, rows,
                   c->vocab_size, k);
    else be->to_host(ctx, logits + (size_t)r * c->vocab_size, s->logits, (size_t)rows * c->vocab_size);
  }
  if (!st && b->accept_sample)
    st = be->accept_sampled(ctx, b->accept_out, tokens, b->accept_parent, n, b->accept_rows->buf, b->accept_q,
                            b->accept_u, c->vocab_size, cn_rows_at(b->accept_rows, n), b->accept_sample);
  else if (!st && b->accept_parent) be->accept_greedy(ctx, b->accept_out, tokens, b->top, b->accept_parent, n);
  if (!st && b->top_ids && be->host_ids) {
    int k = b->top_k > 0 ? b->top_k : 1;
    memcpy((int32_t *)b->top_ids->buf + b->top_ids_at, b->top, sizeof *b->top * (size_t)b->n_logits * k);
  }
  for (int i = 0; !st && be->host_ids && i < b->n_dyn; i++) {
    const cn_dyn_step *d = &b->dyn[i];
    int32_t *w = d->ids->buf;
    const cn_dyn_layout *l = d->layout;
    size_t at = (size_t)d->row * b->top_k;
    if (d->grow && cn_cpu_dyn_grow(w, l, d->grow - 1, b->top + at, b->top_logp + at, b->top_k))
      st = cn_error(CANOPY_ERR_INVALID_ARG, "forward: dynamic tree level %d: a kept node lost its parent (internal)",
                    d->grow - 1);
    if (d->tree_out) memcpy(d->tree_out, w + l->t_token, sizeof *w * (size_t)(4 * l->T + 1));
  }
done:
  if (be->end) {
    int end_st = be->end(ctx);
    if (!st) st = end_st;
  }
  if (st) unreserve(b, b->n_seqs);
  return st;
}
