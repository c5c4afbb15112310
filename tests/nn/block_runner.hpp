// One alloy::nn block run forward and backward by hand, outside a trainer: for the tests of the
// layers' fusions, which compare a fused block against the same layers run one by one, and Cuda
// against Host.
#pragma once

#include "../support/values.hpp"

#include <alloy/alloy.hpp>
#include <alloy/nn/nn.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace alloy::test {

// Passes its input on, forward and backward. Between a Linear and a Gelu, or after a block's last
// Linear, it keeps Sequential and Residual from fusing, so the same layers run one by one.
struct PassThrough {
  void declare(ParamRegistry&) {}
  std::size_t out_features(std::size_t in) const noexcept { return in; }
  template <class Ctx>
  Activation<typename Ctx::param_type> forward(Ctx&, Activation<const typename Ctx::param_type> x) {
    return {const_cast<typename Ctx::param_type*>(x.data), x.rows, x.cols};
  }
  template <class Ctx>
  Activation<typename Ctx::param_type> backward(Ctx&, Activation<const typename Ctx::param_type> dy) {
    return {const_cast<typename Ctx::param_type*>(dy.data), dy.rows, dy.cols};
  }
};

template <class T>
struct BlockRun {
  std::vector<T> y, dx;
  std::map<std::string, std::vector<T>> grads;  // per parameter name
  std::size_t bytes_after_forward = 0;          // workspace in use once forward returned
  std::size_t peak_bytes = 0;                   // workspace peak over forward and backward
  bool dx_where_forward_began = false;          // backward's dx lies where forward's first allocation did
};

// Runs `block` forward on x (rows x width) and backward from dy, with the parameters the store
// draws from `seed` (the same for the same parameter names and shapes) or, when given, `params`
// (an arena of the same layout). With `grads_before`, gradients are added to it. With
// `for_backward`, forward is the block's forward_for_backward (what a recomputation runs): y stays
// empty and dy is rows x out_features(width). The context's checkpoint_every() is
// `checkpoint_every` (nn::Repeated recomputes by it).
template <class P, class B, class Block, class T = storage_t<typename P::compute_type>>
BlockRun<T> run_block(Block& block, const std::vector<T>& x, const std::vector<T>& dy, std::size_t rows,
                      std::size_t width, std::uint64_t seed,
                      const std::type_identity_t<std::vector<T>>* params = nullptr,
                      const std::type_identity_t<std::vector<T>>* grads_before = nullptr, bool for_backward = false,
                      int checkpoint_every = 0) {
  ParamRegistry r;
  block.declare(r);
  using Store = ParamStore<P, SGD<>, B>;
  Store store(r, B{}, seed);
  if (params) copy_from_host(store.params_arena(), std::span<const T>(*params));
  if (grads_before) copy_from_host(store.grads_arena(), std::span<const T>(*grads_before));
  // One block big enough for any test's activations, so bytes in use count only what the layers
  // hold (a workspace that grows skips the rest of a full block and counts it as used).
  Workspace<B> ws;
  ws.template allocate<std::byte>(std::size_t(64) << 20);
  ws.reset();
  ws.reset_peak();
  BackendResources<B> res;
  Context<Store> ctx(store, ws, 1.0f, grads_before != nullptr, 0, 1, 0, checkpoint_every, &res);
  Buffer<T, B> x_buffer(x.size()), dy_buffer(dy.size());
  copy_from_host(x_buffer, std::span<const T>(x));
  copy_from_host(dy_buffer, std::span<const T>(dy));
  BlockRun<T> run;
  const Activation<const T> x_in(x_buffer.data(), rows, width);
  Activation<T> y{nullptr, rows, block.out_features(width)};
  const auto begin = ws.mark();
  const void* forward_began = ws.template allocate<std::byte>(1);
  ws.release(begin);
  if (for_backward) {
    if constexpr (requires { block.forward_for_backward(ctx, x_in); }) {
      block.forward_for_backward(ctx, x_in);
    } else {
      ADD_FAILURE() << "for_backward: this block has no forward_for_backward";
    }
  } else {
    y = block.forward(ctx, x_in);
  }
  run.bytes_after_forward = ws.bytes_in_use();
  const auto dx = block.backward(ctx, Activation<const T>(dy_buffer.data(), y.rows, y.cols));
  synchronize(B{});
  run.peak_bytes = ws.peak_bytes();
  run.dx_where_forward_began = static_cast<const void*>(dx.data) == forward_began;
  const auto copy_out = [](const T* p, std::size_t n) {
    Buffer<T, B> out(n);
    for_each_n(B{}, n, alloy::detail::CopyActivation<T>{}, in(p), alloy::out(out.data()));
    return to_host(out);
  };
  if (!for_backward) run.y = copy_out(y.data, y.size());
  run.dx = copy_out(dx.data, dx.size());
  const auto grads = to_host(store.grads_arena());
  for (std::size_t t = 0; t < r.size(); ++t) {
    const auto& entry = store.layout()[t];
    run.grads[r.specs()[t].name] =
        std::vector<T>(grads.begin() + entry.offset, grads.begin() + entry.offset + entry.numel);
  }
  return run;
}

// The bit patterns of a run's outputs and gradients, to compare two runs bit for bit.
template <class T>
auto bits(const std::vector<T>& v) {
  std::vector<decltype(bits_of(T{}))> b;
  for (const T& x : v) b.push_back(bits_of(x));
  return b;
}

template <class T>
void expect_same_bits(const BlockRun<T>& got, const BlockRun<T>& want) {
  EXPECT_EQ(bits(got.y), bits(want.y)) << "y";
  EXPECT_EQ(bits(got.dx), bits(want.dx)) << "dx";
  ASSERT_EQ(got.grads.size(), want.grads.size());
  for (const auto& [name, g] : want.grads) EXPECT_EQ(bits(got.grads.at(name)), bits(g)) << "gradient of " << name;
}

// ||got - want|| / ||want||.
template <class T>
double relative_error(const std::vector<T>& got, const std::vector<T>& want) {
  EXPECT_EQ(got.size(), want.size());
  double error = 0, norm = 0;
  for (std::size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    const double g = to_float(got[i]), w = to_float(want[i]);
    error += (g - w) * (g - w);
    norm += w * w;
  }
  return norm > 0 ? std::sqrt(error / norm) : std::sqrt(error);
}

// Every output and gradient of two runs agree within `tolerance`, relative.
template <class T>
void expect_runs_agree(const BlockRun<T>& got, const BlockRun<T>& want, double tolerance) {
  EXPECT_LT(relative_error(got.y, want.y), tolerance) << "y";
  EXPECT_LT(relative_error(got.dx, want.dx), tolerance) << "dx";
  ASSERT_EQ(got.grads.size(), want.grads.size());
  for (const auto& [name, g] : want.grads) {
    EXPECT_LT(relative_error(got.grads.at(name), g), tolerance) << "gradient of " << name;
  }
}

}  // namespace alloy::test
