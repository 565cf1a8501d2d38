//! @file
//! Warp computation of prefill attention: one warp owns 16 query rows of the CTA's q tile and
//! keeps their online-softmax state over every key tile of the item (no cross-warp merge).
//! Query rows are (token, head) pairs of one KV head, token-major: row r of the q tile is chunk
//! token tile_token + r / G and query head kv_head * G + r % G, so K and V are read once for G
//! heads (GQA packing).
//!
//! PrefillTcWarp (fp16 / bf16), per key tile (64 keys, 32 at head dim 256 to stay in registers),
//! fp32 accumulate, in one of two ways:
//!   wgmma (sm_90a, head dims 64 and 128): the warp's warpgroup (4 warps, 64 rows) issues
//!     S = Q K^T as m64n64k16 products with Q and K read from shared memory, then O += P V as
//!     m64nDk16 products with P in registers and V read from shared memory (wgmma.cuh); tiles in
//!     64-column blocks (wgmma_tile_offset). The accumulators land in the mma.sync layout below,
//!     so the masking and online softmax are the same code.
//!   mma.sync.m16n8k16 (other targets, head dim 256), per warp:
//! (Row r of a warp has query head kv_head * G + r % G since G divides 8.)
//! Lane = 4 g + t (g = lane / 4, t = lane % 4).
//!   S = Q K^T (M = 16 rows, N = 8 keys per n-tile, K = 16 dims per k-step):
//!     A = Q: ldmatrix x4 of the Q tile (rows, dim chunks 2k / 2k + 1) -> a0..a3 as in the PTX
//!       fragment (a0 = Q[g][2t..], a1 = Q[g+8][2t..], a2 = Q[g][2t+8..], a3 = Q[g+8][2t+8..])
//!     B = K^T: ldmatrix x4 of the K tile (rows = keys): b0 = K[key g][2t..], b1 = K[key g][2t+8..]
//!       for two n-tiles per instruction (the same fragment address as decode_tc.cuh)
//!     C: c0, c1 = S[row g][keys 2t, 2t+1]; c2, c3 = S[row g+8][..]
//!   O = P V (M = 16 rows, N = 8 dims per n-tile, K = 16 keys):
//!     A = P: the S accumulators of n-tiles 2kk, 2kk+1 rounded to 16 bits (a0 = c0c1 of 2kk,
//!       a1 = c2c3 of 2kk, a2 = c0c1 of 2kk+1, a3 = c2c3 of 2kk+1): no shuffle between the products
//!     B = V: ldmatrix x4 .trans of the V tile (rows = keys): b0 = V[keys 2t, 2t+1][dim g],
//!       b1 = V[keys 2t+8, +9][dim g], for two dim n-tiles per instruction
//!     C: c0, c1 = O[row g][dims 2t, 2t+1]; c2, c3 = O[row g+8][..]
//!   Rows g and g + 8 keep (m, l); the row maximum is reduced over the quad (2 shuffles).
//! PrefillSimtWarp (fp32 K/V, CUDA cores), per 32-key tile: lane = key for S (dot products from the
//!   swizzled tiles with 16-byte loads, conflict-free), 5-shuffle row maxima, then lane = dim pair
//!   (2 lane + 64 i) for O = P V with p broadcast by shuffle. Reference-grade speed.
//! Both take a mask functor visible(row_in_warp, key_in_tile) -> bool, called only when the tile
//! needs masking (its keys reach past the prefix or past the item's end).
#pragma once

#include <cstdint>

#include "kvc/attention/decode_primitives.cuh"
#include "kvc/attention/wgmma.cuh"
#include "kvc/core/macros.hpp"

namespace kvc::detail {

inline constexpr int kPrefillWarpRows = 16;

//! swizzled_address split as (chunk & ~7) + ((chunk & 7) ^ (row & 7)): the same address, written
//! so that an unrolled loop over chunks needs only 8 distinct register offsets per row.
template <int kRowBytes>
KVC_DEVICE std::uint32_t swizzled_address_split(std::uint32_t tile, int row, int chunk) {
  return tile + static_cast<std::uint32_t>(row * kRowBytes + ((chunk & ~7) << 4) +
                                           (((chunk & 7) ^ (row & 7)) << 4));
}

//! kWgmma: the two products run as warpgroup wgmma instructions (wgmma.cuh) over tiles in the
//! column-block layout (wgmma_tile_offset) instead of ldmatrix + mma.sync over row-swizzled tiles;
//! the accumulator fragments, hence the softmax below, are the same. Q of `kQRows` rows.
template <class T, int kHeadDim, int kGroupSize, int kKeys, class Variant, bool kWgmma = false,
          int kQRows = 128>
struct PrefillTcWarp {
  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of 16");
  static_assert(kKeys % 16 == 0, "key tiles of 16k keys");
  static_assert(!kWgmma || (kKeys == 64 && (kHeadDim == 64 || kHeadDim == 128)),
                "the wgmma path has m64n64 products for S and m64n{64,128} for O");
  static constexpr int kSteps = kHeadDim / 16;    // k-steps of S, 16-dim blocks of O
  static constexpr int kDimTiles = kHeadDim / 8;  // n-tiles of O
  static constexpr int kKeyTiles = kKeys / 8;     // n-tiles of S
  static constexpr int kRowBytes = kHeadDim * 2;
  // mma.sync: Q fragments stay in registers up to head dim 128; at 256 they are re-read every
  // tile. wgmma reads Q from shared memory.
  static constexpr bool kQInRegisters = !kWgmma && kHeadDim <= 128;
  static constexpr int kQRegSteps = kQInRegisters ? kSteps : 1;

  std::uint32_t q[kQRegSteps][4];
  std::uint32_t p_kept[kWgmma ? kKeyTiles / 2 : 1][4];  // wgmma: the last stepped tile's P
  float o[kDimTiles][4];
  float m[2];  // running max of rows g, g + 8 (log2 units, quad-uniform)
  float l[2];  // this lane's share of their running sums

  KVC_DEVICE static void load_q(std::uint32_t (&a)[4], std::uint32_t q_tile, int row0, int step,
                                int lane) {
    int const matrix = lane >> 3;
    int const row = row0 + ((matrix & 1) << 3) + (lane & 7);
    ldmatrix_x4(a, swizzled_address_split<kRowBytes>(q_tile, row, 2 * step + (matrix >> 1)));
  }

  KVC_DEVICE void begin(std::uint32_t q_tile, int row0, int lane) {
    if constexpr (kQInRegisters) {
#pragma unroll
      for (int k = 0; k < kSteps; ++k) load_q(q[k], q_tile, row0, k, lane);
    }
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) o[n][i] = 0.0f;
    }
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.0f;
  }

  //! S = Q K^T with ldmatrix + mma.sync (row-swizzled tiles).
  KVC_DEVICE void mma_scores(float (&s)[kKeyTiles][4], std::uint32_t k_tile, std::uint32_t q_tile,
                             int row0, int lane) const {
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[n][i] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      std::uint32_t a[4];
      if constexpr (kQInRegisters) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = q[k][i];
      } else {
        load_q(a, q_tile, row0, k, lane);
      }
#pragma unroll
      for (int nb = 0; nb < kKeyTiles / 2; ++nb) {
        std::uint32_t kb[4];
        int const row = 16 * nb + ((lane >> 4) << 3) + (lane & 7);
        ldmatrix_x4(kb, swizzled_address_split<kRowBytes>(k_tile, row, 2 * k + ((lane >> 3) & 1)));
        mma_m16n8k16<T>(s[2 * nb], a, kb[0], kb[1]);
        mma_m16n8k16<T>(s[2 * nb + 1], a, kb[2], kb[3]);
      }
    }
  }

  //! wgmma: issues S = Q K^T for the warpgroup's 64 rows (overwriting s) as one commit group.
  //! Q and K are 64-dim column blocks of 4 k-steps each; a descriptor's address field counts
  //! 16 bytes, so a step adds its byte offset / 16.
  KVC_DEVICE static void issue_scores(float (&s)[kKeyTiles][4], std::uint32_t k_tile,
                                      std::uint32_t q_tile, int row0) {
    std::uint64_t const q_desc = wgmma_descriptor(q_tile + (row0 & ~63) * 128, 16, 1024);
    std::uint64_t const k_desc = wgmma_descriptor(k_tile, 16, 1024);
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      int const step = (k & 3) * 32;
      WgmmaM64<T, kKeys>::ss(s, wgmma_descriptor_advance(q_desc, (k >> 2) * kQRows * 128 + step),
                             wgmma_descriptor_advance(k_desc, (k >> 2) * kKeys * 128 + step),
                             k > 0 ? 1 : 0);
    }
    wgmma_commit();
  }

  //! wgmma: issues O += P V (V [keys][dims] is the N-major B operand, 16 keys per k-step) as one
  //! commit group.
  KVC_DEVICE void issue_pv(std::uint32_t const (&p)[kKeyTiles / 2][4], std::uint32_t v_tile) {
    std::uint64_t const v_desc = wgmma_descriptor(v_tile, kKeys * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < kKeyTiles / 2; ++kk) {
      WgmmaM64<T, kHeadDim>::rs_b_mn(o, p[kk], wgmma_descriptor_advance(v_desc, kk * 16 * 128), 1);
    }
    wgmma_commit();
  }

  //! P as the A fragments of O += P V: a k16 step is two n-tiles of S rounded to 16 bits.
  KVC_DEVICE static void pack_probabilities(float const (&s)[kKeyTiles][4],
                                            std::uint32_t (&p)[kKeyTiles / 2][4]) {
#pragma unroll
    for (int kk = 0; kk < kKeyTiles / 2; ++kk) {
      p[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      p[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      p[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      p[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
  }

  //! Online softmax of one tile's products: s becomes the probabilities (relative to the new row
  //! maxima), m and l move on, and alpha is the factor O must be rescaled by. A plain unmasked
  //! tile takes the maxima of the raw products (scale >= 0 keeps the order) and folds the scale
  //! into the exponent's FMA; the others scale (or transform) each logit first.
  template <bool kMasked, class Visible>
  KVC_DEVICE void softmax(float (&s)[kKeyTiles][4], float (&alpha)[2], int key0, int lane,
                          Variant const& variant, float scale, float scale_log2, int batch_row,
                          int q_head0, Visible const& visible) {
    int const g = lane >> 2;
    int const t = lane & 3;
    constexpr bool kRawMax = !kMasked && !Variant::kTransformsLogits;
    // Two running maxima per row (even and odd n-tiles): two independent chains of FMNMX per row
    // instead of one halve the dependent latency of the reduction.
    float tile_max[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int const half = i >> 1;
        int const key = 8 * n + 2 * t + (i & 1);
        float value = s[n][i];
        if constexpr (Variant::kTransformsLogits) {
          value = variant.logits_transform(value * scale, batch_row, q_head0 + g % kGroupSize,
                                           key0 + key) *
                  kLog2e;
        } else if constexpr (!kRawMax) {
          value *= scale_log2;
        }
        if constexpr (kMasked) {
          if (!visible(g + 8 * half, key)) value = -INFINITY;
        }
        s[n][i] = value;
        tile_max[half][n & 1] = fmaxf(tile_max[half][n & 1], value);
      }
    }
    float m_use[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float top = fmaxf(tile_max[half][0], tile_max[half][1]);
      top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 1));
      top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 2));
      if constexpr (kRawMax) top *= scale_log2;  // (a raw maximum is finite: no key is masked)
      float const m_new = fmaxf(m[half], top);
      m_use[half] = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: p = 0, alpha = 0
      alpha[half] = exp2_approx(m[half] - m_use[half]);
      m[half] = m_new;
    }
    float sum[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};  // (two chains per row, as the maxima)
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (kRawMax) {
          s[n][i] = exp2_approx(fmaf(s[n][i], scale_log2, -m_use[i >> 1]));
        } else {
          s[n][i] = exp2_approx(s[n][i] - m_use[i >> 1]);
        }
        sum[i >> 1][n & 1] += s[n][i];
      }
    }
    l[0] = l[0] * alpha[0] + (sum[0][0] + sum[0][1]);
    l[1] = l[1] * alpha[1] + (sum[1][0] + sum[1][1]);
  }

  //! O *= alpha per row, skipped when no row maximum of the warp moved (alpha exactly 1).
  KVC_DEVICE void rescale(float const (&alpha)[2]) {
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
      for (int n = 0; n < kDimTiles; ++n) {
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }
    }
  }

  //! One key tile, start to end (mma.sync). `key0` is the item-space index of tile key 0 (the
  //! variant's slot index).
  template <bool kMasked, class Visible>
  KVC_DEVICE void tile(std::uint32_t k_tile, std::uint32_t v_tile, std::uint32_t q_tile, int row0,
                       int key0, int lane, Variant const& variant, float scale, float scale_log2,
                       int batch_row, int q_head0, Visible const& visible) {
    static_assert(!kWgmma, "the wgmma path runs pipelined: step() and drain()");
    float s[kKeyTiles][4];
    mma_scores(s, k_tile, q_tile, row0, lane);
    float alpha[2];
    softmax<kMasked>(s, alpha, key0, lane, variant, scale, scale_log2, batch_row, q_head0, visible);
    rescale(alpha);
    std::uint32_t p[kKeyTiles / 2][4];
    pack_probabilities(s, p);
#pragma unroll
    for (int kk = 0; kk < kKeyTiles / 2; ++kk) {
      int const row = 16 * kk + (((lane >> 3) & 1) << 3) + (lane & 7);
#pragma unroll
      for (int j = 0; j < kSteps; ++j) {
        std::uint32_t vb[4];
        ldmatrix_x4_trans(vb, swizzled_address_split<kRowBytes>(v_tile, row, 2 * j + (lane >> 4)));
        mma_m16n8k16<T>(o[2 * j], p[kk], vb[0], vb[1]);
        mma_m16n8k16<T>(o[2 * j + 1], p[kk], vb[2], vb[3]);
      }
    }
  }

  //! wgmma, software-pipelined across tiles: S of this tile (k_tile) runs beside O += P V of the
  //! previous one (v_previous; none for an item's first tile, kFirst), and the softmax of this
  //! tile runs while that product is still in flight; this tile's P is kept for the next step (or
  //! drain()). The previous tile's V must stay in shared memory until this returns.
  //! kFirst is a template argument, not a run-time branch around issue_pv: with a wgmma inside a
  //! branch that ptxas cannot prove warp-uniform, it serialises every wgmma of the kernel (warning
  //! C7520: each product waits for the previous one to complete).
  template <bool kMasked, bool kFirst, class Visible>
  KVC_DEVICE void step(std::uint32_t k_tile, std::uint32_t v_previous, std::uint32_t q_tile,
                       int row0, int key0, int lane, Variant const& variant, float scale,
                       float scale_log2, int batch_row, int q_head0, Visible const& visible) {
    float s[kKeyTiles][4];
    wgmma_fence_operands(o);
    wgmma_fence();
    issue_scores(s, k_tile, q_tile, row0);
    if constexpr (kFirst) {
      wgmma_wait<0>();
    } else {
      issue_pv(p_kept, v_previous);
      wgmma_wait<1>();  // the scores' group, the older of the two, is complete
    }
    wgmma_fence_operands(s);
    float alpha[2];
    softmax<kMasked>(s, alpha, key0, lane, variant, scale, scale_log2, batch_row, q_head0, visible);
    if constexpr (!kFirst) {  // (an item's first tile finds O zero: nothing to rescale)
      wgmma_wait<0>();
      wgmma_fence_operands(o);
      rescale(alpha);
    }
    pack_probabilities(s, p_kept);
  }

  //! wgmma: O += P V of the last tile stepped (v_last) and waits for it.
  KVC_DEVICE void drain(std::uint32_t v_last) {
    wgmma_fence_operands(o);
    wgmma_fence();
    issue_pv(p_kept, v_last);
    wgmma_wait<0>();
    wgmma_fence_operands(o);
  }

  //! Calls fn(row_in_warp, lse2) once per row (lse2 = -inf when the row saw no key) and
  //! out(row_in_warp, dim, value(dim), value(dim + 1)) for the normalised output.
  template <class LseFn, class OutFn>
  KVC_DEVICE void finish(int lane, LseFn&& lse_fn, OutFn&& out_fn) {
    int const g = lane >> 2;
    int const t = lane & 3;
    float inv[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float total = l[half] + __shfl_xor_sync(0xffffffffu, l[half], 1);
      total += __shfl_xor_sync(0xffffffffu, total, 2);
      // 0 exactly when the row saw no key; NaN (propagated) when a logit was NaN.
      inv[half] = total == 0.0f ? 0.0f : 1.0f / total;
      if (t == 0) lse_fn(g + 8 * half, total == 0.0f ? -INFINITY : m[half] + log2f(total));
    }
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) {
      out_fn(g, 8 * n + 2 * t, o[n][0] * inv[0], o[n][1] * inv[0]);
      out_fn(g + 8, 8 * n + 2 * t, o[n][2] * inv[1], o[n][3] * inv[1]);
    }
  }
};

template <int kHeadDim, int kGroupSize, class Variant>
struct PrefillSimtWarp {
  static constexpr int kKeys = 32;
  static constexpr int kRows = kPrefillWarpRows;
  static constexpr int kRowBytes = kHeadDim * 4;
  static constexpr int kChunks = kHeadDim / 4;  // 16-byte chunks per row
  static constexpr int kPairs = kHeadDim / 64;  // dim pairs per lane (dims 2 lane + 64 i, + 1)
  static_assert(kHeadDim % 64 == 0, "fp32 prefill needs a head dim multiple of 64");

  float o[kRows][kPairs][2];
  float m[kRows];
  float l[kRows];  // this lane's share

  KVC_DEVICE void begin(std::uint32_t, int, int) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.0f;
#pragma unroll
      for (int i = 0; i < kPairs; ++i) o[r][i][0] = o[r][i][1] = 0.0f;
    }
  }

  KVC_DEVICE static float4 chunk_at(unsigned char const* tile, int row, int chunk) {
    return *reinterpret_cast<float4 const*>(tile + row * kRowBytes + ((chunk ^ (row & 7)) << 4));
  }
  KVC_DEVICE static float2 pair_at(unsigned char const* tile, int row, int dim) {
    return *reinterpret_cast<float2 const*>(tile + row * kRowBytes +
                                            (((dim >> 2) ^ (row & 7)) << 4) + (dim & 3) * 4);
  }

  template <bool kMasked, class Visible>
  KVC_DEVICE void tile(unsigned char const* k_tile, unsigned char const* v_tile,
                       unsigned char const* q_tile, int row0, int key0, int lane,
                       Variant const& variant, float scale, float scale_log2, int batch_row,
                       int q_head0, Visible const& visible) {
    float x[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) x[r] = 0.0f;
#pragma unroll 4
    for (int c = 0; c < kChunks; ++c) {
      float4 const k = chunk_at(k_tile, lane, c);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float4 const q = chunk_at(q_tile, row0 + r, c);
        x[r] = fmaf(q.x, k.x, fmaf(q.y, k.y, fmaf(q.z, k.z, fmaf(q.w, k.w, x[r]))));
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float value;
      if constexpr (Variant::kTransformsLogits) {
        value = variant.logits_transform(x[r] * scale, batch_row, q_head0 + r % kGroupSize,
                                         key0 + lane) *
                kLog2e;
      } else {
        value = x[r] * scale_log2;
      }
      if constexpr (kMasked) {
        if (!visible(r, lane)) value = -INFINITY;
      }
      float top = value;
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1)
        top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
      float const m_new = fmaxf(m[r], top);
      float const m_use = m_new == -INFINITY ? 0.0f : m_new;
      float const alpha = exp2_approx(m[r] - m_use);
      m[r] = m_new;
      x[r] = exp2_approx(value - m_use);
      l[r] = l[r] * alpha + x[r];
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        o[r][i][0] *= alpha;
        o[r][i][1] *= alpha;
      }
    }
#pragma unroll 4
    for (int key = 0; key < kKeys; ++key) {
      float2 v[kPairs];
#pragma unroll
      for (int i = 0; i < kPairs; ++i) v[i] = pair_at(v_tile, key, 2 * lane + 64 * i);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float const p = __shfl_sync(0xffffffffu, x[r], key);
#pragma unroll
        for (int i = 0; i < kPairs; ++i) {
          o[r][i][0] = fmaf(p, v[i].x, o[r][i][0]);
          o[r][i][1] = fmaf(p, v[i].y, o[r][i][1]);
        }
      }
    }
  }

  template <class LseFn, class OutFn>
  KVC_DEVICE void finish(int lane, LseFn&& lse_fn, OutFn&& out_fn) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float total = l[r];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1)
        total += __shfl_xor_sync(0xffffffffu, total, offset);
      float const inv = total == 0.0f ? 0.0f : 1.0f / total;
      if (lane == 0) lse_fn(r, total == 0.0f ? -INFINITY : m[r] + log2f(total));
#pragma unroll
      for (int i = 0; i < kPairs; ++i)
        out_fn(r, 2 * lane + 64 * i, o[r][i][0] * inv, o[r][i][1] * inv);
    }
  }
};

}  // namespace kvc::detail
