/* What every tokenizer.json component parser starts with: the "type" field and Sequences. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#include "common/error.h"
#include "tokenizer/tokenizer_internal.h"

int cn_tok_component(canopy_tokenizer *t, const cJSON *j, const char *field, const char *list,
                     cn_tok_component_parser parse, const char **type) {
  if (!cJSON_IsObject(j)) return cn_error(CANOPY_ERR_FORMAT, "%s: %s: expected an object", t->path, field);
  const cJSON *ty = cJSON_GetObjectItemCaseSensitive(j, "type");
  if (!cJSON_IsString(ty)) return cn_error(CANOPY_ERR_FORMAT, "%s: %s.type: expected a string", t->path, field);
  if (strcmp(ty->valuestring, "Sequence")) {
    *type = ty->valuestring;
    return 0;
  }
  const cJSON *arr = cJSON_GetObjectItemCaseSensitive(j, list);
  if (!cJSON_IsArray(arr)) return cn_error(CANOPY_ERR_FORMAT, "%s: %s.%s: expected an array", t->path, field, list);
  char where[200];
  int i = 0, rc;
  for (const cJSON *e = arr->child; e; e = e->next, i++) {
    snprintf(where, sizeof where, "%s.%s[%d]", field, list, i);
    if ((rc = parse(t, e, where))) return rc;
  }
  return 1;
}
