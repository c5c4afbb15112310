// AdamWRule: torch.optim.AdamW's update of one element. Like every rule (optim/rules.hpp), a pure
// ALLOY_HOST_DEVICE functor spelled with alloy::fp, so Host and Cuda give the same bits.
#pragma once

#include <alloy/memory/layout.hpp>
#include <alloy/numeric/fp_ops.hpp>

namespace alloy {

// torch.optim.AdamW: p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
// p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps).
struct AdamWRule {
  static constexpr int slots = 2;
  ALLOY_HOST_DEVICE static constexpr bool slot_signed(int k) { return k == 0; }  // m signed, v not
  float lr, beta1, beta2, eps, weight_decay;
  float step_size;       // lr / (1 - beta1^t)
  float inv_sqrt_bias2;  // 1 / sqrt(1 - beta2^t)

  ALLOY_HOST_DEVICE void operator()(float g, float& p, float* s, BlockScales b) const {
    const float lr_b = fp::mul(lr, b.lr);
    p = fp::mul(p, fp::sub(1.0f, fp::mul(fp::mul(lr_b, weight_decay), b.decay)));
    s[0] = fp::add(fp::mul(beta1, s[0]), fp::mul(fp::sub(1.0f, beta1), g));
    s[1] = fp::add(fp::mul(beta2, s[1]), fp::mul(fp::sub(1.0f, beta2), fp::mul(g, g)));
    const float denom = fp::add(fp::mul(fp::sqrt(s[1]), inv_sqrt_bias2), eps);
    p = fp::sub(p, fp::mul(fp::mul(step_size, b.lr), fp::div(s[0], denom)));
  }
};

}  // namespace alloy
