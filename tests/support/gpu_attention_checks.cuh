//! @file
//! Helpers of the attention GPU tests (decode and prefill): raw device bytes, host floats as the
//! device's element bytes and back, the compiled configuration set, a stream per case, and paged
//! key/value pools with pages scattered through them (built here directly, independent of the
//! store's code) and gathered back through their page tables.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include "kvc/core/dtype.hpp"
#include "kvc/reference/attention.hpp"

#include "cuda_test_support.cuh"
#include "test_support.hpp"

namespace kvc::test {

//! Raw device bytes, freed on destruction.
class DeviceBytes {
 public:
  DeviceBytes() = default;
  explicit DeviceBytes(std::size_t bytes) { allocate(bytes); }
  DeviceBytes(DeviceBytes const&) = delete;
  DeviceBytes& operator=(DeviceBytes const&) = delete;
  ~DeviceBytes() { release(); }
  //! Exactly `bytes` (none for 0: get() is then null).
  void allocate(std::size_t bytes) {
    release();
    bytes_ = bytes;
    if (bytes > 0) KVC_CUDA_REQUIRE(cudaMalloc(&data_, bytes));
  }
  void release() {
    if (data_ != nullptr) cudaFree(data_);
    data_ = nullptr;
    bytes_ = 0;
  }
  template <class U = void>
  U* get() const {
    return static_cast<U*>(data_);
  }
  std::size_t bytes() const { return bytes_; }
  //! Copies `bytes` from the host into the allocation (which must hold them).
  void upload(void const* host, std::size_t bytes) {
    REQUIRE(bytes <= bytes_);
    if (bytes > 0) KVC_CUDA_REQUIRE(cudaMemcpy(data_, host, bytes, cudaMemcpyHostToDevice));
  }
  void download(void* host, std::size_t bytes) const {
    REQUIRE(bytes <= bytes_);
    if (bytes > 0) KVC_CUDA_REQUIRE(cudaMemcpy(host, data_, bytes, cudaMemcpyDeviceToHost));
  }
  //! All bytes 0xff: NaN in fp32, fp16 and bf16, -1 in int32.
  void poison() {
    if (bytes_ > 0) KVC_CUDA_REQUIRE(cudaMemset(data_, 0xff, bytes_));
  }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

//! Host floats (already representable in `dtype`) as the device's element bytes.
inline std::vector<unsigned char> encode_elements(std::vector<float> const& values, DType dtype) {
  std::size_t const size = static_cast<std::size_t>(dtype_size(dtype));
  std::vector<unsigned char> bytes(values.size() * size);
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::kF32) {
      std::memcpy(bytes.data() + i * 4, &values[i], 4);
    } else {
      std::uint16_t const bits =
          dtype == DType::kF16 ? float_to_half_bits(values[i]) : float_to_bf16_bits(values[i]);
      std::memcpy(bytes.data() + i * 2, &bits, 2);
    }
  }
  return bytes;
}

//! The device's element bytes of `dtype` as floats.
inline std::vector<float> decode_elements(std::vector<unsigned char> const& bytes, DType dtype) {
  std::size_t const size = static_cast<std::size_t>(dtype_size(dtype));
  std::vector<float> values(bytes.size() / size);
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::kF32) {
      std::memcpy(&values[i], bytes.data() + i * 4, 4);
    } else {
      std::uint16_t bits;
      std::memcpy(&bits, bytes.data() + i * 2, 2);
      values[i] = dtype == DType::kF16 ? half_bits_to_float(bits) : bf16_bits_to_float(bits);
    }
  }
  return values;
}

//! The (dtype, head dim, group size) set the kernel libraries precompile (cmake/KvcKernels.cmake).
inline std::vector<DType> compiled_dtypes() {
#if KVC_CI_MINIMAL
  return {DType::kBF16};
#else
  return {DType::kF16, DType::kBF16, DType::kF32};
#endif
}
inline std::vector<int> compiled_head_dims() {
#if KVC_CI_MINIMAL
  return {128};
#else
  return {64, 128, 256};
#endif
}
inline std::vector<int> compiled_groups() {
#if KVC_CI_MINIMAL
  return {4};
#else
  return {1, 2, 4, 8};
#endif
}

//! A stream for one test case.
struct StreamGuard {
  cudaStream_t stream = nullptr;
  StreamGuard() { KVC_CUDA_REQUIRE(cudaStreamCreate(&stream)); }
  ~StreamGuard() { cudaStreamDestroy(stream); }
};

//! Sizes `layer.d_workspace` with `workspace_size`, poisons it and the outputs (d_out, d_lse,
//! d_probs), runs `run` on `layer.params()` and waits for it: the precompiled entry points
//! (decode_attention / prefill_attention and their size queries) on a test layer.
template <class Layer, class Params>
void run_poisoned(Layer& layer, Status (*workspace_size)(Params const&, std::size_t&),
                  Status (*run)(Params const&, cudaStream_t), cudaStream_t stream) {
  Params params = layer.params();
  std::size_t bytes = 0;
  REQUIRE(workspace_size(params, bytes) == Status::kSuccess);
  if (layer.d_workspace.bytes() < bytes) layer.d_workspace.allocate(bytes);
  layer.d_workspace.poison();
  layer.d_out.poison();
  layer.d_lse.poison();
  layer.d_probs.poison();
  params = layer.params();
  Status const status = run(params, stream);
  REQUIRE_MESSAGE(status == Status::kSuccess, to_string(status));
  KVC_CUDA_REQUIRE(cudaStreamSynchronize(stream));
  KVC_CUDA_REQUIRE(cudaGetLastError());
}

//! Random key and value pools of a paged layer and its page table.
struct ScatteredPages {
  int num_pages = 0;
  std::vector<float> k_pool, v_pool;  // [num_pages, page_size, head_dim]
  std::vector<int> page_table;        // [heads, max_pages]
};

//! Pools for `pages_of[i]` pages of head i (and 3 pages nobody owns), drawn from `rng` in
//! `dtype`, the pages of every head taken from a random permutation of the pool; the page table
//! has `heads` rows of `max_pages` entries, unused ones -1.
inline ScatteredPages scatter_pages(std::mt19937_64& rng, std::vector<int> const& pages_of,
                                    std::size_t heads, int max_pages, int page_size, int head_dim,
                                    DType dtype) {
  ScatteredPages pages;
  pages.num_pages = 3;  // pages nobody owns
  for (int count : pages_of) pages.num_pages += count;
  std::size_t const pool = static_cast<std::size_t>(pages.num_pages) * page_size * head_dim;
  pages.k_pool = random_normal(rng, pool, dtype);
  pages.v_pool = random_normal(rng, pool, dtype);
  std::vector<int> permutation(pages.num_pages);
  std::iota(permutation.begin(), permutation.end(), 0);
  std::shuffle(permutation.begin(), permutation.end(), rng);
  pages.page_table.assign(heads * max_pages, -1);
  int next = 0;
  for (std::size_t i = 0; i < pages_of.size(); ++i) {
    for (int j = 0; j < pages_of[i]; ++j) pages.page_table[i * max_pages + j] = permutation[next++];
  }
  return pages;
}

//! Appends slots [0, length) of a head to `head` (keys, values, positions 0..length-1); the
//! head's page-table row starts at page_table[first_entry].
inline void append_paged_slots(reference::HeadCache& head, std::vector<float> const& k_pool,
                               std::vector<float> const& v_pool, std::vector<int> const& page_table,
                               std::size_t first_entry, int page_size, int head_dim, int length) {
  for (int s = 0; s < length; ++s) {
    int const page = page_table[first_entry + s / page_size];
    std::size_t const row = (static_cast<std::size_t>(page) * page_size + s % page_size) * head_dim;
    head.k.insert(head.k.end(), k_pool.begin() + row, k_pool.begin() + row + head_dim);
    head.v.insert(head.v.end(), v_pool.begin() + row, v_pool.begin() + row + head_dim);
    head.position.push_back(s);
  }
}

}  // namespace kvc::test
