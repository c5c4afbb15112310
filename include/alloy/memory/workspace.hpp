// Workspace<B>: the per-micro-batch activation arena. Stack allocation: allocate() bumps, reset()
// at the start of every micro-batch forgets everything, and release(mark) frees what was
// allocated after mark() (activation recomputation frees a segment's activations this way). The
// peak is measured exactly, as the bytes the live allocations would take in one block. When the
// current block is full a new block is added (the rest of the full one is skipped while it is
// current); at the next reset the blocks are merged into one of the peak size, so steady state is
// one allocation, no frees and nothing skipped. Reuse is safe on Cuda because all of a
// micro-batch's work is ordered on one stream.
//
// On Cuda, where the device and driver manage virtual memory, the workspace is instead one range
// of addresses that grows in place (backend/cuda/growing_range.hpp): no second block, nothing
// skipped, nothing to merge, so the first steps hold no more than the peak (rounded up to the
// mapping granularity, 2 MiB on the H200) where the blocks' sum could reach twice it.
#pragma once

#include <alloy/backend/buffer.hpp>
#include <alloy/backend/cuda/growing_range.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <vector>

namespace alloy {

// A position in a Workspace (mark() / release()), the same for every backend.
struct WorkspaceMark {
  std::size_t block = 0;   // index of the current block
  std::size_t offset = 0;  // bytes used in it
  std::size_t used = 0;    // bytes the live allocations take (not counting skipped block ends)
};

template <backend B>
class Workspace {
 public:
  using Mark = WorkspaceMark;

  explicit Workspace(B be = {}, MemoryTracker* tracker = nullptr) : be_(be), tracker_(tracker) {}

  // n uninitialized elements of T, 256-byte aligned, valid until reset() or a release() past them.
  template <class T>
  T* allocate(std::size_t n) {
    const std::size_t bytes = std::max<std::size_t>(alignment, (n * sizeof(T) + alignment - 1) / alignment * alignment);
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<B, Cuda>) {
      if (grows_in_place()) {
        range_->grow_to(top_.offset + bytes);  // throws, changing nothing, when the device is full
        std::byte* p = range_->data() + top_.offset;
        top_.offset += bytes;
        top_.used += bytes;
        peak_ = std::max(peak_, top_.used);
        return reinterpret_cast<T*>(p);
      }
    }
#endif
    while (top_.block < blocks_.size() && top_.offset + bytes > blocks_[top_.block].size()) {
      // The rest of this block is skipped. It does not count as used: one block of the peak, as
      // reset() makes, holds the same allocations with nothing skipped.
      ++top_.block;
      top_.offset = 0;
    }
    if (top_.block == blocks_.size()) {
      const std::size_t last = blocks_.empty() ? 0 : blocks_.back().size();
      blocks_.emplace_back(std::max(bytes, 2 * last), be_, tracker_);
    }
    std::byte* p = blocks_[top_.block].data() + top_.offset;
    top_.offset += bytes;
    top_.used += bytes;
    peak_ = std::max(peak_, top_.used);
    return reinterpret_cast<T*>(p);
  }

  Mark mark() const noexcept { return top_; }
  void release(const Mark& m) noexcept { top_ = m; }

  // Whether the bytes [p, p + bytes) were allocated before m, so release(m) keeps them (false
  // for memory this workspace does not hold).
  bool keeps(const Mark& m, const void* p, std::size_t bytes) const noexcept {
    // Whether [p, p + bytes) lies within the first `limit` bytes from `start`.
    const auto within = [at = reinterpret_cast<std::uintptr_t>(p), bytes](const std::byte* start, std::size_t limit) {
      const auto base = reinterpret_cast<std::uintptr_t>(start);
      return at >= base && at - base <= limit && bytes <= limit - (at - base);
    };
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<B, Cuda>) {
      if (range_) return within(range_->data(), m.offset);
    }
#endif
    for (std::size_t i = 0; i < blocks_.size() && i <= m.block; ++i) {
      if (within(blocks_[i].data(), i < m.block ? blocks_[i].size() : m.offset)) return true;
    }
    return false;
  }

  // Forgets every allocation (call between micro-batches).
  void reset() {
    if (blocks_.size() > 1) {
      // The peak is exact (the blocks' sum is more: what growth skipped at their ends and the
      // doubling), and a micro-batch that allocates the same sequence again fits it exactly:
      // each allocation's size is a multiple of the alignment, so in one block they lie end to end.
      blocks_.clear();
      blocks_.emplace_back(peak_, be_, tracker_);
    }
    top_ = {};
  }

  std::size_t bytes_in_use() const noexcept { return top_.used; }
  std::size_t peak_bytes() const noexcept { return peak_; }
  void reset_peak() noexcept { peak_ = top_.used; }
  std::size_t reserved_bytes() const noexcept {
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<B, Cuda>) {
      if (range_) return range_->size();
    }
#endif
    std::size_t total = 0;
    for (const auto& b : blocks_) total += b.size();
    return total;
  }

  static constexpr std::size_t alignment = 256;

  // Where the allocations of a micro-batch begin, and whether that stays put: the range's base
  // (it grows in place), or the one block's; 0 while a step has more than one block (merged at the
  // next reset). A step captured as a CUDA graph keeps these addresses.
  std::uintptr_t base_address() const noexcept {
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<B, Cuda>) {
      if (range_) return reinterpret_cast<std::uintptr_t>(range_->data());
    }
#endif
    return blocks_.size() == 1 ? reinterpret_cast<std::uintptr_t>(blocks_[0].data()) : 0;
  }

  // Cuda: whether this workspace is one range growing in place (decided at its first allocation:
  // where the device supports it and ALLOY_WORKSPACE_BLOCKS is not set in the environment).
  bool grows_in_place() {
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<B, Cuda>) {
      if (!decided_) {
        decided_ = true;
        if (blocks_.empty() && std::getenv("ALLOY_WORKSPACE_BLOCKS") == nullptr &&
            detail::GrowingDeviceRange::supported()) {
          range_ = std::make_unique<detail::GrowingDeviceRange>(be_, tracker_);
        }
      }
      return range_ != nullptr;
    }
#endif
    return false;
  }

 private:
  B be_;
  MemoryTracker* tracker_;
#if ALLOY_HAS_CUDA_RUNTIME
  // Cuda, where supported: the range that replaces blocks_ (nothing on other backends).
  struct NoRange {};
  static constexpr bool can_grow_in_place = std::is_same_v<B, Cuda>;
  [[no_unique_address]] std::conditional_t<can_grow_in_place, std::unique_ptr<detail::GrowingDeviceRange>, NoRange>
      range_;
  [[no_unique_address]] std::conditional_t<can_grow_in_place, bool, NoRange> decided_{};
#endif
  std::vector<Buffer<std::byte, B>> blocks_;
  Mark top_{};
  std::size_t peak_ = 0;
};

}  // namespace alloy
