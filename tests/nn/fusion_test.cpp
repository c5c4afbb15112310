// The layers' fusions on Host: Linear -> Gelu -> Linear in two products each way, Linear -> Gelu
// in one, and Residual's add in its block's last product, against the same layers run one by one
// (a PassThrough layer between them keeps them apart); accumulated bias gradients; the memory
// kept between forward and backward; and the paths that must not fuse.
#include "block_runner.hpp"

#include "../support/test_support.hpp"

#include <gtest/gtest.h>

namespace {

using namespace alloy;
using alloy::test::BlockRun;
using alloy::test::PassThrough;

namespace nn = alloy::nn;

constexpr std::size_t rows = 13, width = 12, hidden = 4 * width;  // hidden: a multiple of 8, so it fuses

using FusedBlock = nn::Residual<nn::Sequential<nn::LayerNorm, nn::Linear, nn::Gelu, nn::Linear>>;
using SeparateBlock =
    nn::Residual<nn::Sequential<nn::LayerNorm, nn::Linear, PassThrough, nn::Gelu, nn::Linear, PassThrough>>;

FusedBlock fused_block(std::size_t d = width, std::size_t h = hidden, nn::GeluOptions gelu = {}) {
  return FusedBlock(
      nn::Sequential(nn::LayerNorm("norm", d), nn::Linear("up", d, h), nn::Gelu(gelu), nn::Linear("down", h, d)));
}
FusedBlock keeping_block() { return fused_block(width, hidden, {.keep_output = true}); }
SeparateBlock separate_block(std::size_t d = width, std::size_t h = hidden) {
  return SeparateBlock(nn::Sequential(nn::LayerNorm("norm", d), nn::Linear("up", d, h), PassThrough{}, nn::Gelu{},
                                      nn::Linear("down", h, d), PassThrough{}));
}

template <class P>
using value_t = storage_t<typename P::compute_type>;

template <class P, class Block>
BlockRun<value_t<P>> run(Block block, std::uint64_t seed, std::size_t in = width,
                         const std::vector<value_t<P>>* grads_before = nullptr) {
  using T = value_t<P>;
  std::mt19937_64 rng(seed);
  const auto x = test::random_values<T>(rows * in, rng);
  const auto dy = test::random_values<T>(rows * block.out_features(in), rng);
  return test::run_block<P, Host>(block, x, dy, rows, in, seed, nullptr, grads_before);
}

// fp32: the fused products round once where the separate layers round after each; nothing else
// differs, so they agree to a few fp32 roundings.
TEST(FusedMlp, ResidualBlockMatchesTheLayersRunOneByOneInFp32) {
  ALLOY_SEEDED(seed);
  const auto fused = run<Precision<fp32>>(fused_block(), seed);
  const auto separate = run<Precision<fp32>>(separate_block(), seed);
  test::expect_runs_agree(fused, separate, 1e-5);
  EXPECT_NE(test::bits(fused.y), test::bits(separate.y))
      << "the fused path rounds differently; equal bits mean it did not run";
}

// bf16: each side rounds its products' results to 8 bits at different points (the fused path
// also recomputes GELU's output from the rounded pre-activation for the down weight gradient).
TEST(FusedMlp, ResidualBlockMatchesTheLayersRunOneByOneInBf16) {
  ALLOY_SEEDED(seed);
  const auto fused = run<Precision<bf16>>(fused_block(), seed);
  const auto separate = run<Precision<bf16>>(separate_block(), seed);
  test::expect_runs_agree(fused, separate, 2e-2);
}

// Between forward and backward the fused block keeps the pre-activation and its output, not the
// GELU output, the down layer's separate output, nor the residual sum's separate buffer.
TEST(FusedMlp, KeepsOnlyThePreActivationBetweenForwardAndBackward) {
  ALLOY_SEEDED(seed);
  const auto fused = run<Precision<bf16>>(fused_block(), seed);
  const auto separate = run<Precision<bf16>>(separate_block(), seed);
  const auto bytes = [](std::size_t elements) {
    return (elements * sizeof(bf16) + Workspace<Host>::alignment - 1) / Workspace<Host>::alignment *
           Workspace<Host>::alignment;
  };
  EXPECT_EQ(fused.bytes_after_forward, separate.bytes_after_forward - bytes(rows * hidden) - bytes(rows * width));
  EXPECT_LT(fused.peak_bytes, separate.peak_bytes);
}

// GeluOptions::keep_output: GELU's output lives from forward to backward (one rows x hidden buffer
// more after forward) and is not recomputed. fp32: the epilogue's h is gelu of the fp32
// pre-activation, as the recomputation's, so every bit agrees. bf16: the recomputation reads the
// pre-activation rounded to bf16, the kept h came from fp32; the gradients agree to bf16 roundings.
TEST(FusedMlp, KeepingGelusOutputSkipsTheRecomputation) {
  ALLOY_SEEDED(seed);
  const auto bytes = [](std::size_t elements, std::size_t size) {
    return (elements * size + Workspace<Host>::alignment - 1) / Workspace<Host>::alignment * Workspace<Host>::alignment;
  };
  {
    const auto kept = run<Precision<fp32>>(keeping_block(), seed);
    const auto recomputed = run<Precision<fp32>>(fused_block(), seed);
    test::expect_same_bits(kept, recomputed);
    EXPECT_EQ(kept.bytes_after_forward, recomputed.bytes_after_forward + bytes(rows * hidden, sizeof(float)));
  }
  {
    const auto kept = run<Precision<bf16>>(keeping_block(), seed);
    const auto recomputed = run<Precision<bf16>>(fused_block(), seed);
    EXPECT_EQ(test::bits(kept.y), test::bits(recomputed.y)) << "forward is the same products";
    EXPECT_EQ(test::bits(kept.dx), test::bits(recomputed.dx)) << "dx does not read h";
    test::expect_runs_agree(kept, recomputed, 1e-2);
    EXPECT_NE(test::bits(kept.grads.at("down.weight")), test::bits(recomputed.grads.at("down.weight")))
        << "the same bits: down's weight gradient did not read the kept h";
    EXPECT_EQ(kept.bytes_after_forward, recomputed.bytes_after_forward + bytes(rows * hidden, sizeof(bf16)));
  }
}

// What a recomputation runs (forward_for_backward): the same gradients and dx, bit for bit, as
// forward then backward, without the last product: its output is never allocated. For the fused
// MLP block (the down product skipped), a block ending in a plain Linear, the layers one by one
// in a Residual (its sum skipped), and a Sequential ending in a layer with no such path (the whole
// forward runs).
template <class P, class Block>
void expect_forward_for_backward_keeps_the_bits(Block a, Block b, std::uint64_t seed, bool skips_the_output) {
  using T = value_t<P>;
  std::mt19937_64 rng(seed);
  const auto x = test::random_values<T>(rows * width, rng);
  const auto dy = test::random_values<T>(rows * width, rng);
  const auto full = test::run_block<P, Host>(a, x, dy, rows, width, seed);
  const auto recomputed = test::run_block<P, Host>(b, x, dy, rows, width, seed, nullptr, nullptr, true);
  EXPECT_EQ(test::bits(recomputed.dx), test::bits(full.dx));
  for (const auto& [name, g] : full.grads) EXPECT_EQ(test::bits(recomputed.grads.at(name)), test::bits(g)) << name;
  const std::size_t output_bytes = (rows * width * sizeof(T) + Workspace<Host>::alignment - 1) /
                                   Workspace<Host>::alignment * Workspace<Host>::alignment;
  EXPECT_EQ(recomputed.bytes_after_forward, full.bytes_after_forward - (skips_the_output ? output_bytes : 0));
}

TEST(FusedMlp, ForwardForBackwardSkipsTheLastProductAndKeepsTheBits) {
  ALLOY_SEEDED(seed);
  expect_forward_for_backward_keeps_the_bits<Precision<bf16>>(fused_block(), fused_block(), seed, true);
  expect_forward_for_backward_keeps_the_bits<Precision<fp32>>(fused_block(), fused_block(), seed, true);
  expect_forward_for_backward_keeps_the_bits<Precision<bf16>>(keeping_block(), keeping_block(), seed, true);
  // The layers one by one run whole; only Residual's separate sum is skipped.
  expect_forward_for_backward_keeps_the_bits<Precision<fp16>>(separate_block(), separate_block(), seed, true);
  using NoPath = nn::Sequential<nn::LayerNorm, PassThrough>;
  const auto no_path = [] { return NoPath(nn::LayerNorm("norm", width), PassThrough{}); };
  expect_forward_for_backward_keeps_the_bits<Precision<bf16>>(no_path(), no_path(), seed, false);
  using LinearEnd = nn::Residual<nn::Sequential<nn::LayerNorm, nn::Linear>>;
  const auto linear_end = [] {
    return LinearEnd(nn::Sequential(nn::LayerNorm("norm", width), nn::Linear("l", width, width)));
  };
  expect_forward_for_backward_keeps_the_bits<Precision<bf16>>(linear_end(), linear_end(), seed, true);
}

// A block that starts with a LayerNorm leaves its dx where its forward began (the LayerNorm's
// output, dead by then): the next layer writes its dx over its input, LayerNorm's backward writes
// over that, and the trainer keeps dx there without copying it (train/recompute.hpp's move_down).
// The fused MLP block, the one keeping GELU's output, the layers one by one, and a LayerNorm then a
// Linear; a block without a first LayerNorm gives no such promise.
TEST(FusedMlp, DxLiesWhereTheBlocksForwardBegan) {
  ALLOY_SEEDED(seed);
  const auto where = [&](auto block) {
    using P = Precision<bf16>;
    std::mt19937_64 rng(seed);
    const auto x = test::random_values<bf16>(rows * width, rng);
    const auto dy = test::random_values<bf16>(rows * width, rng);
    return test::run_block<P, Host>(block, x, dy, rows, width, seed).dx_where_forward_began;
  };
  EXPECT_TRUE(where(fused_block()));
  EXPECT_TRUE(where(keeping_block()));
  EXPECT_TRUE(where(separate_block()));
  using LinearEnd = nn::Residual<nn::Sequential<nn::LayerNorm, nn::Linear>>;
  EXPECT_TRUE(where(LinearEnd(nn::Sequential(nn::LayerNorm("norm", width), nn::Linear("l", width, width)))));
  using NoNorm = nn::Residual<nn::Sequential<nn::Linear, nn::Gelu, nn::Linear>>;
  EXPECT_FALSE(where(
      NoNorm(nn::Sequential(nn::Linear("up", width, 4 * width), nn::Gelu(), nn::Linear("down", 4 * width, width)))));
}

// A residual block's last projection's bias gradient is taken in the block's first LayerNorm pass
// (nn::Sequential hands it over): it is the column sums of the block's dy, and the other
// gradients are those of the same layers with the hand-over kept apart (a PassThrough after the
// last layer), to fp32 roundings. The fused MLP block, and a LayerNorm then a Linear.
TEST(FusedMlp, TheBlocksLastBiasGradientIsDysColumnSums) {
  ALLOY_SEEDED(seed);
  using Short = nn::Residual<nn::Sequential<nn::LayerNorm, nn::Linear>>;
  using ShortApart = nn::Residual<nn::Sequential<nn::LayerNorm, nn::Linear, PassThrough>>;
  const auto check = [&](const BlockRun<float>& got, const BlockRun<float>& apart) {
    std::mt19937_64 rng(seed);
    (void)test::random_values<float>(rows * width, rng);  // x, as run() draws it
    const auto dy = test::random_values<float>(rows * width, rng);
    const auto& db = got.grads.at("down.bias");
    ASSERT_EQ(db.size(), width);
    for (std::size_t c = 0; c < width; ++c) {
      double sum = 0, magnitude = 0;
      for (std::size_t r = 0; r < rows; ++r) sum += dy[r * width + c], magnitude += std::fabs(dy[r * width + c]);
      EXPECT_NEAR(db[c], sum, 1e-6 * magnitude) << "down.bias[" << c << "]";
    }
    test::expect_runs_agree(got, apart, 1e-5);
  };
  check(run<Precision<fp32>>(fused_block(), seed), run<Precision<fp32>>(separate_block(), seed));
  check(
      run<Precision<fp32>>(Short(nn::Sequential(nn::LayerNorm("norm", width), nn::Linear("down", width, width))), seed),
      run<Precision<fp32>>(
          ShortApart(nn::Sequential(nn::LayerNorm("norm", width), nn::Linear("down", width, width), PassThrough{})),
          seed));
}

// With accumulate_grads, every gradient, the two bias gradients the epilogues write included, is
// added to what the store held.
TEST(FusedMlp, AccumulatingAddsEveryGradientToWhatIsThere) {
  ALLOY_SEEDED(seed);
  const auto written = run<Precision<fp32>>(fused_block(), seed);
  std::mt19937_64 rng(seed + 7);
  ParamRegistry r;
  auto block = fused_block();
  block.declare(r);
  const ParamStore<Precision<fp32>, SGD<>, Host> store(r, Host{}, seed);
  const auto& layout = store.layout();
  const auto before = test::random_values<float>(layout.padded_numel(), rng);
  const auto added = run<Precision<fp32>>(fused_block(), seed, width, &before);
  for (const auto& [name, g] : written.grads) {
    const auto& entry = layout[r.handle(name).index];
    for (std::size_t i = 0; i < g.size(); ++i) {
      EXPECT_EQ(added.grads.at(name)[i], before[entry.offset + i] + g[i]) << name << "[" << i << "]";
    }
  }
}

// The pre-activation's leading dimension must be a multiple of 8 for the GELU epilogues; a hidden
// width that is not one runs the layers one by one, bit for bit as with the fusion kept apart.
TEST(FusedMlp, AHiddenWidthNotAMultipleOf8RunsTheLayersOneByOne) {
  ALLOY_SEEDED(seed);
  using Fused = nn::Sequential<nn::Linear, nn::Gelu, nn::Linear>;
  using Separate = nn::Sequential<nn::Linear, PassThrough, nn::Gelu, nn::Linear>;
  const auto fused =
      run<Precision<bf16>>(Fused(nn::Linear("up", width, 13), nn::Gelu{}, nn::Linear("down", 13, 7)), seed);
  const auto separate = run<Precision<bf16>>(
      Separate(nn::Linear("up", width, 13), PassThrough{}, nn::Gelu{}, nn::Linear("down", 13, 7)), seed);
  test::expect_same_bits(fused, separate);
}

// Linear -> Gelu with no Linear after it: GELU in the product forward, Gelu's own backward from
// the kept pre-activation.
TEST(FusedMlp, LinearThenGeluAloneMatchesTheLayersRunOneByOne) {
  ALLOY_SEEDED(seed);
  using Fused = nn::Sequential<nn::Linear, nn::Gelu>;
  using Separate = nn::Sequential<nn::Linear, PassThrough, nn::Gelu>;
  const auto fused = run<Precision<fp32>>(Fused(nn::Linear("up", width, 24), nn::Gelu{}), seed);
  const auto separate = run<Precision<fp32>>(Separate(nn::Linear("up", width, 24), PassThrough{}, nn::Gelu{}), seed);
  test::expect_runs_agree(fused, separate, 1e-5);
}

// A Gelu that no Linear precedes runs its own passes, bit for bit as before the fusions; so does
// a second Gelu in Linear, Gelu, Linear, Gelu, whose first three layers fuse.
TEST(FusedMlp, GeluWithoutALinearBeforeItRunsOnItsOwn) {
  ALLOY_SEEDED(seed);
  using Alone = nn::Sequential<nn::Gelu, nn::Linear>;
  using Apart = nn::Sequential<PassThrough, nn::Gelu, nn::Linear>;
  const auto alone = run<Precision<bf16>>(Alone(nn::Gelu{}, nn::Linear("down", width, 8)), seed);
  const auto apart = run<Precision<bf16>>(Apart(PassThrough{}, nn::Gelu{}, nn::Linear("down", width, 8)), seed);
  test::expect_same_bits(alone, apart);

  using Twice = nn::Sequential<nn::Linear, nn::Gelu, nn::Linear, nn::Gelu>;
  using TwiceApart = nn::Sequential<nn::Linear, PassThrough, nn::Gelu, nn::Linear, PassThrough, nn::Gelu>;
  const auto twice =
      run<Precision<fp32>>(Twice(nn::Linear("a", width, 16), nn::Gelu{}, nn::Linear("b", 16, 8), nn::Gelu{}), seed);
  const auto twice_apart = run<Precision<fp32>>(TwiceApart(nn::Linear("a", width, 16), PassThrough{}, nn::Gelu{},
                                                           nn::Linear("b", 16, 8), PassThrough{}, nn::Gelu{}),
                                                seed);
  test::expect_runs_agree(twice, twice_apart, 1e-5);
}

// Residual<Linear>: the residual added in the Linear's own product.
TEST(FusedMlp, ResidualOfALinearAddsInTheProduct) {
  ALLOY_SEEDED(seed);
  using Apart = nn::Residual<nn::Sequential<nn::Linear, PassThrough>>;
  const auto fused = run<Precision<fp32>>(nn::Residual<nn::Linear>(nn::Linear("l", width, width)), seed);
  const auto apart = run<Precision<fp32>>(Apart(nn::Sequential(nn::Linear("l", width, width), PassThrough{})), seed);
  test::expect_runs_agree(fused, apart, 1e-6);
  EXPECT_NE(test::bits(fused.y), test::bits(apart.y))
      << "one rounding instead of two: equal bits mean the add did not fuse";
}

TEST(FusedMlp, AResidualBlockThatChangesTheWidthIsNamed) {
  std::vector<float> x(rows * width), dy(rows * width);
  nn::Residual<nn::Linear> block(nn::Linear("wide", width, width + 1));
  EXPECT_MENTIONS(test::message_of([&] { test::run_block<Precision<fp32>, Host>(block, x, dy, rows, width, 1); }),
                  "Residual 'block': input has 13 features, expected 12");
}

// The Gelu whose gradient the next Linear's product applied refuses to run its own backward.
TEST(FusedMlp, TheFusedGelusOwnBackwardIsRefused) {
  using Store = ParamStore<Precision<fp32>, SGD<>, Host>;
  nn::Sequential<nn::Linear, nn::Gelu, nn::Linear> block(nn::Linear("up", width, hidden), nn::Gelu{},
                                                         nn::Linear("down", hidden, width));
  ParamRegistry r;
  block.declare(r);
  Store store(r, Host{}, 1);
  Workspace<Host> ws;
  BackendResources<Host> res;
  Context<Store> ctx(store, ws, 1.0f, false, 0, 1, 0, 0, &res);
  std::vector<float> x(rows * width, 0.5f);
  const auto y = block.forward(ctx, Activation<const float>(x.data(), rows, width));
  EXPECT_MENTIONS(
      test::message_of([&] { block.layer<1>().backward(ctx, Activation<const float>(y.data, rows, hidden)); }),
      "Gelu: its forward was fused with the Linears around it");
}

}  // namespace

namespace {

// Residual<Sequential<LayerNorm, ...>>: the residual's gradient is added to dx inside LayerNorm's
// backward pass (one rounding, from fp32) instead of in a pass of its own (a PassThrough ahead of
// the LayerNorm keeps the separate add). Same results to fp32 rounding; a bf16 difference of at
// most one rounding of dx.
TEST(FusedMlp, ResidualGradientAddedInLayerNormsPassMatchesASeparateAdd) {
  ALLOY_SEEDED(seed);
  using Apart = nn::Residual<nn::Sequential<PassThrough, nn::LayerNorm, nn::Linear, nn::Gelu, nn::Linear>>;
  const auto apart_block = [] {
    return Apart(nn::Sequential(PassThrough{}, nn::LayerNorm("norm", width), nn::Linear("up", width, hidden),
                                nn::Gelu{}, nn::Linear("down", hidden, width)));
  };
  {
    const auto fused = run<Precision<fp32>>(fused_block(), seed);
    const auto apart = run<Precision<fp32>>(apart_block(), seed);
    test::expect_runs_agree(fused, apart, 1e-6);
  }
  {
    const auto fused = run<Precision<bf16>>(fused_block(), seed);
    const auto apart = run<Precision<bf16>>(apart_block(), seed);
    test::expect_runs_agree(fused, apart, 1e-2);
    EXPECT_NE(test::bits(fused.dx), test::bits(apart.dx)) << "the same bits: the add was not folded into LayerNorm";
  }
}

}  // namespace
