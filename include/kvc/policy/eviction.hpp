//! @file
//! The eviction order shared by H2O and TOVA, as host/device maths. Scores are fp32. The victim
//! is the slot with the lowest score; among equal lowest scores the newest token position goes
//! (what the original H2O/TOVA code does on the GPU). A NaN score sorts below every number, so a
//! poisoned slot is evicted first. Positions are distinct within one cache, so the order is total
//! and a parallel argmin reduction finds the same victim as a sequential scan.
#pragma once

#include <cmath>
#include <cstdint>

#include "kvc/core/macros.hpp"

namespace kvc {

//! Score used for ordering: NaN maps to -infinity.
KVC_HOST_DEVICE float eviction_key(float score) {
  return score != score ? -INFINITY : score;
}

//! True when slot a (score, position) is evicted before slot b.
KVC_HOST_DEVICE bool evicts_before(float score_a, std::int64_t position_a, float score_b,
                                   std::int64_t position_b) {
  float const key_a = eviction_key(score_a);
  float const key_b = eviction_key(score_b);
  return key_a < key_b || (key_a == key_b && position_a > position_b);
}

//! A candidate of an argmin reduction: slot index (-1 = none), its score and position.
struct EvictionCandidate {
  int slot = -1;
  float score = 0.0f;
  std::int64_t position = 0;
};

//! The candidate evicted first of two; an empty candidate (slot < 0) never wins.
KVC_HOST_DEVICE EvictionCandidate first_to_evict(EvictionCandidate const& a,
                                                 EvictionCandidate const& b) {
  if (a.slot < 0) return b;
  if (b.slot < 0) return a;
  return evicts_before(b.score, b.position, a.score, a.position) ? b : a;
}

}  // namespace kvc
