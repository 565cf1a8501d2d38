//! @file
//! Optional timeline instrumentation of decode attention, for experiments only: compiled in when
//! KVC_DECODE_TRACE is defined (never in the library's instances), empty otherwise. With it, the
//! plan kernel and every CTA of the attention kernel write %globaltimer stamps and counts into
//! the buffer that `kvc_decode_trace` points to (set by the experiment with cudaMemcpyToSymbol):
//!   [0] calls traced so far (the plan kernel takes the next call index), [1] current call,
//!   then per call (kDecodeTraceStride words): plan start, plan end, and per CTA
//!   kDecodeTraceCtaWords words: entry, after the grid-dependency wait, first tile ready,
//!   exit, tiles issued, items finished (epilogues run).
//! benchmarks/experiments/decode_timeline.cu reads it.
#pragma once

#include "kvc/core/macros.hpp"

namespace kvc::detail {

inline constexpr int kDecodeTraceCtaWords = 6;
inline constexpr int kDecodeTraceMaxCtas = 1024;
inline constexpr int kDecodeTraceStride = 2 + kDecodeTraceCtaWords * kDecodeTraceMaxCtas;
inline constexpr int kDecodeTraceCalls = 64;  //!< calls kept (ring)

}  // namespace kvc::detail

#if defined(KVC_DECODE_TRACE)
//! The experiment's trace buffer: [2 + kDecodeTraceCalls * kDecodeTraceStride] words.
__device__ unsigned long long* kvc_decode_trace = nullptr;

namespace kvc::detail {

KVC_DEVICE unsigned long long decode_trace_clock() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

//! Words of the current call (after the plan kernel started it).
KVC_DEVICE unsigned long long* decode_trace_call() {
  unsigned long long* const buffer = kvc_decode_trace;
  if (buffer == nullptr) return nullptr;
  unsigned long long const call = *reinterpret_cast<unsigned long long volatile*>(buffer + 1);
  return buffer + 2 + (call % kDecodeTraceCalls) * kDecodeTraceStride;
}

//! Plan kernel, thread 0: opens a new call and stamps its start.
KVC_DEVICE void decode_trace_plan_start() {
  unsigned long long* const buffer = kvc_decode_trace;
  if (buffer == nullptr) return;
  unsigned long long const t = decode_trace_clock();
  unsigned long long const call = buffer[0];
  buffer[0] = call + 1;
  buffer[1] = call;
  buffer[2 + (call % kDecodeTraceCalls) * kDecodeTraceStride] = t;
}

}  // namespace kvc::detail

#define KVC_DECODE_TRACE_PLAN_START() ::kvc::detail::decode_trace_plan_start()
#define KVC_DECODE_TRACE_PLAN_END()                                                  \
  do {                                                                               \
    if (unsigned long long* call_ = ::kvc::detail::decode_trace_call())              \
      call_[1] = ::kvc::detail::decode_trace_clock();                                \
  } while (0)
#define KVC_DECODE_TRACE_CTA(word, value)                                            \
  do {                                                                               \
    if (blockIdx.x < ::kvc::detail::kDecodeTraceMaxCtas)                             \
      if (unsigned long long* call_ = ::kvc::detail::decode_trace_call())            \
        call_[2 + blockIdx.x * ::kvc::detail::kDecodeTraceCtaWords + (word)] = (value); \
  } while (0)
#define KVC_DECODE_TRACE_NOW() ::kvc::detail::decode_trace_clock()
#else
#define KVC_DECODE_TRACE_PLAN_START() ((void)0)
#define KVC_DECODE_TRACE_PLAN_END() ((void)0)
#define KVC_DECODE_TRACE_CTA(word, value) ((void)0)
#define KVC_DECODE_TRACE_NOW() 0ull
#endif
