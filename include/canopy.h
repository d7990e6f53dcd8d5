/* canopy: a speculative-decoding inference engine for large language models.
 *
 * This is the only header a user includes. Conventions:
 *  - every function that can fail returns a status (CANOPY_OK == 0); on failure
 *    canopy_last_error() gives one line naming the file, tensor, field or offset at fault;
 *  - handles are opaque; whoever creates one frees it with the matching *_free;
 *  - parameter structs come from *_default_params() so that new fields never break callers.
 *
 * A minimal program:
 *
 *   canopy_model *m; canopy_tokenizer *t; canopy_session *s;
 *   canopy_model_params mp = canopy_model_default_params();
 *   if (canopy_model_load("models/SmolLM2-135M-Instruct", &mp, &m)) die(canopy_last_error());
 *   canopy_tokenizer_load("models/SmolLM2-135M-Instruct", &t);
 *   canopy_session_params sp = canopy_session_default_params();
 *   canopy_session_create(m, &sp, &s);
 *   int32_t ids[256]; int n;
 *   canopy_tokenize(t, "Hello", 5, 0, ids, 256, &n);
 *   canopy_session_append(s, ids, n);
 *   int32_t tok;
 *   while (canopy_session_next(s, &tok) == CANOPY_OK) { ... }
 */
#ifndef CANOPY_H
#define CANOPY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CANOPY_VERSION "0.1.0"
#define CANOPY_VERSION_MAJOR 0
#define CANOPY_VERSION_MINOR 1
#define CANOPY_VERSION_PATCH 0

/* ---- status codes ------------------------------------------------------------------------ */

typedef enum canopy_status {
  CANOPY_OK = 0,
  CANOPY_DONE = 1,               /* not an error: generation ended (end-of-sequence or limit) */
  CANOPY_ERR_INVALID_ARG = -1,   /* a NULL handle, a negative count, a bad option value */
  CANOPY_ERR_IO = -2,            /* a file could not be opened, read or mapped */
  CANOPY_ERR_FORMAT = -3,        /* a malformed safetensors, config.json or tokenizer.json */
  CANOPY_ERR_SHAPE = -4,         /* a tensor's shape disagrees with the config */
  CANOPY_ERR_DTYPE = -5,         /* a tensor dtype canopy cannot read */
  CANOPY_ERR_UNSUPPORTED = -6,   /* an architecture, tokenizer or template canopy does not know */
  CANOPY_ERR_NO_MEMORY = -7,     /* host or device allocation failed */
  CANOPY_ERR_KV_EXHAUSTED = -8,  /* the paged KV pool has no free block left */
  CANOPY_ERR_CONTEXT = -9,       /* the sequence would exceed the context length */
  CANOPY_ERR_UTF8 = -10,         /* text that is not valid UTF-8 */
  CANOPY_ERR_VOCAB_MISMATCH = -11, /* a draft whose vocabulary differs from the target's */
  CANOPY_ERR_BUFFER = -12,       /* an output buffer is too small; the needed size is reported */
  CANOPY_ERR_DEVICE = -13,       /* a CUDA or cuBLAS call failed */
  CANOPY_ERR_CANCELLED = -14,    /* the caller's callback asked to stop */
} canopy_status;

/* The message of the last failure on this thread ("" if none). Valid until the next failure. */
const char *canopy_last_error(void);

/* A short constant name for a status code. */
const char *canopy_status_string(int status);

/* ---- models ------------------------------------------------------------------------------ */

typedef struct canopy_model canopy_model;

/* Where a model's weights, KV cache and forward live. */
typedef enum canopy_device {
  CANOPY_DEVICE_CPU = 0,  /* fp32 on the host (the reference) */
  CANOPY_DEVICE_CUDA = 1, /* bf16 weights and KV cache on CUDA device 0, fp32 activations */
} canopy_device;

typedef struct canopy_model_params {
  int n_threads;       /* CPU worker threads; 0 = one per online core */
  int max_context;     /* tokens per sequence; 0 = the model's max_position_embeddings */
  int kv_block_size;   /* tokens per KV block (default 16) */
  int kv_blocks;       /* blocks in the pool shared by all sessions; 0 = enough for 4 full contexts */
  int prefix_cache;    /* reuse cached KV blocks of identical prompt prefixes (default 1) */
  int n_layers;        /* load only the first n layers (plus the head): a truncated model, the
                          cheapest stand-in draft for its own target; 0 = all */
  int device;          /* a canopy_device (default CANOPY_DEVICE_CPU). CUDA without a visible
                          device (or in a build without CUDA) is CANOPY_ERR_DEVICE; device memory
                          running out is CANOPY_ERR_NO_MEMORY naming the bytes */
  const char *random_weights; /* a config.json path: build a model of that shape with random
                          weights (std 0.02, norms ~1, a hash of random_seed and the element, the
                          same on every device) instead of reading a checkpoint; `dir` is then
                          unused and may be NULL. For benchmarks of shapes with no weights at hand */
  uint64_t random_seed;
  int cuda_graphs;     /* CUDA: forwards kept captured as CUDA graphs and replayed (one launch a
                          step instead of ~12 a layer), least recently used dropped first; a shape
                          is captured the second time it is seen. Default 64; 0 = off */
} canopy_model_params;

canopy_model_params canopy_model_default_params(void);

/* Loads a Hugging Face model folder (config.json + model.safetensors, or a sharded checkpoint
 * with model.safetensors.index.json). Supported: LlamaForCausalLM (Llama 2/3, SmolLM2),
 * MistralForCausalLM, Qwen2ForCausalLM; dtypes F32, F16, BF16. */
int canopy_model_load(const char *dir, const canopy_model_params *params, canopy_model **out);
void canopy_model_free(canopy_model *model);

typedef struct canopy_model_info {
  const char *architecture; /* e.g. "LlamaForCausalLM" */
  int vocab_size, hidden_size, n_layers, n_heads, n_kv_heads, head_dim, intermediate_size;
  int max_context;          /* the context canopy will allow (after max_context clamping) */
  int64_t n_params;         /* parameters held (tied embeddings counted once) */
  int64_t weight_bytes;     /* bytes of weights in the backend's dtype */
  int bos_token_id;         /* -1 if none */
  int n_eos;                /* end-of-sequence ids from config.json / generation_config.json */
  int eos_token_ids[8];
  int64_t n_forwards;       /* forward passes run so far (one per batch, however many sequences) */
} canopy_model_info;

int canopy_model_get_info(const canopy_model *model, canopy_model_info *info);

/* ---- tokenizer --------------------------------------------------------------------------- */

typedef struct canopy_tokenizer canopy_tokenizer;

/* `path` is a tokenizer.json file or a folder holding tokenizer.json (and optionally
 * tokenizer_config.json, which gives the chat template and the bos/eos tokens). A loaded
 * tokenizer is read-only: threads may share it. */
int canopy_tokenizer_load(const char *path, canopy_tokenizer **out);
void canopy_tokenizer_free(canopy_tokenizer *tok);

int canopy_tokenizer_vocab_size(const canopy_tokenizer *tok);

/* Encodes UTF-8 text. Added/special tokens written in the text (e.g. "<|im_start|>") are
 * matched first. `add_special` adds the tokenizer's bos token where its post-processor would.
 * Invalid UTF-8 is CANOPY_ERR_UTF8 (the message gives the byte offset). If `cap` is too small,
 * returns CANOPY_ERR_BUFFER and sets *n_out to the number needed. */
int canopy_tokenize(const canopy_tokenizer *tok, const char *text, size_t len, int add_special,
                    int32_t *ids, int cap, int *n_out);

/* Decodes ids to UTF-8 (special tokens included as their text unless skip_special). Writes at
 * most cap-1 bytes plus a NUL; CANOPY_ERR_BUFFER with *len_out = bytes needed if too small. */
int canopy_detokenize(const canopy_tokenizer *tok, const int32_t *ids, int n, int skip_special,
                      char *buf, size_t cap, size_t *len_out);

/* The id of a token's exact text (an added token such as "<|im_end|>"), or -1. */
int canopy_token_id(const canopy_tokenizer *tok, const char *text);

/* A streaming decoder: push ids one at a time, get back only complete UTF-8 characters. */
typedef struct canopy_detok_stream canopy_detok_stream;
int canopy_detok_stream_create(const canopy_tokenizer *tok, int skip_special,
                               canopy_detok_stream **out);
/* Appends the text that became complete with `id` to buf (NUL-terminated); *len_out bytes.
 * On CANOPY_ERR_BUFFER the id is not consumed: retry it with a larger buffer. */
int canopy_detok_stream_push(canopy_detok_stream *s, int32_t id, char *buf, size_t cap,
                             size_t *len_out);
/* Whatever is left (an incomplete character becomes U+FFFD, as HF's decoder does). */
int canopy_detok_stream_flush(canopy_detok_stream *s, char *buf, size_t cap, size_t *len_out);
void canopy_detok_stream_free(canopy_detok_stream *s);

typedef struct canopy_chat_message {
  const char *role;    /* "system", "user" or "assistant" */
  const char *content;
} canopy_chat_message;

/* Renders messages with the model's chat template (tokenizer_config.json). ChatML, Llama 3 and
 * Llama 2 / Mistral [INST] templates are recognised. *out is malloc'd; free with free(). */
int canopy_chat_apply(const canopy_tokenizer *tok, const canopy_chat_message *msgs, int n,
                      int add_generation_prompt, char **out);

/* ---- sampling ---------------------------------------------------------------------------- */

typedef struct canopy_sampling_params {
  float temperature; /* 0 = greedy (argmax) */
  int top_k;         /* 0 = off */
  float top_p;       /* 1 = off */
  uint64_t seed;     /* the same seed gives the same tokens */
} canopy_sampling_params;

canopy_sampling_params canopy_sampling_default_params(void);

/* ---- sessions: one sequence being generated ---------------------------------------------- */

typedef struct canopy_session canopy_session;

typedef struct canopy_session_params {
  canopy_sampling_params sampling;
  int max_tokens;      /* new tokens before CANOPY_DONE; 0 = until the context is full */
  int stop_at_eos;     /* end at the model's eos ids (default 1) */
  /* Speculative decoding: a draft model with the target's vocabulary proposes a token tree of
   * shape `tree` each step; the target verifies it in one forward. The output is the target's
   * own (greedy), or distributed exactly as the target's sampling. NULL draft: target only.
   * tree: "chain:K", "static:4,2,2,1", "dynamic:N[,depth=D,topk=K]", a JSON list of rank paths,
   * or the path of a file holding one. */
  canopy_model *draft;
  const char *tree;
} canopy_session_params;

canopy_session_params canopy_session_default_params(void);

int canopy_session_create(canopy_model *model, const canopy_session_params *params,
                          canopy_session **out);
/* Releases the session's KV blocks (shared prefix blocks stay cached for others). */
void canopy_session_free(canopy_session *s);

/* Appends tokens (a prompt, or a user turn) and runs them through the model in one batched
 * forward, reusing cached KV blocks of an identical prefix. CANOPY_ERR_CONTEXT if the sequence
 * would exceed the context; CANOPY_ERR_KV_EXHAUSTED if the pool is full. */
int canopy_session_append(canopy_session *s, const int32_t *ids, int n);

/* Chooses the next token from the current logits with the session's sampling parameters,
 * feeds it back through the model, and returns it in *token. Returns CANOPY_DONE (with *token
 * set to -1) once max_tokens are out or an eos token was chosen (the eos is not fed back). */
int canopy_session_next(canopy_session *s, int32_t *token);

/* Steps several sessions of one model together, the way a server does: every session that needs
 * the target for its next tokens gets them from ONE target forward over a ragged batch (each
 * speculative session its own drafted tree, each plain session its one pending token); after it,
 * canopy_session_next returns those tokens without running the model. The trees are drafted
 * together too: each round is one draft forward holding every session's next tree level (or
 * catch-up tokens) for all sessions that share a draft model. A session just given a prompt gets
 * its first token from the prompt's logits (no forward). Sessions that still hold tokens or have
 * finished sit the step out, as do sessions whose largest possible tree no longer fits the
 * model's batch (they go in a later call: each call starts its search one session further on, so
 * none waits forever). A steady-state step allocates no memory. *n_stepped (may be NULL) receives
 * how many produced tokens: 0 when all are done. */
int canopy_sessions_step(canopy_session *const *sessions, int n, int *n_stepped);

/* How many tokens canopy_session_next will return without running the model (produced by a
 * speculative or batched step and not yet taken). */
int canopy_session_ready(const canopy_session *s);

/* The logits of the last position fed (vocab_size floats, owned by the session). */
int canopy_session_logits(const canopy_session *s, const float **logits, int *n_vocab);

/* Drops the sequence back to its first `len` tokens (KV blocks past it are released). */
int canopy_session_truncate(canopy_session *s, int len);

#define CANOPY_STATS_MAX_DEPTH 32

typedef struct canopy_stats {
  int n_prompt;           /* tokens given to canopy_session_append */
  int n_reused;           /* of those, served from the prefix cache without a forward */
  int n_generated;        /* tokens returned by canopy_session_next */
  int forward_passes;     /* target forwards run (prefill chunks, decode steps, verifications) */
  double prefill_s;       /* seconds in append forwards */
  double decode_s;        /* seconds in next: forwards, drafting, acceptance, sampling */
  /* Speculative decoding (zero without a draft). */
  int spec_steps;         /* verification forwards */
  int spec_tokens;        /* tokens those steps produced: accepted nodes + one bonus each */
  int draft_forwards;     /* draft model forwards (catch-up and one per tree level) */
  double draft_s, verify_s;
  int tree_nodes;         /* drafted nodes verified, over all steps (root excluded) */
  /* accept_depth[d]: steps whose accepted path reached depth d + 1; offered_depth[d]: steps
   * whose tree had a node at depth d + 1. Their ratio is the acceptance rate by depth. */
  int accept_depth[CANOPY_STATS_MAX_DEPTH];
  int offered_depth[CANOPY_STATS_MAX_DEPTH];
  /* By child rank, over the nodes the acceptance walk visited: offered_rank[k] counts visits
   * where the child of rank k was tried (all lower ranks rejected), accept_rank[k] those where it
   * was accepted. Their ratio is Sequoia's positional acceptance p_k, what canopy tree-opt uses. */
  int accept_rank[CANOPY_STATS_MAX_DEPTH];
  int offered_rank[CANOPY_STATS_MAX_DEPTH];
} canopy_stats;

int canopy_session_get_stats(const canopy_session *s, canopy_stats *stats);
int canopy_session_len(const canopy_session *s);

#ifdef __cplusplus
}
#endif
#endif
