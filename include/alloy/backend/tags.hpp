// Execution backends: where an algorithm runs. Host runs plain loops on the calling thread;
// Cuda launches kernels on a stream (the caller owns the stream, as with CUB and Thrust).
#pragma once

#include <alloy/config.hpp>

#include <type_traits>

#if ALLOY_HAS_CUDA_RUNTIME
#include <cuda_runtime_api.h>
#endif

namespace alloy {

struct Host {
  static constexpr const char* name = "Host";
};

#if ALLOY_HAS_CUDA_RUNTIME
struct Cuda {
  static constexpr const char* name = "Cuda";
  cudaStream_t stream = nullptr;  // the legacy default stream unless given

  static constexpr Cuda on(cudaStream_t s) noexcept { return Cuda{s}; }
};
#endif

template <class T>
inline constexpr bool is_backend_v = std::is_same_v<T, Host>
#if ALLOY_HAS_CUDA_RUNTIME
                                     || std::is_same_v<T, Cuda>
#endif
    ;

template <class T>
concept backend = is_backend_v<T>;

}  // namespace alloy
