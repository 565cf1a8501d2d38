//! @file
//! Tensor-core warp computation of decode attention for 16-bit K/V (fp16, bf16) and any group
//! size G <= 8: one warp owns 16 slots of each shared-memory tile and keeps its own online
//! softmax state for the G query heads of the KV head, so K and V are read once for all G.
//!
//! Two mma.sync.m16n8k16 (fp32 accumulate) per 16 slots and 16 dims. Notation for one warp:
//! lane = 4 * g + t (g = lane / 4 in 0..7, t = lane % 4).
//!
//! S = Q K^T (M = query heads, N = slots, K = head dim), per 8 slots (n-tile) and 16 dims (k):
//!   A = Q   [16 heads x 16 dims]  a0 = Q[g][2t, 2t+1]   a1 = Q[g+8][..] = 0
//!                                 a2 = Q[g][2t+8, +9]   a3 = Q[g+8][..] = 0   (rows >= G: 0)
//!   B = K^T [16 dims x 8 slots]   b0 = K[slot g][dim 2t, 2t+1]   b1 = K[slot g][dim 2t+8, +9]
//!                                 (ldmatrix, non-transposed, of the K tile rows = slots)
//!   C = S   [16 heads x 8 slots]  c0, c1 = S[head g][slot 2t, 2t+1]; c2, c3 = rows g+8 (unused)
//! O^T = V^T P^T (M = head dims, N = query heads, K = slots), per 16 dims (m-tile), 16 slots:
//!   A = V^T [16 dims x 16 slots]  a0 = V[slot 2t, 2t+1][dim g]     a1 = V[2t, 2t+1][dim g+8]
//!                                 a2 = V[2t+8, +9][dim g]          a3 = V[2t+8, +9][dim g+8]
//!                                 (ldmatrix .trans of the V tile rows = slots)
//!   B = P^T [16 slots x 8 heads]  b0 = P[head g][slot 2t, 2t+1]   b1 = P[head g][slot 2t+8, +9]
//!                                 = the C fragments (c0, c1) of the two S n-tiles, as 16-bit:
//!                                 the softmax output feeds the second mma without shuffles.
//!   C = O^T [16 dims x 8 heads]   c0, c1 = O[head 2t, 2t+1][dim g]; c2, c3 = [..][dim g+8]
//! The per-head softmax state (row max m, row sum l) lives with the S rows (head g); rescaling
//! O^T needs the factors of heads 2t and 2t+1, fetched with two shuffles from lanes 8t, 8t+4.
//!
//! Shared-memory tiles are [slots][head_dim] with 16-byte chunks XOR-swizzled by (row & 7):
//! chunk c of row r sits at chunk (c ^ (r & 7)). The 8 row addresses of one ldmatrix 8x8
//! matrix then fall in 8 distinct bank groups (no conflicts), and so do cp.async writes.
#pragma once

#include <cstdint>

#include "kvc/attention/decode_primitives.cuh"
#include "kvc/core/macros.hpp"

namespace kvc::detail {

//! Where a warp writes the scaled logits of its slots (score hook), or nowhere.
struct LogitSink {
  float* row = nullptr;  //!< probs row of (batch row, query head) of this lane, or null
  int limit = 0;         //!< slots below this are written (the hook's stride)
};

//! Weight of warp `warp`'s partial state of head `head` when the CTA's warps are merged:
//! 2^(m_warp - max over warps of m), 0 when no warp saw a slot. s_m is [kWarps][8].
template <int kWarps>
KVC_DEVICE float merge_weight(float const* s_m, int warp, int head) {
  float top = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) top = fmaxf(top, s_m[w * 8 + head]);
  return top == -INFINITY ? 0.0f : exp2_approx(s_m[warp * 8 + head] - top);
}

template <class T, int kHeadDim, int kGroupSize, class Variant>
struct TcWarp {
  static_assert(kGroupSize >= 1 && kGroupSize <= 8, "the M/N tiles hold at most 8 query heads");
  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of 16");
  static constexpr int kSteps = kHeadDim / 16;   // k-steps of S, m-tiles of O^T
  static constexpr int kRowBytes = kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kWarpSlots = 16;

  // Q fragments stay in registers for the whole item up to head dim 128; at 256 they are re-read
  // from shared memory every tile (64 registers otherwise: spills).
  static constexpr bool kQInRegisters = kHeadDim <= 128;
  static constexpr int kQRegSteps = kQInRegisters ? kSteps : 1;

  std::uint32_t q[kQRegSteps][2];  // a0, a2 of Q per k-step (a1 = a3 = 0)
  float o[kSteps][4];              // O^T fragments
  float m;                         // running max of head g, log2 units (quad-uniform)
  float l;                         // this lane's share of the running sum of head g

  //! a0 (which = 0) or a2 (which = 1) of Q for k-step `step`: Q[g][16 step + 8 which + 2t, +1]
  //! from the swizzled query tile ([G][head_dim], chunk c of row g at c ^ (g & 7)); 0 for g >= G.
  //! The 32 lanes read 32 distinct banks.
  KVC_DEVICE static std::uint32_t q_fragment(unsigned char const* q_tile, int step, int which, int lane) {
    int const g = lane >> 2;
    if (g >= kGroupSize) return 0u;
    int const chunk = 2 * step + which;
    return *reinterpret_cast<std::uint32_t const*>(q_tile + g * kRowBytes + ((chunk ^ (g & 7)) << 4) + 4 * (lane & 3));
  }

  //! Starts an item whose query tile is `q_tile`.
  KVC_DEVICE void begin(unsigned char const* q_tile, int lane) {
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      if constexpr (kQInRegisters) {
        q[k][0] = q_fragment(q_tile, k, 0, lane);
        q[k][1] = q_fragment(q_tile, k, 1, lane);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) o[k][i] = 0.0f;
    }
    m = -INFINITY;
    l = 0.0f;
  }

  //! Swizzled address of the ldmatrix row this lane supplies for 16 slots from `warp_row0` and
  //! the 16-dim block `step` (matrices: slots 0-7 / dims lo, 0-7 / hi, 8-15 / lo, 8-15 / hi).
  KVC_DEVICE static std::uint32_t fragment_address(std::uint32_t tile, int warp_row0, int step, int lane) {
    int const row = warp_row0 + ((lane >> 4) << 3) + (lane & 7);
    int const chunk = 2 * step + ((lane >> 3) & 1);
    return tile + static_cast<std::uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
  }

  //! Online-softmax update over the warp's 16 slots [warp_row0, warp_row0 + 16) of a tile whose
  //! first `valid` rows are real slots (the rest are zero-filled). `slot0` is the head slot of
  //! tile row 0. `k_tile` and `v_tile` are shared addresses of the swizzled tiles, `q_tile` the
  //! item's swizzled query tile.
  KVC_DEVICE void tile(std::uint32_t k_tile, std::uint32_t v_tile, unsigned char const* q_tile, int warp_row0,
                       int valid, int slot0, int lane, Variant const& variant, float scale, float scale_log2,
                       int batch_row, int q_head0, LogitSink const& sink) {
    int const g = lane >> 2;
    int const t = lane & 3;

    // S = Q K^T for two n-tiles of 8 slots.
    float s[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[j][i] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      std::uint32_t kb[4];
      ldmatrix_x4(kb, fragment_address(k_tile, warp_row0, k, lane));
      std::uint32_t a[4] = {0u, 0u, 0u, 0u};
      if constexpr (kQInRegisters) {
        a[0] = q[k][0];
        a[2] = q[k][1];
      } else {
        a[0] = q_fragment(q_tile, k, 0, lane);
        a[2] = q_fragment(q_tile, k, 1, lane);
      }
      mma_m16n8k16<T>(s[0], a, kb[0], kb[1]);
      mma_m16n8k16<T>(s[1], a, kb[2], kb[3]);
    }

    // Scaled (and transformed) logits in log2 units; rows beyond `valid` are masked.
    float x[2][2];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        int const row = warp_row0 + 8 * j + 2 * t + i;
        float value;
        if constexpr (Variant::kTransformsLogits) {
          value = variant.logits_transform(s[j][i] * scale, batch_row, q_head0 + g, slot0 + row) * kLog2e;
        } else {
          value = s[j][i] * scale_log2;
        }
        value = row < valid ? value : -INFINITY;
        x[j][i] = value;
        tile_max = fmaxf(tile_max, value);
        if (sink.row != nullptr && row < valid && slot0 + row < sink.limit) sink.row[slot0 + row] = value;
      }
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    float const m_new = fmaxf(m, tile_max);
    float const m_use = m_new == -INFINITY ? 0.0f : m_new;  // all masked so far: p = 0, alpha = 0
    float const alpha = exp2_approx(m - m_use);
    float p[2][2];
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        p[j][i] = exp2_approx(x[j][i] - m_use);
        sum += p[j][i];
      }
    }
    l = l * alpha + sum;
    m = m_new;

    // Rescale O^T columns (heads 2t, 2t+1) by their heads' alpha (held by lanes 8t and 8t+4).
    float const alpha0 = __shfl_sync(0xffffffffu, alpha, 8 * t);
    float const alpha1 = __shfl_sync(0xffffffffu, alpha, 8 * t + 4);
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      o[k][0] *= alpha0;
      o[k][1] *= alpha1;
      o[k][2] *= alpha0;
      o[k][3] *= alpha1;
    }

    // O^T += V^T P^T.
    std::uint32_t const b0 = pack2<T>(p[0][0], p[0][1]);
    std::uint32_t const b1 = pack2<T>(p[1][0], p[1][1]);
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      std::uint32_t va[4];
      ldmatrix_x4_trans(va, fragment_address(v_tile, warp_row0, k, lane));
      mma_m16n8k16<T>(o[k], va, b0, b1);
    }
  }

  //! Writes this warp's (m, l) per head to s_m[warp][8], s_l[warp][8].
  KVC_DEVICE void publish(float* s_m, float* s_l, int warp, int lane) const {
    float total = l + __shfl_xor_sync(0xffffffffu, l, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    int const g = lane >> 2;
    if ((lane & 3) == 0 && g < kGroupSize) {
      s_m[warp * 8 + g] = m;
      s_l[warp * 8 + g] = total;
    }
  }

  //! s_o[h][d] (row stride head_dim + 4) = (first ? 0 : s_o) + w[h] * O[h][d], with w[h] this
  //! warp's merge weight (merge_weight) for the heads 2t, 2t + 1 this lane holds.
  template <int kWarps>
  KVC_DEVICE void accumulate(float* s_o, float const* s_m, int warp, bool first, int lane) const {
    constexpr int kStride = kHeadDim + 4;
    int const g = lane >> 2;
    int const h0 = 2 * (lane & 3);
    int const h1 = h0 + 1;
    float const weight0 = h0 < kGroupSize ? merge_weight<kWarps>(s_m, warp, h0) : 0.0f;
    float const weight1 = h1 < kGroupSize ? merge_weight<kWarps>(s_m, warp, h1) : 0.0f;
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      int const d0 = 16 * k + g;
      int const d1 = d0 + 8;
      if (h0 < kGroupSize) {
        float* row = s_o + h0 * kStride;
        row[d0] = (first ? 0.0f : row[d0]) + weight0 * o[k][0];
        row[d1] = (first ? 0.0f : row[d1]) + weight0 * o[k][2];
      }
      if (h1 < kGroupSize) {
        float* row = s_o + h1 * kStride;
        row[d0] = (first ? 0.0f : row[d0]) + weight1 * o[k][1];
        row[d1] = (first ? 0.0f : row[d1]) + weight1 * o[k][3];
      }
    }
  }
};

}  // namespace kvc::detail
