// Where the time of one decode-attention call goes: a timeline per call from %globaltimer
// stamps (kvc/attention/decode_trace.cuh, compiled in here with KVC_DECODE_TRACE; the library's
// instances never carry it). For each shape (the decode benchmark's shapes and layout seed:
// bf16, D = 128, pages of 16 slots scattered through the pool, copies rotated so that calls
// read HBM), 60 calls run back to back and the middle 40 are summarised, once with the default
// schedule (s0) and once with the balanced one (s3, DecodeParams::split.schedule):
//   call      plan start of this call -> plan start of the next call (what a benchmark times)
//   plan      plan kernel start -> end
//   wait      plan end -> first CTA past its grid-dependency wait
//   ramp      median over CTAs of (past the wait -> first tile ready)
//   exit p50/p90/max   CTA exits, from the first CTA past the wait
//   gap       last CTA exit -> next plan start
//   floor     bytes / probe bandwidth (K + V kept + q + out)
// Usage: kvc_decode_timeline [shape ...]   shape = mix_HQxHKV_BB_LL (mix: full, mixA, mixB)
//        e.g. kvc_decode_timeline full_32x4_B64_L4096 mixA_32x32_B8_L4096
// Prints one row per shape and, with KVC_TIMELINE_CTAS=1, each CTA's stamps of one call.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kvc/attention/decode.cuh"
#include "kvc/attention/dispatch.hpp"

#include "bandwidth.cuh"
#include "decode_layout.hpp"
#include "device_fill.cuh"

namespace {

using T = __nv_bfloat16;
constexpr int kHeadDim = 128;
constexpr int kPageSize = 16;
constexpr int kCalls = 60;
constexpr int kSkip = 10;
constexpr int kSummarised = 40;

#define CHECK_CUDA(expr)                                                              \
  do {                                                                                \
    cudaError_t const e_ = (expr);                                                    \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s: %s\n", #expr, cudaGetErrorString(e_));                \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

struct Shape {
  std::string mix;
  int hq = 32, hkv = 32, batch = 64, length = 4096;
};

bool parse(std::string const& name, Shape& s) {
  char mix[16] = {};
  if (std::sscanf(name.c_str(), "%15[a-zA-Z]_%dx%d_B%d_L%d", mix, &s.hq, &s.hkv, &s.batch,
                  &s.length) != 5) {
    return false;
  }
  s.mix = mix;
  return (s.mix == "full" || s.mix == "mixA" || s.mix == "mixB") && s.hkv > 0 &&
         s.hq % s.hkv == 0;
}

//! Calls fn(Attention) with the traced DecodeAttention of p's group size (1, 4 or 8: the
//! experiment compiles only these three instantiations).
template <class Fn>
kvc::Status with_attention(kvc::DecodeParams const& p, Fn&& fn) {
  return kvc::dispatch(
      [&](auto group) {
        return fn(kvc::DecodeAttention<kvc::DefaultVariant, T, kHeadDim, group.value>{});
      },
      kvc::choose(p.group_size(), kvc::ValueList<1, 4, 8>{}));
}

kvc::Status run_any(kvc::DecodeParams const& p, cudaStream_t stream) {
  return with_attention(p, [&](auto attention) { return decltype(attention)::run(p, stream); });
}

kvc::Status workspace_any(kvc::DecodeParams const& p, std::size_t& bytes) {
  return with_attention(
      p, [&](auto attention) { return decltype(attention)::workspace_size(p, bytes); });
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[static_cast<std::size_t>(q * (v.size() - 1))];
}

void run_shape(Shape const& shape, int schedule, double probe_gbps, int l2_bytes, T const* k_pool,
               T const* v_pool, std::size_t pool_pages, unsigned long long* trace) {
  // The decode benchmark's layout and page tables (same seed, support/decode_layout.hpp).
  std::mt19937_64 rng(kvc::bench::kDecodeLayoutSeed);
  kvc::bench::DecodeMix const mix = shape.mix == "full"   ? kvc::bench::DecodeMix::kFull
                                    : shape.mix == "mixA" ? kvc::bench::DecodeMix::kA
                                                          : kvc::bench::DecodeMix::kB;
  kvc::bench::DecodeLayout const layout = kvc::bench::make_decode_layout(
      mix, shape.batch, shape.hkv, shape.length, kPageSize, kHeadDim * 2.0 * sizeof(T), l2_bytes,
      kvc::bench::kDecodeMaxCopies, rng);
  if (layout.num_pages() > pool_pages) {
    std::printf("%s: pool too small\n", shape.mix.c_str());
    return;
  }
  std::vector<int> const& lengths = layout.lengths;
  int const max_pages = layout.max_pages;
  int const copies = layout.copies;
  double const kv_bytes = layout.kept * kHeadDim * 2.0 * sizeof(T);
  std::size_t const table_elems = lengths.size() * max_pages;
  std::vector<std::int32_t> const tables = kvc::bench::scattered_page_tables(layout, kPageSize, rng);
  std::int32_t *d_tables = nullptr, *d_lengths = nullptr;
  T *q = nullptr, *out = nullptr;
  float* lse = nullptr;
  std::size_t const q_elems = static_cast<std::size_t>(shape.batch) * shape.hq * kHeadDim;
  CHECK_CUDA(cudaMalloc(&d_tables, tables.size() * sizeof(std::int32_t)));
  CHECK_CUDA(cudaMemcpy(d_tables, tables.data(), tables.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMalloc(&d_lengths, lengths.size() * sizeof(int)));
  CHECK_CUDA(cudaMemcpy(d_lengths, lengths.data(), lengths.size() * sizeof(int), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMalloc(&q, q_elems * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&out, q_elems * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&lse, static_cast<std::size_t>(shape.batch) * shape.hq * sizeof(float)));
  CHECK_CUDA(kvc::bench::fill_normal(q, q_elems, 3));

  std::vector<kvc::DecodeParams> calls(copies);
  for (int c = 0; c < copies; ++c) {
    kvc::DecodeParams& p = calls[c];
    p.dtype = kvc::DType::kBF16;
    p.cache.k_pages = k_pool;
    p.cache.v_pages = v_pool;
    p.cache.page_table = d_tables + c * table_elems;
    p.cache.lengths = d_lengths;
    p.cache.page_size = kPageSize;
    p.cache.head_dim = kHeadDim;
    p.cache.num_kv_heads = shape.hkv;
    p.cache.max_pages_per_head = max_pages;
    p.cache.max_seqs = shape.batch;
    p.q = q;
    p.batch = shape.batch;
    p.num_q_heads = shape.hq;
    p.out = out;
    p.lse = lse;
    p.split.schedule = schedule;
  }
  std::size_t bytes = 0;
  if (workspace_any(calls[0], bytes) != kvc::Status::kSuccess) {
    std::printf("workspace size failed\n");
    return;
  }
  void* workspace = nullptr;
  CHECK_CUDA(cudaMalloc(&workspace, bytes));
  for (auto& p : calls) {
    p.workspace = workspace;
    p.workspace_bytes = bytes;
  }
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int grid = 0;
  for (int i = 0; i < 5; ++i) run_any(calls[i % copies], stream);  // warm-up (module load, caches)
  CHECK_CUDA(cudaStreamSynchronize(stream));

  std::vector<unsigned long long> zero(2, 0);
  CHECK_CUDA(cudaMemcpy(trace, zero.data(), 2 * sizeof(unsigned long long), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpyToSymbol(kvc_decode_trace, &trace, sizeof(trace)));
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaEventRecord(start, stream);
  for (int i = 0; i < kCalls; ++i) {
    if (run_any(calls[i % copies], stream) != kvc::Status::kSuccess) {
      std::printf("run failed\n");
      return;
    }
  }
  cudaEventRecord(stop, stream);
  CHECK_CUDA(cudaEventSynchronize(stop));
  float ms = 0.0f;
  cudaEventElapsedTime(&ms, start, stop);
  unsigned long long* null_trace = nullptr;
  CHECK_CUDA(cudaMemcpyToSymbol(kvc_decode_trace, &null_trace, sizeof(null_trace)));
  // The same calls without the trace, for its cost.
  cudaEventRecord(start, stream);
  for (int i = 0; i < kCalls; ++i) run_any(calls[i % copies], stream);
  cudaEventRecord(stop, stream);
  CHECK_CUDA(cudaEventSynchronize(stop));
  float ms_plain = 0.0f;
  cudaEventElapsedTime(&ms_plain, start, stop);

  std::size_t const words = 2 + static_cast<std::size_t>(kvc::detail::kDecodeTraceCalls) * kvc::detail::kDecodeTraceStride;
  std::vector<unsigned long long> host(words);
  CHECK_CUDA(cudaMemcpy(host.data(), trace, words * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  // Grid: CTAs that wrote an exit stamp in call kSkip.
  auto call_words = [&](int call) { return host.data() + 2 + (call % kvc::detail::kDecodeTraceCalls) * kvc::detail::kDecodeTraceStride; };
  for (int c = 0; c < kvc::detail::kDecodeTraceMaxCtas; ++c) {
    if (call_words(kSkip)[2 + c * kvc::detail::kDecodeTraceCtaWords + 3] != 0) grid = c + 1;
  }
  double const io_bytes = kv_bytes + 2.0 * q_elems * sizeof(T);
  double const floor_us = io_bytes / (probe_gbps * 1e3);
  std::vector<double> call_us, plan_us, wait_us, ramp_us, p50_us, p90_us, max_us, gap_us, items, tiles_max, tiles_mean;
  for (int call = kSkip; call < kSkip + kSummarised; ++call) {
    unsigned long long const* w = call_words(call);
    unsigned long long const* nextw = call_words(call + 1);
    double const plan_start = static_cast<double>(w[0]);
    double const plan_end = static_cast<double>(w[1]);
    double first_past = 1e30, last_exit = 0.0;
    std::vector<double> ramps, exits;
    double item_total = 0.0, tile_max = 0.0, tile_total = 0.0;
    for (int c = 0; c < grid; ++c) {
      unsigned long long const* cta = w + 2 + c * kvc::detail::kDecodeTraceCtaWords;
      first_past = std::min(first_past, static_cast<double>(cta[1]));
    }
    for (int c = 0; c < grid; ++c) {
      unsigned long long const* cta = w + 2 + c * kvc::detail::kDecodeTraceCtaWords;
      if (cta[2] != 0) ramps.push_back((static_cast<double>(cta[2]) - static_cast<double>(cta[1])) * 1e-3);
      exits.push_back((static_cast<double>(cta[3]) - first_past) * 1e-3);
      last_exit = std::max(last_exit, static_cast<double>(cta[3]));
      item_total += static_cast<double>(cta[5]);
      tile_total += static_cast<double>(cta[4]);
      tile_max = std::max(tile_max, static_cast<double>(cta[4]));
    }
    call_us.push_back((static_cast<double>(nextw[0]) - plan_start) * 1e-3);
    plan_us.push_back((plan_end - plan_start) * 1e-3);
    wait_us.push_back((first_past - plan_end) * 1e-3);
    ramp_us.push_back(ramps.empty() ? 0.0 : percentile(ramps, 0.5));
    p50_us.push_back(percentile(exits, 0.5));
    p90_us.push_back(percentile(exits, 0.9));
    max_us.push_back(percentile(exits, 1.0));
    gap_us.push_back((static_cast<double>(nextw[0]) - last_exit) * 1e-3);
    items.push_back(item_total);
    tiles_max.push_back(tile_max);
    tiles_mean.push_back(tile_total / grid);
    if (call == kSkip && std::getenv("KVC_TIMELINE_CTAS") != nullptr) {
      for (int c = 0; c < grid; ++c) {
        unsigned long long const* cta = w + 2 + c * kvc::detail::kDecodeTraceCtaWords;
        std::printf("  cta %3d entry %8.2f past-wait %8.2f first %8.2f exit %8.2f tiles %3llu items %3llu\n", c,
                    (static_cast<double>(cta[0]) - plan_start) * 1e-3,
                    (static_cast<double>(cta[1]) - plan_start) * 1e-3,
                    (static_cast<double>(cta[2]) - plan_start) * 1e-3,
                    (static_cast<double>(cta[3]) - plan_start) * 1e-3, cta[4], cta[5]);
      }
    }
  }
  auto med = [](std::vector<double> const& v) { return percentile(v, 0.5); };
  std::printf(
      "%-6s %3dx%-3d B%-3d L%-5d s%d | event %7.1f us (no trace %7.1f) floor %7.1f = %5.1f%% | call %7.1f plan %5.1f "
      "wait %5.1f ramp %5.1f exit p50 %7.1f p90 %7.1f max %7.1f gap %5.1f | grid %d items %.0f tiles/cta mean %.1f max %.0f\n",
      shape.mix.c_str(), shape.hq, shape.hkv, shape.batch, shape.length, schedule, 1e3 * ms / kCalls, 1e3 * ms_plain / kCalls,
      floor_us, 100.0 * floor_us / (1e3 * ms_plain / kCalls), med(call_us), med(plan_us), med(wait_us),
      med(ramp_us), med(p50_us), med(p90_us), med(max_us), med(gap_us), grid, med(items), med(tiles_mean),
      med(tiles_max));
  cudaStreamDestroy(stream);
  cudaFree(workspace);
  cudaFree(d_tables);
  cudaFree(d_lengths);
  cudaFree(q);
  cudaFree(out);
  cudaFree(lse);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> names;
  for (int i = 1; i < argc; ++i) names.emplace_back(argv[i]);
  if (names.empty()) {
    names = {"full_32x32_B64_L4096", "full_32x8_B64_L4096", "full_32x4_B64_L4096",
             "mixA_32x32_B64_L4096", "mixB_32x32_B64_L4096", "mixA_32x8_B64_L4096",
             "mixA_32x4_B64_L4096", "mixB_32x4_B64_L4096", "mixA_32x32_B8_L4096",
             "full_32x32_B8_L4096", "full_32x32_B1_L4096"};
  }
  double const probe = kvc::bench::measure_read_bandwidth();
  int l2 = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  std::printf("probe %.0f GB/s, L2 %d MB\n", probe, l2 >> 20);
  std::size_t const pool_pages = std::size_t{1} << 19;  // 2 x 2 GiB of bf16 pages
  T *k = nullptr, *v = nullptr;
  std::size_t const elems = pool_pages * kPageSize * kHeadDim;
  CHECK_CUDA(cudaMalloc(&k, elems * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&v, elems * sizeof(T)));
  CHECK_CUDA(kvc::bench::fill_normal(k, elems, 1));
  CHECK_CUDA(kvc::bench::fill_normal(v, elems, 2));
  unsigned long long* trace = nullptr;
  std::size_t const words = 2 + static_cast<std::size_t>(kvc::detail::kDecodeTraceCalls) * kvc::detail::kDecodeTraceStride;
  CHECK_CUDA(cudaMalloc(&trace, words * sizeof(unsigned long long)));
  CHECK_CUDA(cudaMemset(trace, 0, words * sizeof(unsigned long long)));
  for (std::string const& name : names) {
    Shape shape;
    if (!parse(name, shape)) {
      std::printf("bad shape %s\n", name.c_str());
      continue;
    }
    for (int schedule : {0, 3}) run_shape(shape, schedule, probe, l2, k, v, pool_pages, trace);
  }
  return 0;
}
