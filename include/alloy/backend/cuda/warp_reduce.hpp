// The fixed reduction orders of alloy's kernels, and the Host's replay of them. A warp reduces
// with an xor butterfly: at masks 16, 8, 4, 2, 1, lane i combines its value with lane i ^ mask's.
// A block runs that butterfly in every warp, then every thread folds the warps' totals left in
// warp order. The replays perform the same operations in the same order on the host, so a kernel
// built on these gives the same bits on Host and Cuda (the row kernels rely on it); that is why
// they are written here rather than taken from cub::WarpReduce, whose order is CUB's to change.
// (The two-stage transform_reduce in backend/cuda.hpp folds its blocks with block_allreduce too:
// its results are deterministic per device and size, and are not replayed on the host.)
#pragma once

#include <alloy/config.hpp>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace alloy::detail {

inline constexpr int warp_size = 32;

// The Host's replay of warp_allreduce over 32 lane values: at each step lane i takes
// op(own, partner i ^ mask), masks 16, 8, 4, 2, 1. Returns lane 0's value.
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
// commutative bit for bit (fp32 addition and fmaxf are): partners compute op(a, b) and op(b, a).
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
