#include "spec/speculate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/error.h"
#include "draft/tree_grow.h"
#include "model/forward.h"
#include "spec/accept.h"

#define WORDS(n) (((n) + 63) / 64)

struct cn_spec {
  canopy_model *target, *draft;
  cn_kv_seq *dkv;            /* the draft's cache: the sequence's tokens, then this step's tree slots */
  cn_tree_spec spec;
  cn_tree_spec_bounds bounds;
  int vocab, stochastic;
  cn_sampler dist;           /* turns draft logits into the distribution children come from */
  cn_rng rng;                /* the stochastic picker's draws */
  cn_tree tree;
  cn_tree_grower grower;
  float log_tau;             /* sampled dynamic trees: the next step's threshold (draft/tree_grow.h) */
  int draw_k;                /* sampled trees: the uniforms a fed node's draws take (its most children) */

  /* The draft phase under way: catch-up chunks, then one piece per tree level. */
  const int32_t *seq;        /* the sequence being drafted from, and its length */
  int seq_len;
  int catch_from;            /* next sequence token the draft has not fed; seq_len when caught up */
  int piece_n, piece_last;   /* the piece in the batch: its tokens, and whether it ends the catch-up */
  double draft_t0;

  /* Draft side of the step under way. Oracle-tree node -> its draft KV slot past dkv's length
   * (-1: the root, which is committed, or a node never fed). */
  int32_t slot_of[CN_TREE_MAX_NODES];
  int32_t slot_pos[CN_TREE_MAX_NODES]; /* rope position of each fed slot */
  int n_fed;
  int32_t oracle_index[CN_TREE_MAX_NODES];
  uint64_t *dmask;           /* [max_frontier][WORDS(oracle_nodes)] */
  int32_t *dtok, *dpos, *drows; /* [dbatch] */
  int dbatch;                /* max(max_frontier, the draft's max_batch) */
  float *dlogits;            /* [max_frontier][V] */
  int top_k;                 /* cn_spec_draft_top_k */
  int32_t *dtop;             /* [max_frontier][top_k] a level's best ids, when top_k > 0 */
  float *dtop_logp;          /* [max_frontier][top_k] */
  float *dprobs;             /* [oracle_nodes][V]: q of every oracle-tree node that got children */
  const float *probs_out[CN_TREE_MAX_NODES];
  canopy_stats *stats;

  /* Target side. */
  uint64_t *tmask;           /* [CN_TREE_MAX_NODES][WORDS(CN_TREE_MAX_NODES)] */
  int32_t tpos[CN_TREE_MAX_NODES], trows[CN_TREE_MAX_NODES], tbuf_tokens[CN_TREE_MAX_NODES];
  float *tlogits;            /* [n_nodes + 1][V] */
  float *tprobs;             /* [n_nodes + 1][V], stochastic only */
  const float *qrows[CN_TREE_MAX_NODES];
  float *scratch;            /* [2V] */

  /* Chained steps (static trees, greedy or sampled, and greedy dynamic trees, with both models on
   * one backend that chains forwards): each draft level takes its tokens from the picks of the
   * level before where the backend keeps them, the verification takes the tree's tokens from there
   * too and runs acceptance, and only its result crosses to the host: one wait a step instead of one
   * a level. */
  int chained;
  int step_chained;          /* the step under way drafts chained (cn_spec_chain_begin), not on the host */
  cn_ids ids;                /* a step's picks when it runs alone: rows of chain_width ids */
  int chain_k;               /* ids a row in the step under way */
  int chain_level;           /* the next tree level to feed */
  int32_t chain_row[CN_TREE_MAX_NODES]; /* node (the root, fed nodes) -> the row of ids holding its picks */
  int32_t frontier_buf[CN_TREE_MAX_NODES], dsrc[CN_TREE_MAX_NODES], tsrc[CN_TREE_MAX_NODES];
  int32_t tparent[CN_TREE_MAX_NODES];
  int32_t acc_out[2 + 2 * CN_TREE_MAX_NODES];

  /* Chained dynamic trees (greedy EAGLE-2 on a backend that grows them, kernels/tree_dyn.h): the
   * tree grows in `ids` on a fixed shape, each level's tokens, mask and positions staged from
   * there, and the verification's too; the host reads acceptance's result and the tree. */
  int dyn;
  cn_dyn_layout dyn_layout;
  uint64_t *dyn_mask;        /* [K][words of (D - 1) K]: a level's mask (the verification's is tmask) */
  int32_t dyn_tree[4 * CN_TREE_MAX_NODES + 1];

  /* Chained sampled trees (static shapes; kernels/cpu/tree_sampled.c): each fed row draws draw_k
   * children where the logits are and keeps its distribution in qbuf, which the verification's
   * stochastic acceptance reads there (its target rows in the target's step_prows, which batched
   * steps use too). Every decision's uniform comes from the host (the draft's rng for draws, the
   * sampler's for acceptance), drawn as the host path draws them, so both paths give the same
   * tokens from the same logits. */
  cn_rows qbuf;              /* [fed rows][V] on the draft */
  int n_qrows;               /* qbuf rows the step under way has given out */
  int32_t chain_qrow[CN_TREE_MAX_NODES]; /* fed node -> its qbuf row */
  cn_sample_rule draw_rule, acc_rule;
  double du[CN_TREE_MAX_NODES * 32], tu[2 * CN_TREE_MAX_NODES];
  float *dq[CN_TREE_MAX_NODES], *tq[CN_TREE_MAX_NODES];
};

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Greedy trees pick children by rank among the draft's best, so a level needs each row's top k
 * only (k = the widest rank any node takes); sampled trees draw from the whole distribution. */
static int spec_top_k(const cn_tree_spec *sp, int stochastic, int vocab) {
  if (stochastic) return 0;
  int k = sp->kind == CN_TREE_DYNAMIC ? sp->topk : 1;
  if (sp->kind == CN_TREE_STATIC)
    for (int u = 1; u <= sp->n_nodes; u++) k = sp->rank[u] + 1 > k ? sp->rank[u] + 1 : k;
  return k <= 32 && k <= vocab ? k : 0;
}

/* A dynamic tree grown where the picks are, when the backend can and its fixed shape fits: fed
 * nodes and verification nodes within a tree's limits and both models' batches. */
static int dyn_setup(cn_spec *s) {
  const cn_tree_spec *sp = &s->spec;
  cn_dyn_layout l = cn_dyn_layout_make(sp->topk, sp->depth, sp->n_nodes);
  const cn_backend *be = s->target->be;
  if (!be->dyn_trees || !be->dyn_trees(s->target->cfg.head_dim) || !be->dyn_trees(s->draft->cfg.head_dim) ||
      l.R > CN_TREE_MAX_NODES || l.T > CN_TREE_MAX_NODES || l.K > s->draft->max_batch ||
      l.T > s->target->max_batch || s->top_k != l.K)
    return CANOPY_OK;
  if (!(s->dyn_mask = malloc(sizeof *s->dyn_mask * (size_t)l.K * WORDS(l.R - 1))))
    return cn_error(CANOPY_ERR_NO_MEMORY, "speculation: out of memory");
  int st = cn_ids_create(s->draft, l.words, &s->ids);
  if (st) return st;
  s->dyn_layout = l;
  s->dyn = s->chained = 1;
  return CANOPY_OK;
}

static int chain_width(const cn_spec *s) { return s->stochastic ? s->draw_k : s->top_k; }

int cn_spec_chain_width(const cn_spec *s) { return chain_width(s); }

/* Chained steps where they apply (see struct cn_spec): the fixed tree (tokens aside) and where each
 * node's token will be. $CANOPY_SPEC_HOST_LEVELS=1 keeps every step on the host path, to compare. */
static int chain_setup(cn_spec *s) {
  const cn_tree_spec *sp = &s->spec;
  const cn_backend *be = s->target->be;
  const char *env = getenv("CANOPY_SPEC_HOST_LEVELS");
  if (chain_width(s) <= 0 || chain_width(s) > s->vocab || s->draft->be != be || !be->ids_create ||
      (env && !strcmp(env, "1")))
    return CANOPY_OK;
  if (sp->kind == CN_TREE_DYNAMIC) return s->stochastic ? CANOPY_OK : dyn_setup(s);
  if (sp->kind != CN_TREE_STATIC || (s->stochastic && (!be->draw_rows || !be->accept_sampled))) return CANOPY_OK;
  int rows = 1; /* the root's, then one a fed node (those with children, below the root) */
  for (int u = 1; u <= sp->n_nodes; u++)
    rows += sp->n_children[u] > 0;
  int st = cn_ids_create(s->draft, rows * chain_width(s), &s->ids);
  if (!st && s->stochastic) st = cn_rows_create(s->draft, rows, &s->qbuf);
  if (st) return st;
  s->chained = 1;
  return CANOPY_OK;
}

int cn_spec_create(canopy_model *target, canopy_model *draft, const char *tree, const canopy_sampling_params *sp,
                   cn_spec **out) {
  if (!target || !draft || !sp || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "speculation: NULL argument");
  if (draft->cfg.vocab_size != target->cfg.vocab_size)
    return cn_error(CANOPY_ERR_VOCAB_MISMATCH, "draft %s has a vocabulary of %d tokens, the target %s has %d",
                    draft->dir, draft->cfg.vocab_size, target->dir, target->cfg.vocab_size);
  cn_spec *s = calloc(1, sizeof *s);
  if (!s) return cn_error(CANOPY_ERR_NO_MEMORY, "speculation: out of memory");
  s->target = target;
  s->draft = draft;
  s->vocab = target->cfg.vocab_size;
  s->stochastic = sp->temperature > 0;
  int st = cn_tree_spec_parse(tree && *tree ? tree : "chain:4", &s->spec);
  if (!st && s->stochastic && !cn_tree_spec_exact_for_sampling(&s->spec))
    st = cn_error(CANOPY_ERR_UNSUPPORTED,
                  "tree '%s' lists a child without its lower-ranked siblings, which would skip sampled children and "
                  "bias sampling; list every lower rank, or use it with --temp 0",
                  tree);
  /* Greedy trees rank children by the draft's own (T = 1) probabilities; sampled trees draw them
   * from the draft processed like the target (temperature, top-k, top-p). */
  canopy_sampling_params dp = *sp;
  if (!s->stochastic) dp = (canopy_sampling_params){.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = sp->seed};
  if (!st) st = cn_sampler_init(&s->dist, &dp, s->vocab);
  cn_rng_seed(&s->rng, sp->seed ^ 0x5eedd4af7ull);
  if (!st) st = cn_kv_seq_create(draft->kv, &s->dkv);
  if (st) {
    cn_spec_free(s);
    return st;
  }
  s->bounds = cn_tree_spec_get_bounds(&s->spec);
  s->top_k = spec_top_k(&s->spec, s->stochastic, s->vocab);
  s->draw_k = spec_top_k(&s->spec, 0, INT32_MAX);
  s->draw_rule = cn_sampler_rule(&s->dist);
  size_t V = (size_t)s->vocab, on = (size_t)s->bounds.oracle_nodes, fr = (size_t)s->bounds.max_frontier;
  size_t nn = (size_t)s->bounds.n_nodes + 1, batch = fr > (size_t)draft->max_batch ? fr : (size_t)draft->max_batch;
  s->dbatch = (int)batch;
  s->log_tau = -INFINITY;
  s->dmask = malloc(sizeof *s->dmask * fr * WORDS(on));
  s->dtok = malloc(sizeof *s->dtok * batch);
  s->dpos = malloc(sizeof *s->dpos * batch);
  s->drows = malloc(sizeof *s->drows * batch);
  s->dlogits = malloc(sizeof *s->dlogits * fr * V);
  s->dprobs = malloc(sizeof *s->dprobs * on * V);
  s->tmask = malloc(sizeof *s->tmask * nn * WORDS(nn));
  s->tlogits = malloc(sizeof *s->tlogits * nn * V);
  s->tprobs = s->stochastic ? malloc(sizeof *s->tprobs * nn * V) : NULL;
  s->scratch = malloc(sizeof *s->scratch * 2 * V);
  int width = s->top_k > s->draw_k ? s->top_k : s->draw_k; /* a level's picks, greedy or drawn (chained) */
  size_t ntop = fr * (size_t)(width > 0 ? width : 1);
  s->dtop = malloc(sizeof *s->dtop * ntop);
  s->dtop_logp = malloc(sizeof *s->dtop_logp * ntop);
  if (!s->dmask || !s->dtok || !s->dpos || !s->drows || !s->dlogits || !s->dprobs || !s->tmask || !s->tlogits ||
      (s->stochastic && !s->tprobs) || !s->scratch || !s->dtop || !s->dtop_logp) {
    cn_spec_free(s);
    return cn_error(CANOPY_ERR_NO_MEMORY, "speculation: no memory for a %d-node tree over %zu tokens",
                    s->bounds.n_nodes, V);
  }
  if ((st = chain_setup(s))) {
    cn_spec_free(s);
    return st;
  }
  *out = s;
  return CANOPY_OK;
}

void cn_spec_free(cn_spec *s) {
  if (!s) return;
  cn_ids_free(s->draft, &s->ids);
  cn_rows_free(s->draft, &s->qbuf);
  cn_kv_seq_free(s->dkv);
  cn_sampler_free(&s->dist);
  free(s->dmask), free(s->dtok), free(s->dpos), free(s->drows), free(s->dlogits), free(s->dprobs);
  free(s->tmask), free(s->tlogits), free(s->tprobs), free(s->scratch), free(s->dtop), free(s->dtop_logp);
  free(s->dyn_mask);
  free(s);
}

int cn_spec_depth(const cn_spec *s) { return s->bounds.depth; }

canopy_model *cn_spec_draft_model(const cn_spec *s) { return s->draft; }

int cn_spec_max_nodes(const cn_spec *s) { return s->bounds.n_nodes + 1; }

int cn_spec_chained(const cn_spec *s) { return s->chained; }

const cn_sample_rule *cn_spec_draw_rule(const cn_spec *s) { return s->stochastic ? &s->draw_rule : NULL; }

int cn_spec_chain_rows(const cn_spec *s) { return s->dyn ? s->dyn_layout.R : cn_spec_max_nodes(s); }

void cn_spec_truncate(cn_spec *s, int len) {
  if (cn_kv_seq_len(s->dkv) > len) cn_kv_seq_truncate(s->dkv, len);
}

/* ---- the draft phase, piece by piece ------------------------------------------------------- */

/* A sampled node's children: k draws, though every node takes draw_k uniforms, as a chained
 * level's row does (all of a spec's rows draw alike there), so both paths draw the same. */
static int pick_sampled(void *ctx, const float *q, int vocab, int k, int32_t *tokens) {
  cn_spec *s = ctx;
  double u[CN_TREE_MAX_NODES];
  int m = k > s->draw_k ? k : s->draw_k;
  if (m > CN_TREE_MAX_NODES) return cn_error(CANOPY_ERR_INVALID_ARG, "draft: %d children asked", k);
  for (int j = 0; j < m; j++) u[j] = cn_rng_uniform(&s->rng);
  return cn_draft_children_draw(q, vocab, k, u, tokens, s->scratch);
}

/* ---- what the host path and the chained step share: the draft's catch-up, a level's slots --- */

/* A step's start for the draft: the tree must fit the context; the draft drops what it fed past the
 * sequence's committed tokens (the root is new to it too) and catches up from there. */
static int step_begin(cn_spec *s, cn_kv_seq *target_kv, const int32_t *tokens, int n_tokens, canopy_stats *stats) {
  int ctx_len = cn_kv_seq_len(target_kv); /* == n_tokens - 1: everything but the root */
  if (ctx_len + 1 + s->bounds.depth > s->target->max_context)
    return cn_error(CANOPY_ERR_CONTEXT, "a tree %d deep after %d tokens exceeds the context length %d",
                    s->bounds.depth, n_tokens, s->target->max_context);
  s->stats = stats;
  s->draft_t0 = now_s();
  cn_spec_truncate(s, n_tokens - 1);
  s->seq = tokens;
  s->seq_len = n_tokens;
  s->catch_from = cn_kv_seq_len(s->dkv);
  if (s->catch_from == 0) s->catch_from = cn_kv_seq_attach_prefix(s->dkv, tokens, n_tokens - 1);
  s->piece_n = 0;
  s->n_fed = 0;
  for (int i = 0; i < CN_TREE_MAX_NODES; i++) s->slot_of[i] = -1;
  return CANOPY_OK;
}

/* Catch-up: every sequence token the draft has not fed (the prompt at first, later the accepted
 * tokens it never fed, and the root), causal, in chunks that fit; the last chunk's last row is the
 * root's distribution. */
static int catch_up_piece(cn_spec *s, int first, int room, int32_t *tokens, int32_t *pos, int32_t *rows, int row_first,
                          cn_seq_batch *sb) {
  int n = s->seq_len - s->catch_from < room ? s->seq_len - s->catch_from : room;
  if (n <= 0) return 0;
  for (int i = 0; i < n; i++) {
    tokens[first + i] = s->seq[s->catch_from + i];
    pos[first + i] = s->catch_from + i;
  }
  s->piece_last = s->catch_from + n == s->seq_len;
  if (s->piece_last) rows[row_first] = first + n - 1;
  *sb = (cn_seq_batch){.kv = s->dkv, .first = first, .n = n};
  return s->piece_n = n;
}

/* A tree level: nodes[0, n) (parent and depth as `parent`, `depth` say) take the draft slots after
 * the ones earlier levels wrote, each attending to its ancestors' slots; a logit row each. */
static int level_piece(cn_spec *s, const int32_t *nodes, int n, const int32_t *parent, const int32_t *depth, int first,
                       int32_t *pos, int32_t *rows, int row_first, cn_seq_batch *sb) {
  int ctx_len = cn_kv_seq_len(s->dkv), prev = s->n_fed, words = WORDS(prev + n);
  memset(s->dmask, 0, sizeof *s->dmask * (size_t)n * words);
  for (int i = 0; i < n; i++) {
    int u = nodes[i];
    s->slot_of[u] = prev + i;
    s->slot_pos[prev + i] = pos[first + i] = ctx_len - 1 + depth[u]; /* the root sits at ctx_len - 1 */
    rows[row_first + i] = first + i;
    for (int a = u; a > 0; a = parent[a]) s->dmask[(size_t)i * words + s->slot_of[a] / 64] |= 1ull << (s->slot_of[a] % 64);
  }
  *sb = (cn_seq_batch){.kv = s->dkv, .first = first, .n = n, .tree_prev = prev, .tree_pos = s->slot_pos,
                       .tree_mask = s->dmask};
  return s->piece_n = n;
}

/* After the piece's forward: a catch-up chunk is committed, a level's slots stay reserved for the
 * tree. Returns 1 for a level. */
static int take_piece(cn_spec *s) {
  int n = s->piece_n;
  s->piece_n = 0;
  s->stats->draft_forwards++;
  if (s->catch_from < s->seq_len) {
    cn_kv_seq_commit(s->dkv, s->seq + s->catch_from, n);
    s->catch_from += n;
    return 0;
  }
  s->n_fed += n;
  return 1;
}

int cn_spec_draft_begin(cn_spec *s, cn_kv_seq *target_kv, const int32_t *tokens, int n_tokens, canopy_stats *stats) {
  int st = step_begin(s, target_kv, tokens, n_tokens, stats);
  s->step_chained = 0;
  if (st) return st;
  cn_grow_params gp = {.spec = &s->spec, .root_token = tokens[n_tokens - 1], .vocab = s->vocab,
                       .picker = s->stochastic ? pick_sampled : cn_pick_topk, .picker_ctx = s,
                       .sampled = s->stochastic, .log_tau = s->log_tau};
  return cn_tree_grower_start(&s->grower, &gp);
}

int cn_spec_drafting(const cn_spec *s) {
  return s->catch_from < s->seq_len || cn_tree_grower_frontier((cn_tree_grower *)&s->grower, NULL, NULL) > 0;
}

int cn_spec_draft_piece(cn_spec *s, int first, int room, int32_t *tokens, int32_t *pos, int32_t *rows, int row_first,
                        cn_seq_batch *sb) {
  s->piece_n = 0;
  if (s->catch_from < s->seq_len) return catch_up_piece(s, first, room, tokens, pos, rows, row_first, sb);
  /* A tree level: one tree-masked piece over the grower's frontier. */
  const cn_tree *t;
  const int32_t *frontier;
  int n = cn_tree_grower_frontier(&s->grower, &t, &frontier);
  if (n <= 0 || n > room) return 0;
  for (int i = 0; i < n; i++) tokens[first + i] = t->token[frontier[i]];
  return level_piece(s, frontier, n, t->parent, t->depth, first, pos, rows, row_first, sb);
}

int cn_spec_draft_rows(const cn_spec *s) {
  if (!s->piece_n) return 0;
  return s->catch_from < s->seq_len ? s->piece_last : s->piece_n;
}

/* Hands the level's distributions to the grower; the root's comes from the catch-up, and a
 * level with nothing to feed (the root again) is answered without a forward. */
/* q = the draft's distribution of output row `row`: from its logits, or (greedy trees) zero but
 * for the row's top k, which is all the picker looks at. */
static void draft_probs(cn_spec *s, const cn_draft_out *o, int row, float *q) {
  if (o->logits) {
    cn_sampler_probs(&s->dist, o->logits + (size_t)row * s->vocab, q);
    return;
  }
  memset(q, 0, sizeof *q * (size_t)s->vocab);
  for (int j = 0; j < o->k; j++) q[o->ids[(size_t)row * o->k + j]] = expf(o->logp[(size_t)row * o->k + j]);
}

static int give_level(cn_spec *s, const cn_draft_out *o) {
  const cn_tree *t;
  const int32_t *frontier;
  int n = cn_tree_grower_frontier(&s->grower, &t, &frontier);
  for (int i = 0; i < n; i++) {
    float *q = s->dprobs + (size_t)frontier[i] * s->vocab;
    if (o) draft_probs(s, o, i, q);
    s->probs_out[i] = q;
  }
  return cn_tree_grower_give(&s->grower, s->probs_out);
}

int cn_spec_draft_top_k(const cn_spec *s) { return s->top_k; }

int cn_spec_draft_take(cn_spec *s, const cn_draft_out *o) {
  int n = s->piece_n;
  if (!n) return CANOPY_OK;
  if (!o->logits && (s->top_k <= 0 || o->k < s->top_k || !o->ids || !o->logp))
    return cn_error(CANOPY_ERR_INVALID_ARG, "draft: %d best ids a row given, this tree needs %s", o->k,
                    s->top_k > 0 ? "more" : "the logits");
  if (take_piece(s)) return give_level(s, o);
  if (!s->piece_last) return CANOPY_OK;
  draft_probs(s, o, 0, s->dprobs); /* the root is node 0 of every tree */
  return give_level(s, NULL);
}

int cn_spec_draft_end(cn_spec *s) {
  int st = cn_tree_grower_finish(&s->grower, &s->tree, s->oracle_index);
  if (!st) s->log_tau = cn_tree_grower_next_log_tau(&s->grower);
  s->stats->draft_s += now_s() - s->draft_t0;
  return st;
}

int cn_spec_draft(cn_spec *s, cn_kv_seq *target_kv, const int32_t *tokens, int n_tokens, canopy_stats *stats) {
  int st = cn_spec_draft_begin(s, target_kv, tokens, n_tokens, stats);
  int room = s->draft->max_batch < s->dbatch ? s->draft->max_batch : s->dbatch;
  while (!st && cn_spec_drafting(s)) {
    cn_seq_batch sb;
    int n = cn_spec_draft_piece(s, 0, room, s->dtok, s->dpos, s->drows, 0, &sb);
    if (n <= 0) {
      st = cn_error(CANOPY_ERR_INVALID_ARG, "draft: a tree level of %d nodes does not fit a batch of %d (internal)",
                    cn_tree_grower_frontier(&s->grower, NULL, NULL), room);
      break;
    }
    cn_batch b = {.n_tokens = n, .tokens = s->dtok, .pos = s->dpos, .n_seqs = 1, .seqs = &sb,
                  .n_logits = cn_spec_draft_rows(s), .logit_rows = s->drows};
    cn_draft_out o = {.logits = s->dlogits};
    if (s->top_k > 0) {
      b.top = s->dtop, b.top_k = s->top_k, b.top_logp = s->dtop_logp;
      o = (cn_draft_out){.ids = s->dtop, .logp = s->dtop_logp, .k = s->top_k};
    }
    st = cn_forward(s->draft, &b, s->top_k > 0 ? NULL : s->dlogits);
    if (st) st = cn_error_wrap(st, "draft");
    else st = cn_spec_draft_take(s, &o);
  }
  if (!st) return cn_spec_draft_end(s);
  s->stats->draft_s += now_s() - s->draft_t0;
  return st;
}

int cn_spec_batch(cn_spec *s, cn_kv_seq *target_kv, int first, int32_t *tokens, int32_t *pos, int32_t *rows,
                  cn_seq_batch *sb) {
  const cn_tree *t = &s->tree;
  int ctx_len = cn_kv_seq_len(target_kv);
  cn_tree_mask(t, s->tmask, WORDS(t->n));
  for (int i = 0; i < t->n; i++) {
    tokens[first + i] = t->token[i];
    pos[first + i] = ctx_len + t->depth[i];
    rows[first + i] = first + i;
  }
  *sb = (cn_seq_batch){.kv = target_kv, .first = first, .n = t->n, .tree_mask = s->tmask};
  return t->n;
}

typedef struct target_rows {
  cn_spec *s;
  cn_sampler *sampler;
  const float *logits; /* [tree nodes][V] */
} target_rows;

static int target_row(void *ctx, int node, const float **row) {
  target_rows *r = ctx;
  float *p = r->s->tprobs + (size_t)node * r->s->vocab;
  cn_sampler_probs(r->sampler, r->logits + (size_t)node * r->s->vocab, p);
  *row = p;
  return CANOPY_OK;
}

/* Commits the accepted path acc[0, n_acc) (root excluded) in both caches, writes the new tokens
 * and the step's statistics; t1 is when acceptance started. */
static int commit_path(cn_spec *s, cn_kv_seq *target_kv, double t1, const int32_t *acc, int n_acc, int32_t bonus,
                       int32_t *out, int *n_out, canopy_stats *stats) {
  const cn_tree *t = &s->tree;
  int st;
  /* Commit: the root and the accepted path move to consecutive positions in both caches. */
  int slots[CN_TREE_MAX_NODES];
  int32_t toks[CN_TREE_MAX_NODES];
  slots[0] = 0;
  toks[0] = t->token[0];
  for (int i = 0; i < n_acc; i++) {
    slots[i + 1] = acc[i];
    toks[i + 1] = t->token[acc[i]];
  }
  st = cn_kv_seq_commit_slots(target_kv, slots, toks, n_acc + 1);
  /* The draft fed a prefix of the path (a node with children was fed, and so were its
   * ancestors); the rest it catches up on next step. */
  int n_draft = 0;
  while (n_draft < n_acc) {
    int o = s->oracle_index[acc[n_draft]];
    if (o < 0 || s->slot_of[o] < 0) break;
    slots[n_draft] = s->slot_of[o];
    n_draft++;
  }
  if (!st) st = cn_kv_seq_commit_slots(s->dkv, slots, toks + 1, n_draft);
  if (!st) cn_kv_seq_truncate(s->dkv, cn_kv_seq_len(s->dkv)); /* drop the rest of the tree's slots */
  if (st) return st;

  for (int i = 0; i < n_acc; i++) out[i] = toks[i + 1];
  out[n_acc] = bonus;
  *n_out = n_acc + 1;
  stats->verify_s += now_s() - t1;
  stats->spec_steps++;
  stats->spec_tokens += n_acc + 1;
  stats->tree_nodes += t->n - 1;
  int depth = cn_tree_max_depth(t);
  for (int d = 0; d < depth && d < CANOPY_STATS_MAX_DEPTH; d++) stats->offered_depth[d]++;
  for (int d = 0; d < n_acc && d < CANOPY_STATS_MAX_DEPTH; d++) stats->accept_depth[d]++;
  /* Positional acceptance along the walk: at each visited node with children, the children
   * before the accepted one were tried and rejected; with none accepted, all were tried. */
  for (int i = 0, u = 0; i <= n_acc; i++) {
    int tried = i < n_acc ? t->rank[acc[i]] + 1 : t->n_children[u];
    for (int k = 0; k < tried && k < CANOPY_STATS_MAX_DEPTH; k++) stats->offered_rank[k]++;
    if (i < n_acc && t->rank[acc[i]] < CANOPY_STATS_MAX_DEPTH) stats->accept_rank[t->rank[acc[i]]]++;
    if (i < n_acc) u = acc[i];
  }
  return CANOPY_OK;
}

int cn_spec_accept(cn_spec *s, cn_kv_seq *target_kv, const float *logits, cn_sampler *sampler, int32_t *out,
                   int *n_out, canopy_stats *stats) {
  double t1 = now_s();
  const cn_tree *t = &s->tree;
  int32_t acc[CN_TREE_MAX_NODES], bonus;
  int n_acc = 0, st;
  if (s->stochastic) {
    for (int u = 0; u < t->n; u++) {
      int o = s->oracle_index[u];
      s->qrows[u] = t->n_children[u] > 0 && o >= 0 ? s->dprobs + (size_t)o * s->vocab : NULL;
    }
    /* Only the rows the walk visits (depth + 1 at most) go through top-k/top-p: a full sort of
     * the vocabulary per row, for every node of the tree, would cost more than the walk. */
    target_rows rows = {.s = s, .sampler = sampler, .logits = logits};
    double u[2 * CN_TREE_MAX_NODES]; /* as many as the chained step takes, whatever t->n is */
    cn_accept_uniforms(&sampler->rng, cn_spec_max_nodes(s), u);
    st = cn_accept_stochastic_u(t, target_row, &rows, s->qrows, s->vocab, u, s->scratch, acc, &n_acc, &bonus);
  } else {
    st = cn_accept_greedy(t, logits, s->vocab, acc, &n_acc, &bonus);
  }
  if (st) return st;
  return commit_path(s, target_kv, t1, acc, n_acc, bonus, out, n_out, stats);
}

int cn_spec_greedy(const cn_spec *s) { return !s->stochastic; }

int cn_spec_accept_top(cn_spec *s, cn_kv_seq *target_kv, const int32_t *top, int32_t *out, int *n_out,
                       canopy_stats *stats) {
  if (s->stochastic)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_spec_accept_top: sampled acceptance needs the target's logits");
  double t1 = now_s();
  int32_t acc[CN_TREE_MAX_NODES], bonus;
  int n_acc = 0, st = cn_accept_greedy_top(&s->tree, top, s->vocab, acc, &n_acc, &bonus);
  return st ? st : commit_path(s, target_kv, t1, acc, n_acc, bonus, out, n_out, stats);
}

/* ---- the chained step (struct cn_spec, `chained`), in pieces ---------------------------------- */

int cn_spec_chain_begin(cn_spec *s, cn_kv_seq *target_kv, const int32_t *tokens, int n_tokens, int K,
                        canopy_stats *stats) {
  if (!s->chained || K < chain_width(s))
    return cn_error(CANOPY_ERR_INVALID_ARG, "speculation: a chained step of rows of %d ids (this tree needs %d)%s", K,
                    chain_width(s), s->chained ? "" : " for a tree that does not chain");
  int st = step_begin(s, target_kv, tokens, n_tokens, stats);
  s->step_chained = 1;
  s->chain_k = K;
  s->chain_level = 1;
  s->n_qrows = 0;
  return st;
}

/* The fed nodes of level d (those the spec gives children) into s->frontier_buf; their count. */
static int level_nodes(cn_spec *s, int d) {
  const cn_tree_spec *sp = &s->spec;
  int n = 0;
  for (int u = 1; u <= sp->n_nodes && sp->node_depth[u] <= d; u++)
    if (sp->node_depth[u] == d && sp->n_children[u]) s->frontier_buf[n++] = u;
  return n;
}

int cn_spec_chain_drafting(cn_spec *s) {
  if (s->catch_from < s->seq_len) return 1;
  if (s->dyn) return s->chain_level < s->dyn_layout.D;
  while (s->chain_level < s->spec.depth && !level_nodes(s, s->chain_level)) s->chain_level++;
  return s->chain_level < s->spec.depth;
}

/* A dynamic tree's level d: its K fed nodes (tokens, mask and positions staged from the state)
 * after the (d - 1) K slots of the levels before; they grow level d + 1 from their rows. */
static int dyn_level_piece(cn_spec *s, int first, int room, int32_t *tokens, int32_t *pos, int32_t *src,
                           int32_t *rows, int row_first, cn_seq_batch *sb, cn_dyn_step *dyn) {
  const cn_dyn_layout *l = &s->dyn_layout;
  int d = s->chain_level, K = l->K;
  if (K > room) return 0;
  for (int i = 0; i < K; i++) {
    tokens[first + i] = 0; /* staged */
    src[first + i] = -1;
    rows[row_first + i] = first + i;
  }
  *sb = (cn_seq_batch){.kv = s->dkv, .first = first, .n = K, .tree_prev = (d - 1) * K, .tree_pos = s->slot_pos,
                       .tree_mask = s->dyn_mask};
  *dyn = (cn_dyn_step){.layout = l, .ids = &s->ids, .grow = d + 1, .row = row_first, .stage = d,
                       .pos0 = cn_kv_seq_len(s->dkv) - 1, .mask = s->dyn_mask, .pos = pos + first,
                       .tree_pos = s->slot_pos};
  return s->piece_n = K;
}

/* A sampled tree's fed node u draws its children in output row r of the piece: its qbuf row, and
 * its uniforms from the draft's rng (draw_k of them, as the host path's picker takes; the rest of
 * a wider row's draws are never used). */
static void sampled_row(cn_spec *s, int u, int r, double *u_out, float **q_out) {
  s->chain_qrow[u] = s->n_qrows;
  q_out[r] = cn_rows_at(&s->qbuf, s->n_qrows++);
  for (int j = 0; j < s->chain_k; j++) u_out[(size_t)r * s->chain_k + j] = j < s->draw_k ? cn_rng_uniform(&s->rng) : 0.5;
}

int cn_spec_chain_piece(cn_spec *s, int first, int room, int32_t *tokens, int32_t *pos, int32_t *src, int32_t *rows,
                        int row_first, int ids_row, double *uni, float **q_out, cn_seq_batch *sb, cn_dyn_step *dyn) {
  s->piece_n = 0;
  dyn->layout = NULL;
  if (s->stochastic && (!uni || !q_out))
    return cn_error(CANOPY_ERR_INVALID_ARG, "speculation: a sampled tree's chained piece needs u and q_out");
  if (s->catch_from < s->seq_len) {
    int n = catch_up_piece(s, first, room, tokens, pos, rows, row_first, sb);
    for (int i = 0; i < n; i++) src[first + i] = -1;
    if (n && s->piece_last && !s->dyn) s->chain_row[0] = ids_row; /* the root's picks: row 0 of the tree */
    if (n && s->piece_last && s->stochastic) sampled_row(s, 0, row_first, uni, q_out);
    if (n && s->piece_last && s->dyn) /* the root's picks grow level 0 */
      *dyn = (cn_dyn_step){.layout = &s->dyn_layout, .ids = &s->ids, .grow = 1, .row = row_first};
    return n;
  }
  if (s->dyn) return dyn_level_piece(s, first, room, tokens, pos, src, rows, row_first, sb, dyn);
  /* Level d: each fed node's token is its parent's pick of its rank; its own picks take the next
   * rows. */
  const cn_tree_spec *sp = &s->spec;
  int n = level_nodes(s, s->chain_level);
  if (n <= 0 || n > room) return 0;
  for (int i = 0; i < n; i++) {
    int u = s->frontier_buf[i];
    tokens[first + i] = 0; /* from src */
    src[first + i] = s->chain_row[sp->parent[u]] * s->chain_k + sp->rank[u];
    s->chain_row[u] = ids_row + i;
    if (s->stochastic) sampled_row(s, u, row_first + i, uni, q_out);
  }
  return level_piece(s, s->frontier_buf, n, sp->parent, sp->node_depth, first, pos, rows, row_first, sb);
}

void cn_spec_chain_take(cn_spec *s) {
  if (s->piece_n && take_piece(s)) s->chain_level++;
}

/* A dynamic tree's verification: its T nodes (the root's token from the host, the rest, their
 * mask, positions and parents staged from the kept tree), the tree itself coming back with the
 * result. */
static int dyn_batch(cn_spec *s, cn_kv_seq *target_kv, int first, int32_t *tokens, int32_t *pos, int32_t *src,
                     int32_t *rows, int32_t *parent, cn_seq_batch *sb, cn_dyn_step *dyn) {
  const cn_dyn_layout *l = &s->dyn_layout;
  s->stats->draft_s += now_s() - s->draft_t0;
  for (int o = 0; o < l->T; o++) {
    tokens[first + o] = o ? 0 : s->seq[s->seq_len - 1];
    src[first + o] = -1;
    rows[first + o] = first + o;
    parent[first + o] = o - 1; /* a well-formed stand-in: the forward stages the real parents */
  }
  *sb = (cn_seq_batch){.kv = target_kv, .first = first, .n = l->T, .tree_mask = s->tmask};
  *dyn = (cn_dyn_step){.layout = l, .ids = &s->ids, .stage = -1, .pos0 = cn_kv_seq_len(target_kv), .mask = s->tmask,
                       .pos = pos + first, .parent = parent + first, .tree_out = s->dyn_tree};
  return l->T;
}

int cn_spec_chain_batch(cn_spec *s, cn_kv_seq *target_kv, int first, int32_t *tokens, int32_t *pos, int32_t *src,
                        int32_t *rows, int32_t *parent, cn_sampler *sampler, double *acc_u, float **acc_q,
                        cn_seq_batch *sb, cn_dyn_step *dyn) {
  cn_tree *t = &s->tree;
  dyn->layout = NULL;
  if (s->stochastic && (!s->step_chained || !sampler || !acc_u || !acc_q))
    return cn_error(CANOPY_ERR_INVALID_ARG, "speculation: a sampled tree verifies chained only after a chained draft, "
                    "with its sampler, acc_u and acc_q");
  if (s->dyn && s->step_chained) return dyn_batch(s, target_kv, first, tokens, pos, src, rows, parent, sb, dyn);
  if (!s->step_chained) { /* a greedy tree the host grew (cn_spec_draft_end): its tokens are on the host */
    for (int u = 0; u < t->n; u++) {
      src[first + u] = -1;
      parent[first + u] = t->parent[u];
    }
    return cn_spec_batch(s, target_kv, first, tokens, pos, rows, sb);
  }
  s->stats->draft_s += now_s() - s->draft_t0;
  /* The tree is the spec's shape; its tokens are where the draft left its picks. */
  const cn_tree_spec *sp = &s->spec;
  cn_tree_reset(t, s->seq[s->seq_len - 1]);
  for (int u = 1; u <= sp->n_nodes; u++)
    cn_tree_add(t, sp->parent[u], 0, 0.0f);
  for (int u = 0; u < t->n; u++) {
    s->oracle_index[u] = u;
    src[first + u] = u ? s->chain_row[sp->parent[u]] * s->chain_k + sp->rank[u] : -1;
    parent[first + u] = sp->parent[u];
  }
  if (s->stochastic) { /* acceptance's uniforms as the host path draws them; each node's q where it was drawn */
    s->acc_rule = cn_sampler_rule(sampler);
    cn_accept_uniforms(&sampler->rng, cn_spec_max_nodes(s), acc_u + 2 * (size_t)first);
    for (int u = 0; u < t->n; u++)
      acc_q[first + u] = sp->n_children[u] > 0 ? cn_rows_at(&s->qbuf, s->chain_qrow[u]) : NULL;
  }
  return cn_spec_batch(s, target_kv, first, tokens, pos, rows, sb);
}

/* The tree the verification staged (t_token, t_parent, t_pick, t_fed, t_n as cn_dyn_step's
 * tree_out) becomes s->tree, with each node's fed index (oracle_index) and each fed node's draft
 * slot, for acceptance's result and the commit. */
static int dyn_take_tree(cn_spec *s, int32_t root) {
  const cn_dyn_layout *l = &s->dyn_layout;
  const int32_t *tok = s->dyn_tree, *par = tok + l->T, *pick = par + l->T, *fed = pick + l->T;
  int n = tok[4 * l->T];
  cn_tree *t = &s->tree;
  cn_tree_reset(t, root);
  s->oracle_index[0] = 0;
  int st = n < 1 || n > l->T ? -1 : 0;
  for (int o = 1; !st && o < n; o++) {
    if (par[o] < 0 || par[o] >= o || tok[o] < 0 || tok[o] >= s->vocab || fed[o] >= l->R ||
        cn_tree_add(t, par[o], tok[o], 0.0f) != o || t->rank[o] != pick[o])
      st = -1;
    s->oracle_index[o] = fed[o];
  }
  if (st)
    return cn_error(CANOPY_ERR_DEVICE, "speculation: the dynamic tree grown on the %s backend is malformed (%d nodes)",
                    s->target->be->name, n);
  for (int f = 1; f < l->R; f++) s->slot_of[f] = f - 1;
  return CANOPY_OK;
}

int cn_spec_chain_accept(cn_spec *s, cn_kv_seq *target_kv, const int32_t *result, int32_t *out, int *n_out,
                         canopy_stats *stats) {
  if (s->stochastic && !s->step_chained)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_spec_chain_accept: a sampled tree grown on the host needs the target's "
                    "logits");
  int st = s->dyn && s->step_chained ? dyn_take_tree(s, s->seq[s->seq_len - 1]) : CANOPY_OK;
  cn_tree *t = &s->tree;
  int n = t->n, n_acc = result[0];
  if (!st && (n_acc < 0 || n_acc > cn_tree_max_depth(t) || result[1] < 0 || result[1] >= s->vocab))
    st = cn_error(CANOPY_ERR_DEVICE, "speculation: acceptance on the device returned %d nodes, bonus %d", n_acc,
                  result[1]);
  for (int i = 0, u = 0; !st && i < n_acc; i++) {
    int v = result[2 + i], tok = result[2 + n + i];
    if (v <= 0 || v >= n || t->parent[v] != u || tok < 0 || tok >= s->vocab || (!s->step_chained && tok != t->token[v]))
      st = cn_error(CANOPY_ERR_DEVICE, "speculation: acceptance on the device returned node %d (token %d) after %d",
                    v, tok, u);
    else t->token[v] = tok, u = v;
  }
  if (st) {
    cn_spec_truncate(s, cn_kv_seq_len(s->dkv)); /* the levels' slots */
    return st;
  }
  return commit_path(s, target_kv, now_s(), result + 2, n_acc, result[1], out, n_out, stats);
}

/* The whole step for one sequence, with one wait: the draft's pieces and the verification queued
 * back to back on this spec's own ids, and the host reads acceptance's result. draft_s is the time
 * to queue the draft's forwards; verify_s runs until the result is in, so it includes what the
 * device still had of the draft. */
static int chained_step(cn_spec *s, cn_kv_seq *target_kv, const int32_t *tokens, int n_tokens, cn_sampler *sampler,
                        int32_t *out, int *n_out, canopy_stats *stats) {
  int st = cn_spec_chain_begin(s, target_kv, tokens, n_tokens, chain_width(s), stats);
  int room = s->draft->max_batch < s->dbatch ? s->draft->max_batch : s->dbatch, ids_row = 0;
  while (!st && cn_spec_chain_drafting(s)) {
    cn_seq_batch sb;
    cn_dyn_step dyn;
    int n = cn_spec_chain_piece(s, 0, room, s->dtok, s->dpos, s->dsrc, s->drows, 0, ids_row, s->du, s->dq, &sb, &dyn);
    if (n <= 0) {
      st = cn_error(CANOPY_ERR_INVALID_ARG, "draft: a tree level does not fit a batch of %d", room);
      break;
    }
    /* A static tree's picks go to the ids, a dynamic tree grows from them where they are. */
    int rows = cn_spec_draft_rows(s), level = s->catch_from == s->seq_len && !s->dyn;
    int K = chain_width(s);
    cn_batch b = {.n_tokens = n, .tokens = s->dtok, .pos = s->dpos, .n_seqs = 1, .seqs = &sb, .n_logits = rows,
                  .logit_rows = s->drows, .top = s->dtop, .top_k = K, .top_logp = dyn.layout ? s->dtop_logp : NULL,
                  .token_src = level ? s->dsrc : NULL, .src_ids = &s->ids, .top_ids = rows && !s->dyn ? &s->ids : NULL,
                  .top_ids_at = ids_row * K, .n_dyn = dyn.layout != NULL, .dyn = &dyn};
    if (s->stochastic && rows) b.sample = &s->draw_rule, b.u = s->du, b.q_out = s->dq;
    if ((st = cn_forward(s->draft, &b, NULL))) st = cn_error_wrap(st, "draft");
    cn_spec_chain_take(s);
    ids_row += rows;
  }
  if (st) {
    cn_spec_truncate(s, cn_kv_seq_len(s->dkv));
    return st;
  }
  double t1 = now_s();
  cn_seq_batch sb;
  cn_dyn_step dyn;
  int n = cn_spec_chain_batch(s, target_kv, 0, s->tbuf_tokens, s->tpos, s->tsrc, s->trows, s->tparent, sampler, s->tu,
                              s->tq, &sb, &dyn);
  int32_t top[CN_TREE_MAX_NODES];
  cn_batch b = {.n_tokens = n, .tokens = s->tbuf_tokens, .pos = s->tpos, .n_seqs = 1, .seqs = &sb, .n_logits = n,
                .logit_rows = s->trows, .top = top, .token_src = s->dyn ? NULL : s->tsrc, .src_ids = &s->ids,
                .accept_parent = s->tparent, .accept_out = s->acc_out, .n_dyn = dyn.layout != NULL, .dyn = &dyn};
  if (s->stochastic)
    b.top = NULL, b.accept_sample = &s->acc_rule, b.accept_q = s->tq, b.accept_u = s->tu,
    b.accept_rows = &s->target->step_prows;
  st = n < 0 ? n : CANOPY_OK;
  if (!st && s->stochastic) st = cn_rows_reserve(s->target, &s->target->step_prows, n + 2);
  if (!st) st = cn_forward(s->target, &b, NULL);
  if (st) {
    cn_spec_truncate(s, cn_kv_seq_len(s->dkv));
    return st;
  }
  stats->forward_passes++;
  stats->verify_s += now_s() - t1;
  return cn_spec_chain_accept(s, target_kv, s->acc_out, out, n_out, stats);
}

int cn_spec_step(cn_spec *s, cn_kv_seq *target_kv, const int32_t *tokens, int n_tokens, cn_sampler *sampler,
                 int32_t *out, int *n_out, canopy_stats *stats) {
  if (s->chained) return chained_step(s, target_kv, tokens, n_tokens, sampler, out, n_out, stats);
  int st = cn_spec_draft(s, target_kv, tokens, n_tokens, stats);
  if (st) return st;
  double t0 = now_s();
  cn_seq_batch sb;
  int n = cn_spec_batch(s, target_kv, 0, s->tbuf_tokens, s->tpos, s->trows, &sb);
  /* Greedy acceptance needs each node's top token only: n ids cross to the host, not n rows of
   * logits (on CUDA the argmax runs on the device, and the forward stays one captured graph). */
  int32_t top[CN_TREE_MAX_NODES];
  cn_batch b = {.n_tokens = n, .tokens = s->tbuf_tokens, .pos = s->tpos, .n_seqs = 1, .seqs = &sb,
                .n_logits = n, .logit_rows = s->trows, .top = s->stochastic ? NULL : top};
  st = cn_forward(s->target, &b, s->stochastic ? s->tlogits : NULL);
  if (st) return st;
  stats->forward_passes++;
  stats->verify_s += now_s() - t0;
  if (!s->stochastic) return cn_spec_accept_top(s, target_kv, top, out, n_out, stats);
  return cn_spec_accept(s, target_kv, s->tlogits, sampler, out, n_out, stats);
}
