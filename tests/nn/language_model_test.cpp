// nn::Embedding (token and position) and nn::LmHead (the output projection fused with softmax
// cross-entropy, in chunks of rows) on the Host backend, at odd sizes (37 rows, dim 40, vocab 97
// padded to 101, chunks of 10): against a float64 formulation, against finite differences, tied
// and untied, chunked and not, accumulating across micro-batches, and refusing bad input before
// anything runs.
#include "language_model_runner.hpp"

#include "../support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace {

using namespace alloy;
using test::LmHarness;
using test::LmShape;

using Fp32Harness = LmHarness<Precision<fp32>, Host>;

struct Batch {
  std::vector<std::int32_t> tokens, targets;
};

Batch random_batch(const LmShape& s, std::mt19937_64& rng, std::size_t ignored = 0) {
  Batch b{test::random_tokens(s.rows(), s.vocab, rng), test::random_targets(s.rows(), s.vocab, rng)};
  for (std::size_t i = 0; i < ignored; ++i) b.targets[(7 * i + 3) % s.rows()] = s.ignore_index;
  return b;
}

// The Host run against the float64 head (from the run's own x and W) and the float64 embedding
// gradients (from the run's dx): relative Frobenius errors below `tolerance`.
template <class P>
void expect_matches_float64(const LmShape& s, std::size_t ignored, double tolerance, std::uint64_t seed) {
  SCOPED_TRACE(s.describe() + ", " + std::to_string(ignored) + " ignored targets");
  std::mt19937_64 rng(seed);
  const Batch b = random_batch(s, rng, ignored);
  LmHarness<P, Host> h(s, seed);
  h.randomize_params(0.5, rng);
  const float loss_scale = 8.0f;
  const float loss = h.step(b.tokens, b.targets, false, loss_scale);
  const auto w = h.param(s.tied ? "wte.weight" : "lm_head.weight");
  const auto ref = test::head_reference(s, h.x(), w, b.targets, loss_scale);
  EXPECT_NEAR(loss, ref.loss, tolerance * ref.loss) << "loss";
  EXPECT_LT(test::relative_error(h.dx(), ref.dy), tolerance) << "dy";

  // The embedding: x = wte[token] + wpe[t]; its gradients scatter the run's dx.
  const auto wte = h.param("wte.weight"), wpe = h.param("wpe.weight");
  std::vector<double> x(s.rows() * s.dim), dwte(s.padded_vocab * s.dim, 0.0), dwpe(s.max_positions * s.dim, 0.0);
  for (std::size_t r = 0; r < s.rows(); ++r) {
    for (std::size_t c = 0; c < s.dim; ++c) {
      x[r * s.dim + c] =
          test::value(wte[std::size_t(b.tokens[r]) * s.dim + c]) + test::value(wpe[(r % s.seq) * s.dim + c]);
      dwte[std::size_t(b.tokens[r]) * s.dim + c] += test::value(h.dx()[r * s.dim + c]);
      dwpe[(r % s.seq) * s.dim + c] += test::value(h.dx()[r * s.dim + c]);
    }
  }
  EXPECT_LT(test::relative_error(h.x(), x), tolerance) << "x";
  if (s.tied) {
    for (std::size_t i = 0; i < dwte.size(); ++i) dwte[i] += ref.dw[i];
  } else {
    EXPECT_LT(test::relative_error(h.grad("lm_head.weight"), ref.dw), tolerance) << "gradient of lm_head.weight";
  }
  EXPECT_LT(test::relative_error(h.grad("wte.weight"), dwte), tolerance) << "gradient of wte.weight";
  EXPECT_LT(test::relative_error(h.grad("wpe.weight"), dwpe), tolerance) << "gradient of wpe.weight";
}

TEST(LmHead, MatchesFloat64OnOddSizes) {
  ALLOY_SEEDED(seed);
  for (bool tied : {true, false}) {
    for (std::size_t ignored : {std::size_t(0), std::size_t(5)}) {
      LmShape s;
      s.tied = tied;
      expect_matches_float64<Precision<fp32>>(s, ignored, 2e-5, seed);
      // Several sequences, more rows than a 32-row segment per frequent token, one chunk.
      s.batch = 7, s.seq = 19, s.chunk_rows = 1000;
      expect_matches_float64<Precision<fp32>>(s, ignored, 2e-5, seed + 1);
    }
  }
}

// 16-bit logits, gradients and parameters: within a few bf16 / fp16 rounding steps.
TEST(LmHead, SixteenBitMatchesFloat64) {
  ALLOY_SEEDED(seed);
  LmShape s;
  expect_matches_float64<Precision<bf16>>(s, 3, 3e-2, seed);
  expect_matches_float64<Precision<fp16>>(s, 3, 5e-3, seed);
  expect_matches_float64<Precision<tf32>>(s, 3, 5e-3, seed);
}

// Central differences against the gradients of one fp32 step, at elements that each use reaches:
// rows of the token table that are a token, a target, neither (the softmax alone) and padding
// (nothing: zero), positions in and past the sequence, and the untied head's rows. Twice: of the
// float64 loss at the same parameters (h = 1e-3, no rounding to hide behind: 1e-4 relative), and
// of LmHead::loss itself (h = 1e-2 in fp32: the fp32 loss's rounding over 2h, 1e-3 absolute).
TEST(LmHead, GradientsMatchFiniteDifferences) {
  ALLOY_SEEDED(seed);
  for (bool tied : {true, false}) {
    LmShape s;
    s.tied = tied;
    SCOPED_TRACE(s.describe());
    std::mt19937_64 rng(seed);
    const Batch b = random_batch(s, rng, 4);
    Fp32Harness h(s, seed);
    h.randomize_params(0.5, rng);
    h.step(b.tokens, b.targets, false);
    const auto grads = h.grads();
    std::size_t unused = 0;
    while (std::find(b.tokens.begin(), b.tokens.end(), std::int32_t(unused)) != b.tokens.end() ||
           std::find(b.targets.begin(), b.targets.end(), std::int32_t(unused)) != b.targets.end()) {
      ++unused;
    }
    struct Element {
      const char* name;
      std::size_t row, col;
    };
    std::vector<Element> elements = {{"wte.weight", std::size_t(b.tokens[0]), 3},
                                     {"wte.weight", std::size_t(b.targets[5]), 7},
                                     {"wte.weight", unused, 0},
                                     {"wte.weight", s.padded_vocab - 1, s.dim - 1},
                                     {"wpe.weight", 0, 11},
                                     {"wpe.weight", s.seq - 1, 39},
                                     {"wpe.weight", s.max_positions - 1, 2}};
    if (!tied) {
      elements.push_back({"lm_head.weight", std::size_t(b.targets[2]), 5});
      elements.push_back({"lm_head.weight", unused, 1});
      elements.push_back({"lm_head.weight", s.vocab, 0});
    }
    const auto params = test::widened(h.params());
    const char* projection = tied ? "wte.weight" : "lm_head.weight";
    for (const Element& e : elements) {
      SCOPED_TRACE(std::string(e.name) + "[" + std::to_string(e.row) + ", " + std::to_string(e.col) + "]");
      const std::size_t i = h.offset(e.name) + e.row * s.dim + e.col;
      const float analytic = grads[i];
      auto p = params;
      const auto loss = [&] {
        return test::reference_loss(s, h.slice(p, "wte.weight"), h.slice(p, "wpe.weight"), h.slice(p, projection),
                                    b.tokens, b.targets);
      };
      const double step = 1e-3;
      p[i] = params[i] + step;
      const double up = loss();
      p[i] = params[i] - step;
      const double down = loss();
      const double numeric = (up - down) / (2 * step);
      EXPECT_NEAR(analytic, numeric, 1e-4 * std::fabs(numeric) + 1e-7) << "float64 loss";

      auto view = h.store().param(h.store().registry().handle(e.name));
      const auto at = std::int64_t(e.row * s.dim + e.col);
      const float keep = view[at];
      view[at] = keep + 1e-2f;
      const double fp32_up = h.evaluate(b.tokens, b.targets);
      view[at] = keep - 1e-2f;
      const double fp32_down = h.evaluate(b.tokens, b.targets);
      view[at] = keep;
      EXPECT_NEAR(analytic, (fp32_up - fp32_down) / (double(keep + 1e-2f) - double(keep - 1e-2f)), 1e-3)
          << "LmHead::loss";
      if (e.row >= (std::string(e.name) == "wpe.weight" ? s.seq : s.vocab)) {
        EXPECT_EQ(analytic, 0.0f) << "a row that nothing uses";
      }
    }
  }
}

// The tied table's gradient is the head's dW plus the embedding's scatter: with the untied model
// at the same values, tied = lm_head.weight's gradient + wte's, to the bit in fp32 (the tied run
// adds the same two fp32 values once).
TEST(LmHead, TiedGradientIsTheSumOfBothUses) {
  ALLOY_SEEDED(seed);
  LmShape s;
  std::mt19937_64 rng(seed);
  const Batch b = random_batch(s, rng, 2);
  Fp32Harness tied(s, seed);
  s.tied = false;
  Fp32Harness untied(s, seed);
  // The untied head's projection takes the token table's values.
  auto params = untied.params();
  const auto wte = tied.param("wte.weight");
  std::copy(wte.begin(), wte.end(), params.begin() + untied.offset("lm_head.weight"));
  untied.set_params(params);
  ASSERT_EQ(untied.param("wte.weight"), wte);
  ASSERT_EQ(untied.param("wpe.weight"), tied.param("wpe.weight"));
  const float tied_loss = tied.step(b.tokens, b.targets, false);
  EXPECT_EQ(untied.step(b.tokens, b.targets, false), tied_loss);
  const auto head = untied.grad("lm_head.weight"), embedding = untied.grad("wte.weight");
  const auto sum = tied.grad("wte.weight");
  std::size_t differ = 0;
  for (std::size_t i = 0; i < sum.size(); ++i) differ += test::bits_of(sum[i]) != test::bits_of(head[i] + embedding[i]);
  EXPECT_EQ(differ, 0u) << "elements of the tied gradient that are not the sum of the head's and the embedding's";
  EXPECT_EQ(tied.grad("wpe.weight"), untied.grad("wpe.weight"));
}

// Two micro-batches, the second accumulating: the gradients are the sum of each alone.
TEST(LmHead, AccumulatesAcrossMicroBatches) {
  ALLOY_SEEDED(seed);
  for (bool tied : {true, false}) {
    LmShape s;
    s.tied = tied;
    SCOPED_TRACE(s.describe());
    std::mt19937_64 rng(seed);
    const Batch first = random_batch(s, rng, 1), second = random_batch(s, rng, 3);
    Fp32Harness h(s, seed);
    h.step(first.tokens, first.targets, false);
    const auto g1 = h.grads();
    h.step(second.tokens, second.targets, false);
    const auto g2 = h.grads();
    h.set_grads(test::random_values<float>(g1.size(), rng));  // what the first step writes over
    h.step(first.tokens, first.targets, false);
    for (const char* name : {"wte.weight", "wpe.weight"}) {
      ASSERT_EQ(h.slice(h.grads(), name), h.slice(g1, name))
          << "a step that does not accumulate writes all of " << name;
    }
    h.step(second.tokens, second.targets, true);
    const auto both = h.grads();
    std::vector<double> expected(g1.size());
    for (std::size_t i = 0; i < g1.size(); ++i) expected[i] = double(g1[i]) + double(g2[i]);
    for (const char* name : {"wte.weight", "wpe.weight", "lm_head.weight"}) {
      if (tied && std::string(name) == "lm_head.weight") continue;
      EXPECT_LT(test::relative_error(h.slice(both, name), h.slice(expected, name)), 1e-6) << name;
    }
  }
}

// Chunks change nothing but where the logits live: with rows of logits 16 bytes long (padded
// vocab 104), the loss and dy are the same bits as one chunk; dW, summed chunk by chunk, agrees
// to fp32 rounding. At vocab 101 the row kernel splits rows at other boundaries: fp32 rounding.
TEST(LmHead, ChunkedEqualsUnchunked) {
  ALLOY_SEEDED(seed);
  for (std::size_t padded : {std::size_t(104), std::size_t(101)}) {
    LmShape s;
    s.padded_vocab = padded;
    std::mt19937_64 rng(seed);
    const Batch b = random_batch(s, rng, 2);
    s.chunk_rows = 1000;
    Fp32Harness whole(s, seed);
    const float loss = whole.step(b.tokens, b.targets, false);
    for (std::size_t chunk : {std::size_t(1), std::size_t(10), std::size_t(36)}) {
      s.chunk_rows = chunk;
      SCOPED_TRACE(s.describe());
      Fp32Harness chunked(s, seed);
      const float chunked_loss = chunked.step(b.tokens, b.targets, false);
      if (padded % 8 == 0) {
        EXPECT_EQ(chunked_loss, loss);
        EXPECT_EQ(chunked.dx(), whole.dx());
      } else {
        EXPECT_NEAR(chunked_loss, loss, 1e-6 * loss);
        EXPECT_LT(test::relative_error(chunked.dx(), test::widened(whole.dx())), 1e-6);
      }
      EXPECT_LT(test::relative_error(chunked.grad("wte.weight"), test::widened(whole.grad("wte.weight"))), 1e-6);
      EXPECT_LT(chunked.peak_bytes(), whole.peak_bytes()) << "a smaller chunk holds fewer logits";
    }
  }
}

TEST(LmHead, LossAloneEqualsTheLossOfAStepAndWritesNoGradient) {
  ALLOY_SEEDED(seed);
  LmShape s;
  std::mt19937_64 rng(seed);
  const Batch b = random_batch(s, rng, 2);
  Fp32Harness h(s, seed);
  const auto before = test::random_values<float>(h.grads().size(), rng);
  h.set_grads(before);
  const float alone = h.evaluate(b.tokens, b.targets);
  EXPECT_EQ(h.grads(), before);
  EXPECT_EQ(h.step(b.tokens, b.targets, false), alone);
}

// Rows whose target is the ignore index: no loss, no gradient, out of the mean.
TEST(LmHead, LogitsAreTheProductWithTheTableAndWriteNoGradient) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LmShape s;
  Fp32Harness h(s, seed);
  h.randomize_params(0.5, rng);
  const std::vector<float> grads_before = h.grads();
  const auto tokens = test::random_tokens(s.rows(), s.vocab, rng);
  const std::vector<float> logits = h.logits(tokens);
  ASSERT_EQ(logits.size(), s.rows() * s.padded_vocab);
  const auto w = h.param("wte.weight");
  std::vector<double> want(s.rows() * s.padded_vocab);
  for (std::size_t r = 0; r < s.rows(); ++r) {
    for (std::size_t v = 0; v < s.padded_vocab; ++v) {
      double acc = 0;
      for (std::size_t c = 0; c < s.dim; ++c) acc += double(h.x()[r * s.dim + c]) * w[v * s.dim + c];
      want[r * s.padded_vocab + v] = acc;
    }
  }
  EXPECT_LT(test::relative_error(logits, want), 1e-6);
  EXPECT_EQ(h.grads(), grads_before);
}

TEST(LmHead, IgnoredRowsHaveNoLossAndNoGradient) {
  ALLOY_SEEDED(seed);
  LmShape s;
  s.ignore_index = -100;
  std::mt19937_64 rng(seed);
  Batch b = random_batch(s, rng, 6);
  Fp32Harness h(s, seed);
  h.step(b.tokens, b.targets, false);
  for (std::size_t r = 0; r < s.rows(); ++r) {
    if (b.targets[r] != s.ignore_index) continue;
    for (std::size_t c = 0; c < s.dim; ++c) ASSERT_EQ(h.dx()[r * s.dim + c], 0.0f) << "row " << r;
  }
  b.targets.assign(s.rows(), s.ignore_index);
  EXPECT_MENTIONS(test::message_of([&] { h.step(b.tokens, b.targets, false); }),
                  "every one of the 37 targets is the ignore index -100");
}

// Bad token ids, targets and shapes are alloy::errors naming what and where, thrown before any
// parameter or gradient changes.
TEST(LanguageModelInput, BadInputIsRefusedBeforeAnythingRuns) {
  ALLOY_SEEDED(seed);
  LmShape s;
  std::mt19937_64 rng(seed);
  const Batch good = random_batch(s, rng);
  Fp32Harness h(s, seed);
  const auto params = h.params();
  const auto grads = test::random_values<float>(params.size(), rng);
  h.set_grads(grads);
  const auto refused = [&](const Batch& b, const char* text) {
    EXPECT_MENTIONS(test::message_of([&] { h.step(b.tokens, b.targets, true); }), text);
    EXPECT_EQ(h.params(), params);
    EXPECT_EQ(h.grads(), grads);
  };
  Batch b = good;
  b.tokens[5] = 97;
  refused(b, "Embedding 'wte': token 97 at row 5 is outside [0, 97)");
  b = good;
  b.tokens[36] = -1;
  refused(b, "token -1 at row 36 is outside [0, 97)");
  b = good;
  b.targets[8] = 99;  // a padding column: not a class
  refused(b, "LmHead 'lm_head': target 99 at row 8 is outside [0, 97) and is not the ignore index -1");
  b = good;
  b.targets[0] = std::numeric_limits<std::int32_t>::min();
  refused(b, "target -2147483648 at row 0");
  b = good;
  b.targets.pop_back();
  refused(b, "36 targets for 37 rows");
  b = good;
  b.tokens.pop_back();
  refused(b, "36 tokens are not a whole number of sequences of 37");

  LmShape long_rows = s;
  long_rows.max_positions = 30;
  test::LmHarness<Precision<fp32>, Host> short_table(long_rows, seed);
  EXPECT_MENTIONS(test::message_of([&] { short_table.step(good.tokens, good.targets, false); }),
                  "sequences of 37 tokens, but the position table 'wpe' has 30 positions");
}

TEST(LanguageModelInput, MismatchedConfigurationsAreErrors) {
  EXPECT_MENTIONS(test::message_of([] { nn::LmHead("h", {.vocab = 10, .padded_vocab = 8, .dim = 4}); }),
                  "padded_vocab = 8 is less than vocab = 10");
  EXPECT_MENTIONS(test::message_of([] { nn::LmHead("h", {.vocab = 10, .dim = 4, .ignore_index = 3}); }),
                  "ignore_index = 3 could be a class");
  EXPECT_MENTIONS(test::message_of([] { nn::LmHead("h", {.vocab = 10, .dim = 4, .chunk_rows = 0}); }),
                  "chunk_rows must be positive");
  EXPECT_MENTIONS(test::message_of([] { nn::Embedding("e", "p", {.vocab = 10, .dim = 4}); }),
                  "a position table needs both a name and max_positions > 0");
  nn::Embedding embed("wte", {.vocab = 10, .padded_vocab = 16, .dim = 4});
  nn::LmHead matching("lm_head", {.vocab = 10, .padded_vocab = 16, .dim = 4});
  EXPECT_MENTIONS(test::message_of([&] { matching.tie_to(embed); }), "tie the token table after declare()");
  ParamRegistry r;
  embed.declare(r);
  matching.tie_to(embed);
  EXPECT_TRUE(matching.tied() && embed.tied());
  EXPECT_EQ(matching.weight().index, r.handle("wte.weight").index);
  nn::LmHead head("lm_head", {.vocab = 10, .padded_vocab = 12, .dim = 4});
  EXPECT_MENTIONS(test::message_of([&] { head.tie_to(embed); }),
                  "LmHead 'lm_head' (vocab 10, padded 12, dim 4) cannot share the token table of Embedding 'wte' "
                  "(vocab 10, padded 16, dim 4)");
  nn::LmHead own("own", {.vocab = 10, .padded_vocab = 16, .dim = 4});
  own.declare(r);
  EXPECT_MENTIONS(test::message_of([&] { own.tie_to(embed); }), "declared its own projection already");
}

}  // namespace
