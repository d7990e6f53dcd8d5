/* A session: one sequence's tokens, its KV blocks, its sampler. Prompts go through the model in
 * chunks of max_batch tokens (the causal forward); each new token is one more forward. The
 * sampled token is fed lazily, at the next call, so stopping never costs a wasted forward. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/error.h"
#include "model/forward.h"
#include "spec/sampler.h"
#include "spec/speculate.h"

struct canopy_session {
  canopy_model *m;
  canopy_session_params p;
  cn_kv_seq *kv;
  int32_t *tokens;   /* [max_context] every token of the sequence, fed or pending */
  int n_tokens;      /* tokens in the sequence, the pending one included */
  int pending;       /* 1 if tokens[n_tokens - 1] was sampled but not yet fed */
  float *logits;     /* [vocab] of the last fed position */
  int has_logits;
  int32_t *pos;      /* [max_batch] */
  cn_sampler sampler;
  canopy_stats stats;
  cn_spec *spec;     /* NULL: target-only decoding */
  int32_t *queue;    /* [tree depth + 1] tokens a speculative step produced, not yet returned */
  int n_queue, q_at;
};

canopy_session_params canopy_session_default_params(void) {
  return (canopy_session_params){.sampling = canopy_sampling_default_params(), .max_tokens = 0, .stop_at_eos = 1};
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int canopy_session_create(canopy_model *m, const canopy_session_params *p, canopy_session **out) {
  if (!m || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_session_create: NULL argument");
  canopy_session_params defaults = canopy_session_default_params();
  if (!p) p = &defaults;
  if (p->max_tokens < 0) return cn_error(CANOPY_ERR_INVALID_ARG, "session: max_tokens %d must be >= 0", p->max_tokens);
  canopy_session *s = calloc(1, sizeof *s);
  if (!s) return cn_error(CANOPY_ERR_NO_MEMORY, "session: out of memory");
  s->m = m;
  s->p = *p;
  int st = cn_sampler_init(&s->sampler, &p->sampling, m->cfg.vocab_size);
  if (!st) st = cn_kv_seq_create(m->kv, &s->kv);
  if (!st && p->draft) st = cn_spec_create(m, p->draft, p->tree, &p->sampling, &s->spec);
  if (!st && !(s->queue = malloc(sizeof *s->queue * (size_t)(s->spec ? cn_spec_depth(s->spec) + 1 : 1))))
    st = cn_error(CANOPY_ERR_NO_MEMORY, "session: out of memory");
  if (!st) {
    s->tokens = malloc(sizeof *s->tokens * (size_t)m->max_context);
    s->logits = malloc(sizeof *s->logits * (size_t)m->cfg.vocab_size);
    s->pos = malloc(sizeof *s->pos * (size_t)m->max_batch);
    if (!s->tokens || !s->logits || !s->pos) st = cn_error(CANOPY_ERR_NO_MEMORY, "session: out of memory");
  }
  if (st) {
    canopy_session_free(s);
    return st;
  }
  *out = s;
  return CANOPY_OK;
}

void canopy_session_free(canopy_session *s) {
  if (!s) return;
  cn_spec_free(s->spec);
  free(s->queue);
  cn_kv_seq_free(s->kv);
  cn_sampler_free(&s->sampler);
  free(s->tokens);
  free(s->logits);
  free(s->pos);
  free(s);
}

/* Runs tokens[from, to) through the model in max_batch chunks and commits them; the last
 * chunk's last row leaves its logits in s->logits. */
static int feed(canopy_session *s, int from, int to) {
  canopy_model *m = s->m;
  for (int at = from; at < to;) {
    int n = to - at < m->max_batch ? to - at : m->max_batch;
    for (int i = 0; i < n; i++) s->pos[i] = at + i;
    int last = n - 1, is_last = at + n == to;
    cn_seq_batch sb = {.kv = s->kv, .first = 0, .n = n, .tree_mask = NULL};
    cn_batch b = {.n_tokens = n, .tokens = s->tokens + at, .pos = s->pos, .n_seqs = 1, .seqs = &sb,
                  .n_logits = is_last, .logit_rows = &last};
    int st = cn_forward(m, &b, s->logits);
    if (st) {
      s->has_logits = 0;
      return st;
    }
    cn_kv_seq_commit(s->kv, s->tokens + at, n);
    s->stats.forward_passes++;
    at += n;
  }
  s->has_logits = 1;
  return CANOPY_OK;
}

/* Feeds the pending token and chooses the next one where the logits are (the backend's
 * top_rows (k = 1), or sample_rows with the sampler's next u: the random stream cn_sampler_sample
 * would consume), so only the id crosses to the host. The logits stay behind: has_logits = 0. */
static int feed_choose(canopy_session *s, int32_t *t) {
  int last = 0, at = s->n_tokens - 1;
  s->pos[0] = at;
  cn_sample_rule rule = cn_sampler_rule(&s->sampler);
  double u = rule.temperature > 0 ? cn_rng_uniform(&s->sampler.rng) : 0;
  cn_seq_batch sb = {.kv = s->kv, .first = 0, .n = 1};
  cn_batch b = {.n_tokens = 1, .tokens = s->tokens + at, .pos = s->pos, .n_seqs = 1, .seqs = &sb, .n_logits = 1,
                .logit_rows = &last, .top = t, .sample = rule.temperature > 0 ? &rule : NULL, .u = &u};
  s->has_logits = 0;
  int st = cn_forward(s->m, &b, NULL);
  if (st) return st;
  cn_kv_seq_commit(s->kv, s->tokens + at, 1);
  s->stats.forward_passes++;
  return CANOPY_OK;
}

static void cut(canopy_session *s, int keep);

int canopy_session_append(canopy_session *s, const int32_t *ids, int n) {
  if (!s || (!ids && n) || n < 0) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_session_append: bad arguments");
  if (n == 0) return CANOPY_OK;
  canopy_model *m = s->m;
  for (int i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= m->cfg.vocab_size)
      return cn_error(CANOPY_ERR_INVALID_ARG, "token id %d at prompt index %d is outside the vocabulary (%d)", ids[i],
                      i, m->cfg.vocab_size);
  if (s->n_tokens + n > m->max_context)
    return cn_error(CANOPY_ERR_CONTEXT, "prompt of %d tokens (after %d in the session) exceeds the context length %d",
                    n, s->n_tokens, m->max_context);
  /* Drafted tokens the caller has not taken are not part of what it continues from. */
  if (s->q_at < s->n_queue) cut(s, s->n_tokens - (s->n_queue - s->q_at));
  double t0 = now_s();
  int from = s->n_tokens - s->pending;
  memcpy(s->tokens + s->n_tokens, ids, sizeof *ids * (size_t)n);
  s->n_tokens += n;
  s->pending = 0;
  int reused = 0;
  if (from == 0) {
    /* At least one token must run through the model to produce logits. */
    reused = cn_kv_seq_attach_prefix(s->kv, s->tokens, s->n_tokens - 1);
    from = reused;
  }
  int st = feed(s, from, s->n_tokens);
  if (st) {
    /* Leave the session as it was before the call. */
    s->n_tokens -= n;
    cn_kv_seq_truncate(s->kv, s->n_tokens < cn_kv_seq_len(s->kv) ? s->n_tokens : cn_kv_seq_len(s->kv));
    return st;
  }
  s->stats.n_prompt += n;
  s->stats.n_reused += reused;
  s->stats.prefill_s += now_s() - t0;
  return CANOPY_OK;
}

static int is_eos(const canopy_session *s, int32_t t) {
  for (int i = 0; i < s->m->cfg.n_eos; i++)
    if (s->m->cfg.eos_token_ids[i] == t) return 1;
  return 0;
}

/* Shortens the sequence to its first `keep` tokens after a speculative step overshot (an eos or
 * max_tokens inside the accepted run): the caches forget what the caller never saw, and the last
 * kept token becomes the pending one. */
static void cut(canopy_session *s, int keep) {
  s->n_queue = s->q_at = 0;
  s->n_tokens = keep;
  if (cn_kv_seq_len(s->kv) > keep - 1) cn_kv_seq_truncate(s->kv, keep - 1);
  if (s->spec) cn_spec_truncate(s->spec, keep - 1);
  s->pending = 1;
  s->has_logits = 0;
}

/* One speculative step: the pending token is the tree's root; the accepted tokens and the bonus
 * join the sequence (the bonus pending) and wait in the queue. */
static int speculate(canopy_session *s) {
  int n_out = 0;
  int st = cn_spec_step(s->spec, s->kv, s->tokens, s->n_tokens, &s->sampler, s->queue, &n_out, &s->stats);
  if (st) return st;
  memcpy(s->tokens + s->n_tokens, s->queue, sizeof *s->queue * (size_t)n_out);
  s->n_tokens += n_out;
  s->n_queue = n_out;
  s->q_at = 0;
  s->pending = 1;
  s->has_logits = 0;
  return CANOPY_OK;
}

int canopy_session_next(canopy_session *s, int32_t *token) {
  if (!s || !token) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_session_next: NULL argument");
  *token = -1;
  if (s->n_tokens == 0) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_session_next: append a prompt first");
  /* Checked before feeding the pending token, so the last token never costs a forward. */
  if (s->q_at == s->n_queue &&
      ((s->p.max_tokens > 0 && s->stats.n_generated >= s->p.max_tokens) || s->n_tokens >= s->m->max_context))
    return CANOPY_DONE;
  double t0 = now_s();
  int32_t t;
  int at; /* t's index in the sequence */
  if (s->q_at < s->n_queue) {
    at = s->n_tokens - s->n_queue + s->q_at;
    t = s->queue[s->q_at++];
  } else if (s->spec && s->pending && s->n_tokens + cn_spec_depth(s->spec) + 1 <= s->m->max_context) {
    int st = speculate(s);
    if (st) return st;
    at = s->n_tokens - s->n_queue;
    t = s->queue[s->q_at++];
  } else {
    if (s->pending) {
      int st = feed_choose(s, &t);
      if (st) return st;
      s->pending = 0;
    } else {
      t = cn_sampler_sample(&s->sampler, s->logits);
    }
    at = s->n_tokens;
    s->tokens[s->n_tokens++] = t;
    s->pending = 1;
  }
  s->stats.decode_s += now_s() - t0;
  if (s->p.stop_at_eos && is_eos(s, t)) {
    cut(s, at); /* the eos itself is not part of the sequence */
    return CANOPY_DONE;
  }
  s->stats.n_generated++;
  if (s->p.max_tokens > 0 && s->stats.n_generated >= s->p.max_tokens && s->q_at < s->n_queue) cut(s, at + 1);
  *token = t;
  return CANOPY_OK;
}

/* What a session contributes to a batched step. */
typedef struct cn_step_part {
  canopy_session *s;
  int spec;      /* 1: a drafted tree; 0: its pending token */
  int chain;     /* 1: the tree drafts chained (spec/speculate.h) */
  int first, n;  /* its tokens in the verification batch */
  int row_first; /* its draft piece's first logit row in the current draft forward, -1: none */
} step_part;

/* Samples the next token from the current logits into the sequence (pending) and the queue. */
/* Token t joins the sequence (pending) and the queue, alone. */
static void queue_one(canopy_session *s, int32_t t) {
  s->tokens[s->n_tokens++] = t;
  s->queue[0] = t;
  s->n_queue = 1;
  s->q_at = 0;
  s->pending = 1;
}

static void sample_to_queue(canopy_session *s) { queue_one(s, cn_sampler_sample(&s->sampler, s->logits)); }

static int finished(const canopy_session *s) {
  return (s->p.max_tokens > 0 && s->stats.n_generated >= s->p.max_tokens) || s->n_tokens >= s->m->max_context;
}

#define TOP_MAX 32 /* most best ids a draft row hands back (cn_batch.top_k) */

/* Grows a model's step scratch to `sessions` parts and `rows` rows of logits. */
static int step_scratch(canopy_model *m, int sessions, int rows) {
  if (!m->step_idx && !(m->step_idx = malloc(sizeof *m->step_idx * (5 + TOP_MAX) * (size_t)m->max_batch)))
    return cn_error(CANOPY_ERR_NO_MEMORY, "batched step: out of memory");
  if (!m->step_top_logp && !(m->step_top_logp = malloc(sizeof *m->step_top_logp * TOP_MAX * (size_t)m->max_batch)))
    return cn_error(CANOPY_ERR_NO_MEMORY, "batched step: out of memory");
  if (!m->step_u && !(m->step_u = malloc(sizeof *m->step_u * TOP_MAX * (size_t)m->max_batch)))
    return cn_error(CANOPY_ERR_NO_MEMORY, "batched step: out of memory");
  if (!m->step_q && !(m->step_q = malloc(sizeof *m->step_q * (size_t)m->max_batch)))
    return cn_error(CANOPY_ERR_NO_MEMORY, "batched step: out of memory");
  if (sessions > m->step_cap) {
    cn_seq_batch *seqs = realloc(m->step_seqs, sizeof *seqs * (size_t)sessions);
    if (seqs) m->step_seqs = seqs;
    step_part *parts = seqs ? realloc(m->step_parts, sizeof *parts * (size_t)sessions) : NULL;
    if (parts) m->step_parts = parts;
    cn_dyn_step *dyn = parts ? realloc(m->step_dyn, sizeof *dyn * (size_t)sessions) : NULL;
    if (dyn) m->step_dyn = dyn;
    if (!seqs || !parts || !dyn)
      return cn_error(CANOPY_ERR_NO_MEMORY, "batched step: no memory for %d sessions", sessions);
    m->step_cap = sessions;
  }
  if (rows > m->step_rows) {
    float *grown = realloc(m->step_logits, sizeof *grown * (size_t)rows * (size_t)m->cfg.vocab_size);
    if (!grown) return cn_error(CANOPY_ERR_NO_MEMORY, "batched step: no memory for %d rows of logits", rows);
    m->step_logits = grown, m->step_rows = rows;
  }
  return CANOPY_OK;
}

/* Grows the trees of every speculative part whose draft model is d: each round is ONE draft
 * forward holding every such sequence's next piece (catch-up chunk or tree level), ragged. */
static int draft_together(canopy_model *d, step_part *parts, int k) {
  int st = step_scratch(d, k, d->max_batch);
  int32_t *tokens = d->step_idx, *pos = tokens + d->max_batch, *rows = pos + d->max_batch;
  for (;;) {
    int total = 0, n_rows = 0, n_seqs = 0, waiting = 0;
    for (int j = 0; !st && j < k; j++) {
      step_part *p = &parts[j];
      p->row_first = -1;
      if (!p->spec || p->chain || cn_spec_draft_model(p->s->spec) != d || !cn_spec_drafting(p->s->spec)) continue;
      int n = cn_spec_draft_piece(p->s->spec, total, d->max_batch - total, tokens, pos, rows, n_rows,
                                  &d->step_seqs[n_seqs]);
      if (!n) {
        waiting++; /* no room left in this forward: the next one */
        continue;
      }
      p->row_first = n_rows;
      n_rows += cn_spec_draft_rows(p->s->spec);
      total += n;
      n_seqs++;
    }
    if (st || !total) {
      if (!st && waiting)
        st = cn_error(CANOPY_ERR_INVALID_ARG, "batched step: a draft tree level does not fit the draft's batch of %d",
                      d->max_batch);
      return st;
    }
    /* Greedy trees need only each row's best few ids: when every piece here is such, that is all
     * the forward hands back (the widest any of them needs). */
    int top_k = 0;
    for (int j = 0; j < k; j++)
      if (parts[j].row_first >= 0) {
        int kj = cn_spec_draft_top_k(parts[j].s->spec);
        top_k = kj <= 0 || top_k < 0 ? -1 : kj > top_k ? kj : top_k;
      }
    int32_t *top = rows + d->max_batch;
    cn_batch b = {.n_tokens = total, .tokens = tokens, .pos = pos, .n_seqs = n_seqs, .seqs = d->step_seqs,
                  .n_logits = n_rows, .logit_rows = rows};
    if (top_k > 0) b.top = top, b.top_k = top_k, b.top_logp = d->step_top_logp;
    if (!(st = step_scratch(d, k, top_k > 0 ? 0 : n_rows)) && (st = cn_forward(d, &b, top_k > 0 ? NULL : d->step_logits)))
      st = cn_error_wrap(st, "draft");
    for (int j = 0; !st && j < k; j++)
      if (parts[j].row_first >= 0) {
        size_t r0 = (size_t)parts[j].row_first;
        cn_draft_out o = top_k > 0 ? (cn_draft_out){.ids = top + r0 * top_k, .logp = d->step_top_logp + r0 * top_k,
                                                    .k = top_k}
                                   : (cn_draft_out){.logits = d->step_logits + r0 * d->cfg.vocab_size};
        st = cn_spec_draft_take(parts[j].s->spec, &o);
      }
  }
}

static int same_rule(const cn_sample_rule *a, const cn_sample_rule *b) {
  return a->temperature == b->temperature && a->top_k == b->top_k && a->top_p == b->top_p;
}

/* Whether the step verifies with acceptance where the logits are (model/forward.h, accept_parent),
 * so that it waits once, for acceptance's result: when some tree drafts chained and every part is
 * greedy (a greedy tree of any kind, or a greedy session feeding its pending token: a tree of one
 * node, whose bonus is its next token), or every part is a sampled tree that drafts chained, all
 * under one sampling rule (*rule; NULL for greedy), which the draft's draws and the acceptance then
 * share. Marks the parts whose trees draft chained: those of a draft model whose every tree here
 * chains. A draft model with a tree that does not (one made with $CANOPY_SPEC_HOST_LEVELS=1) grows
 * all its trees through the host, so that they still share its forwards. */
static int accept_where_logits_are(step_part *parts, int k, const cn_sample_rule **rule) {
  int any = 0;
  for (int j = 0; j < k; j++) {
    canopy_session *s = parts[j].s;
    parts[j].chain = parts[j].spec && cn_spec_chained(s->spec);
    for (int i = 0; i < k && parts[j].chain; i++)
      if (parts[i].spec && !cn_spec_chained(parts[i].s->spec) &&
          cn_spec_draft_model(parts[i].s->spec) == cn_spec_draft_model(s->spec))
        parts[j].chain = 0;
    any |= parts[j].chain;
  }
  int greedy = 1, sampled = 1;
  *rule = NULL;
  for (int j = 0; any && j < k; j++) {
    canopy_session *s = parts[j].s;
    const cn_sample_rule *r = parts[j].spec ? cn_spec_draw_rule(s->spec) : NULL;
    if (parts[j].spec ? !cn_spec_greedy(s->spec) : cn_sampler_rule(&s->sampler).temperature > 0) greedy = 0;
    if (!r || !parts[j].chain || (*rule && !same_rule(*rule, r))) sampled = 0;
    if (r) *rule = r;
  }
  if (!greedy && !sampled) any = 0;
  if (greedy || !any) *rule = NULL;
  for (int j = 0; !any && j < k; j++) parts[j].chain = 0;
  return any;
}

/* The draft's side of a chained step for the parts whose draft model is d: each round is one draft
 * forward holding every such sequence's next piece, its picks appended to `ids` (rows of K, from
 * *ids_row on) with no wait. Every draft model of the step writes its own rows of the same ids.
 * Sampled trees (rule) draw their picks under the rule and keep each row's distribution. */
static int draft_chained(canopy_model *d, step_part *parts, int k, int K, const cn_sample_rule *rule, cn_ids *ids,
                         int *ids_row) {
  int st = step_scratch(d, k, 0);
  if (st) return st;
  int32_t *tokens = d->step_idx, *pos = tokens + d->max_batch, *rows = pos + d->max_batch,
          *top = rows + d->max_batch, *src = top + TOP_MAX * d->max_batch;
  for (;;) {
    int total = 0, n_rows = 0, n_seqs = 0, n_dyn = 0, waiting = 0;
    for (int j = 0; j < k; j++) {
      cn_spec *sp = parts[j].s->spec;
      parts[j].row_first = -1;
      if (!parts[j].chain || cn_spec_draft_model(sp) != d || !cn_spec_chain_drafting(sp)) continue;
      int n = cn_spec_chain_piece(sp, total, d->max_batch - total, tokens, pos, src, rows, n_rows, *ids_row + n_rows,
                                  d->step_u, d->step_q, &d->step_seqs[n_seqs], &d->step_dyn[n_dyn]);
      if (!n) {
        waiting++;
        continue;
      }
      if (d->step_dyn[n_dyn].layout) d->step_dyn[n_dyn++].seq = n_seqs; /* a dynamic tree's piece */
      parts[j].row_first = n_rows;
      n_rows += cn_spec_draft_rows(sp);
      total += n;
      n_seqs++;
    }
    if (!total)
      return waiting ? cn_error(CANOPY_ERR_INVALID_ARG, "batched step: a draft tree level does not fit the draft's "
                                                        "batch of %d", d->max_batch)
                     : CANOPY_OK;
    int from_ids = 0; /* catch-up chunks alone take every token from the host: no gather */
    for (int i = 0; i < total && !from_ids; i++) from_ids = src[i] >= 0;
    cn_batch b = {.n_tokens = total, .tokens = tokens, .pos = pos, .n_seqs = n_seqs, .seqs = d->step_seqs,
                  .n_logits = n_rows, .logit_rows = rows, .top = top, .top_k = K,
                  .top_logp = n_dyn ? d->step_top_logp : NULL, .token_src = from_ids ? src : NULL, .src_ids = ids,
                  .top_ids = n_rows ? ids : NULL, .top_ids_at = *ids_row * K, .n_dyn = n_dyn, .dyn = d->step_dyn};
    if (rule && n_rows) b.sample = rule, b.u = d->step_u, b.q_out = d->step_q;
    if ((st = cn_forward(d, &b, NULL))) return cn_error_wrap(st, "draft");
    for (int j = 0; j < k; j++)
      if (parts[j].row_first >= 0) cn_spec_chain_take(parts[j].s->spec);
    *ids_row += n_rows;
  }
}

/* Whether parts[j]'s draft model is the first of its kind among parts[0..j] that `chain` selects. */
static int first_of_draft(const step_part *parts, int j, int chain) {
  canopy_model *d = cn_spec_draft_model(parts[j].s->spec);
  for (int i = 0; i < j; i++)
    if (parts[i].spec && parts[i].chain == chain && cn_spec_draft_model(parts[i].s->spec) == d) return 0;
  return 1;
}

/* Grows every part's tree, sharing draft forwards among the sessions with the same draft model:
 * chained trees into the first chained draft model's shared ids (its step_ids, returned in *ids;
 * rows of the widest pick any of them needs), the others level by level through the host. */
static int draft_all(step_part *parts, int k, const cn_sample_rule *rule, cn_ids **ids) {
  int st = CANOPY_OK, rows_needed = 0, ids_row = 0, K = 0;
  canopy_model *d0 = NULL;
  for (int j = 0; j < k; j++)
    if (parts[j].chain) {
      if (!d0) d0 = cn_spec_draft_model(parts[j].s->spec);
      rows_needed += cn_spec_chain_rows(parts[j].s->spec);
      if (cn_spec_chain_width(parts[j].s->spec) > K) K = cn_spec_chain_width(parts[j].s->spec);
    }
  *ids = d0 ? &d0->step_ids : NULL;
  if (d0 && d0->step_ids.n < rows_needed * K) {
    cn_ids_free(d0, &d0->step_ids);
    st = cn_ids_create(d0, rows_needed * K, &d0->step_ids);
  }
  for (int j = 0; !st && j < k; j++) {
    canopy_session *s = parts[j].s;
    if (parts[j].chain) st = cn_spec_chain_begin(s->spec, s->kv, s->tokens, s->n_tokens, K, &s->stats);
    else if (parts[j].spec) st = cn_spec_draft_begin(s->spec, s->kv, s->tokens, s->n_tokens, &s->stats);
  }
  for (int j = 0; !st && j < k; j++)
    if (parts[j].chain && first_of_draft(parts, j, 1))
      st = draft_chained(cn_spec_draft_model(parts[j].s->spec), parts, k, K, rule, &d0->step_ids, &ids_row);
  for (int j = 0; !st && j < k; j++)
    if (parts[j].spec && !parts[j].chain && first_of_draft(parts, j, 0))
      st = draft_together(cn_spec_draft_model(parts[j].s->spec), parts, k);
  for (int j = 0; !st && j < k; j++)
    if (parts[j].spec && !parts[j].chain) st = cn_spec_draft_end(parts[j].s->spec);
  return st;
}

int canopy_sessions_step(canopy_session *const *ss, int n, int *n_stepped) {
  if (n_stepped) *n_stepped = 0;
  if (!ss || n <= 0) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_sessions_step: no sessions");
  canopy_model *m = ss[0]->m;
  for (int i = 0; i < n; i++)
    if (!ss[i] || ss[i]->m != m)
      return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_sessions_step: session %d is NULL or of another model", i);
  double t0 = now_s();
  int st = step_scratch(m, n, 0);
  if (st) return st;
  step_part *parts = m->step_parts;

  /* Who takes part: everyone who needs the target, while the verification batch has room for
   * the largest tree each could draft. The search starts one session later each call. */
  int total = 0, k = 0, sampled = 0, start = (int)(m->step_rr++ % (unsigned)n);
  for (int i = 0; i < n; i++) {
    canopy_session *s = ss[(start + i) % n];
    if (s->q_at < s->n_queue || finished(s)) continue;
    if (!s->pending && s->has_logits) {
      /* Just given a prompt: its next token comes from the prompt's logits, no forward. */
      sample_to_queue(s);
      sampled++;
      continue;
    }
    if (!s->pending) continue;
    int spec = s->spec && s->n_tokens + cn_spec_depth(s->spec) + 1 <= m->max_context;
    int most = spec ? cn_spec_max_nodes(s->spec) : 1;
    if (total + most > m->max_batch) continue;
    parts[k++] = (step_part){.s = s, .spec = spec, .first = total, .n = most};
    total += most;
  }

  /* Draft every tree, sharing draft forwards among sessions with the same draft model; chained
   * where it can be, so that the step waits once, for acceptance's result. */
  const cn_sample_rule *rule;
  int chained = accept_where_logits_are(parts, k, &rule);
  cn_ids *ids = NULL;
  st = draft_all(parts, k, rule, &ids);

  /* One target forward verifies every tree and feeds every plain session's pending token. */
  if (!st) st = step_scratch(m, n, 0);
  int32_t *tokens = m->step_idx, *pos = tokens + m->max_batch, *rows = pos + m->max_batch, *top = rows + m->max_batch;
  int32_t *src = top + TOP_MAX * m->max_batch, *parent = src + m->max_batch;
  /* When every part verifies a greedy tree, only each node's top token is needed: the argmax runs
   * where the logits are and n ids come back instead of n rows of logits. */
  int greedy = k > 0;
  for (int j = 0; j < k && greedy; j++)
    greedy = parts[j].spec && cn_spec_greedy(parts[j].s->spec);
  total = 0;
  int n_dyn = 0;
  for (int j = 0; !st && j < k; j++) {
    step_part *p = &parts[j];
    canopy_session *s = p->s;
    p->first = total;
    if (chained && p->spec) {
      p->n = cn_spec_chain_batch(s->spec, s->kv, total, tokens, pos, src, rows, parent, rule ? &s->sampler : NULL,
                                 m->step_u, m->step_q, &m->step_seqs[j], &m->step_dyn[n_dyn]);
      if (p->n < 0) {
        st = p->n;
        break;
      }
      if (m->step_dyn[n_dyn].layout) m->step_dyn[n_dyn++].seq = j; /* a dynamic tree, staged */
    } else if (p->spec) {
      p->n = cn_spec_batch(s->spec, s->kv, total, tokens, pos, rows, &m->step_seqs[j]);
    } else {
      p->n = 1;
      tokens[total] = s->tokens[s->n_tokens - 1];
      pos[total] = s->n_tokens - 1;
      rows[total] = total;
      src[total] = parent[total] = -1;
      m->step_seqs[j] = (cn_seq_batch){.kv = s->kv, .first = total, .n = 1};
    }
    total += p->n;
  }
  double t1 = now_s();
  if (!st && chained && 2 * (k + total) > m->step_accept_cap) {
    int32_t *grown = realloc(m->step_accept, sizeof *grown * 2 * (size_t)(k + total));
    if (!grown) st = cn_error(CANOPY_ERR_NO_MEMORY, "batched step: no memory for acceptance of %d nodes", total);
    else m->step_accept = grown, m->step_accept_cap = 2 * (k + total);
  }
  if (!st && rule) st = cn_rows_reserve(m, &m->step_prows, total + 2 * k); /* the verification's workspace */
  if (!st && k > 0 && !(st = step_scratch(m, n, chained ? 0 : total))) {
    cn_batch b = {.n_tokens = total, .tokens = tokens, .pos = pos, .n_seqs = k, .seqs = m->step_seqs,
                  .n_logits = total, .logit_rows = rows, .top = (greedy || chained) && !rule ? top : NULL};
    if (chained)
      b.token_src = src, b.src_ids = ids, b.accept_parent = parent, b.accept_out = m->step_accept, b.n_dyn = n_dyn,
      b.dyn = m->step_dyn;
    if (rule)
      b.accept_sample = rule, b.accept_q = m->step_q, b.accept_u = m->step_u, b.accept_rows = &m->step_prows;
    st = cn_forward(m, &b, chained ? NULL : m->step_logits);
  }
  double t2 = now_s();
  size_t V = (size_t)m->cfg.vocab_size;
  for (int j = 0; !st && j < k; j++) {
    canopy_session *s = parts[j].s;
    const int32_t *result = chained ? m->step_accept + 2 * j + 2 * parts[j].first : NULL;
    s->stats.forward_passes++;
    if (parts[j].spec) {
      int n_out = 0;
      s->stats.verify_s += t2 - t1;
      if (chained)
        st = cn_spec_chain_accept(s->spec, s->kv, result, s->queue, &n_out, &s->stats);
      else
        st = greedy ? cn_spec_accept_top(s->spec, s->kv, top + parts[j].first, s->queue, &n_out, &s->stats)
                    : cn_spec_accept(s->spec, s->kv, m->step_logits + (size_t)parts[j].first * V, &s->sampler,
                                     s->queue, &n_out, &s->stats);
      if (st) break;
      memcpy(s->tokens + s->n_tokens, s->queue, sizeof *s->queue * (size_t)n_out);
      s->n_tokens += n_out;
      s->n_queue = n_out;
      s->has_logits = 0;
    } else if (chained) {
      /* A tree of one node: nothing to accept, and the bonus is the argmax, the greedy token. */
      if (result[0] != 0 || result[1] < 0 || result[1] >= (int)V) {
        st = cn_error(CANOPY_ERR_DEVICE, "batched step: acceptance returned %d nodes, token %d for a plain session",
                      result[0], result[1]);
        break;
      }
      cn_kv_seq_commit(s->kv, s->tokens + s->n_tokens - 1, 1);
      s->has_logits = 0;
      queue_one(s, result[1]);
    } else {
      cn_kv_seq_commit(s->kv, s->tokens + s->n_tokens - 1, 1);
      memcpy(s->logits, m->step_logits + (size_t)parts[j].first * V, sizeof *s->logits * V);
      s->has_logits = 1;
      sample_to_queue(s);
    }
    s->q_at = 0;
    s->pending = 1;
    s->stats.decode_s += now_s() - t0;
  }
  if (!st && n_stepped) *n_stepped = k + sampled;
  return st;
}

int canopy_session_logits(const canopy_session *s, const float **logits, int *n_vocab) {
  if (!s || !logits) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_session_logits: NULL argument");
  if (!s->has_logits || s->pending)
    return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_session_logits: no logits for the current position");
  *logits = s->logits;
  if (n_vocab) *n_vocab = s->m->cfg.vocab_size;
  return CANOPY_OK;
}

int canopy_session_truncate(canopy_session *s, int len) {
  if (!s || len < 1 || len > s->n_tokens)
    return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_session_truncate: length %d outside [1, %d]", len,
                    s ? s->n_tokens : 0);
  /* Re-run the last kept token so the logits belong to the new end. */
  int st = cn_kv_seq_truncate(s->kv, len - 1 < cn_kv_seq_len(s->kv) ? len - 1 : cn_kv_seq_len(s->kv));
  if (st) return st;
  s->n_queue = s->q_at = 0;
  if (s->spec) cn_spec_truncate(s->spec, len - 1);
  s->n_tokens = len;
  s->pending = 0;
  return feed(s, len - 1, len);
}

int canopy_session_get_stats(const canopy_session *s, canopy_stats *stats) {
  if (!s || !stats) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_session_get_stats: NULL argument");
  *stats = s->stats;
  return CANOPY_OK;
}

int canopy_session_ready(const canopy_session *s) { return s ? s->n_queue - s->q_at : 0; }

int canopy_session_len(const canopy_session *s) { return s ? s->n_tokens : 0; }
