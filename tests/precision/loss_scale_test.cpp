#include <alloy/precision/precision.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace {

using alloy::DynamicLossScaleConfig;
using alloy::LossScaleState;
using alloy::ScaleEvent;

// Runs a sequence of steps ('o' overflow, '.' finite) and returns the scale after each.
std::vector<float> run(const DynamicLossScaleConfig& c, const std::string& steps, LossScaleState* out = nullptr) {
  LossScaleState s = alloy::initial_loss_scale_state(c);
  std::vector<float> scales;
  for (char ch : steps) {
    const ScaleEvent e = alloy::update_loss_scale(s, c, ch == 'o');
    EXPECT_NE(e, ScaleEvent::underflow);
    scales.push_back(s.scale);
  }
  if (out) *out = s;
  return scales;
}

TEST(DynamicLossScale, DefaultsShareGradScalersKnobs) {
  constexpr DynamicLossScaleConfig c;
  EXPECT_EQ(c.init_scale, 65536.0f);
  EXPECT_EQ(c.growth_factor, 2.0f);
  EXPECT_EQ(c.backoff_factor, 0.5f);
  EXPECT_EQ(c.growth_interval, 2000);
  EXPECT_EQ(c.hysteresis, 1);
}

// torch.amp.GradScaler: every overflow halves the scale and resets the growth count; after
// growth_interval finite steps in a row the scale doubles.
TEST(DynamicLossScale, MatchesGradScalerOnAnOverflowSequence) {
  DynamicLossScaleConfig c;
  c.init_scale = 1024.0f;
  c.growth_interval = 3;
  const auto s = run(c, "o..o...o.....");
  const std::vector<float> expected = {512, 512, 512, 256, 256, 256, 512, 256, 256, 256, 512, 512, 512};
  EXPECT_EQ(s, expected);
}

TEST(DynamicLossScale, BacksOffAfterHysteresisOverflows) {
  DynamicLossScaleConfig c;
  c.init_scale = 1024.0f;
  c.hysteresis = 3;
  c.growth_interval = 100;
  LossScaleState end;
  const auto s = run(c, "oo.ooo", &end);
  // Two overflows are tolerated, a finite step restores the allowance, the third in a row backs off.
  const std::vector<float> expected = {1024, 1024, 1024, 1024, 1024, 512};
  EXPECT_EQ(s, expected);
  EXPECT_EQ(end.overflows, 5u);
  EXPECT_EQ(end.hysteresis_left, 3);
}

TEST(DynamicLossScale, OverflowResetsTheGrowthCount) {
  DynamicLossScaleConfig c;
  c.init_scale = 8.0f;
  c.growth_interval = 2;
  c.hysteresis = 2;
  // The tolerated overflow does not halve, but the run of finite steps starts over.
  const auto s = run(c, ".o..");
  const std::vector<float> expected = {8, 8, 8, 16};
  EXPECT_EQ(s, expected);
}

TEST(DynamicLossScale, GrowthStopsAtMaxScale) {
  DynamicLossScaleConfig c;
  c.init_scale = 4.0f;
  c.growth_interval = 1;
  c.max_scale = 16.0f;
  const auto s = run(c, ".....");
  const std::vector<float> expected = {8, 16, 16, 16, 16};
  EXPECT_EQ(s, expected);
}

TEST(DynamicLossScale, FallingBelowMinScaleIsUnderflowAndChangesNothing) {
  DynamicLossScaleConfig c;
  c.init_scale = 4.0f;
  c.min_scale = 2.0f;
  LossScaleState s = alloy::initial_loss_scale_state(c);
  EXPECT_EQ(alloy::update_loss_scale(s, c, true), ScaleEvent::backed_off);
  EXPECT_EQ(s.scale, 2.0f);
  const LossScaleState before = s;
  EXPECT_EQ(alloy::update_loss_scale(s, c, true), ScaleEvent::underflow);
  EXPECT_EQ(s.scale, before.scale);
  EXPECT_EQ(s.overflows, before.overflows);
}

TEST(DynamicLossScale, IsUsableInConstantExpressions) {
  constexpr auto after = [] {
    DynamicLossScaleConfig c;
    c.init_scale = 2.0f;
    c.growth_interval = 1;
    LossScaleState s = alloy::initial_loss_scale_state(c);
    alloy::update_loss_scale(s, c, false);
    return s.scale;
  }();
  static_assert(after == 4.0f);
  EXPECT_EQ(after, 4.0f);
}

// A growth count at int32's limit, as a checkpoint may hold, grows the scale at the next finite
// step and starts over; it does not overflow (a constant expression would not compile if it did).
TEST(DynamicLossScale, AGrowthCountAtItsLimitGrowsWithoutOverflow) {
  constexpr LossScaleState after = [] {
    DynamicLossScaleConfig c;
    c.init_scale = 2.0f;
    LossScaleState s = alloy::initial_loss_scale_state(c);
    s.growth_tracker = std::numeric_limits<std::int32_t>::max();
    alloy::update_loss_scale(s, c, false);
    return s;
  }();
  static_assert(after.scale == 4.0f && after.growth_tracker == 0);
  EXPECT_EQ(after.scale, 4.0f);
  EXPECT_EQ(after.growth_tracker, 0);
}

TEST(Precision, DefaultsFollowTheDesign) {
  using alloy::Precision;
  static_assert(std::is_same_v<Precision<alloy::fp16>::scaler_type, alloy::DynamicLossScale<>>);
  static_assert(std::is_same_v<Precision<alloy::bf16>::scaler_type, alloy::NoLossScale>);
  static_assert(!Precision<alloy::bf16>::has_master);
  static_assert(Precision<alloy::bf16, alloy::fp32_master>::has_master);
  static_assert(std::is_same_v<Precision<alloy::tf32>::param_type, float>);
  // Any scaler with any dtype: bf16 with a dynamic scale, fp32 with a static one.
  static_assert(Precision<alloy::bf16, alloy::fp32_master, alloy::DynamicLossScale<>>::scaler_type::dynamic);
  static_assert(Precision<alloy::fp32, alloy::no_master, alloy::StaticLossScale<128.0f>>::scaler_type::scale == 128.0f);
  // Accumulators: fp32 when several micro-batches meet a 16-bit dtype.
  static_assert(std::is_same_v<alloy::grad_accumulator_t<Precision<alloy::bf16>, 4>, float>);
  static_assert(std::is_void_v<alloy::grad_accumulator_t<Precision<alloy::bf16>, 1>>);
  static_assert(std::is_void_v<alloy::grad_accumulator_t<Precision<alloy::fp32>, 8>>);
  static_assert(
      std::is_same_v<
          alloy::grad_accumulator_t<Precision<alloy::bf16, alloy::fp32_master, alloy::NoLossScale, alloy::fp32>, 1>,
          float>);
  constexpr alloy::DynamicLossScaleConfig custom{.init_scale = 1024.0f, .hysteresis = 2};
  static_assert(alloy::DynamicLossScale<custom>::defaults.hysteresis == 2);
  EXPECT_EQ(alloy::DynamicLossScale<custom>::initial_scale(custom), 1024.0f);
}

}  // namespace
