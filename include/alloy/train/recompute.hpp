// Running a sequence of blocks forward and backward, with activation recomputation.
//
// A block is anything with
//   Activation<T> forward(Ctx&, Activation<const T> x);    // keeps in the workspace what backward needs
//   Activation<T> backward(Ctx&, Activation<const T> dy);  // writes its parameter gradients, returns dx
// and `blocks` is a random-access range of them (std::vector<Block>, std::span<Block>, ...).
//
// With every = 0 the blocks run one after the other and keep everything. With every = k the
// forward keeps only the input of every k-th block: each segment of k blocks runs, its output is
// copied into a fresh buffer and everything the segment allocated is released. Backward walks the
// segments from the last: it re-runs the segment's forward from its kept input (the same
// computation on the same inputs, so the same bits), runs the segment's backward, copies dx out
// and releases the segment again. Peak activation memory becomes the kept inputs plus one
// segment's activations; the cost is one more forward of every block.
//
// The trainer drives this for every LayeredModel (Checkpointing or not, so both paths share the
// code); alloy::nn::Repeated uses it for its own blocks. Blocks inside a recomputed segment see a
// context whose checkpoint_every() is 0: recomputation happens at the outermost level only.
#pragma once

#include <alloy/backend/algorithms.hpp>
#include <alloy/error.hpp>
#include <alloy/memory/activation.hpp>

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

namespace alloy {

namespace detail {

template <class T>
struct CopyActivation {
  ALLOY_HOST_DEVICE void operator()(const T& x, T& y) const { y = x; }
};

template <class Ctx, class T>
void copy_activation(Ctx& ctx, Activation<const T> from, T* to) {
  for_each_n(ctx.backend(), from.size(), CopyActivation<T>{}, in(from.data), out(to));
}

}  // namespace detail

// The inputs a recomputing forward kept for backward: one per segment.
struct KeptInputs {
  std::vector<Activation<void>> segments;  // typed by the blocks' value type when read
  std::size_t every = 0;
  std::size_t blocks = 0;
};

// Runs blocks[0..n) forward from x. With every > 0 records each segment's input in `kept`.
template <class Ctx, class Blocks, class T = typename Ctx::param_type>
Activation<T> forward_blocks(Ctx& ctx, Blocks&& blocks, Activation<const T> x, int every, KeptInputs& kept) {
  if (every < 0) throw error("forward_blocks: checkpoint spacing " + std::to_string(every) + " is negative");
  const std::size_t n = std::size(blocks), k = static_cast<std::size_t>(every);
  kept.segments.clear();
  kept.every = k;
  kept.blocks = n;
  Activation<T> y{const_cast<T*>(x.data), x.rows, x.cols};
  if (k == 0) {
    for (std::size_t i = 0; i < n; ++i) y = blocks[i].forward(ctx, Activation<const T>(y));
    return y;
  }
  auto inner = ctx.with_checkpoint_every(0);
  for (std::size_t first = 0; first < n; first += k) {
    kept.segments.push_back({y.data, y.rows, y.cols});
    // The segment's output outlives its activations: it goes into a buffer taken below them,
    // sized like the segment's input (blocks usually keep the shape).
    const Activation<T> slot{ctx.template allocate<T>(y.size()), y.rows, y.cols};
    const auto mark = ctx.workspace().mark();
    Activation<T> s = y;
    for (std::size_t i = first; i < std::min(first + k, n); ++i) s = blocks[i].forward(inner, Activation<const T>(s));
    if (s.size() <= slot.size()) {
      detail::copy_activation<Ctx, T>(ctx, Activation<const T>(s), slot.data);
      ctx.workspace().release(mark);
      y = {slot.data, s.rows, s.cols};
    } else {
      y = s;  // a segment that grows the activation keeps its own memory: correct, less saving
    }
  }
  return y;
}

// Runs blocks[n..0) backward from dy, recomputing each segment's forward when `kept` says so.
template <class Ctx, class Blocks, class T = typename Ctx::param_type>
Activation<T> backward_blocks(Ctx& ctx, Blocks&& blocks, Activation<const T> dy, const KeptInputs& kept) {
  const std::size_t n = std::size(blocks), k = kept.every;
  if (kept.blocks != n) {
    throw error("backward_blocks: forward ran " + std::to_string(kept.blocks) + " blocks, backward has " +
                std::to_string(n));
  }
  Activation<T> d{const_cast<T*>(dy.data), dy.rows, dy.cols};
  if (k == 0) {
    for (std::size_t i = n; i-- > 0;) d = blocks[i].backward(ctx, Activation<const T>(d));
    return d;
  }
  auto inner = ctx.with_checkpoint_every(0);
  for (std::size_t seg = kept.segments.size(); seg-- > 0;) {
    const std::size_t first = seg * k, last = std::min(first + k, n);
    const Activation<T> input{static_cast<T*>(kept.segments[seg].data), kept.segments[seg].rows,
                              kept.segments[seg].cols};
    const Activation<T> slot{ctx.template allocate<T>(input.size()), input.rows, input.cols};
    const auto mark = ctx.workspace().mark();
    Activation<T> y = input;
    for (std::size_t i = first; i < last; ++i) y = blocks[i].forward(inner, Activation<const T>(y));  // recompute
    Activation<T> g = d;
    for (std::size_t i = last; i-- > first;) g = blocks[i].backward(inner, Activation<const T>(g));
    if (g.size() <= slot.size()) {
      detail::copy_activation<Ctx, T>(ctx, Activation<const T>(g), slot.data);
      ctx.workspace().release(mark);
      d = {slot.data, g.rows, g.cols};
    } else {
      d = g;
    }
  }
  return d;
}

// One micro-batch of a LayeredModel (train/model.hpp): input, the blocks forward (keeping every
// `every`-th block's input when every > 0), head (the loss and its gradient), the blocks
// backward, and input_backward when the model has one. Returns the loss. The trainer calls
// this; a model may call it from its own forward_backward too.
template <class M, class Ctx>
float run_layered(Ctx& ctx, M& model, const typename M::batch_type& batch, int every, KeptInputs& kept) {
  using T = typename Ctx::param_type;
  const Activation<const T> x = model.input(ctx, batch);
  const Activation<T> y = forward_blocks(ctx, model.layers(), x, every, kept);
  const auto [loss, dy] = model.head(ctx, Activation<const T>(y), batch);
  const Activation<T> dx = backward_blocks(ctx, model.layers(), Activation<const T>(dy), kept);
  if constexpr (requires { model.input_backward(ctx, Activation<const T>(dx), batch); }) {
    model.input_backward(ctx, Activation<const T>(dx), batch);
  }
  return static_cast<float>(loss);
}

}  // namespace alloy
