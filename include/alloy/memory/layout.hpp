// ArenaLayout: where each declared parameter lives in the flat arenas. Every role (compute
// parameters, gradients, accumulator, master, state) uses the same element offsets, so one
// index names one parameter element in all of them. Each tensor starts on a block boundary
// (256 elements, or the q8 block when larger): 16-byte aligned in every dtype, a q8 block
// never spans two tensors, and per-block facts (learning-rate and decay multipliers) are exact.
// Padding elements are zero in every role and stay zero under every update rule.
#pragma once

#include <alloy/memory/registry.hpp>

#include <cstddef>
#include <vector>

namespace alloy {

// Per-block multipliers of the learning rate and the weight decay (0 for no-decay tensors), from
// each parameter's declaration: one BlockScales per block_scales_granularity elements of the
// arenas. The update rules read them; pass 2 indexes them by element / block_scales_granularity.
inline constexpr std::size_t block_scales_granularity = 256;
struct BlockScales {
  float lr = 1.0f;
  float decay = 1.0f;
};

struct TensorPlacement {
  std::size_t offset = 0;  // first element, in elements, in every arena
  std::size_t numel = 0;
};

class ArenaLayout {
 public:
  ArenaLayout() = default;
  // multiple (elements, a multiple of block; 0 for none): the arenas end padded to a multiple of
  // it, so that they split into equal block-aligned ranges (ZeroRedundancy's shards).
  ArenaLayout(const ParamRegistry& registry, std::size_t block, std::size_t multiple = 0) : block_(block) {
    std::size_t offset = 0;
    for (const auto& spec : registry.specs()) {
      const auto n = static_cast<std::size_t>(spec.numel());
      placements_.push_back({offset, n});
      const std::size_t padded = (n + block - 1) / block * block;
      const BlockScales scales{spec.options.lr_scale, spec.options.weight_decay ? 1.0f : 0.0f};
      for (std::size_t b = 0; b < padded / block_scales_granularity; ++b) block_scales_.push_back(scales);
      offset += padded;
      real_ += n;
    }
    tensors_end_ = offset;
    if (multiple > 0) {
      const std::size_t end = (offset + multiple - 1) / multiple * multiple;
      // The tail is padding like the gaps between tensors: zero parameters, zero gradients, no decay.
      for (std::size_t b = offset / block_scales_granularity; b < end / block_scales_granularity; ++b) {
        block_scales_.push_back({1.0f, 0.0f});
      }
      offset = end;
    }
    padded_ = offset;
  }

  const TensorPlacement& operator[](std::size_t i) const { return placements_.at(i); }
  std::size_t tensors() const noexcept { return placements_.size(); }
  std::size_t padded_numel() const noexcept { return padded_; }  // elements in each arena
  std::size_t numel() const noexcept { return real_; }           // declared elements
  // Where the last tensor's block ends: padded_numel() without the tail that `multiple` added,
  // the same for every world size (the update's random stream counts in it).
  std::size_t tensors_end() const noexcept { return tensors_end_; }
  std::size_t block() const noexcept { return block_; }
  const std::vector<BlockScales>& block_scales() const noexcept { return block_scales_; }

 private:
  std::size_t block_ = block_scales_granularity;
  std::vector<TensorPlacement> placements_;
  std::vector<BlockScales> block_scales_;
  std::size_t padded_ = 0;
  std::size_t tensors_end_ = 0;
  std::size_t real_ = 0;
};

}  // namespace alloy
