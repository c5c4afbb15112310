// Pass 1 of the optimizer step: one read of the gradient arena for the sum of squares of the
// unscaled gradients. A non-finite gradient makes the sum non-finite (every term is >= 0, so
// nothing cancels), which is how the step learns it must be skipped.
// Bytes per element: read the gradient (2 for bf16/fp16, 4 for an fp32 accumulator).
#pragma once

#include <alloy/backend/algorithms.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/rounding.hpp>

namespace alloy::detail {

template <class G>
struct UnscaledSquare {
  float inv_scale;
  ALLOY_HOST_DEVICE float operator()(const G& g) const {
    const float x = fp::mul(to_float(g), inv_scale);
    return fp::mul(x, x);
  }
};

}  // namespace alloy::detail
