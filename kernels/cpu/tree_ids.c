/* The host twins of kernels/cuda/tree_ids.cu: a speculative step's token ids chained between
 * forwards, and greedy acceptance over a tree given as arrays. */
#include "kernels/cpu/ops.h"

void cn_cpu_gather_ids(int32_t *tokens, const int32_t *src, const int32_t *ids, int n) {
  for (int i = 0; i < n; i++)
    if (src[i] >= 0) tokens[i] = ids[src[i]];
}

int cn_cpu_accept_greedy(int32_t *out, const int32_t *tokens, const int32_t *top, const int32_t *parent, int n) {
  if (n < 1 || parent[0] >= 0) return -1;
  for (int i = 1; i < n; i++)
    if (parent[i] < 0 || parent[i] >= i) return -1;
  int a = 0, u = 0;
  for (;;) {
    int next = -1;
    for (int c = u + 1; c < n && next < 0; c++) /* children come after their parent */
      if (parent[c] == u && tokens[c] == top[u]) next = c;
    if (next < 0) break;
    out[2 + a] = next;
    out[2 + n + a] = tokens[next];
    a++;
    u = next;
  }
  out[0] = a;
  out[1] = top[u];
  return 0;
}
