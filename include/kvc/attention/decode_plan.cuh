//! @file
//! Work distribution of decode attention, planned on the device: the workspace layout and a
//! one-block plan kernel that reads every (row, KV head) length, picks a chunk size from the
//! total, splits long heads into equal chunks and writes a flat work list ordered by chunk size
//! (largest first) for the persistent attention kernel. No host work grows with batch x heads
//! and nothing goes back to the host.
//!
//! Chunking. T = sum of lengths, P = persistent grid (CTAs), W = waves (<= kTargetWaves), M =
//! min_chunk (a multiple of kChunkQuantum). The chunk bound is
//!   C = max(M, roundup(ceil(T / (W * P)), kChunkQuantum)).
//! A head of length L > 0 gets n0 = min(ceil(L / C), kMaxSplits) chunks of equal size
//! cs = roundup(ceil(L / n0), kChunkQuantum) (the last one shorter), n = ceil(L / cs) <= n0.
//! Hence: work items <= T / C + heads <= kTargetWaves * P + heads, and partial records (only
//! heads with n >= 2, where L > C) <= 2 T / C <= 2 * kTargetWaves * P. Both capacities are fixed
//! by (heads, P) alone, so the workspace size never depends on the lengths.
//! Chunk boundaries are multiples of kChunkQuantum slots, so every tile but a head's last is
//! full and page-aligned for page sizes dividing kChunkQuantum.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kvc/attention/decode_primitives.cuh"
#include "kvc/attention/decode_trace.cuh"
#include "kvc/core/block_reduce.cuh"
#include "kvc/core/macros.hpp"

namespace kvc::detail {

inline constexpr int kChunkQuantum = 64;   //!< chunk sizes and boundaries are multiples of this
inline constexpr int kMaxSplits = 64;      //!< most chunks one head is split into
inline constexpr int kTargetWaves = 4;     //!< most chunks per CTA the plan may aim for
// Defaults measured on an H200 (benchmarks/RESULTS.md, 2026-12-03): one chunk per CTA and
// chunks of at least 256 slots beat 4 waves of 64-slot chunks on every GQA shape, on DMC mixes
// under GQA and on small batches (fewer split-KV merges and item epilogues), tie on dense MHA,
// and lose on heavily ragged MHA (DMC mix B at 32/32 heads: 216 against 192 us), where the finer
// split balances the CTAs better; DecodeParams::split chooses per call.
inline constexpr int kDefaultWaves = 1;       //!< chunks per CTA aimed for by default
inline constexpr int kDefaultMinChunk = 256;  //!< smallest chunk by default (slots)
// The default schedule is greedy from this many work items per CTA on (snake below): on an
// H200 greedy took DMC mixes under MHA (2048 heads over 264 CTAs) from 87 % to 93 % (mix A) and
// 73 % to 84 % (mix B) of the read bandwidth and was 3 % slower on GQA mixes of about 2 items
// per CTA (benchmarks/RESULTS.md, 2026-12-03).
inline constexpr int kGreedyItemsPerCta = 3;
//! SplitPolicy::schedule values the kernels test for (0: the default, 1: snake; see
//! DecodeParams).
inline constexpr int kScheduleGreedy = 2;
inline constexpr int kScheduleBalanced = 3;
inline constexpr int kPlanThreads = 1024;  //!< the plan kernel's single block

//! One unit of work: slots [begin, end) of one (batch row, KV head). 32 bytes.
struct alignas(16) DecodeWorkItem {
  int head;        //!< row * num_kv_heads + kv_head (the output's head group)
  int cache_head;  //!< seq_slot * num_kv_heads + kv_head (row of lengths / page_table)
  int begin;       //!< first slot
  int end;         //!< one past the last slot
  int chunk;       //!< index of this chunk within the head
  int num_chunks;  //!< chunks of the head (1: the item writes the output itself)
  int partial;     //!< first partial record of the head (num_chunks > 1)
  int length;      //!< slots of the head
};

//! Device pointers into the caller's workspace.
struct DecodeWorkspace {
  int* counters = nullptr;            //!< [4]: work items, empty heads, greedy claims, CTAs used
  int* head_length = nullptr;         //!< [heads] clamped lengths (plan scratch)
  int* arrivals = nullptr;            //!< [heads] finished chunks per head (zeroed by the plan)
  int* empty_heads = nullptr;         //!< [heads] heads of length 0
  int* cta_first = nullptr;           //!< [grid] balanced schedule: first item of each CTA
  DecodeWorkItem* items = nullptr;    //!< [item_capacity]
  float* partial_out = nullptr;       //!< [partial_capacity, G, D] normalised partial outputs
  float* partial_lse = nullptr;       //!< [partial_capacity, G] partial LSE (log2 units)
  int item_capacity = 0;
  int partial_capacity = 0;
};

//! Byte layout of the workspace for (heads, G, D, grid). Host and device.
struct DecodeWorkspaceLayout {
  std::size_t counters = 0, head_length = 0, arrivals = 0, empty_heads = 0, cta_first = 0, items = 0;
  std::size_t partial_out = 0, partial_lse = 0, bytes = 0;
  int item_capacity = 0;
  int partial_capacity = 0;

  static KVC_HOST_DEVICE std::size_t align(std::size_t offset) { return (offset + 255) / 256 * 256; }

  static KVC_HOST_DEVICE DecodeWorkspaceLayout make(int num_heads, int group_size, int head_dim, int grid) {
    DecodeWorkspaceLayout layout;
    std::size_t const heads = static_cast<std::size_t>(num_heads);
    layout.item_capacity = kTargetWaves * grid + num_heads;
    layout.partial_capacity = 2 * kTargetWaves * grid;
    std::size_t offset = 0;
    layout.counters = offset;
    offset = align(offset + 4 * sizeof(int));
    layout.head_length = offset;
    offset = align(offset + heads * sizeof(int));
    layout.arrivals = offset;
    offset = align(offset + heads * sizeof(int));
    layout.empty_heads = offset;
    offset = align(offset + heads * sizeof(int));
    layout.cta_first = offset;
    offset = align(offset + static_cast<std::size_t>(grid) * sizeof(int));
    layout.items = offset;
    offset = align(offset + static_cast<std::size_t>(layout.item_capacity) * sizeof(DecodeWorkItem));
    layout.partial_out = offset;
    std::size_t const records = static_cast<std::size_t>(layout.partial_capacity) * group_size;
    offset = align(offset + records * head_dim * sizeof(float));
    layout.partial_lse = offset;
    offset = align(offset + records * sizeof(float));
    layout.bytes = offset;
    return layout;
  }

  KVC_HOST_DEVICE DecodeWorkspace carve(void* base) const {
    char* bytes_base = static_cast<char*>(base);
    DecodeWorkspace ws;
    ws.counters = reinterpret_cast<int*>(bytes_base + counters);
    ws.head_length = reinterpret_cast<int*>(bytes_base + head_length);
    ws.arrivals = reinterpret_cast<int*>(bytes_base + arrivals);
    ws.empty_heads = reinterpret_cast<int*>(bytes_base + empty_heads);
    ws.cta_first = reinterpret_cast<int*>(bytes_base + cta_first);
    ws.items = reinterpret_cast<DecodeWorkItem*>(bytes_base + items);
    ws.partial_out = reinterpret_cast<float*>(bytes_base + partial_out);
    ws.partial_lse = reinterpret_cast<float*>(bytes_base + partial_lse);
    ws.item_capacity = item_capacity;
    ws.partial_capacity = partial_capacity;
    return ws;
  }
};

//! Arguments of the plan kernel.
struct DecodePlanArgs {
  std::int32_t const* lengths = nullptr;    //!< [max_seqs, num_kv_heads]
  std::int32_t const* seq_slots = nullptr;  //!< [batch] or null (row b is slot b)
  int batch = 0;
  int num_kv_heads = 0;
  int max_seqs = 0;
  int max_length = 0;  //!< max_pages_per_head * page_size: lengths are clamped to [0, max_length]
  int grid = 0;        //!< CTAs of the persistent attention kernel
  int waves = kDefaultWaves;         //!< chunks per CTA aimed for, 1..kTargetWaves
  int min_chunk = kDefaultMinChunk;  //!< smallest chunk, a multiple of kChunkQuantum
  bool balanced = false;             //!< kScheduleBalanced: contiguous equal shares per CTA
  DecodeWorkspace ws{};
};

//! Sequence slot of batch row `row`, or -1 for an inactive row.
KVC_DEVICE int decode_seq_of_row(DecodePlanArgs const& a, int row) {
  int const seq = a.seq_slots != nullptr ? a.seq_slots[row] : row;
  return seq >= 0 && seq < a.max_seqs ? seq : -1;
}

//! Slots of head `head` (row * num_kv_heads + kv_head), clamped to [0, max_length]; 0 for an
//! inactive row.
KVC_DEVICE int decode_head_length(DecodePlanArgs const& a, int head) {
  int const row = head / a.num_kv_heads;
  int const seq = decode_seq_of_row(a, row);
  if (seq < 0) return 0;
  int const length = a.lengths[static_cast<long long>(seq) * a.num_kv_heads + (head - row * a.num_kv_heads)];
  return length < 0 ? 0 : (length > a.max_length ? a.max_length : length);
}

//! Chunk size and count of a head of `length` > 0 slots under the chunk bound `chunk`.
//! 32-bit unsigned arithmetic: length < 2^31 and chunk <= 2^30.
KVC_DEVICE void decode_split(int length, int chunk, int& chunk_size, int& num_chunks) {
  unsigned const n = static_cast<unsigned>(length);
  unsigned const c = static_cast<unsigned>(chunk);
  unsigned n0 = n / c + (n % c != 0u ? 1u : 0u);
  if (n0 > static_cast<unsigned>(kMaxSplits)) n0 = kMaxSplits;
  unsigned size = n / n0 + (n % n0 != 0u ? 1u : 0u);
  size = (size + kChunkQuantum - 1) / kChunkQuantum * kChunkQuantum;
  chunk_size = static_cast<int>(size);
  num_chunks = static_cast<int>(n / size + (n % size != 0u ? 1u : 0u));
}

//! Bucket of a chunk size (floor(log2)); items are listed from the largest bucket down.
KVC_DEVICE int decode_bucket(int chunk_size) { return 31 - __clz(chunk_size); }

//! Balanced plan (SplitPolicy::schedule 3). The heads' kChunkQuantum-slot quanta, in head order,
//! form one sequence of Q quanta; CTA c takes quanta [c * S, (c + 1) * S) with
//!   S = max(ceil(Q / P), ceil(longest head / (kMaxSplits - 1)), min_chunk / kChunkQuantum),
//! so every CTA but the last reads the same number of slots (up to the last quantum of a head).
//! A head crossing a CTA boundary is cut there (at most kMaxSplits pieces, merged as any split
//! head); items are listed in head order, so CTA c's items are items [cta_first[c],
//! cta_first[c + 1]) (the last used CTA: up to the item count). Writes counters (items, empty
//! heads, 0, CTAs used), head_length, arrivals (zeroed), empty_heads, cta_first and items.
//! Items <= heads + P - 1 and partial records <= 2 (P - 1): within the workspace capacities.
KVC_DEVICE void decode_plan_balanced(DecodePlanArgs const& a) {
  __shared__ BlockScratch scratch;
  __shared__ long long warp_max[kPlanThreads / 32];
  __shared__ int empty_count;
  __shared__ int partial_count;
  int const tid = static_cast<int>(threadIdx.x);
  int const num_heads = a.batch * a.num_kv_heads;
  if (tid == 0) {
    empty_count = 0;
    partial_count = 0;
  }

  // Pass 1: lengths, total quanta and the longest head.
  long long local_total = 0;
  long long local_max = 0;
  for (int head = tid; head < num_heads; head += kPlanThreads) {
    int const length = decode_head_length(a, head);
    a.ws.head_length[head] = length;  // re-read below by this same thread
    long long const quanta = (length + kChunkQuantum - 1) / kChunkQuantum;
    local_total += quanta;
    local_max = quanta > local_max ? quanta : local_max;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    long long const other = __shfl_xor_sync(0xffffffffu, local_max, offset);
    local_max = other > local_max ? other : local_max;
  }
  if ((tid & 31) == 0) warp_max[tid >> 5] = local_max;
  long long total = 0;
  (void)block_exclusive_sum(local_total, total, scratch);  // syncs: warp_max is visible after
  long long longest = 0;
#pragma unroll 4
  for (int w = 0; w < kPlanThreads / 32; ++w) longest = warp_max[w] > longest ? warp_max[w] : longest;
  long long share = (total + a.grid - 1) / a.grid;
  long long const split_bound = (longest + kMaxSplits - 2) / (kMaxSplits - 1);
  long long const min_share = a.min_chunk / kChunkQuantum;
  share = share > split_bound ? share : split_bound;
  share = share > min_share ? share : min_share;
  share = share > 0 ? share : 1;

  // Pass 2: pieces per head (two block scans per round of kPlanThreads heads), the items and
  // the CTAs' first items.
  long long quanta_before = 0;
  long long items_before = 0;
  for (int base = 0; base < num_heads; base += kPlanThreads) {  // uniform: scans inside
    int const head = base + tid;
    int const length = head < num_heads ? a.ws.head_length[head] : 0;
    long long const quanta = (length + kChunkQuantum - 1) / kChunkQuantum;
    long long round_quanta = 0;
    long long const start = quanta_before + block_exclusive_sum(quanta, round_quanta, scratch);
    quanta_before += round_quanta;
    long long const first_cta = start / share;
    int const pieces = length > 0 ? static_cast<int>((start + quanta - 1) / share - first_cta + 1) : 0;
    long long round_items = 0;
    long long const item0 = items_before + block_exclusive_sum(pieces, round_items, scratch);
    items_before += round_items;
    if (head >= num_heads) continue;
    a.ws.arrivals[head] = 0;
    if (length == 0) {
      a.ws.empty_heads[atomicAdd(&empty_count, 1)] = head;
      continue;
    }
    int const row = head / a.num_kv_heads;
    int const kv_head = head - row * a.num_kv_heads;
    DecodeWorkItem item;
    item.head = head;
    item.cache_head = decode_seq_of_row(a, row) * a.num_kv_heads + kv_head;
    item.num_chunks = pieces;
    item.partial = pieces > 1 ? atomicAdd(&partial_count, pieces) : 0;
    item.length = length;
    for (int j = 0; j < pieces; ++j) {
      long long const cta = first_cta + j;
      long long const begin = cta * share > start ? cta * share : start;
      long long const end = (cta + 1) * share < start + quanta ? (cta + 1) * share : start + quanta;
      item.begin = static_cast<int>((begin - start) * kChunkQuantum);
      long long const end_slot = (end - start) * kChunkQuantum;
      item.end = end_slot < length ? static_cast<int>(end_slot) : length;
      item.chunk = j;
      a.ws.items[item0 + j] = item;
      if (begin == cta * share) a.ws.cta_first[cta] = static_cast<int>(item0 + j);
    }
  }
  __syncthreads();
  if (tid == 0) {
    a.ws.counters[0] = static_cast<int>(items_before);
    a.ws.counters[1] = empty_count;
    a.ws.counters[2] = 0;
    a.ws.counters[3] = static_cast<int>((total + share - 1) / share);
    KVC_DECODE_TRACE_PLAN_END();
  }
}

//! One block of kPlanThreads threads. Writes counters, head_length, arrivals (zeroed),
//! empty_heads and items. Item order within a bucket depends on atomics; results do not (a
//! head's partials are indexed by chunk and merged in chunk order).
KVC_GLOBAL void __launch_bounds__(kPlanThreads) decode_plan_kernel(DecodePlanArgs const a) {
  __shared__ long long warp_totals[kPlanThreads / 32];
  __shared__ int bucket_count[32];
  __shared__ int bucket_cursor[32];
  __shared__ int empty_count;
  __shared__ int partial_count;

  // The attention kernel may be scheduled now; its griddepcontrol.wait still waits for this
  // whole grid to finish and flush.
  grid_dependency_launch_dependents();
  // Launched with programmatic dependent launch, this block may start while the stream's
  // previous kernel still runs (the previous call's attention reading this workspace, or the
  // engine's update kernel writing the lengths): nothing is read or written before it is done.
  grid_dependency_wait();

  int const tid = static_cast<int>(threadIdx.x);
  if (tid == 0) KVC_DECODE_TRACE_PLAN_START();
  if (a.balanced) {
    decode_plan_balanced(a);
    return;
  }
  int const num_heads = a.batch * a.num_kv_heads;
  if (tid < 32) bucket_count[tid] = 0;
  if (tid == 0) {
    empty_count = 0;
    partial_count = 0;
  }

  // Pass 1: lengths and their total.
  long long local_total = 0;
  for (int head = tid; head < num_heads; head += kPlanThreads) {
    int const length = decode_head_length(a, head);
    a.ws.head_length[head] = length;  // re-read below by this same thread
    local_total += length;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    local_total += __shfl_xor_sync(0xffffffffu, local_total, offset);
  }
  if ((tid & 31) == 0) warp_totals[tid >> 5] = local_total;
  __syncthreads();
  long long total = 0;
#pragma unroll 4
  for (int w = 0; w < kPlanThreads / 32; ++w) total += warp_totals[w];
  long long const target_items = static_cast<long long>(a.waves) * a.grid;
  long long chunk_bound = (total + target_items - 1) / target_items;
  chunk_bound = (chunk_bound + kChunkQuantum - 1) / kChunkQuantum * kChunkQuantum;
  if (chunk_bound < a.min_chunk) chunk_bound = a.min_chunk;
  if (chunk_bound > (1ll << 30)) chunk_bound = 1ll << 30;  // > any length: one chunk per head
  int const chunk = static_cast<int>(chunk_bound);

  // Pass 2: items per chunk-size bucket.
  for (int head = tid; head < num_heads; head += kPlanThreads) {
    int const length = a.ws.head_length[head];
    if (length == 0) continue;
    int chunk_size, num_chunks;
    decode_split(length, chunk, chunk_size, num_chunks);
    atomicAdd(&bucket_count[decode_bucket(chunk_size)], num_chunks);
  }
  __syncthreads();
  if (tid == 0) {
    int offset = 0;
    for (int bucket = 31; bucket >= 0; --bucket) {
      bucket_cursor[bucket] = offset;
      offset += bucket_count[bucket];
    }
    a.ws.counters[0] = offset;
    a.ws.counters[2] = 0;  // next item of the greedy schedule (SplitPolicy::schedule)
  }
  __syncthreads();

  // Pass 3: the work list, partial records, arrival counters, empty heads.
  for (int head = tid; head < num_heads; head += kPlanThreads) {
    a.ws.arrivals[head] = 0;
    int const length = a.ws.head_length[head];
    if (length == 0) {
      a.ws.empty_heads[atomicAdd(&empty_count, 1)] = head;
      continue;
    }
    int const row = head / a.num_kv_heads;
    int const kv_head = head - row * a.num_kv_heads;
    int const seq = decode_seq_of_row(a, row);
    int chunk_size, num_chunks;
    decode_split(length, chunk, chunk_size, num_chunks);
    int const position = atomicAdd(&bucket_cursor[decode_bucket(chunk_size)], num_chunks);
    int const partial = num_chunks > 1 ? atomicAdd(&partial_count, num_chunks) : 0;
    DecodeWorkItem item;
    item.head = head;
    item.cache_head = seq * a.num_kv_heads + kv_head;
    item.num_chunks = num_chunks;
    item.partial = partial;
    item.length = length;
    for (int c = 0; c < num_chunks; ++c) {
      item.begin = c * chunk_size;
      long long const end = static_cast<long long>(c + 1) * chunk_size;
      item.end = end < length ? static_cast<int>(end) : length;
      item.chunk = c;
      a.ws.items[position + c] = item;
    }
  }
  __syncthreads();
  if (tid == 0) {
    a.ws.counters[1] = empty_count;
    KVC_DECODE_TRACE_PLAN_END();
  }
}

}  // namespace kvc::detail
