// rope_rows_share (kvc/cache/detail/rope_rows.hpp), the store prefill's RoPE of packed token rows:
// every thread's share of a block is run here on the host and the rows compared bit for bit with
// the element formula (rotate_with per element, update_kernel's arithmetic), on both paths
// (16-byte vectors on aligned rows, scalar pairs otherwise), every layout, dtype, several head
// dims, head counts, row counts and block sizes, with and without a DMC decision dim; the elements
// around the rows must stay untouched.
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/cache/detail/rope_rows.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/rope.hpp"

#include "test_support.hpp"

using namespace kvc;
using kvc::detail::ElementRope;

namespace {

template <class T>
std::uint32_t bits_of(T value) {
  float const x = DTypeTraits<T>::to_float(value);
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

//! `count` rows of `heads` x `d` elements at an element offset `shift` from a 16-byte boundary,
//! with `kGuard` elements before and after.
template <class T>
struct Rows {
  static constexpr int kGuard = 32;
  std::vector<unsigned char> storage;
  T* data = nullptr;
  int size = 0;

  Rows(int n, int shift) : size(n) {
    storage.resize(sizeof(T) * (static_cast<std::size_t>(n) + 2 * kGuard + 16) + 16);
    auto address = reinterpret_cast<std::uintptr_t>(storage.data());
    address = (address + 15) / 16 * 16 + sizeof(T) * (kGuard + shift);
    data = reinterpret_cast<T*>(address);
    for (int i = -kGuard; i < n + kGuard; ++i) data[i] = DTypeTraits<T>::from_float(-77.0f);
  }
};

//! Rotates heads [first_head, first_head + heads) of `count` rows of `row_heads` heads with every
//! thread's share and checks them element by element; every other element must stay untouched.
template <class T>
void check_rows(RopeLayout layout, int d, int heads, int count, int decision, int threads,
                int shift, std::mt19937_64& rng, int row_heads = 0, int first_head = 0) {
  if (row_heads == 0) row_heads = heads;
  int const n = count * row_heads * d;
  int const pairs = d / 2;
  Rows<T> in(n, shift), out(n, shift);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (int i = 0; i < n; ++i) in.data[i] = DTypeTraits<T>::from_float(normal(rng));
  std::vector<ElementRope> table(static_cast<std::size_t>(count) * pairs);
  for (ElementRope& angle : table) {
    angle.cos = normal(rng);
    angle.sin = normal(rng);
  }
  auto angle_of = [&](int i, int dim) {
    return table[static_cast<std::size_t>(i) * pairs + rope_pair_index(dim, d, layout)];
  };
  for (int thread = 0; thread < threads; ++thread) {
    detail::rope_rows_share(static_cast<T const*>(in.data) + first_head * d,
                            out.data + first_head * d, count, heads, row_heads * d, d, decision,
                            layout, angle_of, thread, threads);
  }
  std::string const what = std::string(rope_layout_name(layout)) + " d " + std::to_string(d) +
                           " heads " + std::to_string(heads) + " of " + std::to_string(row_heads) +
                           " from " + std::to_string(first_head) + " rows " +
                           std::to_string(count) + " decision " + std::to_string(decision) +
                           " threads " + std::to_string(threads) + " shift " +
                           std::to_string(shift);
  INFO(what);
  int wrong = 0;
  int touched = 0;
  for (int i = 0; i < count; ++i) {
    for (int h = 0; h < row_heads; ++h) {
      int const base = (i * row_heads + h) * d;
      if (h < first_head || h >= first_head + heads) {
        for (int x = 0; x < d; ++x)
          touched += DTypeTraits<T>::to_float(out.data[base + x]) != -77.0f;
        continue;
      }
      for (int x = 0; x < d; ++x) {
        int const partner = rope_partner(x, d, layout);
        float const value = x == decision ? 0.0f : DTypeTraits<T>::to_float(in.data[base + x]);
        float const other =
            partner == decision ? 0.0f : DTypeTraits<T>::to_float(in.data[base + partner]);
        float const want =
            x == decision ? 0.0f : detail::rotate_with(value, other, x, d, layout, angle_of(i, x));
        wrong += bits_of(out.data[base + x]) != bits_of(DTypeTraits<T>::from_float(want)) ? 1 : 0;
      }
    }
  }
  CHECK(wrong == 0);
  for (int i = -Rows<T>::kGuard; i < 0; ++i)
    touched += DTypeTraits<T>::to_float(out.data[i]) != -77.0f;
  for (int i = n; i < n + Rows<T>::kGuard; ++i) {
    touched += DTypeTraits<T>::to_float(out.data[i]) != -77.0f;
  }
  CHECK(touched == 0);
}

#if KVC_HAS_CUDA_HEADERS
#define KVC_ROPE_ROWS_TYPES float, half, __nv_bfloat16
#else
#define KVC_ROPE_ROWS_TYPES float
#endif

}  // namespace

TEST_CASE_TEMPLATE("rope rows: every thread's share equals the element formula, both paths", T,
                   KVC_ROPE_ROWS_TYPES) {
  std::mt19937_64 rng(test::test_seed() + 41);
  INFO("seed " << test::test_seed());
  constexpr int kVec = detail::RopeVector<T>::kSize;
  for (RopeLayout layout : {RopeLayout::kRotateHalf, RopeLayout::kInterleaved, RopeLayout::kNone}) {
    for (int d : {40, 64, 128, 256}) {
      for (int shift : {0, 1}) {
        Rows<T> probe(d, shift);
        bool const vector_path = detail::rope_rows_vectorised<T>(probe.data, probe.data, d, 3 * d);
        CHECK(vector_path == (shift == 0 && d % (2 * kVec) == 0));
        for (int decision : {-1, d - 1, 5}) {
          check_rows<T>(layout, d, 3, 7, decision, 96, shift, rng);
        }
        check_rows<T>(layout, d, 32, 16, -1, 256, shift, rng);
        check_rows<T>(layout, d, 1, 1, d - 1, 256, shift, rng);    // fewer units than threads
        check_rows<T>(layout, d, 2, 5, -1, 1, shift, rng);         // one thread does everything
        check_rows<T>(layout, d, 3, 5, -1, 64, shift, rng, 8, 2);  // a head range of wider rows
        check_rows<T>(layout, d, 1, 4, d - 1, 32, shift, rng, 4, 3);
      }
    }
  }
}
