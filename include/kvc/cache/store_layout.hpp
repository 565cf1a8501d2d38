//! @file
//! Where every array of the paged store lives in the caller's one device buffer: the pools, the
//! page tables and lengths, the DMC running state, the free-page stack, the step report and the
//! scratch of a step. `compute_store_layout` gives the byte offsets (and the size query),
//! `carve_store_arrays` turns a base pointer into typed pointers. Host-only maths; no CUDA call.
//!
//! Arrays (L layers, S = max_seqs, H = KV heads, D = head dim, W = DMC window, P = pages per head):
//!   k_pages, v_pages      [num_pages, page_size, D]  dtype T
//!   score_pages           [num_pages, page_size]     fp32   (H2O/TOVA only)
//!   position_pages        [num_pages, page_size]     int32  (every policy)
//!   page_table            [L, S, H, P]               int32  page ids
//!   lengths, page_counts  [L, S, H]                  int32  slots used, pages held
//!   tokens_seen           [L, S]                     int64  position of the next token
//!   active                [S]                        int32  1 while the slot holds a sequence
//!   dmc_k_sum, dmc_v_sum  [L, S, H, D]               fp32   (DMC only)
//!   dmc_weight_sum        [L, S, H]                  fp32   (DMC only)
//!   dmc_group_length      [L, S, H]                  int32  (DMC only)
//!   dmc_ring_k, ring_v    [L, S, H, W, D]            fp32   (DMC with a window)
//!   dmc_ring_w            [L, S, H, W]               fp32   (DMC with a window)
//!   free_stack            [num_pages]                int32  free page ids, top at free_count-1
//!   free_count            [1]                        int32
//!   report                [1]                        StepReport
//!   row_flags, row_short  [S]                        int32  per batch row of the last step
//!   step_positions        [L, S]                     int64  per (layer, sequence slot): the
//!                                                           position of the slot's step token
//!   step_rope             [L, S, D/2, 2]             fp32   cos, sin of each RoPE pair at that
//!                                                           position (not with RopeLayout::kNone)
//!   (both indexed by slot, not batch row: steps of disjoint slots on two streams, each with its
//!   own StepContext, must not overwrite each other's)
//!   stats                 [1]                        StoreStats
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "kvc/cache/step_report.hpp"
#include "kvc/cache/store_config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/macros.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

//! The sizes every store kernel indexes with, and the row index maths of the [L, S, H] arrays.
struct StoreDims {
  int num_layers = 0;
  int max_seqs = 0;
  int num_kv_heads = 0;
  int num_q_heads = 0;
  int head_dim = 0;
  int page_size = 0;
  int max_pages_per_head = 0;
  int num_pages = 0;
  int dmc_window = 0;  //!< W (0 when there is no ring)

  static StoreDims of(PagedStoreConfig const& config) {
    return StoreDims{config.shape.num_layers,   config.max_seqs,       config.shape.num_kv_heads,
                     config.shape.num_q_heads,  config.shape.head_dim, config.page_size,
                     config.max_pages_per_head, config.num_pages,      config.dmc_window()};
  }
  KVC_HOST_DEVICE int group_size() const { return num_q_heads / num_kv_heads; }
  //! Row of (layer, seq) in the [L, S] arrays.
  KVC_HOST_DEVICE std::int64_t layer_seq(int layer, int seq) const {
    return static_cast<std::int64_t>(layer) * max_seqs + seq;
  }
  //! Row of (layer, seq, kv head) in the [L, S, H] arrays.
  KVC_HOST_DEVICE std::int64_t head_index(int layer, int seq, int kv_head) const {
    return layer_seq(layer, seq) * num_kv_heads + kv_head;
  }
  //! Pool row (page * page_size + offset) of slot `slot` of the head whose page-table row is
  //! `pages`.
  KVC_HOST_DEVICE std::int64_t slot_row(std::int32_t const* pages, int slot) const {
    return static_cast<std::int64_t>(pages[slot / page_size]) * page_size + slot % page_size;
  }
};

//! Alignment of every array in the buffer (and of the base, which `init` aligns up).
inline constexpr std::size_t kStoreAlignment = 256;

//! Typed device pointers to every array of a store. Trivially copyable; kernels take it by value.
//! Arrays a policy does not use are null.
struct StoreArrays {
  void* k_pages = nullptr;                   //!< [num_pages, page_size, head_dim] dtype
  void* v_pages = nullptr;                   //!< [num_pages, page_size, head_dim] dtype
  float* score_pages = nullptr;              //!< [num_pages, page_size] or null
  std::int32_t* position_pages = nullptr;    //!< [num_pages, page_size]
  std::int32_t* page_table = nullptr;        //!< [L, S, H, P]
  std::int32_t* lengths = nullptr;           //!< [L, S, H]
  std::int32_t* page_counts = nullptr;       //!< [L, S, H]
  std::int64_t* tokens_seen = nullptr;       //!< [L, S]
  std::int32_t* active = nullptr;            //!< [S]
  float* dmc_k_sum = nullptr;                //!< [L, S, H, D] or null
  float* dmc_v_sum = nullptr;                //!< [L, S, H, D] or null
  float* dmc_weight_sum = nullptr;           //!< [L, S, H] or null
  std::int32_t* dmc_group_length = nullptr;  //!< [L, S, H] or null
  float* dmc_ring_k = nullptr;               //!< [L, S, H, W, D] or null
  float* dmc_ring_v = nullptr;               //!< [L, S, H, W, D] or null
  float* dmc_ring_w = nullptr;               //!< [L, S, H, W] or null
  std::int32_t* free_stack = nullptr;        //!< [num_pages]
  std::int32_t* free_count = nullptr;        //!< [1]
  StepReport* report = nullptr;              //!< [1]
  std::int32_t* row_flags = nullptr;         //!< [S]
  std::int32_t* row_short = nullptr;         //!< [S]
  std::int64_t* step_positions = nullptr;    //!< [L, S]
  float* step_rope = nullptr;                //!< [L, S, D/2, 2] or null (no RoPE)
  StoreStats* stats = nullptr;               //!< [1]
};

//! Byte offsets of the arrays from the (aligned) base, in the order listed in the file comment.
//! The metadata region [metadata_begin, metadata_end) is what `init` zeroes; the pools are not
//! touched by `init`.
struct StoreLayout {
  std::size_t k_pages = 0, v_pages = 0, score_pages = 0, position_pages = 0;
  std::size_t page_table = 0, lengths = 0, page_counts = 0, tokens_seen = 0, active = 0;
  std::size_t dmc_k_sum = 0, dmc_v_sum = 0, dmc_weight_sum = 0, dmc_group_length = 0;
  std::size_t dmc_ring_k = 0, dmc_ring_v = 0, dmc_ring_w = 0;
  std::size_t free_stack = 0, free_count = 0, report = 0, row_flags = 0, row_short = 0;
  std::size_t step_positions = 0, step_rope = 0, stats = 0;
  std::size_t metadata_begin = 0;  //!< first byte after the pools
  std::size_t metadata_end = 0;    //!< end of the arrays (a multiple of kStoreAlignment)
  std::size_t bytes = 0;           //!< what the caller must provide: metadata_end + alignment slack
};

namespace detail {

//! Appends arrays to a layout, each aligned to kStoreAlignment, with overflow checks.
class LayoutBuilder {
 public:
  //! Reserves `count * element_bytes` bytes (count may be 0: offset recorded, nothing reserved).
  bool add(std::size_t& offset, std::uint64_t count, std::uint64_t element_bytes) {
    if (element_bytes != 0 && count > kLimit / element_bytes) return fail();
    std::uint64_t const size = count * element_bytes;
    offset = static_cast<std::size_t>(end_);
    if (size > kLimit - end_) return fail();
    end_ = round_up(end_ + size);
    return ok_;
  }
  //! count = product of the factors, overflow-checked.
  static bool product(std::initializer_list<std::uint64_t> factors, std::uint64_t& out) {
    out = 1;
    for (std::uint64_t factor : factors) {
      if (factor != 0 && out > kLimit / factor) return false;
      out *= factor;
    }
    return true;
  }
  std::size_t end() const { return static_cast<std::size_t>(end_); }
  bool ok() const { return ok_; }

 private:
  static constexpr std::uint64_t kLimit = std::uint64_t{1} << 60;
  static std::uint64_t round_up(std::uint64_t value) {
    return (value + kStoreAlignment - 1) / kStoreAlignment * kStoreAlignment;
  }
  bool fail() {
    ok_ = false;
    return false;
  }
  std::uint64_t end_ = 0;
  bool ok_ = true;
};

}  // namespace detail

//! Offsets and total size of every array of a store with `config`. Returns the config's
//! validation error, or kErrorInvalidArgument when the sizes overflow.
inline Status compute_store_layout(PagedStoreConfig const& config, StoreLayout& out) {
  KVC_RETURN_IF_ERROR(config.validate());
  using U = std::uint64_t;
  U const layers = static_cast<U>(config.shape.num_layers);
  U const seqs = static_cast<U>(config.max_seqs);
  U const heads = static_cast<U>(config.shape.num_kv_heads);
  U const dim = static_cast<U>(config.shape.head_dim);
  U const window = static_cast<U>(config.dmc_window());
  bool const dmc = config.has_dmc_state();
  U slots = 0, head_rows = 0, table = 0, layer_seqs = 0, sum_rows = 0, ring_rows = 0, ring_w = 0;
  bool const sizes_ok =
      detail::LayoutBuilder::product(
          {static_cast<U>(config.num_pages), static_cast<U>(config.page_size)}, slots) &&
      detail::LayoutBuilder::product({layers, seqs, heads}, head_rows) &&
      detail::LayoutBuilder::product({head_rows, static_cast<U>(config.max_pages_per_head)},
                                     table) &&
      detail::LayoutBuilder::product({layers, seqs}, layer_seqs) &&
      detail::LayoutBuilder::product({head_rows, dim}, sum_rows) &&
      detail::LayoutBuilder::product({head_rows, window, dim}, ring_rows) &&
      detail::LayoutBuilder::product({head_rows, window}, ring_w);
  if (!sizes_ok) return Status::kErrorInvalidArgument;
  U pool = 0;
  if (!detail::LayoutBuilder::product({slots, dim}, pool)) return Status::kErrorInvalidArgument;

  StoreLayout layout;
  detail::LayoutBuilder builder;
  U const elem = static_cast<U>(dtype_size(config.dtype));
  builder.add(layout.k_pages, pool, elem);
  builder.add(layout.v_pages, pool, elem);
  layout.metadata_begin = builder.end();
  builder.add(layout.score_pages, config.has_scores() ? slots : 0, sizeof(float));
  builder.add(layout.position_pages, slots, sizeof(std::int32_t));
  builder.add(layout.page_table, table, sizeof(std::int32_t));
  builder.add(layout.lengths, head_rows, sizeof(std::int32_t));
  builder.add(layout.page_counts, head_rows, sizeof(std::int32_t));
  builder.add(layout.tokens_seen, layer_seqs, sizeof(std::int64_t));
  builder.add(layout.active, seqs, sizeof(std::int32_t));
  builder.add(layout.dmc_k_sum, dmc ? sum_rows : 0, sizeof(float));
  builder.add(layout.dmc_v_sum, dmc ? sum_rows : 0, sizeof(float));
  builder.add(layout.dmc_weight_sum, dmc ? head_rows : 0, sizeof(float));
  builder.add(layout.dmc_group_length, dmc ? head_rows : 0, sizeof(std::int32_t));
  builder.add(layout.dmc_ring_k, ring_rows, sizeof(float));
  builder.add(layout.dmc_ring_v, ring_rows, sizeof(float));
  builder.add(layout.dmc_ring_w, ring_w, sizeof(float));
  builder.add(layout.free_stack, static_cast<U>(config.num_pages), sizeof(std::int32_t));
  builder.add(layout.free_count, 1, sizeof(std::int32_t));
  builder.add(layout.report, 1, sizeof(StepReport));
  builder.add(layout.row_flags, seqs, sizeof(std::int32_t));
  builder.add(layout.row_short, seqs, sizeof(std::int32_t));
  builder.add(layout.step_positions, layer_seqs, sizeof(std::int64_t));
  bool const rope = config.rope.layout != RopeLayout::kNone;
  builder.add(layout.step_rope, rope ? layer_seqs * dim : 0,
              sizeof(float));  // D/2 pairs x (cos, sin)
  builder.add(layout.stats, 1, sizeof(StoreStats));
  if (!builder.ok()) return Status::kErrorInvalidArgument;
  layout.metadata_end = builder.end();
  layout.bytes = layout.metadata_end + kStoreAlignment - 1;  // room to align an unaligned base
  out = layout;
  return Status::kSuccess;
}

//! Typed pointers into the buffer whose aligned base is `base`. Arrays of size 0 get null.
inline StoreArrays carve_store_arrays(PagedStoreConfig const& config, StoreLayout const& layout,
                                      void* base) {
  auto* bytes = static_cast<unsigned char*>(base);
  auto at = [bytes](std::size_t offset) { return static_cast<void*>(bytes + offset); };
  bool const dmc = config.has_dmc_state();
  bool const ring = dmc && config.dmc_window() > 0;
  StoreArrays a;
  a.k_pages = at(layout.k_pages);
  a.v_pages = at(layout.v_pages);
  a.score_pages = config.has_scores() ? static_cast<float*>(at(layout.score_pages)) : nullptr;
  a.position_pages = static_cast<std::int32_t*>(at(layout.position_pages));
  a.page_table = static_cast<std::int32_t*>(at(layout.page_table));
  a.lengths = static_cast<std::int32_t*>(at(layout.lengths));
  a.page_counts = static_cast<std::int32_t*>(at(layout.page_counts));
  a.tokens_seen = static_cast<std::int64_t*>(at(layout.tokens_seen));
  a.active = static_cast<std::int32_t*>(at(layout.active));
  a.dmc_k_sum = dmc ? static_cast<float*>(at(layout.dmc_k_sum)) : nullptr;
  a.dmc_v_sum = dmc ? static_cast<float*>(at(layout.dmc_v_sum)) : nullptr;
  a.dmc_weight_sum = dmc ? static_cast<float*>(at(layout.dmc_weight_sum)) : nullptr;
  a.dmc_group_length = dmc ? static_cast<std::int32_t*>(at(layout.dmc_group_length)) : nullptr;
  a.dmc_ring_k = ring ? static_cast<float*>(at(layout.dmc_ring_k)) : nullptr;
  a.dmc_ring_v = ring ? static_cast<float*>(at(layout.dmc_ring_v)) : nullptr;
  a.dmc_ring_w = ring ? static_cast<float*>(at(layout.dmc_ring_w)) : nullptr;
  a.free_stack = static_cast<std::int32_t*>(at(layout.free_stack));
  a.free_count = static_cast<std::int32_t*>(at(layout.free_count));
  a.report = static_cast<StepReport*>(at(layout.report));
  a.row_flags = static_cast<std::int32_t*>(at(layout.row_flags));
  a.row_short = static_cast<std::int32_t*>(at(layout.row_short));
  a.step_positions = static_cast<std::int64_t*>(at(layout.step_positions));
  a.step_rope =
      config.rope.layout != RopeLayout::kNone ? static_cast<float*>(at(layout.step_rope)) : nullptr;
  a.stats = static_cast<StoreStats*>(at(layout.stats));
  return a;
}

}  // namespace kvc
