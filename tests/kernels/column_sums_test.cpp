// column_sums_of_parts (kernels/column_sums.hpp) on the Host: the fold of per-part column sums in
// the order of Cuda's column_sums_final_kernel (8 warps, warp w adding parts w, w + 8, ... in
// turn, then the warps' sums in order), replayed here from that description, bit for bit, on
// random parts of mixed magnitudes (so that another order gives other bits, which the tests
// check too), in fp32, bf16 and fp16, written and accumulated; and the errors bad arguments raise.
// Cuda against this Host replay is in column_sums_gpu_test.cu.
#include "../support/test_support.hpp"
#include "../support/values.hpp"

#include <alloy/kernels/column_sums.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace {

using alloy::bf16;
using alloy::fp16;
using alloy::Host;
using namespace alloy::test;

// parts_count x cols floats, each a normal draw times 2^e for e uniform in -12..6: sums whose
// value depends on their order.
std::vector<float> mixed_parts(std::size_t parts_count, std::size_t cols, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-12, 6);
  std::vector<float> parts(parts_count * cols);
  for (float& x : parts) x = std::ldexp(normal(rng), exponent(rng));
  return parts;
}

// The fold as column_sums_final_kernel's description gives it: part p goes to warp p % 8.
template <class G>
std::vector<G> replay(const std::vector<float>& parts, std::size_t parts_count, std::size_t cols,
                      const std::vector<G>& start, bool accumulate) {
  std::vector<G> out = start;
  for (std::size_t j = 0; j < cols; ++j) {
    float warps[8] = {};
    for (std::size_t p = 0; p < parts_count; ++p) warps[p % 8] = alloy::fp::add(warps[p % 8], parts[p * cols + j]);
    float total = warps[0];
    for (int w = 1; w < 8; ++w) total = alloy::fp::add(total, warps[w]);
    out[j] = alloy::round_nearest<G>(accumulate ? alloy::fp::add(alloy::to_float(start[j]), total) : total);
  }
  return out;
}

template <class G>
class ColumnSumsOfParts : public ::testing::Test {};
using Dtypes = ::testing::Types<float, bf16, fp16>;
TYPED_TEST_SUITE(ColumnSumsOfParts, Dtypes, DtypeName);

// Part counts below, at and past the 8 warps (GPT-2 124M's 16 sequences of 16 tiles: 256), column
// counts odd and GPT-2's 3 x 768.
TYPED_TEST(ColumnSumsOfParts, HostFoldsInTheCudaKernelsOrder) {
  using G = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const std::pair<std::size_t, std::size_t> shapes[] = {{1, 1}, {7, 33}, {8, 5}, {9, 40}, {37, 129}, {256, 2304}};
  for (const auto& [parts_count, cols] : shapes) {
    for (bool accumulate : {false, true}) {
      SCOPED_TRACE(std::to_string(parts_count) + " parts of " + std::to_string(cols) + " columns" +
                   (accumulate ? ", accumulating" : ""));
      const std::vector<float> parts = mixed_parts(parts_count, cols, rng);
      const std::vector<G> start = random_values<G>(cols, rng);
      std::vector<G> out = start;
      alloy::column_sums_of_parts(Host{}, parts.data(), parts_count, cols, out.data(), accumulate);
      const std::vector<G> want = replay(parts, parts_count, cols, start, accumulate);
      std::size_t differ = 0;
      for (std::size_t j = 0; j < cols; ++j) differ += bits_of(out[j]) != bits_of(want[j]);
      EXPECT_EQ(differ, 0u) << "columns whose bits differ from the replay";
    }
  }
}

// The order is the kernel's, not the parts' own: in fp32, a plain sum of each column in part order
// gives other bits for many columns, and so does the replay with the warps' sums added in reverse.
TEST(ColumnSumsOfPartsOrder, IsNotPartOrder) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const std::size_t parts_count = 256, cols = 2304;
  const std::vector<float> parts = mixed_parts(parts_count, cols, rng);
  std::vector<float> out(cols);
  alloy::column_sums_of_parts(Host{}, parts.data(), parts_count, cols, out.data(), false);
  std::size_t other_than_in_order = 0, other_than_reversed = 0;
  for (std::size_t j = 0; j < cols; ++j) {
    float in_order = 0.0f, warps[8] = {};
    for (std::size_t p = 0; p < parts_count; ++p) {
      in_order = alloy::fp::add(in_order, parts[p * cols + j]);
      warps[p % 8] = alloy::fp::add(warps[p % 8], parts[p * cols + j]);
    }
    float reversed = warps[7];
    for (int w = 6; w >= 0; --w) reversed = alloy::fp::add(reversed, warps[w]);
    other_than_in_order += bits_of(out[j]) != bits_of(in_order);
    other_than_reversed += bits_of(out[j]) != bits_of(reversed);
  }
  EXPECT_GT(other_than_in_order, cols / 10);
  EXPECT_GT(other_than_reversed, cols / 10);
}

TEST(ColumnSumsOfPartsOrder, NoPartsGiveZeroOrLeaveOutAlone) {
  std::vector<bf16> out = {bf16(1.5f), bf16(-2.0f)};
  alloy::column_sums_of_parts(Host{}, static_cast<const float*>(nullptr), 0, 2, out.data(), true);
  EXPECT_EQ(alloy::to_float(out[0]), 1.5f);
  EXPECT_EQ(alloy::to_float(out[1]), -2.0f);
  alloy::column_sums_of_parts(Host{}, static_cast<const float*>(nullptr), 0, 2, out.data(), false);
  EXPECT_EQ(alloy::to_float(out[0]), 0.0f);
  EXPECT_EQ(alloy::to_float(out[1]), 0.0f);
}

TEST(ColumnSumsOfPartsOrder, BadArgumentsNameWhatIsWrong) {
  std::vector<float> parts(12), out(4);
  EXPECT_MENTIONS(
      message_of([&] { alloy::column_sums_of_parts(Host{}, parts.data(), 3, 4, static_cast<float*>(nullptr), false); }),
      "column_sums_of_parts(parts_count = 3, cols = 4): out is null");
  EXPECT_MENTIONS(message_of([&] {
                    alloy::column_sums_of_parts(Host{}, static_cast<const float*>(nullptr), 3, 4, out.data(), false);
                  }),
                  "parts is null; it must point to parts_count * cols = 12 floats");
  EXPECT_NO_THROW(alloy::column_sums_of_parts(Host{}, static_cast<const float*>(nullptr), 3, 0,
                                              static_cast<float*>(nullptr), false));
}

}  // namespace
