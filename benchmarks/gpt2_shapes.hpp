// Parameter lists shaped like GPT-2, one tensor per weight and bias, as ../shared/PEERS.md
// measured them: 124M (d 768, 12 layers, 148 tensors) and 1.56B (d 1600, 48 layers, 580).
#pragma once

#include <alloy/memory/registry.hpp>

#include <string>

namespace alloy::bench {

struct Gpt2Shape {
  const char* name;
  std::int64_t d;
  int layers;
};
inline constexpr Gpt2Shape gpt2_124m{"124M", 768, 12};
inline constexpr Gpt2Shape gpt2_1558m{"1.56B", 1600, 48};

// Matrices decay, vectors do not (the usual GPT-2 parameter groups).
inline ParamRegistry gpt2_registry(const Gpt2Shape& s, std::int64_t vocab = 50257, std::int64_t ctx = 1024) {
  ParamRegistry r;
  const auto d = s.d;
  const ParamOptions no_decay{.weight_decay = false};
  r.declare("wte", {vocab, d}, Init::normal(0.02f));
  r.declare("wpe", {ctx, d}, Init::normal(0.01f));
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    r.declare(p + "ln_1.weight", {d}, Init::ones(), no_decay);
    r.declare(p + "ln_1.bias", {d}, Init::zeros(), no_decay);
    r.declare(p + "attn.c_attn.weight", {d, 3 * d}, Init::normal(0.02f));
    r.declare(p + "attn.c_attn.bias", {3 * d}, Init::zeros(), no_decay);
    r.declare(p + "attn.c_proj.weight", {d, d}, Init::normal(0.02f));
    r.declare(p + "attn.c_proj.bias", {d}, Init::zeros(), no_decay);
    r.declare(p + "ln_2.weight", {d}, Init::ones(), no_decay);
    r.declare(p + "ln_2.bias", {d}, Init::zeros(), no_decay);
    r.declare(p + "mlp.c_fc.weight", {d, 4 * d}, Init::normal(0.02f));
    r.declare(p + "mlp.c_fc.bias", {4 * d}, Init::zeros(), no_decay);
    r.declare(p + "mlp.c_proj.weight", {4 * d, d}, Init::normal(0.02f));
    r.declare(p + "mlp.c_proj.bias", {d}, Init::zeros(), no_decay);
  }
  r.declare("ln_f.weight", {d}, Init::ones(), no_decay);
  r.declare("ln_f.bias", {d}, Init::zeros(), no_decay);
  return r;
}

}  // namespace alloy::bench
