// Adafactor's per-element math (optim/adafactor.hpp gives the algorithm): pure ALLOY_HOST_DEVICE
// functors spelled with alloy::fp, one per pass of kernels/adafactor_update.hpp, which launches
// them over each tensor. Unlike the other rules, each needs a whole tensor's statistics, so they
// read and write arrays rather than one element's state.
#pragma once

#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/rounding.hpp>
#include <alloy/optim/random_stream.hpp>

#include <cstddef>
#include <cstdint>

namespace alloy::detail {

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

}  // namespace alloy::detail
