// Questions about the CUDA devices present, answered without throwing when there are none.
#pragma once

#include <alloy/error.hpp>

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
// Multiprocessor count of the current device (grid sizing for persistent-style kernels).
inline int current_device_sm_count() {
  int device = 0;
  ALLOY_CUDA_CHECK(cudaGetDevice(&device));
  int sms = 0;
  ALLOY_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}
#endif

}  // namespace alloy
