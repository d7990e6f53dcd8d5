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

#include "bench/bench_util.h"
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
    "Times the forwards a speculative step is made of, after a context of L tokens: the target\n"
    "over n tree nodes returning each node's top id (greedy verification; n = 1 is a decode step),\n"
    "and the draft over n rows returning each row's top-k ids (a draft level; its catch-up forward\n"
    "is the same size as the tokens it feeds). Wall clock, the forward's result on the host, the\n"
    "median of R rounds that each time every size of both once, the two models taking turns (as in\n"
    "a step, each finds the caches after the other). Prints a table and writes the times as\n"
    "JSON for `canopy tree-opt --costs`, which picks the tree that is fastest on this machine.\n"
    "\n"
    "  -m, --model DIR       target model folder\n"
    "  -d, --draft DIR       draft model folder\n"
    "      --draft-layers N  load only the draft's first N layers\n"
    "      --ctx L           context length before every timed forward (default 256)\n"
    "      --nodes LIST      target forward sizes (default 1,2,3,4,5,6,8,12,16,24,32,48,64)\n"
    "      --draft-nodes LIST  draft forward sizes (default 1,2,3,4,5,6,8,12,16)\n"
    "      --top-k K         ids a draft row returns (default 8)\n"
    "      --reps R          timed rounds, each one forward of every size (default 10, after 2\n"
    "                        warm-up rounds)\n"
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

/* The wall time of one forward over n nodes shaped as a binary heap (node i's parent (i - 1) / 2:
 * BFS order, siblings consecutive) after the sequence's context, every row returning its top k
 * ids; the forward's K/V is dropped again. */
static int time_forward(canopy_model *m, cn_kv_seq *kv, int n, int k, double *ms) {
  int ctx = cn_kv_seq_len(kv), words = (n + 63) / 64, vocab = m->cfg.vocab_size;
  cn_tree t;
  cn_tree_reset(&t, 42 % vocab);
  for (int i = 1; i < n; i++)
    cn_tree_add(&t, (i - 1) / 2, (int32_t)((200u + 31u * (unsigned)i) % (unsigned)vocab), -1.0f);
  uint64_t mask[CN_TREE_MAX_NODES * CN_TREE_MASK_WORDS];
  int32_t pos[CN_TREE_MAX_NODES], rows[CN_TREE_MAX_NODES], top[CN_TREE_MAX_NODES * 32];
  cn_tree_mask(&t, mask, words);
  for (int i = 0; i < n; i++) pos[i] = ctx + t.depth[i], rows[i] = i;
  cn_seq_batch sb = {.kv = kv, .first = 0, .n = n, .tree_mask = n > 1 ? mask : NULL};
  cn_batch b = {.n_tokens = n, .tokens = t.token, .pos = pos, .n_seqs = 1, .seqs = &sb, .n_logits = n,
                .logit_rows = rows, .top = top, .top_k = k};
  double t0 = bench_now_s();
  int st = cn_forward(m, &b, NULL);
  *ms = 1e3 * (bench_now_s() - t0);
  int tr = cn_kv_seq_truncate(kv, ctx);
  return st ? st : tr;
}

/* Both curves' times: the median of `reps` rounds. A round times every size of both models once,
 * the target's and the draft's forwards taking turns, for two reasons: a burst of load from
 * elsewhere on the machine lands on all sizes alike rather than on one, and each forward finds the
 * caches as a speculative step leaves them, the other model's weights having just passed through
 * (a draft forward timed right after another draft forward finds its small weights still cached,
 * and read 0.6x a real step's draft time on the CPU). Two rounds first warm up (a CUDA graph is
 * captured at the second). */
static int time_rounds(canopy_model *const m[2], int ctx, const int k[2], int reps, cli_tree_cost_curve *c[2]) {
  static const char *what[2] = {"target", "draft"};
  cn_kv_seq *kv[2] = {NULL, NULL};
  double *v[2];
  int st = CANOPY_OK, sizes = c[0]->n > c[1]->n ? c[0]->n : c[1]->n;
  for (int j = 0; j < 2; j++) v[j] = malloc(sizeof *v[j] * (size_t)reps * (size_t)c[j]->n);
  if (!v[0] || !v[1]) st = cn_error(CANOPY_ERR_NO_MEMORY, "bench costs: %d repetitions", reps);
  for (int j = 0; j < 2 && !st; j++)
    if ((st = make_context(m[j], ctx, &kv[j]))) st = cn_error_wrap(st, "%s: the context", what[j]);
  for (int r = -2; r < reps && !st; r++)
    for (int i = 0; i < sizes && !st; i++)
      for (int j = 0; j < 2 && !st; j++) {
        double ms;
        if (i >= c[j]->n) continue;
        if ((st = time_forward(m[j], kv[j], c[j]->nodes[i], k[j], &ms)))
          st = cn_error_wrap(st, "%s: a forward over %d nodes", what[j], c[j]->nodes[i]);
        else if (r >= 0)
          v[j][(size_t)i * reps + r] = ms;
      }
  for (int j = 0; j < 2; j++) {
    for (int i = 0; i < c[j]->n && !st; i++) c[j]->ms[i] = bench_median(v[j] + (size_t)i * reps, reps);
    free(v[j]);
    cn_kv_seq_free(kv[j]);
  }
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
  canopy_model *models[2] = {target, draft};
  const int top_k[2] = {1, a.top_k};
  cli_tree_cost_curve *curves[2] = {&a.target, &a.drafts};
  if (time_rounds(models, a.ctx, top_k, a.reps, curves)) { cli_fail("bench costs"); goto done; }

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
  size_t len = json ? strlen(json) : 0;
  char *line = json ? realloc(json, len + 2) : NULL; /* the file ends its last line */
  if (!line) goto done;
  json = line;
  memcpy(json + len, "\n", 2);
  if (a.out) {
    if (cli_write_file("bench costs", a.out, json)) goto done;
    printf("wrote %s\n", a.out);
  } else {
    fputs(json, stdout);
  }
  rc = 0;
done:
  free(json);
  cJSON_Delete(root);
  canopy_model_free(draft);
  canopy_model_free(target);
  return rc;
}
