// The non-template host entry points of prefill attention in kvc_prefill_instances: runtime
// (dtype, head dim, group size) -> the explicitly instantiated PrefillAttention<DefaultVariant, T,
// D, G>. Only declarations of those members are visible here (kvc/attention/prefill_api.cuh);
// their definitions come from the generated instance files, so this file compiles no kernel.
#include "kvc/attention/prefill_api.cuh"

#include "compiled_set.hpp"

namespace kvc {

Status prefill_attention_workspace_size(PrefillParams const& params, std::size_t& bytes) {
  return detail::dispatch_compiled<PrefillAttention>(
      params, [&](auto instance) { return decltype(instance)::workspace_size(params, bytes); });
}

Status prefill_attention(PrefillParams const& params, cudaStream_t stream) {
  return detail::dispatch_compiled<PrefillAttention>(
      params, [&](auto instance) { return decltype(instance)::run(params, stream); });
}

bool prefill_attention_supported(DType dtype, int head_dim, int group_size) {
  return detail::compiled_supported(dtype, head_dim, group_size);
}

}  // namespace kvc
