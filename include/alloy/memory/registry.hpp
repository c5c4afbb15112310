// ParamRegistry: what a model declares about its parameters (name, shape, initializer, weight
// decay, learning-rate multiplier), before any memory exists. The trainer lays them out.
#pragma once

#include <alloy/error.hpp>
#include <alloy/memory/tensor_view.hpp>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <unordered_map>
#include <vector>

namespace alloy {

// How a parameter's first values are drawn. Trivially copyable: it runs inside kernels too.
struct Init {
  enum class Kind : std::uint8_t { constant, uniform, normal };
  Kind kind = Kind::constant;
  float a = 0.0f;  // constant: value; uniform: low; normal: mean
  float b = 0.0f;  // uniform: high; normal: standard deviation

  static constexpr Init zeros() { return {Kind::constant, 0.0f, 0.0f}; }
  static constexpr Init ones() { return {Kind::constant, 1.0f, 0.0f}; }
  static constexpr Init constant(float v) { return {Kind::constant, v, 0.0f}; }
  static constexpr Init uniform(float low, float high) { return {Kind::uniform, low, high}; }
  static constexpr Init normal(float stddev, float mean = 0.0f) { return {Kind::normal, mean, stddev}; }
};

struct ParamOptions {
  bool weight_decay = true;  // false for biases, norms and embeddings, as their users choose
  float lr_scale = 1.0f;     // multiplies the optimizer's learning rate for this parameter
};

struct ParamSpec {
  std::string name;
  std::vector<std::int64_t> shape;
  Init init;
  ParamOptions options;

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

// The index of a declared parameter: stable, cheap to copy, valid for the registry's store.
struct ParamHandle {
  std::uint32_t index = 0;
};

class ParamRegistry {
 public:
  ParamHandle declare(std::string name, std::vector<std::int64_t> shape, Init init = Init::zeros(),
                      ParamOptions options = {}) {
    if (name.empty()) throw error("ParamRegistry::declare: a parameter needs a name");
    if (by_name_.count(name)) throw error("ParamRegistry::declare: parameter '" + name + "' is declared twice");
    if (shape.empty() || shape.size() > static_cast<std::size_t>(max_rank)) {
      throw error("ParamRegistry::declare: parameter '" + name + "' has rank " + std::to_string(shape.size()) +
                  "; ranks 1 to " + std::to_string(max_rank) + " are supported");
    }
    std::int64_t n = 1;
    for (auto d : shape) {
      if (d <= 0)
        throw error("ParamRegistry::declare: parameter '" + name + "' has a dimension of " + std::to_string(d));
      if (n > (std::int64_t(1) << 40) / d) throw error("ParamRegistry::declare: parameter '" + name + "' is too large");
      n *= d;
    }
    if (!(options.lr_scale >= 0.0f)) {
      throw error("ParamRegistry::declare: parameter '" + name + "' has lr_scale " + std::to_string(options.lr_scale));
    }
    const ParamHandle h{static_cast<std::uint32_t>(specs_.size())};
    by_name_.emplace(name, h.index);
    specs_.push_back({std::move(name), std::move(shape), init, options});
    return h;
  }

  const std::vector<ParamSpec>& specs() const noexcept { return specs_; }
  std::size_t size() const noexcept { return specs_.size(); }
  const ParamSpec& operator[](ParamHandle h) const { return specs_.at(h.index); }

  ParamHandle handle(const std::string& name) const {
    auto it = by_name_.find(name);
    if (it == by_name_.end()) throw error("ParamRegistry: no parameter named '" + name + "'");
    return {it->second};
  }

  std::int64_t total_numel() const {
    std::int64_t n = 0;
    for (auto& s : specs_) n += s.numel();
    return n;
  }

 private:
  std::vector<ParamSpec> specs_;
  std::unordered_map<std::string, std::uint32_t> by_name_;
};

}  // namespace alloy
