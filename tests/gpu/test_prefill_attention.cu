// Prefill attention (kvc_prefill_instances) against the CPU reference, element by element: every
// compiled dtype, head dim and group size with page sizes 1/16/64; ragged batches of chunks
// (1..8k tokens) over cached prefixes (0..64k slots, per KV head); the DMC mask and explicit
// prefix lengths; both score modes (H2O column sums, TOVA last row); determinism; a soft-cap
// variant through the header-only path (full builds); and the Status of invalid calls (nothing
// launched). Outputs are poisoned (NaN) before every run. The paged
// prefixes are built here directly (random pools, pages scattered through the pool), independent
// of the store's code. Long chunks are checked on a sample of their query tokens (every output
// element is still checked to be written); score modes are checked on every query.
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

#include "kvc/attention/prefill_api.cuh"
#if !KVC_CI_MINIMAL
#include "kvc/attention/prefill.cuh"  // the soft-cap case instantiates a variant here
#endif
#include "kvc/reference/attention.hpp"

#include "gpu_attention_checks.cuh"
#include "test_support.hpp"

namespace {

using kvc::DType;
using kvc::PrefillScoreMode;
using kvc::Status;

using kvc::test::compiled_dtypes;
using kvc::test::compiled_groups;
using kvc::test::compiled_head_dims;
using kvc::test::StreamGuard;

//! Raw device bytes of at least 16 (never a null pointer); an upload allocates its own.
class Bytes : public kvc::test::DeviceBytes {
 public:
  void allocate(std::size_t bytes) { DeviceBytes::allocate(std::max<std::size_t>(bytes, 16)); }
  void upload(void const* host, std::size_t bytes) {
    allocate(bytes);
    DeviceBytes::upload(host, bytes);
  }
};

//! One prefill call's shape on the host.
struct PrefillCase {
  DType dtype = DType::kBF16;
  int head_dim = 128;
  int group = 4;
  int num_kv_heads = 2;
  int page_size = 16;
  int max_seqs = 4;
  std::vector<int> seq_slots;  // [batch]; -1: no sequence (no prefix)
  std::vector<int> chunk;      // [batch] tokens per row
  std::vector<int> prefix;     // [batch * num_kv_heads] visible cached slots
  int hidden_extra = 0;        // > 0: the view holds prefix + this and prefix_lengths is passed
  bool dmc_mask = false;       // random chunk_key_visible
  bool pass_prefix_lengths = false;
  PrefillScoreMode mode = PrefillScoreMode::kNone;
  int sample_above = 1024;  // rows with more tokens are checked on a sample of queries

  int batch() const { return static_cast<int>(chunk.size()); }
  int num_q_heads() const { return group * num_kv_heads; }
  std::string name() const {
    std::string rows;
    for (int b = 0; b < batch(); ++b) rows += (b ? "," : "") + std::to_string(chunk[b]);
    return std::string(kvc::dtype_name(dtype)) + " D=" + std::to_string(head_dim) +
           " G=" + std::to_string(group) + " Hkv=" + std::to_string(num_kv_heads) +
           " page=" + std::to_string(page_size) + " chunks=" + rows + (dmc_mask ? " dmc" : "") +
           " mode=" + std::to_string(static_cast<int>(mode));
  }
};

//! A case's inputs on the host and the device.
struct PrefillLayer {
  PrefillCase c;
  int max_pages = 1;
  std::vector<float> k_pool, v_pool;  // [num_pages, page_size, D]
  std::vector<int> page_table;        // [max_seqs, Hkv, max_pages]
  std::vector<int> view_lengths;      // [max_seqs, Hkv]
  std::vector<float> q, k, v;         // [T, H, D]
  std::vector<int> cu;                // [batch + 1]
  std::vector<std::uint8_t> mask;     // [T, Hkv]
  int stride = 0;
  Bytes d_k_pool, d_v_pool, d_table, d_lengths, d_slots, d_prefix, d_q, d_k, d_v, d_cu, d_mask;
  Bytes d_out, d_lse, d_probs, d_workspace;

  PrefillLayer(PrefillCase const& test_case, std::mt19937_64& rng) : c(test_case) {
    int const d = c.head_dim;
    int const hkv = c.num_kv_heads;
    int const batch = c.batch();
    // Prefix length of each (sequence, KV head) in the view.
    view_lengths.assign(static_cast<std::size_t>(c.max_seqs) * hkv, 0);
    for (int b = 0; b < batch; ++b) {
      int const seq = c.seq_slots[b];
      if (seq < 0) continue;
      for (int h = 0; h < hkv; ++h)
        view_lengths[seq * hkv + h] = c.prefix[b * hkv + h] + c.hidden_extra;
    }
    int longest = 1;
    for (int length : view_lengths) longest = std::max(longest, length);
    max_pages = (longest + c.page_size - 1) / c.page_size;
    std::vector<int> pages_of;
    for (int length : view_lengths) pages_of.push_back((length + c.page_size - 1) / c.page_size);
    kvc::test::ScatteredPages pages =
        kvc::test::scatter_pages(rng, pages_of, static_cast<std::size_t>(c.max_seqs) * hkv,
                                 max_pages, c.page_size, d, c.dtype);
    k_pool = std::move(pages.k_pool);
    v_pool = std::move(pages.v_pool);
    page_table = std::move(pages.page_table);
    cu.assign(1, 0);
    for (int n : c.chunk) cu.push_back(cu.back() + n);
    std::size_t const tokens = static_cast<std::size_t>(cu.back());
    q = kvc::test::random_normal(rng, tokens * c.num_q_heads() * d, c.dtype);
    k = kvc::test::random_normal(rng, tokens * hkv * d, c.dtype);
    v = kvc::test::random_normal(rng, tokens * hkv * d, c.dtype);
    mask.assign(tokens * hkv, 1);
    if (c.dmc_mask) {
      std::bernoulli_distribution closes(0.6);
      for (auto& flag : mask) flag = closes(rng) ? 1 : 0;
    }
    stride = std::max(1, longest + *std::max_element(c.chunk.begin(), c.chunk.end()) + 5);

    auto upload = [&](Bytes& target, std::vector<float> const& values) {
      auto const bytes = kvc::test::encode_elements(values, c.dtype);
      target.upload(bytes.data(), bytes.size());
    };
    upload(d_k_pool, k_pool);
    upload(d_v_pool, v_pool);
    upload(d_q, q);
    upload(d_k, k);
    upload(d_v, v);
    d_table.upload(page_table.data(), page_table.size() * sizeof(int));
    d_lengths.upload(view_lengths.data(), view_lengths.size() * sizeof(int));
    d_slots.upload(c.seq_slots.data(), c.seq_slots.size() * sizeof(int));
    d_prefix.upload(c.prefix.data(), c.prefix.size() * sizeof(int));
    d_cu.upload(cu.data(), cu.size() * sizeof(int));
    d_mask.upload(mask.data(), mask.size());
    std::size_t const rows = tokens * c.num_q_heads();
    d_out.allocate(rows * d * kvc::dtype_size(c.dtype));
    d_lse.allocate(rows * sizeof(float));
    d_probs.allocate(static_cast<std::size_t>(batch) * c.num_q_heads() * stride * sizeof(float));
  }

  kvc::PrefillParams params() const {
    kvc::PrefillParams p;
    p.dtype = c.dtype;
    p.cache.k_pages = d_k_pool.get();
    p.cache.v_pages = d_v_pool.get();
    p.cache.page_table = d_table.get<std::int32_t>();
    p.cache.lengths = d_lengths.get<std::int32_t>();
    p.cache.page_size = c.page_size;
    p.cache.head_dim = c.head_dim;
    p.cache.num_kv_heads = c.num_kv_heads;
    p.cache.max_pages_per_head = max_pages;
    p.cache.max_seqs = c.max_seqs;
    p.q = d_q.get();
    p.k = d_k.get();
    p.v = d_v.get();
    p.cu_tokens = d_cu.get<std::int32_t>();
    p.seq_slots = d_slots.get<std::int32_t>();
    p.prefix_lengths = c.pass_prefix_lengths ? d_prefix.get<std::int32_t>() : nullptr;
    p.chunk_key_visible = c.dmc_mask ? d_mask.get<std::uint8_t>() : nullptr;
    p.batch = c.batch();
    p.total_tokens = cu.back();
    p.num_q_heads = c.num_q_heads();
    p.out = d_out.get();
    p.lse = d_lse.get<float>();
    if (c.mode != PrefillScoreMode::kNone) {
      p.scores.probs = d_probs.get<float>();
      p.scores.stride = stride;
      p.scores.mode = c.mode;
    }
    p.workspace = d_workspace.get();
    p.workspace_bytes = d_workspace.bytes();
    return p;
  }

  //! Prefix slots of row b, KV head h, then the chunk's keys: the reference's HeadCache.
  kvc::reference::HeadCache head_of(int b, int h) const {
    kvc::reference::HeadCache head;
    int const d = c.head_dim;
    int const seq = c.seq_slots[b];
    int const prefix = seq < 0 ? 0 : c.prefix[b * c.num_kv_heads + h];
    kvc::test::append_paged_slots(head, k_pool, v_pool, page_table,
                                  (static_cast<std::size_t>(seq) * c.num_kv_heads + h) * max_pages,
                                  c.page_size, d, prefix);
    for (int j = 0; j < c.chunk[b]; ++j) {
      std::size_t const row = (static_cast<std::size_t>(cu[b] + j) * c.num_kv_heads + h) * d;
      head.k.insert(head.k.end(), k.begin() + row, k.begin() + row + d);
      head.v.insert(head.v.end(), v.begin() + row, v.begin() + row + d);
      head.position.push_back(prefix + j);
    }
    return head;
  }
  int prefix_of(int b, int h) const {
    return c.seq_slots[b] < 0 ? 0 : c.prefix[b * c.num_kv_heads + h];
  }
};

//! Sizes the workspace, poisons outputs and workspace, runs the precompiled entry point.
void run_prefill(PrefillLayer& layer, cudaStream_t stream) {
  kvc::test::run_poisoned(layer, kvc::prefill_attention_workspace_size, kvc::prefill_attention,
                          stream);
}

//! Checks out, lse and probs of `layer` against the CPU reference.
void check_prefill(PrefillLayer const& layer, std::mt19937_64& rng, std::string const& what) {
  PrefillCase const& c = layer.c;
  int const d = c.head_dim;
  int const hq = c.num_q_heads();
  int const hkv = c.num_kv_heads;
  std::size_t const tokens = static_cast<std::size_t>(layer.cu.back());
  std::vector<unsigned char> out_bytes(tokens * hq * d * kvc::dtype_size(c.dtype));
  layer.d_out.download(out_bytes.data(), out_bytes.size());
  std::vector<float> const out = kvc::test::decode_elements(out_bytes, c.dtype);
  std::vector<float> lse(tokens * hq);
  layer.d_lse.download(lse.data(), lse.size() * sizeof(float));
  std::vector<float> probs;
  if (c.mode != PrefillScoreMode::kNone) {
    probs.resize(static_cast<std::size_t>(c.batch()) * hq * layer.stride);
    layer.d_probs.download(probs.data(), probs.size() * sizeof(float));
  }
  // Every output element is written (finite), sampled or not.
  std::size_t unwritten = 0;
  for (float value : out) unwritten += std::isfinite(value) ? 0 : 1;
  for (float value : lse) unwritten += std::isfinite(value) ? 0 : 1;
  REQUIRE_MESSAGE(unwritten == 0, what << ": " << unwritten << " outputs not written (NaN/inf)");

  kvc::reference::LayerSpec spec;
  spec.num_q_heads = hq;
  spec.num_kv_heads = hkv;
  spec.head_dim = d;
  spec.dtype = c.dtype;
  std::vector<float> got_out, want_out, got_lse, want_lse, got_probs, want_probs;
  for (int b = 0; b < c.batch(); ++b) {
    int const n = c.chunk[b];
    if (n == 0) continue;
    // Queries checked: all, or a sample (first and last 32, 192 random) of a long chunk.
    std::vector<int> queries;
    bool const sampled = n > c.sample_above && c.mode == PrefillScoreMode::kNone;
    if (!sampled) {
      queries.resize(n);
      std::iota(queries.begin(), queries.end(), 0);
    } else {
      std::uniform_int_distribution<int> pick(0, n - 1);
      for (int i = 0; i < 32; ++i) queries.push_back(i);
      for (int i = 0; i < 192; ++i) queries.push_back(pick(rng));
      for (int i = n - 32; i < n; ++i) queries.push_back(i);
      std::sort(queries.begin(), queries.end());
      queries.erase(std::unique(queries.begin(), queries.end()), queries.end());
    }
    std::vector<kvc::reference::HeadCache> heads(hkv);
    std::vector<int> prefix(hkv);
    for (int h = 0; h < hkv; ++h) {
      heads[h] = layer.head_of(b, h);
      prefix[h] = layer.prefix_of(b, h);
    }
    std::vector<float> q_rows;
    for (int i : queries) {
      auto const first = layer.q.begin() + (static_cast<std::size_t>(layer.cu[b] + i) * hq) * d;
      q_rows.insert(q_rows.end(), first, first + static_cast<std::size_t>(hq) * d);
    }
    int const row_begin = layer.cu[b];
    kvc::reference::Visibility const visible = [&](int query, int h, int slot) {
      if (slot < prefix[h]) return true;
      int const key = slot - prefix[h];
      int const token = queries[query];
      if (key == token) return true;
      return key < token && layer.mask[static_cast<std::size_t>(row_begin + key) * hkv + h] != 0;
    };
    kvc::reference::AttentionOutput output;
    kvc::reference::AttentionProbabilities probabilities;
    bool const want_probs_rows = c.mode != PrefillScoreMode::kNone;
    REQUIRE(kvc::reference::attention(
                spec, static_cast<int>(queries.size()), q_rows, heads, visible, output,
                want_probs_rows ? &probabilities : nullptr) == Status::kSuccess);
    for (std::size_t qi = 0; qi < queries.size(); ++qi) {
      std::size_t const row = static_cast<std::size_t>(row_begin + queries[qi]) * hq;
      for (int h = 0; h < hq; ++h) {
        got_lse.push_back(lse[row + h]);
        want_lse.push_back(output.lse[qi * hq + h]);
        for (int i = 0; i < d; ++i) {
          got_out.push_back(out[(row + h) * d + i]);
          want_out.push_back(output.out[(qi * hq + h) * d + i]);
        }
      }
    }
    if (!want_probs_rows) continue;
    for (int h = 0; h < hq; ++h) {
      int const slots = std::min(prefix[h / c.group] + n, layer.stride);
      for (int s = 0; s < slots; ++s) {
        double want = 0.0;
        if (c.mode == PrefillScoreMode::kColumnSum) {
          for (int i = 0; i < n; ++i)
            want += probabilities.rows[static_cast<std::size_t>(i) * hq + h][s];
        } else {
          want = probabilities.rows[static_cast<std::size_t>(n - 1) * hq + h][s];
        }
        got_probs.push_back(probs[(static_cast<std::size_t>(b) * hq + h) * layer.stride + s]);
        want_probs.push_back(static_cast<float>(want));
      }
    }
  }
  kvc::test::require_close(got_out, want_out, kvc::default_tolerance(c.dtype), what + " out");
  kvc::test::require_close(got_lse, want_lse, {5e-4, 1e-4}, what + " lse");
  if (c.mode != PrefillScoreMode::kNone)
    kvc::test::require_close(got_probs, want_probs, {2e-6, 2e-3}, what + " probs");
}

void run_and_check(PrefillCase const& c, std::mt19937_64& rng, cudaStream_t stream) {
  INFO(c.name());
  PrefillLayer layer(c, rng);
  run_prefill(layer, stream);
  check_prefill(layer, rng, c.name());
}

//! A case with `chunks` rows mapped to shuffled sequence slots and random prefixes in
//! [0, max_prefix] per (row, KV head) (row 0 without a prefix).
PrefillCase ragged_case(std::mt19937_64& rng, DType dtype, int head_dim, int group,
                        int num_kv_heads, int page_size, std::vector<int> chunks, int max_prefix) {
  PrefillCase c;
  c.dtype = dtype;
  c.head_dim = head_dim;
  c.group = group;
  c.num_kv_heads = num_kv_heads;
  c.page_size = page_size;
  c.chunk = std::move(chunks);
  c.max_seqs = c.batch() + 2;
  std::vector<int> slots(c.max_seqs);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  c.seq_slots.assign(slots.begin(), slots.begin() + c.batch());
  std::uniform_int_distribution<int> length(0, max_prefix);
  c.prefix.resize(static_cast<std::size_t>(c.batch()) * num_kv_heads);
  for (int& p : c.prefix) p = length(rng);
  for (int h = 0; h < num_kv_heads; ++h) c.prefix[h] = 0;
  return c;
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE(
      "prefill attention: every dtype, head dim, group size and page size, ragged, mask, scores") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed());
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    // Sanitizer size (KVC_STORE_TEST_STEPS set): every (dtype, head dim, group size) instance
    // once, the page size (and with it the mask and score mode) cycling over the instances so
    // that every dtype, head dim and group size meets all three; shorter chunks and prefixes.
    // Builds with fewer than 3 instances run every page size.
    bool const full = kvc::test::full_runs();
    std::size_t const instances =
        compiled_dtypes().size() * compiled_head_dims().size() * compiled_groups().size();
    bool const every_page_size = full || instances < 3;
    std::uniform_int_distribution<int> chunk(1, full ? 150 : 48);
    int const max_prefix = full ? 300 : 100;
    int instance = 0;
    for (DType dtype : compiled_dtypes()) {
      for (int head_dim : compiled_head_dims()) {
        for (int group : compiled_groups()) {
          REQUIRE(kvc::prefill_attention_supported(dtype, head_dim, group));
          int const page_sizes[] = {1, 16, 64};
          for (int p = 0; p < 3; ++p) {
            if (!every_page_size && p != instance % 3) continue;
            int const page_size = page_sizes[p];
            PrefillCase c = ragged_case(rng, dtype, head_dim, group, 2, page_size,
                                        {chunk(rng), 1, chunk(rng)}, max_prefix);
            // Page size 1: causal, no scores; 16: DMC mask + column sums (explicit prefix
            // lengths, one hidden slot); 64: DMC mask + last row.
            if (page_size == 16) {
              c.dmc_mask = true;
              c.mode = PrefillScoreMode::kColumnSum;
              c.pass_prefix_lengths = true;
              c.hidden_extra = 1;
            } else if (page_size == 64) {
              c.dmc_mask = true;
              c.mode = PrefillScoreMode::kLastRow;
            }
            run_and_check(c, rng, guard.stream);
          }
          ++instance;
        }
      }
    }
  }

  TEST_CASE("prefill attention: long chunks, long prefixes, split key ranges, inactive rows") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed() + 1);
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    DType const dtype = compiled_dtypes().front();
    int const head_dim = compiled_head_dims().front();
    int const group = compiled_groups().back();
    // Sanitizer size (KVC_STORE_TEST_STEPS set): the same shapes about 8x smaller, still long
    // enough to sample queries (> 1024 tokens) and to split key ranges (64 splits).
    bool const full = kvc::test::full_runs();
    // One 8k-token prompt without a prefix (sampled queries).
    run_and_check(ragged_case(rng, dtype, head_dim, group, 1, 16, {full ? 8192 : 1100}, 0), rng,
                  guard.stream);
    // Chunked prefill of a long prompt: short chunks after 64k cached slots (split key ranges).
    {
      PrefillCase c = ragged_case(rng, dtype, head_dim, group, 2, 16, {1, 16}, 0);
      c.prefix =
          full ? std::vector<int>{65536, 60001, 65536, 1} : std::vector<int>{8192, 7001, 8192, 1};
      run_and_check(c, rng, guard.stream);
    }
    // Ragged mix: decode-like single tokens, mid-size chunks, a 2k chunk, prefixes up to 4k, DMC
    // mask.
    {
      PrefillCase c = ragged_case(rng, dtype, head_dim, group, 2, 64,
                                  {1, 1, 300, full ? 2048 : 256, 1, 77, 5}, full ? 4096 : 512);
      c.dmc_mask = true;
      run_and_check(c, rng, guard.stream);
    }
    // An inactive row (no sequence: no prefix) and an empty chunk in the batch.
    {
      PrefillCase c = ragged_case(rng, dtype, head_dim, group, 2, 16, {40, 0, 65}, 200);
      c.seq_slots[2] = -1;
      run_and_check(c, rng, guard.stream);
    }
    // Column sums over a long prefix and a 1k chunk (every query checked).
    {
      PrefillCase c = ragged_case(rng, dtype, head_dim, group, 1, 16, {full ? 1000 : 200, 3}, 0);
      c.prefix = {0, full ? 20000 : 2500};
      c.mode = PrefillScoreMode::kColumnSum;
      c.dmc_mask = true;
      run_and_check(c, rng, guard.stream);
    }
  }

  TEST_CASE("prefill attention: deterministic results and workspace reuse") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed() + 2);
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    PrefillCase c = ragged_case(rng, compiled_dtypes().front(), compiled_head_dims().front(),
                                compiled_groups().front(), 2, 16, {3, 700, 64}, 5000);
    c.mode = PrefillScoreMode::kColumnSum;
    c.dmc_mask = true;
    PrefillLayer layer(c, rng);
    std::vector<unsigned char> first_out(layer.d_out.bytes()), second_out(layer.d_out.bytes());
    std::vector<unsigned char> first_probs(layer.d_probs.bytes()),
        second_probs(layer.d_probs.bytes());
    run_prefill(layer, guard.stream);
    layer.d_out.download(first_out.data(), first_out.size());
    layer.d_probs.download(first_probs.data(), first_probs.size());
    run_prefill(layer, guard.stream);
    layer.d_out.download(second_out.data(), second_out.size());
    layer.d_probs.download(second_probs.data(), second_probs.size());
    CHECK(first_out == second_out);
    CHECK(first_probs == second_probs);
    check_prefill(layer, rng, c.name());
  }

#if !KVC_CI_MINIMAL
  TEST_CASE(
      "prefill attention: a logits-transform variant (soft cap) through the header-only path") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed() + 4);
    INFO("seed " << kvc::test::test_seed());
    StreamGuard guard;
    PrefillCase c = ragged_case(rng, DType::kBF16, 128, 4, 1, 16, {70, 130}, 0);
    c.prefix = {0, 150};
    c.dmc_mask = true;
    c.mode = PrefillScoreMode::kLastRow;
    PrefillLayer layer(c, rng);
    float const cap = 2.5f;
    kvc::PrefillParams params = layer.params();
    params.logits_soft_cap = cap;
    std::size_t bytes = 0;
    using Instance = kvc::PrefillAttention<kvc::SoftCapVariant, __nv_bfloat16, 128, 4>;
    REQUIRE(Instance::workspace_size(params, bytes) == Status::kSuccess);
    layer.d_workspace.allocate(bytes);
    layer.d_out.poison();
    layer.d_lse.poison();
    layer.d_probs.poison();
    params = layer.params();
    params.logits_soft_cap = cap;
    kvc::PrefillParams bad = params;
    bad.logits_soft_cap = 0.0f;  // the variant's own check
    CHECK(Instance::run(bad, guard.stream) == Status::kErrorInvalidArgument);
    REQUIRE(Instance::run(params, guard.stream) == Status::kSuccess);
    KVC_CUDA_REQUIRE(cudaStreamSynchronize(guard.stream));

    // Soft-capped masked attention in double, written out here (the reference has no hook).
    int const d = c.head_dim;
    int const hq = c.num_q_heads();
    std::size_t const tokens = static_cast<std::size_t>(layer.cu.back());
    std::vector<unsigned char> out_bytes(tokens * hq * d * 2);
    layer.d_out.download(out_bytes.data(), out_bytes.size());
    std::vector<float> const out = kvc::test::decode_elements(out_bytes, c.dtype);
    std::vector<float> lse(tokens * hq);
    layer.d_lse.download(lse.data(), lse.size() * sizeof(float));
    std::vector<float> probs(static_cast<std::size_t>(c.batch()) * hq * layer.stride);
    layer.d_probs.download(probs.data(), probs.size() * sizeof(float));
    std::vector<float> got_out, want_out, got_lse, want_lse, got_probs, want_probs;
    double const scale = 1.0 / std::sqrt(static_cast<double>(d));
    for (int b = 0; b < c.batch(); ++b) {
      kvc::reference::HeadCache const head = layer.head_of(b, 0);
      int const prefix = layer.prefix_of(b, 0);
      int const n = c.chunk[b];
      for (int i = 0; i < n; ++i) {
        for (int h = 0; h < hq; ++h) {
          std::size_t const row = static_cast<std::size_t>(layer.cu[b] + i) * hq + h;
          std::vector<double> logits(head.size(), -std::numeric_limits<double>::infinity());
          double top = -std::numeric_limits<double>::infinity();
          for (int s = 0; s < head.size(); ++s) {
            int const key = s - prefix;
            bool const visible =
                s < prefix || key == i ||
                (key < i && layer.mask[static_cast<std::size_t>(layer.cu[b] + key)] != 0);
            if (!visible) continue;
            double dot = 0.0;
            for (int e = 0; e < d; ++e)
              dot += static_cast<double>(layer.q[row * d + e]) *
                     head.k[static_cast<std::size_t>(s) * d + e];
            logits[s] = cap * std::tanh(dot * scale / cap);
            top = std::max(top, logits[s]);
          }
          double sum = 0.0;
          for (double x : logits) sum += std::exp(x - top);
          double const total = top + std::log(sum);
          std::vector<double> acc(d, 0.0);
          for (int s = 0; s < head.size(); ++s) {
            double const p = std::exp(logits[s] - total);
            for (int e = 0; e < d; ++e) acc[e] += p * head.v[static_cast<std::size_t>(s) * d + e];
            if (i == n - 1) {
              got_probs.push_back(probs[(static_cast<std::size_t>(b) * hq + h) * layer.stride + s]);
              want_probs.push_back(static_cast<float>(p));
            }
          }
          for (int e = 0; e < d; ++e) {
            got_out.push_back(out[row * d + e]);
            want_out.push_back(static_cast<float>(acc[e]));
          }
          got_lse.push_back(lse[row]);
          want_lse.push_back(static_cast<float>(total));
        }
      }
    }
    kvc::test::require_close(got_out, want_out, kvc::default_tolerance(c.dtype), "soft cap out");
    kvc::test::require_close(got_lse, want_lse, {5e-4, 1e-4}, "soft cap lse");
    kvc::test::require_close(got_probs, want_probs, {2e-6, 2e-3}, "soft cap probs");
  }
#endif

  TEST_CASE("prefill attention: Status of unsupported and invalid calls, nothing launched") {
    // Fake device pointers: every check here fails before any device access.
    kvc::PrefillParams p;
    p.dtype = DType::kBF16;
    auto* const fake = reinterpret_cast<void*>(std::uintptr_t{1} << 20);
    p.cache.k_pages = fake;
    p.cache.v_pages = fake;
    p.cache.page_table = static_cast<std::int32_t*>(fake);
    p.cache.lengths = static_cast<std::int32_t*>(fake);
    p.cache.page_size = 16;
    p.cache.head_dim = 128;
    p.cache.num_kv_heads = 2;
    p.cache.max_pages_per_head = 4;
    p.cache.max_seqs = 2;
    p.q = p.k = p.v = fake;
    p.out = fake;
    p.cu_tokens = static_cast<std::int32_t const*>(fake);
    p.batch = 2;
    p.total_tokens = 10;
    p.num_q_heads = 8;
    p.workspace = fake;
    p.workspace_bytes = 1;
    cudaStream_t const stream = nullptr;

    auto with = [&](auto change) {
      kvc::PrefillParams copy = p;
      change(copy);
      return kvc::prefill_attention(copy, stream);
    };
    CHECK(with([](kvc::PrefillParams& x) { x.cache.head_dim = 96; }) == Status::kErrorNotSupported);
    CHECK(with([](kvc::PrefillParams& x) { x.num_q_heads = 7; }) == Status::kErrorInvalidShape);
    CHECK(with([](kvc::PrefillParams& x) { x.num_q_heads = 2 * 16; }) ==
          Status::kErrorNotSupported);
    CHECK(with([](kvc::PrefillParams& x) { x.cache.num_kv_heads = 0; }) ==
          Status::kErrorInvalidShape);
    CHECK(kvc::prefill_attention_supported(DType::kBF16, 128, 4));
    CHECK_FALSE(kvc::prefill_attention_supported(DType::kBF16, 96, 4));
    if (!kvc::prefill_attention_supported(DType::kBF16, 128, 4)) return;
    CHECK(with([](kvc::PrefillParams& x) { x.batch = -1; }) == Status::kErrorInvalidShape);
    CHECK(with([](kvc::PrefillParams& x) { x.total_tokens = -1; }) == Status::kErrorInvalidShape);
    CHECK(with([](kvc::PrefillParams& x) { x.scale = -1.0f; }) == Status::kErrorInvalidArgument);
    CHECK(with([](kvc::PrefillParams& x) { x.scale = std::numeric_limits<float>::infinity(); }) ==
          Status::kErrorInvalidArgument);
    CHECK(with([](kvc::PrefillParams& x) { x.scores.mode = PrefillScoreMode::kColumnSum; }) ==
          Status::kErrorInvalidArgument);  // no probs
    CHECK(with([&](kvc::PrefillParams& x) {
            x.scores.mode = PrefillScoreMode::kLastRow;
            x.scores.probs = static_cast<float*>(fake);
            x.scores.stride = 0;
          }) == Status::kErrorInvalidArgument);
    CHECK(with([](kvc::PrefillParams& x) { x.scores.mode = static_cast<PrefillScoreMode>(7); }) ==
          Status::kErrorInvalidArgument);
    CHECK(with([](kvc::PrefillParams& x) { x.q = nullptr; }) == Status::kErrorInvalidArgument);
    CHECK(with([](kvc::PrefillParams& x) { x.k = nullptr; }) == Status::kErrorInvalidArgument);
    CHECK(with([](kvc::PrefillParams& x) { x.cu_tokens = nullptr; }) ==
          Status::kErrorInvalidArgument);
    CHECK(with([](kvc::PrefillParams& x) { x.workspace = nullptr; }) ==
          Status::kErrorInvalidArgument);
    CHECK(with([](kvc::PrefillParams& x) {
            x.cache.lengths = nullptr;  // needed only without prefix_lengths
          }) == Status::kErrorInvalidArgument);
    CHECK(with([](kvc::PrefillParams& x) { x.cache.page_size = 0; }) ==
          Status::kErrorInvalidArgument);
    CHECK(with([&](kvc::PrefillParams& x) { x.v = static_cast<char*>(fake) + 2; }) ==
          Status::kErrorInvalidArgument);
    CHECK(with([&](kvc::PrefillParams& x) { x.out = static_cast<char*>(fake) + 8; }) ==
          Status::kErrorInvalidArgument);
    // Nothing to do: success without touching anything.
    CHECK(with([](kvc::PrefillParams& x) { x.batch = 0; }) == Status::kSuccess);
    CHECK(with([](kvc::PrefillParams& x) { x.total_tokens = 0; }) == Status::kSuccess);

    // With a device: a workspace below the size query is refused and nothing is written.
    if (!kvc::test::cuda_device_present()) {
      std::printf("kvc: no CUDA device: skipped\n");
      return;
    }
    std::mt19937_64 rng(kvc::test::test_seed() + 3);
    PrefillLayer layer(ragged_case(rng, DType::kBF16, 128, 4, 2, 16, {5, 9}, 20), rng);
    kvc::PrefillParams params = layer.params();
    std::size_t bytes = 0;
    REQUIRE(kvc::prefill_attention_workspace_size(params, bytes) == Status::kSuccess);
    REQUIRE(bytes > 256);
    layer.d_workspace.allocate(bytes);
    layer.d_out.poison();
    params = layer.params();
    params.workspace_bytes = bytes - 1;
    CHECK(kvc::prefill_attention(params, stream) == Status::kErrorSizeMismatch);
    KVC_CUDA_REQUIRE(cudaDeviceSynchronize());
    std::vector<unsigned char> out(layer.d_out.bytes());
    layer.d_out.download(out.data(), out.size());
    CHECK(std::all_of(out.begin(), out.end(), [](unsigned char byte) { return byte == 0xff; }));
  }
}
