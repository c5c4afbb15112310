// One learning rate: a rate set in one place is the rate every step uses.
#include "../support/test_support.hpp"
#include "layered_model.hpp"

#include <gtest/gtest.h>

namespace {

using namespace alloy;

template <class Opt>
using Tr = Trainer<layered::Model, Opt, Host>;

template <class Opt>
std::vector<float> rates(typename Tr<Opt>::Config c, int steps) {
  Tr<Opt> t(layered::Model(9, 2), c);
  std::mt19937_64 rng(3);
  std::vector<float> out;
  for (int s = 0; s < steps; ++s) out.push_back(t.step([&] { return layered::random_batch(5, 9, rng); }).lr);
  return out;
}

TEST(LearningRate, OptimizerRateAloneIsEveryStepsRate) {
  for (float lr : {3e-4f, 0.0123f}) {
    for (float got : rates<AdamW<>>({.optimizer = {.lr = lr}}, 3)) EXPECT_EQ(got, lr);
    for (float got : rates<SGD<>>({.optimizer = {.lr = lr, .momentum = 0.9f}}, 3)) EXPECT_EQ(got, lr);
    for (float got : rates<Lion<>>({.optimizer = {.lr = lr}}, 3)) EXPECT_EQ(got, lr);
    for (float got : rates<Adafactor<>>({.optimizer = {.lr = lr}}, 3)) EXPECT_EQ(got, lr);
  }
}

TEST(LearningRate, DefaultIsTheOptimizersDefault) {
  for (float got : rates<AdamW<>>({}, 2)) EXPECT_EQ(got, AdamW<>::Config{}.lr);
  for (float got : rates<Lion<>>({}, 2)) EXPECT_EQ(got, Lion<>::Config{}.lr);
}

TEST(LearningRate, ScheduleAloneSetsTheRate) {
  const auto s = LrSchedule::warmup_linear(2e-3f, 2, 4);
  const auto got = rates<AdamW<>>({.schedule = s}, 5);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(got[i], s.lr_at(i)) << i;
  EXPECT_EQ(got[1], 2e-3f);
}

TEST(LearningRate, ScheduleAndOptimizerRateThatAgreeAreAccepted) {
  const auto got = rates<AdamW<>>({.optimizer = {.lr = 5e-4f}, .schedule = LrSchedule::warmup_cosine(5e-4f, 1, 3)}, 2);
  EXPECT_EQ(got[0], 5e-4f);
}

TEST(LearningRate, TwoDifferentRatesAreRefused) {
  using T = Tr<AdamW<>>;
  const auto message = test::message_of(
      [] { T t(layered::Model(9, 2), {.optimizer = {.lr = 3e-4f}, .schedule = LrSchedule::constant(1e-2f)}); });
  EXPECT_MENTIONS(message, "two learning rates");
  EXPECT_MENTIONS(message, "optimizer.lr = 0.000300");
}

}  // namespace
