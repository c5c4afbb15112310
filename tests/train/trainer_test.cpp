#include "../../examples/custom_model/teacher_mlp.hpp"
#include "../optim/reference.hpp"
#include "../support/test_support.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

namespace {

using namespace alloy;
using teacher::Batch;
using teacher::StudentMlp;

constexpr int in = 16, hid = 32, out = 4;

// Mean loss of the trained student on a fixed held-out batch, measured without updating.
template <class Tr>
float held_out_loss(Tr& trainer, const Batch& batch) {
  ParamRegistry r;
  StudentMlp probe(in, hid, out);
  probe.declare(r);
  Workspace<Host> ws;
  auto& store = trainer.store();
  Context<typename Tr::store_type> ctx(store, ws, 0.0f, false, 0, 1, 0);  // seed 0: gradients are written as zero
  const float loss = trainer.model().forward_backward(ctx, batch);
  store.zero_grads();
  return loss;
}

template <class P, int N = 1>
std::pair<float, std::vector<StepReport>> train(std::uint64_t seed, int steps, int rows = 64,
                                                const std::vector<int>& poisoned = {}) {
  using Tr = Trainer<StudentMlp, P, Accumulate<N>, AdamW<>, Host>;
  const teacher::Teacher t(in, hid, out, seed);
  std::mt19937_64 rng(seed + 1);
  Tr trainer(StudentMlp(in, hid, out), {.optimizer = {.weight_decay = 0.0f},
                                        .schedule = LrSchedule::warmup_cosine(3e-3f, 10, steps),
                                        .max_grad_norm = 1.0f,
                                        .seed = seed});
  std::vector<StepReport> reports;
  for (int s = 0; s < steps; ++s) {
    Batch b = t.batch(rows, rng);
    if (std::find(poisoned.begin(), poisoned.end(), s) != poisoned.end()) b.x[rng() % b.x.size()] = std::nanf("");
    reports.push_back(trainer.step([&] { return b; }));
  }
  std::mt19937_64 eval_rng(999);
  return {held_out_loss(trainer, t.batch(512, eval_rng)), reports};
}

TEST(Trainer, TrainsAModelThatOwnsItsForwardAndBackward) {
  ALLOY_SEEDED(seed);
  const auto [loss, reports] = train<Precision<bf16, fp32_master>>(seed, 200);
  EXPECT_LT(reports.back().loss, 0.2f * reports.front().loss);
  EXPECT_LT(loss, 0.2f * reports.front().loss);
  EXPECT_EQ(reports.back().step, 200u);
  EXPECT_EQ(reports.back().applied_steps, 200u);
  EXPECT_EQ(reports.back().skipped_steps, 0u);
}

// bf16 and fp16 (dynamic loss scale) with fp32 master weights end where fp32 ends.
TEST(Trainer, SixteenBitComputeConvergesLikeFp32) {
  ALLOY_SEEDED(seed);
  const float full = train<Precision<fp32>>(seed, 200).first;
  const float brain = train<Precision<bf16, fp32_master>>(seed, 200).first;
  const float half = train<Precision<fp16, fp32_master>>(seed, 200).first;
  std::printf("held-out loss after 200 steps: fp32 %.5f bf16 %.5f fp16 %.5f\n", full, brain, half);
  EXPECT_NEAR(brain, full, 0.05f * full);
  EXPECT_NEAR(half, full, 0.05f * full);
}

TEST(Trainer, AccumulatingMicroBatchesEqualsOneLargeBatch) {
  ALLOY_SEEDED(seed);
  using P = Precision<fp32>;
  const teacher::Teacher t(in, hid, out, seed);
  std::mt19937_64 rng(seed);
  std::vector<Batch> whole;
  for (int s = 0; s < 5; ++s) whole.push_back(t.batch(64, rng));
  Trainer<StudentMlp, P, Accumulate<4>, SGD<>, Host> split(StudentMlp(in, hid, out), {.seed = seed});
  Trainer<StudentMlp, P, SGD<>, Host> one(StudentMlp(in, hid, out), {.seed = seed});
  for (const Batch& b : whole) {
    std::vector<Batch> parts(4);
    for (int p = 0; p < 4; ++p) {
      parts[p].x.assign(b.x.begin() + p * 16 * in, b.x.begin() + (p + 1) * 16 * in);
      parts[p].y.assign(b.y.begin() + p * 16 * out, b.y.begin() + (p + 1) * 16 * out);
    }
    const auto rs = split.step(std::span<const Batch>(parts));
    const auto ro = one.step([&] { return b; });
    EXPECT_NEAR(rs.loss, ro.loss, 1e-5f * ro.loss);
    EXPECT_NEAR(rs.grad_norm, ro.grad_norm, 1e-5 * ro.grad_norm);
  }
  const auto a = to_host(split.store().params_arena()), b = to_host(one.store().params_arena());
  for (std::size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-6f + 1e-5f * std::fabs(b[i])) << i;
}

TEST(Trainer, NaNInTheDataSkipsThoseStepsAndTrainingGoesOn) {
  ALLOY_SEEDED(seed);
  const std::vector<int> poisoned = {3, 40, 41, 120};
  const auto [loss, reports] = train<Precision<fp16, fp32_master>>(seed, 200, 64, poisoned);
  for (int s = 0; s < 200; ++s) {
    const bool bad = std::find(poisoned.begin(), poisoned.end(), s) != poisoned.end();
    EXPECT_EQ(reports[s].skipped, bad) << "step " << s;
  }
  EXPECT_EQ(reports.back().skipped_steps, poisoned.size());
  EXPECT_EQ(reports.back().applied_steps, 200u - poisoned.size());
  // The fp16 scale backed off once per poisoned step.
  EXPECT_EQ(reports.back().overflows, poisoned.size());
  EXPECT_LT(loss, 0.2f * reports.front().loss);
}

TEST(Trainer, ReportsTheScheduleTheScaleAndItsMemory) {
  using Tr = Trainer<StudentMlp, Precision<fp16, fp32_master>, Accumulate<2>, AdamW<State<q8>>, Host>;
  static_assert(Tr::accumulation_steps == 2);
  static_assert(std::is_same_v<Tr::compute_type, fp16> && std::is_same_v<Tr::master_type, float>);
  static_assert(Tr::scaler_type::dynamic);
  static_assert(Tr::bytes_per_param == 2 + 2 + 4 + 4 + 2 + 8.0 / 256);
  const teacher::Teacher t(in, hid, out, 1);
  std::mt19937_64 rng(1);
  Tr trainer(StudentMlp(in, hid, out), {.schedule = LrSchedule::warmup_linear(1e-3f, 4, 10)});
  const auto r = trainer.step([&] { return t.batch(8, rng); });
  EXPECT_FLOAT_EQ(r.lr, 1e-3f / 4);
  EXPECT_EQ(r.loss_scale, 65536.0f);
  EXPECT_GT(r.seconds, 0.0);
  const auto m = trainer.memory();
  const std::size_t padded = trainer.store().layout().padded_numel();
  EXPECT_EQ(m.arenas.params, padded * 2);
  EXPECT_EQ(m.arenas.grad_accumulator, padded * 4);
  EXPECT_GT(m.activations_peak, 0u);
  EXPECT_GE(m.backend.peak_bytes, m.arenas.total() + m.activations_peak);
}

// An Accumulate<N> trainer run with one micro-batch per step never reads its fp32 accumulator, so
// it does not allocate one; it trains to the bytes of a trainer whose type has no accumulator.
TEST(Trainer, OneMicroBatchPerStepAllocatesNoAccumulator) {
  using WithAcc = Trainer<StudentMlp, Precision<bf16, fp32_master>, Accumulate<4>, AdamW<>, Host>;
  using WithoutAcc = Trainer<StudentMlp, Precision<bf16, fp32_master>, AdamW<>, Host>;
  static_assert(WithAcc::store_type::has_accumulator && !WithoutAcc::store_type::has_accumulator);
  ALLOY_SEEDED(seed);
  WithAcc one(StudentMlp(in, hid, out), {.max_grad_norm = 1.0f, .seed = seed, .micro_batches = 1});
  WithoutAcc plain(StudentMlp(in, hid, out), {.max_grad_norm = 1.0f, .seed = seed});
  WithAcc four(StudentMlp(in, hid, out), {.seed = seed});
  EXPECT_EQ(one.memory().arenas.grad_accumulator, 0u);
  EXPECT_FALSE(one.store().accumulator_allocated());
  EXPECT_EQ(four.memory().arenas.grad_accumulator, four.store().layout().padded_numel() * 4);
  EXPECT_EQ(one.memory().arenas.total(), plain.memory().arenas.total());
  const teacher::Teacher t(in, hid, out, seed);
  std::mt19937_64 rng(seed);
  for (int s = 0; s < 5; ++s) {
    const Batch b = t.batch(16, rng);
    const auto r1 = one.step([&] { return b; });
    const auto r2 = plain.step([&] { return b; });
    ASSERT_EQ(r1.grad_norm, r2.grad_norm) << "step " << s;
  }
  EXPECT_EQ(test::snapshot(one.store()), test::snapshot(plain.store()));
  // Driving the step engine by hand as if gradients were accumulated is refused, not a crash.
  EXPECT_MENTIONS(test::message_of([&] { one.optimizer().accumulate(one.store(), 0, 2); }), "built without one");
}

// A model with stage() (train/model.hpp): the trainer stages each micro-batch right before its
// forward_backward, with the same batch.
struct StagedStudent : StudentMlp {
  StagedStudent() : StudentMlp(in, hid, out) {}
  std::vector<std::string>* log = nullptr;
  const Batch* staged = nullptr;
  template <class Ctx>
  void stage(Ctx&, const Batch& b) {
    staged = &b;
    log->push_back("stage " + std::to_string(b.x.size()));
  }
  template <class Ctx>
  float forward_backward(Ctx& ctx, const Batch& b) {
    log->push_back(staged == &b ? "forward of the staged batch" : "forward of another batch");
    return StudentMlp::forward_backward(ctx, b);
  }
};

TEST(Trainer, StagesEachMicroBatchRightBeforeItsForward) {
  ALLOY_SEEDED(seed);
  using Tr = Trainer<StagedStudent, Precision<bf16, fp32_master>, Accumulate<3>, AdamW<>, Host>;
  std::vector<std::string> log;
  StagedStudent model;
  model.log = &log;
  Tr trainer(std::move(model), {.seed = seed});
  const teacher::Teacher t(in, hid, out, seed);
  std::mt19937_64 rng(seed);
  const std::vector<Batch> batches = {t.batch(5, rng), t.batch(6, rng), t.batch(7, rng)};
  (void)trainer.step(std::span<const Batch>(batches));
  const std::vector<std::string> want = {"stage 80",  "forward of the staged batch",
                                         "stage 96",  "forward of the staged batch",
                                         "stage 112", "forward of the staged batch"};
  EXPECT_EQ(log, want);
}

TEST(Trainer, AStepGraphIsRefusedOnTheHostBackend) {
  using Tr = Trainer<StagedStudent, Precision<bf16, fp32_master>, AdamW<>, Host>;
  static_assert(!Tr::can_replay_graphs);
  std::vector<std::string> log;
  StagedStudent model;
  model.log = &log;
  EXPECT_MENTIONS(test::message_of([&] { Tr trainer(std::move(model), {.graph = true}); }), "needs the Cuda backend");
}

// run(): a loop of step() on Host (nothing staged ahead): the same reports and bytes, every
// batch pulled once per step run, and a callback returning false stops it.
TEST(Trainer, RunIsALoopOfStepsThatTheCallbackCanStop) {
  ALLOY_SEEDED(seed);
  using Tr = Trainer<StudentMlp, Precision<bf16, fp32_master>, Accumulate<2>, AdamW<>, Host>;
  const teacher::Teacher t(in, hid, out, seed);
  std::mt19937_64 rng(seed + 1);
  std::vector<Batch> batches;
  for (int i = 0; i < 18; ++i) batches.push_back(t.batch(9 + i, rng));
  const typename Tr::Config config{
      .schedule = LrSchedule::warmup_cosine(3e-3f, 2, 7), .max_grad_norm = 0.5f, .seed = seed};
  Tr looped(StudentMlp(in, hid, out), config), ran(StudentMlp(in, hid, out), config);
  std::vector<StepReport> want;
  auto it = batches.cbegin();
  for (int s = 0; s < 7; ++s) want.push_back(looped.step(it));

  std::size_t pulled = 0;
  const auto source = [&]() -> const Batch& { return batches[pulled++]; };
  std::vector<StepReport> got;
  EXPECT_EQ(ran.run(source, 4, [&](const StepReport& r) { got.push_back(r); }), 4u);  // void: all 4
  EXPECT_EQ(pulled, 8u);
  EXPECT_EQ(ran.run(source, 10,
                    [&](const StepReport& r) {  // bool: stops after its third
                      got.push_back(r);
                      return got.size() < 7;
                    }),
            3u);
  EXPECT_EQ(pulled, 14u) << "on Host, run() pulls only what the steps it runs take";
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].loss, want[i].loss) << i;
    EXPECT_EQ(got[i].grad_norm, want[i].grad_norm) << i;
    EXPECT_EQ(got[i].step, i + 1);
  }
  const auto same_bytes = [](const auto& a, const auto& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0;
  };
  EXPECT_TRUE(same_bytes(to_host(ran.store().params_arena()), to_host(looped.store().params_arena())));
  EXPECT_TRUE(same_bytes(to_host(ran.store().master_arena()), to_host(looped.store().master_arena())));
  EXPECT_EQ(ran.run(source, 0, [](const StepReport&) { return true; }), 0u);
  // step() or run() from inside on_step is refused, and nothing more runs.
  const auto steps = ran.steps();
  const auto pulled_before = pulled;
  EXPECT_MENTIONS(test::message_of([&] { ran.run(source, 3, [&](const StepReport&) { (void)ran.step(source); }); }),
                  "called from run()'s on_step");
  EXPECT_MENTIONS(
      test::message_of([&] { ran.run(source, 3, [&](const StepReport&) { ran.run(source, 1, [](auto&) {}); }); }),
      "Trainer::run: called from run()'s on_step");
  EXPECT_EQ(ran.steps(), steps + 2) << "one step each, then the refusal";
  EXPECT_EQ(pulled, pulled_before + 4);
}

TEST(Trainer, RejectsTheWrongNumberOfBatches) {
  Trainer<StudentMlp, Precision<fp32>, Accumulate<3>, Host> trainer(StudentMlp(in, hid, out));
  std::vector<Batch> two(2);
  EXPECT_THROW(trainer.step(std::span<const Batch>(two)), alloy::error);
  EXPECT_EQ(trainer.steps(), 0u);
}

TEST(LrSchedule, WarmupThenLinearOrCosineDecayToTheFloor) {
  const auto lin = LrSchedule::warmup_linear(1.0f, 10, 110, 0.1f);
  EXPECT_FLOAT_EQ(lin.lr_at(0), 0.1f);
  EXPECT_FLOAT_EQ(lin.lr_at(9), 1.0f);
  EXPECT_FLOAT_EQ(lin.lr_at(10), 1.0f);
  EXPECT_FLOAT_EQ(lin.lr_at(60), 0.55f);
  EXPECT_FLOAT_EQ(lin.lr_at(110), 0.1f);
  EXPECT_FLOAT_EQ(lin.lr_at(1000), 0.1f);
  const auto cos = LrSchedule::warmup_cosine(2.0f, 0, 100);
  EXPECT_FLOAT_EQ(cos.lr_at(0), 2.0f);
  EXPECT_FLOAT_EQ(cos.lr_at(50), 1.0f);
  EXPECT_NEAR(cos.lr_at(99), 2.0f * 0.5f * (1 + std::cos(3.14159265 * 0.99)), 1e-6);
  EXPECT_FLOAT_EQ(LrSchedule::constant(0.5f).lr_at(12345), 0.5f);
}

TEST(Workspace, BumpAllocatesAlignedAndMergesToThePeak) {
  alloy::MemoryTracker tracker;
  Workspace<Host> ws(Host{}, &tracker);
  auto* a = ws.allocate<float>(10);
  auto* b = ws.allocate<double>(1000);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(a) % 256, 0u);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b) % 256, 0u);
  EXPECT_EQ(ws.bytes_in_use(), 256u + 8192u);
  ws.reset();
  EXPECT_EQ(ws.bytes_in_use(), 0u);
  EXPECT_EQ(ws.peak_bytes(), 256u + 8192u);
  EXPECT_EQ(ws.reserved_bytes(), 256u + 8192u);  // merged into one block of the peak
  ws.allocate<char>(8000);
  EXPECT_EQ(ws.reserved_bytes(), 256u + 8192u);  // fits: no new block
}

// A block filled past its end is left with room to spare while the workspace grows; the merged
// block holds only what the allocations need end to end, and the same sequence fits it again.
TEST(Workspace, MergesToWhatTheAllocationsNeedNotWhatGrowthSkipped) {
  Workspace<Host> ws;
  const auto replay = [&] {
    ws.allocate<std::byte>(256);
    const auto m = ws.mark();
    ws.allocate<std::byte>(1024);
    ws.release(m);
    ws.allocate<std::byte>(512);
    ws.allocate<std::byte>(768);  // the 1024-byte block has 512 left: skipped while growing
  };
  replay();
  EXPECT_EQ(ws.bytes_in_use(), 256u + 512u + 768u);
  EXPECT_EQ(ws.peak_bytes(), 256u + 512u + 768u) << "the most the live allocations took at once";
  EXPECT_GT(ws.reserved_bytes(), 256u + 512u + 768u);
  ws.reset();
  EXPECT_EQ(ws.reserved_bytes(), 256u + 512u + 768u) << "one block of the peak, no skipped ends";
  replay();
  EXPECT_EQ(ws.reserved_bytes(), 256u + 512u + 768u) << "the same sequence fits without growing";
  EXPECT_EQ(ws.peak_bytes(), 256u + 512u + 768u);
}

TEST(Workspace, ReleaseFreesWhatWasAllocatedAfterTheMark) {
  Workspace<Host> ws;
  auto* a = ws.allocate<float>(100);
  const auto m = ws.mark();
  auto* b = ws.allocate<float>(1000);
  ws.release(m);
  EXPECT_EQ(ws.bytes_in_use(), 512u);
  auto* c = ws.allocate<float>(1000);
  EXPECT_EQ(c, b) << "released memory is reused";
  EXPECT_NE(a, c);
  EXPECT_EQ(ws.peak_bytes(), 512u + 4096u);
}

}  // namespace
