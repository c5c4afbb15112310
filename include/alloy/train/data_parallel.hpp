// What a Trainer with DataParallel<Comm> does besides what every trainer does (trainer.hpp calls
// these; a trainer without the policy never does):
//  - at construction, the ranks check that they agree on the model's size, the micro-batch
//    count, the seed and the policies, and take rank 0's parameters (and master weights), so
//    every replica starts from the same bits;
//  - each step, after the last micro-batch's backward, one all-reduce (a sum) over the flat
//    arena the optimizer reads: the fp32 accumulator, or the compute-dtype gradients when there
//    is none. The average is in the seed: every rank seeds backward with
//    scale / (micro-batches x world size), what one process running all micro-batches of the
//    global batch seeds, so the sum is the global batch's gradient;
//  - then pass 1, the skip decision, clipping and pass 2 run on every rank over the same bits,
//    so they agree without another collective.
#pragma once

#include <alloy/dist/communicator.hpp>
#include <alloy/error.hpp>

#include <cstdint>
#include <exception>
#include <string>
#include <utility>
#include <vector>

namespace alloy::detail {

// The gradients the step will read, summed over the ranks in place. from_accumulator: several
// micro-batches were summed into the store's accumulator (stores that have one).
template <class Comm, class B, class Store>
void all_reduce_gradients(Comm& comm, B be, Store& store, bool from_accumulator) {
  const std::size_t n = store.layout().padded_numel();
  if constexpr (Store::has_accumulator) {
    if (from_accumulator) {
      auto* acc = store.accumulator_arena().data();
      comm.all_reduce(be, acc, acc, n, ReduceOp::sum);
      return;
    }
  }
  (void)from_accumulator;
  auto* g = store.grads_arena().data();
  comm.all_reduce(be, g, g, n, ReduceOp::sum);
}

// Every rank takes rank 0's parameters and master weights.
template <class Comm, class B, class Store>
void replicate_parameters(Comm& comm, B be, Store& store) {
  const std::size_t n = store.layout().padded_numel();
  comm.broadcast(be, store.params_arena().data(), n, 0);
  if constexpr (Store::has_master) comm.broadcast(be, store.master_arena().data(), n, 0);
}

inline std::uint64_t fnv1a(const std::string& s) {
  std::uint64_t h = 1469598103934665603ull;
  for (const char c : s) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return h;
}

// Throws alloy::error on every rank, naming each value, when the ranks' values differ. The
// 64-bit values travel as two exact 32-bit halves, max(v) and max(-v) in one all-reduce.
template <class Comm, class B>
void check_replicas_agree(Comm& comm, B be, const std::vector<std::pair<std::string, std::uint64_t>>& values) {
  const std::size_t k = values.size();
  std::vector<double> v(4 * k);
  for (std::size_t i = 0; i < k; ++i) {
    const double hi = static_cast<double>(values[i].second >> 32),
                 lo = static_cast<double>(values[i].second & 0xFFFFFFFFu);
    v[2 * i] = hi;
    v[2 * i + 1] = lo;
    v[2 * k + 2 * i] = -hi;
    v[2 * k + 2 * i + 1] = -lo;
  }
  comm.all_reduce_host(be, v.data(), v.size(), ReduceOp::max);
  std::string differ;
  for (std::size_t i = 0; i < k; ++i) {
    if (v[2 * i] != -v[2 * k + 2 * i] || v[2 * i + 1] != -v[2 * k + 2 * i + 1]) {
      differ += (differ.empty() ? "" : ", ") + values[i].first;
    }
  }
  if (!differ.empty()) {
    throw error("DataParallel: rank " + std::to_string(comm.rank()) + " of " + std::to_string(comm.world_size()) +
                ": the ranks disagree on " + differ +
                "; every replica must train the same model with the same policies, "
                "micro-batch count and seed");
  }
}

// After an operation every rank ran (load) or one rank ran for all (save): the ranks learn
// whether any failed, and all throw if one did (a failing rank its own error).
template <class Comm, class B>
void agree_or_throw(Comm& comm, B be, const std::exception_ptr& failure, const std::string& what) {
  double failed = failure ? 1.0 : 0.0;
  comm.all_reduce_host(be, &failed, 1, ReduceOp::max);
  if (failure) std::rethrow_exception(failure);
  if (failed != 0.0) {
    throw error("DataParallel: rank " + std::to_string(comm.rank()) + ": " + what +
                " failed on another rank (its error says why); this rank's trainer may differ from it now");
  }
}

}  // namespace alloy::detail
