// The trainers the checkpoint fuzz target loads into, and the model they train: small (a few
// hundred parameters, so a checkpoint is a few KB and one load takes microseconds) with the
// shapes that take the loader down its different paths: a matrix past one q8 block of 256
// (two absmax scales) that Adafactor factors, a vector, a rank-3 tensor and a [1].
#pragma once

#include <alloy/alloy.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace alloy::fuzz {

struct TargetBatch {
  std::vector<float> target;  // one per parameter element, in declared order
};

class SmallModel {
 public:
  using batch_type = TargetBatch;

  void declare(ParamRegistry& r) {
    handles_.clear();
    handles_.push_back(r.declare("layer.weight", {9, 31}, Init::uniform(-1.0f, 1.0f)));
    handles_.push_back(r.declare("layer.bias", {9}, Init::zeros(), {.weight_decay = false}));
    handles_.push_back(r.declare("cube", {2, 3, 4}, Init::uniform(-0.5f, 0.5f)));
    handles_.push_back(r.declare("gain", {1}, Init::constant(1.0f), {.weight_decay = false}));
  }

  static constexpr std::size_t numel = 9 * 31 + 9 + 2 * 3 * 4 + 1;

  static TargetBatch batch(std::uint32_t seed) {
    TargetBatch b;
    b.target.resize(numel);
    for (std::size_t i = 0; i < numel; ++i) {
      seed = seed * 1664525u + 1013904223u;
      b.target[i] = static_cast<float>(seed >> 8) / static_cast<float>(1u << 24) * 2.0f - 1.0f;
    }
    return b;
  }

  // loss = 0.5 * mean (p - target)^2, in float: a loaded checkpoint may hold any finite value, and
  // a double sum cast to float could leave float's range (undefined behaviour, which UBSan reports).
  template <class Ctx>
  float forward_backward(Ctx& ctx, const TargetBatch& b) {
    using G = typename Ctx::grad_type;
    const float inv_n = 1.0f / static_cast<float>(numel);
    float loss = 0.0f;
    std::size_t k = 0;
    for (const ParamHandle h : handles_) {
      const auto p = ctx.param(h);
      const auto g = ctx.grad(h);
      for (std::int64_t i = 0; i < p.numel(); ++i, ++k) {
        const float d = to_float(p[i]) - b.target[k];
        loss += 0.5f * d * d;
        const float grad = d * inv_n * ctx.loss_scale();
        g[i] = round_nearest<G>(ctx.accumulate_grads() ? to_float(g[i]) + grad : grad);
      }
    }
    return loss * inv_n;
  }

 private:
  std::vector<ParamHandle> handles_;
};

// One trainer per loader path: master copies and their rounding check, q8 codes with absmax
// scales, a dynamic loss scale, factored Adafactor state, bf16 state without a master.
using FuzzTrainers = std::tuple<Trainer<SmallModel, Precision<bf16, fp32_master>, AdamW<State<q8>>, Host>,
                                Trainer<SmallModel, Precision<fp16, fp32_master>, Accumulate<2>, SGD<>, Host>,
                                Trainer<SmallModel, Precision<fp32>, Adafactor<>, Host>,
                                Trainer<SmallModel, Precision<bf16>, Lion<State<bf16>>, Host>>;

template <class F>
void for_each_trainer_type(F&& f) {
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    (f(std::type_identity<std::tuple_element_t<I, FuzzTrainers>>{}), ...);
  }
  (std::make_index_sequence<std::tuple_size_v<FuzzTrainers>>{});
}

template <class Tr>
typename Tr::Config config(std::uint64_t seed) {
  typename Tr::Config c;
  c.seed = seed;
  c.load_log = [](const std::string&) {};  // a changed configuration is reported, not a finding
  if constexpr (!Tr::precision::has_master && !std::is_same_v<typename Tr::compute_type, fp32>) {
    c.param_rounding = Rounding::stochastic;
  }
  return c;
}

// Everything a checkpoint restores into the store: parameters, master, state, q8 scales.
template <class Store>
std::vector<std::byte> store_bytes(Store& store) {
  std::vector<std::byte> out;
  auto add = [&](const auto& buffer) {
    const auto* p = reinterpret_cast<const std::byte*>(buffer.data());
    out.insert(out.end(), p, p + buffer.size() * sizeof(*buffer.data()));
  };
  add(store.params_arena());
  add(store.master_arena());
  for (int k = 0; k < Store::slots; ++k) {
    add(store.state_arena(k));
    add(store.state_scale_arena(k));
  }
  return out;
}

}  // namespace alloy::fuzz
