// H2O reference: eviction order on hand-built caches (lowest score, ties evict the newest
// position, NaN first, the recent window, recent = 0 lets the newcomer compete), scores and
// outputs against an independent double-precision recomputation over long random runs (GQA
// 1/4/8, every dtype, prefill chunks between decode steps), the budget invariant, the prefill cut
// against an independent sort, and rejection of bad input with the state left unchanged.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/reference/h2o.hpp"

#include "reference_inputs.hpp"
#include "reference_state_checks.hpp"
#include "reference_sweep.hpp"
#include "test_support.hpp"

using namespace kvc;
using namespace kvc::reference;

namespace {

using test::chunk_input;
using test::Inputs;
using test::make_spec;
using test::random_inputs;
using test::stored;
using test::token_input;

//! An independent model of H2O's bookkeeping: the alive positions of each KV head with their
//! scores accumulated in double from a naive softmax. Eviction decisions are read back from the
//! reference (sync) and judged by the caller against these scores.
struct NaiveH2O {
  LayerSpec spec;
  Inputs const* in = nullptr;
  std::vector<std::map<std::int64_t, double>> alive;  // [Hkv] position -> score
  std::vector<float> out;                             // [T, Hq, D] of the last call

  NaiveH2O(LayerSpec const& s, Inputs const& inputs)
      : spec(s), in(&inputs), alive(s.num_kv_heads) {}

  std::vector<float> key(std::int64_t p, int h) const {
    return stored(spec, in->k.data() + (p * spec.num_kv_heads + h) * spec.head_dim, p);
  }
  float value(std::int64_t p, int h, int i) const {
    return round_to_dtype(in->v[(p * spec.num_kv_heads + h) * spec.head_dim + i], spec.dtype);
  }

  //! Tokens [first, first + count) arrive; each query attends causally and adds its group's
  //! probabilities to every score.
  void step(std::int64_t first, int count) {
    int const d = spec.head_dim;
    int const group = spec.group_size();
    for (auto& head : alive) {
      for (std::int64_t p = first; p < first + count; ++p) head[p] = 0.0;
    }
    out.assign(static_cast<std::size_t>(count) * spec.num_q_heads * d, 0.0f);
    double const scale = 1.0 / std::sqrt(double(d));
    for (std::int64_t p = first; p < first + count; ++p) {
      for (int hq = 0; hq < spec.num_q_heads; ++hq) {
        int const h = hq / group;
        std::vector<float> const q =
            stored(spec, in->q.data() + (p * spec.num_q_heads + hq) * d, p);
        std::vector<std::int64_t> visible;
        std::vector<double> logit;
        for (auto const& entry : alive[h]) {
          if (entry.first > p) continue;
          std::vector<float> const k = key(entry.first, h);
          double dot = 0.0;
          for (int i = 0; i < d; ++i) dot += double(q[i]) * k[i];
          visible.push_back(entry.first);
          logit.push_back(dot * scale);
        }
        double const m = *std::max_element(logit.begin(), logit.end());
        double z = 0.0;
        for (double& l : logit) z += (l = std::exp(l - m));
        std::vector<double> acc(d, 0.0);
        for (std::size_t j = 0; j < visible.size(); ++j) {
          double const prob = logit[j] / z;
          alive[h][visible[j]] += prob;
          for (int i = 0; i < d; ++i) acc[i] += prob * value(visible[j], h, i);
        }
        float* o = out.data() + ((p - first) * spec.num_q_heads + hq) * d;
        for (int i = 0; i < d; ++i) o[i] = float(acc[i]);
      }
    }
  }

  //! Reads the reference's kept positions back; returns the dropped positions per KV head.
  std::vector<std::vector<std::int64_t>> sync(std::vector<HeadCache> const& heads) {
    std::vector<std::vector<std::int64_t>> dropped(alive.size());
    for (std::size_t h = 0; h < alive.size(); ++h) {
      std::set<std::int64_t> const kept(heads[h].position.begin(), heads[h].position.end());
      REQUIRE_MESSAGE(kept.size() == heads[h].position.size(), "duplicate positions");
      for (std::int64_t p : kept) REQUIRE_MESSAGE(alive[h].count(p) == 1, "unknown position " << p);
      for (auto it = alive[h].begin(); it != alive[h].end();) {
        if (kept.count(it->first) == 0) {
          dropped[h].push_back(it->first);
          it = alive[h].erase(it);
        } else {
          ++it;
        }
      }
    }
    return dropped;
  }
};

//! Checks one H2O state against the naive model after a step whose newest position is
//! `newest`: size min(count, budget), every kept score, key and value, and no recent position
//! dropped. (Whether the dropped slots were the lowest is judged by the caller.)
void check_h2o_step(NaiveH2O& naive, H2OLayerState const& state, H2OConfig const& config,
                    std::int64_t newest) {
  LayerSpec const& spec = naive.spec;
  std::vector<std::size_t> before(spec.num_kv_heads);
  for (int h = 0; h < spec.num_kv_heads; ++h) before[h] = naive.alive[h].size();
  auto const dropped = naive.sync(state.heads);
  CHECK(state.tokens_seen == newest + 1);
  std::size_t const budget = static_cast<std::size_t>(config.budget());
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    HeadCache const& head = state.heads[h];
    INFO("kv head " << h << " newest " << newest);
    REQUIRE(head.size() <= config.budget());
    REQUIRE(std::size_t(head.size()) == std::min(before[h], budget));
    REQUIRE(head.score.size() == std::size_t(head.size()));
    for (int s = 0; s < head.size(); ++s) {
      std::int64_t const p = head.position[s];
      double const want = naive.alive[h].at(p);
      REQUIRE_MESSAGE(std::abs(head.score[s] - want) <= 1e-5 + 1e-4 * want,
                      "score of position " << p << ": " << head.score[s] << " vs " << want);
      std::vector<float> const k = naive.key(p, h);
      for (int i = 0; i < spec.head_dim; ++i) {
        REQUIRE(head.k[std::size_t(s) * spec.head_dim + i] == k[i]);
        REQUIRE(head.v[std::size_t(s) * spec.head_dim + i] == naive.value(p, h, i));
      }
    }
    for (std::int64_t p : dropped[h]) {
      REQUIRE_MESSAGE(!h2o_is_recent(p, newest, config.recent), "dropped recent position " << p);
    }
  }
}

//! Runs H2O over a random sequence: prefill chunks and decode steps interleaved as `plan`
//! says (a positive entry is a prefill chunk of that many tokens, 0 a decode step), checking
//! every step against the naive model. Returns the number of evictions seen.
int run_and_check(std::mt19937_64& rng, LayerSpec const& spec, H2OConfig const& config,
                  std::vector<int> const& plan) {
  int total = 0;
  for (int entry : plan) total += entry > 0 ? entry : 1;
  Inputs const in = random_inputs(rng, spec, total);
  NaiveH2O naive(spec, in);
  H2OLayerState state = make_h2o_state(spec);
  std::int64_t position = 0;
  int evictions = 0;
  for (int entry : plan) {
    int const count = entry > 0 ? entry : 1;
    AttentionOutput out;
    if (entry > 0) {
      REQUIRE(h2o_prefill(spec, config, state, chunk_input(spec, in, position, count), out) ==
              Status::kSuccess);
    } else {
      REQUIRE(h2o_decode_step(spec, config, state, token_input(spec, in, position), out) ==
              Status::kSuccess);
    }
    // Snapshot the naive scores before the cut so that the dropped ones can be judged.
    naive.step(position, count);
    std::vector<std::map<std::int64_t, double>> const scores = naive.alive;
    std::int64_t const newest = position + count - 1;
    test::require_close(out.out, naive.out, {1e-5, 1e-5}, "attention output");
    for (int h = 0; h < spec.num_kv_heads; ++h) {
      std::set<std::int64_t> const kept(state.heads[h].position.begin(),
                                        state.heads[h].position.end());
      double min_kept = std::numeric_limits<double>::infinity();
      double max_dropped = -std::numeric_limits<double>::infinity();
      for (auto const& entry_score : scores[h]) {
        if (h2o_is_recent(entry_score.first, newest, config.recent)) continue;
        if (kept.count(entry_score.first)) {
          min_kept = std::min(min_kept, entry_score.second);
        } else {
          max_dropped = std::max(max_dropped, entry_score.second);
          ++evictions;
        }
      }
      // The dropped slots are the lowest-scored non-recent ones (up to float rounding).
      REQUIRE_MESSAGE(max_dropped <= min_kept + 1e-5 + 1e-4 * std::abs(min_kept),
                      "kv head " << h << " dropped a slot scored " << max_dropped
                                 << " but kept one scored " << min_kept);
    }
    check_h2o_step(naive, state, config, newest);
    position += count;
  }
  return evictions;
}

//! A hand-built state: every KV head holds the given positions (slot order) with its own
//! scores, random keys and values; tokens_seen = max position + 1.
H2OLayerState crafted_state(std::mt19937_64& rng, LayerSpec const& spec,
                            std::vector<std::int64_t> const& positions,
                            std::vector<std::vector<float>> const& scores) {
  H2OLayerState state = make_h2o_state(spec);
  std::size_t const n = positions.size();
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    state.heads[h].k = test::random_normal(rng, n * spec.head_dim, spec.dtype);
    state.heads[h].v = test::random_normal(rng, n * spec.head_dim, spec.dtype);
    state.heads[h].position = positions;
    state.heads[h].score = scores[h];
  }
  state.tokens_seen = *std::max_element(positions.begin(), positions.end()) + 1;
  return state;
}

//! A decode input whose q is zero: every slot gets probability 1 / (n + 1) in every head.
struct UniformToken {
  std::vector<float> q, k, v;
  UniformToken(std::mt19937_64& rng, LayerSpec const& spec)
      : q(std::size_t(spec.num_q_heads) * spec.head_dim, 0.0f),
        k(test::random_normal(rng, std::size_t(spec.num_kv_heads) * spec.head_dim)),
        v(test::random_normal(rng, std::size_t(spec.num_kv_heads) * spec.head_dim)) {}
  DecodeInput input() const { return DecodeInput{q, k, v}; }
};

//! Runs one uniform decode step on a crafted state and checks positions per head, the scores
//! (old + G/(n+1), the newcomer G/(n+1)) and that the newcomer's k/v landed where it should.
void check_crafted_step(std::mt19937_64& rng, H2OConfig const& config,
                        std::vector<std::int64_t> const& positions,
                        std::vector<std::vector<float>> const& scores,
                        std::vector<std::vector<std::int64_t>> const& expected_positions) {
  LayerSpec const spec = make_spec(4, 2, 8, DType::kF32);
  H2OLayerState state = crafted_state(rng, spec, positions, scores);
  H2OLayerState const before = state;
  UniformToken const token(rng, spec);
  AttentionOutput out;
  REQUIRE(h2o_decode_step(spec, config, state, token.input(), out) == Status::kSuccess);
  std::int64_t const t = before.tokens_seen;
  CHECK(state.tokens_seen == t + 1);
  float const share = 2.0f / float(positions.size() + 1);  // G = 2 query heads, uniform p
  for (int h = 0; h < 2; ++h) {
    INFO("kv head " << h);
    HeadCache const& head = state.heads[h];
    CHECK(head.position == expected_positions[h]);
    REQUIRE(head.size() == int(expected_positions[h].size()));
    std::vector<float> const key = stored(spec, token.k.data() + h * 8, t);
    for (int s = 0; s < head.size(); ++s) {
      std::int64_t const p = head.position[s];
      if (p == t) {
        CHECK(head.score[s] == doctest::Approx(share));
        for (int i = 0; i < 8; ++i) {
          CHECK(head.k[s * 8 + i] == key[i]);
          CHECK(head.v[s * 8 + i] == token.v[h * 8 + i]);
        }
        continue;
      }
      // An old slot stays in its slot with its k and v; its score grew by the uniform share.
      std::vector<std::int64_t> const& was_at = before.heads[h].position;
      int const old = int(std::find(was_at.begin(), was_at.end(), p) - was_at.begin());
      CHECK(old == s);
      float const was = before.heads[h].score[old];
      if (std::isnan(was)) {
        CHECK(std::isnan(head.score[s]));
      } else {
        CHECK(head.score[s] == doctest::Approx(was + share));
      }
      for (int i = 0; i < 8; ++i) {
        CHECK(head.k[s * 8 + i] == before.heads[h].k[old * 8 + i]);
        CHECK(head.v[s * 8 + i] == before.heads[h].v[old * 8 + i]);
      }
    }
  }
}

float const kNaN = std::numeric_limits<float>::quiet_NaN();

}  // namespace

TEST_SUITE("host") {
  TEST_CASE("h2o: eviction order on hand-built caches") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    // Slots hold positions 2, 0, 3, 1 (not in order); the newcomer is position 4, slot 4; every
    // slot receives the same probability, so the crafted scores decide.
    std::vector<std::int64_t> const positions{2, 0, 3, 1};
    SUBCASE("lowest score goes, per KV head; the newcomer takes its slot") {
      check_crafted_step(rng, H2OConfig{3, 1}, positions, {{5, 1, 9, 3}, {0.5f, 7, 2, 3}},
                         {{2, 4, 3, 1}, {4, 0, 3, 1}});
    }
    SUBCASE("ties evict the newest position") {
      check_crafted_step(rng, H2OConfig{3, 1}, positions, {{5, 1, 9, 1}, {2, 2, 2, 2}},
                         {{2, 0, 3, 4}, {2, 0, 4, 1}});
    }
    SUBCASE("a NaN score is evicted first; NaN ties evict the newest") {
      check_crafted_step(rng, H2OConfig{3, 1}, positions,
                         {{5, 1, kNaN, 0.5f}, {kNaN, 0.1f, 3, kNaN}}, {{2, 0, 4, 1}, {4, 0, 3, 1}});
    }
    SUBCASE("the recent window protects the newest positions") {
      // recent 3 protects positions 2, 3, 4: the lowest score (position 2) survives.
      check_crafted_step(rng, H2OConfig{1, 3}, positions,
                         {{0.1f, 5, 0.2f, 0.3f}, {0.2f, 0.3f, 0.1f, 7}},
                         {{2, 0, 3, 4}, {2, 4, 3, 1}});
    }
    SUBCASE("recent = 0: the newcomer competes and can be evicted") {
      // The newcomer scores 2/5; head 0's old slots all score more, head 1's position 0 ties with
      // it (0 + 2/5) and the tie evicts the newest: the newcomer. Nothing moves.
      check_crafted_step(rng, H2OConfig{4, 0}, positions, {{5, 6, 7, 8}, {5, 0, 7, 8}},
                         {{2, 0, 3, 1}, {2, 0, 3, 1}});
      // Head 1 with a NaN slot: that goes instead of the newcomer.
      check_crafted_step(rng, H2OConfig{4, 0}, positions, {{5, 6, 7, 8}, {5, 6, kNaN, 8}},
                         {{2, 0, 3, 1}, {2, 0, 4, 1}});
      // The same scores with recent = 1: the newcomer is protected.
      check_crafted_step(rng, H2OConfig{3, 1}, positions, {{5, 6, 7, 8}, {5, 0, 7, 8}},
                         {{4, 0, 3, 1}, {2, 4, 3, 1}});
    }
    SUBCASE("under budget nothing is evicted") {
      check_crafted_step(rng, H2OConfig{4, 1}, positions, {{5, 1, 9, 3}, {1, 1, 1, 1}},
                         {{2, 0, 3, 1, 4}, {2, 0, 3, 1, 4}});
    }
  }

  TEST_CASE("h2o: scores, outputs and the budget over long random runs") {
    std::mt19937_64 rng(test::test_seed() + 1);
    INFO("seed " << test::test_seed());
    H2OConfig const configs[] = {{6, 4}, {10, 0}, {1, 9}, {1, 1}};
    test::for_each_swept_spec(configs, [&](LayerSpec const& spec, H2OConfig const& config) {
      INFO("Hq " << spec.num_q_heads << " Hkv " << spec.num_kv_heads << " D " << spec.head_dim
                 << " " << std::string(dtype_name(spec.dtype)) << " " << std::string(rope_layout_name(spec.rope.layout))
                 << " heavy " << config.heavy << " recent " << config.recent);
      // Decode from empty, a prefill chunk that overflows the budget (appended to unordered
      // slots), more decode, a small chunk, more decode.
      std::vector<int> plan(30, 0);
      plan.push_back(13);
      plan.insert(plan.end(), 40, 0);
      plan.push_back(2);
      plan.insert(plan.end(), 20, 0);
      int const evictions = run_and_check(rng, spec, config, plan);
      CHECK(evictions > 0);
    });
  }

  TEST_CASE("h2o: chunked prefill then decode") {
    std::mt19937_64 rng(test::test_seed() + 2);
    INFO("seed " << test::test_seed());
    LayerSpec const spec = make_spec(8, 2, 16, DType::kBF16);
    // 7 tokens (under budget), 9 more (cut to budget), then decode.
    std::vector<int> plan{7, 9};
    plan.insert(plan.end(), 25, 0);
    int const evictions = run_and_check(rng, spec, H2OConfig{6, 4}, plan);
    CHECK(evictions > 0);
  }

  TEST_CASE("h2o: prefill keeps the last `recent` plus the top `heavy` (independent sort)") {
    std::mt19937_64 rng(test::test_seed() + 3);
    INFO("seed " << test::test_seed());
    int const tokens = 40;
    for (H2OConfig const config :
         {H2OConfig{6, 5}, H2OConfig{11, 0}, H2OConfig{0, 11}, H2OConfig{1, 1}}) {
      for (DType dtype : {DType::kF32, DType::kBF16}) {
        INFO("heavy " << config.heavy << " recent " << config.recent << " " << std::string(dtype_name(dtype)));
        LayerSpec const spec = make_spec(8, 2, 16, dtype);
        Inputs const in = random_inputs(rng, spec, tokens);
        PrefillInput const input = chunk_input(spec, in, 0, tokens);

        // All scores, from a run whose budget keeps everything.
        H2OLayerState all = make_h2o_state(spec);
        AttentionOutput all_out;
        REQUIRE(h2o_prefill(spec, H2OConfig{tokens, 0}, all, input, all_out) == Status::kSuccess);
        NaiveH2O naive(spec, in);
        naive.step(0, tokens);
        for (int h = 0; h < 2; ++h) {
          REQUIRE(all.heads[h].size() == tokens);
          for (int s = 0; s < tokens; ++s) {
            REQUIRE(all.heads[h].position[s] == s);
            double const want = naive.alive[h].at(s);  // column sum over queries and the group
            REQUIRE(std::abs(all.heads[h].score[s] - want) <= 1e-5 + 1e-5 * want);
          }
        }

        H2OLayerState cut = make_h2o_state(spec);
        AttentionOutput cut_out;
        REQUIRE(h2o_prefill(spec, config, cut, input, cut_out) == Status::kSuccess);
        CHECK(cut_out.out == all_out.out);
        CHECK(cut_out.lse == all_out.lse);
        CHECK(cut.tokens_seen == tokens);
        for (int h = 0; h < 2; ++h) {
          // Expected: positions [T - recent, T) and the heavy best of the rest, by the all-run's
          // scores (higher first, ties to the older position).
          std::vector<std::int64_t> rest;
          std::vector<std::int64_t> expected;
          for (std::int64_t p = 0; p < tokens; ++p) {
            (p >= tokens - config.recent ? expected : rest).push_back(p);
          }
          std::vector<float> const& score = all.heads[h].score;
          std::stable_sort(rest.begin(), rest.end(),
                           [&](std::int64_t a, std::int64_t b) { return score[a] > score[b]; });
          expected.insert(expected.end(), rest.begin(), rest.begin() + config.heavy);
          std::sort(expected.begin(), expected.end());
          CHECK(cut.heads[h].position == expected);
          REQUIRE(cut.heads[h].size() == int(expected.size()));
          for (int s = 0; s < cut.heads[h].size(); ++s) {
            std::int64_t const p = cut.heads[h].position[s];
            CHECK(cut.heads[h].score[s] == score[p]);
            for (int i = 0; i < 16; ++i) {
              CHECK(cut.heads[h].k[s * 16 + i] == all.heads[h].k[p * 16 + i]);
              CHECK(cut.heads[h].v[s * 16 + i] == all.heads[h].v[p * 16 + i]);
            }
          }
        }
      }
    }
  }

  TEST_CASE("h2o: prefill with T <= budget keeps every token") {
    std::mt19937_64 rng(test::test_seed() + 4);
    INFO("seed " << test::test_seed());
    LayerSpec const spec = make_spec(4, 4, 16, DType::kF16);
    for (int tokens : {1, 10, 11}) {
      Inputs const in = random_inputs(rng, spec, tokens);
      H2OLayerState state = make_h2o_state(spec);
      AttentionOutput out;
      REQUIRE(h2o_prefill(spec, H2OConfig{6, 5}, state, chunk_input(spec, in, 0, tokens), out) ==
              Status::kSuccess);
      NaiveH2O naive(spec, in);
      naive.step(0, tokens);
      test::require_close(out.out, naive.out, {1e-5, 1e-5}, "prefill output");
      for (int h = 0; h < 4; ++h) {
        REQUIRE(state.heads[h].size() == tokens);
        for (int s = 0; s < tokens; ++s) {
          CHECK(state.heads[h].position[s] == s);
          CHECK(state.heads[h].score[s] == doctest::Approx(naive.alive[h].at(s)).epsilon(1e-5));
        }
      }
      if (tokens == 1) {
        // One token attends to itself only: probability 1 per query head of the group.
        for (int h = 0; h < 4; ++h) CHECK(state.heads[h].score[0] == 1.0f);
      }
    }
  }

  TEST_CASE("h2o: bad input returns a status and leaves the state unchanged") {
    std::mt19937_64 rng(test::test_seed() + 5);
    INFO("seed " << test::test_seed());
    LayerSpec const spec = make_spec(4, 2, 8, DType::kF32);
    Inputs const in = random_inputs(rng, spec, 12);
    H2OConfig const config{3, 2};
    H2OLayerState state = make_h2o_state(spec);
    AttentionOutput out;
    REQUIRE(h2o_prefill(spec, config, state, chunk_input(spec, in, 0, 8), out) == Status::kSuccess);
    REQUIRE(h2o_decode_step(spec, config, state, token_input(spec, in, 8), out) ==
            Status::kSuccess);
    H2OLayerState const before = state;
    AttentionOutput const out_before = out;
    auto unchanged = [&] { test::check_state_unchanged(state, before, out, out_before); };
    DecodeInput const token = token_input(spec, in, 9);
    PrefillInput const chunk = chunk_input(spec, in, 9, 3);

    for (H2OConfig bad : {H2OConfig{0, 0}, H2OConfig{-1, 4}, H2OConfig{4, -1}, H2OConfig{-2, -2}}) {
      INFO("heavy " << bad.heavy << " recent " << bad.recent);
      CHECK(h2o_decode_step(spec, bad, state, token, out) == Status::kErrorInvalidBudget);
      unchanged();
      CHECK(h2o_prefill(spec, bad, state, chunk, out) == Status::kErrorInvalidBudget);
      unchanged();
    }
    // Size mismatches in the inputs.
    DecodeInput short_q = token;
    short_q.q.size -= 1;
    CHECK(h2o_decode_step(spec, config, state, short_q, out) == Status::kErrorSizeMismatch);
    unchanged();
    DecodeInput long_v = token;
    long_v.v.size += 1;
    CHECK(h2o_decode_step(spec, config, state, long_v, out) == Status::kErrorSizeMismatch);
    unchanged();
    PrefillInput wrong_count = chunk;
    wrong_count.num_tokens = 2;
    CHECK(h2o_prefill(spec, config, state, wrong_count, out) == Status::kErrorSizeMismatch);
    unchanged();
    PrefillInput empty = chunk;
    empty.num_tokens = 0;
    CHECK(h2o_prefill(spec, config, state, empty, out) == Status::kErrorInvalidArgument);
    unchanged();
    DecodeInput null_k = token;
    null_k.k = ConstSpan();
    CHECK(h2o_decode_step(spec, config, state, null_k, out) == Status::kErrorInvalidArgument);
    unchanged();
    // A spec that does not match the state, or is invalid.
    LayerSpec other = make_spec(4, 4, 8, DType::kF32);
    std::vector<float> const q4(4 * 8, 0.5f), k4(4 * 8, 0.25f);
    CHECK(h2o_decode_step(other, config, state, DecodeInput{q4, k4, k4}, out) ==
          Status::kErrorSizeMismatch);
    unchanged();
    LayerSpec invalid = spec;
    invalid.num_q_heads = 3;
    CHECK(h2o_decode_step(invalid, config, state, token, out) == Status::kErrorInvalidShape);
    unchanged();
    // A budget smaller than what the state already holds (decode only; prefill cuts to budget).
    CHECK(h2o_decode_step(spec, H2OConfig{2, 1}, state, token, out) == Status::kErrorInvalidBudget);
    unchanged();
    // Inconsistent states are rejected and left as they are.
    H2OLayerState broken = before;
    broken.heads[1].score.pop_back();
    H2OLayerState const broken_before = broken;
    CHECK(h2o_decode_step(spec, config, broken, token, out) == Status::kErrorSizeMismatch);
    CHECK(broken.heads[1].score == broken_before.heads[1].score);
    broken = before;
    broken.heads[0].position[0] = broken.tokens_seen;  // a position from the future
    CHECK(h2o_prefill(spec, config, broken, chunk, out) == Status::kErrorInvalidArgument);
    CHECK(broken.heads[0].position[0] == before.tokens_seen);  // untouched
    unchanged();

    // And the valid call still works afterwards.
    CHECK(h2o_decode_step(spec, config, state, token, out) == Status::kSuccess);
    CHECK(state.tokens_seen == before.tokens_seen + 1);
  }
}
