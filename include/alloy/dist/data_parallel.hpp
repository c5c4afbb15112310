// DataParallel<Comm>: the Trainer policy that makes each process (or thread, on Host) one
// replica of a data-parallel job. Every rank holds the whole model, runs its own micro-batches,
// and the gradients are summed over the ranks in the arena's flat layout, one collective per
// step, before the optimizer reads them (see train/data_parallel.hpp and docs/distributed.md).
//
//   alloy::NcclCommunicator comm;  // rank and world size from the launcher
//   alloy::Trainer<Model, alloy::Precision<alloy::bf16, alloy::fp32_master>, alloy::Accumulate<4>,
//                  alloy::DataParallel<alloy::NcclCommunicator>> trainer(Model{}, config, comm);
#pragma once

#include <alloy/dist/communicator.hpp>

namespace alloy {

template <class Comm>
struct DataParallel {
  static_assert(Communicator<Comm>,
                "DataParallel<Comm>: Comm must be a communicator (alloy::HostCommunicator, alloy::NcclCommunicator, "
                "or a type with rank(), world_size() and the collectives listed in alloy/dist/communicator.hpp)");
  using communicator_type = Comm;
};

template <class T>
inline constexpr bool is_data_parallel_v = false;
template <class Comm>
inline constexpr bool is_data_parallel_v<DataParallel<Comm>> = true;

}  // namespace alloy
