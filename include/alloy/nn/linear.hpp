// Linear: y = x W^T + b, W [out, in], with PyTorch's default initialization (uniform in
// +-1/sqrt(in)). cuBLASLt on Cuda (fp32 accumulation, bias in the epilogue, the bias gradient
// fused into the weight-gradient product), the blocked Host loop otherwise.
#pragma once

#include <alloy/memory/registry.hpp>
#include <alloy/nn/activation.hpp>

#include <cmath>

namespace alloy::nn {

class Linear {
 public:
  Linear(std::string name, std::size_t in, std::size_t out, bool bias = true)
      : name_(std::move(name)), in_(in), out_(out), has_bias_(bias) {}

  void declare(ParamRegistry& r) {
    const float bound = 1.0f / std::sqrt(static_cast<float>(in_));
    weight_ = r.declare(name_ + ".weight", {std::int64_t(out_), std::int64_t(in_)}, Init::uniform(-bound, bound));
    if (has_bias_) {
      bias_ = r.declare(name_ + ".bias", {std::int64_t(out_)}, Init::uniform(-bound, bound), {.weight_decay = false});
    }
  }

  std::size_t out_features(std::size_t) const noexcept { return out_; }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> forward(Ctx& ctx, Activation<const detail::value_t<Ctx>> x) {
    detail::check_width("Linear", name_, in_, x.cols);
    x_ = x;
    auto y = detail::allocate(ctx, x.rows, out_);
    detail::gemm(ctx, {.transa = Transpose::no,
                       .transb = Transpose::yes,
                       .m = x.rows,
                       .n = out_,
                       .k = in_,
                       .a = x.data,
                       .lda = in_,
                       .b = ctx.param(weight_).data,
                       .ldb = in_,
                       .c = y.data,
                       .ldc = out_,
                       .epilogue = has_bias_ ? Epilogue::bias : Epilogue::none,
                       .bias = has_bias_ ? ctx.param(bias_).data : nullptr});
    return y;
  }

  // dx = dy W; dW = dy^T x and db = column sums of dy, written or added to the gradients.
  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy) {
    using T = detail::value_t<Ctx>;
    auto dx = detail::allocate(ctx, dy.rows, in_);
    detail::gemm(ctx, {.transa = Transpose::no,
                       .transb = Transpose::no,
                       .m = dy.rows,
                       .n = in_,
                       .k = out_,
                       .a = dy.data,
                       .lda = out_,
                       .b = ctx.param(weight_).data,
                       .ldb = in_,
                       .c = dx.data,
                       .ldc = in_});
    const bool add = ctx.accumulate_grads();
    T* db = nullptr;
    if (has_bias_) db = add ? ctx.template allocate<T>(out_) : ctx.grad(bias_).data;
    detail::gemm(ctx, {.transa = Transpose::yes,
                       .transb = Transpose::no,
                       .m = out_,
                       .n = in_,
                       .k = dy.rows,
                       .a = dy.data,
                       .lda = out_,
                       .b = static_cast<const T*>(x_.data),
                       .ldb = in_,
                       .c = ctx.grad(weight_).data,
                       .ldc = in_,
                       .beta = add ? 1.0f : 0.0f,
                       .epilogue = has_bias_ ? Epilogue::bias_grad : Epilogue::none,
                       .bias_grad = db});
    if (has_bias_ && add) {
      for_each_n(ctx.backend(), out_, detail::StoreGradient<T>{true}, in(static_cast<const T*>(db)),
                 inout(ctx.grad(bias_).data));
    }
    return dx;
  }

 private:
  // The input forward saw, kept for the weight gradient (the layer is not templated on the dtype).
  struct SavedInput {
    const void* data = nullptr;
    template <class T>
    SavedInput& operator=(Activation<const T> a) {
      data = a.data;
      return *this;
    }
  };

  std::string name_;
  std::size_t in_, out_;
  bool has_bias_;
  ParamHandle weight_, bias_;
  SavedInput x_;
};

}  // namespace alloy::nn
