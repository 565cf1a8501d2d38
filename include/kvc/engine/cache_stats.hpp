//! @file
//! `kvc::CacheStats`: a host snapshot of what a `KVCache` holds, for logging, admission control
//! and the examples: the pool accounting (slots, pages, bytes, slack) and the slots and tokens
//! of every (layer, sequence, KV head), with compression ratios. Host-only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/cache/step_report.hpp"

namespace kvc {

//! What a KVCache holds at one point of its stream. Filled by `KVCache::stats_sync`, or by
//! `CacheStats::assign` from the arrays that `KVCache::stats_async` copies.
struct CacheStats {
  int num_layers = 0;
  int max_seqs = 0;
  int num_kv_heads = 0;
  StoreStats store{};                //!< slots, pages held and free, slack, bytes (whole pool)
  std::int64_t device_bytes = 0;     //!< device memory the KVCache allocated (store + scratch)
  std::vector<std::int32_t> slots;   //!< [num_layers, max_seqs, num_kv_heads] slots kept
  std::vector<std::int64_t> tokens;  //!< [num_layers, max_seqs] tokens seen (next position)

  //! Copies the arrays of `KVCache::stats_async` (the sizes above) into this snapshot.
  void assign(int layers, int seqs, int kv_heads, StoreStats const& store_stats,
              std::int32_t const* slot_counts, std::int64_t const* tokens_seen,
              std::int64_t allocated_bytes) {
    num_layers = layers;
    max_seqs = seqs;
    num_kv_heads = kv_heads;
    store = store_stats;
    device_bytes = allocated_bytes;
    std::size_t const heads = static_cast<std::size_t>(layers) * seqs * kv_heads;
    std::size_t const rows = static_cast<std::size_t>(layers) * seqs;
    slots.assign(slot_counts, slot_counts + heads);
    tokens.assign(tokens_seen, tokens_seen + rows);
  }

  //! Slots kept by (layer, sequence, KV head); 0 out of range.
  int slots_of(int layer, int seq, int kv_head) const {
    if (!in_range(layer, seq) || kv_head < 0 || kv_head >= num_kv_heads) return 0;
    return slots[(static_cast<std::size_t>(layer) * max_seqs + seq) * num_kv_heads + kv_head];
  }
  //! Tokens (layer, sequence) has seen; 0 out of range.
  std::int64_t tokens_of(int layer, int seq) const {
    return in_range(layer, seq) ? tokens[static_cast<std::size_t>(layer) * max_seqs + seq] : 0;
  }
  //! Compression ratio of (layer, sequence, KV head): tokens seen / slots kept (1 when empty).
  double compression_ratio(int layer, int seq, int kv_head) const {
    int const kept = slots_of(layer, seq, kv_head);
    return kept == 0 ? 1.0 : static_cast<double>(tokens_of(layer, seq)) / kept;
  }
  //! Slots kept by a sequence over all layers and KV heads.
  std::int64_t sequence_slots(int seq) const {
    std::int64_t total = 0;
    for (int l = 0; l < num_layers; ++l) {
      for (int h = 0; h < num_kv_heads; ++h) total += slots_of(l, seq, h);
    }
    return total;
  }
  //! Compression ratio of a sequence: tokens * layers * KV heads / slots kept (1 when empty).
  double sequence_compression_ratio(int seq) const {
    std::int64_t const kept = sequence_slots(seq);
    if (kept == 0) return 1.0;
    double tokens_all = 0.0;
    for (int l = 0; l < num_layers; ++l) tokens_all += static_cast<double>(tokens_of(l, seq));
    return tokens_all * num_kv_heads / static_cast<double>(kept);
  }
  //! Compression ratio of everything held: tokens * KV heads / slots, over all layers and
  //! sequences (1 when empty).
  double compression_ratio() const {
    if (store.slots_used == 0) return 1.0;
    double tokens_all = 0.0;
    for (std::int64_t t : tokens) tokens_all += static_cast<double>(t);
    return tokens_all * num_kv_heads / static_cast<double>(store.slots_used);
  }

 private:
  bool in_range(int layer, int seq) const {
    return layer >= 0 && layer < num_layers && seq >= 0 && seq < max_seqs;
  }
};

}  // namespace kvc
