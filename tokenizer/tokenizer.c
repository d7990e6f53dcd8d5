/* The public tokenizer API: loading tokenizer.json (+ tokenizer_config.json) and the encode
 * pipeline that strings the stages together (see tokenizer_internal.h for the order). */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/error.h"
#include "tokenizer/tokenizer_internal.h"

/* ---- scratch ---------------------------------------------------------------------------------- */

int cn_scratch_init(cn_scratch *sc) {
  memset(sc, 0, sizeof *sc);
  return cn_rx_state_init(&sc->rx);
}

void cn_scratch_free(cn_scratch *sc) {
  cn_arena_free(&sc->arena);
  free(sc->seg.p);
  free(sc->seg2.p);
  free(sc->pa.p);
  free(sc->pb.p);
  free(sc->spans.p);
  free(sc->ids.p);
  free(sc->tmp.p);
  free(sc->sym);
  free(sc->heap);
  cn_rx_state_free(&sc->rx);
  cn_wcache_free(&sc->cache);
}

/* The tokenizer's own scratch if no other thread is using it, else a fresh one. */
static cn_scratch *scratch_acquire(const canopy_tokenizer *ct) {
  canopy_tokenizer *t = (canopy_tokenizer *)ct; /* the lock and the cache are not the tokenizer's value */
  if (pthread_mutex_trylock(&t->scratch_lock) == 0) return t->scratch;
  cn_scratch *sc = malloc(sizeof *sc);
  if (sc && cn_scratch_init(sc)) {
    cn_scratch_free(sc);
    free(sc);
    sc = NULL;
  }
  return sc;
}

static void scratch_release(const canopy_tokenizer *ct, cn_scratch *sc) {
  canopy_tokenizer *t = (canopy_tokenizer *)ct;
  cn_arena_reset(&sc->arena);
  if (sc == t->scratch) {
    pthread_mutex_unlock(&t->scratch_lock);
  } else {
    cn_scratch_free(sc);
    free(sc);
  }
}

/* ---- loading ---------------------------------------------------------------------------------- */

static int read_json(const char *path, int optional, cJSON **out) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) {
    if (optional && errno == ENOENT) return 0;
    return cn_error(CANOPY_ERR_IO, "%s: cannot open (%s)", path, strerror(errno));
  }
  cn_buf b = {0};
  char chunk[65536];
  size_t got;
  int rc = 0;
  while (!rc && (got = fread(chunk, 1, sizeof chunk, f)) > 0) rc = cn_buf_append(&b, chunk, got);
  if (!rc && ferror(f)) rc = cn_error(CANOPY_ERR_IO, "%s: read error", path);
  fclose(f);
  if (rc) {
    free(b.p);
    return rc == CANOPY_ERR_NO_MEMORY ? cn_error(rc, "%s: out of memory reading it", path) : rc;
  }
  const char *end = NULL;
  *out = cJSON_ParseWithLengthOpts(b.p ? b.p : "", b.n, &end, 0);
  if (!*out) {
    size_t off = end && b.p ? (size_t)(end - b.p) : 0;
    free(b.p);
    return cn_error(CANOPY_ERR_FORMAT, "%s: invalid JSON at byte offset %zu", path, off);
  }
  free(b.p);
  return 0;
}

static int build_token_table(canopy_tokenizer *t) {
  int32_t max_id = -1;
  for (uint32_t i = 0; i < t->vocab.n; i++)
    if (t->vocab.ent[i].val > max_id) max_id = t->vocab.ent[i].val;
  for (int i = 0; i < t->added.n; i++)
    if (t->added.tok[i].id > max_id) max_id = t->added.tok[i].id;
  t->vocab_size = max_id + 1;
  t->tokens = calloc((size_t)(t->vocab_size ? t->vocab_size : 1), sizeof *t->tokens);
  if (!t->tokens) return CANOPY_ERR_NO_MEMORY;
  for (uint32_t i = 0; i < t->vocab.n; i++) {
    /* Entries of a key overwritten later keep their old value; only the map's current value counts. */
    const cn_strmap_entry *e = &t->vocab.ent[i];
    t->tokens[e->val] = (cn_token){cn_strmap_key(&t->vocab, i), e->len, 0};
  }
  for (int i = 0; i < t->added.n; i++) {
    const cn_added *a = &t->added.tok[i];
    t->tokens[a->id] = (cn_token){a->content, (uint32_t)a->len, a->special};
  }
  /* tokenizers skips a token as special by its text, whichever id carries it. */
  for (int i = 0; i < t->added.n; i++) {
    const cn_added *a = &t->added.tok[i];
    int32_t id = a->special ? cn_strmap_get(&t->vocab, a->content, a->len) : -1;
    if (id >= 0) t->tokens[id].special = 1;
  }
  return 0;
}

static char *token_text(const cJSON *v) {
  if (cJSON_IsObject(v)) v = cJSON_GetObjectItemCaseSensitive(v, "content");
  return cJSON_IsString(v) ? strdup(v->valuestring) : NULL;
}

static int load_config(canopy_tokenizer *t, const char *path) {
  cJSON *cfg;
  int rc = read_json(path, 1, &cfg);
  if (rc || !cfg) return rc;
  const cJSON *tmpl = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
  if (cJSON_IsArray(tmpl)) { /* [{"name": "default", "template": ...}, ...] */
    const cJSON *pick = NULL;
    for (const cJSON *e = tmpl->child; e; e = e->next) {
      const cJSON *name = cJSON_GetObjectItemCaseSensitive(e, "name");
      if (cJSON_IsString(name) && !strcmp(name->valuestring, "default")) pick = e;
    }
    tmpl = cJSON_GetObjectItemCaseSensitive(pick, "template");
  }
  t->chat.bos = token_text(cJSON_GetObjectItemCaseSensitive(cfg, "bos_token"));
  t->chat.eos = token_text(cJSON_GetObjectItemCaseSensitive(cfg, "eos_token"));
  rc = cn_chat_detect(&t->chat, cJSON_IsString(tmpl) ? tmpl->valuestring : NULL);
  cJSON_Delete(cfg);
  return rc;
}

static int load(canopy_tokenizer *t, const char *json_path, const char *config_path) {
  cJSON *root;
  int rc = read_json(json_path, 0, &root);
  if (rc) return rc;
  const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
  if (!cJSON_IsObject(root)) rc = cn_error(CANOPY_ERR_FORMAT, "%s: expected a JSON object", json_path);
  else if (!model) rc = cn_error(CANOPY_ERR_FORMAT, "%s: model: missing", json_path);
  else if (!cJSON_IsObject(model)) rc = cn_error(CANOPY_ERR_FORMAT, "%s: model: expected an object", json_path);
  if (!rc) rc = cn_bpe_parse(t, model);
  if (!rc) rc = cn_added_parse(t, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"));
  if (!rc) rc = cn_norm_parse(t, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), "normalizer");
  if (!rc) rc = cn_pretok_parse(t, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), "pre_tokenizer");
  if (!rc) rc = cn_post_parse(t, cJSON_GetObjectItemCaseSensitive(root, "post_processor"));
  if (!rc) rc = cn_dec_parse(t, cJSON_GetObjectItemCaseSensitive(root, "decoder"));
  cJSON_Delete(root);
  if (!rc) rc = build_token_table(t);
  if (!rc) rc = cn_added_build(t, t->scratch);
  if (!rc) rc = load_config(t, config_path);
  if (rc == CANOPY_ERR_NO_MEMORY && !canopy_last_error()[0]) cn_error(rc, "%s: out of memory", json_path);
  return rc;
}

int canopy_tokenizer_load(const char *path, canopy_tokenizer **out) {
  if (!path || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_tokenizer_load: NULL argument");
  *out = NULL;
  size_t n = strlen(path);
  char *json = malloc(n + 32), *config = malloc(n + 32);
  canopy_tokenizer *t = calloc(1, sizeof *t);
  if (!json || !config || !t) {
    free(json);
    free(config);
    free(t);
    return cn_error(CANOPY_ERR_NO_MEMORY, "canopy_tokenizer_load: out of memory");
  }
  struct stat st;
  if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
    snprintf(json, n + 32, "%s/tokenizer.json", path);
    snprintf(config, n + 32, "%s/tokenizer_config.json", path);
  } else {
    snprintf(json, n + 32, "%s", path);
    const char *slash = strrchr(path, '/');
    snprintf(config, n + 32, "%.*stokenizer_config.json", slash ? (int)(slash - path + 1) : 0, path);
  }
  t->path = json;
  pthread_mutex_init(&t->scratch_lock, NULL);
  cn_byte_level_init(&t->bl);
  cn_error_clear();
  int rc = (t->scratch = malloc(sizeof *t->scratch)) ? cn_scratch_init(t->scratch) : CANOPY_ERR_NO_MEMORY;
  if (!rc) rc = load(t, json, config);
  free(config);
  if (rc) {
    if (rc == CANOPY_ERR_NO_MEMORY && !canopy_last_error()[0]) cn_error(rc, "%s: out of memory", json);
    canopy_tokenizer_free(t);
    return rc;
  }
  *out = t;
  return 0;
}

void canopy_tokenizer_free(canopy_tokenizer *t) {
  if (!t) return;
  for (int i = 0; i < t->n_norm; i++) {
    free(t->norm[i].a);
    free(t->norm[i].b);
    cn_regex_free(&t->norm[i].re);
  }
  free(t->norm);
  for (int i = 0; i < t->n_pretok; i++) cn_regex_free(&t->pretok[i].re);
  free(t->pretok);
  for (int i = 0; i < t->n_dec; i++) {
    free(t->dec[i].pat);
    free(t->dec[i].content);
  }
  free(t->dec);
  free(t->post.prefix.p);
  free(t->post.suffix.p);
  cn_added_free(&t->added);
  cn_bpe_free(&t->bpe);
  cn_strmap_free(&t->vocab);
  free(t->tokens);
  cn_chat_free(&t->chat);
  if (t->scratch) {
    cn_scratch_free(t->scratch);
    free(t->scratch);
  }
  pthread_mutex_destroy(&t->scratch_lock);
  free(t->path);
  free(t);
}

int canopy_tokenizer_vocab_size(const canopy_tokenizer *t) { return t ? t->vocab_size : 0; }

int canopy_token_id(const canopy_tokenizer *t, const char *text) {
  if (!t || !text) return -1;
  int32_t id = cn_strmap_get(&t->added.by_content, text, strlen(text));
  return id >= 0 ? id : cn_strmap_get(&t->vocab, text, strlen(text));
}

/* ---- encoding --------------------------------------------------------------------------------- */

/* Normalized text without added tokens: pre-tokens, then BPE. */
static int encode_text(const canopy_tokenizer *t, cn_scratch *sc, const char *s, size_t len, int at_origin) {
  if (!len) return 0;
  sc->pa.n = 0;
  if (cn_grow((void **)&sc->pa.p, &sc->pa.cap, 1, sizeof *sc->pa.p)) return CANOPY_ERR_NO_MEMORY;
  sc->pa.p[sc->pa.n++] = (cn_piece){s, (uint32_t)len, at_origin ? CN_PIECE_AT_ORIGIN : 0};
  int rc = cn_pretokenize(t, sc, &sc->pa, &sc->pb);
  for (size_t i = 0; i < sc->pb.n && !rc; i++) rc = cn_bpe_encode(t, sc, &sc->pb.p[i], &sc->ids);
  return rc;
}

static int encode(const canopy_tokenizer *t, cn_scratch *sc, const char *text, size_t len) {
  int rc = cn_added_split(&t->added, &t->added.raw, text, len, &sc->seg);
  for (size_t i = 0; i < sc->seg.n && !rc; i++) {
    const cn_segment sg = sc->seg.p[i];
    if (sg.id >= 0) {
      rc = cn_ivec_push(&sc->ids, sg.id);
      continue;
    }
    const char *s;
    size_t n;
    if ((rc = cn_normalize(t, sc, text + sg.start, sg.end - sg.start, &s, &n))) break;
    if (!t->added.norm.n) {
      rc = encode_text(t, sc, s, n, sg.start == 0);
    } else if (!(rc = cn_added_split(&t->added, &t->added.norm, s, n, &sc->seg2))) {
      for (size_t k = 0; k < sc->seg2.n && !rc; k++) {
        const cn_segment s2 = sc->seg2.p[k];
        rc = s2.id >= 0 ? cn_ivec_push(&sc->ids, s2.id)
                        : encode_text(t, sc, s + s2.start, s2.end - s2.start, sg.start == 0 && s2.start == 0);
      }
    }
    cn_arena_reset(&sc->arena);
  }
  return rc;
}

int canopy_tokenize(const canopy_tokenizer *t, const char *text, size_t len, int add_special, int32_t *ids, int cap,
                    int *n_out) {
  if (!t || !n_out || (!text && len) || cap < 0 || (!ids && cap > 0))
    return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_tokenize: NULL or negative argument");
  if (len >= UINT32_MAX) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_tokenize: text of %zu bytes is too long", len);
  size_t bad = cn_utf8_valid_prefix(text, len);
  if (bad < len)
    return cn_error(CANOPY_ERR_UTF8, "canopy_tokenize: invalid UTF-8 at byte offset %zu (byte 0x%02X)", bad,
                    (unsigned char)text[bad]);
  cn_scratch *sc = scratch_acquire(t);
  if (!sc) return cn_error(CANOPY_ERR_NO_MEMORY, "canopy_tokenize: out of memory");
  sc->ids.n = 0;
  int rc = 0;
  if (add_special) rc = cn_ivec_append(&sc->ids, t->post.prefix.p, t->post.prefix.n);
  if (!rc) rc = encode(t, sc, text ? text : "", len);
  if (!rc && add_special) rc = cn_ivec_append(&sc->ids, t->post.suffix.p, t->post.suffix.n);
  size_t n = sc->ids.n;
  if (!rc && n > INT32_MAX) rc = cn_error(CANOPY_ERR_INVALID_ARG, "canopy_tokenize: more than 2^31 ids");
  if (!rc) {
    *n_out = (int)n;
    if (n > (size_t)cap) rc = cn_error(CANOPY_ERR_BUFFER, "canopy_tokenize: %zu ids do not fit in a buffer of %d", n, cap);
    else if (n) memcpy(ids, sc->ids.p, n * sizeof *ids);
  } else if (rc == CANOPY_ERR_NO_MEMORY) {
    cn_error(rc, "canopy_tokenize: out of memory");
  }
  scratch_release(t, sc);
  return rc;
}

/* ---- decoding and chat -------------------------------------------------------------------------- */

int canopy_detokenize(const canopy_tokenizer *t, const int32_t *ids, int n, int skip_special, char *buf, size_t cap,
                      size_t *len_out) {
  if (!t || n < 0 || (!ids && n) || !len_out)
    return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_detokenize: NULL or negative argument");
  cn_buf out = {0};
  int rc = cn_decode(t, ids, n, skip_special, 0, &out, NULL);
  if (rc == CANOPY_ERR_NO_MEMORY) cn_error(rc, "canopy_detokenize: out of memory");
  if (!rc) {
    *len_out = out.n;
    if (!buf || cap < out.n + 1)
      rc = cn_error(CANOPY_ERR_BUFFER, "canopy_detokenize: the text needs %zu bytes plus a NUL, the buffer holds %zu",
                    out.n, buf ? cap : 0);
    else {
      if (out.n) memcpy(buf, out.p, out.n);
      buf[out.n] = '\0';
    }
  }
  free(out.p);
  return rc;
}

int canopy_chat_apply(const canopy_tokenizer *t, const canopy_chat_message *msgs, int n, int add_generation_prompt,
                      char **out) {
  if (!t || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_chat_apply: NULL argument");
  return cn_chat_render(&t->chat, msgs, n, add_generation_prompt, out);
}
