// The Trainer on Cuda against the same Trainer on Host, fed the same batches.
#include "../../examples/custom_model/teacher_mlp.hpp"
#include "../optim/reference.hpp"
#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <filesystem>

namespace {

using namespace alloy;

template <class P, int N>
void lockstep(std::uint64_t seed) {
  using Host_ = Trainer<teacher::StudentMlp, P, Accumulate<N>, AdamW<>, Host>;
  using Cuda_ = Trainer<teacher::StudentMlp, P, Accumulate<N>, AdamW<>, Cuda>;
  const typename Host_::Config config{
      .schedule = LrSchedule::warmup_cosine(3e-3f, 5, 60), .max_grad_norm = 1.0f, .seed = seed};
  Host_ host(teacher::StudentMlp(16, 32, 4), config);
  Cuda_ gpu(teacher::StudentMlp(16, 32, 4), {config.optimizer, config.scaler, config.schedule, config.max_grad_norm,
                                             config.param_rounding, config.seed});
  test::mirror(host.store(), gpu.store());
  const teacher::Teacher t(16, 32, 4, seed);
  std::mt19937_64 rng(seed);
  for (int s = 0; s < 60; ++s) {
    const teacher::Batch b = t.batch(64, rng);
    const auto rh = host.step([&] { return b; });
    const auto rg = gpu.step([&] { return b; });
    ASSERT_FALSE(rh.skipped || rg.skipped);
    // tanh and the float sums differ in their last bits between host and device.
    ASSERT_NEAR(rg.loss, rh.loss, 2e-3f * rh.loss + 1e-6f) << "step " << s;
    ASSERT_EQ(rg.lr, rh.lr);
    ASSERT_EQ(rg.loss_scale, rh.loss_scale);
  }
  EXPECT_LT(gpu.memory().activations_peak, 1u << 20);
  const auto hm = to_host(host.store().params_arena()), gm = to_host(gpu.store().params_arena());
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < hm.size(); ++i) {
    diff += std::pow(double(to_float(gm[i])) - to_float(hm[i]), 2);
    norm += std::pow(double(to_float(hm[i])), 2);
  }
  EXPECT_LT(std::sqrt(diff / norm), 1e-2);
}

TEST(GpuTrainer, Bf16MasterTracksHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  lockstep<Precision<bf16, fp32_master>, 1>(seed);
}

TEST(GpuTrainer, Fp16DynamicScaleWithAccumulationTracksHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  lockstep<Precision<fp16, fp32_master>, 4>(seed);
}

TEST(GpuTrainer, Fp32AccumulatingInPlaceTracksHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  lockstep<Precision<fp32>, 3>(seed);
}

}  // namespace

namespace {

using namespace alloy;

std::vector<teacher::Batch> gpu_batches(std::uint64_t seed, int count) {
  const teacher::Teacher t(16, 32, 4, seed);
  std::mt19937_64 rng(seed);
  std::vector<teacher::Batch> out;
  for (int i = 0; i < count; ++i) out.push_back(t.batch(32, rng));
  return out;
}

TEST(GpuCheckpoint, ResumeOnTheDeviceIsBitExactAndFilesMoveBetweenBackends) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using P = Precision<fp16, fp32_master>;
  using Gpu = Trainer<teacher::StudentMlp, P, Accumulate<2>, AdamW<State<q8>>, Cuda>;
  using Cpu = Trainer<teacher::StudentMlp, P, Accumulate<2>, AdamW<State<q8>>, Host>;
  const test::TempDir dir("alloy_gpu_ckpt");
  const auto data = gpu_batches(seed, 24);
  Gpu straight(teacher::StudentMlp(16, 32, 4), {.max_grad_norm = 1.0f, .seed = seed});
  auto it = data.begin();
  for (int s = 0; s < 6; ++s) straight.step(it);
  straight.save(dir / "gpu.safetensors");
  Gpu resumed(teacher::StudentMlp(16, 32, 4), {.max_grad_norm = 1.0f, .seed = seed + 1});
  resumed.load(dir / "gpu.safetensors");
  auto it2 = it;
  for (int s = 0; s < 6; ++s) {
    const auto a = straight.step(it);
    const auto b = resumed.step(it2);
    ASSERT_EQ(a.loss, b.loss) << s;
  }
  EXPECT_EQ(test::snapshot(resumed.store()), test::snapshot(straight.store()));
  // The same file loads into a Host trainer with the same bytes.
  Cpu host(teacher::StudentMlp(16, 32, 4));
  straight.save(dir / "gpu.safetensors");
  host.load(dir / "gpu.safetensors");
  EXPECT_EQ(test::snapshot(host.store()), test::snapshot(straight.store()));
}

}  // namespace
