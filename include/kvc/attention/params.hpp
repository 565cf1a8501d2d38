//! @file
//! The arguments of one decode-attention call (one layer, one step): a plain struct of device
//! pointers, the layer's paged K/V view, sizes and the caller's workspace. Type-erased (the
//! element type is the runtime `dtype`) so that one entry point dispatches to every compiled
//! instantiation; `make_decode_params` fills it from typed pointers.
//!
//! Tensors (all device memory, row-major, contiguous):
//!   q      [batch, num_q_heads, head_dim]    dtype   RoPE'd query of the step
//!   out    [batch, num_q_heads, head_dim]    dtype   attention output
//!   lse    [batch, num_q_heads]              fp32    natural-log sum of exp(logits) (optional)
//!   probs  [batch, num_q_heads, stride]      fp32    softmax probability per slot (optional)
//! Query head hq reads KV head hq / G, G = num_q_heads / cache.num_kv_heads. Batch row b reads
//! sequence slot seq_slots[b] of the cache (a negative or out-of-range slot marks an inactive
//! row). A (row, KV head) with length 0 gets out = 0 and lse = -inf for its G query heads.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvc/attention/score_hook.hpp"
#include "kvc/cache/paged_view.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/dtype_traits.hpp"

namespace kvc {

//! Everything one decode-attention call reads and writes. Build it, ask
//! `decode_attention_workspace_size` for the workspace bytes, point `workspace` at that much
//! device memory (any contents; it is rewritten every call) and call `decode_attention`.
struct DecodeParams {
  DType dtype = DType::kBF16;               //!< element type of q, out, k_pages and v_pages
  PagedLayerView<void const> cache{};       //!< the layer's paged K/V, page tables and lengths
  void const* q = nullptr;                  //!< [batch, num_q_heads, head_dim], RoPE'd
  std::int32_t const* seq_slots = nullptr;  //!< [batch] sequence slot per row; null: row b is slot b
  int batch = 0;                            //!< rows of q/out (0: nothing to do)
  int num_q_heads = 0;                      //!< a multiple of cache.num_kv_heads
  float scale = 0.0f;                       //!< softmax scale; 0 means 1/sqrt(head_dim)
  float logits_soft_cap = 0.0f;             //!< cap of SoftCapVariant (ignored by the default)
  void* out = nullptr;                      //!< [batch, num_q_heads, head_dim]
  float* lse = nullptr;                     //!< [batch, num_q_heads] natural-log LSE, or null
  ScoreHook scores{};  //!< per-slot scores (H2O/TOVA; score_hook.hpp), or probs null
  void* workspace = nullptr;                //!< device scratch of `workspace_bytes` bytes
  std::size_t workspace_bytes = 0;
  bool programmatic_launch = true;  //!< launch the plan kernel and the attention kernel
                                    //!< with programmatic dependent launch (sm_90;
                                    //!< explicit streams only, not the legacy stream 0):
                                    //!< each launch overlaps the kernel before it, which
                                    //!< it waits for before touching memory
  //! How the device plan splits heads into chunks (tuning; zeros = the library's defaults).
  //! `waves`: chunks per persistent CTA the plan aims for, 1..4 (default 1); `min_chunk`:
  //! the smallest chunk, a multiple of 64 slots (default 256). Fewer, larger chunks mean fewer
  //! split-KV merges and item epilogues, at the price of balance. Results do not depend on it
  //! beyond rounding (the merge order is fixed per head). `schedule`: how the persistent CTAs
  //! take the size-sorted items: 1 snake (static: CTA c takes c, 2P-1-c, 2P+c, ...), 2 greedy
  //! (the first two rounds as snake, then each CTA claims the next unclaimed item from an
  //! atomic counter two items ahead of its producer), 3 balanced (no size sort: the heads'
  //! slots in head order are cut into one contiguous, equal share per CTA, a head crossing a
  //! share's end is split there; `waves` is ignored, `min_chunk` bounds the share from below),
  //! 0 the default: greedy when the plan made at least 3 items per CTA, snake otherwise
  //! (measured on an H200, benchmarks/RESULTS.md).
  struct SplitPolicy {
    int waves = 0;
    int min_chunk = 0;
    int schedule = 0;
  } split{};

  //! Query heads per KV head (0 when the head counts are inconsistent).
  int group_size() const {
    return cache.num_kv_heads > 0 && num_q_heads % cache.num_kv_heads == 0
               ? num_q_heads / cache.num_kv_heads
               : 0;
  }
};

//! The same view with its element type erased (what DecodeParams holds).
template <class T>
PagedLayerView<void const> erase_element_type(PagedLayerView<T> const& view) {
  PagedLayerView<void const> erased;
  erased.k_pages = view.k_pages;
  erased.v_pages = view.v_pages;
  erased.score_pages = view.score_pages;
  erased.position_pages = view.position_pages;
  erased.page_table = view.page_table;
  erased.lengths = view.lengths;
  erased.page_size = view.page_size;
  erased.head_dim = view.head_dim;
  erased.num_kv_heads = view.num_kv_heads;
  erased.max_pages_per_head = view.max_pages_per_head;
  erased.max_seqs = view.max_seqs;
  return erased;
}

//! DecodeParams from typed pointers; dtype follows T. Workspace, scores and scale stay default.
template <class T>
DecodeParams make_decode_params(PagedLayerView<T> const& cache, T const* q,
                                std::int32_t const* seq_slots, int batch, int num_q_heads, T* out,
                                float* lse) {
  DecodeParams params;
  params.dtype = DTypeTraits<T>::kDType;
  params.cache = erase_element_type(cache);
  params.q = q;
  params.seq_slots = seq_slots;
  params.batch = batch;
  params.num_q_heads = num_q_heads;
  params.out = out;
  params.lse = lse;
  return params;
}

}  // namespace kvc
