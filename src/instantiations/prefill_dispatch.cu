// The non-template host entry points of prefill attention in kvc_prefill_instances: runtime
// (dtype, head dim, group size) -> the explicitly instantiated PrefillAttention<DefaultVariant, T,
// D, G>. Only declarations of those members are visible here (kvc/attention/prefill_api.cuh);
// their definitions come from the generated instance files, so this file compiles no kernel.
#include "kvc/attention/dispatch.hpp"
#include "kvc/attention/prefill_api.cuh"

namespace kvc {
namespace {

// Must match the set that cmake/KvcKernels.cmake generates.
#if KVC_PREFILL_MINIMAL
using CompiledDTypes = ValueList<DType::kBF16>;
using CompiledHeadDims = ValueList<128>;
using CompiledGroupSizes = ValueList<4>;
#else
using CompiledDTypes = ValueList<DType::kF16, DType::kBF16, DType::kF32>;
using CompiledHeadDims = ValueList<64, 128, 256>;
using CompiledGroupSizes = ValueList<1, 2, 4, 8>;
#endif

template <class Fn>
Status dispatch_compiled(PrefillParams const& params, Fn&& fn) {
  if (params.cache.num_kv_heads <= 0 || params.num_q_heads <= 0 ||
      params.num_q_heads % params.cache.num_kv_heads != 0) {
    return Status::kErrorInvalidShape;
  }
  return dispatch(
      [&](auto dtype, auto head_dim, auto group) {
        using Instance = PrefillAttention<DefaultVariant, StorageType<decltype(dtype)::value>,
                                          decltype(head_dim)::value, decltype(group)::value>;
        return fn(Instance{});
      },
      choose(params.dtype, CompiledDTypes{}), choose(params.cache.head_dim, CompiledHeadDims{}),
      choose(params.group_size(), CompiledGroupSizes{}));
}

}  // namespace

Status prefill_attention_workspace_size(PrefillParams const& params, std::size_t& bytes) {
  return dispatch_compiled(
      params, [&](auto instance) { return decltype(instance)::workspace_size(params, bytes); });
}

Status prefill_attention(PrefillParams const& params, cudaStream_t stream) {
  return dispatch_compiled(params,
                           [&](auto instance) { return decltype(instance)::run(params, stream); });
}

bool prefill_attention_supported(DType dtype, int head_dim, int group_size) {
  return contains(CompiledDTypes{}, dtype) && contains(CompiledHeadDims{}, head_dim) &&
         contains(CompiledGroupSizes{}, group_size);
}

}  // namespace kvc
