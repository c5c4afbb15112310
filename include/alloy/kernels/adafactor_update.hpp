// Adafactor's step over a store's arenas (optim/adafactor.hpp gives the algorithm): per tensor,
// the sum of p^2 and the statistics' update, then U and the sum of U^2, then the parameter write,
// each a launch of a functor from optim/rules/adafactor.hpp. The per-tensor scalars stay in the
// backend's memory, so on Cuda there is no host round trip per tensor.
#pragma once

#include <alloy/backend/algorithms.hpp>
#include <alloy/kernels/grad_stats.hpp>
#include <alloy/memory/adafactor_layout.hpp>
#include <alloy/memory/layout.hpp>
#include <alloy/memory/registry.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/optim/adafactor.hpp>
#include <alloy/optim/rules/adafactor.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace alloy::detail {

// Scalars per tensor, in device (or host) memory: sum of p^2, sum of U^2, sum of row_var.
inline constexpr int adafactor_scalars = 3;

// dst[0] = sum over n elements of transform(src[i]), written in the backend's memory.
template <class B, class T, class Transform>
void reduce_into(B be, float* dst, const T* src, std::size_t n, Transform transform, void* workspace,
                 std::size_t workspace_bytes) {
  transform_reduce_async(be, workspace, workspace_bytes, dst, n, 0.0f, Sum{}, transform, in(src));
}

// One Adafactor step over every tensor of a store. `u` holds the largest tensor's update,
// `scalars` adafactor_scalars floats per tensor; both in the backend's memory.
template <class B, class Param, class Grad>
void adafactor_update(B be, const ParamRegistry& registry, const ArenaLayout& layout,
                      const std::vector<AdafactorPlacement>& stats, Param* params, float* master, const Grad* grads,
                      float* state, float* u, float* scalars, void* workspace, std::size_t workspace_bytes,
                      const typename Adafactor<>::Config& c, float lr, float grad_mult, std::uint64_t t,
                      std::uint64_t seed, bool stochastic) {
  const float w = static_cast<float>(std::pow(static_cast<double>(t), static_cast<double>(c.beta2_decay)));
  const double inv_sqrt_t = 1.0 / std::sqrt(static_cast<double>(t));
  for (std::size_t k = 0; k < layout.tensors(); ++k) {
    const auto& spec = registry.specs()[k];
    const std::size_t off = layout[k].offset, n = layout[k].numel;
    const AdafactorPlacement& s = stats[k];
    float* sc = scalars + adafactor_scalars * k;
    const Grad* g = grads + off;
    if (master) {
      reduce_into(be, sc, master + off, n, UnscaledSquare<float>{1.0f}, workspace, workspace_bytes);
    } else {
      reduce_into(be, sc, params + off, n, UnscaledSquare<Param>{1.0f}, workspace, workspace_bytes);
    }
    if (s.factored) {
      const std::size_t m = s.rows, cols = s.cols, mn = m * cols;
      for (std::size_t b = 0; b < s.batch; ++b) {
        float* row_var = state + s.offset + b * m;
        float* col_var = state + s.offset + s.batch * m + b * cols;
        for_each_n(be, m, AdafactorRows<Grad>{g + b * mn, row_var, cols, grad_mult, w});
        for_each_n(be, cols, AdafactorCols<Grad>{g + b * mn, col_var, m, cols, grad_mult, w});
        reduce_into(be, sc + 2, static_cast<const float*>(row_var), m, ToAccumulator{}, workspace, workspace_bytes);
        for_each_n(
            be, mn,
            AdafactorMatrixUpdate<Grad>{g + b * mn, row_var, col_var, sc + 2, u + b * mn, m, cols, grad_mult, c.eps1});
      }
    } else {
      for_each_n(be, n, AdafactorVectorUpdate<Grad>{g, state + s.offset, u, grad_mult, w, c.eps1});
    }
    reduce_into(be, sc + 1, static_cast<const float*>(u), n, UnscaledSquare<float>{1.0f}, workspace, workspace_bytes);
    const float lr_k = lr * spec.options.lr_scale;
    const float decay = spec.options.weight_decay ? c.weight_decay : 0.0f;
    const float rho = static_cast<float>(std::min(static_cast<double>(lr_k), inv_sqrt_t));
    for_each_n(be, n,
               AdafactorApply<Param>{master ? master + off : nullptr, params + off, u, sc, static_cast<float>(n), rho,
                                     c.eps2, c.d, fp::sub(1.0f, fp::mul(lr_k, decay)), seed, t * layout.padded_numel(),
                                     off, stochastic});
  }
}

}  // namespace alloy::detail
