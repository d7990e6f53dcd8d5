/* The host twins of kernels/cuda/tree_ids.cu: a speculative step's token ids chained between
 * forwards, and greedy acceptance over trees given as arrays. */
#include "kernels/cpu/ops.h"

void cn_cpu_gather_ids(int32_t *tokens, const int32_t *src, const int32_t *ids, int n) {
  for (int i = 0; i < n; i++)
    if (src[i] >= 0) tokens[i] = ids[src[i]];
}

/* One tree of m nodes (local parents) into out [2 + 2 m]. */
static void accept_one(int32_t *out, const int32_t *tokens, const int32_t *top, const int32_t *parent, int m) {
  int a = 0, u = 0;
  for (;;) {
    int next = -1;
    for (int c = u + 1; c < m && next < 0; c++) /* children come after their parent */
      if (parent[c] == u && tokens[c] == top[u]) next = c;
    if (next < 0) break;
    out[2 + a] = next;
    out[2 + m + a] = tokens[next];
    a++;
    u = next;
  }
  out[0] = a;
  out[1] = top[u];
}

int cn_cpu_tree_batch_bad(const int32_t *parent, int n) {
  if (n < 1 || parent[0] != -1) return 0;
  for (int i = 1, f = 0; i < n; i++) {
    if (parent[i] == -1) f = i;
    else if ((parent[i] < 0 && parent[i] != -2) || parent[i] >= i - f) return i;
  }
  return -1;
}

int cn_cpu_tree_end(const int32_t *parent, int n, int f) {
  int e = f + 1;
  while (e < n && parent[e] != -1) e++;
  return e;
}

int cn_cpu_accept_greedy(int32_t *out, const int32_t *tokens, const int32_t *top, const int32_t *parent, int n) {
  if (cn_cpu_tree_batch_bad(parent, n) >= 0) return -1;
  int seqs = 0;
  for (int f = 0; f < n; seqs++) {
    int e = cn_cpu_tree_end(parent, n, f);
    accept_one(out + 2 * seqs + 2 * f, tokens + f, top + f, parent + f, e - f);
    f = e;
  }
  return seqs;
}
