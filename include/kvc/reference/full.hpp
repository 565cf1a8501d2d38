//! @file
//! CPU reference of the full cache: every token appends one slot per KV head.
#pragma once

#include <vector>

#include "kvc/policy/full.hpp"
#include "kvc/reference/attention.hpp"
#include "kvc/reference/chunk.hpp"
#include "kvc/reference/types.hpp"

namespace kvc::reference {

//! Full-cache state of one (sequence, layer).
struct FullLayerState {
  std::vector<HeadCache> heads;  //!< [num_kv_heads]
  std::int64_t tokens_seen = 0;  //!< position of the next token
};

inline FullLayerState make_full_state(LayerSpec const& spec) {
  FullLayerState state;
  state.heads.resize(spec.num_kv_heads);
  return state;
}

//! One decode token: append, then attend over every slot.
inline Status full_decode_step(LayerSpec const& spec, FullConfig const&, FullLayerState& state,
                               DecodeInput const& input, AttentionOutput& output) {
  KVC_RETURN_IF_ERROR(check_decode_input(spec, input));
  if (static_cast<int>(state.heads.size()) != spec.num_kv_heads) return Status::kErrorSizeMismatch;
  int const d = spec.head_dim;
  std::int64_t const position = state.tokens_seen;
  std::vector<HeadCache> heads = state.heads;
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    push_slot(heads[h], rotated_key(spec, input.k.data + static_cast<std::size_t>(h) * d, position),
              input.v.data + static_cast<std::size_t>(h) * d, d, spec.dtype, position, false);
  }
  std::vector<float> const q = rotated_query(spec, input.q.data, position);
  KVC_RETURN_IF_ERROR(decode_attention(spec, q, heads, output));
  state.heads = std::move(heads);
  state.tokens_seen += 1;
  return Status::kSuccess;
}

//! A prompt chunk (the first one, or appended to what is cached): causal attention, all kept.
inline Status full_prefill(LayerSpec const& spec, FullConfig const&, FullLayerState& state,
                           PrefillInput const& input, AttentionOutput& output) {
  std::vector<HeadCache> extended;
  KVC_RETURN_IF_ERROR(
      attend_chunk(spec, state.heads, input, state.tokens_seen, false, extended, output, nullptr));
  state.heads = std::move(extended);
  state.tokens_seen += input.num_tokens;
  return Status::kSuccess;
}

}  // namespace kvc::reference
