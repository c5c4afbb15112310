// 8-bit floating-point codes for block-wise quantized optimizer state. A value is stored as
// a code relative to its block's absolute maximum, so codes only need the range [-1, 1]:
// the top binade [1, 2) has the largest exponent, there is no infinity or NaN, and every code
// is a finite value (saturating). Signed E4M3 (for first moments) spans 2^-17 to 1.875 with 3
// fraction bits; unsigned E5M3 (for second moments, which are never negative) spans 2^-33 to
// 1.875: ten decades, as squared gradients need.
#pragma once

#include <alloy/numeric/detail/bits.hpp>

#include <cstdint>

namespace alloy {

template <int ExponentBits, int MantissaBits, bool Signed>
struct Minifloat8 {
  static_assert(ExponentBits + MantissaBits + (Signed ? 1 : 0) == 8, "Minifloat8: the fields must fill 8 bits");
  static constexpr int bias = (1 << ExponentBits) - 1;
  static constexpr std::uint32_t magnitude_mask = (1u << (ExponentBits + MantissaBits)) - 1u;
  static constexpr bool is_signed = Signed;

  // Nearest code to x, ties to the even code; |x| past the largest value saturates; NaN and,
  // when unsigned, negative x give 0.
  ALLOY_HOST_DEVICE static constexpr std::uint8_t encode(float x) noexcept {
    const std::uint32_t u = detail::float_bits(x);
    const std::uint32_t sign = Signed ? (u >> 31) : 0u;
    const std::uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u || (!Signed && (u >> 31))) return 0;
    const int e = static_cast<int>(a >> 23);  // biased float exponent, 0 for float subnormals
    const std::uint32_t mantissa = (a & 0x7fffffu) | (e ? 0x800000u : 0u);
    const int unbiased = (e ? e : 1) - 127;
    std::uint32_t r;
    int shift;  // bits of `mantissa` dropped
    if (unbiased >= 1 - bias) {
      shift = 23 - MantissaBits;
      r = (static_cast<std::uint32_t>(unbiased + bias) << MantissaBits) | ((mantissa & 0x7fffffu) >> shift);
    } else {
      shift = 23 - MantissaBits + (1 - bias - unbiased);
      r = shift > 31 ? 0u : mantissa >> shift;
    }
    if (shift <= 31) {
      const std::uint32_t remainder = mantissa & ((1u << shift) - 1u);
      const std::uint32_t half = 1u << (shift - 1);
      if (remainder > half || (remainder == half && (r & 1u))) ++r;
    }
    if (r > magnitude_mask) r = magnitude_mask;
    return static_cast<std::uint8_t>((sign << (ExponentBits + MantissaBits)) | r);
  }

  ALLOY_HOST_DEVICE static constexpr float decode(std::uint8_t code) noexcept {
    const std::uint32_t magnitude = code & magnitude_mask;
    const std::uint32_t e = magnitude >> MantissaBits;
    const std::uint32_t m = magnitude & ((1u << MantissaBits) - 1u);
    float value;
    if (e == 0) {
      value = static_cast<float>(m) *
              detail::float_from_bits(static_cast<std::uint32_t>(127 + 1 - bias - MantissaBits) << 23);
    } else {
      value = detail::float_from_bits(((e - bias + 127u) << 23) | (m << (23 - MantissaBits)));
    }
    return (Signed && (code >> 7)) ? -value : value;
  }

  ALLOY_HOST_DEVICE static constexpr float max() noexcept { return decode(static_cast<std::uint8_t>(magnitude_mask)); }
};

using SignedE4M3 = Minifloat8<4, 3, true>;
using UnsignedE5M3 = Minifloat8<5, 3, false>;

}  // namespace alloy
