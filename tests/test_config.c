/* config.json parsing: the supported architectures with their defaults, RoPE frequencies against
 * transformers' formulas, and each kind of bad config as an error naming the field at fault. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "canopy.h"
#include "model/config.h"
#include "tests/testing.h"

static const char *LLAMA3 = "{\n"
                            "  \"architectures\": [\"LlamaForCausalLM\"],\n"
                            "  \"attention_bias\": false,\n"
                            "  \"bos_token_id\": 128000,\n"
                            "  \"eos_token_id\": [128001, 128008, 128009],\n"
                            "  \"hidden_act\": \"silu\",\n"
                            "  \"hidden_size\": 4096,\n"
                            "  \"intermediate_size\": 14336,\n"
                            "  \"max_position_embeddings\": 131072,\n"
                            "  \"mlp_bias\": false,\n"
                            "  \"model_type\": \"llama\",\n"
                            "  \"num_attention_heads\": 32,\n"
                            "  \"num_hidden_layers\": 32,\n"
                            "  \"num_key_value_heads\": 8,\n"
                            "  \"rms_norm_eps\": 1e-05,\n"
                            "  \"rope_scaling\": {\"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0,\n"
                            "                   \"original_max_position_embeddings\": 8192, \"rope_type\": \"llama3\"},\n"
                            "  \"rope_theta\": 500000.0,\n"
                            "  \"tie_word_embeddings\": false,\n"
                            "  \"vocab_size\": 128256\n"
                            "}\n";

static const char *SMOLLM2 = "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false, \"bos_token_id\": 1,"
                             " \"eos_token_id\": 2, \"hidden_act\": \"silu\", \"hidden_size\": 576,"
                             " \"intermediate_size\": 1536, \"is_llama_config\": true, \"max_position_embeddings\": 8192,"
                             " \"mlp_bias\": false, \"model_type\": \"llama\", \"num_attention_heads\": 9,"
                             " \"num_hidden_layers\": 30, \"num_key_value_heads\": 3, \"pad_token_id\": 2,"
                             " \"rms_norm_eps\": 1e-05, \"rope_interleaved\": false, \"rope_scaling\": null,"
                             " \"rope_theta\": 100000, \"tie_word_embeddings\": true, \"torch_dtype\": \"bfloat16\","
                             " \"vocab_size\": 49152}";

static const char *MISTRAL = "{\"architectures\": [\"MistralForCausalLM\"], \"bos_token_id\": 1, \"eos_token_id\": 2,"
                             " \"hidden_act\": \"silu\", \"hidden_size\": 4096, \"intermediate_size\": 14336,"
                             " \"max_position_embeddings\": 32768, \"model_type\": \"mistral\", \"num_attention_heads\": 32,"
                             " \"num_hidden_layers\": 32, \"num_key_value_heads\": 8, \"rms_norm_eps\": 1e-05,"
                             " \"rope_theta\": 10000.0, \"sliding_window\": 4096, \"tie_word_embeddings\": false,"
                             " \"vocab_size\": 32000}";

static const char *QWEN2 = "{\"architectures\": [\"Qwen2ForCausalLM\"], \"bos_token_id\": 151643,"
                           " \"eos_token_id\": 151645, \"hidden_size\": 896, \"intermediate_size\": 4864,"
                           " \"max_position_embeddings\": 32768, \"max_window_layers\": 21, \"model_type\": \"qwen2\","
                           " \"num_attention_heads\": 14, \"num_hidden_layers\": 24, \"num_key_value_heads\": 2,"
                           " \"rms_norm_eps\": 1e-06, \"rope_theta\": 1000000.0, \"sliding_window\": 32768,"
                           " \"tie_word_embeddings\": true, \"use_sliding_window\": false, \"vocab_size\": 151936}";

/* A copy of `base` with the first occurrence of `from` replaced by `to` (malloc'd). */
static char *edit(const char *base, const char *from, const char *to) {
  const char *at = strstr(base, from);
  if (!at) fail_msg("'%s' is not in the config", from);
  size_t n = strlen(base) - strlen(from) + strlen(to) + 1, pre = (size_t)(at - base);
  char *s = malloc(n);
  assert_non_null(s);
  memcpy(s, base, pre);
  strcpy(s + pre, to);
  strcat(s, at + strlen(from));
  return s;
}

static void parse_ok(const char *json, cn_config *c) {
  int rc = cn_config_parse(json, strlen(json), "config.json", c);
  if (rc) printf("[ error    ] %s\n", canopy_last_error());
  assert_int_equal(rc, CANOPY_OK);
}

/* Parsing `json` fails with `status`, in one line naming `needle` and the file. */
static void parse_fails(const char *json, int status, const char *needle) {
  cn_config c;
  int rc = cn_config_parse(json, strlen(json), "config.json", &c);
  const char *msg = canopy_last_error();
  printf("[ error    ] %s: %s\n", canopy_status_string(rc), msg);
  assert_int_equal(rc, status);
  assert_non_null(strstr(msg, "config.json"));
  assert_null(strchr(msg, '\n'));
  if (!strstr(msg, needle)) printf("[ missing  ] '%s'\n", needle);
  assert_non_null(strstr(msg, needle));
}

static void parse_edit_fails(const char *base, const char *from, const char *to, int status, const char *needle) {
  char *json = edit(base, from, to);
  parse_fails(json, status, needle);
  free(json);
}

/* ---- good configs ------------------------------------------------------------------------ */

static void test_llama3_config_reads_every_field(void **state) {
  cn_config c;
  parse_ok(LLAMA3, &c);
  assert_string_equal(c.architecture, "LlamaForCausalLM");
  assert_int_equal(c.vocab_size, 128256);
  assert_int_equal(c.hidden_size, 4096);
  assert_int_equal(c.intermediate_size, 14336);
  assert_int_equal(c.n_layers, 32);
  assert_int_equal(c.n_heads, 32);
  assert_int_equal(c.n_kv_heads, 8);
  assert_int_equal(c.head_dim, 128);
  assert_int_equal(c.max_position_embeddings, 131072);
  assert_true(c.rms_norm_eps == 1e-5f);
  assert_true(c.rope_theta == 500000.0f);
  assert_false(c.tie_word_embeddings);
  assert_false(c.attention_bias);
  assert_false(c.o_bias);
  assert_false(c.mlp_bias);
  assert_int_equal(c.sliding_window, 0);
  assert_int_equal(c.rope_scaling, CN_ROPE_LLAMA3);
  assert_true(c.rope_factor == 8.0f);
  assert_true(c.rope_low_freq_factor == 1.0f);
  assert_true(c.rope_high_freq_factor == 4.0f);
  assert_int_equal(c.rope_original_max_position, 8192);
  assert_int_equal(c.bos_token_id, 128000);
  assert_int_equal(c.n_eos, 3);
  assert_int_equal(c.eos_token_ids[0], 128001);
  assert_int_equal(c.eos_token_ids[2], 128009);
}

/* transformers' _compute_default_rope_parameters then _compute_llama3_parameters, evaluated
 * element by element in long double from the definitions. */
static long double ref_llama3_inv_freq(int i, int dim, long double theta, long double factor, long double low,
                                       long double high, long double old_ctx) {
  long double f = 1.0L / powl(theta, (long double)(2 * i) / dim);
  long double wavelen = 2.0L * 3.141592653589793238462643383279503L / f;
  long double low_freq_wavelen = old_ctx / low, high_freq_wavelen = old_ctx / high;
  if (wavelen < high_freq_wavelen) return f;
  if (wavelen > low_freq_wavelen) return f / factor;
  long double smooth = (old_ctx / wavelen - low) / (high - low);
  return (1 - smooth) * f / factor + smooth * f;
}

static void test_llama3_inv_freq_matches_the_scaling_formula(void **state) {
  cn_config c;
  parse_ok(LLAMA3, &c);
  float inv[64];
  for (int i = 0; i < 64; i++) inv[i] = NAN;
  cn_config_rope_inv_freq(&c, inv);
  int bands[3] = {0, 0, 0}; /* kept, interpolated, divided */
  for (int i = 0; i < 64; i++) {
    long double want = ref_llama3_inv_freq(i, 128, 500000.0L, 8, 1, 4, 8192);
    long double unscaled = 1.0L / powl(500000.0L, (long double)(2 * i) / 128);
    bands[want == unscaled ? 0 : want == unscaled / 8 ? 2 : 1]++;
    double rel = fabs((double)((inv[i] - want) / want));
    if (rel > 0x1p-23) printf("[ inv_freq ] %d: %.9g, expected %.9Lg\n", i, inv[i], want);
    assert_true(rel <= 0x1p-23); /* rounded once to float */
  }
  printf("[ bands    ] kept %d, interpolated %d, divided %d\n", bands[0], bands[1], bands[2]);
  assert_true(bands[0] > 0 && bands[1] > 0 && bands[2] > 0);
  assert_true(inv[0] == 1.0f);
  /* The lowest frequency: 500000^(-126/128) / 8. */
  assert_true(fabsl(inv[63] / (powl(500000.0L, -126.0L / 128) / 8) - 1) < 1e-6L);
}

static void test_unscaled_and_linear_inv_freq_follow_the_formula(void **state) {
  cn_config c;
  parse_ok(SMOLLM2, &c);
  assert_int_equal(c.rope_scaling, CN_ROPE_NONE);
  float inv[32];
  cn_config_rope_inv_freq(&c, inv);
  for (int i = 0; i < 32; i++) {
    long double want = 1.0L / powl(100000.0L, (long double)(2 * i) / 64);
    assert_true(fabs((double)((inv[i] - want) / want)) <= 0x1p-23);
  }
  char *json = edit(SMOLLM2, "\"rope_scaling\": null", "\"rope_scaling\": {\"type\": \"linear\", \"factor\": 4}");
  parse_ok(json, &c);
  free(json);
  assert_int_equal(c.rope_scaling, CN_ROPE_LINEAR);
  assert_true(c.rope_factor == 4.0f);
  cn_config_rope_inv_freq(&c, inv);
  for (int i = 0; i < 32; i++) {
    long double want = 1.0L / powl(100000.0L, (long double)(2 * i) / 64) / 4;
    assert_true(fabs((double)((inv[i] - want) / want)) <= 0x1p-23);
  }
  json = edit(SMOLLM2, "\"rope_scaling\": null", "\"rope_scaling\": {\"rope_type\": \"default\"}");
  parse_ok(json, &c);
  free(json);
  assert_int_equal(c.rope_scaling, CN_ROPE_NONE);
}

static void test_nested_rope_parameters_are_read(void **state) {
  /* transformers 5 moves rope_theta and the scaling into one object. */
  char *json = edit(LLAMA3, "\"rope_scaling\": {", "\"rope_parameters\": {\"rope_theta\": 250000.0, ");
  char *json2 = edit(json, "\"rope_theta\": 500000.0,", "");
  cn_config c;
  parse_ok(json2, &c);
  assert_true(c.rope_theta == 250000.0f);
  assert_int_equal(c.rope_scaling, CN_ROPE_LLAMA3);
  assert_true(c.rope_factor == 8.0f);
  assert_int_equal(c.rope_original_max_position, 8192);
  free(json);
  free(json2);
  json = edit(SMOLLM2, "\"rope_scaling\": null", "\"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 7.0}");
  parse_ok(json, &c);
  free(json);
  assert_true(c.rope_theta == 7.0f);
  assert_int_equal(c.rope_scaling, CN_ROPE_NONE);
}

static void test_mistral_config_keeps_its_sliding_window(void **state) {
  cn_config c;
  parse_ok(MISTRAL, &c);
  assert_string_equal(c.architecture, "MistralForCausalLM");
  assert_int_equal(c.sliding_window, 4096);
  assert_int_equal(c.head_dim, 128);
  assert_int_equal(c.n_kv_heads, 8);
  assert_false(c.attention_bias);
  assert_int_equal(c.n_eos, 1);
  assert_int_equal(c.eos_token_ids[0], 2);
  char *json = edit(MISTRAL, "\"sliding_window\": 4096", "\"sliding_window\": null, \"head_dim\": 160");
  parse_ok(json, &c);
  free(json);
  assert_int_equal(c.sliding_window, 0);
  assert_int_equal(c.head_dim, 160);
}

static void test_qwen2_config_has_qkv_biases_and_a_window_only_when_enabled(void **state) {
  cn_config c;
  parse_ok(QWEN2, &c);
  assert_string_equal(c.architecture, "Qwen2ForCausalLM");
  assert_true(c.attention_bias);
  assert_false(c.o_bias);
  assert_false(c.mlp_bias);
  assert_true(c.tie_word_embeddings);
  assert_int_equal(c.head_dim, 64);
  assert_int_equal(c.sliding_window, 0); /* use_sliding_window is false */
  assert_true(c.rope_theta == 1e6f);
  assert_true(c.rms_norm_eps == 1e-6f);
  char *on = edit(QWEN2, "\"use_sliding_window\": false", "\"use_sliding_window\": true");
  /* Windows from layer 21 of 24 on: not one window for the whole model. */
  parse_fails(on, CANOPY_ERR_UNSUPPORTED, "max_window_layers");
  char *all = edit(on, "\"max_window_layers\": 21", "\"max_window_layers\": 0");
  parse_ok(all, &c);
  assert_int_equal(c.sliding_window, 32768);
  char *none = edit(on, "\"max_window_layers\": 21", "\"max_window_layers\": 24");
  parse_ok(none, &c);
  assert_int_equal(c.sliding_window, 0);
  free(on);
  free(all);
  free(none);
}

static void test_smollm2_config_ties_embeddings(void **state) {
  cn_config c;
  parse_ok(SMOLLM2, &c);
  assert_string_equal(c.architecture, "LlamaForCausalLM");
  assert_true(c.tie_word_embeddings);
  assert_int_equal(c.head_dim, 64);
  assert_int_equal(c.n_heads, 9);
  assert_int_equal(c.n_kv_heads, 3);
  assert_int_equal(c.bos_token_id, 1);
  assert_int_equal(c.n_eos, 1);
  assert_int_equal(c.eos_token_ids[0], 2);
  assert_true(c.rope_theta == 100000.0f);
}

static void test_absent_optional_fields_take_transformers_defaults(void **state) {
  const char *json = "{\"model_type\": \"llama\", \"vocab_size\": 10, \"hidden_size\": 8, \"intermediate_size\": 16,"
                     " \"num_hidden_layers\": 1, \"num_attention_heads\": 2, \"max_position_embeddings\": 64,"
                     " \"num_key_value_heads\": null, \"bos_token_id\": null}";
  cn_config c;
  parse_ok(json, &c);
  assert_string_equal(c.architecture, "LlamaForCausalLM");
  assert_int_equal(c.n_kv_heads, 2);
  assert_int_equal(c.head_dim, 4);
  assert_true(c.rope_theta == 10000.0f);
  assert_true(c.rms_norm_eps == 1e-6f);
  assert_false(c.tie_word_embeddings);
  assert_int_equal(c.rope_scaling, CN_ROPE_NONE);
  assert_int_equal(c.bos_token_id, -1);
  assert_int_equal(c.n_eos, 0);
  char *biased = edit(json, "\"model_type\": \"llama\"", "\"model_type\": \"llama\", \"attention_bias\": true, \"mlp_bias\": true");
  parse_ok(biased, &c);
  free(biased);
  assert_true(c.attention_bias && c.o_bias && c.mlp_bias);
}

static void test_config_load_reads_the_file_and_names_a_missing_one(void **state) {
  char dir[] = "/tmp/canopy-config-XXXXXX", path[64];
  assert_non_null(mkdtemp(dir));
  snprintf(path, sizeof path, "%s/config.json", dir);
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fputs(MISTRAL, f);
  fclose(f);
  cn_config c;
  assert_int_equal(cn_config_load(path, &c), CANOPY_OK);
  assert_int_equal(c.sliding_window, 4096);
  f = fopen(path, "w");
  fputs("{\"architectures\": [\"MistralForCausalLM\"], \"vocab_size\": 0}", f);
  fclose(f);
  assert_int_equal(cn_config_load(path, &c), CANOPY_ERR_FORMAT);
  assert_non_null(strstr(canopy_last_error(), path));
  assert_non_null(strstr(canopy_last_error(), "'vocab_size'"));
  remove(path);
  assert_int_equal(cn_config_load(path, &c), CANOPY_ERR_IO);
  printf("[ error    ] %s\n", canopy_last_error());
  assert_non_null(strstr(canopy_last_error(), path));
  remove(dir);
}

/* ---- bad configs ------------------------------------------------------------------------- */

static void test_malformed_json_is_a_format_error_with_its_offset(void **state) {
  parse_fails("{\"hidden_size\": 576,", CANOPY_ERR_FORMAT, "byte offset");
  parse_fails("{\"hidden_size\": 576 \"vocab_size\": 3}", CANOPY_ERR_FORMAT, "byte offset 20");
  parse_fails("", CANOPY_ERR_FORMAT, "JSON");
  parse_fails("{} {}", CANOPY_ERR_FORMAT, "byte offset 3");
  parse_fails("[1, 2]", CANOPY_ERR_FORMAT, "object");
}

static void test_missing_required_field_is_named(void **state) {
  const char *fields[] = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "max_position_embeddings"};
  for (int i = 0; i < 6; i++) {
    char from[64], to[64], needle[80];
    snprintf(from, sizeof from, "\"%s\"", fields[i]);
    snprintf(to, sizeof to, "\"x_%s\"", fields[i]);
    snprintf(needle, sizeof needle, "missing field '%s'", fields[i]);
    parse_edit_fails(SMOLLM2, from, to, CANOPY_ERR_FORMAT, needle);
  }
  parse_edit_fails(LLAMA3, "\"low_freq_factor\"", "\"low\"", CANOPY_ERR_FORMAT, "'rope_scaling.low_freq_factor'");
}

static void test_wrong_type_or_value_is_named(void **state) {
  parse_edit_fails(SMOLLM2, "\"num_attention_heads\": 9", "\"num_attention_heads\": \"9\"", CANOPY_ERR_FORMAT,
                   "field 'num_attention_heads' must be a positive integer");
  parse_edit_fails(SMOLLM2, "\"num_attention_heads\": 9", "\"num_attention_heads\": 0", CANOPY_ERR_FORMAT,
                   "field 'num_attention_heads' must be a positive integer");
  parse_edit_fails(SMOLLM2, "\"hidden_size\": 576", "\"hidden_size\": 57.6", CANOPY_ERR_FORMAT, "'hidden_size'");
  parse_edit_fails(SMOLLM2, "\"hidden_size\": 576", "\"hidden_size\": -576", CANOPY_ERR_FORMAT, "'hidden_size'");
  parse_edit_fails(SMOLLM2, "\"vocab_size\": 49152", "\"vocab_size\": 1e12", CANOPY_ERR_FORMAT, "'vocab_size'");
  parse_edit_fails(SMOLLM2, "\"tie_word_embeddings\": true", "\"tie_word_embeddings\": 1", CANOPY_ERR_FORMAT,
                   "'tie_word_embeddings'");
  parse_edit_fails(SMOLLM2, "\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 0", CANOPY_ERR_FORMAT, "'rms_norm_eps'");
  parse_edit_fails(SMOLLM2, "\"rope_theta\": 100000", "\"rope_theta\": \"big\"", CANOPY_ERR_FORMAT, "'rope_theta'");
  parse_edit_fails(SMOLLM2, "\"eos_token_id\": 2", "\"eos_token_id\": [2, \"x\"]", CANOPY_ERR_FORMAT, "'eos_token_id'");
  parse_edit_fails(SMOLLM2, "\"eos_token_id\": 2", "\"eos_token_id\": \"</s>\"", CANOPY_ERR_FORMAT, "'eos_token_id'");
  parse_edit_fails(SMOLLM2, "\"eos_token_id\": 2", "\"eos_token_id\": [1,2,3,4,5,6,7,8,9]", CANOPY_ERR_UNSUPPORTED,
                   "'eos_token_id'");
  parse_edit_fails(SMOLLM2, "\"rope_scaling\": null", "\"rope_scaling\": 8", CANOPY_ERR_FORMAT, "'rope_scaling'");
  parse_edit_fails(SMOLLM2, "\"architectures\": [\"LlamaForCausalLM\"]", "\"architectures\": \"LlamaForCausalLM\"",
                   CANOPY_ERR_FORMAT, "'architectures'");
  parse_edit_fails(LLAMA3, "\"high_freq_factor\": 4.0", "\"high_freq_factor\": 1.0", CANOPY_ERR_FORMAT,
                   "high_freq_factor");
  parse_edit_fails(MISTRAL, "\"sliding_window\": 4096", "\"sliding_window\": -1", CANOPY_ERR_FORMAT, "'sliding_window'");
}

static void test_unsupported_architecture_is_named(void **state) {
  parse_fails("{\"architectures\": [\"BertModel\"], \"model_type\": \"bert\"}", CANOPY_ERR_UNSUPPORTED, "BertModel");
  parse_fails("{\"model_type\": \"gpt2\", \"vocab_size\": 3}", CANOPY_ERR_UNSUPPORTED, "gpt2");
  parse_fails("{\"vocab_size\": 3}", CANOPY_ERR_FORMAT, "model_type");
  parse_edit_fails(LLAMA3, "\"LlamaForCausalLM\"", "\"LlamaForSequenceClassification\"", CANOPY_ERR_UNSUPPORTED,
                   "LlamaForSequenceClassification");
}

static void test_unsupported_rope_scaling_type_is_named(void **state) {
  parse_edit_fails(LLAMA3, "\"rope_type\": \"llama3\"", "\"rope_type\": \"yarn\"", CANOPY_ERR_UNSUPPORTED, "yarn");
  parse_edit_fails(SMOLLM2, "\"rope_scaling\": null", "\"rope_scaling\": {\"type\": \"dynamic\", \"factor\": 2}",
                   CANOPY_ERR_UNSUPPORTED, "dynamic");
  parse_edit_fails(SMOLLM2, "\"rope_scaling\": null", "\"rope_scaling\": {\"factor\": 2}", CANOPY_ERR_FORMAT,
                   "rope_type");
}

static void test_heads_not_divisible_by_kv_heads_is_an_error(void **state) {
  parse_edit_fails(SMOLLM2, "\"num_key_value_heads\": 3", "\"num_key_value_heads\": 4", CANOPY_ERR_FORMAT,
                   "'num_attention_heads' (9) must be a multiple of num_key_value_heads (4)");
  /* hidden_size not divisible by the heads, and no head_dim to say otherwise. */
  parse_edit_fails(SMOLLM2, "\"hidden_size\": 576", "\"hidden_size\": 577", CANOPY_ERR_FORMAT, "'hidden_size' (577)");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_llama3_config_reads_every_field),
      cmocka_unit_test(test_llama3_inv_freq_matches_the_scaling_formula),
      cmocka_unit_test(test_unscaled_and_linear_inv_freq_follow_the_formula),
      cmocka_unit_test(test_nested_rope_parameters_are_read),
      cmocka_unit_test(test_mistral_config_keeps_its_sliding_window),
      cmocka_unit_test(test_qwen2_config_has_qkv_biases_and_a_window_only_when_enabled),
      cmocka_unit_test(test_smollm2_config_ties_embeddings),
      cmocka_unit_test(test_absent_optional_fields_take_transformers_defaults),
      cmocka_unit_test(test_config_load_reads_the_file_and_names_a_missing_one),
      cmocka_unit_test(test_malformed_json_is_a_format_error_with_its_offset),
      cmocka_unit_test(test_missing_required_field_is_named),
      cmocka_unit_test(test_wrong_type_or_value_is_named),
      cmocka_unit_test(test_unsupported_architecture_is_named),
      cmocka_unit_test(test_unsupported_rope_scaling_type_is_named),
      cmocka_unit_test(test_heads_not_divisible_by_kv_heads_is_an_error),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
