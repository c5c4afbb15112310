#include <alloy/numeric/numeric.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace {

template <class T>
float f(T x) {
  return static_cast<float>(x);
}

TEST(NumericTraits, Fp16Limits) {
  using tr = alloy::numeric_traits<alloy::fp16>;
  EXPECT_EQ(tr::bytes, 2u);
  EXPECT_EQ(f(tr::max()), 65504.0f);
  EXPECT_EQ(f(tr::lowest_normal()), std::ldexp(1.0f, -14));
  EXPECT_EQ(f(tr::epsilon()), std::ldexp(1.0f, -10));
  EXPECT_TRUE(tr::has_inf);
  // epsilon is the step after 1.
  EXPECT_EQ(alloy::fp16(1.0f + f(tr::epsilon())).bits(), alloy::fp16(1.0f).bits() + 1);
}

TEST(NumericTraits, Bf16Limits) {
  using tr = alloy::numeric_traits<alloy::bf16>;
  EXPECT_EQ(tr::bytes, 2u);
  EXPECT_EQ(f(tr::max()), 0x1.fep127f);
  EXPECT_EQ(f(tr::lowest_normal()), std::numeric_limits<float>::min());
  EXPECT_EQ(f(tr::epsilon()), std::ldexp(1.0f, -7));
  EXPECT_EQ(alloy::bf16(1.0f + f(tr::epsilon())).bits(), alloy::bf16(1.0f).bits() + 1);
  // One step past max is infinity.
  EXPECT_TRUE(std::isinf(f(alloy::bf16::from_bits(tr::max().bits() + 1))));
}

TEST(NumericTraits, FloatAndTf32) {
  using fp32 = alloy::numeric_traits<alloy::fp32>;
  using tf32 = alloy::numeric_traits<alloy::tf32>;
  EXPECT_EQ(fp32::max(), std::numeric_limits<float>::max());
  EXPECT_EQ(fp32::lowest_normal(), std::numeric_limits<float>::min());
  EXPECT_EQ(fp32::epsilon(), std::numeric_limits<float>::epsilon());
  EXPECT_EQ(tf32::bytes, 4u);
  EXPECT_EQ(tf32::epsilon(), std::ldexp(1.0f, -10));
  static_assert(std::is_same_v<alloy::storage_t<alloy::tf32>, float>);
  static_assert(std::is_same_v<alloy::storage_t<alloy::bf16>, alloy::bf16>);
  static_assert(alloy::floating_dtype<alloy::tf32> && alloy::floating_dtype<alloy::fp16>);
  static_assert(!alloy::floating_dtype<int>);
}

TEST(NumericTypes, AreTwoByteTriviallyCopyable) {
  static_assert(std::is_trivially_copyable_v<alloy::fp16> && std::is_trivially_copyable_v<alloy::bf16>);
  static_assert(std::is_standard_layout_v<alloy::fp16> && std::is_standard_layout_v<alloy::bf16>);
  alloy::bf16 pair[2] = {alloy::bf16(1.0f), alloy::bf16(-2.0f)};
  std::uint16_t raw[2];
  std::memcpy(raw, pair, sizeof raw);
  EXPECT_EQ(raw[0], 0x3f80);
  EXPECT_EQ(raw[1], 0xc000);
}

}  // namespace
