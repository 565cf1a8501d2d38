# Enables CUDA when a CUDA compiler exists and finds the toolkit and its CCCL. Without nvcc the
# project still configures: the host-only parts (policies, CPU reference, host tests, demo) build
# and run, and KVC_WITH_CUDA is OFF.
include(CheckLanguage)
include(GNUInstallDirs)

check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    # Explicit default (Hopper, with the sm_90a features: wgmma). `native` would fail on GPU-less build machines.
    set(CMAKE_CUDA_ARCHITECTURES 90a)
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  find_package(CCCL CONFIG REQUIRED HINTS "${CUDAToolkit_LIBRARY_DIR}/cmake")
  set(KVC_WITH_CUDA ON)
  message(STATUS "kvc: CUDA ${CUDAToolkit_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES}")
else()
  set(KVC_WITH_CUDA OFF)
  message(STATUS "kvc: no CUDA compiler found: building and testing the host-only parts "
                 "(policies, CPU reference, host tests, demo); GPU kernels and GPU tests are skipped")
endif()
