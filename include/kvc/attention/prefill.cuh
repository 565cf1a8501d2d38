//! @file
//! Prefill attention, header-only: the definitions of PrefillAttention<Variant, T, D, G>
//! (declared in prefill_api.cuh) and `prefill_attention<Variant>`, a runtime dispatcher over every
//! supported (dtype, head dim, group size) for one variant. kvc_prefill_instances precompiles
//! DefaultVariant.
//!
//! One call enqueues, on the caller's stream and nothing else:
//!   1. prefill_plan_kernel (one block): chunk boundaries and prefix lengths -> cost-ordered work
//!      list of (q tile, key split) items, score units (prefill_plan.cuh);
//!   2. prefill_attention_kernel (persistent, SMs x resident CTAs): attention with split merge
//!      by the last split of a q tile (prefill_kernel.cuh), launched with programmatic dependent
//!      launch so that its launch overlaps the plan kernel;
//!   3. only with a score mode: prefill_score_kernel (prefill_scores.cuh).
#pragma once

#include <atomic>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kvc/attention/dispatch.hpp"
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

//! SMs x resident CTAs of `kernel` (threads, dynamic shared memory) on the current device; the
//! first call per device and `Tag` raises the shared-memory limit and queries the occupancy,
//! later calls read a cache.
template <class Tag, class Kernel>
Status prefill_grid(Kernel kernel, int threads, int smem_bytes, int& grid) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int> cache[kCachedDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return Status::kErrorNoDevice;
  }
  if (device >= 0 && device < kCachedDevices) {
    int const cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      grid = cached;
      return Status::kSuccess;
    }
  }
  int sms = 0;
  int blocks = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes) !=
          cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem_bytes) !=
          cudaSuccess) {
    cudaGetLastError();
    return Status::kErrorCuda;
  }
  if (sms <= 0 || blocks <= 0) return Status::kErrorNotSupported;
  grid = sms * blocks;
  if (device >= 0 && device < kCachedDevices) cache[device].store(grid, std::memory_order_relaxed);
  return Status::kSuccess;
}

template <class Variant, class T, int kHeadDim, int kGroupSize>
struct PrefillKernels {
  struct AttentionTag {};
  struct ScoreTag {};
  static Status attention_grid(int& grid) {
    using Traits = PrefillTraits<T, kHeadDim, kGroupSize>;
    return prefill_grid<AttentionTag>(prefill_attention_kernel<Variant, T, kHeadDim, kGroupSize>,
                                      Traits::kThreads, Traits::kSmemBytes, grid);
  }
  static Status score_grid(int& grid) {
    using Traits = PrefillScoreTraits<kHeadDim, kGroupSize>;
    return prefill_grid<ScoreTag>(prefill_score_kernel<Variant, T, kHeadDim, kGroupSize>,
                                  kPrefillScoreThreads, Traits::kSmemBytes, grid);
  }
};

inline bool prefill_aligned16(void const* pointer) {
  return (reinterpret_cast<std::uintptr_t>(pointer) & 15u) == 0;
}

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
              Traits::kRows, Traits::kTokens, kHeadDim, grid, detail::prefill_scores_on(params))
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
  if (!detail::prefill_aligned16(params.q) || !detail::prefill_aligned16(params.k) ||
      !detail::prefill_aligned16(params.v) || !detail::prefill_aligned16(params.out) ||
      !detail::prefill_aligned16(cache.k_pages) || !detail::prefill_aligned16(cache.v_pages) ||
      !detail::prefill_aligned16(params.workspace)) {
    return Status::kErrorInvalidArgument;
  }
  int grid = 0;
  KVC_RETURN_IF_ERROR(Kernels::attention_grid(grid));
  int score_grid = 0;
  if (scores) KVC_RETURN_IF_ERROR(Kernels::score_grid(score_grid));
  detail::PrefillWorkspaceLayout const layout = detail::PrefillWorkspaceLayout::make(
      params.batch, params.total_tokens, cache.num_kv_heads, params.num_q_heads, Traits::kRows,
      Traits::kTokens, kHeadDim, grid, scores);
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
  args.page_shift = (cache.page_size & (cache.page_size - 1)) == 0
                        ? __builtin_ctz(static_cast<unsigned>(cache.page_size))
                        : -1;
  args.max_pages_per_head = cache.max_pages_per_head;
  args.num_kv_heads = cache.num_kv_heads;
  args.num_q_heads = params.num_q_heads;
  args.scale = params.scale > 0.0f
                   ? params.scale
                   : static_cast<float>(1.0 / std::sqrt(static_cast<double>(kHeadDim)));
  args.scale_log2 = args.scale * detail::kLog2e;
  args.write_lse2 = scores;
  args.ws = ws;

  detail::prefill_plan_kernel<<<1, detail::kPrefillPlanThreads, 0, stream>>>(plan);
  if (cudaGetLastError() != cudaSuccess) return Status::kErrorCuda;

  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(static_cast<unsigned>(Traits::kThreads));
  config.dynamicSmemBytes = static_cast<std::size_t>(Traits::kSmemBytes);
  config.stream = stream;
  config.attrs = attribute;
  bool const programmatic =
      params.programmatic_launch && stream != nullptr && stream != cudaStreamLegacy;
  config.numAttrs = programmatic ? 1 : 0;
  if (cudaLaunchKernelEx(&config,
                         detail::prefill_attention_kernel<Variant, T, kHeadDim, kGroupSize>,
                         args) != cudaSuccess) {
    cudaGetLastError();
    return Status::kErrorCuda;
  }
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
