// Core types: dtype conversions (every fp16/bf16 bit pattern, halfway cases, overflow,
// subnormals, NaN, an independent nearest-value search, and CUDA's own host conversions when its
// headers are available), round_to_dtype, parse_dtype, dtype_size; RoPE (norm, relative
// position, composition, layouts as permutations, identities, partners); ModelShape validation;
// Status strings; policy configs and parse_policy.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ios>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/core/dtype.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/core/shape.hpp"
#include "kvc/core/status.hpp"
#include "kvc/policy/kind.hpp"

#include "test_support.hpp"

using namespace kvc;

namespace {

std::uint32_t bits_of(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
float float_of(std::uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

//! fp16 value of a bit pattern, decoded from the IEEE formula (independent of kvc).
double half_value(std::uint16_t bits) {
  int const sign = bits >> 15;
  int const exponent = (bits >> 10) & 0x1f;
  int const mantissa = bits & 0x3ff;
  double magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(double(mantissa), -24);
  } else if (exponent == 31) {
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity()
                              : std::numeric_limits<double>::quiet_NaN();
  } else {
    magnitude = std::ldexp(1.0 + mantissa / 1024.0, exponent - 15);
  }
  return sign ? -magnitude : magnitude;
}

bool half_is_nan(std::uint16_t bits) {
  return (bits & 0x7c00u) == 0x7c00u && (bits & 0x3ffu) != 0;
}
bool bf16_is_nan(std::uint16_t bits) {
  return (bits & 0x7f80u) == 0x7f80u && (bits & 0x7fu) != 0;
}

//! Non-negative magnitudes of a 16-bit format, ascending: [0x0000, limit] plus, as the last
//! entry, the value that overflow rounds against (2^16 for fp16, 2^128 for bf16) mapped to inf.
struct Ladder {
  std::vector<double> value;
  std::vector<std::uint16_t> bits;
};

Ladder half_ladder() {
  Ladder ladder;
  for (std::uint32_t b = 0; b <= 0x7bffu; ++b) {
    ladder.value.push_back(half_value(static_cast<std::uint16_t>(b)));
    ladder.bits.push_back(static_cast<std::uint16_t>(b));
  }
  ladder.value.push_back(65536.0);  // next step after 65504 in the same binade
  ladder.bits.push_back(0x7c00u);
  return ladder;
}

Ladder bf16_ladder() {
  Ladder ladder;
  for (std::uint32_t b = 0; b <= 0x7f7fu; ++b) {
    ladder.value.push_back(double(float_of(b << 16)));
    ladder.bits.push_back(static_cast<std::uint16_t>(b));
  }
  ladder.value.push_back(std::ldexp(1.0, 128));
  ladder.bits.push_back(0x7f80u);
  return ladder;
}

//! Nearest ladder entry to |x| (ties to the even bit pattern), with x's sign; computed in double
//! by binary search, independently of kvc's bit tricks. x must not be NaN.
std::uint16_t nearest_by_search(Ladder const& ladder, float x, std::uint16_t sign_bit) {
  double const a = std::abs(double(x));
  std::uint16_t const sign = std::signbit(x) ? sign_bit : 0;
  if (a >= ladder.value.back()) return static_cast<std::uint16_t>(sign | ladder.bits.back());
  auto const it = std::lower_bound(ladder.value.begin(), ladder.value.end(), a);
  std::size_t const hi = static_cast<std::size_t>(it - ladder.value.begin());
  if (ladder.value[hi] == a) return static_cast<std::uint16_t>(sign | ladder.bits[hi]);
  std::size_t const lo = hi - 1;
  double const down = a - ladder.value[lo];
  double const up = ladder.value[hi] - a;
  std::size_t pick = down < up ? lo : hi;
  if (down == up) pick = (ladder.bits[lo] & 1u) == 0 ? lo : hi;
  return static_cast<std::uint16_t>(sign | ladder.bits[pick]);
}

//! Random floats over every exponent (random bit patterns) and a dense band of ordinary values.
std::vector<float> random_floats(std::mt19937_64& rng, std::size_t count) {
  std::vector<float> values;
  std::uniform_int_distribution<std::uint32_t> bits;
  std::normal_distribution<float> normal(0.0f, 100.0f);
  std::uniform_real_distribution<float> exponent(-30.0f, 20.0f);
  for (std::size_t i = 0; i < count; ++i) {
    switch (i % 3) {
      case 0: values.push_back(float_of(bits(rng))); break;
      case 1: values.push_back(normal(rng)); break;
      default: values.push_back(std::exp2(exponent(rng)) * (i % 2 ? 1.0f : -1.0f)); break;
    }
  }
  return values;
}

double dot(std::vector<float> const& a, std::vector<float> const& b) {
  double sum = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) sum += double(a[i]) * b[i];
  return sum;
}

std::vector<float> roped(std::vector<float> x, RopeConfig const& rope, std::int64_t position) {
  apply_rope(x.data(), static_cast<int>(x.size()), rope, position);
  return x;
}

constexpr RopeLayout kLayouts[] = {RopeLayout::kRotateHalf, RopeLayout::kInterleaved};

}  // namespace

TEST_SUITE("host") {
  TEST_CASE("core dtype: every fp16 and bf16 bit pattern round-trips through float") {
    int half_nans = 0;
    int bf16_nans = 0;
    for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
      std::uint16_t const bits = static_cast<std::uint16_t>(b);
      INFO("bits 0x" << std::hex << b);
      // fp16: the decoded value matches the IEEE formula, and encoding it gives the bits back.
      float const h = half_bits_to_float(bits);
      if (half_is_nan(bits)) {
        ++half_nans;
        REQUIRE(std::isnan(h));
        REQUIRE(half_is_nan(float_to_half_bits(h)));
        CHECK(std::signbit(h) == bool(bits & 0x8000u));
      } else {
        REQUIRE(double(h) == half_value(bits));
        REQUIRE(std::signbit(h) == bool(bits & 0x8000u));  // -0 stays -0
        REQUIRE(float_to_half_bits(h) == bits);
        REQUIRE(round_to_dtype(h, DType::kF16) == h);
      }
      // bf16: the decoded value is the top half of a float.
      float const f = bf16_bits_to_float(bits);
      REQUIRE(bits_of(f) == (b << 16));
      if (bf16_is_nan(bits)) {
        ++bf16_nans;
        REQUIRE(std::isnan(f));
        REQUIRE(bf16_is_nan(float_to_bf16_bits(f)));
      } else {
        REQUIRE(float_to_bf16_bits(f) == bits);
        REQUIRE(round_to_dtype(f, DType::kBF16) == f);
      }
    }
    CHECK(half_nans == 2 * 1023);
    CHECK(bf16_nans == 2 * 127);
  }

  TEST_CASE("core dtype: halfway cases round to even, just off halfway rounds to nearest") {
    // For every pair of adjacent finite values (and the last finite value against the overflow
    // step), the midpoint rounds to the even pattern; one float ulp either side goes to the nearer.
    struct Format {
      char const* name;
      Ladder ladder;
      std::uint16_t (*encode)(float);
    };
    Format const formats[] = {{"fp16", half_ladder(), float_to_half_bits},
                              {"bf16", bf16_ladder(), float_to_bf16_bits}};
    for (Format const& format : formats) {
      Ladder const& ladder = format.ladder;
      for (std::size_t i = 0; i + 1 < ladder.value.size(); ++i) {
        double const lo = ladder.value[i];
        double const hi = ladder.value[i + 1];
        double const mid = 0.5 * (lo + hi);
        if (mid > double(std::numeric_limits<float>::max())) continue;  // not a float
        float const m = static_cast<float>(mid);
        REQUIRE_MESSAGE(double(m) == mid, format.name << ": midpoint not exact");
        std::uint16_t const even = (ladder.bits[i] & 1u) == 0 ? ladder.bits[i] : ladder.bits[i + 1];
        INFO(format.name << " between 0x" << std::hex << ladder.bits[i] << " and 0x"
                         << ladder.bits[i + 1]);
        REQUIRE(format.encode(m) == even);
        REQUIRE(format.encode(-m) == (even | 0x8000u));
        REQUIRE(format.encode(std::nextafter(m, 0.0f)) == ladder.bits[i]);
        REQUIRE(format.encode(std::nextafter(m, INFINITY)) == ladder.bits[i + 1]);
      }
    }
  }

  TEST_CASE("core dtype: overflow, subnormals, NaN and signed zero") {
    // fp16 overflow: 65504 is the largest finite value, 65520 the halfway point to infinity.
    CHECK(float_to_half_bits(65504.0f) == 0x7bffu);
    CHECK(float_to_half_bits(std::nextafter(65520.0f, 0.0f)) == 0x7bffu);
    CHECK(float_to_half_bits(65520.0f) == 0x7c00u);
    CHECK(float_to_half_bits(-1e6f) == 0xfc00u);
    CHECK(float_to_half_bits(std::numeric_limits<float>::max()) == 0x7c00u);
    CHECK(float_to_half_bits(INFINITY) == 0x7c00u);
    CHECK(float_to_half_bits(-INFINITY) == 0xfc00u);
    // bf16 overflow: the largest float is past the halfway point to 2^128.
    CHECK(float_to_bf16_bits(std::numeric_limits<float>::max()) == 0x7f80u);
    CHECK(float_to_bf16_bits(float_of(0x7f7f7fffu)) == 0x7f7fu);
    CHECK(float_to_bf16_bits(float_of(0x7f7f8000u)) == 0x7f80u);
    CHECK(float_to_bf16_bits(-INFINITY) == 0xff80u);

    // fp16 subnormals: 2^-24 is the smallest; 2^-25 is halfway to zero and rounds to zero (even).
    CHECK(float_to_half_bits(std::ldexp(1.0f, -24)) == 0x0001u);
    CHECK(float_to_half_bits(std::ldexp(1.0f, -25)) == 0x0000u);
    CHECK(float_to_half_bits(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001u);
    CHECK(float_to_half_bits(3.0f * std::ldexp(1.0f, -25)) == 0x0002u);
    CHECK(float_to_half_bits(5.0f * std::ldexp(1.0f, -25)) == 0x0002u);
    CHECK(float_to_half_bits(-std::ldexp(1.0f, -24)) == 0x8001u);
    CHECK(float_to_half_bits(std::ldexp(1023.0f, -24)) == 0x03ffu);
    CHECK(float_to_half_bits(std::ldexp(1.0f, -14)) == 0x0400u);
    CHECK(float_to_half_bits(std::ldexp(1.0f, -30)) == 0x0000u);
    CHECK(float_to_half_bits(std::numeric_limits<float>::denorm_min()) == 0x0000u);
    CHECK(half_bits_to_float(0x0001u) == std::ldexp(1.0f, -24));
    // bf16 keeps float subnormals at its own precision.
    CHECK(float_to_bf16_bits(float_of(0x00000001u)) == 0x0000u);
    CHECK(float_to_bf16_bits(float_of(0x00008000u)) == 0x0000u);
    CHECK(float_to_bf16_bits(float_of(0x00018000u)) == 0x0002u);
    CHECK(float_to_bf16_bits(float_of(0x00010000u)) == 0x0001u);
    CHECK(bf16_bits_to_float(0x0001u) == float_of(0x00010000u));

    // NaN stays NaN, including signalling NaNs whose payload sits in the dropped bits.
    for (std::uint32_t nan : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0x7f80ffffu}) {
      INFO("nan 0x" << std::hex << nan);
      CHECK(bf16_is_nan(float_to_bf16_bits(float_of(nan))));
      CHECK(half_is_nan(float_to_half_bits(float_of(nan))));
      CHECK(std::isnan(round_to_dtype(float_of(nan), DType::kF16)));
      CHECK(std::isnan(round_to_dtype(float_of(nan), DType::kBF16)));
      CHECK(std::isnan(round_to_dtype(float_of(nan), DType::kF32)));
    }
    // Signed zeros keep their sign.
    CHECK(float_to_half_bits(-0.0f) == 0x8000u);
    CHECK(float_to_bf16_bits(-0.0f) == 0x8000u);
    CHECK(float_to_half_bits(-std::ldexp(1.0f, -26)) == 0x8000u);
  }

  TEST_CASE("core dtype: random floats convert to the nearest value found by search") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    Ladder const half = half_ladder();
    Ladder const bf16 = bf16_ladder();
    for (float x : random_floats(rng, 60000)) {
      if (std::isnan(x)) continue;
      INFO("x = " << x << " (0x" << std::hex << bits_of(x) << ")");
      REQUIRE(float_to_half_bits(x) == nearest_by_search(half, x, 0x8000u));
      REQUIRE(float_to_bf16_bits(x) == nearest_by_search(bf16, x, 0x8000u));
    }
  }

  TEST_CASE(
      "core dtype: host conversions agree with CUDA's __float2half_rn / __float2bfloat16_rn") {
#if KVC_HAS_CUDA_HEADERS
    std::mt19937_64 rng(test::test_seed() + 1);
    INFO("seed " << test::test_seed());
    std::vector<float> values = random_floats(rng, 200000);
    for (float special : {0.0f, -0.0f, 65504.0f, 65520.0f, std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::denorm_min(), std::ldexp(1.0f, -25), INFINITY,
                          -INFINITY, std::numeric_limits<float>::quiet_NaN()}) {
      values.push_back(special);
    }
    int compared = 0;
    for (float x : values) {
      INFO("x = " << x << " (0x" << std::hex << bits_of(x) << ")");
      half const h = __float2half_rn(x);
      __nv_bfloat16 const b = __float2bfloat16_rn(x);
      std::uint16_t h_bits, b_bits;
      std::memcpy(&h_bits, &h, sizeof h_bits);
      std::memcpy(&b_bits, &b, sizeof b_bits);
      if (std::isnan(x)) {
        CHECK(half_is_nan(h_bits));
        CHECK(half_is_nan(float_to_half_bits(x)));
        CHECK(bf16_is_nan(b_bits));
        CHECK(bf16_is_nan(float_to_bf16_bits(x)));
        continue;
      }
      REQUIRE(float_to_half_bits(x) == h_bits);
      REQUIRE(float_to_bf16_bits(x) == b_bits);
      // The traits go through CUDA's conversions and agree with round_to_dtype.
      REQUIRE(DTypeTraits<half>::to_float(DTypeTraits<half>::from_float(x)) ==
              round_to_dtype(x, DType::kF16));
      REQUIRE(DTypeTraits<__nv_bfloat16>::to_float(DTypeTraits<__nv_bfloat16>::from_float(x)) ==
              round_to_dtype(x, DType::kBF16));
      ++compared;
    }
    CHECK(compared > 190000);
    CHECK(DTypeTraits<half>::kDType == DType::kF16);
    CHECK(DTypeTraits<__nv_bfloat16>::kDType == DType::kBF16);
    CHECK(DTypeTraits<float>::kDType == DType::kF32);
#else
    MESSAGE("kvc: CUDA headers not found: CUDA conversion comparison skipped");
    CHECK(!KVC_HAS_CUDA_HEADERS);
#endif
  }

  TEST_CASE("core dtype: round_to_dtype, parse_dtype, dtype_size, dtype_name") {
    std::mt19937_64 rng(test::test_seed() + 2);
    INFO("seed " << test::test_seed());
    for (float x : random_floats(rng, 3000)) {
      if (std::isnan(x)) continue;
      CHECK(bits_of(round_to_dtype(x, DType::kF32)) == bits_of(x));
      float const h = round_to_dtype(x, DType::kF16);
      float const b = round_to_dtype(x, DType::kBF16);
      CHECK(bits_of(h) == bits_of(half_bits_to_float(float_to_half_bits(x))));
      CHECK(bits_of(b) == bits_of(bf16_bits_to_float(float_to_bf16_bits(x))));
      CHECK(bits_of(round_to_dtype(h, DType::kF16)) == bits_of(h));  // idempotent
      CHECK(bits_of(round_to_dtype(b, DType::kBF16)) == bits_of(b));
    }
    CHECK(round_to_dtype(1.0f + std::ldexp(1.0f, -11), DType::kF16) == 1.0f);  // tie to even
    CHECK(round_to_dtype(1.0f + 3.0f * std::ldexp(1.0f, -11), DType::kF16) ==
          1.0f + std::ldexp(1.0f, -9));
    CHECK(round_to_dtype(1.0f + std::ldexp(1.0f, -8), DType::kBF16) == 1.0f);
    CHECK(round_to_dtype(1.0f + 3.0f * std::ldexp(1.0f, -8), DType::kBF16) ==
          1.0f + std::ldexp(1.0f, -6));
    CHECK(round_to_dtype(0.1f, DType::kF32) == 0.1f);

    struct Case {
      char const* text;
      DType dtype;
    };
    for (Case c :
         {Case{"fp32", DType::kF32}, Case{"float32", DType::kF32}, Case{"f32", DType::kF32},
          Case{"fp16", DType::kF16}, Case{"float16", DType::kF16}, Case{"f16", DType::kF16},
          Case{"half", DType::kF16}, Case{"bf16", DType::kBF16}, Case{"bfloat16", DType::kBF16}}) {
      DType parsed = c.dtype == DType::kF32 ? DType::kBF16 : DType::kF32;
      CHECK_MESSAGE(parse_dtype(c.text, parsed), c.text);
      CHECK(parsed == c.dtype);
    }
    for (char const* bad : {"", "FP16", "fp8", "bf16 ", "float", "int8", "bfloat"}) {
      DType parsed = DType::kF16;
      CHECK_MESSAGE(!parse_dtype(bad, parsed), "'" << bad << "'");
      CHECK(parsed == DType::kF16);  // untouched on failure
    }
    for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
      DType parsed = DType::kF32;
      std::string const name = dtype_name(dtype);  // (a literal would make g++ warn in strcmp)
      CHECK(parse_dtype(name.c_str(), parsed));
      CHECK(parsed == dtype);
    }
    CHECK(dtype_size(DType::kF32) == 4);
    CHECK(dtype_size(DType::kF16) == 2);
    CHECK(dtype_size(DType::kBF16) == 2);
    CHECK(std::string(dtype_name(DType::kF32)) != dtype_name(DType::kF16));
    CHECK(std::string(dtype_name(DType::kF16)) != dtype_name(DType::kBF16));
  }

  TEST_CASE("core rope: norm per pair, identities, partners") {
    std::mt19937_64 rng(test::test_seed() + 3);
    INFO("seed " << test::test_seed());
    std::uniform_int_distribution<std::int64_t> position_dist(1, 1 << 20);
    for (RopeLayout layout : kLayouts) {
      for (int d : {2, 8, 64, 128, 256}) {
        INFO(rope_layout_name(layout) << " D " << d);
        RopeConfig rope;
        rope.layout = layout;
        rope.theta = d == 8 ? 500000.0 : 10000.0;
        for (int trial = 0; trial < 8; ++trial) {
          std::vector<float> const x = test::random_normal(rng, d);
          std::int64_t const position = position_dist(rng);
          std::vector<float> const y = roped(x, rope, position);
          for (int i = 0; i < d; ++i) {
            int const j = rope_partner(i, d, layout);
            if (!rope_is_first(i, d, layout)) continue;
            double const before = double(x[i]) * x[i] + double(x[j]) * x[j];
            double const after = double(y[i]) * y[i] + double(y[j]) * y[j];
            REQUIRE(after == doctest::Approx(before).epsilon(1e-5));
          }
          // Position 0 rotates by nothing: bit-for-bit identity.
          std::vector<float> const zero = roped(x, rope, 0);
          for (int i = 0; i < d; ++i) REQUIRE(bits_of(zero[i]) == bits_of(x[i]));
          // Layout none is the identity at any position.
          RopeConfig none = rope;
          none.layout = RopeLayout::kNone;
          std::vector<float> const same = roped(x, none, position);
          for (int i = 0; i < d; ++i) REQUIRE(bits_of(same[i]) == bits_of(x[i]));
          // A nonzero position does rotate something.
          bool moved = false;
          for (int i = 0; i < d; ++i) moved = moved || y[i] != x[i];
          CHECK(moved);
        }
        // Partners: an involution without fixed points; one first member per pair; same frequency.
        std::set<int> pairs;
        for (int i = 0; i < d; ++i) {
          int const j = rope_partner(i, d, layout);
          REQUIRE(j >= 0);
          REQUIRE(j < d);
          REQUIRE(j != i);
          REQUIRE(rope_partner(j, d, layout) == i);
          REQUIRE(rope_is_first(i, d, layout) != rope_is_first(j, d, layout));
          REQUIRE(rope_pair_index(i, d, layout) == rope_pair_index(j, d, layout));
          pairs.insert(rope_pair_index(i, d, layout));
        }
        CHECK(int(pairs.size()) == d / 2);
      }
    }
    // The layouts pair dims as documented.
    CHECK(rope_partner(0, 8, RopeLayout::kRotateHalf) == 4);
    CHECK(rope_partner(3, 8, RopeLayout::kRotateHalf) == 7);
    CHECK(rope_partner(0, 8, RopeLayout::kInterleaved) == 1);
    CHECK(rope_partner(5, 8, RopeLayout::kInterleaved) == 4);
    CHECK(std::string(rope_layout_name(RopeLayout::kNone)) == "none");
  }

  TEST_CASE("core rope: matches the explicit formula (pair i turns by p * theta^(-2i/D))") {
    std::mt19937_64 rng(test::test_seed() + 6);
    INFO("seed " << test::test_seed());
    std::uniform_int_distribution<std::int64_t> position_dist(0, 5000);
    for (RopeLayout layout : kLayouts) {
      for (int d : {2, 16, 128}) {
        for (double theta : {10000.0, 500000.0}) {
          RopeConfig rope;
          rope.layout = layout;
          rope.theta = theta;
          std::vector<float> const x = test::random_normal(rng, d);
          std::int64_t const p = position_dist(rng);
          INFO(rope_layout_name(layout) << " D " << d << " theta " << theta << " p " << p);
          std::vector<float> const y = roped(x, rope, p);
          for (int i = 0; i < d / 2; ++i) {
            // The dims of pair i in each layout, first member first.
            int const a = layout == RopeLayout::kInterleaved ? 2 * i : i;
            int const b = layout == RopeLayout::kInterleaved ? 2 * i + 1 : i + d / 2;
            double const angle = double(p) * std::pow(theta, -2.0 * i / d);
            double const ya = x[a] * std::cos(angle) - x[b] * std::sin(angle);
            double const yb = x[b] * std::cos(angle) + x[a] * std::sin(angle);
            REQUIRE(std::abs(y[a] - ya) <= 1e-5 * (1.0 + std::abs(ya)));
            REQUIRE(std::abs(y[b] - yb) <= 1e-5 * (1.0 + std::abs(yb)));
          }
        }
      }
    }
  }

  TEST_CASE("core rope: dot products depend only on the relative position, then rotations compose") {
    std::mt19937_64 rng(test::test_seed() + 4);
    INFO("seed " << test::test_seed());
    std::uniform_int_distribution<std::int64_t> position_dist(0, 4096);
    for (RopeLayout layout : kLayouts) {
      for (int d : {4, 64, 128}) {
        INFO(rope_layout_name(layout) << " D " << d);
        RopeConfig rope;
        rope.layout = layout;
        for (int trial = 0; trial < 20; ++trial) {
          std::vector<float> const q = test::random_normal(rng, d);
          std::vector<float> const k = test::random_normal(rng, d);
          std::int64_t const m = position_dist(rng);
          std::int64_t const n = position_dist(rng);
          std::int64_t const shift = position_dist(rng);
          double const norms = std::sqrt(dot(q, q) * dot(k, k));
          double const a = dot(roped(q, rope, m), roped(k, rope, n));
          double const b = dot(roped(q, rope, m + shift), roped(k, rope, n + shift));
          INFO("m " << m << " n " << n << " shift " << shift);
          REQUIRE(std::abs(a - b) <= 1e-5 * norms);
          // The same dot product, computed from the relative angle alone.
          double const relative =
              dot(roped(q, rope, m - n >= 0 ? m - n : 0), roped(k, rope, m - n >= 0 ? 0 : n - m));
          REQUIRE(std::abs(a - relative) <= 1e-5 * norms);
          // Rotating by p then by r is rotating by p + r.
          std::vector<float> const twice = roped(roped(q, rope, m), rope, shift);
          std::vector<float> const once = roped(q, rope, m + shift);
          for (int i = 0; i < d; ++i)
            REQUIRE(std::abs(twice[i] - once[i]) <= 1e-5 * std::sqrt(dot(q, q)));
        }
      }
    }
  }

  TEST_CASE("core rope: rotate-half and interleaved are permutations of each other") {
    std::mt19937_64 rng(test::test_seed() + 5);
    INFO("seed " << test::test_seed());
    std::uniform_int_distribution<std::int64_t> position_dist(0, 100000);
    for (int d : {2, 16, 128}) {
      // Interleaved dims (2i, 2i+1) are rotate-half dims (i, i + D/2).
      std::vector<int> to_half(d);
      for (int i = 0; i < d / 2; ++i) {
        to_half[2 * i] = i;
        to_half[2 * i + 1] = i + d / 2;
      }
      RopeConfig half;
      half.layout = RopeLayout::kRotateHalf;
      RopeConfig interleaved;
      interleaved.layout = RopeLayout::kInterleaved;
      for (int trial = 0; trial < 10; ++trial) {
        std::vector<float> const x = test::random_normal(rng, d);
        std::vector<float> permuted(d);
        for (int i = 0; i < d; ++i) permuted[i] = x[to_half[i]];
        std::int64_t const position = position_dist(rng);
        std::vector<float> const a = roped(x, half, position);
        std::vector<float> const b = roped(permuted, interleaved, position);
        for (int i = 0; i < d; ++i) REQUIRE(bits_of(b[i]) == bits_of(a[to_half[i]]));
      }
    }
  }

  TEST_CASE("core shape: ModelShape validate and validate_for_kernels") {
    CHECK(ModelShape{32, 32, 32, 128}.validate() == Status::kSuccess);
    CHECK(ModelShape{80, 64, 8, 128}.validate() == Status::kSuccess);
    CHECK(ModelShape{1, 6, 2, 6}.validate() == Status::kSuccess);  // any even head dim
    CHECK(ModelShape{1, 1, 1, 2}.validate() == Status::kSuccess);
    CHECK(ModelShape{80, 64, 8, 128}.group_size() == 8);
    for (ModelShape bad :
         {ModelShape{0, 8, 8, 64}, ModelShape{1, 0, 1, 64}, ModelShape{1, 8, 0, 64},
          ModelShape{1, 8, 8, 0}, ModelShape{-1, 8, 8, 64}, ModelShape{1, -8, 8, 64},
          ModelShape{1, 8, -8, 64}, ModelShape{1, 8, 8, -64}, ModelShape{1, 8, 3, 64},
          ModelShape{1, 4, 8, 64}, ModelShape{1, 8, 8, 63}, ModelShape{(1 << 16) + 1, 8, 8, 64},
          ModelShape{1, (1 << 16) + 1, 1, 64}, ModelShape{1, 8, 8, (1 << 16) + 2}}) {
      INFO(bad.num_layers << " " << bad.num_q_heads << " " << bad.num_kv_heads << " "
                          << bad.head_dim);
      CHECK(bad.validate() == Status::kErrorInvalidShape);
      CHECK(bad.validate_for_kernels() == Status::kErrorInvalidShape);
    }
    for (int d : {64, 128, 256}) {
      for (int g : {1, 2, 4, 8}) {
        CHECK(ModelShape{2, 4 * g, 4, d}.validate_for_kernels() == Status::kSuccess);
      }
    }
    CHECK(ModelShape{2, 8, 8, 96}.validate_for_kernels() == Status::kErrorNotSupported);
    CHECK(ModelShape{2, 8, 8, 32}.validate_for_kernels() == Status::kErrorNotSupported);
    CHECK(ModelShape{2, 6, 2, 128}.validate_for_kernels() == Status::kErrorNotSupported);   // G 3
    CHECK(ModelShape{2, 32, 2, 128}.validate_for_kernels() == Status::kErrorNotSupported);  // G 16
    CHECK(ModelShape{2, 6, 2, 128}.validate() == Status::kSuccess);
  }

  TEST_CASE("core status: every value has a distinct, non-empty description") {
    std::set<std::string> seen;
    int const last = static_cast<int>(Status::kErrorInternal);
    for (int value = 0; value <= last; ++value) {
      std::string const text = to_string(static_cast<Status>(value));
      INFO("status " << value << ": " << text);
      CHECK(!text.empty());
      CHECK(text != "unknown status");
      CHECK(seen.insert(text).second);
    }
    CHECK(int(seen.size()) == last + 1);
    CHECK(std::string(to_string(static_cast<Status>(last + 1))) == "unknown status");
    CHECK(std::string(to_string(Status::kSuccess)) == "success");
  }

  TEST_CASE("core policy configs: DMC, H2O and TOVA validate, and PolicyConfig and parse_policy") {
    DmcConfig const checkpoint = DmcConfig::checkpoint();
    DmcConfig const paper = DmcConfig::paper();
    CHECK(checkpoint.validate(128) == Status::kSuccess);
    CHECK(paper.validate(128) == Status::kSuccess);
    CHECK(checkpoint.decision_index(128) == 127);
    CHECK(paper.decision_index(128) == 0);
    CHECK(checkpoint.window == 12);
    CHECK(paper.window == 0);
    DmcConfig dmc = checkpoint;
    dmc.decision_dim = 64;
    CHECK(dmc.validate(64) == Status::kErrorInvalidArgument);
    CHECK(dmc.validate(65) == Status::kSuccess);
    dmc.decision_dim = -65;
    CHECK(dmc.validate(64) == Status::kErrorInvalidArgument);
    dmc.decision_dim = -64;
    CHECK(dmc.validate(64) == Status::kSuccess);
    dmc = checkpoint;
    dmc.window = -1;
    CHECK(dmc.validate(128) == Status::kErrorInvalidArgument);
    dmc.window = kDmcMaxWindow + 1;
    CHECK(dmc.validate(128) == Status::kErrorInvalidArgument);
    dmc.window = kDmcMaxWindow;
    CHECK(dmc.validate(128) == Status::kSuccess);
    dmc = checkpoint;
    dmc.eps = -1e-3f;
    CHECK(dmc.validate(128) == Status::kErrorInvalidArgument);
    dmc.eps = std::numeric_limits<float>::quiet_NaN();
    CHECK(dmc.validate(128) == Status::kErrorInvalidArgument);
    dmc = checkpoint;
    dmc.offset = std::numeric_limits<float>::quiet_NaN();
    CHECK(dmc.validate(128) == Status::kErrorInvalidArgument);

    H2OConfig h2o;
    CHECK(h2o.validate() == Status::kSuccess);
    CHECK(h2o.budget() == h2o.heavy + h2o.recent);
    CHECK(H2OConfig{5, 0}.validate() == Status::kSuccess);
    CHECK(H2OConfig{0, 5}.validate() == Status::kSuccess);
    CHECK(H2OConfig{3, 4}.budget() == 7);
    CHECK(H2OConfig{0, 0}.validate() == Status::kErrorInvalidBudget);
    CHECK(H2OConfig{-1, 5}.validate() == Status::kErrorInvalidBudget);
    CHECK(H2OConfig{5, -1}.validate() == Status::kErrorInvalidBudget);

    CHECK(TovaConfig{}.validate() == Status::kSuccess);
    CHECK(TovaConfig{1, true}.validate() == Status::kSuccess);
    CHECK(TovaConfig{0, false}.validate() == Status::kErrorInvalidBudget);
    CHECK(TovaConfig{-3, false}.validate() == Status::kErrorInvalidBudget);

    // PolicyConfig validates the selected policy only.
    PolicyConfig policy;
    policy.h2o = H2OConfig{0, 0};
    policy.tova = TovaConfig{0, false};
    policy.dmc.window = -1;
    policy.kind = PolicyKind::kFull;
    CHECK(policy.validate(128) == Status::kSuccess);
    policy.kind = PolicyKind::kH2O;
    CHECK(policy.validate(128) == Status::kErrorInvalidBudget);
    policy.kind = PolicyKind::kTova;
    CHECK(policy.validate(128) == Status::kErrorInvalidBudget);
    policy.kind = PolicyKind::kDmc;
    CHECK(policy.validate(128) == Status::kErrorInvalidArgument);
    PolicyConfig good;
    for (PolicyKind kind :
         {PolicyKind::kFull, PolicyKind::kDmc, PolicyKind::kH2O, PolicyKind::kTova}) {
      good.kind = kind;
      CHECK(good.validate(128) == Status::kSuccess);
      PolicyKind parsed = kind == PolicyKind::kFull ? PolicyKind::kTova : PolicyKind::kFull;
      CHECK(parse_policy(policy_name(kind), parsed));
      CHECK(parsed == kind);
    }
    std::set<std::string> names;
    for (PolicyKind kind :
         {PolicyKind::kFull, PolicyKind::kDmc, PolicyKind::kH2O, PolicyKind::kTova}) {
      names.insert(policy_name(kind));
    }
    CHECK(names.size() == 4u);
    for (char const* bad : {"", "H2O", "gqa", "tova ", "fulll", "snapkv"}) {
      PolicyKind parsed = PolicyKind::kDmc;
      CHECK_MESSAGE(!parse_policy(bad, parsed), "'" << bad << "'");
      CHECK(parsed == PolicyKind::kDmc);
    }
  }
}
