//! @file
//! The end-to-end benchmark's policies and its memory planner: builds each policy's per-head
//! ratios or budget for a target compression, and finds the largest batch whose memory (weights,
//! activations, the paged store sized for the whole context, scratch) fits a GPU budget — the
//! paper's setting, where compression pays off as batch. Host-only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "model_spec.hpp"

namespace kvc::e2e {

//! DMC with heterogeneous per-head ratios around `ratio`: a quarter of the (layer, KV head)
//! pairs get ratio / 2, a quarter get ratio, half get 2 * ratio (shuffled with `seed`), so the
//! layer's overall compression (tokens / slots, for long contexts) is exactly `ratio`:
//! 1/4 * 2/r + 1/4 * 1/r + 1/2 * 1/(2r) = 1/r. `ratio` must be an even integer >= 2.
inline PolicyRun dmc_run(ModelSpec const& spec, int ratio, std::uint64_t seed) {
  PolicyRun run;
  run.kind = CacheKind::kDmc;
  run.label = "dmc" + std::to_string(ratio) + "x";
  run.target_ratio = ratio;
  int const heads = spec.layers * spec.kv_heads;
  run.head_ratios.reserve(static_cast<std::size_t>(heads));
  for (int i = 0; i < heads; ++i) {
    int const quarter = (4 * i) / heads;  // 0, 1, 2, 3 in equal parts
    run.head_ratios.push_back(quarter == 0 ? ratio / 2 : quarter == 1 ? ratio : 2 * ratio);
  }
  std::mt19937_64 rng(seed);
  std::shuffle(run.head_ratios.begin(), run.head_ratios.end(), rng);
  return run;
}

//! H2O or TOVA keeping the same number of slots per KV head as a `ratio`x compression of a
//! `max_tokens` context: budget = ceil(max_tokens / ratio) (H2O: half heavy, half recent).
inline PolicyRun eviction_run(CacheKind kind, int ratio, std::int64_t max_tokens) {
  PolicyRun run;
  run.kind = kind;
  run.target_ratio = ratio;
  run.budget = static_cast<int>((max_tokens + ratio - 1) / ratio);
  run.label = std::string(kind == CacheKind::kH2O ? "h2o" : "tova") + std::to_string(ratio) + "x";
  return run;
}

inline PolicyRun full_run() {
  PolicyRun run;
  run.label = "full";
  return run;
}

//! Parses "full", "dmc:R", "h2o:R", "tova:R" (R the compression; default 4). False on error.
inline bool parse_policy(std::string const& text, ModelSpec const& spec, std::int64_t max_tokens,
                         std::uint64_t seed, PolicyRun& out) {
  std::string const name = text.substr(0, text.find(':'));
  int ratio = 4;
  if (text.find(':') != std::string::npos) {
    try {
      std::size_t used = 0;
      ratio = std::stoi(text.substr(text.find(':') + 1), &used);
      if (used != text.size() - text.find(':') - 1) return false;
    } catch (...) {
      return false;
    }
  }
  if (name == "full") {
    out = full_run();
    return text == "full";
  }
  if (ratio < 2 || ratio > 64) return false;
  if (name == "dmc") {
    if (ratio % 2 != 0) return false;
    out = dmc_run(spec, ratio, seed);
    return true;
  }
  if (name == "h2o" || name == "tova") {
    out = eviction_run(name == "h2o" ? CacheKind::kH2O : CacheKind::kTova, ratio, max_tokens);
    return true;
  }
  return false;
}

//! The largest batch in [1, max_batch] with bytes_for_batch(batch) <= budget, assuming
//! bytes_for_batch grows with the batch; 0 when even one sequence does not fit.
inline int largest_batch(std::function<std::int64_t(int)> const& bytes_for_batch,
                         std::int64_t budget, int max_batch) {
  if (max_batch < 1 || bytes_for_batch(1) > budget) return 0;
  int good = 1;
  int bad = max_batch + 1;
  while (bad - good > 1) {
    int const mid = good + (bad - good) / 2;
    if (bytes_for_batch(mid) <= budget)
      good = mid;
    else
      bad = mid;
  }
  return good;
}

}  // namespace kvc::e2e
