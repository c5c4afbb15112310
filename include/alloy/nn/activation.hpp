// The layers' currency is alloy::Activation<T> (memory/activation.hpp). Helpers shared by the layers: the backend
// dispatch of matrix products, adds and gradient writes.
#pragma once

#include <alloy/backend/algorithms.hpp>
#include <alloy/kernels/gemm.hpp>
#include <alloy/memory/activation.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/rounding.hpp>

#include <string>
#include <type_traits>

namespace alloy::nn {

using alloy::Activation;

namespace detail {

template <class Ctx>
using value_t = typename Ctx::param_type;

template <class Ctx>
Activation<value_t<Ctx>> allocate(Ctx& ctx, std::size_t rows, std::size_t cols) {
  return {ctx.template allocate<value_t<Ctx>>(rows * cols), rows, cols};
}

// The compute dtype for matrix products: tf32 math for float storage under Precision<tf32>.
template <class Ctx>
using gemm_compute_t = typename Ctx::compute_type;

template <class Ctx>
void gemm(Ctx& ctx, const GemmArgs<gemm_compute_t<Ctx>>& args) {
  using B = typename Ctx::backend_type;
  if constexpr (std::is_same_v<B, Host>) {
    (void)ctx;
    alloy::gemm(Host{}, args);
  } else {
#if ALLOY_HAS_CUDA_RUNTIME
    alloy::gemm(ctx.backend(), ctx.resources().gemm(), args);
#endif
  }
}

// c = a + b (in float, rounded once).
template <class T>
struct AddElements {
  ALLOY_HOST_DEVICE void operator()(const T& a, const T& b, T& c) const {
    c = round_nearest<T>(fp::add(to_float(a), to_float(b)));
  }
};

// g = v, or g += v when accumulating: how every layer writes a parameter gradient it computed
// into a temporary.
template <class T>
struct StoreGradient {
  bool add;
  ALLOY_HOST_DEVICE void operator()(const T& v, T& g) const {
    g = add ? round_nearest<T>(fp::add(to_float(g), to_float(v))) : v;
  }
};

inline void check_width(const char* layer, const std::string& name, std::size_t expected, std::size_t got) {
  if (expected != got) {
    throw error(std::string(layer) + " '" + name + "': input has " + std::to_string(got) + " features, expected " +
                std::to_string(expected));
  }
}

}  // namespace detail
}  // namespace alloy::nn
