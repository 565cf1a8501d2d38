// Causal prefill attention (kvc::prefill_attention, precompiled kvc_prefill_instances): bf16,
// head dim 128, 32 query heads, packed prompts without a cached prefix (one plan kernel + one
// attention kernel per call, no scores).
//
// Shapes (names shared with benchmarks/baselines/sdpa_prefill.py):
//   prefill/causal_32x8_B1_N4096, _B8_N2048, _B32_N512   GQA, 8 KV heads (G = 4)
//   prefill/causal_32x32_B1_N4096, ...                  MHA (G = 1; not in KVC_CI_MINIMAL builds,
//                                                       which report SkipWithError)
// Counters: TFLOPs (causal FLOPs = 4 * D * Hq * sum over rows of n (n + 1) / 2, the convention of
// FlashAttention's benchmarks), us per call, tokens.
//
// Timing: CUDA events around kCallsPerTiming back-to-back calls; time per call = elapsed / calls.
// Each shape runs kRepetitions Google Benchmark repetitions of kTimingsPerRepetition timings
// (fixed iteration count), each repetition after one untimed warm-up timing; the median of the
// repetitions is reported (ReportAggregatesOnly). Inputs are filled on the device
// (support/device_fill.cuh). Not run yet on a device: expected well under a second per shape.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kvc/attention/prefill_api.cuh"

#include "bandwidth.cuh"
#include "device_fill.cuh"

namespace {

using T = __nv_bfloat16;
constexpr int kHeadDim = 128;
constexpr int kCallsPerTiming = 10;
constexpr int kTimingsPerRepetition = 5;
constexpr int kRepetitions = 5;

struct Shape {
  int q_heads;
  int kv_heads;
  int batch;
  int tokens;  // per row
  std::string key() const {
    return "causal_" + std::to_string(q_heads) + "x" + std::to_string(kv_heads) + "_B" +
           std::to_string(batch) + "_N" + std::to_string(tokens);
  }
  int group_size() const { return q_heads / kv_heads; }
  double flops() const {
    double const n = tokens;
    return 4.0 * kHeadDim * q_heads * batch * (n * (n + 1.0) / 2.0);
  }
};

//! Device buffers of one shape, freed on destruction.
struct Buffers {
  std::vector<void*> owned;
  ~Buffers() {
    for (void* p : owned) cudaFree(p);
  }
  template <class U>
  cudaError_t allocate(U*& pointer, std::size_t count) {
    void* raw = nullptr;
    cudaError_t const error = cudaMalloc(&raw, std::max<std::size_t>(count * sizeof(U), 16));
    if (error != cudaSuccess) return error;
    owned.push_back(raw);
    pointer = static_cast<U*>(raw);
    return cudaSuccess;
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

void bench_prefill(benchmark::State& state, Shape shape) {
  if (!kvc::bench::cuda_device_present()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  if (!kvc::prefill_attention_supported(kvc::DType::kBF16, kHeadDim, shape.group_size())) {
    state.SkipWithError(("no compiled prefill kernel for bf16, D=128, G=" +
                         std::to_string(shape.group_size()) + " (KVC_CI_MINIMAL build?)")
                            .c_str());
    return;
  }
  int const total = shape.batch * shape.tokens;
  Buffers buffers;
  T *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr, *pool = nullptr;
  float* lse = nullptr;
  std::int32_t *cu = nullptr, *table = nullptr, *lengths = nullptr;
  BENCH_CUDA(buffers.allocate(q, static_cast<std::size_t>(total) * shape.q_heads * kHeadDim),
             state);
  BENCH_CUDA(buffers.allocate(k, static_cast<std::size_t>(total) * shape.kv_heads * kHeadDim),
             state);
  BENCH_CUDA(buffers.allocate(v, static_cast<std::size_t>(total) * shape.kv_heads * kHeadDim),
             state);
  BENCH_CUDA(buffers.allocate(out, static_cast<std::size_t>(total) * shape.q_heads * kHeadDim),
             state);
  BENCH_CUDA(buffers.allocate(lse, static_cast<std::size_t>(total) * shape.q_heads), state);
  BENCH_CUDA(buffers.allocate(pool, static_cast<std::size_t>(16) * kHeadDim),
             state);  // one page, unused
  BENCH_CUDA(buffers.allocate(cu, static_cast<std::size_t>(shape.batch) + 1), state);
  BENCH_CUDA(buffers.allocate(table, static_cast<std::size_t>(shape.batch) * shape.kv_heads),
             state);
  BENCH_CUDA(buffers.allocate(lengths, static_cast<std::size_t>(shape.batch) * shape.kv_heads),
             state);
  BENCH_CUDA(
      kvc::bench::fill_normal(q, static_cast<std::size_t>(total) * shape.q_heads * kHeadDim, 1),
      state);
  BENCH_CUDA(
      kvc::bench::fill_normal(k, static_cast<std::size_t>(total) * shape.kv_heads * kHeadDim, 2),
      state);
  BENCH_CUDA(
      kvc::bench::fill_normal(v, static_cast<std::size_t>(total) * shape.kv_heads * kHeadDim, 3),
      state);
  BENCH_CUDA(kvc::bench::fill_normal(pool, static_cast<std::size_t>(16) * kHeadDim, 4), state);
  std::vector<std::int32_t> host_cu(shape.batch + 1);
  for (int b = 0; b <= shape.batch; ++b) host_cu[b] = b * shape.tokens;
  BENCH_CUDA(
      cudaMemcpy(cu, host_cu.data(), host_cu.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice),
      state);
  BENCH_CUDA(
      cudaMemset(table, 0,
                 static_cast<std::size_t>(shape.batch) * shape.kv_heads * sizeof(std::int32_t)),
      state);
  BENCH_CUDA(
      cudaMemset(lengths, 0,
                 static_cast<std::size_t>(shape.batch) * shape.kv_heads * sizeof(std::int32_t)),
      state);

  kvc::PagedLayerView<T> view;
  view.k_pages = pool;
  view.v_pages = pool;
  view.page_table = table;
  view.lengths = lengths;  // no cached prefix
  view.page_size = 16;
  view.head_dim = kHeadDim;
  view.num_kv_heads = shape.kv_heads;
  view.max_pages_per_head = 1;
  view.max_seqs = shape.batch;
  kvc::PrefillParams params = kvc::make_prefill_params(view, q, k, v, cu, nullptr, shape.batch,
                                                       total, shape.q_heads, out, lse);
  std::size_t bytes = 0;
  if (kvc::prefill_attention_workspace_size(params, bytes) != kvc::Status::kSuccess) {
    state.SkipWithError("prefill_attention_workspace_size failed");
    return;
  }
  unsigned char* workspace = nullptr;
  BENCH_CUDA(buffers.allocate(workspace, bytes), state);
  params.workspace = workspace;
  params.workspace_bytes = bytes;
  cudaStream_t stream = nullptr;
  BENCH_CUDA(cudaStreamCreate(&stream), state);
  struct StreamOwner {
    cudaStream_t stream;
    ~StreamOwner() { cudaStreamDestroy(stream); }
  } const owner{stream};

  kvc::bench::EventTimer timer;
  auto timed = [&]() -> double {
    timer.start(stream);
    for (int call = 0; call < kCallsPerTiming; ++call) {
      if (kvc::prefill_attention(params, stream) != kvc::Status::kSuccess) return -1.0;
    }
    return timer.stop_seconds(stream) / kCallsPerTiming;
  };
  if (timed() < 0.0) {  // warm-up
    state.SkipWithError("prefill_attention failed");
    return;
  }
  double total_seconds = 0.0;
  for (auto _ : state) {
    double const seconds = timed();
    if (seconds <= 0.0) {
      state.SkipWithError("prefill_attention failed");
      return;
    }
    total_seconds += seconds;
    state.SetIterationTime(seconds);
  }
  BENCH_CUDA(cudaGetLastError(), state);
  double const per_call = total_seconds / static_cast<double>(state.iterations());
  state.counters["TFLOPs"] = per_call > 0.0 ? shape.flops() / per_call * 1e-12 : 0.0;
  state.counters["us"] = per_call * 1e6;
  state.counters["tokens"] = total;
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  for (int kv : {8, 32}) {
    for (Shape const shape :
         {Shape{32, kv, 1, 4096}, Shape{32, kv, 8, 2048}, Shape{32, kv, 32, 512}}) {
      benchmark::RegisterBenchmark(("prefill/" + shape.key()).c_str(), bench_prefill, shape)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond)
          ->Iterations(kTimingsPerRepetition)
          ->Repetitions(kRepetitions)
          ->ReportAggregatesOnly(true);
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
