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

namespace detail {

//! A KVCache backend of one compiled attention class `Kernel` (DecodeAttention or
//! PrefillAttention of (T, kHeadDim, kGroupSize)); `Params` is that class's argument struct.
template <class Kernel, class Params, class T, int kHeadDim, int kGroupSize>
struct OneKernelBackend {
  static bool supported(DType dtype, int head_dim, int group_size) {
    return dtype == DTypeTraits<T>::kDType && head_dim == kHeadDim && group_size == kGroupSize;
  }
  static Status workspace_size(Params const& params, std::size_t& bytes) {
    return Kernel::workspace_size(params, bytes);
  }
  static Status run(Params const& params, cudaStream_t stream) {
    return Kernel::run(params, stream);
  }
};

}  // namespace detail

//! One compiled decode-attention configuration as a KVCache backend.
//! @tparam Variant     a DecodeVariant (kvc/attention/variant.hpp)
//! @tparam T           float, half or __nv_bfloat16
//! @tparam kHeadDim    64, 128 or 256
//! @tparam kGroupSize  1, 2, 4 or 8
template <class Variant, class T, int kHeadDim, int kGroupSize>
using InstantiatedDecodeAttention =
    detail::OneKernelBackend<DecodeAttention<Variant, T, kHeadDim, kGroupSize>, DecodeParams, T,
                             kHeadDim, kGroupSize>;

//! One compiled prefill-attention configuration as a KVCache prefill backend (same parameters).
template <class Variant, class T, int kHeadDim, int kGroupSize>
using InstantiatedPrefillAttention =
    detail::OneKernelBackend<PrefillAttention<Variant, T, kHeadDim, kGroupSize>, PrefillParams, T,
                             kHeadDim, kGroupSize>;

}  // namespace kvc
