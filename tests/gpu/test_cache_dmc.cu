// Paged store, DMC (checkpoint and paper modes, MHA and GQA): random continuous-batching runs
// whose decision neurons make groups outgrow the 12-token window, compared with the CPU
// reference after every step: slots through the page tables, positions, the running sums, ring,
// weight sums, group lengths and tokens seen, q_out (decision dim zeroed) and the oracle
// attention. Plus a pool too small for the batch (refused steps change nothing).
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/reference/dmc.hpp"

#include "support_store.cuh"

using namespace kvc;

namespace {

//! DMC's reference, as run_store_case drives it.
struct DmcModel : test::HeadsModel<reference::DmcLayerState> {
  static State make(reference::LayerSpec const& spec, PolicyConfig const& policy) {
    return reference::make_dmc_state(spec, policy.dmc);
  }
  static Status step(reference::LayerSpec const& spec, PolicyConfig const& policy, State& state,
                     reference::DecodeInput const& input, reference::AttentionOutput& output) {
    return reference::dmc_decode_step(spec, policy.dmc, state, input, output);
  }
  static int zeroed_dim(reference::LayerSpec const& spec, PolicyConfig const& policy) {
    return policy.dmc.decision_index(spec.head_dim);
  }
  //! Sets every decision neuron well clear of the threshold: merge with c.merge_probability.
  static void shape_inputs(std::mt19937_64& rng, test::RunCase const& c,
                           reference::LayerSpec const& spec, PolicyConfig const& policy,
                           std::vector<float>& k) {
    std::uniform_real_distribution<float> margin(0.5f, 3.0f);
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    int const decision = policy.dmc.decision_index(spec.head_dim);
    for (std::size_t head = 0; head * spec.head_dim < k.size(); ++head) {
      bool const merge = unit(rng) < c.merge_probability;
      float const value = policy.dmc.offset + (merge ? margin(rng) : -margin(rng));
      k[head * spec.head_dim + decision] = round_to_dtype(value, spec.dtype);
    }
  }
  template <class T>
  static void compare_state(test::StoreSnapshot<T> const& snap, int layer, int slot,
                            State const& state, std::string const& what) {
    test::compare_heads(snap, layer, slot, state, state.heads, what);
    int const d = snap.dims.head_dim;
    int const window = snap.dims.dmc_window;
    Tolerance const exact{1e-6, 1e-6};  // same operations in the same order: equal up to libm
    for (int h = 0; h < snap.dims.num_kv_heads; ++h) {
      std::string const where =
          what + " slot " + std::to_string(slot) + " kv head " + std::to_string(h);
      std::size_t const head = static_cast<std::size_t>(snap.head_index(layer, slot, h));
      reference::DmcHeadState const& want = state.dmc[static_cast<std::size_t>(h)];
      auto part = [](std::vector<float> const& all, std::size_t first, std::size_t count) {
        return std::vector<float>(all.begin() + static_cast<std::ptrdiff_t>(first),
                                  all.begin() + static_cast<std::ptrdiff_t>(first + count));
      };
      test::require_close(part(snap.k_sum, head * d, d), want.k_sum, exact, where + " k_sum");
      test::require_close(part(snap.v_sum, head * d, d), want.v_sum, exact, where + " v_sum");
      test::require_close(std::vector<float>{snap.weight_sum[head]},
                          std::vector<float>{want.weight_sum}, exact, where + " weight_sum");
      REQUIRE_MESSAGE(snap.group_length[head] == want.group_length, where << ": group length");
      if (window > 0) {
        std::size_t const cells = static_cast<std::size_t>(window);
        test::require_close(part(snap.ring_k, head * cells * d, cells * d), want.ring_k, exact,
                            where + " ring_k");
        test::require_close(part(snap.ring_v, head * cells * d, cells * d), want.ring_v, exact,
                            where + " ring_v");
        test::require_close(part(snap.ring_w, head * cells, cells), want.ring_w, exact,
                            where + " ring_w");
      }
    }
  }
};

test::RunCase dmc_case(char const* name, DmcConfig const& dmc, int group, int page_size,
                       int head_dim, int kv_heads) {
  test::RunCase c = test::shaped_case(name, group, page_size, head_dim, kv_heads);
  c.policy.kind = PolicyKind::kDmc;
  c.policy.dmc = dmc;
  c.steps = 220;
  return c;
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE_TEMPLATE("store dmc: random continuous batching equals the reference", T,
                     KVC_STORE_TEST_DTYPES) {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed() + 2);
    INFO("seed " << test::test_seed());
    std::vector<test::RunCase> cases = {
        dmc_case("checkpoint mha page 1", DmcConfig::checkpoint(), 1, 1, 32, 2),
        dmc_case("checkpoint gqa4 page 16", DmcConfig::checkpoint(), 4, 16, 64, 2),
        dmc_case("checkpoint gqa8 page 64", DmcConfig::checkpoint(), 8, 64, 128, 1),
        dmc_case("paper gqa4 page 16", DmcConfig::paper(), 4, 16, 32, 3),
        dmc_case("paper mha page 64", DmcConfig::paper(), 1, 64, 64, 2),
    };
    cases[3].merge_probability = 0.6;
    cases[3].rope.layout = RopeLayout::kInterleaved;
    cases[4].merge_probability = 0.7;
    test::run_store_cases<T, DmcModel>(
        cases, rng, [](test::RunCase const& c, test::RunSummary const& summary) {
          CHECK(summary.joins > c.target_active);
          if (c.policy.dmc.window > 0)
            CHECK(summary.max_group_length > c.policy.dmc.window);  // crossed the window
          CHECK(summary.max_length < c.steps);                      // merges compressed the cache
        });
  }

  TEST_CASE_TEMPLATE("store dmc: pool exhaustion mid-batch changes nothing, then release and retry",
                     T, KVC_STORE_TEST_DTYPES) {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed() + 3);
    INFO("seed " << test::test_seed());
    test::RunCase c = dmc_case("exhaustion", DmcConfig::checkpoint(), 2, 4, 32, 2);
    c.merge_probability = 0.5;
    test::exhaust_pool(c, 200, 5, 40, 0.0);
    test::RunSummary const summary = test::run_store_case<T, DmcModel>(c, rng);
    if (!test::full_runs()) return;
    CHECK(summary.failed_steps > 0);
    CHECK(summary.retries_succeeded > 0);
    CHECK(summary.steps == c.steps);
  }
}
