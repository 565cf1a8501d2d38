// kvc_minimal_dmc: the smallest DMC decode loop. One attention layer, one sequence, 8 query heads
// over 2 KV heads (GQA, G = 4), head dim 128, bf16, DMC in checkpoint mode (decision neuron
// D-1: k[D-1] > 5 merges the token into the last slot).
//
// With a CUDA device (and a CUDA build) the loop runs on the GPU through kvc::KVCache and is
// checked against the CPU reference (kvc::reference::LayerCache), printing the largest
// difference; otherwise it runs on the CPU reference alone. The file compiles with g++ (CPU
// only) or, in a CUDA build, with nvcc (KVC_EXAMPLE_CUDA=1).
//
// Usage: kvc_minimal_dmc [--steps N] [--device cpu|gpu|auto]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kvc/core/dtype.hpp"
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
constexpr kvc::DType kDType = kvc::DType::kBF16;
//! Probability that a token merges, per KV head (target CR 1 / (1 - p): about 2 and 4).
constexpr double kMergeProbability[kKvHeads] = {0.5, 0.75};

}  // namespace

int main(int argc, char** argv) {
  int steps = 64;
  char const* device = "auto";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
      steps = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--device") == 0 && i + 1 < argc) {
      device = argv[++i];
    } else {
      std::printf("usage: %s [--steps N (1..4096)] [--device cpu|gpu|auto]\n", argv[0]);
      return std::strcmp(argv[i], "--help") == 0 ? 0 : 1;
    }
  }
  if (steps < 1 || steps > 4096 ||
      (std::strcmp(device, "cpu") != 0 && std::strcmp(device, "gpu") != 0 &&
       std::strcmp(device, "auto") != 0)) {
    std::fprintf(stderr, "bad --steps or --device\n");
    return 1;
  }
  bool use_gpu = false;
  if (!kvc::example::choose_device(device, use_gpu)) return 1;

  // The CPU reference: always run (it is the CPU path, and the check of the GPU path).
  kvc::reference::LayerSpec spec;
  spec.num_q_heads = kQHeads;
  spec.num_kv_heads = kKvHeads;
  spec.head_dim = kHeadDim;
  spec.dtype = kDType;
  kvc::PolicyConfig policy;
  policy.kind = kvc::PolicyKind::kDmc;
  policy.dmc = kvc::DmcConfig::checkpoint();
  kvc::reference::LayerCache reference;
  if (kvc::reference::LayerCache::create(spec, policy, reference) != kvc::Status::kSuccess) {
    return 1;
  }

  // Pre-RoPE inputs of every step, rounded to bf16: q [steps, Hq, D], k and v [steps, Hkv, D].
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::size_t const q_row = static_cast<std::size_t>(kQHeads) * kHeadDim;
  std::size_t const kv_row = static_cast<std::size_t>(kKvHeads) * kHeadDim;
  std::vector<float> q(steps * q_row), k(steps * kv_row), v(steps * kv_row);
  for (float& x : q) x = normal(rng);
  for (float& x : k) x = normal(rng);
  for (float& x : v) x = normal(rng);
  for (int t = 0; t < steps; ++t) {
    for (int h = 0; h < kKvHeads; ++h) {  // the decision neuron decides merge or append
      k[t * kv_row + h * kHeadDim + kHeadDim - 1] = unit(rng) < kMergeProbability[h] ? 6.0f : 4.0f;
    }
  }
  for (std::vector<float>* x : {&q, &k, &v}) kvc::reference::round_in_place(*x, kDType);

  std::vector<float> ref_out(steps * q_row);  // [steps, Hq, D]
  kvc::reference::AttentionOutput step_out;
  for (int t = 0; t < steps; ++t) {
    kvc::reference::DecodeInput const input{
        kvc::reference::ConstSpan(q.data() + t * q_row, q_row),
        kvc::reference::ConstSpan(k.data() + t * kv_row, kv_row),
        kvc::reference::ConstSpan(v.data() + t * kv_row, kv_row)};
    if (reference.decode_step(input, step_out) != kvc::Status::kSuccess) return 1;
    std::copy(step_out.out.begin(), step_out.out.end(), ref_out.begin() + t * q_row);
  }

  std::vector<float> out = ref_out;
  std::vector<int> slots = reference.slots_per_head();
  double max_diff = 0.0;
  bool within_tolerance = true;  // |gpu - ref| <= atol + rtol * |ref| with bf16's tolerance
#if KVC_EXAMPLE_CUDA
  if (use_gpu) {
    // The same loop through the facade: one object owns the store and every scratch buffer.
    cudaStream_t stream = nullptr;
    cudaStreamCreate(&stream);
    kvc::KVCacheConfig config;
    config.shape = kvc::ModelShape{1, kQHeads, kKvHeads, kHeadDim};
    config.dtype = kDType;
    config.policy = policy;
    config.max_seqs = 1;
    config.max_tokens_per_seq = steps;
    kvc::KVCache cache;
    kvc::Status status = kvc::KVCache::create(config, stream, cache);
    std::vector<__nv_bfloat16> host(q.size() + 2 * k.size());  // q, k, v back to back
    for (std::size_t i = 0; i < q.size(); ++i) host[i] = __float2bfloat16_rn(q[i]);
    for (std::size_t i = 0; i < k.size(); ++i) host[q.size() + i] = __float2bfloat16_rn(k[i]);
    for (std::size_t i = 0; i < v.size(); ++i) {
      host[q.size() + k.size() + i] = __float2bfloat16_rn(v[i]);
    }
    __nv_bfloat16* inputs = nullptr;   // [q | k | v]
    __nv_bfloat16* outputs = nullptr;  // [steps, Hq, D]
    cudaMalloc(&inputs, host.size() * sizeof(__nv_bfloat16));
    cudaMalloc(&outputs, q.size() * sizeof(__nv_bfloat16));
    cudaMemcpyAsync(inputs, host.data(), host.size() * sizeof(__nv_bfloat16),
                    cudaMemcpyHostToDevice, stream);
    int seq = -1;
    if (status == kvc::Status::kSuccess) status = cache.add_sequence(seq, stream);
    for (int t = 0; t < steps && status == kvc::Status::kSuccess; ++t) {
      status = cache.begin_step(&seq, 1, stream);  // the batch: one row, sequence `seq`
      if (status == kvc::Status::kSuccess) {
        status = cache.decode_layer(0, inputs + t * q_row, inputs + q.size() + t * kv_row,
                                    inputs + q.size() + k.size() + t * kv_row, outputs + t * q_row,
                                    stream);
      }
      if (status == kvc::Status::kSuccess) status = cache.end_step(stream);
    }
    if (status == kvc::Status::kSuccess) status = cache.step_status_sync();
    kvc::CacheStats stats;
    if (status == kvc::Status::kSuccess) status = cache.stats_sync(stats, stream);
    std::vector<__nv_bfloat16> got(q.size());
    cudaMemcpy(got.data(), outputs, got.size() * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost);
    cudaFree(inputs);
    cudaFree(outputs);
    cudaStreamDestroy(stream);
    if (status != kvc::Status::kSuccess) {
      std::fprintf(stderr, "GPU path failed: %s\n", kvc::to_string(status));
      return 1;
    }
    for (std::size_t i = 0; i < got.size(); ++i) {
      out[i] = __bfloat162float(got[i]);
      double const diff = std::fabs(static_cast<double>(out[i]) - ref_out[i]);
      kvc::Tolerance const tol = kvc::default_tolerance(kDType);
      max_diff = std::max(max_diff, diff);
      within_tolerance = within_tolerance && diff <= tol.atol + tol.rtol * std::fabs(ref_out[i]);
    }
    for (int h = 0; h < kKvHeads; ++h) slots[h] = stats.slots_of(0, seq, h);
  }
#endif

  std::printf(
      "kvc minimal DMC: 1 layer, 1 sequence, %d steps, %d q heads / %d KV heads, D %d, "
      "bf16, on the %s\n",
      steps, kQHeads, kKvHeads, kHeadDim, use_gpu ? "GPU (kvc::KVCache)" : "CPU reference");
  for (int h = 0; h < kKvHeads; ++h) {
    std::printf("KV head %d: %d tokens in %d slots, CR %.2f (reference: %d slots)\n", h, steps,
                slots[h], static_cast<double>(steps) / slots[h], reference.slots(h));
  }
  std::printf("last step, query head 0, out[0:6] =");
  for (int i = 0; i < 6; ++i) std::printf(" %+.4f", out[(steps - 1) * q_row + i]);
  std::printf("\n");
  if (use_gpu) {
    bool const same_slots = slots == reference.slots_per_head();
    std::printf("GPU vs CPU reference: max |out difference| %.3g (%s bf16 tolerance), slots %s\n",
                max_diff, within_tolerance ? "within" : "OUTSIDE",
                same_slots ? "identical" : "DIFFER");
    if (!same_slots || !within_tolerance) return 1;
  }
  return 0;
}
