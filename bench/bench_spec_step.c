/* A speculative step chained on the backend against the same step on the host path, side by side
 * in one run: the draft's levels fed from picks kept where they were made and acceptance where the
 * logits are (one wait a step), against each level's picks brought to the host before the next
 * level is built ($CANOPY_SPEC_HOST_LEVELS=1, read when a session's speculation is made). Both
 * against target-only decoding. Greedy, through the sessions API, decode time only (the prompt's
 * prefill excluded): ms a step, tokens a step, tokens/s.
 *
 * Models come from checkpoints (--target DIR, --draft DIR) or random weights of a config's shape
 * (--target-config, --draft-config: the same config and seed give the same weights, so a draft of
 * the target's own config accepts every node, the most a step can return; --draft-layers N keeps
 * the draft's first N layers). The prompt is --ctx random ids; runs alternate between the paths
 * (--reps times each) so that drift between processes or clocks shows. With --sessions S > 1, S
 * sessions (different random prompts) are stepped together by canopy_sessions_step, one draft
 * forward a round for all of them and one target forward verifying every tree; a step is then one
 * such batched step, and tokens count over all sessions. --plain P makes the last P of them decode
 * without a draft in the speculative runs (a mixed batch: each is a tree of one node). --temp T
 * (with --top-k, --top-p) samples instead, with the same seed on both paths: a sampled static tree
 * steps chained for one session (its draws and acceptance where the logits are, with the uniforms
 * the host path takes, so both paths give the same tokens), and on the host path when sessions are
 * stepped together.
 *
 * usage: bench_spec_step (--target DIR | --target-config JSON) (--draft DIR | --draft-config JSON)
 *                        [--draft-layers N] [--device cuda|cpu] [--tree T ...] [--ctx L] [--new N] [--reps R]
 *                        [--sessions S] [--plain P] [--temp T] [--top-k K] [--top-p P] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_util.h"
#include "canopy.h"

#define MAX_TREES 8
#define MAX_REPS 16
#define MAX_SESSIONS 64

static void die(const char *what) {
  fprintf(stderr, "bench_spec_step: %s: %s\n", what, canopy_last_error());
  exit(1);
}

typedef struct run_result {
  double s;       /* decode seconds (canopy_session_next) */
  int tokens, steps, forwards;
} run_result;

/* One greedy generation of n tokens after each of S prompts (L ids each, one after the other in
 * `prompt`); tree NULL: target only. host_levels picks the path for a speculative run. S == 1 runs
 * canopy_session_next, more step the sessions together. out [S][n]. */
static canopy_sampling_params rule; /* greedy unless --temp */

static run_result generate(canopy_model *target, canopy_model *draft, const char *tree, int host_levels,
                           const int32_t *prompt, int L, int S, int plain, int n, int32_t *out) {
  if (host_levels) setenv("CANOPY_SPEC_HOST_LEVELS", "1", 1);
  else unsetenv("CANOPY_SPEC_HOST_LEVELS");
  canopy_session_params sp = canopy_session_default_params();
  sp.sampling = rule;
  sp.max_tokens = n;
  sp.stop_at_eos = 0;
  canopy_session *ss[MAX_SESSIONS];
  for (int i = 0; i < S; i++) {
    sp.draft = tree && i < S - plain ? draft : NULL;
    sp.tree = sp.draft ? tree : NULL;
    if (canopy_session_create(target, &sp, &ss[i])) die("session");
    if (canopy_session_append(ss[i], prompt + (size_t)i * L, L)) die("prompt");
  }
  unsetenv("CANOPY_SPEC_HOST_LEVELS");
  int got[MAX_SESSIONS] = {0}, total = 0, steps = 0, st, stepped;
  double t0 = bench_now_s();
  if (S == 1) {
    while (got[0] < n && (st = canopy_session_next(ss[0], &out[got[0]])) == CANOPY_OK) got[0]++;
    total = got[0];
  } else {
    while (canopy_sessions_step(ss, S, &stepped) == CANOPY_OK && stepped > 0) {
      steps++;
      for (int i = 0; i < S; i++) {
        int32_t t;
        while (canopy_session_ready(ss[i]) > 0 && got[i] < n && canopy_session_next(ss[i], &t) == CANOPY_OK)
          out[(size_t)i * n + got[i]++] = t;
      }
    }
    for (int i = 0; i < S; i++) total += got[i];
  }
  double t = bench_now_s() - t0;
  if (total < S * n) die("generation");
  int spec_steps = 0, forwards = 0;
  for (int i = 0; i < S; i++) {
    canopy_stats stats;
    canopy_session_get_stats(ss[i], &stats);
    spec_steps += stats.spec_steps;
    forwards += stats.draft_forwards + stats.spec_steps;
    canopy_session_free(ss[i]);
  }
  if (S == 1) steps = tree ? spec_steps : n;
  return (run_result){.s = t, .tokens = total, .steps = steps, .forwards = forwards};
}

static canopy_model *load(const char *dir, const char *config, int layers, int device, int ctx, int sessions) {
  canopy_model_params mp = canopy_model_default_params();
  mp.device = device;
  mp.max_context = ctx;
  mp.kv_blocks = 2 * sessions * ((ctx + 15) / 16 + 1); /* every session's context, twice over */
  mp.n_layers = layers;
  mp.random_weights = config;
  canopy_model *m;
  if (canopy_model_load(dir, &mp, &m)) die(config ? config : dir);
  return m;
}

int main(int argc, char **argv) {
  const char *target_dir = NULL, *target_cfg = NULL, *draft_dir = NULL, *draft_cfg = NULL, *trees[MAX_TREES];
  int n_trees = 0, draft_layers = 0, device = CANOPY_DEVICE_CUDA, L = 256, n_new = 128, reps = 3, S = 1, plain = 0;
  rule = canopy_sampling_default_params();
  rule.temperature = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--target") && i + 1 < argc) target_dir = argv[++i];
    else if (!strcmp(argv[i], "--target-config") && i + 1 < argc) target_cfg = argv[++i];
    else if (!strcmp(argv[i], "--draft") && i + 1 < argc) draft_dir = argv[++i];
    else if (!strcmp(argv[i], "--draft-config") && i + 1 < argc) draft_cfg = argv[++i];
    else if (!strcmp(argv[i], "--draft-layers") && i + 1 < argc) draft_layers = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--device") && i + 1 < argc) device = !strcmp(argv[++i], "cpu") ? CANOPY_DEVICE_CPU : CANOPY_DEVICE_CUDA;
    else if (!strcmp(argv[i], "--tree") && i + 1 < argc && n_trees < MAX_TREES) trees[n_trees++] = argv[++i];
    else if (!strcmp(argv[i], "--ctx") && i + 1 < argc) L = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--new") && i + 1 < argc) n_new = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--sessions") && i + 1 < argc) S = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--plain") && i + 1 < argc) plain = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--temp") && i + 1 < argc) rule.temperature = (float)atof(argv[++i]);
    else if (!strcmp(argv[i], "--top-k") && i + 1 < argc) rule.top_k = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--top-p") && i + 1 < argc) rule.top_p = (float)atof(argv[++i]);
    else {
      fprintf(stderr, "usage: bench_spec_step (--target DIR | --target-config JSON) (--draft DIR | --draft-config JSON) "
                      "[--draft-layers N] [--device cuda|cpu] [--tree T ...] [--ctx L] [--new N] [--reps R] "
                      "[--sessions S] [--plain P] [--temp T] [--top-k K] [--top-p P]\n");
      return 2;
    }
  }
  if ((!target_dir && !target_cfg) || (!draft_dir && !draft_cfg) || L < 2 || n_new < 1 || reps < 1 ||
      reps > MAX_REPS || S < 1 || S > MAX_SESSIONS || plain < 0 || plain >= S || !(rule.temperature >= 0) ||
      rule.top_k < 0 || !(rule.top_p > 0 && rule.top_p <= 1)) {
    fprintf(stderr, "bench_spec_step: give a target and a draft, --ctx >= 2, --new >= 1, --reps 1..%d, "
                    "--sessions 1..%d, --plain 0..S-1, --temp >= 0, --top-k >= 0, --top-p in (0, 1]\n", MAX_REPS, MAX_SESSIONS);
    return 2;
  }
  if (!n_trees) trees[n_trees++] = "chain:2", trees[n_trees++] = "chain:4", trees[n_trees++] = "static:3,2,1";
  int ctx = L + n_new + 64;
  canopy_model *target = load(target_dir, target_cfg, 0, device, ctx, S);
  canopy_model *draft = load(draft_dir, draft_cfg, draft_layers, device, ctx, S);
  canopy_model_info ti, di;
  canopy_model_get_info(target, &ti);
  canopy_model_get_info(draft, &di);
  char how[96] = "greedy";
  if (rule.temperature > 0)
    snprintf(how, sizeof how, "sampled (T %g, top-k %d, top-p %g, seed %llu)", rule.temperature, rule.top_k, rule.top_p,
             (unsigned long long)rule.seed);
  printf("target %s (%d layers), draft %s (%d layers), %s, %d session%s of %d random ids, %d new tokens each, "
         "%s, %d reps alternating%s\n",
         target_cfg ? target_cfg : target_dir, ti.n_layers, draft_cfg ? draft_cfg : draft_dir, di.n_layers,
         device == CANOPY_DEVICE_CUDA ? "cuda" : "cpu", S, S > 1 ? "s stepped together" : "", L, n_new, how, reps,
         plain ? ", the last sessions without a draft (--plain)" : "");
  size_t n_out = (size_t)S * n_new;
  int32_t *prompt = malloc(sizeof *prompt * (size_t)L * S), *out = malloc(sizeof *out * n_out),
          *ref = malloc(sizeof *ref * n_out), *first = malloc(sizeof *first * n_out);
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (int i = 0; i < L * S; i++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    prompt[i] = (int32_t)(x % (uint64_t)ti.vocab_size);
  }
  /* Warm-up (graphs captured, buffers grown), then the target alone. */
  generate(target, draft, NULL, 0, prompt, L, S, 0, n_new, ref);
  double alone[MAX_REPS];
  for (int r = 0; r < reps; r++)
    alone[r] = generate(target, draft, NULL, 0, prompt, L, S, 0, n_new, ref).s;
  double alone_s = bench_median(alone, reps);
  /* Sampled runs cannot match target-only token for token (speculation draws differently), but
   * the two paths draw alike: the host path's tokens are compared with the chained path's. */
  int sampled = rule.temperature > 0;
  printf("\n%-28s %-8s %9s %9s %10s %10s %8s %s\n", "tree", "path", "tok/step", "ms/step", "ms/token", "tok/s",
         "x alone", sampled ? "same tokens as the chained path" : "same tokens as target-only");
  printf("%-28s %-8s %9.2f %9.3f %10.3f %10.1f %8.2f\n", "(target only)", "", (double)S, 1e3 * alone_s / n_new,
         1e3 * alone_s / n_out, n_out / alone_s, 1.0);
  for (int t = 0; t < n_trees; t++) {
    run_result best[2];
    double sec[2][MAX_REPS];
    int same[2] = {1, 1};
    for (int p = 0; p < 2; p++) generate(target, draft, trees[t], p, prompt, L, S, plain, n_new, out); /* warm-up */
    for (int r = 0; r < reps; r++)
      for (int p = 0; p < 2; p++) {
        run_result rr = generate(target, draft, trees[t], p, prompt, L, S, plain, n_new, out);
        sec[p][r] = rr.s;
        best[p] = rr;
        if (sampled && !p) memcpy(first, out, sizeof *out * n_out);
        same[p] &= !memcmp(out, sampled ? first : ref, sizeof *out * n_out);
      }
    for (int p = 0; p < 2; p++) {
      double s = bench_median(sec[p], reps);
      printf("%-28s %-8s %9.2f %9.3f %10.3f %10.1f %8.2f %s\n", trees[t], p ? "host" : "chained",
             (double)best[p].tokens / best[p].steps, 1e3 * s / best[p].steps, 1e3 * s / n_out, n_out / s, alone_s / s,
             same[p] ? "yes" : sampled ? "no (a draw within rounding of a step)"
                                       : "no (near-ties: batched verification sums in another order)");
    }
  }
  free(prompt), free(out), free(ref), free(first);
  canopy_model_free(draft);
  canopy_model_free(target);
  return 0;
}
