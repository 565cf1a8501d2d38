//! @file
//! Types shared by the CPU reference of every policy: the layer spec, a bounds-carrying view of
//! host buffers, the slots of one KV head, and step/prefill inputs and outputs; plus the slot
//! helpers of the scored (evicting) policies H2O and TOVA.
//!
//! Conventions of the reference (the kernels follow them too):
//! - q, k and v enter pre-RoPE and are first rounded to the cache dtype (what a kernel receives).
//! - A key is stored after RoPE at its token position (DMC: at the newest merged position), and
//!   rounded to the dtype; values likewise. The q used by attention is RoPE'd and rounded too.
//! - Attention accumulates in double; outputs are returned unrounded (float).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/core/shape.hpp"
#include "kvc/core/status.hpp"

namespace kvc::reference {

//! A read-only view of `size` floats; converts from std::vector so callers pass either.
struct ConstSpan {
  float const* data = nullptr;
  std::size_t size = 0;

  ConstSpan() = default;
  ConstSpan(float const* data_, std::size_t size_) : data(data_), size(size_) {}
  ConstSpan(std::vector<float> const& values)
      : data(values.data()), size(values.size()) {}  // NOLINT
  float operator[](std::size_t i) const { return data[i]; }
};

//! What every reference layer needs to know: the head shape, the storage dtype and RoPE.
struct LayerSpec {
  int num_q_heads = 1;
  int num_kv_heads = 1;
  int head_dim = 128;
  DType dtype = DType::kF32;
  RopeConfig rope{};
  float scale = 0.0f;  //!< softmax scale; 0 means 1/sqrt(head_dim)

  int group_size() const { return num_q_heads / num_kv_heads; }
  float softmax_scale() const {
    return scale > 0.0f ? scale
                        : static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  }
  Status validate() const {
    ModelShape const shape{1, num_q_heads, num_kv_heads, head_dim};
    KVC_RETURN_IF_ERROR(shape.validate());
    if (!(scale >= 0.0f) || !(rope.theta > 0.0)) return Status::kErrorInvalidArgument;
    return Status::kSuccess;
  }
};

//! The slots of one (sequence, layer, KV head), in slot order, as attention sees them.
struct HeadCache {
  std::vector<float> k;                //!< [slots, head_dim] post-RoPE, rounded to dtype
  std::vector<float> v;                //!< [slots, head_dim] rounded to dtype
  std::vector<std::int64_t> position;  //!< [slots] position of the newest token in the slot
  std::vector<float> score;            //!< [slots] H2O/TOVA scores (fp32); empty otherwise

  int size() const { return static_cast<int>(position.size()); }
};

//! One decode token of one (sequence, layer), pre-RoPE.
struct DecodeInput {
  ConstSpan q;  //!< [num_q_heads, head_dim]
  ConstSpan k;  //!< [num_kv_heads, head_dim]
  ConstSpan v;  //!< [num_kv_heads, head_dim]
};

//! A chunk of T prompt tokens of one (sequence, layer), pre-RoPE.
struct PrefillInput {
  int num_tokens = 0;
  ConstSpan q;  //!< [T, num_q_heads, head_dim]
  ConstSpan k;  //!< [T, num_kv_heads, head_dim]
  ConstSpan v;  //!< [T, num_kv_heads, head_dim]
};

//! Attention output of T queries (T = 1 for a decode step).
struct AttentionOutput {
  std::vector<float> out;  //!< [T, num_q_heads, head_dim]
  std::vector<float> lse;  //!< [T, num_q_heads] natural-log sum of exp(scaled logits)
};

//! kSuccess when the spans of a decode token match the spec.
inline Status check_decode_input(LayerSpec const& spec, DecodeInput const& input) {
  KVC_RETURN_IF_ERROR(spec.validate());
  std::size_t const d = static_cast<std::size_t>(spec.head_dim);
  if (input.q.data == nullptr || input.k.data == nullptr || input.v.data == nullptr) {
    return Status::kErrorInvalidArgument;
  }
  if (input.q.size != d * spec.num_q_heads || input.k.size != d * spec.num_kv_heads ||
      input.v.size != d * spec.num_kv_heads) {
    return Status::kErrorSizeMismatch;
  }
  return Status::kSuccess;
}

//! kSuccess when the spans of a prefill chunk match the spec (T >= 1).
inline Status check_prefill_input(LayerSpec const& spec, PrefillInput const& input) {
  KVC_RETURN_IF_ERROR(spec.validate());
  if (input.num_tokens <= 0) return Status::kErrorInvalidArgument;
  if (input.q.data == nullptr || input.k.data == nullptr || input.v.data == nullptr) {
    return Status::kErrorInvalidArgument;
  }
  std::size_t const td = static_cast<std::size_t>(input.num_tokens) * spec.head_dim;
  if (input.q.size != td * spec.num_q_heads || input.k.size != td * spec.num_kv_heads ||
      input.v.size != td * spec.num_kv_heads) {
    return Status::kErrorSizeMismatch;
  }
  return Status::kSuccess;
}

//! Copy of `values` rounded to `dtype`.
inline std::vector<float> rounded_copy(ConstSpan values, DType dtype) {
  std::vector<float> out(values.size);
  for (std::size_t i = 0; i < values.size; ++i) out[i] = round_to_dtype(values[i], dtype);
  return out;
}

//! Rounds every element of `values` to `dtype` in place.
inline void round_in_place(std::vector<float>& values, DType dtype) {
  for (float& value : values) value = round_to_dtype(value, dtype);
}

//! The q a layer attends with: [num_q_heads, head_dim], RoPE'd at `position` and rounded.
//! `zeroed_dim` (>= 0) is zeroed before and after RoPE (DMC's decision neuron).
inline std::vector<float> rotated_query(LayerSpec const& spec, float const* q_pre_rope,
                                        std::int64_t position, int zeroed_dim = -1) {
  std::vector<float> q(q_pre_rope,
                       q_pre_rope + static_cast<std::size_t>(spec.num_q_heads) * spec.head_dim);
  for (int h = 0; h < spec.num_q_heads; ++h) {
    float* head = q.data() + static_cast<std::size_t>(h) * spec.head_dim;
    for (int i = 0; i < spec.head_dim; ++i) head[i] = round_to_dtype(head[i], spec.dtype);
    if (zeroed_dim >= 0) head[zeroed_dim] = 0.0f;
    apply_rope(head, spec.head_dim, spec.rope, position);
    if (zeroed_dim >= 0) head[zeroed_dim] = 0.0f;
  }
  round_in_place(q, spec.dtype);
  return q;
}

}  // namespace kvc::reference

namespace kvc::reference {

//! The key a cache stores for a pre-RoPE key: rounded input, RoPE at `position`, rounded again.
//! `zeroed_dim` (>= 0) is zeroed before and after RoPE.
inline std::vector<float> rotated_key(LayerSpec const& spec, float const* k_pre_rope,
                                      std::int64_t position, int zeroed_dim = -1) {
  std::vector<float> key(k_pre_rope, k_pre_rope + spec.head_dim);
  round_in_place(key, spec.dtype);
  if (zeroed_dim >= 0) key[zeroed_dim] = 0.0f;
  apply_rope(key.data(), spec.head_dim, spec.rope, position);
  if (zeroed_dim >= 0) key[zeroed_dim] = 0.0f;
  round_in_place(key, spec.dtype);
  return key;
}

//! Appends one slot (key already as stored) to a head.
inline void push_slot(HeadCache& head, std::vector<float> const& key, float const* value,
                      int head_dim, DType dtype, std::int64_t position, bool with_score) {
  head.k.insert(head.k.end(), key.begin(), key.end());
  for (int i = 0; i < head_dim; ++i) head.v.push_back(round_to_dtype(value[i], dtype));
  head.position.push_back(position);
  if (with_score) head.score.push_back(0.0f);
}

//! Moves slot `from` onto slot `to` (k, v, position, score) and drops the last slot, which must
//! be `from`. This is how an evicting policy lets the newcomer reuse the victim's slot.
inline void move_last_slot_to(HeadCache& head, int to, int head_dim) {
  int const from = head.size() - 1;
  if (to != from) {
    std::copy_n(head.k.begin() + static_cast<std::ptrdiff_t>(from) * head_dim, head_dim,
                head.k.begin() + static_cast<std::ptrdiff_t>(to) * head_dim);
    std::copy_n(head.v.begin() + static_cast<std::ptrdiff_t>(from) * head_dim, head_dim,
                head.v.begin() + static_cast<std::ptrdiff_t>(to) * head_dim);
    head.position[to] = head.position[from];
    if (!head.score.empty()) head.score[to] = head.score[from];
  }
  head.k.resize(head.k.size() - head_dim);
  head.v.resize(head.v.size() - head_dim);
  head.position.pop_back();
  if (!head.score.empty()) head.score.pop_back();
}

//! Keeps the slots whose `keep` flag is set, in ascending position order.
inline void keep_slots_by_position(HeadCache& head, std::vector<bool> const& keep, int head_dim) {
  std::vector<int> order;
  for (int s = 0; s < head.size(); ++s) {
    if (keep[s]) order.push_back(s);
  }
  std::sort(order.begin(), order.end(),
            [&](int a, int b) { return head.position[a] < head.position[b]; });
  HeadCache kept;
  for (int s : order) {
    kept.k.insert(kept.k.end(), head.k.begin() + static_cast<std::ptrdiff_t>(s) * head_dim,
                  head.k.begin() + static_cast<std::ptrdiff_t>(s + 1) * head_dim);
    kept.v.insert(kept.v.end(), head.v.begin() + static_cast<std::ptrdiff_t>(s) * head_dim,
                  head.v.begin() + static_cast<std::ptrdiff_t>(s + 1) * head_dim);
    kept.position.push_back(head.position[s]);
    if (!head.score.empty()) kept.score.push_back(head.score[s]);
  }
  head = std::move(kept);
}

}  // namespace kvc::reference

namespace kvc::detail {

//! kSuccess when every head of `heads` has consistent k, v, position and score sizes for
//! `spec`, and every position lies in [0, tokens_seen).
inline Status check_scored_heads(reference::LayerSpec const& spec,
                                 std::vector<reference::HeadCache> const& heads,
                                 std::int64_t tokens_seen) {
  if (static_cast<int>(heads.size()) != spec.num_kv_heads) return Status::kErrorSizeMismatch;
  if (tokens_seen < 0) return Status::kErrorInvalidArgument;
  std::size_t const d = static_cast<std::size_t>(spec.head_dim);
  for (reference::HeadCache const& head : heads) {
    std::size_t const slots = head.position.size();
    if (head.k.size() != slots * d || head.v.size() != slots * d || head.score.size() != slots) {
      return Status::kErrorSizeMismatch;
    }
    if (static_cast<std::int64_t>(slots) > tokens_seen) return Status::kErrorInvalidArgument;
    for (std::int64_t position : head.position) {
      if (position < 0 || position >= tokens_seen) return Status::kErrorInvalidArgument;
    }
  }
  return Status::kSuccess;
}

//! Appends token `t` (pre-RoPE k and v of `input`) as a new slot with score 0 to every KV head.
//! // heads: [num_kv_heads]
inline void push_scored_token(reference::LayerSpec const& spec, reference::DecodeInput const& input,
                              std::int64_t t, std::vector<reference::HeadCache>& heads) {
  int const d = spec.head_dim;
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    std::size_t const row = static_cast<std::size_t>(h) * d;
    reference::push_slot(heads[h], reference::rotated_key(spec, input.k.data + row, t),
                         input.v.data + row, d, spec.dtype, t, true);
  }
}

}  // namespace kvc::detail
