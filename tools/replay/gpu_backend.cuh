//! @file
//! The GPU backend of kvc-replay: replays a trace through the paged store (one layer, one
//! sequence), the parallel prefill (`kvc/cache/prefill.cuh`) for the prompt and, per decode
//! token, the store's prepare + update, decode attention (`kvc_decode_instances`) and the
//! H2O/TOVA evict. After the prefill and after every decode step it synchronises and reads the
//! slot counts back (a validation tool, not a fast path). At the end it gathers the cache
//! through the page table: keys as attention sees them (RoPE'd), values, positions.
//! Included by backend.hpp when kvc-replay is built with nvcc (KVC_REPLAY_WITH_GPU).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "kvc/attention/decode_api.cuh"
#include "kvc/attention/prefill_api.cuh"
#include "kvc/cache/paged_store.cuh"
#include "kvc/cache/prefill.cuh"
#include "kvc/core/dtype_traits.hpp"

namespace kvc::replay {

//! True when a CUDA device is usable.
inline bool gpu_device_present() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
}

namespace detail {

//! One device allocation, freed on destruction.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(DeviceMemory const&) = delete;
  DeviceMemory& operator=(DeviceMemory const&) = delete;
  ~DeviceMemory() {
    if (data_ != nullptr) cudaFree(data_);
  }
  cudaError_t allocate(std::size_t bytes) {
    return bytes == 0 ? cudaSuccess : cudaMalloc(&data_, bytes);
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void* data_ = nullptr;
};

//! A stream, destroyed on destruction.
class Stream {
 public:
  Stream() = default;
  Stream(Stream const&) = delete;
  Stream& operator=(Stream const&) = delete;
  ~Stream() {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  cudaError_t create() { return cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking); }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

inline io::IoStatus gpu_error(std::string const& what, Status status) {
  return io::IoStatus::error("gpu backend: " + what + ": " + to_string(status), status);
}
inline io::IoStatus cuda_error(std::string const& what, cudaError_t error) {
  cudaGetLastError();
  return io::IoStatus::error("gpu backend: " + what + ": " + cudaGetErrorString(error),
                             Status::kErrorCuda);
}

#define KVC_REPLAY_CUDA(call, what)                                     \
  do {                                                                  \
    cudaError_t const kvc_replay_error = (call);                        \
    if (kvc_replay_error != cudaSuccess) {                              \
      return ::kvc::replay::detail::cuda_error(what, kvc_replay_error); \
    }                                                                   \
  } while (false)
#define KVC_REPLAY_KVC(call, what)                                      \
  do {                                                                  \
    ::kvc::Status const kvc_replay_status = (call);                     \
    if (kvc_replay_status != ::kvc::Status::kSuccess) {                 \
      return ::kvc::replay::detail::gpu_error(what, kvc_replay_status); \
    }                                                                   \
  } while (false)

//! Copies `values` (float, representable in T) to a new device array of T.
template <class T>
io::IoStatus upload(std::vector<float> const& values, DeviceMemory& memory) {
  std::vector<T> host(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) host[i] = DTypeTraits<T>::from_float(values[i]);
  KVC_REPLAY_CUDA(memory.allocate(host.size() * sizeof(T) + 16), "allocation");
  KVC_REPLAY_CUDA(
      cudaMemcpy(memory.as<T>(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
      "upload");
  return io::IoStatus::success();
}

//! Slots per KV head of (layer 0, `slot`) read back from the store (synchronous).
inline io::IoStatus read_lengths(PagedStore const& store, int slot,
                                 std::vector<std::int32_t>& out) {
  int const hkv = store.dims().num_kv_heads;
  out.assign(static_cast<std::size_t>(hkv), 0);
  KVC_REPLAY_CUDA(
      cudaMemcpy(out.data(), store.arrays().lengths + store.dims().head_index(0, slot, 0),
                 sizeof(std::int32_t) * hkv, cudaMemcpyDeviceToHost),
      "reading the slot counts");
  return io::IoStatus::success();
}

//! The final cache of (layer 0, `slot`), gathered through the page table, as reference heads.
template <class T>
io::IoStatus gather_heads(PagedStore const& store, int slot,
                          std::vector<reference::HeadCache>& heads) {
  StoreDims const& dims = store.dims();
  StoreArrays const& arrays = store.arrays();
  std::vector<std::int32_t> lengths;
  KVC_IO_RETURN_IF_ERROR(read_lengths(store, slot, lengths));
  std::size_t const d = static_cast<std::size_t>(dims.head_dim);
  heads.assign(static_cast<std::size_t>(dims.num_kv_heads), reference::HeadCache{});
  for (int h = 0; h < dims.num_kv_heads; ++h) {
    std::vector<std::int32_t> pages(static_cast<std::size_t>(dims.max_pages_per_head));
    KVC_REPLAY_CUDA(
        cudaMemcpy(pages.data(),
                   arrays.page_table + dims.head_index(0, slot, h) * dims.max_pages_per_head,
                   sizeof(std::int32_t) * pages.size(), cudaMemcpyDeviceToHost),
        "reading the page table");
    reference::HeadCache& head = heads[static_cast<std::size_t>(h)];
    std::vector<T> k(d), v(d);
    for (int s = 0; s < lengths[static_cast<std::size_t>(h)]; ++s) {
      std::int64_t const row = dims.slot_row(pages.data(), s);
      KVC_REPLAY_CUDA(cudaMemcpy(k.data(), static_cast<T const*>(arrays.k_pages) + row * d,
                                 sizeof(T) * d, cudaMemcpyDeviceToHost),
                      "reading keys");
      KVC_REPLAY_CUDA(cudaMemcpy(v.data(), static_cast<T const*>(arrays.v_pages) + row * d,
                                 sizeof(T) * d, cudaMemcpyDeviceToHost),
                      "reading values");
      std::int32_t position = 0;
      KVC_REPLAY_CUDA(cudaMemcpy(&position, arrays.position_pages + row, sizeof(std::int32_t),
                                 cudaMemcpyDeviceToHost),
                      "reading positions");
      for (std::size_t i = 0; i < d; ++i) {
        head.k.push_back(DTypeTraits<T>::to_float(k[i]));
        head.v.push_back(DTypeTraits<T>::to_float(v[i]));
      }
      head.position.push_back(position);
    }
  }
  return io::IoStatus::success();
}

//! Device outputs [rows, Hq, D] of T appended to `out` as float (synchronous).
template <class T>
io::IoStatus download_rows(T const* device, std::size_t count, std::vector<float>& out) {
  std::vector<T> host(count);
  KVC_REPLAY_CUDA(cudaMemcpy(host.data(), device, sizeof(T) * count, cudaMemcpyDeviceToHost),
                  "reading the attention output");
  for (T value : host) out.push_back(DTypeTraits<T>::to_float(value));
  return io::IoStatus::success();
}

}  // namespace detail

//! kvc's GPU path for one layer and one sequence.
class GpuBackend final : public Backend {
 public:
  std::string name() const override { return "gpu"; }

  bool supports(io::Trace const& trace, std::string& why) const override {
    reference::LayerSpec const& spec = trace.config.spec;
    int const group = spec.group_size();
    if (!decode_attention_supported(spec.dtype, spec.head_dim, group) ||
        !prefill_attention_supported(spec.dtype, spec.head_dim, group)) {
      why = "this build has no GPU attention kernel for " + std::string(dtype_name(spec.dtype)) +
            ", head dim " + std::to_string(spec.head_dim) + ", group size " + std::to_string(group);
      return false;
    }
    return true;
  }

  io::IoStatus run(io::Trace const& trace, ReplayResult& result) override {
    std::string why;
    if (!supports(trace, why)) {
      return io::IoStatus::error("gpu backend: " + why, Status::kErrorNotSupported);
    }
    switch (trace.config.spec.dtype) {
      case DType::kF32: return run_typed<float>(trace, result);
      case DType::kF16: return run_typed<half>(trace, result);
      case DType::kBF16: return run_typed<__nv_bfloat16>(trace, result);
    }
    return io::IoStatus::error("gpu backend: unknown dtype", Status::kErrorInvalidArgument);
  }

 private:
  template <class T>
  static io::IoStatus run_typed(io::Trace const& trace, ReplayResult& result) {
    using namespace detail;
    reference::LayerSpec const& spec = trace.config.spec;
    int const tokens = trace.num_tokens;
    int const prompt = trace.config.prompt_tokens;
    int const hq = spec.num_q_heads;
    int const hkv = spec.num_kv_heads;
    std::size_t const d = static_cast<std::size_t>(spec.head_dim);
    std::size_t const q_row = static_cast<std::size_t>(hq) * d;
    std::size_t const kv_row = static_cast<std::size_t>(hkv) * d;

    PagedStoreConfig config;
    config.shape = {1, hq, hkv, spec.head_dim};
    config.dtype = spec.dtype;
    config.page_size = kStoreDefaultPageSize;
    config.max_seqs = 1;
    config.policy = trace.config.policy;
    config.rope = spec.rope;
    // A head holds at most one slot per token (+ the reserved room of a step); H2O/TOVA also
    // stage a whole prompt chunk before the cut.
    std::int64_t const head_slots = static_cast<std::int64_t>(tokens) + 1;
    config.max_pages_per_head =
        static_cast<int>((head_slots + config.page_size - 1) / config.page_size) + 1;
    config.num_pages = config.max_pages_per_head * hkv;

    Stream stream;
    KVC_REPLAY_CUDA(stream.create(), "stream");
    std::size_t store_bytes = 0;
    KVC_REPLAY_KVC(PagedStore::required_bytes(config, store_bytes), "store config");
    DeviceMemory store_memory;
    KVC_REPLAY_CUDA(store_memory.allocate(store_bytes), "store allocation");
    PagedStore store;
    KVC_REPLAY_KVC(store.init(config, store_memory.as<void>(), store_bytes, stream.get()),
                   "store init");
    int slot = 0;
    KVC_REPLAY_KVC(store.add_sequence(slot, stream.get()), "add_sequence");

    DeviceMemory q, k, v, out, q_out, ids;
    KVC_IO_RETURN_IF_ERROR(upload<T>(trace.q, q));
    KVC_IO_RETURN_IF_ERROR(upload<T>(trace.k, k));
    KVC_IO_RETURN_IF_ERROR(upload<T>(trace.v, v));
    KVC_REPLAY_CUDA(out.allocate(sizeof(T) * tokens * q_row + 16), "allocation");
    KVC_REPLAY_CUDA(q_out.allocate(sizeof(T) * q_row + 16), "allocation");
    std::int32_t const host_ids[3] = {slot, 0, prompt};  // seq_slots [1], cu_tokens [2]
    KVC_REPLAY_CUDA(ids.allocate(sizeof(host_ids)), "allocation");
    KVC_REPLAY_CUDA(
        cudaMemcpy(ids.as<std::int32_t>(), host_ids, sizeof(host_ids), cudaMemcpyHostToDevice),
        "upload");
    std::int32_t const* seq_slots = ids.as<std::int32_t>();

    ReplayResult replay;
    replay.out.reserve(static_cast<std::size_t>(tokens) * q_row);
    std::vector<std::int32_t> lengths;
    auto record_slots = [&](int count) {
      for (int i = 0; i < count; ++i)
        replay.slots.insert(replay.slots.end(), lengths.begin(), lengths.end());
    };

    if (prompt > 0) {
      PrefillBatch const chunks{seq_slots, seq_slots + 1, 1, prompt, prompt};
      std::size_t workspace_bytes = 0;
      KVC_REPLAY_KVC(prefill_workspace_size<T>(store, chunks, workspace_bytes),
                     "prefill workspace size");
      DeviceMemory workspace;
      KVC_REPLAY_CUDA(workspace.allocate(workspace_bytes), "allocation");
      KVC_REPLAY_KVC(prepare_prefill(store, chunks, stream.get()), "prepare_prefill");
      KVC_REPLAY_KVC(
          prefill_layer<T>(store, 0, q.as<T>(), k.as<T>(), v.as<T>(), chunks, out.as<T>(), nullptr,
                           workspace.as<void>(), workspace_bytes, stream.get()),
          "prefill_layer");
      KVC_REPLAY_KVC(store.step_status_sync(stream.get()), "prefill step");
      KVC_IO_RETURN_IF_ERROR(
          download_rows<T>(out.as<T>(), static_cast<std::size_t>(prompt) * q_row, replay.out));
      KVC_IO_RETURN_IF_ERROR(read_lengths(store, slot, lengths));
      record_slots(prompt);
    }

    if (tokens > prompt) {
      PagedLayerView<T> view;
      KVC_REPLAY_KVC(store.layer_view(0, view), "layer_view");
      DecodeParams params =
          make_decode_params<T>(view, q_out.as<T>(), seq_slots, 1, hq, out.as<T>(), nullptr);
      params.scale = spec.scale;
      int const stride = config.has_scores() ? config.eviction_budget() + 1 : 0;
      DeviceMemory probs;
      KVC_REPLAY_CUDA(probs.allocate(sizeof(float) * hq * stride), "allocation");
      if (config.has_scores()) params.scores = ScoreHook{probs.as<float>(), stride};
      std::size_t workspace_bytes = 0;
      KVC_REPLAY_KVC(decode_attention_workspace_size(params, workspace_bytes),
                     "decode workspace size");
      DeviceMemory workspace;
      KVC_REPLAY_CUDA(workspace.allocate(workspace_bytes), "allocation");
      params.workspace = workspace.as<void>();
      params.workspace_bytes = workspace_bytes;
      for (int t = prompt; t < tokens; ++t) {
        std::size_t const step = static_cast<std::size_t>(t);
        params.out = out.as<T>() + step * q_row;
        KVC_REPLAY_KVC(store.prepare_decode_step(seq_slots, 1, stream.get()), "prepare step");
        KVC_REPLAY_KVC(
            store.update<T>(0, q.as<T>() + step * q_row, k.as<T>() + step * kv_row,
                            v.as<T>() + step * kv_row, seq_slots, 1, q_out.as<T>(), stream.get()),
            "update");
        KVC_REPLAY_KVC(decode_attention(params, stream.get()), "decode_attention");
        KVC_REPLAY_KVC(store.evict(0, params.scores, seq_slots, 1, stream.get()), "evict");
        KVC_REPLAY_KVC(store.step_status_sync(stream.get()),
                       "decode step of token " + std::to_string(t));
        KVC_IO_RETURN_IF_ERROR(read_lengths(store, slot, lengths));
        record_slots(1);
      }
      KVC_IO_RETURN_IF_ERROR(
          download_rows<T>(out.as<T>() + static_cast<std::size_t>(prompt) * q_row,
                           static_cast<std::size_t>(tokens - prompt) * q_row, replay.out));
    }

    std::vector<reference::HeadCache> heads;
    KVC_IO_RETURN_IF_ERROR(gather_heads<T>(store, slot, heads));
    pack_final_cache(spec, heads, replay);
    std::int64_t tokens_seen = 0;
    KVC_REPLAY_CUDA(
        cudaMemcpy(&tokens_seen, store.arrays().tokens_seen + store.dims().layer_seq(0, slot),
                   sizeof(std::int64_t), cudaMemcpyDeviceToHost),
        "reading tokens seen");
    replay.tokens_seen = tokens_seen;
    result = std::move(replay);
    return io::IoStatus::success();
  }
};

//! The factory backend.hpp calls: kErrorNoDevice without a CUDA device.
inline io::IoStatus make_gpu_backend_impl(std::unique_ptr<Backend>& out) {
  if (!gpu_device_present()) {
    return io::IoStatus::error("no CUDA device", Status::kErrorNoDevice);
  }
  out = std::make_unique<GpuBackend>();
  return io::IoStatus::success();
}

#undef KVC_REPLAY_CUDA
#undef KVC_REPLAY_KVC

}  // namespace kvc::replay
