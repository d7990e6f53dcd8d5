/* bf16 CUDA ops: the device twins of kernels/cpu/ops.h. Nothing here knows about models.
 *
 * A plain C header, so that C code (the model, the cmocka tests) calls the launchers; the
 * kernels themselves live one op per .cu file (llm.c style: a __global__ function and a host
 * launcher each).
 *
 * Conventions:
 *  - every pointer argument of an op is a device pointer, including token ids, positions,
 *    inverse frequencies, block tables and tree masks (so a whole step can be captured in a
 *    CUDA graph later); only the cn_cuda_memcpy_* helpers touch host memory;
 *  - weights and the KV cache are bf16; activations are bf16 or fp32 as each launcher's dtype
 *    arguments say; all arithmetic accumulates in fp32;
 *  - every launcher returns a status (CANOPY_OK, or CANOPY_ERR_* with canopy_last_error() naming
 *    file:line and the CUDA/cuBLAS message). Launches are asynchronous on the context's stream:
 *    a fault inside a kernel surfaces at the next cn_cuda_sync or copy to the host;
 *  - n == 0 (nothing to do) is fine and launches nothing. */
#ifndef CANOPY_KERNELS_CUDA_CUDA_OPS_H
#define CANOPY_KERNELS_CUDA_CUDA_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/tree_dyn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Raw bf16 bits (the upper half of an IEEE fp32), as C sees them. */
typedef uint16_t cn_bf16;

typedef enum cn_cuda_dtype {
  CN_CUDA_F32 = 0,
  CN_CUDA_BF16 = 1,
} cn_cuda_dtype;

/* Bytes of one element of `dt`. */
size_t cn_cuda_dtype_size(cn_cuda_dtype dt);

/* ---- devices, contexts, memory ---------------------------------------------------------- */

/* Visible CUDA devices; 0 when there is no driver or no device (never an error). */
int cn_cuda_device_count(void);

/* One device's stream and cuBLAS handle, plus a scratch buffer for converting fp32 GEMM inputs
 * to bf16. Not thread-safe: one thread drives a context at a time. */
typedef struct cn_cuda_ctx cn_cuda_ctx;

int cn_cuda_ctx_create(int device, cn_cuda_ctx **out);
void cn_cuda_ctx_free(cn_cuda_ctx *ctx);

/* Waits for all work queued on the context's stream; reports any fault it raised. */
int cn_cuda_sync(cn_cuda_ctx *ctx);

/* Batch-invariant GEMMs (off by default): cuBLAS picks its kernel, tile shape and split-K by the
 * row count, so a row's result depends on how many rows share the call (a decode step's 1 row
 * rounds differently from the same token among a verification's 64). With this on, every
 * matmul runs with its rows padded up to a fixed bucket (64, then powers of two), so calls of up
 * to 64 rows run the same kernel on the same shape and each row comes out bit-identical whatever
 * the batch. Costs the padded rows' work and a copy of the output. */
int cn_cuda_set_batch_invariant(cn_cuda_ctx *ctx, int on);

/* Few-row GEMM fusions for calls of up to max_rows rows (0: off; < 0: the default, 1, which
 * CANOPY_CUDA_GEMV_FUSION_ROWS=k at creation overrides), outside batch-invariant mode: the
 * few-row GEMM kernel makes its own bf16 input (the RMSNorm of norm_matmul and ffn, the rounding
 * of an fp32 x) and applies ffn's SwiGLU in its epilogue, instead of separate kernels before and
 * after it (bias and residual add are always the few-row kernel's epilogue). The results are the
 * same bits either way, so the limit is a matter of speed: each block restages its input rows,
 * which pays at one row (and at two on CUDA cores, but tensor cores unfused beat that: see
 * cn_cuda_set_gemv_mma_rows; bench/RESULTS.md). */
int cn_cuda_set_gemv_fusion(cn_cuda_ctx *ctx, int max_rows);
int cn_cuda_gemv_fusion(const cn_cuda_ctx *ctx);

/* Past the fusion limit, cn_cuda_ffn of up to max_rows rows (< 0: the default, 8, every count the
 * few-row kernel takes; 0-2: none past the fusion limit; CANOPY_CUDA_GEMV_SWIGLU_ROWS=k at creation
 * overrides) still applies SwiGLU in the gate/up GEMM's epilogue, after a separate RMSNorm kernel:
 * no block restages its input, and the SwiGLU kernel and the fp32 gate/up round trip go. The same
 * bits as the separate kernels; H100, 3-8 row verification 4-6% faster on SmolLM2, 1.5% on
 * Llama-3-8B (bench/RESULTS.md). */
int cn_cuda_set_gemv_swiglu_rows(cn_cuda_ctx *ctx, int max_rows);
int cn_cuda_gemv_swiglu_rows(const cn_cuda_ctx *ctx);

/* The few-row GEMM runs its products on tensor cores (mma.sync) for calls of min_rows rows or more
 * (< 0: the default, 2, which CANOPY_CUDA_GEMV_MMA_ROWS=k at creation overrides), on CUDA cores
 * below; rows whose length is not a multiple of 8 always take the CUDA cores. The two forms round
 * differently, each alike for every row count it serves: with 1 (tensor cores always) or 9 (never)
 * a row's result is the same bits from 1 to 8 rows, so a greedy chain verified in up to 8 rows is
 * token for token the target's own decode; with the default a decode step (1 row) and a chain of 2+
 * rows may part at near-ties, for 1.2-1.9x faster 3-8 row steps on Llama-3-8B, and 2-row steps
 * 2.5% (Llama-3-8B) and 8-9% (SmolLM2-135M) faster than fused on CUDA cores (bench/RESULTS.md). */
int cn_cuda_set_gemv_mma_rows(cn_cuda_ctx *ctx, int min_rows);
int cn_cuda_gemv_mma_rows(const cn_cuda_ctx *ctx);

/* The sm_90 tree-attention kernel's 128-row tiles as two warpgroups of 64 rows each (on, the
 * default) or one warpgroup taking both (off; CANOPY_CUDA_TA_TWO_WG=0 at creation): twice the warps
 * a multiprocessor on the same shared memory, half the registers a thread. The same arithmetic per
 * row, so the same bits; on is 1-13% faster at 64-128 nodes on the H100 (bench/RESULTS.md). */
int cn_cuda_set_ta_two_wg(cn_cuda_ctx *ctx, int on);

/* The form of its 128-row tiles for KV heads of at most max_rows query rows (0: the default,
 * CN_CUDA_TA_WS_MAX_ROWS): mode 0, the two-warpgroup kernel above; 3 (the default,
 * CN_CUDA_TA_WS_MODE; CANOPY_CUDA_TA_WS=m at creation sets it), warp-specialised, one block a
 * multiprocessor: a producer warpgroup copies K/V tiles of 64 keys into six stages handed over by
 * mbarriers, and two consumer warpgroups take a row block each without a block barrier a tile,
 * each computing S = Q K^T of a tile while the P V of the tile before runs, the two issuing their
 * products in turn (ping-pong); the same arithmetic per row as mode 0, so the same bits. It
 * measured 3-8% faster than mode 0 on the H100 at 64 nodes (256 rows a KV head) and 3-9% slower
 * at 128 (bench/RESULTS.md, 2026-12-06), hence the row limit. 4: mode 3 with tiles of 128 keys
 * (registers moved from the producer to the consumers by setmaxnreg); a row's softmax then
 * rescales at other keys, so its bits differ (within rounding), and the batch-invariant plan takes
 * mode 3 instead. Mode 3 itself takes 128-key tiles for launches of one split whose sequences may
 * hold long_keys or more keys (args.max_keys), up to 512 rows (long_keys 0: never; negative: the
 * default, CN_CUDA_TA_WS_LONG_KEYS). Modes 1 and 2 (without ping-pong, and without the overlap)
 * were slower than 3 on every measured shape and are gone. */
int cn_cuda_set_ta_ws(cn_cuda_ctx *ctx, int mode, int max_rows, int long_keys);
#define CN_CUDA_TA_WS_MODE 3
#define CN_CUDA_TA_WS_MAX_ROWS 256
#define CN_CUDA_TA_WS_LONG_KEYS 8192

/* Its 64-row tiles (KV heads of fewer than 128 query rows: decode, trees of up to 31 nodes at GQA 4)
 * as two warpgroups that take half of every 64-key tile each, with an online softmax of their own,
 * merged at the block's end, for KV heads of min_rows to 127 rows (launch max_n x GQA ratio);
 * one warpgroup otherwise, and with min_rows 0 (CN_CUDA_TA_KEY_SPLIT_ROWS is the default;
 * CANOPY_CUDA_TA_KEY_SPLIT_ROWS=k at creation sets it). The sums run in another order, so a row's
 * bits then differ from one warpgroup's, and so between row counts on either side of min_rows:
 * batch-invariant mode (cn_cuda_set_batch_invariant) never splits the keys. */
int cn_cuda_set_ta_key_split(cn_cuda_ctx *ctx, int min_rows);
/* The default min_rows: from 40 rows (10 nodes at GQA 4) the split measured 1-6% faster on the
 * H100, below 32 up to 3% slower (bench/RESULTS.md, 2026-12-06). */
#define CN_CUDA_TA_KEY_SPLIT_ROWS 40

/* GEMMs of up to max_rows rows run the few-row kernel, larger ones cuBLAS (< 0 or above the
 * kernel's 8 rows: 8, the default; 0: cuBLAS always, which bench_gemm compares). */
int cn_cuda_set_gemv_max_rows(cn_cuda_ctx *ctx, int max_rows);

/* cuBLAS products (more than the few-row kernel's rows, up to 512) tuned by measurement, off by
 * default (CANOPY_CUDA_GEMM_TUNE=1 at creation turns it on): the first eager call of each shape
 * (rows, sizes, output type, accumulation, alignment) times cublasGemmEx's kernel and cuBLASLt's
 * heuristic candidates on its own operands, L2 flushed before each run, and keeps a candidate
 * that is at least 3% faster (gemm_tune.cuh). That call synchronises the stream; later calls and
 * captured graphs run the kept kernel, so each shape gives the same bits on every call. Not in
 * batch-invariant mode, whose products must not depend on a timing. */
int cn_cuda_set_gemm_tune(cn_cuda_ctx *ctx, int on);

/* One tuned shape: its key, how many kernels were timed (cublasGemmEx's included), whether a
 * cuBLASLt kernel was kept, and the median microseconds of cublasGemmEx's and of the kept one. */
typedef struct cn_cuda_gemm_plan_info {
  int n, in, out, y_bf16, accumulate, align;
  int candidates, lt;
  float us_default, us_kept;
} cn_cuda_gemm_plan_info;

/* The shapes tuned so far: copies up to max of them into out (which may be NULL) and returns how
 * many there are. */
int cn_cuda_gemm_plans(const cn_cuda_ctx *ctx, cn_cuda_gemm_plan_info *out, int max);

/* Preallocates the matmul scratch for fp32 inputs of up to `elems` elements, so that no
 * allocation happens later in a decode loop (it would otherwise grow on first use). */
int cn_cuda_reserve_scratch(cn_cuda_ctx *ctx, size_t elems);

/* ---- CUDA graphs -------------------------------------------------------------------------
 *
 * Between capture_begin and capture_end the context's ops are recorded, not run (nothing may
 * synchronise or allocate in between); the graph then replays them with the same arguments, so
 * whatever changes from one replay to the next must be in device memory the kernels read. */
typedef struct cn_cuda_graph cn_cuda_graph;
int cn_cuda_capture_begin(cn_cuda_ctx *ctx);
/* Ends the capture and instantiates it; on failure *out is NULL and the capture is discarded. */
int cn_cuda_capture_end(cn_cuda_ctx *ctx, cn_cuda_graph **out);
int cn_cuda_graph_launch(cn_cuda_ctx *ctx, const cn_cuda_graph *g);
void cn_cuda_graph_free(cn_cuda_graph *g);
/* Changes whenever the matmul scratch or the padded GEMM output is reallocated: graphs captured
 * before then read freed memory and must be dropped. */
unsigned cn_cuda_scratch_gen(const cn_cuda_ctx *ctx);

/* cudaMalloc / cudaFree on the context's device. Out of memory is CANOPY_ERR_NO_MEMORY with the
 * bytes asked for in the message. */
int cn_cuda_malloc(cn_cuda_ctx *ctx, void **p, size_t bytes);
void cn_cuda_free(cn_cuda_ctx *ctx, void *p);

/* Copies through the context's stream and waits for the copy, so the host buffer may be reused
 * (or read) when they return. */
int cn_cuda_memcpy_h2d(cn_cuda_ctx *ctx, void *dst, const void *src, size_t bytes);
int cn_cuda_memcpy_d2h(cn_cuda_ctx *ctx, void *dst, const void *src, size_t bytes);
/* Page-locked host memory, so that a cn_cuda_memcpy_h2d_async source may be rewritten only after
 * the stream has passed the copy (cn_cuda_sync). */
int cn_cuda_host_alloc(cn_cuda_ctx *ctx, void **p, size_t bytes);
void cn_cuda_host_free(cn_cuda_ctx *ctx, void *p);
/* Queues a copy on the stream and returns at once: src must stay unchanged until the stream has
 * passed it (page-locked memory from cn_cuda_host_alloc, for a real overlap). */
int cn_cuda_memcpy_h2d_async(cn_cuda_ctx *ctx, void *dst, const void *src, size_t bytes);
/* Device-to-device copy of `height` rows of `width` bytes between pitched buffers (asynchronous). */
int cn_cuda_memcpy_2d(cn_cuda_ctx *ctx, void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                      size_t height);
/* Sets bytes on the stream (asynchronous). 0xFF poisons both fp32 and bf16 buffers with NaN. */
int cn_cuda_memset(cn_cuda_ctx *ctx, void *p, int byte, size_t bytes);

/* Device-to-device copy on the stream (asynchronous). */
int cn_cuda_memcpy_d2d(cn_cuda_ctx *ctx, void *dst, const void *src, size_t bytes);

/* Device-event timing of the work queued on a context's stream between start and stop; stop
 * waits for it and gives the milliseconds. For the benchmarks. */
typedef struct cn_cuda_timer cn_cuda_timer;
int cn_cuda_timer_create(cn_cuda_ctx *ctx, cn_cuda_timer **out);
void cn_cuda_timer_free(cn_cuda_timer *t);
int cn_cuda_timer_start(cn_cuda_timer *t);
int cn_cuda_timer_stop(cn_cuda_timer *t, float *ms);

/* dst[i] = bf16(src[i]) rounding to nearest even, and back (exact). */
int cn_cuda_f32_to_bf16(cn_cuda_ctx *ctx, cn_bf16 *dst, const float *src, size_t n);
int cn_cuda_bf16_to_f32(cn_cuda_ctx *ctx, float *dst, const cn_bf16 *src, size_t n);

/* ---- ops (twins of kernels/cpu/ops.h) --------------------------------------------------- */

/* x[i] = table[tokens[i]]: x [n][dim] of x_dt, table [vocab][dim] bf16, tokens [n] (in range:
 * the caller checks ids against the vocabulary). */
int cn_cuda_embed(cn_cuda_ctx *ctx, void *x, cn_cuda_dtype x_dt, const cn_bf16 *table, const int32_t *tokens, int n,
                  int dim);

/* out[i] = x[i] / rms(x[i]) * w: x [n][dim] of x_dt, out [n][dim] of out_dt (may alias x when
 * the dtypes agree), w [dim] bf16. One block per row, fp32 sum of squares. */
int cn_cuda_rmsnorm(cn_cuda_ctx *ctx, void *out, cn_cuda_dtype out_dt, const void *x, cn_cuda_dtype x_dt,
                    const cn_bf16 *w, int n, int dim, float eps);

/* y = x W^T (+ bias) through cuBLAS (bf16 operands, fp32 compute): x [n][in] of x_dt (fp32 is
 * rounded to bf16 into the scratch buffer first), W [out][in] bf16, bias [out] bf16 or NULL,
 * y [n][out] of y_dt (must not alias x). */
int cn_cuda_matmul(cn_cuda_ctx *ctx, void *y, cn_cuda_dtype y_dt, const void *x, cn_cuda_dtype x_dt, const cn_bf16 *w,
                   const cn_bf16 *bias, int n, int in, int out);

/* Rotates each head of x [n][n_heads][head_dim] (dtype dt) in place by pos[i], HF Llama's
 * rotate_half pairing (element k with k + head_dim/2); inv_freq [head_dim/2] fp32. The angle is
 * pos * inv_freq in fp32, as HF and the CPU twin compute it. */
int cn_cuda_rope(cn_cuda_ctx *ctx, void *x, cn_cuda_dtype dt, const int32_t *pos, int n, int n_heads, int head_dim,
                 const float *inv_freq);

/* out [n][d] = silu(gate) * up, reading gate_up [n][2d] as [gate | up]; one dtype for both. */
int cn_cuda_swiglu(cn_cuda_ctx *ctx, void *out, const void *gate_up, cn_cuda_dtype dt, int n, int d);

/* x += y over n elements; x of x_dt (e.g. an fp32 residual stream), y of y_dt. */
int cn_cuda_add(cn_cuda_ctx *ctx, void *x, cn_cuda_dtype x_dt, const void *y, cn_cuda_dtype y_dt, size_t n);

/* ---- fused forms of the ops above, for the forward's hot path ------------------------------ */

/* y = rmsnorm(x) W^T (+ bias): x [n][in] fp32, norm_w [in] bf16; the normed rows go to the
 * scratch buffer in bf16 and straight into the GEMM. Twin: cn_cpu_rmsnorm, then cn_cpu_matmul. */
int cn_cuda_norm_matmul(cn_cuda_ctx *ctx, void *y, cn_cuda_dtype y_dt, const float *x, const cn_bf16 *norm_w, float eps,
                        const cn_bf16 *w, const cn_bf16 *bias, int n, int in, int out);

/* y += x W^T (+ bias): x [n][in] of x_dt, y [n][out] fp32 (the residual stream). Twin:
 * cn_cpu_matmul, then cn_cpu_add. */
int cn_cuda_matmul_add(cn_cuda_ctx *ctx, float *y, const void *x, cn_cuda_dtype x_dt, const cn_bf16 *w,
                       const cn_bf16 *bias, int n, int in, int out);

/* A whole feed-forward block on the residual stream x [n][dim] fp32:
 *   x += swiglu(rmsnorm(x, norm_w) W_gu^T + b_gu) W_down^T + b_down
 * with W_gu [2 d][dim] = [gate | up], W_down [dim][d], biases bf16 or NULL. gate_up [n][2 d] fp32
 * is workspace for the unfused path (more than 8 rows). Twin: cn_cpu_rmsnorm, cn_cpu_matmul,
 * cn_cpu_swiglu, cn_cpu_matmul, cn_cpu_add. */
int cn_cuda_ffn(cn_cuda_ctx *ctx, float *x, float *gate_up, const cn_bf16 *norm_w, float eps, const cn_bf16 *w_gu,
                const cn_bf16 *b_gu, const cn_bf16 *w_down, const cn_bf16 *b_down, int n, int dim, int d);

/* y += silu(gate) * up W^T (+ bias): gate_up [n][2d] fp32, W [out][d], y [n][out] fp32 (the
 * residual stream: the GEMM accumulates into it). Twin: cn_cpu_swiglu, cn_cpu_matmul, cn_cpu_add. */
int cn_cuda_swiglu_matmul_add(cn_cuda_ctx *ctx, float *y, const float *gate_up, const cn_bf16 *w, const cn_bf16 *bias,
                              int n, int d, int out);

/* out [n][d] bf16 = silu(gate) * up from gate_up [n][2d] fp32. */
int cn_cuda_swiglu_to_bf16(cn_cuda_ctx *ctx, cn_bf16 *out, const float *gate_up, int n, int d);

/* Splits qkv [n][(n_heads + 2 n_kv_heads) head_dim] fp32 into q [n][n_heads][head_dim],
 * k, v [n][n_kv_heads][head_dim], rotating q and k by pos[i] as cn_cuda_rope does. Twin: the
 * split, then cn_cpu_rope on q and k. */
int cn_cuda_qkv_rope(cn_cuda_ctx *ctx, float *q, float *k, float *v, const float *qkv, const int32_t *pos, int n,
                     int n_heads, int n_kv_heads, int head_dim, const float *inv_freq);

/* One layer of the paged bf16 KV cache as the kernels see it. Slot s of the sequence lives in
 * block block_table[s / block_size], row s % block_size:
 *   k + block_table[s / block_size] * block_stride + (s % block_size) * kv_dim
 * (likewise v). With the pool stored block-major [n_blocks][n_layers][K, V][block_size][kv_dim],
 * layer l has k = base + l * 2 * block_size * kv_dim, v = k + block_size * kv_dim and
 * block_stride = n_layers * 2 * block_size * kv_dim. */
typedef struct cn_cuda_paged_kv {
  cn_bf16 *k;                 /* this layer's K rows in block 0 */
  cn_bf16 *v;                 /* this layer's V rows in block 0 */
  const int32_t *block_table; /* [blocks of the sequence] device block ids */
  size_t block_stride;        /* elements from one block to the next */
  int block_size;             /* tokens per block */
} cn_cuda_paged_kv;

/* Writes n tokens' k, v [n][kv_dim] (dtype dt) into slots first_slot .. first_slot + n - 1. */
int cn_cuda_kv_write(cn_cuda_ctx *ctx, const cn_cuda_paged_kv *kv, int first_slot, const void *k, const void *v,
                     cn_cuda_dtype dt, int n, int kv_dim);
/* The same for a batch of sequences in one launch: token i goes to row slots[i] % block_size of
 * block slots[i] / block_size (slots [n] on the device, the block already looked up; the view's
 * block_table is unused), so a captured graph takes new slots from memory at every replay. */
int cn_cuda_kv_write_slots(cn_cuda_ctx *ctx, const cn_cuda_paged_kv *kv, const int32_t *slots, const void *k,
                           const void *v, cn_cuda_dtype dt, int n, int kv_dim);

/* cn_cuda_qkv_rope, with k and v written to the cache as cn_cuda_kv_write_slots would write them
 * (the same bf16 bits) instead of to buffers: one launch for both. q is written in q_dt: bf16 holds
 * exactly what tree attention reads of an fp32 q (it rounds Q to bf16 as it loads it). */
int cn_cuda_qkv_rope_kv(cn_cuda_ctx *ctx, void *q, cn_cuda_dtype q_dt, const float *qkv, const int32_t *pos, int n,
                        int n_heads, int n_kv_heads, int head_dim, const float *inv_freq, const cn_cuda_paged_kv *kv,
                        const int32_t *slots);

/* q/k/v of a layer's new tokens from the residual stream x [n][in] fp32: rmsnorm(x, norm_w), the
 * fused projection W [(n_heads + 2 n_kv_heads) head_dim][in] (+ bias), then as
 * cn_cuda_qkv_rope_kv. Up to 2 rows, within the fusion row limit (cn_cuda_set_gemv_fusion; 1 by
 * default), one kernel does it all, giving the same bits as cn_cuda_norm_matmul into qkv followed by
 * cn_cuda_qkv_rope_kv, which run otherwise (qkv [n][(n_heads + 2 n_kv_heads) head_dim] is their
 * workspace). */
int cn_cuda_norm_qkv_rope_kv(cn_cuda_ctx *ctx, void *q, cn_cuda_dtype q_dt, float *qkv, const float *x,
                             const cn_bf16 *norm_w, float eps, const cn_bf16 *w, const cn_bf16 *bias, int n, int in,
                             const int32_t *pos, int n_heads, int n_kv_heads, int head_dim, const float *inv_freq,
                             const cn_cuda_paged_kv *kv, const int32_t *slots);

/* Attention for one sequence, with the semantics of cn_cpu_attention: q [n][n_heads][head_dim]
 * and out the same shape, both of dtype dt. Past the ctx_len committed slots lie q_offset + n new
 * slots (q_offset written by earlier forwards of the step: a draft tree's upper levels); new slot
 * j has position pos[j] and query i is new slot q_offset + i. Query i sees every slot s < ctx_len
 * (position s) and new slot j when tree_mask == NULL: j <= q_offset + i (causal), else bit j of
 * tree_mask[i * mask_words + j / 64]. sliding_window > 0 also drops keys at positions
 * <= pos[q_offset + i] - sliding_window. Query head h reads kv head h / (n_heads / n_kv_heads).
 * head_dim <= 256. A query that sees no key gets zeros.
 *
 * This is the straightforward kernel (one block per (token, head), online softmax over the
 * prefix): every query head re-reads the prefix. cn_cuda_tree_attention below replaces it where
 * it can (head_dim 64 and 128); it stays as the fallback and as the benchmark's naive baseline. */
typedef struct cn_cuda_attn_args {
  void *out;
  const void *q;
  cn_cuda_dtype dt;
  cn_cuda_paged_kv kv;
  int n, ctx_len;
  const int32_t *pos;        /* [q_offset + n] */
  const uint64_t *tree_mask; /* [n][mask_words] or NULL */
  int mask_words;
  int n_heads, n_kv_heads, head_dim;
  int sliding_window;
  float scale;
  int q_offset;              /* 0 unless a draft tree's upper levels sit before the queries */
} cn_cuda_attn_args;
int cn_cuda_attention(cn_cuda_ctx *ctx, const cn_cuda_attn_args *a);

#define CN_CUDA_MAX_HEAD_DIM 256

/* ---- shared-prefix tree attention (DESIGN.md, "Tree attention") --------------------------
 *
 * Attention for a ragged batch of sequences in one launch, each with the semantics of
 * cn_cuda_attention: n_i queries (a tree level, a causal chunk, or one decode token) over the
 * sequence's ctx_len committed slots, q_offset slots an earlier forward of the step wrote, and
 * the queries' own slots, all in the paged bf16 cache (the new tokens' K/V are written there
 * first). The n_i x (n_heads / n_kv_heads) query rows that share a KV head are tiled 64 at a time
 * and each tile streams the keys past all its rows with tensor-core MMA (KV-guided grouping);
 * the key range is split across n_splits blocks (flash-decoding) and the partial softmax states
 * are merged exactly by a second kernel. Row tiles of one split run side by side (the fastest grid
 * index), so a prefix tile read by several row tiles comes from L2 after the first.
 *
 * CUDA graphs: everything that changes from step to step lives in device memory (the per-sequence
 * descriptors below, block tables, positions, masks); the launch itself depends only on n_seqs,
 * max_n and n_splits, which a caller fixes per bucket. Sequences with fewer queries, shorter
 * contexts or n = 0 leave blocks that exit at once. */

/* One sequence of a batch, as the kernel reads it from device memory. */
typedef struct cn_cuda_tree_seq {
  int32_t ctx_len;    /* committed slots 0 .. ctx_len - 1 (slot s has position s) */
  int32_t q_offset;   /* new slots before the queries' own (a draft tree's upper levels) */
  int32_t n;          /* queries, 0 .. max_n */
  int32_t row0;       /* row (token) of the first query in q and out */
  int32_t pos0;       /* new slot j has position pos[pos0 + j], j < q_offset + n */
  int32_t mask0;      /* -1: causal; else query i's bits are tree_mask[mask0 + i * mask_words ..] */
  int32_t mask_words; /* >= (q_offset + n + 63) / 64 when mask0 >= 0 */
  int32_t table0;     /* slot s lives in block block_tables[table0 + s / block_size] */
} cn_cuda_tree_seq;

/* Which kernel runs: AUTO takes the warpgroup-MMA (wgmma) kernel on sm_90 devices (H100, H200)
 * and the mma.sync kernel elsewhere; the others force one (forcing WGMMA off sm_90 is an error). */
typedef enum cn_cuda_tree_attn_impl {
  CN_CUDA_TA_AUTO = 0,
  CN_CUDA_TA_MMA_SYNC = 1,
  CN_CUDA_TA_WGMMA = 2,
} cn_cuda_tree_attn_impl;

typedef struct cn_cuda_tree_attn_args {
  void *out;                    /* [rows][n_heads][head_dim] of dt */
  const void *q;                /* [rows][n_heads][head_dim] of dt */
  cn_cuda_dtype dt;
  const cn_bf16 *k, *v;         /* this layer's K and V rows in block 0 (as cn_cuda_paged_kv) */
  size_t block_stride;          /* elements from one block to the next */
  int block_size;               /* tokens per block */
  const int32_t *block_tables;  /* concatenated block tables (device) */
  const int32_t *pos;           /* concatenated positions of the new slots (device) */
  const uint64_t *tree_mask;    /* concatenated mask rows (device), or NULL if every sequence is causal */
  const cn_cuda_tree_seq *seqs; /* [n_seqs] (device) */
  int n_seqs, max_n;            /* grid bucket: sequences, and the most queries any of them has */
  int max_keys;                 /* no sequence has more keys (ctx_len + q_offset + n): the plan's
                                   max_keys (0: not known; it only picks a kernel form) */
  int n_splits;                 /* key-range splits, 1 .. 256 (cn_cuda_tree_attn_plan) */
  int split_keys;               /* 0: each sequence's keys divided evenly among n_splits; else keys
                                   per split (a multiple of 64): split j holds keys [j split_keys,
                                   (j + 1) split_keys) of every sequence, so that how a query's
                                   keys are cut and merged, and so its rounding, does not depend on
                                   the other queries of the launch. A sequence with more keys than
                                   n_splits such splits hold falls back to the even division. */
  int n_heads, n_kv_heads, head_dim; /* head_dim 64 or 128 */
  int sliding_window;
  float scale;
  float *workspace;             /* cn_cuda_tree_attn_workspace() bytes (device), when n_splits > 1 */
  cn_cuda_tree_attn_impl impl;  /* AUTO (0) unless a test or benchmark picks a kernel */
  int row_tile;                 /* query rows a block: 0 lets the kernel pick (below); 64 or 128 force
                                   one (tests, benchmarks); 128 takes effect only with 128+ rows */
  int prefix_ready;             /* 1: the K/V of every sequence's keys below its ctx_len, and seqs,
                                   block_tables and pos, were complete before the kernel that
                                   precedes this launch on the stream began (true in a forward: earlier
                                   forwards and its upload wrote them). The kernel then requests its
                                   first prefix tiles before it waits for that kernel. 0: after. */
} cn_cuda_tree_attn_args;

/* Whether the tree kernel handles this head_dim (64 and 128); others take cn_cuda_attention. */
int cn_cuda_tree_attn_supported(int head_dim);

/* A split count that fills every resident block slot of the device once for a batch of n_seqs
 * sequences of at most max_n queries and max_keys keys (ctx_len + q_offset + n), for the kernel
 * AUTO picks; a caller that captures graphs passes bucketed values so that the count stays fixed.
 * At most 256. Row tiles: a KV head's rows (max_n n_heads / n_kv_heads) go 64 to a block, or 128
 * once there are 128+ of them and (wgmma kernel) the 128-row blocks of n_splits splits fill at
 * least three quarters of the device's two blocks a multiprocessor (one in the warp-specialised
 * form, cn_cuda_set_ta_ws); so this count also picks the tile. */
int cn_cuda_tree_attn_splits(const cn_cuda_ctx *ctx, int n_seqs, int max_n, int max_keys, int n_heads, int n_kv_heads,
                             int head_dim);

/* The split plan the engine launches with: the count cn_cuda_tree_attn_splits picks for max_keys
 * keys, then split_keys = max_keys / that count rounded up to whole 64-key units, and n_splits =
 * the splits max_keys keys then need. The count is taken as if a KV head's rows fit one 64-row
 * tile whenever they are fewer than 128, so launches with the same n_seqs and max_keys (a caller
 * passes a bucket) cut a token's keys at the same positions whether it is decoded alone or
 * verified in a tree of a few nodes: greedy speculation then matches target-only decoding bit for
 * bit in attention, below the rows where the key split starts (cn_cuda_set_ta_key_split; up to 9
 * nodes at GQA 4 by default, any count in batch-invariant mode). With `invariant` the plan ignores
 * the launch: split_keys is 256 (at most 256 splits, so up to 64k keys). */
void cn_cuda_tree_attn_plan(const cn_cuda_ctx *ctx, int n_seqs, int max_n, int max_keys, int n_heads, int n_kv_heads,
                            int head_dim, int invariant, int *n_splits, int *split_keys);

/* Bytes of workspace the partial softmax states of one launch take (0 when n_splits == 1). */
size_t cn_cuda_tree_attn_workspace(int n_seqs, int max_n, int n_splits, int n_heads, int n_kv_heads, int head_dim);

int cn_cuda_tree_attention(cn_cuda_ctx *ctx, const cn_cuda_tree_attn_args *a);

/* One contiguous copy inside a buffer, in elements: n elements from src to dst, staged at tmp. */
typedef struct cn_cuda_span {
  uint64_t dst, src, n;
  uint64_t tmp; /* where the span's elements wait in the tmp buffer (the sum of the earlier n) */
} cn_cuda_span;

/* Copies n_spans spans (device array) of elem_bytes-wide elements (2 or 4) inside base as if every
 * source were read before any destination is written: all sources go to tmp first (holding the
 * sum of the spans' n elements), then to their destinations. The KV pool's copy-on-write and
 * commit gathers; the CPU twin is the pool's memcpy. */
int cn_cuda_copy_spans(cn_cuda_ctx *ctx, void *base, size_t elem_bytes, const cn_cuda_span *spans, int n_spans,
                       void *tmp);

/* dst[i] = src[rows[i]] for i < n: rows of dim elements of dtype dt, rows [n] int32 on the
 * device; dst must not overlap the rows it reads. */
int cn_cuda_gather_rows(cn_cuda_ctx *ctx, void *dst, const void *src, cn_cuda_dtype dt, const int32_t *rows, int n,
                        int dim);

/* idx[r] = index of the largest of x[r][0 .. n) (the first on ties, as torch.argmax), for
 * rows r < rows; x of dtype dt, idx [rows] int32. One block per row, CUB block reduction. */
int cn_cuda_argmax(cn_cuda_ctx *ctx, int32_t *idx, const void *x, cn_cuda_dtype dt, int rows, int n);

/* ids [rows][k] = the k largest of each row x[r][0 .. n) in descending order (equal values: the
 * lower index first; cn_cpu_top_k's order), and when logp is not NULL, logp [rows][k] = their
 * log-softmax (fp32 log-sum-exp of the row). 1 <= k <= n. Device pointers. */
int cn_cuda_top_k(cn_cuda_ctx *ctx, int32_t *ids, float *logp, const void *x, cn_cuda_dtype dt, int rows, int n,
                  int k);

/* ids[r] = the token the sampling rule of cn_cpu_sample (kernels/cpu/ops.h: logits / T, top_k
 * (0: all), top_p, renormalise; argmax when temperature == 0) draws from logits [rows][V] fp32 with
 * the uniform u[r] in [0, 1), for r < rows; ids [rows] int32 and u [rows] double on the device.
 * With the same u the CPU twin picks the same token unless u lies within rounding of a step of the
 * CDF (accumulated in id order) or the top-p mass within rounding of a prefix sum. The workspace
 * (device, cn_cuda_sample_workspace bytes for at least these rows and V) holds the sorted rows;
 * it is only touched when top_k or top_p cut something. */
int cn_cuda_sample(cn_cuda_ctx *ctx, int32_t *ids, const float *logits, int rows, int V, float temperature, int top_k,
                   float top_p, const double *u, void *workspace, size_t workspace_bytes);
int cn_cuda_sample_workspace(cn_cuda_ctx *ctx, int rows, int V, size_t *bytes);
/* dst[r] [V] = the rule's distribution of logits row r (cn_cpu_sample_probs), for r < rows;
 * dst a device array of device row pointers; temperature > 0. Equal to the CPU's but where the
 * mass sums in another order (the last bit of a float, rarely). Workspace as cn_cuda_sample. */
int cn_cuda_sample_probs(cn_cuda_ctx *ctx, float *const *dst, const float *logits, int rows, int V, float temperature,
                         int top_k, float top_p, void *workspace, size_t workspace_bytes);

/* ---- sampled token trees (kernels/cuda/tree_sampled.cu; twins in kernels/cpu/tree_sampled.c) --- */

/* ids [rows][k] = cn_cpu_draw_distinct of row r's distribution q[r] ([V], a device array of
 * device row pointers) with the uniforms u [rows][k] (device); bit-equal to the CPU twin (the
 * same block sums in the same order). One block a row; k <= 32. */
int cn_cuda_draw_distinct(cn_cuda_ctx *ctx, int32_t *ids, const float *const *q, const double *u, int rows, int V,
                          int k);

/* cn_cpu_accept_sampled over n_seqs trees of n nodes in all (parent valid, checked on the host):
 * p [n][V] the target's distributions, q [n] device pointers to the draft's rows (NULL: none), u
 * [2 n], scratch [2 n_seqs][V], out [2 n_seqs + 2 n]; all device. The draws are the CPU's; the
 * masses sum in another order, so a test within rounding of its threshold may go the other way.
 * A walk the CPU would refuse (a row without mass, no q where a node has children) writes -1 as
 * its count. One block a sequence. */
int cn_cuda_accept_sampled(cn_cuda_ctx *ctx, int32_t *out, const int32_t *tokens, const int32_t *parent, int n,
                           int n_seqs, const float *p, const float *const *q, const double *u, int V, float *scratch);

/* dst[i] = element i of a random weight tensor of the given stream (kernels/random_init.h):
 * bf16(mean + scale * u), u uniform on [-1, 1); bit-equal to cn_cpu_random_weights. */
int cn_cuda_random_bf16(cn_cuda_ctx *ctx, cn_bf16 *dst, size_t n, uint64_t stream, float scale, float mean);

/* ---- a speculative step chained between forwards (kernels/cuda/tree_ids.cu) ------------------ */

/* tokens[i] = ids[src[i]] where src[i] >= 0, for i < n (cn_cpu_gather_ids). */
int cn_cuda_gather_ids(cn_cuda_ctx *ctx, int32_t *tokens, const int32_t *src, const int32_t *ids, int n);

/* Greedy acceptance of n_seqs token trees of n nodes in all, as cn_cpu_accept_greedy: out
 * [2 n_seqs + 2 n] receives each sequence's accepted count, bonus, accepted nodes and their
 * tokens. parent must be valid (the caller checks it on the host), with n_seqs roots. One block a
 * sequence. */
int cn_cuda_accept_greedy(cn_cuda_ctx *ctx, int32_t *out, const int32_t *tokens, const int32_t *top,
                          const int32_t *parent, int n, int n_seqs);

/* A dynamic tree grown where the picks are (kernels/cuda/tree_dyn.cu; twins cn_cpu_dyn_grow and
 * cn_cpu_dyn_stage). w is the state in device ids; top and logp the level's device top ids and
 * log-probabilities [rows][k]. One block each. */
int cn_cuda_dyn_grow(cn_cuda_ctx *ctx, int32_t *w, const cn_dyn_layout *l, int level, const int32_t *top,
                     const float *logp, int k);
/* As cn_cpu_dyn_stage, with the positions twice: rope's pos and the attention's attn_pos (draft
 * level: every tree slot's, [level K]; verification: [T], equal to pos). */
int cn_cuda_dyn_stage(cn_cuda_ctx *ctx, const int32_t *w, const cn_dyn_layout *l, int level, int pos0, uint64_t *mask,
                      int32_t *pos, int32_t *attn_pos, int32_t *parent, int32_t *tokens);

/* An event to order two contexts' streams: recorded on one, waited for on another (or by the
 * host), so that one model's forward may read ids another model's forward wrote. */
typedef struct cn_cuda_event cn_cuda_event;
int cn_cuda_event_create(cn_cuda_ctx *ctx, cn_cuda_event **out);
void cn_cuda_event_free(cn_cuda_event *ev);
/* Marks the work queued on ctx's stream so far. */
int cn_cuda_event_record(cn_cuda_ctx *ctx, cn_cuda_event *ev);
/* Later work on ctx's stream waits for the work ev marked (at once if it was never recorded). */
int cn_cuda_event_wait(cn_cuda_ctx *ctx, const cn_cuda_event *ev);
/* The host waits for the work ev marked. */
int cn_cuda_event_sync(cn_cuda_event *ev);

#ifdef __cplusplus
}
#endif
#endif
