/* Growable byte and id buffers, and a chunked arena whose pointers stay put while it grows. */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer_internal.h"

int cn_grow(void **p, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap) return 0;
  size_t c = *cap ? *cap : 64;
  while (c < need) c *= 2;
  void *q = realloc(*p, c * elem);
  if (!q) return CANOPY_ERR_NO_MEMORY;
  *p = q;
  *cap = c;
  return 0;
}

int cn_buf_reserve(cn_buf *b, size_t need) { return cn_grow((void **)&b->p, &b->cap, b->n + need + 1, 1); }

int cn_buf_append(cn_buf *b, const void *p, size_t n) {
  if (cn_buf_reserve(b, n)) return CANOPY_ERR_NO_MEMORY;
  if (n) memcpy(b->p + b->n, p, n);
  b->n += n;
  b->p[b->n] = '\0';
  return 0;
}

int cn_ivec_push(cn_ivec *v, int32_t x) {
  if (cn_grow((void **)&v->p, &v->cap, v->n + 1, sizeof *v->p)) return CANOPY_ERR_NO_MEMORY;
  v->p[v->n++] = x;
  return 0;
}

int cn_ivec_append(cn_ivec *v, const int32_t *p, size_t n) {
  if (cn_grow((void **)&v->p, &v->cap, v->n + n, sizeof *v->p)) return CANOPY_ERR_NO_MEMORY;
  if (n) memcpy(v->p + v->n, p, n * sizeof *p);
  v->n += n;
  return 0;
}

struct cn_arena_block {
  cn_arena_block *next;
  size_t used, cap;
  max_align_t data[];
};

char *cn_arena_alloc(cn_arena *a, size_t n) {
  cn_arena_block *b = a->head;
  if (!b || b->cap - b->used < n) {
    size_t cap = n > 65536 ? n : 65536;
    b = malloc(sizeof *b + cap);
    if (!b) return NULL;
    b->used = 0;
    b->cap = cap;
    b->next = a->head;
    a->head = b;
  }
  char *p = (char *)b->data + b->used;
  b->used += n;
  return p;
}

void cn_arena_reset(cn_arena *a) {
  cn_arena_block *b = a->head;
  if (!b) return;
  /* Keep the oldest block (the last in the list): the common case needs no malloc at all. */
  while (b->next) {
    cn_arena_block *next = b->next;
    free(b);
    b = next;
  }
  b->used = 0;
  a->head = b;
}

void cn_arena_free(cn_arena *a) {
  for (cn_arena_block *b = a->head, *next; b; b = next) {
    next = b->next;
    free(b);
  }
  a->head = NULL;
}
