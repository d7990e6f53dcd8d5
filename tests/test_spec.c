/* Speculative decoding end to end on SmolLM2-135M-Instruct with a same-vocabulary draft (the
 * target truncated to its first layers, and the target itself): greedy speculation is lossless,
 * the commit leaves exactly the cache a fresh prefill would build, and bad trees are errors. */
#include <cjson/cJSON.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "cache/kv_cache.h"
#include "canopy.h"
#include "model/forward.h"
#include "model/model.h"
#include "spec/speculate.h"
#include "tests/testing.h"

/* Batched verification sums in another order than single-token decoding (~1e-5 on logits): a
 * top-2 gap below this is a tie either may break differently. */
#define NEAR_TIE 1e-3

static char model_dir[1024];
static canopy_model *target, *shallow, *full_draft;
static cJSON *fixture;

static int quick(void) { return getenv("CANOPY_TEST_QUICK") != NULL; }

static int prompt_ids(int p, int32_t *ids) {
  cJSON *arr = cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(fixture, "prompts"), p), "prompt_ids");
  int n = cJSON_GetArraySize(arr);
  for (int i = 0; i < n; i++) ids[i] = cJSON_GetArrayItem(arr, i)->valueint;
  return n;
}

/* Generates n tokens greedily; with gaps != NULL also records the target's top-2 logit gap
 * before each token (target-only runs). Returns the session's stats. */
static canopy_stats run(canopy_model *draft, const char *tree, const int32_t *prompt, int n_prompt, int n,
                        int32_t *out, double *gaps) {
  canopy_session_params sp = canopy_session_default_params();
  sp.max_tokens = n;
  sp.stop_at_eos = 0;
  sp.draft = draft;
  sp.tree = tree;
  canopy_session *s;
  int st = canopy_session_create(target, &sp, &s);
  if (st) print_error("%s\n", canopy_last_error());
  assert_int_equal(st, 0);
  assert_int_equal(canopy_session_append(s, prompt, n_prompt), 0);
  for (int i = 0; i < n; i++) {
    if (gaps) {
      const float *l;
      int V;
      assert_int_equal(canopy_session_logits(s, &l, &V), 0);
      int a = 0, b = -1;
      for (int v = 1; v < V; v++)
        if (l[v] > l[a]) b = a, a = v;
        else if (b < 0 || l[v] > l[b]) b = v;
      gaps[i] = l[a] - l[b];
    }
    st = canopy_session_next(s, &out[i]);
    if (st) print_error("%s\n", canopy_last_error());
    assert_int_equal(st, CANOPY_OK);
    if (gaps) { /* feed it now so the next logits exist */
      canopy_session_truncate(s, canopy_session_len(s));
    }
  }
  canopy_stats stats;
  canopy_session_get_stats(s, &stats);
  int32_t t;
  assert_int_equal(canopy_session_next(s, &t), CANOPY_DONE);
  canopy_session_free(s);
  return stats;
}

static void test_greedy_speculation_equals_target_only(void **state) {
  const char *trees[] = {"chain:4", "static:3,2,1", "dynamic:16,depth=4,topk=4", "[[0],[1],[0,0],[0,0,0],[1,0]]"};
  int n_prompts = quick() ? 1 : 3, n_new = quick() ? 12 : 24, identical = 0, ties = 0, runs = 0;
  for (int p = 0; p < n_prompts; p++) {
    int32_t prompt[2048], want[64], got[64];
    double gaps[64];
    int n_prompt = prompt_ids(p, prompt);
    run(NULL, NULL, prompt, n_prompt, n_new, want, gaps);
    /* Under the sanitizers (quick) every other tree: the Release run covers them all. */
    for (size_t t = 0; t < sizeof trees / sizeof trees[0]; t += quick() ? 2 : 1) {
      for (int d = 0; d < 2; d++) {
        canopy_stats st = run(d ? full_draft : shallow, trees[t], prompt, n_prompt, n_new, got, NULL);
        int first = 0;
        while (first < n_new && got[first] == want[first]) first++;
        runs++;
        printf("[ spec     ] prompt %d %-32s draft %-9s %.2f tokens/forward  %s\n", p, trees[t],
               d ? "target" : "4 layers", (double)st.spec_tokens / (st.spec_steps ? st.spec_steps : 1),
               first == n_new ? "identical" : "differs");
        if (first == n_new) {
          identical++;
          continue;
        }
        printf("             first difference at %d: target-only top-2 gap %.2e\n", first, gaps[first]);
        assert_true(gaps[first] < NEAR_TIE);
        ties++;
      }
    }
  }
  printf("[ spec     ] %d runs: %d identical, %d differ at a near-tie (gap < %g)\n", runs, identical, ties, NEAR_TIE);
}

/* n_new tokens by cn_spec_step alone (the prompt prefilled by hand), chained or on the host path
 * as `host_levels` asks, greedy or (sp) sampled; returns the tokens generated (the last step may
 * overshoot n_new). */
static int spec_steps_with(canopy_model *draft, const char *tree, int host_levels, const canopy_sampling_params *sp,
                           const int32_t *prompt, int n_prompt, int n_new, int32_t *seq, canopy_stats *stats) {
  if (host_levels) setenv("CANOPY_SPEC_HOST_LEVELS", "1", 1);
  else unsetenv("CANOPY_SPEC_HOST_LEVELS");
  canopy_sampling_params greedy = canopy_sampling_default_params();
  greedy.temperature = 0;
  if (!sp) sp = &greedy;
  cn_spec *s;
  cn_sampler sampler;
  assert_int_equal(cn_sampler_init(&sampler, sp, target->cfg.vocab_size), CANOPY_OK);
  int st = cn_spec_create(target, draft, tree, sp, &s);
  unsetenv("CANOPY_SPEC_HOST_LEVELS");
  assert_int_equal(st, CANOPY_OK);
  assert_int_equal(cn_spec_chained(s), !host_levels); /* the CPU backend chains forwards too */
  cn_kv_seq *kv;
  assert_int_equal(cn_kv_seq_create(target->kv, &kv), CANOPY_OK);
  int32_t pos[2048];
  for (int i = 0; i < n_prompt - 1; i++)
    pos[i] = i;
  cn_seq_batch sb = {.kv = kv, .n = n_prompt - 1};
  cn_batch b = {.n_tokens = n_prompt - 1, .tokens = prompt, .pos = pos, .n_seqs = 1, .seqs = &sb};
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_OK);
  cn_kv_seq_commit(kv, prompt, n_prompt - 1);
  memcpy(seq, prompt, sizeof *seq * (size_t)n_prompt);
  memset(stats, 0, sizeof *stats);
  int len = n_prompt;
  while (len < n_prompt + n_new) {
    int n_out;
    st = cn_spec_step(s, kv, seq, len, &sampler, seq + len, &n_out, stats);
    if (st) print_error("%s\n", canopy_last_error());
    assert_int_equal(st, CANOPY_OK);
    len += n_out;
    assert_int_equal(cn_kv_seq_len(kv), len - 1); /* the bonus is not fed yet */
  }
  cn_kv_seq_free(kv);
  cn_spec_free(s);
  cn_sampler_free(&sampler);
  return len - n_prompt;
}

static int spec_steps(canopy_model *draft, const char *tree, int host_levels, const int32_t *prompt, int n_prompt,
                      int n_new, int32_t *seq, canopy_stats *stats) {
  return spec_steps_with(draft, tree, host_levels, NULL, prompt, n_prompt, n_new, seq, stats);
}

/* A chained step (the draft's levels fed from the picks where they were made, acceptance there
 * too; a dynamic tree grown there on its fixed shape) runs the same forwards on the same inputs as
 * the host path: the same tokens, and the same acceptance at every depth and rank. */
static void test_chained_steps_equal_the_host_levels(void **state) {
  const char *trees[] = {"chain:4", "static:3,2,1", "[[0],[1],[0,0],[0,0,0],[1,0]]", "[[0],[2],[2,1]]",
                         "dynamic:8,depth=3,topk=3", "dynamic:16,depth=4,topk=4"};
  int n_new = quick() ? 10 : 24;
  int32_t prompt[2048], a[2200], h[2200];
  int n_prompt = prompt_ids(2, prompt);
  for (size_t t = 0; t < sizeof trees / sizeof trees[0]; t++)
    for (int d = 0; d < 2; d++) {
      /* Under the sanitizers (quick) three of the twelve: a chain and the larger dynamic tree with
       * the shallow draft, the rank paths with the full one. */
      if (quick() && !((t == 0 && d == 0) || (t == 3 && d == 1) || (t == 5 && d == 0))) continue;
      canopy_model *draft = d ? full_draft : shallow;
      canopy_stats sa, sh;
      int na = spec_steps(draft, trees[t], 0, prompt, n_prompt, n_new, a, &sa);
      int nh = spec_steps(draft, trees[t], 1, prompt, n_prompt, n_new, h, &sh);
      printf("[ chained  ] %-32s draft %-8s %d tokens in %d steps (host path: %d in %d)\n", trees[t],
             d ? "target" : "4 layers", na, sa.spec_steps, nh, sh.spec_steps);
      assert_int_equal(na, nh);
      assert_memory_equal(a, h, sizeof *a * (size_t)(n_prompt + na));
      assert_int_equal(sa.spec_steps, sh.spec_steps);
      assert_int_equal(sa.spec_tokens, sh.spec_tokens);
      assert_int_equal(sa.tree_nodes, sh.tree_nodes);
      /* A dynamic tree's host path stops early where no node is worth expanding; chained, every
       * level runs (its shape is fixed before the step). */
      if (strncmp(trees[t], "dynamic", 7)) assert_int_equal(sa.draft_forwards, sh.draft_forwards);
      else assert_true(sa.draft_forwards >= sh.draft_forwards);
      assert_int_equal(sa.forward_passes, sh.forward_passes);
      assert_memory_equal(sa.accept_depth, sh.accept_depth, sizeof sa.accept_depth);
      assert_memory_equal(sa.offered_depth, sh.offered_depth, sizeof sa.offered_depth);
      assert_memory_equal(sa.accept_rank, sh.accept_rank, sizeof sa.accept_rank);
      assert_memory_equal(sa.offered_rank, sh.offered_rank, sizeof sa.offered_rank);
    }
}

/* A sampled tree's chained step draws each node's children where the draft's logits are and
 * accepts where the target's are, with the uniforms the host path takes for the same decisions:
 * from the same seed, the same tokens and the same acceptance as the host path. The rules keep at
 * least as many tokens as a node has children (where they keep fewer, the two paths' trees differ
 * by design: spec/speculate.h; test_spec_exact checks that case's distribution). */
static void test_sampled_chained_steps_equal_the_host_levels(void **state) {
  const char *trees[] = {"chain:3", "static:3,2,1", "[[0],[1],[0,0],[0,0,0],[1,0]]"};
  canopy_sampling_params rules[] = {{1.0f, 0, 1.0f, 7}, {0.7f, 40, 1.0f, 11}, {1.3f, 0, 0.999f, 5}};
  int n_new = quick() ? 10 : 24;
  int32_t prompt[2048], a[2200], h[2200];
  int n_prompt = prompt_ids(1, prompt);
  for (size_t t = 0; t < sizeof trees / sizeof trees[0]; t++)
    for (size_t r = 0; r < sizeof rules / sizeof rules[0]; r++) {
      if (quick() && t != r) continue;
      canopy_model *draft = (t + r) % 2 ? full_draft : shallow;
      canopy_stats sa, sh;
      int na = spec_steps_with(draft, trees[t], 0, &rules[r], prompt, n_prompt, n_new, a, &sa);
      int nh = spec_steps_with(draft, trees[t], 1, &rules[r], prompt, n_prompt, n_new, h, &sh);
      printf("[ sampled  ] %-32s T %.1f top_k %2d top_p %.3f draft %-8s %d tokens in %d steps (host path: %d in %d)\n",
             trees[t], rules[r].temperature, rules[r].top_k, rules[r].top_p, draft == full_draft ? "target" : "4 layers",
             na, sa.spec_steps, nh, sh.spec_steps);
      assert_int_equal(na, nh);
      assert_memory_equal(a, h, sizeof *a * (size_t)(n_prompt + na));
      assert_int_equal(sa.spec_steps, sh.spec_steps);
      assert_int_equal(sa.draft_forwards, sh.draft_forwards);
      assert_memory_equal(sa.accept_depth, sh.accept_depth, sizeof sa.accept_depth);
      assert_memory_equal(sa.accept_rank, sh.accept_rank, sizeof sa.accept_rank);
      assert_memory_equal(sa.offered_rank, sh.offered_rank, sizeof sa.offered_rank);
    }
  /* Another seed draws other tokens: the paths agree because they draw alike, not by accident.
   * (The Release run checks it; under the sanitizers (quick) the runs above suffice.) */
  if (quick()) return;
  canopy_sampling_params other = rules[0];
  other.seed = 8;
  canopy_stats so;
  int no = spec_steps_with(shallow, trees[0], 0, &other, prompt, n_prompt, n_new, h, &so);
  int na = spec_steps_with(shallow, trees[0], 0, &rules[0], prompt, n_prompt, n_new, a, &so);
  assert_true(no != na || memcmp(a, h, sizeof *a * (size_t)(n_prompt + na)) != 0);
}

/* Chained forwards name their buffers and indices when they are wrong, and leave no slot reserved. */
static void test_bad_chained_forwards_are_errors(void **state) {
  cn_ids ids;
  assert_int_equal(cn_ids_create(target, 0, &ids), CANOPY_ERR_INVALID_ARG);
  assert_int_equal(cn_ids_create(target, 4, &ids), CANOPY_OK);
  cn_kv_seq *kv;
  assert_int_equal(cn_kv_seq_create(target->kv, &kv), CANOPY_OK);
  int32_t tokens[2] = {1, 2}, pos[2] = {0, 1}, rows[2] = {0, 1}, top[4], src[2] = {-1, 9}, parent[2] = {-1, 1},
          out[6];
  cn_seq_batch sb = {.kv = kv, .n = 2};
  cn_batch b = {.n_tokens = 2, .tokens = tokens, .pos = pos, .n_seqs = 1, .seqs = &sb, .n_logits = 2,
                .logit_rows = rows, .top = top, .token_src = src, .src_ids = &ids};
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "token_src[1] = 9"));
  src[1] = 3;
  b.top_ids = &ids, b.top_ids_at = 3; /* 2 rows of ids from element 3 of 4 */
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "top ids"));
  b.top_ids = NULL;
  b.accept_parent = parent, b.accept_out = out; /* node 1 its own parent */
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "acceptance tree"));
  parent[1] = 0, src[1] = -1; /* a well-formed tree: the forward runs, and acceptance names node 1 or none */
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_OK);
  assert_true(out[0] == 0 || (out[0] == 1 && out[2] == 1 && out[4] == 2));
  assert_int_equal(out[1], out[0] ? top[1] : top[0]);
  assert_int_equal(cn_kv_seq_len(kv), 0); /* reserved, never committed */
  /* A dynamic tree's forward: ids too small for its layout, a level without its log-probabilities,
   * a verification of the wrong size. */
  cn_dyn_layout l = cn_dyn_layout_make(2, 2, 3); /* T = 4 */
  cn_dyn_step dyn = {.layout = &l, .ids = &ids, .grow = 1};
  b = (cn_batch){.n_tokens = 2, .tokens = tokens, .pos = pos, .n_seqs = 1, .seqs = &sb, .n_logits = 1,
                 .logit_rows = rows, .top = top, .top_k = 2, .n_dyn = 1, .dyn = &dyn};
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "words"));
  cn_ids big;
  assert_int_equal(cn_ids_create(target, l.words, &big), CANOPY_OK);
  dyn.ids = &big;
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "log-probabilities"));
  uint64_t mask[2];
  dyn = (cn_dyn_step){.layout = &l, .ids = &big, .stage = -1, .mask = mask, .pos = pos, .parent = parent,
                      .tree_out = out};
  sb.tree_mask = mask;
  b = (cn_batch){.n_tokens = 2, .tokens = tokens, .pos = pos, .n_seqs = 1, .seqs = &sb, .n_logits = 2,
                 .logit_rows = rows, .top = top, .accept_parent = parent, .accept_out = out, .n_dyn = 1, .dyn = &dyn};
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_ERR_INVALID_ARG);
  printf("[ error    ] %s\n", canopy_last_error());
  assert_non_null(strstr(canopy_last_error(), "verification"));
  assert_int_equal(cn_kv_seq_len(kv), 0);
  /* A sampled tree's forwards: draws without q_out, a uniform outside [0, 1), acceptance without its
   * workspace rows, or with too few. */
  cn_sample_rule rule = {1.0f, 0, 1.0f};
  double u[4] = {0.5, 0.25, 0.75, 1.0};
  sb.tree_mask = NULL;
  b = (cn_batch){.n_tokens = 2, .tokens = tokens, .pos = pos, .n_seqs = 1, .seqs = &sb, .n_logits = 2,
                 .logit_rows = rows, .top = top, .top_k = 2, .sample = &rule, .u = u};
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "q_out"));
  cn_rows q;
  assert_int_equal(cn_rows_create(target, 0, &q), CANOPY_ERR_INVALID_ARG);
  assert_int_equal(cn_rows_create(target, 2, &q), CANOPY_OK);
  float *q_out[2] = {cn_rows_at(&q, 0), cn_rows_at(&q, 1)};
  b.q_out = q_out;
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "u[3] = 1"));
  u[3] = 0.125;
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_OK); /* two draws a row, each row's q kept */
  for (int r = 0; r < 2; r++) {
    assert_true(top[2 * r] != top[2 * r + 1]);
    assert_true(q_out[r][top[2 * r]] > 0 && q_out[r][top[2 * r + 1]] > 0);
  }
  float *acc_q[2] = {q_out[0], NULL};
  parent[1] = 0;
  b = (cn_batch){.n_tokens = 2, .tokens = tokens, .pos = pos, .n_seqs = 1, .seqs = &sb, .n_logits = 2,
                 .logit_rows = rows, .accept_parent = parent, .accept_out = out, .accept_sample = &rule,
                 .accept_q = acc_q, .accept_u = u};
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_ERR_INVALID_ARG);
  printf("[ error    ] %s\n", canopy_last_error());
  assert_non_null(strstr(canopy_last_error(), "accept_rows of 4 rows"));
  b.accept_rows = &q; /* 2 rows: too few */
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_ERR_INVALID_ARG);
  assert_non_null(strstr(canopy_last_error(), "has 2 of"));
  cn_rows work;
  assert_int_equal(cn_rows_create(target, 4, &work), CANOPY_OK);
  b.accept_rows = &work;
  tokens[1] = top[0]; /* node 1 is the root's first draw: acceptance runs, names node 1 or none */
  assert_int_equal(cn_forward(target, &b, NULL), CANOPY_OK);
  assert_true(out[0] == 0 || (out[0] == 1 && out[2] == 1 && out[4] == top[0]));
  assert_true(out[1] >= 0 && out[1] < target->cfg.vocab_size);
  assert_int_equal(cn_kv_seq_len(kv), 0);
  cn_rows_free(target, &work);
  cn_rows_free(target, &q);
  cn_ids_free(target, &big);
  cn_kv_seq_free(kv);
  cn_ids_free(target, &ids);
}

static void test_target_as_draft_accepts_every_node_of_a_chain(void **state) {
  int32_t prompt[2048], out[64];
  int n_prompt = prompt_ids(0, prompt);
  canopy_stats st = run(full_draft, "chain:4", prompt, n_prompt, 30, out, NULL);
  /* Every step but the last (cut at max_tokens) yields depth + 1 tokens. */
  printf("[ spec     ] %d steps for 30 tokens, accept rate at depth 4: %d/%d\n", st.spec_steps, st.accept_depth[3],
         st.offered_depth[3]);
  assert_true(st.spec_steps <= 7);
  assert_true(st.accept_depth[3] >= st.offered_depth[3] - 1);
  /* A chain offers rank 0 only, and the target as its own draft takes it every time. */
  assert_true(st.offered_rank[0] > 0);
  assert_int_equal(st.accept_rank[0], st.offered_rank[0]);
  assert_int_equal(st.offered_rank[1], 0);
}

static void test_commit_leaves_the_cache_a_fresh_prefill_builds(void **state) {
  int32_t prompt[2048], all[2200];
  int n_prompt = prompt_ids(1, prompt);
  const char *trees[] = {"static:3,2,1", "dynamic:12,depth=3,topk=3"};
  for (size_t t = 0; t < (quick() ? 1u : 2u); t++) {
    canopy_session_params sp = canopy_session_default_params();
    sp.stop_at_eos = 0;
    sp.draft = shallow;
    sp.tree = trees[t];
    canopy_session *s, *fresh;
    assert_int_equal(canopy_session_create(target, &sp, &s), 0);
    assert_int_equal(canopy_session_append(s, prompt, n_prompt), 0);
    memcpy(all, prompt, sizeof *prompt * (size_t)n_prompt);
    int n = n_prompt;
    for (int step = 0; step < (quick() ? 5 : 10); step++) {
      assert_int_equal(canopy_session_next(s, &all[n]), CANOPY_OK);
      n++;
      /* Rewinding to the current length re-feeds the last token over the committed cache. */
      assert_int_equal(canopy_session_truncate(s, n), 0);
      const float *spec_logits, *ref_logits;
      int V;
      assert_int_equal(canopy_session_logits(s, &spec_logits, &V), 0);
      assert_int_equal(canopy_session_create(target, NULL, &fresh), 0);
      assert_int_equal(canopy_session_append(fresh, all, n), 0);
      assert_int_equal(canopy_session_logits(fresh, &ref_logits, &V), 0);
      double err = cn_test_rel_l2(spec_logits, ref_logits, (size_t)V);
      if (err > 1e-4) print_error("%s after %d tokens: rel L2 %g\n", trees[t], n, err);
      assert_true(err <= 1e-4);
      canopy_session_free(fresh);
    }
    canopy_session_free(s);
  }
}

static void test_batched_sessions_match_one_at_a_time(void **state) {
  enum { N = 4, NEW = 16 };
  canopy_model *drafts[N] = {shallow, NULL, full_draft, shallow};
  const char *trees[N] = {"chain:4", NULL, "static:3,2,1", "dynamic:8,depth=3,topk=3"};
  int32_t prompts[N][2048], alone[N][NEW], together[N][NEW];
  double gaps[N][NEW];
  int n_prompt[N], got[N] = {0};
  canopy_session *ss[N];
  for (int i = 0; i < N; i++) {
    n_prompt[i] = prompt_ids(i, prompts[i]);
    run(NULL, NULL, prompts[i], n_prompt[i], NEW, alone[i], gaps[i]);
    canopy_session_params sp = canopy_session_default_params();
    sp.max_tokens = NEW;
    sp.stop_at_eos = 0;
    sp.draft = drafts[i];
    sp.tree = trees[i];
    assert_int_equal(canopy_session_create(target, &sp, &ss[i]), 0);
    assert_int_equal(canopy_session_append(ss[i], prompts[i], n_prompt[i]), 0);
  }
  canopy_model_info shallow_before, shallow_after;
  canopy_model_get_info(shallow, &shallow_before);
  int steps = 0, stepped;
  for (;;) {
    assert_int_equal(canopy_sessions_step(ss, N, &stepped), 0);
    if (stepped == 0) break;
    steps++;
    for (int i = 0; i < N; i++) {
      canopy_stats before, after;
      canopy_session_get_stats(ss[i], &before);
      int32_t t;
      /* Drain what the step produced: these calls run no forward. */
      while (canopy_session_ready(ss[i]) > 0 && got[i] < NEW && canopy_session_next(ss[i], &t) == CANOPY_OK)
        together[i][got[i]++] = t;
      canopy_session_get_stats(ss[i], &after);
      assert_int_equal(after.forward_passes, before.forward_passes);
    }
  }
  printf("[ batch    ] %d sessions, %d batched steps\n", N, steps);
  /* Sessions 0 and 3 share the shallow draft: each round of drafting is one forward for both. */
  canopy_model_get_info(shallow, &shallow_after);
  canopy_stats s0, s3;
  canopy_session_get_stats(ss[0], &s0);
  canopy_session_get_stats(ss[3], &s3);
  long shared = (long)(shallow_after.n_forwards - shallow_before.n_forwards);
  printf("[ batch    ] shallow draft: %ld forwards for %ld session-forwards\n", shared,
         (long)(s0.draft_forwards + s3.draft_forwards));
  assert_true(shared < s0.draft_forwards + s3.draft_forwards);
  assert_true(shared >= (s0.draft_forwards > s3.draft_forwards ? s0.draft_forwards : s3.draft_forwards));
  for (int i = 0; i < N; i++) {
    assert_int_equal(got[i], NEW);
    int first = 0;
    while (first < NEW && together[i][first] == alone[i][first]) first++;
    printf("[ batch    ] session %d (%s): %s\n", i, trees[i] ? trees[i] : "target only",
           first == NEW ? "identical" : "differs");
    if (first < NEW) assert_true(gaps[i][first] < NEAR_TIE);
    canopy_session_free(ss[i]);
  }
}

/* Steps N sessions (prompt p0 + i, drafts[i] with trees[i]; a session without a draft samples at
 * plain_temp; with rules, session i samples by rules[i]) together to NEW tokens each, all on the host
 * path when host_levels; N = 1 steps by canopy_session_next alone. */
static void step_sessions_by(int N, int p0, canopy_model *const *drafts, const char *const *trees, int host_levels,
                             float plain_temp, const canopy_sampling_params *rules, int32_t (*out)[16],
                             canopy_stats *stats) {
  const int NEW = quick() ? 8 : 16;
  canopy_session *ss[8];
  int got[8] = {0}, stepped;
  if (host_levels) setenv("CANOPY_SPEC_HOST_LEVELS", "1", 1);
  for (int i = 0; i < N; i++) {
    int32_t prompt[2048];
    int n_prompt = prompt_ids(p0 + i, prompt);
    canopy_session_params sp = canopy_session_default_params();
    sp.max_tokens = NEW;
    sp.stop_at_eos = 0;
    sp.draft = drafts[i];
    sp.tree = trees[i];
    if (!drafts[i]) sp.sampling.temperature = plain_temp;
    if (rules) sp.sampling = rules[i];
    assert_int_equal(canopy_session_create(target, &sp, &ss[i]), 0);
    assert_int_equal(canopy_session_append(ss[i], prompt, n_prompt), 0);
  }
  unsetenv("CANOPY_SPEC_HOST_LEVELS");
  while (N == 1 && got[0] < NEW && canopy_session_next(ss[0], &out[0][got[0]]) == CANOPY_OK) got[0]++;
  int st;
  while (N > 1 && (st = canopy_sessions_step(ss, N, &stepped)) == CANOPY_OK && stepped > 0)
    for (int i = 0; i < N; i++) {
      int32_t t;
      while (canopy_session_ready(ss[i]) > 0 && got[i] < NEW && canopy_session_next(ss[i], &t) == CANOPY_OK)
        out[i][got[i]++] = t;
    }
  if (N > 1 && st) print_error("%s\n", canopy_last_error());
  for (int i = 0; i < N; i++) {
    assert_int_equal(got[i], NEW);
    canopy_session_get_stats(ss[i], &stats[i]);
    canopy_session_free(ss[i]);
  }
}

static void step_sessions(int N, canopy_model *const *drafts, const char *const *trees, int host_levels,
                          float plain_temp, int32_t (*out)[16], canopy_stats *stats) {
  step_sessions_by(N, 0, drafts, trees, host_levels, plain_temp, NULL, out, stats);
}

/* Sessions stepped on the chained path (a, sa) made the host path's tokens and steps (b, sb), and
 * target-only decoding's tokens but at near-ties. */
static void same_as_host_path_and_alone(int N, int32_t (*a)[16], int32_t (*b)[16], const canopy_stats *sa,
                                        const canopy_stats *sb, const char *label) {
  const int NEW = quick() ? 8 : 16;
  for (int i = 0; i < N; i++) {
    int32_t prompt[2048], alone[16];
    double gaps[16];
    int n_prompt = prompt_ids(i, prompt);
    run(NULL, NULL, prompt, n_prompt, NEW, alone, gaps);
    assert_memory_equal(a[i], b[i], sizeof *a[i] * (size_t)NEW);
    assert_int_equal(sa[i].spec_steps, sb[i].spec_steps);
    assert_int_equal(sa[i].spec_tokens, sb[i].spec_tokens);
    /* A dynamic tree's host path stops early where no node is worth expanding; chained, every level
     * runs. */
    assert_true(sa[i].draft_forwards >= sb[i].draft_forwards);
    assert_int_equal(sa[i].forward_passes, sb[i].forward_passes);
    assert_memory_equal(sa[i].accept_rank, sb[i].accept_rank, sizeof sa[i].accept_rank);
    int first = 0;
    while (first < NEW && a[i][first] == alone[first]) first++;
    printf("[ %-8s ] session %d stepped together: %d steps, %d forwards, %s target-only\n", label, i,
           sa[i].spec_steps, sa[i].forward_passes, first == NEW ? "identical to" : "differs at a near-tie from");
    if (first < NEW) assert_true(gaps[first] < NEAR_TIE);
  }
}

/* Sessions stepped together whose trees all chain (greedy static trees, one draft model) run the
 * batched step chained: the draft's pieces of every session share forwards whose picks stay in
 * the draft's shared ids, and one target forward verifies and accepts every tree. The tokens are
 * the host path's, and target-only decoding's but at near-ties. */
static void batched_chained(int host_levels, int32_t out[3][16], canopy_stats *stats) {
  canopy_model *drafts[3] = {shallow, shallow, shallow};
  const char *trees[3] = {"chain:4", "static:3,2,1", "[[0],[2],[2,1]]"};
  step_sessions(3, drafts, trees, host_levels, 0, out, stats);
}

static void test_chained_batched_sessions_match_the_host_path_and_one_at_a_time(void **state) {
  enum { N = 3, CAP = 16 };
  int32_t chained[N][CAP], host[N][CAP];
  canopy_stats sc[N], sh[N];
  cn_ids_free(shallow, &shallow->step_ids);
  batched_chained(1, host, sh);
  assert_null(shallow->step_ids.buf); /* the host path never chained */
  int64_t before = shallow->n_forwards;
  batched_chained(0, chained, sc);
  assert_non_null(shallow->step_ids.buf); /* this one did */
  long shared = (long)(shallow->n_forwards - before), separate = 0;
  same_as_host_path_and_alone(N, chained, host, sc, sh, "chained");
  for (int i = 0; i < N; i++) separate += sc[i].draft_forwards;
  printf("[ chained  ] the draft ran %ld forwards for %ld session-forwards\n", shared, separate);
  assert_true(shared < separate);
}

/* A mixed batch: two draft models' chained trees, static and dynamic, and a session without a
 * draft. Both drafts write their picks to one shared ids buffer, the dynamic trees grow in their
 * own, the plain session is a tree of one node, and one target forward verifies and accepts all of
 * them where the logits are (target->step_accept is where its results land). With a sampled plain
 * session among them the step takes the host path. */
static void mixed_batch(int host_levels, float plain_temp, int32_t out[5][16], canopy_stats *stats) {
  canopy_model *drafts[5] = {shallow, full_draft, NULL, shallow, full_draft};
  const char *trees[5] = {"chain:4", "static:2,1", NULL, "dynamic:8,depth=3,topk=3", "dynamic:6,depth=2,topk=2"};
  step_sessions(5, drafts, trees, host_levels, plain_temp, out, stats);
}

static void test_mixed_batches_accept_where_the_logits_are(void **state) {
  enum { N = 5, CAP = 16 };
  int32_t dev[N][CAP], host[N][CAP], sampled[N][CAP];
  canopy_stats sd[N], sh[N], ss[N];
  free(target->step_accept);
  target->step_accept = NULL, target->step_accept_cap = 0;
  mixed_batch(1, 0, host, sh);
  assert_null(target->step_accept); /* the host path accepts on the host */
  mixed_batch(0, 0.8f, sampled, ss);
  assert_null(target->step_accept); /* a sampled session needs its logits: the host path */
  mixed_batch(0, 0, dev, sd);
  assert_non_null(target->step_accept);
  same_as_host_path_and_alone(N, dev, host, sd, sh, "mixed");
}

/* Sampled sessions stepped together under one rule run the batched step chained: their trees' draws
 * share draft forwards where the logits are, and one target forward accepts every tree there. Each
 * session's randomness is its own, drawn as the host path draws it: the tokens equal the host
 * path's and each session's stepped alone. Sessions under different rules share steps on the host
 * path. */
static void test_sampled_sessions_stepped_together_chained(void **state) {
  enum { N = 3, CAP = 16 };
  canopy_model *drafts[N] = {shallow, quick() ? shallow : full_draft, shallow}; /* quick: under the sanitizers */
  const char *trees[N] = {"chain:3", "static:2,1", "[[0],[1],[0,0],[0,0,0],[1,0]]"};
  canopy_sampling_params rules[N] = {{0.8f, 0, 1.0f, 101}, {0.8f, 0, 1.0f, 102}, {0.8f, 0, 1.0f, 103}};
  int32_t chained[N][CAP], host[N][CAP], alone[1][CAP];
  canopy_stats sc[N], sh[N], sa[1];
  free(target->step_accept);
  target->step_accept = NULL, target->step_accept_cap = 0;
  cn_rows_free(target, &target->step_prows); /* single sessions' chained steps made it too */
  step_sessions_by(N, 0, drafts, trees, 1, 0, rules, host, sh);
  assert_null(target->step_accept);
  assert_null(target->step_prows.buf);
  step_sessions_by(N, 0, drafts, trees, 0, 0, rules, chained, sc);
  assert_non_null(target->step_accept); /* accepted where the logits are */
  assert_non_null(target->step_prows.buf);
  const int NEW = quick() ? 8 : 16;
  for (int i = 0; i < N; i++) {
    step_sessions_by(1, i, &drafts[i], &trees[i], 0, 0, &rules[i], alone, sa);
    printf("[ sampled  ] session %d (%s) stepped together: %d steps, %.2f tokens a step; %s the host path, %s alone\n",
           i, trees[i], sc[i].spec_steps, (double)sc[i].spec_tokens / sc[i].spec_steps,
           memcmp(chained[i], host[i], sizeof *chained[i] * (size_t)NEW) ? "differs from" : "equals",
           memcmp(chained[i], alone[0], sizeof *chained[i] * (size_t)NEW) ? "differs from" : "equals");
    assert_memory_equal(chained[i], host[i], sizeof *chained[i] * (size_t)NEW);
    assert_memory_equal(chained[i], alone[0], sizeof *chained[i] * (size_t)NEW);
    assert_int_equal(sc[i].spec_steps, sh[i].spec_steps);
    assert_memory_equal(sc[i].accept_rank, sh[i].accept_rank, sizeof sc[i].accept_rank);
  }
  /* One session under another temperature: a step it shares with the others takes the host path (one
   * where the others finished first may chain); the tokens are the host path's either way. The
   * Release run checks it (quick: under the sanitizers). */
  if (quick()) return;
  rules[2].temperature = 0.9f;
  step_sessions_by(N, 0, drafts, trees, 0, 0, rules, chained, sc);
  step_sessions_by(N, 0, drafts, trees, 1, 0, rules, host, sh);
  for (int i = 0; i < N; i++) assert_memory_equal(chained[i], host[i], sizeof *chained[i] * (size_t)NEW);
}

/* A draft whose KV pool runs out in the middle of a chained step: the step ends with
 * CANOPY_ERR_KV_EXHAUSTED and a message, leaves the target's cache as it was, and closing the
 * session gives every block back to both pools. */
static void test_a_draft_pool_exhausted_mid_step_is_an_error(void **state) {
  canopy_model_params mp = canopy_model_default_params();
  mp.max_context = 4096;
  mp.n_layers = 4;
  mp.kv_blocks = 3; /* 48 slots: the step's catch-up (47 prompt tokens and the first new one) fills
                     * them, and the tree's levels find none */
  canopy_model *tight;
  assert_int_equal(canopy_model_load(model_dir, &mp, &tight), CANOPY_OK);
  int32_t prompt[4096], t;
  int n_prompt = prompt_ids(0, prompt);
  n_prompt += prompt_ids(1, prompt + n_prompt); /* two prompts one after the other: long enough */
  assert_true(n_prompt >= 47);
  n_prompt = 47;
  canopy_session_params sp = canopy_session_default_params();
  sp.stop_at_eos = 0;
  sp.draft = tight;
  sp.tree = "static:2,2,1";
  canopy_session *s;
  int target_before = cn_kv_pool_in_use(target->kv);
  assert_int_equal(canopy_session_create(target, &sp, &s), CANOPY_OK);
  assert_int_equal(canopy_session_append(s, prompt, n_prompt), CANOPY_OK);
  assert_int_equal(canopy_session_next(s, &t), CANOPY_OK); /* from the prompt's logits: no step yet */
  int len = canopy_session_len(s), st = canopy_session_next(s, &t);
  printf("[ chained  ] draft pool of 3 blocks: %s\n", canopy_last_error());
  assert_int_equal(st, CANOPY_ERR_KV_EXHAUSTED);
  assert_int_equal(canopy_session_len(s), len);
  canopy_session_free(s);
  assert_int_equal(cn_kv_pool_in_use(target->kv), target_before);
  assert_int_equal(cn_kv_pool_in_use(tight->kv), 0);
  canopy_model_free(tight);
}

static void expect_error(canopy_model *draft, const char *tree, float temp, int status, const char *needle) {
  canopy_session_params sp = canopy_session_default_params();
  sp.draft = draft;
  sp.tree = tree;
  sp.sampling.temperature = temp;
  canopy_session *s = NULL;
  int st = canopy_session_create(target, &sp, &s);
  printf("[ error    ] %-24s -> %d: %s\n", tree ? tree : "(null)", st, canopy_last_error());
  assert_int_equal(st, status);
  assert_non_null(strstr(canopy_last_error(), needle));
  assert_null(s);
}

/* A server cancels sessions at any moment: between steps with drafted tokens still queued, or
 * before their first step. Freeing them returns every block to both models' pools, and the
 * pools' bookkeeping stays consistent. */
static void test_sessions_closed_at_any_time_release_every_block(void **state) {
  enum { N = 4 };
  const char *trees[N] = {"chain:4", "dynamic:8,depth=3,topk=3", NULL, "static:3,2,1"};
  int target_before = cn_kv_pool_in_use(target->kv), draft_before = cn_kv_pool_in_use(shallow->kv);
  for (int close_after = 0; close_after < 3; close_after++) {
    canopy_session *ss[N];
    int32_t prompt[2048];
    for (int i = 0; i < N; i++) {
      canopy_session_params sp = canopy_session_default_params();
      sp.stop_at_eos = 0;
      sp.draft = trees[i] ? shallow : NULL;
      sp.tree = trees[i];
      sp.sampling.temperature = i == 1 ? 0.7f : 0.0f;
      assert_int_equal(canopy_session_create(target, &sp, &ss[i]), 0);
      assert_int_equal(canopy_session_append(ss[i], prompt, prompt_ids(i, prompt)), 0);
    }
    int stepped;
    for (int k = 0; k < close_after; k++) assert_int_equal(canopy_sessions_step(ss, N, &stepped), 0);
    int32_t t;
    if (close_after) assert_int_equal(canopy_session_next(ss[0], &t), CANOPY_OK); /* leave some queued */
    assert_true(cn_kv_pool_in_use(target->kv) > target_before);
    for (int i = 0; i < N; i++) canopy_session_free(ss[i]);
    assert_int_equal(cn_kv_pool_in_use(target->kv), target_before);
    assert_int_equal(cn_kv_pool_in_use(shallow->kv), draft_before);
    char why[256];
    if (!cn_kv_pool_check(target->kv, why, sizeof why) || !cn_kv_pool_check(shallow->kv, why, sizeof why))
      fail_msg("pool bookkeeping: %s", why);
  }
}

static void test_bad_trees_and_drafts_are_errors(void **state) {
  expect_error(shallow, "chain:0", 0, CANOPY_ERR_INVALID_ARG, "chain");
  expect_error(shallow, "static:2,0", 0, CANOPY_ERR_INVALID_ARG, "0");
  expect_error(shallow, "dynamic:0", 0, CANOPY_ERR_INVALID_ARG, "0");
  expect_error(shallow, "bogus:3", 0, CANOPY_ERR_INVALID_ARG, "bogus");
  expect_error(shallow, "[[1],[0,0]]", 0, CANOPY_ERR_INVALID_ARG, "prefix");
  expect_error(shallow, "[[0],[2]]", 0.7f, CANOPY_ERR_UNSUPPORTED, "lower-ranked siblings");
  char other[1200];
  cn_test_path(other, sizeof other, "tests/fixtures/models/llama");
  canopy_model *tiny;
  assert_int_equal(canopy_model_load(other, NULL, &tiny), 0);
  expect_error(tiny, "chain:2", 0, CANOPY_ERR_VOCAB_MISMATCH, "vocabulary");
  canopy_model_free(tiny);

  /* A tree deeper than the room left in the context. */
  canopy_model_params mp = canopy_model_default_params();
  mp.max_context = 24;
  canopy_model *small;
  assert_int_equal(canopy_model_load(model_dir, &mp, &small), 0);
  canopy_session_params sp = canopy_session_default_params();
  sp.draft = shallow;
  sp.tree = "chain:8";
  sp.stop_at_eos = 0;
  canopy_session *s;
  assert_int_equal(canopy_session_create(small, &sp, &s), 0);
  int32_t prompt[2048], t;
  assert_int_equal(canopy_session_append(s, prompt_ids(0, prompt) > 20 ? prompt : prompt, 20), 0);
  /* Speculation stops where the tree no longer fits; plain decoding finishes the context. */
  int n = 0, st;
  while ((st = canopy_session_next(s, &t)) == CANOPY_OK) n++;
  assert_int_equal(st, CANOPY_DONE);
  assert_int_equal(canopy_session_len(s), 24);
  canopy_session_free(s);
  canopy_model_free(small);
}

static int setup(void **state) {
  canopy_model_params mp = canopy_model_default_params();
  mp.max_context = 4096;
  if (canopy_model_load(model_dir, &mp, &target) || canopy_model_load(model_dir, &mp, &full_draft)) return -1;
  mp.n_layers = 4;
  return canopy_model_load(model_dir, &mp, &shallow);
}

static int teardown(void **state) {
  canopy_model_free(target);
  canopy_model_free(shallow);
  canopy_model_free(full_draft);
  return 0;
}

int main(void) {
  if (cn_test_smollm2_dir(model_dir, sizeof model_dir)) return CN_TEST_SKIP;
  char path[1200];
  cn_test_path(path, sizeof path, "tests/fixtures/smollm2_greedy.json");
  char *text = cn_test_read_file(path, NULL);
  fixture = text ? cJSON_Parse(text) : NULL;
  free(text);
  if (!fixture) return 1;
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_greedy_speculation_equals_target_only),
      cmocka_unit_test(test_chained_steps_equal_the_host_levels),
      cmocka_unit_test(test_sampled_chained_steps_equal_the_host_levels),
      cmocka_unit_test(test_bad_chained_forwards_are_errors),
      cmocka_unit_test(test_target_as_draft_accepts_every_node_of_a_chain),
      cmocka_unit_test(test_commit_leaves_the_cache_a_fresh_prefill_builds),
      cmocka_unit_test(test_batched_sessions_match_one_at_a_time),
      cmocka_unit_test(test_chained_batched_sessions_match_the_host_path_and_one_at_a_time),
      cmocka_unit_test(test_mixed_batches_accept_where_the_logits_are),
      cmocka_unit_test(test_sampled_sessions_stepped_together_chained),
      cmocka_unit_test(test_sessions_closed_at_any_time_release_every_block),
      cmocka_unit_test(test_a_draft_pool_exhausted_mid_step_is_an_error),
      cmocka_unit_test(test_bad_trees_and_drafts_are_errors),
  };
  int rc = cn_test_run_group("test_spec", tests, sizeof tests / sizeof tests[0], setup, teardown);
  cJSON_Delete(fixture);
  return rc;
}
