/* safetensors reading: files crafted here, byte by byte, in a fresh temporary folder. Good files
 * read back exactly; each way a file can be wrong is an error whose message names the culprit. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "canopy.h"
#include "model/safetensors.h"
#include "tests/testing.h"

static char tmp[64];

/* ---- crafting files ---------------------------------------------------------------------- */

/* tmp/<name>, in a rotating set of buffers so that a test may hold several. */
static const char *tmp_path(const char *name) {
  static char bufs[8][512];
  static int next;
  char *p = bufs[next++ % 8];
  snprintf(p, 512, "%s/%s", tmp, name);
  return p;
}

static const char *tmp_dir(const char *name) {
  const char *p = tmp_path(name);
  assert_int_equal(mkdir(p, 0755), 0);
  return p;
}

static void write_bytes(const char *path, const void *bytes, size_t n) {
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(bytes, 1, n, f), n);
  assert_int_equal(fclose(f), 0);
}

/* A safetensors file: the length of `header` as 8 little-endian bytes, the header, the data. */
static const char *write_st_len(const char *path, uint64_t header_len, const char *header, const void *data,
                                size_t data_len) {
  size_t hl = strlen(header), n = 8 + hl + data_len;
  unsigned char *buf = malloc(n);
  assert_non_null(buf);
  for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(header_len >> (8 * i));
  memcpy(buf + 8, header, hl);
  if (data_len) memcpy(buf + 8 + hl, data, data_len);
  write_bytes(path, buf, n);
  free(buf);
  return path;
}

static const char *write_st(const char *path, const char *header, const void *data, size_t data_len) {
  return write_st_len(path, strlen(header), header, data, data_len);
}

/* A file whose data section is `data_len` zero bytes. */
static const char *write_st_zeros(const char *name, const char *header, size_t data_len) {
  void *zeros = calloc(1, data_len + 1);
  const char *p = write_st(tmp_path(name), header, zeros, data_len);
  free(zeros);
  return p;
}

/* Opening `path` fails with `status`, and the message names every needle (NULL-terminated). */
static void expect_open_error(const char *path, int is_dir, int status, ...) {
  cn_st *st = (cn_st *)&st; /* any non-NULL value, to see it cleared */
  int rc = is_dir ? cn_st_open(path, &st) : cn_st_open_file(path, &st);
  const char *msg = canopy_last_error();
  printf("[ error    ] %s -> %s: %s\n", path, canopy_status_string(rc), msg);
  assert_int_equal(rc, status);
  assert_null(st);
  assert_null(strchr(msg, '\n'));
  va_list ap;
  va_start(ap, status);
  for (const char *needle; (needle = va_arg(ap, const char *));) {
    if (!strstr(msg, needle)) printf("[ missing  ] '%s'\n", needle);
    assert_non_null(strstr(msg, needle));
  }
  va_end(ap);
}

/* ---- reference conversions, written from the definitions of the formats ----------------- */

static float ref_half(uint16_t h) {
  int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v = e == 0x1f ? (m ? NAN : INFINITY) : e == 0 ? ldexp(m, -24) : ldexp(0x400 + m, e - 25);
  return (float)((h & 0x8000) ? -v : v);
}

static float ref_bf16(uint16_t h) {
  int e = (h >> 7) & 0xff, m = h & 0x7f;
  double v = e == 0xff ? (m ? NAN : INFINITY) : e == 0 ? ldexp(m, -133) : ldexp(0x80 + m, e - 134);
  return (float)((h & 0x8000) ? -v : v);
}

static uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

/* Equal bit for bit, except that any NaN matches a NaN of the same sign. */
static void assert_same_float(float got, float want, size_t i) {
  if (isnan(want)) {
    if (!isnan(got) || signbit(got) != signbit(want)) printf("[ element  ] %zu: %a, expected NaN\n", i, got);
    assert_true(isnan(got) && signbit(got) == signbit(want));
    return;
  }
  if (bits_of(got) != bits_of(want)) printf("[ element  ] %zu: %a, expected %a\n", i, got, want);
  assert_int_equal(bits_of(got), bits_of(want));
}

static void put16(unsigned char *p, uint16_t v) {
  p[0] = (unsigned char)v;
  p[1] = (unsigned char)(v >> 8);
}

/* ---- good files -------------------------------------------------------------------------- */

static void test_f32_f16_bf16_tensors_read_back_exactly(void **state) {
  uint64_t rng = cn_test_seed("test_f32_f16_bf16_tensors_read_back_exactly");
  /* f32: [3, 5] random; f16: every one of the 65536 halves; bf16: specials then random bits. */
  enum { NF32 = 15, NF16 = 65536, NBF16 = 120 };
  size_t o_f16 = NF32 * 4, o_bf16 = o_f16 + NF16 * 2, o_scalar = o_bf16 + NBF16 * 2, size = o_scalar + 4;
  unsigned char *data = malloc(size);
  assert_non_null(data);
  float f32[NF32];
  for (int i = 0; i < NF32; i++) f32[i] = cn_test_randf(&rng) * 1e3f;
  memcpy(data, f32, sizeof f32);
  for (int i = 0; i < NF16; i++) put16(data + o_f16 + 2 * i, (uint16_t)i);
  const uint16_t specials[] = {0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0, 0xffc1, 0x0001, 0x807f, 0x0080, 0x3f80, 0x7f7f};
  uint16_t bf16[NBF16];
  for (int i = 0; i < NBF16; i++)
    bf16[i] = i < (int)(sizeof specials / sizeof specials[0]) ? specials[i] : (uint16_t)cn_test_rand(&rng);
  for (int i = 0; i < NBF16; i++) put16(data + o_bf16 + 2 * i, bf16[i]);
  float scalar = -2.5f;
  memcpy(data + o_scalar, &scalar, 4);

  char header[1024];
  int n = snprintf(header, sizeof header,
                   "{\"__metadata__\":{\"format\":\"pt\"},"
                   "\"w.f32\":{\"dtype\":\"F32\",\"shape\":[3,5],\"data_offsets\":[0,%zu]},"
                   "\"w.f16\":{\"dtype\":\"F16\",\"shape\":[256,16,16],\"data_offsets\":[%zu,%zu]},"
                   "\"w.bf16\":{\"dtype\":\"BF16\",\"shape\":[2,3,4,5],\"data_offsets\":[%zu,%zu]},"
                   "\"w.scalar\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[%zu,%zu]},"
                   "\"w.empty\":{\"dtype\":\"BF16\",\"shape\":[0,7],\"data_offsets\":[%zu,%zu]}}",
                   o_f16, o_f16, o_bf16, o_bf16, o_scalar, o_scalar, size, size, size);
  while (n % 8) header[n++] = ' '; /* padded, as writers align the data section */
  header[n] = '\0';
  const char *path = write_st(tmp_path("good.safetensors"), header, data, size);

  cn_st *st = NULL;
  assert_int_equal(cn_st_open_file(path, &st), CANOPY_OK);
  assert_int_equal(cn_st_count(st), 5);
  assert_null(cn_st_at(st, 5));
  for (int i = 0; i < 5; i++) assert_ptr_equal(cn_st_find(st, cn_st_at(st, i)->name), cn_st_at(st, i));
  assert_null(cn_st_find(st, "__metadata__"));
  assert_null(cn_st_find(st, "w"));

  const cn_st_tensor *t = cn_st_find(st, "w.f32");
  assert_non_null(t);
  assert_int_equal(t->dtype, CN_F32);
  assert_int_equal(t->ndim, 2);
  assert_int_equal(t->shape[0], 3);
  assert_int_equal(t->shape[1], 5);
  assert_int_equal(t->nbytes, NF32 * 4);
  assert_string_equal(t->file, path);
  float out32[NF32 + 1];
  out32[NF32] = 12345.f;
  cn_st_to_f32(t, out32);
  for (int i = 0; i < NF32; i++) assert_same_float(out32[i], f32[i], (size_t)i);
  assert_true(out32[NF32] == 12345.f); /* nothing written past the tensor */

  t = cn_st_find(st, "w.f16");
  assert_non_null(t);
  assert_int_equal(t->dtype, CN_F16);
  assert_int_equal(t->ndim, 3);
  assert_int_equal(t->nbytes, NF16 * 2);
  float *out16 = malloc(sizeof(float) * NF16);
  assert_non_null(out16);
  for (int i = 0; i < NF16; i++) out16[i] = NAN;
  cn_st_to_f32(t, out16);
  for (int i = 0; i < NF16; i++) assert_same_float(out16[i], ref_half((uint16_t)i), (size_t)i);
  /* Landmarks, spelled out: the smallest subnormal, the largest subnormal, the smallest
   * normal, the largest finite, infinity, and a quiet NaN keeping its payload bit. */
  assert_true(out16[0x0001] == 0x1p-24f);
  assert_true(out16[0x03ff] == 0x1.ff8p-15f);
  assert_true(out16[0x0400] == 0x1p-14f);
  assert_true(out16[0x7bff] == 65504.0f);
  assert_true(out16[0x3c00] == 1.0f);
  assert_true(isinf(out16[0x7c00]) && out16[0x7c00] > 0);
  assert_true(isinf(out16[0xfc00]) && out16[0xfc00] < 0);
  assert_true(bits_of(out16[0x8000]) == 0x80000000u);
  assert_int_equal(bits_of(out16[0x7e00]), 0x7fc00000u);
  free(out16);

  t = cn_st_find(st, "w.bf16");
  assert_non_null(t);
  assert_int_equal(t->dtype, CN_BF16);
  assert_int_equal(t->ndim, 4);
  assert_int_equal(t->shape[3], 5);
  float outb[NBF16];
  cn_st_to_f32(t, outb);
  for (int i = 0; i < NBF16; i++) assert_same_float(outb[i], ref_bf16(bf16[i]), (size_t)i);
  for (int i = 0; i < NBF16; i++)
    if (!isnan(outb[i])) assert_int_equal(bits_of(outb[i]), (uint32_t)bf16[i] << 16);

  t = cn_st_find(st, "w.scalar");
  assert_int_equal(t->ndim, 0);
  float s = 0;
  cn_st_to_f32(t, &s);
  assert_true(s == -2.5f);
  t = cn_st_find(st, "w.empty");
  assert_int_equal(t->nbytes, 0);
  assert_int_equal(t->shape[0], 0);
  cn_st_close(st);
  free(data);
}

/* An unpadded header of odd length leaves the data section unaligned; reading must not care
 * (UBSan checks the loads). */
static void test_unaligned_data_section_is_read_correctly(void **state) {
  const char *header = "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
                       "\"b\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[12,14]}} ";
  if (strlen(header) % 2 == 0) fail_msg("the header should have odd length");
  unsigned char data[14];
  float want[3] = {1.5f, -0.0f, 3e38f};
  memcpy(data, want, 12);
  put16(data + 12, 0xc000); /* -2 */
  cn_st *st;
  assert_int_equal(cn_st_open_file(write_st(tmp_path("odd.safetensors"), header, data, sizeof data), &st), CANOPY_OK);
  float got[3];
  cn_st_to_f32(cn_st_find(st, "a"), got);
  for (int i = 0; i < 3; i++) assert_same_float(got[i], want[i], (size_t)i);
  cn_st_to_f32(cn_st_find(st, "b"), got);
  assert_true(got[0] == -2.0f);
  cn_st_close(st);
}

static void test_folder_with_model_safetensors_opens(void **state) {
  const char *dir = tmp_dir("single");
  char path[600];
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  float v[2] = {7, 8};
  write_st(path, "{\"x\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]}}", v, sizeof v);
  cn_st *st;
  assert_int_equal(cn_st_open(dir, &st), CANOPY_OK);
  assert_int_equal(cn_st_count(st), 1);
  const cn_st_tensor *t;
  int64_t shape[2] = {1, 2};
  assert_int_equal(cn_st_expect(st, "x", 2, shape, &t), CANOPY_OK);
  assert_string_equal(t->file, path);
  cn_st_close(st);
}

static void test_find_locates_each_of_thousands_of_tensors(void **state) {
  enum { N = 3000 };
  size_t cap = (size_t)N * 96 + 16, at = 0;
  char *header = malloc(cap);
  assert_non_null(header);
  at += (size_t)snprintf(header, cap, "{");
  /* Written in an order unrelated to the names' sorted order. */
  for (int k = 0; k < N; k++) {
    int i = (int)(((long)k * 1237) % N);
    at += (size_t)snprintf(header + at, cap - at, "%s\"model.layers.%d.w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[%d,%d]}",
                           k ? "," : "", i, 4 * i, 4 * i + 4);
  }
  snprintf(header + at, cap - at, "}");
  float *data = malloc(sizeof(float) * N);
  assert_non_null(data);
  for (int i = 0; i < N; i++) data[i] = (float)i;
  cn_st *st;
  assert_int_equal(cn_st_open_file(write_st(tmp_path("many.safetensors"), header, data, sizeof(float) * N), &st),
                   CANOPY_OK);
  assert_int_equal(cn_st_count(st), N);
  for (int i = 0; i < N; i++) {
    char name[64];
    snprintf(name, sizeof name, "model.layers.%d.w", i);
    const cn_st_tensor *t = cn_st_find(st, name);
    assert_non_null(t);
    assert_string_equal(t->name, name);
    float v;
    cn_st_to_f32(t, &v);
    assert_true(v == (float)i);
  }
  assert_null(cn_st_find(st, "model.layers.3000.w"));
  assert_null(cn_st_find(st, "model.layers.-1.w"));
  assert_null(cn_st_find(st, ""));
  cn_st_close(st);
  free(header);
  free(data);
}

/* ---- sharded checkpoints ----------------------------------------------------------------- */

#define SHARD1 "model-00001-of-00002.safetensors"
#define SHARD2 "model-00002-of-00002.safetensors"

/* Two shards: a, b in the first; c in the second. `index` is the index file's text. */
static const char *sharded_dir(const char *name, const char *index) {
  const char *dir = tmp_dir(name);
  char path[600];
  float v1[3] = {1, 2, 3}, v2[2] = {4, 5};
  snprintf(path, sizeof path, "%s/" SHARD1, dir);
  write_st(path,
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
           "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
           v1, sizeof v1);
  snprintf(path, sizeof path, "%s/" SHARD2, dir);
  write_st(path, "{\"c\":{\"dtype\":\"F32\",\"shape\":[2,1],\"data_offsets\":[0,8]}}", v2, sizeof v2);
  snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
  write_bytes(path, index, strlen(index));
  return dir;
}

static void test_sharded_checkpoint_gathers_every_shard(void **state) {
  const char *dir = sharded_dir("sharded", "{\"metadata\":{\"total_size\":20},\"weight_map\":{"
                                           "\"a\":\"" SHARD1 "\",\"c\":\"" SHARD2 "\",\"b\":\"" SHARD1 "\"}}");
  cn_st *st;
  assert_int_equal(cn_st_open(dir, &st), CANOPY_OK);
  assert_int_equal(cn_st_count(st), 3); /* each shard read once although named twice */
  const char *names[] = {"a", "b", "c"};
  const char *files[] = {SHARD1, SHARD1, SHARD2};
  float want[] = {1, 3, 4}, got[2];
  for (int i = 0; i < 3; i++) {
    const cn_st_tensor *t = cn_st_find(st, names[i]);
    assert_non_null(t);
    assert_non_null(strstr(t->file, files[i]));
    cn_st_to_f32(t, got);
    assert_true(got[0] == want[i]);
  }
  cn_st_close(st);
}

static void test_index_naming_a_missing_shard_is_an_error_naming_the_shard(void **state) {
  const char *dir = sharded_dir("noshard", "{\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1 "\","
                                           "\"c\":\"" SHARD2 "\",\"d\":\"model-00003-of-00002.safetensors\"}}");
  expect_open_error(dir, 1, CANOPY_ERR_IO, "model.safetensors.index.json", "model-00003-of-00002.safetensors", NULL);
}

static void test_index_disagreeing_with_the_shards_is_an_error_naming_the_tensor(void **state) {
  /* c is said to be in the first shard but lives in the second. */
  const char *dir = sharded_dir("wrongshard", "{\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1 "\","
                                              "\"c\":\"" SHARD1 "\",\"x\":\"" SHARD2 "\"}}");
  expect_open_error(dir, 1, CANOPY_ERR_FORMAT, "model.safetensors.index.json", "'c'", NULL);
  /* A tensor listed that no shard holds. */
  dir = sharded_dir("ghost", "{\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1 "\",\"c\":\"" SHARD2 "\","
                             "\"ghost\":\"" SHARD2 "\"}}");
  expect_open_error(dir, 1, CANOPY_ERR_FORMAT, "'ghost'", "no shard holds it", NULL);
  /* A tensor in a shard that the index leaves out. */
  dir = sharded_dir("unlisted", "{\"weight_map\":{\"a\":\"" SHARD1 "\",\"c\":\"" SHARD2 "\"}}");
  expect_open_error(dir, 1, CANOPY_ERR_FORMAT, "'b'", SHARD1, "not listed", NULL);
  /* No weight_map at all; a shard name that leaves the folder. */
  dir = sharded_dir("nomap", "{\"metadata\":{}}");
  expect_open_error(dir, 1, CANOPY_ERR_FORMAT, "model.safetensors.index.json", "weight_map", NULL);
  dir = sharded_dir("escape", "{\"weight_map\":{\"a\":\"../" SHARD1 "\"}}");
  expect_open_error(dir, 1, CANOPY_ERR_FORMAT, "model.safetensors.index.json", "'a'", NULL);
  dir = sharded_dir("badindex", "{\"weight_map\":{\"a\": }");
  expect_open_error(dir, 1, CANOPY_ERR_FORMAT, "model.safetensors.index.json", "JSON", NULL);
}

static void test_tensor_in_two_shards_is_an_error_naming_both(void **state) {
  const char *dir = tmp_dir("twice");
  char p1[600], p2[600], idx[600];
  float v = 1;
  snprintf(p1, sizeof p1, "%s/" SHARD1, dir);
  snprintf(p2, sizeof p2, "%s/" SHARD2, dir);
  snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", dir);
  write_st(p1, "{\"dup\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", &v, 4);
  write_st(p2, "{\"dup\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", &v, 4);
  const char *index = "{\"weight_map\":{\"dup\":\"" SHARD1 "\",\"dup\":\"" SHARD2 "\"}}";
  write_bytes(idx, index, strlen(index));
  expect_open_error(dir, 1, CANOPY_ERR_FORMAT, "'dup'", SHARD1, SHARD2, NULL);
}

static void test_folder_without_weights_is_an_io_error_naming_it(void **state) {
  const char *dir = tmp_dir("empty");
  expect_open_error(dir, 1, CANOPY_ERR_IO, dir, "model.safetensors", NULL);
  expect_open_error(tmp_path("does-not-exist"), 1, CANOPY_ERR_IO, "does-not-exist", NULL);
  expect_open_error(tmp_path("nofile.safetensors"), 0, CANOPY_ERR_IO, "nofile.safetensors", NULL);
}

/* ---- bad files --------------------------------------------------------------------------- */

static void test_truncated_file_is_an_error_naming_the_file(void **state) {
  const char *p = tmp_path("tiny.safetensors");
  write_bytes(p, "\x10\0\0", 3);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "tiny.safetensors", "3 bytes", NULL);
  write_bytes(p, "", 0);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "tiny.safetensors", "0 bytes", NULL);
  /* A good file cut inside its header. */
  const char *header = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
  char full[256];
  size_t hl = strlen(header);
  for (int i = 0; i < 8; i++) full[i] = (char)(i ? 0 : hl);
  memcpy(full + 8, header, hl);
  p = tmp_path("cut.safetensors");
  write_bytes(p, full, 8 + hl / 2);
  char want[64];
  snprintf(want, sizeof want, "header length %zu", hl);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "cut.safetensors", want, NULL);
  /* Cut inside the data section: the tensor's offsets run past the end. */
  write_bytes(p, (memcpy(full + 8 + hl, "\0\0", 2), full), 8 + hl + 2);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "cut.safetensors", "'a'", "[0, 4]", NULL);
}

static void test_header_length_past_eof_is_an_error_giving_both_sizes(void **state) {
  const char *header = "{}";
  const char *p = write_st_len(tmp_path("long.safetensors"), 9999999, header, NULL, 0);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "long.safetensors", "9999999", "10 bytes", NULL);
  /* 8 + N would wrap around in 64 bits. */
  p = write_st_len(tmp_path("wrap.safetensors"), UINT64_MAX - 3, header, NULL, 0);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "wrap.safetensors", "18446744073709551612", NULL);
}

static void test_header_that_is_not_json_is_an_error_with_its_offset(void **state) {
  const char *p = write_st_zeros("nojson.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1] \"data_offsets\":[0,4]}}", 4);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "nojson.safetensors", "JSON", "byte offset", NULL);
  p = write_st_zeros("notobject.safetensors", "[1, 2, 3]", 0);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "notobject.safetensors", "object", NULL);
  p = write_st_zeros("trailing.safetensors", "{} x", 0);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "trailing.safetensors", "byte offset 11", NULL);
  p = write_st_zeros("emptyheader.safetensors", "", 0);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "emptyheader.safetensors", "JSON", NULL);
  p = write_st_zeros("entry.safetensors", "{\"a\": 3}", 0);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "entry.safetensors", "'a'", NULL);
}

static void test_offsets_outside_the_data_section_are_an_error_naming_the_tensor(void **state) {
  const char *p = write_st_zeros("outside.safetensors",
                                 "{\"ok\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                                 "\"far\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
                                 12);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "outside.safetensors", "'far'", "[8, 16]", "12 bytes", NULL);
  p = write_st_zeros("backwards.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 8);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "backwards.safetensors", "'t'", "[4, 0]", NULL);
  p = write_st_zeros("negoff.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 8);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "negoff.safetensors", "'t'", "data_offsets", NULL);
  p = write_st_zeros("nooff.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 8);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "nooff.safetensors", "'t'", "data_offsets", NULL);
  p = write_st_zeros("strofs.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[\"0\",4]}}", 8);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "strofs.safetensors", "'t'", "data_offsets", NULL);
}

static void test_overlapping_tensors_are_an_error_naming_both(void **state) {
  const char *p = write_st_zeros("overlap.safetensors",
                                 "{\"y\":{\"dtype\":\"F32\",\"shape\":[16],\"data_offsets\":[32,96]},"
                                 "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[40,40]},"
                                 "\"x\":{\"dtype\":\"F32\",\"shape\":[16],\"data_offsets\":[0,64]}}",
                                 96);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "overlap.safetensors", "'y' data_offsets [32, 96] overlap tensor 'x' [0, 64]",
                    NULL);
  /* The same bytes named twice. */
  p = write_st_zeros("alias.safetensors",
                     "{\"p\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]},"
                     "\"q\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,4]}}",
                     4);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "alias.safetensors", "'p'", "'q'", "overlap", NULL);
}

static void test_size_mismatch_with_shape_is_an_error_naming_the_tensor(void **state) {
  const char *p = write_st_zeros("size.safetensors", "{\"w\":{\"dtype\":\"BF16\",\"shape\":[3,4],\"data_offsets\":[0,48]}}", 48);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "size.safetensors", "'w'", "[3, 4]", "24 bytes", "48 bytes", NULL);
}

static void test_unknown_dtype_is_a_dtype_error_naming_tensor_and_dtype(void **state) {
  const char *dtypes[] = {"I8", "F8_E4M3", "U8", "F64", "bf16"};
  for (int i = 0; i < 5; i++) {
    char header[256];
    snprintf(header, sizeof header, "{\"layer.q\":{\"dtype\":\"%s\",\"shape\":[4],\"data_offsets\":[0,4]}}", dtypes[i]);
    const char *p = write_st_zeros("dtype.safetensors", header, 32);
    expect_open_error(p, 0, CANOPY_ERR_DTYPE, "dtype.safetensors", "'layer.q'", dtypes[i], NULL);
  }
  const char *p = write_st_zeros("nodtype.safetensors", "{\"t\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "nodtype.safetensors", "'t'", "dtype", NULL);
}

static void test_negative_or_huge_shape_is_an_error_naming_the_tensor(void **state) {
  const struct {
    const char *shape, *needle;
  } cases[] = {
      {"[-1,4]", "[-1,4]"},
      {"[2.5]", "[2.5]"},
      {"[\"4\"]", "dimensions"},
      {"4", "shape"},
      {"[1e300]", "dimensions"},
      {"[4294967296,4294967296]", "overflows"},
      {"[65536,65536,65536,65536]", "overflows"},
      {"[1,1,1,1,1]", "5 dimensions"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char header[256];
    snprintf(header, sizeof header, "{\"bad.w\":{\"dtype\":\"F32\",\"shape\":%s,\"data_offsets\":[0,4]}}", cases[i].shape);
    const char *p = write_st_zeros("shape.safetensors", header, 4);
    expect_open_error(p, 0, CANOPY_ERR_FORMAT, "shape.safetensors", "'bad.w'", cases[i].needle, NULL);
  }
}

static void test_duplicate_tensor_names_are_an_error(void **state) {
  const char *p = write_st_zeros("dup.safetensors",
                                 "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                                 "\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                                 8);
  expect_open_error(p, 0, CANOPY_ERR_FORMAT, "dup.safetensors", "'t'", "twice", NULL);
}

/* ---- cn_st_expect ------------------------------------------------------------------------ */

static cn_st *open_expect_fixture(void) {
  const char *p = write_st_zeros("expect.safetensors",
                                 "{\"model.embed_tokens.weight\":{\"dtype\":\"BF16\",\"shape\":[3,5],\"data_offsets\":[0,30]}}", 30);
  cn_st *st;
  assert_int_equal(cn_st_open_file(p, &st), CANOPY_OK);
  return st;
}

static void test_expect_accepts_the_right_shape(void **state) {
  cn_st *st = open_expect_fixture();
  const cn_st_tensor *t = NULL;
  int64_t shape[2] = {3, 5};
  assert_int_equal(cn_st_expect(st, "model.embed_tokens.weight", 2, shape, &t), CANOPY_OK);
  assert_non_null(t);
  assert_string_equal(t->name, "model.embed_tokens.weight");
  cn_st_close(st);
}

static void test_expect_of_a_missing_tensor_is_a_format_error_naming_it(void **state) {
  cn_st *st = open_expect_fixture();
  const cn_st_tensor *t = NULL;
  int64_t shape[2] = {3, 5};
  assert_int_equal(cn_st_expect(st, "lm_head.weight", 2, shape, &t), CANOPY_ERR_FORMAT);
  printf("[ error    ] %s\n", canopy_last_error());
  assert_null(t);
  assert_non_null(strstr(canopy_last_error(), "expect.safetensors: missing tensor lm_head.weight"));
  cn_st_close(st);
}

static void test_expect_of_a_wrong_shape_is_a_shape_error_giving_both(void **state) {
  cn_st *st = open_expect_fixture();
  int64_t shape[2] = {5, 3};
  assert_int_equal(cn_st_expect(st, "model.embed_tokens.weight", 2, shape, NULL), CANOPY_ERR_SHAPE);
  printf("[ error    ] %s\n", canopy_last_error());
  assert_non_null(
      strstr(canopy_last_error(), "expect.safetensors: tensor model.embed_tokens.weight has shape [3, 5], expected [5, 3]"));
  int64_t flat[1] = {15};
  assert_int_equal(cn_st_expect(st, "model.embed_tokens.weight", 1, flat, NULL), CANOPY_ERR_SHAPE);
  assert_non_null(strstr(canopy_last_error(), "has shape [3, 5], expected [15]"));
  cn_st_close(st);
}

/* The checkpoint that tools/convert_smollm2.py writes, when it is there. */
static void test_converted_smollm2_checkpoint_opens(void **state) {
  char dir[1024];
  cn_test_path(dir, sizeof dir, "models/SmolLM2-135M-Instruct");
  char probe[1100];
  snprintf(probe, sizeof probe, "%s/model.safetensors", dir);
  if (!cn_test_exists(probe)) {
    printf("[ skipped  ] %s not found\n", probe);
    skip();
  }
  cn_st *st;
  assert_int_equal(cn_st_open(dir, &st), CANOPY_OK);
  int64_t embed[2] = {49152, 576};
  assert_int_equal(cn_st_expect(st, "model.embed_tokens.weight", 2, embed, NULL), CANOPY_OK);
  assert_int_equal(cn_st_count(st), 2 + 30 * 9);
  cn_st_close(st);
}

static int setup(void **state) {
  strcpy(tmp, "/tmp/canopy-st-XXXXXX");
  return mkdtemp(tmp) ? 0 : -1;
}

static int teardown(void **state) {
  return cn_test_remove_tree(tmp);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_f32_f16_bf16_tensors_read_back_exactly),
      cmocka_unit_test(test_unaligned_data_section_is_read_correctly),
      cmocka_unit_test(test_folder_with_model_safetensors_opens),
      cmocka_unit_test(test_find_locates_each_of_thousands_of_tensors),
      cmocka_unit_test(test_sharded_checkpoint_gathers_every_shard),
      cmocka_unit_test(test_index_naming_a_missing_shard_is_an_error_naming_the_shard),
      cmocka_unit_test(test_index_disagreeing_with_the_shards_is_an_error_naming_the_tensor),
      cmocka_unit_test(test_tensor_in_two_shards_is_an_error_naming_both),
      cmocka_unit_test(test_folder_without_weights_is_an_io_error_naming_it),
      cmocka_unit_test(test_truncated_file_is_an_error_naming_the_file),
      cmocka_unit_test(test_header_length_past_eof_is_an_error_giving_both_sizes),
      cmocka_unit_test(test_header_that_is_not_json_is_an_error_with_its_offset),
      cmocka_unit_test(test_offsets_outside_the_data_section_are_an_error_naming_the_tensor),
      cmocka_unit_test(test_overlapping_tensors_are_an_error_naming_both),
      cmocka_unit_test(test_size_mismatch_with_shape_is_an_error_naming_the_tensor),
      cmocka_unit_test(test_unknown_dtype_is_a_dtype_error_naming_tensor_and_dtype),
      cmocka_unit_test(test_negative_or_huge_shape_is_an_error_naming_the_tensor),
      cmocka_unit_test(test_duplicate_tensor_names_are_an_error),
      cmocka_unit_test(test_expect_accepts_the_right_shape),
      cmocka_unit_test(test_expect_of_a_missing_tensor_is_a_format_error_naming_it),
      cmocka_unit_test(test_expect_of_a_wrong_shape_is_a_shape_error_giving_both),
      cmocka_unit_test(test_converted_smollm2_checkpoint_opens),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
