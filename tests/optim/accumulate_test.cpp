// OptimizerStep::accumulate: the trainer's path, where the last micro-batch's accumulation sums
// the squares and the step reads the gradients once (kernels/accumulate_grads.hpp).
#include "../support/test_support.hpp"
#include "reference.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

namespace {

using namespace alloy;

// Odd sizes spanning several 16,384-element segments, the last one partial.
ParamRegistry accumulate_model() {
  auto r = test::odd_model();
  r.declare("big", {301, 167}, Init::normal(0.02f));
  r.declare("tail", {2049}, Init::normal(1.0f), {.weight_decay = false, .lr_scale = 3.0f});
  return r;
}

using P = Precision<bf16, fp32_master>;
template <class O, int N>
using StoreOf = ParamStore<P, O, Host, N>;

// Fresh compute-dtype gradients (times the loss scale / count, as a backward seeds them).
template <class Store>
void micro_batch_grads(Store& store, std::mt19937_64& rng, float scale) {
  test::random_fill(store.grads_arena(), store.layout(), rng, scale, 0.05f);
}

// `count` micro-batches through accumulate(), then the step.
template <class Store, class Step>
StepStats accumulated_step(Store& store, Step& step, std::mt19937_64& rng, int count, const StepOptions& options,
                           int poison_micro_batch = -1) {
  for (int mb = 0; mb < count; ++mb) {
    micro_batch_grads(store, rng, step.loss_scale() / float(count));
    if (mb == poison_micro_batch) {
      const auto& place = store.layout()[rng() % store.layout().tensors()];
      store.grads_arena().data()[place.offset + rng() % place.numel] = round_nearest<bf16>(
          (rng() & 1) ? std::numeric_limits<float>::quiet_NaN() : -std::numeric_limits<float>::infinity());
    }
    step.accumulate(store, mb, count);
  }
  return step.step(store, options);
}

// The same micro-batches summed by hand into the accumulator, then the caller-owned step
// (pass 1 on the accumulator, which the step clears).
template <class Store, class Step>
StepStats caller_summed_step(Store& store, Step& step, std::mt19937_64& rng, int count, const StepOptions& options) {
  auto* acc = store.accumulator_arena().data();
  for (int mb = 0; mb < count; ++mb) {
    micro_batch_grads(store, rng, step.loss_scale() / float(count));
    const auto* g = store.grads_arena().data();
    for (std::size_t i = 0; i < store.layout().padded_numel(); ++i) {
      acc[i] = mb == 0 ? to_float(g[i]) : fp::add(acc[i], to_float(g[i]));
    }
  }
  return step.step(store, options);
}

template <class O>
void matches_the_caller_summed_step(std::uint64_t seed, int count) {
  constexpr int N = 4;
  StoreOf<O, N> a(accumulate_model(), Host{}, seed), b(accumulate_model(), Host{}, seed);
  OptimizerStep<P, O, Host, N> sa({.optimizer = {.lr = 1e-3f, .weight_decay = 0.1f}}),
      sb({.optimizer = {.lr = 1e-3f, .weight_decay = 0.1f}});
  std::mt19937_64 ra(seed), rb(seed);
  for (int t = 1; t <= 3; ++t) {
    // No clipping: the two norms are summed in other orders; the updates must match bit for bit.
    const auto x = accumulated_step(a, sa, ra, count, {.lr = 1e-3f});
    const auto y = caller_summed_step(b, sb, rb, count, {.lr = 1e-3f});
    ASSERT_FALSE(x.skipped || y.skipped);
    EXPECT_NEAR(x.grad_norm, y.grad_norm, 1e-5 * y.grad_norm) << "count " << count << " step " << t;
    ASSERT_EQ(test::snapshot(a), test::snapshot(b)) << "count " << count << " step " << t;
  }
}

TEST(GradAccumulation, StepMatchesTheCallerSummedStepForSeveralMicroBatchCounts) {
  ALLOY_SEEDED(seed);
  for (int count : {1, 2, 3, 5}) {
    matches_the_caller_summed_step<AdamW<>>(seed + count, count);
    matches_the_caller_summed_step<AdamW<State<q8>>>(seed + count, count);
  }
}

// The accumulator holds the sum in fp32, written in micro-batch order; the norm is the float64
// norm of that sum, to float rounding.
TEST(GradAccumulation, AccumulatorHoldsTheSumAndTheNormMatchesFloat64) {
  ALLOY_SEEDED(seed);
  constexpr int N = 3;
  StoreOf<AdamW<>, N> store(accumulate_model(), Host{}, seed);
  OptimizerStep<P, AdamW<>, Host, N> step;
  std::mt19937_64 rng(seed);
  const std::size_t n = store.layout().padded_numel();
  std::vector<float> expected(n, 0.0f);
  for (int mb = 0; mb < N; ++mb) {
    micro_batch_grads(store, rng, 1.0f);
    const auto g = to_host(store.grads_arena());
    for (std::size_t i = 0; i < n; ++i) expected[i] = mb == 0 ? to_float(g[i]) : fp::add(expected[i], to_float(g[i]));
    step.accumulate(store, mb, N);
  }
  double norm = 0;
  for (float x : expected) norm += double(x) * x;
  norm = std::sqrt(norm);
  const auto stats = step.step(store, {.lr = 1e-3f, .max_grad_norm = 0.5f});
  ASSERT_FALSE(stats.skipped);
  EXPECT_NEAR(stats.grad_norm, norm, 1e-5 * norm);
  EXPECT_LT(stats.clip_coefficient, 1.0) << "the test means to clip";
  // The trainer owns the accumulator: the step leaves the sum in place.
  EXPECT_EQ(to_host(store.accumulator_arena()), expected);
}

// A non-finite gradient in the last micro-batch: the step is skipped, parameters, master and
// state keep every bit, and the next step (whose first micro-batch overwrites the accumulator)
// gives the bytes of a run that never saw the bad step.
TEST(GradAccumulation, NonFiniteLastMicroBatchSkipsAndChangesNothing) {
  ALLOY_SEEDED(seed);
  constexpr int N = 4;
  for (int count : {1, 2, 4}) {
    StoreOf<AdamW<State<q8>>, N> a(accumulate_model(), Host{}, seed), b(accumulate_model(), Host{}, seed);
    OptimizerStep<P, AdamW<State<q8>>, Host, N> sa, sb;
    std::mt19937_64 ra(seed), rb(seed);
    ASSERT_FALSE(accumulated_step(a, sa, ra, count, {.lr = 1e-3f, .max_grad_norm = 1.0f}).skipped);
    ASSERT_FALSE(accumulated_step(b, sb, rb, count, {.lr = 1e-3f, .max_grad_norm = 1.0f}).skipped);
    const auto before = test::snapshot(a);
    std::mt19937_64 bad(seed + 99);
    const auto stats = accumulated_step(a, sa, bad, count, {.lr = 1e-3f, .max_grad_norm = 1.0f}, count - 1);
    EXPECT_TRUE(stats.skipped) << count;
    EXPECT_TRUE(std::isinf(stats.grad_norm));
    EXPECT_EQ(stats.skipped_steps, 1u);
    EXPECT_EQ(test::snapshot(a), before) << count;
    ASSERT_FALSE(accumulated_step(a, sa, ra, count, {.lr = 1e-3f, .max_grad_norm = 1.0f}).skipped);
    ASSERT_FALSE(accumulated_step(b, sb, rb, count, {.lr = 1e-3f, .max_grad_norm = 1.0f}).skipped);
    EXPECT_EQ(test::snapshot(a), test::snapshot(b)) << count;
    EXPECT_EQ(sa.steps(), sb.steps());
  }
}

// The sums of the last micro-batch against a float64 sum, on sizes around the segment and
// round boundaries (multiples of 8).
TEST(GradAccumulation, SumOfSquaresOnOddSizesMatchesFloat64) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 3.0f);
  for (std::size_t n : {std::size_t(0), std::size_t(8), std::size_t(2040), std::size_t(2056), std::size_t(16384),
                        std::size_t(16392), std::size_t(8 * 12345)}) {
    std::vector<bf16> g(n);
    std::vector<float> acc(n);
    for (auto& x : g) x = bf16(d(rng));
    for (auto& x : acc) x = d(rng);
    for (bool first : {true, false}) {
      auto out = acc;
      float sum = -1.0f;
      accumulate_grads_with_stats_async(Host{}, g.data(), out.data(), n, first, 0.25f, nullptr, &sum);
      double ref = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const float a = first ? to_float(g[i]) : fp::add(acc[i], to_float(g[i]));
        ASSERT_EQ(out[i], a) << i;
        ref += double(a) * 0.25 * double(a) * 0.25;
      }
      EXPECT_NEAR(sum, ref, 1e-5 * ref) << n;
    }
  }
}

TEST(GradAccumulation, MicroBatchOutOfRangeIsRefused) {
  StoreOf<AdamW<>, 2> store(test::odd_model(), Host{}, 1);
  OptimizerStep<P, AdamW<>, Host, 2> step;
  EXPECT_THROW(step.accumulate(store, 2, 2), alloy::error);
  EXPECT_THROW(step.accumulate(store, -1, 2), alloy::error);
  EXPECT_THROW(step.accumulate(store, 0, 0), alloy::error);
}

// Without an accumulator, accumulate() does nothing and the step is the caller-owned one.
TEST(GradAccumulation, StoresWithoutAnAccumulatorAreUnchanged) {
  ALLOY_SEEDED(seed);
  using Q = Precision<fp32>;
  ParamStore<Q, AdamW<>, Host, 3> a(test::odd_model(), Host{}, seed), b(test::odd_model(), Host{}, seed);
  OptimizerStep<Q, AdamW<>, Host, 3> sa, sb;
  std::mt19937_64 ra(seed), rb(seed);
  test::random_grads(a, ra, 1.0f, 0.1f);
  test::random_grads(b, rb, 1.0f, 0.1f);
  for (int mb = 0; mb < 3; ++mb) sa.accumulate(a, mb, 3);
  const auto x = sa.step(a, {.lr = 1e-3f, .max_grad_norm = 1.0f});
  const auto y = sb.step(b, {.lr = 1e-3f, .max_grad_norm = 1.0f});
  EXPECT_EQ(x.grad_norm, y.grad_norm);
  EXPECT_EQ(test::snapshot(a), test::snapshot(b));
}

}  // namespace
