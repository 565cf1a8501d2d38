// kvc_engine_loop: a small random-weight transformer decoding with continuous batching, the way
// an inference engine would drive kvc.
//
// Model: `--layers` blocks of RMSNorm -> Q/K/V projections -> attention through the KV cache ->
// O projection (+ residual) -> RMSNorm -> SwiGLU MLP (+ residual); 8 query heads over 2 KV heads
// (G = 4), head dim 128, model width 512, MLP width 1024, vocabulary 512, greedy decoding.
// The key projection has a bias on each KV head's DMC decision neuron (dim D-1): 5 + c_h, so
// that DMC's decision alpha = k[D-1] - 5 > 0 comes from the keys themselves (merge rates of about
// 50% and 76% for the two KV heads) and the compression ratio is real, not scripted.
//
// Batching: up to `--batch` sequences live at once. A sequence joins with a random prompt of
// `--prompt` tokens (prefilled layer by layer), generates between gen/2 and gen tokens, and
// leaves; a new one takes its place. `--steps` decode steps are run per policy.
//
// Paths: `--device cpu` runs the model with plain host loops and the CPU reference cache
// (kvc::reference::LayerCache per sequence and layer); `--device gpu` runs simple CUDA kernels
// for the model and kvc::KVCache (paged store + decode attention) for the cache; `auto` picks
// the GPU when one is present. The file compiles with g++ (CPU path only) or nvcc
// (KVC_EXAMPLE_CUDA=1, both paths).
//
// Usage: kvc_engine_loop [--policy full|dmc|h2o|tova|all] [--device cpu|gpu|auto] [--layers N]
//                        [--batch N] [--steps N] [--prompt N] [--gen N] [--budget N] [--seed S]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/status.hpp"
#include "kvc/policy/kind.hpp"
#include "kvc/reference/layer_cache.hpp"

#include "example_support.hpp"

#if KVC_EXAMPLE_CUDA
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kvc/engine/kv_cache.cuh"
#endif

namespace {

constexpr int kQHeads = 8;
constexpr int kKvHeads = 2;
constexpr int kHeadDim = 128;
constexpr int kModel = 512;
constexpr int kFfn = 1024;
constexpr int kVocab = 512;
constexpr int kQDim = kQHeads * kHeadDim;    // 1024
constexpr int kKvDim = kKvHeads * kHeadDim;  // 256
constexpr kvc::DType kDType = kvc::DType::kBF16;
//! Bias of each KV head's decision neuron above DMC's offset (5): merge rates ~50% and ~76%.
constexpr float kDecisionBias[kKvHeads] = {0.0f, 0.7f};

struct Options {
  std::vector<kvc::PolicyKind> policies;
  std::string device = "auto";
  int layers = 2;
  int batch = 4;
  int steps = 64;
  int prompt = 16;
  int gen = 48;
  int budget = 16;
  std::uint64_t seed = 1;
};

void usage(char const* program) {
  std::printf(
      "usage: %s [--policy full|dmc|h2o|tova|all] [--device cpu|gpu|auto] [--layers N]\n"
      "          [--batch N] [--steps N] [--prompt N] [--gen N] [--budget N] [--seed S]\n"
      "  A random-weight transformer (8 q heads / 2 KV heads, D 128, width 512) decoding with\n"
      "  continuous batching through each policy's KV cache; prints tokens/s and cache memory.\n"
      "  --policy  cache policy, or all (default)     --device  cpu, gpu or auto (default)\n"
      "  --layers  transformer blocks (1..64, 2)      --batch   live sequences (1..256, 4)\n"
      "  --steps   decode steps (1..100000, 64)       --prompt  prompt tokens (1..4096, 16)\n"
      "  --gen     max generated tokens (2..4096, 48) --budget  H2O/TOVA slots per head (16)\n",
      program);
}

bool parse_int(char const* text, int lo, int hi, int& out) {
  char* end = nullptr;
  long const value = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || value < lo || value > hi) return false;
  out = static_cast<int>(value);
  return true;
}

//! 0: run; 1: usage error; 2: --help.
int parse(int argc, char** argv, Options& o) {
  std::string policy = "all";
  for (int i = 1; i < argc; ++i) {
    std::string const arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      usage(argv[0]);
      return 2;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "missing value for %s\n", arg.c_str());
      return 1;
    }
    char const* value = argv[++i];
    bool ok = true;
    if (arg == "--policy") {
      policy = value;
    } else if (arg == "--device") {
      o.device = value;
      ok = o.device == "cpu" || o.device == "gpu" || o.device == "auto";
    } else if (arg == "--layers") {
      ok = parse_int(value, 1, 64, o.layers);
    } else if (arg == "--batch") {
      ok = parse_int(value, 1, 256, o.batch);
    } else if (arg == "--steps") {
      ok = parse_int(value, 1, 100000, o.steps);
    } else if (arg == "--prompt") {
      ok = parse_int(value, 1, 4096, o.prompt);
    } else if (arg == "--gen") {
      ok = parse_int(value, 2, 4096, o.gen);
    } else if (arg == "--budget") {
      ok = parse_int(value, 2, 65536, o.budget);
    } else if (arg == "--seed") {
      o.seed = std::strtoull(value, nullptr, 10);
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "bad argument %s %s\n", arg.c_str(), value);
      usage(argv[0]);
      return 1;
    }
  }
  if (policy == "all") {
    o.policies = {kvc::PolicyKind::kFull, kvc::PolicyKind::kDmc, kvc::PolicyKind::kH2O,
                  kvc::PolicyKind::kTova};
  } else {
    kvc::PolicyKind kind;
    if (!kvc::parse_policy(policy.c_str(), kind)) {
      std::fprintf(stderr, "unknown policy '%s'\n", policy.c_str());
      return 1;
    }
    o.policies = {kind};
  }
  return 0;
}

kvc::PolicyConfig policy_config(kvc::PolicyKind kind, int budget) {
  kvc::PolicyConfig config;
  config.kind = kind;
  config.dmc = kvc::DmcConfig::checkpoint();
  config.h2o = kvc::H2OConfig{budget / 2, budget - budget / 2};
  config.tova = kvc::TovaConfig{budget, false};
  return config;
}

//! The weights of one block (fp32, row-major [in, out]).
struct Block {
  std::vector<float> attn_norm;  // [kModel]
  std::vector<float> wq;         // [kModel, kQDim]
  std::vector<float> wk;         // [kModel, kKvDim]
  std::vector<float> bk;         // [kKvDim]  zero except the decision neurons
  std::vector<float> wv;         // [kModel, kKvDim]
  std::vector<float> wo;         // [kQDim, kModel]
  std::vector<float> mlp_norm;   // [kModel]
  std::vector<float> w_gate;     // [kModel, kFfn]
  std::vector<float> w_up;       // [kModel, kFfn]
  std::vector<float> w_down;     // [kFfn, kModel]
};

struct Model {
  std::vector<float> embed;       // [kVocab, kModel]
  std::vector<Block> blocks;      // [layers]
  std::vector<float> final_norm;  // [kModel]
  std::vector<float> lm_head;     // [kModel, kVocab]
};

std::vector<float> random_matrix(std::mt19937_64& rng, int in, int out) {
  std::normal_distribution<float> normal(0.0f, 1.0f / std::sqrt(static_cast<float>(in)));
  std::vector<float> w(static_cast<std::size_t>(in) * out);
  for (float& x : w) x = normal(rng);
  return w;
}

Model make_model(int layers, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Model m;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  m.embed.resize(static_cast<std::size_t>(kVocab) * kModel);
  for (float& x : m.embed) x = normal(rng);
  for (int l = 0; l < layers; ++l) {
    Block b;
    b.attn_norm.assign(kModel, 1.0f);
    b.mlp_norm.assign(kModel, 1.0f);
    b.wq = random_matrix(rng, kModel, kQDim);
    b.wk = random_matrix(rng, kModel, kKvDim);
    b.wv = random_matrix(rng, kModel, kKvDim);
    b.wo = random_matrix(rng, kQDim, kModel);
    b.w_gate = random_matrix(rng, kModel, kFfn);
    b.w_up = random_matrix(rng, kModel, kFfn);
    b.w_down = random_matrix(rng, kFfn, kModel);
    b.bk.assign(kKvDim, 0.0f);
    for (int h = 0; h < kKvHeads; ++h) b.bk[h * kHeadDim + kHeadDim - 1] = 5.0f + kDecisionBias[h];
    m.blocks.push_back(std::move(b));
  }
  m.final_norm.assign(kModel, 1.0f);
  m.lm_head = random_matrix(rng, kModel, kVocab);
  return m;
}

//! What a cache holds now: bytes of K and V, slots and tokens (for the compression ratio).
struct CacheUsage {
  std::int64_t bytes = 0;
  double compression_ratio = 1.0;
};

//! One execution path: a model plus a KV cache of one policy.
class Engine {
 public:
  virtual ~Engine() = default;
  //! Adds a sequence, prefills `prompt`, returns its id and first generated token.
  virtual bool join(std::vector<int> const& prompt, int& id, int& next) = 0;
  //! One decode step of `ids` fed `tokens`; `next` receives each row's next token.
  virtual bool step(std::vector<int> const& ids, std::vector<int> const& tokens,
                    std::vector<int>& next) = 0;
  virtual bool leave(int id) = 0;
  virtual bool usage(CacheUsage& out) = 0;
};

// ---------------------------------------------------------------------------------------------
// CPU path: host loops and the reference cache.

//! y[r, :] = x[r, :] W (+ y when accumulate). x [rows, in], W [in, out], y [rows, out].
void matmul(float const* x, std::vector<float> const& w, int rows, int in, int out, float* y,
            bool accumulate) {
  for (int r = 0; r < rows; ++r) {
    float* yr = y + static_cast<std::size_t>(r) * out;
    if (!accumulate) std::fill(yr, yr + out, 0.0f);
    for (int k = 0; k < in; ++k) {
      float const a = x[static_cast<std::size_t>(r) * in + k];
      float const* wk = w.data() + static_cast<std::size_t>(k) * out;
      for (int n = 0; n < out; ++n) yr[n] += a * wk[n];
    }
  }
}

//! y[r, :] = x[r, :] / rms(x[r, :]) * g. x, y [rows, kModel].
void rmsnorm(float const* x, std::vector<float> const& g, int rows, float* y) {
  for (int r = 0; r < rows; ++r) {
    float const* xr = x + static_cast<std::size_t>(r) * kModel;
    double sum = 0.0;
    for (int i = 0; i < kModel; ++i) sum += static_cast<double>(xr[i]) * xr[i];
    float const inv = static_cast<float>(1.0 / std::sqrt(sum / kModel + 1e-6));
    for (int i = 0; i < kModel; ++i)
      y[static_cast<std::size_t>(r) * kModel + i] = xr[i] * inv * g[i];
  }
}

int argmax(float const* logits) {
  return static_cast<int>(std::max_element(logits, logits + kVocab) - logits);
}

class CpuEngine : public Engine {
 public:
  CpuEngine(Model const& model, kvc::PolicyConfig const& policy, int max_seqs)
      : model_(model), policy_(policy), caches_(static_cast<std::size_t>(max_seqs)) {
    spec_.num_q_heads = kQHeads;
    spec_.num_kv_heads = kKvHeads;
    spec_.head_dim = kHeadDim;
    spec_.dtype = kDType;
  }

  bool join(std::vector<int> const& prompt, int& id, int& next) override {
    id = -1;
    for (std::size_t s = 0; s < caches_.size() && id < 0; ++s) {
      if (caches_[s].empty()) id = static_cast<int>(s);
    }
    if (id < 0) return false;
    std::vector<kvc::reference::LayerCache>& layers = caches_[static_cast<std::size_t>(id)];
    layers.resize(model_.blocks.size());
    for (kvc::reference::LayerCache& cache : layers) {
      if (kvc::reference::LayerCache::create(spec_, policy_, cache) != kvc::Status::kSuccess) {
        return false;
      }
    }
    int const t = static_cast<int>(prompt.size());
    std::vector<float> x = embed(prompt);
    for (std::size_t l = 0; l < model_.blocks.size(); ++l) {
      if (!block(l, t, x,
                 [&](std::vector<float> const& q, std::vector<float> const& k,
                     std::vector<float> const& v, std::vector<float>& attn) {
                   kvc::reference::AttentionOutput out;
                   kvc::reference::PrefillInput const input{t, q, k, v};
                   if (layers[l].prefill(input, out) != kvc::Status::kSuccess) return false;
                   attn = std::move(out.out);
                   return true;
                 })) {
        return false;
      }
    }
    next = sample(x, t - 1);
    return true;
  }

  bool step(std::vector<int> const& ids, std::vector<int> const& tokens,
            std::vector<int>& next) override {
    int const rows = static_cast<int>(ids.size());
    std::vector<float> x = embed(tokens);
    for (std::size_t l = 0; l < model_.blocks.size(); ++l) {
      if (!block(l, rows, x,
                 [&](std::vector<float> const& q, std::vector<float> const& k,
                     std::vector<float> const& v, std::vector<float>& attn) {
                   attn.resize(static_cast<std::size_t>(rows) * kQDim);
                   for (int r = 0; r < rows; ++r) {
                     std::size_t const rr = static_cast<std::size_t>(r);
                     kvc::reference::DecodeInput const input{
                         kvc::reference::ConstSpan(q.data() + rr * kQDim, kQDim),
                         kvc::reference::ConstSpan(k.data() + rr * kKvDim, kKvDim),
                         kvc::reference::ConstSpan(v.data() + rr * kKvDim, kKvDim)};
                     kvc::reference::AttentionOutput out;
                     kvc::reference::LayerCache& cache =
                         caches_[static_cast<std::size_t>(ids[rr])][l];
                     if (cache.decode_step(input, out) != kvc::Status::kSuccess) return false;
                     std::copy(out.out.begin(), out.out.end(), attn.begin() + rr * kQDim);
                   }
                   return true;
                 })) {
        return false;
      }
    }
    next.resize(ids.size());
    for (int r = 0; r < rows; ++r) next[static_cast<std::size_t>(r)] = sample(x, r);
    return true;
  }

  bool leave(int id) override {
    caches_[static_cast<std::size_t>(id)].clear();
    return true;
  }

  bool usage(CacheUsage& out) override {
    std::int64_t bytes = 0;
    double tokens = 0.0;
    double slots = 0.0;
    for (std::vector<kvc::reference::LayerCache> const& layers : caches_) {
      for (kvc::reference::LayerCache const& cache : layers) {
        bytes += cache.bytes();
        tokens += static_cast<double>(cache.tokens_seen()) * kKvHeads;
        slots += static_cast<double>(cache.total_slots());
      }
    }
    out.bytes = bytes;
    out.compression_ratio = slots > 0.0 ? tokens / slots : 1.0;
    return true;
  }

 private:
  std::vector<float> embed(std::vector<int> const& tokens) const {
    std::vector<float> x(tokens.size() * kModel);
    for (std::size_t r = 0; r < tokens.size(); ++r) {
      std::copy_n(model_.embed.begin() + static_cast<std::size_t>(tokens[r]) * kModel, kModel,
                  x.begin() + r * kModel);
    }
    return x;
  }

  //! One transformer block over `rows` rows of x [rows, kModel], attention by `attend`.
  template <class Attend>
  bool block(std::size_t layer, int rows, std::vector<float>& x, Attend&& attend) const {
    Block const& b = model_.blocks[layer];
    std::size_t const n = static_cast<std::size_t>(rows);
    std::vector<float> h(n * kModel), q(n * kQDim), k(n * kKvDim), v(n * kKvDim), attn;
    rmsnorm(x.data(), b.attn_norm, rows, h.data());
    matmul(h.data(), b.wq, rows, kModel, kQDim, q.data(), false);
    matmul(h.data(), b.wk, rows, kModel, kKvDim, k.data(), false);
    for (std::size_t r = 0; r < n; ++r) {
      for (int i = 0; i < kKvDim; ++i) k[r * kKvDim + i] += b.bk[i];
    }
    matmul(h.data(), b.wv, rows, kModel, kKvDim, v.data(), false);
    if (!attend(q, k, v, attn)) return false;  // attn [rows, kQDim]
    matmul(attn.data(), b.wo, rows, kQDim, kModel, x.data(), true);
    rmsnorm(x.data(), b.mlp_norm, rows, h.data());
    std::vector<float> gate(n * kFfn), up(n * kFfn);
    matmul(h.data(), b.w_gate, rows, kModel, kFfn, gate.data(), false);
    matmul(h.data(), b.w_up, rows, kModel, kFfn, up.data(), false);
    for (std::size_t i = 0; i < gate.size(); ++i) {
      gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    }
    matmul(gate.data(), b.w_down, rows, kFfn, kModel, x.data(), true);
    return true;
  }

  int sample(std::vector<float> const& x, int row) const {
    std::vector<float> h(kModel), logits(kVocab);
    rmsnorm(x.data() + static_cast<std::size_t>(row) * kModel, model_.final_norm, 1, h.data());
    matmul(h.data(), model_.lm_head, 1, kModel, kVocab, logits.data(), false);
    return argmax(logits.data());
  }

  Model const& model_;
  kvc::PolicyConfig policy_;
  kvc::reference::LayerSpec spec_;
  std::vector<std::vector<kvc::reference::LayerCache>> caches_;  // [max_seqs][layers] or empty
};

// ---------------------------------------------------------------------------------------------
// GPU path: simple fp32 kernels for the model, kvc::KVCache (bf16) for the cache.
#if KVC_EXAMPLE_CUDA

bool cuda_ok(cudaError_t error, char const* what) {
  if (error == cudaSuccess) return true;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(error));
  return false;
}

bool kvc_ok(kvc::Status status, char const* what) {
  if (status == kvc::Status::kSuccess) return true;
  std::fprintf(stderr, "%s: %s\n", what, kvc::to_string(status));
  return false;
}

//! x[r, :] = table[tokens[r], :]. grid: rows.
__global__ void embed_kernel(float const* table, int const* tokens, float* x) {
  int const r = blockIdx.x;
  for (int i = threadIdx.x; i < kModel; i += blockDim.x) {
    x[r * kModel + i] = table[tokens[r] * kModel + i];
  }
}

//! y[r, :] = x[r, :] / rms * g. grid: rows, 256 threads.
__global__ void rmsnorm_kernel(float const* x, float const* g, float* y) {
  __shared__ float partial[256];
  int const r = blockIdx.x;
  float sum = 0.0f;
  for (int i = threadIdx.x; i < kModel; i += blockDim.x)
    sum += x[r * kModel + i] * x[r * kModel + i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  float const inv = rsqrtf(partial[0] / kModel + 1e-6f);
  for (int i = threadIdx.x; i < kModel; i += blockDim.x)
    y[r * kModel + i] = x[r * kModel + i] * inv * g[i];
}

//! y[r, n] (+)= sum_k x[r, k] w[k, n] + bias[n]. grid: (ceil(out / 256), rows).
__global__ void matmul_kernel(float const* x, float const* w, float const* bias, float* y, int in,
                              int out, int accumulate) {
  int const n = blockIdx.x * blockDim.x + threadIdx.x;
  int const r = blockIdx.y;
  if (n >= out) return;
  float sum = bias != nullptr ? bias[n] : 0.0f;
  for (int k = 0; k < in; ++k)
    sum += x[static_cast<std::size_t>(r) * in + k] * w[static_cast<std::size_t>(k) * out + n];
  float* target = y + static_cast<std::size_t>(r) * out + n;
  *target = accumulate ? *target + sum : sum;
}

__global__ void to_bf16_kernel(float const* in, __nv_bfloat16* out, int count) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) out[i] = __float2bfloat16_rn(in[i]);
}

__global__ void from_bf16_kernel(__nv_bfloat16 const* in, float* out, int count) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) out[i] = __bfloat162float(in[i]);
}

//! gate = silu(gate) * up.
__global__ void swiglu_kernel(float* gate, float const* up, int count) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) gate[i] = gate[i] / (1.0f + __expf(-gate[i])) * up[i];
}

//! next[r] = argmax logits[r, :] (lowest index among equals). grid: rows, 256 threads.
__global__ void argmax_kernel(float const* logits, int* next) {
  __shared__ float best[256];
  __shared__ int index[256];
  int const r = blockIdx.x;
  float b = -INFINITY;
  int bi = 0;
  for (int i = threadIdx.x; i < kVocab; i += blockDim.x) {
    float const value = logits[r * kVocab + i];
    if (value > b) {
      b = value;
      bi = i;
    }
  }
  best[threadIdx.x] = b;
  index[threadIdx.x] = bi;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    int const t = threadIdx.x;
    if (t < s && (best[t + s] > best[t] || (best[t + s] == best[t] && index[t + s] < index[t]))) {
      best[t] = best[t + s];
      index[t] = index[t + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) next[r] = index[0];
}

int blocks_for(int count) {
  return (count + 255) / 256;
}

//! A device copy of a host vector, freed with the engine.
class DeviceArrays {
 public:
  ~DeviceArrays() {
    for (void* p : owned_) cudaFree(p);
  }
  template <class U>
  U* alloc(std::size_t count) {
    void* p = nullptr;
    if (cudaMalloc(&p, std::max<std::size_t>(count, 1) * sizeof(U)) != cudaSuccess) return nullptr;
    owned_.push_back(p);
    return static_cast<U*>(p);
  }
  float* upload(std::vector<float> const& host) {
    float* p = alloc<float>(host.size());
    if (p != nullptr)
      cudaMemcpy(p, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice);
    return p;
  }

 private:
  std::vector<void*> owned_;
};

class GpuEngine : public Engine {
 public:
  struct DeviceBlock {
    float *attn_norm, *wq, *wk, *bk, *wv, *wo, *mlp_norm, *w_gate, *w_up, *w_down;
  };

  //! Uploads the weights and creates the cache; `ok()` says whether it worked.
  GpuEngine(Model const& model, kvc::PolicyConfig const& policy, Options const& o) {
    cudaStreamCreate(&stream_);
    for (Block const& b : model.blocks) {
      blocks_.push_back(DeviceBlock{mem_.upload(b.attn_norm), mem_.upload(b.wq), mem_.upload(b.wk),
                                    mem_.upload(b.bk), mem_.upload(b.wv), mem_.upload(b.wo),
                                    mem_.upload(b.mlp_norm), mem_.upload(b.w_gate),
                                    mem_.upload(b.w_up), mem_.upload(b.w_down)});
    }
    embed_ = mem_.upload(model.embed);
    final_norm_ = mem_.upload(model.final_norm);
    lm_head_ = mem_.upload(model.lm_head);
    rows_ = std::max(o.prompt, o.batch);
    std::size_t const rows = static_cast<std::size_t>(rows_);
    x_ = mem_.alloc<float>(rows * kModel);
    h_ = mem_.alloc<float>(rows * kModel);
    q_ = mem_.alloc<float>(rows * kQDim);
    k_ = mem_.alloc<float>(rows * kKvDim);
    v_ = mem_.alloc<float>(rows * kKvDim);
    attn_ = mem_.alloc<float>(rows * kQDim);
    gate_ = mem_.alloc<float>(rows * kFfn);
    up_ = mem_.alloc<float>(rows * kFfn);
    logits_ = mem_.alloc<float>(rows * kVocab);
    tokens_ = mem_.alloc<int>(rows);
    next_ = mem_.alloc<int>(rows);
    q16_ = mem_.alloc<__nv_bfloat16>(rows * kQDim);
    k16_ = mem_.alloc<__nv_bfloat16>(rows * kKvDim);
    v16_ = mem_.alloc<__nv_bfloat16>(rows * kKvDim);
    out16_ = mem_.alloc<__nv_bfloat16>(rows * kQDim);

    kvc::KVCacheConfig config;
    config.shape = kvc::ModelShape{o.layers, kQHeads, kKvHeads, kHeadDim};
    config.dtype = kDType;
    config.policy = policy;
    config.max_seqs = o.batch;
    config.max_tokens_per_seq = o.prompt + o.gen + 1;
    config.max_prefill_tokens = o.prompt;  // one prompt per prefill step
    ok_ = kvc_ok(kvc::KVCache::create(config, stream_, cache_), "KVCache::create") &&
          q16_ != nullptr && out16_ != nullptr && lm_head_ != nullptr;
  }
  ~GpuEngine() override {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  bool ok() const { return ok_; }

  bool join(std::vector<int> const& prompt, int& id, int& next) override {
    if (!kvc_ok(cache_.add_sequence(id, stream_), "add_sequence")) return false;
    int const t = static_cast<int>(prompt.size());
    if (!embed(prompt)) return false;
    if (!kvc_ok(cache_.begin_prefill(&id, &t, 1, stream_), "begin_prefill")) return false;
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      if (!block(l, t, [&] {
            return kvc_ok(
                cache_.prefill_layer(static_cast<int>(l), q16_, k16_, v16_, out16_, stream_),
                "prefill_layer");
          })) {
        return false;
      }
    }
    if (!kvc_ok(cache_.end_prefill(stream_), "end_prefill") ||
        !kvc_ok(cache_.step_status_sync(), "prefill (device)")) {
      return false;
    }
    std::vector<int> first;
    if (!sample(t - 1, 1, first)) return false;
    next = first[0];
    return true;
  }

  bool step(std::vector<int> const& ids, std::vector<int> const& tokens,
            std::vector<int>& next) override {
    int const rows = static_cast<int>(ids.size());
    if (!embed(tokens)) return false;
    if (!kvc_ok(cache_.begin_step(ids.data(), rows, stream_), "begin_step")) return false;
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      if (!block(l, rows, [&] {
            return kvc_ok(
                cache_.decode_layer(static_cast<int>(l), q16_, k16_, v16_, out16_, stream_),
                "decode_layer");
          })) {
        return false;
      }
    }
    if (!kvc_ok(cache_.end_step(stream_), "end_step")) return false;
    if (!sample(0, rows, next)) return false;  // synchronises (the tokens go to the host)
    return kvc_ok(cache_.step_status_sync(), "decode step (device)");
  }

  bool leave(int id) override { return kvc_ok(cache_.release_sequence(id, stream_), "release"); }

  bool usage(CacheUsage& out) override {
    kvc::CacheStats stats;
    if (!kvc_ok(cache_.stats_sync(stats, stream_), "stats")) return false;
    out.bytes = stats.store.bytes_in_use;
    out.compression_ratio = stats.compression_ratio();
    return true;
  }

 private:
  bool embed(std::vector<int> const& tokens) {
    int const rows = static_cast<int>(tokens.size());
    if (rows > rows_) return false;
    if (!cuda_ok(cudaMemcpyAsync(tokens_, tokens.data(), tokens.size() * sizeof(int),
                                 cudaMemcpyHostToDevice, stream_),
                 "tokens")) {
      return false;
    }
    embed_kernel<<<rows, 256, 0, stream_>>>(embed_, tokens_, x_);
    return cuda_ok(cudaGetLastError(), "embed");
  }

  void mm(float const* x, float const* w, float const* bias, float* y, int rows, int in, int out,
          bool accumulate) {
    matmul_kernel<<<dim3(blocks_for(out), rows), 256, 0, stream_>>>(x, w, bias, y, in, out,
                                                                    accumulate ? 1 : 0);
  }

  //! One block over `rows` rows of x_; `attend` runs the cache on q16_, k16_, v16_ -> out16_.
  template <class Attend>
  bool block(std::size_t layer, int rows, Attend&& attend) {
    DeviceBlock const& b = blocks_[layer];
    rmsnorm_kernel<<<rows, 256, 0, stream_>>>(x_, b.attn_norm, h_);
    mm(h_, b.wq, nullptr, q_, rows, kModel, kQDim, false);
    mm(h_, b.wk, b.bk, k_, rows, kModel, kKvDim, false);
    mm(h_, b.wv, nullptr, v_, rows, kModel, kKvDim, false);
    to_bf16_kernel<<<blocks_for(rows * kQDim), 256, 0, stream_>>>(q_, q16_, rows * kQDim);
    to_bf16_kernel<<<blocks_for(rows * kKvDim), 256, 0, stream_>>>(k_, k16_, rows * kKvDim);
    to_bf16_kernel<<<blocks_for(rows * kKvDim), 256, 0, stream_>>>(v_, v16_, rows * kKvDim);
    if (!cuda_ok(cudaGetLastError(), "projections") || !attend()) return false;
    from_bf16_kernel<<<blocks_for(rows * kQDim), 256, 0, stream_>>>(out16_, attn_, rows * kQDim);
    mm(attn_, b.wo, nullptr, x_, rows, kQDim, kModel, true);
    rmsnorm_kernel<<<rows, 256, 0, stream_>>>(x_, b.mlp_norm, h_);
    mm(h_, b.w_gate, nullptr, gate_, rows, kModel, kFfn, false);
    mm(h_, b.w_up, nullptr, up_, rows, kModel, kFfn, false);
    swiglu_kernel<<<blocks_for(rows * kFfn), 256, 0, stream_>>>(gate_, up_, rows * kFfn);
    mm(gate_, b.w_down, nullptr, x_, rows, kFfn, kModel, true);
    return cuda_ok(cudaGetLastError(), "block");
  }

  //! Greedy next tokens of rows [first, first + rows) of x_ (synchronises the stream).
  bool sample(int first, int rows, std::vector<int>& next) {
    float const* x = x_ + static_cast<std::size_t>(first) * kModel;
    rmsnorm_kernel<<<rows, 256, 0, stream_>>>(x, final_norm_, h_);
    mm(h_, lm_head_, nullptr, logits_, rows, kModel, kVocab, false);
    argmax_kernel<<<rows, 256, 0, stream_>>>(logits_, next_);
    next.resize(static_cast<std::size_t>(rows));
    return cuda_ok(cudaMemcpyAsync(next.data(), next_, rows * sizeof(int), cudaMemcpyDeviceToHost,
                                   stream_),
                   "next tokens") &&
           cuda_ok(cudaStreamSynchronize(stream_), "step");
  }

  DeviceArrays mem_;
  cudaStream_t stream_ = nullptr;
  std::vector<DeviceBlock> blocks_;
  float *embed_ = nullptr, *final_norm_ = nullptr, *lm_head_ = nullptr;
  int rows_ = 0;
  float *x_ = nullptr, *h_ = nullptr, *q_ = nullptr, *k_ = nullptr, *v_ = nullptr;
  float *attn_ = nullptr, *gate_ = nullptr, *up_ = nullptr, *logits_ = nullptr;
  int *tokens_ = nullptr, *next_ = nullptr;
  __nv_bfloat16 *q16_ = nullptr, *k16_ = nullptr, *v16_ = nullptr, *out16_ = nullptr;
  kvc::KVCache cache_;
  bool ok_ = false;
};

#endif  // KVC_EXAMPLE_CUDA

struct RunResult {
  int finished = 0;      // sequences that generated all their tokens and left
  int generated = 0;     // decode tokens
  int prefilled = 0;     // prompt tokens
  double seconds = 0.0;  // wall time of the loop (prefill and decode)
  std::int64_t peak_bytes = 0;
  double compression_ratio = 1.0;  // at the end
};

//! The continuous-batching loop: keep `batch` sequences live, step them all, retire the ones
//! that are done, admit new ones.
bool run(Engine& engine, Options const& o, RunResult& result) {
  struct Live {
    int id;
    int token;
    int remaining;
  };
  std::mt19937_64 rng(o.seed + 17);
  std::uniform_int_distribution<int> token_dist(0, kVocab - 1);
  std::uniform_int_distribution<int> length_dist(o.gen / 2, o.gen);
  std::vector<Live> live;
  auto const start = std::chrono::steady_clock::now();
  for (int s = 0; s < o.steps; ++s) {
    while (static_cast<int>(live.size()) < o.batch) {
      std::vector<int> prompt(static_cast<std::size_t>(o.prompt));
      for (int& t : prompt) t = token_dist(rng);
      Live seq{-1, 0, length_dist(rng) - 1};  // the prefill already generated one token
      if (!engine.join(prompt, seq.id, seq.token)) return false;
      result.prefilled += o.prompt;
      ++result.generated;
      live.push_back(seq);
    }
    std::vector<int> ids, tokens, next;
    for (Live const& seq : live) {
      ids.push_back(seq.id);
      tokens.push_back(seq.token);
    }
    if (!engine.step(ids, tokens, next)) return false;
    CacheUsage usage;
    if (!engine.usage(usage)) return false;
    result.peak_bytes = std::max(result.peak_bytes, usage.bytes);
    result.compression_ratio = usage.compression_ratio;
    for (std::size_t r = 0; r < live.size(); ++r) {
      live[r].token = next[r];
      --live[r].remaining;
      ++result.generated;
    }
    for (std::size_t r = live.size(); r-- > 0;) {
      if (live[r].remaining <= 0) {
        if (!engine.leave(live[r].id)) return false;
        live.erase(live.begin() + static_cast<std::ptrdiff_t>(r));
        ++result.finished;
      }
    }
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (int const parsed = parse(argc, argv, o)) return parsed == 2 ? 0 : 1;
  bool use_gpu = false;
  if (!kvc::example::choose_device(o.device, use_gpu)) return 1;
  char const* device = use_gpu ? "gpu" : "cpu";

  Model const model = make_model(o.layers, o.seed);
  std::printf(
      "kvc engine loop: %d layers, %d q heads / %d KV heads, D %d, width %d, MLP %d, vocab %d, "
      "bf16 cache\n"
      "continuous batching: %d live sequences, %d-token prompts, %d..%d generated tokens each, "
      "%d decode steps; H2O/TOVA budget %d\n"
      "device: %s%s\n\n",
      o.layers, kQHeads, kKvHeads, kHeadDim, kModel, kFfn, kVocab, o.batch, o.prompt, o.gen / 2,
      o.gen, o.steps, o.budget, device,
      use_gpu ? " (model: simple CUDA kernels; cache: kvc::KVCache)"
              : " (model: host loops; cache: kvc::reference::LayerCache)");
  std::printf("%-6s %-6s %6s %9s %10s %-5s %14s %6s\n", "policy", "device", "done", "tokens",
              "speed", "", "peak KV KiB", "CR");
  for (kvc::PolicyKind kind : o.policies) {
    kvc::PolicyConfig const policy = policy_config(kind, o.budget);
    std::unique_ptr<Engine> engine;
#if KVC_EXAMPLE_CUDA
    if (use_gpu) {
      auto gpu = std::make_unique<GpuEngine>(model, policy, o);
      if (!gpu->ok()) return 1;
      engine = std::move(gpu);
    }
#endif
    if (!engine) engine = std::make_unique<CpuEngine>(model, policy, o.batch);
    RunResult result;
    if (!run(*engine, o, result)) {
      std::fprintf(stderr, "%s: the run failed\n", kvc::policy_name(kind));
      return 1;
    }
    std::printf("%-6s %-6s %6d %9d %10.1f tok/s %14.1f %6.2f\n", kvc::policy_name(kind), device,
                result.finished, result.generated, result.generated / result.seconds,
                static_cast<double>(result.peak_bytes) / 1024.0, result.compression_ratio);
  }
  std::printf(
      "\ntokens = generated tokens (the first of each sequence comes from its prefill); speed =\n"
      "tokens / wall time of the whole loop, prefill included. Peak KV = the most bytes of K and\n"
      "V held at once (slots * D * 2 * 2 bytes); CR = tokens seen * KV heads / slots kept, at the\n"
      "end. Random weights: the tokens mean nothing; the cache behaviour is real.\n");
  return 0;
}
