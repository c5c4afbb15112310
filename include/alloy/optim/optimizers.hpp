// Optimizer policies: AdamW<State<...>>, SGD<...>, Lion<...>. Each names its update rule, its
// state slots and its runtime Config (defaults as PyTorch's), and builds the rule's per-step
// scalars. `t` is the 1-based count of applied (not skipped) steps.
#pragma once

#include <alloy/optim/rules/adamw.hpp>
#include <alloy/optim/rules/lion.hpp>
#include <alloy/optim/rules/sgd.hpp>
#include <alloy/optim/state.hpp>

#include <array>
#include <cmath>
#include <string_view>

namespace alloy {

template <class S = State<float>>
struct AdamW {
  static_assert(is_state_v<S>, "AdamW<S>: S must be State<fp32>, State<bf16> or State<q8>");
  using state = S;
  using rule_type = AdamWRule;
  static constexpr const char* name = "AdamW";
  static constexpr int slots = rule_type::slots;
  // Each state slot's name in checkpoints, as torch.optim.AdamW names it.
  static constexpr std::array<std::string_view, slots> state_names{"exp_avg", "exp_avg_sq"};
  struct Config {
    float lr = 1e-3f;
    float beta1 = 0.9f;
    float beta2 = 0.999f;
    float eps = 1e-8f;
    float weight_decay = 1e-2f;
    // Each setting with its name (checkpoints record them): f("lr", lr), ...
    template <class F>
    void for_each_field(F&& f) const {
      f("lr", lr);
      f("beta1", beta1);
      f("beta2", beta2);
      f("eps", eps);
      f("weight_decay", weight_decay);
    }
  };
  static rule_type rule(const Config& c, float lr, std::uint64_t t) {
    const double bias1 = 1.0 - std::pow(static_cast<double>(c.beta1), static_cast<double>(t));
    const double bias2 = 1.0 - std::pow(static_cast<double>(c.beta2), static_cast<double>(t));
    return {lr,
            c.beta1,
            c.beta2,
            c.eps,
            c.weight_decay,
            static_cast<float>(lr / bias1),
            static_cast<float>(1.0 / std::sqrt(bias2))};
  }
};

template <class S = State<float>>
struct SGD {
  static_assert(is_state_v<S>, "SGD<S>: S must be State<fp32>, State<bf16> or State<q8>");
  using state = S;
  using rule_type = SGDRule;
  static constexpr const char* name = "SGD";
  static constexpr int slots = rule_type::slots;
  static constexpr std::array<std::string_view, slots> state_names{"momentum_buffer"};  // as torch.optim.SGD
  struct Config {
    float lr = 1e-3f;
    float momentum = 0.0f;
    float dampening = 0.0f;
    float weight_decay = 0.0f;
    bool nesterov = false;
    template <class F>
    void for_each_field(F&& f) const {
      f("lr", lr);
      f("momentum", momentum);
      f("dampening", dampening);
      f("weight_decay", weight_decay);
      f("nesterov", nesterov);
    }
  };
  static rule_type rule(const Config& c, float lr, std::uint64_t t) {
    return {lr, c.momentum, c.dampening, c.weight_decay, c.nesterov, t == 1};
  }
};

template <class S = State<float>>
struct Lion {
  static_assert(is_state_v<S>, "Lion<S>: S must be State<fp32>, State<bf16> or State<q8>");
  using state = S;
  using rule_type = LionRule;
  static constexpr const char* name = "Lion";
  static constexpr int slots = rule_type::slots;
  static constexpr std::array<std::string_view, slots> state_names{"exp_avg"};  // as lion-pytorch
  struct Config {
    float lr = 1e-4f;
    float beta1 = 0.9f;
    float beta2 = 0.99f;
    float weight_decay = 0.0f;
    template <class F>
    void for_each_field(F&& f) const {
      f("lr", lr);
      f("beta1", beta1);
      f("beta2", beta2);
      f("weight_decay", weight_decay);
    }
  };
  static rule_type rule(const Config& c, float lr, std::uint64_t) { return {lr, c.beta1, c.beta2, c.weight_decay}; }
};

template <class S>
struct Adafactor;

template <class T>
inline constexpr bool is_optimizer_v = false;
template <class S>
inline constexpr bool is_optimizer_v<Adafactor<S>> = true;
template <class S>
inline constexpr bool is_optimizer_v<AdamW<S>> = true;
template <class S>
inline constexpr bool is_optimizer_v<SGD<S>> = true;
template <class S>
inline constexpr bool is_optimizer_v<Lion<S>> = true;

}  // namespace alloy
