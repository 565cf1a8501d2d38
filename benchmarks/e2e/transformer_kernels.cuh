//! @file
//! The element-wise kernels of the end-to-end decode model (bf16 activations, fp32 maths):
//! RMSNorm, the SwiGLU activation, and the kernel that sets the DMC decision neuron of each
//! step's keys so that every (layer, KV head) compresses at its planned ratio through the real
//! update path. The GEMMs are cuBLAS; RoPE, the cache update and attention are kvc's.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace kvc::e2e {

inline constexpr int kRowThreads = 256;

//! out[b, :] = x[b, :] / rms(x[b, :]) * weight, rms with eps 1e-5. One block per row.
//! x, out: [rows, width]; weight: [width].
__global__ void rmsnorm_kernel(__nv_bfloat16 const* __restrict__ x,
                               __nv_bfloat16 const* __restrict__ weight,
                               __nv_bfloat16* __restrict__ out, int width) {
  __shared__ float warp_sums[kRowThreads / 32];
  std::int64_t const row = blockIdx.x;
  __nv_bfloat16 const* in = x + row * width;
  float sum = 0.0f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float const value = __bfloat162float(in[i]);
    sum += value * value;
  }
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kRowThreads / 32; ++w) total += warp_sums[w];
  float const inv_rms = rsqrtf(total / static_cast<float>(width) + 1e-5f);
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    out[row * width + i] =
        __float2bfloat16_rn(__bfloat162float(in[i]) * inv_rms * __bfloat162float(weight[i]));
  }
}

//! act[b, i] = silu(gate[b, i]) * up[b, i] with gate_up [rows, 2 * width] = [gate | up].
__global__ void swiglu_kernel(__nv_bfloat16 const* __restrict__ gate_up,
                              __nv_bfloat16* __restrict__ act, int rows, int width) {
  std::int64_t const total = static_cast<std::int64_t>(rows) * width;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::int64_t const row = i / width;
    std::int64_t const col = i % width;
    float const gate = __bfloat162float(gate_up[row * 2 * width + col]);
    float const up = __bfloat162float(gate_up[row * 2 * width + width + col]);
    act[i] = __float2bfloat16_rn(gate / (1.0f + __expf(-gate)) * up);
  }
}

//! Sets the DMC decision neuron k[b, h, decision_dim] of one layer's keys: a token at position
//! t of KV head h merges when t % ratios[h] != 0 (value offset + 8) and appends otherwise (value
//! offset - 8); the store's update kernel then makes that decision from the key, as it would for
//! a trained model. Positions are the step's, read on the device (step_positions [L, S] of the
//! store, per batch row), so a captured step replays correctly. One thread per (row, KV head).
//! k: [rows, kv_heads, head_dim]; ratios: [kv_heads] of this layer.
__global__ void set_decisions_kernel(__nv_bfloat16* __restrict__ k, int rows, int kv_heads,
                                     int head_dim, int decision_dim,
                                     std::int32_t const* __restrict__ ratios,
                                     std::int64_t const* __restrict__ step_positions_of_layer,
                                     float offset) {
  int const index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= rows * kv_heads) return;
  int const row = index / kv_heads;
  int const head = index % kv_heads;
  std::int64_t const position = step_positions_of_layer[row];
  bool const merge = position % ratios[head] != 0;
  k[static_cast<std::int64_t>(index) * head_dim + decision_dim] =
      __float2bfloat16_rn(merge ? offset + 8.0f : offset - 8.0f);
}

//! Replaces every element of `data` by its magnitude (random fills as positive "probabilities").
__global__ void abs_kernel(float* __restrict__ data, std::int64_t count) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    data[i] = fabsf(data[i]);
  }
}

}  // namespace kvc::e2e
