/* canopy tree-opt: the static draft tree of N nodes with the highest expected accepted length
 * under measured acceptance rates (Sequoia's dynamic program, cli/tree_opt.h), or with --costs
 * the tree of at most N nodes that is fastest under measured forward times (cli/tree_cost.h). */
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_util.h"
#include "canopy.h"
#include "cli/cli.h"
#include "cli/tree_cost.h"
#include "cli/tree_opt.h"
#include "draft/tree_spec.h"

static const char *usage =
    "usage: canopy tree-opt --acceptance RESULTS.json --size N [options]\n"
    "\n"
    "Computes the static draft tree of N nodes (root excluded) that maximizes the expected\n"
    "number of tokens per target forward (Sequoia's dynamic program) under the acceptance rates\n"
    "measured by `canopy bench acceptance`, prints its predicted mean accepted length and writes\n"
    "it as a tree file for --tree.\n"
    "\n"
    "  -a, --acceptance FILE  results.json from `canopy bench acceptance`\n"
    "  -s, --size N           drafted nodes, 1..255 (with --costs: the most)\n"
    "  -D, --max-depth D      deepest node, 1..32 (default 8)\n"
    "  -o, --out FILE         write the tree as {\"paths\": [...], ...} (default: standard output)\n"
    "  -c, --costs FILE       forward times from `canopy bench costs`: choose, among the best trees\n"
    "                         of every size up to N and depth up to D, the one with the most tokens\n"
    "                         per unit of time (Sequoia's hardware-aware choice), and predict its\n"
    "                         speedup over the target alone\n"
    "      --overhead-ms X    with --costs: time every speculative step pays besides its forwards\n"
    "                         (default 0); 'fit' takes the median of what the static trees\n"
    "                         measured in RESULTS.json paid beyond the modelled forwards\n"
    "      --p1 P             use P as the first choice's acceptance instead of the measured one\n"
    "      --rank-decay R     the assumed decay of p_k over ranks not measured (default 0.3)\n"
    "  -h, --help             show this help\n"
    "\n"
    "The model: p_k is the probability that a node's k-th ranked child is accepted given that\n"
    "the parent was accepted and children 1..k-1 were rejected. If RESULTS.json carries\n"
    "\"accept_rate_by_rank\" (pooled over its trees) that is p, ranks it never tried extrapolated\n"
    "as p_k = p_(k-1) * R. Otherwise p_1 is estimated from the chain trees' per-depth counts\n"
    "(accepted / tried first-choice tokens, pooled over depths; every tree if no chain was\n"
    "measured, which overestimates it) and p_k = p_1 * R^(k-1) for k > 1 (an assumption: the\n"
    "draft's lower choices are accepted geometrically less often).\n"
    "\n"
    "The time of a step (--costs): the draft's catch-up forward over the mean accepted length's\n"
    "rows, one draft forward a level over the level's nodes that have children, the target's\n"
    "verification of the root and the drafted nodes, and --overhead-ms; the target alone pays its\n"
    "one-node forward a token. Sizes between the measured ones are interpolated linearly.\n"
    "\n"
    "example:\n"
    "  canopy tree-opt --acceptance /tmp/acc/results.json --size 16 --out tree16.json\n"
    "  canopy bench costs -m TARGET -d DRAFT --device cuda --out costs.json\n"
    "  canopy tree-opt --acceptance /tmp/acc/results.json --costs costs.json --size 64 --out fast.json\n";

static int int_at(const cJSON *arr, int i) {
  const cJSON *x = cJSON_GetArrayItem(arr, i);
  return cJSON_IsNumber(x) ? (int)x->valuedouble : 0;
}

/* First-choice acceptance pooled over depths: depth d+1 was tried by steps that reached depth d
 * and offered depth d+1. */
static void pool_tree(const cJSON *t, double *acc, double *tried) {
  const cJSON *ad = cJSON_GetObjectItemCaseSensitive(t, "accept_depth");
  const cJSON *od = cJSON_GetObjectItemCaseSensitive(t, "offered_depth");
  int n = cJSON_GetArraySize(od);
  for (int d = 0; d < n; d++) {
    int offered = int_at(od, d), reached = d ? int_at(ad, d - 1) : offered;
    *tried += offered < reached ? offered : reached;
    *acc += int_at(ad, d);
  }
}

/* One curve of a costs file: {"nodes": [ascending sizes >= 1], "ms": [times > 0]}, same length. */
static int read_curve(const char *path, const cJSON *root, const char *name, cli_tree_cost_curve *c) {
  const cJSON *o = cJSON_GetObjectItemCaseSensitive(root, name);
  const cJSON *nodes = cJSON_GetObjectItemCaseSensitive(o, "nodes"), *ms = cJSON_GetObjectItemCaseSensitive(o, "ms");
  int n = cJSON_GetArraySize(nodes);
  if (!cJSON_IsObject(o) || !cJSON_IsArray(nodes) || !cJSON_IsArray(ms) || n < 1 || n > CLI_TREE_COST_MAX_POINTS ||
      cJSON_GetArraySize(ms) != n) {
    fprintf(stderr,
            "canopy: tree-opt: '%s': field \"%s\" must be {\"nodes\": [...], \"ms\": [...]}, two arrays of the same "
            "length, 1..%d entries\n",
            path, name, CLI_TREE_COST_MAX_POINTS);
    return 1;
  }
  c->n = n;
  for (int i = 0; i < n; i++) {
    const cJSON *x = cJSON_GetArrayItem(nodes, i), *y = cJSON_GetArrayItem(ms, i);
    double v = cJSON_IsNumber(x) ? x->valuedouble : 0;
    if (v != (int)v || v < 1 || v > CLI_TREE_OPT_MAX_NODES + 1 || (i && (int)v <= c->nodes[i - 1])) {
      fprintf(stderr, "canopy: tree-opt: '%s': field \"%s.nodes\" entry %d must be a whole number of nodes "
                      "in 1..%d, above the entry before it\n", path, name, i, CLI_TREE_OPT_MAX_NODES + 1);
      return 1;
    }
    if (!cJSON_IsNumber(y) || !(y->valuedouble > 0) || y->valuedouble > 1e9) {
      fprintf(stderr, "canopy: tree-opt: '%s': field \"%s.ms\" entry %d must be a positive time\n", path, name, i);
      return 1;
    }
    c->nodes[i] = (int)v;
    c->ms[i] = y->valuedouble;
  }
  return 0;
}

/* The JSON of a file into *out (NULL if it does not parse: the caller names what it should be);
 * 0, or 1 with a message if the file cannot be read. */
static int read_json(const char *path, cJSON **out) {
  char *text = cli_read_file(path);
  if (!text) {
    fprintf(stderr, "canopy: tree-opt: cannot read '%s': %s\n", path, strerror(errno));
    return 1;
  }
  *out = cJSON_Parse(text);
  free(text);
  return 0;
}

/* A costs file of `canopy bench costs` into c (overhead untouched); 0, or 1 with a message. */
static int read_costs(const char *path, cli_tree_costs *c) {
  cJSON *root;
  if (read_json(path, &root)) return 1;
  int rc = 0;
  if (!cJSON_IsObject(root)) {
    fprintf(stderr, "canopy: tree-opt: '%s' is not a JSON object (the output of canopy bench costs)\n", path);
    rc = 1;
  }
  if (!rc) rc = read_curve(path, root, "target_forward", &c->target);
  if (!rc) rc = read_curve(path, root, "draft_forward", &c->draft);
  if (!rc && !(cli_tree_cost_at(&c->target, 1) > 0)) {
    fprintf(stderr, "canopy: tree-opt: '%s': field \"target_forward\" gives no positive time at 1 node\n", path);
    rc = 1;
  }
  cJSON_Delete(root);
  return rc;
}

/* A tree of the results that the model covers: static, with its measured mean accepted length and
 * (0 if none) its measured speedup over the target alone. */
static int measured_static(const cJSON *t, cn_tree_spec *ts, double *len, double *speedup) {
  const cJSON *name = cJSON_GetObjectItemCaseSensitive(t, "tree");
  const cJSON *measured = cJSON_GetObjectItemCaseSensitive(t, "mean_accepted_len");
  const cJSON *s = cJSON_GetObjectItemCaseSensitive(t, "speedup");
  if (!cJSON_IsString(name) || !cJSON_IsNumber(measured) || cn_tree_spec_parse(name->valuestring, ts) ||
      ts->kind != CN_TREE_STATIC)
    return 0;
  *len = measured->valuedouble;
  *speedup = cJSON_IsNumber(s) && s->valuedouble > 0 ? s->valuedouble : 0;
  return 1;
}

/* cn_tree_spec's tree as the DP's result type (value left 0, for the caller to set). */
static void tree_of_spec(const cn_tree_spec *ts, cli_tree_opt_result *r) {
  memset(r, 0, sizeof *r);
  r->n_nodes = ts->n_nodes;
  r->depth = ts->depth;
  r->parent[0] = -1;
  for (int i = 1; i <= ts->n_nodes; i++)
    r->parent[i] = ts->parent[i], r->rank[i] = ts->rank[i], r->node_depth[i] = ts->node_depth[i];
}

int cli_tree_opt(int argc, char **argv) {
  struct option opts[] = {{"acceptance", required_argument, 0, 'a'}, {"size", required_argument, 0, 's'},
                          {"max-depth", required_argument, 0, 'D'},  {"out", required_argument, 0, 'o'},
                          {"p1", required_argument, 0, 'P'},         {"rank-decay", required_argument, 0, 'R'},
                          {"costs", required_argument, 0, 'c'},      {"overhead-ms", required_argument, 0, 'O'},
                          {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
  const char *acc_path = NULL, *out_path = NULL, *costs_path = NULL;
  double size = 0, depth = 8, p1 = -1, decay = 0.3, overhead = 0;
  int c, rc = 0, fit = 0;
  optind = 1;
  while (!rc && (c = getopt_long(argc, argv, "a:s:D:o:c:h", opts, NULL)) != -1) {
    switch (c) {
    case 'a': acc_path = optarg; break;
    case 's': rc = cli_parse_double("tree-opt", "--size", optarg, 1, CLI_TREE_OPT_MAX_NODES, &size); break;
    case 'D': rc = cli_parse_double("tree-opt", "--max-depth", optarg, 1, CLI_TREE_OPT_MAX_DEPTH, &depth); break;
    case 'o': out_path = optarg; break;
    case 'P': rc = cli_parse_double("tree-opt", "--p1", optarg, 0, 1, &p1); break;
    case 'R': rc = cli_parse_double("tree-opt", "--rank-decay", optarg, 0, 1, &decay); break;
    case 'c': costs_path = optarg; break;
    case 'O':
      fit = !strcmp(optarg, "fit");
      if (!fit) rc = cli_parse_double("tree-opt", "--overhead-ms", optarg, 0, 1e6, &overhead);
      break;
    case 'h': fputs(usage, stdout); return 0;
    default: fputs(usage, stderr); return 2;
    }
  }
  if (rc) return rc;
  if ((overhead > 0 || fit) && !costs_path) {
    fprintf(stderr, "canopy: tree-opt: --overhead-ms is a step time: it needs --costs FILE\n");
    return 2;
  }
  if (optind != argc || !acc_path || size == 0 || size != (int)size || depth != (int)depth) {
    fprintf(stderr, "canopy: tree-opt: give --acceptance FILE and an integer --size N\n\n%s", usage);
    return 2;
  }

  cJSON *root;
  if (read_json(acc_path, &root)) return 1;
  const cJSON *overall = cJSON_GetObjectItemCaseSensitive(root, "overall");
  const cJSON *trees = cJSON_GetObjectItemCaseSensitive(overall, "trees");
  if (!cJSON_IsArray(trees)) {
    fprintf(stderr, "canopy: tree-opt: '%s' is not a results.json of canopy bench acceptance\n", acc_path);
    cJSON_Delete(root);
    return 1;
  }

  double p[CLI_TREE_OPT_MAX_NODES];
  int n_p = 0;
  const char *source = "";
  int ranked = 0;
  const cJSON *by_rank = cJSON_GetObjectItemCaseSensitive(overall, "accept_rate_by_rank");
  if (p1 < 0 && cJSON_IsArray(by_rank) && cJSON_GetArraySize(by_rank) > 0) {
    for (int k = 0; k < cJSON_GetArraySize(by_rank) && k < CLI_TREE_OPT_MAX_NODES; k++) {
      const cJSON *x = cJSON_GetArrayItem(by_rank, k);
      double v = cJSON_IsNumber(x) ? x->valuedouble : 0;
      p[n_p++] = v < 0 ? 0 : v > 1 ? 1 : v;
    }
    /* Ranks never tried: extrapolated with the decay. */
    for (; n_p < CLI_TREE_OPT_MAX_NODES; n_p++) p[n_p] = p[n_p - 1] * decay;
    source = "measured by child rank; untried ranks extrapolated with --rank-decay";
    ranked = 1;
  } else {
    if (p1 < 0) {
      double acc = 0, tried = 0;
      const cJSON *t;
      cJSON_ArrayForEach(t, trees) {
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(t, "tree");
        if (cJSON_IsString(name) && !strncmp(name->valuestring, "chain:", 6)) pool_tree(t, &acc, &tried);
      }
      source = "estimated from the chain trees";
      if (tried == 0) {
        cJSON_ArrayForEach(t, trees) pool_tree(t, &acc, &tried);
        source = "estimated from all trees (no chain measured: an overestimate)";
        fprintf(stderr, "canopy: tree-opt: no chain tree in '%s'; p1 from branching trees overestimates it\n",
                acc_path);
      }
      if (tried == 0) {
        fprintf(stderr, "canopy: tree-opt: '%s' has no speculative steps to estimate acceptance from\n", acc_path);
        cJSON_Delete(root);
        return 1;
      }
      p1 = acc / tried;
    } else {
      source = "given with --p1";
    }
    double pk = p1;
    for (n_p = 0; n_p < CLI_TREE_OPT_MAX_NODES; n_p++, pk *= decay) p[n_p] = pk;
  }

  cli_tree_costs costs = {.overhead_ms = overhead};
  if (costs_path && read_costs(costs_path, &costs)) {
    cJSON_Delete(root);
    return 1;
  }
  FILE *o = out_path ? stdout : stderr;
  const cJSON *t;
  cn_tree_spec ts;
  double mean_len, speedup;

  /* --overhead-ms fit: the median of what each measured static step paid beyond its modelled
   * forwards, so that one outlier (a burst of outside load) moves it little. */
  int n_fit = 0;
  if (fit) {
    double *res = malloc(sizeof *res * (size_t)(cJSON_GetArraySize(trees) + 1));
    cli_tree_opt_result tr;
    if (res)
      cJSON_ArrayForEach(t, trees) {
        if (!measured_static(t, &ts, &mean_len, &speedup) || speedup == 0) continue;
        tree_of_spec(&ts, &tr);
        tr.value = mean_len;
        res[n_fit++] = cli_tree_step_residual(&costs, &tr, speedup);
      }
    if (n_fit) {
      overhead = costs.overhead_ms = bench_median(res, n_fit); /* sorts res ascending */
      fprintf(o, "overhead fitted to %d measured static trees: %.4f ms a step (residuals %.4f .. %.4f ms)\n", n_fit,
              overhead, res[0], res[n_fit - 1]);
    } else {
      fprintf(stderr, "canopy: tree-opt: --overhead-ms fit: '%s' has no static tree with a measured speedup%s\n",
              acc_path, res ? "" : " (or out of memory)");
    }
    free(res);
    if (!n_fit) {
      cJSON_Delete(root);
      return 1;
    }
  }

  /* The model against the measurements: each static tree's predicted and measured lengths, and
   * with costs its predicted speedup (with the predicted and with the measured length, which
   * leaves the time model alone to blame) against the measured one. */
  cJSON_ArrayForEach(t, trees) {
    if (!measured_static(t, &ts, &mean_len, &speedup)) continue;
    double predicted = cli_tree_opt_eval(p, n_p, ts.n_nodes, ts.parent, ts.rank);
    fprintf(o, "%-20s predicted mean accepted length %.4f, measured %.4f",
            cJSON_GetObjectItemCaseSensitive(t, "tree")->valuestring, predicted, mean_len);
    if (costs_path) {
      cli_tree_opt_result tr;
      tree_of_spec(&ts, &tr);
      tr.value = predicted;
      double s_pred = cli_tree_speedup(&costs, &tr);
      tr.value = mean_len;
      double s_meas = cli_tree_speedup(&costs, &tr);
      fprintf(o, "; speedup predicted %.3fx (%.3fx with the measured length)", s_pred, s_meas);
      if (speedup > 0) fprintf(o, ", measured %.3fx", speedup);
    }
    fprintf(o, "\n");
  }
  cJSON_Delete(root);

  cli_tree_opt_result *r = malloc(sizeof *r);
  cli_tree_cost_row *per_size = costs_path ? malloc(sizeof *per_size * ((size_t)size + 1)) : NULL;
  double best_speedup = 0;
  int failed = !r || (costs_path && !per_size);
  if (!failed && costs_path) {
    cli_tree_opt_dp dp;
    failed = cli_tree_opt_dp_fill(p, n_p, (int)size, depth < size ? (int)depth : (int)size, &dp) ||
             (best_speedup = cli_tree_cost_search(&dp, &costs, r, per_size)) < 0;
    cli_tree_opt_dp_free(&dp);
  } else if (!failed) {
    failed = cli_tree_opt_solve(p, n_p, (int)size, (int)depth, r) != 0;
  }
  if (failed) {
    fprintf(stderr, "canopy: tree-opt: the dynamic program failed (out of memory?)\n");
    free(r);
    free(per_size);
    return 1;
  }
  double best_step = costs_path ? cli_tree_step_ms(&costs, r, r->value) : 0;
  if (costs_path) {
    fprintf(o, "the fastest tree of each size under %s (target alone: %.4f ms a token):\n", costs_path,
            cli_tree_cost_at(&costs.target, 1));
    fprintf(o, "%6s %6s %12s %10s %10s\n", "nodes", "depth", "mean length", "step ms", "speedup");
    for (int n = 1; n <= (int)size; n++)
      fprintf(o, "%6d %6d %12.4f %10.4f %9.3fx%s\n", n, per_size[n].depth, per_size[n].mean_len, per_size[n].step_ms,
              per_size[n].speedup, n == r->n_nodes ? "  <- fastest" : "");
  }
  free(per_size);

  /* The JSON, paths in depth order (every prefix before its extensions). */
  size_t cap = 64 * 1024, len = 0;
  char *json = malloc(cap);
  if (!json) {
    free(r);
    return 1;
  }
  len += (size_t)snprintf(json + len, cap - len, "{\"paths\": [");
  int first = 1;
  for (int d = 1; d <= r->depth; d++)
    for (int i = 1; i <= r->n_nodes; i++) {
      if (r->node_depth[i] != d) continue;
      int32_t path[CLI_TREE_OPT_MAX_DEPTH];
      int k = d;
      for (int a = i; a > 0; a = r->parent[a]) path[--k] = r->rank[a];
      len += (size_t)snprintf(json + len, cap - len, "%s[", first ? "" : ", ");
      first = 0;
      for (int j = 0; j < d; j++) len += (size_t)snprintf(json + len, cap - len, "%s%d", j ? ", " : "", path[j]);
      len += (size_t)snprintf(json + len, cap - len, "]");
    }
  len += (size_t)snprintf(json + len, cap - len, "],\n \"predicted_mean_accepted_len\": %.6f,\n \"p\": [", r->value);
  for (int k = 0; k < n_p && k < 8; k++) len += (size_t)snprintf(json + len, cap - len, "%s%.6f", k ? ", " : "", p[k]);
  len += (size_t)snprintf(json + len, cap - len, "],\n \"p_source\": \"%s\", \"size\": %d, \"max_depth\": %d", source,
                          r->n_nodes, (int)depth);
  if (costs_path)
    len += (size_t)snprintf(json + len, cap - len,
                            ",\n \"predicted_step_ms\": %.6f, \"predicted_speedup\": %.6f, \"overhead_ms\": %g, "
                            "\"overhead_fitted_to\": %d",
                            best_step, best_speedup, overhead, n_fit);
  len += (size_t)snprintf(json + len, cap - len, "}\n");

  cn_tree_spec spec;
  if (cn_tree_spec_parse(json, &spec) || spec.n_nodes != r->n_nodes || spec.depth != r->depth) {
    rc = cli_fail("the optimized tree does not parse back");
    goto done;
  }
  if (out_path) {
    if ((rc = cli_write_file("tree-opt", out_path, json))) goto done;
  } else {
    fputs(json, stdout);
  }
  int width[CLI_TREE_OPT_MAX_DEPTH + 1] = {0};
  for (int i = 1; i <= r->n_nodes; i++) width[r->node_depth[i]]++;
  if (ranked) {
    fprintf(o, "p =");
    for (int k = 0; k < n_p && k < 6; k++) fprintf(o, " %.4f", p[k]);
    fprintf(o, "%s (%s)\n", n_p > 6 ? " ..." : "", source);
  } else
    fprintf(o, "p_1 = %.4f (%s), p_k = p_1 * %.2f^(k-1)\n", p[0], source, decay);
  fprintf(o, "tree: %d nodes, depth %d, nodes per depth:", r->n_nodes, r->depth);
  for (int d = 1; d <= r->depth; d++) fprintf(o, " %d", width[d]);
  fprintf(o, "\npredicted mean accepted length: %.4f tokens per target forward\n", r->value);
  if (costs_path)
    fprintf(o, "predicted step: %.4f ms, %.3fx the target alone%s\n", best_step, best_speedup,
            best_speedup < 1 ? " (no tree is predicted to beat the target alone here)" : "");
  if (out_path) fprintf(o, "wrote %s (use it with --tree %s)\n", out_path, out_path);
done:
  free(json);
  free(r);
  return rc;
}
