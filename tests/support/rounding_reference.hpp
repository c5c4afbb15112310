// An independent reference for rounding float to a 16-bit format: it knows nothing of bit
// layouts beyond decoding each 16-bit pattern to its value, and rounds by searching the sorted
// table of finite values in double precision.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace alloy::test {

struct Format16 {
  int exponent_bits;
  int mantissa_bits;

  // Value of a bit pattern, decoded from the IEEE definition.
  double decode(std::uint16_t bits) const {
    const int bias = (1 << (exponent_bits - 1)) - 1;
    const bool negative = bits >> 15;
    const int exponent = (bits >> mantissa_bits) & ((1 << exponent_bits) - 1);
    const int mantissa = bits & ((1 << mantissa_bits) - 1);
    double value;
    if (exponent == (1 << exponent_bits) - 1) {
      value = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
    } else if (exponent == 0) {
      value = std::ldexp(mantissa, 1 - bias - mantissa_bits);
    } else {
      value = std::ldexp(mantissa + (1 << mantissa_bits), exponent - bias - mantissa_bits);
    }
    return negative ? -value : value;
  }
};

inline constexpr Format16 binary16{5, 10};
inline constexpr Format16 bfloat16{8, 7};

class RoundingReference {
 public:
  explicit RoundingReference(Format16 f) : format_(f) {
    for (std::uint32_t b = 0; b < 0x8000u; ++b) {
      const double v = f.decode(static_cast<std::uint16_t>(b));
      if (std::isfinite(v)) values_.push_back({v, static_cast<std::uint16_t>(b)});
    }
    std::sort(values_.begin(), values_.end(), [](auto& a, auto& b) { return a.value < b.value; });
  }

  // Round to nearest, ties to the even pattern; past the largest finite value by half a step
  // or more gives infinity; NaN gives 0x7fff (the canonical NaN alloy and CUDA use).
  std::uint16_t nearest_even(float x) const {
    if (std::isnan(x)) return 0x7fff;
    const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
    const double a = std::fabs(static_cast<double>(x));
    const std::uint16_t inf = inf_bits();
    const auto& top = values_.back();
    const double top_step = top.value - values_[values_.size() - 2].value;
    if (a >= top.value + top_step / 2) return sign | inf;
    auto hi = std::lower_bound(values_.begin(), values_.end(), a, [](auto& e, double v) { return e.value < v; });
    if (hi == values_.end()) return sign | top.bits;  // unreachable: handled by the overflow test
    if (hi->value == a || hi == values_.begin()) return sign | hi->bits;
    auto lo = hi - 1;
    const double below = a - lo->value, above = hi->value - a;
    if (below < above) return sign | lo->bits;
    if (above < below) return sign | hi->bits;
    return sign | ((lo->bits & 1) ? hi->bits : lo->bits);
  }

  // The two finite neighbours that bracket |x| (equal when x is representable), sign applied.
  std::pair<double, double> bracket(float x) const {
    const double a = std::fabs(static_cast<double>(x));
    const double s = std::signbit(x) ? -1.0 : 1.0;
    auto hi = std::lower_bound(values_.begin(), values_.end(), a, [](auto& e, double v) { return e.value < v; });
    if (hi == values_.end()) return {s * values_.back().value, s * std::numeric_limits<double>::infinity()};
    if (hi->value == a || hi == values_.begin()) return {s * hi->value, s * hi->value};
    return {s * (hi - 1)->value, s * hi->value};
  }

  std::uint16_t inf_bits() const {
    return static_cast<std::uint16_t>(((1u << format_.exponent_bits) - 1) << format_.mantissa_bits);
  }
  const Format16& format() const { return format_; }

  // Every non-negative finite pattern, in order of value.
  std::vector<std::uint16_t> finite_patterns() const {
    std::vector<std::uint16_t> out;
    for (auto& e : values_) out.push_back(e.bits);
    return out;
  }

 private:
  struct Entry {
    double value;
    std::uint16_t bits;
  };
  Format16 format_;
  std::vector<Entry> values_;
};

}  // namespace alloy::test
