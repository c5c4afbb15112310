// The optimizer step on Cuda against the Host backend: same arenas in, same bytes out.
#include "../support/test_support.hpp"
#include "reference.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <random>

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
