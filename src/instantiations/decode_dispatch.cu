// The non-template host entry points of kvc_decode_instances: runtime (dtype, head dim, group
// size) -> the explicitly instantiated DecodeAttention<DefaultVariant, T, D, G>. Only
// declarations of those members are visible here (kvc/attention/decode_api.cuh); their
// definitions come from the generated instance files, so this file compiles no kernel.
#include "kvc/attention/decode_api.cuh"

#include "compiled_set.hpp"

namespace kvc {

Status decode_attention_workspace_size(DecodeParams const& params, std::size_t& bytes) {
  return detail::dispatch_compiled<DecodeAttention>(
      params, [&](auto instance) { return decltype(instance)::workspace_size(params, bytes); });
}

Status decode_attention(DecodeParams const& params, cudaStream_t stream) {
  return detail::dispatch_compiled<DecodeAttention>(
      params, [&](auto instance) { return decltype(instance)::run(params, stream); });
}

bool decode_attention_supported(DType dtype, int head_dim, int group_size) {
  return detail::compiled_supported(dtype, head_dim, group_size);
}

}  // namespace kvc
