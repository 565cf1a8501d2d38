//! @file
//! The decode-attention backends a `kvc::BasicKVCache` can run. A backend is a type with three
//! static functions (the `Attention` parameter of BasicKVCache):
//! @code
//!   static bool supported(DType dtype, int head_dim, int group_size);
//!   static Status workspace_size(DecodeParams const& params, std::size_t& bytes);
//!   static Status run(DecodeParams const& params, cudaStream_t stream);
//! @endcode
//! - `PrecompiledDecodeAttention` (here, the default of `kvc::KVCache`): the precompiled kernels
//!   of the `kvc_decode_instances` library (link it). Nothing is compiled in the including file.
//! - `InstantiatedDecodeAttention<Variant, T, D, G>` (kvc/engine/instantiated_attention.cuh): one
//!   configuration compiled in the including file, any variant; no library needed.
//! - `OracleDecodeAttention` (kvc/engine/oracle_attention.cuh): the slow double-precision oracle
//!   of the tests, any head dim up to 1024 and any group size; for validation only.
//!
//! The prefill backend (the `Prefill` parameter) is a type with the static functions
//! `supported`, `workspace_size(PrefillParams const&, size_t&)` and `run(PrefillParams const&,
//! cudaStream_t)`:
//! - `LibraryPrefillAttention` (kvc/cache/prefill.cuh, the default): `kvc_prefill_instances`;
//! - `InstantiatedPrefillAttention<Variant, T, D, G>` (kvc/engine/instantiated_attention.cuh);
//! - `DecodePathPrefill` (here): no prefill kernel; each prompt token runs as a decode step of the
//!   decode backend. Exact for Full and DMC (whose prefill is defined to equal token-by-token
//!   feeding), refused for H2O and TOVA (their prefill cuts once over the whole chunk); one
//!   sequence per prefill step. For shapes without a prefill kernel (e.g. with the oracle).
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "kvc/attention/decode_api.cuh"
#include "kvc/attention/params.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

//! Decode attention through the precompiled `kvc_decode_instances` (DefaultVariant; every
//! (fp16, bf16, fp32) x (64, 128, 256) x (1, 2, 4, 8), or bf16/128/4 in KVC_CI_MINIMAL builds).
struct PrecompiledDecodeAttention {
  static bool supported(DType dtype, int head_dim, int group_size) {
    return decode_attention_supported(dtype, head_dim, group_size);
  }
  static Status workspace_size(DecodeParams const& params, std::size_t& bytes) {
    return decode_attention_workspace_size(params, bytes);
  }
  static Status run(DecodeParams const& params, cudaStream_t stream) {
    return decode_attention(params, stream);
  }
};

//! Prefill backend tag: the facade feeds prompts through its decode path (see above).
struct DecodePathPrefill {};

}  // namespace kvc
