/* canopy bench acceptance: for each prompt of a JSONL file, target-only decoding and each draft
 * tree shape in fresh sessions over the same models; acceptance by depth, tokens per target
 * forward and speedups, written to DIR/results.json with gnuplot data, a script and plots. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "canopy.h"
#include "cli/cli.h"
#include "cli/divergence.h"

#define MAX_TREES 32

/* Whether canopy_stats has accept_rank / offered_rank (acceptance by child rank, Sequoia's
 * positional acceptance p_k): then results.json reports "accept_rate_by_rank" too. */
#ifndef CANOPY_BENCH_HAVE_ACCEPT_RANK
#define CANOPY_BENCH_HAVE_ACCEPT_RANK 1
#endif

static const char *usage =
    "usage: canopy bench acceptance -m TARGET -d DRAFT --prompts FILE.jsonl --out DIR [options]\n"
    "\n"
    "For every prompt, decodes n new tokens with the target alone and with each draft tree (each\n"
    "in a fresh session over the same loaded models), then writes DIR/results.json (per prompt\n"
    "and overall: mean accepted length, acceptance rate by depth, tokens/s, speedup over the\n"
    "target alone, forwards, tree nodes per step), gnuplot data and a script, and the plots\n"
    "DIR/acceptance_by_depth.png and DIR/speedup_vs_tree_size.png when gnuplot is installed.\n"
    "\n"
    "  -m, --model DIR       target model folder\n"
    "  -d, --draft DIR       draft model folder (same vocabulary)\n"
    "      --draft-layers N  load only the draft's first N layers\n"
    "      --prompts FILE    JSON lines, each with a \"prompt\" string (and optionally an \"id\")\n"
    "      --chat            wrap each prompt as a user turn with the chat template\n"
    "  -n, --max-tokens N    new tokens per run (default 128; generation stops at eos)\n"
    "      --tree SPEC       a tree to measure; repeatable (default chain:4)\n"
    "      --temp T          sampling temperature (default 0: greedy)\n"
    "      --seed S          random seed (default 42)\n"
    "      --max-prompts K   only the first K prompts\n"
    "      --threads N       CPU threads (default: all cores)\n"
    "      --device D        cpu (default) or cuda, for target and draft\n"
    "      --no-graphs       cuda: launch every op of every forward (no CUDA graphs)\n"
    "      --prefix-cache    let runs reuse the KV blocks of earlier runs' identical prompt prefixes.\n"
    "                        Off by default (--no-prefix-cache): every run prefills its whole prompt,\n"
    "                        so the target alone and each tree start from the same bits (on CUDA a\n"
    "                        reused block was computed by a prefill of another length, and its last\n"
    "                        bits can differ, which moves greedy near-ties)\n"
    "  -o, --out DIR         output folder (created if missing)\n"
    "  -h, --help            show this help\n"
    "\n"
    "example:\n"
    "  canopy bench acceptance -m models/SmolLM2-135M-Instruct -d models/SmolLM2-135M-Instruct \\\n"
    "      --draft-layers 4 --prompts prompts.jsonl --chat -n 32 --tree chain:4 --tree static:3,2,1 \\\n"
    "      --out /tmp/acc\n";

typedef struct bench_args {
  const char *model, *draft, *prompts, *out;
  const char *trees[MAX_TREES];
  int n_trees, draft_layers, chat, max_tokens, max_prompts, threads, device, no_graphs, prefix_cache;
  float temp;
  uint64_t seed;
} bench_args;

/* Sums of canopy_stats over runs. */
typedef struct agg {
  long n_generated, forward_passes, spec_steps, spec_tokens, draft_forwards, tree_nodes, n_prompt, n_reused;
  double decode_s, draft_s, verify_s;
  long accept_depth[CANOPY_STATS_MAX_DEPTH], offered_depth[CANOPY_STATS_MAX_DEPTH];
  long accept_rank[CANOPY_STATS_MAX_DEPTH], offered_rank[CANOPY_STATS_MAX_DEPTH];
  long greedy_runs, identical_runs; /* greedy only: runs compared with the target alone, and equal */
} agg;

static void agg_add(agg *a, const canopy_stats *s) {
  a->n_generated += s->n_generated;
  a->forward_passes += s->forward_passes;
  a->spec_steps += s->spec_steps;
  a->spec_tokens += s->spec_tokens;
  a->draft_forwards += s->draft_forwards;
  a->tree_nodes += s->tree_nodes;
  a->n_prompt += s->n_prompt;
  a->n_reused += s->n_reused;
  a->decode_s += s->decode_s;
  a->draft_s += s->draft_s;
  a->verify_s += s->verify_s;
  for (int d = 0; d < CANOPY_STATS_MAX_DEPTH; d++) {
    a->accept_depth[d] += s->accept_depth[d];
    a->offered_depth[d] += s->offered_depth[d];
#if CANOPY_BENCH_HAVE_ACCEPT_RANK
    a->accept_rank[d] += s->accept_rank[d];
    a->offered_rank[d] += s->offered_rank[d];
#endif
  }
}

/* The by-rank counts of a into sum (the pooled p_k over every tree). */
static void agg_add_ranks(agg *sum, const agg *a) {
  for (int k = 0; k < CANOPY_STATS_MAX_DEPTH; k++) {
    sum->accept_rank[k] += a->accept_rank[k];
    sum->offered_rank[k] += a->offered_rank[k];
  }
}

/* accept_rate_by_rank, accept_rank, offered_rank (ranks up to the last one tried). */
static void add_ranks_json(cJSON *o, const agg *a) {
  if (!CANOPY_BENCH_HAVE_ACCEPT_RANK) return;
  int n = 0;
  while (n < CANOPY_STATS_MAX_DEPTH && a->offered_rank[n] > 0) n++;
  cJSON *rate = cJSON_AddArrayToObject(o, "accept_rate_by_rank");
  cJSON *acc = cJSON_AddArrayToObject(o, "accept_rank");
  cJSON *off = cJSON_AddArrayToObject(o, "offered_rank");
  for (int k = 0; k < n; k++) {
    cJSON_AddItemToArray(rate, cJSON_CreateNumber((double)a->accept_rank[k] / a->offered_rank[k]));
    cJSON_AddItemToArray(acc, cJSON_CreateNumber((double)a->accept_rank[k]));
    cJSON_AddItemToArray(off, cJSON_CreateNumber((double)a->offered_rank[k]));
  }
}

static double tps(const agg *a) { return a->decode_s > 0 ? a->n_generated / a->decode_s : 0; }
static double mean_len(const agg *a) { return a->spec_steps ? (double)a->spec_tokens / a->spec_steps : 0; }
static double nodes_per_step(const agg *a) { return a->spec_steps ? (double)a->tree_nodes / a->spec_steps : 0; }
static int n_depths(const agg *a) {
  int n = 0;
  while (n < CANOPY_STATS_MAX_DEPTH && a->offered_depth[n] > 0) n++;
  return n;
}

static cJSON *agg_json(const agg *a, const char *tree, const agg *base) {
  cJSON *o = cJSON_CreateObject();
  if (tree) cJSON_AddStringToObject(o, "tree", tree);
  cJSON_AddNumberToObject(o, "n_generated", (double)a->n_generated);
  cJSON_AddNumberToObject(o, "decode_s", a->decode_s);
  cJSON_AddNumberToObject(o, "tokens_per_s", tps(a));
  cJSON_AddNumberToObject(o, "target_forwards", (double)a->forward_passes);
  /* Prompt tokens served from earlier runs' KV blocks (0 unless --prefix-cache). */
  cJSON_AddNumberToObject(o, "prompt_tokens_reused", (double)a->n_reused);
  if (!tree) return o;
  cJSON_AddNumberToObject(o, "speedup", tps(base) > 0 ? tps(a) / tps(base) : 0);
  cJSON_AddNumberToObject(o, "mean_accepted_len", mean_len(a));
  cJSON_AddNumberToObject(o, "spec_steps", (double)a->spec_steps);
  cJSON_AddNumberToObject(o, "spec_tokens", (double)a->spec_tokens);
  cJSON_AddNumberToObject(o, "draft_forwards", (double)a->draft_forwards);
  cJSON_AddNumberToObject(o, "tree_nodes_per_step", nodes_per_step(a));
  cJSON_AddNumberToObject(o, "draft_s", a->draft_s);
  cJSON_AddNumberToObject(o, "verify_s", a->verify_s);
  int nd = n_depths(a);
  cJSON *rate = cJSON_AddArrayToObject(o, "accept_rate_by_depth");
  cJSON *acc = cJSON_AddArrayToObject(o, "accept_depth");
  cJSON *off = cJSON_AddArrayToObject(o, "offered_depth");
  for (int d = 0; d < nd; d++) {
    cJSON_AddItemToArray(rate, cJSON_CreateNumber((double)a->accept_depth[d] / a->offered_depth[d]));
    cJSON_AddItemToArray(acc, cJSON_CreateNumber((double)a->accept_depth[d]));
    cJSON_AddItemToArray(off, cJSON_CreateNumber((double)a->offered_depth[d]));
  }
  add_ranks_json(o, a);
  if (a->greedy_runs) {
    cJSON_AddNumberToObject(o, "runs_compared_with_target_only", (double)a->greedy_runs);
    cJSON_AddNumberToObject(o, "runs_identical_to_target_only", (double)a->identical_runs);
  }
  return o;
}

/* A greedy run's first difference from the target alone (cli/divergence.h). */
static void add_divergence_json(cJSON *o, const cli_divergence *d) {
  cJSON *j = cJSON_AddObjectToObject(o, "first_difference");
  cJSON_AddNumberToObject(j, "position", d->position);
  cJSON_AddNumberToObject(j, "target_only_token", d->base_token);
  cJSON_AddNumberToObject(j, "spec_token", d->other_token);
  cJSON_AddNumberToObject(j, "target_only_top2_gap", d->gap);
  cJSON_AddNumberToObject(j, "target_only_top2_rel_gap", d->rel_gap);
  cJSON_AddNumberToObject(j, "target_only_runner_up", d->runner_up);
  cJSON_AddBoolToObject(j, "spec_took_runner_up", d->runner_up == d->other_token);
}

static int parse(int argc, char **argv, bench_args *a) {
  enum { O_LAYERS = 256, O_PROMPTS, O_CHAT, O_TREE, O_TEMP, O_SEED, O_MAXP, O_THREADS, O_DEVICE, O_NO_GRAPHS, O_NO_PREFIX, O_PREFIX };
  struct option opts[] = {{"model", required_argument, 0, 'm'},      {"draft", required_argument, 0, 'd'},
                          {"draft-layers", required_argument, 0, O_LAYERS},
                          {"prompts", required_argument, 0, O_PROMPTS}, {"chat", no_argument, 0, O_CHAT},
                          {"max-tokens", required_argument, 0, 'n'}, {"tree", required_argument, 0, O_TREE},
                          {"temp", required_argument, 0, O_TEMP},    {"seed", required_argument, 0, O_SEED},
                          {"max-prompts", required_argument, 0, O_MAXP},
                          {"threads", required_argument, 0, O_THREADS}, {"out", required_argument, 0, 'o'},
                          {"device", required_argument, 0, O_DEVICE},
                          {"no-graphs", no_argument, 0, O_NO_GRAPHS},
                          {"no-prefix-cache", no_argument, 0, O_NO_PREFIX},
                          {"prefix-cache", no_argument, 0, O_PREFIX},
                          {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
  *a = (bench_args){.max_tokens = 128, .seed = 42};
  int c, rc = 0;
  double num = 0;
  optind = 1;
  while (!rc && (c = getopt_long(argc, argv, "m:d:n:o:h", opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model = optarg; break;
    case 'd': a->draft = optarg; break;
    case O_LAYERS: rc = cli_parse_int("bench acceptance", "--draft-layers", optarg, 1, &a->draft_layers); break;
    case O_PROMPTS: a->prompts = optarg; break;
    case O_CHAT: a->chat = 1; break;
    case 'n': rc = cli_parse_int("bench acceptance", "--max-tokens", optarg, 1, &a->max_tokens); break;
    case O_TREE:
      if (a->n_trees == MAX_TREES) {
        fprintf(stderr, "canopy: bench acceptance: at most %d --tree options\n", MAX_TREES);
        rc = 2;
      } else {
        a->trees[a->n_trees++] = optarg;
      }
      break;
    case O_TEMP: rc = cli_parse_double("bench acceptance", "--temp", optarg, 0, 100, &num), a->temp = (float)num; break;
    case O_SEED: rc = cli_parse_u64("bench acceptance", "--seed", optarg, &a->seed); break;
    case O_MAXP: rc = cli_parse_int("bench acceptance", "--max-prompts", optarg, 1, &a->max_prompts); break;
    case O_THREADS: rc = cli_parse_int("bench acceptance", "--threads", optarg, 1, &a->threads); break;
    case O_DEVICE: rc = cli_parse_device("bench acceptance", optarg, &a->device); break;
    case O_NO_GRAPHS: a->no_graphs = 1; break;
    case O_NO_PREFIX: a->prefix_cache = 0; break;
    case O_PREFIX: a->prefix_cache = 1; break;
    case 'o': a->out = optarg; break;
    case 'h': fputs(usage, stdout); return -1;
    default: fputs(usage, stderr); return 2;
    }
  }
  if (rc) return rc;
  if (optind != argc || !a->draft || !a->prompts || !a->out) {
    fprintf(stderr, "canopy: bench acceptance: -d DRAFT, --prompts FILE and --out DIR are required\n\n%s", usage);
    return 2;
  }
  if (!a->n_trees) a->trees[a->n_trees++] = "chain:4";
  return 0;
}

typedef struct prompt {
  char *id, *text;
} prompt;

/* Reads the JSONL prompts (blank lines skipped). Returns the count, or -1 with a message. */
static int read_prompts(const char *path, int max, prompt **out) {
  FILE *f = fopen(path, "r");
  if (!f) {
    fprintf(stderr, "canopy: bench acceptance: cannot open '%s': %s\n", path, strerror(errno));
    return -1;
  }
  char *line = NULL;
  size_t cap = 0;
  ssize_t len;
  int n = 0, lineno = 0, bad = 0;
  prompt *ps = NULL;
  while ((len = getline(&line, &cap, f)) >= 0 && (!max || n < max)) {
    lineno++;
    if (strspn(line, " \t\r\n") == (size_t)len) continue;
    cJSON *o = cJSON_Parse(line);
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(o, "prompt");
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id");
    if (!cJSON_IsString(p)) {
      fprintf(stderr, "canopy: bench acceptance: %s:%d: not a JSON object with a \"prompt\" string\n", path, lineno);
      cJSON_Delete(o);
      bad = 1;
      break;
    }
    prompt *bigger = realloc(ps, sizeof *ps * (size_t)(n + 1));
    if (!bigger) {
      cJSON_Delete(o);
      bad = 1;
      break;
    }
    ps = bigger;
    char idbuf[32];
    snprintf(idbuf, sizeof idbuf, "%d", n);
    ps[n].id = strdup(cJSON_IsString(id) ? id->valuestring : idbuf);
    ps[n].text = strdup(p->valuestring);
    n++;
    cJSON_Delete(o);
  }
  free(line);
  fclose(f);
  if (!bad && n == 0) {
    fprintf(stderr, "canopy: bench acceptance: '%s' holds no prompts\n", path);
    bad = 1;
  }
  if (bad) {
    for (int i = 0; i < n; i++) free(ps[i].id), free(ps[i].text);
    free(ps);
    return -1;
  }
  *out = ps;
  return n;
}

static void progress(int done, int total) {
  char bar[41];
  int w = 30, fill = total ? done * w / total : w;
  for (int i = 0; i < w; i++) bar[i] = i < fill ? '#' : ' ';
  bar[w] = '\0';
  fprintf(stderr, "\r[%s] %d/%d prompts", bar, done, total);
  if (done == total) fputc('\n', stderr);
  fflush(stderr);
}

/* One run: a fresh session, the prompt, up to n tokens (stopping at eos), kept in out[max_tokens]. */
static int run_one(canopy_model *model, canopy_model *draft, const char *tree, const bench_args *a,
                   const int32_t *ids, int n_ids, canopy_stats *s, int32_t *out, int *n_out) {
  canopy_session_params sp = canopy_session_default_params();
  sp.sampling.temperature = a->temp;
  sp.sampling.seed = a->seed;
  sp.draft = draft;
  sp.tree = tree;
  sp.max_tokens = a->max_tokens;
  canopy_session *sess = NULL;
  if (canopy_session_create(model, &sp, &sess)) return cli_fail(tree ? tree : "creating a session");
  int st = canopy_session_append(sess, ids, n_ids);
  int32_t t;
  *n_out = 0;
  if (!st)
    while ((st = canopy_session_next(sess, &t)) == CANOPY_OK) out[(*n_out)++] = t;
  if (st != CANOPY_DONE) {
    canopy_session_free(sess);
    fputc('\n', stderr);
    return cli_fail(tree ? tree : "generating with the target alone");
  }
  canopy_session_get_stats(sess, s);
  canopy_session_free(sess);
  return 0;
}

static int write_text(const char *dir, const char *name, const char *text) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  return cli_write_file("bench acceptance", path, text);
}

static const char *plot_script =
    "# gnuplot script written by canopy bench acceptance; run it in this folder.\n"
    "set terminal pngcairo size 900,600 noenhanced\n"
    "set grid\n"
    "set key outside right\n"
    "set output 'acceptance_by_depth.png'\n"
    "set title 'Acceptance rate by depth (steps reaching depth d / steps offering it)'\n"
    "set xlabel 'depth'\n"
    "set ylabel 'acceptance rate'\n"
    "set yrange [0:1.05]\n"
    "set xtics 1\n"
    "plot for [i=0:n_trees-1] 'acceptance_by_depth.dat' index i using 1:2 with linespoints lw 2 "
    "title columnheader(1)\n"
    "set output 'speedup_vs_tree_size.png'\n"
    "set title 'Speedup and mean accepted length against tree size'\n"
    "set xlabel 'tree nodes per step'\n"
    "set ylabel 'speedup over the target alone'\n"
    "set y2label 'mean accepted length (tokens per target forward)'\n"
    "set autoscale y\n"
    "set yrange [0:*]\n"
    "set y2range [0:*]\n"
    "set xtics autofreq\n"
    "set ytics nomirror\n"
    "set y2tics\n"
    "set offsets 0.5, 0.5, 0, 0\n"
    "plot 'speedup_vs_tree_size.dat' using 2:3 with points pt 7 ps 1.5 title 'speedup', \\\n"
    "     '' using 2:3:1 with labels offset 0,1 notitle, \\\n"
    "     '' using 2:4 axes x1y2 with points pt 5 ps 1.5 title 'mean accepted length'\n";

static int write_script(const char *dir, int n_trees) {
  size_t cap = strlen(plot_script) + 64;
  char *text = malloc(cap);
  if (!text) return 1;
  snprintf(text, cap, "n_trees = %d\n%s", n_trees, plot_script);
  int rc = write_text(dir, "plot_acceptance.gp", text);
  free(text);
  return rc;
}

/* Runs gnuplot in dir; says why on stderr if it cannot. */
static void run_gnuplot(const char *dir) {
  pid_t pid = fork();
  if (pid < 0) {
    fprintf(stderr, "canopy: bench acceptance: cannot start gnuplot: %s\n", strerror(errno));
    return;
  }
  if (pid == 0) {
    if (chdir(dir)) _exit(126);
    execlp("gnuplot", "gnuplot", "plot_acceptance.gp", (char *)NULL);
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
    fprintf(stderr, "canopy: bench acceptance: gnuplot is not on PATH; wrote the data and %s/plot_acceptance.gp "
                    "(run `gnuplot plot_acceptance.gp` there)\n", dir);
  else if (!WIFEXITED(status) || WEXITSTATUS(status))
    fprintf(stderr, "canopy: bench acceptance: gnuplot failed; the data and script are in %s\n", dir);
  else
    fprintf(stderr, "plots: %s/acceptance_by_depth.png, %s/speedup_vs_tree_size.png\n", dir, dir);
}

static int bench_acceptance(int argc, char **argv) {
  bench_args a;
  int rc = parse(argc, argv, &a);
  if (rc) return rc < 0 ? 0 : rc;
  const char *dir = cli_model_dir(a.model);
  prompt *ps = NULL;
  int n_ps = read_prompts(a.prompts, a.max_prompts, &ps);
  if (n_ps < 0) return 1;
  if (mkdir(a.out, 0777) && errno != EEXIST) {
    fprintf(stderr, "canopy: bench acceptance: cannot create '%s': %s\n", a.out, strerror(errno));
    return 1;
  }

  canopy_tokenizer *tok = NULL;
  canopy_model *model = NULL, *draft = NULL;
  int32_t *ids = NULL;
  int32_t *base = malloc(sizeof *base * (size_t)a.max_tokens), *gen = malloc(sizeof *gen * (size_t)a.max_tokens);
  char *rendered = NULL;
  int nc = a.n_trees + 1; /* config 0: the target alone */
  agg *total = calloc((size_t)nc, sizeof *total);
  /* [prompt][config]: greedy runs' first difference from the target alone (position -1: none) */
  cli_divergence *divs = n_ps > 0 ? malloc(sizeof *divs * (size_t)n_ps * nc) : NULL;
  for (size_t i = 0; divs && i < (size_t)n_ps * nc; i++) divs[i].position = -1;
  cJSON *root = cJSON_CreateObject(), *per_prompt = NULL;
  rc = 1;
  if (!total || !root || !base || !gen || (n_ps > 0 && !divs)) goto done;

  if (canopy_tokenizer_load(dir, &tok)) { cli_fail("loading the tokenizer"); goto done; }
  canopy_model_params mp = canopy_model_default_params();
  mp.n_threads = a.threads;
  mp.device = a.device;
  if (a.no_graphs) mp.cuda_graphs = 0;
  mp.prefix_cache = a.prefix_cache;
  if (canopy_model_load(dir, &mp, &model)) { cli_fail("loading the model"); goto done; }
  canopy_model_params dp = mp;
  dp.n_layers = a.draft_layers;
  if (canopy_model_load(a.draft, &dp, &draft)) { cli_fail("loading the draft model"); goto done; }

  /* Metadata. */
  cJSON *meta = cJSON_AddObjectToObject(root, "metadata");
  if (!meta || cli_add_run_info(meta, argc, argv)) goto done;
  canopy_model_info ti, di;
  canopy_model_get_info(model, &ti);
  canopy_model_get_info(draft, &di);
  cJSON_AddStringToObject(meta, "target", dir);
  cJSON_AddNumberToObject(meta, "target_layers", ti.n_layers);
  cJSON_AddNumberToObject(meta, "target_params", (double)ti.n_params);
  cJSON_AddStringToObject(meta, "draft", a.draft);
  cJSON_AddNumberToObject(meta, "draft_layers", di.n_layers);
  cJSON_AddNumberToObject(meta, "draft_params", (double)di.n_params);
  cJSON_AddStringToObject(meta, "device", a.device == CANOPY_DEVICE_CUDA ? "cuda" : "cpu");
  cJSON_AddBoolToObject(meta, "cuda_graphs", a.device == CANOPY_DEVICE_CUDA && !a.no_graphs);
  cJSON_AddBoolToObject(meta, "prefix_cache", a.prefix_cache);
  cJSON_AddStringToObject(meta, "prompts_file", a.prompts);
  cJSON_AddNumberToObject(meta, "n_prompts", n_ps);
  cJSON_AddNumberToObject(meta, "max_new_tokens", a.max_tokens);
  cJSON_AddBoolToObject(meta, "chat", a.chat);
  cJSON_AddNumberToObject(meta, "temperature", a.temp);
  cJSON_AddNumberToObject(meta, "seed", (double)a.seed);
  cJSON_AddStringToObject(meta, "canopy_version", CANOPY_VERSION);
  cJSON_AddStringToObject(
      root, "notes",
      "mean_accepted_len = spec_tokens / spec_steps: tokens per target verification forward, the bonus "
      "token included. accept_rate_by_depth[d] = steps whose accepted path reached depth d+1 / steps whose "
      "tree had a node at depth d+1. "
#if CANOPY_BENCH_HAVE_ACCEPT_RANK
      "accept_rate_by_rank[k] = times the child of rank k was accepted / times it was tried (every lower "
      "rank rejected): Sequoia's positional acceptance p_(k+1); overall.accept_rate_by_rank pools every "
      "tree. "
#else
      "Acceptance by child rank needs engine support (canopy_stats.accept_rank), not in this build. "
#endif
      "target_forwards counts every target forward (prefill "
      "chunks included). speedup = tokens_per_s / the target alone's tokens_per_s in this run. "
      "Runs stop at eos: n_generated may be below max_new_tokens. "
      "first_difference (greedy runs not identical to the target alone): the first differing token; "
      "target_only_top2_gap = top minus runner-up logit there, the target fed one token per forward as the "
      "target-only run was (its own logits), rel_gap = that over |top|; the speculative run's logits are not "
      "observable (greedy verification brings only each node's top id to the host). A gap within bf16's "
      "rounding (rel <= 2^-7) with spec_took_runner_up is a near-tie.");
  cJSON *trees = cJSON_AddArrayToObject(root, "trees");
  for (int t = 0; t < a.n_trees; t++) cJSON_AddItemToArray(trees, cJSON_CreateString(a.trees[t]));
  per_prompt = cJSON_CreateArray();

  progress(0, n_ps);
  for (int i = 0; i < n_ps; i++) {
    free(rendered);
    rendered = NULL;
    if (a.chat) {
      canopy_chat_message msg = {"user", ps[i].text};
      if (canopy_chat_apply(tok, &msg, 1, 1, &rendered)) { cli_fail("applying the chat template"); goto done; }
    }
    const char *text = rendered ? rendered : ps[i].text;
    int cap = (int)strlen(text) + 16, n_ids = 0;
    int32_t *bigger = realloc(ids, sizeof *ids * (size_t)cap);
    if (!bigger) goto done;
    ids = bigger;
    if (canopy_tokenize(tok, text, strlen(text), 0, ids, cap, &n_ids)) { cli_fail("tokenizing a prompt"); goto done; }
    if (n_ids == 0) {
      fprintf(stderr, "\ncanopy: bench acceptance: prompt %s is empty\n", ps[i].id);
      goto done;
    }
    agg one[MAX_TREES + 1];
    memset(one, 0, sizeof one);
    int n_base = 0;
    for (int c = 0; c < nc; c++) {
      canopy_stats s;
      int32_t *o = c ? gen : base;
      int n_o = 0;
      if (run_one(model, c ? draft : NULL, c ? a.trees[c - 1] : NULL, &a, ids, n_ids, &s, o, &n_o)) goto done;
      agg_add(&one[c], &s);
      if (!c) n_base = n_o;
      if (c && a.temp == 0) { /* greedy speculation must reproduce the target alone */
        cli_divergence *dv = &divs[(size_t)i * nc + c];
        int same = cli_find_divergence(model, ids, n_ids, base, n_base, o, n_o, dv);
        if (same < 0) { cli_fail("replaying the target where a speculative run differs"); goto done; }
        if (same) dv->position = -1;
        one[c].greedy_runs = 1, one[c].identical_runs = same;
        total[c].greedy_runs++, total[c].identical_runs += same;
      }
      agg_add(&total[c], &s);
    }
    cJSON *pj = cJSON_CreateObject();
    cJSON_AddStringToObject(pj, "id", ps[i].id);
    cJSON_AddNumberToObject(pj, "n_prompt_tokens", n_ids);
    cJSON_AddItemToObject(pj, "target_only", agg_json(&one[0], NULL, NULL));
    cJSON *pt = cJSON_AddArrayToObject(pj, "trees");
    for (int c = 1; c < nc; c++) {
      cJSON *tj = agg_json(&one[c], a.trees[c - 1], &one[0]);
      if (a.temp == 0 && divs[(size_t)i * nc + c].position >= 0) add_divergence_json(tj, &divs[(size_t)i * nc + c]);
      cJSON_AddItemToArray(pt, tj);
    }
    cJSON_AddItemToArray(per_prompt, pj);
    progress(i + 1, n_ps);
  }

  cJSON *overall = cJSON_AddObjectToObject(root, "overall");
  cJSON_AddItemToObject(overall, "target_only", agg_json(&total[0], NULL, NULL));
  cJSON_AddNumberToObject(overall, "target_only_tokens_per_s", tps(&total[0]));
  agg pooled;
  memset(&pooled, 0, sizeof pooled);
  for (int c = 1; c < nc; c++) agg_add_ranks(&pooled, &total[c]);
  add_ranks_json(overall, &pooled);
  cJSON *ot = cJSON_AddArrayToObject(overall, "trees");
  for (int c = 1; c < nc; c++) cJSON_AddItemToArray(ot, agg_json(&total[c], a.trees[c - 1], &total[0]));
  cJSON_AddItemToObject(root, "prompts", per_prompt);
  per_prompt = NULL;

  char *js = cJSON_Print(root);
  if (!js || write_text(a.out, "results.json", js)) {
    free(js);
    goto done;
  }
  free(js);

  /* gnuplot data: one block per tree (title line first), and one row per tree. */
  size_t dcap = 1 << 16, dlen = 0, slen = 0;
  char *dd = malloc(dcap), *sd = malloc(dcap);
  if (!dd || !sd) {
    free(dd);
    free(sd);
    goto done;
  }
  dlen += (size_t)snprintf(dd, dcap, "# acceptance rate by depth, one block per tree\n");
  slen += (size_t)snprintf(sd, dcap, "# tree nodes_per_step speedup mean_accepted_len tokens_per_s\n");
  for (int c = 1; c < nc && dlen < dcap - 512 && slen < dcap - 512; c++) {
    const agg *t = &total[c];
    dlen += (size_t)snprintf(dd + dlen, dcap - dlen, "%s\"%s\"\n", c > 1 ? "\n\n" : "", a.trees[c - 1]);
    for (int d = 0; d < n_depths(t); d++)
      dlen += (size_t)snprintf(dd + dlen, dcap - dlen, "%d %.6f\n", d + 1,
                               (double)t->accept_depth[d] / t->offered_depth[d]);
    slen += (size_t)snprintf(sd + slen, dcap - slen, "\"%s\" %.4f %.4f %.4f %.4f\n", a.trees[c - 1],
                             nodes_per_step(t), tps(&total[0]) > 0 ? tps(t) / tps(&total[0]) : 0, mean_len(t),
                             tps(t));
  }
  int werr = write_text(a.out, "acceptance_by_depth.dat", dd) || write_text(a.out, "speedup_vs_tree_size.dat", sd) ||
             write_script(a.out, a.n_trees);
  free(dd);
  free(sd);
  if (werr) goto done;
  run_gnuplot(a.out);

  /* The summary. */
  printf("%d prompts, up to %d new tokens each; target alone: %.2f tok/s (%ld tokens in %.2f s)\n", n_ps,
         a.max_tokens, tps(&total[0]), total[0].n_generated, total[0].decode_s);
  printf("%-24s %8s %9s %8s %8s %9s %9s  %s\n", "tree", "nodes", "mean_len", "tok/s", "speedup", "tgt_fwd",
         "drf_fwd", CANOPY_BENCH_HAVE_ACCEPT_RANK ? "accept rate by depth | by rank" : "accept rate by depth");
  for (int c = 1; c < nc; c++) {
    const agg *t = &total[c];
    printf("%-24s %8.1f %9.3f %8.2f %7.2fx %9ld %9ld ", a.trees[c - 1], nodes_per_step(t), mean_len(t), tps(t),
           tps(&total[0]) > 0 ? tps(t) / tps(&total[0]) : 0, t->forward_passes, t->draft_forwards);
    for (int d = 0; d < n_depths(t); d++) printf(" %.2f", (double)t->accept_depth[d] / t->offered_depth[d]);
    if (CANOPY_BENCH_HAVE_ACCEPT_RANK) {
      printf(" |");
      for (int k = 0; k < CANOPY_STATS_MAX_DEPTH && t->offered_rank[k] > 0; k++)
        printf(" %.2f", (double)t->accept_rank[k] / t->offered_rank[k]);
    }
    putchar('\n');
  }
  for (int c = 1; c < nc && a.temp == 0; c++)
    printf("%-24s greedy output identical to the target alone in %ld of %ld prompts\n", a.trees[c - 1],
           total[c].identical_runs, total[c].greedy_runs);
  for (int i = 0; i < n_ps && a.temp == 0; i++)
    for (int c = 1; c < nc; c++) {
      const cli_divergence *d = &divs[(size_t)i * nc + c];
      if (d->position < 0) continue;
      printf("  %s, %s: first differs at token %d (target alone %d, speculative %d); target top-2 gap %.4g "
             "(%.2e of the top logit), runner-up %d%s\n",
             ps[i].id, a.trees[c - 1], d->position, d->base_token, d->other_token, d->gap, d->rel_gap, d->runner_up,
             d->runner_up == d->other_token ? ", which the speculative run took" : "");
    }
  printf("results: %s/results.json\n", a.out);
  rc = 0;
done:
  cJSON_Delete(per_prompt);
  cJSON_Delete(root);
  canopy_model_free(draft);
  canopy_model_free(model);
  canopy_tokenizer_free(tok);
  free(ids);
  free(base);
  free(gen);
  free(rendered);
  free(total);
  free(divs);
  for (int i = 0; i < n_ps; i++) free(ps[i].id), free(ps[i].text);
  free(ps);
  return rc;
}

int cli_bench(int argc, char **argv) {
  if (argc >= 2 && !strcmp(argv[1], "acceptance")) return bench_acceptance(argc - 1, argv + 1);
  if (argc >= 2 && !strcmp(argv[1], "costs")) return cli_bench_costs(argc - 1, argv + 1);
  if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
    fputs("usage: canopy bench acceptance [options]   (see `canopy bench acceptance --help`)\n"
          "       canopy bench costs [options]        (see `canopy bench costs --help`)\n",
          stdout);
    return 0;
  }
  fprintf(stderr,
          "canopy: bench: unknown or missing benchmark%s%s%s; try `canopy bench acceptance --help` or "
          "`canopy bench costs --help`\n",
          argc >= 2 ? " '" : "", argc >= 2 ? argv[1] : "", argc >= 2 ? "'" : "");
  return 2;
}
