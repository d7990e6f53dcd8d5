/* config.json of a Hugging Face causal LM, read the way transformers' LlamaConfig,
 * MistralConfig and Qwen2Config read it (their defaults where a field may be absent). */
#include "model/config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"

typedef enum arch { ARCH_LLAMA, ARCH_MISTRAL, ARCH_QWEN2 } arch;

static const struct {
  const char *class_name, *model_type;
} ARCHS[] = {
    [ARCH_LLAMA] = {"LlamaForCausalLM", "llama"},
    [ARCH_MISTRAL] = {"MistralForCausalLM", "mistral"},
    [ARCH_QWEN2] = {"Qwen2ForCausalLM", "qwen2"},
};
#define N_ARCHS (int)(sizeof ARCHS / sizeof ARCHS[0])

/* ---- typed field readers: each names the field it rejects -------------------------------- */

typedef struct reader {
  const cJSON *obj;
  const char *name;   /* the file, for messages */
  const char *prefix; /* "rope_scaling." for a nested object's fields, else "" */
} reader;

static int absent(const cJSON *j) { return !j || cJSON_IsNull(j); }

/* An integer field >= min. Absent (or null): *out = dflt, or an error if required. */
static int get_int(const reader *r, const char *key, int required, int dflt, int min, int *out) {
  const cJSON *j = cJSON_GetObjectItemCaseSensitive(r->obj, key);
  if (absent(j)) {
    if (required) return cn_error(CANOPY_ERR_FORMAT, "%s: missing field '%s%s'", r->name, r->prefix, key);
    *out = dflt;
    return CANOPY_OK;
  }
  double v = cJSON_IsNumber(j) ? j->valuedouble : NAN;
  if (!(v >= min && v <= 2147483647.0) || v != floor(v))
    return cn_error(CANOPY_ERR_FORMAT, "%s: field '%s%s' must be a %s integer", r->name, r->prefix, key,
                    min > 0 ? "positive" : "non-negative");
  *out = (int)v;
  return CANOPY_OK;
}

/* A finite number > 0. */
static int get_positive(const reader *r, const char *key, int required, double dflt, double *out) {
  const cJSON *j = cJSON_GetObjectItemCaseSensitive(r->obj, key);
  if (absent(j)) {
    if (required) return cn_error(CANOPY_ERR_FORMAT, "%s: missing field '%s%s'", r->name, r->prefix, key);
    *out = dflt;
    return CANOPY_OK;
  }
  if (!cJSON_IsNumber(j) || !(j->valuedouble > 0) || !isfinite(j->valuedouble))
    return cn_error(CANOPY_ERR_FORMAT, "%s: field '%s%s' must be a positive number", r->name, r->prefix, key);
  *out = j->valuedouble;
  return CANOPY_OK;
}

static int get_bool(const reader *r, const char *key, bool dflt, bool *out) {
  const cJSON *j = cJSON_GetObjectItemCaseSensitive(r->obj, key);
  if (absent(j)) {
    *out = dflt;
    return CANOPY_OK;
  }
  if (!cJSON_IsBool(j))
    return cn_error(CANOPY_ERR_FORMAT, "%s: field '%s%s' must be true or false", r->name, r->prefix, key);
  *out = cJSON_IsTrue(j);
  return CANOPY_OK;
}

/* ---- the parts of a config --------------------------------------------------------------- */

/* "architectures" names the class; older or hand-written configs may give only "model_type". */
static int parse_arch(const reader *r, arch *out) {
  const cJSON *list = cJSON_GetObjectItemCaseSensitive(r->obj, "architectures");
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(r->obj, "model_type");
  if (!absent(list)) {
    if (!cJSON_IsArray(list) || !cJSON_GetArraySize(list))
      return cn_error(CANOPY_ERR_FORMAT, "%s: field 'architectures' must be a list of class names", r->name);
    for (const cJSON *e = list->child; e; e = e->next) {
      if (!cJSON_IsString(e))
        return cn_error(CANOPY_ERR_FORMAT, "%s: field 'architectures' must be a list of class names", r->name);
      for (int a = 0; a < N_ARCHS; a++)
        if (!strcmp(e->valuestring, ARCHS[a].class_name)) {
          *out = (arch)a;
          return CANOPY_OK;
        }
    }
    return cn_error(CANOPY_ERR_UNSUPPORTED,
                    "%s: architecture %s is not supported (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM are)",
                    r->name, list->child->valuestring);
  }
  if (absent(type)) return cn_error(CANOPY_ERR_FORMAT, "%s: neither 'architectures' nor 'model_type' is given", r->name);
  if (!cJSON_IsString(type)) return cn_error(CANOPY_ERR_FORMAT, "%s: field 'model_type' must be a string", r->name);
  for (int a = 0; a < N_ARCHS; a++)
    if (!strcmp(type->valuestring, ARCHS[a].model_type)) {
      *out = (arch)a;
      return CANOPY_OK;
    }
  return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: model_type %s is not supported (llama, mistral, qwen2 are)", r->name,
                  type->valuestring);
}

/* rope_theta and the scaling, from "rope_theta" + "rope_scaling" or (transformers 5) one
 * "rope_parameters" object holding both. */
static int parse_rope(const reader *r, cn_config *c) {
  const cJSON *params = cJSON_GetObjectItemCaseSensitive(r->obj, "rope_parameters");
  const char *scaling_key = "rope_scaling";
  const cJSON *scaling = cJSON_GetObjectItemCaseSensitive(r->obj, scaling_key);
  double theta = 10000.0;
  int rc = get_positive(r, "rope_theta", 0, 10000.0, &theta);
  if (rc) return rc;
  if (!absent(params)) {
    if (!cJSON_IsObject(params))
      return cn_error(CANOPY_ERR_FORMAT, "%s: field 'rope_parameters' must be an object", r->name);
    reader pr = {.obj = params, .name = r->name, .prefix = "rope_parameters."};
    if ((rc = get_positive(&pr, "rope_theta", 0, theta, &theta))) return rc;
    scaling = params;
    scaling_key = "rope_parameters";
  }
  c->rope_theta = (float)theta;
  c->rope_scaling = CN_ROPE_NONE;
  c->rope_factor = 1.0f;
  if (absent(scaling)) return CANOPY_OK;
  if (!cJSON_IsObject(scaling))
    return cn_error(CANOPY_ERR_FORMAT, "%s: field '%s' must be null or an object", r->name, scaling_key);

  const cJSON *type = cJSON_GetObjectItemCaseSensitive(scaling, "rope_type");
  if (absent(type)) type = cJSON_GetObjectItemCaseSensitive(scaling, "type"); /* before transformers 4.45 */
  if (absent(type)) {
    if (scaling == params) return CANOPY_OK; /* rope_parameters may carry only rope_theta */
    return cn_error(CANOPY_ERR_FORMAT, "%s: field '%s' has no 'rope_type'", r->name, scaling_key);
  }
  if (!cJSON_IsString(type))
    return cn_error(CANOPY_ERR_FORMAT, "%s: field '%s.rope_type' must be a string", r->name, scaling_key);
  const char *t = type->valuestring;
  if (!strcmp(t, "default")) return CANOPY_OK;

  reader sr = {.obj = scaling, .name = r->name, .prefix = scaling == params ? "rope_parameters." : "rope_scaling."};
  double factor = 1, low = 0, high = 0;
  if (!strcmp(t, "linear")) {
    if ((rc = get_positive(&sr, "factor", 1, 0, &factor))) return rc;
    c->rope_scaling = CN_ROPE_LINEAR;
    c->rope_factor = (float)factor;
    return CANOPY_OK;
  }
  if (!strcmp(t, "llama3")) {
    int orig = 0;
    if ((rc = get_positive(&sr, "factor", 1, 0, &factor)) || (rc = get_positive(&sr, "low_freq_factor", 1, 0, &low)) ||
        (rc = get_positive(&sr, "high_freq_factor", 1, 0, &high)) ||
        (rc = get_int(&sr, "original_max_position_embeddings", 1, 0, 1, &orig)))
      return rc;
    /* The smooth band between the two wavelengths divides by (high - low). */
    if (!(high > low))
      return cn_error(CANOPY_ERR_FORMAT, "%s: field '%s.high_freq_factor' (%g) must exceed low_freq_factor (%g)",
                      r->name, scaling_key, high, low);
    c->rope_scaling = CN_ROPE_LLAMA3;
    c->rope_factor = (float)factor;
    c->rope_low_freq_factor = (float)low;
    c->rope_high_freq_factor = (float)high;
    c->rope_original_max_position = orig;
    return CANOPY_OK;
  }
  return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: rope scaling type '%s' is not supported (llama3, linear are)", r->name,
                  t);
}

static int parse_special_ids(const reader *r, cn_config *c) {
  int rc = get_int(r, "bos_token_id", 0, -1, 0, &c->bos_token_id);
  if (rc) return rc;
  const cJSON *eos = cJSON_GetObjectItemCaseSensitive(r->obj, "eos_token_id");
  c->n_eos = 0;
  if (absent(eos)) return CANOPY_OK;
  if (!cJSON_IsArray(eos)) return get_int(r, "eos_token_id", 1, 0, 0, &c->eos_token_ids[c->n_eos++]);
  int max = (int)(sizeof c->eos_token_ids / sizeof c->eos_token_ids[0]);
  if (cJSON_GetArraySize(eos) > max)
    return cn_error(CANOPY_ERR_UNSUPPORTED, "%s: field 'eos_token_id' lists %d ids; canopy keeps at most %d", r->name,
                    cJSON_GetArraySize(eos), max);
  for (const cJSON *e = eos->child; e; e = e->next) {
    double v = cJSON_IsNumber(e) ? e->valuedouble : -1;
    if (!(v >= 0 && v <= 2147483647.0) || v != floor(v))
      return cn_error(CANOPY_ERR_FORMAT, "%s: field 'eos_token_id' must be a non-negative integer or a list of them",
                      r->name);
    c->eos_token_ids[c->n_eos++] = (int)v;
  }
  return CANOPY_OK;
}

/* Mistral slides every layer's window; Qwen2 only when use_sliding_window, and then only in
 * layers from max_window_layers on, which one window size can describe only if that is all of
 * them or none. */
static int parse_sliding_window(const reader *r, arch a, cn_config *c) {
  c->sliding_window = 0;
  if (a == ARCH_LLAMA) return CANOPY_OK;
  int rc;
  if (a == ARCH_QWEN2) {
    bool use = false;
    int from;
    if ((rc = get_bool(r, "use_sliding_window", false, &use)) || !use) return rc;
    if ((rc = get_int(r, "max_window_layers", 0, 28, 0, &from))) return rc;
    if (from >= c->n_layers) return CANOPY_OK;
    if (from > 0)
      return cn_error(CANOPY_ERR_UNSUPPORTED,
                      "%s: field 'max_window_layers' (%d): a sliding window in only some of the %d layers is not "
                      "supported",
                      r->name, from, c->n_layers);
  }
  return get_int(r, "sliding_window", 0, 0, 1, &c->sliding_window);
}

int cn_config_parse(const char *json, size_t len, const char *name, cn_config *out) {
  if (!json || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_config_parse: NULL argument");
  if (!name) name = "config.json";
  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
  if (!root) {
    size_t at = end && end >= json && end <= json + len ? (size_t)(end - json) : 0;
    return cn_error(CANOPY_ERR_FORMAT, "%s: not valid JSON (error near byte offset %zu)", name, at);
  }
  for (const char *p = end; p < json + len; p++)
    if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r' && *p != '\0') {
      cJSON_Delete(root);
      return cn_error(CANOPY_ERR_FORMAT, "%s: not valid JSON (unexpected text at byte offset %zu)", name,
                      (size_t)(p - json));
    }
  if (!cJSON_IsObject(root)) {
    cJSON_Delete(root);
    return cn_error(CANOPY_ERR_FORMAT, "%s: not a JSON object", name);
  }

  reader r = {.obj = root, .name = name, .prefix = ""};
  cn_config c = {0};
  arch a = ARCH_LLAMA;
  double eps = 0;
  int rc = parse_arch(&r, &a);
  if (!rc) {
    snprintf(c.architecture, sizeof c.architecture, "%s", ARCHS[a].class_name);
    const struct {
      const char *key;
      int *dst;
    } sizes[] = {
        {"vocab_size", &c.vocab_size},
        {"hidden_size", &c.hidden_size},
        {"intermediate_size", &c.intermediate_size},
        {"num_hidden_layers", &c.n_layers},
        {"num_attention_heads", &c.n_heads},
        {"max_position_embeddings", &c.max_position_embeddings},
    };
    for (size_t i = 0; !rc && i < sizeof sizes / sizeof sizes[0]; i++)
      rc = get_int(&r, sizes[i].key, 1, 0, 1, sizes[i].dst);
  }
  if (!rc) rc = get_int(&r, "num_key_value_heads", 0, c.n_heads, 1, &c.n_kv_heads);
  if (!rc && c.n_heads % c.n_kv_heads)
    rc = cn_error(CANOPY_ERR_FORMAT, "%s: field 'num_attention_heads' (%d) must be a multiple of num_key_value_heads (%d)",
                  name, c.n_heads, c.n_kv_heads);
  if (!rc && absent(cJSON_GetObjectItemCaseSensitive(root, "head_dim")) && c.hidden_size % c.n_heads)
    rc = cn_error(CANOPY_ERR_FORMAT,
                  "%s: field 'hidden_size' (%d) must be a multiple of num_attention_heads (%d) when head_dim is not given",
                  name, c.hidden_size, c.n_heads);
  if (!rc) rc = get_int(&r, "head_dim", 0, c.n_heads ? c.hidden_size / c.n_heads : 0, 1, &c.head_dim);
  if (!rc) rc = get_positive(&r, "rms_norm_eps", 0, 1e-6, &eps);
  c.rms_norm_eps = (float)eps;
  if (!rc) rc = get_bool(&r, "tie_word_embeddings", false, &c.tie_word_embeddings);
  if (!rc && a == ARCH_LLAMA) {
    rc = get_bool(&r, "attention_bias", false, &c.attention_bias);
    c.o_bias = c.attention_bias;
    if (!rc) rc = get_bool(&r, "mlp_bias", false, &c.mlp_bias);
  }
  if (!rc && a == ARCH_QWEN2) c.attention_bias = true; /* Qwen2's q/k/v always have biases, o_proj never */
  if (!rc) rc = parse_sliding_window(&r, a, &c);
  if (!rc) rc = parse_rope(&r, &c);
  if (!rc) rc = parse_special_ids(&r, &c);
  cJSON_Delete(root);
  if (rc) return rc;
  *out = c;
  return CANOPY_OK;
}

int cn_config_load(const char *path, cn_config *out) {
  if (!path || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_config_load: NULL argument");
  FILE *f = fopen(path, "rb");
  if (!f) return cn_error(CANOPY_ERR_IO, "%s: %s", path, strerror(errno));
  size_t cap = 1 << 14, n = 0, got;
  char *buf = malloc(cap);
  while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
    n += got;
    if (n == cap) {
      char *b = realloc(buf, cap *= 2);
      if (!b) free(buf);
      buf = b;
    }
  }
  int err = ferror(f);
  fclose(f);
  if (!buf || err) {
    free(buf);
    return cn_error(err ? CANOPY_ERR_IO : CANOPY_ERR_NO_MEMORY, "%s: could not read the file", path);
  }
  int rc = cn_config_parse(buf, n, path, out);
  free(buf);
  return rc;
}

/* RoPE frequencies as transformers computes them (_compute_default_rope_parameters and, for
 * llama3, _compute_llama3_parameters): wavelengths shorter than original_context /
 * high_freq_factor are kept, longer than original_context / low_freq_factor are divided by
 * factor, and the band between is interpolated linearly in original_context / wavelength.
 * Worked in double, rounded once. */
void cn_config_rope_inv_freq(const cn_config *c, float *inv_freq) {
  int half = c->head_dim / 2;
  for (int i = 0; i < half; i++) {
    double f = 1.0 / pow((double)c->rope_theta, (2.0 * i) / c->head_dim);
    if (c->rope_scaling == CN_ROPE_LINEAR) {
      f /= c->rope_factor;
    } else if (c->rope_scaling == CN_ROPE_LLAMA3) {
      double old_ctx = c->rope_original_max_position, factor = c->rope_factor;
      double low = c->rope_low_freq_factor, high = c->rope_high_freq_factor;
      double wavelen = 2.0 * 3.14159265358979323846 / f;
      if (wavelen > old_ctx / low) {
        f /= factor;
      } else if (!(wavelen < old_ctx / high)) {
        double smooth = (old_ctx / wavelen - low) / (high - low);
        f = (1.0 - smooth) * f / factor + smooth * f;
      }
    }
    inv_freq[i] = (float)f;
  }
}
