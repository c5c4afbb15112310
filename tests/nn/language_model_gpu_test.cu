// nn::Embedding and nn::LmHead on Cuda against the Host backend (language_model_test.cpp checks
// Host against float64 and finite differences).
//   Embedding kernels: the same fp32 additions in the same order on both backends, so the same
//     bits, at odd widths (scalar path), GPT-2's width (16-byte vectors) and GPT-2's vocabulary,
//     with a frequent token spread over several 32-row segments.
//   LmHead: cuBLASLt and the device's expf against the Host's loops, relative Frobenius error of
//     dy and of every gradient, and relative error of the loss, within: bf16 3e-2, fp16 5e-3 (each
//     side rounds logits, dlogits and products to 8 or 11 bits, in different orders), fp32 5e-5
//     (fp32 sums in other orders, through three products and the softmax), tf32 1e-2 (inputs
//     rounded to 10 bits, twice: logits and then dlogits feed products).
#include "language_model_runner.hpp"

#include "../support/test_support.hpp"

#include <alloy/kernels/embedding.hpp>

#include <gtest/gtest.h>

namespace {

using namespace alloy;
using test::LmHarness;
using test::LmShape;

template <class T>
class GpuEmbeddingKernels : public ::testing::Test {};
using EmbeddingDtypes = ::testing::Types<float, bf16, fp16>;
TYPED_TEST_SUITE(GpuEmbeddingKernels, EmbeddingDtypes, test::DtypeName);

struct EmbeddingCase {
  std::size_t rows, seq, vocab, table_rows, positions, dim, heavy;
};

std::string describe(const EmbeddingCase& c) {
  return "rows " + std::to_string(c.rows) + " in sequences of " + std::to_string(c.seq) + ", vocab " +
         std::to_string(c.vocab) + " (table " + std::to_string(c.table_rows) + "), dim " + std::to_string(c.dim) +
         ", one token " + std::to_string(c.heavy) + " times";
}

template <class T>
std::vector<T> device_values(const Buffer<T, Cuda>& b) {
  synchronize(Cuda{});
  return to_host(b);
}

template <class T>
std::size_t differing(const std::vector<T>& a, const std::vector<T>& b) {
  EXPECT_EQ(a.size(), b.size());
  std::size_t n = 0;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) n += test::bits_of(a[i]) != test::bits_of(b[i]);
  return n;
}

// Forward, then the backward written over random values and added to them: Cuda's bits are the
// Host's, and a second Cuda run's.
template <class T>
void expect_embedding_matches_host_bits(const EmbeddingCase& c, std::uint64_t seed) {
  SCOPED_TRACE(describe(c));
  std::mt19937_64 rng(seed);
  auto tokens = test::random_targets(c.rows, c.vocab, rng);
  for (std::size_t i = 0; i < c.heavy; ++i) tokens[(i * 7919) % c.rows] = std::int32_t(c.vocab / 2);
  const auto wte = test::random_values<T>(c.table_rows * c.dim, rng);
  const auto wpe = test::random_values<T>(c.positions * c.dim, rng);
  const auto dx = test::random_values<T>(c.rows * c.dim, rng);
  TokenGroups groups;
  groups.build(tokens, c.vocab);
  const auto host_groups = groups.view(groups.packed().data());

  Buffer<std::int32_t, Cuda> d_tokens(tokens.size()), d_packed(groups.packed().size());
  copy_from_host(d_tokens, std::span<const std::int32_t>(tokens));
  copy_from_host(d_packed, groups.packed());
  const auto device_groups = groups.view(d_packed.data());
  const auto upload = [](const std::vector<T>& v) {
    Buffer<T, Cuda> b(v.size());
    copy_from_host(b, std::span<const T>(v));
    return b;
  };
  auto d_wte = upload(wte), d_wpe = upload(wpe), d_dx = upload(dx);

  std::vector<T> x(c.rows * c.dim);
  embedding_forward(Host{}, tokens.data(), wte.data(), wpe.data(), x.data(), c.rows, c.dim, c.seq);
  Buffer<T, Cuda> d_x(x.size());
  embedding_forward(Cuda{}, d_tokens.data(), d_wte.data(), d_wpe.data(), d_x.data(), c.rows, c.dim, c.seq);
  EXPECT_EQ(differing(device_values(d_x), x), 0u) << "elements of x";

  std::vector<float> scratch(embedding_token_backward_scratch_floats(host_groups, c.dim));
  Buffer<float, Cuda> d_scratch(scratch.size() + 1);
  for (bool accumulate : {false, true}) {
    SCOPED_TRACE(accumulate ? "accumulating" : "writing");
    auto dwte = test::random_values<T>(wte.size(), rng), dwpe = test::random_values<T>(wpe.size(), rng);
    auto d_dwte = upload(dwte), d_dwpe = upload(dwpe), again_dwte = upload(dwte), again_dwpe = upload(dwpe);
    embedding_token_backward(Host{}, dx.data(), host_groups, c.dim, dwte.data(), c.table_rows, accumulate,
                             scratch.data());
    embedding_position_backward(Host{}, dx.data(), c.rows, c.dim, c.seq, dwpe.data(), c.positions, accumulate);
    for (auto* g : {&d_dwte, &again_dwte}) {
      embedding_token_backward(Cuda{}, d_dx.data(), device_groups, c.dim, g->data(), c.table_rows, accumulate,
                               d_scratch.data());
    }
    for (auto* g : {&d_dwpe, &again_dwpe}) {
      embedding_position_backward(Cuda{}, d_dx.data(), c.rows, c.dim, c.seq, g->data(), c.positions, accumulate);
    }
    const auto cuda_dwte = device_values(d_dwte), cuda_dwpe = device_values(d_dwpe);
    EXPECT_EQ(differing(cuda_dwte, dwte), 0u) << "elements of dwte";
    EXPECT_EQ(differing(cuda_dwpe, dwpe), 0u) << "elements of dwpe";
    EXPECT_EQ(differing(device_values(again_dwte), cuda_dwte), 0u) << "elements of dwte, run twice";
    EXPECT_EQ(differing(device_values(again_dwpe), cuda_dwpe), 0u) << "elements of dwpe, run twice";
  }
}

TYPED_TEST(GpuEmbeddingKernels, MatchHostBitForBit) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  // dim 37: every access scalar; 40 and 768: 16-byte vectors (fp32: 4 lanes, 16-bit: 8).
  for (const EmbeddingCase& c :
       {EmbeddingCase{405, 45, 23, 24, 50, 37, 150}, EmbeddingCase{259, 37, 97, 101, 41, 40, 70},
        EmbeddingCase{1024, 64, 50257, 50304, 1024, 768, 300}}) {
    expect_embedding_matches_host_bits<TypeParam>(c, seed + c.dim);
  }
}

// GPT-2's micro-batch: 16 sequences of 1024 tokens, d 768, a token in 1 of 8 rows.
TEST(GpuEmbeddingGpt2, MatchesHostBitForBit) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  expect_embedding_matches_host_bits<bf16>({16384, 1024, 50257, 50304, 1024, 768, 2048}, seed);
}

template <class P>
double head_tolerance() {
  using C = typename P::compute_type;
  if constexpr (std::is_same_v<C, bf16>) {
    return 3e-2;
  } else if constexpr (std::is_same_v<C, fp16>) {
    return 5e-3;
  } else if constexpr (std::is_same_v<C, tf32>) {
    return 1e-2;
  } else {
    return 5e-5;
  }
}

// One step on each backend from the same parameters (and, accumulating, the same gradients
// before): loss, dy and every gradient within head_tolerance<P>().
template <class P>
void expect_head_matches_host(const LmShape& s, bool accumulate, std::uint64_t seed) {
  SCOPED_TRACE(s.describe() + (accumulate ? ", accumulating" : "") + ", " +
               alloy::numeric_traits<typename P::compute_type>::name);
  std::mt19937_64 rng(seed);
  auto tokens = test::random_tokens(s.rows(), s.vocab, rng);
  auto targets = test::random_targets(s.rows(), s.vocab, rng);
  targets[s.rows() / 2] = s.ignore_index;
  LmHarness<P, Host> host(s, seed);
  LmHarness<P, Cuda> cuda(s, seed);
  // Logits of standard deviation about 2 at every width: x = wte + wpe has variance 2 sd^2, a
  // logit sums dim products of it with W.
  host.randomize_params(1.2 / std::pow(double(s.dim), 0.25), rng);
  cuda.set_params(host.params());
  const auto before = test::random_values<typename LmHarness<P, Host>::T>(host.params().size(), rng);
  host.set_grads(before);
  cuda.set_grads(before);
  const float host_loss = host.step(tokens, targets, accumulate, 4.0f);
  float cuda_loss = 0;
  try {
    cuda_loss = cuda.step(tokens, targets, accumulate, 4.0f);
  } catch (const alloy::error& e) {
    ADD_FAILURE() << e.what();
    return;
  }
  const double tolerance = head_tolerance<P>();
  EXPECT_NEAR(cuda_loss, host_loss, tolerance * host_loss) << "loss";
  EXPECT_LT(test::relative_error(cuda.dx(), test::widened(host.dx())), tolerance) << "dy";
  for (const char* name : {"wte.weight", "wpe.weight", "lm_head.weight"}) {
    if (s.tied && std::string(name) == "lm_head.weight") continue;
    EXPECT_LT(test::relative_error(cuda.grad(name), test::widened(host.grad(name))), tolerance)
        << "gradient of " << name;
  }
}

template <class P>
class GpuLmHead : public ::testing::Test {};
using Precisions = ::testing::Types<Precision<bf16>, Precision<fp16>, Precision<fp32>, Precision<tf32>>;
struct PrecisionName {
  template <class P>
  static std::string GetName(int) {
    return alloy::numeric_traits<typename P::compute_type>::name;
  }
};
TYPED_TEST_SUITE(GpuLmHead, Precisions, PrecisionName);

TYPED_TEST(GpuLmHead, MatchesHostOnOddSizes) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (bool tied : {true, false}) {
    for (bool accumulate : {false, true}) {
      LmShape s;  // 37 rows, dim 40, vocab 97 padded to 101, chunks of 10
      s.tied = tied;
      expect_head_matches_host<TypeParam>(s, accumulate, seed);
      // Rows of whole vectors, several sequences, chunks of 128 over 300 rows.
      s = {.batch = 6,
           .seq = 50,
           .vocab = 1000,
           .padded_vocab = 1024,
           .dim = 64,
           .max_positions = 64,
           .chunk_rows = 128,
           .tied = tied,
           .ignore_index = -100};
      expect_head_matches_host<TypeParam>(s, accumulate, seed + 1);
    }
  }
}

// GPT-2's width and vocabulary (50257 padded to 50304) at 64 rows in chunks of 48: the products
// cuBLASLt plans for the real head's shapes.
TEST(GpuLmHeadGpt2, VocabularyMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const LmShape s{.batch = 2,
                  .seq = 32,
                  .vocab = 50257,
                  .padded_vocab = 50304,
                  .dim = 768,
                  .max_positions = 1024,
                  .chunk_rows = 48};
  expect_head_matches_host<Precision<bf16>>(s, false, seed);
}

// The same inputs twice on the device: the same bits (cuBLASLt's products and the row kernel
// are deterministic; the embedding's backward has no atomics).
TEST(GpuLmHeadDeterminism, RerunningGivesTheSameBits) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const LmShape s{
      .batch = 6, .seq = 50, .vocab = 1000, .padded_vocab = 1024, .dim = 64, .max_positions = 64, .chunk_rows = 128};
  std::mt19937_64 rng(seed);
  const auto tokens = test::random_tokens(s.rows(), s.vocab, rng);
  const auto targets = test::random_targets(s.rows(), s.vocab, rng);
  LmHarness<Precision<bf16>, Cuda> first(s, seed), second(s, seed);
  first.randomize_params(0.5, rng);
  second.set_params(first.params());
  const float a = first.step(tokens, targets, false), b = second.step(tokens, targets, false);
  EXPECT_EQ(test::bits_of(a), test::bits_of(b));
  EXPECT_EQ(differing(first.dx(), second.dx()), 0u) << "elements of dy";
  EXPECT_EQ(differing(first.grads(), second.grads()), 0u) << "elements of the gradients";
}

// Chunks of 1, 7 and 128 rows against one chunk of 300: within bf16 rounding (cuBLASLt may pick
// other kernels for other row counts, and dW is rounded to bf16 after each chunk).
TEST(GpuLmHeadChunks, ChunkedMatchesUnchunked) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  LmShape s{
      .batch = 6, .seq = 50, .vocab = 1000, .padded_vocab = 1024, .dim = 64, .max_positions = 64, .chunk_rows = 300};
  std::mt19937_64 rng(seed);
  const auto tokens = test::random_tokens(s.rows(), s.vocab, rng);
  const auto targets = test::random_targets(s.rows(), s.vocab, rng);
  LmHarness<Precision<bf16>, Cuda> whole(s, seed);
  whole.randomize_params(0.5, rng);
  const float loss = whole.step(tokens, targets, false);
  for (std::size_t chunk : {std::size_t(1), std::size_t(7), std::size_t(128)}) {
    s.chunk_rows = chunk;
    SCOPED_TRACE(s.describe());
    LmHarness<Precision<bf16>, Cuda> chunked(s, seed);
    chunked.set_params(whole.params());
    EXPECT_NEAR(chunked.step(tokens, targets, false), loss, 1e-2 * loss);
    EXPECT_LT(test::relative_error(chunked.dx(), test::widened(whole.dx())), 2e-2);
    EXPECT_LT(test::relative_error(chunked.grad("wte.weight"), test::widened(whole.grad("wte.weight"))), 2e-2);
    EXPECT_LT(chunked.peak_bytes(), whole.peak_bytes());
  }
}

// The loss stays on the device (nothing waits for it); a bad target is an error before anything
// is queued, and leaves the gradients as they were.
TEST(GpuLmHeadInput, LossOnTheDeviceAndBadTargetsRefused) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const LmShape s;
  std::mt19937_64 rng(seed);
  const auto tokens = test::random_tokens(s.rows(), s.vocab, rng);
  auto targets = test::random_targets(s.rows(), s.vocab, rng);
  LmHarness<Precision<bf16>, Cuda> h(s, seed);
  const auto grads = test::random_values<bf16>(h.grads().size(), rng);
  h.set_grads(grads);

  using Store = LmHarness<Precision<bf16>, Cuda>::Store;
  Workspace<Cuda> ws;
  BackendResources<Cuda> res;
  Context<Store> ctx(h.store(), ws, 1.0f, true, 0, 1, 0, 0, &res);
  const auto x = h.model().embed.forward(ctx, tokens, s.seq);
  const auto [loss, dy] = h.model().head.forward_backward(ctx, Activation<const bf16>(x), targets);
  EXPECT_TRUE(loss.on_device());
  EXPECT_GT(loss.value(), 0.0f);

  h.set_grads(grads);
  targets[11] = 97;
  EXPECT_MENTIONS(test::message_of([&] { h.step(tokens, targets, true); }), "target 97 at row 11 is outside [0, 97)");
  EXPECT_EQ(differing(h.grads(), grads), 0u);
}

}  // namespace
