// Dtype tags for policies. fp16 and bf16 are both tags and value types; fp32 is float;
// tf32 stores float and asks for tf32 tensor-core math in matrix products.
#pragma once

#include <alloy/numeric/bf16.hpp>
#include <alloy/numeric/fp16.hpp>

namespace alloy {

using fp32 = float;

struct tf32 {
  using storage_type = float;
};

namespace detail {
template <class T>
struct storage_of {
  using type = T;
};
template <>
struct storage_of<tf32> {
  using type = float;
};
}  // namespace detail

// The type a tensor of dtype T holds in memory: float for tf32, T itself otherwise.
template <class T>
using storage_t = typename detail::storage_of<T>::type;

}  // namespace alloy
