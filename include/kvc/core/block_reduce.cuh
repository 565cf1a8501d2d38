//! @file
//! Block-wide prefix sum and sum of the store and plan kernels, written with warp shuffles so the
//! kernels need no CUB instantiations. Every function must be called by all threads of the block;
//! blockDim.x is a multiple of 32 and at most 1024.
#pragma once

#include "kvc/core/macros.hpp"

namespace kvc::detail {

//! Shared memory of the block primitives (one instance may serve them all, one call at a time;
//! `scores` and `slots` serve block_first_to_evict in kvc/cache/detail/block_scan.cuh).
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

}  // namespace kvc::detail
