//! @file
//! What the examples share: whether the GPU path can run (a CUDA build, KVC_EXAMPLE_CUDA=1, and a
//! CUDA device) and the choice of path from `--device cpu|gpu|auto`.
#pragma once

#include <cstdio>
#include <string>

#if KVC_EXAMPLE_CUDA
#include <cuda_runtime.h>
#endif

namespace kvc::example {

//! True when the GPU path can run: a CUDA build and a CUDA device.
inline bool cuda_device_present() {
#if KVC_EXAMPLE_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
#else
  return false;
#endif
}

//! The path `--device` asks for: `use_gpu` is true for "gpu", and for "auto" when the GPU path
//! can run. False (with a message on stderr) for "gpu" when it cannot.
inline bool choose_device(std::string const& device, bool& use_gpu) {
  bool const have_gpu = cuda_device_present();
  if (device == "gpu" && !have_gpu) {
    std::fprintf(stderr, "--device gpu: no CUDA device (or a build without CUDA)\n");
    return false;
  }
  use_gpu = have_gpu && device != "cpu";
  return true;
}

}  // namespace kvc::example
