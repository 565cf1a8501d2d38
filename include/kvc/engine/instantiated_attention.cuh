//! @file
//! `kvc::InstantiatedDecodeAttention<Variant, T, D, G>` and `InstantiatedPrefillAttention<...>`:
//! `BasicKVCache` backends that compile exactly one decode- or prefill-attention configuration in
//! the including file (header-only, no instance library to link, any variant such as
//! SoftCapVariant). `create` refuses every other (dtype, head dim, group size) with
//! kErrorNotSupported.
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

#include "kvc/attention/decode.cuh"
#include "kvc/attention/params.hpp"
#include "kvc/attention/prefill.cuh"
#include "kvc/core/dtype.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

//! One compiled decode-attention configuration as a KVCache backend.
//! @tparam Variant     a DecodeVariant (kvc/attention/variant.hpp)
//! @tparam T           float, half or __nv_bfloat16
//! @tparam kHeadDim    64, 128 or 256
//! @tparam kGroupSize  1, 2, 4 or 8
template <class Variant, class T, int kHeadDim, int kGroupSize>
struct InstantiatedDecodeAttention {
  using Kernel = DecodeAttention<Variant, T, kHeadDim, kGroupSize>;

  static bool supported(DType dtype, int head_dim, int group_size) {
    return dtype == DTypeTraits<T>::kDType && head_dim == kHeadDim && group_size == kGroupSize;
  }
  static Status workspace_size(DecodeParams const& params, std::size_t& bytes) {
    return Kernel::workspace_size(params, bytes);
  }
  static Status run(DecodeParams const& params, cudaStream_t stream) {
    return Kernel::run(params, stream);
  }
};

//! One compiled prefill-attention configuration as a KVCache prefill backend (same parameters).
template <class Variant, class T, int kHeadDim, int kGroupSize>
struct InstantiatedPrefillAttention {
  using Kernel = PrefillAttention<Variant, T, kHeadDim, kGroupSize>;

  static bool supported(DType dtype, int head_dim, int group_size) {
    return dtype == DTypeTraits<T>::kDType && head_dim == kHeadDim && group_size == kGroupSize;
  }
  static Status workspace_size(PrefillParams const& params, std::size_t& bytes) {
    return Kernel::workspace_size(params, bytes);
  }
  static Status run(PrefillParams const& params, cudaStream_t stream) {
    return Kernel::run(params, stream);
  }
};

}  // namespace kvc
