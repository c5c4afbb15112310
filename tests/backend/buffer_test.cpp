#include <alloy/backend/backend.hpp>

#include <gtest/gtest.h>

#include <cstdint>

namespace {

using alloy::Buffer;
using alloy::Host;

TEST(Buffer, HostMemoryIsAlignedAndSized) {
  Buffer<float, Host> b(1001);
  EXPECT_EQ(b.size(), 1001u);
  EXPECT_EQ(b.bytes(), 4004u);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b.data()) % 64, 0u);
  for (std::size_t i = 0; i < b.size(); ++i) b.data()[i] = static_cast<float>(i);  // whole range writable
  EXPECT_EQ(b.data()[1000], 1000.0f);
}

TEST(Buffer, TrackerCountsCurrentAndPeakBytes) {
  alloy::MemoryTracker tracker;
  {
    Buffer<double, Host> a(100, {}, &tracker);
    {
      Buffer<float, Host> b(50, {}, &tracker);
      EXPECT_EQ(tracker.stats().current_bytes, 1000u);
      EXPECT_EQ(tracker.stats().allocations, 2u);
    }
    EXPECT_EQ(tracker.stats().current_bytes, 800u);
    EXPECT_EQ(tracker.stats().peak_bytes, 1000u);
    tracker.reset_peak();
    EXPECT_EQ(tracker.stats().peak_bytes, 800u);
  }
  EXPECT_EQ(tracker.stats().current_bytes, 0u);
  EXPECT_EQ(tracker.stats().allocations, 0u);
}

TEST(Buffer, DefaultTrackerSeesBuffersWithoutOne) {
  const auto before = alloy::memory_stats<Host>().current_bytes;
  Buffer<std::uint8_t, Host> b(4096);
  EXPECT_EQ(alloy::memory_stats<Host>().current_bytes, before + 4096);
}

TEST(Buffer, MoveTransfersOwnershipOnce) {
  alloy::MemoryTracker tracker;
  Buffer<int, Host> a(10, {}, &tracker);
  int* p = a.data();
  Buffer<int, Host> b(std::move(a));
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(a.data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from state is specified
  EXPECT_EQ(a.size(), 0u);
  Buffer<int, Host> c(5, {}, &tracker);
  c = std::move(b);
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(tracker.stats().current_bytes, 40u);  // the 5-int buffer was released
}

TEST(Buffer, EmptyBufferAllocatesNothing) {
  alloy::MemoryTracker tracker;
  Buffer<float, Host> b(0, {}, &tracker);
  EXPECT_EQ(b.data(), nullptr);
  EXPECT_EQ(tracker.stats().allocations, 0u);
}

TEST(Buffer, HostRoundTripAndSizeCheck) {
  std::vector<float> src = {1, 2, 3};
  Buffer<float, Host> b(3);
  alloy::copy_from_host(b, std::span<const float>(src));
  EXPECT_EQ(alloy::to_host(b), src);
  std::vector<float> wrong(4);
  EXPECT_THROW(alloy::copy_from_host(b, std::span<const float>(wrong)), alloy::error);
}

}  // namespace
