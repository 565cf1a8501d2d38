//! @file
//! Differential fuzzing of the CPU reference (`kvc::reference::LayerCache`) against the naive
//! model (naive_model.hpp). One case = one seed: a random layer (G in 1/2/4/8, KV heads, head
//! dim 8..256, dtype, RoPE layout and theta, softmax scale), a random policy with random
//! parameters (Full; DMC in checkpoint and paper mode with a random window, offset, decision
//! neuron and merge rate; H2O heavy/recent; TOVA budget/protect_new) and a random sequence of
//! operations (prefill chunks of random lengths, decode steps, and rejected calls with a
//! wrong-sized input). After every operation the checker compares tokens seen, every KV head's
//! slots (positions in slot order, keys, values, scores), DMC's open-group state (group length,
//! running sums, ring) and the attention output and LSE with the model.
//!
//! No doctest here: `run_case` returns an empty string on success, else a description of the
//! first mismatch that starts with the case's seed. tests/host/test_differential.cpp (a few
//! hundred cases in every host test run) and tests/fuzz/differential_main.cpp (the
//! `kvc_fuzz_differential` tool: thousands of cases in a time budget, replay by seed) use it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

#include "kvc/reference/layer_cache.hpp"

#include "naive_model.hpp"

namespace kvc::test::naive {

//! The seed of case `index` of a run seeded with `run_seed` (splitmix64).
inline std::uint64_t case_seed(std::uint64_t run_seed, std::uint64_t index) {
  std::uint64_t z = run_seed + 0x9e3779b97f4a7c15ull * (index + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

//! Statistics of a run (or of one case).
struct FuzzStats {
  std::int64_t cases = 0, operations = 0, tokens = 0, rejected_calls = 0;
  std::int64_t per_policy[4] = {0, 0, 0, 0};
  std::int64_t evictions = 0, merges = 0, ambiguous_choices = 0;
};

namespace detail {

class CaseRunner {
 public:
  explicit CaseRunner(std::uint64_t seed) : seed_(seed), rng_(seed) {}

  std::string run(FuzzStats& stats) {
    make_case();
    reference::LayerCache cache;
    if (reference::LayerCache::create(spec_, policy_, cache) != Status::kSuccess) {
      return fail("LayerCache::create rejected a valid layer/policy");
    }
    Model model(spec_, policy_);
    stats.per_policy[static_cast<int>(policy_.kind)] += 1;
    int const operations = uniform(1, 12);
    for (int op = 0; op < operations && model.tokens_seen() < max_tokens_; ++op) {
      operation_ = op;
      int const left = static_cast<int>(max_tokens_ - model.tokens_seen());
      int const kind = uniform(0, 9);
      std::string error;
      if (kind < 1) {
        error = rejected_call(cache, stats);
      } else if (kind < 5) {
        error =
            prefill(cache, model, uniform(1, std::min(left, uniform(1, 3) == 1 ? 64 : 12)), stats);
      } else {
        int const steps = std::min(left, uniform(1, 24));
        for (int s = 0; s < steps && error.empty(); ++s) error = decode(cache, model, stats);
      }
      if (!error.empty()) return error;
      stats.operations += 1;
    }
    stats.cases += 1;
    stats.tokens += model.tokens_seen();
    return "";
  }

  std::string describe() const {
    std::ostringstream text;
    text << "case seed " << seed_ << ": " << policy_name(policy_.kind)
         << " Hq=" << spec_.num_q_heads << " Hkv=" << spec_.num_kv_heads << " D=" << spec_.head_dim
         << " " << dtype_name(spec_.dtype) << " rope=" << rope_layout_name(spec_.rope.layout)
         << " theta=" << spec_.rope.theta << " scale=" << spec_.scale << " ties=" << tie_rate_;
    if (policy_.kind == PolicyKind::kDmc) {
      DmcConfig const& d = policy_.dmc;
      text << " dmc{" << (d.mode == DmcMode::kPaper ? "paper" : "checkpoint")
           << " d=" << d.decision_dim << " offset=" << d.offset << " eps=" << d.eps
           << " window=" << d.window << " merge_rate=" << merge_rate_ << "}";
    } else if (policy_.kind == PolicyKind::kH2O) {
      text << " h2o{heavy=" << policy_.h2o.heavy << " recent=" << policy_.h2o.recent << "}";
    } else if (policy_.kind == PolicyKind::kTova) {
      text << " tova{budget=" << policy_.tova.budget << " protect_new=" << policy_.tova.protect_new
           << "}";
    }
    return text.str();
  }

 private:
  int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  double real(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng_); }
  bool chance(double p) { return real(0.0, 1.0) < p; }

  std::string fail(std::string const& what) const {
    std::ostringstream text;
    text << describe() << ", operation " << operation_ << ": " << what;
    return text.str();
  }

  void make_case() {
    int const groups[] = {1, 2, 4, 8};
    int const group = groups[uniform(0, 3)];
    int const kv_heads = uniform(1, chance(0.7) ? 2 : 4);
    int head_dim = 2 * uniform(4, 16);                  // 8..32
    if (chance(0.25)) head_dim = 2 * uniform(17, 128);  // up to 256
    if (chance(0.1)) head_dim = std::vector<int>{64, 128, 256}[uniform(0, 2)];
    spec_.num_q_heads = group * kv_heads;
    spec_.num_kv_heads = kv_heads;
    spec_.head_dim = head_dim;
    spec_.dtype = static_cast<DType>(uniform(0, 2));
    spec_.rope.layout = static_cast<RopeLayout>(uniform(0, 2));
    spec_.rope.theta = std::vector<double>{10000.0, 500000.0, 100.0}[uniform(0, 2)];
    spec_.scale = chance(0.8) ? 0.0f : static_cast<float>(real(0.02, 0.5));
    // Work per case ~ tokens^2 * Hq * D: keep each case to a few milliseconds.
    double const width = static_cast<double>(spec_.num_q_heads) * head_dim;
    max_tokens_ = std::max<std::int64_t>(
        4, std::min<std::int64_t>(160, static_cast<std::int64_t>(std::sqrt(3.0e6 / width))));
    input_scale_ = real(0.3, 2.5);
    tie_rate_ = chance(0.3) ? real(0.05, 0.5) : 0.0;

    policy_ = PolicyConfig{};
    policy_.kind = static_cast<PolicyKind>(uniform(0, 3));
    switch (policy_.kind) {
      case PolicyKind::kFull: break;
      case PolicyKind::kDmc: {
        policy_.dmc = chance(0.5) ? DmcConfig::checkpoint() : DmcConfig::paper();
        if (chance(0.5)) policy_.dmc.window = chance(0.3) ? 0 : uniform(1, kDmcMaxWindow);
        if (chance(0.3)) policy_.dmc.offset = static_cast<float>(real(-3.0, 6.0));
        if (chance(0.3)) policy_.dmc.eps = static_cast<float>(real(0.0, 0.05));
        if (chance(0.3)) {
          policy_.dmc.decision_dim = chance(0.5) ? uniform(0, head_dim - 1) : -uniform(1, head_dim);
        }
        double const rates[] = {0.0, 0.3, 0.7, 0.95, 1.0};
        merge_rate_ = rates[uniform(0, 4)];
        break;
      }
      case PolicyKind::kH2O:
        policy_.h2o.heavy = uniform(0, 20);
        policy_.h2o.recent = uniform(policy_.h2o.heavy == 0 ? 1 : 0, 20);
        break;
      case PolicyKind::kTova:
        policy_.tova.budget = uniform(1, 40);
        policy_.tova.protect_new = chance(0.5);
        break;
    }
  }

  //! Fresh pre-RoPE inputs of `count` tokens (DMC: decision neurons around the offset).
  void make_inputs(int count, std::vector<float>& q, std::vector<float>& k, std::vector<float>& v) {
    int const d = spec_.head_dim;
    std::normal_distribution<float> normal(0.0f, 1.0f);
    q.resize(static_cast<std::size_t>(count) * spec_.num_q_heads * d);
    k.resize(static_cast<std::size_t>(count) * spec_.num_kv_heads * d);
    v.resize(k.size());
    for (float& x : q) x = static_cast<float>(input_scale_) * normal(rng_);
    for (float& x : k) x = static_cast<float>(input_scale_) * normal(rng_);
    for (float& x : v) x = normal(rng_);
    std::size_t const qs = static_cast<std::size_t>(spec_.num_q_heads) * d;
    std::size_t const ks = static_cast<std::size_t>(spec_.num_kv_heads) * d;
    for (int t = 0; t < count; ++t) {
      // Exact ties: a zero query sees every slot with the same probability; a repeated key
      // (without RoPE) gets the same logit as its twin.
      if (chance(tie_rate_)) std::fill_n(q.begin() + t * qs, qs, 0.0f);
      if (t > 0 && chance(tie_rate_)) {
        std::copy_n(k.begin() + (t - 1) * ks, ks, k.begin() + t * ks);
      }
    }
    if (policy_.kind != PolicyKind::kDmc) return;
    int const decision = policy_.dmc.decision_index(d);
    for (int t = 0; t < count; ++t) {
      for (int h = 0; h < spec_.num_kv_heads; ++h) {
        float const away = static_cast<float>(real(0.05, 3.0));
        k[(static_cast<std::size_t>(t) * spec_.num_kv_heads + h) * d + decision] =
            policy_.dmc.offset + (chance(merge_rate_) ? away : -away);
      }
      for (int h = 0; h < spec_.num_q_heads; ++h) {
        q[(static_cast<std::size_t>(t) * spec_.num_q_heads + h) * d + decision] =
            static_cast<float>(real(-12.0, 12.0));
      }
    }
  }

  std::string rejected_call(reference::LayerCache& cache, FuzzStats& stats) {
    std::vector<float> q, k, v;
    make_inputs(1, q, k, v);
    k.pop_back();  // one element short
    reference::AttentionOutput out;
    out.out = {1.0f, 2.0f};
    out.lse = {3.0f};
    Status const status = cache.decode_step(reference::DecodeInput{q, k, v}, out);
    stats.rejected_calls += 1;
    if (status != Status::kErrorSizeMismatch) {
      return fail(std::string("a short k returned ") + to_string(status));
    }
    if (out.out != std::vector<float>{1.0f, 2.0f} || out.lse != std::vector<float>{3.0f}) {
      return fail("a rejected call changed its output");
    }
    return "";  // the state itself is compared after the next operation
  }

  std::string decode(reference::LayerCache& cache, Model& model, FuzzStats& stats) {
    std::vector<float> q, k, v;
    make_inputs(1, q, k, v);
    reference::AttentionOutput out;
    reference::DmcStepDecisions decisions;
    Status const status = cache.decode_step(reference::DecodeInput{q, k, v}, out, &decisions);
    if (status != Status::kSuccess) return fail(std::string("decode_step: ") + to_string(status));
    std::vector<QueryResult> expected;
    std::string error = advance(model, 1, false, q, k, v, cache, expected, stats);
    if (!error.empty()) return error;
    if (policy_.kind == PolicyKind::kDmc) {
      for (int h = 0; h < spec_.num_kv_heads; ++h) {
        std::int64_t const t = model.tokens_seen() - 1;
        if ((decisions.merged[h] != 0) != model.merges(t, h)) {
          return fail("decode decision of KV head " + std::to_string(h) + " differs");
        }
        if (std::fabs(decisions.omega[h] - model.omega(t, h)) > 1e-6 * (1.0 + model.omega(t, h))) {
          return fail("decode omega of KV head " + std::to_string(h) + " differs");
        }
      }
    }
    return compare_output(out, expected, "decode");
  }

  std::string prefill(reference::LayerCache& cache, Model& model, int count, FuzzStats& stats) {
    std::vector<float> q, k, v;
    make_inputs(count, q, k, v);
    reference::AttentionOutput out;
    Status const status = cache.prefill(reference::PrefillInput{count, q, k, v}, out);
    if (status != Status::kSuccess) return fail(std::string("prefill: ") + to_string(status));
    std::vector<QueryResult> expected;
    std::string error = advance(model, count, true, q, k, v, cache, expected, stats);
    if (!error.empty()) return error;
    return compare_output(out, expected, "prefill of " + std::to_string(count));
  }

  //! Feeds a chunk to the model (computing its attention results), settles evictions against
  //! the cache's choices, then compares the whole state.
  std::string advance(Model& model, int count, bool is_prefill, std::vector<float> const& q,
                      std::vector<float> const& k, std::vector<float> const& v,
                      reference::LayerCache const& cache, std::vector<QueryResult>& expected,
                      FuzzStats& stats) {
    std::int64_t const first =
        model.push_tokens(model.round_tokens(count, q.data(), k.data(), v.data()));
    std::int64_t const newest = model.tokens_seen() - 1;
    int const hkv = spec_.num_kv_heads;
    std::string error;
    switch (policy_.kind) {
      case PolicyKind::kFull:
      case PolicyKind::kH2O:
      case PolicyKind::kTova: {
        std::vector<std::size_t> cached(hkv);
        for (int h = 0; h < hkv; ++h) {
          cached[h] = model.slots(h).size();
          for (std::int64_t t = first; t <= newest; ++t) {
            model.mutable_slots(h).push_back(model.token_slot(t, h));
          }
        }
        for (std::int64_t t = first; t <= newest; ++t) {
          std::vector<std::vector<Slot const*>> visible(hkv);
          for (int h = 0; h < hkv; ++h) {
            std::size_t const seen = cached[h] + static_cast<std::size_t>(t - first) + 1;
            for (std::size_t s = 0; s < seen; ++s) visible[h].push_back(&model.slots(h)[s]);
          }
          expected.push_back(model.attend(t, visible));
        }
        if (policy_.kind == PolicyKind::kH2O)
          error = settle_h2o(model, count, is_prefill, expected, cache, stats);
        if (policy_.kind == PolicyKind::kTova) {
          error = settle_tova(model, is_prefill, expected, cache, stats);
        }
        break;
      }
      case PolicyKind::kDmc:
        for (std::int64_t t = first; t <= newest; ++t) {
          expected.push_back(model.attend(t, model.dmc_visible(t)));
          for (int h = 0; h < hkv; ++h) stats.merges += model.merges(t, h) ? 1 : 0;
        }
        model.rebuild_dmc_slots();
        break;
    }
    if (!error.empty()) return error;
    return compare_state(model, cache);
  }

  //! Score slack of H2O/TOVA: fp32 accumulation of probabilities.
  static double score_slack(double score, int accumulations) {
    return 1e-6 + 4.0 * kF32Unit * (accumulations + 4) * std::fabs(score);
  }

  //! Positions of a reference head, as a set (sorted).
  static std::vector<std::int64_t> sorted_positions(reference::HeadCache const& head) {
    std::vector<std::int64_t> positions = head.position;
    std::sort(positions.begin(), positions.end());
    return positions;
  }

  //! Checks that the reference evicted a lowest-score candidate (within slack; exact ties go to
  //! the newest position) and applies that choice: the newcomer (last slot) moves onto the
  //! victim's slot. `candidates` are slot indices. Returns the error, if any.
  std::string apply_victim(std::vector<Slot>& slots, std::vector<int> const& candidates,
                           std::vector<std::int64_t> const& kept, std::string const& where,
                           FuzzStats& stats) {
    int victim = -1;
    for (std::size_t s = 0; s < slots.size(); ++s) {
      if (!std::binary_search(kept.begin(), kept.end(), slots[s].position)) {
        if (victim >= 0) return fail(where + ": more than one slot went missing");
        victim = static_cast<int>(s);
      }
    }
    if (victim < 0) return fail(where + ": nothing was evicted although over budget");
    if (std::find(candidates.begin(), candidates.end(), victim) == candidates.end()) {
      return fail(where + ": evicted a protected slot (position " +
                  std::to_string(slots[victim].position) + ")");
    }
    int best = -1;
    for (int s : candidates) {
      if (best < 0 || slots[s].score < slots[best].score ||
          (slots[s].score == slots[best].score && slots[s].position > slots[best].position)) {
        best = s;
      }
    }
    if (victim != best && slots[victim].score == slots[best].score) {
      return fail(where + ": equal scores must evict the newest position: evicted " +
                  std::to_string(slots[victim].position) + ", expected " +
                  std::to_string(slots[best].position));
    }
    if (victim != best) {
      double const gap = slots[victim].score - slots[best].score;
      if (gap > slots[victim].score_slack + slots[best].score_slack) {
        return fail(where + ": evicted position " + std::to_string(slots[victim].position) +
                    " (score " + std::to_string(slots[victim].score) + "), expected position " +
                    std::to_string(slots[best].position) + " (score " +
                    std::to_string(slots[best].score) + ")");
      }
      stats.ambiguous_choices += 1;
    }
    stats.evictions += 1;
    int const last = static_cast<int>(slots.size()) - 1;
    if (victim != last) slots[victim] = slots[last];
    slots.pop_back();
    return "";
  }

  //! Checks a prefill cut: `kept` (positions the reference kept) holds every protected slot and
  //! `keep` of the candidates, and no dropped candidate outscores a kept one beyond slack; then
  //! keeps those slots in ascending position order.
  std::string apply_cut(std::vector<Slot>& slots, std::vector<char> const& protect, int keep,
                        std::vector<std::int64_t> const& kept, std::string const& where,
                        FuzzStats& stats) {
    int kept_candidates = 0;
    double lowest_kept = std::numeric_limits<double>::infinity(), lowest_slack = 0.0;
    double highest_dropped = -std::numeric_limits<double>::infinity(), highest_slack = 0.0;
    std::vector<Slot> result;
    for (std::size_t s = 0; s < slots.size(); ++s) {
      bool const is_kept = std::binary_search(kept.begin(), kept.end(), slots[s].position);
      if (protect[s] && !is_kept) return fail(where + ": dropped a protected slot");
      if (is_kept) result.push_back(slots[s]);
      if (protect[s]) continue;
      if (is_kept) {
        kept_candidates += 1;
        if (slots[s].score < lowest_kept) {
          lowest_kept = slots[s].score;
          lowest_slack = slots[s].score_slack;
        }
      } else if (slots[s].score > highest_dropped) {
        highest_dropped = slots[s].score;
        highest_slack = slots[s].score_slack;
      }
    }
    if (kept_candidates != keep || result.size() != kept.size()) {
      return fail(where + ": kept " + std::to_string(kept.size()) + " slots, expected " +
                  std::to_string(keep) + " by score plus the protected ones");
    }
    if (highest_dropped > lowest_kept + lowest_slack + highest_slack) {
      return fail(where + ": dropped a slot scoring " + std::to_string(highest_dropped) +
                  " but kept one scoring " + std::to_string(lowest_kept));
    }
    for (std::size_t a = 0; a < slots.size(); ++a) {  // exact ties: the newest goes first
      if (protect[a] || !std::binary_search(kept.begin(), kept.end(), slots[a].position)) continue;
      for (std::size_t b = 0; b < slots.size(); ++b) {
        if (protect[b] || std::binary_search(kept.begin(), kept.end(), slots[b].position)) continue;
        if (slots[a].score == slots[b].score && slots[a].position > slots[b].position) {
          return fail(where + ": equal scores must drop the newest position first: kept " +
                      std::to_string(slots[a].position) + ", dropped " +
                      std::to_string(slots[b].position));
        }
      }
    }
    if (highest_dropped >= lowest_kept) stats.ambiguous_choices += 1;
    std::sort(result.begin(), result.end(),
              [](Slot const& a, Slot const& b) { return a.position < b.position; });
    stats.evictions += static_cast<std::int64_t>(slots.size() - result.size());
    slots = std::move(result);
    return "";
  }

  std::string settle_h2o(Model& model, int count, bool is_prefill,
                         std::vector<QueryResult> const& results,
                         reference::LayerCache const& cache, FuzzStats& stats) {
    H2OConfig const& config = policy_.h2o;
    int const group = spec_.num_q_heads / spec_.num_kv_heads;
    std::int64_t const newest = model.tokens_seen() - 1;
    for (int h = 0; h < spec_.num_kv_heads; ++h) {
      std::vector<Slot>& slots = model.mutable_slots(h);
      int const cached = static_cast<int>(slots.size()) - count;
      for (int i = 0; i < count; ++i) {
        for (std::size_t s = 0; s < slots.size(); ++s) {
          if (static_cast<int>(s) >= cached + i + 1) break;  // not visible to query i
          double p = 0.0;
          for (int g = 0; g < group; ++g) p += results[i].probability[h * group + g][s];
          slots[s].score += p;
          slots[s].score_slack = score_slack(
              slots[s].score, static_cast<int>(newest - slots[s].position) * group + group);
        }
      }
      std::vector<std::int64_t> const kept = sorted_positions(cache.heads()[h]);
      if (static_cast<int>(slots.size()) <= config.budget()) continue;
      std::string const where = "h2o KV head " + std::to_string(h);
      if (!is_prefill) {
        std::vector<int> candidates;
        for (std::size_t s = 0; s < slots.size(); ++s) {
          if (!(slots[s].position > newest - config.recent))
            candidates.push_back(static_cast<int>(s));
        }
        std::string error = apply_victim(slots, candidates, kept, where, stats);
        if (!error.empty()) return error;
      } else {
        std::vector<char> protect(slots.size());
        int rest = 0;
        for (std::size_t s = 0; s < slots.size(); ++s) {
          protect[s] = slots[s].position > newest - config.recent;
          rest += protect[s] ? 0 : 1;
        }
        std::string error =
            apply_cut(slots, protect, std::min(config.heavy, rest), kept, where, stats);
        if (!error.empty()) return error;
      }
    }
    return "";
  }

  std::string settle_tova(Model& model, bool is_prefill, std::vector<QueryResult> const& results,
                          reference::LayerCache const& cache, FuzzStats& stats) {
    TovaConfig const& config = policy_.tova;
    int const hq = spec_.num_q_heads;
    QueryResult const& last = results.back();
    std::vector<Slot>& head0 = model.mutable_slots(0);
    for (std::size_t s = 0; s < head0.size(); ++s) {
      double sum = 0.0;
      for (int h = 0; h < hq; ++h) sum += last.probability[h][s];
      for (int kv = 0; kv < spec_.num_kv_heads; ++kv) {
        model.mutable_slots(kv)[s].score = sum / hq;
        model.mutable_slots(kv)[s].score_slack = score_slack(sum / hq, hq + 2);
      }
    }
    if (static_cast<int>(head0.size()) <= config.budget) return "";
    std::vector<std::int64_t> const kept = sorted_positions(cache.heads()[0]);
    for (int kv = 0; kv < spec_.num_kv_heads; ++kv) {
      std::vector<Slot>& slots = model.mutable_slots(kv);
      std::string const where = "tova (KV head " + std::to_string(kv) + ")";
      std::string error;
      if (!is_prefill) {
        std::vector<int> candidates;
        int const newcomer = static_cast<int>(slots.size()) - 1;
        for (int s = 0; s <= newcomer; ++s) {
          if (!(config.protect_new && s == newcomer)) candidates.push_back(s);
        }
        FuzzStats scratch;
        error = apply_victim(slots, candidates, kept, where, kv == 0 ? stats : scratch);
      } else {
        std::vector<char> protect(slots.size(), 0);
        FuzzStats scratch;
        error = apply_cut(slots, protect, config.budget, kept, where, kv == 0 ? stats : scratch);
      }
      if (!error.empty()) return error;
    }
    return "";
  }

  static bool close(double actual, double expected, double slack, Tolerance tolerance) {
    return std::fabs(actual - expected) <=
           slack + tolerance.atol + tolerance.rtol * std::fabs(expected);
  }

  std::string compare_state(Model const& model, reference::LayerCache const& cache) {
    if (cache.tokens_seen() != model.tokens_seen()) {
      return fail("tokens_seen " + std::to_string(cache.tokens_seen()) + ", expected " +
                  std::to_string(model.tokens_seen()));
    }
    bool const exact = policy_.kind != PolicyKind::kDmc;
    Tolerance const tolerance{1e-6, 1e-6};
    for (int h = 0; h < spec_.num_kv_heads; ++h) {
      reference::HeadCache const& head = cache.heads()[h];
      std::vector<Slot> const& slots = model.slots(h);
      std::string const name = "KV head " + std::to_string(h);
      if (head.size() != static_cast<int>(slots.size())) {
        return fail(name + ": " + std::to_string(head.size()) + " slots, expected " +
                    std::to_string(slots.size()));
      }
      for (std::size_t s = 0; s < slots.size(); ++s) {
        std::string const where = name + " slot " + std::to_string(s);
        if (head.position[s] != slots[s].position) {
          return fail(where + ": position " + std::to_string(head.position[s]) + ", expected " +
                      std::to_string(slots[s].position));
        }
        for (int i = 0; i < spec_.head_dim; ++i) {
          std::size_t const at = s * spec_.head_dim + i;
          bool const k_ok = exact
                                ? head.k[at] == slots[s].k[i]
                                : close(head.k[at], slots[s].k[i], slots[s].k_slack[i], tolerance);
          bool const v_ok = exact
                                ? head.v[at] == slots[s].v[i]
                                : close(head.v[at], slots[s].v[i], slots[s].v_slack[i], tolerance);
          if (!k_ok || !v_ok) {
            std::ostringstream text;
            text << where << " (position " << slots[s].position << ") dim " << i << ": k "
                 << head.k[at] << " vs " << slots[s].k[i] << " (slack " << slots[s].k_slack[i]
                 << "), v " << head.v[at] << " vs " << slots[s].v[i] << " (slack "
                 << slots[s].v_slack[i] << ")";
            return fail(text.str());
          }
        }
        if (policy_.kind == PolicyKind::kH2O || policy_.kind == PolicyKind::kTova) {
          if (!close(head.score[s], slots[s].score, slots[s].score_slack, Tolerance{0.0, 0.0})) {
            std::ostringstream text;
            text << where << ": score " << head.score[s] << ", expected " << slots[s].score;
            return fail(text.str());
          }
        }
      }
    }
    if (policy_.kind == PolicyKind::kDmc) return compare_dmc_state(model, cache);
    return "";
  }

  std::string compare_dmc_state(Model const& model, reference::LayerCache const& cache) {
    auto const* state = std::get_if<reference::DmcLayerState>(&cache.state());
    if (state == nullptr) return fail("the cache holds no DMC state");
    Tolerance const tolerance{1e-6, 1e-6};
    int const d = spec_.head_dim;
    for (int h = 0; h < spec_.num_kv_heads; ++h) {
      DmcExpectation const e = model.dmc_expectation(h);
      reference::DmcHeadState const& got = state->dmc[h];
      std::string const name = "DMC KV head " + std::to_string(h);
      if (got.group_length != e.group_length) {
        return fail(name + ": group length " + std::to_string(got.group_length) + ", expected " +
                    std::to_string(e.group_length));
      }
      if (!close(got.weight_sum, e.weight_sum, e.weight_slack, tolerance)) {
        std::ostringstream text;
        text << name << ": weight sum " << got.weight_sum << ", expected " << e.weight_sum;
        return fail(text.str());
      }
      for (int i = 0; i < d; ++i) {
        if (!close(got.k_sum[i], e.k_sum[i], e.k_sum_slack[i], tolerance) ||
            !close(got.v_sum[i], e.v_sum[i], e.v_sum_slack[i], tolerance)) {
          std::ostringstream text;
          text << name << ": running sums at dim " << i << ": k " << got.k_sum[i] << " vs "
               << e.k_sum[i] << ", v " << got.v_sum[i] << " vs " << e.v_sum[i];
          return fail(text.str());
        }
      }
      Tolerance const term{1e-6, 4e-7};
      for (std::size_t c = 0; c < e.ring_w.size(); ++c) {
        if (!close(got.ring_w[c], e.ring_w[c], 0.0, term)) {
          return fail(name + ": ring weight of cell " + std::to_string(c) + " differs");
        }
        for (int i = 0; i < d; ++i) {
          std::size_t const at = c * d + i;
          if (!close(got.ring_k[at], e.ring_k[at], 0.0, term) ||
              !close(got.ring_v[at], e.ring_v[at], 0.0, term)) {
            return fail(name + ": ring cell " + std::to_string(c) + " dim " + std::to_string(i) +
                        " differs");
          }
        }
      }
    }
    return "";
  }

  std::string compare_output(reference::AttentionOutput const& out,
                             std::vector<QueryResult> const& expected, std::string const& what) {
    int const hq = spec_.num_q_heads, d = spec_.head_dim;
    std::size_t const count = expected.size();
    if (out.out.size() != count * hq * d || out.lse.size() != count * hq) {
      return fail(what + ": output has the wrong size");
    }
    Tolerance const tolerance{2e-6, 2e-6};
    for (std::size_t t = 0; t < count; ++t) {
      for (int h = 0; h < hq; ++h) {
        std::size_t const row = t * hq + h;
        double const slack = expected[t].slack[h];
        if (!close(out.lse[row], expected[t].lse[h], expected[t].lse_slack[h], tolerance)) {
          std::ostringstream text;
          text << what << ": query " << t << " head " << h << ": lse " << out.lse[row]
               << ", expected " << expected[t].lse[h];
          return fail(text.str());
        }
        for (int i = 0; i < d; ++i) {
          double const e = expected[t].out[static_cast<std::size_t>(h) * d + i];
          if (!close(out.out[row * d + i], e, slack, tolerance)) {
            std::ostringstream text;
            text << what << ": query " << t << " head " << h << " dim " << i << ": out "
                 << out.out[row * d + i] << ", expected " << e << " (slack " << slack << ")";
            return fail(text.str());
          }
        }
      }
    }
    return "";
  }

  std::uint64_t seed_;
  std::mt19937_64 rng_;
  reference::LayerSpec spec_{};
  PolicyConfig policy_{};
  std::int64_t max_tokens_ = 0;
  double input_scale_ = 1.0;
  double merge_rate_ = 0.0;
  double tie_rate_ = 0.0;
  int operation_ = -1;
};

}  // namespace detail

//! Runs the case of `seed`; "" on success, else the case's description (seed first) and the
//! first mismatch. `stats` accumulates.
inline std::string run_case(std::uint64_t seed, FuzzStats& stats) {
  detail::CaseRunner runner(seed);
  return runner.run(stats);
}

}  // namespace kvc::test::naive
