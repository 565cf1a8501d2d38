// Differential test of the CPU reference against the independent naive model
// (tests/support/naive_model.hpp): random layers, policies and operation sequences, the whole
// state and every output compared after every operation. A few hundred cases here; the
// kvc_fuzz_differential tool (tests/fuzz/differential_main.cpp) runs thousands in CI.
#include <cstdint>
#include <cstdlib>
#include <string>

#include <doctest/doctest.h>

#include "naive_model_fuzz.hpp"
#include "test_support.hpp"

using namespace kvc;

TEST_SUITE("host") {
  TEST_CASE("differential: reference vs naive model on random operation sequences") {
    std::uint64_t const seed = test::test_seed();
    INFO("KVC_TEST_SEED=" << seed);
    test::naive::FuzzStats stats;
    int const cases = 150;
    for (int i = 0; i < cases; ++i) {
      std::uint64_t const case_seed = test::naive::case_seed(seed, static_cast<std::uint64_t>(i));
      std::string const failure = test::naive::run_case(case_seed, stats);
      INFO("replay this case alone: kvc_fuzz_differential --case " << case_seed);
      REQUIRE_MESSAGE(failure.empty(), failure);
    }
    CHECK(stats.cases == cases);
    CHECK(stats.tokens > 0);
  }

  TEST_CASE("differential: every policy and both DMC modes come up within a few hundred seeds") {
    test::naive::FuzzStats stats;
    for (std::uint64_t i = 0; i < 200; ++i) {
      std::string const failure = test::naive::run_case(test::naive::case_seed(7, i), stats);
      REQUIRE_MESSAGE(failure.empty(), failure);
    }
    for (std::int64_t count : stats.per_policy) CHECK(count > 10);
    CHECK(stats.evictions > 0);
    CHECK(stats.merges > 0);
    CHECK(stats.rejected_calls > 0);
  }
}
