//! @file
//! A slow, double-precision decode attention over the paged store: the GPU oracle of tests.
//! It follows the CPU reference (kvc/reference/attention.hpp) operation for operation, so that
//! its probabilities are the reference's (long H2O/TOVA runs then take the same eviction
//! decisions on both sides): per query head, logits = (sum over i in order of double q[i] *
//! double k[i]) * scale without fused multiply-adds, the maximum, the denominator summed in slot
//! order, lse = max + log(denominator), p = exp(logit - lse), and out[i] = sum over slots in order
//! of p * v[i], all in double; p is rounded to float for the score hook, out to T, lse to float.
//! One block per (KV head, batch row) loops over the G query heads of its group and all slots.
//! Not for production: it re-reads every key three times per query head.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

#include "kvc/attention/score_hook.hpp"
#include "kvc/cache/paged_view.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/macros.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

//! Arguments of reference_decode_attention.
template <class T>
struct ReferenceDecodeParams {
  PagedLayerView<T> cache;                  //!< the layer's paged K/V, page tables and lengths
  T const* q = nullptr;                     //!< [batch, num_q_heads, head_dim], RoPE'd (q_out)
  std::int32_t const* seq_slots = nullptr;  //!< [batch] sequence slot of each batch row
  int batch = 0;
  int num_q_heads = 0;   //!< a multiple of cache.num_kv_heads
  float scale = 0.0f;    //!< softmax scale; 0 means 1/sqrt(head_dim) (rounded to float)
  T* out = nullptr;      //!< [batch, num_q_heads, head_dim]
  float* lse = nullptr;  //!< [batch, num_q_heads] natural-log LSE, or null
  ScoreHook scores{};    //!< per-slot scores in either ScoreForm, or probs null
};

namespace detail {

inline constexpr int kReferenceDecodeThreads = 256;
inline constexpr int kReferenceDecodeMaxDimsPerThread = 4;  // head_dim <= 1024
inline constexpr double kReferenceLog2e =
    1.4426950408889634;  // log2(e), for ScoreForm::kLog2Logits

//! Dot product of q (shared, float) with key `slot`, in double and in element order, scaled.
template <class T>
KVC_DEVICE double reference_logit(PagedLayerView<T> const& cache, float const* q, int seq,
                                  int kv_head, int slot, double scale) {
  T const* key = cache.k_pages + cache.element_of(seq, kv_head, slot);
  double dot = 0.0;
  for (int i = 0; i < cache.head_dim; ++i) {
    dot = __dadd_rn(dot, __dmul_rn(static_cast<double>(q[i]),
                                   static_cast<double>(DTypeTraits<T>::to_float(key[i]))));
  }
  return __dmul_rn(dot, scale);
}

//! Grid (num_kv_heads, batch); block kReferenceDecodeThreads; dynamic shared memory head_dim
//! floats.
template <class T>
KVC_GLOBAL void reference_decode_kernel(ReferenceDecodeParams<T> const p) {
  extern __shared__ float reference_q[];  // [head_dim]
  __shared__ double tile[kReferenceDecodeThreads];
  __shared__ double reduce[kReferenceDecodeThreads / 32];
  __shared__ double denominator;
  PagedLayerView<T> const& cache = p.cache;
  int const row = blockIdx.y;
  int const kv_head = blockIdx.x;
  int const seq = p.seq_slots[row];
  if (seq < 0 || seq >= cache.max_seqs) return;
  int const d = cache.head_dim;
  int const group = p.num_q_heads / cache.num_kv_heads;
  int const length = cache.lengths[cache.head_index(seq, kv_head)];
  double const scale = static_cast<double>(
      p.scale > 0.0f ? p.scale : static_cast<float>(1.0 / sqrt(static_cast<double>(d))));
  int const tid = threadIdx.x;
  int const lane = tid & 31;
  int const warp = tid >> 5;

  for (int g = 0; g < group; ++g) {
    int const q_head = kv_head * group + g;
    std::int64_t const q_row = static_cast<std::int64_t>(row) * p.num_q_heads + q_head;
    for (int i = tid; i < d; i += blockDim.x)
      reference_q[i] = DTypeTraits<T>::to_float(p.q[q_row * d + i]);
    __syncthreads();

    // Maximum logit (exact in any order).
    double local_max = -INFINITY;
    for (int s = tid; s < length; s += blockDim.x) {
      local_max = fmax(local_max, reference_logit(cache, reference_q, seq, kv_head, s, scale));
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      local_max = fmax(local_max, __shfl_xor_sync(0xffffffffu, local_max, offset));
    }
    if (lane == 0) reduce[warp] = local_max;
    __syncthreads();
    double max_logit = -INFINITY;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w)
      max_logit = fmax(max_logit, reduce[w]);

    // Denominator, summed by one thread in slot order (the reference's order).
    if (tid == 0) denominator = 0.0;
    for (int first = 0; first < length; first += blockDim.x) {
      int const s = first + tid;
      tile[tid] = s < length
                      ? exp(reference_logit(cache, reference_q, seq, kv_head, s, scale) - max_logit)
                      : 0.0;
      __syncthreads();
      if (tid == 0) {
        int const count =
            length - first < static_cast<int>(blockDim.x) ? length - first : blockDim.x;
        double sum = denominator;
        for (int j = 0; j < count; ++j) sum = __dadd_rn(sum, tile[j]);
        denominator = sum;
      }
      __syncthreads();
    }
    __syncthreads();
    bool const empty = length == 0;
    double const lse = empty ? -INFINITY : max_logit + log(denominator);

    // Probabilities and the output, accumulated per element in slot order.
    double accumulator[kReferenceDecodeMaxDimsPerThread];
    for (int j = 0; j < kReferenceDecodeMaxDimsPerThread; ++j) accumulator[j] = 0.0;
    for (int first = 0; first < length; first += blockDim.x) {
      int const s = first + tid;
      double probability = 0.0;
      if (s < length) {
        double const logit = reference_logit(cache, reference_q, seq, kv_head, s, scale);
        probability = exp(logit - lse);
        if (p.scores.probs != nullptr && s < p.scores.stride) {
          bool const log2_form = p.scores.form == ScoreForm::kLog2Logits;
          p.scores.probs[p.scores.index(row, q_head, s, p.num_q_heads)] =
              static_cast<float>(log2_form ? logit * kReferenceLog2e : probability);
        }
      }
      tile[tid] = probability;
      __syncthreads();
      int const count = length - first < static_cast<int>(blockDim.x) ? length - first : blockDim.x;
      for (int j = 0; j < kReferenceDecodeMaxDimsPerThread; ++j) {
        int const i = tid + j * static_cast<int>(blockDim.x);
        if (i >= d) break;
        double acc = accumulator[j];
        for (int t = 0; t < count; ++t) {
          T const* value = cache.v_pages + cache.element_of(seq, kv_head, first + t);
          acc = __dadd_rn(
              acc, __dmul_rn(tile[t], static_cast<double>(DTypeTraits<T>::to_float(value[i]))));
        }
        accumulator[j] = acc;
      }
      __syncthreads();
    }
    for (int j = 0; j < kReferenceDecodeMaxDimsPerThread; ++j) {
      int const i = tid + j * static_cast<int>(blockDim.x);
      if (i < d)
        p.out[q_row * d + i] = DTypeTraits<T>::from_float(static_cast<float>(accumulator[j]));
    }
    if (tid == 0 && p.lse != nullptr) p.lse[q_row] = static_cast<float>(lse);
    if (tid == 0 && p.scores.probs != nullptr && p.scores.form == ScoreForm::kLog2Logits)
      p.scores.lse[q_row] = static_cast<float>(lse * kReferenceLog2e);
    __syncthreads();  // reference_q and reduce are rewritten for the next query head
  }
}

}  // namespace detail

//! Launches the oracle attention on `stream`. Rows whose sequence slot is out of range are
//! skipped (their outputs are not written). Errors: kErrorInvalidArgument (null pointers,
//! batch < 0, num_q_heads not a positive multiple of num_kv_heads, head_dim above 1024, null
//! page table or lengths, an unknown score form or kLog2Logits scores without an lse array);
//! kErrorCuda.
template <class T>
Status reference_decode_attention(ReferenceDecodeParams<T> const& params, cudaStream_t stream) {
  PagedLayerView<T> const& cache = params.cache;
  if (params.batch < 0 || cache.num_kv_heads <= 0 || params.num_q_heads <= 0 ||
      params.num_q_heads % cache.num_kv_heads != 0 || cache.head_dim <= 0 ||
      cache.head_dim > detail::kReferenceDecodeThreads * detail::kReferenceDecodeMaxDimsPerThread ||
      cache.page_size <= 0) {
    return Status::kErrorInvalidArgument;
  }
  if (params.batch == 0) return Status::kSuccess;
  if (params.q == nullptr || params.seq_slots == nullptr || params.out == nullptr ||
      cache.k_pages == nullptr || cache.v_pages == nullptr || cache.page_table == nullptr ||
      cache.lengths == nullptr) {
    return Status::kErrorInvalidArgument;
  }
  if (params.scores.enabled() && !params.scores.form_complete())
    return Status::kErrorInvalidArgument;
  dim3 const grid(static_cast<unsigned>(cache.num_kv_heads), static_cast<unsigned>(params.batch));
  std::size_t const smem = sizeof(float) * static_cast<std::size_t>(cache.head_dim);
  detail::reference_decode_kernel<T>
      <<<grid, detail::kReferenceDecodeThreads, smem, stream>>>(params);
  return cudaGetLastError() == cudaSuccess ? Status::kSuccess : Status::kErrorCuda;
}

}  // namespace kvc
