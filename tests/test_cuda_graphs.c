/* CUDA graphs of the forward (model/backend_cuda.c): a forward replayed from a graph must give
 * bit-identical logits and top ids to the same forward launched op by op, since the graph holds
 * the same kernels with the same arguments and only the staged inputs change. Two copies of one
 * random-weights model (head_dim 64, so the tree-attention path that graphs cover) run the same
 * steps in lockstep, one with graphs and one without: prefill, decodes at moving positions, tree
 * verifications (logits, top ids, top 4 with log-probabilities), ragged two-sequence batches with a mask on one side, a draft
 * tree's second level, with the key count crossing powers of two. Then a cache of two graphs must
 * evict and recapture and still agree, and speculative generation through the sessions API must
 * give the same tokens with and without graphs. The graph cache's LRU runs everywhere; the CUDA
 * part skips without a device. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "model/forward.h"
#include "model/graph_cache.h"
#include "tests/testing.h"
#ifdef CANOPY_HAVE_CUDA
#include "kernels/cuda/cuda_ops.h"
#endif

static const char *CONFIG =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 256, \"intermediate_size\": 512,"
    " \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"head_dim\": 64,"
    " \"vocab_size\": 1000, \"max_position_embeddings\": 1024, \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0,"
    " \"tie_word_embeddings\": true}";
static char cfg_path[256];
static uint64_t seed;

/* ---- the LRU, on any machine ----------------------------------------------------------------- */

static int freed;
static void count_free(void *g) { freed += g != NULL; }

static void test_graph_cache_evicts_least_recently_used(void **state) {
  cn_graph_cache c;
  assert_int_equal(cn_graph_cache_init(&c, 2, count_free), CANOPY_OK);
  cn_graph_key a = {{1}}, b = {{2}}, k3 = {{3}};
  int fresh;
  freed = 0;
  cn_graph_slot *s = cn_graph_cache_get(&c, &a, &fresh);
  assert_true(fresh);
  s->graph = &a; /* any non-NULL pointer stands for a graph */
  s = cn_graph_cache_get(&c, &b, &fresh);
  assert_true(fresh);
  s->graph = &b;
  s = cn_graph_cache_get(&c, &a, &fresh); /* a is now the most recent */
  assert_false(fresh);
  assert_ptr_equal(s->graph, &a);
  s = cn_graph_cache_get(&c, &k3, &fresh); /* evicts b */
  assert_true(fresh);
  assert_null(s->graph);
  assert_int_equal(freed, 1);
  cn_graph_cache_get(&c, &b, &fresh);
  assert_true(fresh); /* b was gone; a goes now (k3 more recent) */
  cn_graph_cache_get(&c, &k3, &fresh);
  assert_false(fresh);
  cn_graph_cache_free(&c);
  cn_graph_cache empty;
  assert_int_equal(cn_graph_cache_init(&empty, 0, count_free), CANOPY_OK);
  assert_null(cn_graph_cache_get(&empty, &a, &fresh));
  cn_graph_cache_free(&empty);
}

#ifdef CANOPY_HAVE_CUDA

enum { GRAPHS = 0, PLAIN = 1, MAXN = 16 };

static canopy_model *load(int graphs, int n_layers) {
  canopy_model_params p = canopy_model_default_params();
  p.device = CANOPY_DEVICE_CUDA;
  p.random_weights = cfg_path;
  p.random_seed = 5;
  p.kv_block_size = 8;
  p.max_context = 512;
  p.n_layers = n_layers;
  p.cuda_graphs = graphs;
  canopy_model *m = NULL;
  int st = canopy_model_load(NULL, &p, &m);
  if (st) print_error("%s\n", canopy_last_error());
  assert_int_equal(st, CANOPY_OK);
  return m;
}

/* The same model twice, [GRAPHS] capturing graphs and [PLAIN] not, with two sequences each. */
typedef struct twin {
  canopy_model *m[2];
  cn_kv_seq *kv[2][2];
  uint64_t rng;
  int n_forwards;
} twin;

static void twin_open(twin *t, int max_graphs) {
  *t = (twin){.rng = seed};
  t->m[GRAPHS] = load(max_graphs, 0);
  t->m[PLAIN] = load(0, 0);
  for (int d = 0; d < 2; d++)
    for (int s = 0; s < 2; s++)
      assert_int_equal(cn_kv_seq_create(t->m[d]->kv, &t->kv[d][s]), CANOPY_OK);
}

static void twin_close(twin *t) {
  for (int d = 0; d < 2; d++) {
    for (int s = 0; s < 2; s++)
      cn_kv_seq_free(t->kv[d][s]);
    canopy_model_free(t->m[d]);
  }
}

/* One sequence's part of a batch. */
typedef struct part {
  int seq, n, tree_prev;
  const int32_t *tree_pos;
  const uint64_t *mask;
} part;

/* Runs one batch on both models; logits of every row (top = 0), or each row's top ids (top = k:
 * the k largest, with their log-softmax when k > 1) must be bit-identical. */
static void forward_twin(twin *t, const int32_t *tokens, const int32_t *pos, int n, const part *parts, int n_parts,
                         int top, const char *what) {
  int V = t->m[0]->cfg.vocab_size;
  assert_true(n <= 64 && V <= 1000);
  static float logits[2][64 * 1000];
  static int32_t ids[2][64 * 4];
  static float logp[2][64 * 4];
  int32_t rows[64];
  int k = top > 1 ? top : 1;
  for (int i = 0; i < n; i++)
    rows[i] = i;
  for (int d = 0; d < 2; d++) {
    cn_seq_batch sb[2];
    for (int i = 0, first = 0; i < n_parts; first += parts[i++].n)
      sb[i] = (cn_seq_batch){.kv = t->kv[d][parts[i].seq], .first = first, .n = parts[i].n,
                             .tree_prev = parts[i].tree_prev, .tree_pos = parts[i].tree_pos,
                             .tree_mask = parts[i].mask};
    cn_batch b = {.n_tokens = n, .tokens = tokens, .pos = pos, .n_seqs = n_parts, .seqs = sb, .n_logits = n,
                  .logit_rows = rows, .top = top ? ids[d] : NULL, .top_k = k, .top_logp = top > 1 ? logp[d] : NULL};
    memset(logits[d], 0xff, sizeof(float) * (size_t)n * V); /* NaN: a row not written differs */
    memset(ids[d], 0xff, sizeof ids[d]);
    memset(logp[d], 0xff, sizeof logp[d]);
    int st = cn_forward(t->m[d], &b, top ? NULL : logits[d]);
    if (st) print_error("%s (%s): %s\n", what, d == GRAPHS ? "graphs" : "no graphs", canopy_last_error());
    assert_int_equal(st, CANOPY_OK);
  }
  int same = top ? !memcmp(ids[0], ids[1], sizeof(int32_t) * (size_t)n * k) &&
                       !memcmp(logp[0], logp[1], sizeof(float) * (size_t)n * k)
                 : !memcmp(logits[0], logits[1], sizeof(float) * (size_t)n * V);
  if (top) assert_true(ids[0][n * k - 1] >= 0 && ids[0][n * k - 1] < V); /* written */
  if (!same) print_error("forward %d (%s): graph replay differs from the op-by-op forward\n", t->n_forwards, what);
  assert_true(same);
  if (!top) assert_true(logits[0][0] == logits[0][0]); /* written */
  t->n_forwards++;
}

static int len_of(twin *t, int seq) { return cn_kv_seq_len(t->kv[GRAPHS][seq]); }

/* Keeps the first k slots the last forward wrote, drops the rest of its reservation. */
static void commit(twin *t, int seq, const int32_t *tokens, int k) {
  for (int d = 0; d < 2; d++) {
    cn_kv_seq_commit(t->kv[d][seq], tokens, k);
    cn_kv_seq_truncate(t->kv[d][seq], cn_kv_seq_len(t->kv[d][seq]));
  }
}

/* Keeps tree nodes 0 and 3 (a path: node 3's parent is 0), moving slot 3's K/V on the device. */
static void commit_path(twin *t, int seq, const int32_t *tokens) {
  int slots[2] = {0, 3};
  int32_t kept[2] = {tokens[0], tokens[3]};
  for (int d = 0; d < 2; d++) {
    assert_int_equal(cn_kv_seq_commit_slots(t->kv[d][seq], slots, kept, 2), CANOPY_OK);
    cn_kv_seq_truncate(t->kv[d][seq], cn_kv_seq_len(t->kv[d][seq]));
  }
}

static void drop(twin *t, int seq) {
  for (int d = 0; d < 2; d++)
    cn_kv_seq_truncate(t->kv[d][seq], cn_kv_seq_len(t->kv[d][seq]));
}

static void random_tokens(twin *t, int32_t *x, int n) {
  for (int i = 0; i < n; i++)
    x[i] = (int32_t)(cn_test_rand(&t->rng) % 1000);
}

/* A tree of n nodes whose first three form a chain (so committing the first k <= 3 commits a
 * path) and whose node 3 is a child of node 0, the rest hanging off random earlier nodes: positions ctx + depth, ancestor mask of
 * `words` words a row over slots offset .. offset + n (earlier levels' slots before them). */
static void random_tree(twin *t, int n, int ctx, int offset, int32_t *pos, uint64_t *mask, int words) {
  int parent[MAXN], depth[MAXN];
  memset(mask, 0, sizeof(uint64_t) * (size_t)n * words);
  for (int i = 0; i < n; i++) {
    parent[i] = i == 0 ? -1 : i < 3 ? i - 1 : i == 3 ? 0 : (int)(cn_test_rand(&t->rng) % (uint64_t)i);
    depth[i] = i ? depth[parent[i]] + 1 : 0;
    pos[i] = ctx + depth[i];
    for (int a = i; a >= 0; a = parent[a])
      mask[i * words + (offset + a) / 64] |= 1ull << ((offset + a) % 64);
  }
}

/* Four shapes, each three times in a row (run, capture, replay) at moving positions. */
static void run_steps(twin *t, int rounds) {
  int32_t tok[64], pos[64], tpos[32];
  uint64_t mask[MAXN * 2];
  for (int r = 0; r < rounds; r++)
    for (int rep = 0; rep < 3; rep++) {
      int kind = r % 4, a = len_of(t, 0), b = len_of(t, 1);
      random_tokens(t, tok, 32);
      if (kind == 0) { /* decode */
        pos[0] = a;
        part p = {.seq = 0, .n = 1};
        forward_twin(t, tok, pos, 1, &p, 1, 0, "decode");
        commit(t, 0, tok, 1);
      } else if (kind == 1) { /* verification, logits then top ids; the path 0 -> 3 accepted */
        random_tree(t, 9, a, 0, pos, mask, 1);
        part p = {.seq = 0, .n = 9, .mask = mask};
        forward_twin(t, tok, pos, 9, &p, 1, 0, "verify 9, logits");
        drop(t, 0);
        forward_twin(t, tok, pos, 9, &p, 1, 1, "verify 9, top ids");
        drop(t, 0);
        forward_twin(t, tok, pos, 9, &p, 1, 4, "verify 9, top 4 with log-probabilities");
        commit_path(t, 0, tok);
      } else if (kind == 2) { /* ragged: a decode beside a 5-node tree */
        pos[0] = a;
        random_tree(t, 5, b, 0, pos + 1, mask, 1);
        part p[2] = {{.seq = 0, .n = 1}, {.seq = 1, .n = 5, .mask = mask}};
        forward_twin(t, tok, pos, 6, p, 2, 0, "ragged 1 + tree 5");
        commit(t, 0, tok, 1);
        commit(t, 1, tok + 1, 1);
      } else { /* a draft tree's two levels: 3 nodes, then 4 more after them */
        random_tree(t, 7, a, 0, tpos, mask, 1);
        part p1 = {.seq = 0, .n = 3, .mask = mask};
        forward_twin(t, tok, tpos, 3, &p1, 1, 0, "draft level 1");
        part p2 = {.seq = 0, .n = 4, .tree_prev = 3, .tree_pos = tpos, .mask = mask + 3};
        forward_twin(t, tok + 3, tpos + 3, 4, &p2, 1, 0, "draft level 2");
        commit(t, 0, tok, 1);
      }
    }
}

static void prefill(twin *t, int seq, int n) {
  int32_t tok[64], pos[64];
  random_tokens(t, tok, n);
  for (int i = 0; i < n; i++)
    pos[i] = len_of(t, seq) + i;
  part p = {.seq = seq, .n = n};
  forward_twin(t, tok, pos, n, &p, 1, 0, "prefill");
  commit(t, seq, tok, n);
}

static void stats(twin *t, long *replays, long *captures) {
  cn_backend_cuda_graph_stats(t->m[GRAPHS]->be, t->m[GRAPHS]->be_ctx, replays, captures);
}

static void test_graph_replay_is_bit_identical_to_launching_the_ops(void **state) {
  twin t;
  twin_open(&t, 64);
  prefill(&t, 0, 50); /* 51.. keys: the bucket goes 64 -> 128 during the steps */
  prefill(&t, 1, 20);
  run_steps(&t, 8);
  long replays, captures, pr, pc;
  stats(&t, &replays, &captures);
  cn_backend_cuda_graph_stats(t.m[PLAIN]->be, t.m[PLAIN]->be_ctx, &pr, &pc);
  printf("[ graphs   ] %d forwards, %ld captured, %ld replayed, all bit-identical (keys now %d)\n", t.n_forwards,
         captures, replays, len_of(&t, 0));
  assert_true(len_of(&t, 0) > 64);
  assert_true(captures >= 4);
  assert_true(replays >= 4);
  assert_int_equal(pr + pc, 0);
  twin_close(&t);
}

static void test_graph_cache_of_two_evicts_and_still_agrees(void **state) {
  twin t;
  twin_open(&t, 2);
  prefill(&t, 0, 30);
  prefill(&t, 1, 10);
  run_steps(&t, 4);
  /* Shapes A, B, C, A three times each at a fixed context: A was evicted by C. */
  long r0, c0, r1, c1;
  stats(&t, &r0, &c0);
  int32_t tok[8] = {1, 2, 3, 4, 5, 6, 7, 8}, pos[8];
  for (int g = 0; g < 4; g++) {
    int n = g == 3 ? 1 : g + 1, a = len_of(&t, 0);
    for (int i = 0; i < n; i++)
      pos[i] = a + i;
    part p = {.seq = 0, .n = n};
    for (int rep = 0; rep < 3; rep++) {
      forward_twin(&t, tok, pos, n, &p, 1, 0, "A B C A");
      drop(&t, 0);
    }
  }
  stats(&t, &r1, &c1);
  printf("[ graphs   ] cache of 2: %ld captures and %ld replays for A B C A\n", c1 - c0, r1 - r0);
  assert_true(c1 - c0 >= 4);
  assert_true(r1 - r0 >= 1);
  twin_close(&t);
}

static void generate(canopy_model *target, canopy_model *draft, const char *tree, const canopy_sampling_params *rule,
                     int n, int32_t *out) {
  canopy_session_params sp = canopy_session_default_params();
  sp.max_tokens = n;
  sp.stop_at_eos = 0;
  sp.draft = draft;
  sp.tree = tree;
  if (rule) sp.sampling = *rule;
  canopy_session *s;
  assert_int_equal(canopy_session_create(target, &sp, &s), CANOPY_OK);
  int32_t prompt[24];
  for (int i = 0; i < 24; i++)
    prompt[i] = (int32_t)((i * 37 + 11) % 1000);
  assert_int_equal(canopy_session_append(s, prompt, 24), CANOPY_OK);
  for (int i = 0; i < n; i++) {
    int st = canopy_session_next(s, &out[i]);
    if (st) print_error("%s\n", canopy_last_error());
    assert_int_equal(st, CANOPY_OK);
  }
  canopy_session_free(s);
}

static void test_speculation_with_graphs_equals_without(void **state) {
  const char *trees[] = {"chain:4", "dynamic:12,depth=4,topk=3"};
  canopy_model *target[2], *draft[2];
  for (int d = 0; d < 2; d++) {
    target[d] = load(d == GRAPHS ? 64 : 0, 0);
    draft[d] = load(d == GRAPHS ? 64 : 0, 1);
  }
  enum { NEW = 40 };
  for (size_t k = 0; k < sizeof trees / sizeof trees[0]; k++) {
    int32_t out[2][NEW];
    for (int d = 0; d < 2; d++)
      generate(target[d], draft[d], trees[k], NULL, NEW, out[d]);
    long tr, tc, dr, dc;
    cn_backend_cuda_graph_stats(target[GRAPHS]->be, target[GRAPHS]->be_ctx, &tr, &tc);
    cn_backend_cuda_graph_stats(draft[GRAPHS]->be, draft[GRAPHS]->be_ctx, &dr, &dc);
    printf("[ graphs   ] %-26s target %ld replays, draft %ld replays so far: %s\n", trees[k], tr, dr,
           memcmp(out[0], out[1], sizeof out[0]) ? "DIFFER" : "identical tokens");
    assert_memory_equal(out[0], out[1], sizeof out[0]);
    assert_true(tr > 0 && dr > 0);
  }
  /* Sampled decoding replays too, with this step's uniforms (staged data, as the tokens are): the
   * target alone (no draft), and sampled static trees, whose draft levels draw and whose
   * verification accepts on the device. */
  const char *sampled_trees[] = {NULL, "chain:3", "static:3,2,1", NULL};
  const canopy_sampling_params rules[] = {{1.0f, 0, 1.0f, 5}, {1.0f, 0, 1.0f, 5}, {0.7f, 40, 0.9f, 6},
                                          {0.7f, 40, 0.9f, 6}};
  for (size_t k = 0; k < 4; k++) {
    int32_t out[2][NEW];
    long tr0, tc, dr0, dc, tr, dr;
    cn_backend_cuda_graph_stats(target[GRAPHS]->be, target[GRAPHS]->be_ctx, &tr0, &tc);
    cn_backend_cuda_graph_stats(draft[GRAPHS]->be, draft[GRAPHS]->be_ctx, &dr0, &dc);
    for (int d = 0; d < 2; d++)
      generate(target[d], sampled_trees[k] ? draft[d] : NULL, sampled_trees[k], &rules[k], NEW, out[d]);
    cn_backend_cuda_graph_stats(target[GRAPHS]->be, target[GRAPHS]->be_ctx, &tr, &tc);
    cn_backend_cuda_graph_stats(draft[GRAPHS]->be, draft[GRAPHS]->be_ctx, &dr, &dc);
    printf("[ graphs   ] %-13s T %.1f top_k %2d top_p %.2f: target %ld replays, draft %ld: %s\n",
           sampled_trees[k] ? sampled_trees[k] : "no draft",
           rules[k].temperature, rules[k].top_k, rules[k].top_p, tr - tr0, dr - dr0,
           memcmp(out[0], out[1], sizeof out[0]) ? "DIFFER" : "identical tokens");
    assert_memory_equal(out[0], out[1], sizeof out[0]);
    assert_true(tr > tr0 && (!sampled_trees[k] || dr > dr0));
  }
  for (int d = 0; d < 2; d++) {
    canopy_model_free(target[d]);
    canopy_model_free(draft[d]);
  }
}

static int have_device(void) { return cn_cuda_device_count() > 0; }
#else
static int have_device(void) { return 0; }
#endif

int main(void) {
  const struct CMUnitTest everywhere[] = {cmocka_unit_test(test_graph_cache_evicts_least_recently_used)};
  int failed = cmocka_run_group_tests(everywhere, NULL, NULL);
  if (failed || !have_device()) {
    if (!failed) printf("test_cuda_graphs: no CUDA device visible, skipping the CUDA part\n");
    return failed ? failed : CN_TEST_SKIP;
  }
#ifdef CANOPY_HAVE_CUDA
  seed = cn_test_seed("test_cuda_graphs");
  snprintf(cfg_path, sizeof cfg_path, "/tmp/canopy_test_cuda_graphs_%d.json", (int)getpid());
  FILE *f = fopen(cfg_path, "w");
  if (!f || fputs(CONFIG, f) < 0 || fclose(f)) {
    fprintf(stderr, "test_cuda_graphs: cannot write %s\n", cfg_path);
    return 1;
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_graph_replay_is_bit_identical_to_launching_the_ops),
      cmocka_unit_test(test_graph_cache_of_two_evicts_and_still_agrees),
      cmocka_unit_test(test_speculation_with_graphs_equals_without),
  };
  failed = cmocka_run_group_tests(tests, NULL, NULL);
  remove(cfg_path);
#endif
  return failed;
}
