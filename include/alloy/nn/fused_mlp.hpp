// The fused paths Sequential takes for Linear -> Gelu (-> Linear), built from Linear's pieces.
//
// Linear -> Gelu: one product with Epilogue::(bias_)gelu_tanh writes GELU's output and keeps its
// input, the pre-activation, for GELU's backward; Gelu's own forward pass does not run.
//
// Linear (up, in -> hidden) -> Gelu -> Linear (down, hidden -> out), the transformer and
// residual-MLP block:
//   forward   up's product: h = gelu(x Wu^T + bu), pre kept; down's product: y = h Wd^T + bd
//             (+ the residual, when the Sequential is a Residual's block and down is its last layer)
//   backward  down's input gradient with GELU's in its epilogue: dPre = (dy Wd) * gelu'(pre)
//             (Epilogue::dgelu_tanh; for fp32 and tf32 a plain product and one element-wise
//             pass giving both dPre and h, which measured faster there); down's weight gradient dWd = dy^T h, dbd =
//             column sums of dy (Epilogue::bias_grad); up's gradients from dPre: dx = dPre Wu, dWu = dPre^T x, dbu in
//             the same product. (cuBLASLt's dGELU + bias-gradient epilogue was measured slower than the bias gradient
//             in up's weight product: see mlp_backward.)
// GELU's forward pass is gone from forward (42 us per block at 8192 x 1024 -> 4096 bf16 on the
// H200, profile of 69707e9).
//
// Memory: only the pre-activation lives from forward to backward; h, which down's weight
// gradient needs, is recomputed from it in backward, as llm.c does, unless the Gelu was built with
// GeluOptions::keep_output (then h lives too, and neither direction has an element-wise pass). h is 8192 x 4096 bf16 =
// 64 MB per block at the residual MLP's size, 512 MB over its 8 blocks, kept until backward otherwise; recomputing is
// one element-wise pass reading 64 MB and writing 64 MB, the cost of GELU's own forward kernel (42 us measured per
// block, at about 3 TB/s), in exchange for that memory at the step's peak. The workspace is a stack, so h can be
// released only if nothing that must outlive it sits above it: forward allocates the block's output y before h, runs
// both products, and releases h; backward allocates h, computes dWd, releases h and writes dPre where h was. Measured
// on Host at 16 rows and scaled to 8192 (activations grow with rows), bf16, Accumulate<2>: the residual MLP's
// activation peak is 3113 MiB before these fusions and 1989 MiB with them (8 blocks: h released, 512 MiB; GELU's
// backward output, 512 MiB; the down layer's output apart from the residual sum, 128 MiB). For bf16 and fp16 the
// recomputed h is gelu(pre rounded to 16 bits), where forward's product used gelu of the fp32 pre-activation: dWd sees
// inputs within one rounding of forward's (for fp32 they are the same). Recomputation is deterministic, so re-running
// forward (Checkpointing) gives the same bits.
//
// cuBLASLt needs the pre-activation's leading dimension to be a multiple of 8; it is stored
// packed, so the fusion needs hidden % 8 == 0, and otherwise the layers run one by one.
#pragma once

#include <alloy/nn/activation.hpp>
#include <alloy/nn/gelu.hpp>
#include <alloy/nn/linear.hpp>

namespace alloy::nn::detail {

// Whether GELU can follow `linear` in its product (the pre-activation's leading dimension rule).
inline bool gelu_fuses_after(const Linear& linear) { return linear.out_features(0) % 8 == 0; }

// Linear -> Gelu in one product. gelu keeps the pre-activation; its own backward runs from it.
template <class Ctx, class T = value_t<Ctx>>
Activation<T> linear_gelu_forward(Ctx& ctx, Linear& linear, Gelu& gelu, Activation<const T> x) {
  const std::size_t hidden = linear.out_features(x.cols);
  T* pre = ctx.template allocate<T>(x.rows * hidden);
  Activation<T> h{ctx.template allocate<T>(x.rows * hidden), x.rows, hidden};
  linear.forward_into(ctx, x, h.data, {}, pre);
  gelu.keep_pre_activation(static_cast<const T*>(pre), false);
  return h;
}

// up -> gelu -> down forward; residual (or none, data == nullptr) is added in down's product.
template <class Ctx, class T = value_t<Ctx>>
Activation<T> mlp_forward(Ctx& ctx, Linear& up, Gelu& gelu, Linear& down, Activation<const T> x,
                          Activation<const T> residual) {
  const std::size_t hidden = up.out_features(x.cols);
  T* pre = ctx.template allocate<T>(x.rows * hidden);
  if (gelu.options().keep_output) {  // h lives until backward: no recomputation there
    T* h = ctx.template allocate<T>(x.rows * hidden);
    Activation<T> y{ctx.template allocate<T>(x.rows * down.out_features(hidden)), x.rows, down.out_features(hidden)};
    up.forward_into(ctx, x, h, {}, pre);
    down.forward_into(ctx, Activation<const T>{h, x.rows, hidden}, y.data, residual);
    gelu.keep_pre_activation(static_cast<const T*>(pre), true, static_cast<const T*>(h));
    return y;
  }
  // The output sits below h on the stack, so releasing h leaves it.
  Activation<T> y{ctx.template allocate<T>(x.rows * down.out_features(hidden)), x.rows, down.out_features(hidden)};
  const auto mark = ctx.workspace().mark();
  const Activation<const T> h{ctx.template allocate<T>(x.rows * hidden), x.rows, hidden};
  up.forward_into(ctx, x, const_cast<T*>(h.data), {}, pre);
  down.forward_into(ctx, h, y.data, residual);  // down keeps h's address, unused: backward recomputes h
  ctx.workspace().release(mark);
  gelu.keep_pre_activation(static_cast<const T*>(pre), true);
  return y;
}

// What backward needs of mlp_forward, without its output: the recomputation of a checkpointed
// segment's last block (train/recompute.hpp), where nothing reads y. Up's product runs as in
// mlp_forward (same arguments, so the same cuBLASLt plan and the same bits of the pre-activation);
// down's product, half of the block's forward, does not run at all: its backward reads only the
// pre-activation (h is recomputed from it) and dy.
// Up's product with the plain bias epilogue (the pre-activation as its output, no GELU output)
// would save about 30 us more per block (d5526ac: Checkpointing 1.131x instead of 1.176x of the
// step), and gave GELU_AUX's bits at the sizes tested on the H200; but cuBLASLt chooses its kernel
// per epilogue and shape, so the equality would be measured, not built in, and recomputation
// promises the same bits. Kept as the same product until the plain product can be given the
// GELU_AUX plan's algorithm.
template <class Ctx, class T = value_t<Ctx>>
void mlp_forward_for_backward(Ctx& ctx, Linear& up, Gelu& gelu, Linear& down, Activation<const T> x) {
  const std::size_t hidden = up.out_features(x.cols);
  check_width("Linear", down.name(), down.in_features(), hidden);
  T* pre = ctx.template allocate<T>(x.rows * hidden);
  const auto mark = ctx.workspace().mark();
  T* h = ctx.template allocate<T>(x.rows * hidden);  // the epilogue's GELU output, unread unless kept
  up.forward_into(ctx, x, h, {}, pre);
  if (gelu.options().keep_output) {
    gelu.keep_pre_activation(static_cast<const T*>(pre), true, static_cast<const T*>(h));
    return;
  }
  ctx.workspace().release(mark);
  gelu.keep_pre_activation(static_cast<const T*>(pre), true);
}

// One pass over pre and dh = dy Wd for fp32 and tf32: h = gelu(pre) for down's weight gradient,
// and dPre = dh * gelu'(pre) written over dh. The same bits as GeluForward and a separate
// gradient pass, reading pre once instead of twice.
template <class T>
struct GeluAndGradientInPlace {
  ALLOY_HOST_DEVICE void operator()(const T& x, T& d, T& h) const {
    const float pre = to_float(x);
    h = round_nearest<T>(gelu_tanh(pre));
    d = round_nearest<T>(gelu_tanh_backward(pre, to_float(d)));
  }
};

// dPre = dh * gelu'(pre) written over dh: fp32 and tf32 with h kept from forward.
template <class T>
struct GeluGradientInPlace {
  ALLOY_HOST_DEVICE void operator()(const T& x, T& d) const {
    d = round_nearest<T>(gelu_tanh_backward(to_float(x), to_float(d)));
  }
};

// Up's backward from dPre, once the product that computed dPre has read the pre-activation for
// the last time: dx (rows x in) goes where the pre-activation was (rows x hidden) when it fits,
// instead of into a buffer of its own (one rows x in buffer fewer at the block's backward peak;
// the stream orders the write after that read).
// With over_input (the caller knows nothing reads up's input again: a Sequential's LayerNorm
// produced it), dx goes over that input instead (Linear::backward_over_input).
template <class Ctx, class T = value_t<Ctx>>
Activation<T> up_backward(Ctx& ctx, Linear& up, Activation<const std::type_identity_t<T>> d_pre, const T* pre,
                          bool over_input) {
  if (over_input) return up.backward_over_input(ctx, d_pre);
  if (up.in_features() > up.out_features(0)) return up.backward(ctx, d_pre, true);
  return up.backward_into(ctx, d_pre, true, const_cast<T*>(pre));
}

// The backward of mlp_forward, from dy (the gradient of y, and of the residual's share of it,
// which Residual adds itself). Returns dx.
template <class Ctx, class T = value_t<Ctx>>
Activation<T> mlp_backward(Ctx& ctx, Linear& up, Gelu& gelu, Linear& down, Activation<const T> dy,
                           bool over_input = false) {
  // Measured on the H200 (8192 x 1024 -> 4096, bf16, cuBLASLt 13.0, alloy_bench_mlp_gemm at
  // 990ef1e): down's input-gradient product takes 113 us plain and 138 us with the dGELU epilogue,
  // where GELU's gradient as an element-wise pass took 60 us more; so dPre comes out of the
  // product. The dGELU + bias-gradient epilogue (DGELU_BGRAD) runs as a kernel of its own after
  // the product (283 us per block at 5dc06d4), so up's bias gradient comes from its weight
  // product instead.
  //
  // For fp32 and tf32 the dGELU epilogue cost more than the pass it replaces (the step took 1.4 and
  // 1.3 ms longer at f80e2c9 than at 990ef1e, 8 blocks), so there GELU's gradient stays a pass.
  //
  // 16-bit: h (for down's weight gradient) comes first and dPre is then written where h was: the
  // two rows x hidden buffers are never live together, one fewer at the block's backward peak. The
  // stream orders the weight product's read of h before the input-gradient product's write.
  // fp32 and tf32: the plain product dh, then h and dPre in one pass (GeluAndGradientInPlace),
  // then the weight gradient from h: pre is read once, at the price of h and dPre being live
  // together.
  const T* pre = gelu.pre_activation<T>();
  const std::size_t hidden = up.out_features(0);
  constexpr bool epilogue_dgelu = sizeof(T) == 2;
  Activation<const T> d_pre;
  if (const T* h = gelu.kept_output<T>()) {  // GeluOptions::keep_output: no recomputation
    down.weight_gradient(ctx, dy, h, down.has_bias());
    if constexpr (epilogue_dgelu) {
      d_pre = down.input_gradient(ctx, dy, pre);
    } else {
      const Activation<T> dh = down.input_gradient(ctx, dy);
      for_each_n(ctx.backend(), dh.size(), GeluGradientInPlace<T>{}, in(pre), inout(dh.data));
      d_pre = dh;
    }
    return up_backward(ctx, up, d_pre, pre, over_input);
  }
  if constexpr (epilogue_dgelu) {
    {
      const auto mark = ctx.workspace().mark();
      T* h = ctx.template allocate<T>(dy.rows * hidden);
      for_each_n(ctx.backend(), dy.rows * hidden, GeluForward<T>{}, in(pre), out(h));
      down.weight_gradient(ctx, dy, static_cast<const T*>(h), down.has_bias());
      ctx.workspace().release(mark);
    }
    d_pre = down.input_gradient(ctx, dy, pre);
  } else {
    const Activation<T> dh = down.input_gradient(ctx, dy);
    const auto mark = ctx.workspace().mark();
    T* h = ctx.template allocate<T>(dh.size());
    for_each_n(ctx.backend(), dh.size(), GeluAndGradientInPlace<T>{}, in(pre), inout(dh.data), out(h));
    down.weight_gradient(ctx, dy, static_cast<const T*>(h), down.has_bias());
    ctx.workspace().release(mark);
    d_pre = dh;
  }
  return up_backward(ctx, up, d_pre, pre, over_input);
}

}  // namespace alloy::nn::detail
