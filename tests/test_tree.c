/* Token trees: every spec form parses to its canonical shape and every malformed one fails naming
 * its fault; static shapes grow into exactly the expected trees; dynamic trees equal a brute-force
 * EAGLE-2 reference (grow every top-k expansion, keep the best N), with one oracle call per level
 * whose frontier is all at that level's depth. Distributions come from a synthetic oracle keyed
 * by the node's token path and the printed seed. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "canopy.h"
#include "common/error.h"
#include "draft/tree.h"
#include "draft/tree_grow.h"
#include "draft/tree_spec.h"
#include "kernels/cpu/ops.h"
#include "tests/testing.h"

static uint64_t seed;

#define VOCAB 64
#define MAX_CALLS (CN_TREE_MAX_DEPTH + 1)
#define MAX_PATH (CN_TREE_MAX_DEPTH + 1)

/* ---- helpers -------------------------------------------------------------------------------- */

static cn_tree_spec parse_ok(const char *text) {
  cn_tree_spec s;
  int rc = cn_tree_spec_parse(text, &s);
  if (rc) fprintf(stderr, "parsing '%s': %s\n", text, canopy_last_error());
  assert_int_equal(rc, CANOPY_OK);
  return s;
}

/* The token path root..i (root token first); returns its length, depth + 1. */
static int tree_path(const cn_tree *t, int i, int32_t *tok) {
  int len = t->depth[i] + 1, k = len;
  for (int a = i; a >= 0; a = t->parent[a])
    tok[--k] = t->token[a];
  assert_int_equal(k, 0);
  return len;
}

static uint64_t path_hash(const int32_t *tok, int len) {
  uint64_t h = 1469598103934665603ull;
  for (int i = 0; i < len; i++)
    h = (h ^ (uint32_t)tok[i]) * 1099511628211ull;
  return h ^ (uint64_t)len << 56;
}

/* draft/tree.h's invariants: BFS order, siblings consecutive, child lists, depths, logp. */
static void check_tree(const cn_tree *t) {
  assert_true(t->n >= 1 && t->n <= CN_TREE_MAX_NODES);
  assert_int_equal(t->parent[0], -1);
  assert_int_equal(t->depth[0], 0);
  assert_true(t->logp[0] == 0);
  int counted[CN_TREE_MAX_NODES] = {0};
  for (int i = 1; i < t->n; i++) {
    int p = t->parent[i];
    assert_true(p >= 0 && p < i);
    assert_int_equal(t->depth[i], t->depth[p] + 1);
    assert_true(t->depth[i] >= t->depth[i - 1]);
    if (t->depth[i] == t->depth[i - 1]) assert_true(p >= t->parent[i - 1]);
    assert_int_equal(t->rank[i], i - t->first_child[p]);
    assert_true(i < t->first_child[p] + t->n_children[p]);
    assert_true(t->logp[i] <= t->logp[p]);
    counted[p]++;
  }
  for (int i = 0; i < t->n; i++) {
    assert_int_equal(counted[i], t->n_children[i]);
    if (!t->n_children[i]) assert_int_equal(t->first_child[i], -1);
  }
}

static void check_mask(const cn_tree *t) {
  uint64_t mask[CN_TREE_MAX_NODES * CN_TREE_MASK_WORDS];
  cn_tree_mask(t, mask, CN_TREE_MASK_WORDS);
  for (int i = 0; i < t->n; i++) {
    int ancestor[CN_TREE_MAX_NODES] = {0};
    for (int a = i; a >= 0; a = t->parent[a])
      ancestor[a] = 1;
    for (int j = 0; j < CN_TREE_MASK_WORDS * 64; j++) {
      int bit = (int)(mask[i * CN_TREE_MASK_WORDS + j / 64] >> (j % 64) & 1);
      assert_int_equal(bit, j < t->n && ancestor[j]);
    }
  }
}

/* ---- the synthetic oracle ------------------------------------------------------------------- */

enum { DIST_RANDOM, DIST_UNIFORM, DIST_SPARSE, DIST_PEAKED };

typedef struct oracle_state {
  uint64_t seed;
  int mode;
  int calls;
  int fail_at; /* the call that fails, -1 for none */
  int n_frontier[MAX_CALLS];
  uint64_t frontier_path[MAX_CALLS][CN_TREE_MAX_NODES]; /* token-path hashes of each call's frontier */
  int32_t frontier_node[MAX_CALLS][CN_TREE_MAX_NODES];
  cn_tree last; /* the tree the last call saw */
  int view_k;   /* > 0: the oracle shows only the top view_k, as q = exp(log q) (a greedy forward's top ids) */
  float probs[CN_TREE_MAX_NODES][VOCAB];
} oracle_state;

static oracle_state O;

static void oracle_reset(uint64_t s, int mode) {
  memset(&O, 0, sizeof O);
  O.seed = s;
  O.mode = mode;
  O.fail_at = -1;
}

/* The draft distribution after a token path: random logits, uniform (ties everywhere), two
 * tokens only (fewer picks than asked), or one-hot at every other node (q = 1: a child as likely
 * as its parent, so only depth tells them apart). */
static void node_dist(const int32_t *tok, int len, float *q) {
  uint64_t h = O.seed;
  for (int i = 0; i < len; i++) {
    uint64_t s = h ^ ((uint64_t)(uint32_t)tok[i] << 20 | (uint64_t)i);
    h = cn_test_rand(&s);
  }
  if (O.mode == DIST_PEAKED && cn_test_rand(&h) % 2) {
    for (int v = 0; v < VOCAB; v++)
      q[v] = 0;
    q[cn_test_rand(&h) % VOCAB] = 1;
  } else if (O.mode == DIST_UNIFORM) {
    for (int v = 0; v < VOCAB; v++)
      q[v] = 1.0f / VOCAB;
  } else if (O.mode == DIST_SPARSE) {
    int a = (int)(cn_test_rand(&h) % VOCAB), b = (a + 1 + (int)(cn_test_rand(&h) % (VOCAB - 1))) % VOCAB;
    for (int v = 0; v < VOCAB; v++)
      q[v] = 0;
    q[a] = 0.75f, q[b] = 0.25f;
  } else {
    double e[VOCAB], sum = 0;
    for (int v = 0; v < VOCAB; v++)
      sum += e[v] = exp(4.0 * cn_test_randf(&h));
    for (int v = 0; v < VOCAB; v++)
      q[v] = (float)(e[v] / sum);
  }
  if (O.view_k > 0) {
    int32_t ids[32];
    float kept[32];
    int n = cn_pick_topk(NULL, q, VOCAB, O.view_k, ids);
    for (int i = 0; i < n; i++) kept[i] = expf(logf(q[ids[i]]));
    for (int v = 0; v < VOCAB; v++) q[v] = 0;
    for (int i = 0; i < n; i++) q[ids[i]] = kept[i];
  }
}

static int test_oracle(void *ctx, const cn_tree *t, const int32_t *frontier, int nf, const float **probs) {
  oracle_state *o = ctx;
  check_tree(t);
  int call = o->calls++;
  assert_true(call < MAX_CALLS);
  if (call == o->fail_at) return cn_error(CANOPY_ERR_DEVICE, "synthetic oracle failure");
  assert_true(nf >= 1);
  o->n_frontier[call] = nf;
  for (int i = 0; i < nf; i++) {
    assert_true(frontier[i] >= 0 && frontier[i] < t->n);
    if (i) assert_true(frontier[i] > frontier[i - 1]);
    assert_int_equal(t->depth[frontier[i]], call); /* one level per call, all at its depth */
    int32_t tok[MAX_PATH];
    int len = tree_path(t, frontier[i], tok);
    o->frontier_node[call][i] = frontier[i];
    o->frontier_path[call][i] = path_hash(tok, len);
    node_dist(tok, len, o->probs[i]);
    probs[i] = o->probs[i];
  }
  o->last = *t;
  return CANOPY_OK;
}

/* ---- reference pickers ---------------------------------------------------------------------- */

typedef struct scored {
  float q;
  int32_t id;
} scored;

static int scored_cmp(const void *a, const void *b) {
  const scored *x = a, *y = b;
  if (x->q != y->q) return x->q > y->q ? -1 : 1;
  return x->id < y->id ? -1 : x->id > y->id;
}

/* Top-k by sorting the whole vocabulary: what cn_pick_topk must equal. */
static int ref_topk(void *ctx, const float *q, int vocab, int k, int32_t *tokens) {
  scored *s = malloc(sizeof *s * (size_t)vocab);
  for (int v = 0; v < vocab; v++)
    s[v] = (scored){q[v], v};
  qsort(s, (size_t)vocab, sizeof *s, scored_cmp);
  int n = 0;
  for (int v = 0; v < vocab && n < k && s[v].q > 0; v++)
    tokens[n++] = s[v].id;
  free(s);
  return n;
}

/* Like sampling without replacement, picks come in no particular probability order: a
 * permutation keyed by q's contents (so the reference can replay it), tokens with q > 0 only. */
static int pick_shuffled(void *ctx, const float *q, int vocab, int k, int32_t *tokens) {
  uint64_t h = 7;
  for (int v = 0; v < vocab; v++) {
    uint32_t bits;
    memcpy(&bits, &q[v], sizeof bits);
    h = (h ^ bits) * 1099511628211ull;
  }
  int32_t perm[VOCAB];
  for (int v = 0; v < vocab; v++)
    perm[v] = v;
  for (int v = vocab - 1; v > 0; v--) {
    int j = (int)(cn_test_rand(&h) % (uint64_t)(v + 1));
    int32_t t = perm[v];
    perm[v] = perm[j], perm[j] = t;
  }
  int n = 0;
  for (int v = 0; v < vocab && n < k; v++)
    if (q[perm[v]] > 0) tokens[n++] = perm[v];
  return n;
}

/* ---- the brute-force EAGLE-2 reference ------------------------------------------------------ */

typedef struct rnode {
  int len;                       /* tokens on the path, the root's included: depth + 1 */
  int32_t tok[MAX_PATH];         /* tokens from the root */
  int32_t pk[CN_TREE_MAX_DEPTH]; /* pick positions from the root */
  float logp, score;
} rnode;

/* The order the grower documents: score, then shallower, then BFS (lexicographic picks). */
static int key_cmp(const void *a, const void *b) {
  const rnode *x = a, *y = b;
  if (x->score != y->score) return x->score > y->score ? -1 : 1;
  if (x->len != y->len) return x->len < y->len ? -1 : 1;
  for (int i = 0; i < x->len - 1; i++)
    if (x->pk[i] != y->pk[i]) return x->pk[i] < y->pk[i] ? -1 : 1;
  return 0;
}

static int bfs_cmp(const void *a, const void *b) {
  const rnode *x = a, *y = b;
  if (x->len != y->len) return x->len < y->len ? -1 : 1;
  for (int i = 0; i < x->len - 1; i++)
    if (x->pk[i] != y->pk[i]) return x->pk[i] < y->pk[i] ? -1 : 1;
  return 0;
}

typedef struct reference {
  rnode *all; /* every candidate the paper's expansion makes */
  int n_all;
  rnode *kept; /* the best N, in BFS order */
  int n_kept;
  int calls; /* levels whose budget-pruned frontier is not empty */
  int n_front[MAX_CALLS];
  uint64_t front[MAX_CALLS][CN_TREE_MAX_TOPK]; /* each level's frontier the grower should feed */
} reference;

static void ref_expand(reference *r, const rnode *parent, int k, cn_child_picker picker) {
  float q[VOCAB];
  int32_t picks[VOCAB];
  node_dist(parent->tok, parent->len, q);
  int n = picker(NULL, q, VOCAB, k, picks);
  float prev = INFINITY;
  for (int i = 0; i < n; i++) {
    rnode c = *parent;
    float lq = fminf(logf(q[picks[i]]), 0.0f);
    c.tok[c.len] = picks[i];
    c.pk[c.len - 1] = i;
    c.len++;
    c.logp = parent->logp + lq;
    c.score = fminf(parent->score + lq, prev);
    prev = c.score;
    r->all[r->n_all++] = c;
  }
}

/* Expands the paper's top-K at every depth (no pruning), then keeps the best N overall. Also
 * works out which frontier the grower feeds: the top-K of a depth that are still among the best
 * N of everything drafted up to that depth. */
static void ref_dynamic(reference *r, int32_t root_token, int N, int D, int K, cn_child_picker picker) {
  memset(r, 0, sizeof *r);
  size_t cap = (size_t)K + (size_t)(D - 1) * K * K;
  r->all = malloc(sizeof *r->all * cap);
  rnode *tmp = malloc(sizeof *tmp * cap), *upto_d = malloc(sizeof *tmp * cap), root = {.len = 1, .tok = {root_token}};
  ref_expand(r, &root, K, picker);
  r->calls = 1;
  r->n_front[0] = 1;
  r->front[0][0] = path_hash(root.tok, 1);
  for (int d = 1; d < D; d++) {
    int n = 0, upto = 0;
    for (int i = 0; i < r->n_all; i++) {
      if (r->all[i].len == d + 1) tmp[n++] = r->all[i];
      if (r->all[i].len <= d + 1) upto_d[upto++] = r->all[i];
    }
    qsort(tmp, (size_t)n, sizeof *tmp, key_cmp);
    qsort(upto_d, (size_t)upto, sizeof *tmp, key_cmp);
    int nf = n < K ? n : K, m = 0;
    for (int i = 0; i < nf; i++) {
      int in_best = 0;
      for (int j = 0; j < upto && j < N; j++)
        in_best |= !key_cmp(&tmp[i], &upto_d[j]);
      if (in_best) r->front[d][m++] = path_hash(tmp[i].tok, tmp[i].len);
    }
    r->n_front[d] = m;
    if (m) {
      assert_int_equal(r->calls, d); /* an empty level ends the growth: nothing below it survives */
      r->calls++;
    }
    rnode expand[CN_TREE_MAX_TOPK];
    memcpy(expand, tmp, sizeof *tmp * (size_t)nf);
    for (int i = 0; i < nf; i++)
      ref_expand(r, &expand[i], K, picker);
  }
  memcpy(tmp, r->all, sizeof *tmp * (size_t)r->n_all);
  qsort(tmp, (size_t)r->n_all, sizeof *tmp, key_cmp);
  r->n_kept = r->n_all < N ? r->n_all : N;
  qsort(tmp, (size_t)r->n_kept, sizeof *tmp, bfs_cmp);
  r->kept = tmp;
  free(upto_d);
}

static void ref_free(reference *r) { free(r->all), free(r->kept); }

/* The grown tree is the reference's kept set in BFS order, node for node. */
static void check_against_reference(const cn_tree *t, const reference *r) {
  assert_int_equal(t->n, 1 + r->n_kept);
  for (int i = 1; i < t->n; i++) {
    const rnode *k = &r->kept[i - 1];
    int32_t tok[MAX_PATH];
    int len = tree_path(t, i, tok);
    assert_int_equal(len, k->len);
    assert_memory_equal(tok, k->tok, sizeof *tok * (size_t)len);
    assert_int_equal(t->rank[i], k->pk[len - 2]); /* kept children are their parent's first picks */
    assert_true(fabsf(t->logp[i] - k->logp) <= 1e-5f * (1 + fabsf(k->logp)));
  }
}

/* logp[i] = logp[parent] + log q_parent(token[i]), from the oracle's distributions. */
static void check_logp(const cn_tree *t) {
  float q[VOCAB];
  for (int i = 1; i < t->n; i++) {
    int32_t tok[MAX_PATH];
    int p = t->parent[i], len = tree_path(t, p, tok);
    node_dist(tok, len, q);
    double want = t->logp[p] + log(q[t->token[i]]);
    assert_true(fabs(t->logp[i] - want) < 1e-5 * (1 + fabs(want)));
  }
}

/* ---- parsing -------------------------------------------------------------------------------- */

static void test_static_spec_is_the_per_depth_product_in_bfs_order(void **state) {
  cn_tree_spec s = parse_ok("static:4,2,2,1");
  assert_int_equal(s.kind, CN_TREE_STATIC);
  assert_int_equal(s.n_nodes, 4 + 4 * 2 + 8 * 2 + 16 * 1);
  assert_int_equal(s.depth, 4);
  assert_int_equal(s.rank_gaps, 0);
  const int branch[] = {4, 2, 2, 1};
  int lo = 0, hi = 1, i = 1;
  for (int d = 0; d < 4; d++) {
    for (int p = lo; p < hi; p++) {
      assert_int_equal(s.n_children[p], branch[d]);
      assert_int_equal(s.first_child[p], i);
      for (int r = 0; r < branch[d]; r++, i++) {
        assert_int_equal(s.parent[i], p);
        assert_int_equal(s.rank[i], r);
        assert_int_equal(s.node_depth[i], d + 1);
      }
    }
    lo = hi, hi = i;
  }
  for (; lo < hi; lo++)
    assert_int_equal(s.n_children[lo], 0);
  cn_tree_spec_bounds b = cn_tree_spec_get_bounds(&s);
  assert_int_equal(b.n_nodes, 44);
  assert_int_equal(b.depth, 4);
  assert_int_equal(b.oracle_nodes, 45);
  assert_int_equal(b.max_frontier, 16);
  assert_int_equal(b.oracle_calls, 4);
}

static void test_chain_is_a_single_path(void **state) {
  cn_tree_spec s = parse_ok("chain:7");
  assert_int_equal(s.n_nodes, 7);
  assert_int_equal(s.depth, 7);
  for (int i = 1; i <= 7; i++) {
    assert_int_equal(s.parent[i], i - 1);
    assert_int_equal(s.rank[i], 0);
    assert_int_equal(s.node_depth[i], i);
  }
  cn_tree_spec one = parse_ok("  chain:1");
  assert_int_equal(one.n_nodes, 1);
  assert_int_equal(cn_tree_spec_get_bounds(&one).max_frontier, 1);
}

static void test_dynamic_spec_takes_defaults_and_options_in_any_order(void **state) {
  cn_tree_spec s = parse_ok("dynamic:60");
  assert_int_equal(s.kind, CN_TREE_DYNAMIC);
  assert_int_equal(s.n_nodes, 60);
  assert_int_equal(s.depth, CN_TREE_DEFAULT_DEPTH);
  assert_int_equal(s.topk, CN_TREE_DEFAULT_TOPK);
  cn_tree_spec_bounds b = cn_tree_spec_get_bounds(&s);
  /* EAGLE-2 feeds at most 1 + (D - 1) K nodes; a sampled tree's oracle tree is all N + 1. */
  assert_int_equal(b.oracle_nodes, 61);
  cn_tree_spec wide = parse_ok("dynamic:20,depth=6,topk=8");
  assert_int_equal(cn_tree_spec_get_bounds(&wide).oracle_nodes, 1 + 5 * 8);
  assert_int_equal(b.max_frontier, CN_TREE_DEFAULT_TOPK);
  assert_int_equal(b.oracle_calls, CN_TREE_DEFAULT_DEPTH);
  s = parse_ok("dynamic:20,topk=4,depth=3");
  assert_int_equal(s.n_nodes, 20);
  assert_int_equal(s.depth, 3);
  assert_int_equal(s.topk, 4);
  s = parse_ok("dynamic:3,depth=5,topk=10"); /* the budget caps the frontier */
  assert_int_equal(cn_tree_spec_get_bounds(&s).max_frontier, 3);
  assert_int_equal(cn_tree_spec_get_bounds(&s).oracle_nodes, 1 + 4 * 3);
}

static void assert_same_shape(const cn_tree_spec *a, const cn_tree_spec *b) {
  assert_int_equal(a->kind, b->kind);
  assert_int_equal(a->n_nodes, b->n_nodes);
  assert_int_equal(a->depth, b->depth);
  assert_int_equal(a->rank_gaps, b->rank_gaps);
  size_t n = sizeof(int32_t) * (size_t)(a->n_nodes + 1);
  assert_memory_equal(a->parent, b->parent, n);
  assert_memory_equal(a->rank, b->rank, n);
  assert_memory_equal(a->node_depth, b->node_depth, n);
  assert_memory_equal(a->first_child, b->first_child, n);
  assert_memory_equal(a->n_children, b->n_children, n);
}

static void test_json_paths_parse_in_canonical_bfs_order(void **state) {
  cn_tree_spec want = parse_ok("static:2,2");
  cn_tree_spec sorted = parse_ok("[[0],[1],[0,0],[0,1],[1,0],[1,1]]");
  cn_tree_spec shuffled = parse_ok(" [[1,1], [0], [0,1],[1],[1,0], [0,0]]\n");
  cn_tree_spec object = parse_ok("{\"name\": \"sequoia-6\", \"paths\": [[1,0],[1,1],[0,0],[0,1],[1],[0]], "
                                 "\"acceptance\": [0.8, 0.5]}");
  assert_same_shape(&sorted, &want);
  assert_same_shape(&shuffled, &want);
  assert_same_shape(&object, &want);

  cn_tree_spec medusa = parse_ok("[[0],[1],[0,0],[0,1],[1,0]]");
  assert_int_equal(medusa.n_nodes, 5);
  const int32_t parent[] = {-1, 0, 0, 1, 1, 2}, rank[] = {0, 0, 1, 0, 1, 0};
  assert_memory_equal(medusa.parent, parent, sizeof parent);
  assert_memory_equal(medusa.rank, rank, sizeof rank);

  cn_tree_spec gaps = parse_ok("[[0],[2],[2,1]]");
  assert_int_equal(gaps.rank_gaps, 1);
  assert_false(cn_tree_spec_exact_for_sampling(&gaps));
  assert_true(cn_tree_spec_exact_for_sampling(&medusa));
  cn_tree_spec dyn = parse_ok("dynamic:10");
  assert_true(cn_tree_spec_exact_for_sampling(&dyn)); /* grown by the sampled rule */
  assert_int_equal(gaps.rank[2], 2);
  assert_int_equal(gaps.rank[3], 1);
}

static void temp_path(char *buf, size_t cap, const char *name) {
  const char *dir = getenv("TMPDIR");
  snprintf(buf, cap, "%s/canopy_test_tree_%ld_%s", dir && *dir ? dir : "/tmp", (long)getpid(), name);
}

static void write_text(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fputs(text, f);
  assert_int_equal(fclose(f), 0);
}

static void test_json_file_round_trips(void **state) {
  const char *specs[] = {"static:4,2,2,1", "chain:5", "[[0],[2],[2,1],[2,0],[0,3]]", "static:1,3,1"};
  char path[512];
  temp_path(path, sizeof path, "round_trip.json");
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
    cn_tree_spec a = parse_ok(specs[i]), b;
    assert_int_equal(cn_tree_spec_write_json(&a, path), CANOPY_OK);
    assert_int_equal(cn_tree_spec_parse(path, &b), CANOPY_OK);
    assert_same_shape(&a, &b);
  }
  unlink(path);
  cn_tree_spec d = parse_ok("dynamic:10");
  assert_int_equal(cn_tree_spec_write_json(&d, path), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "dynamic"));
  cn_tree_spec s = parse_ok("chain:2");
  assert_int_equal(cn_tree_spec_write_json(&s, "/nonexistent-canopy-dir/t.json"), CANOPY_ERR_IO);
  assert_non_null(strstr(canopy_last_error(), "/nonexistent-canopy-dir/t.json"));
}

static void test_malformed_specs_fail_naming_the_fault(void **state) {
  char deep[4096] = "[", wide[4096] = "[", many_ones[256] = "static:1";
  for (int d = 1; d <= CN_TREE_MAX_DEPTH + 1; d++) { /* [0], [0,0], ... one level too deep */
    strcat(deep, d > 1 ? ",[0" : "[0");
    for (int k = 1; k < d; k++)
      strcat(deep, ",0");
    strcat(deep, "]");
  }
  strcat(deep, "]");
  for (int i = 0; i < CN_TREE_MAX_NODES; i++)
    sprintf(wide + strlen(wide), "%s[%d]", i ? "," : "", i);
  strcat(wide, "]");
  for (int d = 1; d <= CN_TREE_MAX_DEPTH; d++)
    strcat(many_ones, ",1");
  const struct {
    const char *text;
    int status;
    const char *says;
  } cases[] = {
      {NULL, CANOPY_ERR_INVALID_ARG, "empty"},
      {"", CANOPY_ERR_INVALID_ARG, "empty"},
      {" \t\n", CANOPY_ERR_INVALID_ARG, "empty"},
      {"tree:3", CANOPY_ERR_INVALID_ARG, "unknown kind 'tree'"},
      {"chain:0", CANOPY_ERR_INVALID_ARG, "K >= 1"},
      {"chain:", CANOPY_ERR_INVALID_ARG, "whole number"},
      {"chain:3x", CANOPY_ERR_INVALID_ARG, "whole number"},
      {"chain:33", CANOPY_ERR_INVALID_ARG, "depth 33 is over the limit of 32"},
      {"static:", CANOPY_ERR_INVALID_ARG, "branching"},
      {"static:4,0,2", CANOPY_ERR_INVALID_ARG, "branching 0 at depth 2"},
      {"static:4,,2", CANOPY_ERR_INVALID_ARG, "entry 2 is not a whole number"},
      {"static:4,-1", CANOPY_ERR_INVALID_ARG, "entry 2 is not a whole number"},
      {"static:16,16", CANOPY_ERR_INVALID_ARG, "272 nodes, over the limit of 255"},
      {"static:99999999999,99999999999", CANOPY_ERR_INVALID_ARG, "over the limit of 255"},
      {many_ones, CANOPY_ERR_INVALID_ARG, "depth over the limit of 32"},
      {"dynamic:0", CANOPY_ERR_INVALID_ARG, "node budget 0"},
      {"dynamic:", CANOPY_ERR_INVALID_ARG, "node budget"},
      {"dynamic:256", CANOPY_ERR_INVALID_ARG, "budget 256 is over the limit of 255"},
      {"dynamic:10,depth=0", CANOPY_ERR_INVALID_ARG, "depth 0"},
      {"dynamic:10,depth=33", CANOPY_ERR_INVALID_ARG, "depth 33"},
      {"dynamic:10,topk=0", CANOPY_ERR_INVALID_ARG, "topk 0"},
      {"dynamic:10,topk=33", CANOPY_ERR_INVALID_ARG, "topk 33"},
      {"dynamic:10,topk=", CANOPY_ERR_INVALID_ARG, "'topk' needs a whole number"},
      {"dynamic:10,width=3", CANOPY_ERR_INVALID_ARG, "unknown option 'width=3'"},
      {"dynamic:100,depth=32,topk=16", CANOPY_ERR_INVALID_ARG, "over the limit of 256"},
      {"[[0],[0,0", CANOPY_ERR_INVALID_ARG, "not valid JSON (error near byte offset"},
      {"[[0]] x", CANOPY_ERR_INVALID_ARG, "unexpected text at byte offset 6"},
      {"[]", CANOPY_ERR_INVALID_ARG, "node budget 0"},
      {"{\"paths\": []}", CANOPY_ERR_INVALID_ARG, "node budget 0"},
      {"{\"tree\": [[0]]}", CANOPY_ERR_INVALID_ARG, "expected a list of rank paths"},
      {"[[0],[1,0]]", CANOPY_ERR_INVALID_ARG, "paths[1] = [1,0]: its prefix [1] is not listed"},
      {"[[0],[0,0,1]]", CANOPY_ERR_INVALID_ARG, "its prefix [0,0] is not listed"},
      {"[[0],[-1]]", CANOPY_ERR_INVALID_ARG, "paths[1][0] is a negative rank"},
      {"[[0],[0.5]]", CANOPY_ERR_INVALID_ARG, "paths[1][0] is not a whole-number rank"},
      {"[[0],[\"1\"]]", CANOPY_ERR_INVALID_ARG, "not a whole-number rank"},
      {"[[0],[0]]", CANOPY_ERR_INVALID_ARG, "[0] is listed twice"},
      {"[[0],[]]", CANOPY_ERR_INVALID_ARG, "paths[1] is empty"},
      {"[0,1]", CANOPY_ERR_INVALID_ARG, "paths[0] is not a list of ranks"},
      {"[[255]]", CANOPY_ERR_INVALID_ARG, "rank 255 is over the limit of 254"},
      {deep, CANOPY_ERR_INVALID_ARG, "depth 33, over the limit of 32"},
      {wide, CANOPY_ERR_INVALID_ARG, "256 nodes, over the limit of 255"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    cn_tree_spec s;
    int rc = cn_tree_spec_parse(cases[i].text, &s);
    if (rc != cases[i].status || !strstr(canopy_last_error(), cases[i].says))
      fail_msg("'%.60s': status %d, message '%s' (wanted %d, '%s')", cases[i].text ? cases[i].text : "(null)", rc,
               canopy_last_error(), cases[i].status, cases[i].says);
    assert_null(strchr(canopy_last_error(), '\n')); /* one line */
  }
}

static void test_spec_files_fail_naming_the_file(void **state) {
  cn_tree_spec s;
  assert_int_equal(cn_tree_spec_parse("/nonexistent-canopy-dir/tree.json", &s), CANOPY_ERR_IO);
  assert_non_null(strstr(canopy_last_error(), "/nonexistent-canopy-dir/tree.json"));
  assert_non_null(strstr(canopy_last_error(), "No such file"));
  assert_int_equal(cn_tree_spec_parse("trees/missing.json", &s), CANOPY_ERR_IO);

  char path[512];
  temp_path(path, sizeof path, "bad.json");
  write_text(path, "{\"paths\": [[0], [1,]]}");
  assert_int_equal(cn_tree_spec_parse(path, &s), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), path));
  assert_non_null(strstr(canopy_last_error(), "byte offset 19"));
  write_text(path, "{\"paths\": [[0], [0, 1, 2]]}\n");
  assert_int_equal(cn_tree_spec_parse(path, &s), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), path));
  assert_non_null(strstr(canopy_last_error(), "paths[1] = [0,1,2]: its prefix [0,1] is not listed"));
  write_text(path, "{\"paths\": [[0], [0, 0]], \"nodes\": 2}\n");
  assert_int_equal(cn_tree_spec_parse(path, &s), CANOPY_OK);
  assert_int_equal(s.n_nodes, 2);
  unlink(path);

  const char *dir = getenv("TMPDIR"); /* a folder is no spec file */
  assert_int_equal(cn_tree_spec_parse(dir && *dir ? dir : "/tmp", &s), CANOPY_ERR_IO);
}

/* ---- growing -------------------------------------------------------------------------------- */

static void test_pick_topk_is_descending_with_ties_to_the_lower_id(void **state) {
  const float q[10] = {0.1f, 0.2f, 0, 0.2f, 0.05f, 0.3f, 0, 0.1f, 0.05f, -1};
  int32_t t[10];
  const int32_t want[] = {5, 1, 3, 0, 7, 4, 8};
  for (int k = 0; k <= 10; k++) {
    int n = cn_pick_topk(NULL, q, 10, k, t);
    assert_int_equal(n, k < 7 ? k : 7); /* only tokens with q > 0 */
    assert_memory_equal(t, want, sizeof *t * (size_t)n);
  }
  uint64_t rng = seed;
  float big[5000];
  int32_t got[40], ref[40];
  for (int trial = 0; trial < 20; trial++) {
    for (int v = 0; v < 5000; v++)
      big[v] = (float)(cn_test_rand(&rng) % 50) / 50; /* many ties and zeros */
    int k = 1 + trial * 2;
    int n = cn_pick_topk(NULL, big, 5000, k, got);
    assert_int_equal(n, ref_topk(NULL, big, 5000, k, ref));
    assert_memory_equal(got, ref, sizeof *got * (size_t)n);
  }
}

static cn_tree grow_ok(const cn_tree_spec *s, int32_t root, cn_child_picker picker, int *calls, int32_t *index) {
  cn_tree t;
  memset(&t, 0xab, sizeof t); /* every field the grower leaves alone stays garbage */
  int rc = cn_tree_grow_ex(s, root, VOCAB, test_oracle, &O, picker, NULL, &t, calls, index);
  if (rc) fail_msg("cn_tree_grow: %s", canopy_last_error());
  check_tree(&t);
  assert_int_equal(*calls, O.calls);
  return t;
}

static void test_static_tree_grows_the_exact_shape(void **state) {
  cn_tree_spec s = parse_ok("static:4,2,2,1");
  oracle_reset(seed, DIST_RANDOM);
  int calls;
  int32_t index[CN_TREE_MAX_NODES];
  cn_tree t = grow_ok(&s, 17, cn_pick_topk, &calls, index);
  assert_int_equal(t.n, 45);
  assert_int_equal(t.token[0], 17);
  assert_int_equal(calls, 4);
  const int frontier[] = {1, 4, 8, 16}; /* every node of depths 0..3 has children */
  for (int d = 0; d < 4; d++)
    assert_int_equal(O.n_frontier[d], frontier[d]);
  float q[VOCAB];
  int32_t picks[VOCAB];
  for (int i = 0; i < t.n; i++) {
    assert_int_equal(index[i], i);
    assert_int_equal(t.parent[i], s.parent[i]);
    assert_int_equal(t.depth[i], s.node_depth[i]);
    assert_int_equal(t.n_children[i], s.n_children[i]);
    if (!i) continue;
    int32_t tok[MAX_PATH];
    int len = tree_path(&t, t.parent[i], tok);
    node_dist(tok, len, q);
    ref_topk(NULL, q, VOCAB, VOCAB, picks);
    assert_int_equal(t.token[i], picks[s.rank[i]]);
    assert_int_equal(t.rank[i], s.rank[i]);
  }
  check_logp(&t);
  check_mask(&t);
}

static void test_chain_grows_one_node_per_oracle_call(void **state) {
  cn_tree_spec s = parse_ok("chain:9");
  oracle_reset(seed ^ 1, DIST_RANDOM);
  int calls;
  int32_t index[CN_TREE_MAX_NODES];
  cn_tree t = grow_ok(&s, 3, cn_pick_topk, &calls, index);
  assert_int_equal(t.n, 10);
  assert_int_equal(calls, 9);
  float q[VOCAB];
  int32_t best;
  for (int i = 1; i < t.n; i++) {
    assert_int_equal(O.n_frontier[i - 1], 1);
    assert_int_equal(O.frontier_node[i - 1][0], i - 1);
    assert_int_equal(t.parent[i], i - 1);
    int32_t tok[MAX_PATH];
    node_dist(tok, tree_path(&t, i - 1, tok), q);
    ref_topk(NULL, q, VOCAB, 1, &best);
    assert_int_equal(t.token[i], best); /* a chain is greedy decoding by the draft */
  }
  check_logp(&t);
  check_mask(&t);
}

static void test_static_ranks_with_gaps_take_those_picks_and_only_parents_are_fed(void **state) {
  cn_tree_spec s = parse_ok("[[0],[2],[2,1],[0,0],[0,0,3],[1]]");
  oracle_reset(seed ^ 2, DIST_RANDOM);
  int calls;
  int32_t index[CN_TREE_MAX_NODES];
  cn_tree t = grow_ok(&s, 0, cn_pick_topk, &calls, index);
  assert_int_equal(t.n, 7);
  assert_int_equal(calls, 3);
  const int nf[] = {1, 2, 1}; /* depth 1: [0] and [2] have children, [1] does not */
  for (int d = 0; d < 3; d++)
    assert_int_equal(O.n_frontier[d], nf[d]);
  assert_int_equal(O.frontier_node[1][0], 1);
  assert_int_equal(O.frontier_node[1][1], 3);
  float q[VOCAB];
  int32_t picks[VOCAB];
  for (int i = 1; i < t.n; i++) {
    int32_t tok[MAX_PATH];
    node_dist(tok, tree_path(&t, t.parent[i], tok), q);
    ref_topk(NULL, q, VOCAB, VOCAB, picks);
    assert_int_equal(t.token[i], picks[s.rank[i]]);
  }
  check_logp(&t);
}

static void test_static_children_past_the_last_pick_are_dropped(void **state) {
  cn_tree_spec s = parse_ok("static:3,3,1");
  oracle_reset(seed ^ 3, DIST_SPARSE); /* two tokens per distribution */
  int calls;
  int32_t index[CN_TREE_MAX_NODES];
  cn_tree t = grow_ok(&s, 5, cn_pick_topk, &calls, index);
  assert_int_equal(t.n, 1 + 2 + 4 + 4);
  assert_int_equal(calls, 3);
  assert_int_equal(O.n_frontier[1], 2);
  assert_int_equal(O.n_frontier[2], 4);
  for (int i = 0; i < t.n; i++)
    assert_int_equal(index[i], i);
  check_logp(&t);
  check_mask(&t);
}

static cn_tree_spec parse_dynamic(int N, int D, int K) {
  char text[96];
  snprintf(text, sizeof text, "dynamic:%d,depth=%d,topk=%d", N, D, K);
  return parse_ok(text);
}

static void run_dynamic_case(int N, int D, int K, int mode, cn_child_picker picker, uint64_t s) {
  cn_tree_spec spec = parse_dynamic(N, D, K);
  cn_tree_spec_bounds b = cn_tree_spec_get_bounds(&spec);
  oracle_reset(s, mode);
  int32_t root = (int32_t)(s % VOCAB);
  int calls;
  int32_t index[CN_TREE_MAX_NODES];
  cn_tree t = grow_ok(&spec, root, picker, &calls, index);
  reference r;
  ref_dynamic(&r, root, N, D, K, picker == cn_pick_topk ? ref_topk : picker);

  check_against_reference(&t, &r);
  check_logp(&t);
  check_mask(&t);
  /* One call per level, each feeding the top-K of its depth still in the running. */
  assert_int_equal(calls, r.calls);
  assert_true(calls <= b.oracle_calls);
  assert_true(O.last.n <= b.oracle_nodes);
  for (int c = 0; c < calls; c++) {
    assert_int_equal(O.n_frontier[c], r.n_front[c]);
    assert_true(O.n_frontier[c] <= b.max_frontier);
    for (int i = 0; i < O.n_frontier[c]; i++) {
      int found = 0;
      for (int j = 0; j < r.n_front[c]; j++)
        found |= O.frontier_path[c][i] == r.front[c][j];
      assert_true(found);
      /* the oracle's tree never renumbers: the node fed then is the same node now */
      int32_t tok[MAX_PATH];
      int len = tree_path(&O.last, O.frontier_node[c][i], tok);
      assert_true(path_hash(tok, len) == O.frontier_path[c][i]);
    }
  }
  /* oracle_index names each node's place in the oracle's tree; every parent was fed. */
  for (int i = 0; i < t.n; i++) {
    if (t.n_children[i]) assert_true(index[i] >= 0);
    if (index[i] < 0) continue;
    assert_true(index[i] < O.last.n);
    int32_t a[MAX_PATH], c[MAX_PATH];
    int la = tree_path(&t, i, a), lc = tree_path(&O.last, index[i], c);
    assert_int_equal(la, lc);
    assert_memory_equal(a, c, sizeof *a * (size_t)la);
    assert_true(t.logp[i] == O.last.logp[index[i]]);
  }
  ref_free(&r);
}

static const int dynamic_cases[][3] = {
    {1, 1, 1},  {3, 1, 8},   {8, 2, 8},    {10, 3, 2},    {60, 6, 8},  {60, 6, 10},  {4, 6, 8},
    {25, 6, 4}, {255, 8, 8}, {100, 32, 4}, {200, 20, 12}, {50, 32, 8}, {255, 2, 32}, {30, 9, 1},
};

static void test_dynamic_tree_equals_brute_force_eagle2(void **state) {
  for (size_t c = 0; c < sizeof dynamic_cases / sizeof dynamic_cases[0]; c++)
    for (uint64_t k = 0; k < 4; k++)
      run_dynamic_case(dynamic_cases[c][0], dynamic_cases[c][1], dynamic_cases[c][2], DIST_RANDOM, cn_pick_topk,
                       seed + 101 * k + c);
}

static void test_dynamic_ties_break_by_depth_then_bfs_order(void **state) {
  for (size_t c = 0; c < sizeof dynamic_cases / sizeof dynamic_cases[0]; c++)
    run_dynamic_case(dynamic_cases[c][0], dynamic_cases[c][1], dynamic_cases[c][2], DIST_UNIFORM, cn_pick_topk,
                     seed + c);
  /* All paths equally likely: the N kept are the shallowest, leftmost nodes (a full K-ary tree
   * truncated in BFS order), limited by what the expansion made. */
  cn_tree_spec s = parse_ok("dynamic:20,depth=3,topk=4");
  oracle_reset(seed, DIST_UNIFORM);
  int calls;
  int32_t index[CN_TREE_MAX_NODES];
  cn_tree t = grow_ok(&s, 0, cn_pick_topk, &calls, index);
  assert_int_equal(t.n, 21);
  for (int i = 1; i <= 4; i++)
    assert_int_equal(t.depth[i], 1);
  for (int i = 5; i <= 20; i++) {
    assert_int_equal(t.depth[i], 2);
    assert_int_equal(t.parent[i], 1 + (i - 5) / 4);
  }
  for (int i = 1; i < t.n; i++)
    assert_int_equal(t.token[i], t.rank[i]); /* picks of a uniform q: ids 0,1,.. */
}

/* ---- the fixed-shape twin grown where the picks are (kernels/tree_dyn.h) ---------------------- */

/* What a greedy draft forward hands back for a path: its top K ids (q descending, ties to the lower
 * id) and their log q; missing picks (q = 0) as -inf. */
static void forward_row(const int32_t *tok, int len, int K, int32_t *ids, float *logp) {
  float q[VOCAB];
  int view = O.view_k;
  O.view_k = 0;
  node_dist(tok, len, q);
  O.view_k = view;
  int n = cn_pick_topk(NULL, q, VOCAB, K, ids);
  for (int i = 0; i < K; i++) {
    if (i >= n) ids[i] = (int32_t)i;
    logp[i] = i < n ? logf(q[ids[i]]) : -INFINITY;
  }
}

/* Grows the twin level by level as chained draft forwards would, checking each level's staged mask
 * and positions, and returns its state. */
static int32_t *grow_twin(const cn_dyn_layout *l, int32_t root) {
  int32_t *w = malloc(sizeof *w * (size_t)l->words), ids[32], tok[MAX_PATH], mpos[32], tree_pos[1024], staged[32];
  float logp[32];
  uint64_t mask[32 * 16];
  for (int i = 0; i < l->words; i++) w[i] = (int32_t)0xabababab; /* nothing read before it is written */
  tok[0] = root;
  forward_row(tok, 1, l->K, ids, logp);
  assert_int_equal(cn_cpu_dyn_grow(w, l, 0, ids, logp, l->K), 0);
  for (int d = 1; d < l->D; d++) {
    int first = cn_dyn_level_first(l, d), words = (d * l->K + 63) / 64;
    cn_cpu_dyn_stage(w, l, d, 100, mask, mpos, tree_pos, NULL, staged);
    int32_t rows_ids[32 * 32];
    float rows_logp[32 * 32];
    for (int j = 0; j < l->K; j++) {
      int f = first + j, len = 1 + d;
      uint64_t want[16] = {0};
      for (int g = f, k = len; g > 0; g = w[l->f_parent + g]) {
        tok[--k] = w[l->f_token + g];
        want[(g - 1) / 64] |= 1ull << ((g - 1) % 64);
        if (!w[l->f_valid + f]) break;
      }
      assert_memory_equal(mask + (size_t)j * words, want, sizeof *want * (size_t)words);
      assert_int_equal(mpos[j], 100 + d);
      assert_int_equal(staged[j], w[l->f_token + f]);
      forward_row(tok, len, l->K, rows_ids + j * l->K, rows_logp + j * l->K); /* padding: any row */
    }
    for (int g = 1; g < first + l->K; g++) assert_int_equal(tree_pos[g - 1], 100 + w[l->f_depth + g]);
    assert_int_equal(cn_cpu_dyn_grow(w, l, d, rows_ids, rows_logp, l->K), 0);
  }
  return w;
}

static void run_twin_case(int N, int D, int K, int mode, uint64_t s) {
  cn_tree_spec spec = parse_dynamic(N, D, K);
  oracle_reset(s, mode);
  O.view_k = K;
  int32_t root = (int32_t)(s % VOCAB), index[CN_TREE_MAX_NODES];
  int calls;
  cn_tree t = grow_ok(&spec, root, cn_pick_topk, &calls, index);
  cn_dyn_layout l = cn_dyn_layout_make(K, D, N);
  int32_t *w = grow_twin(&l, root);
  /* The twin's tree is the grower's, node for node; padding after it is in no tree. */
  assert_int_equal(w[l.t_n], t.n);
  for (int o = 0; o < l.T; o++) {
    int real = o < t.n;
    assert_int_equal(w[l.t_parent + o], real ? t.parent[o] : -2);
    if (o > 0 && real) assert_int_equal(w[l.t_token + o], t.token[o]);
    if (real) assert_int_equal(w[l.t_pick + o], t.rank[o]);
    if (real) assert_int_equal(w[l.t_fed + o] >= 0, index[o] >= 0);
  }
  /* The verification's mask and positions: the tree's, and padding sees itself alone. */
  int words = (l.T + 63) / 64;
  uint64_t *mask = malloc(sizeof *mask * (size_t)l.T * words), tm[CN_TREE_MAX_NODES * CN_TREE_MASK_WORDS];
  int32_t *pos = malloc(sizeof *pos * (size_t)l.T), *parent = malloc(sizeof *parent * (size_t)l.T),
          *staged = malloc(sizeof *staged * (size_t)l.T);
  staged[0] = -5;
  cn_cpu_dyn_stage(w, &l, -1, 50, mask, pos, NULL, parent, staged);
  assert_int_equal(staged[0], -5); /* the root's token is the caller's */
  cn_tree_mask(&t, tm, CN_TREE_MASK_WORDS);
  for (int o = 0; o < l.T; o++) {
    for (int j = 0; j < l.T; j++) {
      int bit = (int)(mask[(size_t)o * words + j / 64] >> (j % 64) & 1);
      int want = o < t.n ? j < t.n && (int)(tm[o * CN_TREE_MASK_WORDS + j / 64] >> (j % 64) & 1) : j == o;
      assert_int_equal(bit, want);
    }
    assert_int_equal(pos[o], 50 + (o < t.n ? t.depth[o] : 0));
    assert_int_equal(parent[o], o < t.n ? t.parent[o] : -2);
    if (o > 0 && o < t.n) assert_int_equal(staged[o], t.token[o]);
  }
  free(mask), free(pos), free(parent), free(staged), free(w);
}

static void test_dynamic_twin_grows_the_growers_tree(void **state) {
  const int modes[] = {DIST_RANDOM, DIST_UNIFORM, DIST_SPARSE, DIST_PEAKED};
  int cases = 0;
  for (size_t c = 0; c < sizeof dynamic_cases / sizeof dynamic_cases[0]; c++) {
    if (cn_dyn_layout_make(dynamic_cases[c][2], dynamic_cases[c][1], dynamic_cases[c][0]).R > 1024 ||
        dynamic_cases[c][1] * dynamic_cases[c][2] > 512)
      continue; /* the test's own buffers */
    for (size_t m = 0; m < 4; m++)
      for (uint64_t k = 0; k < 3; k++, cases++)
        run_twin_case(dynamic_cases[c][0], dynamic_cases[c][1], dynamic_cases[c][2], modes[m], seed + 7 * k + c);
  }
  printf("[ twin     ] %d trees grown on the fixed shape equal the grower's\n", cases);
}

static void test_dynamic_trees_take_fewer_picks_and_certain_tokens(void **state) {
  for (size_t c = 0; c < sizeof dynamic_cases / sizeof dynamic_cases[0]; c++)
    for (int mode = DIST_SPARSE; mode <= DIST_PEAKED; mode++)
      for (uint64_t k = 0; k < 2; k++)
        run_dynamic_case(dynamic_cases[c][0], dynamic_cases[c][1], dynamic_cases[c][2], mode, cn_pick_topk,
                         seed + 7 * c + 31 * k);
}

static void test_dynamic_keeps_only_first_picks_for_an_unordered_picker(void **state) {
  for (size_t c = 0; c < sizeof dynamic_cases / sizeof dynamic_cases[0]; c++)
    for (uint64_t k = 0; k < 2; k++)
      run_dynamic_case(dynamic_cases[c][0], dynamic_cases[c][1], dynamic_cases[c][2], DIST_RANDOM, pick_shuffled,
                       seed + 13 * k + c);
  /* check_against_reference asserted rank == pick position; also replay one tree's picks */
  cn_tree_spec s = parse_ok("dynamic:40,depth=5,topk=6");
  oracle_reset(seed, DIST_RANDOM);
  int calls;
  int32_t index[CN_TREE_MAX_NODES], picks[VOCAB];
  float q[VOCAB];
  cn_tree t = grow_ok(&s, 1, pick_shuffled, &calls, index);
  for (int i = 1; i < t.n; i++) {
    int32_t tok[MAX_PATH];
    node_dist(tok, tree_path(&t, t.parent[i], tok), q);
    pick_shuffled(NULL, q, VOCAB, 6, picks);
    assert_int_equal(t.token[i], picks[t.rank[i]]);
  }
}

/* ---- sampled dynamic trees ------------------------------------------------------------------ */

typedef struct ref_slot {
  float value;
  int node, j;
} ref_slot;

static int float_desc(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x < y) - (x > y);
}

static int ref_slot_cmp(const void *a, const void *b) {
  const ref_slot *x = a, *y = b;
  if (x->value != y->value) return x->value > y->value ? -1 : 1;
  return x->node != y->node ? x->node - y->node : x->j - y->j;
}

/* Level by level against a full sort: the kept slots (value P_v * s_v[j], s_v = q_v sorted), the
 * children asked of the picker per node, the next frontier, the budget, the next threshold. */
static void run_sampled_case(int N, int D, int K, int mode, float log_tau, uint64_t s) {
  cn_tree_spec spec = parse_dynamic(N, D, K);
  cn_tree_spec_bounds b = cn_tree_spec_get_bounds(&spec);
  oracle_reset(s, mode);
  cn_tree_grower g;
  cn_grow_params gp = {.spec = &spec, .root_token = (int32_t)(s % VOCAB), .vocab = VOCAB, .picker = pick_shuffled,
                       .sampled = 1, .log_tau = log_tau};
  assert_int_equal(cn_tree_grower_start(&g, &gp), CANOPY_OK);
  const cn_tree *t;
  const int32_t *fr;
  const float *probs[CN_TREE_MAX_NODES];
  static ref_slot slots[CN_TREE_MAX_TOPK * VOCAB];
  float offered[CN_TREE_MAX_TOPK * CN_TREE_MAX_DEPTH * CN_TREE_MAX_TOPK];
  int kept = 0, n_offered = 0, level = 0, n;
  int32_t want_frontier[CN_TREE_MAX_TOPK];
  int n_want = 1;
  want_frontier[0] = 0;
  while ((n = cn_tree_grower_frontier(&g, &t, &fr)) > 0) {
    assert_true(level < D && n <= b.max_frontier && kept < N);
    assert_int_equal(n, n_want);
    assert_memory_equal(fr, want_frontier, sizeof *fr * (size_t)n);
    assert_int_equal(test_oracle(&O, t, fr, n, probs), CANOPY_OK);
    int n_slots = 0;
    for (int i = 0; i < n; i++) {
      scored sq[VOCAB];
      for (int v = 0; v < VOCAB; v++) sq[v] = (scored){probs[i][v], v};
      qsort(sq, VOCAB, sizeof *sq, scored_cmp);
      for (int j = 0; j < K && sq[j].q > 0; j++) {
        slots[n_slots++] = (ref_slot){t->logp[fr[i]] + fminf(logf(sq[j].q), 0.0f), i, j};
        offered[n_offered++] = slots[n_slots - 1].value;
      }
    }
    qsort(slots, (size_t)n_slots, sizeof *slots, ref_slot_cmp);
    int count[CN_TREE_MAX_TOPK] = {0}, front[CN_TREE_MAX_TOPK], first_new = t->n;
    for (int i = 0; i < n_slots && kept < N && slots[i].value >= log_tau; i++, kept++) count[slots[i].node]++;
    memcpy(front, fr, sizeof *front * (size_t)n);
    assert_int_equal(cn_tree_grower_give(&g, probs), CANOPY_OK);
    for (int i = 0; i < n; i++) assert_int_equal(t->n_children[front[i]], count[i]);
    level++;
    /* The next frontier: the K new nodes with the highest P >= tau, fed in BFS order. */
    ref_slot cand[CN_TREE_MAX_NODES];
    int nc = 0;
    for (int u = first_new; u < t->n; u++)
      if (t->logp[u] >= log_tau) cand[nc++] = (ref_slot){t->logp[u], u, 0};
    qsort(cand, (size_t)nc, sizeof *cand, ref_slot_cmp);
    n_want = nc < K ? nc : K;
    if (level == D || kept >= N) n_want = 0;
    for (int i = 0; i < n_want; i++) want_frontier[i] = cand[i].node;
    for (int i = 1; i < n_want; i++)
      for (int k = i; k > 0 && want_frontier[k] < want_frontier[k - 1]; k--) {
        int32_t x = want_frontier[k];
        want_frontier[k] = want_frontier[k - 1], want_frontier[k - 1] = x;
      }
  }
  assert_int_equal(n_want, 0);
  cn_tree out;
  int32_t index[CN_TREE_MAX_NODES];
  assert_int_equal(cn_tree_grower_finish(&g, &out, index), CANOPY_OK);
  check_tree(&out);
  check_logp(&out);
  check_mask(&out);
  assert_int_equal(out.n - 1, kept);
  assert_true(kept <= N && cn_tree_max_depth(&out) <= D && out.n <= b.oracle_nodes);
  for (int i = 0; i < out.n; i++) assert_int_equal(index[i], i);
  /* The next step's threshold: the N-th best value offered, or the worst if fewer were. */
  qsort(offered, (size_t)n_offered, sizeof *offered, float_desc);
  float want_tau = n_offered ? offered[(n_offered < N ? n_offered : N) - 1] : -INFINITY;
  assert_true(cn_tree_grower_next_log_tau(&g) == want_tau);
}

static void test_sampled_dynamic_tree_fixes_child_counts_before_drawing(void **state) {
  const float taus[] = {-INFINITY, logf(0.3f), logf(0.05f), logf(0.001f)};
  for (size_t c = 0; c < sizeof dynamic_cases / sizeof dynamic_cases[0]; c++)
    for (int mode = DIST_RANDOM; mode <= DIST_PEAKED; mode++)
      for (size_t k = 0; k < sizeof taus / sizeof taus[0]; k++)
        run_sampled_case(dynamic_cases[c][0], dynamic_cases[c][1], dynamic_cases[c][2], mode, taus[k],
                         seed + 17 * c + 5 * k + (uint64_t)mode);
  /* With no threshold the budget fills breadth first: the root takes min(K, N) children. */
  cn_tree_spec s = parse_ok("dynamic:20,depth=4,topk=4");
  oracle_reset(seed, DIST_RANDOM);
  cn_tree t;
  int calls;
  cn_tree_grower g;
  cn_grow_params gp = {.spec = &s, .root_token = 0, .vocab = VOCAB, .picker = pick_shuffled, .sampled = 1,
                       .log_tau = -INFINITY};
  assert_int_equal(cn_tree_grower_start(&g, &gp), CANOPY_OK);
  const cn_tree *gt;
  const int32_t *fr;
  const float *probs[CN_TREE_MAX_NODES];
  for (calls = 0; cn_tree_grower_frontier(&g, &gt, &fr) > 0; calls++) {
    assert_int_equal(test_oracle(&O, gt, fr, cn_tree_grower_frontier(&g, NULL, NULL), probs), CANOPY_OK);
    assert_int_equal(cn_tree_grower_give(&g, probs), CANOPY_OK);
  }
  assert_int_equal(cn_tree_grower_finish(&g, &t, NULL), CANOPY_OK);
  assert_int_equal(t.n_children[0], 4);
  assert_int_equal(t.n, 21);
}

static int picker_out_of_range(void *ctx, const float *q, int vocab, int k, int32_t *tokens) {
  tokens[0] = vocab;
  return 1;
}
static int picker_twice(void *ctx, const float *q, int vocab, int k, int32_t *tokens) {
  tokens[0] = tokens[1] = 0;
  return 2;
}
static int picker_zero_mass(void *ctx, const float *q, int vocab, int k, int32_t *tokens) {
  for (int v = 0; v < vocab; v++)
    if (q[v] == 0) return tokens[0] = v, 1;
  return 0;
}
static int picker_fails(void *ctx, const float *q, int vocab, int k, int32_t *tokens) {
  return cn_error(CANOPY_ERR_NO_MEMORY, "synthetic picker failure");
}

static void test_grow_reports_oracle_and_picker_failures(void **state) {
  cn_tree_spec chain = parse_ok("static:2,2"), dyn = parse_ok("dynamic:10,depth=3,topk=2"), zero;
  memset(&zero, 0, sizeof zero);
  cn_tree t;
  int calls;
  for (int k = 0; k < 2; k++) {
    const cn_tree_spec *s = k ? &dyn : &chain;
    oracle_reset(seed, DIST_RANDOM);
    O.fail_at = 1;
    assert_int_equal(cn_tree_grow(s, 0, VOCAB, test_oracle, &O, cn_pick_topk, NULL, &t, &calls), CANOPY_ERR_DEVICE);
    assert_non_null(strstr(canopy_last_error(), "depth 1: synthetic oracle failure"));
    assert_int_equal(calls, 2);
  }
  const struct {
    cn_child_picker picker;
    int mode, status;
    const char *says;
  } bad[] = {
      {picker_out_of_range, DIST_RANDOM, CANOPY_ERR_INVALID_ARG, "token 64 is outside the vocabulary of 64"},
      {picker_twice, DIST_RANDOM, CANOPY_ERR_INVALID_ARG, "token 0 picked twice"},
      {picker_zero_mass, DIST_SPARSE, CANOPY_ERR_INVALID_ARG, "draft probability 0"},
      {picker_fails, DIST_RANDOM, CANOPY_ERR_NO_MEMORY, "child picker failed: synthetic picker failure"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    for (int k = 0; k < 2; k++) {
      oracle_reset(seed, bad[i].mode);
      int rc = cn_tree_grow(k ? &dyn : &chain, 0, VOCAB, test_oracle, &O, bad[i].picker, NULL, &t, NULL);
      assert_int_equal(rc, bad[i].status);
      assert_non_null(strstr(canopy_last_error(), bad[i].says));
    }
  assert_int_equal(cn_tree_grow(&chain, VOCAB, VOCAB, test_oracle, &O, cn_pick_topk, NULL, &t, NULL),
                   CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "root token 64"));
  assert_int_equal(cn_tree_grow(&zero, 0, VOCAB, test_oracle, &O, cn_pick_topk, NULL, &t, NULL),
                   CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "not a parsed tree spec"));
  assert_int_equal(cn_tree_grow(&chain, 0, VOCAB, NULL, &O, cn_pick_topk, NULL, &t, NULL), CANOPY_ERR_INVALID_ARG);
}

int main(void) {
  seed = cn_test_seed("test_tree");
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_static_spec_is_the_per_depth_product_in_bfs_order),
      cmocka_unit_test(test_chain_is_a_single_path),
      cmocka_unit_test(test_dynamic_spec_takes_defaults_and_options_in_any_order),
      cmocka_unit_test(test_json_paths_parse_in_canonical_bfs_order),
      cmocka_unit_test(test_json_file_round_trips),
      cmocka_unit_test(test_malformed_specs_fail_naming_the_fault),
      cmocka_unit_test(test_spec_files_fail_naming_the_file),
      cmocka_unit_test(test_pick_topk_is_descending_with_ties_to_the_lower_id),
      cmocka_unit_test(test_static_tree_grows_the_exact_shape),
      cmocka_unit_test(test_chain_grows_one_node_per_oracle_call),
      cmocka_unit_test(test_static_ranks_with_gaps_take_those_picks_and_only_parents_are_fed),
      cmocka_unit_test(test_static_children_past_the_last_pick_are_dropped),
      cmocka_unit_test(test_dynamic_tree_equals_brute_force_eagle2),
      cmocka_unit_test(test_dynamic_ties_break_by_depth_then_bfs_order),
      cmocka_unit_test(test_dynamic_twin_grows_the_growers_tree),
      cmocka_unit_test(test_dynamic_trees_take_fewer_picks_and_certain_tokens),
      cmocka_unit_test(test_dynamic_keeps_only_first_picks_for_an_unordered_picker),
      cmocka_unit_test(test_sampled_dynamic_tree_fixes_child_counts_before_drawing),
      cmocka_unit_test(test_grow_reports_oracle_and_picker_failures),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
