/* safetensors: memory-mapped, validated tensor files, single or sharded. */
#ifndef CANOPY_MODEL_SAFETENSORS_H
#define CANOPY_MODEL_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

typedef enum cn_dtype { CN_F32 = 0, CN_F16, CN_BF16 } cn_dtype;

size_t cn_dtype_size(cn_dtype t);
const char *cn_dtype_name(cn_dtype t);

typedef struct cn_st_tensor {
  const char *name;
  cn_dtype dtype;
  int ndim;
  int64_t shape[4];
  const void *data;   /* points into the read-only mapping */
  size_t nbytes;
  const char *file;   /* the shard it lives in, for messages */
} cn_st_tensor;

typedef struct cn_st cn_st;

/* Opens `dir`/model.safetensors, or every shard named by `dir`/model.safetensors.index.json.
 * Everything is validated before use: header length against the file size, JSON syntax,
 * dtype names, shapes, data_offsets inside the data section, no two tensors overlapping, and
 * nbytes == product(shape) * dtype size. Errors name the file, tensor and byte offset. */
int cn_st_open(const char *dir, cn_st **out);

/* Opens one safetensors file (used by cn_st_open, and by tests on crafted files). */
int cn_st_open_file(const char *path, cn_st **out);

void cn_st_close(cn_st *st);

int cn_st_count(const cn_st *st);
const cn_st_tensor *cn_st_at(const cn_st *st, int i);
/* NULL if absent (no error set). */
const cn_st_tensor *cn_st_find(const cn_st *st, const char *name);

/* Finds `name` and checks its shape: CANOPY_ERR_FORMAT "missing tensor" or CANOPY_ERR_SHAPE
 * naming the tensor, the expected and the actual shape. */
int cn_st_expect(const cn_st *st, const char *name, int ndim, const int64_t *shape,
                 const cn_st_tensor **out);

/* Converts a tensor's elements to fp32 (dst holds product(shape) floats). */
void cn_st_to_f32(const cn_st_tensor *t, float *dst);

#endif
