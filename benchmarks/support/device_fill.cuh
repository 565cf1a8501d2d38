//! @file
//! Device-side fill of benchmark buffers with seeded pseudo-random, roughly standard-normal
//! values (Box-Muller on a counter-based splitmix64 hash; no curand, no host copy), so that
//! gigabyte-sized K/V pools fill at memory speed. Value i depends only on (seed, i): a fill is
//! reproducible and independent of the launch shape. No value is zero: magnitudes below
//! kFillMinMagnitude are raised to it, keeping the sign. Element types: float, half, bf16.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace kvc::bench {

//! Smallest magnitude a fill writes (exactly representable in fp32, fp16 and bf16).
inline constexpr float kFillMinMagnitude = 1.0f / 256.0f;

namespace detail {

//! splitmix64 output function: a bijective 64-bit mix.
__host__ __device__ inline std::uint64_t splitmix64(std::uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

//! A standard-normal-ish sample for counter `index` of stream `seed`, |value| <= about 5.8.
__device__ inline float hashed_normal(std::uint64_t seed, std::uint64_t index) {
  std::uint64_t const bits = splitmix64(splitmix64(seed) + (index + 1) * 0x9e3779b97f4a7c15ull);
  // Two 24-bit uniforms: u1 in (0, 1] (log defined), u2 in [0, 1).
  float const u1 = static_cast<float>((bits >> 40) + 1) * (1.0f / 16777216.0f);
  float const u2 = static_cast<float>((bits >> 8) & 0xffffffull) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

template <class T>
__device__ inline T fill_convert(float value);
template <>
__device__ inline float fill_convert<float>(float value) {
  return value;
}
template <>
__device__ inline __half fill_convert<__half>(float value) {
  return __float2half_rn(value);
}
template <>
__device__ inline __nv_bfloat16 fill_convert<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}

//! Grid-stride fill of data[0, count) with scale * hashed_normal(seed, i), never zero.
template <class T>
__global__ void fill_normal_kernel(T* __restrict__ data, std::size_t count, std::uint64_t seed,
                                   float scale) {
  std::size_t const stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    float const value = scale * hashed_normal(seed, i);
    data[i] = fill_convert<T>(copysignf(fmaxf(fabsf(value), kFillMinMagnitude), value));
  }
}

}  // namespace detail

//! @brief Enqueues a fill of `count` elements at `data` (device memory, T = float, half or
//! __nv_bfloat16) with seeded normal-ish values of standard deviation about `scale` on `stream`.
//! Keep scale * 6 inside T's range (fp16: scale <= 10000). Does not synchronise.
//! @return cudaSuccess once enqueued; cudaErrorInvalidValue for a null `data` with count > 0 or
//!         a scale that is not positive; otherwise the launch error.
template <class T>
cudaError_t fill_normal(T* data, std::size_t count, std::uint64_t seed, float scale = 1.0f,
                        cudaStream_t stream = nullptr) {
  if (count == 0) return cudaSuccess;
  if (data == nullptr || !(scale > 0.0f)) return cudaErrorInvalidValue;
  constexpr int kThreads = 256;
  constexpr std::size_t kMaxBlocks = 4096;  // grid-stride beyond ~1M threads
  std::size_t const blocks = std::min<std::size_t>((count + kThreads - 1) / kThreads, kMaxBlocks);
  detail::fill_normal_kernel<T>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(data, count, seed, scale);
  return cudaGetLastError();
}

}  // namespace kvc::bench
