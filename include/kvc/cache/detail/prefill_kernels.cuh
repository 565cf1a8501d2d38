//! @file
//! Kernels of the store-side parallel prefill (kvc/cache/prefill.cuh): the page allocation of a
//! batch of prompt chunks for all layers (one launch, no device->host round trip), the per-layer
//! prepare (RoPE of q and k, DMC decisions, omegas and window-truncated partial means, the DMC
//! mask and prefix lengths), the sequential partial-mean scan of DMC's unbounded (paper) mode, and
//! the per-layer commit (write the kept slots, seed DMC's decode state, fold H2O/TOVA scores and
//! cut to the budget). Every kernel after the allocation does nothing when the step report says
//! the prefill was refused. The maths is the shared code of kvc/policy/ and kvc/core/rope.hpp,
//! called in the order of the CPU reference (kvc/reference/dmc.hpp dmc_prefill, h2o_prefill,
//! tova_prefill). See docs/prefill.md.
#pragma once

#include <cstdint>
#include <cstring>

#include "kvc/cache/detail/allocator_kernels.cuh"
#include "kvc/cache/detail/block_scan.cuh"
#include "kvc/cache/detail/rope_rows.hpp"
#include "kvc/cache/detail/update_kernel.cuh"
#include "kvc/cache/step_report.hpp"
#include "kvc/cache/store_layout.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/macros.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/policy/dmc.hpp"
#include "kvc/policy/eviction.hpp"
#include "kvc/policy/h2o.hpp"
#include "kvc/policy/kind.hpp"
#include "kvc/policy/tova.hpp"

namespace kvc::detail {

//! Threads per block of the prefill allocation kernel.
inline constexpr int kPrefillAllocThreads = 512;
//! Page grants a thread of the prefill allocation kernel loads before it stores them.
inline constexpr int kPrefillAllocBatch = 8;
//! Threads per block of the prepare and commit kernels.
inline constexpr int kPrefillThreads = 256;
//! Chunk tokens per block of the prepare kernel.
inline constexpr int kPrefillTile = 16;
//! Largest head dim of the prefill kernels (the prefill attention's largest, too).
inline constexpr int kPrefillMaxHeadDim = 256;

//! Device scratch of one prefill layer call (carved from the caller's workspace by prefill.cuh).
//! N = total tokens, B = batch, S = score stride (budget + max chunk), K = budget.
struct PrefillBuffers {
  void* q_att = nullptr;              //!< [N, Hq, D] T: the q attention uses
  void* k_att = nullptr;              //!< [N, Hkv, D] T: RoPE'd keys (DMC: of partial means)
  void* v_att = nullptr;              //!< [N, Hkv, D] T: DMC partial means of v (else null)
  float* rope = nullptr;              //!< [N, D/2, 2] cos, sin of every pair at each position
  std::uint8_t* merge = nullptr;      //!< [N, Hkv] DMC alpha of every chunk token
  std::uint8_t* visible = nullptr;    //!< [N, Hkv] DMC chunk_key_visible (and "kept")
  float* omega = nullptr;             //!< [N, Hkv] DMC omega of every chunk token
  std::int32_t* prefix = nullptr;     //!< [B, Hkv] DMC prefix lengths
  std::int32_t* arrivals = nullptr;   //!< [B, Hkv] DMC commit blocks done per head
  std::int64_t* row_first = nullptr;  //!< [B] position of each row's chunk token 0
  float* seed_k = nullptr;            //!< [B, Hkv, D] DMC sums of P_{T-1} (k)
  float* seed_v = nullptr;            //!< [B, Hkv, D] DMC sums of P_{T-1} (v)
  float* seed_w = nullptr;            //!< [B, Hkv] DMC weight sum of P_{T-1}
  float* probs = nullptr;             //!< [B, Hq, S] attention's scores (H2O/TOVA)
  int stride = 0;                     //!< S
  float* cand_score = nullptr;        //!< [B, Hkv, S] H2O/TOVA candidate scores
  std::uint64_t* cand_key = nullptr;  //!< [B, Hkv, S] keep-order keys (0: not selectable)
  std::int32_t* cand_rank = nullptr;  //!< [B, Hkv, S] kept existing slots: rank by position
  void* stage_k = nullptr;            //!< [B, Hkv, K, D] T: kept existing slots, staged
  void* stage_v = nullptr;            //!< [B, Hkv, K, D] T
  std::int32_t* stage_pos = nullptr;  //!< [B, Hkv, K]
  float* stage_score = nullptr;       //!< [B, Hkv, K]
};

//! Arguments of every per-layer prefill kernel.
template <class T>
struct PrefillKernelParams {
  StoreArrays arrays;
  StoreDims dims;
  T const* q = nullptr;                     // [N, Hq, D] pre-RoPE
  T const* k = nullptr;                     // [N, Hkv, D] pre-RoPE
  T const* v = nullptr;                     // [N, Hkv, D]
  std::int32_t const* seq_slots = nullptr;  // [batch]
  std::int32_t const* cu_tokens = nullptr;  // [batch + 1]
  int batch = 0;
  int total_tokens = 0;  // N (rows of q / k / v)
  int max_chunk = 0;
  int layer = 0;
  RopeConfig rope{};
  PolicyConfig policy{};
  PrefillBuffers buf{};
  int commit_split =
      0;  // DMC: chunk tokens per commit block (grid z), a multiple of kPrefillThreads
};

//! Slots a head needs after a prefill chunk of `tokens` on top of `length` (DMC: the worst case,
//! one slot per token; H2O/TOVA: at most the budget).
KVC_HOST_DEVICE std::int64_t prefill_slots_needed(PolicyKind kind, int budget, int length,
                                                  int tokens) {
  std::int64_t const all = static_cast<std::int64_t>(length) + tokens;
  if (kind == PolicyKind::kH2O || kind == PolicyKind::kTova) {
    return all < budget ? all : (length > budget ? length : budget);
  }
  return all;
}

//! Arguments of prefill_allocate_kernel.
struct PrefillAllocParams {
  StoreArrays arrays;
  StoreDims dims;
  std::int32_t const* seq_slots = nullptr;  // [batch]
  std::int32_t const* cu_tokens = nullptr;  // [batch + 1]
  int batch = 0;
  int total_tokens = 0;
  int max_chunk = 0;
  PolicyKind kind = PolicyKind::kFull;
  int budget = 0;
  int first_layer = 0;  // the layers prepared: first_layer .. first_layer + num_layers - 1
  int num_layers = 0;
};

//! One block per batch row: checks the row (active slot, a chunk length in [0, max_chunk] inside
//! [0, total_tokens]), then for every (layer, KV head) of the row's sequence in the prepared
//! layers takes the pages that prefill_slots_needed asks for from the free stack (one
//! compare-and-swap per chunk of heads; a head's pages are consecutive ranks of a block-wide prefix
//! sum of the demands, and the page-table entries of all heads of a chunk are written by all the
//! block's threads, each finding its entry's head by a binary search over the ranks). The last
//! block folds the rows into the step report, as prepare_step_kernel does. Pages granted to a row
//! that still fails stay with their heads (spare capacity, as in a refused decode step).
KVC_GLOBAL void __launch_bounds__(kPrefillAllocThreads)
    prefill_allocate_kernel(PrefillAllocParams const p) {
  __shared__ BlockScratch scratch;
  __shared__ int first_grant[kPrefillAllocThreads];        // each thread's exclusive rank
  __shared__ std::int64_t table_at[kPrefillAllocThreads];  // its head's first new table entry
  __shared__ int row_flags;
  __shared__ int row_short;
  __shared__ int grant_base;
  __shared__ int grant_count;
  __shared__ bool last_block;
  StoreArrays const& a = p.arrays;
  StoreDims const& dims = p.dims;
  int const row = blockIdx.x;
  int const seq = p.seq_slots[row];
  int const begin = p.cu_tokens[row];
  int const end = p.cu_tokens[row + 1];
  int const tokens = end - begin;
  bool const chunk_ok = begin >= 0 && tokens >= 0 && tokens <= p.max_chunk && end <= p.total_tokens;
  bool const valid = chunk_ok && seq >= 0 && seq < dims.max_seqs && a.active[seq] != 0;
  if (threadIdx.x == 0) {
    row_flags = valid ? kStepRowOk : kStepRowInvalidSequence;
    row_short = 0;
  }
  __syncthreads();
  if (valid && tokens > 0) {
    int const heads = p.num_layers * dims.num_kv_heads;
    for (int first = 0; first < heads; first += blockDim.x) {
      int const index = first + static_cast<int>(threadIdx.x);
      int demand = 0;
      std::int64_t head = 0;
      int count = 0;
      if (index < heads) {
        head = dims.head_index(p.first_layer + index / dims.num_kv_heads, seq,
                               index % dims.num_kv_heads);
        int const length = a.lengths[head];
        count = a.page_counts[head];
        std::int64_t const slots = prefill_slots_needed(p.kind, p.budget, length, tokens);
        std::int64_t const pages = (slots + dims.page_size - 1) / dims.page_size;
        if (pages > count) {
          if (pages > dims.max_pages_per_head) {
            atomicOr(&row_flags, kStepRowHeadFull);
          } else {
            demand = static_cast<int>(pages - count);
          }
        }
      }
      long long total = 0;
      int const rank = static_cast<int>(block_exclusive_sum(demand, total, scratch));
      if (total == 0) continue;  // uniform across the block
      if (threadIdx.x == 0) {
        int base = 0;
        grant_count = pop_pages(a.free_count, static_cast<int>(total), base);
        grant_base = base;
      }
      first_grant[threadIdx.x] = rank;
      table_at[threadIdx.x] = head * dims.max_pages_per_head + count;
      __syncthreads();
      // Grant e (e < grant_count) goes to the last thread whose rank is <= e: a thread without
      // demand shares its rank with the next thread, so the last one is the one that asked.
      // kPrefillAllocBatch grants per thread at a time: their pages are all loaded before any
      // table entry is stored, so the loads are in flight together (one block writes every entry
      // of its row: at 1 x 4096 tokens, 32 heads, 8192 of them).
      int const grants = static_cast<int>(total < grant_count ? total : grant_count);
      int const stride = static_cast<int>(blockDim.x);
      for (int e0 = threadIdx.x; e0 < grants; e0 += kPrefillAllocBatch * stride) {
        std::int32_t page[kPrefillAllocBatch];
        std::int64_t entry[kPrefillAllocBatch];
#pragma unroll
        for (int j = 0; j < kPrefillAllocBatch; ++j) {
          int const e = e0 + j * stride;
          if (e >= grants) continue;
          page[j] = a.free_stack[grant_base + e];
          int low = 0;
          int high = stride - 1;
          while (low < high) {
            int const mid = (low + high + 1) / 2;
            if (first_grant[mid] <= e) {
              low = mid;
            } else {
              high = mid - 1;
            }
          }
          entry[j] = table_at[low] + (e - first_grant[low]);
        }
#pragma unroll
        for (int j = 0; j < kPrefillAllocBatch; ++j) {
          if (e0 + j * stride < grants) a.page_table[entry[j]] = page[j];
        }
      }
      if (demand > 0) {
        int const left = grant_count - rank;
        int const taken = left <= 0 ? 0 : (left < demand ? left : demand);
        if (taken > 0) a.page_counts[head] = count + taken;
        if (taken < demand) atomicAdd(&row_short, demand - taken);
      }
      __syncthreads();  // grant_*, first_grant and table_at are rewritten by the next chunk
    }
  }
  fold_step_report(a, row, p.batch, row_flags, row_short, last_block, scratch);
}

//! What a per-layer prefill block knows about its batch row.
struct PrefillRow {
  int seq = -1;
  int begin = 0;           //!< first packed token of the chunk
  int tokens = 0;          //!< chunk length T
  std::int64_t first = 0;  //!< position of chunk token 0 (tokens seen before the chunk)
};

//! The row's chunk and sequence; false when the block has nothing to do (refused prefill, bad
//! slot, empty chunk).
template <class T>
KVC_DEVICE bool prefill_row(PrefillKernelParams<T> const& p, int row, PrefillRow& out) {
  StoreArrays const& a = p.arrays;
  if (a.report->failed != 0) return false;
  out.seq = p.seq_slots[row];
  if (out.seq < 0 || out.seq >= p.dims.max_seqs) return false;
  out.begin = p.cu_tokens[row];
  out.tokens = p.cu_tokens[row + 1] - out.begin;
  out.first = a.tokens_seen[p.dims.layer_seq(p.layer, out.seq)];
  return out.tokens > 0;
}

//! The attention of a step still runs when the step was refused (it cannot read the report):
//! gives it defined inputs for block (tile, row) of the prepare grid, so that it never reads
//! workspace the step did not write: DMC prefix lengths 0, and the tile's queries, keys (DMC:
//! values and mask too) zeroed. Its outputs are then finite but meaningless (docs/paged_store.md).
//! Rows whose chunk bounds are invalid (the step is refused for them) are left alone: the
//! attention clamps them itself.
template <class T>
KVC_DEVICE void prefill_refused_inputs(PrefillKernelParams<T> const& p, int row) {
  int const hq = p.dims.num_q_heads;
  int const hkv = p.dims.num_kv_heads;
  int const d = p.dims.head_dim;
  if (blockIdx.x == 0 && p.buf.prefix != nullptr) {
    for (int h = threadIdx.x; h < hkv; h += blockDim.x) {
      p.buf.prefix[static_cast<std::int64_t>(row) * hkv + h] = 0;
    }
  }
  int const begin = p.cu_tokens[row];
  int const end = p.cu_tokens[row + 1];
  if (begin < 0 || end < begin || end - begin > p.max_chunk || end > p.total_tokens) return;
  int const t0 = begin + static_cast<int>(blockIdx.x) * kPrefillTile;
  int const t1 = min(end, t0 + kPrefillTile);
  if (t0 >= t1) return;
  // Rows t0 .. t1 - 1 of `array` ([N, row_elements] of `zero`'s type) set to `zero`.
  auto clear = [&](auto* array, int row_elements, auto zero) {
    if (array == nullptr) return;
    auto* const base = array + static_cast<std::int64_t>(t0) * row_elements;
    std::int64_t const count = static_cast<std::int64_t>(t1 - t0) * row_elements;
    for (std::int64_t i = threadIdx.x; i < count; i += blockDim.x) base[i] = zero;
  };
  T const zero = DTypeTraits<T>::from_float(0.0f);
  clear(static_cast<T*>(p.buf.q_att), hq * d, zero);
  clear(static_cast<T*>(p.buf.k_att), hkv * d, zero);
  clear(static_cast<T*>(p.buf.v_att), hkv * d, zero);
  clear(p.buf.visible, hkv, std::uint8_t{0});
}

//! Copies `rows` K/V rows into slots of one head with 16-byte vectors spread over the block's
//! threads: row r (r < rows) is read at element offset source_of(r) of k_src / v_src and written
//! to slot slot_of(r) (nothing when that is negative); on_row(r, slot_row) runs once per copied
//! row, by the thread that copies its first vector (positions, scores). Rows are whole 16-byte
//! vectors: head_dim * sizeof(T) is a multiple of 16 for every supported head dim. Each thread
//! loads kCopyBatch vectors of K and of V (and their slot rows) before it stores any, so their
//! loads are in flight together.
template <class T, class SlotOf, class SourceOf, class OnRow>
KVC_DEVICE void prefill_copy_rows(StoreArrays const& a, StoreDims const& dims,
                                  std::int32_t const* pages, int rows, T const* k_src,
                                  T const* v_src, SlotOf slot_of, SourceOf source_of,
                                  OnRow on_row) {
  constexpr int kCopyBatch = 4;
  int const vectors = dims.head_dim * static_cast<int>(sizeof(T)) / 16;  // per row
  int const total = rows * vectors;
  int const threads = static_cast<int>(blockDim.x);
  for (int step = threadIdx.x; step < total; step += kCopyBatch * threads) {
    uint4 key[kCopyBatch], value[kCopyBatch];
    std::int64_t target[kCopyBatch];  // the slot's row, or -1
    KVC_UNROLL
    for (int u = 0; u < kCopyBatch; ++u) {
      int const index = step + u * threads;
      target[u] = -1;
      if (index >= total) continue;
      int const r = index / vectors;
      int const c = index - r * vectors;
      int const slot = slot_of(r);
      if (slot < 0) continue;
      target[u] = dims.slot_row(pages, slot);
      std::int64_t const source = source_of(r);
      key[u] = reinterpret_cast<uint4 const*>(k_src + source)[c];
      value[u] = reinterpret_cast<uint4 const*>(v_src + source)[c];
    }
    KVC_UNROLL
    for (int u = 0; u < kCopyBatch; ++u) {
      if (target[u] < 0) continue;
      int const index = step + u * threads;
      int const r = index / vectors;
      int const c = index - r * vectors;
      reinterpret_cast<uint4*>(static_cast<T*>(a.k_pages) + target[u] * dims.head_dim)[c] = key[u];
      reinterpret_cast<uint4*>(static_cast<T*>(a.v_pages) + target[u] * dims.head_dim)[c] =
          value[u];
      if (c == 0) on_row(r, target[u]);
    }
  }
}

//! Full, H2O and TOVA, in the prepare kernel, when k takes the vector path of rope_rows_share
//! (rope_rows_vectorised): rotates the keys of chunk tokens t0 .. t0 + count - 1, KV heads
//! h0 .. h1 - 1, into k_att (rope_rotate_unit: the reference's arithmetic). With `slot_rows`
//! (Full: [count, h1 - h0], each token's slot row, -1 past the head's pages) it also writes each
//! rotated key, its value and its position into the token's slot, from the registers that hold
//! them: the keys are not read back, and the values' loads are in flight with the keys'. The
//! heads' lengths do not change here (the commit kernel sets them after the attention), so the
//! slots stay invisible until then and a refused or failed step shows nothing. kBatch units per
//! thread are loaded before any is stored.
template <class T, class AngleOf>
KVC_DEVICE void prefill_rope_keys_tile(PrefillKernelParams<T> const& p, PrefillRow const& rw,
                                       int t0, int count, int h0, int h1, AngleOf const& angle_of,
                                       std::int64_t const* slot_rows) {
  constexpr int kBatch = 1;
  using Vector = RopeVector<T>;
  StoreArrays const& a = p.arrays;
  int const d = p.dims.head_dim;
  int const hkv = p.dims.num_kv_heads;
  int const heads = h1 - h0;
  int const pairs = d / 2;
  RopeLayout const layout = p.rope.layout;
  bool const interleaved = layout == RopeLayout::kInterleaved;
  bool const write_slots = slot_rows != nullptr;
  int const per_head = rope_units_per_head<T>(d, layout);
  int const total = count * heads * per_head;
  int const row_stride = hkv * d;
  int const threads = static_cast<int>(blockDim.x);
  std::int64_t const first = (static_cast<std::int64_t>(rw.begin + t0) * hkv + h0) * d;
  T const* k_in = p.k + first;  // [count, Hkv, D] from head h0
  T const* v_in = p.v + first;
  T* k_out = static_cast<T*>(p.buf.k_att) + first;
  auto load = [](T const* at) { return *reinterpret_cast<Vector const*>(at); };
  auto store = [](T* at, Vector const& vector) { *reinterpret_cast<Vector*>(at) = vector; };
  for (int step = threadIdx.x; step < total; step += kBatch * threads) {
    Vector ka[kBatch], kb[kBatch], va[kBatch], vb[kBatch];
    KVC_UNROLL
    for (int u = 0; u < kBatch; ++u) {
      int const unit = step + u * threads;
      if (unit >= total) continue;
      int const at = rope_unit_at<T>(unit, per_head, heads, row_stride, d).offset;
      ka[u] = load(k_in + at);
      if (!interleaved) kb[u] = load(k_in + at + pairs);
      if (write_slots) {
        va[u] = load(v_in + at);
        if (!interleaved) vb[u] = load(v_in + at + pairs);
      }
    }
    KVC_UNROLL
    for (int u = 0; u < kBatch; ++u) {
      if (step + u * threads >= total) break;
      // Recomputed rather than kept from the loads: registers (the kernel is capped at 80).
      RopeUnit const unit = rope_unit_at<T>(step + u * threads, per_head, heads, row_stride, d);
      Vector oa, ob;
      rope_rotate_unit<T>(
          ka[u], kb[u], unit.dim0, d, -1, layout, [&](int dim) { return angle_of(unit.row, dim); },
          oa, ob);
      store(k_out + unit.offset, oa);
      if (!interleaved) store(k_out + unit.offset + pairs, ob);
      if (!write_slots) continue;
      std::int64_t const slot_row = slot_rows[unit.row * heads + unit.head];
      if (slot_row < 0) continue;
      T* const k_slot = static_cast<T*>(a.k_pages) + slot_row * d + unit.dim0;
      T* const v_slot = static_cast<T*>(a.v_pages) + slot_row * d + unit.dim0;
      store(k_slot, oa);
      store(v_slot, va[u]);
      if (!interleaved) {
        store(k_slot + pairs, ob);
        store(v_slot + pairs, vb[u]);
      }
      if (unit.dim0 == 0) {
        a.position_pages[slot_row] = static_cast<std::int32_t>(rw.first + t0 + unit.row);
      }
    }
  }
}

//! Full, in the prepare kernel: the slot row of chunk token t0 + i of KV head h (length + t0 + i;
//! -1 past the head's pages: the commit kernel reports the head as a protocol error).
template <class T>
KVC_DEVICE std::int64_t prefill_full_slot_row(PrefillKernelParams<T> const& p, PrefillRow const& rw,
                                              int h, int token) {
  StoreArrays const& a = p.arrays;
  std::int64_t const head = p.dims.head_index(p.layer, rw.seq, h);
  int const slot = a.lengths[head] + token;
  if (slot / p.dims.page_size >= a.page_counts[head]) return -1;
  return p.dims.slot_row(a.page_table + head * p.dims.max_pages_per_head, slot);
}

//! KV heads per block of the prepare kernel: the grid's third dimension splits a row's KV heads
//! into ranges of this many (one warp per KV head in the DMC part).
inline constexpr int kPrefillPrepareHeads = kPrefillThreads / 32;
//! Resident blocks per SM that the prepare kernel's launch bounds ask for: 3 caps both instances
//! at 80 registers, 24 warps per SM (before: Full/H2O/TOVA 112 and DMC 127 registers, 2 blocks,
//! 16 warps), with a few bytes spilled (Full: on the double-precision RoPE-angle path; DMC: 220
//! bytes). Measured on an H200 (benchmarks/RESULTS.md, 2026-12-04, fourth session), store side of a
//! prefill: Full 123 -> 112 us at 1 x 4096 tokens, 398 -> 349 us at 8 x 2048; DMC 273 -> 271 us and
//! 865 -> 816 us. 4 blocks (64 registers) gave Full nothing (124 / 400 us). Leaving the DMC
//! instance at an explicit 1 made ptxas take 130 registers, 1 block per SM: DMC 382 / 1294 us.
inline constexpr int kPrefillPrepareMinBlocks = 3;

//! Dynamic shared memory (bytes) of prefill_prepare_kernel.
inline std::size_t prefill_prepare_shared_bytes(StoreDims const& dims, int window) {
  std::size_t const d = static_cast<std::size_t>(dims.head_dim);
  std::size_t const span = static_cast<std::size_t>(kPrefillTile) + window + 1;
  std::size_t const warps = kPrefillThreads / 32;
  return sizeof(std::int64_t) * kPrefillTile * kPrefillPrepareHeads  // Full: the slot rows
         + sizeof(float) * (kPrefillTile * d                         // cos/sin of the tile
                            + warps * span)              // each warp's omegas of its decision span
         + sizeof(int) * warps * (span + kPrefillTile);  // its merges, oldest member per token
}

//! Grid of prefill_prepare_kernel: (tiles of kPrefillTile tokens, rows, KV head ranges).
inline dim3 prefill_prepare_grid(StoreDims const& dims, int batch, int max_chunk) {
  int const tiles = (max_chunk + kPrefillTile - 1) / kPrefillTile;
  int const ranges = (dims.num_kv_heads + kPrefillPrepareHeads - 1) / kPrefillPrepareHeads;
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(batch),
              static_cast<unsigned>(ranges));
}

//! kWidth elements of T at `source` as floats: one 16-byte vector when kWidth fills one, else
//! scalar loads.
template <class T, int kWidth>
KVC_DEVICE void prefill_load_floats(T const* source, float (&out)[kWidth]) {
  if constexpr (kWidth == RopeVector<T>::kSize) {
    RopeVector<T> const vector = *reinterpret_cast<RopeVector<T> const*>(source);
    KVC_UNROLL
    for (int m = 0; m < kWidth; ++m) out[m] = DTypeTraits<T>::to_float(vector.x[m]);
  } else {
    KVC_UNROLL
    for (int m = 0; m < kWidth; ++m) out[m] = DTypeTraits<T>::to_float(source[m]);
  }
}

//! kWidth floats as T at `target` (one 16-byte vector when kWidth fills one).
template <class T, int kWidth>
KVC_DEVICE void prefill_store_floats(T* target, float const (&in)[kWidth]) {
  if constexpr (kWidth == RopeVector<T>::kSize) {
    RopeVector<T> vector;
    KVC_UNROLL
    for (int m = 0; m < kWidth; ++m) vector.x[m] = DTypeTraits<T>::from_float(in[m]);
    *reinterpret_cast<RopeVector<T>*>(target) = vector;
  } else {
    KVC_UNROLL
    for (int m = 0; m < kWidth; ++m) target[m] = DTypeTraits<T>::from_float(in[m]);
  }
}

//! DMC with a window: lane `lane` of one warp's share of KV head h's partial means for the tile
//! tokens t0 .. t1 - 1 (oldest_s: each token's oldest window member; omega_s: the omegas of the
//! span from span_lo). P_i is summed from the oldest member, left to right (ring cells for
//! members before the chunk, then dmc_term of the chunk tokens), exactly as dmc_prefill does,
//! so it is bitwise the reference's. Writes v_att (the value means), k_att (the key means
//! RoPE'd, decision dim zeroed before and after) and, for the chunk's last token, the seed sums.
//! A unit is kWidth elements of each of two segments A and B whose pairs rotate together:
//! rotate-half (and kNone) A = dims [e W, e W + W), B = A + d/2, pairs (A[m], B[m]);
//! interleaved A = [2 e W, 2 e W + W), B = A + W, pairs of adjacent dims within A and within B
//! (for kWidth 1: the pair (A[0], B[0])).
template <class T, int kWidth, class AngleOf>
KVC_DEVICE void prefill_dmc_tile_means(PrefillKernelParams<T> const& p, PrefillRow const& rw,
                                       int row, int h, std::int64_t head, int t0, int t1,
                                       int span_lo, float const* omega_s, int const* oldest_s,
                                       AngleOf const& angle_of, int lane) {
  StoreArrays const& a = p.arrays;
  int const d = p.dims.head_dim;
  int const hkv = p.dims.num_kv_heads;
  int const window = p.dims.dmc_window;
  int const decision = p.policy.dmc.decision_index(d);
  RopeLayout const layout = p.rope.layout;
  bool const interleaved = layout == RopeLayout::kInterleaved;
  int const per_token = d / 2 / kWidth;  // units per token
  // A lane takes one unit of a run of consecutive tokens (run_length of them: the warp's 32
  // lanes cover the tile's units once when per_token <= 32). While a token's oldest member is
  // its predecessor's, P_i's left-to-right sum is P_{i-1}'s followed by term i, so the lane adds
  // one term instead of summing the window again; only a new group or the window's slide starts
  // the sum over.
  int const run_length = max(1, min(kPrefillTile, kPrefillTile * per_token / 32));
  int const runs = (t1 - t0 + run_length - 1) / run_length;
  T* const k_att = static_cast<T*>(p.buf.k_att);
  T* const v_att = static_cast<T*>(p.buf.v_att);
  for (int item = lane; item < runs * per_token; item += 32) {
    int const run = item / per_token;
    int const e = item - run * per_token;
    int const dim_a = interleaved ? 2 * e * kWidth : e * kWidth;
    int const dim_b = interleaved ? dim_a + kWidth : dim_a + d / 2;
    int const run_begin = t0 + run * run_length;
    int const run_end = min(t1, run_begin + run_length);
    float sum_ka[kWidth], sum_kb[kWidth], sum_va[kWidth], sum_vb[kWidth];
    float sum_w = 0.0f;
    int previous_oldest = 0;
    for (int i = run_begin; i < run_end; ++i) {
      int const oldest = oldest_s[i - t0];
      bool started = i > run_begin && oldest == previous_oldest;  // the sums hold P_{i-1}
      previous_oldest = oldest;
      for (int j = started ? i : oldest; j <= i; ++j) {
        float term_ka[kWidth], term_kb[kWidth], term_va[kWidth], term_vb[kWidth];
        float term_w;
        if (j < 0) {
          std::int64_t const cell = head * window + (rw.first + j) % window;
          KVC_UNROLL
          for (int m = 0; m < kWidth; ++m) {
            term_ka[m] = a.dmc_ring_k[cell * d + dim_a + m];
            term_kb[m] = a.dmc_ring_k[cell * d + dim_b + m];
            term_va[m] = a.dmc_ring_v[cell * d + dim_a + m];
            term_vb[m] = a.dmc_ring_v[cell * d + dim_b + m];
          }
          term_w = a.dmc_ring_w[cell];
        } else {
          std::int64_t const base = ((rw.begin + j) * static_cast<std::int64_t>(hkv) + h) * d;
          float ka[kWidth], kb[kWidth], va[kWidth], vb[kWidth];
          prefill_load_floats<T, kWidth>(p.k + base + dim_a, ka);
          prefill_load_floats<T, kWidth>(p.k + base + dim_b, kb);
          prefill_load_floats<T, kWidth>(p.v + base + dim_a, va);
          prefill_load_floats<T, kWidth>(p.v + base + dim_b, vb);
          term_w = omega_s[j - span_lo];
          KVC_UNROLL
          for (int m = 0; m < kWidth; ++m) {
            term_ka[m] = dmc_term(term_w, ka[m], dim_a + m == decision);
            term_kb[m] = dmc_term(term_w, kb[m], dim_b + m == decision);
            term_va[m] = dmc_term(term_w, va[m], false);
            term_vb[m] = dmc_term(term_w, vb[m], false);
          }
        }
        KVC_UNROLL
        for (int m = 0; m < kWidth; ++m) {
          sum_ka[m] = started ? add_rn(sum_ka[m], term_ka[m]) : term_ka[m];
          sum_kb[m] = started ? add_rn(sum_kb[m], term_kb[m]) : term_kb[m];
          sum_va[m] = started ? add_rn(sum_va[m], term_va[m]) : term_va[m];
          sum_vb[m] = started ? add_rn(sum_vb[m], term_vb[m]) : term_vb[m];
        }
        sum_w = started ? add_rn(sum_w, term_w) : term_w;
        started = true;
      }
      // Means, keys rotated (rotate_pair zeroes the decision dim before and after), values.
      float key_a[kWidth], key_b[kWidth], value_a[kWidth], value_b[kWidth];
      KVC_UNROLL
      for (int m = 0; m < kWidth; ++m) {
        value_a[m] = dmc_slot_value(sum_va[m], sum_w);
        value_b[m] = dmc_slot_value(sum_vb[m], sum_w);
      }
      int const local = i - t0;
      if (!interleaved || kWidth == 1) {
        KVC_UNROLL
        for (int m = 0; m < kWidth; ++m) {
          rotate_pair(dmc_slot_value(sum_ka[m], sum_w), dmc_slot_value(sum_kb[m], sum_w), dim_a + m,
                      dim_b + m, d, decision, layout, angle_of(local, dim_a + m), key_a[m],
                      key_b[m]);
        }
      } else {
        KVC_UNROLL
        for (int m = 0; m + 1 < kWidth; m += 2) {
          rotate_pair(dmc_slot_value(sum_ka[m], sum_w), dmc_slot_value(sum_ka[m + 1], sum_w),
                      dim_a + m, dim_a + m + 1, d, decision, layout, angle_of(local, dim_a + m),
                      key_a[m], key_a[m + 1]);
          rotate_pair(dmc_slot_value(sum_kb[m], sum_w), dmc_slot_value(sum_kb[m + 1], sum_w),
                      dim_b + m, dim_b + m + 1, d, decision, layout, angle_of(local, dim_b + m),
                      key_b[m], key_b[m + 1]);
        }
      }
      std::int64_t const base = ((rw.begin + i) * static_cast<std::int64_t>(hkv) + h) * d;
      prefill_store_floats<T, kWidth>(k_att + base + dim_a, key_a);
      prefill_store_floats<T, kWidth>(k_att + base + dim_b, key_b);
      prefill_store_floats<T, kWidth>(v_att + base + dim_a, value_a);
      prefill_store_floats<T, kWidth>(v_att + base + dim_b, value_b);
      if (i == rw.tokens - 1) {
        std::int64_t const seed = (static_cast<std::int64_t>(row) * hkv + h) * d;
        KVC_UNROLL
        for (int m = 0; m < kWidth; ++m) {
          p.buf.seed_k[seed + dim_a + m] = sum_ka[m];
          p.buf.seed_k[seed + dim_b + m] = sum_kb[m];
          p.buf.seed_v[seed + dim_a + m] = sum_va[m];
          p.buf.seed_v[seed + dim_b + m] = sum_vb[m];
        }
        if (e == 0) p.buf.seed_w[static_cast<std::int64_t>(row) * hkv + h] = sum_w;
      }
    }
  }
}

//! Grid prefill_prepare_grid: (tiles of kPrefillTile chunk tokens, rows, ranges of
//! kPrefillPrepareHeads KV heads); block kPrefillThreads. Block (tile, row, range):
//! - cos and sin of every RoPE pair at the tile's positions (rope_cos_sin, the pair's inverse
//!   frequency computed once per thread and pair), kept for the DMC scan kernel;
//! - q_att: the range's query heads RoPE'd at first + i (DMC: decision dim zeroed before and
//!   after), 16-byte vectors (rope_rows_share);
//! - Full/H2O/TOVA: k_att = the range's keys RoPE'd; Full: the chunk's keys, values and
//!   positions written into their slots past the heads' lengths (prefill_rope_keys_tile);
//! - DMC, one warp per KV head of the range: decisions and omegas of the tile and of the window
//!   before it; the mask, the prefix lengths; with a window, the partial means P_i
//!   (prefill_dmc_tile_means), their keys RoPE'd, and the sums of the last token kept as the
//!   decode seed. Without a window, the means are left to prefill_dmc_scan_kernel.
//! kDmc: the policy is DMC (an instantiation each, so that Full/H2O/TOVA's keep the registers
//! of their short path).
template <class T, bool kDmc>
KVC_GLOBAL void __launch_bounds__(kPrefillThreads, kPrefillPrepareMinBlocks)
    prefill_prepare_kernel(PrefillKernelParams<T> const p) {
  extern __shared__ float prepare_smem[];
  PrefillRow rw;
  int const row = blockIdx.y;
  if (!prefill_row(p, row, rw)) {
    if (blockIdx.z == 0) prefill_refused_inputs(p, row);
    return;
  }
  // The commit reads the chunk's first position from here: tokens_seen changes under it.
  if (blockIdx.x == 0 && blockIdx.z == 0 && threadIdx.x == 0) p.buf.row_first[row] = rw.first;
  int const t0 = static_cast<int>(blockIdx.x) * kPrefillTile;
  if (t0 >= rw.tokens) return;
  int const t1 = min(rw.tokens, t0 + kPrefillTile);
  int const count = t1 - t0;
  StoreArrays const& a = p.arrays;
  StoreDims const& dims = p.dims;
  int const d = dims.head_dim;
  int const pairs = d / 2;
  int const hq = dims.num_q_heads;
  int const hkv = dims.num_kv_heads;
  int const group = dims.group_size();
  int const h0 = static_cast<int>(blockIdx.z) * kPrefillPrepareHeads;  // the KV head range
  int const h1 = min(hkv, h0 + kPrefillPrepareHeads);
  constexpr bool dmc = kDmc;
  DmcConfig const& config = p.policy.dmc;
  int const window = dmc ? dims.dmc_window : 0;
  int const decision = dmc ? config.decision_index(d) : -1;
  RopeLayout const layout = p.rope.layout;
  bool const rotate = layout != RopeLayout::kNone;
  int const span = kPrefillTile + window + 1;
  int const warp = static_cast<int>(threadIdx.x) / 32;
  int const lane = static_cast<int>(threadIdx.x) % 32;
  // [tile, heads of the range]: Full's slot rows (prefill_full_slot_row)
  auto* const slot_rows = reinterpret_cast<std::int64_t*>(prepare_smem);
  float* table = prepare_smem + 2 * kPrefillTile * kPrefillPrepareHeads;  // [tile, D/2, 2]
  float* omega_s = table + kPrefillTile * d + warp * span;                // [span] of this warp
  int* merge_s = reinterpret_cast<int*>(table + kPrefillTile * d +  // [span] of this warp
                                        (kPrefillThreads / 32) * span) +
                 warp * (span + kPrefillTile);
  int* oldest_s = merge_s + span;  // [tile] of this warp

  bool const full = !kDmc && p.policy.kind == PolicyKind::kFull;
  if (full) {  // the slot rows' dependent loads overlap the angles below
    for (int index = threadIdx.x; index < count * (h1 - h0); index += blockDim.x) {
      int const i = index / (h1 - h0);
      slot_rows[index] = prefill_full_slot_row(p, rw, h0 + index - i * (h1 - h0), t0 + i);
    }
  }
  // cos and sin of the tile's positions (the pair's inverse frequency once per thread and pair).
  int last_pair = -1;
  double inv_freq = 0.0;
  for (int index = threadIdx.x; index < count * pairs; index += blockDim.x) {
    int const i = index / pairs;
    int const pair = index % pairs;
    float c = 1.0f;
    float s = 0.0f;
    if (rotate) {
      if (pair != last_pair) inv_freq = rope_inv_freq(pair, d, p.rope.theta);
      last_pair = pair;
      rope_cos_sin_at(inv_freq, rw.first + t0 + i, c, s);
    }
    table[index * 2] = c;
    table[index * 2 + 1] = s;
    if (p.buf.rope != nullptr && blockIdx.z == 0) {  // kept for prefill_dmc_scan_kernel
      std::int64_t const out = (static_cast<std::int64_t>(rw.begin + t0 + i) * pairs + pair) * 2;
      p.buf.rope[out] = c;
      p.buf.rope[out + 1] = s;
    }
  }
  __syncthreads();
  auto angle_of = [&](int i, int x) {
    ElementRope angle;
    int const pair = rope_pair_index(x, d, layout);
    angle.cos = table[(i * pairs + pair) * 2];
    angle.sin = table[(i * pairs + pair) * 2 + 1];
    return angle;
  };

  // The q attention uses (update_kernel's arithmetic; DMC: the decision dim zeroed before and
  // after), then (Full, H2O, TOVA) the RoPE'd keys: rope_rows.hpp, this thread's share.
  std::int64_t const q_first = (static_cast<std::int64_t>(rw.begin + t0) * hq + h0 * group) * d;
  rope_rows_share(p.q + q_first, static_cast<T*>(p.buf.q_att) + q_first, count, (h1 - h0) * group,
                  hq * d, d, decision, layout, angle_of, static_cast<int>(threadIdx.x),
                  static_cast<int>(blockDim.x));
  T* k_att = static_cast<T*>(p.buf.k_att);
  if (!dmc) {
    std::int64_t const k_first = (static_cast<std::int64_t>(rw.begin + t0) * hkv + h0) * d;
    if (rope_rows_vectorised(p.k + k_first, k_att + k_first, d, hkv * d)) {
      prefill_rope_keys_tile(p, rw, t0, count, h0, h1, angle_of, full ? slot_rows : nullptr);
      return;
    }
    // k not 16-byte aligned: the keys rotated with scalar loads, then copied into the slots.
    rope_rows_share(p.k + k_first, k_att + k_first, count, h1 - h0, hkv * d, d, -1, layout,
                    angle_of, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
    if (!full) return;
    __syncthreads();  // this block's k_att rows are written
    for (int h = h0; h < h1; ++h) {
      std::int64_t const head = dims.head_index(p.layer, rw.seq, h);
      prefill_copy_rows<T>(
          a, dims, a.page_table + head * dims.max_pages_per_head, count, k_att, p.v,
          [&](int i) {
            return slot_rows[i * (h1 - h0) + h - h0] < 0 ? -1 : a.lengths[head] + t0 + i;
          },
          [&](int i) { return (static_cast<std::int64_t>(rw.begin + t0 + i) * hkv + h) * d; },
          [&](int i, std::int64_t slot_row) {
            a.position_pages[slot_row] = static_cast<std::int32_t>(rw.first + t0 + i);
          });
    }
    return;
  }

  // DMC: one warp per KV head of the range (warp-uniform loop, no block barrier).
  int const span_lo = max(0, t0 - (window > 0 ? window - 1 : 0));
  int const span_hi = min(rw.tokens, t1 + 1);
  // 16-byte vectors when k, v and the head dim allow them (k_att/v_att are workspace-aligned).
  constexpr int kVec = RopeVector<T>::kSize;
  bool const vectors = rope_rows_vectorised(p.k, p.v, d, d);  // rows of whole 16-byte pair halves
  for (int h = h0 + warp; h < h1; h += kPrefillThreads / 32) {
    std::int64_t const head = dims.head_index(p.layer, rw.seq, h);
    // Decisions and omegas of the span (the tile, the window before it, the token after it).
    for (int j = span_lo + lane; j < span_hi; j += 32) {
      std::int64_t const token = rw.begin + j;
      bool const merge = dmc_merges(DTypeTraits<T>::to_float(p.k[(token * hkv + h) * d + decision]),
                                    config, rw.first + j == 0);
      T const* q_row = p.q + (token * hq + static_cast<std::int64_t>(h) * group) * d + decision;
      float const logit = dmc_group_logit_of(
          [q_row, d](int g) {
            return DTypeTraits<T>::to_float(q_row[static_cast<std::int64_t>(g) * d]);
          },
          group);
      merge_s[j - span_lo] = merge ? 1 : 0;
      omega_s[j - span_lo] = dmc_omega(logit, config);
    }
    if (blockIdx.x == 0 && lane == 0) p.buf.arrivals[static_cast<std::int64_t>(row) * hkv + h] = 0;
    __syncwarp();
    int const group_before = a.dmc_group_length[head];
    for (int i = t0 + lane; i < t1; i += 32) {
      std::int64_t const token = rw.begin + i;
      p.buf.merge[token * hkv + h] = static_cast<std::uint8_t>(merge_s[i - span_lo]);
      p.buf.omega[token * hkv + h] = omega_s[i - span_lo];
      p.buf.visible[token * hkv + h] =
          i + 1 < rw.tokens ? static_cast<std::uint8_t>(merge_s[i + 1 - span_lo] == 0) : 1;
      if (i == 0)
        p.buf.prefix[static_cast<std::int64_t>(row) * hkv + h] = a.lengths[head] - merge_s[0];
      if (window > 0) {
        // The oldest window member of P_i: the group's start (its last append), or the window.
        int const limit = i - window + 1;
        int start = -group_before;  // no append in the chunk up to i: the group began before it
        for (int j = i; j >= max(limit, 0); --j) {
          if (merge_s[j - span_lo] == 0) {
            start = j;
            break;
          }
        }
        oldest_s[i - t0] = max(start, limit);
      }
    }
    __syncwarp();
    if (window > 0) {
      if (vectors) {
        prefill_dmc_tile_means<T, kVec>(p, rw, row, h, head, t0, t1, span_lo, omega_s, oldest_s,
                                        angle_of, lane);
      } else {
        prefill_dmc_tile_means<T, 1>(p, rw, row, h, head, t0, t1, span_lo, omega_s, oldest_s,
                                     angle_of, lane);
      }
    }
    __syncwarp();  // merge_s, omega_s, oldest_s are rewritten for the next head
  }
}

//! DMC without a window (paper mode): grid (num_kv_heads, batch), block = head dim rounded up to
//! warps, dynamic shared memory head_dim floats. Thread x folds element x of the running sums
//! over the chunk in token order, s_i = merge_i ? s_{i-1} + term_i : term_i starting from the
//! head's running sums: exactly dmc_prefill's left-to-right sum over each group (so the results
//! are bitwise the reference's). Writes P_i (keys RoPE'd with the prepare kernel's angles) and
//! the seed sums of the last token.
template <class T>
KVC_GLOBAL void __launch_bounds__(kPrefillMaxHeadDim)
    prefill_dmc_scan_kernel(PrefillKernelParams<T> const p) {
  extern __shared__ float scan_mean[];  // [head_dim]
  PrefillRow rw;
  int const row = blockIdx.y;
  int const h = blockIdx.x;
  if (!prefill_row(p, row, rw)) return;
  StoreArrays const& a = p.arrays;
  StoreDims const& dims = p.dims;
  int const d = dims.head_dim;
  int const hkv = dims.num_kv_heads;
  int const x = threadIdx.x;
  bool const active = x < d;
  int const decision = p.policy.dmc.decision_index(d);
  RopeLayout const layout = p.rope.layout;
  std::int64_t const head = dims.head_index(p.layer, rw.seq, h);
  float sum_k = 0.0f;
  float sum_v = 0.0f;
  float sum_w = a.dmc_weight_sum[head];
  if (active) {
    sum_k = a.dmc_k_sum[head * d + x];
    sum_v = a.dmc_v_sum[head * d + x];
  }
  T* k_att = static_cast<T*>(p.buf.k_att);
  T* v_att = static_cast<T*>(p.buf.v_att);
  for (int i = 0; i < rw.tokens; ++i) {
    std::int64_t const token = rw.begin + i;
    bool const merge = p.buf.merge[token * hkv + h] != 0;
    float const omega = p.buf.omega[token * hkv + h];
    std::int64_t const element = (token * hkv + h) * d + x;
    if (active) {
      float const term_k = dmc_term(omega, DTypeTraits<T>::to_float(p.k[element]), x == decision);
      float const term_v = dmc_term(omega, DTypeTraits<T>::to_float(p.v[element]), false);
      sum_k = merge ? add_rn(sum_k, term_k) : term_k;
      sum_v = merge ? add_rn(sum_v, term_v) : term_v;
    }
    sum_w = merge ? add_rn(sum_w, omega) : omega;
    if (active) {
      scan_mean[x] = x == decision ? 0.0f : dmc_slot_value(sum_k, sum_w);
      v_att[element] = DTypeTraits<T>::from_float(dmc_slot_value(sum_v, sum_w));
    }
    __syncthreads();
    if (active) {
      ElementRope angle;
      if (layout != RopeLayout::kNone) {
        int const pair = rope_pair_index(x, d, layout);
        angle.cos = p.buf.rope[(token * (d / 2) + pair) * 2];
        angle.sin = p.buf.rope[(token * (d / 2) + pair) * 2 + 1];
      }
      int const partner = rope_partner(x, d, layout);
      float const key =
          x == decision ? 0.0f : rotate_with(scan_mean[x], scan_mean[partner], x, d, layout, angle);
      k_att[element] = DTypeTraits<T>::from_float(key);
    }
    __syncthreads();
  }
  if (active) {
    std::int64_t const seed = (static_cast<std::int64_t>(row) * hkv + h) * d + x;
    p.buf.seed_k[seed] = sum_k;
    p.buf.seed_v[seed] = sum_v;
    if (x == 0) p.buf.seed_w[static_cast<std::int64_t>(row) * hkv + h] = sum_w;
  }
}

//! Copies one slot's key and value rows (T) from `k_src`/`v_src` (element offsets) into slot
//! `slot` of a head, element x by the calling thread.
template <class T>
KVC_DEVICE void prefill_write_element(StoreArrays const& a, StoreDims const& dims,
                                      std::int32_t const* pages, int slot, int x, T key, T value) {
  std::int64_t const row = dims.slot_row(pages, slot);
  static_cast<T*>(a.k_pages)[row * dims.head_dim + x] = key;
  static_cast<T*>(a.v_pages)[row * dims.head_dim + x] = value;
}

//! After a commit: returns the pages of a head beyond ceil(length / page_size) to the free stack
//! (DMC's worst-case reservation, or an H2O cut short of the budget). Thread 0 only.
KVC_DEVICE void prefill_return_spare_pages(StoreArrays const& a, StoreDims const& dims,
                                           std::int64_t head, int length) {
  int const count = a.page_counts[head];
  int const needed = (length + dims.page_size - 1) / dims.page_size;
  if (count <= needed) return;
  int const spare = count - needed;
  int const base = atomicAdd(a.free_count, spare);
  std::int32_t* table = a.page_table + head * dims.max_pages_per_head;
  for (int j = 0; j < spare; ++j) {
    a.free_stack[base + j] = table[needed + j];
    table[needed + j] = -1;
  }
  a.page_counts[head] = needed;
}

//! The bits of a float (host and device).
KVC_HOST_DEVICE std::uint32_t prefill_float_bits(float x) {
#if KVC_IS_DEVICE_CODE
  return __float_as_uint(x);
#else
  std::uint32_t bits = 0;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

//! Order of the H2O/TOVA cut as one 64-bit key: larger is kept first, i.e. key(a) > key(b) iff
//! evicts_before(b, a). The high word is the eviction key of the score (NaN as -infinity, -0 as
//! +0) mapped to an order-preserving unsigned integer, the low word the complement of the
//! position (among equal scores the older token is kept: the newest is evicted first). Never 0,
//! so 0 marks "not selectable"; never ~0. Positions must be below 2^32.
KVC_HOST_DEVICE std::uint64_t prefill_keep_key(float score, std::int64_t position) {
  float key = eviction_key(score);
  if (key == 0.0f) key = 0.0f;
  std::uint32_t bits = prefill_float_bits(key);
  bits = (bits & 0x80000000u) != 0 ? ~bits : (bits | 0x80000000u);
  std::uint32_t const low = 0xffffffffu - static_cast<std::uint32_t>(position);
  return (static_cast<std::uint64_t>(bits) << 32) | low;
}

//! The k-th largest nonzero key of keys[0, n) (k >= 1, at most the number of nonzero keys; keys
//! distinct), by an 8-pass MSB radix select with a shared histogram. Every thread gets it.
KVC_DEVICE std::uint64_t prefill_select_threshold(std::uint64_t const* keys, int n, int k,
                                                  int* histogram /* [256] shared */,
                                                  std::uint64_t* shared_prefix, int* shared_k) {
  if (threadIdx.x == 0) {
    *shared_prefix = 0;
    *shared_k = k;
  }
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) histogram[b] = 0;
    __syncthreads();
    std::uint64_t const prefix = *shared_prefix;
    std::uint64_t const high = shift == 56 ? 0ull : (~0ull << (shift + 8));
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
      std::uint64_t const key = keys[c];
      if (key != 0 && (key & high) == prefix) {
        atomicAdd(&histogram[static_cast<int>((key >> shift) & 255u)], 1);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int remaining = *shared_k;
      int below = 0;
      for (int digit = 255; digit >= 0; --digit) {
        if (below + histogram[digit] >= remaining) {
          *shared_prefix = prefix | (static_cast<std::uint64_t>(digit) << shift);
          *shared_k = remaining - below;
          break;
        }
        below += histogram[digit];
      }
    }
    __syncthreads();
  }
  return *shared_prefix;
}

//! Chunk tokens per block of the DMC commit (the commit grid's z splits each head's chunk into
//! ranges of this many): enough blocks to fill the GPU with a few long prompts (a target of 256
//! blocks; one block per (row, KV head) left 100 SMs idle for one prompt of 32 heads), whole
//! block tiles, one range when the policy is not DMC.
inline int prefill_commit_split(StoreDims const& dims, int batch, int max_chunk, bool dmc) {
  constexpr int kTargetBlocks = 256;
  int const tiles = (max_chunk + kPrefillThreads - 1) / kPrefillThreads;
  if (!dmc || tiles <= 1) return tiles * kPrefillThreads;
  long long const heads = static_cast<long long>(dims.num_kv_heads) * batch;
  long long const want = (kTargetBlocks + heads - 1) / heads;
  int const splits = static_cast<int>(want < tiles ? want : tiles);
  return (tiles + splits - 1) / splits * kPrefillThreads;
}

//! Grid (num_kv_heads, batch, DMC: ranges of commit_split tokens); block kPrefillThreads. Writes
//! the layer's chunk into the store for every (row, KV head):
//! - Full: length += T (the prepare kernel wrote every token at slot length + j);
//! - DMC: P_j of every visible (kept) chunk token at slot prefix + rank (the first one overwrites
//!   the open last slot when token 0 merges), the seed sums, the group length, the ring cells of
//!   the last min(T, W) tokens, then the pages past ceil(length / page_size) go back;
//! - H2O/TOVA: the candidates' scores (existing slots' scores + the chunk's column sums summed
//!   over the group; TOVA: the last row averaged over all query heads, the same in every block
//!   of the row), then either every candidate is kept (existing slots in place, the chunk
//!   appended) or the cut keeps H2O's recent positions plus the best `heavy` of the rest (TOVA:
//!   the best `budget`), compacted in ascending position order as the reference does.
//! tokens_seen += T (by KV head 0's block).
template <class T>
KVC_GLOBAL void __launch_bounds__(kPrefillThreads)
    prefill_commit_kernel(PrefillKernelParams<T> const p) {
  __shared__ BlockScratch scratch;
  __shared__ int histogram[256];
  __shared__ std::uint64_t shared_prefix;
  __shared__ int shared_k;
  __shared__ int shared_slot[kPrefillThreads];
  __shared__ int last_append;
  __shared__ bool ok;
  __shared__ bool last_block;
  PrefillRow rw;
  int const row = blockIdx.y;
  int const h = blockIdx.x;
  int const split = static_cast<int>(blockIdx.z);  // DMC: the chunk's token range; else 0 only
  if (p.policy.kind != PolicyKind::kDmc && split > 0) return;
  if (!prefill_row(p, row, rw)) return;
  rw.first = p.buf.row_first[row];  // KV head 0's block advances tokens_seen
  StoreArrays const& a = p.arrays;
  StoreDims const& dims = p.dims;
  int const d = dims.head_dim;
  int const hkv = dims.num_kv_heads;
  int const hq = dims.num_q_heads;
  int const group = dims.group_size();
  PolicyKind const kind = p.policy.kind;
  std::int64_t const head = dims.head_index(p.layer, rw.seq, h);
  std::int32_t* pages = a.page_table + head * dims.max_pages_per_head;
  int const length = a.lengths[head];
  int const tokens = rw.tokens;
  int const budget = kind == PolicyKind::kH2O ? p.policy.h2o.budget() : p.policy.tova.budget;
  if (threadIdx.x == 0) {
    std::int64_t const capacity = static_cast<std::int64_t>(a.page_counts[head]) * dims.page_size;
    bool const good = prefill_slots_needed(kind, budget, length, tokens) <= capacity;
    if (!good && split == 0) atomicAdd(&a.report->protocol_errors, 1);
    ok = good;
    last_append = -1;
  }
  __syncthreads();
  if (!ok) return;
  T const* k_att = static_cast<T const*>(p.buf.k_att);
  std::int64_t const kv_first = static_cast<std::int64_t>(rw.begin) * hkv;  // token rows
  int new_length = length;

  // Element offset of chunk token j's row of this KV head in the packed [T, Hkv, D] inputs.
  auto token_source = [&](int j) {
    return ((kv_first + static_cast<std::int64_t>(j) * hkv) + h) * d;
  };
  if (kind == PolicyKind::kFull) {
    new_length = length + tokens;  // the prepare kernel wrote the slots (prefill_rope_keys_tile)
  } else if (kind == PolicyKind::kDmc) {
    T const* v_att = static_cast<T const*>(p.buf.v_att);
    std::int32_t const prefix = p.buf.prefix[static_cast<std::int64_t>(row) * hkv + h];
    // This block copies the kept tokens of [lo, hi); the chunk's gridDim.z blocks of a head run
    // side by side. Each first counts the kept tokens before lo and in the whole chunk, and the
    // last append (flags are bytes: a few thousand loads).
    int const lo = min(tokens, split * p.commit_split);
    int const hi = min(tokens, lo + p.commit_split);
    // kFlagBatch tokens' flags per thread loaded before any is used; one atomicMax per warp.
    constexpr int kFlagBatch = 8;
    long long before = 0;
    long long all = 0;
    int append = -1;
    int const threads = static_cast<int>(blockDim.x);
    for (int j0 = threadIdx.x; j0 < tokens; j0 += kFlagBatch * threads) {
      std::uint8_t visible[kFlagBatch], merge[kFlagBatch];
      KVC_UNROLL
      for (int u = 0; u < kFlagBatch; ++u) {
        int const j = j0 + u * threads;
        std::int64_t const token_row = kv_first + static_cast<std::int64_t>(j) * hkv + h;
        visible[u] = j < tokens ? p.buf.visible[token_row] : 0;
        merge[u] = j < tokens ? p.buf.merge[token_row] : 1;
      }
      KVC_UNROLL
      for (int u = 0; u < kFlagBatch; ++u) {
        int const j = j0 + u * threads;
        all += visible[u];
        before += j < lo ? visible[u] : 0;
        if (merge[u] == 0) append = j;  // j grows with u
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      append = max(append, __shfl_xor_sync(0xffffffffu, append, offset));
    }
    if (threadIdx.x % 32 == 0 && append >= 0) atomicMax(&last_append, append);
    before = block_sum(before, scratch);
    all = block_sum(all, scratch);  // its barriers also order last_append
    long long kept = before;
    for (int tile = lo; tile < hi; tile += blockDim.x) {
      int const j = tile + static_cast<int>(threadIdx.x);
      std::int64_t const token_row = kv_first + static_cast<std::int64_t>(j) * hkv + h;
      int const flag = j < hi ? p.buf.visible[token_row] : 0;
      long long total = 0;
      long long const rank = block_exclusive_sum(flag, total, scratch);
      shared_slot[threadIdx.x] = flag != 0 ? static_cast<int>(prefix + kept + rank) : -1;
      __syncthreads();
      int const in_tile = min(static_cast<int>(blockDim.x), hi - tile);
      prefill_copy_rows<T>(
          a, dims, pages, in_tile, k_att, v_att, [&](int t) { return shared_slot[t]; },
          [&](int t) { return token_source(tile + t); },
          [&](int t, std::int64_t slot_row) {
            a.position_pages[slot_row] = static_cast<std::int32_t>(rw.first + tile + t);
          });
      kept += total;
      __syncthreads();
    }
    new_length = static_cast<int>(prefix + all);
    // The last of the head's blocks to arrive (every block has read length and page_counts by
    // then, and copied its rows) seeds the decode state and sets the length.
    if (threadIdx.x == 0) {
      __threadfence();
      int const arrived = atomicAdd(&p.buf.arrivals[static_cast<std::int64_t>(row) * hkv + h], 1);
      last_block = arrived == static_cast<int>(gridDim.z) - 1;
    }
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    // The decode state: the sums of P_{T-1}, the group length, the ring of the last tokens.
    int const window = dims.dmc_window;
    int const decision = p.policy.dmc.decision_index(d);
    std::int64_t const seed = (static_cast<std::int64_t>(row) * hkv + h) * d;
    for (int x = threadIdx.x; x < d; x += blockDim.x) {
      a.dmc_k_sum[head * d + x] = p.buf.seed_k[seed + x];
      a.dmc_v_sum[head * d + x] = p.buf.seed_v[seed + x];
    }
    if (threadIdx.x == 0) {
      a.dmc_weight_sum[head] = p.buf.seed_w[static_cast<std::int64_t>(row) * hkv + h];
      a.dmc_group_length[head] =
          last_append >= 0 ? tokens - last_append : a.dmc_group_length[head] + tokens;
    }
    if (window > 0) {
      int const ring_first = max(0, tokens - window);
      int const ring_count = tokens - ring_first;
      for (int index = threadIdx.x; index < ring_count * d; index += blockDim.x) {
        int const i = ring_first + index / d;
        int const x = index % d;
        std::int64_t const token_row = kv_first + static_cast<std::int64_t>(i) * hkv + h;
        float const omega = p.buf.omega[token_row];
        std::int64_t const cell = (rw.first + i) % window;
        std::int64_t const element = token_row * d + x;
        a.dmc_ring_k[(head * window + cell) * d + x] =
            dmc_term(omega, DTypeTraits<T>::to_float(p.k[element]), x == decision);
        a.dmc_ring_v[(head * window + cell) * d + x] =
            dmc_term(omega, DTypeTraits<T>::to_float(p.v[element]), false);
        if (x == 0) a.dmc_ring_w[head * window + cell] = omega;
      }
    }
  } else {
    // H2O / TOVA. Candidates c < length are the existing slots, c = length + j chunk token j.
    bool const h2o = kind == PolicyKind::kH2O;
    int const n = length + tokens;
    int const stride = p.buf.stride;
    std::int64_t const cand = (static_cast<std::int64_t>(row) * hkv + h) * stride;
    float* cand_score = p.buf.cand_score + cand;
    std::uint64_t* cand_key = p.buf.cand_key + cand;
    std::int32_t* cand_rank = p.buf.cand_rank + cand;
    std::int64_t const newest = rw.first + tokens - 1;
    bool const cut = n > budget;
    long long eligible = 0;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
      std::int64_t const slot_row = c < length ? dims.slot_row(pages, c) : -1;
      std::int64_t const position =
          c < length ? a.position_pages[slot_row] : rw.first + (c - length);
      float score;
      if (h2o) {
        float const old = c < length ? a.score_pages[slot_row] : 0.0f;
        float const* probs =
            p.buf.probs +
            (static_cast<std::int64_t>(row) * hq + static_cast<std::int64_t>(h) * group) * stride +
            c;
        score = h2o_accumulate(old, h2o_group_probability(probs, group, stride));
      } else {
        float const* probs = p.buf.probs + static_cast<std::int64_t>(row) * hq * stride + c;
        score = tova_score(probs, hq, stride);
      }
      cand_score[c] = score;
      bool const selectable = !h2o || !h2o_is_recent(position, newest, p.policy.h2o.recent);
      cand_key[c] = selectable ? prefill_keep_key(score, position) : 0;
      eligible += selectable ? 1 : 0;
    }
    eligible = block_sum(eligible, scratch);  // also orders the candidate writes
    int const wanted = h2o ? p.policy.h2o.heavy : budget;
    std::uint64_t threshold = 0;  // keep every selectable candidate
    if (cut && wanted < eligible) {
      threshold = wanted > 0 ? prefill_select_threshold(cand_key, n, wanted, histogram,
                                                        &shared_prefix, &shared_k)
                             : ~0ull;  // keep none (keys are below ~0: low word of a position)
    }
    auto kept_candidate = [&](int c) {
      std::uint64_t const key = cand_key[c];
      return key == 0 ? true : key >= threshold;  // key 0: an H2O recent position
    };
    bool const own_scores = h2o || h == 0;  // TOVA keeps the layer scores in KV head 0 only
    auto stored_score = [&](float score) { return own_scores ? score : 0.0f; };
    if (!cut) {
      // Everything stays: existing slots keep their place (new scores), the chunk is appended.
      for (int c = threadIdx.x; c < length; c += blockDim.x) {
        if (own_scores) a.score_pages[dims.slot_row(pages, c)] = cand_score[c];
      }
      prefill_copy_rows<T>(
          a, dims, pages, tokens, k_att, p.v, [&](int j) { return length + j; }, token_source,
          [&](int j, std::int64_t slot_row) {
            a.position_pages[slot_row] = static_cast<std::int32_t>(rw.first + j);
            a.score_pages[slot_row] = stored_score(cand_score[length + j]);
          });
      new_length = n;
    } else {
      // Kept existing slots, ranked by position, are staged first (they move), then written to
      // slots [0, m); the kept chunk tokens follow in token order.
      std::int64_t const stage = (static_cast<std::int64_t>(row) * hkv + h) * budget;
      T* stage_k = static_cast<T*>(p.buf.stage_k) + stage * d;
      T* stage_v = static_cast<T*>(p.buf.stage_v) + stage * d;
      std::int32_t* stage_pos = p.buf.stage_pos + stage;
      float* stage_score = p.buf.stage_score + stage;
      long long kept_existing = 0;
      for (int c = threadIdx.x; c < length; c += blockDim.x) {
        int rank = -1;
        if (kept_candidate(c)) {
          std::int64_t const position = a.position_pages[dims.slot_row(pages, c)];
          rank = 0;
          for (int other = 0; other < length; ++other) {
            if (other != c && kept_candidate(other) &&
                a.position_pages[dims.slot_row(pages, other)] < position) {
              ++rank;
            }
          }
          ++kept_existing;
        }
        cand_rank[c] = rank;
      }
      kept_existing = block_sum(kept_existing, scratch);  // orders cand_rank
      for (std::int64_t index = threadIdx.x; index < static_cast<std::int64_t>(length) * d;
           index += blockDim.x) {
        int const c = static_cast<int>(index / d);
        int const x = static_cast<int>(index % d);
        int const rank = cand_rank[c];
        if (rank < 0) continue;
        std::int64_t const slot_row = dims.slot_row(pages, c);
        stage_k[static_cast<std::int64_t>(rank) * d + x] =
            static_cast<T const*>(a.k_pages)[slot_row * d + x];
        stage_v[static_cast<std::int64_t>(rank) * d + x] =
            static_cast<T const*>(a.v_pages)[slot_row * d + x];
        if (x == 0) {
          stage_pos[rank] = a.position_pages[slot_row];
          stage_score[rank] = stored_score(cand_score[c]);
        }
      }
      __syncthreads();  // the staged rows are complete before any slot is overwritten
      int const m = static_cast<int>(kept_existing);
      for (std::int64_t index = threadIdx.x; index < static_cast<std::int64_t>(m) * d;
           index += blockDim.x) {
        int const r = static_cast<int>(index / d);
        int const x = static_cast<int>(index % d);
        prefill_write_element<T>(a, dims, pages, r, x, stage_k[index], stage_v[index]);
        if (x == 0) {
          std::int64_t const slot_row = dims.slot_row(pages, r);
          a.position_pages[slot_row] = stage_pos[r];
          a.score_pages[slot_row] = stage_score[r];
        }
      }
      long long kept = 0;
      for (int tile = 0; tile < tokens; tile += blockDim.x) {
        int const j = tile + static_cast<int>(threadIdx.x);
        int const flag = j < tokens && kept_candidate(length + j) ? 1 : 0;
        long long total = 0;
        long long const rank = block_exclusive_sum(flag, total, scratch);
        shared_slot[threadIdx.x] = flag != 0 ? static_cast<int>(m + kept + rank) : -1;
        __syncthreads();
        int const in_tile = min(static_cast<int>(blockDim.x), tokens - tile);
        prefill_copy_rows<T>(
            a, dims, pages, in_tile, k_att, p.v, [&](int t) { return shared_slot[t]; },
            [&](int t) { return token_source(tile + t); },
            [&](int t, std::int64_t slot_row) {
              a.position_pages[slot_row] = static_cast<std::int32_t>(rw.first + tile + t);
              a.score_pages[slot_row] = stored_score(cand_score[length + tile + t]);
            });
        kept += total;
        __syncthreads();
      }
      new_length = m + static_cast<int>(kept);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a.lengths[head] = new_length;
    prefill_return_spare_pages(a, dims, head, new_length);
    if (h == 0) a.tokens_seen[dims.layer_seq(p.layer, rw.seq)] = rw.first + tokens;
  }
}

}  // namespace kvc::detail
