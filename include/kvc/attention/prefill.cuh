//! @file
//! Prefill attention, header-only: the definitions of PrefillAttention<Variant, T, D, G>
//! (declared in prefill_api.cuh) and `prefill_attention<Variant>`, a runtime dispatcher over every
//! supported (dtype, head dim, group size) for one variant. kvc_prefill_instances precompiles
//! DefaultVariant.
//!
//! One call enqueues, on the caller's stream and nothing else:
//!   0. only with a DMC mask: prefill_compact_kernel (one block per (row, KV head)): the chunk's
//!      visible keys in order, so that attention visits only them (prefill_plan.cuh);
//!   1. prefill_plan_kernel (one block): chunk boundaries and prefix lengths -> cost-ordered work
//!      list of (q tile, key split) items, score units (prefill_plan.cuh);
//!   2. prefill_attention_kernel (persistent, SMs x resident CTAs): attention with split merge
//!      by the last split of a q tile (prefill_kernel.cuh), launched with programmatic dependent
//!      launch so that its launch overlaps the plan kernel;
//!   3. only with a score mode: prefill_score_kernel (prefill_scores.cuh).
#pragma once

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kvc/attention/dispatch.hpp"
#include "kvc/attention/launch.cuh"
#include "kvc/attention/prefill_api.cuh"
#include "kvc/attention/prefill_kernel.cuh"
#include "kvc/attention/prefill_params.hpp"
#include "kvc/attention/prefill_plan.cuh"
#include "kvc/attention/prefill_scores.cuh"
#include "kvc/attention/variant.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

namespace detail {

template <class Variant, class T, int kHeadDim, int kGroupSize>
struct PrefillKernels {
  struct AttentionTag {};
  struct ScoreTag {};
  static Status attention_grid(int& grid) {
    using Traits = PrefillTraits<T, kHeadDim, kGroupSize>;
    return persistent_grid_of<AttentionTag>(
        prefill_attention_kernel<Variant, T, kHeadDim, kGroupSize>, Traits::kThreads,
        Traits::kSmemBytes, grid);
  }
  static Status score_grid(int& grid) {
    using Traits = PrefillScoreTraits<kHeadDim, kGroupSize>;
    return persistent_grid_of<ScoreTag>(prefill_score_kernel<Variant, T, kHeadDim, kGroupSize>,
                                        kPrefillScoreThreads, Traits::kSmemBytes, grid);
  }
};

//! Shape checks shared by the size query and the run.
template <class T, int kHeadDim, int kGroupSize>
Status check_prefill_shape(PrefillParams const& params) {
  PagedLayerView<void const> const& cache = params.cache;
  if (params.dtype != DTypeTraits<T>::kDType) return Status::kErrorNotSupported;
  if (params.batch < 0 || params.total_tokens < 0 || cache.num_kv_heads <= 0 ||
      params.num_q_heads <= 0 || params.num_q_heads % cache.num_kv_heads != 0) {
    return Status::kErrorInvalidShape;
  }
  if (cache.head_dim != kHeadDim || params.group_size() != kGroupSize)
    return Status::kErrorNotSupported;
  if (static_cast<long long>(params.total_tokens) * params.num_q_heads * kHeadDim > (1ll << 40) ||
      static_cast<long long>(params.batch) * cache.num_kv_heads > (1ll << 30)) {
    return Status::kErrorInvalidShape;
  }
  return Status::kSuccess;
}

inline bool prefill_scores_on(PrefillParams const& params) {
  return params.scores.mode != PrefillScoreMode::kNone;
}

//! True when the call compacts the chunk keys of its DMC mask (prefill_plan.cuh): with a mask,
//! unless the variant transforms logits (its slot index is the uncompacted one).
template <class Variant>
bool prefill_compacts(PrefillParams const& params) {
  return params.chunk_key_visible != nullptr && !Variant::kTransformsLogits;
}

}  // namespace detail

template <class Variant, class T, int kHeadDim, int kGroupSize>
Status PrefillAttention<Variant, T, kHeadDim, kGroupSize>::workspace_size(
    PrefillParams const& params, std::size_t& bytes) {
  using Traits = detail::PrefillTraits<T, kHeadDim, kGroupSize>;
  KVC_RETURN_IF_ERROR((detail::check_prefill_shape<T, kHeadDim, kGroupSize>(params)));
  int grid = 0;
  KVC_RETURN_IF_ERROR(
      (detail::PrefillKernels<Variant, T, kHeadDim, kGroupSize>::attention_grid(grid)));
  bytes = detail::PrefillWorkspaceLayout::make(
              params.batch, params.total_tokens, params.cache.num_kv_heads, params.num_q_heads,
              Traits::kRows, Traits::kTokens, kHeadDim, grid, detail::prefill_scores_on(params),
              detail::prefill_compacts<Variant>(params))
              .bytes;
  return Status::kSuccess;
}

template <class Variant, class T, int kHeadDim, int kGroupSize>
Status PrefillAttention<Variant, T, kHeadDim, kGroupSize>::run(PrefillParams const& params,
                                                               cudaStream_t stream) {
  using Traits = detail::PrefillTraits<T, kHeadDim, kGroupSize>;
  using Kernels = detail::PrefillKernels<Variant, T, kHeadDim, kGroupSize>;
  PagedLayerView<void const> const& cache = params.cache;

  // Validate everything before enqueueing anything.
  KVC_RETURN_IF_ERROR((detail::check_prefill_shape<T, kHeadDim, kGroupSize>(params)));
  KVC_RETURN_IF_ERROR(detail::validate_prefill_variant<Variant>(params));
  if (!(params.scale >= 0.0f) || !std::isfinite(params.scale)) return Status::kErrorInvalidArgument;
  PrefillScoreMode const mode = params.scores.mode;
  if (mode != PrefillScoreMode::kNone && mode != PrefillScoreMode::kColumnSum &&
      mode != PrefillScoreMode::kLastRow) {
    return Status::kErrorInvalidArgument;
  }
  bool const scores = detail::prefill_scores_on(params);
  if (scores && (params.scores.probs == nullptr || params.scores.stride <= 0))
    return Status::kErrorInvalidArgument;
  if (params.batch == 0 || params.total_tokens == 0) return Status::kSuccess;
  if (params.q == nullptr || params.k == nullptr || params.v == nullptr || params.out == nullptr ||
      params.cu_tokens == nullptr || cache.k_pages == nullptr || cache.v_pages == nullptr ||
      cache.page_table == nullptr ||
      (params.prefix_lengths == nullptr && cache.lengths == nullptr) ||
      params.workspace == nullptr) {
    return Status::kErrorInvalidArgument;
  }
  if (cache.page_size <= 0 || cache.max_pages_per_head <= 0 || cache.max_seqs <= 0 ||
      static_cast<long long>(cache.max_pages_per_head) * cache.page_size > INT_MAX / 2) {
    return Status::kErrorInvalidArgument;
  }
  if (!detail::aligned16(params.q) || !detail::aligned16(params.k) ||
      !detail::aligned16(params.v) || !detail::aligned16(params.out) ||
      !detail::aligned16(cache.k_pages) || !detail::aligned16(cache.v_pages) ||
      !detail::aligned16(params.workspace)) {
    return Status::kErrorInvalidArgument;
  }
  int grid = 0;
  KVC_RETURN_IF_ERROR(Kernels::attention_grid(grid));
  int score_grid = 0;
  if (scores) KVC_RETURN_IF_ERROR(Kernels::score_grid(score_grid));
  detail::PrefillWorkspaceLayout const layout = detail::PrefillWorkspaceLayout::make(
      params.batch, params.total_tokens, cache.num_kv_heads, params.num_q_heads, Traits::kRows,
      Traits::kTokens, kHeadDim, grid, scores, detail::prefill_compacts<Variant>(params));
  if (params.workspace_bytes < layout.bytes) return Status::kErrorSizeMismatch;
  detail::PrefillWorkspace const ws = layout.carve(params.workspace);

  detail::PrefillPlanArgs plan;
  plan.cu_tokens = params.cu_tokens;
  plan.seq_slots = params.seq_slots;
  plan.prefix_lengths = params.prefix_lengths;
  plan.lengths = cache.lengths;
  plan.batch = params.batch;
  plan.total_tokens = params.total_tokens;
  plan.num_kv_heads = cache.num_kv_heads;
  plan.max_seqs = cache.max_seqs;
  plan.max_length = cache.max_pages_per_head * cache.page_size;
  plan.tokens_per_tile = Traits::kTokens;
  plan.grid = grid;
  plan.score_stride = scores ? params.scores.stride : 0;
  plan.mask = params.chunk_key_visible;
  plan.ws = ws;

  detail::PrefillKernelArgs<T> args;
  args.params = params;
  args.variant_params = decode_params_of(params);
  args.q = static_cast<T const*>(params.q);
  args.k = static_cast<T const*>(params.k);
  args.v = static_cast<T const*>(params.v);
  args.out = static_cast<T*>(params.out);
  args.lse = params.lse;
  args.k_pages = static_cast<T const*>(cache.k_pages);
  args.v_pages = static_cast<T const*>(cache.v_pages);
  args.page_table = cache.page_table;
  args.mask = params.chunk_key_visible;
  args.page_size = cache.page_size;
  args.page_shift = detail::page_shift_of(cache.page_size);
  args.max_pages_per_head = cache.max_pages_per_head;
  args.num_kv_heads = cache.num_kv_heads;
  args.num_q_heads = params.num_q_heads;
  args.scale = detail::softmax_scale_or_default<kHeadDim>(params.scale);
  args.scale_log2 = args.scale * detail::kLog2e;
  args.write_lse2 = scores;
  args.ws = ws;

  if (ws.visible_through != nullptr) {
    dim3 const pairs(static_cast<unsigned>(params.batch),
                     static_cast<unsigned>(cache.num_kv_heads));
    detail::prefill_compact_kernel<<<pairs, detail::kPrefillCompactThreads, 0, stream>>>(plan);
    if (cudaGetLastError() != cudaSuccess) return Status::kErrorCuda;
  }
  detail::prefill_plan_kernel<<<1, detail::kPrefillPlanThreads, 0, stream>>>(plan);
  if (cudaGetLastError() != cudaSuccess) return Status::kErrorCuda;

  KVC_RETURN_IF_ERROR(detail::launch_kernel(
      detail::prefill_attention_kernel<Variant, T, kHeadDim, kGroupSize>, args, grid,
      Traits::kThreads, Traits::kSmemBytes, params.programmatic_launch, stream));
  if (scores) {
    detail::prefill_score_kernel<Variant, T, kHeadDim, kGroupSize>
        <<<score_grid, detail::kPrefillScoreThreads,
           detail::PrefillScoreTraits<kHeadDim, kGroupSize>::kSmemBytes, stream>>>(
            args, params.cu_tokens, params.seq_slots, params.batch, params.total_tokens);
    if (cudaGetLastError() != cudaSuccess) return Status::kErrorCuda;
  }
  return Status::kSuccess;
}

//! Header-only dispatcher over every supported (dtype, head dim, group size) for `Variant`.
//! Instantiates all 36 configurations of the variant in the including file: prefer the
//! precompiled `prefill_attention(params, stream)` for DefaultVariant.
template <class Variant>
Status prefill_attention(PrefillParams const& params, cudaStream_t stream) {
  if (params.cache.num_kv_heads <= 0 || params.num_q_heads <= 0 ||
      params.num_q_heads % params.cache.num_kv_heads != 0) {
    return Status::kErrorInvalidShape;
  }
  return dispatch(
      [&](auto dtype, auto head_dim, auto group) {
        using T = StorageType<decltype(dtype)::value>;
        return PrefillAttention<Variant, T, decltype(head_dim)::value, decltype(group)::value>::run(
            params, stream);
      },
      choose(params.dtype, ValueList<DType::kF16, DType::kBF16, DType::kF32>{}),
      choose(params.cache.head_dim, ValueList<64, 128, 256>{}),
      choose(params.group_size(), ValueList<1, 2, 4, 8>{}));
}

}  // namespace kvc
