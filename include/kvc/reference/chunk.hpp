//! @file
//! Attention of a prompt chunk appended to an existing cache, shared by the reference prefill of
//! the full, H2O and TOVA policies: the chunk's queries see every cached slot plus the chunk
//! causally. Returns the cache extended by the chunk's tokens (one slot per token).
#pragma once

#include <vector>

#include "kvc/reference/attention.hpp"
#include "kvc/reference/types.hpp"

namespace kvc::reference {

//! Extends `heads` (copied) by the chunk's keys/values at positions first_position + i and runs
//! the chunk's attention. `with_score` adds a zero score per new slot. Nothing is modified on
//! error.
inline Status attend_chunk(LayerSpec const& spec, std::vector<HeadCache> const& heads,
                           PrefillInput const& input, std::int64_t first_position, bool with_score,
                           std::vector<HeadCache>& extended, AttentionOutput& output,
                           AttentionProbabilities* probabilities) {
  KVC_RETURN_IF_ERROR(check_prefill_input(spec, input));
  if (static_cast<int>(heads.size()) != spec.num_kv_heads) return Status::kErrorSizeMismatch;
  int const d = spec.head_dim;
  std::vector<HeadCache> grown = heads;
  std::vector<int> cached(spec.num_kv_heads);
  for (int h = 0; h < spec.num_kv_heads; ++h) cached[h] = grown[h].size();
  std::vector<float> q_rotated;
  q_rotated.reserve(static_cast<std::size_t>(input.num_tokens) * spec.num_q_heads * d);
  for (int t = 0; t < input.num_tokens; ++t) {
    std::int64_t const position = first_position + t;
    std::vector<float> const q = rotated_query(
        spec, input.q.data + static_cast<std::size_t>(t) * spec.num_q_heads * d, position);
    q_rotated.insert(q_rotated.end(), q.begin(), q.end());
    for (int h = 0; h < spec.num_kv_heads; ++h) {
      std::size_t const offset = (static_cast<std::size_t>(t) * spec.num_kv_heads + h) * d;
      push_slot(grown[h], rotated_key(spec, input.k.data + offset, position), input.v.data + offset,
                d, spec.dtype, position, with_score);
    }
  }
  Visibility const visible = [&cached](int query, int kv_head, int slot) {
    return slot < cached[kv_head] || slot - cached[kv_head] <= query;
  };
  KVC_RETURN_IF_ERROR(attention(spec, input.num_tokens, q_rotated, grown, visible, output, probabilities));
  extended = std::move(grown);
  return Status::kSuccess;
}

}  // namespace kvc::reference
