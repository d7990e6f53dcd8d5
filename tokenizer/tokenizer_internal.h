/* The tokenizer's internal contracts: a Hugging Face tokenizer.json read into flat tables.
 *
 * Encoding runs the same stages as the `tokenizers` package, in the same order, so that ids are
 * identical: added tokens are split out of the raw text (added_tokens.c), the rest is normalized
 * (normalize.c), split into pre-tokens (pretokenize.c), and each pre-token is merged by BPE
 * (bpe.c); the post-processor then adds bos/eos (postprocess.c). Decoding runs the decoder chain
 * (decode.c). Chat templates are recognised, not interpreted (chat_template.c). */
#ifndef CANOPY_TOKENIZER_INTERNAL_H
#define CANOPY_TOKENIZER_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "canopy.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

typedef struct cJSON cJSON;

/* ---- growable buffers ----------------------------------------------------------------------- */

typedef struct cn_buf {
  char *p;
  size_t n, cap;
} cn_buf;

typedef struct cn_ivec {
  int32_t *p;
  size_t n, cap;
} cn_ivec;

/* Grows *p (an array of `elem`-byte items, *cap of them) to hold at least `need` items. */
int cn_grow(void **p, size_t *cap, size_t need, size_t elem);
int cn_buf_reserve(cn_buf *b, size_t need);          /* room for `need` more bytes */
int cn_buf_append(cn_buf *b, const void *p, size_t n);
int cn_ivec_push(cn_ivec *v, int32_t x);
int cn_ivec_append(cn_ivec *v, const int32_t *p, size_t n);

/* A chunked arena: pointers into it stay valid until cn_arena_reset. */
typedef struct cn_arena_block cn_arena_block;
typedef struct cn_arena {
  cn_arena_block *head;
} cn_arena;
char *cn_arena_alloc(cn_arena *a, size_t n);
void cn_arena_reset(cn_arena *a); /* keeps the first block */
void cn_arena_free(cn_arena *a);

/* ---- UTF-8 (utf8.c) ------------------------------------------------------------------------- */

/* Offset of the first byte that is not part of valid UTF-8, or `len` if all of it is valid. */
size_t cn_utf8_valid_prefix(const char *s, size_t len);
/* Length of the UTF-8 character that starts with byte c (1 for a stray byte). */
static inline int cn_utf8_len(unsigned char c) {
  return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
}
/* Decodes the (valid) character at s; *n gets its length. */
uint32_t cn_utf8_decode(const char *s, int *n);
/* Start of the character that ends at s[end) (end > 0, valid UTF-8). */
static inline size_t cn_utf8_prev(const char *s, size_t end) {
  size_t j = end - 1;
  while (j && ((unsigned char)s[j] & 0xC0) == 0x80) j--;
  return j;
}
int cn_utf8_encode(uint32_t cp, char *out); /* returns 1..4 */
/* Appends bytes to out the way Rust's String::from_utf8_lossy does: each maximal ill-formed
 * subsequence becomes one U+FFFD. With `partial`, a trailing sequence that is still a valid
 * prefix of a character is left out, and its length returned in *held (else *held = 0). */
int cn_utf8_lossy_append(cn_buf *out, const char *s, size_t len, int partial, size_t *held);
/* Unicode character classes as Rust and Python see them. */
int cn_is_numeric(uint32_t cp);    /* Rust char::is_numeric: Nd, Nl, No */
int cn_is_word_char(uint32_t cp);  /* Rust regex \w */
int cn_is_white_space(uint32_t cp); /* Unicode White_Space (Rust \s, Oniguruma \s) */
int cn_py_isspace(uint32_t cp);    /* Python str.isspace (Jinja's trim) */

/* ---- hash tables (hashmap.c) ------------------------------------------------------------------ */

/* String -> id, open addressing over xxHash3; the strings live in the map's own blob. */
typedef struct cn_strmap_entry {
  uint32_t off, len; /* in blob */
  int32_t val;
  uint32_t hash;
} cn_strmap_entry;

typedef struct cn_strmap {
  uint32_t *slots; /* (mask+1) entry index + 1; 0 = empty */
  uint32_t mask;
  cn_strmap_entry *ent;
  uint32_t n, ent_cap;
  cn_buf blob;
} cn_strmap;

int cn_strmap_init(cn_strmap *m, size_t expected);
void cn_strmap_free(cn_strmap *m);
/* Inserts or overwrites (the last value wins, like a HashMap built by collect()). */
int cn_strmap_put(cn_strmap *m, const char *s, size_t len, int32_t val);
int32_t cn_strmap_get(const cn_strmap *m, const char *s, size_t len); /* -1 if absent */
static inline const char *cn_strmap_key(const cn_strmap *m, uint32_t i) { return m->blob.p + m->ent[i].off; }

/* (left id, right id) -> (rank, merged id): the BPE merge table. */
typedef struct cn_pairmap {
  uint64_t *keys; /* (mask+1) left << 32 | right; UINT64_MAX = empty */
  uint32_t *rank;
  int32_t *merged;
  uint32_t mask, n;
} cn_pairmap;

int cn_pairmap_init(cn_pairmap *m, size_t expected);
void cn_pairmap_free(cn_pairmap *m);
void cn_pairmap_put(cn_pairmap *m, int32_t a, int32_t b, uint32_t rank, int32_t merged);
static inline uint32_t cn_pair_slot(uint64_t key, uint32_t mask) {
  key ^= key >> 29;
  key *= 0xbf58476d1ce4e5b9ull;
  return (uint32_t)(key >> 32) & mask;
}
static inline int cn_pairmap_get(const cn_pairmap *m, int32_t a, int32_t b, uint32_t *rank, int32_t *merged) {
  uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
  for (uint32_t i = cn_pair_slot(key, m->mask);; i = (i + 1) & m->mask) {
    if (m->keys[i] == key) {
      *rank = m->rank[i];
      *merged = m->merged[i];
      return 1;
    }
    if (m->keys[i] == UINT64_MAX) return 0;
  }
}

/* ---- regexes (regex.c) ---------------------------------------------------------------------- */

/* A compiled Hugging Face pattern (Oniguruma syntax) run by PCRE2 in UTF + UCP mode with JIT. */
typedef struct cn_regex {
  pcre2_code *code;
  int jit;
} cn_regex;

/* `what` names the JSON field for the error message. */
int cn_regex_compile(cn_regex *re, const char *pattern, size_t len, int literal, const char *what);
void cn_regex_free(cn_regex *re);
/* Per-call matching state (pcre2 match data and JIT stack). */
typedef struct cn_rx_state {
  pcre2_match_data *md;
  pcre2_match_context *mctx;
  pcre2_jit_stack *stack;
} cn_rx_state;
int cn_rx_state_init(cn_rx_state *st);
void cn_rx_state_free(cn_rx_state *st);

/* The (start, end, is_match) spans a pattern cuts a string into, as tokenizers' find_matches. */
typedef struct cn_span {
  uint32_t start, end;
  int is_match;
} cn_span;

typedef struct cn_spans {
  cn_span *p;
  size_t n, cap;
} cn_spans;

int cn_regex_spans(const cn_regex *re, cn_rx_state *st, const char *s, size_t len, cn_spans *out);
int cn_spans_push(cn_spans *v, size_t start, size_t end, int is_match);

/* ---- normalizers (normalize.c) ----------------------------------------------------------------- */

enum { CN_NORM_PREPEND, CN_NORM_REPLACE, CN_NORM_NFC, CN_NORM_NFD, CN_NORM_NFKC, CN_NORM_NFKD, CN_NORM_LOWERCASE,
       CN_NORM_STRIP };

typedef struct cn_norm {
  int type;
  char *a;        /* Prepend: the prefix; Replace: the literal pattern */
  size_t a_len;
  char *b;        /* Replace: the content */
  size_t b_len;
  cn_regex re;    /* Replace with a Regex pattern */
  int use_regex;
  int left, right; /* Strip */
} cn_norm;

typedef struct cn_scratch cn_scratch;
typedef struct canopy_tokenizer canopy_tokenizer;

/* Parses the "normalizer" field (null, one normalizer, or a Sequence). */
/* The shared head of the component parsers (normalizers, pre-tokenizers, post-processors,
 * decoders): checks that j is an object with a string "type". A "Sequence" is flattened by
 * calling parse on each element of j[list] and returns 1; otherwise *type is set and 0 is
 * returned for the caller to go on. Errors name the field. */
typedef int (*cn_tok_component_parser)(canopy_tokenizer *t, const cJSON *j, const char *field);
int cn_tok_component(canopy_tokenizer *t, const cJSON *j, const char *field, const char *list,
                     cn_tok_component_parser parse, const char **type);

int cn_norm_parse(canopy_tokenizer *t, const cJSON *j, const char *field);
/* Runs the normalizers over s; the result is s itself or a string in the scratch arena. */
int cn_normalize(const canopy_tokenizer *t, cn_scratch *sc, const char *s, size_t len, const char **out,
                 size_t *out_len);

/* ---- pre-tokenizers (pretokenize.c) ------------------------------------------------------------ */

enum { CN_PT_SPLIT, CN_PT_DIGITS, CN_PT_BYTELEVEL, CN_PT_METASPACE };
enum { CN_SPLIT_ISOLATED, CN_SPLIT_REMOVED, CN_SPLIT_MERGED_PREV, CN_SPLIT_MERGED_NEXT, CN_SPLIT_CONTIGUOUS };
enum { CN_PREPEND_ALWAYS, CN_PREPEND_FIRST, CN_PREPEND_NEVER };

typedef struct cn_pretok {
  int type;
  int behavior, invert; /* Split */
  cn_regex re;          /* Split pattern; ByteLevel's GPT-2 regex when use_regex */
  int individual_digits;
  int add_prefix_space, use_regex; /* ByteLevel */
  uint32_t repl;                   /* Metaspace replacement character */
  char repl_s[4];
  int repl_len, prepend_scheme, split;
} cn_pretok;

/* A pre-token: bytes, and whether it starts at offset 0 of the original text (Metaspace's
 * prepend_scheme "first" needs that) and still awaits the byte-level mapping. */
enum { CN_PIECE_AT_ORIGIN = 1, CN_PIECE_BYTELEVEL = 2 };
typedef struct cn_piece {
  const char *s;
  uint32_t len, flags;
} cn_piece;

typedef struct cn_pieces {
  cn_piece *p;
  size_t n, cap;
} cn_pieces;

int cn_pretok_parse(canopy_tokenizer *t, const cJSON *j, const char *field);
/* Splits `in` into `out` with every pre-tokenizer in turn. */
int cn_pretokenize(const canopy_tokenizer *t, cn_scratch *sc, cn_pieces *in, cn_pieces *out);

/* ---- the GPT-2 byte <-> unicode map (byte_level.c) --------------------------------------------- */

typedef struct cn_byte_level {
  char utf8[256][3]; /* each byte's character, UTF-8, NUL-padded */
  uint8_t len[256];
  int16_t byte_of[512]; /* code point (< 512) -> byte, or -1 */
} cn_byte_level;

void cn_byte_level_init(cn_byte_level *bl);

/* ---- added tokens (added_tokens.c) ------------------------------------------------------------- */

typedef struct cn_added {
  int32_t id;
  char *content;
  size_t len;
  uint8_t single_word, lstrip, rstrip, normalized, special;
} cn_added;

/* A byte trie over added-token contents, for leftmost-longest matching. */
typedef struct cn_trie_node {
  int32_t child, sibling; /* node indexes, -1 = none */
  int32_t tok;            /* index into cn_added_set.tok ending here, or -1 */
  uint8_t byte;
} cn_trie_node;

typedef struct cn_trie {
  cn_trie_node *nodes;
  size_t n, cap;
  int32_t first[256]; /* root children by first byte */
} cn_trie;

typedef struct cn_added_set {
  cn_added *tok;
  int n;
  cn_trie raw;  /* normalized: false, matched on the raw text */
  cn_trie norm; /* normalized: true, matched on the normalized text (content normalized too) */
  cn_strmap by_content;
} cn_added_set;

/* One piece of text after splitting out added tokens: text, or an added token's id. */
typedef struct cn_segment {
  uint32_t start, end;
  int32_t id; /* -1 for text */
} cn_segment;

typedef struct cn_segments {
  cn_segment *p;
  size_t n, cap;
} cn_segments;

int cn_added_parse(canopy_tokenizer *t, const cJSON *arr);
/* Builds the tries (after the normalizer is parsed, since normalized tokens are matched in their
 * normalized form). */
int cn_added_build(canopy_tokenizer *t, cn_scratch *sc);
void cn_added_free(cn_added_set *a);
/* tokenizers' AddedVocabulary::find_matches: covers s with text and token segments. */
int cn_added_split(const cn_added_set *a, const cn_trie *trie, const char *s, size_t len, cn_segments *out);

/* ---- BPE (bpe.c) ------------------------------------------------------------------------------ */

typedef struct cn_bpe {
  cn_pairmap merges;
  int byte_fallback, fuse_unk, ignore_merges;
  int32_t unk_id;          /* -1 if none */
  int32_t byte_tok[256];   /* id of "<0xXX>", or -1 */
  int32_t bl_char_id[256]; /* id of each byte's byte-level character, or -1 */
} cn_bpe;

int cn_bpe_parse(canopy_tokenizer *t, const cJSON *model);
void cn_bpe_free(cn_bpe *b);
/* Appends the ids of one pre-token. */
int cn_bpe_encode(const canopy_tokenizer *t, cn_scratch *sc, const cn_piece *pc, cn_ivec *out);

/* Per-word results, so that frequent words skip the merge loop. */
typedef struct cn_wcache_entry {
  uint64_t hash;
  uint32_t key_off, key_len, ids_off, ids_len;
} cn_wcache_entry;

typedef struct cn_wcache {
  uint32_t *slots; /* (mask+1) entry index + 1 */
  uint32_t mask;
  cn_wcache_entry *ent;
  uint32_t n, max;
  cn_buf keys;
  cn_ivec ids;
} cn_wcache;

void cn_wcache_free(cn_wcache *c);

/* ---- post-processors (postprocess.c) ---------------------------------------------------------- */

typedef struct cn_post {
  cn_ivec prefix, suffix; /* ids around a single sequence when add_special is set */
} cn_post;

int cn_post_parse(canopy_tokenizer *t, const cJSON *j);

/* ---- decoders (decode.c) ---------------------------------------------------------------------- */

enum { CN_DEC_BYTELEVEL, CN_DEC_BYTEFALLBACK, CN_DEC_FUSE, CN_DEC_STRIP, CN_DEC_REPLACE, CN_DEC_METASPACE };

typedef struct cn_dec {
  int type;
  char *pat, *content; /* Replace */
  size_t pat_len, content_len;
  uint32_t ch;         /* Strip content; Metaspace replacement */
  int start, stop;     /* Strip */
  int prepend_never;   /* Metaspace */
} cn_dec;

int cn_dec_parse(canopy_tokenizer *t, const cJSON *j);
/* Decodes ids into out (appended). With `partial`, text that later ids could still change (an
 * unfinished byte-fallback run, an incomplete UTF-8 character) is held back and *held set. */
int cn_decode(const canopy_tokenizer *t, const int32_t *ids, int n, int skip_special, int partial, cn_buf *out,
              int *held);

/* ---- chat templates (chat_template.c) -------------------------------------------------------- */

enum { CN_CHAT_NONE, CN_CHAT_UNKNOWN, CN_CHAT_CHATML, CN_CHAT_LLAMA3, CN_CHAT_LLAMA2, CN_CHAT_MISTRAL };

typedef struct cn_chat {
  int kind;
  char *default_system; /* ChatML: the system text used when the first message is not "system" */
  char *bos, *eos;      /* tokenizer_config.json's bos_token / eos_token text */
  char *why;            /* why the template was not recognised */
} cn_chat;

/* Recognises a template's family from its text. */
int cn_chat_detect(cn_chat *c, const char *tmpl);
int cn_chat_render(const cn_chat *c, const canopy_chat_message *msgs, int n, int add_generation_prompt,
                   char **out);
void cn_chat_free(cn_chat *c);

/* ---- the tokenizer -------------------------------------------------------------------------- */

typedef struct cn_token {
  const char *s; /* text (points into the vocab or added-token storage) */
  uint32_t len;
  uint8_t special; /* skipped by skip_special */
} cn_token;

/* Scratch memory for one encode: reused across calls when the tokenizer's is free. */
struct cn_scratch {
  cn_arena arena;
  cn_segments seg, seg2;
  cn_pieces pa, pb;
  cn_spans spans;
  cn_ivec ids;
  cn_buf tmp;
  cn_rx_state rx;
  /* BPE merge loop */
  struct cn_sym *sym;
  size_t sym_cap;
  struct cn_merge *heap;
  size_t heap_cap;
  cn_wcache cache;
};

int cn_scratch_init(cn_scratch *sc);
void cn_scratch_free(cn_scratch *sc);

struct canopy_tokenizer {
  char *path;               /* tokenizer.json, for messages */
  int vocab_size;           /* largest id + 1 */
  cn_strmap vocab;          /* the model's vocabulary */
  cn_token *tokens;         /* (vocab_size) id -> text, added tokens first as in tokenizers */
  cn_bpe bpe;
  cn_norm *norm;
  int n_norm;
  cn_pretok *pretok;
  int n_pretok;
  int bytelevel_lazy;       /* the last pre-tokenizer is ByteLevel: map bytes inside BPE */
  cn_byte_level bl;
  cn_added_set added;
  cn_post post;
  cn_dec *dec;
  int n_dec, has_decoder;
  cn_chat chat;
  pthread_mutex_t scratch_lock; /* guards `scratch` (held with trylock; others use their own) */
  cn_scratch *scratch;
};

#endif
