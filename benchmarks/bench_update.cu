// Cost of the paged store's per-step work for one Llama-2-7B-shaped layer (32 query heads,
// 32 KV heads, head dim 128, bf16, pages of 16): prepare_decode_step + update, and the evict
// kernel for H2O/TOVA (budget 1024, fed with synthetic probabilities), at batch 1 to 256.
//
// Timing: CUDA events around 16 back-to-back decode steps, either replayed from a CUDA graph
// ("graph": kernel time plus the gaps between kernels) or launched eagerly from the host
// ("eager": what an engine without graphs pays, launch overhead included). The reported time is
// per decode step. Full and DMC caches grow by one slot per step and are reset (untimed) every
// 1008 steps; H2O/TOVA caches are filled to their budget before timing.
//
// Counters: us_per_step, bytes_per_step (an estimate of the minimum traffic, see
// docs/paged_store.md), GBps achieved, bw_fraction (of the streaming-read probe measured at
// start-up in this process), and attn_ratio_1k = step time / the time to read the layer's K and
// V at 1024 slots per head at probe bandwidth (the floor of the decode attention step; the
// issue's target is under 5 %).
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include "kvc/attention/score_hook.hpp"
#include "kvc/cache/paged_store.cuh"

#include "bandwidth.cuh"

namespace {

using T = __nv_bfloat16;

constexpr int kQHeads = 32;
constexpr int kKvHeads = 32;
constexpr int kHeadDim = 128;
constexpr int kPageSize = 16;
constexpr int kBudget = 1024;        // H2O (512 heavy + 512 recent) and TOVA
constexpr int kStepsPerTiming = 16;  // decode steps between two events
constexpr int kGrowCap = 1008;       // Full/DMC: reset after this many steps (multiple of 16)
constexpr int kInputSets = 4;        // rotating q/k/v sets (DMC decisions differ between sets)
constexpr int kAttentionSlots = 1024;

double g_probe_gbps = 0.0;

#define BENCH_CHECK(expr, state)                     \
  do {                                               \
    if (!(expr)) {                                   \
      (state).SkipWithError("setup failed: " #expr); \
      return;                                        \
    }                                                \
  } while (0)

//! Estimated minimum bytes one decode step moves (reads + writes) for `kind` at `batch`.
double bytes_per_step(kvc::PolicyKind kind, int batch) {
  double const b = batch;
  double const elem = sizeof(T);
  double const heads = b * kKvHeads;
  double bytes = 0.0;
  bytes += 2.0 * b * kQHeads * kHeadDim * elem;  // q read, q_out written
  bytes += 2.0 * heads * kHeadDim * elem;        // k, v read
  bytes += 2.0 * heads * kHeadDim * elem;        // k, v slot written
  bytes += heads * (8.0 + 8.0 + 4.0 +
                    4.0);  // prepare: length, count; update: length r/w, page id, position
  if (kind == kvc::PolicyKind::kDmc) {
    bytes += heads * kHeadDim * 4.0 * 2.0 * 2.0;  // k_sum, v_sum read and written
    bytes += heads * kHeadDim * 4.0 * 2.0;        // ring cell of k and v written
    bytes += heads * 4.0 * 5.0;                   // weight sum r/w, ring w, group length r/w
  }
  double const slots = kBudget + 1;
  if (kind == kvc::PolicyKind::kH2O) {
    bytes += b * kQHeads * slots * 4.0;              // probabilities read
    bytes += heads * slots * (4.0 + 4.0 + 4.0);      // scores read and written, positions read
    bytes += heads * (2.0 * 2.0 * kHeadDim * elem);  // newcomer's k, v moved onto the victim
  }
  if (kind == kvc::PolicyKind::kTova) {
    bytes += b * kQHeads * slots * 4.0;              // probabilities read
    bytes += b * slots * (4.0 + 4.0);                // layer scores written, positions read
    bytes += heads * (2.0 * 2.0 * kHeadDim * elem);  // newcomer moved in every KV head
  }
  return bytes;
}

//! Random bf16 values; for DMC the decision neuron (D-1) merges with probability 3/4.
std::vector<T> random_inputs(std::mt19937_64& rng, std::size_t count, bool dmc_keys) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<T> values(count);
  for (std::size_t i = 0; i < count; ++i) {
    float value = normal(rng);
    if (dmc_keys && i % kHeadDim == kHeadDim - 1) value = unit(rng) < 0.75f ? 6.0f : 3.0f;
    values[i] = __float2bfloat16_rn(value);
  }
  return values;
}

//! Device allocations of one benchmark, freed on scope exit.
struct DeviceMemory {
  std::vector<void*> blocks;
  ~DeviceMemory() {
    for (void* block : blocks) cudaFree(block);
  }
  template <class U>
  U* alloc(std::size_t count) {
    void* block = nullptr;
    if (cudaMalloc(&block, count * sizeof(U)) != cudaSuccess) return nullptr;
    blocks.push_back(block);
    return static_cast<U*>(block);
  }
};

void bench_update(benchmark::State& state, kvc::PolicyKind kind, int batch, bool graph) {
  if (!kvc::bench::cuda_device_present()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  kvc::PagedStoreConfig config;
  config.shape = kvc::ModelShape{1, kQHeads, kKvHeads, kHeadDim};
  config.dtype = kvc::DType::kBF16;
  config.page_size = kPageSize;
  config.max_seqs = batch;
  config.policy.kind = kind;
  config.policy.dmc = kvc::DmcConfig::checkpoint();
  config.policy.h2o = kvc::H2OConfig{kBudget / 2, kBudget / 2};
  config.policy.tova = kvc::TovaConfig{kBudget, false};
  bool const evicts = config.has_scores();
  int const longest = evicts ? kBudget + 1 : kGrowCap;
  config.max_pages_per_head = (longest + kPageSize - 1) / kPageSize;
  config.num_pages = batch * kKvHeads * config.max_pages_per_head;

  cudaStream_t stream = nullptr;
  BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess, state);
  struct StreamGuard {
    cudaStream_t stream;
    ~StreamGuard() { cudaStreamDestroy(stream); }
  } stream_guard{stream};
  DeviceMemory memory;
  std::size_t bytes = 0;
  BENCH_CHECK(kvc::PagedStore::required_bytes(config, bytes) == kvc::Status::kSuccess, state);
  void* buffer = memory.alloc<unsigned char>(bytes);
  BENCH_CHECK(buffer != nullptr, state);
  kvc::PagedStore store;
  BENCH_CHECK(store.init(config, buffer, bytes, stream) == kvc::Status::kSuccess, state);
  std::vector<std::int32_t> slots(static_cast<std::size_t>(batch));
  for (std::int32_t& slot : slots) {
    int added = -1;
    BENCH_CHECK(store.add_sequence(added, stream) == kvc::Status::kSuccess, state);
    slot = added;
  }
  std::int32_t* slots_dev = memory.alloc<std::int32_t>(slots.size());
  BENCH_CHECK(slots_dev != nullptr, state);
  cudaMemcpy(slots_dev, slots.data(), slots.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice);

  std::size_t const q_count = static_cast<std::size_t>(batch) * kQHeads * kHeadDim;
  std::size_t const kv_count = static_cast<std::size_t>(batch) * kKvHeads * kHeadDim;
  std::mt19937_64 rng(1234);
  T* q[kInputSets];
  T* k[kInputSets];
  T* v[kInputSets];
  for (int set = 0; set < kInputSets; ++set) {
    q[set] = memory.alloc<T>(q_count);
    k[set] = memory.alloc<T>(kv_count);
    v[set] = memory.alloc<T>(kv_count);
    BENCH_CHECK(q[set] != nullptr && k[set] != nullptr && v[set] != nullptr, state);
    std::vector<T> const host_q = random_inputs(rng, q_count, false);
    std::vector<T> const host_k = random_inputs(rng, kv_count, kind == kvc::PolicyKind::kDmc);
    std::vector<T> const host_v = random_inputs(rng, kv_count, false);
    cudaMemcpy(q[set], host_q.data(), q_count * sizeof(T), cudaMemcpyHostToDevice);
    cudaMemcpy(k[set], host_k.data(), kv_count * sizeof(T), cudaMemcpyHostToDevice);
    cudaMemcpy(v[set], host_v.data(), kv_count * sizeof(T), cudaMemcpyHostToDevice);
  }
  T* q_out = memory.alloc<T>(q_count);
  BENCH_CHECK(q_out != nullptr, state);
  kvc::ScoreHook hook;
  if (evicts) {
    std::size_t const probs_count = static_cast<std::size_t>(batch) * kQHeads * (kBudget + 1);
    std::vector<float> host_probs(probs_count);
    std::uniform_real_distribution<float> probability(0.0f, 2.0f / (kBudget + 1));
    for (float& p : host_probs) p = probability(rng);
    hook.probs = memory.alloc<float>(probs_count);
    hook.stride = kBudget + 1;
    BENCH_CHECK(hook.probs != nullptr, state);
    cudaMemcpy(hook.probs, host_probs.data(), probs_count * sizeof(float), cudaMemcpyHostToDevice);
  }

  bool launch_ok = true;
  auto enqueue_step = [&](int set) {
    launch_ok =
        launch_ok && store.prepare_decode_step(slots_dev, batch, stream) == kvc::Status::kSuccess;
    launch_ok = launch_ok && store.update<T>(0, q[set], k[set], v[set], slots_dev, batch, q_out,
                                             stream) == kvc::Status::kSuccess;
    if (evicts)
      launch_ok =
          launch_ok && store.evict(0, hook, slots_dev, batch, stream) == kvc::Status::kSuccess;
  };
  auto enqueue_steps = [&]() {
    for (int step = 0; step < kStepsPerTiming; ++step) enqueue_step(step % kInputSets);
  };
  auto reset = [&]() {
    for (std::int32_t slot : slots) {
      int again = -1;
      launch_ok = launch_ok && store.release_sequence(slot, stream) == kvc::Status::kSuccess;
      launch_ok =
          launch_ok && store.add_sequence(again, stream) == kvc::Status::kSuccess && again == slot;
    }
  };
  if (evicts) {
    for (int step = 0; step < kBudget + kStepsPerTiming; ++step) enqueue_step(step % kInputSets);
  }
  BENCH_CHECK(cudaStreamSynchronize(stream) == cudaSuccess && launch_ok, state);
  BENCH_CHECK(store.step_status_sync(stream) == kvc::Status::kSuccess, state);

  struct GraphGuard {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    ~GraphGuard() {
      if (exec != nullptr) cudaGraphExecDestroy(exec);
      if (graph != nullptr) cudaGraphDestroy(graph);
    }
  } graph_guard;
  if (graph) {
    BENCH_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess,
                state);
    enqueue_steps();
    BENCH_CHECK(cudaStreamEndCapture(stream, &graph_guard.graph) == cudaSuccess && launch_ok,
                state);
    BENCH_CHECK(cudaGraphInstantiate(&graph_guard.exec, graph_guard.graph, 0) == cudaSuccess,
                state);
  }
  auto run_steps = [&]() {
    if (graph) {
      launch_ok = launch_ok && cudaGraphLaunch(graph_guard.exec, stream) == cudaSuccess;
    } else {
      enqueue_steps();
    }
  };
  run_steps();  // warm-up: module loading, graph upload
  BENCH_CHECK(cudaStreamSynchronize(stream) == cudaSuccess && launch_ok, state);

  kvc::bench::EventTimer timer;
  int steps_since_reset = kStepsPerTiming;
  double total_seconds = 0.0;
  std::int64_t total_steps = 0;
  for (auto _ : state) {
    if (!evicts && steps_since_reset + kStepsPerTiming > kGrowCap) {
      reset();
      cudaStreamSynchronize(stream);
      steps_since_reset = 0;
    }
    timer.start(stream);
    run_steps();
    double const seconds = timer.stop_seconds(stream);
    steps_since_reset += kStepsPerTiming;
    total_seconds += seconds;
    total_steps += kStepsPerTiming;
    state.SetIterationTime(seconds / kStepsPerTiming);
  }
  if (!launch_ok || store.step_status_sync(stream) != kvc::Status::kSuccess) {
    state.SkipWithError("a decode step failed");
    return;
  }
  double const step_seconds =
      total_steps > 0 ? total_seconds / static_cast<double>(total_steps) : 0.0;
  double const moved = bytes_per_step(kind, batch);
  double const attention_bytes =
      static_cast<double>(batch) * kKvHeads * kAttentionSlots * kHeadDim * sizeof(T) * 2.0;
  state.counters["us_per_step"] = step_seconds * 1e6;
  state.counters["bytes_per_step"] = moved;
  state.counters["GBps"] = step_seconds > 0.0 ? moved / step_seconds * 1e-9 : 0.0;
  state.counters["bw_fraction"] =
      step_seconds > 0.0 && g_probe_gbps > 0.0 ? moved / step_seconds * 1e-9 / g_probe_gbps : 0.0;
  state.counters["attn_ratio_1k"] =
      g_probe_gbps > 0.0 ? step_seconds / (attention_bytes / (g_probe_gbps * 1e9)) : 0.0;
  state.counters["probe_GBps"] = g_probe_gbps;
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (kvc::bench::cuda_device_present()) {
    g_probe_gbps = kvc::bench::measure_read_bandwidth();
    benchmark::AddCustomContext("probe_read_GBps", std::to_string(g_probe_gbps));
  }
  struct Policy {
    kvc::PolicyKind kind;
    char const* name;
  };
  Policy const policies[] = {{kvc::PolicyKind::kFull, "full"},
                             {kvc::PolicyKind::kDmc, "dmc"},
                             {kvc::PolicyKind::kH2O, "h2o_1024"},
                             {kvc::PolicyKind::kTova, "tova_1024"}};
  for (bool graph : {true, false}) {
    for (Policy const& policy : policies) {
      for (int batch : {1, 8, 32, 64, 128, 256}) {
        std::string const name = std::string("update/") + policy.name + "/" +
                                 (graph ? "graph" : "eager") + "/batch:" + std::to_string(batch);
        // A fixed iteration count (each iteration is 16 steps) runs the setup once per benchmark.
        int const iterations = batch <= 8 ? 1000 : batch <= 64 ? 400 : 150;
        benchmark::RegisterBenchmark(name.c_str(), bench_update, policy.kind, batch, graph)
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond)
            ->Iterations(iterations);
      }
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
