// With MPI (the application links it and calls MPI_Init): a process's rank from an MPI
// communicator, and NCCL's unique id sent from rank 0 to the others through it instead of through
// a file in a shared directory. alloy does not link MPI itself; this header needs <mpi.h>
// (CMake: find_package(MPI) and MPI::MPI_CXX) and defines ALLOY_HAS_MPI as 1 where it has it.
//
//   MPI_Init(&argc, &argv);
//   alloy::NcclCommunicator comm(alloy::nccl_options_from_mpi(MPI_COMM_WORLD));
//   ... train ...
//   // the communicator is destroyed before MPI_Finalize
//
// The local rank (the GPU a process drives) is its rank among the processes of its node
// (MPI_Comm_split_type with MPI_COMM_TYPE_SHARED). MPI calls that fail throw alloy::error with
// MPI's message (where the communicator returns errors; under MPI's default handler a failure
// aborts the job first).
#pragma once

#include <alloy/dist/communicator.hpp>
#include <alloy/dist/nccl_communicator.hpp>
#include <alloy/error.hpp>

#if __has_include(<mpi.h>)

#include <mpi.h>

#include <climits>
#include <functional>
#include <span>
#include <string>

#define ALLOY_HAS_MPI 1

namespace alloy {

namespace detail {

inline void check_mpi(int status, const char* call) {
  if (status == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(status, text, &length);
  throw error(std::string("alloy: ") + call + " failed: " + std::string(text, static_cast<std::size_t>(length)));
}

}  // namespace detail

// This process's rank and world size in `comm`, and its rank among the processes of its node.
inline RankInfo rank_from_mpi(MPI_Comm comm = MPI_COMM_WORLD) {
  int initialized = 0;
  detail::check_mpi(MPI_Initialized(&initialized), "MPI_Initialized");
  if (!initialized) throw error("alloy::rank_from_mpi: MPI is not initialized (call MPI_Init first)");
  RankInfo r;
  detail::check_mpi(MPI_Comm_rank(comm, &r.rank), "MPI_Comm_rank");
  detail::check_mpi(MPI_Comm_size(comm, &r.world_size), "MPI_Comm_size");
  MPI_Comm node = MPI_COMM_NULL;
  detail::check_mpi(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, r.rank, MPI_INFO_NULL, &node),
                    "MPI_Comm_split_type");
  const int status = MPI_Comm_rank(node, &r.local_rank);
  MPI_Comm_free(&node);
  detail::check_mpi(status, "MPI_Comm_rank (node)");
  return checked_rank(r, "MPI");
}

// Every rank's `bytes` become rank `root`'s (every rank calls it, with the same size).
inline void broadcast_bytes(MPI_Comm comm, std::span<char> bytes, int root = 0) {
  if (bytes.size() > static_cast<std::size_t>(INT_MAX)) throw error("alloy::broadcast_bytes: too many bytes for MPI");
  detail::check_mpi(MPI_Bcast(bytes.data(), static_cast<int>(bytes.size()), MPI_BYTE, root, comm), "MPI_Bcast");
}

#if ALLOY_HAS_NCCL
// NcclOptions for this process from `comm`: its rank (rank_from_mpi) and NCCL's unique id
// broadcast from rank 0 through MPI (no id file). `comm` must stay valid until the communicator
// is constructed.
inline NcclOptions nccl_options_from_mpi(MPI_Comm comm = MPI_COMM_WORLD) {
  NcclOptions o;
  o.rank = rank_from_mpi(comm);
  o.share_id = [comm](std::span<char> id) { broadcast_bytes(comm, id, 0); };
  return o;
}
#endif

}  // namespace alloy

#else
#define ALLOY_HAS_MPI 0
#endif
