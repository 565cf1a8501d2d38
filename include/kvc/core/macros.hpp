//! @file
//! Execution-space and inlining macros. Under nvcc they expand to CUDA qualifiers; under a
//! host-only compiler they degrade to plain `inline`, so every policy function written with them
//! compiles (and is tested) with g++ alone.
#pragma once

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#define KVC_HOST_DEVICE __forceinline__ __host__ __device__
#define KVC_DEVICE __forceinline__ __device__
#define KVC_HOST __host__ inline
#define KVC_GLOBAL __global__ static
#else
#define KVC_HOST_DEVICE inline
#define KVC_DEVICE inline
#define KVC_HOST inline
#endif

//! `#pragma unroll` for loops in host-and-device code: in the device pass only (a host compiler,
//! nvcc's host pass included, would warn about the unknown pragma).
#if defined(__CUDA_ARCH__)
#define KVC_UNROLL _Pragma("unroll")
#else
#define KVC_UNROLL
#endif

#if defined(__CUDA_ARCH__)
#define KVC_IS_DEVICE_CODE 1
#else
#define KVC_IS_DEVICE_CODE 0
#endif

//! True when the CUDA half/bfloat16 headers can be included (nvcc, or g++ with the toolkit's
//! include directory on the path).
#if defined(__has_include)
#if __has_include(<cuda_fp16.h>) && __has_include(<cuda_bf16.h>)
#define KVC_HAS_CUDA_HEADERS 1
#endif
#endif
#ifndef KVC_HAS_CUDA_HEADERS
#define KVC_HAS_CUDA_HEADERS 0
#endif
