// Precision<Compute, Master, Scaler, GradAccum>: the dtypes of a training step.
//   Compute   fp32, tf32, fp16 or bf16: parameters and gradients as the model sees them.
//   Master    fp32_master (an fp32 copy the optimizer updates) or no_master (the optimizer
//             updates the compute parameters directly; stochastic rounding recommended).
//   Scaler    NoLossScale, StaticLossScale<S>, DynamicLossScale<...>; default: dynamic for
//             fp16, none otherwise. Any scaler works with any Compute.
//   GradAccum the dtype micro-batch gradients are summed in: default_accumulation (fp32 when
//             more than one micro-batch is accumulated, else the compute dtype), or a dtype.
#pragma once

#include <alloy/numeric/traits.hpp>
#include <alloy/precision/loss_scale.hpp>

#include <type_traits>

namespace alloy {

struct fp32_master {
  static constexpr bool enabled = true;
};
struct no_master {
  static constexpr bool enabled = false;
};
struct default_accumulation {};

// Rounding of values written to a narrower dtype (parameters without master, bf16 state).
enum class Rounding : std::uint8_t { nearest_even, stochastic };

namespace detail {
template <class C>
using default_scaler_t = std::conditional_t<std::is_same_v<C, fp16>, DynamicLossScale<>, NoLossScale>;
template <class GradAccum, class Compute>
constexpr bool accumulation_wide_enough() {
  if constexpr (std::is_same_v<GradAccum, default_accumulation>) {
    return true;
  } else {
    return numeric_traits<GradAccum>::bytes >= numeric_traits<Compute>::bytes;
  }
}
}  // namespace detail

template <class Compute, class Master = no_master, class Scaler = detail::default_scaler_t<Compute>,
          class GradAccum = default_accumulation>
struct Precision {
  static_assert(floating_dtype<Compute>, "Precision<Compute>: Compute must be fp32, tf32, fp16 or bf16");
  static_assert(std::is_same_v<Master, fp32_master> || std::is_same_v<Master, no_master>,
                "Precision<Compute, Master>: Master must be fp32_master or no_master (a master copy narrower than "
                "fp32 would hold fewer bits than the compute dtype can update)");
  static_assert(is_loss_scale_v<Scaler>,
                "Precision<Compute, Master, Scaler>: Scaler must be NoLossScale, StaticLossScale<S> or "
                "DynamicLossScale<...>");
  static_assert(std::is_same_v<GradAccum, default_accumulation> || floating_dtype<GradAccum>,
                "Precision<..., GradAccum>: GradAccum must be default_accumulation, fp32, fp16 or bf16");
  static_assert(detail::accumulation_wide_enough<GradAccum, Compute>(),
                "Precision<..., GradAccum>: accumulating gradients narrower than the compute dtype loses bits; use "
                "fp32");

  using compute_type = Compute;
  using param_type = storage_t<Compute>;  // what the arena stores: float for tf32
  using master_policy = Master;
  using scaler_type = Scaler;
  using grad_accum_policy = GradAccum;
  static constexpr bool has_master = Master::enabled;
};

template <class T>
inline constexpr bool is_precision_v = false;
template <class C, class M, class S, class G>
inline constexpr bool is_precision_v<Precision<C, M, S, G>> = true;

// The gradient accumulator's dtype for a precision and a micro-batch count: void when
// gradients are used as the model wrote them (no separate accumulator).
template <class P, int MicroBatches>
using grad_accumulator_t = std::conditional_t<
    std::is_same_v<typename P::grad_accum_policy, default_accumulation>,
    std::conditional_t<(MicroBatches > 1 && numeric_traits<typename P::compute_type>::bytes < 4), float, void>,
    std::conditional_t<std::is_same_v<storage_t<typename P::grad_accum_policy>, typename P::param_type>, void,
                       storage_t<typename P::grad_accum_policy>>>;

}  // namespace alloy
