// GPT-2's transformer block (pre-LayerNorm), built from the containers:
//   x = x + attn(ln_1(x))        Residual<Sequential<LayerNorm, CausalSelfAttention>>
//   x = x + mlp(ln_2(x))         Residual<Sequential<LayerNorm, Linear, Gelu, Linear>>
// and so it takes their fusions (sequential.hpp): each residual is added in its block's last
// product (attention's c_proj, the MLP's c_proj), each residual gradient in its LayerNorm's
// backward pass, and the MLP runs as two products each way with GELU (tanh, HF's gelu_new) in
// their epilogues.
//
// Names and initialization follow Hugging Face's GPT2LMHeadModel: with prefix
// "transformer.h.<i>" the block declares
//   transformer.h.<i>.ln_1.{weight,bias}, .attn.c_attn.{weight,bias}, .attn.c_proj.{weight,bias},
//   .ln_2.{weight,bias}, .mlp.c_fc.{weight,bias}, .mlp.c_proj.{weight,bias}
// LayerNorms ones and zeros (eps 1e-5), weights normal(0, 0.02), the two c_proj weights
// normal(0, 0.02 / sqrt(2 layers)) (GPT-2's scaled residual initialization), biases zero. The
// weights are alloy's Linear [out, in]; HF's Conv1D stores them [in, out], so moving weights to
// or from a GPT2LMHeadModel transposes the four that hf_gpt2_stores_transposed names.
#pragma once

#include <alloy/nn/attention.hpp>
#include <alloy/nn/gelu.hpp>
#include <alloy/nn/layernorm.hpp>
#include <alloy/nn/linear.hpp>
#include <alloy/nn/sequential.hpp>

#include <cmath>
#include <string>
#include <string_view>

namespace alloy::nn {

using Gpt2AttentionBlock = Residual<Sequential<LayerNorm, CausalSelfAttention>>;
using Gpt2MlpBlock = Residual<Sequential<LayerNorm, Linear, Gelu, Linear>>;
using Gpt2Block = Sequential<Gpt2AttentionBlock, Gpt2MlpBlock>;

// One block of a GPT-2 of `layers` blocks (the count sets c_proj's initialization), on
// sequences of `seq` positions (CausalSelfAttention: rows must be whole sequences). gelu: whether
// the MLP keeps GELU's output for backward (GeluOptions, gelu.hpp: 4 x channels values per row
// more activation memory, no recomputation pass).
inline Gpt2Block gpt2_block(const std::string& prefix, std::size_t channels, std::size_t heads, std::size_t seq,
                            std::size_t layers, float init_std = 0.02f, GeluOptions gelu = {}) {
  const Init weight = Init::normal(init_std);
  const Init projection = Init::normal(init_std / std::sqrt(2.0f * static_cast<float>(layers)));
  const Init zero = Init::zeros();
  const std::string attn = prefix + ".attn", mlp = prefix + ".mlp";
  return Gpt2Block(
      Gpt2AttentionBlock(Sequential(
          LayerNorm(prefix + ".ln_1", channels),
          CausalSelfAttention(Linear(attn + ".c_attn", channels, 3 * channels, true, weight, zero),
                              Linear(attn + ".c_proj", channels, channels, true, projection, zero), heads, seq))),
      Gpt2MlpBlock(Sequential(LayerNorm(prefix + ".ln_2", channels),
                              Linear(mlp + ".c_fc", channels, 4 * channels, true, weight, zero), Gelu(gelu),
                              Linear(mlp + ".c_proj", 4 * channels, channels, true, projection, zero))));
}

// Whether Hugging Face's GPT-2 stores the parameter of this name transposed from alloy's (its
// Conv1D weights: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj).
constexpr bool hf_gpt2_stores_transposed(std::string_view name) {
  for (std::string_view conv1d :
       {".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"}) {
    if (name.size() >= conv1d.size() && name.substr(name.size() - conv1d.size()) == conv1d) return true;
  }
  return false;
}

}  // namespace alloy::nn
