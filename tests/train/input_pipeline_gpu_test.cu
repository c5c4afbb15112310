// The trainer's input pipeline and device-side loss on Cuda: uploads through the copy stream
// arrive intact whether the source is pinned or pageable, across slot reuse and growth, and may be
// overwritten as soon as the micro-batch is over; the loss of nn::SoftmaxCrossEntropy stays on
// the device and reads as the Host computation of the same rows.
#include "../../examples/mlp/residual_mlp.hpp"
#include "../support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

namespace {

using namespace alloy;

template <class T>
struct Copy {
  ALLOY_HOST_DEVICE void operator()(const T& x, T& y) const { y = x; }
};

TEST(GpuInputUploads, EveryMicroBatchSeesItsOwnDataPinnedOrPageable) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  for (int slots : {2, 1}) {
    SCOPED_TRACE(std::to_string(slots) + " slots");
    const Cuda be{stream};
    InputUploads<Cuda> uploads(be, nullptr, slots);
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int mb = 0; mb < 9; ++mb) {
      // Odd sizes that grow (the slots grow) and shrink again.
      const std::size_t n = mb < 6 ? 1001 + 37771 * std::size_t(mb) : 3001;
      std::vector<float> pageable(n);
      for (auto& v : pageable) v = normal(rng);
      pinned_vector<std::int32_t> pinned(n / 3 + 1);
      for (auto& v : pinned) v = static_cast<std::int32_t>(rng());
      EXPECT_TRUE(is_pinned(pinned.data()));
      EXPECT_FALSE(is_pinned(pageable.data()));
      const std::vector<float> want_a = pageable;
      const std::vector<std::int32_t> want_b(pinned.begin(), pinned.end());

      uploads.begin_micro_batch();
      const float* a = uploads.upload(std::span<const float>(pageable));
      const std::int32_t* b = uploads.upload(std::span<const std::int32_t>(pinned.data(), pinned.size()));
      Buffer<float, Cuda> got_a(n, be);
      Buffer<std::int32_t, Cuda> got_b(pinned.size(), be);
      for_each_n(be, n, Copy<float>{}, in(a), out(got_a.data()));
      for_each_n(be, pinned.size(), Copy<std::int32_t>{}, in(b), out(got_b.data()));
      uploads.end_micro_batch();
      // The sources may change the moment the micro-batch is over.
      std::fill(pageable.begin(), pageable.end(), std::numeric_limits<float>::quiet_NaN());
      std::fill(pinned.begin(), pinned.end(), -1);
      EXPECT_EQ(to_host(got_a), want_a) << "micro-batch " << mb << ", " << n << " floats";
      EXPECT_EQ(to_host(got_b), want_b) << "micro-batch " << mb;
    }
    EXPECT_GT(uploads.reserved_bytes(), 0u);
    EXPECT_GT(uploads.staging_bytes(), 0u);
  }
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

TEST(GpuInputUploads, UploadOutsideAMicroBatchIsAnError) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  InputUploads<Cuda> uploads;
  const std::vector<float> v(10, 1.0f);
  EXPECT_THROW(uploads.upload(std::span<const float>(v)), alloy::error);
}

// No slot is an error; more than two is what a step replayed as a CUDA graph takes (a slot per
// micro-batch), and a slot past the count is an error.
TEST(GpuInputUploads, NoSlotOrASlotPastTheCountIsAnError) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  EXPECT_THROW(InputUploads<Cuda>(Cuda{}, nullptr, 0), alloy::error);
  InputUploads<Cuda> three(Cuda{}, nullptr, 3);
  EXPECT_EQ(three.slots(), 3);
  EXPECT_NO_THROW(three.begin_micro_batch_in(2));
  three.end_micro_batch();
  EXPECT_THROW(three.begin_micro_batch_in(3), alloy::error);
}

// A step of one micro-batch takes one input slot (step() has waited for the previous step's
// backward, so the copies do not wait for the slot); two or more micro-batches take two, so that
// each one's copies overlap the previous one's compute.
TEST(GpuInputUploads, OneMicroBatchPerStepTakesOneSlot) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const mlp::Shape shape{256, 32, 1, 10, 1024};  // 1 MiB of features and 4 KiB of labels per micro-batch
  const mlp::TeacherTask task(shape, seed);
  using Tr = Trainer<mlp::ResidualMlp, Precision<bf16, fp32_master>, Accumulate<2>, AdamW<>, Cuda>;
  std::size_t slots[2] = {};
  for (int micro_batches : {1, 2}) {
    Tr trainer(mlp::ResidualMlp(shape), {.seed = seed, .micro_batches = micro_batches});
    std::mt19937_64 rng(seed);
    for (int s = 0; s < 3; ++s) (void)trainer.step([&] { return task.batch(rng); });
    slots[micro_batches - 1] = trainer.memory().input_slots;
  }
  const std::size_t one_slot = shape.rows * shape.inputs * sizeof(float) + shape.rows * sizeof(std::int32_t);
  EXPECT_GE(slots[0], one_slot);
  EXPECT_LT(slots[0], 2 * one_slot);
  EXPECT_EQ(slots[1], 2 * slots[0]);
}

TEST(GpuSoftmaxCrossEntropy, TheLossStaysOnTheDeviceAndReadsAsTheHostOne) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const mlp::Shape shape{24, 32, 1, 37, 203};
  using Tr = Trainer<mlp::ResidualMlp, Precision<bf16, fp32_master>, Accumulate<2>, AdamW<>, Cuda>;
  Tr trainer(mlp::ResidualMlp(shape), {.seed = seed});
  Workspace<Cuda> ws;
  BackendResources<Cuda> resources;
  Tr::context_type ctx(trainer.store(), ws, 1.0f, false, 0, 1, 0, 0, &resources);

  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<bf16> logits(shape.rows * shape.classes);
  for (auto& v : logits) v = bf16(normal(rng));
  std::vector<std::int32_t> targets(shape.rows);
  for (auto& t : targets) t = static_cast<std::int32_t>(rng() % shape.classes);
  Buffer<bf16, Cuda> d_logits(logits.size());
  copy_from_host(d_logits, std::span<const bf16>(logits));
  Buffer<std::int32_t, Cuda> d_targets(targets.size());
  copy_from_host(d_targets, std::span<const std::int32_t>(targets));

  nn::SoftmaxCrossEntropy ce;
  const auto [loss, dlogits] =
      ce.forward_backward(ctx, Activation<const bf16>(d_logits.data(), shape.rows, shape.classes), d_targets.data());
  ASSERT_TRUE(loss.on_device());

  std::vector<float> row_loss(shape.rows);
  std::vector<bf16> host_dlogits(logits.size());
  softmax_cross_entropy(Host{}, logits.data(), targets.data(), shape.rows, shape.classes, row_loss.data(),
                        host_dlogits.data(), 1.0f / shape.rows);
  double want = 0.0;
  for (float l : row_loss) want += l;
  want /= shape.rows;
  EXPECT_NEAR(loss.value(), want, 1e-5 * std::abs(want));
  EXPECT_GT(loss.value(), 0.0f);
}

}  // namespace
