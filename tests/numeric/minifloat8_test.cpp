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
