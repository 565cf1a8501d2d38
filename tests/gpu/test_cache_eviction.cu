// Paged store, H2O and TOVA (with and without protect_new): random continuous-batching runs of
// hundreds of steps, far past the budget, compared with the CPU reference after every step:
// slot contents in slot order (the newcomer takes the victim's slot), positions, fp32 scores,
// q_out and the oracle attention whose probabilities feed the evict kernel. Plus a pool too
// small for the batch (refused steps change nothing).
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/reference/h2o.hpp"
#include "kvc/reference/tova.hpp"

#include "support_store.cuh"

using namespace kvc;

namespace {

//! H2O's reference, as run_store_case drives it.
struct H2OModel : test::HeadsModel<reference::H2OLayerState> {
  static State make(reference::LayerSpec const& spec, PolicyConfig const&) {
    return reference::make_h2o_state(spec);
  }
  static Status step(reference::LayerSpec const& spec, PolicyConfig const& policy, State& state,
                     reference::DecodeInput const& input, reference::AttentionOutput& output) {
    return reference::h2o_decode_step(spec, policy.h2o, state, input, output);
  }
};

//! TOVA's reference. The store keeps the layer scores once, in KV head 0's score pages; the
//! reference repeats them in every head, so scores are compared for head 0 only.
struct TovaModel : test::HeadsModel<reference::TovaLayerState> {
  static State make(reference::LayerSpec const& spec, PolicyConfig const&) {
    return reference::make_tova_state(spec);
  }
  static Status step(reference::LayerSpec const& spec, PolicyConfig const& policy, State& state,
                     reference::DecodeInput const& input, reference::AttentionOutput& output) {
    return reference::tova_decode_step(spec, policy.tova, state, input, output);
  }
  template <class T>
  static void compare_state(test::StoreSnapshot<T> const& snap, int layer, int slot,
                            State const& state, std::string const& what) {
    std::vector<reference::HeadCache> heads = state.heads;
    for (std::size_t h = 1; h < heads.size(); ++h) heads[h].score.clear();
    test::compare_heads(snap, layer, slot, state, heads, what);
  }
};

test::RunCase h2o_case(char const* name, int heavy, int recent, int group, int page_size,
                       int head_dim, int kv_heads) {
  test::RunCase c = test::shaped_case(name, group, page_size, head_dim, kv_heads);
  c.policy.kind = PolicyKind::kH2O;
  c.policy.h2o = H2OConfig{heavy, recent};
  c.steps = 200;
  c.release_probability = 0.01;
  return c;
}

test::RunCase tova_case(char const* name, int budget, bool protect_new, int group, int page_size,
                        int head_dim, int kv_heads) {
  test::RunCase c = test::shaped_case(name, group, page_size, head_dim, kv_heads);
  c.policy.kind = PolicyKind::kTova;
  c.policy.tova = TovaConfig{budget, protect_new};
  c.steps = 200;
  c.release_probability = 0.01;
  return c;
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE_TEMPLATE("store h2o: random continuous batching equals the reference", T,
                     KVC_STORE_TEST_DTYPES) {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed() + 4);
    INFO("seed " << test::test_seed());
    std::vector<test::RunCase> cases = {
        h2o_case("mha page 1", 12, 8, 1, 1, 32, 2),
        h2o_case("gqa4 page 16, no recent", 20, 0, 4, 16, 64, 2),
        h2o_case("gqa8 page 64", 40, 23, 8, 64, 32, 1),
        h2o_case("mha D256 page 16", 16, 4, 1, 16, 256, 2),
    };
    cases[1].rope.layout = RopeLayout::kInterleaved;
    test::run_store_cases<T, H2OModel>(
        cases, rng, [](test::RunCase const& c, test::RunSummary const& summary) {
          CHECK(summary.max_length == c.policy.h2o.budget());  // ran far past the budget
        });
  }

  TEST_CASE_TEMPLATE("store tova: random continuous batching equals the reference", T,
                     KVC_STORE_TEST_DTYPES) {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed() + 5);
    INFO("seed " << test::test_seed());
    std::vector<test::RunCase> cases = {
        tova_case("mha page 16", 24, false, 1, 16, 32, 3),
        tova_case("gqa4 page 1, protect new", 16, true, 4, 1, 32, 2),
        tova_case("gqa8 page 64, protect new", 50, true, 8, 64, 64, 2),
        tova_case("gqa8 page 16", 30, false, 8, 16, 32, 1),
    };
    cases[2].rope.layout = RopeLayout::kInterleaved;
    test::run_store_cases<T, TovaModel>(
        cases, rng, [](test::RunCase const& c, test::RunSummary const& summary) {
          CHECK(summary.max_length == c.policy.tova.budget);
        });
  }

  TEST_CASE_TEMPLATE(
      "store h2o/tova: pool exhaustion mid-batch changes nothing, then release and retry", T,
      KVC_STORE_TEST_DTYPES) {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed() + 6);
    INFO("seed " << test::test_seed());
    // Every sequence needs ceil(17 / 4) = 5 pages per (layer, head): 20 pages each; 70 pages hold
    // three sequences and a half, so joining sequences run the pool dry.
    test::RunCase h2o = h2o_case("h2o exhaustion", 10, 6, 2, 4, 32, 2);
    test::RunCase tova = tova_case("tova exhaustion", 16, false, 2, 4, 32, 2);
    for (test::RunCase* c : {&h2o, &tova}) test::exhaust_pool(*c, 120, 5, 70, 0.02);
    test::RunSummary const h2o_summary = test::run_store_case<T, H2OModel>(h2o, rng);
    test::RunSummary const tova_summary = test::run_store_case<T, TovaModel>(tova, rng);
    if (!test::full_runs()) return;
    CHECK(h2o_summary.failed_steps > 0);
    CHECK(h2o_summary.retries_succeeded > 0);
    CHECK(tova_summary.failed_steps > 0);
    CHECK(tova_summary.retries_succeeded > 0);
  }
}
