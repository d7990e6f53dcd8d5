/* safetensors: https://github.com/huggingface/safetensors#format. A file is an 8-byte
 * little-endian header length N, N bytes of JSON ({name: {dtype, shape, data_offsets}}, plus an
 * optional "__metadata__"), then the data section that data_offsets index into. Everything in
 * the header is untrusted: each field is checked before any pointer into the mapping is made. */
#include "model/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/error.h"

#define ST_MAX_NDIM 4

typedef struct st_file {
  char *path;
  void *map;   /* the whole file, read-only */
  size_t size;
} st_file;

struct cn_st {
  char *name;                 /* the file, or the index for a sharded checkpoint: for messages */
  st_file *files;
  int n_files, cap_files;
  cn_st_tensor *tensors;      /* in header order, shard after shard */
  int n, cap;
  const cn_st_tensor **by_name; /* sorted by name, for cn_st_find */
};

size_t cn_dtype_size(cn_dtype t) { return t == CN_F32 ? 4 : 2; }

const char *cn_dtype_name(cn_dtype t) {
  switch (t) {
  case CN_F32: return "F32";
  case CN_F16: return "F16";
  case CN_BF16: return "BF16";
  }
  return "?";
}

static char *copy_string(const char *s) {
  size_t n = strlen(s) + 1;
  char *p = malloc(n);
  if (p) memcpy(p, s, n);
  return p;
}

static char *join_path(const char *dir, const char *name) {
  size_t a = strlen(dir), b = strlen(name);
  char *p = malloc(a + b + 2);
  if (!p) return NULL;
  memcpy(p, dir, a);
  p[a] = '/';
  memcpy(p + a + 1, name, b + 1);
  return p;
}

/* Formats "[a, b, c]" into buf. */
static const char *shape_str(char *buf, size_t cap, int ndim, const int64_t *shape) {
  size_t at = 0;
  at += (size_t)snprintf(buf, cap, "[");
  for (int i = 0; i < ndim && at < cap; i++)
    at += (size_t)snprintf(buf + at, cap - at, "%s%lld", i ? ", " : "", (long long)shape[i]);
  if (at < cap) snprintf(buf + at, cap - at, "]");
  return buf;
}

/* ---- one file ---------------------------------------------------------------------------- */

static int map_file(const char *path, st_file *f) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) return cn_error(CANOPY_ERR_IO, "%s: %s", path, strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    int e = errno;
    close(fd);
    return cn_error(CANOPY_ERR_IO, "%s: %s", path, strerror(e));
  }
  if (!S_ISREG(sb.st_mode)) {
    close(fd);
    return cn_error(CANOPY_ERR_IO, "%s: not a regular file", path);
  }
  f->size = (size_t)sb.st_size;
  if (f->size < 8) {
    close(fd);
    return cn_error(CANOPY_ERR_FORMAT, "%s: file is %zu bytes, too short for the 8-byte header length", path,
                    f->size);
  }
  void *map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  close(fd);
  if (map == MAP_FAILED) return cn_error(CANOPY_ERR_IO, "%s: mmap of %zu bytes failed: %s", path, f->size, strerror(e));
  f->map = map;
  return CANOPY_OK;
}

/* A JSON number that is a whole value in [0, limit]; the value in *out. */
static int whole_number(const cJSON *j, double limit, uint64_t *out) {
  if (!cJSON_IsNumber(j)) return 0;
  double v = j->valuedouble;
  if (!(v >= 0 && v <= limit) || v != (double)(uint64_t)v) return 0;
  *out = (uint64_t)v;
  return 1;
}

static int parse_dtype(const char *path, const char *name, const cJSON *j, cn_dtype *out) {
  if (!cJSON_IsString(j)) return cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' has no dtype string", path, name);
  static const char *const names[] = {"F32", "F16", "BF16"};
  for (int i = 0; i < 3; i++)
    if (!strcmp(j->valuestring, names[i])) {
      *out = (cn_dtype)i;
      return CANOPY_OK;
    }
  return cn_error(CANOPY_ERR_DTYPE, "%s: tensor '%s' has dtype %s; canopy reads F32, F16 and BF16", path, name,
                  j->valuestring);
}

static int parse_shape(const char *path, const char *name, const cJSON *j, cn_st_tensor *t, uint64_t *elems) {
  if (!cJSON_IsArray(j)) return cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' has no shape array", path, name);
  int ndim = cJSON_GetArraySize(j);
  if (ndim > ST_MAX_NDIM)
    return cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' has %d dimensions; canopy reads at most %d", path, name, ndim,
                    ST_MAX_NDIM);
  t->ndim = ndim;
  uint64_t n = 1;
  int overflow = 0, i = 0;
  for (const cJSON *d = j->child; d; d = d->next, i++) {
    uint64_t v;
    /* 2^53: beyond it a JSON number no longer names one integer. */
    if (!whole_number(d, 9007199254740992.0, &v)) {
      char *text = cJSON_PrintUnformatted(j);
      int st = cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' has shape %s; dimensions must be non-negative integers",
                        path, name, text ? text : "?");
      free(text);
      return st;
    }
    t->shape[i] = (int64_t)v;
    if (v && n > (uint64_t)INT64_MAX / v) overflow = 1;
    else n *= v;
  }
  if (overflow || n > (uint64_t)INT64_MAX / 4) {
    char buf[128];
    return cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' has shape %s, whose element count overflows", path, name,
                    shape_str(buf, sizeof buf, t->ndim, t->shape));
  }
  *elems = n;
  return CANOPY_OK;
}

typedef struct span {
  uint64_t begin, end;
  int tensor;
} span;

static int span_cmp(const void *a, const void *b) {
  const span *x = a, *y = b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  return x->end < y->end ? -1 : x->end > y->end;
}

static int grow(void **p, int *cap, int need, size_t elem) {
  if (need <= *cap) return CANOPY_OK;
  int c = *cap ? *cap * 2 : 16;
  while (c < need) c *= 2;
  void *q = realloc(*p, (size_t)c * elem);
  if (!q) return cn_error(CANOPY_ERR_NO_MEMORY, "out of memory reading safetensors headers");
  *p = q;
  *cap = c;
  return CANOPY_OK;
}

/* Parses one tensor entry; on success appends it to st->tensors and its byte range to spans. */
static int parse_tensor(cn_st *st, const st_file *f, const cJSON *e, const uint8_t *data, uint64_t data_size,
                        span *spans, int *n_spans) {
  const char *path = f->path, *name = e->string;
  if (!cJSON_IsObject(e)) return cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' is not a JSON object", path, name);
  cn_st_tensor t = {.file = f->path};
  uint64_t elems = 0;
  int rc = parse_dtype(path, name, cJSON_GetObjectItemCaseSensitive(e, "dtype"), &t.dtype);
  if (!rc) rc = parse_shape(path, name, cJSON_GetObjectItemCaseSensitive(e, "shape"), &t, &elems);
  if (rc) return rc;

  const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
  uint64_t begin, end;
  if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 || !whole_number(off->child, 9007199254740992.0, &begin) ||
      !whole_number(off->child->next, 9007199254740992.0, &end))
    return cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' needs data_offsets [begin, end] of non-negative integers",
                    path, name);
  uint64_t header_end = f->size - data_size;
  if (begin > end)
    return cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' data_offsets [%llu, %llu] end before they begin", path, name,
                    (unsigned long long)begin, (unsigned long long)end);
  if (end > data_size)
    return cn_error(CANOPY_ERR_FORMAT,
                    "%s: tensor '%s' data_offsets [%llu, %llu] lie outside the data section (%llu bytes from byte "
                    "offset %llu)",
                    path, name, (unsigned long long)begin, (unsigned long long)end, (unsigned long long)data_size,
                    (unsigned long long)header_end);
  uint64_t nbytes = elems * cn_dtype_size(t.dtype);
  if (end - begin != nbytes) {
    char buf[128];
    return cn_error(CANOPY_ERR_FORMAT,
                    "%s: tensor '%s' has shape %s of %s (%llu bytes) but data_offsets [%llu, %llu] hold %llu bytes",
                    path, name, shape_str(buf, sizeof buf, t.ndim, t.shape), cn_dtype_name(t.dtype),
                    (unsigned long long)nbytes, (unsigned long long)begin, (unsigned long long)end,
                    (unsigned long long)(end - begin));
  }
  t.data = data + begin;
  t.nbytes = (size_t)nbytes;
  if (!(t.name = copy_string(name))) return cn_error(CANOPY_ERR_NO_MEMORY, "%s: out of memory", path);
  if ((rc = grow((void **)&st->tensors, &st->cap, st->n + 1, sizeof *st->tensors))) {
    free((void *)t.name);
    return rc;
  }
  if (nbytes) spans[(*n_spans)++] = (span){begin, end, st->n};
  st->tensors[st->n++] = t;
  return CANOPY_OK;
}

/* Sorted by start, a tensor overlaps another iff it overlaps its predecessor (empty ones skipped). */
static int check_overlaps(const cn_st *st, const char *path, span *spans, int n) {
  qsort(spans, (size_t)n, sizeof *spans, span_cmp);
  for (int i = 1; i < n; i++)
    if (spans[i].begin < spans[i - 1].end)
      return cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' data_offsets [%llu, %llu] overlap tensor '%s' [%llu, %llu]",
                      path, st->tensors[spans[i].tensor].name, (unsigned long long)spans[i].begin,
                      (unsigned long long)spans[i].end, st->tensors[spans[i - 1].tensor].name,
                      (unsigned long long)spans[i - 1].begin, (unsigned long long)spans[i - 1].end);
  return CANOPY_OK;
}

/* Maps `path` and appends its tensors to st. */
static int add_file(cn_st *st, const char *path) {
  int rc = grow((void **)&st->files, &st->cap_files, st->n_files + 1, sizeof *st->files);
  if (rc) return rc;
  st_file *f = &st->files[st->n_files];
  *f = (st_file){.path = copy_string(path)};
  if (!f->path) return cn_error(CANOPY_ERR_NO_MEMORY, "%s: out of memory", path);
  st->n_files++; /* from here on cn_st_close releases it */
  if ((rc = map_file(path, f))) return rc;

  const uint8_t *bytes = f->map;
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | bytes[i];
  if (n > f->size - 8)
    return cn_error(CANOPY_ERR_FORMAT, "%s: header length %llu runs past the end of the file (%zu bytes)", path,
                    (unsigned long long)n, f->size);
  const char *header = (const char *)bytes + 8, *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(header, (size_t)n, &end, 0);
  if (!root) {
    size_t at = end && end >= header && end <= header + n ? (size_t)(end - header) : 0;
    return cn_error(CANOPY_ERR_FORMAT, "%s: the header is not valid JSON (error near byte offset %zu)", path, 8 + at);
  }
  /* The format pads the header with spaces to align the data section. */
  for (const char *p = end; p < header + n; p++)
    if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r' && *p != '\0') {
      cJSON_Delete(root);
      return cn_error(CANOPY_ERR_FORMAT, "%s: unexpected bytes after the JSON header at byte offset %zu", path,
                      (size_t)(8 + (p - header)));
    }
  if (!cJSON_IsObject(root)) {
    cJSON_Delete(root);
    return cn_error(CANOPY_ERR_FORMAT, "%s: the header is not a JSON object", path);
  }

  int n_entries = cJSON_GetArraySize(root);
  span *spans = malloc(sizeof *spans * (size_t)(n_entries ? n_entries : 1));
  if (!spans) {
    cJSON_Delete(root);
    return cn_error(CANOPY_ERR_NO_MEMORY, "%s: out of memory", path);
  }
  uint64_t data_size = f->size - 8 - n;
  int n_spans = 0;
  for (const cJSON *e = root->child; e && !rc; e = e->next) {
    if (!strcmp(e->string, "__metadata__")) continue;
    rc = parse_tensor(st, f, e, bytes + 8 + n, data_size, spans, &n_spans);
  }
  if (!rc) rc = check_overlaps(st, path, spans, n_spans);
  free(spans);
  cJSON_Delete(root);
  return rc;
}

static int by_name_cmp(const void *a, const void *b) {
  return strcmp((*(const cn_st_tensor *const *)a)->name, (*(const cn_st_tensor *const *)b)->name);
}

/* Builds the name index once every file is in, and rejects names that appear twice. */
static int build_index(cn_st *st) {
  st->by_name = malloc(sizeof *st->by_name * (size_t)(st->n ? st->n : 1));
  if (!st->by_name) return cn_error(CANOPY_ERR_NO_MEMORY, "%s: out of memory", st->name);
  for (int i = 0; i < st->n; i++) st->by_name[i] = &st->tensors[i];
  qsort(st->by_name, (size_t)st->n, sizeof *st->by_name, by_name_cmp);
  for (int i = 1; i < st->n; i++)
    if (!strcmp(st->by_name[i]->name, st->by_name[i - 1]->name)) {
      const cn_st_tensor *a = st->by_name[i - 1], *b = st->by_name[i];
      if (a->file == b->file) return cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' appears twice", a->file, a->name);
      return cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' appears in both %s and %s", st->name, a->name, a->file,
                      b->file);
    }
  return CANOPY_OK;
}

static cn_st *st_new(const char *name) {
  cn_st *st = calloc(1, sizeof *st);
  if (st && !(st->name = copy_string(name))) {
    free(st);
    st = NULL;
  }
  if (!st) cn_error(CANOPY_ERR_NO_MEMORY, "%s: out of memory", name);
  return st;
}

int cn_st_open_file(const char *path, cn_st **out) {
  if (!path || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_st_open_file: NULL argument");
  *out = NULL;
  cn_st *st = st_new(path);
  if (!st) return CANOPY_ERR_NO_MEMORY;
  int rc = add_file(st, path);
  if (!rc) rc = build_index(st);
  if (rc) {
    cn_st_close(st);
    return rc;
  }
  *out = st;
  return CANOPY_OK;
}

/* ---- sharded checkpoints ----------------------------------------------------------------- */

static int read_text(const char *path, char **text, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return cn_error(CANOPY_ERR_IO, "%s: %s", path, strerror(errno));
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  for (size_t got; buf; n += got) {
    if (n + 1 >= cap) {
      char *b = realloc(buf, cap *= 2);
      if (!b) break;
      buf = b;
    }
    got = fread(buf + n, 1, cap - n - 1, f);
    if (!got) break;
  }
  int err = ferror(f);
  fclose(f);
  if (!buf || err) {
    free(buf);
    return cn_error(err ? CANOPY_ERR_IO : CANOPY_ERR_NO_MEMORY, "%s: could not read the file", path);
  }
  buf[n] = '\0';
  *text = buf;
  *len = n;
  return CANOPY_OK;
}

static int shard_index_of(const cn_st *st, const char *path) {
  for (int i = 0; i < st->n_files; i++)
    if (!strcmp(st->files[i].path, path)) return i;
  return -1;
}

/* Opens each shard named in weight_map once, then checks that every listed tensor is in the
 * shard the index names and every tensor of a shard is listed. */
static int open_sharded(cn_st *st, const char *dir, const char *index_path) {
  char *text = NULL;
  size_t len = 0;
  int rc = read_text(index_path, &text, &len);
  if (rc) return rc;
  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
  if (!root) {
    size_t at = end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
    free(text);
    return cn_error(CANOPY_ERR_FORMAT, "%s: not valid JSON (error near byte offset %zu)", index_path, at);
  }
  free(text);
  const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
  if (!cJSON_IsObject(map)) {
    cJSON_Delete(root);
    return cn_error(CANOPY_ERR_FORMAT, "%s: no 'weight_map' object", index_path);
  }
  for (const cJSON *e = map->child; e && !rc; e = e->next) {
    if (!cJSON_IsString(e) || !e->valuestring[0] || strchr(e->valuestring, '/') || !strcmp(e->valuestring, "..")) {
      rc = cn_error(CANOPY_ERR_FORMAT, "%s: weight_map entry '%s' must name a shard file in the folder", index_path,
                    e->string);
      break;
    }
    char *path = join_path(dir, e->valuestring);
    if (!path) rc = cn_error(CANOPY_ERR_NO_MEMORY, "%s: out of memory", index_path);
    else if (shard_index_of(st, path) < 0) rc = add_file(st, path);
    free(path);
    if (rc == CANOPY_ERR_IO) rc = cn_error_wrap(rc, "%s names shard '%s'", index_path, e->valuestring);
  }
  if (!rc) rc = build_index(st);
  char *listed = rc ? NULL : calloc((size_t)(st->n ? st->n : 1), 1);
  if (!rc && !listed) rc = cn_error(CANOPY_ERR_NO_MEMORY, "%s: out of memory", index_path);
  for (const cJSON *e = map->child; e && !rc; e = e->next) {
    const cn_st_tensor *t = cn_st_find(st, e->string);
    char *path = join_path(dir, e->valuestring);
    if (!path) rc = cn_error(CANOPY_ERR_NO_MEMORY, "%s: out of memory", index_path);
    else if (!t || strcmp(t->file, path))
      rc = cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' is listed in shard %s but %s", index_path, e->string,
                    e->valuestring, t ? "lives in another shard" : "no shard holds it");
    else listed[t - st->tensors] = 1;
    free(path);
  }
  for (int i = 0; i < st->n && !rc; i++)
    if (!listed[i])
      rc = cn_error(CANOPY_ERR_FORMAT, "%s: tensor '%s' of %s is not listed in the weight_map", index_path,
                    st->tensors[i].name, st->tensors[i].file);
  free(listed);
  cJSON_Delete(root);
  return rc;
}

int cn_st_open(const char *dir, cn_st **out) {
  if (!dir || !out) return cn_error(CANOPY_ERR_INVALID_ARG, "cn_st_open: NULL argument");
  *out = NULL;
  char *index = join_path(dir, "model.safetensors.index.json");
  char *single = join_path(dir, "model.safetensors");
  int rc = CANOPY_OK;
  cn_st *st = NULL;
  struct stat sb;
  if (!index || !single) {
    rc = cn_error(CANOPY_ERR_NO_MEMORY, "%s: out of memory", dir);
  } else if (stat(index, &sb) == 0) {
    if (!(st = st_new(index))) rc = CANOPY_ERR_NO_MEMORY;
    else rc = open_sharded(st, dir, index);
  } else if (stat(single, &sb) == 0) {
    if (!(st = st_new(single))) rc = CANOPY_ERR_NO_MEMORY;
    else if (!(rc = add_file(st, single))) rc = build_index(st);
  } else if (stat(dir, &sb) != 0) {
    rc = cn_error(CANOPY_ERR_IO, "%s: %s", dir, strerror(errno));
  } else {
    rc = cn_error(CANOPY_ERR_IO, "%s: neither model.safetensors nor model.safetensors.index.json is there", dir);
  }
  free(index);
  free(single);
  if (rc) {
    cn_st_close(st);
    return rc;
  }
  *out = st;
  return CANOPY_OK;
}

void cn_st_close(cn_st *st) {
  if (!st) return;
  for (int i = 0; i < st->n_files; i++) {
    if (st->files[i].map) munmap(st->files[i].map, st->files[i].size);
    free(st->files[i].path);
  }
  for (int i = 0; i < st->n; i++) free((void *)st->tensors[i].name);
  free(st->files);
  free(st->tensors);
  free(st->by_name);
  free(st->name);
  free(st);
}

/* ---- lookup ------------------------------------------------------------------------------ */

int cn_st_count(const cn_st *st) { return st ? st->n : 0; }

const cn_st_tensor *cn_st_at(const cn_st *st, int i) {
  return st && i >= 0 && i < st->n ? &st->tensors[i] : NULL;
}

const cn_st_tensor *cn_st_find(const cn_st *st, const char *name) {
  if (!st || !name || !st->by_name) return NULL;
  int lo = 0, hi = st->n - 1;
  while (lo <= hi) {
    int mid = lo + (hi - lo) / 2, c = strcmp(st->by_name[mid]->name, name);
    if (!c) return st->by_name[mid];
    if (c < 0) lo = mid + 1;
    else hi = mid - 1;
  }
  return NULL;
}

int cn_st_expect(const cn_st *st, const char *name, int ndim, const int64_t *shape, const cn_st_tensor **out) {
  if (!st || !name || ndim < 0 || ndim > ST_MAX_NDIM || (ndim && !shape))
    return cn_error(CANOPY_ERR_INVALID_ARG, "cn_st_expect: bad argument");
  const cn_st_tensor *t = cn_st_find(st, name);
  if (!t) return cn_error(CANOPY_ERR_FORMAT, "%s: missing tensor %s", st->name, name);
  int same = t->ndim == ndim;
  for (int i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
  if (!same) {
    char have[128], want[128];
    return cn_error(CANOPY_ERR_SHAPE, "%s: tensor %s has shape %s, expected %s", t->file, name,
                    shape_str(have, sizeof have, t->ndim, t->shape), shape_str(want, sizeof want, ndim, shape));
  }
  if (out) *out = t;
  return CANOPY_OK;
}

/* ---- conversion -------------------------------------------------------------------------- */

/* IEEE binary16 to binary32, exact for every input: subnormal halves become normal floats,
 * infinities stay infinite, NaNs keep their sign and payload (quieted as a float NaN is not). */
static uint32_t half_bits_to_float_bits(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0x1f) return sign | 0x7f800000u | (mant << 13);
  if (exp) return sign | ((exp + 112) << 23) | (mant << 13); /* rebias 15 -> 127 */
  if (!mant) return sign;
  /* A subnormal half is mant * 2^-24: shift the leading one up to the implicit bit. */
  int e = 113; /* the float exponent of 2^-14, the smallest normal half */
  while (!(mant & 0x400)) {
    mant <<= 1;
    e--;
  }
  return sign | ((uint32_t)e << 23) | ((mant & 0x3ff) << 13);
}

void cn_st_to_f32(const cn_st_tensor *t, float *dst) {
  size_t n = t->nbytes / cn_dtype_size(t->dtype);
  const uint8_t *src = t->data; /* the mapping need not be aligned for the element type */
  if (t->dtype == CN_F32) {
    memcpy(dst, src, n * sizeof(float)); /* safetensors is little-endian, as is every host we build for */
    return;
  }
  for (size_t i = 0; i < n; i++) {
    uint16_t h = (uint16_t)(src[2 * i] | (src[2 * i + 1] << 8));
    uint32_t bits = t->dtype == CN_F16 ? half_bits_to_float_bits(h) : (uint32_t)h << 16;
    memcpy(&dst[i], &bits, sizeof bits);
  }
}
