// The optimizer step on Cuda against the Host backend: same arenas in, same bytes out.
#include "../support/test_support.hpp"
#include "reference.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <vector>

namespace {

using namespace alloy;

ParamRegistry gpu_model() {
  auto r = test::odd_model();
  r.declare("big", {3001, 67}, Init::normal(0.02f));  // many blocks of the vector kernels
  r.declare("tail", {2049}, Init::normal(1.0f), {.weight_decay = false, .lr_scale = 3.0f});
  return r;
}

template <class P, class O, int MicroBatches = 1, Rounding R = Rounding::nearest_even>
struct Config {
  using precision = P;
  using optimizer = O;
  static constexpr int micro_batches = MicroBatches;
  static constexpr Rounding rounding = R;
};

template <class C>
class GpuOptimizerStep : public ::testing::Test {};

using Configs =
    ::testing::Types<Config<Precision<bf16, fp32_master>, AdamW<>>,           // the headline configuration
                     Config<Precision<fp16, fp32_master>, AdamW<State<q8>>>,  // dynamic scale, 8-bit state
                     Config<Precision<bf16, fp32_master>, AdamW<State<q8_blockwise<2048>>>>,  // 2048-element blocks
                     Config<Precision<bf16>, AdamW<State<bf16>>, 1, Rounding::stochastic>,  // no master, SR everywhere
                     Config<Precision<fp32>, SGD<>>,                                        // fp32, momentum
                     Config<Precision<bf16, fp32_master>, Lion<State<bf16>>>,               // Lion, bf16 state
                     Config<Precision<fp16>, SGD<State<q8>>, 1, Rounding::stochastic>,      // fp16 direct, q8 momentum
                     Config<Precision<bf16, fp32_master>, AdamW<>, 4>,                      // fp32 accumulator, cleared
                     Config<Precision<tf32>, AdamW<State<q8>>>>;                            // tf32 storage
TYPED_TEST_SUITE(GpuOptimizerStep, Configs);

template <class O>
typename O::Config busy_config() {
  if constexpr (std::is_same_v<O, SGD<typename O::state>>) {
    return {.lr = 0.1f, .momentum = 0.9f, .dampening = 0.1f, .weight_decay = 0.01f, .nesterov = true};
  } else {
    typename O::Config c;
    c.weight_decay = 0.1f;
    return c;
  }
}

TYPED_TEST(GpuOptimizerStep, CudaMatchesHostBitForBit) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using P = typename TypeParam::precision;
  using O = typename TypeParam::optimizer;
  constexpr int N = TypeParam::micro_batches;
  const auto registry = gpu_model();
  ParamStore<P, O, Host, N> host(registry, Host{}, seed);
  ParamStore<P, O, Cuda, N> gpu(registry, Cuda{}, seed);
  test::mirror(host, gpu);
  const StepConfig<O, typename P::scaler_type> config{
      .optimizer = busy_config<O>(), .param_rounding = TypeParam::rounding, .seed = seed};
  OptimizerStep<P, O, Host, N> host_step(config);
  OptimizerStep<P, O, Cuda, N> gpu_step(config, Cuda{});
  std::mt19937_64 rng_host(seed), rng_gpu(seed);
  for (int t = 1; t <= 3; ++t) {
    test::random_grads(host, rng_host, host_step.loss_scale(), 0.01f);
    test::random_grads(gpu, rng_gpu, gpu_step.loss_scale(), 0.01f);
    // No clipping: the two norms differ in their last bits (another summation order), and the
    // update must be compared with identical scalars.
    const auto h = host_step.step(host, {.lr = 1e-3f});
    const auto g = gpu_step.step(gpu, {.lr = 1e-3f});
    ASSERT_FALSE(h.skipped || g.skipped);
    EXPECT_NEAR(g.grad_norm, h.grad_norm, 1e-5 * h.grad_norm);
    ASSERT_EQ(test::snapshot(gpu), test::snapshot(host)) << "step " << t;
  }
}

TYPED_TEST(GpuOptimizerStep, NonFiniteGradientSkipsOnTheDevice) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using P = typename TypeParam::precision;
  using O = typename TypeParam::optimizer;
  constexpr int N = TypeParam::micro_batches;
  std::mt19937_64 rng(seed);
  ParamStore<P, O, Cuda, N> gpu(gpu_model(), Cuda{}, seed);
  OptimizerStep<P, O, Cuda, N> step({.optimizer = busy_config<O>()}, Cuda{});
  test::random_grads(gpu, rng, step.loss_scale(), 0.01f);
  ASSERT_FALSE(step.step(gpu, {.lr = 1e-3f, .max_grad_norm = 1.0f}).skipped);
  test::random_grads(gpu, rng, step.loss_scale(), 0.01f);
  const auto& place = gpu.layout()[rng() % gpu.layout().tensors()];
  const std::size_t at = place.offset + rng() % place.numel;
  using G = typename ParamStore<P, O, Cuda, N>::optimizer_grad_type;
  const G bad =
      round_nearest<G>((rng() & 1) ? std::numeric_limits<float>::quiet_NaN() : -std::numeric_limits<float>::infinity());
  ALLOY_CUDA_CHECK(cudaMemcpy(gpu.optimizer_grads() + at, &bad, sizeof(G), cudaMemcpyHostToDevice));
  const auto before = test::snapshot(gpu);
  const auto stats = step.step(gpu, {.lr = 1e-3f, .max_grad_norm = 1.0f});
  EXPECT_TRUE(stats.skipped);
  EXPECT_EQ(stats.skipped_steps, 1u);
  // A caller-owned accumulator (no accumulate() calls) is cleared on a skip; the training state
  // is untouched.
  if constexpr (N > 1) {
    for (float x : to_host(gpu.accumulator_arena())) ASSERT_EQ(x, 0.0f);
  }
  EXPECT_EQ(test::snapshot(gpu), before);
}

// Writes `bad` at the same random declared element of both stores' optimizer gradients.
template <class HostStore, class CudaStore>
void poison_both(HostStore& host, CudaStore& gpu, std::mt19937_64& rng) {
  using G = typename CudaStore::optimizer_grad_type;
  const auto& place = gpu.layout()[rng() % gpu.layout().tensors()];
  const std::size_t at = place.offset + rng() % place.numel;
  const G bad =
      round_nearest<G>((rng() & 1) ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity());
  host.optimizer_grads()[at] = bad;
  ALLOY_CUDA_CHECK(cudaMemcpy(gpu.optimizer_grads() + at, &bad, sizeof(G), cudaMemcpyHostToDevice));
}

void expect_same_stats(const StepStats& g, const StepStats& h) {
  EXPECT_EQ(g.skipped, h.skipped);
  EXPECT_EQ(g.first_non_finite, h.first_non_finite);
  EXPECT_EQ(g.step, h.step);
  EXPECT_EQ(g.skipped_steps, h.skipped_steps);
  EXPECT_EQ(g.overflows, h.overflows);
  EXPECT_EQ(g.loss_scale, h.loss_scale);
  EXPECT_EQ(g.next_loss_scale, h.next_loss_scale);
  EXPECT_EQ(g.scale_event, h.scale_event);
}

// Skipped steps (decided on the device) against Host: the same counters, scale, first non-finite
// parameter and bytes, with the training state as it was before each skip; a caller-owned
// accumulator is cleared on both. Two skips in a row back a dynamic scale off twice. No clipping:
// pass 1's sums differ in their last bits.
TYPED_TEST(GpuOptimizerStep, SkippedStepsMatchHostBitForBit) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using P = typename TypeParam::precision;
  using O = typename TypeParam::optimizer;
  constexpr int N = TypeParam::micro_batches;
  const auto registry = gpu_model();
  ParamStore<P, O, Host, N> host(registry, Host{}, seed);
  ParamStore<P, O, Cuda, N> gpu(registry, Cuda{}, seed);
  test::mirror(host, gpu);
  const StepConfig<O, typename P::scaler_type> config{
      .optimizer = busy_config<O>(), .param_rounding = TypeParam::rounding, .seed = seed};
  OptimizerStep<P, O, Host, N> host_step(config);
  OptimizerStep<P, O, Cuda, N> gpu_step(config, Cuda{});
  std::mt19937_64 rng_host(seed), rng_gpu(seed), pick(seed + 1);
  for (int t = 1; t <= 5; ++t) {
    test::random_grads(host, rng_host, host_step.loss_scale(), 0.01f);
    test::random_grads(gpu, rng_gpu, gpu_step.loss_scale(), 0.01f);
    const bool poisoned = t == 2 || t == 3;
    if (poisoned) poison_both(host, gpu, pick);
    const auto before = test::snapshot(gpu);
    const auto h = host_step.step(host, {.lr = 1e-3f});
    const auto g = gpu_step.step(gpu, {.lr = 1e-3f});
    ASSERT_EQ(h.skipped, poisoned) << "step " << t;
    expect_same_stats(g, h);
    if (poisoned) {
      EXPECT_FALSE(g.first_non_finite.empty());
      EXPECT_TRUE(std::isinf(g.grad_norm));
      EXPECT_EQ(test::snapshot(gpu), before) << "step " << t;
      if constexpr (P::scaler_type::dynamic) EXPECT_EQ(g.next_loss_scale, g.loss_scale * 0.5f);
      if constexpr (N > 1) {
        for (float x : to_host(gpu.accumulator_arena())) ASSERT_EQ(x, 0.0f);
      }
    } else {
      EXPECT_NEAR(g.grad_norm, h.grad_norm, 1e-5 * h.grad_norm);
    }
    ASSERT_EQ(test::snapshot(gpu), test::snapshot(host)) << "step " << t;
  }
  EXPECT_EQ(gpu_step.steps(), 3u);
  EXPECT_EQ(gpu_step.skipped_steps(), 2u);
}

// Gradients k/16 times the scale, k in [-2, 2]: every square and every partial sum (under 2^24
// units of 1/256) is exact in float, so pass 1 gives the same sum in any order and a clipped step
// can be compared bit for bit with the decision made on the device.
template <class Store>
void exact_grads(Store& store, std::mt19937_64& rng, float scale) {
  using G = typename Store::optimizer_grad_type;
  const auto& layout = store.layout();
  std::vector<G> v(layout.padded_numel(), round_nearest<G>(0.0f));
  for (std::size_t t = 0; t < layout.tensors(); ++t) {
    for (std::size_t i = 0; i < layout[t].numel; ++i) {
      v[layout[t].offset + i] = round_nearest<G>(static_cast<float>(static_cast<int>(rng() % 5) - 2) * 0.0625f * scale);
    }
  }
  if constexpr (Store::has_accumulator) {
    copy_from_host(store.accumulator_arena(), std::span<const G>(v));
  } else {
    copy_from_host(store.grads_arena(), std::span<const G>(v));
  }
}

TYPED_TEST(GpuOptimizerStep, ClippedStepsWithAnExactNormMatchHostBitForBit) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using P = typename TypeParam::precision;
  using O = typename TypeParam::optimizer;
  constexpr int N = TypeParam::micro_batches;
  const auto registry = gpu_model();
  ParamStore<P, O, Host, N> host(registry, Host{}, seed);
  ParamStore<P, O, Cuda, N> gpu(registry, Cuda{}, seed);
  test::mirror(host, gpu);
  const StepConfig<O, typename P::scaler_type> config{
      .optimizer = busy_config<O>(), .param_rounding = TypeParam::rounding, .seed = seed};
  OptimizerStep<P, O, Host, N> host_step(config);
  OptimizerStep<P, O, Cuda, N> gpu_step(config, Cuda{});
  std::mt19937_64 rng_host(seed), rng_gpu(seed);
  for (int t = 1; t <= 3; ++t) {
    exact_grads(host, rng_host, host_step.loss_scale());
    exact_grads(gpu, rng_gpu, gpu_step.loss_scale());
    const auto h = host_step.step(host, {.lr = 1e-3f, .max_grad_norm = 1.0f});
    const auto g = gpu_step.step(gpu, {.lr = 1e-3f, .max_grad_norm = 1.0f});
    ASSERT_FALSE(h.skipped || g.skipped);
    EXPECT_LT(h.clip_coefficient, 0.1) << "the test means to clip";
    EXPECT_EQ(g.grad_norm, h.grad_norm);
    EXPECT_EQ(g.clip_coefficient, h.clip_coefficient);
    expect_same_stats(g, h);
    ASSERT_EQ(test::snapshot(gpu), test::snapshot(host)) << "step " << t;
  }
}

// The underflow error comes after the device has skipped the update: nothing changed, on either
// backend, and the next step is the same on both.
TEST(GpuOptimizerStep, ScaleUnderflowIsAnErrorThatChangesNothing) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using P = Precision<fp16, fp32_master>;
  using O = AdamW<>;
  ParamStore<P, O, Host> host(gpu_model(), Host{}, seed);
  ParamStore<P, O, Cuda> gpu(gpu_model(), Cuda{}, seed);
  test::mirror(host, gpu);
  const StepConfig<O, P::scaler_type> config{.scaler = {.init_scale = 2.0f, .min_scale = 2.0f}};
  OptimizerStep<P, O, Host> host_step(config);
  OptimizerStep<P, O, Cuda> gpu_step(config, Cuda{});
  std::mt19937_64 rng_host(seed), rng_gpu(seed), pick(seed + 1);
  test::random_grads(host, rng_host, 2.0f, 0.01f);
  test::random_grads(gpu, rng_gpu, 2.0f, 0.01f);
  ASSERT_FALSE(host_step.step(host, {.lr = 1e-3f}).skipped);
  ASSERT_FALSE(gpu_step.step(gpu, {.lr = 1e-3f}).skipped);
  test::random_grads(host, rng_host, 2.0f, 0.01f);
  test::random_grads(gpu, rng_gpu, 2.0f, 0.01f);
  poison_both(host, gpu, pick);
  const auto before = test::snapshot(gpu);
  const auto host_message = test::message_of([&] { host_step.step(host, {.lr = 1e-3f}); });
  const auto gpu_message = test::message_of([&] { gpu_step.step(gpu, {.lr = 1e-3f}); });
  EXPECT_MENTIONS(gpu_message, "loss scale fell below min_scale=2");
  EXPECT_EQ(gpu_message, host_message);
  EXPECT_EQ(gpu_step.loss_scale(), 2.0f);
  EXPECT_EQ(gpu_step.steps(), 1u);
  EXPECT_EQ(gpu_step.skipped_steps(), 0u);
  EXPECT_EQ(test::snapshot(gpu), before);
  test::random_grads(host, rng_host, 2.0f, 0.01f);
  test::random_grads(gpu, rng_gpu, 2.0f, 0.01f);
  const auto h = host_step.step(host, {.lr = 1e-3f});
  const auto g = gpu_step.step(gpu, {.lr = 1e-3f});
  ASSERT_FALSE(h.skipped || g.skipped);
  expect_same_stats(g, h);
  EXPECT_EQ(test::snapshot(gpu), test::snapshot(host));
}

// The one-thread decision kernel against the host's arithmetic, bit for bit, over sums of every
// magnitude (and every bit pattern, negative and NaN ones included), with and without clipping.
TEST(GpuStepDecision, DeviceDecisionHasTheHostsBits) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  std::vector<float> sums = {0.0f,
                             std::numeric_limits<float>::denorm_min(),
                             1e-30f,
                             0.25f,
                             1.0f,
                             169.0f,
                             3e38f,
                             std::numeric_limits<float>::infinity(),
                             std::numeric_limits<float>::quiet_NaN()};
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  for (int i = 0; i < 600; ++i) sums.push_back(std::ldexp(mantissa(rng), static_cast<int>(rng() % 250) - 125));
  for (int i = 0; i < 200; ++i) sums.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(rng())));
  Buffer<float, Cuda> device_sums(sums.size());
  copy_from_host(device_sums, std::span<const float>(sums));
  Buffer<detail::StepDecision, Cuda> decisions(sums.size());
  for (float max_norm : {0.0f, 1e-3f, 1.0f, 5.0f, 1e20f}) {
    for (float scale : {1.0f, 65536.0f, 3.0f, 0.125f, 1e-30f}) {
      for (std::size_t i = 0; i < sums.size(); ++i) {
        detail::decide_step_async(Cuda{}, device_sums.data() + i, max_norm, scale, decisions.data() + i);
      }
      const auto got = to_host(decisions);
      for (std::size_t i = 0; i < sums.size(); ++i) {
        const auto want = detail::decide_step(static_cast<double>(sums[i]), max_norm, scale);
        ASSERT_EQ(got[i].skip, want.skip) << sums[i];
        if (want.skip) continue;
        ASSERT_EQ(std::bit_cast<std::uint32_t>(got[i].grad_mult), std::bit_cast<std::uint32_t>(want.grad_mult))
            << "sum " << sums[i] << ", max_grad_norm " << max_norm << ", scale " << scale;
      }
    }
  }
}

// Pass 2 behind a decision in device memory: applying matches Host's pass 2 given the decision's
// grad_mult, bit for bit; skipping leaves every byte.
template <class P, class O>
void device_decision_drives_pass2(std::uint64_t seed) {
  ParamStore<P, O, Host> host(gpu_model(), Host{}, seed);
  ParamStore<P, O, Cuda> gpu(gpu_model(), Cuda{}, seed);
  test::mirror(host, gpu);
  const typename O::Config config = busy_config<O>();
  Buffer<detail::StepDecision, Cuda> decision(1);
  std::mt19937_64 rng_host(seed), rng_gpu(seed);
  for (std::uint64_t t = 1; t <= 3; ++t) {
    test::random_grads(host, rng_host, 1.0f, 0.01f);
    test::random_grads(gpu, rng_gpu, 1.0f, 0.01f);
    const detail::StepDecision skip{0.37f, 1}, apply{0.37f, 0};
    copy_from_host(decision, std::span<const detail::StepDecision>(&skip, 1));
    const auto before = test::snapshot(gpu);
    test::pass2<O>(Cuda{}, gpu, config, 1e-3f, t, 0.37f, decision.data());
    ASSERT_EQ(test::snapshot(gpu), before) << "step " << t;
    copy_from_host(decision, std::span<const detail::StepDecision>(&apply, 1));
    test::pass2<O>(Cuda{}, gpu, config, 1e-3f, t, -5.0f, decision.data());
    test::pass2<O>(Host{}, host, config, 1e-3f, t, 0.37f, nullptr);
    ASSERT_EQ(test::snapshot(gpu), test::snapshot(host)) << "step " << t;
  }
}

TEST(GpuFusedUpdate, DeviceDecisionReplacesGradMultAndSkipLeavesEveryByte) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  device_decision_drives_pass2<Precision<bf16, fp32_master>, AdamW<>>(seed);
  device_decision_drives_pass2<Precision<bf16>, Lion<State<bf16>>>(seed + 1);
  device_decision_drives_pass2<Precision<fp16, fp32_master>, AdamW<State<q8>>>(seed + 2);
  device_decision_drives_pass2<Precision<bf16, fp32_master>, AdamW<State<q8_blockwise<2048>>>>(seed + 3);
}

TEST(GpuOptimizerStep, ClippedStepMatchesHostWithinTheNormsRounding) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using P = Precision<bf16, fp32_master>;
  using O = AdamW<>;
  ParamStore<P, O, Host> host(gpu_model(), Host{}, seed);
  ParamStore<P, O, Cuda> gpu(gpu_model(), Cuda{}, seed);
  test::mirror(host, gpu);
  OptimizerStep<P, O, Host> hs;
  OptimizerStep<P, O, Cuda> gs({}, Cuda{});
  std::mt19937_64 a(seed), b(seed);
  test::random_grads(host, a, 1.0f, 0.1f);
  test::random_grads(gpu, b, 1.0f, 0.1f);
  const auto h = hs.step(host, {.lr = 1e-2f, .max_grad_norm = 1.0f});
  const auto g = gs.step(gpu, {.lr = 1e-2f, .max_grad_norm = 1.0f});
  EXPECT_LT(h.clip_coefficient, 0.5);
  EXPECT_NEAR(g.clip_coefficient, h.clip_coefficient, 1e-5 * h.clip_coefficient);
  const auto hm = to_host(host.master_arena()), gm = to_host(gpu.master_arena());
  for (std::size_t i = 0; i < hm.size(); ++i) ASSERT_NEAR(gm[i], hm[i], 1e-6 * std::fabs(hm[i]) + 1e-7) << i;
}

TEST(GpuParamStore, InitializationMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using P = Precision<bf16, fp32_master>;
  ParamStore<P, AdamW<>, Host> host(gpu_model(), Host{}, seed);
  ParamStore<P, AdamW<>, Cuda> gpu(gpu_model(), Cuda{}, seed);
  const auto hm = to_host(host.master_arena()), gm = to_host(gpu.master_arena());
  std::size_t differ = 0;
  for (std::size_t i = 0; i < hm.size(); ++i) {
    ASSERT_NEAR(gm[i], hm[i], 1e-6f * std::fabs(hm[i])) << i;
    differ += gm[i] != hm[i];
  }
  // Box-Muller in double rounds to the same float except in rare double-rounding cases.
  EXPECT_LE(differ, hm.size() / 100000 + 1);
}

}  // namespace

namespace {

using namespace alloy;

// Adafactor's per-tensor sums run in another order on the device: close, not bitwise.
template <class P>
void adafactor_cuda_matches_host(std::uint64_t seed) {
  ParamRegistry r;
  r.declare("w", {301, 67}, Init::normal(0.5f));
  r.declare("b", {67}, Init::normal(0.1f), {.weight_decay = false});
  r.declare("conv", {3, 40, 7}, Init::normal(0.2f));
  ParamStore<P, Adafactor<>, Host> host(r, Host{}, seed);
  ParamStore<P, Adafactor<>, Cuda> gpu(r, Cuda{}, seed);
  test::mirror(host, gpu);
  const Adafactor<>::Config c{.weight_decay = 0.1f};
  OptimizerStep<P, Adafactor<>, Host> hs({.optimizer = c});
  OptimizerStep<P, Adafactor<>, Cuda> gs({.optimizer = c}, Cuda{});
  std::mt19937_64 a(seed), b(seed);
  for (int t = 0; t < 3; ++t) {
    test::random_grads(host, a, hs.loss_scale(), 0.01f);
    test::random_grads(gpu, b, gs.loss_scale(), 0.01f);
    ASSERT_FALSE(hs.step(host, {.lr = 1e-2f, .max_grad_norm = 1.0f}).skipped);
    ASSERT_FALSE(gs.step(gpu, {.lr = 1e-2f, .max_grad_norm = 1.0f}).skipped);
  }
  if constexpr (P::has_master) {
    const auto h = to_host(host.master_arena()), g = to_host(gpu.master_arena());
    for (std::size_t i = 0; i < h.size(); ++i) ASSERT_NEAR(g[i], h[i], 1e-5 * std::fabs(h[i]) + 1e-7) << i;
  } else {
    const auto h = to_host(host.params_arena()), g = to_host(gpu.params_arena());
    for (std::size_t i = 0; i < h.size(); ++i)
      ASSERT_NEAR(to_float(g[i]), to_float(h[i]), 1e-5 * std::fabs(to_float(h[i])) + 1e-7) << i;
  }
  const auto hs_state = to_host(host.state_arena(0)), gs_state = to_host(gpu.state_arena(0));
  for (std::size_t i = 0; i < hs_state.size(); ++i)
    ASSERT_NEAR(gs_state[i], hs_state[i], 1e-5 * hs_state[i] + 1e-30) << i;
}

TEST(GpuAdafactor, CudaMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  adafactor_cuda_matches_host<Precision<fp32>>(seed);
  adafactor_cuda_matches_host<Precision<bf16, fp32_master>>(seed + 1);
}

}  // namespace
