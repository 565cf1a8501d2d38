//! @file
//! The GPU paged KV store: one pool of fixed-size pages per model, a page list and a length per
//! (layer, sequence, KV head), the policy state (DMC running sums, H2O/TOVA scores, positions),
//! a device free-page stack, and the host bookkeeping of sequence slots. CUB-like: the caller
//! provides one device buffer (size query first), every call takes the stream last, nothing is
//! allocated and nothing synchronises unless its name ends in `_sync`.
//!
//! A decode step (all layers, any batch of active sequences, rows in any order):
//! @code
//!   store.prepare_decode_step(seq_slots, batch, stream);         // 1 launch for all layers
//!   for (int layer = 0; layer < num_layers; ++layer) {
//!     store.update(layer, q, k, v, seq_slots, batch, q_out, stream);  // 1 launch
//!     /* decode attention with q_out over store.layer_view<T>(layer), writing probabilities
//!        into a ScoreHook for H2O/TOVA */
//!     store.evict(layer, hook, seq_slots, batch, stream);          // H2O/TOVA: 1 launch
//!   }
//!   store.copy_step_report_async(&pinned_report, pinned_flags, batch, stream);
//!   // later, when the host synchronises anyway: step_status(pinned_report)
//! @endcode
//! A step that cannot get its pages is refused as a whole: the report says kErrorOutOfPages
//! (and which rows), every later kernel of the step writes nothing, and every cache and policy
//! state stays as it was. Release sequences and run the step again. See docs/paged_store.md.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "kvc/attention/score_hook.hpp"
#include "kvc/cache/detail/allocator_kernels.cuh"
#include "kvc/cache/detail/evict_kernel.cuh"
#include "kvc/cache/detail/update_kernel.cuh"
#include "kvc/cache/paged_view.hpp"
#include "kvc/cache/step_report.hpp"
#include "kvc/cache/store_config.hpp"
#include "kvc/cache/store_layout.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

namespace detail {
//! kSuccess, or kErrorCuda (and the error cleared) when the last launch or call failed.
inline Status last_cuda_status() {
  return cudaGetLastError() == cudaSuccess ? Status::kSuccess : Status::kErrorCuda;
}
inline Status cuda_status(cudaError_t error) {
  if (error == cudaSuccess) return Status::kSuccess;
  cudaGetLastError();  // clear it
  return Status::kErrorCuda;
}
}  // namespace detail

//! The paged KV store of one model. Move-only (it is the one host bookkeeper of its device
//! state). Every method returns a Status; on error nothing (host or device state) is changed.
class PagedStore {
 public:
  PagedStore() = default;
  PagedStore(PagedStore const&) = delete;
  PagedStore& operator=(PagedStore const&) = delete;
  //! Moves the bookkeeping; the source is left uninitialised.
  PagedStore(PagedStore&& other) noexcept { *this = std::move(other); }
  PagedStore& operator=(PagedStore&& other) noexcept {
    if (this != &other) {
      config_ = other.config_;
      arrays_ = other.arrays_;
      dims_ = other.dims_;
      active_ = std::move(other.active_);
      num_active_ = other.num_active_;
      initialized_ = other.initialized_;
      other.active_.clear();
      other.num_active_ = 0;
      other.initialized_ = false;
    }
    return *this;
  }

  //! Size query: the bytes of device memory a store with `config` needs (any alignment).
  //! Returns the config's validation error, if any.
  static Status required_bytes(PagedStoreConfig const& config, std::size_t& bytes) {
    StoreLayout layout;
    KVC_RETURN_IF_ERROR(compute_store_layout(config, layout));
    bytes = layout.bytes;
    return Status::kSuccess;
  }

  //! Carves every array from `device_memory` (`bytes` long, at least `required_bytes`), zeroes
  //! the metadata and fills the free stack, asynchronously on `stream`. The pools are not
  //! touched. Errors: the config's validation error; kErrorInvalidArgument for a null buffer;
  //! kErrorSizeMismatch for a buffer that is too small; kErrorCuda. A store may be re-initialised
  //! (every sequence is dropped).
  Status init(PagedStoreConfig const& config, void* device_memory, std::size_t bytes,
              cudaStream_t stream) {
    StoreLayout layout;
    KVC_RETURN_IF_ERROR(compute_store_layout(config, layout));
    if (device_memory == nullptr) return Status::kErrorInvalidArgument;
    if (bytes < layout.bytes) return Status::kErrorSizeMismatch;
    auto const address = reinterpret_cast<std::uintptr_t>(device_memory);
    auto const aligned = (address + kStoreAlignment - 1) / kStoreAlignment * kStoreAlignment;
    auto* base = reinterpret_cast<unsigned char*>(aligned);
    StoreArrays const arrays = carve_store_arrays(config, layout, base);
    StoreDims const dims = StoreDims::of(config);

    KVC_RETURN_IF_ERROR(detail::cuda_status(cudaMemsetAsync(
        base + layout.metadata_begin, 0, layout.metadata_end - layout.metadata_begin, stream)));
    std::size_t const table_bytes = static_cast<std::size_t>(dims.num_layers) * dims.max_seqs *
                                    dims.num_kv_heads * dims.max_pages_per_head *
                                    sizeof(std::int32_t);
    KVC_RETURN_IF_ERROR(
        detail::cuda_status(cudaMemsetAsync(arrays.page_table, 0xff, table_bytes, stream)));
    int const needed =
        (config.num_pages + detail::kAllocatorThreads - 1) / detail::kAllocatorThreads;
    int const blocks = std::min(needed, 1024);
    detail::fill_free_stack_kernel<<<blocks, detail::kAllocatorThreads, 0, stream>>>(
        arrays, config.num_pages);
    KVC_RETURN_IF_ERROR(detail::last_cuda_status());
    config_ = config;
    arrays_ = arrays;
    dims_ = dims;
    active_.assign(static_cast<std::size_t>(config.max_seqs), 0);
    num_active_ = 0;
    initialized_ = true;
    return Status::kSuccess;
  }

  bool initialized() const { return initialized_; }
  PagedStoreConfig const& config() const { return config_; }
  //! Device pointers to every array (for kernels, tests and debugging).
  StoreArrays const& arrays() const { return arrays_; }
  //! The arrays a step's kernels use: the store's, with the step report and row flags taken
  //! from `context` when it is not null.
  //! kErrorInvalidArgument for a context with a null array (null context: kSuccess).
  static Status check_context(StepContext const* context) {
    if (context != nullptr && (context->report == nullptr || context->row_flags == nullptr ||
                               context->row_short == nullptr)) {
      return Status::kErrorInvalidArgument;
    }
    return Status::kSuccess;
  }

  StoreArrays step_arrays(StepContext const* context) const {
    StoreArrays arrays = arrays_;
    if (context != nullptr) {
      arrays.report = context->report;
      arrays.row_flags = context->row_flags;
      arrays.row_short = context->row_short;
    }
    return arrays;
  }

  //! Device bytes of one extra StepContext for a store of `config` (report and two [max_seqs]
  //! int32 arrays, plus alignment slack).
  static std::size_t step_context_bytes(PagedStoreConfig const& config) {
    return StepContextLayout::of(config).end + kStoreAlignment - 1;
  }

  //! Carves a StepContext out of `device_memory` (at least step_context_bytes bytes) and zeroes
  //! it on `stream`. Use one context per stream that runs steps concurrently with other streams;
  //! see the stream rules of docs/paged_store.md. Errors: kErrorInvalidArgument (store not
  //! initialised, null memory); kErrorSizeMismatch (too few bytes); kErrorCuda.
  Status init_step_context(void* device_memory, std::size_t bytes, StepContext& out,
                           cudaStream_t stream) const {
    if (!initialized_ || device_memory == nullptr) return Status::kErrorInvalidArgument;
    if (bytes < step_context_bytes(config_)) return Status::kErrorSizeMismatch;
    StepContextLayout const layout = StepContextLayout::of(config_);
    auto const address = reinterpret_cast<std::uintptr_t>(device_memory);
    auto* base = reinterpret_cast<unsigned char*>((address + kStoreAlignment - 1) /
                                                  kStoreAlignment * kStoreAlignment);
    KVC_RETURN_IF_ERROR(detail::cuda_status(cudaMemsetAsync(base, 0, layout.end, stream)));
    StepContext context;
    context.report = reinterpret_cast<StepReport*>(base + layout.report);
    context.row_flags = reinterpret_cast<std::int32_t*>(base + layout.row_flags);
    context.row_short = reinterpret_cast<std::int32_t*>(base + layout.row_short);
    out = context;
    return Status::kSuccess;
  }
  StoreDims const& dims() const { return dims_; }
  //! True when `slot` holds a sequence.
  bool is_active(int slot) const {
    return initialized_ && slot >= 0 && slot < config_.max_seqs &&
           active_[static_cast<std::size_t>(slot)] != 0;
  }
  int num_active() const { return num_active_; }

  //! Takes the lowest free sequence slot and zeroes its rows (lengths, page tables, DMC state,
  //! tokens seen) on `stream`. Errors: kErrorInvalidArgument when the store is not initialised or
  //! all max_seqs slots are in use; kErrorCuda.
  Status add_sequence(int& slot, cudaStream_t stream) {
    if (!initialized_) return Status::kErrorInvalidArgument;
    int free_slot = -1;
    for (int s = 0; s < config_.max_seqs && free_slot < 0; ++s) {
      if (active_[static_cast<std::size_t>(s)] == 0) free_slot = s;
    }
    if (free_slot < 0) return Status::kErrorInvalidArgument;
    KVC_RETURN_IF_ERROR(launch_reset(free_slot, 1, stream));
    active_[static_cast<std::size_t>(free_slot)] = 1;
    ++num_active_;
    slot = free_slot;
    return Status::kSuccess;
  }

  //! Returns every page of `slot` (all layers and KV heads, spare pages included) to the free
  //! stack and zeroes its rows, on `stream`. Errors: kErrorInvalidSequence for a slot that is
  //! out of range or not active (or a store not initialised); kErrorCuda.
  Status release_sequence(int slot, cudaStream_t stream) {
    if (!is_active(slot)) return Status::kErrorInvalidSequence;
    KVC_RETURN_IF_ERROR(launch_reset(slot, 0, stream));
    active_[static_cast<std::size_t>(slot)] = 0;
    --num_active_;
    return Status::kSuccess;
  }

  //! Starts a decode step: for every (layer, KV head) of the sequences in `seq_slots` (device,
  //! [batch], distinct active slots in any order) whose capacity is below length + 1, takes a page
  //! from the free stack; records the step's positions; writes the step report. One launch, no
  //! synchronisation. The step's status is only known on the device: read it with
  //! copy_step_report_async / step_status_sync (kErrorOutOfPages, kErrorInvalidSequence).
  //! `context` (optional, also for every later call of the step): where the step keeps its
  //! report (StepContext; null: the store's own).
  //! Host errors: kErrorInvalidArgument (not initialised, batch < 0 or > max_seqs, null slots,
  //! a context with null arrays); kErrorCuda.
  Status prepare_decode_step(std::int32_t const* seq_slots, int batch, cudaStream_t stream,
                             StepContext const* context = nullptr) {
    KVC_RETURN_IF_ERROR(check_batch(seq_slots, batch));
    KVC_RETURN_IF_ERROR(check_context(context));
    StoreArrays const arrays = step_arrays(context);
    if (batch == 0) {
      return detail::cuda_status(cudaMemsetAsync(arrays.report, 0, sizeof(StepReport), stream));
    }
    detail::PrepareParams params;
    params.arrays = arrays;
    params.dims = dims_;
    params.seq_slots = seq_slots;
    params.batch = batch;
    params.rope = config_.rope;
    detail::prepare_step_kernel<<<batch, detail::kPrepareThreads, 0, stream>>>(params);
    return detail::last_cuda_status();
  }

  //! Writes the step's token of layer `layer` into the cache for every batch row (one launch) and
  //! the q attention must use into `q_out`. q [batch, num_q_heads, head_dim], k and v [batch,
  //! num_kv_heads, head_dim] pre-RoPE, all device memory in the store's dtype; `seq_slots` and
  //! `batch` as given to the step's prepare_decode_step. Writes nothing if the step failed.
  //! Errors: kErrorInvalidArgument (not initialised, T is not the store's dtype, layer or batch
  //! out of range, null pointers); kErrorNotSupported (DMC shared memory above 48 KiB); kErrorCuda.
  template <class T>
  Status update(int layer, T const* q, T const* k, T const* v, std::int32_t const* seq_slots,
                int batch, T* q_out, cudaStream_t stream, StepContext const* context = nullptr) {
    KVC_RETURN_IF_ERROR(check_batch(seq_slots, batch));
    KVC_RETURN_IF_ERROR(check_context(context));
    if (DTypeTraits<T>::kDType != config_.dtype || layer < 0 || layer >= dims_.num_layers) {
      return Status::kErrorInvalidArgument;
    }
    if (batch > 0 && (q == nullptr || k == nullptr || v == nullptr || q_out == nullptr)) {
      return Status::kErrorInvalidArgument;
    }
    if (batch == 0) return Status::kSuccess;
    detail::UpdateParams<T> params;
    params.arrays = step_arrays(context);
    params.dims = dims_;
    params.q = q;
    params.k = k;
    params.v = v;
    params.q_out = q_out;
    params.seq_slots = seq_slots;
    params.batch = batch;
    params.layer = layer;
    params.rope = config_.rope;
    params.dmc = config_.policy.dmc;
    dim3 const grid(static_cast<unsigned>(dims_.num_kv_heads), static_cast<unsigned>(batch));
    int const threads = detail::update_threads(dims_.head_dim);
    if (config_.policy.kind == PolicyKind::kDmc) {
      std::size_t const smem = detail::update_shared_bytes<detail::DmcUpdate>(dims_);
      if (smem > 48 * 1024) return Status::kErrorNotSupported;
      detail::update_kernel<detail::DmcUpdate, T><<<grid, threads, smem, stream>>>(params);
    } else {
      detail::update_kernel<detail::AppendUpdate, T><<<grid, threads, 0, stream>>>(params);
    }
    return detail::last_cuda_status();
  }

  //! H2O/TOVA, after the layer's attention: folds the probabilities of `scores` (in either
  //! ScoreForm) into the slot scores and evicts one slot per (sequence, KV head) (TOVA: per
  //! sequence) that is over budget, the newcomer taking the victim's slot. One launch. A no-op
  //! returning kSuccess for Full and DMC. Writes nothing if the step failed. Errors:
  //! kErrorInvalidArgument (not initialised, layer or batch out of range, null pointers,
  //! scores.stride < budget + 1, an unknown form, kLog2Logits without lse); kErrorCuda.
  Status evict(int layer, ScoreHook const& scores, std::int32_t const* seq_slots, int batch,
               cudaStream_t stream, StepContext const* context = nullptr) {
    KVC_RETURN_IF_ERROR(check_batch(seq_slots, batch));
    KVC_RETURN_IF_ERROR(check_context(context));
    if (layer < 0 || layer >= dims_.num_layers) return Status::kErrorInvalidArgument;
    if (!config_.has_scores()) return Status::kSuccess;
    if (batch > 0 && (!scores.enabled() || scores.stride < config_.eviction_budget() + 1 ||
                      !scores.form_complete())) {
      return Status::kErrorInvalidArgument;
    }
    if (batch == 0) return Status::kSuccess;
    detail::EvictParams params;
    params.arrays = step_arrays(context);
    params.dims = dims_;
    params.scores = scores;
    params.seq_slots = seq_slots;
    params.batch = batch;
    params.layer = layer;
    params.elem_bytes = dtype_size(config_.dtype);
    params.h2o = config_.policy.h2o;
    params.tova = config_.policy.tova;
    if (config_.policy.kind == PolicyKind::kH2O) {
      dim3 const grid(static_cast<unsigned>(dims_.num_kv_heads), static_cast<unsigned>(batch));
      detail::evict_kernel<detail::H2OEvict>
          <<<grid, detail::H2OEvict::kThreads, 0, stream>>>(params);
    } else {
      dim3 const grid(1u, static_cast<unsigned>(batch));
      detail::evict_kernel<detail::TovaEvict>
          <<<grid, detail::TovaEvict::kThreads, 0, stream>>>(params);
    }
    return detail::last_cuda_status();
  }

  //! Copies the last step's report (and, if `row_flags` is not null, the flags of its first
  //! `batch` rows, StepRowFlag bits) to caller memory (host or device; pinned host memory keeps
  //! the copy asynchronous). Read it after the stream reaches this point; step_status() turns it
  //! into a Status. Errors: kErrorInvalidArgument; kErrorCuda.
  Status copy_step_report_async(StepReport* report, std::int32_t* row_flags, int batch,
                                cudaStream_t stream, StepContext const* context = nullptr) const {
    if (!initialized_ || report == nullptr || batch < 0 || batch > config_.max_seqs) {
      return Status::kErrorInvalidArgument;
    }
    KVC_RETURN_IF_ERROR(check_context(context));
    StoreArrays const arrays = step_arrays(context);
    KVC_RETURN_IF_ERROR(detail::cuda_status(
        cudaMemcpyAsync(report, arrays.report, sizeof(StepReport), cudaMemcpyDefault, stream)));
    if (row_flags != nullptr && batch > 0) {
      KVC_RETURN_IF_ERROR(detail::cuda_status(cudaMemcpyAsync(
          row_flags, arrays.row_flags, sizeof(std::int32_t) * batch, cudaMemcpyDefault, stream)));
    }
    return Status::kSuccess;
  }

  //! Synchronises `stream` (this call blocks) and returns the status of the last step:
  //! kSuccess, kErrorOutOfPages, kErrorInvalidSequence, kErrorInternal (see step_status), or
  //! kErrorInvalidArgument / kErrorCuda for the call itself. `report` (optional) gets the report.
  Status step_status_sync(cudaStream_t stream, StepReport* report = nullptr,
                          StepContext const* context = nullptr) const {
    StepReport host;
    KVC_RETURN_IF_ERROR(copy_step_report_async(&host, nullptr, 0, stream, context));
    KVC_RETURN_IF_ERROR(detail::cuda_status(cudaStreamSynchronize(stream)));
    if (report != nullptr) *report = host;
    return step_status(host);
  }

  //! Sums the accounting on the device (one single-block launch) and copies it to `stats`
  //! (host or device memory). Errors: kErrorInvalidArgument; kErrorCuda.
  Status stats_async(StoreStats* stats, cudaStream_t stream) const {
    if (!initialized_ || stats == nullptr) return Status::kErrorInvalidArgument;
    detail::stats_kernel<<<1, 1024, 0, stream>>>(arrays_, dims_, dtype_size(config_.dtype));
    KVC_RETURN_IF_ERROR(detail::last_cuda_status());
    return detail::cuda_status(
        cudaMemcpyAsync(stats, arrays_.stats, sizeof(StoreStats), cudaMemcpyDefault, stream));
  }

  //! stats_async, then synchronises `stream` (this call blocks).
  Status stats_sync(StoreStats& stats, cudaStream_t stream) const {
    StoreStats host;
    KVC_RETURN_IF_ERROR(stats_async(&host, stream));
    KVC_RETURN_IF_ERROR(detail::cuda_status(cudaStreamSynchronize(stream)));
    stats = host;
    return Status::kSuccess;
  }

  //! The view attention kernels read for layer `layer`. Errors: kErrorInvalidArgument (not
  //! initialised, T is not the store's dtype, layer out of range).
  template <class T>
  Status layer_view(int layer, PagedLayerView<T>& view) const {
    if (!initialized_ || DTypeTraits<T>::kDType != config_.dtype || layer < 0 ||
        layer >= dims_.num_layers) {
      return Status::kErrorInvalidArgument;
    }
    std::int64_t const heads = static_cast<std::int64_t>(dims_.max_seqs) * dims_.num_kv_heads;
    PagedLayerView<T> out;
    out.k_pages = static_cast<T*>(arrays_.k_pages);
    out.v_pages = static_cast<T*>(arrays_.v_pages);
    out.score_pages = arrays_.score_pages;
    out.position_pages = arrays_.position_pages;
    out.page_table = arrays_.page_table + layer * heads * dims_.max_pages_per_head;
    out.lengths = arrays_.lengths + layer * heads;
    out.page_size = dims_.page_size;
    out.head_dim = dims_.head_dim;
    out.num_kv_heads = dims_.num_kv_heads;
    out.max_pages_per_head = dims_.max_pages_per_head;
    out.max_seqs = dims_.max_seqs;
    view = out;
    return Status::kSuccess;
  }

 private:
  Status check_batch(std::int32_t const* seq_slots, int batch) const {
    if (!initialized_ || batch < 0 || batch > config_.max_seqs)
      return Status::kErrorInvalidArgument;
    if (batch > 0 && seq_slots == nullptr) return Status::kErrorInvalidArgument;
    return Status::kSuccess;
  }

  //! Offsets of a StepContext's arrays from its aligned base (each kStoreAlignment-aligned).
  struct StepContextLayout {
    std::size_t report = 0, row_flags = 0, row_short = 0, end = 0;
    static StepContextLayout of(PagedStoreConfig const& config) {
      StepContextLayout layout;
      std::uint64_t const rows = static_cast<std::uint64_t>(config.max_seqs);
      detail::LayoutBuilder builder;  // max_seqs <= kStoreMaxSeqs: cannot overflow
      builder.add(layout.report, 1, sizeof(StepReport));
      builder.add(layout.row_flags, rows, sizeof(std::int32_t));
      builder.add(layout.row_short, rows, sizeof(std::int32_t));
      layout.end = builder.end();
      return layout;
    }
  };

  Status launch_reset(int slot, int active, cudaStream_t stream) const {
    detail::ResetParams params;
    params.arrays = arrays_;
    params.dims = dims_;
    params.seq = slot;
    params.active = active;
    detail::reset_sequence_kernel<<<dims_.num_layers, detail::kAllocatorThreads, 0, stream>>>(
        params);
    return detail::last_cuda_status();
  }

  PagedStoreConfig config_{};
  StoreArrays arrays_{};
  StoreDims dims_{};
  std::vector<std::uint8_t> active_;
  int num_active_ = 0;
  bool initialized_ = false;
};

}  // namespace kvc
