//! @file
//! CPU reference of TOVA (token omission via attention) for one (sequence, layer). One index set
//! is shared by all KV heads: slot i of every KV head holds the same token, and every head's
//! `score` holds the same layer scores. A slot's score is the current query's softmax
//! probability averaged over all query heads of the layer (head order 0..Hq-1); scores are
//! overwritten each step, not accumulated.
//!
//! Decode step: the newcomer is appended as slot n, attention runs over all n + 1 slots, the
//! scores are recomputed, and if n + 1 > budget the victim chosen by `tova_choose_victim`
//! (lowest score; ties evict the newest position; NaN first; the newcomer is skipped when
//! `protect_new`) is overwritten by the newcomer in every KV head. Prefill: causal attention of
//! the chunk over the cache and itself; scores come from the chunk's last query; if over budget
//! the top `budget` are kept (the newcomer protection does not apply), compacted in ascending
//! position order. The per-element maths is kvc/policy/tova.hpp, shared with the kernels.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/core/status.hpp"
#include "kvc/policy/eviction.hpp"
#include "kvc/policy/tova.hpp"
#include "kvc/reference/attention.hpp"
#include "kvc/reference/chunk.hpp"
#include "kvc/reference/types.hpp"

namespace kvc::reference {

//! TOVA state of one (sequence, layer).
struct TovaLayerState {
  std::vector<HeadCache> heads;  //!< [num_kv_heads] same slot order, positions and scores
  std::int64_t tokens_seen = 0;  //!< position of the next token
};

//! An empty state (no token seen) for `spec`.
inline TovaLayerState make_tova_state(LayerSpec const& spec) {
  TovaLayerState state;
  state.heads.resize(static_cast<std::size_t>(std::max(spec.num_kv_heads, 0)));
  return state;
}

}  // namespace kvc::reference

namespace kvc::detail {

//! kSuccess when the heads are consistent (see check_scored_heads) and share one index set:
//! every KV head has the positions of head 0, slot by slot.
inline Status check_tova_state(reference::LayerSpec const& spec,
                               reference::TovaLayerState const& state) {
  KVC_RETURN_IF_ERROR(check_scored_heads(spec, state.heads, state.tokens_seen));
  for (reference::HeadCache const& head : state.heads) {
    if (head.position != state.heads.front().position) return Status::kErrorInvalidArgument;
  }
  return Status::kSuccess;
}

//! The layer scores of every slot from query `query`'s probabilities: the mean over all query
//! heads (tova_score). Slot s of every KV head is the same token. // returns [slots]
inline std::vector<float> tova_layer_scores(reference::LayerSpec const& spec,
                                            reference::AttentionProbabilities const& probabilities,
                                            int query, int slots) {
  std::vector<float> scores(static_cast<std::size_t>(slots));
  std::vector<float> per_head(static_cast<std::size_t>(spec.num_q_heads));
  for (int s = 0; s < slots; ++s) {
    for (int h = 0; h < spec.num_q_heads; ++h) {
      std::size_t const row = static_cast<std::size_t>(query) * spec.num_q_heads + h;
      per_head[static_cast<std::size_t>(h)] = probabilities.rows[row][static_cast<std::size_t>(s)];
    }
    scores[static_cast<std::size_t>(s)] = tova_score(per_head.data(), spec.num_q_heads, 1);
  }
  return scores;
}

}  // namespace kvc::detail

namespace kvc::reference {

//! One decode token (position t = tokens_seen): append to every KV head, attend over the n + 1
//! slots, overwrite the layer scores, then evict one slot (the same in every KV head) if over
//! budget. On error nothing is modified. A state holding more slots than the budget is rejected
//! with kErrorInvalidBudget. q: [num_q_heads, head_dim]; k, v: [num_kv_heads, head_dim], all
//! pre-RoPE.
inline Status tova_decode_step(LayerSpec const& spec, TovaConfig const& config,
                               TovaLayerState& state, DecodeInput const& input,
                               AttentionOutput& output) {
  KVC_RETURN_IF_ERROR(check_decode_input(spec, input));
  KVC_RETURN_IF_ERROR(config.validate());
  KVC_RETURN_IF_ERROR(kvc::detail::check_tova_state(spec, state));
  if (state.heads.front().size() > config.budget) return Status::kErrorInvalidBudget;
  int const d = spec.head_dim;
  std::int64_t const t = state.tokens_seen;

  std::vector<HeadCache> heads = state.heads;
  kvc::detail::push_scored_token(spec, input, t, heads);
  std::vector<float> const q = rotated_query(spec, input.q.data, t);
  AttentionOutput result;
  AttentionProbabilities probabilities;
  KVC_RETURN_IF_ERROR(decode_attention(spec, q, heads, result, &probabilities));

  int const count = heads.front().size();  // n + 1
  std::vector<float> const scores = kvc::detail::tova_layer_scores(spec, probabilities, 0, count);
  for (HeadCache& head : heads) head.score = scores;
  if (count > config.budget) {
    int const newcomer = count - 1;
    int const victim = tova_choose_victim(scores.data(), heads.front().position.data(), count,
                                          newcomer, config.protect_new);
    if (victim >= 0) {
      for (HeadCache& head : heads) move_last_slot_to(head, victim, d);
    }
  }
  state.heads = std::move(heads);
  state.tokens_seen = t + 1;
  output = std::move(result);
  return Status::kSuccess;
}

//! A prompt chunk (the first one, or appended to what is cached) at positions tokens_seen + i:
//! causal attention over the cache and the chunk; the layer scores of every slot come from the
//! chunk's last query; if over budget the top `budget` slots are kept (those that
//! `evicts_before` ranks first are dropped), the same set in every KV head, in ascending
//! position order. On error nothing is modified. q: [T, num_q_heads, head_dim]; k, v:
//! [T, num_kv_heads, head_dim], all pre-RoPE.
inline Status tova_prefill(LayerSpec const& spec, TovaConfig const& config, TovaLayerState& state,
                           PrefillInput const& input, AttentionOutput& output) {
  KVC_RETURN_IF_ERROR(check_prefill_input(spec, input));
  KVC_RETURN_IF_ERROR(config.validate());
  KVC_RETURN_IF_ERROR(kvc::detail::check_tova_state(spec, state));
  int const d = spec.head_dim;
  std::int64_t const first = state.tokens_seen;

  std::vector<HeadCache> heads;
  AttentionOutput result;
  AttentionProbabilities probabilities;
  KVC_RETURN_IF_ERROR(
      attend_chunk(spec, state.heads, input, first, true, heads, result, &probabilities));

  int const count = heads.front().size();
  std::vector<float> const scores =
      kvc::detail::tova_layer_scores(spec, probabilities, input.num_tokens - 1, count);
  for (HeadCache& head : heads) head.score = scores;
  if (count > config.budget) {
    std::vector<std::int64_t> const& positions = heads.front().position;
    std::vector<int> order(static_cast<std::size_t>(count));
    for (int s = 0; s < count; ++s) order[static_cast<std::size_t>(s)] = s;
    // Best first: a slot ranks ahead when the other one is evicted before it.
    std::sort(order.begin(), order.end(), [&](int a, int b) {
      return evicts_before(scores[b], positions[b], scores[a], positions[a]);
    });
    std::vector<bool> keep(static_cast<std::size_t>(count), false);
    for (int i = 0; i < config.budget; ++i) keep[order[static_cast<std::size_t>(i)]] = true;
    for (HeadCache& head : heads) keep_slots_by_position(head, keep, d);
  }
  state.heads = std::move(heads);
  state.tokens_seen = first + input.num_tokens;
  output = std::move(result);
  return Status::kSuccess;
}

}  // namespace kvc::reference
