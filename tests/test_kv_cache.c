/* The paged KV cache on its own: slot mapping, copy-on-write, truncation, prefix sharing and
 * eviction, exhaustion without side effects, and a randomized run of thousands of operations
 * that checks the pool's invariants and every sequence's K/V rows after each one.
 *
 * Every row written gets values derived from (token, position, layer, column, K/V), so reading a
 * sequence back proves that no block it holds was overwritten by anyone else and that an
 * attached prefix holds exactly the rows its tokens would have produced.
 *
 * That reusing cached blocks gives the same logits as recomputing them is a model-level property;
 * the lead's model and session tests check it (test_prefix_reuse_gives_the_logits_of_recomputing). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "cache/block_pool.h"
#include "cache/kv_cache.h"
#include "common/error.h"
#include "tests/testing.h"

/* ---- a storage the pool cannot memcpy ----------------------------------------------------------- */

/* Host fp32 again, but reached only through cn_kv_storage, with a device's copy semantics (every
 * source read before any destination is written): the pool's span path, testable without a GPU. */
static int g_copies; /* storage copy calls */

static void *spans_alloc(void *ctx, size_t bytes) { return calloc(1, bytes); }
static void spans_release(void *ctx, void *data) { free(data); }
static int spans_copy(void *ctx, void *data, const cn_kv_span *spans, int n) {
  size_t total = 0;
  for (int i = 0; i < n; i++) total += spans[i].n;
  float *tmp = malloc(sizeof(float) * (total ? total : 1)), *base = data;
  assert_non_null(tmp);
  for (int i = 0, at = 0; i < n; at += (int)spans[i++].n) memcpy(tmp + at, base + spans[i].src, sizeof(float) * spans[i].n);
  for (int i = 0, at = 0; i < n; at += (int)spans[i++].n) memcpy(base + spans[i].dst, tmp + at, sizeof(float) * spans[i].n);
  free(tmp);
  g_copies++;
  return CANOPY_OK;
}
static const cn_kv_storage spans_storage = {.name = "test spans", .elem_bytes = sizeof(float), .alloc = spans_alloc,
                                            .release = spans_release, .copy = spans_copy};
static const cn_kv_storage *g_storage; /* make_pool's storage: NULL (host) unless a test sets it */

/* ---- helpers -------------------------------------------------------------------------------- */

static cn_kv_pool *make_pool(int n_layers, int n_kv_heads, int head_dim, int block_size, int n_blocks) {
  cn_kv_layout l = {.n_layers = n_layers, .n_kv_heads = n_kv_heads, .head_dim = head_dim,
                    .block_size = block_size, .n_blocks = n_blocks};
  cn_kv_pool *p = NULL;
  int st = cn_kv_pool_create_on(&l, g_storage, NULL, &p);
  if (st) print_error("%s\n", canopy_last_error());
  assert_int_equal(st, CANOPY_OK);
  return p;
}

static cn_kv_seq *make_seq(cn_kv_pool *p) {
  cn_kv_seq *s = NULL;
  assert_int_equal(cn_kv_seq_create(p, &s), CANOPY_OK);
  return s;
}

static int kv_dim(const cn_kv_pool *p) { return cn_kv_pool_layout(p)->n_kv_heads * cn_kv_pool_layout(p)->head_dim; }

/* K (is_v 0) or V rows of a block and layer, by the geometry kv_cache.h documents for
 * cn_kv_pool_data: the same for host pools and the test storage. */
static float *rows_of(cn_kv_pool *p, int block, int layer, int is_v) {
  const cn_kv_layout *L = cn_kv_pool_layout(p);
  return (float *)cn_kv_pool_data(p) +
         (((size_t)block * L->n_layers + layer) * 2 + is_v) * L->block_size * (size_t)kv_dim(p);
}

/* Exact in fp32 for token < 160, pos < 1000, layer < 10, column < 50. */
static float row_value(int32_t token, int pos, int layer, int col, int is_v) {
  return (float)(token * 100000 + pos * 100 + layer * 10 + col * 2 + is_v);
}

/* Writes the rows of positions [from, from + n), as a forward would after reserve. */
static void write_rows(cn_kv_pool *p, const cn_kv_seq *s, const int32_t *tokens, int from, int n) {
  int L = cn_kv_pool_layout(p)->n_layers, D = kv_dim(p);
  for (int i = 0; i < n; i++) {
    int block, row;
    cn_kv_seq_slot(s, from + i, &block, &row);
    for (int l = 0; l < L; l++)
      for (int c = 0; c < D; c++) {
        rows_of(p, block, l, 0)[(size_t)row * D + c] = row_value(tokens[i], from + i, l, c, 0);
        rows_of(p, block, l, 1)[(size_t)row * D + c] = row_value(tokens[i], from + i, l, c, 1);
      }
  }
}

/* Returns the first position in [0, len) whose rows do not hold `tokens`' values, or -1. */
static int first_bad_row(cn_kv_pool *p, const cn_kv_seq *s, const int32_t *tokens, int len) {
  int L = cn_kv_pool_layout(p)->n_layers, D = kv_dim(p);
  for (int pos = 0; pos < len; pos++) {
    int block, row;
    cn_kv_seq_slot(s, pos, &block, &row);
    for (int l = 0; l < L; l++)
      for (int c = 0; c < D; c++)
        if (rows_of(p, block, l, 0)[(size_t)row * D + c] != row_value(tokens[pos], pos, l, c, 0) ||
            rows_of(p, block, l, 1)[(size_t)row * D + c] != row_value(tokens[pos], pos, l, c, 1))
          return pos;
  }
  return -1;
}

static void assert_rows(cn_kv_pool *p, const cn_kv_seq *s, const int32_t *tokens) {
  assert_int_equal(first_bad_row(p, s, tokens, cn_kv_seq_len(s)), -1);
}

/* Reserves, writes and commits tokens[len, len + n): one forward's worth. */
static int append(cn_kv_pool *p, cn_kv_seq *s, const int32_t *all_tokens, int n) {
  int len = cn_kv_seq_len(s);
  int st = cn_kv_seq_reserve(s, n);
  if (st) return st;
  write_rows(p, s, all_tokens + len, len, n);
  cn_kv_seq_commit(s, all_tokens + len, n);
  return CANOPY_OK;
}

static void assert_pool_consistent(const cn_kv_pool *p) {
  char why[256];
  bool ok = cn_kv_pool_check(p, why, sizeof why);
  if (!ok) print_error("pool check: %s\n", why);
  assert_true(ok);
  assert_int_equal(cn_kv_pool_available(p) + cn_kv_pool_in_use(p), cn_kv_pool_layout(p)->n_blocks);
}

static int table_block(const cn_kv_seq *s, int i) {
  int n;
  const int *t = cn_kv_seq_blocks(s, &n);
  assert_in_range(i, 0, n - 1);
  return t[i];
}

static int table_len(const cn_kv_seq *s) {
  int n;
  cn_kv_seq_blocks(s, &n);
  return n;
}

static void fill(int32_t *t, int n, int32_t first) {
  for (int i = 0; i < n; i++) t[i] = first + i % 7;
}

/* ---- properties ----------------------------------------------------------------------------- */

static void test_reserve_maps_positions_to_blocks_across_block_boundaries(void **state) {
  cn_kv_pool *p = make_pool(3, 2, 5, 4, 8);
  cn_kv_seq *s = make_seq(p);
  int32_t t[16];
  fill(t, 16, 1);

  assert_int_equal(cn_kv_seq_reserve(s, 6), CANOPY_OK);
  assert_int_equal(cn_kv_seq_len(s), 0); /* reserve does not commit */
  assert_int_equal(table_len(s), 2);
  assert_int_equal(cn_kv_pool_in_use(p), 2);
  for (int pos = 0; pos < 6; pos++) {
    int block, row;
    cn_kv_seq_slot(s, pos, &block, &row);
    assert_int_equal(block, table_block(s, pos / 4));
    assert_int_equal(row, pos % 4);
  }
  assert_int_not_equal(table_block(s, 0), table_block(s, 1));
  write_rows(p, s, t, 0, 6);
  cn_kv_seq_commit(s, t, 6);
  assert_int_equal(cn_kv_seq_len(s), 6);

  /* 6 + 3 = 9 tokens need a third block; the partial second block is private, so no copy. */
  int second = table_block(s, 1);
  assert_int_equal(append(p, s, t, 3), CANOPY_OK);
  assert_int_equal(table_len(s), 3);
  assert_int_equal(table_block(s, 1), second);
  int block, row;
  cn_kv_seq_slot(s, 8, &block, &row);
  assert_int_equal(block, table_block(s, 2));
  assert_int_equal(row, 0);
  assert_int_equal(cn_kv_seq_reserve(s, 0), CANOPY_OK);
  assert_int_equal(table_len(s), 3);

  /* K and V of every layer of every block are disjoint: all rows read back as written. */
  assert_rows(p, s, t);
  assert_int_equal(cn_kv_block_v(p, 0, 0) - cn_kv_block_k(p, 0, 0), 4 * 10);
  assert_pool_consistent(p);
  cn_kv_seq_free(s);
  assert_int_equal(cn_kv_pool_in_use(p), 0);
  cn_kv_pool_free(p);
}

static void test_fork_shares_blocks_and_a_write_copies_the_shared_partial_block(void **state) {
  cn_kv_pool *p = make_pool(2, 1, 3, 4, 8);
  cn_kv_seq *parent = make_seq(p);
  int32_t pt[8] = {1, 2, 3, 4, 5, 6, 7, 8}, ct[8] = {1, 2, 3, 4, 5, 6, 9, 9};
  assert_int_equal(append(p, parent, pt, 6), CANOPY_OK);

  cn_kv_seq *child;
  assert_int_equal(cn_kv_seq_fork(parent, &child), CANOPY_OK);
  assert_int_equal(cn_kv_seq_len(child), 6);
  assert_int_equal(table_len(child), 2);
  for (int i = 0; i < 2; i++) {
    assert_int_equal(table_block(child, i), table_block(parent, i));
    assert_int_equal(cn_kv_pool_refcount(p, table_block(parent, i)), 2);
  }
  assert_int_equal(cn_kv_pool_in_use(p), 2);

  /* The child writes position 6 into its partial block: it gets its own copy first. */
  int shared_partial = table_block(parent, 1);
  assert_int_equal(append(p, child, ct, 1), CANOPY_OK);
  assert_int_not_equal(table_block(child, 1), shared_partial);
  assert_int_equal(table_block(child, 0), table_block(parent, 0));
  assert_int_equal(cn_kv_pool_refcount(p, table_block(parent, 0)), 2);
  assert_int_equal(cn_kv_pool_refcount(p, shared_partial), 1);
  assert_int_equal(cn_kv_pool_in_use(p), 3);
  assert_rows(p, parent, pt); /* the parent's rows are untouched */
  assert_rows(p, child, ct);  /* the child's copied rows 4, 5 plus its own row 6 */

  /* The parent now holds its partial block alone and writes it in place. */
  assert_int_equal(append(p, parent, pt, 2), CANOPY_OK);
  assert_int_equal(table_block(parent, 1), shared_partial);
  assert_rows(p, parent, pt);
  assert_rows(p, child, ct);
  assert_pool_consistent(p);
  cn_kv_seq_free(parent);
  assert_rows(p, child, ct);
  cn_kv_seq_free(child);
  assert_int_equal(cn_kv_pool_in_use(p), 0);
  assert_pool_consistent(p);
  cn_kv_pool_free(p);
}

static void test_truncate_releases_blocks_and_append_rewrites_past_the_new_length(void **state) {
  cn_kv_pool *p = make_pool(2, 2, 2, 4, 6);
  cn_kv_pool_set_prefix_cache(p, false);
  cn_kv_seq *s = make_seq(p);
  int32_t t[16];
  fill(t, 16, 10);
  assert_int_equal(append(p, s, t, 10), CANOPY_OK);
  assert_int_equal(cn_kv_pool_in_use(p), 3);

  assert_int_equal(cn_kv_seq_truncate(s, 5), CANOPY_OK);
  assert_int_equal(cn_kv_seq_len(s), 5);
  assert_int_equal(table_len(s), 2);
  assert_int_equal(cn_kv_pool_in_use(p), 2);
  assert_int_equal(cn_kv_seq_truncate(s, 6), CANOPY_ERR_INVALID_ARG); /* cannot grow */
  assert_int_equal(cn_kv_seq_truncate(s, -1), CANOPY_ERR_INVALID_ARG);

  int partial = table_block(s, 1);
  for (int i = 5; i < 16; i++) t[i] = 50 + i;
  assert_int_equal(append(p, s, t, 11), CANOPY_OK);
  assert_int_equal(table_block(s, 1), partial); /* private and uncached: written in place */
  assert_int_equal(cn_kv_seq_len(s), 16);
  assert_rows(p, s, t);

  /* Truncating to the current length undoes a reserve. */
  assert_int_equal(cn_kv_seq_reserve(s, 4), CANOPY_OK);
  assert_int_equal(cn_kv_pool_in_use(p), 5);
  assert_int_equal(cn_kv_seq_truncate(s, 16), CANOPY_OK);
  assert_int_equal(cn_kv_pool_in_use(p), 4);
  assert_int_equal(cn_kv_seq_truncate(s, 0), CANOPY_OK);
  assert_int_equal(cn_kv_pool_in_use(p), 0);
  assert_pool_consistent(p);
  cn_kv_seq_free(s);
  cn_kv_pool_free(p);
}

static void test_truncate_into_a_cached_block_copies_it_before_rewriting(void **state) {
  cn_kv_pool *p = make_pool(1, 1, 4, 4, 6);
  cn_kv_seq *a = make_seq(p);
  int32_t t[8] = {1, 2, 3, 4, 5, 6, 7, 8}, u[8] = {1, 2, 3, 4, 5, 6, 0, 0};
  assert_int_equal(append(p, a, t, 8), CANOPY_OK);
  int cached = table_block(a, 1);
  assert_true(cn_kv_pool_block_cached(p, cached));
  assert_int_equal(cn_kv_pool_refcount(p, cached), 1);

  /* Block 1 is published and held by `a` alone; a rewrite of rows 2, 3 must not reach it. */
  assert_int_equal(cn_kv_seq_truncate(a, 6), CANOPY_OK);
  assert_int_equal(append(p, a, u, 2), CANOPY_OK);
  assert_int_not_equal(table_block(a, 1), cached);
  assert_rows(p, a, u);
  assert_true(cn_kv_pool_block_cached(p, cached));
  assert_int_equal(cn_kv_pool_refcount(p, cached), 0); /* evictable now */

  cn_kv_seq *b = make_seq(p);
  assert_int_equal(cn_kv_seq_attach_prefix(b, t, 8), 8);
  assert_int_equal(table_block(b, 1), cached);
  assert_rows(p, b, t);
  assert_pool_consistent(p);
  cn_kv_seq_free(a);
  cn_kv_seq_free(b);
  cn_kv_pool_free(p);
}

static void test_prefix_attach_shares_the_blocks_of_a_live_sequence(void **state) {
  cn_kv_pool *p = make_pool(2, 2, 3, 4, 8);
  cn_kv_seq *a = make_seq(p);
  int32_t t[12];
  fill(t, 12, 3);
  assert_int_equal(append(p, a, t, 10), CANOPY_OK);
  assert_int_equal(cn_kv_pool_in_use(p), 3);

  cn_kv_seq *b = make_seq(p);
  assert_int_equal(cn_kv_seq_attach_prefix(b, t, 10), 8); /* full blocks only */
  assert_int_equal(cn_kv_seq_len(b), 8);
  for (int i = 0; i < 2; i++) {
    assert_int_equal(table_block(b, i), table_block(a, i));
    assert_int_equal(cn_kv_pool_refcount(p, table_block(a, i)), 2);
  }
  assert_int_equal(cn_kv_pool_in_use(p), 3); /* shared blocks count once */
  assert_rows(p, b, t);
  assert_int_equal(append(p, b, t, 4), CANOPY_OK);
  assert_int_equal(cn_kv_pool_in_use(p), 4);
  assert_rows(p, b, t);

  cn_kv_seq *c = make_seq(p);
  assert_int_equal(cn_kv_seq_attach_prefix(c, t, 7), 4);      /* at most n tokens */
  assert_int_equal(cn_kv_seq_attach_prefix(c, t, 12), 0);     /* not empty any more */
  assert_int_equal(cn_kv_pool_refcount(p, table_block(a, 0)), 3);
  assert_pool_consistent(p);
  cn_kv_seq_free(a);
  cn_kv_seq_free(b);
  cn_kv_seq_free(c);
  assert_int_equal(cn_kv_pool_in_use(p), 0);
  cn_kv_pool_free(p);
}

static void test_prefix_reuse_after_the_owner_was_freed_takes_the_evictable_block(void **state) {
  cn_kv_pool *p = make_pool(2, 1, 2, 4, 4);
  cn_kv_seq *a = make_seq(p);
  int32_t t[8] = {7, 6, 5, 4, 3, 2, 1, 0};
  assert_int_equal(append(p, a, t, 8), CANOPY_OK);
  int b0 = table_block(a, 0), b1 = table_block(a, 1);
  cn_kv_seq_free(a);
  assert_int_equal(cn_kv_pool_in_use(p), 0);
  assert_int_equal(cn_kv_pool_available(p), 4); /* evictable blocks count as available */
  assert_true(cn_kv_pool_block_cached(p, b0));
  assert_true(cn_kv_pool_block_cached(p, b1));

  cn_kv_seq *b = make_seq(p);
  assert_int_equal(cn_kv_seq_attach_prefix(b, t, 8), 8);
  assert_int_equal(table_block(b, 0), b0);
  assert_int_equal(table_block(b, 1), b1);
  assert_int_equal(cn_kv_pool_in_use(p), 2);
  assert_int_equal(cn_kv_pool_refcount(p, b0), 1);
  assert_rows(p, b, t);
  assert_pool_consistent(p);
  cn_kv_seq_free(b);
  cn_kv_pool_free(p);
}

static void test_a_short_pool_evicts_the_least_recently_released_cached_block(void **state) {
  cn_kv_pool *p = make_pool(1, 1, 2, 4, 4);
  int32_t ta[8] = {1, 1, 1, 1, 2, 2, 2, 2}, tb[8] = {3, 3, 3, 3, 4, 4, 4, 4}, tc[3] = {5, 5, 5};
  cn_kv_seq *a = make_seq(p), *b = make_seq(p);
  assert_int_equal(append(p, a, ta, 8), CANOPY_OK);
  assert_int_equal(append(p, b, tb, 8), CANOPY_OK);
  int a0 = table_block(a, 0), a1 = table_block(a, 1), b0 = table_block(b, 0), b1 = table_block(b, 1);
  /* A sequence releases its tail first, so the LRU order becomes a1, a0, b1, b0. */
  cn_kv_seq_free(a);
  cn_kv_seq_free(b);
  assert_int_equal(cn_kv_pool_available(p), 4);

  cn_kv_seq *c = make_seq(p);
  assert_int_equal(append(p, c, tc, 3), CANOPY_OK); /* a partial block: not published */
  assert_int_equal(table_block(c, 0), a1);
  assert_false(cn_kv_pool_block_cached(p, a1)); /* its index entry is gone with it */
  assert_true(cn_kv_pool_block_cached(p, a0));
  assert_int_equal(cn_kv_pool_available(p), 3);
  assert_rows(p, c, tc);
  assert_pool_consistent(p);

  /* a's prompt now finds its first block only; b's is whole. Attaching a0 takes it off the
   * LRU, so the next eviction is b's tail. */
  cn_kv_seq *d = make_seq(p), *e = make_seq(p);
  assert_int_equal(cn_kv_seq_attach_prefix(d, ta, 8), 4);
  assert_int_equal(table_block(d, 0), a0);
  assert_rows(p, d, ta);
  assert_int_equal(append(p, d, ta, 4), CANOPY_OK);
  assert_int_equal(table_block(d, 1), b1); /* now cached again, as d's second block */
  assert_int_equal(cn_kv_seq_attach_prefix(e, tb, 8), 4);
  assert_int_equal(table_block(e, 0), b0);
  assert_pool_consistent(p);
  cn_kv_seq_free(c);
  cn_kv_seq_free(d);
  cn_kv_seq_free(e);
  cn_kv_pool_free(p);
}

static void test_an_exhausted_pool_is_an_error_with_a_message_and_changes_nothing(void **state) {
  cn_kv_pool *p = make_pool(1, 1, 2, 4, 3);
  cn_kv_seq *a = make_seq(p);
  int32_t t[16];
  fill(t, 16, 1);
  assert_int_equal(append(p, a, t, 6), CANOPY_OK);
  cn_kv_seq *b;
  assert_int_equal(cn_kv_seq_fork(a, &b), CANOPY_OK);
  int before[2] = {table_block(b, 0), table_block(b, 1)};

  /* 14 tokens need 2 more blocks, plus a copy of the shared partial block: 3 > 1. */
  cn_error_clear();
  assert_int_equal(cn_kv_seq_reserve(b, 8), CANOPY_ERR_KV_EXHAUSTED);
  assert_string_equal(canopy_last_error(),
                      "KV cache pool exhausted: need 3 more blocks, 1 available (pool of 3 blocks of 4 tokens)");
  assert_int_equal(cn_kv_seq_len(b), 6);
  assert_int_equal(table_len(b), 2);
  assert_int_equal(table_block(b, 0), before[0]);
  assert_int_equal(table_block(b, 1), before[1]);
  assert_int_equal(cn_kv_pool_refcount(p, before[1]), 2);
  assert_int_equal(cn_kv_pool_available(p), 1);
  assert_pool_consistent(p);

  /* What fits still works afterwards. */
  assert_int_equal(append(p, b, t, 2), CANOPY_OK);
  assert_int_equal(cn_kv_pool_available(p), 0);
  assert_int_equal(cn_kv_seq_reserve(a, 3), CANOPY_ERR_KV_EXHAUSTED);
  assert_rows(p, a, t);
  assert_rows(p, b, t);
  cn_kv_seq_free(a);
  cn_kv_seq_free(b);
  cn_kv_pool_free(p);
}

static void test_publishing_an_already_cached_prefix_keeps_the_existing_entry(void **state) {
  cn_kv_pool *p = make_pool(1, 2, 2, 4, 8);
  int32_t t[12];
  fill(t, 12, 20);
  cn_kv_seq *a = make_seq(p), *b = make_seq(p);
  assert_int_equal(append(p, a, t, 8), CANOPY_OK);
  assert_int_equal(append(p, b, t, 8), CANOPY_OK); /* computed again, without attach */
  assert_true(cn_kv_pool_block_cached(p, table_block(a, 0)));
  assert_true(cn_kv_pool_block_cached(p, table_block(a, 1)));
  assert_false(cn_kv_pool_block_cached(p, table_block(b, 0)));
  assert_false(cn_kv_pool_block_cached(p, table_block(b, 1)));

  /* b's next block chains to a's entries, which hold the same prefix. */
  assert_int_equal(append(p, b, t, 4), CANOPY_OK);
  assert_true(cn_kv_pool_block_cached(p, table_block(b, 2)));
  cn_kv_seq *c = make_seq(p);
  assert_int_equal(cn_kv_seq_attach_prefix(c, t, 12), 12);
  assert_int_equal(table_block(c, 0), table_block(a, 0));
  assert_int_equal(table_block(c, 1), table_block(a, 1));
  assert_int_equal(table_block(c, 2), table_block(b, 2));
  assert_rows(p, c, t);
  assert_pool_consistent(p);
  cn_kv_seq_free(a);
  cn_kv_seq_free(b);
  cn_kv_seq_free(c);
  cn_kv_pool_free(p);
}

static void test_attach_stops_at_the_first_block_whose_tokens_differ(void **state) {
  cn_kv_pool *p = make_pool(1, 1, 2, 4, 8);
  int32_t t[12], u[12];
  fill(t, 12, 1);
  memcpy(u, t, sizeof t);
  u[5] = 99; /* block 1 differs, block 2 is equal again */
  cn_kv_seq *a = make_seq(p), *b = make_seq(p);
  assert_int_equal(append(p, a, t, 12), CANOPY_OK);
  assert_int_equal(cn_kv_seq_attach_prefix(b, u, 12), 4);
  assert_int_equal(append(p, b, u, 8), CANOPY_OK);
  assert_rows(p, a, t);
  assert_rows(p, b, u);
  assert_pool_consistent(p);
  cn_kv_seq_free(a);
  cn_kv_seq_free(b);
  cn_kv_pool_free(p);
}

/* White-box: forges a 64-bit collision by re-keying a's cached block under the hash of other
 * tokens. The tokens stored with the entry must refuse the hit. */
static void test_a_hash_collision_never_attaches_other_tokens(void **state) {
  cn_kv_pool *p = make_pool(1, 1, 2, 4, 8);
  int32_t t[4] = {1, 2, 3, 4}, u[4] = {5, 6, 7, 8};
  cn_kv_seq *a = make_seq(p), *b = make_seq(p), *c = make_seq(p);
  assert_int_equal(append(p, a, t, 4), CANOPY_OK);
  int a0 = table_block(a, 0);
  uint64_t u_key = cn_prefix_hash(CN_PREFIX_ROOT_HASH, u, 4);
  cn_prefix_index_remove(&p->index, a0);
  cn_prefix_index_insert(&p->index, a0, u_key, 0, t);
  assert_int_equal(cn_kv_seq_attach_prefix(b, u, 4), 0);

  /* Publishing u under the contested key replaces the entry; then u is found, and t is not. */
  assert_int_equal(append(p, b, u, 4), CANOPY_OK);
  assert_true(cn_kv_pool_block_cached(p, table_block(b, 0)));
  assert_false(cn_kv_pool_block_cached(p, a0));
  assert_int_equal(cn_kv_seq_attach_prefix(c, u, 4), 4);
  assert_rows(p, c, u);
  cn_kv_seq *d = make_seq(p);
  assert_int_equal(cn_kv_seq_attach_prefix(d, t, 4), 0);
  assert_pool_consistent(p);
  cn_kv_seq_free(a);
  cn_kv_seq_free(b);
  cn_kv_seq_free(c);
  cn_kv_seq_free(d);
  cn_kv_pool_free(p);
}

static void test_a_disabled_prefix_cache_drops_cached_blocks_and_shares_nothing(void **state) {
  cn_kv_pool *p = make_pool(1, 1, 2, 4, 4);
  int32_t t[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  cn_kv_seq *a = make_seq(p);
  assert_int_equal(append(p, a, t, 8), CANOPY_OK);
  int a0 = table_block(a, 0);
  cn_kv_seq_free(a);
  assert_true(cn_kv_pool_block_cached(p, a0));
  cn_kv_pool_set_prefix_cache(p, false);
  assert_false(cn_kv_pool_block_cached(p, a0));
  assert_int_equal(cn_kv_pool_available(p), 4);
  assert_pool_consistent(p);

  cn_kv_seq *b = make_seq(p), *c = make_seq(p);
  assert_int_equal(append(p, b, t, 8), CANOPY_OK);
  assert_false(cn_kv_pool_block_cached(p, table_block(b, 0)));
  assert_int_equal(cn_kv_seq_attach_prefix(c, t, 8), 0);
  assert_pool_consistent(p);
  cn_kv_seq_free(b);
  cn_kv_seq_free(c);
  cn_kv_pool_free(p);
}

static void test_pool_create_rejects_bad_and_overflowing_layouts_with_messages(void **state) {
  cn_kv_pool *p = (cn_kv_pool *)&p;
  cn_kv_layout zero = {.n_layers = 1, .n_kv_heads = 1, .head_dim = 0, .block_size = 4, .n_blocks = 4};
  assert_int_equal(cn_kv_pool_create(&zero, &p), CANOPY_ERR_INVALID_ARG);
  assert_null(p);
  cn_kv_layout huge = {.n_layers = 1 << 20, .n_kv_heads = 1 << 10, .head_dim = 1 << 10, .block_size = 1 << 10,
                       .n_blocks = 1 << 20};
  assert_int_equal(cn_kv_pool_create(&huge, &p), CANOPY_ERR_NO_MEMORY);
  assert_non_null(strstr(canopy_last_error(), "overflows"));
  assert_null(p);
}

/* ---- randomized --------------------------------------------------------------------------- */

enum { MAX_SEQS = 6, MAX_LEN = 48, VOCAB = 3, MAX_BLOCKS = 64 };

typedef struct {
  cn_kv_seq *kv;
  int32_t tok[MAX_LEN]; /* what the sequence committed: its rows must read back as these */
  int len;
} ref_seq;

typedef struct {
  cn_kv_pool *pool;
  ref_seq seqs[MAX_SEQS];
  int n;
  int32_t base[MAX_LEN]; /* most tokens follow it, so prompts share prefixes */
  uint64_t rng;
  int exhausted, attached;
} world;

static int rnd(world *w, int n) { return (int)(cn_test_rand(&w->rng) % (uint64_t)n); }

static int32_t next_token(world *w, int pos) { return rnd(w, 8) ? w->base[pos] : (int32_t)rnd(w, VOCAB); }

static void check_world(world *w, int step, const char *op) {
  cn_kv_pool *p = w->pool;
  const cn_kv_layout *L = cn_kv_pool_layout(p);
  char why[256];
  if (!cn_kv_pool_check(p, why, sizeof why)) fail_msg("step %d (%s): pool check: %s", step, op, why);
  if (cn_kv_pool_available(p) + cn_kv_pool_in_use(p) != L->n_blocks)
    fail_msg("step %d (%s): available %d + in use %d != %d blocks", step, op, cn_kv_pool_available(p),
             cn_kv_pool_in_use(p), L->n_blocks);
  long refs = 0, entries = 0;
  for (int b = 0; b < L->n_blocks; b++) refs += cn_kv_pool_refcount(p, b);
  int distinct = 0;
  char held[MAX_BLOCKS] = {0};
  for (int i = 0; i < w->n; i++) {
    ref_seq *s = &w->seqs[i];
    int nb;
    const int *t = cn_kv_seq_blocks(s->kv, &nb);
    entries += nb;
    if (cn_kv_seq_len(s->kv) != s->len)
      fail_msg("step %d (%s): seq %d len %d, expected %d", step, op, i, cn_kv_seq_len(s->kv), s->len);
    if (nb * L->block_size < s->len)
      fail_msg("step %d (%s): seq %d has %d blocks for %d tokens", step, op, i, nb, s->len);
    for (int j = 0; j < nb; j++) {
      distinct += !held[t[j]];
      held[t[j]] = 1;
    }
    int bad = first_bad_row(p, s->kv, s->tok, s->len);
    if (bad >= 0) fail_msg("step %d (%s): seq %d row %d does not hold token %d", step, op, i, bad, s->tok[bad]);
  }
  if (refs != entries) fail_msg("step %d (%s): refcounts sum to %ld, tables hold %ld", step, op, refs, entries);
  if (distinct != cn_kv_pool_in_use(p))
    fail_msg("step %d (%s): %d distinct blocks in tables, %d in use", step, op, distinct, cn_kv_pool_in_use(p));
}

static const char *random_op(world *w) {
  cn_kv_pool *p = w->pool;
  int bs = cn_kv_pool_layout(p)->block_size;
  int op = rnd(w, 100);
  ref_seq *s = w->n ? &w->seqs[rnd(w, w->n)] : NULL;
  if (op < 8 || !s) {
    if (w->n == MAX_SEQS) return "create (full)";
    ref_seq *n = &w->seqs[w->n];
    assert_int_equal(cn_kv_seq_create(p, &n->kv), CANOPY_OK);
    n->len = 0;
    w->n++;
    return "create";
  }
  if (op < 16) {
    cn_kv_seq_free(s->kv);
    *s = w->seqs[--w->n];
    return "free";
  }
  if (op < 55) {
    int n = 1 + rnd(w, 2 * bs + 1), keep = rnd(w, 4) ? n : 1 + rnd(w, n); /* sometimes commit less */
    if (s->len + n > MAX_LEN) return "append (too long)";
    int nb;
    cn_kv_seq_blocks(s->kv, &nb);
    int *before = malloc(sizeof(int) * (size_t)(nb + 1));
    memcpy(before, cn_kv_seq_blocks(s->kv, NULL), sizeof(int) * (size_t)nb);
    int avail = cn_kv_pool_available(p);
    int st = cn_kv_seq_reserve(s->kv, n);
    if (st) {
      assert_int_equal(st, CANOPY_ERR_KV_EXHAUSTED);
      assert_non_null(strstr(canopy_last_error(), "KV cache pool exhausted: need "));
      int nb2;
      const int *after = cn_kv_seq_blocks(s->kv, &nb2);
      assert_int_equal(nb2, nb);
      assert_memory_equal(after, before, sizeof(int) * (size_t)nb);
      assert_int_equal(cn_kv_pool_available(p), avail);
      free(before);
      w->exhausted++;
      return "append (exhausted)";
    }
    free(before);
    for (int i = 0; i < keep; i++) s->tok[s->len + i] = next_token(w, s->len + i);
    write_rows(p, s->kv, s->tok + s->len, s->len, keep);
    cn_kv_seq_commit(s->kv, s->tok + s->len, keep);
    s->len += keep;
    return "append";
  }
  if (op < 62) {
    int n = 1 + rnd(w, 2 * bs);
    if (s->len + n <= MAX_LEN) cn_kv_seq_reserve(s->kv, n); /* left unwritten; may be exhausted */
    return "reserve";
  }
  if (op < 75) {
    int len = rnd(w, s->len + 1);
    assert_int_equal(cn_kv_seq_truncate(s->kv, len), CANOPY_OK);
    s->len = len;
    return "truncate";
  }
  if (op < 85) {
    if (w->n == MAX_SEQS) return "fork (full)";
    ref_seq *f = &w->seqs[w->n];
    assert_int_equal(cn_kv_seq_fork(s->kv, &f->kv), CANOPY_OK);
    memcpy(f->tok, s->tok, sizeof s->tok);
    f->len = s->len;
    w->n++;
    return "fork";
  }
  if (op < 99) {
    if (w->n == MAX_SEQS) return "attach (full)";
    ref_seq *a = &w->seqs[w->n];
    assert_int_equal(cn_kv_seq_create(p, &a->kv), CANOPY_OK);
    int n = rnd(w, MAX_LEN + 1);
    for (int i = 0; i < n; i++) a->tok[i] = next_token(w, i);
    if (rnd(w, 2)) cn_kv_seq_reserve(a->kv, 1 + rnd(w, bs)); /* reserved blocks of an empty seq go back */
    int got = cn_kv_seq_attach_prefix(a->kv, a->tok, n);
    assert_true(got >= 0 && got <= n && got % bs == 0);
    a->len = got;
    w->n++;
    w->attached += got;
    return "attach";
  }
  cn_kv_pool_set_prefix_cache(p, rnd(w, 4) != 0);
  return "toggle prefix cache";
}

static void run_random_ops(int block_size, int n_blocks, int steps) {
  assert_true(n_blocks <= MAX_BLOCKS);
  world w = {.pool = make_pool(2, 2, 2, block_size, n_blocks)};
  w.rng = cn_test_seed("test_random_ops_keep_pool_invariants_and_every_row");
  for (int i = 0; i < MAX_LEN; i++) w.base[i] = (int32_t)rnd(&w, VOCAB);
  for (int step = 0; step < steps; step++) {
    const char *op = random_op(&w);
    check_world(&w, step, op);
  }
  printf("[ info     ] block size %d, %d blocks: %d steps, %d exhausted reserves, %d tokens attached\n", block_size,
         n_blocks, steps, w.exhausted, w.attached);
  while (w.n) cn_kv_seq_free(w.seqs[--w.n].kv);
  assert_int_equal(cn_kv_pool_in_use(w.pool), 0);
  assert_pool_consistent(w.pool);
  cn_kv_pool_free(w.pool);
}

static void test_random_ops_keep_pool_invariants_and_every_row(void **state) {
  run_random_ops(4, 24, 20000);
  run_random_ops(3, 17, 20000);
  run_random_ops(1, 40, 10000);
}

/* The same on a storage reached only through cn_kv_storage (what the CUDA backend's device bf16
 * pool is): copy-on-write goes through storage->copy and every row still reads back. */
static void test_random_ops_on_a_foreign_storage_keep_every_row(void **state) {
  g_storage = &spans_storage;
  g_copies = 0;
  run_random_ops(4, 24, 10000);
  run_random_ops(3, 17, 10000);
  g_storage = NULL;
  printf("[ info     ] %d storage copies\n", g_copies);
  assert_true(g_copies > 0);
}

/* commit_slots on a foreign storage moves the same rows as on the host: random accepted paths
 * (strictly increasing slots, slots[i] >= i) over block boundaries, rows compared with the host
 * pool's after each commit. Sources and destinations overlap across spans (slots {1, 2}), which
 * the storage's read-all-first copy must get right. */
static void test_commit_slots_on_a_foreign_storage_equals_the_host_pool(void **state) {
  uint64_t rng = cn_test_seed("test_commit_slots_on_a_foreign_storage_equals_the_host_pool");
  cn_kv_pool *host = make_pool(3, 2, 4, 4, 64);
  g_storage = &spans_storage;
  cn_kv_pool *dev = make_pool(3, 2, 4, 4, 64);
  g_storage = NULL;
  cn_kv_seq *hs = make_seq(host), *ds = make_seq(dev);
  int len = 0;
  while (len < 180) {
    int n = 1 + (int)(cn_test_rand(&rng) % 12);
    int32_t toks[16];
    for (int i = 0; i < n; i++) toks[i] = (int32_t)(cn_test_rand(&rng) % 150);
    assert_int_equal(cn_kv_seq_reserve(hs, n), CANOPY_OK);
    assert_int_equal(cn_kv_seq_reserve(ds, n), CANOPY_OK);
    write_rows(host, hs, toks, len, n); /* slot len + j holds token j at position len + j */
    write_rows(dev, ds, toks, len, n);
    int slots[16], k = 0;
    for (int j = 0; j < n; j++)
      if (cn_test_rand(&rng) % 2 || j == 0) slots[k++] = j;
    int32_t kept[16];
    for (int i = 0; i < k; i++) kept[i] = toks[slots[i]];
    assert_int_equal(cn_kv_seq_commit_slots(hs, slots, kept, k), CANOPY_OK);
    assert_int_equal(cn_kv_seq_commit_slots(ds, slots, kept, k), CANOPY_OK);
    /* Position len + i now holds the row written for slot len + slots[i]: compare raw rows. */
    int L = 3, D = 8;
    for (int i = 0; i < k; i++) {
      int hb, hr, db, dr;
      cn_kv_seq_slot(hs, len + i, &hb, &hr);
      cn_kv_seq_slot(ds, len + i, &db, &dr);
      for (int l = 0; l < L; l++)
        for (int v = 0; v < 2; v++) {
          assert_memory_equal(rows_of(host, hb, l, v) + (size_t)hr * D, rows_of(dev, db, l, v) + (size_t)dr * D,
                              sizeof(float) * D);
          for (int c = 0; c < D; c++)
            assert_true(rows_of(dev, db, l, v)[(size_t)dr * D + c] == row_value(kept[i], len + slots[i], l, c, v));
        }
    }
    len += k;
    assert_int_equal(cn_kv_seq_len(ds), len);
  }
  cn_kv_seq_free(hs);
  cn_kv_seq_free(ds);
  cn_kv_pool_free(host);
  cn_kv_pool_free(dev);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_reserve_maps_positions_to_blocks_across_block_boundaries),
      cmocka_unit_test(test_fork_shares_blocks_and_a_write_copies_the_shared_partial_block),
      cmocka_unit_test(test_truncate_releases_blocks_and_append_rewrites_past_the_new_length),
      cmocka_unit_test(test_truncate_into_a_cached_block_copies_it_before_rewriting),
      cmocka_unit_test(test_prefix_attach_shares_the_blocks_of_a_live_sequence),
      cmocka_unit_test(test_prefix_reuse_after_the_owner_was_freed_takes_the_evictable_block),
      cmocka_unit_test(test_a_short_pool_evicts_the_least_recently_released_cached_block),
      cmocka_unit_test(test_an_exhausted_pool_is_an_error_with_a_message_and_changes_nothing),
      cmocka_unit_test(test_publishing_an_already_cached_prefix_keeps_the_existing_entry),
      cmocka_unit_test(test_attach_stops_at_the_first_block_whose_tokens_differ),
      cmocka_unit_test(test_a_hash_collision_never_attaches_other_tokens),
      cmocka_unit_test(test_a_disabled_prefix_cache_drops_cached_blocks_and_shares_nothing),
      cmocka_unit_test(test_pool_create_rejects_bad_and_overflowing_layouts_with_messages),
      cmocka_unit_test(test_random_ops_keep_pool_invariants_and_every_row),
      cmocka_unit_test(test_random_ops_on_a_foreign_storage_keep_every_row),
      cmocka_unit_test(test_commit_slots_on_a_foreign_storage_equals_the_host_pool),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
