// The activation workspace on Cuda as one range of addresses growing in place
// (backend/cuda/growing_range.hpp): the range keeps its data across growth, holds a multiple of the
// mapping granularity and gives it all back; the workspace's allocations lie end to end in it,
// so a trainer's first steps take no more memory than its later ones.
#include "../../examples/mlp/residual_mlp.hpp"
#include "../support/test_support.hpp"

#include <alloy/backend/cuda/growing_range.hpp>
#include <alloy/memory/workspace.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

namespace {

using namespace alloy;

TEST(GrowingDeviceRange, KeepsItsDataAsItGrowsAndGivesEverythingBack) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  ASSERT_TRUE(detail::GrowingDeviceRange::supported()) << "the H200 and its driver manage virtual memory";
  MemoryTracker tracker;
  std::mt19937_64 rng(seed);
  std::vector<std::uint8_t> expected;
  {
    detail::GrowingDeviceRange range(Cuda{}, &tracker);
    const std::size_t g = range.granularity();
    ASSERT_GT(g, 0u);
    EXPECT_EQ(range.size(), 0u);
    std::byte* const base = range.data();
    for (std::size_t want : {std::size_t(1), 3 * g + 17, 3 * g + 18, 11 * g - 1, 40 * g + 5}) {
      const std::size_t before = range.size();
      range.grow_to(want);
      EXPECT_EQ(range.data(), base) << "the range moved";
      EXPECT_GE(range.size(), want);
      EXPECT_EQ(range.size() % g, 0u);
      EXPECT_LT(range.size() - std::max(want, before), g) << "grew more than the granularity past the need";
      EXPECT_EQ(tracker.stats().current_bytes, range.size());
      // New bytes written; every byte so far read back, across the chunks' boundaries.
      std::vector<std::uint8_t> fresh(range.size() - before);
      for (auto& b : fresh) b = static_cast<std::uint8_t>(rng());
      ASSERT_EQ(cudaMemcpy(base + before, fresh.data(), fresh.size(), cudaMemcpyHostToDevice), cudaSuccess);
      expected.insert(expected.end(), fresh.begin(), fresh.end());
      std::vector<std::uint8_t> got(range.size());
      ASSERT_EQ(cudaMemcpy(got.data(), base, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(got, expected);
    }
    const std::size_t held = range.size();
    EXPECT_THROW(range.grow_to(std::size_t(1) << 50), cuda_error);
    EXPECT_EQ(range.size(), held) << "a failed growth changed the range";
  }
  EXPECT_EQ(tracker.stats().current_bytes, 0u) << "memory not given back";
}

TEST(GpuWorkspace, AllocationsLieEndToEndInOneRangeOfThePeak) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  MemoryTracker tracker;
  Workspace<Cuda> ws(Cuda{}, &tracker);
  auto* a = ws.allocate<float>(1000);  // 4096 bytes
  const auto m = ws.mark();
  auto* b = ws.allocate<std::byte>(5u << 20);
  ASSERT_TRUE(ws.grows_in_place());
  EXPECT_EQ(reinterpret_cast<std::byte*>(b), reinterpret_cast<std::byte*>(a) + 4096);
  EXPECT_TRUE(ws.keeps(m, a, 4096));
  EXPECT_FALSE(ws.keeps(m, b, 1));
  ws.release(m);
  auto* c = ws.allocate<std::byte>(1u << 20);
  EXPECT_EQ(c, b) << "released memory is reused";
  auto* d = ws.allocate<std::byte>(64u << 20);
  EXPECT_EQ(d, c + (1u << 20));
  const std::size_t peak = 4096 + (1u << 20) + (64u << 20);
  EXPECT_EQ(ws.peak_bytes(), peak);
  const std::size_t reserved = ws.reserved_bytes();
  EXPECT_GE(reserved, peak);
  EXPECT_LT(reserved - peak, std::size_t(64) << 20) << "more than one mapping granularity over the peak";
  EXPECT_EQ(tracker.stats().peak_bytes, reserved) << "growth held more than the range at some point";
  ASSERT_EQ(cudaMemset(d, 0x5a, 64u << 20), cudaSuccess);
  std::byte last{};
  ASSERT_EQ(cudaMemcpy(&last, d + (64u << 20) - 1, 1, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(last, std::byte{0x5a});
  ws.reset();
  ws.allocate<std::byte>(peak);
  EXPECT_EQ(ws.reserved_bytes(), reserved) << "the same bytes again made it grow";
}

// A trainer's first step (its workspace growing from nothing) holds no more than a later step: the
// growth is in place, not a second block beside the first.
TEST(GpuWorkspace, TheFirstStepPeaksNoHigherThanTheNext) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using Tr = Trainer<mlp::ResidualMlp, Precision<bf16, fp32_master>, AdamW<>, Cuda>;
  const mlp::Shape shape{256, 512, 4, 100, 2048};
  Tr trainer(mlp::ResidualMlp(shape), {.max_grad_norm = 1.0f, .seed = seed});
  const mlp::TeacherTask task(shape, seed);
  std::mt19937_64 rng(seed);
  (void)trainer.step([&] { return task.batch(rng); });
  trainer.synchronize();
  const std::size_t first = trainer.memory().backend.peak_bytes;
  trainer.reset_memory_peak();
  for (int s = 0; s < 2; ++s) (void)trainer.step([&] { return task.batch(rng); });
  trainer.synchronize();
  const std::size_t later = trainer.memory().backend.peak_bytes;
  std::printf("peak: first step %zu bytes, later steps %zu bytes, workspace %zu bytes\n", first, later,
              trainer.memory().workspace_reserved);
  EXPECT_EQ(first, later);
}

}  // namespace
