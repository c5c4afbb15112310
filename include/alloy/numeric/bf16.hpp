// alloy::bf16: bfloat16 (8-bit exponent, 7-bit mantissa), the bits of CUDA's __nv_bfloat16.
#pragma once

#include <alloy/numeric/detail/bits.hpp>

// nvcc translation units include the toolkit's header, whose intrinsics the device paths below
// use. g++ translation units do not: parsing it (and cuBLASLt's header, which includes it) was a
// quarter of the time of a host TU including alloy/alloy.hpp. The conversions to and from __nv_bfloat16
// below are templates on the toolkit's type, declared here, so the class is the same in both
// kinds of translation unit; a g++ translation unit that uses them includes <cuda_bf16.h>.
#if ALLOY_HAS_CUDA_KERNELS
#include <cuda_bf16.h>
#endif

#include <concepts>

#if ALLOY_HAS_CUDA_RUNTIME
struct __nv_bfloat16;  // <cuda_bf16.h>
#endif

namespace alloy {

struct alignas(2) bf16 {
  std::uint16_t storage;

  bf16() = default;

  // Round to nearest, ties to even; overflow gives infinity, NaN the canonical NaN 0x7fff.
  ALLOY_HOST_DEVICE explicit bf16(float x) noexcept {
#if ALLOY_DEVICE_CODE
    storage = __bfloat16_as_ushort(__float2bfloat16_rn(x));
#else
    storage = detail::float_to_bf16_bits(x);
#endif
  }

  // Exact: every bfloat16 value is a float.
  ALLOY_HOST_DEVICE explicit operator float() const noexcept {
#if ALLOY_DEVICE_CODE
    return __bfloat162float(__ushort_as_bfloat16(storage));
#else
    return detail::bf16_bits_to_float(storage);
#endif
  }

  ALLOY_HOST_DEVICE static constexpr bf16 from_bits(std::uint16_t bits) noexcept {
    bf16 h{};
    h.storage = bits;
    return h;
  }
  ALLOY_HOST_DEVICE constexpr std::uint16_t bits() const noexcept { return storage; }

#if ALLOY_HAS_CUDA_RUNTIME
  // The same bits as CUDA's __nv_bfloat16, both ways.
  template <std::same_as<__nv_bfloat16> H>
  ALLOY_HOST_DEVICE bf16(H h) noexcept : storage(detail::bit_cast<std::uint16_t>(h)) {}
  template <std::same_as<__nv_bfloat16> H>
  ALLOY_HOST_DEVICE explicit operator H() const noexcept {
    return detail::bit_cast<H>(storage);
  }
#endif
};

static_assert(sizeof(bf16) == 2 && alignof(bf16) == 2);

}  // namespace alloy
