//! @file
//! The cache layouts of the decode benchmarks (bench_decode.cu, experiments/decode_timeline.cu):
//! per-(sequence, KV head) lengths of a full cache, of the DMC-like mixes A and B (a compression
//! ratio from {1, 2, 4, 8, 16} per head with fixed probabilities) or of a fixed budget, the
//! number of cache copies that makes one round of calls read HBM rather than L2, and page
//! tables that scatter every copy's pages at random through a pool. Deterministic for a seed:
//! both programs draw the same layout for the same shape.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace kvc::bench {

//! Seed of the layouts (lengths and page tables) both programs draw, and their most copies.
inline constexpr std::uint64_t kDecodeLayoutSeed = 20261123;
inline constexpr int kDecodeMaxCopies = 64;

//! What each (sequence, KV head) keeps of `length` tokens.
enum class DecodeMix { kFull, kA, kB, kBudget };

//! Host description of one shape's cache.
struct DecodeLayout {
  std::vector<int> lengths;  // [batch, kv_heads] slots kept per (sequence, KV head)
  double tokens = 0.0;       // tokens seen (for the compression ratio)
  double kept = 0.0;         // slots kept, all heads
  int max_pages = 0;         // pages of the longest head
  std::size_t pages_per_copy = 0;
  int copies = 1;  // cache copies a timing rotates over

  std::size_t num_pages() const { return pages_per_copy * static_cast<std::size_t>(copies); }
};

//! Lengths for `mix` (full: `length`; budget: length / 4; A, B: length >> r, r drawn from `rng`
//! with A = {.10, .10, .30, .30, .20}, B = {.02, .05, .18, .35, .40} over r = 0..4), page counts,
//! and the copies (1..max_copies) that make one round of calls read at least 8x `l2_bytes` of
//! K and V (`kv_bytes_per_slot` = 2 * head_dim * element size).
inline DecodeLayout make_decode_layout(DecodeMix mix, int batch, int kv_heads, int length,
                                       int page_size, double kv_bytes_per_slot, int l2_bytes,
                                       int max_copies, std::mt19937_64& rng) {
  DecodeLayout layout;
  layout.lengths.resize(static_cast<std::size_t>(batch) * kv_heads);
  std::vector<double> weights;
  if (mix == DecodeMix::kA) weights = {0.10, 0.10, 0.30, 0.30, 0.20};
  if (mix == DecodeMix::kB) weights = {0.02, 0.05, 0.18, 0.35, 0.40};
  std::discrete_distribution<int> ratio(weights.begin(), weights.end());
  layout.tokens = static_cast<double>(layout.lengths.size()) * length;
  for (int& kept : layout.lengths) {
    if (mix == DecodeMix::kFull) kept = length;
    if (mix == DecodeMix::kBudget) kept = length / 4;
    if (mix == DecodeMix::kA || mix == DecodeMix::kB) kept = length >> ratio(rng);
  }
  layout.kept = std::accumulate(layout.lengths.begin(), layout.lengths.end(), 0.0);
  int const max_length = *std::max_element(layout.lengths.begin(), layout.lengths.end());
  layout.max_pages = (max_length + page_size - 1) / page_size;
  for (int kept : layout.lengths)
    layout.pages_per_copy += static_cast<std::size_t>((kept + page_size - 1) / page_size);
  double const kv_bytes = layout.kept * kv_bytes_per_slot;
  layout.copies = std::clamp(static_cast<int>(8.0 * l2_bytes / kv_bytes) + 1, 1, max_copies);
  return layout;
}

//! Page tables of every copy, [copies, batch * kv_heads, max_pages]: the pages of all copies are
//! a random permutation of pool pages [0, num_pages()), drawn from `rng` (unused entries 0).
inline std::vector<std::int32_t> scattered_page_tables(DecodeLayout const& layout, int page_size,
                                                       std::mt19937_64& rng) {
  std::vector<std::int32_t> permutation(layout.num_pages());
  std::iota(permutation.begin(), permutation.end(), 0);
  std::shuffle(permutation.begin(), permutation.end(), rng);
  std::size_t const table_elems = layout.lengths.size() * static_cast<std::size_t>(layout.max_pages);
  std::vector<std::int32_t> tables(table_elems * static_cast<std::size_t>(layout.copies), 0);
  std::size_t next = 0;
  for (int copy = 0; copy < layout.copies; ++copy) {
    for (std::size_t head = 0; head < layout.lengths.size(); ++head) {
      int const pages = (layout.lengths[head] + page_size - 1) / page_size;
      std::int32_t* row = tables.data() + copy * table_elems + head * layout.max_pages;
      for (int j = 0; j < pages; ++j) row[j] = permutation[next++];
    }
  }
  return tables;
}

}  // namespace kvc::bench
