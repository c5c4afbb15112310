// LionRule: Lion's update of one element. Like every rule (optim/rules.hpp), a pure
// ALLOY_HOST_DEVICE functor spelled with alloy::fp, so Host and Cuda give the same bits.
#pragma once

#include <alloy/memory/layout.hpp>
#include <alloy/numeric/fp_ops.hpp>

namespace alloy {

// Lion (Chen et al. 2023; lucidrains/lion-pytorch): p *= 1 - lr*wd;
// p -= lr * sign(b1*m + (1-b1)*g); m = b2*m + (1-b2)*g.
struct LionRule {
  static constexpr int slots = 1;
  ALLOY_HOST_DEVICE static constexpr bool slot_signed(int) { return true; }
  float lr, beta1, beta2, weight_decay;

  ALLOY_HOST_DEVICE void operator()(float g, float& p, float* s, BlockScales b) const {
    const float lr_b = fp::mul(lr, b.lr);
    p = fp::mul(p, fp::sub(1.0f, fp::mul(fp::mul(lr_b, weight_decay), b.decay)));
    const float c = fp::add(fp::mul(beta1, s[0]), fp::mul(fp::sub(1.0f, beta1), g));
    const float sign = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    p = fp::sub(p, fp::mul(lr_b, sign));
    s[0] = fp::add(fp::mul(beta2, s[0]), fp::mul(fp::sub(1.0f, beta2), g));
  }
};

}  // namespace alloy
