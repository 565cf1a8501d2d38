//! @file
//! libFuzzer target over the trace config reader (kvc/io/trace.hpp, parse_trace_config): any
//! byte string is parsed as JSON and, when it parses, validated as a trace's config.json. A
//! config that validates must describe a valid layer and policy (LayerCache::create accepts it);
//! one that does not must leave the output untouched.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvc/io/trace.hpp"
#include "kvc/reference/layer_cache.hpp"

#include "fuzz_check.hpp"

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  std::string_view const text(reinterpret_cast<char const*>(data), size);
  kvc::io::JsonValue json;
  if (!kvc::io::parse_json(text, json).ok()) return 0;
  kvc::io::TraceConfig config;
  config.prompt_tokens = -7;
  kvc::io::IoStatus const status = kvc::io::parse_trace_config(json, config);
  if (!status.ok()) {
    KVC_FUZZ_CHECK(!status.message.empty());
    KVC_FUZZ_CHECK(config.prompt_tokens == -7);
    return 0;
  }
  KVC_FUZZ_CHECK(config.prompt_tokens >= 0);
  KVC_FUZZ_CHECK(config.spec.validate() == kvc::Status::kSuccess);
  KVC_FUZZ_CHECK(config.policy.validate(config.spec.head_dim) == kvc::Status::kSuccess);
  kvc::reference::LayerCache cache;
  KVC_FUZZ_CHECK(kvc::reference::LayerCache::create(config.spec, config.policy, cache) ==
                 kvc::Status::kSuccess);
  return 0;
}
