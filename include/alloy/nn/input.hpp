// Moving a micro-batch from host memory into the workspace: features converted to the compute
// dtype, class targets checked against the class count first (a bad label is bad input, not
// a NaN loss).
#pragma once

#include <alloy/error.hpp>
#include <alloy/nn/activation.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace alloy::nn {

namespace detail {
template <class T>
struct FromFloat {
  ALLOY_HOST_DEVICE void operator()(const float& x, T& y) const { y = round_nearest<T>(x); }
};

template <class Ctx, class T>
T* upload_raw(Ctx& ctx, const std::vector<T>& v) {
  T* p = ctx.template allocate<T>(v.size());
  if constexpr (std::is_same_v<typename Ctx::backend_type, Host>) {
    std::copy(v.begin(), v.end(), p);
  } else {
#if ALLOY_HAS_CUDA_RUNTIME
    ALLOY_CUDA_CHECK(cudaMemcpyAsync(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice, ctx.backend().stream));
#endif
  }
  return p;
}
}  // namespace detail

// rows x cols floats (row-major) as a compute-dtype activation.
template <class Ctx>
Activation<detail::value_t<Ctx>> upload_features(Ctx& ctx, const std::vector<float>& x, std::size_t cols) {
  using T = detail::value_t<Ctx>;
  if (cols == 0 || x.size() % cols != 0) {
    throw error("upload_features: " + std::to_string(x.size()) + " values do not make rows of " + std::to_string(cols) +
                " features");
  }
  const float* staged = detail::upload_raw(ctx, x);
  auto a = detail::allocate(ctx, x.size() / cols, cols);
  for_each_n(ctx.backend(), x.size(), detail::FromFloat<T>{}, in(staged), out(a.data));
  return a;
}

// Class indices, each checked to lie in [0, classes).
template <class Ctx>
const std::int32_t* upload_targets(Ctx& ctx, const std::vector<std::int32_t>& targets, std::size_t classes) {
  for (std::size_t i = 0; i < targets.size(); ++i) {
    if (targets[i] < 0 || static_cast<std::size_t>(targets[i]) >= classes) {
      throw error("upload_targets: target " + std::to_string(targets[i]) + " at row " + std::to_string(i) +
                  " is outside [0, " + std::to_string(classes) + ")");
    }
  }
  return detail::upload_raw(ctx, targets);
}

}  // namespace alloy::nn
