//! @file
//! Compile-time traits that tie the CUDA storage types (`half`, `__nv_bfloat16`, `float`) to
//! `kvc::DType`, with conversions usable on host and device. Needs the CUDA toolkit's headers
//! (not nvcc): g++ with the toolkit include directory compiles it.
#pragma once

#include "kvc/core/dtype.hpp"
#include "kvc/core/macros.hpp"

#if KVC_HAS_CUDA_HEADERS
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace kvc {

template <class T>
struct DTypeTraits;  // concept: kDType, to_float(T), from_float(float)

template <>
struct DTypeTraits<float> {
  static constexpr DType kDType = DType::kF32;
  KVC_HOST_DEVICE static float to_float(float value) { return value; }
  KVC_HOST_DEVICE static float from_float(float value) { return value; }
};

#if KVC_HAS_CUDA_HEADERS
template <>
struct DTypeTraits<half> {
  static constexpr DType kDType = DType::kF16;
  KVC_HOST_DEVICE static float to_float(half value) { return __half2float(value); }
  KVC_HOST_DEVICE static half from_float(float value) { return __float2half_rn(value); }
};

template <>
struct DTypeTraits<__nv_bfloat16> {
  static constexpr DType kDType = DType::kBF16;
  KVC_HOST_DEVICE static float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }
  KVC_HOST_DEVICE static __nv_bfloat16 from_float(float value) { return __float2bfloat16_rn(value); }
};
#endif

//! Calls `fn(T{})` with the storage type of `dtype`; returns false if that type is unavailable.
template <class Fn>
bool visit_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kF32: fn(float{}); return true;
#if KVC_HAS_CUDA_HEADERS
    case DType::kF16: fn(half{}); return true;
    case DType::kBF16: fn(__nv_bfloat16{}); return true;
#else
    default: return false;
#endif
  }
  return false;
}

}  // namespace kvc
