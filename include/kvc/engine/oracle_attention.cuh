//! @file
//! `kvc::OracleDecodeAttention`: a `BasicKVCache` attention backend over the double-precision
//! oracle `reference_decode_attention` (kvc/attention/reference_decode.cuh). It follows the CPU
//! reference operation for operation, so H2O/TOVA eviction decisions match the reference even on
//! near-ties; any head dim up to 1024 and any group size. Slow: for validation and tests only.
#pragma once

#include <cstddef>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kvc/attention/params.hpp"
#include "kvc/attention/reference_decode.cuh"
#include "kvc/cache/paged_view.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

//! The oracle decode attention as a KVCache backend (no workspace).
struct OracleDecodeAttention {
  static bool supported(DType dtype, int head_dim, int group_size) {
    int const dtype_value = static_cast<int>(dtype);
    return dtype_value >= static_cast<int>(DType::kF32) &&
           dtype_value <= static_cast<int>(DType::kBF16) && head_dim > 0 && head_dim <= 1024 &&
           group_size > 0;
  }
  static Status workspace_size(DecodeParams const&, std::size_t& bytes) {
    bytes = 0;
    return Status::kSuccess;
  }
  static Status run(DecodeParams const& params, cudaStream_t stream) {
    switch (params.dtype) {
      case DType::kF32: return run_typed<float>(params, stream);
      case DType::kF16: return run_typed<half>(params, stream);
      case DType::kBF16: return run_typed<__nv_bfloat16>(params, stream);
    }
    return Status::kErrorInvalidArgument;
  }

 private:
  template <class T>
  static Status run_typed(DecodeParams const& params, cudaStream_t stream) {
    PagedLayerView<void const> const& erased = params.cache;
    ReferenceDecodeParams<T> typed;
    typed.cache.k_pages = static_cast<T*>(const_cast<void*>(erased.k_pages));
    typed.cache.v_pages = static_cast<T*>(const_cast<void*>(erased.v_pages));
    typed.cache.score_pages = erased.score_pages;
    typed.cache.position_pages = erased.position_pages;
    typed.cache.page_table = erased.page_table;
    typed.cache.lengths = erased.lengths;
    typed.cache.page_size = erased.page_size;
    typed.cache.head_dim = erased.head_dim;
    typed.cache.num_kv_heads = erased.num_kv_heads;
    typed.cache.max_pages_per_head = erased.max_pages_per_head;
    typed.cache.max_seqs = erased.max_seqs;
    typed.q = static_cast<T const*>(params.q);
    typed.seq_slots = params.seq_slots;
    typed.batch = params.batch;
    typed.num_q_heads = params.num_q_heads;
    typed.scale = params.scale;
    typed.out = static_cast<T*>(params.out);
    typed.lse = params.lse;
    typed.scores = params.scores;
    return reference_decode_attention(typed, stream);
  }
};

}  // namespace kvc
