// DataParallel's gradient buckets (as PyTorch DDP's): a LayeredModel's gradients are summed over
// the ranks in buckets of consecutive blocks, each all-reduced (Communicator::all_reduce_async)
// as soon as the last micro-batch's backward of its blocks is done, while the blocks below run
// their backward; what no block owns is reduced after backward. The trainer drives it; with
// ZeroRedundancy, or a model that is no LayeredModel, the whole arena is reduced after backward
// instead (train/data_parallel.hpp).
//
// Which gradients a block owns is learned, not declared: during the first micro-batch the
// trainer runs (a survey: that micro-batch's step still reduces the whole arena if it is the
// step's last), every Context::grad call is attributed to the outermost block whose backward is
// running, or to "the rest" outside the blocks' backward (input, head, input_backward, forward). A
// tensor taken by one block's backward alone is that block's; one taken by two blocks, or also
// outside them (a table tied to the head and the input), is the rest's, since it is final only
// after the input's backward. The plan (each bucket's ranges of the arena, the rest's ranges) is
// then fixed, and checked to be every rank's (one small all-reduce, once); later micro-batches
// check each grad call against it and throw if a block's gradient is taken elsewhere.
//
// A bucket collects blocks from the last down until it holds at least bucket_bytes (of the arena
// the optimizer reads: the fp32 accumulator with several micro-batches, the gradients otherwise)
// and is reduced after its lowest block's backward; the last bucket takes what is left at block 0.
// On the step's last micro-batch a bucket's ranges are first accumulated (acc += g,
// OptimizerStep::accumulate_range) and then all-reduced in place; the rest likewise after
// backward, then join(), so the optimizer's pass 1 is ordered after every bucket. Each element is
// accumulated and reduced once, in rank order on HostCommunicator: the same bits as the whole
// arena's all-reduce.
#pragma once

#include <alloy/dist/communicator.hpp>
#include <alloy/error.hpp>
#include <alloy/train/backward_observer.hpp>
#include <alloy/train/data_parallel.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace alloy::detail {

struct ArenaRange {
  std::size_t begin = 0, count = 0;
};

template <class Comm, class Store, class Step>
class GradientBuckets final : public BackwardObserver {
 public:
  using backend_type = typename Store::backend_type;

  // Before micro-batch `micro_batch` of `micro_batches`: the observer the micro-batch's Context
  // reports to, or null when bucket_bytes is 0 (the whole arena is reduced after backward).
  BackwardObserver* begin_micro_batch(Comm& comm, Store& store, Step& step, int micro_batch, int micro_batches,
                                      std::size_t bucket_bytes) {
    if (bucket_bytes == 0) return nullptr;
    comm_ = &comm;
    store_ = &store;
    step_ = &step;
    micro_batch_ = micro_batch;
    micro_batches_ = micro_batches;
    bucket_bytes_ = bucket_bytes;
    from_accumulator_ = Store::has_accumulator && micro_batches > 1;
    if (owner_.empty()) owner_.assign(store.layout().tensors(), unseen);
    reducing_ = planned_ && micro_batch + 1 == micro_batches;
    region_ = rest;
    return this;
  }

  // After the micro-batch's backward. The survey's end makes the plan. On the step's last
  // micro-batch, the rest is accumulated and reduced and the backend's later work joins every
  // bucket; true then: the caller neither accumulates nor reduces the gradients again.
  bool end_micro_batch() {
    if (!comm_) return false;
    const bool reduced = reducing_;
    if (reducing_) {
      if (rest_.empty()) accumulate(ArenaRange{});  // records where the step's gradients are
      for (const ArenaRange& r : rest_) reduce(r);
      comm_->join(store_->backend());
    } else if (!planned_) {
      plan();
    }
    reducing_ = false;
    comm_ = nullptr;
    return reduced;
  }

  void gradient_taken(std::size_t tensor) override {
    if (tensor >= owner_.size()) return;
    int& owner = owner_[tensor];
    if (!planned_) {
      owner = owner == unseen || owner == region_ ? region_ : rest;
    } else if (owner >= 0 && owner != region_) {
      throw error("DataParallel: the gradient of '" + store_->registry().specs()[tensor].name + "' belongs to block " +
                  std::to_string(owner) + "'s bucket (its backward alone took it in the first micro-batch), but was " +
                  "taken " +
                  (region_ == rest ? std::string("outside the blocks' backward")
                                   : "in block " + std::to_string(region_) + "'s backward") +
                  " now; its bucket may be reduced already. Set Trainer::Config::gradient_bucket_bytes = 0 for a "
                  "model whose blocks take different gradients from one micro-batch to the next");
    }
  }

  void block_backward_begin(std::size_t block) override { region_ = static_cast<int>(block); }

  void block_backward_end(std::size_t block) override {
    region_ = rest;
    if (!planned_) {
      blocks_ = std::max(blocks_, block + 1);
      return;
    }
    if (block >= fires_at_.size()) {
      throw error("DataParallel: block " + std::to_string(block) + "'s backward, but the first micro-batch ran " +
                  std::to_string(fires_at_.size()) + " blocks");
    }
    if (!reducing_ || fires_at_[block] == none) return;
    for (const ArenaRange& r : buckets_[fires_at_[block]]) reduce(r);
  }

 private:
  static constexpr int unseen = -2, rest = -1;
  static constexpr std::size_t none = std::numeric_limits<std::size_t>::max();

  void accumulate(const ArenaRange& r) {
    step_->accumulate_range(*store_, micro_batch_, micro_batches_, r.begin, r.count);
  }

  // The range of the arena the optimizer reads, summed over the ranks in place.
  void reduce(const ArenaRange& r) {
    accumulate(r);
    if constexpr (Store::has_accumulator) {
      if (from_accumulator_) {
        auto* acc = store_->accumulator_arena().data() + r.begin;
        comm_->all_reduce_async(store_->backend(), acc, acc, r.count, ReduceOp::sum);
        return;
      }
    }
    auto* g = store_->grads_arena().data() + r.begin;
    comm_->all_reduce_async(store_->backend(), g, g, r.count, ReduceOp::sum);
  }

  void plan() {
    const auto& layout = store_->layout();
    const std::size_t tensors = layout.tensors();
    // A tensor's extent runs to the next tensor's offset: its padding (zero on every rank) rides
    // along, so a block's tensors declared together make one range.
    auto extent = [&](std::size_t t) {
      const std::size_t end = t + 1 < tensors ? layout[t + 1].offset : layout.tensors_end();
      return ArenaRange{layout[t].offset, end - layout[t].offset};
    };
    const std::size_t element_bytes =
        from_accumulator_ ? sizeof(typename Store::optimizer_grad_type) : sizeof(typename Store::grad_type);
    std::vector<std::vector<std::size_t>> owned(blocks_);
    for (std::size_t t = 0; t < tensors; ++t) {
      if (owner_[t] >= 0) owned[static_cast<std::size_t>(owner_[t])].push_back(t);
    }
    fires_at_.assign(blocks_, none);
    std::vector<std::size_t> bucket;  // its tensors
    std::size_t bytes = 0;
    std::vector<bool> in_bucket(tensors, false);
    for (std::size_t i = blocks_; i-- > 0;) {
      for (const std::size_t t : owned[i]) {
        bucket.push_back(t);
        in_bucket[t] = true;
        bytes += extent(t).count * element_bytes;
      }
      if (!bucket.empty() && (bytes >= bucket_bytes_ || i == 0)) {
        std::sort(bucket.begin(), bucket.end());
        std::vector<ArenaRange> ranges;
        for (const std::size_t t : bucket) add(ranges, extent(t));
        fires_at_[i] = buckets_.size();
        buckets_.push_back(std::move(ranges));
        bucket.clear();
        bytes = 0;
      }
    }
    for (std::size_t t = 0; t < tensors; ++t) {
      if (!in_bucket[t]) {
        owner_[t] = rest;
        add(rest_, extent(t));
      }
    }
    if (layout.padded_numel() > layout.tensors_end()) {
      add(rest_, {layout.tensors_end(), layout.padded_numel() - layout.tensors_end()});
    }
    planned_ = true;
    // Every rank must issue the same collectives in the same order: a plan that differs (another
    // model, another gradient_bucket_bytes) is an error on every rank, not a hang.
    std::string text = std::to_string(bucket_bytes_) + ":";
    for (const auto& b : buckets_) {
      for (const ArenaRange& r : b) text += std::to_string(r.begin) + "+" + std::to_string(r.count) + ",";
      text += ";";
    }
    check_replicas_agree(*comm_, store_->backend(),
                         {{"the gradient buckets (gradient_bucket_bytes, the blocks' "
                           "gradients)",
                           fnv1a(text)}});
  }

  // Appends r, merged into the last range when they touch.
  static void add(std::vector<ArenaRange>& ranges, ArenaRange r) {
    if (!ranges.empty() && ranges.back().begin + ranges.back().count == r.begin) {
      ranges.back().count += r.count;
    } else {
      ranges.push_back(r);
    }
  }

  Comm* comm_ = nullptr;  // set for one micro-batch (the trainer that owns this may move)
  Store* store_ = nullptr;
  Step* step_ = nullptr;
  int micro_batch_ = 0, micro_batches_ = 1;
  std::size_t bucket_bytes_ = 0;
  bool from_accumulator_ = false;
  bool planned_ = false, reducing_ = false;
  int region_ = rest;                  // the block whose backward is running, or rest
  std::vector<int> owner_;             // per tensor: its block, rest or unseen
  std::size_t blocks_ = 0;             // blocks the survey saw
  std::vector<std::size_t> fires_at_;  // per block: the bucket reduced after its backward, or none
  std::vector<std::vector<ArenaRange>> buckets_;
  std::vector<ArenaRange> rest_;
};

}  // namespace alloy::detail
