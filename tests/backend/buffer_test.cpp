#include <alloy/backend/backend.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <random>

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

// A range of backend memory by pointer (workspace activations), as stored and widened to float.
TEST(Buffer, RawRangesReadBackAsStoredAndAsFloat) {
  std::mt19937_64 rng(0x5eed);
  std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
  std::vector<alloy::bf16> src(37);
  for (auto& v : src) v = alloy::bf16(dist(rng));
  Buffer<alloy::bf16, Host> b(src.size());
  alloy::copy_from_host(b, std::span<const alloy::bf16>(src));
  const auto part = alloy::to_host(Host{}, b.data() + 5, 30);
  ASSERT_EQ(part.size(), 30u);
  const auto widened = alloy::to_host_as_float(Host{}, b.data() + 5, 30);
  ASSERT_EQ(widened.size(), 30u);
  for (std::size_t i = 0; i < 30; ++i) {
    EXPECT_EQ(part[i].bits(), src[i + 5].bits()) << i;
    EXPECT_EQ(widened[i], alloy::to_float(src[i + 5])) << i;
  }
  EXPECT_TRUE(alloy::to_host(Host{}, b.data(), 0).empty());
}

}  // namespace
