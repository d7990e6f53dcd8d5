/* Row-wise and element-wise fp32 ops. */
#include "kernels/cpu/ops.h"
#include "kernels/cpu/exp_approx.h"

#include <math.h>
#include <string.h>

void cn_cpu_embed(float *x, const float *table, const int32_t *tokens, int n, int dim) {
  for (int i = 0; i < n; i++) memcpy(x + (size_t)i * dim, table + (size_t)tokens[i] * dim, sizeof(float) * (size_t)dim);
}

void cn_cpu_rmsnorm(float *out, const float *x, const float *w, int n, int dim, float eps) {
  for (int i = 0; i < n; i++) {
    const float *xi = x + (size_t)i * dim;
    float *oi = out + (size_t)i * dim;
    double ss = 0; /* double: the sum of 4k squares loses digits in fp32 and the twin must be exact */
    for (int j = 0; j < dim; j++) ss += (double)xi[j] * xi[j];
    float r = (float)(1.0 / sqrt(ss / dim + eps));
    for (int j = 0; j < dim; j++) oi[j] = xi[j] * r * w[j];
  }
}

void cn_cpu_rope(float *x, const int32_t *pos, int n, int n_heads, int head_dim, const float *inv_freq) {
  int half = head_dim / 2;
  for (int i = 0; i < n; i++) {
    for (int k = 0; k < half; k++) {
      /* HF computes the angle in fp32 as pos * inv_freq; doing the same keeps us bit-close. */
      float ang = (float)pos[i] * inv_freq[k];
      float c = cosf(ang), s = sinf(ang);
      for (int h = 0; h < n_heads; h++) {
        float *v = x + ((size_t)i * n_heads + h) * head_dim;
        float a = v[k], b = v[k + half];
        v[k] = a * c - b * s;
        v[k + half] = b * c + a * s;
      }
    }
  }
}

void cn_cpu_swiglu(float *out, const float *gate_up, int n, int d) {
  for (int i = 0; i < n; i++) {
    const float *g = gate_up + (size_t)i * 2 * d, *u = g + d;
    float *o = out + (size_t)i * d;
    for (int j = 0; j < d; j++) o[j] = g[j] / (1.0f + cn_exp_clamped(-g[j])) * u[j];
  }
}

void cn_cpu_add(float *x, const float *y, size_t n) {
  for (size_t i = 0; i < n; i++) x[i] += y[i];
}

int cn_cpu_argmax(const float *x, int n) {
  int best = 0;
  for (int i = 1; i < n; i++)
    if (x[i] > x[best]) best = i;
  return best;
}

/* a comes before b in the order the top-k lists: larger value, then lower index. */
static int top_before(float va, int a, float vb, int b) { return va > vb || (va == vb && a < b); }

void cn_cpu_top_k(const float *x, int n, int k, int32_t *ids, float *logp) {
  /* Insertion into a sorted list of k: k is a tree's branching (at most 32), n a vocabulary. */
  int have = 0;
  for (int i = 0; i < n; i++) {
    if (have == k && !top_before(x[i], i, x[ids[k - 1]], ids[k - 1])) continue;
    int at = have < k ? have++ : k - 1;
    while (at > 0 && top_before(x[i], i, x[ids[at - 1]], ids[at - 1])) {
      ids[at] = ids[at - 1];
      at--;
    }
    ids[at] = i;
  }
  if (!logp) return;
  float mx = x[ids[0]];
  double sum = 0;
  for (int i = 0; i < n; i++) sum += exp((double)x[i] - mx);
  float lse = mx + (float)log(sum);
  for (int j = 0; j < k; j++) logp[j] = x[ids[j]] - lse;
}
