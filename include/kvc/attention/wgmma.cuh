//! @file
//! Thin wrappers around Hopper's warpgroup matrix multiply (sm_90a `wgmma.mma_async`), for the
//! prefill attention's tensor-core warps: shared-memory matrix descriptors for 128-byte-swizzled
//! tiles, the fence / commit / wait instructions, and the m64nNk16 products with fp32
//! accumulators that attention needs (S = Q K^T from two shared-memory operands, O += P V with
//! P in registers and V stored N-major).
//!
//! Tile layout the descriptors describe (both operands, 16-bit elements): a tile of R rows by
//! C columns (C a multiple of 64) is stored as C / 64 column blocks of [R][64] elements, each
//! row of a block 128 bytes whose 16-byte chunk c sits at chunk c ^ (row & 7) — the hardware's
//! 128-byte swizzle — and every block 1024-byte aligned.
//!   K-major operand (Q as A, K as B of S = Q K^T): rows = M or N, the block's columns = K.
//!     8-row groups 1024 bytes apart (stride byte offset); one k16 step = +32 bytes within a
//!     block.
//!   N-major operand (V as B of O = P V): rows = K (keys), columns = N (dims): 8-key groups 1024
//!     bytes apart (stride byte offset), column blocks R * 128 bytes apart (leading byte offset).
//! Accumulator fragments (m64nN, fp32): warp w of the warpgroup holds rows 16 w .. 16 w + 15 in
//! the layout of N / 8 mma.sync m16n8 accumulators, d[n][0..3] = rows (g, g, g + 8, g + 8) x
//! columns (8 n + 2 t, + 1, 8 n + 2 t, + 1) with lane = 4 g + t; the register A operand of a k16
//! step has the mma.sync m16n8k16 A layout, so P is the S accumulators rounded to 16 bits.
//! Every instruction is warpgroup-collective: all 128 threads must execute it.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kvc/core/macros.hpp"

// The device pass for sm_90a (or a later family-specific Hopper target) has wgmma; every other
// pass (host, sm_90 without the suffix, other architectures) compiles the fallback paths.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KVC_HAS_WGMMA 1
#else
#define KVC_HAS_WGMMA 0
#endif

namespace kvc::detail {

//! True in device code compiled with wgmma (see KVC_HAS_WGMMA).
inline constexpr bool kHasWgmma = KVC_HAS_WGMMA != 0;

KVC_DEVICE void wgmma_unavailable() {
  __trap();
}

//! Byte offset of 16-byte chunk `chunk` of row `row` in a tile of `rows` rows stored as 64-column
//! blocks with the 128-byte swizzle (16-bit elements: 8 chunks per block row).
KVC_HOST_DEVICE constexpr int wgmma_tile_offset(int rows, int row, int chunk) {
  return (chunk >> 3) * rows * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

//! Shared-memory matrix descriptor of a 128-byte-swizzled operand starting at `address` (a
//! shared-window byte address; the swizzle pattern is taken from address bits, so the tile
//! must be 1024-byte aligned and `address` may add the in-row offset of a k step).
KVC_HOST_DEVICE std::uint64_t wgmma_descriptor(std::uint32_t address, std::uint32_t leading_bytes,
                                               std::uint32_t stride_bytes) {
  return static_cast<std::uint64_t>((address & 0x3FFFFu) >> 4) |
         (static_cast<std::uint64_t>((leading_bytes & 0x3FFFFu) >> 4) << 16) |
         (static_cast<std::uint64_t>((stride_bytes & 0x3FFFFu) >> 4) << 32) |
         (1ull << 62);  // 128-byte swizzle
}

//! `descriptor` moved on by `bytes` (a multiple of 16): only the address field in the low word
//! changes, and it cannot carry out of it (shared-window addresses stay below 2^18 bytes), so the
//! sum is one 32-bit add and the constant high word stays as it is, instead of a 64-bit add with
//! carry (and its register moves) per k step.
KVC_HOST_DEVICE std::uint64_t wgmma_descriptor_advance(std::uint64_t descriptor,
                                                       std::uint32_t bytes) {
  std::uint32_t const low = static_cast<std::uint32_t>(descriptor) + (bytes >> 4);
  return (descriptor & 0xFFFFFFFF00000000ull) | low;
}

//! Orders this thread's earlier register writes before the warpgroup's next wgmma.
KVC_DEVICE void wgmma_fence() {
#if KVC_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

KVC_DEVICE void wgmma_commit() {
#if KVC_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

//! Waits until at most kPending committed groups of this warpgroup are in flight.
template <int kPending>
KVC_DEVICE void wgmma_wait() {
#if KVC_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

//! Makes this thread's generic-proxy shared-memory writes (st.shared, cp.async once waited for)
//! visible to the async proxy that wgmma reads through; a barrier must follow.
KVC_DEVICE void fence_proxy_async_shared() {
#if KVC_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

//! Pins accumulator registers at this point of the instruction stream: the compiler may not
//! move their reads or writes across it (used around wgmma issue and wait).
template <int kTiles>
KVC_DEVICE void wgmma_fence_operands(float (&d)[kTiles][4]) {
#pragma unroll
  for (int n = 0; n < kTiles; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(d[n][i])::"memory");
  }
}

//! m64nNk16 products with fp32 accumulators d[N / 8][4]; `accumulate` = 0 overwrites d.
//!   ss:      A (M x K) and B (N x K) K-major in shared memory (descriptors).
//!   rs_b_mn: A from registers (the m16n8k16 A fragment of the warp's 16 rows), B (K x N)
//!            N-major in shared memory.
template <class T, int N>
struct WgmmaM64;

// The instructions, stamped per (element type, N) by one macro; their accumulator register lists
// (d[N / 8][4] as "+f" operands %0 .. %(N / 2 - 1)) are spelled out once per N.
#define KVC_WGMMA_REGS_64                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
#define KVC_WGMMA_OUTS_64(d)                                                                    \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),     \
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), \
      "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), \
      "+f"(d[7][2]), "+f"(d[7][3])
#define KVC_WGMMA_REGS_128                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}, "
#define KVC_WGMMA_OUTS_128(d)                                                                     \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),       \
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),   \
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),   \
      "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),   \
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),   \
      "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),   \
      "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), \
      "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]),             \
      "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),             \
      "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]),             \
      "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]),             \
      "+f"(d[15][2]), "+f"(d[15][3])

// ss takes its descriptors as %(regs) and %(regs + 1) and the accumulate flag next; rs_b_mn its
// A fragment as %(regs) .. %(regs + 3), the descriptor and the flag next.
#define KVC_WGMMA_M64(CTYPE, PTX, N, SS_OPS, SS_FLAG, RS_OPS, RS_FLAG)                      \
  template <>                                                                               \
  struct WgmmaM64<CTYPE, N> {                                                               \
    KVC_DEVICE static void ss(float (&d)[N / 8][4], std::uint64_t a, std::uint64_t b,       \
                              int accumulate) {                                             \
      KVC_WGMMA_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, " SS_FLAG                             \
                    ", 0;\n"                                                                \
                    "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX           \
                    " " KVC_WGMMA_REGS_##N SS_OPS ", p, 1, 1, 0, 0;\n}\n"                   \
                    : KVC_WGMMA_OUTS_##N(d)                                                 \
                    : "l"(a), "l"(b), "r"(accumulate));                                     \
    }                                                                                       \
    KVC_DEVICE static void rs_b_mn(float (&d)[N / 8][4], std::uint32_t const (&a)[4],       \
                                   std::uint64_t b, int accumulate) {                       \
      KVC_WGMMA_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, " RS_FLAG                             \
                    ", 0;\n"                                                                \
                    "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX           \
                    " " KVC_WGMMA_REGS_##N RS_OPS ", p, 1, 1, 1;\n}\n"                      \
                    : KVC_WGMMA_OUTS_##N(d)                                                 \
                    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate)); \
    }                                                                                       \
  };

#if KVC_HAS_WGMMA
#define KVC_WGMMA_ASM(...) asm volatile(__VA_ARGS__)
#else
#define KVC_WGMMA_ASM(...) wgmma_unavailable()
#endif

#define KVC_WGMMA_M64_TYPES(N, SS_OPS, SS_FLAG, RS_OPS, RS_FLAG)            \
  KVC_WGMMA_M64(__nv_bfloat16, "bf16", N, SS_OPS, SS_FLAG, RS_OPS, RS_FLAG) \
  KVC_WGMMA_M64(half, "f16", N, SS_OPS, SS_FLAG, RS_OPS, RS_FLAG)

KVC_WGMMA_M64_TYPES(64, "%32, %33", "%34", "{%32, %33, %34, %35}, %36", "%37")
KVC_WGMMA_M64_TYPES(128, "%64, %65", "%66", "{%64, %65, %66, %67}, %68", "%69")

#undef KVC_WGMMA_M64_TYPES
#undef KVC_WGMMA_M64
#undef KVC_WGMMA_ASM
#undef KVC_WGMMA_OUTS_64
#undef KVC_WGMMA_OUTS_128
#undef KVC_WGMMA_REGS_64
#undef KVC_WGMMA_REGS_128

}  // namespace kvc::detail
