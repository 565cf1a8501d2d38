//! @file
//! Small block-wide primitives of the store kernels (exclusive prefix sum, sum, argmin by the
//! eviction order), written with warp shuffles so the kernels need no CUB instantiations.
//! Every function must be called by all threads of the block; blockDim.x is a multiple of 32
//! and at most 1024.
#pragma once

#include <cstdint>

#include "kvc/core/macros.hpp"
#include "kvc/policy/eviction.hpp"

namespace kvc::detail {

//! Shared memory of the block primitives (one instance may serve them all, one call at a time).
struct BlockScratch {
  long long values[33];
  float scores[32];
  int slots[32];
};

//! Exclusive prefix sum of `value` over the block in thread order; `total` gets the block sum.
KVC_DEVICE long long block_exclusive_sum(long long value, long long& total, BlockScratch& scratch) {
  int const lane = threadIdx.x & 31;
  int const warp = threadIdx.x >> 5;
  int const warps = blockDim.x >> 5;
  long long inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    long long const other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) scratch.values[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    long long const own = lane < warps ? scratch.values[lane] : 0;
    long long running = own;
    for (int offset = 1; offset < 32; offset <<= 1) {
      long long const other = __shfl_up_sync(0xffffffffu, running, offset);
      if (lane >= offset) running += other;
    }
    if (lane < warps) scratch.values[lane] = running - own;  // exclusive warp offsets
    if (lane == 31) scratch.values[32] = running;            // block total
  }
  __syncthreads();
  long long const result = scratch.values[warp] + inclusive - value;
  total = scratch.values[32];
  __syncthreads();  // scratch may be reused right away
  return result;
}

//! Sum of `value` over the block, returned to every thread.
KVC_DEVICE long long block_sum(long long value, BlockScratch& scratch) {
  long long total = 0;
  block_exclusive_sum(value, total, scratch);
  return total;
}

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
