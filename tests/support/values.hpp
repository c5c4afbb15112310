// Values of every storage type for the kernel tests: bit patterns, the poison that marks an
// element never written, random inputs rounded to the dtype, and a checker that counts outputs
// outside their error bound.
#pragma once

#include <alloy/numeric/detail/bits.hpp>
#include <alloy/numeric/numeric.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace alloy::test {

// u: an fp32 operation's relative rounding error.
inline const double fp32_unit = std::ldexp(1.0, -24);

template <class T>
std::uint32_t bits_of(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return alloy::detail::float_bits(x);
  } else if constexpr (std::is_integral_v<T>) {
    return static_cast<std::uint32_t>(x);
  } else {
    return x.bits();
  }
}

// A value no kernel writes (a NaN with an odd payload; for integers, a negative label): an
// element still holding it was never written.
template <class T>
T poison() {
  if constexpr (std::is_same_v<T, float>) {
    return alloy::detail::float_from_bits(0x7fa5a5a5u);
  } else if constexpr (std::is_integral_v<T>) {
    return T(-12345);
  } else {
    return T::from_bits(0x7fa5);
  }
}

template <class T>
double value(T x) {
  return alloy::to_float(x);
}

// n draws of the distribution d, each rounded to float and then to T.
template <class T, class Distribution>
std::vector<T> rounded_draws(std::size_t n, Distribution d, std::mt19937_64& rng) {
  std::vector<T> v(n);
  for (auto& x : v) x = alloy::round_nearest<T>(static_cast<float>(d(rng)));
  return v;
}

// n draws of a standard normal in float, each rounded to T.
template <class T>
std::vector<T> random_values(std::size_t n, std::mt19937_64& rng) {
  return rounded_draws<T>(n, std::normal_distribution<float>(0.0f, 1.0f), rng);
}

// n draws of a normal distribution in double, each rounded to T.
template <class T>
std::vector<T> normal(std::size_t n, double mean, double stddev, std::mt19937_64& rng) {
  return rounded_draws<T>(n, std::normal_distribution<double>(mean, stddev), rng);
}

// n draws of a uniform distribution on [lo, hi) in double, each rounded to T.
template <class T>
std::vector<T> uniform(std::size_t n, double lo, double hi, std::mt19937_64& rng) {
  return rounded_draws<T>(n, std::uniform_real_distribution<double>(lo, hi), rng);
}

// n floats from a normal distribution with standard deviation 3, the same for the same seed.
inline std::vector<float> random_floats(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// One target class in [0, classes) for each of `rows` rows.
inline std::vector<std::int32_t> random_targets(std::size_t rows, std::size_t classes, std::mt19937_64& rng) {
  std::uniform_int_distribution<std::int32_t> d(0, static_cast<std::int32_t>(classes) - 1);
  std::vector<std::int32_t> t(rows);
  for (auto& v : t) v = d(rng);
  return t;
}

// Counts elements outside their bound and reports the first few.
class BoundCheck {
 public:
  explicit BoundCheck(std::string what) : what_(std::move(what)) {}
  void expect(double got, double expected, double bound, std::size_t i, std::size_t j) {
    if (std::fabs(got - expected) <= bound) return;  // NaN fails here too
    if (++failures_ <= 5) {
      ADD_FAILURE() << what_ << " at (" << i << ", " << j << "): got " << got << ", float64 reference " << expected
                    << ", allowed error " << bound;
    }
  }
  ~BoundCheck() {
    if (failures_ > 5) ADD_FAILURE() << what_ << ": " << failures_ << " elements out of bounds in all";
  }

 private:
  std::string what_;
  int failures_ = 0;
};

// Names typed tests by dtype: "bf16", "fp16", "fp32", "tf32".
struct DtypeName {
  template <class T>
  static std::string GetName(int) {
    return alloy::numeric_traits<T>::name;
  }
};

}  // namespace alloy::test
