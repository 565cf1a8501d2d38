//! @file
//! The per-layer evict kernel of H2O and TOVA, run after the step's attention has written the
//! per-slot scores (kvc/attention/score_hook.hpp: probabilities, or log2 logits and their LSE,
//! which ScoreHook::probability turns into the same probabilities). One launch for the whole batch:
//! - H2O, one block per (KV head, batch row): score[s] = h2o_accumulate(score[s],
//!   h2o_group_probability(p of the G query heads)) for every slot; if length > heavy + recent,
//!   the victim is the block argmin by kvc::first_to_evict among slots that are not recent
//!   (h2o_is_recent, positions from the position pages);
//! - TOVA, one block per batch row: score[s] = tova_score(p of all query heads), kept in KV
//!   head 0's score pages; if length > budget, the victim is the argmin (the newcomer skipped
//!   when protect_new), and the move happens in every KV head (one index set per layer).
//! The newcomer (slot length - 1) then moves onto the victim (key, value, score, position) and
//! length drops by one. Key and value rows are moved as 32-bit words (a row of an even head dim
//! is a whole number of them in every dtype), so the kernel does not depend on the dtype. The
//! score pass handles kEvictUnroll slots per thread at a time so that their loads (page ids,
//! then scores, positions and probabilities) are in flight together. A block does nothing when the
//! step report says the step failed.
#pragma once

#include <cstdint>

#include "kvc/attention/score_hook.hpp"
#include "kvc/cache/detail/block_scan.cuh"
#include "kvc/cache/step_report.hpp"
#include "kvc/cache/store_layout.hpp"
#include "kvc/core/macros.hpp"
#include "kvc/policy/eviction.hpp"
#include "kvc/policy/h2o.hpp"
#include "kvc/policy/tova.hpp"

namespace kvc::detail {

//! Slots per thread and iteration of the score pass.
inline constexpr int kEvictUnroll = 4;

//! Arguments of evict_kernel.
struct EvictParams {
  StoreArrays arrays;
  StoreDims dims;
  ScoreHook scores{};                       // what the layer's attention wrote (either ScoreForm)
  std::int32_t const* seq_slots = nullptr;  // [batch]
  int batch = 0;
  int layer = 0;
  int elem_bytes = 2;  //!< sizeof(T) of the pools
  H2OConfig h2o{};
  TovaConfig tova{};
};

//! H2O: per (sequence, KV head) accumulated scores.
struct H2OEvict {
  static constexpr bool kPerKvHead = true;
  static constexpr int kThreads = 256;  // many blocks (batch x KV heads)
  KVC_DEVICE static int budget(EvictParams const& p) { return p.h2o.budget(); }
  KVC_DEVICE static float score(EvictParams const& p, int row, int kv_head, int slot, float old) {
    int const group = p.dims.group_size();
    int const hq = p.dims.num_q_heads;
    return h2o_accumulate(
        old, h2o_group_probability_of(
                 [&](int g) { return p.scores.probability(row, kv_head * group + g, slot, hq); },
                 group));
  }
  KVC_DEVICE static bool eligible(EvictParams const& p, int /*slot*/, int /*length*/,
                                  std::int64_t position, std::int64_t newest) {
    return !h2o_is_recent(position, newest, p.h2o.recent);
  }
};

//! TOVA: per (sequence, layer) scores of the current query, one slot set for all KV heads.
struct TovaEvict {
  static constexpr bool kPerKvHead = false;
  static constexpr int kThreads = 1024;  // one block per row reads all query heads
  KVC_DEVICE static int budget(EvictParams const& p) { return p.tova.budget; }
  KVC_DEVICE static float score(EvictParams const& p, int row, int /*kv_head*/, int slot,
                                float /*old*/) {
    int const hq = p.dims.num_q_heads;
    return tova_score_of([&](int h) { return p.scores.probability(row, h, slot, hq); }, hq);
  }
  KVC_DEVICE static bool eligible(EvictParams const& p, int slot, int length,
                                  std::int64_t /*position*/, std::int64_t /*newest*/) {
    return !(p.tova.protect_new && slot == length - 1);
  }
};

//! Grid (H2O: num_kv_heads, TOVA: 1) x batch; block Policy::kThreads.
template <class Policy>
KVC_GLOBAL void __launch_bounds__(Policy::kThreads) evict_kernel(EvictParams const p) {
  __shared__ BlockScratch scratch;
  __shared__ std::int64_t shared_head;
  __shared__ std::int64_t shared_newest;
  __shared__ int shared_length;
  __shared__ bool ok;
  StoreArrays const& a = p.arrays;
  StoreDims const& dims = p.dims;
  if (a.report->failed != 0) return;  // the step was refused: write nothing
  int const row = blockIdx.y;
  int const kv_head = Policy::kPerKvHead ? static_cast<int>(blockIdx.x) : 0;
  int const budget = Policy::budget(p);
  if (threadIdx.x == 0) {
    int const seq = p.seq_slots[row];
    bool good = seq >= 0 && seq < dims.max_seqs;
    if (good) {
      shared_head = dims.head_index(p.layer, seq, kv_head);
      shared_length = a.lengths[shared_head];
      shared_newest = a.step_positions[dims.layer_seq(p.layer, seq)];
      std::int64_t const capacity =
          static_cast<std::int64_t>(a.page_counts[shared_head]) * dims.page_size;
      good = shared_length <= budget + 1 && shared_length <= capacity &&
             shared_length <= p.scores.stride;
    }
    if (!good) atomicAdd(&a.report->protocol_errors, 1);
    ok = good;
  }
  __syncthreads();
  if (!ok) return;
  std::int64_t const head = shared_head;
  int const length = shared_length;
  std::int64_t const newest = shared_newest;
  std::int32_t const* pages = a.page_table + head * dims.max_pages_per_head;
  bool const over = length > budget;

  EvictionCandidate best;
  int const step = static_cast<int>(blockDim.x);
  for (int first = threadIdx.x; first < length; first += kEvictUnroll * step) {
    std::int64_t rows[kEvictUnroll];
    float scores[kEvictUnroll];
    std::int32_t positions[kEvictUnroll];
#pragma unroll
    for (int u = 0; u < kEvictUnroll; ++u) {
      int const slot = first + u * step;
      rows[u] = slot < length ? dims.slot_row(pages, slot) : -1;
    }
#pragma unroll
    for (int u = 0; u < kEvictUnroll; ++u) {
      if (rows[u] < 0) continue;
      scores[u] = Policy::score(p, row, kv_head, first + u * step, a.score_pages[rows[u]]);
      positions[u] = a.position_pages[rows[u]];
    }
#pragma unroll
    for (int u = 0; u < kEvictUnroll; ++u) {
      if (rows[u] < 0) continue;
      a.score_pages[rows[u]] = scores[u];
      int const slot = first + u * step;
      if (over && Policy::eligible(p, slot, length, positions[u], newest)) {
        best = first_to_evict(best, EvictionCandidate{slot, scores[u], positions[u]});
      }
    }
  }
  if (!over) return;                           // uniform
  best = block_first_to_evict(best, scratch);  // also orders the score writes before the move
  if (best.slot < 0) return;                   // every slot protected: keep budget + 1

  int const from = length - 1;
  int const victim = best.slot;
  int const heads = Policy::kPerKvHead ? 1 : dims.num_kv_heads;
  std::int64_t const first_head = head - kv_head;  // TOVA: KV head 0 of the row
  if (victim != from) {
    int const words = dims.head_dim * p.elem_bytes / 4;
    auto* k_words = static_cast<std::uint32_t*>(a.k_pages);
    auto* v_words = static_cast<std::uint32_t*>(a.v_pages);
    for (int index = threadIdx.x; index < heads * words; index += blockDim.x) {
      int const h = index / words;
      int const w = index % words;
      std::int32_t const* head_pages =
          Policy::kPerKvHead ? pages : a.page_table + (first_head + h) * dims.max_pages_per_head;
      std::int64_t const src = dims.slot_row(head_pages, from) * words + w;
      std::int64_t const dst = dims.slot_row(head_pages, victim) * words + w;
      k_words[dst] = k_words[src];
      v_words[dst] = v_words[src];
    }
    for (int h = threadIdx.x; h < heads; h += blockDim.x) {
      std::int32_t const* head_pages =
          Policy::kPerKvHead ? pages : a.page_table + (first_head + h) * dims.max_pages_per_head;
      std::int64_t const src = dims.slot_row(head_pages, from);
      std::int64_t const dst = dims.slot_row(head_pages, victim);
      a.position_pages[dst] = a.position_pages[src];
      a.score_pages[dst] = a.score_pages[src];
    }
  }
  for (int h = threadIdx.x; h < heads; h += blockDim.x) {
    a.lengths[Policy::kPerKvHead ? head : first_head + h] = length - 1;
  }
}

}  // namespace kvc::detail
