// What a Trainer with DataParallel<Comm> does besides what every trainer does (trainer.hpp calls
// these; a trainer without the policy never does):
//  - at construction, the ranks check that they agree on the model's size, the micro-batch
//    count, the seed and the policies, and take rank 0's parameters (and master weights), so
//    every replica starts from the same bits;
//  - each step, after the last micro-batch's backward, one all-reduce (a sum) over the flat
//    arena the optimizer reads: the fp32 accumulator, or the compute-dtype gradients when there
//    is none (a LayeredModel's are reduced in buckets while backward runs instead:
//    train/gradient_buckets.hpp, with the same sums). The average is in the seed: every rank seeds backward with
//    scale / (micro-batches x world size), what one process running all micro-batches of the
//    global batch seeds, so the sum is the global batch's gradient;
//  - then pass 1, the skip decision, clipping and pass 2 run on every rank over the same bits,
//    so they agree without another collective.
// With ZeroRedundancy (ZeRO-1) each rank's store holds the master weights and optimizer state of
// one contiguous range of the arenas (ParamStore's ArenaShard):
//  - the gradients are reduce-scattered instead: each rank gets the sum over the ranks of its own
//    range, in place in the arena;
//  - pass 1 runs over the range, and one small all-reduce sums the ranks' sums of squares, so the
//    norm, the skip decision and clipping are every rank's alike; pass 2 (the same fused pass)
//    updates the range;
//  - an all-gather of the compute-dtype parameters gives every rank the whole model again;
//  - checkpoints and weight files gather a whole store for the write and keep the range on a load.
#pragma once

#include <alloy/backend/buffer.hpp>
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

// ZeroRedundancy: the sum over the ranks of this rank's range of the gradients, in place (the
// rest of the arena keeps this rank's own gradients, which nothing reads).
template <class Comm, class B, class Store>
void reduce_scatter_gradients(Comm& comm, B be, Store& store, bool from_accumulator) {
  const std::size_t begin = store.shard_begin(), count = store.shard_elements();
  if constexpr (Store::has_accumulator) {
    if (from_accumulator) {
      auto* acc = store.accumulator_arena().data();
      comm.reduce_scatter(be, acc, acc + begin, count, ReduceOp::sum);
      return;
    }
  }
  (void)from_accumulator;
  auto* g = store.grads_arena().data();
  comm.reduce_scatter(be, g, g + begin, count, ReduceOp::sum);
}

// ZeroRedundancy: every rank's updated range of the compute-dtype parameters, to every rank.
template <class Comm, class B, class Store>
void all_gather_parameters(Comm& comm, B be, Store& store) {
  auto* p = store.params_arena().data();
  comm.all_gather(be, p + store.shard_begin(), p, store.shard_elements());
}

// ZeroRedundancy: pass 1's sum of squares and the first non-finite tensor, over every rank's range.
template <class Comm, class B>
struct ReplicaReduction {
  Comm& comm;
  B be;
  double sum(double local) const {
    comm.all_reduce_host(be, &local, 1, ReduceOp::sum);
    return local;
  }
  std::size_t min(std::size_t local) const {
    double v = static_cast<double>(local);
    comm.all_reduce_host(be, &v, 1, ReduceOp::min);
    return static_cast<std::size_t>(v);
  }
};

// ZeroRedundancy: `whole` (an unsharded store of the same layout) gets the parameters and every
// rank's range of the master weights and optimizer state, on every rank.
template <class Comm, class B, class Store>
void gather_store(Comm& comm, B be, Store& shard, Store& whole) {
  const std::size_t count = shard.shard_elements();
  copy(be, whole.params_arena().data(), shard.params_arena().data(), shard.layout().padded_numel());
  if constexpr (Store::has_master) comm.all_gather(be, shard.master_arena().data(), whole.master_arena().data(), count);
  for (int k = 0; k < Store::slots; ++k) {
    comm.all_gather(be, shard.state_arena(k).data(), whole.state_arena(k).data(), count);
    if constexpr (Store::state_policy::quantized) {
      comm.all_gather(be, shard.state_scale_arena(k).data(), whole.state_scale_arena(k).data(),
                      count / Store::quant_block);
    }
  }
  comm.wait(be);
}

// ZeroRedundancy: `shard` keeps its range of `whole` (what a load read), and the whole parameters.
template <class B, class Store>
void keep_shard(B be, Store& whole, Store& shard) {
  const std::size_t begin = shard.shard_begin(), count = shard.shard_elements();
  copy(be, shard.params_arena().data(), whole.params_arena().data(), shard.layout().padded_numel());
  if constexpr (Store::has_master) copy(be, shard.master_arena().data(), whole.master_arena().data() + begin, count);
  for (int k = 0; k < Store::slots; ++k) {
    copy(be, shard.state_arena(k).data(), whole.state_arena(k).data() + begin, count);
    if constexpr (Store::state_policy::quantized) {
      copy(be, shard.state_scale_arena(k).data(), whole.state_scale_arena(k).data() + begin / Store::quant_block,
           count / Store::quant_block);
    }
  }
  synchronize(be);
}

// Every rank takes rank 0's parameters and master weights.
template <class Comm, class B, class Store>
void replicate_parameters(Comm& comm, B be, Store& store) {
  const std::size_t n = store.layout().padded_numel();
  comm.broadcast(be, store.params_arena().data(), n, 0);
  // A sharded master copy is each rank's range of the same seeded initialization (the seeds agree).
  if constexpr (Store::has_master) {
    if (!store.sharded()) comm.broadcast(be, store.master_arena().data(), n, 0);
  }
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
