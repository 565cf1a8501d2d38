//! @file
//! Random per-token inputs for the host reference tests: a layer spec builder, pre-RoPE q/k/v of
//! a whole run, decode and prefill views into them, and the rounded, rotated vector a cache stores.
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/reference/types.hpp"

#include "test_support.hpp"

namespace kvc::test {

//! A layer spec with the given shape, dtype and RoPE layout (other fields at their defaults).
inline reference::LayerSpec make_spec(int q_heads, int kv_heads, int head_dim, DType dtype,
                                      RopeLayout layout = RopeLayout::kRotateHalf) {
  reference::LayerSpec spec;
  spec.num_q_heads = q_heads;
  spec.num_kv_heads = kv_heads;
  spec.head_dim = head_dim;
  spec.dtype = dtype;
  spec.rope.layout = layout;
  return spec;
}

//! Pre-RoPE inputs of a run, indexed by token position: q [T, Hq, D], k and v [T, Hkv, D].
struct Inputs {
  std::vector<float> q, k, v;
};

//! Fresh normal inputs for `tokens` positions (q and k with stddev 1.5, v with stddev 1).
inline Inputs random_inputs(std::mt19937_64& rng, reference::LayerSpec const& spec, int tokens) {
  std::size_t const t = static_cast<std::size_t>(tokens);
  Inputs in;
  in.q = random_normal(rng, t * spec.num_q_heads * spec.head_dim, DType::kF32, 1.5f);
  in.k = random_normal(rng, t * spec.num_kv_heads * spec.head_dim, DType::kF32, 1.5f);
  in.v = random_normal(rng, t * spec.num_kv_heads * spec.head_dim);
  return in;
}

//! The decode input of token `t`.
inline reference::DecodeInput token_input(reference::LayerSpec const& spec, Inputs const& in,
                                          std::int64_t t) {
  std::size_t const qs = static_cast<std::size_t>(spec.num_q_heads) * spec.head_dim;
  std::size_t const ks = static_cast<std::size_t>(spec.num_kv_heads) * spec.head_dim;
  return reference::DecodeInput{reference::ConstSpan(in.q.data() + t * qs, qs),
                                reference::ConstSpan(in.k.data() + t * ks, ks),
                                reference::ConstSpan(in.v.data() + t * ks, ks)};
}

//! The prefill input of tokens [start, start + count).
inline reference::PrefillInput chunk_input(reference::LayerSpec const& spec, Inputs const& in,
                                           std::int64_t start, int count) {
  std::size_t const qs = static_cast<std::size_t>(spec.num_q_heads) * spec.head_dim;
  std::size_t const ks = static_cast<std::size_t>(spec.num_kv_heads) * spec.head_dim;
  return reference::PrefillInput{count, reference::ConstSpan(in.q.data() + start * qs, count * qs),
                                 reference::ConstSpan(in.k.data() + start * ks, count * ks),
                                 reference::ConstSpan(in.v.data() + start * ks, count * ks)};
}

//! Round to the dtype, rotate at `position`, round again: what a cache stores (and the q used).
inline std::vector<float> stored(reference::LayerSpec const& spec, float const* x,
                                 std::int64_t position) {
  std::vector<float> r(x, x + spec.head_dim);
  for (float& e : r) e = round_to_dtype(e, spec.dtype);
  apply_rope(r.data(), spec.head_dim, spec.rope, position);
  for (float& e : r) e = round_to_dtype(e, spec.dtype);
  return r;
}

}  // namespace kvc::test
