// What the row-wise kernels (LayerNorm, softmax cross-entropy) share: how one thread of a warp
// or block walks its share of a row, 16 bytes at a time where alignment allows, and the fixed
// reduction orders (a warp's xor butterfly, a block's left fold over its warps). The per-thread
// walks are __host__ __device__, and the Host backend replays the reductions in the same order,
// so Host and Cuda perform the same fp32 operations in the same order on rows split alike.
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/numeric/dtype.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace alloy::detail {

inline constexpr int warp_size = 32;

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
// puts every vector on a 16-byte boundary), element by element otherwise.
template <int W, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void load_run(const T* p, T (&v)[W]) {
#if ALLOY_DEVICE_CODE
  if constexpr (W * sizeof(T) == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    memcpy(v, &u, 16);
  } else
#endif
  {
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) v[l] = p[l];
  }
}

template <int W, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void store_run(T* p, const T (&v)[W]) {
#if ALLOY_DEVICE_CODE
  if constexpr (W * sizeof(T) == 16) {
    uint4 u;
    memcpy(&u, v, 16);
    // An intrinsic, not a plain store: the compiler splits a plain uint4 store of values
    // computed element by element into 4- or 2-byte stores.
    __stwb(reinterpret_cast<uint4*>(p), u);
  } else
#endif
  {
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) p[l] = v[l];
  }
}

// The Host's replay of a warp's xor butterfly over 32 lane values: at each step lane i takes
// op(own, partner i ^ mask), masks 16, 8, 4, 2, 1, as warp_allreduce does. Returns lane 0's value.
template <class V, class Op>
V butterfly_replay(const V (&lanes)[warp_size], Op op) {
  V v[warp_size], next[warp_size];
  for (int i = 0; i < warp_size; ++i) v[i] = lanes[i];
  for (int mask = warp_size / 2; mask > 0; mask /= 2) {
    for (int i = 0; i < warp_size; ++i) next[i] = op(v[i], v[i ^ mask]);
    for (int i = 0; i < warp_size; ++i) v[i] = next[i];
  }
  return v[0];
}

// The Host's replay of block_allreduce over Threads values: each warp's butterfly, then warp 0's
// total folded left with the others in warp order.
template <int Threads, class V, class Op>
V block_replay(const V (&threads)[Threads], Op op) {
  static_assert(Threads % warp_size == 0);
  V warp_total[Threads / warp_size];
  for (int w = 0; w < Threads / warp_size; ++w) {
    V lanes[warp_size];
    for (int i = 0; i < warp_size; ++i) lanes[i] = threads[w * warp_size + i];
    warp_total[w] = butterfly_replay(lanes, op);
  }
  V total = warp_total[0];
  for (int w = 1; w < Threads / warp_size; ++w) total = op(total, warp_total[w]);
  return total;
}

#if ALLOY_HAS_CUDA_KERNELS

// A value of whole 32-bit words from lane (this lane ^ mask).
template <class V>
__device__ ALLOY_FORCEINLINE V shuffle_xor(const V& v, int mask) {
  static_assert(sizeof(V) % 4 == 0 && std::is_trivially_copyable_v<V>);
  std::uint32_t words[sizeof(V) / 4];
  memcpy(words, &v, sizeof(V));
#pragma unroll
  for (int k = 0; k < int(sizeof(V) / 4); ++k) words[k] = __shfl_xor_sync(0xffffffffu, words[k], mask);
  V out;
  memcpy(&out, words, sizeof(V));
  return out;
}

// op over the 32 lanes of a full warp. Every lane ends with the same value when op is
// commutative bit for bit (fp32 addition is): partners compute op(a, b) and op(b, a).
template <class V, class Op>
__device__ ALLOY_FORCEINLINE V warp_allreduce(V v, Op op) {
#pragma unroll
  for (int mask = warp_size / 2; mask > 0; mask /= 2) v = op(v, shuffle_xor(v, mask));
  return v;
}

// op over a block of Threads threads: warp butterflies, then every thread folds the warps'
// totals left in warp order (no broadcast needed: all threads fold the same values). `shared`
// holds Threads / 32 values; call __syncthreads() before the next use of it.
template <int Threads, class V, class Op>
__device__ ALLOY_FORCEINLINE V block_allreduce(V v, Op op, V* shared) {
  v = warp_allreduce(v, op);
  if (threadIdx.x % warp_size == 0) shared[threadIdx.x / warp_size] = v;
  __syncthreads();
  V total = shared[0];
#pragma unroll
  for (int w = 1; w < Threads / warp_size; ++w) total = op(total, shared[w]);
  return total;
}

#endif  // ALLOY_HAS_CUDA_KERNELS

}  // namespace alloy::detail
