// The non-template host entry points of kvc_decode_instances: runtime (dtype, head dim, group
// size) -> the explicitly instantiated DecodeAttention<DefaultVariant, T, D, G>. Only
// declarations of those members are visible here (kvc/attention/decode_api.cuh); their
// definitions come from the generated instance files, so this file compiles no kernel.
#include "kvc/attention/decode_api.cuh"
#include "kvc/attention/dispatch.hpp"

namespace kvc {
namespace {

// Must match the set that cmake/KvcKernels.cmake generates.
#if KVC_DECODE_MINIMAL
using CompiledDTypes = ValueList<DType::kBF16>;
using CompiledHeadDims = ValueList<128>;
using CompiledGroupSizes = ValueList<4>;
#else
using CompiledDTypes = ValueList<DType::kF16, DType::kBF16, DType::kF32>;
using CompiledHeadDims = ValueList<64, 128, 256>;
using CompiledGroupSizes = ValueList<1, 2, 4, 8>;
#endif

template <class Fn>
Status dispatch_compiled(DecodeParams const& params, Fn&& fn) {
  if (params.cache.num_kv_heads <= 0 || params.num_q_heads <= 0 ||
      params.num_q_heads % params.cache.num_kv_heads != 0) {
    return Status::kErrorInvalidShape;
  }
  return dispatch(
      [&](auto dtype, auto head_dim, auto group) {
        using Instance = DecodeAttention<DefaultVariant, StorageType<decltype(dtype)::value>,
                                         decltype(head_dim)::value, decltype(group)::value>;
        return fn(Instance{});
      },
      choose(params.dtype, CompiledDTypes{}), choose(params.cache.head_dim, CompiledHeadDims{}),
      choose(params.group_size(), CompiledGroupSizes{}));
}

}  // namespace

Status decode_attention_workspace_size(DecodeParams const& params, std::size_t& bytes) {
  return dispatch_compiled(params, [&](auto instance) { return decltype(instance)::workspace_size(params, bytes); });
}

Status decode_attention(DecodeParams const& params, cudaStream_t stream) {
  return dispatch_compiled(params, [&](auto instance) { return decltype(instance)::run(params, stream); });
}

bool decode_attention_supported(DType dtype, int head_dim, int group_size) {
  return contains(CompiledDTypes{}, dtype) && contains(CompiledHeadDims{}, head_dim) &&
         contains(CompiledGroupSizes{}, group_size);
}

}  // namespace kvc
