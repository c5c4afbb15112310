// Adafactor (Shazeer & Stern 2018), as torch.optim.Adafactor computes it:
//   beta2_t = 1 - t^beta2_decay;  rho_t = min(lr, 1/sqrt(t));  alpha_t = max(eps2, RMS(p)) * rho_t
//   p *= 1 - lr * weight_decay
//   matrices (the last two dims; leading dims are a batch): row_var, col_var <- lerp toward the
//     row and column means of g^2; var = row_var col_var / max(mean(row_var), eps1)
//   vectors: var <- lerp(var, g^2, 1 - beta2_t)
//   U = g / sqrt(max(var, eps1^2));  p -= alpha_t / max(1, RMS(U) / d) * U
// State: row and column statistics for matrices (m + n values instead of m n), a full second
// moment for vectors, all fp32. Each tensor needs its own RMS(p) and RMS(U), so the step runs a
// few passes per tensor rather than one fused pass over the arena; the scalars stay on the
// device (no host round trip per tensor).
// This header is the policy and its Config. The statistics' layout is memory/adafactor_layout.hpp,
// the per-element math optim/rules/adafactor.hpp, and the passes kernels/adafactor_update.hpp.
#pragma once

#include <alloy/optim/state.hpp>

#include <type_traits>

namespace alloy {

template <class S = State<float>>
struct Adafactor {
  static_assert(std::is_same_v<S, State<float>>,
                "Adafactor<S>: its factored statistics are small and kept in fp32; use State<fp32>");
  using state = S;
  static constexpr const char* name = "Adafactor";
  static constexpr int slots = 1;  // one compact arena of statistics
  struct Config {
    float lr = 1e-2f;
    float beta2_decay = -0.8f;
    float eps1 = 1.1920929e-07f;  // PyTorch's default: the dtype's epsilon
    float eps2 = 1e-3f;
    float d = 1.0f;  // clipping threshold of RMS(U)
    float weight_decay = 0.0f;
    // Each setting with its name (checkpoints record them): f("lr", lr), ...
    template <class F>
    void for_each_field(F&& f) const {
      f("lr", lr);
      f("beta2_decay", beta2_decay);
      f("eps1", eps1);
      f("eps2", eps2);
      f("d", d);
      f("weight_decay", weight_decay);
    }
  };
};

template <class T>
inline constexpr bool is_adafactor_v = false;
template <class S>
inline constexpr bool is_adafactor_v<Adafactor<S>> = true;

}  // namespace alloy
