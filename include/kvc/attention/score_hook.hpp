//! @file
//! The score hook between decode attention and the H2O/TOVA evict kernel: where attention writes
//! the softmax probability each slot received, and how the evict kernel reads it.
//!
//! Layout: a caller-owned fp32 scratch `probs` [batch, num_q_heads, stride]. For batch row b,
//! query head hq (KV head hq / G) and slot s < length(sequence of row b, that KV head), attention
//! writes probs[(b * num_q_heads + hq) * stride + s] = exp(logit(s) - lse(b, hq)) rounded to
//! float, where logit(s) = scale * q . k[s] over the slots as the page table orders them (slot
//! index, not token position). Entries at s >= length are unspecified and never read. The
//! stride must be at least the longest length attention sees: budget + 1 for H2O and TOVA
//! (the step's newcomer is in the cache while attention runs).
//!
//! The evict kernel then folds the probabilities into the policy's scores: H2O sums the G
//! query heads of a KV head (h2o_group_probability), TOVA averages all query heads of the layer
//! (tova_score). The write costs 4 * G bytes per slot against 4 * D bytes of bf16 K and V read.
#pragma once

#include <cstdint>

#include "kvc/core/macros.hpp"

namespace kvc {

//! Where attention writes per-slot probabilities. `probs` null means "no scores requested".
struct ScoreHook {
  float* probs = nullptr;  //!< [batch, num_q_heads, stride]
  int stride = 0;          //!< slots per (row, query head) row; >= the longest length attended

  //! Element offset of (batch row, query head, slot).
  KVC_HOST_DEVICE std::int64_t index(int row, int q_head, int slot, int num_q_heads) const {
    return (static_cast<std::int64_t>(row) * num_q_heads + q_head) * stride + slot;
  }
  KVC_HOST_DEVICE bool enabled() const { return probs != nullptr; }
};

}  // namespace kvc
