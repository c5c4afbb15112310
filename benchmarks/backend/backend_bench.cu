// The backend's element-wise and reduction kernels against the device-to-device copy ceiling,
// on 1 GiB arrays. bench_table.py turns the JSON into ratios against BM_MemcpyDeviceToDevice.
#include "../support.hpp"

namespace {

using alloy::bf16;
using alloy::Buffer;
using alloy::Cuda;

constexpr std::size_t gib = std::size_t(1) << 30;

// Fills with random values in [-1, 1): never time on zeros.
template <class T>
void fill_random(Buffer<T, Cuda>& b, std::uint64_t seed) {
  alloy::for_each_n(Cuda{}, b.size(), [p = b.data(), seed] __device__(std::size_t i) {
    p[i] = T(static_cast<float>(alloy::random_bits(seed, i)) * 0x1p-31f - 1.0f);
  });
}

struct Copy {
  __device__ void operator()(const float& x, float& y) const { y = x; }
};
struct Square {
  __device__ float operator()(const bf16& x) const {
    const float v = static_cast<float>(x);
    return v * v;
  }
};

void BM_MemcpyDeviceToDevice(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  const std::size_t n = gib / sizeof(float);
  Buffer<float, Cuda> src(n), dst(n);
  fill_random(src, 1);
  alloy::bench::time_with_events(
      state, [&] { ALLOY_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), src.bytes(), cudaMemcpyDeviceToDevice)); });
  alloy::bench::report_bytes(state, 2.0 * gib);  // read + written
}

void BM_ForEachCopyFloat(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  const std::size_t n = gib / sizeof(float);
  Buffer<float, Cuda> src(n), dst(n);
  fill_random(src, 2);
  alloy::bench::time_with_events(
      state, [&] { alloy::for_each_n(Cuda{}, n, Copy{}, alloy::in(src.data()), alloy::out(dst.data())); });
  if (alloy::to_host(dst)[n / 3] != alloy::to_host(src)[n / 3]) state.SkipWithError("copy is wrong");
  alloy::bench::report_bytes(state, 2.0 * gib);
}

void BM_ReduceSumFloat(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  const std::size_t n = gib / sizeof(float);
  Buffer<float, Cuda> src(n), result(1);
  fill_random(src, 3);
  const std::size_t ws_bytes = alloy::reduce_workspace_bytes<float>(Cuda{});
  Buffer<std::byte, Cuda> ws(ws_bytes);
  alloy::bench::time_with_events(state, [&] {
    alloy::transform_reduce_async(Cuda{}, ws.data(), ws_bytes, result.data(), n, 0.0f, alloy::Sum{},
                                  alloy::ToAccumulator{}, alloy::in(src.data()));
  });
  alloy::bench::report_bytes(state, 1.0 * gib);  // read only
}

void BM_ReduceSumOfSquaresBf16(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  const std::size_t n = gib / sizeof(bf16);
  Buffer<bf16, Cuda> src(n);
  Buffer<float, Cuda> result(1);
  fill_random(src, 4);
  const std::size_t ws_bytes = alloy::reduce_workspace_bytes<float>(Cuda{});
  Buffer<std::byte, Cuda> ws(ws_bytes);
  alloy::bench::time_with_events(state, [&] {
    alloy::transform_reduce_async(Cuda{}, ws.data(), ws_bytes, result.data(), n, 0.0f, alloy::Sum{}, Square{},
                                  alloy::in(src.data()));
  });
  alloy::bench::report_bytes(state, 1.0 * gib);
}

#define ALLOY_BANDWIDTH_BENCHMARK(fn) \
  BENCHMARK(fn)                       \
      ->UseManualTime()               \
      ->Unit(benchmark::kMillisecond) \
      ->MinTime(0.5)                  \
      ->Repetitions(5)                \
      ->ReportAggregatesOnly(true)

ALLOY_BANDWIDTH_BENCHMARK(BM_MemcpyDeviceToDevice);
ALLOY_BANDWIDTH_BENCHMARK(BM_ForEachCopyFloat);
ALLOY_BANDWIDTH_BENCHMARK(BM_ReduceSumFloat);
ALLOY_BANDWIDTH_BENCHMARK(BM_ReduceSumOfSquaresBf16);

}  // namespace

BENCHMARK_MAIN();
