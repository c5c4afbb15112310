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
//    element differs by a few fp32 roundings (relative 2^-24 each). SGD carries that into the
//    master weights element by element: 1e-5 relative (+1e-7) after six steps. AdamW divides by
//    sqrt(v) + eps, so an element whose gradient nearly cancels can move its update by a good
//    fraction of the learning rate (seen: 6e-5 at lr 1e-2 in one element of ~1,300, over a few
//    hundred seeded runs); for AdamW the test bounds the relative L2 distance of the whole arena
//    (1e-4) and each element by 2 x lr per step. The norm agrees to 1e-4 relative and the loss
//    to 1e-3 (later steps start from those weights, and a bf16/fp16 compute copy that rounds the
//    other way moves the loss by a fraction of that dtype's 2^-8 or 2^-11; seen: 1.1e-4).
#include "../../examples/custom_model/teacher_mlp.hpp"
#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"
#include "ranks.hpp"

#include <alloy/alloy.hpp>
#include <alloy/dist/host_communicator.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <future>
#include <string_view>

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
  std::size_t shard_begin = 0;  // ZeroRedundancy: master and state are the range from here
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
  s.shard_begin = t.store().shard_begin();
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
Snapshot one_process(std::uint64_t seed, const std::vector<std::vector<Batch>>& batches, float max_grad_norm = 0.05f) {
  using Tr = Trainer<StudentMlp, P, Accumulate<2>, O, Host>;
  const int count = static_cast<int>(batches[0].size());
  auto config = config_for<Tr>(seed, count);
  config.max_grad_norm = max_grad_norm;
  Tr t(StudentMlp(in, hid, out), config);
  std::vector<StepReport> reports;
  for (const auto& step : batches) reports.push_back(t.step(std::span<const Batch>(step)));
  return snapshot(t, reports);
}

// `world` ranks, each with its `micro` micro-batches of every global batch.
template <class P, class O, class Parallel = DataParallel<HostCommunicator>>
std::vector<test::RankResult<Snapshot>> data_parallel(std::uint64_t seed, int world, int micro,
                                                      const std::vector<std::vector<Batch>>& batches,
                                                      float max_grad_norm = 0.05f) {
  using Tr = Trainer<StudentMlp, P, Accumulate<2>, O, Host, Parallel>;
  return run_ranks<Snapshot>(world, [&](HostCommunicator& comm) {
    auto config = config_for<Tr>(seed, micro);
    config.max_grad_norm = max_grad_norm;
    Tr t(StudentMlp(in, hid, out), config, comm);
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

// Master weights after `steps` steps against one process's (see the top of the file): SGD
// element by element; AdamW the relative L2 distance, and each element within 2 x lr per step.
// `b` from `begin` (a shard's range of the whole arena; past its end, zero).
template <class O>
void expect_master_near(const std::vector<float>& a, const std::vector<float>& b, int steps, const std::string& what,
                        std::size_t begin = 0) {
  constexpr float lr = 1e-2f;
  const bool adam = std::string_view(O::name) == "AdamW";
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const float e = begin + i < b.size() ? b[begin + i] : 0.0f;
    diff += double(a[i] - e) * double(a[i] - e);
    norm += double(e) * double(e);
    ASSERT_NEAR(a[i], e, adam ? 2.0f * lr * steps : 1e-5f * std::fabs(e) + 1e-7f) << what << " element " << begin + i;
  }
  if (adam) {
    EXPECT_LT(std::sqrt(diff / norm), 1e-4) << what << ": relative L2 distance";
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

// norm_tolerance: the relative difference of each step's gradient norm from one process's. Ranks
// sum the gradients in another order; with 16-bit parameters that flips the rounding of a few
// parameters at the last step's update, and each flip moves the next gradients by up to a 16-bit
// ulp of that weight (bf16: 2^-8 relative). Seed 14222388345779172234 gave 1.2e-4 at step 4 with
// bf16, about 1 in 150 seeds over 1e-4; a rank missing from the reduction or summed twice would be
// off by a third or more.
template <class P, class O>
void accumulating_ranks_match(int world, int micro, double norm_tolerance = 1e-4) {
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
    expect_master_near<O>(s.master.empty() ? s.params : s.master, ref.master.empty() ? ref.params : ref.master, 6,
                          "master weights");
    for (std::size_t i = 0; i < ref.reports.size(); ++i) {
      EXPECT_NEAR(s.reports[i].loss, ref.reports[i].loss, 1e-3f * ref.reports[i].loss) << "step " << i;
      EXPECT_NEAR(s.reports[i].grad_norm, ref.reports[i].grad_norm, norm_tolerance * ref.reports[i].grad_norm)
          << "step " << i;
      EXPECT_EQ(s.reports[i].skipped, ref.reports[i].skipped);
    }
  }
}

TEST(DataParallel, AccumulatingRanksMatchOneProcessSgd) {
  for (int world : {2, 3}) accumulating_ranks_match<Precision<fp32>, SGD<>>(world, 2);
}

TEST(DataParallel, AccumulatingRanksMatchOneProcessAdamWBf16) {
  for (int world : {2, 3}) accumulating_ranks_match<Precision<bf16, fp32_master>, AdamW<>>(world, 3, 1e-3);
}

// fp16 with the dynamic loss scale (its default): the scale, its growth and the skip decisions
// follow one process's.
TEST(DataParallel, AccumulatingRanksMatchOneProcessFp16DynamicScale) {
  for (int world : {2, 3}) accumulating_ranks_match<Precision<fp16, fp32_master>, AdamW<>>(world, 2, 1e-3);
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
  auto one_config = config_for<One>(seed, world * micro);
  std::vector<std::string> log;
  one_config.load_log = [&](const std::string& line) { log.push_back(line); };
  One one(StudentMlp(in, hid, out), one_config);
  const LoadReport report = one.load(path);
  ASSERT_EQ(log.size(), 1u);
  EXPECT_MENTIONS(log[0], "micro_batches: saved 2, this trainer 4");
  EXPECT_FALSE(report.config_differences.empty());  // micro_batches 4, not 2: reported, loaded
  EXPECT_EQ(one.steps(), 3u);
  for (int s = 3; s < 5; ++s) one.step(std::span<const Batch>(batches[s]));
  expect_master_near<AdamW<>>(to_host(one.store().master_arena()), original[0].value->master, 2,
                              "one process after the load");
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

// A rank that stops (its thread ends, destroying its communicator) or stalls (until rank 0 has
// given up): rank 0 gets an alloy::error from its next step, not a hang. The timeout is 1 s, so
// that a loaded machine's scheduling does not time out the construction's collectives.
TEST(DataParallel, ADeadOrStalledRankGivesTheOthersAnError) {
  using Tr = Trainer<StudentMlp, Precision<fp32>, SGD<>, Host, DataParallel<HostCommunicator>>;
  const auto batches = global_batches(1, 2, 2);
  for (const bool stall : {false, true}) {
    std::promise<void> rank0_done;
    std::shared_future<void> done = rank0_done.get_future().share();
    const auto start = std::chrono::steady_clock::now();
    const auto ranks = run_ranks<int>(
        2,
        [&](HostCommunicator& comm) {
          Tr t(StudentMlp(in, hid, out), {.seed = 5}, comm);
          if (comm.rank() == 1) {
            if (stall) done.wait();
            return 0;
          }
          struct Signal {
            std::promise<void>& p;
            ~Signal() { p.set_value(); }
          } signal{rank0_done};
          t.step(std::span<const Batch>(batches[0].data(), 1));
          return 0;
        },
        std::chrono::seconds(1));
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
    EXPECT_MENTIONS(ranks[0].error, stall ? "timed out" : "rank 1 left the world");
    EXPECT_EQ(ranks[1].error, "");
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

// ZeroRedundancy (ZeRO-1): each rank updates its range of the arenas and the parameters are
// all-gathered. The gradients are the same sums as DataParallel's (a reduce-scatter in rank
// order), but pass 1 sums the squares of each range and then the ranks' sums, so the norm is
// summed in another order than one process sums it: clipping then differs in the last bits, and
// the comparison is bitwise only without clipping.

// The whole-arena `whole` (one process) at a sharded snapshot's range; the tail past the model is zero.
// Bitwise: `shard` is `whole` from `begin` (past its end, zero: the tail padding).
void expect_range(const std::vector<float>& shard, const std::vector<float>& whole, std::size_t begin,
                  const std::string& what) {
  for (std::size_t i = 0; i < shard.size(); ++i) {
    const float expected = begin + i < whole.size() ? whole[begin + i] : 0.0f;
    ASSERT_EQ(std::memcmp(&shard[i], &expected, sizeof(float)), 0)
        << what << " element " << begin + i << ": " << shard[i] << " and " << expected;
  }
}

void expect_shard_of(const Snapshot& s, const Snapshot& ref, const std::string& who) {
  expect_range(s.params, ref.params, 0, who + ": parameters");
  expect_range(s.master, ref.master, s.shard_begin, who + ": master weights");
  for (std::size_t k = 0; k < ref.state.size(); ++k) {
    expect_range(s.state[k], ref.state[k], s.shard_begin, who + ": state " + std::to_string(k));
  }
}

template <class P, class O>
void zero_is_bitwise_without_clipping(int world) {
  ALLOY_SEEDED(seed);
  SCOPED_TRACE("world " + std::to_string(world));
  const auto batches = global_batches(seed, 6, world);
  const Snapshot ref = one_process<P, O>(seed, batches, 0.0f);
  const auto ranks = data_parallel<P, O, ZeroRedundancy<HostCommunicator>>(seed, world, 1, batches, 0.0f);
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(ranks[r].error, "") << "rank " << r;
    const Snapshot& s = *ranks[r].value;
    EXPECT_EQ(s.shard_begin, s.params.size() / world * r);
    expect_shard_of(s, ref, "rank " + std::to_string(r));
    for (std::size_t i = 0; i < ref.reports.size(); ++i) {
      EXPECT_EQ(s.reports[i].loss, ref.reports[i].loss) << "step " << i;
      EXPECT_NEAR(s.reports[i].grad_norm, ref.reports[i].grad_norm, 1e-6 * ref.reports[i].grad_norm);
    }
  }
}

TEST(ZeroRedundancy, OneMicroBatchPerRankWithoutClippingIsBitwiseSgd) {
  for (int world : {2, 3}) zero_is_bitwise_without_clipping<Precision<fp32>, SGD<>>(world);
}

// bf16 optimizer state is written with stochastic rounding: each range draws the random bits
// one process draws for those elements.
TEST(ZeroRedundancy, OneMicroBatchPerRankWithoutClippingIsBitwiseAdamWBf16State) {
  for (int world : {2, 3}) zero_is_bitwise_without_clipping<Precision<fp32>, AdamW<State<bf16>>>(world);
}

// norm_tolerance as for accumulating_ranks_match.
template <class P, class O>
void zero_matches(int world, int micro, double norm_tolerance = 1e-4) {
  ALLOY_SEEDED(seed);
  SCOPED_TRACE("world " + std::to_string(world) + ", " + std::to_string(micro) + " micro-batches a rank");
  const auto batches = global_batches(seed, 6, world * micro);
  const Snapshot ref = one_process<P, O>(seed, batches);
  const auto ranks = data_parallel<P, O, ZeroRedundancy<HostCommunicator>>(seed, world, micro, batches);
  bool clipped = false;
  for (const auto& r : ref.reports) clipped |= r.grad_norm > 0.05;
  EXPECT_TRUE(clipped) << "the test means to clip";
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(ranks[r].error, "") << "rank " << r;
    const Snapshot& s = *ranks[r].value;
    expect_bitwise(s.params, ranks[0].value->params, "rank " + std::to_string(r) + "'s parameters against rank 0's");
    expect_master_near<O>(s.master.empty() ? std::vector<float>(s.params.begin() + s.shard_begin,
                                                                s.params.begin() + s.shard_begin + s.state[0].size())
                                           : s.master,
                          ref.master.empty() ? ref.params : ref.master, 6, "master weights", s.shard_begin);
    for (std::size_t i = 0; i < ref.reports.size(); ++i) {
      EXPECT_NEAR(s.reports[i].loss, ref.reports[i].loss, 1e-3f * ref.reports[i].loss) << "step " << i;
      EXPECT_NEAR(s.reports[i].grad_norm, ref.reports[i].grad_norm, norm_tolerance * ref.reports[i].grad_norm)
          << "step " << i;
      EXPECT_EQ(s.reports[i].skipped, ref.reports[i].skipped);
      EXPECT_EQ(s.reports[i].grad_norm, ranks[0].value->reports[i].grad_norm) << "every rank's norm is rank 0's";
    }
  }
}

TEST(ZeroRedundancy, ClippedAdamWMatchesOneProcessFp32) {
  for (int world : {2, 3}) zero_matches<Precision<fp32>, AdamW<>>(world, 1);
}

TEST(ZeroRedundancy, AccumulatingBf16MasterMatchesOneProcess) {
  for (int world : {2, 3}) zero_matches<Precision<bf16, fp32_master>, AdamW<>>(world, 2, 1e-3);
}

TEST(ZeroRedundancy, AccumulatingFp16DynamicScaleMatchesOneProcess) {
  for (int world : {2, 3}) zero_matches<Precision<fp16, fp32_master>, AdamW<>>(world, 2, 1e-3);
}

// q8 state: each range holds whole quantization blocks and their scales.
TEST(ZeroRedundancy, OneMicroBatchPerRankWithoutClippingIsBitwiseQ8State) {
  for (int world : {2, 3}) zero_is_bitwise_without_clipping<Precision<fp32>, AdamW<State<q8>>>(world);
}

TEST(ZeroRedundancy, ANonFiniteGradientOnOneRankSkipsTheStepOnEveryRank) {
  ALLOY_SEEDED(seed);
  using Tr =
      Trainer<StudentMlp, Precision<fp16, fp32_master>, Accumulate<2>, AdamW<>, Host, ZeroRedundancy<HostCommunicator>>;
  constexpr int world = 3, micro = 2, steps = 4, poisoned_step = 1;
  auto batches = global_batches(seed, steps, world * micro);
  batches[poisoned_step][2 * micro].x[5] = std::nanf("");  // rank 2's first micro-batch
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
    EXPECT_EQ(reports[poisoned_step].first_non_finite, "w1") << "rank " << r;
    EXPECT_EQ(reports.back().overflows, 1u);
    expect_bitwise(ranks[r].value->params, ranks[0].value->params, "parameters against rank 0's");
  }
}

// Master weights and optimizer state per rank: the whole divided by the world, within 1% on a
// model of 165,000 parameters (the arenas pad to a multiple of world x 256 elements).
TEST(ZeroRedundancy, EachRankHoldsItsShareOfTheMasterAndState) {
  constexpr int big_in = 256, big_hid = 512, big_out = 64;
  using O = AdamW<State<q8>>;
  using Tr = Trainer<StudentMlp, Precision<bf16, fp32_master>, O, Host, ZeroRedundancy<HostCommunicator>>;
  using One = Trainer<StudentMlp, Precision<bf16, fp32_master>, O, Host>;
  static_assert(Tr::shards_state && !One::shards_state);
  static_assert(Tr::bytes_per_param_on_each_of(1) == One::bytes_per_param);
  static_assert(Tr::bytes_per_param_on_each_of(4) == 2 + 2 + (4 + 2 + 8.0 / 256) / 4);
  static_assert(One::bytes_per_param_on_each_of(4) == One::bytes_per_param);
  One one(StudentMlp(big_in, big_hid, big_out));
  const MemoryReport whole = one.memory().arenas;
  for (int world : {2, 3}) {
    const auto ranks = run_ranks<MemoryReport>(world, [&](HostCommunicator& comm) {
      Tr t(StudentMlp(big_in, big_hid, big_out), {}, comm);
      return t.memory().arenas;
    });
    for (const auto& r : ranks) {
      ASSERT_EQ(r.error, "");
      const MemoryReport& m = *r.value;
      EXPECT_NEAR(double(m.master), double(whole.master) / world, 0.01 * double(whole.master) / world);
      EXPECT_NEAR(double(m.optimizer_state), double(whole.optimizer_state) / world,
                  0.01 * double(whole.optimizer_state) / world);
      EXPECT_NEAR(double(m.params), double(whole.params), 0.01 * double(whole.params));  // whole on every rank
    }
  }
}

// Saved by two shards (gathered, rank 0 writes), loaded by each rank of a new 2-rank world (each
// keeps its range) and by one process; a one-process checkpoint loads into three shards.
TEST(ZeroRedundancy, CheckpointsMoveBetweenShardsAndOneProcess) {
  ALLOY_SEEDED(seed);
  using P = Precision<bf16, fp32_master>;
  using Tr = Trainer<StudentMlp, P, Accumulate<2>, AdamW<>, Host, ZeroRedundancy<HostCommunicator>>;
  using One = Trainer<StudentMlp, P, Accumulate<2>, AdamW<>, Host>;
  constexpr int micro = 2;
  const auto batches = global_batches(seed, 5, 2 * micro);
  test::TempDir dir("alloy_zero");
  auto mine = [&](const std::vector<Batch>& step, int rank) {
    return std::span<const Batch>(step.data() + rank * micro, micro);
  };
  auto quiet = [](auto config) {
    config.load_log = [](const std::string&) {};
    return config;
  };
  const auto original = run_ranks<Snapshot>(2, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), config_for<Tr>(seed, micro), comm);
    for (int s = 0; s < 3; ++s) t.step(mine(batches[s], comm.rank()));
    t.save(dir / "zero.safetensors");
    std::vector<StepReport> reports;
    for (int s = 3; s < 5; ++s) reports.push_back(t.step(mine(batches[s], comm.rank())));
    return snapshot(t, reports);
  });
  ASSERT_EQ(original[0].error, "");
  ASSERT_EQ(original[1].error, "");
  const auto resumed = run_ranks<Snapshot>(2, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), quiet(config_for<Tr>(seed + 1, micro)), comm);
    t.load(dir / "zero.safetensors");
    std::vector<StepReport> reports;
    for (int s = 3; s < 5; ++s) reports.push_back(t.step(mine(batches[s], comm.rank())));
    return snapshot(t, reports);
  });
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(resumed[r].error, "") << "rank " << r;
    expect_same_run(*resumed[r].value, *original[r].value, "resumed rank " + std::to_string(r));
  }
  // One process reads the shards' file and writes one the shards read back.
  One one(StudentMlp(in, hid, out), quiet(config_for<One>(seed, 2 * micro)));
  one.load(dir / "zero.safetensors");
  const Snapshot at_three = snapshot(one, {});
  one.save(dir / "one.safetensors");
  const auto three = run_ranks<Snapshot>(3, [&](HostCommunicator& comm) {
    Tr t(StudentMlp(in, hid, out), quiet(config_for<Tr>(seed, micro)), comm);
    t.load(dir / "one.safetensors");
    EXPECT_EQ(t.steps(), 3u);
    t.export_weights(dir / "weights.safetensors");
    return snapshot(t, {});
  });
  for (int r = 0; r < 3; ++r) {
    ASSERT_EQ(three[r].error, "") << "rank " << r;
    expect_shard_of(*three[r].value, at_three, "3-shard rank " + std::to_string(r));
  }
  // export_weights gathered the master weights: one process imports them bit for bit.
  One fresh(StudentMlp(in, hid, out), {.seed = seed + 9});
  fresh.import_weights(dir / "weights.safetensors");
  expect_bitwise(to_host(fresh.store().master_arena()), at_three.master, "imported master weights");
}

}  // namespace
