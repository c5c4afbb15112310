// The fused paths Sequential takes for Linear -> Gelu (-> Linear), built from Linear's pieces.
//
// Linear -> Gelu: one product with Epilogue::(bias_)gelu_tanh writes GELU's output and keeps its
// input, the pre-activation, for GELU's backward; Gelu's own forward pass does not run.
//
// Linear (up, in -> hidden) -> Gelu -> Linear (down, hidden -> out), the transformer and
// residual-MLP block:
//   forward   up's product: h = gelu(x Wu^T + bu), pre kept; down's product: y = h Wd^T + bd
//             (+ the residual, when the Sequential is a Residual's block and down is its last layer)
//   backward  down's input gradient dh = dy Wd (a plain product); down's weight gradient
//             dWd = dy^T h, dbd = column sums of dy (Epilogue::bias_grad); dPre = dh * gelu'(pre)
//             (an element-wise pass); up's gradients from dPre: dx = dPre Wu, dWu = dPre^T x,
//             dbu in the same product. (cuBLASLt's dGELU + bias-gradient epilogue was measured
//             slower than these two passes: see mlp_backward.)
// GELU's forward pass is gone from forward (42 us per block at 8192 x 1024 -> 4096 bf16 on the
// H200, profile of 69707e9).
//
// Memory: only the pre-activation lives from forward to backward; h, which down's weight
// gradient needs, is recomputed from it in backward, as llm.c does. h is 8192 x 4096 bf16 = 64 MB
// per block at the residual MLP's size, 512 MB over its 8 blocks, kept until backward otherwise;
// recomputing is one element-wise pass reading 64 MB and writing 64 MB, the cost of GELU's own
// forward kernel (42 us measured per block, at about 3 TB/s), in exchange for that memory at the
// step's peak. The workspace is a stack, so h can be released only if nothing that must outlive
// it sits above it: forward allocates the block's output y before h, runs both products, and
// releases h; backward allocates dPre, then h, computes dWd, and releases h. Measured on Host
// at 16 rows and scaled to 8192 (activations grow with rows), bf16, Accumulate<2>: the residual
// MLP's activation peak is 3113 MiB before these fusions and 1989 MiB with them (8 blocks: h
// released, 512 MiB; GELU's backward output, 512 MiB; the down layer's output apart from the
// residual sum, 128 MiB). For bf16 and fp16 the recomputed h is gelu(pre rounded to 16 bits),
// where forward's product used gelu of the fp32 pre-activation: dWd sees inputs within one
// rounding of forward's (for fp32 they are the same).
// Recomputation is deterministic, so re-running forward (Checkpointing) gives the same bits.
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

// The backward of mlp_forward, from dy (the gradient of y, and of the residual's share of it,
// which Residual adds itself). Returns dx.
template <class Ctx, class T = value_t<Ctx>>
Activation<T> mlp_backward(Ctx& ctx, Linear& up, Gelu& gelu, Linear& down, Activation<const T> dy) {
  // Measured on the H200 at 5dc06d4 (8192 x 1024 -> 4096, bf16): cuBLASLt 13.0 runs the
  // DGELU_BGRAD epilogue as a kernel of its own after the product (cublasLt::globalKernel, 283 us
  // per block), where GELU's gradient as an element-wise pass (55 us) and the bias gradient in
  // up's weight product (28 us) cost 83 us. So backward keeps those two: down's input gradient
  // is a plain product, GELU's gradient runs from the kept pre-activation, and up's bias
  // gradient comes out of its weight product. The dGELU epilogues stay in kernels/ (tested)
  // for a cuBLASLt that fuses them.
  const T* pre = gelu.pre_activation<T>();
  const Activation<const T> dh = down.input_gradient(ctx, dy);
  {
    const auto mark = ctx.workspace().mark();
    T* h = ctx.template allocate<T>(dh.size());
    for_each_n(ctx.backend(), dh.size(), GeluForward<T>{}, in(pre), out(h));
    down.weight_gradient(ctx, dy, static_cast<const T*>(h), down.has_bias());
    ctx.workspace().release(mark);
  }
  auto d_pre = allocate(ctx, dh.rows, dh.cols);
  for_each_n(ctx.backend(), dh.size(), GeluBackward<T>{}, in(pre), in(dh.data), out(d_pre.data));
  return up.backward(ctx, Activation<const T>(d_pre), true);
}

}  // namespace alloy::nn::detail
