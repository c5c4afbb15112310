// The model contract, checked with concepts so a failure names the missing requirement.
//
//   struct MyModel {
//     using batch_type = ...;                                   // one micro-batch
//     void declare(alloy::ParamRegistry&);                      // name every parameter
//     template <class Ctx> float forward_backward(Ctx&, const batch_type&);
//   };
//
// forward_backward runs forward in the compute dtype, returns the micro-batch loss (fp32), and
// writes (or, when ctx.accumulate_grads(), adds) gradients of loss * ctx.loss_scale() into
// ctx.grad(...). That is enough for every policy but Checkpointing, which needs the trainer to
// see the model's blocks (a LayeredModel, with alloy/nn).
#pragma once

#include <alloy/memory/registry.hpp>

#include <concepts>

namespace alloy {

template <class M>
concept has_batch_type = requires {
  typename M::batch_type;
};

template <class M>
concept declares_parameters = requires(M& m, ParamRegistry& r) {
  m.declare(r);
};

template <class M, class Ctx>
concept runs_forward_backward = has_batch_type<M> && requires(M& m, Ctx& ctx, const typename M::batch_type& b) {
  { m.forward_backward(ctx, b) } -> std::convertible_to<float>;
};

template <class M, class Ctx>
concept Model = has_batch_type<M> && declares_parameters<M> && runs_forward_backward<M, Ctx>;

// Exposes its block sequence, so the trainer can drop and recompute activations.
template <class M>
concept LayeredModel = requires(M& m) {
  m.layers();
};

}  // namespace alloy
