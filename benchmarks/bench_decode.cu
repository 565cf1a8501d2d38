// Decode attention over the paged per-head store (kvc::decode_attention, precompiled
// kvc_decode_instances): bf16, head dim 128, pages of 16 slots scattered at random through the
// pool, one decode step of one layer per call (plan kernel + attention kernel).
//
// Shapes (names shared with benchmarks/baselines/sdpa_decode.py for the dense ones):
//   a) full_32x32_B64_L4096                     full cache, MHA
//   b) full_32x8_B64_L4096, full_32x4_B64_L4096 full cache, GQA
//   c) mixA_32x32_B64_L4096, mixB_32x32_...     DMC-like: each (sequence, KV head) keeps L / r
//                                               slots, r in {1,2,4,8,16} with probabilities
//                                               A = {.10,.10,.30,.30,.20}, B = {.02,.05,.18,.35,.40}
//   d) mixA/mixB with GQA 32x8 and 32x4
//   e) full and mixA, MHA, B = 1, 8, 32 at L = 1024 and 4096 (eager and CUDA-graph launches)
//   f) scores_32x32_B64_L4096 / scores_32x8_...: every head at a budget of L / 4 slots with the
//      per-slot probability output (H2O/TOVA), timed against the same call without it.
//
// Timing: CUDA events around kCallsPerTiming back-to-back calls that rotate over several copies
// of the cache (disjoint page sets of one pool; enough copies that a round reads at least 8x
// the L2 size, so every call reads HBM, not L2); time per call = elapsed / calls; Google
// Benchmark repetitions report the median. Counters: bytes (K+V kept + q + out), GBps,
// bw_fraction (of the streaming-read probe measured in this process at start-up), us per call,
// compression (tokens / slots kept), and for (f) scores_overhead = t(scores) / t(plain) - 1.
#include <benchmark/benchmark.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bandwidth.cuh"
#include "kvc/attention/decode_api.cuh"

namespace {

using T = __nv_bfloat16;
constexpr int kHeadDim = 128;
constexpr int kPageSize = 16;
constexpr int kCallsPerTiming = 20;
constexpr int kMaxCopies = 64;

double g_probe_gbps = 0.0;

enum class Mix { kFull, kA, kB, kBudget };

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

  std::string key() const {
    return std::string(mix_name(mix)) + "_" + std::to_string(q_heads) + "x" + std::to_string(kv_heads) + "_B" +
           std::to_string(batch) + "_L" + std::to_string(length) + (graph ? "_graph" : "");
  }
};

#define BENCH_CUDA(expr, state)                                                       \
  do {                                                                                \
    cudaError_t const bench_error_ = (expr);                                          \
    if (bench_error_ != cudaSuccess) {                                                \
      (state).SkipWithError((std::string(#expr ": ") + cudaGetErrorString(bench_error_)).c_str()); \
      return;                                                                         \
    }                                                                                 \
  } while (0)

#define BENCH_STATUS(expr, state)                                                     \
  do {                                                                                \
    kvc::Status const bench_status_ = (expr);                                         \
    if (bench_status_ != kvc::Status::kSuccess) {                                     \
      (state).SkipWithError((std::string(#expr ": ") + kvc::to_string(bench_status_)).c_str()); \
      return;                                                                         \
    }                                                                                 \
  } while (0)

//! Fills `count` bf16 values with a hash of the index in [-1, 1) (pools of gigabytes, no host copy).
__global__ void fill_kernel(T* data, std::size_t count, std::uint32_t seed) {
  std::size_t const stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    std::uint32_t x = static_cast<std::uint32_t>(i) * 0x9e3779b9u ^ static_cast<std::uint32_t>(i >> 32) ^ seed;
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    data[i] = __float2bfloat16_rn(static_cast<float>(x >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
}

template <class U>
struct DeviceArray {
  U* data = nullptr;
  ~DeviceArray() {
    if (data != nullptr) cudaFree(data);
  }
  cudaError_t allocate(std::size_t count) { return cudaMalloc(reinterpret_cast<void**>(&data), std::max<std::size_t>(count, 1) * sizeof(U)); }
};

//! Lengths per (sequence, KV head) for `shape`; returns tokens seen (for the compression ratio).
std::vector<int> make_lengths(Shape const& shape, std::mt19937_64& rng, double& tokens) {
  std::vector<int> lengths(static_cast<std::size_t>(shape.batch) * shape.kv_heads);
  std::vector<double> weights;
  if (shape.mix == Mix::kA) weights = {0.10, 0.10, 0.30, 0.30, 0.20};
  if (shape.mix == Mix::kB) weights = {0.02, 0.05, 0.18, 0.35, 0.40};
  std::discrete_distribution<int> ratio(weights.begin(), weights.end());
  tokens = static_cast<double>(lengths.size()) * shape.length;
  for (int& length : lengths) {
    if (shape.mix == Mix::kFull) length = shape.length;
    if (shape.mix == Mix::kBudget) length = shape.length / 4;
    if (shape.mix == Mix::kA || shape.mix == Mix::kB) length = shape.length >> ratio(rng);
  }
  return lengths;
}

void bench_decode(benchmark::State& state, Shape shape) {
  if (!kvc::bench::cuda_device_present()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  std::mt19937_64 rng(20261123);
  double tokens = 0.0;
  std::vector<int> const lengths = make_lengths(shape, rng, tokens);
  double const kept = std::accumulate(lengths.begin(), lengths.end(), 0.0);
  int max_length = *std::max_element(lengths.begin(), lengths.end());
  int const max_pages = (max_length + kPageSize - 1) / kPageSize;
  std::size_t pages_per_copy = 0;
  for (int length : lengths) pages_per_copy += static_cast<std::size_t>((length + kPageSize - 1) / kPageSize);

  // Bytes one call must move: K and V kept, q read, out written.
  double const bytes = kept * kHeadDim * 2.0 * sizeof(T) + 2.0 * shape.batch * shape.q_heads * kHeadDim * sizeof(T);
  int device = 0;
  int l2_bytes = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device);
  double const kv_bytes = kept * kHeadDim * 2.0 * sizeof(T);
  int const copies = std::clamp(static_cast<int>(8.0 * l2_bytes / kv_bytes) + 1, 1, kMaxCopies);

  // One pool, every copy's pages scattered through it at random.
  std::size_t const num_pages = pages_per_copy * copies;
  std::size_t const pool_elems = num_pages * kPageSize * kHeadDim;
  DeviceArray<T> k_pool, v_pool, q, out;
  DeviceArray<std::int32_t> tables, d_lengths;
  DeviceArray<float> lse, probs;
  DeviceArray<unsigned char> workspace;
  BENCH_CUDA(k_pool.allocate(pool_elems), state);
  BENCH_CUDA(v_pool.allocate(pool_elems), state);
  fill_kernel<<<1024, 256>>>(k_pool.data, pool_elems, 1u);
  fill_kernel<<<1024, 256>>>(v_pool.data, pool_elems, 2u);
  std::size_t const q_elems = static_cast<std::size_t>(shape.batch) * shape.q_heads * kHeadDim;
  BENCH_CUDA(q.allocate(q_elems), state);
  BENCH_CUDA(out.allocate(q_elems), state);
  fill_kernel<<<64, 256>>>(q.data, q_elems, 3u);
  BENCH_CUDA(lse.allocate(static_cast<std::size_t>(shape.batch) * shape.q_heads), state);
  int const probs_stride = max_pages * kPageSize;
  if (shape.mix == Mix::kBudget) {
    BENCH_CUDA(probs.allocate(static_cast<std::size_t>(shape.batch) * shape.q_heads * probs_stride), state);
  }

  std::vector<std::int32_t> permutation(num_pages);
  std::iota(permutation.begin(), permutation.end(), 0);
  std::shuffle(permutation.begin(), permutation.end(), rng);
  std::size_t const table_elems = lengths.size() * max_pages;
  std::vector<std::int32_t> host_tables(table_elems * copies, 0);
  std::size_t next = 0;
  for (int copy = 0; copy < copies; ++copy) {
    for (std::size_t head = 0; head < lengths.size(); ++head) {
      int const pages = (lengths[head] + kPageSize - 1) / kPageSize;
      for (int j = 0; j < pages; ++j) host_tables[copy * table_elems + head * max_pages + j] = permutation[next++];
    }
  }
  BENCH_CUDA(tables.allocate(host_tables.size()), state);
  BENCH_CUDA(cudaMemcpy(tables.data, host_tables.data(), host_tables.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice), state);
  BENCH_CUDA(d_lengths.allocate(lengths.size()), state);
  BENCH_CUDA(cudaMemcpy(d_lengths.data, lengths.data(), lengths.size() * sizeof(int), cudaMemcpyHostToDevice), state);

  std::vector<kvc::DecodeParams> calls(copies);
  for (int copy = 0; copy < copies; ++copy) {
    kvc::DecodeParams& p = calls[copy];
    p.dtype = kvc::DType::kBF16;
    p.cache.k_pages = k_pool.data;
    p.cache.v_pages = v_pool.data;
    p.cache.page_table = tables.data + copy * table_elems;
    p.cache.lengths = d_lengths.data;
    p.cache.page_size = kPageSize;
    p.cache.head_dim = kHeadDim;
    p.cache.num_kv_heads = shape.kv_heads;
    p.cache.max_pages_per_head = max_pages;
    p.cache.max_seqs = shape.batch;
    p.q = q.data;
    p.seq_slots = nullptr;  // row b is sequence slot b
    p.batch = shape.batch;
    p.num_q_heads = shape.q_heads;
    p.out = out.data;
    p.lse = lse.data;
  }
  std::size_t workspace_bytes = 0;
  BENCH_STATUS(kvc::decode_attention_workspace_size(calls[0], workspace_bytes), state);
  BENCH_CUDA(workspace.allocate(workspace_bytes), state);
  for (kvc::DecodeParams& p : calls) {
    p.workspace = workspace.data;
    p.workspace_bytes = workspace_bytes;
  }

  cudaStream_t stream = nullptr;
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), state);
  auto enqueue = [&](bool scores) {
    for (int i = 0; i < kCallsPerTiming; ++i) {
      kvc::DecodeParams p = calls[i % copies];
      if (scores) {
        p.scores.probs = probs.data;
        p.scores.stride = probs_stride;
      }
      kvc::Status const status = kvc::decode_attention(p, stream);
      if (status != kvc::Status::kSuccess) return status;
    }
    return kvc::Status::kSuccess;
  };
  cudaGraphExec_t graph_exec = nullptr;
  if (shape.graph) {
    cudaGraph_t graph = nullptr;
    BENCH_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), state);
    kvc::Status const captured = enqueue(false);
    BENCH_CUDA(cudaStreamEndCapture(stream, &graph), state);
    BENCH_STATUS(captured, state);
    BENCH_CUDA(cudaGraphInstantiate(&graph_exec, graph, 0), state);
    cudaGraphDestroy(graph);
  }
  auto timed = [&](bool scores, kvc::bench::EventTimer& timer) -> double {
    timer.start(stream);
    if (shape.graph) {
      cudaGraphLaunch(graph_exec, stream);
    } else if (enqueue(scores) != kvc::Status::kSuccess) {
      return -1.0;
    }
    return timer.stop_seconds(stream) / kCallsPerTiming;
  };

  kvc::bench::EventTimer timer;
  bool const with_scores = shape.mix == Mix::kBudget;
  // Warm-up (first-call occupancy query, page-table and instruction caches).
  if (timed(false, timer) < 0.0 || (with_scores && timed(true, timer) < 0.0)) {
    state.SkipWithError("decode_attention failed");
    return;
  }
  BENCH_CUDA(cudaStreamSynchronize(stream), state);
  double plain_total = 0.0;
  double scores_total = 0.0;
  double total = 0.0;
  for (auto _ : state) {
    double const plain = timed(false, timer);
    double seconds = plain;
    if (with_scores) {
      seconds = timed(true, timer);
      plain_total += plain;
      scores_total += seconds;
    }
    total += seconds;
    state.SetIterationTime(seconds);
  }
  BENCH_CUDA(cudaGetLastError(), state);
  if (graph_exec != nullptr) cudaGraphExecDestroy(graph_exec);
  cudaStreamDestroy(stream);

  double const iterations = static_cast<double>(state.iterations());
  double const per_call = iterations > 0.0 ? total / iterations : 0.0;
  double const gbps = per_call > 0.0 ? bytes / per_call * 1e-9 : 0.0;
  state.counters["bytes"] = bytes;
  state.counters["compression"] = tokens / kept;
  state.counters["copies"] = copies;
  state.counters["us"] = per_call * 1e6;
  state.counters["GBps"] = gbps;
  state.counters["bw_fraction"] = g_probe_gbps > 0.0 ? gbps / g_probe_gbps : 0.0;
  state.counters["probe_GBps"] = g_probe_gbps;
  if (with_scores && plain_total > 0.0) {
    state.counters["scores_overhead"] = scores_total / plain_total - 1.0;
    state.counters["plain_us"] = plain_total / iterations * 1e6;
    state.counters["scores_us"] = scores_total / iterations * 1e6;
  }
}

void add(Shape const& shape) {
  benchmark::RegisterBenchmark(("decode/" + shape.key()).c_str(), bench_decode, shape)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(0.2)
      ->Repetitions(5)
      ->ReportAggregatesOnly(true);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (kvc::bench::cuda_device_present()) {
    g_probe_gbps = kvc::bench::measure_read_bandwidth();
    benchmark::AddCustomContext("probe_read_GBps", std::to_string(g_probe_gbps));
  }
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
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
