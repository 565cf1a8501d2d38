// assemble_trace (kvc/io/trace.hpp): the in-memory checks that read_trace runs after decoding
// its four files, shared with the parser fuzzers. Accepts a consistent trace, rejects token
// counts that differ, prompts longer than the trace, empty traces and values the dtype cannot
// hold, with the file names in the message and the output untouched.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/io/trace.hpp"

using namespace kvc;
using namespace kvc::io;

namespace {

TraceConfig small_config() {  // full policy, 2 query heads over 1 KV head, D = 4, fp16
  TraceConfig config;
  config.spec.num_q_heads = 2;
  config.spec.num_kv_heads = 1;
  config.spec.head_dim = 4;
  config.spec.dtype = DType::kF16;
  config.prompt_tokens = 1;
  return config;
}

NpyArray<float> array_of(std::int64_t tokens, std::int64_t heads, std::int64_t dim) {
  NpyArray<float> array;
  array.shape = {tokens, heads, dim};
  array.data.assign(static_cast<std::size_t>(tokens * heads * dim), 0.5f);
  return array;
}

std::string const kNames[4] = {"t/config.json", "t/q.npy", "t/k.npy", "t/v.npy"};

//! Asserts that assemble_trace fails with a message containing `needle`, output untouched.
void require_rejected(TraceConfig const& config, NpyArray<float> q, NpyArray<float> k,
                      NpyArray<float> v, std::string const& needle) {
  Trace trace;
  trace.num_tokens = -5;
  IoStatus const status =
      assemble_trace(config, std::move(q), std::move(k), std::move(v), kNames, trace);
  INFO("message: " << status.message);
  REQUIRE_FALSE(status.ok());
  CHECK(status.message.find(needle) != std::string::npos);
  CHECK(trace.num_tokens == -5);
  CHECK(trace.q.empty());
}

}  // namespace

TEST_SUITE("host") {
  TEST_CASE("io trace: assemble_trace accepts a consistent trace") {
    Trace trace;
    REQUIRE(assemble_trace(small_config(), array_of(3, 2, 4), array_of(3, 1, 4), array_of(3, 1, 4),
                           kNames, trace)
                .ok());
    CHECK(trace.num_tokens == 3);
    CHECK(trace.q.size() == 3 * 2 * 4);
    CHECK(trace.k.size() == 3 * 4);
    CHECK(trace.rounded_values == 0);
  }

  TEST_CASE("io trace: assemble_trace rejects inconsistent traces and names the file") {
    TraceConfig const config = small_config();
    require_rejected(config, array_of(3, 2, 4), array_of(2, 1, 4), array_of(3, 1, 4),
                     "t/{q,k,v}.npy: token counts differ");
    require_rejected(config, array_of(3, 2, 4), array_of(3, 2, 4), array_of(3, 1, 4),
                     "t/k.npy: shape (3, 2, 4) does not match the config");
    require_rejected(config, array_of(0, 2, 4), array_of(0, 1, 4), array_of(0, 1, 4),
                     "t/q.npy: the trace has no tokens");
    TraceConfig long_prompt = config;
    long_prompt.prompt_tokens = 4;
    require_rejected(long_prompt, array_of(3, 2, 4), array_of(3, 1, 4), array_of(3, 1, 4),
                     "t/config.json: key \"prompt_tokens\": 4 exceeds the trace's 3 tokens");
    NpyArray<float> v = array_of(3, 1, 4);
    v.data[5] = std::numeric_limits<float>::quiet_NaN();
    require_rejected(config, array_of(3, 2, 4), array_of(3, 1, 4), v,
                     "t/v.npy: element [1, 0, 1] is not finite");
    NpyArray<float> k = array_of(3, 1, 4);
    k.data[2] = 0.1f;  // not a half
    require_rejected(config, array_of(3, 2, 4), k, array_of(3, 1, 4),
                     "t/k.npy: element [0, 0, 2] = 0.100000001 is not representable in fp16");
    NpyArray<float> rank2;
    rank2.shape = {3, 8};
    rank2.data.assign(24, 0.5f);
    require_rejected(config, rank2, array_of(3, 1, 4), array_of(3, 1, 4),
                     "t/q.npy: expected 3 dimensions");
  }

  TEST_CASE("io trace: assemble_trace with ValueCheck::kRound rounds and counts") {
    NpyArray<float> k = array_of(3, 1, 4);
    k.data[2] = 0.1f;
    k.data[3] = 0.2f;
    Trace trace;
    REQUIRE(assemble_trace(small_config(), array_of(3, 2, 4), std::move(k), array_of(3, 1, 4),
                           kNames, trace, ValueCheck::kRound)
                .ok());
    CHECK(trace.rounded_values == 2);
    CHECK(trace.k[2] == round_to_dtype(0.1f, DType::kF16));
    NpyArray<float> huge = array_of(3, 1, 4);
    huge.data[0] = 1e6f;  // beyond the fp16 range: still an error
    require_rejected(small_config(), array_of(3, 2, 4), array_of(3, 1, 4), huge, "out of range");
  }
}
