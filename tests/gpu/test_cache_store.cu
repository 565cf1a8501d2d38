// Paged store host API and allocator: config validation, size query and buffer checks, sequence
// bookkeeping and bad host input (each with the right Status and nothing changed), exact page
// counts per page size (no over-allocation), accounting (bytes, free pages, slack, spare pages
// of a refused step), release returning every page, a released slot in a batch (the step is
// refused with kErrorInvalidSequence), and an update without its prepare (kErrorInternal).
#include <random>
#include <vector>

#include <doctest/doctest.h>

#include "support_store.cuh"

using namespace kvc;

namespace {

PagedStoreConfig small_config(PolicyKind kind = PolicyKind::kFull) {
  PagedStoreConfig config;
  config.shape = ModelShape{2, 4, 2, 32};
  config.dtype = DType::kF32;
  config.page_size = 4;
  config.num_pages = 64;
  config.max_seqs = 4;
  config.max_pages_per_head = 8;
  config.policy.kind = kind;
  config.policy.h2o = H2OConfig{6, 2};
  config.policy.tova = TovaConfig{8, false};
  return config;
}

using Fixture = test::StoreFixture;

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("store: config validation, size query and buffer checks") {
    KVC_REQUIRE_CUDA_DEVICE();
    PagedStoreConfig const good = small_config();
    CHECK(good.validate() == Status::kSuccess);
    struct Bad {
      PagedStoreConfig config;
      Status expected;
    };
    std::vector<Bad> bad;
    auto with = [&](auto change, Status expected) {
      PagedStoreConfig config = good;
      change(config);
      bad.push_back({config, expected});
    };
    with([](PagedStoreConfig& c) { c.shape.num_kv_heads = 3; }, Status::kErrorInvalidShape);
    with([](PagedStoreConfig& c) { c.shape.head_dim = 2048; }, Status::kErrorNotSupported);
    with([](PagedStoreConfig& c) { c.page_size = 0; }, Status::kErrorInvalidArgument);
    with([](PagedStoreConfig& c) { c.num_pages = 0; }, Status::kErrorInvalidArgument);
    with([](PagedStoreConfig& c) { c.max_seqs = 0; }, Status::kErrorInvalidArgument);
    with([](PagedStoreConfig& c) { c.max_seqs = kStoreMaxSeqs + 1; },
         Status::kErrorInvalidArgument);
    with([](PagedStoreConfig& c) { c.max_pages_per_head = 0; }, Status::kErrorInvalidArgument);
    with([](PagedStoreConfig& c) { c.dtype = static_cast<DType>(7); },
         Status::kErrorInvalidArgument);
    with([](PagedStoreConfig& c) { c.rope.theta = 0.0; }, Status::kErrorInvalidArgument);
    with([](PagedStoreConfig& c) { c.policy.kind = static_cast<PolicyKind>(9); },
         Status::kErrorInvalidArgument);
    with(
        [](PagedStoreConfig& c) {
          c.policy.kind = PolicyKind::kDmc;
          c.policy.dmc.window = kDmcMaxWindow + 1;
        },
        Status::kErrorInvalidArgument);
    with(
        [](PagedStoreConfig& c) {
          c.policy.kind = PolicyKind::kH2O;
          c.policy.h2o = H2OConfig{0, 0};
        },
        Status::kErrorInvalidBudget);
    with(
        [](PagedStoreConfig& c) {  // budget + 1 = 33 slots > 8 pages * 4
          c.policy.kind = PolicyKind::kTova;
          c.policy.tova.budget = 32;
        },
        Status::kErrorInvalidBudget);
    for (Bad const& b : bad) {
      CHECK(b.config.validate() == b.expected);
      std::size_t bytes = 12345;
      CHECK(PagedStore::required_bytes(b.config, bytes) == b.expected);
      CHECK(bytes == 12345);
    }

    std::size_t full_bytes = 0, dmc_bytes = 0, h2o_bytes = 0;
    REQUIRE(PagedStore::required_bytes(good, full_bytes) == Status::kSuccess);
    REQUIRE(PagedStore::required_bytes(small_config(PolicyKind::kDmc), dmc_bytes) ==
            Status::kSuccess);
    REQUIRE(PagedStore::required_bytes(small_config(PolicyKind::kH2O), h2o_bytes) ==
            Status::kSuccess);
    std::size_t const pool = 2ull * 64 * 4 * 32 * sizeof(float);
    CHECK(full_bytes > pool);
    CHECK(dmc_bytes > full_bytes);  // running sums and ring
    CHECK(h2o_bytes > full_bytes);  // scores

    test::Stream stream;
    test::DeviceBuffer<unsigned char> memory(full_bytes);
    PagedStore store;
    int slot = -1;
    std::int32_t const* no_slots = nullptr;
    CHECK(store.add_sequence(slot, stream.get()) ==
          Status::kErrorInvalidArgument);  // not initialised
    CHECK(store.prepare_decode_step(no_slots, 0, stream.get()) == Status::kErrorInvalidArgument);
    CHECK(store.init(good, nullptr, full_bytes, stream.get()) == Status::kErrorInvalidArgument);
    CHECK(store.init(good, memory.data(), full_bytes - 1, stream.get()) ==
          Status::kErrorSizeMismatch);
    CHECK(store.init(bad.front().config, memory.data(), full_bytes, stream.get()) ==
          Status::kErrorInvalidShape);
    CHECK_FALSE(store.initialized());
    KVC_STATUS_REQUIRE(store.init(good, memory.data(), full_bytes, stream.get()));
    CHECK(store.initialized());
    StoreStats stats;
    KVC_STATUS_REQUIRE(store.stats_sync(stats, stream.get()));
    CHECK(stats.pages_free == good.num_pages);
    CHECK(stats.pages_held == 0);
    CHECK(stats.slots_used == 0);
  }

  TEST_CASE("store: sequence bookkeeping and bad host input") {
    KVC_REQUIRE_CUDA_DEVICE();
    Fixture f(small_config(PolicyKind::kH2O));
    cudaStream_t const s = f.stream.get();
    std::vector<int> slots;
    for (int i = 0; i < f.config.max_seqs; ++i) {
      int slot = -1;
      KVC_STATUS_REQUIRE(f.store.add_sequence(slot, s));
      CHECK(slot == i);  // lowest free slot first
      slots.push_back(slot);
    }
    int extra = -5;
    CHECK(f.store.add_sequence(extra, s) == Status::kErrorInvalidArgument);  // all slots in use
    CHECK(extra == -5);
    CHECK(f.store.num_active() == f.config.max_seqs);
    CHECK(f.store.release_sequence(-1, s) == Status::kErrorInvalidSequence);
    CHECK(f.store.release_sequence(f.config.max_seqs, s) == Status::kErrorInvalidSequence);
    KVC_STATUS_REQUIRE(f.store.release_sequence(1, s));
    CHECK(f.store.release_sequence(1, s) == Status::kErrorInvalidSequence);  // twice
    CHECK_FALSE(f.store.is_active(1));
    int again = -1;
    KVC_STATUS_REQUIRE(f.store.add_sequence(again, s));
    CHECK(again == 1);

    test::DeviceBuffer<float> q(64 * 4 * 32), k(64 * 2 * 32), v(64 * 2 * 32), q_out(64 * 4 * 32),
        probs(64 * 64);
    test::DeviceBuffer<half> q_half(64 * 4 * 32);
    test::DeviceBuffer<std::int32_t> seq_slots(8);
    seq_slots.upload({0, 1, 2, 3}, s);
    int const too_many = f.config.max_seqs + 1;
    CHECK(f.store.prepare_decode_step(seq_slots.data(), too_many, s) ==
          Status::kErrorInvalidArgument);
    CHECK(f.store.prepare_decode_step(seq_slots.data(), -1, s) == Status::kErrorInvalidArgument);
    CHECK(f.store.prepare_decode_step(nullptr, 2, s) == Status::kErrorInvalidArgument);
    CHECK(f.store.update<float>(0, q.data(), k.data(), v.data(), seq_slots.data(), too_many,
                                q_out.data(), s) == Status::kErrorInvalidArgument);
    CHECK(f.store.update<float>(2, q.data(), k.data(), v.data(), seq_slots.data(), 2, q_out.data(),
                                s) == Status::kErrorInvalidArgument);  // layer out of range
    CHECK(f.store.update<float>(0, q.data(), nullptr, v.data(), seq_slots.data(), 2, q_out.data(),
                                s) == Status::kErrorInvalidArgument);
    CHECK(f.store.update<half>(0, q_half.data(), q_half.data(), q_half.data(), seq_slots.data(), 2,
                               q_half.data(),
                               s) == Status::kErrorInvalidArgument);  // not the store's dtype
    CHECK(f.store.evict(0, ScoreHook{probs.data(), 8}, seq_slots.data(), 2, s) ==
          Status::kErrorInvalidArgument);  // stride < budget + 1
    CHECK(f.store.evict(0, ScoreHook{nullptr, 9}, seq_slots.data(), 2, s) ==
          Status::kErrorInvalidArgument);
    CHECK(f.store.evict(-1, ScoreHook{probs.data(), 9}, seq_slots.data(), 2, s) ==
          Status::kErrorInvalidArgument);
    CHECK(f.store.evict(0, ScoreHook{probs.data(), 9, ScoreForm::kLog2Logits, nullptr},
                        seq_slots.data(), 2, s) == Status::kErrorInvalidArgument);  // no lse
    CHECK(f.store.evict(0, ScoreHook{probs.data(), 9, static_cast<ScoreForm>(7), probs.data()},
                        seq_slots.data(), 2, s) == Status::kErrorInvalidArgument);
    PagedLayerView<half> wrong_view;
    CHECK(f.store.layer_view<half>(0, wrong_view) == Status::kErrorInvalidArgument);
    PagedLayerView<float> view;
    CHECK(f.store.layer_view<float>(5, view) == Status::kErrorInvalidArgument);
    KVC_STATUS_REQUIRE(f.store.layer_view<float>(1, view));
    CHECK(view.page_table == f.store.arrays().page_table + 1 * 4 * 2 * 8);
    CHECK(view.lengths == f.store.arrays().lengths + 1 * 4 * 2);
    StepReport report;
    CHECK(f.store.copy_step_report_async(nullptr, nullptr, 0, s) == Status::kErrorInvalidArgument);
    CHECK(f.store.copy_step_report_async(&report, nullptr, too_many, s) ==
          Status::kErrorInvalidArgument);

    // None of the refused calls changed anything.
    test::StoreSnapshot<float> const snap = test::take_snapshot<float>(f.store, s);
    test::check_page_accounting(snap);
    CHECK(snap.free_count == f.config.num_pages);
    for (std::int32_t length : snap.lengths) CHECK(length == 0);
    for (int slot = 0; slot < f.config.max_seqs; ++slot)
      CHECK(snap.active[static_cast<std::size_t>(slot)] == 1);

    // A moved store keeps the bookkeeping; the source is left uninitialised.
    PagedStore moved = std::move(f.store);
    CHECK(moved.num_active() == f.config.max_seqs);
    CHECK_FALSE(f.store.initialized());  // NOLINT(bugprone-use-after-move): documented state
    CHECK(f.store.release_sequence(0, s) == Status::kErrorInvalidSequence);
  }

  TEST_CASE_TEMPLATE("store: exact page counts, accounting and release of every page", T,
                     KVC_STORE_TEST_DTYPES) {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed() + 10);
    INFO("seed " << test::test_seed());
    for (int page_size : {1, 16, 64}) {
      INFO("page size " << page_size);
      PagedStoreConfig config = small_config();
      config.dtype = DTypeTraits<T>::kDType;
      config.page_size = page_size;
      config.max_pages_per_head = 100 / page_size + 1;
      config.num_pages = 4 * 2 * 2 * config.max_pages_per_head;
      Fixture f(config);
      cudaStream_t const s = f.stream.get();
      std::vector<std::int32_t> slots(3);
      for (std::int32_t& slot : slots) {
        int added = -1;
        KVC_STATUS_REQUIRE(f.store.add_sequence(added, s));
        slot = added;
      }
      // Sequences of different ages: 37, 37 + 21 and 37 + 21 + 9 tokens.
      int const shape_q = config.shape.num_q_heads * config.shape.head_dim;
      int const shape_kv = config.shape.num_kv_heads * config.shape.head_dim;
      std::vector<int> lengths(3, 0);
      for (int phase = 0; phase < 3; ++phase) {
        std::vector<std::int32_t> batch(slots.begin() + phase, slots.end());
        int const steps = phase == 0 ? 37 : phase == 1 ? 21 : 9;
        std::size_t const rows = batch.size();
        test::DeviceBuffer<T> q(rows * shape_q), k(rows * shape_kv), v(rows * shape_kv),
            q_out(rows * shape_q);
        test::DeviceBuffer<std::int32_t> batch_dev(rows);
        batch_dev.upload(batch, s);
        for (int step = 0; step < steps; ++step) {
          q.upload(test::to_storage<T>(test::random_normal(rng, rows * shape_q, config.dtype)), s);
          k.upload(test::to_storage<T>(test::random_normal(rng, rows * shape_kv, config.dtype)), s);
          v.upload(test::to_storage<T>(test::random_normal(rng, rows * shape_kv, config.dtype)), s);
          KVC_STATUS_REQUIRE(
              f.store.prepare_decode_step(batch_dev.data(), static_cast<int>(rows), s));
          for (int l = 0; l < config.shape.num_layers; ++l) {
            KVC_STATUS_REQUIRE(f.store.update<T>(l, q.data(), k.data(), v.data(), batch_dev.data(),
                                                 static_cast<int>(rows), q_out.data(), s));
          }
        }
        KVC_STATUS_REQUIRE(f.store.step_status_sync(s));
        for (int r = phase; r < 3; ++r) lengths[static_cast<std::size_t>(r)] += steps;
      }
      int const heads_per_seq = config.shape.num_layers * config.shape.num_kv_heads;
      std::int64_t slots_used = 0, pages_held = 0;
      for (int length : lengths) {
        slots_used += static_cast<std::int64_t>(length) * heads_per_seq;
        pages_held +=
            static_cast<std::int64_t>((length + page_size - 1) / page_size) * heads_per_seq;
      }
      test::StoreSnapshot<T> const snap = test::take_snapshot<T>(f.store, s);
      test::check_page_accounting(snap);
      for (int r = 0; r < 3; ++r) {
        for (int l = 0; l < config.shape.num_layers; ++l) {
          for (int h = 0; h < config.shape.num_kv_heads; ++h) {
            std::size_t const index =
                static_cast<std::size_t>(snap.head_index(l, slots[static_cast<std::size_t>(r)], h));
            CHECK(snap.lengths[index] == lengths[static_cast<std::size_t>(r)]);
            // No over-allocation: a head holds exactly ceil(length / page_size) pages.
            CHECK(snap.page_counts[index] ==
                  (lengths[static_cast<std::size_t>(r)] + page_size - 1) / page_size);
          }
          CHECK(snap.tokens_seen[static_cast<std::size_t>(
                    snap.dims.layer_seq(l, slots[static_cast<std::size_t>(r)]))] ==
                lengths[static_cast<std::size_t>(r)]);
        }
      }
      StoreStats const stats = f.stats();
      std::int64_t const row_bytes =
          2LL * config.shape.head_dim * static_cast<std::int64_t>(sizeof(T));
      CHECK(stats.slots_used == slots_used);
      CHECK(stats.pages_held == pages_held);
      CHECK(stats.pages_free == config.num_pages - pages_held);
      CHECK(stats.slack_slots == pages_held * page_size - slots_used);
      CHECK(stats.bytes_in_use == slots_used * row_bytes);
      CHECK(stats.bytes_held == pages_held * page_size * row_bytes);

      // Release the middle sequence, then the others: every page comes back.
      KVC_STATUS_REQUIRE(f.store.release_sequence(slots[1], s));
      StoreStats const after_one = f.stats();
      std::int64_t const middle_pages =
          static_cast<std::int64_t>((lengths[1] + page_size - 1) / page_size) * heads_per_seq;
      CHECK(after_one.pages_free == stats.pages_free + middle_pages);
      test::check_page_accounting(test::take_snapshot<T>(f.store, s));
      KVC_STATUS_REQUIRE(f.store.release_sequence(slots[0], s));
      KVC_STATUS_REQUIRE(f.store.release_sequence(slots[2], s));
      StoreStats const empty = f.stats();
      CHECK(empty.pages_free == config.num_pages);
      CHECK(empty.pages_held == 0);
      CHECK(empty.slots_used == 0);
      CHECK(empty.slack_slots == 0);
      test::StoreSnapshot<T> const cleared = test::take_snapshot<T>(f.store, s);
      test::check_page_accounting(cleared);
      for (std::int64_t seen : cleared.tokens_seen) CHECK(seen == 0);
    }
  }

  TEST_CASE(
      "store: refused steps keep their spare pages as slack, and a released slot fails the step") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed() + 11);
    INFO("seed " << test::test_seed());
    PagedStoreConfig config = small_config();
    config.num_pages = 6;  // one sequence needs 4 pages (2 layers x 2 heads) per 4 tokens
    Fixture f(config);
    cudaStream_t const s = f.stream.get();
    int a = -1, b = -1;
    KVC_STATUS_REQUIRE(f.store.add_sequence(a, s));
    KVC_STATUS_REQUIRE(f.store.add_sequence(b, s));
    // Step 1 needs 8 pages: 6 are granted, 2 rows' worth are short: refused, nothing written.
    test::DeviceBuffer<float> q(2 * 4 * 32), k(2 * 2 * 32), v(2 * 2 * 32), q_out(2 * 4 * 32);
    test::DeviceBuffer<std::int32_t> batch(2);
    batch.upload({b, a}, s);
    q.upload(test::random_normal(rng, q.size()), s);
    k.upload(test::random_normal(rng, k.size()), s);
    v.upload(test::random_normal(rng, v.size()), s);
    q_out.poison(s);
    KVC_STATUS_REQUIRE(f.store.prepare_decode_step(batch.data(), 2, s));
    for (int l = 0; l < 2; ++l) {
      KVC_STATUS_REQUIRE(
          f.store.update<float>(l, q.data(), k.data(), v.data(), batch.data(), 2, q_out.data(), s));
    }
    StepReport report;
    std::vector<std::int32_t> flags(2, -1);
    KVC_STATUS_REQUIRE(f.store.copy_step_report_async(&report, flags.data(), 2, s));
    CHECK(f.store.step_status_sync(s) == Status::kErrorOutOfPages);
    CHECK(report.failed == 1);
    CHECK(report.pages_short == 2);
    CHECK(report.rows_failed >= 1);
    CHECK((report.row_flags & kStepRowOutOfPages) != 0);
    for (float value : q_out.download(s, q_out.size()))
      CHECK(value != value);  // q_out untouched (NaN)
    test::StoreSnapshot<float> const refused = test::take_snapshot<float>(f.store, s);
    test::check_page_accounting(refused);
    for (std::int32_t length : refused.lengths) CHECK(length == 0);
    for (std::int64_t seen : refused.tokens_seen) CHECK(seen == 0);
    StoreStats const stats = f.stats();
    CHECK(stats.pages_held == 6);
    CHECK(stats.slots_used == 0);
    CHECK(stats.slack_slots == 6 * config.page_size);

    // A released slot in the batch: refused with kErrorInvalidSequence, flagged on its row only.
    KVC_STATUS_REQUIRE(f.store.release_sequence(a, s));
    KVC_STATUS_REQUIRE(f.store.prepare_decode_step(batch.data(), 2, s));
    for (int l = 0; l < 2; ++l) {
      KVC_STATUS_REQUIRE(
          f.store.update<float>(l, q.data(), k.data(), v.data(), batch.data(), 2, q_out.data(), s));
    }
    KVC_STATUS_REQUIRE(f.store.copy_step_report_async(&report, flags.data(), 2, s));
    CHECK(f.store.step_status_sync(s) == Status::kErrorInvalidSequence);
    CHECK(flags[0] == kStepRowOk);
    CHECK(flags[1] == kStepRowInvalidSequence);
    test::StoreSnapshot<float> const invalid = test::take_snapshot<float>(f.store, s);
    test::check_page_accounting(invalid);
    for (std::int32_t length : invalid.lengths) CHECK(length == 0);

    // The retry without the released row succeeds, on the pages b already holds.
    KVC_STATUS_REQUIRE(f.store.prepare_decode_step(batch.data(), 1, s));
    for (int l = 0; l < 2; ++l) {
      KVC_STATUS_REQUIRE(
          f.store.update<float>(l, q.data(), k.data(), v.data(), batch.data(), 1, q_out.data(), s));
    }
    CHECK(f.store.step_status_sync(s) == Status::kSuccess);
    StoreStats const after = f.stats();
    CHECK(after.slots_used == 4);
    CHECK(after.pages_held + after.pages_free == config.num_pages);

    // An update whose prepare did not cover its rows is a protocol error, and writes nothing there.
    int c = -1;
    KVC_STATUS_REQUIRE(f.store.add_sequence(c, s));
    test::DeviceBuffer<std::int32_t> fresh(1);
    fresh.upload({c}, s);
    KVC_STATUS_REQUIRE(
        f.store.update<float>(0, q.data(), k.data(), v.data(), fresh.data(), 1, q_out.data(), s));
    StepReport protocol;
    CHECK(f.store.step_status_sync(s, &protocol) == Status::kErrorInternal);
    CHECK(protocol.protocol_errors == config.shape.num_kv_heads);
    test::StoreSnapshot<float> const last = test::take_snapshot<float>(f.store, s);
    CHECK(last.lengths[static_cast<std::size_t>(last.head_index(0, c, 0))] == 0);
  }
}
