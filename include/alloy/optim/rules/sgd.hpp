// SGDRule: torch.optim.SGD's update of one element. Like every rule (optim/rules.hpp), a pure
// ALLOY_HOST_DEVICE functor spelled with alloy::fp, so Host and Cuda give the same bits.
#pragma once

#include <alloy/memory/layout.hpp>
#include <alloy/numeric/fp_ops.hpp>

namespace alloy {

// torch.optim.SGD (weight decay coupled, as PyTorch's: added to the gradient):
// g += wd*p; buf = first step ? g : momentum*buf + (1-dampening)*g;
// g = nesterov ? g + momentum*buf : buf; p -= lr*g.
struct SGDRule {
  static constexpr int slots = 1;
  ALLOY_HOST_DEVICE static constexpr bool slot_signed(int) { return true; }
  float lr, momentum, dampening, weight_decay;
  bool nesterov;
  bool first_step;  // PyTorch starts the momentum buffer at g, undamped

  ALLOY_HOST_DEVICE void operator()(float g, float& p, float* s, BlockScales b) const {
    g = fp::add(g, fp::mul(fp::mul(weight_decay, b.decay), p));
    if (momentum != 0.0f) {
      s[0] = first_step ? g : fp::add(fp::mul(momentum, s[0]), fp::mul(fp::sub(1.0f, dampening), g));
      g = nesterov ? fp::add(g, fp::mul(momentum, s[0])) : s[0];
    }
    p = fp::sub(p, fp::mul(fp::mul(lr, b.lr), g));
  }
};

}  // namespace alloy
