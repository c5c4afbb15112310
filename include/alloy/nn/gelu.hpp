// GELU, tanh approximation (PyTorch's approximate='tanh'), element-wise.
//
// Run on its own it is one pass forward and one backward. After a Linear in a Sequential the
// Linear's product computes it in its epilogue instead (fused_mlp.hpp), keeping GELU's input,
// the pre-activation, which is all GELU's backward needs; the Gelu layer then only holds that
// pointer, and when a Linear follows too, that Linear's input-gradient product applies GELU's
// gradient (the dGELU epilogue), so neither of GELU's own passes runs.
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
    backward_in_next_product_ = false;
    auto y = detail::allocate(ctx, x.rows, x.cols);
    for_each_n(ctx.backend(), x.size(), detail::GeluForward<T>{}, in(x.data), out(y.data));
    return y;
  }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy) {
    using T = detail::value_t<Ctx>;
    if (backward_in_next_product_) {
      throw error(
          "Gelu: its forward was fused with the Linears around it, so the next Linear's product computes "
          "its backward; run the backward through the same Sequential");
    }
    auto dx = detail::allocate(ctx, dy.rows, dy.cols);
    for_each_n(ctx.backend(), dy.size(), detail::GeluBackward<T>{}, in(static_cast<const T*>(x_)), in(dy.data),
               out(dx.data));
    return dx;
  }

  // The fused paths: the previous Linear's product computed GELU and wrote its input here
  // (packed, as forward's input would be). backward_in_next_product: the next Linear's
  // input-gradient product applies GELU's gradient, so this layer's backward must not run.
  template <class T>
  void keep_pre_activation(const T* pre_activation, bool backward_in_next_product) noexcept {
    x_ = pre_activation;
    backward_in_next_product_ = backward_in_next_product;
  }
  template <class T>
  const T* pre_activation() const noexcept {
    return static_cast<const T*>(x_);
  }
  bool backward_in_next_product() const noexcept { return backward_in_next_product_; }

 private:
  const void* x_ = nullptr;  // GELU's input, kept for backward
  bool backward_in_next_product_ = false;
};

}  // namespace alloy::nn
