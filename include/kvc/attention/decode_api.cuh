//! @file
//! Host API of decode attention over the paged per-head store, CUB-like: ask for the workspace
//! size, then run on a stream. No hidden allocation, no synchronisation, no device-to-host copy;
//! a call is two kernel launches (a one-block plan kernel and the persistent attention kernel)
//! with a grid that depends only on the device, so it can be captured in a CUDA graph.
//!
//!   kvc::DecodeParams params = kvc::make_decode_params(view, q, seq_slots, batch, hq, out, lse);
//!   std::size_t bytes = 0;
//!   kvc::decode_attention_workspace_size(params, bytes);   // once per shape
//!   params.workspace = my_scratch; params.workspace_bytes = bytes;
//!   kvc::decode_attention(params, stream);                 // every step
//!
//! The non-template entry points live in the `kvc_decode_instances` library (precompiled for
//! head dims {64, 128, 256} x {fp16, bf16, fp32} x group sizes {1, 2, 4, 8}, DefaultVariant).
//! Header-only users include kvc/attention/decode.cuh instead and call
//! `DecodeAttention<Variant, T, kHeadDim, kGroupSize>` or `decode_attention<Variant>` directly.
//! This header itself holds only declarations (no kernels).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "kvc/attention/params.hpp"
#include "kvc/attention/variant.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

//! One compiled decode-attention configuration. The members are defined in
//! kvc/attention/decode.cuh; kvc_decode_instances instantiates them explicitly.
//! @tparam Variant     a DecodeVariant (kvc/attention/variant.hpp)
//! @tparam T           float, half or __nv_bfloat16 (q, out, K and V)
//! @tparam kHeadDim    64, 128 or 256
//! @tparam kGroupSize  query heads per KV head: 1, 2, 4 or 8
template <class Variant, class T, int kHeadDim, int kGroupSize>
struct DecodeAttention {
  //! Device bytes of workspace a call with this shape needs on the current device.
  static Status workspace_size(DecodeParams const& params, std::size_t& bytes);
  //! Validates `params` and enqueues the plan and attention kernels on `stream`.
  static Status run(DecodeParams const& params, cudaStream_t stream);
};

//! @brief Workspace bytes `decode_attention` needs for the shape in `params` (batch, head counts,
//! head dim, dtype) on the current device. Reads no device memory.
//! @return kSuccess; kErrorNotSupported for a (dtype, head dim, group size) without a compiled
//!         kernel; kErrorInvalidShape / kErrorInvalidArgument for inconsistent sizes;
//!         kErrorCuda / kErrorNoDevice when the device cannot be queried.
Status decode_attention_workspace_size(DecodeParams const& params, std::size_t& bytes);

//! @brief One decode step of attention for one layer, enqueued on `stream` (DefaultVariant).
//! @return kSuccess once enqueued; errors as for the size query, plus kErrorInvalidArgument for
//!         null or misaligned (16-byte) pointers, an invalid scale or score stride, and
//!         kErrorSizeMismatch when `workspace_bytes` is below the size query's answer. Nothing
//!         is launched unless kSuccess is returned.
Status decode_attention(DecodeParams const& params, cudaStream_t stream);

//! True when kvc_decode_instances holds a kernel for (dtype, head dim, group size).
bool decode_attention_supported(DType dtype, int head_dim, int group_size);

}  // namespace kvc
