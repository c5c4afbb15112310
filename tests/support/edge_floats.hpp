// The float inputs where rounding to a 16-bit format can go wrong: every representable value,
// every midpoint between neighbours (both tie directions), one float step either side of each,
// zeros, subnormals, overflow, infinities and NaNs with assorted payloads, both signs.
#pragma once

#include "rounding_reference.hpp"

#include <alloy/numeric/detail/bits.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace alloy::test {

inline std::vector<float> edge_floats(const RoundingReference& ref) {
  std::vector<float> out;
  const auto patterns = ref.finite_patterns();
  const auto& f = ref.format();
  auto push_both_signs = [&](float x) {
    out.push_back(x);
    out.push_back(-x);
  };
  constexpr float inf = std::numeric_limits<float>::infinity();
  for (std::size_t i = 0; i + 1 < patterns.size(); ++i) {
    const float v = static_cast<float>(f.decode(patterns[i]));
    const float next = static_cast<float>(f.decode(patterns[i + 1]));
    const float mid = static_cast<float>((static_cast<double>(v) + next) / 2);  // exact in float
    for (float x : {v, mid, std::nextafter(v, inf), std::nextafter(v, -inf), std::nextafter(mid, inf),
                    std::nextafter(mid, -inf)}) {
      push_both_signs(x);
    }
  }
  // Past the largest finite value: below, at and above the rounding threshold, and far out.
  const double top = f.decode(patterns.back());
  const double step = top - f.decode(patterns[patterns.size() - 2]);
  for (double x : {top, top + step / 4, top + step / 2, top + step, top * 2, 1e30, 3.0e38}) {
    const float fx = static_cast<float>(x);
    for (float y : {fx, std::nextafter(fx, inf), std::nextafter(fx, 0.0f)}) push_both_signs(y);
  }
  push_both_signs(std::numeric_limits<float>::max());
  push_both_signs(std::numeric_limits<float>::min());
  push_both_signs(std::numeric_limits<float>::denorm_min());
  push_both_signs(detail::float_from_bits(0x007fffffu));  // largest float subnormal
  push_both_signs(inf);
  // NaNs: quiet and signalling, small and large payloads, both signs.
  for (std::uint32_t payload : {0x1u, 0x2u, 0xffffu, 0x10000u, 0x200000u, 0x3fffffu, 0x400000u, 0x400001u, 0x7fffffu}) {
    out.push_back(detail::float_from_bits(0x7f800000u | payload));
    out.push_back(detail::float_from_bits(0xff800000u | payload));
  }
  return out;
}

}  // namespace alloy::test
