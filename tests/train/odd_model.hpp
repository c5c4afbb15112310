// A Host-only model whose parameters have irregular shapes drawn from a seed (a matrix larger
// than one q8 block of 2048, a rank-3 tensor, a scalar-like [1], a column [k, 1], vectors), for
// tests of weights files and checkpoints. Its loss pulls each element toward a target the batch
// gives: loss = 0.5 * mean (p - target)^2, so gradients are (p - target) / numel.
#pragma once

#include <alloy/alloy.hpp>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace alloy::test {

struct OddBatch {
  std::vector<float> target;  // one per parameter element, in declared order
};

class OddModel {
 public:
  using batch_type = OddBatch;

  explicit OddModel(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    auto dim = [&](int lo, int hi) { return std::int64_t(lo + int(rng() % std::uint64_t(hi - lo + 1))); };
    add("layer.weight", {dim(41, 67), dim(51, 71)});  // 2091 to 4757 elements: past one q8 block of 2048
    add("layer.bias", {params_.front().shape[0]});
    add("cube", {dim(2, 4), dim(3, 9), dim(5, 11)});
    add("gain", {1});
    add("column", {dim(3, 29), 1});
    add("vector", {dim(257, 300)});  // past one q8 block of 256
  }

  void declare(ParamRegistry& r) {
    handles_.clear();
    for (std::size_t i = 0; i < params_.size(); ++i) {
      handles_.push_back(r.declare(params_[i].name, params_[i].shape, Init::uniform(-1.0f, 1.0f),
                                   {.weight_decay = i % 2 == 0, .lr_scale = i == 2 ? 0.5f : 1.0f}));
    }
  }

  std::size_t numel() const {
    std::size_t n = 0;
    for (const auto& p : params_) n += static_cast<std::size_t>(p.numel());
    return n;
  }
  const std::vector<ParamSpec>& params() const noexcept { return params_; }

  OddBatch batch(std::mt19937_64& rng) const {
    std::normal_distribution<float> d(0.0f, 1.0f);
    OddBatch b;
    b.target.resize(numel());
    for (auto& v : b.target) v = d(rng);
    return b;
  }

  template <class Ctx>
  float forward_backward(Ctx& ctx, const OddBatch& b) {
    static_assert(std::is_same_v<typename Ctx::backend_type, Host>, "OddModel runs on the Host backend");
    using G = typename Ctx::grad_type;
    const float inv_n = 1.0f / static_cast<float>(numel());
    double loss = 0.0;
    std::size_t k = 0;
    for (const ParamHandle h : handles_) {
      const auto p = ctx.param(h);
      const auto g = ctx.grad(h);
      for (std::int64_t i = 0; i < p.numel(); ++i, ++k) {
        const float d = to_float(p[i]) - b.target[k];
        loss += 0.5 * double(d) * double(d);
        const float grad = d * inv_n * ctx.loss_scale();
        g[i] = round_nearest<G>(ctx.accumulate_grads() ? to_float(g[i]) + grad : grad);
      }
    }
    return static_cast<float>(loss * inv_n);
  }

 private:
  void add(std::string name, std::vector<std::int64_t> shape) {
    params_.push_back({std::move(name), std::move(shape), Init::zeros(), {}});
  }

  std::vector<ParamSpec> params_;
  std::vector<ParamHandle> handles_;
};

}  // namespace alloy::test
