// The optimizer step's decision, from pass 1's sum of squares of the unscaled gradients: a
// non-finite sum skips the step; otherwise the global norm gives the clip coefficient, and pass 2
// multiplies each gradient by clip / scale. Written once for both sides: the host computes it for
// StepStats, and on Cuda a one-thread kernel computes it where the sum is, so pass 2 is queued
// without waiting for the host (train/optimizer_step.hpp). Every operation is one correctly
// rounded double addition, division or square root (IEEE on both sides, nothing to contract), so
// the device's grad_mult has the host's bits.
#pragma once

#include <alloy/backend/backend.hpp>

#include <cmath>
#include <limits>

namespace alloy::detail {

// What pass 2 reads on the device in place of UpdateScalars::grad_mult; skip != 0 makes pass 2
// leave every arena as it was.
struct StepDecision {
  float grad_mult;
  int skip;
};

namespace decide {
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE bool finite(double x) {
#if ALLOY_DEVICE_CODE
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE double add(double a, double b) {
#if ALLOY_DEVICE_CODE
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE double div(double a, double b) {
#if ALLOY_DEVICE_CODE
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE double sqrt(double a) {
#if ALLOY_DEVICE_CODE
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
}  // namespace decide

// The global L2 norm from the sum of squares; +infinity when the sum is not finite (host only:
// the device needs the norm of a finite sum alone).
inline double grad_norm_of(double sum_sq) {
  return decide::finite(sum_sq) ? decide::sqrt(sum_sq) : std::numeric_limits<double>::infinity();
}

// min(1, max_grad_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_; 1 when clipping is
// off (max_grad_norm 0).
ALLOY_HOST_DEVICE inline double clip_coefficient_of(float max_grad_norm, double grad_norm) {
  if (!(max_grad_norm > 0.0f)) return 1.0;
  const double c = decide::div(static_cast<double>(max_grad_norm), decide::add(grad_norm, 1e-6));
  return c < 1.0 ? c : 1.0;  // std::min(1.0, c)
}

// The factor pass 2 applies to each stored gradient: unscale and clip in one multiply.
ALLOY_HOST_DEVICE inline float grad_mult_of(double clip_coefficient, float scale) {
  return static_cast<float>(decide::div(clip_coefficient, static_cast<double>(scale)));
}

ALLOY_HOST_DEVICE inline StepDecision decide_step(double sum_sq, float max_grad_norm, float scale) {
  if (!decide::finite(sum_sq)) return {0.0f, 1};
  return {grad_mult_of(clip_coefficient_of(max_grad_norm, decide::sqrt(sum_sq)), scale), 0};
}

#if ALLOY_HAS_CUDA_KERNELS

// One thread: reads the sum (4 bytes), writes the decision (8 bytes).
template <class Sum>
__global__ void decide_step_kernel(const Sum* sum_sq, float max_grad_norm, float scale, StepDecision* decision) {
  *decision = decide_step(static_cast<double>(*sum_sq), max_grad_norm, scale);
}

// *decision = decide_step(*sum_sq, ...), ordered on the stream; both pointers are device memory.
template <class Sum>
void decide_step_async(Cuda be, const Sum* sum_sq, float max_grad_norm, float scale, StepDecision* decision) {
  decide_step_kernel<<<1, 1, 0, be.stream>>>(sum_sq, max_grad_norm, scale, decision);
  ALLOY_CUDA_CHECK_LAUNCH();
}

#endif  // ALLOY_HAS_CUDA_KERNELS

}  // namespace alloy::detail
