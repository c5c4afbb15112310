// OptimizerStep::accumulate on Cuda against Host: the accumulation, its sums of squares and the
// steps that follow are the same bits on both (the sums run in one fixed order,
// kernels/accumulate_grads.hpp), so even a clipped step matches bit for bit.
#include "../support/test_support.hpp"
#include "reference.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <limits>
#include <random>

namespace {

using namespace alloy;

TEST(GpuGradAccumulation, SumsAndAccumulatorMatchHostBitForBitOnOddSizes) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 2.0f);
  Buffer<float, Cuda> result(1), partials(grad_stats_partials(8 * 300007));
  for (std::size_t n : {std::size_t(8), std::size_t(2056), std::size_t(16392), std::size_t(8 * 12345),
                        std::size_t(8 * 300007), std::size_t(8) * (1 + rng() % 400000)}) {
    std::vector<bf16> g(n);
    std::vector<float> acc(n);
    for (auto& x : g) x = bf16(d(rng));
    for (auto& x : acc) x = d(rng);
    Buffer<bf16, Cuda> dg(n);
    Buffer<float, Cuda> dacc(n);
    if (partials.size() < grad_stats_partials(n)) partials = Buffer<float, Cuda>(grad_stats_partials(n));
    for (bool first : {true, false}) {
      copy_from_host(dg, std::span<const bf16>(g));
      copy_from_host(dacc, std::span<const float>(acc));
      auto host_acc = acc;
      float host_sum = 0.0f;
      const float inv_scale = 1.0f / 3.0f;
      accumulate_grads_with_stats_async(Host{}, g.data(), host_acc.data(), n, first, inv_scale, nullptr, &host_sum);
      accumulate_grads_with_stats_async(Cuda{}, dg.data(), dacc.data(), n, first, inv_scale, partials.data(),
                                        result.data());
      EXPECT_EQ(detail::float_bits(to_host(result)[0]), detail::float_bits(host_sum)) << n << " first " << first;
      ASSERT_EQ(to_host(dacc), host_acc) << n << " first " << first;
    }
    // The plain accumulations too.
    for (bool first : {true, false}) {
      copy_from_host(dacc, std::span<const float>(acc));
      auto host_acc = acc;
      accumulate_grads(Host{}, g.data(), host_acc.data(), n, first);
      accumulate_grads(Cuda{}, dg.data(), dacc.data(), n, first);
      ASSERT_EQ(to_host(dacc), host_acc) << n << " first " << first;
    }
  }
}

ParamRegistry gpu_model() {
  auto r = test::odd_model();
  r.declare("big", {3001, 67}, Init::normal(0.02f));
  r.declare("tail", {2049}, Init::normal(1.0f), {.weight_decay = false, .lr_scale = 3.0f});
  return r;
}

// The same compute-dtype gradients on both stores.
template <class HostStore, class CudaStore>
void same_grads(HostStore& host, CudaStore& gpu, std::mt19937_64& rng, float scale) {
  test::random_fill(host.grads_arena(), host.layout(), rng, scale, 0.01f);
  const auto g = to_host(host.grads_arena());
  copy_from_host(gpu.grads_arena(), std::span<const typename decltype(g)::value_type>(g));
}

template <class P, class O>
void step_matches_host(std::uint64_t seed) {
  constexpr int N = 4;
  ParamStore<P, O, Host, N> host(gpu_model(), Host{}, seed);
  ParamStore<P, O, Cuda, N> gpu(gpu_model(), Cuda{}, seed);
  test::mirror(host, gpu);
  const StepConfig<O, typename P::scaler_type> config{.optimizer = {.weight_decay = 0.1f}, .seed = seed};
  OptimizerStep<P, O, Host, N> hs(config);
  OptimizerStep<P, O, Cuda, N> gs(config, Cuda{});
  std::mt19937_64 rng(seed);
  int t = 0;
  for (int count : {2, 3, 4, 2}) {
    for (int mb = 0; mb < count; ++mb) {
      same_grads(host, gpu, rng, hs.loss_scale() / float(count));
      hs.accumulate(host, mb, count);
      gs.accumulate(gpu, mb, count);
    }
    const auto h = hs.step(host, {.lr = 1e-2f, .max_grad_norm = 0.05f});
    const auto g = gs.step(gpu, {.lr = 1e-2f, .max_grad_norm = 0.05f});
    ++t;
    ASSERT_FALSE(h.skipped || g.skipped);
    EXPECT_LT(h.clip_coefficient, 1.0) << "the test means to clip";
    EXPECT_EQ(g.grad_norm, h.grad_norm) << "step " << t;
    EXPECT_EQ(g.next_loss_scale, h.next_loss_scale);
    ASSERT_EQ(test::snapshot(gpu), test::snapshot(host)) << "step " << t << ", " << count << " micro-batches";
  }
  // One micro-batch: pass 1 on the compute-dtype gradients (device order), pass 2 from them.
  same_grads(host, gpu, rng, hs.loss_scale());
  hs.accumulate(host, 0, 1);
  gs.accumulate(gpu, 0, 1);
  const auto h = hs.step(host, {.lr = 1e-2f});
  const auto g = gs.step(gpu, {.lr = 1e-2f});
  EXPECT_NEAR(g.grad_norm, h.grad_norm, 1e-5 * h.grad_norm);
  EXPECT_EQ(test::snapshot(gpu), test::snapshot(host));
}

TEST(GpuGradAccumulation, ClippedStepsMatchHostBitForBit) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  step_matches_host<Precision<bf16, fp32_master>, AdamW<>>(seed);
  step_matches_host<Precision<fp16, fp32_master>, AdamW<State<q8>>>(seed + 1);
  step_matches_host<Precision<bf16, fp32_master>, AdamW<State<q8_blockwise<2048>>>>(seed + 2);
  step_matches_host<Precision<bf16>, Lion<State<bf16>>>(seed + 3);
}

// Steps of 3, 2 and 1 micro-batches, some with a non-finite gradient in their last micro-batch,
// against Host: the accumulated sums are the same bits, so clipped steps match; skipped steps
// (decided on the device) leave the training state as it was and report what Host reports, and a
// dynamic scale backs off alike. One micro-batch reads the compute-dtype gradients (pass 1 in
// device order): those steps do not clip.
template <class P, class O>
void skips_match_host(std::uint64_t seed) {
  constexpr int N = 3;
  ParamStore<P, O, Host, N> host(gpu_model(), Host{}, seed);
  ParamStore<P, O, Cuda, N> gpu(gpu_model(), Cuda{}, seed);
  test::mirror(host, gpu);
  const StepConfig<O, typename P::scaler_type> config{.optimizer = {.weight_decay = 0.1f}, .seed = seed};
  OptimizerStep<P, O, Host, N> hs(config);
  OptimizerStep<P, O, Cuda, N> gs(config, Cuda{});
  std::mt19937_64 rng(seed);
  struct Plan {
    int micro_batches;
    bool poisoned;
  };
  int t = 0, skips = 0;
  for (const Plan plan :
       {Plan{3, false}, Plan{3, true}, Plan{2, false}, Plan{1, true}, Plan{1, false}, Plan{3, true}, Plan{3, false}}) {
    ++t;
    const int count = plan.micro_batches;
    for (int mb = 0; mb < count; ++mb) {
      same_grads(host, gpu, rng, hs.loss_scale() / float(count));
      if (plan.poisoned && mb == count - 1) {
        const auto& place = gpu.layout()[rng() % gpu.layout().tensors()];
        const std::size_t at = place.offset + rng() % place.numel;
        using G = typename ParamStore<P, O, Cuda, N>::grad_type;
        const G bad = round_nearest<G>((rng() & 1) ? std::numeric_limits<float>::quiet_NaN()
                                                   : -std::numeric_limits<float>::infinity());
        host.grads_arena().data()[at] = bad;
        ALLOY_CUDA_CHECK(cudaMemcpy(gpu.grads_arena().data() + at, &bad, sizeof(G), cudaMemcpyHostToDevice));
      }
      hs.accumulate(host, mb, count);
      gs.accumulate(gpu, mb, count);
    }
    const float max_grad_norm = count > 1 ? 0.05f : 0.0f;
    const auto before = test::snapshot(gpu);
    const auto h = hs.step(host, {.lr = 1e-2f, .max_grad_norm = max_grad_norm});
    const auto g = gs.step(gpu, {.lr = 1e-2f, .max_grad_norm = max_grad_norm});
    ASSERT_EQ(h.skipped, plan.poisoned) << "step " << t;
    EXPECT_EQ(g.skipped, h.skipped) << "step " << t;
    EXPECT_EQ(g.first_non_finite, h.first_non_finite) << "step " << t;
    EXPECT_EQ(g.step, h.step);
    EXPECT_EQ(g.skipped_steps, h.skipped_steps);
    EXPECT_EQ(g.overflows, h.overflows);
    EXPECT_EQ(g.loss_scale, h.loss_scale);
    EXPECT_EQ(g.next_loss_scale, h.next_loss_scale);
    EXPECT_EQ(g.scale_event, h.scale_event);
    if (plan.poisoned) {
      ++skips;
      EXPECT_FALSE(g.first_non_finite.empty());
      EXPECT_EQ(test::snapshot(gpu), before) << "step " << t;
      if constexpr (P::scaler_type::dynamic) EXPECT_EQ(g.next_loss_scale, g.loss_scale * 0.5f);
    } else if (count > 1) {
      EXPECT_LT(h.clip_coefficient, 1.0) << "the test means to clip";
      EXPECT_EQ(g.grad_norm, h.grad_norm) << "step " << t;
      EXPECT_EQ(g.clip_coefficient, h.clip_coefficient) << "step " << t;
    }
    ASSERT_EQ(test::snapshot(gpu), test::snapshot(host)) << "step " << t << ", " << count << " micro-batches";
  }
  EXPECT_EQ(gs.skipped_steps(), static_cast<std::uint64_t>(skips));
}

TEST(GpuGradAccumulation, SkippedAndClippedStepsMatchHostBitForBit) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  skips_match_host<Precision<bf16, fp32_master>, AdamW<>>(seed);
  skips_match_host<Precision<fp16, fp32_master>, AdamW<State<q8>>>(seed + 1);  // dynamic scale: backs off
  skips_match_host<Precision<bf16>, Lion<State<bf16>>>(seed + 2);
}

// A non-finite gradient in the last micro-batch: skipped on the device, and the training state
// (test::snapshot: all but the accumulator, which the next first micro-batch overwrites) is as
// it was.
TEST(GpuGradAccumulation, NonFiniteLastMicroBatchSkipsAndChangesNothing) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using P = Precision<bf16, fp32_master>;
  using O = AdamW<State<q8>>;
  constexpr int N = 3;
  ParamStore<P, O, Host, N> host(gpu_model(), Host{}, seed);
  ParamStore<P, O, Cuda, N> gpu(gpu_model(), Cuda{}, seed);
  OptimizerStep<P, O, Cuda, N> gs({}, Cuda{});
  OptimizerStep<P, O, Host, N> hs;
  std::mt19937_64 rng(seed);
  for (int mb = 0; mb < N; ++mb) {
    same_grads(host, gpu, rng, 1.0f);
    gs.accumulate(gpu, mb, N);
  }
  ASSERT_FALSE(gs.step(gpu, {.lr = 1e-3f, .max_grad_norm = 1.0f}).skipped);
  const auto before = test::snapshot(gpu);
  for (int mb = 0; mb < N; ++mb) {
    same_grads(host, gpu, rng, 1.0f);
    if (mb == N - 1) {
      const auto& place = gpu.layout()[rng() % gpu.layout().tensors()];
      const bf16 bad = round_nearest<bf16>((rng() & 1) ? std::numeric_limits<float>::quiet_NaN()
                                                       : std::numeric_limits<float>::infinity());
      ALLOY_CUDA_CHECK(cudaMemcpy(gpu.grads_arena().data() + place.offset + rng() % place.numel, &bad, sizeof(bf16),
                                  cudaMemcpyHostToDevice));
    }
    gs.accumulate(gpu, mb, N);
  }
  const auto stats = gs.step(gpu, {.lr = 1e-3f, .max_grad_norm = 1.0f});
  EXPECT_TRUE(stats.skipped);
  EXPECT_EQ(stats.skipped_steps, 1u);
  EXPECT_EQ(test::snapshot(gpu), before);
}

}  // namespace
