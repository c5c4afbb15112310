// GELU, tanh approximation (PyTorch's approximate='tanh'), element-wise.
#pragma once

#include <alloy/kernels/activations.hpp>
#include <alloy/memory/registry.hpp>
#include <alloy/nn/activation.hpp>

namespace alloy::nn {

namespace detail {
template <class T>
struct GeluForward {
  ALLOY_HOST_DEVICE void operator()(const T& x, T& y) const { y = round_nearest<T>(gelu_tanh(to_float(x))); }
};
template <class T>
struct GeluBackward {
  ALLOY_HOST_DEVICE void operator()(const T& x, const T& dy, T& dx) const {
    dx = round_nearest<T>(gelu_tanh_backward(to_float(x), to_float(dy)));
  }
};
}  // namespace detail

class Gelu {
 public:
  void declare(ParamRegistry&) {}
  std::size_t out_features(std::size_t in) const noexcept { return in; }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> forward(Ctx& ctx, Activation<const detail::value_t<Ctx>> x) {
    using T = detail::value_t<Ctx>;
    x_ = x.data;
    auto y = detail::allocate(ctx, x.rows, x.cols);
    for_each_n(ctx.backend(), x.size(), detail::GeluForward<T>{}, in(x.data), out(y.data));
    return y;
  }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy) {
    using T = detail::value_t<Ctx>;
    auto dx = detail::allocate(ctx, dy.rows, dy.cols);
    for_each_n(ctx.backend(), dy.size(), detail::GeluBackward<T>{}, in(static_cast<const T*>(x_)), in(dy.data),
               out(dx.data));
    return dx;
  }

 private:
  const void* x_ = nullptr;
};

}  // namespace alloy::nn
