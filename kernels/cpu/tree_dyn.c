/* The host twin of a dynamic tree grown where the draft's picks are (kernels/tree_dyn.h): the
 * arithmetic and the order of draft/tree_grow.c's EAGLE-2 grower, over the fixed-shape state in an
 * ids buffer. */
#include <math.h>
#include <string.h>

#include "kernels/cpu/ops.h"

static float as_f(int32_t w) {
  float f;
  memcpy(&f, &w, sizeof f);
  return f;
}

static int32_t as_w(float f) {
  int32_t w;
  memcpy(&w, &f, sizeof w);
  return w;
}

/* Fed node f's candidates from its row of picks (ids, logp: the draft's best K). The grower's
 * picker sees q = exp(logp) and takes the tokens with q > 0, likeliest first, ties to the lower id;
 * a pick's log q is capped at 0, and a candidate's score is the running minimum of its parent's
 * score plus log q over the picks (draft/tree_grow.c, dynamic_give). */
static void expand(int32_t *w, const cn_dyn_layout *l, int f, const int32_t *ids, const float *logp) {
  const int K = l->K;
  int order[32], n = 0;
  float q[32];
  for (int i = 0; i < K; i++) {
    q[i] = expf(logp[i]);
    if (!(q[i] > 0)) continue;
    int at = n++;
    for (; at > 0; at--) { /* insertion: q descending, ties to the lower id */
      int o = order[at - 1];
      if (q[o] > q[i] || (q[o] == q[i] && ids[o] < ids[i])) break;
      order[at] = o;
    }
    order[at] = i;
  }
  int valid = w[l->f_valid + f];
  float score = as_f(w[l->f_score + f]), path = as_f(w[l->f_logp + f]), prev = INFINITY;
  for (int r = 0; r < K; r++) {
    int c = f * K + r;
    w[l->c_fed + c] = -1;
    w[l->c_valid + c] = valid && r < n;
    if (!(valid && r < n)) continue;
    float logq = fminf(logf(q[order[r]]), 0.0f), s = fminf(score + logq, prev);
    prev = s;
    w[l->c_token + c] = ids[order[r]];
    w[l->c_score + c] = as_w(s);
    w[l->c_logp + c] = as_w(path + logq);
  }
}

/* The grower's candidate order (cand_before): higher score first, then the shallower node, the
 * lower parent, the lower pick; with fed nodes numbered level by level in BFS order, that is the
 * lower candidate index. */
static int before(const int32_t *w, const cn_dyn_layout *l, int a, int b) {
  float sa = as_f(w[l->c_score + a]), sb = as_f(w[l->c_score + b]);
  return sa != sb ? sa > sb : a < b;
}

/* Sorts idx[0, n) by `before` (best first), or by index when by_index. */
static void sort_cands(const int32_t *w, const cn_dyn_layout *l, int32_t *idx, int n, int by_index) {
  for (int i = 1; i < n; i++) {
    int32_t v = idx[i];
    int k = i;
    for (; k > 0 && (by_index ? v < idx[k - 1] : before(w, l, v, idx[k - 1])); k--) idx[k] = idx[k - 1];
    idx[k] = v;
  }
}

/* Level d + 1's fed nodes: the K best candidates of depth d + 1 (the level's picks), fed in BFS
 * order; slots with no candidate left are invalid. */
static void select_level(int32_t *w, const cn_dyn_layout *l, int d) {
  const int K = l->K, lo = cn_dyn_level_first(l, d) * K, hi = lo + (d == 0 ? 1 : K) * K;
  int32_t idx[32 * 32];
  int n = 0;
  for (int c = lo; c < hi; c++)
    if (w[l->c_valid + c]) idx[n++] = c;
  sort_cands(w, l, idx, n, 0);
  n = n < K ? n : K;
  sort_cands(w, l, idx, n, 1);
  for (int j = 0, f = cn_dyn_level_first(l, d + 1); j < K; j++, f++) {
    int c = j < n ? idx[j] : -1;
    w[l->f_parent + f] = c >= 0 ? c / K : -1;
    w[l->f_token + f] = c >= 0 ? w[l->c_token + c] : 0;
    w[l->f_depth + f] = d + 1;
    w[l->f_valid + f] = c >= 0;
    w[l->f_score + f] = c >= 0 ? w[l->c_score + c] : as_w(-INFINITY);
    w[l->f_logp + f] = c >= 0 ? w[l->c_logp + c] : as_w(-INFINITY);
    if (c >= 0) w[l->c_fed + c] = f;
  }
}

/* The N best candidates, renumbered in BFS order (siblings in pick order) behind the root, then
 * padding. Returns 0, or -1 when a kept node's parent was not kept (cannot happen: the kept set is
 * a prefix of an order that puts parents first). */
static int rerank(int32_t *w, const cn_dyn_layout *l, int32_t *idx) {
  int n = 0;
  for (int c = 0; c < l->C; c++)
    if (w[l->c_valid + c]) idx[n++] = c;
  sort_cands(w, l, idx, n, 0);
  n = n < l->N ? n : l->N;
  sort_cands(w, l, idx, n, 1);
  int32_t *to_out = idx + l->C; /* fed node -> its node in the tree */
  for (int f = 0; f < l->R; f++) to_out[f] = -1;
  to_out[0] = 0;
  w[l->t_token] = -1, w[l->t_parent] = -1, w[l->t_pick] = 0, w[l->t_fed] = 0;
  int st = 0;
  for (int o = 1; o < l->T; o++) {
    int c = o <= n ? idx[o - 1] : -1, p = c >= 0 ? to_out[c / l->K] : -2;
    if (c >= 0 && p < 0) st = -1;
    w[l->t_token + o] = c >= 0 ? w[l->c_token + c] : 0;
    w[l->t_parent + o] = p;
    w[l->t_pick + o] = c >= 0 ? c % l->K : 0;
    w[l->t_fed + o] = c >= 0 ? w[l->c_fed + c] : -1;
    if (c >= 0 && w[l->c_fed + c] >= 0) to_out[w[l->c_fed + c]] = o;
  }
  w[l->t_n] = 1 + n;
  return st;
}

int cn_cpu_dyn_grow(int32_t *w, const cn_dyn_layout *l, int level, const int32_t *top, const float *logp, int k) {
  if (level == 0) { /* a new tree: the root alone */
    w[l->f_parent] = -1, w[l->f_token] = -1, w[l->f_depth] = 0, w[l->f_valid] = 1;
    w[l->f_score] = as_w(0.0f), w[l->f_logp] = as_w(0.0f);
    for (int c = 0; c < l->C; c++) w[l->c_valid + c] = 0, w[l->c_fed + c] = -1;
  }
  int first = cn_dyn_level_first(l, level), n = level == 0 ? 1 : l->K;
  for (int j = 0; j < n; j++) expand(w, l, first + j, top + (size_t)j * k, logp + (size_t)j * k);
  if (level + 1 < l->D) {
    select_level(w, l, level);
    return 0;
  }
  return rerank(w, l, w + l->scratch);
}

void cn_cpu_dyn_stage(const int32_t *w, const cn_dyn_layout *l, int level, int pos0, uint64_t *mask, int32_t *pos,
                      int32_t *tree_pos, int32_t *parent, int32_t *tokens) {
  if (level > 0) { /* draft level: K fed nodes after the (level - 1) K of the levels before */
    int first = cn_dyn_level_first(l, level), words = (level * l->K + 63) / 64;
    for (int g = 1; g < first + l->K; g++) tree_pos[g - 1] = pos0 + w[l->f_depth + g];
    for (int i = 0; i < l->K; i++) {
      uint64_t *row = mask + (size_t)i * words;
      memset(row, 0, sizeof *row * (size_t)words);
      for (int g = first + i; g > 0; g = w[l->f_parent + g]) row[(g - 1) / 64] |= 1ull << ((g - 1) % 64);
      pos[i] = pos0 + w[l->f_depth + first + i];
      if (tokens) tokens[i] = w[l->f_token + first + i];
    }
    return;
  }
  int words = (l->T + 63) / 64;
  for (int o = 0; o < l->T; o++) {
    uint64_t *row = mask + (size_t)o * words;
    memset(row, 0, sizeof *row * (size_t)words);
    int depth = 0;
    for (int u = o;; depth++) {
      row[u / 64] |= 1ull << (u % 64);
      if (w[l->t_parent + u] < 0) break;
      u = w[l->t_parent + u];
    }
    pos[o] = pos0 + depth;
    parent[o] = w[l->t_parent + o];
    if (tokens && o > 0) tokens[o] = w[l->t_token + o];
  }
}
