//! @file
//! Random replay traces written with kvc's own .npy writer (no Python needed): used by the
//! kvc-make-trace tool, the round-trip ctest and the host tests. Values are normal(0, 1) rounded
//! to the dtype; for DMC the decision neuron of k is drawn so that about half the tokens merge.
#pragma once

#include <cstdint>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/io/io_status.hpp"
#include "kvc/io/json.hpp"
#include "kvc/io/npy.hpp"
#include "kvc/policy/kind.hpp"

namespace kvc::replay {

//! What a synthetic trace looks like. Defaults give a small GQA trace.
struct SyntheticTrace {
  PolicyKind policy = PolicyKind::kDmc;
  DmcMode mode = DmcMode::kCheckpoint;
  int window = -1;  //!< dmc window; -1 leaves it out of config.json (the mode's default)
  int heavy = 6;
  int recent = 4;
  int budget = 10;
  bool protect_new = false;
  DType dtype = DType::kF32;
  RopeLayout rope = RopeLayout::kRotateHalf;
  double rope_theta = 10000.0;
  int q_heads = 4;
  int kv_heads = 2;
  int head_dim = 16;
  int tokens = 40;
  int prompt_tokens = 12;
  std::uint64_t seed = 1;
};

//! The config.json document of `trace` (with one unknown key, which readers must ignore).
inline io::JsonValue synthetic_config(SyntheticTrace const& trace) {
  using io::JsonValue;
  JsonValue config;
  config.set("policy", JsonValue::string(policy_name(trace.policy)));
  config.set("dtype", JsonValue::string(dtype_name(trace.dtype)));
  config.set("q_heads", JsonValue::number(trace.q_heads));
  config.set("kv_heads", JsonValue::number(trace.kv_heads));
  config.set("head_dim", JsonValue::number(trace.head_dim));
  config.set("rope", JsonValue::string(rope_layout_name(trace.rope)));
  config.set("rope_theta", JsonValue::number(trace.rope_theta));
  config.set("prompt_tokens", JsonValue::number(trace.prompt_tokens));
  switch (trace.policy) {
    case PolicyKind::kFull: break;
    case PolicyKind::kDmc:
      config.set("mode", JsonValue::string(trace.mode == DmcMode::kPaper ? "paper" : "checkpoint"));
      if (trace.window >= 0) config.set("window", JsonValue::number(trace.window));
      break;
    case PolicyKind::kH2O:
      config.set("heavy", JsonValue::number(trace.heavy));
      config.set("recent", JsonValue::number(trace.recent));
      break;
    case PolicyKind::kTova:
      config.set("budget", JsonValue::number(trace.budget));
      config.set("protect_new", JsonValue::boolean(trace.protect_new));
      break;
  }
  config.set("generator", JsonValue::string("kvc synthetic trace"));
  return config;
}

//! Draws q [T, Hq, D], k and v [T, Hkv, D] for `trace`.
inline void synthetic_tensors(SyntheticTrace const& trace, std::vector<float>& q,
                              std::vector<float>& k, std::vector<float>& v) {
  std::mt19937_64 rng(trace.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::size_t const t = static_cast<std::size_t>(trace.tokens);
  std::size_t const d = static_cast<std::size_t>(trace.head_dim);
  q.resize(t * static_cast<std::size_t>(trace.q_heads) * d);
  k.resize(t * static_cast<std::size_t>(trace.kv_heads) * d);
  v.resize(k.size());
  for (float& x : q) x = round_to_dtype(normal(rng), trace.dtype);
  for (float& x : k) x = round_to_dtype(normal(rng), trace.dtype);
  for (float& x : v) x = round_to_dtype(normal(rng), trace.dtype);
  if (trace.policy == PolicyKind::kDmc) {
    // decision neuron: k[d] - offset > 0 for about half the tokens
    bool const paper = trace.mode == DmcMode::kPaper;
    std::size_t const dim = paper ? 0 : d - 1;
    float const offset = paper ? 0.0f : 5.0f;
    for (std::size_t row = 0; row < k.size() / d; ++row) {
      k[row * d + dim] = round_to_dtype(offset + 2.0f * normal(rng), trace.dtype);
    }
  }
}

//! Writes config.json, q.npy, k.npy and v.npy of `trace` into `dir` (which must exist).
inline io::IoStatus write_synthetic_trace(std::string const& dir, SyntheticTrace const& trace) {
  std::vector<float> q, k, v;
  synthetic_tensors(trace, q, k, v);
  std::int64_t const t = trace.tokens, d = trace.head_dim;
  std::string const base = dir + "/";
  KVC_IO_RETURN_IF_ERROR(io::write_npy(base + "q.npy", {t, trace.q_heads, d}, q));
  KVC_IO_RETURN_IF_ERROR(io::write_npy(base + "k.npy", {t, trace.kv_heads, d}, k));
  KVC_IO_RETURN_IF_ERROR(io::write_npy(base + "v.npy", {t, trace.kv_heads, d}, v));
  std::string const text = io::to_json(synthetic_config(trace)) + "\n";
  std::ofstream file(base + "config.json", std::ios::binary | std::ios::trunc);
  file << text;
  file.close();
  if (!file) return io::IoStatus::error(base + "config.json: cannot write");
  return io::IoStatus::success();
}

}  // namespace kvc::replay
