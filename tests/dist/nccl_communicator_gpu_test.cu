// NcclCommunicator on one GPU, world size 1 (the one-GPU machine), and a data-parallel Trainer
// over it against the same trainer without DataParallel. NcclTwoRanks.* runs only under a
// launcher (RANK / WORLD_SIZE set, one process per GPU: scripts/nccl-ranks.sh) and skips
// otherwise; it has not yet run (docs/distributed.md).
// NVLink multicast stays off: NCCL_NVLS_ENABLE=0 is set before any communicator exists (ctest
// sets it too).
#include "../../examples/custom_model/teacher_mlp.hpp"
#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"
#include "../train/layered_model.hpp"

#include <alloy/alloy.hpp>
#include <alloy/dist/nccl_communicator.hpp>

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>

namespace {

using namespace alloy;

static_assert(ALLOY_HAS_NCCL, "this test is built only where CMake found NCCL");

// NCCL reads its environment when a communicator is first created.
const bool nvls_off = [] { return ::setenv("NCCL_NVLS_ENABLE", "0", 1) == 0; }();

NcclOptions world_of_one() {
  return {.rank = {.rank = 0, .world_size = 1, .local_rank = 0}, .timeout = std::chrono::seconds(60), .device = 0};
}

template <class T>
Buffer<T, Cuda> device_values(std::initializer_list<float> v, Cuda be) {
  std::vector<T> h;
  for (float x : v) h.push_back(T(x));
  Buffer<T, Cuda> b(h.size(), be);
  copy_from_host(b, std::span<const T>(h));
  return b;
}

TEST(NcclCommunicator, WorldOfOneCollectivesGiveTheInput) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ASSERT_TRUE(nvls_off);
  NcclCommunicator comm(world_of_one());
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.world_size(), 1);
  const Cuda be{};
  auto a = device_values<float>({1.5f, -2.0f, 3.25f}, be);
  comm.all_reduce(be, a.data(), a.data(), a.size(), ReduceOp::sum);
  comm.all_reduce(be, a.data(), a.data(), a.size(), ReduceOp::mean);
  auto b = device_values<bf16>({0.5f, 7.0f}, be);
  comm.all_reduce(be, b.data(), b.data(), b.size(), ReduceOp::max);
  Buffer<float, Cuda> scattered(3, be), gathered(3, be);
  comm.reduce_scatter(be, a.data(), scattered.data(), 3, ReduceOp::sum);
  comm.all_gather(be, scattered.data(), gathered.data(), 3);
  comm.broadcast(be, gathered.data(), 3, 0);
  comm.wait(be);
  EXPECT_EQ(to_host(gathered), (std::vector<float>{1.5f, -2.0f, 3.25f}));
  const auto hb = to_host(b);
  EXPECT_EQ(float(hb[0]), 0.5f);
  EXPECT_EQ(float(hb[1]), 7.0f);
  double host[2] = {2.5, -1.0};
  comm.all_reduce_host(be, host, 2, ReduceOp::sum);
  EXPECT_EQ(host[0], 2.5);
  EXPECT_EQ(host[1], -1.0);
}

// all_reduce_async runs on the communicator's stream after what be.stream queued before it (the
// copy in), and join orders be.stream's later work (the copy out) after it.
TEST(NcclCommunicator, AsyncAllReduceIsOrderedAfterTheStreamAndJoinedBack) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  NcclCommunicator comm(world_of_one());
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const Cuda be{stream};
  constexpr std::size_t n = std::size_t(1) << 22;
  std::vector<float> host(n);
  for (std::size_t i = 0; i < n; ++i) host[i] = static_cast<float>(i % 1000) - 500.0f;
  {
    // The buffers are freed on `stream` (stream-ordered): before it is destroyed.
    Buffer<float, Cuda> a(n, be), b(n, be);
    for (int round = 0; round < 3; ++round) {
      for (auto& v : host) v += 1.0f;
      ALLOY_CUDA_CHECK(cudaMemcpyAsync(a.data(), host.data(), n * sizeof(float), cudaMemcpyHostToDevice, stream));
      comm.all_reduce_async(be, a.data(), b.data(), n, ReduceOp::sum);
      comm.join(be);
      std::vector<float> back(n);
      ALLOY_CUDA_CHECK(cudaMemcpyAsync(back.data(), b.data(), n * sizeof(float), cudaMemcpyDeviceToHost, stream));
      comm.wait(be);
      EXPECT_EQ(std::memcmp(back.data(), host.data(), n * sizeof(float)), 0) << "round " << round;
    }
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

TEST(NcclCommunicator, RefusesABadRootAndTooManyHostValues) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  NcclCommunicator comm(world_of_one());
  Buffer<float, Cuda> x(4, Cuda{});
  EXPECT_MENTIONS(test::message_of([&] { comm.broadcast(Cuda{}, x.data(), 4, 1); }), "root 1 is outside");
  std::vector<double> many(1000);
  EXPECT_MENTIONS(test::message_of([&] { comm.all_reduce_host(Cuda{}, many.data(), many.size(), ReduceOp::sum); }),
                  "1000 values");
  EXPECT_MENTIONS(test::message_of([] { NcclCommunicator c({.rank = {.rank = 1, .world_size = 1}}); }),
                  "rank 1 (given) is outside the world of 1 ranks");
}

// Rank 1 of 2 with no rank 0: the id never comes, and the wait ends in an error.
TEST(NcclCommunicator, ARankWithoutRankZeroTimesOutWaitingForTheId) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  test::TempDir dir("alloy_nccl");
  const auto start = std::chrono::steady_clock::now();
  const std::string m = test::message_of([&] {
    NcclCommunicator c({.rank = {.rank = 1, .world_size = 2, .local_rank = 0},
                        .id_directory = dir.path(),
                        .timeout = std::chrono::milliseconds(300),
                        .device = 0});
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  EXPECT_MENTIONS(m, "waited 300 ms for rank 0's NCCL id");
}

// Rank 0 of 2 with no rank 1: it writes the id, NCCL's initialization waits for the missing
// peer, and the communicator is aborted at the timeout: an error, not a hang.
TEST(NcclCommunicator, ARankWhosePeerNeverComesIsAbortedAtTheTimeout) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  test::TempDir dir("alloy_nccl");
  const auto start = std::chrono::steady_clock::now();
  const std::string m = test::message_of([&] {
    NcclCommunicator c({.rank = {.rank = 0, .world_size = 2, .local_rank = 0},
                        .id_directory = dir.path(),
                        .timeout = std::chrono::seconds(3),
                        .device = 0});
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(60));
  EXPECT_MENTIONS(m, "ncclCommInitRankConfig");
}

// DataParallel<NcclCommunicator> (or ZeroRedundancy) with one rank is the plain trainer: the all-reduce of one rank
// leaves the bits, and the seed's divisor is 1. Without clipping, pass 1's norm (summed after the
// accumulation rather than during it) does not reach the update, so the parameters are bitwise
// equal; the norms agree to float rounding.
template <class P, int N, class Parallel = DataParallel<NcclCommunicator>, class O = AdamW<>>
void world_of_one_is_the_plain_trainer(float max_grad_norm) {
  using Plain = Trainer<teacher::StudentMlp, P, Accumulate<N>, O, Cuda>;
  using Replica = Trainer<teacher::StudentMlp, P, Accumulate<N>, O, Cuda, Parallel>;
  ALLOY_SEEDED(seed);
  NcclCommunicator comm(world_of_one());
  typename Plain::Config pc{};
  pc.max_grad_norm = max_grad_norm;
  pc.seed = seed;
  typename Replica::Config rc{};
  rc.max_grad_norm = max_grad_norm;
  rc.seed = seed;
  Plain plain(teacher::StudentMlp(16, 32, 4), pc);
  Replica replica(teacher::StudentMlp(16, 32, 4), rc, comm);
  const teacher::Teacher t(16, 32, 4, seed);
  std::mt19937_64 rng(seed);
  for (int s = 0; s < 10; ++s) {
    std::vector<teacher::Batch> batches;
    for (int i = 0; i < N; ++i) batches.push_back(t.batch(32, rng));
    const auto a = plain.step(std::span<const teacher::Batch>(batches));
    const auto b = replica.step(std::span<const teacher::Batch>(batches));
    EXPECT_EQ(a.loss, b.loss) << "step " << s;
    EXPECT_NEAR(a.grad_norm, b.grad_norm, 1e-5 * a.grad_norm) << "step " << s;
    EXPECT_EQ(a.skipped, b.skipped);
  }
  const auto pa = to_host(plain.store().params_arena()), pb = to_host(replica.store().params_arena());
  ASSERT_EQ(pa.size(), pb.size());
  EXPECT_EQ(std::memcmp(pa.data(), pb.data(), pa.size() * sizeof(pa[0])), 0);
}

TEST(NcclDataParallel, WorldOfOneIsThePlainTrainerFp32Clipped) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  world_of_one_is_the_plain_trainer<Precision<fp32>, 1>(0.5f);
}

TEST(NcclDataParallel, WorldOfOneIsThePlainTrainerBf16Accumulating) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  world_of_one_is_the_plain_trainer<Precision<bf16, fp32_master>, 4>(0.0f);
}

// ZeroRedundancy with one rank: the range is the whole arena (reduce-scatter and all-gather in
// place), q8 state included.
TEST(NcclDataParallel, ZeroRedundancyWorldOfOneIsThePlainTrainer) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  world_of_one_is_the_plain_trainer<Precision<bf16, fp32_master>, 2, ZeroRedundancy<NcclCommunicator>>(0.0f);
  world_of_one_is_the_plain_trainer<Precision<bf16, fp32_master>, 2, ZeroRedundancy<NcclCommunicator>,
                                    AdamW<State<q8>>>(0.0f);
}

// A LayeredModel's gradients reduced in buckets (one block each: all_reduce_async on the
// communicator's stream while the blocks below run backward, then join) are the plain trainer's,
// with and without the fp32 accumulator.
template <class P, int N>
void bucketed_world_of_one_is_the_plain_trainer() {
  using Plain = Trainer<layered::Model, P, Accumulate<N>, AdamW<>, Cuda>;
  using Replica = Trainer<layered::Model, P, Accumulate<N>, AdamW<>, Cuda, DataParallel<NcclCommunicator>>;
  ALLOY_SEEDED(seed);
  NcclCommunicator comm(world_of_one());
  typename Plain::Config pc{};
  pc.seed = seed;
  typename Replica::Config rc{};
  rc.seed = seed;
  rc.gradient_bucket_bytes = 1;
  Plain plain(layered::Model(40, 6), pc);
  Replica replica(layered::Model(40, 6), rc, comm);
  std::mt19937_64 rng(seed);
  for (int s = 0; s < 6; ++s) {
    std::vector<layered::Batch> batches;
    for (int i = 0; i < N; ++i) batches.push_back(layered::random_batch(16, 40, rng));
    const auto a = plain.step(std::span<const layered::Batch>(batches));
    const auto b = replica.step(std::span<const layered::Batch>(batches));
    EXPECT_EQ(a.loss, b.loss) << "step " << s;
  }
  const auto pa = to_host(plain.store().params_arena()), pb = to_host(replica.store().params_arena());
  ASSERT_EQ(pa.size(), pb.size());
  EXPECT_EQ(std::memcmp(pa.data(), pb.data(), pa.size() * sizeof(pa[0])), 0);
}

TEST(NcclDataParallel, BucketedWorldOfOneIsThePlainTrainer) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  bucketed_world_of_one_is_the_plain_trainer<Precision<fp32>, 1>();
  bucketed_world_of_one_is_the_plain_trainer<Precision<bf16, fp32_master>, 3>();
}

// Saved by the replica (rank 0 writes), loaded by a plain trainer.
TEST(NcclDataParallel, ACheckpointFromAReplicaLoadsIntoThePlainTrainer) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  using P = Precision<bf16, fp32_master>;
  using Replica = Trainer<teacher::StudentMlp, P, AdamW<>, Cuda, DataParallel<NcclCommunicator>>;
  using Plain = Trainer<teacher::StudentMlp, P, AdamW<>, Cuda>;
  NcclCommunicator comm(world_of_one());
  test::TempDir dir("alloy_nccl");
  Replica replica(teacher::StudentMlp(16, 32, 4), {.seed = 3}, comm);
  const teacher::Teacher t(16, 32, 4, 3);
  std::mt19937_64 rng(3);
  for (int s = 0; s < 3; ++s) {
    const auto b = t.batch(32, rng);
    replica.step([&] { return b; });
  }
  replica.save(dir / "replica.safetensors");
  Plain plain(teacher::StudentMlp(16, 32, 4), {.seed = 4});
  plain.load(dir / "replica.safetensors");
  const auto a = to_host(replica.store().master_arena()), b = to_host(plain.store().master_arena());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
  EXPECT_EQ(plain.steps(), 3u);
}

// Every rank of a launched job (scripts/nccl-ranks.sh) against one process on the global batch,
// computed on the rank's own GPU: one micro-batch per rank in fp32, where the sum over the ranks
// is the order one process accumulates in (with two ranks a + b; NCCL reduces each element once
// and sends every rank the same bits), so the parameters are bitwise equal, clipping included
// for DataParallel and without clipping for ZeroRedundancy (its norm is summed per range).
template <class Parallel>
void ranks_equal_one_process(const std::string& tag, float max_grad_norm) {
  const RankInfo info = rank_from_environment();
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  if (info.world_size < 2) GTEST_SKIP() << "needs a launcher (RANK / WORLD_SIZE >= 2): scripts/nccl-ranks.sh";
  const char* dir = std::getenv("ALLOY_NCCL_ID_DIR");
  ASSERT_TRUE(dir && *dir) << "ALLOY_NCCL_ID_DIR: a directory every rank sees, fresh for this launch";
  using P = Precision<fp32>;
  using Plain = Trainer<teacher::StudentMlp, P, SGD<>, Cuda>;
  using Replica = Trainer<teacher::StudentMlp, P, SGD<>, Cuda, Parallel>;
  // One id file per communicator: each test makes its own.
  NcclCommunicator comm({.rank = info, .id_directory = dir, .id_file = "alloy_nccl_id_" + tag});
  const int world = comm.world_size();
  constexpr std::uint64_t seed = 20261202;
  typename Plain::Config pc{};
  pc.max_grad_norm = max_grad_norm;
  pc.seed = seed;
  pc.micro_batches = world;
  typename Replica::Config rc{};
  rc.max_grad_norm = max_grad_norm;
  rc.seed = seed;
  Plain plain(teacher::StudentMlp(16, 32, 4), pc);
  Replica replica(teacher::StudentMlp(16, 32, 4), rc, comm);
  const teacher::Teacher t(16, 32, 4, seed);
  std::mt19937_64 rng(seed);
  for (int s = 0; s < 8; ++s) {
    std::vector<teacher::Batch> global;
    for (int r = 0; r < world; ++r) global.push_back(t.batch(32, rng));
    const auto a = plain.step(std::span<const teacher::Batch>(global));
    const auto b = replica.step(std::span<const teacher::Batch>(global.data() + comm.rank(), 1));
    EXPECT_EQ(a.loss, b.loss) << "step " << s;
    EXPECT_EQ(a.skipped, b.skipped);
  }
  const auto pa = to_host(plain.store().params_arena()), pb = to_host(replica.store().params_arena());
  ASSERT_LE(pa.size(), pb.size());
  EXPECT_EQ(std::memcmp(pa.data(), pb.data(), pa.size() * sizeof(float)), 0) << "rank " << comm.rank();
}

TEST(NcclTwoRanks, DataParallelEqualsOneProcessBitwise) {
  ranks_equal_one_process<DataParallel<NcclCommunicator>>("dp", 0.5f);
}

// The same with a LayeredModel whose gradients are reduced in buckets (one block each) while
// backward runs: one micro-batch per rank in fp32, bitwise one process, clipping included.
TEST(NcclTwoRanks, BucketedDataParallelEqualsOneProcessBitwise) {
  const RankInfo info = rank_from_environment();
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  if (info.world_size < 2) GTEST_SKIP() << "needs a launcher (RANK / WORLD_SIZE >= 2): scripts/nccl-ranks.sh";
  const char* dir = std::getenv("ALLOY_NCCL_ID_DIR");
  ASSERT_TRUE(dir && *dir) << "ALLOY_NCCL_ID_DIR: a directory every rank sees, fresh for this launch";
  using Plain = Trainer<layered::Model, Precision<fp32>, SGD<>, Cuda>;
  using Replica = Trainer<layered::Model, Precision<fp32>, SGD<>, Cuda, DataParallel<NcclCommunicator>>;
  NcclCommunicator comm({.rank = info, .id_directory = dir, .id_file = "alloy_nccl_id_buckets"});
  const int world = comm.world_size();
  constexpr std::uint64_t seed = 20261203;
  typename Plain::Config pc{};
  pc.max_grad_norm = 0.5f;
  pc.seed = seed;
  pc.micro_batches = world;
  typename Replica::Config rc{};
  rc.max_grad_norm = 0.5f;
  rc.seed = seed;
  rc.gradient_bucket_bytes = 1;
  Plain plain(layered::Model(40, 6), pc);
  Replica replica(layered::Model(40, 6), rc, comm);
  std::mt19937_64 rng(seed);
  for (int s = 0; s < 8; ++s) {
    std::vector<layered::Batch> global;
    for (int r = 0; r < world; ++r) global.push_back(layered::random_batch(16, 40, rng));
    const auto a = plain.step(std::span<const layered::Batch>(global));
    const auto b = replica.step(std::span<const layered::Batch>(global.data() + comm.rank(), 1));
    EXPECT_EQ(a.loss, b.loss) << "step " << s;
  }
  const auto pa = to_host(plain.store().params_arena()), pb = to_host(replica.store().params_arena());
  ASSERT_EQ(pa.size(), pb.size());
  EXPECT_EQ(std::memcmp(pa.data(), pb.data(), pa.size() * sizeof(float)), 0) << "rank " << comm.rank();
}

TEST(NcclTwoRanks, ZeroRedundancyEqualsOneProcessBitwiseWithoutClipping) {
  ranks_equal_one_process<ZeroRedundancy<NcclCommunicator>>("zero", 0.0f);
}

}  // namespace
