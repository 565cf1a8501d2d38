//! @file
//! The persistent decode-attention kernel. A fixed grid (SMs x resident CTAs) walks the plan's
//! work list; CTA c takes items c, 2P-1-c, 2P+c, ... (snake order over the size-sorted list).
//! Each CTA streams its items' K/V tiles through a multi-stage cp.async pipeline that runs on
//! across item boundaries (the tiles of the next item are in flight while the current item's
//! epilogue runs), with the page-table rows of the next tile fetched one iteration ahead.
//!
//! Per tile (kTileSlots slots of one item), each of the 4 warps takes its own slots and keeps a
//! private online-softmax state (TcWarp for 16-bit K/V, SimtWarp for fp32). At an item's end the
//! warps merge through shared memory; a head processed in one chunk writes out/lse directly,
//! otherwise the chunk writes a normalised partial (o, lse) and the last CTA to finish a chunk
//! of that head (per-head arrival counter, __threadfence) merges all partials in chunk order.
//! The CTA that finalises a head also completes the scores it left in the score buffer (scaled
//! log2 logits): it turns them into probabilities with the final LSE (ScoreForm::kProbabilities)
//! or writes that LSE beside them (kLog2Logits).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvc/attention/decode_plan.cuh"
#include "kvc/attention/decode_primitives.cuh"
#include "kvc/attention/decode_simt.cuh"
#include "kvc/attention/decode_tc.cuh"
#include "kvc/attention/decode_trace.cuh"
#include "kvc/attention/params.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/macros.hpp"

namespace kvc::detail {

//! Compile-time shape of one instantiation: tiles, pipeline depth and shared-memory layout.
template <class T, int kHeadDim, int kGroupSize>
struct DecodeTraits {
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpSlots = kTensorCores ? 16 : 8;
  static constexpr int kTileSlots = kWarps * kWarpSlots;  // divides kChunkQuantum
  static constexpr int kRowBytes = kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  static constexpr int kChunks = kRowBytes / 16;          // 16-byte chunks per row
  static constexpr int kTileBytes = kTileSlots * kRowBytes;
  static constexpr int kQBytes = kGroupSize * kRowBytes;
  static constexpr int kStageBytes = 2 * kTileBytes;  // K tile, V tile
  // 16-bit: 16/32/64 KB per stage for D = 64/128/256; fp32 (32-slot tiles): the same.
  static constexpr int kStages = kTensorCores ? (kHeadDim == 64 ? 4 : 3) : (kHeadDim == 64 ? 4 : 2);
  static constexpr int kCopies = kTileSlots * kChunks / kThreads;  // 16-byte copies per thread per tile

  static constexpr int align16(int bytes) { return (bytes + 15) / 16 * 16; }
  static constexpr int kOutStride = kHeadDim + 4;  // floats per row of the merge buffer
  static constexpr int kQRingOffset = kStages * kStageBytes;                  // T [stages][G][D]
  static constexpr int kOutOffset = kQRingOffset + kStages * kQBytes;         // float [G][D+4]
  static constexpr int kMOffset = kOutOffset + align16(kGroupSize * kOutStride * 4);  // [warps][8]
  static constexpr int kLOffset = kMOffset + kWarps * 8 * 4;                  // float [warps][8]
  static constexpr int kHeadOffset = kLOffset + kWarps * 8 * 4;               // float [3][8]
  static constexpr int kRowsOffset = kHeadOffset + 3 * 8 * 4;                 // int [stages][tile]
  static constexpr int kItemsOffset = align16(kRowsOffset + kStages * kTileSlots * 4);
  static constexpr int kTilesOffset = kItemsOffset + kStages * static_cast<int>(sizeof(DecodeWorkItem));
  static constexpr int kFlagOffset = align16(kTilesOffset + 2 * kStages * 4);  // int [2][stages] before
  static constexpr int kSmemBytes = kFlagOffset + 32;  // int flag, int claims[4]
  // Resident CTAs per SM that shared memory allows (228 KB per SM, 1 KB reserved per CTA), at
  // most 3; tells ptxas it may use 65536 / (kThreads * kMinBlocks) registers, so that it
  // neither spills nor lowers the occupancy that shared memory sets anyway.
  static constexpr int kSmemPerSm = 228 * 1024;
  static constexpr int kMinBlocks =
      kSmemPerSm / (kSmemBytes + 1024) >= 3 ? 3 : (kSmemPerSm / (kSmemBytes + 1024) >= 2 ? 2 : 1);

  static_assert(kChunks >= 8 && kChunks % 8 == 0, "the swizzle needs rows of 8k 16-byte chunks");
  static_assert(kChunkQuantum % kTileSlots == 0, "chunks must hold whole tiles");
  static_assert((kTileSlots * kChunks) % kThreads == 0, "copies must divide over the threads");
  static_assert(kMaxSplits <= 64 && kMaxSplits <= kOutStride, "merge weights alias the merge buffer");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory above the sm_90 limit");
};

//! Typed kernel arguments (the variant is built from `params`).
template <class T>
struct DecodeKernelArgs {
  DecodeParams params;
  T const* q;
  T* out;
  float* lse;
  T const* k_pages;
  T const* v_pages;
  std::int32_t const* page_table;
  float* probs;
  int probs_stride;
  float* score_lse;  // ScoreForm::kLog2Logits: [batch, Hq] log2 LSE; null: probs get probabilities
  int page_size;
  int page_shift;  // log2(page_size), or -1 when not a power of two
  int max_pages_per_head;
  int num_kv_heads;
  int num_q_heads;
  float scale;       // softmax scale (natural units)
  float scale_log2;  // scale * log2(e)
  DecodeWorkspace ws;
};

template <class Variant, class T, int kHeadDim, int kGroupSize>
KVC_GLOBAL void __launch_bounds__(DecodeTraits<T, kHeadDim, kGroupSize>::kThreads,
                                    DecodeTraits<T, kHeadDim, kGroupSize>::kMinBlocks)
    decode_attention_kernel(DecodeKernelArgs<T> const args) {
  using Traits = DecodeTraits<T, kHeadDim, kGroupSize>;
  using Warp = std::conditional_t<Traits::kTensorCores, TcWarp<T, kHeadDim, kGroupSize, Variant>,
                                  SimtWarp<T, kHeadDim, kGroupSize, Variant>>;
  constexpr int kWarps = Traits::kWarps;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kStages = Traits::kStages;
  constexpr int kTileSlots = Traits::kTileSlots;
  constexpr int kChunks = Traits::kChunks;
  constexpr int kElems = Traits::kElems;
  constexpr int kRowBytes = Traits::kRowBytes;
  constexpr int kTileBytes = Traits::kTileBytes;
  constexpr int kStride = Traits::kOutStride;
  constexpr int kGroupElems = kGroupSize * kHeadDim;

  extern __shared__ __align__(128) unsigned char smem[];
  float* const s_o = reinterpret_cast<float*>(smem + Traits::kOutOffset);     // [G][D+4]
  float* const s_m = reinterpret_cast<float*>(smem + Traits::kMOffset);       // [warps][8]
  float* const s_l = reinterpret_cast<float*>(smem + Traits::kLOffset);       // [warps][8]
  float* const s_inv = reinterpret_cast<float*>(smem + Traits::kHeadOffset);  // [8] 1 / sum
  float* const s_lse2 = s_inv + 8;                                            // [8] chunk LSE
  float* const s_merged = s_inv + 16;                                         // [8] merged LSE
  int* const s_rows = reinterpret_cast<int*>(smem + Traits::kRowsOffset);     // [stages][tile]
  DecodeWorkItem* const s_items = reinterpret_cast<DecodeWorkItem*>(smem + Traits::kItemsOffset);
  int* const s_tiles = reinterpret_cast<int*>(smem + Traits::kTilesOffset);   // [stages] tile index
  int* const s_qslots = s_tiles + kStages;                                    // [stages] q ring slot
  int* const s_flag = reinterpret_cast<int*>(smem + Traits::kFlagOffset);
  unsigned char* const q_ring = smem + Traits::kQRingOffset;                  // [stages][G][D]

  // Everything below reads what the plan kernel wrote.
#if defined(KVC_DECODE_TRACE)
  unsigned long long const trace_entry = KVC_DECODE_TRACE_NOW();
  grid_dependency_wait();
  if (threadIdx.x == 0) {
    KVC_DECODE_TRACE_CTA(0, trace_entry);
    KVC_DECODE_TRACE_CTA(1, KVC_DECODE_TRACE_NOW());
  }
  int trace_items = 0;
#else
  grid_dependency_wait();
#endif
  // Every CTA is resident: the stream's next kernel may launch (a programmatically launched
  // one, such as the next call's plan, waits for this grid before touching memory).
  grid_dependency_launch_dependents();

  int const tid = static_cast<int>(threadIdx.x);
  int const lane = tid & 31;
  int const warp = tid >> 5;
  int const grid = static_cast<int>(gridDim.x);
  int const cta = static_cast<int>(blockIdx.x);
  int const hq = args.num_q_heads;
  int const hkv = args.num_kv_heads;
  DecodeWorkspace const& ws = args.ws;
  int const num_items = ws.counters[0];
  int const num_empty = ws.counters[1];

  // Heads of length 0: out = 0, lse = -inf.
  for (int e = cta; e < num_empty; e += grid) {
    int const head = ws.empty_heads[e];
    int const row = head / hkv;
    long long const q_row0 = static_cast<long long>(row) * hq + (head - row * hkv) * kGroupSize;
    T* const out = args.out + q_row0 * kHeadDim;
    for (int i = tid; i < kGroupElems; i += kThreads) out[i] = DTypeTraits<T>::from_float(0.0f);
    if (args.lse != nullptr && tid < kGroupSize) args.lse[q_row0 + tid] = -INFINITY;
    if (args.probs != nullptr && args.score_lse != nullptr && tid < kGroupSize)
      args.score_lse[q_row0 + tid] = -INFINITY;
  }

  Variant const variant(args.params);

  // ---- Producer: this CTA's tile sequence, issued kStages - 1 tiles ahead of the consumer.
  // Item of the CTA's ordinal-th turn. Snake: ordinal * P + (c or P - 1 - c). Greedy: turns 0
  // and 1 as snake, then the index thread 0 claimed from ws.counters[2] (zeroed by the plan) at
  // the CTA's transition into turn ordinal - 2, kept in s_claims[ordinal % 4]; every advance()
  // call follows a __syncthreads, so a claim is visible when its turn is loaded. Claims are
  // monotonic, so a CTA never stops with a claimed item undone (a failed claim means every
  // later one fails too).
  // Balanced: the plan gave CTA c the contiguous items [cta_first[c], cta_first[c + 1]).
  int const schedule = args.params.split.schedule;
  bool const balanced = schedule == kScheduleBalanced;
  bool const greedy =
      schedule == kScheduleGreedy ||
      (schedule == 0 && num_items >= kGreedyItemsPerCta * static_cast<long long>(grid));
  int* const s_claims = s_flag + 1;  // [4]
  int own_begin = 0;
  int own_end = 0;
  if (balanced) {
    int const used = ws.counters[3];
    own_begin = cta < used ? ws.cta_first[cta] : 0;
    own_end = cta < used ? (cta + 1 < used ? ws.cta_first[cta + 1] : num_items) : 0;
  }
  auto load_item = [&](int ordinal, DecodeWorkItem& item) {
    long long index;
    if (balanced) {
      index = own_begin + ordinal;
      if (index >= own_end) return false;
    } else {
      index = greedy && ordinal >= 2 ? s_claims[ordinal & 3]
                                     : static_cast<long long>(ordinal) * grid +
                                           ((ordinal & 1) ? grid - 1 - cta : cta);
      if (index >= num_items) return false;
    }
    item = ws.items[index];
    return true;
  };
  auto claim = [&](int ordinal) {
    if (greedy && tid == 0) s_claims[ordinal & 3] = 2 * grid + atomicAdd(ws.counters + 2, 1);
  };
  int p_ordinal = 0;
  int p_tile = 0;
  DecodeWorkItem p_item{};
  DecodeWorkItem p_next{};
  bool p_has = load_item(0, p_item);
  bool p_next_has = p_has && load_item(1, p_next);
  if (p_has) claim(2);

  auto advance = [&]() {
    ++p_tile;
    if (p_item.begin + p_tile * kTileSlots >= p_item.end) {
      ++p_ordinal;
      p_tile = 0;
      p_item = p_next;
      p_has = p_next_has;
      if (p_has) {
        p_next_has = load_item(p_ordinal + 1, p_next);  // in flight for a whole item
        claim(p_ordinal + 2);
      }
    }
  };
  // Pool row of tile row `r` of the producer's current tile, -1 past the item's end.
  auto tile_row = [&](int r) {
    int const slot = p_item.begin + p_tile * kTileSlots + r;
    if (slot >= p_item.end) return -1;
    std::int32_t const* pages = args.page_table + static_cast<long long>(p_item.cache_head) * args.max_pages_per_head;
    int page, offset;
    if (args.page_shift >= 0) {
      page = slot >> args.page_shift;
      offset = slot & (args.page_size - 1);
    } else {
      page = slot / args.page_size;
      offset = slot - page * args.page_size;
    }
    return pages[page] * args.page_size + offset;
  };
  // cp.async of the producer's current tile (rows from s_rows[stage]) and, on an item's first
  // tile, of its G query rows into q ring slot (item ordinal % kStages). That slot's previous
  // item ended at least kStages tiles earlier, so its last reader passed a barrier since.
  auto issue = [&](int stage) {
    unsigned char* const base = smem + stage * Traits::kStageBytes;
    std::uint32_t const k_dst = smem_address(base);
    std::uint32_t const v_dst = k_dst + kTileBytes;
    int const* rows = s_rows + stage * kTileSlots;
#pragma unroll
    for (int i = 0; i < Traits::kCopies; ++i) {
      int const id = tid + i * kThreads;
      int const r = id / kChunks;
      int const c = id % kChunks;
      int const pool_row = rows[r];
      long long const source = static_cast<long long>(pool_row < 0 ? 0 : pool_row) * kHeadDim + c * kElems;
      std::uint32_t const offset = static_cast<std::uint32_t>(r * kRowBytes + ((c ^ (r & 7)) << 4));
      cp_async_16(k_dst + offset, args.k_pages + source, pool_row >= 0);
      cp_async_16(v_dst + offset, args.v_pages + source, pool_row >= 0);
    }
    if (p_tile == 0) {
      int const row = p_item.head / hkv;
      long long const q_row0 = static_cast<long long>(row) * hq + (p_item.head - row * hkv) * kGroupSize;
      T const* q = args.q + q_row0 * kHeadDim;  // the G query rows are contiguous
      std::uint32_t const q_dst = smem_address(q_ring + (p_ordinal % kStages) * Traits::kQBytes);
      for (int id = tid; id < kGroupSize * kChunks; id += kThreads) {
        int const g = id / kChunks;
        int const c = id % kChunks;
        cp_async_16(q_dst + static_cast<std::uint32_t>(g * kRowBytes + ((c ^ (g & 7)) << 4)), q + id * kElems, true);
      }
    }
  };

  // ---- Consumer.
  Warp state;
  // Completes the head's G score rows (scaled log2 logits so far) given the head's LSE `lse2`
  // (log2 units). ScoreForm::kLog2Logits: writes the LSE beside them. kProbabilities: rewrites
  // them as probabilities, the (head, slot) pairs kBatch per thread at a time, all loads before
  // any store, so that a batch costs one memory latency rather than one per element (the stores
  // would otherwise keep the compiler from hoisting the next loads).
  auto finish_scores = [&](long long q_row0, int length, float const* lse2) {
    if (args.probs == nullptr) return;
    if (args.score_lse != nullptr) {
      if (tid < kGroupSize) args.score_lse[q_row0 + tid] = lse2[tid];
      return;
    }
    constexpr int kBatch = 8;
    int const count = length < args.probs_stride ? length : args.probs_stride;
    int const elements = kGroupSize * count;
    float* const rows = args.probs + q_row0 * args.probs_stride;
    for (int base = 0; base < elements; base += kBatch * kThreads) {
      float x[kBatch];
      int head_of[kBatch];
      long long at[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        int const e = base + u * kThreads + tid;
        int const h = e < elements ? e / count : 0;
        head_of[u] = h;
        at[u] = e < elements ? static_cast<long long>(h) * args.probs_stride + (e - h * count) : -1;
        x[u] = at[u] >= 0 ? __ldcg(rows + at[u]) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (at[u] < 0) continue;
        float const total = lse2[head_of[u]];
        rows[at[u]] = total == -INFINITY ? 0.0f : exp2_approx(x[u] - total);
      }
    }
  };

  auto epilogue = [&](DecodeWorkItem const& item, long long q_row0) {
#if defined(KVC_DECODE_TRACE)
    ++trace_items;
#endif
    state.publish(s_m, s_l, warp, lane);
    __syncthreads();
    if (tid < kGroupSize) {
      float top = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) top = fmaxf(top, s_m[w * 8 + tid]);
      // A warp that saw no slot has m = -inf and l = 0; one whose logits held a NaN has l = NaN
      // (fmaxf drops NaN from m). sum is 0 exactly for a head that saw no slot, NaN for a
      // poisoned one, so a NaN logit gives NaN output, LSE and probabilities, as the reference.
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        float const m = s_m[w * 8 + tid];
        float const l = s_l[w * 8 + tid];
        sum += m == -INFINITY ? l : l * exp2_approx(m - top);
      }
      s_inv[tid] = sum == 0.0f ? 0.0f : 1.0f / sum;
      s_lse2[tid] = sum == 0.0f ? -INFINITY : top + log2f(sum);
    }
#pragma unroll 1
    for (int w = 0; w < kWarps; ++w) {
      if (warp == w) state.template accumulate<kWarps>(s_o, s_m, w, w == 0, lane);
      __syncthreads();
    }

    if (item.num_chunks == 1) {
      T* const out = args.out + q_row0 * kHeadDim;
      for (int i = tid; i < kGroupElems; i += kThreads) {
        int const h = i / kHeadDim;
        out[i] = DTypeTraits<T>::from_float(s_o[h * kStride + (i - h * kHeadDim)] * s_inv[h]);
      }
      if (args.lse != nullptr && tid < kGroupSize) args.lse[q_row0 + tid] = s_lse2[tid] * kLn2;
      finish_scores(q_row0, item.length, s_lse2);
      return;
    }

    // Split head: publish this chunk's partial, then the last arriving CTA merges.
    int const record = item.partial + item.chunk;
    float* const partial = ws.partial_out + static_cast<long long>(record) * kGroupElems;
    for (int i = tid; i < kGroupElems; i += kThreads) {
      int const h = i / kHeadDim;
      partial[i] = s_o[h * kStride + (i - h * kHeadDim)] * s_inv[h];
    }
    if (tid < kGroupSize) ws.partial_lse[static_cast<long long>(record) * kGroupSize + tid] = s_lse2[tid];
    __threadfence();
    __syncthreads();
    if (tid == 0) *s_flag = atomicAdd(ws.arrivals + item.head, 1) == item.num_chunks - 1 ? 1 : 0;
    __syncthreads();
    if (*s_flag == 0) return;
    __threadfence();

    // Merge weights 2^(lse_c - lse) per (chunk, head) into s_w (aliases s_o), merged LSE.
    float* const s_w = s_o;  // [kMaxSplits][G]
    int const chunks = item.num_chunks;
    float const* lse_base = ws.partial_lse + static_cast<long long>(item.partial) * kGroupSize;
    for (int h = warp; h < kGroupSize; h += kWarps) {
      float const a = lane < chunks ? __ldcg(lse_base + lane * kGroupSize + h) : -INFINITY;
      float const b = lane + 32 < chunks ? __ldcg(lse_base + (lane + 32) * kGroupSize + h) : -INFINITY;
      float top = fmaxf(a, b);
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
      float merged = -INFINITY;
      float wa = 0.0f;
      float wb = 0.0f;
      // fmaxf drops NaN: a poisoned partial LSE must still make the merged one NaN.
      bool const poisoned = __any_sync(0xffffffffu, isnan(a) || isnan(b));
      if (top != -INFINITY || poisoned) {
        float sum = exp2_approx(a - top) + exp2_approx(b - top);
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        merged = top + log2f(sum);
        wa = exp2_approx(a - merged);
        wb = exp2_approx(b - merged);
      }
      if (lane < chunks) s_w[lane * kGroupSize + h] = wa;
      if (lane + 32 < chunks) s_w[(lane + 32) * kGroupSize + h] = wb;
      if (lane == 0) s_merged[h] = merged;
    }
    __syncthreads();
    // out = sum over chunks (in chunk order) of weight * partial: 16-byte loads, kBatch chunks
    // in flight per thread, so a head of n chunks costs about n / kBatch memory latencies.
    constexpr int kBatch = 8;
    constexpr int kVectors = kGroupElems / 4;
    float4 const* partials = reinterpret_cast<float4 const*>(ws.partial_out) +
                             static_cast<long long>(item.partial) * kVectors;
    T* const out = args.out + q_row0 * kHeadDim;
    for (int v = tid; v < kVectors; v += kThreads) {
      int const h = (4 * v) / kHeadDim;
      float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int c0 = 0; c0 < chunks; c0 += kBatch) {
        float4 x[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          x[u] = c0 + u < chunks ? __ldcg(partials + static_cast<long long>(c0 + u) * kVectors + v)
                                 : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (c0 + u >= chunks) break;
          float const w = s_w[(c0 + u) * kGroupSize + h];
          acc.x += w * x[u].x;
          acc.y += w * x[u].y;
          acc.z += w * x[u].z;
          acc.w += w * x[u].w;
        }
      }
      T* const o = out + 4 * v;
      o[0] = DTypeTraits<T>::from_float(acc.x);
      o[1] = DTypeTraits<T>::from_float(acc.y);
      o[2] = DTypeTraits<T>::from_float(acc.z);
      o[3] = DTypeTraits<T>::from_float(acc.w);
    }
    if (args.lse != nullptr && tid < kGroupSize) args.lse[q_row0 + tid] = s_merged[tid] * kLn2;
    finish_scores(q_row0, item.length, s_merged);
  };

  auto consume = [&](int stage) {
    DecodeWorkItem const item = s_items[stage];
    int const tile = s_tiles[stage];
    unsigned char* const base = smem + stage * Traits::kStageBytes;
    int const tile_begin = item.begin + tile * kTileSlots;
    int const valid = item.end - tile_begin < kTileSlots ? item.end - tile_begin : kTileSlots;
    int const batch_row = item.head / hkv;
    int const q_head0 = (item.head - batch_row * hkv) * kGroupSize;
    long long const q_row0 = static_cast<long long>(batch_row) * hq + q_head0;
    unsigned char const* q_tile = q_ring + s_qslots[stage] * Traits::kQBytes;

    if constexpr (Traits::kTensorCores) {
      if (tile == 0) state.begin(q_tile, lane);
      LogitSink sink;
      int const g = lane >> 2;
      if (args.probs != nullptr && g < kGroupSize) {
        sink.row = args.probs + (q_row0 + g) * args.probs_stride;
        sink.limit = args.probs_stride;
      }
      state.tile(smem_address(base), smem_address(base + kTileBytes), q_tile, warp * Traits::kWarpSlots, valid,
                 tile_begin, lane, variant, args.scale, args.scale_log2, batch_row, q_head0, sink);
    } else {
      if (tile == 0) state.begin();
      float* sinks[kGroupSize];
#pragma unroll
      for (int h = 0; h < kGroupSize; ++h) {
        sinks[h] = args.probs != nullptr ? args.probs + (q_row0 + h) * args.probs_stride : nullptr;
      }
      state.tile(base, base + kTileBytes, q_tile, warp * Traits::kWarpSlots, valid, tile_begin, lane, variant,
                 args.scale, args.scale_log2, batch_row, q_head0, sinks, args.probs_stride);
    }
    if (tile_begin + kTileSlots >= item.end) epilogue(item, q_row0);
  };

  // ---- Pipeline. Prologue: tiles 0 .. kStages - 2 (one commit group each, empty past the end).
  int issued = 0;
#pragma unroll 1
  for (int s = 0; s < kStages - 1; ++s) {
    if (p_has) {
      if (tid < kTileSlots) s_rows[s * kTileSlots + tid] = tile_row(tid);
      if (tid == 0) {
        s_items[s] = p_item;
        s_tiles[s] = p_tile;
        s_qslots[s] = p_ordinal % kStages;
      }
      __syncthreads();
      issue(s);
      ++issued;
      advance();
    }
    cp_async_commit();
  }
  int next_row = p_has && tid < kTileSlots ? tile_row(tid) : -1;

  // Iteration i: wait for tile i, issue tile i + kStages - 1 into the stage tile i - 1 used,
  // then compute tile i. Commit groups stay one per iteration, so wait<kStages - 2> is exact.
#pragma unroll 1
  for (int i = 0; i < issued; ++i) {
    int const issue_stage = (i + kStages - 1) % kStages;
    if (p_has && tid < kTileSlots) s_rows[issue_stage * kTileSlots + tid] = next_row;
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (p_has) {
      if (tid == 0) {
        s_items[issue_stage] = p_item;
        s_tiles[issue_stage] = p_tile;
        s_qslots[issue_stage] = p_ordinal % kStages;
      }
      issue(issue_stage);
      ++issued;
      advance();
      if (p_has && tid < kTileSlots) next_row = tile_row(tid);
    }
    cp_async_commit();
    if (i == 0 && tid == 0) KVC_DECODE_TRACE_CTA(2, KVC_DECODE_TRACE_NOW());
    consume(i % kStages);
  }
  cp_async_wait<0>();
#if defined(KVC_DECODE_TRACE)
  if (tid == 0) {
    KVC_DECODE_TRACE_CTA(3, KVC_DECODE_TRACE_NOW());
    KVC_DECODE_TRACE_CTA(4, static_cast<unsigned long long>(issued));
    KVC_DECODE_TRACE_CTA(5, static_cast<unsigned long long>(trace_items));
  }
#endif
}

}  // namespace kvc::detail
