// LayerNorm forward and backward at the residual MLP's shape (8192 rows of 1024, bf16), against a
// device-to-device copy of the same bytes; and the backward pass at GPT-2 124M's shape (16384 rows
// of 768: batch 16 x 1024 tokens), with and without dx_add. Both backward shapes are rows of 32 V
// vectors, which take detail::layernorm_backward_lane_columns_kernel. Bytes are DRAM traffic at
// one touch per array:
//   forward   reads x, writes y (2 bytes each per element) and 8 bytes of mean and rstd per row
//   backward  reads dy and x (and dx_add), writes dx, reads mean and rstd; plus its partial sums:
//             parts x 2 cols floats written and read back (2 MB here, from L2)
#include "../support.hpp"

#include <alloy/kernels/layernorm.hpp>

namespace {

using alloy::bf16;
using alloy::Buffer;
using alloy::Cuda;

constexpr std::size_t mlp_rows = 8192, mlp_cols = 1024;

// Fills with random values in [-1, 1) plus `offset`: never time on zeros.
template <class T>
void fill_random(Buffer<T, Cuda>& b, std::uint64_t seed, float offset = 0.0f) {
  alloy::for_each_n(Cuda{}, b.size(), [p = b.data(), seed, offset] __device__(std::size_t i) {
    p[i] = T(static_cast<float>(alloy::random_bits(seed, i)) * 0x1p-31f - 1.0f + offset);
  });
}

struct LayerNormArrays {
  std::size_t rows, cols;
  Buffer<bf16, Cuda> x{rows * cols}, y{rows * cols}, dy{rows * cols}, dx{rows * cols}, dx_add{rows * cols};
  Buffer<bf16, Cuda> gamma{cols}, beta{cols}, dgamma{cols}, dbeta{cols};
  Buffer<float, Cuda> mean{rows}, rstd{rows}, scratch{alloy::layernorm_backward_scratch_floats(rows, cols)};
  LayerNormArrays(std::size_t r, std::size_t c) : rows(r), cols(c) {
    fill_random(x, 1);
    fill_random(dy, 2);
    fill_random(dx_add, 3);
    fill_random(gamma, 4, 1.0f);
    fill_random(beta, 5);
    forward();
  }
  void forward() {
    alloy::layernorm_forward(Cuda{}, x.data(), gamma.data(), beta.data(), y.data(), mean.data(), rstd.data(), rows,
                             cols);
  }
  void backward(bool add) {
    alloy::layernorm_backward(Cuda{}, dy.data(), x.data(), gamma.data(), mean.data(), rstd.data(), dx.data(),
                              dgamma.data(), dbeta.data(), rows, cols, true, scratch.data(),
                              add ? dx_add.data() : nullptr);
  }
};

constexpr double element_bytes = double(mlp_rows) * mlp_cols * sizeof(bf16);
const double partial_bytes = 2.0 * alloy::layernorm_backward_scratch_floats(mlp_rows, mlp_cols) * sizeof(float);

void BM_CopyBf16_8192x1024(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  Buffer<bf16, Cuda> src(mlp_rows * mlp_cols), dst(mlp_rows * mlp_cols);
  fill_random(src, 6);
  alloy::bench::time_with_events(
      state, [&] { ALLOY_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), src.bytes(), cudaMemcpyDeviceToDevice)); });
  alloy::bench::report_bytes(state, 2 * element_bytes);
}

void BM_LayerNormForwardBf16_8192x1024(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  LayerNormArrays a(mlp_rows, mlp_cols);
  alloy::bench::time_with_events(state, [&] { a.forward(); });
  alloy::bench::report_bytes(state, 2 * element_bytes + 8.0 * mlp_rows);
}

void BM_LayerNormBackwardBf16_8192x1024(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  LayerNormArrays a(mlp_rows, mlp_cols);
  alloy::bench::time_with_events(state, [&] { a.backward(false); });
  alloy::bench::report_bytes(state, 3 * element_bytes + 8.0 * mlp_rows + partial_bytes);
}

void BM_LayerNormBackwardWithDxAddBf16_8192x1024(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  LayerNormArrays a(mlp_rows, mlp_cols);
  alloy::bench::time_with_events(state, [&] { a.backward(true); });
  alloy::bench::report_bytes(state, 4 * element_bytes + 8.0 * mlp_rows + partial_bytes);
}

// The backward pass at GPT-2 124M's shape (dx_add when Add, as its blocks call it).
template <bool Add>
void BM_LayerNormBackwardBf16_16384x768(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  constexpr std::size_t rows = 16384, cols = 768;
  LayerNormArrays a(rows, cols);
  alloy::bench::time_with_events(state, [&] { a.backward(Add); });
  const double elements = double(rows) * cols * sizeof(bf16);
  const double partials = 2.0 * alloy::layernorm_backward_scratch_floats(rows, cols) * sizeof(float);
  alloy::bench::report_bytes(state, (Add ? 4 : 3) * elements + 8.0 * rows + partials);
}

#define ALLOY_BANDWIDTH_BENCHMARK(fn) \
  BENCHMARK(fn)                       \
      ->UseManualTime()               \
      ->Unit(benchmark::kMicrosecond) \
      ->MinTime(0.5)                  \
      ->Repetitions(5)                \
      ->ReportAggregatesOnly(true)

#define ALLOY_BANDWIDTH_BENCHMARK_TEMPLATE(fn, ...) \
  BENCHMARK_TEMPLATE(fn, __VA_ARGS__)               \
      ->UseManualTime()                             \
      ->Unit(benchmark::kMicrosecond)               \
      ->MinTime(0.5)                                \
      ->Repetitions(5)                              \
      ->ReportAggregatesOnly(true)

ALLOY_BANDWIDTH_BENCHMARK(BM_CopyBf16_8192x1024);
ALLOY_BANDWIDTH_BENCHMARK(BM_LayerNormForwardBf16_8192x1024);
ALLOY_BANDWIDTH_BENCHMARK(BM_LayerNormBackwardBf16_8192x1024);
ALLOY_BANDWIDTH_BENCHMARK(BM_LayerNormBackwardWithDxAddBf16_8192x1024);
ALLOY_BANDWIDTH_BENCHMARK_TEMPLATE(BM_LayerNormBackwardBf16_16384x768, true);
ALLOY_BANDWIDTH_BENCHMARK_TEMPLATE(BM_LayerNormBackwardBf16_16384x768, false);

}  // namespace

BENCHMARK_MAIN();
