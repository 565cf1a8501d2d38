// Decode attention over the paged per-head store (kvc::decode_attention, precompiled
// kvc_decode_instances): bf16, head dim 128, pages of 16 slots scattered at random through the
// pool, one decode step of one layer per call (plan kernel + attention kernel).
//
// Shapes (names shared with benchmarks/baselines/sdpa_decode.py for the dense ones):
//   a) full_32x32_B64_L4096                     full cache, MHA
//   b) full_32x8_B64_L4096, full_32x4_B64_L4096 full cache, GQA
//   c) mixA_32x32_B64_L4096, mixB_32x32_...     DMC-like: each (sequence, KV head) keeps L / r
//                                               slots, r in {1,2,4,8,16} with probabilities
//                                               A = {.10,.10,.30,.30,.20},
//                                               B = {.02,.05,.18,.35,.40}
//   d) mixA/mixB with GQA 32x8 and 32x4
//   e) full and mixA, MHA, B = 1, 8, 32 at L = 1024 and 4096 (eager and CUDA-graph launches)
//   f) scores_32x32_B64_L4096 / scores_32x8_...: every head at a budget of L / 4 slots with the
//      per-slot score output (H2O/TOVA) in the form the engine uses (ScoreForm::kLog2Logits:
//      logits and LSE, one write per slot), timed against the same call without it; the
//      probability form (logits rewritten once the LSE is known) is timed too.
// A shape whose (bf16, D = 128, G) kernel is not compiled (KVC_CI_MINIMAL builds only G = 4)
// reports SkipWithError.
//
// Timing: CUDA events around kCallsPerTiming back-to-back calls that rotate over several copies
// of the cache (disjoint page sets of one pool; enough copies that a round reads at least 8x
// the L2 size, so every call reads HBM, not L2); time per call = elapsed / calls. Each shape
// runs kRepetitions Google Benchmark repetitions of kTimingsPerRepetition timings (fixed
// iteration count, no min-time search), each repetition after one untimed warm-up timing; the
// median of the repetitions is reported. Counters: bytes (K+V kept + q + out), GBps,
// bw_fraction (of the streaming-read probe measured in this process at start-up), us per call,
// compression (tokens / slots kept), and for (f) scores_overhead = t(scores) / t(plain) - 1
// (log2-logit form; us is t(scores)) and scores_probabilities_overhead (probability form).
//
// Set-up is kept off the critical path: the K and V pools are allocated once, at the largest
// size any runnable shape needs, and filled on the device (support/device_fill.cuh); every shape
// uses the pool's first pages. Per shape, only the page tables (a host shuffle of at most 0.5 M
// page ids, 2 MiB), q/out/lse and the workspace are built, once for all its repetitions.
//
// Run time (ESTIMATE from bytes / bandwidth, not measured): all 35 shapes together read about
// 4 TB of K/V (warm-up and timed calls, both passes of (f)), about 1.4 s at 3 TB/s; small calls
// add tens of microseconds each; plus CUDA start-up, the probe and one 4 GiB pool fill. Expect
// roughly 3-6 s of wall time for the whole suite on an H100 (of which shape (a) alone ~0.3 s).
// Subsets (Google Benchmark regex filter):
//   --benchmark_filter='decode/(full|mixA|mixB)_32x(32|8|4)_B64_'   a-d (~0.6 s of K/V reads)
//   --benchmark_filter='decode/(full|mixA)_32x32_B(1|8|32)_'        e   (~0.6 s)
//   --benchmark_filter='decode/scores_'                              f   (~0.2 s)
// (Benchmark names carry the suffix /iterations:1/repeats:5/manual_time.)
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kvc/attention/decode_api.cuh"

#include "bandwidth.cuh"
#include "decode_layout.hpp"
#include "device_fill.cuh"

namespace {

using T = __nv_bfloat16;
constexpr int kHeadDim = 128;
constexpr int kPageSize = 16;
constexpr int kCallsPerTiming = 20;
constexpr int kRepetitions = 5;
constexpr int kTimingsPerRepetition = 1;
constexpr std::uint64_t kKSeed = 1;
constexpr std::uint64_t kVSeed = 2;
constexpr std::uint64_t kQSeed = 3;

double g_probe_gbps = 0.0;
int g_l2_bytes = 0;

using Mix = kvc::bench::DecodeMix;

char const* mix_name(Mix mix) {
  switch (mix) {
    case Mix::kFull: return "full";
    case Mix::kA: return "mixA";
    case Mix::kB: return "mixB";
    case Mix::kBudget: return "scores";
  }
  return "?";
}

struct Shape {
  Mix mix = Mix::kFull;
  int q_heads = 32;
  int kv_heads = 32;
  int batch = 64;
  int length = 4096;  // tokens per head before compression
  bool graph = false;
  int split_waves = 0;  // DecodeParams::split (0: the library default)
  int split_min_chunk = 0;
  int split_schedule = 0;  // DecodeParams::split.schedule (0: default, 2: greedy, 3: balanced)

  std::string key() const {
    return std::string(mix_name(mix)) + "_" + std::to_string(q_heads) + "x" +
           std::to_string(kv_heads) + "_B" + std::to_string(batch) + "_L" + std::to_string(length) +
           (graph ? "_graph" : "") +
           (split_waves > 0 || split_min_chunk > 0
                ? "_w" + std::to_string(split_waves) + "_c" + std::to_string(split_min_chunk)
                : "") +
           (split_schedule == 2 ? "_greedy" : "") + (split_schedule == 3 ? "_balanced" : "");
  }
  int group_size() const { return kv_heads > 0 ? q_heads / kv_heads : 0; }
  bool supported() const {
    return q_heads % kv_heads == 0 &&
           kvc::decode_attention_supported(kvc::DType::kBF16, kHeadDim, group_size());
  }
};

#define BENCH_CUDA(expr, state)                                                                    \
  do {                                                                                             \
    cudaError_t const bench_error_ = (expr);                                                       \
    if (bench_error_ != cudaSuccess) {                                                             \
      (state).SkipWithError((std::string(#expr ": ") + cudaGetErrorString(bench_error_)).c_str()); \
      return;                                                                                      \
    }                                                                                              \
  } while (0)

// Set-up helpers return an error message ("" on success) instead of touching the State.
#define SETUP_CUDA(expr)                                                 \
  do {                                                                   \
    cudaError_t const setup_error_ = (expr);                             \
    if (setup_error_ != cudaSuccess)                                     \
      return std::string(#expr ": ") + cudaGetErrorString(setup_error_); \
  } while (0)

#define SETUP_STATUS(expr)                                            \
  do {                                                                \
    kvc::Status const setup_status_ = (expr);                         \
    if (setup_status_ != kvc::Status::kSuccess)                       \
      return std::string(#expr ": ") + kvc::to_string(setup_status_); \
  } while (0)

//! One device allocation, freed on reset or destruction. Not copyable.
template <class U>
struct DeviceArray {
  U* data = nullptr;
  DeviceArray() = default;
  DeviceArray(DeviceArray const&) = delete;
  DeviceArray& operator=(DeviceArray const&) = delete;
  ~DeviceArray() { reset(); }
  void reset() {
    if (data != nullptr) cudaFree(data);
    data = nullptr;
  }
  cudaError_t allocate(std::size_t count) {
    reset();
    return cudaMalloc(reinterpret_cast<void**>(&data), std::max<std::size_t>(count, 1) * sizeof(U));
  }
};

using Layout = kvc::bench::DecodeLayout;

//! The layout of `shape` (support/decode_layout.hpp), drawn from `rng`.
Layout make_layout(Shape const& shape, int l2_bytes, std::mt19937_64& rng) {
  return kvc::bench::make_decode_layout(shape.mix, shape.batch, shape.kv_heads, shape.length,
                                        kPageSize, kHeadDim * 2.0 * sizeof(T), l2_bytes,
                                        kvc::bench::kDecodeMaxCopies, rng);
}

//! The K and V pools shared by every shape, allocated and filled once (a shape uses the first
//! num_pages() pages). `pages_wanted` is set in main: the largest need of a runnable shape.
struct Pool {
  DeviceArray<T> k;  // [pages, kPageSize, kHeadDim]
  DeviceArray<T> v;  // [pages, kPageSize, kHeadDim]
  std::size_t pages = 0;
  std::size_t pages_wanted = 0;

  //! Makes sure at least `needed` pages exist (reallocating and refilling only if not).
  std::string ensure(std::size_t needed) {
    if (pages >= needed && k.data != nullptr) return "";
    std::size_t const target = std::max(needed, pages_wanted);
    pages = 0;
    std::size_t const elems = target * kPageSize * kHeadDim;
    SETUP_CUDA(k.allocate(elems));
    SETUP_CUDA(v.allocate(elems));
    SETUP_CUDA(kvc::bench::fill_normal(k.data, elems, kKSeed));
    SETUP_CUDA(kvc::bench::fill_normal(v.data, elems, kVSeed));
    SETUP_CUDA(cudaDeviceSynchronize());
    pages = target;
    return "";
  }
  void reset() {
    k.reset();
    v.reset();
    pages = 0;
  }
};

Pool g_pool;

//! Everything one shape needs besides the pool, built once and reused by its repetitions.
struct ShapeState {
  std::string key;
  Layout layout;
  DeviceArray<std::int32_t> tables;   // [copies, batch, kv_heads, max_pages]
  DeviceArray<std::int32_t> lengths;  // [batch, kv_heads]
  DeviceArray<T> q;                   // [batch, q_heads, kHeadDim]
  DeviceArray<T> out;                 // [batch, q_heads, kHeadDim]
  DeviceArray<float> lse;             // [batch, q_heads]
  DeviceArray<float> probs;           // [batch, q_heads, probs_stride] (scores shapes only)
  DeviceArray<float> score_lse;       // [batch, q_heads] log2 LSE of the log2-logit form
  DeviceArray<unsigned char> workspace;
  int probs_stride = 0;
  std::vector<kvc::DecodeParams> calls;  // one per copy
  cudaStream_t stream = nullptr;
  cudaGraphExec_t graph_exec = nullptr;  // kCallsPerTiming plain calls (graph shapes)

  ShapeState() = default;
  ShapeState(ShapeState const&) = delete;
  ShapeState& operator=(ShapeState const&) = delete;
  ~ShapeState() {
    if (stream != nullptr) cudaStreamSynchronize(stream);
    if (graph_exec != nullptr) cudaGraphExecDestroy(graph_exec);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  //! Enqueues kCallsPerTiming calls rotating over the copies, with the score output in `form`
  //! or (`scores` false) without it.
  kvc::Status enqueue(bool scores, kvc::ScoreForm form = kvc::ScoreForm::kLog2Logits) const {
    for (int i = 0; i < kCallsPerTiming; ++i) {
      kvc::DecodeParams p = calls[i % layout.copies];
      if (scores) {
        p.scores.probs = probs.data;
        p.scores.stride = probs_stride;
        p.scores.form = form;
        p.scores.lse = score_lse.data;
      }
      kvc::Status const status = kvc::decode_attention(p, stream);
      if (status != kvc::Status::kSuccess) return status;
    }
    return kvc::Status::kSuccess;
  }
};

std::unique_ptr<ShapeState> g_state;

//! Builds `s` for `shape`: page tables scattered over the pool's first pages, q, outputs,
//! workspace, stream and (graph shapes) the captured graph.
std::string build_state(Shape const& shape, ShapeState& s) {
  s.key = shape.key();
  std::mt19937_64 rng(kvc::bench::kDecodeLayoutSeed);
  s.layout = make_layout(shape, g_l2_bytes, rng);
  Layout const& layout = s.layout;
  std::string const pool_error = g_pool.ensure(layout.num_pages());
  if (!pool_error.empty()) return pool_error;

  // Every copy's pages scattered at random through pages [0, num_pages) of the pool.
  std::size_t const table_elems = layout.lengths.size() * layout.max_pages;
  std::vector<std::int32_t> const host_tables =
      kvc::bench::scattered_page_tables(layout, kPageSize, rng);
  SETUP_CUDA(s.tables.allocate(host_tables.size()));
  SETUP_CUDA(cudaMemcpy(s.tables.data, host_tables.data(),
                        host_tables.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice));
  SETUP_CUDA(s.lengths.allocate(layout.lengths.size()));
  SETUP_CUDA(cudaMemcpy(s.lengths.data, layout.lengths.data(), layout.lengths.size() * sizeof(int),
                        cudaMemcpyHostToDevice));

  std::size_t const q_elems = static_cast<std::size_t>(shape.batch) * shape.q_heads * kHeadDim;
  SETUP_CUDA(s.q.allocate(q_elems));
  SETUP_CUDA(s.out.allocate(q_elems));
  SETUP_CUDA(kvc::bench::fill_normal(s.q.data, q_elems, kQSeed));
  SETUP_CUDA(s.lse.allocate(static_cast<std::size_t>(shape.batch) * shape.q_heads));
  s.probs_stride = layout.max_pages * kPageSize;
  if (shape.mix == Mix::kBudget) {
    SETUP_CUDA(
        s.probs.allocate(static_cast<std::size_t>(shape.batch) * shape.q_heads * s.probs_stride));
    SETUP_CUDA(s.score_lse.allocate(static_cast<std::size_t>(shape.batch) * shape.q_heads));
  }

  s.calls.assign(layout.copies, kvc::DecodeParams{});
  for (int copy = 0; copy < layout.copies; ++copy) {
    kvc::DecodeParams& p = s.calls[copy];
    p.dtype = kvc::DType::kBF16;
    p.cache.k_pages = g_pool.k.data;
    p.cache.v_pages = g_pool.v.data;
    p.cache.page_table = s.tables.data + copy * table_elems;
    p.cache.lengths = s.lengths.data;
    p.cache.page_size = kPageSize;
    p.cache.head_dim = kHeadDim;
    p.cache.num_kv_heads = shape.kv_heads;
    p.cache.max_pages_per_head = layout.max_pages;
    p.cache.max_seqs = shape.batch;
    p.q = s.q.data;
    p.seq_slots = nullptr;  // row b is sequence slot b
    p.batch = shape.batch;
    p.num_q_heads = shape.q_heads;
    p.out = s.out.data;
    p.lse = s.lse.data;
    p.split.waves = shape.split_waves;
    p.split.min_chunk = shape.split_min_chunk;
    p.split.schedule = shape.split_schedule;
  }
  std::size_t workspace_bytes = 0;
  SETUP_STATUS(kvc::decode_attention_workspace_size(s.calls[0], workspace_bytes));
  SETUP_CUDA(s.workspace.allocate(workspace_bytes));
  for (kvc::DecodeParams& p : s.calls) {
    p.workspace = s.workspace.data;
    p.workspace_bytes = workspace_bytes;
  }

  SETUP_CUDA(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  // One eager round before any capture: first-call occupancy query, module loading.
  SETUP_STATUS(s.enqueue(false));
  SETUP_CUDA(cudaStreamSynchronize(s.stream));
  if (shape.graph) {
    cudaGraph_t graph = nullptr;
    SETUP_CUDA(cudaStreamBeginCapture(s.stream, cudaStreamCaptureModeThreadLocal));
    kvc::Status const captured = s.enqueue(false);
    cudaError_t const ended = cudaStreamEndCapture(s.stream, &graph);
    if (ended == cudaSuccess && captured == kvc::Status::kSuccess) {
      cudaError_t const instantiated = cudaGraphInstantiate(&s.graph_exec, graph, 0);
      cudaGraphDestroy(graph);
      SETUP_CUDA(instantiated);
    } else {
      if (graph != nullptr) cudaGraphDestroy(graph);
      SETUP_CUDA(ended);
      SETUP_STATUS(captured);
    }
  }
  return "";
}

//! The state of `shape`: the cached one when the previous call was the same shape (its other
//! repetitions), else a new one (the previous state is released first).
std::string acquire_state(Shape const& shape) {
  if (g_state != nullptr && g_state->key == shape.key()) return "";
  g_state.reset();
  auto fresh = std::make_unique<ShapeState>();
  std::string const error = build_state(shape, *fresh);
  if (!error.empty()) return error;
  g_state = std::move(fresh);
  return "";
}

void bench_decode(benchmark::State& state, Shape shape) {
  if (!kvc::bench::cuda_device_present()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  if (!shape.supported()) {
    state.SkipWithError(("no compiled decode kernel for bf16, D=128, G=" +
                         std::to_string(shape.group_size()) + " (KVC_CI_MINIMAL build?)")
                            .c_str());
    return;
  }
  std::string const error = acquire_state(shape);
  if (!error.empty()) {
    state.SkipWithError(error.c_str());
    return;
  }
  ShapeState const& s = *g_state;
  Layout const& layout = s.layout;

  // Bytes one call must move: K and V kept, q read, out written.
  double const bytes = layout.kept * kHeadDim * 2.0 * sizeof(T) +
                       2.0 * shape.batch * shape.q_heads * kHeadDim * sizeof(T);
  kvc::bench::EventTimer timer;
  auto timed = [&](bool scores, kvc::ScoreForm form = kvc::ScoreForm::kLog2Logits) -> double {
    timer.start(s.stream);
    if (shape.graph) {
      if (cudaGraphLaunch(s.graph_exec, s.stream) != cudaSuccess) return -1.0;
    } else if (s.enqueue(scores, form) != kvc::Status::kSuccess) {
      return -1.0;
    }
    return timer.stop_seconds(s.stream) / kCallsPerTiming;
  };

  bool const with_scores = shape.mix == Mix::kBudget;
  // Warm-up timing of every repetition (page-table and instruction caches).
  constexpr kvc::ScoreForm kProbabilities = kvc::ScoreForm::kProbabilities;
  if (timed(false) < 0.0 ||
      (with_scores && (timed(true) < 0.0 || timed(true, kProbabilities) < 0.0))) {
    state.SkipWithError("decode_attention failed");
    return;
  }
  BENCH_CUDA(cudaStreamSynchronize(s.stream), state);
  double plain_total = 0.0;
  double scores_total = 0.0;
  double probabilities_total = 0.0;
  double total = 0.0;
  bool failed = false;
  for (auto _ : state) {
    double const plain = timed(false);
    double seconds = plain;
    double probabilities = 0.0;
    if (with_scores) {
      seconds = timed(true);
      probabilities = timed(true, kProbabilities);
      plain_total += plain;
      scores_total += seconds;
      probabilities_total += probabilities;
    }
    if (plain < 0.0 || seconds < 0.0 || probabilities < 0.0) {
      failed = true;
      break;
    }
    total += seconds;
    state.SetIterationTime(seconds);
  }
  if (failed) {
    state.SkipWithError("decode_attention failed");
    return;
  }
  BENCH_CUDA(cudaGetLastError(), state);

  double const iterations = static_cast<double>(state.iterations());
  double const per_call = iterations > 0.0 ? total / iterations : 0.0;
  double const gbps = per_call > 0.0 ? bytes / per_call * 1e-9 : 0.0;
  state.counters["bytes"] = bytes;
  state.counters["compression"] = layout.tokens / layout.kept;
  state.counters["copies"] = layout.copies;
  state.counters["us"] = per_call * 1e6;
  state.counters["GBps"] = gbps;
  state.counters["bw_fraction"] = g_probe_gbps > 0.0 ? gbps / g_probe_gbps : 0.0;
  state.counters["probe_GBps"] = g_probe_gbps;
  if (with_scores && plain_total > 0.0) {
    state.counters["scores_overhead"] = scores_total / plain_total - 1.0;
    state.counters["plain_us"] = plain_total / iterations * 1e6;
    state.counters["scores_us"] = scores_total / iterations * 1e6;
    state.counters["scores_probabilities_overhead"] = probabilities_total / plain_total - 1.0;
    state.counters["scores_probabilities_us"] = probabilities_total / iterations * 1e6;
  }
}

std::vector<Shape> g_shapes;

void add(Shape const& shape) {
  g_shapes.push_back(shape);
  benchmark::RegisterBenchmark(("decode/" + shape.key()).c_str(), bench_decode, shape)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond)
      ->Iterations(kTimingsPerRepetition)
      ->Repetitions(kRepetitions)
      ->ReportAggregatesOnly(true);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  // a, b
  for (int kv : {32, 8, 4}) add({Mix::kFull, 32, kv, 64, 4096, false});
  // c, d
  for (Mix mix : {Mix::kA, Mix::kB}) {
    for (int kv : {32, 8, 4}) add({mix, 32, kv, 64, 4096, false});
  }
  // e
  for (bool graph : {false, true}) {
    for (Mix mix : {Mix::kFull, Mix::kA}) {
      for (int length : {1024, 4096}) {
        for (int batch : {1, 8, 32}) add({mix, 32, 32, batch, length, graph});
      }
    }
  }
  // f
  for (int kv : {32, 8}) add({Mix::kBudget, 32, kv, 64, 4096, false});
  // Diagnostics of (b): GQA over context lengths (a fixed per-call cost shows as the intercept
  // of time against bytes), graph-launched and eager.
  for (int kv : {8, 4}) {
    for (int length : {1024, 2048, 8192}) add({Mix::kFull, 32, kv, 64, length, false});
    add({Mix::kFull, 32, kv, 64, 4096, true});
  }

  // Split policy (DecodeParams::split) against the default: every shape above once more with
  // the greedy schedule, with larger chunks (min_chunk 1024; also greedy), and the small calls
  // and ragged MHA with the old default (4 waves, 64; also greedy).
  std::vector<Shape> const main_shapes = g_shapes;
  for (Shape shape : main_shapes) {
    if (shape.graph) continue;
    shape.split_schedule = 3;  // balanced shares, default minimum (256 slots), and 64
    add(shape);
    shape.split_min_chunk = 64;
    add(shape);
    shape.split_min_chunk = 0;
    shape.split_schedule = 2;
    add(shape);
    shape.split_schedule = 0;
    shape.split_waves = 1;
    shape.split_min_chunk = 1024;
    add(shape);
    shape.split_schedule = 2;
    add(shape);
    if (shape.batch <= 8 || (shape.mix != Mix::kFull && shape.kv_heads == shape.q_heads)) {
      shape.split_schedule = 0;
      shape.split_waves = 4;
      shape.split_min_chunk = 64;
      add(shape);
      shape.split_schedule = 2;
      add(shape);
    }
  }

  if (kvc::bench::cuda_device_present()) {
    g_probe_gbps = kvc::bench::measure_read_bandwidth();
    benchmark::AddCustomContext("probe_read_GBps", std::to_string(g_probe_gbps));
    int device = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&g_l2_bytes, cudaDevAttrL2CacheSize, device);
    // The pool is sized once for the largest runnable shape (allocated on first use).
    for (Shape const& shape : g_shapes) {
      if (!shape.supported()) continue;
      std::mt19937_64 rng(kvc::bench::kDecodeLayoutSeed);
      g_pool.pages_wanted =
          std::max(g_pool.pages_wanted, make_layout(shape, g_l2_bytes, rng).num_pages());
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  g_state.reset();
  g_pool.reset();
  benchmark::Shutdown();
  return 0;
}
