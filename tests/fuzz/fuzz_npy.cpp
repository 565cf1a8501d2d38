//! @file
//! libFuzzer target over the .npy reader (kvc/io/npy.hpp): any byte string is decoded as float32
//! and as int32. A file that decodes must re-encode to an image that decodes to the same array;
//! a file that does not must leave the output untouched. Crashes, out-of-bounds reads and
//! undefined behaviour are what the sanitizers report.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "kvc/io/npy.hpp"

#include "fuzz_check.hpp"

namespace {

template <class T>
void decode_as(std::string_view bytes) {
  using kvc::io::NpyArray;
  NpyArray<T> array;
  array.shape = {3};
  array.data = {T(1), T(2), T(3)};
  kvc::io::IoStatus const status = kvc::io::decode_npy(bytes, array);
  if (!status.ok()) {
    KVC_FUZZ_CHECK(!status.message.empty());
    KVC_FUZZ_CHECK(array.shape == std::vector<std::int64_t>{3} && array.data.size() == 3);
    return;
  }
  std::uint64_t count = 1;
  for (std::int64_t dim : array.shape) {
    KVC_FUZZ_CHECK(dim >= 0);
    count *= static_cast<std::uint64_t>(dim);
  }
  KVC_FUZZ_CHECK(count == array.data.size());
  std::string image;
  KVC_FUZZ_CHECK(
      kvc::io::encode_npy(array.shape, array.data.data(), array.data.size(), image).ok());
  NpyArray<T> again;
  KVC_FUZZ_CHECK(kvc::io::decode_npy(image, again).ok());
  KVC_FUZZ_CHECK(again.shape == array.shape);
  KVC_FUZZ_CHECK(again.data.size() == array.data.size());
  KVC_FUZZ_CHECK(array.data.empty() ||
                 std::memcmp(again.data.data(), array.data.data(), 4 * array.data.size()) == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  std::string_view const bytes(reinterpret_cast<char const*>(data), size);
  kvc::io::NpyHeader header;
  if (kvc::io::parse_npy_header(bytes.data(), bytes.size(), header).ok()) {
    KVC_FUZZ_CHECK(header.data_offset <= size);
    KVC_FUZZ_CHECK(header.count * 4 == size - header.data_offset);
  }
  decode_as<float>(bytes);
  decode_as<std::int32_t>(bytes);
  return 0;
}
