// KVCacheConfig (kvc/engine/kv_cache_config.hpp): validation of every field, the translation to
// the paged store's config (page-table width per policy, the default pool size), and CacheStats'
// index maths and compression ratios. Host-only: compiles with g++ alone.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/engine/cache_stats.hpp"
#include "kvc/engine/kv_cache_config.hpp"
#include "kvc/kvc.hpp"

using namespace kvc;

namespace {

KVCacheConfig valid_config() {
  KVCacheConfig config;
  config.shape = ModelShape{4, 8, 2, 128};
  config.dtype = DType::kBF16;
  config.policy.kind = PolicyKind::kDmc;
  config.max_seqs = 8;
  config.max_batch = 4;
  config.max_tokens_per_seq = 1000;
  config.page_size = 16;
  return config;
}

}  // namespace

TEST_SUITE("host") {
  TEST_CASE("kv_cache_config: a valid config translates to the store's") {
    KVCacheConfig const config = valid_config();
    REQUIRE(config.validate() == Status::kSuccess);
    PagedStoreConfig store;
    REQUIRE(config.to_store_config(store) == Status::kSuccess);
    CHECK(store.shape.num_layers == 4);
    CHECK(store.shape.num_q_heads == 8);
    CHECK(store.shape.num_kv_heads == 2);
    CHECK(store.shape.head_dim == 128);
    CHECK(store.dtype == DType::kBF16);
    CHECK(store.policy.kind == PolicyKind::kDmc);
    CHECK(store.max_seqs == 8);
    CHECK(store.page_size == 16);
    CHECK(store.max_pages_per_head == 63);  // ceil(1000 / 16)
    CHECK(store.num_pages == 63 * 8 * 4 * 2);
    CHECK(store.validate() == Status::kSuccess);
    CHECK(config.batch_capacity() == 4);

    KVCacheConfig pool = config;
    pool.num_pages = 100;
    pool.max_batch = 0;
    REQUIRE(pool.to_store_config(store) == Status::kSuccess);
    CHECK(store.num_pages == 100);
    CHECK(pool.batch_capacity() == 8);
  }

  TEST_CASE("kv_cache_config: H2O and TOVA heads hold budget + 1 slots") {
    KVCacheConfig config = valid_config();
    config.policy.kind = PolicyKind::kH2O;
    config.policy.h2o = H2OConfig{20, 11};
    config.max_tokens_per_seq = 0;  // ignored by evicting policies
    PagedStoreConfig store;
    REQUIRE(config.to_store_config(store) == Status::kSuccess);
    CHECK(config.slots_per_head() == 32);
    CHECK(store.max_pages_per_head == 2);
    config.policy.kind = PolicyKind::kTova;
    config.policy.tova = TovaConfig{16, false};
    REQUIRE(config.to_store_config(store) == Status::kSuccess);
    CHECK(config.slots_per_head() == 17);
    CHECK(store.max_pages_per_head == 2);
    config.page_size = 17;
    REQUIRE(config.to_store_config(store) == Status::kSuccess);
    CHECK(store.max_pages_per_head == 1);
  }

  TEST_CASE("kv_cache_config: every bad field is refused and the output left alone") {
    PagedStoreConfig const sentinel = [] {
      PagedStoreConfig s;
      s.num_pages = 12345;
      return s;
    }();
    auto refused = [&](KVCacheConfig const& config, Status expected) {
      PagedStoreConfig store = sentinel;
      CHECK(config.validate() == expected);
      CHECK(config.to_store_config(store) == expected);
      CHECK(store.num_pages == 12345);
    };
    KVCacheConfig c = valid_config();
    c.shape.num_q_heads = 7;
    refused(c, Status::kErrorInvalidShape);
    c = valid_config();
    c.shape.num_layers = 0;
    refused(c, Status::kErrorInvalidShape);
    c = valid_config();
    c.dtype = static_cast<DType>(42);
    refused(c, Status::kErrorInvalidArgument);
    c = valid_config();
    c.policy.kind = static_cast<PolicyKind>(9);
    refused(c, Status::kErrorInvalidArgument);
    c = valid_config();
    c.policy.dmc.decision_dim = 128;
    refused(c, Status::kErrorInvalidArgument);
    c = valid_config();
    c.policy.kind = PolicyKind::kH2O;
    c.policy.h2o = H2OConfig{0, 0};
    refused(c, Status::kErrorInvalidBudget);
    c = valid_config();
    c.policy.kind = PolicyKind::kTova;
    c.policy.tova.budget = 0;
    refused(c, Status::kErrorInvalidBudget);
    c = valid_config();
    c.scale = -1.0f;
    refused(c, Status::kErrorInvalidArgument);
    c.scale = std::numeric_limits<float>::quiet_NaN();
    refused(c, Status::kErrorInvalidArgument);
    c.scale = std::numeric_limits<float>::infinity();
    refused(c, Status::kErrorInvalidArgument);
    c = valid_config();
    c.max_seqs = 0;
    refused(c, Status::kErrorInvalidArgument);
    c.max_seqs = kStoreMaxSeqs + 1;
    refused(c, Status::kErrorInvalidArgument);
    c = valid_config();
    c.max_batch = -1;
    refused(c, Status::kErrorInvalidArgument);
    c.max_batch = 9;  // above max_seqs
    refused(c, Status::kErrorInvalidArgument);
    c = valid_config();
    c.max_prefill_tokens = -1;
    refused(c, Status::kErrorInvalidArgument);
    c = valid_config();
    c.max_prefill_seqs = 0;
    refused(c, Status::kErrorInvalidArgument);
    c.max_prefill_seqs = c.max_seqs + 1;
    refused(c, Status::kErrorInvalidArgument);
    c.max_prefill_seqs = c.max_seqs;  // the largest allowed
    c.max_prefill_tokens = 0;         // no prefill workspace: valid
    CHECK(c.validate() == Status::kSuccess);
    c = valid_config();
    c.max_tokens_per_seq = 0;  // Full and DMC need a length
    refused(c, Status::kErrorInvalidArgument);
    c.policy.kind = PolicyKind::kFull;
    refused(c, Status::kErrorInvalidArgument);
    c = valid_config();
    c.num_pages = -1;
    refused(c, Status::kErrorInvalidArgument);
    c = valid_config();
    c.page_size = 0;
    refused(c, Status::kErrorInvalidArgument);
    c.page_size = kStoreMaxPageSize + 1;
    refused(c, Status::kErrorInvalidArgument);
    c = valid_config();
    c.shape.head_dim = 2048;  // above what the store's kernels handle
    refused(c, Status::kErrorNotSupported);
    c = valid_config();
    c.max_tokens_per_seq = std::numeric_limits<int>::max();  // the default pool overflows int
    refused(c, Status::kErrorInvalidArgument);
    c = valid_config();
    c.rope.theta = 0.0;
    refused(c, Status::kErrorInvalidArgument);
  }

  TEST_CASE("cache_stats: indexing and compression ratios") {
    // 2 layers, 3 sequence ids, 2 KV heads; sequence 1 is empty.
    std::vector<std::int32_t> const slots = {
        4, 2, 0, 0, 5,  5,  // layer 0: seq 0, seq 1, seq 2
        8, 1, 0, 0, 10, 5,  // layer 1
    };
    std::vector<std::int64_t> const tokens = {8, 0, 10, 8, 0, 10};
    StoreStats store;
    store.slots_used = 4 + 2 + 5 + 5 + 8 + 1 + 10 + 5;
    CacheStats stats;
    stats.assign(2, 3, 2, store, slots.data(), tokens.data(), 4096);
    CHECK(stats.device_bytes == 4096);
    CHECK(stats.slots_of(0, 0, 1) == 2);
    CHECK(stats.slots_of(1, 2, 0) == 10);
    CHECK(stats.slots_of(2, 0, 0) == 0);   // layer out of range
    CHECK(stats.slots_of(0, 3, 0) == 0);   // sequence out of range
    CHECK(stats.slots_of(0, 0, -1) == 0);  // head out of range
    CHECK(stats.tokens_of(1, 2) == 10);
    CHECK(stats.compression_ratio(0, 0, 0) == doctest::Approx(2.0));
    CHECK(stats.compression_ratio(0, 0, 1) == doctest::Approx(4.0));
    CHECK(stats.compression_ratio(1, 2, 0) == doctest::Approx(1.0));
    CHECK(stats.compression_ratio(0, 1, 0) == doctest::Approx(1.0));  // empty
    CHECK(stats.sequence_slots(0) == 15);
    CHECK(stats.sequence_slots(1) == 0);
    CHECK(stats.sequence_compression_ratio(0) == doctest::Approx(16.0 * 2 / 15));
    CHECK(stats.sequence_compression_ratio(1) == doctest::Approx(1.0));
    CHECK(stats.compression_ratio() == doctest::Approx(36.0 * 2 / 40));
  }
}
