//! @file
//! Configuration of the GPU paged KV store: the model shape, the storage dtype, the page pool
//! (page size, number of pages), the sequence capacity, the cache policy and RoPE, with
//! validation. Host-only: compiles with a host compiler alone.
#pragma once

#include <cstdint>

#include "kvc/core/dtype.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/core/shape.hpp"
#include "kvc/core/status.hpp"
#include "kvc/policy/kind.hpp"

namespace kvc {

//! Largest head dim the store's kernels handle (one thread per element of a head).
inline constexpr int kStoreMaxHeadDim = 1024;
//! Largest page size (slots per page).
inline constexpr int kStoreMaxPageSize = 1 << 16;
//! Largest number of sequence slots (a batch is a grid dimension of at most 65535 blocks).
inline constexpr int kStoreMaxSeqs = 65535;
//! Default page size (slots per page).
inline constexpr int kStoreDefaultPageSize = 16;

//! Everything that fixes the size and behaviour of a paged store (see docs/paged_store.md).
//! A decode step of one (layer, sequence, KV head) adds at most one slot, so a head needs at most
//! one new page per step.
struct PagedStoreConfig {
  ModelShape shape{};          //!< layers, query heads, KV heads, head dim
  DType dtype = DType::kBF16;  //!< storage dtype of keys and values (and of q/k/v inputs)
  int page_size = kStoreDefaultPageSize;  //!< slots per page
  int num_pages = 0;           //!< pages in the pool (shared by every layer and sequence)
  int max_seqs = 1;            //!< sequence slots (rows of the page tables)
  int max_pages_per_head = 0;  //!< page-table entries per (layer, sequence, KV head)
  PolicyConfig policy{};       //!< cache policy and its parameters
  RopeConfig rope{};           //!< RoPE applied to keys (and to q for attention)

  //! Slots one (layer, sequence, KV head) can hold.
  std::int64_t max_slots_per_head() const {
    return static_cast<std::int64_t>(max_pages_per_head) * page_size;
  }
  //! True for H2O and TOVA: the store keeps fp32 scores per slot.
  bool has_scores() const {
    return policy.kind == PolicyKind::kH2O || policy.kind == PolicyKind::kTova;
  }
  //! True for DMC: the store keeps the running sums, ring and group lengths.
  bool has_dmc_state() const { return policy.kind == PolicyKind::kDmc; }
  //! Ring length of DMC's merge window (0 for other policies or an unbounded window).
  int dmc_window() const { return has_dmc_state() ? policy.dmc.window : 0; }
  //! Slots an evicting policy keeps after a step (H2O: heavy + recent, TOVA: budget); 0 otherwise.
  int eviction_budget() const {
    if (policy.kind == PolicyKind::kH2O) return policy.h2o.budget();
    if (policy.kind == PolicyKind::kTova) return policy.tova.budget;
    return 0;
  }

  //! kSuccess, or the first problem found:
  //! - kErrorInvalidShape: `shape.validate()` fails;
  //! - kErrorNotSupported: head dim above kStoreMaxHeadDim;
  //! - kErrorInvalidArgument: unknown dtype, RoPE layout or policy kind, non-positive theta, a
  //!   page size, page count, sequence count or page-table width out of range, or a head capacity
  //!   (max_pages_per_head * page_size) that does not fit in int32;
  //! - the policy's own validation (DMC parameters: kErrorInvalidArgument; budgets:
  //!   kErrorInvalidBudget);
  //! - kErrorInvalidBudget: an H2O/TOVA head cannot hold budget + 1 slots (the step's newcomer).
  Status validate() const {
    KVC_RETURN_IF_ERROR(shape.validate());
    if (shape.head_dim > kStoreMaxHeadDim) return Status::kErrorNotSupported;
    int const dtype_value = static_cast<int>(dtype);
    if (dtype_value < static_cast<int>(DType::kF32) ||
        dtype_value > static_cast<int>(DType::kBF16)) {
      return Status::kErrorInvalidArgument;
    }
    int const layout = static_cast<int>(rope.layout);
    if (layout < static_cast<int>(RopeLayout::kNone) ||
        layout > static_cast<int>(RopeLayout::kInterleaved) || !(rope.theta > 0.0)) {
      return Status::kErrorInvalidArgument;
    }
    if (page_size < 1 || page_size > kStoreMaxPageSize) return Status::kErrorInvalidArgument;
    if (num_pages < 1 || max_seqs < 1 || max_seqs > kStoreMaxSeqs || max_pages_per_head < 1) {
      return Status::kErrorInvalidArgument;
    }
    if (max_slots_per_head() > INT32_MAX - 1) return Status::kErrorInvalidArgument;
    int const kind = static_cast<int>(policy.kind);
    if (kind < static_cast<int>(PolicyKind::kFull) || kind > static_cast<int>(PolicyKind::kTova)) {
      return Status::kErrorInvalidArgument;
    }
    KVC_RETURN_IF_ERROR(policy.validate(shape.head_dim));
    if (has_scores() && static_cast<std::int64_t>(eviction_budget()) + 1 > max_slots_per_head()) {
      return Status::kErrorInvalidBudget;
    }
    return Status::kSuccess;
  }
};

}  // namespace kvc
