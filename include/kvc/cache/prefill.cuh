//! @file
//! Parallel prefill of the GPU paged store for every policy (Full, DMC, H2O, TOVA; GQA is a
//! shape): a batch of prompt chunks of different lengths, each the first chunk of its sequence or
//! appended to what is cached, leaves the cache and the policy state where token-by-token feeding
//! (DMC) or the reference prefill (kvc/reference/*_prefill) would. CUB-like: a workspace-size
//! query, caller-owned memory, every call on the caller's stream, nothing allocated, nothing
//! synchronised.
//!
//! A prefill step (all layers, one batch of chunks; rows name distinct active sequences):
//! @code
//!   kvc::PrefillBatch chunks{seq_slots, cu_tokens, batch, total_tokens, max_chunk};
//!   std::size_t bytes = 0;
//!   kvc::prefill_workspace_size<T>(store, chunks, bytes);            // once per shape
//!   kvc::prepare_prefill(store, chunks, stream);                       // 1 launch, all layers
//!   for (int layer = 0; layer < num_layers; ++layer) {
//!     kvc::prefill_layer<T>(store, layer, q, k, v, chunks, out, lse, workspace, bytes, stream);
//!   }                                          // per layer: prepare, attention, commit
//!   store.copy_step_report_async(&pinned_report, pinned_flags, batch, stream);
//! @endcode
//! A prefill that cannot get its pages is refused as a whole (the step report says
//! kErrorOutOfPages, or kErrorInvalidSequence for a bad slot or chunk length) and changes nothing
//! in the store; `out` and `lse` are then meaningless. See docs/prefill.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include <cuda_runtime.h>

#include "kvc/attention/prefill_api.cuh"
#include "kvc/attention/prefill_params.hpp"
#include "kvc/cache/detail/prefill_kernels.cuh"
#include "kvc/cache/paged_store.cuh"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

//! The chunks of one prefill step: device arrays and the sizes the host knows.
struct PrefillBatch {
  std::int32_t const* seq_slots = nullptr;  //!< [batch] distinct active sequence slots (device)
  std::int32_t const* cu_tokens = nullptr;  //!< [batch + 1] row b = packed tokens
                                            //!< cu_tokens[b] .. cu_tokens[b + 1] - 1 (device)
  int batch = 0;                            //!< rows (chunks); 0 is a no-op
  int total_tokens = 0;                     //!< rows of the packed q/k/v/out; >= cu_tokens[batch]
  int max_chunk = 0;  //!< >= every chunk length (sizes the grids and the score rows)
};

//! The prefill attention of kvc_prefill_instances (link it). Any type with the same static
//! functions (e.g. `PrefillAttention<Variant, T, kHeadDim, kGroupSize>` from
//! kvc/attention/prefill.cuh, header-only; `supported` is only asked for by KVCache) can
//! replace it.
struct LibraryPrefillAttention {
  static bool supported(DType dtype, int head_dim, int group_size) {
    return prefill_attention_supported(dtype, head_dim, group_size);
  }
  static Status workspace_size(PrefillParams const& params, std::size_t& bytes) {
    return prefill_attention_workspace_size(params, bytes);
  }
  static Status run(PrefillParams const& params, cudaStream_t stream) {
    return prefill_attention(params, stream);
  }
};

namespace detail {

//! Byte offsets of the prefill workspace (each array aligned to 256 bytes).
struct PrefillLayout {
  std::size_t q_att = 0, k_att = 0, v_att = 0, rope = 0, merge = 0, visible = 0, omega = 0;
  std::size_t prefix = 0, arrivals = 0, row_first = 0, seed_k = 0, seed_v = 0, seed_w = 0,
              probs = 0, cand_score = 0;
  std::size_t cand_key = 0, cand_rank = 0, stage_k = 0, stage_v = 0, stage_pos = 0;
  std::size_t stage_score = 0, attention = 0;
  std::size_t attention_bytes = 0;
  std::size_t bytes = 0;  //!< total, plus alignment slack for an unaligned base
  int stride = 0;         //!< score row stride (budget + max chunk) for H2O/TOVA
};

//! kSuccess when a store of `config`, the dtype and the batch description can be prefilled.
template <class T>
Status check_prefill(PagedStoreConfig const& config, PrefillBatch const& chunks) {
  if (DTypeTraits<T>::kDType != config.dtype) return Status::kErrorInvalidArgument;
  if (chunks.batch < 0 || chunks.batch > config.max_seqs || chunks.total_tokens < 0 ||
      chunks.max_chunk < 0) {
    return Status::kErrorInvalidArgument;
  }
  if (chunks.batch > 0 && (chunks.total_tokens < 1 || chunks.max_chunk < 1)) {
    return Status::kErrorInvalidArgument;
  }
  int const d = config.shape.head_dim;
  if (d % 2 != 0 || d > kPrefillMaxHeadDim) return Status::kErrorNotSupported;
  if (config.has_scores() &&
      static_cast<std::int64_t>(config.eviction_budget()) + chunks.max_chunk > INT32_MAX / 2) {
    return Status::kErrorInvalidArgument;
  }
  if (config.has_dmc_state() &&
      prefill_prepare_shared_bytes(StoreDims::of(config), config.dmc_window()) > 48 * 1024) {
    return Status::kErrorNotSupported;
  }
  return Status::kSuccess;
}

//! kSuccess when a non-empty batch names its device arrays.
inline Status check_prefill_pointers(PrefillBatch const& chunks) {
  if (chunks.batch > 0 && (chunks.seq_slots == nullptr || chunks.cu_tokens == nullptr)) {
    return Status::kErrorInvalidArgument;
  }
  return Status::kSuccess;
}

//! The attention call of a layer over `view` (workspace left to the caller).
template <class T>
PrefillParams prefill_attention_params(PagedStoreConfig const& config,
                                       PagedLayerView<T> const& view, PrefillBatch const& chunks,
                                       PrefillBuffers const& buf, T const* v, T* out, float* lse) {
  bool const dmc = config.has_dmc_state();
  PrefillParams params = make_prefill_params<T>(
      view, static_cast<T const*>(buf.q_att), static_cast<T const*>(buf.k_att),
      dmc ? static_cast<T const*>(buf.v_att) : v, chunks.cu_tokens, chunks.seq_slots, chunks.batch,
      chunks.total_tokens, config.shape.num_q_heads, out, lse);
  if (dmc) {
    params.prefix_lengths = buf.prefix;
    params.chunk_key_visible = buf.visible;
  }
  if (config.has_scores()) {
    params.scores.probs = buf.probs;
    params.scores.stride = buf.stride;
    params.scores.mode = config.policy.kind == PolicyKind::kH2O ? PrefillScoreMode::kColumnSum
                                                                : PrefillScoreMode::kLastRow;
  }
  return params;
}

//! A view with the shape of a store of `config` and no memory (for size queries).
template <class T>
PagedLayerView<T> shape_only_view(PagedStoreConfig const& config) {
  PagedLayerView<T> view;
  view.page_size = config.page_size;
  view.head_dim = config.shape.head_dim;
  view.num_kv_heads = config.shape.num_kv_heads;
  view.max_pages_per_head = config.max_pages_per_head;
  view.max_seqs = config.max_seqs;
  return view;
}

//! Offsets of every workspace array for `chunks` (attention's share from Attention's query).
template <class T, class Attention>
Status prefill_layout(PagedStoreConfig const& config, PrefillBatch const& chunks,
                      PrefillLayout& out) {
  KVC_RETURN_IF_ERROR(check_prefill<T>(config, chunks));
  using U = std::uint64_t;
  U const n = static_cast<U>(chunks.total_tokens);
  U const b = static_cast<U>(chunks.batch);
  U const hq = static_cast<U>(config.shape.num_q_heads);
  U const hkv = static_cast<U>(config.shape.num_kv_heads);
  U const d = static_cast<U>(config.shape.head_dim);
  U const elem = sizeof(T);
  bool const dmc = config.has_dmc_state();
  bool const scores = config.has_scores();
  U const budget = static_cast<U>(config.eviction_budget());
  PrefillLayout layout;
  layout.stride = scores ? config.eviction_budget() + chunks.max_chunk : 0;
  U const stride = static_cast<U>(layout.stride);
  LayoutBuilder builder;
  builder.add(layout.q_att, n * hq * d, elem);
  builder.add(layout.k_att, n * hkv * d, elem);
  builder.add(layout.v_att, dmc ? n * hkv * d : 0, elem);
  builder.add(layout.rope, dmc ? n * d : 0, sizeof(float));
  builder.add(layout.merge, dmc ? n * hkv : 0, 1);
  builder.add(layout.visible, dmc ? n * hkv : 0, 1);
  builder.add(layout.omega, dmc ? n * hkv : 0, sizeof(float));
  builder.add(layout.prefix, dmc ? b * hkv : 0, sizeof(std::int32_t));
  builder.add(layout.arrivals, dmc ? b * hkv : 0, sizeof(std::int32_t));
  builder.add(layout.row_first, b, sizeof(std::int64_t));
  builder.add(layout.seed_k, dmc ? b * hkv * d : 0, sizeof(float));
  builder.add(layout.seed_v, dmc ? b * hkv * d : 0, sizeof(float));
  builder.add(layout.seed_w, dmc ? b * hkv : 0, sizeof(float));
  builder.add(layout.probs, scores ? b * hq * stride : 0, sizeof(float));
  builder.add(layout.cand_score, scores ? b * hkv * stride : 0, sizeof(float));
  builder.add(layout.cand_key, scores ? b * hkv * stride : 0, sizeof(std::uint64_t));
  builder.add(layout.cand_rank, scores ? b * hkv * stride : 0, sizeof(std::int32_t));
  builder.add(layout.stage_k, scores ? b * hkv * budget * d : 0, elem);
  builder.add(layout.stage_v, scores ? b * hkv * budget * d : 0, elem);
  builder.add(layout.stage_pos, scores ? b * hkv * budget : 0, sizeof(std::int32_t));
  builder.add(layout.stage_score, scores ? b * hkv * budget : 0, sizeof(float));
  if (!builder.ok()) return Status::kErrorInvalidArgument;
  // The attention's share, sized by a call shaped like the real one.
  if (chunks.batch > 0) {
    PrefillBuffers shape_only;
    shape_only.stride = layout.stride;
    shape_only.probs = reinterpret_cast<float*>(kStoreAlignment);  // non-null: scores are on
    if (dmc) shape_only.visible = reinterpret_cast<std::uint8_t*>(kStoreAlignment);  // a mask
    PrefillParams params = prefill_attention_params<T>(config, shape_only_view<T>(config), chunks,
                                                       shape_only, nullptr, nullptr, nullptr);
    if (!scores) params.scores = PrefillScoreHook{};
    KVC_RETURN_IF_ERROR(Attention::workspace_size(params, layout.attention_bytes));
  }
  builder.add(layout.attention, layout.attention_bytes, 1);
  if (!builder.ok()) return Status::kErrorInvalidArgument;
  layout.bytes = builder.end() + kStoreAlignment - 1;
  out = layout;
  return Status::kSuccess;
}

//! Typed pointers into the workspace whose aligned base is `base`.
inline PrefillBuffers carve_prefill_buffers(PrefillLayout const& layout, unsigned char* base,
                                            bool dmc, bool scores) {
  auto at = [base](std::size_t offset) { return static_cast<void*>(base + offset); };
  PrefillBuffers buf;
  buf.q_att = at(layout.q_att);
  buf.k_att = at(layout.k_att);
  buf.row_first = static_cast<std::int64_t*>(at(layout.row_first));
  if (dmc) {
    buf.v_att = at(layout.v_att);
    buf.rope = static_cast<float*>(at(layout.rope));
    buf.merge = static_cast<std::uint8_t*>(at(layout.merge));
    buf.visible = static_cast<std::uint8_t*>(at(layout.visible));
    buf.omega = static_cast<float*>(at(layout.omega));
    buf.prefix = static_cast<std::int32_t*>(at(layout.prefix));
    buf.arrivals = static_cast<std::int32_t*>(at(layout.arrivals));
    buf.seed_k = static_cast<float*>(at(layout.seed_k));
    buf.seed_v = static_cast<float*>(at(layout.seed_v));
    buf.seed_w = static_cast<float*>(at(layout.seed_w));
  }
  if (scores) {
    buf.probs = static_cast<float*>(at(layout.probs));
    buf.stride = layout.stride;
    buf.cand_score = static_cast<float*>(at(layout.cand_score));
    buf.cand_key = static_cast<std::uint64_t*>(at(layout.cand_key));
    buf.cand_rank = static_cast<std::int32_t*>(at(layout.cand_rank));
    buf.stage_k = at(layout.stage_k);
    buf.stage_v = at(layout.stage_v);
    buf.stage_pos = static_cast<std::int32_t*>(at(layout.stage_pos));
    buf.stage_score = static_cast<float*>(at(layout.stage_score));
  }
  return buf;
}

}  // namespace detail

//! @brief Starts a prefill step: for every (layer, KV head) of the rows' sequences, takes from
//! the free stack the pages the chunk may need (Full and DMC: one slot per token, the worst case;
//! H2O/TOVA: up to the budget) and writes the step report. One launch, no synchronisation. The
//! step's status is only on the device (copy_step_report_async / step_status_sync):
//! kErrorOutOfPages (pool dry or a page table full), kErrorInvalidSequence (a slot out of range
//! or released, or a chunk length outside [0, max_chunk] or past total_tokens). A refused step
//! changes nothing (pages already granted stay with their heads as spare capacity).
//! `layer` >= 0 restricts the step to that one layer (then prefill only that layer until the next
//! prepare_prefill); -1, the default, prepares every layer. `context` (optional, the same for
//! every prefill_layer of the step): where the step keeps its report (StepContext).
//! @return kErrorInvalidArgument (store not initialised, bad sizes, null pointers, layer out of
//!         range, a context with a null array); kErrorCuda.
inline Status prepare_prefill(PagedStore& store, PrefillBatch const& chunks, cudaStream_t stream,
                              int layer = -1, StepContext const* context = nullptr) {
  if (!store.initialized() || chunks.batch < 0 || chunks.batch > store.config().max_seqs ||
      chunks.total_tokens < 0 || chunks.max_chunk < 0 || layer < -1 ||
      layer >= store.dims().num_layers) {
    return Status::kErrorInvalidArgument;
  }
  if (chunks.batch > 0 && (chunks.seq_slots == nullptr || chunks.cu_tokens == nullptr)) {
    return Status::kErrorInvalidArgument;
  }
  KVC_RETURN_IF_ERROR(PagedStore::check_context(context));
  StoreArrays const arrays = store.step_arrays(context);
  if (chunks.batch == 0) {
    return detail::cuda_status(cudaMemsetAsync(arrays.report, 0, sizeof(StepReport), stream));
  }
  detail::PrefillAllocParams params;
  params.arrays = arrays;
  params.dims = store.dims();
  params.seq_slots = chunks.seq_slots;
  params.cu_tokens = chunks.cu_tokens;
  params.batch = chunks.batch;
  params.total_tokens = chunks.total_tokens;
  params.max_chunk = chunks.max_chunk;
  params.kind = store.config().policy.kind;
  params.budget = store.config().eviction_budget();
  params.first_layer = layer < 0 ? 0 : layer;
  params.num_layers = layer < 0 ? store.dims().num_layers : 1;
  detail::prefill_allocate_kernel<<<chunks.batch, detail::kPrefillAllocThreads, 0, stream>>>(
      params);
  return detail::last_cuda_status();
}

//! @brief Device bytes of workspace that prefill_layer needs for `chunks` on a store of
//! `config` (only the batch, total_tokens and max_chunk of `chunks` matter, its pointers may be
//! null; any call with sizes at most these fits). Needs no store and no device: size the workspace
//! before the store exists (as KVCache does, to allocate both at once). `config` must be valid
//! (PagedStoreConfig::validate).
//! @return kSuccess; kErrorInvalidArgument (T not the config's dtype, bad sizes);
//!         kErrorNotSupported (head dim odd or above 256, DMC window too large); the attention's
//!         own size-query errors (e.g. kErrorNotSupported for a missing instance).
template <class T, class Attention = LibraryPrefillAttention>
Status prefill_workspace_size(PagedStoreConfig const& config, PrefillBatch const& chunks,
                              std::size_t& bytes) {
  detail::PrefillLayout layout;
  KVC_RETURN_IF_ERROR((detail::prefill_layout<T, Attention>(config, chunks, layout)));
  bytes = layout.bytes;
  return Status::kSuccess;
}

//! @brief prefill_workspace_size for an initialised store's config. Reads no device memory.
//! @return as above, and kErrorInvalidArgument when the store is not initialised.
template <class T, class Attention = LibraryPrefillAttention>
Status prefill_workspace_size(PagedStore const& store, PrefillBatch const& chunks,
                              std::size_t& bytes) {
  if (!store.initialized()) return Status::kErrorInvalidArgument;
  KVC_RETURN_IF_ERROR(detail::check_prefill_pointers(chunks));
  return prefill_workspace_size<T, Attention>(store.config(), chunks, bytes);
}

//! @brief Prefills layer `layer` with the step's chunks, after prepare_prefill: one prepare
//! launch (RoPE of q and k; DMC decisions, omegas, window-truncated partial means, the mask and
//! the prefix lengths; DMC without a window adds one sequential-scan launch), the prefill
//! attention over the cached prefix and the chunk (Attention::run), and one commit launch (the
//! kept slots, DMC's decode state, H2O/TOVA scores and cut, lengths, positions, tokens seen).
//! q [total_tokens, num_q_heads, head_dim], k and v [total_tokens, num_kv_heads, head_dim],
//! pre-RoPE in the store's dtype; out [total_tokens, num_q_heads, head_dim]; lse
//! [total_tokens, num_q_heads] (natural log) or null. Rows of q/k/v/out beyond cu_tokens[batch]
//! are neither read nor written. Nothing is written to the store if the step was refused.
//! @return kErrorInvalidArgument (as prefill_workspace_size, plus layer out of range, null
//!         pointers, v or out not 16-byte aligned, a null workspace); kErrorSizeMismatch (workspace
//!         below the size query); kErrorNotSupported; the attention's errors; kErrorCuda. On any
//!         error nothing is launched after the failing step (all host checks run before the first
//!         launch). `context`: the step's StepContext, as given to prepare_prefill (null: the
//!         store's own).
template <class T, class Attention = LibraryPrefillAttention>
Status prefill_layer(PagedStore& store, int layer, T const* q, T const* k, T const* v,
                     PrefillBatch const& chunks, T* out, float* lse, void* workspace,
                     std::size_t workspace_bytes, cudaStream_t stream,
                     StepContext const* context = nullptr) {
  if (!store.initialized()) return Status::kErrorInvalidArgument;
  KVC_RETURN_IF_ERROR(detail::check_prefill_pointers(chunks));
  detail::PrefillLayout layout;
  KVC_RETURN_IF_ERROR((detail::prefill_layout<T, Attention>(store.config(), chunks, layout)));
  if (layer < 0 || layer >= store.dims().num_layers) return Status::kErrorInvalidArgument;
  if (chunks.batch == 0) return Status::kSuccess;
  if (q == nullptr || k == nullptr || v == nullptr || out == nullptr || workspace == nullptr) {
    return Status::kErrorInvalidArgument;
  }
  if (workspace_bytes < layout.bytes) return Status::kErrorSizeMismatch;
  // What the attention checks before it launches (its kernels load 16 bytes at a time), checked
  // here before the prepare kernel is launched.
  auto aligned16 = [](void const* pointer) {
    return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0;
  };
  if (!aligned16(v) || !aligned16(out)) return Status::kErrorInvalidArgument;
  PagedStoreConfig const& config = store.config();
  bool const dmc = config.has_dmc_state();
  bool const scores = config.has_scores();
  auto const address = reinterpret_cast<std::uintptr_t>(workspace);
  auto* base = reinterpret_cast<unsigned char*>((address + kStoreAlignment - 1) / kStoreAlignment *
                                                kStoreAlignment);
  KVC_RETURN_IF_ERROR(PagedStore::check_context(context));
  detail::PrefillKernelParams<T> params;
  params.arrays = store.step_arrays(context);
  params.dims = store.dims();
  params.q = q;
  params.k = k;
  params.v = v;
  params.seq_slots = chunks.seq_slots;
  params.cu_tokens = chunks.cu_tokens;
  params.batch = chunks.batch;
  params.total_tokens = chunks.total_tokens;
  params.max_chunk = chunks.max_chunk;
  params.layer = layer;
  params.rope = config.rope;
  params.policy = config.policy;
  params.buf = detail::carve_prefill_buffers(layout, base, dmc, scores);

  PagedLayerView<T> view;
  KVC_RETURN_IF_ERROR(store.layer_view<T>(layer, view));
  PrefillParams attention =
      detail::prefill_attention_params<T>(config, view, chunks, params.buf, v, out, lse);
  attention.workspace = base + layout.attention;
  attention.workspace_bytes = layout.attention_bytes;

  dim3 const prepare_grid =
      detail::prefill_prepare_grid(store.dims(), chunks.batch, chunks.max_chunk);
  std::size_t const smem = detail::prefill_prepare_shared_bytes(store.dims(), config.dmc_window());
  if (dmc) {
    detail::prefill_prepare_kernel<T, true>
        <<<prepare_grid, detail::kPrefillThreads, smem, stream>>>(params);
  } else {
    detail::prefill_prepare_kernel<T, false>
        <<<prepare_grid, detail::kPrefillThreads, smem, stream>>>(params);
  }
  KVC_RETURN_IF_ERROR(detail::last_cuda_status());
  dim3 const head_grid(static_cast<unsigned>(store.dims().num_kv_heads),
                       static_cast<unsigned>(chunks.batch));
  params.commit_split =
      detail::prefill_commit_split(store.dims(), chunks.batch, chunks.max_chunk, dmc);
  dim3 const commit_grid(
      head_grid.x, head_grid.y,
      static_cast<unsigned>((chunks.max_chunk + params.commit_split - 1) / params.commit_split));
  if (dmc && config.dmc_window() == 0) {
    int const threads = detail::update_threads(store.dims().head_dim);
    std::size_t const scan_smem = sizeof(float) * static_cast<std::size_t>(store.dims().head_dim);
    detail::prefill_dmc_scan_kernel<T><<<head_grid, threads, scan_smem, stream>>>(params);
    KVC_RETURN_IF_ERROR(detail::last_cuda_status());
  }
  KVC_RETURN_IF_ERROR(Attention::run(attention, stream));
  detail::prefill_commit_kernel<T><<<commit_grid, detail::kPrefillThreads, 0, stream>>>(params);
  return detail::last_cuda_status();
}

}  // namespace kvc
