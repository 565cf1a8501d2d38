// Full-cache reference: appends every token; prefill equals token-by-token decode.
#include <doctest/doctest.h>

#include <random>

#include "kvc/reference/full.hpp"
#include "test_support.hpp"

using namespace kvc;
using namespace kvc::reference;

TEST_SUITE("host") {
TEST_CASE("full: chunked prefill equals token-by-token decode") {
  std::mt19937_64 rng(test::test_seed());
  INFO("seed " << test::test_seed());
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    LayerSpec spec;
    spec.num_q_heads = 8;
    spec.num_kv_heads = 2;
    spec.head_dim = 16;
    spec.dtype = dtype;
    int const tokens = 37;
    auto q = test::random_normal(rng, std::size_t(tokens) * 8 * 16, dtype);
    auto k = test::random_normal(rng, std::size_t(tokens) * 2 * 16, dtype);
    auto v = test::random_normal(rng, std::size_t(tokens) * 2 * 16, dtype);

    FullLayerState sequential = make_full_state(spec);
    std::vector<float> seq_out;
    for (int t = 0; t < tokens; ++t) {
      AttentionOutput out;
      DecodeInput in{ConstSpan(q.data() + t * 8 * 16, 8 * 16), ConstSpan(k.data() + t * 2 * 16, 2 * 16),
                     ConstSpan(v.data() + t * 2 * 16, 2 * 16)};
      REQUIRE(full_decode_step(spec, FullConfig{}, sequential, in, out) == Status::kSuccess);
      seq_out.insert(seq_out.end(), out.out.begin(), out.out.end());
    }
    FullLayerState chunked = make_full_state(spec);
    std::vector<float> chunk_out;
    for (int start : {0, 5, 20}) {
      int const end = start == 0 ? 5 : start == 5 ? 20 : tokens;
      int const n = end - start;
      PrefillInput in{n, ConstSpan(q.data() + start * 8 * 16, std::size_t(n) * 8 * 16),
                      ConstSpan(k.data() + start * 2 * 16, std::size_t(n) * 2 * 16),
                      ConstSpan(v.data() + start * 2 * 16, std::size_t(n) * 2 * 16)};
      AttentionOutput out;
      REQUIRE(full_prefill(spec, FullConfig{}, chunked, in, out) == Status::kSuccess);
      chunk_out.insert(chunk_out.end(), out.out.begin(), out.out.end());
    }
    test::require_close(chunk_out, seq_out, {1e-6, 1e-6}, "outputs");
    for (int h = 0; h < 2; ++h) {
      CHECK(chunked.heads[h].size() == tokens);
      test::require_close(chunked.heads[h].k, sequential.heads[h].k, {0, 0}, "keys");
      test::require_close(chunked.heads[h].v, sequential.heads[h].v, {0, 0}, "values");
    }
  }
}
}
