// Decode attention over the paged per-head store (kvc_decode_instances and the header-only
// kernels) against the CPU reference, element by element: every dtype, head dim, group size and
// page size 1/16/64; lengths 1..64k; ragged DMC-like mixes; one-slot heads; zero-length heads and
// inactive rows; the LSE; the score (probability) output; a logits-transform variant; CUDA-graph
// replay with lengths changed on the device; and the Status of unsupported or invalid calls.
// The paged views are built here directly (random pools, pages scattered through the pool),
// independent of the store's own code.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include "kvc/attention/decode_api.cuh"
#if !KVC_CI_MINIMAL
#include "kvc/attention/decode.cuh"  // the soft-cap case instantiates a variant here
#endif
#include "kvc/reference/attention.hpp"

#include "gpu_attention_checks.cuh"
#include "test_support.hpp"

namespace {

using kvc::DType;
using kvc::Status;

using kvc::test::compiled_dtypes;
using kvc::test::compiled_groups;
using kvc::test::compiled_head_dims;
using kvc::test::DeviceBytes;
using kvc::test::StreamGuard;

//! One decode call's inputs on the host.
struct DecodeCase {
  DType dtype = DType::kBF16;
  int head_dim = 128;
  int group = 1;
  int num_kv_heads = 2;
  int page_size = 16;
  int batch = 2;
  int max_seqs = 2;
  std::vector<int> seq_slots;  // [batch]; -1 or >= max_seqs: inactive row
  std::vector<int> lengths;    // [max_seqs * num_kv_heads]
  bool probs = true;
  kvc::ScoreForm score_form = kvc::ScoreForm::kProbabilities;  // of the score output
  float q_stddev = 1.5f;  // logits of std ~ q_stddev (keys are N(0, 1))
  float soft_cap = 0.0f;  // > 0: the reference applies cap * tanh(logit / cap)
  kvc::DecodeParams::SplitPolicy split{};  // the plan's split policy (zeros: the default)

  int num_q_heads() const { return group * num_kv_heads; }
  std::string name() const {
    return std::string(kvc::dtype_name(dtype)) + " D=" + std::to_string(head_dim) +
           " G=" + std::to_string(group) + " Hkv=" + std::to_string(num_kv_heads) +
           " page=" + std::to_string(page_size) + " B=" + std::to_string(batch) +
           (split.waves > 0 ? " waves=" + std::to_string(split.waves) : "") +
           (split.min_chunk > 0 ? " min_chunk=" + std::to_string(split.min_chunk) : "") +
           (split.schedule > 0 ? " schedule=" + std::to_string(split.schedule) : "") +
           (probs && score_form == kvc::ScoreForm::kLog2Logits ? " log2-logit scores" : "");
  }
};

//! A paged layer built on the device from a DecodeCase: random pools, pages of every
//! (sequence, KV head) drawn from a random permutation of the pool, unused page-table entries -1.
struct PagedLayer {
  DecodeCase c;
  int max_pages = 1;
  int num_pages = 0;
  std::vector<float> k_pool, v_pool;  // [num_pages, page_size, head_dim]
  std::vector<int> page_table;        // [max_seqs, num_kv_heads, max_pages]
  std::vector<int> capacity;          // [max_seqs * num_kv_heads] slots the head's pages hold
  std::vector<float> q;               // [batch, num_q_heads, head_dim]
  DeviceBytes d_k, d_v, d_table, d_lengths, d_slots, d_q, d_out, d_lse, d_probs, d_workspace;
  DeviceBytes d_score_lse;  // ScoreForm::kLog2Logits: [batch, num_q_heads]
  int probs_stride = 0;

  PagedLayer(DecodeCase const& test_case, std::mt19937_64& rng, int extra_pages_per_head = 0)
      : c(test_case) {
    int const d = c.head_dim;
    int const hkv = c.num_kv_heads;
    int longest = 1;
    for (int length : c.lengths) longest = std::max(longest, length);
    max_pages = (longest + c.page_size - 1) / c.page_size + extra_pages_per_head;
    std::vector<int> pages_of(c.lengths.size());
    for (std::size_t i = 0; i < c.lengths.size(); ++i) {
      pages_of[i] = (c.lengths[i] + c.page_size - 1) / c.page_size + extra_pages_per_head;
      capacity.push_back(pages_of[i] * c.page_size);
    }
    kvc::test::ScatteredPages pages =
        kvc::test::scatter_pages(rng, pages_of, static_cast<std::size_t>(c.max_seqs) * hkv,
                                 max_pages, c.page_size, d, c.dtype);
    num_pages = pages.num_pages;
    k_pool = std::move(pages.k_pool);
    v_pool = std::move(pages.v_pool);
    page_table = std::move(pages.page_table);
    std::size_t const pool = static_cast<std::size_t>(num_pages) * c.page_size * d;
    q = kvc::test::random_normal(rng, static_cast<std::size_t>(c.batch) * c.num_q_heads() * d,
                                 c.dtype, c.q_stddev);
    probs_stride = max_pages * c.page_size + 3;

    d_k.allocate(pool * kvc::dtype_size(c.dtype));
    d_v.allocate(pool * kvc::dtype_size(c.dtype));
    auto const k_bytes = kvc::test::encode_elements(k_pool, c.dtype);
    auto const v_bytes = kvc::test::encode_elements(v_pool, c.dtype);
    d_k.upload(k_bytes.data(), k_bytes.size());
    d_v.upload(v_bytes.data(), v_bytes.size());
    d_table.allocate(page_table.size() * sizeof(int));
    d_table.upload(page_table.data(), page_table.size() * sizeof(int));
    d_lengths.allocate(c.lengths.size() * sizeof(int));
    upload_lengths(c.lengths);
    d_slots.allocate(std::max<std::size_t>(1, c.seq_slots.size()) * sizeof(int));
    d_slots.upload(c.seq_slots.data(), c.seq_slots.size() * sizeof(int));
    auto const q_bytes = kvc::test::encode_elements(q, c.dtype);
    d_q.allocate(std::max<std::size_t>(16, q_bytes.size()));
    d_q.upload(q_bytes.data(), q_bytes.size());
    std::size_t const rows = static_cast<std::size_t>(c.batch) * c.num_q_heads();
    d_out.allocate(std::max<std::size_t>(16, rows * d * kvc::dtype_size(c.dtype)));
    d_lse.allocate(std::max<std::size_t>(16, rows * sizeof(float)));
    d_probs.allocate(std::max<std::size_t>(16, rows * probs_stride * sizeof(float)));
    d_score_lse.allocate(std::max<std::size_t>(16, rows * sizeof(float)));
  }

  void upload_lengths(std::vector<int> const& lengths) {
    c.lengths = lengths;
    d_lengths.upload(lengths.data(), lengths.size() * sizeof(int));
  }

  kvc::DecodeParams params() const {
    kvc::DecodeParams p;
    p.dtype = c.dtype;
    p.cache.k_pages = d_k.get();
    p.cache.v_pages = d_v.get();
    p.cache.page_table = d_table.get<std::int32_t>();
    p.cache.lengths = d_lengths.get<std::int32_t>();
    p.cache.page_size = c.page_size;
    p.cache.head_dim = c.head_dim;
    p.cache.num_kv_heads = c.num_kv_heads;
    p.cache.max_pages_per_head = max_pages;
    p.cache.max_seqs = c.max_seqs;
    p.q = d_q.get();
    p.seq_slots = d_slots.get<std::int32_t>();
    p.batch = c.batch;
    p.num_q_heads = c.num_q_heads();
    p.out = d_out.get();
    p.lse = d_lse.get<float>();
    if (c.probs) {
      p.scores.probs = d_probs.get<float>();
      p.scores.stride = probs_stride;
      p.scores.form = c.score_form;
      p.scores.lse = d_score_lse.get<float>();
    }
    p.logits_soft_cap = c.soft_cap;
    p.split = c.split;
    p.workspace = d_workspace.get();
    p.workspace_bytes = d_workspace.bytes();
    return p;
  }

  //! Sequence slot of batch row b, or -1.
  int seq_of(int b) const {
    int const seq = c.seq_slots[b];
    return seq >= 0 && seq < c.max_seqs ? seq : -1;
  }
  int length_of(int seq, int kv_head) const {
    return seq < 0 ? 0 : c.lengths[static_cast<std::size_t>(seq) * c.num_kv_heads + kv_head];
  }

  //! The slots of (seq, kv head) gathered through the page table.
  kvc::reference::HeadCache gather(int seq, int kv_head) const {
    kvc::reference::HeadCache head;
    kvc::test::append_paged_slots(
        head, k_pool, v_pool, page_table,
        (static_cast<std::size_t>(seq) * c.num_kv_heads + kv_head) * max_pages, c.page_size,
        c.head_dim, length_of(seq, kv_head));
    return head;
  }
};

//! Expected out [B, Hq, D], lse [B, Hq] and probs rows per (b, hq) of a layer.
struct Expected {
  std::vector<float> out, lse;
  std::vector<std::vector<float>> probs;  // [B * Hq][length]
};

//! Soft-capped decode attention in double, written out here (the CPU reference has no hook).
void soft_cap_reference(kvc::reference::LayerSpec const& spec, float cap, float const* q,
                        std::vector<kvc::reference::HeadCache> const& heads, float* out, float* lse,
                        std::vector<float>* probs) {
  int const d = spec.head_dim;
  double const scale = spec.softmax_scale();
  for (int h = 0; h < spec.num_q_heads; ++h) {
    auto const& head = heads[h / spec.group_size()];
    int const n = head.size();
    probs[h].assign(n, 0.0f);
    for (int i = 0; i < d; ++i) out[h * d + i] = 0.0f;
    lse[h] = -std::numeric_limits<float>::infinity();
    if (n == 0) continue;
    std::vector<double> logits(n);
    double top = -std::numeric_limits<double>::infinity();
    for (int s = 0; s < n; ++s) {
      double dot = 0.0;
      for (int i = 0; i < d; ++i)
        dot += static_cast<double>(q[h * d + i]) * head.k[static_cast<std::size_t>(s) * d + i];
      logits[s] = cap * std::tanh(dot * scale / cap);
      top = std::max(top, logits[s]);
    }
    double sum = 0.0;
    for (double logit : logits) sum += std::exp(logit - top);
    double const total = top + std::log(sum);
    std::vector<double> acc(d, 0.0);
    for (int s = 0; s < n; ++s) {
      double const p = std::exp(logits[s] - total);
      probs[h][s] = static_cast<float>(p);
      for (int i = 0; i < d; ++i) acc[i] += p * head.v[static_cast<std::size_t>(s) * d + i];
    }
    for (int i = 0; i < d; ++i) out[h * d + i] = static_cast<float>(acc[i]);
    lse[h] = static_cast<float>(total);
  }
}

Expected reference_of(PagedLayer const& layer) {
  DecodeCase const& c = layer.c;
  kvc::reference::LayerSpec spec;
  spec.num_q_heads = c.num_q_heads();
  spec.num_kv_heads = c.num_kv_heads;
  spec.head_dim = c.head_dim;
  spec.dtype = c.dtype;
  int const hq = c.num_q_heads();
  int const d = c.head_dim;
  Expected expected;
  expected.out.resize(static_cast<std::size_t>(c.batch) * hq * d);
  expected.lse.resize(static_cast<std::size_t>(c.batch) * hq);
  expected.probs.resize(static_cast<std::size_t>(c.batch) * hq);
  for (int b = 0; b < c.batch; ++b) {
    int const seq = layer.seq_of(b);
    std::vector<kvc::reference::HeadCache> heads(c.num_kv_heads);
    for (int h = 0; h < c.num_kv_heads; ++h) {
      if (seq >= 0) heads[h] = layer.gather(seq, h);
    }
    std::size_t const q_offset = static_cast<std::size_t>(b) * hq * d;
    if (c.soft_cap > 0.0f) {
      soft_cap_reference(spec, c.soft_cap, layer.q.data() + q_offset, heads,
                         expected.out.data() + q_offset,
                         expected.lse.data() + static_cast<std::size_t>(b) * hq,
                         expected.probs.data() + static_cast<std::size_t>(b) * hq);
      continue;
    }
    kvc::reference::AttentionOutput output;
    kvc::reference::AttentionProbabilities probabilities;
    REQUIRE(kvc::reference::decode_attention(
                spec, kvc::reference::ConstSpan(layer.q.data() + q_offset, std::size_t(hq) * d),
                heads, output, &probabilities) == Status::kSuccess);
    std::copy(output.out.begin(), output.out.end(), expected.out.begin() + q_offset);
    std::copy(output.lse.begin(), output.lse.end(),
              expected.lse.begin() + static_cast<std::size_t>(b) * hq);
    for (int h = 0; h < hq; ++h)
      expected.probs[static_cast<std::size_t>(b) * hq + h] = probabilities.rows[h];
  }
  return expected;
}

//! Downloads out, lse and probs and compares them with `expected` element by element.
void check_against(PagedLayer const& layer, Expected const& expected, std::string const& what) {
  DecodeCase const& c = layer.c;
  int const hq = c.num_q_heads();
  std::size_t const rows = static_cast<std::size_t>(c.batch) * hq;
  std::vector<unsigned char> out_bytes(rows * c.head_dim * kvc::dtype_size(c.dtype));
  layer.d_out.download(out_bytes.data(), out_bytes.size());
  kvc::test::require_close(kvc::test::decode_elements(out_bytes, c.dtype), expected.out,
                           kvc::default_tolerance(c.dtype), what + " out");

  // LSE values against the reference's natural LSE times `scale` (1, or log2(e) for the score
  // LSE of the log2-logit form), with the natural LSE's tolerance scaled alike; -inf where the
  // reference has -inf.
  auto check_lse = [&](std::vector<float> const& got, double scale, char const* label) {
    std::size_t mismatches = 0;
    for (std::size_t i = 0; i < rows; ++i) {
      double const natural = expected.lse[i];
      double const want = natural * scale;
      bool const ok = std::isinf(natural)
                          ? std::isinf(got[i]) && got[i] < 0.0f
                          : std::abs(got[i] - want) <= (5e-4 + 1e-4 * std::abs(natural)) * scale;
      if (!ok && mismatches++ < 5)
        FAIL_CHECK(what << " " << label << "[" << i << "]: got " << got[i] << ", expected "
                        << want);
    }
    REQUIRE_MESSAGE(mismatches == 0,
                    what << ": " << mismatches << " " << label << " values differ");
  };
  std::vector<float> lse(rows);
  layer.d_lse.download(lse.data(), rows * sizeof(float));
  check_lse(lse, 1.0, "lse");

  if (!c.probs) return;
  std::vector<float> probs(rows * layer.probs_stride);
  layer.d_probs.download(probs.data(), probs.size() * sizeof(float));
  bool const log2_form = c.score_form == kvc::ScoreForm::kLog2Logits;
  std::vector<float> score_lse(rows);
  if (log2_form) {
    layer.d_score_lse.download(score_lse.data(), rows * sizeof(float));
    check_lse(score_lse, 1.4426950408889634, "score lse");
  }
  std::vector<float> got, want;
  for (std::size_t r = 0; r < rows; ++r) {
    std::vector<float> const& row = expected.probs[r];
    int const n = std::min<int>(static_cast<int>(row.size()), layer.probs_stride);
    for (int s = 0; s < n; ++s) {
      float const stored = probs[r * layer.probs_stride + s];
      got.push_back(log2_form ? kvc::ScoreHook::probability_of_log2(stored, score_lse[r]) : stored);
      want.push_back(row[s]);
    }
  }
  kvc::test::require_close(got, want, {1e-6, 1e-3}, what + " probs");
}

//! Sizes the workspace, poisons every output and the workspace, runs the precompiled entry point.
void run_precompiled(PagedLayer& layer, cudaStream_t stream) {
  layer.d_score_lse.poison();
  kvc::test::run_poisoned(layer, kvc::decode_attention_workspace_size, kvc::decode_attention,
                          stream);
}

//! A case of the given shape, batch and sequence slots; seq_slots, lengths and the rest are the
//! caller's.
DecodeCase shaped_case(DType dtype, int head_dim, int group, int num_kv_heads, int page_size,
                       int batch, int max_seqs) {
  DecodeCase c;
  c.dtype = dtype;
  c.head_dim = head_dim;
  c.group = group;
  c.num_kv_heads = num_kv_heads;
  c.page_size = page_size;
  c.batch = batch;
  c.max_seqs = max_seqs;
  return c;
}

//! Builds `c`'s layer, runs the precompiled kernels on it and checks them against the reference
//! (`note` is added to the case name in the failure context).
void run_and_check(DecodeCase const& c, std::mt19937_64& rng, cudaStream_t stream,
                   std::string const& note = "") {
  PagedLayer layer(c, rng);
  INFO(c.name() << note);
  run_precompiled(layer, stream);
  check_against(layer, reference_of(layer), c.name());
}

//! Random lengths for every (sequence, KV head) in [1, max_length], a zero-length head and a
//! one-slot head when there are enough heads.
std::vector<int> ragged_lengths(std::mt19937_64& rng, int heads, int max_length) {
  std::uniform_int_distribution<int> dist(1, max_length);
  std::vector<int> lengths(heads);
  for (int& length : lengths) length = dist(rng);
  if (heads >= 3) {
    lengths[1] = 0;
    lengths[2] = 1;
  }
  return lengths;
}

//! DMC-like lengths: each head gets L / r with r from {1, 2, 4, 8, 16} under `weights`.
std::vector<int> dmc_lengths(std::mt19937_64& rng, int heads, int full_length,
                             std::vector<double> const& weights) {
  std::discrete_distribution<int> ratio(weights.begin(), weights.end());
  std::vector<int> lengths(heads);
  for (int& length : lengths) length = std::max(1, full_length >> ratio(rng));
  return lengths;
}

//! Rows 0..batch-1 mapped to a random permutation of the sequence slots.
std::vector<int> shuffled_slots(std::mt19937_64& rng, int batch, int max_seqs) {
  std::vector<int> slots(max_seqs);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  slots.resize(batch);
  return slots;
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE(
      "decode attention: every dtype, head dim, group size and page size, ragged, with scores") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed());
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    // KVC_STORE_TEST_STEPS (sanitizer runs): every instance once, the page sizes taking turns
    // (all of them when fewer than 3 instances are compiled).
    std::size_t const instances =
        compiled_dtypes().size() * compiled_head_dims().size() * compiled_groups().size();
    bool const every_page = kvc::test::full_runs() || instances < 3;
    int const page_sizes[] = {1, 16, 64};
    int instance = 0;
    for (DType dtype : compiled_dtypes()) {
      for (int head_dim : compiled_head_dims()) {
        for (int group : compiled_groups()) {
          ++instance;
          for (int page_size : {1, 16, 64}) {
            if (!every_page && page_size != page_sizes[instance % 3]) continue;
            REQUIRE(kvc::decode_attention_supported(dtype, head_dim, group));
            DecodeCase c = shaped_case(dtype, head_dim, group, 2, page_size, 3, 4);
            c.seq_slots = shuffled_slots(rng, c.batch, c.max_seqs);
            // Lengths up to 300: with the default split policy heads above 256 slots are split
            // (the chunk bound is the minimum chunk here), so the last-CTA merge runs; shorter
            // ones finish in one chunk.
            c.lengths = ragged_lengths(rng, c.max_seqs * c.num_kv_heads, 300);
            // Both score forms over the instances and page sizes.
            c.score_form = (instance + page_size) % 2 != 0 ? kvc::ScoreForm::kLog2Logits
                                                           : kvc::ScoreForm::kProbabilities;
            run_and_check(c, rng, guard.stream);
            // The same lengths split as finely as the plan allows (64-slot chunks, 4 per CTA):
            // heads above 64 slots then go through the last-CTA merge.
            c.split = {4, 64};
            run_and_check(c, rng, guard.stream);
            c.split = {4, 64, 2};  // the same, CTAs claiming items greedily
            run_and_check(c, rng, guard.stream);
            // Balanced: equal contiguous shares (of at least 64 slots), heads cut at the shares'
            // ends, so pieces of any 64-multiple size and position.
            c.split = {0, 64, 3};
            run_and_check(c, rng, guard.stream);
          }
        }
      }
    }
  }

  TEST_CASE("decode attention: long heads (64k slots), one-slot heads, page size 1") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed() + 1);
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    struct Shape {
      DType dtype;
      int head_dim, group, page_size;
    };
#if KVC_CI_MINIMAL
    Shape const shapes[] = {{DType::kBF16, 128, 4, 16}, {DType::kBF16, 128, 4, 1}};
#else
    Shape const shapes[] = {{DType::kBF16, 128, 4, 16},
                            {DType::kF16, 64, 1, 1},
                            {DType::kF32, 128, 8, 64},
                            {DType::kBF16, 256, 2, 16}};
#endif
    for (Shape const& shape : shapes) {
      DecodeCase c =
          shaped_case(shape.dtype, shape.head_dim, shape.group, 2, shape.page_size, 2, 2);
      c.seq_slots = {1, 0};
      c.lengths = {65536, 1, 1, 40000 + static_cast<int>(rng() % 1000)};
      c.q_stddev = 2.5f;  // peaked softmax: a wrong slot or a lost chunk shows
      run_and_check(c, rng, guard.stream);
      // Balanced: the 64k head is cut into the most pieces a head may have (kMaxSplits).
      c.split = {0, 64, 3};
      run_and_check(c, rng, guard.stream);
    }
  }

  TEST_CASE("decode attention: DMC-like ragged mixes (ratios 1..16 per head), MHA and GQA") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed() + 2);
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    std::vector<double> const mix_a = {0.10, 0.10, 0.30, 0.30, 0.20};
    std::vector<double> const mix_b = {0.02, 0.05, 0.18, 0.35, 0.40};
#if KVC_CI_MINIMAL
    int const groups[] = {4};
#else
    int const groups[] = {1, 4, 8};
#endif
    // KVC_STORE_TEST_STEPS (sanitizer runs): shorter heads and no min-chunk-1024 run; both
    // schedules still run.
    bool const full = kvc::test::full_runs();
    for (int group : groups) {
      for (auto const* mix : {&mix_a, &mix_b}) {
        DecodeCase c = shaped_case(DType::kBF16, 128, group, 16 / group, 16, 8, 10);
        c.seq_slots = shuffled_slots(rng, c.batch, c.max_seqs);
        // Enough slots that the chunk bound rises above the minimum (items of several sizes).
        c.lengths = dmc_lengths(rng, c.max_seqs * c.num_kv_heads, full ? 4096 : 1024, *mix);
        c.probs = group == 4;
        c.score_form = mix == &mix_b ? kvc::ScoreForm::kLog2Logits : kvc::ScoreForm::kProbabilities;
        run_and_check(c, rng, guard.stream);
        c.split = {4, 64};  // many chunks per head: merges of up to 64 partials
        run_and_check(c, rng, guard.stream);
        if (full) {
          c.split = {1, 1024};
          run_and_check(c, rng, guard.stream);
        }
        // Every schedule forced (the default picks snake or greedy by items per CTA): snake,
        // greedy (the work list claimed through an atomic counter) and balanced (contiguous
        // equal shares, heads cut at their ends; waves ignored), on the same lengths: every
        // item done exactly once, whichever CTA takes it.
        for (int schedule : {1, 2, 3}) {
          for (int waves : {0, 4}) {
            c.split = {waves, waves == 4 ? 64 : 0, schedule};
            run_and_check(c, rng, guard.stream);
          }
        }
      }
    }
  }

  TEST_CASE("decode attention: zero-length heads and inactive rows give out = 0, lse = -inf") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed() + 3);
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    for (int schedule : {0, 3}) {  // the default and the balanced plan
      INFO("schedule " << schedule);
      DecodeCase c = shaped_case(DType::kBF16, 128, 4, 2, 16, 5, 3);
      c.split.schedule = schedule;
      c.seq_slots = {2, -1, 0, 7, 1};   // rows 1 and 3 are inactive (negative, out of range)
      c.lengths = {0, 37, 1, 0, 0, 0};  // seq 2: both heads empty
      PagedLayer layer(c, rng);
      run_precompiled(layer, guard.stream);
      Expected const expected = reference_of(layer);
      for (int b : {1, 3}) {
        for (int h = 0; h < c.num_q_heads(); ++h)
          CHECK(std::isinf(expected.lse[b * c.num_q_heads() + h]));
      }
      check_against(layer, expected, "inactive rows");

      // A batch with no slot at all: only empty heads, no work items.
      c.seq_slots = {-1, 2, -1, -1, 2};
      PagedLayer empty(c, rng);
      run_precompiled(empty, guard.stream);
      check_against(empty, reference_of(empty), "all empty");
    }
  }

  TEST_CASE("decode attention: many short heads per CTA (one-slot and up to 100 slots)") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed() + 4);
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    // 2048 heads of one tile each: every CTA walks several items, so the cross-item pipeline and
    // the query ring are exercised; then lengths 1..100 with the score output.
    for (DType dtype : compiled_dtypes()) {
      for (int max_length : {1, 100}) {
        DecodeCase c = shaped_case(dtype, 128, 4, 8, 16, 256, 260);
        c.seq_slots = shuffled_slots(rng, c.batch, c.max_seqs);
        c.lengths.resize(static_cast<std::size_t>(c.max_seqs) * c.num_kv_heads);
        for (int& length : c.lengths)
          length = std::uniform_int_distribution<int>(1, max_length)(rng);
        c.probs = max_length > 1;
        run_and_check(c, rng, guard.stream, " lengths 1.." + std::to_string(max_length));
        c.score_form = kvc::ScoreForm::kLog2Logits;
        run_and_check(c, rng, guard.stream, " lengths 1.." + std::to_string(max_length));
        c.score_form = kvc::ScoreForm::kProbabilities;
        c.split = {0, 0, 3};  // balanced: many whole heads per share
        run_and_check(c, rng, guard.stream, " balanced, lengths 1.." + std::to_string(max_length));
      }
    }
  }

  TEST_CASE("decode attention: without LSE and score buffers") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed() + 9);
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    DecodeCase c = shaped_case(DType::kBF16, 128, 4, 4, 16, 5, 5);
    c.seq_slots = shuffled_slots(rng, c.batch, c.max_seqs);
    c.lengths = ragged_lengths(rng, c.max_seqs * c.num_kv_heads, 900);
    c.probs = false;
    PagedLayer layer(c, rng);
    kvc::DecodeParams params = layer.params();
    std::size_t bytes = 0;
    REQUIRE(kvc::decode_attention_workspace_size(params, bytes) == Status::kSuccess);
    layer.d_workspace.allocate(bytes);
    layer.d_out.poison();
    params = layer.params();
    params.lse = nullptr;
    REQUIRE(kvc::decode_attention(params, guard.stream) == Status::kSuccess);
    KVC_CUDA_REQUIRE(cudaStreamSynchronize(guard.stream));
    Expected const expected = reference_of(layer);
    std::vector<unsigned char> out_bytes(expected.out.size() * kvc::dtype_size(c.dtype));
    layer.d_out.download(out_bytes.data(), out_bytes.size());
    kvc::test::require_close(kvc::test::decode_elements(out_bytes, c.dtype), expected.out,
                             kvc::default_tolerance(c.dtype), "no lse");
  }

  TEST_CASE("decode attention: results are deterministic and the workspace is reusable") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed() + 5);
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    DecodeCase c = shaped_case(DType::kBF16, 128, 4, 4, 16, 6, 6);
    c.seq_slots = shuffled_slots(rng, c.batch, c.max_seqs);
    c.lengths = dmc_lengths(rng, c.max_seqs * c.num_kv_heads, 8192, {0.1, 0.1, 0.3, 0.3, 0.2});
    PagedLayer layer(c, rng);
    run_precompiled(layer, guard.stream);
    std::size_t const out_size =
        static_cast<std::size_t>(c.batch) * c.num_q_heads() * c.head_dim * 2;
    std::vector<unsigned char> first(out_size), second(out_size);
    layer.d_out.download(first.data(), out_size);
    layer.d_out.poison();
    kvc::DecodeParams const params = layer.params();
    REQUIRE(kvc::decode_attention(params, guard.stream) ==
            Status::kSuccess);  // same workspace, not poisoned
    KVC_CUDA_REQUIRE(cudaStreamSynchronize(guard.stream));
    layer.d_out.download(second.data(), out_size);
    CHECK(first == second);
    check_against(layer, reference_of(layer), "second run");
  }

  TEST_CASE("decode attention: CUDA graph replay follows lengths changed on the device") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed() + 6);
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    DecodeCase c = shaped_case(DType::kBF16, 128, 4, 2, 16, 4, 4);
    c.seq_slots = shuffled_slots(rng, c.batch, c.max_seqs);
    c.lengths = ragged_lengths(rng, c.max_seqs * c.num_kv_heads, 2000);
    PagedLayer layer(c, rng, /*extra_pages_per_head=*/40);
    kvc::DecodeParams params = layer.params();
    std::size_t bytes = 0;
    REQUIRE(kvc::decode_attention_workspace_size(params, bytes) == Status::kSuccess);
    layer.d_workspace.allocate(bytes);
    params = layer.params();

    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    KVC_CUDA_REQUIRE(cudaStreamBeginCapture(guard.stream, cudaStreamCaptureModeThreadLocal));
    Status const captured = kvc::decode_attention(params, guard.stream);
    KVC_CUDA_REQUIRE(cudaStreamEndCapture(guard.stream, &graph));
    REQUIRE(captured == Status::kSuccess);
    KVC_CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 2; ++replay) {
      if (replay == 1) {
        // Grow and shrink heads within their pages, as an engine's update kernel would.
        std::vector<int> lengths = layer.c.lengths;
        for (std::size_t i = 0; i < lengths.size(); ++i) {
          lengths[i] = std::uniform_int_distribution<int>(0, layer.capacity[i])(rng);
        }
        layer.upload_lengths(lengths);
      }
      layer.d_out.poison();
      layer.d_lse.poison();
      layer.d_probs.poison();
      KVC_CUDA_REQUIRE(cudaGraphLaunch(exec, guard.stream));
      KVC_CUDA_REQUIRE(cudaStreamSynchronize(guard.stream));
      check_against(layer, reference_of(layer), "graph replay " + std::to_string(replay));
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }

#if !KVC_CI_MINIMAL
  TEST_CASE("decode attention: a logits-transform variant (soft cap), header-only instantiation") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed() + 7);
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    using Instance = kvc::DecodeAttention<kvc::SoftCapVariant, __nv_bfloat16, 128, 4>;
    DecodeCase c = shaped_case(DType::kBF16, 128, 4, 2, 16, 3, 3);
    c.seq_slots = shuffled_slots(rng, c.batch, c.max_seqs);
    c.lengths = ragged_lengths(rng, c.max_seqs * c.num_kv_heads, 700);
    c.q_stddev = 4.0f;  // logits well beyond the cap: the transform matters
    c.soft_cap = 2.5f;
    PagedLayer layer(c, rng);
    kvc::DecodeParams params = layer.params();
    std::size_t bytes = 0;
    REQUIRE(Instance::workspace_size(params, bytes) == Status::kSuccess);
    layer.d_workspace.allocate(bytes);
    layer.d_workspace.poison();
    layer.d_out.poison();
    layer.d_lse.poison();
    layer.d_probs.poison();
    params = layer.params();
    REQUIRE(Instance::run(params, guard.stream) == Status::kSuccess);
    KVC_CUDA_REQUIRE(cudaStreamSynchronize(guard.stream));
    check_against(layer, reference_of(layer), "soft cap");

    params.logits_soft_cap = 0.0f;
    CHECK(Instance::run(params, guard.stream) == Status::kErrorInvalidArgument);
  }
#endif

  TEST_CASE("decode attention: unsupported combinations and invalid calls return a Status") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed() + 8);
    StreamGuard guard;
    DecodeCase c = shaped_case(DType::kBF16, 128, 4, 2, 16, 2, 2);
    c.seq_slots = {0, 1};
    c.lengths = {5, 6, 7, 8};
    PagedLayer layer(c, rng);
    kvc::DecodeParams params = layer.params();
    std::size_t bytes = 0;
    REQUIRE(kvc::decode_attention_workspace_size(params, bytes) == Status::kSuccess);
    layer.d_workspace.allocate(bytes);
    kvc::DecodeParams const valid = layer.params();

    auto expect = [&](kvc::DecodeParams const& p, Status status, char const* what) {
      std::size_t size = 0;
      Status const run = kvc::decode_attention(p, guard.stream);
      CHECK_MESSAGE(run == status, what << ": run returned " << kvc::to_string(run));
      if (status == Status::kErrorNotSupported || status == Status::kErrorInvalidShape) {
        Status const query = kvc::decode_attention_workspace_size(p, size);
        CHECK_MESSAGE(query == status, what << ": size query returned " << kvc::to_string(query));
      }
    };
    params = valid;
    params.split.waves = 5;
    expect(params, Status::kErrorInvalidArgument, "split waves 5");
    params = valid;
    params.split.min_chunk = 100;
    expect(params, Status::kErrorInvalidArgument, "split min_chunk 100");
    params = valid;
    params.split.min_chunk = -64;
    expect(params, Status::kErrorInvalidArgument, "split min_chunk -64");
    params = valid;
    params.split.schedule = 4;
    expect(params, Status::kErrorInvalidArgument, "split schedule 4");
    params = valid;
    params.cache.head_dim = 96;
    expect(params, Status::kErrorNotSupported, "head dim 96");
    params = valid;
    params.cache.head_dim = 512;
    expect(params, Status::kErrorNotSupported, "head dim 512");
    params = valid;
    params.num_q_heads = 6;  // G = 3
    expect(params, Status::kErrorNotSupported, "group 3");
    params = valid;
    params.num_q_heads = 32;  // G = 16
    expect(params, Status::kErrorNotSupported, "group 16");
    params = valid;
    params.num_q_heads = 5;
    expect(params, Status::kErrorInvalidShape, "q heads not a multiple of KV heads");
    params = valid;
    params.dtype = static_cast<DType>(7);
    expect(params, Status::kErrorNotSupported, "unknown dtype");
#if KVC_CI_MINIMAL
    params = valid;
    params.dtype = DType::kF16;
    expect(params, Status::kErrorNotSupported, "fp16 not compiled in the minimal build");
    CHECK_FALSE(kvc::decode_attention_supported(DType::kF16, 128, 4));
#endif
    CHECK_FALSE(kvc::decode_attention_supported(DType::kBF16, 96, 4));
    CHECK_FALSE(kvc::decode_attention_supported(DType::kBF16, 128, 3));
    params = valid;
    params.q = nullptr;
    expect(params, Status::kErrorInvalidArgument, "null q");
    params = valid;
    params.workspace_bytes = bytes - 1;
    expect(params, Status::kErrorSizeMismatch, "workspace too small");
    params = valid;
    params.scale = -1.0f;
    expect(params, Status::kErrorInvalidArgument, "negative scale");
    params = valid;
    params.q = static_cast<char const*>(params.q) + 2;
    expect(params, Status::kErrorInvalidArgument, "misaligned q");
    params = valid;
    params.scores.probs = layer.d_probs.get<float>();
    params.scores.stride = 0;
    expect(params, Status::kErrorInvalidArgument, "score stride 0");
    params = valid;
    params.scores.probs = layer.d_probs.get<float>();
    params.scores.stride = layer.probs_stride;
    params.scores.form = kvc::ScoreForm::kLog2Logits;
    params.scores.lse = nullptr;
    expect(params, Status::kErrorInvalidArgument, "log2-logit scores without an lse array");
    params.scores.form = static_cast<kvc::ScoreForm>(7);
    params.scores.lse = layer.d_score_lse.get<float>();
    expect(params, Status::kErrorInvalidArgument, "unknown score form");
    params = valid;
    params.batch = 0;
    expect(params, Status::kSuccess, "empty batch");
    KVC_CUDA_REQUIRE(cudaStreamSynchronize(guard.stream));
  }
}
