/* Post-processors, for add_special: what TemplateProcessing, BertProcessing, RobertaProcessing
 * (and ByteLevel, which adds nothing) put around a single sequence, as fixed prefix/suffix ids. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "tokenizer/tokenizer_internal.h"

/* Adds `ids` in front of (prefix) or behind (suffix) what earlier processors produced. */
static int wrap(cn_ivec *v, const int32_t *ids, size_t n, int front) {
  if (!front) return cn_ivec_append(v, ids, n);
  cn_ivec nv = {0};
  if (cn_ivec_append(&nv, ids, n) || cn_ivec_append(&nv, v->p, v->n)) {
    free(nv.p);
    return CANOPY_ERR_NO_MEMORY;
  }
  free(v->p);
  *v = nv;
  return 0;
}

static int id_of(const cJSON *pair, int32_t *id) {
  if (!cJSON_IsArray(pair) || cJSON_GetArraySize(pair) != 2 || !cJSON_IsNumber(pair->child->next)) return -1;
  *id = (int32_t)pair->child->next->valuedouble;
  return 0;
}

static int parse_template(canopy_tokenizer *t, const cJSON *j, const char *field) {
  const cJSON *single = cJSON_GetObjectItemCaseSensitive(j, "single");
  const cJSON *specials = cJSON_GetObjectItemCaseSensitive(j, "special_tokens");
  if (!cJSON_IsArray(single)) return cn_error(CANOPY_ERR_FORMAT, "%s: %s.single: expected an array", t->path, field);
  cn_ivec pre = {0}, post = {0};
  int seen_seq = 0, i = 0, rc = 0;
  for (const cJSON *it = single->child; it && !rc; it = it->next, i++) {
    const cJSON *sp = cJSON_GetObjectItemCaseSensitive(it, "SpecialToken");
    if (cJSON_GetObjectItemCaseSensitive(it, "Sequence")) {
      seen_seq = 1;
      continue;
    }
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(sp, "id");
    const cJSON *tok = cJSON_IsString(name) ? cJSON_GetObjectItemCaseSensitive(specials, name->valuestring) : NULL;
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(tok, "ids");
    if (!cJSON_IsArray(ids)) {
      rc = cn_error(CANOPY_ERR_FORMAT, "%s: %s.single[%d]: expected a Sequence or a SpecialToken listed in special_tokens",
                    t->path, field, i);
      break;
    }
    for (const cJSON *x = ids->child; x && !rc; x = x->next) {
      if (!cJSON_IsNumber(x)) rc = cn_error(CANOPY_ERR_FORMAT, "%s: %s.special_tokens: ids must be integers", t->path, field);
      else rc = cn_ivec_push(seen_seq ? &post : &pre, (int32_t)x->valuedouble);
    }
  }
  if (!rc) rc = wrap(&t->post.prefix, pre.p, pre.n, 1);
  if (!rc) rc = wrap(&t->post.suffix, post.p, post.n, 0);
  free(pre.p);
  free(post.p);
  return rc;
}

static int parse_one(canopy_tokenizer *t, const cJSON *j, const char *field) {
  const char *ty;
  int seq = cn_tok_component(t, j, field, "processors", parse_one, &ty);
  if (seq) return seq < 0 ? seq : 0;
  if (!strcmp(ty, "ByteLevel")) return 0;
  if (!strcmp(ty, "TemplateProcessing")) return parse_template(t, j, field);
  if (!strcmp(ty, "BertProcessing") || !strcmp(ty, "RobertaProcessing")) {
    int32_t cls, sep;
    if (id_of(cJSON_GetObjectItemCaseSensitive(j, "cls"), &cls) || id_of(cJSON_GetObjectItemCaseSensitive(j, "sep"), &sep))
      return cn_error(CANOPY_ERR_FORMAT, "%s: %s: expected cls and sep as [text, id]", t->path, field);
    int rc = wrap(&t->post.prefix, &cls, 1, 1);
    return rc ? rc : wrap(&t->post.suffix, &sep, 1, 0);
  }
  return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: %s: post_processor type \"%s\" is not supported", t->path, field, ty);
}

int cn_post_parse(canopy_tokenizer *t, const cJSON *j) {
  if (!j || cJSON_IsNull(j)) return 0;
  if (!cJSON_IsObject(j)) return cn_error(CANOPY_ERR_FORMAT, "%s: post_processor: expected an object", t->path);
  return parse_one(t, j, "post_processor");
}
