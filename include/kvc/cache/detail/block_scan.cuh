//! @file
//! The eviction-order argmin of the store kernels (kvc/core/block_reduce.cuh has the prefix sum
//! and sum they also use), written with warp shuffles. Must be called by all threads of the
//! block; blockDim.x is a multiple of 32 and at most 1024.
#pragma once

#include <cstdint>

#include "kvc/core/block_reduce.cuh"
#include "kvc/core/macros.hpp"
#include "kvc/policy/eviction.hpp"

namespace kvc::detail {

//! The candidate evicted first among those of all threads (kvc::first_to_evict is a total order
//! when positions are distinct, so the reduction order does not matter). Returned to every thread.
KVC_DEVICE EvictionCandidate block_first_to_evict(EvictionCandidate candidate,
                                                  BlockScratch& scratch) {
  int const lane = threadIdx.x & 31;
  int const warp = threadIdx.x >> 5;
  int const warps = blockDim.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    EvictionCandidate other;
    other.slot = __shfl_down_sync(0xffffffffu, candidate.slot, offset);
    other.score = __shfl_down_sync(0xffffffffu, candidate.score, offset);
    other.position =
        __shfl_down_sync(0xffffffffu, static_cast<long long>(candidate.position), offset);
    if (lane + offset < 32) candidate = first_to_evict(candidate, other);
  }
  if (lane == 0) {
    scratch.slots[warp] = candidate.slot;
    scratch.scores[warp] = candidate.score;
    scratch.values[warp] = candidate.position;
  }
  __syncthreads();
  EvictionCandidate best;
  for (int w = 0; w < warps; ++w) {
    best = first_to_evict(best, EvictionCandidate{scratch.slots[w], scratch.scores[w],
                                                  static_cast<std::int64_t>(scratch.values[w])});
  }
  __syncthreads();
  return best;
}

}  // namespace kvc::detail
