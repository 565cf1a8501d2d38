//! @file
//! Decode attention, header-only: the definitions of DecodeAttention<Variant, T, D, G> (declared
//! in decode_api.cuh) and `decode_attention<Variant>`, a runtime dispatcher over every supported
//! (dtype, head dim, group size) for one variant. Including this header compiles the kernels of
//! whatever the including file instantiates; kvc_decode_instances precompiles DefaultVariant.
//!
//! One call enqueues two kernels on the caller's stream and nothing else:
//!   1. decode_plan_kernel (one block): lengths -> chunk size -> work list (decode_plan.cuh);
//!   2. decode_attention_kernel (persistent, SMs x resident CTAs): attention, split-KV merge by
//!      the last CTA of a head, score output (decode_kernel.cuh).
//! Both are launched with programmatic dependent launch (DecodeParams::programmatic_launch): the
//! plan's launch overlaps the stream's previous kernel and the attention's overlaps the plan;
//! each waits (griddepcontrol.wait) for its predecessor before it reads or writes memory, and
//! each lets its successor launch early (the attention kernel once its CTAs are resident).
#pragma once

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kvc/attention/decode_api.cuh"
#include "kvc/attention/decode_kernel.cuh"
#include "kvc/attention/decode_plan.cuh"
#include "kvc/attention/dispatch.hpp"
#include "kvc/attention/launch.cuh"
#include "kvc/attention/params.hpp"
#include "kvc/attention/variant.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/shape.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

namespace detail {

//! Persistent grid of one kernel instantiation on the current device: SMs x resident CTAs
//! (persistent_grid_of, cached per device and instantiation).
template <class Variant, class T, int kHeadDim, int kGroupSize>
Status persistent_grid(int& grid) {
  using Traits = DecodeTraits<T, kHeadDim, kGroupSize>;
  return persistent_grid_of<DecodeAttention<Variant, T, kHeadDim, kGroupSize>>(
      decode_attention_kernel<Variant, T, kHeadDim, kGroupSize>, Traits::kThreads,
      Traits::kSmemBytes, grid);
}

//! Shape checks shared by the size query and the run: kSuccess when `params` describes a call
//! that this instantiation (head dim kHeadDim, group kGroupSize, element T) can serve.
template <class T, int kHeadDim, int kGroupSize>
Status check_decode_shape(DecodeParams const& params) {
  PagedLayerView<void const> const& cache = params.cache;
  if (params.dtype != DTypeTraits<T>::kDType) return Status::kErrorNotSupported;
  if (params.batch < 0 || cache.num_kv_heads <= 0 || params.num_q_heads <= 0 ||
      params.num_q_heads % cache.num_kv_heads != 0) {
    return Status::kErrorInvalidShape;
  }
  if (cache.head_dim != kHeadDim || params.group_size() != kGroupSize)
    return Status::kErrorNotSupported;
  if (static_cast<long long>(params.batch) * params.num_q_heads * kHeadDim > (1ll << 40)) {
    return Status::kErrorInvalidShape;
  }
  return Status::kSuccess;
}

}  // namespace detail

template <class Variant, class T, int kHeadDim, int kGroupSize>
Status DecodeAttention<Variant, T, kHeadDim, kGroupSize>::workspace_size(DecodeParams const& params,
                                                                         std::size_t& bytes) {
  KVC_RETURN_IF_ERROR((detail::check_decode_shape<T, kHeadDim, kGroupSize>(params)));
  int grid = 0;
  KVC_RETURN_IF_ERROR((detail::persistent_grid<Variant, T, kHeadDim, kGroupSize>(grid)));
  int const heads = params.batch * params.cache.num_kv_heads;
  bytes = detail::DecodeWorkspaceLayout::make(heads, kGroupSize, kHeadDim, grid).bytes;
  return Status::kSuccess;
}

template <class Variant, class T, int kHeadDim, int kGroupSize>
Status DecodeAttention<Variant, T, kHeadDim, kGroupSize>::run(DecodeParams const& params,
                                                              cudaStream_t stream) {
  using Traits = detail::DecodeTraits<T, kHeadDim, kGroupSize>;
  auto const kernel = detail::decode_attention_kernel<Variant, T, kHeadDim, kGroupSize>;
  PagedLayerView<void const> const& cache = params.cache;

  // Validate everything before enqueueing anything.
  KVC_RETURN_IF_ERROR((detail::check_decode_shape<T, kHeadDim, kGroupSize>(params)));
  KVC_RETURN_IF_ERROR(Variant::validate(params));
  if (!(params.scale >= 0.0f) || !std::isfinite(params.scale)) return Status::kErrorInvalidArgument;
  if (params.scores.enabled() && (params.scores.stride <= 0 || !params.scores.form_complete()))
    return Status::kErrorInvalidArgument;
  if (params.split.waves < 0 || params.split.waves > detail::kTargetWaves ||
      params.split.min_chunk < 0 || params.split.min_chunk % detail::kChunkQuantum != 0 ||
      params.split.schedule < 0 || params.split.schedule > detail::kScheduleBalanced) {
    return Status::kErrorInvalidArgument;
  }
  if (params.batch == 0) return Status::kSuccess;
  if (params.q == nullptr || params.out == nullptr || cache.k_pages == nullptr ||
      cache.v_pages == nullptr || cache.page_table == nullptr || cache.lengths == nullptr ||
      params.workspace == nullptr) {
    return Status::kErrorInvalidArgument;
  }
  if (cache.page_size <= 0 || cache.max_pages_per_head <= 0 || cache.max_seqs <= 0 ||
      static_cast<long long>(cache.max_pages_per_head) * cache.page_size > INT_MAX) {
    return Status::kErrorInvalidArgument;
  }
  if (!detail::aligned16(params.q) || !detail::aligned16(cache.k_pages) ||
      !detail::aligned16(cache.v_pages) || !detail::aligned16(params.workspace)) {
    return Status::kErrorInvalidArgument;
  }
  int grid = 0;
  KVC_RETURN_IF_ERROR((detail::persistent_grid<Variant, T, kHeadDim, kGroupSize>(grid)));
  int const heads = params.batch * cache.num_kv_heads;
  detail::DecodeWorkspaceLayout const layout =
      detail::DecodeWorkspaceLayout::make(heads, kGroupSize, kHeadDim, grid);
  if (params.workspace_bytes < layout.bytes) return Status::kErrorSizeMismatch;
  detail::DecodeWorkspace const ws = layout.carve(params.workspace);

  detail::DecodePlanArgs plan;
  plan.lengths = cache.lengths;
  plan.seq_slots = params.seq_slots;
  plan.batch = params.batch;
  plan.num_kv_heads = cache.num_kv_heads;
  plan.max_seqs = cache.max_seqs;
  plan.max_length = cache.max_pages_per_head * cache.page_size;
  plan.grid = grid;
  plan.waves = params.split.waves > 0 ? params.split.waves : detail::kDefaultWaves;
  plan.min_chunk = params.split.min_chunk > 0 ? params.split.min_chunk : detail::kDefaultMinChunk;
  plan.balanced = params.split.schedule == detail::kScheduleBalanced;
  plan.ws = ws;

  detail::DecodeKernelArgs<T> args;
  args.params = params;
  args.q = static_cast<T const*>(params.q);
  args.out = static_cast<T*>(params.out);
  args.lse = params.lse;
  args.k_pages = static_cast<T const*>(cache.k_pages);
  args.v_pages = static_cast<T const*>(cache.v_pages);
  args.page_table = cache.page_table;
  args.probs = params.scores.probs;
  args.probs_stride = params.scores.stride;
  args.score_lse = params.scores.enabled() && params.scores.form == ScoreForm::kLog2Logits
                       ? params.scores.lse
                       : nullptr;
  args.page_size = cache.page_size;
  args.page_shift = detail::page_shift_of(cache.page_size);
  args.max_pages_per_head = cache.max_pages_per_head;
  args.num_kv_heads = cache.num_kv_heads;
  args.num_q_heads = params.num_q_heads;
  args.scale = detail::softmax_scale_or_default<kHeadDim>(params.scale);
  args.scale_log2 = args.scale * detail::kLog2e;
  args.ws = ws;

  // Both kernels with programmatic dependent launch (when asked): the plan's launch overlaps
  // the stream's previous kernel (the plan waits for it before touching memory), and the
  // attention's overlaps the plan.
  KVC_RETURN_IF_ERROR(detail::launch_kernel(detail::decode_plan_kernel, plan, 1,
                                            detail::kPlanThreads, 0, params.programmatic_launch,
                                            stream));
  return detail::launch_kernel(kernel, args, grid, Traits::kThreads, Traits::kSmemBytes,
                               params.programmatic_launch, stream);
}

//! Header-only dispatcher over every supported (dtype, head dim, group size) for `Variant`.
//! Instantiates all 36 kernels of the variant in the including file: prefer the precompiled
//! `decode_attention(params, stream)` for DefaultVariant.
template <class Variant>
Status decode_attention(DecodeParams const& params, cudaStream_t stream) {
  return dispatch(
      [&](auto dtype, auto head_dim, auto group) {
        using T = StorageType<decltype(dtype)::value>;
        return DecodeAttention<Variant, T, decltype(head_dim)::value, decltype(group)::value>::run(
            params, stream);
      },
      choose(params.dtype, ValueList<DType::kF16, DType::kBF16, DType::kF32>{}),
      choose(params.cache.head_dim, ValueList<64, 128, 256>{}),
      choose(params.group_size(), ValueList<1, 2, 4, 8>{}));
}

}  // namespace kvc
