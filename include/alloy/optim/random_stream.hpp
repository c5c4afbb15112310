// The random words one optimizer step draws: four per arena element (0: the compute copy of the
// parameter, 1 + k: state slot k), at index (stream + element) * 4 + word of the counter-based
// generator, with stream = step * padded elements. So every element of every step has its own
// words, on any backend and in any order of visiting.
#pragma once

#include <alloy/numeric/random.hpp>

#include <cstddef>
#include <cstdint>

namespace alloy::detail {

// Random word k (0: parameter, 1 + slot: state) of element i in this step.
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE std::uint32_t update_bits(std::uint64_t seed, std::uint64_t stream, std::size_t i,
                                                              int k) {
  return random_bits(seed, (stream + i) * 4 + static_cast<std::uint64_t>(k));
}

}  // namespace alloy::detail
