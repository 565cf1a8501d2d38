//! @file
//! Rotary position embedding (RoPE) as host/device maths. Layouts: none, rotate-half (dim i pairs
//! with i + D/2, as in Llama/Megatron/HF) and interleaved (dim 2i pairs with 2i + 1, as in GPT-J).
//! Angles are evaluated in double and rounded to float so the reference and kernels agree.
#pragma once

#include <cmath>
#include <cstdint>

#include "kvc/core/macros.hpp"
#include "kvc/core/math.hpp"

namespace kvc {

enum class RopeLayout : int { kNone = 0, kRotateHalf = 1, kInterleaved = 2 };

inline char const* rope_layout_name(RopeLayout layout) {
  switch (layout) {
    case RopeLayout::kNone: return "none";
    case RopeLayout::kRotateHalf: return "rotate_half";
    case RopeLayout::kInterleaved: return "interleaved";
  }
  return "?";
}

//! RoPE settings: layout and base theta. Position p rotates pair i by p * theta^(-2i/D).
struct RopeConfig {
  RopeLayout layout = RopeLayout::kRotateHalf;
  double theta = 10000.0;
};

//! Index of the pair (frequency) that `dim` belongs to, in [0, head_dim/2).
KVC_HOST_DEVICE int rope_pair_index(int dim, int head_dim, RopeLayout layout) {
  return layout == RopeLayout::kInterleaved ? dim / 2 : dim % (head_dim / 2);
}

//! The dim that `dim` is rotated together with.
KVC_HOST_DEVICE int rope_partner(int dim, int head_dim, RopeLayout layout) {
  if (layout == RopeLayout::kInterleaved) return dim ^ 1;
  int const half = head_dim / 2;
  return dim < half ? dim + half : dim - half;
}

//! True when `dim` is the first member of its pair (gets x*cos - partner*sin).
KVC_HOST_DEVICE bool rope_is_first(int dim, int head_dim, RopeLayout layout) {
  return layout == RopeLayout::kInterleaved ? (dim % 2 == 0) : dim < head_dim / 2;
}

//! The inverse frequency of pair `pair`, theta^(-2 pair / head_dim), in double.
KVC_HOST_DEVICE double rope_inv_freq(int pair, int head_dim, double theta) {
  return pow(theta, -2.0 * static_cast<double>(pair) / static_cast<double>(head_dim));
}

//! cos and sin of the angle position * inv_freq (inv_freq from rope_inv_freq).
KVC_HOST_DEVICE void rope_cos_sin_at(double inv_freq, std::int64_t position, float& cos_out,
                                     float& sin_out) {
  double const angle = static_cast<double>(position) * inv_freq;
#if KVC_IS_DEVICE_CODE
  // One argument reduction for both (CUDA's sincos gives the values of sin and cos).
  double sine = 0.0;
  double cosine = 0.0;
  sincos(angle, &sine, &cosine);
  cos_out = static_cast<float>(cosine);
  sin_out = static_cast<float>(sine);
#else
  cos_out = static_cast<float>(cos(angle));
  sin_out = static_cast<float>(sin(angle));
#endif
}

//! cos and sin of the angle of pair `pair` at position `position`.
KVC_HOST_DEVICE void rope_cos_sin(int pair, int head_dim, double theta, std::int64_t position,
                                  float& cos_out, float& sin_out) {
  rope_cos_sin_at(rope_inv_freq(pair, head_dim, theta), position, cos_out, sin_out);
}

//! Rotated value of element `dim`, given its own value `x` and its partner's value `partner`.
KVC_HOST_DEVICE float rope_rotate_element(float x, float partner, int dim, int head_dim,
                                          RopeConfig const& rope, std::int64_t position) {
  if (rope.layout == RopeLayout::kNone) return x;
  float c, s;
  rope_cos_sin(rope_pair_index(dim, head_dim, rope.layout), head_dim, rope.theta, position, c, s);
  return rope_is_first(dim, head_dim, rope.layout) ? sub_rn(mul_rn(x, c), mul_rn(partner, s))
                                                  : add_rn(mul_rn(x, c), mul_rn(partner, s));
}

//! Rotates a whole head vector in place. // x: [head_dim]
KVC_HOST_DEVICE void apply_rope(float* x, int head_dim, RopeConfig const& rope,
                                std::int64_t position) {
  if (rope.layout == RopeLayout::kNone) return;
  for (int dim = 0; dim < head_dim; ++dim) {
    int const partner = rope_partner(dim, head_dim, rope.layout);
    if (!rope_is_first(dim, head_dim, rope.layout)) continue;
    float const first = x[dim];
    float const second = x[partner];
    x[dim] = rope_rotate_element(first, second, dim, head_dim, rope, position);
    x[partner] = rope_rotate_element(second, first, partner, head_dim, rope, position);
  }
}

}  // namespace kvc
