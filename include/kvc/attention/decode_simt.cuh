//! @file
//! CUDA-core warp computation of decode attention (fp32 K/V, and any T in principle): one warp
//! owns 8 slots of each shared-memory tile and keeps its own online-softmax state for the G
//! query heads of the KV head.
//!
//! Lane layout, lane = 8 * part + s (s = lane % 8 the slot, part = lane / 8 in 0..3):
//! - Q K^T: lane (s, part) takes the 16-byte chunks c = 4 j + part of key row s and of each
//!   query row, then two xor-shuffles (8, 16) add the four parts. The 8 lanes of a quarter warp
//!   read the same logical chunk of 8 consecutive rows, which the (row & 7) swizzle spreads over
//!   8 bank groups; the query chunks are broadcasts.
//! - P V: lane owns whole 16-byte chunks of the output row (chunks lane + 32 i, or, for rows of
//!   fewer than 32 chunks, chunk lane % chunks in slot class lane / chunks) and loops over the
//!   slots, taking p from lane s by shuffle. Classes are summed with xor-shuffles at the end.
#pragma once

#include <cstdint>

#include "kvc/attention/decode_primitives.cuh"
#include "kvc/attention/decode_tc.cuh"
#include "kvc/core/macros.hpp"

namespace kvc::detail {

template <class T, int kHeadDim, int kGroupSize, class Variant>
struct SimtWarp {
  static constexpr int kElems = Vec16<T>::kElems;               // elements per 16-byte chunk
  static constexpr int kChunks = kHeadDim / kElems;             // chunks per row
  static constexpr int kRowBytes = kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kWarpSlots = 8;
  static constexpr int kQkChunks = kChunks / 4;                 // per part
  static constexpr int kPvChunks = kChunks >= 32 ? kChunks / 32 : 1;  // per lane
  static constexpr int kClasses = kChunks >= 32 ? 1 : 32 / kChunks;   // slot classes
  static_assert(kChunks % 4 == 0 && kChunks >= 8, "rows of at least 8 chunks of 16 bytes");
  static_assert(kWarpSlots % kClasses == 0, "slot classes must divide the warp's slots");

  float o[kGroupSize][kPvChunks * kElems];
  float m[kGroupSize];  // running max per head, log2 units (warp-uniform)
  float l[kGroupSize];  // running sum of this lane's slot (s = lane % 8)

  KVC_DEVICE void begin() {
#pragma unroll
    for (int h = 0; h < kGroupSize; ++h) {
#pragma unroll
      for (int i = 0; i < kPvChunks * kElems; ++i) o[h][i] = 0.0f;
      m[h] = -INFINITY;
      l[h] = 0.0f;
    }
  }

  KVC_DEVICE static uint4 load_chunk(unsigned char const* tile, int row, int chunk) {
    return *reinterpret_cast<uint4 const*>(tile + row * kRowBytes + ((chunk ^ (row & 7)) << 4));
  }

  //! Online-softmax update over the warp's 8 slots [warp_row0, warp_row0 + 8) of a tile whose
  //! first `valid` rows are real. `q_tile` is the item's query tile [G][head_dim], swizzled like
  //! the K/V tiles.
  //! `sinks[h]` receives the logits of head h (lanes of part 0 write).
  KVC_DEVICE void tile(unsigned char const* k_tile, unsigned char const* v_tile,
                       unsigned char const* q_tile, int warp_row0, int valid, int slot0, int lane,
                       Variant const& variant, float scale, float scale_log2, int batch_row,
                       int q_head0, float* const (&sinks)[kGroupSize], int sink_limit) {
    int const s = lane & 7;
    int const part = lane >> 3;
    int const row = warp_row0 + s;

    float acc[kGroupSize];
#pragma unroll
    for (int h = 0; h < kGroupSize; ++h) acc[h] = 0.0f;
#pragma unroll
    for (int j = 0; j < kQkChunks; ++j) {
      int const chunk = 4 * j + part;
      float key[kElems];
      Vec16<T>::to_float(load_chunk(k_tile, row, chunk), key);
#pragma unroll
      for (int h = 0; h < kGroupSize; ++h) {
        float query[kElems];
        Vec16<T>::to_float(load_chunk(q_tile, h, chunk), query);  // a broadcast per quarter warp
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[h] = fmaf(query[e], key[e], acc[h]);
      }
    }

    bool const live = row < valid;
    float p[kGroupSize];
    float alpha[kGroupSize];
#pragma unroll
    for (int h = 0; h < kGroupSize; ++h) {
      float dot = acc[h] + __shfl_xor_sync(0xffffffffu, acc[h], 8);
      dot += __shfl_xor_sync(0xffffffffu, dot, 16);
      float value;
      if constexpr (Variant::kTransformsLogits) {
        value = variant.logits_transform(dot * scale, batch_row, q_head0 + h, slot0 + row) * kLog2e;
      } else {
        value = dot * scale_log2;
      }
      value = live ? value : -INFINITY;
      if (part == 0 && live && sinks[h] != nullptr && slot0 + row < sink_limit) sinks[h][slot0 + row] = value;
      float tile_max = value;
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 4));
      float const m_new = fmaxf(m[h], tile_max);
      float const m_use = m_new == -INFINITY ? 0.0f : m_new;
      alpha[h] = exp2_approx(m[h] - m_use);
      p[h] = exp2_approx(value - m_use);
      l[h] = l[h] * alpha[h] + p[h];
      m[h] = m_new;
#pragma unroll
      for (int i = 0; i < kPvChunks * kElems; ++i) o[h][i] *= alpha[h];
    }

    int const slot_class = kClasses > 1 ? lane / kChunks : 0;
#pragma unroll
    for (int k = 0; k < kWarpSlots / kClasses; ++k) {
      int const slot = k * kClasses + slot_class;  // within the warp's 8
      int const v_row = warp_row0 + slot;
      float weight[kGroupSize];
#pragma unroll
      for (int h = 0; h < kGroupSize; ++h) weight[h] = __shfl_sync(0xffffffffu, p[h], slot);
#pragma unroll
      for (int c = 0; c < kPvChunks; ++c) {
        int const chunk = kClasses > 1 ? lane % kChunks : lane + 32 * c;
        float value[kElems];
        Vec16<T>::to_float(load_chunk(v_tile, v_row, chunk), value);
#pragma unroll
        for (int h = 0; h < kGroupSize; ++h) {
#pragma unroll
          for (int e = 0; e < kElems; ++e) o[h][c * kElems + e] = fmaf(weight[h], value[e], o[h][c * kElems + e]);
        }
      }
    }
  }

  //! Writes this warp's (m, l) per head to s_m[warp][8], s_l[warp][8].
  KVC_DEVICE void publish(float* s_m, float* s_l, int warp, int lane) const {
#pragma unroll
    for (int h = 0; h < kGroupSize; ++h) {
      float total = l[h];  // every part holds the same per-slot sums: add over the 8 slots
      total += __shfl_xor_sync(0xffffffffu, total, 1);
      total += __shfl_xor_sync(0xffffffffu, total, 2);
      total += __shfl_xor_sync(0xffffffffu, total, 4);
      if (lane == 0) {
        s_m[warp * 8 + h] = m[h];
        s_l[warp * 8 + h] = total;
      }
    }
  }

  //! s_o[h][d] (row stride head_dim + 4) = (first ? 0 : s_o) + w[h] * O[h][d].
  template <int kWarps>
  KVC_DEVICE void accumulate(float* s_o, float const* s_m, int warp, bool first, int lane) {
    constexpr int kStride = kHeadDim + 4;
#pragma unroll
    for (int h = 0; h < kGroupSize; ++h) {
#pragma unroll
      for (int i = 0; i < kPvChunks * kElems; ++i) {
#pragma unroll
        for (int offset = kChunks; offset < 32; offset <<= 1) {
          o[h][i] += __shfl_xor_sync(0xffffffffu, o[h][i], offset);
        }
      }
    }
    if (kClasses > 1 && lane >= kChunks) return;
#pragma unroll
    for (int h = 0; h < kGroupSize; ++h) {
      float const weight = merge_weight<kWarps>(s_m, warp, h);
      float* out_row = s_o + h * kStride;
#pragma unroll
      for (int c = 0; c < kPvChunks; ++c) {
        int const chunk = kClasses > 1 ? lane : lane + 32 * c;
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          float* target = out_row + chunk * kElems + e;
          *target = (first ? 0.0f : *target) + weight * o[h][c * kElems + e];
        }
      }
    }
  }
};

}  // namespace kvc::detail
