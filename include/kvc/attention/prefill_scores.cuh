//! @file
//! The score pass of prefill attention (H2O column sums, TOVA last row), run after the attention
//! kernel once the final LSE of every query row is known (ws.lse2, log2 units). A fixed grid
//! walks the plan's score units: kPrefillScoreSlots consecutive slots of one (row, KV head). A
//! unit stages its keys (prefix slots through the page table, chunk keys from k) as fp32 in a
//! swizzled shared tile, then streams the row's query rows (all chunk tokens x G heads for
//! kColumnSum, the last token's G heads for kLastRow) in blocks of 32 and recomputes each logit:
//! lane = slot, each warp 8 query rows of a block. p = 2^(logit2 - lse2) (0 when invisible) is
//! accumulated per (lane, query head) in query order; the 4 warps' sums are added in warp order,
//! so the result is deterministic (no float atomics) and written (not accumulated) to probs.
//! CUDA cores, all dtypes; it costs one extra Q K^T over the row's slots when column sums are on.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "kvc/attention/decode_primitives.cuh"
#include "kvc/attention/prefill_kernel.cuh"
#include "kvc/attention/prefill_params.hpp"
#include "kvc/attention/prefill_plan.cuh"
#include "kvc/core/macros.hpp"

namespace kvc::detail {

inline constexpr int kPrefillScoreThreads = 128;

template <int kHeadDim, int kGroupSize>
struct PrefillScoreTraits {
  static constexpr int kRowBytes = kHeadDim * 4;  // fp32 rows
  static constexpr int kChunks = kHeadDim / 4;
  static constexpr int kQRows = 32;
  static constexpr int kKOffset = 0;                                       // float [32][D]
  static constexpr int kQOffset = kPrefillScoreSlots * kRowBytes;          // float [32][D]
  static constexpr int kLseOffset = kQOffset + kQRows * kRowBytes;         // float [32]
  static constexpr int kFlagOffset = kLseOffset + kQRows * 4;              // int [32]
  static constexpr int kAccOffset = kFlagOffset + kPrefillScoreSlots * 4;  // float [4][G][32]
  static constexpr int kSmemBytes = kAccOffset + 4 * kGroupSize * kPrefillScoreSlots * 4;
};

//! Converts row `row` of a T source ([head_dim] contiguous, 16-byte aligned) to fp32 into a
//! swizzled fp32 tile, the threads of the block cooperating over (row, 16-byte source chunk).
template <class T, int kHeadDim>
KVC_DEVICE void stage_fp32_row(unsigned char* tile, int row, T const* source, int part, int parts) {
  constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  constexpr int kSourceChunks = kHeadDim / kElems;
  for (int c = part; c < kSourceChunks; c += parts) {
    float values[kElems];
    if (source != nullptr) {
      Vec16<T>::to_float(*reinterpret_cast<uint4 const*>(source + c * kElems), values);
    } else {
#pragma unroll
      for (int e = 0; e < kElems; ++e) values[e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < kElems; e += 4) {
      int const chunk = (c * kElems + e) / 4;
      *reinterpret_cast<float4*>(tile + row * kHeadDim * 4 + ((chunk ^ (row & 7)) << 4)) =
          make_float4(values[e], values[e + 1], values[e + 2], values[e + 3]);
    }
  }
}

template <class Variant, class T, int kHeadDim, int kGroupSize>
KVC_GLOBAL void __launch_bounds__(kPrefillScoreThreads)
    prefill_score_kernel(PrefillKernelArgs<T> const args, std::int32_t const* cu_tokens,
                         std::int32_t const* seq_slots, int batch, int total_tokens) {
  using Traits = PrefillScoreTraits<kHeadDim, kGroupSize>;
  constexpr int kRowBytes = Traits::kRowBytes;
  constexpr int kQRows = Traits::kQRows;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* const k_tile = smem + Traits::kKOffset;
  unsigned char* const q_tile = smem + Traits::kQOffset;
  float* const s_lse = reinterpret_cast<float*>(smem + Traits::kLseOffset);
  int* const s_flag = reinterpret_cast<int*>(smem + Traits::kFlagOffset);
  float* const s_acc = reinterpret_cast<float*>(smem + Traits::kAccOffset);  // [4][G][32]

  int const tid = static_cast<int>(threadIdx.x);
  int const lane = tid & 31;
  int const warp = tid >> 5;
  int const hq = args.num_q_heads;
  int const hkv = args.num_kv_heads;
  int const pairs = batch * hkv;
  PrefillWorkspace const& ws = args.ws;
  PrefillScoreHook const hook = args.params.scores;
  bool const last_row_only = hook.mode == PrefillScoreMode::kLastRow;
  int const total_units = ws.score_offsets[pairs];
  Variant const variant = make_prefill_variant<Variant>(args);

#pragma unroll 1
  for (int unit = static_cast<int>(blockIdx.x); unit < total_units;
       unit += static_cast<int>(gridDim.x)) {
    // The pair of this unit: the largest p with score_offsets[p] <= unit.
    int lo = 0;
    int hi = pairs - 1;
    while (lo < hi) {
      int const mid = (lo + hi + 1) >> 1;
      if (ws.score_offsets[mid] <= unit) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    int const pair = lo;
    int const b = pair / hkv;
    int const h = pair - b * hkv;
    int const slot0 = (unit - ws.score_offsets[pair]) * kPrefillScoreSlots;
    int const prefix = ws.pair_prefix[pair];
    int first = cu_tokens[b];
    int last = cu_tokens[b + 1];
    first = first < 0 ? 0 : (first > total_tokens ? total_tokens : first);
    last = last < first ? first : (last > total_tokens ? total_tokens : last);
    int const n = last - first;
    int const slot_end = prefix + n < hook.stride ? prefix + n : hook.stride;
    int const seq = seq_slots != nullptr ? seq_slots[b] : b;

    __syncthreads();  // the previous unit's readers of the shared tiles are done
    // Keys of the unit (fp32, swizzled) and the mask flags of its chunk slots.
    {
      int const row = tid >> 2;  // 32 rows x 4 threads
      int const slot = slot0 + row;
      T const* source = nullptr;
      int flag = 0;
      if (slot < slot_end) {
        if (slot < prefix) {
          std::int32_t const* pages =
              args.page_table + (static_cast<long long>(seq) * hkv + h) * args.max_pages_per_head;
          long long const pool_row =
              static_cast<long long>(pages[slot / args.page_size]) * args.page_size +
              slot % args.page_size;
          source = args.k_pages + pool_row * kHeadDim;
          flag = 1;
        } else {
          long long const index = (static_cast<long long>(first) + (slot - prefix)) * hkv + h;
          source = args.k + index * kHeadDim;
          flag = args.mask == nullptr ? 1 : (args.mask[index] != 0 ? 1 : 0);
        }
      }
      stage_fp32_row<T, kHeadDim>(k_tile, row, source, tid & 3, 4);
      if ((tid & 3) == 0) s_flag[row] = flag;
    }

    float acc[kGroupSize];
#pragma unroll
    for (int g = 0; g < kGroupSize; ++g) acc[g] = 0.0f;
    int const slot = slot0 + lane;
    int const row_begin = last_row_only ? (n - 1) * kGroupSize : 0;
    int const row_end = n * kGroupSize;
#pragma unroll 1
    for (int block = row_begin; block < row_end; block += kQRows) {
      __syncthreads();  // keys staged / previous block consumed
      {
        int const r = tid >> 2;
        int const query_row = block + r;
        T const* source = nullptr;
        if (query_row < row_end) {
          long long const packed = (static_cast<long long>(first) + query_row / kGroupSize) * hq +
                                   h * kGroupSize + query_row % kGroupSize;
          source = args.q + packed * kHeadDim;
          if ((tid & 3) == 0) s_lse[r] = ws.lse2[packed];
        }
        stage_fp32_row<T, kHeadDim>(q_tile, r, source, tid & 3, 4);
      }
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < 8; ++rr) {
        int const r = warp * 8 + rr;
        int const query_row = block + r;
        if (query_row >= row_end) break;  // warp-uniform
        int const query = query_row / kGroupSize;
        float dot = 0.0f;
#pragma unroll 8
        for (int c = 0; c < Traits::kChunks; ++c) {
          float4 const q =
              *reinterpret_cast<float4 const*>(q_tile + r * kRowBytes + ((c ^ (r & 7)) << 4));
          float4 const k =
              *reinterpret_cast<float4 const*>(k_tile + lane * kRowBytes + ((c ^ (lane & 7)) << 4));
          dot = fmaf(q.x, k.x, fmaf(q.y, k.y, fmaf(q.z, k.z, fmaf(q.w, k.w, dot))));
        }
        float logit2;
        if constexpr (Variant::kTransformsLogits) {
          logit2 = variant.logits_transform(dot * args.scale, b, h * kGroupSize + rr % kGroupSize,
                                            slot) *
                   kLog2e;
        } else {
          logit2 = dot * args.scale_log2;
        }
        bool visible = slot < slot_end;
        if (visible && slot >= prefix) {
          int const chunk_key = slot - prefix;
          visible = chunk_key == query || (chunk_key < query && s_flag[lane] != 0);
        }
        // (block + rr) % G == rr % G: blocks start at multiples of G.
        acc[rr % kGroupSize] += visible ? exp2_approx(logit2 - s_lse[r]) : 0.0f;
      }
    }
#pragma unroll
    for (int g = 0; g < kGroupSize; ++g)
      s_acc[(warp * kGroupSize + g) * kPrefillScoreSlots + lane] = acc[g];
    __syncthreads();
    for (int i = tid; i < kGroupSize * kPrefillScoreSlots; i += kPrefillScoreThreads) {
      int const g = i / kPrefillScoreSlots;
      int const s = slot0 + (i - g * kPrefillScoreSlots);
      if (s >= slot_end) continue;
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < 4; ++w)
        total += s_acc[(w * kGroupSize + g) * kPrefillScoreSlots + (i - g * kPrefillScoreSlots)];
      hook.probs[hook.index(b, h * kGroupSize + g, s, hq)] = total;
    }
  }
}

}  // namespace kvc::detail
