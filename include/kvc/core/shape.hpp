//! @file
//! The attention shape of a model: layers, query heads, KV heads and head dim, with validation.
#pragma once

#include "kvc/core/macros.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

//! Head dims with compiled kernels. The CPU reference accepts any even head dim >= 2.
inline constexpr int kSupportedHeadDims[] = {64, 128, 256};
//! GQA group sizes with compiled kernels.
inline constexpr int kSupportedGroupSizes[] = {1, 2, 4, 8};

//! Attention shape of a model. `num_q_heads = group_size() * num_kv_heads` (group size 1 is MHA).
struct ModelShape {
  int num_layers = 1;
  int num_q_heads = 1;
  int num_kv_heads = 1;
  int head_dim = 128;

  KVC_HOST_DEVICE int group_size() const { return num_q_heads / num_kv_heads; }

  //! kSuccess when every count is positive, q heads are a multiple of KV heads and the head dim is
  //! even (RoPE pairs dims); kErrorInvalidShape otherwise. Counts are capped at 1<<16 so that every
  //! product of them fits in 64-bit offsets with room to spare.
  Status validate() const {
    constexpr int kMaxCount = 1 << 16;
    if (num_layers <= 0 || num_q_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0) {
      return Status::kErrorInvalidShape;
    }
    if (num_layers > kMaxCount || num_q_heads > kMaxCount || head_dim > kMaxCount) {
      return Status::kErrorInvalidShape;
    }
    if (num_q_heads % num_kv_heads != 0 || head_dim % 2 != 0) return Status::kErrorInvalidShape;
    return Status::kSuccess;
  }

  //! `validate()`, and the head dim and group size have compiled kernels (kErrorNotSupported).
  Status validate_for_kernels() const {
    KVC_RETURN_IF_ERROR(validate());
    bool head_dim_ok = false;
    for (int supported : kSupportedHeadDims) head_dim_ok = head_dim_ok || supported == head_dim;
    bool group_ok = false;
    for (int supported : kSupportedGroupSizes) group_ok = group_ok || supported == group_size();
    return head_dim_ok && group_ok ? Status::kSuccess : Status::kErrorNotSupported;
  }
};

}  // namespace kvc
