// .npy reader/writer: round trips (shapes, dtypes, v1.0/v2.0 headers) and strict rejection of
// malformed files (every case must return an error, never crash or read out of bounds).
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/io/npy.hpp"

#include "test_support.hpp"

using namespace kvc;
using namespace kvc::io;

namespace {

//! A .npy image with a hand-written header dict (padded like NumPy) and `data_bytes` bytes of data.
std::string handmade_npy(std::string const& dict, std::size_t data_bytes, int major = 1) {
  std::string header = dict;
  std::size_t const prefix = major == 1 ? 10 : 12;
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header.push_back('\n');
  std::string image = "\x93NUMPY";
  image.push_back(static_cast<char>(major));
  image.push_back('\0');
  std::uint32_t const length = static_cast<std::uint32_t>(header.size());
  for (std::size_t i = 0; i < prefix - 8; ++i)
    image.push_back(static_cast<char>((length >> (8 * i)) & 0xff));
  image += header;
  image.append(data_bytes, '\x01');
  return image;
}

std::string float_dict(std::string const& shape) {
  return "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
}

//! Asserts that decoding `image` as float fails with a message containing `needle`.
void require_rejected(std::string const& image, std::string const& needle) {
  NpyArray<float> array;
  array.shape = {7};
  array.data = {42.0f};
  IoStatus const status = decode_npy(image, array);
  INFO("message: " << status.message);
  REQUIRE_FALSE(status.ok());
  CHECK(status.message.find(needle) != std::string::npos);
  CHECK(array.shape == std::vector<std::int64_t>{7});  // output untouched on error
  CHECK(array.data == std::vector<float>{42.0f});
}

}  // namespace

TEST_SUITE("host") {
  TEST_CASE("npy: float32 and int32 round trip through bytes and files") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    std::vector<std::vector<std::int64_t>> const shapes = {{},        {5},          {3, 4},
                                                           {2, 3, 7}, {1, 1, 2, 3}, {0, 4}};
    for (auto const& shape : shapes) {
      std::size_t count = 1;
      for (std::int64_t dim : shape) count *= static_cast<std::size_t>(dim);
      std::vector<float> floats = test::random_normal(rng, count);
      std::vector<std::int32_t> ints(count);
      std::uniform_int_distribution<std::int32_t> dist(std::numeric_limits<std::int32_t>::min(),
                                                       std::numeric_limits<std::int32_t>::max());
      for (auto& value : ints) value = dist(rng);
      for (int version : {0, 1, 2}) {
        INFO("shape " << npy_shape_string(shape) << " version " << version);
        std::string bytes;
        REQUIRE(encode_npy(shape, floats.data(), floats.size(), bytes, version).ok());
        CHECK(bytes[6] == (version == 2 ? 2 : 1));
        NpyHeader header;
        REQUIRE(parse_npy_header(bytes.data(), bytes.size(), header).ok());
        CHECK(header.data_offset % 64 == 0);
        CHECK(header.shape == shape);
        NpyArray<float> back;
        REQUIRE(decode_npy(bytes, back).ok());
        CHECK(back.shape == shape);
        CHECK(back.data == floats);

        REQUIRE(encode_npy(shape, ints.data(), ints.size(), bytes, version).ok());
        NpyArray<std::int32_t> ints_back;
        REQUIRE(decode_npy(bytes, ints_back).ok());
        CHECK(ints_back.shape == shape);
        CHECK(ints_back.data == ints);
      }
    }

    auto const dir =
        std::filesystem::temp_directory_path() / ("kvc_npy_" + std::to_string(test::test_seed()));
    std::filesystem::create_directories(dir);
    std::string const path = (dir / "a.npy").string();
    std::vector<float> values = test::random_normal(rng, 24);
    REQUIRE(write_npy(path, {2, 3, 4}, values, 2).ok());
    NpyArray<float> read;
    REQUIRE(read_npy(path, read).ok());
    CHECK(read.shape == std::vector<std::int64_t>{2, 3, 4});
    CHECK(read.data == values);
    // reading with the wrong element type names both dtypes
    NpyArray<std::int32_t> wrong;
    IoStatus const status = read_npy(path, wrong);
    REQUIRE_FALSE(status.ok());
    CHECK(status.message.find(path) == 0);
    CHECK(status.message.find("expected int32") != std::string::npos);
    std::filesystem::remove_all(dir);
  }

  TEST_CASE("npy: headers NumPy writes in other styles are accepted") {
    // double-quoted keys, no trailing comma, keys in another order, v3.0, Python 2 long literals
    std::vector<std::string> const dicts = {
        "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2, 3)}",
        "{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}",
        "{'descr':'<f4','fortran_order':False,'shape':(2L,3L),}",
    };
    for (std::string const& dict : dicts) {
      INFO(dict);
      NpyArray<float> array;
      IoStatus const status = decode_npy(handmade_npy(dict, 24), array);
      INFO(status.message);
      REQUIRE(status.ok());
      CHECK(array.shape == std::vector<std::int64_t>{2, 3});
    }
    NpyArray<float> array;
    REQUIRE(decode_npy(handmade_npy(float_dict("(2, 3)"), 24, 3), array).ok());
  }

  TEST_CASE("npy: malformed files are rejected with a message") {
    std::string const good = handmade_npy(float_dict("(2, 3)"), 24);
    {
      NpyArray<float> array;
      REQUIRE(decode_npy(good, array).ok());
    }
    SUBCASE("empty and truncated prefixes") {
      require_rejected("", "empty");
      for (std::size_t size : {1u, 5u, 7u, 9u}) require_rejected(good.substr(0, size), "");
      require_rejected(good.substr(0, 9), "truncated");
      // every truncation of the file fails (inside the header or the data)
      for (std::size_t size = 0; size < good.size(); ++size) {
        NpyArray<float> array;
        CHECK_FALSE(decode_npy(good.substr(0, size), array).ok());
      }
    }
    SUBCASE("wrong magic") {
      std::string image = good;
      image[1] = 'M';
      require_rejected(image, "magic");
      require_rejected("PK\x03\x04 this is a zip file, not npy", "magic");
    }
    SUBCASE("unsupported version") {
      std::string image = good;
      image[6] = 4;
      require_rejected(image, "version 4.0");
      image[6] = 1;
      image[7] = 1;
      require_rejected(image, "version 1.1");
    }
    SUBCASE("header length beyond the file") {
      std::string image = good;
      image[8] = '\xff';
      image[9] = '\xff';
      require_rejected(image, "runs past the end");
      std::string v2 = handmade_npy(float_dict("(2, 3)"), 24, 2);
      v2[11] = '\x7f';
      require_rejected(v2, "runs past the end");
    }
    SUBCASE("bad dtypes") {
      require_rejected(
          handmade_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }", 24), "'<f8'");
      require_rejected(
          handmade_npy("{'descr': '>f4', 'fortran_order': False, 'shape': (3,), }", 12),
          "big-endian");
      require_rejected(handmade_npy("{'descr': '<f2', 'fortran_order': False, 'shape': (3,), }", 6),
                       "float32");
      require_rejected(
          handmade_npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,), }", 12),
          "structured");
      NpyArray<float> as_float;
      IoStatus const status = decode_npy(
          handmade_npy("{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }", 12), as_float);
      REQUIRE_FALSE(status.ok());
      CHECK(status.message.find("int32") != std::string::npos);
    }
    SUBCASE("fortran order") {
      require_rejected(
          handmade_npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", 24),
          "fortran_order");
      require_rejected(handmade_npy("{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3), }", 24),
                       "True or False");
    }
    SUBCASE("shape and size mismatch") {
      require_rejected(handmade_npy(float_dict("(2, 3)"), 20), "truncated");
      require_rejected(handmade_npy(float_dict("(2, 3)"), 28), "trailing bytes");
      require_rejected(handmade_npy(float_dict("(2, 4)"), 24), "needs 32 data bytes");
    }
    SUBCASE("huge shapes overflow") {
      require_rejected(handmade_npy(float_dict("(4611686018427387904, 4)"), 16), "more elements");
      require_rejected(handmade_npy(float_dict("(65536, 65536, 65536, 65536)"), 16),
                       "more elements");
      require_rejected(handmade_npy(float_dict("(99999999999999999999,)"), 16), "overflows");
      // an extent of zero makes the product zero, even after an overflowing prefix
      NpyArray<float> array;
      REQUIRE(decode_npy(handmade_npy(float_dict("(4611686018427387904, 4, 0)"), 0), array).ok());
      CHECK(array.data.empty());
    }
    SUBCASE("malformed header dicts") {
      require_rejected(handmade_npy("['descr', '<f4']", 24), "'{'");
      require_rejected(handmade_npy("{'descr': '<f4', 'fortran_order': False}", 24), "'shape'");
      require_rejected(
          handmade_npy("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (6,)}",
                       24),
          "duplicate");
      require_rejected(handmade_npy(float_dict("(2, 3)") + " x", 24), "after the header");
      require_rejected(handmade_npy(float_dict("(6)"), 24), "trailing comma");
      require_rejected(handmade_npy(float_dict("(-6,)"), 24), "non-negative");
      require_rejected(handmade_npy(float_dict("(2 3)"), 24), "expected ','");
      require_rejected(handmade_npy(float_dict("[2, 3]"), 24), "tuple");
      require_rejected(handmade_npy("{'descr': '<f4, 'fortran_order': False, 'shape': (6,)}", 24),
                       "");
      require_rejected(
          handmade_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'x': 1}", 24),
          "unexpected key");
      std::string no_newline = good;
      no_newline[good.size() - 24 - 1] = ' ';
      require_rejected(no_newline, "newline");
      std::string binary = good;
      binary[20] = '\x01';
      require_rejected(binary, "control");
    }
    SUBCASE("files that do not exist or are directories") {
      NpyArray<float> array;
      IoStatus status = read_npy("/nonexistent/kvc/x.npy", array);
      REQUIRE_FALSE(status.ok());
      CHECK(status.message.find("not found") != std::string::npos);
      status = read_npy(std::filesystem::temp_directory_path().string(), array);
      REQUIRE_FALSE(status.ok());
      CHECK(status.message.find("not a regular file") != std::string::npos);
    }
  }

  TEST_CASE("npy: random corruption never crashes") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    std::vector<float> values = test::random_normal(rng, 12);
    std::string good;
    REQUIRE(encode_npy({3, 4}, values.data(), values.size(), good).ok());
    std::uniform_int_distribution<std::size_t> position(0, 80);
    std::uniform_int_distribution<int> byte(0, 255);
    int rejected = 0;
    for (int trial = 0; trial < 2000; ++trial) {
      std::string image = good;
      int const flips = 1 + trial % 3;
      for (int f = 0; f < flips; ++f) image[position(rng)] = static_cast<char>(byte(rng));
      NpyArray<float> array;
      IoStatus const status = decode_npy(image, array);
      if (!status.ok()) {
        ++rejected;
        CHECK_FALSE(status.message.empty());
      } else {
        // whatever was accepted is self-consistent
        std::size_t count = 1;
        for (std::int64_t dim : array.shape) count *= static_cast<std::size_t>(dim);
        CHECK(count == array.data.size());
      }
    }
    CHECK(rejected > 0);
  }
}
