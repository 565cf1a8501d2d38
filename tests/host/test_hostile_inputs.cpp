// Hostile inputs at the reference level (docs/reliability.md): NaN/Inf in q, k or v stay within
// the affected sequence and, inside it, within what the policy documents (the KV head, or the
// layer for TOVA); DMC omega underflow and huge decision logits; a merge run of 10^6 tokens in
// one group against a double-precision recomputation (and the documented residue of a
// magnitude spike); page sizes 1 and 256 and the largest head counts in validation; 64-bit
// offset maths of the store layout and the paged view past 2^31 elements, without allocating.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <variant>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/cache/paged_view.hpp"
#include "kvc/cache/store_config.hpp"
#include "kvc/cache/store_layout.hpp"
#include "kvc/core/shape.hpp"
#include "kvc/reference/layer_cache.hpp"

#include "test_support.hpp"

using namespace kvc;
using namespace kvc::reference;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

LayerSpec hostile_spec() {  // 4 query heads over 2 KV heads (G = 2), D = 16
  LayerSpec spec;
  spec.num_q_heads = 4;
  spec.num_kv_heads = 2;
  spec.head_dim = 16;
  spec.dtype = DType::kF32;
  return spec;
}

PolicyConfig policy_of(PolicyKind kind) {
  PolicyConfig config;
  config.kind = kind;
  config.h2o.heavy = 3;
  config.h2o.recent = 2;
  config.tova.budget = 5;
  return config;
}

struct Token {
  std::vector<float> q, k, v;
};

//! `count` random tokens; DMC's decision neuron (D-1) merges about half of them.
std::vector<Token> random_tokens(std::mt19937_64& rng, LayerSpec const& spec, int count) {
  std::vector<Token> tokens(count);
  std::size_t const d = static_cast<std::size_t>(spec.head_dim);
  for (Token& token : tokens) {
    token.q = test::random_normal(rng, spec.num_q_heads * d);
    token.k = test::random_normal(rng, spec.num_kv_heads * d);
    token.v = test::random_normal(rng, spec.num_kv_heads * d);
    for (int h = 0; h < spec.num_kv_heads; ++h) {
      token.k[h * d + d - 1] = (rng() % 2 == 0) ? 6.0f : 4.0f;
    }
  }
  return tokens;
}

bool all_finite(std::vector<float> const& values, std::size_t begin, std::size_t end) {
  for (std::size_t i = begin; i < end; ++i) {
    if (!std::isfinite(values[i])) return false;
  }
  return true;
}

//! Bitwise equality of floats (NaN == NaN when the bits agree).
bool same_bits(std::vector<float> const& a, std::vector<float> const& b) {
  if (a.size() != b.size()) return false;
  return a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

//! Output rows of the query heads of KV head `kv_head`: [begin, end) in out.out.
std::pair<std::size_t, std::size_t> head_rows(LayerSpec const& spec, int kv_head) {
  std::size_t const g = static_cast<std::size_t>(spec.group_size());
  std::size_t const d = static_cast<std::size_t>(spec.head_dim);
  return {kv_head * g * d, (kv_head + 1) * g * d};
}

enum class Poison { kQ, kK, kV };

//! Runs `tokens` through a hostile cache (token `at` poisoned in KV head 1, or query head 2 for
//! Poison::kQ, with `value`), a clean twin, and a third cache (another sequence) interleaved
//! with the hostile one; checks what docs/reliability.md promises.
void check_containment(PolicyKind kind, Poison poison, float value, std::uint64_t seed) {
  LayerSpec const spec = hostile_spec();
  PolicyConfig const config = policy_of(kind);
  std::mt19937_64 rng(seed);
  std::vector<Token> const tokens = random_tokens(rng, spec, 24);
  int const at = 9;
  std::size_t const d = static_cast<std::size_t>(spec.head_dim);

  LayerCache hostile, clean, other, other_alone;
  REQUIRE(LayerCache::create(spec, config, hostile) == Status::kSuccess);
  REQUIRE(LayerCache::create(spec, config, clean) == Status::kSuccess);
  REQUIRE(LayerCache::create(spec, config, other) == Status::kSuccess);
  REQUIRE(LayerCache::create(spec, config, other_alone) == Status::kSuccess);
  bool poisoned_output_seen = false;
  for (int t = 0; t < static_cast<int>(tokens.size()); ++t) {
    Token token = tokens[t];
    if (t == at) {
      if (poison == Poison::kQ) token.q[2 * d + 3] = value;  // query head 2 (KV head 1)
      if (poison == Poison::kK) token.k[1 * d + 3] = value;  // KV head 1, not the decision dim
      if (poison == Poison::kV) token.v[1 * d + 3] = value;
    }
    AttentionOutput out_hostile, out_clean, out_other, out_alone;
    // The hostile call succeeds: the reference does not reject non-finite values (kvc-replay's
    // reader does), it carries them as documented.
    REQUIRE(hostile.decode_step(DecodeInput{token.q, token.k, token.v}, out_hostile) ==
            Status::kSuccess);
    REQUIRE(clean.decode_step(DecodeInput{tokens[t].q, tokens[t].k, tokens[t].v}, out_clean) ==
            Status::kSuccess);
    REQUIRE(other.decode_step(DecodeInput{tokens[t].q, tokens[t].k, tokens[t].v}, out_other) ==
            Status::kSuccess);
    REQUIRE(other_alone.decode_step(DecodeInput{tokens[t].q, tokens[t].k, tokens[t].v},
                                    out_alone) == Status::kSuccess);
    // Another sequence is never affected.
    CHECK(same_bits(out_other.out, out_alone.out));
    CHECK(same_bits(out_other.lse, out_alone.lse));
    CHECK(hostile.tokens_seen() == t + 1);

    auto const [begin1, end1] = head_rows(spec, 1);
    if (t >= at && !all_finite(out_hostile.out, begin1, end1)) poisoned_output_seen = true;
    if (kind == PolicyKind::kTova) {
      // One index set per layer: a poisoned probability makes every layer score NaN, so the
      // whole layer's choice of victims may change; the layer stays consistent.
      for (HeadCache const& head : hostile.heads()) {
        CHECK(head.position == hostile.heads()[0].position);
        CHECK(head.size() <= config.tova.budget);
      }
      continue;
    }
    // Within the sequence: KV head 0 and its query heads are untouched, bit for bit.
    auto const [begin0, end0] = head_rows(spec, 0);
    std::vector<float> const head0_hostile(out_hostile.out.begin() + begin0,
                                           out_hostile.out.begin() + end0);
    std::vector<float> const head0_clean(out_clean.out.begin() + begin0,
                                         out_clean.out.begin() + end0);
    CHECK(same_bits(head0_hostile, head0_clean));
    CHECK(same_bits(hostile.heads()[0].k, clean.heads()[0].k));
    CHECK(same_bits(hostile.heads()[0].v, clean.heads()[0].v));
    CHECK(hostile.heads()[0].position == clean.heads()[0].position);
    CHECK(same_bits(hostile.heads()[0].score, clean.heads()[0].score));
    if (t < at) CHECK(same_bits(out_hostile.out, out_clean.out));
    if (kind == PolicyKind::kH2O) CHECK(hostile.heads()[1].size() <= config.h2o.budget());
    if (kind == PolicyKind::kFull && poison == Poison::kQ && t > at) {
      // q is not stored: the step after a poisoned query is clean again.
      CHECK(same_bits(out_hostile.out, out_clean.out));
    }
  }
  // NaN always propagates into the attention of its KV head's queries; an infinity may not
  // (a -inf logit is a masked slot), so only NaN must show.
  if (value != value) CHECK(poisoned_output_seen);
}

double dmc_sum_error(double got, double expected) {
  return std::fabs(got - expected) / std::max(1.0, std::fabs(expected));
}

}  // namespace

TEST_SUITE("host") {
  TEST_CASE("hostile: NaN and Inf in q, k or v stay in their sequence and KV head") {
    std::uint64_t const seed = test::test_seed();
    INFO("KVC_TEST_SEED=" << seed);
    for (PolicyKind kind :
         {PolicyKind::kFull, PolicyKind::kDmc, PolicyKind::kH2O, PolicyKind::kTova}) {
      for (Poison poison : {Poison::kQ, Poison::kK, Poison::kV}) {
        for (float value : {kNaN, kInf, -kInf}) {
          INFO("policy " << std::string(policy_name(kind)) << ", poison " << static_cast<int>(poison)
                         << ", value " << value);
          check_containment(kind, poison, value, seed);
        }
      }
    }
  }

  TEST_CASE("hostile: a NaN query propagates through attention (regression)") {
    // Regression: a query whose logits were all NaN was taken for "sees no slot" and got a
    // zero output with LSE -inf (and zero probabilities, so H2O scores ignored it), while a NaN
    // in a key propagated. Now NaN logits propagate to that query head only; only -inf logits
    // (masked slots) still give the documented zero output and LSE -inf.
    LayerSpec spec;
    spec.num_q_heads = 2;
    spec.num_kv_heads = 1;
    spec.head_dim = 4;
    std::vector<HeadCache> heads(1);
    heads[0].k = {0.5f, -1.0f, 0.25f, 2.0f, 1.0f, 1.0f, -0.5f, 0.0f};
    heads[0].v = {1.0f, 2.0f, 3.0f, 4.0f, -1.0f, 0.5f, 0.0f, 2.0f};
    heads[0].position = {0, 1};
    std::vector<float> const q = {kNaN, 1.0f, 0.0f, 0.5f, 0.5f, -1.0f, 1.0f, 0.25f};
    AttentionOutput out;
    AttentionProbabilities probabilities;
    REQUIRE(decode_attention(spec, q, heads, out, &probabilities) == Status::kSuccess);
    for (int i = 0; i < 4; ++i) CHECK(std::isnan(out.out[i]));
    CHECK(std::isnan(out.lse[0]));
    CHECK(std::isnan(probabilities.rows[0][0]));
    CHECK(all_finite(out.out, 4, 8));
    CHECK(std::isfinite(out.lse[1]));
    CHECK(probabilities.rows[1][0] + probabilities.rows[1][1] == doctest::Approx(1.0));

    // Every logit -inf: still "nothing to attend to".
    std::vector<float> const q_inf = {kInf, 0.0f, 0.0f, 0.0f, kInf, 0.0f, 0.0f, 0.0f};
    heads[0].k = {-1.0f, 0.0f, 0.0f, 0.0f, -2.0f, 0.0f, 0.0f, 0.0f};
    REQUIRE(decode_attention(spec, q_inf, heads, out) == Status::kSuccess);
    CHECK(out.out == std::vector<float>(8, 0.0f));
    CHECK(out.lse[0] == -kInf);
  }

  TEST_CASE("hostile: a NaN value poisons its DMC group only and the next group is clean") {
    LayerSpec spec = hostile_spec();
    spec.num_q_heads = 1;
    spec.num_kv_heads = 1;
    PolicyConfig const config = policy_of(PolicyKind::kDmc);
    std::mt19937_64 rng(test::test_seed());
    std::vector<Token> tokens = random_tokens(rng, spec, 12);
    int const d = spec.head_dim;
    for (int t = 0; t < 12; ++t) tokens[t].k[d - 1] = (t == 0 || t == 6) ? 4.0f : 6.0f;
    tokens[3].v[2] = kNaN;      // group [0, 6) is poisoned from token 3 on
    tokens[4].k[d - 1] = kNaN;  // a NaN decision neuron appends: group [4, 6)
    LayerCache cache;
    REQUIRE(LayerCache::create(spec, config, cache) == Status::kSuccess);
    DmcStepDecisions decisions;
    for (int t = 0; t < 12; ++t) {
      AttentionOutput out;
      REQUIRE(cache.decode_step(DecodeInput{tokens[t].q, tokens[t].k, tokens[t].v}, out,
                                &decisions) == Status::kSuccess);
      if (t == 4) CHECK(decisions.merged[0] == 0);
    }
    HeadCache const& head = cache.heads()[0];
    REQUIRE(head.size() == 3);  // groups [0, 4), [4, 6), [6, 12)
    CHECK(std::isnan(head.v[0 * d + 2]));
    CHECK(all_finite(head.v, 1 * d, 3 * d));  // the reset is a select: no NaN leaks on
    CHECK(all_finite(head.k, 0, 3 * d));
    auto const* state = std::get_if<DmcLayerState>(&cache.state());
    REQUIRE(state != nullptr);
    CHECK(all_finite(state->dmc[0].v_sum, 0, d));
  }

  TEST_CASE("hostile: DMC omega at tiny and huge decision logits") {
    LayerSpec spec = hostile_spec();
    spec.num_q_heads = 2;
    spec.num_kv_heads = 1;  // G = 2: omega from the mean of two logits
    int const d = spec.head_dim;
    SUBCASE("checkpoint mode: omega stays in [eps, 1 + eps], slots stay finite and exact") {
      PolicyConfig config = policy_of(PolicyKind::kDmc);
      LayerCache cache;
      REQUIRE(LayerCache::create(spec, config, cache) == Status::kSuccess);
      float const logits[] = {-1e30f, -kInf, 1e30f, kInf, -200.0f, 200.0f};
      double weight = 0.0, weighted = 0.0;
      for (int t = 0; t < 6; ++t) {
        std::vector<float> q(2 * d, 0.25f), k(d, 0.5f), v(d, static_cast<float>(t + 1));
        q[d - 1] = q[2 * d - 1] = logits[t];
        k[d - 1] = t == 0 ? 0.0f : 6.0f;  // one group
        AttentionOutput out;
        DmcStepDecisions decisions;
        REQUIRE(cache.decode_step(DecodeInput{q, k, v}, out, &decisions) == Status::kSuccess);
        float const eps = config.dmc.eps;
        bool const low = logits[t] < 0.0f;
        CHECK(decisions.omega[0] == (low ? eps : 1.0f + eps));
        weight += decisions.omega[0];
        weighted += decisions.omega[0] * (t + 1.0);
        CHECK(all_finite(out.out, 0, out.out.size()));
      }
      REQUIRE(cache.slots(0) == 1);
      CHECK(cache.heads()[0].v[0] == doctest::Approx(weighted / weight).epsilon(1e-6));
    }
    SUBCASE("paper mode (eps 0): an all-zero-weight group is NaN (0/0) until a weight arrives") {
      PolicyConfig config = policy_of(PolicyKind::kDmc);
      config.dmc = DmcConfig::paper();  // decision neuron 0, offset 0, eps 0, unbounded
      LayerCache cache;
      REQUIRE(LayerCache::create(spec, config, cache) == Status::kSuccess);
      auto step = [&](float logit, float decision, float value) {
        std::vector<float> q(2 * d, 0.25f), k(d, 0.5f), v(d, value);
        q[0] = q[d] = logit;
        k[0] = decision;
        AttentionOutput out;
        DmcStepDecisions decisions;
        REQUIRE(cache.decode_step(DecodeInput{q, k, v}, out, &decisions) == Status::kSuccess);
        return decisions.omega[0];
      };
      CHECK(step(-200.0f, -1.0f, 3.0f) == 0.0f);  // sigmoid(-200) underflows fp32: omega 0
      CHECK(std::isnan(cache.heads()[0].v[1]));   // 0 / 0: documented, not an error
      CHECK(step(0.0f, 1.0f, 5.0f) == 0.5f);      // merges with weight 1/2
      CHECK(cache.heads()[0].v[1] == 5.0f);       // zero-weight members count for nothing
      CHECK(step(-kInf, -1.0f, 7.0f) == 0.0f);    // a new group, weight 0 again
      CHECK(cache.slots(0) == 2);
      CHECK(cache.heads()[0].v[0 * d + 1] == 5.0f);  // the closed slot is untouched
      CHECK(std::isnan(cache.heads()[0].v[1 * d + 1]));
      CHECK(step(3.0f, 1.0f, 9.0f) > 0.9f);
      CHECK(cache.heads()[0].v[1 * d + 1] == doctest::Approx(9.0).epsilon(1e-6));
    }
  }

  TEST_CASE("hostile: a DMC merge run of 10^6 tokens in one group matches a double recomputation") {
    LayerSpec spec;
    spec.num_q_heads = 1;
    spec.num_kv_heads = 1;
    spec.head_dim = 2;
    spec.rope.layout = RopeLayout::kNone;
    std::uint64_t const seed = test::test_seed();
    INFO("KVC_TEST_SEED=" << seed);
    for (DmcConfig const& dmc : {DmcConfig::checkpoint(), DmcConfig::paper()}) {
      INFO("window " << dmc.window);
      int const decision = dmc.decision_index(2), other = 1 - decision;
      DmcLayerState state = make_dmc_state(spec, dmc);
      std::mt19937_64 rng(seed);
      std::normal_distribution<float> normal(0.0f, 1.0f);
      int const tokens = 1000000;
      std::vector<float> omega(tokens), value(tokens), key(tokens);
      std::vector<float> q(2), k(2), v(2);
      AttentionOutput out;
      DmcStepDecisions decisions;
      for (int t = 0; t < tokens; ++t) {
        q[0] = normal(rng);
        q[1] = normal(rng);
        k[other] = normal(rng) + 2.0f;
        k[decision] = dmc.offset + 1.0f;  // every token after the first merges
        v[0] = normal(rng) + 3.0f;
        v[1] = normal(rng);
        REQUIRE(dmc_decode_step(spec, dmc, state, DecodeInput{q, k, v}, out, &decisions) ==
                Status::kSuccess);
        omega[t] = decisions.omega[0];
        key[t] = k[other];
        value[t] = v[0];
      }
      REQUIRE(state.heads[0].size() == 1);
      CHECK(state.dmc[0].group_length == tokens);
      int const first = dmc.window > 0 ? tokens - dmc.window : 0;
      double weight = 0.0, k_sum = 0.0, v_sum = 0.0;
      for (int t = first; t < tokens; ++t) {
        weight += omega[t];
        k_sum += static_cast<double>(omega[t]) * key[t];
        v_sum += static_cast<double>(omega[t]) * value[t];
      }
      // fp32 running sums over 10^6 adds (and subtractions): the drift is a random walk of
      // about sqrt(N) * 2^-24 relative; 1e-3 leaves a wide margin and catches any lost term.
      CHECK(std::isfinite(state.dmc[0].weight_sum));
      CHECK(dmc_sum_error(state.dmc[0].weight_sum, weight) < 1e-3);
      CHECK(dmc_sum_error(state.dmc[0].k_sum[other], k_sum) < 1e-3);
      CHECK(dmc_sum_error(state.dmc[0].v_sum[0], v_sum) < 1e-3);
      CHECK(std::fabs(state.heads[0].v[0] - v_sum / weight) < 1e-3 * std::fabs(v_sum / weight));
      CHECK(state.dmc[0].k_sum[decision] == 0.0f);
    }
  }

  TEST_CASE("hostile: a magnitude spike leaves a residue in a windowed DMC sum (documented)") {
    // The windowed running sum subtracts members as they leave: after a spike of 1e7 leaves the
    // window, its rounding residue (a few ulps of the spike's sum) stays in the group's sum.
    // docs/reliability.md documents this limitation of the shared update; this test pins that
    // the residue stays finite and bounded by the spike's ulp, and vanishes at the next append.
    LayerSpec spec;
    spec.num_q_heads = 1;
    spec.num_kv_heads = 1;
    spec.head_dim = 4;
    spec.rope.layout = RopeLayout::kNone;
    DmcConfig const dmc = DmcConfig::checkpoint();
    DmcLayerState state = make_dmc_state(spec, dmc);
    std::vector<float> q(4, 0.3f), k(4, 0.1f), v(4, 1.0f);
    AttentionOutput out;
    for (int t = 0; t < 100; ++t) {
      k[3] = t == 0 ? 0.0f : 6.0f;
      v[0] = (t >= 3 && t < 6) ? 1e7f : 1.0f;
      REQUIRE(dmc_decode_step(spec, dmc, state, DecodeInput{q, k, v}, out) == Status::kSuccess);
    }
    float const slot = state.heads[0].v[0];  // exact answer: 1
    CHECK(std::isfinite(slot));
    double const spike_sum = 3.0 * 1e7 * (1.0 + dmc.eps);
    double const bound = 8.0 * spike_sum / (1 << 24) / (12.0 * 0.5);  // a few ulps / weight
    CHECK(std::fabs(slot - 1.0) <= bound);
    k[3] = 0.0f;  // append: the next group starts from clean sums
    REQUIRE(dmc_decode_step(spec, dmc, state, DecodeInput{q, k, v}, out) == Status::kSuccess);
    CHECK(state.heads[0].v[4] == 1.0f);
  }

  TEST_CASE("hostile: page sizes 1 and 256, the largest head counts, in store validation") {
    PagedStoreConfig config;
    config.shape = ModelShape{2, 8, 2, 128};
    config.num_pages = 64;
    config.max_pages_per_head = 16;
    for (int page_size : {1, 256, kStoreMaxPageSize}) {
      config.page_size = page_size;
      CHECK(config.validate() == Status::kSuccess);
      StoreLayout layout;
      CHECK(compute_store_layout(config, layout) == Status::kSuccess);
    }
    for (int page_size : {0, -1, kStoreMaxPageSize + 1}) {
      config.page_size = page_size;
      CHECK(config.validate() == Status::kErrorInvalidArgument);
    }
    config.page_size = 256;  // head capacity must fit in int32 (minus one)
    config.max_pages_per_head = (INT32_MAX - 1) / 256;
    CHECK(config.validate() == Status::kSuccess);
    config.max_pages_per_head += 1;
    CHECK(config.validate() == Status::kErrorInvalidArgument);

    int const max_count = 1 << 16;
    CHECK(ModelShape{1, max_count, max_count, 2}.validate() == Status::kSuccess);
    CHECK(ModelShape{1, max_count, max_count / 8, 2}.validate() == Status::kSuccess);
    CHECK(ModelShape{max_count, max_count, 1, max_count}.validate() == Status::kSuccess);
    CHECK(ModelShape{1, max_count + 8, 8, 2}.validate() == Status::kErrorInvalidShape);
    CHECK(ModelShape{max_count + 1, 8, 8, 2}.validate() == Status::kErrorInvalidShape);
    CHECK(ModelShape{1, 8, 8, max_count + 2}.validate() == Status::kErrorInvalidShape);
    CHECK(ModelShape{1, max_count, max_count / 8, 128}.validate_for_kernels() == Status::kSuccess);
    CHECK(ModelShape{1, 16 * 4096, 4096, 128}.validate_for_kernels() ==
          Status::kErrorNotSupported);  // G = 16 has no kernels

    config.shape = ModelShape{1, max_count, max_count / 8, 128};
    config.max_pages_per_head = 1;
    CHECK(config.validate() == Status::kSuccess);
    config.shape.head_dim = kStoreMaxHeadDim + 2;
    CHECK(config.validate() == Status::kErrorNotSupported);
  }

  TEST_CASE("hostile: store offsets past 2^31 elements are exact 64-bit values") {
    using U = std::uint64_t;
    PagedStoreConfig config;
    config.shape = ModelShape{80, 64, 8, 256};
    config.dtype = DType::kF32;
    config.page_size = 256;
    config.num_pages = 1 << 22;  // 2^22 pages x 256 slots x 256 dims x 4 bytes = 2^40 per pool
    config.max_seqs = 4096;
    config.max_pages_per_head = 1 << 12;
    config.policy.kind = PolicyKind::kDmc;
    StoreLayout layout;
    REQUIRE(compute_store_layout(config, layout) == Status::kSuccess);
    U const pool = U{1} << 40;
    CHECK(layout.k_pages == 0);
    CHECK(layout.v_pages == pool);
    CHECK(layout.metadata_begin == 2 * pool);
    CHECK(layout.position_pages - layout.score_pages == 0);  // no scores for DMC
    // page_table [L, S, H, P] int32: 80 * 4096 * 8 * 4096 * 4 bytes = 2^35 * 5 * 2^2
    CHECK(layout.lengths - layout.page_table == U{80} * 4096 * 8 * 4096 * 4);
    // dmc ring [L, S, H, W, D] fp32 with W = 12
    CHECK(layout.dmc_ring_v - layout.dmc_ring_k == U{80} * 4096 * 8 * 12 * 256 * 4);
    CHECK(layout.bytes > (U{1} << 41));

    // Sizes past 2^60 bytes are refused, not wrapped.
    config.num_pages = INT32_MAX;
    config.page_size = kStoreMaxPageSize;
    config.shape.head_dim = kStoreMaxHeadDim;
    config.max_pages_per_head = 1;
    REQUIRE(config.validate() == Status::kSuccess);
    CHECK(compute_store_layout(config, layout) == Status::kErrorInvalidArgument);

    // Index maths of the kernels, evaluated on the host: page ids near INT32_MAX.
    StoreDims dims;
    dims.num_layers = 80;
    dims.max_seqs = 65535;
    dims.num_kv_heads = 1 << 16;
    dims.page_size = 256;
    std::int32_t const pages[] = {0, INT32_MAX, 7};
    CHECK(dims.slot_row(pages, 256 + 5) == std::int64_t{INT32_MAX} * 256 + 5);
    CHECK(dims.slot_row(pages, 2 * 256 + 255) == 7 * 256 + 255);
    CHECK(dims.head_index(79, 65534, 65535) == (std::int64_t{79} * 65535 + 65534) * 65536 + 65535);
    CHECK(dims.layer_seq(79, 65534) == std::int64_t{79} * 65535 + 65534);

    PagedLayerView<float> view;
    std::int32_t table[2 * 3 * 4] = {};  // [max_seqs 2, heads 3, pages 4]
    table[(1 * 3 + 2) * 4 + 3] = INT32_MAX;
    view.page_table = table;
    view.page_size = 256;
    view.head_dim = 256;
    view.num_kv_heads = 3;
    view.max_pages_per_head = 4;
    view.max_seqs = 2;
    CHECK(view.head_index(1, 2) == 5);
    CHECK(view.row_of(1, 2, 3 * 256 + 17) == std::int64_t{INT32_MAX} * 256 + 17);
    CHECK(view.element_of(1, 2, 3 * 256 + 17) == (std::int64_t{INT32_MAX} * 256 + 17) * 256);
    CHECK(view.element_of(1, 2, 3 * 256 + 17) > (std::int64_t{1} << 46));
  }
}
