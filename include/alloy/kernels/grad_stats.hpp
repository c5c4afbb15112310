// Pass 1 of the optimizer step: one read of the gradient arena for the sum of squares of the
// unscaled gradients. A non-finite gradient makes the sum non-finite (every term is >= 0, so
// nothing cancels), which is how the step learns it must be skipped.
// Bytes per element: read the gradient (2 for bf16/fp16, 4 for an fp32 accumulator).
#pragma once

#include <alloy/backend/algorithms.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/rounding.hpp>

namespace alloy {

namespace detail {

template <class G>
struct UnscaledSquare {
  float inv_scale;
  ALLOY_HOST_DEVICE float operator()(const G& g) const {
    const float x = fp::mul(to_float(g), inv_scale);
    return fp::mul(x, x);
  }
};

}  // namespace detail

// *result = sum over [0, n) of (grads[i] * inv_scale)^2, in fp32. On Cuda the call is ordered on
// be.stream, `result` is device memory and `workspace` holds reduce_workspace_bytes<float>(be)
// bytes; on Host the value is in *result on return and no workspace is needed.
template <class B, class G>
void grad_sum_of_squares_async(B be, const G* grads, std::size_t n, float inv_scale, void* workspace,
                               std::size_t workspace_bytes, float* result) {
  transform_reduce_async(be, workspace, workspace_bytes, result, n, 0.0f, Sum{}, detail::UnscaledSquare<G>{inv_scale},
                         in(grads));
}

}  // namespace alloy
