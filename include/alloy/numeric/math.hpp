// exp, exp2, log and tanh for code compiled for both host and device: CUDA's expf, exp2f, logf and
// tanhf on the device, the host's std::exp, std::exp2, std::log and std::tanh on the host. Unlike alloy::fp, these
// do not give the same bits on both sides (each library is within 2 ulp of the true value), so a
// caller states the bound its results carry, as kernels/activations.hpp does.
#pragma once

#include <alloy/config.hpp>

#include <cmath>

namespace alloy::detail {

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float exp_of(float x) {
#if ALLOY_DEVICE_CODE
  return expf(x);
#else
  return std::exp(x);
#endif
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float exp2_of(float x) {
#if ALLOY_DEVICE_CODE
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float log_of(float x) {
#if ALLOY_DEVICE_CODE
  return logf(x);
#else
  return std::log(x);
#endif
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float tanh_of(float x) {
#if ALLOY_DEVICE_CODE
  return tanhf(x);
#else
  return std::tanh(x);
#endif
}

}  // namespace alloy::detail
