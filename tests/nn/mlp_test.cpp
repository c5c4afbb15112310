// The nn layers through the residual MLP example: gradients against finite differences,
// recomputation bit-identical to keeping activations, convergence of 16-bit precisions.
#include "../../examples/mlp/residual_mlp.hpp"
#include "../optim/reference.hpp"
#include "../support/finite_differences.hpp"
#include "../support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>

namespace {

using namespace alloy;

mlp::Shape tiny() { return {12, 16, 3, 5, 24}; }

// Loss and gradients of one batch at the store's current parameters (no update).
template <class Store>
float loss_and_grads(Store& store, mlp::ResidualMlp& model, const mlp::Batch& b, Workspace<Host>& ws,
                     BackendResources<Host>& res, int checkpoint_every = 0) {
  ws.reset();
  Context<Store> ctx(store, ws, 1.0f, false, 0, 1, 0, checkpoint_every, &res);
  return model.forward_backward(ctx, b);
}

TEST(ResidualMlp, GradientsMatchFiniteDifferences) {
  ALLOY_SEEDED(seed);
  const auto shape = tiny();
  mlp::ResidualMlp model(shape);
  ParamRegistry r;
  model.declare(r);
  using Store = ParamStore<Precision<fp32>, SGD<>, Host>;
  Store store(r, Host{}, seed);
  Workspace<Host> ws;
  BackendResources<Host> res;
  const mlp::TeacherTask task(shape, seed);
  std::mt19937_64 rng(seed);
  const auto batch = task.batch(rng);
  loss_and_grads(store, model, batch, ws, res);
  const auto grads = to_host(store.grads_arena());
  // Central differences in double-checked float: a few elements of every kind of parameter.
  test::expect_gradients_match_finite_differences(
      store, grads,
      {"embed.weight", "embed.bias", "blocks.0.norm.weight", "blocks.1.norm.bias", "blocks.2.up.weight",
       "blocks.1.up.bias", "blocks.0.down.weight", "final_norm.weight", "head.weight", "head.bias"},
      [&] { return loss_and_grads(store, model, batch, ws, res); });
}

template <class P, class Backend, class... Extra>
auto train(std::uint64_t seed, int steps, const mlp::Shape& shape, int micro_batches = 1) {
  using Tr = Trainer<mlp::ResidualMlp, P, Accumulate<2>, AdamW<>, Backend, Extra...>;
  auto trainer = std::make_unique<Tr>(mlp::ResidualMlp(shape),
                                      typename Tr::Config{.schedule = LrSchedule::warmup_cosine(3e-3f, 5, steps),
                                                          .max_grad_norm = 1.0f,
                                                          .seed = seed,
                                                          .micro_batches = micro_batches});
  const mlp::TeacherTask task(shape, seed);
  std::mt19937_64 rng(seed + 1);
  std::vector<StepReport> reports;
  for (int s = 0; s < steps; ++s) reports.push_back(trainer->step([&] { return task.batch(rng); }));
  return std::make_pair(std::move(trainer), reports);
}

TEST(ResidualMlp, CheckpointingGivesTheSameBitsWithLessActivationMemory) {
  ALLOY_SEEDED(seed);
  mlp::Shape shape = tiny();
  shape.blocks = 4;
  auto [kept, r1] = train<Precision<bf16, fp32_master>, Host>(seed, 4, shape, 2);
  auto [recomputed, r2] = train<Precision<bf16, fp32_master>, Host, Checkpointing>(seed, 4, shape, 2);
  auto [every2, r3] = train<Precision<bf16, fp32_master>, Host, CheckpointEvery<2>>(seed, 4, shape, 2);
  for (int s = 0; s < 4; ++s) {
    EXPECT_EQ(r1[s].loss, r2[s].loss);
    EXPECT_EQ(r1[s].grad_norm, r2[s].grad_norm);
    EXPECT_EQ(r1[s].grad_norm, r3[s].grad_norm);
  }
  EXPECT_EQ(test::snapshot(kept->store()), test::snapshot(recomputed->store()));
  EXPECT_EQ(test::snapshot(kept->store()), test::snapshot(every2->store()));
  const auto a = kept->memory().activations_peak, b = recomputed->memory().activations_peak;
  std::printf("activation peak: kept %zu bytes, recomputed %zu bytes, every 2 blocks %zu bytes\n", a, b,
              every2->memory().activations_peak);
  EXPECT_LT(b, a * 3 / 4);
}

// Shape::keep_gelu: blocks that keep GELU's output skip its recomputation in backward. In fp32
// the kept output is the recomputed one, so training gives the same bits; each kept block holds
// its 4 x width values a row until backward, so the activation peak grows by exactly that.
TEST(ResidualMlp, KeepingGelusOutputGivesTheSameBitsInFp32ForItsMemory) {
  ALLOY_SEEDED(seed);
  mlp::Shape shape{12, 16, 3, 5, 40};
  auto [recomputing, r1] = train<Precision<alloy::fp32>, Host>(seed, 4, shape);
  shape.keep_gelu = 2;
  auto [keeping, r2] = train<Precision<alloy::fp32>, Host>(seed, 4, shape);
  for (int s = 0; s < 4; ++s) {
    EXPECT_EQ(r1[s].loss, r2[s].loss) << "step " << s;
    EXPECT_EQ(r1[s].grad_norm, r2[s].grad_norm) << "step " << s;
  }
  EXPECT_EQ(test::snapshot(recomputing->store()), test::snapshot(keeping->store()));
  const std::size_t h = (shape.rows * 4 * shape.width * sizeof(float) + 255) / 256 * 256;
  EXPECT_EQ(keeping->memory().activations_peak, recomputing->memory().activations_peak + 2 * h);
}

// The activation peak under Checkpointing, allocation by allocation. With u = rows x width in
// bf16, n blocks and hidden = 4 width, what is live at the peak (the last block's backward, its
// recomputation and its forward all reach it) is the n blocks' kept inputs, the gradient arriving
// (or, in forward, the block's output), the block's LayerNorm output, its pre-activation (4 u)
// and GELU's output or dPre (4 u): (n + 10) u, plus LayerNorm's row statistics and the scratch of
// its backward. Not among them: the features' compute-dtype copy (converted again for the
// embedding's weight gradient), LayerNorm's dx (written over the gradient from the inner path)
// and up's dx (written where the pre-activation was): (n + 13) u before they went.
TEST(ResidualMlp, CheckpointedPeakIsTheKeptInputsPlusOneBlock) {
  ALLOY_SEEDED(seed);
  const mlp::Shape shape{64, 64, 4, 10, 64};
  auto [trainer, reports] = train<Precision<bf16, fp32_master>, Host, Checkpointing>(seed, 2, shape);
  const std::size_t u = shape.rows * shape.width * sizeof(bf16);
  const auto aligned = [](std::size_t bytes) { return (bytes + 255) / 256 * 256; };
  const std::size_t small = 2 * aligned(shape.rows * sizeof(float)) +
                            aligned((layernorm_backward_scratch_floats(shape.rows, shape.width) + 1) * sizeof(float));
  const std::size_t peak = trainer->memory().activations_peak;
  std::printf("checkpointed activation peak %zu bytes: %.3f u (u = %zu bytes)\n", peak, double(peak) / double(u), u);
  EXPECT_LE(peak, (shape.blocks + 10) * u + small);
  EXPECT_GE(peak, (shape.blocks + 10) * u);
}

// The convergence test of the trainer issue, at a small size: bf16 and fp16 with fp32 master
// weights end within 2% of the fp32 run's loss after the same steps on the same data.
TEST(ResidualMlp, SixteenBitPrecisionsConvergeWithinTwoPercentOfFp32) {
  ALLOY_SEEDED(seed);
  const mlp::Shape shape{32, 32, 2, 8, 128};
  auto mean_tail = [](const std::vector<StepReport>& r) {
    double s = 0;
    for (std::size_t i = r.size() - 20; i < r.size(); ++i) s += r[i].loss;
    return s / 20;
  };
  const double fp32 = mean_tail(train<Precision<alloy::fp32>, Host>(seed, 150, shape).second);
  const double bf16 = mean_tail(train<Precision<alloy::bf16, fp32_master>, Host>(seed, 150, shape).second);
  const double fp16 = mean_tail(train<Precision<alloy::fp16, fp32_master>, Host>(seed, 150, shape).second);
  const double start = train<Precision<alloy::fp32>, Host>(seed, 1, shape).second[0].loss;
  std::printf("mean loss of the last 20 steps: fp32 %.5f bf16 %.5f fp16 %.5f (start %.5f)\n", fp32, bf16, fp16, start);
  EXPECT_LT(fp32, 0.5 * start);
  EXPECT_NEAR(bf16, fp32, 0.02 * fp32);
  EXPECT_NEAR(fp16, fp32, 0.02 * fp32);
}

TEST(ResidualMlp, ABadLabelIsAnErrorThatChangesNothing) {
  auto [trainer, reports] = train<Precision<bf16, fp32_master>, Host>(3, 1, tiny());
  const auto before = test::snapshot(trainer->store());
  std::mt19937_64 rng(1);
  mlp::Batch bad = mlp::TeacherTask(tiny(), 3).batch(rng);
  bad.label[7] = 99;
  try {
    trainer->step([&] { return bad; });
    FAIL() << "no error";
  } catch (const alloy::error& e) {
    EXPECT_NE(std::string(e.what()).find("target 99 at row 7 is outside [0, 5)"), std::string::npos) << e.what();
  }
  EXPECT_EQ(test::snapshot(trainer->store()), before);
  EXPECT_EQ(trainer->steps(), 1u);
}

TEST(Trainer, RuntimeMicroBatchesNeedAnAccumulatorForSixteenBitGradients) {
  using Tr = Trainer<mlp::ResidualMlp, Precision<bf16, fp32_master>, Host>;
  EXPECT_THROW(Tr(mlp::ResidualMlp(tiny()), {.micro_batches = 4}), alloy::error);
  EXPECT_THROW(Tr(mlp::ResidualMlp(tiny()), {.micro_batches = -1}), alloy::error);
  Trainer<mlp::ResidualMlp, Precision<bf16, fp32_master>, Accumulate<2>, Host> ok(mlp::ResidualMlp(tiny()),
                                                                                  {.micro_batches = 5});
  EXPECT_EQ(ok.micro_batches(), 5);
}

}  // namespace

namespace {

// The design's headline composition, exactly as written there, compiles and trains.
TEST(ResidualMlp, TheDesignsExampleCompositionTrains) {
  using Tr = alloy::Trainer<mlp::ResidualMlp, alloy::Precision<alloy::bf16, alloy::fp32_master>, alloy::Accumulate<16>,
                            alloy::Checkpointing, alloy::Host>;
  static_assert(Tr::accumulation_steps == 16 && Tr::recomputes);
  static_assert(std::is_same_v<Tr::compute_type, alloy::bf16> && std::is_same_v<Tr::master_type, float>);
  const mlp::Shape shape{12, 16, 2, 5, 8};
  Tr trainer(mlp::ResidualMlp(shape), {.schedule = alloy::LrSchedule::constant(3e-3f), .seed = 4});
  const mlp::TeacherTask task(shape, 4);
  std::mt19937_64 rng(4);
  const auto first = trainer.step([&] { return task.batch(rng); });
  alloy::StepReport last;
  for (int s = 0; s < 30; ++s) last = trainer.step([&] { return task.batch(rng); });
  EXPECT_LT(last.loss, first.loss);
  EXPECT_EQ(last.skipped_steps, 0u);
}

}  // namespace

namespace {

TEST(ResidualMlp, AWrongSizedBatchIsRefusedBeforeAnythingRuns) {
  auto [trainer, reports] = train<Precision<bf16, fp32_master>, Host>(3, 1, tiny());
  const auto before = test::snapshot(trainer->store());
  std::mt19937_64 rng(1);
  mlp::Batch bad = mlp::TeacherTask(tiny(), 3).batch(rng);
  bad.label.pop_back();  // one label short
  try {
    trainer->step([&]() -> const mlp::Batch& { return bad; });
    FAIL() << "no error";
  } catch (const alloy::error& e) {
    EXPECT_NE(std::string(e.what()).find("one label per row"), std::string::npos) << e.what();
  }
  bad = mlp::TeacherTask(tiny(), 3).batch(rng);
  bad.x.pop_back();  // not a whole number of rows
  EXPECT_THROW(trainer->step([&]() -> const mlp::Batch& { return bad; }), alloy::error);
  EXPECT_EQ(test::snapshot(trainer->store()), before);
  EXPECT_EQ(trainer->steps(), 1u);
}

TEST(PinnedVector, IsAnOrdinaryVectorWhereNothingCanBePinned) {
  alloy::pinned_vector<float> v(1000);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) * 0.5f;
  v.resize(5000, 2.0f);
  EXPECT_EQ(v[999], 499.5f);
  EXPECT_EQ(v[4999], 2.0f);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(v.data()) % 256, 0u);
  std::vector<float> pageable(10);
  EXPECT_FALSE(alloy::is_pinned(pageable.data()));
  EXPECT_FALSE(alloy::is_pinned(nullptr));
}

}  // namespace
