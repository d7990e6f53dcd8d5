/* Chat templates. canopy does not run Jinja: it recognises the template families that models
 * ship (ChatML, Llama 3, Llama 2, Mistral [INST]) from the template text and renders them
 * directly, reproducing what transformers' apply_chat_template gives for those templates. A
 * ChatML template's built-in system prompt (SmolLM2, Qwen2) is read out of the template itself. */
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "tokenizer/tokenizer_internal.h"

static char *dup_n(const char *s, size_t n) {
  char *p = malloc(n + 1);
  if (p) {
    memcpy(p, s, n);
    p[n] = '\0';
  }
  return p;
}

/* The body of a Jinja string literal, escapes resolved. */
static char *unescape(const char *s, size_t n) {
  char *p = malloc(n + 1), *o = p;
  if (!p) return NULL;
  for (size_t i = 0; i < n; i++) {
    if (s[i] == '\\' && i + 1 < n) {
      char e = s[++i];
      *o++ = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
    } else {
      *o++ = s[i];
    }
  }
  *o = '\0';
  return p;
}

/* A literal '<|im_start|>system\n...<|im_end|>' in the template is the system prompt used when
 * the conversation brings none; '<|im_start|>system\n' + message['content'] is not. */
static int find_default_system(cn_chat *c, const char *tmpl) {
  static const char head[] = "<|im_start|>system";
  for (const char *p = strstr(tmpl, head); p; p = strstr(p + 1, head)) {
    const char *q = p + sizeof head - 1;
    if (*q == '\n') q++;
    else if (q[0] == '\\' && q[1] == 'n') q += 2;
    else continue;
    const char *end = strstr(q, "<|im_end|>");
    if (!end) return 0;
    const char *r = q;
    while (r < end && *r != '\'' && *r != '"') r += (*r == '\\' && r + 1 < end) ? 2 : 1;
    if (r < end || end == q) continue;
    if (!(c->default_system = unescape(q, (size_t)(end - q)))) return CANOPY_ERR_NO_MEMORY;
    return 0;
  }
  return 0;
}

static int unknown(cn_chat *c, const char *why) {
  c->kind = CN_CHAT_UNKNOWN;
  c->why = strdup(why);
  return c->why ? 0 : CANOPY_ERR_NO_MEMORY;
}

int cn_chat_detect(cn_chat *c, const char *tmpl) {
  if (!tmpl) {
    c->kind = CN_CHAT_NONE;
    return 0;
  }
  if (strstr(tmpl, "<|im_start|>")) {
    c->kind = CN_CHAT_CHATML;
    return find_default_system(c, tmpl);
  }
  if (strstr(tmpl, "<|start_header_id|>")) {
    if (strstr(tmpl, "Cutting Knowledge Date"))
      return unknown(c, "a Llama 3.1+ template (date header, tools) is not supported, only Llama 3's");
    if (!strstr(tmpl, "| trim")) return unknown(c, "a <|start_header_id|> template unlike Llama 3's");
    c->kind = CN_CHAT_LLAMA3;
    return 0;
  }
  if (strstr(tmpl, "[INST]")) {
    if (strstr(tmpl, "<<SYS>>")) {
      if (!strstr(tmpl, ".strip()")) return unknown(c, "an [INST] <<SYS>> template unlike Llama 2's");
      c->kind = CN_CHAT_LLAMA2;
      return 0;
    }
    if (strstr(tmpl, "'[INST] ' + message['content'] + ' [/INST]'") && strstr(tmpl, "message['content'] + eos_token")) {
      c->kind = CN_CHAT_MISTRAL;
      return 0;
    }
    return unknown(c, "an [INST] template unlike Llama 2's or Mistral v0.1's");
  }
  return unknown(c, "not a ChatML, Llama 3, Llama 2 or Mistral [INST] template");
}

void cn_chat_free(cn_chat *c) {
  free(c->default_system);
  free(c->bos);
  free(c->eos);
  free(c->why);
  memset(c, 0, sizeof *c);
}

/* ---- rendering -------------------------------------------------------------------------------- */

static int put(cn_buf *b, const char *s) { return cn_buf_append(b, s ? s : "", s ? strlen(s) : 0); }

/* Python's str.strip(), which Jinja's trim filter and .strip() call. */
static int put_stripped(cn_buf *b, const char *s) {
  size_t len = strlen(s), a = 0, z = len;
  int k;
  while (a < z && cn_py_isspace(cn_utf8_decode(s + a, &k))) a += (size_t)k;
  while (z > a && cn_py_isspace(cn_utf8_decode(s + cn_utf8_prev(s, z), &k))) z = cn_utf8_prev(s, z);
  return cn_buf_append(b, s + a, z - a);
}

static int alternation_error(int i, const char *role) {
  return cn_error(CANOPY_ERR_INVALID_ARG,
                  "chat template: Conversation roles must alternate user/assistant/user/assistant/... "
                  "(message %d is \"%s\")", i, role);
}

static int render_chatml(const cn_chat *c, const canopy_chat_message *m, int n, int gen, cn_buf *b) {
  int rc = 0;
  for (int i = 0; i < n && !rc; i++) {
    if (i == 0 && c->default_system && strcmp(m[0].role, "system"))
      rc = put(b, "<|im_start|>system\n") || put(b, c->default_system) || put(b, "<|im_end|>\n");
    if (!rc) rc = put(b, "<|im_start|>") || put(b, m[i].role) || put(b, "\n") || put(b, m[i].content) ||
                  put(b, "<|im_end|>\n");
  }
  if (!rc && gen) rc = put(b, "<|im_start|>assistant\n");
  return rc;
}

static int render_llama3(const cn_chat *c, const canopy_chat_message *m, int n, int gen, cn_buf *b) {
  int rc = 0;
  for (int i = 0; i < n && !rc; i++) {
    if (i == 0) rc = put(b, c->bos);
    if (!rc) rc = put(b, "<|start_header_id|>") || put(b, m[i].role) || put(b, "<|end_header_id|>\n\n") ||
                  put_stripped(b, m[i].content) || put(b, "<|eot_id|>");
  }
  if (!rc && gen) rc = put(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
  return rc;
}

static int render_llama2(const cn_chat *c, const canopy_chat_message *m, int n, cn_buf *b) {
  if (n == 0) return cn_error(CANOPY_ERR_INVALID_ARG, "chat template: the Llama 2 template needs at least one message");
  const char *sys = NULL;
  if (!strcmp(m[0].role, "system")) {
    sys = m[0].content;
    m++;
    n--;
  }
  cn_buf content = {0};
  int rc = 0;
  for (int i = 0; i < n && !rc; i++) {
    int user = !strcmp(m[i].role, "user");
    if (user != (i % 2 == 0)) {
      rc = alternation_error(i + (sys != NULL), m[i].role);
      break;
    }
    content.n = 0;
    if (i == 0 && sys) rc = put(&content, "<<SYS>>\n") || put(&content, sys) || put(&content, "\n<</SYS>>\n\n");
    if (!rc) rc = put(&content, m[i].content);
    if (rc) break;
    if (user) rc = put(b, c->bos) || put(b, "[INST] ") || put_stripped(b, content.p) || put(b, " [/INST]");
    else if (!strcmp(m[i].role, "assistant"))
      rc = put(b, " ") || put_stripped(b, content.p) || put(b, " ") || put(b, c->eos);
  }
  free(content.p);
  return rc;
}

static int render_mistral(const cn_chat *c, const canopy_chat_message *m, int n, cn_buf *b) {
  int rc = put(b, c->bos);
  for (int i = 0; i < n && !rc; i++) {
    int user = !strcmp(m[i].role, "user");
    if (user != (i % 2 == 0)) return alternation_error(i, m[i].role);
    if (user) rc = put(b, "[INST] ") || put(b, m[i].content) || put(b, " [/INST]");
    else if (!strcmp(m[i].role, "assistant")) rc = put(b, m[i].content) || put(b, c->eos);
    else return cn_error(CANOPY_ERR_INVALID_ARG, "chat template: Only user and assistant roles are supported! "
                                                 "(message %d is \"%s\")", i, m[i].role);
  }
  return rc;
}

int cn_chat_render(const cn_chat *c, const canopy_chat_message *msgs, int n, int gen, char **out) {
  *out = NULL;
  if (n < 0 || (n > 0 && !msgs)) return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_chat_apply: bad message list");
  for (int i = 0; i < n; i++)
    if (!msgs[i].role || !msgs[i].content)
      return cn_error(CANOPY_ERR_INVALID_ARG, "canopy_chat_apply: message %d has a NULL role or content", i);
  if (c->kind == CN_CHAT_NONE)
    return cn_error(CANOPY_ERR_UNSUPPORTED, "no chat template: tokenizer_config.json has no chat_template");
  if (c->kind == CN_CHAT_UNKNOWN)
    return cn_error(CANOPY_ERR_UNSUPPORTED, "chat template not recognised: %s", c->why ? c->why : "unknown");
  cn_buf b = {0};
  int rc;
  switch (c->kind) {
  case CN_CHAT_CHATML: rc = render_chatml(c, msgs, n, gen, &b); break;
  case CN_CHAT_LLAMA3: rc = render_llama3(c, msgs, n, gen, &b); break;
  case CN_CHAT_LLAMA2: rc = render_llama2(c, msgs, n, &b); break;
  default: rc = render_mistral(c, msgs, n, &b); break;
  }
  if (rc == 1) rc = cn_error(CANOPY_ERR_NO_MEMORY, "canopy_chat_apply: out of memory");
  if (!rc && !b.p && !(b.p = dup_n("", 0))) rc = cn_error(CANOPY_ERR_NO_MEMORY, "canopy_chat_apply: out of memory");
  if (rc) {
    free(b.p);
    return rc;
  }
  *out = b.p;
  return 0;
}
