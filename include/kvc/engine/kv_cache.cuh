//! @file
//! `kvc::KVCache`: the engine-facing facade over the paged store and decode attention, for users
//! who want one object. It owns its memory (one cudaMalloc at creation for the store and every
//! scratch array, one cudaMallocHost for the step report) and runs, per decode step, the store's
//! prepare once and then per layer update + attention (+ evict for H2O/TOVA), writing the
//! attention output into the caller's buffer. Every call is asynchronous on the caller's stream;
//! only calls named `*_sync` block. Errors are a Status; a call that returns an error has
//! enqueued nothing and changed nothing.
//!
//! @code
//!   kvc::KVCacheConfig config;  // shape, dtype, policy, max_seqs, max_tokens_per_seq, ...
//!   kvc::KVCache cache;
//!   kvc::KVCache::create(config, stream, cache);
//!   int seq; cache.add_sequence(seq, stream);
//!   for (int l = 0; l < layers; ++l) cache.prefill_layer(seq, l, T, q, k, v, out, stream);
//!   cache.begin_step(ids, batch, stream);                 // host ids of the step's rows
//!   for (int l = 0; l < layers; ++l) cache.decode_layer(l, q, k, v, out, stream);
//!   cache.end_step(stream);                               // report copied to pinned memory
//!   ... cache.step_status_sync();                         // when the host waits anyway
//! @endcode
//! The low-level API (`PagedStore` + `decode_attention`, caller-owned memory) stays available;
//! `store()` exposes the facade's store read-only. See docs/engine_api.md.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "kvc/attention/params.hpp"
#include "kvc/attention/score_hook.hpp"
#include "kvc/cache/paged_store.cuh"
#include "kvc/cache/paged_view.hpp"
#include "kvc/cache/step_report.hpp"
#include "kvc/cache/store_config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/macros.hpp"
#include "kvc/core/status.hpp"
#include "kvc/engine/attention_backend.cuh"
#include "kvc/engine/cache_stats.hpp"
#include "kvc/engine/kv_cache_config.hpp"

namespace kvc {

namespace detail {

//! Sequence ids carried by value in a kernel's arguments (no host staging buffer, no copy
//! engine): 960 ids plus the header stay under the 4 KiB kernel-parameter limit.
inline constexpr int kSlotChunk = 960;
struct SlotChunk {
  std::int32_t* dst = nullptr;
  int count = 0;
  std::int32_t values[kSlotChunk];
};

//! dst[i] = values[i] for i < count.
KVC_GLOBAL void write_slots_kernel(SlotChunk chunk) {
  for (int i = static_cast<int>(threadIdx.x); i < chunk.count; i += static_cast<int>(blockDim.x)) {
    chunk.dst[i] = chunk.values[i];
  }
}

//! Writes `count` host ids to device `dst` on `stream` through kernel arguments.
inline Status write_slots_async(std::int32_t* dst, int const* ids, int count, cudaStream_t stream) {
  for (int begin = 0; begin < count; begin += kSlotChunk) {
    SlotChunk chunk{};
    chunk.dst = dst + begin;
    chunk.count = std::min(kSlotChunk, count - begin);
    for (int i = 0; i < chunk.count; ++i) chunk.values[i] = ids[begin + i];
    write_slots_kernel<<<1, 256, 0, stream>>>(chunk);
    KVC_RETURN_IF_ERROR(last_cuda_status());
  }
  return Status::kSuccess;
}

template <class T>
struct TypeTag {
  using type = T;
};

//! Calls fn(TypeTag<T>{}) with T the storage type of `dtype`.
template <class Fn>
Status with_storage_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kF32: return fn(TypeTag<float>{});
    case DType::kF16: return fn(TypeTag<half>{});
    case DType::kBF16: return fn(TypeTag<__nv_bfloat16>{});
  }
  return Status::kErrorInvalidArgument;
}

inline std::size_t align_up(std::size_t bytes, std::size_t alignment) {
  return (bytes + alignment - 1) / alignment * alignment;
}

}  // namespace detail

//! The KV cache of a whole model as one object. Policy, dtype and shape are runtime values
//! (`KVCacheConfig`); the template parameter picks the decode-attention backend
//! (attention_backend.cuh): `KVCache` uses the precompiled kernels of `kvc_decode_instances`.
//!
//! Sequence ids are the store's sequence slots, 0..max_seqs-1, handed out by add_sequence.
//!
//! Stream and threading rules: a KVCache is not thread-safe (one host thread at a time). Every
//! call of a decode step (begin_step, decode_layer for each layer, end_step) and of a prefill
//! goes on one stream, or on streams ordered by events; calls that change the cache follow each
//! other in that order. Only `*_sync` calls block; the destructor (cudaFree) synchronises the
//! device, so destroy a cache when its work is done.
template <class Attention>
class BasicKVCache {
 public:
  BasicKVCache() = default;
  BasicKVCache(BasicKVCache const&) = delete;
  BasicKVCache& operator=(BasicKVCache const&) = delete;
  BasicKVCache(BasicKVCache&& other) noexcept { swap(other); }
  BasicKVCache& operator=(BasicKVCache&& other) noexcept {
    if (this != &other) {
      BasicKVCache gone(std::move(other));
      swap(gone);
    }
    return *this;
  }
  ~BasicKVCache() { release_resources(); }

  //! Device bytes a cache with `config` allocates (store + attention workspace + scratch), on
  //! the current device. Errors: the config's validation error; kErrorNotSupported when the
  //! backend has no kernel for (dtype, head dim, group size); kErrorNoDevice / kErrorCuda when
  //! the device cannot be queried (the workspace size depends on it).
  static Status required_bytes(KVCacheConfig const& config, std::size_t& bytes) {
    Layout layout;
    KVC_RETURN_IF_ERROR(plan(config, layout));
    bytes = layout.total;
    return Status::kSuccess;
  }

  //! Builds a cache for `config` into `out`: validates, allocates (one cudaMalloc, one
  //! cudaMallocHost), initialises the store on `stream` (asynchronously). On error `out` is
  //! unchanged and nothing stays allocated. A cache `out` already held is destroyed on success.
  //! Errors: as required_bytes; kErrorCuda when an allocation or launch fails.
  static Status create(KVCacheConfig const& config, cudaStream_t stream, BasicKVCache& out) {
    Layout layout;
    KVC_RETURN_IF_ERROR(plan(config, layout));
    BasicKVCache cache;
    cache.config_ = config;
    cache.store_config_ = layout.store;
    cache.batch_capacity_ = config.batch_capacity();
    cache.probs_stride_ = layout.probs_stride;
    cache.workspace_bytes_ = layout.workspace_bytes;
    void* device = nullptr;
    KVC_RETURN_IF_ERROR(detail::cuda_status(cudaMalloc(&device, layout.total)));
    cache.device_ = device;
    cache.device_bytes_ = layout.total;
    void* pinned = nullptr;
    std::size_t const pinned_bytes =
        sizeof(StepReport) + sizeof(std::int32_t) * cache.batch_capacity_;
    KVC_RETURN_IF_ERROR(detail::cuda_status(cudaMallocHost(&pinned, pinned_bytes)));
    cache.pinned_ = pinned;
    cache.report_ = static_cast<StepReport*>(pinned);
    *cache.report_ = StepReport{};
    cache.row_flags_ =
        reinterpret_cast<std::int32_t*>(static_cast<unsigned char*>(pinned) + sizeof(StepReport));
    std::fill(cache.row_flags_, cache.row_flags_ + cache.batch_capacity_, 0);
    KVC_RETURN_IF_ERROR(
        detail::cuda_status(cudaEventCreateWithFlags(&cache.event_, cudaEventDisableTiming)));
    auto* base = static_cast<unsigned char*>(device);
    cache.workspace_ = base + layout.workspace;
    cache.q_out_ = base + layout.q_out;
    cache.probs_ =
        layout.probs_stride > 0 ? reinterpret_cast<float*>(base + layout.probs) : nullptr;
    cache.step_slots_ = reinterpret_cast<std::int32_t*>(base + layout.slots);
    cache.prefill_slot_ = reinterpret_cast<std::int32_t*>(base + layout.prefill_slot);
    KVC_RETURN_IF_ERROR(cache.store_.init(layout.store, base, layout.store_bytes, stream));
    cache.layer_done_.assign(static_cast<std::size_t>(config.shape.num_layers), 0);
    cache.seen_.assign(static_cast<std::size_t>(config.max_seqs), 0);
    out = std::move(cache);
    return Status::kSuccess;
  }

  //! True once create succeeded.
  bool valid() const { return store_.initialized(); }
  KVCacheConfig const& config() const { return config_; }
  //! The paged store underneath (read-only: arrays, layer views, accounting).
  PagedStore const& store() const { return store_; }
  //! Device bytes allocated at creation.
  std::size_t device_bytes() const { return device_bytes_; }
  //! Rows a decode step may have.
  int batch_capacity() const { return batch_capacity_; }
  int num_active() const { return store_.num_active(); }
  bool is_active(int seq) const { return store_.is_active(seq); }
  //! True between begin_step and end_step.
  bool in_step() const { return in_step_; }

  //! Takes the lowest free sequence id and zeroes its rows on `stream`. Errors:
  //! kErrorInvalidArgument (no cache, or all max_seqs ids in use); kErrorCuda.
  Status add_sequence(int& seq, cudaStream_t stream) { return store_.add_sequence(seq, stream); }

  //! Returns every page of `seq` to the pool on `stream`; the id may be reused. Errors:
  //! kErrorInvalidSequence (unknown or inactive); kErrorInvalidArgument inside a step (a step's
  //! rows must stay valid until end_step); kErrorCuda.
  Status release_sequence(int seq, cudaStream_t stream) {
    if (in_step_) return Status::kErrorInvalidArgument;
    return store_.release_sequence(seq, stream);
  }

  //! Opens a decode step for the sequences `seq_ids` (host array, [batch], distinct active ids,
  //! any order; row b of every q/k/v/out of the step is sequence seq_ids[b]). Enqueues the ids
  //! (carried in kernel arguments, so `seq_ids` may be reused at once) and the store's prepare
  //! for all layers. Errors: kErrorInvalidArgument (no cache, a step already open, batch < 0 or
  //! above batch_capacity(), null ids, a repeated id); kErrorInvalidSequence (an inactive id);
  //! kErrorCuda. Whether the pool had the pages is known on the device only (see end_step).
  Status begin_step(int const* seq_ids, int batch, cudaStream_t stream) {
    KVC_RETURN_IF_ERROR(check_begin(batch));
    if (batch > 0 && seq_ids == nullptr) return Status::kErrorInvalidArgument;
    Status status = Status::kSuccess;
    int b = 0;
    for (; b < batch && status == Status::kSuccess; ++b) {
      int const id = seq_ids[b];
      if (!store_.is_active(id)) {
        status = Status::kErrorInvalidSequence;
      } else if (seen_[static_cast<std::size_t>(id)] != 0) {
        status = Status::kErrorInvalidArgument;
      } else {
        seen_[static_cast<std::size_t>(id)] = 1;
      }
    }
    for (int i = 0; i < b; ++i) {  // clear the marks of the ids checked (all of them on success)
      int const id = seq_ids[i];
      if (id >= 0 && id < config_.max_seqs) seen_[static_cast<std::size_t>(id)] = 0;
    }
    KVC_RETURN_IF_ERROR(status);
    KVC_RETURN_IF_ERROR(detail::write_slots_async(step_slots_, seq_ids, batch, stream));
    return open_step(step_slots_, batch, stream);
  }

  //! begin_step with the ids already in device memory (`device_seq_ids`, [batch] int32), which
  //! must stay unchanged until the step's last decode_layer has run on the stream. The ids are
  //! not checked on the host: an inactive or out-of-range id refuses the step on the device
  //! (kErrorInvalidSequence in the report); repeated ids are undefined behaviour.
  Status begin_step_device(std::int32_t const* device_seq_ids, int batch, cudaStream_t stream) {
    KVC_RETURN_IF_ERROR(check_begin(batch));
    if (batch > 0 && device_seq_ids == nullptr) return Status::kErrorInvalidArgument;
    return open_step(device_seq_ids, batch, stream);
  }

  //! One layer of the open step for every row: the store's update (RoPE, the policy's append or
  //! DMC merge), decode attention over the updated cache, and for H2O/TOVA the eviction.
  //! q [batch, num_q_heads, head_dim], k and v [batch, num_kv_heads, head_dim] pre-RoPE, out
  //! [batch, num_q_heads, head_dim] (16-byte aligned), all device memory in the cache's dtype;
  //! lse [batch, num_q_heads] fp32 or null. Each layer at most once per step. If the step was
  //! refused on the device, nothing is written to the cache and `out` is meaningless.
  //! Errors: kErrorInvalidArgument (no open step, layer out of range or already done this step,
  //! null or misaligned pointers); kErrorSizeMismatch (internal workspace check); kErrorCuda.
  Status decode_layer(int layer, void const* q, void const* k, void const* v, void* out,
                      cudaStream_t stream, float* lse = nullptr) {
    if (!in_step_ || layer < 0 || layer >= config_.shape.num_layers ||
        layer_done_[static_cast<std::size_t>(layer)] != 0) {
      return Status::kErrorInvalidArgument;
    }
    KVC_RETURN_IF_ERROR(run_layer(layer, q, k, v, out, lse, step_ids_, step_batch_, stream));
    layer_done_[static_cast<std::size_t>(layer)] = 1;
    return Status::kSuccess;
  }

  //! Closes the step: copies its report (and the rows' flags) to pinned host memory and records
  //! an event, on `stream`. Read the result with step_status_sync() or poll_step(). Layers not
  //! decoded in the step did not see its token. Errors: kErrorInvalidArgument (no open step);
  //! kErrorCuda.
  Status end_step(cudaStream_t stream) {
    if (!in_step_) return Status::kErrorInvalidArgument;
    KVC_RETURN_IF_ERROR(publish_report(step_batch_, stream));
    in_step_ = false;
    return Status::kSuccess;
  }

  //! Waits for the report of the last end_step or prefill_layer (blocks the host) and returns
  //! its Status: kSuccess, kErrorOutOfPages (rows short of pages: release sequences and redo the
  //! step), kErrorInvalidSequence, kErrorInternal; kErrorCuda for the wait itself. `report`,
  //! if given, receives the report; row_flags() then holds the rows' StepRowFlag bits.
  Status step_status_sync(StepReport* report = nullptr) const {
    if (!valid()) return Status::kErrorInvalidArgument;
    KVC_RETURN_IF_ERROR(detail::cuda_status(cudaEventSynchronize(event_)));
    if (report != nullptr) *report = *report_;
    return step_status(*report_);
  }

  //! Non-blocking: `ready` is true when the last report has arrived, and then `status` is its
  //! Status (as step_status_sync). Errors: kErrorInvalidArgument (no cache); kErrorCuda.
  Status poll_step(bool& ready, Status& status) const {
    if (!valid()) return Status::kErrorInvalidArgument;
    cudaError_t const query = cudaEventQuery(event_);
    if (query == cudaErrorNotReady) {
      cudaGetLastError();
      ready = false;
      return Status::kSuccess;
    }
    KVC_RETURN_IF_ERROR(detail::cuda_status(query));
    ready = true;
    status = step_status(*report_);
    return Status::kSuccess;
  }

  //! Flags (StepRowFlag bits) of the rows of the last reported step, in pinned host memory;
  //! valid once its report has arrived. // [batch of that step]
  std::int32_t const* row_flags() const { return row_flags_; }

  //! Feeds a prompt of `num_tokens` tokens of sequence `seq` to layer `layer`: q [T, num_q_heads,
  //! head_dim], k and v [T, num_kv_heads, head_dim] pre-RoPE, out [T, num_q_heads, head_dim]
  //! (16-byte aligned), lse [T, num_q_heads] or null; device memory in the cache's dtype.
  //!
  //! Interim implementation: the prompt runs token by token through the decode path (prepare,
  //! update, attention, evict per token), so the cache and outputs are exactly those of T decode
  //! steps. For Full and DMC that is also exactly the reference prefill (DMC's parallel prefill
  //! is defined to agree with it). For H2O and TOVA the reference prefill keeps the top tokens of
  //! the whole prompt instead; the two agree while the prompt fits in budget + 1 and differ
  //! after that. TODO: replace with the parallel store prefill (kvc/cache/prefill*.cuh) once it
  //! lands; it will then follow the reference prefill for every policy.
  //!
  //! Outside a step only. If the pool runs dry at token t, tokens t.. are refused on the device
  //! (the cache keeps tokens ..t-1 of this layer) and the report says kErrorOutOfPages: release
  //! the sequence. Errors (nothing enqueued): kErrorInvalidArgument (inside a step, layer out of
  //! range, num_tokens < 1, null or misaligned pointers); kErrorInvalidSequence; kErrorCuda.
  Status prefill_layer(int seq, int layer, int num_tokens, void const* q, void const* k,
                       void const* v, void* out, cudaStream_t stream, float* lse = nullptr) {
    if (!valid() || in_step_ || layer < 0 || layer >= config_.shape.num_layers || num_tokens < 1) {
      return Status::kErrorInvalidArgument;
    }
    if (!store_.is_active(seq)) return Status::kErrorInvalidSequence;
    KVC_RETURN_IF_ERROR(check_layer_pointers(q, k, v, out, 1));
    std::size_t const elem = static_cast<std::size_t>(dtype_size(config_.dtype));
    std::size_t const q_row =
        static_cast<std::size_t>(config_.shape.num_q_heads) * config_.shape.head_dim * elem;
    std::size_t const kv_row =
        static_cast<std::size_t>(config_.shape.num_kv_heads) * config_.shape.head_dim * elem;
    if (q_row % 16 != 0) {  // every token's out row must stay 16-byte aligned
      for (int t = 0; t < num_tokens; ++t) {
        if (!aligned16(static_cast<unsigned char*>(out) + t * q_row)) {
          return Status::kErrorInvalidArgument;
        }
      }
    }
    KVC_RETURN_IF_ERROR(detail::write_slots_async(prefill_slot_, &seq, 1, stream));
    auto const* qb = static_cast<unsigned char const*>(q);
    auto const* kb = static_cast<unsigned char const*>(k);
    auto const* vb = static_cast<unsigned char const*>(v);
    auto* ob = static_cast<unsigned char*>(out);
    for (int t = 0; t < num_tokens; ++t) {
      KVC_RETURN_IF_ERROR(store_.prepare_decode_step(prefill_slot_, 1, stream));
      std::size_t const tt = static_cast<std::size_t>(t);
      KVC_RETURN_IF_ERROR(run_layer(layer, qb + tt * q_row, kb + tt * kv_row, vb + tt * kv_row,
                                    ob + tt * q_row,
                                    lse == nullptr ? nullptr : lse + tt * config_.shape.num_q_heads,
                                    prefill_slot_, 1, stream));
    }
    return publish_report(1, stream);
  }

  //! Enqueues the accounting on `stream` into caller memory (pinned host memory keeps it
  //! asynchronous): `stats` (one StoreStats), `slots` [num_layers, max_seqs, num_kv_heads] int32
  //! slots kept, `tokens` [num_layers, max_seqs] int64 tokens seen (either may be null). Build a
  //! CacheStats with CacheStats::assign once the stream is past this point. Errors:
  //! kErrorInvalidArgument; kErrorCuda.
  Status stats_async(StoreStats* stats, std::int32_t* slots, std::int64_t* tokens,
                     cudaStream_t stream) const {
    if (!valid() || stats == nullptr) return Status::kErrorInvalidArgument;
    KVC_RETURN_IF_ERROR(store_.stats_async(stats, stream));
    StoreDims const& d = store_.dims();
    std::size_t const rows = static_cast<std::size_t>(d.num_layers) * d.max_seqs;
    if (slots != nullptr) {
      KVC_RETURN_IF_ERROR(detail::cuda_status(
          cudaMemcpyAsync(slots, store_.arrays().lengths, rows * d.num_kv_heads * sizeof(*slots),
                          cudaMemcpyDefault, stream)));
    }
    if (tokens != nullptr) {
      KVC_RETURN_IF_ERROR(detail::cuda_status(cudaMemcpyAsync(
          tokens, store_.arrays().tokens_seen, rows * sizeof(*tokens), cudaMemcpyDefault, stream)));
    }
    return Status::kSuccess;
  }

  //! stats_async into `out`, then synchronises `stream` (blocks). Errors: as stats_async.
  Status stats_sync(CacheStats& out, cudaStream_t stream) const {
    if (!valid()) return Status::kErrorInvalidArgument;
    StoreDims const& d = store_.dims();
    std::size_t const rows = static_cast<std::size_t>(d.num_layers) * d.max_seqs;
    StoreStats stats;
    std::vector<std::int32_t> slots(rows * d.num_kv_heads);
    std::vector<std::int64_t> tokens(rows);
    KVC_RETURN_IF_ERROR(stats_async(&stats, slots.data(), tokens.data(), stream));
    KVC_RETURN_IF_ERROR(detail::cuda_status(cudaStreamSynchronize(stream)));
    out.assign(d.num_layers, d.max_seqs, d.num_kv_heads, stats, slots.data(), tokens.data(),
               static_cast<std::int64_t>(device_bytes_));
    return Status::kSuccess;
  }

 private:
  //! Byte offsets of the arrays in the one device allocation.
  struct Layout {
    PagedStoreConfig store{};
    std::size_t store_bytes = 0;
    std::size_t workspace = 0, workspace_bytes = 0;
    std::size_t q_out = 0, probs = 0, slots = 0, prefill_slot = 0;
    std::size_t total = 0;
    int probs_stride = 0;
  };

  static constexpr std::size_t kAlignment = 256;

  static bool aligned16(void const* pointer) {
    return (reinterpret_cast<std::uintptr_t>(pointer) & 15u) == 0;
  }

  static DecodeParams attention_shape(KVCacheConfig const& config, int batch) {
    DecodeParams params;
    params.dtype = config.dtype;
    params.cache.head_dim = config.shape.head_dim;
    params.cache.num_kv_heads = config.shape.num_kv_heads;
    params.cache.page_size = config.page_size;
    params.cache.max_seqs = config.max_seqs;
    params.batch = batch;
    params.num_q_heads = config.shape.num_q_heads;
    params.scale = config.scale;
    return params;
  }

  static Status plan(KVCacheConfig const& config, Layout& layout) {
    Layout out;
    KVC_RETURN_IF_ERROR(config.to_store_config(out.store));
    ModelShape const& shape = config.shape;
    if (!Attention::supported(config.dtype, shape.head_dim, shape.group_size())) {
      return Status::kErrorNotSupported;
    }
    int const batch = config.batch_capacity();
    KVC_RETURN_IF_ERROR(
        Attention::workspace_size(attention_shape(config, batch), out.workspace_bytes));
    KVC_RETURN_IF_ERROR(PagedStore::required_bytes(out.store, out.store_bytes));
    out.probs_stride = out.store.has_scores() ? out.store.eviction_budget() + 1 : 0;
    std::size_t const rows = static_cast<std::size_t>(batch);
    std::size_t const q_bytes = rows * shape.num_q_heads * shape.head_dim *
                                static_cast<std::size_t>(dtype_size(config.dtype));
    std::size_t offset = detail::align_up(out.store_bytes, kAlignment);
    out.workspace = offset;
    offset = detail::align_up(offset + out.workspace_bytes, kAlignment);
    out.q_out = offset;
    offset = detail::align_up(offset + q_bytes, kAlignment);
    out.probs = offset;
    offset =
        detail::align_up(offset + rows * shape.num_q_heads *
                                      static_cast<std::size_t>(out.probs_stride) * sizeof(float),
                         kAlignment);
    out.slots = offset;
    offset = detail::align_up(offset + rows * sizeof(std::int32_t), kAlignment);
    out.prefill_slot = offset;
    out.total = detail::align_up(offset + sizeof(std::int32_t), kAlignment);
    layout = out;
    return Status::kSuccess;
  }

  Status check_begin(int batch) const {
    if (!valid() || in_step_ || batch < 0 || batch > batch_capacity_) {
      return Status::kErrorInvalidArgument;
    }
    return Status::kSuccess;
  }

  Status open_step(std::int32_t const* device_ids, int batch, cudaStream_t stream) {
    KVC_RETURN_IF_ERROR(store_.prepare_decode_step(device_ids, batch, stream));
    std::fill(layer_done_.begin(), layer_done_.end(), 0);
    step_ids_ = device_ids;
    step_batch_ = batch;
    in_step_ = true;
    return Status::kSuccess;
  }

  Status check_layer_pointers(void const* q, void const* k, void const* v, void const* out,
                              int batch) const {
    if (batch == 0) return Status::kSuccess;
    if (q == nullptr || k == nullptr || v == nullptr || out == nullptr || !aligned16(out)) {
      return Status::kErrorInvalidArgument;
    }
    return Status::kSuccess;
  }

  //! update + attention (+ evict) of one layer for `batch` rows named by `device_ids`. Checks
  //! everything the attention call checks before the update is enqueued.
  Status run_layer(int layer, void const* q, void const* k, void const* v, void* out, float* lse,
                   std::int32_t const* device_ids, int batch, cudaStream_t stream) {
    KVC_RETURN_IF_ERROR(check_layer_pointers(q, k, v, out, batch));
    if (batch == 0) return Status::kSuccess;
    DecodeParams params = attention_shape(config_, batch);
    std::size_t need = 0;
    KVC_RETURN_IF_ERROR(Attention::workspace_size(params, need));
    if (need > workspace_bytes_) return Status::kErrorSizeMismatch;
    return detail::with_storage_type(config_.dtype, [&](auto tag) -> Status {
      using T = typename decltype(tag)::type;
      PagedLayerView<T> view;
      KVC_RETURN_IF_ERROR(store_.template layer_view<T>(layer, view));
      params.cache = erase_element_type(view);
      params.q = q_out_;
      params.seq_slots = device_ids;
      params.out = out;
      params.lse = lse;
      params.workspace = workspace_;
      params.workspace_bytes = workspace_bytes_;
      ScoreHook const hook{probs_, probs_stride_};
      if (probs_ != nullptr) params.scores = hook;
      KVC_RETURN_IF_ERROR(store_.template update<T>(
          layer, static_cast<T const*>(q), static_cast<T const*>(k), static_cast<T const*>(v),
          device_ids, batch, static_cast<T*>(q_out_), stream));
      KVC_RETURN_IF_ERROR(Attention::run(params, stream));
      return store_.evict(layer, hook, device_ids, batch, stream);
    });
  }

  Status publish_report(int batch, cudaStream_t stream) {
    KVC_RETURN_IF_ERROR(store_.copy_step_report_async(report_, row_flags_, batch, stream));
    return detail::cuda_status(cudaEventRecord(event_, stream));
  }

  void release_resources() {
    if (event_ != nullptr) cudaEventDestroy(event_);
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    if (device_ != nullptr) cudaFree(device_);
    event_ = nullptr;
    pinned_ = nullptr;
    device_ = nullptr;
  }

  void swap(BasicKVCache& other) noexcept {
    std::swap(config_, other.config_);
    std::swap(store_config_, other.store_config_);
    std::swap(store_, other.store_);
    std::swap(device_, other.device_);
    std::swap(device_bytes_, other.device_bytes_);
    std::swap(pinned_, other.pinned_);
    std::swap(report_, other.report_);
    std::swap(row_flags_, other.row_flags_);
    std::swap(event_, other.event_);
    std::swap(workspace_, other.workspace_);
    std::swap(workspace_bytes_, other.workspace_bytes_);
    std::swap(q_out_, other.q_out_);
    std::swap(probs_, other.probs_);
    std::swap(probs_stride_, other.probs_stride_);
    std::swap(step_slots_, other.step_slots_);
    std::swap(prefill_slot_, other.prefill_slot_);
    std::swap(batch_capacity_, other.batch_capacity_);
    std::swap(in_step_, other.in_step_);
    std::swap(step_ids_, other.step_ids_);
    std::swap(step_batch_, other.step_batch_);
    std::swap(layer_done_, other.layer_done_);
    std::swap(seen_, other.seen_);
  }

  KVCacheConfig config_{};
  PagedStoreConfig store_config_{};
  PagedStore store_;
  void* device_ = nullptr;  // the one device allocation
  std::size_t device_bytes_ = 0;
  void* pinned_ = nullptr;             // StepReport then row flags [batch_capacity]
  StepReport* report_ = nullptr;       // pinned
  std::int32_t* row_flags_ = nullptr;  // pinned [batch_capacity]
  cudaEvent_t event_ = nullptr;        // recorded after each report copy
  void* workspace_ = nullptr;          // attention workspace
  std::size_t workspace_bytes_ = 0;
  void* q_out_ = nullptr;   // [batch_capacity, num_q_heads, head_dim] dtype
  float* probs_ = nullptr;  // [batch_capacity, num_q_heads, budget + 1] (H2O/TOVA)
  int probs_stride_ = 0;
  std::int32_t* step_slots_ = nullptr;    // [batch_capacity] ids of the step's rows
  std::int32_t* prefill_slot_ = nullptr;  // [1] id of the sequence being prefilled
  int batch_capacity_ = 0;
  bool in_step_ = false;
  std::int32_t const* step_ids_ = nullptr;  // device ids of the open step
  int step_batch_ = 0;
  std::vector<std::uint8_t> layer_done_;  // [num_layers] decoded in the open step
  std::vector<std::uint8_t> seen_;        // [max_seqs] scratch of begin_step's id check
};

//! The facade with the precompiled decode attention (link `kvc_decode_instances`).
using KVCache = BasicKVCache<PrecompiledDecodeAttention>;

}  // namespace kvc
