// kvc_policy_comparison: one synthetic attention layer, one sequence, every cache policy.
//
// A stream of pre-RoPE q, k, v (8 KV heads, 32 query heads, head dim 64, bf16) is fed through
// the CPU reference of each policy (kvc::reference::LayerCache): a prompt chunk first, then one
// decode token at a time. Each KV head's DMC decision neuron (dim D-1, checkpoint mode) is drawn
// so that the head has its own target compression ratio r (merge probability 1 - 1/r). H2O and
// TOVA get DMC's mean slots per head as their budget, so they keep the same number of bytes.
// The table reports slots, compression ratio (CR), bytes of K and V, and how far each policy's
// attention output is from the full cache's.
//
// GPU path: in a CUDA build (the file compiled by nvcc, KVC_EXAMPLE_CUDA=1) and with a CUDA
// device present, every policy also runs through kvc's GPU path (kvc::BasicKVCache: the paged
// store, the parallel prefill and decode attention) and the program reports the largest
// difference from the CPU reference. Decode and prefill attention are compiled here for the one
// configuration the demo needs (bf16, head dim 64, G = 4), so building the demo alone stays
// quick; the pooled GQA rows (G = 16, which has no kernel) use the double-precision oracle
// decode attention and feed the prompt as decode steps (exact for their policies, Full and
// DMC). Without a device (or with --device cpu) the program is the CPU reference only.
//
// Usage: kvc_policy_comparison [--tokens N] [--seed S] [--device cpu|gpu|auto] [--help]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/status.hpp"
#include "kvc/policy/kind.hpp"
#include "kvc/reference/layer_cache.hpp"
#include "kvc/reference/types.hpp"

#include "example_support.hpp"

#if KVC_EXAMPLE_CUDA
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kvc/attention/variant.hpp"
#include "kvc/engine/instantiated_attention.cuh"
#include "kvc/engine/kv_cache.cuh"
#include "kvc/engine/oracle_attention.cuh"
#endif

namespace {

using kvc::DType;
using kvc::PolicyConfig;
using kvc::PolicyKind;
using kvc::Status;
using kvc::reference::AttentionOutput;
using kvc::reference::ConstSpan;
using kvc::reference::DecodeInput;
using kvc::reference::LayerCache;
using kvc::reference::LayerSpec;
using kvc::reference::PrefillInput;

constexpr int kKvHeads = 8;
constexpr int kQHeads = 32;
constexpr int kHeadDim = 64;
constexpr int kPoolGroup = 4;  // GQA pooling: 4 KV heads -> 1
constexpr DType kDType = DType::kBF16;
//! Target DMC compression ratio of each KV head.
constexpr double kTargetRatio[kKvHeads] = {1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0};

struct Options {
  int tokens = 1024;
  std::uint64_t seed = 1;
  std::string device = "auto";  // cpu, gpu or auto
};

void print_usage(char const* program) {
  std::printf(
      "usage: %s [--tokens N] [--seed S] [--device cpu|gpu|auto] [--help]\n"
      "  Feeds one synthetic attention layer (%d KV heads, %d query heads, head dim %d, bf16)\n"
      "  through every kvc cache policy on the CPU reference and prints slots, compression\n"
      "  ratio, KV bytes and the attention-output error against the full cache. With a CUDA\n"
      "  device, also runs every policy on the GPU and reports its difference from the CPU.\n"
      "  --tokens N  tokens in the stream (2..65536, default 1024; the first 1/8 is the prompt)\n"
      "  --seed S    seed of the synthetic stream (default 1)\n"
      "  --device D  cpu (reference only), gpu (fail without a device) or auto (default)\n",
      program, kKvHeads, kQHeads, kHeadDim);
}

//! Returns 0 to run, 1 on a usage error, 2 after --help.
int parse_options(int argc, char** argv, Options& options) {
  for (int i = 1; i < argc; ++i) {
    char const* arg = argv[i];
    if (std::strcmp(arg, "--help") == 0 || std::strcmp(arg, "-h") == 0) {
      print_usage(argv[0]);
      return 2;
    }
    bool const has_value = i + 1 < argc;
    if (std::strcmp(arg, "--tokens") == 0 && has_value) {
      char* end = nullptr;
      long const value = std::strtol(argv[++i], &end, 10);
      if (*end != '\0' || value < 2 || value > 65536) {
        std::fprintf(stderr, "--tokens wants an integer in [2, 65536], got '%s'\n", argv[i]);
        return 1;
      }
      options.tokens = static_cast<int>(value);
    } else if (std::strcmp(arg, "--seed") == 0 && has_value) {
      char* end = nullptr;
      options.seed = std::strtoull(argv[++i], &end, 10);
      if (*end != '\0') {
        std::fprintf(stderr, "--seed wants an unsigned integer, got '%s'\n", argv[i]);
        return 1;
      }
    } else if (std::strcmp(arg, "--device") == 0 && has_value) {
      options.device = argv[++i];
      if (options.device != "cpu" && options.device != "gpu" && options.device != "auto") {
        std::fprintf(stderr, "--device wants cpu, gpu or auto, got '%s'\n", argv[i]);
        return 1;
      }
    } else {
      std::fprintf(stderr, "unknown or incomplete argument '%s'\n", arg);
      print_usage(argv[0]);
      return 1;
    }
  }
  return 0;
}

//! Pre-RoPE q, k, v of T tokens of one layer.
struct Stream {
  int tokens = 0;
  int kv_heads = 0;
  std::vector<float> q;  // [T, kQHeads, kHeadDim]
  std::vector<float> k;  // [T, kv_heads, kHeadDim]
  std::vector<float> v;  // [T, kv_heads, kHeadDim]
};

//! The stream of the synthetic model. Each KV head's tokens come in segments of similar content
//! (runs of mean length r, the head's target CR); the decision neuron marks a segment's
//! continuation, which DMC merges. Attention has structure: every KV head has a direction that
//! its queries share and that a few salient segments' keys carry strongly (heavy hitters), and q
//! and k share a slowly drifting component (locality). Dim D-1 is DMC's decision neuron;
//! the other policies see it as zero (a DMC model's attention ignores it), and its rotate-half
//! partner D/2-1 carries no content, so DMC with only appends would equal the full cache.
//! `with_decisions` selects the DMC view (k[D-1] = 5 +- 1, q[D-1] = omega logit).
Stream make_stream(Options const& options, bool with_decisions) {
  std::mt19937_64 rng(options.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  int const d = kHeadDim;
  int const decision = d - 1;
  int const partner = d / 2 - 1;

  Stream s;
  s.tokens = options.tokens;
  s.kv_heads = kKvHeads;
  std::size_t const t_count = static_cast<std::size_t>(options.tokens);
  s.q.resize(t_count * kQHeads * d);
  s.k.resize(t_count * kKvHeads * d);
  s.v.resize(t_count * kKvHeads * d);

  std::vector<float> direction(static_cast<std::size_t>(kKvHeads) * d);  // [kv_heads, D]
  for (float& x : direction) x = 0.5f * normal(rng);
  std::vector<float> drift(static_cast<std::size_t>(kKvHeads) * d, 0.0f);  // [kv_heads, D]
  // The content of each head's current segment (a run of tokens that DMC may merge).
  std::vector<float> segment_k(static_cast<std::size_t>(kKvHeads) * d);  // [kv_heads, D]
  std::vector<float> segment_v(static_cast<std::size_t>(kKvHeads) * d);  // [kv_heads, D]
  std::vector<float> salience(kKvHeads, 0.0f);
  int const group = kQHeads / kKvHeads;
  for (int t = 0; t < options.tokens; ++t) {
    for (int h = 0; h < kKvHeads; ++h) {
      float* w = drift.data() + static_cast<std::size_t>(h) * d;
      for (int i = 0; i < d; ++i) w[i] = 0.95f * w[i] + 0.16f * normal(rng);
      float const* u = direction.data() + static_cast<std::size_t>(h) * d;
      // A token either continues its head's segment (similar content: what a DMC model learns
      // to merge) or opens a new one with fresh content and its own salience.
      bool const merge = t > 0 && uniform(rng) < 1.0 - 1.0 / kTargetRatio[h];
      float* seg_k = segment_k.data() + static_cast<std::size_t>(h) * d;
      float* seg_v = segment_v.data() + static_cast<std::size_t>(h) * d;
      if (!merge) {
        for (int i = 0; i < d; ++i) {
          seg_k[i] = normal(rng);
          seg_v[i] = normal(rng);
        }
        salience[h] = uniform(rng) < 0.08 ? 2.0f : 0.0f;
      }
      float* k = s.k.data() + (static_cast<std::size_t>(t) * kKvHeads + h) * d;
      float* v = s.v.data() + (static_cast<std::size_t>(t) * kKvHeads + h) * d;
      for (int i = 0; i < d; ++i) {
        k[i] = seg_k[i] + 0.3f * normal(rng) + salience[h] * u[i] + w[i];
        v[i] = seg_v[i] + 0.3f * normal(rng);
      }
      k[decision] = with_decisions ? (merge ? 6.0f : 4.0f) : 0.0f;
      k[partner] = 0.0f;
      for (int g = 0; g < group; ++g) {
        float* q = s.q.data() + (static_cast<std::size_t>(t) * kQHeads + h * group + g) * d;
        for (int i = 0; i < d; ++i) q[i] = normal(rng) + u[i] + w[i];
        float const omega_logit = normal(rng);  // drawn in both views: same stream otherwise
        q[decision] = with_decisions ? omega_logit : 0.0f;
        q[partner] = 0.0f;
      }
    }
  }
  for (std::vector<float>* x : {&s.q, &s.k, &s.v}) kvc::reference::round_in_place(*x, kDType);
  return s;
}

//! GQA as a shape: mean-pool groups of `kPoolGroup` KV heads (keys, values and the decision
//! neuron alike) into one; the query heads stay.
Stream pool_kv_heads(Stream const& in) {
  int const d = kHeadDim;
  Stream out = in;
  out.kv_heads = in.kv_heads / kPoolGroup;
  std::size_t const t_count = static_cast<std::size_t>(in.tokens);
  out.k.assign(t_count * out.kv_heads * d, 0.0f);
  out.v.assign(t_count * out.kv_heads * d, 0.0f);
  for (std::size_t t = 0; t < t_count; ++t) {
    for (int h = 0; h < in.kv_heads; ++h) {
      std::size_t const from = (t * in.kv_heads + h) * d;
      std::size_t const to = (t * out.kv_heads + h / kPoolGroup) * d;
      for (int i = 0; i < d; ++i) {
        out.k[to + i] += in.k[from + i] / kPoolGroup;
        out.v[to + i] += in.v[from + i] / kPoolGroup;
      }
    }
  }
  kvc::reference::round_in_place(out.k, kDType);
  kvc::reference::round_in_place(out.v, kDType);
  return out;
}

LayerSpec spec_for(Stream const& stream) {
  LayerSpec spec;
  spec.num_q_heads = kQHeads;
  spec.num_kv_heads = stream.kv_heads;
  spec.head_dim = kHeadDim;
  spec.dtype = kDType;
  return spec;
}

//! One policy's run: the cache at the end and the decode outputs. // outputs: [steps, Hq, D]
struct Run {
  std::string name;
  LayerCache cache;
  std::vector<float> outputs;
  double seconds = 0.0;
};

bool check(Status status, char const* what) {
  if (status == Status::kSuccess) return true;
  std::fprintf(stderr, "%s failed: %s\n", what, kvc::to_string(status));
  return false;
}

//! Prefills the first `prompt` tokens, then decodes the rest one token at a time.
bool run_policy(char const* name, Stream const& stream, PolicyConfig const& config, int prompt,
                Run& run) {
  auto const start = std::chrono::steady_clock::now();
  LayerSpec const spec = spec_for(stream);
  run.name = name;
  if (!check(LayerCache::create(spec, config, run.cache), name)) return false;
  std::size_t const qn = static_cast<std::size_t>(kQHeads) * kHeadDim;
  std::size_t const kn = static_cast<std::size_t>(stream.kv_heads) * kHeadDim;
  AttentionOutput output;
  PrefillInput const chunk{prompt, ConstSpan(stream.q.data(), prompt * qn),
                           ConstSpan(stream.k.data(), prompt * kn),
                           ConstSpan(stream.v.data(), prompt * kn)};
  if (!check(run.cache.prefill(chunk, output), name)) return false;
  run.outputs.clear();
  run.outputs.reserve((stream.tokens - prompt) * qn);
  for (int t = prompt; t < stream.tokens; ++t) {
    DecodeInput const token{ConstSpan(stream.q.data() + t * qn, qn),
                            ConstSpan(stream.k.data() + t * kn, kn),
                            ConstSpan(stream.v.data() + t * kn, kn)};
    if (!check(run.cache.decode_step(token, output), name)) return false;
    run.outputs.insert(run.outputs.end(), output.out.begin(), output.out.end());
  }
  run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return true;
}

//! Mean over decode steps and query heads of |out - full| / |full| (L2 over the head dim).
double mean_relative_error(std::vector<float> const& outputs, std::vector<float> const& full) {
  std::size_t const rows = full.size() / kHeadDim;
  if (rows == 0) return 0.0;
  double total = 0.0;
  for (std::size_t r = 0; r < rows; ++r) {
    double diff = 0.0;
    double norm = 0.0;
    for (int i = 0; i < kHeadDim; ++i) {
      double const f = full[r * kHeadDim + i];
      double const o = outputs[r * kHeadDim + i];
      diff += (o - f) * (o - f);
      norm += f * f;
    }
    total += norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
  }
  return total / static_cast<double>(rows);
}

double mean_slots(LayerCache const& cache) {
  return static_cast<double>(cache.total_slots()) / static_cast<double>(cache.heads().size());
}

//! One policy's GPU run, compared with the CPU reference.
struct GpuResult {
  std::string attention;   // which decode attention ran
  double max_diff = 0.0;   // max |gpu - reference| over every decode output element
  bool within = true;      // every element within bf16's tolerance
  bool same_slots = true;  // slots per KV head equal the reference's at the end
  double seconds = 0.0;
};

#if KVC_EXAMPLE_CUDA

bool gpu_check(kvc::Status status, char const* what) {
  if (status == kvc::Status::kSuccess) return true;
  std::fprintf(stderr, "GPU %s failed: %s\n", what, kvc::to_string(status));
  return false;
}

//! Runs `stream` through a BasicKVCache<Attention, Prefill>: the prompt with prefill_layer, then
//! one decode step per token; compares the decode outputs and the final slots with `reference`
//! (the CPU run of the same policy).
template <class Attention, class Prefill>
bool run_gpu(Stream const& stream, PolicyConfig const& config, int prompt, Run const& reference,
             GpuResult& result) {
  auto const start = std::chrono::steady_clock::now();
  std::size_t const qn = static_cast<std::size_t>(kQHeads) * kHeadDim;
  std::size_t const kn = static_cast<std::size_t>(stream.kv_heads) * kHeadDim;
  std::size_t const t_count = static_cast<std::size_t>(stream.tokens);
  int const steps = stream.tokens - prompt;
  // Device copies in bf16: [q | k | v] of all tokens, then outputs [tokens, Hq, D].
  std::vector<__nv_bfloat16> host(t_count * (qn + 2 * kn));
  for (std::size_t i = 0; i < stream.q.size(); ++i) host[i] = __float2bfloat16_rn(stream.q[i]);
  for (std::size_t i = 0; i < stream.k.size(); ++i) {
    host[stream.q.size() + i] = __float2bfloat16_rn(stream.k[i]);
    host[stream.q.size() + stream.k.size() + i] = __float2bfloat16_rn(stream.v[i]);
  }
  __nv_bfloat16* inputs = nullptr;
  __nv_bfloat16* outputs = nullptr;
  cudaStream_t cuda_stream = nullptr;
  if (cudaStreamCreate(&cuda_stream) != cudaSuccess ||
      cudaMalloc(&inputs, host.size() * sizeof(__nv_bfloat16)) != cudaSuccess ||
      cudaMalloc(&outputs, t_count * qn * sizeof(__nv_bfloat16)) != cudaSuccess) {
    std::fprintf(stderr, "GPU allocation failed\n");
    return false;
  }
  __nv_bfloat16 const* q = inputs;
  __nv_bfloat16 const* k = inputs + stream.q.size();
  __nv_bfloat16 const* v = k + stream.k.size();
  cudaMemcpyAsync(inputs, host.data(), host.size() * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice,
                  cuda_stream);

  kvc::KVCacheConfig cache_config;
  cache_config.shape = kvc::ModelShape{1, kQHeads, stream.kv_heads, kHeadDim};
  cache_config.dtype = kDType;
  cache_config.policy = config;
  cache_config.max_seqs = 1;
  cache_config.max_tokens_per_seq = stream.tokens;
  cache_config.max_prefill_tokens = prompt;
  using Cache = kvc::BasicKVCache<Attention, Prefill>;
  Cache cache;
  int seq = -1;
  bool ok = gpu_check(Cache::create(cache_config, cuda_stream, cache), "create") &&
            gpu_check(cache.add_sequence(seq, cuda_stream), "add_sequence") &&
            gpu_check(cache.prefill_layer(seq, 0, prompt, q, k, v, outputs, cuda_stream),
                      "prefill_layer");
  for (int t = prompt; t < stream.tokens && ok; ++t) {
    std::size_t const tt = static_cast<std::size_t>(t);
    ok = gpu_check(cache.begin_step(&seq, 1, cuda_stream), "begin_step") &&
         gpu_check(cache.decode_layer(0, q + tt * qn, k + tt * kn, v + tt * kn, outputs + tt * qn,
                                      cuda_stream),
                   "decode_layer") &&
         gpu_check(cache.end_step(cuda_stream), "end_step");
  }
  kvc::CacheStats stats;
  ok = ok && gpu_check(cache.step_status_sync(), "step") &&
       gpu_check(cache.stats_sync(stats, cuda_stream), "stats");
  std::vector<__nv_bfloat16> got(static_cast<std::size_t>(steps) * qn);
  if (ok) {
    cudaMemcpy(got.data(), outputs + static_cast<std::size_t>(prompt) * qn,
               got.size() * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost);
  }
  cudaFree(inputs);
  cudaFree(outputs);
  cudaStreamDestroy(cuda_stream);
  if (!ok) return false;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  kvc::Tolerance const tol = kvc::default_tolerance(kDType);
  for (std::size_t i = 0; i < got.size(); ++i) {
    double const want = reference.outputs[i];
    double const diff = std::fabs(static_cast<double>(__bfloat162float(got[i])) - want);
    result.max_diff = std::max(result.max_diff, diff);
    result.within = result.within && diff <= tol.atol + tol.rtol * std::fabs(want);
  }
  for (int h = 0; h < stream.kv_heads; ++h) {
    result.same_slots = result.same_slots && stats.slots_of(0, seq, h) == reference.cache.slots(h);
  }
  return true;
}

//! Runs one policy on the GPU with the attention that has a kernel for its shape: the decode and
//! prefill kernels compiled here for G = 4, else the double-precision decode oracle with the
//! prompt fed as decode steps (exact for Full and DMC, the only policies run on the pooled
//! G = 16 stream).
bool run_gpu_policy(Stream const& stream, PolicyConfig const& config, int prompt,
                    Run const& reference, GpuResult& result) {
  constexpr int kGroup = kQHeads / kKvHeads;
  if (kQHeads / stream.kv_heads == kGroup) {
    result.attention = "kernels";
    return run_gpu<
        kvc::InstantiatedDecodeAttention<kvc::DefaultVariant, __nv_bfloat16, kHeadDim, kGroup>,
        kvc::InstantiatedPrefillAttention<kvc::DefaultVariant, __nv_bfloat16, kHeadDim, kGroup>>(
        stream, config, prompt, reference, result);
  }
  result.attention = "oracle (G=" + std::to_string(kQHeads / stream.kv_heads) + ")";
  return run_gpu<kvc::OracleDecodeAttention, kvc::DecodePathPrefill>(stream, config, prompt,
                                                                     reference, result);
}

#endif  // KVC_EXAMPLE_CUDA

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (int const parsed = parse_options(argc, argv, options)) return parsed == 2 ? 0 : 1;
  int const prompt = std::max(1, options.tokens / 8);
  int const steps = options.tokens - prompt;

  std::printf(
      "kvc policy comparison: one layer, one sequence, %d tokens (%d-token prompt, %d decode "
      "steps)\n",
      options.tokens, prompt, steps);
  std::printf(
      "model: %d query heads, %d KV heads (G = %d), head dim %d, %s, rotate-half RoPE; seed %llu\n",
      kQHeads, kKvHeads, kQHeads / kKvHeads, kHeadDim, kvc::dtype_name(kDType),
      static_cast<unsigned long long>(options.seed));
  bool use_gpu = false;
  if (!kvc::example::choose_device(options.device, use_gpu)) return 1;
  std::printf("GPU: %s\n\n", use_gpu ? "paged store + decode attention, checked against the "
                                       "CPU reference (second table)"
                                     : "not used (CPU reference)");

  Stream const plain = make_stream(options, false);
  Stream const with_decisions = make_stream(options, true);
  Stream const pooled = pool_kv_heads(plain);
  Stream const pooled_decisions = pool_kv_heads(with_decisions);

  PolicyConfig full;
  full.kind = PolicyKind::kFull;
  PolicyConfig dmc;
  dmc.kind = PolicyKind::kDmc;
  dmc.dmc = kvc::DmcConfig::checkpoint();

  std::vector<Run> runs(6);
  if (!run_policy("full", plain, full, prompt, runs[0])) return 1;
  if (!run_policy("gqa (pool 4)", pooled, full, prompt, runs[1])) return 1;
  if (!run_policy("dmc", with_decisions, dmc, prompt, runs[2])) return 1;
  if (!run_policy("dmc+gqa", pooled_decisions, dmc, prompt, runs[3])) return 1;

  // Equal memory: H2O and TOVA keep DMC's mean slots per head.
  int const budget = std::max(2, static_cast<int>(std::lround(mean_slots(runs[2].cache))));
  PolicyConfig h2o;
  h2o.kind = PolicyKind::kH2O;
  h2o.h2o.heavy = budget / 2;
  h2o.h2o.recent = budget - budget / 2;
  PolicyConfig tova;
  tova.kind = PolicyKind::kTova;
  tova.tova.budget = budget;
  if (!run_policy("h2o", plain, h2o, prompt, runs[4])) return 1;
  if (!run_policy("tova", plain, tova, prompt, runs[5])) return 1;
  char h2o_name[64];
  std::snprintf(h2o_name, sizeof h2o_name, "h2o (%d+%d)", h2o.h2o.heavy, h2o.h2o.recent);
  runs[4].name = h2o_name;
  runs[5].name = "tova (" + std::to_string(budget) + ")";

  std::printf("%-14s %8s %7s %22s %7s %10s %11s %7s\n", "policy", "kv heads", "tokens",
              "slots/head min/mean/max", "CR", "KV KiB", "out error", "time s");
  for (Run const& run : runs) {
    std::vector<int> const slots = run.cache.slots_per_head();
    int const lo = *std::min_element(slots.begin(), slots.end());
    int const hi = *std::max_element(slots.begin(), slots.end());
    char range[48];
    std::snprintf(range, sizeof range, "%d / %.1f / %d", lo, mean_slots(run.cache), hi);
    std::printf("%-14s %8zu %7lld %22s %7.2f %10.1f %11.4f %7.2f\n", run.name.c_str(),
                run.cache.heads().size(), static_cast<long long>(run.cache.tokens_seen()), range,
                run.cache.compression_ratio(), static_cast<double>(run.cache.bytes()) / 1024.0,
                mean_relative_error(run.outputs, runs[0].outputs), run.seconds);
  }
  std::printf(
      "\nCR = tokens * KV heads / slots kept. KV KiB = slots * head dim * 2 (K and V) * 2 bytes.\n"
      "out error = mean over decode steps and query heads of |out - out_full| / |out_full|.\n"
      "GQA and DMC+GQA are a different (pooled) model, so their error includes the pooling.\n"
      "The stream is synthetic: the errors say how far each cache is from the full cache on\n"
      "it, not how a trained model would score.\n");

  std::printf("\nDMC per KV head (target CR from the decision neuron's merge rate):\n");
  std::printf("%-8s %10s %10s %8s\n", "kv head", "target CR", "actual CR", "slots");
  for (int h = 0; h < kKvHeads; ++h) {
    std::printf("%-8d %10.2f %10.2f %8d\n", h, kTargetRatio[h], runs[2].cache.compression_ratio(h),
                runs[2].cache.slots(h));
  }
  if (!use_gpu) return 0;

#if KVC_EXAMPLE_CUDA
  // The GPU path of every policy against the reference runs above (the same prefill, then the
  // same decode steps).
  Stream const* streams[6] = {&plain, &pooled, &with_decisions, &pooled_decisions, &plain, &plain};
  PolicyConfig const* configs[6] = {&full, &full, &dmc, &dmc, &h2o, &tova};
  Run const* references[6] = {&runs[0], &runs[1], &runs[2], &runs[3], &runs[4], &runs[5]};
  std::printf("\nGPU (kvc::BasicKVCache) vs CPU reference:\n");
  std::printf("%-14s %-14s %12s %10s %8s %7s\n", "policy", "attention", "max |diff|", "bf16 tol.",
              "slots", "time s");
  bool all_ok = true;
  for (int i = 0; i < 6; ++i) {
    GpuResult result;
    if (!run_gpu_policy(*streams[i], *configs[i], prompt, *references[i], result)) return 1;
    std::printf("%-14s %-14s %12.3g %10s %8s %7.2f\n", runs[i].name.c_str(),
                result.attention.c_str(), result.max_diff, result.within ? "within" : "OUTSIDE",
                result.same_slots ? "same" : "DIFFER", result.seconds);
    // H2O/TOVA: the kernel's fp32 probabilities can break a near-tie of scores differently
    // from the reference's double ones; that changes an eviction, not correctness.
    bool const evicting =
        configs[i]->kind == PolicyKind::kH2O || configs[i]->kind == PolicyKind::kTova;
    if (!evicting) all_ok = all_ok && result.within && result.same_slots;
  }
  std::printf(
      "max |diff| over every decode output element; within = |gpu - ref| <= 0.016 + 0.016 |ref|\n"
      "everywhere. H2O/TOVA may differ after a near-tie of scores (fp32 kernel vs double\n"
      "reference probabilities) breaks an eviction the other way.\n");
  return all_ok ? 0 : 1;
#else
  return 0;
#endif
}
