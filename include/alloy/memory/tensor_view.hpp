// TensorView<T>: a non-owning, trivially copyable view of a contiguous tensor (rank <= 4),
// usable in host code and in kernels.
#pragma once

#include <alloy/config.hpp>

#include <array>
#include <cstdint>

namespace alloy {

inline constexpr int max_rank = 4;

template <class T>
struct TensorView {
  T* data = nullptr;
  std::array<std::int64_t, max_rank> shape{};    // unused trailing dims are 1
  std::array<std::int64_t, max_rank> strides{};  // in elements, row-major
  int rank = 0;

  ALLOY_HOST_DEVICE std::int64_t numel() const {
    std::int64_t n = 1;
    for (int d = 0; d < rank; ++d) n *= shape[d];
    return n;
  }
  ALLOY_HOST_DEVICE std::int64_t size(int d) const { return shape[d]; }
  ALLOY_HOST_DEVICE T& operator[](std::int64_t i) const { return data[i]; }
  // Row-major element (i, j) of a rank-2 view.
  ALLOY_HOST_DEVICE T& operator()(std::int64_t i, std::int64_t j) const {
    return data[i * strides[0] + j * strides[1]];
  }
};

}  // namespace alloy
