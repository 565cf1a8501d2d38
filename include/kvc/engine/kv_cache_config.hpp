//! @file
//! Configuration of the `kvc::KVCache` facade: the model's attention shape, the storage dtype,
//! the cache policy, RoPE, how many sequences it holds and how long they may grow, with
//! validation and the translation to the paged store's config. Host-only: compiles with a host
//! compiler alone (what the host tests check).
#pragma once

#include <cmath>
#include <cstdint>

#include "kvc/cache/store_config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/core/shape.hpp"
#include "kvc/core/status.hpp"
#include "kvc/policy/kind.hpp"

namespace kvc {

//! Everything that fixes the size and behaviour of a `KVCache`. The policy is a runtime value
//! (`PolicyConfig`), so an engine can switch policies with a flag and one binary.
//!
//! Sizing: `max_seqs` sequences live at once; a decode step has at most `max_batch` rows; one
//! (layer, sequence, KV head) holds at most `max_tokens_per_seq` slots (Full and DMC: DMC keeps
//! at most one slot per token) or `budget + 1` (H2O, TOVA: the budget plus the step's newcomer).
//! The pool has `num_pages` pages of `page_size` slots, shared by every layer and sequence; 0
//! means "enough for every sequence at its longest in every layer and KV head" (no
//! oversubscription). Give a smaller pool to hold more sequences than the worst case allows:
//! a step that cannot get its pages is then refused as a whole (kErrorOutOfPages, nothing
//! written) and the engine releases or preempts sequences.
struct KVCacheConfig {
  ModelShape shape{};          //!< layers, query heads, KV heads (GQA: q = G * kv), head dim
  DType dtype = DType::kBF16;  //!< dtype of the cache and of q, k, v and the attention output
  PolicyConfig policy{};       //!< full, dmc, h2o or tova, and its parameters
  RopeConfig rope{};           //!< RoPE applied to keys and queries (inputs enter pre-RoPE)
  float scale = 0.0f;          //!< softmax scale; 0 means 1/sqrt(head_dim)
  int max_seqs = 1;            //!< sequences held at once (sequence ids are 0..max_seqs-1)
  int max_batch = 0;           //!< rows of a decode step; 0 means max_seqs
  int max_tokens_per_seq = 0;  //!< longest sequence (prompt + generated tokens); > 0 for Full
                               //!< and DMC, ignored by H2O and TOVA (their budget bounds it)
  int page_size = kStoreDefaultPageSize;  //!< slots per page
  int num_pages = 0;                      //!< pages in the pool; 0: the no-oversubscription size
  int max_prefill_tokens = 2048;          //!< prompt tokens of one prefill call, all its sequences
                                  //!< together (sizes the prefill workspace); longer prompts go
                                  //!< in chunks; 0: no prefill workspace (prefill refused)
  int max_prefill_seqs = 1;  //!< sequences of one prefill call (begin_prefill's batch)

  //! Rows of a decode step (max_batch, or max_seqs when it is 0).
  int batch_capacity() const { return max_batch > 0 ? max_batch : max_seqs; }

  //! Slots one (layer, sequence, KV head) may hold: max_tokens_per_seq (Full, DMC) or
  //! budget + 1 (H2O, TOVA).
  std::int64_t slots_per_head() const {
    if (policy.kind == PolicyKind::kH2O) return static_cast<std::int64_t>(policy.h2o.budget()) + 1;
    if (policy.kind == PolicyKind::kTova) return static_cast<std::int64_t>(policy.tova.budget) + 1;
    return max_tokens_per_seq;
  }

  //! Translates to the paged store's config (after validating this one). Returns the first
  //! error of `validate()`.
  Status to_store_config(PagedStoreConfig& out) const {
    KVC_RETURN_IF_ERROR(check_own_fields());
    PagedStoreConfig store;
    store.shape = shape;
    store.dtype = dtype;
    store.page_size = page_size;
    store.max_seqs = max_seqs;
    store.policy = policy;
    store.rope = rope;
    std::int64_t const pages_per_head = (slots_per_head() + page_size - 1) / page_size;
    if (pages_per_head > INT32_MAX) return Status::kErrorInvalidArgument;
    store.max_pages_per_head = static_cast<int>(pages_per_head);
    if (num_pages > 0) {
      store.num_pages = num_pages;
    } else {
      std::int64_t const worst = pages_per_head * max_seqs * shape.num_layers * shape.num_kv_heads;
      if (worst > INT32_MAX) return Status::kErrorInvalidArgument;
      store.num_pages = static_cast<int>(worst);
    }
    KVC_RETURN_IF_ERROR(store.validate());
    out = store;
    return Status::kSuccess;
  }

  //! kSuccess, or the first problem found:
  //! - kErrorInvalidShape: the shape is invalid (`ModelShape::validate`);
  //! - kErrorInvalidArgument: unknown dtype or policy kind, a negative or non-finite scale,
  //!   max_seqs < 1, max_batch < 0 or above max_seqs, num_pages < 0, a page size out of range,
  //!   max_tokens_per_seq < 1 for Full or DMC, max_prefill_tokens < 0, max_prefill_seqs outside
  //!   [1, max_seqs], or sizes that overflow;
  //! - the policy's own validation (kErrorInvalidArgument for DMC parameters,
  //!   kErrorInvalidBudget for H2O/TOVA budgets) and the store's (`PagedStoreConfig::validate`).
  //! Whether decode attention has a kernel for (dtype, head dim, group size) is checked by
  //! `KVCache::create` (it depends on the kernels linked in), not here.
  Status validate() const {
    PagedStoreConfig store;
    return to_store_config(store);
  }

 private:
  Status check_own_fields() const {
    KVC_RETURN_IF_ERROR(shape.validate());
    int const dtype_value = static_cast<int>(dtype);
    if (dtype_value < static_cast<int>(DType::kF32) ||
        dtype_value > static_cast<int>(DType::kBF16)) {
      return Status::kErrorInvalidArgument;
    }
    int const kind = static_cast<int>(policy.kind);
    if (kind < static_cast<int>(PolicyKind::kFull) || kind > static_cast<int>(PolicyKind::kTova)) {
      return Status::kErrorInvalidArgument;
    }
    KVC_RETURN_IF_ERROR(policy.validate(shape.head_dim));
    if (!(scale >= 0.0f) || !std::isfinite(scale)) return Status::kErrorInvalidArgument;
    if (max_seqs < 1 || max_seqs > kStoreMaxSeqs) return Status::kErrorInvalidArgument;
    if (max_batch < 0 || max_batch > max_seqs) return Status::kErrorInvalidArgument;
    if (num_pages < 0) return Status::kErrorInvalidArgument;
    if (page_size < 1 || page_size > kStoreMaxPageSize) return Status::kErrorInvalidArgument;
    if (max_prefill_tokens < 0 || max_prefill_seqs < 1 || max_prefill_seqs > max_seqs) {
      return Status::kErrorInvalidArgument;
    }
    bool const evicting = policy.kind == PolicyKind::kH2O || policy.kind == PolicyKind::kTova;
    if (!evicting && max_tokens_per_seq < 1) return Status::kErrorInvalidArgument;
    return Status::kSuccess;
  }
};

}  // namespace kvc
