/* One decode step and one tree-verification step of a model of any shape (random weights from a
 * config.json, canopy_model_params.random_weights) at context length L on CUDA, against the
 * memory-bandwidth floor: a decode step must read every weight it uses once (all but the
 * embedding table, of which it gathers one row) and the context's K/V once, so
 *   floor = (weight bytes read + K/V bytes) / copy bandwidth,
 * the bandwidth measured in the same run by a large device-to-device copy (bytes read plus bytes
 * written, METHOD.md). Verification of n tree nodes (a random tree) is reported relative to the
 * decode step, with the logits of every node brought to the host (what sampled verification
 * needs) and with only every node's top token (the argmax on the device: greedy verification).
 *
 * The context is made by reserving and committing L slots whose K/V are filled with random values
 * (never zeros: METHOD.md), not by running L tokens of prefill. Every timed forward writes its own
 * K/V past L and is dropped, so each repetition sees the same context. Times are medians over
 * --reps forwards, measured with cudaEvents on the backend's stream (the forward starts and ends
 * synchronised, so this is the step's whole latency, launches included).
 *
 * With --unfused, the decode and verification steps are timed a second time with the backend's
 * fused ops (norm_matmul, matmul_add, ffn, qkv_rope, qkv_rope_kv, norm_qkv_rope_kv) switched off,
 * side by side in the same run. With --compare-fusion, also with the few-row GEMM fusions off
 * (cn_cuda_set_gemv_fusion, and cn_cuda_set_gemv_swiglu_rows past them) and without matmul_add,
 * qkv_rope_kv and norm_qkv_rope_kv: the kernels a step ran before those fusions, side by side.
 * With --compare-qkv, also without norm_qkv_rope_kv only (the q/k/v projection, then RoPE and the
 * cache write in a kernel of their own). With --compare-gemv, also with the few-row GEMM on CUDA
 * cores at every row count and fusions up to 4 rows (the settings before the tensor-core form),
 * and on tensor cores at every row count (cn_cuda_set_gemv_mma_rows).
 * With --compare-tune, also with cuBLAS's products tuned per shape by measurement
 * (cn_cuda_set_gemm_tune; the warm-up's eager forward tunes each new shape).
 * Forwards replay CUDA graphs (the default: the first warm-up runs the ops, the second captures);
 * --no-graphs launches every op instead, and --compare-graphs times each step both ways, one
 * right after the other, and adds the no-graph time and the ratio.
 *
 * usage: bench_step --config FILE.json [--config ...] [--ctx L] [--nodes 16,64,128] [--reps N] [--unfused]
 *                   [--compare-fusion] [--compare-qkv] [--compare-gemv] [--compare-tune]
 *                   [--no-graphs | --compare-graphs] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_util.h"
#include "draft/tree.h"
#include "kernels/random_init.h"
#include "model/forward.h"

#ifndef CANOPY_HAVE_CUDA
int main(void) {
  fprintf(stderr, "bench_step: this build of canopy has no CUDA support\n");
  return 1;
}
#else
#include "bench/bench_cuda.h"
#include "kernels/cuda/cuda_ops.h"

#define MAX_CONFIGS 4
#define MAX_NODES 8

static void die(const char *what) {
  fprintf(stderr, "bench_step: %s: %s\n", what, canopy_last_error());
  exit(1);
}

typedef struct step_time {
  double event_ms, wall_ms;
} step_time;

enum { LAST_ROW, ALL_LOGITS, TOP_IDS };

/* 0: graphs as the model was loaded (on unless --no-graphs); 1: every step also without. */
static int compare_graphs;

/* Median time of a forward over tree t at the sequence's current length: the logits of the last
 * node, of every node, or every node's top token (argmax on the device, ids to the host). */
static step_time time_forward(canopy_model *m, cn_cuda_ctx *cu, cn_cuda_timer *tm, cn_kv_seq *kv, const cn_tree *t,
                              int mode, float *logits, int reps) {
  int n = t->n, ctx = cn_kv_seq_len(kv), words = (n + 63) / 64;
  static uint64_t mask[CN_TREE_MAX_NODES * CN_TREE_MASK_WORDS];
  int32_t pos[CN_TREE_MAX_NODES], rows[CN_TREE_MAX_NODES];
  cn_tree_mask(t, mask, words);
  for (int i = 0; i < n; i++)
    pos[i] = ctx + t->depth[i], rows[i] = i;
  cn_seq_batch sb = {.kv = kv, .first = 0, .n = n, .tree_mask = n > 1 ? mask : NULL};
  int last = n - 1;
  int32_t top[CN_TREE_MAX_NODES];
  cn_batch b = {.n_tokens = n, .tokens = t->token, .pos = pos, .n_seqs = 1, .seqs = &sb,
                .n_logits = mode == LAST_ROW ? 1 : n, .logit_rows = mode == LAST_ROW ? &last : rows,
                .top = mode == TOP_IDS ? top : NULL};
  double *ev = malloc(sizeof *ev * (size_t)reps), *wall = malloc(sizeof *wall * (size_t)reps);
  for (int r = -2; r < reps; r++) { /* two warm-ups */
    float ms = 0;
    double t0 = bench_now_s();
    if (cn_cuda_timer_start(tm) || cn_forward(m, &b, logits) || cn_cuda_timer_stop(tm, &ms)) die("forward");
    double t1 = bench_now_s();
    if (r >= 0) ev[r] = ms, wall[r] = 1e3 * (t1 - t0);
    cn_kv_seq_truncate(kv, ctx);
  }
  step_time st = {bench_median(ev, reps), bench_median(wall, reps)};
  free(ev);
  free(wall);
  return st;
}

/* A random tree of n nodes (each node's parent drawn from the earlier ones, siblings kept
 * consecutive), tokens below the vocabulary. */
static void random_tree(cn_tree *t, int n, int vocab, uint32_t *x) {
  cn_tree_reset(t, 42 % vocab);
  for (int i = 1; i < n; i++) {
    int p = (int)((*x = *x * 1664525u + 1013904223u) % (uint32_t)i);
    while (p < t->n - 1 && t->first_child[p] >= 0 && t->first_child[p] + t->n_children[p] != t->n)
      p++;
    if (cn_tree_add(t, p, (int32_t)((200u + *x) % (uint32_t)vocab), -1.0f) < 0) break;
  }
}

/* The rows of one table: decode, then verification of each tree size (all logits, one row). */
/* The forward's time, and with --compare-graphs its time without graphs (no_graph_ms, else 0). */
static step_time time_both(canopy_model *m, cn_cuda_ctx *cu, cn_cuda_timer *tm, cn_kv_seq *kv, const cn_tree *t,
                           int mode, float *logits, int reps, double *no_graph_ms) {
  step_time st = time_forward(m, cu, tm, kv, t, mode, logits, reps);
  *no_graph_ms = 0;
  if (compare_graphs) {
    cn_backend_cuda_set_graphs(m->be, m->be_ctx, 0);
    *no_graph_ms = time_forward(m, cu, tm, kv, t, mode, logits, reps).event_ms;
    cn_backend_cuda_set_graphs(m->be, m->be_ctx, 64);
  }
  return st;
}

static void print_compare(double ms, double no_graph_ms) {
  if (compare_graphs) printf(" %11.3f %8.2fx", no_graph_ms, no_graph_ms / ms);
  printf("\n");
}

static void bench_steps(canopy_model *m, cn_cuda_ctx *cu, cn_cuda_timer *tm, cn_kv_seq *kv, const int *nodes,
                        int n_nodes, int reps, double floor_ms, const char *tag) {
  const cn_config *c = &m->cfg;
  float *logits = malloc(sizeof *logits * (size_t)c->vocab_size * CN_TREE_MAX_NODES);
  uint32_t x = 777; /* the same trees for every tag */
  cn_tree one;
  cn_tree_reset(&one, 42 % c->vocab_size);
  double ng;
  step_time dec = time_both(m, cu, tm, kv, &one, LAST_ROW, logits, reps, &ng);
  char name[64];
  snprintf(name, sizeof name, "decode%s", tag);
  printf("%-30s %6d %11.3f %11.3f %9.2f %10.1f%%", name, 1, dec.event_ms, dec.wall_ms, 1.0,
         100.0 * floor_ms / dec.event_ms);
  print_compare(dec.event_ms, ng);
  for (int k = 0; k < n_nodes; k++) {
    cn_tree t;
    random_tree(&t, nodes[k], c->vocab_size, &x);
    const int modes[] = {ALL_LOGITS, TOP_IDS, LAST_ROW};
    for (int i = 0; i < 3; i++) {
      int mode = modes[i];
      step_time v = time_both(m, cu, tm, kv, &t, mode, logits, reps, &ng);
      snprintf(name, sizeof name, "verify, %s%s",
               mode == ALL_LOGITS ? "all logits" : mode == TOP_IDS ? "top ids" : "1 logit row", tag);
      printf("%-30s %6d %11.3f %11.3f %9.2f %11s", name, t.n, v.event_ms, v.wall_ms, v.event_ms / dec.event_ms, "");
      print_compare(v.event_ms, ng);
    }
  }
  fflush(stdout);
  free(logits);
}

enum { UNFUSED = 1, BEFORE_FUSION = 2, NO_QKV_FUSION = 4, CUDA_CORES = 8, TUNED = 16 };

/* The few-row GEMM's settings the comparisons change, read and set as one, so that each
 * comparison restores all of them. */
typedef struct gemv_knobs {
  int mma_rows, fusion_rows, swiglu_rows;
} gemv_knobs;

static gemv_knobs gemv_get(const cn_cuda_ctx *cu) {
  return (gemv_knobs){cn_cuda_gemv_mma_rows(cu), cn_cuda_gemv_fusion(cu), cn_cuda_gemv_swiglu_rows(cu)};
}

static void gemv_put(cn_cuda_ctx *cu, gemv_knobs k) {
  if (cn_cuda_set_gemv_mma_rows(cu, k.mma_rows) || cn_cuda_set_gemv_fusion(cu, k.fusion_rows) ||
      cn_cuda_set_gemv_swiglu_rows(cu, k.swiglu_rows))
    die("gemv settings");
}

/* The steps again through a copy of the model's backend table with fused ops taken out (and the
 * few-row GEMM fusions off for BEFORE_FUSION); graphs are dropped before and after, since they
 * were captured with the other ops. */
static void bench_variant(canopy_model *m, cn_cuda_ctx *cu, cn_cuda_timer *tm, cn_kv_seq *kv, const int *nodes,
                          int n_nodes, int reps, double floor_ms, int variant, int no_graphs) {
  cn_backend plain = *m->be;
  const cn_backend *fused = m->be;
  plain.norm_qkv_rope_kv = NULL;
  if (variant != NO_QKV_FUSION) plain.matmul_add = NULL, plain.qkv_rope_kv = NULL;
  if (variant == UNFUSED) plain.norm_matmul = NULL, plain.ffn = NULL, plain.qkv_rope = NULL;
  const gemv_knobs saved = gemv_get(cu);
  /* Before the fusions: no few-row GEMM takes in an op, the SwiGLU epilogue past the limit included. */
  if (variant == BEFORE_FUSION) gemv_put(cu, (gemv_knobs){saved.mma_rows, 0, 0});
  m->be = &plain;
  cn_backend_cuda_set_graphs(m->be, m->be_ctx, no_graphs ? 0 : 64);
  bench_steps(m, cu, tm, kv, nodes, n_nodes, reps, floor_ms,
              variant == UNFUSED         ? " (unfused)"
              : variant == NO_QKV_FUSION ? " (qkv unfused)"
                                         : " (before fusion)");
  m->be = fused;
  gemv_put(cu, saved);
  cn_backend_cuda_set_graphs(m->be, m->be_ctx, no_graphs ? 0 : 64);
}

static void bench_config(const char *path, int L, const int *nodes, int n_nodes, int reps, double bw, int variants,
                         int no_graphs) {
  canopy_model_params mp = canopy_model_default_params();
  mp.device = CANOPY_DEVICE_CUDA;
  mp.random_weights = path;
  mp.prefix_cache = 0;
  mp.max_context = L + 256;
  mp.kv_blocks = (L + 256) / 16 + 4;
  if (no_graphs) mp.cuda_graphs = 0;
  canopy_model *m;
  double t0 = bench_now_s();
  if (canopy_model_load(NULL, &mp, &m)) die(path);
  cn_cuda_ctx *cu = cn_backend_cuda_ctx(m->be, m->be_ctx);
  cn_cuda_timer *tm;
  if (!cu || cn_cuda_sync(cu) || cn_cuda_timer_create(cu, &tm)) die("timer");
  double load_s = bench_now_s() - t0; /* the initialisation kernels included */
  const cn_config *c = &m->cfg;

  /* The context: L committed slots of random K/V (the whole pool, so any block the sequence
   * gets holds data). */
  const cn_kv_layout *lay = cn_kv_pool_layout(m->kv);
  size_t pool_elems = (size_t)lay->n_blocks * lay->n_layers * 2 * lay->block_size * lay->n_kv_heads * lay->head_dim;
  if (m->be->random(m->be_ctx, cn_kv_pool_data(m->kv), 0, pool_elems, cn_random_stream(99, 0),
                    cn_random_scale(1.0f), 0.0f))
    die("filling the KV pool");
  cn_kv_seq *kv;
  if (cn_kv_seq_create(m->kv, &kv) || cn_kv_seq_reserve(kv, L)) die("context");
  int32_t *ctx_tokens = calloc((size_t)L, sizeof *ctx_tokens);
  cn_kv_seq_commit(kv, ctx_tokens, L);
  free(ctx_tokens);

  size_t esz = m->be->weight_elem_bytes, emb = (size_t)c->vocab_size * c->hidden_size * esz;
  double weight_read = (double)m->weight_bytes - (c->tie_word_embeddings ? 0.0 : (double)emb);
  double kv_read = (double)L * c->n_layers * 2.0 * c->n_kv_heads * c->head_dim * (double)m->be->kv_storage->elem_bytes;
  double floor_ms = 1e3 * (weight_read + kv_read) / bw;

  printf("\n%s: %d layers, hidden %d, %d q / %d kv heads x %d, FFN %d, vocab %d; %.2f GB of bf16 weights "
         "(initialised in %.2f s)\n",
         path, c->n_layers, c->hidden_size, c->n_heads, c->n_kv_heads, c->head_dim, c->intermediate_size,
         c->vocab_size, m->weight_bytes / 1e9, load_s);
  printf("context L = %d: decode reads %.3f GB of weights + %.3f GB of K/V; floor at %.0f GB/s = %.3f ms\n", L,
         weight_read / 1e9, kv_read / 1e9, bw / 1e9, floor_ms);
  printf("%-30s %6s %11s %11s %9s %11s", "step", "nodes", "event ms", "wall ms", "x decode", "% of floor");
  if (compare_graphs) printf(" %11s %9s", "no-graph ms", "speedup");
  printf("\n");
  bench_steps(m, cu, tm, kv, nodes, n_nodes, reps, floor_ms, "");
  if (variants & BEFORE_FUSION) bench_variant(m, cu, tm, kv, nodes, n_nodes, reps, floor_ms, BEFORE_FUSION, no_graphs);
  if (variants & NO_QKV_FUSION) bench_variant(m, cu, tm, kv, nodes, n_nodes, reps, floor_ms, NO_QKV_FUSION, no_graphs);
  if (variants & UNFUSED) bench_variant(m, cu, tm, kv, nodes, n_nodes, reps, floor_ms, UNFUSED, no_graphs);
  if (variants & CUDA_CORES) {
    /* The previous main's few-row GEMM (CUDA cores at every row count: 9 is past its 8 rows;
     * fusions up to 4 rows, no SwiGLU epilogue past them), then tensor cores at every row count. */
    const gemv_knobs saved = gemv_get(cu);
    const struct { gemv_knobs k; const char *label; } alt[] = {
        {{9, 4, 4}, " (gemv cuda cores)"}, {{1, saved.fusion_rows, saved.swiglu_rows}, " (gemv tensor cores)"}};
    for (int i = 0; i < 2; i++) {
      gemv_put(cu, alt[i].k);
      cn_backend_cuda_set_graphs(m->be, m->be_ctx, no_graphs ? 0 : 64); /* captured with the other kernels */
      bench_steps(m, cu, tm, kv, nodes, n_nodes, reps, floor_ms, alt[i].label);
    }
    gemv_put(cu, saved);
    cn_backend_cuda_set_graphs(m->be, m->be_ctx, no_graphs ? 0 : 64);
  }
  if (variants & TUNED) {
    if (cn_cuda_set_gemm_tune(cu, 1)) die("gemm tune");
    cn_backend_cuda_set_graphs(m->be, m->be_ctx, no_graphs ? 0 : 64);
    bench_steps(m, cu, tm, kv, nodes, n_nodes, reps, floor_ms, " (tuned products)");
    if (cn_cuda_set_gemm_tune(cu, 0)) die("gemm tune");
    cn_backend_cuda_set_graphs(m->be, m->be_ctx, no_graphs ? 0 : 64);
  }
  cn_kv_seq_free(kv);
  cn_cuda_timer_free(tm);
  canopy_model_free(m);
}

static int parse_list(const char *s, int *out, int cap) {
  int n = 0;
  for (const char *p = s; *p && n < cap;) {
    char *end;
    long v = strtol(p, &end, 10);
    if (end == p || v < 1 || v > CN_TREE_MAX_NODES) return -1;
    out[n++] = (int)v;
    p = *end == ',' ? end + 1 : end;
    if (*end && *end != ',') return -1;
  }
  return n;
}

int main(int argc, char **argv) {
  const char *configs[MAX_CONFIGS];
  int n_configs = 0, L = 4096, reps = 20, nodes[MAX_NODES] = {16, 64, 128}, n_nodes = 3, variants = 0,
      no_graphs = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--config") && i + 1 < argc && n_configs < MAX_CONFIGS) configs[n_configs++] = argv[++i];
    else if (!strcmp(argv[i], "--ctx") && i + 1 < argc) L = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--nodes") && i + 1 < argc) n_nodes = parse_list(argv[++i], nodes, MAX_NODES);
    else if (!strcmp(argv[i], "--unfused")) variants |= UNFUSED;
    else if (!strcmp(argv[i], "--compare-fusion")) variants |= BEFORE_FUSION;
    else if (!strcmp(argv[i], "--compare-qkv")) variants |= NO_QKV_FUSION;
    else if (!strcmp(argv[i], "--compare-gemv")) variants |= CUDA_CORES;
    else if (!strcmp(argv[i], "--compare-tune")) variants |= TUNED;
    else if (!strcmp(argv[i], "--no-graphs")) no_graphs = 1;
    else if (!strcmp(argv[i], "--compare-graphs")) compare_graphs = 1;
    else n_configs = -1;
    if (n_configs < 0 || n_nodes < 0 || L < 1 || reps < 1) {
      fprintf(stderr, "usage: bench_step --config FILE.json [--config ...] [--ctx L] [--nodes 16,64,128] "
                      "[--reps N] [--unfused] [--compare-fusion] [--compare-qkv] [--compare-gemv] [--compare-tune] "
                      "[--no-graphs | --compare-graphs]\n");
      return 2;
    }
  }
  if (!n_configs) {
    fprintf(stderr, "bench_step: give at least one --config (e.g. bench/configs/llama3-8b.json)\n");
    return 2;
  }
  if (!cn_cuda_device_count()) {
    fprintf(stderr, "bench_step: no CUDA device visible\n");
    return 1;
  }
  cn_cuda_ctx *cu;
  cn_cuda_timer *tm;
  if (cn_cuda_ctx_create(0, &cu) || cn_cuda_timer_create(cu, &tm)) die("cuda context");
  double bw = bench_cuda_copy_bandwidth(cu, tm, 10);
  if (bw <= 0) die("copy bandwidth");
  cn_cuda_timer_free(tm);
  cn_cuda_ctx_free(cu);
  printf("device-to-device copy bandwidth (1 GiB, read + write, median of 10): %.0f GB/s\n", bw / 1e9);
  for (int i = 0; i < n_configs; i++)
    bench_config(configs[i], L, nodes, n_nodes, reps, bw, variants, no_graphs);
  return 0;
}
#endif
