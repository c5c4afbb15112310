// SoftmaxCrossEntropy: the mean over rows of -log softmax(logits)[target], computed in fp32 from
// compute-dtype logits (max-subtracted), with the backward fused: dlogits = (softmax - onehot) *
// ctx.loss_scale() / rows, the seed of the whole backward pass.
#pragma once

#include <alloy/kernels/softmax_cross_entropy.hpp>
#include <alloy/nn/activation.hpp>

#include <cstdint>
#include <utility>

namespace alloy::nn {

class SoftmaxCrossEntropy {
 public:
  // Returns the mean loss (waits for it on Cuda) and the gradient of loss * ctx.loss_scale().
  template <class Ctx>
  std::pair<float, Activation<detail::value_t<Ctx>>> forward_backward(Ctx& ctx,
                                                                      Activation<const detail::value_t<Ctx>> logits,
                                                                      const std::int32_t* targets) {
    auto dlogits = detail::allocate(ctx, logits.rows, logits.cols);
    float* row_loss = ctx.template allocate<float>(logits.rows);
    const float seed = ctx.loss_scale() / static_cast<float>(logits.rows);
    softmax_cross_entropy(ctx.backend(), logits.data, targets, logits.rows, logits.cols, row_loss, dlogits.data, seed);
    const float total = reduce_sum(ctx.backend(), static_cast<const float*>(row_loss), logits.rows);
    return {total / static_cast<float>(logits.rows), dlogits};
  }
};

}  // namespace alloy::nn
