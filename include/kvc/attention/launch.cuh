//! @file
//! Host-side launch plumbing shared by decode and prefill attention (decode.cuh, prefill.cuh):
//! the persistent grid of a kernel on the current device (cached per device), the 16-byte
//! pointer check, the page-size shift, the default softmax scale, and the launch of a kernel
//! with optional programmatic dependent launch.
#pragma once

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kvc/core/status.hpp"

namespace kvc {
namespace detail {

//! SMs x resident CTAs of `kernel` (threads, dynamic shared memory) on the current device. The
//! first call per device and `Tag` (one tag per kernel instantiation) raises the kernel's dynamic
//! shared-memory limit and queries the occupancy; later calls read a cache (no driver call but
//! cudaGetDevice).
template <class Tag, class Kernel>
Status persistent_grid_of(Kernel kernel, int threads, int smem_bytes, int& grid) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int> cache[kCachedDevices] = {};  // one cache per Tag
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

inline bool aligned16(void const* pointer) {
  return (reinterpret_cast<std::uintptr_t>(pointer) & 15u) == 0;
}

//! log2(page_size) for a power of two, else -1.
inline int page_shift_of(int page_size) {
  return (page_size & (page_size - 1)) == 0 ? __builtin_ctz(static_cast<unsigned>(page_size)) : -1;
}

//! `scale` when positive, else 1 / sqrt(kHeadDim).
template <int kHeadDim>
float softmax_scale_or_default(float scale) {
  return scale > 0.0f ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(kHeadDim)));
}

//! Launches `kernel(args)` on `grid` CTAs of `threads` with `smem_bytes` of dynamic shared memory;
//! with programmatic dependent launch when `programmatic_launch` is set and `stream` is an
//! explicit stream (the legacy default stream keeps plain stream order).
template <class Kernel, class Args>
Status launch_kernel(Kernel kernel, Args const& args, int grid, int threads, int smem_bytes,
                     bool programmatic_launch, cudaStream_t stream) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = static_cast<std::size_t>(smem_bytes);
  config.stream = stream;
  config.attrs = attribute;
  bool const programmatic = programmatic_launch && stream != nullptr && stream != cudaStreamLegacy;
  config.numAttrs = programmatic ? 1 : 0;
  if (cudaLaunchKernelEx(&config, kernel, args) != cudaSuccess) {
    cudaGetLastError();
    return Status::kErrorCuda;
  }
  return Status::kSuccess;
}

}  // namespace detail
}  // namespace kvc
