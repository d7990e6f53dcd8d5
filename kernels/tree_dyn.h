/* A dynamic (EAGLE-2) draft tree grown where the draft's picks are, so that its levels chain
 * without the host (model/forward.h, cn_dyn_tree). The state lives in an ids buffer (cn_ids): 32-bit
 * words, floats as their bits. This header is the layout both twins share: the host's in
 * kernels/cpu/tree_dyn.c, the device's in kernels/cuda/.
 *
 * The shape is fixed, so every forward of a step has a shape known before it runs:
 *  - fed nodes: the root (0), then K a level: level d (1 .. D-1) feeds nodes 1 + (d - 1) K + j,
 *    j < K, in the draft's tree slots f - 1;
 *  - candidates: fed node f's picks are candidates f K + r (r: pick rank);
 *  - the verification tree: T = 1 + min(N, candidates) nodes, the root first.
 * Where the host grower (draft/tree_grow.c) feeds fewer than K nodes at a level (fewer are in the
 * running), the rest of the level is padding: the next best nodes of that depth, whose subtrees
 * can never enter the final tree, or invalid slots (nothing left). The kept tree is the host
 * grower's, node for node; padding of the verification tree has parent -2 (in no tree). */
#ifndef CANOPY_KERNELS_TREE_DYN_H
#define CANOPY_KERNELS_TREE_DYN_H

#include <stdint.h>

#ifdef __CUDACC__
#define CN_DYN_HD __host__ __device__
#else
#define CN_DYN_HD
#endif

typedef struct cn_dyn_layout {
  int K, D, N; /* picks a fed node (topk), depth, kept nodes */
  int R;       /* fed nodes, the root included: 1 + (D - 1) K */
  int C;       /* candidates: R K */
  int T;       /* verification nodes: 1 + min(N, C) */
  /* word offsets into the ids */
  int f_parent, f_token, f_depth, f_valid, f_score, f_logp; /* [R] */
  int c_token, c_score, c_logp, c_valid, c_fed;             /* [C] */
  int t_token, t_parent, t_pick, t_fed;                     /* [T]: the tree the verification checks */
  int t_n;                                                  /* its real nodes, the root included */
  int scratch;                                              /* [C + R] working room of the reranking */
  int words;
} cn_dyn_layout;

/* The layout of a dynamic tree of K picks a node, D levels, N kept nodes (1 <= K <= 32). */
static inline CN_DYN_HD cn_dyn_layout cn_dyn_layout_make(int K, int D, int N) {
  cn_dyn_layout l = {.K = K, .D = D, .N = N, .R = 1 + (D - 1) * K};
  l.C = l.R * K;
  l.T = 1 + (N < l.C ? N : l.C);
  int at = 0;
  l.f_parent = at, at += l.R;
  l.f_token = at, at += l.R;
  l.f_depth = at, at += l.R;
  l.f_valid = at, at += l.R;
  l.f_score = at, at += l.R;
  l.f_logp = at, at += l.R;
  l.c_token = at, at += l.C;
  l.c_score = at, at += l.C;
  l.c_logp = at, at += l.C;
  l.c_valid = at, at += l.C;
  l.c_fed = at, at += l.C;
  l.t_token = at, at += l.T;
  l.t_parent = at, at += l.T;
  l.t_pick = at, at += l.T;
  l.t_fed = at, at += l.T;
  l.t_n = at, at += 1;
  l.scratch = at, at += l.C + l.R;
  l.words = at;
  return l;
}

/* Level d's first fed node (d >= 1); level 0 is the root alone. */
static inline CN_DYN_HD int cn_dyn_level_first(const cn_dyn_layout *l, int d) { return d == 0 ? 0 : 1 + (d - 1) * l->K; }

#endif
