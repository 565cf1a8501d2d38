//! @file
//! Helpers for kvc tests: fresh random inputs (never zeros), element-wise comparison against a
//! reference with per-dtype tolerances, and a printed seed for every random case.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kvc/core/dtype.hpp"

namespace kvc::test {

//! A seed drawn fresh per run unless KVC_TEST_SEED is set; printed so a failure can be replayed.
inline std::uint64_t test_seed() {
  static std::uint64_t const seed = [] {
    if (char const* fixed = std::getenv("KVC_TEST_SEED")) return std::uint64_t{std::strtoull(fixed, nullptr, 10)};
    return std::uint64_t{static_cast<std::uint64_t>(std::random_device{}()) << 32 | std::random_device{}()};
  }();
  return seed;
}

//! `count` normal(mean, stddev) values, rounded to `dtype` (representable inputs).
inline std::vector<float> random_normal(std::mt19937_64& rng, std::size_t count, DType dtype = DType::kF32,
                                        float stddev = 1.0f, float mean = 0.0f) {
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> values(count);
  for (float& value : values) value = round_to_dtype(dist(rng), dtype);
  return values;
}

//! Element-wise |actual - expected| <= atol + rtol*|expected| over all elements; reports the
//! first few mismatches with their index. NaN never passes.
inline void require_close(std::vector<float> const& actual, std::vector<float> const& expected,
                          Tolerance tolerance, std::string const& what) {
  REQUIRE_MESSAGE(actual.size() == expected.size(), what << ": size " << actual.size() << " vs " << expected.size());
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    double const a = actual[i];
    double const e = expected[i];
    bool const ok = std::abs(a - e) <= tolerance.atol + tolerance.rtol * std::abs(e);
    if (!ok) {
      if (mismatches < 5) {
        FAIL_CHECK(what << "[" << i << "]: got " << a << ", expected " << e);
      }
      ++mismatches;
    }
  }
  REQUIRE_MESSAGE(mismatches == 0, what << ": " << mismatches << " of " << actual.size() << " elements differ");
}

}  // namespace kvc::test
