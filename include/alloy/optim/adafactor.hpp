// Adafactor (Shazeer & Stern 2018), as torch.optim.Adafactor computes it:
//   beta2_t = 1 - t^beta2_decay;  rho_t = min(lr, 1/sqrt(t));  alpha_t = max(eps2, RMS(p)) * rho_t
//   p *= 1 - lr * weight_decay
//   matrices (the last two dims; leading dims are a batch): row_var, col_var <- lerp toward the
//     row and column means of g^2; var = row_var col_var / max(mean(row_var), eps1)
//   vectors: var <- lerp(var, g^2, 1 - beta2_t)
//   U = g / sqrt(max(var, eps1^2));  p -= alpha_t / max(1, RMS(U) / d) * U
// State: row and column statistics for matrices (m + n values instead of m n), a full second
// moment for vectors, all fp32. Each tensor needs its own RMS(p) and RMS(U), so the step runs a
// few passes per tensor rather than one fused pass over the arena; the scalars stay on the
// device (no host round trip per tensor).
#pragma once

#include <alloy/backend/algorithms.hpp>
#include <alloy/kernels/fused_update.hpp>
#include <alloy/kernels/grad_stats.hpp>
#include <alloy/memory/layout.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/optim/state.hpp>

#include <cmath>
#include <vector>

namespace alloy {

template <class S = State<float>>
struct Adafactor {
  static_assert(std::is_same_v<S, State<float>>,
                "Adafactor<S>: its factored statistics are small and kept in fp32; use State<fp32>");
  using state = S;
  static constexpr const char* name = "Adafactor";
  static constexpr int slots = 1;  // one compact arena of statistics
  struct Config {
    float lr = 1e-2f;
    float beta2_decay = -0.8f;
    float eps1 = 1.1920929e-07f;  // PyTorch's default: the dtype's epsilon
    float eps2 = 1e-3f;
    float d = 1.0f;  // clipping threshold of RMS(U)
    float weight_decay = 0.0f;
  };
};

template <class T>
inline constexpr bool is_adafactor_v = false;
template <class S>
inline constexpr bool is_adafactor_v<Adafactor<S>> = true;

// Where each tensor's statistics live in the compact state arena.
struct AdafactorPlacement {
  std::size_t offset = 0;  // first statistic
  std::size_t batch = 1, rows = 1, cols = 1;
  bool factored = false;  // rank >= 2: rows then columns; else one value per element
};

inline std::vector<AdafactorPlacement> adafactor_layout(const ParamRegistry& registry, std::size_t* total) {
  std::vector<AdafactorPlacement> out;
  std::size_t offset = 0;
  for (const auto& spec : registry.specs()) {
    AdafactorPlacement a;
    a.offset = offset;
    const auto& s = spec.shape;
    if (s.size() >= 2) {
      a.factored = true;
      a.rows = static_cast<std::size_t>(s[s.size() - 2]);
      a.cols = static_cast<std::size_t>(s[s.size() - 1]);
      for (std::size_t d = 0; d + 2 < s.size(); ++d) a.batch *= static_cast<std::size_t>(s[d]);
      offset += a.batch * (a.rows + a.cols);
    } else {
      a.cols = static_cast<std::size_t>(spec.numel());
      offset += a.cols;
    }
    offset = (offset + 3) / 4 * 4;  // keep every tensor's statistics 16-byte aligned
    out.push_back(a);
  }
  *total = offset;
  return out;
}

namespace detail {

// Scalars per tensor, in device (or host) memory: sum of p^2, sum of U^2, mean of row_var.
inline constexpr int adafactor_scalars = 3;

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float lerp(float a, float b, float w) {
  return fp::add(a, fp::mul(w, fp::sub(b, a)));
}

// Row statistics of one batch entry of a matrix: row_var[i] <- lerp(row_var[i], mean_j g_ij^2, w).
template <class Grad>
struct AdafactorRows {
  const Grad* g;
  float* row_var;
  std::size_t cols;
  float grad_mult, w;
  ALLOY_HOST_DEVICE void operator()(std::size_t i) const {
    float sum = 0.0f;
    for (std::size_t j = 0; j < cols; ++j) {
      const float x = fp::mul(to_float(g[i * cols + j]), grad_mult);
      sum = fp::add(sum, fp::mul(x, x));
    }
    row_var[i] = lerp(row_var[i], fp::div(sum, static_cast<float>(cols)), w);
  }
};

template <class Grad>
struct AdafactorCols {
  const Grad* g;
  float* col_var;
  std::size_t rows, cols;
  float grad_mult, w;
  ALLOY_HOST_DEVICE void operator()(std::size_t j) const {
    float sum = 0.0f;
    for (std::size_t i = 0; i < rows; ++i) {
      const float x = fp::mul(to_float(g[i * cols + j]), grad_mult);
      sum = fp::add(sum, fp::mul(x, x));
    }
    col_var[j] = lerp(col_var[j], fp::div(sum, static_cast<float>(rows)), w);
  }
};

// U for one batch entry of a matrix, into `u`.
template <class Grad>
struct AdafactorMatrixUpdate {
  const Grad* g;
  const float* row_var;
  const float* col_var;
  const float* row_sum;  // sum of row_var, a device scalar on Cuda
  float* u;
  std::size_t rows, cols;
  float grad_mult, eps1;
  ALLOY_HOST_DEVICE void operator()(std::size_t k) const {
    const std::size_t i = k / cols, j = k % cols;
    const float row_mean = fp::div(*row_sum, static_cast<float>(rows));
    const float mean = row_mean > eps1 ? row_mean : eps1;
    float var = fp::div(fp::mul(row_var[i], col_var[j]), mean);
    const float floor = fp::mul(eps1, eps1);
    var = var > floor ? var : floor;
    u[k] = fp::div(fp::mul(to_float(g[k]), grad_mult), fp::sqrt(var));
  }
};

// Vectors: var <- lerp(var, g^2, w); U = g / sqrt(max(var, eps1^2)).
template <class Grad>
struct AdafactorVectorUpdate {
  const Grad* g;
  float* var;
  float* u;
  float grad_mult, w, eps1;
  ALLOY_HOST_DEVICE void operator()(std::size_t k) const {
    const float x = fp::mul(to_float(g[k]), grad_mult);
    const float v = lerp(var[k], fp::mul(x, x), w);
    var[k] = v;
    const float floor = fp::mul(eps1, eps1);
    u[k] = fp::div(x, fp::sqrt(v > floor ? v : floor));
  }
};

// p <- p (1 - lr wd) - alpha / max(1, RMS(U) / d) U, with alpha from RMS of the old p.
template <class Param>
struct AdafactorApply {
  float* master;  // null without a master copy
  Param* params;
  const float* u;
  const float* scalars;  // sum p^2, sum U^2
  float numel, rho, eps2, d, decay_factor;
  std::uint64_t seed, stream, first;  // random stream of stochastic rounding
  bool stochastic;
  ALLOY_HOST_DEVICE void operator()(std::size_t k) const {
    const float rms_p = fp::sqrt(fp::div(scalars[0], numel));
    const float alpha = fp::mul(rms_p > eps2 ? rms_p : eps2, rho);
    const float rms_u = fp::div(fp::sqrt(fp::div(scalars[1], numel)), d);
    const float step = fp::div(alpha, rms_u > 1.0f ? rms_u : 1.0f);
    float p = master ? master[k] : to_float(params[k]);
    p = fp::sub(fp::mul(p, decay_factor), fp::mul(step, u[k]));
    if (master) master[k] = p;
    params[k] = round_to<Param>(p, stochastic, update_bits(seed, stream, first + k, 0));
  }
};

// dst[0] = reduce over n elements of transform(src[i]): device scalar on Cuda, plain on Host.
template <class B, class T, class Transform>
void reduce_into(B be, float* dst, const T* src, std::size_t n, Transform transform, void* workspace,
                 std::size_t workspace_bytes) {
  if constexpr (std::is_same_v<B, Host>) {
    (void)workspace;
    (void)workspace_bytes;
    *dst = transform_reduce(be, n, 0.0f, Sum{}, transform, in(src));
  } else {
#if ALLOY_HAS_CUDA_KERNELS
    transform_reduce_async(be, workspace, workspace_bytes, dst, n, 0.0f, Sum{}, transform, in(src));
#endif
  }
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

}  // namespace detail
}  // namespace alloy
