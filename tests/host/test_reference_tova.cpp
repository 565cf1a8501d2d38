// TOVA reference: eviction order on hand-built caches (the lowest head-averaged score, not any
// one head's; ties evict the newest; protect_new), head-averaged scores, outputs, the shared
// index set and the budget against an independent double-precision model over long random runs
// (GQA 1/4/8, every dtype, prefill chunks between decode steps), the prefill cut against an
// independent sort, and rejection of bad input with the state left unchanged.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/reference/tova.hpp"

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

//! An independent model of TOVA: one set of alive positions for the layer with the latest
//! head-averaged probabilities in double from a naive softmax. Eviction decisions are read back
//! from the reference (sync) and judged by the caller against these scores.
struct NaiveTova {
  LayerSpec spec;
  Inputs const* in = nullptr;
  std::map<std::int64_t, double> alive;  // position -> score
  std::vector<float> out;                // [T, Hq, D] of the last call

  NaiveTova(LayerSpec const& s, Inputs const& inputs) : spec(s), in(&inputs) {}

  std::vector<float> key(std::int64_t p, int h) const {
    return stored(spec, in->k.data() + (p * spec.num_kv_heads + h) * spec.head_dim, p);
  }
  float value(std::int64_t p, int h, int i) const {
    return round_to_dtype(in->v[(p * spec.num_kv_heads + h) * spec.head_dim + i], spec.dtype);
  }

  //! Tokens [first, first + count) arrive and attend causally; the last query's probabilities,
  //! averaged over every query head, become the scores.
  void step(std::int64_t first, int count) {
    int const d = spec.head_dim;
    int const group = spec.group_size();
    for (std::int64_t p = first; p < first + count; ++p) alive[p] = 0.0;
    out.assign(static_cast<std::size_t>(count) * spec.num_q_heads * d, 0.0f);
    double const scale = 1.0 / std::sqrt(double(d));
    for (std::int64_t p = first; p < first + count; ++p) {
      bool const last = p == first + count - 1;
      if (last) {
        for (auto& entry : alive) entry.second = 0.0;
      }
      for (int hq = 0; hq < spec.num_q_heads; ++hq) {
        int const h = hq / group;
        std::vector<float> const q =
            stored(spec, in->q.data() + (p * spec.num_q_heads + hq) * d, p);
        std::vector<std::int64_t> visible;
        std::vector<double> logit;
        for (auto const& entry : alive) {
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
          if (last) alive[visible[j]] += prob / spec.num_q_heads;
          for (int i = 0; i < d; ++i) acc[i] += prob * value(visible[j], h, i);
        }
        float* o = out.data() + ((p - first) * spec.num_q_heads + hq) * d;
        for (int i = 0; i < d; ++i) o[i] = float(acc[i]);
      }
    }
  }
};

//! Runs TOVA over a random sequence: prefill chunks and decode steps as `plan` says (a positive
//! entry is a prefill chunk of that many tokens, 0 a decode step), checking every step against
//! the naive model. Returns the number of evictions seen.
int run_and_check(std::mt19937_64& rng, LayerSpec const& spec, TovaConfig const& config,
                  std::vector<int> const& plan) {
  int total = 0;
  for (int entry : plan) total += entry > 0 ? entry : 1;
  Inputs const in = random_inputs(rng, spec, total);
  NaiveTova naive(spec, in);
  TovaLayerState state = make_tova_state(spec);
  std::int64_t position = 0;
  int evictions = 0;
  for (int entry : plan) {
    int const count = entry > 0 ? entry : 1;
    bool const decode = entry == 0;
    AttentionOutput out;
    if (decode) {
      REQUIRE(tova_decode_step(spec, config, state, token_input(spec, in, position), out) ==
              Status::kSuccess);
    } else {
      REQUIRE(tova_prefill(spec, config, state, chunk_input(spec, in, position, count), out) ==
              Status::kSuccess);
    }
    naive.step(position, count);
    std::int64_t const newest = position + count - 1;
    INFO("newest position " << newest << (decode ? " (decode)" : " (prefill)"));
    test::require_close(out.out, naive.out, {1e-5, 1e-5}, "attention output");
    CHECK(state.tokens_seen == newest + 1);

    // One index set: every KV head has head 0's positions and scores, slot by slot.
    HeadCache const& first = state.heads.front();
    for (HeadCache const& head : state.heads) {
      REQUIRE(head.position == first.position);
      REQUIRE(head.score.size() == first.score.size());
      for (std::size_t s = 0; s < first.score.size(); ++s) {
        REQUIRE(std::memcmp(&head.score[s], &first.score[s], sizeof(float)) == 0);
      }
    }
    std::size_t const expected_size = std::min(naive.alive.size(), std::size_t(config.budget));
    REQUIRE(first.position.size() == expected_size);
    std::set<std::int64_t> const kept(first.position.begin(), first.position.end());
    REQUIRE(kept.size() == first.position.size());
    if (decode && config.protect_new) REQUIRE(kept.count(newest) == 1);

    // Scores, keys and values of the kept slots.
    for (int s = 0; s < first.size(); ++s) {
      std::int64_t const p = first.position[s];
      REQUIRE(naive.alive.count(p) == 1);
      double const want = naive.alive.at(p);
      REQUIRE_MESSAGE(std::abs(first.score[s] - want) <= 1e-6 + 1e-5 * want,
                      "score of position " << p << ": " << first.score[s] << " vs " << want);
      for (int h = 0; h < spec.num_kv_heads; ++h) {
        std::vector<float> const k = naive.key(p, h);
        for (int i = 0; i < spec.head_dim; ++i) {
          REQUIRE(state.heads[h].k[std::size_t(s) * spec.head_dim + i] == k[i]);
          REQUIRE(state.heads[h].v[std::size_t(s) * spec.head_dim + i] == naive.value(p, h, i));
        }
      }
    }
    // The dropped slots are the lowest (the protected newcomer aside).
    double min_kept = std::numeric_limits<double>::infinity();
    double max_dropped = -std::numeric_limits<double>::infinity();
    for (auto it = naive.alive.begin(); it != naive.alive.end();) {
      if (kept.count(it->first) == 0) {
        max_dropped = std::max(max_dropped, it->second);
        ++evictions;
        it = naive.alive.erase(it);
        continue;
      }
      if (!(decode && config.protect_new && it->first == newest)) {
        min_kept = std::min(min_kept, it->second);
      }
      ++it;
    }
    REQUIRE_MESSAGE(max_dropped <= min_kept + 1e-6 + 1e-5 * min_kept,
                    "dropped a slot scored " << max_dropped << " but kept one scored " << min_kept);
    position += count;
  }
  return evictions;
}

//! A hand-built state for spec (rope none, f32): positions in slot order; key dim 0 of slot s
//! in KV head h is key0[h][s], other key dims and values random; tokens_seen = max + 1.
TovaLayerState crafted_state(std::mt19937_64& rng, LayerSpec const& spec,
                             std::vector<std::int64_t> const& positions,
                             std::vector<std::vector<float>> const& key0) {
  TovaLayerState state = make_tova_state(spec);
  std::size_t const n = positions.size();
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    state.heads[h].k = test::random_normal(rng, n * spec.head_dim);
    state.heads[h].v = test::random_normal(rng, n * spec.head_dim);
    for (std::size_t s = 0; s < n; ++s) state.heads[h].k[s * spec.head_dim] = key0[h][s];
    state.heads[h].position = positions;
    state.heads[h].score.assign(n, 0.5f);
  }
  state.tokens_seen = *std::max_element(positions.begin(), positions.end()) + 1;
  return state;
}

//! One decode step on a crafted state with q = [q0, 0, ..] in every query head (rope none, so a
//! logit is q0 * k[0] * scale). Checks the positions of every KV head, the scores against the
//! naive head average, and that the newcomer's k/v moved into the victim slot in every head.
//! key0 holds, per KV head, the old slots' k[0] then the newcomer's.
void check_crafted_step(std::mt19937_64& rng, TovaConfig const& config, float q0,
                        std::vector<std::int64_t> const& positions,
                        std::vector<std::vector<float>> const& key0,
                        std::vector<std::int64_t> const& expected_positions) {
  int const d = 4;
  LayerSpec const spec = make_spec(4, 2, d, DType::kF32, RopeLayout::kNone);
  std::vector<std::vector<float>> old_key0 = key0;
  for (auto& row : old_key0) row.pop_back();
  TovaLayerState state = crafted_state(rng, spec, positions, old_key0);
  TovaLayerState const before = state;
  std::vector<float> q(4 * d, 0.0f);
  for (int hq = 0; hq < 4; ++hq) q[hq * d] = q0;
  std::vector<float> k = test::random_normal(rng, 2 * d);
  std::vector<float> const v = test::random_normal(rng, 2 * d);
  for (int h = 0; h < 2; ++h) k[h * d] = key0[h].back();
  AttentionOutput out;
  REQUIRE(tova_decode_step(spec, config, state, DecodeInput{q, k, v}, out) == Status::kSuccess);

  // Naive head-averaged scores over the old slots and the newcomer (last), and its victim.
  std::size_t const n = positions.size() + 1;
  std::vector<double> score(n, 0.0);
  for (int hq = 0; hq < 4; ++hq) {
    std::vector<double> const row(key0[hq / 2].begin(), key0[hq / 2].end());
    double const m = q0 * 0.5 * *std::max_element(row.begin(), row.end());
    double z = 0.0;
    for (double x : row) z += std::exp(q0 * 0.5 * x - m);
    for (std::size_t s = 0; s < n; ++s) score[s] += std::exp(q0 * 0.5 * row[s] - m) / z / 4.0;
  }
  std::vector<std::int64_t> all_positions = positions;
  all_positions.push_back(before.tokens_seen);
  std::size_t victim = n;
  for (std::size_t s = 0; s < n; ++s) {
    if (config.protect_new && s == n - 1) continue;
    if (victim == n || score[s] < score[victim] ||
        (score[s] == score[victim] && all_positions[s] > all_positions[victim])) {
      victim = s;
    }
  }
  std::vector<std::int64_t> naive_positions = all_positions;
  if (int(n) > config.budget) {
    naive_positions[victim] = all_positions.back();
    naive_positions.pop_back();
  }
  CHECK(naive_positions == expected_positions);  // the crafted case means what it says

  for (int h = 0; h < 2; ++h) {
    INFO("kv head " << h);
    HeadCache const& head = state.heads[h];
    CHECK(head.position == expected_positions);
    REQUIRE(head.size() == int(expected_positions.size()));
    for (int s = 0; s < head.size(); ++s) {
      std::size_t const source = head.position[s] == before.tokens_seen ? n - 1 : std::size_t(s);
      CHECK(head.score[s] == doctest::Approx(score[source]).epsilon(1e-6));
      for (int i = 0; i < d; ++i) {
        float const want_k = source == n - 1 ? k[h * d + i] : before.heads[h].k[s * d + i];
        float const want_v = source == n - 1 ? v[h * d + i] : before.heads[h].v[s * d + i];
        CHECK(head.k[s * d + i] == want_k);
        CHECK(head.v[s * d + i] == want_v);
      }
    }
  }
}

}  // namespace

TEST_SUITE("host") {
  TEST_CASE("tova: eviction order on hand-built caches") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    // Slots hold positions 3, 0, 2, 1; the newcomer is position 4. Budget 4: one must go.
    std::vector<std::int64_t> const positions{3, 0, 2, 1};
    SUBCASE("the lowest head-averaged score goes, the same slot in every KV head") {
      // KV head 0 alone would drop position 2, KV head 1 alone position 3; the layer average
      // drops position 1.
      std::vector<std::vector<float>> const key0{{1, 2, -1, 0.5f, 1.5f}, {0.5f, 1, 3, 1, 1}};
      check_crafted_step(rng, TovaConfig{4, false}, 2.0f, positions, key0, {3, 0, 2, 4});
      check_crafted_step(rng, TovaConfig{4, true}, 2.0f, positions, key0, {3, 0, 2, 4});
    }
    SUBCASE("ties evict the newest position: the newcomer, unless protected") {
      // q = 0: every slot gets 1/5 in every head.
      std::vector<std::vector<float>> const key0{{1, 2, -1, 0.5f, 1.5f}, {0.5f, 1, 3, 1, 1}};
      check_crafted_step(rng, TovaConfig{4, false}, 0.0f, positions, key0, {3, 0, 2, 1});
      check_crafted_step(rng, TovaConfig{4, true}, 0.0f, positions, key0, {4, 0, 2, 1});
    }
    SUBCASE("protect_new keeps a newcomer that scores lowest; without it the newcomer goes") {
      std::vector<std::vector<float>> const key0{{1, 2, -1, 0.5f, -3}, {0.5f, 1, 3, 1, -3}};
      check_crafted_step(rng, TovaConfig{4, false}, 2.0f, positions, key0, {3, 0, 2, 1});
      check_crafted_step(rng, TovaConfig{4, true}, 2.0f, positions, key0, {3, 0, 2, 4});
    }
    SUBCASE("under budget nothing is evicted") {
      std::vector<std::vector<float>> const key0{{1, 2, -1, 0.5f, -3}, {0.5f, 1, 3, 1, -3}};
      check_crafted_step(rng, TovaConfig{5, false}, 2.0f, positions, key0, {3, 0, 2, 1, 4});
    }
  }

  TEST_CASE("tova: scores, outputs, the shared index set and the budget over long random runs") {
    std::mt19937_64 rng(test::test_seed() + 1);
    INFO("seed " << test::test_seed());
    TovaConfig const configs[] = {{9, false}, {9, true}, {1, false}, {1, true}, {16, false}};
    test::for_each_swept_spec(configs, [&](LayerSpec const& spec, TovaConfig const& config) {
      INFO("Hq " << spec.num_q_heads << " Hkv " << spec.num_kv_heads << " D " << spec.head_dim
                 << " " << std::string(dtype_name(spec.dtype)) << " " << std::string(rope_layout_name(spec.rope.layout))
                 << " budget " << config.budget << " protect_new " << config.protect_new);
      std::vector<int> plan(25, 0);
      plan.push_back(13);
      plan.insert(plan.end(), 35, 0);
      plan.push_back(3);
      plan.insert(plan.end(), 15, 0);
      int const evictions = run_and_check(rng, spec, config, plan);
      CHECK(evictions > 0);
    });
  }

  TEST_CASE("tova: chunked prefill then decode") {
    std::mt19937_64 rng(test::test_seed() + 2);
    INFO("seed " << test::test_seed());
    LayerSpec const spec = make_spec(8, 2, 16, DType::kF16);
    std::vector<int> plan{6, 8};
    plan.insert(plan.end(), 25, 0);
    int const evictions = run_and_check(rng, spec, TovaConfig{10, false}, plan);
    CHECK(evictions > 0);
  }

  TEST_CASE("tova: prefill keeps the top budget by the last query's row (independent sort)") {
    std::mt19937_64 rng(test::test_seed() + 3);
    INFO("seed " << test::test_seed());
    int const tokens = 40;
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      LayerSpec const spec = make_spec(8, 2, 16, dtype);
      Inputs const in = random_inputs(rng, spec, tokens);
      PrefillInput const input = chunk_input(spec, in, 0, tokens);
      TovaLayerState all = make_tova_state(spec);
      AttentionOutput all_out;
      REQUIRE(tova_prefill(spec, TovaConfig{tokens, false}, all, input, all_out) ==
              Status::kSuccess);
      NaiveTova naive(spec, in);
      naive.step(0, tokens);
      test::require_close(all_out.out, naive.out, {1e-5, 1e-5}, "prefill output");
      std::vector<float> const& score = all.heads[0].score;
      REQUIRE(all.heads[0].size() == tokens);
      double sum = 0.0;
      for (int s = 0; s < tokens; ++s) {
        REQUIRE(all.heads[0].position[s] == s);
        REQUIRE(std::abs(score[s] - naive.alive.at(s)) <= 1e-6 + 1e-5 * naive.alive.at(s));
        sum += score[s];
      }
      CHECK(sum == doctest::Approx(1.0).epsilon(1e-5));  // a head-averaged probability row

      for (int budget : {1, 7, 39, 40}) {
        for (bool protect : {false, true}) {
          INFO(dtype_name(dtype) << " budget " << budget << " protect_new " << protect);
          std::vector<std::int64_t> order(tokens);
          for (int s = 0; s < tokens; ++s) order[s] = s;
          std::stable_sort(order.begin(), order.end(),
                           [&](std::int64_t a, std::int64_t b) { return score[a] > score[b]; });
          std::vector<std::int64_t> expected(order.begin(), order.begin() + budget);
          std::sort(expected.begin(), expected.end());

          TovaLayerState cut = make_tova_state(spec);
          AttentionOutput cut_out;
          REQUIRE(tova_prefill(spec, TovaConfig{budget, protect}, cut, input, cut_out) ==
                  Status::kSuccess);
          CHECK(cut_out.out == all_out.out);
          CHECK(cut.tokens_seen == tokens);
          for (int h = 0; h < 2; ++h) {
            CHECK(cut.heads[h].position == expected);
            REQUIRE(cut.heads[h].size() == budget);
            for (int s = 0; s < budget; ++s) {
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
  }

  TEST_CASE("tova: bad input returns a status and leaves the state unchanged") {
    std::mt19937_64 rng(test::test_seed() + 4);
    INFO("seed " << test::test_seed());
    LayerSpec const spec = make_spec(4, 2, 8, DType::kBF16);
    Inputs const in = random_inputs(rng, spec, 12);
    TovaConfig const config{5, false};
    TovaLayerState state = make_tova_state(spec);
    AttentionOutput out;
    REQUIRE(tova_prefill(spec, config, state, chunk_input(spec, in, 0, 8), out) ==
            Status::kSuccess);
    REQUIRE(tova_decode_step(spec, config, state, token_input(spec, in, 8), out) ==
            Status::kSuccess);
    TovaLayerState const before = state;
    AttentionOutput const out_before = out;
    auto unchanged = [&] { test::check_state_unchanged(state, before, out, out_before); };
    DecodeInput const token = token_input(spec, in, 9);
    PrefillInput const chunk = chunk_input(spec, in, 9, 3);

    for (int budget : {0, -1, -100}) {
      INFO("budget " << budget);
      CHECK(tova_decode_step(spec, TovaConfig{budget, false}, state, token, out) ==
            Status::kErrorInvalidBudget);
      unchanged();
      CHECK(tova_prefill(spec, TovaConfig{budget, true}, state, chunk, out) ==
            Status::kErrorInvalidBudget);
      unchanged();
    }
    DecodeInput short_k = token;
    short_k.k.size -= 1;
    CHECK(tova_decode_step(spec, config, state, short_k, out) == Status::kErrorSizeMismatch);
    unchanged();
    DecodeInput long_q = token;
    long_q.q.size += 8;
    CHECK(tova_decode_step(spec, config, state, long_q, out) == Status::kErrorSizeMismatch);
    unchanged();
    PrefillInput wrong_count = chunk;
    wrong_count.num_tokens = 4;
    CHECK(tova_prefill(spec, config, state, wrong_count, out) == Status::kErrorSizeMismatch);
    unchanged();
    PrefillInput negative = chunk;
    negative.num_tokens = -3;
    CHECK(tova_prefill(spec, config, state, negative, out) == Status::kErrorInvalidArgument);
    unchanged();
    LayerSpec invalid = spec;
    invalid.head_dim = 9;
    CHECK(tova_decode_step(invalid, config, state, token, out) == Status::kErrorInvalidShape);
    unchanged();
    LayerSpec other = make_spec(4, 1, 8, DType::kBF16);  // one KV head: the state has two
    std::vector<float> const q1(4 * 8, 0.5f), k1(8, 0.25f);
    CHECK(tova_decode_step(other, config, state, DecodeInput{q1, k1, k1}, out) ==
          Status::kErrorSizeMismatch);
    unchanged();
    // A budget below what the state holds (decode only; prefill cuts to the budget).
    CHECK(tova_decode_step(spec, TovaConfig{4, false}, state, token, out) ==
          Status::kErrorInvalidBudget);
    unchanged();

    // States whose KV heads disagree, or whose sizes disagree, are rejected untouched.
    TovaLayerState broken = before;
    std::swap(broken.heads[1].position[0], broken.heads[1].position[1]);
    TovaLayerState const broken_before = broken;
    CHECK(tova_decode_step(spec, config, broken, token, out) == Status::kErrorInvalidArgument);
    CHECK(tova_prefill(spec, config, broken, chunk, out) == Status::kErrorInvalidArgument);
    CHECK(broken.heads[1].position == broken_before.heads[1].position);
    CHECK(broken.heads[0].k == broken_before.heads[0].k);
    broken = before;
    broken.heads[0].score.push_back(0.5f);
    CHECK(tova_decode_step(spec, config, broken, token, out) == Status::kErrorSizeMismatch);
    CHECK(broken.heads[0].score.size() == before.heads[0].score.size() + 1);
    unchanged();

    CHECK(tova_decode_step(spec, config, state, token, out) == Status::kSuccess);
    CHECK(state.tokens_seen == before.tokens_seen + 1);
    CHECK(int(state.heads[0].size()) == config.budget);
  }
}
