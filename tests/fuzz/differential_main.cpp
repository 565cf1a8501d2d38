//! @file
//! kvc_fuzz_differential: differential fuzzing of the CPU reference against the naive model
//! (tests/support/naive_model_fuzz.hpp) for a time or case budget. Every failure prints the
//! case's seed; `--case SEED` replays exactly that case.
//!
//! usage: kvc_fuzz_differential [--seconds S] [--cases N] [--seed RUN_SEED] [--case SEED]
//!   --seconds S   stop starting new cases after S seconds (default 25)
//!   --cases N     stop after N cases (default: no limit; with --seconds, whichever comes first)
//!   --seed S      run seed (default KVC_TEST_SEED, else fresh); case i has seed case_seed(S, i)
//!   --case SEED   run only the case with this seed (printed by a failure), verbosely
//!   --keep-going  run on after a failure (report every failing seed)
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "naive_model_fuzz.hpp"

namespace {

bool parse_u64(char const* text, std::uint64_t& out) {
  char* end = nullptr;
  unsigned long long const value = std::strtoull(text, &end, 10);
  if (end == text || *end != '\0') return false;
  out = value;
  return true;
}

int usage() {
  std::fprintf(stderr,
               "usage: kvc_fuzz_differential [--seconds S] [--cases N] [--seed RUN_SEED] "
               "[--case SEED] [--keep-going]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace kvc::test::naive;
  std::uint64_t seconds = 25, max_cases = 0, run_seed = 0, one_case = 0;
  bool have_seed = false, have_case = false, keep_going = false;
  for (int i = 1; i < argc; ++i) {
    std::string const argument = argv[i];
    char const* value = i + 1 < argc ? argv[i + 1] : nullptr;
    if (argument == "--keep-going") {
      keep_going = true;
      continue;
    }
    if (value == nullptr) return usage();
    ++i;
    bool ok = true;
    if (argument == "--seconds") {
      ok = parse_u64(value, seconds);
    } else if (argument == "--cases") {
      ok = parse_u64(value, max_cases);
    } else if (argument == "--seed") {
      ok = have_seed = parse_u64(value, run_seed);
    } else if (argument == "--case") {
      ok = have_case = parse_u64(value, one_case);
    } else {
      ok = false;
    }
    if (!ok) return usage();
  }
  if (have_case) {
    FuzzStats stats;
    std::string const failure = run_case(one_case, stats);
    std::printf("case seed %llu: %s\n", static_cast<unsigned long long>(one_case),
                failure.empty() ? "passed" : failure.c_str());
    return failure.empty() ? 0 : 1;
  }
  if (!have_seed) {
    if (char const* fixed = std::getenv("KVC_TEST_SEED")) {
      have_seed = parse_u64(fixed, run_seed);
    }
    if (!have_seed) {
      std::random_device device;
      run_seed = static_cast<std::uint64_t>(device()) << 32 | device();
    }
  }
  std::printf(
      "kvc_fuzz_differential: run seed %llu (replay the run: --seed %llu or "
      "KVC_TEST_SEED=%llu), budget %llu s%s\n",
      static_cast<unsigned long long>(run_seed), static_cast<unsigned long long>(run_seed),
      static_cast<unsigned long long>(run_seed), static_cast<unsigned long long>(seconds),
      max_cases > 0 ? (", at most " + std::to_string(max_cases) + " cases").c_str() : "");
  std::fflush(stdout);
  auto const start = std::chrono::steady_clock::now();
  FuzzStats stats;
  int failures = 0;
  std::uint64_t index = 0;
  for (;; ++index) {
    double const elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (elapsed >= static_cast<double>(seconds) || (max_cases > 0 && index >= max_cases)) break;
    std::uint64_t const seed = case_seed(run_seed, index);
    std::string const failure = run_case(seed, stats);
    if (failure.empty()) continue;
    ++failures;
    std::printf("FAILED case %llu: %s\n  replay: kvc_fuzz_differential --case %llu\n",
                static_cast<unsigned long long>(index), failure.c_str(),
                static_cast<unsigned long long>(seed));
    std::fflush(stdout);
    if (!keep_going) break;
  }
  double const elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "kvc_fuzz_differential: %llu cases (full %lld, dmc %lld, h2o %lld, tova %lld), "
      "%lld operations, %lld tokens, %lld rejected calls, %lld evictions, %lld merges, "
      "%lld near-tie choices accepted, %.1f s: %s\n",
      static_cast<unsigned long long>(index), static_cast<long long>(stats.per_policy[0]),
      static_cast<long long>(stats.per_policy[1]), static_cast<long long>(stats.per_policy[2]),
      static_cast<long long>(stats.per_policy[3]), static_cast<long long>(stats.operations),
      static_cast<long long>(stats.tokens), static_cast<long long>(stats.rejected_calls),
      static_cast<long long>(stats.evictions), static_cast<long long>(stats.merges),
      static_cast<long long>(stats.ambiguous_choices), elapsed,
      failures == 0 ? "passed" : "FAILED");
  return failures == 0 && index > 0 ? 0 : 1;
}
