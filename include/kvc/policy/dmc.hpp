//! @file
//! Dynamic Memory Compression (Nawrot et al., ICML 2024): per (sequence, layer, KV head) and
//! token, the new key/value is appended or merged into the last slot as an omega-weighted mean.
//! This header holds the config and the per-element maths that the CPU reference and the CUDA
//! kernels share unchanged.
//!
//! One token, one KV head (pre-RoPE q of the G query heads of the group, pre-RoPE k and v):
//!   merge  = !first_token && (k[d] - offset > 0)          (alpha)
//!   omega  = sigmoid(mean_g q_g[d] + offset) + eps
//!   k'     = k with k'[d] = 0
//!   g      = merge ? g + 1 : 1                            (tokens in the open group)
//!   S_x    = (merge ? S_x : 0) + omega * x   for x in {k', v} and S_z likewise with x = 1
//!   if window > 0 and g > window: S -= ring[t % window]   (the member leaving the window)
//!   ring[t % window] = omega * x
//!   slot   = S_x / S_z; its key gets RoPE at position t, then k[d] = 0 again
//! Merge overwrites the last slot; append opens a new one. Running sums are fp32 whatever the
//! cache dtype. Selects (not multiplications by 0/1) reset the sums, so a NaN cannot leak from one
//! group into the next.
#pragma once

#include "kvc/core/macros.hpp"
#include "kvc/core/math.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

enum class DmcMode : int {
  kCheckpoint = 0,  //!< NVIDIA's released Llama-2 DMC checkpoints: d = D-1, offset 5, eps 2^-7, window 12
  kPaper = 1,       //!< the paper's Algorithm 1: d = 0, no offset, eps 0, unbounded mean
};

//! Largest merge window the kernels keep a ring for.
inline constexpr int kDmcMaxWindow = 64;

//! DMC parameters. Build with `checkpoint()` or `paper()` and adjust if needed.
struct DmcConfig {
  DmcMode mode = DmcMode::kCheckpoint;
  int decision_dim = -1;   //!< index of the decision neuron; negative counts from the end (-1 = D-1)
  float offset = 5.0f;     //!< alpha = k[d] - offset > 0; omega = sigmoid(q[d] + offset) + eps
  float eps = 0.0078125f;  //!< 2^-7, torch.finfo(bfloat16).eps
  int window = 12;         //!< a slot averages at most this many newest tokens; 0 = unbounded

  static DmcConfig checkpoint() { return DmcConfig{}; }
  static DmcConfig paper() { return DmcConfig{DmcMode::kPaper, 0, 0.0f, 0.0f, 0}; }

  //! Decision neuron index for a head dim.
  KVC_HOST_DEVICE int decision_index(int head_dim) const {
    return decision_dim < 0 ? head_dim + decision_dim : decision_dim;
  }

  Status validate(int head_dim) const {
    int const index = decision_index(head_dim);
    if (index < 0 || index >= head_dim) return Status::kErrorInvalidArgument;
    if (window < 0 || window > kDmcMaxWindow) return Status::kErrorInvalidArgument;
    if (!(eps >= 0.0f) || offset != offset) return Status::kErrorInvalidArgument;
    return Status::kSuccess;
  }
};

//! alpha: true when the token merges into the last slot. The first token of a sequence always
//! appends; a NaN decision neuron appends.
KVC_HOST_DEVICE bool dmc_merges(float k_decision, DmcConfig const& config, bool first_token) {
  return !first_token && (k_decision - config.offset > 0.0f);
}

//! dmc_group_logit with the G logits given by `logit(g)` (kernels that read them strided from
//! the packed q of a prefill chunk, in any dtype). Same operations in the same order.
template <class Logit>
KVC_HOST_DEVICE float dmc_group_logit_of(Logit const& logit, int group_size) {
  float sum = 0.0f;
  for (int g = 0; g < group_size; ++g) sum = add_rn(sum, logit(g));
  return div_rn(sum, static_cast<float>(group_size));
}

//! The omega logit of a KV head: the mean of q[d] over the G query heads of its group.
//! `logits` holds those G values in query-head order.
KVC_HOST_DEVICE float dmc_group_logit(float const* logits, int group_size) {
  return dmc_group_logit_of([logits](int g) { return logits[g]; }, group_size);
}

//! omega = sigmoid(logit + offset) + eps.
KVC_HOST_DEVICE float dmc_omega(float group_logit, DmcConfig const& config) {
  return add_rn(sigmoid(add_rn(group_logit, config.offset)), config.eps);
}

//! Group bookkeeping of one token, computed once per (sequence, KV head).
struct DmcTokenStep {
  bool merge;         //!< merge into the last slot (else append a new slot)
  bool evict_oldest;  //!< the group outgrew the window: subtract the ring entry being replaced
  int group_length;   //!< tokens in the open group after this token
};

KVC_HOST_DEVICE DmcTokenStep dmc_token_step(bool merge, int group_length, int window) {
  int const length = merge ? group_length + 1 : 1;
  return DmcTokenStep{merge, window > 0 && length > window, length};
}

//! Updates one running sum with the weighted term of the new token and returns the new sum.
//! `ring_entry` is this token's ring cell (index t % window); null when window == 0.
KVC_HOST_DEVICE float dmc_accumulate(float& running_sum, float* ring_entry, float term,
                                     DmcTokenStep const& step) {
  float sum = step.merge ? add_rn(running_sum, term) : term;
  if (step.evict_oldest) sum = sub_rn(sum, *ring_entry);
  if (ring_entry != nullptr) *ring_entry = term;
  running_sum = sum;
  return sum;
}

//! The weighted term omega * x of one element. The decision neuron of the key is zeroed.
KVC_HOST_DEVICE float dmc_term(float omega, float x, bool is_decision_dim_of_key) {
  return is_decision_dim_of_key ? 0.0f : mul_rn(omega, x);
}

//! Slot value of one element from its running sum and the running weight sum.
KVC_HOST_DEVICE float dmc_slot_value(float sum, float weight_sum) { return div_rn(sum, weight_sum); }

}  // namespace kvc
