// alloy::bf16: bfloat16 (8-bit exponent, 7-bit mantissa), the bits of CUDA's __nv_bfloat16.
#pragma once

#include <alloy/numeric/detail/bits.hpp>

// The toolkit's header compiles under host compilers too: the conversions to and from
// __nv_bfloat16 below exist in g++ and nvcc translation units alike, so the class is the same in both.
#if ALLOY_HAS_CUDA_RUNTIME
#include <cuda_bf16.h>
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
  ALLOY_HOST_DEVICE bf16(__nv_bfloat16 h) noexcept : storage(__bfloat16_as_ushort(h)) {}
  ALLOY_HOST_DEVICE explicit operator __nv_bfloat16() const noexcept { return __ushort_as_bfloat16(storage); }
#endif
};

static_assert(sizeof(bf16) == 2 && alignof(bf16) == 2);

}  // namespace alloy
