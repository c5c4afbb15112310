// SoftmaxCrossEntropy: the mean over rows of -log softmax(logits)[target], computed in fp32 from
// compute-dtype logits (max-subtracted), with the backward fused: dlogits = (softmax - onehot) *
// ctx.loss_scale() / rows, the seed of the whole backward pass.
#pragma once

#include <alloy/backend/loss.hpp>
#include <alloy/kernels/softmax_cross_entropy.hpp>
#include <alloy/nn/activation.hpp>

#include <cstdint>
#include <utility>

namespace alloy::nn {

namespace detail {
struct DivideBy {
  float divisor;
  ALLOY_HOST_DEVICE void operator()(float& x) const { x = fp::div(x, divisor); }
};
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
    using B = typename Ctx::backend_type;
    auto dlogits = detail::allocate(ctx, logits.rows, logits.cols);
    float* row_loss = ctx.template allocate<float>(logits.rows);
    const float seed = ctx.loss_scale() / static_cast<float>(logits.rows);
    softmax_cross_entropy(ctx.backend(), logits.data, targets, logits.rows, logits.cols, row_loss, dlogits.data, seed);
    const float rows = static_cast<float>(logits.rows);
    if constexpr (std::is_same_v<B, Host>) {
      return {reduce_sum(ctx.backend(), static_cast<const float*>(row_loss), logits.rows) / rows, dlogits};
    } else {
      const B be = ctx.backend();
      const std::size_t bytes = reduce_workspace_bytes<float>(be);
      void* partials = ctx.template allocate<float>(bytes / sizeof(float) + 1);
      float* mean = ctx.template allocate<float>(1);
      transform_reduce_async(be, partials, bytes, mean, logits.rows, 0.0f, Sum{}, ToAccumulator{},
                             in(static_cast<const float*>(row_loss)));
      // The same division the host made of the sum: the same bits.
      for_each_n(be, 1, detail::DivideBy{rows}, inout(mean));
      return {Loss(mean, be.stream), dlogits};
    }
  }
};

}  // namespace alloy::nn
