#include "../support/rounding_reference.hpp"
#include "../support/test_support.hpp"

#include <alloy/numeric/numeric.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace {

using alloy::bf16;
using alloy::fp16;

template <class T>
class StochasticRounding : public ::testing::Test {
 protected:
  const alloy::test::RoundingReference ref{std::is_same_v<T, fp16> ? alloy::test::binary16 : alloy::test::bfloat16};
};
using SixteenBitTypes = ::testing::Types<fp16, bf16>;
TYPED_TEST_SUITE(StochasticRounding, SixteenBitTypes);

// Draws a float with a random sign, exponent in [lo, hi) and mantissa.
float random_float(std::mt19937_64& rng, int lo, int hi) {
  std::uniform_int_distribution<int> exponent(lo, hi - 1);
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  const float x = std::ldexp(mantissa(rng), exponent(rng));
  return (rng() & 1) ? -x : x;
}

TYPED_TEST(StochasticRounding, AlwaysGivesOneOfTheTwoNeighbours) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 200000; ++i) {
    const float x = random_float(rng, -26, 16);
    const auto [lo, hi] = this->ref.bracket(x);
    const double r = static_cast<float>(alloy::round_stochastic<T>(x, static_cast<std::uint32_t>(rng())));
    ASSERT_TRUE(r == lo || r == hi) << std::hexfloat << "x=" << x << " got " << r << " not " << lo << " or " << hi;
  }
}

TYPED_TEST(StochasticRounding, RepresentableValuesAreUnchanged) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  for (std::uint16_t b : this->ref.finite_patterns()) {
    const float x = static_cast<float>(T::from_bits(b));
    ASSERT_EQ(alloy::round_stochastic<T>(x, static_cast<std::uint32_t>(rng())).bits(), b);
    ASSERT_EQ(alloy::round_stochastic<T>(-x, 0xffffffffu).bits(), b | 0x8000u);
  }
}

// The mean of N roundings of x is a mean of Bernoulli draws between the two neighbours, with
// standard deviation at most gap / (2 sqrt(N)). Every x must land within 6 of those: a correct
// rounder fails this with probability under 1e-8 per x.
TYPED_TEST(StochasticRounding, MeanIsUnbiasedWithinSixSigma) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  constexpr int samples = 1 << 16;
  // Normal range, the 16-bit subnormal range (fp16: below 2^-14), and just under the maximum.
  std::vector<float> xs;
  for (int i = 0; i < 48; ++i) xs.push_back(random_float(rng, -12, 15));
  for (int i = 0; i < 8; ++i) xs.push_back(random_float(rng, -23, -15));
  const float top = static_cast<float>(alloy::numeric_traits<T>::max());
  xs.push_back(std::nextafter(top, 0.0f));
  for (float x : xs) {
    const auto [lo, hi] = this->ref.bracket(x);
    double sum = 0;
    for (int s = 0; s < samples; ++s) {
      sum += static_cast<float>(alloy::round_stochastic<T>(x, static_cast<std::uint32_t>(rng())));
    }
    const double mean = sum / samples;
    const double bound = 6.0 * std::fabs(hi - lo) / (2.0 * std::sqrt(static_cast<double>(samples)));
    ASSERT_LE(std::fabs(mean - x), bound) << std::hexfloat << "x=" << x;
  }
}

TYPED_TEST(StochasticRounding, RoundsUpExactlyInProportionToTheRemainder) {
  using T = TypeParam;
  // x a quarter of the way from 1 to the next value: a quarter of all random words round up.
  const double gap = static_cast<float>(alloy::numeric_traits<T>::epsilon());
  const float x = static_cast<float>(1.0 + gap / 4);
  int up = 0;
  constexpr int words = 1 << 16;
  for (int i = 0; i < words; ++i) {
    const std::uint32_t r = static_cast<std::uint32_t>(i) * 65537u;  // covers the low and high bits evenly
    up += static_cast<float>(alloy::round_stochastic<T>(x, r)) > 1.0f;
  }
  EXPECT_EQ(up, words / 4);
}

TYPED_TEST(StochasticRounding, SpecialValues) {
  using T = TypeParam;
  constexpr float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(alloy::round_stochastic<T>(inf, 0xffffffffu).bits(), this->ref.inf_bits());
  EXPECT_EQ(alloy::round_stochastic<T>(-inf, 0).bits(), this->ref.inf_bits() | 0x8000u);
  EXPECT_EQ(alloy::round_stochastic<T>(std::numeric_limits<float>::quiet_NaN(), 12345).bits(), 0x7fff);
  EXPECT_EQ(alloy::round_stochastic<T>(0.0f, 0xffffffffu).bits(), 0x0000);
  EXPECT_EQ(alloy::round_stochastic<T>(-0.0f, 0xffffffffu).bits(), 0x8000);
}

TEST(StochasticRounding, Fp16PastTheMaximumRoundsToInfinity) {
  EXPECT_EQ(alloy::round_stochastic<fp16>(65536.0f, 0).bits(), 0x7c00);
  EXPECT_EQ(alloy::round_stochastic<fp16>(-1e9f, 0).bits(), 0xfc00);
  EXPECT_EQ(alloy::round_stochastic<fp16>(65504.0f, 0xffffffffu).bits(), 0x7bff);
}

TEST(RandomBits, IsAFunctionOfSeedAndIndex) {
  EXPECT_EQ(alloy::random_bits(7, 1000), alloy::random_bits(7, 1000));
  EXPECT_NE(alloy::random_bits(7, 1000), alloy::random_bits(7, 1001));
  EXPECT_NE(alloy::random_bits(7, 1000), alloy::random_bits(8, 1000));
}

TEST(RandomBits, EachBitIsSetHalfTheTime) {
  constexpr int n = 1 << 18;
  int ones[32] = {};
  for (int i = 0; i < n; ++i) {
    const std::uint32_t r = alloy::random_bits(42, i);
    for (int b = 0; b < 32; ++b) ones[b] += (r >> b) & 1;
  }
  // Binomial(n, 1/2): standard deviation sqrt(n)/2 = 256; allow 6 of them.
  for (int b = 0; b < 32; ++b) EXPECT_NEAR(ones[b], n / 2, 6 * 256) << "bit " << b;
}

}  // namespace
