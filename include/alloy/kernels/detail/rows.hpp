// What the row-wise kernels (LayerNorm, softmax cross-entropy) share: how one thread of a warp
// or block walks its share of a row, 16 bytes at a time where alignment allows. The per-thread
// walks are __host__ __device__; the reductions across threads are backend/cuda/warp_reduce.hpp's,
// which the Host backend replays in the same order, so Host and Cuda perform the same fp32
// operations in the same order on rows split alike.
#pragma once

#include <alloy/backend/cuda/vector_io.hpp>
#include <alloy/backend/cuda/warp_reduce.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/numeric/dtype.hpp>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace alloy::detail {

// The element types the row kernels take.
template <class T>
inline constexpr bool row_dtype = std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

// Whether this translation unit can run the row kernels on backend B (Cuda needs nvcc).
template <class B>
inline constexpr bool has_row_kernels = std::is_same_v<B, Host> || (backend<B> && ALLOY_HAS_CUDA_KERNELS);

// Elements of T in a 16-byte vector (1 where T does not divide 16).
template <class T>
inline constexpr int row_vector_lanes = 16 % sizeof(T) == 0 ? int(16 / sizeof(T)) : 1;

// One row cut at 16-byte boundaries: `head` scalar elements up to the first boundary, then
// `vectors` whole vectors of row_vector_lanes<T> elements, then a scalar tail up to `length`.
// A row that is not vectorized is all head.
struct RowSplit {
  std::size_t head;
  std::size_t vectors;
  std::size_t length;
};

template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE RowSplit split_row(const T* row, std::size_t length, bool vectorized) {
  constexpr std::size_t lanes = row_vector_lanes<T>;
  if (!vectorized || lanes == 1) return {length, 0, length};
  const std::size_t past_boundary = (reinterpret_cast<std::uintptr_t>(row) % 16) / sizeof(T);
  std::size_t head = past_boundary == 0 ? 0 : lanes - past_boundary;
  if (head > length) head = length;
  return {head, (length - head) / lanes, length};
}

// Arrays read or written with one row split must share their address modulo 16.
template <class P, class... Q>
bool same_alignment(const P* first, const Q*... rest) noexcept {
  const auto misalignment = reinterpret_cast<std::uintptr_t>(first) % 16;
  return ((reinterpret_cast<std::uintptr_t>(rest) % 16 == misalignment) && ...);
}

template <int W>
using Run = std::integral_constant<int, W>;

// The runs thread `thread` of `threads` owns, in the order it visits them:
// visit(Run<1>{}, i) for head and tail elements, visit(Run<L>{}, first) for each vector.
// Vectors go to consecutive threads, so a warp's vectors are 512 contiguous bytes.
template <int L, class Visit>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void for_each_run(const RowSplit& s, std::size_t thread, std::size_t threads,
                                                      Visit&& visit) {
  for (std::size_t i = thread; i < s.head; i += threads) visit(Run<1>{}, i);
  for (std::size_t v = thread; v < s.vectors; v += threads) visit(Run<L>{}, s.head + v * L);
  for (std::size_t i = s.head + s.vectors * L + thread; i < s.length; i += threads) visit(Run<1>{}, i);
}

// W consecutive elements: one 16-byte access on the device when they fill a vector (the split
// puts every vector on a 16-byte boundary), element by element otherwise. Loads are plain (an
// output may alias an input); stores go through __stwb, since a plain one gets split
// (backend/cuda/vector_io.hpp).
template <int W, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void load_run(const T* p, T (&v)[W]) {
#if ALLOY_DEVICE_CODE && ALLOY_HAS_CUDA_KERNELS
  if constexpr (W * sizeof(T) == 16) {
    load_vector(p, v);
  } else
#endif
  {
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) v[l] = p[l];
  }
}

template <int W, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void store_run(T* p, const T (&v)[W]) {
#if ALLOY_DEVICE_CODE && ALLOY_HAS_CUDA_KERNELS
  if constexpr (W * sizeof(T) == 16) {
    store_vector<StorePath::write_back>(p, v);
  } else
#endif
  {
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) p[l] = v[l];
  }
}

}  // namespace alloy::detail
