// column_sums (kernels/column_sums.hpp), a Linear layer's bias gradient. Host: against float64
// sums. Cuda: against the Host on fresh random inputs of odd sizes in fp32, bf16 and fp16, rows
// misaligned by an element and strided rows included, writing and accumulating; bit-for-bit the
// same over two runs. The Cuda sums run in another order than the Host's (parts of rows, 8 warps,
// then the parts), so they agree within
//   |cuda - host| <= 2 ulp of the output dtype at |host| + 1e-5 * sum over the column of |x|.
// column_sums_of_parts, whose Host replays the Cuda kernel's order: Cuda against Host bit for bit.
#include "../support/test_support.hpp"
#include "../support/values.hpp"

#include <alloy/backend/buffer.hpp>
#include <alloy/kernels/column_sums.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using alloy::bf16;
using alloy::Buffer;
using alloy::ColumnSums;
using alloy::Cuda;
using alloy::fp16;
using alloy::Host;
using namespace alloy::test;

template <class T>
double ulp_at(double v) {
  const int min_exponent = std::is_same_v<T, fp16> ? -14 : -126;
  const int exponent = v == 0 ? min_exponent : std::max(std::ilogb(v), min_exponent);
  return std::ldexp(1.0, exponent - alloy::numeric_traits<T>::mantissa_bits);
}

struct Shape {
  std::size_t rows, cols, ld, offset;  // offset: elements before row 0 (misaligns the rows)
};

template <class T>
void check_shape(const Shape& s, bool accumulate, std::mt19937_64& rng) {
  SCOPED_TRACE(std::string(alloy::numeric_traits<T>::name) + " rows " + std::to_string(s.rows) + " cols " +
               std::to_string(s.cols) + " ld " + std::to_string(s.ld) + " offset " + std::to_string(s.offset) +
               (accumulate ? " accumulate" : ""));
  const std::size_t n = s.offset + (s.rows == 0 ? 0 : (s.rows - 1) * s.ld + s.cols);
  const std::vector<T> x = random_values<T>(n, rng);
  const std::vector<T> start = random_values<T>(s.cols, rng);

  std::vector<T> host_out = start;
  alloy::column_sums(Host{}, ColumnSums<T>{x.data() + s.offset, s.rows, s.cols, s.ld, host_out.data(), accumulate});

  Cuda be;
  Buffer<T, Cuda> dx(std::max<std::size_t>(n, 1), be), dout(s.cols, be);
  Buffer<float, Cuda> scratch(std::max<std::size_t>(1, alloy::column_sums_scratch_floats(be, s.rows, s.cols)), be);
  if (n > 0) alloy::copy_from_host(dx, std::span<const T>(x));
  std::vector<std::vector<T>> runs;
  for (int run = 0; run < 2; ++run) {
    alloy::copy_from_host(dout, std::span<const T>(start));
    alloy::column_sums(be, ColumnSums<T>{dx.data() + s.offset, s.rows, s.cols, s.ld, dout.data(), accumulate},
                       scratch.data());
    runs.push_back(alloy::to_host(dout));
  }
  ASSERT_EQ(0, std::memcmp(runs[0].data(), runs[1].data(), s.cols * sizeof(T))) << "two Cuda runs differ";
  BoundCheck check("column sum (Cuda against Host)");
  for (std::size_t j = 0; j < s.cols; ++j) {
    double magnitude = accumulate ? std::fabs(alloy::to_float(start[j])) : 0.0;
    for (std::size_t i = 0; i < s.rows; ++i) magnitude += std::fabs(alloy::to_float(x[s.offset + i * s.ld + j]));
    const double h = alloy::to_float(host_out[j]), c = alloy::to_float(runs[0][j]);
    check.expect(c, h, 2 * ulp_at<T>(std::fabs(h)) + 1e-5 * magnitude, 0, j);
  }
}

template <class T>
class CudaColumnSums : public ::testing::Test {};
using Dtypes = ::testing::Types<float, bf16, fp16>;
TYPED_TEST_SUITE(CudaColumnSums, Dtypes, DtypeName);

TYPED_TEST(CudaColumnSums, MatchHostOnOddAndModelSizes) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const Shape shapes[] = {
      {1, 1, 1, 0},         {0, 5, 5, 0},        {7, 5, 5, 0},        {33, 17, 19, 1},      {257, 24, 24, 0},
      {1000, 768, 768, 0},  {1000, 768, 768, 1}, {4099, 264, 272, 0}, {513, 1000, 1000, 0}, {2048, 4096, 4096, 0},
      {16384, 768, 768, 0}, {3, 4100, 4100, 0},  {129, 8, 8, 0},
  };
  for (const Shape& s : shapes) {
    check_shape<TypeParam>(s, false, rng);
    check_shape<TypeParam>(s, true, rng);
  }
}

// Part counts below, at and past the kernel's 8 warps and GPT-2 124M's (16 sequences of 16 tiles
// of 64 positions), column counts odd, past one block of 32 and GPT-2's 3 x 768; parts of mixed
// magnitudes (a normal draw times 2^e, e in -12..6), so that another order gives other bits.
TYPED_TEST(CudaColumnSums, OfPartsMatchHostBitForBit) {
  using G = TypeParam;
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-12, 6);
  const std::pair<std::size_t, std::size_t> shapes[] = {{1, 1},    {7, 33},     {8, 5},     {9, 40},
                                                        {37, 129}, {256, 2304}, {300, 4097}};
  for (const auto& [parts_count, cols] : shapes) {
    for (bool accumulate : {false, true}) {
      SCOPED_TRACE(std::to_string(parts_count) + " parts of " + std::to_string(cols) + " columns" +
                   (accumulate ? ", accumulating" : ""));
      std::vector<float> parts(parts_count * cols);
      for (float& x : parts) x = std::ldexp(normal(rng), exponent(rng));
      const std::vector<G> start = random_values<G>(cols, rng);
      std::vector<G> host_out = start;
      alloy::column_sums_of_parts(Host{}, parts.data(), parts_count, cols, host_out.data(), accumulate);
      Cuda be;
      Buffer<float, Cuda> dparts(parts.size(), be);
      Buffer<G, Cuda> dout(cols, be);
      alloy::copy_from_host(dparts, std::span<const float>(parts));
      std::vector<std::vector<G>> runs;
      for (int run = 0; run < 2; ++run) {
        alloy::copy_from_host(dout, std::span<const G>(start));
        alloy::column_sums_of_parts(be, static_cast<const float*>(dparts.data()), parts_count, cols, dout.data(),
                                    accumulate);
        runs.push_back(alloy::to_host(dout));
      }
      std::size_t differ = 0, again = 0;
      for (std::size_t j = 0; j < cols; ++j) {
        differ += bits_of(runs[0][j]) != bits_of(host_out[j]);
        again += bits_of(runs[1][j]) != bits_of(runs[0][j]);
      }
      EXPECT_EQ(differ, 0u) << "columns whose bits differ between Cuda and Host";
      EXPECT_EQ(again, 0u) << "columns whose bits differ between two Cuda runs";
    }
  }
}

TEST(CudaColumnSumsOfParts, RefusesNullPointers) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  Buffer<float, Cuda> parts(12), out(4);
  EXPECT_MENTIONS(message_of([&] {
                    alloy::column_sums_of_parts(Cuda{}, static_cast<const float*>(parts.data()), 3, 4,
                                                static_cast<float*>(nullptr), false);
                  }),
                  "column_sums_of_parts(parts_count = 3, cols = 4): out is null");
  EXPECT_MENTIONS(message_of([&] {
                    alloy::column_sums_of_parts(Cuda{}, static_cast<const float*>(nullptr), 3, 4, out.data(), false);
                  }),
                  "parts is null");
}

TEST(HostColumnSums, MatchFloat64SumsAndAccumulate) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const std::size_t rows = 37, cols = 11, ld = 13;
  const std::vector<float> x = random_values<float>(rows * ld, rng);
  std::vector<float> out(cols, 0.5f);
  alloy::column_sums(Host{}, ColumnSums<float>{x.data(), rows, cols, ld, out.data(), true});
  for (std::size_t j = 0; j < cols; ++j) {
    double exact = 0.5;
    for (std::size_t i = 0; i < rows; ++i) exact += x[i * ld + j];
    EXPECT_NEAR(out[j], exact, 1e-5 * (1 + std::fabs(exact))) << "column " << j;
  }
  std::vector<bf16> xb = random_values<bf16>(rows * ld, rng), outb(cols, bf16(7.0f));
  alloy::column_sums(Host{}, ColumnSums<bf16>{xb.data(), rows, cols, ld, outb.data(), false});
  for (std::size_t j = 0; j < cols; ++j) {
    double exact = 0;
    for (std::size_t i = 0; i < rows; ++i) exact += alloy::to_float(xb[i * ld + j]);
    EXPECT_NEAR(alloy::to_float(outb[j]), exact, 2 * ulp_at<bf16>(std::fabs(exact)) + 1e-5 * rows) << "column " << j;
  }
}

TEST(HostColumnSums, RefusesBadArguments) {
  std::vector<float> x(12), out(4);
  EXPECT_THROW(alloy::column_sums(Host{}, ColumnSums<float>{x.data(), 3, 4, 3, out.data(), false}), alloy::error);
  EXPECT_THROW(alloy::column_sums(Host{}, ColumnSums<float>{x.data(), 3, 4, 4, nullptr, false}), alloy::error);
  EXPECT_THROW(alloy::column_sums(Host{}, ColumnSums<float>{nullptr, 3, 4, 4, out.data(), false}), alloy::error);
}

}  // namespace
