// Reference attention against a naive double-precision softmax written here: decode over ragged
// per-head caches, causal prefill, a chunk appended to a cache, masked visibility, GQA groups
// 1/2/4/8, LSE, probabilities (per-row sums and values), empty visibility, and size errors.
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/reference/attention.hpp"
#include "kvc/reference/chunk.hpp"

#include "test_support.hpp"

using namespace kvc;
using namespace kvc::reference;

namespace {

//! What the naive formula produces for a batch of queries.
struct NaiveResult {
  std::vector<float> out;                 // [T, Hq, D]
  std::vector<float> lse;                 // [T, Hq]
  std::vector<std::vector<double>> prob;  // [T * Hq][slots of the head]
};

//! Independent attention: logits in double, explicit max subtraction, exp, normalise.
//! `sees(t, kv_head, slot)` decides visibility. q: [T, Hq, D].
NaiveResult naive_attention(int q_heads, int kv_heads, int head_dim, double scale, int queries,
                            std::vector<float> const& q, std::vector<HeadCache> const& heads,
                            std::function<bool(int, int, int)> const& sees) {
  NaiveResult r;
  r.out.assign(static_cast<std::size_t>(queries) * q_heads * head_dim, 0.0f);
  r.lse.assign(static_cast<std::size_t>(queries) * q_heads, 0.0f);
  int const group = q_heads / kv_heads;
  for (int t = 0; t < queries; ++t) {
    for (int h = 0; h < q_heads; ++h) {
      HeadCache const& cache = heads[h / group];
      int const n = cache.size();
      std::vector<double> logit(n, 0.0);
      std::vector<bool> vis(n, false);
      double m = -std::numeric_limits<double>::infinity();
      for (int s = 0; s < n; ++s) {
        vis[s] = sees(t, h / group, s);
        if (!vis[s]) continue;
        double dot = 0.0;
        for (int i = 0; i < head_dim; ++i) {
          dot += double(q[(std::size_t(t) * q_heads + h) * head_dim + i]) *
                 double(cache.k[std::size_t(s) * head_dim + i]);
        }
        logit[s] = dot * scale;
        m = std::max(m, logit[s]);
      }
      std::vector<double> p(n, 0.0);
      std::size_t const row = std::size_t(t) * q_heads + h;
      if (m == -std::numeric_limits<double>::infinity()) {
        r.lse[row] = -std::numeric_limits<float>::infinity();
        r.prob.push_back(p);
        continue;
      }
      double z = 0.0;
      for (int s = 0; s < n; ++s) {
        if (vis[s]) {
          p[s] = std::exp(logit[s] - m);
          z += p[s];
        }
      }
      for (int i = 0; i < head_dim; ++i) {
        double acc = 0.0;
        for (int s = 0; s < n; ++s) acc += p[s] / z * cache.v[std::size_t(s) * head_dim + i];
        r.out[row * head_dim + i] = float(acc);
      }
      for (double& x : p) x /= z;
      r.lse[row] = float(m + std::log(z));
      r.prob.push_back(p);
    }
  }
  return r;
}

HeadCache random_head(std::mt19937_64& rng, int slots, int head_dim, DType dtype) {
  HeadCache head;
  head.k = test::random_normal(rng, std::size_t(slots) * head_dim, dtype);
  head.v = test::random_normal(rng, std::size_t(slots) * head_dim, dtype);
  for (int s = 0; s < slots; ++s) head.position.push_back(s);
  return head;
}

LayerSpec make_spec(int q_heads, int kv_heads, int head_dim, DType dtype) {
  LayerSpec spec;
  spec.num_q_heads = q_heads;
  spec.num_kv_heads = kv_heads;
  spec.head_dim = head_dim;
  spec.dtype = dtype;
  return spec;
}

//! Compares the reference's output, LSE and probabilities with the naive result.
void check_against_naive(AttentionOutput const& got, AttentionProbabilities const& probs,
                         NaiveResult const& want, std::string const& what) {
  test::require_close(got.out, want.out, {1e-6, 1e-6}, what + " out");
  REQUIRE(got.lse.size() == want.lse.size());
  for (std::size_t i = 0; i < want.lse.size(); ++i) {
    if (std::isinf(want.lse[i])) {
      CHECK_MESSAGE((std::isinf(got.lse[i]) && got.lse[i] < 0), what << " lse[" << i << "]");
    }
  }
  std::vector<float> finite_got, finite_want;
  for (std::size_t i = 0; i < want.lse.size(); ++i) {
    if (!std::isinf(want.lse[i])) {
      finite_got.push_back(got.lse[i]);
      finite_want.push_back(want.lse[i]);
    }
  }
  test::require_close(finite_got, finite_want, {1e-6, 1e-6}, what + " lse");
  REQUIRE(probs.rows.size() == want.prob.size());
  for (std::size_t row = 0; row < want.prob.size(); ++row) {
    REQUIRE(probs.rows[row].size() == want.prob[row].size());
    std::vector<float> expected(want.prob[row].begin(), want.prob[row].end());
    test::require_close(probs.rows[row], expected, {1e-7, 1e-6}, what + " probabilities");
    double sum = 0.0;
    for (float p : probs.rows[row]) sum += p;
    bool const any_visible = !std::isinf(want.lse[row]);
    CHECK_MESSAGE(std::abs(sum - (any_visible ? 1.0 : 0.0)) <= 1e-5,
                  what << " row " << row << " sums to " << sum);
  }
}

}  // namespace

TEST_SUITE("host") {
  TEST_CASE(
      "reference attention: decode over ragged caches matches a naive softmax (GQA 1/2/4/8)") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    std::uniform_int_distribution<int> kv_dist(1, 3), dim_dist(1, 40), slot_dist(1, 50);
    for (int group : {1, 2, 4, 8}) {
      for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
        for (int trial = 0; trial < 3; ++trial) {
          int const kv = kv_dist(rng);
          int const d = 2 * dim_dist(rng);
          LayerSpec spec = make_spec(group * kv, kv, d, dtype);
          if (trial == 2) spec.scale = 0.37f;
          double const scale = trial == 2 ? double(0.37f) : 1.0 / std::sqrt(double(d));
          INFO("G " << group << " kv " << kv << " D " << d << " " << std::string(dtype_name(dtype)) << " scale "
                    << scale);
          std::vector<HeadCache> heads;
          for (int h = 0; h < kv; ++h) heads.push_back(random_head(rng, slot_dist(rng), d, dtype));
          std::vector<float> const q =
              test::random_normal(rng, std::size_t(spec.num_q_heads) * d, dtype, 1.5f);
          AttentionOutput out;
          AttentionProbabilities probs;
          REQUIRE(decode_attention(spec, q, heads, out, &probs) == Status::kSuccess);
          REQUIRE(out.out.size() == q.size());
          REQUIRE(out.lse.size() == std::size_t(spec.num_q_heads));
          NaiveResult const want = naive_attention(spec.num_q_heads, kv, d, scale, 1, q, heads,
                                                   [](int, int, int) { return true; });
          check_against_naive(out, probs, want, "decode");

          // Without the probabilities request the output is the same.
          AttentionOutput plain;
          REQUIRE(decode_attention(spec, q, heads, plain) == Status::kSuccess);
          test::require_close(plain.out, out.out, {0, 0}, "decode without probabilities");
        }
      }
    }
  }

  TEST_CASE("reference attention: causal prefill matches a naive causal softmax") {
    std::mt19937_64 rng(test::test_seed() + 1);
    INFO("seed " << test::test_seed());
    std::uniform_int_distribution<int> kv_dist(1, 2), dim_dist(1, 24), len_dist(1, 33);
    for (int group : {1, 2, 4, 8}) {
      int const kv = kv_dist(rng);
      int const d = 2 * dim_dist(rng);
      int const tokens = len_dist(rng);
      LayerSpec const spec = make_spec(group * kv, kv, d, DType::kF32);
      INFO("G " << group << " kv " << kv << " D " << d << " T " << tokens);
      auto const q = test::random_normal(rng, std::size_t(tokens) * spec.num_q_heads * d);
      auto const k = test::random_normal(rng, std::size_t(tokens) * kv * d);
      auto const v = test::random_normal(rng, std::size_t(tokens) * kv * d);
      AttentionOutput out;
      AttentionProbabilities probs;
      REQUIRE(causal_attention(spec, tokens, q, k, v, out, &probs) == Status::kSuccess);

      // The naive side lays the tokens out per head itself.
      std::vector<HeadCache> heads(kv);
      for (int h = 0; h < kv; ++h) {
        for (int t = 0; t < tokens; ++t) {
          for (int i = 0; i < d; ++i) {
            heads[h].k.push_back(k[(std::size_t(t) * kv + h) * d + i]);
            heads[h].v.push_back(v[(std::size_t(t) * kv + h) * d + i]);
          }
          heads[h].position.push_back(t);
        }
      }
      NaiveResult const want =
          naive_attention(spec.num_q_heads, kv, d, 1.0 / std::sqrt(double(d)), tokens, q, heads,
                          [](int t, int, int s) { return s <= t; });
      check_against_naive(out, probs, want, "causal");
      // Row t has exactly t + 1 visible slots: the first query attends only to itself.
      for (int h = 0; h < spec.num_q_heads; ++h) {
        CHECK(probs.rows[h][0] == doctest::Approx(1.0f));
        CHECK(out.out[std::size_t(h) * d] == doctest::Approx(v[std::size_t(h / group) * d]));
      }
    }
  }

  TEST_CASE("reference attention: a chunk appended to a cache sees the cache and itself causally") {
    std::mt19937_64 rng(test::test_seed() + 2);
    INFO("seed " << test::test_seed());
    for (int group : {1, 4}) {
      LayerSpec spec = make_spec(2 * group, 2, 16, DType::kBF16);
      spec.rope.layout = RopeLayout::kInterleaved;
      std::vector<HeadCache> cached;
      for (int h = 0; h < 2; ++h) cached.push_back(random_head(rng, 7 + 3 * h, 16, DType::kBF16));
      int const tokens = 5;
      std::int64_t const first = 11;
      auto const q = test::random_normal(rng, std::size_t(tokens) * spec.num_q_heads * 16);
      auto const k = test::random_normal(rng, std::size_t(tokens) * 2 * 16);
      auto const v = test::random_normal(rng, std::size_t(tokens) * 2 * 16);
      PrefillInput const input{tokens, q, k, v};
      std::vector<HeadCache> extended;
      AttentionOutput out;
      AttentionProbabilities probs;
      REQUIRE(attend_chunk(spec, cached, input, first, true, extended, out, &probs) ==
              Status::kSuccess);
      REQUIRE(extended.size() == 2u);

      // Build the expected extended cache independently: round, rotate, round.
      std::vector<HeadCache> expected = cached;
      std::vector<float> q_rotated;
      for (int t = 0; t < tokens; ++t) {
        for (int h = 0; h < spec.num_q_heads; ++h) {
          std::vector<float> x(16);
          for (int i = 0; i < 16; ++i) {
            x[i] = round_to_dtype(q[(std::size_t(t) * spec.num_q_heads + h) * 16 + i], spec.dtype);
          }
          apply_rope(x.data(), 16, spec.rope, first + t);
          for (float& e : x) q_rotated.push_back(round_to_dtype(e, spec.dtype));
        }
        for (int h = 0; h < 2; ++h) {
          std::vector<float> x(16);
          for (int i = 0; i < 16; ++i)
            x[i] = round_to_dtype(k[(std::size_t(t) * 2 + h) * 16 + i], spec.dtype);
          apply_rope(x.data(), 16, spec.rope, first + t);
          for (float& e : x) expected[h].k.push_back(round_to_dtype(e, spec.dtype));
          for (int i = 0; i < 16; ++i) {
            expected[h].v.push_back(
                round_to_dtype(v[(std::size_t(t) * 2 + h) * 16 + i], spec.dtype));
          }
          expected[h].position.push_back(first + t);
          expected[h].score.push_back(0.0f);
        }
      }
      for (int h = 0; h < 2; ++h) {
        test::require_close(extended[h].k, expected[h].k, {0, 0}, "extended keys");
        test::require_close(extended[h].v, expected[h].v, {0, 0}, "extended values");
        CHECK(extended[h].position == expected[h].position);
        CHECK(extended[h].score.size() == std::size_t(tokens));
      }
      std::vector<int> const cached_size{cached[0].size(), cached[1].size()};
      NaiveResult const want = naive_attention(
          spec.num_q_heads, 2, 16, 0.25, tokens, q_rotated, expected,
          [&](int t, int h, int s) { return s < cached_size[h] || s - cached_size[h] <= t; });
      check_against_naive(out, probs, want, "chunk");
    }
  }

  TEST_CASE("reference attention: masked visibility, nothing visible, empty cache") {
    std::mt19937_64 rng(test::test_seed() + 3);
    INFO("seed " << test::test_seed());
    LayerSpec const spec = make_spec(8, 2, 32, DType::kF16);
    std::vector<HeadCache> heads{random_head(rng, 23, 32, DType::kF16),
                                 random_head(rng, 9, 32, DType::kF16)};
    int const queries = 4;
    auto const q = test::random_normal(rng, std::size_t(queries) * 8 * 32, DType::kF16);
    std::uint64_t const salt = rng();
    // Query 2 sees nothing in KV head 1; otherwise a pseudo-random mask.
    auto const sees = [salt](int t, int h, int s) {
      if (t == 2 && h == 1) return false;
      std::uint64_t x =
          salt ^ (std::uint64_t(t) * 1315423911u + std::uint64_t(h) * 2654435761u + s);
      x ^= x >> 29;
      x *= 0xbf58476d1ce4e5b9ull;
      x ^= x >> 32;
      return (x & 3u) != 0;
    };
    AttentionOutput out;
    AttentionProbabilities probs;
    REQUIRE(attention(spec, queries, q, heads, sees, out, &probs) == Status::kSuccess);
    NaiveResult const want =
        naive_attention(8, 2, 32, 1.0 / std::sqrt(32.0), queries, q, heads, sees);
    check_against_naive(out, probs, want, "masked");
    for (int t = 0; t < queries; ++t) {
      for (int h = 0; h < 8; ++h) {
        std::size_t const row = std::size_t(t) * 8 + h;
        for (int s = 0; s < heads[h / 4].size(); ++s) {
          if (!sees(t, h / 4, s)) CHECK(probs.rows[row][s] == 0.0f);
        }
      }
    }
    // Query 2, query heads 4..7 (KV head 1): zero output and -inf LSE.
    for (int h = 4; h < 8; ++h) {
      std::size_t const row = 2 * 8 + h;
      CHECK(std::isinf(out.lse[row]));
      CHECK(out.lse[row] < 0.0f);
      for (int i = 0; i < 32; ++i) CHECK(out.out[row * 32 + i] == 0.0f);
    }

    // A KV head with no slot at all behaves the same in decode.
    std::vector<HeadCache> with_empty{heads[0], HeadCache{}};
    AttentionOutput decode_out;
    REQUIRE(decode_attention(spec, ConstSpan(q.data(), 8 * 32), with_empty, decode_out) ==
            Status::kSuccess);
    for (int h = 0; h < 8; ++h) {
      CHECK(std::isinf(decode_out.lse[h]) == (h >= 4));
      if (h >= 4) {
        for (int i = 0; i < 32; ++i) CHECK(decode_out.out[std::size_t(h) * 32 + i] == 0.0f);
      }
    }
  }

  TEST_CASE("reference attention: size mismatches and bad specs return a status") {
    std::mt19937_64 rng(test::test_seed() + 4);
    INFO("seed " << test::test_seed());
    LayerSpec const spec = make_spec(4, 2, 8, DType::kF32);
    std::vector<HeadCache> heads{random_head(rng, 5, 8, DType::kF32),
                                 random_head(rng, 3, 8, DType::kF32)};
    auto const q = test::random_normal(rng, 4 * 8);
    AttentionOutput out;
    out.out = {1.0f, 2.0f};
    out.lse = {3.0f};
    AttentionOutput const before = out;
    auto unchanged = [&] {
      CHECK(out.out == before.out);
      CHECK(out.lse == before.lse);
    };

    auto const short_q = test::random_normal(rng, 4 * 8 - 1);
    CHECK(decode_attention(spec, short_q, heads, out) == Status::kErrorSizeMismatch);
    unchanged();
    std::vector<HeadCache> one_head{heads[0]};
    CHECK(decode_attention(spec, q, one_head, out) == Status::kErrorSizeMismatch);
    unchanged();
    std::vector<HeadCache> ragged = heads;
    ragged[1].v.pop_back();
    CHECK(decode_attention(spec, q, ragged, out) == Status::kErrorSizeMismatch);
    unchanged();
    ragged = heads;
    ragged[0].k.push_back(1.0f);
    CHECK(decode_attention(spec, q, ragged, out) == Status::kErrorSizeMismatch);
    unchanged();
    CHECK(attention(spec, -1, q, heads, Visibility{}, out) == Status::kErrorSizeMismatch);
    unchanged();

    LayerSpec bad = spec;
    bad.num_q_heads = 3;  // not a multiple of the KV heads
    CHECK(decode_attention(bad, q, heads, out) == Status::kErrorInvalidShape);
    unchanged();
    bad = spec;
    bad.head_dim = 7;
    CHECK(decode_attention(bad, q, heads, out) == Status::kErrorInvalidShape);
    unchanged();
    bad = spec;
    bad.scale = -1.0f;
    CHECK(decode_attention(bad, q, heads, out) == Status::kErrorInvalidArgument);
    unchanged();

    auto const k = test::random_normal(rng, 3 * 2 * 8);
    auto const v_short = test::random_normal(rng, 3 * 2 * 8 - 2);
    auto const q3 = test::random_normal(rng, 3 * 4 * 8);
    CHECK(causal_attention(spec, 3, q3, k, v_short, out) == Status::kErrorSizeMismatch);
    unchanged();
    CHECK(causal_attention(spec, 3, short_q, k, k, out) == Status::kErrorSizeMismatch);
    unchanged();
    REQUIRE(causal_attention(spec, 3, q3, k, k, out) == Status::kSuccess);
    CHECK(out.out.size() == q3.size());
  }
}
