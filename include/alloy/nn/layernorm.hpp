// LayerNorm over the features of each row, with learnable scale (ones) and shift (zeros),
// neither weight-decayed; statistics in fp32.
#pragma once

#include <alloy/error.hpp>
#include <alloy/kernels/layernorm.hpp>
#include <alloy/memory/registry.hpp>
#include <alloy/nn/activation.hpp>

#include <string>
#include <type_traits>

namespace alloy::nn {

class LayerNorm {
 public:
  LayerNorm(std::string name, std::size_t features, float eps = 1e-5f)
      : name_(std::move(name)), features_(features), eps_(eps) {}

  void declare(ParamRegistry& r) {
    gamma_ = r.declare(name_ + ".weight", {std::int64_t(features_)}, Init::ones(), {.weight_decay = false});
    beta_ = r.declare(name_ + ".bias", {std::int64_t(features_)}, Init::zeros(), {.weight_decay = false});
  }
  std::size_t out_features(std::size_t) const noexcept { return features_; }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> forward(Ctx& ctx, Activation<const detail::value_t<Ctx>> x) {
    detail::check_width("LayerNorm", name_, features_, x.cols);
    x_ = x.data;
    rows_ = x.rows;
    // The output first: a block that starts with this LayerNorm then begins with it, and its
    // backward can leave dx there (the next layer's backward_over_input, Sequential), where the
    // trainer wants it, instead of copying it down.
    auto y = detail::allocate(ctx, x.rows, x.cols);
    mean_ = ctx.template allocate<float>(x.rows);
    rstd_ = ctx.template allocate<float>(x.rows);
    layernorm_forward(ctx.backend(), x.data, ctx.param(gamma_).data, ctx.param(beta_).data, y.data, mean_, rstd_,
                      x.rows, x.cols, eps_);
    return y;
  }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy) {
    return backward_adding(ctx, dy, {});
  }

  // backward, returning dx + add (added in fp32 and rounded once, in the same pass): a Residual
  // whose block starts with this LayerNorm passes its dy here instead of adding it in a pass of
  // its own. add.data == nullptr adds nothing. add_sums (features elements of the gradient arena,
  // may be null; needs add) receives add's column sums, written or added as this layer's own
  // gradients are: the bias gradient of the block's last projection, whose dy add is (Sequential).
  template <class Ctx, class G = typename Ctx::grad_type>
  Activation<detail::value_t<Ctx>> backward_adding(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy,
                                                   Activation<const detail::value_t<Ctx>> add, G* add_sums = nullptr) {
    check_add(dy, add);
    return backward_into(ctx, dy, add, detail::allocate(ctx, dy.rows, dy.cols), add_sums);
  }

  // backward_adding with dx written over dy, which the caller no longer needs (the gradient a
  // Sequential's next layer handed back): no rows x cols buffer of its own.
  template <class Ctx, class G = typename Ctx::grad_type>
  Activation<detail::value_t<Ctx>> backward_adding_in_place(Ctx& ctx, Activation<detail::value_t<Ctx>> dy,
                                                            Activation<const detail::value_t<Ctx>> add,
                                                            G* add_sums = nullptr) {
    check_add(Activation<const detail::value_t<Ctx>>(dy), add);
    return backward_into(ctx, Activation<const detail::value_t<Ctx>>(dy), add, dy, add_sums);
  }

 private:
  template <class T>
  void check_add(Activation<const T> dy, Activation<const T> add) const {
    if (add.data != nullptr && (add.rows != dy.rows || add.cols != dy.cols)) {
      throw error("LayerNorm " + name_ + ": the gradient to add is " + std::to_string(add.rows) + " x " +
                  std::to_string(add.cols) + ", dy is " + std::to_string(dy.rows) + " x " + std::to_string(dy.cols));
    }
  }

  // The kernel reads each row of dy (and of add) before it writes that row of dx, so dx may be dy.
  template <class Ctx, class G, class T = detail::value_t<Ctx>>
  Activation<T> backward_into(Ctx& ctx, Activation<const std::type_identity_t<T>> dy,
                              Activation<const std::type_identity_t<T>> add, Activation<std::type_identity_t<T>> dx,
                              G* add_sums) {
    if (add_sums != nullptr && add.data == nullptr) {
      throw error("LayerNorm " + name_ + ": the column sums of the gradient to add were asked for without one");
    }
    float* scratch = ctx.template allocate<float>(layernorm_backward_scratch_floats(dy.rows, dy.cols) + 1);
    layernorm_backward(ctx.backend(), dy.data, static_cast<const T*>(x_), ctx.param(gamma_).data,
                       static_cast<const float*>(mean_), static_cast<const float*>(rstd_), dx.data,
                       ctx.grad(gamma_).data, ctx.grad(beta_).data, dy.rows, dy.cols, ctx.accumulate_grads(), scratch,
                       add.data, add_sums);
    return dx;
  }

  std::string name_;
  std::size_t features_;
  float eps_;
  ParamHandle gamma_, beta_;
  const void* x_ = nullptr;
  std::size_t rows_ = 0;
  float* mean_ = nullptr;
  float* rstd_ = nullptr;
};

}  // namespace alloy::nn
