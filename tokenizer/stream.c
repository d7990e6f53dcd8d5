/* The streaming decoder. It keeps a short window of ids and decodes the window whole each time,
 * emitting only what the new id added; text a later id could still change (an incomplete UTF-8
 * character, an unfinished run of byte-fallback tokens) is held back. Decoding the window whole
 * keeps the context-dependent decoders right (Strip and Metaspace treat the first token apart,
 * ByteFallback judges a byte run as a whole), so the pieces concatenate to canopy_detokenize's
 * output. When nothing is held, the window shrinks to the last id: decoding from that id on
 * yields its own text first, then exactly what follows. */
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "tokenizer/tokenizer_internal.h"

struct canopy_detok_stream {
  const canopy_tokenizer *tok;
  int skip_special;
  cn_ivec win;    /* ids decoded together */
  size_t emitted; /* bytes of the window's (partial) text already given out */
  cn_buf text;
};

int canopy_detok_stream_create(const canopy_tokenizer *tok, int skip_special, canopy_detok_stream **out) {
  if (!tok || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_detok_stream_create: NULL argument");
  canopy_detok_stream *s = calloc(1, sizeof *s);
  if (!s) return cn_error(CANOPY_ERR_NO_MEMORY, "canopy_detok_stream_create: out of memory");
  s->tok = tok;
  s->skip_special = skip_special;
  *out = s;
  return 0;
}

void canopy_detok_stream_free(canopy_detok_stream *s) {
  if (!s) return;
  free(s->win.p);
  free(s->text.p);
  free(s);
}

static int give(const char *p, size_t n, char *buf, size_t cap, size_t *len_out) {
  if (len_out) *len_out = n;
  if (!buf || cap < n + 1)
    return cn_error(CANOPY_ERR_BUFFER, "detokenizer stream: the text needs %zu bytes plus a NUL, the buffer holds %zu",
                    n, cap);
  memcpy(buf, p, n);
  buf[n] = '\0';
  return 0;
}

int canopy_detok_stream_push(canopy_detok_stream *s, int32_t id, char *buf, size_t cap, size_t *len_out) {
  if (!s) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_detok_stream_push: NULL stream");
  if (cn_ivec_push(&s->win, id)) return cn_error(CANOPY_ERR_NO_MEMORY, "detokenizer stream: out of memory");
  s->text.n = 0;
  int held, rc = cn_decode(s->tok, s->win.p, (int)s->win.n, s->skip_special, 1, &s->text, &held);
  size_t fresh = !rc && s->text.n > s->emitted ? s->text.n - s->emitted : 0;
  if (!rc) rc = give(fresh ? s->text.p + s->emitted : "", fresh, buf, cap, len_out);
  if (rc) { /* the id is not taken: the caller may retry with a bigger buffer */
    s->win.n--;
    return rc;
  }
  s->emitted += fresh;
  const cn_token *last = &s->tok->tokens[id];
  if (!held && last->s && !(s->skip_special && last->special)) {
    s->text.n = 0;
    if (cn_decode(s->tok, &id, 1, s->skip_special, 1, &s->text, &held) == 0 && !held) {
      s->win.p[0] = id;
      s->win.n = 1;
      s->emitted = s->text.n;
    }
  }
  return 0;
}

int canopy_detok_stream_flush(canopy_detok_stream *s, char *buf, size_t cap, size_t *len_out) {
  if (!s) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_detok_stream_flush: NULL stream");
  s->text.n = 0;
  int rc = cn_decode(s->tok, s->win.p, (int)s->win.n, s->skip_special, 0, &s->text, NULL);
  size_t fresh = !rc && s->text.n > s->emitted ? s->text.n - s->emitted : 0;
  if (!rc) rc = give(fresh ? s->text.p + s->emitted : "", fresh, buf, cap, len_out);
  if (rc) return rc;
  s->win.n = 0;
  s->emitted = 0;
  return 0;
}
