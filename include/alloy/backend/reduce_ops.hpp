// Reduction operators, written once for both backends.
#pragma once

#include <alloy/config.hpp>
#include <alloy/numeric/traits.hpp>

namespace alloy {

struct Sum {
  template <class T>
  ALLOY_HOST_DEVICE T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

// NaN-propagating maximum: a NaN anywhere gives NaN (fmax would hide it).
struct Max {
  template <class T>
  ALLOY_HOST_DEVICE T operator()(const T& a, const T& b) const {
    if (a != a) return a;
    if (b != b) return b;
    return a < b ? b : a;
  }
};

// The type sums and maxima of T are carried in: float for the 16-bit types.
template <class T>
struct accumulator {
  using type = T;
};
template <>
struct accumulator<fp16> {
  using type = float;
};
template <>
struct accumulator<bf16> {
  using type = float;
};
template <class T>
using accumulator_t = typename accumulator<T>::type;

// Converts an element to its accumulator type.
struct ToAccumulator {
  template <class T>
  ALLOY_HOST_DEVICE accumulator_t<T> operator()(const T& x) const {
    return static_cast<accumulator_t<T>>(x);
  }
};

}  // namespace alloy
