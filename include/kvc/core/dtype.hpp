//! @file
//! Storage dtypes of the cache (fp32, fp16, bf16) as a runtime enum, with portable, bit-exact
//! round-to-nearest-even conversions that need no CUDA header. The CPU reference computes in
//! float/double and rounds through these, so it stores exactly what a kernel stores.
#pragma once

#include <cstdint>
#include <cstring>

#include "kvc/core/macros.hpp"

namespace kvc {

//! Element type of cached keys/values and of q/out buffers.
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

//! Bytes per element of `dtype`.
KVC_HOST_DEVICE int dtype_size(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

//! Lower-case name (`fp32`, `fp16`, `bf16`), as used in configs and tables.
inline char const* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "fp32";
    case DType::kF16: return "fp16";
    case DType::kBF16: return "bf16";
  }
  return "?";
}

//! Parses `fp32|float32|f32`, `fp16|float16|f16|half`, `bf16|bfloat16`. Returns false otherwise.
inline bool parse_dtype(char const* text, DType& out) {
  struct Alias {
    char const* name;
    DType dtype;
  };
  static constexpr Alias kAliases[] = {
      {"fp32", DType::kF32}, {"float32", DType::kF32},  {"f32", DType::kF32},
      {"fp16", DType::kF16}, {"float16", DType::kF16},  {"f16", DType::kF16},
      {"half", DType::kF16}, {"bf16", DType::kBF16},    {"bfloat16", DType::kBF16}};
  for (Alias const& alias : kAliases) {
    if (std::strcmp(alias.name, text) == 0) {
      out = alias.dtype;
      return true;
    }
  }
  return false;
}

namespace detail {
inline std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}
inline float bits_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
}  // namespace detail

//! float -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN.
inline std::uint16_t float_to_bf16_bits(float value) {
  std::uint32_t bits = detail::float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(bits >> 16);
}

inline float bf16_bits_to_float(std::uint16_t bits) {
  return detail::bits_float(static_cast<std::uint32_t>(bits) << 16);
}

//! float -> IEEE binary16 bits, round to nearest even, overflow to infinity, subnormals kept.
inline std::uint16_t float_to_half_bits(float value) {
  std::uint32_t x = detail::float_bits(value);
  std::uint32_t const sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return static_cast<std::uint16_t>(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (x < 0x38800000u) {                                                    // half subnormal
    if (x < 0x33000000u) return static_cast<std::uint16_t>(sign);           // <= 2^-25: zero
    std::uint32_t const exponent = x >> 23;
    std::uint32_t const mantissa = (x & 0x7fffffu) | 0x800000u;
    std::uint32_t const shift = 126u - exponent;
    std::uint32_t rounded = mantissa >> shift;
    std::uint32_t const rest = mantissa & ((1u << shift) - 1u);
    std::uint32_t const halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (rounded & 1u))) ++rounded;
    return static_cast<std::uint16_t>(sign | rounded);
  }
  std::uint32_t rounded = (x >> 13) - (112u << 10);
  std::uint32_t const rest = x & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (rounded & 1u))) ++rounded;
  return static_cast<std::uint16_t>(sign | rounded);
}

inline float half_bits_to_float(std::uint16_t bits) {
  std::uint32_t const sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  std::uint32_t const exponent = (bits >> 10) & 0x1fu;
  std::uint32_t const mantissa = bits & 0x3ffu;
  if (exponent == 0) {
    float const magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // m * 2^-24
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return detail::bits_float(sign | 0x7f800000u | (mantissa << 13));
  return detail::bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

//! Rounds `value` to the nearest value representable in `dtype` (identity for fp32).
inline float round_to_dtype(float value, DType dtype) {
  switch (dtype) {
    case DType::kF16: return half_bits_to_float(float_to_half_bits(value));
    case DType::kBF16: return bf16_bits_to_float(float_to_bf16_bits(value));
    case DType::kF32: break;
  }
  return value;
}

//! Per-dtype comparison tolerances: |x - ref| <= atol + rtol * |ref|.
struct Tolerance {
  double atol;
  double rtol;
};

//! Tolerances for results computed from inputs stored in `dtype` (one rounding of the output
//! plus accumulated float error).
inline Tolerance default_tolerance(DType dtype) {
  switch (dtype) {
    case DType::kF16: return {2e-3, 4e-3};
    case DType::kBF16: return {1.6e-2, 1.6e-2};
    case DType::kF32: break;
  }
  return {2e-5, 2e-5};
}

}  // namespace kvc
