/* Sampling on the device (cn_cuda_sample, the backends' sample_rows) against its CPU twin
 * (cn_cpu_sample), and the losslessness of greedy speculation on CUDA:
 *   - same logits and u -> same token, at awkward shapes and every kind of cut; a mismatch is
 *     allowed only where u lies within 1e-5 of the CPU's CDF step between the two picks, or the
 *     top-p mass within 1e-5 of a prefix sum (both counted and printed);
 *   - the device's draws follow the rule's exact probabilities (chi-square);
 *   - sampled generation on CUDA (sessions without speculation: the token is drawn on the device)
 *     picks, at every position, the twin's token for the device's own logits, and agrees with the
 *     CPU backend's generation up to the first position where u falls between the two backends'
 *     CDFs (bf16 versus fp32 logits): a near-tie, counted;
 *   - greedy speculation on CUDA equals CUDA target-only, except where the target-only top-2
 *     logit gap is below 2^-7 of the top logit (bf16's relative rounding) and the speculative
 *     run took the runner-up there: a near-tie, counted.
 * Skips (exit 77) without CUDA or a device. */
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

#include "tests/testing.h"

#ifdef CANOPY_HAVE_CUDA
#include "canopy.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "spec/sampler.h"

static uint64_t rng;
static cn_cuda_ctx *ctx;

#define CK(call)                                                                                                       \
  do {                                                                                                                 \
    int st_ = (call);                                                                                                  \
    if (st_) fail_msg("%s -> %d: %s", #call, st_, canopy_last_error());                                                \
  } while (0)

/* A draw's allowed distance from a CDF step where the device's double sums (in another order)
 * may round the other way. */
#define BOUNDARY 1e-5

static double uniform(void) { return (double)(cn_test_rand(&rng) >> 11) * 0x1.0p-53; }

/* Logits of three kinds: spread (uniform * scale), quantised to quarters (many exact ties, so
 * the tie-break decides the kept set), and peaked (one or two tokens dominate). */
static void fill_logits(float *l, size_t n, int kind) {
  float scale = 1 + 7 * (float)uniform();
  for (size_t i = 0; i < n; i++) {
    float x = scale * cn_test_randf(&rng);
    l[i] = kind == 1 ? roundf(4 * x) / 4 : x;
  }
  if (kind == 2)
    for (size_t i = 0; i < n; i += 1 + cn_test_rand(&rng) % 4099)
      l[i] += 12;
}

static int by_total_order(const void *a, const void *b, void *keys) {
  int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
  float x = ((const float *)keys)[i], y = ((const float *)keys)[j];
  return x > y ? -1 : x < y ? 1 : (i > j) - (i < j);
}

/* How far a CPU/device disagreement lies from a rounding boundary of the rule: the distance of u
 * from the CPU CDF step at the lower of the two picks, or of top_p from a top-k prefix's mass
 * (relative), whichever is smaller. */
static double boundary_distance(const cn_sample_rule *r, const float *logits, int V, double u, int a, int b,
                                const float *dist) {
  int lo = a < b ? a : b;
  double cum = 0;
  for (int i = 0; i <= lo; i++)
    cum += dist[i];
  double best = fabs(u - cum);
  if (r->top_p < 1) {
    int32_t *idx = malloc(sizeof *idx * (size_t)V);
    assert_non_null(idx);
    for (int i = 0; i < V; i++)
      idx[i] = i;
    qsort_r(idx, (size_t)V, sizeof *idx, by_total_order, (void *)logits);
    int n = r->top_k > 0 && r->top_k < V ? r->top_k : V;
    float inv_t = 1.0f / r->temperature, mx = logits[idx[0]] * inv_t;
    double sum = 0, before = 0;
    for (int i = 0; i < n; i++)
      sum += expf(logits[idx[i]] * inv_t - mx);
    for (int i = 0; i < n; i++) {
      double d = fabs(before / sum - r->top_p);
      if (i > 0 && d < best) best = d;
      before += expf(logits[idx[i]] * inv_t - mx);
    }
    free(idx);
  }
  return best;
}

/* ---- the op against its twin ----------------------------------------------------------------- */

static void test_sample_matches_cpu_twin(void **state) {
  static const int vocabs[] = {1, 2, 5, 64, 255, 256, 257, 1003, 4097, 32000, 49152, 50257};
  static const int row_counts[] = {1, 37, 128};
  static const int ks[] = {0, 1, 5, -1 /* vocab */};
  static const float ps[] = {0.1f, 0.5f, 0.9f, 1.0f}, ts[] = {0.3f, 0.7f, 1.0f, 1.5f};
  const int max_rows = 128, max_v = 50257;
  size_t ws_bytes;
  CK(cn_cuda_sample_workspace(ctx, max_rows, max_v, &ws_bytes));
  void *ws, *d_logits, *d_u, *d_ids;
  CK(cn_cuda_malloc(ctx, &ws, ws_bytes));
  CK(cn_cuda_malloc(ctx, &d_logits, sizeof(float) * (size_t)max_rows * max_v));
  CK(cn_cuda_malloc(ctx, &d_u, sizeof(double) * max_rows));
  CK(cn_cuda_malloc(ctx, &d_ids, sizeof(int32_t) * max_rows));
  float *logits = malloc(sizeof *logits * (size_t)max_rows * max_v), *prob = malloc(sizeof *prob * max_v),
        *dist = malloc(sizeof *dist * max_v);
  int32_t *idx = malloc(sizeof *idx * max_v), ids[128];
  double u[128];
  assert_true(logits && prob && dist && idx);
  long compared = 0, boundary = 0, unexplained = 0, cases = 0;
  for (size_t vi = 0; vi < sizeof vocabs / sizeof *vocabs; vi++)
    for (size_t ri = 0; ri < sizeof row_counts / sizeof *row_counts; ri++)
      for (int rep = 0; rep < 3; rep++) {
        int V = vocabs[vi], rows = row_counts[ri], kind = (int)(cn_test_rand(&rng) % 3);
        int k = ks[cn_test_rand(&rng) % 4];
        cn_sample_rule r = {
            .temperature = ts[cn_test_rand(&rng) % 4], .top_k = k < 0 ? V : k, .top_p = ps[cn_test_rand(&rng) % 4]};
        if (rep == 2 && vi % 4 == 0) r.temperature = 0; /* the argmax path */
        fill_logits(logits, (size_t)rows * V, kind);
        for (int i = 0; i < rows; i++)
          u[i] = uniform();
        u[0] = 0, u[rows - 1] = rows > 1 ? 1 - 0x1.0p-53 : u[rows - 1]; /* the ends of [0, 1) */
        CK(cn_cuda_memcpy_h2d(ctx, d_logits, logits, sizeof(float) * (size_t)rows * V));
        CK(cn_cuda_memcpy_h2d(ctx, d_u, u, sizeof(double) * rows));
        CK(cn_cuda_memset(ctx, d_ids, 0xff, sizeof(int32_t) * rows));
        CK(cn_cuda_sample(ctx, d_ids, d_logits, rows, V, r.temperature, r.top_k, r.top_p, d_u, ws, ws_bytes));
        CK(cn_cuda_memcpy_d2h(ctx, ids, d_ids, sizeof(int32_t) * rows));
        cases++;
        for (int i = 0; i < rows; i++) {
          const float *l = logits + (size_t)i * V;
          int want = cn_cpu_sample(&r, l, V, u[i], idx, prob, dist);
          compared++;
          if (ids[i] < 0 || ids[i] >= V)
            fail_msg("V=%d rows=%d row %d: id %d not written or out of range", V, rows, i, ids[i]);
          if (ids[i] == want) continue;
          if (r.temperature == 0) fail_msg("V=%d row %d: argmax %d, cpu %d", V, i, ids[i], want);
          double dist_b = boundary_distance(&r, l, V, u[i], want, ids[i], dist);
          int ok = dist_b < BOUNDARY;
          printf("  V=%d rows=%d T=%g k=%d p=%g row %d u=%.17g: device %d, cpu %d, %s (distance %.3g)\n", V, rows,
                 r.temperature, r.top_k, r.top_p, i, u[i], ids[i], want, ok ? "boundary case" : "MISMATCH", dist_b);
          boundary += ok;
          unexplained += !ok;
        }
      }
  printf("sample vs twin: %ld cases, %ld rows, %ld boundary cases, %ld unexplained\n", cases, compared, boundary,
         unexplained);
  assert_int_equal(unexplained, 0);
  assert_true(boundary * 1000 <= compared); /* rounding explains a few, never a pattern */
  free(logits), free(prob), free(dist), free(idx);
  cn_cuda_free(ctx, ws), cn_cuda_free(ctx, d_logits), cn_cuda_free(ctx, d_u), cn_cuda_free(ctx, d_ids);
}

/* Pearson's chi-square of the device's draws (fresh u each) against the rule's probabilities,
 * bins with expectation < 5 pooled; fails above the 1e-4 upper quantile (Wilson-Hilferty). */
static void test_sample_distribution_chi_square(void **state) {
  const int V = 1000, rows = 128, launches = 160;
  struct {
    float T;
    int k;
    float p;
  } cases[] = {{0.8f, 50, 0.9f}, {1.5f, 0, 1.0f}, {0.5f, 0, 0.7f}};
  size_t ws_bytes;
  CK(cn_cuda_sample_workspace(ctx, rows, V, &ws_bytes));
  void *ws, *d_logits, *d_u, *d_ids;
  CK(cn_cuda_malloc(ctx, &ws, ws_bytes));
  CK(cn_cuda_malloc(ctx, &d_logits, sizeof(float) * (size_t)rows * V));
  CK(cn_cuda_malloc(ctx, &d_u, sizeof(double) * rows));
  CK(cn_cuda_malloc(ctx, &d_ids, sizeof(int32_t) * rows));
  float *row = malloc(sizeof *row * V), *all = malloc(sizeof *all * (size_t)rows * V),
        *probs = malloc(sizeof *probs * V), *prob = malloc(sizeof *prob * V);
  int32_t *idx = malloc(sizeof *idx * V), ids[128];
  long *count = calloc((size_t)V, sizeof *count);
  double u[128];
  for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
    cn_sample_rule r = {cases[c].T, cases[c].k, cases[c].p};
    for (int i = 0; i < V; i++)
      row[i] = 3 * cn_test_randf(&rng);
    for (int j = 0; j < rows; j++)
      memcpy(all + (size_t)j * V, row, sizeof *row * V);
    cn_cpu_sample_probs(&r, row, V, idx, prob, probs);
    CK(cn_cuda_memcpy_h2d(ctx, d_logits, all, sizeof(float) * (size_t)rows * V));
    memset(count, 0, sizeof *count * V);
    long n = 0;
    for (int l = 0; l < launches; l++) {
      for (int j = 0; j < rows; j++)
        u[j] = uniform();
      CK(cn_cuda_memcpy_h2d(ctx, d_u, u, sizeof(double) * rows));
      CK(cn_cuda_sample(ctx, d_ids, d_logits, rows, V, r.temperature, r.top_k, r.top_p, d_u, ws, ws_bytes));
      CK(cn_cuda_memcpy_d2h(ctx, ids, d_ids, sizeof(int32_t) * rows));
      for (int j = 0; j < rows; j++, n++) {
        assert_true(ids[j] >= 0 && ids[j] < V);
        if (probs[ids[j]] == 0) fail_msg("case %zu: drew token %d outside the kept set", c, ids[j]);
        count[ids[j]]++;
      }
    }
    double chi = 0, pool_e = 0, pool_o = 0;
    int bins = 0;
    for (int i = 0; i < V; i++) {
      if (probs[i] == 0) continue;
      double e = n * (double)probs[i];
      if (e < 5) {
        pool_e += e, pool_o += (double)count[i];
        continue;
      }
      chi += (count[i] - e) * (count[i] - e) / e;
      bins++;
    }
    if (pool_e > 0) chi += (pool_o - pool_e) * (pool_o - pool_e) / pool_e, bins++;
    double df = bins - 1, z = 3.719, crit = df * pow(1 - 2 / (9 * df) + z * sqrt(2 / (9 * df)), 3);
    printf("chi-square T=%g k=%d p=%g: %ld draws, %d bins, chi2 %.1f (1e-4 critical %.1f)\n", r.temperature, r.top_k,
           r.top_p, n, bins, chi, crit);
    assert_true(bins >= 2);
    assert_true(chi < crit);
  }
  free(row), free(all), free(probs), free(prob), free(idx), free(count);
  cn_cuda_free(ctx, ws), cn_cuda_free(ctx, d_logits), cn_cuda_free(ctx, d_u), cn_cuda_free(ctx, d_ids);
}

/* ---- whole generations --------------------------------------------------------------------- */

/* GQA 3:1, head_dim 64 (the tree-attention kernel's path), tied embeddings, a vocab that is not
 * a multiple of any tile: SmolLM2's kind, small. */
static const char *CONFIG =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 192, \"intermediate_size\": 512,"
    " \"num_hidden_layers\": 4, \"num_attention_heads\": 3, \"num_key_value_heads\": 1, \"vocab_size\": 2053,"
    " \"max_position_embeddings\": 512, \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0,"
    " \"tie_word_embeddings\": true}";
static char cfg_path[256];

#define N_NEW 48
static const int32_t PROMPT[] = {1, 2052, 17, 500, 3, 999, 0, 42, 42, 77, 256, 1000, 5, 1500, 8};
#define N_PROMPT (int)(sizeof PROMPT / sizeof PROMPT[0])

static canopy_model *load(int device, uint64_t seed) {
  canopy_model_params p = canopy_model_default_params();
  p.n_threads = 2;
  p.device = device;
  p.random_weights = cfg_path;
  p.random_seed = seed;
  p.max_context = 256;
  p.prefix_cache = 0; /* a replay must run the same forwards as the run it replays */
  canopy_model *m = NULL;
  CK(canopy_model_load(NULL, &p, &m));
  return m;
}

/* Generates up to N_NEW tokens after PROMPT through canopy_session_next; returns how many. */
static int generate(canopy_model *m, canopy_model *draft, const char *tree, const canopy_sampling_params *sp,
                    int32_t *out) {
  canopy_session_params p = canopy_session_default_params();
  p.sampling = *sp;
  p.max_tokens = N_NEW;
  p.stop_at_eos = 0;
  p.draft = draft;
  p.tree = tree;
  canopy_session *s = NULL;
  CK(canopy_session_create(m, &p, &s));
  CK(canopy_session_append(s, PROMPT, N_PROMPT));
  int n = 0, st;
  while ((st = canopy_session_next(s, &out[n])) == CANOPY_OK)
    n++;
  assert_int_equal(st, CANOPY_DONE);
  canopy_session_free(s);
  return n;
}

/* logits [n + 1][V]: the model's logits before each of tokens[0..n) and after the last, one
 * token per forward (the decode path's single-row batches, so they are the logits a target-only
 * session chose from). */
static void replay(canopy_model *m, const int32_t *tokens, int n, float *logits, int V) {
  canopy_session *s = NULL;
  CK(canopy_session_create(m, NULL, &s));
  CK(canopy_session_append(s, PROMPT, N_PROMPT));
  for (int i = 0; i <= n; i++) {
    const float *l;
    CK(canopy_session_logits(s, &l, NULL));
    memcpy(logits + (size_t)i * V, l, sizeof *l * V);
    if (i < n) CK(canopy_session_append(s, &tokens[i], 1));
  }
  canopy_session_free(s);
}

static int first_difference(const int32_t *a, int na, const int32_t *b, int nb) {
  int i = 0;
  while (i < na && i < nb && a[i] == b[i])
    i++;
  return i;
}

static double cdf_through(const float *dist, int last) {
  double c = 0;
  for (int i = 0; i <= last; i++)
    c += dist[i];
  return c;
}

static void test_sampled_generation_cuda_matches_cpu_rule(void **state) {
  struct {
    float T;
    int k;
    float p;
  } rules[] = {{0.7f, 40, 0.9f}, {1.2f, 0, 1.0f}, {0.3f, 0, 0.5f}, {1.0f, 5, 1.0f}};
  canopy_model *cpu = load(CANOPY_DEVICE_CPU, 7), *gpu = load(CANOPY_DEVICE_CUDA, 7);
  canopy_model_info info;
  canopy_model_get_info(gpu, &info);
  int V = info.vocab_size;
  float *lg = malloc(sizeof *lg * (size_t)(N_NEW + 1) * V), *lc = malloc(sizeof *lc * (size_t)(N_NEW + 1) * V);
  float *dist = malloc(sizeof *dist * V), *dist2 = malloc(sizeof *dist2 * V), *prob = malloc(sizeof *prob * V);
  int32_t *idx = malloc(sizeof *idx * V), g[N_NEW], c[N_NEW];
  int positions = 0, boundary = 0, near_ties = 0, same_runs = 0, runs = 0;
  for (size_t ri = 0; ri < sizeof rules / sizeof *rules; ri++)
    for (uint64_t seed = 1; seed <= 3; seed++) {
      canopy_sampling_params sp = {rules[ri].T, rules[ri].k, rules[ri].p, seed * 1000 + ri};
      cn_sample_rule r = {sp.temperature, sp.top_k, sp.top_p};
      int ng = generate(gpu, NULL, NULL, &sp, g), nc = generate(cpu, NULL, NULL, &sp, c);
      assert_int_equal(ng, N_NEW);
      assert_int_equal(nc, N_NEW);
      cn_rng rr;
      cn_rng_seed(&rr, sp.seed);
      double u[N_NEW];
      for (int i = 0; i < N_NEW; i++)
        u[i] = cn_rng_uniform(&rr);
      /* Every device draw is the twin's draw from the device's own logits. */
      replay(gpu, g, ng, lg, V);
      for (int i = 0; i < ng; i++, positions++) {
        int want = cn_cpu_sample(&r, lg + (size_t)i * V, V, u[i], idx, prob, dist);
        if (want == g[i]) continue;
        double d = boundary_distance(&r, lg + (size_t)i * V, V, u[i], want, g[i], dist);
        printf("  rule %zu seed %llu position %d: device drew %d, twin %d (distance %.3g)\n", ri,
               (unsigned long long)seed, i, g[i], want, d);
        if (d >= BOUNDARY) fail_msg("device draw at position %d is not the twin's", i);
        boundary++;
      }
      /* Against the CPU backend: equal until u falls between the two backends' CDFs. */
      runs++;
      int j = first_difference(g, ng, c, nc);
      if (j == ng) {
        same_runs++;
        continue;
      }
      replay(cpu, c, j, lc, V);
      cn_cpu_sample_probs(&r, lc + (size_t)j * V, V, idx, prob, dist);
      cn_cpu_sample_probs(&r, lg + (size_t)j * V, V, idx, prob, dist2);
      int lo = g[j] < c[j] ? g[j] : c[j];
      double fc = cdf_through(dist, lo), fg = cdf_through(dist2, lo);
      int ok = u[j] >= fmin(fc, fg) - BOUNDARY && u[j] <= fmax(fc, fg) + BOUNDARY;
      printf("  rule %zu seed %llu: cuda and cpu part at %d (cuda %d, cpu %d): u %.6f, CDF through %d cpu %.6f cuda "
             "%.6f: %s\n",
             ri, (unsigned long long)seed, j, g[j], c[j], u[j], lo, fc, fg, ok ? "near-tie" : "NOT A NEAR-TIE");
      assert_true(ok);
      near_ties++;
    }
  printf("sampled generation: %d device draws, %d at a boundary; %d of %d runs equal to the cpu backend's, %d part at "
         "a near-tie\n",
         positions, boundary, same_runs, runs, near_ties);
  free(lg), free(lc), free(dist), free(dist2), free(prob), free(idx);
  canopy_model_free(cpu);
  canopy_model_free(gpu);
}

/* Greedy speculation (verify batches of many rows) against target-only (one row per forward),
 * both on CUDA: bf16 GEMMs of different row counts and attention splits round differently, so a
 * difference is allowed only at a near-tie of the target-only logits, with the runner-up taken. */
static canopy_model *load_dir(const char *dir) {
  canopy_model_params p = canopy_model_default_params();
  p.device = CANOPY_DEVICE_CUDA;
  p.max_context = 256;
  p.prefix_cache = 0;
  canopy_model *m = NULL;
  CK(canopy_model_load(dir, &p, &m));
  return m;
}

/* Target-only and speculative greedy runs of one target, with a draft of the same weights (long
 * accepted paths, full trees) and one of other weights (mostly the root's bonus). */
static void spec_runs(canopy_model *target, canopy_model *const drafts[2], const char *label, int *runs, int *identical,
                      int *near_ties) {
  static const char *trees[] = {"chain:4", "dynamic:16", "dynamic:64", "static:4,2,2,1"};
  canopy_model_info info;
  canopy_model_get_info(target, &info);
  int V = info.vocab_size;
  float *lt = malloc(sizeof *lt * (size_t)(N_NEW + 1) * V);
  int32_t base[N_NEW], spec[N_NEW];
  canopy_sampling_params greedy = canopy_sampling_default_params();
  int nb = generate(target, NULL, NULL, &greedy, base);
  replay(target, base, nb, lt, V);
  for (size_t t = 0; t < sizeof trees / sizeof *trees; t++)
    for (int d = 0; d < 2; d++) {
      if (d == 1 && drafts[1] == drafts[0]) continue;
      int ns = generate(target, drafts[d], trees[t], &greedy, spec);
      (*runs)++;
      int j = first_difference(base, nb, spec, ns);
      if (j == nb && ns == nb) {
        (*identical)++;
        continue;
      }
      assert_true(j < nb && j < ns);
      const float *l = lt + (size_t)j * V;
      int top = cn_cpu_argmax(l, V), second = -1;
      for (int i = 0; i < V; i++)
        if (i != top && (second < 0 || l[i] > l[second])) second = i;
      double gap = l[top] - l[second], bound = ldexp(fabs(l[top]), -7);
      int ok = top == base[j] && spec[j] == second && gap <= bound;
      printf("  %s, %s, draft %d: differs at %d: target-only %d, spec %d; top-2 gap %.3g (bound %.3g): %s\n", label,
             trees[t], d, j, base[j], spec[j], gap, bound, ok ? "near-tie" : "NOT A NEAR-TIE");
      assert_true(ok);
      (*near_ties)++;
    }
  free(lt);
}

static void greedy_speculation_vs_target_only(int batch_invariant) {
  setenv("CANOPY_CUDA_BATCH_INVARIANT", batch_invariant ? "1" : "0", 1); /* read when a model is loaded */
  int runs = 0, identical = 0, near_ties = 0;
  canopy_model *target = load(CANOPY_DEVICE_CUDA, 11);
  canopy_model *drafts[2] = {load(CANOPY_DEVICE_CUDA, 11), load(CANOPY_DEVICE_CUDA, 12)};
  spec_runs(target, drafts, "small random", &runs, &identical, &near_ties);
  canopy_model_free(drafts[0]);
  canopy_model_free(drafts[1]);
  canopy_model_free(target);
  /* SmolLM2-135M's shape (tools/device_test.sh writes it): its own weights as the draft, and the
   * small random model's weights are of another vocab, so the second draft is the same again. */
  const char *big = getenv("CANOPY_TEST_BIG_MODEL");
  if (big && *big) {
    canopy_model *bt = load_dir(big), *bd = load_dir(big);
    canopy_model *bds[2] = {bd, bd};
    spec_runs(bt, bds, "SmolLM2 shape", &runs, &identical, &near_ties);
    canopy_model_free(bd);
    canopy_model_free(bt);
  }
  printf("greedy speculation on cuda%s: %d of %d runs identical to target-only, %d differ at a near-tie\n",
         batch_invariant ? " (batch-invariant GEMMs, one attention split)" : "", identical, runs, near_ties);
  unsetenv("CANOPY_CUDA_BATCH_INVARIANT");
}

static void test_greedy_speculation_equals_target_only_on_cuda(void **state) { greedy_speculation_vs_target_only(0); }

static void test_greedy_speculation_batch_invariant_mode(void **state) { greedy_speculation_vs_target_only(1); }

/* With batch-invariant GEMMs a row's product is bit-identical whether it is computed alone or
 * among up to 64 rows; without, the rows that differ are counted (cuBLAS's choice by row count). */
static void test_batch_invariant_matmul_rows_are_bit_identical(void **state) {
  const int in = 576, out = 1536, n = 64;
  float *x = malloc(sizeof *x * (size_t)n * in), *yb = malloc(sizeof *yb * (size_t)n * out),
        *y1 = malloc(sizeof *y1 * (size_t)out);
  uint16_t *w = malloc(sizeof *w * (size_t)in * out);
  for (size_t i = 0; i < (size_t)n * in; i++)
    x[i] = cn_test_randf(&rng);
  for (size_t i = 0; i < (size_t)in * out; i++) {
    float f = 0.05f * cn_test_randf(&rng);
    uint32_t u;
    memcpy(&u, &f, 4);
    w[i] = (uint16_t)(u >> 16);
  }
  void *dx, *dy, *dw;
  CK(cn_cuda_malloc(ctx, &dx, sizeof(float) * (size_t)n * in));
  CK(cn_cuda_malloc(ctx, &dy, sizeof(float) * (size_t)n * out));
  CK(cn_cuda_malloc(ctx, &dw, sizeof(uint16_t) * (size_t)in * out));
  CK(cn_cuda_memcpy_h2d(ctx, dx, x, sizeof(float) * (size_t)n * in));
  CK(cn_cuda_memcpy_h2d(ctx, dw, w, sizeof(uint16_t) * (size_t)in * out));
  for (int mode = 0; mode < 2; mode++) {
    CK(cn_cuda_set_batch_invariant(ctx, mode));
    int differ = 0;
    for (int rows = 2; rows <= n; rows *= 2) {
      CK(cn_cuda_matmul(ctx, dy, CN_CUDA_F32, dx, CN_CUDA_F32, dw, NULL, rows, in, out));
      CK(cn_cuda_memcpy_d2h(ctx, yb, dy, sizeof(float) * (size_t)rows * out));
      for (int r = 0; r < rows; r += 7) {
        CK(cn_cuda_matmul(ctx, dy, CN_CUDA_F32, (const float *)dx + (size_t)r * in, CN_CUDA_F32, dw, NULL, 1, in, out));
        CK(cn_cuda_memcpy_d2h(ctx, y1, dy, sizeof(float) * (size_t)out));
        differ += memcmp(y1, yb + (size_t)r * out, sizeof *y1 * (size_t)out) != 0;
      }
    }
    printf("matmul %dx%d, rows alone vs in batches of 2..64%s: %d rows differ\n", in, out,
           mode ? " (batch-invariant)" : "", differ);
    if (mode) assert_int_equal(differ, 0);
  }
  CK(cn_cuda_set_batch_invariant(ctx, 0));
  free(x), free(yb), free(y1), free(w);
  cn_cuda_free(ctx, dx), cn_cuda_free(ctx, dy), cn_cuda_free(ctx, dw);
}

static int setup(void **state) {
  snprintf(cfg_path, sizeof cfg_path, "/tmp/canopy_test_cuda_sample_%d.json", (int)getpid());
  FILE *f = fopen(cfg_path, "w");
  if (!f) return -1;
  fputs(CONFIG, f);
  fclose(f);
  return cn_cuda_ctx_create(0, &ctx);
}

static int teardown(void **state) {
  cn_cuda_ctx_free(ctx);
  unlink(cfg_path);
  return 0;
}

int main(void) {
  if (cn_cuda_device_count() == 0) {
    printf("test_cuda_sample: no CUDA device visible, skipping\n");
    return CN_TEST_SKIP;
  }
  rng = cn_test_seed("test_cuda_sample");
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_sample_matches_cpu_twin),
      cmocka_unit_test(test_sample_distribution_chi_square),
      cmocka_unit_test(test_sampled_generation_cuda_matches_cpu_rule),
      cmocka_unit_test(test_batch_invariant_matmul_rows_are_bit_identical),
      cmocka_unit_test(test_greedy_speculation_equals_target_only_on_cuda),
      cmocka_unit_test(test_greedy_speculation_batch_invariant_mode),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}

#else /* !CANOPY_HAVE_CUDA */

int main(void) {
  printf("test_cuda_sample: canopy was built without CUDA, skipping\n");
  return CN_TEST_SKIP;
}

#endif
