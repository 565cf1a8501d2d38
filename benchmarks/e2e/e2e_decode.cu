// kvc-e2e: end-to-end decode throughput of a Llama-shaped model with random bf16 weights, per
// cache policy, in the DMC paper's setting (memory-budget mode: the largest batch that fits a
// GPU memory budget for the whole context) and at fixed batches.
//
// One decode step = for every layer: RMSNorm, q/k/v GEMMs (cuBLAS, fp32 accumulate), the kvc
// cache update (RoPE, DMC decision and merge, page allocation), kvc decode attention (+ the
// H2O/TOVA evict), the o GEMM with the residual, RMSNorm, gate+up GEMM, SwiGLU, down GEMM with
// the residual; then the final RMSNorm and the LM head. Sampling and the embedding lookup are
// not modelled (the step's input is a fixed random hidden state). Steps are captured in a CUDA
// graph (--no-graph: eager launches).
//
// The cache is first filled to the timed context through kvc's update path token by token (the
// same kernels a decode step runs; no GEMMs and no attention during the fill, and H2O/TOVA evict
// on random scores), so every DMC decision is made by the update kernel from a key whose
// decision neuron encodes the planned per-head ratio. Timed steps set the neuron the same way on
// the GEMM's keys. Decode cost grows linearly with context, so steps timed at
// prompt + generate / 2 give the mean step time of generating `generate` tokens.
//
// Usage: kvc-e2e --model 7b|7b-gqa|13b|70b-tp2 --policies full,dmc:4,h2o:4,...
//                [--mode budget|fixed] [--batches 1,8,32] [--prompt 2048] [--generate 2048]
//                [--context N] [--gpu-mem-gib 80] [--steps 16] [--warmup 3] [--page-size 16]
//                [--no-graph] [--seed S] [--json FILE]
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kvc/attention/decode_api.cuh"
#include "kvc/cache/paged_store.cuh"

#include "bandwidth.cuh"
#include "device_fill.cuh"
#include "memory_plan.hpp"
#include "transformer_kernels.cuh"

namespace {

using bf16 = __nv_bfloat16;
using kvc::e2e::CacheKind;
using kvc::e2e::ModelSpec;
using kvc::e2e::PolicyRun;

// ---------------------------------------------------------------------------------------------
// Errors: a failing CUDA/cuBLAS/kvc call aborts the run with a message (a benchmark tool).

[[noreturn]] void fail(std::string const& what) {
  std::fprintf(stderr, "kvc-e2e: %s\n", what.c_str());
  std::exit(1);
}
void check_cuda(cudaError_t error, char const* what) {
  if (error != cudaSuccess) fail(std::string(what) + ": " + cudaGetErrorString(error));
}
void check_cublas(cublasStatus_t status, char const* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    fail(std::string(what) + ": cuBLAS status " + std::to_string(static_cast<int>(status)));
}
void check_kvc(kvc::Status status, char const* what) {
  if (status != kvc::Status::kSuccess) fail(std::string(what) + ": " + kvc::to_string(status));
}

//! One device allocation, freed on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
    if (bytes > 0) check_cuda(cudaMalloc(&data_, bytes), "cudaMalloc");
  }
  DeviceBuffer(DeviceBuffer const&) = delete;
  DeviceBuffer& operator=(DeviceBuffer const&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(bytes_, other.bytes_);
    return *this;
  }
  ~DeviceBuffer() {
    if (data_ != nullptr) cudaFree(data_);
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  std::size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Options.

struct Options {
  std::string model = "7b";
  std::vector<std::string> policies{"full", "dmc:2", "dmc:4", "dmc:8", "h2o:4", "tova:4"};
  bool budget_mode = true;
  std::vector<int> batches{1, 8, 32, 64, 128, 256};
  std::int64_t prompt = 2048;
  std::int64_t generate = 2048;
  std::int64_t context = 0;  // fixed mode: timed context (default prompt + generate / 2)
  double gpu_mem_gib = 80.0;
  int steps = 16;
  int warmup = 3;
  int page_size = 16;
  bool graph = true;
  std::uint64_t seed = 2024;
  std::string json;
};

std::vector<std::string> split(std::string const& text) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, ',')) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

long long parse_integer(std::string const& text, char const* flag) {
  try {
    std::size_t used = 0;
    long long const value = std::stoll(text, &used);
    if (used == text.size() && value >= 0) return value;
  } catch (...) {
  }
  fail(std::string(flag) + " expects a non-negative integer, got '" + text + "'");
}

Options parse_options(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string const flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--model")
      options.model = value();
    else if (flag == "--policies")
      options.policies = split(value());
    else if (flag == "--mode") {
      std::string const mode = value();
      if (mode != "budget" && mode != "fixed") fail("--mode is budget or fixed");
      options.budget_mode = mode == "budget";
    } else if (flag == "--batches") {
      options.batches.clear();
      for (auto const& b : split(value())) {
        options.batches.push_back(static_cast<int>(parse_integer(b, "--batches")));
      }
    } else if (flag == "--prompt")
      options.prompt = parse_integer(value(), "--prompt");
    else if (flag == "--generate")
      options.generate = parse_integer(value(), "--generate");
    else if (flag == "--context")
      options.context = parse_integer(value(), "--context");
    else if (flag == "--gpu-mem-gib")
      options.gpu_mem_gib = std::atof(value().c_str());
    else if (flag == "--steps")
      options.steps = static_cast<int>(parse_integer(value(), "--steps"));
    else if (flag == "--warmup")
      options.warmup = static_cast<int>(parse_integer(value(), "--warmup"));
    else if (flag == "--page-size") {
      options.page_size = static_cast<int>(parse_integer(value(), "--page-size"));
    } else if (flag == "--no-graph")
      options.graph = false;
    else if (flag == "--seed")
      options.seed = parse_integer(value(), "--seed");
    else if (flag == "--json")
      options.json = value();
    else if (flag == "-h" || flag == "--help") {
      std::printf(
          "kvc-e2e --model 7b|7b-gqa|13b|70b-tp2 --policies full,dmc:4,h2o:4,tova:4\n"
          "        [--mode budget|fixed] [--batches 1,8,32] [--prompt 2048] [--generate 2048]\n"
          "        [--context N] [--gpu-mem-gib 80] [--steps 16] [--warmup 3] [--page-size 16]\n"
          "        [--no-graph] [--seed S] [--json FILE]\n");
      std::exit(0);
    } else {
      fail("unknown argument '" + flag + "' (see --help)");
    }
  }
  if (options.steps < 1) fail("--steps must be at least 1");
  if (options.page_size < 1) fail("--page-size must be at least 1");
  if (options.prompt + options.generate < 1) fail("--prompt + --generate must be at least 1");
  if (!(options.gpu_mem_gib > 0.0)) fail("--gpu-mem-gib must be positive");
  for (int b : options.batches) {
    if (b < 1 || b > kvc::kStoreMaxSeqs) fail("--batches values must be in [1, 65535]");
  }
  return options;
}

// ---------------------------------------------------------------------------------------------
// The model: weights (one allocation), activations, GEMMs.

struct LayerWeights {
  bf16 *norm_attn, *wq, *wk, *wv, *wo, *norm_mlp, *w_gate_up, *w_down;
};

struct Weights {
  DeviceBuffer storage;
  std::vector<LayerWeights> layers;
  bf16 *norm_final = nullptr, *lm_head = nullptr, *embedding = nullptr;
};

Weights make_weights(ModelSpec const& spec, std::uint64_t seed, cudaStream_t stream) {
  std::int64_t const h = spec.hidden;
  std::int64_t const q = static_cast<std::int64_t>(spec.q_heads) * spec.head_dim;
  std::int64_t const kv = static_cast<std::int64_t>(spec.kv_heads) * spec.head_dim;
  std::int64_t const inter = spec.intermediate;
  Weights weights;
  weights.storage = DeviceBuffer(static_cast<std::size_t>(spec.weight_bytes()));
  bf16* cursor = weights.storage.as<bf16>();
  auto take = [&cursor](std::int64_t count) {
    bf16* begin = cursor;
    cursor += count;
    return begin;
  };
  for (int l = 0; l < spec.layers; ++l) {
    LayerWeights w;
    w.norm_attn = take(h);
    w.wq = take(h * q);   // [hidden, q_heads * head_dim]
    w.wk = take(h * kv);  // [hidden, kv_heads * head_dim]
    w.wv = take(h * kv);  // [hidden, kv_heads * head_dim]
    w.wo = take(q * h);   // [q_heads * head_dim, hidden]
    w.norm_mlp = take(h);
    w.w_gate_up = take(h * 2 * inter);  // [hidden, 2 * intermediate]
    w.w_down = take(inter * h);         // [intermediate, hidden]
    weights.layers.push_back(w);
  }
  weights.norm_final = take(h);
  weights.lm_head = take(h * spec.vocab);    // [hidden, vocab]
  weights.embedding = take(h * spec.vocab);  // [vocab, hidden] (held, not read per step)
  if (cursor - weights.storage.as<bf16>() != spec.params()) fail("internal: weight layout");
  // N(0, 0.02^2) like a fresh initialisation; norms around 1 in magnitude.
  check_cuda(kvc::bench::fill_normal(weights.storage.as<bf16>(),
                                     static_cast<std::size_t>(spec.params()), seed, 0.02f, stream),
             "weight fill");
  for (auto const& w : weights.layers) {
    check_cuda(
        kvc::bench::fill_normal(w.norm_attn, static_cast<std::size_t>(h), seed + 1, 1.0f, stream),
        "norm fill");
    check_cuda(
        kvc::bench::fill_normal(w.norm_mlp, static_cast<std::size_t>(h), seed + 2, 1.0f, stream),
        "norm fill");
  }
  return weights;
}

//! Row-major Y [rows, out] = X [rows, in] * W [in, out] (+ Y when accumulate), fp32 accumulate.
//! (cuBLAS is column-major: Y^T = W^T X^T with W^T [out, in], leading dimension out.)
//! kErrorCuda when cuBLAS refuses (the step then stops; during a graph capture, the capture is
//! abandoned and the steps run eagerly).
kvc::Status gemm(cublasHandle_t handle, bf16 const* x, bf16 const* w, bf16* y, int rows, int in,
                 int out, bool accumulate) {
  float const alpha = 1.0f;
  float const beta = accumulate ? 1.0f : 0.0f;
  cublasStatus_t const status = cublasGemmEx(
      handle, CUBLAS_OP_N, CUBLAS_OP_N, out, rows, in, &alpha, w, CUDA_R_16BF, out, x, CUDA_R_16BF,
      in, &beta, y, CUDA_R_16BF, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  return status == CUBLAS_STATUS_SUCCESS ? kvc::Status::kSuccess : kvc::Status::kErrorCuda;
}

//! kErrorCuda when the last kernel launch failed.
kvc::Status launch_status() {
  return cudaGetLastError() == cudaSuccess ? kvc::Status::kSuccess : kvc::Status::kErrorCuda;
}

//! Activation buffers of one batch. Sizes in elements, all [batch, ...] row-major.
struct Activations {
  DeviceBuffer storage;
  bf16 *x, *h, *q, *k, *v, *q_out, *attn, *gate_up, *act, *logits;
  float* lse;

  static std::int64_t bytes(ModelSpec const& spec, int batch) {
    std::int64_t const q = static_cast<std::int64_t>(spec.q_heads) * spec.head_dim;
    std::int64_t const kv = static_cast<std::int64_t>(spec.kv_heads) * spec.head_dim;
    std::int64_t const per_row =
        2 * spec.hidden + 3 * q + 2 * kv + 3 * spec.intermediate + spec.vocab;
    return batch * (per_row * 2 + 4 * static_cast<std::int64_t>(spec.q_heads)) + 16 * 256;
  }

  Activations(ModelSpec const& spec, int batch)
      : storage(static_cast<std::size_t>(bytes(spec, batch))) {
    std::int64_t const b = batch;
    std::int64_t const q_size = b * spec.q_heads * spec.head_dim;
    std::int64_t const kv_size = b * spec.kv_heads * spec.head_dim;
    auto* cursor = storage.as<unsigned char>();
    auto take = [&cursor](std::int64_t count, std::size_t element) {
      void* begin = cursor;
      cursor += (static_cast<std::size_t>(count) * element + 255) / 256 * 256;
      return begin;
    };
    x = static_cast<bf16*>(take(b * spec.hidden, 2));
    h = static_cast<bf16*>(take(b * spec.hidden, 2));
    q = static_cast<bf16*>(take(q_size, 2));
    k = static_cast<bf16*>(take(kv_size, 2));
    v = static_cast<bf16*>(take(kv_size, 2));
    q_out = static_cast<bf16*>(take(q_size, 2));
    attn = static_cast<bf16*>(take(q_size, 2));
    gate_up = static_cast<bf16*>(take(b * 2 * spec.intermediate, 2));
    act = static_cast<bf16*>(take(b * spec.intermediate, 2));
    logits = static_cast<bf16*>(take(b * spec.vocab, 2));
    lse = static_cast<float*>(take(b * spec.q_heads, 4));
  }
};

// ---------------------------------------------------------------------------------------------
// One policy at one batch: store set-up, fill, timed steps.

kvc::PagedStoreConfig store_config(ModelSpec const& spec, PolicyRun const& run, int batch,
                                   std::int64_t max_tokens, int page_size) {
  kvc::PagedStoreConfig config;
  config.shape = {spec.layers, spec.q_heads, spec.kv_heads, spec.head_dim};
  config.dtype = kvc::DType::kBF16;
  config.page_size = page_size;
  config.max_seqs = batch;
  std::int64_t const head_slots =
      run.kind == CacheKind::kH2O || run.kind == CacheKind::kTova ? run.budget + 1 : max_tokens + 1;
  config.max_pages_per_head = static_cast<int>((head_slots + page_size - 1) / page_size);
  config.num_pages = static_cast<int>(std::min<std::int64_t>(
      INT32_MAX, batch * kvc::e2e::pages_per_sequence(spec, run, max_tokens, page_size)));
  config.rope.layout = kvc::RopeLayout::kRotateHalf;
  config.rope.theta = 10000.0;
  switch (run.kind) {
    case CacheKind::kFull: config.policy.kind = kvc::PolicyKind::kFull; break;
    case CacheKind::kDmc:
      config.policy.kind = kvc::PolicyKind::kDmc;
      config.policy.dmc = kvc::DmcConfig::checkpoint();
      break;
    case CacheKind::kH2O:
      config.policy.kind = kvc::PolicyKind::kH2O;
      config.policy.h2o.heavy = run.budget / 2;
      config.policy.h2o.recent = run.budget - run.budget / 2;
      break;
    case CacheKind::kTova:
      config.policy.kind = kvc::PolicyKind::kTova;
      config.policy.tova.budget = run.budget;
      break;
  }
  return config;
}

bool evicts(PolicyRun const& run) {
  return run.kind == CacheKind::kH2O || run.kind == CacheKind::kTova;
}

//! Bytes of attention workspace for `batch` rows (a device query; no allocation).
std::int64_t decode_workspace_bytes(ModelSpec const& spec, int batch) {
  kvc::DecodeParams params;
  params.dtype = kvc::DType::kBF16;
  params.cache.num_kv_heads = spec.kv_heads;
  params.cache.head_dim = spec.head_dim;
  params.cache.page_size = 16;
  params.cache.max_seqs = batch;
  params.cache.max_pages_per_head = 1;
  params.batch = batch;
  params.num_q_heads = spec.q_heads;
  std::size_t bytes = 0;
  check_kvc(kvc::decode_attention_workspace_size(params, bytes), "decode workspace size");
  return static_cast<std::int64_t>(bytes);
}

//! Every byte a run at `batch` allocates besides the weights.
std::int64_t run_bytes(ModelSpec const& spec, PolicyRun const& run, int batch,
                       std::int64_t max_tokens, int page_size) {
  std::size_t store = 0;
  check_kvc(
      kvc::PagedStore::required_bytes(store_config(spec, run, batch, max_tokens, page_size), store),
      "store size");
  // Scores [batch, q heads, budget + 1] and their log2 LSE [batch, q heads].
  std::int64_t const scores = evicts(run) ? 4LL * batch * spec.q_heads * (run.budget + 2) : 0;
  std::int64_t const fill_pool =
      2 * 2LL * batch * (spec.q_heads + 2LL * spec.kv_heads) * spec.head_dim;
  return static_cast<std::int64_t>(store) + Activations::bytes(spec, batch) +
         decode_workspace_bytes(spec, batch) + scores + fill_pool + 4LL * batch +
         4LL * spec.layers * spec.kv_heads;
}

struct RunResult {
  std::string model, policy, mode;
  double target_ratio = 1.0;
  int batch = 0;
  std::int64_t max_tokens = 0, context = 0;
  int steps = 0;
  bool graph = false;
  double step_ms = 0.0, tokens_per_s = 0.0;
  std::int64_t slots_used = 0, expected_slots = 0, pages_held = 0;
  double measured_ratio = 1.0;
  std::int64_t store_bytes = 0, kv_bytes_held = 0, weight_bytes = 0, bytes_read_per_step = 0;
  double probe_gbps = 0.0, floor_ms = 0.0, bw_fraction = 0.0;
};

class Runner {
 public:
  Runner(ModelSpec spec, Weights const& weights, cublasHandle_t cublas, cudaStream_t stream,
         double probe_gbps)
      : spec_(std::move(spec)),
        weights_(weights),
        cublas_(cublas),
        stream_(stream),
        probe_gbps_(probe_gbps) {}

  RunResult run(PolicyRun const& run, int batch, std::int64_t max_tokens, std::int64_t context,
                Options const& options) {
    int const page_size = options.page_size;
    if (context + options.warmup + options.steps > max_tokens) {
      fail("context + warmup + steps exceeds the tokens the store is sized for");
    }
    kvc::PagedStoreConfig const config = store_config(spec_, run, batch, max_tokens, page_size);
    std::size_t store_bytes = 0;
    check_kvc(kvc::PagedStore::required_bytes(config, store_bytes), "store size");
    DeviceBuffer store_memory(store_bytes);
    kvc::PagedStore store;
    check_kvc(store.init(config, store_memory.as<void>(), store_bytes, stream_), "store init");
    std::vector<std::int32_t> slots(static_cast<std::size_t>(batch));
    for (int b = 0; b < batch; ++b)
      check_kvc(store.add_sequence(slots[b], stream_), "add_sequence");
    DeviceBuffer seq_slots(sizeof(std::int32_t) * batch);
    check_cuda(cudaMemcpyAsync(seq_slots.as<void>(), slots.data(), sizeof(std::int32_t) * batch,
                               cudaMemcpyHostToDevice, stream_),
               "slots copy");
    std::int32_t const* row_slots = seq_slots.as<std::int32_t>();

    Activations act(spec_, batch);
    check_cuda(kvc::bench::fill_normal(act.x, static_cast<std::size_t>(batch) * spec_.hidden,
                                       options.seed + 7, 1.0f, stream_),
               "input fill");
    DeviceBuffer ratios(sizeof(std::int32_t) * spec_.layers * spec_.kv_heads);
    if (run.kind == CacheKind::kDmc) {
      check_cuda(cudaMemcpyAsync(ratios.as<void>(), run.head_ratios.data(), ratios.bytes(),
                                 cudaMemcpyHostToDevice, stream_),
                 "ratios copy");
    }
    int const stride = evicts(run) ? run.budget + 1 : 0;
    DeviceBuffer scores(evicts(run) ? sizeof(float) * batch * spec_.q_heads * stride : 0);
    // The score form an engine uses (as KVCache does): log2 logits and their LSE.
    DeviceBuffer score_lse(evicts(run) ? sizeof(float) * batch * spec_.q_heads : 0);
    DeviceBuffer workspace(static_cast<std::size_t>(decode_workspace_bytes(spec_, batch)));

    std::vector<kvc::DecodeParams> attention(static_cast<std::size_t>(spec_.layers));
    for (int l = 0; l < spec_.layers; ++l) {
      kvc::PagedLayerView<bf16> view;
      check_kvc(store.layer_view(l, view), "layer_view");
      kvc::DecodeParams params = kvc::make_decode_params<bf16>(view, act.q_out, row_slots, batch,
                                                               spec_.q_heads, act.attn, act.lse);
      params.workspace = workspace.as<void>();
      params.workspace_bytes = workspace.bytes();
      if (evicts(run)) {
        params.scores = kvc::ScoreHook{scores.as<float>(), stride, kvc::ScoreForm::kLog2Logits,
                                       score_lse.as<float>()};
      }
      attention[static_cast<std::size_t>(l)] = params;
    }

    fill(store, run, batch, row_slots, ratios.as<std::int32_t>(), scores, stride, context,
         options.seed);
    kvc::StepReport report;
    check_kvc(store.step_status_sync(stream_, &report), "cache fill (step status)");

    auto step = [&]() -> kvc::Status {
      KVC_RETURN_IF_ERROR(store.prepare_decode_step(row_slots, batch, stream_));
      for (int l = 0; l < spec_.layers; ++l) {
        KVC_RETURN_IF_ERROR(layer_step(store, run, l, batch, row_slots, ratios.as<std::int32_t>(),
                                       act, attention[static_cast<std::size_t>(l)]));
      }
      kvc::e2e::rmsnorm_kernel<<<batch, kvc::e2e::kRowThreads, 0, stream_>>>(
          act.x, weights_.norm_final, act.h, spec_.hidden);
      KVC_RETURN_IF_ERROR(launch_status());
      return gemm(cublas_, act.h, weights_.lm_head, act.logits, batch, spec_.hidden, spec_.vocab,
                  false);
    };

    RunResult result;
    result.graph = false;
    cudaGraphExec_t graph_exec = nullptr;
    if (options.graph) graph_exec = capture(step);
    result.graph = graph_exec != nullptr;
    auto launch = [&]() {
      if (graph_exec != nullptr) {
        check_cuda(cudaGraphLaunch(graph_exec, stream_), "cudaGraphLaunch");
      } else {
        check_kvc(step(), "decode step");
      }
    };
    for (int i = 0; i < options.warmup; ++i) launch();
    check_kvc(store.step_status_sync(stream_), "warm-up steps (step status)");
    kvc::bench::EventTimer timer;
    timer.start(stream_);
    for (int i = 0; i < options.steps; ++i) launch();
    double const elapsed_ms = timer.stop_seconds(stream_) * 1e3;
    check_kvc(store.step_status_sync(stream_), "timed steps (step status)");
    if (graph_exec != nullptr) cudaGraphExecDestroy(graph_exec);

    kvc::StoreStats stats;
    check_kvc(store.stats_sync(stats, stream_), "stats");
    std::int64_t const tokens = context + options.warmup + options.steps;
    result.model = spec_.name;
    result.policy = run.label;
    result.mode = options.budget_mode ? "budget" : "fixed";
    result.target_ratio = run.target_ratio;
    result.batch = batch;
    result.max_tokens = max_tokens;
    result.context = context;
    result.steps = options.steps;
    result.step_ms = elapsed_ms / options.steps;
    result.tokens_per_s = batch * options.steps / (elapsed_ms * 1e-3);
    result.slots_used = stats.slots_used;
    result.expected_slots = batch * kvc::e2e::slots_per_sequence(spec_, run, tokens);
    if (evicts(run)) {  // after the step's evict, a head holds at most `budget` slots
      result.expected_slots = batch * static_cast<std::int64_t>(spec_.layers) * spec_.kv_heads *
                              std::min<std::int64_t>(tokens, run.budget);
    }
    result.pages_held = stats.pages_held;
    result.measured_ratio = stats.slots_used > 0
                                ? static_cast<double>(batch) * tokens * spec_.layers *
                                      spec_.kv_heads / static_cast<double>(stats.slots_used)
                                : 1.0;
    result.store_bytes = static_cast<std::int64_t>(store_bytes);
    result.kv_bytes_held = stats.bytes_held;
    result.weight_bytes = spec_.weight_bytes();
    // Bytes one timed step reads at least: the weights and the K/V kept (at the middle step).
    result.bytes_read_per_step = spec_.weight_bytes_read_per_step() + stats.bytes_in_use;
    result.probe_gbps = probe_gbps_;
    result.floor_ms = probe_gbps_ > 0.0 ? result.bytes_read_per_step / (probe_gbps_ * 1e6) : 0.0;
    result.bw_fraction = result.step_ms > 0.0 ? result.floor_ms / result.step_ms : 0.0;
    return result;
  }

 private:
  //! Feeds `tokens` tokens to every sequence through the update path (no GEMMs, no attention):
  //! random q/k/v from two pre-filled sets, DMC decision neurons set per the plan, H2O/TOVA
  //! evicting on random positive scores.
  void fill(kvc::PagedStore& store, PolicyRun const& run, int batch, std::int32_t const* row_slots,
            std::int32_t const* ratios, DeviceBuffer const& scores, int stride, std::int64_t tokens,
            std::uint64_t seed) {
    std::int64_t const q_size = static_cast<std::int64_t>(batch) * spec_.q_heads * spec_.head_dim;
    std::int64_t const kv_size = static_cast<std::int64_t>(batch) * spec_.kv_heads * spec_.head_dim;
    DeviceBuffer pool(static_cast<std::size_t>(2 * (2 * q_size + 2 * kv_size)) * sizeof(bf16));
    bf16* base = pool.as<bf16>();
    check_cuda(kvc::bench::fill_normal(base, static_cast<std::size_t>(2 * (q_size + 2 * kv_size)),
                                       seed + 11, 1.0f, stream_),
               "fill pool");
    bf16* q_out = base + 2 * (q_size + 2 * kv_size);
    if (evicts(run)) {
      std::int64_t const count = static_cast<std::int64_t>(batch) * spec_.q_heads * stride;
      check_cuda(kvc::bench::fill_normal(scores.as<float>(), static_cast<std::size_t>(count),
                                         seed + 13, 0.1f, stream_),
                 "score fill");
      kvc::e2e::abs_kernel<<<256, 256, 0, stream_>>>(scores.as<float>(), count);
    }
    kvc::ScoreHook const hook{scores.as<float>(), stride};
    for (std::int64_t t = 0; t < tokens; ++t) {
      check_kvc(store.prepare_decode_step(row_slots, batch, stream_), "fill: prepare");
      for (int l = 0; l < spec_.layers; ++l) {
        bf16* set = base + ((t + l) % 2) * (q_size + 2 * kv_size);
        bf16* k = set + q_size;
        if (run.kind == CacheKind::kDmc) set_decisions(store, l, k, batch, ratios);
        check_kvc(store.update<bf16>(l, set, k, k + kv_size, row_slots, batch, q_out, stream_),
                  "fill: update");
        if (evicts(run)) check_kvc(store.evict(l, hook, row_slots, batch, stream_), "fill: evict");
      }
    }
  }

  void set_decisions(kvc::PagedStore const& store, int layer, bf16* k, int batch,
                     std::int32_t const* ratios) {
    int const count = batch * spec_.kv_heads;
    kvc::DmcConfig const dmc = kvc::DmcConfig::checkpoint();
    kvc::e2e::set_decisions_kernel<<<(count + 255) / 256, 256, 0, stream_>>>(
        k, batch, spec_.kv_heads, spec_.head_dim, dmc.decision_index(spec_.head_dim),
        ratios + layer * spec_.kv_heads,
        store.arrays().step_positions + store.dims().layer_seq(layer, 0), dmc.offset);
  }

  kvc::Status layer_step(kvc::PagedStore& store, PolicyRun const& run, int l, int batch,
                         std::int32_t const* row_slots, std::int32_t const* ratios,
                         Activations& act, kvc::DecodeParams const& attention) {
    LayerWeights const& w = weights_.layers[static_cast<std::size_t>(l)];
    int const hidden = spec_.hidden;
    int const q_width = spec_.q_heads * spec_.head_dim;
    int const kv_width = spec_.kv_heads * spec_.head_dim;
    kvc::e2e::rmsnorm_kernel<<<batch, kvc::e2e::kRowThreads, 0, stream_>>>(act.x, w.norm_attn,
                                                                           act.h, hidden);
    KVC_RETURN_IF_ERROR(launch_status());
    KVC_RETURN_IF_ERROR(gemm(cublas_, act.h, w.wq, act.q, batch, hidden, q_width, false));
    KVC_RETURN_IF_ERROR(gemm(cublas_, act.h, w.wk, act.k, batch, hidden, kv_width, false));
    KVC_RETURN_IF_ERROR(gemm(cublas_, act.h, w.wv, act.v, batch, hidden, kv_width, false));
    if (run.kind == CacheKind::kDmc) {
      set_decisions(store, l, act.k, batch, ratios);
      KVC_RETURN_IF_ERROR(launch_status());
    }
    KVC_RETURN_IF_ERROR(
        store.update<bf16>(l, act.q, act.k, act.v, row_slots, batch, act.q_out, stream_));
    KVC_RETURN_IF_ERROR(kvc::decode_attention(attention, stream_));
    if (evicts(run)) {
      KVC_RETURN_IF_ERROR(store.evict(l, attention.scores, row_slots, batch, stream_));
    }
    KVC_RETURN_IF_ERROR(gemm(cublas_, act.attn, w.wo, act.x, batch, q_width, hidden, true));
    kvc::e2e::rmsnorm_kernel<<<batch, kvc::e2e::kRowThreads, 0, stream_>>>(act.x, w.norm_mlp, act.h,
                                                                           hidden);
    KVC_RETURN_IF_ERROR(launch_status());
    KVC_RETURN_IF_ERROR(gemm(cublas_, act.h, w.w_gate_up, act.gate_up, batch, hidden,
                             2 * spec_.intermediate, false));
    int const blocks = static_cast<int>(std::min<std::int64_t>(
        4096, (static_cast<std::int64_t>(batch) * spec_.intermediate + 255) / 256));
    kvc::e2e::swiglu_kernel<<<blocks, 256, 0, stream_>>>(act.gate_up, act.act, batch,
                                                         spec_.intermediate);
    KVC_RETURN_IF_ERROR(launch_status());
    return gemm(cublas_, act.act, w.w_down, act.x, batch, spec_.intermediate, hidden, true);
  }

  //! Captures one step into an executable graph; null (and eager launches) if capture fails.
  template <class Step>
  cudaGraphExec_t capture(Step& step) {
    cudaGraph_t graph = nullptr;
    if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    kvc::Status const captured = step();
    cudaError_t const ended = cudaStreamEndCapture(stream_, &graph);
    if (captured != kvc::Status::kSuccess || ended != cudaSuccess || graph == nullptr) {
      cudaGetLastError();
      if (graph != nullptr) cudaGraphDestroy(graph);
      std::fprintf(stderr, "kvc-e2e: graph capture failed (%s, %s); timing eager launches\n",
                   kvc::to_string(captured), cudaGetErrorString(ended));
      return nullptr;
    }
    cudaGraphExec_t exec = nullptr;
    cudaError_t const error = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (error != cudaSuccess) {
      cudaGetLastError();
      std::fprintf(stderr, "kvc-e2e: graph instantiation failed; timing eager launches\n");
      return nullptr;
    }
    return exec;
  }

  ModelSpec spec_;
  Weights const& weights_;
  cublasHandle_t cublas_;
  cudaStream_t stream_;
  double probe_gbps_;
};

std::string json_escape(std::string const& text) {
  std::string out;
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

std::string to_json(RunResult const& r, double ratio_to_full) {
  std::ostringstream s;
  s.precision(6);
  s << "{\"model\": \"" << json_escape(r.model) << "\", \"policy\": \"" << json_escape(r.policy)
    << "\", \"mode\": \"" << r.mode << "\", \"target_ratio\": " << r.target_ratio
    << ", \"batch\": " << r.batch << ", \"max_tokens\": " << r.max_tokens
    << ", \"context\": " << r.context << ", \"steps\": " << r.steps
    << ", \"graph\": " << (r.graph ? "true" : "false") << ", \"step_ms\": " << r.step_ms
    << ", \"tokens_per_s\": " << r.tokens_per_s << ", \"slots_used\": " << r.slots_used
    << ", \"expected_slots\": " << r.expected_slots << ", \"pages_held\": " << r.pages_held
    << ", \"measured_ratio\": " << r.measured_ratio << ", \"store_bytes\": " << r.store_bytes
    << ", \"kv_bytes_held\": " << r.kv_bytes_held
    << ", \"kv_bytes_per_seq\": " << (r.batch > 0 ? r.kv_bytes_held / r.batch : 0)
    << ", \"weight_bytes\": " << r.weight_bytes
    << ", \"bytes_read_per_step\": " << r.bytes_read_per_step
    << ", \"probe_gbps\": " << r.probe_gbps << ", \"floor_ms\": " << r.floor_ms
    << ", \"bw_fraction\": " << r.bw_fraction;
  if (ratio_to_full > 0.0) s << ", \"ratio_to_full\": " << ratio_to_full;
  s << "}";
  return s.str();
}

}  // namespace

int main(int argc, char** argv) {
  Options const options = parse_options(argc, argv);
  ModelSpec spec;
  if (!kvc::e2e::find_model(options.model, spec)) fail("unknown --model '" + options.model + "'");
  if (!kvc::bench::cuda_device_present()) {
    std::fprintf(stderr, "kvc-e2e: no CUDA device: nothing to measure\n");
    return 2;
  }
  std::int64_t const max_tokens = options.prompt + options.generate;
  std::int64_t const context =
      options.context > 0 ? options.context : options.prompt + options.generate / 2;
  std::int64_t const sized_tokens =
      std::max<std::int64_t>(max_tokens, context + options.warmup + options.steps);

  std::vector<PolicyRun> runs;
  for (auto const& text : options.policies) {
    PolicyRun run;
    if (!kvc::e2e::parse_policy(text, spec, sized_tokens, options.seed, run)) {
      fail("bad policy '" + text + "' (full, dmc:R with R even, h2o:R, tova:R; R in [2, 64])");
    }
    runs.push_back(run);
  }

  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  double const probe = kvc::bench::measure_read_bandwidth(std::size_t{2} << 30, 10, stream);
  std::size_t free_bytes = 0, total_bytes = 0;
  check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  std::int64_t const context_overhead = static_cast<std::int64_t>(total_bytes - free_bytes);

  cublasHandle_t cublas = nullptr;
  check_cublas(cublasCreate(&cublas), "cublasCreate");
  check_cublas(cublasSetStream(cublas, stream), "cublasSetStream");
  DeviceBuffer cublas_workspace(std::size_t{64} << 20);
  check_cublas(cublasSetWorkspace(cublas, cublas_workspace.as<void>(), cublas_workspace.bytes()),
               "cublasSetWorkspace");
  Weights const weights = make_weights(spec, options.seed, stream);
  check_cuda(cudaStreamSynchronize(stream), "weights");

  std::printf(
      "kvc-e2e: %s (%d layers, hidden %d, %d q / %d KV heads, D %d, MLP %d, vocab %d), "
      "weights %.2f GB; probe %.0f GB/s; %s\n",
      spec.name.c_str(), spec.layers, spec.hidden, spec.q_heads, spec.kv_heads, spec.head_dim,
      spec.intermediate, spec.vocab, spec.weight_bytes() / 1e9, probe, spec.note.c_str());
  Runner runner(spec, weights, cublas, stream, probe);
  std::vector<std::string> records;
  std::vector<RunResult> history;
  std::printf("%-10s %-7s %6s %8s %9s %10s %7s %7s %9s %8s\n", "policy", "mode", "batch", "context",
              "step ms", "tokens/s", "vs full", "CR", "KV GB/seq", "bw frac");
  // The memory budget of the cache and activations: what the device has, up to --gpu-mem-gib,
  // less the CUDA context, the weights, cuBLAS's workspace and a 1 GiB margin.
  std::int64_t const device_budget =
      std::min<std::int64_t>(static_cast<std::int64_t>(options.gpu_mem_gib * (1LL << 30)),
                             static_cast<std::int64_t>(total_bytes));
  std::int64_t const budget = device_budget - context_overhead - spec.weight_bytes() -
                              static_cast<std::int64_t>(cublas_workspace.bytes()) - (1LL << 30);
  for (auto const& run : runs) {
    std::vector<int> batches = options.batches;
    if (options.budget_mode) {
      int const batch = kvc::e2e::largest_batch(
          [&](int b) { return run_bytes(spec, run, b, sized_tokens, options.page_size); }, budget,
          kvc::kStoreMaxSeqs);
      if (batch == 0) {
        std::printf("%-10s budget: not even one sequence of %lld tokens fits\n", run.label.c_str(),
                    static_cast<long long>(sized_tokens));
        continue;
      }
      batches = {batch};
    }
    for (int batch : batches) {
      if (!options.budget_mode &&
          run_bytes(spec, run, batch, sized_tokens, options.page_size) > budget) {
        std::printf("%-10s fixed: batch %d of %lld tokens does not fit in %.1f GB: skipped\n",
                    run.label.c_str(), batch, static_cast<long long>(sized_tokens), budget / 1e9);
        continue;
      }
      RunResult const result = runner.run(run, batch, sized_tokens, context, options);
      double ratio = 0.0;  // to the full cache's run at the same batch (budget mode: any)
      for (auto const& previous : history) {
        if (previous.policy == "full" && (options.budget_mode || previous.batch == result.batch)) {
          ratio = result.tokens_per_s / previous.tokens_per_s;
        }
      }
      history.push_back(result);
      if (result.slots_used != result.expected_slots) {
        std::fprintf(stderr, "kvc-e2e: %s: the cache holds %lld slots, the plan expected %lld\n",
                     result.policy.c_str(), static_cast<long long>(result.slots_used),
                     static_cast<long long>(result.expected_slots));
      }
      char versus_full[32] = "-";
      if (ratio > 0.0) std::snprintf(versus_full, sizeof(versus_full), "%.2fx", ratio);
      std::printf("%-10s %-7s %6d %8lld %9.3f %10.1f %7s %7.2f %9.3f %8.3f\n",
                  result.policy.c_str(), result.mode.c_str(), result.batch,
                  static_cast<long long>(result.context), result.step_ms, result.tokens_per_s,
                  versus_full, result.measured_ratio, result.kv_bytes_held / 1e9 / result.batch,
                  result.bw_fraction);
      std::fflush(stdout);
      records.push_back(to_json(result, ratio));
    }
  }
  if (!options.json.empty()) {
    std::ofstream out(options.json);
    out << "[\n";
    for (std::size_t i = 0; i < records.size(); ++i) {
      out << "  " << records[i] << (i + 1 < records.size() ? ",\n" : "\n");
    }
    out << "]\n";
    if (!out) fail("cannot write " + options.json);
  }
  cublasDestroy(cublas);
  cudaStreamDestroy(stream);
  return 0;
}
