// Loss scalers. The backward pass is seeded with `scale`, so gradients arrive multiplied by it;
// the optimizer step divides it out. The dynamic scaler's state machine is written once,
// host-and-device, and is the union of PyTorch GradScaler's and DeepSpeed's knobs.
#pragma once

#include <alloy/config.hpp>

#include <cstdint>

namespace alloy {

namespace detail {
inline constexpr float largest_float = 0x1.fffffep+127f;  // no <limits>: usable in device code as is
}  // namespace detail

// The defaults are GradScaler's (init 2^16, growth 2 every 2000 finite steps, backoff 0.5, no
// hysteresis) plus two bounds GradScaler does not have:
// - min_scale 1: backing off below it is an error (ScaleEvent::underflow), not a silent slide.
//   A scale that keeps falling means the gradients overflow at any scale (a diverged run, a
//   learning rate too high, bad data). Below 1 the scale shrinks gradients, small fp16 ones
//   flush to zero and steps apply next to nothing; GradScaler keeps halving into float's
//   denormals and to 0 (below 2^-128, 1/scale is infinite and every step is skipped): training
//   on nothing, unreported.
// - max_scale 2^24: growth stops there. GradScaler's only ceiling is float's largest value. A
//   run with no overflow for long (gradients that are zero or tiny, or bf16/tf32 compute, whose
//   range is float's, which alloy lets a dynamic scaler serve) doubles the scale every interval
//   up to 2^127, and then pays one skipped step per halving on the way back down.
// grad_scaler() drops both bounds: exactly torch.amp.GradScaler's update.
struct DynamicLossScaleConfig {
  float init_scale = 65536.0f;    // 2^16, as GradScaler
  float growth_factor = 2.0f;     // after growth_interval finite steps in a row, as GradScaler
  float backoff_factor = 0.5f;    // after `hysteresis` overflowing steps in a row, as GradScaler
  int growth_interval = 2000;     // as GradScaler
  int hysteresis = 1;             // consecutive overflows before backing off (DeepSpeed's delayed_shift)
  float min_scale = 1.0f;         // GradScaler: none (0). Backing off below it is an error
  float max_scale = 16777216.0f;  // GradScaler: none (float's largest). 2^24: growth stops here

  // Each setting with its name (checkpoints record them): f("init_scale", init_scale), ...
  template <class F>
  constexpr void for_each_field(F&& f) const {
    f("init_scale", init_scale);
    f("growth_factor", growth_factor);
    f("backoff_factor", backoff_factor);
    f("growth_interval", growth_interval);
    f("hysteresis", hysteresis);
    f("min_scale", min_scale);
    f("max_scale", max_scale);
  }

  // torch.amp.GradScaler's defaults and update rule (torch._amp_update_scale_): no lower bound,
  // so the scale may fall into denormals and to 0; growth only while the result is finite.
  //   Trainer tr(model, {.scaler = alloy::DynamicLossScaleConfig::grad_scaler()});  // scaler: DynamicLossScale
  static constexpr DynamicLossScaleConfig grad_scaler() noexcept {
    return {.init_scale = 65536.0f,
            .growth_factor = 2.0f,
            .backoff_factor = 0.5f,
            .growth_interval = 2000,
            .hysteresis = 1,
            .min_scale = 0.0f,
            .max_scale = detail::largest_float};
  }
};

// Where the scaler stands between steps. Part of a checkpoint.
struct LossScaleState {
  float scale = 1.0f;
  std::int32_t growth_tracker = 0;   // finite steps since the last change of scale or overflow
  std::int32_t hysteresis_left = 1;  // overflows still tolerated before backing off
  std::uint64_t overflows = 0;       // steps that found a non-finite gradient (all of them skipped)
};

enum class ScaleEvent : std::uint8_t {
  kept,        // finite step, scale unchanged
  grew,        // finite step that completed a growth interval
  tolerated,   // overflow absorbed by hysteresis: step skipped, scale unchanged
  backed_off,  // overflow: step skipped, scale multiplied by backoff_factor
  underflow,   // overflow, and backing off would go below min_scale: state unchanged, an error
};

// One step of the dynamic scaler given whether the step's gradients were all finite.
ALLOY_HOST_DEVICE constexpr ScaleEvent update_loss_scale(LossScaleState& s, const DynamicLossScaleConfig& c,
                                                         bool found_non_finite) noexcept {
  if (found_non_finite) {
    if (s.hysteresis_left > 1) {
      --s.hysteresis_left;
      ++s.overflows;
      s.growth_tracker = 0;
      return ScaleEvent::tolerated;
    }
    const float next = s.scale * c.backoff_factor;
    if (next < c.min_scale) return ScaleEvent::underflow;
    ++s.overflows;
    s.scale = next;
    s.growth_tracker = 0;
    s.hysteresis_left = c.hysteresis;
    return ScaleEvent::backed_off;
  }
  s.hysteresis_left = c.hysteresis;  // hysteresis counts consecutive overflows
  // Counted in 64 bits: a count at int32's limit (a checkpoint may hold one) must not overflow.
  const std::int64_t finite_steps = std::int64_t{s.growth_tracker} + 1;
  s.growth_tracker = static_cast<std::int32_t>(finite_steps);
  if (finite_steps >= c.growth_interval) {
    s.growth_tracker = 0;
    const float next = s.scale * c.growth_factor;
    // Never to infinity, whatever max_scale says (GradScaler's one bound).
    if (next <= c.max_scale && next <= detail::largest_float && next > s.scale) {
      s.scale = next;
      return ScaleEvent::grew;
    }
  }
  return ScaleEvent::kept;
}

inline constexpr LossScaleState initial_loss_scale_state(const DynamicLossScaleConfig& c) noexcept {
  LossScaleState s;
  s.scale = c.init_scale;
  s.hysteresis_left = c.hysteresis;
  return s;
}

// `s`, from a run under another configuration, brought within what a scaler configured by `c`
// can hold: at most c.hysteresis overflows left, a growth count below c.growth_interval (a count
// past it still grows at the next finite step), a scale within [min_scale, max_scale] (widened to
// init_scale). A run resumed under `c` continues from there.
inline constexpr LossScaleState fit_loss_scale_state(LossScaleState s, const DynamicLossScaleConfig& c) noexcept {
  if (s.hysteresis_left > c.hysteresis) s.hysteresis_left = c.hysteresis;
  if (s.growth_tracker >= c.growth_interval) s.growth_tracker = c.growth_interval > 0 ? c.growth_interval - 1 : 0;
  const float low = c.min_scale < c.init_scale ? c.min_scale : c.init_scale;
  const float high = c.max_scale > c.init_scale ? c.max_scale : c.init_scale;
  if (s.scale < low) s.scale = low;
  if (s.scale > high) s.scale = high;
  return s;
}

// No scaling: gradients come unscaled. Non-finite steps are still skipped and counted.
struct NoLossScale {
  static constexpr bool dynamic = false;
  static constexpr const char* name = "NoLossScale";
  struct Config {
    template <class F>
    constexpr void for_each_field(F&&) const {}  // no settings
  };
  static constexpr float initial_scale(const Config&) noexcept { return 1.0f; }
};

// A fixed scale S (a power of two keeps the unscaling exact).
template <float S>
struct StaticLossScale {
  static_assert(S > 0.0f, "StaticLossScale<S>: S must be positive");
  static constexpr bool dynamic = false;
  static constexpr const char* name = "StaticLossScale";
  static constexpr float scale = S;
  struct Config {
    template <class F>
    constexpr void for_each_field(F&&) const {}  // no settings
  };
  static constexpr float initial_scale(const Config&) noexcept { return S; }
};

// The scale grows after a run of finite steps and backs off after overflows. `Defaults` are the
// compile-time defaults of the runtime config:
//   DynamicLossScale<DynamicLossScaleConfig{.init_scale = 1024.0f, .hysteresis = 2}>
//   DynamicLossScale<DynamicLossScaleConfig::grad_scaler()>   // GradScaler's behaviour exactly
template <DynamicLossScaleConfig Defaults = DynamicLossScaleConfig{}>
struct DynamicLossScale {
  static_assert(Defaults.init_scale > 0.0f && Defaults.growth_factor >= 1.0f && Defaults.backoff_factor > 0.0f &&
                    Defaults.backoff_factor < 1.0f && Defaults.growth_interval > 0 && Defaults.hysteresis > 0 &&
                    Defaults.min_scale >= 0.0f && Defaults.max_scale >= Defaults.init_scale,
                "DynamicLossScale: needs init_scale > 0, growth_factor >= 1, 0 < backoff_factor < 1, "
                "growth_interval > 0, hysteresis > 0, 0 <= min_scale, init_scale <= max_scale");
  static constexpr bool dynamic = true;
  static constexpr const char* name = "DynamicLossScale";
  using Config = DynamicLossScaleConfig;
  static constexpr Config defaults = Defaults;
  static constexpr float initial_scale(const Config& c) noexcept { return c.init_scale; }
};

template <class T>
inline constexpr bool is_loss_scale_v = false;
template <>
inline constexpr bool is_loss_scale_v<NoLossScale> = true;
template <float S>
inline constexpr bool is_loss_scale_v<StaticLossScale<S>> = true;
template <DynamicLossScaleConfig C>
inline constexpr bool is_loss_scale_v<DynamicLossScale<C>> = true;

}  // namespace alloy
