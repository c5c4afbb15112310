// Bit-level helpers for the numeric types: usable in host and device code, constexpr.
#pragma once

#include <alloy/config.hpp>

#include <cstdint>

namespace alloy::detail {

template <class To, class From>
ALLOY_HOST_DEVICE constexpr To bit_cast(const From& from) noexcept {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  return __builtin_bit_cast(To, from);
}

ALLOY_HOST_DEVICE constexpr std::uint32_t float_bits(float x) noexcept { return bit_cast<std::uint32_t>(x); }

ALLOY_HOST_DEVICE constexpr float float_from_bits(std::uint32_t u) noexcept { return bit_cast<float>(u); }

// The canonical NaN of both 16-bit types: what the CUDA intrinsics and their host
// fallbacks return for every NaN input, so Host and Cuda results match bit for bit.
inline constexpr std::uint16_t canonical_nan_16 = 0x7fff;

// float -> bfloat16 bits, round to nearest, ties to even. Overflow rounds to infinity;
// subnormals round like any other value (bf16 shares float's exponent range).
ALLOY_HOST_DEVICE constexpr std::uint16_t float_to_bf16_bits(float x) noexcept {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return canonical_nan_16;
  const std::uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + rounding_bias) >> 16);
}

// float -> bfloat16 bits, round toward zero (truncation); NaN becomes the canonical NaN.
ALLOY_HOST_DEVICE constexpr std::uint16_t float_to_bf16_bits_rz(float x) noexcept {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return canonical_nan_16;
  return static_cast<std::uint16_t>(u >> 16);
}

ALLOY_HOST_DEVICE constexpr float bf16_bits_to_float(std::uint16_t h) noexcept {
  return float_from_bits(static_cast<std::uint32_t>(h) << 16);
}

// float -> IEEE binary16 bits. `to_nearest` selects round-to-nearest-even, otherwise
// round toward zero. Overflow goes to infinity (nearest) or the largest finite (toward zero).
ALLOY_HOST_DEVICE constexpr std::uint16_t float_to_fp16_bits_mode(float x, bool to_nearest) noexcept {
  const std::uint32_t bits = float_bits(x);
  const std::uint32_t u = bits & 0x7fffffffu;
  const std::uint32_t sign = (bits >> 16) & 0x8000u;
  if (u >= 0x7f800000u) return u == 0x7f800000u ? static_cast<std::uint16_t>(sign | 0x7c00u) : canonical_nan_16;
  if (u >= 0x477ff000u) {  // |x| >= 65520: the tie above 65504 and everything past it
    return static_cast<std::uint16_t>(sign | (to_nearest ? 0x7c00u : 0x7bffu));
  }
  std::uint32_t result;
  std::uint32_t remainder;  // the dropped bits
  std::uint32_t half;       // the dropped bits' value at the halfway point
  if (u >= 0x38800000u) {   // normal in binary16: |x| >= 2^-14
    result = (u - 0x38000000u) >> 13;
    remainder = u & 0x1fffu;
    half = 0x1000u;
  } else if (u < 0x33000000u) {  // |x| < 2^-25: rounds to zero either way
    return static_cast<std::uint16_t>(sign);
  } else {  // subnormal in binary16: units of 2^-24
    const std::uint32_t exponent = u >> 23;
    const std::uint32_t mantissa = (u & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 0x7eu - exponent;  // 14..24
    result = mantissa >> shift;
    remainder = mantissa & ((1u << shift) - 1u);
    half = 1u << (shift - 1u);
  }
  if (to_nearest && (remainder > half || (remainder == half && (result & 1u)))) ++result;
  return static_cast<std::uint16_t>(sign | result);
}

ALLOY_HOST_DEVICE constexpr std::uint16_t float_to_fp16_bits(float x) noexcept {
  return float_to_fp16_bits_mode(x, true);
}

ALLOY_HOST_DEVICE constexpr std::uint16_t float_to_fp16_bits_rz(float x) noexcept {
  return float_to_fp16_bits_mode(x, false);
}

// binary16 bits -> float, exact for every value; NaN payloads are kept.
ALLOY_HOST_DEVICE constexpr float fp16_bits_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return float_from_bits(sign);
    exponent = 1;
    while ((mantissa & 0x400u) == 0) {  // normalize the subnormal
      mantissa <<= 1;
      --exponent;
    }
    mantissa &= 0x3ffu;
  }
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

}  // namespace alloy::detail
