// LayerNorm and softmax cross-entropy on Cuda against the Host backend on the same fresh random
// inputs, placed at the same offsets from 256-byte-aligned buffers so both split rows alike.
// Tolerances, per element, with `scale` the magnitude the element's fp32 rounding errors scale
// with (stated beside each comparison):
//   |cuda - host| <= 2 ulp of the output dtype at |host| + 1e-5 * scale.
// For fp32 outputs that is about 1e-5 relative; for bf16 and fp16 outputs, two units in the last
// place. The two backends run the same fp32 operations in the same order; they differ only where
// the device's expf and logf (within 2 ulp) differ from the host's, which only the softmax uses.
// Every Cuda output must also be bit-for-bit the same over two runs. LayerNorm has no expf or logf:
// its Cuda outputs must be bit-for-bit the Host's.
#include "../support/test_support.hpp"
#include "../support/values.hpp"

#include <alloy/backend/buffer.hpp>
#include <alloy/kernels/layernorm.hpp>
#include <alloy/kernels/softmax_cross_entropy.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using alloy::bf16;
using alloy::Buffer;
using alloy::Cuda;
using alloy::fp16;
using alloy::Host;
using namespace alloy::test;

constexpr double tolerance = 1e-5;

// The spacing of T's values at magnitude v (subnormal spacing below the normal range).
template <class T>
double ulp(double v) {
  const int min_exponent = std::is_same_v<T, fp16> ? -14 : -126;
  const int exponent = v == 0 ? min_exponent : std::max(std::ilogb(v), min_exponent);
  return std::ldexp(1.0, exponent - alloy::numeric_traits<T>::mantissa_bits);
}

// One array on both backends: `offset` poisoned elements, the values, one poisoned element, in a
// host buffer and a device buffer that are both 256-byte aligned.
template <class T>
class Twin {
 public:
  Twin(const std::vector<T>& values, std::size_t offset, Cuda be = {})
      : offset_(offset), size_(values.size()), host_(offset + values.size() + 1), device_(host_.size(), be) {
    std::fill(host_.data(), host_.data() + host_.size(), poison<T>());
    std::copy(values.begin(), values.end(), host_.data() + offset);
    alloy::copy_from_host(device_, std::span<const T>(host_.span()));
  }
  T* host() { return host_.data() + offset_; }
  T* device() { return device_.data() + offset_; }
  std::vector<T> host_values() const { return {host_.data() + offset_, host_.data() + offset_ + size_}; }
  // The device values; the poisoned elements around them must be untouched.
  std::vector<T> device_values(const char* what) const {
    const auto all = alloy::to_host(device_);
    for (std::size_t i = 0; i < all.size(); ++i) {
      if (i >= offset_ && i < offset_ + size_) continue;
      EXPECT_EQ(bits_of(all[i]), bits_of(poison<T>())) << what << " written outside its elements, at " << i;
    }
    return {all.begin() + offset_, all.begin() + offset_ + size_};
  }

 private:
  std::size_t offset_, size_;
  Buffer<T, Host> host_;
  Buffer<T, Cuda> device_;
};

// Counts elements outside tolerance and reports the first few.
class Compare {
 public:
  explicit Compare(std::string what) : what_(std::move(what)) {}
  template <class T>
  void expect(T got, T want, double scale, std::size_t i) {
    const double g = value(got), w = value(want);
    const double bound = 2 * ulp<T>(std::fabs(w)) + tolerance * scale;
    if (std::isnan(w) ? std::isnan(g) : std::fabs(g - w) <= bound) return;
    if (++failures_ <= 5) {
      ADD_FAILURE() << what_ << " at " << i << ": Cuda " << g << ", Host " << w << ", allowed difference " << bound;
    }
  }
  ~Compare() {
    if (failures_ > 5) ADD_FAILURE() << what_ << ": " << failures_ << " elements out of tolerance in all";
  }

 private:
  std::string what_;
  int failures_ = 0;
};

template <class T>
void expect_same_bits(const std::vector<T>& a, const std::vector<T>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  std::size_t differ = 0;
  for (std::size_t i = 0; i < a.size(); ++i) differ += bits_of(a[i]) != bits_of(b[i]);
  EXPECT_EQ(differ, 0u) << what << ": elements whose bits differ";
}

template <class T>
class CudaRowKernels : public ::testing::Test {};

using Dtypes = ::testing::Types<bf16, fp16, float>;
TYPED_TEST_SUITE(CudaRowKernels, Dtypes, DtypeName);

// ---- LayerNorm ----

// rows x cols, with the row-indexed arrays (x, y, dy, dx) `row_offset` elements past a 256-byte
// boundary and gamma and beta `param_offset` past one: equal offsets with cols a multiple of a
// 16-byte vector take the vector path (with a scalar head when the offset is not 0), anything
// else the scalar one.
struct LayerNormCase {
  std::size_t rows, cols;
  std::size_t row_offset = 0, param_offset = 0;
};

std::string describe(const char* dtype, const LayerNormCase& s) {
  return std::string(dtype) + " rows=" + std::to_string(s.rows) + " cols=" + std::to_string(s.cols) + " offsets " +
         std::to_string(s.row_offset) + "/" + std::to_string(s.param_offset);
}

// Odd widths, one column, whole vectors (with and without a head), a width whose backward keeps
// its column sums in 64 KiB of shared memory (1000: 8 warps), in 80 KB (10000: one warp, above
// the default 48 KiB), and in scratch (40000: 320 KB, more than a block's shared memory), 17001
// rows, whose 256 parts of 67 rows leave the last two empty, and rows of 32 V vectors from a
// 16-byte boundary, which the kernels keep in registers (256, 512, 768, 1024; for float the
// forward up to 1024, the backward up to 512), among them the profiled 8192 x 1024 and parts
// with fewer rows than warps (8 x 1024). Offsets of 8 keep bf16 and fp16 rows on a 16-byte
// boundary; offsets of 4 keep float's.
const LayerNormCase layernorm_cases[] = {
    {37, 29},    {37, 1000},      {37, 1},      {4096, 1024},     {64, 768, 1, 1}, {64, 768, 1, 0},  {3, 8193},
    {16, 10000}, {20, 40000},     {17001, 3},   {33, 1024, 3, 3}, {8192, 1024},    {300, 768, 8, 8}, {100, 256, 4, 4},
    {8, 1024},   {50, 512, 4, 4}, {1000, 5000}, {21, 3, 1, 1},    {130, 2048}};

template <class T>
struct LayerNormData {
  std::vector<T> x, gamma, beta, dy, dgamma0, dbeta0, dx_add, add_sums0;
  LayerNormData(const LayerNormCase& s, std::mt19937_64& rng)
      : x(normal<T>(s.rows * s.cols, 0.5, 2.0, rng)),
        gamma(normal<T>(s.cols, 1.0, 0.5, rng)),
        beta(normal<T>(s.cols, 0.0, 1.0, rng)),
        dy(normal<T>(s.rows * s.cols, 0.0, 1.0, rng)),
        dgamma0(normal<T>(s.cols, 0.0, 3.0, rng)),
        dbeta0(normal<T>(s.cols, 0.0, 3.0, rng)),
        dx_add(normal<T>(s.rows * s.cols, 0.0, 1.0, rng)),
        add_sums0(normal<T>(s.cols, 0.0, 3.0, rng)) {}
};

// What the backward adds to dx: nothing, a separate array, or dx's own contents (in place); or
// nothing, with dx written over dy (over_dy).
enum class DxAdd { none, apart, in_place, over_dy };

// Every array of one LayerNorm forward and backward, on both backends.
template <class T>
struct LayerNormTwins {
  Twin<T> x, gamma, beta, y, dy, dx, dgamma, dbeta, dx_add, add_sums;
  Twin<float> mean, rstd;
  Buffer<float, Cuda> scratch;
  std::size_t rows, cols;
  DxAdd add;
  bool sums;  // dx_add's column sums asked for (with dx_add apart or in place)

  LayerNormTwins(const LayerNormCase& s, const LayerNormData<T>& d, bool accumulate, Cuda be = {},
                 DxAdd add = DxAdd::none, bool sums = false)
      : x(d.x, s.row_offset, be),
        gamma(d.gamma, s.param_offset, be),
        beta(d.beta, s.param_offset, be),
        y(std::vector<T>(d.x.size(), poison<T>()), s.row_offset, be),
        dy(d.dy, s.row_offset, be),
        dx(add == DxAdd::in_place  ? d.dx_add
           : add == DxAdd::over_dy ? d.dy
                                   : std::vector<T>(d.x.size(), poison<T>()),
           s.row_offset, be),
        dgamma(accumulate ? d.dgamma0 : std::vector<T>(s.cols, poison<T>()), s.param_offset, be),
        dbeta(accumulate ? d.dbeta0 : std::vector<T>(s.cols, poison<T>()), s.param_offset, be),
        dx_add(d.dx_add, s.row_offset, be),
        add_sums(accumulate ? d.add_sums0 : std::vector<T>(s.cols, poison<T>()), s.param_offset, be),
        mean(std::vector<float>(s.rows, poison<float>()), 0, be),
        rstd(std::vector<float>(s.rows, poison<float>()), 0, be),
        scratch(alloy::layernorm_backward_scratch_floats(s.rows, s.cols), be),
        rows(s.rows),
        cols(s.cols),
        add(add),
        sums(sums) {
    // NaN everywhere: the kernels must not rely on scratch starting at zero.
    ALLOY_CUDA_CHECK(cudaMemsetAsync(scratch.data(), 0xff, scratch.bytes(), be.stream));
  }

  void run_host(float eps, bool accumulate) {
    alloy::layernorm_forward(Host{}, x.host(), gamma.host(), beta.host(), y.host(), mean.host(), rstd.host(), rows,
                             cols, eps);
    alloy::layernorm_backward(Host{}, add == DxAdd::over_dy ? dx.host() : dy.host(), x.host(), gamma.host(),
                              mean.host(), rstd.host(), dx.host(), dgamma.host(), dbeta.host(), rows, cols, accumulate,
                              static_cast<float*>(nullptr),
                              add == DxAdd::none || add == DxAdd::over_dy ? nullptr
                              : add == DxAdd::apart                       ? dx_add.host()
                                                                          : dx.host(),
                              sums ? add_sums.host() : nullptr);
  }
  void run_cuda(Cuda be, float eps, bool accumulate) {
    alloy::layernorm_forward(be, x.device(), gamma.device(), beta.device(), y.device(), mean.device(), rstd.device(),
                             rows, cols, eps);
    const T* const dy_in = add == DxAdd::over_dy ? dx.device() : dy.device();
    const T* const add_to = add == DxAdd::none || add == DxAdd::over_dy ? nullptr
                            : add == DxAdd::apart                       ? dx_add.device()
                                                                        : dx.device();
    alloy::layernorm_backward(be, dy_in, x.device(), gamma.device(), mean.device(), rstd.device(), dx.device(),
                              dgamma.device(), dbeta.device(), rows, cols, accumulate, scratch.data(), add_to,
                              sums ? add_sums.device() : nullptr);
    alloy::synchronize(be);
  }
};

// Scales (from the Host's inputs and statistics), with xhat = (x - mean) rstd, g = dy gamma,
// A = mean(g), B = mean(g xhat); m = (|x| + |mean|) rstd bounds how x - mean's rounding grows:
//   mean: mean|x|    rstd: rstd    y: m |gamma| + |beta|
//   dx: rstd (|g| + |A| + m |B|) + |xhat| rstd mean(|g| m)
//   dgamma: sum over rows of |dy| m (+ |old dgamma|)    dbeta: sum of |dy| (+ |old dbeta|)
template <class T>
void expect_layernorm_cuda_matches_host(const LayerNormCase& s, std::uint64_t seed, bool accumulate, Cuda be = {},
                                        DxAdd add = DxAdd::none, bool sums = false) {
  SCOPED_TRACE(describe(alloy::numeric_traits<T>::name, s) + (accumulate ? " accumulating" : " overwriting") +
               (add == DxAdd::apart      ? ", adding dx_add"
                : add == DxAdd::in_place ? ", adding dx in place"
                : add == DxAdd::over_dy  ? ", dx written over dy"
                                         : "") +
               (sums ? ", summing its columns" : ""));
  std::mt19937_64 rng(seed);
  const LayerNormData<T> d(s, rng);
  LayerNormTwins<T> t(s, d, accumulate, be, add, sums);
  const float eps = 1e-5f;
  t.run_host(eps, accumulate);
  try {
    t.run_cuda(be, eps, accumulate);
  } catch (const alloy::error& e) {
    ADD_FAILURE() << e.what();
    return;
  }

  const auto mean = t.mean.host_values(), rstd = t.rstd.host_values();
  const auto y = t.y.host_values(), dx = t.dx.host_values(), dgamma = t.dgamma.host_values(),
             dbeta = t.dbeta.host_values();
  const auto cuda_mean = t.mean.device_values("mean"), cuda_rstd = t.rstd.device_values("rstd");
  const auto cuda_y = t.y.device_values("y"), cuda_dx = t.dx.device_values("dx");
  const auto cuda_dgamma = t.dgamma.device_values("dgamma"), cuda_dbeta = t.dbeta.device_values("dbeta");
  expect_same_bits(cuda_mean, mean, "mean (Cuda against Host)");
  expect_same_bits(cuda_rstd, rstd, "rstd (Cuda against Host)");
  expect_same_bits(cuda_y, y, "y (Cuda against Host)");
  expect_same_bits(cuda_dx, dx, "dx (Cuda against Host)");
  expect_same_bits(cuda_dgamma, dgamma, "dgamma (Cuda against Host)");
  expect_same_bits(cuda_dbeta, dbeta, "dbeta (Cuda against Host)");
  if (sums) {
    // dx_add's column sums: the Host's bits, and within fp32 summation error of the exact sums
    // (plus the old values when accumulating), rounded once.
    const auto host_sums = t.add_sums.host_values();
    expect_same_bits(t.add_sums.device_values("dx_add's column sums"), host_sums,
                     "dx_add's column sums (Cuda against Host)");
    Compare sums_check("dx_add's column sums against exact ones");
    for (std::size_t c = 0; c < s.cols; ++c) {
      double exact = accumulate ? value(d.add_sums0[c]) : 0.0, scale = std::fabs(exact);
      for (std::size_t r = 0; r < s.rows; ++r) {
        exact += value(d.dx_add[r * s.cols + c]);
        scale += std::fabs(value(d.dx_add[r * s.cols + c]));
      }
      sums_check.expect(host_sums[c], alloy::round_nearest<T>(static_cast<float>(exact)), scale, c);
    }
  }
  if (add == DxAdd::apart || add == DxAdd::in_place) return;  // the tolerances below are for LayerNorm's own dx

  Compare mean_check("mean"), rstd_check("rstd"), y_check("y"), dx_check("dx"), dgamma_check("dgamma"),
      dbeta_check("dbeta");
  std::vector<double> dgamma_scale(s.cols, 0.0), dbeta_scale(s.cols, 0.0);
  if (accumulate) {
    for (std::size_t c = 0; c < s.cols; ++c) {
      dgamma_scale[c] = std::fabs(value(d.dgamma0[c]));
      dbeta_scale[c] = std::fabs(value(d.dbeta0[c]));
    }
  }
  for (std::size_t r = 0; r < s.rows; ++r) {
    const double mu = mean[r], rs = rstd[r];
    double abs_x = 0, A = 0, B = 0, gm = 0;
    std::vector<double> m(s.cols), xhat(s.cols), g(s.cols);
    for (std::size_t c = 0; c < s.cols; ++c) {
      const double xv = value(d.x[r * s.cols + c]);
      abs_x += std::fabs(xv);
      m[c] = (std::fabs(xv) + std::fabs(mu)) * rs;
      xhat[c] = (xv - mu) * rs;
      g[c] = value(d.dy[r * s.cols + c]) * value(d.gamma[c]);
      A += g[c], B += g[c] * xhat[c], gm += std::fabs(g[c]) * m[c];
    }
    A /= double(s.cols), B /= double(s.cols), gm /= double(s.cols);
    mean_check.expect(cuda_mean[r], mean[r], abs_x / double(s.cols), r);
    rstd_check.expect(cuda_rstd[r], rstd[r], rs, r);
    for (std::size_t c = 0; c < s.cols; ++c) {
      const std::size_t i = r * s.cols + c;
      y_check.expect(cuda_y[i], y[i], m[c] * std::fabs(value(d.gamma[c])) + std::fabs(value(d.beta[c])), i);
      dx_check.expect(cuda_dx[i], dx[i],
                      rs * (std::fabs(g[c]) + std::fabs(A) + m[c] * std::fabs(B)) + std::fabs(xhat[c]) * rs * gm, i);
      const double dyv = std::fabs(value(d.dy[i]));
      dgamma_scale[c] += dyv * m[c];
      dbeta_scale[c] += dyv;
    }
  }
  for (std::size_t c = 0; c < s.cols; ++c) {
    dgamma_check.expect(cuda_dgamma[c], dgamma[c], dgamma_scale[c], c);
    dbeta_check.expect(cuda_dbeta[c], dbeta[c], dbeta_scale[c], c);
  }
}

TYPED_TEST(CudaRowKernels, LayerNormMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const LayerNormCase& s : layernorm_cases) {
    expect_layernorm_cuda_matches_host<TypeParam>(s, seed + s.cols, false);
  }
}

TYPED_TEST(CudaRowKernels, LayerNormBackwardAccumulatesLikeHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const LayerNormCase& s : {LayerNormCase{37, 29}, LayerNormCase{4096, 1024}, LayerNormCase{64, 768, 1, 1},
                                 LayerNormCase{20, 40000}, LayerNormCase{17001, 3}, LayerNormCase{300, 768, 8, 8}}) {
    expect_layernorm_cuda_matches_host<TypeParam>(s, seed + s.cols, true);
  }
}

TYPED_TEST(CudaRowKernels, LayerNormBackwardAddsDxAddLikeHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const LayerNormCase& s : layernorm_cases) {
    expect_layernorm_cuda_matches_host<TypeParam>(s, seed + s.cols, false, Cuda{}, DxAdd::apart);
  }
  for (const LayerNormCase& s :
       {LayerNormCase{37, 29}, LayerNormCase{8192, 1024}, LayerNormCase{64, 768, 1, 1}, LayerNormCase{1000, 5000}}) {
    expect_layernorm_cuda_matches_host<TypeParam>(s, seed + s.cols, true, Cuda{}, DxAdd::in_place);
  }
}

// dx_add's column sums (a residual block's last projection's bias gradient, nn::Sequential) on
// every path: the widths of layernorm_cases (scalar and vector rows, sums in 64 KiB, in more, in
// scratch), the lane-columns kernel's widths (32 V vectors), overwriting and accumulating, dx_add
// apart and in place.
TYPED_TEST(CudaRowKernels, LayerNormBackwardSumsDxAddColumnsLikeHost) {
  using T = TypeParam;
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const LayerNormCase& s : layernorm_cases) {
    expect_layernorm_cuda_matches_host<T>(s, seed + s.cols, false, Cuda{}, DxAdd::apart, true);
  }
  constexpr std::size_t L = alloy::detail::row_vector_lanes<T>;
  for (std::size_t v = 1; v <= std::size_t(alloy::detail::layernorm_max_backward_lane_vectors); ++v) {
    const std::size_t cols = 32 * L * v;
    expect_layernorm_cuda_matches_host<T>({3000, cols}, seed + cols, false, Cuda{}, DxAdd::apart, true);
    expect_layernorm_cuda_matches_host<T>({3001, cols, 8, 8}, seed + cols + 1, true, Cuda{}, DxAdd::in_place, true);
    expect_layernorm_cuda_matches_host<T>({9, cols}, seed + cols + 2, true, Cuda{}, DxAdd::apart, true);
  }
  expect_layernorm_cuda_matches_host<T>({1000, 5000}, seed + 5000, true, Cuda{}, DxAdd::in_place, true);
}

// The backward kernel for rows of 32 V vectors (V = 1..4, from a 16-byte boundary or 8 elements
// past it) gives the Host's bits: overwriting without dx_add, accumulating with dx_add apart and
// in place. 3000 rows: 256 parts of 12 rows, the last ones empty, 1 or 2 rows per warp; 8 rows:
// fewer rows than warps.
TYPED_TEST(CudaRowKernels, LayerNormBackwardLaneColumnsKernelMatchesHost) {
  using T = TypeParam;
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  constexpr std::size_t L = alloy::detail::row_vector_lanes<T>;
  for (std::size_t v = 1; v <= std::size_t(alloy::detail::layernorm_max_backward_lane_vectors); ++v) {
    const std::size_t cols = 32 * L * v;
    expect_layernorm_cuda_matches_host<T>({3000, cols}, seed + cols, false, Cuda{}, DxAdd::none);
    expect_layernorm_cuda_matches_host<T>({3000, cols, 8, 8}, seed + cols + 1, true, Cuda{}, DxAdd::apart);
    expect_layernorm_cuda_matches_host<T>({3000, cols}, seed + cols + 2, true, Cuda{}, DxAdd::in_place);
    expect_layernorm_cuda_matches_host<T>({8, cols}, seed + cols + 3, false, Cuda{}, DxAdd::apart);
  }
}

// dx written over dy (a Sequential's LayerNorm whose dy nothing reads afterwards): the lane-columns
// (rows in registers), shared-memory, scratch and scalar paths, as the Host gives them (whose in-place bits equal its
// separate dx: row_kernels_test.cpp).
TYPED_TEST(CudaRowKernels, LayerNormBackwardWritesDxOverDyLikeHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const LayerNormCase& s : {LayerNormCase{37, 29}, LayerNormCase{8192, 1024}, LayerNormCase{64, 768, 1, 1},
                                 LayerNormCase{1000, 5000}, LayerNormCase{20, 40000}, LayerNormCase{300, 768, 8, 8}}) {
    expect_layernorm_cuda_matches_host<TypeParam>(s, seed + s.cols, false, Cuda{}, DxAdd::over_dy);
  }
}

TYPED_TEST(CudaRowKernels, LayerNormRunsTwiceToTheSameBits) {
  using T = TypeParam;
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const LayerNormCase& s : {LayerNormCase{4096, 1024}, LayerNormCase{64, 768, 1, 0}, LayerNormCase{20, 40000},
                                 LayerNormCase{8192, 1024}, LayerNormCase{1000, 5000}}) {
    SCOPED_TRACE(describe(alloy::numeric_traits<T>::name, s));
    std::mt19937_64 rng(seed + s.cols);
    const LayerNormData<T> d(s, rng);
    LayerNormTwins<T> first(s, d, true), second(s, d, true);
    first.run_cuda(Cuda{}, 1e-5f, true);
    second.run_cuda(Cuda{}, 1e-5f, true);
    expect_same_bits(first.y.device_values("y"), second.y.device_values("y"), "y");
    expect_same_bits(first.mean.device_values("mean"), second.mean.device_values("mean"), "mean");
    expect_same_bits(first.rstd.device_values("rstd"), second.rstd.device_values("rstd"), "rstd");
    expect_same_bits(first.dx.device_values("dx"), second.dx.device_values("dx"), "dx");
    expect_same_bits(first.dgamma.device_values("dgamma"), second.dgamma.device_values("dgamma"), "dgamma");
    expect_same_bits(first.dbeta.device_values("dbeta"), second.dbeta.device_values("dbeta"), "dbeta");
  }
}

// ---- softmax cross-entropy ----

// rows x classes; logits `logits_offset` and dlogits `grad_offset` elements past a 256-byte
// boundary (equal offsets split rows into vectors, unequal ones keep every access scalar).
struct LossCase {
  std::size_t rows, classes;
  std::size_t logits_offset = 0, grad_offset = 0;
  double spread = 3.0;  // logits ~ N(0, spread), or uniform in +-80 when 0
};

std::string describe(const char* dtype, const LossCase& s) {
  return std::string(dtype) + " rows=" + std::to_string(s.rows) + " classes=" + std::to_string(s.classes) +
         " offsets " + std::to_string(s.logits_offset) + "/" + std::to_string(s.grad_offset) +
         (s.spread > 0 ? " logits ~ N(0, " + std::to_string(s.spread) + ")" : " logits in +-80");
}

const LossCase loss_cases[] = {{37, 29},
                               {37, 1000},
                               {37, 1},
                               {256, 50257},
                               {64, 32000, 1, 1},
                               {64, 32000, 1, 0},
                               {64, 50257, 3, 3},
                               {37, 1000, 0, 0, 0.0},
                               {128, 50257, 0, 0, 0.0}};

template <class T>
struct LossTwins {
  Twin<T> logits, dlogits;
  Twin<std::int32_t> targets;
  Twin<float> loss;
  LossCase shape;
  float grad_scale;

  LossTwins(const LossCase& s, const std::vector<T>& x, const std::vector<std::int32_t>& t, Cuda be = {})
      : logits(x, s.logits_offset, be),
        dlogits(std::vector<T>(x.size(), poison<T>()), s.grad_offset, be),
        targets(t, 0, be),
        loss(std::vector<float>(s.rows, poison<float>()), 0, be),
        shape(s),
        grad_scale(65536.0f / static_cast<float>(s.rows)) {}  // loss_scale / rows

  void run_host(bool gradient = true) {
    alloy::softmax_cross_entropy(Host{}, logits.host(), targets.host(), shape.rows, shape.classes, loss.host(),
                                 gradient ? dlogits.host() : nullptr, grad_scale);
  }
  void run_cuda(Cuda be, bool gradient = true) {
    alloy::softmax_cross_entropy(be, logits.device(), targets.device(), shape.rows, shape.classes, loss.device(),
                                 gradient ? dlogits.device() : nullptr, grad_scale);
    alloy::synchronize(be);
  }
};

template <class T>
std::vector<T> logits_for(const LossCase& s, std::mt19937_64& rng) {
  return s.spread > 0 ? normal<T>(s.rows * s.classes, 0.0, s.spread, rng)
                      : uniform<T>(s.rows * s.classes, -80.0, 80.0, rng);
}

// Scales: the loss, 1 + |loss| (its two terms log(sum) and max - x[t] are both >= 0); dlogits,
// |grad_scale| (p + onehot) with p the Host's probability, but no less than |grad_scale| 1e-6:
// the device's expf loses relative accuracy where exp(x - max) approaches the float minimum
// (seen on the H200: 2e-5 relative at 1e-37), far below anything a gradient can carry.
template <class T>
void expect_loss_cuda_matches_host(const LossCase& s, std::uint64_t seed, Cuda be = {}) {
  SCOPED_TRACE(describe(alloy::numeric_traits<T>::name, s));
  std::mt19937_64 rng(seed);
  const auto x = logits_for<T>(s, rng);
  LossTwins<T> t(s, x, random_targets(s.rows, s.classes, rng), be);
  t.run_host();
  try {
    t.run_cuda(be);
  } catch (const alloy::error& e) {
    ADD_FAILURE() << e.what();
    return;
  }
  const auto loss = t.loss.host_values();
  const auto dlogits = t.dlogits.host_values();
  const auto cuda_loss = t.loss.device_values("row_loss");
  const auto cuda_dlogits = t.dlogits.device_values("dlogits");
  const auto targets = t.targets.host_values();
  Compare loss_check("row_loss"), grad_check("dlogits");
  for (std::size_t r = 0; r < s.rows; ++r) {
    loss_check.expect(cuda_loss[r], loss[r], 1.0 + std::fabs(loss[r]), r);
    for (std::size_t c = 0; c < s.classes; ++c) {
      const std::size_t i = r * s.classes + c;
      const double onehot = c == std::size_t(targets[r]) ? 1.0 : 0.0;
      const double p = std::fabs(value(dlogits[i]) / t.grad_scale + onehot);
      grad_check.expect(cuda_dlogits[i], dlogits[i], std::fabs(t.grad_scale) * std::max(p + onehot, 1e-6), i);
    }
  }
}

TYPED_TEST(CudaRowKernels, SoftmaxCrossEntropyMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const LossCase& s : loss_cases) expect_loss_cuda_matches_host<TypeParam>(s, seed + s.classes);
}

TYPED_TEST(CudaRowKernels, SoftmaxCrossEntropyRunsTwiceToTheSameBits) {
  using T = TypeParam;
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const LossCase& s : {LossCase{512, 50257}, LossCase{64, 32000, 1, 0}}) {
    SCOPED_TRACE(describe(alloy::numeric_traits<T>::name, s));
    std::mt19937_64 rng(seed + s.classes);
    const auto x = logits_for<T>(s, rng);
    const auto targets = random_targets(s.rows, s.classes, rng);
    LossTwins<T> first(s, x, targets), second(s, x, targets);
    first.run_cuda(Cuda{});
    second.run_cuda(Cuda{});
    expect_same_bits(first.loss.device_values("row_loss"), second.loss.device_values("row_loss"), "row_loss");
    expect_same_bits(first.dlogits.device_values("dlogits"), second.dlogits.device_values("dlogits"), "dlogits");
  }
}

TYPED_TEST(CudaRowKernels, SoftmaxCrossEntropyMarksOutOfRangeTargetsWithNaN) {
  using T = TypeParam;
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LossCase s{6, 50};
  const std::vector<std::int32_t> targets = {
      3, -1, 50, std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max(), 49};
  LossTwins<T> t(s, logits_for<T>(s, rng), targets);
  t.run_host();
  t.run_cuda(Cuda{});
  const auto loss = t.loss.device_values("row_loss");
  const auto dlogits = t.dlogits.device_values("dlogits");
  const auto host_loss = t.loss.host_values();
  for (std::size_t r = 0; r < s.rows; ++r) {
    const bool valid = targets[r] >= 0 && targets[r] < 50;
    EXPECT_EQ(std::isnan(loss[r]), !valid) << "row " << r << ", target " << targets[r];
    if (valid) {
      EXPECT_NEAR(loss[r], host_loss[r], tolerance * (1 + std::fabs(host_loss[r]))) << "row " << r;
    }
    for (std::size_t c = 0; c < s.classes; ++c) {
      ASSERT_EQ(std::isnan(value(dlogits[r * s.classes + c])), !valid) << "row " << r << ", class " << c;
    }
  }
}

TYPED_TEST(CudaRowKernels, SoftmaxCrossEntropyWithoutGradientWritesTheSameLossAndNoGradient) {
  using T = TypeParam;
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const LossCase s{37, 1000, 1, 1};
  const auto x = logits_for<T>(s, rng);
  const auto targets = random_targets(s.rows, s.classes, rng);
  LossTwins<T> with(s, x, targets), without(s, x, targets);
  with.run_cuda(Cuda{}, true);
  without.run_cuda(Cuda{}, false);
  expect_same_bits(with.loss.device_values("row_loss"), without.loss.device_values("row_loss"), "row_loss");
  for (const T& d : without.dlogits.device_values("dlogits")) ASSERT_EQ(bits_of(d), bits_of(poison<T>()));
}

// A language-model head's rows: vocab 50257 padded to 50304 and 97 to 101, NaN in the padding
// (never read), ignored rows, and the gradient written over the logits (in place) on the device
// and into a separate buffer on the Host: the same values as the Host within the tolerances
// above; padding and ignored rows exactly zero.
TYPED_TEST(CudaRowKernels, SoftmaxCrossEntropyWithPaddingIgnoredRowsAndInPlaceMatchesHost) {
  using T = TypeParam;
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (auto [rows, real, padded] :
       {std::tuple<std::size_t, std::size_t, std::size_t>{37, 97, 101}, {64, 50257, 50304}}) {
    SCOPED_TRACE(std::string(alloy::numeric_traits<T>::name) + " rows " + std::to_string(rows) + ", classes " +
                 std::to_string(real) + " padded to " + std::to_string(padded));
    std::mt19937_64 rng(seed + real);
    auto x = normal<T>(rows * padded, 0.0, 3.0, rng);
    for (std::size_t r = 0; r < rows; ++r) {
      for (std::size_t c = real; c < padded; ++c)
        x[r * padded + c] = alloy::round_nearest<T>(std::numeric_limits<float>::quiet_NaN());
    }
    auto targets = random_targets(rows, real, rng);
    targets[3] = targets[rows - 1] = -1;
    const alloy::SoftmaxCrossEntropyOptions options{.real_classes = real, .ignore_index = -1};
    const float grad_scale = 1024.0f / static_cast<float>(rows);
    Twin<T> logits(x, 0), dlogits(std::vector<T>(x.size(), poison<T>()), 0);
    Twin<std::int32_t> t(targets, 0);
    Twin<float> loss(std::vector<float>(rows, poison<float>()), 0);
    alloy::softmax_cross_entropy(Host{}, logits.host(), t.host(), rows, padded, loss.host(), dlogits.host(), grad_scale,
                                 options);
    alloy::softmax_cross_entropy(Cuda{}, logits.device(), t.device(), rows, padded, loss.device(), logits.device(),
                                 grad_scale, options);
    const auto host_loss = loss.host_values();
    const auto host_dlogits = dlogits.host_values();
    const auto cuda_loss = loss.device_values("row_loss");
    const auto cuda_dlogits = logits.device_values("dlogits, in place");
    Compare loss_check("row_loss"), grad_check("dlogits");
    for (std::size_t r = 0; r < rows; ++r) {
      const bool ignored = targets[r] == -1;
      loss_check.expect(cuda_loss[r], host_loss[r], 1.0 + std::fabs(host_loss[r]), r);
      if (ignored) EXPECT_EQ(cuda_loss[r], 0.0f) << "row " << r;
      for (std::size_t c = 0; c < padded; ++c) {
        const std::size_t i = r * padded + c;
        if (ignored || c >= real) {
          ASSERT_EQ(value(cuda_dlogits[i]), 0.0) << "row " << r << ", column " << c;
          continue;
        }
        const double onehot = c == std::size_t(targets[r]) ? 1.0 : 0.0;
        const double p = std::fabs(value(host_dlogits[i]) / grad_scale + onehot);
        grad_check.expect(cuda_dlogits[i], host_dlogits[i], std::fabs(grad_scale) * std::max(p + onehot, 1e-6), i);
      }
    }
  }
}

// Everything ordered on a caller's non-blocking stream: buffers, kernels, scratch.
TEST(CudaRowKernelsStreams, RunOnTheCallersStream) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  cudaStream_t stream = nullptr;
  ALLOY_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  expect_layernorm_cuda_matches_host<bf16>({256, 1024}, seed, true, Cuda::on(stream));
  expect_loss_cuda_matches_host<bf16>({64, 50257}, seed + 1, Cuda::on(stream));
  ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
  ALLOY_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST(CudaRowKernelsArguments, NullScratchThrowsBeforeLaunching) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  Buffer<float, Cuda> v(12), stats(3);
  try {
    alloy::layernorm_backward(Cuda{}, v.data(), v.data(), v.data(), stats.data(), stats.data(), v.data(), v.data(),
                              v.data(), 3, 4, false, nullptr);
    ADD_FAILURE() << "a null scratch was accepted";
  } catch (const alloy::error& e) {
    EXPECT_NE(std::string(e.what()).find("layernorm_backward_scratch_floats(3, 4)"), std::string::npos) << e.what();
  }
}

}  // namespace
