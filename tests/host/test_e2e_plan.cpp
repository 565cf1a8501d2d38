// The end-to-end benchmark's model shapes, policy plans and memory planner
// (benchmarks/e2e/memory_plan.hpp): weight counts against the published model sizes, DMC's
// per-head ratios giving the planned overall compression, slot and page counts per policy, and
// the largest-batch search.
#include <cstdint>
#include <set>

#include <doctest/doctest.h>

#include "../../benchmarks/e2e/memory_plan.hpp"

using namespace kvc::e2e;

TEST_SUITE("host") {
  TEST_CASE("e2e plan: model shapes have the published parameter counts") {
    // Llama-2-7B: 6.74 B parameters; 13B: 13.0 B; 70B: 69.0 B, of which one TP-2 GPU holds half
    // (minus the shared norms, which both GPUs hold).
    CHECK(llama2_7b().params() == 6738415616LL);
    CHECK(llama2_13b().params() == 13015864320LL);
    std::int64_t const shard = llama2_70b_tp2_shard().params();
    CHECK(shard > 34'400'000'000LL);
    CHECK(shard < 34'600'000'000LL);
    // GQA with 8 KV heads: k and v projections are 4x smaller.
    CHECK(llama2_7b().params() - llama2_7b_gqa().params() == 32LL * 2 * 4096 * (4096 - 1024));
    ModelSpec spec;
    CHECK(find_model("13b", spec));
    CHECK(spec.layers == 40);
    CHECK_FALSE(find_model("8b", spec));
  }

  TEST_CASE("e2e plan: DMC per-head ratios average to the planned compression") {
    for (int ratio : {2, 4, 8}) {
      ModelSpec const spec = llama2_7b();
      PolicyRun const run = dmc_run(spec, ratio, 7);
      REQUIRE(run.head_ratios.size() == static_cast<std::size_t>(spec.layers * spec.kv_heads));
      std::set<int> const distinct(run.head_ratios.begin(), run.head_ratios.end());
      CHECK(distinct == std::set<int>{ratio / 2, ratio, 2 * ratio});
      // tokens / slots over all heads at a context every ratio divides: exactly `ratio`.
      std::int64_t const tokens = 4096;
      std::int64_t const slots = slots_per_sequence(spec, run, tokens);
      CHECK(static_cast<double>(tokens) * spec.layers * spec.kv_heads / slots ==
            doctest::Approx(ratio));
      // Heads differ: the shuffle is seeded, so two seeds give two orders of the same multiset.
      PolicyRun const other = dmc_run(spec, ratio, 8);
      CHECK(other.head_ratios != run.head_ratios);
    }
  }

  TEST_CASE("e2e plan: slots and pages per policy") {
    ModelSpec spec = llama2_7b();
    spec.layers = 1;
    spec.kv_heads = 2;
    PolicyRun const full = full_run();
    CHECK(slots_per_sequence(spec, full, 100) == 200);
    CHECK(pages_per_sequence(spec, full, 100, 16) == 2 * 7);  // ceil(100 / 16) = 7
    PolicyRun dmc;
    dmc.kind = CacheKind::kDmc;
    dmc.head_ratios = {1, 4};
    CHECK(slots_per_sequence(spec, dmc, 10) == 10 + 3);  // ceil(10 / 4) = 3
    // DMC reserves one spare slot per head: 11 -> 1 page, 4 -> 1 page.
    CHECK(pages_per_sequence(spec, dmc, 10, 16) == 2);
    CHECK(pages_per_sequence(spec, dmc, 16, 16) == 2 + 1);  // 16 + 1 spare -> 2 pages
    PolicyRun const h2o = eviction_run(CacheKind::kH2O, 4, 4096);
    CHECK(h2o.budget == 1024);
    CHECK(slots_per_sequence(spec, h2o, 100) == 200);
    CHECK(slots_per_sequence(spec, h2o, 5000) == 2 * 1025);  // budget + the step's newcomer
  }

  TEST_CASE("e2e plan: policy strings") {
    ModelSpec const spec = llama2_7b();
    PolicyRun run;
    CHECK(parse_policy("full", spec, 4096, 1, run));
    CHECK(run.kind == CacheKind::kFull);
    CHECK(parse_policy("dmc:8", spec, 4096, 1, run));
    CHECK(run.kind == CacheKind::kDmc);
    CHECK(run.target_ratio == 8);
    CHECK(parse_policy("tova:4", spec, 4096, 1, run));
    CHECK(run.budget == 1024);
    CHECK_FALSE(parse_policy("dmc:3", spec, 4096, 1, run));  // odd: no integer ratio / 2
    CHECK_FALSE(parse_policy("dmc:x", spec, 4096, 1, run));
    CHECK_FALSE(parse_policy("dmc:4x", spec, 4096, 1, run));
    CHECK_FALSE(parse_policy("h2o:1", spec, 4096, 1, run));
    CHECK_FALSE(parse_policy("full:2", spec, 4096, 1, run));
    CHECK_FALSE(parse_policy("lru:4", spec, 4096, 1, run));
  }

  TEST_CASE("e2e plan: largest batch under a budget") {
    auto const linear = [](int batch) { return std::int64_t{1000} + 300LL * batch; };
    CHECK(largest_batch(linear, 1000 + 300 * 17, 1000) == 17);
    CHECK(largest_batch(linear, 1000 + 300 * 17 - 1, 1000) == 16);
    CHECK(largest_batch(linear, 1000 + 300 * 17, 10) == 10);  // capped
    CHECK(largest_batch(linear, 1200, 1000) == 0);            // not even one
  }
}
