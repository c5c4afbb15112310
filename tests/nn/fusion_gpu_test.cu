// The fused layers on Cuda against the same block on Host (fusion_test.cpp checks Host's fused
// path against the layers run one by one): Linear -> Gelu -> Linear with its residual added in the
// product, at odd row counts, in every 16- and 32-bit dtype, writing and accumulating gradients.
// Tolerances, relative Frobenius error: the products' dtype tolerances of gemm_gpu_test.cu, with
// 2e-3 for fp32 since cuBLASLt's GELU may use the hardware tanh (relative error up to 2^-11).
#include "block_runner.hpp"

#include "../support/test_support.hpp"

#include <gtest/gtest.h>

namespace {

using namespace alloy;
namespace nn = alloy::nn;

using FusedBlock = nn::Residual<nn::Sequential<nn::LayerNorm, nn::Linear, nn::Gelu, nn::Linear>>;

FusedBlock fused_block(std::size_t d, std::size_t hidden, nn::GeluOptions gelu = {}) {
  return FusedBlock(nn::Sequential(nn::LayerNorm("norm", d), nn::Linear("up", d, hidden), nn::Gelu(gelu),
                                   nn::Linear("down", hidden, d)));
}

template <class P>
void expect_cuda_block_matches_host(std::size_t rows, std::size_t d, std::size_t hidden, bool accumulate,
                                    double tolerance, std::uint64_t seed, nn::GeluOptions gelu = {}) {
  using T = storage_t<typename P::compute_type>;
  SCOPED_TRACE("rows " + std::to_string(rows) + ", d " + std::to_string(d) + ", hidden " + std::to_string(hidden) +
               (accumulate ? ", accumulating" : ""));
  std::mt19937_64 rng(seed);
  const auto x = test::random_values<T>(rows * d, rng);
  const auto dy = test::random_values<T>(rows * d, rng);
  auto block = fused_block(d, hidden, gelu);
  ParamRegistry r;
  block.declare(r);
  ParamStore<P, SGD<>, Host> host_store(r, Host{}, seed);
  const auto params = to_host(host_store.params_arena());
  const auto grads_before = test::random_values<T>(params.size(), rng);
  const auto* before = accumulate ? &grads_before : nullptr;
  auto host_block = fused_block(d, hidden, gelu), cuda_block = fused_block(d, hidden, gelu);
  const auto host = test::run_block<P, Host>(host_block, x, dy, rows, d, seed, &params, before);
  const auto cuda = test::run_block<P, Cuda>(cuda_block, x, dy, rows, d, seed, &params, before);
  test::expect_runs_agree(cuda, host, tolerance);
  EXPECT_EQ(cuda.bytes_after_forward, host.bytes_after_forward) << "both backends keep the same activations";
}

TEST(GpuFusedMlp, ResidualBlockMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (bool accumulate : {false, true}) {
    for (auto [rows, d] : {std::pair<std::size_t, std::size_t>{37, 64}, {129, 40}, {256, 256}}) {
      expect_cuda_block_matches_host<Precision<bf16>>(rows, d, 4 * d, accumulate, 2e-2, seed);
      expect_cuda_block_matches_host<Precision<fp16>>(rows, d, 4 * d, accumulate, 5e-3, seed);
      expect_cuda_block_matches_host<Precision<fp32>>(rows, d, 4 * d, accumulate, 2e-3, seed);
      expect_cuda_block_matches_host<Precision<tf32>>(rows, d, 4 * d, accumulate, 5e-3, seed);
    }
  }
}

// GeluOptions::keep_output: the h the up product's epilogue wrote feeds down's weight gradient.
TEST(GpuFusedMlp, KeepingGelusOutputMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (auto [rows, d] : {std::pair<std::size_t, std::size_t>{37, 64}, {129, 40}}) {
    expect_cuda_block_matches_host<Precision<bf16>>(rows, d, 4 * d, false, 2e-2, seed, {.keep_output = true});
    expect_cuda_block_matches_host<Precision<fp32>>(rows, d, 4 * d, true, 2e-3, seed, {.keep_output = true});
    expect_cuda_block_matches_host<Precision<tf32>>(rows, d, 4 * d, false, 5e-3, seed, {.keep_output = true});
  }
}

// The residual MLP's own block shape (d = 1024, hidden 4096) at 512 rows, bf16.
TEST(GpuFusedMlp, ResidualMlpSizedBlockMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  expect_cuda_block_matches_host<Precision<bf16>>(512, 1024, 4096, false, 2e-2, seed);
}

// The recomputation's forward_for_backward (no down product) gives the bits of forward then
// backward on the device too: up's product runs with the same plan either way.
TEST(GpuFusedMlp, ForwardForBackwardGivesTheBitsOfForward) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using T = bf16;
  for (auto [rows, d] : {std::pair<std::size_t, std::size_t>{300, 128}, {77, 40}}) {
    std::mt19937_64 rng(seed);
    const auto x = test::random_values<T>(rows * d, rng);
    const auto dy = test::random_values<T>(rows * d, rng);
    auto first = fused_block(d, 4 * d), second = fused_block(d, 4 * d);
    const auto full = test::run_block<Precision<bf16>, Cuda>(first, x, dy, rows, d, seed);
    const auto recomputed =
        test::run_block<Precision<bf16>, Cuda>(second, x, dy, rows, d, seed, nullptr, nullptr, true);
    EXPECT_EQ(test::bits(recomputed.dx), test::bits(full.dx)) << rows << " x " << d;
    for (const auto& [name, g] : full.grads) EXPECT_EQ(test::bits(recomputed.grads.at(name)), test::bits(g)) << name;
    EXPECT_LT(recomputed.bytes_after_forward, full.bytes_after_forward);
  }
}

// Re-running the fused forward and backward on the device gives the same bits (Checkpointing
// relies on it); the dGELU bias-gradient reduction included.
TEST(GpuFusedMlp, RerunningGivesTheSameBits) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using T = bf16;
  const std::size_t rows = 300, d = 128;
  std::mt19937_64 rng(seed);
  const auto x = test::random_values<T>(rows * d, rng);
  const auto dy = test::random_values<T>(rows * d, rng);
  auto first = fused_block(d, 4 * d), second = fused_block(d, 4 * d);
  const auto a = test::run_block<Precision<bf16>, Cuda>(first, x, dy, rows, d, seed);
  const auto b = test::run_block<Precision<bf16>, Cuda>(second, x, dy, rows, d, seed);
  test::expect_same_bits(a, b);
}

}  // namespace
