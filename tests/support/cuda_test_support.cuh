//! @file
//! What every GPU test case uses: the device check it starts with (printing the skip line ctest
//! looks for), and REQUIRE wrappers for CUDA errors and kvc::Status.
#pragma once

#include <cstdio>

#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include "kvc/core/status.hpp"

namespace kvc::test {

//! True when a CUDA device is usable. cudaGetDeviceCount fails (insufficient driver) on machines
//! without a GPU; that counts as "no device".
inline bool cuda_device_present() {
  int count = 0;
  cudaError_t const error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
}

}  // namespace kvc::test

//! First statement of every GPU case: without a device, print the skip line ctest looks for.
#define KVC_REQUIRE_CUDA_DEVICE()                    \
  do {                                               \
    if (!::kvc::test::cuda_device_present()) {       \
      std::printf("kvc: no CUDA device: skipped\n"); \
      return;                                        \
    }                                                \
  } while (0)

#define KVC_CUDA_REQUIRE(expr)                                             \
  do {                                                                     \
    cudaError_t const kvc_cuda_error_ = (expr);                            \
    REQUIRE_MESSAGE(kvc_cuda_error_ == cudaSuccess,                        \
                    #expr << ": " << cudaGetErrorString(kvc_cuda_error_)); \
  } while (0)

#define KVC_STATUS_REQUIRE(expr)                                           \
  do {                                                                     \
    ::kvc::Status const kvc_status_value_ = (expr);                        \
    REQUIRE_MESSAGE(kvc_status_value_ == ::kvc::Status::kSuccess,          \
                    #expr << ": " << ::kvc::to_string(kvc_status_value_)); \
  } while (0)
