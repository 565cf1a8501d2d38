// DMC reference: hand-computed slots (windowed and unbounded means, RoPE at the newest position,
// the decision neuron), the bf16 decision threshold, GQA omega, sequential vs parallel prefill on
// random inputs, compression ratio, equality with the full cache when every token appends, and
// rejection of bad input with the state left unchanged.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/reference/dmc.hpp"
#include "kvc/reference/full.hpp"

#include "test_support.hpp"

using namespace kvc;
using namespace kvc::reference;

namespace {

LayerSpec make_spec(int q_heads, int kv_heads, int head_dim, DType dtype, RopeLayout layout) {
  LayerSpec spec;
  spec.num_q_heads = q_heads;
  spec.num_kv_heads = kv_heads;
  spec.head_dim = head_dim;
  spec.dtype = dtype;
  spec.rope.layout = layout;
  return spec;
}

std::string mode_name(DmcConfig const& config) {
  return config.mode == DmcMode::kCheckpoint ? "checkpoint" : "paper";
}
std::string name(DType dtype) {
  return dtype_name(dtype);
}
std::string name(RopeLayout layout) {
  return rope_layout_name(layout);
}

//! The pre-RoPE inputs of a run: q [T, Hq, D], k and v [T, Hkv, D].
struct Inputs {
  int tokens = 0;
  std::vector<float> q, k, v;
};

DecodeInput token_input(LayerSpec const& spec, Inputs const& in, int t) {
  std::size_t const qs = static_cast<std::size_t>(spec.num_q_heads) * spec.head_dim;
  std::size_t const ks = static_cast<std::size_t>(spec.num_kv_heads) * spec.head_dim;
  return DecodeInput{ConstSpan(in.q.data() + t * qs, qs), ConstSpan(in.k.data() + t * ks, ks),
                     ConstSpan(in.v.data() + t * ks, ks)};
}

PrefillInput chunk_input(LayerSpec const& spec, Inputs const& in, int start, int count) {
  std::size_t const qs = static_cast<std::size_t>(spec.num_q_heads) * spec.head_dim;
  std::size_t const ks = static_cast<std::size_t>(spec.num_kv_heads) * spec.head_dim;
  return PrefillInput{count, ConstSpan(in.q.data() + start * qs, count * qs),
                      ConstSpan(in.k.data() + start * ks, count * ks),
                      ConstSpan(in.v.data() + start * ks, count * ks)};
}

float& q_at(LayerSpec const& spec, Inputs& in, int t, int head, int i) {
  return in.q[(static_cast<std::size_t>(t) * spec.num_q_heads + head) * spec.head_dim + i];
}
float& k_at(LayerSpec const& spec, Inputs& in, int t, int head, int i) {
  return in.k[(static_cast<std::size_t>(t) * spec.num_kv_heads + head) * spec.head_dim + i];
}
float v_of(LayerSpec const& spec, Inputs const& in, int t, int head, int i) {
  return in.v[(static_cast<std::size_t>(t) * spec.num_kv_heads + head) * spec.head_dim + i];
}
float k_of(LayerSpec const& spec, Inputs const& in, int t, int head, int i) {
  return in.k[(static_cast<std::size_t>(t) * spec.num_kv_heads + head) * spec.head_dim + i];
}

Inputs random_inputs(std::mt19937_64& rng, LayerSpec const& spec, int tokens) {
  Inputs in;
  in.tokens = tokens;
  std::size_t const t = static_cast<std::size_t>(tokens);
  in.q = test::random_normal(rng, t * spec.num_q_heads * spec.head_dim, spec.dtype);
  in.k = test::random_normal(rng, t * spec.num_kv_heads * spec.head_dim, spec.dtype);
  in.v = test::random_normal(rng, t * spec.num_kv_heads * spec.head_dim, spec.dtype);
  return in;
}

//! Sets the decision neuron of (t, kv head) so that the token merges or appends (margin 1).
void set_decision(LayerSpec const& spec, DmcConfig const& config, Inputs& in, int t, int head,
                  bool merge) {
  k_at(spec, in, t, head, config.decision_index(spec.head_dim)) =
      round_to_dtype(config.offset + (merge ? 1.0f : -1.0f), spec.dtype);
}

// ---- independent double-precision maths for the hand-computed tests ----

double omega_of(DmcConfig const& config, double group_logit) {
  return 1.0 / (1.0 + std::exp(-(group_logit + static_cast<double>(config.offset)))) +
         static_cast<double>(config.eps);
}

//! omega of (t, kv head) from the inputs: the mean q[d] of the group's query heads.
double token_omega(LayerSpec const& spec, DmcConfig const& config, Inputs const& in, int t,
                   int head) {
  int const g = spec.group_size();
  int const d = config.decision_index(spec.head_dim);
  double sum = 0.0;
  for (int j = 0; j < g; ++j) {
    sum +=
        in.q[(static_cast<std::size_t>(t) * spec.num_q_heads + head * g + j) * spec.head_dim + d];
  }
  return omega_of(config, sum / g);
}

//! Omega-weighted mean of keys (decision dim 0) or values of tokens first..last of a head.
std::vector<double> weighted_mean(LayerSpec const& spec, DmcConfig const& config, Inputs const& in,
                                  int head, int first, int last, bool keys) {
  int const dim = spec.head_dim;
  int const d = config.decision_index(dim);
  std::vector<double> sum(dim, 0.0);
  double weight = 0.0;
  for (int t = first; t <= last; ++t) {
    double const w = token_omega(spec, config, in, t, head);
    weight += w;
    for (int i = 0; i < dim; ++i) {
      double const x =
          keys ? (i == d ? 0.0 : k_of(spec, in, t, head, i)) : v_of(spec, in, t, head, i);
      sum[i] += w * x;
    }
  }
  for (double& x : sum) x /= weight;
  return sum;
}

//! RoPE in double: pair p of a D-dim vector rotates by position * theta^(-2p/D).
std::vector<double> rope_double(std::vector<double> x, RopeConfig const& rope,
                                std::int64_t position) {
  int const dim = static_cast<int>(x.size());
  if (rope.layout == RopeLayout::kNone) return x;
  std::vector<double> out(dim);
  for (int p = 0; p < dim / 2; ++p) {
    int const a = rope.layout == RopeLayout::kInterleaved ? 2 * p : p;
    int const b = rope.layout == RopeLayout::kInterleaved ? 2 * p + 1 : p + dim / 2;
    double const angle = static_cast<double>(position) * std::pow(rope.theta, -2.0 * p / dim);
    out[a] = x[a] * std::cos(angle) - x[b] * std::sin(angle);
    out[b] = x[b] * std::cos(angle) + x[a] * std::sin(angle);
  }
  return out;
}

//! The key a slot should hold for a pre-RoPE mean: dim d zeroed, RoPE, dim d zeroed.
std::vector<double> expected_key(std::vector<double> mean, RopeConfig const& rope,
                                 std::int64_t position, int d) {
  mean[d] = 0.0;
  std::vector<double> rotated = rope_double(mean, rope, position);
  rotated[d] = 0.0;
  return rotated;
}

std::vector<float> to_float(std::vector<double> const& x) {
  return {x.begin(), x.end()};
}

constexpr Tolerance kF32Hand{1e-6, 1e-5};  // fp32 reference vs a double computation

//! fp32: close to the exact values. fp16/bf16: each element is the exact value rounded once to
//! the dtype, unless the exact value lies within float error of a rounding boundary.
void require_rounded(std::vector<float> const& actual, std::vector<double> const& exact,
                     DType dtype, std::string const& what) {
  if (dtype == DType::kF32) {
    test::require_close(actual, to_float(exact), kF32Hand, what);
    return;
  }
  REQUIRE(actual.size() == exact.size());
  double magnitude = 1.0;
  for (double x : exact) magnitude = std::max(magnitude, std::abs(x));
  double const slack = 1e-5 * magnitude;
  for (std::size_t i = 0; i < exact.size(); ++i) {
    float const rounded = round_to_dtype(static_cast<float>(exact[i]), dtype);
    bool const boundary = round_to_dtype(static_cast<float>(exact[i] - slack), dtype) !=
                          round_to_dtype(static_cast<float>(exact[i] + slack), dtype);
    CHECK_MESSAGE((actual[i] == rounded || boundary),
                  what << "[" << i << "]: got " << actual[i] << ", expected " << rounded);
  }
}

std::vector<float> slot_k(LayerSpec const& spec, HeadCache const& head, int slot) {
  auto const begin = head.k.begin() + static_cast<std::ptrdiff_t>(slot) * spec.head_dim;
  return {begin, begin + spec.head_dim};
}
std::vector<float> slot_v(LayerSpec const& spec, HeadCache const& head, int slot) {
  auto const begin = head.v.begin() + static_cast<std::ptrdiff_t>(slot) * spec.head_dim;
  return {begin, begin + spec.head_dim};
}

void step(LayerSpec const& spec, DmcConfig const& config, DmcLayerState& state, Inputs const& in,
          int t, DmcStepDecisions* decisions = nullptr, AttentionOutput* out = nullptr) {
  AttentionOutput local;
  REQUIRE(dmc_decode_step(spec, config, state, token_input(spec, in, t), out ? *out : local,
                          decisions) == Status::kSuccess);
}

bool same_state(DmcLayerState const& a, DmcLayerState const& b) {
  if (a.tokens_seen != b.tokens_seen || a.heads.size() != b.heads.size() ||
      a.dmc.size() != b.dmc.size()) {
    return false;
  }
  for (std::size_t h = 0; h < a.heads.size(); ++h) {
    HeadCache const& x = a.heads[h];
    HeadCache const& y = b.heads[h];
    if (x.k != y.k || x.v != y.v || x.position != y.position || x.score != y.score) return false;
    DmcHeadState const& s = a.dmc[h];
    DmcHeadState const& r = b.dmc[h];
    if (s.k_sum != r.k_sum || s.v_sum != r.v_sum || s.weight_sum != r.weight_sum ||
        s.group_length != r.group_length || s.ring_k != r.ring_k || s.ring_v != r.ring_v ||
        s.ring_w != r.ring_w) {
      return false;
    }
  }
  return true;
}

}  // namespace

TEST_SUITE("host") {
TEST_CASE("dmc: first token appends and alternating decisions give the hand-computed slots") {
  std::mt19937_64 rng(test::test_seed());
  INFO("seed " << test::test_seed());
  for (DmcConfig const config : {DmcConfig::checkpoint(), DmcConfig::paper()}) {
    INFO("mode " << mode_name(config));
    LayerSpec const spec = make_spec(1, 1, 8, DType::kF32, RopeLayout::kNone);
    int const d = config.decision_index(spec.head_dim);
    // Token 0's neuron says "merge" but the first token must append.
    std::vector<int> const merge_flag = {1, 1, 0, 1, 1, 0, 0, 1, 1, 1};
    std::vector<std::vector<int>> const groups = {{0, 1}, {2, 3, 4}, {5}, {6, 7, 8, 9}};
    Inputs in = random_inputs(rng, spec, 10);
    for (int t = 0; t < in.tokens; ++t) {
      set_decision(spec, config, in, t, 0, merge_flag[t] != 0);
      q_at(spec, in, t, 0, d) *= 1.5f;
    }

    DmcLayerState state = make_dmc_state(spec, config);
    int group = -1;
    for (int t = 0; t < in.tokens; ++t) {
      INFO("token " << t);
      DmcStepDecisions decisions;
      step(spec, config, state, in, t, &decisions);
      bool const merged = t > 0 && merge_flag[t] != 0;
      CHECK(decisions.merged.at(0) == (merged ? 1 : 0));
      if (!merged) ++group;
      HeadCache const& head = state.heads[0];
      REQUIRE(head.size() == group + 1);
      CHECK(head.position.back() == t);
      int const first = groups[group].front();
      std::vector<float> const key = slot_k(spec, head, group);
      CHECK(key[d] == 0.0f);
      test::require_close(key, to_float(weighted_mean(spec, config, in, 0, first, t, true)),
                          kF32Hand, "open slot key");
      test::require_close(slot_v(spec, head, group),
                          to_float(weighted_mean(spec, config, in, 0, first, t, false)), kF32Hand,
                          "open slot value");
      CHECK(state.dmc[0].group_length == t - first + 1);
      CHECK(state.dmc[0].k_sum[d] == 0.0f);  // the decision neuron never enters the key sums
    }
    // Every slot, closed and open, once more at the end.
    HeadCache const& head = state.heads[0];
    REQUIRE(head.size() == 4);
    for (int s = 0; s < 4; ++s) {
      int const first = groups[s].front();
      int const last = groups[s].back();
      CHECK(head.position[s] == last);
      test::require_close(slot_k(spec, head, s),
                          to_float(weighted_mean(spec, config, in, 0, first, last, true)),
                          kF32Hand, "slot key");
      test::require_close(slot_v(spec, head, s),
                          to_float(weighted_mean(spec, config, in, 0, first, last, false)),
                          kF32Hand, "slot value");
    }
    CHECK(dmc_head_compression_ratio(state, 0) == doctest::Approx(2.5));
    CHECK(dmc_compression_ratio(state) == doctest::Approx(2.5));
  }
}

TEST_CASE("dmc: a 20-token merge run averages the last 12 (checkpoint) or all 20 (paper)") {
  std::mt19937_64 rng(test::test_seed());
  INFO("seed " << test::test_seed());
  for (DmcConfig const config : {DmcConfig::checkpoint(), DmcConfig::paper()}) {
    INFO("mode " << mode_name(config));
    LayerSpec const spec = make_spec(1, 1, 8, DType::kF32, RopeLayout::kNone);
    int const d = config.decision_index(spec.head_dim);
    int const tokens = 20;
    Inputs in = random_inputs(rng, spec, tokens);
    for (int t = 0; t < tokens; ++t) {
      set_decision(spec, config, in, t, 0, t > 0);
      q_at(spec, in, t, 0, d) *= 2.0f;  // omegas spread over (0.5, 1) and beyond
    }
    DmcLayerState state = make_dmc_state(spec, config);
    for (int t = 0; t < tokens; ++t) step(spec, config, state, in, t);

    HeadCache const& head = state.heads[0];
    REQUIRE(head.size() == 1);
    CHECK(head.position[0] == tokens - 1);
    CHECK(state.dmc[0].group_length == tokens);
    int const first = config.mode == DmcMode::kCheckpoint ? tokens - 12 : 0;
    int const other = config.mode == DmcMode::kCheckpoint ? 0 : tokens - 12;
    std::vector<double> const v_mean =
        weighted_mean(spec, config, in, 0, first, tokens - 1, false);
    std::vector<double> const v_other =
        weighted_mean(spec, config, in, 0, other, tokens - 1, false);
    double gap = 0.0;  // the two candidate means must be told apart by the tolerance
    for (int i = 0; i < spec.head_dim; ++i) gap = std::max(gap, std::abs(v_mean[i] - v_other[i]));
    REQUIRE(gap > 1e-3);
    test::require_close(slot_v(spec, head, 0), to_float(v_mean), kF32Hand, "value mean");
    test::require_close(slot_k(spec, head, 0),
                        to_float(weighted_mean(spec, config, in, 0, first, tokens - 1, true)),
                        kF32Hand, "key mean");
    double weight = 0.0;
    for (int t = first; t < tokens; ++t) weight += token_omega(spec, config, in, t, 0);
    CHECK(state.dmc[0].weight_sum == doctest::Approx(weight).epsilon(1e-5));
  }
}

TEST_CASE("dmc: merged keys get RoPE at the newest position and a zero decision dim") {
  std::mt19937_64 rng(test::test_seed());
  INFO("seed " << test::test_seed());
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (RopeLayout layout :
         {RopeLayout::kNone, RopeLayout::kRotateHalf, RopeLayout::kInterleaved}) {
      for (DmcConfig const config : {DmcConfig::checkpoint(), DmcConfig::paper()}) {
        INFO(name(dtype) << ", rope " << name(layout) << ", mode " << mode_name(config));
        LayerSpec spec = make_spec(1, 1, 8, dtype, layout);
        spec.rope.theta = 2.0;  // large angles on every pair at these small positions
        int const dim = spec.head_dim;
        int const d = config.decision_index(dim);
        // Groups {0, 1, 2, 3} (newest position 3) and {4}.
        Inputs in = random_inputs(rng, spec, 5);
        for (int t = 0; t < 5; ++t) set_decision(spec, config, in, t, 0, t >= 1 && t <= 3);
        DmcLayerState state = make_dmc_state(spec, config);
        for (int t = 0; t < 5; ++t) step(spec, config, state, in, t);

        HeadCache const& head = state.heads[0];
        REQUIRE(head.size() == 2);
        CHECK(head.position[0] == 3);
        CHECK(head.position[1] == 4);
        std::vector<double> const mean = weighted_mean(spec, config, in, 0, 0, 3, true);
        std::vector<float> const key = slot_k(spec, head, 0);
        // Rounded once, after RoPE (16-bit dtypes: exactly the rounding of the exact value).
        require_rounded(key, expected_key(mean, spec.rope, 3, d), dtype, "merged key");
        require_rounded(slot_v(spec, head, 0), weighted_mean(spec, config, in, 0, 0, 3, false),
                        dtype, "merged value");
        require_rounded(
            slot_k(spec, head, 1),
            expected_key(weighted_mean(spec, config, in, 0, 4, 4, true), spec.rope, 4, d), dtype,
            "single-token key");
        CHECK(key[d] == 0.0f);
        CHECK(slot_k(spec, head, 1)[d] == 0.0f);
        if (dtype != DType::kF32) continue;
        if (layout == RopeLayout::kNone) {
          for (int i = 0; i < dim; ++i) {
            if (i != d) CHECK(key[i] == doctest::Approx(mean[i]).epsilon(1e-5));
          }
          continue;
        }
        // The decision dim's RoPE partner keeps only its cos term.
        int const partner = rope_partner(d, dim, layout);
        if (layout == RopeLayout::kRotateHalf && config.mode == DmcMode::kCheckpoint) {
          CHECK(partner == dim / 2 - 1);
        }
        int const pair = rope_pair_index(partner, dim, layout);
        double const angle = 3.0 * std::pow(spec.rope.theta, -2.0 * pair / dim);
        REQUIRE(std::abs(std::cos(angle) - 1.0) > 0.05);
        CHECK(key[partner] == doctest::Approx(mean[partner] * std::cos(angle)).epsilon(1e-5));
        // ... and the key is not the one RoPE'd at the group's first position.
        std::vector<double> const at_first = expected_key(mean, spec.rope, 0, d);
        double gap = 0.0;
        for (int i = 0; i < dim; ++i) gap = std::max(gap, std::abs(key[i] - at_first[i]));
        CHECK(gap > 1e-2);
      }
    }
  }
}

TEST_CASE("dmc: bf16 decision threshold at offset 5") {
  std::mt19937_64 rng(test::test_seed());
  INFO("seed " << test::test_seed());
  DmcConfig const config = DmcConfig::checkpoint();
  struct Probe {
    float k_decision;
    bool merges_bf16;
    bool merges_f32;
  };
  // 5.01 rounds to 5.0 in bf16 (spacing 2^-5 here): the decision sees the rounded input.
  std::vector<Probe> const probes = {{5.0f, false, false},     {5.03125f, true, true},
                                     {4.96875f, false, false}, {5.01f, false, true},
                                     {5.03125f, true, true},   {5.0f, false, false}};
  for (DType dtype : {DType::kBF16, DType::kF32}) {
    INFO("dtype " << name(dtype));
    LayerSpec const spec = make_spec(1, 1, 8, dtype, RopeLayout::kRotateHalf);
    Inputs in = random_inputs(rng, spec, 1 + static_cast<int>(probes.size()));
    for (std::size_t p = 0; p < probes.size(); ++p) {
      k_at(spec, in, static_cast<int>(p) + 1, 0, spec.head_dim - 1) = probes[p].k_decision;
    }
    DmcLayerState state = make_dmc_state(spec, config);
    step(spec, config, state, in, 0);
    int slots = 1;
    for (std::size_t p = 0; p < probes.size(); ++p) {
      INFO("k[D-1] = " << probes[p].k_decision);
      DmcStepDecisions decisions;
      step(spec, config, state, in, static_cast<int>(p) + 1, &decisions);
      bool const expected = dtype == DType::kBF16 ? probes[p].merges_bf16 : probes[p].merges_f32;
      CHECK(decisions.merged.at(0) == (expected ? 1 : 0));
      if (!expected) ++slots;
      CHECK(state.heads[0].size() == slots);
    }
  }
}

TEST_CASE("dmc: GQA omega is sigmoid(mean of the group's q[d] + 5) + 2^-7") {
  std::mt19937_64 rng(test::test_seed());
  INFO("seed " << test::test_seed());
  DmcConfig const config = DmcConfig::checkpoint();
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    INFO(name(dtype));
    LayerSpec const spec = make_spec(8, 2, 8, dtype, RopeLayout::kRotateHalf);
    int const d = config.decision_index(spec.head_dim);
    Inputs in = random_inputs(rng, spec, 2);
    // Distinct q[d] per query head, not representable in bf16: omega uses the rounded inputs.
    std::uniform_real_distribution<float> jitter(-0.2f, 0.2f);
    std::vector<float> base = {-3.0f, -1.5f, 0.5f, 2.25f};
    for (int t = 0; t < 2; ++t) {
      for (int h = 0; h < 2; ++h) {
        std::shuffle(base.begin(), base.end(), rng);
        for (int g = 0; g < 4; ++g) q_at(spec, in, t, h * 4 + g, d) = base[g] + jitter(rng);
        set_decision(spec, config, in, t, h, t == 1);
      }
    }
    DmcLayerState state = make_dmc_state(spec, config);
    std::vector<double> omegas[2];
    for (int t = 0; t < 2; ++t) {
      DmcStepDecisions decisions;
      step(spec, config, state, in, t, &decisions);
      REQUIRE(decisions.omega.size() == 2);
      for (int h = 0; h < 2; ++h) {
        auto logit = [&](int g) {
          return static_cast<double>(round_to_dtype(q_at(spec, in, t, h * 4 + g, d), dtype));
        };
        double const mean = (logit(0) + logit(1) + logit(2) + logit(3)) / 4.0;
        double const expected = 1.0 / (1.0 + std::exp(-(mean + 5.0))) + 1.0 / 128.0;
        CHECK(decisions.omega[h] == doctest::Approx(expected).epsilon(1e-6));
        // Not the first query head's omega alone.
        double const first_only = 1.0 / (1.0 + std::exp(-(logit(0) + 5.0))) + 1.0 / 128.0;
        CHECK(std::abs(first_only - expected) > 1e-4);
        omegas[h].push_back(expected);
      }
    }
    for (int h = 0; h < 2; ++h) {
      HeadCache const& head = state.heads[h];
      REQUIRE(head.size() == 1);
      double const w0 = omegas[h][0];
      double const w1 = omegas[h][1];
      std::vector<double> expected(spec.head_dim);
      for (int i = 0; i < spec.head_dim; ++i) {
        expected[i] = (w0 * v_of(spec, in, 0, h, i) + w1 * v_of(spec, in, 1, h, i)) / (w0 + w1);
      }
      require_rounded(slot_v(spec, head, 0), expected, dtype, "merged value");
      CHECK(state.dmc[h].weight_sum == doctest::Approx(w0 + w1).epsilon(1e-6));
    }
  }
}

TEST_CASE("dmc: parallel prefill equals token-by-token prefill (random chunks then decode)") {
  std::mt19937_64 rng(test::test_seed());
  INFO("seed " << test::test_seed());
  struct Case {
    int head_dim, group, kv_heads;
    DType dtype;
    DmcConfig config;
    RopeLayout rope;
    std::vector<int> chunks;
    int decode_steps;
  };
  DmcConfig const checkpoint = DmcConfig::checkpoint();
  DmcConfig const paper = DmcConfig::paper();
  DmcConfig window5 = checkpoint;
  window5.window = 5;
  DmcConfig window_max = checkpoint;
  window_max.window = kDmcMaxWindow;
  DmcConfig paper12 = paper;
  paper12.window = 12;
  DmcConfig interleaved_first = checkpoint;  // a decision neuron in the middle of the head
  interleaved_first.decision_dim = 5;
  std::vector<Case> const cases = {
      {16, 1, 4, DType::kF32, checkpoint, RopeLayout::kRotateHalf, {512}, 4},
      {32, 2, 4, DType::kBF16, checkpoint, RopeLayout::kInterleaved, {100, 77, 123}, 5},
      {64, 4, 2, DType::kF16, paper, RopeLayout::kRotateHalf, {64, 136}, 4},
      {16, 4, 4, DType::kBF16, paper, RopeLayout::kNone, {200, 150, 162}, 3},
      {32, 1, 4, DType::kF32, paper, RopeLayout::kInterleaved, {128}, 6},
      {64, 2, 4, DType::kF32, checkpoint, RopeLayout::kNone, {13, 40, 43}, 5},
      {16, 2, 4, DType::kF16, window5, RopeLayout::kRotateHalf, {7, 70, 73}, 6},
      {32, 4, 2, DType::kBF16, paper12, RopeLayout::kInterleaved, {90, 90}, 4},
      {64, 1, 4, DType::kF32, window_max, RopeLayout::kRotateHalf, {100, 156}, 3},
      {16, 2, 4, DType::kF32, interleaved_first, RopeLayout::kInterleaved, {1, 1, 30, 17}, 4},
  };
  // Per KV head; the last head always merges (one run over the whole sequence).
  double const probabilities[4] = {0.0, 0.5, 0.9, 1.0};

  for (Case const& c : cases) {
    LayerSpec const spec =
        make_spec(c.group * c.kv_heads, c.kv_heads, c.head_dim, c.dtype, c.rope);
    DmcConfig const& config = c.config;
    int prompt = 0;
    for (int n : c.chunks) prompt += n;
    INFO("D " << c.head_dim << ", G " << c.group << ", " << name(c.dtype) << ", "
              << mode_name(config) << " window " << config.window << ", rope " << name(c.rope)
              << ", prompt " << prompt);
    int const total = prompt + c.decode_steps;
    int const d = config.decision_index(spec.head_dim);
    auto merge_probability = [&](int h) { return probabilities[(h + 4 - c.kv_heads) % 4]; };
    Inputs in = random_inputs(rng, spec, total);
    std::uniform_real_distribution<float> unit(0.0f, 1.0f);
    std::uniform_real_distribution<float> margin(0.25f, 2.0f);
    for (int t = 0; t < total; ++t) {
      for (int h = 0; h < spec.num_kv_heads; ++h) {
        bool const merge = unit(rng) < merge_probability(h);
        k_at(spec, in, t, h, d) =
            round_to_dtype(config.offset + (merge ? 1.0f : -1.0f) * margin(rng), spec.dtype);
      }
      for (int h = 0; h < spec.num_q_heads; ++h) q_at(spec, in, t, h, d) *= 2.0f;
    }
    // Chunk boundaries fall inside merge runs: the first token of every later chunk merges in
    // every head that merges at all.
    for (int start = 0, i = 0; i + 1 < static_cast<int>(c.chunks.size()); ++i) {
      start += c.chunks[i];
      for (int h = 0; h < spec.num_kv_heads; ++h) {
        if (merge_probability(h) > 0.0) set_decision(spec, config, in, start, h, true);
      }
    }

    // With an unbounded window both orders add the same terms in the same order: bitwise equal.
    Tolerance const tol = config.window == 0 ? Tolerance{0, 0} : default_tolerance(c.dtype);
    Tolerance const sum_tol =  // fp32 sums: running subtraction vs direct window sums
        config.window == 0 ? Tolerance{0, 0} : Tolerance{2e-4, 1e-4};
    auto compare = [&](DmcLayerState const& parallel, DmcLayerState const& sequential) {
      REQUIRE(parallel.tokens_seen == sequential.tokens_seen);
      for (int h = 0; h < spec.num_kv_heads; ++h) {
        INFO("kv head " << h);
        HeadCache const& a = parallel.heads[h];
        HeadCache const& b = sequential.heads[h];
        REQUIRE(a.size() == b.size());
        CHECK(a.position == b.position);
        test::require_close(a.k, b.k, tol, "slot keys");
        test::require_close(a.v, b.v, tol, "slot values");
        DmcHeadState const& s = parallel.dmc[h];
        DmcHeadState const& r = sequential.dmc[h];
        CHECK(s.group_length == r.group_length);
        test::require_close(s.k_sum, r.k_sum, sum_tol, "k_sum");
        test::require_close(s.v_sum, r.v_sum, sum_tol, "v_sum");
        test::require_close({s.weight_sum}, {r.weight_sum}, sum_tol, "weight_sum");
        test::require_close(s.ring_k, r.ring_k, {0, 0}, "ring_k");
        test::require_close(s.ring_v, r.ring_v, {0, 0}, "ring_v");
        test::require_close(s.ring_w, r.ring_w, {0, 0}, "ring_w");
      }
    };

    DmcLayerState parallel = make_dmc_state(spec, config);
    DmcLayerState sequential = make_dmc_state(spec, config);
    int start = 0;
    for (int n : c.chunks) {
      INFO("chunk at " << start << " of " << n);
      AttentionOutput out_parallel;
      AttentionOutput out_sequential;
      REQUIRE(dmc_prefill(spec, config, parallel, chunk_input(spec, in, start, n),
                          out_parallel) == Status::kSuccess);
      REQUIRE(dmc_prefill_sequential(spec, config, sequential, chunk_input(spec, in, start, n),
                                     out_sequential) == Status::kSuccess);
      test::require_close(out_parallel.out, out_sequential.out, tol, "prefill outputs");
      test::require_close(out_parallel.lse, out_sequential.lse, tol, "prefill lse");
      compare(parallel, sequential);
      start += n;
    }
    for (int t = prompt; t < total; ++t) {
      INFO("decode token " << t);
      AttentionOutput out_parallel;
      AttentionOutput out_sequential;
      DmcStepDecisions dec_parallel;
      DmcStepDecisions dec_sequential;
      step(spec, config, parallel, in, t, &dec_parallel, &out_parallel);
      step(spec, config, sequential, in, t, &dec_sequential, &out_sequential);
      CHECK(dec_parallel.merged == dec_sequential.merged);
      test::require_close(out_parallel.out, out_sequential.out, tol, "decode outputs");
    }
    compare(parallel, sequential);
    // The merge probabilities must have produced runs longer than the window.
    if (config.window > 0) CHECK(sequential.dmc[c.kv_heads - 1].group_length > config.window);
  }
}

TEST_CASE("dmc: compression ratio is tokens / slots and slots = 1 + appends") {
  std::mt19937_64 rng(test::test_seed());
  INFO("seed " << test::test_seed());
  DmcConfig const config = DmcConfig::checkpoint();
  LayerSpec const spec = make_spec(6, 3, 16, DType::kBF16, RopeLayout::kRotateHalf);
  int const d = config.decision_index(spec.head_dim);
  int const tokens = 60;
  Inputs in = random_inputs(rng, spec, tokens);
  std::bernoulli_distribution coin(0.6);
  std::vector<int> appends(spec.num_kv_heads, 0);
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < spec.num_kv_heads; ++h) {
      // Head 0 always appends; the others merge with probability 0.6.
      bool const merge = h > 0 && coin(rng);
      set_decision(spec, config, in, t, h, merge);
      if (t == 0 || !merge) ++appends[h];
    }
  }
  DmcLayerState empty = make_dmc_state(spec, config);
  CHECK(dmc_compression_ratio(empty) == 1.0);
  CHECK(dmc_head_compression_ratio(empty, 0) == 1.0);

  DmcLayerState state = make_dmc_state(spec, config);
  AttentionOutput out;
  REQUIRE(dmc_prefill(spec, config, state, chunk_input(spec, in, 0, 40), out) ==
          Status::kSuccess);
  for (int t = 40; t < tokens; ++t) step(spec, config, state, in, t);
  CHECK(state.tokens_seen == tokens);
  int total_slots = 0;
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    INFO("kv head " << h);
    CHECK(state.heads[h].size() == appends[h]);
    CHECK(dmc_head_compression_ratio(state, h) == static_cast<double>(tokens) / appends[h]);
    total_slots += appends[h];
    CHECK(state.heads[h].k[static_cast<std::size_t>(state.heads[h].size() - 1) * 16 + d] == 0.0f);
  }
  CHECK(dmc_head_compression_ratio(state, 0) == 1.0);
  CHECK(dmc_compression_ratio(state) ==
        doctest::Approx(static_cast<double>(tokens) * spec.num_kv_heads / total_slots));
  CHECK(dmc_head_compression_ratio(state, spec.num_kv_heads) == 0.0);
  CHECK(dmc_head_compression_ratio(state, -1) == 0.0);
}

TEST_CASE("dmc: every token appending reproduces the full cache exactly") {
  // DMC zeroes q[d] and k[d] (before and after RoPE), so Full gets q[d] = k[d] = 0, and q's RoPE
  // partner of d zeroed in both (so Full's nonzero rotated k[d] meets a zero q[d]). Omega is a
  // power of two (2^-7 with q[d] = -40 in checkpoint mode, sigmoid(0) = 0.5 in paper mode), so a
  // one-token slot is exactly its key and value. Then keys agree on every dim but d (0 in DMC),
  // and values, positions, outputs and LSE agree bit for bit.
  std::mt19937_64 rng(test::test_seed());
  INFO("seed " << test::test_seed());
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (RopeLayout layout :
         {RopeLayout::kNone, RopeLayout::kRotateHalf, RopeLayout::kInterleaved}) {
      for (DmcConfig const config : {DmcConfig::checkpoint(), DmcConfig::paper()}) {
        INFO(name(dtype) << ", rope " << name(layout) << ", " << mode_name(config));
        LayerSpec const spec = make_spec(4, 2, 16, dtype, layout);
        int const dim = spec.head_dim;
        int const d = config.decision_index(dim);
        int const partner = rope_partner(d, dim, layout);
        int const tokens = 24;
        Inputs dmc_in = random_inputs(rng, spec, tokens);
        for (int t = 0; t < tokens; ++t) {
          for (int h = 0; h < spec.num_q_heads; ++h) {
            q_at(spec, dmc_in, t, h, d) = config.mode == DmcMode::kCheckpoint ? -40.0f : 0.0f;
            if (layout != RopeLayout::kNone) q_at(spec, dmc_in, t, h, partner) = 0.0f;
          }
          for (int h = 0; h < spec.num_kv_heads; ++h)
            set_decision(spec, config, dmc_in, t, h, false);
        }
        Inputs full_in = dmc_in;
        for (int t = 0; t < tokens; ++t) {
          for (int h = 0; h < spec.num_q_heads; ++h) q_at(spec, full_in, t, h, d) = 0.0f;
          for (int h = 0; h < spec.num_kv_heads; ++h) k_at(spec, full_in, t, h, d) = 0.0f;
        }

        // Prefill in two chunks, then decode.
        DmcLayerState dmc = make_dmc_state(spec, config);
        FullLayerState full = make_full_state(spec);
        std::vector<float> dmc_out, full_out, dmc_lse, full_lse;
        auto collect = [](AttentionOutput const& o, std::vector<float>& out,
                          std::vector<float>& lse) {
          out.insert(out.end(), o.out.begin(), o.out.end());
          lse.insert(lse.end(), o.lse.begin(), o.lse.end());
        };
        for (int start : {0, 10}) {
          int const n = start == 0 ? 10 : 8;
          AttentionOutput a, b;
          REQUIRE(dmc_prefill(spec, config, dmc, chunk_input(spec, dmc_in, start, n), a) ==
                  Status::kSuccess);
          REQUIRE(full_prefill(spec, FullConfig{}, full, chunk_input(spec, full_in, start, n),
                               b) == Status::kSuccess);
          collect(a, dmc_out, dmc_lse);
          collect(b, full_out, full_lse);
        }
        for (int t = 18; t < tokens; ++t) {
          AttentionOutput a, b;
          DmcStepDecisions decisions;
          step(spec, config, dmc, dmc_in, t, &decisions, &a);
          REQUIRE(full_decode_step(spec, FullConfig{}, full, token_input(spec, full_in, t), b) ==
                  Status::kSuccess);
          CHECK(decisions.omega[0] == (config.mode == DmcMode::kCheckpoint ? 0.0078125f : 0.5f));
          collect(a, dmc_out, dmc_lse);
          collect(b, full_out, full_lse);
        }
        test::require_close(dmc_out, full_out, {0, 0}, "outputs");
        test::require_close(dmc_lse, full_lse, {0, 0}, "lse");
        for (int h = 0; h < spec.num_kv_heads; ++h) {
          HeadCache const& a = dmc.heads[h];
          HeadCache const& b = full.heads[h];
          REQUIRE(a.size() == tokens);
          REQUIRE(b.size() == tokens);
          CHECK(a.position == b.position);
          test::require_close(a.v, b.v, {0, 0}, "values");
          std::vector<float> full_k = b.k;
          for (int s = 0; s < tokens; ++s) {
            CHECK(a.k[static_cast<std::size_t>(s) * dim + d] == 0.0f);
            full_k[static_cast<std::size_t>(s) * dim + d] = 0.0f;
          }
          test::require_close(a.k, full_k, {0, 0}, "keys except the decision dim");
        }
        CHECK(dmc_compression_ratio(dmc) == 1.0);
      }
    }
  }
}

TEST_CASE("dmc: bad input returns the right status and leaves the state unchanged") {
  std::mt19937_64 rng(test::test_seed());
  INFO("seed " << test::test_seed());
  DmcConfig const config = DmcConfig::checkpoint();
  LayerSpec const spec = make_spec(4, 2, 8, DType::kBF16, RopeLayout::kRotateHalf);
  Inputs in = random_inputs(rng, spec, 12);
  for (int t = 0; t < 12; ++t) {
    for (int h = 0; h < 2; ++h) set_decision(spec, config, in, t, h, t % 3 != 0);
  }
  DmcLayerState state = make_dmc_state(spec, config);
  AttentionOutput out;
  REQUIRE(dmc_prefill(spec, config, state, chunk_input(spec, in, 0, 6), out) == Status::kSuccess);
  for (int t = 6; t < 9; ++t) step(spec, config, state, in, t);
  DmcLayerState const snapshot = state;

  AttentionOutput const sentinel{{1.0f, 2.0f}, {3.0f}};
  auto expect = [&](Status expected, LayerSpec const& s, DmcConfig const& c, DmcLayerState& st,
                    DecodeInput const& decode, PrefillInput const& prefill, char const* what) {
    INFO(std::string(what));
    DmcLayerState const before = st;
    AttentionOutput output = sentinel;
    DmcStepDecisions decisions{{7}, {7.0f}};
    CHECK(dmc_decode_step(s, c, st, decode, output, &decisions) == expected);
    CHECK(same_state(st, before));
    CHECK(output.out == sentinel.out);
    CHECK(decisions.merged == std::vector<std::uint8_t>{7});
    CHECK(dmc_prefill(s, c, st, prefill, output) == expected);
    CHECK(same_state(st, before));
    CHECK(output.out == sentinel.out);
    CHECK(dmc_prefill_sequential(s, c, st, prefill, output) == expected);
    CHECK(same_state(st, before));
    CHECK(output.out == sentinel.out);
  };
  DecodeInput const good_decode = token_input(spec, in, 9);
  PrefillInput const good_prefill = chunk_input(spec, in, 9, 3);

  LayerSpec bad_heads = spec;  // q heads not a multiple of KV heads
  bad_heads.num_q_heads = 3;
  expect(Status::kErrorInvalidShape, bad_heads, config, state, good_decode, good_prefill,
         "q heads not a multiple of kv heads");
  LayerSpec odd_dim = spec;
  odd_dim.head_dim = 7;
  expect(Status::kErrorInvalidShape, odd_dim, config, state, good_decode, good_prefill,
         "odd head dim");

  DmcConfig bad_dim = config;
  bad_dim.decision_dim = spec.head_dim;
  expect(Status::kErrorInvalidArgument, spec, bad_dim, state, good_decode, good_prefill,
         "decision dim = D");
  bad_dim.decision_dim = -spec.head_dim - 1;
  expect(Status::kErrorInvalidArgument, spec, bad_dim, state, good_decode, good_prefill,
         "decision dim = -D-1");
  DmcConfig big_window = config;
  big_window.window = kDmcMaxWindow + 1;
  expect(Status::kErrorInvalidArgument, spec, big_window, state, good_decode, good_prefill,
         "window > kDmcMaxWindow");
  DmcConfig other_window = config;  // valid, but not the window the state's ring was made for
  other_window.window = 5;
  expect(Status::kErrorSizeMismatch, spec, other_window, state, good_decode, good_prefill,
         "window differs from the state's ring");

  DecodeInput short_q = good_decode;
  short_q.q.size -= 1;
  PrefillInput short_chunk_q = good_prefill;
  short_chunk_q.q.size -= 1;
  expect(Status::kErrorSizeMismatch, spec, config, state, short_q, short_chunk_q, "q size");
  DecodeInput short_k = good_decode;
  short_k.k.size -= 1;
  PrefillInput short_chunk_k = good_prefill;
  short_chunk_k.k.size -= spec.head_dim;
  expect(Status::kErrorSizeMismatch, spec, config, state, short_k, short_chunk_k, "k size");
  DecodeInput long_v = good_decode;
  long_v.v.size += 1;
  PrefillInput wrong_count = good_prefill;
  wrong_count.num_tokens = 2;  // spans hold 3 tokens
  expect(Status::kErrorSizeMismatch, spec, config, state, long_v, wrong_count, "v size / T");

  PrefillInput empty = good_prefill;
  empty.num_tokens = 0;
  empty.q.size = empty.k.size = empty.v.size = 0;
  {
    AttentionOutput output = sentinel;
    CHECK(dmc_prefill(spec, config, state, empty, output) == Status::kErrorInvalidArgument);
    CHECK(dmc_prefill_sequential(spec, config, state, empty, output) ==
          Status::kErrorInvalidArgument);
    CHECK(output.out == sentinel.out);
    CHECK(same_state(state, snapshot));
  }

  DmcLayerState wrong_heads =
      make_dmc_state(make_spec(3, 3, 8, DType::kBF16, RopeLayout::kNone), config);
  expect(Status::kErrorSizeMismatch, spec, config, wrong_heads, good_decode, good_prefill,
         "state for another number of kv heads");
  DmcLayerState lost_slots =
      state;  // tokens seen but a head without slots: a merge has no target
  lost_slots.heads[1] = HeadCache{};
  expect(Status::kErrorInvalidArgument, spec, config, lost_slots, good_decode, good_prefill,
         "tokens seen with an empty head");

  CHECK(same_state(state, snapshot));
  // The state still works after all the rejected calls.
  AttentionOutput after;
  REQUIRE(dmc_prefill(spec, config, state, good_prefill, after) == Status::kSuccess);
  CHECK(state.tokens_seen == 12);
}
}
