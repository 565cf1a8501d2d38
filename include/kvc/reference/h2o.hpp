//! @file
//! CPU reference of H2O (heavy-hitter oracle) for one (sequence, layer): every KV head keeps its
//! own slots and fp32 scores. A slot's score is the sum of the softmax probabilities it received
//! from every query so far, summed over the G query heads of its group (g = 0..G-1, then queries
//! in order). Budget = heavy + recent.
//!
//! Decode step: the newcomer is appended as slot n with score 0, attention runs over all n + 1
//! slots, every score (the newcomer's included) accumulates this step's group probability, and if
//! n + 1 > budget the victim chosen by `h2o_choose_victim` (lowest score outside the `recent`
//! newest positions; ties evict the newest position; NaN first) is overwritten by the newcomer.
//! Slots are therefore not in position order. Prefill: causal attention of the chunk over the
//! cache and itself; scores accumulate the chunk's column sums; if over budget the last `recent`
//! positions and the `heavy` best of the rest are kept, compacted in ascending position order.
//! The per-element maths is kvc/policy/h2o.hpp, shared with the kernels.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/core/status.hpp"
#include "kvc/policy/eviction.hpp"
#include "kvc/policy/h2o.hpp"
#include "kvc/reference/attention.hpp"
#include "kvc/reference/chunk.hpp"
#include "kvc/reference/types.hpp"

namespace kvc::reference {

//! H2O state of one (sequence, layer).
struct H2OLayerState {
  std::vector<HeadCache> heads;  //!< [num_kv_heads] slots and their fp32 scores (`score` used)
  std::int64_t tokens_seen = 0;  //!< position of the next token
};

//! An empty state (no token seen) for `spec`.
inline H2OLayerState make_h2o_state(LayerSpec const& spec) {
  H2OLayerState state;
  state.heads.resize(static_cast<std::size_t>(std::max(spec.num_kv_heads, 0)));
  return state;
}

}  // namespace kvc::reference

namespace kvc::detail {

//! The probabilities slot `slot` received from query `query` on the G query heads of KV head
//! `kv_head`, in query-head order. // out: [G]
inline void gather_group_probabilities(reference::LayerSpec const& spec,
                                       reference::AttentionProbabilities const& probabilities,
                                       int query, int kv_head, int slot, std::vector<float>& out) {
  int const group = spec.group_size();
  out.resize(static_cast<std::size_t>(group));
  for (int g = 0; g < group; ++g) {
    std::size_t const row = static_cast<std::size_t>(query) * spec.num_q_heads +
                            static_cast<std::size_t>(kv_head) * group + g;
    out[static_cast<std::size_t>(g)] = probabilities.rows[row][static_cast<std::size_t>(slot)];
  }
}

}  // namespace kvc::detail

namespace kvc::reference {

//! One decode token (position t = tokens_seen): append, attend over the n + 1 slots, accumulate
//! every slot's score, then evict one slot per KV head if over budget (the newcomer takes the
//! victim's slot; if the newcomer is the victim it is dropped). On error nothing is modified.
//! A state holding more slots than the budget is rejected with kErrorInvalidBudget.
//! q: [num_q_heads, head_dim]; k, v: [num_kv_heads, head_dim], all pre-RoPE.
inline Status h2o_decode_step(LayerSpec const& spec, H2OConfig const& config, H2OLayerState& state,
                              DecodeInput const& input, AttentionOutput& output) {
  KVC_RETURN_IF_ERROR(check_decode_input(spec, input));
  KVC_RETURN_IF_ERROR(config.validate());
  KVC_RETURN_IF_ERROR(kvc::detail::check_scored_heads(spec, state.heads, state.tokens_seen));
  int const budget = config.budget();
  for (HeadCache const& head : state.heads) {
    if (head.size() > budget) return Status::kErrorInvalidBudget;
  }
  int const d = spec.head_dim;
  std::int64_t const t = state.tokens_seen;

  std::vector<HeadCache> heads = state.heads;
  kvc::detail::push_scored_token(spec, input, t, heads);
  std::vector<float> const q = rotated_query(spec, input.q.data, t);
  AttentionOutput result;
  AttentionProbabilities probabilities;
  KVC_RETURN_IF_ERROR(decode_attention(spec, q, heads, result, &probabilities));

  int const group = spec.group_size();
  std::vector<float> group_probabilities;
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    HeadCache& head = heads[h];
    int const count = head.size();  // n + 1
    for (int s = 0; s < count; ++s) {
      kvc::detail::gather_group_probabilities(spec, probabilities, 0, h, s, group_probabilities);
      float const p = h2o_group_probability(group_probabilities.data(), group, 1);
      head.score[s] = h2o_accumulate(head.score[s], p);
    }
    if (count > budget) {
      int const victim =
          h2o_choose_victim(head.score.data(), head.position.data(), count, t, config.recent);
      if (victim >= 0) move_last_slot_to(head, victim, d);
    }
  }
  state.heads = std::move(heads);
  state.tokens_seen = t + 1;
  output = std::move(result);
  return Status::kSuccess;
}

//! A prompt chunk (the first one, or appended to what is cached) at positions tokens_seen + i:
//! causal attention over the cache and the chunk; every slot's score accumulates the column sum
//! of the chunk's probabilities (queries in order, each summed over the group); then, if a KV
//! head holds more than the budget, it keeps its last `recent` positions plus the `heavy` best
//! of the rest (the others ranked by `evicts_before` are dropped), in ascending position order.
//! On error nothing is modified. q: [T, num_q_heads, head_dim]; k, v: [T, num_kv_heads,
//! head_dim], all pre-RoPE.
inline Status h2o_prefill(LayerSpec const& spec, H2OConfig const& config, H2OLayerState& state,
                          PrefillInput const& input, AttentionOutput& output) {
  KVC_RETURN_IF_ERROR(check_prefill_input(spec, input));
  KVC_RETURN_IF_ERROR(config.validate());
  KVC_RETURN_IF_ERROR(kvc::detail::check_scored_heads(spec, state.heads, state.tokens_seen));
  int const d = spec.head_dim;
  std::int64_t const first = state.tokens_seen;
  std::int64_t const newest = first + input.num_tokens - 1;

  std::vector<HeadCache> heads;
  AttentionOutput result;
  AttentionProbabilities probabilities;
  KVC_RETURN_IF_ERROR(
      attend_chunk(spec, state.heads, input, first, true, heads, result, &probabilities));

  int const group = spec.group_size();
  std::vector<float> group_probabilities;
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    HeadCache& head = heads[h];
    int const count = head.size();
    for (int s = 0; s < count; ++s) {
      float score = head.score[s];
      for (int query = 0; query < input.num_tokens; ++query) {
        kvc::detail::gather_group_probabilities(spec, probabilities, query, h, s,
                                                group_probabilities);
        score = h2o_accumulate(score, h2o_group_probability(group_probabilities.data(), group, 1));
      }
      head.score[s] = score;
    }
    if (count <= config.budget()) continue;

    std::vector<bool> keep(static_cast<std::size_t>(count), false);
    std::vector<int> rest;  // slots outside the recent window
    for (int s = 0; s < count; ++s) {
      if (h2o_is_recent(head.position[s], newest, config.recent)) {
        keep[s] = true;
      } else {
        rest.push_back(s);
      }
    }
    // Best first: a slot ranks ahead when the other one is evicted before it.
    std::sort(rest.begin(), rest.end(), [&head](int a, int b) {
      return evicts_before(head.score[b], head.position[b], head.score[a], head.position[a]);
    });
    int const heavy = std::min(config.heavy, static_cast<int>(rest.size()));
    for (int i = 0; i < heavy; ++i) keep[rest[i]] = true;
    keep_slots_by_position(head, keep, d);
  }
  state.heads = std::move(heads);
  state.tokens_seen = newest + 1;
  output = std::move(result);
  return Status::kSuccess;
}

}  // namespace kvc::reference
