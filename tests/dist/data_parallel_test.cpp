// DataParallel on the Host backend: ranks as threads (HostCommunicator) against one process
// training on the global batch (every rank's micro-batches, in rank order).
//
// Tolerances. The ranks' gradients are the same terms a single process sums: each rank seeds
// backward with scale / (micro-batches x world size), as one process running every micro-batch
// does. Only the order of the fp32 sum can differ:
//  - one micro-batch per rank: the all-reduce adds rank 0 + rank 1 + ... in order, which is the
//    order one process accumulates its micro-batches in, so parameters, optimizer state, norms,
//    skip decisions and the reported loss are bitwise equal;
//  - N > 1 micro-batches per rank: each rank sums its own N first, so the sum is
//    (g0 + ... + g(N-1)) + (gN + ...) against one process's ((g0 + g1) + g2) + ...; each gradient
//    element differs by a few fp32 roundings (relative 2^-24 each), and after a few steps the
//    master weights agree to 1e-5 relative (bf16/fp16 compute copies to one unit in the last
//    place of their dtype).
#include "../../examples/custom_model/teacher_mlp.hpp"
#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"
#include "ranks.hpp"

#include <alloy/alloy.hpp>
#include <alloy/dist/host_communicator.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

namespace {

using namespace alloy;
using teacher::Batch;
using teacher::StudentMlp;
using test::run_ranks;

constexpr int in = 16, hid = 32, out = 4;
constexpr int rows = 8;  // per micro-batch

// What a trainer holds after training, in bytes, to compare bitwise or within a tolerance.
struct Snapshot {
  std::vector<float> params;  // the compute copy, widened
  std::vector<float> master;
  std::vector<std::vector<float>> state;  // each slot, widened
  std::vector<StepReport> reports;
};

template <class Tr>
Snapshot snapshot(Tr& t, std::vector<StepReport> reports) {
  Snapshot s;
  for (const auto& p : to_host(t.store().params_arena())) s.params.push_back(static_cast<float>(p));
  if constexpr (Tr::store_type::has_master) s.master = to_host(t.store().master_arena());
  for (int k = 0; k < Tr::store_type::slots; ++k) {
    std::vector<float> v;
    for (const auto& x : to_host(t.store().state_arena(k))) v.push_back(static_cast<float>(x));
    s.state.push_back(v);
  }
  s.reports = std::move(reports);
  return s;
}

// The global batch of each step: world x micro micro-batches, rank r's are r*micro .. r*micro+micro-1.
std::vector<std::vector<Batch>> global_batches(std::uint64_t seed, int steps, int count) {
  const teacher::Teacher t(in, hid, out, seed);
  std::mt19937_64 rng(seed + 1);
  std::vector<std::vector<Batch>> all(steps);
  for (auto& step : all) {
    for (int i = 0; i < count; ++i) step.push_back(t.batch(rows, rng));
  }
  return all;
}

template <class Tr>
typename Tr::Config config_for(std::uint64_t seed, int micro_batches) {
  typename Tr::Config c{};
  c.schedule = LrSchedule::constant(1e-2f);
  c.optimizer.lr = 1e-2f;
  c.max_grad_norm = 0.05f;  // small enough to clip
  c.seed = seed;
  c.micro_batches = micro_batches;
  return c;
}

// One process, every micro-batch of the global batch (Accumulate<2>, and the count at run time:
// 16-bit compute needs the fp32 accumulator for more than one).
template <class P, class O>
Snapshot one_process(std::uint64_t seed, const std::vector<std::vector<Batch>>& batches) {
  using Tr = Trainer<StudentMlp, P, Accumulate<2>, O, Host>;
  const int count = static_cast<int>(batches[0].size());
  Tr t(StudentMlp(in, hid, out), config_for<Tr>(seed, count));
  std::vector<StepReport> reports;
  for (const auto& step : batches) reports.push_back(t.step(std::span<const Batch>(step)));
  return snapshot(t, reports);
}

// `world` ranks, each with its `micro` micro-batches of every global batch.
template <class P, class O>
std::vector<test::RankResult<Snapshot>> data_parallel(std::uint64_t seed, int world, int micro,
                                                      const std::vector<std::vector<Batch>>& batches) {
  using Tr = Trainer<StudentMlp, P, Accumulate<2>, O, Host, DataParallel<HostCommunicator>>;
  return run_ranks<Snapshot>(world, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), config_for<Tr>(seed, micro), comm);
    std::vector<StepReport> reports;
    for (const auto& step : batches) {
      const std::span<const Batch> mine(step.data() + comm.rank() * micro, static_cast<std::size_t>(micro));
      reports.push_back(t.step(mine));
    }
    return snapshot(t, reports);
  });
}

void expect_bitwise(const std::vector<float>& a, const std::vector<float>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << what << " differ in their bits";
}

void expect_near(const std::vector<float>& a, const std::vector<float>& b, float rel, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (std::size_t i = 0; i < a.size(); ++i) {
    ASSERT_NEAR(a[i], b[i], rel * (std::fabs(b[i]) + 1e-3f)) << what << " element " << i;
  }
}

void expect_same_run(const Snapshot& s, const Snapshot& ref, const std::string& who) {
  expect_bitwise(s.params, ref.params, who + ": parameters");
  expect_bitwise(s.master, ref.master, who + ": master weights");
  for (std::size_t k = 0; k < ref.state.size(); ++k) {
    expect_bitwise(s.state[k], ref.state[k], who + ": state " + std::to_string(k));
  }
  for (std::size_t i = 0; i < ref.reports.size(); ++i) {
    EXPECT_TRUE(s.reports[i].loss == ref.reports[i].loss ||
                (std::isnan(s.reports[i].loss) && std::isnan(ref.reports[i].loss)))
        << who << " step " << i << ": " << s.reports[i].loss << " and " << ref.reports[i].loss;
    EXPECT_EQ(s.reports[i].grad_norm, ref.reports[i].grad_norm) << who << " step " << i;
    EXPECT_EQ(s.reports[i].skipped, ref.reports[i].skipped) << who << " step " << i;
  }
}

template <class P, class O>
void one_micro_batch_per_rank_is_bitwise(int world) {
  ALLOY_SEEDED(seed);
  SCOPED_TRACE("world " + std::to_string(world));
  const auto batches = global_batches(seed, 6, world);
  const Snapshot ref = one_process<P, O>(seed, batches);
  const auto ranks = data_parallel<P, O>(seed, world, 1, batches);
  bool clipped = false;
  for (const auto& r : ref.reports) clipped |= r.grad_norm > 0.05;
  EXPECT_TRUE(clipped) << "the test means to clip";
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(ranks[r].error, "") << "rank " << r;
    expect_same_run(*ranks[r].value, ref, "rank " + std::to_string(r));
  }
}

TEST(DataParallel, OneMicroBatchPerRankEqualsOneProcessBitwiseSgd) {
  for (int world : {2, 3}) one_micro_batch_per_rank_is_bitwise<Precision<fp32>, SGD<>>(world);
}

TEST(DataParallel, OneMicroBatchPerRankEqualsOneProcessBitwiseAdamW) {
  for (int world : {2, 3}) one_micro_batch_per_rank_is_bitwise<Precision<fp32>, AdamW<>>(world);
}

// A static loss scale with fp32 compute still seeds and unscales exactly (a power of two).
TEST(DataParallel, OneMicroBatchPerRankEqualsOneProcessBitwiseWithALossScale) {
  using P = Precision<fp32, no_master, StaticLossScale<1024.0f>>;
  for (int world : {2, 3}) one_micro_batch_per_rank_is_bitwise<P, AdamW<>>(world);
}

template <class P, class O>
void accumulating_ranks_match(int world, int micro, float rel) {
  ALLOY_SEEDED(seed);
  SCOPED_TRACE("world " + std::to_string(world) + ", " + std::to_string(micro) + " micro-batches a rank");
  const auto batches = global_batches(seed, 6, world * micro);
  const Snapshot ref = one_process<P, O>(seed, batches);
  const auto ranks = data_parallel<P, O>(seed, world, micro, batches);
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(ranks[r].error, "") << "rank " << r;
    const Snapshot& s = *ranks[r].value;
    // Every rank holds the same bits as rank 0.
    expect_same_run(s, *ranks[0].value, "rank " + std::to_string(r) + " against rank 0");
    expect_near(s.master.empty() ? s.params : s.master, ref.master.empty() ? ref.params : ref.master, rel,
                "master weights");
    for (std::size_t i = 0; i < ref.reports.size(); ++i) {
      EXPECT_NEAR(s.reports[i].loss, ref.reports[i].loss, 1e-6f * ref.reports[i].loss) << "step " << i;
      EXPECT_NEAR(s.reports[i].grad_norm, ref.reports[i].grad_norm, 1e-5 * ref.reports[i].grad_norm) << "step " << i;
      EXPECT_EQ(s.reports[i].skipped, ref.reports[i].skipped);
    }
  }
}

TEST(DataParallel, AccumulatingRanksMatchOneProcessSgd) {
  for (int world : {2, 3}) accumulating_ranks_match<Precision<fp32>, SGD<>>(world, 2, 1e-5f);
}

TEST(DataParallel, AccumulatingRanksMatchOneProcessAdamWBf16) {
  for (int world : {2, 3}) accumulating_ranks_match<Precision<bf16, fp32_master>, AdamW<>>(world, 3, 1e-5f);
}

// fp16 with the dynamic loss scale (its default): the scale, its growth and the skip decisions
// follow one process's.
TEST(DataParallel, AccumulatingRanksMatchOneProcessFp16DynamicScale) {
  for (int world : {2, 3}) accumulating_ranks_match<Precision<fp16, fp32_master>, AdamW<>>(world, 2, 1e-5f);
}

// Rank 1 alone sees a NaN in its data on step 2: the sum over the ranks is NaN, so pass 1 on
// every rank reads the same non-finite bits and every rank skips, backs off and goes on in step.
TEST(DataParallel, ANonFiniteGradientOnOneRankSkipsTheStepOnEveryRank) {
  ALLOY_SEEDED(seed);
  using P = Precision<fp16, fp32_master>;
  using Tr = Trainer<StudentMlp, P, Accumulate<2>, AdamW<>, Host, DataParallel<HostCommunicator>>;
  constexpr int world = 3, micro = 2, steps = 5, poisoned_step = 2;
  auto batches = global_batches(seed, steps, world * micro);
  batches[poisoned_step][1 * micro + 1].x[3] = std::nanf("");
  const auto ranks = run_ranks<Snapshot>(world, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), config_for<Tr>(seed, micro), comm);
    std::vector<StepReport> reports;
    for (const auto& step : batches) {
      reports.push_back(t.step(std::span<const Batch>(step.data() + comm.rank() * micro, micro)));
    }
    return snapshot(t, reports);
  });
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(ranks[r].error, "") << "rank " << r;
    const auto& reports = ranks[r].value->reports;
    for (int s = 0; s < steps; ++s) EXPECT_EQ(reports[s].skipped, s == poisoned_step) << "rank " << r << " step " << s;
    EXPECT_EQ(reports.back().skipped_steps, 1u);
    EXPECT_EQ(reports.back().applied_steps, steps - 1u);
    EXPECT_EQ(reports.back().overflows, 1u);
    EXPECT_EQ(reports[poisoned_step].first_non_finite, "w1");
    EXPECT_LT(reports[poisoned_step + 1].loss_scale, reports[poisoned_step].loss_scale);  // backed off
    expect_same_run(*ranks[r].value, *ranks[0].value, "rank " + std::to_string(r) + " against rank 0");
  }
}

// Rank 0 writes; each rank of a new 2-rank world loads the file, and so does one process; all
// then train on as the original ranks do.
TEST(DataParallel, ACheckpointFromTwoRanksLoadsIntoEachRankAndIntoOneProcess) {
  ALLOY_SEEDED(seed);
  using P = Precision<bf16, fp32_master>;
  using Tr = Trainer<StudentMlp, P, Accumulate<2>, AdamW<>, Host, DataParallel<HostCommunicator>>;
  constexpr int world = 2, micro = 2;
  const auto batches = global_batches(seed, 5, world * micro);
  test::TempDir dir("alloy_dp");
  const auto path = dir / "dp.safetensors";
  auto mine = [&](const std::vector<Batch>& step, int rank) {
    return std::span<const Batch>(step.data() + rank * micro, micro);
  };
  // Three steps, save, two more.
  const auto original = run_ranks<Snapshot>(world, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), config_for<Tr>(seed, micro), comm);
    for (int s = 0; s < 3; ++s) t.step(mine(batches[s], comm.rank()));
    t.save(path);
    std::vector<StepReport> reports;
    for (int s = 3; s < 5; ++s) reports.push_back(t.step(mine(batches[s], comm.rank())));
    return snapshot(t, reports);
  });
  ASSERT_EQ(original[0].error, "");
  ASSERT_EQ(original[1].error, "");
  ASSERT_TRUE(std::filesystem::exists(path));
  // A new world loads it (with another seed in its config: the file's wins) and does the two steps.
  const auto resumed = run_ranks<Snapshot>(world, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), config_for<Tr>(seed + 7, micro), comm);
    t.load(path);
    EXPECT_EQ(t.steps(), 3u);
    std::vector<StepReport> reports;
    for (int s = 3; s < 5; ++s) reports.push_back(t.step(mine(batches[s], comm.rank())));
    return snapshot(t, reports);
  });
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(resumed[r].error, "") << "rank " << r;
    expect_same_run(*resumed[r].value, *original[0].value, "resumed rank " + std::to_string(r));
  }
  // The file is a plain checkpoint: one process with the global batch's micro-batches loads it.
  using One = Trainer<StudentMlp, P, Accumulate<2>, AdamW<>, Host>;
  One one(StudentMlp(in, hid, out), config_for<One>(seed, world * micro));
  const LoadReport report = one.load(path);
  EXPECT_FALSE(report.config_differences.empty());  // micro_batches 4, not 2: reported, loaded
  EXPECT_EQ(one.steps(), 3u);
  const auto master = to_host(one.store().master_arena());
  std::vector<StepReport> reports;
  for (int s = 3; s < 5; ++s) reports.push_back(one.step(std::span<const Batch>(batches[s])));
  expect_near(to_host(one.store().master_arena()), original[0].value->master, 1e-5f, "one process after the load");
}

TEST(DataParallel, ASaveThatFailsOnRankZeroThrowsOnEveryRank) {
  using Tr = Trainer<StudentMlp, Precision<fp32>, SGD<>, Host, DataParallel<HostCommunicator>>;
  const auto ranks = run_ranks<int>(2, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), {.seed = 3}, comm);
    t.save("/nonexistent-alloy-directory/checkpoint.safetensors");
    return 0;
  });
  EXPECT_MENTIONS(ranks[0].error, "nonexistent-alloy-directory");
  EXPECT_MENTIONS(ranks[1].error, "failed on another rank");
}

TEST(DataParallel, ALoadThatFailsOnOneRankThrowsOnEveryRank) {
  using Tr = Trainer<StudentMlp, Precision<fp32>, SGD<>, Host, DataParallel<HostCommunicator>>;
  test::TempDir dir("alloy_dp");
  const auto ranks = run_ranks<int>(2, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), {.seed = 3}, comm);
    t.save(dir / "ok.safetensors");
    // Rank 1 is pointed at a file that is not there (as on a node that does not share the directory).
    t.load(comm.rank() == 0 ? dir / "ok.safetensors" : dir / "missing.safetensors");
    return 0;
  });
  EXPECT_MENTIONS(ranks[0].error, "failed on another rank");
  EXPECT_MENTIONS(ranks[1].error, "missing.safetensors");
}

TEST(DataParallel, RanksThatDisagreeOnTheSeedOrMicroBatchesAreRefusedOnEveryRank) {
  using Tr = Trainer<StudentMlp, Precision<fp32>, SGD<>, Host, DataParallel<HostCommunicator>>;
  const auto seeds = run_ranks<int>(2, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), {.seed = comm.rank() == 0 ? 1u : 2u}, comm);
    return 0;
  });
  for (const auto& r : seeds) EXPECT_MENTIONS(r.error, "the ranks disagree on the seed");
  const auto counts = run_ranks<int>(3, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), {.micro_batches = comm.rank() == 2 ? 2 : 1}, comm);
    return 0;
  });
  for (const auto& r : counts) EXPECT_MENTIONS(r.error, "the ranks disagree on micro_batches");
  const auto models = run_ranks<int>(2, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, comm.rank() == 0 ? hid : hid + 1, out), {}, comm);
    return 0;
  });
  for (const auto& r : models) EXPECT_MENTIONS(r.error, "the ranks disagree on the parameter count");
}

// Every rank starts from rank 0's parameters, whatever its own initialization drew.
TEST(DataParallel, EveryRankStartsFromRankZerosParameters) {
  using Tr = Trainer<StudentMlp, Precision<bf16, fp32_master>, AdamW<>, Host, DataParallel<HostCommunicator>>;
  const auto ranks = run_ranks<Snapshot>(3, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), {.seed = 11}, comm);
    return snapshot(t, {});
  });
  Trainer<StudentMlp, Precision<bf16, fp32_master>, AdamW<>, Host> one(StudentMlp(in, hid, out), {.seed = 11});
  const Snapshot ref = snapshot(one, {});
  for (const auto& r : ranks) {
    ASSERT_EQ(r.error, "");
    expect_same_run(*r.value, ref, "a rank");
  }
}

// A rank that stops (its thread ends, destroying its communicator) or stalls: the others get an
// alloy::error from their next step, not a hang.
TEST(DataParallel, ADeadOrStalledRankGivesTheOthersAnError) {
  using Tr = Trainer<StudentMlp, Precision<fp32>, SGD<>, Host, DataParallel<HostCommunicator>>;
  const auto batches = global_batches(1, 2, 2);
  for (const bool stall : {false, true}) {
    const auto start = std::chrono::steady_clock::now();
    const auto ranks = run_ranks<int>(
        2,
        [&](HostCommunicator& comm) {
          Tr t(StudentMlp(in, hid, out), {.seed = 5}, comm);
          if (comm.rank() == 1) {
            if (stall) std::this_thread::sleep_for(std::chrono::milliseconds(500));
            return 0;
          }
          t.step(std::span<const Batch>(batches[0].data(), 1));
          return 0;
        },
        std::chrono::milliseconds(100));
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
    EXPECT_MENTIONS(ranks[0].error, stall ? "timed out" : "rank 1 left the world");
  }
}

TEST(DataParallel, ReportsOneReplicasBytesAndItsWorld) {
  using Tr = Trainer<StudentMlp, Precision<bf16, fp32_master>, AdamW<>, Host, DataParallel<HostCommunicator>>;
  using One = Trainer<StudentMlp, Precision<bf16, fp32_master>, AdamW<>, Host>;
  static_assert(Tr::data_parallel && !One::data_parallel);
  static_assert(Tr::bytes_per_param == One::bytes_per_param);  // every replica holds the whole model
  const auto ranks = run_ranks<std::size_t>(2, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), {}, comm);
    EXPECT_EQ(t.world_size(), 2);
    EXPECT_EQ(&t.communicator(), &comm);
    return t.memory().arenas.total();
  });
  One one(StudentMlp(in, hid, out));
  EXPECT_EQ(one.world_size(), 1);
  for (const auto& r : ranks) EXPECT_EQ(*r.value, one.memory().arenas.total());
}

}  // namespace
