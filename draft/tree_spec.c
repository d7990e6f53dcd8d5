#include "draft/tree_spec.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"

#define MAX_DRAFTED (CN_TREE_MAX_NODES - 1)
#define MAX_SPEC_FILE (16 << 20)

/* ---- the shape ------------------------------------------------------------------------------ */

static void shape_reset(cn_tree_spec *s) {
  memset(s, 0, sizeof *s);
  s->kind = CN_TREE_STATIC;
  s->parent[0] = -1;
  s->first_child[0] = -1;
}

/* Nodes must arrive in canonical BFS order (depth, then parent, then rank). */
static void shape_add(cn_tree_spec *s, int parent, int rank) {
  int i = ++s->n_nodes;
  s->parent[i] = parent;
  s->rank[i] = rank;
  s->node_depth[i] = s->node_depth[parent] + 1;
  s->first_child[i] = -1;
  s->n_children[i] = 0;
  if (s->n_children[parent]++ == 0) s->first_child[parent] = i;
  if (s->node_depth[i] > s->depth) s->depth = s->node_depth[i];
  int prev_rank = i == s->first_child[parent] ? -1 : s->rank[i - 1];
  if (rank != prev_rank + 1) s->rank_gaps = 1;
}

/* ---- chain: and static: --------------------------------------------------------------------- */

/* A whole number of digits only (no sign, no spaces), saturating at 1e9. */
static int parse_count(const char **p, long *v) {
  const char *q = *p;
  if (!isdigit((unsigned char)*q)) return -1;
  long x = 0;
  for (; isdigit((unsigned char)*q); q++)
    x = x > 100000000L ? 1000000000L : x * 10 + (*q - '0');
  *p = q;
  *v = x;
  return 0;
}

/* The per-depth branching shape: level d's nodes get branch[d] children each, in BFS order. */
static int build_branching(const char *text, const long *branch, int depth, cn_tree_spec *out) {
  long total = 0, width = 1;
  for (int d = 0; d < depth; d++) {
    width = width > 1000000000L / branch[d] ? 1000000000L : width * branch[d];
    total = total + width > 1000000000L ? 1000000000L : total + width;
  }
  if (total > MAX_DRAFTED)
    return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': %s%ld nodes, over the limit of %d", text,
                    total >= 1000000000L ? "at least " : "", total, MAX_DRAFTED);
  shape_reset(out);
  int level_start = 0, level_end = 1;
  for (int d = 0; d < depth; d++) {
    for (int p = level_start; p < level_end; p++)
      for (int r = 0; r < branch[d]; r++)
        shape_add(out, p, r);
    level_start = level_end;
    level_end = out->n_nodes + 1;
  }
  return CANOPY_OK;
}

static int parse_chain(const char *text, const char *arg, cn_tree_spec *out) {
  long k;
  if (parse_count(&arg, &k) || *arg)
    return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': chain:K needs a whole number K >= 1", text);
  if (k < 1) return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': a chain needs depth K >= 1", text);
  if (k > CN_TREE_MAX_DEPTH)
    return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': depth %ld is over the limit of %d", text, k,
                    CN_TREE_MAX_DEPTH);
  long ones[CN_TREE_MAX_DEPTH];
  for (int d = 0; d < k; d++)
    ones[d] = 1;
  return build_branching(text, ones, (int)k, out);
}

static int parse_static(const char *text, const char *arg, cn_tree_spec *out) {
  long branch[CN_TREE_MAX_DEPTH];
  int depth = 0;
  if (!*arg)
    return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': static: needs per-depth branching, e.g. static:4,2,1",
                    text);
  for (;;) {
    long b;
    if (parse_count(&arg, &b) || (*arg && *arg != ','))
      return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': branching entry %d is not a whole number", text,
                      depth + 1);
    if (b == 0)
      return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': branching 0 at depth %d (each entry must be >= 1)",
                      text, depth + 1);
    if (depth == CN_TREE_MAX_DEPTH)
      return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': depth over the limit of %d", text, CN_TREE_MAX_DEPTH);
    branch[depth++] = b;
    if (!*arg) break;
    arg++;
  }
  return build_branching(text, branch, depth, out);
}

/* ---- dynamic: ------------------------------------------------------------------------------- */

static int parse_dynamic(const char *text, const char *arg, cn_tree_spec *out) {
  long n, depth = CN_TREE_DEFAULT_DEPTH, topk = CN_TREE_DEFAULT_TOPK;
  if (parse_count(&arg, &n) || (*arg && *arg != ','))
    return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': dynamic:N needs a whole-number node budget N", text);
  while (*arg == ',') {
    arg++;
    long *dst = !strncmp(arg, "depth=", 6) ? &depth : !strncmp(arg, "topk=", 5) ? &topk : NULL;
    if (!dst) {
      int len = (int)strcspn(arg, ",");
      return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': unknown option '%.*s' (expected depth=D or topk=K)",
                      text, len, arg);
    }
    const char *key = arg;
    arg += dst == &depth ? 6 : 5;
    if (parse_count(&arg, dst) || (*arg && *arg != ','))
      return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': option '%.*s' needs a whole number", text,
                      (int)(strchr(key, '=') - key), key);
  }
  if (n < 1) return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': node budget 0 (N must be >= 1)", text);
  if (n > MAX_DRAFTED)
    return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': node budget %ld is over the limit of %d", text, n,
                    MAX_DRAFTED);
  if (depth < 1 || depth > CN_TREE_MAX_DEPTH)
    return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': depth %ld is outside 1..%d", text, depth,
                    CN_TREE_MAX_DEPTH);
  if (topk < 1 || topk > CN_TREE_MAX_TOPK)
    return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec '%.60s': topk %ld is outside 1..%d", text, topk,
                    CN_TREE_MAX_TOPK);
  shape_reset(out);
  out->kind = CN_TREE_DYNAMIC;
  out->n_nodes = (int)n;
  out->depth = (int)depth;
  out->topk = (int)topk;
  /* The tree the oracle sees holds every expanded node (draft/tree_grow.h): it must fit a cn_tree. */
  cn_tree_spec_bounds b = cn_tree_spec_get_bounds(out);
  if (b.oracle_nodes > CN_TREE_MAX_NODES)
    return cn_error(CANOPY_ERR_INVALID_ARG,
                    "tree spec '%.60s': expanding %d nodes on each of %ld levels feeds %d draft nodes, over the "
                    "limit of %d (lower depth or topk)",
                    text, b.max_frontier, depth - 1, b.oracle_nodes, CN_TREE_MAX_NODES);
  return CANOPY_OK;
}

/* ---- JSON rank paths ------------------------------------------------------------------------ */

typedef struct rank_path {
  int len;
  int src; /* position in the JSON list, for messages */
  int32_t r[CN_TREE_MAX_DEPTH];
} rank_path;

/* Canonical order: shorter first, then lexicographic, which is BFS order with siblings by rank. */
static int path_cmp(const void *a, const void *b) {
  const rank_path *x = a, *y = b;
  if (x->len != y->len) return x->len < y->len ? -1 : 1;
  for (int i = 0; i < x->len; i++)
    if (x->r[i] != y->r[i]) return x->r[i] < y->r[i] ? -1 : 1;
  return 0;
}

static const char *path_str(const int32_t *r, int len, char *buf, size_t cap) {
  size_t k = (size_t)snprintf(buf, cap, "[");
  for (int i = 0; i < len && k < cap; i++)
    k += (size_t)snprintf(buf + k, cap - k, i ? ",%d" : "%d", (int)r[i]);
  if (k < cap) snprintf(buf + k, cap - k, "]");
  return buf;
}

static int read_path(const char *label, const cJSON *item, int index, rank_path *out) {
  if (!cJSON_IsArray(item))
    return cn_error(CANOPY_ERR_INVALID_ARG, "%s: paths[%d] is not a list of ranks", label, index);
  int len = cJSON_GetArraySize(item);
  if (len == 0)
    return cn_error(CANOPY_ERR_INVALID_ARG, "%s: paths[%d] is empty (the root is implicit; list only drafted nodes)",
                    label, index);
  if (len > CN_TREE_MAX_DEPTH)
    return cn_error(CANOPY_ERR_INVALID_ARG, "%s: paths[%d] has depth %d, over the limit of %d", label, index, len,
                    CN_TREE_MAX_DEPTH);
  out->len = len;
  out->src = index;
  int i = 0;
  for (const cJSON *e = item->child; e; e = e->next, i++) {
    if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble))
      return cn_error(CANOPY_ERR_INVALID_ARG, "%s: paths[%d][%d] is not a whole-number rank", label, index, i);
    if (e->valuedouble < 0)
      return cn_error(CANOPY_ERR_INVALID_ARG, "%s: paths[%d][%d] is a negative rank (%.0f)", label, index, i,
                      e->valuedouble);
    if (e->valuedouble > CN_TREE_MAX_RANK)
      return cn_error(CANOPY_ERR_INVALID_ARG, "%s: paths[%d][%d]: rank %.0f is over the limit of %d", label, index, i,
                      e->valuedouble, CN_TREE_MAX_RANK);
    out->r[i] = (int32_t)e->valuedouble;
  }
  return CANOPY_OK;
}

static int shape_from_paths(const char *label, rank_path *paths, int n, cn_tree_spec *out) {
  char a[160], b[160];
  qsort(paths, (size_t)n, sizeof *paths, path_cmp);
  shape_reset(out);
  for (int i = 0; i < n; i++) {
    const rank_path *p = &paths[i];
    if (i && !path_cmp(&paths[i - 1], p))
      return cn_error(CANOPY_ERR_INVALID_ARG, "%s: paths[%d] = %s is listed twice", label, p->src,
                      path_str(p->r, p->len, a, sizeof a));
    int parent = 0;
    if (p->len > 1) {
      rank_path prefix = *p;
      prefix.len--;
      const rank_path *hit = bsearch(&prefix, paths, (size_t)i, sizeof *paths, path_cmp);
      if (!hit)
        return cn_error(CANOPY_ERR_INVALID_ARG, "%s: paths[%d] = %s: its prefix %s is not listed", label, p->src,
                        path_str(p->r, p->len, a, sizeof a), path_str(p->r, p->len - 1, b, sizeof b));
      parent = (int)(hit - paths) + 1;
    }
    shape_add(out, parent, p->r[p->len - 1]);
  }
  return CANOPY_OK;
}

static int parse_json(const char *label, const char *json, size_t len, cn_tree_spec *out) {
  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
  if (!root) {
    size_t at = end && end >= json && end <= json + len ? (size_t)(end - json) : 0;
    return cn_error(CANOPY_ERR_INVALID_ARG, "%s: not valid JSON (error near byte offset %zu)", label, at);
  }
  for (const char *p = end; p < json + len; p++)
    if (!isspace((unsigned char)*p) && *p) {
      cJSON_Delete(root);
      return cn_error(CANOPY_ERR_INVALID_ARG, "%s: not valid JSON (unexpected text at byte offset %zu)", label,
                      (size_t)(p - json));
    }
  const cJSON *list = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "paths") : root;
  int rc = CANOPY_OK;
  if (!cJSON_IsArray(list)) {
    rc = cn_error(CANOPY_ERR_INVALID_ARG, "%s: expected a list of rank paths or {\"paths\": [...]}", label);
  } else if (cJSON_GetArraySize(list) == 0) {
    rc =
        cn_error(CANOPY_ERR_INVALID_ARG, "%s: no paths (node budget 0; a tree needs at least one drafted node)", label);
  } else if (cJSON_GetArraySize(list) > MAX_DRAFTED) {
    rc = cn_error(CANOPY_ERR_INVALID_ARG, "%s: %d nodes, over the limit of %d", label, cJSON_GetArraySize(list),
                  MAX_DRAFTED);
  } else {
    rank_path paths[MAX_DRAFTED];
    int n = 0;
    for (const cJSON *e = list->child; e && !rc; e = e->next, n++)
      rc = read_path(label, e, n, &paths[n]);
    if (!rc) rc = shape_from_paths(label, paths, n, out);
  }
  cJSON_Delete(root);
  return rc;
}

static int parse_file(const char *path, cn_tree_spec *out) {
  char label[320];
  snprintf(label, sizeof label, "tree spec file '%.280s'", path);
  FILE *f = fopen(path, "rb");
  if (!f) {
    int err = errno;
    /* "name:..." that is no file is most likely a misspelt kind. */
    size_t word = strspn(path, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-");
    if (err == ENOENT && word > 0 && path[word] == ':')
      return cn_error(CANOPY_ERR_INVALID_ARG,
                      "tree spec '%.60s': unknown kind '%.*s' (expected chain:K, static:B1,B2,..., dynamic:N, "
                      "JSON rank paths or a JSON file)",
                      path, (int)word, path);
    return cn_error(CANOPY_ERR_IO, "%s: cannot open: %s", label, strerror(err));
  }
  char *buf = malloc(MAX_SPEC_FILE + 1);
  if (!buf) {
    fclose(f);
    return cn_error(CANOPY_ERR_NO_MEMORY, "%s: out of memory", label);
  }
  size_t len = fread(buf, 1, MAX_SPEC_FILE + 1, f);
  int rc = CANOPY_OK;
  if (ferror(f))
    rc = cn_error(CANOPY_ERR_IO, "%s: read failed: %s", label, strerror(errno));
  else if (len > MAX_SPEC_FILE)
    rc = cn_error(CANOPY_ERR_INVALID_ARG, "%s: larger than %d bytes; not a tree spec", label, MAX_SPEC_FILE);
  fclose(f);
  if (!rc) rc = parse_json(label, buf, len, out);
  free(buf);
  return rc;
}

int cn_tree_spec_parse(const char *text, cn_tree_spec *out) {
  if (!out) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_spec_parse: NULL output");
  const char *p = text ? text : "";
  while (isspace((unsigned char)*p))
    p++;
  if (!*p)
    return cn_error(CANOPY_ERR_INVALID_ARG, "tree spec is empty (expected chain:K, static:..., dynamic:N or JSON)");
  if (!strncmp(p, "chain:", 6)) return parse_chain(p, p + 6, out);
  if (!strncmp(p, "static:", 7)) return parse_static(p, p + 7, out);
  if (!strncmp(p, "dynamic:", 8)) return parse_dynamic(p, p + 8, out);
  if (*p == '[' || *p == '{') {
    char label[96];
    snprintf(label, sizeof label, "tree spec '%.40s%s'", p, strlen(p) > 40 ? "..." : "");
    return parse_json(label, p, strlen(p), out);
  }
  return parse_file(p, out);
}

/* ---- writing and bounds --------------------------------------------------------------------- */

int cn_tree_spec_write_json(const cn_tree_spec *s, const char *path) {
  if (!s || !path) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_spec_write_json: NULL argument");
  if (s->kind != CN_TREE_STATIC)
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_tree_spec_write_json: a dynamic spec has no fixed shape to write");
  FILE *f = fopen(path, "w");
  if (!f) return cn_error(CANOPY_ERR_IO, "tree spec file '%s': cannot write: %s", path, strerror(errno));
  fputs("{\"paths\": [\n", f);
  for (int i = 1; i <= s->n_nodes; i++) {
    int32_t r[CN_TREE_MAX_DEPTH];
    int len = s->node_depth[i];
    for (int a = i, k = len; a > 0; a = s->parent[a])
      r[--k] = s->rank[a];
    fputs("  [", f);
    for (int k = 0; k < len; k++)
      fprintf(f, k ? ", %d" : "%d", (int)r[k]);
    fputs(i < s->n_nodes ? "],\n" : "]\n", f);
  }
  fputs("]}\n", f);
  int bad = ferror(f);
  if (fclose(f) || bad) return cn_error(CANOPY_ERR_IO, "tree spec file '%s': write failed: %s", path, strerror(errno));
  return CANOPY_OK;
}

cn_tree_spec_bounds cn_tree_spec_get_bounds(const cn_tree_spec *s) {
  cn_tree_spec_bounds b = {.n_nodes = s->n_nodes, .depth = s->depth, .oracle_calls = s->depth};
  if (s->kind == CN_TREE_DYNAMIC) {
    /* Level 0 expands the root; each later level at most topk nodes, and never more than the
     * budget, since an expanded node is among the best N so far (draft/tree_grow.c). */
    int width = s->topk < s->n_nodes ? s->topk : s->n_nodes;
    b.max_frontier = s->depth > 1 ? width : 1;
    b.oracle_nodes = 1 + (s->depth - 1) * width;
    /* A sampled dynamic tree's oracle tree is the output (N + 1 nodes), though it feeds at most
     * as many as EAGLE-2 does. */
    if (b.oracle_nodes < s->n_nodes + 1) b.oracle_nodes = s->n_nodes + 1;
    return b;
  }
  b.oracle_nodes = s->n_nodes + 1;
  int per_depth[CN_TREE_MAX_DEPTH + 1] = {0};
  for (int i = 0; i <= s->n_nodes; i++)
    if (s->n_children[i] && ++per_depth[s->node_depth[i]] > b.max_frontier)
      b.max_frontier = per_depth[s->node_depth[i]];
  return b;
}

int cn_tree_spec_exact_for_sampling(const cn_tree_spec *s) { return !s->rank_gaps; }
