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

// Writes fresh random values (normal, times `scale`) into every declared element of an arena;
// padding stays zero.
template <class G, class B>
void random_fill(Buffer<G, B>& arena, const ArenaLayout& layout, std::mt19937_64& rng, float scale, float stddev) {
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<G> host(layout.padded_numel(), round_nearest<G>(0.0f));
  for (std::size_t t = 0; t < layout.tensors(); ++t) {
    const auto& place = layout[t];
    for (std::size_t i = 0; i < place.numel; ++i) host[place.offset + i] = round_nearest<G>(d(rng) * scale);
  }
  copy_from_host(arena, std::span<const G>(host));
}

// Fresh random gradients (times `scale`) where the optimizer reads them.
template <class Store>
void random_grads(Store& store, std::mt19937_64& rng, float scale, float stddev = 1.0f) {
  if constexpr (Store::has_accumulator) {
    random_fill(store.accumulator_arena(), store.layout(), rng, scale, stddev);
  } else {
    random_fill(store.grads_arena(), store.layout(), rng, scale, stddev);
  }
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

inline void ref_sgd(RefModel& r, const std::vector<double>& g, const SGD<>::Config& c, double lr, int t, double clip) {
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

// Copies every arena of one store into another of the same layout (any backends).
template <class From, class To>
void mirror(From& from, To& to) {
  auto copy = [](auto& src, auto& dst) {
    const auto v = to_host(src);
    copy_from_host(dst, std::span<const typename decltype(v)::value_type>(v));
  };
  copy(from.params_arena(), to.params_arena());
  copy(from.grads_arena(), to.grads_arena());
  copy(from.master_arena(), to.master_arena());
  if constexpr (From::has_accumulator) copy(from.accumulator_arena(), to.accumulator_arena());
  for (int k = 0; k < From::slots; ++k) {
    copy(from.state_arena(k), to.state_arena(k));
    copy(from.state_scale_arena(k), to.state_scale_arena(k));
  }
}

// Pass 2 called directly over a whole (unsharded) store, as OptimizerStep's step t calls it:
// with grad_mult, or with a decision in the backend's memory that replaces it (null: none).
template <class O, class Store, class B>
void pass2(B be, Store& store, const typename O::Config& config, float lr, std::uint64_t t, float grad_mult,
           const detail::StepDecision* decision) {
  using Grad = typename Store::optimizer_grad_type;
  detail::UpdateArenas<typename Store::param_type, Grad, typename Store::state_storage, Store::slots> a;
  a.n = store.layout().padded_numel();
  a.params = store.params_arena().data();
  if constexpr (Store::has_accumulator) {
    a.grads = store.accumulator_arena().data();
  } else {
    a.grads = store.grads_arena().data();
  }
  a.master = Store::has_master ? store.master_arena().data() : nullptr;
  for (int k = 0; k < Store::slots; ++k) {
    a.state[k] = store.state_arena(k).data();
    if constexpr (Store::state_policy::quantized) a.absmax[k] = store.state_scale_arena(k).data();
  }
  a.blocks = store.block_scales().data();
  const detail::UpdateScalars<typename O::rule_type> s{O::rule(config, lr, t),           grad_mult, 7,
                                                       t * store.layout().tensors_end(), false,     decision};
  if constexpr (Store::state_policy::quantized) {
    detail::fused_update_q8<static_cast<int>(Store::quant_block), false>(be, a, s);
  } else {
    detail::fused_update<false>(be, a, s);
  }
}

// The store's gradients, unscaled, as doubles.
template <class Store>
std::vector<double> unscaled_grads(Store& store, float scale) {
  std::vector<double> g;
  for (auto x : to_host(store.grads_arena())) g.push_back(double(to_float(x)) / scale);
  return g;
}

// Every byte of the training state: the arenas a skipped step must leave alone and a checkpoint
// restores. The gradient accumulator is left out: it is scratch between micro-batches (the
// trainer's next first micro-batch overwrites it; checkpoints do not hold it).
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

namespace alloy::test {

// torch.optim.Adafactor in double, over a model's tensors (params as a flat padded vector).
struct RefAdafactor {
  std::vector<std::vector<double>> row, col, var;  // per tensor
  void step(const ParamRegistry& registry, const ArenaLayout& layout, std::vector<double>& p,
            const std::vector<double>& g, const Adafactor<>::Config& c, double lr, int t) {
    if (row.empty()) {
      row.resize(registry.size()), col.resize(registry.size()), var.resize(registry.size());
    }
    const double w = std::pow(double(t), double(c.beta2_decay));
    const double rho = std::min(lr, 1.0 / std::sqrt(double(t)));
    for (std::size_t k = 0; k < registry.size(); ++k) {
      const auto& spec = registry.specs()[k];
      const std::size_t off = layout[k].offset, n = layout[k].numel;
      double sq = 0;
      for (std::size_t i = 0; i < n; ++i) sq += p[off + i] * p[off + i];
      const double alpha = std::max(double(c.eps2), std::sqrt(sq / n)) * rho;
      const double decay = spec.options.weight_decay ? c.weight_decay : 0.0;
      for (std::size_t i = 0; i < n; ++i) p[off + i] *= 1 - lr * decay;
      std::vector<double> u(n);
      const double eps1 = c.eps1;
      if (spec.shape.size() >= 2) {
        const std::size_t cols = spec.shape.back(), rows = spec.shape[spec.shape.size() - 2], batch = n / (rows * cols);
        row[k].resize(batch * rows), col[k].resize(batch * cols);
        for (std::size_t b = 0; b < batch; ++b) {
          const std::size_t base = off + b * rows * cols;
          for (std::size_t i = 0; i < rows; ++i) {
            double s = 0;
            for (std::size_t j = 0; j < cols; ++j) s += g[base + i * cols + j] * g[base + i * cols + j];
            double& r = row[k][b * rows + i];
            r += w * (s / cols - r);
          }
          for (std::size_t j = 0; j < cols; ++j) {
            double s = 0;
            for (std::size_t i = 0; i < rows; ++i) s += g[base + i * cols + j] * g[base + i * cols + j];
            double& cv = col[k][b * cols + j];
            cv += w * (s / rows - cv);
          }
          double mean = 0;
          for (std::size_t i = 0; i < rows; ++i) mean += row[k][b * rows + i];
          mean = std::max(mean / rows, eps1);
          for (std::size_t i = 0; i < rows; ++i) {
            for (std::size_t j = 0; j < cols; ++j) {
              const double v = std::max(row[k][b * rows + i] * col[k][b * cols + j] / mean, eps1 * eps1);
              u[b * rows * cols + i * cols + j] = g[base + i * cols + j] / std::sqrt(v);
            }
          }
        }
      } else {
        var[k].resize(n);
        for (std::size_t i = 0; i < n; ++i) {
          var[k][i] += w * (g[off + i] * g[off + i] - var[k][i]);
          u[i] = g[off + i] / std::sqrt(std::max(var[k][i], eps1 * eps1));
        }
      }
      double usq = 0;
      for (double x : u) usq += x * x;
      const double denom = std::max(1.0, std::sqrt(usq / n) / c.d);
      for (std::size_t i = 0; i < n; ++i) p[off + i] -= alpha / denom * u[i];
    }
  }
};

}  // namespace alloy::test
