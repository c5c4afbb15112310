#include "../support/test_support.hpp"
#include "../support/values.hpp"

#include <alloy/backend/backend.hpp>
#include <alloy/numeric/numeric.hpp>

#include <gtest/gtest.h>

#include <cmath>

namespace {

using alloy::Host;
using alloy::test::random_floats;

TEST(HostForEach, VisitsEveryIndexOnce) {
  std::vector<int> hits(1237, 0);
  alloy::for_each_n(Host{}, hits.size(), [&](std::size_t i) { ++hits[i]; });
  for (int h : hits) ASSERT_EQ(h, 1);
}

TEST(HostForEach, ReadsInputsAndWritesOutputs) {
  ALLOY_SEEDED(seed);
  const auto a = random_floats(1003, seed);
  std::vector<float> b(a.size(), -1.0f);
  std::vector<alloy::bf16> c(a.size());
  alloy::for_each_n(
      Host{}, a.size(),
      [](const float& x, float& y, alloy::bf16& z) {
        y += 2 * x;
        z = alloy::bf16(x);
      },
      alloy::in(a.data()), alloy::inout(b.data()), alloy::out(c.data()));
  for (std::size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(b[i], -1.0f + 2 * a[i]);
    ASSERT_EQ(c[i].bits(), alloy::detail::float_to_bf16_bits(a[i]));
  }
}

TEST(HostReduce, SumMatchesFloat64Reference) {
  ALLOY_SEEDED(seed);
  for (std::size_t n : {0u, 1u, 4095u, 4097u, 1000003u}) {
    const auto a = random_floats(n, seed + n);
    double exact = 0, magnitude = 0;
    for (float x : a) exact += x, magnitude += std::fabs(x);
    const float s = alloy::reduce_sum(Host{}, a.data(), a.size());
    EXPECT_NEAR(s, exact, 1e-6 * magnitude + 1e-30) << "n=" << n;
  }
}

TEST(HostReduce, MaxIsExactAndPropagatesNaN) {
  ALLOY_SEEDED(seed);
  auto a = random_floats(5001, seed);
  const float expected = *std::max_element(a.begin(), a.end());
  EXPECT_EQ(alloy::reduce_max(Host{}, a.data(), a.size()), expected);
  a[1234] = std::nanf("");
  EXPECT_TRUE(std::isnan(alloy::reduce_max(Host{}, a.data(), a.size())));
  EXPECT_EQ(alloy::reduce_max(Host{}, a.data(), 0), -std::numeric_limits<float>::infinity());
}

TEST(HostReduce, TransformReduceOverTwoArrays) {
  ALLOY_SEEDED(seed);
  const auto a = random_floats(777, seed);
  const auto b = random_floats(777, seed + 1);
  double exact = 0;
  for (std::size_t i = 0; i < a.size(); ++i) exact += double(a[i]) * b[i];
  const float dot = alloy::transform_reduce(
      Host{}, a.size(), 0.0f, alloy::Sum{}, [](float x, float y) { return x * y; }, alloy::in(a.data()),
      alloy::in(b.data()));
  EXPECT_NEAR(dot, exact, 1e-4 * std::sqrt(777.0) * 9);
}

TEST(HostReduce, TwoPhaseFormWritesTheSameValueIntoResult) {
  ALLOY_SEEDED(seed);
  const auto a = random_floats(10007, seed);
  EXPECT_EQ(alloy::reduce_workspace_bytes<float>(Host{}), 0u);
  float result = -1.0f;
  alloy::transform_reduce_async(Host{}, nullptr, 0, &result, a.size(), 0.0f, alloy::Sum{}, alloy::ToAccumulator{},
                                alloy::in(a.data()));
  EXPECT_EQ(result, alloy::reduce_sum(Host{}, a.data(), a.size()));
}

TEST(HostReduce, SixteenBitInputsAccumulateInFloat) {
  std::vector<alloy::bf16> v(3000, alloy::bf16(1.0f));  // 3000 is not representable in bf16
  EXPECT_EQ(alloy::reduce_sum(Host{}, v.data(), v.size()), 3000.0f);
}

}  // namespace
