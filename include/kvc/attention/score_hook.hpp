//! @file
//! The score hook between decode attention and the H2O/TOVA evict kernel: where attention writes
//! what each slot received, in which form, and how the evict kernel reads it back as a softmax
//! probability (ScoreHook::probability).
//!
//! Layout: a caller-owned fp32 scratch `probs` [batch, num_q_heads, stride]. For batch row b,
//! query head hq (KV head hq / G) and slot s < length(sequence of row b, that KV head), with
//! logit(s) = scale * q . k[s] (after the variant's logits transform) over the slots as the page
//! table orders them (slot index, not token position), attention writes
//!   ScoreForm::kProbabilities: probs[(b * num_q_heads + hq) * stride + s] = exp(logit(s) - LSE)
//!     rounded to float, LSE = log sum_s exp(logit(s)) of the row;
//!   ScoreForm::kLog2Logits: probs[...] = log2(e) * logit(s) and lse[b * num_q_heads + hq] =
//!     log2(e) * LSE (fp32, -inf for a head with no slot), so probability = 2^(probs - lse).
//! Entries at s >= length are unspecified and never read. The stride must be at least the
//! longest length attention sees: budget + 1 for H2O and TOVA (the step's newcomer is in the
//! cache while attention runs).
//!
//! Cost: kProbabilities needs the LSE before any probability, so attention writes the logits,
//! then reads them back and rewrites them once the head's LSE is known (3 x 4 x G bytes of
//! traffic per slot); kLog2Logits writes each slot once (4 x G bytes per slot, against 4 x D bytes
//! of bf16 K and V read) and leaves the exponential to the reader, which reads the slot anyway.
//!
//! The evict kernel folds the probabilities into the policy's scores: H2O sums the G query heads
//! of a KV head (h2o_group_probability), TOVA averages all query heads of the layer (tova_score).
#pragma once

#include <cmath>
#include <cstdint>

#include "kvc/core/macros.hpp"

namespace kvc {

//! What attention leaves in ScoreHook::probs (see the file comment).
enum class ScoreForm : int {
  kProbabilities = 0,  //!< softmax probabilities
  kLog2Logits = 1,     //!< logits and LSE in log2 units; the reader takes 2^(x - lse)
};

//! Where attention writes per-slot scores. `probs` null means "no scores requested".
struct ScoreHook {
  float* probs = nullptr;  //!< [batch, num_q_heads, stride]
  int stride = 0;          //!< slots per (row, query head) row; >= the longest length attended
  ScoreForm form = ScoreForm::kProbabilities;
  float* lse = nullptr;  //!< kLog2Logits: [batch, num_q_heads] log2-unit LSE (attention writes)

  //! Element offset of (batch row, query head, slot).
  KVC_HOST_DEVICE std::int64_t index(int row, int q_head, int slot, int num_q_heads) const {
    return (static_cast<std::int64_t>(row) * num_q_heads + q_head) * stride + slot;
  }
  KVC_HOST_DEVICE bool enabled() const { return probs != nullptr; }

  //! The form is one of ScoreForm's and has what it needs (kLog2Logits: an lse array). The
  //! attention calls and the evict kernel's host call check it when scores are requested.
  KVC_HOST_DEVICE bool form_complete() const {
    return form == ScoreForm::kProbabilities || (form == ScoreForm::kLog2Logits && lse != nullptr);
  }

  //! The softmax probability of (row, query head, slot), in either form.
  KVC_HOST_DEVICE float probability(int row, int q_head, int slot, int num_q_heads) const {
    float const stored = probs[index(row, q_head, slot, num_q_heads)];
    if (form == ScoreForm::kProbabilities) return stored;
    return probability_of_log2(stored, lse[static_cast<std::int64_t>(row) * num_q_heads + q_head]);
  }

  //! 2^(logit2 - lse2): 0 for a head that saw no slot (lse2 = -inf); NaN stays NaN.
  KVC_HOST_DEVICE static float probability_of_log2(float logit2, float lse2) {
    return lse2 == -INFINITY ? 0.0f : exp2f(logit2 - lse2);
  }
};

}  // namespace kvc
