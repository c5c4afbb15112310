// Containers: Sequential<Layers...> runs its layers in order; Residual<Block> adds its input to
// its block's output; Repeated<Block> holds n blocks of one type and runs them through
// train/recompute.hpp: with ctx.checkpoint_every() = k it keeps only the input of every k-th
// block during forward and re-runs each segment's forward inside backward, bit-identical to
// keeping everything. A LayeredModel usually hands the trainer repeated.blocks() as its layers().
#pragma once

#include <alloy/memory/registry.hpp>
#include <alloy/nn/activation.hpp>
#include <alloy/train/recompute.hpp>

#include <tuple>
#include <utility>
#include <vector>

namespace alloy::nn {

template <class... Layers>
class Sequential {
 public:
  explicit Sequential(Layers... layers) : layers_(std::move(layers)...) {}

  void declare(ParamRegistry& r) {
    std::apply([&](auto&... l) { (l.declare(r), ...); }, layers_);
  }
  std::size_t out_features(std::size_t in) const {
    std::apply([&](const auto&... l) { ((in = l.out_features(in)), ...); }, layers_);
    return in;
  }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> forward(Ctx& ctx, Activation<const detail::value_t<Ctx>> x) {
    Activation<detail::value_t<Ctx>> y{const_cast<detail::value_t<Ctx>*>(x.data), x.rows, x.cols};
    std::apply([&](auto&... l) { ((y = l.forward(ctx, y)), ...); }, layers_);
    return y;
  }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy) {
    Activation<detail::value_t<Ctx>> d{const_cast<detail::value_t<Ctx>*>(dy.data), dy.rows, dy.cols};
    backward_from<sizeof...(Layers)>(ctx, d);
    return d;
  }

  template <std::size_t I>
  auto& layer() {
    return std::get<I>(layers_);
  }

 private:
  template <std::size_t I, class Ctx, class A>
  void backward_from(Ctx& ctx, A& d) {
    if constexpr (I > 0) {
      d = std::get<I - 1>(layers_).backward(ctx, d);
      backward_from<I - 1>(ctx, d);
    }
  }

  std::tuple<Layers...> layers_;
};

template <class Block>
class Residual {
 public:
  explicit Residual(Block block) : block_(std::move(block)) {}

  void declare(ParamRegistry& r) { block_.declare(r); }
  std::size_t out_features(std::size_t in) const { return in; }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> forward(Ctx& ctx, Activation<const detail::value_t<Ctx>> x) {
    using T = detail::value_t<Ctx>;
    const auto inner = block_.forward(ctx, x);
    detail::check_width("Residual", "block", x.cols, inner.cols);
    auto y = detail::allocate(ctx, x.rows, x.cols);
    for_each_n(ctx.backend(), x.size(), detail::AddElements<T>{}, in(x.data), in(static_cast<const T*>(inner.data)),
               out(y.data));
    return y;
  }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy) {
    using T = detail::value_t<Ctx>;
    const auto inner = block_.backward(ctx, dy);
    auto dx = detail::allocate(ctx, dy.rows, dy.cols);
    for_each_n(ctx.backend(), dy.size(), detail::AddElements<T>{}, in(dy.data), in(static_cast<const T*>(inner.data)),
               out(dx.data));
    return dx;
  }

  Block& block() noexcept { return block_; }

 private:
  Block block_;
};

// n blocks of one type that keep the feature count (transformer or residual-MLP blocks).
template <class Block>
class Repeated {
 public:
  explicit Repeated(std::vector<Block> blocks) : blocks_(std::move(blocks)) {}

  void declare(ParamRegistry& r) {
    for (auto& b : blocks_) b.declare(r);
  }
  std::size_t out_features(std::size_t in) const { return in; }
  std::size_t size() const noexcept { return blocks_.size(); }
  Block& operator[](std::size_t i) { return blocks_[i]; }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> forward(Ctx& ctx, Activation<const detail::value_t<Ctx>> x) {
    return forward_blocks(ctx, blocks_, x, ctx.checkpoint_every(), kept_);
  }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy) {
    return backward_blocks(ctx, blocks_, dy, kept_);
  }

  // The blocks, for a LayeredModel whose layers() they are (the trainer then runs them).
  std::vector<Block>& blocks() noexcept { return blocks_; }

 private:
  std::vector<Block> blocks_;
  KeptInputs kept_;
};

}  // namespace alloy::nn
