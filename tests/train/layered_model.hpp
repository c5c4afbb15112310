// A LayeredModel written by hand, with no alloy::nn layer: what a user with their own kernels
// writes to get Checkpointing. On a [rows, features] activation:
//   input:  h = x * s                       (s: "input.scale", per feature)
//   block:  y = x + softsign(a * x + c)     (a, c: "blocks.<i>.a", "blocks.<i>.c", per feature)
//   head:   loss = 1/(2 rows) * sum (y * w - target)^2   (w: "head.w")
// softsign(z) = z / (1 + |z|) is built from alloy::fp operations alone, so Host and Cuda give
// the same bits. Each block keeps its input and its softsign denominator in the workspace, so
// what recomputation saves is real memory.
#pragma once

#include <alloy/alloy.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace layered {

using alloy::Activation;

struct Batch {
  std::vector<float> x;       // rows x features
  std::vector<float> target;  // rows x features
};

inline Batch random_batch(std::size_t rows, std::size_t features, std::mt19937_64& rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  Batch b{std::vector<float>(rows * features), std::vector<float>(rows * features)};
  for (auto& v : b.x) v = d(rng);
  for (std::size_t i = 0; i < b.target.size(); ++i) b.target[i] = 0.5f * std::sin(3.0f * b.x[i]) + 0.1f * d(rng);
  return b;
}

// g = v or g += v, as ctx.accumulate_grads() says.
template <class T>
ALLOY_HOST_DEVICE inline void store_grad(T& g, float v, bool add) {
  g = alloy::round_nearest<T>(add ? alloy::fp::add(alloy::to_float(g), v) : v);
}

template <class T>
struct ToCompute {
  ALLOY_HOST_DEVICE void operator()(const float& x, T& y) const { y = alloy::round_nearest<T>(x); }
};

// y[i, j] = x[i, j] * s[j]
template <class T>
struct ScaleColumns {
  const T* s;
  std::size_t cols;
  ALLOY_HOST_DEVICE void operator()(std::size_t i, const T& x, T& y) const {
    y = alloy::round_nearest<T>(alloy::fp::mul(alloy::to_float(x), alloy::to_float(s[i % cols])));
  }
};

// Column j of sum_i a[i, j] * b[i, j] (b may be null: sum of a), into gradient g[j].
template <class T, class G>
struct ColumnDot {
  const T* a;
  const T* b;
  G* g;
  std::size_t rows, cols;
  bool add;
  ALLOY_HOST_DEVICE void operator()(std::size_t j) const {
    float acc = 0.0f;
    for (std::size_t i = 0; i < rows; ++i) {
      const float x = alloy::to_float(a[i * cols + j]);
      acc = alloy::fp::add(acc, b ? alloy::fp::mul(x, alloy::to_float(b[i * cols + j])) : x);
    }
    store_grad(g[j], acc, add);
  }
};

// Forward of a block: q = 1 + |a x + c| (kept), y = x + (a x + c) / q.
template <class T>
struct BlockForward {
  const T* a;
  const T* c;
  std::size_t cols;
  ALLOY_HOST_DEVICE void operator()(std::size_t i, const T& x, T& q, T& y) const {
    const float z =
        alloy::fp::add(alloy::fp::mul(alloy::to_float(a[i % cols]), alloy::to_float(x)), alloy::to_float(c[i % cols]));
    const float den = alloy::fp::add(1.0f, z < 0.0f ? -z : z);
    q = alloy::round_nearest<T>(den);
    y = alloy::round_nearest<T>(alloy::fp::add(alloy::to_float(x), alloy::fp::div(z, den)));
  }
};

// Backward of a block: u = dy / q^2 (d softsign / dz = 1 / (1 + |z|)^2), dx = dy + u a.
template <class T>
struct BlockBackward {
  const T* a;
  std::size_t cols;
  ALLOY_HOST_DEVICE void operator()(std::size_t i, const T& dy, const T& q, T& u, T& dx) const {
    const float qf = alloy::to_float(q);
    const float uf = alloy::fp::div(alloy::to_float(dy), alloy::fp::mul(qf, qf));
    u = alloy::round_nearest<T>(uf);
    dx = alloy::round_nearest<T>(alloy::fp::add(alloy::to_float(dy), alloy::fp::mul(uf, alloy::to_float(a[i % cols]))));
  }
};

// Head: z = y w; r = z - target; per-row loss parts r^2 / 2; dy = r w * seed, and dz = r * seed kept.
template <class T>
struct HeadForwardBackward {
  const T* w;
  std::size_t cols;
  float seed;
  ALLOY_HOST_DEVICE void operator()(std::size_t i, const T& y, const T& target, float& half_sq, T& dz, T& dy) const {
    const float wf = alloy::to_float(w[i % cols]);
    const float r = alloy::fp::sub(alloy::fp::mul(alloy::to_float(y), wf), alloy::to_float(target));
    half_sq = alloy::fp::mul(0.5f, alloy::fp::mul(r, r));
    dz = alloy::round_nearest<T>(alloy::fp::mul(r, seed));
    dy = alloy::round_nearest<T>(alloy::fp::mul(alloy::fp::mul(r, wf), seed));
  }
};

template <class Ctx, class T = typename Ctx::param_type>
Activation<T> allocate(Ctx& ctx, std::size_t rows, std::size_t cols) {
  return {ctx.template allocate<T>(rows * cols), rows, cols};
}

template <class Ctx, class T = typename Ctx::param_type>
Activation<T> upload(Ctx& ctx, const std::vector<float>& v, std::size_t cols) {
  float* staged = ctx.template allocate<float>(v.size());
  alloy::upload(ctx.backend(), staged, std::span<const float>(v));
  auto a = allocate(ctx, v.size() / cols, cols);
  alloy::for_each_n(ctx.backend(), v.size(), ToCompute<T>{}, alloy::in(static_cast<const float*>(staged)),
                    alloy::out(a.data));
  return a;
}

class Block {
 public:
  Block(std::string name, std::size_t features) : name_(std::move(name)), features_(features) {}

  void declare(alloy::ParamRegistry& r) {
    const auto n = static_cast<std::int64_t>(features_);
    a_ = r.declare(name_ + ".a", {n}, alloy::Init::uniform(0.5f, 1.5f));
    c_ = r.declare(name_ + ".c", {n}, alloy::Init::uniform(-0.3f, 0.3f), {.weight_decay = false});
  }

  template <class Ctx, class T = typename Ctx::param_type>
  Activation<T> forward(Ctx& ctx, Activation<const T> x) {
    auto q = allocate(ctx, x.rows, x.cols);
    auto y = allocate(ctx, x.rows, x.cols);
    alloy::for_each_indexed_n(ctx.backend(), x.size(), BlockForward<T>{ctx.param(a_).data, ctx.param(c_).data, x.cols},
                              alloy::in(x.data), alloy::out(q.data), alloy::out(y.data));
    x_ = {const_cast<T*>(x.data), x.rows, x.cols};
    q_ = {q.data, q.rows, q.cols};
    return y;
  }

  template <class Ctx, class T = typename Ctx::param_type>
  Activation<T> backward(Ctx& ctx, Activation<const T> dy) {
    auto u = allocate(ctx, dy.rows, dy.cols);
    auto dx = allocate(ctx, dy.rows, dy.cols);
    const T* q = static_cast<const T*>(q_.data);
    const T* x = static_cast<const T*>(x_.data);
    alloy::for_each_indexed_n(ctx.backend(), dy.size(), BlockBackward<T>{ctx.param(a_).data, dy.cols},
                              alloy::in(dy.data), alloy::in(q), alloy::out(u.data), alloy::out(dx.data));
    const bool add = ctx.accumulate_grads();
    using G = typename Ctx::grad_type;
    alloy::for_each_n(ctx.backend(), dy.cols,
                      ColumnDot<T, G>{u.data, x, ctx.grad(a_).data, dy.rows, dy.cols, add});  // da = sum u x
    alloy::for_each_n(ctx.backend(), dy.cols,
                      ColumnDot<T, G>{u.data, nullptr, ctx.grad(c_).data, dy.rows, dy.cols, add});  // dc = sum u
    return dx;
  }

 private:
  std::string name_;
  std::size_t features_;
  alloy::ParamHandle a_, c_;
  Activation<void> x_, q_;  // kept from forward, typed in backward
};

class Model {
 public:
  using batch_type = Batch;

  Model(std::size_t features, std::size_t blocks) : features_(features) {
    for (std::size_t i = 0; i < blocks; ++i) blocks_.emplace_back("blocks." + std::to_string(i), features);
  }

  void declare(alloy::ParamRegistry& r) {
    const auto n = static_cast<std::int64_t>(features_);
    scale_ = r.declare("input.scale", {n}, alloy::Init::uniform(0.8f, 1.2f));
    for (auto& b : blocks_) b.declare(r);
    w_ = r.declare("head.w", {n}, alloy::Init::uniform(0.5f, 1.0f));
  }

  std::vector<Block>& layers() noexcept { return blocks_; }

  template <class Ctx, class T = typename Ctx::param_type>
  Activation<T> input(Ctx& ctx, const Batch& b) {
    auto x = upload(ctx, b.x, features_);
    x_ = {x.data, x.rows, x.cols};
    auto h = allocate(ctx, x.rows, x.cols);
    alloy::for_each_indexed_n(ctx.backend(), x.size(), ScaleColumns<T>{ctx.param(scale_).data, features_},
                              alloy::in(static_cast<const T*>(x.data)), alloy::out(h.data));
    return h;
  }

  template <class Ctx, class T = typename Ctx::param_type>
  std::pair<float, Activation<T>> head(Ctx& ctx, Activation<const T> y, const Batch& b) {
    const auto target = upload(ctx, b.target, features_);
    float* half_sq = ctx.template allocate<float>(y.size());
    auto dz = allocate(ctx, y.rows, y.cols);
    auto dy = allocate(ctx, y.rows, y.cols);
    const float seed = ctx.loss_scale() / static_cast<float>(y.rows);
    alloy::for_each_indexed_n(ctx.backend(), y.size(), HeadForwardBackward<T>{ctx.param(w_).data, y.cols, seed},
                              alloy::in(y.data), alloy::in(static_cast<const T*>(target.data)), alloy::out(half_sq),
                              alloy::out(dz.data), alloy::out(dy.data));
    using G = typename Ctx::grad_type;
    alloy::for_each_n(ctx.backend(), y.cols,
                      ColumnDot<T, G>{dz.data, y.data, ctx.grad(w_).data, y.rows, y.cols, ctx.accumulate_grads()});
    const float total = alloy::reduce_sum(ctx.backend(), static_cast<const float*>(half_sq), y.size());
    return {total / static_cast<float>(y.rows), dy};
  }

  template <class Ctx, class T = typename Ctx::param_type>
  void input_backward(Ctx& ctx, Activation<const T> dh, const Batch&) {
    using G = typename Ctx::grad_type;
    alloy::for_each_n(ctx.backend(), dh.cols,
                      ColumnDot<T, G>{dh.data, static_cast<const T*>(x_.data), ctx.grad(scale_).data, dh.rows, dh.cols,
                                      ctx.accumulate_grads()});
  }

 private:
  std::size_t features_;
  std::vector<Block> blocks_;
  alloy::ParamHandle scale_, w_;
  Activation<void> x_;
};

}  // namespace layered
