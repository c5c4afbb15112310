// DataParallel<Comm>: the Trainer policy that makes each process (or thread, on Host) one
// replica of a data-parallel job. Every rank holds the whole model, runs its own micro-batches,
// and the gradients are summed over the ranks in the arena's flat layout before the optimizer
// reads them: a LayeredModel's in buckets of blocks while backward runs
// (train/gradient_buckets.hpp), any other's in one collective per step (train/data_parallel.hpp;
// docs/distributed.md).
//
//   alloy::NcclCommunicator comm;  // rank and world size from the launcher
//   alloy::Trainer<Model, alloy::Precision<alloy::bf16, alloy::fp32_master>, alloy::Accumulate<4>,
//                  alloy::DataParallel<alloy::NcclCommunicator>> trainer(Model{}, config, comm);
//   // or alloy::ZeroRedundancy<alloy::NcclCommunicator>: optimizer state divided among the ranks
#pragma once

#include <alloy/dist/communicator.hpp>

#include <type_traits>

namespace alloy {

// How the replicas hold the optimizer's memory: Replicated (each the whole master copy and
// state), or ShardedState (ZeRO-1: each rank the master weights and optimizer state of one
// contiguous range of the flat arenas; gradients reduce-scattered, parameters all-gathered).
struct Replicated {
  static constexpr bool shards_state = false;
};
struct ShardedState {
  static constexpr bool shards_state = true;
};

template <class Comm, class Sharding = Replicated>
struct DataParallel {
  static_assert(Communicator<Comm>,
                "DataParallel<Comm>: Comm must be a communicator (alloy::HostCommunicator, alloy::NcclCommunicator, "
                "or a type with rank(), world_size() and the collectives listed in alloy/dist/communicator.hpp)");
  static_assert(std::is_same_v<Sharding, Replicated> || std::is_same_v<Sharding, ShardedState>,
                "DataParallel<Comm, Sharding>: Sharding is alloy::Replicated or alloy::ShardedState");
  using communicator_type = Comm;
  static constexpr bool shards_state = Sharding::shards_state;
};

// ZeRO-1 (DeepSpeed's name, PyTorch's ZeroRedundancyOptimizer): data parallelism with the master
// weights and optimizer state sharded over the ranks.
template <class Comm>
using ZeroRedundancy = DataParallel<Comm, ShardedState>;

template <class T>
inline constexpr bool is_data_parallel_v = false;
template <class Comm, class Sharding>
inline constexpr bool is_data_parallel_v<DataParallel<Comm, Sharding>> = true;

}  // namespace alloy
