//! @file
//! The (dtype, head dim, group size) set compiled into kvc_decode_instances and
//! kvc_prefill_instances (must match the set that cmake/KvcKernels.cmake generates), and the
//! runtime dispatch of one family's parameters onto that set. Included by the dispatchers
//! src/instantiations/{decode,prefill}_dispatch.cu only.
#pragma once

#include "kvc/attention/dispatch.hpp"
#include "kvc/attention/variant.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/status.hpp"

namespace kvc {
namespace detail {

#if KVC_INSTANCES_MINIMAL
using CompiledDTypes = ValueList<DType::kBF16>;
using CompiledHeadDims = ValueList<128>;
using CompiledGroupSizes = ValueList<4>;
#else
using CompiledDTypes = ValueList<DType::kF16, DType::kBF16, DType::kF32>;
using CompiledHeadDims = ValueList<64, 128, 256>;
using CompiledGroupSizes = ValueList<1, 2, 4, 8>;
#endif

//! Calls `fn(Attention<DefaultVariant, T, kHeadDim, kGroupSize>{})` for the compiled instance
//! matching `params` (DecodeParams or PrefillParams); kErrorInvalidShape for head counts that do
//! not form a group, kErrorNotSupported for a configuration outside the compiled set.
template <template <class, class, int, int> class Attention, class Params, class Fn>
Status dispatch_compiled(Params const& params, Fn&& fn) {
  if (params.cache.num_kv_heads <= 0 || params.num_q_heads <= 0 ||
      params.num_q_heads % params.cache.num_kv_heads != 0) {
    return Status::kErrorInvalidShape;
  }
  return dispatch(
      [&](auto dtype, auto head_dim, auto group) {
        using Instance = Attention<DefaultVariant, StorageType<decltype(dtype)::value>,
                                   decltype(head_dim)::value, decltype(group)::value>;
        return fn(Instance{});
      },
      choose(params.dtype, CompiledDTypes{}), choose(params.cache.head_dim, CompiledHeadDims{}),
      choose(params.group_size(), CompiledGroupSizes{}));
}

//! True when (dtype, head dim, group size) is in the compiled set.
inline bool compiled_supported(DType dtype, int head_dim, int group_size) {
  return contains(CompiledDTypes{}, dtype) && contains(CompiledHeadDims{}, head_dim) &&
         contains(CompiledGroupSizes{}, group_size);
}

}  // namespace detail
}  // namespace kvc
