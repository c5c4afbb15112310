// LayerNorm and softmax cross-entropy on the Host backend against float64 references on fresh
// random inputs. Each output must lie within a bound derived from the fp32 operations that
// produce it (stated beside each check, with a factor 2 to spare) plus one rounding to the output
// dtype; gradients are checked against the analytic float64 gradient and against central finite
// differences of the float64 loss.
#include "../support/test_support.hpp"
#include "../support/values.hpp"

#include <alloy/kernels/layernorm.hpp>
#include <alloy/kernels/softmax_cross_entropy.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using alloy::bf16;
using alloy::fp16;
using alloy::Host;
using namespace alloy::test;

const double exp_error = 4 * fp32_unit;  // expf/logf: within 2 ulp on host and device

// Relative error of rounding a float result to T (0 for float: the fp32 bounds include it).
template <class T>
double out_unit() {
  return std::is_same_v<T, float> ? 0.0 : std::ldexp(1.0, -(alloy::numeric_traits<T>::mantissa_bits + 1));
}

// Absolute error allowed near zero: fp16's subnormal half-spacing; elsewhere far below any
// value the tests draw, for float subnormals met by underflowing probabilities.
template <class T>
double out_floor() {
  return std::is_same_v<T, fp16> ? std::ldexp(1.0, -25) : std::ldexp(1.0, -120);
}

// An output of dtype T: the fp32 error bound, then one rounding to T.
template <class T>
double rounded_bound(double expected, double fp32_error) {
  return fp32_error + out_unit<T>() * (std::fabs(expected) + fp32_error) + out_floor<T>();
}

template <class T>
class RowKernels : public ::testing::Test {};

using Dtypes = ::testing::Types<bf16, fp16, float>;
TYPED_TEST_SUITE(RowKernels, Dtypes, DtypeName);

// ---- LayerNorm ----

// Additions in sequence on the longest path of a row reduction over 32 lanes: a lane's share
// (up to cols / 32 elements, a vector's worth more for the head and tail), then 5 butterfly steps.
double lane_depth(std::size_t cols) { return double(cols) / 32 + 24; }

struct LayerNormInputs {
  std::size_t rows, cols;
  float eps = 1e-5f;
};

template <class T>
struct LayerNormCase {
  std::size_t rows, cols;
  float eps;
  std::vector<T> x, gamma, beta, dy;

  LayerNormCase(LayerNormInputs s, double offset, double spread, std::mt19937_64& rng)
      : rows(s.rows),
        cols(s.cols),
        eps(s.eps),
        x(normal<T>(s.rows * s.cols, offset, spread, rng)),
        gamma(normal<T>(s.cols, 1.0, 0.5, rng)),
        beta(normal<T>(s.cols, 0.0, 1.0, rng)),
        dy(normal<T>(s.rows * s.cols, 0.0, 1.0, rng)) {}

  double xv(std::size_t r, std::size_t c) const { return value(x[r * cols + c]); }
};

// float64 statistics of one row of stored inputs.
struct RowStats {
  double mean, var, rstd, abs_mean;
};

template <class T>
RowStats row_stats(const LayerNormCase<T>& k, std::size_t r) {
  double sum = 0, abs_sum = 0;
  for (std::size_t c = 0; c < k.cols; ++c) sum += k.xv(r, c), abs_sum += std::fabs(k.xv(r, c));
  const double mean = sum / double(k.cols);
  double squares = 0;
  for (std::size_t c = 0; c < k.cols; ++c) squares += (k.xv(r, c) - mean) * (k.xv(r, c) - mean);
  const double var = squares / double(k.cols);
  return {mean, var, 1.0 / std::sqrt(var + double(k.eps)), abs_sum / double(k.cols)};
}

template <class T>
std::string describe(const LayerNormCase<T>& k) {
  return std::string(alloy::numeric_traits<T>::name) + " rows=" + std::to_string(k.rows) +
         " cols=" + std::to_string(k.cols);
}

// The forward pass's outputs, with a poisoned element past each to catch overruns.
template <class T>
struct ForwardOutputs {
  std::vector<T> y;
  std::vector<float> mean, rstd;
};

template <class T>
ForwardOutputs<T> run_forward(const LayerNormCase<T>& k) {
  ForwardOutputs<T> o{std::vector<T>(k.rows * k.cols + 1, poison<T>()), std::vector<float>(k.rows + 1, poison<float>()),
                      std::vector<float>(k.rows + 1, poison<float>())};
  alloy::layernorm_forward(Host{}, k.x.data(), k.gamma.data(), k.beta.data(), o.y.data(), o.mean.data(), o.rstd.data(),
                           k.rows, k.cols, k.eps);
  EXPECT_EQ(bits_of(o.y.back()), bits_of(poison<T>())) << "y written past rows * cols";
  EXPECT_EQ(bits_of(o.mean.back()), bits_of(poison<float>())) << "mean written past rows";
  EXPECT_EQ(bits_of(o.rstd.back()), bits_of(poison<float>())) << "rstd written past rows";
  return o;
}

// Forward bounds. With d = lane_depth(cols), the sum of x is off by at most (d + 1) u sum|x|, so
// the mean by delta = (d + 2) u mean|x| (x2 spare). The variance is the mean of squared
// deviations from the computed mean: exactly var + (mean error)^2, computed within (d + 4) u;
// then eps, sqrt and 1/ add 2u, so rstd is within eps_r = (d + 9) u + delta^2 / (var + eps)
// (x2 spare on half the variance's error). xhat = (x - mean) rstd is then within
// rstd (delta + u (|x| + |mean|)) (1 + eps_r) + |xhat| (eps_r + u), and y = xhat gamma + beta
// within |gamma| e_xhat + 2u |xhat gamma| + u |beta|.
template <class T>
void expect_forward_matches_float64(LayerNormInputs s, double offset, double spread, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const LayerNormCase<T> k(s, offset, spread, rng);
  SCOPED_TRACE(describe(k) + " x ~ N(" + std::to_string(offset) + ", " + std::to_string(spread) + ")");
  const auto o = run_forward(k);
  const double d = lane_depth(k.cols), u = fp32_unit;
  BoundCheck mean_check("mean"), rstd_check("rstd"), y_check("y");
  for (std::size_t r = 0; r < k.rows; ++r) {
    const RowStats st = row_stats(k, r);
    const double delta = 2 * (d + 2) * u * st.abs_mean;
    const double eps_r = (d + 9) * u + delta * delta / (st.var + k.eps);
    mean_check.expect(o.mean[r], st.mean, delta, r, 0);
    rstd_check.expect(o.rstd[r], st.rstd, eps_r * st.rstd, r, 0);
    for (std::size_t c = 0; c < k.cols; ++c) {
      const double xhat = (k.xv(r, c) - st.mean) * st.rstd;
      const double gamma = value(k.gamma[c]), beta = value(k.beta[c]);
      const double e_xhat = st.rstd * (delta + u * (std::fabs(k.xv(r, c)) + std::fabs(st.mean))) * (1 + eps_r) +
                            std::fabs(xhat) * (eps_r + u);
      const double e_y = 2 * (std::fabs(gamma) * e_xhat + 2 * u * std::fabs(xhat * gamma) + u * std::fabs(beta));
      const double y = xhat * gamma + beta;
      y_check.expect(value(o.y[r * k.cols + c]), y, rounded_bound<T>(y, e_y), r, c);
    }
  }
}

struct Shape {
  std::size_t rows, cols;
};
// Odd widths (scalar rows), a width of whole vectors, one column, a wide row, tiny and large
// odd widths, and widths the Cuda kernels keep in registers (256 and 1024: 32 V vectors).
constexpr Shape layernorm_shapes[] = {{37, 29}, {37, 1000}, {37, 1},   {4, 4096}, {3, 771},
                                      {21, 3},  {3, 5000},  {70, 256}, {19, 1024}};

TYPED_TEST(RowKernels, LayerNormForwardMatchesFloat64) {
  ALLOY_SEEDED(seed);
  for (Shape s : layernorm_shapes) {
    expect_forward_matches_float64<TypeParam>({s.rows, s.cols}, 0.5, 2.0, seed + s.cols);
  }
  expect_forward_matches_float64<TypeParam>({37, 29, 1e-3f}, 0.0, 0.01, seed);  // eps comparable to the variance
}

// Two passes keep the variance accurate when the mean dwarfs the spread; E[x^2] - mean^2 would
// lose it to cancellation (for fp32, about (cols / 32) u 1000^2 against a variance of 16).
TYPED_TEST(RowKernels, LayerNormForwardStaysAccurateWhenTheMeanDwarfsTheSpread) {
  ALLOY_SEEDED(seed);
  for (std::size_t cols : {29u, 1000u}) expect_forward_matches_float64<TypeParam>({9, cols}, 1000.0, 4.0, seed + cols);
}

TYPED_TEST(RowKernels, LayerNormOfOneColumnIsBeta) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LayerNormCase<T> k({11, 1}, 3.0, 5.0, rng);
  const auto o = run_forward(k);
  for (std::size_t r = 0; r < k.rows; ++r) {
    EXPECT_EQ(bits_of(o.y[r]), bits_of(k.beta[0])) << "row " << r;
    EXPECT_EQ(o.mean[r], value(k.x[r])) << "row " << r;
    EXPECT_EQ(o.rstd[r], 1.0f / std::sqrt(k.eps)) << "row " << r;
  }
}

TYPED_TEST(RowKernels, LayerNormForwardWithoutStatisticsWritesTheSameY) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LayerNormCase<T> k({7, 45}, 0.0, 1.0, rng);
  const auto o = run_forward(k);
  std::vector<T> y(k.rows * k.cols);
  alloy::layernorm_forward(Host{}, k.x.data(), k.gamma.data(), k.beta.data(), y.data(), nullptr, nullptr, k.rows,
                           k.cols, k.eps);
  for (std::size_t i = 0; i < y.size(); ++i) ASSERT_EQ(bits_of(y[i]), bits_of(o.y[i])) << "element " << i;
}

// The float64 gradient of sum(dy * y) and the error bound of each kernel output, given the
// kernel's own mean and rstd (errors delta and eps_r, measured against float64). With
// g = dy gamma, A = mean(g), B = mean(g xhat), dx = rstd (g - A - xhat B):
//   e_xhat = rstd (delta + u (|x| + |mean|)) + |xhat| (eps_r + 2u)
//   e_A = (d + 2) u mean|g|,  e_B = mean(|g| e_xhat) + (d + 3) u mean|g xhat|
//   e_I = 3u |g| + e_A + |xhat| e_B + e_xhat |B| + u |A| + 3u |xhat B| + u |g - A|
//   e_dx = rstd e_I + |I| rstd (eps_r + u)                                      (x2 spare)
//   dgamma = sum over rows of dy xhat: sum |dy| (e_xhat + u |xhat|) + (rows + 16) u sum |dy xhat|
//   dbeta  = sum over rows of dy:      (rows + 16) u sum |dy|                   (x2 spare)
// (rows + 16 bounds the additions in sequence: a warp's rows, its part's warps, the parts).
template <class T>
struct Gradients {
  std::vector<double> dx, dgamma, dbeta;                    // float64 references
  std::vector<double> dx_error, dgamma_error, dbeta_error;  // fp32 error bounds
};

template <class T>
Gradients<T> float64_gradients(const LayerNormCase<T>& k, const ForwardOutputs<T>& f) {
  const std::size_t rows = k.rows, cols = k.cols;
  const double d = lane_depth(cols), u = fp32_unit;
  Gradients<T> g{std::vector<double>(rows * cols), std::vector<double>(cols, 0.0), std::vector<double>(cols, 0.0),
                 std::vector<double>(rows * cols), std::vector<double>(cols, 0.0), std::vector<double>(cols, 0.0)};
  std::vector<double> dgamma_magnitude(cols, 0.0), dbeta_magnitude(cols, 0.0);
  for (std::size_t r = 0; r < rows; ++r) {
    const RowStats st = row_stats(k, r);
    const double delta = std::fabs(f.mean[r] - st.mean);
    const double eps_r = std::fabs(f.rstd[r] / st.rstd - 1);
    std::vector<double> xhat(cols), gv(cols), e_xhat(cols);
    double A = 0, B = 0, abs_g = 0, abs_gx = 0, g_e = 0;
    for (std::size_t c = 0; c < cols; ++c) {
      xhat[c] = (k.xv(r, c) - st.mean) * st.rstd;
      gv[c] = value(k.dy[r * cols + c]) * value(k.gamma[c]);
      e_xhat[c] =
          st.rstd * (delta + u * (std::fabs(k.xv(r, c)) + std::fabs(st.mean))) + std::fabs(xhat[c]) * (eps_r + 2 * u);
      A += gv[c], B += gv[c] * xhat[c];
      abs_g += std::fabs(gv[c]), abs_gx += std::fabs(gv[c] * xhat[c]), g_e += std::fabs(gv[c]) * e_xhat[c];
    }
    A /= double(cols), B /= double(cols), abs_g /= double(cols), abs_gx /= double(cols), g_e /= double(cols);
    const double e_A = (d + 2) * u * abs_g;
    const double e_B = g_e + (d + 3) * u * abs_gx;
    for (std::size_t c = 0; c < cols; ++c) {
      const double I = gv[c] - A - xhat[c] * B;
      const double e_I = 3 * u * std::fabs(gv[c]) + e_A + std::fabs(xhat[c]) * e_B + e_xhat[c] * std::fabs(B) +
                         u * std::fabs(A) + 3 * u * std::fabs(xhat[c] * B) + u * std::fabs(gv[c] - A);
      g.dx[r * cols + c] = st.rstd * I;
      g.dx_error[r * cols + c] = 2 * (st.rstd * e_I + std::fabs(I) * st.rstd * (eps_r + u));
      const double dy = value(k.dy[r * cols + c]);
      g.dgamma[c] += dy * xhat[c];
      g.dbeta[c] += dy;
      g.dgamma_error[c] += std::fabs(dy) * (e_xhat[c] + u * std::fabs(xhat[c]));
      dgamma_magnitude[c] += std::fabs(dy * xhat[c]);
      dbeta_magnitude[c] += std::fabs(dy);
    }
  }
  for (std::size_t c = 0; c < cols; ++c) {
    g.dgamma_error[c] = 2 * (g.dgamma_error[c] + (double(rows) + 16) * u * dgamma_magnitude[c]);
    g.dbeta_error[c] = 2 * (double(rows) + 16) * u * dbeta_magnitude[c];
  }
  return g;
}

template <class T, class G>
struct BackwardOutputs {
  std::vector<T> dx;
  std::vector<G> dgamma, dbeta;
};

template <class T, class G>
BackwardOutputs<T, G> run_backward(const LayerNormCase<T>& k, const ForwardOutputs<T>& f, bool accumulate,
                                   const std::vector<G>& dgamma0, const std::vector<G>& dbeta0,
                                   const std::vector<T>* dx_add = nullptr) {
  BackwardOutputs<T, G> o{std::vector<T>(k.rows * k.cols + 1, poison<T>()), dgamma0, dbeta0};
  o.dgamma.push_back(poison<G>());
  o.dbeta.push_back(poison<G>());
  alloy::layernorm_backward(Host{}, k.dy.data(), k.x.data(), k.gamma.data(), f.mean.data(), f.rstd.data(), o.dx.data(),
                            o.dgamma.data(), o.dbeta.data(), k.rows, k.cols, accumulate, static_cast<float*>(nullptr),
                            dx_add ? dx_add->data() : nullptr);
  EXPECT_EQ(bits_of(o.dx.back()), bits_of(poison<T>())) << "dx written past rows * cols";
  EXPECT_EQ(bits_of(o.dgamma.back()), bits_of(poison<G>())) << "dgamma written past cols";
  EXPECT_EQ(bits_of(o.dbeta.back()), bits_of(poison<G>())) << "dbeta written past cols";
  return o;
}

// With dx_add, dx gains one fp32 addition of an exact value: u |dx + dx_add| more (x2 spare).
template <class T, class G = T>
void expect_backward_matches_float64(LayerNormInputs s, bool accumulate, std::uint64_t seed, bool add = false) {
  std::mt19937_64 rng(seed);
  const LayerNormCase<T> k(s, 0.5, 2.0, rng);
  SCOPED_TRACE(describe(k) + " gradients in " + alloy::numeric_traits<G>::name +
               (accumulate ? ", accumulating" : ", overwriting") + (add ? ", adding dx_add" : ""));
  const auto f = run_forward(k);
  const auto dgamma0 = accumulate ? normal<G>(k.cols, 0.0, 3.0, rng) : std::vector<G>(k.cols, poison<G>());
  const auto dbeta0 = accumulate ? normal<G>(k.cols, 0.0, 3.0, rng) : std::vector<G>(k.cols, poison<G>());
  const auto dx_add = normal<T>(k.rows * k.cols, 0.0, 1.0, rng);
  const auto o = run_backward<T, G>(k, f, accumulate, dgamma0, dbeta0, add ? &dx_add : nullptr);
  const auto g = float64_gradients(k, f);
  BoundCheck dx_check("dx"), dgamma_check("dgamma"), dbeta_check("dbeta");
  for (std::size_t i = 0; i < k.rows * k.cols; ++i) {
    const double extra = add ? value(dx_add[i]) : 0.0;
    const double want = g.dx[i] + extra;
    const double error = g.dx_error[i] + (add ? 2 * fp32_unit * (std::fabs(g.dx[i]) + std::fabs(extra)) : 0.0);
    dx_check.expect(value(o.dx[i]), want, rounded_bound<T>(want, error), i / k.cols, i % k.cols);
  }
  for (std::size_t c = 0; c < k.cols; ++c) {
    const double old_gamma = accumulate ? value(dgamma0[c]) : 0.0, old_beta = accumulate ? value(dbeta0[c]) : 0.0;
    const double want_gamma = old_gamma + g.dgamma[c], want_beta = old_beta + g.dbeta[c];
    // Accumulating adds one fp32 addition to the old value.
    const double add_gamma = accumulate ? 2 * fp32_unit * std::fabs(want_gamma) : 0.0;
    const double add_beta = accumulate ? 2 * fp32_unit * std::fabs(want_beta) : 0.0;
    dgamma_check.expect(value(o.dgamma[c]), want_gamma, rounded_bound<G>(want_gamma, g.dgamma_error[c] + add_gamma), 0,
                        c);
    dbeta_check.expect(value(o.dbeta[c]), want_beta, rounded_bound<G>(want_beta, g.dbeta_error[c] + add_beta), 0, c);
  }
}

TYPED_TEST(RowKernels, LayerNormBackwardMatchesFloat64Gradient) {
  ALLOY_SEEDED(seed);
  for (Shape s : layernorm_shapes) expect_backward_matches_float64<TypeParam>({s.rows, s.cols}, false, seed + s.cols);
}

TYPED_TEST(RowKernels, LayerNormBackwardAddsDxAddBeforeRounding) {
  ALLOY_SEEDED(seed);
  for (Shape s : layernorm_shapes) {
    expect_backward_matches_float64<TypeParam>({s.rows, s.cols}, false, seed + s.cols, true);
  }
  expect_backward_matches_float64<TypeParam, float>({37, 1000}, true, seed, true);
}

// dx_add's column sums (the bias gradient of a residual block's last projection, taken in the
// block's LayerNorm pass, nn::Sequential): within fp32 summation error of the float64 sums (plus
// the old values when accumulating), in T and in fp32; dx, dgamma and dbeta keep the bits they
// have without them.
template <class T, class G = T>
void expect_dx_add_sums_match_float64(Shape s, bool accumulate, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const LayerNormCase<T> k({s.rows, s.cols}, 0.5, 2.0, rng);
  SCOPED_TRACE(describe(k) + " sums in " + alloy::numeric_traits<G>::name +
               (accumulate ? ", accumulating" : ", overwriting"));
  const auto f = run_forward(k);
  const auto dx_add = normal<T>(k.rows * k.cols, 0.0, 1.0, rng);
  const auto old = normal<G>(k.cols, 0.0, 3.0, rng);
  const auto without = run_backward<T, G>(k, f, false, std::vector<G>(k.cols), std::vector<G>(k.cols), &dx_add);
  std::vector<T> dx(k.rows * k.cols);
  // Accumulating into zeros gives dgamma and dbeta the bits of overwriting.
  std::vector<G> dgamma(k.cols), dbeta(k.cols), sums = accumulate ? old : std::vector<G>(k.cols, poison<G>());
  sums.push_back(poison<G>());
  alloy::layernorm_backward(Host{}, k.dy.data(), k.x.data(), k.gamma.data(), f.mean.data(), f.rstd.data(), dx.data(),
                            dgamma.data(), dbeta.data(), k.rows, k.cols, accumulate, static_cast<float*>(nullptr),
                            dx_add.data(), sums.data());
  EXPECT_EQ(bits_of(sums.back()), bits_of(poison<G>())) << "sums written past cols";
  for (std::size_t i = 0; i < dx.size(); ++i) ASSERT_EQ(bits_of(dx[i]), bits_of(without.dx[i])) << "dx " << i;
  for (std::size_t c = 0; c < k.cols; ++c) {
    EXPECT_EQ(bits_of(dgamma[c]), bits_of(without.dgamma[c])) << "dgamma " << c;
    EXPECT_EQ(bits_of(dbeta[c]), bits_of(without.dbeta[c])) << "dbeta " << c;
  }
  BoundCheck check("dx_add's column sums");
  for (std::size_t c = 0; c < k.cols; ++c) {
    double want = accumulate ? value(old[c]) : 0.0, magnitude = std::fabs(want);
    for (std::size_t r = 0; r < k.rows; ++r) {
      want += value(dx_add[r * k.cols + c]);
      magnitude += std::fabs(value(dx_add[r * k.cols + c]));
    }
    const double error = 2 * (double(k.rows) + 16) * fp32_unit * magnitude;
    check.expect(value(sums[c]), want, rounded_bound<G>(want, error), 0, c);
  }
}

TYPED_TEST(RowKernels, LayerNormBackwardSumsDxAddColumns) {
  ALLOY_SEEDED(seed);
  for (Shape s : layernorm_shapes) {
    expect_dx_add_sums_match_float64<TypeParam>(s, false, seed + s.cols);
    expect_dx_add_sums_match_float64<TypeParam>(s, true, seed + s.cols + 1);
  }
  expect_dx_add_sums_match_float64<TypeParam, float>({37, 1000}, true, seed);
}

// dx_add may be dx itself: the gradient arriving on a residual's skip path, added in place.
TYPED_TEST(RowKernels, LayerNormBackwardAddsDxAddInPlace) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  for (Shape s : {Shape{37, 29}, Shape{9, 1024}}) {
    std::mt19937_64 rng(seed + s.cols);
    const LayerNormCase<T> k({s.rows, s.cols}, 0.5, 2.0, rng);
    SCOPED_TRACE(describe(k));
    const auto f = run_forward(k);
    const auto dx_add = normal<T>(k.rows * k.cols, 0.0, 1.0, rng);
    const auto apart = run_backward<T, T>(k, f, false, std::vector<T>(k.cols), std::vector<T>(k.cols), &dx_add);
    std::vector<T> dx = dx_add, dgamma(k.cols), dbeta(k.cols);
    alloy::layernorm_backward(Host{}, k.dy.data(), k.x.data(), k.gamma.data(), f.mean.data(), f.rstd.data(), dx.data(),
                              dgamma.data(), dbeta.data(), k.rows, k.cols, false, static_cast<float*>(nullptr),
                              dx.data());
    for (std::size_t i = 0; i < dx.size(); ++i) ASSERT_EQ(bits_of(dx[i]), bits_of(apart.dx[i])) << "dx " << i;
    for (std::size_t c = 0; c < k.cols; ++c) {
      EXPECT_EQ(bits_of(dgamma[c]), bits_of(apart.dgamma[c])) << "dgamma " << c;
      EXPECT_EQ(bits_of(dbeta[c]), bits_of(apart.dbeta[c])) << "dbeta " << c;
    }
  }
}

// dx may be dy itself: a LayerNorm whose dy is a buffer nothing reads afterwards writes over it.
TYPED_TEST(RowKernels, LayerNormBackwardWritesDxOverDyToTheSameBits) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  for (Shape s : {Shape{37, 29}, Shape{9, 1024}, Shape{70, 256}}) {
    for (bool add : {false, true}) {
      std::mt19937_64 rng(seed + s.cols);
      const LayerNormCase<T> k({s.rows, s.cols}, 0.5, 2.0, rng);
      SCOPED_TRACE(describe(k) + (add ? ", adding dx_add" : ""));
      const auto f = run_forward(k);
      const auto dx_add = normal<T>(k.rows * k.cols, 0.0, 1.0, rng);
      const auto apart =
          run_backward<T, T>(k, f, false, std::vector<T>(k.cols), std::vector<T>(k.cols), add ? &dx_add : nullptr);
      std::vector<T> dx = k.dy, dgamma(k.cols), dbeta(k.cols);
      alloy::layernorm_backward(Host{}, dx.data(), k.x.data(), k.gamma.data(), f.mean.data(), f.rstd.data(), dx.data(),
                                dgamma.data(), dbeta.data(), k.rows, k.cols, false, static_cast<float*>(nullptr),
                                add ? dx_add.data() : nullptr);
      for (std::size_t i = 0; i < dx.size(); ++i) ASSERT_EQ(bits_of(dx[i]), bits_of(apart.dx[i])) << "dx " << i;
      for (std::size_t c = 0; c < k.cols; ++c) {
        EXPECT_EQ(bits_of(dgamma[c]), bits_of(apart.dgamma[c])) << "dgamma " << c;
        EXPECT_EQ(bits_of(dbeta[c]), bits_of(apart.dbeta[c])) << "dbeta " << c;
      }
    }
  }
}

TYPED_TEST(RowKernels, LayerNormBackwardAccumulateAddsToTheParameterGradients) {
  ALLOY_SEEDED(seed);
  for (Shape s : layernorm_shapes) expect_backward_matches_float64<TypeParam>({s.rows, s.cols}, true, seed + s.cols);
}

// fp32 parameter gradients (an fp32 gradient accumulator) from compute-dtype activations.
TYPED_TEST(RowKernels, LayerNormBackwardWritesFp32ParameterGradients) {
  ALLOY_SEEDED(seed);
  expect_backward_matches_float64<TypeParam, float>({37, 1000}, false, seed);
  expect_backward_matches_float64<TypeParam, float>({37, 29}, true, seed + 1);
}

// Many parts, each folded by several warps, summed through all 8 final slots: 1000 rows make
// 125 parts of 8 rows; 17001 rows make 256 parts of 67 rows, the last two empty, which must
// contribute nothing; 2001 rows of 5000 columns make 251 parts of one warp, the last one row.
TYPED_TEST(RowKernels, LayerNormBackwardOverManyPartsMatchesFloat64) {
  ALLOY_SEEDED(seed);
  expect_backward_matches_float64<TypeParam>({1000, 29}, false, seed);
  expect_backward_matches_float64<TypeParam>({17001, 3}, true, seed + 1);
  expect_backward_matches_float64<TypeParam>({2001, 5000}, false, seed + 2);
}

TYPED_TEST(RowKernels, LayerNormBackwardOverwritesOrAccumulatesOnlyTheParameterGradients) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LayerNormCase<T> k({19, 40}, 0.0, 1.0, rng);
  const auto f = run_forward(k);
  const auto zeros = std::vector<T>(k.cols, alloy::round_nearest<T>(0.0f));
  const auto overwritten = run_backward<T, T>(k, f, false, std::vector<T>(k.cols, poison<T>()), zeros);
  const auto from_zero = run_backward<T, T>(k, f, true, zeros, zeros);
  for (std::size_t i = 0; i < k.rows * k.cols; ++i) {
    ASSERT_EQ(bits_of(overwritten.dx[i]), bits_of(from_zero.dx[i])) << "dx depends on accumulate at " << i;
  }
  for (std::size_t c = 0; c < k.cols; ++c) {
    EXPECT_EQ(value(overwritten.dgamma[c]), value(from_zero.dgamma[c])) << "dgamma " << c;
    EXPECT_EQ(value(overwritten.dbeta[c]), value(from_zero.dbeta[c])) << "dbeta " << c;
  }
}

// float64 sum(w * LayerNorm(x)) of one row, for finite differences.
double layernorm_loss(const std::vector<double>& x, const std::vector<double>& gamma, const std::vector<double>& beta,
                      const std::vector<double>& w, double eps) {
  const double n = double(x.size());
  double mean = 0, var = 0, loss = 0;
  for (double v : x) mean += v;
  mean /= n;
  for (double v : x) var += (v - mean) * (v - mean);
  const double rstd = 1.0 / std::sqrt(var / n + eps);
  for (std::size_t c = 0; c < x.size(); ++c) loss += w[c] * ((x[c] - mean) * rstd * gamma[c] + beta[c]);
  return loss;
}

// Central differences (h = 1e-5, truncation error about h^2 |f'''|, far below the bounds) of the
// float64 loss sum(dy * y) for every x, gamma and beta: the kernel's gradients must match them
// within the same bounds as the analytic gradient, plus 1e-6 for the differences themselves.
TYPED_TEST(RowKernels, LayerNormBackwardMatchesFiniteDifferences) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  for (Shape s : {Shape{3, 29}, Shape{2, 8}, Shape{2, 1}}) {
    std::mt19937_64 rng(seed + s.cols);
    const LayerNormCase<T> k({s.rows, s.cols}, 0.5, 2.0, rng);
    SCOPED_TRACE(describe(k));
    const auto f = run_forward(k);
    const auto o = run_backward<T, T>(k, f, false, std::vector<T>(k.cols), std::vector<T>(k.cols));
    const auto g = float64_gradients(k, f);
    const std::size_t cols = k.cols;
    std::vector<double> gamma(cols), beta(cols);
    for (std::size_t c = 0; c < cols; ++c) gamma[c] = value(k.gamma[c]), beta[c] = value(k.beta[c]);
    const auto row = [&](const std::vector<T>& v, std::size_t r) {
      std::vector<double> out(cols);
      for (std::size_t c = 0; c < cols; ++c) out[c] = value(v[r * cols + c]);
      return out;
    };
    const double h = 1e-5;
    const auto central = [&](auto&& loss_at, std::vector<double>& v, std::size_t i) {
      const double saved = v[i];
      v[i] = saved + h;
      const double up = loss_at();
      v[i] = saved - h;
      const double down = loss_at();
      v[i] = saved;
      return (up - down) / (2 * h);
    };
    BoundCheck dx_check("dx against finite differences"), dgamma_check("dgamma against finite differences"),
        dbeta_check("dbeta against finite differences");
    std::vector<double> fd_gamma(cols, 0.0), fd_beta(cols, 0.0);
    for (std::size_t r = 0; r < k.rows; ++r) {
      auto x = row(k.x, r);
      const auto w = row(k.dy, r);
      const auto loss = [&] { return layernorm_loss(x, gamma, beta, w, k.eps); };
      for (std::size_t c = 0; c < cols; ++c) {
        const double fd = central(loss, x, c);
        const std::size_t i = r * cols + c;
        dx_check.expect(value(o.dx[i]), fd, rounded_bound<T>(fd, g.dx_error[i]) + 1e-6 * (1 + std::fabs(fd)), r, c);
        fd_gamma[c] += central(loss, gamma, c);
        fd_beta[c] += central(loss, beta, c);
      }
    }
    for (std::size_t c = 0; c < cols; ++c) {
      dgamma_check.expect(value(o.dgamma[c]), fd_gamma[c],
                          rounded_bound<T>(fd_gamma[c], g.dgamma_error[c]) + 1e-6 * (1 + std::fabs(fd_gamma[c])), 0, c);
      dbeta_check.expect(value(o.dbeta[c]), fd_beta[c],
                         rounded_bound<T>(fd_beta[c], g.dbeta_error[c]) + 1e-6 * (1 + std::fabs(fd_beta[c])), 0, c);
    }
  }
}

TYPED_TEST(RowKernels, LayerNormBackwardRunsTwiceToTheSameBits) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LayerNormCase<T> k({100, 77}, 0.0, 1.0, rng);
  const auto f = run_forward(k);
  const auto a = run_backward<T, T>(k, f, false, std::vector<T>(k.cols), std::vector<T>(k.cols));
  const auto b = run_backward<T, T>(k, f, false, std::vector<T>(k.cols), std::vector<T>(k.cols));
  for (std::size_t i = 0; i < a.dx.size(); ++i) ASSERT_EQ(bits_of(a.dx[i]), bits_of(b.dx[i])) << "dx " << i;
  for (std::size_t c = 0; c < k.cols; ++c) {
    ASSERT_EQ(bits_of(a.dgamma[c]), bits_of(b.dgamma[c])) << "dgamma " << c;
    ASSERT_EQ(bits_of(a.dbeta[c]), bits_of(b.dbeta[c])) << "dbeta " << c;
  }
}

TEST(LayerNormArguments, BadArgumentsThrowWithTheirName) {
  std::vector<float> v(12, 1.0f), stats(3);
  EXPECT_THROW(
      alloy::layernorm_forward(Host{}, v.data(), v.data(), v.data(), v.data(), stats.data(), stats.data(), 3, 0),
      alloy::error);
  EXPECT_THROW(alloy::layernorm_forward(Host{}, v.data(), static_cast<const float*>(nullptr), v.data(), v.data(),
                                        stats.data(), stats.data(), 3, 4),
               alloy::error);
  EXPECT_THROW(alloy::layernorm_backward(Host{}, v.data(), v.data(), v.data(), stats.data(), stats.data(), v.data(),
                                         v.data(), static_cast<float*>(nullptr), 3, 4, false, nullptr),
               alloy::error);
  try {
    alloy::layernorm_backward(Host{}, v.data(), v.data(), v.data(), static_cast<const float*>(nullptr), stats.data(),
                              v.data(), v.data(), v.data(), 3, 4, false, nullptr);
    ADD_FAILURE() << "a null mean was accepted";
  } catch (const alloy::error& e) {
    EXPECT_NE(std::string(e.what()).find("layernorm_backward"), std::string::npos) << e.what();
  }
  // dx_add's column sums without a dx_add.
  try {
    alloy::layernorm_backward(Host{}, v.data(), v.data(), v.data(), stats.data(), stats.data(), v.data(), v.data(),
                              v.data(), 3, 4, false, nullptr, nullptr, v.data());
    ADD_FAILURE() << "column sums of no dx_add were accepted";
  } catch (const alloy::error& e) {
    EXPECT_NE(std::string(e.what()).find("dx_add_sums"), std::string::npos) << e.what();
  }
  // No rows: nothing to normalize; the parameter gradients are sums over no rows.
  std::vector<float> dgamma(4, 7.0f), dbeta(4, 7.0f);
  alloy::layernorm_backward(Host{}, v.data(), v.data(), v.data(), stats.data(), stats.data(), v.data(), dgamma.data(),
                            dbeta.data(), 0, 4, false, nullptr);
  for (int c = 0; c < 4; ++c) {
    EXPECT_EQ(dgamma[c], 0.0f);
    EXPECT_EQ(dbeta[c], 0.0f);
  }
}

// One part per 8 rows, up to 2048 warps' worth of parts (8 warps per part up to 1024 columns,
// fewer beyond: as many as have 64 KiB for their sums) and at most 1024 parts.
TEST(LayerNormScratch, BoundCoversOnePartPer8RowsUpTo2048Warps) {
  // Three sets of column sums per part (dgamma's, dbeta's and, when asked for, dx_add's).
  EXPECT_EQ(alloy::layernorm_backward_scratch_floats(0, 768), 0u);
  EXPECT_EQ(alloy::layernorm_backward_scratch_floats(1, 768), 3u * 768);
  EXPECT_EQ(alloy::layernorm_backward_scratch_floats(37, 29), 5u * 3 * 29);
  EXPECT_EQ(alloy::layernorm_backward_scratch_floats(4096, 1024), 256u * 3 * 1024);
  EXPECT_EQ(alloy::layernorm_backward_scratch_floats(1u << 20, 1024), 256u * 3 * 1024);
  EXPECT_EQ(alloy::layernorm_backward_scratch_floats(1u << 20, 1500), 409u * 3 * 1500);   // 5 warps
  EXPECT_EQ(alloy::layernorm_backward_scratch_floats(1u << 20, 5000), 1024u * 3 * 5000);  // 1 warp
}

// The backward kernel's layout of a warp's column sums in shared memory (layernorm_lane_sums_at),
// for L = 4 (float) and 8 (bf16, fp16) columns per vector and V = 1..4 vectors per lane: a
// permutation of the columns that keeps each lane's 4-column chunks whole and 16-byte aligned,
// with no bank conflicts when a warp reads or writes one chunk per lane (8 lanes at a time, each
// on its own 16 bytes of the 128 of banks) or when 32 threads read 32 consecutive columns.
template <int L>
void expect_lane_sums_layout_without_bank_conflicts() {
  using alloy::detail::layernorm_lane_sums_at;
  for (unsigned v = 1; v <= 4; ++v) {
    SCOPED_TRACE("L=" + std::to_string(L) + " V=" + std::to_string(v));
    const unsigned cols = 32 * L * v;
    std::vector<int> seen(cols, 0);
    for (unsigned c = 0; c < cols; ++c) {
      const unsigned at = layernorm_lane_sums_at<L>(c);
      ASSERT_LT(at, cols);
      ++seen[at];
      EXPECT_EQ(at % 4, c % 4) << c;  // chunks stay whole
    }
    for (unsigned c = 0; c < cols; ++c) EXPECT_EQ(seen[c], 1) << c;
    for (unsigned k = 0; k < v; ++k) {
      for (unsigned h = 0; h < L / 4; ++h) {
        for (unsigned quarter = 0; quarter < 4; ++quarter) {
          std::vector<int> group(8, 0);  // 16-byte columns of banks
          for (unsigned lane = 8 * quarter; lane < 8 * quarter + 8; ++lane) {
            ++group[layernorm_lane_sums_at<L>((lane + 32 * k) * L + 4 * h) / 4 % 8];
          }
          for (int g : group) EXPECT_EQ(g, 1) << "vector " << k << " chunk " << h << " quarter " << quarter;
        }
      }
    }
    for (unsigned first = 0; first < cols; first += 32) {
      std::vector<int> banks(32, 0);
      for (unsigned c = first; c < first + 32; ++c) ++banks[layernorm_lane_sums_at<L>(c) % 32];
      for (int b : banks) EXPECT_EQ(b, 1) << "columns from " << first;
    }
  }
}

TEST(LayerNormLaneSums, LayoutIsAConflictFreePermutation) {
  expect_lane_sums_layout_without_bank_conflicts<4>();
  expect_lane_sums_layout_without_bank_conflicts<8>();
}

// ---- softmax cross-entropy ----

struct LossCase {
  std::size_t rows, classes;
  float grad_scale;
};

template <class T>
std::string describe(const std::vector<T>&, const LossCase& s) {
  return std::string(alloy::numeric_traits<T>::name) + " rows=" + std::to_string(s.rows) +
         " classes=" + std::to_string(s.classes);
}

template <class T>
struct LossOutputs {
  std::vector<float> loss;
  std::vector<T> dlogits;
};

template <class T>
LossOutputs<T> run_loss(const std::vector<T>& logits, const std::vector<std::int32_t>& targets, const LossCase& s,
                        bool gradient = true) {
  LossOutputs<T> o{std::vector<float>(s.rows + 1, poison<float>()),
                   std::vector<T>(s.rows * s.classes + 1, poison<T>())};
  alloy::softmax_cross_entropy(Host{}, logits.data(), targets.data(), s.rows, s.classes, o.loss.data(),
                               gradient ? o.dlogits.data() : nullptr, s.grad_scale);
  EXPECT_EQ(bits_of(o.loss.back()), bits_of(poison<float>())) << "row_loss written past rows";
  EXPECT_EQ(bits_of(o.dlogits.back()), bits_of(poison<T>())) << "dlogits written past rows * classes";
  return o;
}

// float64 loss of one row (NaN for an invalid target), and its softmax.
struct RowSoftmax {
  double max, sum, loss;
  std::vector<double> p;
};

template <class T>
RowSoftmax row_softmax(const T* x, std::size_t classes, std::int32_t target) {
  RowSoftmax r{-std::numeric_limits<double>::infinity(), 0, 0, std::vector<double>(classes)};
  for (std::size_t c = 0; c < classes; ++c) r.max = std::max(r.max, value(x[c]));
  for (std::size_t c = 0; c < classes; ++c) r.sum += std::exp(value(x[c]) - r.max);
  for (std::size_t c = 0; c < classes; ++c) r.p[c] = std::exp(value(x[c]) - r.max) / r.sum;
  r.loss = std::log(r.sum) + (r.max - value(x[target]));
  return r;
}

// Bounds. A thread's sum of exp(x - max) takes up to (classes / 256 + 24) additions and, with
// the 12 combination steps after, each term passes through up to (runs + 13) exp evaluations and
// multiplications (runs = classes / 256 + 3), each off by u plus exp's error. The arguments of
// those exps (x - m, then m_old - m_new as the maximum grows) add up to max - x for each term,
// and each is rounded within u of itself, then multiplied by log2(e) for exp2 (another u of
// itself), so term x is off by a further 4u (max - x) relative: weighted by the terms, 4u spread
// with spread = sum of p (max - x). So
//   eps_s = (runs + 13)(u + e_exp) + 4u spread + (classes / 256 + 37) u,
//   loss:   2 (eps_s + 4u |log sum| + u |max - x[t]| + u |loss|),
//   p = exp(x - max) / sum within eps_p = 2u |x - max| + e_exp + eps_s + 2u relative, and
//   dlogits = (p - onehot) grad_scale within 2 |grad_scale| (p eps_p + 2u |p - onehot|).
template <class T>
void expect_loss_matches_float64(const std::vector<T>& logits, const std::vector<std::int32_t>& targets,
                                 const LossCase& s) {
  SCOPED_TRACE(describe(logits, s));
  const auto o = run_loss(logits, targets, s);
  const double u = fp32_unit;
  BoundCheck loss_check("row_loss"), grad_check("dlogits");
  for (std::size_t r = 0; r < s.rows; ++r) {
    const T* x = logits.data() + r * s.classes;
    const RowSoftmax ref = row_softmax(x, s.classes, targets[r]);
    double spread = 0;
    for (std::size_t c = 0; c < s.classes; ++c) {
      if (ref.p[c] > 0) spread += ref.p[c] * (ref.max - value(x[c]));  // p = 0 for x = -infinity
    }
    const double runs = double(s.classes) / 256 + 3;
    const double eps_s = (runs + 13) * (u + exp_error) + 4 * u * spread + (double(s.classes) / 256 + 37) * u;
    const double target_gap = ref.max - value(x[targets[r]]);
    const double loss_error =
        2 * (eps_s + 4 * u * std::fabs(std::log(ref.sum)) + u * target_gap + u * std::fabs(ref.loss));
    loss_check.expect(o.loss[r], ref.loss, loss_error, r, 0);
    for (std::size_t c = 0; c < s.classes; ++c) {
      const double onehot = c == std::size_t(targets[r]) ? 1.0 : 0.0;
      const double eps_p = 2 * u * (ref.max - value(x[c])) + exp_error + eps_s + 2 * u;
      const double want = (ref.p[c] - onehot) * s.grad_scale;
      const double relative = ref.p[c] > 0 ? ref.p[c] * eps_p : 0.0;
      const double error = 2 * std::fabs(s.grad_scale) * (relative + 2 * u * std::fabs(ref.p[c] - onehot));
      grad_check.expect(value(o.dlogits[r * s.classes + c]), want,
                        rounded_bound<T>(want, error) + std::fabs(s.grad_scale) * std::ldexp(1.0, -120), r, c);
    }
  }
}

// Odd class counts (rows split at a different 16-byte phase each), a count of whole vectors,
// one class, and GPT-2's vocabulary.
constexpr LossCase loss_cases[] = {{37, 29, 1.0f / 37}, {37, 1000, 1024.0f / 37}, {37, 1, 1.0f}, {5, 50257, 0.2f}};

TYPED_TEST(RowKernels, SoftmaxCrossEntropyMatchesFloat64) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  for (const LossCase& s : loss_cases) {
    std::mt19937_64 rng(seed + s.classes);
    expect_loss_matches_float64(normal<T>(s.rows * s.classes, 0.0, 3.0, rng), random_targets(s.rows, s.classes, rng),
                                s);
  }
}

// Logits of +-80: exp(80) overflows nothing only because the maximum is subtracted first.
TYPED_TEST(RowKernels, SoftmaxCrossEntropyIsStableForLargeLogits) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  for (const LossCase& s : loss_cases) {
    std::mt19937_64 rng(seed + s.classes);
    expect_loss_matches_float64(uniform<T>(s.rows * s.classes, -80.0, 80.0, rng),
                                random_targets(s.rows, s.classes, rng), s);
  }
  // Logits near the dtype's largest finite values.
  const double huge = std::is_same_v<T, fp16> ? 6.0e4 : 1.0e30;
  std::mt19937_64 rng(seed);
  const LossCase s{7, 100, 1.0f};
  expect_loss_matches_float64(uniform<T>(s.rows * s.classes, -huge, huge, rng), random_targets(s.rows, s.classes, rng),
                              s);
}

// A class whose logit is -infinity (masked out) has probability 0 and gradient 0.
TYPED_TEST(RowKernels, SoftmaxCrossEntropyGivesMaskedClassesZeroProbability) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LossCase s{9, 300, 0.5f};
  auto logits = normal<T>(s.rows * s.classes, 0.0, 2.0, rng);
  const auto targets = random_targets(s.rows, s.classes, rng);
  const T minus_infinity = alloy::round_nearest<T>(-std::numeric_limits<float>::infinity());
  for (std::size_t i = 0; i < logits.size(); i += 3) {
    if (std::size_t(targets[i / s.classes]) != i % s.classes) logits[i] = minus_infinity;
  }
  expect_loss_matches_float64(logits, targets, s);
  const auto o = run_loss(logits, targets, s);
  for (std::size_t i = 0; i < logits.size(); ++i) {
    if (bits_of(logits[i]) == bits_of(minus_infinity)) {
      ASSERT_EQ(value(o.dlogits[i]), 0.0) << "element " << i;
    }
  }
}

TYPED_TEST(RowKernels, SoftmaxCrossEntropyOfOneClassIsZero) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LossCase s{13, 1, 3.0f};
  const auto o = run_loss(normal<T>(s.rows, 0.0, 100.0, rng), std::vector<std::int32_t>(s.rows, 0), s);
  for (std::size_t r = 0; r < s.rows; ++r) {
    EXPECT_EQ(o.loss[r], 0.0f) << "row " << r;
    EXPECT_EQ(value(o.dlogits[r]), 0.0) << "row " << r;
  }
}

// Central differences (h = 1e-5) of the float64 row loss for every logit: dlogits / grad_scale
// must match them within the analytic gradient's bound plus 1e-7.
TYPED_TEST(RowKernels, SoftmaxCrossEntropyGradientMatchesFiniteDifferences) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LossCase s{4, 37, 2.0f};
  const auto logits = normal<T>(s.rows * s.classes, 0.0, 2.0, rng);
  const auto targets = random_targets(s.rows, s.classes, rng);
  const auto o = run_loss(logits, targets, s);
  const double h = 1e-5, u = fp32_unit;
  BoundCheck check("dlogits / grad_scale against finite differences");
  for (std::size_t r = 0; r < s.rows; ++r) {
    std::vector<double> x(s.classes);
    for (std::size_t c = 0; c < s.classes; ++c) x[c] = value(logits[r * s.classes + c]);
    const auto loss = [&] {
      double m = x[0], sum = 0;
      for (double v : x) m = std::max(m, v);
      for (double v : x) sum += std::exp(v - m);
      return std::log(sum) + m - x[std::size_t(targets[r])];
    };
    for (std::size_t c = 0; c < s.classes; ++c) {
      const double saved = x[c];
      x[c] = saved + h;
      const double up = loss();
      x[c] = saved - h;
      const double down = loss();
      x[c] = saved;
      const double fd = (up - down) / (2 * h);
      // |gradient| <= 1 and its relative fp32 error is below 1e3 u here; one rounding to T.
      const double bound = 1e3 * u + out_unit<T>() * (std::fabs(fd) + 1e3 * u) + 1e-7;
      check.expect(value(o.dlogits[r * s.classes + c]) / s.grad_scale, fd, bound, r, c);
    }
  }
}

TYPED_TEST(RowKernels, SoftmaxCrossEntropyMarksOutOfRangeTargetsWithNaN) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LossCase s{6, 50, 1.0f};
  const auto logits = normal<T>(s.rows * s.classes, 0.0, 1.0, rng);
  const std::vector<std::int32_t> targets = {
      3, -1, 50, std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max(), 49};
  const auto o = run_loss(logits, targets, s);
  for (std::size_t r = 0; r < s.rows; ++r) {
    const bool valid = targets[r] >= 0 && targets[r] < 50;
    EXPECT_EQ(std::isnan(o.loss[r]), !valid) << "row " << r << ", target " << targets[r];
    for (std::size_t c = 0; c < s.classes; ++c) {
      ASSERT_EQ(std::isnan(value(o.dlogits[r * s.classes + c])), !valid) << "row " << r << ", class " << c;
    }
  }
}

// NaN and +infinity logits make their row NaN (as PyTorch does), and so does a row of nothing but
// -infinity; the other rows are untouched.
TYPED_TEST(RowKernels, SoftmaxCrossEntropyPropagatesNaNAndInfinitiesToTheirRowOnly) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LossCase s{5, 40, 1.0f};
  auto logits = normal<T>(s.rows * s.classes, 0.0, 1.0, rng);
  const float infinity = std::numeric_limits<float>::infinity();
  logits[1 * s.classes + 17] = alloy::round_nearest<T>(std::numeric_limits<float>::quiet_NaN());
  logits[3 * s.classes + 30] = alloy::round_nearest<T>(infinity);
  for (std::size_t c = 0; c < s.classes; ++c) logits[4 * s.classes + c] = alloy::round_nearest<T>(-infinity);
  const auto o = run_loss(logits, std::vector<std::int32_t>(s.rows, 0), s);
  for (std::size_t r = 0; r < s.rows; ++r) {
    const bool poisoned = r == 1 || r == 3 || r == 4;
    EXPECT_EQ(std::isnan(o.loss[r]), poisoned) << "row " << r;
    for (std::size_t c = 0; c < s.classes; ++c) {
      ASSERT_EQ(std::isnan(value(o.dlogits[r * s.classes + c])), poisoned) << "row " << r << ", class " << c;
    }
  }
}

TYPED_TEST(RowKernels, SoftmaxCrossEntropyWithoutGradientWritesTheSameLossAndNoGradient) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LossCase s{21, 333, 1.0f};
  const auto logits = normal<T>(s.rows * s.classes, 0.0, 2.0, rng);
  const auto targets = random_targets(s.rows, s.classes, rng);
  const auto with = run_loss(logits, targets, s, true);
  const auto without = run_loss(logits, targets, s, false);
  for (std::size_t r = 0; r < s.rows; ++r) EXPECT_EQ(bits_of(with.loss[r]), bits_of(without.loss[r])) << "row " << r;
  for (const T& d : without.dlogits) ASSERT_EQ(bits_of(d), bits_of(poison<T>()));
}

// A language-model head's rows: the first real_classes columns are classes, the rest padding.
// Padding holding NaN is never read: with rows of whole 16-byte vectors (96 classes padded to
// 104), the loss and the real columns' gradient are the bits of the unpadded rows, and the
// padding's gradient is zero.
TYPED_TEST(RowKernels, SoftmaxCrossEntropyLeavesPaddingColumnsOut) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const std::size_t rows = 11, real = 96, padded = 104;
  const auto compact = normal<T>(rows * real, 0.0, 3.0, rng);
  const auto targets = random_targets(rows, real, rng);
  std::vector<T> logits(rows * padded, alloy::round_nearest<T>(std::numeric_limits<float>::quiet_NaN()));
  for (std::size_t r = 0; r < rows; ++r) std::copy_n(compact.begin() + r * real, real, logits.begin() + r * padded);
  const LossCase s{rows, real, 0.25f};
  const auto want = run_loss(compact, targets, s);
  std::vector<float> loss(rows);
  std::vector<T> dlogits(rows * padded, poison<T>());
  alloy::softmax_cross_entropy(Host{}, logits.data(), targets.data(), rows, padded, loss.data(), dlogits.data(), 0.25f,
                               {.real_classes = real});
  for (std::size_t r = 0; r < rows; ++r) {
    EXPECT_EQ(bits_of(loss[r]), bits_of(want.loss[r])) << "row " << r;
    for (std::size_t c = 0; c < padded; ++c) {
      const T got = dlogits[r * padded + c];
      if (c < real) {
        ASSERT_EQ(bits_of(got), bits_of(want.dlogits[r * real + c])) << "row " << r << ", class " << c;
      } else {
        ASSERT_EQ(value(got), 0.0) << "row " << r << ", padding column " << c;
      }
    }
  }
}

// A row whose target is the ignore index has loss 0 and a zero gradient, padding included; the
// other rows are as without it.
TYPED_TEST(RowKernels, SoftmaxCrossEntropyIgnoredRowsHaveNoLossAndNoGradient) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const std::size_t rows = 9, real = 97, padded = 101;
  const auto logits = normal<T>(rows * padded, 0.0, 3.0, rng);
  auto targets = random_targets(rows, real, rng);
  std::vector<float> loss(rows), ignored_loss(rows);
  std::vector<T> dlogits(rows * padded), ignored_dlogits(rows * padded, poison<T>());
  alloy::softmax_cross_entropy(Host{}, logits.data(), targets.data(), rows, padded, loss.data(), dlogits.data(), 1.0f,
                               {.real_classes = real});
  targets[2] = targets[7] = -100;
  alloy::softmax_cross_entropy(Host{}, logits.data(), targets.data(), rows, padded, ignored_loss.data(),
                               ignored_dlogits.data(), 1.0f, {.real_classes = real, .ignore_index = -100});
  for (std::size_t r = 0; r < rows; ++r) {
    const bool ignored = r == 2 || r == 7;
    EXPECT_EQ(bits_of(ignored_loss[r]), bits_of(ignored ? 0.0f : loss[r])) << "row " << r;
    for (std::size_t c = 0; c < padded; ++c) {
      const std::size_t i = r * padded + c;
      ASSERT_EQ(bits_of(ignored_dlogits[i]), bits_of(ignored ? alloy::round_nearest<T>(0.0f) : dlogits[i])) << i;
    }
  }
  // Another target outside the classes is still NaN, not ignored.
  targets[4] = -1;
  alloy::softmax_cross_entropy(Host{}, logits.data(), targets.data(), rows, padded, ignored_loss.data(),
                               ignored_dlogits.data(), 1.0f, {.real_classes = real, .ignore_index = -100});
  EXPECT_TRUE(std::isnan(ignored_loss[4]));
}

// dlogits written over the logits: the bits of a separate buffer at the same 16-byte phase.
TYPED_TEST(RowKernels, SoftmaxCrossEntropyInPlaceGivesTheSameBits) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const std::size_t rows = 13, real = 97, padded = 101;
  auto logits = normal<T>(rows * padded, 0.0, 3.0, rng);
  const auto targets = random_targets(rows, real, rng);
  std::vector<float> loss(rows), in_place_loss(rows);
  std::vector<T> dlogits(rows * padded);
  ASSERT_TRUE(alloy::detail::same_alignment(logits.data(), dlogits.data()));
  alloy::softmax_cross_entropy(Host{}, logits.data(), targets.data(), rows, padded, loss.data(), dlogits.data(), 2.0f,
                               {.real_classes = real});
  alloy::softmax_cross_entropy(Host{}, logits.data(), targets.data(), rows, padded, in_place_loss.data(), logits.data(),
                               2.0f, {.real_classes = real});
  for (std::size_t r = 0; r < rows; ++r) EXPECT_EQ(bits_of(in_place_loss[r]), bits_of(loss[r])) << "row " << r;
  for (std::size_t i = 0; i < logits.size(); ++i) ASSERT_EQ(bits_of(logits[i]), bits_of(dlogits[i])) << i;
}

TEST(SoftmaxCrossEntropyArguments, PaddingAndIgnoreIndexMustMakeSense) {
  std::vector<float> logits(40), loss(4);
  std::vector<std::int32_t> targets(4);
  EXPECT_MENTIONS(message_of([&] {
                    alloy::softmax_cross_entropy(Host{}, logits.data(), targets.data(), 4, 10, loss.data(),
                                                 static_cast<float*>(nullptr), 1.0f, {.real_classes = 11});
                  }),
                  "real_classes = 11 is more than the 10 columns of a row");
  EXPECT_MENTIONS(message_of([&] {
                    alloy::softmax_cross_entropy(Host{}, logits.data(), targets.data(), 4, 10, loss.data(),
                                                 static_cast<float*>(nullptr), 1.0f,
                                                 {.real_classes = 8, .ignore_index = 7});
                  }),
                  "the ignore index 7 is a class (in [0, 8))");
}

TEST(SoftmaxCrossEntropyArguments, NoClassesThrows) {
  std::vector<float> logits(4), loss(4);
  std::vector<std::int32_t> targets(4);
  EXPECT_THROW(alloy::softmax_cross_entropy(Host{}, logits.data(), targets.data(), 4, 0, loss.data(),
                                            static_cast<float*>(nullptr), 1.0f),
               alloy::error);
  EXPECT_THROW(alloy::softmax_cross_entropy(Host{}, logits.data(), static_cast<const std::int32_t*>(nullptr), 4, 1,
                                            loss.data(), static_cast<float*>(nullptr), 1.0f),
               alloy::error);
}

}  // namespace
