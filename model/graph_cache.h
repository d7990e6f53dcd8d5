/* A bounded cache of captured forwards (CUDA graphs), keyed by what their launches depend on and
 * evicted least recently used first. Knows nothing about CUDA: the graphs are opaque pointers
 * the owner frees through a callback. */
#ifndef CANOPY_MODEL_GRAPH_CACHE_H
#define CANOPY_MODEL_GRAPH_CACHE_H

#include <stdint.h>

/* The shape of a forward, every field an int (zero the unused ones, keys compare as bytes). */
typedef struct cn_graph_key {
  int32_t v[16];
} cn_graph_key;

typedef struct cn_graph_slot {
  cn_graph_key key;
  void *graph;       /* NULL: the shape was seen once and not captured yet */
  const void *aux;   /* owner's data kept with the graph (where its outputs are) */
  uint64_t last_use; /* 0: empty */
} cn_graph_slot;

typedef struct cn_graph_cache {
  cn_graph_slot *slots; /* [cap] */
  int cap;
  uint64_t clock;
  void (*free_graph)(void *graph);
} cn_graph_cache;

/* cap slots (0: a cache that holds nothing). */
int cn_graph_cache_init(cn_graph_cache *c, int cap, void (*free_graph)(void *graph));
void cn_graph_cache_free(cn_graph_cache *c);

/* The slot of `key`, marked as just used; *fresh set when it was not there (the least recently
 * used slot was emptied, its graph freed, and given to the key). NULL when cap is 0. */
cn_graph_slot *cn_graph_cache_get(cn_graph_cache *c, const cn_graph_key *key, int *fresh);

/* Frees every graph and forgets every key (the buffers they reference moved). */
void cn_graph_cache_clear(cn_graph_cache *c);

#endif
