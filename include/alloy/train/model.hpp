// The model contract, checked with concepts so a failure names the missing requirement.
//
// Level 1, a Model, owns its whole forward and backward:
//
//   struct MyModel {
//     using batch_type = ...;                                   // one micro-batch
//     void declare(alloy::ParamRegistry&);                      // name every parameter
//     template <class Ctx> float forward_backward(Ctx&, const batch_type&);
//   };
//
// forward_backward runs forward in the compute dtype, returns the micro-batch loss, and
// writes (or, when ctx.accumulate_grads(), adds) gradients of loss * ctx.loss_scale() into
// ctx.grad(...). That is enough for every policy but Checkpointing.
//
// The loss is a float or an alloy::Loss (backend/loss.hpp): a float the kernels left in device
// memory. Return a float computed on the GPU and the host waits for the forward pass before it
// can queue the backward; return the device Loss (nn::SoftmaxCrossEntropy does) and nothing
// waits: the trainer gathers the micro-batch losses on the device and reads them once, after the
// optimizer step, at the step's one synchronization.
//
// Level 2, a LayeredModel, shows the trainer its sequence of blocks, and the trainer runs them
// (train/recompute.hpp), so it can drop activations and recompute them under Checkpointing:
//
//   struct MyLayeredModel {
//     using batch_type = ...;
//     void declare(alloy::ParamRegistry&);
//     std::vector<MyBlock>& layers();                          // any random-access range of blocks
//     template <class Ctx> alloy::Activation<T> input(Ctx&, const batch_type&);    // before the blocks
//     template <class Ctx> std::pair<alloy::Loss, alloy::Activation<T>>            // after them: the loss
//         head(Ctx&, alloy::Activation<const T> y, const batch_type&);             // and d loss*scale / dy
//     template <class Ctx> void input_backward(Ctx&, alloy::Activation<const T> dx, const batch_type&);  // optional
//   };
//   struct MyBlock {
//     template <class Ctx> alloy::Activation<T> forward(Ctx&, alloy::Activation<const T> x);
//     template <class Ctx> alloy::Activation<T> backward(Ctx&, alloy::Activation<const T> dy);
//     template <class Ctx> void forward_for_backward(Ctx&, alloy::Activation<const T> x);  // optional
//   };
//
// T is Ctx::param_type, the compute-dtype storage. For each micro-batch the trainer runs
// input, the blocks forward, head, the blocks backward and input_backward when there is one.
// Blocks allocate what they keep for backward from ctx (the workspace) and write their
// parameter gradients as a Model does (through ctx.grad, in their backward: with DataParallel a
// block's gradients are reduced as soon as its backward returns, train/gradient_buckets.hpp). A
// LayeredModel needs no forward_backward; the trainer runs the layered path for it with or
// without Checkpointing, so both give the same bits.
// Under Checkpointing the last block of each recomputed segment runs forward_for_backward when
// it has one: forward's work that its backward reads, without the output nothing reads (the
// alloy::nn blocks skip their last product there; train/recompute.hpp).
#pragma once

#include <alloy/backend/loss.hpp>
#include <alloy/memory/activation.hpp>
#include <alloy/memory/registry.hpp>

#include <concepts>
#include <iterator>
#include <ranges>
#include <utility>

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

// The pieces of a LayeredModel, one concept each so the trainer can name what is missing.
template <class M>
concept has_layers = requires(M& m) {
  m.layers();
};

template <class M>
concept layers_are_a_range = has_layers<M> && requires(M& m) {
  requires std::ranges::random_access_range<decltype(m.layers())>;
  requires std::ranges::sized_range<decltype(m.layers())>;
};

template <class M>
using block_t = std::ranges::range_value_t<decltype(std::declval<M&>().layers())>;

template <class Block, class Ctx>
concept block_runs_forward = requires(Block& b, Ctx& ctx, Activation<const typename Ctx::param_type> x) {
  { b.forward(ctx, x) } -> std::convertible_to<Activation<const typename Ctx::param_type>>;
};

template <class Block, class Ctx>
concept block_runs_backward = requires(Block& b, Ctx& ctx, Activation<const typename Ctx::param_type> dy) {
  { b.backward(ctx, dy) } -> std::convertible_to<Activation<const typename Ctx::param_type>>;
};

// Every block of M's layers() runs forward / backward over Ctx (false when layers() is no range).
template <class M, class Ctx>
concept layer_blocks_run_forward = layers_are_a_range<M> && block_runs_forward<block_t<M>, Ctx>;
template <class M, class Ctx>
concept layer_blocks_run_backward = layers_are_a_range<M> && block_runs_backward<block_t<M>, Ctx>;

template <class M, class Ctx>
concept has_input = has_batch_type<M> && requires(M& m, Ctx& ctx, const typename M::batch_type& b) {
  { m.input(ctx, b) } -> std::convertible_to<Activation<const typename Ctx::param_type>>;
};

template <class M, class Ctx>
concept has_head = has_batch_type<M> &&
    requires(M& m, Ctx& ctx, Activation<const typename Ctx::param_type> y, const typename M::batch_type& b) {
  { m.head(ctx, y, b).first } -> std::convertible_to<float>;
  { m.head(ctx, y, b).second } -> std::convertible_to<Activation<const typename Ctx::param_type>>;
};

template <class M, class Ctx>
concept has_input_backward = has_batch_type<M> &&
    requires(M& m, Ctx& ctx, Activation<const typename Ctx::param_type> dx, const typename M::batch_type& b) {
  m.input_backward(ctx, dx, b);
};

// Optional, for either level: the micro-batch's host part, apart from its device work.
//
//   template <class Ctx> void stage(Ctx&, const batch_type&);
//
// stage checks the batch and uploads every byte of it that the device reads (through ctx's input
// pipeline: nn::upload_*, or ctx.uploads()->upload), keeping the device pointers for forward; the
// trainer calls it before each micro-batch's forward_backward (or input), with the same batch.
// Forward then uploads nothing. A batch value that reaches a launch other than through uploaded
// bytes (a count, a shape the upload sizes do not tell) is given to ctx.uploads()->note(value).
// That split is what Trainer::Config::graph needs: a step captured as a CUDA graph is replayed
// after stage() alone has run for the new batches, into the same input slots, as long as every
// upload's size and every noted value repeat. Trainer::run stages a step's batches while the step
// before is still on the device (launched, its decision not yet known): stage() checks, uploads
// and notes, and writes no memory that the previous step's device work may still read.
template <class M, class Ctx>
concept has_stage = has_batch_type<M> && requires(M& m, Ctx& ctx, const typename M::batch_type& b) {
  m.stage(ctx, b);
};

template <class M, class Ctx>
concept LayeredModel = has_batch_type<M> && declares_parameters<M> && layer_blocks_run_forward<M, Ctx> &&
    layer_blocks_run_backward<M, Ctx> && has_input<M, Ctx> && has_head<M, Ctx>;

}  // namespace alloy
