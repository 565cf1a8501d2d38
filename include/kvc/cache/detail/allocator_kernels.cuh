//! @file
//! Kernels of the page allocator and of sequence bookkeeping: fill the free stack, prepare a
//! decode step (pop the pages every head of the batch lacks, one launch for all layers, and
//! write the step report), reset a sequence slot (push its pages back, zero its rows), and sum
//! the accounting. None of them allocates or synchronises with the host.
#pragma once

#include <cstdint>

#include "kvc/cache/detail/block_scan.cuh"
#include "kvc/cache/step_report.hpp"
#include "kvc/cache/store_layout.hpp"
#include "kvc/core/macros.hpp"
#include "kvc/core/rope.hpp"

namespace kvc::detail {

//! Threads per block of the allocator kernels.
inline constexpr int kAllocatorThreads = 256;
//! Threads per block of prepare_step_kernel (it also evaluates the step's RoPE angles).
inline constexpr int kPrepareThreads = 512;

//! Free stack = every page id, top first popped; count = num_pages.
KVC_GLOBAL void fill_free_stack_kernel(StoreArrays const arrays, int const num_pages) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < num_pages; i += gridDim.x * blockDim.x) {
    arrays.free_stack[i] = i;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *arrays.free_count = num_pages;
}

//! Takes up to `demand` pages from the free stack with one compare-and-swap loop. Returns the
//! number granted (min(demand, free)); `base` gets the stack index of the first granted page.
KVC_DEVICE int pop_pages(std::int32_t* free_count, int demand, int& base) {
  int available = *reinterpret_cast<int volatile*>(free_count);
  while (true) {
    int const grant = demand < available ? demand : available;
    if (grant <= 0) {
      base = 0;
      return 0;
    }
    int const previous = atomicCAS(free_count, available, available - grant);
    if (previous == available) {
      base = available - grant;
      return grant;
    }
    available = previous;
  }
}

//! The end of a kernel of one block per batch row that writes the step report (every thread
//! of the block calls it; `row_flags`, `row_short` and `last_block` are the block's __shared__
//! variables, `row_flags` reused as the OR of all rows): records the row's flags and shortfall,
//! and the last block to finish folds every row into the step report.
KVC_DEVICE void fold_step_report(StoreArrays const& a, int const row, int const& batch,
                                 int& row_flags, int const& row_short, bool& last_block,
                                 BlockScratch& scratch) {
  __syncthreads();
  if (threadIdx.x == 0) {
    a.row_flags[row] = row_flags | (row_short > 0 ? kStepRowOutOfPages : 0);
    a.row_short[row] = row_short;
    __threadfence();
    int const arrived = atomicAdd(&a.report->blocks_done, 1);
    last_block = arrived == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  long long flags_or = 0;
  long long failed_rows = 0;
  long long short_pages = 0;
  for (int r = threadIdx.x; r < batch; r += blockDim.x) {
    int const flags = __ldcg(a.row_flags + r);
    flags_or |= flags;
    failed_rows += flags != 0 ? 1 : 0;
    short_pages += __ldcg(a.row_short + r);
  }
  failed_rows = block_sum(failed_rows, scratch);
  short_pages = block_sum(short_pages, scratch);
  if (flags_or != 0) atomicOr(&row_flags, static_cast<int>(flags_or));  // row_flags: reused as OR
  __syncthreads();
  if (threadIdx.x == 0) {
    // Every bit of every row reached row_flags (this block's own row is among them).
    StepReport report;
    report.failed = failed_rows > 0 ? 1 : 0;
    report.pages_short = static_cast<std::int32_t>(short_pages);
    report.rows_failed = static_cast<std::int32_t>(failed_rows);
    report.row_flags = row_flags;
    report.protocol_errors = 0;
    report.blocks_done = 0;
    *a.report = report;
  }
}

//! Arguments of prepare_step_kernel.
struct PrepareParams {
  StoreArrays arrays;
  StoreDims dims;
  std::int32_t const* seq_slots = nullptr;  // [batch]
  int batch = 0;
  RopeConfig rope{};
};

//! One block per batch row. For every (layer, KV head) of the row's sequence whose capacity is
//! below length + 1, pops a page (one CAS per chunk of heads) and appends it to the head's page
//! table. Records the row's flags and shortfall, copies the row's positions to step_positions,
//! evaluates cos and sin of every RoPE pair at those positions into step_rope (once per step,
//! row and layer, instead of once per KV head and element in the update kernels), and the last
//! block to finish folds the rows into the step report (so no reset launch is
//! needed). Pages granted to a row that still fails stay with their heads (spare capacity).
KVC_GLOBAL void __launch_bounds__(kPrepareThreads) prepare_step_kernel(PrepareParams const p) {
  __shared__ BlockScratch scratch;
  __shared__ int row_flags;
  __shared__ int row_short;
  __shared__ int grant_base;
  __shared__ int grant_count;
  __shared__ bool last_block;
  StoreArrays const& a = p.arrays;
  StoreDims const& dims = p.dims;
  int const row = blockIdx.x;
  int const seq = p.seq_slots[row];
  bool const valid = seq >= 0 && seq < dims.max_seqs && a.active[seq] != 0;
  if (threadIdx.x == 0) {
    row_flags = valid ? kStepRowOk : kStepRowInvalidSequence;
    row_short = 0;
  }
  __syncthreads();
  if (valid) {
    for (int layer = threadIdx.x; layer < dims.num_layers; layer += blockDim.x) {
      a.step_positions[dims.layer_seq(layer, seq)] = a.tokens_seen[dims.layer_seq(layer, seq)];
    }
    if (a.step_rope != nullptr) {
      int const pairs = dims.head_dim / 2;
      for (int index = threadIdx.x; index < dims.num_layers * pairs; index += blockDim.x) {
        int const layer = index / pairs;
        int const pair = index % pairs;
        float c = 1.0f;
        float s = 0.0f;
        rope_cos_sin(pair, dims.head_dim, p.rope.theta, a.tokens_seen[dims.layer_seq(layer, seq)],
                     c, s);
        float* out = a.step_rope + (dims.layer_seq(layer, seq) * pairs + pair) * 2;
        out[0] = c;
        out[1] = s;
      }
    }
    int const heads = dims.num_layers * dims.num_kv_heads;
    for (int first = 0; first < heads; first += blockDim.x) {
      int const index = first + static_cast<int>(threadIdx.x);
      bool need = false;
      std::int64_t head = 0;
      int count = 0;
      if (index < heads) {
        head = dims.head_index(index / dims.num_kv_heads, seq, index % dims.num_kv_heads);
        int const length = a.lengths[head];
        count = a.page_counts[head];
        if (static_cast<std::int64_t>(length) + 1 >
            static_cast<std::int64_t>(count) * dims.page_size) {
          if (count >= dims.max_pages_per_head) {
            atomicOr(&row_flags, kStepRowHeadFull);
          } else {
            need = true;
          }
        }
      }
      long long total = 0;
      int const rank = static_cast<int>(block_exclusive_sum(need ? 1 : 0, total, scratch));
      if (total == 0) continue;  // uniform across the block
      if (threadIdx.x == 0) {
        int base = 0;
        grant_count = pop_pages(a.free_count, static_cast<int>(total), base);
        grant_base = base;
      }
      __syncthreads();
      if (need) {
        if (rank < grant_count) {
          a.page_table[head * dims.max_pages_per_head + count] = a.free_stack[grant_base + rank];
          a.page_counts[head] = count + 1;
        } else {
          atomicAdd(&row_short, 1);
        }
      }
      __syncthreads();  // grant_* are rewritten by the next chunk
    }
  }
  fold_step_report(a, row, p.batch, row_flags, row_short, last_block, scratch);
}

//! Arguments of reset_sequence_kernel.
struct ResetParams {
  StoreArrays arrays;
  StoreDims dims;
  int seq = 0;
  int active = 0;  //!< value written to active[seq]
};

//! One block per layer: pushes every page held by (layer, seq, any KV head) back on the free
//! stack (one atomic per chunk of heads), then zeroes the sequence's rows of that layer (lengths,
//! page counts, DMC state, tokens seen). Block 0 sets the slot's active flag.
KVC_GLOBAL void reset_sequence_kernel(ResetParams const p) {
  __shared__ BlockScratch scratch;
  __shared__ int push_base;
  StoreArrays const& a = p.arrays;
  StoreDims const& dims = p.dims;
  int const layer = blockIdx.x;
  int const heads = dims.num_kv_heads;
  for (int first = 0; first < heads; first += blockDim.x) {
    int const h = first + static_cast<int>(threadIdx.x);
    std::int64_t const head = dims.head_index(layer, p.seq, h < heads ? h : 0);
    int const count = h < heads ? a.page_counts[head] : 0;
    long long total = 0;
    int const offset = static_cast<int>(block_exclusive_sum(count, total, scratch));
    if (total == 0) continue;
    if (threadIdx.x == 0) push_base = atomicAdd(a.free_count, static_cast<int>(total));
    __syncthreads();
    for (int j = 0; j < count; ++j) {
      a.free_stack[push_base + offset + j] = a.page_table[head * dims.max_pages_per_head + j];
    }
    __syncthreads();
  }
  std::int64_t const first_head = dims.head_index(layer, p.seq, 0);
  std::int64_t const table = static_cast<std::int64_t>(heads) * dims.max_pages_per_head;
  for (std::int64_t i = threadIdx.x; i < table; i += blockDim.x) {
    a.page_table[first_head * dims.max_pages_per_head + i] = -1;
  }
  for (int h = threadIdx.x; h < heads; h += blockDim.x) {
    a.lengths[first_head + h] = 0;
    a.page_counts[first_head + h] = 0;
  }
  if (a.dmc_k_sum != nullptr) {
    std::int64_t const sums = static_cast<std::int64_t>(heads) * dims.head_dim;
    for (std::int64_t i = threadIdx.x; i < sums; i += blockDim.x) {
      a.dmc_k_sum[first_head * dims.head_dim + i] = 0.0f;
      a.dmc_v_sum[first_head * dims.head_dim + i] = 0.0f;
    }
    for (int h = threadIdx.x; h < heads; h += blockDim.x) {
      a.dmc_weight_sum[first_head + h] = 0.0f;
      a.dmc_group_length[first_head + h] = 0;
    }
  }
  if (a.dmc_ring_k != nullptr) {
    std::int64_t const ring = static_cast<std::int64_t>(heads) * dims.dmc_window;
    for (std::int64_t i = threadIdx.x; i < ring * dims.head_dim; i += blockDim.x) {
      a.dmc_ring_k[first_head * dims.dmc_window * dims.head_dim + i] = 0.0f;
      a.dmc_ring_v[first_head * dims.dmc_window * dims.head_dim + i] = 0.0f;
    }
    for (std::int64_t i = threadIdx.x; i < ring; i += blockDim.x) {
      a.dmc_ring_w[first_head * dims.dmc_window + i] = 0.0f;
    }
  }
  if (threadIdx.x == 0) {
    a.tokens_seen[dims.layer_seq(layer, p.seq)] = 0;
    if (layer == 0) a.active[p.seq] = p.active;
  }
}

//! One block: sums lengths and page counts over every (layer, sequence, KV head) and writes
//! the accounting to arrays.stats.
KVC_GLOBAL void stats_kernel(StoreArrays const arrays, StoreDims const dims, int const elem_bytes) {
  __shared__ BlockScratch scratch;
  std::int64_t const heads =
      static_cast<std::int64_t>(dims.num_layers) * dims.max_seqs * dims.num_kv_heads;
  long long slots = 0;
  long long pages = 0;
  for (std::int64_t i = threadIdx.x; i < heads; i += blockDim.x) {
    slots += arrays.lengths[i];
    pages += arrays.page_counts[i];
  }
  slots = block_sum(slots, scratch);
  pages = block_sum(pages, scratch);
  if (threadIdx.x == 0) {
    long long const row_bytes = 2LL * dims.head_dim * elem_bytes;
    StoreStats stats;
    stats.slots_used = slots;
    stats.pages_held = pages;
    stats.pages_free = *arrays.free_count;
    stats.slack_slots = pages * dims.page_size - slots;
    stats.bytes_in_use = slots * row_bytes;
    stats.bytes_held = pages * dims.page_size * row_bytes;
    *arrays.stats = stats;
  }
}

}  // namespace kvc::detail
