/* Paged attention over a committed prefix plus the new tokens of this forward, with a causal or
 * tree mask. Flash-attention style: keys are visited in chunks of ATTN_CHUNK with an online
 * softmax across chunks, so scratch stays bounded whatever the context length.
 *
 * Two ways to fill a chunk, one softmax between them:
 * - one new token (decode), or no scratch memory: one task per (token, query head) reads keys and
 *   values straight from their blocks with vectorised dot products and axpys;
 * - several new tokens (prefill, verify): one task per (kv head, tile of tokens) stacks the tile's
 *   rows of every query head sharing that kv head, gathers the chunk's keys and values into
 *   contiguous scratch and computes Q K^T and P V with single-threaded sgemm. A 512-token
 *   SmolLM2-135M prefill went from 19% to ~57% of the sgemm-bound (scalar per-key loops took
 *   more time than all the weight GEMMs). */
#include "kernels/cpu/ops.h"
#include "kernels/cpu/exp_approx.h"

#include <cblas.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define ATTN_CHUNK 256      /* keys per softmax chunk */
#define ATTN_TILE_ROWS 96   /* target query rows (tokens x heads) of one GEMM tile */
/* Fewer new tokens take the per-(token, head) path. Measured (9/3 heads, d 64, 500 cached
 * tokens, 2 threads): the GEMM tiles win from 2 tokens up (0.10 vs 0.12 ms, 12: 0.15 vs 0.60);
 * at 1 token attention is a few percent of a decode step and the direct path skips the gather. */
#define ATTN_GEMM_MIN_N 2
#define ATTN_LANES 16       /* independent accumulators: one AVX-512 vector, two AVX2 ones */
#define CN_CPU_MAX_HEAD_DIM 256

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
    if (a->tree_mask ? !((a->tree_mask[(size_t)i * a->mask_words + j / 64] >> (j % 64)) & 1) : j > a->q_offset + i)
      return 0;
    key_pos = a->pos[j];
  }
  return a->sliding_window <= 0 || key_pos > a->pos[a->q_offset + i] - a->sliding_window;
}

/* ---- vector helpers: plain C that gcc -O3 vectorises without -ffast-math (fixed lane counts
 * instead of reassociated reductions, a polynomial instead of the libm call) */

static float dot(const float *restrict x, const float *restrict y, int d) {
  float acc[ATTN_LANES] = {0};
  int t = 0;
  for (; t + ATTN_LANES <= d; t += ATTN_LANES)
    for (int l = 0; l < ATTN_LANES; l++) acc[l] += x[t + l] * y[t + l];
  for (; t < d; t++) acc[0] += x[t] * y[t];
  for (int w = ATTN_LANES / 2; w > 0; w /= 2)
    for (int l = 0; l < w; l++) acc[l] += acc[l + w];
  return acc[0];
}

static void axpy(float *restrict y, float a, const float *restrict x, int d) {
  for (int t = 0; t < d; t++) y[t] += a * x[t];
}

static void scale_row(float *y, float a, int d) {
  for (int t = 0; t < d; t++) y[t] *= a;
}

/* Largest of x[0..n), n >= 1. */
static float row_max(const float *x, int n) {
  float mx[ATTN_LANES];
  for (int l = 0; l < ATTN_LANES; l++) mx[l] = x[0];
  int j = 0;
  for (; j + ATTN_LANES <= n; j += ATTN_LANES)
    for (int l = 0; l < ATTN_LANES; l++) mx[l] = x[j + l] > mx[l] ? x[j + l] : mx[l];
  for (; j < n; j++) mx[0] = x[j] > mx[0] ? x[j] : mx[0];
  for (int w = ATTN_LANES / 2; w > 0; w /= 2)
    for (int l = 0; l < w; l++) mx[l] = mx[l + w] > mx[l] ? mx[l + w] : mx[l];
  return mx[0];
}

/* x[j] = exp(x[j] - m) for x[j] <= m (-INFINITY gives 0); returns the sum. */
static float exp_shifted_sum(float *x, int n, float m) {
  float sum[ATTN_LANES] = {0};
  int j = 0;
  for (; j + ATTN_LANES <= n; j += ATTN_LANES) {
    for (int l = 0; l < ATTN_LANES; l++) {
      float z = x[j + l] - m;
      float e = z < -87.0f ? 0.0f : cn_exp_clamped(z);
      x[j + l] = e;
      sum[l] += e;
    }
  }
  for (; j < n; j++) {
    x[j] = expf(x[j] - m);
    sum[0] += x[j];
  }
  for (int w = ATTN_LANES / 2; w > 0; w /= 2)
    for (int l = 0; l < w; l++) sum[l] += sum[l + w];
  return sum[0];
}

/* ---- tiles */

/* One task's work: query rows of tokens [i0, i0 + nt) x heads [h0, h0 + nh) (all sharing kv
 * head g), row r = token (i0 + r / nh), head (h0 + r % nh). */
typedef struct attn_tile {
  int i0, nt, h0, nh, g;
} attn_tile;

/* Per-task scratch, carved from one thread's slice. */
typedef struct attn_scratch {
  float *q;      /* [rows][d] the tile's queries */
  float *s;      /* [rows][ATTN_CHUNK] scores, then probabilities */
  float *o;      /* [rows][d] unnormalised output */
  float *k, *v;  /* [ATTN_CHUNK][d] gathered keys and values (GEMM path only) */
  float *m, *l;  /* [rows] running max and sum of exp */
  float *bias;   /* [ATTN_CHUNK] 0 or -INFINITY per key, for masks that are not a prefix */
} attn_scratch;

static size_t round16(size_t n) { return (n + 15) & ~(size_t)15; }

static int max_tile_rows(int grp) { return grp > ATTN_TILE_ROWS ? grp : ATTN_TILE_ROWS; }

static size_t scratch_layout(attn_scratch *sc, float *base, int rows, int d, int gemm) {
  size_t at = 0;
  float *p;
#define CARVE(n) (p = base ? base + at : NULL, at += round16(n), p)
  sc->q = CARVE((size_t)rows * d);
  sc->s = CARVE((size_t)rows * ATTN_CHUNK);
  sc->o = CARVE((size_t)rows * d);
  sc->k = gemm ? CARVE((size_t)ATTN_CHUNK * d) : NULL;
  sc->v = gemm ? CARVE((size_t)ATTN_CHUNK * d) : NULL;
  sc->m = CARVE((size_t)rows);
  sc->l = CARVE((size_t)rows);
  sc->bias = CARVE(ATTN_CHUNK);
#undef CARVE
  return at;
}

size_t cn_cpu_attention_scratch_floats(int n_heads, int n_kv_heads, int head_dim) {
  attn_scratch sc;
  return scratch_layout(&sc, NULL, max_tile_rows(n_heads / n_kv_heads), head_dim, 1);
}

static const float *k_row(const cn_cpu_attn_args *a, int slot, int g) {
  int bs = a->kv->block_size;
  return a->kv->k_blocks[slot / bs] + (size_t)(slot % bs) * a->n_kv_heads * a->head_dim + (size_t)g * a->head_dim;
}

static const float *v_row(const cn_cpu_attn_args *a, int slot, int g) {
  int bs = a->kv->block_size;
  return a->kv->v_blocks[slot / bs] + (size_t)(slot % bs) * a->n_kv_heads * a->head_dim + (size_t)g * a->head_dim;
}

static void attend_tile(const cn_cpu_attn_args *a, const attn_tile *t, const attn_scratch *sc, int gemm) {
  int d = a->head_dim, nh = t->nh, rows = t->nt * nh, row_stride = a->n_heads * d;
  int last_i = t->i0 + t->nt - 1;
  /* Causal tokens never look past their own slot; tree tokens may look at any earlier node. */
  int key_end = a->ctx_len + a->q_offset + (a->tree_mask ? a->n : last_i + 1);
  int key_begin = 0;
  int prefix_mask = !a->tree_mask && a->sliding_window <= 0; /* token i sees slots [0, ctx_len + i] */
  if (a->sliding_window > 0) {
    /* Committed slots at or below every row's pos - window are invisible to the whole tile. */
    const int32_t *qpos = a->pos + a->q_offset;
    int min_pos = qpos[t->i0];
    for (int i = t->i0; i <= last_i; i++) min_pos = qpos[i] < min_pos ? qpos[i] : min_pos;
    key_begin = min_pos - a->sliding_window + 1;
    key_begin = key_begin < 0 ? 0 : key_begin > a->ctx_len ? a->ctx_len : key_begin;
  }

  for (int r = 0; r < rows; r++) {
    memcpy(sc->q + (size_t)r * d, a->q + (size_t)(t->i0 + r / nh) * row_stride + (size_t)(t->h0 + r % nh) * d,
           sizeof(float) * (size_t)d);
    memset(sc->o + (size_t)r * d, 0, sizeof(float) * (size_t)d);
    sc->m[r] = -INFINITY;
    sc->l[r] = 0;
  }

  for (int c0 = key_begin; c0 < key_end; c0 += ATTN_CHUNK) {
    int nk = key_end - c0 < ATTN_CHUNK ? key_end - c0 : ATTN_CHUNK;
    if (gemm) {
      for (int j = 0; j < nk; j++) {
        memcpy(sc->k + (size_t)j * d, k_row(a, c0 + j, t->g), sizeof(float) * (size_t)d);
        memcpy(sc->v + (size_t)j * d, v_row(a, c0 + j, t->g), sizeof(float) * (size_t)d);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, nk, d, a->scale, sc->q, d, sc->k, d, 0.0f, sc->s,
                  ATTN_CHUNK);
    }
    for (int r = 0; r < rows; r++) {
      int i = t->i0 + r / nh;
      float *s = sc->s + (size_t)r * ATTN_CHUNK;
      /* Keys of this chunk row r may see: [0, hi) all visible, or per key through bias. */
      int hi = nk, dense = prefix_mask;
      if (prefix_mask) {
        hi = a->ctx_len + a->q_offset + i + 1 - c0;
        hi = hi > nk ? nk : hi;
      } else if (r % nh == 0) {
        for (int j = 0; j < nk; j++) sc->bias[j] = key_visible(a, i, c0 + j) ? 0.0f : -INFINITY;
      }
      if (hi <= 0) {
        memset(s, 0, sizeof(float) * (size_t)nk);
        continue;
      }
      if (!gemm) {
        const float *q = sc->q + (size_t)r * d;
        for (int j = 0; j < hi; j++) s[j] = dot(q, k_row(a, c0 + j, t->g), d) * a->scale;
      }
      if (!dense)
        for (int j = 0; j < hi; j++) s[j] += sc->bias[j];
      float mx = row_max(s, hi);
      if (mx == -INFINITY) { /* nothing visible in this chunk */
        memset(s, 0, sizeof(float) * (size_t)nk);
        continue;
      }
      float m_new = mx > sc->m[r] ? mx : sc->m[r];
      float corr = expf(sc->m[r] - m_new); /* rescales what was accumulated under the old maximum */
      sc->l[r] = sc->l[r] * corr + exp_shifted_sum(s, hi, m_new);
      sc->m[r] = m_new;
      if (corr != 1.0f) scale_row(sc->o + (size_t)r * d, corr, d);
      if (hi < nk) memset(s + hi, 0, sizeof(float) * (size_t)(nk - hi));
      if (!gemm)
        for (int j = 0; j < hi; j++)
          if (s[j] != 0.0f) axpy(sc->o + (size_t)r * d, s[j], v_row(a, c0 + j, t->g), d);
    }
    if (gemm)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d, nk, 1.0f, sc->s, ATTN_CHUNK, sc->v, d, 1.0f,
                  sc->o, d);
  }

  for (int r = 0; r < rows; r++) {
    float *o = a->out + (size_t)(t->i0 + r / nh) * row_stride + (size_t)(t->h0 + r % nh) * d;
    float inv = sc->l[r] > 0 ? 1.0f / sc->l[r] : 0.0f;
    for (int k = 0; k < d; k++) o[k] = sc->o[(size_t)r * d + k] * inv;
  }
}

/* ---- scheduling: one pool item per thread, each owning a slice of scratch and claiming tasks
 * from a shared counter (the pool does not say which thread runs an item). */

typedef struct attn_job {
  const cn_cpu_attn_args *a;
  float *scratch;   /* [n_items][slice] */
  size_t slice;
  int gemm, grp, tile_tokens, n_tiles, n_tasks;
  atomic_int next;
} attn_job;

static attn_tile task_tile(const attn_job *job, int task) {
  const cn_cpu_attn_args *a = job->a;
  if (!job->gemm) { /* (token, query head) */
    int i = task / a->n_heads, h = task % a->n_heads;
    return (attn_tile){i, 1, h, 1, h / job->grp};
  }
  /* Causal tiles further down see more keys: hand out the last ones first. */
  int tile = job->n_tiles - 1 - task / a->n_kv_heads, g = task % a->n_kv_heads;
  int i0 = tile * job->tile_tokens, nt = a->n - i0 < job->tile_tokens ? a->n - i0 : job->tile_tokens;
  return (attn_tile){i0, nt, g * job->grp, job->grp, g};
}

static void attend_item(void *arg, int item) {
  attn_job *job = arg;
  attn_scratch sc;
  float stack_buf[2 * CN_CPU_MAX_HEAD_DIM + ATTN_CHUNK * 2 + 64] __attribute__((aligned(64)));
  float *base = job->scratch ? job->scratch + (size_t)item * job->slice : stack_buf;
  scratch_layout(&sc, base, job->gemm ? job->grp * job->tile_tokens : 1, job->a->head_dim, job->gemm);
  for (;;) {
    int task = atomic_fetch_add(&job->next, 1);
    if (task >= job->n_tasks) return;
    attn_tile t = task_tile(job, task);
    attend_tile(job->a, &t, &sc, job->gemm);
  }
}

void cn_cpu_attention(cn_threadpool *tp, const cn_cpu_attn_args *a) {
  attn_job job = {.a = a, .grp = a->n_heads / a->n_kv_heads};
  int n_items = cn_threadpool_size(tp);
  float *owned = NULL;
  job.slice = cn_cpu_attention_scratch_floats(a->n_heads, a->n_kv_heads, a->head_dim);
  job.scratch = a->scratch;
  if (a->n >= ATTN_GEMM_MIN_N && !job.scratch) {
    void *p = NULL;
    if (posix_memalign(&p, 64, sizeof(float) * job.slice * (size_t)n_items) == 0) job.scratch = owned = p;
  }
  /* Without scratch (no memory) the per-(token, head) path still works from the stack. */
  job.gemm = a->n >= ATTN_GEMM_MIN_N && job.scratch;
  if (job.gemm) {
    job.tile_tokens = max_tile_rows(job.grp) / job.grp;
    job.n_tiles = (a->n + job.tile_tokens - 1) / job.tile_tokens;
    job.n_tasks = job.n_tiles * a->n_kv_heads;
  } else {
    job.n_tasks = a->n * a->n_heads;
  }
  if (n_items > job.n_tasks) n_items = job.n_tasks;
  atomic_init(&job.next, 0);
  /* Each task's GEMMs are small and already spread over the pool: OpenBLAS threading them too
   * would put pool and OpenBLAS threads on the same cores (measured 18x slower, 512 tokens). */
  int blas_threads = job.gemm ? openblas_get_num_threads() : 1;
  if (blas_threads > 1) openblas_set_num_threads(1);
  cn_threadpool_run(tp, n_items, attend_item, &job);
  if (blas_threads > 1) openblas_set_num_threads(blas_threads);
  free(owned);
}
