// alloy::fp16: IEEE binary16, a 2-byte value type with the bits of CUDA's __half.
#pragma once

#include <alloy/numeric/detail/bits.hpp>

// nvcc translation units include the toolkit's header, whose intrinsics the device paths below
// use. g++ translation units do not: parsing it (and cuBLASLt's header, which includes it) was a
// quarter of the time of a host TU including alloy/alloy.hpp. The conversions to and from __half
// below are templates on the toolkit's type, declared here, so the class is the same in both
// kinds of translation unit; a g++ translation unit that uses them includes <cuda_fp16.h>.
#if ALLOY_HAS_CUDA_KERNELS
#include <cuda_fp16.h>
#endif

#include <concepts>

#if ALLOY_HAS_CUDA_RUNTIME
struct __half;  // <cuda_fp16.h>
#endif

namespace alloy {

struct alignas(2) fp16 {
  std::uint16_t storage;

  fp16() = default;

  // Round to nearest, ties to even; overflow gives infinity, NaN the canonical NaN 0x7fff.
  ALLOY_HOST_DEVICE explicit fp16(float x) noexcept {
#if ALLOY_DEVICE_CODE
    storage = __half_as_ushort(__float2half_rn(x));
#else
    storage = detail::float_to_fp16_bits(x);
#endif
  }

  // Exact: every binary16 value is a float.
  ALLOY_HOST_DEVICE explicit operator float() const noexcept {
#if ALLOY_DEVICE_CODE
    return __half2float(__ushort_as_half(storage));
#else
    return detail::fp16_bits_to_float(storage);
#endif
  }

  ALLOY_HOST_DEVICE static constexpr fp16 from_bits(std::uint16_t bits) noexcept {
    fp16 h{};
    h.storage = bits;
    return h;
  }
  ALLOY_HOST_DEVICE constexpr std::uint16_t bits() const noexcept { return storage; }

#if ALLOY_HAS_CUDA_RUNTIME
  // The same bits as CUDA's __half, both ways.
  template <std::same_as<__half> H>
  ALLOY_HOST_DEVICE fp16(H h) noexcept : storage(detail::bit_cast<std::uint16_t>(h)) {}
  template <std::same_as<__half> H>
  ALLOY_HOST_DEVICE explicit operator H() const noexcept {
    return detail::bit_cast<H>(storage);
  }
#endif
};

static_assert(sizeof(fp16) == 2 && alignof(fp16) == 2);

}  // namespace alloy
