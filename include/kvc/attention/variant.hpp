//! @file
//! Attention variants: stateless policy types that the decode kernels call at fixed hook
//! points. A variant is a template argument of the kernels, so a hook costs nothing when it is
//! the identity.
//!
//! concept DecodeVariant {
//!   // false: logits_transform is the identity and the kernels skip it (they then fold the
//!   // softmax scale and log2(e) into one multiply).
//!   static constexpr bool kTransformsLogits;
//!   // Host-side check of the variant's own parameters in DecodeParams (kSuccess when valid).
//!   static Status validate(DecodeParams const& params);
//!   // Per-CTA closure, built on the device from the call's parameters.
//!   KVC_DEVICE explicit Variant(DecodeParams const& params);
//!   // Maps a scaled logit (scale * q.k, natural units) of slot `slot` of query head `q_head` of
//!   // batch row `row` to the logit the softmax sees.
//!   KVC_DEVICE float logits_transform(float logit, int row, int q_head, int slot) const;
//! };
//!
//! Score output (the H2O/TOVA hook) is not a variant property: it is on whenever
//! DecodeParams::scores.probs is set, for every variant, and then holds the softmax
//! probabilities of the transformed logits, or those logits and their LSE in log2 units
//! (ScoreForm; see kvc/attention/score_hook.hpp).
#pragma once

#include <cmath>

#include "kvc/attention/params.hpp"
#include "kvc/core/macros.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

//! Plain softmax attention: no logits transform.
struct DefaultVariant {
  static constexpr bool kTransformsLogits = false;

  static Status validate(DecodeParams const&) { return Status::kSuccess; }

  KVC_HOST_DEVICE explicit DefaultVariant(DecodeParams const&) {}

  KVC_HOST_DEVICE float logits_transform(float logit, int, int, int) const { return logit; }
};

//! Logit soft-capping (Gemma 2 style): logit -> cap * tanh(logit / cap), with
//! cap = DecodeParams::logits_soft_cap > 0.
struct SoftCapVariant {
  static constexpr bool kTransformsLogits = true;

  float cap = 1.0f;
  float inv_cap = 1.0f;

  static Status validate(DecodeParams const& params) {
    return params.logits_soft_cap > 0.0f && std::isfinite(params.logits_soft_cap)
               ? Status::kSuccess
               : Status::kErrorInvalidArgument;
  }

  KVC_HOST_DEVICE explicit SoftCapVariant(DecodeParams const& params)
      : cap(params.logits_soft_cap), inv_cap(1.0f / params.logits_soft_cap) {}

  KVC_HOST_DEVICE float logits_transform(float logit, int, int, int) const {
    return cap * tanhf(logit * inv_cap);
  }
};

}  // namespace kvc
