//! @file
//! The persistent prefill-attention kernel. A fixed grid (SMs x resident CTAs) takes work items
//! (prefill_plan.cuh) one at a time from an atomic cursor over the cost-ordered list. An item is
//! a key range of one q tile (R query rows = R / G tokens x G heads of one KV head; R = 128 with
//! 8 warps for fp16/bf16, 64 with 4 warps for fp32); its Q tile
//! and its K/V tiles (cached prefix slots through the page table, then the chunk's own keys from
//! the packed k / v) stream through a multi-stage cp.async pipeline into XOR-swizzled shared
//! tiles, the source rows (page-table lookups) and DMC mask flags of the next tile being fetched
//! one iteration ahead into registers. Each warp owns 16 query rows and all keys of
//! every tile (PrefillTcWarp / PrefillSimtWarp), so warps never merge; on sm_90a the tensor-core
//! warps multiply per warpgroup with wgmma, reading Q, K and V straight from the shared tiles. An
//! item that is the whole key range writes out / lse directly; a split writes a normalised partial
//! (o, lse) to the workspace and the last of the q tile's splits to finish (arrival counter,
//! __threadfence) merges them in split order.
#pragma once

#include <climits>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "kvc/attention/decode_primitives.cuh"
#include "kvc/attention/mbarrier.cuh"
#include "kvc/attention/params.hpp"
#include "kvc/attention/prefill_params.hpp"
#include "kvc/attention/prefill_plan.cuh"
#include "kvc/attention/prefill_warp.cuh"
#include "kvc/attention/wgmma.cuh"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/macros.hpp"
#include "kvc/core/status.hpp"

namespace kvc::detail {

//! A variant serves prefill through its PrefillParams constructor / validate when it has them,
//! otherwise through the DecodeParams ones on decode_params_of(params).
template <class Variant>
inline constexpr bool kPrefillNativeVariant =
    std::is_constructible<Variant, PrefillParams const&>::value;

template <class Variant>
Status validate_prefill_variant(PrefillParams const& params) {
  if constexpr (kPrefillNativeVariant<Variant>) {
    return Variant::validate(params);
  } else {
    return Variant::validate(decode_params_of(params));
  }
}

//! Compile-time shape of one instantiation: tiles, pipeline depth and shared-memory layout.
template <class T, int kHeadDim, int kGroupSize>
struct PrefillTraits {
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  // Hopper's warpgroup products (device passes for sm_90a only; the host pass and other targets
  // take mma.sync) for head dims 64 and 128; 256 stays on mma.sync.
  static constexpr bool kWgmma = kHasWgmma && kTensorCores && kHeadDim <= 128;
  // 16-bit: 8 warps, q tiles of 128 rows (one CTA per SM at D >= 128, 8 warps sharing every K/V
  // tile); fp32: 4 warps, 64 rows. kWarps counts the warps that compute (consumers).
  static constexpr int kWarps = kTensorCores ? 8 : 4;
  static constexpr int kConsumerThreads = 32 * kWarps;
  // 16-bit head dims 64 and 128: one more warpgroup, the producer, claims the items and loads Q
  // and the K / V tiles through a ring of stages with shared-memory barriers, so the computing
  // warps never stop at a CTA barrier and drift apart (one warpgroup's products overlap the
  // other's softmax). The other instances: every thread loads, one CTA barrier per tile.
  static constexpr bool kProducerWarpgroup = kTensorCores && kHeadDim <= 128;
  static constexpr int kProducerThreads = kProducerWarpgroup ? 128 : 0;
  static constexpr int kThreads = kConsumerThreads + kProducerThreads;
  static constexpr int kLoaderThreads = kProducerWarpgroup ? kProducerThreads : kConsumerThreads;
  static constexpr int kRows = kWarps * kPrefillWarpRows;  // query rows per q tile
  static constexpr int kTokens = kRows / kGroupSize;
  static constexpr int kKeys = kTensorCores && kHeadDim < 256 ? 64 : 32;  // keys per K/V tile
  static constexpr int kRowBytes = kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  static constexpr int kChunks = kRowBytes / 16;
  static constexpr int kQBytes = kRows * kRowBytes;
  static constexpr int kTileBytes = kKeys * kRowBytes;
  static constexpr int kStageBytes = 2 * kTileBytes;
  // 16-bit: Q 16/32/64 KB + stages of 16/32/32 KB; fp32: Q 16/32/64 KB + stages of 16/32/64 KB.
  // 16-bit head dims 64 and 128: a ring of 4 stages filled by the producer warpgroup (the
  // pipelined wgmma warps hold two tiles at a time).
  static constexpr int kStages =
      kHeadDim == 256 ? 2 : (kTensorCores ? 4 : (kHeadDim == 64 ? 3 : 2));
  // Every-thread-loads loop: tiles loaded ahead of the one being computed.
  static constexpr int kAhead = kStages - 1;
  static constexpr int kCopies = kKeys * kChunks / kLoaderThreads;
  static constexpr int kQCopies = kRows * kChunks / kLoaderThreads;
  // Q buffers: the producer loads the next item's Q while the consumers finish an item.
  static constexpr int kQBuffers = kProducerWarpgroup ? 2 : 1;

  static constexpr int align16(int bytes) { return (bytes + 15) / 16 * 16; }
  static constexpr int kStagesOffset = kQBuffers * kQBytes;
  static constexpr int kSrcOffset =
      kStagesOffset + kStages * kStageBytes;  // PrefillSourceRow<T> [stages][keys]
  static constexpr int kFlagOffset = kSrcOffset + kStages * kKeys * 16;    // uint8 [stages][keys]
  static constexpr int kWOffset = align16(kFlagOffset + kStages * kKeys);  // float [warps][64]
  static constexpr int kMiscOffset = kWOffset + kWarps * kPrefillMaxSplits * 4;  // int [4]
  static constexpr int kLimitOffset =
      kMiscOffset + 16;  // int [Q buffers][rows]: keys below are seen
  // Producer path: barriers (uint64 full[stages], empty[stages], item_full[2], item_empty[2])
  // and the two item slots (PrefillWorkItem [2], then int index [2]).
  static constexpr int kBarrierOffset = align16(kLimitOffset + kQBuffers * kRows * 4);
  static constexpr int kItemOffset =
      kBarrierOffset + (kProducerWarpgroup ? (2 * kStages + 4) * 8 : 0);
  static constexpr int kItemIndexOffset =
      kItemOffset + (kProducerWarpgroup ? 2 * static_cast<int>(sizeof(PrefillWorkItem)) : 0);
  static constexpr int kEndOffset = kItemIndexOffset + (kProducerWarpgroup ? 16 : 0);
  // + 1 KB: the wgmma tiles' 1024-byte alignment is made at run time (every 16-bit instance keeps
  // the slack, so that the host's size agrees with every device pass).
  static constexpr int kAlignSlack = kTensorCores ? 1024 : 0;
  static constexpr int kSmemBytes = kEndOffset + kAlignSlack;

  //! Byte offset of 16-byte chunk c of row r in a Q or K / V tile of `rows` rows: 64-column
  //! blocks for wgmma, else rows of kRowBytes; both swizzle the chunk by the row (& 7).
  KVC_HOST_DEVICE static constexpr int tile_offset(int rows, int r, int c) {
    return kWgmma ? wgmma_tile_offset(rows, r, c) : r * kRowBytes + ((c ^ (r & 7)) << 4);
  }
  static constexpr int kSmemPerSm = 228 * 1024;
  // Resident CTAs per SM the launch bounds promise: 1 with 8 warps; at most 2 for fp32 (whose
  // warps need ~170-255 registers: 3 CTAs would force spills).
  static constexpr int kMinBlocks = kThreads > 128
                                        ? 1
                                        : (kSmemPerSm / (kSmemBytes + 1024) >= 2 ? 2 : 1);

  static_assert(kGroupSize >= 1 && kGroupSize <= 8 && 8 % kGroupSize == 0,
                "group size 1, 2, 4 or 8");
  static_assert(kChunks >= 8 && kChunks % 8 == 0, "the swizzle needs rows of 8k 16-byte chunks");
  static_assert(kPrefillKeyQuantum % kKeys == 0, "splits must hold whole tiles");
  static_assert(kKeys == 32 || kKeys == 64, "a tile's mask flags are one or two warp ballots");
  static_assert((kKeys * kChunks) % kLoaderThreads == 0 && (kRows * kChunks) % kLoaderThreads == 0,
                "copies per thread");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory above the sm_90 limit");
  static_assert(!kWgmma || kProducerWarpgroup, "the wgmma warps run only in the producer loop");
};

//! Typed kernel arguments.
template <class T>
struct PrefillKernelArgs {
  PrefillParams params;         // for variants built from PrefillParams
  DecodeParams variant_params;  // for variants built from DecodeParams
  T const* q;
  T const* k;
  T const* v;
  T* out;
  float* lse;
  T const* k_pages;
  T const* v_pages;
  std::int32_t const* page_table;
  std::uint8_t const* mask;
  int page_size;
  int page_shift;  // log2(page_size), or -1
  int max_pages_per_head;
  int num_kv_heads;
  int num_q_heads;
  float scale;
  float scale_log2;
  bool write_lse2;  // keep the final LSE (log2) in ws.lse2 for the score pass
  PrefillWorkspace ws;
};

template <class Variant, class T>
KVC_DEVICE Variant make_prefill_variant(PrefillKernelArgs<T> const& args) {
  if constexpr (kPrefillNativeVariant<Variant>) {
    return Variant(args.params);
  } else {
    return Variant(args.variant_params);
  }
}

//! Stores two adjacent outputs.
template <class T>
KVC_DEVICE void store_pair(T* destination, float a, float b) {
  if constexpr (std::is_same<T, float>::value) {
    *reinterpret_cast<float2*>(destination) = make_float2(a, b);
  } else {
    *reinterpret_cast<std::uint32_t*>(destination) = pack2<T>(a, b);
  }
}

//! Where a K / V tile row comes from: the key's rows in the pool or the chunk, or null (past the
//! item's end: zero fill). Resolved once per key by the thread that looks it up, so that the
//! copies of a tile are branch-free.
template <class T>
struct alignas(16) PrefillSourceRow {
  T const* k;
  T const* v;
};

//! The rows of a prefill_key_source code.
template <class T>
KVC_DEVICE PrefillSourceRow<T> prefill_source_row(PrefillKernelArgs<T> const& args,
                                                  long long source) {
  if (source >= 0) return {args.k_pages + source, args.v_pages + source};
  if (source <= -2) return {args.k + (-2 - source), args.v + (-2 - source)};
  return {nullptr, nullptr};
}

//! Source of item-space key j of the current item: >= 0 pool element offset, <= -2 chunk element
//! offset (-2 - offset) into k / v, -1 past the item's end (zero fill). `flag`: the DMC mask
//! flag of a chunk key (1 for prefix slots or without a mask); compacted (item.compact >= 0):
//! 1 for the compacted keys, and for the tile's own keys after them the flag negated (a query
//! sees its own key there only when it is not among the compacted ones).
template <class T>
KVC_DEVICE void prefill_key_source(PrefillKernelArgs<T> const& args, PrefillWorkItem const& item,
                                   int kv_head, std::int32_t const* pages, int j, long long& source,
                                   unsigned char& flag) {
  constexpr long long kNone = -1;
  if (j >= item.end) {
    source = kNone;
    flag = 0;
    return;
  }
  if (j < item.prefix) {
    int page, offset;
    if (args.page_shift >= 0) {
      page = j >> args.page_shift;
      offset = j & (args.page_size - 1);
    } else {
      page = j / args.page_size;
      offset = j - page * args.page_size;
    }
    source = (static_cast<long long>(pages[page]) * args.page_size + offset) *
             args.params.cache.head_dim;
    flag = 1;
    return;
  }
  int const chunk_key = j - item.prefix;
  if (item.compact < 0) {
    long long const index =
        (static_cast<long long>(item.token0) + chunk_key) * args.num_kv_heads + kv_head;
    source = -2 - index * args.params.cache.head_dim;
    flag = args.mask == nullptr ? 1 : (args.mask[index] != 0 ? 1 : 0);
    return;
  }
  bool const compacted = chunk_key < item.compact;
  int const token = compacted
                        ? args.ws.visible_index[(static_cast<long long>(item.token0) + chunk_key) *
                                                    args.num_kv_heads +
                                                kv_head]
                        : item.tile_token + (chunk_key - item.compact);
  long long const index =
      (static_cast<long long>(item.token0) + token) * args.num_kv_heads + kv_head;
  source = -2 - index * args.params.cache.head_dim;
  flag = compacted ? 1 : (args.mask[index] != 0 ? 0 : 1);
}

template <class Variant, class T, int kHeadDim, int kGroupSize>
KVC_GLOBAL void __launch_bounds__(PrefillTraits<T, kHeadDim, kGroupSize>::kThreads,
                                  PrefillTraits<T, kHeadDim, kGroupSize>::kMinBlocks)
    prefill_attention_kernel(PrefillKernelArgs<T> const args) {
  using Traits = PrefillTraits<T, kHeadDim, kGroupSize>;
  using Warp = std::conditional_t<
      Traits::kTensorCores,
      PrefillTcWarp<T, kHeadDim, kGroupSize, PrefillTraits<T, kHeadDim, kGroupSize>::kKeys, Variant,
                    PrefillTraits<T, kHeadDim, kGroupSize>::kWgmma,
                    PrefillTraits<T, kHeadDim, kGroupSize>::kRows>,
      PrefillSimtWarp<kHeadDim, kGroupSize, Variant>>;
  constexpr int kStages = Traits::kStages;
  constexpr int kAhead = Traits::kAhead;
  constexpr int kKeys = Traits::kKeys;
  constexpr int kChunks = Traits::kChunks;
  constexpr int kElems = Traits::kElems;
  constexpr int kTileBytes = Traits::kTileBytes;
  constexpr int kRows = Traits::kRows;
  constexpr int kLoaders = Traits::kLoaderThreads;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* const smem =
      smem_raw + (Traits::kWgmma ? (1024 - (smem_address(smem_raw) & 1023)) & 1023 : 0);
  // T [Q buffers][kRows][D] (Traits::tile_offset)
  auto q_tile_of = [&](int buffer) { return smem + buffer * Traits::kQBytes; };
  // Stage s: K tile, then V tile (T [kKeys][D] each).
  auto stage_of = [&](int stage) {
    return smem + Traits::kStagesOffset + stage * Traits::kStageBytes;
  };
  PrefillSourceRow<T>* const s_src =
      reinterpret_cast<PrefillSourceRow<T>*>(smem + Traits::kSrcOffset);  // [stages][keys]
  unsigned char* const s_flag = smem + Traits::kFlagOffset;              // [stages][keys]
  float* const s_w = reinterpret_cast<float*>(smem + Traits::kWOffset);  // [warps][64] weights
  int* const s_misc = reinterpret_cast<int*>(smem + Traits::kMiscOffset);     // [4]
  int* const s_limits = reinterpret_cast<int*>(smem + Traits::kLimitOffset);  // [buffers][rows]

  // Everything below reads what the plan kernel wrote.
  grid_dependency_wait();

  int const tid = static_cast<int>(threadIdx.x);
  int const lane = tid & 31;
  // Broadcast from lane 0 so that the compiler knows the warp index is warp-uniform.
  int const warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  int const hq = args.num_q_heads;
  int const hkv = args.num_kv_heads;
  PrefillWorkspace const& ws = args.ws;
  int const num_items = ws.counters[0];
  Variant const variant = make_prefill_variant<Variant>(args);

  // ---- Helpers of both loops. `first`: this thread's index among the kLoaders loading threads.
  // Key tiles of an item; at least one (an item always has a key, its own; an empty range would
  // stream one zero-filled, fully masked tile), so that the first tile needs no branch.
  auto tiles_of = [](PrefillWorkItem const& item) {
    int const tiles = (item.end - item.begin + kKeys - 1) / kKeys;
    return tiles > 1 ? tiles : 1;
  };
  // Page-table row of the item's prefix (nullptr without one).
  auto pages_of = [&](PrefillWorkItem const& item) -> std::int32_t const* {
    return item.cache_head >= 0
               ? args.page_table + static_cast<long long>(item.cache_head) * args.max_pages_per_head
               : nullptr;
  };
  // Q tile: row r is token tile_token + r / G, query head q_head0 + r % G (zero past the chunk).
  auto load_q = [&](unsigned char* q_tile, PrefillWorkItem const& item, int first) {
    int const q_head0 = (item.pair % hkv) * kGroupSize;
    std::uint32_t const q_dst = smem_address(q_tile);
#pragma unroll 4
    for (int i = 0; i < Traits::kQCopies; ++i) {
      int const id = first + i * kLoaders;
      int const r = id / kChunks;
      int const c = id - r * kChunks;
      int const token = item.tile_token + r / kGroupSize;
      bool const valid = token < item.num_tokens;
      long long const row = (static_cast<long long>(item.token0) + (valid ? token : 0)) * hq +
                            q_head0 + r % kGroupSize;
      cp_async_16(q_dst + static_cast<std::uint32_t>(Traits::tile_offset(kRows, r, c)),
                  args.q + row * kHeadDim + c * kElems, valid);
    }
  };
  // Each row's key bound: without compaction its token (chunk keys before it are seen when
  // flagged), with compaction V(token + 1) (compacted keys below are seen).
  auto fill_limits = [&](int* limits, PrefillWorkItem const& item, int first) {
    int const kv_head = item.pair % hkv;
    for (int r = first; r < kRows; r += kLoaders) {
      int const token = item.tile_token + r / kGroupSize;
      limits[r] =
          item.compact < 0 || token >= item.num_tokens
              ? token
              : args.ws
                    .visible_through[(static_cast<long long>(item.token0) + token) * hkv + kv_head];
    }
  };
  // Looks up key `key` of tile t of the item and stages its source rows and mask flag.
  auto stage_key = [&](int stage, PrefillWorkItem const& item, int kv_head,
                       std::int32_t const* pages, int t, int key) {
    long long source;
    unsigned char flag;
    prefill_key_source(args, item, kv_head, pages, item.begin + t * kKeys + key, source, flag);
    s_src[stage * kKeys + key] = prefill_source_row(args, source);
    s_flag[stage * kKeys + key] = flag;
  };
  // cp.async of a K / V tile into `stage` from the rows in s_src[stage].
  auto issue = [&](int stage, int first) {
    std::uint32_t const k_dst = smem_address(stage_of(stage));
    std::uint32_t const v_dst = k_dst + kTileBytes;
    PrefillSourceRow<T> const* rows = s_src + stage * kKeys;
#pragma unroll
    for (int i = 0; i < Traits::kCopies; ++i) {
      int const id = first + i * kLoaders;
      int const r = id / kChunks;
      int const c = id - r * kChunks;
      PrefillSourceRow<T> const row = rows[r];
      bool const valid = row.k != nullptr;
      std::uint32_t const offset = static_cast<std::uint32_t>(Traits::tile_offset(kKeys, r, c));
      cp_async_16(k_dst + offset, valid ? row.k + c * kElems : args.k, valid);
      cp_async_16(v_dst + offset, valid ? row.v + c * kElems : args.v, valid);
    }
  };
  // One key tile of the warp: `flags` are the tile's mask flags, `limits` the q tile's row
  // bounds; v_previous / has_previous feed the pipelined wgmma step.
  // `first_tag`: std::true_type for an item's first tile (no previous tile), else false_type.
  auto compute_tile = [&](auto first_tag, Warp& state, PrefillWorkItem const& item,
                          int const* limits, unsigned char const* flags, int stage, int t,
                          std::uint32_t q_address, std::uint32_t v_previous) {
    [[maybe_unused]] constexpr bool kFirst = decltype(first_tag)::value;  // (wgmma path only)
    int const batch_row = item.pair / hkv;
    int const q_head0 = (item.pair - batch_row * hkv) * kGroupSize;
    int const key0 = item.begin + t * kKeys;
    int const row0 = warp * kPrefillWarpRows;
    unsigned char* const k_tile = stage_of(stage);
    // Item-space chunk keys below `open_below` are seen by every row of the q tile; compacted
    // keys start at 0 and the tile's own keys at `own_first` (both in chunk-key units), the
    // token of own key c being c + own_shift.
    bool const compact = item.compact >= 0;
    int const open_below = compact ? limits[0] : item.tile_token + 1;
    int const own_first = compact ? item.compact : INT_MAX;
    int const own_shift = compact ? item.tile_token - item.compact : 0;
    // A tile needs the per-element test only where some key can be invisible to some row: keys
    // past the item's end, or chunk keys under the DMC mask, or chunk keys past the q tile's
    // first token (the causal diagonal). Without a mask, chunk keys up to the first token are
    // visible to every row (row r is token tile_token + r / G), so the tiles below the
    // diagonal run unmasked like the prefix.
    // With compaction the mask is in the compacted order: keys below V(tile_token + 1) are
    // seen by every row, the tile's own keys are always masked.
    int const chunk0 = key0 - item.prefix;  // chunk key of tile key 0 (< 0: a prefix key)
    int const last_chunk_key = chunk0 + kKeys - 1;
    bool const masked = key0 + kKeys > item.end ||
                        (last_chunk_key >= 0 &&
                         ((args.mask != nullptr && !compact) || last_chunk_key >= open_below));
    // The tile's flags as a bit mask (one ballot per 32 keys), so that the per-element test is
    // branch-free register arithmetic rather than a shared-memory byte load.
    unsigned long long flag_bits = 0;
    if (masked) {
      flag_bits = __ballot_sync(0xffffffffu, flags[lane] != 0);
      if constexpr (kKeys > 32) {
        flag_bits |=
            static_cast<unsigned long long>(__ballot_sync(0xffffffffu, flags[lane + 32] != 0))
            << 32;
      }
    }
    // Without compaction: chunk key c is seen by query q iff c == q, or c < q and flagged.
    // With it: compacted key c iff c < V(q + 1); own key c iff its token is q and its
    // (negated) flag is set.
    auto visible = [&](int row_in_warp, int key) {
      int const chunk_key = chunk0 + key;
      int const query = item.tile_token + (row0 + row_in_warp) / kGroupSize;
      int const limit = limits[row0 + row_in_warp];
      bool const flag = ((flag_bits >> key) & 1ull) != 0;
      return (key0 + key < item.end) &
             ((chunk_key < 0) | ((chunk_key < own_first) & (chunk_key < limit) & flag) |
              ((chunk_key + own_shift == query) & (flag | !compact)));
    };
    if constexpr (Traits::kWgmma) {
      // S of this tile beside O += P V of the previous one (whose stage is released only after).
      std::uint32_t const k_address = smem_address(k_tile);
      if (masked) {
        state.template step<true, kFirst>(k_address, v_previous, q_address, row0, key0, lane,
                                          variant, args.scale, args.scale_log2, batch_row, q_head0,
                                          visible);
      } else {
        state.template step<false, kFirst>(k_address, v_previous, q_address, row0, key0, lane,
                                           variant, args.scale, args.scale_log2, batch_row, q_head0,
                                           visible);
      }
    } else if constexpr (Traits::kTensorCores) {
      std::uint32_t const k_address = smem_address(k_tile);
      if (masked) {
        state.template tile<true>(k_address, k_address + kTileBytes, q_address, row0, key0, lane,
                                  variant, args.scale, args.scale_log2, batch_row, q_head0,
                                  visible);
      } else {
        state.template tile<false>(k_address, k_address + kTileBytes, q_address, row0, key0, lane,
                                   variant, args.scale, args.scale_log2, batch_row, q_head0,
                                   visible);
      }
    } else {
      unsigned char const* const q_tile = smem + (q_address - smem_address(smem));
      if (masked) {
        state.template tile<true>(k_tile, k_tile + kTileBytes, q_tile, row0, key0, lane, variant,
                                  args.scale, args.scale_log2, batch_row, q_head0, visible);
      } else {
        state.template tile<false>(k_tile, k_tile + kTileBytes, q_tile, row0, key0, lane, variant,
                                   args.scale, args.scale_log2, batch_row, q_head0, visible);
      }
    }
  };
  // ---- End of an item: the output (or a split's partial, the last split merging them).
  // `sync` is a barrier over the computing threads.
  auto finish_item = [&](Warp& state, PrefillWorkItem const& item, auto const& sync) {
    int const q_head0 = (item.pair % hkv) * kGroupSize;
    int const row0 = warp * kPrefillWarpRows;
    auto packed_row = [&](int row_in_tile, int& token) {
      token = item.tile_token + row_in_tile / kGroupSize;
      return (static_cast<long long>(item.token0) + token) * hq + q_head0 +
             row_in_tile % kGroupSize;
    };
    if (item.num_splits == 1) {
      state.finish(
          lane,
          [&](int row_in_warp, float lse2) {
            int token;
            long long const row = packed_row(row0 + row_in_warp, token);
            if (token >= item.num_tokens) return;
            if (args.lse != nullptr) args.lse[row] = lse2 * kLn2;
            if (args.write_lse2) ws.lse2[row] = lse2;
          },
          [&](int row_in_warp, int dim, float a, float b) {
            int token;
            long long const row = packed_row(row0 + row_in_warp, token);
            if (token < item.num_tokens) store_pair<T>(args.out + row * kHeadDim + dim, a, b);
          });
      return;
    }

    // A split: publish the partial; the last split of the q tile to arrive merges.
    long long const record = item.record + item.split;
    state.finish(
        lane,
        [&](int row_in_warp, float lse2) {
          ws.partial_lse[record * kRows + row0 + row_in_warp] = lse2;
        },
        [&](int row_in_warp, int dim, float a, float b) {
          *reinterpret_cast<float2*>(ws.partial_out +
                                     (record * kRows + row0 + row_in_warp) * kHeadDim + dim) =
              make_float2(a, b);
        });
    __threadfence();
    sync();
    if (tid == 0)
      s_misc[1] = atomicAdd(ws.arrivals + item.record, 1) == item.num_splits - 1 ? 1 : 0;
    sync();
    if (s_misc[1] != 0) {
      __threadfence();
      int const splits = item.num_splits;
      float* const weights = s_w + warp * kPrefillMaxSplits;
      float const* lse_base = ws.partial_lse + static_cast<long long>(item.record) * kRows;
      float const* out_base =
          ws.partial_out + static_cast<long long>(item.record) * kRows * kHeadDim;
#pragma unroll 1
      for (int r = warp; r < kRows; r += Traits::kWarps) {
        int token;
        long long const row = packed_row(r, token);
        if (token >= item.num_tokens) continue;  // warp-uniform
        float const a = lane < splits ? __ldcg(lse_base + lane * kRows + r) : -INFINITY;
        float const b = lane + 32 < splits ? __ldcg(lse_base + (lane + 32) * kRows + r) : -INFINITY;
        float top = fmaxf(a, b);
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1)
          top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
        float sum =
            exp2_approx(a - top) + exp2_approx(b - top);  // top is finite: the row sees its own key
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1)
          sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        float const merged = top + log2f(sum);
        if (lane < splits) weights[lane] = exp2_approx(a - merged);
        if (lane + 32 < splits) weights[lane + 32] = exp2_approx(b - merged);
        __syncwarp();
        for (int d = lane; d < kHeadDim; d += 32) {
          float acc = 0.0f;
          for (int c = 0; c < splits; ++c) {
            acc += weights[c] *
                   __ldcg(out_base + (static_cast<long long>(c) * kRows + r) * kHeadDim + d);
          }
          args.out[row * kHeadDim + d] = DTypeTraits<T>::from_float(acc);
        }
        if (lane == 0) {
          if (args.lse != nullptr) args.lse[row] = merged * kLn2;
          if (args.write_lse2) ws.lse2[row] = merged;
        }
        __syncwarp();
      }
    }
  };

  if constexpr (Traits::kProducerWarpgroup) {
    // ---- Producer warpgroup (the last) and computing warps, through shared-memory barriers:
    //   full[s]   tile in stage s landed (each producer thread's copies, plus its plain arrival
    //             after writing the stage's source rows and mask flags): 2 x 128 arrivals;
    //   empty[s]  every computing warp is done with stage s: kWarps arrivals;
    //   item_full[b] / item_empty[b]  item slot b (item, row bounds, Q buffer b) written /
    //             released (128 / 256 arrivals; Q itself lands with the item's first tile).
    // Tiles and items are numbered from 0 over the whole kernel: tile g uses stage g % kStages
    // in phase g / kStages, item i slot i % 2 in phase i / 2.
    constexpr int kProducers = Traits::kProducerThreads;
    std::uint64_t* const barriers = reinterpret_cast<std::uint64_t*>(smem + Traits::kBarrierOffset);
    auto barrier = [&](int index) { return smem_address(barriers + index); };
    auto full = [&](int stage) { return barrier(stage); };
    auto empty = [&](int stage) { return barrier(kStages + stage); };
    auto item_full = [&](int slot) { return barrier(2 * kStages + slot); };
    auto item_empty = [&](int slot) { return barrier(2 * kStages + 2 + slot); };
    PrefillWorkItem* const s_items = reinterpret_cast<PrefillWorkItem*>(smem + Traits::kItemOffset);
    int* const s_item_index = reinterpret_cast<int*>(smem + Traits::kItemIndexOffset);
    if (tid == 0) {
      for (int s = 0; s < kStages; ++s) {
        mbarrier_init(full(s), 2 * kProducers);
        mbarrier_init(empty(s), Traits::kWarps);
      }
      for (int b = 0; b < 2; ++b) {
        mbarrier_init(item_full(b), kProducers);
        mbarrier_init(item_empty(b), Traits::kConsumerThreads);
      }
    }
    __syncthreads();

    if (warp >= Traits::kWarps) {
      // Producer: thread p of kProducers; barrier 2 is the producers' own.
      int const p = tid - Traits::kConsumerThreads;
      auto sync_producers = [] { named_barrier_sync(2, kProducers); };
      int g = 0;
#pragma unroll 1
      for (int i = 0;; ++i) {
        int const slot = i & 1;
        // (The claim alternates between two words: a word is rewritten two items later, after
        // every producer passed the barrier below that follows its read.)
        if (p == 0) s_misc[2 + slot] = atomicAdd(ws.counters + 1, 1);
        sync_producers();
        int const index = s_misc[2 + slot];
        if (i >= 2) mbarrier_wait(item_empty(slot), ((i >> 1) - 1) & 1);
        if (index >= num_items) {
          if (p == 0) s_item_index[slot] = -1;
          mbarrier_arrive(item_full(slot));
          break;
        }
        PrefillWorkItem const item = ws.items[index];
        int const kv_head = item.pair % hkv;
        std::int32_t const* pages = pages_of(item);
        int const tiles = tiles_of(item);
        if (p == 0) {
          s_items[slot] = item;
          s_item_index[slot] = index;
        }
        fill_limits(s_limits + slot * kRows, item, p);
        load_q(q_tile_of(slot), item, p);
        mbarrier_arrive(item_full(slot));
#pragma unroll 1
        for (int t = 0; t < tiles; ++t, ++g) {
          int const stage = g % kStages;
          if (g >= kStages) mbarrier_wait(empty(stage), ((g / kStages) - 1) & 1);
          if (p < kKeys) stage_key(stage, item, kv_head, pages, t, p);
          sync_producers();
          issue(stage, p);
          mbarrier_arrive_on_copies(full(stage));
          mbarrier_arrive(full(stage));
        }
      }
      cp_async_wait<0>();
      return;
    }

    // Computing warps.
    auto sync_computing = [] { named_barrier_sync(1, Traits::kConsumerThreads); };
    Warp state;
    int g = 0;
#pragma unroll 1
    for (int i = 0;; ++i) {
      int const slot = i & 1;
      mbarrier_wait(item_full(slot), (i >> 1) & 1);
      if (s_item_index[slot] < 0) break;
      PrefillWorkItem const item = s_items[slot];
      int const* const limits = s_limits + slot * kRows;
      std::uint32_t const q_address = smem_address(q_tile_of(slot));
      int const tiles = tiles_of(item);
      // Tile t of the item (the first one peeled off the loop, so that no wgmma sits in a branch).
      auto consume = [&](auto first_tag, int t) {
        constexpr bool kFirst = decltype(first_tag)::value;
        int const stage = g % kStages;
        int const previous = (g + kStages - 1) % kStages;
        mbarrier_wait(full(stage), (g / kStages) & 1);
        if constexpr (Traits::kWgmma) fence_proxy_async_shared();  // wgmma reads the tiles
        // (Q lands with the item's first tile: mma.sync warps read it into registers here.)
        if constexpr (kFirst) state.begin(q_address, warp * kPrefillWarpRows, lane);
        compute_tile(first_tag, state, item, limits, s_flag + stage * kKeys, stage, t, q_address,
                     smem_address(stage_of(previous)) + kTileBytes);
        // Pipelined: the previous tile's stage is free now; otherwise this one.
        if constexpr (!Traits::kWgmma || !kFirst) {
          __syncwarp();
          if (lane == 0) mbarrier_arrive(empty(Traits::kWgmma ? previous : stage));
        }
        ++g;
      };
      consume(std::true_type{}, 0);
#pragma unroll 1
      for (int t = 1; t < tiles; ++t) consume(std::false_type{}, t);
      if constexpr (Traits::kWgmma) {
        int const last = (g + kStages - 1) % kStages;
        state.drain(smem_address(stage_of(last)) + kTileBytes);
        __syncwarp();
        if (lane == 0) mbarrier_arrive(empty(last));
      }
      // The slot's item, Q buffer and row bounds are read no more (every thread arrives: each
      // read the slot).
      mbarrier_arrive(item_empty(slot));
      finish_item(state, item, sync_computing);
    }
  } else {
    // ---- Every thread loads: the tiles of an item stream through kStages stages, kAhead ahead,
    // with one CTA barrier per tile.
    unsigned char* const q_tile = q_tile_of(0);
    Warp state;
#pragma unroll 1
    for (;;) {
      if (tid == 0) s_misc[0] = atomicAdd(ws.counters + 1, 1);
      __syncthreads();
      int const index = s_misc[0];
      if (index >= num_items) break;
      PrefillWorkItem const item = ws.items[index];
      int const kv_head = item.pair % hkv;
      int const tiles = tiles_of(item);
      std::int32_t const* pages = pages_of(item);
      load_q(q_tile, item, tid);
      fill_limits(s_limits, item, tid);  // read after the barriers below

      // Prologue: tiles 0 .. kAhead - 1, one commit group each (the first also holds Q).
#pragma unroll 1
      for (int s = 0; s < kAhead; ++s) {
        if (s < tiles && tid < kKeys) stage_key(s, item, kv_head, pages, s, tid);
        __syncthreads();
        if (s < tiles) issue(s, tid);
        cp_async_commit();
      }
      long long next_source = -1;
      unsigned char next_flag = 0;
      if (kAhead < tiles && tid < kKeys) {
        prefill_key_source(args, item, kv_head, pages, item.begin + kAhead * kKeys + tid,
                           next_source, next_flag);
      }

#pragma unroll 1
      for (int t = 0; t < tiles; ++t) {
        int const ahead = t + kAhead;
        int const ahead_stage = ahead % kStages;
        if (ahead < tiles && tid < kKeys) {
          s_src[ahead_stage * kKeys + tid] = prefill_source_row(args, next_source);
        }
        cp_async_wait<kAhead - 1>();
        __syncthreads();
        if (ahead < tiles) {
          issue(ahead_stage, tid);
          if (tid < kKeys) s_flag[ahead_stage * kKeys + tid] = next_flag;
          if (ahead + 1 < tiles && tid < kKeys) {
            prefill_key_source(args, item, kv_head, pages, item.begin + (ahead + 1) * kKeys + tid,
                               next_source, next_flag);
          }
        }
        cp_async_commit();

        int const stage = t % kStages;
        if (t == 0) state.begin(smem_address(q_tile), warp * kPrefillWarpRows, lane);
        compute_tile(std::false_type{}, state, item, s_limits, s_flag + stage * kKeys, stage, t,
                     smem_address(q_tile),
                     0u);  // (no previous tile: these warps run mma.sync / CUDA cores, unpipelined)
      }
      finish_item(state, item, [] { __syncthreads(); });
      __syncthreads();
    }
  }
  cp_async_wait<0>();
}

}  // namespace kvc::detail
