//! @file
//! The paged KV layout that the store owns and every kernel reads: a plain view of device
//! pointers, with the index maths as host/device functions. No allocation happens here.
//!
//! Memory (one pool per model; pages are handed to any (layer, sequence, KV head)):
//!   k_pages, v_pages   [num_pages, page_size, head_dim]      dtype T
//!   score_pages        [num_pages, page_size]  fp32           H2O/TOVA scores (optional)
//!   position_pages     [num_pages, page_size]  int32          token position of each slot (optional)
//!   page_table         [num_layers, max_seqs, num_kv_heads, max_pages_per_head]  int32 page ids
//!   lengths            [num_layers, max_seqs, num_kv_heads]  int32 slots in use
//! Slot s of a (layer, seq, kv head) lives in page page_table[...][s / page_size] at row
//! s % page_size. A step's batch row b addresses sequence slot seq_slots[b] (continuous
//! batching: rows are rebuilt by the engine, sequence slots are stable).
//! TOVA keeps one index set for all KV heads of a layer; its layer score lives in KV head 0's
//! score pages.
#pragma once

#include <cstdint>

#include "kvc/core/macros.hpp"

namespace kvc {

//! Device view of the paged store for one layer. Trivially copyable; pass by value to kernels.
template <class T>
struct PagedLayerView {
  T* k_pages = nullptr;                  //!< [num_pages, page_size, head_dim]
  T* v_pages = nullptr;                  //!< [num_pages, page_size, head_dim]
  float* score_pages = nullptr;          //!< [num_pages, page_size] or null
  std::int32_t* position_pages = nullptr;  //!< [num_pages, page_size] or null
  std::int32_t* page_table = nullptr;    //!< [max_seqs, num_kv_heads, max_pages_per_head] (this layer)
  std::int32_t* lengths = nullptr;       //!< [max_seqs, num_kv_heads] (this layer)
  int page_size = 16;
  int head_dim = 128;
  int num_kv_heads = 1;
  int max_pages_per_head = 0;
  int max_seqs = 0;

  //! Index of the (seq, kv head) row in `lengths` and of its page-table row.
  KVC_HOST_DEVICE std::int64_t head_index(int seq, int kv_head) const {
    return static_cast<std::int64_t>(seq) * num_kv_heads + kv_head;
  }
  KVC_HOST_DEVICE std::int32_t const* pages_of(int seq, int kv_head) const {
    return page_table + head_index(seq, kv_head) * max_pages_per_head;
  }
  KVC_HOST_DEVICE std::int32_t* pages_of(int seq, int kv_head) {
    return page_table + head_index(seq, kv_head) * max_pages_per_head;
  }
  //! Offset (in rows of head_dim elements, i.e. slots) of slot `slot` of a head in the pools.
  KVC_HOST_DEVICE std::int64_t row_of(int seq, int kv_head, int slot) const {
    std::int64_t const page = pages_of(seq, kv_head)[slot / page_size];
    return page * page_size + slot % page_size;
  }
  //! Element offset of slot `slot` in k_pages / v_pages.
  KVC_HOST_DEVICE std::int64_t element_of(int seq, int kv_head, int slot) const {
    return row_of(seq, kv_head, slot) * head_dim;
  }
};

}  // namespace kvc
