// CausalSelfAttention and GPT-2's transformer block on the Host backend: the layer against a
// float64 formulation (the whole seq x seq matrix, forward and backward) and against finite
// differences; the block's gradients against finite differences; recomputation (nn::Repeated and
// the trainer's Checkpointing) bit-identical to keeping activations; Residual's add in c_proj's
// product; accumulated gradients; Hugging Face's names; the errors bad shapes raise.
//
// Sizes are small and odd: 2 sequences of 37 positions, 48 channels in 3 heads of 16 or 2 of 24
// (the row path of the kernel; the Cuda tests take head_dim 64 to the tensor cores).
#include "block_runner.hpp"

#include "../optim/reference.hpp"
#include "../support/attention_reference.hpp"
#include "../support/finite_differences.hpp"
#include "../support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace {

using namespace alloy;
using alloy::test::BlockRun;
using alloy::test::PassThrough;

namespace nn = alloy::nn;

struct Shape {
  std::size_t batch, seq, channels, heads;
  std::size_t rows() const { return batch * seq; }
};

std::string describe(const Shape& s) {
  return "batch " + std::to_string(s.batch) + ", seq " + std::to_string(s.seq) + ", channels " +
         std::to_string(s.channels) + ", heads " + std::to_string(s.heads);
}

// ---- The float64 formulation ----

struct Reference {
  std::vector<double> y, dx, c_attn_weight, c_attn_bias, c_proj_weight, c_proj_bias;  // outputs and gradients
};

// out (rows x n_out) = in (rows x n_in) W^T + b, W [n_out, n_in].
std::vector<double> linear(const std::vector<double>& in, std::size_t rows, std::size_t n_in,
                           const std::vector<double>& w, const std::vector<double>& b, std::size_t n_out) {
  std::vector<double> out(rows * n_out);
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t o = 0; o < n_out; ++o) {
      double acc = b[o];
      for (std::size_t i = 0; i < n_in; ++i) acc += in[r * n_in + i] * w[o * n_in + i];
      out[r * n_out + o] = acc;
    }
  }
  return out;
}

// Linear's backward: dW = dy^T in, db = column sums of dy, and d_in = dy W.
void linear_backward(const std::vector<double>& in, const std::vector<double>& dy, std::size_t rows, std::size_t n_in,
                     const std::vector<double>& w, std::size_t n_out, std::vector<double>& dw, std::vector<double>& db,
                     std::vector<double>& d_in) {
  dw.assign(n_out * n_in, 0.0);
  db.assign(n_out, 0.0);
  d_in.assign(rows * n_in, 0.0);
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t o = 0; o < n_out; ++o) {
      const double g = dy[r * n_out + o];
      db[o] += g;
      for (std::size_t i = 0; i < n_in; ++i) {
        dw[o * n_in + i] += g * in[r * n_in + i];
        d_in[r * n_in + i] += g * w[o * n_in + i];
      }
    }
  }
}

// y = causal_attention(x W_a^T + b_a) W_p^T + b_p and its gradients from dy, the softmax held
// whole for each (sequence, head).
Reference reference(const Shape& s, const std::vector<double>& x, const std::vector<double>& wa,
                    const std::vector<double>& ba, const std::vector<double>& wp, const std::vector<double>& bp,
                    const std::vector<double>& dy) {
  const std::size_t C = s.channels, R = s.rows(), T = s.seq, D = C / s.heads;
  const double scale = 1.0 / std::sqrt(double(D));
  const auto qkv = linear(x, R, C, wa, ba, 3 * C);
  // Element d of head h's q (which 0), k (1) or v (2) at position t of sequence b.
  const auto at = [&](std::size_t b, std::size_t t, std::size_t h, std::size_t which, std::size_t d) {
    return (b * T + t) * 3 * C + which * C + h * D + d;
  };
  std::vector<double> att(R * C, 0.0), probs(s.batch * s.heads * T * T, 0.0);
  const auto prob = [&](std::size_t b, std::size_t h, std::size_t t, std::size_t j) -> double& {
    return probs[((b * s.heads + h) * T + t) * T + j];
  };
  for (std::size_t b = 0; b < s.batch; ++b) {
    for (std::size_t h = 0; h < s.heads; ++h) {
      for (std::size_t t = 0; t < T; ++t) {
        double m = -INFINITY, sum = 0;
        for (std::size_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (std::size_t d = 0; d < D; ++d) dot += qkv[at(b, t, h, 0, d)] * qkv[at(b, j, h, 1, d)];
          prob(b, h, t, j) = dot * scale;
          m = std::max(m, dot * scale);
        }
        for (std::size_t j = 0; j <= t; ++j) sum += std::exp(prob(b, h, t, j) - m);
        for (std::size_t j = 0; j <= t; ++j) {
          prob(b, h, t, j) = std::exp(prob(b, h, t, j) - m) / sum;
          for (std::size_t d = 0; d < D; ++d)
            att[(b * T + t) * C + h * D + d] += prob(b, h, t, j) * qkv[at(b, j, h, 2, d)];
        }
      }
    }
  }
  Reference ref;
  ref.y = linear(att, R, C, wp, bp, C);
  std::vector<double> d_att;
  linear_backward(att, dy, R, C, wp, C, ref.c_proj_weight, ref.c_proj_bias, d_att);
  std::vector<double> dqkv(R * 3 * C, 0.0), dp(T);
  for (std::size_t b = 0; b < s.batch; ++b) {
    for (std::size_t h = 0; h < s.heads; ++h) {
      for (std::size_t t = 0; t < T; ++t) {
        double delta = 0;
        for (std::size_t j = 0; j <= t; ++j) {
          dp[j] = 0;
          for (std::size_t d = 0; d < D; ++d) dp[j] += d_att[(b * T + t) * C + h * D + d] * qkv[at(b, j, h, 2, d)];
          delta += prob(b, h, t, j) * dp[j];
        }
        for (std::size_t j = 0; j <= t; ++j) {
          const double ds = prob(b, h, t, j) * (dp[j] - delta);
          for (std::size_t d = 0; d < D; ++d) {
            dqkv[at(b, t, h, 0, d)] += scale * ds * qkv[at(b, j, h, 1, d)];
            dqkv[at(b, j, h, 1, d)] += scale * ds * qkv[at(b, t, h, 0, d)];
            dqkv[at(b, j, h, 2, d)] += prob(b, h, t, j) * d_att[(b * T + t) * C + h * D + d];
          }
        }
      }
    }
  }
  linear_backward(x, dqkv, R, C, wa, 3 * C, ref.c_attn_weight, ref.c_attn_bias, ref.dx);
  return ref;
}

template <class T>
std::vector<double> widened(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = to_float(v[i]);
  return out;
}

// ||got - want|| / ||want||.
template <class T>
double relative_error(const std::vector<T>& got, const std::vector<double>& want) {
  EXPECT_EQ(got.size(), want.size());
  double error = 0, norm = 0;
  for (std::size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    const double g = to_float(got[i]);
    error += (g - want[i]) * (g - want[i]);
    norm += want[i] * want[i];
  }
  return std::sqrt(error / norm);
}

template <class P>
using value_t = storage_t<typename P::compute_type>;

// The store's parameters for `block` drawn from seed (what run_block uses with the same seed).
template <class P, class Block>
std::vector<value_t<P>> parameters(Block& block, std::uint64_t seed) {
  ParamRegistry r;
  block.declare(r);
  return to_host(ParamStore<P, SGD<>, Host>(r, Host{}, seed).params_arena());
}

// The values of one parameter of an arena laid out by `block`'s declarations.
template <class P, class Block, class T = value_t<P>>
std::vector<double> parameter(Block& block, const std::vector<T>& arena, const std::string& name) {
  ParamRegistry r;
  block.declare(r);
  const ParamStore<P, SGD<>, Host> store(r, Host{}, 0);
  const auto& entry = store.layout()[r.handle(name).index];
  return widened(std::vector<T>(arena.begin() + entry.offset, arena.begin() + entry.offset + entry.numel));
}

// Relative Frobenius error against float64, per dtype. The 16-bit runs round qkv, P, att, dS
// and every product's output to the dtype (unit roundoff 2^-9 for bf16, 2^-12 for fp16), a few
// roundings in sequence; tf32 rounds every product's factors (the projections' and attention's,
// P and dS among them) to 2^-11; fp32 rounds in fp32 only. Measured on these shapes: at most
// 3.4e-7 (fp32), 6.7e-4 (tf32), 4.0e-3 (bf16), 6.8e-4 (fp16); the tolerances leave 3x to 6x.
template <class P>
double float64_tolerance() {
  using T = typename P::compute_type;
  return std::is_same_v<T, float> ? 2e-6 : std::is_same_v<T, tf32> ? 3e-3 : std::is_same_v<T, bf16> ? 1.2e-2 : 2e-3;
}

template <class P>
void expect_layer_within_float64(const Shape& s, std::uint64_t seed) {
  using T = value_t<P>;
  SCOPED_TRACE(describe(s));
  std::mt19937_64 rng(seed);
  nn::CausalSelfAttention layer("attn", s.channels, s.heads, s.seq);
  const auto params = parameters<P>(layer, seed);
  const auto x = test::random_values<T>(s.rows() * s.channels, rng);
  const auto dy = test::random_values<T>(s.rows() * s.channels, rng);
  const BlockRun<T> run = test::run_block<P, Host>(layer, x, dy, s.rows(), s.channels, seed, &params);
  const Reference ref = reference(
      s, widened(x), parameter<P>(layer, params, "attn.c_attn.weight"), parameter<P>(layer, params, "attn.c_attn.bias"),
      parameter<P>(layer, params, "attn.c_proj.weight"), parameter<P>(layer, params, "attn.c_proj.bias"), widened(dy));
  const double tolerance = float64_tolerance<P>();
  EXPECT_LT(relative_error(run.y, ref.y), tolerance) << "y";
  EXPECT_LT(relative_error(run.dx, ref.dx), tolerance) << "dx";
  EXPECT_LT(relative_error(run.grads.at("attn.c_attn.weight"), ref.c_attn_weight), tolerance) << "c_attn.weight";
  EXPECT_LT(relative_error(run.grads.at("attn.c_attn.bias"), ref.c_attn_bias), tolerance) << "c_attn.bias";
  EXPECT_LT(relative_error(run.grads.at("attn.c_proj.weight"), ref.c_proj_weight), tolerance) << "c_proj.weight";
  EXPECT_LT(relative_error(run.grads.at("attn.c_proj.bias"), ref.c_proj_bias), tolerance) << "c_proj.bias";
}

template <class P>
class CausalSelfAttentionHost : public ::testing::Test {};

struct PrecisionName {
  template <class P>
  static std::string GetName(int) {
    return numeric_traits<typename P::compute_type>::name;
  }
};

using Precisions = ::testing::Types<Precision<fp32>, Precision<tf32>, Precision<bf16>, Precision<fp16>>;
TYPED_TEST_SUITE(CausalSelfAttentionHost, Precisions, PrecisionName);

// Heads of 16 and 24; a sequence past the kernel's key block of 64; one head of 8.
TYPED_TEST(CausalSelfAttentionHost, IsWithinItsToleranceOfFloat64) {
  ALLOY_SEEDED(seed);
  for (const Shape& s : {Shape{2, 37, 48, 3}, Shape{2, 37, 48, 2}, Shape{1, 70, 32, 2}, Shape{3, 5, 8, 1}}) {
    expect_layer_within_float64<TypeParam>(s, seed + s.seq + s.heads);
  }
}

// A position's output depends on its own sequence's positions up to it, and on no other.
TEST(CausalSelfAttention, OutputsSeeOnlyEarlierPositionsOfTheirOwnSequence) {
  ALLOY_SEEDED(seed);
  const Shape s{3, 37, 48, 3};
  std::mt19937_64 rng(seed);
  nn::CausalSelfAttention layer("attn", s.channels, s.heads, s.seq);
  const auto params = parameters<Precision<fp32>>(layer, seed);
  auto x = test::random_values<float>(s.rows() * s.channels, rng);
  const auto dy = test::random_values<float>(s.rows() * s.channels, rng);
  const auto before = test::run_block<Precision<fp32>, Host>(layer, x, dy, s.rows(), s.channels, seed, &params);
  const std::size_t changed_row = s.seq + 20;  // position 20 of sequence 1
  for (std::size_t c = 0; c < s.channels; ++c) x[changed_row * s.channels + c] += 1.0f;
  const auto after = test::run_block<Precision<fp32>, Host>(layer, x, dy, s.rows(), s.channels, seed, &params);
  std::size_t unchanged_that_should_change = 0, changed_that_should_not = 0;
  for (std::size_t r = 0; r < s.rows(); ++r) {
    const bool may_change = r >= changed_row && r < 2 * s.seq;
    std::size_t differ = 0;
    for (std::size_t c = 0; c < s.channels; ++c) {
      differ += test::bits_of(before.y[r * s.channels + c]) != test::bits_of(after.y[r * s.channels + c]);
    }
    if (may_change) {
      unchanged_that_should_change += differ == 0;
    } else {
      changed_that_should_not += differ != 0;
    }
  }
  EXPECT_EQ(changed_that_should_not, 0u) << "rows before position 20 of sequence 1, or in other sequences, changed";
  EXPECT_EQ(unchanged_that_should_change, 0u) << "rows from position 20 of sequence 1 on did not change";
}

// ---- Finite differences (fp32) ----

// A block in a fp32 store on Host with fixed x and g, and L = sum(y * g) in double: its gradient
// with respect to y is g, the dy backward is seeded with.
template <class Block>
struct FiniteDifferences {
  using Store = ParamStore<Precision<fp32>, SGD<>, Host>;
  Block& block;
  Shape s;
  ParamRegistry registry;
  std::unique_ptr<Store> store;
  Workspace<Host> ws;
  BackendResources<Host> res;
  std::vector<float> x, g, dx, grads;

  FiniteDifferences(Block& b, const Shape& shape, std::uint64_t seed, float g_scale) : block(b), s(shape) {
    block.declare(registry);
    store = std::make_unique<Store>(registry, Host{}, seed);
    std::mt19937_64 rng(seed + 1);
    x = test::random_values<float>(s.rows() * s.channels, rng);
    g = test::random_values<float>(s.rows() * s.channels, rng);
    for (float& v : g) v *= g_scale;
    ws.reset();
    Context<Store> ctx(*store, ws, 1.0f, false, 0, 1, 0, 0, &res);
    block.forward(ctx, Activation<const float>(x.data(), s.rows(), s.channels));
    const auto d = block.backward(ctx, Activation<const float>(g.data(), s.rows(), s.channels));
    dx.assign(d.data, d.data + d.size());
    grads = to_host(store->grads_arena());
  }

  double loss() {
    ws.reset();
    Context<Store> ctx(*store, ws, 1.0f, false, 0, 1, 0, 0, &res);
    const auto y = block.forward(ctx, Activation<const float>(x.data(), s.rows(), s.channels));
    double sum = 0;
    for (std::size_t i = 0; i < y.size(); ++i) sum += double(y.data[i]) * g[i];
    return sum;
  }

  // Elements of dx: the first, two in the middle of the first two sequences, the last; the
  // central difference with finite_differences.hpp's step and tolerance.
  void expect_dx_elements_match() {
    for (std::size_t i :
         {std::size_t(0), (s.seq / 2) * s.channels + 5, (s.seq + s.seq / 3) * s.channels + 11, x.size() - 1}) {
      const float keep = x[i];
      const float step = 1e-2f * std::max(1.0f, std::fabs(keep));
      x[i] = keep + step;
      const double up = loss();
      x[i] = keep - step;
      const double down = loss();
      x[i] = keep;
      const double numeric = (up - down) / (2.0 * step);
      EXPECT_NEAR(dx[i], numeric, 2e-3 * std::fabs(numeric) + 2e-4) << "dx[" << i << "]";
    }
  }

  // The derivative of L along a random direction u ~ N(0, 1) over a whole tensor (every element
  // of a parameter, or of x), (L(p + h u) - L(p - h u)) / 2h, against sum_i gradient_i u_i, which
  // is of the size of |gradient| (its standard deviation over u). Summing every element's
  // gradient puts the fp32 loss's rounding, divided by h, far below it, even where single
  // elements' gradients are tiny (k's bias has none: softmax ignores it). h moves the tensor by
  // 1e-3 of its root mean square, or of 1 (biases start at 0), so that the second-order error of the
  // difference stays far below the tolerance, 0.5% of |gradient| (seen: up to 0.05%).
  void expect_directional_derivative_matches(const std::string& what, float* values, const float* gradient,
                                             std::size_t n, std::mt19937_64& rng) {
    const auto u = test::random_values<float>(n, rng);
    double sum_squares = 0, analytic = 0, gradient_norm = 0;
    for (std::size_t i = 0; i < n; ++i) {
      sum_squares += double(values[i]) * values[i];
      analytic += double(gradient[i]) * u[i];
      gradient_norm += double(gradient[i]) * gradient[i];
    }
    gradient_norm = std::sqrt(gradient_norm);
    const float h = float(1e-3 * std::max(std::sqrt(sum_squares / n), 1.0));
    const std::vector<float> keep(values, values + n);
    for (std::size_t i = 0; i < n; ++i) values[i] = keep[i] + h * u[i];
    const double up = loss();
    for (std::size_t i = 0; i < n; ++i) values[i] = keep[i] - h * u[i];
    const double down = loss();
    std::copy(keep.begin(), keep.end(), values);
    const double numeric = (up - down) / (2.0 * double(h));
    EXPECT_NEAR(analytic, numeric, 5e-3 * gradient_norm) << "the derivative along a random direction of " << what;
  }

  void expect_directional_derivatives_match(std::initializer_list<const char*> names, std::uint64_t seed) {
    std::mt19937_64 rng(seed + 2);
    for (const char* name : names) {
      const auto h = registry.handle(name);
      auto p = store->param(h);
      expect_directional_derivative_matches(name, p.data, grads.data() + store->layout()[h.index].offset,
                                            std::size_t(p.numel()), rng);
    }
    expect_directional_derivative_matches("x", x.data(), dx.data(), x.size(), rng);
  }
};

TEST(CausalSelfAttention, GradientsMatchFiniteDifferences) {
  ALLOY_SEEDED(seed);
  for (const Shape& s : {Shape{2, 37, 48, 3}, Shape{2, 37, 48, 2}}) {
    SCOPED_TRACE(describe(s));
    nn::CausalSelfAttention layer("attn", s.channels, s.heads, s.seq);
    FiniteDifferences fd(layer, s, seed, 1.0f);
    const auto names = {"attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias"};
    test::expect_gradients_match_finite_differences(*fd.store, fd.grads, names, [&] { return fd.loss(); });
    fd.expect_dx_elements_match();
    fd.expect_directional_derivatives_match(names, seed);
  }
}

// The whole block, LayerNorms and MLP included, initialized wider than GPT-2's 0.02 so that the
// softmax is far from uniform and every path carries gradient: each parameter tensor and x along
// a random direction.
TEST(Gpt2Block, GradientsMatchFiniteDifferences) {
  ALLOY_SEEDED(seed);
  const Shape s{2, 37, 48, 3};
  auto block = nn::gpt2_block("h.0", s.channels, s.heads, s.seq, 2, 0.25f);
  FiniteDifferences fd(block, s, seed, 0.1f);
  fd.expect_directional_derivatives_match(
      {"h.0.ln_1.weight", "h.0.ln_1.bias", "h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias", "h.0.attn.c_proj.weight",
       "h.0.attn.c_proj.bias", "h.0.ln_2.weight", "h.0.ln_2.bias", "h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias",
       "h.0.mlp.c_proj.weight", "h.0.mlp.c_proj.bias"},
      seed);
}

// ---- Recomputation ----

nn::Repeated<nn::Gpt2Block> gpt2_blocks(const Shape& s, std::size_t n) {
  std::vector<nn::Gpt2Block> blocks;
  for (std::size_t i = 0; i < n; ++i) {
    blocks.push_back(nn::gpt2_block("h." + std::to_string(i), s.channels, s.heads, s.seq, n, 0.25f));
  }
  return nn::Repeated<nn::Gpt2Block>(std::move(blocks));
}

template <class P>
void expect_recomputation_gives_the_same_bits(std::uint64_t seed) {
  using T = value_t<P>;
  const Shape s{2, 37, 48, 3};
  std::mt19937_64 rng(seed);
  const auto x = test::random_values<T>(s.rows() * s.channels, rng);
  const auto dy = test::random_values<T>(s.rows() * s.channels, rng);
  std::vector<BlockRun<T>> runs;
  for (int every : {0, 1, 2}) {
    auto blocks = gpt2_blocks(s, 3);
    runs.push_back(test::run_block<P, Host>(blocks, x, dy, s.rows(), s.channels, seed, nullptr, nullptr, false, every));
  }
  for (std::size_t i = 1; i < runs.size(); ++i) {
    SCOPED_TRACE("recomputing every " + std::to_string(i) + " blocks");
    test::expect_same_bits(runs[i], runs[0]);
  }
  EXPECT_LT(runs[1].bytes_after_forward, runs[0].bytes_after_forward);
}

TEST(Gpt2Block, RecomputingGivesTheSameBits) {
  ALLOY_SEEDED(seed);
  expect_recomputation_gives_the_same_bits<Precision<bf16>>(seed);
  expect_recomputation_gives_the_same_bits<Precision<fp32>>(seed);
}

// forward_for_backward (what recomputing a segment's last block runs) keeps what forward keeps:
// the layer skips c_proj's product, the block its MLP's c_proj (and the attention's residual sum
// stays, the MLP's input); the same gradient bits, no output, less memory.
template <class Block>
void expect_forward_for_backward_keeps_what_backward_needs(Block block, const Shape& s, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto x = test::random_values<bf16>(s.rows() * s.channels, rng);
  const auto dy = test::random_values<bf16>(s.rows() * s.channels, rng);
  const auto full = test::run_block<Precision<bf16>, Host>(block, x, dy, s.rows(), s.channels, seed);
  const auto lean =
      test::run_block<Precision<bf16>, Host>(block, x, dy, s.rows(), s.channels, seed, nullptr, nullptr, true);
  EXPECT_EQ(test::bits(lean.dx), test::bits(full.dx)) << "dx";
  ASSERT_EQ(lean.grads.size(), full.grads.size());
  for (const auto& [name, g] : full.grads) EXPECT_EQ(test::bits(lean.grads.at(name)), test::bits(g)) << name;
  EXPECT_TRUE(lean.y.empty());
  const std::size_t output = (s.rows() * s.channels * sizeof(bf16) + Workspace<Host>::alignment - 1) /
                             Workspace<Host>::alignment * Workspace<Host>::alignment;
  EXPECT_EQ(lean.bytes_after_forward + output, full.bytes_after_forward);
}

TEST(Gpt2Block, ForwardForBackwardGivesTheSameGradientsWithoutTheOutput) {
  ALLOY_SEEDED(seed);
  const Shape s{2, 37, 48, 3};
  expect_forward_for_backward_keeps_what_backward_needs(nn::CausalSelfAttention("attn", s.channels, s.heads, s.seq), s,
                                                        seed);
  expect_forward_for_backward_keeps_what_backward_needs(nn::gpt2_block("h.0", s.channels, s.heads, s.seq, 2, 0.25f), s,
                                                        seed);
}

// A GPT-2 block's dx lies where its forward began (its first LayerNorm's output): the attention's
// c_attn writes its dx over that input, LayerNorm's backward over that, and the trainer keeps it
// there without a copy (train/recompute.hpp's move_down). The same gradients as ever: the other
// tests of this file compare them.
TEST(Gpt2Block, DxLiesWhereTheBlocksForwardBegan) {
  ALLOY_SEEDED(seed);
  const Shape s{2, 37, 48, 3};
  std::mt19937_64 rng(seed);
  const auto x = test::random_values<bf16>(s.rows() * s.channels, rng);
  const auto dy = test::random_values<bf16>(s.rows() * s.channels, rng);
  const auto where = [&](auto block) {
    return test::run_block<Precision<bf16>, Host>(block, x, dy, s.rows(), s.channels, seed).dx_where_forward_began;
  };
  EXPECT_TRUE(where(nn::gpt2_block("h.0", s.channels, s.heads, s.seq, 2, 0.25f)));
  const nn::GeluOptions keep{.keep_output = true};
  EXPECT_TRUE(where(nn::gpt2_block("h.0", s.channels, s.heads, s.seq, 2, 0.25f, keep)));
}

// A small GPT-like LayeredModel for the trainer: features -> Linear -> GPT-2 blocks -> LayerNorm
// -> Linear -> softmax cross-entropy (the embedding and tied head are another issue's).
struct TinyGptBatch {
  std::vector<float> x;             // rows x inputs
  std::vector<std::int32_t> label;  // rows
};

class TinyGpt {
 public:
  using batch_type = TinyGptBatch;
  static constexpr std::size_t inputs = 12, classes = 7;

  explicit TinyGpt(const Shape& s)
      : shape_(s),
        embed_("embed", inputs, s.channels),
        blocks_(gpt2_blocks(s, 3).blocks()),
        ln_f_("ln_f", s.channels),
        head_("head", s.channels, classes) {}

  void declare(ParamRegistry& r) {
    embed_.declare(r);
    for (auto& b : blocks_) b.declare(r);
    ln_f_.declare(r);
    head_.declare(r);
  }
  std::vector<nn::Gpt2Block>& layers() noexcept { return blocks_; }

  template <class Ctx>
  auto input(Ctx& ctx, const TinyGptBatch& b) {
    return embed_.forward(ctx, nn::upload_features(ctx, b.x, inputs));
  }
  template <class Ctx>
  auto head(Ctx& ctx, Activation<const nn::detail::value_t<Ctx>> y, const TinyGptBatch& b) {
    const auto* targets = nn::upload_targets(ctx, b.label, classes);
    const auto logits = head_.forward(ctx, ln_f_.forward(ctx, y));
    const auto [loss, dlogits] = loss_.forward_backward(ctx, logits, targets);
    return std::make_pair(loss, ln_f_.backward(ctx, head_.backward(ctx, dlogits)));
  }
  template <class Ctx>
  void input_backward(Ctx& ctx, Activation<const nn::detail::value_t<Ctx>> dx, const TinyGptBatch&) {
    embed_.backward(ctx, dx);
  }

  TinyGptBatch batch(std::mt19937_64& rng) const {
    TinyGptBatch b{test::random_values<float>(shape_.rows() * inputs, rng), {}};
    // Labels a function of the features, so there is something to learn.
    for (std::size_t r = 0; r < shape_.rows(); ++r) {
      b.label.push_back(static_cast<std::int32_t>(std::fabs(b.x[r * inputs] * 3.0f)) % classes);
    }
    return b;
  }

 private:
  Shape shape_;
  nn::Linear embed_;
  std::vector<nn::Gpt2Block> blocks_;
  nn::LayerNorm ln_f_;
  nn::Linear head_;
  nn::SoftmaxCrossEntropy loss_;
};

template <class... Extra>
auto train_tiny_gpt(std::uint64_t seed, int steps) {
  const Shape s{2, 37, 48, 3};
  using Tr = Trainer<TinyGpt, Precision<bf16, fp32_master>, Accumulate<2>, AdamW<>, Host, Extra...>;
  auto trainer = std::make_unique<Tr>(
      TinyGpt(s),
      typename Tr::Config{.schedule = LrSchedule::warmup_cosine(3e-3f, 2, steps), .max_grad_norm = 1.0f, .seed = seed});
  std::mt19937_64 rng(seed + 1);
  std::vector<StepReport> reports;
  const TinyGpt data(s);
  for (int i = 0; i < steps; ++i) reports.push_back(trainer->step([&] { return data.batch(rng); }));
  return std::make_pair(std::move(trainer), reports);
}

TEST(Gpt2Block, TrainerCheckpointingGivesTheSameBitsWithLessActivationMemory) {
  ALLOY_SEEDED(seed);
  constexpr int steps = 3;
  auto [kept, r0] = train_tiny_gpt(seed, steps);
  auto [recomputed, r1] = train_tiny_gpt<Checkpointing>(seed, steps);
  for (int i = 0; i < steps; ++i) {
    EXPECT_EQ(r0[i].loss, r1[i].loss) << i;
    EXPECT_EQ(r0[i].grad_norm, r1[i].grad_norm) << i;
  }
  EXPECT_EQ(test::snapshot(kept->store()), test::snapshot(recomputed->store()));
  EXPECT_LT(recomputed->memory().activations_peak, kept->memory().activations_peak);
}

// ---- Residual's fusion, accumulation ----

using FusedAttentionBlock = nn::Gpt2AttentionBlock;
using ApartAttentionBlock = nn::Residual<nn::Sequential<nn::LayerNorm, nn::CausalSelfAttention, PassThrough>>;

// Residual<Sequential<LayerNorm, CausalSelfAttention>> adds its input in c_proj's product: one
// rounding where a separate add (a PassThrough after the attention keeps it apart) rounds twice,
// and one rows x channels buffer less kept.
TEST(Gpt2Block, AttentionResidualIsAddedInTheProjection) {
  ALLOY_SEEDED(seed);
  const Shape s{2, 37, 48, 3};
  std::mt19937_64 rng(seed);
  const auto x = test::random_values<float>(s.rows() * s.channels, rng);
  const auto dy = test::random_values<float>(s.rows() * s.channels, rng);
  FusedAttentionBlock fused(
      nn::Sequential(nn::LayerNorm("ln_1", s.channels), nn::CausalSelfAttention("attn", s.channels, s.heads, s.seq)));
  ApartAttentionBlock apart(nn::Sequential(nn::LayerNorm("ln_1", s.channels),
                                           nn::CausalSelfAttention("attn", s.channels, s.heads, s.seq), PassThrough{}));
  const auto a = test::run_block<Precision<fp32>, Host>(fused, x, dy, s.rows(), s.channels, seed);
  const auto b = test::run_block<Precision<fp32>, Host>(apart, x, dy, s.rows(), s.channels, seed);
  test::expect_runs_agree(a, b, 1e-6);
  EXPECT_NE(test::bits(a.y), test::bits(b.y)) << "one rounding instead of two: equal bits mean the add did not fuse";
  const std::size_t one_buffer = s.rows() * s.channels * sizeof(float);
  EXPECT_EQ(a.bytes_after_forward +
                (one_buffer + Workspace<Host>::alignment - 1) / Workspace<Host>::alignment * Workspace<Host>::alignment,
            b.bytes_after_forward);
}

// With accumulate_grads every gradient is added to what the store held (fp32: exactly the sum).
TEST(CausalSelfAttention, AccumulatingAddsEveryGradientToWhatIsThere) {
  ALLOY_SEEDED(seed);
  const Shape s{2, 37, 48, 2};
  std::mt19937_64 rng(seed);
  const auto x = test::random_values<float>(s.rows() * s.channels, rng);
  const auto dy = test::random_values<float>(s.rows() * s.channels, rng);
  nn::CausalSelfAttention layer("attn", s.channels, s.heads, s.seq);
  const auto written = test::run_block<Precision<fp32>, Host>(layer, x, dy, s.rows(), s.channels, seed);
  ParamRegistry r;
  layer.declare(r);
  const ParamStore<Precision<fp32>, SGD<>, Host> store(r, Host{}, seed);
  const auto& layout = store.layout();
  const auto before = test::random_values<float>(layout.padded_numel(), rng);
  const auto added = test::run_block<Precision<fp32>, Host>(layer, x, dy, s.rows(), s.channels, seed, nullptr, &before);
  ASSERT_EQ(written.grads.size(), 4u);
  for (const auto& [name, g] : written.grads) {
    const auto& entry = layout[r.handle(name).index];
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < g.size(); ++i) wrong += added.grads.at(name)[i] != before[entry.offset + i] + g[i];
    EXPECT_EQ(wrong, 0u) << name;
  }
}

// ---- c_attn's bias gradient ----

// The layer's computation with c_attn summing its own bias gradient (on the Host, its product's
// column sums, each column in row order) from the dqkv the attention kernel wrote without column
// parts, which it keeps: what CausalSelfAttention ran before it folded the kernel's column parts.
template <class T>
struct AttentionSummingItsBias {
  nn::CausalSelfAttention layer;  // for attention_args and the shapes; its parameters are not declared
  nn::Linear c_attn, c_proj;      // the layer's names: the same parameters
  std::vector<T> dqkv;
  std::size_t batch = 0;
  const T* qkv = nullptr;
  T* att = nullptr;
  float* lse = nullptr;

  explicit AttentionSummingItsBias(const Shape& s)
      : layer("attn", s.channels, s.heads, s.seq),
        c_attn("attn.c_attn", s.channels, 3 * s.channels),
        c_proj("attn.c_proj", s.channels, s.channels) {}

  void declare(ParamRegistry& r) {
    c_attn.declare(r);
    c_proj.declare(r);
  }
  std::size_t out_features(std::size_t in) const { return in; }

  template <class Ctx>
  Activation<T> forward(Ctx& ctx, Activation<const T> x) {
    batch = layer.sequences(x.rows);
    const Activation<T> q = c_attn.forward(ctx, x);
    const Activation<T> a = nn::detail::allocate(ctx, x.rows, layer.channels());
    lse = ctx.template allocate<float>(batch * layer.heads() * layer.seq());
    attention_forward(ctx.backend(), layer.attention_args<typename Ctx::compute_type>(q.data, a.data, lse, batch));
    qkv = q.data;
    att = a.data;
    return c_proj.forward(ctx, Activation<const T>(a));
  }

  template <class Ctx>
  Activation<T> backward(Ctx& ctx, Activation<const T> dy) {
    using Compute = typename Ctx::compute_type;
    const std::size_t C = layer.channels();
    const Activation<T> g = nn::detail::allocate(ctx, dy.rows, 3 * C);
    const Activation<T> d_att = c_proj.backward(ctx, dy);
    float* scratch = ctx.template allocate<float>(attention_backward_scratch_floats(batch, layer.heads(), layer.seq()));
    const auto fwd = layer.attention_args<Compute>(qkv, att, lse, batch);
    attention_backward(ctx.backend(),
                       nn::CausalSelfAttention::attention_backward_args<Compute>(fwd, d_att.data, g.data, C, scratch));
    dqkv.assign(g.data, g.data + g.size());
    return c_attn.backward(ctx, Activation<const T>(g));
  }
};

// c_attn's bias gradient is the fold (column_sums_of_parts) of dqkv's column parts per tile of 64
// positions, bit for bit, computed here from dqkv by their definition; within one rounding to T and
// the two orders' fp32 errors of the column sums c_attn takes itself; every other output and
// gradient has the same bits as with those; and the layer gives c_attn its bias gradient back.
template <class P>
void expect_c_attn_bias_gradient_is_the_fold_of_column_parts(const Shape& s, std::uint64_t seed) {
  using T = value_t<P>;
  SCOPED_TRACE(describe(s));
  std::mt19937_64 rng(seed);
  nn::CausalSelfAttention layer("attn", s.channels, s.heads, s.seq);
  AttentionSummingItsBias<T> apart(s);
  const auto params = parameters<P>(layer, seed);
  const auto x = test::random_values<T>(s.rows() * s.channels, rng);
  const auto dy = test::random_values<T>(s.rows() * s.channels, rng);
  const BlockRun<T> folded = test::run_block<P, Host>(layer, x, dy, s.rows(), s.channels, seed, &params);
  const BlockRun<T> summed = test::run_block<P, Host>(apart, x, dy, s.rows(), s.channels, seed, &params);
  EXPECT_FALSE(layer.c_attn().leaves_bias_gradient()) << "c_attn's bias gradient not given back";

  EXPECT_EQ(test::bits(folded.y), test::bits(summed.y)) << "y";
  EXPECT_EQ(test::bits(folded.dx), test::bits(summed.dx)) << "dx";
  for (const char* name : {"attn.c_attn.weight", "attn.c_proj.weight", "attn.c_proj.bias"}) {
    EXPECT_EQ(test::bits(folded.grads.at(name)), test::bits(summed.grads.at(name))) << name;
  }

  const std::size_t width = 3 * s.channels, parts_count = s.batch * ((s.seq + 63) / 64);
  ASSERT_EQ(apart.dqkv.size(), s.rows() * width);
  const std::vector<float> parts = test::column_parts_of(apart.dqkv, s.batch, s.seq, s.channels, width);
  std::vector<T> want(width);
  column_sums_of_parts(Host{}, parts.data(), parts_count, width, want.data(), false);
  const auto& got = folded.grads.at("attn.c_attn.bias");
  EXPECT_EQ(test::bits(got), test::bits(want)) << "c_attn.bias against the fold of dqkv's column parts";

  const auto& own = summed.grads.at("attn.c_attn.bias");
  std::size_t differ = 0;
  for (std::size_t j = 0; j < width; ++j) {
    double magnitude = 0;
    for (std::size_t r = 0; r < s.rows(); ++r) magnitude += std::fabs(to_float(apart.dqkv[r * width + j]));
    const double a = to_float(got[j]), b = to_float(own[j]);
    const double bound =
        test::ulp<T>(std::max(std::fabs(a), std::fabs(b))) + 2 * s.rows() * test::fp32_unit * magnitude;
    if (!(std::fabs(a - b) <= bound) && ++differ <= 5) {
      ADD_FAILURE() << "c_attn.bias column " << j << ": folded " << a << ", c_attn's own column sum " << b
                    << ", allowed difference " << bound;
    }
  }
  EXPECT_EQ(differ, 0u) << "columns of c_attn.bias out of bounds of c_attn's own column sums";
}

template <class P>
class CausalSelfAttentionBias : public ::testing::Test {};
TYPED_TEST_SUITE(CausalSelfAttentionBias, Precisions, PrecisionName);

// One tile and a short one (37 positions), two with a tail of 6 (70), an exact tile (64), three
// with a tail of 2 (130) at GPT-2's head size.
TYPED_TEST(CausalSelfAttentionBias, IsTheFoldOfTheKernelsColumnParts) {
  ALLOY_SEEDED(seed);
  for (const Shape& s : {Shape{2, 37, 48, 3}, Shape{1, 70, 32, 2}, Shape{3, 64, 24, 1}, Shape{1, 130, 128, 2}}) {
    expect_c_attn_bias_gradient_is_the_fold_of_column_parts<TypeParam>(s, seed + s.seq);
  }
}

// A caller that has taken c_attn's bias gradient over (Linear::leave_bias_gradient) gets it left
// alone, as any Linear leaves it, and keeps it taken over; the other gradients are as ever.
TEST(CausalSelfAttention, LeavesCAttnsBiasGradientToACallerThatTookItOver) {
  ALLOY_SEEDED(seed);
  const Shape s{2, 37, 48, 2};
  std::mt19937_64 rng(seed);
  const auto x = test::random_values<float>(s.rows() * s.channels, rng);
  const auto dy = test::random_values<float>(s.rows() * s.channels, rng);
  nn::CausalSelfAttention layer("attn", s.channels, s.heads, s.seq);
  const auto written = test::run_block<Precision<fp32>, Host>(layer, x, dy, s.rows(), s.channels, seed);
  ParamRegistry r;
  layer.declare(r);
  const ParamStore<Precision<fp32>, SGD<>, Host> store(r, Host{}, seed);
  const auto before = test::random_values<float>(store.layout().padded_numel(), rng);
  layer.c_attn().leave_bias_gradient(true);
  const auto added = test::run_block<Precision<fp32>, Host>(layer, x, dy, s.rows(), s.channels, seed, nullptr, &before);
  EXPECT_TRUE(layer.c_attn().leaves_bias_gradient());
  for (const auto& [name, g] : written.grads) {
    const auto& entry = store.layout()[r.handle(name).index];
    const bool left = name == "attn.c_attn.bias";
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < g.size(); ++i) {
      wrong += added.grads.at(name)[i] != before[entry.offset + i] + (left ? 0.0f : g[i]);
    }
    EXPECT_EQ(wrong, 0u) << name << (left ? " (left to the caller)" : "");
  }
}

// ---- Names ----

TEST(Gpt2Block, DeclaresHuggingFacesNamesAndInitialization) {
  auto block = nn::gpt2_block("transformer.h.5", 48, 3, 37, 12);
  ParamRegistry r;
  block.declare(r);
  const std::vector<std::pair<std::string, std::vector<std::int64_t>>> expected = {
      {"transformer.h.5.ln_1.weight", {48}},
      {"transformer.h.5.ln_1.bias", {48}},
      {"transformer.h.5.attn.c_attn.weight", {144, 48}},
      {"transformer.h.5.attn.c_attn.bias", {144}},
      {"transformer.h.5.attn.c_proj.weight", {48, 48}},
      {"transformer.h.5.attn.c_proj.bias", {48}},
      {"transformer.h.5.ln_2.weight", {48}},
      {"transformer.h.5.ln_2.bias", {48}},
      {"transformer.h.5.mlp.c_fc.weight", {192, 48}},
      {"transformer.h.5.mlp.c_fc.bias", {192}},
      {"transformer.h.5.mlp.c_proj.weight", {48, 192}},
      {"transformer.h.5.mlp.c_proj.bias", {48}}};
  ASSERT_EQ(r.size(), expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const ParamSpec& spec = r.specs()[i];
    EXPECT_EQ(spec.name, expected[i].first);
    EXPECT_EQ(spec.shape, expected[i].second) << spec.name;
    const bool weight = spec.name.ends_with(".weight") && spec.name.find(".ln_") == std::string::npos;
    EXPECT_EQ(nn::hf_gpt2_stores_transposed(spec.name), weight) << spec.name;
    EXPECT_EQ(spec.options.weight_decay, weight) << spec.name;
    if (weight) {
      const bool projection = spec.name.ends_with("c_proj.weight");
      EXPECT_EQ(spec.init.kind, Init::Kind::normal) << spec.name;
      EXPECT_FLOAT_EQ(spec.init.b, projection ? 0.02f / std::sqrt(24.0f) : 0.02f) << spec.name;
    } else if (spec.name.find(".ln_") == std::string::npos) {
      EXPECT_EQ(spec.init.kind, Init::Kind::constant) << spec.name;
      EXPECT_EQ(spec.init.a, 0.0f) << spec.name;
    }
  }
  EXPECT_FALSE(nn::hf_gpt2_stores_transposed("transformer.wte.weight"));
  EXPECT_FALSE(nn::hf_gpt2_stores_transposed("lm_head.weight"));
}

// ---- Bad shapes ----

TEST(CausalSelfAttention, BadShapesAreNamed) {
  EXPECT_MENTIONS(test::message_of([] { nn::CausalSelfAttention("a", 48, 5, 37); }),
                  "CausalSelfAttention 'a': 48 channels do not split into 5 heads of equal size");
  EXPECT_MENTIONS(test::message_of([] { nn::CausalSelfAttention("a", 48, 0, 37); }),
                  "48 channels do not split into 0 heads");
  EXPECT_MENTIONS(test::message_of([] { nn::CausalSelfAttention("a", 600, 2, 37); }),
                  "CausalSelfAttention 'a': heads of 300 channels; attention supports up to 256");
  EXPECT_MENTIONS(test::message_of([] { nn::CausalSelfAttention("a", 48, 3, 0); }),
                  "CausalSelfAttention 'a': the sequence length must be positive");
  EXPECT_MENTIONS(test::message_of([] {
                    nn::CausalSelfAttention(nn::Linear("b.c_attn", 48, 96), nn::Linear("b.c_proj", 48, 48), 3, 37);
                  }),
                  "CausalSelfAttention 'b': c_attn is 48 -> 96 and c_proj 48 -> 48; they must be C -> 3C and C -> C");

  const Shape s{2, 37, 48, 3};
  nn::CausalSelfAttention layer("attn", s.channels, s.heads, s.seq);
  std::mt19937_64 rng(1);
  const auto x = test::random_values<float>(s.rows() * s.channels, rng);
  EXPECT_MENTIONS(
      test::message_of([&] { test::run_block<Precision<fp32>, Host>(layer, x, x, s.rows() - 1, s.channels, 1); }),
      "CausalSelfAttention 'attn': 73 rows are not whole sequences of 37 positions");
  EXPECT_MENTIONS(
      test::message_of([&] { test::run_block<Precision<fp32>, Host>(layer, x, x, s.rows(), s.channels - 1, 1); }),
      "CausalSelfAttention 'attn': input has 47 features, expected 48");
}

TEST(CausalSelfAttention, BackwardRefusesAGradientOfAnotherShape) {
  const Shape s{2, 37, 48, 3};
  nn::CausalSelfAttention layer("attn", s.channels, s.heads, s.seq);
  using Store = ParamStore<Precision<fp32>, SGD<>, Host>;
  ParamRegistry r;
  layer.declare(r);
  Store store(r, Host{}, 1);
  Workspace<Host> ws;
  BackendResources<Host> res;
  Context<Store> ctx(store, ws, 1.0f, false, 0, 1, 0, 0, &res);
  std::mt19937_64 rng(1);
  const auto x = test::random_values<float>(2 * s.rows() * s.channels, rng);
  EXPECT_MENTIONS(
      test::message_of([&] { layer.backward(ctx, Activation<const float>(x.data(), s.rows(), s.channels)); }),
      "CausalSelfAttention 'attn': backward before forward");
  layer.forward(ctx, Activation<const float>(x.data(), s.rows(), s.channels));
  EXPECT_MENTIONS(
      test::message_of([&] { layer.backward(ctx, Activation<const float>(x.data(), 2 * s.rows(), s.channels)); }),
      "CausalSelfAttention 'attn': dy is 148 x 48, forward's output was 74 x 48");
}

}  // namespace
