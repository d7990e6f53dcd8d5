#include "model/graph_cache.h"

#include <stdlib.h>
#include <string.h>

#include "common/error.h"

int cn_graph_cache_init(cn_graph_cache *c, int cap, void (*free_graph)(void *graph)) {
  *c = (cn_graph_cache){.cap = cap > 0 ? cap : 0, .free_graph = free_graph};
  if (!c->cap) return CANOPY_OK;
  c->slots = calloc((size_t)c->cap, sizeof *c->slots);
  if (!c->slots) {
    c->cap = 0;
    return cn_error(CANOPY_ERR_NO_MEMORY, "graph cache: no memory for %d slots", cap);
  }
  return CANOPY_OK;
}

static void empty(cn_graph_cache *c, cn_graph_slot *s) {
  if (s->graph && c->free_graph) c->free_graph(s->graph);
  memset(s, 0, sizeof *s);
}

void cn_graph_cache_clear(cn_graph_cache *c) {
  for (int i = 0; i < c->cap; i++)
    empty(c, &c->slots[i]);
}

void cn_graph_cache_free(cn_graph_cache *c) {
  cn_graph_cache_clear(c);
  free(c->slots);
  *c = (cn_graph_cache){0};
}

cn_graph_slot *cn_graph_cache_get(cn_graph_cache *c, const cn_graph_key *key, int *fresh) {
  *fresh = 0;
  if (!c->cap) return NULL;
  cn_graph_slot *oldest = &c->slots[0];
  for (int i = 0; i < c->cap; i++) {
    cn_graph_slot *s = &c->slots[i];
    if (s->last_use && !memcmp(&s->key, key, sizeof *key)) {
      s->last_use = ++c->clock;
      return s;
    }
    if (s->last_use < oldest->last_use) oldest = s;
  }
  empty(c, oldest);
  oldest->key = *key;
  oldest->last_use = ++c->clock;
  *fresh = 1;
  return oldest;
}
