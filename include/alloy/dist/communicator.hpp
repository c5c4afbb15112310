// What data parallelism asks of a communicator, and where a process learns its rank.
//
// A communicator is a value its rank owns (HostCommunicator: ranks as threads of one process;
// NcclCommunicator: one process per GPU). Every collective is called by every rank, in the same
// order, with the same counts; it runs on the backend the communicator names (its stream, on Cuda)
// over flat buffers in that backend's memory:
//   all_reduce(be, send, recv, n, op)       recv[i] = op over ranks of send[i]      (in place: send == recv)
//   reduce_scatter(be, send, recv, n, op)   send has n * world_size elements; rank r gets chunk r reduced
//   all_gather(be, send, recv, n)           recv has n * world_size elements; chunk r is rank r's send
//   broadcast(be, data, n, root)            every rank's data becomes root's
//   all_reduce_host(be, values, n, op)      a few host values (flags, norms, losses); returns when done
//   all_reduce_async(be, send, recv, n, op) all_reduce, ordered after the work queued on be so far;
//                                           the work queued on be later may run alongside it
//   join(be)                                be's later work waits for every all_reduce_async
//   wait(be)                                everything queued on be, and every all_reduce_async, has
//                                           finished, or an error
// all_reduce_async is how DataParallel reduces a LayeredModel's gradients in buckets while the rest
// of backward runs: NcclCommunicator runs it on a stream of its own, HostCommunicator at once.
// ReduceOp::mean is the sum divided by world_size (NCCL's ncclAvg). On every rank the result of
// a reduction has the same bits: HostCommunicator sums in rank order, NCCL's ring and tree
// algorithms reduce each element once and send the result to every rank.
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>

#include <concepts>
#include <cstddef>
#include <cstdlib>
#include <optional>
#include <string>

namespace alloy {

enum class ReduceOp { sum, mean, max, min };

inline const char* to_string(ReduceOp op) noexcept {
  switch (op) {
    case ReduceOp::sum:
      return "sum";
    case ReduceOp::mean:
      return "mean";
    case ReduceOp::max:
      return "max";
    case ReduceOp::min:
      return "min";
  }
  return "?";
}

template <class C>
concept Communicator = requires(C& c, typename C::backend_type be, const float* send, float* recv, std::size_t n,
                                double* host, ReduceOp op, int root) {
  requires backend<typename C::backend_type>;
  { c.rank() } -> std::same_as<int>;
  { c.world_size() } -> std::same_as<int>;
  c.all_reduce(be, send, recv, n, op);
  c.reduce_scatter(be, send, recv, n, op);
  c.all_gather(be, send, recv, n);
  c.broadcast(be, recv, n, root);
  c.all_reduce_host(be, host, n, op);
  c.all_reduce_async(be, send, recv, n, op);
  c.join(be);
  c.wait(be);
};

// This process's place in the job.
struct RankInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;  // the GPU this process drives on its node
};

namespace detail {

inline std::optional<int> env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < 0 || x > (1 << 30)) {
    throw error(std::string("alloy: environment variable ") + name + "='" + v + "' is not a non-negative integer");
  }
  return static_cast<int>(x);
}

}  // namespace detail

// Checks a rank and world size given explicitly (rank in [0, world_size), world_size >= 1).
inline RankInfo checked_rank(RankInfo r, const std::string& source = "given") {
  if (r.world_size < 1) {
    throw error("alloy: world size " + std::to_string(r.world_size) + " (" + source + "); at least 1");
  }
  if (r.rank < 0 || r.rank >= r.world_size) {
    throw error("alloy: rank " + std::to_string(r.rank) + " (" + source + ") is outside the world of " +
                std::to_string(r.world_size) + " ranks (0.." + std::to_string(r.world_size - 1) + ")");
  }
  if (r.local_rank < 0) throw error("alloy: local rank " + std::to_string(r.local_rank) + " (" + source + ")");
  return r;
}

// The rank and world size a launcher set: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, Open MPI's
// OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK, or Slurm's SLURM_PROCID / SLURM_NTASKS /
// SLURM_LOCALID, the first set found in that order. Without any, one rank of one (a plain run).
// A set with a rank but no size (or the reverse), or a rank outside the world, is an error.
inline RankInfo rank_from_environment() {
  struct Names {
    const char *rank, *size, *local;
  };
  constexpr Names sets[] = {{"RANK", "WORLD_SIZE", "LOCAL_RANK"},
                            {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"},
                            {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"}};
  for (const Names& s : sets) {
    const auto rank = detail::env_int(s.rank);
    const auto size = detail::env_int(s.size);
    if (!rank && !size) continue;
    const std::string source = std::string(s.rank) + "/" + s.size;
    if (!rank || !size) {
      throw error(std::string("alloy: ") + (rank ? s.rank : s.size) + " is set but " + (rank ? s.size : s.rank) +
                  " is not; a launcher sets both");
    }
    const int local = detail::env_int(s.local).value_or(*rank);
    return checked_rank({*rank, *size, local}, source);
  }
  return {};
}

}  // namespace alloy
