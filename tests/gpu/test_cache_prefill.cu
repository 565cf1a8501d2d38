// Paged store, parallel prefill (kvc/cache/prefill.cuh) for every policy: batches of prompt
// chunks of mixed lengths (first chunks and chunks appended to a cache, some rows idle), through
// prepare_prefill + prefill_layer (prepare, the library's prefill attention, commit), compared
// element by element with the CPU reference (LayerCache::prefill; DMC also token by token through
// dmc_prefill_sequential): the slots gathered through the page tables, positions, H2O/TOVA
// scores, DMC's running sums, ring, weight sums and group lengths, tokens seen, exact page counts,
// the attention outputs and LSE (poisoned before every run). Then decode steps after the prefill
// continue to match the reference. Plus a pool too small for a batch (the refused prefill changes
// nothing) and the host-side validation.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/cache/prefill.cuh"
#include "kvc/reference/dmc.hpp"
#include "kvc/reference/layer_cache.hpp"

#include "support_store.cuh"

using namespace kvc;

namespace {

//! Pre-RoPE inputs of one layer: q [tokens, Hq, D], k and v [tokens, Hkv, D].
struct Inputs {
  std::vector<float> q, k, v;
};

//! One prefill scenario: `rounds[r][s]` is the chunk length of sequence s in round r (0: the
//! sequence sits the round out), then `decode_steps` decode steps of every sequence.
struct PrefillCase {
  char const* name = "";
  PolicyConfig policy{};
  RopeConfig rope{};
  int layers = 2;
  int kv_heads = 2;
  int group = 1;
  int head_dim = 64;
  int page_size = 16;
  std::vector<std::vector<int>> rounds;
  int decode_steps = 4;
  double merge_probability = 0.8;  //!< DMC: chance that a token merges
  int num_pages = 0;               //!< 0: enough for everything
  bool unaligned_qk = false;       //!< q and k one element past 16-byte alignment (scalar paths)
};

PagedStoreConfig prefill_config(PrefillCase const& c, DType dtype) {
  PagedStoreConfig config;
  config.shape = ModelShape{c.layers, c.kv_heads * c.group, c.kv_heads, c.head_dim};
  config.dtype = dtype;
  config.page_size = c.page_size;
  config.max_seqs = static_cast<int>(c.rounds.front().size());
  config.policy = c.policy;
  config.rope = c.rope;
  int longest = 0;
  for (int s = 0; s < config.max_seqs; ++s) {
    int total = c.decode_steps + 1;
    for (auto const& round : c.rounds) total += round[static_cast<std::size_t>(s)];
    longest = std::max(longest, total);
  }
  // An H2O/TOVA head holds budget + 1 slots whatever the prompt (the store's capacity rule).
  if (config.has_scores()) longest = config.eviction_budget() + 1;
  int const pages_per_head = (longest + c.page_size - 1) / c.page_size;
  config.max_pages_per_head = pages_per_head;
  config.num_pages =
      c.num_pages > 0 ? c.num_pages : config.max_seqs * c.layers * c.kv_heads * pages_per_head;
  return config;
}

//! Sets every decision neuron well clear of the threshold: merge with `probability`.
void shape_decisions(std::mt19937_64& rng, reference::LayerSpec const& spec, DmcConfig const& dmc,
                     double probability, std::vector<float>& k) {
  std::uniform_real_distribution<float> margin(0.5f, 3.0f);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  int const decision = dmc.decision_index(spec.head_dim);
  for (std::size_t head = 0; head * spec.head_dim < k.size(); ++head) {
    bool const merge = unit(rng) < probability;
    float const value = dmc.offset + (merge ? margin(rng) : -margin(rng));
    k[head * spec.head_dim + decision] = round_to_dtype(value, spec.dtype);
  }
}

//! Runs a case: every round is one prefill step (all layers) of the sequences with a chunk, in a
//! shuffled row order; the store and the reference are compared after every round and after
//! every decode step. Returns false when the prefill attention has no instance for the shape.
template <class T>
bool run_prefill_case(PrefillCase const& c, std::mt19937_64& rng) {
  DType const dtype = DTypeTraits<T>::kDType;
  PagedStoreConfig const config = prefill_config(c, dtype);
  reference::LayerSpec const spec = test::layer_spec(config);
  INFO("case " << std::string(c.name) << " dtype " << std::string(dtype_name(dtype)) << " G "
               << c.group << " page " << c.page_size << " D " << c.head_dim << " policy "
               << std::string(policy_name(c.policy.kind)) << " rope "
               << rope_layout_name(c.rope.layout));
  REQUIRE(config.validate() == Status::kSuccess);
  if (!prefill_attention_supported(dtype, c.head_dim, c.group)) {
    MESSAGE("no prefill attention instance for this shape: case skipped");
    return false;
  }
  int const hq = config.shape.num_q_heads;
  int const hkv = config.shape.num_kv_heads;
  int const d = config.shape.head_dim;
  int const layers = config.shape.num_layers;
  int const seqs = config.max_seqs;
  std::size_t const q_row = static_cast<std::size_t>(hq) * d;
  std::size_t const kv_row = static_cast<std::size_t>(hkv) * d;

  test::StoreFixture fixture(config);
  test::Stream const& stream = fixture.stream;
  PagedStore& store = fixture.store;
  std::vector<int> slots(static_cast<std::size_t>(seqs));
  std::vector<std::vector<reference::LayerCache>> ref(static_cast<std::size_t>(seqs));
  // DMC token by token (dmc_prefill_sequential), the definition the parallel prefill reproduces.
  std::vector<std::vector<reference::DmcLayerState>> sequential(static_cast<std::size_t>(seqs));
  for (int s = 0; s < seqs; ++s) {
    KVC_STATUS_REQUIRE(store.add_sequence(slots[static_cast<std::size_t>(s)], stream.get()));
    for (int l = 0; l < layers; ++l) {
      reference::LayerCache cache;
      REQUIRE(reference::LayerCache::create(spec, config.policy, cache) == Status::kSuccess);
      ref[static_cast<std::size_t>(s)].push_back(cache);
      sequential[static_cast<std::size_t>(s)].push_back(
          reference::make_dmc_state(spec, config.policy.dmc));
    }
  }

  int max_total = 1;
  int max_chunk = 1;
  for (auto const& round : c.rounds) {
    int total = 0;
    for (int length : round) {
      total += length;
      max_chunk = std::max(max_chunk, length);
    }
    max_total = std::max(max_total, total);
  }
  // Padding rows past cu_tokens[batch] must be neither read nor written: one extra row.
  std::size_t const rows =
      std::max(static_cast<std::size_t>(max_total) + 1, static_cast<std::size_t>(seqs));
  // q and k start `shift` elements into their buffers (unaligned_qk: the prepare kernel's scalar
  // RoPE, Full's copy into the slots after it, DMC's scalar means).
  std::size_t const shift = c.unaligned_qk ? 1 : 0;
  test::DeviceBuffer<T> q_dev(rows * q_row + shift), k_dev(rows * kv_row + shift),
      v_dev(rows * kv_row), out_dev(rows * q_row);
  T* const q_in = q_dev.data() + shift;
  T* const k_in = k_dev.data() + shift;
  auto upload_shifted = [&](test::DeviceBuffer<T>& buffer, std::vector<float> const& values) {
    std::vector<T> storage = test::to_storage<T>(values);
    storage.insert(storage.begin(), shift, DTypeTraits<T>::from_float(0.5f));
    buffer.upload(storage, stream.get());
  };
  test::DeviceBuffer<float> lse_dev(rows * hq);
  // Random inputs of `count` rows (DMC: decisions clear of the threshold), uploaded to the device.
  auto draw_inputs = [&](std::size_t count) {
    Inputs in;
    in.q = test::random_normal(rng, count * q_row, dtype, 1.5f);
    in.k = test::random_normal(rng, count * kv_row, dtype, 1.5f);
    in.v = test::random_normal(rng, count * kv_row, dtype);
    if (config.has_dmc_state()) {
      shape_decisions(rng, spec, config.policy.dmc, c.merge_probability, in.k);
    }
    upload_shifted(q_dev, in.q);
    upload_shifted(k_dev, in.k);
    v_dev.upload(test::to_storage<T>(in.v), stream.get());
    return in;
  };
  test::DeviceBuffer<std::int32_t> slots_dev(static_cast<std::size_t>(seqs)),
      cu_dev(static_cast<std::size_t>(seqs) + 1);
  PrefillBatch sizing{slots_dev.data(), cu_dev.data(), seqs, static_cast<int>(rows), max_chunk};
  std::size_t workspace_bytes = 0;
  KVC_STATUS_REQUIRE(prefill_workspace_size<T>(store, sizing, workspace_bytes));
  test::DeviceBuffer<unsigned char> workspace(workspace_bytes);

  for (std::size_t r = 0; r < c.rounds.size(); ++r) {
    INFO("round " << r);
    // Every sequence is a row; an idle one has an empty chunk (a no-op row).
    std::vector<int> order;
    for (int s = 0; s < seqs; ++s) order.push_back(s);
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<std::int32_t> cu{0};
    std::vector<std::int32_t> row_slots;
    for (int s : order) {
      cu.push_back(cu.back() + c.rounds[r][static_cast<std::size_t>(s)]);
      row_slots.push_back(slots[static_cast<std::size_t>(s)]);
    }
    int const batch = static_cast<int>(order.size());
    int const total = cu.back();
    slots_dev.upload(row_slots, stream.get());
    cu_dev.upload(cu, stream.get());
    PrefillBatch const chunks{slots_dev.data(), cu_dev.data(), batch, static_cast<int>(rows),
                              max_chunk};
    KVC_STATUS_REQUIRE(prepare_prefill(store, chunks, stream.get()));
    for (int l = 0; l < layers; ++l) {
      Inputs const in = draw_inputs(rows);
      out_dev.poison(stream.get());
      lse_dev.poison(stream.get());
      workspace.poison(stream.get());
      KVC_STATUS_REQUIRE(prefill_layer<T>(store, l, q_in, k_in, v_dev.data(), chunks,
                                          out_dev.data(), lse_dev.data(), workspace.data(),
                                          workspace_bytes, stream.get()));
      std::vector<float> const out = test::to_floats(out_dev.download(stream.get(), rows * q_row));
      std::vector<float> const lse = lse_dev.download(stream.get(), rows * hq);
      // The padding row stays poisoned.
      CHECK(std::isnan(out[static_cast<std::size_t>(total) * q_row]));
      for (int b = 0; b < batch; ++b) {
        int const s = order[static_cast<std::size_t>(b)];
        int const first = cu[static_cast<std::size_t>(b)];
        int const count = cu[static_cast<std::size_t>(b) + 1] - first;
        if (count == 0) continue;
        reference::PrefillInput const input{
            count, reference::ConstSpan(in.q.data() + first * q_row, count * q_row),
            reference::ConstSpan(in.k.data() + first * kv_row, count * kv_row),
            reference::ConstSpan(in.v.data() + first * kv_row, count * kv_row)};
        reference::AttentionOutput want;
        reference::LayerCache& cache =
            ref[static_cast<std::size_t>(s)][static_cast<std::size_t>(l)];
        KVC_STATUS_REQUIRE(cache.prefill(input, want));
        std::string const what = "layer " + std::to_string(l) + " row " + std::to_string(b);
        test::require_close(
            std::vector<float>(out.begin() + first * q_row, out.begin() + (first + count) * q_row),
            want.out, default_tolerance(dtype), what + " out");
        test::require_close(
            std::vector<float>(lse.begin() + first * hq, lse.begin() + (first + count) * hq),
            want.lse, {1e-4, 1e-5}, what + " lse");
        if (config.has_dmc_state()) {
          // Token by token: the definition the parallel prefill must reproduce.
          reference::DmcLayerState& state =
              sequential[static_cast<std::size_t>(s)][static_cast<std::size_t>(l)];
          reference::AttentionOutput token_by_token;
          KVC_STATUS_REQUIRE(reference::dmc_prefill_sequential(spec, config.policy.dmc, state,
                                                               input, token_by_token));
          test::require_close(std::vector<float>(out.begin() + first * q_row,
                                                 out.begin() + (first + count) * q_row),
                              token_by_token.out, default_tolerance(dtype),
                              what + " out (token by token)");
        }
      }
    }
    test::StoreSnapshot<T> const snap = test::snapshot_after_success<T>(store, stream.get());
    for (int s = 0; s < seqs; ++s) {
      for (int l = 0; l < layers; ++l) {
        test::compare_layer(snap, l, slots[static_cast<std::size_t>(s)],
                            ref[static_cast<std::size_t>(s)][static_cast<std::size_t>(l)],
                            "prefill");
        if (config.has_dmc_state()) {
          reference::DmcLayerState const& state =
              sequential[static_cast<std::size_t>(s)][static_cast<std::size_t>(l)];
          for (int h = 0; h < hkv; ++h) {
            test::compare_head(snap.head(l, slots[static_cast<std::size_t>(s)], h),
                               state.heads[static_cast<std::size_t>(h)], dtype,
                               "token by token, layer " + std::to_string(l),
                               test::kKernelScoreTolerance);
          }
        }
      }
    }
  }

  // Decode steps after the prefill: the store's decode path continues from the prefilled state.
  int const probs_stride = config.has_scores() ? config.eviction_budget() + 1 : 1;
  test::DeviceBuffer<T> q_out(static_cast<std::size_t>(seqs) * q_row);
  test::DeviceBuffer<float> probs(static_cast<std::size_t>(seqs) * hq * probs_stride);
  std::vector<std::int32_t> all_slots(slots.begin(), slots.end());
  slots_dev.upload(all_slots, stream.get());
  for (int step = 0; step < c.decode_steps; ++step) {
    INFO("decode step " << step);
    KVC_STATUS_REQUIRE(store.prepare_decode_step(slots_dev.data(), seqs, stream.get()));
    for (int l = 0; l < layers; ++l) {
      Inputs const in = draw_inputs(static_cast<std::size_t>(seqs));
      KVC_STATUS_REQUIRE(store.update<T>(l, q_in, k_in, v_dev.data(), slots_dev.data(), seqs,
                                         q_out.data(), stream.get()));
      ReferenceDecodeParams<T> attention;
      KVC_STATUS_REQUIRE(store.layer_view<T>(l, attention.cache));
      attention.q = q_out.data();
      attention.seq_slots = slots_dev.data();
      attention.batch = seqs;
      attention.num_q_heads = hq;
      attention.out = out_dev.data();
      attention.lse = lse_dev.data();
      if (config.has_scores()) attention.scores = ScoreHook{probs.data(), probs_stride};
      KVC_STATUS_REQUIRE(reference_decode_attention(attention, stream.get()));
      KVC_STATUS_REQUIRE(store.evict(l, ScoreHook{probs.data(), probs_stride}, slots_dev.data(),
                                     seqs, stream.get()));
      std::vector<float> const out =
          test::to_floats(out_dev.download(stream.get(), static_cast<std::size_t>(seqs) * q_row));
      for (int s = 0; s < seqs; ++s) {
        reference::DecodeInput const input{reference::ConstSpan(in.q.data() + s * q_row, q_row),
                                           reference::ConstSpan(in.k.data() + s * kv_row, kv_row),
                                           reference::ConstSpan(in.v.data() + s * kv_row, kv_row)};
        reference::AttentionOutput want;
        KVC_STATUS_REQUIRE(
            ref[static_cast<std::size_t>(s)][static_cast<std::size_t>(l)].decode_step(input, want));
        test::require_close(
            std::vector<float>(out.begin() + s * q_row, out.begin() + (s + 1) * q_row), want.out,
            default_tolerance(dtype), "decode layer " + std::to_string(l) + " out");
      }
    }
    test::StoreSnapshot<T> const snap = test::snapshot_after_success<T>(store, stream.get());
    for (int s = 0; s < seqs; ++s) {
      for (int l = 0; l < layers; ++l) {
        test::compare_cached_heads(snap, l, slots[static_cast<std::size_t>(s)],
                                   ref[static_cast<std::size_t>(s)][static_cast<std::size_t>(l)],
                                   "decode layer " + std::to_string(l));
      }
    }
  }
  for (int slot : slots) KVC_STATUS_REQUIRE(store.release_sequence(slot, stream.get()));
  StoreStats stats;
  KVC_STATUS_REQUIRE(store.stats_sync(stats, stream.get()));
  CHECK(stats.pages_free == config.num_pages);
  return true;
}

//! Rounds of a sweep: a first chunk per sequence (mixed lengths), then appended chunks.
std::vector<std::vector<int>> mixed_rounds(std::vector<int> const& first,
                                           std::vector<int> const& second) {
  return {first, second};
}

PrefillCase make_case(char const* name, PolicyKind kind, int group, int page_size, int head_dim,
                      std::vector<std::vector<int>> rounds) {
  PrefillCase c;
  c.name = name;
  c.policy.kind = kind;
  c.group = group;
  c.page_size = page_size;
  c.head_dim = head_dim;
  c.rounds = std::move(rounds);
  return c;
}

//! The sweep of every policy: group sizes 1/4/8, page sizes 1/16/64, chunk lengths from 1 to a
//! few thousand (8k for fp32 in full runs), mixed batches, chunks appended to caches, idle rows.
//! With KVC_STORE_TEST_STEPS set (compute-sanitizer runs, see test::full_runs()) the same cases
//! and code paths run at sanitizer size: chunks of at most 70 tokens, H2O/TOVA budgets cut to
//! match (the prefill cut still happens in first and in appended chunks), DMC groups still longer
//! than the window, one layer (two in the "mha page 1" cases) and 1 decode step instead of 4.
std::vector<PrefillCase> prefill_cases(DType dtype) {
  bool const full = test::full_runs();
  // The rounds of a case: `big` in full runs, `small` at sanitizer size.
  auto sized = [full](std::vector<std::vector<int>> big, std::vector<std::vector<int>> small) {
    return full ? big : small;
  };
  std::vector<PrefillCase> cases;
  for (PolicyKind kind :
       {PolicyKind::kFull, PolicyKind::kDmc, PolicyKind::kH2O, PolicyKind::kTova}) {
    // The CPU reference keeps H2O/TOVA's probabilities as [T * Hq][slots] floats: 2k tokens at
    // most there; Full and DMC go to 8k (one layer, fp32; 4k in the other dtypes) in full runs.
    bool const scored = kind == PolicyKind::kH2O || kind == PolicyKind::kTova;
    int const longest = scored ? 2048 : dtype == DType::kF32 ? 8192 : 4096;
    cases.push_back(make_case("mha page 1", kind, 1, 1, 64, mixed_rounds({1, 37, 5}, {3, 0, 40})));
    cases.push_back(make_case(
        "gqa4 page 16", kind, 4, 16, 128,
        sized(mixed_rounds({200, 1, 77}, {1, 150, 0}), mixed_rounds({40, 1, 20}, {1, 30, 0}))));
    cases.push_back(make_case("gqa8 page 64", kind, 8, 64, 64,
                              sized(mixed_rounds({longest, 300, 64}, {129, 1, 700}),
                                    mixed_rounds({70, 30, 64}, {9, 1, 60}))));
    if (full && longest > 2048) cases.back().layers = 1;
  }
  for (PrefillCase& c : cases) {
    c.policy.h2o = full ? H2OConfig{48, 16} : H2OConfig{12, 4};
    c.policy.tova = TovaConfig{full ? 64 : 16, false};
    if (c.group == 8) c.kv_heads = 1;
    // Every RoPE layout through each policy's prepare path (Full's keys written into their slots
    // from registers, DMC's partial means, H2O/TOVA's rotated keys): rotate-half at G = 1,
    // interleaved at G = 4, none at G = 8.
    if (c.group == 4) c.rope.layout = RopeLayout::kInterleaved;
    if (c.group == 8) c.rope.layout = RopeLayout::kNone;
  }
  // DMC without a window (paper mode, interleaved RoPE), and long runs of merges.
  PrefillCase paper = make_case(
      "dmc paper gqa4 page 16", PolicyKind::kDmc, 4, 16, 64,
      sized(mixed_rounds({333, 12, 1}, {90, 1, 200}), mixed_rounds({45, 12, 1}, {20, 1, 30})));
  paper.policy.dmc = DmcConfig::paper();
  paper.rope.layout = RopeLayout::kInterleaved;
  paper.merge_probability = 0.7;
  cases.push_back(paper);
  PrefillCase merging =
      make_case("dmc long groups", PolicyKind::kDmc, 1, 16, 64,
                sized(mixed_rounds({500, 40}, {7, 300}), mixed_rounds({48, 20}, {7, 40})));
  merging.merge_probability = 0.97;
  cases.push_back(merging);
  // q and k not 16-byte aligned: the scalar RoPE of the prepare kernel, then (Full) the copy of
  // the rotated keys into the slots, and (DMC) the scalar partial means.
  for (PolicyKind kind : {PolicyKind::kFull, PolicyKind::kDmc}) {
    PrefillCase unaligned = make_case(
        "unaligned q k", kind, 2, 16, 64,
        sized(mixed_rounds({90, 17, 1}, {33, 1, 60}), mixed_rounds({30, 17, 1}, {9, 1, 20})));
    unaligned.unaligned_qk = true;
    cases.push_back(unaligned);
  }
  // H2O without a recent window, TOVA protecting the newcomer (prefill ignores it).
  PrefillCase h2o =
      make_case("h2o no recent", PolicyKind::kH2O, 4, 16, 64,
                sized(mixed_rounds({100, 3}, {50, 90}), mixed_rounds({30, 3}, {20, 25})));
  h2o.policy.h2o = H2OConfig{full ? 40 : 12, 0};
  cases.push_back(h2o);
  PrefillCase tova =
      make_case("tova protect new", PolicyKind::kTova, 1, 1, 64,
                sized(mixed_rounds({30, 70}, {20, 1}), mixed_rounds({30, 20}, {10, 1})));
  tova.policy.tova = TovaConfig{full ? 32 : 16, true};
  cases.push_back(tova);
  if (!full) {
    for (PrefillCase& c : cases) {
      c.decode_steps = 1;
      if (std::string(c.name) != "mha page 1") c.layers = 1;  // two layers in 4 cases
    }
  }
  return cases;
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("store prefill: host validation (no device needed)") {
    PagedStore store;  // not initialised
    PrefillBatch chunks;
    std::size_t bytes = 0;
    CHECK(prefill_workspace_size<float>(store, chunks, bytes) == Status::kErrorInvalidArgument);
    CHECK(prepare_prefill(store, chunks, nullptr) == Status::kErrorInvalidArgument);
    CHECK(prefill_layer<float>(store, 0, nullptr, nullptr, nullptr, chunks, nullptr, nullptr,
                               nullptr, 0, nullptr) == Status::kErrorInvalidArgument);
    CHECK(detail::prefill_slots_needed(PolicyKind::kFull, 0, 10, 5) == 15);
    CHECK(detail::prefill_slots_needed(PolicyKind::kDmc, 0, 10, 5) == 15);
    CHECK(detail::prefill_slots_needed(PolicyKind::kH2O, 12, 10, 5) == 12);
    CHECK(detail::prefill_slots_needed(PolicyKind::kTova, 20, 10, 5) == 15);
  }

  TEST_CASE("store prefill: the cut's 64-bit keys order like evicts_before (no device needed)") {
    std::mt19937_64 rng(test::test_seed() + 13);
    INFO("seed " << test::test_seed());
    // Scores with many ties (a few values, both zeros, infinities, NaN), distinct positions.
    std::vector<float> const values = {0.0f,  -0.0f,    0.25f,     0.25f, 1e-30f, 3.0f,
                                       -1.0f, INFINITY, -INFINITY, NAN,   7.5f,   1e30f};
    std::uniform_int_distribution<std::size_t> pick(0, values.size() - 1);
    std::vector<std::int64_t> positions(400);
    for (std::size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<std::int64_t>(i);
    std::shuffle(positions.begin(), positions.end(), rng);
    std::vector<float> scores(positions.size());
    for (float& score : scores) score = values[pick(rng)];
    for (std::size_t a = 0; a < scores.size(); ++a) {
      std::uint64_t const key_a = detail::prefill_keep_key(scores[a], positions[a]);
      REQUIRE(key_a != 0);
      REQUIRE(key_a != ~0ull);
      for (std::size_t b = 0; b < scores.size(); ++b) {
        if (a == b) continue;
        std::uint64_t const key_b = detail::prefill_keep_key(scores[b], positions[b]);
        bool const kept_first = key_a > key_b;
        REQUIRE(kept_first == evicts_before(scores[b], positions[b], scores[a], positions[a]));
      }
    }
  }

  TEST_CASE("store prefill: bad host input returns a status and launches nothing") {
    KVC_REQUIRE_CUDA_DEVICE();
    test::Stream stream;
    PagedStoreConfig config;
    config.shape = ModelShape{2, 4, 2, 64};
    config.dtype = DType::kF32;
    config.page_size = 4;
    config.num_pages = 64;
    config.max_seqs = 2;
    config.max_pages_per_head = 8;
    std::size_t bytes = 0;
    REQUIRE(PagedStore::required_bytes(config, bytes) == Status::kSuccess);
    test::DeviceBuffer<unsigned char> memory(bytes);
    PagedStore store;
    KVC_STATUS_REQUIRE(store.init(config, memory.data(), bytes, stream.get()));
    test::DeviceBuffer<std::int32_t> ints(8);
    PrefillBatch chunks{ints.data(), ints.data(), 1, 4, 4};
    std::size_t need = 0;
    CHECK(prefill_workspace_size<half>(store, chunks, need) == Status::kErrorInvalidArgument);
    PrefillBatch bad = chunks;
    bad.batch = 3;  // above max_seqs
    CHECK(prepare_prefill(store, bad, stream.get()) == Status::kErrorInvalidArgument);
    bad = chunks;
    bad.cu_tokens = nullptr;
    CHECK(prepare_prefill(store, bad, stream.get()) == Status::kErrorInvalidArgument);
    if (!prefill_attention_supported(DType::kF32, 64, 2)) return;
    KVC_STATUS_REQUIRE(prefill_workspace_size<float>(store, chunks, need));
    test::DeviceBuffer<float> x(64 * 4);
    test::DeviceBuffer<unsigned char> workspace(need);
    CHECK(prefill_layer<float>(store, 2, x.data(), x.data(), x.data(), chunks, x.data(), nullptr,
                               workspace.data(), need,
                               stream.get()) == Status::kErrorInvalidArgument);
    CHECK(prefill_layer<float>(store, 0, x.data(), x.data(), x.data(), chunks, x.data(), nullptr,
                               workspace.data(), need - 1,
                               stream.get()) == Status::kErrorSizeMismatch);
    CHECK(prefill_layer<float>(store, 0, nullptr, x.data(), x.data(), chunks, x.data(), nullptr,
                               workspace.data(), need,
                               stream.get()) == Status::kErrorInvalidArgument);
  }

  TEST_CASE_TEMPLATE("store prefill: every policy equals the reference, then decode continues", T,
                     KVC_STORE_PREFILL_TEST_DTYPES) {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed() + 11);
    INFO("seed " << test::test_seed());
    std::vector<PrefillCase> cases = prefill_cases(DTypeTraits<T>::kDType);
#if KVC_CI_MINIMAL
    cases.resize(4);
#endif
    int ran = 0;
    for (PrefillCase const& c : cases) ran += run_prefill_case<T>(c, rng) ? 1 : 0;
    MESSAGE(ran << " of " << cases.size() << " prefill cases ran");
  }

  TEST_CASE_TEMPLATE("store prefill: a pool too small for the batch changes nothing", T,
                     KVC_STORE_TEST_DTYPES) {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(test::test_seed() + 12);
    INFO("seed " << test::test_seed());
    for (PolicyKind kind :
         {PolicyKind::kFull, PolicyKind::kDmc, PolicyKind::kH2O, PolicyKind::kTova}) {
      PrefillCase c = make_case("exhaustion", kind, 2, 4, 64, {{10, 20, 30}});
      c.policy.h2o = H2OConfig{8, 4};
      c.policy.tova = TovaConfig{12, false};
      c.decode_steps = 0;
      PagedStoreConfig config = prefill_config(c, DTypeTraits<T>::kDType);
      if (!prefill_attention_supported(config.dtype, c.head_dim, c.group)) continue;
      config.num_pages = 12;  // far below what the batch needs
      INFO("policy " << std::string(policy_name(kind)));
      reference::LayerSpec const spec = test::layer_spec(config);
      test::StoreFixture fixture(config);
      test::Stream const& stream = fixture.stream;
      PagedStore& store = fixture.store;
      std::vector<std::int32_t> slots(3);
      for (std::int32_t& slot : slots) {
        int s = 0;
        KVC_STATUS_REQUIRE(store.add_sequence(s, stream.get()));
        slot = s;
      }
      std::vector<std::int32_t> const cu{0, 10, 30, 60};
      test::DeviceBuffer<std::int32_t> slots_dev(3), cu_dev(4);
      slots_dev.upload(slots, stream.get());
      cu_dev.upload(cu, stream.get());
      PrefillBatch const chunks{slots_dev.data(), cu_dev.data(), 3, 60, 30};
      std::size_t workspace_bytes = 0;
      KVC_STATUS_REQUIRE(prefill_workspace_size<T>(store, chunks, workspace_bytes));
      test::DeviceBuffer<unsigned char> workspace(workspace_bytes);
      std::size_t const q_row = static_cast<std::size_t>(config.shape.num_q_heads) * 64;
      std::size_t const kv_row = static_cast<std::size_t>(config.shape.num_kv_heads) * 64;
      std::vector<float> const q_host = test::random_normal(rng, 60 * q_row, config.dtype);
      std::vector<float> const k_host = test::random_normal(rng, 60 * kv_row, config.dtype);
      std::vector<float> const v_host = test::random_normal(rng, 60 * kv_row, config.dtype);
      test::DeviceBuffer<T> q(60 * q_row), k(60 * kv_row), v(60 * kv_row), out(60 * q_row);
      q.upload(test::to_storage<T>(q_host), stream.get());
      k.upload(test::to_storage<T>(k_host), stream.get());
      v.upload(test::to_storage<T>(v_host), stream.get());
      KVC_STATUS_REQUIRE(prepare_prefill(store, chunks, stream.get()));
      workspace.poison(stream.get());
      for (int l = 0; l < config.shape.num_layers; ++l) {
        out.poison(stream.get());
        KVC_STATUS_REQUIRE(prefill_layer<T>(store, l, q.data(), k.data(), v.data(), chunks,
                                            out.data(), nullptr, workspace.data(), workspace_bytes,
                                            stream.get()));
        // The refused step's attention still runs, on the zeroed inputs the prepare kernel gave
        // it (not on the poisoned workspace): every output row written, and finite.
        std::vector<float> const refused_out =
            test::to_floats(out.download(stream.get(), 60 * q_row));
        std::size_t not_finite = 0;
        for (float x : refused_out) not_finite += std::isfinite(x) ? 0 : 1;
        CHECK_MESSAGE(not_finite == 0,
                      "refused step, layer " << l << ": " << not_finite << " outputs not finite");
      }
      StepReport report;
      std::vector<std::int32_t> flags(3, -7);
      KVC_STATUS_REQUIRE(store.copy_step_report_async(&report, flags.data(), 3, stream.get()));
      KVC_CUDA_REQUIRE(cudaStreamSynchronize(stream.get()));
      CHECK(step_status(report) == Status::kErrorOutOfPages);
      CHECK(report.failed == 1);
      CHECK(report.pages_short > 0);
      CHECK(report.protocol_errors == 0);
      test::StoreSnapshot<T> const snap = test::take_snapshot<T>(store, stream.get());
      test::check_page_accounting(snap);
      for (std::int32_t slot : slots) {
        for (int l = 0; l < config.shape.num_layers; ++l) {
          reference::LayerCache empty;
          REQUIRE(reference::LayerCache::create(spec, config.policy, empty) == Status::kSuccess);
          std::string const what = "refused, layer " + std::to_string(l);
          CHECK(snap.tokens_seen[static_cast<std::size_t>(snap.dims.layer_seq(l, slot))] == 0);
          for (int h = 0; h < config.shape.num_kv_heads; ++h) {
            CHECK(snap.head(l, slot, h).size() == 0);
          }
          if (config.has_dmc_state()) {
            auto const& state = std::get<reference::DmcLayerState>(empty.state());
            test::compare_dmc_state(snap, l, slot, state.dmc, {0.0, 0.0}, what);
          }
        }
      }

      // Release the two longer sequences and retry the first row alone: it now fits (its heads
      // keep the pages the refused step gave them), and matches the reference.
      KVC_STATUS_REQUIRE(store.release_sequence(slots[1], stream.get()));
      KVC_STATUS_REQUIRE(store.release_sequence(slots[2], stream.get()));
      PrefillBatch const retry{slots_dev.data(), cu_dev.data(), 1, 60, 30};
      KVC_STATUS_REQUIRE(prepare_prefill(store, retry, stream.get()));
      for (int l = 0; l < config.shape.num_layers; ++l) {
        out.poison(stream.get());
        KVC_STATUS_REQUIRE(prefill_layer<T>(store, l, q.data(), k.data(), v.data(), retry,
                                            out.data(), nullptr, workspace.data(), workspace_bytes,
                                            stream.get()));
        std::vector<float> const got = test::to_floats(out.download(stream.get(), 10 * q_row));
        reference::LayerCache cache;
        REQUIRE(reference::LayerCache::create(spec, config.policy, cache) == Status::kSuccess);
        reference::PrefillInput const input{10, reference::ConstSpan(q_host.data(), 10 * q_row),
                                            reference::ConstSpan(k_host.data(), 10 * kv_row),
                                            reference::ConstSpan(v_host.data(), 10 * kv_row)};
        reference::AttentionOutput want;
        KVC_STATUS_REQUIRE(cache.prefill(input, want));
        test::require_close(got, want.out, default_tolerance(config.dtype), "retry out");
        test::StoreSnapshot<T> const after = test::snapshot_after_success<T>(store, stream.get());
        test::compare_layer(after, l, slots[0], cache, "retry");
      }
    }
  }
}
