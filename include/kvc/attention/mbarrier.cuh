//! @file
//! Shared-memory barriers (`mbarrier`, sm_80 and later) for producer / consumer pipelines inside a
//! CTA: a barrier completes a phase when its expected number of arrivals has happened, and waiters
//! poll for the phase by its parity (0, 1, 0, ...). Arrivals are plain (release: the arriving
//! thread's earlier writes are visible to whoever observes the phase) or triggered by the
//! completion of the arriving thread's earlier cp.async copies.
#pragma once

#include <cstdint>

#include "kvc/core/macros.hpp"

namespace kvc::detail {

//! Sets the barrier at shared-window address `barrier` to expect `count` arrivals per phase.
//! A CTA barrier (__syncthreads) must follow before anyone else uses it.
KVC_DEVICE void mbarrier_init(std::uint32_t barrier, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(barrier), "r"(count) : "memory");
}

//! One arrival (release semantics at CTA scope).
KVC_DEVICE void mbarrier_arrive(std::uint32_t barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(barrier) : "memory");
}

//! One arrival, made when every cp.async this thread issued before has landed (counted in the
//! barrier's expected arrivals: .noinc).
KVC_DEVICE void mbarrier_arrive_on_copies(std::uint32_t barrier) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(barrier) : "memory");
}

//! Waits until the phase of parity `parity` has completed (acquire semantics at CTA scope).
//! sm_90: try_wait (the thread may sleep until the phase completes); sm_80: a test_wait loop.
KVC_DEVICE void mbarrier_wait(std::uint32_t barrier, int parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define KVC_MBARRIER_POLL "mbarrier.try_wait"
#else
#define KVC_MBARRIER_POLL "mbarrier.test_wait"
#endif
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n" KVC_MBARRIER_POLL
      ".parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(barrier),
      "r"(parity)
      : "memory");
#undef KVC_MBARRIER_POLL
}

//! Barrier `id` (1..15; 0 is __syncthreads) over the first `threads` threads of the CTA.
KVC_DEVICE void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace kvc::detail
