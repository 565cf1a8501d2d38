// The KVC_HOST_DEVICE maths shared by the CPU reference and the kernels (core/{math,rope,
// dtype_traits}, policy/{dmc,h2o,tova,eviction}) gives the same results on the device as on the
// host: bit for bit for the rounded arithmetic, the DMC recurrence and the eviction order; within
// 1 ulp where a double-precision libm call is involved (sigmoid, RoPE angles).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include "kvc/core/dtype.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/math.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/policy/dmc.hpp"
#include "kvc/policy/eviction.hpp"
#include "kvc/policy/h2o.hpp"
#include "kvc/policy/tova.hpp"

#include "cuda_test_support.cuh"
#include "test_support.hpp"

namespace {

using kvc::DmcConfig;

// ---------------------------------------------------------------------------------------------
// Device plumbing (the device check and KVC_CUDA_REQUIRE: cuda_test_support.cuh): a launch
// check, RAII arrays.

//! Launch check: the launch itself and the kernel's completion.
#define KVC_MATHS_SYNC()                       \
  do {                                         \
    KVC_CUDA_REQUIRE(cudaGetLastError());      \
    KVC_CUDA_REQUIRE(cudaDeviceSynchronize()); \
  } while (0)

//! A device copy of a host vector (or `count` uninitialised elements), freed on destruction.
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t count) : count_(count) {
    KVC_CUDA_REQUIRE(
        cudaMalloc(reinterpret_cast<void**>(&data_), std::max<std::size_t>(count, 1) * sizeof(T)));
  }
  explicit DeviceArray(std::vector<T> const& host) : DeviceArray(host.size()) {
    KVC_CUDA_REQUIRE(
        cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  DeviceArray(DeviceArray const&) = delete;
  DeviceArray& operator=(DeviceArray const&) = delete;
  ~DeviceArray() { cudaFree(data_); }

  T* data() const { return data_; }
  std::vector<T> to_host() const {
    std::vector<T> host(count_);
    KVC_CUDA_REQUIRE(cudaMemcpy(host.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

int blocks_for(std::size_t count, int threads = 128) {
  return static_cast<int>((count + threads - 1) / threads);
}

std::uint32_t bits_of(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

//! Same value bit for bit; any two NaNs count as equal (payloads differ between host and device).
bool same_float(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return bits_of(a) == bits_of(b);
}

//! Distance in units in the last place between two finite floats (0 for equal values, +0/-0 too).
std::int64_t ulp_distance(float a, float b) {
  auto ordered = [](float x) {
    std::int64_t const bits = static_cast<std::int32_t>(bits_of(x));
    return bits < 0 ? std::int64_t{INT32_MIN} - bits : bits;
  };
  std::int64_t const d = ordered(a) - ordered(b);
  return d < 0 ? -d : d;
}

//! Floats of many magnitudes: normals, subnormals, zeros of both signs, infinities and NaN.
std::vector<float> wide_floats(std::mt19937_64& rng, std::size_t count) {
  std::uniform_int_distribution<int> exponent(-140, 60);
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  std::bernoulli_distribution negative(0.5);
  std::vector<float> values(count);
  for (float& value : values) {
    value = std::ldexp(mantissa(rng), exponent(rng)) * (negative(rng) ? -1.0f : 1.0f);
  }
  float const specials[] = {0.0f,
                            -0.0f,
                            1.0f,
                            -1.0f,
                            INFINITY,
                            -INFINITY,
                            NAN,
                            std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::max()};
  for (std::size_t i = 0; i < std::size(specials) && i < count; ++i)
    values[i * 7 % count] = specials[i];
  return values;
}

// ---------------------------------------------------------------------------------------------
// Kernels: each thread evaluates the shared functions on one input.

__global__ void arithmetic_kernel(float const* a, float const* b, int count, float* out) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  out[4 * i + 0] = kvc::mul_rn(a[i], b[i]);
  out[4 * i + 1] = kvc::add_rn(a[i], b[i]);
  out[4 * i + 2] = kvc::sub_rn(a[i], b[i]);
  out[4 * i + 3] = kvc::div_rn(a[i], b[i]);
}

__global__ void sigmoid_kernel(float const* x, int count, DmcConfig config, float* sigmoid_out,
                               float* omega_out) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  sigmoid_out[i] = kvc::sigmoid(x[i]);
  omega_out[i] = kvc::dmc_omega(x[i], config);
}

//! Per thread: G logits -> group logit, and a score sum over `width` probabilities.
__global__ void reductions_kernel(float const* logits, int group_size, float const* probabilities,
                                  int width, int count, float* group_logit, float* h2o_sum,
                                  float* tova_mean, float* accumulated) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  group_logit[i] =
      kvc::dmc_group_logit(logits + static_cast<std::size_t>(i) * group_size, group_size);
  // probabilities of thread i: column i of a [width, count] matrix (stride = count)
  h2o_sum[i] = kvc::h2o_group_probability(probabilities + i, width, count);
  tova_mean[i] = kvc::tova_score(probabilities + i, width, count);
  accumulated[i] = kvc::h2o_accumulate(h2o_sum[i], tova_mean[i]);
}

//! The DMC running-sum recurrence of one element of one KV head over `tokens` tokens, written
//! once and run on both sides. Writes the slot value after every token and the merge flags.
__host__ __device__ void dmc_element_run(float const* k_decision, float const* omega,
                                         float const* x, int tokens, DmcConfig config,
                                         float* slot_out, unsigned char* merged_out) {
  float ring_x[kvc::kDmcMaxWindow];
  float ring_w[kvc::kDmcMaxWindow];
  float sum_x = 0.0f;
  float sum_w = 0.0f;
  int group_length = 0;
  for (int t = 0; t < tokens; ++t) {
    bool const merge = kvc::dmc_merges(k_decision[t], config, t == 0);
    kvc::DmcTokenStep const step = kvc::dmc_token_step(merge, group_length, config.window);
    group_length = step.group_length;
    float const term_x = kvc::dmc_term(omega[t], x[t], false);
    float* cell_x = config.window > 0 ? &ring_x[t % config.window] : nullptr;
    float* cell_w = config.window > 0 ? &ring_w[t % config.window] : nullptr;
    float const sx = kvc::dmc_accumulate(sum_x, cell_x, term_x, step);
    float const sw = kvc::dmc_accumulate(sum_w, cell_w, omega[t], step);
    slot_out[t] = kvc::dmc_slot_value(sx, sw);
    merged_out[t] = merge ? 1 : 0;
  }
}

__global__ void dmc_recurrence_kernel(float const* k_decision, float const* omega, float const* x,
                                      int tokens, int runs, DmcConfig config, float* slot_out,
                                      unsigned char* merged_out) {
  int const r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= runs) return;
  std::size_t const base = static_cast<std::size_t>(r) * tokens;
  dmc_element_run(k_decision + base, omega + base, x + base, tokens, config, slot_out + base,
                  merged_out + base);
}

__global__ void evicts_before_kernel(float const* score_a, std::int64_t const* position_a,
                                     float const* score_b, std::int64_t const* position_b,
                                     int count, unsigned char* out) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  out[i] = kvc::evicts_before(score_a[i], position_a[i], score_b[i], position_b[i]) ? 1 : 0;
}

//! One thread per candidate set of `slots` slots: the sequential victim searches.
__global__ void choose_victim_kernel(float const* scores, std::int64_t const* positions, int slots,
                                     int sets, int recent, int* h2o_victim, int* tova_victim,
                                     int* tova_protected_victim) {
  int const s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= sets) return;
  float const* set_scores = scores + static_cast<std::size_t>(s) * slots;
  std::int64_t const* set_positions = positions + static_cast<std::size_t>(s) * slots;
  std::int64_t newest = set_positions[0];
  for (int i = 1; i < slots; ++i) newest = set_positions[i] > newest ? set_positions[i] : newest;
  h2o_victim[s] = kvc::h2o_choose_victim(set_scores, set_positions, slots, newest, recent);
  tova_victim[s] = kvc::tova_choose_victim(set_scores, set_positions, slots, slots - 1, false);
  tova_protected_victim[s] =
      kvc::tova_choose_victim(set_scores, set_positions, slots, slots - 1, true);
}

//! One block per candidate set: a parallel argmin through first_to_evict (tree in shared memory).
constexpr int kReduceThreads = 128;
__global__ void parallel_victim_kernel(float const* scores, std::int64_t const* positions,
                                       int slots, int* victim) {
  __shared__ kvc::EvictionCandidate best[kReduceThreads];
  float const* set_scores = scores + static_cast<std::size_t>(blockIdx.x) * slots;
  std::int64_t const* set_positions = positions + static_cast<std::size_t>(blockIdx.x) * slots;
  kvc::EvictionCandidate mine;
  for (int i = threadIdx.x; i < slots; i += blockDim.x) {
    mine = kvc::first_to_evict(mine, kvc::EvictionCandidate{i, set_scores[i], set_positions[i]});
  }
  best[threadIdx.x] = mine;
  __syncthreads();
  for (int width = blockDim.x / 2; width > 0; width /= 2) {
    if (threadIdx.x < width)
      best[threadIdx.x] = kvc::first_to_evict(best[threadIdx.x], best[threadIdx.x + width]);
    __syncthreads();
  }
  if (threadIdx.x == 0) victim[blockIdx.x] = best[0].slot;
}

struct RopeCase {
  float x;
  float partner;
  int dim;
  int head_dim;
  kvc::RopeConfig rope;
  std::int64_t position;
};

__global__ void rope_kernel(RopeCase const* cases, int count, float* rotated, float* cos_out,
                            float* sin_out) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  RopeCase const c = cases[i];
  rotated[i] = kvc::rope_rotate_element(c.x, c.partner, c.dim, c.head_dim, c.rope, c.position);
  int const pair = kvc::rope_pair_index(c.dim, c.head_dim, c.rope.layout);
  kvc::rope_cos_sin(pair, c.head_dim, c.rope.theta, c.position, cos_out[i], sin_out[i]);
}

//! One thread per head vector: apply_rope in place.
__global__ void apply_rope_kernel(float* vectors, int head_dim, int count, kvc::RopeConfig rope,
                                  std::int64_t const* positions) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  kvc::apply_rope(vectors + static_cast<std::size_t>(i) * head_dim, head_dim, rope, positions[i]);
}

__global__ void dtype_kernel(float const* x, int count, std::uint16_t* half_bits,
                             std::uint16_t* bf16_bits, float* half_back, float* bf16_back) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  half const h = kvc::DTypeTraits<half>::from_float(x[i]);
  __nv_bfloat16 const b = kvc::DTypeTraits<__nv_bfloat16>::from_float(x[i]);
  half_bits[i] = __half_as_ushort(h);
  bf16_bits[i] = __bfloat16_as_ushort(b);
  half_back[i] = kvc::DTypeTraits<half>::to_float(h);
  bf16_back[i] = kvc::DTypeTraits<__nv_bfloat16>::to_float(b);
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("policy maths: mul_rn, add_rn, sub_rn, div_rn are bit-exact on the device") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed());
    INFO("seed " << kvc::test::test_seed());
    std::size_t const n = 1 << 16;
    std::vector<float> const a = wide_floats(rng, n);
    std::vector<float> b = wide_floats(rng, n);
    // half of the pairs within a few binades of each other, where cancellation and rounding matter
    std::normal_distribution<float> near(1.0f, 0.01f);
    for (std::size_t i = 0; i < n; i += 2) b[i] = a[i] * near(rng);
    DeviceArray<float> da(a), db(b), dout(4 * n);
    arithmetic_kernel<<<blocks_for(n), 128>>>(da.data(), db.data(), static_cast<int>(n),
                                              dout.data());
    KVC_MATHS_SYNC();
    std::vector<float> const out = dout.to_host();
    std::size_t mismatches = 0;
    for (std::size_t i = 0; i < n; ++i) {
      float const expected[4] = {kvc::mul_rn(a[i], b[i]), kvc::add_rn(a[i], b[i]),
                                 kvc::sub_rn(a[i], b[i]), kvc::div_rn(a[i], b[i])};
      for (int op = 0; op < 4; ++op) {
        if (!same_float(out[4 * i + op], expected[op])) {
          if (mismatches < 5) {
            FAIL_CHECK("op " << op << " (mul, add, sub, div) on " << a[i] << ", " << b[i]
                             << ": device " << out[4 * i + op] << ", host " << expected[op]);
          }
          ++mismatches;
        }
      }
    }
    CHECK(mismatches == 0);
  }

  TEST_CASE("policy maths: sigmoid and DMC omega within 1 ulp on the device") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed());
    INFO("seed " << kvc::test::test_seed());
    std::size_t const n = 1 << 15;
    std::vector<float> x = kvc::test::random_normal(rng, n, kvc::DType::kF32, 8.0f);
    std::uniform_real_distribution<float> wide(-120.0f, 120.0f);
    for (std::size_t i = 0; i < n; i += 4) x[i] = wide(rng);  // the saturated tails too
    for (DmcConfig const config : {DmcConfig::checkpoint(), DmcConfig::paper()}) {
      DeviceArray<float> dx(x), dsig(n), domega(n);
      sigmoid_kernel<<<blocks_for(n), 128>>>(dx.data(), static_cast<int>(n), config, dsig.data(),
                                             domega.data());
      KVC_MATHS_SYNC();
      std::vector<float> const sig = dsig.to_host();
      std::vector<float> const omega = domega.to_host();
      std::int64_t worst_sigmoid = 0;
      std::int64_t worst_omega = 0;
      for (std::size_t i = 0; i < n; ++i) {
        worst_sigmoid = std::max(worst_sigmoid, ulp_distance(sig[i], kvc::sigmoid(x[i])));
        worst_omega = std::max(worst_omega, ulp_distance(omega[i], kvc::dmc_omega(x[i], config)));
      }
      CHECK(worst_sigmoid <= 1);
      CHECK(worst_omega <= 1);
    }
  }

  TEST_CASE("policy maths: group logit and H2O/TOVA score reductions are bit-exact on the device") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed());
    INFO("seed " << kvc::test::test_seed());
    int const count = 4096;
    for (int group : {1, 2, 4, 8}) {
      int const width = group * 4;  // query heads of the layer for TOVA, the group for H2O
      std::vector<float> const logits =
          kvc::test::random_normal(rng, std::size_t(count) * group, kvc::DType::kBF16, 3.0f);
      std::uniform_real_distribution<float> probability(1e-6f, 1.0f);
      std::vector<float> probabilities(std::size_t(count) * width);
      for (float& p : probabilities) p = probability(rng);
      DeviceArray<float> dlogits(logits), dprob(probabilities), dgroup(count), dh2o(count),
          dtova(count), dacc(count);
      reductions_kernel<<<blocks_for(count), 128>>>(dlogits.data(), group, dprob.data(), width,
                                                    count, dgroup.data(), dh2o.data(), dtova.data(),
                                                    dacc.data());
      KVC_MATHS_SYNC();
      std::vector<float> const group_logit = dgroup.to_host();
      std::vector<float> const h2o_sum = dh2o.to_host();
      std::vector<float> const tova_mean = dtova.to_host();
      std::vector<float> const accumulated = dacc.to_host();
      int mismatches = 0;
      for (int i = 0; i < count; ++i) {
        float const expected_logit =
            kvc::dmc_group_logit(logits.data() + std::size_t(i) * group, group);
        float const expected_h2o =
            kvc::h2o_group_probability(probabilities.data() + i, width, count);
        float const expected_tova = kvc::tova_score(probabilities.data() + i, width, count);
        float const expected_acc = kvc::h2o_accumulate(expected_h2o, expected_tova);
        mismatches +=
            !same_float(group_logit[i], expected_logit) + !same_float(h2o_sum[i], expected_h2o) +
            !same_float(tova_mean[i], expected_tova) + !same_float(accumulated[i], expected_acc);
      }
      CHECK_MESSAGE(mismatches == 0, "group size " << group);
    }
  }

  TEST_CASE("policy maths: the DMC merge/accumulate recurrence is bit-exact on the device") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed());
    INFO("seed " << kvc::test::test_seed());
    int const tokens = 200;
    int const runs = 512;
    std::size_t const n = std::size_t(tokens) * runs;
    DmcConfig windowed = DmcConfig::checkpoint();
    DmcConfig short_window = DmcConfig::checkpoint();
    short_window.window = 3;
    for (DmcConfig const config : {windowed, short_window, DmcConfig::paper()}) {
      INFO("window " << config.window << ", offset " << config.offset);
      // k[d] around the threshold: runs of merges longer than the window, alternations, and values
      // one bf16 step either side of the offset.
      std::vector<float> k_decision(n);
      std::vector<float> omega(n);
      std::vector<float> x = kvc::test::random_normal(rng, n, kvc::DType::kBF16, 2.0f);
      std::uniform_real_distribution<float> merge_rate(0.0f, 1.0f);
      std::uniform_real_distribution<float> logit(-8.0f, 8.0f);
      for (int r = 0; r < runs; ++r) {
        std::bernoulli_distribution merges(merge_rate(rng));
        for (int t = 0; t < tokens; ++t) {
          std::size_t const i = std::size_t(r) * tokens + t;
          float const step = t % 17 == 0 ? 0.03125f : 1.0f;  // bf16 spacing near 5 is 2^-5
          k_decision[i] = config.offset + (merges(rng) ? step : -step);
          omega[i] = kvc::dmc_omega(logit(rng), config);
        }
      }
      DeviceArray<float> dk(k_decision), domega(omega), dx(x), dslot(n);
      DeviceArray<unsigned char> dmerged(n);
      dmc_recurrence_kernel<<<blocks_for(runs), 128>>>(dk.data(), domega.data(), dx.data(), tokens,
                                                       runs, config, dslot.data(), dmerged.data());
      KVC_MATHS_SYNC();
      std::vector<float> const slot = dslot.to_host();
      std::vector<unsigned char> const merged = dmerged.to_host();
      std::vector<float> expected_slot(n);
      std::vector<unsigned char> expected_merged(n);
      int merges_seen = 0;
      for (int r = 0; r < runs; ++r) {
        std::size_t const base = std::size_t(r) * tokens;
        dmc_element_run(k_decision.data() + base, omega.data() + base, x.data() + base, tokens,
                        config, expected_slot.data() + base, expected_merged.data() + base);
      }
      std::size_t mismatches = 0;
      for (std::size_t i = 0; i < n; ++i) {
        merges_seen += expected_merged[i];
        if (merged[i] != expected_merged[i] || !same_float(slot[i], expected_slot[i])) {
          if (mismatches < 5) {
            FAIL_CHECK("run " << i / tokens << " token " << i % tokens << ": device " << slot[i]
                              << " (merge " << int(merged[i]) << "), host " << expected_slot[i]
                              << " (merge " << int(expected_merged[i]) << ")");
          }
          ++mismatches;
        }
      }
      CHECK(mismatches == 0);
      CHECK(merges_seen > 0);  // the case exercised merges, not only appends
      CHECK(merges_seen < static_cast<int>(n) - runs);
    }
  }

  TEST_CASE("policy maths: evicts_before and the victim searches are identical on the device") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed());
    INFO("seed " << kvc::test::test_seed());
    // Scores from a small set so that ties are common; NaN and -inf included.
    float const palette[] = {0.0f, 0.125f, 0.25f, 0.5f, 1.0f, 3.0f, -INFINITY, INFINITY, NAN};
    std::uniform_int_distribution<int> pick(0, static_cast<int>(std::size(palette)) - 1);
    std::uniform_int_distribution<std::int64_t> position(0, 40);

    std::size_t const pairs = 1 << 14;
    std::vector<float> sa(pairs), sb(pairs);
    std::vector<std::int64_t> pa(pairs), pb(pairs);
    for (std::size_t i = 0; i < pairs; ++i) {
      sa[i] = palette[pick(rng)];
      sb[i] = palette[pick(rng)];
      pa[i] = position(rng);
      pb[i] = position(rng);
    }
    DeviceArray<float> dsa(sa), dsb(sb);
    DeviceArray<std::int64_t> dpa(pa), dpb(pb);
    DeviceArray<unsigned char> dorder(pairs);
    evicts_before_kernel<<<blocks_for(pairs), 128>>>(dsa.data(), dpa.data(), dsb.data(), dpb.data(),
                                                     static_cast<int>(pairs), dorder.data());
    KVC_MATHS_SYNC();
    std::vector<unsigned char> const order = dorder.to_host();
    int order_mismatches = 0;
    for (std::size_t i = 0; i < pairs; ++i) {
      order_mismatches += order[i] != (kvc::evicts_before(sa[i], pa[i], sb[i], pb[i]) ? 1 : 0);
    }
    CHECK(order_mismatches == 0);

    // Candidate sets: distinct positions (a shuffled range), tied scores.
    for (int slots : {1, 7, 64, 300}) {
      int const sets = 256;
      std::vector<float> scores(std::size_t(sets) * slots);
      std::vector<std::int64_t> positions(scores.size());
      for (int s = 0; s < sets; ++s) {
        std::vector<std::int64_t> perm(slots);
        std::iota(perm.begin(), perm.end(), std::int64_t{1000});
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int i = 0; i < slots; ++i) {
          scores[std::size_t(s) * slots + i] =
              s % 8 == 0 ? palette[pick(rng) % 6] : palette[pick(rng)];
          positions[std::size_t(s) * slots + i] = perm[i];
        }
      }
      int const recent = slots / 3;
      DeviceArray<float> dscores(scores);
      DeviceArray<std::int64_t> dpositions(positions);
      DeviceArray<int> dh2o(sets), dtova(sets), dtova_protected(sets), dparallel(sets);
      choose_victim_kernel<<<blocks_for(sets), 128>>>(dscores.data(), dpositions.data(), slots,
                                                      sets, recent, dh2o.data(), dtova.data(),
                                                      dtova_protected.data());
      KVC_MATHS_SYNC();
      parallel_victim_kernel<<<sets, kReduceThreads>>>(dscores.data(), dpositions.data(), slots,
                                                       dparallel.data());
      KVC_MATHS_SYNC();
      std::vector<int> const h2o = dh2o.to_host();
      std::vector<int> const tova = dtova.to_host();
      std::vector<int> const tova_protected = dtova_protected.to_host();
      std::vector<int> const parallel = dparallel.to_host();
      int mismatches = 0;
      for (int s = 0; s < sets; ++s) {
        float const* set_scores = scores.data() + std::size_t(s) * slots;
        std::int64_t const* set_positions = positions.data() + std::size_t(s) * slots;
        std::int64_t const newest = *std::max_element(set_positions, set_positions + slots);
        int const expected_h2o =
            kvc::h2o_choose_victim(set_scores, set_positions, slots, newest, recent);
        int const expected_tova =
            kvc::tova_choose_victim(set_scores, set_positions, slots, slots - 1, false);
        int const expected_protected =
            kvc::tova_choose_victim(set_scores, set_positions, slots, slots - 1, true);
        mismatches += (h2o[s] != expected_h2o) + (tova[s] != expected_tova) +
                      (tova_protected[s] != expected_protected) + (parallel[s] != expected_tova);
        CHECK(expected_tova >= 0);
      }
      CHECK_MESSAGE(mismatches == 0, slots << " slots");
    }
  }

  TEST_CASE("policy maths: RoPE within 1 ulp on the device") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed());
    INFO("seed " << kvc::test::test_seed());
    std::vector<RopeCase> cases;
    std::normal_distribution<float> value(0.0f, 2.0f);
    std::uniform_int_distribution<std::int64_t> position(0, 1 << 17);
    for (kvc::RopeLayout layout : {kvc::RopeLayout::kRotateHalf, kvc::RopeLayout::kInterleaved}) {
      for (double theta : {10000.0, 500000.0}) {
        for (int head_dim : {64, 128, 256}) {
          for (int i = 0; i < 2048; ++i) {
            int const dim = static_cast<int>(rng() % static_cast<unsigned>(head_dim));
            cases.push_back(RopeCase{value(rng), value(rng), dim, head_dim,
                                     kvc::RopeConfig{layout, theta},
                                     i < 8 ? std::int64_t{i} : position(rng)});
          }
        }
      }
    }
    std::size_t const n = cases.size();
    DeviceArray<RopeCase> dcases(cases);
    DeviceArray<float> drot(n), dcos(n), dsin(n);
    rope_kernel<<<blocks_for(n), 128>>>(dcases.data(), static_cast<int>(n), drot.data(),
                                        dcos.data(), dsin.data());
    KVC_MATHS_SYNC();
    std::vector<float> const rotated = drot.to_host();
    std::vector<float> const cos_dev = dcos.to_host();
    std::vector<float> const sin_dev = dsin.to_host();
    std::size_t trig_over = 0;
    std::size_t rotated_over = 0;
    for (std::size_t i = 0; i < n; ++i) {
      RopeCase const& c = cases[i];
      float cos_host, sin_host;
      kvc::rope_cos_sin(kvc::rope_pair_index(c.dim, c.head_dim, c.rope.layout), c.head_dim,
                        c.rope.theta, c.position, cos_host, sin_host);
      // 1 ulp, or 1 ulp of the unit circle (2^-24) near a zero of cos/sin: the device's double
      // pow/cos/sin may differ from the host's by an ulp or two of double, which near a zero moves
      // a tiny float result by more than one of its own (tiny) ulps.
      auto trig_close = [](float a, float b) {
        return ulp_distance(a, b) <= 1 || std::abs(a - b) <= std::ldexp(1.0f, -24);
      };
      trig_over += !trig_close(cos_dev[i], cos_host) || !trig_close(sin_dev[i], sin_host);
      float const expected =
          kvc::rope_rotate_element(c.x, c.partner, c.dim, c.head_dim, c.rope, c.position);
      if (same_float(cos_dev[i], cos_host) && same_float(sin_dev[i], sin_host)) {
        // same angle: the rotation is mul_rn/add_rn/sub_rn only, so bit-exact
        rotated_over += !same_float(rotated[i], expected);
      } else {
        // an angle 1 ulp apart moves each product by at most 1 ulp of the larger operand
        float const bound = 2.0f * std::max(std::abs(c.x), std::abs(c.partner)) *
                                std::numeric_limits<float>::epsilon() +
                            std::abs(expected) * std::numeric_limits<float>::epsilon();
        rotated_over += std::abs(rotated[i] - expected) > bound;
      }
    }
    CHECK(trig_over == 0);
    CHECK(rotated_over == 0);

    // Whole head vectors through apply_rope: within 1 ulp of the host (relative to the vector's
    // largest element, as above).
    for (kvc::RopeLayout layout : {kvc::RopeLayout::kRotateHalf, kvc::RopeLayout::kInterleaved}) {
      int const head_dim = 128;
      int const vectors = 512;
      std::vector<float> x =
          kvc::test::random_normal(rng, std::size_t(vectors) * head_dim, kvc::DType::kBF16);
      std::vector<std::int64_t> positions(vectors);
      for (std::int64_t& p : positions) p = position(rng);
      kvc::RopeConfig const rope{layout, 10000.0};
      DeviceArray<float> dx(x);
      DeviceArray<std::int64_t> dpositions(positions);
      apply_rope_kernel<<<blocks_for(vectors), 128>>>(dx.data(), head_dim, vectors, rope,
                                                      dpositions.data());
      KVC_MATHS_SYNC();
      std::vector<float> const device = dx.to_host();
      std::size_t over = 0;
      for (int v = 0; v < vectors; ++v) {
        float* host = x.data() + std::size_t(v) * head_dim;
        float const largest = std::abs(*std::max_element(
            host, host + head_dim, [](float a, float b) { return std::abs(a) < std::abs(b); }));
        kvc::apply_rope(host, head_dim, rope, positions[v]);
        for (int i = 0; i < head_dim; ++i) {
          float const d = device[std::size_t(v) * head_dim + i];
          float const bound = 3.0f * largest * std::numeric_limits<float>::epsilon();
          over += !same_float(d, host[i]) && std::abs(d - host[i]) > bound;
        }
      }
      CHECK_MESSAGE(over == 0, kvc::rope_layout_name(layout));
    }
  }

  TEST_CASE("policy maths: half and bf16 conversions match the portable host conversions") {
    KVC_REQUIRE_CUDA_DEVICE();
    std::mt19937_64 rng(kvc::test::test_seed());
    INFO("seed " << kvc::test::test_seed());
    // Finite values over the whole half range and beyond (overflow to inf, subnormals, zero).
    std::size_t const n = 1 << 16;
    std::uniform_int_distribution<int> exponent(-30, 20);
    std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
    std::vector<float> x(n);
    for (float& value : x)
      value = std::ldexp(mantissa(rng), exponent(rng)) * (rng() % 2 ? 1.0f : -1.0f);
    // exact halfway cases of both formats
    for (std::size_t i = 0; i < 64; ++i) {
      x[i] = kvc::detail::bits_float(0x3f800000u + (static_cast<std::uint32_t>(i) << 16) + 0x8000u);
      x[64 + i] =
          kvc::detail::bits_float(0x3f800000u + (static_cast<std::uint32_t>(i) << 13) + 0x1000u);
    }
    DeviceArray<float> dx(x), dhalf_back(n), dbf16_back(n);
    DeviceArray<std::uint16_t> dhalf(n), dbf16(n);
    dtype_kernel<<<blocks_for(n), 128>>>(dx.data(), static_cast<int>(n), dhalf.data(), dbf16.data(),
                                         dhalf_back.data(), dbf16_back.data());
    KVC_MATHS_SYNC();
    std::vector<std::uint16_t> const half_bits = dhalf.to_host();
    std::vector<std::uint16_t> const bf16_bits = dbf16.to_host();
    std::vector<float> const half_back = dhalf_back.to_host();
    std::vector<float> const bf16_back = dbf16_back.to_host();
    std::size_t mismatches = 0;
    for (std::size_t i = 0; i < n; ++i) {
      bool const ok =
          half_bits[i] == kvc::float_to_half_bits(x[i]) &&
          bf16_bits[i] == kvc::float_to_bf16_bits(x[i]) &&
          same_float(half_back[i], kvc::round_to_dtype(x[i], kvc::DType::kF16)) &&
          same_float(bf16_back[i], kvc::round_to_dtype(x[i], kvc::DType::kBF16)) &&
          same_float(half_back[i],
                     kvc::DTypeTraits<half>::to_float(kvc::DTypeTraits<half>::from_float(x[i])));
      if (!ok && mismatches++ < 5) {
        FAIL_CHECK(x[i] << ": device half 0x" << std::hex << half_bits[i] << " bf16 0x"
                        << bf16_bits[i] << ", host half 0x" << kvc::float_to_half_bits(x[i])
                        << " bf16 0x" << kvc::float_to_bf16_bits(x[i]) << std::dec);
      }
    }
    CHECK(mismatches == 0);
  }
}
