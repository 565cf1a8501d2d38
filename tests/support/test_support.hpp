//! @file
//! Helpers for kvc tests: fresh random inputs (never zeros), element-wise comparison against a
//! reference with per-dtype tolerances (and bit for bit), a printed seed for every random case,
//! and the sanitizer-size switch of the long GPU cases (KVC_STORE_TEST_STEPS).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

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

//! Steps of a random run: `steps`, or fewer when KVC_STORE_TEST_STEPS is set to a positive
//! number below it (for slow tools such as compute-sanitizer's racecheck, ~50-200x slower than a
//! plain run; coverage checks are then skipped, see full_runs()).
inline int run_steps(int steps) {
  if (char const* cap = std::getenv("KVC_STORE_TEST_STEPS")) {
    int const limit = std::atoi(cap);
    if (limit > 0 && limit < steps) return limit;
  }
  return steps;
}

//! False when KVC_STORE_TEST_STEPS is set (to anything): the sanitizer-size mode, in which the
//! long GPU cases run a smaller representative subset (every policy, dtype and code path at
//! least once, shorter prompts and fewer repeats) instead of their full sweep.
inline bool full_runs() {
  return std::getenv("KVC_STORE_TEST_STEPS") == nullptr;
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

//! Bit-for-bit equality of two float arrays (a NaN equals a NaN of the same bits; 0 and -0
//! differ): for results that must not depend on anything but their own inputs. Reports the
//! first few differing elements with their index.
inline void require_same_bits(std::vector<float> const& actual, std::vector<float> const& expected,
                              std::string const& what) {
  REQUIRE_MESSAGE(actual.size() == expected.size(),
                  what << ": size " << actual.size() << " vs " << expected.size());
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    std::uint32_t a = 0, e = 0;
    std::memcpy(&a, &actual[i], sizeof(a));
    std::memcpy(&e, &expected[i], sizeof(e));
    if (a != e) {
      if (mismatches < 5) {
        FAIL_CHECK(what << "[" << i << "]: got " << actual[i] << ", expected " << expected[i]
                        << " (bits differ)");
      }
      ++mismatches;
    }
  }
  REQUIRE_MESSAGE(mismatches == 0,
                  what << ": " << mismatches << " of " << actual.size() << " elements differ");
}

}  // namespace kvc::test
