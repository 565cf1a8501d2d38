//! @file
//! Work decomposition of prefill attention, planned on the device: the workspace layout and a
//! one-block plan kernel that reads the chunk boundaries and prefix lengths, cuts every
//! (row, KV head) into q tiles of R query rows (R / G tokens x the G query heads of the KV head;
//! R = 128 for fp16/bf16, 64 for fp32: PrefillTraits::kRows), splits the key range of long q tiles,
//! and writes a work list ordered by cost (largest first) for the persistent attention kernel,
//! which takes items from it dynamically (one atomic counter).
//!
//! Key range of a q tile. Tile t of (row b, KV head h) holds chunk tokens [t0, t1),
//! t0 = t * kTokens, t1 = min(n_b, t0 + kTokens). Its keys are the P cached slots and the chunk
//! keys 0 .. t1 - 1, as item-space indices [0, L), L = P + t1 (chunk key j at P + j).
//! Splitting. W = sum of L over all q tiles (keys x R rows is the cost unit), grid = persistent
//! CTAs. The split bound is C = max(64, roundup64(ceil(W / (kPrefillTargetWaves * grid)))); a q
//! tile with L > C gets n = ceil(L / cs) splits of cs = roundup64(ceil(L / min(ceil(L / C), 64)))
//! keys (as decode's chunking). Items <= W / C + q tiles <= kPrefillTargetWaves * grid + q tiles;
//! partial records (only split tiles) <= 2 W / C <= 2 kPrefillTargetWaves * grid. q tiles <=
//! Hkv * (ceil(total_tokens / kTokens) + batch). Every capacity is fixed by host-known sizes.
//! Order. Items are bucketed by floor(log2(key tiles)) and listed from the largest bucket down
//! (longest-processing-time first); the placement within a bucket uses shared-memory atomics and
//! may change from run to run, which never changes a result: every item's output depends only on
//! the item, and split partials are merged in split order.
//! Scores. When a score mode is on, the plan also lists the score units (kPrefillScoreSlots slots
//! of one (row, KV head)) as an exclusive scan over the (row, KV head) pairs.
//! DMC mask: compaction. With a chunk mask, query i sees chunk key j < i only when j is flagged
//! visible, so most chunk keys of a compressing head are seen by one query only (their own).
//! prefill_compact_kernel (one launch before the plan) lists each (row, KV head)'s visible chunk
//! keys in order (visible_index) and, per chunk token i, V(i + 1) = the visible keys among tokens
//! 0 .. i (visible_through). A q tile of tokens [t0, t1) then has the keys: the P cached slots,
//! the V(t1) visible chunk keys in order (compacted: query i sees compacted key c iff
//! c < V(i + 1)), then the tile's own t1 - t0 chunk keys (query i sees its own key there iff it
//! is not flagged, as a flagged one is among the compacted keys): L = P + V(t1) + t1 - t0
//! instead of P + t1, so the attention's work shrinks with the compression.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kvc/core/block_reduce.cuh"
#include "kvc/core/macros.hpp"

namespace kvc::detail {

inline constexpr int kPrefillKeyQuantum = 64;  //!< split sizes and boundaries: multiples of this
inline constexpr int kPrefillMaxSplits = 64;   //!< most splits of one q tile
inline constexpr int kPrefillTargetWaves = 4;  //!< aim for about this many splits' worth per CTA
inline constexpr int kPrefillPlanThreads = 1024;
inline constexpr int kPrefillBuckets = 24;     //!< cost buckets (floor log2 of key tiles)
inline constexpr int kPrefillScoreSlots = 32;  //!< slots per score unit

//! One unit of work: keys [begin, end) (item space) of one q tile. 48 bytes.
struct alignas(16) PrefillWorkItem {
  int pair;        //!< row * num_kv_heads + kv_head
  int cache_head;  //!< seq_slot * num_kv_heads + kv_head (page-table row), -1 without a prefix
  int token0;      //!< cu_tokens[row]: first packed token of the row's chunk
  int num_tokens;  //!< n_b: tokens of the chunk
  int tile_token;  //!< first chunk token of the q tile (t0)
  int prefix;      //!< P: visible cached slots of (row, KV head)
  int begin;       //!< first key (item space)
  int end;         //!< one past the last key
  int split;       //!< index of this split within the q tile
  int num_splits;  //!< splits of the q tile (1: the item writes the output itself)
  int record;      //!< first partial record of the q tile (num_splits > 1)
  int compact;     //!< V(t1): compacted visible chunk keys of the q tile; -1: not compacted
};

//! Device pointers into the caller's workspace.
struct PrefillWorkspace {
  int* counters = nullptr;           //!< [4]: items, next item (dynamic fetch), records, -
  int* pair_prefix = nullptr;        //!< [pairs] clamped P of each (row, KV head)
  int* score_offsets = nullptr;      //!< [pairs + 1] exclusive scan of score units (scores only)
  int* arrivals = nullptr;           //!< [partial_capacity] finished splits, at a tile's record
  PrefillWorkItem* items = nullptr;  //!< [item_capacity]
  float* partial_out = nullptr;      //!< [partial_capacity, R, D] normalised
  float* partial_lse = nullptr;      //!< [partial_capacity, R] log2 units
  float* lse2 = nullptr;             //!< [total_tokens, Hq] final LSE, log2 units (scores only)
  int* visible_index = nullptr;      //!< [total_tokens, Hkv] compacted chunk keys (mask only)
  int* visible_through = nullptr;    //!< [total_tokens, Hkv] V(i + 1) per chunk token (mask only)
  int item_capacity = 0;
  int partial_capacity = 0;
};

//! Byte layout of the workspace. Host and device.
struct PrefillWorkspaceLayout {
  std::size_t counters = 0, pair_prefix = 0, score_offsets = 0, arrivals = 0, items = 0;
  std::size_t partial_out = 0, partial_lse = 0, lse2 = 0, visible_index = 0, visible_through = 0;
  std::size_t bytes = 0;
  int item_capacity = 0;
  int partial_capacity = 0;

  static KVC_HOST_DEVICE std::size_t align(std::size_t offset) {
    return (offset + 255) / 256 * 256;
  }

  //! `tile_rows` = R, `tokens_per_tile` = R / G; `scores`: room for the score pass; `compact`:
  //! room for the compacted chunk keys of a DMC mask.
  static KVC_HOST_DEVICE PrefillWorkspaceLayout make(int batch, int total_tokens, int num_kv_heads,
                                                     int num_q_heads, int tile_rows,
                                                     int tokens_per_tile, int head_dim, int grid,
                                                     bool scores, bool compact) {
    PrefillWorkspaceLayout layout;
    std::size_t const pairs = static_cast<std::size_t>(batch) * num_kv_heads;
    long long const q_tiles = static_cast<long long>(num_kv_heads) *
                              ((total_tokens + tokens_per_tile - 1) / tokens_per_tile + batch);
    long long const items = kPrefillTargetWaves * static_cast<long long>(grid) + q_tiles;
    layout.item_capacity = items > 0x3fffffffll ? 0x3fffffff : static_cast<int>(items);
    layout.partial_capacity = 2 * kPrefillTargetWaves * grid;
    std::size_t offset = 0;
    layout.counters = offset;
    offset = align(offset + 4 * sizeof(int));
    layout.pair_prefix = offset;
    offset = align(offset + pairs * sizeof(int));
    layout.score_offsets = offset;
    offset = align(offset + (scores ? (pairs + 1) * sizeof(int) : 0));
    layout.arrivals = offset;
    offset = align(offset + static_cast<std::size_t>(layout.partial_capacity) * sizeof(int));
    layout.items = offset;
    offset =
        align(offset + static_cast<std::size_t>(layout.item_capacity) * sizeof(PrefillWorkItem));
    layout.partial_out = offset;
    std::size_t const records = static_cast<std::size_t>(layout.partial_capacity) * tile_rows;
    offset = align(offset + records * head_dim * sizeof(float));
    layout.partial_lse = offset;
    offset = align(offset + records * sizeof(float));
    layout.lse2 = offset;
    offset =
        align(offset +
              (scores ? static_cast<std::size_t>(total_tokens) * num_q_heads * sizeof(float) : 0));
    std::size_t const token_heads =
        compact ? static_cast<std::size_t>(total_tokens) * num_kv_heads * sizeof(int) : 0;
    layout.visible_index = offset;
    offset = align(offset + token_heads);
    layout.visible_through = offset;
    offset = align(offset + token_heads);
    layout.bytes = offset;
    return layout;
  }

  KVC_HOST_DEVICE PrefillWorkspace carve(void* base) const {
    char* bytes_base = static_cast<char*>(base);
    PrefillWorkspace ws;
    ws.counters = reinterpret_cast<int*>(bytes_base + counters);
    ws.pair_prefix = reinterpret_cast<int*>(bytes_base + pair_prefix);
    ws.score_offsets = reinterpret_cast<int*>(bytes_base + score_offsets);
    ws.arrivals = reinterpret_cast<int*>(bytes_base + arrivals);
    ws.items = reinterpret_cast<PrefillWorkItem*>(bytes_base + items);
    ws.partial_out = reinterpret_cast<float*>(bytes_base + partial_out);
    ws.partial_lse = reinterpret_cast<float*>(bytes_base + partial_lse);
    ws.lse2 = reinterpret_cast<float*>(bytes_base + lse2);
    bool const compact = visible_through > visible_index;
    ws.visible_index = compact ? reinterpret_cast<int*>(bytes_base + visible_index) : nullptr;
    ws.visible_through = compact ? reinterpret_cast<int*>(bytes_base + visible_through) : nullptr;
    ws.item_capacity = item_capacity;
    ws.partial_capacity = partial_capacity;
    return ws;
  }
};

//! Arguments of the plan kernel.
struct PrefillPlanArgs {
  std::int32_t const* cu_tokens;       // [batch + 1]
  std::int32_t const* seq_slots;       // [batch] or null
  std::int32_t const* prefix_lengths;  // [batch, Hkv] or null
  std::int32_t const* lengths;  // view lengths [max_seqs, Hkv] (used when prefix_lengths null)
  int batch;
  int total_tokens;
  int num_kv_heads;
  int max_seqs;
  int max_length;       // max_pages_per_head * page_size
  int tokens_per_tile;  // R / G
  int grid;             // persistent CTAs of the attention kernel
  int score_stride;     // > 0: list score units over min(P + n, stride) slots; 0: no scores
  std::uint8_t const* mask;  // [total_tokens, Hkv] chunk_key_visible, compacted when ws has room
  PrefillWorkspace ws;
};

//! Chunk of row b, clamped into [0, total_tokens]: first token and count.
KVC_DEVICE void prefill_row_tokens(PrefillPlanArgs const& a, int b, int& first, int& count) {
  int lo = a.cu_tokens[b];
  int hi = a.cu_tokens[b + 1];
  lo = lo < 0 ? 0 : (lo > a.total_tokens ? a.total_tokens : lo);
  hi = hi < lo ? lo : (hi > a.total_tokens ? a.total_tokens : hi);
  first = lo;
  count = hi - lo;
}

//! Splits of a q tile with L keys under bound C: (number, size).
KVC_HOST_DEVICE void prefill_splits(int length, int bound, int& count, int& size) {
  int n0 = (length + bound - 1) / bound;
  n0 = n0 < 1 ? 1 : (n0 > kPrefillMaxSplits ? kPrefillMaxSplits : n0);
  int const raw = (length + n0 - 1) / n0;
  size = (raw + kPrefillKeyQuantum - 1) / kPrefillKeyQuantum * kPrefillKeyQuantum;
  count = (length + size - 1) / size;
}

//! Keys (item space) of the q tile of chunk tokens [t0, t1) of KV head h of a row whose chunk
//! starts at packed token `first`, with P = prefix cached slots: P + t1, or with compaction
//! P + V(t1) + t1 - t0 (`compact` = V(t1); -1 without compaction).
KVC_DEVICE int prefill_tile_keys(PrefillPlanArgs const& a, int h, int first, int t0, int t1,
                                 int prefix, int& compact) {
  if (a.ws.visible_through == nullptr) {
    compact = -1;
    return prefix + t1;
  }
  compact = a.ws.visible_through[static_cast<long long>(first + t1 - 1) * a.num_kv_heads + h];
  return prefix + compact + (t1 - t0);
}

//! Cost bucket of an item of `keys` keys: floor(log2(key tiles of 64)).
KVC_DEVICE int prefill_bucket(int keys) {
  int const tiles = (keys + kPrefillKeyQuantum - 1) / kPrefillKeyQuantum;
  int const bucket = 31 - __clz(tiles < 1 ? 1 : tiles);
  return bucket >= kPrefillBuckets ? kPrefillBuckets - 1 : bucket;
}

//! One block of kPrefillPlanThreads threads.
KVC_GLOBAL void __launch_bounds__(kPrefillPlanThreads)
    prefill_plan_kernel(PrefillPlanArgs const a) {
  __shared__ BlockScratch scratch;
  __shared__ int s_bound;
  __shared__ int s_count[kPrefillBuckets];
  __shared__ int s_cursor[kPrefillBuckets];
  __shared__ int s_records;
  int const tid = static_cast<int>(threadIdx.x);
  int const pairs = a.batch * a.num_kv_heads;
  int const tpt = a.tokens_per_tile;
  // Thread mapping of passes 1-3: `lanes` threads per (row, KV head) pair (a power of two; 1 when
  // there are >= kPrefillPlanThreads pairs), each taking every lanes-th q tile of its pair, so
  // that a batch of few long prompts is planned by the whole block.
  int lanes = 1;
  while (pairs > 0 && lanes * 2 * pairs <= kPrefillPlanThreads) lanes *= 2;
  int const sub = tid % lanes;
  int const first_pair = tid / lanes;
  int const pair_stride = kPrefillPlanThreads / lanes;
  int const tile_step = lanes * tpt;
  PrefillWorkspace const& ws = a.ws;
  if (tid == 0) s_records = 0;
  if (tid < kPrefillBuckets) s_count[tid] = 0;
  __syncthreads();

  // Pass 1: prefix lengths and the total work W.
  unsigned long long work = 0;
  for (int pair = first_pair; pair < pairs; pair += pair_stride) {
    int const b = pair / a.num_kv_heads;
    int const h = pair - b * a.num_kv_heads;
    int const seq = a.seq_slots != nullptr ? a.seq_slots[b] : b;
    int prefix = 0;
    if (seq >= 0 && seq < a.max_seqs) {
      prefix = a.prefix_lengths != nullptr
                   ? a.prefix_lengths[pair]
                   : a.lengths[static_cast<long long>(seq) * a.num_kv_heads + h];
      prefix = prefix < 0 ? 0 : (prefix > a.max_length ? a.max_length : prefix);
    }
    if (sub == 0) ws.pair_prefix[pair] = prefix;
    int first, n;
    prefill_row_tokens(a, b, first, n);
    for (int t0 = sub * tpt; t0 < n; t0 += tile_step) {
      int const t1 = t0 + tpt < n ? t0 + tpt : n;
      int compact;
      work +=
          static_cast<unsigned long long>(prefill_tile_keys(a, h, first, t0, t1, prefix, compact));
    }
  }
  // A block reduction: one shared 64-bit atomicAdd per thread is a compare-and-swap loop, and
  // 1024 of them on one word cost ~50 us (ncu source profile, 2026-12-04).
  unsigned long long const total_work =
      static_cast<unsigned long long>(block_sum(static_cast<long long>(work), scratch));
  if (tid == 0) {
    unsigned long long const share =
        (total_work + kPrefillTargetWaves * static_cast<unsigned long long>(a.grid) - 1) /
        (kPrefillTargetWaves * static_cast<unsigned long long>(a.grid));
    unsigned long long bound =
        (share + kPrefillKeyQuantum - 1) / kPrefillKeyQuantum * kPrefillKeyQuantum;
    if (bound < kPrefillKeyQuantum) bound = kPrefillKeyQuantum;
    s_bound = bound > 0x40000000ull ? 0x40000000 : static_cast<int>(bound);
  }
  __syncthreads();
  int const bound = s_bound;

  // Pass 2: items per cost bucket.
  for (int pair = first_pair; pair < pairs; pair += pair_stride) {
    int const b = pair / a.num_kv_heads;
    int const h = pair - b * a.num_kv_heads;
    int const prefix = ws.pair_prefix[pair];
    int first, n;
    prefill_row_tokens(a, b, first, n);
    for (int t0 = sub * tpt; t0 < n; t0 += tile_step) {
      int const t1 = t0 + tpt < n ? t0 + tpt : n;
      int compact;
      int const keys = prefill_tile_keys(a, h, first, t0, t1, prefix, compact);
      int count, size;
      prefill_splits(keys, bound, count, size);
      for (int s = 0; s < count; ++s) {
        int const begin = s * size;
        int const end = begin + size < keys ? begin + size : keys;
        atomicAdd(&s_count[prefill_bucket(end - begin)], 1);
      }
    }
  }
  __syncthreads();
  if (tid == 0) {
    int offset = 0;
    for (int bucket = kPrefillBuckets - 1; bucket >= 0; --bucket) {
      s_cursor[bucket] = offset;
      offset += s_count[bucket];
    }
    ws.counters[0] = offset;
    ws.counters[1] = 0;
  }
  __syncthreads();

  // Pass 3: the items.
  for (int pair = first_pair; pair < pairs; pair += pair_stride) {
    int const b = pair / a.num_kv_heads;
    int const h = pair - b * a.num_kv_heads;
    int const seq = a.seq_slots != nullptr ? a.seq_slots[b] : b;
    int const prefix = ws.pair_prefix[pair];
    int first, n;
    prefill_row_tokens(a, b, first, n);
    for (int t0 = sub * tpt; t0 < n; t0 += tile_step) {
      int const t1 = t0 + tpt < n ? t0 + tpt : n;
      int compact;
      int const keys = prefill_tile_keys(a, h, first, t0, t1, prefix, compact);
      int count, size;
      prefill_splits(keys, bound, count, size);
      int record = 0;
      if (count > 1) {
        record = atomicAdd(&s_records, count);
        ws.arrivals[record] = 0;
      }
      for (int s = 0; s < count; ++s) {
        PrefillWorkItem item;
        item.pair = pair;
        item.cache_head = prefix > 0 ? seq * a.num_kv_heads + h : -1;
        item.token0 = first;
        item.num_tokens = n;
        item.tile_token = t0;
        item.prefix = prefix;
        item.begin = s * size;
        item.end = item.begin + size < keys ? item.begin + size : keys;
        item.split = s;
        item.num_splits = count;
        item.record = record;
        item.compact = compact;
        int const position = atomicAdd(&s_cursor[prefill_bucket(item.end - item.begin)], 1);
        ws.items[position] = item;
      }
    }
  }

  // Score units: exclusive scan of ceil(min(P + n, stride) / kPrefillScoreSlots) over the pairs.
  if (a.score_stride <= 0) return;
  long long carry = 0;                                             // units of the rounds before
  for (int base = 0; base < pairs; base += kPrefillPlanThreads) {  // uniform: the scan syncs
    int const pair = base + tid;
    int units = 0;
    if (pair < pairs) {
      int first, n;
      prefill_row_tokens(a, pair / a.num_kv_heads, first, n);
      int slots = n > 0 ? ws.pair_prefix[pair] + n : 0;
      slots = slots < a.score_stride ? slots : a.score_stride;
      units = (slots + kPrefillScoreSlots - 1) / kPrefillScoreSlots;
    }
    long long round_units = 0;
    long long const before = block_exclusive_sum(units, round_units, scratch);
    if (pair < pairs) ws.score_offsets[pair] = static_cast<int>(carry + before);
    carry += round_units;
  }
  if (tid == 0) ws.score_offsets[pairs] = static_cast<int>(carry);
}

//! Threads per block of prefill_compact_kernel.
inline constexpr int kPrefillCompactThreads = 256;

//! Tokens per thread of prefill_compact_kernel (a block covers 16 x 256 = 4096 per step).
inline constexpr int kPrefillCompactRun = 16;

//! Grid (batch, num_kv_heads), block kPrefillCompactThreads; launched before the plan when the
//! workspace has room for compaction (a.ws.visible_through). For (row b, KV head h) with chunk
//! tokens [first, first + n): visible_index[(first + c) * Hkv + h] = the chunk token of the c-th
//! flagged key (c < V(n)), visible_through[(first + i) * Hkv + h] = V(i + 1), the flagged keys
//! among chunk tokens 0 .. i. Each thread counts a run of kPrefillCompactRun consecutive tokens,
//! one block-wide prefix sum per 4096 tokens ranks the runs, and each thread then writes its run.
KVC_GLOBAL void __launch_bounds__(kPrefillCompactThreads)
    prefill_compact_kernel(PrefillPlanArgs const a) {
  __shared__ BlockScratch scratch;
  int const b = static_cast<int>(blockIdx.x);
  int const h = static_cast<int>(blockIdx.y);
  int const hkv = a.num_kv_heads;
  int first, n;
  prefill_row_tokens(a, b, first, n);
  long long running = 0;
  for (int base = 0; base < n; base += kPrefillCompactThreads * kPrefillCompactRun) {
    int const i0 = base + static_cast<int>(threadIdx.x) * kPrefillCompactRun;
    unsigned flags = 0;  // bit r: token i0 + r is flagged
#pragma unroll
    for (int r = 0; r < kPrefillCompactRun; ++r) {
      int const i = i0 + r;
      if (i < n && a.mask[static_cast<long long>(first + i) * hkv + h] != 0) flags |= 1u << r;
    }
    long long total = 0;
    long long rank = running + block_exclusive_sum(__popc(flags), total, scratch);
#pragma unroll
    for (int r = 0; r < kPrefillCompactRun; ++r) {
      int const i = i0 + r;
      if (i >= n) break;
      long long const at = static_cast<long long>(first + i) * hkv + h;
      if ((flags >> r) & 1u) {
        a.ws.visible_index[(first + rank) * hkv + h] = i;
        ++rank;
      }
      a.ws.visible_through[at] = static_cast<int>(rank);
    }
    running += total;
  }
}

}  // namespace kvc::detail
