//! @file
//! TOVA (Oren et al., 2024), per (sequence, layer): a slot's score is the current query's
//! softmax probability averaged over all query heads of the layer; scores are not accumulated.
//! One index set is shared by all KV heads: slot i of every KV head holds the same token. When
//! over budget the lowest-score slot is evicted (the newcomer too, unless `protect_new`).
//! Prefill keeps the top `budget` by the last prompt query's head-averaged row.
#pragma once

#include <cstdint>

#include "kvc/core/macros.hpp"
#include "kvc/core/math.hpp"
#include "kvc/core/status.hpp"
#include "kvc/policy/eviction.hpp"

namespace kvc {

struct TovaConfig {
  int budget = 128;          //!< slots kept per KV head (the same set for all KV heads)
  bool protect_new = false;  //!< never evict the token that just arrived

  Status validate() const { return budget > 0 ? Status::kSuccess : Status::kErrorInvalidBudget; }
};

//! Mean over `num_q_heads` probabilities of one slot, summed in query-head order;
//! `probability_of(h)` gives query head h's.
template <class ProbabilityOf>
KVC_HOST_DEVICE float tova_score_of(ProbabilityOf const& probability_of, int num_q_heads) {
  float sum = 0.0f;
  for (int h = 0; h < num_q_heads; ++h) sum = add_rn(sum, probability_of(h));
  return div_rn(sum, static_cast<float>(num_q_heads));
}

//! tova_score_of over probabilities `stride` apart.
KVC_HOST_DEVICE float tova_score(float const* probabilities, int num_q_heads, int stride) {
  return tova_score_of([=](int h) { return probabilities[h * stride]; }, num_q_heads);
}

//! Sequential victim search; `newcomer_slot` is skipped when `protect_new`. -1 if none.
KVC_HOST_DEVICE int tova_choose_victim(float const* scores, std::int64_t const* positions, int count,
                                       int newcomer_slot, bool protect_new) {
  EvictionCandidate best;
  for (int slot = 0; slot < count; ++slot) {
    if (protect_new && slot == newcomer_slot) continue;
    best = first_to_evict(best, EvictionCandidate{slot, scores[slot], positions[slot]});
  }
  return best.slot;
}

}  // namespace kvc
