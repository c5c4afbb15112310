// SoftmaxCrossEntropy: the mean over rows of -log softmax(logits)[target], computed in fp32 from
// compute-dtype logits (max-subtracted), with the backward fused: dlogits = (softmax - onehot) *
// ctx.loss_scale() / rows, the seed of the whole backward pass.
#pragma once

#include <alloy/backend/loss.hpp>
#include <alloy/kernels/softmax_cross_entropy.hpp>
#include <alloy/nn/activation.hpp>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace alloy::nn {

namespace detail {
struct DivideBy {
  float divisor;
  ALLOY_HOST_DEVICE void operator()(float& x) const { x = fp::div(x, divisor); }
};

// The sum of row_loss[0 .. rows) divided by `divisor`: a float on Host; on Cuda a device Loss (in
// the workspace) that nothing waits for. The same division of the same sum on both backends.
template <class Ctx>
Loss mean_loss(Ctx& ctx, const float* row_loss, std::size_t rows, float divisor) {
  using B = typename Ctx::backend_type;
  if constexpr (std::is_same_v<B, Host>) {
    return reduce_sum(ctx.backend(), row_loss, rows) / divisor;
  } else {
    const B be = ctx.backend();
    const std::size_t bytes = reduce_workspace_bytes<float>(be);
    void* partials = ctx.template allocate<float>(bytes / sizeof(float) + 1);
    float* mean = ctx.template allocate<float>(1);
    transform_reduce_async(be, partials, bytes, mean, rows, 0.0f, Sum{}, ToAccumulator{}, in(row_loss));
    for_each_n(be, 1, DivideBy{divisor}, inout(mean));
    return Loss(mean, be.stream);
  }
}
}  // namespace detail

class SoftmaxCrossEntropy {
 public:
  // Returns the mean loss and the gradient of loss * ctx.loss_scale(). On Cuda the loss stays on
  // the device (alloy::Loss, in the workspace): nothing waits for it; the trainer reads every
  // micro-batch's loss once per step. On Host it is a float.
  template <class Ctx>
  std::pair<Loss, Activation<detail::value_t<Ctx>>> forward_backward(Ctx& ctx,
                                                                     Activation<const detail::value_t<Ctx>> logits,
                                                                     const std::int32_t* targets) {
    auto dlogits = detail::allocate(ctx, logits.rows, logits.cols);
    float* row_loss = ctx.template allocate<float>(logits.rows);
    const float seed = ctx.loss_scale() / static_cast<float>(logits.rows);
    softmax_cross_entropy(ctx.backend(), logits.data, targets, logits.rows, logits.cols, row_loss, dlogits.data, seed);
    return {detail::mean_loss(ctx, row_loss, logits.rows, static_cast<float>(logits.rows)), dlogits};
  }
};

}  // namespace alloy::nn
