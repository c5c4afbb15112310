// The Host matrix product against a float64 reference on fresh random inputs, its argument
// checks, and the GELU functions it applies.
#include "../support/gemm_operands.hpp"
#include "../support/test_support.hpp"
#include "../support/values.hpp"

#include <alloy/kernels/activations.hpp>
#include <alloy/kernels/gemm.hpp>

#include <gtest/gtest.h>

#include <cfenv>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using alloy::bf16;
using alloy::Epilogue;
using alloy::fp16;
using alloy::GemmArgs;
using alloy::Host;
using alloy::storage_t;
using alloy::tf32;
using alloy::Transpose;
using namespace alloy::test;

constexpr Transpose no = Transpose::no;
constexpr Transpose yes = Transpose::yes;

// Half a unit in the last place of T's output, relative: the rounding of each result.
template <class T>
double output_rounding() {
  return std::ldexp(1.0, -(alloy::numeric_traits<T>::mantissa_bits + 1));
}

// tf32 rounding computed another way than the library's bit trick: 11 significant bits, ties to
// even through nearbyint (normal floats only, which is all the tests draw).
float tf32_reference(float x) {
  if (!std::isfinite(x) || x == 0.0f) return x;
  int exponent = 0;
  const double fraction = std::frexp(static_cast<double>(x), &exponent);  // [0.5, 1)
  return static_cast<float>(std::ldexp(std::nearbyint(fraction * 2048.0) / 2048.0, exponent));
}

template <class Compute>
double multiplier_input(storage_t<Compute> x) {
  const float f = alloy::to_float(x);
  return std::is_same_v<Compute, tf32> ? tf32_reference(f) : f;
}

double gelu_tanh_exact(double x) {
  const double u = std::sqrt(2.0 / std::acos(-1.0)) * (x + 0.044715 * x * x * x);
  return 0.5 * x * (1.0 + std::tanh(u));
}

double gelu_tanh_derivative_exact(double x) {
  const double c = std::sqrt(2.0 / std::acos(-1.0));
  const double t = std::tanh(c * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x);
}

// Element (i, p) of op(A) and (p, j) of op(B) as the multiplier sees them.
template <class Compute>
double op_a(const GemmOperands<Compute>& x, std::size_t i, std::size_t p) {
  return multiplier_input<Compute>(x.shape.transa == yes ? x.a[p * x.lda + i] : x.a[i * x.lda + p]);
}
template <class Compute>
double op_b(const GemmOperands<Compute>& x, std::size_t p, std::size_t j) {
  return multiplier_input<Compute>(x.shape.transb == yes ? x.b[j * x.ldb + p] : x.b[p * x.ldb + j]);
}
// A's stored value, unrounded: what the bias gradient sums.
template <class Compute>
double raw_a(const GemmOperands<Compute>& x, std::size_t i, std::size_t p) {
  return alloy::to_float(x.shape.transa == yes ? x.a[p * x.lda + i] : x.a[i * x.lda + p]);
}

// Runs the Host product and checks every output against float64 arithmetic on the same
// stored inputs. Bounds: fp32 summation of k exact products (each multiplier input has at most
// 11 significant bits, except plain fp32, whose products round once), the epilogue's few fp32
// roundings, GELU's float tanh, then one rounding to the output dtype.
template <class Compute>
void expect_host_matches_float64(const GemmCase& s, std::uint64_t seed) {
  using T = storage_t<Compute>;
  SCOPED_TRACE(describe(s));
  std::mt19937_64 rng(seed);
  GemmOperands<Compute> x(s, rng);
  const auto c_before = s.separate_c_in ? x.c_in : x.c;
  const auto pre_before = x.pre_activation;
  alloy::gemm(Host{}, x.args());

  const double out_unit = output_rounding<T>();
  const double subnormal_floor = std::is_same_v<T, fp16> ? std::ldexp(1.0, -25) : 0.0;
  BoundCheck c_check("C"), pre_check("pre_activation"), bias_grad_check("bias_grad");
  // The dGELU bias gradient: column sums of the float64 C values and of their error bounds.
  std::vector<double> column_sum(s.n, 0.0), column_error(s.n, 0.0), column_magnitude(s.n, 0.0);
  for (std::size_t i = 0; i < s.m; ++i) {
    for (std::size_t j = 0; j < s.n; ++j) {
      double sum = 0, magnitude = 0;
      for (std::size_t p = 0; p < s.k; ++p) {
        sum += op_a(x, i, p) * op_b(x, p, j);
        magnitude += std::fabs(op_a(x, i, p) * op_b(x, p, j));
      }
      double v = s.alpha * sum;
      double v_magnitude = std::fabs(s.alpha) * magnitude;
      if (s.beta != 0.0f) {
        v += s.beta * alloy::to_float(c_before[i * x.ldc + j]);
        v_magnitude += std::fabs(s.beta * alloy::to_float(c_before[i * x.ldc + j]));
      }
      if (alloy::detail::adds_bias(s.epilogue)) {
        v += alloy::to_float(x.bias[j]);
        v_magnitude += std::fabs(alloy::to_float(x.bias[j]));
      }
      const double v_error = double(s.k + 4) * fp32_unit * v_magnitude;
      double expected = v, error = v_error;
      if (alloy::detail::applies_gelu(s.epilogue)) {
        if (s.keep_pre_activation) {
          pre_check.expect(alloy::to_float(x.pre_activation[i * x.ldp + j]), v,
                           v_error + out_unit * (std::fabs(v) + v_error) + subnormal_floor, i, j);
        }
        expected = gelu_tanh_exact(v);
        error = 1.13 * v_error + std::ldexp(std::fabs(v), -20);  // |gelu'| <= 1.13; float tanh
      }
      if (s.reads_pre_activation()) {
        const double pre = alloy::to_float(x.pre_activation[i * x.ldp + j]);
        expected = v * gelu_tanh_derivative_exact(pre);
        // |gelu'| <= 1.13, and the float derivative's bound (GeluTanhBackward's test).
        error = 1.13 * v_error + std::fabs(v) * std::ldexp(1.0 + std::fabs(pre) * (1.0 + 0.14 * pre * pre), -20);
        column_sum[j] += expected;
        column_error[j] += error;
        column_magnitude[j] += std::fabs(expected);
      }
      c_check.expect(alloy::to_float(x.c[i * x.ldc + j]), expected,
                     error + out_unit * (std::fabs(expected) + error) + subnormal_floor, i, j);
    }
  }
  if (s.epilogue == Epilogue::dgelu_tanh_bias_grad) {
    for (std::size_t j = 0; j < s.n; ++j) {
      const double error = column_error[j] + double(s.m + 1) * fp32_unit * column_magnitude[j];
      bias_grad_check.expect(alloy::to_float(x.bias_grad[j]), column_sum[j],
                             error + out_unit * (std::fabs(column_sum[j]) + error) + subnormal_floor, 0, j);
    }
  }
  if (s.epilogue == Epilogue::bias_grad) {
    for (std::size_t i = 0; i < s.m; ++i) {
      double sum = 0, magnitude = 0;
      for (std::size_t p = 0; p < s.k; ++p) sum += raw_a(x, i, p), magnitude += std::fabs(raw_a(x, i, p));
      const double error = double(s.k + 1) * fp32_unit * magnitude;
      bias_grad_check.expect(alloy::to_float(x.bias_grad[i]), sum,
                             error + out_unit * (std::fabs(sum) + error) + subnormal_floor, i, 0);
    }
  }

  // Nothing outside the m x n block (or the bias-gradient elements) was touched, and inputs
  // (c_in, a pre_activation the epilogue reads) were not written.
  for (std::size_t i = 0; i < s.m; ++i) {
    for (std::size_t j = s.n; j < x.ldc; ++j) ASSERT_EQ(bits_of(x.c[i * x.ldc + j]), bits_of(poison<T>()));
    for (std::size_t j = s.keep_pre_activation ? s.n : 0; j < x.ldp; ++j) {
      ASSERT_EQ(bits_of(x.pre_activation[i * x.ldp + j]), bits_of(pre_before[i * x.ldp + j]))
          << "pre_activation (" << i << ", " << j << ")";
    }
    if (s.separate_c_in) {
      for (std::size_t j = 0; j < x.ldc; ++j) {
        ASSERT_EQ(bits_of(x.c_in[i * x.ldc + j]), bits_of(c_before[i * x.ldc + j])) << "c_in written";
      }
    }
  }
  if (!alloy::detail::writes_bias_grad(s.epilogue)) {
    ASSERT_EQ(bits_of(x.bias_grad[0]), bits_of(poison<T>())) << "bias_grad written by " << describe(s);
  }
  ASSERT_EQ(bits_of(x.bias_grad[s.bias_grad_length()]), bits_of(poison<T>())) << "bias_grad written past its end";
}

struct Size {
  std::size_t m, n, k;
};
// Odd sizes, the degenerate 1 x 1 x 1, and one that crosses the Host loop's k and n blocks.
constexpr Size sizes[] = {{37, 29, 53}, {1, 1, 1}, {2, 600, 300}};

template <class Compute>
class HostGemm : public ::testing::Test {};

using Computes = ::testing::Types<bf16, fp16, float, tf32>;
TYPED_TEST_SUITE(HostGemm, Computes, DtypeName);

TYPED_TEST(HostGemm, MatchesFloat64ForEveryTransposeAlphaAndBeta) {
  const std::pair<float, float> scalings[] = {{1.0f, 0.0f}, {1.0f, 1.0f}, {0.75f, 1.0f}, {-2.0f, 0.5f}};
  ALLOY_SEEDED(seed);
  for (const Size& size : sizes) {
    for (Transpose ta : {no, yes}) {
      for (Transpose tb : {no, yes}) {
        for (auto [alpha, beta] : scalings) {
          expect_host_matches_float64<TypeParam>(
              {.transa = ta, .transb = tb, .m = size.m, .n = size.n, .k = size.k, .alpha = alpha, .beta = beta},
              seed + size.n);
        }
      }
    }
  }
}

TYPED_TEST(HostGemm, EveryEpilogueMatchesFloat64) {
  ALLOY_SEEDED(seed);
  for (Epilogue e : every_epilogue) {
    for (bool keep : {false, true}) {
      if (keep && !alloy::detail::applies_gelu(e)) continue;
      for (Transpose ta : {no, yes}) {
        if (e == Epilogue::bias_grad && ta == no) continue;  // refused by the argument check
        for (Transpose tb : {no, yes}) {
          for (float beta : {0.0f, 1.0f}) {
            if (beta != 0.0f && alloy::detail::applies_gelu_gradient(e)) continue;  // refused: needs beta = 0
            expect_host_matches_float64<TypeParam>({.transa = ta,
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

// beta scales c_in, a matrix apart from C: the residual add of y = x + (h W^T + b), in one product.
TYPED_TEST(HostGemm, SeparateCInMatchesFloat64AndIsLeftAsItWas) {
  ALLOY_SEEDED(seed);
  for (Epilogue e : {Epilogue::none, Epilogue::bias, Epilogue::bias_gelu_tanh}) {
    for (Transpose tb : {no, yes}) {
      for (float alpha : {1.0f, -0.5f}) {
        for (float beta : {1.0f, 0.75f}) {
          expect_host_matches_float64<TypeParam>({.transb = tb,
                                                  .m = 37,
                                                  .n = 29,
                                                  .k = 53,
                                                  .alpha = alpha,
                                                  .beta = beta,
                                                  .epilogue = e,
                                                  .separate_c_in = true},
                                                 seed);
        }
      }
    }
  }
}

// c_in may be c itself: every element is read before it is written, as with c_in left null.
TYPED_TEST(HostGemm, CInEqualToCIsTheInPlaceProduct) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  GemmOperands<TypeParam> x({.transb = yes, .m = 21, .n = 19, .k = 17, .beta = 1.0f, .epilogue = Epilogue::bias}, rng);
  auto in_place = x;
  alloy::gemm(Host{}, x.args());
  auto g = in_place.args();
  g.c_in = g.c;
  alloy::gemm(Host{}, g);
  for (std::size_t e = 0; e < x.c.size(); ++e) ASSERT_EQ(bits_of(in_place.c[e]), bits_of(x.c[e])) << "element " << e;
}

// With c_in, C is only written: NaN there (a fresh workspace buffer) changes nothing.
TYPED_TEST(HostGemm, WithCInTheOutputIsNeverRead) {
  using T = storage_t<TypeParam>;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  GemmOperands<TypeParam> x({.m = 5, .n = 7, .k = 3, .beta = 1.0f, .separate_c_in = true}, rng);
  x.c.assign(x.c.size(), alloy::round_nearest<T>(std::numeric_limits<float>::quiet_NaN()));
  alloy::gemm(Host{}, x.args());
  for (std::size_t i = 0; i < 5; ++i) {
    for (std::size_t j = 0; j < 7; ++j) EXPECT_TRUE(std::isfinite(alloy::to_float(x.c[i * x.ldc + j])));
  }
}

TYPED_TEST(HostGemm, BetaZeroNeverReadsC) {
  using T = storage_t<TypeParam>;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  GemmOperands<TypeParam> x({.m = 5, .n = 7, .k = 3}, rng);
  x.c.assign(x.c.size(), alloy::round_nearest<T>(std::numeric_limits<float>::quiet_NaN()));
  alloy::gemm(Host{}, x.args());
  for (std::size_t i = 0; i < 5; ++i) {
    for (std::size_t j = 0; j < 7; ++j) EXPECT_TRUE(std::isfinite(alloy::to_float(x.c[i * x.ldc + j])));
  }
}

// Two micro-batches' weight gradients added into an existing gradient, as Linear's backward
// does across uses of one weight: dW += dY1^T X1, then dW += dY2^T X2.
TYPED_TEST(HostGemm, BetaOneAccumulatesSuccessiveProducts) {
  using T = storage_t<TypeParam>;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const std::size_t rows = 19, in = 11, out = 13;
  const auto dy1 = random_values<T>(rows * out, rng), dy2 = random_values<T>(rows * out, rng);
  const auto x1 = random_values<T>(rows * in, rng), x2 = random_values<T>(rows * in, rng);
  const auto dw0 = random_values<T>(out * in, rng);
  auto dw = dw0;
  for (const auto* batch : {&dy1, &dy2}) {
    const auto& x = batch == &dy1 ? x1 : x2;
    alloy::gemm(Host{}, GemmArgs<TypeParam>{.transa = yes,
                                            .m = out,
                                            .n = in,
                                            .k = rows,
                                            .a = batch->data(),
                                            .lda = out,
                                            .b = x.data(),
                                            .ldb = in,
                                            .c = dw.data(),
                                            .ldc = in,
                                            .beta = 1.0f});
  }
  double error = 0, norm = 0;
  for (std::size_t o = 0; o < out; ++o) {
    for (std::size_t i = 0; i < in; ++i) {
      double expected = alloy::to_float(dw0[o * in + i]);
      for (std::size_t r = 0; r < rows; ++r) {
        expected += multiplier_input<TypeParam>(dy1[r * out + o]) * multiplier_input<TypeParam>(x1[r * in + i]);
        expected += multiplier_input<TypeParam>(dy2[r * out + o]) * multiplier_input<TypeParam>(x2[r * in + i]);
      }
      error += std::pow(alloy::to_float(dw[o * in + i]) - expected, 2);
      norm += expected * expected;
    }
  }
  // Two roundings to T, plus fp32 sums: well inside 4 units of T's rounding.
  EXPECT_LT(std::sqrt(error / norm), 4 * output_rounding<T>() + 1e-6);
}

// The documented mapping of Linear onto gemm, checked against the layer's math written out:
// y = gelu(x W^T + b); given dPre: dx = dPre W, dW = dPre^T x, db = column sums of dPre.
TYPED_TEST(HostGemm, LinearForwardAndBackwardFollowTheDocumentedMapping) {
  using T = storage_t<TypeParam>;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const std::size_t rows = 23, in = 17, out = 21, ld_pre = 24;
  const auto x = random_values<T>(rows * in, rng);
  const auto w = random_values<T>(out * in, rng);
  const auto b = random_values<T>(out, rng);
  const auto d_pre = random_values<T>(rows * out, rng);
  std::vector<T> y(rows * out, poison<T>()), pre(rows * ld_pre, poison<T>());
  std::vector<T> dx(rows * in, poison<T>()), dw(out * in, poison<T>()), db(out, poison<T>());

  alloy::gemm(Host{}, GemmArgs<TypeParam>{.transb = yes,
                                          .m = rows,
                                          .n = out,
                                          .k = in,
                                          .a = x.data(),
                                          .lda = in,
                                          .b = w.data(),
                                          .ldb = in,
                                          .c = y.data(),
                                          .ldc = out,
                                          .epilogue = Epilogue::bias_gelu_tanh,
                                          .bias = b.data(),
                                          .pre_activation = pre.data(),
                                          .ld_pre_activation = ld_pre});
  alloy::gemm(Host{}, GemmArgs<TypeParam>{.m = rows,
                                          .n = in,
                                          .k = out,
                                          .a = d_pre.data(),
                                          .lda = out,
                                          .b = w.data(),
                                          .ldb = in,
                                          .c = dx.data(),
                                          .ldc = in});
  alloy::gemm(Host{}, GemmArgs<TypeParam>{.transa = yes,
                                          .m = out,
                                          .n = in,
                                          .k = rows,
                                          .a = d_pre.data(),
                                          .lda = out,
                                          .b = x.data(),
                                          .ldb = in,
                                          .c = dw.data(),
                                          .ldc = in,
                                          .epilogue = Epilogue::bias_grad,
                                          .bias_grad = db.data()});

  const auto in_ = [](T v) { return multiplier_input<TypeParam>(v); };
  const auto f = [](T v) { return double(alloy::to_float(v)); };
  const double tolerance = 4 * output_rounding<T>() + 1e-5;
  const auto relative = [](const std::function<double(std::size_t)>& got,
                           const std::function<double(std::size_t)>& want, std::size_t n) {
    double error = 0, norm = 0;
    for (std::size_t i = 0; i < n; ++i) error += std::pow(got(i) - want(i), 2), norm += want(i) * want(i);
    return std::sqrt(error / norm);
  };
  EXPECT_LT(relative([&](std::size_t e) { return f(y[e]); },
                     [&](std::size_t e) {
                       const std::size_t r = e / out, o = e % out;
                       double v = f(b[o]);
                       for (std::size_t i = 0; i < in; ++i) v += in_(x[r * in + i]) * in_(w[o * in + i]);
                       return gelu_tanh_exact(v);
                     },
                     rows * out),
            tolerance)
      << "y";
  EXPECT_LT(relative([&](std::size_t e) { return f(pre[(e / out) * ld_pre + e % out]); },
                     [&](std::size_t e) {
                       const std::size_t r = e / out, o = e % out;
                       double v = f(b[o]);
                       for (std::size_t i = 0; i < in; ++i) v += in_(x[r * in + i]) * in_(w[o * in + i]);
                       return v;
                     },
                     rows * out),
            tolerance)
      << "pre_activation";
  EXPECT_LT(relative([&](std::size_t e) { return f(dx[e]); },
                     [&](std::size_t e) {
                       const std::size_t r = e / in, i = e % in;
                       double v = 0;
                       for (std::size_t o = 0; o < out; ++o) v += in_(d_pre[r * out + o]) * in_(w[o * in + i]);
                       return v;
                     },
                     rows * in),
            tolerance)
      << "dx";
  EXPECT_LT(relative([&](std::size_t e) { return f(dw[e]); },
                     [&](std::size_t e) {
                       const std::size_t o = e / in, i = e % in;
                       double v = 0;
                       for (std::size_t r = 0; r < rows; ++r) v += in_(d_pre[r * out + o]) * in_(x[r * in + i]);
                       return v;
                     },
                     out * in),
            tolerance)
      << "dW";
  EXPECT_LT(relative([&](std::size_t o) { return f(db[o]); },
                     [&](std::size_t o) {
                       double v = 0;
                       for (std::size_t r = 0; r < rows; ++r) v += f(d_pre[r * out + o]);
                       return v;
                     },
                     out),
            tolerance)
      << "db";
}

// ---- tf32 ----

TEST(HostGemmTf32, RoundsEachMultiplierInputToNearestEven) {
  // Rows of A: above the halfway point (rounds up), exactly halfway with an even neighbour
  // below (rounds down), exactly halfway with an odd one below (rounds up).
  const std::vector<float> a = {1.0f + 0x1p-11f + 0x1p-13f, 1.0f + 0x1p-11f, 1.0f + 0x3p-11f};
  const std::vector<float> b = {1.0f + 0x1p-12f};  // below halfway: rounds to 1
  std::vector<float> c(3, poison<float>());
  alloy::gemm(Host{},
              GemmArgs<tf32>{
                  .m = 3, .n = 1, .k = 1, .a = a.data(), .lda = 1, .b = b.data(), .ldb = 1, .c = c.data(), .ldc = 1});
  EXPECT_EQ(c[0], 1.0f + 0x1p-10f);
  EXPECT_EQ(c[1], 1.0f);
  EXPECT_EQ(c[2], 1.0f + 0x1p-9f);

  alloy::gemm(Host{},
              GemmArgs<float>{
                  .m = 3, .n = 1, .k = 1, .a = a.data(), .lda = 1, .b = b.data(), .ldb = 1, .c = c.data(), .ldc = 1});
  EXPECT_EQ(c[0], a[0] * b[0]) << "fp32 compute must not round its inputs";
}

TEST(HostGemmTf32, BiasAndCAreNotRoundedToTf32) {
  const float a = 1.0f, b = 1.0f, bias = 0x1p-13f;
  float c = 0x1p-14f;
  alloy::gemm(Host{}, GemmArgs<tf32>{.m = 1,
                                     .n = 1,
                                     .k = 1,
                                     .a = &a,
                                     .lda = 1,
                                     .b = &b,
                                     .ldb = 1,
                                     .c = &c,
                                     .ldc = 1,
                                     .beta = 1.0f,
                                     .epilogue = Epilogue::bias,
                                     .bias = &bias});
  EXPECT_EQ(c, 1.0f + 0x1p-13f + 0x1p-14f);
}

TEST(RoundToTf32, AgreesWithAnIndependentRounding) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::uint32_t> bits(0, 0xffffffffu);
  ASSERT_EQ(std::fegetround(), FE_TONEAREST);
  for (int i = 0; i < 200000; ++i) {
    const float x = alloy::detail::float_from_bits(bits(rng));
    if (!std::isnormal(x) || std::fabs(x) > 3.0e38f) continue;
    ASSERT_EQ(alloy::detail::float_bits(alloy::detail::round_to_tf32(x)), alloy::detail::float_bits(tf32_reference(x)))
        << "x = " << x;
  }
  EXPECT_EQ(alloy::detail::round_to_tf32(std::numeric_limits<float>::max()), std::numeric_limits<float>::infinity());
  EXPECT_EQ(alloy::detail::round_to_tf32(-std::numeric_limits<float>::infinity()),
            -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(alloy::detail::round_to_tf32(std::numeric_limits<float>::quiet_NaN())));
}

// ---- argument checks: alloy::error naming what is wrong ----

struct Valid {
  std::vector<bf16> a = std::vector<bf16>(6 * 4), b = std::vector<bf16>(4 * 5), c = std::vector<bf16>(6 * 5);
  std::vector<bf16> bias = std::vector<bf16>(5), bias_grad = std::vector<bf16>(6), pre = std::vector<bf16>(6 * 8);
  GemmArgs<bf16> args() {
    return {.m = 6, .n = 5, .k = 4, .a = a.data(), .lda = 4, .b = b.data(), .ldb = 5, .c = c.data(), .ldc = 5};
  }
};

TEST(GemmArguments, AValidProductPasses) {
  Valid v;
  EXPECT_NO_THROW(alloy::gemm(Host{}, v.args()));
}

TEST(GemmArguments, ZeroSizesAreRejected) {
  Valid v;
  auto g = v.args();
  g.k = 0;
  const std::string message = message_of([&] { alloy::gemm(Host{}, g); });
  EXPECT_MENTIONS(message, "gemm<bf16>: m, n and k must be positive");
  EXPECT_MENTIONS(message, "k = 0");
}

TEST(GemmArguments, NullMatricesAreNamed) {
  Valid v;
  auto g = v.args();
  g.a = nullptr;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "a is null; it must point to 6 x 4 elements");
  g = v.args();
  g.b = nullptr;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "b is null");
  g = v.args();
  g.c = nullptr;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "c is null");
}

TEST(GemmArguments, LeadingDimensionsShorterThanARowAreRejected) {
  Valid v;
  auto g = v.args();
  g.lda = 3;
  const std::string message = message_of([&] { alloy::gemm(Host{}, g); });
  EXPECT_MENTIONS(message, "lda = 3 is less than 4, the row length of a (6 x 4, row-major, transa = no");
  // Transposed, A is stored k x m: its rows have m elements.
  g = v.args();
  g.transa = yes;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "lda = 4 is less than 6, the row length of a (4 x 6");
  g = v.args();
  g.ldb = 4;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "ldb = 4 is less than 5");
  g = v.args();
  g.ldc = 0;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "ldc = 0 is less than 5");
}

TEST(GemmArguments, AnOutputOverlappingAnInputIsRejected) {
  Valid v;
  auto g = v.args();
  std::vector<bf16> big(64);
  g.a = big.data();
  g.c = big.data() + 20;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "c overlaps a");
}

TEST(GemmArguments, EpilogueVectorsMustMatchTheEpilogue) {
  Valid v;
  auto g = v.args();
  g.epilogue = Epilogue::bias;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "Epilogue::bias needs bias, a vector of n = 5 elements");
  g = v.args();
  g.bias = v.bias.data();
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "bias is set but Epilogue::none does not add it");
  g = v.args();
  g.epilogue = Epilogue::bias_grad;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }),
                  "Epilogue::bias_grad needs bias_grad, a vector of m = 6 elements");
  g.bias_grad = v.bias_grad.data();
  g.alpha = 0.5f;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "Epilogue::bias_grad needs alpha = 1");
  g.alpha = 1.0f;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "Epilogue::bias_grad needs transa = yes");
  g = v.args();
  g.bias_grad = v.bias_grad.data();
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "bias_grad is set but Epilogue::none does not write it");
}

TEST(GemmArguments, CInNeedsBetaAndNoPartialOverlapWithC) {
  Valid v;
  std::vector<bf16> other(6 * 5);
  auto g = v.args();
  g.c_in = other.data();
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "c_in is set but beta = 0, so it would not be read");
  g.beta = 1.0f;
  EXPECT_NO_THROW(alloy::gemm(Host{}, g));
  g.c_in = g.c;
  EXPECT_NO_THROW(alloy::gemm(Host{}, g)) << "c_in may be c itself";
  std::vector<bf16> big(64);
  g.c = big.data();
  g.c_in = big.data() + 5;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "c_in overlaps c without being c");
}

TEST(GemmArguments, GeluGradientEpiloguesNeedTheirInputsBetaZeroAndAlphaOneForTheBiasGradient) {
  Valid v;
  auto g = v.args();
  g.epilogue = Epilogue::dgelu_tanh;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }),
                  "Epilogue::dgelu_tanh needs pre_activation, GELU's input (6 x 5");
  g.pre_activation = v.pre.data();
  g.ld_pre_activation = 8;
  EXPECT_NO_THROW(alloy::gemm(Host{}, g));
  g.beta = 1.0f;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "Epilogue::dgelu_tanh needs beta = 0");
  g.beta = 0.0f;
  g.ld_pre_activation = 6;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "ld_pre_activation = 6 must be at least n = 5");
  g.ld_pre_activation = 8;
  g.bias_grad = v.bias_grad.data();
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }),
                  "bias_grad is set but Epilogue::dgelu_tanh does not write it");
  g.epilogue = Epilogue::dgelu_tanh_bias_grad;
  EXPECT_NO_THROW(alloy::gemm(Host{}, g));
  g.bias_grad = nullptr;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }),
                  "Epilogue::dgelu_tanh_bias_grad needs bias_grad, a vector of n = 5 elements (one per column of C)");
  g.bias_grad = v.bias_grad.data();
  g.alpha = 2.0f;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "Epilogue::dgelu_tanh_bias_grad needs alpha = 1");
  g.alpha = 1.0f;
  g.bias = v.bias.data();
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }),
                  "bias is set but Epilogue::dgelu_tanh_bias_grad does not add it");
}

TEST(GemmArguments, PreActivationNeedsGeluAndALeadingDimensionMultipleOf8) {
  Valid v;
  auto g = v.args();
  g.pre_activation = v.pre.data();
  g.ld_pre_activation = 8;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }),
                  "pre_activation is set but Epilogue::none has no activation");
  g.epilogue = Epilogue::gelu_tanh;
  EXPECT_NO_THROW(alloy::gemm(Host{}, g));
  g.ld_pre_activation = 5;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }),
                  "ld_pre_activation = 5 must be at least n = 5 and a multiple of 8");
  g.ld_pre_activation = 0;
  EXPECT_MENTIONS(message_of([&] { alloy::gemm(Host{}, g); }), "ld_pre_activation = 0");
}

// ---- GELU ----

std::vector<double> gelu_points() {
  std::vector<double> xs;
  for (int i = -1200; i <= 1200; ++i) xs.push_back(i / 100.0);
  for (double x : {1e-30, -1e-30, 1e-6, -1e-6, 30.0, -30.0, 1e3, -1e3, 1e20, -1e20}) xs.push_back(x);
  return xs;
}

TEST(GeluTanh, MatchesTheFloat64Formula) {
  for (double xd : gelu_points()) {
    const float x = static_cast<float>(xd);
    const double expected = gelu_tanh_exact(x);
    EXPECT_NEAR(alloy::gelu_tanh(x), expected, std::ldexp(std::fabs(x), -20) + 1e-45) << "x = " << x;
  }
}

TEST(GeluTanh, KnownValuesAndEdges) {
  EXPECT_NEAR(alloy::gelu_tanh(1.0f), 0.8411920f, 1e-6f);  // torch.nn.functional.gelu(1, approximate='tanh')
  EXPECT_EQ(alloy::gelu_tanh(0.0f), 0.0f);
  EXPECT_EQ(alloy::gelu_tanh(1e20f), 1e20f);
  EXPECT_EQ(alloy::gelu_tanh(-1e20f), 0.0f);
  EXPECT_EQ(alloy::gelu_tanh(std::numeric_limits<float>::infinity()), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(alloy::gelu_tanh(-std::numeric_limits<float>::infinity())));
  EXPECT_TRUE(std::isnan(alloy::gelu_tanh(std::numeric_limits<float>::quiet_NaN())));
}

TEST(GeluTanhBackward, MatchesTheFloat64Derivative) {
  for (double xd : gelu_points()) {
    const float x = static_cast<float>(xd);
    const double expected = gelu_tanh_derivative_exact(x);
    const double bound = std::ldexp(1.0 + std::fabs(x) * (1.0 + 0.14 * double(x) * x), -20);
    EXPECT_NEAR(alloy::gelu_tanh_backward(x, 1.0f), expected, bound) << "x = " << x;
    EXPECT_NEAR(alloy::gelu_tanh_backward(x, -2.5f), -2.5 * expected, 2.5 * bound + 1e-30) << "x = " << x;
  }
}

TEST(GeluTanhBackward, TheFloat64DerivativeIsTheSlopeOfGelu) {
  for (double x = -8; x <= 8; x += 0.125) {
    const double h = 1e-5;
    const double slope = (gelu_tanh_exact(x + h) - gelu_tanh_exact(x - h)) / (2 * h);
    EXPECT_NEAR(gelu_tanh_derivative_exact(x), slope, 1e-8) << "x = " << x;
  }
}

TEST(GeluTanhBackward, IsFiniteForEveryNonNaNInput) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(alloy::gelu_tanh_backward(1e20f, 3.0f), 3.0f);
  EXPECT_EQ(alloy::gelu_tanh_backward(-1e20f, 3.0f), 0.0f);
  EXPECT_EQ(alloy::gelu_tanh_backward(inf, 3.0f), 3.0f);
  EXPECT_EQ(alloy::gelu_tanh_backward(-inf, 3.0f), 0.0f);
  EXPECT_TRUE(std::isnan(alloy::gelu_tanh_backward(std::numeric_limits<float>::quiet_NaN(), 1.0f)));
}

}  // namespace
