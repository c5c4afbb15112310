// Learning-rate schedules: constant, or linear warmup followed by linear or cosine decay to a
// floor. A value type; lr_at(step) is a pure function of the 0-based step index.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace alloy {

struct LrSchedule {
  enum class Decay : std::uint8_t { constant, linear, cosine };
  float peak_lr = 1e-3f;
  std::uint64_t warmup_steps = 0;  // linear from peak_lr / warmup_steps up to peak_lr
  std::uint64_t total_steps = 0;   // decay reaches min_lr here (linear and cosine)
  float min_lr = 0.0f;
  Decay decay = Decay::constant;

  // Each setting with its name (checkpoints record them): f("peak_lr", peak_lr), ...
  template <class F>
  void for_each_field(F&& f) const {
    f("decay", decay);
    f("peak_lr", peak_lr);
    f("warmup_steps", warmup_steps);
    f("total_steps", total_steps);
    f("min_lr", min_lr);
  }

  static LrSchedule constant(float lr) { return {lr, 0, 0, lr, Decay::constant}; }
  static LrSchedule warmup_linear(float peak, std::uint64_t warmup, std::uint64_t total, float floor = 0.0f) {
    return {peak, warmup, total, floor, Decay::linear};
  }
  static LrSchedule warmup_cosine(float peak, std::uint64_t warmup, std::uint64_t total, float floor = 0.0f) {
    return {peak, warmup, total, floor, Decay::cosine};
  }

  float lr_at(std::uint64_t step) const {
    if (step < warmup_steps) return peak_lr * static_cast<float>(step + 1) / static_cast<float>(warmup_steps);
    if (decay == Decay::constant || total_steps <= warmup_steps) return peak_lr;
    if (step >= total_steps) return min_lr;
    const double progress = static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps);
    const double shape = decay == Decay::linear ? 1.0 - progress : 0.5 * (1.0 + std::cos(3.141592653589793 * progress));
    return static_cast<float>(min_lr + (peak_lr - min_lr) * shape);
  }
};

}  // namespace alloy
