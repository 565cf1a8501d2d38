//! @file
//! Shapes of the models the end-to-end decode benchmark runs (Llama-2 7B and 13B, a 7B-sized
//! GQA variant, and one GPU's shard of Llama-2-70B under 2-way tensor parallelism), their weight
//! bytes, and the per-(layer, KV head) slot counts every cache policy keeps at a context length.
//! Host-only (no CUDA): the memory planner and its tests use it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kvc::e2e {

//! One GPU's view of a Llama-style decoder (bf16 weights, RMSNorm, SwiGLU MLP, RoPE).
struct ModelSpec {
  std::string name;
  int layers = 0;
  int hidden = 0;    //!< model width (the input of every projection on this GPU)
  int q_heads = 0;   //!< query heads on this GPU
  int kv_heads = 0;  //!< KV heads on this GPU
  int head_dim = 0;
  int intermediate = 0;  //!< MLP width on this GPU (SwiGLU: gate and up are this wide)
  int vocab = 0;         //!< LM-head / embedding rows on this GPU
  std::string note;      //!< what the shape leaves out (e.g. the tensor-parallel all-reduce)

  //! Weights of one layer: q, k, v, o projections, gate+up, down, two RMSNorm vectors.
  std::int64_t layer_params() const {
    std::int64_t const h = hidden;
    std::int64_t const q = static_cast<std::int64_t>(q_heads) * head_dim;
    std::int64_t const kv = static_cast<std::int64_t>(kv_heads) * head_dim;
    return h * q + 2 * h * kv + q * h + 3 * h * intermediate + 2 * h;
  }
  //! Every weight held on this GPU: layers, embeddings, final norm, LM head.
  std::int64_t params() const {
    return layers * layer_params() + 2 * static_cast<std::int64_t>(vocab) * hidden + hidden;
  }
  //! Bytes of bf16 weights.
  std::int64_t weight_bytes() const { return 2 * params(); }
  //! Bytes of weights one decode step reads: every layer and the LM head (not the embeddings:
  //! one row per sequence).
  std::int64_t weight_bytes_read_per_step() const {
    return 2 * (layers * layer_params() + static_cast<std::int64_t>(vocab) * hidden + hidden);
  }
};

inline ModelSpec llama2_7b() {
  return {"llama2-7b", 32, 4096, 32, 32, 128, 11008, 32000, ""};
}
//! Llama-2-7B with 8 KV heads (group size 4): the "GQA" policy is this shape.
inline ModelSpec llama2_7b_gqa() {
  ModelSpec spec = llama2_7b();
  spec.name = "llama2-7b-gqa8";
  spec.kv_heads = 8;
  spec.note = "Llama-2-7B with 8 KV heads (GQA, group size 4); not a released checkpoint";
  return spec;
}
inline ModelSpec llama2_13b() {
  return {"llama2-13b", 40, 5120, 40, 40, 128, 13824, 32000, ""};
}
//! One GPU of Llama-2-70B split over two GPUs (Megatron-style: heads, MLP and vocab halved).
inline ModelSpec llama2_70b_tp2_shard() {
  return {"llama2-70b-tp2-shard",
          80,
          8192,
          32,
          4,
          128,
          14336,
          16000,
          "one GPU of a 2-way tensor-parallel Llama-2-70B: the all-reduce after attention and "
          "MLP is not modelled"};
}

//! The spec named `name` ("7b", "7b-gqa", "13b", "70b-tp2"); false when unknown.
inline bool find_model(std::string const& name, ModelSpec& out) {
  if (name == "7b")
    out = llama2_7b();
  else if (name == "7b-gqa")
    out = llama2_7b_gqa();
  else if (name == "13b")
    out = llama2_13b();
  else if (name == "70b-tp2")
    out = llama2_70b_tp2_shard();
  else
    return false;
  return true;
}

//! Which cache a run keeps, and how hard it compresses.
enum class CacheKind { kFull, kDmc, kH2O, kTova };

//! A policy as the benchmark runs it. For DMC, `head_ratios` [layers * kv_heads] holds each
//! (layer, KV head)'s merge ratio r: token t of every sequence appends when t % r == 0 and merges
//! otherwise, so a head keeps ceil(tokens / r) slots. For H2O/TOVA, `budget` slots are kept per
//! KV head (H2O: half heavy, half recent).
struct PolicyRun {
  std::string label;
  CacheKind kind = CacheKind::kFull;
  double target_ratio = 1.0;
  int budget = 0;
  std::vector<int> head_ratios;
};

//! Slots one (layer, KV head) holds after `tokens` tokens (H2O/TOVA: including the step's
//! newcomer, which is in the cache while attention runs).
inline std::int64_t slots_kept(PolicyRun const& run, int layer_head, std::int64_t tokens) {
  switch (run.kind) {
    case CacheKind::kFull: return tokens;
    case CacheKind::kDmc: {
      std::int64_t const r = run.head_ratios.at(static_cast<std::size_t>(layer_head));
      return (tokens + r - 1) / r;
    }
    case CacheKind::kH2O:
    case CacheKind::kTova: return tokens < run.budget + 1 ? tokens : run.budget + 1;
  }
  return tokens;
}

//! Pages of `page_size` slots one sequence may hold after `tokens` tokens, over all layers and
//! KV heads: the slots kept, plus for DMC one spare slot per head (a step reserves room for an
//! append before the update kernel knows whether the token merges).
inline std::int64_t pages_per_sequence(ModelSpec const& spec, PolicyRun const& run,
                                       std::int64_t tokens, int page_size) {
  std::int64_t const spare = run.kind == CacheKind::kDmc ? 1 : 0;
  std::int64_t pages = 0;
  for (int i = 0; i < spec.layers * spec.kv_heads; ++i) {
    pages += (slots_kept(run, i, tokens) + spare + page_size - 1) / page_size;
  }
  return pages;
}

//! Slots one sequence holds after `tokens` tokens, over all layers and KV heads.
inline std::int64_t slots_per_sequence(ModelSpec const& spec, PolicyRun const& run,
                                       std::int64_t tokens) {
  std::int64_t slots = 0;
  for (int i = 0; i < spec.layers * spec.kv_heads; ++i) slots += slots_kept(run, i, tokens);
  return slots;
}

}  // namespace kvc::e2e
