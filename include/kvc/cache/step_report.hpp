//! @file
//! What the store reports back without synchronising: the step report that
//! `prepare_decode_step` fills on the device (did the step get its pages, and which batch rows
//! did not), and the accounting of the pool (slots and pages in use, free, slack). Both are
//! plain structs the host reads after an asynchronous copy.
#pragma once

#include <cstdint>

#include "kvc/core/status.hpp"

namespace kvc {

//! Why a batch row failed its step (bits of `StepReport::row_flags` and of the per-row flags).
//! (StepContext, below, holds a step's report and row flags on the device.)
enum StepRowFlag : std::int32_t {
  kStepRowOk = 0,
  kStepRowOutOfPages = 1,       //!< the pool had fewer free pages than the row needed
  kStepRowHeadFull = 2,         //!< a head's page table is full (max_pages_per_head reached)
  kStepRowInvalidSequence = 4,  //!< the row's sequence slot is out of range or not active
};

//! Result of one decode step, written on the device by `prepare_decode_step` and read by every
//! later kernel of the step. When `failed` is set, no kernel of the step writes anything: every
//! cache and policy state stays exactly as before the step (pages already taken from the pool
//! stay with their heads as spare capacity, which the accounting counts as slack).
struct StepReport {
  std::int32_t failed = 0;           //!< 1 when the step was refused (nothing was written)
  std::int32_t pages_short = 0;      //!< pages requested but not granted, over the whole batch
  std::int32_t rows_failed = 0;      //!< batch rows with a nonzero flag
  std::int32_t row_flags = 0;        //!< OR of the flags of all rows (StepRowFlag bits)
  std::int32_t protocol_errors = 0;  //!< update/evict calls that found a head without room or a
                                     //!< bad slot: a caller bug (a call without its prepare)
  std::int32_t blocks_done = 0;      //!< internal (arrival counter of the prepare kernel)
};

//! Where a step keeps its report and per-row flags on the device. Every step (decode or prefill)
//! writes its report at its prepare and reads it in each later kernel (a refused step writes
//! nothing). By default a store uses its own one context, so steps must follow each other in
//! stream order; a caller that runs steps on several streams at once (on disjoint sequences)
//! gives each stream its own context (`PagedStore::step_context_bytes`,
//! `PagedStore::init_step_context`) and passes it to every call of that stream's steps.
struct StepContext {
  StepReport* report = nullptr;       //!< [1] device
  std::int32_t* row_flags = nullptr;  //!< [max_seqs] device, StepRowFlag bits per batch row
  std::int32_t* row_short = nullptr;  //!< [max_seqs] device, pages a batch row lacked
};

//! The Status of a step from its report: kSuccess; kErrorInvalidSequence when a row named an
//! unknown or released slot; kErrorOutOfPages when the pool (or a head's page table) could not
//! give a row what it needed; kErrorInternal when an update or evict ran without its prepare.
inline Status step_status(StepReport const& report) {
  if (report.protocol_errors != 0) return Status::kErrorInternal;
  if (report.failed == 0) return Status::kSuccess;
  if ((report.row_flags & kStepRowInvalidSequence) != 0) return Status::kErrorInvalidSequence;
  return Status::kErrorOutOfPages;
}

//! Accounting of the pool, summed over every (layer, sequence, KV head).
struct StoreStats {
  std::int64_t slots_used = 0;    //!< slots holding a token (or a DMC group)
  std::int64_t pages_held = 0;    //!< pages in page tables
  std::int64_t pages_free = 0;    //!< pages on the free stack
  std::int64_t slack_slots = 0;   //!< pages_held * page_size - slots_used
  std::int64_t bytes_in_use = 0;  //!< slots_used * head_dim * 2 (K and V) * sizeof(T)
  std::int64_t bytes_held = 0;    //!< pages_held * page_size * head_dim * 2 * sizeof(T)
};

}  // namespace kvc
