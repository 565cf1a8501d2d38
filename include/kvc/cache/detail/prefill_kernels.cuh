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
//! sum of the demands). The last block folds the rows into the step report, as prepare_step_kernel
//! does. Pages granted to a row that still fails stay with their heads (spare capacity, as in a
//! refused decode step).
KVC_GLOBAL void __launch_bounds__(kPrefillAllocThreads)
    prefill_allocate_kernel(PrefillAllocParams const p) {
  __shared__ BlockScratch scratch;
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
      __syncthreads();
      if (demand > 0) {
        int const granted = grant_count - rank < demand ? grant_count - rank : demand;
        int taken = 0;
        for (; taken < granted; ++taken) {
          a.page_table[head * dims.max_pages_per_head + count + taken] =
              a.free_stack[grant_base + rank + taken];
        }
        if (taken > 0) a.page_counts[head] = count + taken;
        if (taken < demand) atomicAdd(&row_short, demand - taken);
      }
      __syncthreads();  // grant_* are rewritten by the next chunk
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
  T const zero = DTypeTraits<T>::from_float(0.0f);
  auto clear = [&](void* array, int row_elements) {  // rows t0 .. t1 - 1 of [N, row_elements]
    if (array == nullptr) return;
    T* const base = static_cast<T*>(array) + static_cast<std::int64_t>(t0) * row_elements;
    std::int64_t const count = static_cast<std::int64_t>(t1 - t0) * row_elements;
    for (std::int64_t i = threadIdx.x; i < count; i += blockDim.x) base[i] = zero;
  };
  clear(p.buf.q_att, hq * d);
  clear(p.buf.k_att, hkv * d);
  clear(p.buf.v_att, hkv * d);
  if (p.buf.visible != nullptr) {
    std::int64_t const count = static_cast<std::int64_t>(t1 - t0) * hkv;
    for (std::int64_t i = threadIdx.x; i < count; i += blockDim.x) {
      p.buf.visible[static_cast<std::int64_t>(t0) * hkv + i] = 0;
    }
  }
}

//! RoPE of `count` token rows of `heads` x `d` elements, `in` to `out` (both [count, heads, d],
//! not overlapping), one RoPE pair per thread and step: both members are loaded once and written
//! together, with 32-bit index maths, kRopeBatch pairs per thread loaded before any is written
//! (the loads of a step are in flight together). The arithmetic is update_kernel's (rotate_with),
//! element for element; dim `decision` (DMC's decision dim, -1 for none) reads and writes as 0.
//! `angle_of(i, dim)` gives the angle of row i's pair of `dim`.
template <class T, class AngleOf>
KVC_DEVICE void prefill_rope_rows(T const* __restrict__ in, T* __restrict__ out, int count,
                                  int heads, int d, int decision, RopeLayout layout,
                                  AngleOf const& angle_of) {
  constexpr int kRopeBatch = 4;
  int const pairs = d / 2;
  int const per_row = heads * pairs;
  int const total = count * per_row;
  bool const interleaved = layout == RopeLayout::kInterleaved;
  int const stride = static_cast<int>(blockDim.x);
  for (int step = threadIdx.x; step < total; step += kRopeBatch * stride) {
    float a[kRopeBatch], b[kRopeBatch];
    int first[kRopeBatch], second[kRopeBatch], row[kRopeBatch], base[kRopeBatch];
#pragma unroll
    for (int u = 0; u < kRopeBatch; ++u) {
      int const index = step + u * stride;
      int const i = index / per_row;
      int const rest = index - i * per_row;
      int const head = rest / pairs;
      int const pair = rest - head * pairs;
      row[u] = i;
      first[u] = interleaved ? 2 * pair : pair;
      second[u] = interleaved ? first[u] + 1 : first[u] + pairs;
      base[u] = (i * heads + head) * d;
      bool const live = index < total;
      a[u] =
          !live || first[u] == decision ? 0.0f : DTypeTraits<T>::to_float(in[base[u] + first[u]]);
      b[u] =
          !live || second[u] == decision ? 0.0f : DTypeTraits<T>::to_float(in[base[u] + second[u]]);
    }
#pragma unroll
    for (int u = 0; u < kRopeBatch; ++u) {
      if (step + u * stride >= total) break;
      ElementRope const angle = angle_of(row[u], first[u]);
      float const rotated_a =
          first[u] == decision ? 0.0f : rotate_with(a[u], b[u], first[u], d, layout, angle);
      float const rotated_b =
          second[u] == decision ? 0.0f : rotate_with(b[u], a[u], second[u], d, layout, angle);
      out[base[u] + first[u]] = DTypeTraits<T>::from_float(rotated_a);
      out[base[u] + second[u]] = DTypeTraits<T>::from_float(rotated_b);
    }
  }
}

//! Dynamic shared memory (bytes) of prefill_prepare_kernel.
inline std::size_t prefill_prepare_shared_bytes(StoreDims const& dims, int window) {
  std::size_t const d = static_cast<std::size_t>(dims.head_dim);
  std::size_t const span = static_cast<std::size_t>(kPrefillTile) + window + 1;
  return sizeof(float) * (kPrefillTile * d       // cos/sin of the tile
                          + kPrefillTile * d     // partial means of k (RoPE partner exchange)
                          + span)                // omegas of the decision span
         + sizeof(int) * (span + kPrefillTile);  // merges of the span, oldest member per token
}

//! Grid (ceil(max_chunk / kPrefillTile), batch); block kPrefillThreads. One block per tile of
//! kPrefillTile chunk tokens of a row, looping over the KV heads:
//! - cos and sin of every RoPE pair at the tile's positions (rope_cos_sin, once per layer and
//!   token), kept for the DMC scan kernel;
//! - q_att: q RoPE'd at first + i (DMC: decision dim zeroed before and after);
//! - Full/H2O/TOVA: k_att = k RoPE'd;
//! - DMC: decisions and omegas of the tile and of the window before it; the mask, the prefix
//!   lengths; with a window, the partial means P_i summed over the window members from the
//!   oldest (ring cells for members before the chunk), their keys RoPE'd, and the sums of the
//!   last token kept as the decode seed. Without a window, the means are left to
//!   prefill_dmc_scan_kernel.
template <class T>
KVC_GLOBAL void __launch_bounds__(kPrefillThreads)
    prefill_prepare_kernel(PrefillKernelParams<T> const p) {
  extern __shared__ float prepare_smem[];
  PrefillRow rw;
  int const row = blockIdx.y;
  if (!prefill_row(p, row, rw)) {
    prefill_refused_inputs(p, row);
    return;
  }
  // The commit reads the chunk's first position from here: tokens_seen changes under it.
  if (blockIdx.x == 0 && threadIdx.x == 0) p.buf.row_first[row] = rw.first;
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
  bool const dmc = p.policy.kind == PolicyKind::kDmc;
  DmcConfig const& config = p.policy.dmc;
  int const window = dmc ? dims.dmc_window : 0;
  int const decision = dmc ? config.decision_index(d) : -1;
  RopeLayout const layout = p.rope.layout;
  bool const rotate = layout != RopeLayout::kNone;
  int const span_lo = max(0, t0 - (window > 0 ? window - 1 : 0));
  int const span_hi = min(rw.tokens, t1 + 1);
  float* table = prepare_smem;                                                   // [tile, D/2, 2]
  float* mean = table + kPrefillTile * d;                                        // [tile, D]
  float* omega_s = mean + kPrefillTile * d;                                      // [span]
  int* merge_s = reinterpret_cast<int*>(omega_s + (kPrefillTile + window + 1));  // [span]
  int* oldest_s = merge_s + (kPrefillTile + window + 1);                         // [tile]

  // cos and sin of the tile's positions.
  for (int index = threadIdx.x; index < count * pairs; index += blockDim.x) {
    int const i = index / pairs;
    int const pair = index % pairs;
    float c = 1.0f;
    float s = 0.0f;
    if (rotate) rope_cos_sin(pair, d, p.rope.theta, rw.first + t0 + i, c, s);
    table[index * 2] = c;
    table[index * 2 + 1] = s;
    if (p.buf.rope != nullptr) {  // kept for prefill_dmc_scan_kernel
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
  // after), then (Full, H2O, TOVA) the RoPE'd keys.
  prefill_rope_rows(
      p.q + static_cast<std::int64_t>(rw.begin + t0) * hq * d,
      static_cast<T*>(p.buf.q_att) + static_cast<std::int64_t>(rw.begin + t0) * hq * d, count, hq,
      d, decision, layout, angle_of);
  T* k_att = static_cast<T*>(p.buf.k_att);
  if (!dmc) {
    prefill_rope_rows(p.k + static_cast<std::int64_t>(rw.begin + t0) * hkv * d,
                      k_att + static_cast<std::int64_t>(rw.begin + t0) * hkv * d, count, hkv, d, -1,
                      layout, angle_of);
    return;
  }

  T* v_att = static_cast<T*>(p.buf.v_att);
  for (int h = 0; h < hkv; ++h) {
    std::int64_t const head = dims.head_index(p.layer, rw.seq, h);
    // Decisions and omegas of the span (the tile, the window before it, the token after it).
    for (int j = span_lo + static_cast<int>(threadIdx.x); j < span_hi; j += blockDim.x) {
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
    __syncthreads();
    int const group_before = a.dmc_group_length[head];
    for (int i = t0 + static_cast<int>(threadIdx.x); i < t1; i += blockDim.x) {
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
    if (window == 0) {
      __syncthreads();  // merge_s / omega_s are rewritten for the next head
      continue;
    }
    __syncthreads();

    // Partial means of the tile, summed from the oldest member (dmc_prefill's order).
    for (int index = threadIdx.x; index < count * d; index += blockDim.x) {
      int const i = t0 + index / d;
      int const x = index % d;
      int const oldest = oldest_s[i - t0];
      float sum_k = 0.0f;
      float sum_v = 0.0f;
      float sum_w = 0.0f;
      bool started = false;
      for (int j = oldest; j <= i; ++j) {
        float term_k;
        float term_v;
        float term_w;
        if (j < 0) {
          std::int64_t const cell = (rw.first + j) % window;
          term_k = a.dmc_ring_k[(head * window + cell) * d + x];
          term_v = a.dmc_ring_v[(head * window + cell) * d + x];
          term_w = a.dmc_ring_w[head * window + cell];
        } else {
          std::int64_t const element =
              ((rw.begin + j) * static_cast<std::int64_t>(hkv) + h) * d + x;
          term_w = omega_s[j - span_lo];
          term_k = dmc_term(term_w, DTypeTraits<T>::to_float(p.k[element]), x == decision);
          term_v = dmc_term(term_w, DTypeTraits<T>::to_float(p.v[element]), false);
        }
        sum_k = started ? add_rn(sum_k, term_k) : term_k;
        sum_v = started ? add_rn(sum_v, term_v) : term_v;
        sum_w = started ? add_rn(sum_w, term_w) : term_w;
        started = true;
      }
      mean[(i - t0) * d + x] = x == decision ? 0.0f : dmc_slot_value(sum_k, sum_w);
      std::int64_t const element = ((rw.begin + i) * static_cast<std::int64_t>(hkv) + h) * d + x;
      v_att[element] = DTypeTraits<T>::from_float(dmc_slot_value(sum_v, sum_w));
      if (i == rw.tokens - 1) {
        std::int64_t const seed = (static_cast<std::int64_t>(row) * hkv + h) * d + x;
        p.buf.seed_k[seed] = sum_k;
        p.buf.seed_v[seed] = sum_v;
        if (x == 0) p.buf.seed_w[static_cast<std::int64_t>(row) * hkv + h] = sum_w;
      }
    }
    __syncthreads();
    for (int index = threadIdx.x; index < count * d; index += blockDim.x) {
      int const i = index / d;
      int const x = index % d;
      int const partner = rope_partner(x, d, layout);
      float const key = x == decision ? 0.0f
                                      : rotate_with(mean[i * d + x], mean[i * d + partner], x, d,
                                                    layout, angle_of(i, x));
      std::int64_t const element =
          ((rw.begin + t0 + i) * static_cast<std::int64_t>(hkv) + h) * d + x;
      k_att[element] = DTypeTraits<T>::from_float(key);
    }
    __syncthreads();  // mean, merge_s, omega_s, oldest_s are rewritten for the next head
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

//! Copies `rows` K/V rows into slots of one head with 16-byte vectors spread over the block's
//! threads: row r (r < rows) is read at element offset source_of(r) of k_src / v_src and written
//! to slot slot_of(r) (nothing when that is negative); on_row(r, slot_row) runs once per copied
//! row, by the thread that copies its first vector (positions, scores). Rows are whole 16-byte
//! vectors: head_dim * sizeof(T) is a multiple of 16 for every supported head dim.
template <class T, class SlotOf, class SourceOf, class OnRow>
KVC_DEVICE void prefill_copy_rows(StoreArrays const& a, StoreDims const& dims,
                                  std::int32_t const* pages, int rows, T const* k_src,
                                  T const* v_src, SlotOf slot_of, SourceOf source_of,
                                  OnRow on_row) {
  int const vectors = dims.head_dim * static_cast<int>(sizeof(T)) / 16;  // per row
  long long const total = static_cast<long long>(rows) * vectors;
  for (long long index = threadIdx.x; index < total; index += blockDim.x) {
    int const r = static_cast<int>(index / vectors);
    int const c = static_cast<int>(index - static_cast<long long>(r) * vectors);
    int const slot = slot_of(r);
    if (slot < 0) continue;
    std::int64_t const row = dims.slot_row(pages, slot);
    std::int64_t const source = source_of(r);
    reinterpret_cast<uint4*>(static_cast<T*>(a.k_pages) + row * dims.head_dim)[c] =
        reinterpret_cast<uint4 const*>(k_src + source)[c];
    reinterpret_cast<uint4*>(static_cast<T*>(a.v_pages) + row * dims.head_dim)[c] =
        reinterpret_cast<uint4 const*>(v_src + source)[c];
    if (c == 0) on_row(r, row);
  }
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

//! Grid (num_kv_heads, batch); block kPrefillThreads. Writes the layer's chunk into the store
//! for every (row, KV head):
//! - Full: every token at slot length + j (key RoPE'd), length += T;
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
  PrefillRow rw;
  int const row = blockIdx.y;
  int const h = blockIdx.x;
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
    if (!good) atomicAdd(&a.report->protocol_errors, 1);
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
    prefill_copy_rows<T>(
        a, dims, pages, tokens, k_att, p.v, [&](int j) { return length + j; }, token_source,
        [&](int j, std::int64_t slot_row) {
          a.position_pages[slot_row] = static_cast<std::int32_t>(rw.first + j);
        });
    new_length = length + tokens;
  } else if (kind == PolicyKind::kDmc) {
    T const* v_att = static_cast<T const*>(p.buf.v_att);
    std::int32_t const prefix = p.buf.prefix[static_cast<std::int64_t>(row) * hkv + h];
    long long kept = 0;
    for (int tile = 0; tile < tokens; tile += blockDim.x) {
      int const j = tile + static_cast<int>(threadIdx.x);
      std::int64_t const token_row = kv_first + static_cast<std::int64_t>(j) * hkv + h;
      int const flag = j < tokens ? p.buf.visible[token_row] : 0;
      if (j < tokens && p.buf.merge[token_row] == 0) atomicMax(&last_append, j);
      long long total = 0;
      long long const rank = block_exclusive_sum(flag, total, scratch);
      shared_slot[threadIdx.x] = flag != 0 ? static_cast<int>(prefix + kept + rank) : -1;
      __syncthreads();
      int const in_tile = min(static_cast<int>(blockDim.x), tokens - tile);
      prefill_copy_rows<T>(
          a, dims, pages, in_tile, k_att, v_att, [&](int t) { return shared_slot[t]; },
          [&](int t) { return token_source(tile + t); },
          [&](int t, std::int64_t slot_row) {
            a.position_pages[slot_row] = static_cast<std::int32_t>(rw.first + tile + t);
          });
      kept += total;
      __syncthreads();
    }
    new_length = static_cast<int>(prefix + kept);
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
