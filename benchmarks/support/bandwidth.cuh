//! @file
//! Shared helpers of the GPU benchmarks: a CUDA-event timer for manual timing, and a
//! streaming-read bandwidth probe (reads a buffer of at least 1 GiB with 16-byte loads, several
//! loads in flight per thread, and reports GB/s), the denominator of every "fraction of
//! bandwidth" counter. Measure the probe in the same process as the benchmark it scales.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace kvc::bench {

//! True when a CUDA device is usable (any error of cudaGetDeviceCount counts as "none").
inline bool cuda_device_present() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
}

//! Elapsed GPU time between two events recorded on a stream. Reusable; owns its events.
class EventTimer {
 public:
  EventTimer() {
    cudaEventCreate(&start_);
    cudaEventCreate(&stop_);
  }
  EventTimer(EventTimer const&) = delete;
  EventTimer& operator=(EventTimer const&) = delete;
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  //! Records the start event on `stream`.
  void start(cudaStream_t stream) { cudaEventRecord(start_, stream); }
  //! Records the stop event on `stream`, waits for it (this call blocks) and returns the seconds
  //! between the two events (0 on a CUDA error).
  double stop_seconds(cudaStream_t stream) {
    cudaEventRecord(stop_, stream);
    if (cudaEventSynchronize(stop_) != cudaSuccess) return 0.0;
    float milliseconds = 0.0f;
    if (cudaEventElapsedTime(&milliseconds, start_, stop_) != cudaSuccess) return 0.0;
    return static_cast<double>(milliseconds) * 1e-3;
  }

 private:
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

namespace detail {

//! Loads per thread and loop iteration (independent 16-byte loads in flight).
inline constexpr int kProbeUnroll = 4;

//! Reads `count` int4 with a grid-stride loop; the XOR of everything is written only in a case
//! that never happens for the probe's fill, so no load can be optimised away.
__global__ static void stream_read_kernel(int4 const* __restrict__ data, std::size_t count,
                                          int* sink) {
  std::size_t const stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int acc = 0;
  for (; i + (kProbeUnroll - 1) * stride < count; i += kProbeUnroll * stride) {
    int4 values[kProbeUnroll];
#pragma unroll
    for (int u = 0; u < kProbeUnroll; ++u) values[u] = __ldcs(data + i + u * stride);
#pragma unroll
    for (int u = 0; u < kProbeUnroll; ++u)
      acc ^= values[u].x ^ values[u].y ^ values[u].z ^ values[u].w;
  }
  for (; i < count; i += stride) {
    int4 const value = __ldcs(data + i);
    acc ^= value.x ^ value.y ^ value.z ^ value.w;
  }
  if (acc == 0x5eed1234) *sink = acc;
}

}  // namespace detail

//! Streaming-read bandwidth of the current device in GB/s (1e9 bytes/s): reads a `bytes`-long
//! buffer (rounded up to 1 GiB at least) `repeats` times after one warm-up pass and keeps the
//! best pass. Allocates and frees its buffer (benchmark setup only). Returns 0 on a CUDA error.
inline double measure_read_bandwidth(std::size_t bytes = std::size_t{1} << 30, int repeats = 10,
                                     cudaStream_t stream = nullptr) {
  bytes = std::max(bytes, std::size_t{1} << 30) / sizeof(int4) * sizeof(int4);
  int4* data = nullptr;
  int* sink = nullptr;
  if (cudaMalloc(reinterpret_cast<void**>(&data), bytes) != cudaSuccess) {
    cudaGetLastError();
    return 0.0;
  }
  if (cudaMalloc(reinterpret_cast<void**>(&sink), sizeof(int)) != cudaSuccess) {
    cudaGetLastError();
    cudaFree(data);
    return 0.0;
  }
  cudaMemsetAsync(data, 0x11, bytes, stream);
  int device = 0;
  int sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  int const threads = 256;
  int const blocks = std::max(sms, 1) * 8;
  std::size_t const count = bytes / sizeof(int4);
  EventTimer timer;
  double best = 0.0;
  for (int pass = 0; pass <= repeats; ++pass) {
    timer.start(stream);
    detail::stream_read_kernel<<<blocks, threads, 0, stream>>>(data, count, sink);
    double const seconds = timer.stop_seconds(stream);
    if (pass > 0 && seconds > 0.0)
      best = std::max(best, static_cast<double>(bytes) / seconds * 1e-9);
  }
  bool const ok = cudaGetLastError() == cudaSuccess;
  cudaFree(sink);
  cudaFree(data);
  return ok ? best : 0.0;
}

}  // namespace kvc::bench
