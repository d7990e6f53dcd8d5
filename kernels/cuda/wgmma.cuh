/* Hopper warpgroup MMA (sm_90a) for the kernels that use it (tree_attention_wgmma.cu,
 * gemm_skinny.cu): the wgmma shapes they issue, its fences and waits, and shared-memory matrix
 * descriptors of 128-byte-swizzled tiles ([rows][64] bf16 panels, 128 bytes a row, the 16-byte
 * piece c of row r stored at piece c ^ (r % 8), tiles 1024-byte aligned). CN_HAVE_WGMMA is 1 in
 * the sm_90a pass only; the portable PTX pass must compile the kernels as stubs. */
#ifndef CANOPY_KERNELS_CUDA_WGMMA_CUH
#define CANOPY_KERNELS_CUDA_WGMMA_CUH

#include <stdint.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CN_HAVE_WGMMA 1
#else
#define CN_HAVE_WGMMA 0
#endif

#if CN_HAVE_WGMMA
/* The generated operand lists of the four wgmma shapes the kernel uses (d holds the m16n8
 * accumulator fragments of this warp's 16 rows, n / 8 of them):
 *  - wgmma_ss_n64: d (+)= A B, m64n64k16 (64 keys a tile), A and B from shared memory
 *    (descriptors), d = A B when !acc; wgmma_ss_n32 the same for 32 keys (half a tile);
 *  - wgmma_rs_nN_tb: d += A B, m64nNk16, A (this warp's 16 rows) from registers, B from shared
 *    memory stored MN-major (transposed: the V tile is key-major with N = head_dim contiguous). */
/* The accumulator operands of 4 n8 blocks (16 registers) starting at block b, and of 8. */
#define WG_ACC4(d, b)                                                                                                  \
  "+f"(d[b][0]), "+f"(d[b][1]), "+f"(d[b][2]), "+f"(d[b][3]), "+f"(d[b + 1][0]), "+f"(d[b + 1][1]), "+f"(d[b + 1][2]), \
      "+f"(d[b + 1][3]), "+f"(d[b + 2][0]), "+f"(d[b + 2][1]), "+f"(d[b + 2][2]), "+f"(d[b + 2][3]),                   \
      "+f"(d[b + 3][0]), "+f"(d[b + 3][1]), "+f"(d[b + 3][2]), "+f"(d[b + 3][3])
#define WG_ACC8(d, b) WG_ACC4(d, b), WG_ACC4(d, b + 4)
#define WG_REGS16 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"
#define WG_REGS32 WG_REGS16 ",%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
#define WG_REGS64                                                                                                      \
  WG_REGS32                                                                                                            \
      ",%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,"      \
      "%58,%59,%60,%61,%62,%63"

__device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], uint64_t da, uint64_t db, int acc) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" WG_REGS32 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
               : WG_ACC8(d, 0)
               : "l"(da), "l"(db), "r"(acc));
}
__device__ __forceinline__ void wgmma_ss_n32(float (&d)[4][4], uint64_t da, uint64_t db, int acc) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {" WG_REGS16 "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
               : WG_ACC4(d, 0)
               : "l"(da), "l"(db), "r"(acc));
}
__device__ __forceinline__ void wgmma_rs_n64_tb(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" WG_REGS32
               "}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
               : WG_ACC8(d, 0)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_rs_n128_tb(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" WG_REGS64
               "}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
               : WG_ACC8(d, 0), WG_ACC8(d, 8)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
/* Waits until at most N of this warpgroup's committed groups are still running. */
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/* Pins accumulator registers after a wait: uses of them cannot be scheduled before it. */
template <int N> __device__ __forceinline__ void pin(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; i++)
#pragma unroll
    for (int e = 0; e < 4; e++)
      asm volatile("" : "+f"(d[i][e])::"memory");
}

/* A shared-memory matrix descriptor, 128-byte swizzle: start, leading and stride byte offsets. */
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | (uint64_t)((lbo & 0x3FFFF) >> 4) << 16 |
         (uint64_t)((sbo & 0x3FFFF) >> 4) << 32 | 1ull << 62;
}

/* A descriptor moved by `bytes` (a multiple of 16) in shared memory: the start address / 16 is
 * its low 14 bits and no shared address carries out of them, so a 32-bit add does it (one
 * instruction instead of rebuilding the descriptor for every wgmma). */
__device__ __forceinline__ uint64_t desc_add(uint64_t d, uint32_t bytes) {
  return (d & 0xFFFFFFFF00000000ull) | (uint32_t)((uint32_t)d + (bytes >> 4));
}

/* Byte offset of 16-byte piece c (8 columns) of row r in a swizzled tile of R rows. */
template <int R> __device__ __forceinline__ uint32_t sw128_at(int r, int c) {
  return (uint32_t)((c / 8) * R * 128 + r * 128 + (((c % 8) ^ (r % 8)) << 4));
}

#endif

#endif
