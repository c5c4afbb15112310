// The reliability suite's device parts (docs/reliability.md):
//  - fault soak: 1000 steps on Cuda with NaN or an infinity written into one random gradient
//    element at random steps; each such step is skipped, leaves every byte of the training state
//    as it was, backs the loss scale off as configured, and names the parameter; training
//    converges anyway;
//  - determinism: three runs with the same seed give the same bits, on Cuda and on Host.
#include "../../examples/custom_model/teacher_mlp.hpp"
#include "../../examples/mlp/residual_mlp.hpp"
#include "../optim/reference.hpp"
#include "../support/test_support.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <cstdlib>
#include <exception>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace alloy;

// A micro-batch, and what to break in it: after the model's own backward, gradient element
// `element` of parameter `param` becomes `value` (param < 0: nothing).
struct FaultyBatch {
  teacher::Batch batch;
  int param = -1;
  std::size_t element = 0;
  float value = 0.0f;
};

// Wraps a model that writes its own gradients and breaks one gradient element on request, on
// the device, ordered after the backward that wrote it.
class FaultyStudent {
 public:
  using batch_type = FaultyBatch;
  FaultyStudent(int in, int hid, int out) : inner_(in, hid, out) {}

  void declare(ParamRegistry& r) {
    inner_.declare(r);
    for (const auto& spec : r.specs()) numel_.push_back(static_cast<std::size_t>(spec.numel()));
  }
  std::size_t tensors() const { return numel_.size(); }
  std::size_t numel(int k) const { return numel_[static_cast<std::size_t>(k)]; }

  template <class Ctx>
  float forward_backward(Ctx& ctx, const FaultyBatch& b) {
    const float loss = inner_.forward_backward(ctx, b.batch);
    if (b.param >= 0) {
      using G = typename Ctx::grad_type;
      auto grad = ctx.grad(ParamHandle{static_cast<std::uint32_t>(b.param)});
      const G v = static_cast<G>(b.value);
      ALLOY_CUDA_CHECK(
          cudaMemcpyAsync(grad.data + b.element, &v, sizeof(G), cudaMemcpyHostToDevice, ctx.backend().stream));
      ALLOY_CUDA_CHECK(cudaStreamSynchronize(ctx.backend().stream));  // v lives on this frame
    }
    return loss;
  }

 private:
  teacher::StudentMlp inner_;
  std::vector<std::size_t> numel_;
};

int soak_steps() {
  const char* s = std::getenv("ALLOY_SOAK_STEPS");
  return s ? std::atoi(s) : 1000;
}

TEST(Reliability, FaultSoakSkipsEveryPoisonedStepAndConverges) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  constexpr int micro = 2;
  using Tr = Trainer<FaultyStudent, Precision<fp16, fp32_master>, Accumulate<micro>, AdamW<>, Cuda>;
  DynamicLossScaleConfig scaler;
  scaler.init_scale = 1024.0f;
  scaler.max_scale = 4096.0f;  // far from fp16's own overflow for this model
  // The faults drive a random walk of the scale: halved at each (1 step in 20), doubled after
  // growth_interval clean steps. With growth_interval 10 and min_scale 1 (ten halvings below the
  // start), 3.9% of 1000-step runs backed off below min_scale by chance (a simulation of this
  // loop's rule, 200,000 runs), an error that failed the test once (session 10). Doubling after 5
  // clean steps and a floor twenty halvings down: none in 400,000 simulated runs.
  scaler.growth_interval = 5;
  scaler.min_scale = 1.0f / 1024.0f;
  const int steps = soak_steps();
  Tr trainer(FaultyStudent(16, 32, 4), {.scaler = scaler,
                                        .schedule = LrSchedule::warmup_cosine(3e-3f, 20, steps, 1e-4f),
                                        .max_grad_norm = 1.0f,
                                        .seed = seed});
  const FaultyStudent& model = trainer.model();
  const teacher::Teacher task(16, 32, 4, seed);
  std::mt19937_64 rng(seed);
  const float poisons[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity()};

  // The scaler as specified (hysteresis 1): halve on a fault, double after growth_interval clean
  // steps in a row, at most max_scale.
  float expected_scale = scaler.init_scale;
  int clean_in_a_row = 0;
  int faults = 0;
  double first_losses = 0, last_losses = 0;
  const int window = steps / 10;
  for (int s = 0; s < steps; ++s) {
    const bool poisoned = s > 0 && rng() % 20 == 0;
    std::vector<FaultyBatch> batches(micro);
    for (auto& b : batches) b.batch = task.batch(64, rng);
    std::string name;
    if (poisoned) {
      auto& b = batches[rng() % micro];
      b.param = static_cast<int>(rng() % model.tensors());
      b.element = rng() % model.numel(b.param);
      b.value = poisons[rng() % 3];
      name = trainer.store().registry().specs()[static_cast<std::size_t>(b.param)].name;
    }
    const auto before = poisoned ? test::snapshot(trainer.store()) : std::vector<std::uint8_t>{};
    StepReport r;
    try {
      r = trainer.step(std::span<const FaultyBatch>(batches));
    } catch (const std::exception& e) {  // with the step, the faults so far and the seed (SCOPED_TRACE)
      FAIL() << "step " << s << (poisoned ? " (poisoned)" : "") << " threw after " << faults << " faults, the scale at "
             << expected_scale << ": " << e.what();
    }
    ASSERT_EQ(r.loss_scale, expected_scale) << "step " << s;
    if (poisoned) {
      ++faults;
      ASSERT_TRUE(r.skipped) << "step " << s << ": a non-finite gradient in '" << name << "' was applied";
      EXPECT_EQ(r.first_non_finite, name) << "step " << s;
      ASSERT_EQ(test::snapshot(trainer.store()), before) << "step " << s << ": a skipped step changed the state";
      expected_scale *= scaler.backoff_factor;
      clean_in_a_row = 0;
    } else {
      ASSERT_FALSE(r.skipped) << "step " << s << " skipped without a fault (first non-finite: '" << r.first_non_finite
                              << "')";
      EXPECT_TRUE(r.first_non_finite.empty());
      if (++clean_in_a_row == scaler.growth_interval) {
        expected_scale = std::min(expected_scale * scaler.growth_factor, scaler.max_scale);
        clean_in_a_row = 0;
      }
    }
    ASSERT_EQ(trainer.loss_scale(), expected_scale) << "after step " << s;
    ASSERT_EQ(r.skipped_steps, static_cast<std::uint64_t>(faults));
    ASSERT_EQ(r.overflows, static_cast<std::uint64_t>(faults));
    ASSERT_EQ(r.applied_steps, static_cast<std::uint64_t>(s + 1 - faults));
    if (!poisoned && s < window) first_losses += r.loss;
    if (!poisoned && s >= steps - window) last_losses += r.loss;
  }
  EXPECT_GT(faults, steps / 40) << "the soak injected too few faults to mean anything";
  // Converges anyway: the clean steps' mean loss in the last tenth is under a third of the first
  // tenth's (the sums cover nearly the same number of steps).
  EXPECT_LT(last_losses, first_losses / 3) << "first tenth " << first_losses << ", last tenth " << last_losses;
}

// One run of the residual MLP (cuBLASLt products, LayerNorm, GELU, softmax cross-entropy, the
// accumulated AdamW step with clipping and stochastic rounding): every byte of the training state
// and every step's loss and norm.
template <class Backend>
std::pair<std::vector<std::uint8_t>, std::vector<double>> residual_run(std::uint64_t seed, int steps,
                                                                       const mlp::Shape& shape) {
  using Tr = Trainer<mlp::ResidualMlp, Precision<bf16, fp32_master>, Accumulate<2>, AdamW<>, Backend>;
  Tr trainer(mlp::ResidualMlp(shape), {.schedule = LrSchedule::warmup_cosine(3e-3f, 5, steps),
                                       .max_grad_norm = 1.0f,
                                       .param_rounding = Rounding::stochastic,
                                       .seed = seed});
  const mlp::TeacherTask task(shape, seed);
  std::mt19937_64 rng(seed + 1);
  std::vector<double> trace;
  for (int s = 0; s < steps; ++s) {
    const StepReport r = trainer.step([&] { return task.batch(rng); });
    trace.push_back(r.loss);
    trace.push_back(r.grad_norm);
  }
  return {test::snapshot(trainer.store()), trace};
}

template <class Backend>
void three_runs_agree(std::uint64_t seed, const mlp::Shape& shape) {
  const auto first = residual_run<Backend>(seed, 100, shape);
  for (int run = 2; run <= 3; ++run) {
    const auto again = residual_run<Backend>(seed, 100, shape);
    EXPECT_EQ(again.second, first.second) << "run " << run << ": the losses or norms differ";
    EXPECT_TRUE(again.first == first.first) << "run " << run << ": the training state differs";
  }
}

TEST(Reliability, ThreeRunsOnCudaAreBitIdentical) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  three_runs_agree<Cuda>(seed, {96, 192, 3, 50, 384});
}

TEST(Reliability, ThreeRunsOnHostAreBitIdentical) {
  ALLOY_SEEDED(seed);
  three_runs_agree<Host>(seed, {24, 32, 2, 10, 48});
}

}  // namespace
