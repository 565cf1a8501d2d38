//! @file
//! The per-layer update kernel of a decode step: one launch for the whole batch, one block per
//! (KV head, batch row), one thread per element of the head dim. Every block first writes the q
//! that attention must use for the G query heads of its group (RoPE'd at the token position,
//! DMC's decision dim zeroed before and after RoPE), then lets the policy write the new token
//! into its head:
//! - AppendUpdate (Full, H2O, TOVA): the RoPE'd key and the value go to slot `length`,
//!   length + 1, position t, score 0 when the store keeps scores (H2O/TOVA then hold budget + 1
//!   slots until the evict kernel runs);
//! - DmcUpdate: the reference maths of kvc/policy/dmc.hpp in the reference's order (decision,
//!   group logit, omega, token step, weighted terms with ring cell t % W, slot value), the slot
//!   key RoPE'd at t with the decision dim zeroed before and after; a merge overwrites slot
//!   length - 1, an append writes slot length.
//! RoPE angles are not evaluated here: prepare_decode_step computed cos and sin of every pair at
//! the step's position (in double, by kvc::rope_cos_sin) into step_rope, and every element is
//! rotated with rope_rotate_element's arithmetic (rotate_with below).
//! A block does nothing when the step report says the step failed.
#pragma once

#include <cstdint>

#include "kvc/cache/detail/rope_rows.hpp"
#include "kvc/cache/step_report.hpp"
#include "kvc/cache/store_config.hpp"
#include "kvc/cache/store_layout.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/macros.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/policy/dmc.hpp"

namespace kvc::detail {

//! Arguments of update_kernel.
template <class T>
struct UpdateParams {
  StoreArrays arrays;
  StoreDims dims;
  T const* q = nullptr;                     // [batch, num_q_heads, head_dim] pre-RoPE
  T const* k = nullptr;                     // [batch, num_kv_heads, head_dim] pre-RoPE
  T const* v = nullptr;                     // [batch, num_kv_heads, head_dim]
  T* q_out = nullptr;                       // [batch, num_q_heads, head_dim] what attention uses
  std::int32_t const* seq_slots = nullptr;  // [batch]
  int batch = 0;
  int layer = 0;
  RopeConfig rope{};
  DmcConfig dmc{};
};

//! What every policy's head update gets: the head's row and state before the step.
struct HeadContext {
  std::int64_t head = 0;       //!< row in the [L, S, H] arrays
  std::int64_t layer_seq = 0;  //!< row in the [L, S] arrays
  std::int64_t position = 0;   //!< t, the position of the token
  int length = 0;              //!< slots before the step
  int row = 0;                 //!< batch row
  int kv_head = 0;
};

//! Writes `value` into slot `slot` of the head: key/value element `i` (by thread i), position and
//! (when `score` is not null) score by thread 0.
template <class T>
KVC_DEVICE void store_slot(StoreArrays const& a, StoreDims const& dims, HeadContext const& ctx,
                           int slot, float key, float value, bool active) {
  std::int32_t const* pages = a.page_table + ctx.head * dims.max_pages_per_head;
  std::int64_t const row = dims.slot_row(pages, slot);
  int const i = threadIdx.x;
  if (active) {
    static_cast<T*>(a.k_pages)[row * dims.head_dim + i] = DTypeTraits<T>::from_float(key);
    static_cast<T*>(a.v_pages)[row * dims.head_dim + i] = DTypeTraits<T>::from_float(value);
  }
  if (i == 0) {
    a.position_pages[row] = static_cast<std::int32_t>(ctx.position);
    if (a.score_pages != nullptr) a.score_pages[row] = 0.0f;
  }
}

//! Full, H2O and TOVA: append the RoPE'd key and the value at slot `length`.
struct AppendUpdate {
  static constexpr bool kZeroesDecisionDim = false;

  template <class T>
  KVC_DEVICE static void apply(UpdateParams<T> const& p, HeadContext const& ctx,
                               ElementRope const& angle, float* /*smem*/) {
    StoreDims const& dims = p.dims;
    int const d = dims.head_dim;
    int const i = threadIdx.x;
    bool const active = i < d;
    float key = 0.0f;
    float value = 0.0f;
    if (active) {
      std::int64_t const base =
          (static_cast<std::int64_t>(ctx.row) * dims.num_kv_heads + ctx.kv_head) * d;
      int const partner = rope_partner(i, d, p.rope.layout);
      key = rotate_with(DTypeTraits<T>::to_float(p.k[base + i]),
                        DTypeTraits<T>::to_float(p.k[base + partner]), i, d, p.rope.layout, angle);
      value = DTypeTraits<T>::to_float(p.v[base + i]);
    }
    store_slot<T>(p.arrays, dims, ctx, ctx.length, key, value, active);
    if (i == 0) p.arrays.lengths[ctx.head] = ctx.length + 1;
  }
};

//! DMC: merge into the last slot or append, with the running sums and ring of the store.
//! Shared memory: head_dim floats (the mean, for the RoPE partner exchange) + G floats (q[d]).
struct DmcUpdate {
  static constexpr bool kZeroesDecisionDim = true;

  template <class T>
  KVC_DEVICE static void apply(UpdateParams<T> const& p, HeadContext const& ctx,
                               ElementRope const& angle, float* smem) {
    StoreDims const& dims = p.dims;
    StoreArrays const& a = p.arrays;
    DmcConfig const& config = p.dmc;
    int const d = dims.head_dim;
    int const group = dims.group_size();
    int const window = dims.dmc_window;
    int const decision = config.decision_index(d);
    int const i = threadIdx.x;
    bool const active = i < d;
    float* mean = smem;        // [head_dim]
    float* logits = smem + d;  // [group]
    __shared__ float weight_sum;
    __shared__ float weight_before;
    __shared__ int group_length;

    std::int64_t const kv_base =
        (static_cast<std::int64_t>(ctx.row) * dims.num_kv_heads + ctx.kv_head) * d;
    std::int64_t const q_base = (static_cast<std::int64_t>(ctx.row) * dims.num_q_heads +
                                 static_cast<std::int64_t>(ctx.kv_head) * group) *
                                d;
    for (int g = i; g < group; g += blockDim.x) {
      logits[g] =
          DTypeTraits<T>::to_float(p.q[q_base + static_cast<std::int64_t>(g) * d + decision]);
    }
    if (i == 0) {
      group_length = a.dmc_group_length[ctx.head];
      weight_before = a.dmc_weight_sum[ctx.head];
    }
    __syncthreads();

    bool const merge =
        dmc_merges(DTypeTraits<T>::to_float(p.k[kv_base + decision]), config, ctx.position == 0);
    float const omega = dmc_omega(dmc_group_logit(logits, group), config);
    DmcTokenStep const step = dmc_token_step(merge, group_length, window);
    std::int64_t const cell = window > 0 ? ctx.position % window : 0;

    float k_sum = 0.0f;
    float v_sum = 0.0f;
    if (active) {
      std::int64_t const sum_index = ctx.head * d + i;
      std::int64_t const ring_index = (ctx.head * window + cell) * d + i;
      float* ring_k = window > 0 ? a.dmc_ring_k + ring_index : nullptr;
      float* ring_v = window > 0 ? a.dmc_ring_v + ring_index : nullptr;
      float running_k = a.dmc_k_sum[sum_index];
      float running_v = a.dmc_v_sum[sum_index];
      k_sum = dmc_accumulate(
          running_k, ring_k,
          dmc_term(omega, DTypeTraits<T>::to_float(p.k[kv_base + i]), i == decision), step);
      v_sum =
          dmc_accumulate(running_v, ring_v,
                         dmc_term(omega, DTypeTraits<T>::to_float(p.v[kv_base + i]), false), step);
      a.dmc_k_sum[sum_index] = running_k;
      a.dmc_v_sum[sum_index] = running_v;
    }
    if (i == 0) {
      float running_w = weight_before;
      float* ring_w = window > 0 ? a.dmc_ring_w + ctx.head * window + cell : nullptr;
      weight_sum = dmc_accumulate(running_w, ring_w, omega, step);
      a.dmc_weight_sum[ctx.head] = running_w;
      a.dmc_group_length[ctx.head] = step.group_length;
    }
    __syncthreads();

    float value = 0.0f;
    if (active) {
      mean[i] = i == decision ? 0.0f : dmc_slot_value(k_sum, weight_sum);
      value = dmc_slot_value(v_sum, weight_sum);
    }
    __syncthreads();
    float key = 0.0f;
    if (active && i != decision) {
      key =
          rotate_with(mean[i], mean[rope_partner(i, d, p.rope.layout)], i, d, p.rope.layout, angle);
    }
    // A merge needs a last slot; the first token of a sequence always appends, so length > 0.
    bool const overwrite = merge && ctx.length > 0;
    store_slot<T>(a, dims, ctx, overwrite ? ctx.length - 1 : ctx.length, key, value, active);
    if (i == 0) a.lengths[ctx.head] = overwrite ? ctx.length : ctx.length + 1;
  }
};

//! Dynamic shared memory (bytes) of a policy's update for the given dims.
template <class Policy>
inline std::size_t update_shared_bytes(StoreDims const& dims) {
  return Policy::kZeroesDecisionDim
             ? sizeof(float) * (static_cast<std::size_t>(dims.head_dim) + dims.group_size())
             : 0;
}

//! Threads per block of update_kernel: the head dim rounded up to whole warps.
inline int update_threads(int head_dim) {
  return (head_dim + 31) / 32 * 32;
}

//! Grid (num_kv_heads, batch); block update_threads(head_dim).
template <class Policy, class T>
KVC_GLOBAL void __launch_bounds__(kStoreMaxHeadDim) update_kernel(UpdateParams<T> const p) {
  extern __shared__ float update_smem[];
  __shared__ HeadContext context;
  __shared__ bool ok;
  StoreArrays const& a = p.arrays;
  StoreDims const& dims = p.dims;
  if (a.report->failed != 0) return;  // the step was refused: write nothing
  if (threadIdx.x == 0) {
    HeadContext ctx;
    ctx.row = blockIdx.y;
    ctx.kv_head = blockIdx.x;
    int const seq = p.seq_slots[ctx.row];
    bool good = seq >= 0 && seq < dims.max_seqs;
    if (good) {
      ctx.head = dims.head_index(p.layer, seq, ctx.kv_head);
      ctx.layer_seq = dims.layer_seq(p.layer, seq);
      ctx.position = a.step_positions[ctx.layer_seq];
      ctx.length = a.lengths[ctx.head];
      std::int64_t const capacity =
          static_cast<std::int64_t>(a.page_counts[ctx.head]) * dims.page_size;
      good = static_cast<std::int64_t>(ctx.length) + 1 <= capacity;
    }
    if (!good) atomicAdd(&a.report->protocol_errors, 1);
    context = ctx;
    ok = good;
  }
  __syncthreads();
  if (!ok) return;
  HeadContext const ctx = context;

  // The q attention uses, for the G query heads of this KV head.
  int const d = dims.head_dim;
  int const i = threadIdx.x;
  ElementRope angle;
  if (i < d && a.step_rope != nullptr) {
    std::int64_t const pair = rope_pair_index(i, d, p.rope.layout);
    float const* step = a.step_rope + (ctx.layer_seq * (d / 2) + pair) * 2;
    angle.cos = step[0];
    angle.sin = step[1];
  }
  if (i < d) {
    int const zeroed = Policy::kZeroesDecisionDim ? p.dmc.decision_index(d) : -1;
    int const partner = rope_partner(i, d, p.rope.layout);
    int const group = dims.group_size();
    for (int g = 0; g < group; ++g) {
      std::int64_t const base = (static_cast<std::int64_t>(ctx.row) * dims.num_q_heads +
                                 static_cast<std::int64_t>(ctx.kv_head) * group + g) *
                                d;
      float const x = i == zeroed ? 0.0f : DTypeTraits<T>::to_float(p.q[base + i]);
      float const y = partner == zeroed ? 0.0f : DTypeTraits<T>::to_float(p.q[base + partner]);
      float const rotated = i == zeroed ? 0.0f : rotate_with(x, y, i, d, p.rope.layout, angle);
      p.q_out[base + i] = DTypeTraits<T>::from_float(rotated);
    }
  }
  Policy::apply(p, ctx, angle, update_smem);
  if (i == 0 && ctx.kv_head == 0) a.tokens_seen[ctx.layer_seq] = ctx.position + 1;
}

}  // namespace kvc::detail
