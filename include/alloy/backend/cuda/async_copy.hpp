// cp.async: copies from global to shared memory that do not pass through registers, so a thread
// can have many in flight (sm_80 and later). A thread's copies are complete for it after
// async_wait_all(); __syncthreads() then makes every thread's visible to the block.
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_KERNELS

#include <cstdint>

namespace alloy::detail {

__device__ ALLOY_FORCEINLINE std::uint32_t shared_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes from global to shared memory (both 16-byte aligned), or 16 zero bytes when !valid
// (src is then not read). .cg: cached in L2 only.
__device__ ALLOY_FORCEINLINE void async_copy_16(std::uint32_t dst, const void* src, bool valid = true) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

// 4 bytes (both 4-byte aligned), or 4 zero bytes when !valid.
__device__ ALLOY_FORCEINLINE void async_copy_4(std::uint32_t dst, const void* src, bool valid = true) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}

__device__ ALLOY_FORCEINLINE void async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits for this thread's copies.
__device__ ALLOY_FORCEINLINE void async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

}  // namespace alloy::detail

#endif  // ALLOY_HAS_CUDA_KERNELS
