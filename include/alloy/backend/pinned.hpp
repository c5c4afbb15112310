// Page-locked ("pinned") host memory, the equivalent of PyTorch's pin_memory: the GPU copies it by
// DMA straight from where it is, asynchronously, at full link speed, where pageable memory is
// first copied by the driver through a staging buffer of its own while the host waits.
//
//   alloy::pinned_vector<float> x(rows * features);   // fill it, hand it to the trainer in a batch
//
// Batches held in pinned vectors are uploaded by the trainer's input pipeline
// (memory/input_uploads.hpp) without a host copy. Without the CUDA runtime the allocator is plain
// aligned new, so code written with it builds and runs everywhere.
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>

#include <cstddef>
#include <new>
#include <string>
#include <vector>

namespace alloy {

// True when p points into page-locked host memory the CUDA runtime knows (cudaMallocHost or
// cudaHostRegister): the device can copy from it directly. Always false without the runtime.
inline bool is_pinned(const void* p) noexcept {
#if ALLOY_HAS_CUDA_RUNTIME
  if (p == nullptr) return false;
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();  // an unknown pointer is an answer (no), not an error to keep
    return false;
  }
  return a.type == cudaMemoryTypeHost;
#else
  (void)p;
  return false;
#endif
}

// A standard allocator of page-locked host memory (cudaMallocHost / cudaFreeHost).
template <class T>
struct PinnedAllocator {
  using value_type = T;

  PinnedAllocator() noexcept = default;
  template <class U>
  PinnedAllocator(const PinnedAllocator<U>&) noexcept {}

  // Pinned memory where the CUDA runtime can give it; on a machine without a device (or without
  // the runtime) ordinary aligned memory, so the same code runs there, on Host.
  T* allocate(std::size_t n) {
    if (n == 0) return nullptr;
#if ALLOY_HAS_CUDA_RUNTIME
    void* p = nullptr;
    const cudaError_t e = cudaMallocHost(&p, n * sizeof(T));
    if (e == cudaSuccess) return static_cast<T*>(p);
    (void)cudaGetLastError();
    if (e != cudaErrorNoDevice && e != cudaErrorInsufficientDriver) {
      throw cuda_error(
          "cudaMallocHost", __FILE__, __LINE__, e,
          std::string(cudaGetErrorString(e)) + " (pinning " + std::to_string(n * sizeof(T)) + " bytes of host memory)");
    }
#endif
    return static_cast<T*>(::operator new (n * sizeof(T), std::align_val_t{256}));
  }

  void deallocate(T* p, std::size_t) noexcept {
    if (p == nullptr) return;
#if ALLOY_HAS_CUDA_RUNTIME
    if (is_pinned(p)) {
      (void)cudaFreeHost(p);
      return;
    }
#endif
    ::operator delete (p, std::align_val_t{256});
  }

  template <class U>
  bool operator==(const PinnedAllocator<U>&) const noexcept {
    return true;
  }
};

template <class T>
using pinned_vector = std::vector<T, PinnedAllocator<T>>;

}  // namespace alloy
