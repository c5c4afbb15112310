// Workspace<B>: the per-micro-batch activation arena. Bump allocation, reset at the start of
// every micro-batch, so the activation peak is measured exactly. When a micro-batch needs more
// than the current block, a new block is added; at the next reset the blocks are merged into
// one of the peak size, so steady state is one allocation and no frees.
#pragma once

#include <alloy/backend/buffer.hpp>

#include <string>
#include <vector>

namespace alloy {

template <backend B>
class Workspace {
 public:
  explicit Workspace(B be = {}, MemoryTracker* tracker = nullptr) : be_(be), tracker_(tracker) {}

  // n uninitialized elements of T, 256-byte aligned, valid until the next reset().
  template <class T>
  T* allocate(std::size_t n) {
    const std::size_t bytes = (n * sizeof(T) + alignment - 1) / alignment * alignment;
    if (blocks_.empty() || used_in_block_ + bytes > blocks_.back().size()) {
      const std::size_t last = blocks_.empty() ? 0 : blocks_.back().size();
      blocks_.emplace_back(std::max(bytes, 2 * last), be_, tracker_);
      used_in_block_ = 0;
    }
    std::byte* p = blocks_.back().data() + used_in_block_;
    used_in_block_ += bytes;
    used_ += bytes;
    peak_ = std::max(peak_, used_);
    return reinterpret_cast<T*>(p);
  }

  // Forgets every allocation (call between micro-batches, after their work is ordered).
  void reset() {
    if (blocks_.size() > 1) {
      blocks_.clear();
      blocks_.emplace_back(peak_, be_, tracker_);
    }
    used_ = 0;
    used_in_block_ = 0;
  }

  std::size_t bytes_in_use() const noexcept { return used_; }
  std::size_t peak_bytes() const noexcept { return peak_; }
  std::size_t reserved_bytes() const noexcept {
    std::size_t total = 0;
    for (const auto& b : blocks_) total += b.size();
    return total;
  }

  static constexpr std::size_t alignment = 256;

 private:
  B be_;
  MemoryTracker* tracker_;
  std::vector<Buffer<std::byte, B>> blocks_;
  std::size_t used_ = 0;
  std::size_t used_in_block_ = 0;
  std::size_t peak_ = 0;
};

}  // namespace alloy
