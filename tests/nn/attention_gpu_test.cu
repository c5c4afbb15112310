// CausalSelfAttention and GPT-2's block on Cuda against the same layer on Host (attention_test.cpp
// checks Host against float64 and finite differences), on fresh random inputs and identical
// parameters, writing and accumulating gradients: every precision with heads of 64 (the attention
// kernel's tensor-core path, asserted; 3xTF32 for fp32) and heads of 16 and 40 (its row path).
// Tolerances, relative Frobenius error: the products' dtype tolerances of gemm_gpu_test.cu and
// fusion_gpu_test.cu (bf16 2e-2, fp16 5e-3, tf32 5e-3, fp32 2e-3 for blocks with cuBLASLt's
// GELU, 1e-4 for the attention layer alone); the tensor-core attention differs from Host by
// fp32 summation order and exp2, and for fp32 by 3xTF32's products (kernels/attention_gpu_test.cu
// bounds it per element), inside these.
#include "block_runner.hpp"

#include "../support/test_support.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace {

using namespace alloy;
namespace nn = alloy::nn;

struct Shape {
  std::size_t batch, seq, channels, heads;
  std::size_t rows() const { return batch * seq; }
};

std::string describe(const Shape& s) {
  return "batch " + std::to_string(s.batch) + ", seq " + std::to_string(s.seq) + ", channels " +
         std::to_string(s.channels) + ", heads " + std::to_string(s.heads);
}

// Whether the layer's attention runs on the tensor cores on Cuda in compute dtype C, for its
// arguments on workspace memory (256-byte aligned, as the layer's are).
template <class C>
bool takes_tensor_cores(const nn::CausalSelfAttention& layer, std::size_t batch) {
  using T = storage_t<C>;
  Workspace<Host> ws;
  const std::size_t rows = batch * layer.seq(), c = layer.channels();
  T* qkv = ws.allocate<T>(rows * 3 * c);
  T* out = ws.allocate<T>(rows * c);
  float* lse = ws.allocate<float>(batch * layer.heads() * layer.seq());
  return attention_uses_tensor_cores(layer.attention_args<C>(qkv, out, lse, batch));
}

template <class P, class MakeBlock>
void expect_cuda_matches_host(MakeBlock make, const Shape& s, bool accumulate, double tolerance, std::uint64_t seed) {
  using T = storage_t<typename P::compute_type>;
  SCOPED_TRACE(describe(s) + ", " + numeric_traits<typename P::compute_type>::name +
               (accumulate ? ", accumulating" : ""));
  std::mt19937_64 rng(seed);
  const auto x = test::random_values<T>(s.rows() * s.channels, rng);
  const auto dy = test::random_values<T>(s.rows() * s.channels, rng);
  auto block = make();
  ParamRegistry r;
  block.declare(r);
  const auto params = to_host(ParamStore<P, SGD<>, Host>(r, Host{}, seed).params_arena());
  const auto grads_before = test::random_values<T>(params.size(), rng);
  const auto* before = accumulate ? &grads_before : nullptr;
  auto host_block = make(), cuda_block = make();
  const auto host = test::run_block<P, Host>(host_block, x, dy, s.rows(), s.channels, seed, &params, before);
  const auto cuda = test::run_block<P, Cuda>(cuda_block, x, dy, s.rows(), s.channels, seed, &params, before);
  test::expect_runs_agree(cuda, host, tolerance);
  EXPECT_EQ(cuda.bytes_after_forward, host.bytes_after_forward) << "both backends keep the same activations";
}

template <class P>
void expect_layer_matches_host(const Shape& s, bool tensor_cores, double tolerance, std::uint64_t seed) {
  const auto make = [&] { return nn::CausalSelfAttention("attn", s.channels, s.heads, s.seq); };
  ASSERT_EQ(takes_tensor_cores<typename P::compute_type>(make(), s.batch), tensor_cores) << describe(s);
  for (bool accumulate : {false, true}) expect_cuda_matches_host<P>(make, s, accumulate, tolerance, seed);
}

template <class P>
void expect_block_matches_host(const Shape& s, double tolerance, std::uint64_t seed) {
  // Initialized wider than GPT-2's 0.02, so that the softmax is far from uniform.
  const auto make = [&] { return nn::gpt2_block("h.0", s.channels, s.heads, s.seq, 12, 0.25f); };
  for (bool accumulate : {false, true}) expect_cuda_matches_host<P>(make, s, accumulate, tolerance, seed);
}

// Heads of 64, sequences around the kernel's 64-row tiles (37, 70, 100, 130).
TEST(GpuCausalSelfAttention, TensorCorePathMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const Shape& s : {Shape{2, 37, 128, 2}, Shape{3, 100, 192, 3}, Shape{1, 130, 64, 1}, Shape{3, 70, 128, 2}}) {
    expect_layer_matches_host<Precision<bf16>>(s, true, 2e-2, seed + s.seq);
    expect_layer_matches_host<Precision<fp16>>(s, true, 5e-3, seed + s.seq);
    expect_layer_matches_host<Precision<fp32>>(s, true, 1e-4, seed + s.seq);
    expect_layer_matches_host<Precision<tf32>>(s, true, 5e-3, seed + s.seq);
  }
}

TEST(GpuCausalSelfAttention, RowPathMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const Shape& s : {Shape{2, 37, 48, 3}, Shape{2, 37, 80, 2}}) {
    expect_layer_matches_host<Precision<fp32>>(s, false, 1e-4, seed + s.seq);
    expect_layer_matches_host<Precision<tf32>>(s, false, 5e-3, seed + s.seq);
  }
  // 16-bit heads of 40 (and 16) take the row path too.
  expect_layer_matches_host<Precision<bf16>>({2, 37, 80, 2}, false, 2e-2, seed);
  expect_layer_matches_host<Precision<fp16>>({2, 37, 48, 3}, false, 5e-3, seed);
}

TEST(GpuGpt2Block, MatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const Shape s{2, 100, 128, 2};
  expect_block_matches_host<Precision<bf16>>(s, 2e-2, seed);
  expect_block_matches_host<Precision<fp16>>(s, 5e-3, seed);
  expect_block_matches_host<Precision<fp32>>(s, 2e-3, seed);
  expect_block_matches_host<Precision<tf32>>(s, 5e-3, seed);
}

// GPT-2 124M's block width (768 channels, 12 heads of 64) at 2 sequences of 256 positions, bf16.
TEST(GpuGpt2Block, Gpt2SizedBlockMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const Shape s{2, 256, 768, 12};
  expect_cuda_matches_host<Precision<bf16>>([&] { return nn::gpt2_block("h.0", 768, 12, 256, 12); }, s, false, 2e-2,
                                            seed);
}

// Re-running the block on the device gives the same bits, and so does recomputing blocks inside
// backward (nn::Repeated, as Checkpointing does): keeping every activation, recomputing every
// block and every two blocks agree bit for bit.
TEST(GpuGpt2Block, RecomputingGivesTheSameBits) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const Shape s{2, 130, 128, 2};
  std::mt19937_64 rng(seed);
  const auto x = test::random_values<bf16>(s.rows() * s.channels, rng);
  const auto dy = test::random_values<bf16>(s.rows() * s.channels, rng);
  const auto blocks = [&] {
    std::vector<nn::Gpt2Block> b;
    for (int i = 0; i < 3; ++i) b.push_back(nn::gpt2_block("h." + std::to_string(i), s.channels, s.heads, s.seq, 3));
    return nn::Repeated<nn::Gpt2Block>(std::move(b));
  };
  std::vector<test::BlockRun<bf16>> runs;
  for (int every : {0, 0, 1, 2}) {
    auto repeated = blocks();
    runs.push_back(test::run_block<Precision<bf16>, Cuda>(repeated, x, dy, s.rows(), s.channels, seed, nullptr, nullptr,
                                                          false, every));
  }
  for (std::size_t i = 1; i < runs.size(); ++i) {
    SCOPED_TRACE("run " + std::to_string(i));
    test::expect_same_bits(runs[i], runs[0]);
  }
}

}  // namespace
