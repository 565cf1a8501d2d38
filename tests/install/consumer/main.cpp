// A downstream program that uses the installed kvc headers through find_package(kvc), and, when
// kvc was built with CUDA, its installed precompiled decode kernels (kvc::decode_instances).
#include <cstdio>

#include <kvc/kvc.hpp>
#if KVC_CONSUMER_KERNELS
#include <kvc/attention/decode_api.cuh>
#endif

int main() {
  kvc::ModelShape const shape{32, 32, 8, 128};
  if (shape.validate() != kvc::Status::kSuccess || shape.group_size() != 4) return 1;
#if KVC_CONSUMER_KERNELS
  // Every build (KVC_CI_MINIMAL included) compiles bf16, head dim 128, group size 4; no build
  // compiles head dim 96. Answered by the library's dispatcher, no device needed.
  if (!kvc::decode_attention_supported(kvc::DType::kBF16, 128, 4)) return 2;
  if (kvc::decode_attention_supported(kvc::DType::kBF16, 96, 4)) return 3;
  std::printf("kvc consumer ok (version %d, precompiled kernels linked)\n", KVC_VERSION);
#else
  std::printf("kvc consumer ok (version %d)\n", KVC_VERSION);
#endif
  return 0;
}
