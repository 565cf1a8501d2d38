//! @file
//! Helpers of the paged-store GPU tests (the device check is in cuda_test_support.cuh): RAII
//! device buffers, dtype conversions, a host snapshot of the whole store gathered through the
//! page tables, page-accounting checks, a generic random continuous-batching run that drives
//! the store (prepare, update, oracle attention, evict) and the CPU reference of a policy side by
//! side and compares everything after every step, and comparisons of a (layer, sequence) of the
//! store with a reference::LayerCache.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include "kvc/attention/reference_decode.cuh"
#include "kvc/attention/score_hook.hpp"
#include "kvc/cache/paged_store.cuh"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/reference/dmc_state.hpp"
#include "kvc/reference/layer_cache.hpp"
#include "kvc/reference/types.hpp"

#include "cuda_test_support.cuh"
#include "test_support.hpp"

namespace kvc::test {

//! A device array of `count` elements, freed on destruction.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t count) { resize(count); }
  DeviceBuffer(DeviceBuffer const&) = delete;
  DeviceBuffer& operator=(DeviceBuffer const&) = delete;
  ~DeviceBuffer() {
    if (data_ != nullptr) cudaFree(data_);
  }
  void resize(std::size_t count) {
    if (data_ != nullptr) cudaFree(data_);
    data_ = nullptr;
    count_ = count;
    if (count > 0)
      KVC_CUDA_REQUIRE(cudaMalloc(reinterpret_cast<void**>(&data_), count * sizeof(T)));
  }
  T* data() const { return data_; }
  std::size_t size() const { return count_; }
  std::size_t bytes() const { return count_ * sizeof(T); }
  void upload(std::vector<T> const& host, cudaStream_t stream) {
    REQUIRE(host.size() <= count_);
    if (!host.empty()) {
      KVC_CUDA_REQUIRE(cudaMemcpyAsync(data_, host.data(), host.size() * sizeof(T),
                                       cudaMemcpyHostToDevice, stream));
    }
  }
  //! Fills every byte with 0xff (NaN for fp32, fp16 and bf16; -1 for integers).
  void poison(cudaStream_t stream) {
    if (count_ > 0) KVC_CUDA_REQUIRE(cudaMemsetAsync(data_, 0xff, bytes(), stream));
  }
  std::vector<T> download(cudaStream_t stream, std::size_t count) const {
    std::vector<T> host(count);
    if (count > 0) {
      KVC_CUDA_REQUIRE(
          cudaMemcpyAsync(host.data(), data_, count * sizeof(T), cudaMemcpyDeviceToHost, stream));
    }
    KVC_CUDA_REQUIRE(cudaStreamSynchronize(stream));
    return host;
  }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

//! A stream for one test case.
class Stream {
 public:
  Stream() { KVC_CUDA_REQUIRE(cudaStreamCreate(&stream_)); }
  Stream(Stream const&) = delete;
  Stream& operator=(Stream const&) = delete;
  ~Stream() { cudaStreamDestroy(stream_); }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

//! A store on its own (poisoned) buffer and stream.
struct StoreFixture {
  PagedStoreConfig config;
  Stream stream;
  DeviceBuffer<unsigned char> memory;
  PagedStore store;

  explicit StoreFixture(PagedStoreConfig const& c) : config(c) {
    std::size_t bytes = 0;
    REQUIRE(PagedStore::required_bytes(config, bytes) == Status::kSuccess);
    memory.resize(bytes);
    memory.poison(stream.get());
    KVC_STATUS_REQUIRE(store.init(config, memory.data(), bytes, stream.get()));
  }
  StoreStats stats() {
    StoreStats out;
    KVC_STATUS_REQUIRE(store.stats_sync(out, stream.get()));
    return out;
  }
};

template <class T>
std::vector<T> to_storage(std::vector<float> const& values) {
  std::vector<T> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) out[i] = DTypeTraits<T>::from_float(values[i]);
  return out;
}

template <class T>
float storage_to_float(T value) {
  return DTypeTraits<T>::to_float(value);
}

template <class T>
std::vector<float> to_floats(std::vector<T> const& values) {
  std::vector<float> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) out[i] = storage_to_float(values[i]);
  return out;
}

//! Copies `count` elements of device memory to the host (synchronising `stream`).
template <class U>
std::vector<U> copy_to_host(U const* device, std::size_t count, cudaStream_t stream) {
  std::vector<U> host(count);
  if (count > 0 && device != nullptr) {
    KVC_CUDA_REQUIRE(
        cudaMemcpyAsync(host.data(), device, count * sizeof(U), cudaMemcpyDeviceToHost, stream));
  }
  KVC_CUDA_REQUIRE(cudaStreamSynchronize(stream));
  if (device == nullptr) host.clear();
  return host;
}

//! Host copy of every array of a store.
template <class T>
struct StoreSnapshot {
  PagedStoreConfig config;
  StoreDims dims;
  std::vector<T> k_pages, v_pages;
  std::vector<float> score_pages;
  std::vector<std::int32_t> position_pages, page_table, lengths, page_counts, active, free_stack;
  std::int32_t free_count = 0;
  std::vector<std::int64_t> tokens_seen;
  std::vector<float> k_sum, v_sum, weight_sum, ring_k, ring_v, ring_w;
  std::vector<std::int32_t> group_length;

  std::int64_t head_index(int layer, int seq, int kv_head) const {
    return dims.head_index(layer, seq, kv_head);
  }

  //! The pages (layer, seq, kv head) holds, in page-table order. // [page_counts of the head]
  std::vector<std::int32_t> pages(int layer, int seq, int kv_head) const {
    std::int64_t const index = head_index(layer, seq, kv_head);
    int const count = page_counts[static_cast<std::size_t>(index)];
    REQUIRE(count >= 0);
    REQUIRE(count <= dims.max_pages_per_head);
    auto const first =
        page_table.begin() + static_cast<std::ptrdiff_t>(index * dims.max_pages_per_head);
    return std::vector<std::int32_t>(first, first + count);
  }

  //! The slots of (layer, seq, kv head) in slot order, read through the page table.
  reference::HeadCache head(int layer, int seq, int kv_head) const {
    std::int64_t const index = head_index(layer, seq, kv_head);
    int const length = lengths[static_cast<std::size_t>(index)];
    int const count = page_counts[static_cast<std::size_t>(index)];
    REQUIRE(length >= 0);
    REQUIRE(static_cast<std::int64_t>(length) <= static_cast<std::int64_t>(count) * dims.page_size);
    std::int32_t const* pages = page_table.data() + index * dims.max_pages_per_head;
    reference::HeadCache out;
    int const d = dims.head_dim;
    for (int s = 0; s < length; ++s) {
      std::int32_t const page = pages[s / dims.page_size];
      REQUIRE(page >= 0);
      REQUIRE(page < dims.num_pages);
      std::size_t const row = static_cast<std::size_t>(page) * dims.page_size + s % dims.page_size;
      for (int i = 0; i < d; ++i) {
        out.k.push_back(storage_to_float(k_pages[row * d + i]));
        out.v.push_back(storage_to_float(v_pages[row * d + i]));
      }
      out.position.push_back(position_pages[row]);
      if (!score_pages.empty()) out.score.push_back(score_pages[row]);
    }
    return out;
  }
};

template <class T>
StoreSnapshot<T> take_snapshot(PagedStore const& store, cudaStream_t stream) {
  StoreSnapshot<T> snap;
  snap.config = store.config();
  snap.dims = store.dims();
  StoreArrays const& a = store.arrays();
  StoreDims const& d = snap.dims;
  std::size_t const slots = static_cast<std::size_t>(d.num_pages) * d.page_size;
  std::size_t const heads = static_cast<std::size_t>(d.num_layers) * d.max_seqs * d.num_kv_heads;
  std::size_t const window = static_cast<std::size_t>(d.dmc_window);
  snap.k_pages = copy_to_host(static_cast<T const*>(a.k_pages), slots * d.head_dim, stream);
  snap.v_pages = copy_to_host(static_cast<T const*>(a.v_pages), slots * d.head_dim, stream);
  snap.score_pages = copy_to_host(a.score_pages, slots, stream);
  snap.position_pages = copy_to_host(a.position_pages, slots, stream);
  snap.page_table = copy_to_host(a.page_table, heads * d.max_pages_per_head, stream);
  snap.lengths = copy_to_host(a.lengths, heads, stream);
  snap.page_counts = copy_to_host(a.page_counts, heads, stream);
  snap.active = copy_to_host(a.active, static_cast<std::size_t>(d.max_seqs), stream);
  snap.free_stack = copy_to_host(a.free_stack, static_cast<std::size_t>(d.num_pages), stream);
  snap.free_count = copy_to_host(a.free_count, 1, stream)[0];
  snap.tokens_seen =
      copy_to_host(a.tokens_seen, static_cast<std::size_t>(d.num_layers) * d.max_seqs, stream);
  snap.k_sum = copy_to_host(a.dmc_k_sum, heads * d.head_dim, stream);
  snap.v_sum = copy_to_host(a.dmc_v_sum, heads * d.head_dim, stream);
  snap.weight_sum = copy_to_host(a.dmc_weight_sum, heads, stream);
  snap.group_length = copy_to_host(a.dmc_group_length, heads, stream);
  snap.ring_k = copy_to_host(a.dmc_ring_k, heads * window * d.head_dim, stream);
  snap.ring_v = copy_to_host(a.dmc_ring_v, heads * window * d.head_dim, stream);
  snap.ring_w = copy_to_host(a.dmc_ring_w, heads * window, stream);
  return snap;
}

//! Every page is either on the free stack or in exactly one page table entry [0, count) of an
//! active sequence; inactive slots hold nothing; lengths fit in what the heads hold.
template <class T>
void check_page_accounting(StoreSnapshot<T> const& snap) {
  StoreDims const& d = snap.dims;
  REQUIRE(snap.free_count >= 0);
  REQUIRE(snap.free_count <= d.num_pages);
  std::vector<int> seen(static_cast<std::size_t>(d.num_pages), 0);
  for (int i = 0; i < snap.free_count; ++i) {
    std::int32_t const page = snap.free_stack[static_cast<std::size_t>(i)];
    REQUIRE(page >= 0);
    REQUIRE(page < d.num_pages);
    ++seen[static_cast<std::size_t>(page)];
  }
  for (int layer = 0; layer < d.num_layers; ++layer) {
    for (int seq = 0; seq < d.max_seqs; ++seq) {
      for (int h = 0; h < d.num_kv_heads; ++h) {
        std::int64_t const index = snap.head_index(layer, seq, h);
        int const count = snap.page_counts[static_cast<std::size_t>(index)];
        int const length = snap.lengths[static_cast<std::size_t>(index)];
        if (snap.active[static_cast<std::size_t>(seq)] == 0) {
          REQUIRE(count == 0);
          REQUIRE(length == 0);
          continue;
        }
        REQUIRE(static_cast<std::int64_t>(length) <=
                static_cast<std::int64_t>(count) * d.page_size);
        for (std::int32_t const page : snap.pages(layer, seq, h)) {  // checks 0 <= count <= max
          REQUIRE(page >= 0);
          REQUIRE(page < d.num_pages);
          ++seen[static_cast<std::size_t>(page)];
        }
      }
    }
  }
  int bad = 0;
  for (int count : seen) bad += count != 1 ? 1 : 0;
  REQUIRE_MESSAGE(bad == 0, bad << " pages are lost or owned twice");
}

//! Compares a gathered head with the reference's: length, positions exactly; keys and values
//! with the dtype's tolerance; scores (when the reference keeps them) within `score_tolerance`
//! (tight by default).
inline void compare_head(reference::HeadCache const& got, reference::HeadCache const& want,
                         DType dtype, std::string const& what,
                         Tolerance score_tolerance = {1e-6, 1e-5}) {
  REQUIRE_MESSAGE(got.size() == want.size(),
                  what << ": length " << got.size() << " vs " << want.size());
  REQUIRE_MESSAGE(got.position == want.position, what << ": positions differ");
  require_close(got.k, want.k, default_tolerance(dtype), what + " keys");
  require_close(got.v, want.v, default_tolerance(dtype), what + " values");
  if (!want.score.empty()) require_close(got.score, want.score, score_tolerance, what + " scores");
}

//! Layer spec of the reference for a store config.
inline reference::LayerSpec layer_spec(PagedStoreConfig const& config) {
  reference::LayerSpec spec;
  spec.num_q_heads = config.shape.num_q_heads;
  spec.num_kv_heads = config.shape.num_kv_heads;
  spec.head_dim = config.shape.head_dim;
  spec.dtype = config.dtype;
  spec.rope = config.rope;
  return spec;
}

//! The dtypes every store test runs with (fp32 only in KVC_CI_MINIMAL builds, to compile fast).
#if KVC_CI_MINIMAL
#define KVC_STORE_TEST_DTYPES float
#else
#define KVC_STORE_TEST_DTYPES float, half, __nv_bfloat16
#endif

//! The dtypes of store tests that need the precompiled prefill attention (KVC_CI_MINIMAL builds
//! compile it for bf16 only, so their store tests would otherwise run no case).
#if KVC_CI_MINIMAL
#define KVC_STORE_PREFILL_TEST_DTYPES __nv_bfloat16
#else
#define KVC_STORE_PREFILL_TEST_DTYPES float, half, __nv_bfloat16
#endif

// run_steps() and full_runs() (KVC_STORE_TEST_STEPS, the sanitizer-size mode) are in
// test_support.hpp, shared with the attention tests.

//! One random continuous-batching scenario.
struct RunCase {
  char const* name = "";
  int layers = 2;
  int kv_heads = 2;
  int group = 1;
  int head_dim = 32;
  int page_size = 16;
  int steps = 200;
  int max_seqs = 6;
  int target_active = 4;
  int num_pages = 0;           //!< 0: enough for every slot to reach its longest length
  int max_pages_per_head = 0;  //!< 0: enough for `steps` + 1 slots (or budget + 1)
  PolicyConfig policy{};
  RopeConfig rope{};
  double release_probability = 0.02;  //!< per active sequence and step
  double join_probability = 0.5;      //!< per step while below target_active
  double step_probability = 0.9;      //!< a sequence takes part in a step
  double merge_probability = 0.85;    //!< DMC: chance that a token merges
  bool allow_exhaustion = false;      //!< steps may fail for lack of pages (then release, retry)
  //! > 0: the first sequence to join is not released before it has taken part in this many
  //! steps (coverage of long heads that must not depend on luck; 0: no such guarantee)
  int keep_first_steps = 0;
};

//! What a run saw (for assertions on coverage).
struct RunSummary {
  int steps = 0;
  int failed_steps = 0;
  int retries_succeeded = 0;
  int releases = 0;
  int joins = 0;
  int partial_failures = 0;  //!< refused steps in which some rows did get their pages
  int max_batch = 0;
  std::int64_t max_length = 0;
  std::int64_t max_group_length = 0;  //!< DMC: longest open group seen
};

//! The store config of a case.
inline PagedStoreConfig case_config(RunCase const& c, DType dtype) {
  PagedStoreConfig config;
  config.shape = ModelShape{c.layers, c.kv_heads * c.group, c.kv_heads, c.head_dim};
  config.dtype = dtype;
  config.page_size = c.page_size;
  config.max_seqs = c.max_seqs;
  config.policy = c.policy;
  config.rope = c.rope;
  int const longest = config.has_scores() ? config.eviction_budget() + 1 : c.steps + 1;
  int const pages_per_head = (longest + c.page_size - 1) / c.page_size;
  config.max_pages_per_head = c.max_pages_per_head > 0 ? c.max_pages_per_head : pages_per_head;
  config.num_pages =
      c.num_pages > 0 ? c.num_pages : c.max_seqs * c.layers * c.kv_heads * pages_per_head;
  return config;
}

//! Drives a store and the CPU reference of `Model` through `c.steps` random decode steps of a
//! changing set of sequences; after every step compares the gathered store, the DMC state, q_out,
//! the oracle attention outputs and the page accounting with the reference.
//! Model: State, make(spec, policy), step(spec, policy, state, input, output), heads(state),
//! tokens_seen(state), zeroed_dim(spec, policy), shape_inputs(rng, case, spec, k),
//! compare_state(snapshot, layer, slot, state, what).
template <class T, class Model>
RunSummary run_store_case(RunCase const& c, std::mt19937_64& rng) {
  DType const dtype = DTypeTraits<T>::kDType;
  PagedStoreConfig const config = case_config(c, dtype);
  reference::LayerSpec const spec = layer_spec(config);
  INFO("case " << c.name << " dtype " << std::string(dtype_name(dtype)) << " G " << c.group << " page "
               << c.page_size << " D " << c.head_dim << " Hkv " << c.kv_heads << " policy "
               << std::string(policy_name(c.policy.kind)));
  REQUIRE(config.validate() == Status::kSuccess);
  int const hq = config.shape.num_q_heads;
  int const hkv = config.shape.num_kv_heads;
  int const d = config.shape.head_dim;
  int const layers = config.shape.num_layers;
  std::size_t const q_row = static_cast<std::size_t>(hq) * d;
  std::size_t const kv_row = static_cast<std::size_t>(hkv) * d;
  bool const scores = config.has_scores();
  int const probs_stride = scores ? config.eviction_budget() + 1 : 1;

  Stream stream;
  std::size_t bytes = 0;
  REQUIRE(PagedStore::required_bytes(config, bytes) == Status::kSuccess);
  DeviceBuffer<unsigned char> memory(bytes + 64);
  memory.poison(stream.get());  // unwritten pool slots read back as NaN
  PagedStore store;
  // An unaligned base: init aligns it.
  KVC_STATUS_REQUIRE(store.init(config, memory.data() + 64 - 8, bytes, stream.get()));

  std::size_t const max_rows = static_cast<std::size_t>(c.max_seqs);
  std::vector<DeviceBuffer<T>> q_dev(layers), k_dev(layers), v_dev(layers), q_out(layers),
      out(layers);
  std::vector<DeviceBuffer<float>> lse(layers);
  for (int l = 0; l < layers; ++l) {
    q_dev[l].resize(max_rows * q_row);
    k_dev[l].resize(max_rows * kv_row);
    v_dev[l].resize(max_rows * kv_row);
    q_out[l].resize(max_rows * q_row);
    out[l].resize(max_rows * q_row);
    lse[l].resize(max_rows * hq);
  }
  DeviceBuffer<float> probs(max_rows * hq * probs_stride);
  DeviceBuffer<float> score_lse(max_rows * hq);  // the log2-logit form's LSE
  DeviceBuffer<std::int32_t> slots_dev(max_rows);

  struct Sequence {
    int slot = 0;
    std::vector<typename Model::State> layers;
    bool first = false;   //!< the run's first sequence
    int steps_taken = 0;  //!< steps it took part in
  };
  std::vector<Sequence> live;
  RunSummary summary;
  std::uniform_real_distribution<double> unit(0.0, 1.0);

  auto join = [&]() {
    Sequence sequence;
    KVC_STATUS_REQUIRE(store.add_sequence(sequence.slot, stream.get()));
    for (int l = 0; l < layers; ++l) sequence.layers.push_back(Model::make(spec, config.policy));
    sequence.first = summary.joins == 0;
    live.push_back(std::move(sequence));
    ++summary.joins;
  };
  auto release = [&](std::size_t index) {
    KVC_STATUS_REQUIRE(store.release_sequence(live[index].slot, stream.get()));
    live.erase(live.begin() + static_cast<std::ptrdiff_t>(index));
    ++summary.releases;
  };

  int const steps = run_steps(c.steps);
  for (int step = 0; step < steps; ++step) {
    INFO("step " << step);
    // Sequences leave and join between steps.
    auto kept = [&](std::size_t i) {
      return live[i].first && live[i].steps_taken < c.keep_first_steps;
    };
    for (std::size_t i = live.size(); i-- > 0;) {
      if (unit(rng) < c.release_probability && !kept(i)) release(i);
    }
    // Coverage that must not depend on luck: by half-time some sequence has left (and so a
    // later one joins). A case with a small release probability could otherwise see none
    // (about 1 % of the 120-step full-cache cases did).
    if (c.release_probability > 0.0 && step == steps / 2 && summary.releases == 0 &&
        live.size() > 1) {
      std::size_t const pick = static_cast<std::size_t>(rng() % live.size());
      release(kept(pick) ? (pick + 1) % live.size() : pick);
    }
    while (static_cast<int>(live.size()) < c.target_active &&
           (live.empty() || unit(rng) < c.join_probability)) {
      join();
    }
    // The batch: a shuffled subset of the live sequences.
    std::vector<std::size_t> rows;
    for (std::size_t i = 0; i < live.size(); ++i) {
      if (unit(rng) < c.step_probability) rows.push_back(i);
    }
    if (rows.empty()) rows.push_back(static_cast<std::size_t>(rng() % live.size()));
    std::shuffle(rows.begin(), rows.end(), rng);
    for (std::size_t r : rows) ++live[r].steps_taken;

    // Inputs per (layer, row), pre-RoPE, representable in the dtype.
    std::size_t const batch_max = rows.size();
    std::vector<std::vector<float>> q_host(layers), k_host(layers), v_host(layers);
    for (int l = 0; l < layers; ++l) {
      q_host[l] = random_normal(rng, batch_max * q_row, dtype);
      k_host[l] = random_normal(rng, batch_max * kv_row, dtype);
      v_host[l] = random_normal(rng, batch_max * kv_row, dtype);
      Model::shape_inputs(rng, c, spec, config.policy, k_host[l]);
    }

    bool done = false;
    bool refused = false;
    while (!done) {
      int const batch = static_cast<int>(rows.size());
      REQUIRE(batch > 0);
      summary.max_batch = std::max(summary.max_batch, batch);
      std::vector<std::int32_t> slots(rows.size());
      for (std::size_t r = 0; r < rows.size(); ++r) slots[r] = live[rows[r]].slot;
      slots_dev.upload(slots, stream.get());
      // Per-layer inputs of the rows still in the batch (rows keep their original inputs).
      std::vector<std::vector<float>> q_step(layers), k_step(layers), v_step(layers);
      for (int l = 0; l < layers; ++l) {
        for (std::size_t r = 0; r < rows.size(); ++r) {
          std::size_t const source = static_cast<std::size_t>(r);
          q_step[l].insert(q_step[l].end(), q_host[l].begin() + source * q_row,
                           q_host[l].begin() + (source + 1) * q_row);
          k_step[l].insert(k_step[l].end(), k_host[l].begin() + source * kv_row,
                           k_host[l].begin() + (source + 1) * kv_row);
          v_step[l].insert(v_step[l].end(), v_host[l].begin() + source * kv_row,
                           v_host[l].begin() + (source + 1) * kv_row);
        }
        q_dev[l].upload(to_storage<T>(q_step[l]), stream.get());
        k_dev[l].upload(to_storage<T>(k_step[l]), stream.get());
        v_dev[l].upload(to_storage<T>(v_step[l]), stream.get());
        q_out[l].poison(stream.get());
        out[l].poison(stream.get());
        lse[l].poison(stream.get());
      }

      // The GPU step: 1 prepare, then per layer update + oracle attention (+ evict).
      KVC_STATUS_REQUIRE(store.prepare_decode_step(slots_dev.data(), batch, stream.get()));
      for (int l = 0; l < layers; ++l) {
        KVC_STATUS_REQUIRE(store.update<T>(l, q_dev[l].data(), k_dev[l].data(), v_dev[l].data(),
                                           slots_dev.data(), batch, q_out[l].data(), stream.get()));
        ReferenceDecodeParams<T> attention;
        KVC_STATUS_REQUIRE(store.layer_view<T>(l, attention.cache));
        attention.q = q_out[l].data();
        attention.seq_slots = slots_dev.data();
        attention.batch = batch;
        attention.num_q_heads = hq;
        attention.out = out[l].data();
        attention.lse = lse[l].data();
        // The score forms take turns by step: the evict kernel reads both (score_hook.hpp).
        ScoreHook const hook{probs.data(), probs_stride,
                             step % 2 != 0 ? ScoreForm::kLog2Logits : ScoreForm::kProbabilities,
                             score_lse.data()};
        if (scores) {
          probs.poison(stream.get());
          score_lse.poison(stream.get());
          attention.scores = hook;
        }
        KVC_STATUS_REQUIRE(reference_decode_attention(attention, stream.get()));
        KVC_STATUS_REQUIRE(store.evict(l, hook, slots_dev.data(), batch, stream.get()));
      }
      StepReport report;
      std::vector<std::int32_t> row_flags(rows.size(), -7);
      KVC_STATUS_REQUIRE(
          store.copy_step_report_async(&report, row_flags.data(), batch, stream.get()));
      KVC_CUDA_REQUIRE(cudaStreamSynchronize(stream.get()));
      REQUIRE(report.protocol_errors == 0);
      Status const status = step_status(report);

      if (status != Status::kSuccess) {
        // Refused: nothing may have changed. Release the oldest sequence and retry.
        REQUIRE_MESSAGE(c.allow_exhaustion, "step refused: " << to_string(status));
        REQUIRE(status == Status::kErrorOutOfPages);
        REQUIRE(report.failed == 1);
        REQUIRE(report.pages_short > 0);
        REQUIRE(report.rows_failed > 0);
        int flagged = 0;
        for (std::int32_t flags : row_flags) {
          REQUIRE((flags & ~(kStepRowOutOfPages | kStepRowHeadFull)) == 0);
          flagged += flags != 0 ? 1 : 0;
        }
        REQUIRE(flagged == report.rows_failed);
        ++summary.failed_steps;
        if (report.rows_failed < batch) ++summary.partial_failures;
        StoreSnapshot<T> const snap = take_snapshot<T>(store, stream.get());
        check_page_accounting(snap);
        for (Sequence const& sequence : live) {
          for (int l = 0; l < layers; ++l)
            Model::compare_state(snap, l, sequence.slot, sequence.layers[l], "unchanged");
        }
        std::size_t const oldest = 0;  // live is in join order
        std::vector<std::size_t> kept;
        for (std::size_t r : rows) {
          if (r != oldest) kept.push_back(r > oldest ? r - 1 : r);
        }
        std::vector<std::vector<float>> q_keep(layers), k_keep(layers), v_keep(layers);
        for (int l = 0; l < layers; ++l) {
          for (std::size_t r = 0; r < rows.size(); ++r) {
            if (rows[r] == oldest) continue;
            q_keep[l].insert(q_keep[l].end(), q_host[l].begin() + r * q_row,
                             q_host[l].begin() + (r + 1) * q_row);
            k_keep[l].insert(k_keep[l].end(), k_host[l].begin() + r * kv_row,
                             k_host[l].begin() + (r + 1) * kv_row);
            v_keep[l].insert(v_keep[l].end(), v_host[l].begin() + r * kv_row,
                             v_host[l].begin() + (r + 1) * kv_row);
          }
        }
        q_host = std::move(q_keep);
        k_host = std::move(k_keep);
        v_host = std::move(v_keep);
        release(oldest);
        rows = std::move(kept);
        refused = true;
        if (rows.empty()) done = true;  // nothing left to step
        continue;
      }
      if (refused) ++summary.retries_succeeded;

      // The reference, row by row and layer by layer; q_out, outputs and LSE compared.
      for (int l = 0; l < layers; ++l) {
        std::vector<float> const q_got =
            to_floats(q_out[l].download(stream.get(), rows.size() * q_row));
        std::vector<float> const out_got =
            to_floats(out[l].download(stream.get(), rows.size() * q_row));
        std::vector<float> const lse_got = lse[l].download(stream.get(), rows.size() * hq);
        for (std::size_t r = 0; r < rows.size(); ++r) {
          typename Model::State& state = live[rows[r]].layers[l];
          std::int64_t const position = Model::tokens_seen(state);
          float const* q_in = q_step[l].data() + r * q_row;
          std::vector<float> const q_want = reference::rotated_query(
              spec, q_in, position, Model::zeroed_dim(spec, config.policy));
          reference::DecodeInput const input{
              reference::ConstSpan(q_in, q_row),
              reference::ConstSpan(k_step[l].data() + r * kv_row, kv_row),
              reference::ConstSpan(v_step[l].data() + r * kv_row, kv_row)};
          reference::AttentionOutput want;
          KVC_STATUS_REQUIRE(Model::step(spec, config.policy, state, input, want));
          std::string const what = "layer " + std::to_string(l) + " row " + std::to_string(r);
          require_close(
              std::vector<float>(q_got.begin() + r * q_row, q_got.begin() + (r + 1) * q_row),
              q_want, default_tolerance(dtype), what + " q_out");
          require_close(
              std::vector<float>(out_got.begin() + r * q_row, out_got.begin() + (r + 1) * q_row),
              want.out, default_tolerance(dtype), what + " attention out");
          require_close(
              std::vector<float>(lse_got.begin() + r * hq, lse_got.begin() + (r + 1) * hq),
              want.lse, {1e-5, 1e-5}, what + " lse");
        }
      }
      done = true;
    }
    ++summary.steps;

    // The whole store against the reference, every live sequence (stepped or not).
    StoreSnapshot<T> const snap = take_snapshot<T>(store, stream.get());
    check_page_accounting(snap);
    for (std::int32_t group_length : snap.group_length) {
      summary.max_group_length = std::max<std::int64_t>(summary.max_group_length, group_length);
    }
    for (Sequence const& sequence : live) {
      for (int l = 0; l < layers; ++l) {
        Model::compare_state(snap, l, sequence.slot, sequence.layers[l],
                             "layer " + std::to_string(l));
        for (reference::HeadCache const& head : Model::heads(sequence.layers[l])) {
          summary.max_length = std::max<std::int64_t>(summary.max_length, head.size());
        }
      }
    }
  }

  // Release everything: every page returns to the pool.
  while (!live.empty()) release(live.size() - 1);
  StoreStats stats;
  KVC_STATUS_REQUIRE(store.stats_sync(stats, stream.get()));
  CHECK(stats.pages_free == config.num_pages);
  CHECK(stats.pages_held == 0);
  CHECK(stats.slots_used == 0);
  CHECK(store.num_active() == 0);
  return summary;
}

//! Checks what every model shares: tokens seen and every KV head's slots.
template <class T, class State>
void compare_heads(StoreSnapshot<T> const& snap, int layer, int slot, State const& state,
                   std::vector<reference::HeadCache> const& heads, std::string const& what) {
  std::string const where = what + " slot " + std::to_string(slot);
  REQUIRE_MESSAGE(snap.tokens_seen[static_cast<std::size_t>(snap.dims.layer_seq(layer, slot))] ==
                      state.tokens_seen,
                  where << ": tokens seen");
  for (int h = 0; h < snap.dims.num_kv_heads; ++h) {
    compare_head(snap.head(layer, slot, h), heads[static_cast<std::size_t>(h)], snap.config.dtype,
                 where + " kv head " + std::to_string(h));
  }
}

//! What the model of every policy whose state holds `heads` and `tokens_seen` shares, for
//! run_store_case: no zeroed dim, the inputs as drawn, the heads compared slot by slot. A model
//! derives from it, adds make and step, and hides what it does differently.
template <class StateT>
struct HeadsModel {
  using State = StateT;
  static std::vector<reference::HeadCache> const& heads(State const& state) { return state.heads; }
  static std::int64_t tokens_seen(State const& state) { return state.tokens_seen; }
  static int zeroed_dim(reference::LayerSpec const&, PolicyConfig const&) { return -1; }
  static void shape_inputs(std::mt19937_64&, RunCase const&, reference::LayerSpec const&,
                           PolicyConfig const&, std::vector<float>&) {}
  template <class T>
  static void compare_state(StoreSnapshot<T> const& snap, int layer, int slot, State const& state,
                            std::string const& what) {
    compare_heads(snap, layer, slot, state, state.heads, what);
  }
};

//! A case named `name` of the given shape; the policy and the rest are the caller's.
inline RunCase shaped_case(char const* name, int group, int page_size, int head_dim, int kv_heads) {
  RunCase c;
  c.name = name;
  c.group = group;
  c.page_size = page_size;
  c.head_dim = head_dim;
  c.kv_heads = kv_heads;
  return c;
}

//! Makes `c` run the pool dry: `target_active` sequences that all join at once and step every
//! time, in a pool of `num_pages`, steps allowed to fail for lack of pages.
inline void exhaust_pool(RunCase& c, int steps, int target_active, int num_pages,
                         double release_probability) {
  c.steps = steps;
  c.target_active = target_active;
  c.num_pages = num_pages;
  c.release_probability = release_probability;
  c.join_probability = 1.0;
  c.step_probability = 1.0;
  c.allow_exhaustion = true;
}

//! Runs `cases` in order (only the first in KVC_CI_MINIMAL builds) with `Model`: no step may
//! fail; in full runs every case also ran all its steps, reached a batch of 3, and passes
//! `more_checks(case, summary)`.
template <class T, class Model, class Checks>
void run_store_cases(std::vector<RunCase> cases, std::mt19937_64& rng, Checks const& more_checks) {
#if KVC_CI_MINIMAL
  cases.resize(1);
#endif
  for (RunCase const& c : cases) {
    RunSummary const summary = run_store_case<T, Model>(c, rng);
    CHECK(summary.failed_steps == 0);
    if (!full_runs()) continue;
    CHECK(summary.steps == c.steps);
    CHECK(summary.max_batch >= 3);
    more_checks(c, summary);
  }
}

//! Compares DMC's running state of every KV head of (layer, slot) with the reference's: the sums,
//! the weight sum and the ring within `tolerance`, the group length exactly.
template <class T>
void compare_dmc_state(StoreSnapshot<T> const& snap, int layer, int slot,
                       std::vector<reference::DmcHeadState> const& want_heads, Tolerance tolerance,
                       std::string const& what) {
  int const d = snap.dims.head_dim;
  int const window = snap.dims.dmc_window;
  auto part = [](std::vector<float> const& all, std::size_t first, std::size_t count) {
    return std::vector<float>(all.begin() + static_cast<std::ptrdiff_t>(first),
                              all.begin() + static_cast<std::ptrdiff_t>(first + count));
  };
  for (int h = 0; h < snap.dims.num_kv_heads; ++h) {
    std::string const where =
        what + " slot " + std::to_string(slot) + " kv head " + std::to_string(h);
    std::size_t const head = static_cast<std::size_t>(snap.head_index(layer, slot, h));
    reference::DmcHeadState const& want = want_heads[static_cast<std::size_t>(h)];
    require_close(part(snap.k_sum, head * d, d), want.k_sum, tolerance, where + " k_sum");
    require_close(part(snap.v_sum, head * d, d), want.v_sum, tolerance, where + " v_sum");
    require_close(std::vector<float>{snap.weight_sum[head]}, std::vector<float>{want.weight_sum},
                  tolerance, where + " weight_sum");
    REQUIRE_MESSAGE(snap.group_length[head] == want.group_length, where << ": group length");
    if (window > 0) {
      std::size_t const cells = static_cast<std::size_t>(window);
      require_close(part(snap.ring_k, head * cells * d, cells * d), want.ring_k, tolerance,
                    where + " ring_k");
      require_close(part(snap.ring_v, head * cells * d, cells * d), want.ring_v, tolerance,
                    where + " ring_v");
      require_close(part(snap.ring_w, head * cells, cells), want.ring_w, tolerance,
                    where + " ring_w");
    }
  }
}

//! A head holds exactly ceil(length / page_size) pages (no spare pages after a successful step).
template <class T>
void check_exact_pages(StoreSnapshot<T> const& snap, int layer, int slot, std::string const& what) {
  for (int h = 0; h < snap.dims.num_kv_heads; ++h) {
    std::size_t const head = static_cast<std::size_t>(snap.head_index(layer, slot, h));
    int const length = snap.lengths[head];
    int const pages = (length + snap.dims.page_size - 1) / snap.dims.page_size;
    REQUIRE_MESSAGE(snap.page_counts[head] == pages, what << " slot " << slot << " kv head " << h
                                                          << ": " << snap.page_counts[head]
                                                          << " pages for " << length << " slots");
  }
}

//! Scores computed from the attention kernels' fp32 probabilities (the store prefill's column
//! sums and last rows, the decode kernels' score hook) against the reference's double-based
//! ones.
inline constexpr Tolerance kKernelScoreTolerance{1e-5, 1e-4};

//! Tokens seen and every KV head of (layer, slot) against the reference's LayerCache: lengths and
//! positions exactly, keys and values with the dtype's tolerance, scores within
//! kKernelScoreTolerance (TOVA's layer scores are in KV head 0 only).
template <class T>
void compare_cached_heads(StoreSnapshot<T> const& snap, int layer, int slot,
                          reference::LayerCache const& cache, std::string const& where) {
  REQUIRE_MESSAGE(snap.tokens_seen[static_cast<std::size_t>(snap.dims.layer_seq(layer, slot))] ==
                      cache.tokens_seen(),
                  where << ": tokens seen");
  for (int h = 0; h < snap.dims.num_kv_heads; ++h) {
    reference::HeadCache want = cache.heads()[static_cast<std::size_t>(h)];
    if (cache.kind() == PolicyKind::kTova && h > 0) want.score.clear();  // head 0 holds them
    compare_head(snap.head(layer, slot, h), want, snap.config.dtype,
                 where + " kv head " + std::to_string(h), kKernelScoreTolerance);
  }
}

//! The whole reference state of (layer, slot) against the store: compare_cached_heads, DMC's
//! running state, and exact page counts (right after a prefill or a step without eviction).
template <class T>
void compare_layer(StoreSnapshot<T> const& snap, int layer, int slot,
                   reference::LayerCache const& cache, std::string const& what) {
  std::string const where =
      what + " layer " + std::to_string(layer) + " slot " + std::to_string(slot);
  compare_cached_heads(snap, layer, slot, cache, where);
  if (auto const* dmc = std::get_if<reference::DmcLayerState>(&cache.state())) {
    compare_dmc_state(snap, layer, slot, dmc->dmc, {1e-6, 1e-6}, where);
  }
  check_exact_pages(snap, layer, slot, where);
}

//! The store after a step that must have succeeded: the step report (in `context`, or the
//! store's own) says so, and every page is accounted for.
template <class T>
StoreSnapshot<T> snapshot_after_success(PagedStore const& store, cudaStream_t stream,
                                        StepContext const* context = nullptr) {
  StepReport report;
  KVC_STATUS_REQUIRE(store.copy_step_report_async(&report, nullptr, 0, stream, context));
  KVC_CUDA_REQUIRE(cudaStreamSynchronize(stream));
  REQUIRE(step_status(report) == Status::kSuccess);
  StoreSnapshot<T> snap = take_snapshot<T>(store, stream);
  check_page_accounting(snap);
  return snap;
}

}  // namespace kvc::test
