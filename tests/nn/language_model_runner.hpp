// A tiny language model for the tests of nn::Embedding and nn::LmHead, run by hand outside a
// trainer: token and position embedding, then the LM head fused with softmax cross-entropy (the
// head's input is the embedding's output), then the embedding's backward. The head's projection
// is the token table (tied) or its own. Also the float64 formulation the Host runs are checked
// against.
#pragma once

#include "../support/values.hpp"

#include <alloy/alloy.hpp>
#include <alloy/nn/nn.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace alloy::test {

struct LmShape {
  std::size_t batch = 1, seq = 37;
  std::size_t vocab = 97, padded_vocab = 101, dim = 40, max_positions = 41;
  std::size_t chunk_rows = 10;
  bool tied = true;
  std::int32_t ignore_index = -1;

  std::size_t rows() const { return batch * seq; }
  std::string describe() const {
    return "rows " + std::to_string(rows()) + " (" + std::to_string(batch) + " x " + std::to_string(seq) + "), dim " +
           std::to_string(dim) + ", vocab " + std::to_string(vocab) + " padded to " + std::to_string(padded_vocab) +
           ", chunks of " + std::to_string(chunk_rows) + (tied ? ", tied" : ", untied");
  }
};

struct TinyLanguageModel {
  nn::Embedding embed;
  nn::LmHead head;
  bool tie;

  explicit TinyLanguageModel(const LmShape& s)
      : embed("wte", "wpe",
              {.vocab = s.vocab, .padded_vocab = s.padded_vocab, .dim = s.dim, .max_positions = s.max_positions}),
        head("lm_head", {.vocab = s.vocab,
                         .padded_vocab = s.padded_vocab,
                         .dim = s.dim,
                         .chunk_rows = s.chunk_rows,
                         .ignore_index = s.ignore_index}),
        tie(s.tied) {}

  void declare(ParamRegistry& r) {
    embed.declare(r);
    if (tie) {
      head.tie_to(embed);
    } else {
      head.declare(r);
    }
  }
};

// Tokens in [0, vocab); a quarter of them one frequent token, so that it fills more than one
// 32-row segment of the embedding's backward at a few hundred rows.
inline std::vector<std::int32_t> random_tokens(std::size_t n, std::size_t vocab, std::mt19937_64& rng) {
  std::uniform_int_distribution<std::int32_t> d(0, static_cast<std::int32_t>(vocab) - 1);
  const std::int32_t frequent = d(rng);
  std::vector<std::int32_t> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = rng() % 4 == 0 ? frequent : d(rng);
  return t;
}

// The model, its parameters and one micro-batch at a time, on backend B.
template <class P, class B>
class LmHarness {
 public:
  using T = storage_t<typename P::compute_type>;
  using Store = ParamStore<P, SGD<>, B>;

  LmHarness(const LmShape& s, std::uint64_t seed) : shape_(s), model_(s), store_(declared(model_), B{}, seed) {}

  Store& store() { return store_; }
  TinyLanguageModel& model() { return model_; }

  // One micro-batch: embedding forward, the head forward and backward, the embedding backward.
  // Returns the loss; x() and dx() then hold the embedding's output and the gradient there.
  float step(const std::vector<std::int32_t>& tokens, const std::vector<std::int32_t>& targets, bool accumulate,
             float loss_scale = 1.0f) {
    ws_.reset();
    Context<Store> ctx(store_, ws_, loss_scale, accumulate, 0, 1, 0, 0, &res_);
    const auto x = model_.embed.forward(ctx, tokens, shape_.seq);
    const auto [loss, dx] = model_.head.forward_backward(ctx, Activation<const T>(x), targets);
    model_.embed.backward(ctx, Activation<const T>(dx));
    x_ = copy_out(x.data, x.size());
    dx_ = copy_out(dx.data, dx.size());
    peak_bytes_ = ws_.peak_bytes();
    return loss.value();
  }

  // The loss alone (LmHead::loss), nothing written.
  float evaluate(const std::vector<std::int32_t>& tokens, const std::vector<std::int32_t>& targets) {
    ws_.reset();
    Context<Store> ctx(store_, ws_, 1.0f, false, 0, 1, 0, 0, &res_);
    const auto x = model_.embed.forward(ctx, tokens, shape_.seq);
    return model_.head.loss(ctx, Activation<const T>(x), targets).value();
  }

  // The logits of every row (LmHead::logits), rows x padded_vocab; x() then holds the head's input.
  std::vector<T> logits(const std::vector<std::int32_t>& tokens) {
    ws_.reset();
    Context<Store> ctx(store_, ws_, 1.0f, false, 0, 1, 0, 0, &res_);
    const auto x = model_.embed.forward(ctx, tokens, shape_.seq);
    const auto logits = model_.head.logits(ctx, Activation<const T>(x));
    x_ = copy_out(x.data, x.size());
    return copy_out(logits.data, logits.size());
  }

  const std::vector<T>& x() const { return x_; }
  const std::vector<T>& dx() const { return dx_; }
  std::size_t peak_bytes() const { return peak_bytes_; }

  // Every parameter drawn afresh from N(0, stddev) (logits of a useful spread, unlike GPT-2's
  // 0.02 initialization at these widths).
  void randomize_params(double stddev, std::mt19937_64& rng) {
    set_params(normal<T>(store_.params_arena().size(), 0.0, stddev, rng));
  }

  std::vector<T> params() { return to_host(store_.params_arena()); }
  std::vector<T> grads() { return to_host(store_.grads_arena()); }
  void set_params(const std::vector<T>& v) { copy_from_host(store_.params_arena(), std::span<const T>(v)); }
  void set_grads(const std::vector<T>& v) { copy_from_host(store_.grads_arena(), std::span<const T>(v)); }

  // One parameter's slice of an arena copy.
  template <class U>
  std::vector<U> slice(const std::vector<U>& arena, const std::string& name) const {
    const auto& entry = store_.layout()[store_.registry().handle(name).index];
    return std::vector<U>(arena.begin() + entry.offset, arena.begin() + entry.offset + entry.numel);
  }
  std::size_t offset(const std::string& name) const {
    return store_.layout()[store_.registry().handle(name).index].offset;
  }
  std::vector<T> grad(const std::string& name) {
    synchronize(B{});
    return slice(grads(), name);
  }
  std::vector<T> param(const std::string& name) { return slice(params(), name); }

 private:
  static ParamRegistry declared(TinyLanguageModel& m) {
    ParamRegistry r;
    m.declare(r);
    return r;
  }

  std::vector<T> copy_out(const T* p, std::size_t n) {
    Buffer<T, B> out(n);
    for_each_n(B{}, n, alloy::detail::CopyActivation<T>{}, in(p), alloy::out(out.data()));
    return to_host(out);
  }

  LmShape shape_;
  TinyLanguageModel model_;
  Store store_;
  Workspace<B> ws_;
  BackendResources<B> res_;
  std::vector<T> x_, dx_;
  std::size_t peak_bytes_ = 0;
};

// The head in float64 from its input x (rows x dim) and W (padded_vocab x dim): the mean loss
// over the rows not ignored, dy = d(loss * scale)/dx, and dW.
struct HeadReference {
  double loss = 0;
  std::vector<double> dy, dw;
};

template <class T>
HeadReference head_reference(const LmShape& s, const std::vector<T>& x, const std::vector<T>& w,
                             const std::vector<std::int32_t>& targets, double loss_scale = 1.0) {
  const std::size_t rows = s.rows(), d = s.dim, V = s.padded_vocab;
  HeadReference ref{0, std::vector<double>(rows * d, 0.0), std::vector<double>(V * d, 0.0)};
  std::size_t counted = 0;
  for (auto t : targets) counted += t != s.ignore_index;
  const double scale = loss_scale / double(counted);
  std::vector<double> logits(s.vocab);
  for (std::size_t r = 0; r < rows; ++r) {
    if (targets[r] == s.ignore_index) continue;
    double m = -INFINITY;
    for (std::size_t v = 0; v < s.vocab; ++v) {
      double acc = 0;
      for (std::size_t c = 0; c < d; ++c) acc += value(x[r * d + c]) * value(w[v * d + c]);
      logits[v] = acc;
      m = std::max(m, acc);
    }
    double sum = 0;
    for (std::size_t v = 0; v < s.vocab; ++v) sum += std::exp(logits[v] - m);
    ref.loss += std::log(sum) + m - logits[std::size_t(targets[r])];
    for (std::size_t v = 0; v < s.vocab; ++v) {
      const double g = (std::exp(logits[v] - m) / sum - (v == std::size_t(targets[r]) ? 1.0 : 0.0)) * scale;
      for (std::size_t c = 0; c < d; ++c) {
        ref.dy[r * d + c] += g * value(w[v * d + c]);
        ref.dw[v * d + c] += g * value(x[r * d + c]);
      }
    }
  }
  ref.loss /= double(counted);
  return ref;
}

// The mean loss in float64 from the parameters themselves (wte, wpe, and W: wte when tied):
// for finite differences free of fp32 rounding.
inline double reference_loss(const LmShape& s, const std::vector<double>& wte, const std::vector<double>& wpe,
                             const std::vector<double>& w, const std::vector<std::int32_t>& tokens,
                             const std::vector<std::int32_t>& targets) {
  std::vector<double> xd(s.rows() * s.dim);
  for (std::size_t r = 0; r < s.rows(); ++r) {
    for (std::size_t c = 0; c < s.dim; ++c) {
      xd[r * s.dim + c] = wte[std::size_t(tokens[r]) * s.dim + c] + wpe[(r % s.seq) * s.dim + c];
    }
  }
  double loss = 0;
  std::size_t counted = 0;
  std::vector<double> logits(s.vocab);
  for (std::size_t r = 0; r < s.rows(); ++r) {
    if (targets[r] == s.ignore_index) continue;
    ++counted;
    double m = -INFINITY;
    for (std::size_t v = 0; v < s.vocab; ++v) {
      double acc = 0;
      for (std::size_t c = 0; c < s.dim; ++c) acc += xd[r * s.dim + c] * w[v * s.dim + c];
      logits[v] = acc;
      m = std::max(m, acc);
    }
    double sum = 0;
    for (std::size_t v = 0; v < s.vocab; ++v) sum += std::exp(logits[v] - m);
    loss += std::log(sum) + m - logits[std::size_t(targets[r])];
  }
  return loss / double(counted);
}

// ||got - want|| / ||want||.
template <class T>
double relative_error(const std::vector<T>& got, const std::vector<double>& want) {
  EXPECT_EQ(got.size(), want.size());
  double error = 0, norm = 0;
  for (std::size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    const double g = value(got[i]);
    error += (g - want[i]) * (g - want[i]);
    norm += want[i] * want[i];
  }
  return norm > 0 ? std::sqrt(error / norm) : std::sqrt(error);
}

template <class T>
std::vector<double> widened(const std::vector<T>& v) {
  std::vector<double> w(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) w[i] = value(v[i]);
  return w;
}

}  // namespace alloy::test
