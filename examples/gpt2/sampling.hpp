// Forward passes of the GPT-2 example outside a training step: the logits of chosen rows, through
// a context built by hand over the trainer's parameters (the Trainer has no evaluation API), and
// sampling from them.
#pragma once

#include "gpt2_model.hpp"

#include <algorithm>
#include <cmath>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace gpt2 {

// A context over the trainer's parameters for forward passes outside a training step.
template <class Trainer>
struct Evaluation {
  using B = typename Trainer::backend_type;
  explicit Evaluation(Trainer& t) : trainer(t), workspace(t.store().backend()), resources(t.store().backend()) {}

  // The logits (floats, rows.size() x padded_vocab) of `rows` of whole sequences of tokens.
  std::vector<float> logits(std::span<const std::int32_t> tokens, std::span<const std::size_t> rows) {
    workspace.reset();
    typename Trainer::context_type ctx(trainer.store(), workspace, 1.0f, false, 0, 1, trainer.steps(), 0, &resources);
    const auto l = trainer.model().logits(ctx, tokens, rows);
    return alloy::to_host_as_float(trainer.store().backend(), l.data, l.size());
  }

  Trainer& trainer;
  alloy::Workspace<B> workspace;
  alloy::BackendResources<B> resources;
};

// `n` tokens after `prompt`, each drawn from softmax(logits / temperature) over the top_k most
// likely tokens of the last position. The model sees the last `seq` tokens (the rest of its
// window, when there are fewer, is padding that causal attention keeps from the rows read).
template <class Trainer>
std::vector<std::int32_t> sample(Trainer& trainer, std::vector<std::int32_t> prompt, int n, float temperature,
                                 int top_k, std::mt19937_64& rng) {
  const Config& c = trainer.model().config();
  Evaluation<Trainer> eval(trainer);
  std::vector<std::int32_t> window(c.seq), out;
  std::vector<std::pair<float, std::int32_t>> ranked(c.vocab);
  for (int i = 0; i < n; ++i) {
    const std::size_t used = std::min(prompt.size(), c.seq);
    std::fill(window.begin(), window.end(), 0);
    std::copy(prompt.end() - std::ptrdiff_t(used), prompt.end(), window.begin());
    const std::size_t row = used - 1;
    const std::vector<float> logits = eval.logits(window, std::span(&row, 1));
    for (std::size_t v = 0; v < c.vocab; ++v) ranked[v] = {logits[v], std::int32_t(v)};
    const std::size_t k = std::clamp<std::size_t>(std::size_t(top_k), 1, c.vocab);
    std::partial_sort(ranked.begin(), ranked.begin() + std::ptrdiff_t(k), ranked.end(),
                      [](const auto& a, const auto& b) { return a.first > b.first; });
    std::vector<double> weights(k);
    for (std::size_t j = 0; j < k; ++j) weights[j] = std::exp((ranked[j].first - ranked[0].first) / temperature);
    std::discrete_distribution<std::size_t> pick(weights.begin(), weights.end());
    const std::int32_t next = ranked[pick(rng)].second;
    prompt.push_back(next);
    out.push_back(next);
  }
  return out;
}

// Tokens as text: bytes, with control characters but newline and tab shown as '?'.
inline std::string as_text(const std::vector<std::int32_t>& tokens) {
  std::string s;
  for (auto t : tokens) {
    const bool printable = t == '\n' || t == '\t' || (t >= 32 && t < 256 && t != 127);
    s += printable ? static_cast<char>(t) : '?';
  }
  return s;
}

}  // namespace gpt2
