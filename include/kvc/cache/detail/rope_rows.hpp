//! @file
//! RoPE with the angle given (`rotate_with`, the arithmetic the update and prefill kernels share
//! with the reference) and `rope_rows_share`, one thread's share of rotating packed token rows:
//! used by the store prefill's prepare kernel, and on the host by the tests, which run every
//! thread's share of a block and compare with the element formula bit for bit.
//! Host and device; needs the CUDA toolkit's headers only for the 16-bit types.
#pragma once

#include <cstdint>

#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/macros.hpp"
#include "kvc/core/math.hpp"
#include "kvc/core/rope.hpp"

namespace kvc::detail {

//! The cos and sin of one RoPE pair's angle.
struct ElementRope {
  float cos = 1.0f;
  float sin = 0.0f;
};

//! kvc::rope_rotate_element with the angle's cos and sin given: the same operations in the
//! same order (the tests compare every rotated key and q with the reference bit for bit).
KVC_HOST_DEVICE float rotate_with(float x, float partner, int dim, int head_dim, RopeLayout layout,
                                  ElementRope const& angle) {
  if (layout == RopeLayout::kNone) return x;
  return rope_is_first(dim, head_dim, layout)
             ? sub_rn(mul_rn(x, angle.cos), mul_rn(partner, angle.sin))
             : add_rn(mul_rn(x, angle.cos), mul_rn(partner, angle.sin));
}

//! Both members of one RoPE pair, rotated: dim `decision` (DMC's decision dim; -1 for none)
//! reads and writes as 0, as update_kernel does element by element.
KVC_HOST_DEVICE void rotate_pair(float a, float b, int first, int second, int d, int decision,
                                 RopeLayout layout, ElementRope const& angle, float& out_a,
                                 float& out_b) {
  a = first == decision ? 0.0f : a;
  b = second == decision ? 0.0f : b;
  out_a = first == decision ? 0.0f : rotate_with(a, b, first, d, layout, angle);
  out_b = second == decision ? 0.0f : rotate_with(b, a, second, d, layout, angle);
}

//! Sixteen bytes of T: the unit of the vector path.
template <class T>
struct alignas(16) RopeVector {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
  T x[kSize];
};

//! True when rope_rows_share takes its vector path for these rows: both pointers 16-byte
//! aligned, and a head dim and row stride whose halves are whole vectors.
template <class T>
KVC_HOST_DEVICE bool rope_rows_vectorised(T const* in, T const* out, int d, int row_stride) {
  constexpr int kVec = RopeVector<T>::kSize;
  return reinterpret_cast<std::uintptr_t>(in) % 16 == 0 &&
         reinterpret_cast<std::uintptr_t>(out) % 16 == 0 && d % (2 * kVec) == 0 &&
         row_stride % (2 * kVec) == 0;
}

//! Where unit `unit` of the vector path lies, for rows of `heads` x `d` elements at `row_stride`
//! (rope_rows_share): its row, head and first dim, and its element offset (of the A half).
struct RopeUnit {
  int row = 0;
  int head = 0;
  int dim0 = 0;
  int offset = 0;
};

//! Units per (row, head) of the vector path: d / kVec vectors of adjacent pairs (interleaved) or
//! pairs / kVec vector pairs (rotate-half and none).
template <class T>
KVC_HOST_DEVICE int rope_units_per_head(int d, RopeLayout layout) {
  constexpr int kVec = RopeVector<T>::kSize;
  return layout == RopeLayout::kInterleaved ? d / kVec : d / 2 / kVec;
}

//! The RopeUnit of `unit` (rope_units_per_head units per head, `heads` heads per row).
template <class T>
KVC_HOST_DEVICE RopeUnit rope_unit_at(int unit, int per_head, int heads, int row_stride, int d) {
  constexpr int kVec = RopeVector<T>::kSize;
  RopeUnit u;
  int const row_head = unit / per_head;
  u.row = row_head / heads;
  u.head = row_head - u.row * heads;
  u.dim0 = (unit - row_head * per_head) * kVec;
  u.offset = u.row * row_stride + u.head * d + u.dim0;
  return u;
}

//! One unit of the vector path rotated: interleaved, `a` holds kVec / 2 adjacent pairs (`b`
//! unused); otherwise `a` holds dims dim0 .. dim0 + kVec - 1 and `b` their partners d / 2 further.
//! `angle_of(dim)` gives the angle of dim's pair; rotate_pair's arithmetic element by element.
template <class T, class AngleOfDim>
KVC_HOST_DEVICE void rope_rotate_unit(RopeVector<T> const& a, RopeVector<T> const& b, int dim0,
                                      int d, int decision, RopeLayout layout,
                                      AngleOfDim const& angle_of, RopeVector<T>& out_a,
                                      RopeVector<T>& out_b) {
  constexpr int kVec = RopeVector<T>::kSize;
  if (layout == RopeLayout::kInterleaved) {
    KVC_UNROLL
    for (int m = 0; m < kVec; m += 2) {
      float r0, r1;
      rotate_pair(DTypeTraits<T>::to_float(a.x[m]), DTypeTraits<T>::to_float(a.x[m + 1]), dim0 + m,
                  dim0 + m + 1, d, decision, layout, angle_of(dim0 + m), r0, r1);
      out_a.x[m] = DTypeTraits<T>::from_float(r0);
      out_a.x[m + 1] = DTypeTraits<T>::from_float(r1);
    }
    return;
  }
  int const pairs = d / 2;
  KVC_UNROLL
  for (int m = 0; m < kVec; ++m) {
    float r0, r1;
    rotate_pair(DTypeTraits<T>::to_float(a.x[m]), DTypeTraits<T>::to_float(b.x[m]), dim0 + m,
                dim0 + m + pairs, d, decision, layout, angle_of(dim0 + m), r0, r1);
    out_a.x[m] = DTypeTraits<T>::from_float(r0);
    out_b.x[m] = DTypeTraits<T>::from_float(r1);
  }
}

//! Thread `thread` of `threads`' share of rotating `count` rows of `heads` x `d` elements, `in`
//! to `out` (not overlapping; row i's heads start at i * row_stride, row_stride >= heads * d:
//! the rows may be a head range of wider rows). `angle_of(i, dim)` gives the angle of row i's
//! pair of `dim`. Every element of the rows' heads is written exactly once over all threads,
//! nothing else. Vector path (rope_rows_vectorised): a unit is 16 bytes of each pair half
//! (rotate-half, and RopeLayout::kNone, which pairs dim j with j + d/2 but leaves both
//! unrotated) or 16 bytes of adjacent pairs (interleaved), loaded and stored as one vector;
//! kBatch units per thread are loaded before any is written, so their loads are in flight
//! together. Otherwise one pair per unit with scalar loads, in the same batches.
template <class T, class AngleOf>
KVC_HOST_DEVICE void rope_rows_share(T const* in, T* out, int count, int heads, int row_stride,
                                     int d, int decision, RopeLayout layout,
                                     AngleOf const& angle_of, int thread, int threads) {
  constexpr int kBatch = 2;
  using Vector = RopeVector<T>;
  int const pairs = d / 2;
  bool const interleaved = layout == RopeLayout::kInterleaved;
  if (rope_rows_vectorised(in, out, d, row_stride)) {
    int const per_head = rope_units_per_head<T>(d, layout);
    int const total = count * heads * per_head;
    for (int step = thread; step < total; step += kBatch * threads) {
      Vector va[kBatch], vb[kBatch];
      RopeUnit units[kBatch];
      KVC_UNROLL
      for (int u = 0; u < kBatch; ++u) {
        int const unit = step + u * threads;
        units[u] = rope_unit_at<T>(unit, per_head, heads, row_stride, d);
        if (unit < total) {
          va[u] = *reinterpret_cast<Vector const*>(in + units[u].offset);
          if (!interleaved) vb[u] = *reinterpret_cast<Vector const*>(in + units[u].offset + pairs);
        }
      }
      KVC_UNROLL
      for (int u = 0; u < kBatch; ++u) {
        if (step + u * threads >= total) break;
        int const row = units[u].row;
        Vector oa, ob;
        rope_rotate_unit<T>(
            va[u], vb[u], units[u].dim0, d, decision, layout,
            [&](int dim) { return angle_of(row, dim); }, oa, ob);
        *reinterpret_cast<Vector*>(out + units[u].offset) = oa;
        if (!interleaved) *reinterpret_cast<Vector*>(out + units[u].offset + pairs) = ob;
      }
    }
    return;
  }
  // Scalar path: one pair per unit.
  int const per_row = heads * pairs;
  int const total = count * per_row;
  for (int step = thread; step < total; step += kBatch * threads) {
    float a[kBatch], b[kBatch];
    int first[kBatch], second[kBatch], row[kBatch], base[kBatch];
    KVC_UNROLL
    for (int u = 0; u < kBatch; ++u) {
      int const index = step + u * threads;
      int const i = index / per_row;
      int const rest = index - i * per_row;
      int const head = rest / pairs;
      int const pair = rest - head * pairs;
      row[u] = i;
      first[u] = interleaved ? 2 * pair : pair;
      second[u] = interleaved ? first[u] + 1 : first[u] + pairs;
      base[u] = i * row_stride + head * d;
      bool const live = index < total;
      a[u] = live ? DTypeTraits<T>::to_float(in[base[u] + first[u]]) : 0.0f;
      b[u] = live ? DTypeTraits<T>::to_float(in[base[u] + second[u]]) : 0.0f;
    }
    KVC_UNROLL
    for (int u = 0; u < kBatch; ++u) {
      if (step + u * threads >= total) break;
      float r0, r1;
      rotate_pair(a[u], b[u], first[u], second[u], d, decision, layout, angle_of(row[u], first[u]),
                  r0, r1);
      out[base[u] + first[u]] = DTypeTraits<T>::from_float(r0);
      out[base[u] + second[u]] = DTypeTraits<T>::from_float(r1);
    }
  }
}

}  // namespace kvc::detail
