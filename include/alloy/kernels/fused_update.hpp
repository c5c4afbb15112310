// Pass 2 of the optimizer step: one pass over every arena. Per element: unscale and clip the
// gradient (one multiply by grad_mult), apply the optimizer rule to the fp32 parameter (the
// master copy, or the widened compute parameter when there is none) and its state, write the
// parameter, the state and the compute copy (round to nearest even, or stochastic), and, with
// ClearGrad, clear the gradient accumulator (only for a caller-owned accumulator: on the
// trainer's path the next step's first micro-batch overwrites it, train/optimizer_step.hpp).
// q8 state has its own kernel (fused_update_q8.hpp). With a decision made on the device
// (UpdateScalars::decision, kernels/step_decision.hpp), the launch reads grad_mult from it and,
// for a skipped step, returns before touching any arena.
// Bytes per element (Precision<bf16, fp32_master> + AdamW<State<fp32>>): read grad 2, master 4,
// m 4, v 4; write master 4, m 4, v 4, param 2: 28 (30 reading an fp32 accumulator, 34 clearing it).
#pragma once

#include <alloy/backend/algorithms.hpp>
#include <alloy/error.hpp>
#include <alloy/kernels/step_decision.hpp>
#include <alloy/memory/layout.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/rounding.hpp>
#include <alloy/optim/random_stream.hpp>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

namespace alloy::detail {

// What changes from one step to the next in a pass-2 launch: the rule's scalars (the learning
// rate, the bias corrections of step t) and the first random index.
template <class Rule>
struct StepVarying {
  Rule rule;
  std::uint64_t stream;
};

// Everything one pass-2 launch needs besides the arenas.
template <class Rule>
struct UpdateScalars {
  Rule rule;
  float grad_mult;         // inv_scale * clip coefficient
  std::uint64_t seed;      // for stochastic rounding
  std::uint64_t stream;    // first random index of this step: step * padded elements
  bool stochastic_params;  // round the compute copy stochastically
  // Null: apply the step with grad_mult. Otherwise the step's decision, in the backend's memory
  // (device memory on Cuda): its grad_mult replaces the one above, and skip leaves every arena
  // bit-identical (the gradient accumulator is not cleared either).
  const StepDecision* decision = nullptr;
  // Null: rule and stream as above. Otherwise this step's, in the backend's memory, read by the
  // launch in their place (OptimizerStep's device path: a step replayed from a CUDA graph keeps
  // its launch arguments, so what changes every step is read where the host wrote it).
  const StepVarying<Rule>* varying = nullptr;
};

// The scalars a launch behind a decision uses: the decision's grad_mult and the step's varying
// part where they are given. False: the decision skips the step.
template <class Rule>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE bool take_step_scalars(UpdateScalars<Rule>& s) {
  if (s.decision) {
    const StepDecision d = *s.decision;
    if (d.skip) return false;
    s.grad_mult = d.grad_mult;
  }
  if (s.varying) {
    s.rule = s.varying->rule;
    s.stream = s.varying->stream;
  }
  return true;
}

// State values in fp32 or bf16 (bf16 written with stochastic rounding).
template <class S>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE S encode_state(float x, std::uint32_t bits) {
  if constexpr (std::is_same_v<S, float>) {
    return x;
  } else {
    return round_stochastic<S>(x, bits);
  }
}

// The per-element update for unquantized state. With a master copy the call is
// f(i, grad, master, param, state...); without, f(i, grad, param, state...).
template <class Rule, class Param, class Grad, class StateT, bool HasMaster, bool ClearGrad>
struct FusedUpdate {
  UpdateScalars<Rule> s;
  const BlockScales* blocks;

  template <class G, class... St>
  ALLOY_HOST_DEVICE void apply(std::size_t i, G& grad, float& p, Param& param, St&... state) const {
    const float g = fp::mul(to_float(grad), s.grad_mult);
    if constexpr (ClearGrad) grad = round_nearest<Grad>(0.0f);
    float values[sizeof...(St) > 0 ? sizeof...(St) : 1] = {to_float(state)...};
    s.rule(g, p, values, blocks[i / block_scales_granularity]);
    param = round_to<Param>(p, s.stochastic_params, update_bits(s.seed, s.stream, i, 0));
    StateT* refs[] = {&state...};
    ALLOY_UNROLL
    for (int k = 0; k < int(sizeof...(St)); ++k) {
      *refs[k] = encode_state<StateT>(values[k], update_bits(s.seed, s.stream, i, 1 + k));
    }
  }

  template <class G, class... St>
  requires HasMaster ALLOY_HOST_DEVICE void operator()(std::size_t i, G& grad, float& master, Param& param,
                                                       St&... state) const {
    apply(i, grad, master, param, state...);
  }

  template <class G, class... St>
  requires(!HasMaster) ALLOY_HOST_DEVICE void operator()(std::size_t i, G& grad, Param& param, St&... state) const {
    float p = to_float(param);
    apply(i, grad, p, param, state...);
  }
};

// The arenas of one store, as raw pointers.
template <class Param, class Grad, class StateStorage, int Slots>
struct UpdateArenas {
  std::size_t n = 0;  // padded elements
  Param* params = nullptr;
  Grad* grads = nullptr;    // what the optimizer reads: the accumulator when there is one
  float* master = nullptr;  // null without a master copy
  StateStorage* state[Slots] = {};
  float* absmax[Slots] = {};  // q8 only: one scale per quantization block
  const BlockScales* blocks = nullptr;
};

template <class Arenas, std::size_t... K>
auto state_access(const Arenas& a, std::index_sequence<K...>) {
  return std::make_tuple(inout(a.state[K])...);
}

#if ALLOY_HAS_CUDA_KERNELS

// for_each_indexed_n's kernel with one vector in flight per thread, behind the device's
// decision: a skipped step returns before reading anything. (Returning from inside the functor
// would not do: with a master copy the compute copy is an `out` array, never loaded, so its
// lanes would be stored unset.) Per element it reads and writes what for_each_indexed_n would,
// plus the 8-byte decision once per thread.
template <int L, class F, class... W>
__global__ void __launch_bounds__(cuda_block) decided_update_kernel(std::size_t n, F f, W... w) {
  if (!take_step_scalars(f.s)) return;
  using Seq = std::index_sequence_for<W...>;
  const std::size_t vectors = n / L;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t v = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; v < vectors; v += stride) {
    LaneTuple<L, W...> r;
    load_all<L>(r, v * L, Seq{}, w...);
    apply_lanes<L, true>(f, v * L, r, Seq{});
    store_all<L>(r, v * L, Seq{}, w...);
  }
  for (std::size_t i = vectors * L + std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    apply_scalar<true>(f, i, w...);
  }
}

template <class F, class... W>
void launch_decided_update(Cuda be, std::size_t n, F f, W... w) {
  if (n == 0) return;
  constexpr int L = vector_lanes<W...>();
  if (L > 1 && all_aligned(16, w...)) {
    decided_update_kernel<L><<<grid_for(n / L), cuda_block, 0, be.stream>>>(n, f, w...);
  } else {
    decided_update_kernel<1><<<grid_for(n), cuda_block, 0, be.stream>>>(n, f, w...);
  }
  ALLOY_CUDA_CHECK_LAUNCH();
}

#endif  // ALLOY_HAS_CUDA_KERNELS

// What a caller of fused_update_as knows at compile time about UpdateScalars::decision: only
// the paths it can take are instantiated (on Cuda each is two kernels, vector and scalar).
enum class UpdateDecision {
  at_run_time,  // either: the pointer decides
  none,         // always null: the update applies grad_mult
  on_device,    // never null: the update reads the decision (OptimizerStep's device path)
};

// f over the arenas, as the scalars' decision says (see UpdateScalars::decision). One vector in
// flight per thread: 5 to 6 arrays of 8 lanes already keep enough bytes in flight.
template <UpdateDecision D = UpdateDecision::at_run_time, class B, class F, class... W>
void run_update(B be, std::size_t n, F f, W... w) {
  if constexpr (D != UpdateDecision::none) {
    if (f.s.decision) {
      if constexpr (std::is_same_v<B, Host>) {
        if (!take_step_scalars(f.s)) return;
      } else {
#if ALLOY_HAS_CUDA_KERNELS
        launch_decided_update(be, n, f, w...);
#endif
        return;
      }
    } else if constexpr (D == UpdateDecision::on_device) {
      throw error("fused_update: UpdateDecision::on_device without a decision");
    }
  }
  // The Cuda path behind a decision returned above: only Host reaches here with one.
  if constexpr (D != UpdateDecision::on_device || std::is_same_v<B, Host>) {
    for_each_indexed_n<1>(be, n, f, w...);
  }
}

// Pass 2 for fp32 and bf16 state on either backend, for a caller that knows whether the arenas
// have a master copy (a.master non-null: HasMaster) and what the scalars' decision is (D).
template <bool ClearGrad, bool HasMaster, UpdateDecision D, class B, class Rule, class Param, class Grad, class StateT,
          int Slots>
void fused_update_as(B be, const UpdateArenas<Param, Grad, StateT, Slots>& a, const UpdateScalars<Rule>& s) {
  const auto states = state_access(a, std::make_index_sequence<Slots>{});
  const auto grads = [&] {
    if constexpr (ClearGrad)
      return inout(a.grads);
    else
      return in(static_cast<const Grad*>(a.grads));
  }();
  std::apply(
      [&](auto... st) {
        FusedUpdate<Rule, Param, Grad, StateT, HasMaster, ClearGrad> f{s, a.blocks};
        if constexpr (HasMaster) {
          run_update<D>(be, a.n, f, grads, inout(a.master), out(a.params), st...);
        } else {
          run_update<D>(be, a.n, f, grads, inout(a.params), st...);
        }
      },
      states);
}

// Pass 2 for fp32 and bf16 state on either backend: a master copy where a.master is non-null,
// the decision where s.decision is.
template <bool ClearGrad, class B, class Rule, class Param, class Grad, class StateT, int Slots>
void fused_update(B be, const UpdateArenas<Param, Grad, StateT, Slots>& a, const UpdateScalars<Rule>& s) {
  if (a.master) {
    fused_update_as<ClearGrad, true, UpdateDecision::at_run_time>(be, a, s);
  } else {
    fused_update_as<ClearGrad, false, UpdateDecision::at_run_time>(be, a, s);
  }
}

}  // namespace alloy::detail
