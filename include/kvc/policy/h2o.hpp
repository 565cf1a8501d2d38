//! @file
//! H2O (Zhang et al., NeurIPS 2023), per (sequence, layer, KV head). A slot's score is the sum
//! of the softmax probabilities it received from every query so far, summed over the G query
//! heads of its group; the newcomer starts with its own self-attention probability. Budget =
//! heavy + recent. After each step's attention (over budget + 1 entries) the lowest-score slot
//! among those outside the `recent` newest positions is evicted and the newcomer takes its
//! slot. Prefill keeps the last `recent` prompt tokens plus the top `heavy` of the rest by
//! column sums.
#pragma once

#include <cstdint>

#include "kvc/core/macros.hpp"
#include "kvc/core/math.hpp"
#include "kvc/core/status.hpp"
#include "kvc/policy/eviction.hpp"

namespace kvc {

struct H2OConfig {
  int heavy = 64;   //!< slots kept by score
  int recent = 64;  //!< newest positions always kept (0: the newcomer competes like any slot)

  KVC_HOST_DEVICE int budget() const { return heavy + recent; }

  Status validate() const {
    if (heavy < 0 || recent < 0 || heavy + recent <= 0) return Status::kErrorInvalidBudget;
    return Status::kSuccess;
  }
};

//! True when a slot at `position` is protected as one of the `recent` newest positions, given
//! the newest position in the cache. (The recent window is contiguous: prefill keeps the last
//! `recent` prompt tokens and every step adds the next position.)
KVC_HOST_DEVICE bool h2o_is_recent(std::int64_t position, std::int64_t newest_position, int recent) {
  return position > newest_position - recent;
}

//! Adds this step's probability (already summed over the group) to a slot's running score.
KVC_HOST_DEVICE float h2o_accumulate(float score, float group_probability) {
  return add_rn(score, group_probability);
}

//! Sum of the G probabilities a slot received from the query heads of its group, in order;
//! `probability_of(g)` gives group member g's.
template <class ProbabilityOf>
KVC_HOST_DEVICE float h2o_group_probability_of(ProbabilityOf const& probability_of,
                                               int group_size) {
  float sum = 0.0f;
  for (int g = 0; g < group_size; ++g) sum = add_rn(sum, probability_of(g));
  return sum;
}

//! h2o_group_probability_of over probabilities `stride` apart.
KVC_HOST_DEVICE float h2o_group_probability(float const* probabilities, int group_size,
                                            int stride) {
  return h2o_group_probability_of([=](int g) { return probabilities[g * stride]; }, group_size);
}

//! Sequential victim search over `count` slots; -1 if every slot is recent.
KVC_HOST_DEVICE int h2o_choose_victim(float const* scores, std::int64_t const* positions, int count,
                                      std::int64_t newest_position, int recent) {
  EvictionCandidate best;
  for (int slot = 0; slot < count; ++slot) {
    if (h2o_is_recent(positions[slot], newest_position, recent)) continue;
    best = first_to_evict(best, EvictionCandidate{slot, scores[slot], positions[slot]});
  }
  return best.slot;
}

}  // namespace kvc
