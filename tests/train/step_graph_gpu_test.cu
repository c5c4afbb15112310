// Config::graph: a step captured as a CUDA graph and replayed gives the bits of the same steps
// run eagerly (the losses, every parameter, the optimizer state), through a changing learning
// rate, accumulation, skipped steps and a changing loss scale, Checkpointing, q8 state and
// batches whose shape changes; what a replay cannot repeat is refused with an error that names
// it, and leaves the trainer as it was. Trainer::run stages each step ahead with the same bits.
#include "../../examples/gpt2/gpt2_model.hpp"
#include "../../examples/mlp/residual_mlp.hpp"
#include "../support/test_support.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

// A model without stage(): Config::graph is refused at construction, naming what is missing.
namespace step_graph_test {
struct NoStage {
  using batch_type = mlp::Batch;
  alloy::nn::Linear layer{"layer", 4, 4};
  void declare(alloy::ParamRegistry& r) { layer.declare(r); }
  template <class Ctx>
  alloy::Loss forward_backward(Ctx&, const batch_type&) {
    return alloy::Loss(0.0f);
  }
};
}  // namespace step_graph_test

namespace {

using namespace alloy;

using Bf16 = Precision<bf16, fp32_master>;

template <class Store>
std::vector<std::byte> bytes_of(Store& store) {
  std::vector<std::byte> out;
  const auto add = [&](const auto& arena) {
    const auto h = to_host(arena);
    const auto* p = reinterpret_cast<const std::byte*>(h.data());
    out.insert(out.end(), p, p + h.size() * sizeof(h[0]));
  };
  add(store.params_arena());
  if constexpr (Store::has_master) add(store.master_arena());
  for (int k = 0; k < Store::slots; ++k) add(store.state_arena(k));
  return out;
}

std::vector<mlp::Batch> make_batches(const mlp::Shape& s, std::uint64_t seed, int count) {
  const mlp::TeacherTask task(s, seed);
  std::mt19937_64 rng(seed + 1);
  std::vector<mlp::Batch> out;
  for (int i = 0; i < count; ++i) out.push_back(task.batch(rng));
  return out;
}

template <class Tr>
typename Tr::Config config_of(int micro_batches, bool graph, std::uint64_t seed) {
  typename Tr::Config c{.schedule = LrSchedule::warmup_cosine(3e-3f, 3, 12), .max_grad_norm = 0.5f, .seed = seed};
  c.micro_batches = micro_batches;
  c.graph = graph;
  return c;
}

// The same batches through an eager trainer and a graph trainer: every report and, at the end,
// every byte of the arenas agree. `batch_of(step, micro_batch)` picks each batch.
template <class Tr, class Pick>
GraphStats run_both(const mlp::Shape& shape, int micro_batches, int steps, Pick batch_of,
                    typename Tr::Config eager_config, typename Tr::Config graph_config,
                    std::vector<StepReport>* reports = nullptr) {
  Tr eager(mlp::ResidualMlp(shape), eager_config);
  Tr graphed(mlp::ResidualMlp(shape), graph_config);
  for (int s = 0; s < steps; ++s) {
    int mb = 0;
    int mb2 = 0;
    const StepReport a = eager.step([&]() -> const mlp::Batch& { return batch_of(s, mb++); });
    const StepReport b = graphed.step([&]() -> const mlp::Batch& { return batch_of(s, mb2++); });
    EXPECT_EQ(mb, micro_batches);
    EXPECT_EQ(mb2, micro_batches);
    EXPECT_EQ(a.loss, b.loss) << "step " << s;
    EXPECT_EQ(a.grad_norm, b.grad_norm) << "step " << s;
    EXPECT_EQ(a.lr, b.lr) << "step " << s;
    EXPECT_EQ(a.skipped, b.skipped) << "step " << s;
    EXPECT_EQ(a.loss_scale, b.loss_scale) << "step " << s;
    EXPECT_EQ(a.applied_steps, b.applied_steps) << "step " << s;
    EXPECT_FALSE(a.replayed);
    if (reports) reports->push_back(b);
  }
  eager.synchronize();
  graphed.synchronize();
  EXPECT_TRUE(bytes_of(eager.store()) == bytes_of(graphed.store())) << "the arenas differ after " << steps << " steps";
  EXPECT_EQ(eager.graph_stats().replays, 0u);
  return graphed.graph_stats();
}

TEST(GpuStepGraph, ReplaysGiveTheEagerStepsBitsThroughAChangingRate) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using Tr = Trainer<mlp::ResidualMlp, Bf16, Accumulate<3>, AdamW<>, Cuda>;
  const mlp::Shape shape{48, 64, 3, 10, 96};
  for (int n : {1, 3}) {
    SCOPED_TRACE(std::to_string(n) + " micro-batches");
    const auto batches = make_batches(shape, seed, 3 * n);
    const auto pick = [&](int s, int mb) -> const mlp::Batch& {
      return batches[std::size_t(s * n + mb) % batches.size()];
    };
    const GraphStats g = run_both<Tr>(shape, n, 8, pick, config_of<Tr>(n, false, seed), config_of<Tr>(n, true, seed));
    // The first step runs eagerly (a new key), the second is captured, the rest replay it.
    EXPECT_EQ(g.eager, 1u);
    EXPECT_EQ(g.captures, 1u);
    EXPECT_EQ(g.replays, 6u);
  }
}

TEST(GpuStepGraph, ReportsWhichStepsReplayed) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using Tr = Trainer<mlp::ResidualMlp, Bf16, Accumulate<3>, AdamW<>, Cuda>;
  const mlp::Shape shape{48, 64, 2, 10, 96};
  const auto batches = make_batches(shape, seed, 4);
  Tr t(mlp::ResidualMlp(shape), config_of<Tr>(1, true, seed));
  std::size_t i = 0;
  std::vector<bool> replayed;
  for (int s = 0; s < 5; ++s)
    replayed.push_back(t.step([&]() -> const mlp::Batch& { return batches[i++ % 4]; }).replayed);
  EXPECT_EQ(replayed, (std::vector<bool>{false, false, true, true, true}));
}

TEST(GpuStepGraph, ABatchOfAnotherShapeRunsEagerlyAndIsCapturedAgain) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using Tr = Trainer<mlp::ResidualMlp, Bf16, Accumulate<3>, AdamW<>, Cuda>;
  const mlp::Shape big{48, 64, 3, 10, 96};
  mlp::Shape small = big;
  small.rows = 37;
  const auto a = make_batches(big, seed, 4), b = make_batches(small, seed + 7, 4);
  // Steps 0-3 of 96 rows, 4-6 of 37, 7-9 of 96 again: both shapes share one model's parameters.
  const auto pick = [&](int s, int) -> const mlp::Batch& {
    return (s >= 4 && s < 7) ? b[std::size_t(s) % b.size()] : a[std::size_t(s) % a.size()];
  };
  const GraphStats g = run_both<Tr>(big, 1, 10, pick, config_of<Tr>(1, false, seed), config_of<Tr>(1, true, seed));
  // 96: eager, capture, replay x2; 37: eager, capture, replay; 96: eager, capture, replay.
  EXPECT_EQ(g.eager, 3u);
  EXPECT_EQ(g.captures, 3u);
  EXPECT_EQ(g.replays, 4u);
}

TEST(GpuStepGraph, SkippedStepsAndAChangingLossScaleKeepTheBits) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using Tr = Trainer<mlp::ResidualMlp, Precision<fp16, fp32_master>, Accumulate<2>, AdamW<>, Cuda>;
  const mlp::Shape shape{48, 64, 2, 10, 96};
  const auto batches = make_batches(shape, seed, 6);
  const auto pick = [&](int s, int mb) -> const mlp::Batch& { return batches[std::size_t(2 * s + mb) % 6]; };
  // A scale that overflows fp16 at first (skipped steps, backing off) and grows every 3 steps.
  auto cfg = [&](bool graph) {
    auto c = config_of<Tr>(2, graph, seed);
    c.scaler.init_scale = 16777216.0f;  // 2^24, its largest
    c.scaler.growth_interval = 4;
    return c;
  };
  std::vector<StepReport> reports;
  const GraphStats g = run_both<Tr>(shape, 2, 24, pick, cfg(false), cfg(true), &reports);
  std::size_t skipped = 0, scale_changes = 0, replayed_after_a_change = 0;
  for (std::size_t i = 0; i < reports.size(); ++i) {
    skipped += reports[i].skipped;
    if (i > 0 && reports[i].loss_scale != reports[i - 1].loss_scale) ++scale_changes;
    if (i > 0 && reports[i].replayed && scale_changes > 0) ++replayed_after_a_change;
  }
  EXPECT_GT(skipped, 0u) << "the first scale overflows fp16";
  EXPECT_GT(scale_changes, 1u);
  EXPECT_GT(replayed_after_a_change, 0u) << "a step at a new scale was captured and replayed";
  EXPECT_GT(g.replays, 0u);
}

TEST(GpuStepGraph, CheckpointingAndQ8StateKeepTheBits) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const mlp::Shape shape{48, 64, 4, 10, 96};
  const auto batches = make_batches(shape, seed, 6);
  const auto pick = [&](int s, int mb) -> const mlp::Batch& { return batches[std::size_t(2 * s + mb) % 6]; };
  {
    SCOPED_TRACE("Checkpointing");
    using Tr = Trainer<mlp::ResidualMlp, Bf16, Accumulate<2>, AdamW<>, Cuda, Checkpointing>;
    const GraphStats g = run_both<Tr>(shape, 2, 6, pick, config_of<Tr>(2, false, seed), config_of<Tr>(2, true, seed));
    EXPECT_EQ(g.replays, 4u);
  }
  {
    SCOPED_TRACE("q8 state");
    using Tr = Trainer<mlp::ResidualMlp, Bf16, Accumulate<2>, AdamW<State<q8>>, Cuda>;
    const GraphStats g = run_both<Tr>(shape, 2, 6, pick, config_of<Tr>(2, false, seed), config_of<Tr>(2, true, seed));
    EXPECT_EQ(g.replays, 4u);
  }
}

// GPT-2 (tiny): the embedding's token groups change with every batch while the launches stay;
// targets left out (ignore_index) change the head's divisor, which is noted: a new key.
TEST(GpuStepGraph, Gpt2ReplaysThroughChangingTokensAndIgnoredTargets) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using Tr = Trainer<gpt2::Gpt2, Bf16, AdamW<>, Cuda>;
  const gpt2::Config c{256, 256, 64, 2, 4, 64, true};
  std::mt19937_64 rng(seed);
  std::vector<gpt2::Batch> batches(6);
  for (std::size_t i = 0; i < batches.size(); ++i) {
    auto& b = batches[i];
    b.tokens.resize(3 * c.seq);
    b.targets.resize(3 * c.seq);
    for (auto& t : b.tokens) t = static_cast<std::int32_t>(rng() % 256);
    for (auto& t : b.targets) t = static_cast<std::int32_t>(rng() % 256);
    // Batches 3 and 4 leave out 5 and 17 rows: two new divisors.
    if (i == 3 || i == 4) {
      for (std::size_t r = 0; r < (i == 3 ? 5u : 17u); ++r) b.targets[(r * 37) % b.targets.size()] = -1;
    }
  }
  typename Tr::Config cfg{.schedule = LrSchedule::warmup_cosine(1e-3f, 2, 8), .max_grad_norm = 1.0f, .seed = seed};
  Tr eager(gpt2::Gpt2(c), cfg);
  cfg.graph = true;
  Tr graphed(gpt2::Gpt2(c), cfg);
  std::vector<bool> replayed;
  for (int s = 0; s < 8; ++s) {
    const gpt2::Batch& b = batches[std::size_t(s) % batches.size()];
    const StepReport x = eager.step([&]() -> const gpt2::Batch& { return b; });
    const StepReport y = graphed.step([&]() -> const gpt2::Batch& { return b; });
    EXPECT_EQ(x.loss, y.loss) << "step " << s;
    EXPECT_EQ(x.grad_norm, y.grad_norm) << "step " << s;
    replayed.push_back(y.replayed);
  }
  eager.synchronize();
  graphed.synchronize();
  EXPECT_TRUE(bytes_of(eager.store()) == bytes_of(graphed.store()));
  // 0 eager, 1 captured, 2 replayed; 3 and 4 new divisors, eager; 5 eager (4's key before it);
  // 6 captured; 7 replayed.
  EXPECT_EQ(replayed, (std::vector<bool>{false, false, true, false, false, false, false, true}));
  EXPECT_EQ(graphed.graph_stats().captures, 2u);
}

// graph_memsets_as_kernels: the small memsets of a graph (1-, 2- and 4-byte elements, a 2-D one
// with a pitch, at unaligned offsets) become kernel nodes that write the same bytes in the same
// place in the graph's order (a copy after them reads what they wrote); a large memset stays.
TEST(GpuStepGraph, SmallMemsetsBecomeKernelNodesWritingTheSameBytes) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  constexpr std::size_t bytes = 16384;
  std::mt19937_64 rng(seed);
  std::vector<unsigned char> before(bytes);
  for (auto& b : before) b = static_cast<unsigned char>(rng());
  Buffer<unsigned char, Cuda> buf(bytes), copy(64);
  ALLOY_CUDA_CHECK(cudaMemcpy(buf.data(), before.data(), bytes, cudaMemcpyHostToDevice));

  struct Set {
    std::size_t offset, pitch, width, height;
    unsigned value, element_size;
  };
  const unsigned v = static_cast<unsigned>(rng());
  const std::vector<Set> sets = {
      {68, 0, 1, 1, v, 4},                    // cuBLASLt's kind: one 4-byte element
      {130, 38, 3, 5, v >> 7, 2},             // 2-D: 5 rows of 3 halves, 38 bytes apart
      {3, 0, 7, 1, v >> 3, 1},                // 7 bytes from an odd address
      {8192, 0, 1536, 1, v ^ 0x5a5a5a5a, 4},  // 6144 bytes: over the limit, stays a memset
  };
  std::vector<unsigned char> want = before;
  for (const Set& m : sets) {
    for (std::size_t r = 0; r < m.height; ++r) {
      for (std::size_t c = 0; c < m.width; ++c) {
        for (unsigned b = 0; b < m.element_size; ++b) {
          want[m.offset + r * m.pitch + c * m.element_size + b] = static_cast<unsigned char>(m.value >> (8 * b));
        }
      }
    }
  }

  cudaGraph_t raw = nullptr;
  ALLOY_CUDA_CHECK(cudaGraphCreate(&raw, 0));
  CudaGraph graph(raw);
  cudaGraphNode_t last = nullptr;
  for (const Set& m : sets) {
    cudaMemsetParams p{};
    p.dst = buf.data() + m.offset;
    p.pitch = m.pitch;
    p.value = m.value;
    p.elementSize = m.element_size;
    p.width = m.width;
    p.height = m.height;
    cudaGraphNode_t node = nullptr;
    ALLOY_CUDA_CHECK(cudaGraphAddMemsetNode(&node, raw, last ? &last : nullptr, last ? 1 : 0, &p));
    last = node;
  }
  // After them all: a copy of bytes 64..127 (what the first two wrote, and what they did not).
  cudaGraphNode_t copy_node = nullptr;
  ALLOY_CUDA_CHECK(
      cudaGraphAddMemcpyNode1D(&copy_node, raw, &last, 1, copy.data(), buf.data() + 64, 64, cudaMemcpyDeviceToDevice));

  EXPECT_EQ(graph_memsets_as_kernels(raw), 3u);
  std::size_t count = 0;
  ALLOY_CUDA_CHECK(cudaGraphGetNodes(raw, nullptr, &count));
  std::vector<cudaGraphNode_t> nodes(count);
  ALLOY_CUDA_CHECK(cudaGraphGetNodes(raw, nodes.data(), &count));
  int kernels = 0, memsets = 0, roots = 0;
  for (cudaGraphNode_t n : nodes) {
    cudaGraphNodeType t{};
    ALLOY_CUDA_CHECK(cudaGraphNodeGetType(n, &t));
    kernels += t == cudaGraphNodeTypeKernel;
    memsets += t == cudaGraphNodeTypeMemset;
    std::size_t deps = 0;
    ALLOY_CUDA_CHECK(cudaGraphNodeGetDependencies(n, nullptr, nullptr, &deps));
    roots += deps == 0;
  }
  EXPECT_EQ(count, 5u);
  EXPECT_EQ(kernels, 3);
  EXPECT_EQ(memsets, 1);
  EXPECT_EQ(roots, 1) << "the chain of dependencies is kept: one node starts it";

  const CudaGraphExec exec = instantiate(graph);
  CudaStream stream = make_cuda_stream();
  ALLOY_CUDA_CHECK(cudaGraphLaunch(exec.get(), stream.get()));
  ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream.get()));
  std::vector<unsigned char> got(bytes), copied(64);
  ALLOY_CUDA_CHECK(cudaMemcpy(got.data(), buf.data(), bytes, cudaMemcpyDeviceToHost));
  ALLOY_CUDA_CHECK(cudaMemcpy(copied.data(), copy.data(), 64, cudaMemcpyDeviceToHost));
  std::size_t differ = 0;
  for (std::size_t i = 0; i < bytes; ++i) differ += got[i] != want[i];
  EXPECT_EQ(differ, 0u) << "bytes other than the memsets' own";
  EXPECT_TRUE(std::equal(copied.begin(), copied.end(), want.begin() + 64)) << "the copy ran before the kernels wrote";
}

// Trainer::run with Config::graph stages step k + 1 (its copies queued on the copy stream, behind
// step k's reads of the same slots) before the host waits for step k. Every batch is another one,
// so a copy that overwrote a slot before step k had read it (the MLP reads its features at the
// start of forward and again at the end of backward) would change step k's loss or gradients:
// the reports and every byte match a loop of eager steps. A source handing out references (an
// iterator) and one returning batches by value (held by the staged step), 1 and 3 micro-batches.
template <class Tr, class Source>
void expect_run_equals_a_step_loop(const mlp::Shape& shape, int n, int steps, const std::vector<mlp::Batch>& batches,
                                   Source source, typename Tr::Config config, int replays) {
  auto eager_config = config;
  eager_config.graph = false;
  Tr looped(mlp::ResidualMlp(shape), eager_config);
  std::vector<StepReport> want;
  auto it = batches.cbegin();
  for (int s = 0; s < steps; ++s) want.push_back(looped.step(it));
  Tr ran(mlp::ResidualMlp(shape), config);
  std::vector<StepReport> got;
  EXPECT_EQ(ran.run(source, std::uint64_t(steps), [&](const StepReport& r) { got.push_back(r); }),
            std::uint64_t(steps));
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].loss, want[i].loss) << "step " << i;
    EXPECT_EQ(got[i].grad_norm, want[i].grad_norm) << "step " << i;
    EXPECT_EQ(got[i].loss_scale, want[i].loss_scale) << "step " << i;
    EXPECT_EQ(got[i].skipped, want[i].skipped) << "step " << i;
    EXPECT_EQ(got[i].step, i + 1);
  }
  looped.synchronize();
  ran.synchronize();
  EXPECT_TRUE(bytes_of(looped.store()) == bytes_of(ran.store())) << "the arenas differ after " << steps << " steps";
  if (replays >= 0) {
    EXPECT_EQ(ran.graph_stats().replays, std::uint64_t(replays)) << n << " micro-batches";
  } else {
    EXPECT_GT(ran.graph_stats().replays, 0u);
  }
}

TEST(GpuStepGraph, RunStagesTheNextStepAheadWithTheBitsOfAStepLoop) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using Tr = Trainer<mlp::ResidualMlp, Bf16, Accumulate<3>, AdamW<>, Cuda>;
  const mlp::Shape shape{200, 256, 3, 10, 1000};  // 800 KB of pinned features a batch
  const int steps = 9;
  for (int n : {1, 3}) {
    SCOPED_TRACE(std::to_string(n) + " micro-batches");
    const auto batches = make_batches(shape, seed + std::uint64_t(n), steps * n);
    {
      SCOPED_TRACE("by reference");
      expect_run_equals_a_step_loop<Tr>(shape, n, steps, batches, batches.cbegin(), config_of<Tr>(n, true, seed),
                                        steps - 2);
    }
    {
      SCOPED_TRACE("by value");
      std::size_t i = 0;
      const auto copies = [&]() -> mlp::Batch { return batches[i++]; };
      expect_run_equals_a_step_loop<Tr>(shape, n, steps, batches, copies, config_of<Tr>(n, true, seed), steps - 2);
      EXPECT_EQ(i, batches.size()) << "nothing pulled past the last step";
    }
  }
}

// A dynamic loss scale changes at a step's decision, after the next step was staged: the launch
// takes the new scale (a new key: eager, captured, replayed), as a loop of steps does.
TEST(GpuStepGraph, RunThroughSkippedStepsAndAChangingLossScale) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using Tr = Trainer<mlp::ResidualMlp, Precision<fp16, fp32_master>, Accumulate<2>, AdamW<>, Cuda>;
  const mlp::Shape shape{48, 64, 2, 10, 96};
  const int steps = 20;
  const auto batches = make_batches(shape, seed, 2 * steps);
  auto c = config_of<Tr>(2, true, seed);
  c.scaler.init_scale = 16777216.0f;  // overflows fp16 at first: skipped steps, backing off
  c.scaler.growth_interval = 4;
  expect_run_equals_a_step_loop<Tr>(shape, 2, steps, batches, batches.cbegin(), c, -1);
}

// A batch that fails its checks while being staged ahead: the step before it finishes and is
// reported, then the error propagates, and the trainer is as after that step; it trains on.
// A callback that returns false stops the run: the step staged next is dropped.
TEST(GpuStepGraph, RunReportsTheStepBeforeABatchThatFailsAndStopsWhenTold) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using Tr = Trainer<mlp::ResidualMlp, Bf16, Accumulate<2>, AdamW<>, Cuda>;
  const mlp::Shape shape{48, 64, 2, 10, 96};
  auto batches = make_batches(shape, seed, 12);
  Tr looped(mlp::ResidualMlp(shape), config_of<Tr>(1, false, seed));
  auto it = batches.cbegin();
  for (int s = 0; s < 5; ++s) (void)looped.step(it);
  looped.synchronize();

  std::vector<mlp::Batch> with_bad(batches.begin(), batches.begin() + 5);
  with_bad.push_back(batches[5]);
  with_bad.back().label.pop_back();  // step 6's batch: one label short
  Tr ran(mlp::ResidualMlp(shape), config_of<Tr>(1, true, seed));
  std::vector<std::uint64_t> reported;
  try {
    (void)ran.run(with_bad.cbegin(), 10, [&](const StepReport& r) { reported.push_back(r.step); });
    ADD_FAILURE() << "the short batch was not refused";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("labels"), std::string::npos) << e.what();
  }
  EXPECT_EQ(reported, (std::vector<std::uint64_t>{1, 2, 3, 4, 5}));
  EXPECT_EQ(ran.steps(), 5u);
  ran.synchronize();
  EXPECT_TRUE(bytes_of(looped.store()) == bytes_of(ran.store())) << "not as after the five good steps";

  // Trains on: steps 6 and 7 from the good batches 5 and 6, then a callback that stops after one
  // more step of a run of 10, with step 9's batch (index 8) pulled ahead and dropped.
  std::size_t pulled = 5;
  const auto source = [&]() -> const mlp::Batch& { return batches[pulled++]; };
  EXPECT_EQ(ran.run(source, 2, [](const StepReport&) {}), 2u);
  EXPECT_EQ(pulled, 7u);
  EXPECT_EQ(ran.run(source, 10, [](const StepReport&) { return false; }), 1u);
  EXPECT_EQ(pulled, 9u) << "one step's batches pulled ahead";
  // A step() from inside on_step is refused (the next step is staged already): step 9 (batch 9)
  // ran, step 10's batch (10) was staged and is dropped.
  try {
    (void)ran.run(source, 10, [&](const StepReport&) { (void)ran.step(source); });
    ADD_FAILURE() << "step() inside on_step was not refused";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("called from run()'s on_step"), std::string::npos) << e.what();
  }
  EXPECT_EQ(pulled, 11u);
  EXPECT_EQ(ran.steps(), 9u);
  for (int s = 0; s < 3; ++s) (void)looped.step(it);  // batches 5, 6, 7
  ++it;                                               // batch 8, which the stopped run dropped
  (void)looped.step(it);                              // batch 9
  looped.synchronize();
  ran.synchronize();
  EXPECT_TRUE(bytes_of(looped.store()) == bytes_of(ran.store()));
}

// A model that stages its batch but also uploads in forward: a replay would not repeat that.
struct UploadsInForward : mlp::ResidualMlp {
  using mlp::ResidualMlp::ResidualMlp;
  template <class Ctx>
  auto input(Ctx& ctx, const mlp::Batch& b) {
    (void)nn::upload_targets(ctx, b.label, 10);
    return mlp::ResidualMlp::input(ctx, b);
  }
};

// A model that waits for its stream inside forward: a capture cannot hold that.
struct SynchronizesInForward : mlp::ResidualMlp {
  using mlp::ResidualMlp::ResidualMlp;
  template <class Ctx>
  auto input(Ctx& ctx, const mlp::Batch& b) {
    auto y = mlp::ResidualMlp::input(ctx, b);
    ALLOY_CUDA_CHECK(cudaStreamSynchronize(ctx.backend().stream));
    return y;
  }
};

// A model that allocates a buffer of its own in forward, every step: eagerly that is allowed; in
// a capture the allocation is refused at once (the memory would belong to the graph).
struct AllocatesInForward : mlp::ResidualMlp {
  using mlp::ResidualMlp::ResidualMlp;
  template <class Ctx>
  auto input(Ctx& ctx, const mlp::Batch& b) {
    scratch = Buffer<float, Cuda>(257, ctx.backend());  // the old one is freed once the new one exists
    return mlp::ResidualMlp::input(ctx, b);
  }
  Buffer<float, Cuda> scratch;
};

template <class Model>
void expect_refused_leaving_the_trainer_as_it_was(const std::string& needle, std::uint64_t seed) {
  using Tr = Trainer<Model, Bf16, Accumulate<2>, AdamW<>, Cuda>;
  const mlp::Shape shape{48, 64, 2, 10, 96};
  const auto batches = make_batches(shape, seed, 2);
  Tr t(Model(shape), config_of<Tr>(1, true, seed));
  std::size_t i = 0;
  const auto next = [&]() -> const mlp::Batch& { return batches[i++ % 2]; };
  try {
    (void)t.step(next);  // eager: a forward that uploads is refused here already
    t.synchronize();
    const auto before = bytes_of(t.store());
    const auto steps = t.steps();
    try {
      (void)t.step(next);  // captured
      ADD_FAILURE() << "the capture was not refused";
    } catch (const error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      t.synchronize();
      EXPECT_EQ(t.steps(), steps);
      EXPECT_TRUE(bytes_of(t.store()) == before);
    }
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  // The trainer still trains without a graph's help afterwards.
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST(GpuStepGraph, AnUploadInForwardIsRefused) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  expect_refused_leaving_the_trainer_as_it_was<UploadsInForward>("stage(ctx, batch)", seed);
}

TEST(GpuStepGraph, ASynchronizationInForwardFailsTheCaptureAndChangesNothing) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  expect_refused_leaving_the_trainer_as_it_was<SynchronizesInForward>("capture of the step", seed);
}

TEST(GpuStepGraph, AnAllocationInForwardIsRefusedAsItHappens) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  expect_refused_leaving_the_trainer_as_it_was<AllocatesInForward>("being captured as a CUDA graph", seed);
}

TEST(GpuStepGraph, TheSameBatchObjectForTwoMicroBatchesIsRefused) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using Tr = Trainer<mlp::ResidualMlp, Bf16, Accumulate<3>, AdamW<>, Cuda>;
  const mlp::Shape shape{48, 64, 2, 10, 96};
  const mlp::TeacherTask task(shape, seed);
  std::mt19937_64 rng(seed);
  mlp::Batch reused;
  Tr t(mlp::ResidualMlp(shape), config_of<Tr>(3, true, seed));
  try {
    (void)t.step([&]() -> const mlp::Batch& {
      reused = task.batch(rng);
      return reused;
    });
    ADD_FAILURE() << "not refused";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("same batch object"), std::string::npos) << e.what();
  }
  EXPECT_EQ(t.steps(), 0u);
}

TEST(GpuStepGraph, AModelWithoutStageIsRefusedAtConstruction) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  using step_graph_test::NoStage;
  using Tr = Trainer<NoStage, Bf16, AdamW<>, Cuda>;
  try {
    Tr t(NoStage{}, {.graph = true});
    ADD_FAILURE() << "not refused";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("void stage(Ctx&, const batch_type&)"), std::string::npos) << e.what();
  }
}

}  // namespace
