// Float64 references of the update rules, written from the PyTorch formulas, and helpers that
// fill a store with fresh random data. Shared by the Host tests and the GPU tests.
#pragma once

#include <alloy/alloy.hpp>

#include <cmath>
#include <random>
#include <vector>

namespace alloy::test {

inline ParamRegistry odd_model() {
  ParamRegistry r;
  r.declare("w1", {37, 29}, Init::normal(0.5f));
  r.declare("b1", {29}, Init::normal(0.1f), {.weight_decay = false});
  r.declare("w2", {1001}, Init::uniform(-1.0f, 1.0f), {.weight_decay = true, .lr_scale = 0.5f});
  r.declare("s", {5}, Init::constant(1.0f), {.weight_decay = false});
  return r;
}

// Writes fresh random gradients (times `scale`) into every declared element.
template <class Store>
void random_grads(Store& store, std::mt19937_64& rng, float scale, float stddev = 1.0f) {
  std::normal_distribution<float> d(0.0f, stddev);
  using G = typename Store::grad_type;
  std::vector<G> host(store.layout().padded_numel(), round_nearest<G>(0.0f));
  for (std::size_t t = 0; t < store.layout().tensors(); ++t) {
    const auto& place = store.layout()[t];
    for (std::size_t i = 0; i < place.numel; ++i) host[place.offset + i] = round_nearest<G>(d(rng) * scale);
  }
  copy_from_host(store.grads_arena(), std::span<const G>(host));
}

struct RefElement {
  double p = 0, s0 = 0, s1 = 0;
};

struct RefModel {
  std::vector<RefElement> e;  // padded layout, as the store
  std::vector<BlockScales> blocks;
};

template <class Store>
RefModel reference_from(Store& store) {
  RefModel r;
  r.blocks = store.layout().block_scales();
  if constexpr (Store::has_master) {
    const auto m = to_host(store.master_arena());
    for (float x : m) r.e.push_back({x, 0, 0});
  } else {
    const auto p = to_host(store.params_arena());
    for (auto x : p) r.e.push_back({to_float(x), 0, 0});
  }
  return r;
}

inline double ref_norm(const std::vector<double>& g) {
  double s = 0;
  for (double x : g) s += x * x;
  return std::sqrt(s);
}

inline double clip_coef(double norm, double max_norm) {
  return max_norm > 0 ? std::min(1.0, max_norm / (norm + 1e-6)) : 1.0;
}

// One AdamW step in double; g already unscaled.
inline void ref_adamw(RefModel& r, const std::vector<double>& g, const AdamW<>::Config& c, double lr, int t,
                      double clip) {
  const double bc1 = 1 - std::pow(double(c.beta1), t), bc2 = 1 - std::pow(double(c.beta2), t);
  for (std::size_t i = 0; i < r.e.size(); ++i) {
    auto& e = r.e[i];
    const auto b = r.blocks[i / 256];
    const double gi = g[i] * clip, lr_b = lr * b.lr;
    e.p *= 1 - lr_b * c.weight_decay * b.decay;
    e.s0 = c.beta1 * e.s0 + (1 - double(c.beta1)) * gi;
    e.s1 = c.beta2 * e.s1 + (1 - double(c.beta2)) * gi * gi;
    e.p -= (lr_b / bc1) * e.s0 / (std::sqrt(e.s1) / std::sqrt(bc2) + c.eps);
  }
}

inline void ref_sgd(RefModel& r, const std::vector<double>& g, const SGD<>::Config& c, double lr, int t,
                    double clip) {
  for (std::size_t i = 0; i < r.e.size(); ++i) {
    auto& e = r.e[i];
    const auto b = r.blocks[i / 256];
    double gi = g[i] * clip + c.weight_decay * b.decay * e.p;
    if (c.momentum != 0) {
      e.s0 = t == 1 ? gi : c.momentum * e.s0 + (1 - double(c.dampening)) * gi;
      gi = c.nesterov ? gi + c.momentum * e.s0 : e.s0;
    }
    e.p -= lr * b.lr * gi;
  }
}

inline void ref_lion(RefModel& r, const std::vector<double>& g, const Lion<>::Config& c, double lr, double clip) {
  for (std::size_t i = 0; i < r.e.size(); ++i) {
    auto& e = r.e[i];
    const auto b = r.blocks[i / 256];
    const double gi = g[i] * clip, lr_b = lr * b.lr;
    e.p *= 1 - lr_b * c.weight_decay * b.decay;
    const double u = c.beta1 * e.s0 + (1 - double(c.beta1)) * gi;
    e.p -= lr_b * ((u > 0) - (u < 0));
    e.s0 = c.beta2 * e.s0 + (1 - double(c.beta2)) * gi;
  }
}

// The store's gradients, unscaled, as doubles.
template <class Store>
std::vector<double> unscaled_grads(Store& store, float scale) {
  std::vector<double> g;
  for (auto x : to_host(store.grads_arena())) g.push_back(double(to_float(x)) / scale);
  return g;
}

// Every byte of the arenas a skipped step must leave alone.
template <class Store>
std::vector<std::uint8_t> snapshot(Store& store) {
  std::vector<std::uint8_t> bytes;
  auto add = [&](const auto& buffer) {
    const auto v = to_host(buffer);
    const auto* p = reinterpret_cast<const std::uint8_t*>(v.data());
    bytes.insert(bytes.end(), p, p + v.size() * sizeof(v[0]));
  };
  add(store.params_arena());
  add(store.master_arena());
  for (int k = 0; k < Store::slots; ++k) {
    add(store.state_arena(k));
    add(store.state_scale_arena(k));
  }
  return bytes;
}

}  // namespace alloy::test
