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
  // when unsigned, negative x give 0. Written for the q8 optimizer kernel's instruction budget
  // (a handful of integer operations per value): a normal code is the float's exponent and top
  // mantissa bits rounded as an integer (carries move into the exponent, as rounding should), a
  // subnormal code is |x| / (smallest code) rounded by one float addition.
  ALLOY_HOST_DEVICE static constexpr std::uint8_t encode(float x) noexcept {
    constexpr int drop = 23 - MantissaBits;                                      // float mantissa bits dropped
    constexpr std::uint32_t min_normal = std::uint32_t(128 - bias) << 23;        // 2^(1 - bias), as float bits
    constexpr std::uint32_t rebias = std::uint32_t(127 - bias) << MantissaBits;  // float exponent -> code's
    const std::uint32_t u = detail::float_bits(x);
    const std::uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u || (!Signed && (u >> 31))) return 0;
    std::uint32_t r;
    if (a >= min_normal) {
      r = ((a + ((1u << (drop - 1)) - 1u) + ((a >> drop) & 1u)) >> drop) - rebias;
    } else {
      // |x| * 2^(bias + M - 1) is below 9 and exact; adding 2^23 rounds it to an integer, to even.
      constexpr float to_units = float(1ull << (bias + MantissaBits - 1));
      r = detail::float_bits(detail::float_from_bits(a) * to_units + 8388608.0f) - 0x4b000000u;
    }
    if (r > magnitude_mask) r = magnitude_mask;
    const std::uint32_t sign = Signed ? (u >> 31) : 0u;
    return static_cast<std::uint8_t>((sign << (ExponentBits + MantissaBits)) | r);
  }

  // A normal code is the float with the code's exponent and mantissa fields, rebiased; a
  // subnormal one is its mantissa times the smallest code (no float subnormal is involved, so
  // flush-to-zero modes do not change it).
  ALLOY_HOST_DEVICE static constexpr float decode(std::uint8_t code) noexcept {
    const std::uint32_t magnitude = code & magnitude_mask;
    const std::uint32_t m = magnitude & ((1u << MantissaBits) - 1u);
    const float value =
        (magnitude >> MantissaBits) != 0
            ? detail::float_from_bits((magnitude << (23 - MantissaBits)) + (std::uint32_t(127 - bias) << 23))
            : static_cast<float>(m) *
                  detail::float_from_bits(static_cast<std::uint32_t>(127 + 1 - bias - MantissaBits) << 23);
    return (Signed && (code >> 7)) ? -value : value;
  }

  ALLOY_HOST_DEVICE static constexpr float max() noexcept { return decode(static_cast<std::uint8_t>(magnitude_mask)); }
};

using SignedE4M3 = Minifloat8<4, 3, true>;
using UnsignedE5M3 = Minifloat8<5, 3, false>;

}  // namespace alloy
