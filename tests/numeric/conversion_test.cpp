#include "../support/edge_floats.hpp"
#include "../support/test_support.hpp"

#include <alloy/numeric/numeric.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace {

using alloy::bf16;
using alloy::fp16;

// The conversions are usable in constant expressions.
static_assert(alloy::detail::float_to_bf16_bits(1.0f) == 0x3f80);
static_assert(alloy::detail::float_to_fp16_bits(1.0f) == 0x3c00);
static_assert(alloy::detail::fp16_bits_to_float(0x3c00) == 1.0f);
static_assert(fp16::from_bits(0x1234).bits() == 0x1234);

template <class T>
const alloy::test::RoundingReference& reference() {
  static const alloy::test::RoundingReference ref(std::is_same_v<T, fp16> ? alloy::test::binary16
                                                                          : alloy::test::bfloat16);
  return ref;
}

template <class T>
class Conversion : public ::testing::Test {};
using SixteenBitTypes = ::testing::Types<fp16, bf16>;
TYPED_TEST_SUITE(Conversion, SixteenBitTypes);

TYPED_TEST(Conversion, EveryBitPatternRoundTripsThroughFloat) {
  using T = TypeParam;
  const auto& ref = reference<T>();
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const T h = T::from_bits(static_cast<std::uint16_t>(b));
    const float f = static_cast<float>(h);
    const double expected = ref.format().decode(static_cast<std::uint16_t>(b));
    if (std::isnan(expected)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << b;
      ASSERT_EQ(T(f).bits(), 0x7fff) << "NaN rounds to the canonical NaN, pattern " << std::hex << b;
    } else {
      ASSERT_EQ(static_cast<double>(f), expected) << std::hex << b;
      ASSERT_EQ(std::signbit(f), (b & 0x8000u) != 0) << std::hex << b;
      ASSERT_EQ(T(f).bits(), b) << "round trip of pattern " << std::hex << b;
    }
  }
}

TYPED_TEST(Conversion, RoundsEveryEdgeClassToNearestEven) {
  using T = TypeParam;
  const auto& ref = reference<T>();
  for (float x : alloy::test::edge_floats(ref)) {
    ASSERT_EQ(T(x).bits(), ref.nearest_even(x)) << "x = " << std::hexfloat << x;
  }
}

TYPED_TEST(Conversion, RoundsRandomFloatsToNearestEven) {
  using T = TypeParam;
  const auto& ref = reference<T>();
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < (1 << 20); ++i) {
    const auto u = static_cast<std::uint32_t>(rng());
    const float x = alloy::detail::float_from_bits(u);
    ASSERT_EQ(T(x).bits(), ref.nearest_even(x)) << "x = " << std::hexfloat << x;
  }
}

TYPED_TEST(Conversion, OverflowGoesToInfinityAndNaNToCanonicalNaN) {
  using T = TypeParam;
  const float big = static_cast<float>(alloy::numeric_traits<T>::max()) * 2.0f;
  EXPECT_TRUE(std::isinf(static_cast<float>(T(big))));
  EXPECT_TRUE(std::isinf(static_cast<float>(T(-big))));
  EXPECT_LT(static_cast<float>(T(-big)), 0.0f);
  EXPECT_EQ(T(std::numeric_limits<float>::quiet_NaN()).bits(), 0x7fff);
  EXPECT_EQ(T(-std::numeric_limits<float>::signaling_NaN()).bits(), 0x7fff);
}

TEST(Conversion, Fp16SubnormalsAreExact) {
  for (std::uint16_t m = 1; m < 0x400; ++m) {
    const float expected = std::ldexp(static_cast<float>(m), -24);
    ASSERT_EQ(static_cast<float>(fp16::from_bits(m)), expected);
    ASSERT_EQ(fp16(expected).bits(), m);
  }
}

TEST(Conversion, Bf16KeepsFloatSubnormals) {
  const float tiny = std::numeric_limits<float>::denorm_min() * 65536.0f;  // 2^-133: bf16 subnormal
  EXPECT_EQ(bf16(tiny).bits(), 0x0001);
  EXPECT_EQ(static_cast<float>(bf16::from_bits(0x0001)), tiny);
}

}  // namespace
