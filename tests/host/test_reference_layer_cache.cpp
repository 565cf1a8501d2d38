// LayerCache: the runtime-policy reference cache forwards to the per-policy reference functions
// (same outputs, same cache, bit for bit), reports slots / CR / bytes, and rejects bad configs
// and bad inputs without changing anything.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/reference/layer_cache.hpp"

#include "test_support.hpp"

using namespace kvc;
using namespace kvc::reference;

namespace {

//! A random stream of T tokens, pre-RoPE, with DMC's decision neuron (dim D-1 and dim 0, for
//! both modes) drawn so that roughly half of the tokens merge.
struct Stream {
  int tokens;
  std::vector<float> q;  // [T, num_q_heads, head_dim]
  std::vector<float> k;  // [T, num_kv_heads, head_dim]
  std::vector<float> v;  // [T, num_kv_heads, head_dim]
};

Stream make_stream(std::mt19937_64& rng, LayerSpec const& spec, int tokens) {
  Stream s{tokens, {}, {}, {}};
  std::size_t const t = static_cast<std::size_t>(tokens);
  s.q = test::random_normal(rng, t * spec.num_q_heads * spec.head_dim, spec.dtype);
  s.k = test::random_normal(rng, t * spec.num_kv_heads * spec.head_dim, spec.dtype);
  s.v = test::random_normal(rng, t * spec.num_kv_heads * spec.head_dim, spec.dtype);
  std::bernoulli_distribution merge(0.5);
  for (std::size_t row = 0; row < t * spec.num_kv_heads; ++row) {
    float* key = s.k.data() + row * spec.head_dim;
    key[spec.head_dim - 1] = merge(rng) ? 6.0f : 4.0f;  // checkpoint: k[D-1] - 5 > 0 merges
    key[0] = merge(rng) ? 1.0f : -1.0f;                 // paper: k[0] > 0 merges
  }
  return s;
}

DecodeInput decode_input(LayerSpec const& spec, Stream const& s, int t) {
  std::size_t const qn = static_cast<std::size_t>(spec.num_q_heads) * spec.head_dim;
  std::size_t const kn = static_cast<std::size_t>(spec.num_kv_heads) * spec.head_dim;
  return DecodeInput{ConstSpan(s.q.data() + t * qn, qn), ConstSpan(s.k.data() + t * kn, kn),
                     ConstSpan(s.v.data() + t * kn, kn)};
}

PrefillInput prefill_input(LayerSpec const& spec, Stream const& s, int first, int count) {
  std::size_t const qn = static_cast<std::size_t>(spec.num_q_heads) * spec.head_dim;
  std::size_t const kn = static_cast<std::size_t>(spec.num_kv_heads) * spec.head_dim;
  return PrefillInput{count, ConstSpan(s.q.data() + first * qn, count * qn),
                      ConstSpan(s.k.data() + first * kn, count * kn),
                      ConstSpan(s.v.data() + first * kn, count * kn)};
}

void require_same_heads(std::vector<HeadCache> const& actual,
                        std::vector<HeadCache> const& expected) {
  REQUIRE(actual.size() == expected.size());
  for (std::size_t h = 0; h < actual.size(); ++h) {
    INFO("kv head " << h);
    test::require_close(actual[h].k, expected[h].k, {0, 0}, "k");
    test::require_close(actual[h].v, expected[h].v, {0, 0}, "v");
    test::require_close(actual[h].score, expected[h].score, {0, 0}, "score");
    CHECK(actual[h].position == expected[h].position);
  }
}

//! Runs `stream` (a prefill chunk of `prompt` tokens, then decode steps) through a LayerCache
//! and, side by side, through the policy's own functions on `State`; everything must agree.
template <class State, class Make, class Prefill, class Decode>
void check_dispatch(LayerSpec const& spec, PolicyConfig const& config, Stream const& stream,
                    int prompt, Make make, Prefill prefill, Decode decode) {
  LayerCache cache;
  REQUIRE(LayerCache::create(spec, config, cache) == Status::kSuccess);
  CHECK(cache.kind() == config.kind);
  REQUIRE(std::holds_alternative<State>(cache.state()));
  State direct = make();

  AttentionOutput via_cache, via_direct;
  REQUIRE(cache.prefill(prefill_input(spec, stream, 0, prompt), via_cache) == Status::kSuccess);
  REQUIRE(prefill(direct, prefill_input(spec, stream, 0, prompt), via_direct) == Status::kSuccess);
  test::require_close(via_cache.out, via_direct.out, {0, 0}, "prefill out");
  test::require_close(via_cache.lse, via_direct.lse, {0, 0}, "prefill lse");
  for (int t = prompt; t < stream.tokens; ++t) {
    INFO("token " << t);
    REQUIRE(cache.decode_step(decode_input(spec, stream, t), via_cache) == Status::kSuccess);
    REQUIRE(decode(direct, decode_input(spec, stream, t), via_direct) == Status::kSuccess);
    test::require_close(via_cache.out, via_direct.out, {0, 0}, "decode out");
    test::require_close(via_cache.lse, via_direct.lse, {0, 0}, "decode lse");
  }
  CHECK(cache.tokens_seen() == stream.tokens);
  CHECK(cache.tokens_seen() == direct.tokens_seen);
  require_same_heads(cache.heads(), direct.heads);
  require_same_heads(std::get<State>(cache.state()).heads, direct.heads);
}

LayerSpec gqa_spec(DType dtype) {
  LayerSpec spec;
  spec.num_q_heads = 8;
  spec.num_kv_heads = 2;
  spec.head_dim = 16;
  spec.dtype = dtype;
  return spec;
}

}  // namespace

TEST_SUITE("host") {
  TEST_CASE("layer cache: every policy dispatches to its own reference functions") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      INFO("dtype " << std::string(dtype_name(dtype)));
      LayerSpec const spec = gqa_spec(dtype);
      Stream const stream = make_stream(rng, spec, 48);
      int const prompt = 20;

      {  // full
        PolicyConfig config;
        config.kind = PolicyKind::kFull;
        check_dispatch<FullLayerState>(
            spec, config, stream, prompt, [&] { return make_full_state(spec); },
            [&](FullLayerState& s, PrefillInput const& in, AttentionOutput& out) {
              return full_prefill(spec, config.full, s, in, out);
            },
            [&](FullLayerState& s, DecodeInput const& in, AttentionOutput& out) {
              return full_decode_step(spec, config.full, s, in, out);
            });
      }
      {  // dmc, both modes
        for (DmcConfig const dmc : {DmcConfig::checkpoint(), DmcConfig::paper()}) {
          PolicyConfig config;
          config.kind = PolicyKind::kDmc;
          config.dmc = dmc;
          check_dispatch<DmcLayerState>(
              spec, config, stream, prompt, [&] { return make_dmc_state(spec, dmc); },
              [&](DmcLayerState& s, PrefillInput const& in, AttentionOutput& out) {
                return dmc_prefill(spec, dmc, s, in, out);
              },
              [&](DmcLayerState& s, DecodeInput const& in, AttentionOutput& out) {
                return dmc_decode_step(spec, dmc, s, in, out);
              });
        }
      }
      {  // h2o
        PolicyConfig config;
        config.kind = PolicyKind::kH2O;
        config.h2o = H2OConfig{5, 4};
        check_dispatch<H2OLayerState>(
            spec, config, stream, prompt, [&] { return make_h2o_state(spec); },
            [&](H2OLayerState& s, PrefillInput const& in, AttentionOutput& out) {
              return h2o_prefill(spec, config.h2o, s, in, out);
            },
            [&](H2OLayerState& s, DecodeInput const& in, AttentionOutput& out) {
              return h2o_decode_step(spec, config.h2o, s, in, out);
            });
      }
      {  // tova
        for (bool protect : {false, true}) {
          PolicyConfig config;
          config.kind = PolicyKind::kTova;
          config.tova = TovaConfig{9, protect};
          check_dispatch<TovaLayerState>(
              spec, config, stream, prompt, [&] { return make_tova_state(spec); },
              [&](TovaLayerState& s, PrefillInput const& in, AttentionOutput& out) {
                return tova_prefill(spec, config.tova, s, in, out);
              },
              [&](TovaLayerState& s, DecodeInput const& in, AttentionOutput& out) {
                return tova_decode_step(spec, config.tova, s, in, out);
              });
        }
      }
    }
  }

  TEST_CASE("layer cache: DMC decisions are forwarded, other policies leave them untouched") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    LayerSpec const spec = gqa_spec(DType::kBF16);
    Stream const stream = make_stream(rng, spec, 6);
    PolicyConfig config;
    config.kind = PolicyKind::kDmc;
    LayerCache cache;
    REQUIRE(LayerCache::create(spec, config, cache) == Status::kSuccess);
    DmcLayerState direct = make_dmc_state(spec, config.dmc);
    for (int t = 0; t < stream.tokens; ++t) {
      AttentionOutput a, b;
      DmcStepDecisions via_cache, via_direct;
      REQUIRE(cache.decode_step(decode_input(spec, stream, t), a, &via_cache) == Status::kSuccess);
      REQUIRE(dmc_decode_step(spec, config.dmc, direct, decode_input(spec, stream, t), b,
                              &via_direct) == Status::kSuccess);
      CHECK(via_cache.merged == via_direct.merged);
      test::require_close(via_cache.omega, via_direct.omega, {0, 0}, "omega");
      REQUIRE(via_cache.merged.size() == 2);
    }

    config.kind = PolicyKind::kFull;
    REQUIRE(LayerCache::create(spec, config, cache) == Status::kSuccess);
    DmcStepDecisions untouched;
    untouched.merged = {7};
    AttentionOutput out;
    REQUIRE(cache.decode_step(decode_input(spec, stream, 0), out, &untouched) == Status::kSuccess);
    CHECK(untouched.merged == std::vector<std::uint8_t>{7});
  }

  TEST_CASE("layer cache: slots, compression ratio and bytes") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    LayerSpec const spec = gqa_spec(DType::kBF16);
    int const tokens = 40;
    Stream const stream = make_stream(rng, spec, tokens);

    LayerCache empty;
    CHECK(empty.tokens_seen() == 0);
    CHECK(empty.total_slots() == 0);
    CHECK(empty.compression_ratio() == 1.0);
    CHECK(empty.bytes() == 0);

    PolicyConfig config;
    for (PolicyKind kind :
         {PolicyKind::kFull, PolicyKind::kDmc, PolicyKind::kH2O, PolicyKind::kTova}) {
      INFO("policy " << std::string(policy_name(kind)));
      config.kind = kind;
      config.h2o = H2OConfig{3, 5};
      config.tova = TovaConfig{6, false};
      LayerCache cache;
      REQUIRE(LayerCache::create(spec, config, cache) == Status::kSuccess);
      CHECK(cache.heads().size() == 2);
      AttentionOutput out;
      REQUIRE(cache.prefill(prefill_input(spec, stream, 0, 10), out) == Status::kSuccess);
      for (int t = 10; t < tokens; ++t)
        REQUIRE(cache.decode_step(decode_input(spec, stream, t), out) == Status::kSuccess);

      std::vector<int> const per_head = cache.slots_per_head();
      REQUIRE(per_head.size() == 2);
      std::int64_t total = 0;
      for (int h = 0; h < 2; ++h) {
        CHECK(per_head[h] == cache.heads()[h].size());
        CHECK(cache.slots(h) == per_head[h]);
        CHECK(cache.compression_ratio(h) == doctest::Approx(double(tokens) / per_head[h]));
        total += per_head[h];
      }
      CHECK(cache.slots(2) == 0);
      CHECK(cache.slots(-1) == 0);
      CHECK(cache.total_slots() == total);
      CHECK(cache.compression_ratio() == doctest::Approx(double(tokens) * 2 / double(total)));
      CHECK(cache.bytes() == total * spec.head_dim * 2 * 2);  // K and V, bf16
      switch (kind) {
        case PolicyKind::kFull: CHECK(per_head == std::vector<int>{tokens, tokens}); break;
        case PolicyKind::kH2O: CHECK(per_head == std::vector<int>{8, 8}); break;
        case PolicyKind::kTova: CHECK(per_head == std::vector<int>{6, 6}); break;
        case PolicyKind::kDmc: {
          auto const* dmc = std::get_if<DmcLayerState>(&cache.state());
          REQUIRE(dmc != nullptr);
          CHECK(cache.compression_ratio() == doctest::Approx(dmc_compression_ratio(*dmc)));
          CHECK(cache.compression_ratio(1) == doctest::Approx(dmc_head_compression_ratio(*dmc, 1)));
          CHECK(total < 2 * tokens);  // about half of the tokens merge
          break;
        }
      }
    }
  }

  TEST_CASE("layer cache: invalid specs and configs are rejected and leave the cache unchanged") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    LayerSpec const spec = gqa_spec(DType::kF32);
    Stream const stream = make_stream(rng, spec, 3);
    PolicyConfig full;
    LayerCache cache;
    REQUIRE(LayerCache::create(spec, full, cache) == Status::kSuccess);
    AttentionOutput out;
    REQUIRE(cache.decode_step(decode_input(spec, stream, 0), out) == Status::kSuccess);

    auto rejects = [&](LayerSpec const& bad_spec, PolicyConfig const& bad_config, Status expected) {
      CHECK(LayerCache::create(bad_spec, bad_config, cache) == expected);
      CHECK(cache.kind() == PolicyKind::kFull);
      CHECK(cache.tokens_seen() == 1);
      CHECK(cache.spec().num_kv_heads == 2);
    };
    LayerSpec bad = spec;
    bad.num_kv_heads = 3;  // 8 q heads are not a multiple of 3
    rejects(bad, full, Status::kErrorInvalidShape);
    bad = spec;
    bad.head_dim = 15;
    rejects(bad, full, Status::kErrorInvalidShape);
    bad = spec;
    bad.num_q_heads = 0;
    rejects(bad, full, Status::kErrorInvalidShape);
    bad = spec;
    bad.scale = -1.0f;
    rejects(bad, full, Status::kErrorInvalidArgument);

    PolicyConfig config;
    config.kind = PolicyKind::kDmc;
    config.dmc.window = kDmcMaxWindow + 1;
    rejects(spec, config, Status::kErrorInvalidArgument);
    config.dmc = DmcConfig::checkpoint();
    config.dmc.decision_dim = spec.head_dim;  // out of range
    rejects(spec, config, Status::kErrorInvalidArgument);
    config.kind = PolicyKind::kH2O;
    config.h2o = H2OConfig{0, 0};
    rejects(spec, config, Status::kErrorInvalidBudget);
    config.h2o = H2OConfig{-1, 4};
    rejects(spec, config, Status::kErrorInvalidBudget);
    config.kind = PolicyKind::kTova;
    config.tova.budget = 0;
    rejects(spec, config, Status::kErrorInvalidBudget);
    config.kind = static_cast<PolicyKind>(42);
    rejects(spec, config, Status::kErrorInvalidArgument);
  }

  TEST_CASE("layer cache: bad inputs return a Status and change nothing") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    LayerSpec const spec = gqa_spec(DType::kF16);
    Stream const stream = make_stream(rng, spec, 4);
    for (PolicyKind kind :
         {PolicyKind::kFull, PolicyKind::kDmc, PolicyKind::kH2O, PolicyKind::kTova}) {
      INFO("policy " << std::string(policy_name(kind)));
      PolicyConfig config;
      config.kind = kind;
      LayerCache cache;
      REQUIRE(LayerCache::create(spec, config, cache) == Status::kSuccess);
      AttentionOutput out;
      REQUIRE(cache.prefill(prefill_input(spec, stream, 0, 2), out) == Status::kSuccess);
      std::vector<HeadCache> const before = cache.heads();

      DecodeInput short_q = decode_input(spec, stream, 2);
      short_q.q.size -= 1;
      CHECK(cache.decode_step(short_q, out) == Status::kErrorSizeMismatch);
      PrefillInput none = prefill_input(spec, stream, 2, 2);
      none.num_tokens = 0;
      CHECK(cache.prefill(none, out) == Status::kErrorInvalidArgument);
      PrefillInput short_v = prefill_input(spec, stream, 2, 2);
      short_v.v.size -= spec.head_dim;
      CHECK(cache.prefill(short_v, out) == Status::kErrorSizeMismatch);

      CHECK(cache.tokens_seen() == 2);
      require_same_heads(cache.heads(), before);
      REQUIRE(cache.decode_step(decode_input(spec, stream, 2), out) == Status::kSuccess);
      CHECK(cache.tokens_seen() == 3);
    }
  }
}
