// The cuBLASLt matrix product against the Host one on the same fresh random inputs.
// Tolerances, relative Frobenius error ||C_cuda - C_host|| / ||C_host||, from the dtype:
//   bf16 1e-2, fp16 2e-3: each side rounds its fp32 result to 8 or 11 significant bits once, and
//     summation orders differ, so results one rounding step apart (2^-8, 2^-11) are expected;
//   fp32 1e-5: fp32 sums of up to 3072 products in different orders (about sqrt(k) * 2^-24);
//   tf32 3e-3: the Host models the tensor cores' input rounding (to nearest even); whether they
//     round or truncate is not documented, and truncation moves each input by up to 2^-10;
//   GELU outputs at least 5e-4: cuBLASLt may evaluate tanh with the hardware approximation
//     (relative error up to 2^-11), where the Host uses std::tanh.
#include "../support/gemm_operands.hpp"
#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"
#include "../support/values.hpp"

#include <alloy/backend/algorithms.hpp>
#include <alloy/kernels/activations.hpp>
#include <alloy/kernels/gemm.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <random>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace {

using alloy::bf16;
using alloy::Buffer;
using alloy::Cuda;
using alloy::Epilogue;
using alloy::fp16;
using alloy::GemmArgs;
using alloy::GemmHandle;
using alloy::Host;
using alloy::storage_t;
using alloy::tf32;
using alloy::Transpose;
using namespace alloy::test;

constexpr Transpose no = Transpose::no;
constexpr Transpose yes = Transpose::yes;

template <class Compute>
double tolerance() {
  if constexpr (std::is_same_v<Compute, bf16>) {
    return 1e-2;
  } else if constexpr (std::is_same_v<Compute, fp16>) {
    return 2e-3;
  } else if constexpr (std::is_same_v<Compute, tf32>) {
    return 3e-3;
  } else {
    return 1e-5;
  }
}

template <class Compute>
double gelu_tolerance() {
  return std::max(tolerance<Compute>(), 5e-4);
}

// The same operands in device memory, reusable for another draw of the same shape.
template <class Compute>
struct DeviceOperands {
  using T = storage_t<Compute>;
  Buffer<T, Cuda> a, b, c, c_in, bias, bias_grad, pre_activation;

  DeviceOperands(const GemmOperands<Compute>& x, Cuda be)
      : a(x.a.size(), be),
        b(x.b.size(), be),
        c(x.c.size(), be),
        c_in(x.c_in.size(), be),
        bias(x.bias.size(), be),
        bias_grad(x.bias_grad.size(), be),
        pre_activation(x.pre_activation.size(), be) {
    upload(x);
  }

  void upload(const GemmOperands<Compute>& x) {
    alloy::copy_from_host(a, std::span<const T>(x.a));
    alloy::copy_from_host(b, std::span<const T>(x.b));
    alloy::copy_from_host(c, std::span<const T>(x.c));
    alloy::copy_from_host(c_in, std::span<const T>(x.c_in));
    alloy::copy_from_host(bias, std::span<const T>(x.bias));
    alloy::copy_from_host(bias_grad, std::span<const T>(x.bias_grad));
    alloy::copy_from_host(pre_activation, std::span<const T>(x.pre_activation));
  }

  GemmArgs<Compute> args(const GemmOperands<Compute>& x) {
    return x.args(a.data(), b.data(), c.data(), bias.data(), bias_grad.data(), pre_activation.data(), c_in.data());
  }
};

// ||got - want|| / ||scale|| over a rows x cols block with leading dimension ld (scale: want
// itself unless given); elements outside the block must keep `before`'s bits. Unwritten or
// non-finite elements fail by name.
template <class T>
void expect_close(const char* what, const std::vector<T>& got, const std::vector<T>& want, const std::vector<T>& before,
                  std::size_t rows, std::size_t cols, std::size_t ld, double tol,
                  const std::vector<T>* scale = nullptr) {
  double error = 0, norm = 0;
  std::size_t unwritten = 0, non_finite = 0;
  for (std::size_t i = 0; i < rows; ++i) {
    for (std::size_t j = 0; j < ld; ++j) {
      const std::size_t e = i * ld + j;
      if (j >= cols) {
        ASSERT_EQ(bits_of(got[e]), bits_of(before[e]))
            << what << " written outside its block at (" << i << ", " << j << ")";
        continue;
      }
      const double g = alloy::to_float(got[e]), w = alloy::to_float(want[e]);
      const double m = scale ? alloy::to_float((*scale)[e]) : w;
      if (bits_of(got[e]) == bits_of(poison<T>())) ++unwritten;
      if (!std::isfinite(g)) ++non_finite;
      error += (g - w) * (g - w);
      norm += m * m;
    }
  }
  EXPECT_EQ(unwritten, 0u) << what << ": elements never written";
  EXPECT_EQ(non_finite, 0u) << what << ": non-finite elements";
  const double relative = norm > 0 ? std::sqrt(error / norm) : std::sqrt(error);
  EXPECT_LT(relative, tol) << what << ": relative Frobenius error against Host";
}

// Runs x on Host and on Cuda (through `device`, which holds x's data) and compares every output.
template <class Compute>
void expect_cuda_matches_host(GemmHandle& handle, GemmOperands<Compute>& x, DeviceOperands<Compute>& device,
                              Cuda be = {}) {
  const GemmCase& s = x.shape;
  SCOPED_TRACE(describe(s));
  auto host = x;
  alloy::gemm(Host{}, host.args());
  // A configuration cuBLASLt refuses fails this case alone, so one run lists every refusal.
  try {
    alloy::gemm(be, handle, device.args(x));
    alloy::synchronize(be);
  } catch (const alloy::cuda_error& e) {
    ADD_FAILURE() << e.what();
    return;
  }

  const bool gelu = alloy::detail::applies_gelu(s.epilogue) || alloy::detail::applies_gelu_gradient(s.epilogue);
  // Without GELU, C's error is measured against the product of the magnitudes, |alpha| |A| |B| +
  // |beta| |C| (+ |bias|): where the terms cancel (a 1 x 1 x 1 product with beta = 1), the result
  // is small and its rounding differences, relative to it, are not.
  std::vector<typename GemmOperands<Compute>::T> magnitude;
  if (!gelu) {
    auto m = x;
    auto abs_all = [](auto& v) {
      for (auto& e : v) e = alloy::round_nearest<std::remove_reference_t<decltype(e)>>(std::fabs(alloy::to_float(e)));
    };
    abs_all(m.a);
    abs_all(m.b);
    abs_all(m.c);
    abs_all(m.c_in);
    abs_all(m.bias);
    m.shape.alpha = std::fabs(m.shape.alpha);
    m.shape.beta = std::fabs(m.shape.beta);
    alloy::gemm(Host{}, m.args());
    magnitude = std::move(m.c);
  }
  expect_close("C", alloy::to_host(device.c), host.c, x.c, s.m, s.n, x.ldc,
               gelu ? gelu_tolerance<Compute>() : tolerance<Compute>(), gelu ? nullptr : &magnitude);
  // A pre_activation the epilogue reads must come back as it went: compared over no columns,
  // every element is checked bit for bit.
  expect_close("pre_activation", alloy::to_host(device.pre_activation), host.pre_activation, x.pre_activation, s.m,
               s.keep_pre_activation ? s.n : 0, x.ldp, tolerance<Compute>());
  const std::size_t bias_grad_length = s.bias_grad_length();
  expect_close("bias_grad", alloy::to_host(device.bias_grad), host.bias_grad, x.bias_grad, 1,
               alloy::detail::writes_bias_grad(s.epilogue) ? bias_grad_length : 0, bias_grad_length + 1,
               gelu ? gelu_tolerance<Compute>() : tolerance<Compute>());
  if (s.separate_c_in) {
    expect_close("c_in", alloy::to_host(device.c_in), x.c_in, x.c_in, s.m, 0, x.ldc, tolerance<Compute>());
  }
}

template <class Compute>
void expect_cuda_matches_host(GemmHandle& handle, const GemmCase& s, std::uint64_t seed, Cuda be = {}) {
  std::mt19937_64 rng(seed);
  GemmOperands<Compute> x(s, rng);
  DeviceOperands<Compute> device(x, be);
  expect_cuda_matches_host(handle, x, device, be);
}

template <class Compute>
class CudaGemm : public ::testing::Test {};

using Computes = ::testing::Types<bf16, fp16, float, tf32>;
TYPED_TEST_SUITE(CudaGemm, Computes, DtypeName);

TYPED_TEST(CudaGemm, MatchesHostForEveryTransposeAlphaAndBeta) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  GemmHandle handle;
  const GemmCase sizes[] = {{.m = 37, .n = 29, .k = 53},
                            {.m = 1, .n = 1, .k = 1, .packed = true},
                            {.m = 7, .n = 5, .k = 3},
                            {.m = 64, .n = 48, .k = 80, .packed = true}};
  const std::pair<float, float> scalings[] = {{1.0f, 0.0f}, {1.0f, 1.0f}, {0.5f, 1.0f}};
  for (GemmCase s : sizes) {
    for (Transpose ta : {no, yes}) {
      for (Transpose tb : {no, yes}) {
        for (auto [alpha, beta] : scalings) {
          s.transa = ta, s.transb = tb, s.alpha = alpha, s.beta = beta;
          expect_cuda_matches_host<TypeParam>(handle, s, seed + s.m);
        }
      }
    }
  }
}

TYPED_TEST(CudaGemm, EveryEpilogueMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  GemmHandle handle;
  for (Epilogue e : every_epilogue) {
    for (bool keep : {false, true}) {
      if (keep && !alloy::detail::applies_gelu(e)) continue;
      for (Transpose ta : {no, yes}) {
        if (e == Epilogue::bias_grad && ta == no) continue;  // refused by the argument check
        for (Transpose tb : {no, yes}) {
          for (float beta : {0.0f, 1.0f}) {
            if (beta != 0.0f && alloy::detail::applies_gelu_gradient(e)) continue;  // refused: needs beta = 0
            expect_cuda_matches_host<TypeParam>(handle,
                                                {.transa = ta,
                                                 .transb = tb,
                                                 .m = 37,
                                                 .n = 29,
                                                 .k = 53,
                                                 .beta = beta,
                                                 .epilogue = e,
                                                 .keep_pre_activation = keep},
                                                seed);
          }
        }
      }
    }
  }
}

// D written apart from C (c_in): cuBLASLt's separate C and D pointers, with every epilogue that
// allows beta, both transposes of B, and odd and packed sizes.
TYPED_TEST(CudaGemm, SeparateCInMatchesHostAndIsLeftAsItWas) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  GemmHandle handle;
  for (Epilogue e : {Epilogue::none, Epilogue::bias, Epilogue::bias_gelu_tanh}) {
    for (Transpose tb : {no, yes}) {
      for (GemmCase s : {GemmCase{.m = 37, .n = 29, .k = 53}, GemmCase{.m = 64, .n = 48, .k = 80, .packed = true}}) {
        s.transb = tb, s.beta = 1.0f, s.epilogue = e, s.separate_c_in = true;
        expect_cuda_matches_host<TypeParam>(handle, s, seed + s.m);
        s.alpha = 0.5f, s.beta = -0.75f;
        expect_cuda_matches_host<TypeParam>(handle, s, seed + s.m + 1);
      }
    }
  }
}

// The dGELU epilogues in the layout the MLP's down layer uses (no transposes: dPre = dy Wd), at
// odd sizes (pre_activation's leading dimension stays a multiple of 8) and a packed one.
TYPED_TEST(CudaGemm, GeluGradientEpiloguesMatchHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  GemmHandle handle;
  for (Epilogue e : {Epilogue::dgelu_tanh, Epilogue::dgelu_tanh_bias_grad}) {
    for (GemmCase s : {GemmCase{.m = 37, .n = 29, .k = 53}, GemmCase{.m = 5, .n = 3, .k = 7},
                       GemmCase{.m = 129, .n = 72, .k = 40, .packed = true}}) {
      s.epilogue = e;
      expect_cuda_matches_host<TypeParam>(handle, s, seed + s.n);
    }
  }
}

// Linear at GPT-2-like width, rows = 1024, in = 3072, out = 768, with the calls its layer makes:
// forward with bias and GELU keeping the pre-activation, the input gradient, and the weight
// gradient with its bias gradient, accumulated into an existing gradient (beta = 1).
TYPED_TEST(CudaGemm, LinearSizedProductsMatchHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  GemmHandle handle;
  const std::size_t rows = 1024, in = 3072, out = 768;
  expect_cuda_matches_host<TypeParam>(handle,
                                      {.transb = yes,
                                       .m = rows,
                                       .n = out,
                                       .k = in,
                                       .epilogue = Epilogue::bias_gelu_tanh,
                                       .keep_pre_activation = true,
                                       .packed = true},
                                      seed);
  expect_cuda_matches_host<TypeParam>(handle, {.m = rows, .n = in, .k = out, .packed = true}, seed + 1);
  expect_cuda_matches_host<TypeParam>(
      handle,
      {.transa = yes, .m = out, .n = in, .k = rows, .beta = 1.0f, .epilogue = Epilogue::bias_grad, .packed = true},
      seed + 2);
}

// The fused MLP block's products at the residual MLP's shape (rows 2048 here, d = 1024, hidden
// 4096): up with bias, GELU and the pre-activation kept; down with bias and the residual added
// through c_in; the down layer's input gradient through dGELU with the up layer's bias gradient.
TYPED_TEST(CudaGemm, FusedMlpProductsMatchHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  GemmHandle handle;
  const std::size_t rows = 2048, d = 1024, hidden = 4096;
  expect_cuda_matches_host<TypeParam>(handle,
                                      {.transb = yes,
                                       .m = rows,
                                       .n = hidden,
                                       .k = d,
                                       .epilogue = Epilogue::bias_gelu_tanh,
                                       .keep_pre_activation = true,
                                       .packed = true},
                                      seed);
  expect_cuda_matches_host<TypeParam>(handle,
                                      {.transb = yes,
                                       .m = rows,
                                       .n = d,
                                       .k = hidden,
                                       .beta = 1.0f,
                                       .epilogue = Epilogue::bias,
                                       .packed = true,
                                       .separate_c_in = true},
                                      seed + 1);
  expect_cuda_matches_host<TypeParam>(
      handle, {.m = rows, .n = hidden, .k = d, .epilogue = Epilogue::dgelu_tanh_bias_grad, .packed = true}, seed + 2);
}

// Two micro-batches' weight gradients added into one gradient, dW += dY1^T X1 then
// dW += dY2^T X2, on both backends.
TYPED_TEST(CudaGemm, BetaOneAccumulatesSuccessiveProducts) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using T = storage_t<TypeParam>;
  std::mt19937_64 rng(seed);
  const std::size_t rows = 96, in = 40, out = 56;
  const auto dy = random_values<T>(2 * rows * out, rng), x = random_values<T>(2 * rows * in, rng);
  const auto dw0 = random_values<T>(out * in, rng);
  auto dw = dw0;
  Buffer<T, Cuda> d_dy(dy.size()), d_x(x.size()), d_dw(dw.size());
  alloy::copy_from_host(d_dy, std::span<const T>(dy));
  alloy::copy_from_host(d_x, std::span<const T>(x));
  alloy::copy_from_host(d_dw, std::span<const T>(dw));
  GemmHandle handle;
  for (std::size_t batch = 0; batch < 2; ++batch) {
    const auto args = [&](const T* dy_, const T* x_, T* dw_) {
      return GemmArgs<TypeParam>{.transa = yes,
                                 .m = out,
                                 .n = in,
                                 .k = rows,
                                 .a = dy_ + batch * rows * out,
                                 .lda = out,
                                 .b = x_ + batch * rows * in,
                                 .ldb = in,
                                 .c = dw_,
                                 .ldc = in,
                                 .beta = 1.0f};
    };
    alloy::gemm(Host{}, args(dy.data(), x.data(), dw.data()));
    alloy::gemm(Cuda{}, handle, args(d_dy.data(), d_x.data(), d_dw.data()));
  }
  expect_close("dW", alloy::to_host(d_dw), dw, dw0, out, in, in, tolerance<TypeParam>());
}

TYPED_TEST(CudaGemm, RepeatedCallsReuseOneCachedPlan) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  GemmHandle handle;
  EXPECT_EQ(handle.cached_plans(), 0u);
  const GemmCase s{.transb = yes, .m = 37, .n = 29, .k = 53, .epilogue = Epilogue::bias};
  GemmOperands<TypeParam> x(s, rng);
  DeviceOperands<TypeParam> device(x, Cuda{});
  for (int call = 0; call < 5; ++call) {
    x = GemmOperands<TypeParam>(s, rng);  // fresh values in the same buffers
    device.upload(x);
    expect_cuda_matches_host(handle, x, device);
    EXPECT_EQ(handle.cached_plans(), 1u) << "call " << call;
  }
  GemmCase other = s;
  other.epilogue = Epilogue::none;
  GemmOperands<TypeParam> y(other, rng);
  DeviceOperands<TypeParam> device_y(y, Cuda{});
  expect_cuda_matches_host(handle, y, device_y);
  EXPECT_EQ(handle.cached_plans(), 2u) << "another epilogue is another plan";
  expect_cuda_matches_host(handle, x, device);
  EXPECT_EQ(handle.cached_plans(), 2u);
}

// GemmTuning::timed runs each candidate several times on the problem's first call, into the
// call's own outputs: every output must still be the one product's (c, the kept pre-activation,
// the bias gradient), c_in left as it was, and a product that adds to its own output (beta != 0,
// c_in == c) added once, never timed. Each case is a problem of its own (m differs: a plan is
// kept per shape, epilogue and alignment, so a later call of the same shape would reuse the
// first call's plan untimed), at sizes at which cuBLASLt offers several algorithms.
TYPED_TEST(CudaGemm, TimedTuningMatchesHostAndAddsOnce) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  GemmHandle handle(Cuda{}, GemmHandle::default_workspace_bytes, alloy::GemmTuning::timed);
  EXPECT_EQ(handle.tuning(), alloy::GemmTuning::timed);
  std::size_t problems = 0, adding_to_output = 0;
  const auto run = [&](GemmCase s) {
    s.m = 257 + problems, s.n = 192, s.k = 136;
    expect_cuda_matches_host<TypeParam>(handle, s, seed + problems);
    ++problems;
    if (s.beta != 0.0f && !s.separate_c_in) ++adding_to_output;
  };
  for (Epilogue e : {Epilogue::none, Epilogue::bias, Epilogue::bias_gelu_tanh, Epilogue::dgelu_tanh}) {
    for (float beta : {0.0f, 1.0f}) {
      for (bool separate : {false, true}) {
        if (beta != 0.0f && alloy::detail::applies_gelu_gradient(e)) continue;  // refused: needs beta = 0
        if (separate && beta == 0.0f) continue;
        run({.beta = beta,
             .epilogue = e,
             .keep_pre_activation = alloy::detail::applies_gelu(e),
             .separate_c_in = separate});
      }
    }
  }
  run({.transa = yes, .epilogue = Epilogue::bias_grad});
  EXPECT_EQ(handle.cached_plans(), problems);
  EXPECT_GE(handle.timed_plans(), 1u) << "no product was timed: cuBLASLt offered one algorithm for each";
  EXPECT_LE(handle.timed_plans(), problems - adding_to_output)
      << "the products that add to their own output must not be timed";
  const std::size_t timed = handle.timed_plans();
  problems -= 1;  // the bias-gradient problem again: its plan, not timed again
  run({.transa = yes, .epilogue = Epilogue::bias_grad});
  EXPECT_EQ(handle.cached_plans(), problems);
  EXPECT_EQ(handle.timed_plans(), timed);
}

// GemmTuning::timed chooses among the candidates that compute what the heuristic's first choice
// computes, so every output has the heuristic's bits whichever wins; timed_any may choose another
// order of the sums (a split K), and stays close to the Host. Shapes at which cuBLASLt offers
// several algorithms, odd sizes, every kind of epilogue and a separate c_in.
TYPED_TEST(CudaGemm, TimedTuningGivesTheHeuristicsBits) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using T = storage_t<TypeParam>;
  const GemmCase shapes[] = {
      {.m = 2053, .n = 1536, .k = 520},
      {.m = 1031, .n = 2304, .k = 768, .epilogue = Epilogue::bias},
      {.m = 1543, .n = 1024, .k = 392, .beta = 1.0f, .epilogue = Epilogue::bias, .separate_c_in = true},
      {.m = 1029, .n = 3072, .k = 776, .epilogue = Epilogue::bias_gelu_tanh, .keep_pre_activation = true},
      {.m = 1029, .n = 3072, .k = 768, .epilogue = Epilogue::dgelu_tanh},
      {.transa = yes, .m = 2304, .n = 768, .k = 4099},
      {.transa = yes, .m = 777, .n = 520, .k = 6151, .epilogue = Epilogue::bias_grad}};
  GemmHandle heuristic(Cuda{});
  GemmHandle timed(Cuda{}, GemmHandle::default_workspace_bytes, alloy::GemmTuning::timed);
  GemmHandle any(Cuda{}, GemmHandle::default_workspace_bytes, alloy::GemmTuning::timed_any);
  for (const GemmCase& s : shapes) {
    SCOPED_TRACE(describe(s));
    std::mt19937_64 rng(seed + s.m + s.k);
    GemmOperands<TypeParam> x(s, rng);
    // Every output, as handle h computes it from x.
    const auto outputs = [&](GemmHandle& h) {
      DeviceOperands<TypeParam> d(x, Cuda{});
      alloy::gemm(Cuda{}, h, d.args(x));
      return std::array<std::vector<T>, 4>{alloy::to_host(d.c), alloy::to_host(d.pre_activation),
                                           alloy::to_host(d.bias_grad), alloy::to_host(d.c_in)};
    };
    const auto want = outputs(heuristic);
    const auto got = outputs(timed);
    for (std::size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got[i].size(), want[i].size());
      std::size_t differ = 0;
      for (std::size_t e = 0; e < want[i].size(); ++e) differ += bits_of(got[i][e]) != bits_of(want[i][e]);
      EXPECT_EQ(differ, 0u) << "output " << i << " (c, pre_activation, bias_grad, c_in): elements whose bits differ";
    }
    expect_cuda_matches_host<TypeParam>(any, s, seed + s.m + s.k);
  }
  EXPECT_GE(timed.timed_plans(), 1u) << "no problem was timed: cuBLASLt offered one algorithm for each";
  EXPECT_EQ(timed.timed_plans(), any.timed_plans());
  std::printf(
      "timed: %zu of %zu problems chose another candidate than the heuristic's first, %zu candidates passed "
      "over for another order; timed_any: %zu chose another\n",
      timed.retuned_plans(), timed.timed_plans(), timed.other_order_candidates(), any.retuned_plans());
}

// GemmTuning::timed with a plans file: the first handle times each problem and writes its choice;
// a second handle reading the file runs those algorithms untimed, with the same bits; a file
// recorded under another identity is not used and is replaced; a file that does not parse, a
// directory that does not exist, and a file without timed tuning are refused at construction.
TYPED_TEST(CudaGemm, TimedPlansKeptInAFileAreReusedBitForBit) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using T = storage_t<TypeParam>;
  const TempDir dir("alloy_gemm_plans");
  const std::string file = (dir / "plans.txt").string();
  const GemmCase shapes[] = {{.m = 1031, .n = 768, .k = 520},
                             {.m = 2047, .n = 1024, .k = 264, .epilogue = Epilogue::bias},
                             {.transa = yes, .m = 768, .n = 512, .k = 4100, .epilogue = Epilogue::bias_grad}};
  std::vector<GemmOperands<TypeParam>> inputs;
  for (const GemmCase& s : shapes) {
    std::mt19937_64 rng(seed + s.m);
    inputs.emplace_back(s, rng);
  }
  // Every output of each problem, as handle h computes it.
  const auto outputs = [&](GemmHandle& h) {
    std::vector<std::vector<T>> out;
    for (auto& x : inputs) {
      DeviceOperands<TypeParam> d(x, Cuda{});
      alloy::gemm(Cuda{}, h, d.args(x));
      out.push_back(alloy::to_host(d.c));
      out.push_back(alloy::to_host(d.bias_grad));
    }
    return out;
  };
  const auto timed = [&] {
    return GemmHandle(Cuda{}, GemmHandle::default_workspace_bytes, alloy::GemmTuning::timed, file);
  };
  const auto recorded = [&] {
    const auto bytes = read_all(file);
    return alloy::detail::parse_gemm_plans(std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size()),
                                           file);
  };

  GemmHandle first = timed();
  EXPECT_FALSE(first.plans_file_foreign());
  EXPECT_FALSE(std::filesystem::exists(file)) << "written before anything was timed";
  const auto first_out = outputs(first);
  EXPECT_EQ(first.loaded_plans(), 0u);
  const auto kept = recorded();
  EXPECT_EQ(kept.identity, first.identity());
  EXPECT_EQ(kept.plans.size(), std::size(shapes)) << "one plan per problem";

  GemmHandle second = timed();
  const auto second_out = outputs(second);
  EXPECT_EQ(second.loaded_plans(), std::size(shapes));
  EXPECT_EQ(second.timed_plans(), 0u) << "a problem in the file was timed again";
  ASSERT_EQ(second_out.size(), first_out.size());
  for (std::size_t i = 0; i < first_out.size(); ++i) {
    ASSERT_EQ(second_out[i].size(), first_out[i].size());
    for (std::size_t e = 0; e < first_out[i].size(); ++e) {
      ASSERT_EQ(bits_of(second_out[i][e]), bits_of(first_out[i][e])) << "output " << i << ", element " << e;
    }
  }
  for (std::size_t i = 0; i < inputs.size(); ++i) {  // and the loaded plans compute the products
    DeviceOperands<TypeParam> d(inputs[i], Cuda{});
    expect_cuda_matches_host(second, inputs[i], d);
  }

  // Recorded elsewhere: not used, then replaced by this run's plans.
  auto foreign = kept;
  foreign.identity = "another device";
  {
    const std::string text = alloy::detail::format_gemm_plans(foreign);
    std::FILE* f = std::fopen(file.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    std::fwrite(text.data(), 1, text.size(), f);
    std::fclose(f);
  }
  GemmHandle third = timed();
  EXPECT_TRUE(third.plans_file_foreign());
  (void)outputs(third);
  EXPECT_EQ(third.loaded_plans(), 0u);
  EXPECT_EQ(recorded().identity, third.identity());
  EXPECT_EQ(recorded().plans.size(), std::size(shapes));

  const auto refused = [&](auto make, const std::string& expected) {
    try {
      (void)make();
      ADD_FAILURE() << "accepted; expected an error with: " << expected;
    } catch (const alloy::error& e) {
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
    }
  };
  {
    std::FILE* f = std::fopen(file.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    std::fputs("alloy-gemm-plans 1\nidentity x\nplan 1 2\n", f);
    std::fclose(f);
  }
  refused(timed, "gemm plans file '" + file + "', line 3");
  refused([&] { return GemmHandle(Cuda{}, GemmHandle::default_workspace_bytes, alloy::GemmTuning::heuristic, file); },
          "needs GemmTuning::timed");
  refused(
      [&] {
        return GemmHandle(Cuda{}, GemmHandle::default_workspace_bytes, alloy::GemmTuning::timed,
                          (dir / "missing" / "plans.txt").string());
      },
      "no directory");
}

// Views into an arena or a workspace start on 16-byte boundaries, or on any element boundary
// for an odd-sized view: cuBLASLt must be told, or it assumes 256 bytes. Each alignment is its
// own plan, so a view at a lesser alignment never reuses an algorithm made for a greater one.
TYPED_TEST(CudaGemm, OperandsAlignedBelow256BytesMatchHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  using T = storage_t<TypeParam>;
  std::mt19937_64 rng(seed);
  const std::size_t m = 40, n = 24, k = 32;
  GemmHandle handle;
  std::set<std::array<std::uint32_t, 3>> alignments;
  for (std::size_t offset : {std::size_t(0), 16 / sizeof(T), std::size_t(1)}) {  // 256, 16 and sizeof(T) bytes
    SCOPED_TRACE("offset " + std::to_string(offset) + " elements");
    const auto a = random_values<T>(offset + m * k, rng), b = random_values<T>(offset + k * n, rng);
    std::vector<T> c(offset + m * n, poison<T>());
    Buffer<T, Cuda> d_a(a.size()), d_b(b.size()), d_c(c.size());
    alloy::copy_from_host(d_a, std::span<const T>(a));
    alloy::copy_from_host(d_b, std::span<const T>(b));
    alloy::copy_from_host(d_c, std::span<const T>(c));
    const auto args = [&](const T* a_, const T* b_, T* c_) {
      return GemmArgs<TypeParam>{
          .m = m, .n = n, .k = k, .a = a_ + offset, .lda = k, .b = b_ + offset, .ldb = n, .c = c_ + offset, .ldc = n};
    };
    auto expected = c;
    alloy::gemm(Host{}, args(a.data(), b.data(), expected.data()));
    const auto device_args = args(d_a.data(), d_b.data(), d_c.data());
    alignments.insert({alloy::detail::alignment_of(device_args.a), alloy::detail::alignment_of(device_args.b),
                       alloy::detail::alignment_of(device_args.c)});
    try {
      alloy::gemm(Cuda{}, handle, device_args);
    } catch (const alloy::cuda_error& e) {
      ADD_FAILURE() << e.what();
      continue;
    }
    const auto got = alloy::to_host(d_c);
    if (offset > 0) EXPECT_EQ(bits_of(got[offset - 1]), bits_of(poison<T>())) << "the element before C was written";
    const std::vector<T> got_c(got.begin() + offset, got.end()), want_c(expected.begin() + offset, expected.end());
    expect_close("C", got_c, want_c, want_c, m, n, n, tolerance<TypeParam>());
  }
  EXPECT_EQ(handle.cached_plans(), alignments.size()) << "one plan per alignment";
}

TEST(CudaGemmStreams, ProductsRunOnTheCallersStreamInCallOrder) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  cudaStream_t stream = nullptr;
  ALLOY_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    GemmHandle handle(Cuda{});
    const GemmCase s{.transb = yes, .m = 300, .n = 200, .k = 500, .epilogue = Epilogue::bias_gelu_tanh};
    expect_cuda_matches_host<bf16>(handle, s, seed, Cuda::on(stream));
    expect_cuda_matches_host<bf16>(handle, s, seed + 1, Cuda{});
    expect_cuda_matches_host<bf16>(handle, s, seed + 2, Cuda::on(stream));
    GemmHandle on_stream(Cuda::on(stream));
    expect_cuda_matches_host<float>(on_stream, s, seed + 3, Cuda::on(stream));
  }
  ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
  ALLOY_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST(CudaGemmArguments, BadArgumentsThrowBeforeReachingCublasLt) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  Buffer<bf16, Cuda> a(6 * 4), b(4 * 5), c(6 * 5), bias(5);
  // The one product that runs at the end reads these: initialized (compute-sanitizer's initcheck).
  for (auto* buf : {&a, &b, &bias}) {
    const std::vector<bf16> values(buf->size(), bf16(0.5f));
    alloy::copy_from_host(*buf, std::span<const bf16>(values));
  }
  GemmHandle handle;
  const GemmArgs<bf16> valid{
      .m = 6, .n = 5, .k = 4, .a = a.data(), .lda = 4, .b = b.data(), .ldb = 5, .c = c.data(), .ldc = 5};
  auto g = valid;
  g.lda = 3;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Cuda{}, handle, g); }),
                  "gemm<bf16>: lda = 3 is less than 4, the row length of a");
  g = valid;
  g.transb = yes;  // transposed, B is stored n x k: its rows have k = 4 elements
  g.ldb = 3;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Cuda{}, handle, g); }), "ldb = 3 is less than 4");
  g = valid;
  g.b = nullptr;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Cuda{}, handle, g); }), "gemm<bf16>: b is null");
  g = valid;
  g.epilogue = Epilogue::bias;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Cuda{}, handle, g); }), "Epilogue::bias needs bias");
  EXPECT_EQ(handle.cached_plans(), 0u) << "a rejected call reached cuBLASLt";

  g.bias = bias.data();
  EXPECT_NO_THROW(alloy::gemm(Cuda{}, handle, g)) << "the handle stays usable after a rejected call";
  alloy::synchronize(Cuda{});
  EXPECT_EQ(handle.cached_plans(), 1u);
}

// cuBLASLt's GELU epilogue is the tanh approximation (what the Host reference and nn::Gelu
// compute), not the exact erf form: over x in [-4, 4] its outputs lie closer to gelu_tanh than to
// x * Phi(x). The two differ by up to 4e-4, about as much as a hardware tanh's error at one point,
// so the test compares root-mean-square distances over many points, not single values.
TEST(CudaGemmGelu, TheEpilogueIsTheTanhApproximation) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  const std::size_t n = 4001;
  std::vector<float> x(n);
  for (std::size_t j = 0; j < n; ++j) x[j] = -4.0f + 8.0f * static_cast<float>(j) / static_cast<float>(n - 1);
  const float one = 1.0f;
  Buffer<float, Cuda> d_a(1), d_x(n), d_c(n);
  alloy::copy_from_host(d_a, std::span<const float>(&one, 1));
  alloy::copy_from_host(d_x, std::span<const float>(x));
  GemmHandle handle;
  alloy::gemm(Cuda{}, handle,
              GemmArgs<float>{.m = 1,
                              .n = n,
                              .k = 1,
                              .a = d_a.data(),
                              .lda = 1,
                              .b = d_x.data(),
                              .ldb = n,
                              .c = d_c.data(),
                              .ldc = n,
                              .epilogue = Epilogue::gelu_tanh});
  const auto c = alloy::to_host(d_c);
  double to_tanh = 0, to_erf = 0;
  for (std::size_t j = 0; j < n; ++j) {
    const double v = x[j];
    const double tanh_form = 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / std::acos(-1.0)) * (v + 0.044715 * v * v * v)));
    const double erf_form = 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    to_tanh += std::pow(c[j] - tanh_form, 2);
    to_erf += std::pow(c[j] - erf_form, 2);
  }
  to_tanh = std::sqrt(to_tanh / n), to_erf = std::sqrt(to_erf / n);
  std::printf("cuBLASLt GELU: rms distance to the tanh form %.3g, to the erf form %.3g\n", to_tanh, to_erf);
  EXPECT_LT(to_tanh, to_erf);
  EXPECT_LT(to_tanh, 5e-4);  // a hardware tanh moves gelu by up to 2^-11 * |x| / 2 at a point
}

// gelu_tanh and its backward on the device within the bound activations.hpp states.
struct GeluBothWays {
  __host__ __device__ void operator()(const float& x, float& y, float& dx) const {
    y = alloy::gelu_tanh(x);
    dx = alloy::gelu_tanh_backward(x, 1.0f);
  }
};

TEST(CudaGeluTanh, MatchesHostWithinTheStatedBound) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> wide(0.0f, 4.0f);
  std::vector<float> x;
  for (int i = -1600; i <= 1600; ++i) x.push_back(i / 128.0f);
  for (int i = 0; i < 100000; ++i) x.push_back(wide(rng));
  const float inf = std::numeric_limits<float>::infinity();
  for (float v : {0.0f, -0.0f, 1e-30f, -1e-30f, 1e20f, -1e20f, inf, -inf, std::nanf("")}) x.push_back(v);

  const std::size_t n = x.size();
  std::vector<float> y(n), dx(n);
  alloy::for_each_n(Host{}, n, GeluBothWays{}, alloy::in(x.data()), alloy::out(y.data()), alloy::out(dx.data()));
  Buffer<float, Cuda> d_x(n), d_y(n), d_dx(n);
  alloy::copy_from_host(d_x, std::span<const float>(x));
  alloy::for_each_n(Cuda{}, n, GeluBothWays{}, alloy::in(d_x.data()), alloy::out(d_y.data()), alloy::out(d_dx.data()));
  const auto gy = alloy::to_host(d_y), gdx = alloy::to_host(d_dx);
  for (std::size_t i = 0; i < n; ++i) {
    const double v = x[i];
    if (std::isnan(y[i]) || std::isinf(y[i])) {
      EXPECT_EQ(alloy::detail::float_bits(gy[i]) & 0x7f800000u, 0x7f800000u) << "x = " << v;
      EXPECT_EQ(std::isnan(gy[i]), std::isnan(y[i])) << "x = " << v;
    } else {
      EXPECT_NEAR(gy[i], y[i], std::ldexp(std::fabs(v), -21)) << "gelu_tanh, x = " << v;
    }
    if (std::isnan(dx[i])) {
      EXPECT_TRUE(std::isnan(gdx[i])) << "x = " << v;
    } else {
      EXPECT_NEAR(gdx[i], dx[i], std::ldexp(1.0 + std::fabs(v) * (1.0 + 0.14 * v * v), -21))
          << "gelu_tanh_backward, x = " << v;
    }
  }
}

}  // namespace
