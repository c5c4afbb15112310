#include "../support/test_support.hpp"

#include <alloy/numeric/minifloat8.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace {

template <class Codec>
class Minifloat8Test : public ::testing::Test {
 protected:
  // Independent reference: the nearest code by searching all 256 decoded values (ties to the
  // even code, saturating at the largest magnitude).
  static std::uint8_t nearest(float x) {
    if (std::isnan(x) || (!Codec::is_signed && x < 0)) return 0;
    int best = -1;
    double best_distance = 0;
    for (int c = 0; c < 256; ++c) {
      const auto code = static_cast<std::uint8_t>(c);
      if (Codec::is_signed && c == 0x80) continue;  // negative zero: never produced
      const double d = std::fabs(static_cast<double>(Codec::decode(code)) - x);
      if (best < 0 || d < best_distance || (d == best_distance && (code & 1) == 0 && (best & 1) == 1)) {
        best = c;
        best_distance = d;
      }
    }
    return static_cast<std::uint8_t>(best);
  }
};
using Codecs = ::testing::Types<alloy::SignedE4M3, alloy::UnsignedE5M3>;
TYPED_TEST_SUITE(Minifloat8Test, Codecs);

TYPED_TEST(Minifloat8Test, EveryCodeRoundTrips) {
  using C = TypeParam;
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<std::uint8_t>(c);
    if (C::is_signed && c == 0x80) {
      EXPECT_EQ(C::encode(C::decode(code)), 0x80);  // -0 keeps its sign bit
      continue;
    }
    ASSERT_EQ(C::encode(C::decode(code)), code) << c;
  }
}

TYPED_TEST(Minifloat8Test, DecodedValuesIncreaseWithTheCode) {
  using C = TypeParam;
  for (int c = 1; c < (C::is_signed ? 128 : 256); ++c) {
    ASSERT_LT(C::decode(static_cast<std::uint8_t>(c - 1)), C::decode(static_cast<std::uint8_t>(c))) << c;
  }
  EXPECT_EQ(C::max(), 1.875f);
}

TYPED_TEST(Minifloat8Test, EncodesToTheNearestCode) {
  using C = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> exponent(-40, 2);
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  for (int i = 0; i < 100000; ++i) {
    float x = std::ldexp(mantissa(rng), exponent(rng));
    if (C::is_signed && (rng() & 1)) x = -x;
    const std::uint8_t got = C::encode(x);
    const std::uint8_t want = TestFixture::nearest(x);
    // Ties may pick either neighbour in the reference's search order; compare distances.
    ASSERT_EQ(std::fabs(double(C::decode(got)) - x), std::fabs(double(C::decode(want)) - x))
        << std::hexfloat << x << " got " << int(got) << " want " << int(want);
  }
}

TYPED_TEST(Minifloat8Test, MidpointsRoundToEvenCodes) {
  using C = TypeParam;
  for (int c = 1; c < (C::is_signed ? 127 : 255); ++c) {
    const double lo = C::decode(static_cast<std::uint8_t>(c)), hi = C::decode(static_cast<std::uint8_t>(c + 1));
    const float mid = static_cast<float>((lo + hi) / 2);
    ASSERT_EQ(C::encode(mid) & 1, 0) << "between codes " << c << " and " << c + 1;
    ASSERT_EQ(C::encode(std::nextafter(mid, 0.0f)), c);
    ASSERT_EQ(C::encode(std::nextafter(mid, 4.0f)), c + 1);
  }
}

TYPED_TEST(Minifloat8Test, SaturatesAndRejectsNaN) {
  using C = TypeParam;
  EXPECT_EQ(C::decode(C::encode(100.0f)), C::max());
  EXPECT_EQ(C::decode(C::encode(std::numeric_limits<float>::infinity())), C::max());
  EXPECT_EQ(C::encode(std::nanf("")), 0);
  EXPECT_EQ(C::encode(0.0f), 0);
  EXPECT_EQ(C::encode(std::numeric_limits<float>::denorm_min()), 0);
}

// The codec as first written (field by field, with a variable shift), kept as a reference: the
// integer-rounding codec must give the same code for every float and the same value for every
// code.
template <class C>
std::uint8_t field_by_field_encode(float x) {
  constexpr int M = C::is_signed ? 3 : 3, E = C::is_signed ? 4 : 5, bias = C::bias;
  const std::uint32_t u = alloy::detail::float_bits(x);
  const std::uint32_t sign = C::is_signed ? (u >> 31) : 0u;
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u || (!C::is_signed && (u >> 31))) return 0;
  const int e = static_cast<int>(a >> 23);
  const std::uint32_t mantissa = (a & 0x7fffffu) | (e ? 0x800000u : 0u);
  const int unbiased = (e ? e : 1) - 127;
  std::uint32_t r;
  int shift;
  if (unbiased >= 1 - bias) {
    shift = 23 - M;
    r = (static_cast<std::uint32_t>(unbiased + bias) << M) | ((mantissa & 0x7fffffu) >> shift);
  } else {
    shift = 23 - M + (1 - bias - unbiased);
    r = shift > 31 ? 0u : mantissa >> shift;
  }
  if (shift <= 31) {
    const std::uint32_t remainder = mantissa & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1);
    if (remainder > half || (remainder == half && (r & 1u))) ++r;
  }
  if (r > C::magnitude_mask) r = C::magnitude_mask;
  return static_cast<std::uint8_t>((sign << (E + M)) | r);
}

template <class C>
float field_by_field_decode(std::uint8_t code) {
  constexpr int M = 3, bias = C::bias;
  const std::uint32_t magnitude = code & C::magnitude_mask;
  const std::uint32_t e = magnitude >> M;
  const std::uint32_t m = magnitude & ((1u << M) - 1u);
  float value;
  if (e == 0) {
    value =
        static_cast<float>(m) * alloy::detail::float_from_bits(static_cast<std::uint32_t>(127 + 1 - bias - M) << 23);
  } else {
    value = alloy::detail::float_from_bits(((e - bias + 127u) << 23) | (m << (23 - M)));
  }
  return (C::is_signed && (code >> 7)) ? -value : value;
}

// Every 251st bit pattern (a prime stride, so every mantissa and exponent field is visited),
// plus every pattern within 64 of each code's value and each midpoint.
TYPED_TEST(Minifloat8Test, MatchesTheFieldByFieldCodecBitForBit) {
  using C = TypeParam;
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<std::uint8_t>(c);
    ASSERT_EQ(alloy::detail::float_bits(C::decode(code)), alloy::detail::float_bits(field_by_field_decode<C>(code)))
        << c;
  }
  auto check = [](std::uint32_t u) {
    const float x = alloy::detail::float_from_bits(u);
    ASSERT_EQ(C::encode(x), field_by_field_encode<C>(x)) << std::hexfloat << x;
  };
  for (std::uint64_t u = 0; u < (1ull << 32); u += 251) check(static_cast<std::uint32_t>(u));
  for (int c = 0; c < 255; ++c) {
    const float lo = C::decode(static_cast<std::uint8_t>(c)), hi = C::decode(static_cast<std::uint8_t>(c + 1));
    for (float v : {lo, static_cast<float>((double(lo) + hi) / 2)}) {
      for (float s : {v, -v}) {
        const std::uint32_t b = alloy::detail::float_bits(s);
        for (std::uint32_t d = 0; d < 64; ++d) {
          check(b + d);
          check(b - d);
        }
      }
    }
  }
}

TEST(Minifloat8, SignedIsSymmetricUnsignedDropsNegatives) {
  for (int c = 0; c < 128; ++c) {
    EXPECT_EQ(alloy::SignedE4M3::decode(static_cast<std::uint8_t>(c | 0x80)),
              -alloy::SignedE4M3::decode(static_cast<std::uint8_t>(c)));
  }
  EXPECT_EQ(alloy::UnsignedE5M3::encode(-0.5f), 0);
  // Dynamic range: the smallest non-zero magnitudes.
  EXPECT_EQ(alloy::SignedE4M3::decode(1), std::ldexp(1.0f, -17));
  EXPECT_EQ(alloy::UnsignedE5M3::decode(1), std::ldexp(1.0f, -33));
}

}  // namespace
