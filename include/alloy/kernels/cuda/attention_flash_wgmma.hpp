// Hopper's warpgroup MMA (wgmma.mma_async) for attention's 16-bit kernels with head_dim 64
// (cuda/attention_flash.hpp). A block of attention's kernels is 4 warps: one warpgroup. wgmma
// multiplies a 64-row A (in shared memory or in registers) by an N-column B in shared memory into
// fp32 accumulators held as an m16n8 accumulator per warp and 8 columns: warp w holds rows 16 w..
// 16 w + 15 and, for n-tile j, the same four values as mma.sync's m16n8 accumulator. So the
// softmax, the masks and the packing of P and dS into A fragments stay as they are.
//
// wgmma reads shared memory through descriptors. attention's 16-bit tiles with head_dim 64 are
// rows of 128 bytes whose 16-byte chunks are xor-swizzled by row % 8 (flash_offset<64>): that is
// wgmma's 128-byte swizzle, so the tiles are used in place, as
//  - K-major operands (rows are M or N, 64 head dimensions along K): Q, K, V and dO in S = Q K^T,
//    dP = dO V^T and their transposes; a k-step of 16 advances the start address by 32 bytes
//    within the swizzled row, 8-row groups lie 1024 bytes apart;
//  - MN-major B operands (rows are K, head dimensions along N): V in O += P V, K in dQ += dS K,
//    dO and Q in dV += P^T dO and dK += dS^T Q; a k-step of 16 rows advances by 2048 bytes.
// Every tile must start on a 1024-byte boundary (the swizzle's repeating pattern).
//
// wgmma exists only on sm_90a: ALLOY_FLASH_WGMMA is 1 in device code compiled for it
// (CMAKE_CUDA_ARCHITECTURES=90a) and 0 otherwise, where the kernels run mma.sync.
// The PTX ISA's "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions" give the
// descriptor, the layouts and the fences used here.
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_KERNELS

#include <alloy/error.hpp>
#include <alloy/numeric/bf16.hpp>

#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ALLOY_FLASH_WGMMA 1
#else
#define ALLOY_FLASH_WGMMA 0
#endif

namespace alloy::detail {

#if ALLOY_FLASH_WGMMA

// The descriptor of a tile of 128-byte rows in the 128-byte swizzle whose first row is at shared
// address `address` (a 1024-byte boundary, plus 32 bytes per K-major k-step): start address,
// leading byte offset 16 (unused by these layouts: K-major swizzled ignores it, and an MN-major B
// of 64 columns has a single swizzle atom across N), stride byte offset 1024 between 8-row groups.
__device__ ALLOY_FORCEINLINE std::uint64_t wgmma_descriptor(std::uint32_t address) {
  return std::uint64_t((address & 0x3FFFF) >> 4) | (std::uint64_t(16 >> 4) << 16) | (std::uint64_t(1024 >> 4) << 32) |
         (std::uint64_t(1) << 62);
}

// Before the first wgmma of a batch whose accumulators or A registers other instructions wrote.
__device__ ALLOY_FORCEINLINE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ ALLOY_FORCEINLINE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int Pending>
__device__ ALLOY_FORCEINLINE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}
// Shared memory that threads wrote (cp.async, stores) becomes visible to wgmma's reads (the async
// proxy); a __syncthreads() follows.
__device__ ALLOY_FORCEINLINE void wgmma_fence_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Ties registers that an in-flight wgmma reads or writes to this point of the program, so that
// the compiler neither reuses them nor reads them before the wgmma_wait that precedes it.
template <int N>
__device__ ALLOY_FORCEINLINE void wgmma_hold(float (&d)[N][4]) {
  ALLOY_UNROLL
  for (int n = 0; n < N; ++n) {
    asm volatile("" : "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3])::"memory");
  }
}
__device__ ALLOY_FORCEINLINE void wgmma_hold(std::uint32_t (&a)[4]) {
  asm volatile("" : "+r"(a[0]), "+r"(a[1]), "+r"(a[2]), "+r"(a[3])::"memory");
}

#define ALLOY_WGMMA_D16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define ALLOY_WGMMA_D32                                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define ALLOY_WGMMA_ACC4(d, n, c) c(d[n][0]), c(d[n][1]), c(d[n][2]), c(d[n][3])
#define ALLOY_WGMMA_ACC16(d, c) \
  ALLOY_WGMMA_ACC4(d, 0, c), ALLOY_WGMMA_ACC4(d, 1, c), ALLOY_WGMMA_ACC4(d, 2, c), ALLOY_WGMMA_ACC4(d, 3, c)
#define ALLOY_WGMMA_ACC32(d, c)                                                                             \
  ALLOY_WGMMA_ACC16(d, c), ALLOY_WGMMA_ACC4(d, 4, c), ALLOY_WGMMA_ACC4(d, 5, c), ALLOY_WGMMA_ACC4(d, 6, c), \
      ALLOY_WGMMA_ACC4(d, 7, c)

// d (+)= A B for a 64 x 16 A and a 16 x N B, both in shared memory (descriptors a and b), B
// K-major unless TransposeB (MN-major); d = A B when !Accumulate, whose d is then written only (no
// register is read, so nothing has to be moved into it first). N = 8 x the accumulator's n-tiles.
#define ALLOY_WGMMA_SS(shape, types, dlist, p, a_op, b_op, tb_op)                                                     \
  "{\n.reg .pred p;\nsetp.ne.b32 p, " p ", 0;\nwgmma.mma_async.sync.aligned." shape ".f32." types " " dlist ", " a_op \
  ", " b_op ", p, 1, 1, 0, " tb_op ";\n}\n"
template <class T, bool Accumulate, bool TransposeB, int NT>
__device__ ALLOY_FORCEINLINE void wgmma_ss(float (&d)[NT][4], std::uint64_t a, std::uint64_t b) {
  static_assert(NT == 4 || NT == 8, "wgmma_ss: N of 32 or 64");
  constexpr bool is_bf16 = std::is_same_v<T, bf16>;
  if constexpr (NT == 8 && Accumulate) {
    if constexpr (is_bf16) {
      asm volatile(ALLOY_WGMMA_SS("m64n64k16", "bf16.bf16", ALLOY_WGMMA_D32, "1", "%32", "%33", "%34")
                   : ALLOY_WGMMA_ACC32(d, "+f")
                   : "l"(a), "l"(b), "n"(TransposeB ? 1 : 0));
    } else {
      asm volatile(ALLOY_WGMMA_SS("m64n64k16", "f16.f16", ALLOY_WGMMA_D32, "1", "%32", "%33", "%34")
                   : ALLOY_WGMMA_ACC32(d, "+f")
                   : "l"(a), "l"(b), "n"(TransposeB ? 1 : 0));
    }
  } else if constexpr (NT == 8) {
    if constexpr (is_bf16) {
      asm volatile(ALLOY_WGMMA_SS("m64n64k16", "bf16.bf16", ALLOY_WGMMA_D32, "0", "%32", "%33", "%34")
                   : ALLOY_WGMMA_ACC32(d, "=f")
                   : "l"(a), "l"(b), "n"(TransposeB ? 1 : 0));
    } else {
      asm volatile(ALLOY_WGMMA_SS("m64n64k16", "f16.f16", ALLOY_WGMMA_D32, "0", "%32", "%33", "%34")
                   : ALLOY_WGMMA_ACC32(d, "=f")
                   : "l"(a), "l"(b), "n"(TransposeB ? 1 : 0));
    }
  } else if constexpr (Accumulate) {
    if constexpr (is_bf16) {
      asm volatile(ALLOY_WGMMA_SS("m64n32k16", "bf16.bf16", ALLOY_WGMMA_D16, "1", "%16", "%17", "%18")
                   : ALLOY_WGMMA_ACC16(d, "+f")
                   : "l"(a), "l"(b), "n"(TransposeB ? 1 : 0));
    } else {
      asm volatile(ALLOY_WGMMA_SS("m64n32k16", "f16.f16", ALLOY_WGMMA_D16, "1", "%16", "%17", "%18")
                   : ALLOY_WGMMA_ACC16(d, "+f")
                   : "l"(a), "l"(b), "n"(TransposeB ? 1 : 0));
    }
  } else {
    if constexpr (is_bf16) {
      asm volatile(ALLOY_WGMMA_SS("m64n32k16", "bf16.bf16", ALLOY_WGMMA_D16, "0", "%16", "%17", "%18")
                   : ALLOY_WGMMA_ACC16(d, "=f")
                   : "l"(a), "l"(b), "n"(TransposeB ? 1 : 0));
    } else {
      asm volatile(ALLOY_WGMMA_SS("m64n32k16", "f16.f16", ALLOY_WGMMA_D16, "0", "%16", "%17", "%18")
                   : ALLOY_WGMMA_ACC16(d, "=f")
                   : "l"(a), "l"(b), "n"(TransposeB ? 1 : 0));
    }
  }
}
#undef ALLOY_WGMMA_SS

// d = A B^T over head_dim 64 for two tiles of rows of 64 elements (A's 64 rows from a_tile, B's
// 8 NT rows from b_tile, both K-major): four k-steps of 16, the first writing d.
template <class T, int NT>
__device__ ALLOY_FORCEINLINE void wgmma_rows_by_rows(float (&d)[NT][4], std::uint32_t a_tile, std::uint32_t b_tile) {
  wgmma_ss<T, false, false>(d, wgmma_descriptor(a_tile), wgmma_descriptor(b_tile));
  ALLOY_UNROLL
  for (int kk = 1; kk < 4; ++kk) {
    wgmma_ss<T, true, false>(d, wgmma_descriptor(a_tile + 32 * kk), wgmma_descriptor(b_tile + 32 * kk));
  }
}

// d += A B for a 64 x 16 A in registers (each warp's m16n8k16 A fragment of its 16 rows) and a
// 16 x 64 MN-major B in shared memory.
template <class T>
__device__ ALLOY_FORCEINLINE void wgmma_rs(float (&d)[8][4], const std::uint32_t (&a)[4], std::uint64_t b) {
  if constexpr (std::is_same_v<T, bf16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " ALLOY_WGMMA_D32
        ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : ALLOY_WGMMA_ACC32(d, "+f")
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " ALLOY_WGMMA_D32
        ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : ALLOY_WGMMA_ACC32(d, "+f")
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  }
}

#undef ALLOY_WGMMA_D16
#undef ALLOY_WGMMA_D32
#undef ALLOY_WGMMA_ACC4
#undef ALLOY_WGMMA_ACC16
#undef ALLOY_WGMMA_ACC32

#endif  // ALLOY_FLASH_WGMMA

template <int = 0>
__global__ void flash_wgmma_probe_kernel(int* compiled) {
  *compiled = ALLOY_FLASH_WGMMA;
}

// Whether the attention kernels this program loaded for `device` run wgmma (their device code was
// compiled for sm_90a) rather than mma.sync: asked of the device once per device and remembered.
inline bool flash_wgmma_compiled(int device) {
  static std::mutex mutex;
  static std::map<int, bool> known;
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(device); it != known.end()) return it->second;
  int previous = 0;
  ALLOY_CUDA_CHECK(cudaGetDevice(&previous));
  ALLOY_CUDA_CHECK(cudaSetDevice(device));
  int* flag = nullptr;
  int compiled = 0;
  ALLOY_CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
  flash_wgmma_probe_kernel<<<1, 1>>>(flag);
  const cudaError_t launched = cudaGetLastError();
  const cudaError_t copied = cudaMemcpy(&compiled, flag, sizeof(int), cudaMemcpyDeviceToHost);
  ALLOY_CUDA_CHECK(cudaFree(flag));
  ALLOY_CUDA_CHECK(cudaSetDevice(previous));
  ALLOY_CUDA_CHECK(launched);
  ALLOY_CUDA_CHECK(copied);
  return known[device] = compiled != 0;
}

}  // namespace alloy::detail

#endif  // ALLOY_HAS_CUDA_KERNELS
