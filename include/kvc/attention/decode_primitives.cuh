//! @file
//! Thin wrappers around the sm_80+/sm_90 instructions the decode kernels use: 16-byte cp.async
//! with zero fill, ldmatrix (plain and transposed), mma.sync m16n8k16 (fp16/bf16 in, fp32
//! accumulate), ex2.approx, grid-dependency control (programmatic dependent launch) and
//! 16-bit packing. One instruction per function; the fragment layouts are written out where the
//! kernels use them (decode_tc.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kvc/core/macros.hpp"

namespace kvc::detail {

inline constexpr float kLog2e = 1.4426950408889634f;  //!< log2(e)
inline constexpr float kLn2 = 0.6931471805599453f;    //!< ln(2)

//! Shared address of 16-byte chunk `chunk` of row `row` in a tile of kRowBytes-byte rows whose
//! chunks are XOR-swizzled by (row & 7) (the layout of every K/V/Q tile in the attention kernels).
template <int kRowBytes>
KVC_DEVICE std::uint32_t swizzled_address(std::uint32_t tile, int row, int chunk) {
  return tile + static_cast<std::uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

//! Shared-memory address of a generic pointer, as cp.async / ldmatrix take it.
KVC_DEVICE std::uint32_t smem_address(void const* pointer) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(pointer));
}

//! Copies 16 bytes global -> shared without the register file (L2 only, .cg). When `valid` is
//! false nothing is read and the 16 destination bytes are zero-filled.
KVC_DEVICE void cp_async_16(std::uint32_t dst, void const* src, bool valid) {
  int const src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

KVC_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

//! Waits until at most kPending of this thread's committed cp.async groups are in flight.
template <int kPending>
KVC_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

//! Four 8x8 b16 matrices; lane l supplies the address of row (l % 8) of matrix (l / 8) and
//! receives, of matrix i, the elements (row l / 4, columns 2 * (l % 4) and + 1) in r[i].
KVC_DEVICE void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

//! As ldmatrix_x4, transposed: lane l receives, of matrix i, the elements (rows 2 * (l % 4) and
//! + 1, column l / 4) in r[i] (lower row in the lower half).
KVC_DEVICE void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

//! D = A * B + C for one m16n8k16 tile, fp32 accumulate, A row-major, B column-major.
template <class T>
KVC_DEVICE void mma_m16n8k16(float (&d)[4], std::uint32_t const (&a)[4], std::uint32_t b0, std::uint32_t b1);

template <>
KVC_DEVICE void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], std::uint32_t const (&a)[4], std::uint32_t b0,
                                           std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
KVC_DEVICE void mma_m16n8k16<half>(float (&d)[4], std::uint32_t const (&a)[4], std::uint32_t b0,
                                  std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

//! Two floats rounded to a packed 16-bit pair: `lo` in bits 0..15, `hi` in bits 16..31.
template <class T>
KVC_DEVICE std::uint32_t pack2(float lo, float hi);

template <>
KVC_DEVICE std::uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 const pair = __floats2bfloat162_rn(lo, hi);  // .x = lo (low half)
  return *reinterpret_cast<std::uint32_t const*>(&pair);
}

template <>
KVC_DEVICE std::uint32_t pack2<half>(float lo, float hi) {
  __half2 const pair = __floats2half2_rn(lo, hi);  // .x = lo (low half)
  return *reinterpret_cast<std::uint32_t const*>(&pair);
}

//! 2^x, approximate (2 ulp), flushes subnormals; exp2(-inf) = 0.
KVC_DEVICE float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

//! Programmatic dependent launch: wait until the preceding grid in the stream has completed and
//! its memory is visible (a no-op when the kernel was launched without the attribute).
KVC_DEVICE void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

//! Programmatic dependent launch: allow the next grid in the stream to be scheduled now.
KVC_DEVICE void grid_dependency_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

//! Converts 16 bytes holding kElems elements of T to floats.
template <class T>
struct Vec16;

template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  KVC_DEVICE static void to_float(uint4 raw, float (&out)[4]) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
};

template <>
struct Vec16<half> {
  static constexpr int kElems = 8;
  KVC_DEVICE static void to_float(uint4 raw, float (&out)[8]) {
    std::uint32_t const words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 const pair = __half22float2(*reinterpret_cast<__half2 const*>(&words[i]));
      out[2 * i] = pair.x;
      out[2 * i + 1] = pair.y;
    }
  }
};

template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int kElems = 8;
  KVC_DEVICE static void to_float(uint4 raw, float (&out)[8]) {
    std::uint32_t const words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};

}  // namespace kvc::detail
