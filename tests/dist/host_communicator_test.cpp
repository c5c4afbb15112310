#include "../support/test_support.hpp"
#include "ranks.hpp"

#include <alloy/dist/host_communicator.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <future>
#include <limits>
#include <random>

namespace {

using namespace alloy;
using test::run_ranks;

// Rank r's input: values whose sum depends on the order it is taken in.
std::vector<float> input_of(int rank, std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed + static_cast<std::uint64_t>(rank));
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng) * std::ldexp(1.0f, static_cast<int>(rng() % 40) - 20);
  return v;
}

TEST(HostCommunicator, AllReduceSumsInRankOrderWithTheSameBitsOnEveryRank) {
  ALLOY_SEEDED(seed);
  for (int world : {1, 2, 3, 4}) {
    const std::size_t n = 1000;
    const auto results = run_ranks<std::vector<float>>(world, [&](HostCommunicator& c) {
      std::vector<float> v = input_of(c.rank(), n, seed);
      c.all_reduce(Host{}, v.data(), v.data(), n, ReduceOp::sum);  // in place
      return v;
    });
    std::vector<float> expected = input_of(0, n, seed);
    for (int r = 1; r < world; ++r) {
      const auto x = input_of(r, n, seed);
      for (std::size_t i = 0; i < n; ++i) expected[i] = expected[i] + x[i];
    }
    for (int r = 0; r < world; ++r) {
      ASSERT_EQ(results[r].error, "") << "rank " << r;
      EXPECT_EQ(std::memcmp(results[r].value->data(), expected.data(), n * sizeof(float)), 0)
          << "world " << world << " rank " << r;
    }
  }
}

TEST(HostCommunicator, MeanMaxAndMinAndNaNWins) {
  const auto results = run_ranks<std::vector<double>>(3, [](HostCommunicator& c) {
    const double r = c.rank();
    std::vector<double> out;
    for (ReduceOp op : {ReduceOp::mean, ReduceOp::max, ReduceOp::min}) {
      double v[2] = {r + 1.0, c.rank() == 1 ? std::numeric_limits<double>::quiet_NaN() : -r};
      c.all_reduce_host(Host{}, v, 2, op);
      out.insert(out.end(), v, v + 2);
    }
    return out;
  });
  for (const auto& r : results) {
    ASSERT_EQ(r.error, "");
    const auto& v = *r.value;
    EXPECT_EQ(v[0], 2.0);  // (1 + 2 + 3) / 3
    EXPECT_EQ(v[2], 3.0);
    EXPECT_EQ(v[4], 1.0);
    EXPECT_TRUE(std::isnan(v[1]) && std::isnan(v[3]) && std::isnan(v[5]));
  }
}

TEST(HostCommunicator, ReduceScatterGivesEachRankItsChunkOfTheSum) {
  constexpr int world = 3;
  constexpr std::size_t chunk = 5;
  const auto results = run_ranks<std::vector<float>>(world, [](HostCommunicator& c) {
    std::vector<float> send(chunk * world);
    for (std::size_t i = 0; i < send.size(); ++i) send[i] = float(i) + 100.0f * float(c.rank());
    std::vector<float> recv(chunk);
    c.reduce_scatter(Host{}, send.data(), recv.data(), chunk, ReduceOp::sum);
    return recv;
  });
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(results[r].error, "");
    for (std::size_t i = 0; i < chunk; ++i) {
      EXPECT_EQ((*results[r].value)[i], 3.0f * float(r * chunk + i) + 300.0f) << r << " " << i;
    }
  }
}

TEST(HostCommunicator, AllGatherPlacesRankRsChunkAtR) {
  constexpr int world = 3;
  const auto results = run_ranks<std::vector<float>>(world, [](HostCommunicator& c) {
    const float send[2] = {float(c.rank()), float(c.rank()) + 0.5f};
    std::vector<float> recv(2 * world);
    c.all_gather(Host{}, send, recv.data(), 2);
    return recv;
  });
  for (const auto& r : results) {
    ASSERT_EQ(r.error, "");
    EXPECT_EQ(*r.value, (std::vector<float>{0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 2.5f}));
  }
}

TEST(HostCommunicator, BroadcastCopiesTheRootsBuffer) {
  const auto results = run_ranks<std::vector<bf16>>(3, [](HostCommunicator& c) {
    std::vector<bf16> v(4, bf16(float(c.rank())));
    c.broadcast(Host{}, v.data(), v.size(), 2);
    return v;
  });
  for (const auto& r : results) {
    ASSERT_EQ(r.error, "");
    for (bf16 x : *r.value) EXPECT_EQ(float(x), 2.0f);
  }
}

// 16-bit values are summed in fp32 over the ranks and rounded once: 1 + 2^-8 + 2^-8 in bf16 is
// 1 + 2^-7, where rounding after each addition would give 1 (ties to even, twice).
TEST(HostCommunicator, SixteenBitSumsRoundOnce) {
  const auto results = run_ranks<float>(3, [](HostCommunicator& c) {
    bf16 v(c.rank() == 0 ? 1.0f : std::ldexp(1.0f, -8));
    c.all_reduce(Host{}, &v, &v, 1, ReduceOp::sum);
    return float(v);
  });
  for (const auto& r : results) EXPECT_EQ(*r.value, 1.0f + std::ldexp(1.0f, -7));
}

TEST(HostCommunicator, AMissingRankTimesOutWithAnErrorNotAHang) {
  HostWorld world(2, std::chrono::milliseconds(100));
  std::promise<void> rank0_done;
  std::string late;
  std::thread idle([&, done = rank0_done.get_future()] {
    HostCommunicator c(world, 1);
    done.wait();  // calls the collective only after rank 0 gave up on it
    late = test::message_of([&] {
      float x = 0;
      c.all_reduce(Host{}, &x, &x, 1, ReduceOp::sum);
    });
  });
  HostCommunicator c(world, 0);
  const auto start = std::chrono::steady_clock::now();
  const std::string m = test::message_of([&] {
    float x = 1;
    c.all_reduce(Host{}, &x, &x, 1, ReduceOp::sum);
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  rank0_done.set_value();
  idle.join();
  EXPECT_MENTIONS(m, "timed out");
  EXPECT_MENTIONS(m, "all_reduce for rank(s) 1");
  // The world is aborted: the late rank's collective fails at once, saying why.
  EXPECT_MENTIONS(late, "the world was aborted");
  EXPECT_MENTIONS(late, "waited 100 ms");
}

TEST(HostCommunicator, ARankThatLeavesAbortsTheWorldForTheOthers) {
  HostWorld world(2, std::chrono::seconds(60));
  std::thread gone([&] { HostCommunicator c(world, 1); });  // joins, then its thread ends
  gone.join();
  HostCommunicator c(world, 0);
  const auto start = std::chrono::steady_clock::now();
  const std::string m = test::message_of([&] {
    float x = 1;
    c.all_reduce(Host{}, &x, &x, 1, ReduceOp::sum);
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));  // not the 60 s timeout
  EXPECT_MENTIONS(m, "rank 1 left the world");
}

TEST(HostCommunicator, RanksThatDisagreeOnACollectiveAllGetTheError) {
  const auto results = run_ranks<int>(2, [](HostCommunicator& c) {
    std::vector<float> v(c.rank() == 0 ? 10 : 12);
    c.all_reduce(Host{}, v.data(), v.data(), v.size(), ReduceOp::sum);
    return 0;
  });
  for (const auto& r : results) {
    EXPECT_MENTIONS(r.error, "the ranks disagree on a collective");
    EXPECT_MENTIONS(r.error, "rank 0 called all_reduce<fp32>(10 elements, sum), rank 1 called all_reduce<fp32>(12");
  }
}

TEST(HostCommunicator, RefusesAWrongRankAndAWorldSizeMismatch) {
  HostWorld world(2);
  EXPECT_MENTIONS(test::message_of([&] { HostCommunicator c(world, 2); }), "rank 2 is outside the world of 2 ranks");
  EXPECT_MENTIONS(test::message_of([&] { HostCommunicator c(world, -1); }), "rank -1 is outside");
  EXPECT_MENTIONS(test::message_of([&] { HostCommunicator c(world, 0, 3); }),
                  "rank 0 expects a world of 3 ranks, but this HostWorld has 2");
  EXPECT_MENTIONS(test::message_of([&] { HostCommunicator c(world, RankInfo{.rank = 1, .world_size = 4}); }),
                  "expects a world of 4 ranks");
  HostCommunicator first(world, 1);
  EXPECT_MENTIONS(test::message_of([&] { HostCommunicator again(world, 1); }), "rank 1 joined the world twice");
  EXPECT_MENTIONS(test::message_of([] { HostWorld none(0); }), "world size 0");
}

// Sets environment variables for the test's duration, and restores what was there.
class Environment {
 public:
  void set(const char* name, const char* value) {
    const char* old = std::getenv(name);
    saved_.push_back({name, old ? std::optional<std::string>(old) : std::nullopt});
    if (value) {
      ::setenv(name, value, 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~Environment() {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      if (it->second) {
        ::setenv(it->first.c_str(), it->second->c_str(), 1);
      } else {
        ::unsetenv(it->first.c_str());
      }
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

TEST(RankFromEnvironment, ReadsTorchrunThenOpenMpiThenSlurm) {
  Environment env;
  for (const char* n : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                        "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"}) {
    env.set(n, nullptr);
  }
  RankInfo none = rank_from_environment();
  EXPECT_EQ(none.rank, 0);
  EXPECT_EQ(none.world_size, 1);
  env.set("SLURM_PROCID", "5");
  env.set("SLURM_NTASKS", "8");
  env.set("SLURM_LOCALID", "1");
  RankInfo slurm = rank_from_environment();
  EXPECT_EQ(slurm.rank, 5);
  EXPECT_EQ(slurm.world_size, 8);
  EXPECT_EQ(slurm.local_rank, 1);
  env.set("OMPI_COMM_WORLD_RANK", "2");
  env.set("OMPI_COMM_WORLD_SIZE", "4");
  EXPECT_EQ(rank_from_environment().rank, 2);
  EXPECT_EQ(rank_from_environment().local_rank, 2);  // no local rank given: the rank
  env.set("RANK", "1");
  env.set("WORLD_SIZE", "2");
  env.set("LOCAL_RANK", "0");
  const RankInfo torchrun = rank_from_environment();
  EXPECT_EQ(torchrun.rank, 1);
  EXPECT_EQ(torchrun.world_size, 2);
  EXPECT_EQ(torchrun.local_rank, 0);
}

TEST(RankFromEnvironment, RefusesARankOutsideTheWorldAndHalfASet) {
  Environment env;
  for (const char* n : {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"}) {
    env.set(n, nullptr);
  }
  env.set("LOCAL_RANK", nullptr);
  env.set("RANK", "2");
  env.set("WORLD_SIZE", "2");
  EXPECT_MENTIONS(test::message_of([] { rank_from_environment(); }),
                  "rank 2 (RANK/WORLD_SIZE) is outside the world of 2 ranks");
  env.set("WORLD_SIZE", nullptr);
  EXPECT_MENTIONS(test::message_of([] { rank_from_environment(); }), "RANK is set but WORLD_SIZE is not");
  env.set("WORLD_SIZE", "two");
  EXPECT_MENTIONS(test::message_of([] { rank_from_environment(); }), "WORLD_SIZE='two' is not a non-negative integer");
  EXPECT_MENTIONS(test::message_of([] { checked_rank({.rank = 0, .world_size = 0}); }), "world size 0");
}

}  // namespace
