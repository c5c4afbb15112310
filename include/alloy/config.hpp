// Compiler and platform switches shared by every alloy header.
#pragma once

// nvcc defaults to C++17; under it alloy fails at its first concept unless told otherwise.
#if __cplusplus < 202002L
#error "alloy needs C++20: compile with -std=c++20 (nvcc too); CMake's alloy::alloy target asks for it"
#endif

#if defined(__CUDACC__)
#define ALLOY_HOST_DEVICE __host__ __device__
#define ALLOY_DEVICE __device__
#else
#define ALLOY_HOST_DEVICE
#define ALLOY_DEVICE
#endif

#if defined(__CUDA_ARCH__)
#define ALLOY_DEVICE_CODE 1
#else
#define ALLOY_DEVICE_CODE 0
#endif

#if defined(__CUDACC__)
#define ALLOY_FORCEINLINE __forceinline__
#else
#define ALLOY_FORCEINLINE inline __attribute__((always_inline))
#endif

// Loop unrolling hint for code compiled for both host and device (host compilers warn on
// `#pragma unroll`).
#if ALLOY_DEVICE_CODE
#define ALLOY_UNROLL _Pragma("unroll")
#else
#define ALLOY_UNROLL
#endif

// The CUDA runtime API is plain C: host-only translation units may allocate device
// memory and query devices; only kernels need nvcc. ALLOY_NO_CUDA forces a build
// without it (the Host backend alone).
#if !defined(ALLOY_NO_CUDA) && __has_include(<cuda_runtime_api.h>)
#define ALLOY_HAS_CUDA_RUNTIME 1
#else
#define ALLOY_HAS_CUDA_RUNTIME 0
#endif

// Kernels (the Cuda backend's algorithms) exist only where nvcc compiles the file. This switch
// decides what a translation unit can run, never what a type is: a class must be defined the
// same way in g++ and nvcc translation units of one program, so class definitions, layouts and
// defaults key on ALLOY_HAS_CUDA_RUNTIME, which both kinds of TU agree on.
#if ALLOY_HAS_CUDA_RUNTIME && defined(__CUDACC__)
#define ALLOY_HAS_CUDA_KERNELS 1
#else
#define ALLOY_HAS_CUDA_KERNELS 0
#endif
