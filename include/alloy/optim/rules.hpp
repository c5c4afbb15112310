// The optimizer update rules, one element at a time, written once for host and device with
// alloy::fp operations (each rounded on its own), so Host and Cuda produce the same bits.
// A rule sees the unscaled, clipped gradient g, the fp32 parameter p and its state slots s[],
// and per-block multipliers for the learning rate and weight decay (0 for no-decay tensors).
// Each rule follows the PyTorch update of the same name; scalars that depend only on the step
// (bias corrections) are computed once on the host in double precision.
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
