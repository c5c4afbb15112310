// Linear: y = x W^T + b, W [out, in], with PyTorch's default initialization (uniform in
// +-1/sqrt(in)) unless given another. cuBLASLt on Cuda (fp32 accumulation, bias in the epilogue, the bias gradient
// as alloy's column sums after the weight-gradient product), the blocked Host loop otherwise (the bias gradient
// in the product).
//
// Besides forward/backward, Linear offers the pieces its fusions are built from (Sequential and
// Residual use them, fused_mlp.hpp combines them): the product into a given output, with a
// residual added through c_in and optionally GELU in the epilogue; the input gradient, optionally
// through GELU's gradient with the previous layer's bias gradient; the weight gradient from a
// given input; and where a product should write this layer's bias gradient.
#pragma once

#include <alloy/kernels/column_sums.hpp>
#include <alloy/memory/registry.hpp>
#include <alloy/nn/activation.hpp>

#include <cmath>

namespace alloy::nn {

class Linear {
 public:
  Linear(std::string name, std::size_t in, std::size_t out, bool bias = true)
      : Linear(std::move(name), in, out, bias, pytorch_default(in), pytorch_default(in)) {}

  // With the weight's and the bias's initialization given (GPT-2's normal(0.02) weights and zero
  // biases, say) instead of PyTorch's default.
  Linear(std::string name, std::size_t in, std::size_t out, bool bias, Init weight_init, Init bias_init)
      : name_(std::move(name)), in_(in), out_(out), has_bias_(bias), weight_init_(weight_init), bias_init_(bias_init) {}

  void declare(ParamRegistry& r) {
    weight_ = r.declare(name_ + ".weight", {std::int64_t(out_), std::int64_t(in_)}, weight_init_);
    if (has_bias_) bias_ = r.declare(name_ + ".bias", {std::int64_t(out_)}, bias_init_, {.weight_decay = false});
  }

  std::size_t out_features(std::size_t) const noexcept { return out_; }
  std::size_t in_features() const noexcept { return in_; }
  bool has_bias() const noexcept { return has_bias_; }
  const std::string& name() const noexcept { return name_; }

  // While set, backward leaves this layer's bias gradient (the column sums of its dy) to its
  // caller, who takes it where dy is read anyway: Sequential hands it to a residual block's first
  // LayerNorm, whose backward pass adds the block's dy (this layer's, when the layer ends the
  // block) to its dx; CausalSelfAttention sums c_attn's from parts the attention backward wrote
  // while it wrote dy. bias_gradient(ctx) is where it goes.
  void leave_bias_gradient(bool leave) noexcept { leave_bias_gradient_ = leave; }
  bool leaves_bias_gradient() const noexcept { return leave_bias_gradient_; }
  template <class Ctx>
  auto* bias_gradient(Ctx& ctx) {
    if (!has_bias_) throw error("Linear '" + name_ + "' has no bias, so no bias gradient");
    return ctx.grad(bias_).data;
  }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> forward(Ctx& ctx, Activation<const detail::value_t<Ctx>> x) {
    auto y = detail::allocate(ctx, x.rows, out_);
    forward_into(ctx, x, y.data);
    return y;
  }

  // y = x W^T + b + residual in one product (the residual is cuBLASLt's C, beta = 1): Residual's
  // add without a pass of its own.
  template <class Ctx>
  Activation<detail::value_t<Ctx>> forward_adding(Ctx& ctx, Activation<const detail::value_t<Ctx>> x,
                                                  Activation<const detail::value_t<Ctx>> residual) {
    auto y = detail::allocate(ctx, x.rows, out_);
    forward_into(ctx, x, y.data, residual);
    return y;
  }

  // dx = dy W; dW = dy^T x and db = column sums of dy, written or added to the gradients.
  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy) {
    return backward(ctx, dy, has_bias_);
  }

  // As backward, with the bias gradient left alone when bias_gradient is false: the product that
  // computed dy wrote it already (the next layer's dGELU epilogue).
  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy, bool bias_gradient) {
    return backward_into(ctx, dy, bias_gradient, detail::allocate(ctx, dy.rows, in_).data);
  }

  // As backward, with dx written to `dx` (rows x in, packed): memory the caller knows is free,
  // such as a buffer that the product computing dy was the last to read.
  template <class Ctx, class T = detail::value_t<Ctx>>
  Activation<T> backward_into(Ctx& ctx, Activation<const T> dy, bool bias_gradient, T* dx) {
    const Activation<T> g = input_gradient_into(ctx, dy, dx);
    weight_gradient(ctx, dy, static_cast<const T*>(x_.data), bias_gradient && has_bias_);
    return g;
  }

  // As backward, with dx written over the input forward saw, once the weight gradient has read it
  // (the stream orders the two products): for a caller that knows nothing reads that input again
  // and that it is packed (rows x in), such as a Sequential whose LayerNorm produced it. No buffer
  // of its own, and dx lies where the input did.
  template <class Ctx, class T = detail::value_t<Ctx>>
  Activation<T> backward_over_input(Ctx& ctx, Activation<const T> dy) {
    T* x = const_cast<T*>(static_cast<const T*>(x_.data));
    weight_gradient(ctx, dy, static_cast<const T*>(x), has_bias_);
    return input_gradient_into(ctx, dy, x);
  }

  // Forward without the product: keeps x for backward's weight gradient, as forward does (the
  // recomputation of a block whose output nothing reads, train/recompute.hpp).
  template <class Ctx>
  void forward_for_backward(Ctx&, Activation<const detail::value_t<Ctx>> x) {
    detail::check_width("Linear", name_, in_, x.cols);
    x_ = x;
  }

  // ---- the pieces of the fused paths ----

  // y (rows x out, packed) = act(x W^T + b + residual): act is GELU when pre_activation is given,
  // which then receives GELU's input (rows x out, packed: out must be a multiple of 8). Keeps x
  // for backward's weight gradient, as forward does.
  template <class Ctx, class T = detail::value_t<Ctx>>
  void forward_into(Ctx& ctx, Activation<const T> x, T* y, Activation<const T> residual = {},
                    T* pre_activation = nullptr) {
    detail::check_width("Linear", name_, in_, x.cols);
    x_ = x;
    if (residual.data != nullptr && (residual.rows != x.rows || residual.cols != out_)) {
      throw error("Linear '" + name_ + "': the residual added to the output is " + std::to_string(residual.rows) +
                  " x " + std::to_string(residual.cols) + ", the output " + std::to_string(x.rows) + " x " +
                  std::to_string(out_));
    }
    const bool gelu = pre_activation != nullptr;
    detail::gemm(ctx, {.transa = Transpose::no,
                       .transb = Transpose::yes,
                       .m = x.rows,
                       .n = out_,
                       .k = in_,
                       .a = x.data,
                       .lda = in_,
                       .b = ctx.param(weight_).data,
                       .ldb = in_,
                       .c = y,
                       .ldc = out_,
                       .c_in = residual.data,
                       .beta = residual.data != nullptr ? 1.0f : 0.0f,
                       .epilogue = has_bias_ ? (gelu ? Epilogue::bias_gelu_tanh : Epilogue::bias)
                                             : (gelu ? Epilogue::gelu_tanh : Epilogue::none),
                       .bias = has_bias_ ? ctx.param(bias_).data : nullptr,
                       .pre_activation = pre_activation,
                       .ld_pre_activation = gelu ? out_ : 0});
  }

  // dx = dy W (rows x in, new in the workspace). With pre_activation (GELU's input before this
  // layer, rows x in, packed), dx = (dy W) * gelu'(pre_activation) instead, and with
  // previous_bias_grad also the column sums of dx there: the gradient of the bias the previous
  // layer added before GELU.
  template <class Ctx, class T = detail::value_t<Ctx>>
  Activation<T> input_gradient(Ctx& ctx, Activation<const T> dy, const T* pre_activation = nullptr,
                               T* previous_bias_grad = nullptr) {
    return input_gradient_into(ctx, dy, detail::allocate(ctx, dy.rows, in_).data, pre_activation, previous_bias_grad);
  }

  // input_gradient written to `out` (rows x in, packed) instead of a new buffer.
  template <class Ctx, class T = detail::value_t<Ctx>>
  Activation<T> input_gradient_into(Ctx& ctx, Activation<const T> dy, T* out, const T* pre_activation = nullptr,
                                    T* previous_bias_grad = nullptr) {
    const Activation<T> dx{out, dy.rows, in_};
    const bool gelu = pre_activation != nullptr;
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
                       .ldc = in_,
                       .epilogue = !gelu                ? Epilogue::none
                                   : previous_bias_grad ? Epilogue::dgelu_tanh_bias_grad
                                                        : Epilogue::dgelu_tanh,
                       .bias_grad = previous_bias_grad,
                       .pre_activation = const_cast<T*>(pre_activation),  // read only by the dGELU epilogues
                       .ld_pre_activation = gelu ? in_ : 0});
    return dx;
  }

  // dW = dy^T x, written or added to the weight's gradient; with bias_gradient also db = column
  // sums of dy: on the Host in the same product (its bias-gradient epilogue), on Cuda as alloy's
  // column sums after it (kernels/column_sums.hpp), added straight into the gradient when
  // gradients accumulate (cuBLASLt runs its bias-gradient epilogue as a slower kernel of its own).
  template <class Ctx, class T = detail::value_t<Ctx>>
  void weight_gradient(Ctx& ctx, Activation<const T> dy, const T* x, bool bias_gradient) {
    bias_gradient = bias_gradient && !leave_bias_gradient_;
#if ALLOY_HAS_CUDA_KERNELS
    if constexpr (std::is_same_v<typename Ctx::backend_type, Cuda>) {
      weight_product(ctx, dy, x, Epilogue::none, static_cast<T*>(nullptr));
      if (bias_gradient) {
        if (!has_bias_) throw error("Linear '" + name_ + "' has no bias, so no bias gradient");
        float* scratch = ctx.template allocate<float>(column_sums_scratch_floats(ctx.backend(), dy.rows, out_));
        column_sums(ctx.backend(),
                    ColumnSums<T>{.x = dy.data,
                                  .rows = dy.rows,
                                  .cols = out_,
                                  .ld = out_,
                                  .out = ctx.grad(bias_).data,
                                  .accumulate = ctx.accumulate_grads()},
                    scratch);
      }
      return;
    }
#endif
    T* db = bias_gradient ? bias_grad_target(ctx) : nullptr;
    weight_product(ctx, dy, x, bias_gradient ? Epilogue::bias_grad : Epilogue::none, db);
    if (bias_gradient) finish_bias_grad(ctx, db);
  }

  // Where a product writes this layer's bias gradient (out elements): the gradient itself, or,
  // when gradients accumulate, a workspace temporary that finish_bias_grad adds to it (the
  // bias-gradient epilogues write, they cannot add).
  template <class Ctx, class T = detail::value_t<Ctx>>
  T* bias_grad_target(Ctx& ctx) {
    if (!has_bias_) throw error("Linear '" + name_ + "' has no bias, so no bias gradient");
    return ctx.accumulate_grads() ? ctx.template allocate<T>(out_) : ctx.grad(bias_).data;
  }
  template <class Ctx, class T = detail::value_t<Ctx>>
  void finish_bias_grad(Ctx& ctx, const T* target) {
    if (ctx.accumulate_grads()) {
      for_each_n(ctx.backend(), out_, detail::StoreGradient<T>{true}, in(target), inout(ctx.grad(bias_).data));
    }
  }

 private:
  // dW = dy^T x (written, or added when gradients accumulate), with `epilogue` writing db.
  template <class Ctx, class T = detail::value_t<Ctx>>
  void weight_product(Ctx& ctx, Activation<const T> dy, const T* x, Epilogue epilogue, T* db) {
    detail::gemm(ctx, {.transa = Transpose::yes,
                       .transb = Transpose::no,
                       .m = out_,
                       .n = in_,
                       .k = dy.rows,
                       .a = dy.data,
                       .lda = out_,
                       .b = x,
                       .ldb = in_,
                       .c = ctx.grad(weight_).data,
                       .ldc = in_,
                       .beta = ctx.accumulate_grads() ? 1.0f : 0.0f,
                       .epilogue = epilogue,
                       .bias_grad = db});
  }

  // torch.nn.Linear's initialization of both weight and bias: uniform in +-1/sqrt(in).
  static Init pytorch_default(std::size_t in) {
    const float bound = 1.0f / std::sqrt(static_cast<float>(in));
    return Init::uniform(-bound, bound);
  }

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
  bool leave_bias_gradient_ = false;
  Init weight_init_, bias_init_;
  ParamHandle weight_, bias_;
  SavedInput x_;
};

}  // namespace alloy::nn
