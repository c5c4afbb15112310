// Rounding from float to a storage dtype: to nearest even (the constructors) or stochastic.
#pragma once

#include <alloy/numeric/traits.hpp>

#include <type_traits>

namespace alloy {

// float -> T, round to nearest even (identity for float).
template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE T round_nearest(float x) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return T(x);
  }
}

// T -> float, exact for every alloy dtype.
template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float to_float(T x) noexcept {
  return static_cast<float>(x);
}

// float -> T by the given rounding; `random_bits` is used only by stochastic rounding.
template <class T>
ALLOY_HOST_DEVICE T round_to(float x, bool stochastic, std::uint32_t random_bits) noexcept;

// Stochastic rounding: returns one of the two values of T that bracket x, the upper one (in
// magnitude) with probability equal to x's distance from the lower one over their gap, so
// E[round_stochastic(x)] == x for every x inside T's range. random_bits must be uniform.
// NaN gives the canonical NaN, infinities stay infinite, |x| past T's max may round to infinity.
template <class T>
ALLOY_HOST_DEVICE T round_stochastic(float x, std::uint32_t random_bits) noexcept;

template <>
ALLOY_HOST_DEVICE inline float round_stochastic<float>(float x, std::uint32_t) noexcept {
  return x;
}

// bf16 values are exactly the floats whose low 16 bits are zero, and float bit patterns order
// by magnitude, so adding 16 uniform bits below the cut and truncating rounds up with
// probability (dropped bits) / 2^16: exactly unbiased, subnormals included.
template <>
ALLOY_HOST_DEVICE inline bf16 round_stochastic<bf16>(float x, std::uint32_t random_bits) noexcept {
  const std::uint32_t u = detail::float_bits(x);
  if ((u & 0x7fffffffu) >= 0x7f800000u) return bf16::from_bits(detail::float_to_bf16_bits_rz(x));
  return bf16::from_bits(static_cast<std::uint16_t>((u + (random_bits & 0xffffu)) >> 16));
}

// binary16's exponent range differs from float's, so: truncate toward zero, measure the
// fraction of the gap to the next value (exact: both are floats within one binary16 step),
// and compare it with 24 uniform bits. Unbiased wherever x has at most 24 bits below the
// binary16 step, which covers every float in binary16's normal range.
template <>
ALLOY_HOST_DEVICE inline fp16 round_stochastic<fp16>(float x, std::uint32_t random_bits) noexcept {
  const std::uint32_t u = detail::float_bits(x);
  if ((u & 0x7fffffffu) >= 0x7f800000u) return fp16::from_bits(detail::float_to_fp16_bits_rz(x));
  const std::uint16_t lower = detail::float_to_fp16_bits_rz(x);
  const std::uint16_t magnitude = lower & 0x7fffu;
  const float lower_abs = detail::fp16_bits_to_float(magnitude);
  // The value above the largest finite one is 2^16: rounding up to it means infinity.
  const float upper_abs = magnitude == 0x7bffu ? 65536.0f : detail::fp16_bits_to_float(magnitude + 1);
  const float x_abs = detail::float_from_bits(u & 0x7fffffffu);
  const float fraction = (x_abs - lower_abs) / (upper_abs - lower_abs);   // in [0, 1], exact
  const float uniform = static_cast<float>(random_bits >> 8) * 0x1p-24f;  // in [0, 1)
  return fp16::from_bits(static_cast<std::uint16_t>(lower + (uniform < fraction ? 1 : 0)));
}

template <class T>
ALLOY_HOST_DEVICE inline T round_to(float x, bool stochastic, std::uint32_t random_bits) noexcept {
  return stochastic ? round_stochastic<T>(x, random_bits) : round_nearest<T>(x);
}

namespace detail {

// float -> the nearest tf32 value (10 fraction bits), ties to even, held in a float. Infinities
// and NaN pass through; values past tf32's largest round to infinity. The tf32 GEMMs' Host
// reference and both sides of tf32 attention (the Host and the tensor-core kernels) round with it.
ALLOY_HOST_DEVICE constexpr float round_to_tf32(float x) noexcept {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) >= 0x7f800000u) return x;
  const std::uint32_t rounding_bias = 0xfffu + ((u >> 13) & 1u);
  return float_from_bits((u + rounding_bias) & ~0x1fffu);
}

}  // namespace detail

}  // namespace alloy
