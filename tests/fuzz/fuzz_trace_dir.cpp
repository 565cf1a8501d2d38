//! @file
//! libFuzzer target over the whole trace-directory reader (kvc/io/trace.hpp) without touching
//! the file system: the input is split at the first three occurrences of the separator
//! "\n--kvc--\n" into config.json, q.npy, k.npy and v.npy, which go through the same steps as
//! read_trace (parse_json, parse_trace_config, decode_npy, assemble_trace). A trace that
//! validates must be consistent with its config; a rejected one leaves the output untouched.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "kvc/io/trace.hpp"

#include "fuzz_check.hpp"

namespace {

constexpr std::string_view kSeparator = "\n--kvc--\n";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  using namespace kvc::io;
  std::string_view rest(reinterpret_cast<char const*>(data), size);
  std::string_view parts[4];
  for (int i = 0; i < 3; ++i) {
    std::size_t const at = rest.find(kSeparator);
    if (at == std::string_view::npos) return 0;
    parts[i] = rest.substr(0, at);
    rest.remove_prefix(at + kSeparator.size());
  }
  parts[3] = rest;

  JsonValue json;
  TraceConfig config;
  if (!parse_json(parts[0], json).ok() || !parse_trace_config(json, config).ok()) return 0;
  NpyArray<float> q, k, v;
  if (!decode_npy(parts[1], q).ok() || !decode_npy(parts[2], k).ok() ||
      !decode_npy(parts[3], v).ok()) {
    return 0;
  }
  std::string const names[4] = {"t/config.json", "t/q.npy", "t/k.npy", "t/v.npy"};
  for (ValueCheck check : {ValueCheck::kReject, ValueCheck::kRound}) {
    Trace trace;
    trace.num_tokens = -3;
    IoStatus const status = assemble_trace(config, NpyArray<float>(q), NpyArray<float>(k),
                                           NpyArray<float>(v), names, trace, check);
    if (!status.ok()) {
      KVC_FUZZ_CHECK(!status.message.empty() && trace.num_tokens == -3);
      continue;
    }
    auto const t = static_cast<std::size_t>(trace.num_tokens);
    auto const d = static_cast<std::size_t>(config.spec.head_dim);
    KVC_FUZZ_CHECK(trace.num_tokens >= 1 && trace.config.prompt_tokens <= trace.num_tokens);
    KVC_FUZZ_CHECK(trace.q.size() == t * config.spec.num_q_heads * d);
    KVC_FUZZ_CHECK(trace.k.size() == t * config.spec.num_kv_heads * d);
    KVC_FUZZ_CHECK(trace.v.size() == trace.k.size());
    for (float x : trace.q) {
      KVC_FUZZ_CHECK(std::isfinite(x) && kvc::round_to_dtype(x, config.spec.dtype) == x);
    }
    KVC_FUZZ_CHECK(check == ValueCheck::kRound || trace.rounded_values == 0);
  }
  return 0;
}
