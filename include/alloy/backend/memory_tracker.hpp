// Byte accounting for buffers: current and peak bytes held, per tracker.
#pragma once

#include <alloy/backend/tags.hpp>

#include <atomic>
#include <cstddef>

namespace alloy {

struct MemoryStats {
  std::size_t current_bytes = 0;
  std::size_t peak_bytes = 0;
  std::size_t allocations = 0;  // live allocations
};

// Counts what buffers hold. Thread-safe; a trainer may own one to report its own peak.
class MemoryTracker {
 public:
  void on_allocate(std::size_t bytes) noexcept {
    const std::size_t now = current_.fetch_add(bytes, std::memory_order_relaxed) + bytes;
    allocations_.fetch_add(1, std::memory_order_relaxed);
    std::size_t peak = peak_.load(std::memory_order_relaxed);
    while (now > peak && !peak_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
  }
  void on_free(std::size_t bytes) noexcept {
    current_.fetch_sub(bytes, std::memory_order_relaxed);
    allocations_.fetch_sub(1, std::memory_order_relaxed);
  }
  MemoryStats stats() const noexcept {
    return {current_.load(std::memory_order_relaxed), peak_.load(std::memory_order_relaxed),
            allocations_.load(std::memory_order_relaxed)};
  }
  // Starts a new peak window at the bytes held now.
  void reset_peak() noexcept { peak_.store(current_.load(std::memory_order_relaxed), std::memory_order_relaxed); }

 private:
  std::atomic<std::size_t> current_{0};
  std::atomic<std::size_t> peak_{0};
  std::atomic<std::size_t> allocations_{0};
};

// The process-wide tracker of a backend: every buffer not given its own tracker reports here.
template <backend B>
MemoryTracker& default_memory_tracker() noexcept {
  static MemoryTracker tracker;
  return tracker;
}

template <backend B>
MemoryStats memory_stats(B = {}) noexcept {
  return default_memory_tracker<B>().stats();
}

}  // namespace alloy
