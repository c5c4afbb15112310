// The Trainer on Cuda against the same Trainer on Host, fed the same batches.
#include "../../examples/custom_model/teacher_mlp.hpp"
#include "../optim/reference.hpp"
#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>

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

namespace {

using namespace alloy;

// 2 steps, move-construct, 2 steps, move-assign over another trainer, 2 steps on Cuda: the bytes
// of 6 steps straight on Cuda, and close to the same 6 steps on Host.
TEST(GpuTrainer, MovedTrainerTrainsOnBitExactly) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using P = Precision<bf16, fp32_master>;
  using Gpu = Trainer<teacher::StudentMlp, P, Accumulate<2>, AdamW<State<q8>>, Cuda>;
  using Cpu = Trainer<teacher::StudentMlp, P, Accumulate<2>, AdamW<State<q8>>, Host>;
  const auto data = gpu_batches(seed, 12);
  const Gpu::Config config{.schedule = LrSchedule::warmup_cosine(3e-3f, 2, 6), .max_grad_norm = 1.0f, .seed = seed};
  Cpu host(teacher::StudentMlp(16, 32, 4), {.schedule = config.schedule, .max_grad_norm = 1.0f, .seed = seed});
  Gpu straight(teacher::StudentMlp(16, 32, 4), config);
  std::optional<Gpu> first(std::in_place, teacher::StudentMlp(16, 32, 4), config);
  test::mirror(host.store(), straight.store());
  test::mirror(host.store(), first->store());
  auto ih = data.begin(), is = data.begin(), im = data.begin();
  for (int s = 0; s < 6; ++s) {
    host.step(ih);
    straight.step(is);
  }
  first->step(im);
  first->step(im);
  Gpu second(std::move(*first));
  first.reset();
  second.step(im);
  second.step(im);
  Gpu third(teacher::StudentMlp(16, 32, 4), {.seed = seed + 1});
  third.step(data.begin());
  third = std::move(second);
  third.step(im);
  const auto last = third.step(im);
  EXPECT_EQ(last.applied_steps + last.skipped_steps, 6u);
  EXPECT_EQ(test::snapshot(third.store()), test::snapshot(straight.store()));
  EXPECT_EQ(third.memory().backend.current_bytes, straight.memory().backend.current_bytes);
  const auto hm = to_host(host.store().master_arena()), gm = to_host(third.store().master_arena());
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < hm.size(); ++i) {
    diff += std::pow(double(gm[i]) - hm[i], 2);
    norm += std::pow(double(hm[i]), 2);
  }
  EXPECT_LT(std::sqrt(diff / norm), 1e-2);
}

std::vector<char> file_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Weights exported from Cuda are Host's bytes, and a file imports into both to the same bytes.
template <class P, class O>
void weights_match_host(std::uint64_t seed, int in, int hid, int out) {
  using Gpu = Trainer<teacher::StudentMlp, P, O, Cuda>;
  using Cpu = Trainer<teacher::StudentMlp, P, O, Host>;
  SCOPED_TRACE(Gpu::signature());
  const test::TempDir dir("alloy_gpu_weights");
  const teacher::Teacher t(in, hid, out, seed);
  std::mt19937_64 rng(seed);
  Gpu gpu(teacher::StudentMlp(in, hid, out), {.max_grad_norm = 1.0f, .seed = seed});
  for (int s = 0; s < 3; ++s) {
    const auto b = t.batch(29, rng);
    gpu.step([&] { return b; });
  }
  Cpu host(teacher::StudentMlp(in, hid, out));
  test::mirror(gpu.store(), host.store());
  for (const WeightsDtype dtype : {WeightsDtype::fp32, WeightsDtype::bf16, WeightsDtype::fp16}) {
    const std::string name(weights_dtype_name(dtype));
    gpu.export_weights(dir / ("gpu_" + name), dtype);
    host.export_weights(dir / ("host_" + name), dtype);
    EXPECT_EQ(file_bytes(dir / ("gpu_" + name)), file_bytes(dir / ("host_" + name))) << name;
  }
  for (const std::string name : {"fp32", "bf16", "fp16"}) {
    Gpu g(teacher::StudentMlp(in, hid, out), {.seed = seed + 1});
    Cpu h(teacher::StudentMlp(in, hid, out));
    test::mirror(g.store(), h.store());
    g.import_weights(dir / ("host_" + name));
    h.import_weights(dir / ("gpu_" + name));
    EXPECT_EQ(test::snapshot(g.store()), test::snapshot(h.store())) << name;
    const auto b = t.batch(29, rng);
    EXPECT_EQ(g.step([&] { return b; }).step, 1u);  // and training goes on from there
  }
}

TEST(GpuWeights, ExportAndImportGiveHostsBytes) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  weights_match_host<Precision<bf16, fp32_master>, AdamW<>>(seed, 13, 37, 5);
  weights_match_host<Precision<fp16>, SGD<>>(seed, 17, 9, 3);
  weights_match_host<Precision<fp32>, AdamW<State<q8>>>(seed, 21, 300, 7);
}

}  // namespace
