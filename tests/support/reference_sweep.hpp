//! @file
//! The layer shapes, dtypes and RoPE layouts that the long random runs of the evicting host
//! reference tests sweep, crossed with a policy's configs.
#pragma once

#include <cstddef>

#include "kvc/core/dtype.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/reference/types.hpp"

#include "reference_inputs.hpp"

namespace kvc::test {

//! Calls `body(spec, config)` for every (shape, config) pair, shapes outermost: shapes
//! (Hq, Hkv, D) = (2, 2, 16), (8, 2, 16), (8, 1, 32), (16, 2, 8); the dtype cycles through f32,
//! f16, bf16 with the pair's index i, the RoPE layout through rotate-half, interleaved, none
//! with i / 3.
template <class Config, std::size_t N, class Body>
void for_each_swept_spec(Config const (&configs)[N], Body&& body) {
  struct Shape {
    int q_heads, kv_heads, head_dim;
  };
  Shape const shapes[] = {{2, 2, 16}, {8, 2, 16}, {8, 1, 32}, {16, 2, 8}};
  DType const dtypes[] = {DType::kF32, DType::kF16, DType::kBF16};
  RopeLayout const layouts[] = {RopeLayout::kRotateHalf, RopeLayout::kInterleaved,
                                RopeLayout::kNone};
  int index = 0;
  for (Shape const& shape : shapes) {
    for (Config const& config : configs) {
      DType const dtype = dtypes[index % 3];
      RopeLayout const layout = layouts[(index / 3) % 3];
      ++index;
      reference::LayerSpec const spec =
          make_spec(shape.q_heads, shape.kv_heads, shape.head_dim, dtype, layout);
      body(spec, config);
    }
  }
}

}  // namespace kvc::test
