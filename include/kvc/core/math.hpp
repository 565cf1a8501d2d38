//! @file
//! Scalar maths shared by host and device with identical rounding: products that the compiler
//! may not fuse into FMAs (so the CPU reference and kernels agree bit for bit), and sigmoid.
#pragma once

#include <cmath>

#include "kvc/core/macros.hpp"

namespace kvc {

//! a * b rounded once, never contracted into an FMA with a later add.
KVC_HOST_DEVICE float mul_rn(float a, float b) {
#if KVC_IS_DEVICE_CODE
  return __fmul_rn(a, b);
#else
  volatile float product = a * b;  // volatile blocks -ffp-contract on the host
  return product;
#endif
}

//! a + b rounded once, never contracted into an FMA.
KVC_HOST_DEVICE float add_rn(float a, float b) {
#if KVC_IS_DEVICE_CODE
  return __fadd_rn(a, b);
#else
  volatile float sum = a + b;
  return sum;
#endif
}

//! a - b rounded once, never contracted into an FMA.
KVC_HOST_DEVICE float sub_rn(float a, float b) {
#if KVC_IS_DEVICE_CODE
  return __fsub_rn(a, b);
#else
  volatile float difference = a - b;
  return difference;
#endif
}

//! a / b, IEEE round to nearest (host and device).
KVC_HOST_DEVICE float div_rn(float a, float b) {
#if KVC_IS_DEVICE_CODE
  return __fdiv_rn(a, b);
#else
  volatile float quotient = a / b;
  return quotient;
#endif
}

//! Logistic sigmoid evaluated in double and rounded to float, so host and device agree.
KVC_HOST_DEVICE float sigmoid(float x) {
  return static_cast<float>(1.0 / (1.0 + exp(-static_cast<double>(x))));
}

}  // namespace kvc
