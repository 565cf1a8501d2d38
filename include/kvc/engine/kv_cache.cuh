//! @file
//! `kvc::KVCache`: the engine-facing facade over the paged store, prefill and decode attention,
//! for users who want one object. It owns its memory (one cudaMalloc at creation for the store,
//! the prefill workspace and every scratch array, one cudaMallocHost for the step report) and
//! runs, per decode step, the store's prepare once and then per layer update + attention (+ evict
//! for H2O/TOVA), and per prefill step the page allocation once and then per layer the parallel
//! prefill of kvc/cache/prefill.cuh, writing the attention output into the caller's buffer. Every
//! call is asynchronous on the caller's stream; only calls named `*_sync` block. Errors are a
//! Status; a call that returns an error has enqueued nothing and changed nothing.
//!
//! @code
//!   kvc::KVCacheConfig config;  // shape, dtype, policy, max_seqs, max_tokens_per_seq, ...
//!   kvc::KVCache cache;
//!   kvc::KVCache::create(config, stream, cache);
//!   int seq; cache.add_sequence(seq, stream);
//!   cache.begin_prefill(&seq, &T, 1, stream);          // or several sequences' chunks at once
//!   for (int l = 0; l < layers; ++l) cache.prefill_layer(l, q, k, v, out, stream);
//!   cache.end_prefill(stream);
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
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "kvc/attention/params.hpp"
#include "kvc/attention/score_hook.hpp"
#include "kvc/cache/paged_store.cuh"
#include "kvc/cache/paged_view.hpp"
#include "kvc/cache/prefill.cuh"
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
//! (`KVCacheConfig`); the template parameters pick the decode-attention and the prefill backends
//! (attention_backend.cuh): `KVCache` uses the precompiled kernels of `kvc_decode_instances` and
//! `kvc_prefill_instances`.
//!
//! Sequence ids are the store's sequence slots, 0..max_seqs-1, handed out by add_sequence.
//!
//! Stream and threading rules: a KVCache is not thread-safe (one host thread at a time). Every
//! call of a decode step (begin_step, decode_layer for each layer, end_step) and of a prefill
//! goes on one stream, or on streams ordered by events; calls that change the cache follow each
//! other in that order. Only `*_sync` calls block; the destructor (cudaFree) synchronises the
//! device, so destroy a cache when its work is done.
template <class Attention, class Prefill = LibraryPrefillAttention>
class BasicKVCache {
  static constexpr bool kDecodePathPrefill = std::is_same_v<Prefill, DecodePathPrefill>;

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
  //! cudaMallocHost), zeroes the device memory and initialises the store on `stream`
  //! (asynchronously). On error `out` is unchanged and nothing stays allocated. A cache `out`
  //! already held is destroyed on success.
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
    cache.prefill_workspace_bytes_ = layout.prefill_workspace_bytes;
    void* device = nullptr;
    KVC_RETURN_IF_ERROR(detail::cuda_status(cudaMalloc(&device, layout.total)));
    cache.device_ = device;
    cache.device_bytes_ = layout.total;
    void* pinned = nullptr;
    int const report_rows = std::max(cache.batch_capacity_, config.max_prefill_seqs);
    std::size_t const pinned_bytes = sizeof(StepReport) + sizeof(std::int32_t) * report_rows;
    KVC_RETURN_IF_ERROR(detail::cuda_status(cudaMallocHost(&pinned, pinned_bytes)));
    cache.pinned_ = pinned;
    cache.report_ = static_cast<StepReport*>(pinned);
    *cache.report_ = StepReport{};
    cache.row_flags_ =
        reinterpret_cast<std::int32_t*>(static_cast<unsigned char*>(pinned) + sizeof(StepReport));
    std::fill(cache.row_flags_, cache.row_flags_ + report_rows, 0);
    KVC_RETURN_IF_ERROR(
        detail::cuda_status(cudaEventCreateWithFlags(&cache.event_, cudaEventDisableTiming)));
    auto* base = static_cast<unsigned char*>(device);
    cache.workspace_ = base + layout.workspace;
    cache.q_out_ = base + layout.q_out;
    cache.probs_ =
        layout.probs_stride > 0 ? reinterpret_cast<float*>(base + layout.probs) : nullptr;
    cache.score_lse_ =
        layout.probs_stride > 0 ? reinterpret_cast<float*>(base + layout.score_lse) : nullptr;
    cache.step_slots_ = reinterpret_cast<std::int32_t*>(base + layout.slots);
    cache.prefill_ids_ = reinterpret_cast<std::int32_t*>(base + layout.prefill_ids);
    cache.prefill_workspace_ = layout.prefill_workspace_bytes > 0
                                   ? static_cast<void*>(base + layout.prefill_workspace)
                                   : nullptr;
    // Everything zeroed once, the pools included (PagedStore::init leaves them alone): no byte
    // is ever read undefined, neither by a refused step's attention (which still runs and reads
    // q_out) nor by a copy of a whole pool (stats, snapshots, compute-sanitizer initcheck).
    KVC_RETURN_IF_ERROR(detail::cuda_status(cudaMemsetAsync(device, 0, layout.total, stream)));
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
  //! True between begin_prefill and end_prefill.
  bool in_prefill() const { return in_prefill_; }

  //! Takes the lowest free sequence id and zeroes its rows on `stream`. Errors:
  //! kErrorInvalidArgument (no cache, or all max_seqs ids in use); kErrorCuda.
  Status add_sequence(int& seq, cudaStream_t stream) { return store_.add_sequence(seq, stream); }

  //! Returns every page of `seq` to the pool on `stream`; the id may be reused. Errors:
  //! kErrorInvalidSequence (unknown or inactive); kErrorInvalidArgument inside a step or a
  //! prefill (their rows must stay valid until end_step / end_prefill); kErrorCuda.
  Status release_sequence(int seq, cudaStream_t stream) {
    if (in_step_ || in_prefill_) return Status::kErrorInvalidArgument;
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
    KVC_RETURN_IF_ERROR(check_distinct_active(seq_ids, batch));
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

  //! Opens a prefill step: row b is a prompt chunk of num_tokens[b] tokens of sequence
  //! seq_ids[b] (host arrays, [batch]; distinct active ids, any order), appended to what that
  //! sequence has cached (the chunk's queries see its cached slots and the chunk causally). The
  //! rows' tokens are packed in row order in every q/k/v/out of the step: row b's tokens are
  //! rows sum(num_tokens[0..b)) ... Enqueues the ids (carried in kernel arguments) and the page
  //! allocation of every layer (one launch). Then prefill_layer(layer, ...) once per layer and
  //! end_prefill. Per policy, the cache and outputs are those of the reference prefill of each
  //! chunk (kvc/reference/layer_cache.hpp `prefill`): Full appends; DMC equals feeding the chunk
  //! token by token; H2O/TOVA attend over the cache and the whole chunk, then cut once to budget.
  //! Errors (nothing enqueued): kErrorInvalidArgument (no cache, a step or prefill already open,
  //! batch outside [1, max_prefill_seqs], null arrays, a repeated id, a chunk of fewer than 1
  //! token, more than max_prefill_tokens tokens in all, or max_prefill_tokens == 0);
  //! kErrorNotSupported (DecodePathPrefill with batch > 1); kErrorInvalidSequence (an inactive
  //! id); kErrorCuda. Whether the pool had the pages is known on the device only (end_prefill).
  Status begin_prefill(int const* seq_ids, int const* num_tokens, int batch, cudaStream_t stream) {
    return open_prefill(seq_ids, num_tokens, batch, -1, stream);
  }

  //! One layer of the open prefill step: RoPE, the policy's prefill (DMC's decisions and partial
  //! means, H2O/TOVA's scores and cut) and the causal attention of every row's chunk. q
  //! [tokens, num_q_heads, head_dim], k and v [tokens, num_kv_heads, head_dim] pre-RoPE, out
  //! [tokens, num_q_heads, head_dim] (16-byte aligned; with DecodePathPrefill every token's row
  //! too), all device memory in the cache's dtype; lse [tokens, num_q_heads] fp32 or null
  //! (tokens = the step's total). Each layer at most once per step. If the step was refused on
  //! the device, nothing is written to the cache and `out` is meaningless.
  //! Errors (nothing enqueued): kErrorInvalidArgument (no open prefill, layer out of range,
  //! already done, or not the layer the step was opened for; null or misaligned pointers);
  //! the prefill's own errors; kErrorCuda.
  Status prefill_layer(int layer, void const* q, void const* k, void const* v, void* out,
                       cudaStream_t stream, float* lse = nullptr) {
    if (!in_prefill_ || layer < 0 || layer >= config_.shape.num_layers ||
        layer_done_[static_cast<std::size_t>(layer)] != 0 ||
        (prefill_only_layer_ >= 0 && layer != prefill_only_layer_)) {
      return Status::kErrorInvalidArgument;
    }
    KVC_RETURN_IF_ERROR(run_prefill_layer(layer, q, k, v, out, lse, stream));
    layer_done_[static_cast<std::size_t>(layer)] = 1;
    return Status::kSuccess;
  }

  //! Closes the prefill step: copies its report (and the rows' flags) to pinned host memory and
  //! records an event, on `stream` (read it with step_status_sync() or poll_step()). Layers not
  //! prefilled in the step did not see the chunks. Errors: kErrorInvalidArgument (no open
  //! prefill); kErrorCuda.
  Status end_prefill(cudaStream_t stream) {
    if (!in_prefill_) return Status::kErrorInvalidArgument;
    KVC_RETURN_IF_ERROR(publish_report(kDecodePathPrefill ? 1 : prefill_chunks_.batch, stream));
    in_prefill_ = false;
    return Status::kSuccess;
  }

  //! Shorthand for a prefill step of one sequence and one layer: begin_prefill({seq},
  //! {num_tokens}) restricted to `layer` (pages are taken for that layer only), prefill_layer,
  //! end_prefill. Call it once per layer with that layer's q/k/v. Outside a step or prefill
  //! only. Errors: as begin_prefill and prefill_layer (nothing enqueued).
  Status prefill_layer(int seq, int layer, int num_tokens, void const* q, void const* k,
                       void const* v, void* out, cudaStream_t stream, float* lse = nullptr) {
    if (!valid() || layer < 0 || layer >= config_.shape.num_layers) {
      return Status::kErrorInvalidArgument;
    }
    // Everything run_prefill_layer checks before it enqueues, checked before the step opens.
    KVC_RETURN_IF_ERROR(check_prefill_pointers(q, k, v, out, num_tokens));
    KVC_RETURN_IF_ERROR(open_prefill(&seq, &num_tokens, 1, layer, stream));
    Status const status = prefill_layer(layer, q, k, v, out, stream, lse);
    if (status != Status::kSuccess) {
      in_prefill_ = false;  // only a launch can fail here: the stream is in error anyway
      return status;
    }
    return end_prefill(stream);
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
    std::size_t q_out = 0, probs = 0, score_lse = 0, slots = 0, prefill_ids = 0;
    std::size_t prefill_workspace = 0, prefill_workspace_bytes = 0;
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
    KVC_RETURN_IF_ERROR(prefill_workspace_size(config, out.store, out.prefill_workspace_bytes));
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
    out.score_lse = offset;  // [rows, num_q_heads] log2 LSE beside the log2 logits (H2O/TOVA)
    offset = detail::align_up(
        offset + (out.probs_stride > 0 ? rows * shape.num_q_heads * sizeof(float) : 0), kAlignment);
    out.slots = offset;
    offset = detail::align_up(offset + rows * sizeof(std::int32_t), kAlignment);
    out.prefill_ids = offset;  // [max_prefill_seqs] ids, then [max_prefill_seqs + 1] cu_tokens
    offset = detail::align_up(
        offset + (2 * static_cast<std::size_t>(config.max_prefill_seqs) + 1) * sizeof(std::int32_t),
        kAlignment);
    out.prefill_workspace = offset;
    out.total = detail::align_up(offset + out.prefill_workspace_bytes, kAlignment);
    layout = out;
    return Status::kSuccess;
  }

  //! Bytes of the parallel prefill's workspace for max_prefill_seqs chunks of max_prefill_tokens
  //! tokens in all (0 with DecodePathPrefill or max_prefill_tokens == 0).
  static Status prefill_workspace_size(KVCacheConfig const& config, PagedStoreConfig const& store,
                                       std::size_t& bytes) {
    bytes = 0;
    if constexpr (kDecodePathPrefill) {
      // H2O/TOVA prefill cuts once over the whole chunk: decode steps would not.
      return store.has_scores() ? Status::kErrorNotSupported : Status::kSuccess;
    } else {
      if (config.max_prefill_tokens == 0) return Status::kSuccess;
      ModelShape const& shape = config.shape;
      if (!Prefill::supported(config.dtype, shape.head_dim, shape.group_size())) {
        return Status::kErrorNotSupported;
      }
      PrefillBatch sizes;
      sizes.batch = config.max_prefill_seqs;
      sizes.total_tokens = config.max_prefill_tokens;
      sizes.max_chunk = config.max_prefill_tokens;
      return detail::with_storage_type(config.dtype, [&](auto tag) -> Status {
        using T = typename decltype(tag)::type;
        return ::kvc::prefill_workspace_size<T, Prefill>(store, sizes, bytes);
      });
    }
  }

  Status check_begin(int batch) const {
    if (!valid() || in_step_ || in_prefill_ || batch < 0 || batch > batch_capacity_) {
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
      // Log2 logits and their LSE: attention writes each slot's score once, and the evict
      // kernel, which reads it anyway, takes the exponential (kvc/attention/score_hook.hpp).
      ScoreHook const hook{probs_, probs_stride_, ScoreForm::kLog2Logits, score_lse_};
      if (probs_ != nullptr) params.scores = hook;
      KVC_RETURN_IF_ERROR(store_.template update<T>(
          layer, static_cast<T const*>(q), static_cast<T const*>(k), static_cast<T const*>(v),
          device_ids, batch, static_cast<T*>(q_out_), stream));
      KVC_RETURN_IF_ERROR(Attention::run(params, stream));
      return store_.evict(layer, hook, device_ids, batch, stream);
    });
  }

  Status check_prefill_pointers(void const* q, void const* k, void const* v, void const* out,
                                int tokens) const {
    KVC_RETURN_IF_ERROR(check_layer_pointers(q, k, v, out, 1));
    // The parallel prefill loads v 16 bytes at a time.
    if (!kDecodePathPrefill) return aligned16(v) ? Status::kSuccess : Status::kErrorInvalidArgument;
    std::size_t const q_row = static_cast<std::size_t>(config_.shape.num_q_heads) *
                              config_.shape.head_dim * dtype_size(config_.dtype);
    if (q_row % 16 == 0) return Status::kSuccess;
    for (int t = 0; t < tokens; ++t) {  // every token's out row is a decode output
      if (!aligned16(static_cast<unsigned char const*>(out) + t * q_row)) {
        return Status::kErrorInvalidArgument;
      }
    }
    return Status::kSuccess;
  }

  //! kErrorInvalidSequence when an id is not active, kErrorInvalidArgument when one repeats
  //! (first failing id wins); host ids [batch].
  Status check_distinct_active(int const* seq_ids, int batch) {
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
    return status;
  }

  //! begin_prefill, for every layer (only_layer < 0) or one.
  Status open_prefill(int const* seq_ids, int const* num_tokens, int batch, int only_layer,
                      cudaStream_t stream) {
    if (!valid() || in_step_ || in_prefill_ || config_.max_prefill_tokens == 0 || batch < 1 ||
        batch > config_.max_prefill_seqs || seq_ids == nullptr || num_tokens == nullptr) {
      return Status::kErrorInvalidArgument;
    }
    if (kDecodePathPrefill && batch > 1) return Status::kErrorNotSupported;
    KVC_RETURN_IF_ERROR(check_distinct_active(seq_ids, batch));
    // [seq_ids | cu_tokens], written to the device in one go.
    std::vector<std::int32_t> ids(static_cast<std::size_t>(2 * batch + 1), 0);
    std::int64_t total = 0;
    int max_chunk = 0;
    for (int b = 0; b < batch; ++b) {
      if (num_tokens[b] < 1) return Status::kErrorInvalidArgument;
      total += num_tokens[b];
      max_chunk = std::max(max_chunk, num_tokens[b]);
      ids[static_cast<std::size_t>(b)] = seq_ids[b];
      ids[static_cast<std::size_t>(batch + b + 1)] =
          static_cast<std::int32_t>(std::min<std::int64_t>(total, INT32_MAX));
    }
    if (!kDecodePathPrefill && total > config_.max_prefill_tokens) {
      return Status::kErrorInvalidArgument;
    }
    KVC_RETURN_IF_ERROR(
        detail::write_slots_async(prefill_ids_, ids.data(), static_cast<int>(ids.size()), stream));
    prefill_chunks_ =
        PrefillBatch{prefill_ids_, prefill_ids_ + batch, batch, static_cast<int>(total), max_chunk};
    if (!kDecodePathPrefill) {
      KVC_RETURN_IF_ERROR(::kvc::prepare_prefill(store_, prefill_chunks_, stream, only_layer));
    }
    std::fill(layer_done_.begin(), layer_done_.end(), 0);
    prefill_only_layer_ = only_layer;
    in_prefill_ = true;
    return Status::kSuccess;
  }

  //! One layer of the open prefill: the store's parallel prefill, or (DecodePathPrefill) the
  //! chunk's tokens one decode step each.
  Status run_prefill_layer(int layer, void const* q, void const* k, void const* v, void* out,
                           float* lse, cudaStream_t stream) {
    int const tokens = prefill_chunks_.total_tokens;
    KVC_RETURN_IF_ERROR(check_prefill_pointers(q, k, v, out, tokens));
    if constexpr (kDecodePathPrefill) {
      std::size_t const elem = static_cast<std::size_t>(dtype_size(config_.dtype));
      std::size_t const q_row =
          static_cast<std::size_t>(config_.shape.num_q_heads) * config_.shape.head_dim * elem;
      std::size_t const kv_row =
          static_cast<std::size_t>(config_.shape.num_kv_heads) * config_.shape.head_dim * elem;
      auto const* qb = static_cast<unsigned char const*>(q);
      auto const* kb = static_cast<unsigned char const*>(k);
      auto const* vb = static_cast<unsigned char const*>(v);
      auto* ob = static_cast<unsigned char*>(out);
      for (int t = 0; t < tokens; ++t) {
        KVC_RETURN_IF_ERROR(store_.prepare_decode_step(prefill_ids_, 1, stream));
        std::size_t const tt = static_cast<std::size_t>(t);
        KVC_RETURN_IF_ERROR(
            run_layer(layer, qb + tt * q_row, kb + tt * kv_row, vb + tt * kv_row, ob + tt * q_row,
                      lse == nullptr ? nullptr : lse + tt * config_.shape.num_q_heads, prefill_ids_,
                      1, stream));
      }
      return Status::kSuccess;
    } else {
      return detail::with_storage_type(config_.dtype, [&](auto tag) -> Status {
        using T = typename decltype(tag)::type;
        return ::kvc::prefill_layer<T, Prefill>(
            store_, layer, static_cast<T const*>(q), static_cast<T const*>(k),
            static_cast<T const*>(v), prefill_chunks_, static_cast<T*>(out), lse,
            prefill_workspace_, prefill_workspace_bytes_, stream);
      });
    }
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
    std::swap(score_lse_, other.score_lse_);
    std::swap(probs_stride_, other.probs_stride_);
    std::swap(step_slots_, other.step_slots_);
    std::swap(prefill_ids_, other.prefill_ids_);
    std::swap(prefill_workspace_, other.prefill_workspace_);
    std::swap(prefill_workspace_bytes_, other.prefill_workspace_bytes_);
    std::swap(in_prefill_, other.in_prefill_);
    std::swap(prefill_chunks_, other.prefill_chunks_);
    std::swap(prefill_only_layer_, other.prefill_only_layer_);
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
  float* score_lse_ = nullptr;  // [batch_capacity, num_q_heads] (H2O/TOVA)
  int probs_stride_ = 0;
  std::int32_t* step_slots_ = nullptr;    // [batch_capacity] ids of the step's rows
  std::int32_t* prefill_ids_ = nullptr;   // [max_prefill_seqs] ids, [max_prefill_seqs + 1] cu
  void* prefill_workspace_ = nullptr;     // the parallel prefill's workspace
  std::size_t prefill_workspace_bytes_ = 0;
  int batch_capacity_ = 0;
  bool in_step_ = false;
  std::int32_t const* step_ids_ = nullptr;  // device ids of the open step
  int step_batch_ = 0;
  bool in_prefill_ = false;
  PrefillBatch prefill_chunks_{};         // the open prefill's rows (device arrays in prefill_ids_)
  int prefill_only_layer_ = -1;           // the one layer the open prefill prepared, or -1: all
  std::vector<std::uint8_t> layer_done_;  // [num_layers] decoded in the open step
  std::vector<std::uint8_t> seen_;        // [max_seqs] scratch of check_distinct_active
};

//! The facade with the precompiled decode and prefill attention (link `kvc_decode_instances` and
//! `kvc_prefill_instances`).
using KVCache = BasicKVCache<PrecompiledDecodeAttention, LibraryPrefillAttention>;

}  // namespace kvc
