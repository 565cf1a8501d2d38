// The KVCache facade (kvc/engine/kv_cache.cuh) against the CPU reference (one
// reference::LayerCache per (sequence, layer)): random continuous-batching runs of every policy
// (outputs, LSE and the whole cache after every step), prefill, stats, and bad calls that must
// return their Status and change nothing (nor the step that follows them).
//
// Two attention backends: the precompiled kernels (KVCache; bf16, head dim 128, G = 4 is in every
// build, KVC_CI_MINIMAL included) and the double-precision oracle (OracleDecodeAttention). The
// kernels' probabilities match the reference to ~1e-3 relative, so an H2O/TOVA near-tie may be
// broken differently over a long run; long H2O/TOVA runs therefore use the oracle, which takes
// the reference's decisions exactly, and the kernel runs are kept short.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/engine/kv_cache.cuh"
#include "kvc/engine/oracle_attention.cuh"
#include "kvc/reference/layer_cache.hpp"

#include "support_kv_cache.cuh"
#include "support_store.cuh"

using namespace kvc;

namespace {

using T = __nv_bfloat16;
constexpr DType kDType = DType::kBF16;
using test::Harness;
using test::precompiled_available;

//! A small GQA model: 2 layers, 8 query heads over 2 KV heads (G = 4), head dim 128, bf16.
KVCacheConfig base_config(PolicyKind kind) {
  KVCacheConfig config;
  config.shape = ModelShape{2, 8, 2, 128};
  config.dtype = kDType;
  config.policy.kind = kind;
  config.policy.h2o = H2OConfig{6, 4};
  config.policy.tova = TovaConfig{10, false};
  config.max_seqs = 5;
  config.max_batch = 4;
  config.max_tokens_per_seq = 96;
  config.page_size = 16;
  config.max_prefill_tokens = 64;
  config.max_prefill_seqs = 3;
  return config;
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("kv_cache: every policy matches the reference under continuous batching") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::uint64_t const seed = test::test_seed();
    INFO("seed " << seed);
    std::mt19937_64 rng(seed);
    for (PolicyKind kind :
         {PolicyKind::kFull, PolicyKind::kDmc, PolicyKind::kH2O, PolicyKind::kTova}) {
      INFO("policy " << std::string(policy_name(kind)));
      KVCacheConfig const config = base_config(kind);
      bool const evicting = kind == PolicyKind::kH2O || kind == PolicyKind::kTova;
      if (precompiled_available(config)) {
        // The kernels: long runs for Full and DMC, short ones (few evictions) for H2O/TOVA.
        Harness<PrecompiledDecodeAttention> fast(config);
        fast.tolerances.scores = {1e-5, 2e-3};
        fast.run(rng, test::run_steps(evicting ? 16 : 120), 0.03);
      }
      // KVC_STORE_TEST_STEPS (sanitizer runs) shortens both; sequences must still come and go.
      Harness<OracleDecodeAttention> exact(config);
      int const leaves = exact.run(rng, test::run_steps(evicting ? 160 : 80), 0.05);
      if (test::full_runs()) CHECK(leaves > 0);  // sequences did leave (and join)
    }
  }

  TEST_CASE("kv_cache: DMC compresses by the decision neuron's merge rate") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed());
    KVCacheConfig config = base_config(PolicyKind::kDmc);
    config.max_seqs = 1;
    config.max_batch = 1;
    config.max_prefill_seqs = 1;
    Harness<OracleDecodeAttention> h(config);
    h.merge_probability = 0.75;  // CR about 4 per head
    int const seq = h.join();
    for (int s = 0; s < 80; ++s) h.step(rng, {seq}, "step " + std::to_string(s));
    CacheStats stats;
    KVC_STATUS_REQUIRE(h.cache.stats_sync(stats, h.stream.get()));
    for (int l = 0; l < config.shape.num_layers; ++l) {
      for (int kv = 0; kv < config.shape.num_kv_heads; ++kv) {
        CHECK(stats.compression_ratio(l, seq, kv) ==
              doctest::Approx(h.refs.at(seq)[static_cast<std::size_t>(l)].compression_ratio(kv)));
        CHECK(stats.compression_ratio(l, seq, kv) > 2.0);
      }
    }
  }

  TEST_CASE("kv_cache: prefill of every policy equals the reference prefill, chunked and batched") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed());
    for (PolicyKind kind :
         {PolicyKind::kFull, PolicyKind::kDmc, PolicyKind::kH2O, PolicyKind::kTova}) {
      INFO("policy " << std::string(policy_name(kind)));
      KVCacheConfig const config = base_config(kind);
      Harness<OracleDecodeAttention> h(config);
      int const other = h.join();  // a sequence that must not be touched
      h.step(rng, {other}, "before");
      // One sequence, layer by layer; 40 tokens is above the H2O/TOVA budgets (one cut).
      int const a = h.join();
      h.prefill(rng, {a}, {40}, "shorthand", true);
      // Three chunks in one step: a second chunk of `a` (appended to its cache), a fresh prompt
      // and a one-token chunk; 64 tokens in all (max_prefill_tokens).
      int const b = h.join();
      int const c = h.join();
      h.prefill(rng, {b, a, c}, {45, 18, 1}, "batched");
      for (int s = 0; s < 8; ++s) h.step(rng, {a, b, c, other}, "decode " + std::to_string(s));
      h.prefill(rng, {other}, {5}, "chunk after decode");
      h.step(rng, {other, a}, "decode after chunk");
    }
  }

  TEST_CASE("kv_cache: DMC prefill equals the prompt fed token by token") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed());
    KVCacheConfig const config = base_config(PolicyKind::kDmc);
    Harness<OracleDecodeAttention> h(config);
    int const seq = h.join();
    int const prompt = 40;
    for (int l = 0; l < config.shape.num_layers; ++l) {
      std::vector<float> qh, kh, vh;
      h.draw(rng, prompt, qh, kh, vh);
      h.q.upload(test::to_storage<T>(qh), h.stream.get());
      h.k.upload(test::to_storage<T>(kh), h.stream.get());
      h.v.upload(test::to_storage<T>(vh), h.stream.get());
      h.out.poison(h.stream.get());
      KVC_STATUS_REQUIRE(h.cache.prefill_layer(seq, l, prompt, h.q.data(), h.k.data(), h.v.data(),
                                               h.out.data(), h.stream.get()));
      KVC_STATUS_REQUIRE(h.cache.step_status_sync());
      std::vector<float> const got =
          test::to_floats(h.out.download(h.stream.get(), prompt * h.q_row()));
      reference::LayerCache& ref = h.refs.at(seq)[static_cast<std::size_t>(l)];
      std::vector<float> want;
      for (int t = 0; t < prompt; ++t) {
        std::size_t const tt = static_cast<std::size_t>(t);
        reference::DecodeInput const input{
            reference::ConstSpan(qh.data() + tt * h.q_row(), h.q_row()),
            reference::ConstSpan(kh.data() + tt * h.kv_row(), h.kv_row()),
            reference::ConstSpan(vh.data() + tt * h.kv_row(), h.kv_row())};
        reference::AttentionOutput step_out;
        KVC_STATUS_REQUIRE(ref.decode_step(input, step_out));
        want.insert(want.end(), step_out.out.begin(), step_out.out.end());
      }
      test::require_close(got, want, default_tolerance(kDType), "prefill vs token by token");
      CHECK(ref.compression_ratio() > 1.5);  // the decisions merged
    }
    h.compare_cache("after prefill");
    for (int s = 0; s < 6; ++s) h.step(rng, {seq}, "decode " + std::to_string(s));
  }

  TEST_CASE("kv_cache: DecodePathPrefill runs Full and DMC prompts as decode steps") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed());
    for (PolicyKind kind : {PolicyKind::kFull, PolicyKind::kDmc}) {
      INFO("policy " << std::string(policy_name(kind)));
      Harness<OracleDecodeAttention, DecodePathPrefill> h(base_config(kind));
      int const a = h.join();
      h.prefill(rng, {a}, {30}, "decode-path prefill", true);
      h.prefill(rng, {a}, {9}, "decode-path chunk");
      int const ids[2] = {a, a};
      int const tokens[2] = {1, 1};
      CHECK(h.cache.begin_prefill(ids, tokens, 2, h.stream.get()) == Status::kErrorNotSupported);
      h.step(rng, {a}, "decode");
    }
    // H2O and TOVA prefill cut once over the whole chunk: not what decode steps do.
    for (PolicyKind kind : {PolicyKind::kH2O, PolicyKind::kTova}) {
      BasicKVCache<OracleDecodeAttention, DecodePathPrefill> cache;
      test::Stream stream;
      CHECK(BasicKVCache<OracleDecodeAttention, DecodePathPrefill>::create(
                base_config(kind), stream.get(), cache) == Status::kErrorNotSupported);
      CHECK_FALSE(cache.valid());
    }
  }

  TEST_CASE("kv_cache: stats count slots, pages, bytes and compression") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed());
    for (PolicyKind kind : {PolicyKind::kDmc, PolicyKind::kH2O}) {
      INFO("policy " << std::string(policy_name(kind)));
      KVCacheConfig const config = base_config(kind);
      Harness<OracleDecodeAttention> h(config);
      h.run(rng, 50, 0.03);
      CacheStats stats;
      KVC_STATUS_REQUIRE(h.cache.stats_sync(stats, h.stream.get()));
      std::size_t required = 0;
      KVC_STATUS_REQUIRE(BasicKVCache<OracleDecodeAttention>::required_bytes(config, required));
      CHECK(stats.device_bytes == static_cast<std::int64_t>(required));
      CHECK(h.cache.device_bytes() == required);
      test::StoreSnapshot<T> const snap = test::take_snapshot<T>(h.cache.store(), h.stream.get());
      std::int64_t slots = 0;
      std::int64_t pages = 0;
      for (auto const& [seq, layers] : h.refs) {
        for (int l = 0; l < config.shape.num_layers; ++l) {
          reference::LayerCache const& ref = layers[static_cast<std::size_t>(l)];
          CHECK(stats.tokens_of(l, seq) == ref.tokens_seen());
          for (int kv = 0; kv < config.shape.num_kv_heads; ++kv) {
            int const length = ref.slots(kv);
            CHECK(stats.slots_of(l, seq, kv) == length);
            CHECK(stats.compression_ratio(l, seq, kv) ==
                  doctest::Approx(ref.compression_ratio(kv)));
            // A head holds ceil(length / page) pages, or one more when a DMC token merged
            // after its step's prepare took a page for a possible append.
            int const count =
                snap.page_counts[static_cast<std::size_t>(snap.head_index(l, seq, kv))];
            CHECK(count >= (length + config.page_size - 1) / config.page_size);
            CHECK(count <= (length + config.page_size) / config.page_size);
            slots += length;
            pages += count;
          }
        }
      }
      PagedStoreConfig store;
      REQUIRE(config.to_store_config(store) == Status::kSuccess);
      CHECK(stats.store.slots_used == slots);
      CHECK(stats.store.pages_held == pages);
      CHECK(stats.store.pages_free + stats.store.pages_held == store.num_pages);
      CHECK(stats.store.slack_slots == pages * config.page_size - slots);
      CHECK(stats.store.bytes_in_use == slots * config.shape.head_dim * 2 * 2);
      // Released sequences count nothing.
      for (int seq = 0; seq < config.max_seqs; ++seq) {
        if (h.refs.count(seq) == 0) CHECK(stats.sequence_slots(seq) == 0);
      }

      // The asynchronous form into pinned memory gives the same numbers.
      StoreStats* pinned_stats = nullptr;
      std::int32_t* pinned_slots = nullptr;
      std::int64_t* pinned_tokens = nullptr;
      std::size_t const rows = static_cast<std::size_t>(config.shape.num_layers) * config.max_seqs;
      KVC_CUDA_REQUIRE(cudaMallocHost(reinterpret_cast<void**>(&pinned_stats), sizeof(StoreStats)));
      KVC_CUDA_REQUIRE(cudaMallocHost(reinterpret_cast<void**>(&pinned_slots),
                                      rows * config.shape.num_kv_heads * sizeof(std::int32_t)));
      KVC_CUDA_REQUIRE(
          cudaMallocHost(reinterpret_cast<void**>(&pinned_tokens), rows * sizeof(std::int64_t)));
      KVC_STATUS_REQUIRE(
          h.cache.stats_async(pinned_stats, pinned_slots, pinned_tokens, h.stream.get()));
      KVC_CUDA_REQUIRE(cudaStreamSynchronize(h.stream.get()));
      CacheStats async;
      async.assign(config.shape.num_layers, config.max_seqs, config.shape.num_kv_heads,
                   *pinned_stats, pinned_slots, pinned_tokens,
                   static_cast<std::int64_t>(h.cache.device_bytes()));
      CHECK(async.slots == stats.slots);
      CHECK(async.tokens == stats.tokens);
      CHECK(async.store.pages_free == stats.store.pages_free);
      cudaFreeHost(pinned_stats);
      cudaFreeHost(pinned_slots);
      cudaFreeHost(pinned_tokens);
    }
  }

  TEST_CASE("kv_cache: bad calls return their Status and change nothing") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed());
    KVCacheConfig const config = base_config(PolicyKind::kH2O);
    Harness<OracleDecodeAttention> h(config);
    int const a = h.join();
    int const b = h.join();
    for (int s = 0; s < 14; ++s) h.step(rng, {a, b}, "warm-up " + std::to_string(s));
    test::StoreSnapshot<T> const before = test::take_snapshot<T>(h.cache.store(), h.stream.get());
    auto unchanged = [&](char const* what) {
      INFO(what);
      CHECK_FALSE(h.cache.in_step());
      test::StoreSnapshot<T> const now = test::take_snapshot<T>(h.cache.store(), h.stream.get());
      CHECK(now.lengths == before.lengths);
      CHECK(now.page_table == before.page_table);
      CHECK(now.tokens_seen == before.tokens_seen);
      CHECK(now.free_count == before.free_count);
      CHECK(now.active == before.active);
      h.compare_cache(what);
    };
    cudaStream_t const s = h.stream.get();
    void* out = h.out.data();
    void const* q = h.q.data();
    void const* k = h.k.data();
    void const* v = h.v.data();

    // create: an invalid config leaves the target as it was.
    KVCacheConfig bad = config;
    bad.shape.num_q_heads = 7;
    BasicKVCache<OracleDecodeAttention> other;
    CHECK(BasicKVCache<OracleDecodeAttention>::create(bad, s, other) == Status::kErrorInvalidShape);
    CHECK_FALSE(other.valid());
    CHECK(BasicKVCache<OracleDecodeAttention>::create(bad, s, h.cache) ==
          Status::kErrorInvalidShape);
    CHECK(h.cache.valid());
    bad = config;
    bad.shape.head_dim = 96;  // no compiled kernel for 96 (the oracle has one)
    KVCache no_kernel;
    CHECK(KVCache::create(bad, s, no_kernel) == Status::kErrorNotSupported);

    // begin_step.
    int const ids_dup[2] = {a, a};
    int const ids_gone[2] = {a, 4};
    int const ids_range[1] = {99};
    std::vector<int> too_many(static_cast<std::size_t>(config.batch_capacity() + 1), a);
    CHECK(h.cache.begin_step(ids_dup, 2, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.begin_step(ids_gone, 2, s) == Status::kErrorInvalidSequence);
    CHECK(h.cache.begin_step(ids_range, 1, s) == Status::kErrorInvalidSequence);
    CHECK(h.cache.begin_step(too_many.data(), static_cast<int>(too_many.size()), s) ==
          Status::kErrorInvalidArgument);
    CHECK(h.cache.begin_step(nullptr, 1, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.begin_step(ids_gone, -1, s) == Status::kErrorInvalidArgument);
    // Outside a step.
    CHECK(h.cache.decode_layer(0, q, k, v, out, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.end_step(s) == Status::kErrorInvalidArgument);
    // The one-sequence prefill_layer.
    CHECK(h.cache.prefill_layer(4, 0, 3, q, k, v, out, s) == Status::kErrorInvalidSequence);
    CHECK(h.cache.prefill_layer(a, 2, 3, q, k, v, out, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.prefill_layer(a, 0, 0, q, k, v, out, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.prefill_layer(a, 0, 3, q, nullptr, v, out, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.prefill_layer(a, 0, config.max_prefill_tokens + 1, q, k, v, out, s) ==
          Status::kErrorInvalidArgument);
    CHECK(h.cache.prefill_layer(a, 0, 3, q, k, v, static_cast<char*>(out) + 2, s) ==
          Status::kErrorInvalidArgument);
    // begin_prefill.
    int const chunk_ids[3] = {a, b, a};
    int const chunk_tokens[3] = {3, 4, 5};
    int const zero_tokens[2] = {3, 0};
    int const long_tokens[2] = {config.max_prefill_tokens, 1};
    CHECK(h.cache.begin_prefill(chunk_ids, chunk_tokens, 3, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.begin_prefill(ids_gone, chunk_tokens, 2, s) == Status::kErrorInvalidSequence);
    CHECK(h.cache.begin_prefill(chunk_ids, zero_tokens, 2, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.begin_prefill(chunk_ids, long_tokens, 2, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.begin_prefill(chunk_ids, chunk_tokens, 0, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.begin_prefill(chunk_ids, chunk_tokens, config.max_prefill_seqs + 1, s) ==
          Status::kErrorInvalidArgument);
    CHECK(h.cache.begin_prefill(nullptr, chunk_tokens, 1, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.begin_prefill(chunk_ids, nullptr, 1, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.prefill_layer(0, q, k, v, out, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.end_prefill(s) == Status::kErrorInvalidArgument);
    CHECK_FALSE(h.cache.in_prefill());
    CHECK(h.cache.release_sequence(4, s) == Status::kErrorInvalidSequence);
    unchanged("outside a step");

    // Inside a step: refused calls leave the step open and the cache as it was.
    int const ids[2] = {b, a};
    KVC_STATUS_REQUIRE(h.cache.begin_step(ids, 2, s));
    CHECK(h.cache.begin_step(ids, 2, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.decode_layer(-1, q, k, v, out, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.decode_layer(2, q, k, v, out, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.decode_layer(0, nullptr, k, v, out, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.decode_layer(0, q, k, v, static_cast<char*>(out) + 2, s) ==
          Status::kErrorInvalidArgument);
    CHECK(h.cache.release_sequence(a, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.prefill_layer(a, 0, 1, q, k, v, out, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.begin_prefill(ids, chunk_tokens, 1, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.in_step());
    // The step then runs normally (every layer once; a second time is refused).
    std::vector<float> qh, kh, vh;
    for (int l = 0; l < config.shape.num_layers; ++l) {
      h.draw(rng, 2, qh, kh, vh);
      h.q.upload(test::to_storage<T>(qh), s);
      h.k.upload(test::to_storage<T>(kh), s);
      h.v.upload(test::to_storage<T>(vh), s);
      KVC_STATUS_REQUIRE(h.cache.decode_layer(l, q, k, v, out, s));
      CHECK(h.cache.decode_layer(l, q, k, v, out, s) == Status::kErrorInvalidArgument);
      for (int r = 0; r < 2; ++r) {
        std::size_t const rr = static_cast<std::size_t>(r);
        reference::AttentionOutput want;
        KVC_STATUS_REQUIRE(h.refs.at(ids[r])[static_cast<std::size_t>(l)].decode_step(
            reference::DecodeInput{reference::ConstSpan(qh.data() + rr * h.q_row(), h.q_row()),
                                   reference::ConstSpan(kh.data() + rr * h.kv_row(), h.kv_row()),
                                   reference::ConstSpan(vh.data() + rr * h.kv_row(), h.kv_row())},
            want));
      }
    }
    KVC_STATUS_REQUIRE(h.cache.end_step(s));
    KVC_STATUS_REQUIRE(h.cache.step_status_sync());
    h.compare_cache("after the refused calls");
    h.step(rng, {a, b}, "next step");

    // Inside a prefill: refused calls leave it open; the layers then run, each once.
    int const one[1] = {b};
    int const four[1] = {4};
    KVC_STATUS_REQUIRE(h.cache.begin_prefill(one, four, 1, s));
    CHECK(h.cache.begin_prefill(one, four, 1, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.begin_step(one, 1, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.release_sequence(b, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.prefill_layer(b, 0, 4, q, k, v, out, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.prefill_layer(2, q, k, v, out, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.prefill_layer(0, q, nullptr, v, out, s) == Status::kErrorInvalidArgument);
    CHECK(h.cache.in_prefill());
    for (int l = 0; l < config.shape.num_layers; ++l) {
      h.draw(rng, 4, qh, kh, vh);
      h.q.upload(test::to_storage<T>(qh), s);
      h.k.upload(test::to_storage<T>(kh), s);
      h.v.upload(test::to_storage<T>(vh), s);
      KVC_STATUS_REQUIRE(h.cache.prefill_layer(l, q, k, v, out, s));
      CHECK(h.cache.prefill_layer(l, q, k, v, out, s) == Status::kErrorInvalidArgument);
      reference::AttentionOutput want;
      KVC_STATUS_REQUIRE(h.refs.at(b)[static_cast<std::size_t>(l)].prefill(
          reference::PrefillInput{4, reference::ConstSpan(qh), reference::ConstSpan(kh),
                                  reference::ConstSpan(vh)},
          want));
    }
    KVC_STATUS_REQUIRE(h.cache.end_prefill(s));
    KVC_STATUS_REQUIRE(h.cache.step_status_sync());
    CHECK_FALSE(h.cache.in_prefill());
    h.compare_cache("after the refused prefill calls");
    h.step(rng, {a, b}, "step after the prefill");
  }

  TEST_CASE("kv_cache: a pool too small refuses the step, which changes nothing") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed());
    KVCacheConfig config = base_config(PolicyKind::kFull);
    config.num_pages = 2 * 2 * 2 + 1;  // two sequences of one page per (layer, KV head), + 1
    Harness<OracleDecodeAttention> h(config);
    int const a = h.join();
    int const b = h.join();
    for (int s = 0; s < 16; ++s) h.step(rng, {a, b}, "fill " + std::to_string(s));
    // Token 17 needs a second page in every (layer, KV head) of both: 8 pages, 1 free.
    std::vector<std::int32_t> const lengths_before =
        test::take_snapshot<T>(h.cache.store(), h.stream.get()).lengths;
    int const ids[2] = {a, b};
    KVC_STATUS_REQUIRE(h.cache.begin_step(ids, 2, h.stream.get()));
    std::vector<float> qh, kh, vh;
    for (int l = 0; l < config.shape.num_layers; ++l) {
      h.draw(rng, 2, qh, kh, vh);
      h.q.upload(test::to_storage<T>(qh), h.stream.get());
      h.k.upload(test::to_storage<T>(kh), h.stream.get());
      h.v.upload(test::to_storage<T>(vh), h.stream.get());
      KVC_STATUS_REQUIRE(h.cache.decode_layer(l, h.q.data(), h.k.data(), h.v.data(), h.out.data(),
                                              h.stream.get()));
    }
    KVC_STATUS_REQUIRE(h.cache.end_step(h.stream.get()));
    StepReport report;
    CHECK(h.cache.step_status_sync(&report) == Status::kErrorOutOfPages);
    CHECK(report.failed == 1);
    CHECK(report.pages_short > 0);
    CHECK((h.cache.row_flags()[0] | h.cache.row_flags()[1]) != 0);
    bool ready = false;
    Status polled = Status::kSuccess;
    KVC_STATUS_REQUIRE(h.cache.poll_step(ready, polled));
    CHECK(ready);
    CHECK(polled == Status::kErrorOutOfPages);
    CHECK(test::take_snapshot<T>(h.cache.store(), h.stream.get()).lengths == lengths_before);
    h.compare_cache("refused step");  // the reference did not take the step either
    // A prefill that cannot get its pages is refused as a whole too.
    int const c = h.join();
    int const chunk[1] = {20};
    int const c_ids[1] = {c};
    KVC_STATUS_REQUIRE(h.cache.begin_prefill(c_ids, chunk, 1, h.stream.get()));
    for (int l = 0; l < config.shape.num_layers; ++l) {
      h.draw(rng, 20, qh, kh, vh);
      h.q.upload(test::to_storage<T>(qh), h.stream.get());
      h.k.upload(test::to_storage<T>(kh), h.stream.get());
      h.v.upload(test::to_storage<T>(vh), h.stream.get());
      KVC_STATUS_REQUIRE(h.cache.prefill_layer(l, h.q.data(), h.k.data(), h.v.data(), h.out.data(),
                                               h.stream.get()));
    }
    KVC_STATUS_REQUIRE(h.cache.end_prefill(h.stream.get()));
    CHECK(h.cache.step_status_sync() == Status::kErrorOutOfPages);
    CHECK(test::take_snapshot<T>(h.cache.store(), h.stream.get()).lengths == lengths_before);
    h.compare_cache("refused prefill");
    h.leave(c);
    // Release one sequence; the other's step now succeeds.
    h.leave(a);
    h.step(rng, {b}, "retry");
  }
}
