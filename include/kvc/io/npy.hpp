//! @file
//! Reading and writing NumPy `.npy` files of float32 or int32 arrays in C order, with strict
//! validation. Format (numpy.lib.format): the magic `\x93NUMPY`, a major and minor version byte,
//! the header length (2 bytes little-endian in v1.0, 4 bytes in v2.0/v3.0), an ASCII header that
//! is a Python dict literal `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }` padded
//! with spaces and ending in '\n', then the raw little-endian data.
//!
//! Accepted: versions 1.0, 2.0 and 3.0 (3.0 only changes the header's text encoding, and ours is
//! ASCII); dtypes `<f4` and `<i4` (`|`/`=` byte orders are not accepted: numpy writes `<` on
//! little-endian machines); `fortran_order: False`; a shape tuple of non-negative integers (`()` is
//! a scalar); data that fills the rest of the file exactly. Everything else returns an `IoStatus`
//! whose message says what was found and what was expected; no input, however malformed, reads
//! out of bounds. Data are decoded byte by byte, so big-endian hosts read correctly too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

#include "kvc/io/io_status.hpp"

namespace kvc::io {

//! Element types the reader and writer support.
enum class NpyDType : int { kF32 = 0, kI32 = 1 };

//! The `descr` string of `dtype` (`<f4`, `<i4`).
inline char const* npy_descr(NpyDType dtype) {
  return dtype == NpyDType::kF32 ? "<f4" : "<i4";
}

//! The NumPy name of `dtype` (`float32`, `int32`).
inline char const* npy_dtype_name(NpyDType dtype) {
  return dtype == NpyDType::kF32 ? "float32" : "int32";
}

//! The NpyDType of a C++ element type (float or std::int32_t).
template <class T>
struct NpyTraits;
template <>
struct NpyTraits<float> {
  static constexpr NpyDType kDType = NpyDType::kF32;
};
template <>
struct NpyTraits<std::int32_t> {
  static constexpr NpyDType kDType = NpyDType::kI32;
};

//! Most dimensions a shape may have (NumPy's own limit is 64).
inline constexpr int kNpyMaxDims = 32;

//! What a valid header says.
struct NpyHeader {
  int major_version = 1;
  NpyDType dtype = NpyDType::kF32;
  std::vector<std::int64_t> shape;  //!< empty for a 0-d (scalar) array
  std::size_t data_offset = 0;      //!< byte where the data begin
  std::uint64_t count = 1;          //!< elements (product of the shape)
};

//! An n-dimensional array in C (row-major) order.
template <class T>
struct NpyArray {
  std::vector<std::int64_t> shape;
  std::vector<T> data;  //!< [product of shape]

  int rank() const { return static_cast<int>(shape.size()); }
};

//! Shape as text, like NumPy prints it: `(2, 3)`, `(5,)`, `()`.
inline std::string npy_shape_string(std::vector<std::int64_t> const& shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(shape[i]);
  }
  if (shape.size() == 1) text += ",";
  return text + ")";
}

namespace detail {

inline constexpr char kNpyMagic[] = "\x93NUMPY";
inline constexpr std::size_t kNpyMagicSize = 6;

//! A cursor over the header dict literal; every read is bounds-checked.
class NpyHeaderParser {
 public:
  explicit NpyHeaderParser(std::string_view text) : text_(text) {}

  IoStatus parse(NpyHeader& header) {
    bool have_descr = false, have_order = false, have_shape = false;
    std::string descr;
    bool fortran_order = false;
    std::vector<std::int64_t> shape;
    skip_space();
    if (!consume('{')) return fail("header does not start with '{'");
    for (;;) {
      skip_space();
      if (consume('}')) break;
      std::string key;
      KVC_IO_RETURN_IF_ERROR(parse_string(key));
      skip_space();
      if (!consume(':')) return fail("expected ':' after key '" + key + "'");
      skip_space();
      if (key == "descr") {
        if (have_descr) return fail("duplicate key 'descr'");
        have_descr = true;
        if (peek() != '\'' && peek() != '"') {
          return fail("'descr' is not a string (structured dtypes are not supported)");
        }
        KVC_IO_RETURN_IF_ERROR(parse_string(descr));
      } else if (key == "fortran_order") {
        if (have_order) return fail("duplicate key 'fortran_order'");
        have_order = true;
        KVC_IO_RETURN_IF_ERROR(parse_bool(fortran_order));
      } else if (key == "shape") {
        if (have_shape) return fail("duplicate key 'shape'");
        have_shape = true;
        KVC_IO_RETURN_IF_ERROR(parse_shape(shape));
      } else {
        return fail("unexpected key '" + key + "' (expected 'descr', 'fortran_order', 'shape')");
      }
      skip_space();
      if (consume(',')) continue;
      skip_space();
      if (consume('}')) break;
      return fail("expected ',' or '}' after the value of '" + key + "'");
    }
    skip_space();
    if (pos_ != text_.size()) return fail("unexpected text after the header dict");
    if (!have_descr || !have_order || !have_shape) {
      return IoStatus::error("header lacks " + std::string(!have_descr   ? "'descr'"
                                                           : !have_order ? "'fortran_order'"
                                                                         : "'shape'"));
    }
    NpyDType dtype;
    KVC_IO_RETURN_IF_ERROR(parse_descr(descr, dtype));
    if (fortran_order) {
      return IoStatus::error(
          "fortran_order is True: save a C-ordered array "
          "(numpy.ascontiguousarray)");
    }
    header.dtype = dtype;
    header.shape = std::move(shape);
    return IoStatus::success();
  }

 private:
  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  bool consume(char c) {
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }
  IoStatus fail(std::string const& what) const {
    return IoStatus::error("malformed header at character " + std::to_string(pos_) + ": " + what);
  }

  IoStatus parse_string(std::string& out) {
    char const quote = peek();
    if (quote != '\'' && quote != '"') return fail("expected a quoted string");
    ++pos_;
    std::size_t const start = pos_;
    while (pos_ < text_.size() && text_[pos_] != quote) {
      if (text_[pos_] == '\\') return fail("escape sequences are not supported in header strings");
      ++pos_;
    }
    if (pos_ >= text_.size()) return fail("unterminated string");
    out.assign(text_.substr(start, pos_ - start));
    ++pos_;
    return IoStatus::success();
  }

  IoStatus parse_bool(bool& out) {
    if (text_.substr(pos_, 4) == "True") {
      pos_ += 4;
      out = true;
      return IoStatus::success();
    }
    if (text_.substr(pos_, 5) == "False") {
      pos_ += 5;
      out = false;
      return IoStatus::success();
    }
    return fail("'fortran_order' must be True or False");
  }

  IoStatus parse_shape(std::vector<std::int64_t>& out) {
    if (!consume('(')) return fail("'shape' must be a tuple, e.g. (2, 3) or (5,)");
    std::vector<std::int64_t> dims;
    bool trailing_comma = false;
    for (;;) {
      skip_space();
      if (consume(')')) break;
      if (!dims.empty() && !trailing_comma) return fail("expected ',' or ')' in 'shape'");
      if (peek() < '0' || peek() > '9')
        return fail("'shape' entries must be non-negative integers");
      std::int64_t value = 0;
      while (peek() >= '0' && peek() <= '9') {
        int const digit = peek() - '0';
        if (value > (std::numeric_limits<std::int64_t>::max() - digit) / 10) {
          return fail("a 'shape' entry overflows 64 bits");
        }
        value = value * 10 + digit;
        ++pos_;
      }
      if (peek() == 'L') ++pos_;  // Python 2 long literal
      if (static_cast<int>(dims.size()) == kNpyMaxDims) {
        return fail("'shape' has more than " + std::to_string(kNpyMaxDims) + " dimensions");
      }
      dims.push_back(value);
      skip_space();
      trailing_comma = consume(',');
    }
    if (dims.size() == 1 && !trailing_comma)
      return fail("a 1-d 'shape' needs a trailing comma: (n,)");
    out = std::move(dims);
    return IoStatus::success();
  }

  static IoStatus parse_descr(std::string const& descr, NpyDType& out) {
    if (descr == "<f4") {
      out = NpyDType::kF32;
      return IoStatus::success();
    }
    if (descr == "<i4") {
      out = NpyDType::kI32;
      return IoStatus::success();
    }
    std::string hint;
    if (descr == ">f4" || descr == ">i4") {
      hint = ": big-endian data; save with arr.astype('<f4') or '<i4'";
    } else if (descr.size() >= 2 && (descr.substr(1) == "f8" || descr.substr(1) == "f2")) {
      hint = ": convert with arr.astype(numpy.float32) before numpy.save";
    } else if (descr == "<V2" || descr.find("bfloat16") != std::string::npos) {
      hint = ": bfloat16 arrays must be saved as float32 (tensor.float().numpy())";
    }
    return IoStatus::error("unsupported dtype '" + descr +
                           "' (expected '<f4' float32 or '<i4' int32)" + hint);
  }

  std::string_view text_;
  std::size_t pos_ = 0;
};

inline std::uint32_t load_le32(unsigned char const* bytes) {
  return static_cast<std::uint32_t>(bytes[0]) | static_cast<std::uint32_t>(bytes[1]) << 8 |
         static_cast<std::uint32_t>(bytes[2]) << 16 | static_cast<std::uint32_t>(bytes[3]) << 24;
}

inline void store_le32(std::uint32_t value, char* bytes) {
  for (int i = 0; i < 4; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xffu);
}

//! Reads a whole regular file into `bytes`.
inline IoStatus read_file_bytes(std::string const& path, std::string& bytes) {
  std::error_code error;
  if (!std::filesystem::exists(path, error)) return IoStatus::error("file not found");
  if (!std::filesystem::is_regular_file(path, error)) return IoStatus::error("not a regular file");
  std::ifstream file(path, std::ios::binary);
  if (!file) return IoStatus::error("cannot open for reading");
  file.seekg(0, std::ios::end);
  std::streamoff const size = file.tellg();
  if (size < 0) return IoStatus::error("cannot determine the file size");
  file.seekg(0, std::ios::beg);
  std::string content(static_cast<std::size_t>(size), '\0');
  if (size > 0 && !file.read(content.data(), size)) return IoStatus::error("read error");
  bytes = std::move(content);
  return IoStatus::success();
}

}  // namespace detail

//! Parses and validates the header of the .npy image `bytes` (`size` bytes), including that the
//! data after the header are exactly `count * 4` bytes. `header` is set only on success.
inline IoStatus parse_npy_header(char const* bytes, std::size_t size, NpyHeader& header) {
  using detail::kNpyMagicSize;
  if (bytes == nullptr && size > 0) return IoStatus::error("null buffer");
  if (size == 0) return IoStatus::error("empty file (0 bytes), not a .npy file");
  if (size < kNpyMagicSize + 2 || std::memcmp(bytes, detail::kNpyMagic, kNpyMagicSize) != 0) {
    if (size < kNpyMagicSize + 2 && size > 0 &&
        std::memcmp(bytes, detail::kNpyMagic, size < kNpyMagicSize ? size : kNpyMagicSize) == 0) {
      return IoStatus::error("truncated: " + std::to_string(size) +
                             " bytes, too short for a .npy header");
    }
    return IoStatus::error("not a .npy file (the magic string \\x93NUMPY is missing)");
  }
  auto const* data = reinterpret_cast<unsigned char const*>(bytes);
  int const major = data[6];
  int const minor = data[7];
  if ((major != 1 && major != 2 && major != 3) || minor != 0) {
    return IoStatus::error("unsupported .npy format version " + std::to_string(major) + "." +
                           std::to_string(minor) + " (expected 1.0, 2.0 or 3.0)");
  }
  std::size_t const length_bytes = major == 1 ? 2 : 4;
  std::size_t const prefix = kNpyMagicSize + 2 + length_bytes;
  if (size < prefix) {
    return IoStatus::error("truncated: the file ends inside the header length field");
  }
  std::uint64_t const header_length =
      major == 1 ? (static_cast<std::uint64_t>(data[8]) | static_cast<std::uint64_t>(data[9]) << 8)
                 : static_cast<std::uint64_t>(detail::load_le32(data + 8));
  if (header_length > size - prefix) {
    return IoStatus::error("header length " + std::to_string(header_length) +
                           " runs past the end of the " + std::to_string(size) + "-byte file");
  }
  std::string_view const text(bytes + prefix, static_cast<std::size_t>(header_length));
  if (text.empty() || text.back() != '\n') {
    return IoStatus::error("malformed header: it does not end with a newline");
  }
  for (char c : text) {
    auto const u = static_cast<unsigned char>(c);
    if (u >= 0x80 || (u < 0x20 && c != '\n' && c != '\t' && c != '\r')) {
      return IoStatus::error("malformed header: non-ASCII or control byte in the header text");
    }
  }
  NpyHeader parsed;
  KVC_IO_RETURN_IF_ERROR(detail::NpyHeaderParser(text).parse(parsed));
  parsed.major_version = major;
  parsed.data_offset = prefix + static_cast<std::size_t>(header_length);

  std::uint64_t const data_bytes = size - parsed.data_offset;
  std::uint64_t count = 1;
  bool overflow = false;
  for (std::int64_t dim : parsed.shape) {
    auto const extent = static_cast<std::uint64_t>(dim);
    if (extent != 0 && count > std::numeric_limits<std::uint64_t>::max() / 4 / extent)
      overflow = true;
    count *= extent;  // stays defined (unsigned); ignored once overflow is set
  }
  // a zero extent anywhere makes the true product 0 even if an earlier product overflowed
  for (std::int64_t dim : parsed.shape) {
    if (dim == 0) {
      count = 0;
      overflow = false;
    }
  }
  if (overflow) {
    return IoStatus::error("shape " + npy_shape_string(parsed.shape) +
                           " has more elements than any file can hold");
  }
  if (count * 4 != data_bytes) {
    return IoStatus::error("shape " + npy_shape_string(parsed.shape) + " of " +
                           npy_dtype_name(parsed.dtype) + " needs " + std::to_string(count * 4) +
                           " data bytes, the file has " + std::to_string(data_bytes) +
                           (count * 4 > data_bytes ? " (truncated?)" : " (trailing bytes)"));
  }
  parsed.count = count;
  header = std::move(parsed);
  return IoStatus::success();
}

//! Decodes a whole .npy image into `out`, which must have the file's element type
//! (float for `<f4`, std::int32_t for `<i4`). `out` is set only on success.
template <class T>
IoStatus decode_npy(std::string_view bytes, NpyArray<T>& out) {
  NpyHeader header;
  KVC_IO_RETURN_IF_ERROR(parse_npy_header(bytes.data(), bytes.size(), header));
  if (header.dtype != NpyTraits<T>::kDType) {
    return IoStatus::error(std::string("holds ") + npy_dtype_name(header.dtype) + " ('" +
                           npy_descr(header.dtype) + "'), expected " +
                           npy_dtype_name(NpyTraits<T>::kDType) + " ('" +
                           npy_descr(NpyTraits<T>::kDType) + "')");
  }
  NpyArray<T> array;
  array.shape = header.shape;
  array.data.resize(static_cast<std::size_t>(header.count));
  auto const* data = reinterpret_cast<unsigned char const*>(bytes.data()) + header.data_offset;
  for (std::size_t i = 0; i < array.data.size(); ++i) {
    std::uint32_t const word = detail::load_le32(data + 4 * i);
    std::memcpy(&array.data[i], &word, sizeof word);
  }
  out = std::move(array);
  return IoStatus::success();
}

//! Reads the .npy file at `path`. Error messages start with the path.
template <class T>
IoStatus read_npy(std::string const& path, NpyArray<T>& out) {
  std::string bytes;
  KVC_IO_RETURN_IF_ERROR(detail::read_file_bytes(path, bytes).with_context(path));
  return decode_npy(bytes, out).with_context(path);
}

//! Encodes `count` elements in C order under `shape` as a .npy image. `version` 1 or 2 forces
//! that header format; 0 picks 1.0 unless the header needs more than 65535 bytes. The header is
//! padded so that the data start at a multiple of 64 bytes, as NumPy does.
template <class T>
IoStatus encode_npy(std::vector<std::int64_t> const& shape, T const* values, std::size_t count,
                    std::string& bytes, int version = 0) {
  static_assert(sizeof(T) == 4, "npy: 4-byte element types only");
  if (version != 0 && version != 1 && version != 2)
    return IoStatus::error("npy version must be 0, 1 or 2");
  if (static_cast<int>(shape.size()) > kNpyMaxDims) return IoStatus::error("too many dimensions");
  std::uint64_t product = 1;
  for (std::int64_t dim : shape) {
    if (dim < 0) return IoStatus::error("negative extent in shape " + npy_shape_string(shape));
    product *= static_cast<std::uint64_t>(dim);
  }
  if (product != count || (count > 0 && values == nullptr)) {
    return IoStatus::error("shape " + npy_shape_string(shape) + " does not match " +
                               std::to_string(count) + " elements",
                           Status::kErrorSizeMismatch);
  }
  std::string header = std::string("{'descr': '") + npy_descr(NpyTraits<T>::kDType) +
                       "', 'fortran_order': False, 'shape': " + npy_shape_string(shape) + ", }";
  int const major = version != 0 ? version : (header.size() + 1 + 10 <= 65535 ? 1 : 2);
  std::size_t const prefix = detail::kNpyMagicSize + 2 + (major == 1 ? 2 : 4);
  std::size_t const unpadded = prefix + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  if (major == 1 && header.size() > 65535)
    return IoStatus::error("header too long for version 1.0");

  std::string image(prefix + header.size() + 4 * count, '\0');
  std::memcpy(image.data(), detail::kNpyMagic, detail::kNpyMagicSize);
  image[6] = static_cast<char>(major);
  image[7] = 0;
  if (major == 1) {
    image[8] = static_cast<char>(header.size() & 0xffu);
    image[9] = static_cast<char>((header.size() >> 8) & 0xffu);
  } else {
    detail::store_le32(static_cast<std::uint32_t>(header.size()), image.data() + 8);
  }
  std::memcpy(image.data() + prefix, header.data(), header.size());
  char* data = image.data() + prefix + header.size();
  for (std::size_t i = 0; i < count; ++i) {
    std::uint32_t word;
    std::memcpy(&word, &values[i], sizeof word);
    detail::store_le32(word, data + 4 * i);
  }
  bytes = std::move(image);
  return IoStatus::success();
}

//! Writes `values` (C order, `shape`) to the .npy file `path`, replacing it. Errors start with
//! the path.
template <class T>
IoStatus write_npy(std::string const& path, std::vector<std::int64_t> const& shape,
                   std::vector<T> const& values, int version = 0) {
  std::string bytes;
  KVC_IO_RETURN_IF_ERROR(
      encode_npy(shape, values.data(), values.size(), bytes, version).with_context(path));
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  if (!file) return IoStatus::error(path + ": cannot open for writing");
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  file.close();
  if (!file) return IoStatus::error(path + ": write error");
  return IoStatus::success();
}

}  // namespace kvc::io
