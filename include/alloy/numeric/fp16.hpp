// alloy::fp16: IEEE binary16, a 2-byte value type with the bits of CUDA's __half.
#pragma once

#include <alloy/numeric/detail/bits.hpp>

// The toolkit's header compiles under host compilers too: the conversions to and from
// __half below exist in g++ and nvcc translation units alike, so the class is the same in both.
#if ALLOY_HAS_CUDA_RUNTIME
#include <cuda_fp16.h>
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
  ALLOY_HOST_DEVICE fp16(__half h) noexcept : storage(__half_as_ushort(h)) {}
  ALLOY_HOST_DEVICE explicit operator __half() const noexcept { return __ushort_as_half(storage); }
#endif
};

static_assert(sizeof(fp16) == 2 && alignof(fp16) == 2);

}  // namespace alloy
