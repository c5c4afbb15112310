// NcclCommunicator: one process per GPU, collectives through NCCL (the engine every framework
// uses; no home-made transport). Present where the CUDA runtime and <nccl.h> are (the toolkit's
// NCCL); link libnccl (CMake: alloy::nccl). ALLOY_HAS_NCCL says whether this header defined it.
//
//   alloy::NcclCommunicator comm({.rank = alloy::rank_from_environment(), .id_directory = "/shared/run42"});
//
// Start-up: rank 0 asks NCCL for a unique id and writes it to <id_directory>/<id_file> atomically
// (a temporary file renamed into place); the other ranks poll for the file until the timeout. The
// directory must be one every rank sees (a node-local /tmp for one node, a shared file system
// for several); no MPI is needed (with MPI, NcclOptions::share_id sends it instead: see
// alloy/dist/mpi.hpp). Once every rank has joined, rank 0 removes the file, so give
// each launch its own directory or id_file: a file left by a crashed run with the same name
// would be read as this run's id (NCCL then fails to connect, and the timeout reports it).
//
// Failures: every NCCL call that fails throws alloy::cuda_error naming the call and NCCL's
// message. The communicator is non-blocking (ncclConfig_t::blocking = 0): initialization and
// wait() poll ncclCommGetAsyncError and the stream, and past the timeout they call
// ncclCommAbort and throw alloy::error, so a rank that dies or never arrives gives the others an
// error, not a hang. After an abort every call throws.
//
// NVLink multicast (NVLS) must stay off on shared machines: alloy sets nothing that enables it
// and leaves NCCL_NVLS_ENABLE as the environment has it (keep it 0 there).
#pragma once

#include <alloy/dist/communicator.hpp>
#include <alloy/numeric/traits.hpp>

#if ALLOY_HAS_CUDA_RUNTIME && __has_include(<nccl.h>)
#define ALLOY_HAS_NCCL 1
#include <nccl.h>

#include <unistd.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

namespace alloy {

namespace detail {

[[noreturn]] inline void throw_nccl(ncclResult_t status, const char* call, const char* file, int line,
                                    ncclComm_t comm = nullptr) {
  std::string message = ncclGetErrorString(status);
  if (comm) {
    const char* last = ncclGetLastError(comm);
    if (last && *last) message += ": " + std::string(last);
  }
  throw cuda_error(call, file, line, static_cast<int>(status), message);
}

template <class T>
ncclDataType_t nccl_type() {
  if constexpr (std::is_same_v<T, float>) {
    return ncclFloat32;
  } else if constexpr (std::is_same_v<T, double>) {
    return ncclFloat64;
  } else if constexpr (std::is_same_v<T, bf16>) {
    return ncclBfloat16;
  } else if constexpr (std::is_same_v<T, fp16>) {
    return ncclFloat16;
  } else if constexpr (std::is_same_v<T, std::uint8_t>) {
    return ncclUint8;
  } else {
    static_assert(std::is_same_v<T, float>,
                  "NcclCommunicator: elements must be float, double, fp16, bf16 or std::uint8_t");
    return ncclFloat32;
  }
}

inline ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
      return ncclSum;
    case ReduceOp::mean:
      return ncclAvg;
    case ReduceOp::max:
      return ncclMax;
    case ReduceOp::min:
      return ncclMin;
  }
  return ncclSum;
}

}  // namespace detail

struct NcclOptions {
  RankInfo rank;  // rank_from_environment(), or given
  // Where rank 0 leaves the unique id for the others: a directory every rank can read.
  std::filesystem::path id_directory = std::filesystem::temp_directory_path();
  std::string id_file = "alloy_nccl_id";
  // How long a rank waits for the id file, for initialization, and in wait() for a collective.
  std::chrono::milliseconds timeout = std::chrono::seconds(300);
  // The CUDA device of this rank; -1: rank.local_rank.
  int device = -1;
  // When set, how rank 0's unique id reaches the other ranks instead of the id file: called on
  // every rank with the id's bytes (rank 0's filled in, the others' to be overwritten); on return
  // every rank must hold rank 0's. alloy/dist/mpi.hpp's nccl_options_from_mpi sets an MPI_Bcast.
  std::function<void(std::span<char> id)> share_id = nullptr;
};

class NcclCommunicator {
 public:
  using backend_type = Cuda;

  explicit NcclCommunicator(NcclOptions options) : options_(std::move(options)) {
    info_ = checked_rank(options_.rank);
    const int device = options_.device >= 0 ? options_.device : info_.local_rank;
    ALLOY_CUDA_CHECK(cudaSetDevice(device));
    const ncclUniqueId id = exchange_id();
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    try {
      check(ncclCommInitRankConfig(&comm_, info_.world_size, id, info_.rank, &config), "ncclCommInitRankConfig");
      poll_until_ready("ncclCommInitRankConfig");
      ALLOY_CUDA_CHECK(cudaMalloc(&scratch_, scratch_bytes));
      ALLOY_CUDA_CHECK(cudaStreamCreateWithFlags(&async_stream_, cudaStreamNonBlocking));
      ALLOY_CUDA_CHECK(cudaEventCreateWithFlags(&issued_, cudaEventDisableTiming));
      ALLOY_CUDA_CHECK(cudaEventCreateWithFlags(&finished_, cudaEventDisableTiming));
    } catch (...) {
      abort();  // no destructor runs for a constructor that throws
      release_stream();
      throw;
    }
    // Every rank has read the id once initialization is through: the file has served.
    if (info_.rank == 0 && info_.world_size > 1 && !options_.share_id) {
      std::error_code ec;
      std::filesystem::remove(id_path(), ec);
    }
  }

  // Convenience: the rank from the launcher's environment (rank_from_environment()).
  NcclCommunicator() : NcclCommunicator(NcclOptions{.rank = rank_from_environment()}) {}

  // Finalizes (flushing what was queued) and destroys; when a peer is gone and finalizing fails
  // or does not settle within the timeout, aborts instead.
  ~NcclCommunicator() {
    if (scratch_) (void)cudaFree(scratch_);
    if (comm_) {
      const ncclResult_t r = ncclCommFinalize(comm_);
      if ((r == ncclSuccess || r == ncclInProgress) && settles(comm_, options_.timeout)) {
        (void)ncclCommDestroy(comm_);
      } else {
        (void)ncclCommAbort(comm_);
      }
    }
    release_stream();
  }

  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const noexcept { return info_.rank; }
  int world_size() const noexcept { return info_.world_size; }
  int local_rank() const noexcept { return info_.local_rank; }
  ncclComm_t handle() const noexcept { return comm_; }

  template <class T>
  void all_reduce(Cuda be, const T* send, T* recv, std::size_t n, ReduceOp op) {
    ready("ncclAllReduce");
    check(ncclAllReduce(send, recv, n, detail::nccl_type<T>(), detail::nccl_op(op), comm_, be.stream), "ncclAllReduce");
    settle("ncclAllReduce");
  }

  template <class T>
  void reduce_scatter(Cuda be, const T* send, T* recv, std::size_t n, ReduceOp op) {
    ready("ncclReduceScatter");
    check(ncclReduceScatter(send, recv, n, detail::nccl_type<T>(), detail::nccl_op(op), comm_, be.stream),
          "ncclReduceScatter");
    settle("ncclReduceScatter");
  }

  template <class T>
  void all_gather(Cuda be, const T* send, T* recv, std::size_t n) {
    ready("ncclAllGather");
    check(ncclAllGather(send, recv, n, detail::nccl_type<T>(), comm_, be.stream), "ncclAllGather");
    settle("ncclAllGather");
  }

  template <class T>
  void broadcast(Cuda be, T* data, std::size_t n, int root) {
    if (root < 0 || root >= world_size()) {
      throw error("NcclCommunicator::broadcast: root " + std::to_string(root) + " is outside the world of " +
                  std::to_string(world_size()) + " ranks");
    }
    ready("ncclBroadcast");
    check(ncclBroadcast(data, data, n, detail::nccl_type<T>(), root, comm_, be.stream), "ncclBroadcast");
    settle("ncclBroadcast");
  }

  // A few host values (flags, norms, losses) through the communicator's device scratch, ordered
  // on be's stream after what is queued there; returns when the result is back.
  void all_reduce_host(Cuda be, double* values, std::size_t n, ReduceOp op) {
    if (n * sizeof(double) > scratch_bytes) {
      throw error("NcclCommunicator::all_reduce_host: " + std::to_string(n) + " values; at most " +
                  std::to_string(scratch_bytes / sizeof(double)));
    }
    if (n == 0) return;
    auto* d = static_cast<double*>(scratch_);
    ALLOY_CUDA_CHECK(cudaMemcpyAsync(d, values, n * sizeof(double), cudaMemcpyHostToDevice, be.stream));
    all_reduce(be, d, d, n, op);
    ALLOY_CUDA_CHECK(cudaMemcpyAsync(values, d, n * sizeof(double), cudaMemcpyDeviceToHost, be.stream));
    wait(be);
  }

  // all_reduce on the communicator's own stream, after an event that marks the work queued on
  // be.stream so far: the kernels be.stream runs next (the next blocks' backward) overlap it.
  // send and recv must not be written on be.stream until join(be) (NCCL orders the communicator's
  // own collectives, on whichever stream, in the order they are issued).
  template <class T>
  void all_reduce_async(Cuda be, const T* send, T* recv, std::size_t n, ReduceOp op) {
    ready("ncclAllReduce");
    ALLOY_CUDA_CHECK(cudaEventRecord(issued_, be.stream));
    ALLOY_CUDA_CHECK(cudaStreamWaitEvent(async_stream_, issued_, 0));
    check(ncclAllReduce(send, recv, n, detail::nccl_type<T>(), detail::nccl_op(op), comm_, async_stream_),
          "ncclAllReduce");
    settle("ncclAllReduce");
  }

  // What be.stream queues from now on waits for every all_reduce_async issued so far (an event on
  // the communicator's stream; the host does not wait).
  void join(Cuda be) {
    ready("join");
    ALLOY_CUDA_CHECK(cudaEventRecord(finished_, async_stream_));
    ALLOY_CUDA_CHECK(cudaStreamWaitEvent(be.stream, finished_, 0));
  }

  // Waits until everything queued on be.stream (and every all_reduce_async: join first) has
  // finished, polling NCCL's asynchronous error state; a failure throws alloy::cuda_error, and
  // the timeout aborts the communicator and throws alloy::error.
  void wait(Cuda be) {
    ready("wait");
    join(be);
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      const cudaError_t q = cudaStreamQuery(be.stream);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) ALLOY_CUDA_CHECK(q);
      ncclResult_t state = ncclSuccess;
      check(ncclCommGetAsyncError(comm_, &state), "ncclCommGetAsyncError");
      if (state != ncclSuccess && state != ncclInProgress) {
        abort();
        detail::throw_nccl(state, "NcclCommunicator::wait (asynchronous error)", __FILE__, __LINE__);
      }
      if (std::chrono::steady_clock::now() - start > options_.timeout) {
        abort();
        throw error("NcclCommunicator: rank " + std::to_string(rank()) + " waited " +
                    std::to_string(options_.timeout.count()) +
                    " ms for its collectives to finish; a rank is gone or stalled (the communicator was aborted)");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  // Aborts the communicator: queued collectives end, and every later call throws.
  void abort() noexcept {
    if (comm_) (void)ncclCommAbort(comm_);
    comm_ = nullptr;
    aborted_ = true;
  }

 private:
  static constexpr std::size_t scratch_bytes = 64 * sizeof(double);

  std::filesystem::path id_path() const { return options_.id_directory / options_.id_file; }

  void release_stream() noexcept {
    if (finished_) (void)cudaEventDestroy(finished_);
    if (issued_) (void)cudaEventDestroy(issued_);
    if (async_stream_) (void)cudaStreamDestroy(async_stream_);
    finished_ = issued_ = nullptr;
    async_stream_ = nullptr;
  }

  void check(ncclResult_t r, const char* call) {
    if (r == ncclSuccess || r == ncclInProgress) return;
    detail::throw_nccl(r, call, __FILE__, __LINE__, comm_);
  }

  void ready(const char* call) {
    if (aborted_ || !comm_)
      throw error(std::string("NcclCommunicator: ") + call + " after the communicator was aborted");
  }

  // A non-blocking communicator may return ncclInProgress from an enqueue; the next call must
  // wait for it to settle (it is host-side work, not the collective itself).
  void settle(const char* call) { poll_until_ready(call); }

  void poll_until_ready(const char* call) {
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
      if (r != ncclSuccess) detail::throw_nccl(r, "ncclCommGetAsyncError", __FILE__, __LINE__, comm_);
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) {
        const std::string last = ncclGetLastError(comm_) ? ncclGetLastError(comm_) : "";
        abort();
        throw cuda_error(call, __FILE__, __LINE__, static_cast<int>(state),
                         std::string(ncclGetErrorString(state)) + (last.empty() ? "" : ": " + last));
      }
      if (std::chrono::steady_clock::now() - start > options_.timeout) {
        abort();
        throw error(std::string("NcclCommunicator: ") + call + " on rank " + std::to_string(rank()) +
                    " did not finish within " + std::to_string(options_.timeout.count()) +
                    " ms; a rank is missing or stalled (the communicator was aborted)");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  // Whether the communicator's asynchronous state reaches ncclSuccess within the timeout.
  static bool settles(ncclComm_t comm, std::chrono::milliseconds timeout) {
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      ncclResult_t state = ncclSuccess;
      if (ncclCommGetAsyncError(comm, &state) != ncclSuccess) return false;
      if (state == ncclSuccess) return true;
      if (state != ncclInProgress || std::chrono::steady_clock::now() - start > timeout) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  // Rank 0 writes the id (temporary file, then rename: a reader sees all 128 bytes or nothing);
  // the others poll for it.
  ncclUniqueId exchange_id() {
    ncclUniqueId id{};
    if (info_.world_size == 1) {
      check(ncclGetUniqueId(&id), "ncclGetUniqueId");
      return id;
    }
    if (options_.share_id) {
      if (info_.rank == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
      options_.share_id(std::span<char>(id.internal, sizeof(id.internal)));
      return id;
    }
    const auto path = id_path();
    if (info_.rank == 0) {
      check(ncclGetUniqueId(&id), "ncclGetUniqueId");
      std::filesystem::create_directories(options_.id_directory);
      const auto tmp = path.string() + ".tmp." + std::to_string(::getpid());
      {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        out.write(id.internal, sizeof(id.internal));
        out.flush();
        if (!out) throw error("NcclCommunicator: rank 0 could not write the NCCL id to " + tmp);
      }
      std::error_code ec;
      std::filesystem::rename(tmp, path, ec);
      if (ec)
        throw error("NcclCommunicator: rank 0 could not rename " + tmp + " to " + path.string() + ": " + ec.message());
      return id;
    }
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      std::ifstream in(path, std::ios::binary);
      if (in) {
        in.read(id.internal, sizeof(id.internal));
        if (in.gcount() == static_cast<std::streamsize>(sizeof(id.internal))) return id;
      }
      if (std::chrono::steady_clock::now() - start > options_.timeout) {
        throw error("NcclCommunicator: rank " + std::to_string(info_.rank) + " waited " +
                    std::to_string(options_.timeout.count()) + " ms for rank 0's NCCL id at " + path.string() +
                    "; is rank 0 running, and is the directory shared by every rank?");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  NcclOptions options_;
  RankInfo info_;
  ncclComm_t comm_ = nullptr;
  bool aborted_ = false;
  void* scratch_ = nullptr;
  cudaStream_t async_stream_ = nullptr;  // all_reduce_async's collectives
  cudaEvent_t issued_ = nullptr;         // be.stream's work before an all_reduce_async
  cudaEvent_t finished_ = nullptr;       // the async stream's work before a join
};

static_assert(Communicator<NcclCommunicator>);

}  // namespace alloy

#else
#define ALLOY_HAS_NCCL 0
#endif
