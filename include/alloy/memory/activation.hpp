// Activation<T>: a row-major [rows, cols] tensor in the activation workspace, the currency
// between blocks: what the trainer hands a LayeredModel's blocks, keeps at segment boundaries
// under Checkpointing, and what alloy::nn's layers take and return. A non-owning view.
#pragma once

#include <cstddef>
#include <type_traits>

namespace alloy {

template <class T>
struct Activation {
  T* data = nullptr;
  std::size_t rows = 0, cols = 0;

  Activation() = default;
  Activation(T* d, std::size_t r, std::size_t c) noexcept : data(d), rows(r), cols(c) {}
  // A writable activation is readable: Activation<T> converts to Activation<const T>.
  template <class U>
  requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>) Activation(const Activation<U>& a)
  noexcept : data(a.data), rows(a.rows), cols(a.cols) {}

  std::size_t size() const noexcept { return rows * cols; }
};

}  // namespace alloy
