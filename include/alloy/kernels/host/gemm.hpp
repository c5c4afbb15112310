// The Host reference of the matrix product (kernels/gemm_args.hpp gives the semantics): a
// blocked loop in fp32 that models every dtype's rounding, against which the Cuda path is tested.
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/kernels/activations.hpp>
#include <alloy/kernels/gemm_args.hpp>
#include <alloy/numeric/rounding.hpp>

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <vector>

namespace alloy {

namespace detail {

// An element of A or B as the product's multiplier sees it.
template <class Compute>
inline float gemm_input(storage_t<Compute> x) {
  if constexpr (std::is_same_v<Compute, tf32>) {
    return round_to_tf32(x);
  } else {
    return to_float(x);
  }
}

// Host tile sizes: a k-block of op(B) rows (128 x 512 floats, 256 KiB) stays in cache while
// every row of C takes its share.
inline constexpr std::size_t host_gemm_k_block = 128;
inline constexpr std::size_t host_gemm_n_block = 512;

}  // namespace detail

// The reference: op(A) and op(B) are widened to float (rounded to tf32 first for tf32), each
// C[i, j] is sum over k of the products in k order, in fp32, then the epilogue, then one rounding
// to the output dtype.
template <class Compute>
void gemm(Host, const GemmArgs<Compute>& g) {
  using T = storage_t<Compute>;
  detail::check_gemm_args(g);
  const std::size_t m = g.m, n = g.n, k = g.k;
  const bool ta = g.transa == Transpose::yes;
  const bool tb = g.transb == Transpose::yes;
  auto a_at = [&](std::size_t i, std::size_t p) -> const T& { return ta ? g.a[p * g.lda + i] : g.a[i * g.lda + p]; };
  auto b_at = [&](std::size_t p, std::size_t j) -> const T& { return tb ? g.b[j * g.ldb + p] : g.b[p * g.ldb + j]; };

  std::vector<float> a(m * k), b(k * n);
  for (std::size_t i = 0; i < m; ++i) {
    for (std::size_t p = 0; p < k; ++p) a[i * k + p] = detail::gemm_input<Compute>(a_at(i, p));
  }
  for (std::size_t p = 0; p < k; ++p) {
    for (std::size_t j = 0; j < n; ++j) b[p * n + j] = detail::gemm_input<Compute>(b_at(p, j));
  }

  std::vector<float> sum(m * n, 0.0f);
  for (std::size_t p0 = 0; p0 < k; p0 += detail::host_gemm_k_block) {
    const std::size_t p1 = std::min(k, p0 + detail::host_gemm_k_block);
    for (std::size_t j0 = 0; j0 < n; j0 += detail::host_gemm_n_block) {
      const std::size_t j1 = std::min(n, j0 + detail::host_gemm_n_block);
      for (std::size_t i = 0; i < m; ++i) {
        float* row = sum.data() + i * n;
        for (std::size_t p = p0; p < p1; ++p) {
          const float a_ip = a[i * k + p];
          const float* b_row = b.data() + p * n;
          for (std::size_t j = j0; j < j1; ++j) row[j] += a_ip * b_row[j];
        }
      }
    }
  }

  // C_in is read element by element just before C's element is written, so c_in == c (in place)
  // reads every element before it changes.
  const T* c_in = g.c_in != nullptr ? g.c_in : g.c;
  const bool gelu_gradient = detail::applies_gelu_gradient(g.epilogue);
  // The dGELU bias gradient: column sums of the fp32 values, rows in order.
  std::vector<float> column_sums(g.epilogue == Epilogue::dgelu_tanh_bias_grad ? n : 0, 0.0f);
  for (std::size_t i = 0; i < m; ++i) {
    for (std::size_t j = 0; j < n; ++j) {
      float v = g.alpha * sum[i * n + j];
      if (g.beta != 0.0f) v += g.beta * to_float(c_in[i * g.ldc + j]);
      if (detail::adds_bias(g.epilogue)) v += to_float(g.bias[j]);
      if (detail::applies_gelu(g.epilogue)) {
        if (g.pre_activation) g.pre_activation[i * g.ld_pre_activation + j] = round_nearest<T>(v);
        v = gelu_tanh(v);
      }
      if (gelu_gradient) v = gelu_tanh_backward(to_float(g.pre_activation[i * g.ld_pre_activation + j]), v);
      if (!column_sums.empty()) column_sums[j] += v;
      g.c[i * g.ldc + j] = round_nearest<T>(v);
    }
  }
  for (std::size_t j = 0; j < column_sums.size(); ++j) g.bias_grad[j] = round_nearest<T>(column_sums[j]);

  if (g.epilogue == Epilogue::bias_grad) {
    for (std::size_t i = 0; i < m; ++i) {
      float s = 0.0f;
      for (std::size_t p = 0; p < k; ++p) s += to_float(a_at(i, p));
      g.bias_grad[i] = round_nearest<T>(s);
    }
  }
}

}  // namespace alloy
