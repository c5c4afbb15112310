// Element-wise and reduction algorithms on either backend, with one call shape:
//   for_each_n(backend, n, f, in(a), out(b))   and   reduce_sum(backend, a, n).
#pragma once

#include <alloy/backend/access.hpp>
#include <alloy/backend/cuda.hpp>
#include <alloy/backend/host.hpp>
#include <alloy/backend/reduce_ops.hpp>

#include <limits>

namespace alloy {

// Sum of n elements, accumulated in accumulator_t<T> (float for fp16 and bf16).
template <class B, class T>
accumulator_t<T> reduce_sum(B be, const T* data, std::size_t n) {
  using Acc = accumulator_t<T>;
  return transform_reduce(be, n, Acc(0), Sum{}, ToAccumulator{}, in(data));
}

// Largest of n elements as accumulator_t<T>; NaN if any element is NaN; -infinity (or the
// lowest value) when n == 0.
template <class B, class T>
accumulator_t<T> reduce_max(B be, const T* data, std::size_t n) {
  using Acc = accumulator_t<T>;
  const Acc lowest = std::numeric_limits<Acc>::has_infinity ? -std::numeric_limits<Acc>::infinity()
                                                            : std::numeric_limits<Acc>::lowest();
  return transform_reduce(be, n, lowest, Max{}, ToAccumulator{}, in(data));
}

}  // namespace alloy
