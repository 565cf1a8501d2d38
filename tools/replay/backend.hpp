//! @file
//! The backends of kvc-replay: what one backend produces for a trace (ReplayResult), the small
//! interface every backend implements (Backend), the CPU reference backend, and the factory of
//! the GPU backend.
//!
//! The GPU backend (`tools/replay/gpu_backend.cuh`, built when nvcc is found: tools/CMakeLists.txt
//! compiles kvc-replay with nvcc and defines KVC_REPLAY_WITH_GPU=1) defines, in namespace
//! kvc::replay, `io::IoStatus make_gpu_backend_impl(std::unique_ptr<Backend>& out)`
//! (kErrorNoDevice when no CUDA device is present) and `bool gpu_device_present()`. The driver
//! compares whatever two backends return.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvc/io/io_status.hpp"
#include "kvc/io/trace.hpp"
#include "kvc/reference/layer_cache.hpp"
#include "kvc/reference/types.hpp"

namespace kvc::replay {

//! Everything one backend produces for a trace of T tokens.
struct ReplayResult {
  std::vector<float> out;                     //!< [T, Hq, D] attention output of query t
  std::vector<std::int32_t> slots;            //!< [T, Hkv] slots per KV head after step t
  std::vector<int> final_slots;               //!< [Hkv] slots per KV head at the end
  int max_slots = 0;                          //!< max of final_slots
  std::vector<float> cache_k;                 //!< [Hkv, max_slots, D] keys as attention sees them
  std::vector<float> cache_v;                 //!< [Hkv, max_slots, D]
  std::vector<std::int32_t> cache_positions;  //!< [Hkv, max_slots] newest position, -1 = padding
  std::int64_t tokens_seen = 0;
};

//! A way of running a trace: the CPU reference, or the GPU store and kernels.
class Backend {
 public:
  virtual ~Backend() = default;
  //! Short name used in messages and the report (`cpu`, `gpu`).
  virtual std::string name() const = 0;
  //! Replays `trace` (already validated): prompt tokens as one prefill chunk, the rest as
  //! decode steps, one token each. `result` is set only on success.
  virtual io::IoStatus run(io::Trace const& trace, ReplayResult& result) = 0;
  //! False (and `why` set) when this backend cannot run `trace` at all (e.g. no compiled kernel
  //! for its shape); `--device auto` then runs the reference alone.
  virtual bool supports(io::Trace const& trace, std::string& why) const {
    (void)trace;
    (void)why;
    return true;
  }
};

//! Fills the final-cache fields of `result` from per-KV-head slots (zero padding to the
//! longest head, position -1 in the padding).
inline void pack_final_cache(reference::LayerSpec const& spec,
                             std::vector<reference::HeadCache> const& heads, ReplayResult& result) {
  std::size_t const d = static_cast<std::size_t>(spec.head_dim);
  result.final_slots.assign(heads.size(), 0);
  result.max_slots = 0;
  for (std::size_t h = 0; h < heads.size(); ++h) {
    result.final_slots[h] = heads[h].size();
    result.max_slots = std::max(result.max_slots, heads[h].size());
  }
  std::size_t const max_slots = static_cast<std::size_t>(result.max_slots);
  result.cache_k.assign(heads.size() * max_slots * d, 0.0f);
  result.cache_v.assign(heads.size() * max_slots * d, 0.0f);
  result.cache_positions.assign(heads.size() * max_slots, -1);
  for (std::size_t h = 0; h < heads.size(); ++h) {
    reference::HeadCache const& head = heads[h];
    std::copy(head.k.begin(), head.k.end(),
              result.cache_k.begin() + static_cast<std::ptrdiff_t>(h * max_slots * d));
    std::copy(head.v.begin(), head.v.end(),
              result.cache_v.begin() + static_cast<std::ptrdiff_t>(h * max_slots * d));
    for (int s = 0; s < head.size(); ++s) {
      result.cache_positions[h * max_slots + static_cast<std::size_t>(s)] =
          static_cast<std::int32_t>(head.position[s]);
    }
  }
}

//! The CPU reference (kvc::reference::LayerCache over the trace's runtime policy config).
class CpuReferenceBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }

  io::IoStatus run(io::Trace const& trace, ReplayResult& result) override {
    reference::LayerSpec const& spec = trace.config.spec;
    int const tokens = trace.num_tokens;
    int const prompt = trace.config.prompt_tokens;
    std::size_t const q_row = static_cast<std::size_t>(spec.num_q_heads) * spec.head_dim;
    std::size_t const kv_row = static_cast<std::size_t>(spec.num_kv_heads) * spec.head_dim;
    std::size_t const hkv = static_cast<std::size_t>(spec.num_kv_heads);

    reference::LayerCache cache;
    Status status = reference::LayerCache::create(spec, trace.config.policy, cache);
    if (status != Status::kSuccess)
      return io::IoStatus::error(std::string("cpu reference: ") + to_string(status), status);

    ReplayResult replay;
    replay.out.reserve(static_cast<std::size_t>(tokens) * q_row);
    replay.slots.reserve(static_cast<std::size_t>(tokens) * hkv);
    auto record_slots = [&](int count) {
      std::vector<reference::HeadCache> const& heads = cache.heads();
      for (int i = 0; i < count; ++i) {
        for (std::size_t h = 0; h < hkv; ++h) replay.slots.push_back(heads[h].size());
      }
    };

    if (prompt > 0) {
      reference::PrefillInput const input{prompt,
                                          reference::ConstSpan(trace.q.data(), prompt * q_row),
                                          reference::ConstSpan(trace.k.data(), prompt * kv_row),
                                          reference::ConstSpan(trace.v.data(), prompt * kv_row)};
      reference::AttentionOutput output;
      status = cache.prefill(input, output);
      if (status != Status::kSuccess) {
        return io::IoStatus::error(
            std::string("cpu reference: prefill failed: ") + to_string(status), status);
      }
      replay.out.insert(replay.out.end(), output.out.begin(), output.out.end());
      record_slots(prompt);  // every prompt position reports the count after the prefill
    }
    for (int t = prompt; t < tokens; ++t) {
      std::size_t const step = static_cast<std::size_t>(t);
      reference::DecodeInput const input{
          reference::ConstSpan(trace.q.data() + step * q_row, q_row),
          reference::ConstSpan(trace.k.data() + step * kv_row, kv_row),
          reference::ConstSpan(trace.v.data() + step * kv_row, kv_row)};
      reference::AttentionOutput output;
      status = cache.decode_step(input, output);
      if (status != Status::kSuccess) {
        return io::IoStatus::error("cpu reference: decode step of token " + std::to_string(t) +
                                       " failed: " + to_string(status),
                                   status);
      }
      replay.out.insert(replay.out.end(), output.out.begin(), output.out.end());
      record_slots(1);
    }
    pack_final_cache(spec, cache.heads(), replay);
    replay.tokens_seen = cache.tokens_seen();
    result = std::move(replay);
    return io::IoStatus::success();
  }
};

//! True when this kvc-replay was built with the GPU backend.
inline constexpr bool kGpuBackendBuilt =
#if KVC_REPLAY_WITH_GPU
    true;
#else
    false;
#endif

}  // namespace kvc::replay

#if KVC_REPLAY_WITH_GPU
#include "gpu_backend.cuh"
#endif

namespace kvc::replay {

//! True when the GPU backend is built and a CUDA device is present.
inline bool gpu_backend_available() {
#if KVC_REPLAY_WITH_GPU
  return gpu_device_present();
#else
  return false;
#endif
}

//! Creates the GPU backend, or explains why it cannot: kErrorNotSupported "GPU backend not built
//! yet" in builds without it, kErrorNoDevice without a CUDA device.
inline io::IoStatus make_gpu_backend(std::unique_ptr<Backend>& out) {
#if KVC_REPLAY_WITH_GPU
  return make_gpu_backend_impl(out);
#else
  (void)out;
  return io::IoStatus::error(
      "GPU backend not built yet (this kvc-replay has the CPU reference only; "
      "use --device cpu)",
      Status::kErrorNotSupported);
#endif
}

}  // namespace kvc::replay
