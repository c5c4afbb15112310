#include "../support/test_support.hpp"

#include <alloy/io/crc32c.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string_view>
#include <vector>

namespace {

using alloy::crc32c;

std::span<const std::byte> bytes_of(std::string_view s) { return std::as_bytes(std::span(s.data(), s.size())); }

// The definition, one bit at a time: reflected polynomial 0x82F63B78, register and result inverted.
std::uint32_t crc32c_bitwise(std::span<const std::byte> bytes) {
  std::uint32_t r = 0xFFFFFFFFu;
  for (const std::byte b : bytes) {
    r ^= std::to_integer<std::uint32_t>(b);
    for (int bit = 0; bit < 8; ++bit) r = (r >> 1) ^ ((r & 1u) ? 0x82F63B78u : 0u);
  }
  return ~r;
}

std::uint32_t portable(std::span<const std::byte> b) {
  return ~alloy::detail::crc32c_portable(0xFFFFFFFFu, b.data(), b.size());
}
std::uint32_t hardware(std::span<const std::byte> b) {
  return ~alloy::detail::crc32c_hardware(0xFFFFFFFFu, b.data(), b.size());
}

// The catalogue's check value, and RFC 3720 (iSCSI) appendix B.4's 32-byte vectors.
TEST(Crc32c, GivesThePublishedCheckValues) {
  std::vector<std::byte> zeros(32, std::byte{0}), ones(32, std::byte{0xFF}), up(32), down(32);
  for (int i = 0; i < 32; ++i) up[i] = std::byte(i), down[i] = std::byte(31 - i);
  const std::string_view check = "123456789";
  for (auto* f : {+[](std::span<const std::byte> b) { return crc32c(b); }, &portable, &crc32c_bitwise}) {
    EXPECT_EQ(f(bytes_of(check)), 0xE3069283u);
    EXPECT_EQ(f(zeros), 0x8A9136AAu);
    EXPECT_EQ(f(ones), 0x62A8AB43u);
    EXPECT_EQ(f(up), 0x46DD794Eu);
    EXPECT_EQ(f(down), 0x113FDB5Cu);
    EXPECT_EQ(f({}), 0u);
  }
}

// Every path (the table, and the crc32 instruction with its three lanes where the CPU has it)
// gives the definition's value at lengths around the lane blocks and at odd alignments.
TEST(Crc32c, EveryPathAgreesWithTheDefinition) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  std::vector<std::byte> data(4 * 3 * alloy::detail::crc32c_lane_bytes + 64);
  for (auto& b : data) b = std::byte(rng() & 0xFF);
  const std::size_t block = 3 * alloy::detail::crc32c_lane_bytes;
  for (const std::size_t n :
       {std::size_t(1), std::size_t(7), std::size_t(8), std::size_t(9), std::size_t(63), block - 1, block, block + 1,
        2 * block + 13, 4 * block, std::size_t(rng() % data.size())}) {
    for (const std::size_t at : {0, 1, 3, 5}) {
      if (at + n > data.size()) continue;
      const auto bytes = std::span<const std::byte>(data).subspan(at, n);
      const std::uint32_t expected = crc32c_bitwise(bytes);
      SCOPED_TRACE("length " + std::to_string(n) + " at offset " + std::to_string(at));
      EXPECT_EQ(portable(bytes), expected);
      EXPECT_EQ(crc32c(bytes), expected);
      if (alloy::detail::crc32c_hardware_available()) {
        EXPECT_EQ(hardware(bytes), expected);
      }
    }
  }
}

TEST(Crc32c, ContinuesFromThePreviousCrc) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  std::vector<std::byte> data(100'000 + rng() % 1000);
  for (auto& b : data) b = std::byte(rng() & 0xFF);
  const std::size_t cut = rng() % data.size();
  const auto all = std::span<const std::byte>(data);
  EXPECT_EQ(crc32c(all.subspan(cut), crc32c(all.first(cut))), crc32c(all));
}

TEST(Crc32c, NoticesEveryOneBitFlip) {
  std::vector<std::byte> data(64);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = std::byte(i * 37 & 0xFF);
  const std::uint32_t good = crc32c(data);
  for (std::size_t bit = 0; bit < 8 * data.size(); ++bit) {
    data[bit / 8] ^= std::byte(1 << (bit % 8));
    EXPECT_NE(crc32c(data), good) << "bit " << bit;
    data[bit / 8] ^= std::byte(1 << (bit % 8));
  }
}

}  // namespace
