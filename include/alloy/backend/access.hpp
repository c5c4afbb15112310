// How an element-wise algorithm touches each array: in (read), out (written), inout (both).
// The Cuda backend reads and writes these 16 bytes at a time where alignment allows; an `out`
// array is never read, an `in` array never written.
#pragma once

#include <alloy/config.hpp>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace alloy {

template <class T>
struct In {
  using value_type = T;
  static constexpr bool reads = true;
  static constexpr bool writes = false;
  const T* data;
  ALLOY_HOST_DEVICE const T& element(std::size_t i) const { return data[i]; }
};

template <class T>
struct Out {
  using value_type = T;
  static constexpr bool reads = false;
  static constexpr bool writes = true;
  T* data;
  ALLOY_HOST_DEVICE T& element(std::size_t i) const { return data[i]; }
};

template <class T>
struct InOut {
  using value_type = T;
  static constexpr bool reads = true;
  static constexpr bool writes = true;
  T* data;
  ALLOY_HOST_DEVICE T& element(std::size_t i) const { return data[i]; }
};

template <class T>
In<T> in(const T* p) noexcept {
  return {p};
}
template <class T>
Out<T> out(T* p) noexcept {
  return {p};
}
template <class T>
InOut<T> inout(T* p) noexcept {
  return {p};
}

namespace detail {

template <class W>
inline constexpr bool is_access_v = false;
template <class T>
inline constexpr bool is_access_v<In<T>> = true;
template <class T>
inline constexpr bool is_access_v<Out<T>> = true;
template <class T>
inline constexpr bool is_access_v<InOut<T>> = true;

// Elements per thread per step so that every array moves at least 16 bytes at a time:
// 16 / (smallest element size). 1 (scalar) when an element size does not divide 16.
template <class... W>
constexpr int vector_lanes() {
  constexpr std::size_t sizes[] = {sizeof(typename W::value_type)...};
  std::size_t smallest = 16;
  for (std::size_t s : sizes) {
    if (s > 16 || 16 % s != 0) return 1;
    if (s < smallest) smallest = s;
  }
  return static_cast<int>(16 / smallest);
}

template <class... W>
bool all_aligned(std::size_t alignment, const W&... w) noexcept {
  return ((reinterpret_cast<std::uintptr_t>(w.data) % alignment == 0) && ...);
}

}  // namespace detail

template <class W>
concept element_access = detail::is_access_v<W>;

}  // namespace alloy
