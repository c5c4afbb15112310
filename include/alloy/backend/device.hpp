// Questions about the CUDA devices present, answered without throwing when there are none.
#pragma once

#include <alloy/error.hpp>

#include <atomic>
#include <cstddef>

namespace alloy {

// Number of usable CUDA devices: 0 when there is no driver, no device, or no CUDA runtime.
inline int cuda_device_count() noexcept {
#if ALLOY_HAS_CUDA_RUNTIME
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

inline bool has_cuda_device() noexcept { return cuda_device_count() > 0; }

#if ALLOY_HAS_CUDA_RUNTIME
namespace detail {

inline constexpr int cached_devices = 64;

// An attribute of the current device. It cannot change while the process runs, so it is read
// once per device and then served from a cache (devices past the first 64 are asked every time):
// launches size their grids with it and pay for no device query.
template <cudaDeviceAttr Attribute>
int current_device_attribute() {
  static std::atomic<int> cache[cached_devices] = {};  // 0: not read yet
  int device = 0;
  ALLOY_CUDA_CHECK(cudaGetDevice(&device));
  const bool cacheable = device >= 0 && device < cached_devices;
  if (cacheable) {
    if (const int known = cache[device].load(std::memory_order_relaxed); known != 0) return known;
  }
  int value = 0;
  ALLOY_CUDA_CHECK(cudaDeviceGetAttribute(&value, Attribute, device));
  if (cacheable) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

}  // namespace detail

// Multiprocessor count of the current device (grid sizing).
inline int current_device_sm_count() { return detail::current_device_attribute<cudaDevAttrMultiProcessorCount>(); }

// The most shared memory one block may opt in to on the current device, in bytes.
inline std::size_t current_device_max_shared_bytes_per_block() {
  return static_cast<std::size_t>(detail::current_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>());
}
#endif

}  // namespace alloy
