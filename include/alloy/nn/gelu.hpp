// GELU, tanh approximation (PyTorch's approximate='tanh'), element-wise.
//
// Run on its own it is one pass forward and one backward. After a Linear in a Sequential the
// Linear's product computes it in its epilogue instead (fused_mlp.hpp), keeping GELU's input,
// the pre-activation, which is all GELU's backward needs; the Gelu layer then only holds that
// pointer, and when a Linear follows too, that Linear's input-gradient product applies GELU's
// gradient (the dGELU epilogue), so neither of GELU's own passes runs.
//
// In that Linear -> Gelu -> Linear block, the next Linear's weight gradient needs GELU's output h
// (rows x hidden). By default backward recomputes it from the pre-activation (one element-wise
// pass, llm.c's trade: memory at the step's peak for a pass). GeluOptions::keep_output keeps the
// h the epilogue wrote instead, from forward to backward: rows x hidden more activation memory per
// block, one pass fewer each way the block's backward runs (GPT-2 124M at 16 x 1024, bf16: 96 MiB
// and about 65 us per block on the H200; docs/benchmarks.md).
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

struct GeluOptions {
  // Inside a fused Linear -> Gelu -> Linear block: keep GELU's output for backward rather than
  // recompute it (above). Without a Linear on both sides there is nothing to keep: GELU's own
  // backward reads only its input.
  bool keep_output = false;
};

class Gelu {
 public:
  Gelu() = default;
  explicit Gelu(GeluOptions options) noexcept : options_(options) {}

  const GeluOptions& options() const noexcept { return options_; }

  void declare(ParamRegistry&) {}
  std::size_t out_features(std::size_t in) const noexcept { return in; }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> forward(Ctx& ctx, Activation<const detail::value_t<Ctx>> x) {
    using T = detail::value_t<Ctx>;
    x_ = x.data;
    output_ = nullptr;
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
  // output: GELU's output when the block kept it (options().keep_output), else null.
  template <class T>
  void keep_pre_activation(const T* pre_activation, bool backward_in_next_product, const T* output = nullptr) noexcept {
    x_ = pre_activation;
    output_ = output;
    backward_in_next_product_ = backward_in_next_product;
  }
  template <class T>
  const T* pre_activation() const noexcept {
    return static_cast<const T*>(x_);
  }
  template <class T>
  const T* kept_output() const noexcept {
    return static_cast<const T*>(output_);
  }
  bool backward_in_next_product() const noexcept { return backward_in_next_product_; }

 private:
  GeluOptions options_{};
  const void* x_ = nullptr;       // GELU's input, kept for backward
  const void* output_ = nullptr;  // its output, when a fused block kept it
  bool backward_in_next_product_ = false;
};

}  // namespace alloy::nn
