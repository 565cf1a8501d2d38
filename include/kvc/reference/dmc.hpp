//! @file
//! CPU reference of Dynamic Memory Compression (DMC) for one (sequence, layer): the decode step,
//! the parallel prefill of a prompt chunk (partial means, the DMC mask and the seeding of the
//! decode state), token-by-token prefill, and the compression ratio.
//!
//! The per-element maths is the shared code of kvc/policy/dmc.hpp, called in the order that
//! header documents, so the kernels (which call the same functions) can match it bit for bit.
//! Summation order of the parallel prefill: a partial mean adds the weighted terms of its window
//! members left to right from the oldest (members before the chunk come from the ring, or from
//! the running sums when the window is unbounded). Sequential and parallel results are then
//! bitwise equal unless a group outgrew its window (the sequential update subtracts the member
//! that leaves; the parallel one never adds it): those differ by float rounding only.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/core/status.hpp"
#include "kvc/policy/dmc.hpp"
#include "kvc/reference/attention.hpp"
#include "kvc/reference/dmc_state.hpp"
#include "kvc/reference/types.hpp"

namespace kvc::reference {

//! DMC state of one (sequence, layer): the slots and the open-group accumulators per KV head.
struct DmcLayerState {
  std::vector<HeadCache> heads;   //!< [num_kv_heads] slots; keys RoPE'd at their newest position
  std::vector<DmcHeadState> dmc;  //!< [num_kv_heads] open-group sums, ring and group length
  std::int64_t tokens_seen = 0;   //!< position of the next token
};

//! An empty state (no token seen) for `spec` and `config`. The ring is sized by config.window
//! (clamped to [0, kDmcMaxWindow]; an invalid config is rejected by the calls that use it).
inline DmcLayerState make_dmc_state(LayerSpec const& spec, DmcConfig const& config) {
  DmcConfig sized = config;
  sized.window = std::min(std::max(config.window, 0), kDmcMaxWindow);
  int const kv_heads = std::max(spec.num_kv_heads, 0);
  int const head_dim = std::max(spec.head_dim, 0);
  DmcLayerState state;
  state.heads.resize(kv_heads);
  state.dmc.assign(kv_heads, DmcHeadState::make(head_dim, sized));
  return state;
}

//! Per-KV-head decisions of one decode step.
struct DmcStepDecisions {
  std::vector<std::uint8_t> merged;  //!< [num_kv_heads] 1 when the token merged into the last slot
  std::vector<float> omega;          //!< [num_kv_heads] the token's importance weight
};

//! The key a DMC slot stores, from its fp32 pre-RoPE mean (not rounded first): the decision
//! dim is zeroed, RoPE is applied at `position`, the decision dim is zeroed again, and the
//! result is rounded to the dtype. // mean: [head_dim]
inline std::vector<float> dmc_slot_key(LayerSpec const& spec, std::vector<float> mean,
                                       std::int64_t position, int decision_dim) {
  mean[decision_dim] = 0.0f;
  apply_rope(mean.data(), spec.head_dim, spec.rope, position);
  mean[decision_dim] = 0.0f;
  round_in_place(mean, spec.dtype);
  return mean;
}

}  // namespace kvc::reference

namespace kvc::detail {

//! kSuccess when `state` has the sizes that `spec` and `config` imply and its counters agree
//! with each other (a merge always finds a last slot).
inline Status check_dmc_state(reference::LayerSpec const& spec, DmcConfig const& config,
                              reference::DmcLayerState const& state) {
  std::size_t const d = static_cast<std::size_t>(spec.head_dim);
  std::size_t const w = static_cast<std::size_t>(config.window);
  if (static_cast<int>(state.heads.size()) != spec.num_kv_heads ||
      static_cast<int>(state.dmc.size()) != spec.num_kv_heads) {
    return Status::kErrorSizeMismatch;
  }
  if (state.tokens_seen < 0) return Status::kErrorInvalidArgument;
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    reference::HeadCache const& head = state.heads[h];
    reference::DmcHeadState const& dmc = state.dmc[h];
    std::size_t const slots = head.position.size();
    if (head.k.size() != slots * d || head.v.size() != slots * d) return Status::kErrorSizeMismatch;
    if (dmc.k_sum.size() != d || dmc.v_sum.size() != d || dmc.ring_k.size() != w * d ||
        dmc.ring_v.size() != w * d || dmc.ring_w.size() != w) {
      return Status::kErrorSizeMismatch;
    }
    bool const started = state.tokens_seen > 0;
    if (static_cast<std::int64_t>(slots) > state.tokens_seen || started != (slots > 0)) {
      return Status::kErrorInvalidArgument;
    }
    if (dmc.group_length < 0 || dmc.group_length > state.tokens_seen ||
        started != (dmc.group_length > 0)) {
      return Status::kErrorInvalidArgument;
    }
  }
  return Status::kSuccess;
}

//! Replaces the last slot of `head` (key as stored, value rounded) and sets its position.
inline void dmc_overwrite_last_slot(reference::HeadCache& head, std::vector<float> const& key,
                                    std::vector<float> const& value, int head_dim,
                                    std::int64_t position) {
  std::size_t const offset = static_cast<std::size_t>(head.size() - 1) * head_dim;
  std::copy(key.begin(), key.end(), head.k.begin() + static_cast<std::ptrdiff_t>(offset));
  std::copy(value.begin(), value.end(), head.v.begin() + static_cast<std::ptrdiff_t>(offset));
  head.position.back() = position;
}

//! The omega of KV head `h` from one token's pre-RoPE q ([num_q_heads, head_dim], not yet
//! rounded): q[d] of the G query heads of the group, rounded to the dtype, averaged.
inline float dmc_head_omega(reference::LayerSpec const& spec, DmcConfig const& config,
                            float const* q_token, int kv_head, int decision_dim,
                            std::vector<float>& logits) {
  int const group = spec.group_size();
  logits.resize(group);
  for (int g = 0; g < group; ++g) {
    std::size_t const head = static_cast<std::size_t>(kv_head) * group + g;
    logits[g] = round_to_dtype(q_token[head * spec.head_dim + decision_dim], spec.dtype);
  }
  return dmc_omega(dmc_group_logit(logits.data(), group), config);
}

}  // namespace kvc::detail

namespace kvc::reference {

//! One decode token: per KV head, decide merge/append, update the open group's sums and ring,
//! write the slot (overwrite the last one on merge, append otherwise), then attend with q (its
//! decision dim zeroed) over every slot. `decisions`, if given, receives the per-head merge
//! flags and omegas. On error nothing (state, output, decisions) is modified.
//! q: [num_q_heads, head_dim]; k, v: [num_kv_heads, head_dim], all pre-RoPE.
inline Status dmc_decode_step(LayerSpec const& spec, DmcConfig const& config, DmcLayerState& state,
                              DecodeInput const& input, AttentionOutput& output,
                              DmcStepDecisions* decisions = nullptr) {
  KVC_RETURN_IF_ERROR(check_decode_input(spec, input));
  KVC_RETURN_IF_ERROR(config.validate(spec.head_dim));
  KVC_RETURN_IF_ERROR(kvc::detail::check_dmc_state(spec, config, state));
  int const dim = spec.head_dim;
  int const window = config.window;
  int const decision = config.decision_index(dim);
  std::int64_t const t = state.tokens_seen;
  std::size_t const cell = window > 0 ? static_cast<std::size_t>(t % window) : 0;

  std::vector<HeadCache> heads = state.heads;
  std::vector<DmcHeadState> dmc = state.dmc;
  DmcStepDecisions made;
  made.merged.assign(spec.num_kv_heads, 0);
  made.omega.assign(spec.num_kv_heads, 0.0f);
  std::vector<float> logits;
  std::vector<float> mean(dim);
  std::vector<float> value(dim);
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    std::size_t const row = static_cast<std::size_t>(h) * dim;
    std::vector<float> const k = rounded_copy(ConstSpan(input.k.data + row, dim), spec.dtype);
    std::vector<float> const v = rounded_copy(ConstSpan(input.v.data + row, dim), spec.dtype);
    bool const merge = dmc_merges(k[decision], config, t == 0);
    float const omega =
        kvc::detail::dmc_head_omega(spec, config, input.q.data, h, decision, logits);

    DmcHeadState& head_state = dmc[h];
    DmcTokenStep const step = dmc_token_step(merge, head_state.group_length, window);
    for (int i = 0; i < dim; ++i) {
      float* ring_k = window > 0 ? &head_state.ring_k[cell * dim + i] : nullptr;
      float* ring_v = window > 0 ? &head_state.ring_v[cell * dim + i] : nullptr;
      dmc_accumulate(head_state.k_sum[i], ring_k, dmc_term(omega, k[i], i == decision), step);
      dmc_accumulate(head_state.v_sum[i], ring_v, dmc_term(omega, v[i], false), step);
    }
    dmc_accumulate(head_state.weight_sum, window > 0 ? &head_state.ring_w[cell] : nullptr, omega,
                   step);
    head_state.group_length = step.group_length;

    for (int i = 0; i < dim; ++i) {
      mean[i] = dmc_slot_value(head_state.k_sum[i], head_state.weight_sum);
      value[i] =
          round_to_dtype(dmc_slot_value(head_state.v_sum[i], head_state.weight_sum), spec.dtype);
    }
    std::vector<float> const key = dmc_slot_key(spec, mean, t, decision);
    if (merge) {
      kvc::detail::dmc_overwrite_last_slot(heads[h], key, value, dim, t);
    } else {
      push_slot(heads[h], key, value.data(), dim, spec.dtype, t, false);
    }
    made.merged[h] = merge ? 1 : 0;
    made.omega[h] = omega;
  }

  std::vector<float> const q = rotated_query(spec, input.q.data, t, decision);
  KVC_RETURN_IF_ERROR(decode_attention(spec, q, heads, output));
  state.heads = std::move(heads);
  state.dmc = std::move(dmc);
  state.tokens_seen = t + 1;
  if (decisions != nullptr) *decisions = std::move(made);
  return Status::kSuccess;
}

//! Parallel prefill of a chunk of T tokens at positions T0 = state.tokens_seen .. T0+T-1 (the
//! first chunk of a sequence or one appended to an existing state). Every chunk position i gets
//! its partial mean P_i: the omega-weighted mean of the members of i's group within the window
//! (the last min(group length, W) of them; all when W == 0), keys RoPE'd at T0+i. Query i sees
//! chunk key j iff j == i or (j < i and token j+1 appends); it sees the existing cache's closed
//! slots, and its open (last) slot iff chunk token 0 appends. The cache then holds P_j for each
//! chunk j whose successor appends, plus P_{T-1} (the first of them overwrites the existing last
//! slot when token 0 merges), and the decode state is seeded so that decoding continues as if
//! the chunk had been fed token by token. On error nothing is modified.
//! q: [T, num_q_heads, head_dim]; k, v: [T, num_kv_heads, head_dim], all pre-RoPE;
//! output: [T, num_q_heads, head_dim] and lse [T, num_q_heads].
inline Status dmc_prefill(LayerSpec const& spec, DmcConfig const& config, DmcLayerState& state,
                          PrefillInput const& input, AttentionOutput& output) {
  KVC_RETURN_IF_ERROR(check_prefill_input(spec, input));
  KVC_RETURN_IF_ERROR(config.validate(spec.head_dim));
  KVC_RETURN_IF_ERROR(kvc::detail::check_dmc_state(spec, config, state));
  int const dim = spec.head_dim;
  int const window = config.window;
  int const decision = config.decision_index(dim);
  int const tokens = input.num_tokens;
  int const kv_heads = spec.num_kv_heads;
  std::int64_t const first_position = state.tokens_seen;
  std::size_t const q_stride = static_cast<std::size_t>(spec.num_q_heads) * dim;
  std::size_t const kv_stride = static_cast<std::size_t>(kv_heads) * dim;

  std::vector<HeadCache> attended = state.heads;  // existing slots, then P_0 .. P_{T-1}
  std::vector<int> cached(kv_heads);
  std::vector<std::vector<std::uint8_t>> merges(kv_heads, std::vector<std::uint8_t>(tokens));
  DmcLayerState next = state;
  std::vector<float> logits;
  std::vector<float> omega(tokens);
  std::vector<float> term_k(static_cast<std::size_t>(tokens) * dim);  // [T, head_dim]
  std::vector<float> term_v(static_cast<std::size_t>(tokens) * dim);  // [T, head_dim]
  std::vector<int> group_length(tokens);
  std::vector<float> sum_k(dim);
  std::vector<float> sum_v(dim);
  std::vector<float> mean(dim);
  std::vector<float> value(dim);

  for (int h = 0; h < kv_heads; ++h) {
    DmcHeadState const& before = state.dmc[h];
    cached[h] = state.heads[h].size();

    // Decisions, omegas, weighted terms and group lengths of every chunk token.
    int length = before.group_length;
    for (int i = 0; i < tokens; ++i) {
      std::size_t const row =
          static_cast<std::size_t>(i) * kv_stride + static_cast<std::size_t>(h) * dim;
      std::vector<float> const k = rounded_copy(ConstSpan(input.k.data + row, dim), spec.dtype);
      std::vector<float> const v = rounded_copy(ConstSpan(input.v.data + row, dim), spec.dtype);
      bool const merge = dmc_merges(k[decision], config, first_position + i == 0);
      omega[i] = kvc::detail::dmc_head_omega(spec, config, input.q.data + i * q_stride, h, decision,
                                             logits);
      for (int x = 0; x < dim; ++x) {
        term_k[static_cast<std::size_t>(i) * dim + x] = dmc_term(omega[i], k[x], x == decision);
        term_v[static_cast<std::size_t>(i) * dim + x] = dmc_term(omega[i], v[x], false);
      }
      length = dmc_token_step(merge, length, window).group_length;
      group_length[i] = length;
      merges[h][i] = merge ? 1 : 0;
    }

    // Partial means, summed directly over each position's window members, oldest first.
    float sum_w = 0.0f;
    for (int i = 0; i < tokens; ++i) {
      int const group_start = i - group_length[i] + 1;  // chunk index; negative: before the chunk
      int const oldest = window > 0 ? std::max(group_start, i - window + 1) : group_start;
      bool started = false;
      auto add = [&](float const* k_terms, float const* v_terms, float w_term) {
        for (int x = 0; x < dim; ++x) {
          sum_k[x] = started ? add_rn(sum_k[x], k_terms[x]) : k_terms[x];
          sum_v[x] = started ? add_rn(sum_v[x], v_terms[x]) : v_terms[x];
        }
        sum_w = started ? add_rn(sum_w, w_term) : w_term;
        started = true;
      };
      if (oldest < 0 && window == 0) {
        add(before.k_sum.data(), before.v_sum.data(), before.weight_sum);  // the whole earlier part
      }
      for (int j = oldest; j < 0 && window > 0; ++j) {
        std::size_t const cell = static_cast<std::size_t>((first_position + j) % window);
        add(&before.ring_k[cell * dim], &before.ring_v[cell * dim], before.ring_w[cell]);
      }
      for (int j = std::max(oldest, 0); j <= i; ++j) {
        add(&term_k[static_cast<std::size_t>(j) * dim], &term_v[static_cast<std::size_t>(j) * dim],
            omega[j]);
      }
      for (int x = 0; x < dim; ++x) {
        mean[x] = dmc_slot_value(sum_k[x], sum_w);
        value[x] = round_to_dtype(dmc_slot_value(sum_v[x], sum_w), spec.dtype);
      }
      push_slot(attended[h], dmc_slot_key(spec, mean, first_position + i, decision), value.data(),
                dim, spec.dtype, first_position + i, false);
    }

    // Cache: the closed group ends and the open group's P_{T-1}.
    HeadCache& head = next.heads[h];
    bool first_kept = true;
    for (int j = 0; j < tokens; ++j) {
      if (j + 1 < tokens && merges[h][j + 1]) continue;
      std::size_t const slot = static_cast<std::size_t>(cached[h] + j) * dim;
      std::vector<float> const key(attended[h].k.begin() + static_cast<std::ptrdiff_t>(slot),
                                   attended[h].k.begin() + static_cast<std::ptrdiff_t>(slot + dim));
      std::vector<float> const val(attended[h].v.begin() + static_cast<std::ptrdiff_t>(slot),
                                   attended[h].v.begin() + static_cast<std::ptrdiff_t>(slot + dim));
      if (first_kept && merges[h][0]) {
        kvc::detail::dmc_overwrite_last_slot(head, key, val, dim, first_position + j);
      } else {
        push_slot(head, key, val.data(), dim, spec.dtype, first_position + j, false);
      }
      first_kept = false;
    }

    // Decode state: the open group's window sums (those of P_{T-1}), its length, the ring.
    DmcHeadState& seeded = next.dmc[h];
    seeded.k_sum = sum_k;
    seeded.v_sum = sum_v;
    seeded.weight_sum = sum_w;
    seeded.group_length = group_length[tokens - 1];
    for (int i = std::max(0, tokens - window); i < tokens && window > 0; ++i) {
      std::size_t const cell = static_cast<std::size_t>((first_position + i) % window);
      std::copy_n(&term_k[static_cast<std::size_t>(i) * dim], dim, &seeded.ring_k[cell * dim]);
      std::copy_n(&term_v[static_cast<std::size_t>(i) * dim], dim, &seeded.ring_v[cell * dim]);
      seeded.ring_w[cell] = omega[i];
    }
  }
  next.tokens_seen = first_position + tokens;

  std::vector<float> q_rotated;
  q_rotated.reserve(static_cast<std::size_t>(tokens) * q_stride);
  for (int i = 0; i < tokens; ++i) {
    std::vector<float> const q =
        rotated_query(spec, input.q.data + i * q_stride, first_position + i, decision);
    q_rotated.insert(q_rotated.end(), q.begin(), q.end());
  }
  Visibility const visible = [&cached, &merges](int query, int kv_head, int slot) {
    int const existing = cached[kv_head];
    if (slot < existing - 1) return true;                      // closed before the chunk
    if (slot == existing - 1) return merges[kv_head][0] == 0;  // open unless token 0 merges
    int const j = slot - existing;
    return j == query || (j < query && merges[kv_head][j + 1] == 0);
  };
  KVC_RETURN_IF_ERROR(attention(spec, tokens, q_rotated, attended, visible, output));
  state = std::move(next);
  return Status::kSuccess;
}

//! Prefill of a chunk token by token through dmc_decode_step: the definition that dmc_prefill
//! must reproduce. Same arguments, outputs and error behaviour as dmc_prefill.
inline Status dmc_prefill_sequential(LayerSpec const& spec, DmcConfig const& config,
                                     DmcLayerState& state, PrefillInput const& input,
                                     AttentionOutput& output) {
  KVC_RETURN_IF_ERROR(check_prefill_input(spec, input));
  KVC_RETURN_IF_ERROR(config.validate(spec.head_dim));
  KVC_RETURN_IF_ERROR(kvc::detail::check_dmc_state(spec, config, state));
  std::size_t const q_stride = static_cast<std::size_t>(spec.num_q_heads) * spec.head_dim;
  std::size_t const kv_stride = static_cast<std::size_t>(spec.num_kv_heads) * spec.head_dim;
  DmcLayerState work = state;
  AttentionOutput all;
  all.out.reserve(static_cast<std::size_t>(input.num_tokens) * q_stride);
  all.lse.reserve(static_cast<std::size_t>(input.num_tokens) * spec.num_q_heads);
  for (int i = 0; i < input.num_tokens; ++i) {
    DecodeInput const token{ConstSpan(input.q.data + i * q_stride, q_stride),
                            ConstSpan(input.k.data + i * kv_stride, kv_stride),
                            ConstSpan(input.v.data + i * kv_stride, kv_stride)};
    AttentionOutput step;
    KVC_RETURN_IF_ERROR(dmc_decode_step(spec, config, work, token, step));
    all.out.insert(all.out.end(), step.out.begin(), step.out.end());
    all.lse.insert(all.lse.end(), step.lse.begin(), step.lse.end());
  }
  state = std::move(work);
  output = std::move(all);
  return Status::kSuccess;
}

//! Compression ratio of one KV head: tokens seen / slots kept. 1 when nothing has been seen;
//! 0 for a KV head index out of range.
inline double dmc_head_compression_ratio(DmcLayerState const& state, int kv_head) {
  if (kv_head < 0 || kv_head >= static_cast<int>(state.heads.size())) return 0.0;
  int const slots = state.heads[kv_head].size();
  if (slots == 0) return 1.0;
  return static_cast<double>(state.tokens_seen) / slots;
}

//! Compression ratio of the layer: tokens seen * KV heads / total slots (1 when empty).
inline double dmc_compression_ratio(DmcLayerState const& state) {
  std::int64_t slots = 0;
  for (HeadCache const& head : state.heads) slots += head.size();
  if (slots == 0) return 1.0;
  return static_cast<double>(state.tokens_seen) * static_cast<double>(state.heads.size()) /
         static_cast<double>(slots);
}

}  // namespace kvc::reference
