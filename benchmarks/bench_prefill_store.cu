// Store-side prefill (kvc/cache/prefill.cuh) of one layer: prepare_prefill (page allocation) +
// prefill_layer (prepare kernel, prefill attention, commit kernel), DMC (checkpoint mode, about
// 70 % of tokens merging) and Full, bf16, 32 query heads = 32 KV heads, head dim 128, pages of
// 16 slots, first chunks of batch x length = 1 x 4096, 8 x 2048, 32 x 512.
//
// The attention is the header-only PrefillAttention<DefaultVariant, bf16, 128, 1>
// (kvc/attention/prefill.cuh), so this binary needs no precompiled instance library. Each shape
// is timed twice: the whole prefill ("prefill") and the store work alone ("store": the same calls
// with an attention that does nothing), so store_share = store / prefill is the cost of the
// allocation, prepare and commit next to the attention.
//
// Timing: CUDA events around one prefill of the whole batch (one layer); between timings the
// sequences are released and re-added (untimed), so every timing starts from empty caches. Each
// shape runs kRepetitions Google Benchmark repetitions of one timing after an untimed warm-up;
// the median is reported. Counters: us, tokens_per_s, TFLOPs (causal attention FLOPs
// 4 * Hq * D * T (T + 1) / 2 per chunk, also for DMC whose mask hides keys but whose kernel
// still visits the causal tiles), store_us, store_share, compression (DMC: tokens / slots).
// Measured on an H200: benchmarks/RESULTS.md.
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kvc/attention/prefill.cuh"
#include "kvc/cache/prefill.cuh"

#include "bandwidth.cuh"
#include "device_fill.cuh"

namespace {

using T = __nv_bfloat16;
constexpr int kHeads = 32;
constexpr int kHeadDim = 128;
constexpr int kPageSize = 16;
constexpr int kRepetitions = 5;
using Attention = kvc::PrefillAttention<kvc::DefaultVariant, T, kHeadDim, 1>;

//! An attention that does nothing: times the store's share of a prefill.
struct NoAttention {
  static kvc::Status workspace_size(kvc::PrefillParams const&, std::size_t& bytes) {
    bytes = 0;
    return kvc::Status::kSuccess;
  }
  static kvc::Status run(kvc::PrefillParams const&, cudaStream_t) { return kvc::Status::kSuccess; }
};

struct Shape {
  kvc::PolicyKind kind;
  int batch;
  int length;
  std::string key() const {
    return std::string(kvc::policy_name(kind)) + "_" + std::to_string(batch) + "x" +
           std::to_string(length);
  }
};

//! Device memory freed on destruction.
struct DeviceMemory {
  void* data = nullptr;
  explicit DeviceMemory(std::size_t bytes) {
    if (cudaMalloc(&data, bytes > 0 ? bytes : 1) != cudaSuccess) data = nullptr;
  }
  DeviceMemory(DeviceMemory const&) = delete;
  DeviceMemory& operator=(DeviceMemory const&) = delete;
  ~DeviceMemory() {
    if (data != nullptr) cudaFree(data);
  }
};

//! Sets k[., ., D-1] so that a token merges with probability about `merge` (DMC decisions):
//! the decision neuron is offset (5) + 1 or offset - 1 by a fixed pattern.
__global__ void shape_decisions_kernel(T* k, std::int64_t rows, int merge_percent) {
  for (std::int64_t r = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::uint64_t const hash = kvc::bench::detail::splitmix64(static_cast<std::uint64_t>(r) + 77);
    bool const merge = static_cast<int>(hash % 100) < merge_percent;
    k[r * kHeadDim + kHeadDim - 1] = __float2bfloat16(merge ? 6.0f : 4.0f);
  }
}

template <class Attn>
kvc::Status enqueue(kvc::PagedStore& store, kvc::PrefillBatch const& chunks, T const* q, T const* k,
                    T const* v, T* out, float* lse, void* workspace, std::size_t bytes,
                    cudaStream_t stream) {
  KVC_RETURN_IF_ERROR(kvc::prepare_prefill(store, chunks, stream));
  return kvc::prefill_layer<T, Attn>(store, 0, q, k, v, chunks, out, lse, workspace, bytes, stream);
}

void bench_prefill(benchmark::State& state, Shape shape) {
  if (!kvc::bench::cuda_device_present()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  int const tokens = shape.batch * shape.length;
  kvc::PagedStoreConfig config;
  config.shape = kvc::ModelShape{1, kHeads, kHeads, kHeadDim};
  config.dtype = kvc::DType::kBF16;
  config.page_size = kPageSize;
  config.max_seqs = shape.batch;
  config.max_pages_per_head = (shape.length + kPageSize - 1) / kPageSize + 1;
  config.num_pages = shape.batch * kHeads * config.max_pages_per_head;
  config.policy.kind = shape.kind;
  std::size_t store_bytes = 0;
  if (kvc::PagedStore::required_bytes(config, store_bytes) != kvc::Status::kSuccess) {
    state.SkipWithError("bad store config");
    return;
  }
  cudaStream_t stream = nullptr;
  cudaStreamCreate(&stream);
  DeviceMemory store_memory(store_bytes);
  std::size_t const q_elems = static_cast<std::size_t>(tokens) * kHeads * kHeadDim;
  DeviceMemory q(q_elems * sizeof(T)), k(q_elems * sizeof(T)), v(q_elems * sizeof(T)),
      out(q_elems * sizeof(T)), lse(static_cast<std::size_t>(tokens) * kHeads * sizeof(float));
  DeviceMemory slots(sizeof(std::int32_t) * shape.batch),
      cu(sizeof(std::int32_t) * (shape.batch + 1));
  kvc::PagedStore store;
  std::string error;
  if (store_memory.data == nullptr || q.data == nullptr || k.data == nullptr || v.data == nullptr ||
      out.data == nullptr || lse.data == nullptr) {
    error = "cudaMalloc failed";
  } else if (store.init(config, store_memory.data, store_bytes, stream) != kvc::Status::kSuccess) {
    error = "store init failed";
  }
  std::vector<std::int32_t> host_slots(static_cast<std::size_t>(shape.batch));
  std::vector<std::int32_t> host_cu(static_cast<std::size_t>(shape.batch) + 1);
  for (int b = 0; b < shape.batch && error.empty(); ++b) {
    int slot = 0;
    if (store.add_sequence(slot, stream) != kvc::Status::kSuccess) error = "add_sequence failed";
    host_slots[static_cast<std::size_t>(b)] = slot;
    host_cu[static_cast<std::size_t>(b) + 1] = (b + 1) * shape.length;
  }
  kvc::PrefillBatch const chunks{static_cast<std::int32_t*>(slots.data),
                                 static_cast<std::int32_t*>(cu.data), shape.batch, tokens,
                                 shape.length};
  std::size_t full_bytes = 0;
  std::size_t store_only_bytes = 0;
  if (error.empty()) {
    cudaMemcpyAsync(slots.data, host_slots.data(), sizeof(std::int32_t) * host_slots.size(),
                    cudaMemcpyHostToDevice, stream);
    cudaMemcpyAsync(cu.data, host_cu.data(), sizeof(std::int32_t) * host_cu.size(),
                    cudaMemcpyHostToDevice, stream);
    kvc::bench::fill_normal(static_cast<T*>(q.data), q_elems, 3, 1.0f, stream);
    kvc::bench::fill_normal(static_cast<T*>(k.data), q_elems, 1, 1.0f, stream);
    kvc::bench::fill_normal(static_cast<T*>(v.data), q_elems, 2, 1.0f, stream);
    shape_decisions_kernel<<<256, 256, 0, stream>>>(static_cast<T*>(k.data),
                                                    static_cast<std::int64_t>(tokens) * kHeads, 70);
    if (kvc::prefill_workspace_size<T, Attention>(store, chunks, full_bytes) !=
            kvc::Status::kSuccess ||
        kvc::prefill_workspace_size<T, NoAttention>(store, chunks, store_only_bytes) !=
            kvc::Status::kSuccess) {
      error = "workspace size query failed";
    }
  }
  DeviceMemory workspace(full_bytes > store_only_bytes ? full_bytes : store_only_bytes);
  if (error.empty() && workspace.data == nullptr) error = "workspace cudaMalloc failed";
  if (!error.empty()) {
    cudaStreamDestroy(stream);
    state.SkipWithError(error.c_str());
    return;
  }

  kvc::bench::EventTimer timer;
  auto reset = [&]() {
    for (int slot : host_slots) store.release_sequence(slot, stream);
    for (std::size_t b = 0; b < host_slots.size(); ++b) store.add_sequence(host_slots[b], stream);
  };
  auto timed = [&](bool with_attention) -> double {
    reset();
    timer.start(stream);
    kvc::Status const status =
        with_attention
            ? enqueue<Attention>(store, chunks, static_cast<T*>(q.data), static_cast<T*>(k.data),
                                 static_cast<T*>(v.data), static_cast<T*>(out.data),
                                 static_cast<float*>(lse.data), workspace.data, full_bytes, stream)
            : enqueue<NoAttention>(store, chunks, static_cast<T*>(q.data), static_cast<T*>(k.data),
                                   static_cast<T*>(v.data), static_cast<T*>(out.data),
                                   static_cast<float*>(lse.data), workspace.data, store_only_bytes,
                                   stream);
    double const seconds = timer.stop_seconds(stream);
    return status == kvc::Status::kSuccess ? seconds : -1.0;
  };
  if (timed(true) < 0.0 || timed(false) < 0.0) {  // warm-up
    cudaStreamDestroy(stream);
    state.SkipWithError("prefill failed (no prefill attention for bf16, D=128, G=1?)");
    return;
  }
  double total = 0.0;
  double store_total = 0.0;
  for (auto _ : state) {
    double const seconds = timed(true);
    double const store_seconds = timed(false);
    if (seconds <= 0.0 || store_seconds <= 0.0) {
      state.SkipWithError("prefill failed");
      break;
    }
    total += seconds;
    store_total += store_seconds;
    state.SetIterationTime(seconds);
  }
  kvc::StepReport report;
  store.copy_step_report_async(&report, nullptr, 0, stream);
  kvc::StoreStats stats;
  store.stats_sync(stats, stream);
  cudaStreamDestroy(stream);
  if (kvc::step_status(report) != kvc::Status::kSuccess) {
    state.SkipWithError("the prefill step was refused");
    return;
  }
  double const iterations = static_cast<double>(state.iterations());
  if (iterations <= 0.0 || total <= 0.0) return;
  double const per_call = total / iterations;
  double const store_per_call = store_total / iterations;
  double const flops = 4.0 * kHeads * kHeadDim * shape.batch *
                       (static_cast<double>(shape.length) * (shape.length + 1) / 2.0);
  state.counters["us"] = per_call * 1e6;
  state.counters["tokens_per_s"] = tokens / per_call;
  state.counters["TFLOPs"] = flops / per_call * 1e-12;
  state.counters["store_us"] = store_per_call * 1e6;
  state.counters["store_share"] = store_per_call / per_call;
  state.counters["compression"] =
      stats.slots_used > 0 ? static_cast<double>(tokens) * kHeads / stats.slots_used : 0.0;
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  std::vector<Shape> shapes;
  for (kvc::PolicyKind kind : {kvc::PolicyKind::kDmc, kvc::PolicyKind::kFull}) {
    shapes.push_back({kind, 1, 4096});
    shapes.push_back({kind, 8, 2048});
    shapes.push_back({kind, 32, 512});
  }
  for (Shape const& shape : shapes) {
    benchmark::RegisterBenchmark(("prefill_store/" + shape.key()).c_str(), bench_prefill, shape)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond)
        ->Iterations(1)
        ->Repetitions(kRepetitions)
        ->ReportAggregatesOnly(true);
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
