// The hand-written LayeredModel on Cuda: the trainer's recomputation gives the bits of keeping
// every activation, with a lower activation peak, and the Cuda run gives the Host run's bits.
#include "../optim/reference.hpp"
#include "../support/test_support.hpp"
#include "layered_model.hpp"

#include <gtest/gtest.h>

#include <memory>

namespace {

using namespace alloy;

constexpr std::size_t features = 301, rows = 257, blocks = 9;

// No clipping: pass 1's sum of squares may differ in its last bits between the backends, and
// the clip coefficient would carry that into the update.
template <class Backend, class... Extra>
auto train(std::uint64_t seed, int steps) {
  using Tr = Trainer<layered::Model, Precision<bf16, fp32_master>, Accumulate<3>, AdamW<>, Backend, Extra...>;
  auto trainer = std::make_unique<Tr>(layered::Model(features, blocks),
                                      typename Tr::Config{.schedule = LrSchedule::warmup_cosine(3e-3f, 2, steps),
                                                          .seed = seed});
  std::mt19937_64 rng(seed + 1);
  std::vector<StepReport> reports;
  for (int s = 0; s < steps; ++s) {
    reports.push_back(trainer->step([&] { return layered::random_batch(rows, features, rng); }));
  }
  return std::make_pair(std::move(trainer), reports);
}

TEST(GpuLayeredModel, TrainerRecomputesWithTheSameBitsAndLessActivationMemory) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  auto [kept, r0] = train<Cuda>(seed, 4);
  auto [every1, r1] = train<Cuda, Checkpointing>(seed, 4);
  auto [every2, r2] = train<Cuda, CheckpointEvery<2>>(seed, 4);
  for (int s = 0; s < 4; ++s) {
    EXPECT_EQ(r0[s].grad_norm, r1[s].grad_norm) << s;
    EXPECT_EQ(r0[s].grad_norm, r2[s].grad_norm) << s;
  }
  EXPECT_EQ(test::snapshot(kept->store()), test::snapshot(every1->store()));
  EXPECT_EQ(test::snapshot(kept->store()), test::snapshot(every2->store()));
  const auto a = kept->memory().activations_peak, b = every1->memory().activations_peak,
             c = every2->memory().activations_peak;
  std::printf("activation peak on Cuda: kept %zu, Checkpointing %zu, CheckpointEvery<2> %zu bytes\n", a, b, c);
  EXPECT_LT(b, a);
  EXPECT_LT(c, a);
}

TEST(GpuLayeredModel, CudaGivesTheHostsBits) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  auto [gpu, rg] = train<Cuda, Checkpointing>(seed, 3);
  auto [host, rh] = train<Host>(seed, 3);
  for (int s = 0; s < 3; ++s) EXPECT_NEAR(rg[s].loss, rh[s].loss, 1e-5 * rh[s].loss) << s;
  EXPECT_EQ(test::snapshot(gpu->store()), test::snapshot(host->store()));
}

}  // namespace
