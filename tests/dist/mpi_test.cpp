// alloy/dist/mpi.hpp under mpiexec (2 and 3 processes, tests/CMakeLists.txt): every rank runs
// every test; a test fails the job when it fails on any rank. Nothing here needs a GPU:
// nccl_options_from_mpi's id exchange is checked on bytes, not through NCCL.
#include <alloy/dist/mpi.hpp>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <random>
#include <set>
#include <span>
#include <vector>

static_assert(ALLOY_HAS_MPI, "this test is built only where <mpi.h> is");

namespace {

int mpi_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int mpi_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

// A seed drawn on rank 0 and sent to every rank (by MPI directly, not by the code under test).
std::uint64_t shared_seed() {
  std::uint64_t seed = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  return seed;
}

std::vector<char> bytes_from(std::uint64_t seed, std::size_t n) {
  std::mt19937_64 rng(seed);
  std::vector<char> v(n);
  for (auto& b : v) b = static_cast<char>(rng() & 0xff);
  return v;
}

TEST(Mpi, RankFromMpiIsMpisRankWithADistinctLocalRank) {
  const alloy::RankInfo r = alloy::rank_from_mpi(MPI_COMM_WORLD);
  EXPECT_EQ(r.rank, mpi_rank());
  EXPECT_EQ(r.world_size, mpi_size());
  ASSERT_GE(r.local_rank, 0);
  ASSERT_LT(r.local_rank, r.world_size);
  std::vector<int> locals(static_cast<std::size_t>(r.world_size));
  MPI_Allgather(&r.local_rank, 1, MPI_INT, locals.data(), 1, MPI_INT, MPI_COMM_WORLD);
  // Every process of this test runs on one machine: the local ranks are 0 .. world - 1, once each.
  EXPECT_EQ(std::set<int>(locals.begin(), locals.end()).size(), locals.size());
}

TEST(Mpi, BroadcastBytesGivesEveryRankRootsBytes) {
  const std::uint64_t seed = shared_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(128), std::size_t(1) << 20}) {
    for (int root : {0, mpi_size() - 1}) {
      const std::vector<char> want = bytes_from(seed + n + std::size_t(root), n);
      std::vector<char> got = mpi_rank() == root ? want : bytes_from(seed + 1000 + std::size_t(mpi_rank()), n);
      alloy::broadcast_bytes(MPI_COMM_WORLD, std::span<char>(got), root);
      EXPECT_EQ(got, want) << n << " bytes from rank " << root;
    }
  }
}

TEST(Mpi, RanksOfASplitCommunicator) {
  // The odd and the even ranks apart: rank_from_mpi speaks of the communicator it is given.
  MPI_Comm half = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, mpi_rank() % 2, mpi_rank(), &half);
  const alloy::RankInfo r = alloy::rank_from_mpi(half);
  EXPECT_EQ(r.rank, mpi_rank() / 2);
  EXPECT_EQ(r.world_size, (mpi_size() + 1 - mpi_rank() % 2) / 2);
  MPI_Comm_free(&half);
}

#if ALLOY_HAS_NCCL
TEST(Mpi, NcclOptionsFromMpiCarryTheRankAndSendRankZerosId) {
  const alloy::NcclOptions o = alloy::nccl_options_from_mpi(MPI_COMM_WORLD);
  EXPECT_EQ(o.rank.rank, mpi_rank());
  EXPECT_EQ(o.rank.world_size, mpi_size());
  ASSERT_TRUE(o.share_id) << "the id goes through MPI, not a file";
  const std::uint64_t seed = shared_seed();
  const std::vector<char> want = bytes_from(seed, 128);  // an ncclUniqueId's size
  std::vector<char> id = mpi_rank() == 0 ? want : std::vector<char>(128, 0);
  o.share_id(std::span<char>(id));
  EXPECT_EQ(id, want);
}
#endif

}  // namespace

// MPI around the tests; the job fails when any rank's tests fail.
int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  const int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any;
}
