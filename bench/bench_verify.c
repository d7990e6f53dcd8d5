/* The cost of verifying a token tree of n nodes in one target forward, relative to one decode
 * step, at several context lengths: the reason tree speculation pays on any hardware.
 * Every timed forward writes its K/V past the committed length and is then dropped, so each
 * repetition sees the same context. Trees are random (each node's parent drawn from earlier
 * nodes); verification asks for logits at every node, a decode step at its one token. Decode
 * steps and verifications alternate and the ratio is the median of the per-pair ratios: on a
 * machine shared with other work the load moves within seconds, and a ratio of two medians
 * taken seconds apart moved with it.
 * usage: bench_verify [-m DIR] [--threads N] [--reps N] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/bench_util.h"
#include "cli/cpu_tune.h"
#include "draft/tree.h"
#include "model/forward.h"

typedef struct timed {
  cn_batch b;
  cn_seq_batch sb;
  uint64_t mask[CN_TREE_MAX_NODES * CN_TREE_MASK_WORDS];
  int32_t pos[CN_TREE_MAX_NODES], rows[CN_TREE_MAX_NODES];
} timed;

/* The batch of one forward over tree t; every node's logits, or the last node's. */
static void setup(timed *f, cn_kv_seq *kv, const cn_tree *t, int all_logits) {
  int n = t->n, ctx = cn_kv_seq_len(kv);
  cn_tree_mask(t, f->mask, (n + 63) / 64);
  for (int i = 0; i < n; i++) f->pos[i] = ctx + t->depth[i], f->rows[i] = all_logits ? i : n - 1;
  f->sb = (cn_seq_batch){.kv = kv, .first = 0, .n = n, .tree_mask = n > 1 ? f->mask : NULL};
  f->b = (cn_batch){.n_tokens = n, .tokens = t->token, .pos = f->pos, .n_seqs = 1, .seqs = &f->sb,
                    .n_logits = all_logits ? n : 1, .logit_rows = f->rows};
}

static double run_once(canopy_model *m, timed *f, float *logits) {
  int ctx = cn_kv_seq_len(f->sb.kv);
  double t0 = bench_now_s();
  if (cn_forward(m, &f->b, logits)) {
    fprintf(stderr, "bench_verify: %s\n", canopy_last_error());
    exit(1);
  }
  double dt = bench_now_s() - t0;
  cn_kv_seq_truncate(f->sb.kv, ctx);
  return dt;
}

/* Medians of reps alternating (decode, verify) pairs after one warm-up pair: decode ms,
 * verify ms, and the median of the per-pair ratios. */
static void time_pair(canopy_model *m, cn_kv_seq *kv, const cn_tree *t, float *logits, int reps, double out[3]) {
  timed dec, ver;
  cn_tree one;
  cn_tree_reset(&one, t->token[0]);
  setup(&dec, kv, &one, 0);
  setup(&ver, kv, t, 1);
  double *v = malloc(sizeof *v * 3 * (size_t)reps);
  for (int r = -1; r < reps; r++) {
    double d = run_once(m, &dec, logits), x = run_once(m, &ver, logits);
    if (r >= 0) v[r] = d, v[reps + r] = x, v[2 * reps + r] = x / d;
  }
  for (int k = 0; k < 3; k++) out[k] = bench_median(v + (size_t)k * reps, reps);
  free(v);
}

int main(int argc, char **argv) {
  cli_tune_openblas(argv);
  const char *dir = "models/SmolLM2-135M-Instruct";
  int threads = 0, reps = 7;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "-m") && i + 1 < argc) dir = argv[++i];
    else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
    else {
      fprintf(stderr, "usage: bench_verify [-m DIR] [--threads N] [--reps N]\n");
      return 2;
    }
  }
  canopy_model_params mp = canopy_model_default_params();
  mp.n_threads = threads;
  mp.prefix_cache = 0;
  canopy_model *m;
  if (canopy_model_load(dir, &mp, &m)) {
    fprintf(stderr, "bench_verify: %s\n", canopy_last_error());
    return 1;
  }
  int V = m->cfg.vocab_size, sizes[] = {1, 4, 5, 8, 16, 32, 64}, ctxs[] = {128, 1024};
  float *logits = malloc(sizeof *logits * (size_t)V * 64);
  uint32_t x = 777;
  printf("%-8s %6s %12s %12s %10s\n", "context", "nodes", "forward ms", "decode ms", "ratio");
  for (size_t c = 0; c < sizeof ctxs / sizeof ctxs[0]; c++) {
    cn_kv_seq *kv;
    cn_kv_seq_create(m->kv, &kv);
    int32_t *prompt = malloc(sizeof *prompt * (size_t)ctxs[c]);
    for (int i = 0; i < ctxs[c]; i++) prompt[i] = (int32_t)(100 + (x = x * 1664525u + 1013904223u) % 20000u);
    int32_t rows0 = 0;
    for (int at = 0; at < ctxs[c]; at += m->max_batch) { /* prefill the context */
      int n = ctxs[c] - at < m->max_batch ? ctxs[c] - at : m->max_batch;
      int32_t pos[512];
      for (int i = 0; i < n; i++) pos[i] = at + i;
      cn_seq_batch sb = {.kv = kv, .first = 0, .n = n};
      cn_batch b = {.n_tokens = n, .tokens = prompt + at, .pos = pos, .n_seqs = 1, .seqs = &sb, .n_logits = 1,
                    .logit_rows = &rows0};
      cn_forward(m, &b, logits);
      cn_kv_seq_commit(kv, prompt + at, n);
    }
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
      cn_tree t;
      cn_tree_reset(&t, 42);
      for (int i = 1; i < sizes[s]; i++) {
        /* Attach to a random earlier node; add in parent order so siblings stay consecutive. */
        int p = (int)((x = x * 1664525u + 1013904223u) % (uint32_t)i);
        while (p < t.n - 1 && t.first_child[p] >= 0 && t.first_child[p] + t.n_children[p] != t.n) p++;
        if (cn_tree_add(&t, p, (int32_t)(200 + i), -1.0f) < 0) break;
      }
      double r[3];
      time_pair(m, kv, &t, logits, reps, r);
      printf("%-8d %6d %12.2f %12.2f %10.2f\n", ctxs[c], t.n, r[1] * 1e3, r[0] * 1e3, r[2]);
      fflush(stdout);
    }
    free(prompt);
    cn_kv_seq_free(kv);
  }
  free(logits);
  canopy_model_free(m);
  return 0;
}
