// The shared-memory contracts of the prefill attention kernel, checked on the host (no device
// needed; compiled by nvcc with the GPU tests): the 128-byte-swizzled tile layout that the
// wgmma descriptors describe (kvc/attention/wgmma.cuh), the descriptor's bit fields, and the
// shared-memory plan of every (dtype, head dim, group size) instance (PrefillTraits): regions in
// order and inside the budget, wgmma tiles on 1024-byte boundaries, barriers and item slots
// aligned. A layout edit that breaks one of these would otherwise show only as wrong numbers
// on a GPU.
#include <cstdint>
#include <set>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <doctest/doctest.h>

#include "kvc/attention/prefill_kernel.cuh"
#include "kvc/attention/wgmma.cuh"

namespace {

using kvc::detail::PrefillTraits;
using kvc::detail::wgmma_descriptor;
using kvc::detail::wgmma_tile_offset;

// 16-bit elements: a row of `head_dim` elements has head_dim / 8 chunks of 16 bytes.
void check_tile_layout(int rows, int head_dim) {
  CAPTURE(rows);
  CAPTURE(head_dim);
  int const chunks = head_dim / 8;
  int const tile_bytes = rows * head_dim * 2;
  std::set<int> seen;
  for (int row = 0; row < rows; ++row) {
    for (int chunk = 0; chunk < chunks; ++chunk) {
      int const offset = wgmma_tile_offset(rows, row, chunk);
      CAPTURE(row);
      CAPTURE(chunk);
      REQUIRE(offset % 16 == 0);
      REQUIRE(offset >= 0);
      REQUIRE(offset < tile_bytes);
      REQUIRE(seen.insert(offset).second);  // no two chunks share a slot
      // 64-column block (chunk / 8), then rows of 128 bytes: an 8-row group is one 1024-byte
      // swizzle atom whose row r sits at r * 128 and whose chunk c at (c ^ r) * 16.
      int const block = chunk / 8;
      REQUIRE(offset / (rows * 128) == block);
      int const in_block = offset - block * rows * 128;
      REQUIRE(in_block / 1024 == row / 8);
      REQUIRE((in_block % 1024) / 128 == row % 8);
      REQUIRE((in_block % 128) / 16 == ((chunk % 8) ^ (row % 8)));
    }
  }
  REQUIRE(static_cast<int>(seen.size()) * 16 == tile_bytes);  // the tile is covered exactly
}

template <class T, int kHeadDim, int kGroupSize>
void check_plan() {
  using Traits = PrefillTraits<T, kHeadDim, kGroupSize>;
  CAPTURE(kHeadDim);
  CAPTURE(kGroupSize);
  CAPTURE(sizeof(T));
  // Regions in order, none overlapping the next, all inside the per-block limit.
  REQUIRE(Traits::kQBuffers * Traits::kQBytes <= Traits::kStagesOffset);
  REQUIRE(Traits::kStagesOffset + Traits::kStages * Traits::kStageBytes <= Traits::kSrcOffset);
  REQUIRE(Traits::kSrcOffset + Traits::kStages * Traits::kKeys * 16 <= Traits::kFlagOffset);
  REQUIRE(Traits::kFlagOffset + Traits::kStages * Traits::kKeys <= Traits::kWOffset);
  REQUIRE(Traits::kWOffset + Traits::kWarps * kvc::detail::kPrefillMaxSplits * 4 <=
          Traits::kMiscOffset);
  REQUIRE(Traits::kMiscOffset + 16 <= Traits::kLimitOffset);
  REQUIRE(Traits::kLimitOffset + Traits::kQBuffers * Traits::kRows * 4 <= Traits::kBarrierOffset);
  REQUIRE(Traits::kBarrierOffset <= Traits::kItemOffset);
  REQUIRE(Traits::kItemOffset <= Traits::kItemIndexOffset);
  REQUIRE(Traits::kItemIndexOffset <= Traits::kEndOffset);
  REQUIRE(Traits::kEndOffset + Traits::kAlignSlack == Traits::kSmemBytes);
  REQUIRE(Traits::kSmemBytes <= 227 * 1024);
  // Alignment: 16-byte copies and source rows; 8-byte barriers; 16-byte item slots.
  REQUIRE(Traits::kSrcOffset % 16 == 0);
  REQUIRE(Traits::kWOffset % 16 == 0);
  REQUIRE(Traits::kBarrierOffset % 8 == 0);
  REQUIRE(Traits::kItemOffset % 16 == 0);
  if constexpr (Traits::kTensorCores && kHeadDim <= 128) {
    // The wgmma instances: every Q buffer, stage, K and V tile starts a 1024-byte swizzle atom
    // (the kernel aligns the base at run time within kAlignSlack), and the producer warpgroup's
    // copies divide evenly.
    REQUIRE(Traits::kAlignSlack >= 1024 - 16);
    REQUIRE(Traits::kQBytes % 1024 == 0);
    REQUIRE(Traits::kStagesOffset % 1024 == 0);
    REQUIRE(Traits::kStageBytes % 1024 == 0);
    REQUIRE(Traits::kTileBytes % 1024 == 0);
    REQUIRE(Traits::kProducerWarpgroup);
    REQUIRE(Traits::kThreads == Traits::kConsumerThreads + 128);
    REQUIRE(Traits::kRows % 64 == 0);  // whole warpgroups of 64 rows
    // (Traits::tile_offset picks the wgmma layout in sm_90a device code only: not testable here.)
  } else {
    REQUIRE_FALSE(Traits::kProducerWarpgroup);
    REQUIRE(Traits::kThreads == Traits::kConsumerThreads);
  }
  REQUIRE((Traits::kKeys * Traits::kChunks) % Traits::kLoaderThreads == 0);
  REQUIRE((Traits::kRows * Traits::kChunks) % Traits::kLoaderThreads == 0);
}

template <class T, int kHeadDim>
void check_plans() {
  check_plan<T, kHeadDim, 1>();
  check_plan<T, kHeadDim, 2>();
  check_plan<T, kHeadDim, 4>();
  check_plan<T, kHeadDim, 8>();
}

}  // namespace

TEST_CASE("prefill layout: the wgmma tile layout is the 128-byte swizzle, one slot per chunk") {
  for (int rows : {64, 128}) {
    for (int head_dim : {64, 128}) check_tile_layout(rows, head_dim);
  }
}

TEST_CASE("prefill layout: the shared-memory descriptor's fields") {
  // address / 16 in bits 0-13, leading byte offset / 16 in 16-29, stride byte offset / 16 in
  // 32-45, base offset 0, swizzle mode 1 (128 bytes) in 62-63.
  std::uint64_t const d = wgmma_descriptor(0x12340u, 8192u, 1024u);
  CHECK((d & 0x3FFFull) == (0x12340u >> 4));
  CHECK(((d >> 16) & 0x3FFFull) == 8192u / 16);
  CHECK(((d >> 32) & 0x3FFFull) == 1024u / 16);
  CHECK(((d >> 49) & 0x7ull) == 0);
  CHECK((d >> 62) == 1);
  // Adding a k step's byte offset / 16 moves only the address field.
  CHECK(wgmma_descriptor(0x12340u + 32u, 8192u, 1024u) == d + 2);
}

TEST_CASE("prefill layout: a descriptor advanced by a 32-bit add equals the descriptor there") {
  // wgmma_descriptor_advance adds to the low word only (no carry into the stride and swizzle
  // fields): equal to the descriptor built at the moved address for every 1024-byte-aligned tile
  // base of the 227 KB window and every 16-byte offset up to 64 KB (the kernel's k steps and
  // column blocks stay far below), and the address field never wraps.
  int checked = 0;
  for (std::uint32_t base = 0; base < 227u * 1024u; base += 1024u) {
    for (std::uint32_t offset = 0; offset < 64u * 1024u && base + offset < 227u * 1024u;
         offset += 16u * 37u) {
      std::uint64_t const d = wgmma_descriptor(base, 128u * 128u, 1024u);
      std::uint64_t const moved = kvc::detail::wgmma_descriptor_advance(d, offset);
      CHECK(moved == wgmma_descriptor(base + offset, 128u * 128u, 1024u));
      CHECK((moved >> 32) == (d >> 32));
      ++checked;
    }
  }
  CHECK(checked > 10000);
}

TEST_CASE("prefill layout: every instance's shared-memory plan") {
  check_plans<__nv_bfloat16, 64>();
  check_plans<__nv_bfloat16, 128>();
  check_plans<__nv_bfloat16, 256>();
  check_plans<half, 64>();
  check_plans<half, 128>();
  check_plans<half, 256>();
  check_plans<float, 64>();
  check_plans<float, 128>();
  check_plans<float, 256>();
}
