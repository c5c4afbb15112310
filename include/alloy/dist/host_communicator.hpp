// HostCommunicator: the ranks of a data-parallel job as threads of one process, sharing a
// HostWorld. It stands in for NCCL where there is no GPU (CI), so the data-parallel logic is
// tested on the Host backend.
//
//   alloy::HostWorld world(2);                     // two ranks, a 60 s timeout per collective
//   std::thread t([&] { alloy::HostCommunicator c(world, 1); train(c); });
//   alloy::HostCommunicator c(world, 0); train(c); t.join();
//
// Deterministic: a reduction is computed by every rank from every rank's input in rank order
// (rank 0 + rank 1 + ...; 16-bit values summed in fp32 and rounded once), so it gives the same
// bits on every rank and in every run. A collective waits at most the world's timeout for the
// other ranks; then, or when a rank leaves (its communicator is destroyed) or a collective fails,
// the world is aborted and every waiting and later collective throws alloy::error, as NCCL's
// abort does: a dead rank gives an error, not a hang. Ranks that call collectives with different
// counts, element types or kinds get an error naming both, on every rank.
#pragma once

#include <alloy/dist/communicator.hpp>
#include <alloy/numeric/rounding.hpp>
#include <alloy/numeric/traits.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace alloy {

class HostWorld {
 public:
  explicit HostWorld(int world_size, std::chrono::milliseconds timeout = std::chrono::seconds(60))
      : size_(world_size),
        timeout_(timeout),
        slots_(static_cast<std::size_t>(world_size > 0 ? world_size : 0)),
        joined_(slots_.size(), false),
        arrived_(slots_.size(), false) {
    if (world_size < 1) throw error("HostWorld: world size " + std::to_string(world_size) + "; at least 1");
  }
  HostWorld(const HostWorld&) = delete;
  HostWorld& operator=(const HostWorld&) = delete;

  int size() const noexcept { return size_; }
  std::chrono::milliseconds timeout() const noexcept { return timeout_; }

  // Why the world was aborted; empty while it was not.
  std::string abort_reason() const {
    std::lock_guard lock(mutex_);
    return aborted_;
  }

 private:
  friend class HostCommunicator;

  // One rank's side of the collective in progress.
  struct Slot {
    const char* kind = nullptr;  // "all_reduce", ...
    const char* type = nullptr;  // element type name
    const void* send = nullptr;
    std::size_t count = 0;
    ReduceOp op = ReduceOp::sum;
    int root = 0;
  };

  void join(int rank, int world_size) {
    std::lock_guard lock(mutex_);
    if (world_size != size_) {
      throw error("HostCommunicator: rank " + std::to_string(rank) + " expects a world of " +
                  std::to_string(world_size) + " ranks, but this HostWorld has " + std::to_string(size_));
    }
    if (rank < 0 || rank >= size_) {
      throw error("HostCommunicator: rank " + std::to_string(rank) + " is outside the world of " +
                  std::to_string(size_) + " ranks (0.." + std::to_string(size_ - 1) + ")");
    }
    if (joined_[rank]) throw error("HostCommunicator: rank " + std::to_string(rank) + " joined the world twice");
    joined_[rank] = true;
  }

  void leave(int rank) {
    std::lock_guard lock(mutex_);
    joined_[rank] = false;
    // A rank that leaves while others may still call collectives would leave them waiting.
    if (aborted_.empty()) aborted_ = "rank " + std::to_string(rank) + " left the world";
    cv_.notify_all();
  }

  void abort(std::unique_lock<std::mutex>&, std::string reason) {
    if (aborted_.empty()) aborted_ = std::move(reason);
    cv_.notify_all();
  }

  [[noreturn]] void throw_aborted(int rank, const char* kind) const {
    throw error("HostCommunicator: rank " + std::to_string(rank) + " " + kind + ": the world was aborted (" + aborted_ +
                ")");
  }

  // Waits until every rank has arrived at this point (a generation of the barrier), the timeout,
  // or an abort. Throws alloy::error in the last two cases, aborting the world on a timeout.
  void arrive_and_wait(int rank, const char* kind) {
    std::unique_lock lock(mutex_);
    if (!aborted_.empty()) throw_aborted(rank, kind);
    const std::uint64_t generation = generation_;
    arrived_[rank] = true;
    if (++arrived_count_ == size_) {
      arrived_count_ = 0;
      std::fill(arrived_.begin(), arrived_.end(), false);
      ++generation_;
      cv_.notify_all();
      return;
    }
    const bool done = cv_.wait_for(lock, timeout_, [&] { return generation_ != generation || !aborted_.empty(); });
    if (generation_ != generation) return;
    if (done) throw_aborted(rank, kind);
    std::string missing;
    for (int r = 0; r < size_; ++r) {
      if (!arrived_[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
    }
    const std::string reason = "rank " + std::to_string(rank) + " waited " + std::to_string(timeout_.count()) +
                               " ms in " + kind + " for rank(s) " + missing;
    abort(lock, reason);
    throw error("HostCommunicator: timed out: " + reason);
  }

  int size_;
  std::chrono::milliseconds timeout_;
  std::vector<Slot> slots_;
  std::vector<bool> joined_;
  std::vector<bool> arrived_;
  int arrived_count_ = 0;
  std::uint64_t generation_ = 0;
  std::string aborted_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
};

class HostCommunicator {
 public:
  using backend_type = Host;

  // Joins `world` as `rank`. world_size, when given (a launcher's or a configuration's value),
  // must be the world's.
  HostCommunicator(HostWorld& world, int rank, std::optional<int> world_size = std::nullopt)
      : world_(&world), rank_(rank) {
    world.join(rank, world_size.value_or(world.size()));
  }
  HostCommunicator(HostWorld& world, RankInfo info) : HostCommunicator(world, info.rank, info.world_size) {}
  ~HostCommunicator() {
    if (world_) world_->leave(rank_);
  }
  HostCommunicator(const HostCommunicator&) = delete;
  HostCommunicator& operator=(const HostCommunicator&) = delete;
  HostCommunicator(HostCommunicator&& o) noexcept : world_(std::exchange(o.world_, nullptr)), rank_(o.rank_) {}
  HostCommunicator& operator=(HostCommunicator&&) = delete;

  int rank() const noexcept { return rank_; }
  int world_size() const noexcept { return world_->size(); }

  template <class T>
  void all_reduce(Host, const T* send, T* recv, std::size_t n, ReduceOp op) {
    run<T>(
        "all_reduce", send, n, op, 0,
        [&](const std::vector<HostWorld::Slot>& s) {
          std::vector<T> out(n);
          reduce<T>(s, 0, n, op, out.data());
          return out;
        },
        recv);
  }

  // send: n * world_size() elements; recv: n, this rank's chunk of the reduction.
  template <class T>
  void reduce_scatter(Host, const T* send, T* recv, std::size_t n, ReduceOp op) {
    run<T>(
        "reduce_scatter", send, n, op, 0,
        [&](const std::vector<HostWorld::Slot>& s) {
          std::vector<T> out(n);
          reduce<T>(s, static_cast<std::size_t>(rank_) * n, n, op, out.data());
          return out;
        },
        recv);
  }

  // send: n elements; recv: n * world_size(), rank r's at r * n.
  template <class T>
  void all_gather(Host, const T* send, T* recv, std::size_t n) {
    run<T>(
        "all_gather", send, n, ReduceOp::sum, 0,
        [&](const std::vector<HostWorld::Slot>& s) {
          std::vector<T> out(n * s.size());
          for (std::size_t r = 0; r < s.size(); ++r) {
            if (n) std::memcpy(static_cast<void*>(out.data() + r * n), s[r].send, n * sizeof(T));
          }
          return out;
        },
        recv);
  }

  template <class T>
  void broadcast(Host, T* data, std::size_t n, int root) {
    if (root < 0 || root >= world_size()) {
      throw error("HostCommunicator::broadcast: root " + std::to_string(root) + " is outside the world of " +
                  std::to_string(world_size()) + " ranks");
    }
    run<T>(
        "broadcast", data, n, ReduceOp::sum, root,
        [&](const std::vector<HostWorld::Slot>& s) {
          std::vector<T> out(n);
          if (n) std::memcpy(static_cast<void*>(out.data()), s[static_cast<std::size_t>(root)].send, n * sizeof(T));
          return out;
        },
        data);
  }

  void all_reduce_host(Host be, double* values, std::size_t n, ReduceOp op) { all_reduce(be, values, values, n, op); }

  // The Host has one stream of work, the calling thread: the collective runs now.
  template <class T>
  void all_reduce_async(Host be, const T* send, T* recv, std::size_t n, ReduceOp op) {
    all_reduce(be, send, recv, n, op);
  }
  void join(Host) const noexcept {}

  // Host collectives finish before they return.
  void wait(Host) const noexcept {}

 private:
  template <class T>
  static const char* type_name() {
    if constexpr (std::is_same_v<T, double>) {
      return "fp64";
    } else if constexpr (std::is_same_v<T, std::uint8_t>) {
      return "u8";  // gathered and broadcast, not reduced (q8 state codes)
    } else if constexpr (std::is_same_v<T, float> || std::is_same_v<T, fp16> || std::is_same_v<T, bf16>) {
      return numeric_traits<T>::name;
    } else {
      static_assert(std::is_same_v<T, double>,
                    "HostCommunicator: elements must be float, double, fp16, bf16 or (not reduced) std::uint8_t");
      return "";
    }
  }

  // out[i] = op over ranks (in rank order) of slot r's send[offset + i].
  template <class T>
  static void reduce(const std::vector<HostWorld::Slot>& s, std::size_t offset, std::size_t n, ReduceOp op, T* out) {
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    for (std::size_t i = 0; i < n; ++i) {
      Acc a = static_cast<Acc>(static_cast<const T*>(s[0].send)[offset + i]);
      for (std::size_t r = 1; r < s.size(); ++r) {
        const Acc x = static_cast<Acc>(static_cast<const T*>(s[r].send)[offset + i]);
        switch (op) {
          case ReduceOp::sum:
          case ReduceOp::mean:
            a = a + x;
            break;
          // NaN wins, as in NCCL's fmax-free comparisons: a NaN anywhere is a NaN in the result.
          case ReduceOp::max:
            a = (x > a || x != x) ? x : a;
            break;
          case ReduceOp::min:
            a = (x < a || x != x) ? x : a;
            break;
        }
      }
      if (op == ReduceOp::mean) a = a / static_cast<Acc>(s.size());
      if constexpr (std::is_same_v<T, Acc>) {
        out[i] = a;
      } else {
        out[i] = round_nearest<T>(a);
      }
    }
  }

  // Posts this rank's slot, waits for every rank, checks the ranks agree, computes this rank's
  // result from every rank's input, waits until every rank has read the inputs, then writes recv.
  template <class T, class Compute>
  void run(const char* kind, const T* send, std::size_t n, ReduceOp op, int root, Compute&& compute, T* recv) {
    HostWorld& w = *world_;
    {
      std::lock_guard lock(w.mutex_);
      w.slots_[rank_] = {kind, type_name<T>(), send, n, op, root};
    }
    w.arrive_and_wait(rank_, kind);
    std::vector<HostWorld::Slot> slots;
    {
      std::lock_guard lock(w.mutex_);
      slots = w.slots_;
    }
    std::vector<T> out;
    std::string mismatch;
    for (std::size_t r = 0; r < slots.size() && mismatch.empty(); ++r) {
      const auto& a = slots[0];
      const auto& b = slots[r];
      if (std::strcmp(a.kind, b.kind) != 0 || std::strcmp(a.type, b.type) != 0 || a.count != b.count || a.op != b.op ||
          a.root != b.root) {
        mismatch = "rank 0 called " + describe(a) + ", rank " + std::to_string(r) + " called " + describe(b);
      }
    }
    if (mismatch.empty()) out = compute(slots);
    // Every rank leaves the inputs alone until all have read them (and on a mismatch, every rank
    // saw the same slots and throws the same error after this point).
    w.arrive_and_wait(rank_, kind);
    if (!mismatch.empty()) {
      const std::string what = "the ranks disagree on a collective: " + mismatch;
      std::unique_lock lock(w.mutex_);
      w.abort(lock, what);
      throw error("HostCommunicator: " + what);
    }
    if (!out.empty()) std::memcpy(static_cast<void*>(recv), out.data(), out.size() * sizeof(T));
  }

  static std::string describe(const HostWorld::Slot& s) {
    std::string d = std::string(s.kind) + "<" + s.type + ">(" + std::to_string(s.count) + " elements";
    if (std::strcmp(s.kind, "all_reduce") == 0 || std::strcmp(s.kind, "reduce_scatter") == 0) {
      d += std::string(", ") + to_string(s.op);
    }
    if (std::strcmp(s.kind, "broadcast") == 0) d += ", root " + std::to_string(s.root);
    return d + ")";
  }

  HostWorld* world_;
  int rank_;
};

static_assert(Communicator<HostCommunicator>);

}  // namespace alloy
