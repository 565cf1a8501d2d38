//! @file
//! `kvc::reference::LayerCache`: the CPU reference cache of one (sequence, layer) under a policy
//! chosen at run time (`PolicyConfig`). It owns the per-policy state and forwards every call to
//! that policy's reference functions (full_*, dmc_*, h2o_*, tova_*) unchanged, so a program can
//! switch policies with a flag and compare them on the same stream. GQA is the shape of the
//! `LayerSpec` (num_q_heads = G * num_kv_heads), not a policy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/status.hpp"
#include "kvc/policy/kind.hpp"
#include "kvc/reference/dmc.hpp"
#include "kvc/reference/full.hpp"
#include "kvc/reference/h2o.hpp"
#include "kvc/reference/tova.hpp"
#include "kvc/reference/types.hpp"

namespace kvc::reference {

//! The reference cache of one (sequence, layer) under any policy.
//!
//! Create it with `LayerCache::create(spec, config, cache)`; feed it prompt chunks (`prefill`)
//! and decode tokens (`decode_step`) with pre-RoPE q, k, v. Every call validates its input first
//! and leaves the cache unchanged on error. A default-constructed LayerCache is an empty full
//! cache of `LayerSpec{}`.
class LayerCache {
 public:
  //! The per-policy state; the alternative matches `config().kind`.
  using State = std::variant<FullLayerState, DmcLayerState, H2OLayerState, TovaLayerState>;

  LayerCache() : state_(make_full_state(spec_)) {}

  //! Builds an empty cache for `spec` under `config` into `out`. Returns the Status of
  //! `spec.validate()` or `config.validate(spec.head_dim)` when either fails (kErrorInvalidShape,
  //! kErrorInvalidArgument for a bad DMC config, kErrorInvalidBudget for an H2O/TOVA budget of
  //! zero or less); `out` is then unchanged.
  static Status create(LayerSpec const& spec, PolicyConfig const& config, LayerCache& out) {
    KVC_RETURN_IF_ERROR(spec.validate());
    KVC_RETURN_IF_ERROR(config.validate(spec.head_dim));
    LayerCache cache;
    cache.spec_ = spec;
    cache.config_ = config;
    switch (config.kind) {
      case PolicyKind::kFull: cache.state_ = make_full_state(spec); break;
      case PolicyKind::kDmc: cache.state_ = make_dmc_state(spec, config.dmc); break;
      case PolicyKind::kH2O: cache.state_ = make_h2o_state(spec); break;
      case PolicyKind::kTova: cache.state_ = make_tova_state(spec); break;
      default: return Status::kErrorInvalidArgument;
    }
    out = std::move(cache);
    return Status::kSuccess;
  }

  //! One decode token at position `tokens_seen()`: the policy's decode step (update the cache,
  //! attend over it). q: [num_q_heads, head_dim]; k, v: [num_kv_heads, head_dim], pre-RoPE;
  //! output: out [num_q_heads, head_dim], lse [num_q_heads]. `decisions`, if given, receives
  //! DMC's per-KV-head merge flags and omegas; other policies leave it untouched.
  Status decode_step(DecodeInput const& input, AttentionOutput& output,
                     DmcStepDecisions* decisions = nullptr) {
    return std::visit(
        [&](auto& state) -> Status {
          using S = std::decay_t<decltype(state)>;
          if constexpr (std::is_same_v<S, FullLayerState>) {
            return full_decode_step(spec_, config_.full, state, input, output);
          } else if constexpr (std::is_same_v<S, DmcLayerState>) {
            return dmc_decode_step(spec_, config_.dmc, state, input, output, decisions);
          } else if constexpr (std::is_same_v<S, H2OLayerState>) {
            return h2o_decode_step(spec_, config_.h2o, state, input, output);
          } else {
            static_assert(std::is_same_v<S, TovaLayerState>);
            return tova_decode_step(spec_, config_.tova, state, input, output);
          }
        },
        state_);
  }

  //! A prompt chunk of T tokens at positions tokens_seen() + i: the policy's prefill (causal
  //! attention over the cache and the chunk, then the policy's cut). q: [T, num_q_heads,
  //! head_dim]; k, v: [T, num_kv_heads, head_dim], pre-RoPE; output: out [T, num_q_heads,
  //! head_dim], lse [T, num_q_heads].
  Status prefill(PrefillInput const& input, AttentionOutput& output) {
    return std::visit(
        [&](auto& state) -> Status {
          using S = std::decay_t<decltype(state)>;
          if constexpr (std::is_same_v<S, FullLayerState>) {
            return full_prefill(spec_, config_.full, state, input, output);
          } else if constexpr (std::is_same_v<S, DmcLayerState>) {
            return dmc_prefill(spec_, config_.dmc, state, input, output);
          } else if constexpr (std::is_same_v<S, H2OLayerState>) {
            return h2o_prefill(spec_, config_.h2o, state, input, output);
          } else {
            static_assert(std::is_same_v<S, TovaLayerState>);
            return tova_prefill(spec_, config_.tova, state, input, output);
          }
        },
        state_);
  }

  LayerSpec const& spec() const { return spec_; }
  PolicyConfig const& config() const { return config_; }
  PolicyKind kind() const { return config_.kind; }

  //! The per-policy state (e.g. `std::get_if<DmcLayerState>(&cache.state())` for DMC's sums).
  State const& state() const { return state_; }

  //! The slots of every KV head, in slot order. // [num_kv_heads]
  std::vector<HeadCache> const& heads() const {
    return std::visit(
        [](auto const& state) -> std::vector<HeadCache> const& { return state.heads; }, state_);
  }

  //! Tokens fed so far (prefill and decode); the position of the next token.
  std::int64_t tokens_seen() const {
    return std::visit([](auto const& state) { return state.tokens_seen; }, state_);
  }

  //! Slots kept by KV head `kv_head` (0 when out of range).
  int slots(int kv_head) const {
    std::vector<HeadCache> const& all = heads();
    if (kv_head < 0 || kv_head >= static_cast<int>(all.size())) return 0;
    return all[kv_head].size();
  }

  //! Slots kept per KV head. // [num_kv_heads]
  std::vector<int> slots_per_head() const {
    std::vector<int> counts;
    for (HeadCache const& head : heads()) counts.push_back(head.size());
    return counts;
  }

  //! Slots kept by all KV heads together.
  std::int64_t total_slots() const {
    std::int64_t total = 0;
    for (HeadCache const& head : heads()) total += head.size();
    return total;
  }

  //! Compression ratio of KV head `kv_head`: tokens seen / slots kept (1 when nothing is cached).
  double compression_ratio(int kv_head) const {
    int const kept = slots(kv_head);
    return kept == 0 ? 1.0 : static_cast<double>(tokens_seen()) / kept;
  }

  //! Compression ratio of the layer: tokens seen * KV heads / total slots (1 when empty).
  double compression_ratio() const {
    std::int64_t const kept = total_slots();
    if (kept == 0) return 1.0;
    return static_cast<double>(tokens_seen()) * static_cast<double>(heads().size()) /
           static_cast<double>(kept);
  }

  //! Bytes of K and V the cache keeps in its storage dtype: slots * head_dim * 2 * dtype size.
  //! (Policy bookkeeping such as scores or DMC's running sums is not counted.)
  std::int64_t bytes() const {
    return total_slots() * spec_.head_dim * 2 * static_cast<std::int64_t>(dtype_size(spec_.dtype));
  }

 private:
  LayerSpec spec_{};
  PolicyConfig config_{};
  State state_;
};

}  // namespace kvc::reference
