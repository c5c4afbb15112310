// DataParallel's gradient buckets (train/gradient_buckets.hpp) on the Host backend: a LayeredModel's
// gradients all-reduced block by block while backward runs give the bits of the whole arena's
// all-reduce after backward (gradient_bucket_bytes = 0), and of one process on the global batch
// within data_parallel_test.cpp's tolerances (bitwise with one micro-batch per rank; SGD to 1e-5
// relative with several). A communicator that logs its calls, and blocks that log their backward,
// show the buckets are issued before backward ends, and which paths keep the one all-reduce.
#include "../../examples/custom_model/teacher_mlp.hpp"
#include "../support/test_support.hpp"
#include "../train/layered_model.hpp"
#include "ranks.hpp"

#include <alloy/alloy.hpp>
#include <alloy/dist/host_communicator.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

using namespace alloy;
using test::run_ranks;

constexpr std::size_t features = 24, rows = 6, blocks = 5;

// HostCommunicator, with every call written to a log (the rank's own, shared with its blocks).
class LoggingCommunicator {
 public:
  using backend_type = Host;
  LoggingCommunicator(HostCommunicator& comm, std::vector<std::string>& log) : comm_(comm), log_(log) {}
  int rank() const { return comm_.rank(); }
  int world_size() const { return comm_.world_size(); }
  template <class T>
  void all_reduce(Host be, const T* send, T* recv, std::size_t n, ReduceOp op) {
    log_.push_back("all_reduce " + std::to_string(n));
    comm_.all_reduce(be, send, recv, n, op);
  }
  template <class T>
  void all_reduce_async(Host be, const T* send, T* recv, std::size_t n, ReduceOp op) {
    log_.push_back("all_reduce_async " + std::to_string(n));
    comm_.all_reduce_async(be, send, recv, n, op);
  }
  template <class T>
  void reduce_scatter(Host be, const T* send, T* recv, std::size_t n, ReduceOp op) {
    log_.push_back("reduce_scatter " + std::to_string(n));
    comm_.reduce_scatter(be, send, recv, n, op);
  }
  template <class T>
  void all_gather(Host be, const T* send, T* recv, std::size_t n) {
    log_.push_back("all_gather " + std::to_string(n));
    comm_.all_gather(be, send, recv, n);
  }
  template <class T>
  void broadcast(Host be, T* data, std::size_t n, int root) {
    log_.push_back("broadcast " + std::to_string(n));
    comm_.broadcast(be, data, n, root);
  }
  void all_reduce_host(Host be, double* values, std::size_t n, ReduceOp op) {
    log_.push_back("all_reduce_host " + std::to_string(n));
    comm_.all_reduce_host(be, values, n, op);
  }
  void join(Host be) {
    log_.push_back("join");
    comm_.join(be);
  }
  void wait(Host be) { comm_.wait(be); }

 private:
  HostCommunicator& comm_;
  std::vector<std::string>& log_;
};
static_assert(Communicator<LoggingCommunicator>);

// layered::Block that writes "backward <i> done" to the log when its backward returns.
class LoggedBlock {
 public:
  LoggedBlock(std::size_t index, std::vector<std::string>* log)
      : block_("blocks." + std::to_string(index), features), index_(index), log_(log) {}
  void declare(ParamRegistry& r) { block_.declare(r); }
  template <class Ctx, class T = typename Ctx::param_type>
  Activation<T> forward(Ctx& ctx, Activation<const T> x) {
    return block_.forward(ctx, x);
  }
  template <class Ctx, class T = typename Ctx::param_type>
  Activation<T> backward(Ctx& ctx, Activation<const T> dy) {
    Activation<T> dx = block_.backward(ctx, dy);
    if (log_) log_->push_back("backward " + std::to_string(index_) + " done");
    return dx;
  }

 private:
  layered::Block block_;
  std::size_t index_;
  std::vector<std::string>* log_;
};

// layered::Model's input and head around logged blocks, declared as input.scale, head.w, the
// blocks (so the rest is one range before the blocks). tied: input_backward also adds into
// blocks.0.c's gradient (a parameter shared by the input and block 0, as GPT-2's token table is
// by the input and the head), so block 0's gradient is final only after the input's backward.
class BucketModel {
 public:
  using batch_type = layered::Batch;
  explicit BucketModel(bool tied = false, std::vector<std::string>* log = nullptr) : inner_(features, 0), tied_(tied) {
    for (std::size_t i = 0; i < blocks; ++i) blocks_.emplace_back(i, log);
  }
  void declare(ParamRegistry& r) {
    inner_.declare(r);
    for (auto& b : blocks_) b.declare(r);
  }
  std::vector<LoggedBlock>& layers() noexcept { return blocks_; }
  template <class Ctx>
  auto input(Ctx& ctx, const batch_type& b) {
    return inner_.input(ctx, b);
  }
  template <class Ctx, class T = typename Ctx::param_type>
  auto head(Ctx& ctx, Activation<const T> y, const batch_type& b) {
    return inner_.head(ctx, y, b);
  }
  template <class Ctx, class T = typename Ctx::param_type>
  void input_backward(Ctx& ctx, Activation<const T> dh, const batch_type& b) {
    inner_.input_backward(ctx, dh, b);
    if (tied_) {
      using G = typename Ctx::grad_type;
      for_each_n(ctx.backend(), dh.cols,
                 layered::ColumnDot<T, G>{dh.data, nullptr, ctx.grad("blocks.0.c").data, dh.rows, dh.cols, true});
    }
  }

 private:
  layered::Model inner_;
  std::vector<LoggedBlock> blocks_;
  bool tied_;
};

std::vector<std::vector<layered::Batch>> global_batches(std::uint64_t seed, int steps, int count) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<layered::Batch>> all(steps);
  for (auto& step : all) {
    for (int i = 0; i < count; ++i) step.push_back(layered::random_batch(rows, features, rng));
  }
  return all;
}

template <class Tr>
typename Tr::Config config_for(std::uint64_t seed, int micro_batches, std::size_t bucket_bytes) {
  typename Tr::Config c{};
  c.schedule = LrSchedule::constant(1e-2f);
  c.optimizer.lr = 1e-2f;
  c.max_grad_norm = 0.05f;  // small enough to clip
  c.seed = seed;
  c.micro_batches = micro_batches;
  c.gradient_bucket_bytes = bucket_bytes;
  return c;
}

template <class Tr>
std::vector<float> master_of(Tr& t) {
  if constexpr (Tr::store_type::has_master) {
    return to_host(t.store().master_arena());
  } else {
    std::vector<float> v;
    for (const auto& p : to_host(t.store().params_arena())) v.push_back(static_cast<float>(p));
    return v;
  }
}

// One process, every micro-batch of each global batch: the master weights (fp32 parameters).
template <class P, class O, class... Ck>
std::vector<float> one_process(std::uint64_t seed, const std::vector<std::vector<layered::Batch>>& batches, bool tied) {
  using Tr = Trainer<BucketModel, P, Accumulate<2>, O, Host, Ck...>;
  Tr t(BucketModel(tied), config_for<Tr>(seed, static_cast<int>(batches[0].size()), 0));
  for (const auto& step : batches) t.step(std::span<const layered::Batch>(step));
  return master_of(t);
}

// `world` ranks of `micro` micro-batches each: every rank's master weights (or its error).
template <class P, class O, class... Ck>
std::vector<test::RankResult<std::vector<float>>> data_parallel(std::uint64_t seed, int world, int micro,
                                                                std::size_t bucket_bytes,
                                                                const std::vector<std::vector<layered::Batch>>& batches,
                                                                bool tied) {
  using Tr = Trainer<BucketModel, P, Accumulate<2>, O, Host, DataParallel<HostCommunicator>, Ck...>;
  return run_ranks<std::vector<float>>(world, [&](HostCommunicator& comm) {
    Tr t(BucketModel(tied), config_for<Tr>(seed, micro, bucket_bytes), comm);
    for (const auto& step : batches) {
      t.step(std::span<const layered::Batch>(step.data() + comm.rank() * micro, static_cast<std::size_t>(micro)));
    }
    return master_of(t);
  });
}

bool bitwise(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Buckets of one block's gradients (a block holds 2 x 256 elements: 2 KiB in fp32, 1 KiB in bf16),
// of about two blocks, and one bucket larger than the model, against the whole arena's all-reduce.
constexpr std::size_t bucket_sizes[] = {1, 3000, std::size_t(1) << 30};

template <class P, class O, class... Ck>
void buckets_give_the_whole_arenas_bits(bool compare_with_one_process) {
  ALLOY_SEEDED(seed);
  for (const bool tied : {false, true}) {
    for (const int world : {2, 3}) {
      for (const int micro : {1, 3}) {
        SCOPED_TRACE("world " + std::to_string(world) + ", " + std::to_string(micro) + " micro-batches a rank" +
                     (tied ? ", tied" : ""));
        const auto batches = global_batches(seed, 4, world * micro);
        const auto whole = data_parallel<P, O, Ck...>(seed, world, micro, 0, batches, tied);
        ASSERT_EQ(whole[0].error, "");
        if (compare_with_one_process) {
          const auto ref = one_process<P, O, Ck...>(seed, batches, tied);
          ASSERT_EQ(ref.size(), whole[0].value->size());
          for (std::size_t i = 0; i < ref.size(); ++i) {
            if (micro == 1 && !tied) {
              ASSERT_EQ(std::memcmp(&ref[i], &(*whole[0].value)[i], sizeof(float)), 0) << "element " << i;
            } else {
              ASSERT_NEAR((*whole[0].value)[i], ref[i], 1e-5f * std::fabs(ref[i]) + 1e-7f) << "element " << i;
            }
          }
        }
        for (const std::size_t bytes : bucket_sizes) {
          const auto ranks = data_parallel<P, O, Ck...>(seed, world, micro, bytes, batches, tied);
          for (int r = 0; r < world; ++r) {
            ASSERT_EQ(ranks[r].error, "") << "rank " << r << ", buckets of " << bytes << " bytes";
            EXPECT_TRUE(bitwise(*ranks[r].value, *whole[0].value))
                << "rank " << r << ", buckets of " << bytes << " bytes: the master weights differ in their bits";
          }
        }
      }
    }
  }
}

TEST(GradientBuckets, GiveTheWholeArenasBitsAndOneProcessesFp32Sgd) {
  buckets_give_the_whole_arenas_bits<Precision<fp32>, SGD<>>(true);
}

TEST(GradientBuckets, GiveTheWholeArenasBitsAndOneProcessesUnderCheckpointing) {
  buckets_give_the_whole_arenas_bits<Precision<fp32>, SGD<>, Checkpointing>(true);
  buckets_give_the_whole_arenas_bits<Precision<fp32>, SGD<>, CheckpointEvery<2>>(true);
}

// bf16 with the fp32 accumulator (3 micro-batches: each bucket's range accumulated, then reduced)
// and without (1: the bf16 gradients reduced); one process sums in another dtype there, so the
// comparison is with the whole arena's all-reduce alone.
TEST(GradientBuckets, GiveTheWholeArenasBitsBf16AdamW) {
  buckets_give_the_whole_arenas_bits<Precision<bf16, fp32_master>, AdamW<>>(false);
  buckets_give_the_whole_arenas_bits<Precision<bf16, fp32_master>, AdamW<>, Checkpointing>(false);
}

// What each rank's communicator and blocks logged, from the step's first micro-batch on.
template <class Parallel>
std::vector<std::string> logged_step(int micro, std::size_t bucket_bytes, int steps) {
  using Tr = Trainer<BucketModel, Precision<bf16, fp32_master>, Accumulate<2>, AdamW<>, Host, Parallel>;
  const auto batches = global_batches(7, steps, 2 * micro);
  const auto ranks = run_ranks<std::vector<std::string>>(2, [&](HostCommunicator& host) {
    std::vector<std::string> log;
    LoggingCommunicator comm(host, log);
    Tr t(BucketModel(false, &log), config_for<Tr>(7, micro, bucket_bytes), comm);
    for (int s = 0; s < steps; ++s) {
      log.clear();
      t.step(std::span<const layered::Batch>(batches[s].data() + comm.rank() * micro, static_cast<std::size_t>(micro)));
    }
    return log;
  });
  EXPECT_EQ(ranks[0].error, "");
  EXPECT_EQ(ranks[1].error, "");
  EXPECT_EQ(*ranks[0].value, *ranks[1].value) << "the ranks issued different collectives";
  return ranks[0].value.value_or(std::vector<std::string>{});
}

std::size_t count(const std::vector<std::string>& log, const std::string& prefix) {
  return static_cast<std::size_t>(
      std::count_if(log.begin(), log.end(), [&](const std::string& e) { return e.rfind(prefix, 0) == 0; }));
}

// Where `event` last appears (the step's last micro-batch).
std::size_t last_position(const std::vector<std::string>& log, const std::string& event) {
  const auto it = std::find(log.rbegin(), log.rend(), event);
  return it == log.rend() ? log.size() : static_cast<std::size_t>(log.rend() - it - 1);
}

// One block a bucket (bf16 + accumulator: each block's two tensors are 512 fp32 elements): on the
// last micro-batch, block i's bucket is issued right after its backward, before block i - 1's,
// and the rest (input.scale, head.w: one range) after backward; then one join.
TEST(GradientBuckets, EachBucketIsIssuedWhenItsBlocksBackwardIsDone) {
  const auto log = logged_step<DataParallel<LoggingCommunicator>>(3, 1, 2);
  ASSERT_EQ(count(log, "all_reduce_async"), blocks + 1);
  EXPECT_EQ(count(log, "all_reduce "), 0u) << "no whole-arena all-reduce";
  EXPECT_EQ(count(log, "join"), 1u);
  // The last micro-batch's backward: blocks 4 .. 0, each followed by its bucket.
  const std::size_t last = last_position(log, "backward " + std::to_string(blocks - 1) + " done");
  ASSERT_LT(last, log.size());
  for (std::size_t i = blocks; i-- > 0;) {
    const std::size_t at = last + 2 * (blocks - 1 - i);
    ASSERT_LT(at + 1, log.size());
    EXPECT_EQ(log[at], "backward " + std::to_string(i) + " done");
    EXPECT_EQ(log[at + 1], "all_reduce_async 512") << "block " << i << "'s bucket";
  }
  EXPECT_EQ(log[last + 2 * blocks], "all_reduce_async 512") << "the rest: input.scale and head.w";
  EXPECT_EQ(log[last + 2 * blocks + 1], "join");
}

// Buckets of at least 3000 bytes (2 blocks of 2 KiB in fp32): blocks 4+3, 2+1, then 0 alone,
// the first two reduced while blocks below still run backward.
TEST(GradientBuckets, ConsecutiveBlocksShareABucketOfTheConfiguredSize) {
  const auto log = logged_step<DataParallel<LoggingCommunicator>>(3, 3000, 2);
  EXPECT_EQ(count(log, "all_reduce_async"), 4u);
  EXPECT_LT(last_position(log, "all_reduce_async 1024"), last_position(log, "backward 0 done"))
      << "two buckets are issued before block 0's backward is done";
  std::vector<std::string> reduces;
  for (const auto& e : log) {
    if (e.rfind("all_reduce_async", 0) == 0) reduces.push_back(e);
  }
  EXPECT_EQ(reduces, (std::vector<std::string>{"all_reduce_async 1024", "all_reduce_async 1024", "all_reduce_async 512",
                                               "all_reduce_async 512"}));
}

// The first step surveys which gradients each block takes: its micro-batch 0 is not bucketed, but
// with three micro-batches its last one already is; with one, the first step reduces the arena.
TEST(GradientBuckets, TheFirstMicroBatchSurveysAndLaterOnesUseTheBuckets) {
  const auto first_of_three = logged_step<DataParallel<LoggingCommunicator>>(3, 1, 1);
  EXPECT_EQ(count(first_of_three, "all_reduce_async"), blocks + 1);
  EXPECT_EQ(count(first_of_three, "all_reduce_host 4"), 1u) << "the ranks check that their plans agree, once";
  const auto first_of_one = logged_step<DataParallel<LoggingCommunicator>>(1, 1, 1);
  EXPECT_EQ(count(first_of_one, "all_reduce_async"), 0u);
  EXPECT_EQ(count(first_of_one, "all_reduce "), 1u);
  const auto second_of_one = logged_step<DataParallel<LoggingCommunicator>>(1, 1, 2);
  EXPECT_EQ(count(second_of_one, "all_reduce_async"), blocks + 1);
  EXPECT_EQ(count(second_of_one, "all_reduce_host 4"), 0u);
}

// gradient_bucket_bytes = 0, ZeroRedundancy, and a model that runs its own forward_backward keep
// the one collective after backward.
TEST(GradientBuckets, OffForZeroBytesZeroRedundancyAndModelsThatAreNotLayered) {
  const auto off = logged_step<DataParallel<LoggingCommunicator>>(3, 0, 2);
  EXPECT_EQ(count(off, "all_reduce_async"), 0u);
  EXPECT_EQ(count(off, "all_reduce "), 1u);
  const auto zero = logged_step<ZeroRedundancy<LoggingCommunicator>>(3, 1, 2);
  EXPECT_EQ(count(zero, "all_reduce_async"), 0u);
  EXPECT_EQ(count(zero, "reduce_scatter"), 1u);

  using Tr = Trainer<teacher::StudentMlp, Precision<fp32>, AdamW<>, Host, DataParallel<LoggingCommunicator>>;
  const teacher::Teacher teach(16, 32, 4, 3);
  const auto ranks = run_ranks<std::vector<std::string>>(2, [&](HostCommunicator& host) {
    std::vector<std::string> log;
    LoggingCommunicator comm(host, log);
    Tr t(teacher::StudentMlp(16, 32, 4), {.seed = 3}, comm);
    std::mt19937_64 rng(3 + comm.rank());
    for (int s = 0; s < 2; ++s) {
      log.clear();
      const teacher::Batch b = teach.batch(8, rng);
      t.step(std::span<const teacher::Batch>(&b, 1));
    }
    return log;
  });
  ASSERT_EQ(ranks[0].error, "");
  EXPECT_EQ(count(*ranks[0].value, "all_reduce_async"), 0u);
  EXPECT_EQ(count(*ranks[0].value, "all_reduce "), 1u);
}

// Ranks whose plans differ (another gradient_bucket_bytes) get an error on every rank at the
// end of the survey, not collectives that do not match.
TEST(GradientBuckets, RanksWithDifferentBucketSizesAreRefused) {
  using Tr = Trainer<BucketModel, Precision<fp32>, SGD<>, Host, DataParallel<HostCommunicator>>;
  const auto batches = global_batches(5, 1, 2);
  const auto ranks = run_ranks<int>(2, [&](HostCommunicator& comm) {
    Tr t(BucketModel(), config_for<Tr>(5, 1, comm.rank() == 0 ? 1 : 3000), comm);
    t.step(std::span<const layered::Batch>(batches[0].data() + comm.rank(), 1));
    return 0;
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(ranks[r].error.find("the gradient buckets"), std::string::npos) << "rank " << r << ": " << ranks[r].error;
  }
}

}  // namespace
