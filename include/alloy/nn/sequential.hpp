// Containers: Sequential<Layers...> runs its layers in order; Residual<Block> adds its input to
// its block's output; Repeated<Block> holds n blocks of one type and runs them through
// train/recompute.hpp: with ctx.checkpoint_every() = k it keeps only the input of every k-th
// block during forward and re-runs each segment's forward inside backward, bit-identical to
// keeping everything. A LayeredModel usually hands the trainer repeated.blocks() as its layers().
//
// Fusions, taken without being asked for (fused_mlp.hpp says what each computes):
// - In a Sequential, Linear -> Gelu -> Linear runs as two products forward (GELU in the first
//   one's epilogue, keeping only its input for backward), and Linear -> Gelu otherwise as one
//   product forward. Layers are matched left to
//   right, so in Linear, Gelu, Linear, Gelu the second Gelu runs on its own.
// - Residual<Block> whose block ends with a layer that adds a residual in its last product (a
//   Linear, or CausalSelfAttention in its c_proj: detail::adds_residual; a Block that is such a
//   layer, or a Sequential whose last layer is one) adds the residual in that product (cuBLASLt's
//   C), not in a pass of its own. In backward, a block that starts with a LayerNorm adds dy to its dx in LayerNorm's
//   backward pass; any other block's dx gets dy added in a pass of its own.
// The Host backend runs the same fused semantics through its reference product, so Host and Cuda
// still compute the same thing, and a recomputed forward gives the same bits.
#pragma once

#include <alloy/memory/registry.hpp>
#include <alloy/nn/activation.hpp>
#include <alloy/nn/fused_mlp.hpp>
#include <alloy/nn/gelu.hpp>
#include <alloy/nn/layernorm.hpp>
#include <alloy/nn/linear.hpp>
#include <alloy/train/recompute.hpp>

#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace alloy::nn {

namespace detail {

// Whether layer L offers forward_adding(ctx, x, residual): y = forward(x) + residual, the add
// done in its last product.
template <class L, class Ctx>
concept adds_residual = requires(L& l, Ctx& ctx, Activation<const value_t<Ctx>> x) {
  l.forward_adding(ctx, x, x);
};

}  // namespace detail

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
    return forward_from<0>(ctx, x, {});
  }

  // forward, with `residual` added to the output by the last layer's product (Residual's fusion).
  template <class Ctx>
  requires(sizeof...(Layers) > 0 &&
           detail::adds_residual<std::tuple_element_t<sizeof...(Layers) - 1, std::tuple<Layers...>>, Ctx>)
      Activation<detail::value_t<Ctx>> forward_adding(Ctx& ctx, Activation<const detail::value_t<Ctx>> x,
                                                      Activation<const detail::value_t<Ctx>> residual) {
    return forward_from<0>(ctx, x, residual);
  }

  // Forward's work that backward needs, without the output where the layers allow it (the
  // recomputation of a checkpointed segment's last block, train/recompute.hpp): a Sequential
  // ending in a Linear (alone or after Linear -> Gelu) skips that last product, whose output
  // backward never reads; one ending in a layer with its own forward_for_backward (a Residual,
  // CausalSelfAttention) calls it. Any other ending runs forward.
  template <class Ctx>
  void forward_for_backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> x) {
    (void)forward_from<0, false>(ctx, x, {});
  }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy) {
    return backward_to<sizeof...(Layers)>(ctx, dy, {});
  }

  // backward, with `add` added to dx by the first layer's backward pass (Residual's fusion). When
  // add is dy itself (a Residual's block: the gradient of its output takes both paths) and the
  // last layer is a projection with a bias (a Linear, or CausalSelfAttention's c_proj), whose dy
  // that is, the bias gradient, dy's column sums, is taken in that LayerNorm pass too, which reads
  // add anyway, instead of in a pass over dy of its own.
  template <class Ctx>
  requires(sizeof...(Layers) > 0 && std::is_same_v<std::tuple_element_t<0, std::tuple<Layers...>>, LayerNorm>)
      Activation<detail::value_t<Ctx>> backward_adding(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy,
                                                       Activation<const detail::value_t<Ctx>> add) {
    Linear* last = last_projection();
    if (last == nullptr || !last->has_bias() || add.data != dy.data || add.rows != dy.rows || add.cols != dy.cols) {
      return backward_to<sizeof...(Layers)>(ctx, dy, add);
    }
    struct Handover {  // for this backward only, whatever it throws
      Linear* last;
      void*& sums;
      ~Handover() {
        last->leave_bias_gradient(false);
        sums = nullptr;
      }
    } handover{last, add_sums_};
    add_sums_ = last->bias_gradient(ctx);
    last->leave_bias_gradient(true);
    return backward_to<sizeof...(Layers)>(ctx, dy, add);
  }

  template <std::size_t I>
  auto& layer() {
    return std::get<I>(layers_);
  }

 private:
  static constexpr std::size_t count = sizeof...(Layers);

  // Whether layer I exists and is an L (false past the end, so patterns can look ahead).
  template <std::size_t I, class L>
  static constexpr bool layer_is() {
    if constexpr (I < count) {
      return std::is_same_v<std::tuple_element_t<I, std::tuple<Layers...>>, L>;
    } else {
      return false;
    }
  }

  // Runs layers [I, count) from x; the last layer adds `residual` when it has data. Without
  // Output, a final Linear (or a final layer with forward_for_backward) keeps what backward needs
  // without its last product and no activation is returned.
  template <std::size_t I, bool Output = true, class Ctx, class T = detail::value_t<Ctx>>
  Activation<T> forward_from(Ctx& ctx, Activation<const std::type_identity_t<T>> x,
                             Activation<const std::type_identity_t<T>> residual) {
    if constexpr (I == count) {
      return {const_cast<T*>(x.data), x.rows, x.cols};
    } else {
      auto& layer = std::get<I>(layers_);
      if constexpr (layer_is<I, Linear>() && layer_is<I + 1, Gelu>()) {
        if (detail::gelu_fuses_after(layer)) {
          auto& gelu = std::get<I + 1>(layers_);
          if constexpr (layer_is<I + 2, Linear>()) {
            if constexpr (!Output && I + 3 == count) {
              detail::mlp_forward_for_backward(ctx, layer, gelu, std::get<I + 2>(layers_), x);
              return {};
            } else {
              const Activation<const T> adds = I + 3 == count ? residual : Activation<const T>{};
              return forward_from<I + 3, Output>(
                  ctx, detail::mlp_forward(ctx, layer, gelu, std::get<I + 2>(layers_), x, adds), residual);
            }
          } else {
            return forward_from<I + 2, Output>(ctx, detail::linear_gelu_forward(ctx, layer, gelu, x), residual);
          }
        }
      }
      // The last layer's work for backward without its output: a Linear keeps its input and skips
      // its product; a nested container or CausalSelfAttention skips what it can; any other runs
      // forward.
      if constexpr (!Output && I + 1 == count && requires { layer.forward_for_backward(ctx, x); }) {
        layer.forward_for_backward(ctx, x);
        return {};
      }
      if constexpr (I + 1 == count && detail::adds_residual<std::tuple_element_t<I, std::tuple<Layers...>>, Ctx>) {
        if (residual.data != nullptr) return layer.forward_adding(ctx, x, residual);
      }
      return forward_from<I + 1, Output>(ctx, layer.forward(ctx, x), residual);
    }
  }

  // Runs layers [0, I) backward from d, the gradient of layer I - 1's output; the first layer (a
  // LayerNorm, when add has data) adds `add` to its dx. Spent: d is a buffer of this Sequential's
  // own that nothing reads afterwards (a Linear, a Gelu or the fused block handed it back; the
  // caller's dy, or what another layer returned, may be its input or live elsewhere), so a
  // LayerNorm writes its dx over it.
  template <std::size_t I, bool Spent = false, class Ctx, class T = detail::value_t<Ctx>>
  Activation<T> backward_to(Ctx& ctx, Activation<const std::type_identity_t<T>> d,
                            Activation<const std::type_identity_t<T>> add) {
    if constexpr (I == 0) {
      return {const_cast<T*>(d.data), d.rows, d.cols};
    } else {
      if constexpr (I >= 3 && layer_is<I - 3, Linear>() && layer_is<I - 2, Gelu>() && layer_is<I - 1, Linear>()) {
        auto& gelu = std::get<I - 2>(layers_);
        if (gelu.backward_in_next_product()) {
          // Up's input is a LayerNorm's output when the triple follows one: dx goes over it.
          constexpr bool over_input = I == 4 && layer_is<0, LayerNorm>();
          return backward_to<I - 3, true>(
              ctx, detail::mlp_backward(ctx, std::get<I - 3>(layers_), gelu, std::get<I - 1>(layers_), d, over_input),
              add);
        }
      }
      // A layer after a first LayerNorm that can write its dx over its input (LayerNorm's output,
      // which nothing else reads): LayerNorm's backward then writes over that too, so the
      // Sequential's dx lies where its forward began (a block's dx is then where the trainer keeps
      // it, with no copy).
      if constexpr (I == 2 && layer_is<0, LayerNorm>()) {
        auto& next = std::get<1>(layers_);
        if constexpr (requires { next.backward_over_input(ctx, d); }) {
          return backward_to<1, true>(ctx, next.backward_over_input(ctx, d), add);
        }
      }
      if constexpr (I == 1 && layer_is<0, LayerNorm>()) {
        auto* sums = static_cast<typename Ctx::grad_type*>(add_sums_);  // backward_adding's handover, or null
        if constexpr (Spent) {
          return std::get<0>(layers_).backward_adding_in_place(
              ctx, Activation<T>{const_cast<T*>(d.data), d.rows, d.cols}, add, sums);
        } else {
          return std::get<0>(layers_).backward_adding(ctx, d, add, sums);
        }
      } else {
        constexpr bool fresh = layer_is<I - 1, Linear>() || layer_is<I - 1, Gelu>();
        return backward_to<I - 1, fresh>(ctx, std::get<I - 1>(layers_).backward(ctx, d), add);
      }
    }
  }

  // The projection that ends the sequence, whose dy is the sequence's: the last layer if it is a
  // Linear, or its c_proj (CausalSelfAttention); null otherwise.
  Linear* last_projection() {
    if constexpr (sizeof...(Layers) > 0) {
      auto& last = std::get<sizeof...(Layers) - 1>(layers_);
      if constexpr (std::is_same_v<std::remove_cvref_t<decltype(last)>, Linear>) {
        return &last;
      } else if constexpr (requires {
                             { last.c_proj() } -> std::same_as<Linear&>;
                           }) {
        return &last.c_proj();
      }
    }
    return nullptr;
  }

  std::tuple<Layers...> layers_;
  // While backward_adding runs with the last projection's bias gradient handed to the first
  // LayerNorm: where that gradient goes (the context's gradient dtype), else null.
  void* add_sums_ = nullptr;
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
    if constexpr (requires { block_.forward_adding(ctx, x, x); }) {
      detail::check_width("Residual", "block", x.cols, block_.out_features(x.cols));
      return block_.forward_adding(ctx, x, x);
    } else {
      const auto inner = block_.forward(ctx, x);
      detail::check_width("Residual", "block", x.cols, inner.cols);
      auto y = detail::allocate(ctx, x.rows, x.cols);
      for_each_n(ctx.backend(), x.size(), detail::AddElements<T>{}, in(x.data), in(static_cast<const T*>(inner.data)),
                 out(y.data));
      return y;
    }
  }

  // What backward needs, without the sum (train/recompute.hpp): the block's own
  // forward_for_backward when it has one; forward otherwise.
  template <class Ctx>
  void forward_for_backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> x) {
    if constexpr (requires { block_.forward_for_backward(ctx, x); }) {
      detail::check_width("Residual", "block", x.cols, block_.out_features(x.cols));
      block_.forward_for_backward(ctx, x);
    } else {
      (void)forward(ctx, x);
    }
  }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy) {
    using T = detail::value_t<Ctx>;
    if constexpr (requires { block_.backward_adding(ctx, dy, dy); }) {
      return block_.backward_adding(ctx, dy, dy);
    }
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
