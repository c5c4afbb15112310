// Running a sequence of blocks forward and backward, with activation recomputation.
//
// A block is anything with
//   Activation<T> forward(Ctx&, Activation<const T> x);    // keeps in the workspace what backward needs
//   Activation<T> backward(Ctx&, Activation<const T> dy);  // writes its parameter gradients, returns dx
// and `blocks` is a random-access range of them (std::vector<Block>, std::span<Block>, ...).
//
// With every = 0 the blocks run one after the other and keep everything. With every = k the
// forward keeps only the input of every k-th block: each segment of k blocks runs, its output is
// copied down to where the segment began and everything else it allocated is released. Backward walks the
// segments from the last: it re-runs the segment's forward from its kept input (the same
// computation on the same inputs, so the same bits), runs the segment's backward, copies dx out
// and releases the segment again. Peak activation memory becomes the kept inputs plus one
// segment's activations; the cost is one more forward of every block.
//
// A block may also offer
//   void forward_for_backward(Ctx&, Activation<const T> x);  // what backward needs, no output
// and then the recomputation of a segment's last block calls it instead of forward: nothing reads
// that block's output in backward (nn::Residual<nn::Sequential<..., Linear, Gelu, Linear>> skips
// its last product, half of the block's forward). It must keep for backward exactly what forward
// keeps, computed the same way, so the gradients keep their bits.
//
// The trainer drives this for every LayeredModel (Checkpointing or not, so both paths share the
// code); alloy::nn::Repeated uses it for its own blocks. Blocks inside a recomputed segment see a
// context whose checkpoint_every() is 0: recomputation happens at the outermost level only.
#pragma once

#include <alloy/backend/algorithms.hpp>
#include <alloy/backend/loss.hpp>
#include <alloy/error.hpp>
#include <alloy/memory/activation.hpp>
#include <alloy/memory/workspace.hpp>
#include <alloy/train/backward_observer.hpp>

#include <algorithm>
#include <cstddef>
#include <string>
#include <type_traits>
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

// Releases the workspace down to `mark` and copies `a` to the bottom of the freed space, so that
// `a` alone is left above the mark. `a` as it is when it lies below the mark already (everything
// above the mark released), when there is no mark, or when it starts at the mark itself (nothing
// to copy). When `a` overlaps the bottom of the freed space it goes through a temporary above it.
template <class Ctx, class T>
Activation<T> move_down(Ctx& ctx, Activation<T> a, const WorkspaceMark* mark) {
  if (mark == nullptr) return a;
  auto& ws = ctx.workspace();
  if (ws.keeps(*mark, a.data, a.size() * sizeof(T))) {
    ws.release(*mark);
    return a;
  }
  const auto top = ws.mark();
  ws.release(*mark);
  T* slot = ctx.template allocate<T>(a.size());
  if (slot == a.data) return a;  // the allocation at the mark is a's own: nothing to copy
  const auto* from = reinterpret_cast<const std::byte*>(a.data);
  const auto* to = reinterpret_cast<const std::byte*>(slot);
  const std::size_t bytes = a.size() * sizeof(T);
  if (to < from + bytes && from < to + bytes) {
    ws.release(top);
    T* temporary = ctx.template allocate<T>(a.size());
    copy_activation<Ctx, T>(ctx, Activation<const T>(a), temporary);
    ws.release(*mark);
    slot = ctx.template allocate<T>(a.size());
    copy_activation<Ctx, T>(ctx, Activation<const T>{temporary, a.rows, a.cols}, slot);
    return {slot, a.rows, a.cols};
  }
  copy_activation<Ctx, T>(ctx, Activation<const T>(a), slot);
  return {slot, a.rows, a.cols};
}

}  // namespace detail

// The inputs a recomputing forward kept for backward: one per segment. Without recomputation,
// the workspace position where each block's forward began, so backward can give back a block's
// activations and temporaries as soon as the block is done.
struct KeptInputs {
  std::vector<Activation<void>> segments;  // typed by the blocks' value type when read
  std::vector<WorkspaceMark> block_marks;
  std::size_t every = 0;
  std::size_t blocks = 0;
};

namespace detail {

// Recomputes blocks[first, last) from x for their backward: the last through forward_for_backward
// when it has one.
template <class Ctx, class Blocks, class T>
void recompute_segment(Ctx& ctx, Blocks&& blocks, std::size_t first, std::size_t last, Activation<T> y) {
  for (std::size_t i = first; i + 1 < last; ++i) y = blocks[i].forward(ctx, Activation<const T>(y));
  auto& block = blocks[last - 1];
  if constexpr (requires { block.forward_for_backward(ctx, Activation<const T>(y)); }) {
    block.forward_for_backward(ctx, Activation<const T>(y));
  } else {
    (void)block.forward(ctx, Activation<const T>(y));
  }
}

}  // namespace detail

template <class Ctx>
inline constexpr bool keeps_device_loss =
#if ALLOY_HAS_CUDA_RUNTIME
    std::is_same_v<typename Ctx::backend_type, Cuda>;
#else
    false;
#endif

// Runs blocks[0..n) forward from x. With every > 0 records each segment's input in `kept`.
template <class Ctx, class Blocks, class T = typename Ctx::param_type>
Activation<T> forward_blocks(Ctx& ctx, Blocks&& blocks, Activation<const T> x, int every, KeptInputs& kept) {
  if (every < 0) throw error("forward_blocks: checkpoint spacing " + std::to_string(every) + " is negative");
  const std::size_t n = std::size(blocks), k = static_cast<std::size_t>(every);
  kept.segments.clear();
  kept.block_marks.clear();
  kept.every = k;
  kept.blocks = n;
  Activation<T> y{const_cast<T*>(x.data), x.rows, x.cols};
  if (k == 0) {
    for (std::size_t i = 0; i < n; ++i) {
      kept.block_marks.push_back(ctx.workspace().mark());
      y = blocks[i].forward(ctx, Activation<const T>(y));
    }
    return y;
  }
  auto inner = ctx.with_checkpoint_every(0);
  for (std::size_t first = 0; first < n; first += k) {
    kept.segments.push_back({y.data, y.rows, y.cols});
    const auto mark = ctx.workspace().mark();
    kept.block_marks.push_back(mark);
    Activation<T> s = y;
    for (std::size_t i = first; i < std::min(first + k, n); ++i) s = blocks[i].forward(inner, Activation<const T>(s));
    // The segment's output outlives its activations: it moves down to where the segment began
    // and the rest is given back. No buffer is taken for it before the segment runs, so the
    // forward's peak is the kept outputs plus one segment's activations, the output among them.
    y = detail::move_down(ctx, s, &mark);
  }
  return y;
}

// Runs blocks[n..0) backward from dy, recomputing each segment's forward when `kept` says so.
// `outermost`: nothing the caller allocated after the blocks' forward (dy included) is needed once
// this returns, so without recomputation each block's memory is given back as soon as its
// backward is done (run_layered says so; a block sequence nested in a layer, whose caller may
// still read dy, must not).
template <class Ctx, class Blocks, class T = typename Ctx::param_type>
Activation<T> backward_blocks(Ctx& ctx, Blocks&& blocks, Activation<const T> dy, const KeptInputs& kept,
                              bool outermost = false) {
  const std::size_t n = std::size(blocks), k = kept.every;
  if (kept.blocks != n) {
    throw error("backward_blocks: forward ran " + std::to_string(kept.blocks) + " blocks, backward has " +
                std::to_string(n));
  }
  Activation<T> d{const_cast<T*>(dy.data), dy.rows, dy.cols};
  // The outermost blocks' backward is reported to the trainer's observer, if any: once block i's
  // backward returns, its parameter gradients of this micro-batch are final.
  BackwardObserver* const observer = outermost ? detail::backward_observer_of(ctx) : nullptr;
  auto backward = [&](auto& c, std::size_t i, Activation<T> g) {
    if (observer) observer->block_backward_begin(i);
    g = blocks[i].backward(c, Activation<const T>(g));
    if (observer) observer->block_backward_end(i);
    return g;
  };
  if (k == 0) {
    // Memory by liveness: once block i's backward is done, nothing above where its forward began
    // is needed but its dx (the blocks below kept their own activations below that point, and
    // the head's are consumed). dx moves down to that point, the rest is given back, and the next
    // block's backward reuses it: the peak is the forward's activations plus one block's
    // backward, not every block's backward on top of each other.
    for (std::size_t i = n; i-- > 0;) {
      const Activation<T> g = backward(ctx, i, d);
      d = detail::move_down(ctx, g, outermost && kept.block_marks.size() == n ? &kept.block_marks[i] : nullptr);
    }
    return d;
  }
  auto inner = ctx.with_checkpoint_every(0);
  for (std::size_t seg = kept.segments.size(); seg-- > 0;) {
    const std::size_t first = seg * k, last = std::min(first + k, n);
    const Activation<T> input{static_cast<T*>(kept.segments[seg].data), kept.segments[seg].rows,
                              kept.segments[seg].cols};
    if (outermost && kept.block_marks.size() == kept.segments.size()) {
      // As without recomputation: once the segment is done, everything from where its forward
      // output was kept is dead but its dx, which moves down there.
      detail::recompute_segment(inner, blocks, first, last, input);
      Activation<T> g = d;
      for (std::size_t i = last; i-- > first;) g = backward(inner, i, g);
      d = detail::move_down(ctx, g, &kept.block_marks[seg]);
      continue;
    }
    const Activation<T> slot{ctx.template allocate<T>(input.size()), input.rows, input.cols};
    const auto mark = ctx.workspace().mark();
    detail::recompute_segment(inner, blocks, first, last, input);
    Activation<T> g = d;
    for (std::size_t i = last; i-- > first;) g = backward(inner, i, g);
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
// backward, and input_backward when the model has one. Returns the loss as head() gave it (on
// the device when head left it there). The trainer calls this; a model may call it from its own
// forward_backward too.
template <class M, class Ctx>
Loss run_layered(Ctx& ctx, M& model, const typename M::batch_type& batch, int every, KeptInputs& kept) {
  using T = typename Ctx::param_type;
  // A loss head() leaves on the device lives in the head's workspace, which backward gives back:
  // it is copied here, below everything the blocks allocate.
  [[maybe_unused]] float* const loss_slot = keeps_device_loss<Ctx> ? ctx.template allocate<float>(1) : nullptr;
  const Activation<const T> x = model.input(ctx, batch);
  const Activation<T> y = forward_blocks(ctx, model.layers(), x, every, kept);
  const WorkspaceMark head_mark = ctx.workspace().mark();
  const auto [head_loss, head_dy] = model.head(ctx, Activation<const T>(y), batch);
  Loss loss(head_loss);
#if ALLOY_HAS_CUDA_RUNTIME
  if constexpr (keeps_device_loss<Ctx>) {
    if (loss.on_device()) {
      ALLOY_CUDA_CHECK(cudaMemcpyAsync(loss_slot, loss.device_pointer(), sizeof(float), cudaMemcpyDeviceToDevice,
                                       ctx.backend().stream));
      loss = Loss(loss_slot, ctx.backend().stream);
    }
  }
#endif
  // Nothing the head allocated is read once it has returned dy: dy moves down to where the head
  // began, and the blocks' backward reuses the rest. With recomputation the head's input, the
  // last segment's kept output, is dead too: dy moves down to where that was kept.
  const WorkspaceMark* dead = every > 0 && !kept.block_marks.empty() ? &kept.block_marks.back() : &head_mark;
  const Activation<T> dy =
      detail::move_down(ctx, Activation<T>{const_cast<T*>(head_dy.data), head_dy.rows, head_dy.cols}, dead);
  const Activation<T> dx = backward_blocks(ctx, model.layers(), Activation<const T>(dy), kept, true);
  if constexpr (requires { model.input_backward(ctx, Activation<const T>(dx), batch); }) {
    model.input_backward(ctx, Activation<const T>(dx), batch);
  }
  return loss;
}

}  // namespace alloy
