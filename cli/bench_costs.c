/* canopy bench costs: the forward times a speculative step is made of, on the device the models
 * run on, for canopy tree-opt --costs (cli/tree_cost.h): the target over n tree nodes with greedy
 * verification's output (each node's top id; n = 1 is a decode step) and the draft over n rows
 * with a draft level's (each row's top-k ids), both after a context of L tokens. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "canopy.h"
#include "cache/kv_cache.h"
#include "cli/cli.h"
#include "cli/tree_cost.h"
#include "common/error.h"
#include "draft/tree.h"
#include "model/forward.h"
#include "model/model.h"

static const char *usage =
    "usage: canopy bench costs -m TARGET -d DRAFT [options]\n"
    "\n"
    "Times the forwards a speculative step is made of, after a context of L tokens (the median of\n"
    "R repetitions, wall clock, the forward's result on the host): the target over n tree nodes\n"
    "returning each node's top id (greedy verification; n = 1 is a decode step), and the draft\n"
    "over n rows returning each row's top-k ids (a draft level; its catch-up forward is the same\n"
    "size as the tokens it feeds). Prints a table and writes the times as JSON for\n"
    "`canopy tree-opt --costs`, which picks the tree that is fastest on this machine.\n"
    "\n"
    "  -m, --model DIR       target model folder\n"
    "  -d, --draft DIR       draft model folder\n"
    "      --draft-layers N  load only the draft's first N layers\n"
    "      --ctx L           context length before every timed forward (default 256)\n"
    "      --nodes LIST      target forward sizes (default 1,2,3,4,5,6,8,12,16,24,32,48,64)\n"
    "      --draft-nodes LIST  draft forward sizes (default 1,2,3,4,5,6,8,12,16)\n"
    "      --top-k K         ids a draft row returns (default 8)\n"
    "      --reps R          timed repetitions of each forward (default 10, after 2 warm-ups)\n"
    "      --threads N       CPU threads (default: all cores)\n"
    "      --device D        cpu (default) or cuda, for target and draft\n"
    "      --no-graphs       cuda: launch every op of every forward (no CUDA graphs)\n"
    "  -o, --out FILE        write the JSON there (default: standard output, the table to stderr)\n"
    "  -h, --help            show this help\n"
    "\n"
    "example:\n"
    "  canopy bench costs -m models/SmolLM2-135M-Instruct -d drafts/SmolLM2-135M-draft \\\n"
    "      --device cuda --out costs.json\n"
    "  canopy tree-opt --acceptance acc/results.json --costs costs.json --size 32 --out tree.json\n";

typedef struct costs_args {
  const char *model, *draft, *out;
  int draft_layers, ctx, top_k, reps, threads, device, no_graphs;
  cli_tree_cost_curve target, drafts; /* the sizes asked for; ms filled by the timing */
} costs_args;

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* "1,2,4" into strictly ascending sizes 1..CN_TREE_MAX_NODES - 1 (2 on a bad list). */
static int parse_sizes(const char *name, const char *s, cli_tree_cost_curve *c) {
  c->n = 0;
  const char *p = s;
  while (*p) {
    char *end;
    errno = 0;
    long v = strtol(p, &end, 10);
    if (errno || end == p || v < 1 || v >= CN_TREE_MAX_NODES || (c->n && v <= c->nodes[c->n - 1]) ||
        c->n == CLI_TREE_COST_MAX_POINTS || (*end && *end != ',')) {
      fprintf(stderr,
              "canopy: bench costs: %s '%s' must be up to %d ascending sizes in 1..%d, separated by commas\n",
              name, s, CLI_TREE_COST_MAX_POINTS, CN_TREE_MAX_NODES - 1);
      return 2;
    }
    c->nodes[c->n++] = (int)v;
    p = *end ? end + 1 : end;
  }
  if (!c->n) {
    fprintf(stderr, "canopy: bench costs: %s is empty\n", name);
    return 2;
  }
  return 0;
}

/* A context of `len` tokens in a new sequence of m's pool: one real prefill, in chunks. */
static int make_context(canopy_model *m, int len, cn_kv_seq **out) {
  int vocab = m->cfg.vocab_size, chunk = m->max_batch;
  int32_t *tok = malloc(sizeof *tok * (size_t)len), *pos = malloc(sizeof *pos * (size_t)chunk);
  float *logits = malloc(sizeof *logits * (size_t)vocab);
  int st = !tok || !pos || !logits ? cn_error(CANOPY_ERR_NO_MEMORY, "bench costs: a context of %d tokens", len)
                                   : cn_kv_seq_create(m->kv, out);
  for (int i = 0; !st && i < len; i++) tok[i] = (int32_t)((13u + 7919u * (unsigned)i) % (unsigned)vocab);
  for (int at = 0; !st && at < len; at += chunk) {
    int n = len - at < chunk ? len - at : chunk, last = n - 1;
    for (int i = 0; i < n; i++) pos[i] = at + i;
    cn_seq_batch sb = {.kv = *out, .first = 0, .n = n};
    cn_batch b = {.n_tokens = n, .tokens = tok + at, .pos = pos, .n_seqs = 1, .seqs = &sb, .n_logits = 1,
                  .logit_rows = &last};
    if (!(st = cn_forward(m, &b, logits))) cn_kv_seq_commit(*out, tok + at, n);
  }
  free(tok);
  free(pos);
  free(logits);
  return st;
}

/* The median wall time of a forward over n nodes shaped as a binary heap (node i's parent
 * (i - 1) / 2: BFS order, siblings consecutive) after the sequence's context, every row returning
 * its top k ids; each forward's K/V is dropped again. */
static int time_forward(canopy_model *m, cn_kv_seq *kv, int n, int k, int reps, double *ms) {
  int ctx = cn_kv_seq_len(kv), words = (n + 63) / 64, vocab = m->cfg.vocab_size;
  cn_tree t;
  cn_tree_reset(&t, 42 % vocab);
  for (int i = 1; i < n; i++) cn_tree_add(&t, (i - 1) / 2, (int32_t)((200u + 31u * (unsigned)i) % (unsigned)vocab), -1.0f);
  uint64_t mask[CN_TREE_MAX_NODES * CN_TREE_MASK_WORDS];
  int32_t pos[CN_TREE_MAX_NODES], rows[CN_TREE_MAX_NODES], top[CN_TREE_MAX_NODES * 32];
  cn_tree_mask(&t, mask, words);
  for (int i = 0; i < n; i++) pos[i] = ctx + t.depth[i], rows[i] = i;
  cn_seq_batch sb = {.kv = kv, .first = 0, .n = n, .tree_mask = n > 1 ? mask : NULL};
  cn_batch b = {.n_tokens = n, .tokens = t.token, .pos = pos, .n_seqs = 1, .seqs = &sb, .n_logits = n,
                .logit_rows = rows, .top = top, .top_k = k};
  double *v = malloc(sizeof *v * (size_t)reps);
  if (!v) return cn_error(CANOPY_ERR_NO_MEMORY, "bench costs: %d repetitions", reps);
  int st = CANOPY_OK;
  for (int r = -2; r < reps && !st; r++) { /* two warm-ups: a CUDA graph is captured at the second */
    double t0 = now_s();
    st = cn_forward(m, &b, NULL);
    double t1 = now_s();
    if (r >= 0) v[r] = 1e3 * (t1 - t0);
    int tr = cn_kv_seq_truncate(kv, ctx);
    if (!st) st = tr;
  }
  if (!st) {
    qsort(v, (size_t)reps, sizeof *v, cmp_double);
    *ms = reps % 2 ? v[reps / 2] : 0.5 * (v[reps / 2 - 1] + v[reps / 2]);
  }
  free(v);
  return st;
}

/* Every size of curve c for model m (top k ids a row), into c->ms. */
static int time_curve(canopy_model *m, const char *what, int ctx, int k, int reps, cli_tree_cost_curve *c) {
  cn_kv_seq *kv = NULL;
  int st = make_context(m, ctx, &kv);
  if (st) st = cn_error_wrap(st, "%s: the context", what);
  for (int i = 0; !st && i < c->n; i++)
    if ((st = time_forward(m, kv, c->nodes[i], k, reps, &c->ms[i])))
      st = cn_error_wrap(st, "%s: a forward over %d nodes", what, c->nodes[i]);
  cn_kv_seq_free(kv);
  return st;
}

static cJSON *curve_json(const cli_tree_cost_curve *c) {
  cJSON *o = cJSON_CreateObject(), *nodes = cJSON_AddArrayToObject(o, "nodes"), *ms = cJSON_AddArrayToObject(o, "ms");
  for (int i = 0; i < c->n; i++) {
    cJSON_AddItemToArray(nodes, cJSON_CreateNumber(c->nodes[i]));
    cJSON_AddItemToArray(ms, cJSON_CreateNumber(c->ms[i]));
  }
  return o;
}

static int parse_args(int argc, char **argv, costs_args *a) {
  enum { O_LAYERS = 256, O_CTX, O_NODES, O_DNODES, O_TOPK, O_REPS, O_THREADS, O_DEVICE, O_NO_GRAPHS };
  struct option opts[] = {{"model", required_argument, 0, 'm'},
                          {"draft", required_argument, 0, 'd'},
                          {"draft-layers", required_argument, 0, O_LAYERS},
                          {"ctx", required_argument, 0, O_CTX},
                          {"nodes", required_argument, 0, O_NODES},
                          {"draft-nodes", required_argument, 0, O_DNODES},
                          {"top-k", required_argument, 0, O_TOPK},
                          {"reps", required_argument, 0, O_REPS},
                          {"threads", required_argument, 0, O_THREADS},
                          {"device", required_argument, 0, O_DEVICE},
                          {"no-graphs", no_argument, 0, O_NO_GRAPHS},
                          {"out", required_argument, 0, 'o'},
                          {"help", no_argument, 0, 'h'},
                          {0, 0, 0, 0}};
  const char *cmd = "bench costs";
  int c, rc = 0;
  optind = 1;
  while (!rc && (c = getopt_long(argc, argv, "m:d:o:h", opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model = optarg; break;
    case 'd': a->draft = optarg; break;
    case 'o': a->out = optarg; break;
    case O_LAYERS: rc = cli_parse_int(cmd, "--draft-layers", optarg, 1, &a->draft_layers); break;
    case O_CTX: rc = cli_parse_int(cmd, "--ctx", optarg, 1, &a->ctx); break;
    case O_NODES: rc = parse_sizes("--nodes", optarg, &a->target); break;
    case O_DNODES: rc = parse_sizes("--draft-nodes", optarg, &a->drafts); break;
    case O_TOPK: rc = cli_parse_int(cmd, "--top-k", optarg, 1, &a->top_k); break;
    case O_REPS: rc = cli_parse_int(cmd, "--reps", optarg, 1, &a->reps); break;
    case O_THREADS: rc = cli_parse_int(cmd, "--threads", optarg, 0, &a->threads); break;
    case O_DEVICE: rc = cli_parse_device(cmd, optarg, &a->device); break;
    case O_NO_GRAPHS: a->no_graphs = 1; break;
    case 'h': fputs(usage, stdout); return -1;
    default: fputs(usage, stderr); return 2;
    }
  }
  if (rc) return rc;
  if (optind != argc || !a->draft) {
    fprintf(stderr, "canopy: bench costs: give the draft with -d DIR%s\n\n%s",
            optind != argc ? " (and no stray arguments)" : "", usage);
    return 2;
  }
  if (a->top_k > 32) {
    fprintf(stderr, "canopy: bench costs: --top-k '%d' must be at most 32\n", a->top_k);
    return 2;
  }
  return 0;
}

int cli_bench_costs(int argc, char **argv) {
  costs_args a = {.ctx = 256, .top_k = 8, .reps = 10};
  const int tn[] = {1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64}, dn[] = {1, 2, 3, 4, 5, 6, 8, 12, 16};
  a.target.n = (int)(sizeof tn / sizeof *tn);
  a.drafts.n = (int)(sizeof dn / sizeof *dn);
  memcpy(a.target.nodes, tn, sizeof tn);
  memcpy(a.drafts.nodes, dn, sizeof dn);
  int rc = parse_args(argc, argv, &a);
  if (rc) return rc < 0 ? 0 : rc;
  const char *dir = cli_model_dir(a.model);

  canopy_model *target = NULL, *draft = NULL;
  cJSON *root = NULL;
  char *json = NULL;
  canopy_model_params mp = canopy_model_default_params();
  mp.n_threads = a.threads;
  mp.device = a.device;
  mp.prefix_cache = 0;
  mp.max_context = a.ctx + CN_TREE_MAX_NODES + 1;
  if (a.no_graphs) mp.cuda_graphs = 0;
  canopy_model_params dp = mp;
  dp.n_layers = a.draft_layers;
  rc = 1;
  if (canopy_model_load(dir, &mp, &target)) { cli_fail("loading the model"); goto done; }
  if (canopy_model_load(a.draft, &dp, &draft)) { cli_fail("loading the draft model"); goto done; }
  if (time_curve(target, "target", a.ctx, 1, a.reps, &a.target)) { cli_fail("bench costs"); goto done; }
  if (time_curve(draft, "draft", a.ctx, a.top_k, a.reps, &a.drafts)) { cli_fail("bench costs"); goto done; }

  FILE *o = a.out ? stdout : stderr;
  const char *dev = a.device == CANOPY_DEVICE_CUDA ? "cuda" : "cpu";
  fprintf(o, "forward times after %d tokens of context, %s, median of %d (ms):\n", a.ctx, dev, a.reps);
  fprintf(o, "%6s %12s %14s %12s\n", "nodes", "target", "x decode", "draft");
  for (int i = 0, j = 0; i < a.target.n || j < a.drafts.n;) {
    int n = i < a.target.n ? a.target.nodes[i] : 1 << 30, dn_ = j < a.drafts.n ? a.drafts.nodes[j] : 1 << 30;
    int x = n < dn_ ? n : dn_;
    fprintf(o, "%6d", x);
    if (x == n) fprintf(o, " %12.3f %13.2fx", a.target.ms[i], a.target.ms[i] / a.target.ms[0]), i++;
    else fprintf(o, " %12s %14s", "", "");
    if (x == dn_) fprintf(o, " %12.3f", a.drafts.ms[j]), j++;
    fprintf(o, "\n");
  }

  root = cJSON_CreateObject();
  if (!root || cli_add_run_info(root, argc, argv)) goto done;
  cJSON_AddStringToObject(root, "device", dev);
  cJSON_AddBoolToObject(root, "cuda_graphs", a.device == CANOPY_DEVICE_CUDA && !a.no_graphs);
  cJSON_AddStringToObject(root, "target_model", dir);
  cJSON_AddStringToObject(root, "draft_model", a.draft);
  cJSON_AddNumberToObject(root, "draft_layers", draft->cfg.n_layers);
  cJSON_AddNumberToObject(root, "ctx", a.ctx);
  cJSON_AddNumberToObject(root, "reps", a.reps);
  cJSON_AddNumberToObject(root, "draft_top_k", a.top_k);
  cJSON_AddItemToObject(root, "target_forward", curve_json(&a.target));
  cJSON_AddItemToObject(root, "draft_forward", curve_json(&a.drafts));
  json = cJSON_Print(root);
  if (!json) goto done;
  if (a.out) {
    FILE *f = fopen(a.out, "w");
    if (!f || fputs(json, f) == EOF || fputc('\n', f) == EOF || fclose(f)) {
      fprintf(stderr, "canopy: bench costs: cannot write '%s': %s\n", a.out, strerror(errno));
      goto done;
    }
    printf("wrote %s\n", a.out);
  } else {
    puts(json);
  }
  rc = 0;
done:
  free(json);
  cJSON_Delete(root);
  canopy_model_free(draft);
  canopy_model_free(target);
  return rc;
}
