// Vector accesses to global memory, the one way every kernel moves 16 bytes at a time (the
// element-wise algorithms of backend/cuda.hpp, the row kernels, the q8 update), and the rule for
// how they are issued:
//  - Loads. An array the kernel never writes (an `in` array of for_each_n or transform_reduce)
//    is read through __ldg, the read-only path (ld.global.nc). Every other load is plain: the
//    read-only path may return stale data for memory written while the kernel runs, and kernels
//    that take raw pointers (row kernels, q8) cannot rule out that an output aliases an input.
//  - Stores. Plain: one st.global.v4 of a uint4. Where the compiler splits that store into 2- or
//    4-byte pieces, as it does for the row kernels' results (computed element by element and
//    stored from the loop that computes them), the store is StorePath::write_back: __stwb
//    (st.global.wb, the default write-back policy, so it means what a plain store means), which
//    keeps it one 16-byte store. __stwb is not the default because, as inline PTX, it is opaque to
//    the compiler, which then schedules the element-wise kernels' address arithmetic worse.
// The rule is about bandwidth: no choice here changes a value that is read or written.
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_KERNELS

#include <cstring>

namespace alloy::detail {

enum class LoadPath { plain, read_only };
enum class StorePath { plain, write_back };

// N consecutive T from p into v: one 8-byte access when they are 8 bytes, else 16-byte accesses.
// p is aligned to the access size.
template <LoadPath Path = LoadPath::plain, class T, int N>
__device__ ALLOY_FORCEINLINE void load_vector(const T* p, T (&v)[N]) {
  constexpr int bytes = N * int(sizeof(T));
  static_assert(bytes == 8 || bytes % 16 == 0, "load_vector: 8 bytes or a multiple of 16");
  if constexpr (bytes == 8) {
    const uint2* src = reinterpret_cast<const uint2*>(p);
    uint2 u;
    if constexpr (Path == LoadPath::read_only) {
      u = __ldg(src);
    } else {
      u = *src;
    }
    memcpy(v, &u, 8);
  } else {
#pragma unroll
    for (int c = 0; c < bytes / 16; ++c) {
      const uint4* src = reinterpret_cast<const uint4*>(p) + c;
      uint4 u;
      if constexpr (Path == LoadPath::read_only) {
        u = __ldg(src);
      } else {
        u = *src;
      }
      memcpy(reinterpret_cast<char*>(v) + 16 * c, &u, 16);
    }
  }
}

// N consecutive T from v to p, with the same access sizes and alignment as load_vector.
template <StorePath Path = StorePath::plain, class T, int N>
__device__ ALLOY_FORCEINLINE void store_vector(T* p, const T (&v)[N]) {
  constexpr int bytes = N * int(sizeof(T));
  static_assert(bytes == 8 || bytes % 16 == 0, "store_vector: 8 bytes or a multiple of 16");
  if constexpr (bytes == 8) {
    uint2 u;
    memcpy(&u, v, 8);
    if constexpr (Path == StorePath::write_back) {
      __stwb(reinterpret_cast<uint2*>(p), u);
    } else {
      *reinterpret_cast<uint2*>(p) = u;
    }
  } else {
#pragma unroll
    for (int c = 0; c < bytes / 16; ++c) {
      uint4 u;
      memcpy(&u, reinterpret_cast<const char*>(v) + 16 * c, 16);
      if constexpr (Path == StorePath::write_back) {
        __stwb(reinterpret_cast<uint4*>(p) + c, u);
      } else {
        reinterpret_cast<uint4*>(p)[c] = u;
      }
    }
  }
}

}  // namespace alloy::detail

#endif  // ALLOY_HAS_CUDA_KERNELS
