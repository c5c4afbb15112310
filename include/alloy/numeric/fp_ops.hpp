// Float arithmetic that rounds the same on host and device: each operation is rounded on its
// own (no fused multiply-add contraction), so update rules written with these give the same
// bits on the Host and Cuda backends. Host code must be compiled without FP contraction
// (GCC's default in ISO mode, -std=c++20) and without fast-math.
#pragma once

#include <alloy/config.hpp>

#include <cmath>

namespace alloy::fp {

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float mul(float a, float b) {
#if ALLOY_DEVICE_CODE
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float add(float a, float b) {
#if ALLOY_DEVICE_CODE
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float sub(float a, float b) {
#if ALLOY_DEVICE_CODE
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float div(float a, float b) {
#if ALLOY_DEVICE_CODE
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float sqrt(float a) {
#if ALLOY_DEVICE_CODE
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// a * b + c with two roundings.
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float mul_add(float a, float b, float c) { return add(mul(a, b), c); }

}  // namespace alloy::fp
