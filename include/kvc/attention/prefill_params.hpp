//! @file
//! The arguments of one prefill-attention call (one layer, a batch of prompt chunks): a plain,
//! type-erased struct of device pointers, the layer's paged K/V view (the cached prefix of each
//! row), sizes, the optional DMC mask and score output, and the caller's workspace.
//! `make_prefill_params` fills it from typed pointers.
//!
//! Tensors (device memory, row-major, contiguous; T = dtype):
//!   q                  [total_tokens, num_q_heads, head_dim]   T      RoPE'd queries of the chunks
//!   k, v               [total_tokens, num_kv_heads, head_dim]  T      the chunks' keys / values as
//!                                                                    attention sees them (RoPE'd
//!                                                                    keys; DMC: partial means)
//!   cu_tokens          [batch + 1]                int32   row b's chunk is tokens
//!                                                         cu_tokens[b] .. cu_tokens[b + 1] - 1
//!   seq_slots          [batch]                    int32   sequence slot of row b (null: b)
//!   prefix_lengths     [batch, num_kv_heads]      int32   cached slots each (row, KV head) sees
//!                                                         (null: the view's lengths)
//!   chunk_key_visible  [total_tokens, num_kv_heads] uint8 DMC mask (null: plain causal)
//!   out                [total_tokens, num_q_heads, head_dim]   T
//!   lse                [total_tokens, num_q_heads]             fp32   natural-log LSE (optional)
//!   scores.probs       [batch, num_q_heads, scores.stride]     fp32   (optional)
//!
//! Semantics. Query head hq reads KV head h = hq / G. Chunk query i of row b (token
//! cu_tokens[b] + i) attends over the "slots" of (b, h) in this order:
//!   - slot s < P = prefix_lengths[b, h]: cached slot s of sequence seq_slots[b], KV head h
//!     (read through the page table of `cache`), always visible;
//!   - slot P + j, j < n_b: chunk key j (k[cu_tokens[b] + j, h]), visible iff j == i, or j < i
//!     and (chunk_key_visible == null or chunk_key_visible[(cu_tokens[b] + j) * Hkv + h] != 0).
//! The chunk is NOT in the store when attention runs (it is written afterwards).
//! out[t, hq] = sum over visible slots of softmax(logit) * v; logit = transform(scale * q . k);
//! lse[t, hq] = log(sum exp(logit)) (natural log, as DecodeParams::lse). Every query sees at least
//! its own key, so no row is empty. Rows with n_b = 0 are skipped; rows whose sequence slot is
//! negative or >= max_seqs have no prefix (P = 0).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvc/attention/params.hpp"
#include "kvc/cache/paged_view.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/dtype_traits.hpp"

namespace kvc {

//! What prefill attention writes into `PrefillScoreHook::probs`.
enum class PrefillScoreMode : int {
  kNone = 0,       //!< nothing (probs ignored)
  kColumnSum = 1,  //!< H2O: per query head, the sum over the row's chunk queries of the
                   //!< probability each slot received (written, not accumulated)
  kLastRow = 2,    //!< TOVA: the probabilities of the row's last chunk query
};

//! Per-slot probabilities of prefill attention (H2O / TOVA). For row b, query head hq and slot
//! index s < min(P + n_b, stride) (P = prefix length of (b, hq / G); chunk token j at P + j),
//! probs[(b * num_q_heads + hq) * stride + s] is written as described by `mode`; probabilities
//! are exp(logit - lse) rounded to float (as in score_hook.hpp), invisible slots contribute 0.
//! Entries at s >= P + n_b are not written.
struct PrefillScoreHook {
  float* probs = nullptr;  //!< [batch, num_q_heads, stride], or null
  int stride = 0;          //!< >= the longest P + n_b that must be written
  PrefillScoreMode mode = PrefillScoreMode::kNone;

  KVC_HOST_DEVICE std::int64_t index(int row, int q_head, int slot, int num_q_heads) const {
    return (static_cast<std::int64_t>(row) * num_q_heads + q_head) * stride + slot;
  }
  KVC_HOST_DEVICE bool enabled() const {
    return probs != nullptr && mode != PrefillScoreMode::kNone;
  }
};

//! Everything one prefill-attention call reads and writes. Build it, ask
//! `prefill_attention_workspace_size` for the workspace bytes, point `workspace` at that much
//! device memory (any contents; rewritten every call) and call `prefill_attention`.
struct PrefillParams {
  DType dtype = DType::kBF16;                    //!< element type of q, k, v, out and the pools
  PagedLayerView<void const> cache{};            //!< the layer's paged K/V (cached prefixes)
  void const* q = nullptr;                       //!< [total_tokens, num_q_heads, head_dim]
  void const* k = nullptr;                       //!< [total_tokens, num_kv_heads, head_dim]
  void const* v = nullptr;                       //!< [total_tokens, num_kv_heads, head_dim]
  std::int32_t const* cu_tokens = nullptr;       //!< [batch + 1] chunk boundaries (device)
  std::int32_t const* seq_slots = nullptr;       //!< [batch] or null (row b is slot b)
  std::int32_t const* prefix_lengths = nullptr;  //!< [batch, num_kv_heads] or null (view lengths)
  std::uint8_t const* chunk_key_visible =
      nullptr;           //!< [total_tokens, num_kv_heads] or null (causal)
  int batch = 0;         //!< rows (chunks); 0: nothing to do
  int total_tokens = 0;  //!< rows of q/k/v/out; an upper bound of cu_tokens[batch] (host-known)
  int num_q_heads = 0;   //!< a multiple of cache.num_kv_heads
  float scale = 0.0f;    //!< softmax scale; 0 means 1/sqrt(head_dim)
  float logits_soft_cap = 0.0f;  //!< cap of SoftCapVariant (ignored by the default)
  void* out = nullptr;           //!< [total_tokens, num_q_heads, head_dim]
  float* lse = nullptr;          //!< [total_tokens, num_q_heads] natural-log LSE, or null
  PrefillScoreHook scores{};     //!< per-slot probabilities (H2O / TOVA), or mode kNone
  void* workspace = nullptr;     //!< device scratch of `workspace_bytes` bytes, 16-byte aligned
  std::size_t workspace_bytes = 0;
  bool programmatic_launch = true;  //!< overlap the attention kernel's launch with the plan
                                    //!< kernel (programmatic dependent launch; explicit streams)

  //! Query heads per KV head (0 when the head counts are inconsistent).
  int group_size() const {
    return cache.num_kv_heads > 0 && num_q_heads % cache.num_kv_heads == 0
               ? num_q_heads / cache.num_kv_heads
               : 0;
  }
};

//! PrefillParams from typed pointers; dtype follows T. Workspace, scores, mask, prefix lengths
//! and scale stay default.
template <class T>
PrefillParams make_prefill_params(PagedLayerView<T> const& cache, T const* q, T const* k,
                                  T const* v, std::int32_t const* cu_tokens,
                                  std::int32_t const* seq_slots, int batch, int total_tokens,
                                  int num_q_heads, T* out, float* lse) {
  PrefillParams params;
  params.dtype = DTypeTraits<T>::kDType;
  params.cache = erase_element_type(cache);
  params.q = q;
  params.k = k;
  params.v = v;
  params.cu_tokens = cu_tokens;
  params.seq_slots = seq_slots;
  params.batch = batch;
  params.total_tokens = total_tokens;
  params.num_q_heads = num_q_heads;
  params.out = out;
  params.lse = lse;
  return params;
}

//! The DecodeParams a decode variant is built from for a prefill call (dtype, cache, head counts,
//! scale and soft cap carried over), so that a DecodeVariant serves prefill unchanged.
inline DecodeParams decode_params_of(PrefillParams const& params) {
  DecodeParams decode;
  decode.dtype = params.dtype;
  decode.cache = params.cache;
  decode.batch = params.batch;
  decode.num_q_heads = params.num_q_heads;
  decode.scale = params.scale;
  decode.logits_soft_cap = params.logits_soft_cap;
  return decode;
}

}  // namespace kvc
