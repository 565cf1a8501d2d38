//! @file
//! Host API of causal (and DMC-masked) prefill attention over a batch of packed prompt chunks and
//! their cached prefixes in the paged store, CUB-like: ask for the workspace size, then run on a
//! stream. No hidden allocation, no synchronisation, no device-to-host copy. A call enqueues a
//! one-block plan kernel and one persistent attention kernel (plus, when scores are requested,
//! one score kernel); the grids depend only on the device, the instantiation and the host-known
//! sizes (batch, total_tokens, heads), so the launches can be captured in a CUDA graph.
//!
//!   kvc::PrefillParams p = kvc::make_prefill_params(view, q, k, v, cu_tokens, seq_slots,
//!                                                   batch, total_tokens, hq, out, lse);
//!   p.prefix_lengths = prefix;           // optional (DMC hides the open slot)
//!   p.chunk_key_visible = mask;          // optional (DMC)
//!   std::size_t bytes = 0;
//!   kvc::prefill_attention_workspace_size(p, bytes);
//!   p.workspace = scratch; p.workspace_bytes = bytes;
//!   kvc::prefill_attention(p, stream);
//!
//! The non-template entry points live in the `kvc_prefill_instances` library (DefaultVariant,
//! head dims {64, 128, 256} x {fp16, bf16, fp32} x group sizes {1, 2, 4, 8}; with KVC_CI_MINIMAL
//! only bf16, 128, 4). Header-only users include kvc/attention/prefill.cuh and call
//! `PrefillAttention<Variant, T, kHeadDim, kGroupSize>` or `prefill_attention<Variant>`.
//! This header holds only declarations (no kernels). Semantics: kvc/attention/prefill_params.hpp.
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "kvc/attention/prefill_params.hpp"
#include "kvc/attention/variant.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

//! One compiled prefill-attention configuration. The members are defined in
//! kvc/attention/prefill.cuh; kvc_prefill_instances instantiates them explicitly.
//! @tparam Variant     a DecodeVariant (kvc/attention/variant.hpp); it is built from
//!                     `decode_params_of(params)` and validated on it, unless it has a
//!                     constructor and `validate` taking PrefillParams, which are then used
//! @tparam T           float, half or __nv_bfloat16
//! @tparam kHeadDim    64, 128 or 256
//! @tparam kGroupSize  query heads per KV head: 1, 2, 4 or 8
template <class Variant, class T, int kHeadDim, int kGroupSize>
struct PrefillAttention {
  //! Device bytes of workspace a call with this shape needs on the current device.
  static Status workspace_size(PrefillParams const& params, std::size_t& bytes);
  //! Validates `params` and enqueues the plan, attention (and score) kernels on `stream`.
  static Status run(PrefillParams const& params, cudaStream_t stream);
};

//! @brief Workspace bytes `prefill_attention` needs for the shape in `params` (batch,
//! total_tokens, head counts, head dim, dtype, whether scores are on) on the current device.
//! Reads no device memory.
//! @return kSuccess; kErrorNotSupported for a (dtype, head dim, group size) without a compiled
//!         kernel; kErrorInvalidShape for inconsistent sizes; kErrorNoDevice / kErrorCuda when the
//!         device cannot be queried.
Status prefill_attention_workspace_size(PrefillParams const& params, std::size_t& bytes);

//! @brief Prefill attention of one layer for a batch of chunks, enqueued on `stream`
//! (DefaultVariant).
//! @return kSuccess once enqueued; errors as for the size query, plus kErrorInvalidArgument for
//!         null or misaligned (16-byte) pointers, a bad scale, score stride or mode, page geometry;
//!         kErrorSizeMismatch when `workspace_bytes` is below the size query's answer. Nothing is
//!         launched unless kSuccess is returned.
Status prefill_attention(PrefillParams const& params, cudaStream_t stream);

//! True when kvc_prefill_instances holds a kernel for (dtype, head dim, group size).
bool prefill_attention_supported(DType dtype, int head_dim, int group_size);

}  // namespace kvc
