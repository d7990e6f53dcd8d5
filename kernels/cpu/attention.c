/* Paged attention over a committed prefix plus the new tokens of this forward, with a causal or
 * tree mask. One online-softmax pass per (token, query head), as flash attention does, so no
 * score buffer of context length is needed and any context fits. */
#include "kernels/cpu/ops.h"

#include <math.h>
#include <string.h>

#define CN_MAX_HEAD_DIM 256

void cn_cpu_kv_write(const cn_cpu_paged_kv *kv, int first_slot, const float *k, const float *v, int n, int kv_dim) {
  for (int i = 0; i < n; i++) {
    int slot = first_slot + i;
    size_t row = (size_t)(slot % kv->block_size) * kv_dim;
    memcpy(kv->k_blocks[slot / kv->block_size] + row, k + (size_t)i * kv_dim, sizeof(float) * (size_t)kv_dim);
    memcpy(kv->v_blocks[slot / kv->block_size] + row, v + (size_t)i * kv_dim, sizeof(float) * (size_t)kv_dim);
  }
}

static int key_visible(const cn_cpu_attn_args *a, int i, int slot) {
  int key_pos;
  if (slot < a->ctx_len) {
    key_pos = slot;
  } else {
    int j = slot - a->ctx_len;
    if (a->tree_mask ? !((a->tree_mask[(size_t)i * a->mask_words + j / 64] >> (j % 64)) & 1) : j > i) return 0;
    key_pos = a->pos[j];
  }
  return a->sliding_window <= 0 || key_pos > a->pos[i] - a->sliding_window;
}

static void attend_one(void *arg, int item) {
  const cn_cpu_attn_args *a = arg;
  int i = item / a->n_heads, h = item % a->n_heads;
  int d = a->head_dim, kv_dim = a->n_kv_heads * d;
  int g = h / (a->n_heads / a->n_kv_heads);
  const float *q = a->q + ((size_t)i * a->n_heads + h) * d;
  float acc[CN_MAX_HEAD_DIM] = {0};
  float m = -INFINITY, l = 0;
  /* Causal tokens never look past their own slot; tree tokens may look at any earlier node. */
  int last = a->ctx_len + (a->tree_mask ? a->n - 1 : i);
  int bs = a->kv->block_size;
  for (int s = 0; s <= last; s++) {
    if (!key_visible(a, i, s)) continue;
    const float *k = a->kv->k_blocks[s / bs] + (size_t)(s % bs) * kv_dim + (size_t)g * d;
    const float *v = a->kv->v_blocks[s / bs] + (size_t)(s % bs) * kv_dim + (size_t)g * d;
    float score = 0;
    for (int t = 0; t < d; t++) score += q[t] * k[t];
    score *= a->scale;
    if (score > m) {
      float corr = expf(m - score); /* rescale what was accumulated under the old maximum */
      for (int t = 0; t < d; t++) acc[t] *= corr;
      l *= corr;
      m = score;
    }
    float p = expf(score - m);
    l += p;
    for (int t = 0; t < d; t++) acc[t] += p * v[t];
  }
  float *o = a->out + ((size_t)i * a->n_heads + h) * d;
  float inv = l > 0 ? 1.0f / l : 0.0f;
  for (int t = 0; t < d; t++) o[t] = acc[t] * inv;
}

void cn_cpu_attention(cn_threadpool *tp, const cn_cpu_attn_args *a) {
  cn_threadpool_run(tp, a->n * a->n_heads, attend_one, (void *)a);
}
