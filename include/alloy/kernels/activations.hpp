// GELU in its tanh approximation (PyTorch's approximate='tanh', GPT-2's, and what cuBLASLt's
// GELU epilogues compute):
//   gelu_tanh(x) = x/2 * (1 + tanh(u)),   u = sqrt(2/pi) * (x + 0.044715 x^3)
// Written once for Host and Cuda. Every operation but tanh goes through alloy::fp, so it rounds
// the same on both; tanh comes from each side's math library (CUDA's tanhf and the host's
// std::tanh are each within 2 ulp of tanh), so the backends differ only through t = tanh(u), by
// at most 2^-22, and through the roundings that follow it. Together:
//   gelu_tanh:           |Host - Cuda| <= 2^-21 * |x|
//   gelu_tanh_backward:  |Host - Cuda| <= 2^-21 * (1 + |x| * (1 + 0.14 x^2)) * |dy|
#pragma once

#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/math.hpp>

namespace alloy {

namespace detail {

inline constexpr float gelu_sqrt_2_over_pi = 0.7978845608028654f;
inline constexpr float gelu_cubic = 0.044715f;
inline constexpr float gelu_cubic_slope = 3.0f * gelu_cubic;  // du/dx = sqrt(2/pi) * (1 + this * x^2)

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float gelu_tanh_argument(float x) {
  const float cube = fp::mul(fp::mul(x, x), x);
  return fp::mul(gelu_sqrt_2_over_pi, fp::add(x, fp::mul(gelu_cubic, cube)));
}

}  // namespace detail

// GELU, tanh approximation. Large negative x gives -0 (x^3 may overflow: tanh(-inf) = -1);
// -infinity gives NaN, as PyTorch does.
ALLOY_HOST_DEVICE inline float gelu_tanh(float x) {
  const float t = detail::tanh_of(detail::gelu_tanh_argument(x));
  return fp::mul(fp::mul(0.5f, x), fp::add(1.0f, t));
}

// The gradient with respect to GELU's input x (the pre-activation), given dy, the gradient with
// respect to its output:  dy * ((1 + t)/2 + x/2 * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2)).
ALLOY_HOST_DEVICE inline float gelu_tanh_backward(float x, float dy) {
  const float t = detail::tanh_of(detail::gelu_tanh_argument(x));
  // (1 - t)(1 + t) keeps the bits that 1 - t*t would lose as |t| nears 1.
  const float sech_squared = fp::mul(fp::sub(1.0f, t), fp::add(1.0f, t));
  const float through_tanh = fp::mul(0.5f, fp::add(1.0f, t));
  // Once tanh saturates the second term is exactly 0; skipping it keeps x^2 = inf from making NaN.
  float through_argument = 0.0f;
  if (sech_squared != 0.0f) {
    const float du_dx =
        fp::mul(detail::gelu_sqrt_2_over_pi, fp::add(1.0f, fp::mul(detail::gelu_cubic_slope, fp::mul(x, x))));
    through_argument = fp::mul(fp::mul(fp::mul(0.5f, x), sech_squared), du_dx);
  }
  return fp::mul(dy, fp::add(through_tanh, through_argument));
}

}  // namespace alloy
