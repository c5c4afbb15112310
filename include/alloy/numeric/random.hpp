// Counter-based random bits: the same (seed, index) gives the same word on host and device,
// so stochastic rounding is reproducible and a resumed run draws what the uninterrupted one did.
#pragma once

#include <alloy/config.hpp>

#include <cstdint>

namespace alloy {

// Stateless hash of (seed, index) to 32 uniformly distributed bits: two rounds of the
// splitmix64 finalizer, a bijection of 64 bits, so for one seed no two indices share a state.
ALLOY_HOST_DEVICE constexpr std::uint32_t random_bits(std::uint64_t seed, std::uint64_t index) noexcept {
  std::uint64_t z = seed * 0x9e3779b97f4a7c15ull + index;
  for (int round = 0; round < 2; ++round) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
  }
  return static_cast<std::uint32_t>(z >> 32);
}

}  // namespace alloy
