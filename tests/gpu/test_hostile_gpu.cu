// Hostile inputs on the GPU (docs/reliability.md, "NaN/Inf containment on the GPU"): a NaN or an
// infinity in one batch row's q, k or v stays in that row. Every case drives a hostile store and
// a clean twin with the same inputs but the poison, through the low-level API: PagedStore
// (prepare_decode_step, update, evict, release_sequence), the precompiled decode attention
// (kvc::decode_attention, whose probabilities feed H2O/TOVA's evict as in an engine) and the
// store prefill (kvc::prepare_prefill, kvc::prefill_layer with the precompiled prefill
// attention). Outputs are poisoned (NaN bits) before every call.
//
// What is asserted, after every step:
// - the clean twin equals the CPU reference (reference::LayerCache per sequence and layer):
//   outputs and LSE within the dtype's tolerance, every slot through the page tables, positions,
//   scores, tokens seen and DMC's running state;
// - every other row of the hostile store equals the clean twin bit for bit: q_out, out, LSE,
//   H2O/TOVA probabilities, slots, positions, scores, lengths, tokens seen, DMC sums, weights,
//   ring and group lengths, at the poisoned step and at the clean steps after it. Bitwise is
//   exact here, not a tolerance: each (row, KV head) is its own block or work item in every
//   kernel, and the attention plans (decode: chunks of max(256, total / CTAs) slots; prefill:
//   split bounds from the chunk and prefix lengths) only depend on lengths, which the poison
//   does not change for other rows (nor, except through DMC's decision neuron, for the poisoned
//   row) and which are far below one chunk here;
// - the other layer of the poisoned row (the poison is in layer 1 only) equals the clean twin
//   bit for bit;
// - inside the poisoned row and layer, what docs/reliability.md defines: Full, DMC and H2O keep
//   the poison in its KV head (the other KV head's slots, scores and DMC state, and the q_out,
//   outputs, LSE and probabilities of its query heads equal the clean twin bit for bit); TOVA
//   keeps one index set per layer, so every KV head holds the same positions and no more than
//   the budget; a query is not stored, so Full's cache is untouched by a poisoned q and the next
//   step's outputs are clean again; a NaN decision neuron makes DMC append; a NaN in q or k
//   gives NaN outputs for the query heads whose logits it enters, a NaN in v NaN output elements
//   there.
// What happens otherwise to the poisoned row (not asserted: docs/reliability.md defines it only
// for the reference): the store writes the poisoned k/v into its slot (RoPE spreads a key's NaN
// or infinity to the partner element), DMC folds it into the open group's running sums, ring
// and slot until the group ends, H2O/TOVA accumulate scores from the kernel's probabilities.
// A NaN in q or k also makes those query heads' LSE and (decode) probabilities NaN, as in the
// reference: asserted (the kernels once gave LSE -inf and probabilities 0 there).
//
// And a sequence released between steps while the others continue, its slot and pages taken by
// a new sequence: the others equal the reference and a twin in which nothing was released, bit
// for bit; the newcomer equals the reference and holds only pages of the released sequence.
//
// Shapes: head dim 128, group size 4 (compiled in every build), 2 KV heads, 2 layers, page
// size 4; fp32/fp16/bf16 (bf16 only in KVC_CI_MINIMAL builds). With KVC_STORE_TEST_STEPS set
// (sanitizer runs, test::full_runs()) each policy keeps one or two poisons (q, k, v, the
// decision neuron, NaN and +inf each still covered) and decode cases run 5 steps instead of
// 10, prefill cases 1 decode step instead of 3.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/attention/decode_api.cuh"
#include "kvc/cache/prefill.cuh"
#include "kvc/reference/layer_cache.hpp"

#include "support_store.cuh"

using namespace kvc;

namespace {

#if KVC_CI_MINIMAL
#define KVC_HOSTILE_DTYPES __nv_bfloat16
#else
#define KVC_HOSTILE_DTYPES float, half, __nv_bfloat16
#endif

constexpr int kLayers = 2;
constexpr int kKvHeads = 2;
constexpr int kGroup = 4;      // in every build's compiled set (KVC_CI_MINIMAL: G = 4, D = 128)
constexpr int kHeadDim = 128;  // DMC's decision neuron is D - 1
constexpr int kQHeads = kKvHeads * kGroup;
constexpr int kPageSize = 4;  // heads take a new page every 4 tokens
constexpr std::size_t kQRow = static_cast<std::size_t>(kQHeads) * kHeadDim;
constexpr std::size_t kKvRow = static_cast<std::size_t>(kKvHeads) * kHeadDim;

// Where the poison goes: layer 1 of the bad row, KV head 1 (k, v) or query head 5 (q, a query
// head of KV head 1), element 3 (not the decision neuron), as in the host test.
constexpr int kBadLayer = 1;
constexpr int kBadKvHead = 1;
constexpr int kBadQHead = kBadKvHead * kGroup + 1;
constexpr int kBadElement = 3;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

//! What is poisoned: an element of q, k or v, or DMC's decision neuron of k.
enum class Poison { kQ, kK, kV, kDecision };

char const* poison_name(Poison poison) {
  switch (poison) {
    case Poison::kQ: return "q";
    case Poison::kK: return "k";
    case Poison::kV: return "v";
    case Poison::kDecision: return "k decision neuron";
  }
  return "?";
}

//! The poisons of a policy: q, k and v with NaN, +inf and -inf, and for DMC a NaN decision
//! neuron. At sanitizer size (test::full_runs() false) one or two per policy, every kind of
//! poison and both values still covered: Full q = NaN (the query is not stored), DMC v = NaN
//! and a NaN decision neuron, H2O k = NaN, TOVA k = +inf.
std::vector<std::pair<Poison, float>> poisons_of(PolicyKind kind) {
  std::vector<std::pair<Poison, float>> out;
  if (test::full_runs()) {
    for (Poison poison : {Poison::kQ, Poison::kK, Poison::kV}) {
      for (float value : {kNaN, kInf, -kInf}) out.emplace_back(poison, value);
    }
    if (kind == PolicyKind::kDmc) out.emplace_back(Poison::kDecision, kNaN);
    return out;
  }
  switch (kind) {
    case PolicyKind::kFull: out = {{Poison::kQ, kNaN}}; break;
    case PolicyKind::kDmc: out = {{Poison::kV, kNaN}, {Poison::kDecision, kNaN}}; break;
    case PolicyKind::kH2O: out = {{Poison::kK, kNaN}}; break;
    case PolicyKind::kTova: out = {{Poison::kK, kInf}}; break;
  }
  return out;
}

//! The policy of every case: DMC in checkpoint mode with offset 0 (random normal decision
//! neurons merge about half of the tokens), H2O heavy 2 + recent 1, TOVA budget 3 (evictions
//! from the fourth token on).
PolicyConfig hostile_policy(PolicyKind kind) {
  PolicyConfig policy;
  policy.kind = kind;
  policy.dmc.offset = 0.0f;
  policy.h2o = H2OConfig{2, 1};
  policy.tova = TovaConfig{3, false};
  return policy;
}

//! A store for `max_seqs` sequences of up to `max_tokens` tokens (H2O/TOVA: budget + 1 slots);
//! `num_pages` 0: room for every head at its longest.
PagedStoreConfig hostile_config(PolicyKind kind, DType dtype, int max_seqs, int max_tokens,
                                int num_pages = 0) {
  PagedStoreConfig config;
  config.shape = ModelShape{kLayers, kQHeads, kKvHeads, kHeadDim};
  config.dtype = dtype;
  config.page_size = kPageSize;
  config.max_seqs = max_seqs;
  config.policy = hostile_policy(kind);
  int const longest = config.has_scores() ? config.eviction_budget() + 1 : max_tokens;
  config.max_pages_per_head = (longest + kPageSize - 1) / kPageSize;
  config.num_pages =
      num_pages > 0 ? num_pages : max_seqs * kLayers * kKvHeads * config.max_pages_per_head;
  return config;
}

//! Pre-RoPE inputs of `rows` tokens for every layer: q [rows, Hq, D], k and v [rows, Hkv, D],
//! representable in the dtype.
struct Inputs {
  std::vector<std::vector<float>> q, k, v;  // [layer]
};

Inputs draw_inputs(std::mt19937_64& rng, DType dtype, std::size_t rows) {
  Inputs in;
  for (int l = 0; l < kLayers; ++l) {
    in.q.push_back(test::random_normal(rng, rows * kQRow, dtype));
    in.k.push_back(test::random_normal(rng, rows * kKvRow, dtype));
    in.v.push_back(test::random_normal(rng, rows * kKvRow, dtype));
  }
  return in;
}

//! Writes `value` into token `token` (packed row) of layer kBadLayer where `poison` says.
void inject(Inputs& in, std::size_t token, Poison poison, float value) {
  std::size_t const l = static_cast<std::size_t>(kBadLayer);
  std::size_t const kv = token * kKvRow + static_cast<std::size_t>(kBadKvHead) * kHeadDim;
  switch (poison) {
    case Poison::kQ:
      in.q[l][token * kQRow + static_cast<std::size_t>(kBadQHead) * kHeadDim + kBadElement] = value;
      break;
    case Poison::kK: in.k[l][kv + kBadElement] = value; break;
    case Poison::kV: in.v[l][kv + kBadElement] = value; break;
    case Poison::kDecision: in.k[l][kv + kHeadDim - 1] = value; break;
  }
}

//! Rows [first, first + count) of `width` elements of `all`.
std::vector<float> rows_of(std::vector<float> const& all, std::size_t first, std::size_t count,
                           std::size_t width) {
  return std::vector<float>(all.begin() + static_cast<std::ptrdiff_t>(first * width),
                            all.begin() + static_cast<std::ptrdiff_t>((first + count) * width));
}

//! Of rows [first, first + count) of `width` elements, the columns that belong to KV head
//! `kv_head` when each row holds kKvHeads equal parts (the G query heads of each KV head).
std::vector<float> kv_head_part(std::vector<float> const& all, std::size_t first, std::size_t count,
                                std::size_t width, int kv_head) {
  std::size_t const part = width / kKvHeads;
  std::vector<float> out;
  for (std::size_t r = first; r < first + count; ++r) {
    auto const begin = all.begin() + static_cast<std::ptrdiff_t>(r * width + kv_head * part);
    out.insert(out.end(), begin, begin + static_cast<std::ptrdiff_t>(part));
  }
  return out;
}

//! What a step wrote, per layer, as floats. Decode: q_out, out [rows, Hq, D], lse [rows, Hq],
//! probs [rows, Hq, stride] (H2O/TOVA). Prefill: out and lse of the packed tokens.
struct StepResult {
  std::vector<std::vector<float>> q_out, out, lse, probs;  // [layer]
};

//! One store and the buffers of its steps, on the store's stream; or (the second constructor)
//! another rig's store driven from a stream of its own, with its own StepContext.
template <class T>
struct Rig {
  std::unique_ptr<test::StoreFixture> fixture;  // null when the store is another rig's
  test::Stream own_stream;                      // the stream of a rig on another rig's store
  PagedStore& store;
  cudaStream_t stream;
  StepContext const* context = nullptr;  // this rig's steps' report (null: the store's own)
  int stride;                            // probability row stride (H2O/TOVA: budget + 1)
  test::DeviceBuffer<T> q, k, v, q_out, out;
  test::DeviceBuffer<float> lse, probs;
  test::DeviceBuffer<std::int32_t> slots, cu;
  test::DeviceBuffer<unsigned char> workspace;

  Rig(PagedStoreConfig const& config, std::size_t max_tokens)
      : fixture(std::make_unique<test::StoreFixture>(config)),
        store(fixture->store),
        stream(fixture->stream.get()),
        stride(config.has_scores() ? config.eviction_budget() + 1 : 1),
        q(max_tokens * kQRow),
        k(max_tokens * kKvRow),
        v(max_tokens * kKvRow),
        q_out(max_tokens * kQRow),
        out(max_tokens * kQRow),
        lse(max_tokens * kQHeads),
        probs(max_tokens * kQHeads * static_cast<std::size_t>(stride)),
        slots(static_cast<std::size_t>(config.max_seqs)),
        cu(static_cast<std::size_t>(config.max_seqs) + 1) {}

  Rig(Rig& owner, std::size_t max_tokens, StepContext const* step_context)
      : store(owner.store),
        stream(own_stream.get()),
        context(step_context),
        stride(owner.stride),
        q(max_tokens * kQRow),
        k(max_tokens * kKvRow),
        v(max_tokens * kKvRow),
        q_out(max_tokens * kQRow),
        out(max_tokens * kQRow),
        lse(max_tokens * kQHeads),
        probs(max_tokens * kQHeads * static_cast<std::size_t>(stride)),
        slots(static_cast<std::size_t>(store.config().max_seqs)),
        cu(static_cast<std::size_t>(store.config().max_seqs) + 1) {}

  int add() {
    int slot = -1;
    KVC_STATUS_REQUIRE(store.add_sequence(slot, stream));
    return slot;
  }
  void upload(Inputs const& in, int layer) {
    std::size_t const l = static_cast<std::size_t>(layer);
    q.upload(test::to_storage<T>(in.q[l]), stream);
    k.upload(test::to_storage<T>(in.k[l]), stream);
    v.upload(test::to_storage<T>(in.v[l]), stream);
  }
  void reserve_workspace(std::size_t bytes) {
    if (workspace.size() < bytes) workspace.resize(bytes);
    workspace.poison(stream);
  }

  //! A decode step of the sequences `batch` (row r: slot batch[r]) with `in`: prepare, then per
  //! layer update, decode_attention (probabilities for H2O/TOVA) and evict.
  StepResult decode(std::vector<std::int32_t> const& batch, Inputs const& in) {
    begin_decode(batch);
    return decode_layers(batch, in);
  }
  //! The step's prepare (enqueued, nothing waited for).
  void begin_decode(std::vector<std::int32_t> const& batch) {
    slots.upload(batch, stream);
    KVC_STATUS_REQUIRE(
        store.prepare_decode_step(slots.data(), static_cast<int>(batch.size()), stream, context));
  }
  //! The step's layers after begin_decode.
  StepResult decode_layers(std::vector<std::int32_t> const& batch, Inputs const& in) {
    int const rows = static_cast<int>(batch.size());
    std::size_t const n = batch.size();
    bool const scores = store.config().has_scores();
    StepResult result;
    for (int l = 0; l < kLayers; ++l) {
      upload(in, l);
      q_out.poison(stream);
      out.poison(stream);
      lse.poison(stream);
      probs.poison(stream);
      KVC_STATUS_REQUIRE(store.update<T>(l, q.data(), k.data(), v.data(), slots.data(), rows,
                                         q_out.data(), stream, context));
      PagedLayerView<T> view;
      KVC_STATUS_REQUIRE(store.layer_view<T>(l, view));
      DecodeParams params = make_decode_params<T>(view, q_out.data(), slots.data(), rows, kQHeads,
                                                  out.data(), lse.data());
      if (scores) params.scores = ScoreHook{probs.data(), stride};
      std::size_t bytes = 0;
      KVC_STATUS_REQUIRE(decode_attention_workspace_size(params, bytes));
      reserve_workspace(bytes);
      params.workspace = workspace.data();
      params.workspace_bytes = bytes;
      KVC_STATUS_REQUIRE(decode_attention(params, stream));
      KVC_STATUS_REQUIRE(store.evict(l, params.scores, slots.data(), rows, stream, context));
      result.q_out.push_back(test::to_floats(q_out.download(stream, n * kQRow)));
      result.out.push_back(test::to_floats(out.download(stream, n * kQRow)));
      result.lse.push_back(lse.download(stream, n * kQHeads));
      if (scores) {
        result.probs.push_back(
            probs.download(stream, n * kQHeads * static_cast<std::size_t>(stride)));
      }
    }
    return result;
  }

  //! A prefill step: row r is a chunk of chunks[r] tokens of slot batch[r], packed in `in`.
  StepResult prefill(std::vector<std::int32_t> const& batch, std::vector<int> const& chunks,
                     Inputs const& in) {
    std::vector<std::int32_t> offsets{0};
    for (int c : chunks) offsets.push_back(offsets.back() + c);
    int const total = offsets.back();
    slots.upload(batch, stream);
    cu.upload(offsets, stream);
    PrefillBatch const step{slots.data(), cu.data(), static_cast<int>(batch.size()), total,
                            *std::max_element(chunks.begin(), chunks.end())};
    std::size_t bytes = 0;
    KVC_STATUS_REQUIRE(prefill_workspace_size<T>(store, step, bytes));
    KVC_STATUS_REQUIRE(prepare_prefill(store, step, stream, -1, context));
    StepResult result;
    std::size_t const n = static_cast<std::size_t>(total);
    for (int l = 0; l < kLayers; ++l) {
      upload(in, l);
      out.poison(stream);
      lse.poison(stream);
      reserve_workspace(bytes);
      KVC_STATUS_REQUIRE(prefill_layer<T>(store, l, q.data(), k.data(), v.data(), step, out.data(),
                                          lse.data(), workspace.data(), bytes, stream, context));
      result.out.push_back(test::to_floats(out.download(stream, n * kQRow)));
      result.lse.push_back(lse.download(stream, n * kQHeads));
    }
    return result;
  }
};

//! One store stepped from two streams, and a twin store stepped from one: rig `a` drives the
//! store on its own stream and context, rig `b` the same store from another stream with its own
//! StepContext, `twin` another store with the same config. Slots 0..3 are joined in both
//! stores; everything is ready (synchronised) when the constructor returns.
template <class T>
struct TwoStreams {
  Rig<T> a;
  test::DeviceBuffer<unsigned char> context_memory;
  StepContext context_b;
  Rig<T> b;
  Rig<T> twin;

  TwoStreams(PagedStoreConfig const& config, std::size_t max_tokens)
      : a(config, max_tokens),
        context_memory(PagedStore::step_context_bytes(config)),
        context_b(make_context(a, context_memory)),
        b(a, max_tokens, &context_b),
        twin(config, max_tokens) {
    for (int s = 0; s < 4; ++s) {
      REQUIRE(a.add() == s);
      REQUIRE(twin.add() == s);
    }
    KVC_CUDA_REQUIRE(cudaStreamSynchronize(a.stream));
  }

  static StepContext make_context(Rig<T>& owner, test::DeviceBuffer<unsigned char>& memory) {
    StepContext context;
    KVC_STATUS_REQUIRE(
        owner.store.init_step_context(memory.data(), memory.size(), context, owner.stream));
    return context;
  }
};

//! Keeps the GPU busy for about `cycles` clock cycles on its stream (holds a step open while
//! another stream works).
KVC_GLOBAL void spin_kernel(long long cycles) {
  long long const start = clock64();
  while (clock64() - start < cycles) {
  }
}

//! Bit-for-bit equality of KV head `kv_head` of (layer, slot) in two stores: slots, positions,
//! scores and, for DMC, the running sums, weight, ring and group length.
template <class T>
void require_same_head(test::StoreSnapshot<T> const& got, test::StoreSnapshot<T> const& want,
                       int layer, int slot, int kv_head, std::string const& what) {
  std::string const where = what + " kv head " + std::to_string(kv_head);
  reference::HeadCache const a = got.head(layer, slot, kv_head);
  reference::HeadCache const b = want.head(layer, slot, kv_head);
  REQUIRE_MESSAGE(a.position == b.position, where << ": positions differ");
  test::require_same_bits(a.k, b.k, where + " keys");
  test::require_same_bits(a.v, b.v, where + " values");
  test::require_same_bits(a.score, b.score, where + " scores");
  if (!got.config.has_dmc_state()) return;
  std::size_t const head = static_cast<std::size_t>(got.head_index(layer, slot, kv_head));
  std::size_t const d = static_cast<std::size_t>(kHeadDim);
  std::size_t const window = static_cast<std::size_t>(got.dims.dmc_window);
  test::require_same_bits(rows_of(got.k_sum, head, 1, d), rows_of(want.k_sum, head, 1, d),
                          where + " k_sum");
  test::require_same_bits(rows_of(got.v_sum, head, 1, d), rows_of(want.v_sum, head, 1, d),
                          where + " v_sum");
  test::require_same_bits(std::vector<float>{got.weight_sum[head]},
                          std::vector<float>{want.weight_sum[head]}, where + " weight_sum");
  REQUIRE_MESSAGE(got.group_length[head] == want.group_length[head], where << ": group length");
  test::require_same_bits(rows_of(got.ring_k, head, 1, window * d),
                          rows_of(want.ring_k, head, 1, window * d), where + " ring_k");
  test::require_same_bits(rows_of(got.ring_v, head, 1, window * d),
                          rows_of(want.ring_v, head, 1, window * d), where + " ring_v");
  test::require_same_bits(rows_of(got.ring_w, head, 1, window),
                          rows_of(want.ring_w, head, 1, window), where + " ring_w");
}

//! Tokens seen of (layer, slot) in two stores.
template <class T>
void require_same_tokens_seen(test::StoreSnapshot<T> const& got, test::StoreSnapshot<T> const& want,
                              int layer, int slot, std::string const& what) {
  std::size_t const index = static_cast<std::size_t>(got.dims.layer_seq(layer, slot));
  REQUIRE_MESSAGE(got.tokens_seen[index] == want.tokens_seen[index], what << ": tokens seen");
}

//! Compares the outputs of `count` tokens (rows) from `first` of two steps' results in layer
//! `layer`: every query head, or only those of KV head `kv_head` (>= 0).
void require_same_outputs(StepResult const& got, StepResult const& want, int layer,
                          std::size_t first, std::size_t count, int kv_head, int stride,
                          std::string const& what) {
  std::size_t const l = static_cast<std::size_t>(layer);
  auto same = [&](std::vector<std::vector<float>> const& a,
                  std::vector<std::vector<float>> const& b, std::size_t width, char const* name) {
    if (a.empty()) return;
    if (kv_head < 0) {
      test::require_same_bits(rows_of(a[l], first, count, width),
                              rows_of(b[l], first, count, width), what + " " + name);
    } else {
      test::require_same_bits(kv_head_part(a[l], first, count, width, kv_head),
                              kv_head_part(b[l], first, count, width, kv_head),
                              what + " " + name + " (kv head " + std::to_string(kv_head) + ")");
    }
  };
  same(got.q_out, want.q_out, kQRow, "q_out");
  same(got.out, want.out, kQRow, "out");
  same(got.lse, want.lse, kQHeads, "lse");
  same(got.probs, want.probs, static_cast<std::size_t>(kQHeads) * stride, "probs");
}

//! The reference of one sequence: a LayerCache per layer.
std::vector<reference::LayerCache> make_reference(PagedStoreConfig const& config) {
  std::vector<reference::LayerCache> layers(kLayers);
  for (reference::LayerCache& layer : layers) {
    KVC_STATUS_REQUIRE(
        reference::LayerCache::create(test::layer_spec(config), config.policy, layer));
  }
  return layers;
}

//! Feeds tokens [first, first + count) of `in` (layer `layer`) to `cache` (a decode step when
//! `decode`, else a prefill chunk) and compares out and LSE of `result` with it.
void check_reference(reference::LayerCache& cache, Inputs const& in, StepResult const& result,
                     int layer, std::size_t first, int count, bool decode, DType dtype,
                     std::string const& what) {
  std::size_t const l = static_cast<std::size_t>(layer);
  std::size_t const n = static_cast<std::size_t>(count);
  reference::ConstSpan const q(in.q[l].data() + first * kQRow, n * kQRow);
  reference::ConstSpan const k(in.k[l].data() + first * kKvRow, n * kKvRow);
  reference::ConstSpan const v(in.v[l].data() + first * kKvRow, n * kKvRow);
  reference::AttentionOutput want;
  if (decode) {
    KVC_STATUS_REQUIRE(cache.decode_step(reference::DecodeInput{q, k, v}, want));
  } else {
    KVC_STATUS_REQUIRE(cache.prefill(reference::PrefillInput{count, q, k, v}, want));
  }
  test::require_close(rows_of(result.out[l], first, n, kQRow), want.out, default_tolerance(dtype),
                      what + " out");
  test::require_close(rows_of(result.lse[l], first, n, kQHeads), want.lse, {5e-4, 1e-4},
                      what + " lse");
}

//! A hostile store, its clean twin and the reference of the clean twin's sequences, driven
//! through the same steps. Row `bad` of the batch is the one that gets poisoned.
template <class T>
struct Twins {
  PagedStoreConfig config;
  Rig<T> clean, hostile;
  std::vector<std::int32_t> batch;                       // row -> slot
  std::vector<std::vector<reference::LayerCache>> refs;  // row -> layers
  std::size_t bad = 0;
  Poison poison = Poison::kQ;
  float value = kNaN;
  bool dirty = false;  // the bad row's layer kBadLayer has seen the poison

  Twins(PagedStoreConfig const& c, std::size_t max_tokens, std::vector<std::int32_t> rows,
        std::size_t bad_row, Poison p, float v)
      : config(c),
        clean(c, max_tokens),
        hostile(c, max_tokens),
        batch(std::move(rows)),
        bad(bad_row),
        poison(p),
        value(v) {
    for (int s = 0; s < config.max_seqs; ++s) {
      REQUIRE(clean.add() == s);
      REQUIRE(hostile.add() == s);
    }
    for (std::size_t r = 0; r < batch.size(); ++r) refs.push_back(make_reference(config));
  }

  std::string where(std::string const& what, std::size_t row, int layer) const {
    return what + " row " + std::to_string(row) + " (slot " + std::to_string(batch[row]) +
           ") layer " + std::to_string(layer);
  }

  //! A decode step; the bad row's token is poisoned when `poisoned`.
  void decode(std::mt19937_64& rng, bool poisoned, std::string const& what) {
    Inputs const in = draw_inputs(rng, config.dtype, batch.size());
    Inputs bad_in = in;
    if (poisoned) inject(bad_in, bad, poison, value);
    StepResult const want = clean.decode(batch, in);
    StepResult const got = hostile.decode(batch, bad_in);
    std::vector<int> ones(batch.size(), 1);
    compare(in, want, got, ones, poisoned, bad, true, what);
  }

  //! A prefill step of `chunks` (row r: chunks[r] tokens appended to its sequence); token
  //! `token` of the bad row's chunk is poisoned when `poisoned`.
  void prefill(std::mt19937_64& rng, std::vector<int> const& chunks, bool poisoned, int token,
               std::string const& what) {
    std::size_t total = 0;
    for (int c : chunks) total += static_cast<std::size_t>(c);
    Inputs const in = draw_inputs(rng, config.dtype, total);
    Inputs bad_in = in;
    std::size_t bad_token = static_cast<std::size_t>(token);
    for (std::size_t r = 0; r < bad; ++r) bad_token += static_cast<std::size_t>(chunks[r]);
    if (poisoned) inject(bad_in, bad_token, poison, value);
    StepResult const want = clean.prefill(batch, chunks, in);
    StepResult const got = hostile.prefill(batch, chunks, bad_in);
    compare(in, want, got, chunks, poisoned, bad_token, false, what);
  }

  //! Everything asserted after a step (see the file comment). `bad_token`: the packed token
  //! that was poisoned, if `poisoned`.
  void compare(Inputs const& in, StepResult const& want, StepResult const& got,
               std::vector<int> const& chunks, bool poisoned, std::size_t bad_token, bool decode,
               std::string const& what) {
    test::StoreSnapshot<T> const sc = test::snapshot_after_success<T>(clean.store, clean.stream);
    test::StoreSnapshot<T> const sh =
        test::snapshot_after_success<T>(hostile.store, hostile.stream);
    bool const first_dirty_step = poisoned && !dirty;
    dirty = dirty || poisoned;
    std::size_t first = 0;
    for (std::size_t r = 0; r < batch.size(); ++r) {
      int const slot = batch[r];
      std::size_t const count = static_cast<std::size_t>(chunks[r]);
      for (int l = 0; l < kLayers; ++l) {
        std::string const at = where(what, r, l);
        // The clean twin against the reference.
        reference::LayerCache& ref = refs[r][static_cast<std::size_t>(l)];
        check_reference(ref, in, want, l, first, chunks[r], decode, config.dtype, at + " clean");
        if (decode) {
          test::compare_cached_heads(sc, l, slot, ref, at + " clean");
          if (auto const* dmc = std::get_if<reference::DmcLayerState>(&ref.state())) {
            test::compare_dmc_state(sc, l, slot, dmc->dmc, {1e-6, 1e-6}, at + " clean");
          }
        } else {
          test::compare_layer(sc, l, slot, ref, at + " clean");
        }

        require_same_tokens_seen(sh, sc, l, slot, at);
        bool const affected = dirty && r == bad && l == kBadLayer;
        if (!affected) {
          // Another row, or another layer of the poisoned row: bit for bit the clean twin's.
          require_same_outputs(got, want, l, first, count, -1, clean.stride, at);
          for (int h = 0; h < kKvHeads; ++h) require_same_head(sh, sc, l, slot, h, at);
          continue;
        }
        check_poisoned(sc, sh, got, want, in, l, slot, first, count, bad_token, first_dirty_step,
                       decode, at + " poisoned");
      }
      first += count;
    }
  }

  //! The poisoned (row, layer): what docs/reliability.md defines.
  void check_poisoned(test::StoreSnapshot<T> const& sc, test::StoreSnapshot<T> const& sh,
                      StepResult const& got, StepResult const& want, Inputs const& in, int layer,
                      int slot, std::size_t first, std::size_t count, std::size_t bad_token,
                      bool first_dirty_step, bool decode, std::string const& at) {
    PolicyKind const kind = config.policy.kind;
    int const other = 1 - kBadKvHead;
    if (kind == PolicyKind::kTova) {
      // One index set per layer: the victims may change, the layer stays consistent.
      reference::HeadCache const head0 = sh.head(layer, slot, 0);
      REQUIRE(head0.size() <= config.policy.tova.budget);
      for (int h = 1; h < kKvHeads; ++h) {
        REQUIRE_MESSAGE(sh.head(layer, slot, h).position == head0.position,
                        at << ": TOVA kv heads hold different positions");
      }
    } else {
      // The other KV head and its query heads are untouched.
      require_same_head(sh, sc, layer, slot, other, at);
      require_same_outputs(got, want, layer, first, count, other, clean.stride, at);
      if (kind == PolicyKind::kH2O) {
        REQUIRE(sh.head(layer, slot, kBadKvHead).size() <= config.policy.h2o.budget());
      }
    }
    if (kind == PolicyKind::kFull && poison == Poison::kQ) {
      // A query is not stored: Full's cache is the clean one, and so is the next step.
      for (int h = 0; h < kKvHeads; ++h) require_same_head(sh, sc, layer, slot, h, at);
      if (!first_dirty_step) {
        require_same_outputs(got, want, layer, first, count, -1, clean.stride, at);
      }
    }
    if (poison == Poison::kDecision && first_dirty_step) {
      // A NaN decision neuron appends: one slot more than the clean twin where it merged.
      float const clean_decision =
          in.k[static_cast<std::size_t>(layer)]
              [bad_token * kKvRow + static_cast<std::size_t>(kBadKvHead) * kHeadDim + kHeadDim - 1];
      int const extra = clean_decision - config.policy.dmc.offset > 0.0f ? 1 : 0;
      REQUIRE(sh.head(layer, slot, kBadKvHead).size() ==
              sc.head(layer, slot, kBadKvHead).size() + extra);
    }
    if (first_dirty_step && value != value && poison != Poison::kDecision) {
      // A NaN propagates into the outputs of the query heads whose logits (q, k) or values (v)
      // it enters: the poisoned query head, or every query head of the poisoned KV head, from
      // the poisoned token on (later chunk tokens attend to a poisoned key or value).
      std::size_t const l = static_cast<std::size_t>(layer);
      std::size_t const last = decode ? bad_token + 1 : first + count;
      std::size_t const end = poison == Poison::kQ ? bad_token + 1 : last;
      for (std::size_t t = bad_token; t < end; ++t) {
        for (int g = 0; g < kGroup; ++g) {
          int const q_head = kBadKvHead * kGroup + g;
          if (poison == Poison::kQ && q_head != kBadQHead) continue;
          std::size_t const row = (t * kQHeads + static_cast<std::size_t>(q_head)) * kHeadDim;
          std::string const which =
              at + " token " + std::to_string(t) + " query head " + std::to_string(q_head);
          if (poison == Poison::kV) {
            CHECK_MESSAGE(std::isnan(got.out[l][row + kBadElement]), which << ": not NaN");
          } else {
            int finite = 0;
            for (int i = 0; i < kHeadDim; ++i) {
              finite += std::isfinite(got.out[l][row + static_cast<std::size_t>(i)]) ? 1 : 0;
            }
            CHECK_MESSAGE(finite == 0, which << ": " << finite << " finite output elements");
            // A NaN logit makes the softmax denominator NaN: LSE and probabilities are NaN,
            // as in the reference (not -inf and 0, which would read as "saw no slot").
            std::size_t const head_row = t * kQHeads + static_cast<std::size_t>(q_head);
            CHECK_MESSAGE(std::isnan(got.lse[l][head_row]), which << ": LSE " << got.lse[l][head_row]);
            if (decode && !got.probs.empty()) {
              float const p = got.probs[l][head_row * static_cast<std::size_t>(clean.stride)];
              CHECK_MESSAGE(std::isnan(p), which << ": probability of slot 0 " << p);
            }
          }
        }
      }
    }
  }
};

//! Runs one poison of one policy through `Twins`: decode steps, the poisoned one, decode steps.
template <class T>
void decode_case(PolicyKind kind, Poison poison, float value, std::mt19937_64& rng) {
  bool const full = test::full_runs();
  int const before = full ? 6 : 3;  // the H2O/TOVA budget is 3: the poisoned step evicts
  int const after = full ? 3 : 1;
  int const steps = before + 1 + after;
  PagedStoreConfig const config = hostile_config(kind, DTypeTraits<T>::kDType, 4, steps);
  // Rows name slots in another order; row 2 (slot 3) is poisoned.
  Twins<T> twins(config, 4, {2, 0, 3, 1}, 2, poison, value);
  for (int step = 0; step < steps; ++step) {
    twins.decode(rng, step == before, "decode step " + std::to_string(step));
  }
}

//! A clean prefill round, a prefill round whose bad row's chunk is poisoned at its token 4
//! (appended to the cached prompt), then clean decode steps.
template <class T>
void prefill_case(PolicyKind kind, Poison poison, float value, std::mt19937_64& rng) {
  int const decode_steps = test::full_runs() ? 3 : 1;
  std::vector<int> const first = {9, 5, 7};
  std::vector<int> const second = {6, 11, 3};
  PagedStoreConfig const config =
      hostile_config(kind, DTypeTraits<T>::kDType, 3, 5 + 11 + decode_steps);
  // Rows name slots 1, 2, 0; row 1 (slot 2, 5 + 11 tokens) is poisoned.
  Twins<T> twins(config, 9 + 5 + 7, {1, 2, 0}, 1, poison, value);
  twins.prefill(rng, first, false, 0, "prefill round 0");
  twins.prefill(rng, second, true, 4, "prefill round 1");
  for (int step = 0; step < decode_steps; ++step) {
    twins.decode(rng, false, "decode step " + std::to_string(step));
  }
}

//! True when this build has the attention kernels of the test's shape for T (else a message).
template <class T>
bool kernels_present() {
  DType const dtype = DTypeTraits<T>::kDType;
  if (decode_attention_supported(dtype, kHeadDim, kGroup) &&
      prefill_attention_supported(dtype, kHeadDim, kGroup)) {
    return true;
  }
  MESSAGE("no attention instance for " << std::string(dtype_name(dtype)) << ", D " << kHeadDim << ", G "
                                       << kGroup << ": skipped");
  return false;
}

std::vector<PolicyKind> const kPolicies = {PolicyKind::kFull, PolicyKind::kDmc, PolicyKind::kH2O,
                                           PolicyKind::kTova};

//! Runs `run` for every policy and each of its poisons, on a generator seeded test_seed() + salt.
void every_poison(std::uint64_t salt, void (*run)(PolicyKind, Poison, float, std::mt19937_64&)) {
  std::mt19937_64 rng(test::test_seed() + salt);
  INFO("seed " << test::test_seed());
  for (PolicyKind kind : kPolicies) {
    for (std::pair<Poison, float> const& poison : poisons_of(kind)) {
      INFO("policy " << std::string(policy_name(kind)) << ", " << std::string(poison_name(poison.first)) << " = "
                     << poison.second);
      run(kind, poison.first, poison.second, rng);
    }
  }
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE_TEMPLATE("hostile gpu: a NaN or an infinity in one row of a decode step stays there", T,
                     KVC_HOSTILE_DTYPES) {
    KVC_REQUIRE_CUDA_DEVICE();
    if (kernels_present<T>()) every_poison(40, decode_case<T>);
  }

  TEST_CASE_TEMPLATE(
      "hostile gpu: a NaN or an infinity in one chunk of a batched store prefill stays there", T,
      KVC_HOSTILE_DTYPES) {
    KVC_REQUIRE_CUDA_DEVICE();
    if (kernels_present<T>()) every_poison(41, prefill_case<T>);
  }

  TEST_CASE_TEMPLATE(
      "hostile gpu: a released sequence's slot and pages go to a new sequence, the others go on", T,
      KVC_HOSTILE_DTYPES) {
    KVC_REQUIRE_CUDA_DEVICE();
    if (!kernels_present<T>()) return;
    std::mt19937_64 rng(test::test_seed() + 42);
    INFO("seed " << test::test_seed());
    DType const dtype = DTypeTraits<T>::kDType;
    for (PolicyKind kind : kPolicies) {
      INFO("policy " << std::string(policy_name(kind)));
      // Every head of 4 sequences takes its one page (page size 4) at step 0: a pool of exactly
      // 4 x 2 layers x 2 KV heads pages is dry from then on, so the newcomer's pages can only be
      // the released sequence's. Nobody else needs a page before the end: lengths reach 4 at
      // step 3 (H2O/TOVA hold budget + 1 = 4 slots at most).
      int const release = 2;  // the step before which slot `gone` is released
      int const steps = 4;
      int const pool = 4 * kLayers * kKvHeads;
      PagedStoreConfig const config = hostile_config(kind, dtype, 4, steps, pool);
      REQUIRE(config.max_pages_per_head == 1);
      Rig<T> released(config, 4), kept(config, 4);
      std::vector<std::vector<reference::LayerCache>> refs;  // by slot
      for (int s = 0; s < 4; ++s) {
        REQUIRE(released.add() == s);
        REQUIRE(kept.add() == s);
        refs.push_back(make_reference(config));
      }
      std::vector<std::int32_t> const batch = {3, 1, 0, 2};
      int const gone = 1;  // the released slot, taken again by the newcomer
      std::vector<std::int32_t> gone_pages;
      for (int step = 0; step < steps; ++step) {
        std::string const what = "step " + std::to_string(step);
        if (step == release) {
          // Release slot 1 in one store (the other keeps it), and add a sequence there.
          test::StoreSnapshot<T> const before =
              test::take_snapshot<T>(released.store, released.stream);
          REQUIRE(before.free_count == 0);  // the pool is dry
          for (int l = 0; l < kLayers; ++l) {
            for (int h = 0; h < kKvHeads; ++h) {
              std::vector<std::int32_t> const held = before.pages(l, gone, h);
              gone_pages.insert(gone_pages.end(), held.begin(), held.end());
            }
          }
          KVC_STATUS_REQUIRE(released.store.release_sequence(gone, released.stream));
          test::StoreSnapshot<T> const after =
              test::take_snapshot<T>(released.store, released.stream);
          test::check_page_accounting(after);
          CHECK(after.free_count == static_cast<std::int32_t>(gone_pages.size()));
          for (int l = 0; l < kLayers; ++l) {
            for (int h = 0; h < kKvHeads; ++h) CHECK(after.head(l, gone, h).size() == 0);
          }
          REQUIRE(released.add() == gone);
          refs[static_cast<std::size_t>(gone)] = make_reference(config);
        }
        Inputs in = draw_inputs(rng, dtype, batch.size());
        if (kind == PolicyKind::kDmc && step < release) {
          // Every token appends until the release (k[d] - 0 < 0), as in the other policies.
          for (auto& layer : in.k) {
            for (std::size_t h = 0; h < batch.size() * kKvHeads; ++h) {
              layer[h * kHeadDim + kHeadDim - 1] = -1.0f;
            }
          }
        }
        StepResult const got = released.decode(batch, in);
        StepResult const twin = kept.decode(batch, in);
        test::StoreSnapshot<T> const sr =
            test::snapshot_after_success<T>(released.store, released.stream);
        test::StoreSnapshot<T> const sk = test::snapshot_after_success<T>(kept.store, kept.stream);
        for (std::size_t r = 0; r < batch.size(); ++r) {
          int const slot = batch[r];
          for (int l = 0; l < kLayers; ++l) {
            std::string const at =
                what + " slot " + std::to_string(slot) + " layer " + std::to_string(l);
            reference::LayerCache& ref =
                refs[static_cast<std::size_t>(slot)][static_cast<std::size_t>(l)];
            check_reference(ref, in, got, l, r, 1, true, dtype, at);
            test::compare_cached_heads(sr, l, slot, ref, at);
            if (auto const* dmc = std::get_if<reference::DmcLayerState>(&ref.state())) {
              test::compare_dmc_state(sr, l, slot, dmc->dmc, {1e-6, 1e-6}, at);
            }
            if (slot == gone && step >= release) continue;  // the newcomer: no twin
            require_same_outputs(got, twin, l, r, 1, -1, released.stride, at + " vs twin");
            require_same_tokens_seen(sr, sk, l, slot, at + " vs twin");
            for (int h = 0; h < kKvHeads; ++h)
              require_same_head(sr, sk, l, slot, h, at + " vs twin");
          }
        }
        if (step >= release) {
          // The newcomer's pages were the released sequence's.
          for (int l = 0; l < kLayers; ++l) {
            for (int h = 0; h < kKvHeads; ++h) {
              std::vector<std::int32_t> const held = sr.pages(l, gone, h);
              REQUIRE(!held.empty());
              for (std::int32_t const page : held) {
                CHECK(std::find(gone_pages.begin(), gone_pages.end(), page) != gone_pages.end());
              }
            }
          }
        }
      }
      for (int s = 0; s < 4; ++s)
        KVC_STATUS_REQUIRE(released.store.release_sequence(s, released.stream));
      CHECK(released.fixture->stats().pages_free == pool);
    }
  }

  TEST_CASE_TEMPLATE(
      "hostile gpu: two streams step disjoint sequences of one store, each with its own context", T,
      KVC_HOSTILE_DTYPES) {
    KVC_REQUIRE_CUDA_DEVICE();
    if (!kernels_present<T>()) return;
    std::mt19937_64 rng(test::test_seed() + 43);
    INFO("seed " << test::test_seed());
    DType const dtype = DTypeTraits<T>::kDType;
    for (PolicyKind kind : kPolicies) {
      INFO("policy " << std::string(policy_name(kind)));
      int const steps = 6;
      PagedStoreConfig const config = hostile_config(kind, dtype, 6, steps + 1);
      // Stream A: the store's own context; stream B: its own. Slots 0..3 live; 5 never joins.
      // The twin takes the same steps on one stream, one after the other.
      TwoStreams<T> rigs(config, 4);
      Rig<T>& a = rigs.a;
      Rig<T>& b = rigs.b;
      Rig<T>& twin = rigs.twin;
      StepContext const& context_b = rigs.context_b;
      std::vector<std::int32_t> const batch_a = {0, 2};
      std::vector<std::int32_t> const valid_b = {3, 1};
      std::vector<std::int32_t> const refused_b = {3, 5};  // slot 5 is not active
      cudaEvent_t prepared = nullptr;
      KVC_CUDA_REQUIRE(cudaEventCreateWithFlags(&prepared, cudaEventDisableTiming));
      for (int step = 0; step < steps; ++step) {
        std::string const what = "step " + std::to_string(step);
        // B's step is refused every other step: with one shared report, A's update (after the
        // spin) would then read B's refusal and write nothing.
        bool const b_refused = step % 2 == 1;
        std::vector<std::int32_t> const& batch_b = b_refused ? refused_b : valid_b;
        Inputs const in_a = draw_inputs(rng, dtype, 2);
        Inputs const in_b = draw_inputs(rng, dtype, 2);
        // A prepares, then holds its step open (spin) while B prepares on its own stream.
        a.begin_decode(batch_a);
        KVC_CUDA_REQUIRE(cudaEventRecord(prepared, a.stream));
        spin_kernel<<<1, 1, 0, a.stream>>>(2000000);  // about 1 ms
        KVC_CUDA_REQUIRE(cudaGetLastError());
        KVC_CUDA_REQUIRE(cudaStreamWaitEvent(b.stream, prepared, 0));
        b.begin_decode(batch_b);
        StepResult const got_a = a.decode_layers(batch_a, in_a);
        StepResult const got_b = b.decode_layers(batch_b, in_b);
        StepReport report_b;
        KVC_STATUS_REQUIRE(
            a.store.copy_step_report_async(&report_b, nullptr, 0, b.stream, &context_b));
        KVC_CUDA_REQUIRE(cudaStreamSynchronize(b.stream));
        CHECK(step_status(report_b) ==
              (b_refused ? Status::kErrorInvalidSequence : Status::kSuccess));
        StepResult const twin_a = twin.decode(batch_a, in_a);
        StepResult twin_b;
        if (!b_refused) twin_b = twin.decode(batch_b, in_b);
        KVC_CUDA_REQUIRE(cudaStreamSynchronize(b.stream));
        test::StoreSnapshot<T> const got = test::snapshot_after_success<T>(a.store, a.stream);
        test::StoreSnapshot<T> const want =
            test::snapshot_after_success<T>(twin.store, twin.stream);
        for (int l = 0; l < kLayers; ++l) {
          std::string const at = what + " layer " + std::to_string(l);
          require_same_outputs(got_a, twin_a, l, 0, 2, -1, a.stride, at + " stream A");
          if (!b_refused) require_same_outputs(got_b, twin_b, l, 0, 2, -1, a.stride, at + " B");
          for (int slot = 0; slot < 4; ++slot) {
            require_same_tokens_seen(got, want, l, slot, at + " slot " + std::to_string(slot));
            for (int h = 0; h < kKvHeads; ++h) {
              require_same_head(got, want, l, slot, h, at + " slot " + std::to_string(slot));
            }
          }
        }
      }
      KVC_CUDA_REQUIRE(cudaEventDestroy(prepared));
    }
  }
  TEST_CASE_TEMPLATE(
      "hostile gpu: two host threads step disjoint sequences of one store, each on its own stream",
      T, KVC_HOSTILE_DTYPES) {
    // docs/paged_store.md, "Several streams at once": the step calls of one store may come from
    // several host threads when each drives its own stream and StepContext over disjoint
    // sequences. Two threads run their steps with no ordering between them (their prepares
    // race for the free stack on the device); a one-stream twin runs A's steps, then B's. Every
    // step's outputs and the final cache must equal the twin's bit for bit.
    KVC_REQUIRE_CUDA_DEVICE();
    if (!kernels_present<T>()) return;
    std::mt19937_64 rng(test::test_seed() + 44);
    INFO("seed " << test::test_seed());
    DType const dtype = DTypeTraits<T>::kDType;
    for (PolicyKind kind : kPolicies) {
      INFO("policy " << std::string(policy_name(kind)));
      int const steps = test::full_runs() ? 8 : 4;
      PagedStoreConfig const config = hostile_config(kind, dtype, 4, steps + 1);
      TwoStreams<T> rigs(config, 2);
      Rig<T>& a = rigs.a;
      Rig<T>& b = rigs.b;
      Rig<T>& twin = rigs.twin;
      StepContext const& context_b = rigs.context_b;
      std::vector<std::int32_t> const batch_a = {0, 2};
      std::vector<std::int32_t> const batch_b = {3, 1};
      std::vector<Inputs> in_a, in_b;
      for (int step = 0; step < steps; ++step) {
        in_a.push_back(draw_inputs(rng, dtype, 2));
        in_b.push_back(draw_inputs(rng, dtype, 2));
      }
      std::vector<StepResult> got_a(static_cast<std::size_t>(steps));
      std::vector<StepResult> got_b(static_cast<std::size_t>(steps));
      std::exception_ptr error_a, error_b;
      auto drive = [steps](Rig<T>& rig, std::vector<std::int32_t> const& batch,
                           std::vector<Inputs> const& in, std::vector<StepResult>& got,
                           std::exception_ptr& error) {
        try {
          for (int step = 0; step < steps; ++step) {
            got[static_cast<std::size_t>(step)] = rig.decode(batch, in[static_cast<std::size_t>(step)]);
          }
          KVC_CUDA_REQUIRE(cudaStreamSynchronize(rig.stream));
        } catch (...) {
          error = std::current_exception();
        }
      };
      std::thread thread_a(drive, std::ref(a), std::cref(batch_a), std::cref(in_a), std::ref(got_a),
                           std::ref(error_a));
      std::thread thread_b(drive, std::ref(b), std::cref(batch_b), std::cref(in_b), std::ref(got_b),
                           std::ref(error_b));
      thread_a.join();
      thread_b.join();
      if (error_a) std::rethrow_exception(error_a);
      if (error_b) std::rethrow_exception(error_b);
      StepReport report_a, report_b;
      KVC_STATUS_REQUIRE(a.store.copy_step_report_async(&report_a, nullptr, 0, a.stream));
      KVC_STATUS_REQUIRE(
          a.store.copy_step_report_async(&report_b, nullptr, 0, a.stream, &context_b));
      KVC_CUDA_REQUIRE(cudaStreamSynchronize(a.stream));
      CHECK(step_status(report_a) == Status::kSuccess);
      CHECK(step_status(report_b) == Status::kSuccess);

      for (int step = 0; step < steps; ++step) {
        std::size_t const s = static_cast<std::size_t>(step);
        StepResult const twin_a = twin.decode(batch_a, in_a[s]);
        StepResult const twin_b = twin.decode(batch_b, in_b[s]);
        for (int l = 0; l < kLayers; ++l) {
          std::string const at = "step " + std::to_string(step) + " layer " + std::to_string(l);
          require_same_outputs(got_a[s], twin_a, l, 0, 2, -1, a.stride, at + " thread A");
          require_same_outputs(got_b[s], twin_b, l, 0, 2, -1, a.stride, at + " thread B");
        }
      }
      test::StoreSnapshot<T> const got = test::snapshot_after_success<T>(a.store, a.stream);
      test::StoreSnapshot<T> const want = test::snapshot_after_success<T>(twin.store, twin.stream);
      for (int l = 0; l < kLayers; ++l) {
        for (int slot = 0; slot < 4; ++slot) {
          std::string const at = "layer " + std::to_string(l) + " slot " + std::to_string(slot);
          require_same_tokens_seen(got, want, l, slot, at);
          for (int h = 0; h < kKvHeads; ++h) require_same_head(got, want, l, slot, h, at);
        }
      }
    }
  }
}
