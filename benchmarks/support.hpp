// Shared by alloy's benchmarks: CUDA-event timing of one iteration and random device data.
#pragma once

#include <alloy/alloy.hpp>

#include <benchmark/benchmark.h>

namespace alloy::bench {

struct NoSetup {
  void operator()() const {}
};

// Times `work` (enqueued on the default stream) with CUDA events, per benchmark iteration.
// `setup` is enqueued before each iteration's start event: its kernels run untimed.
template <class Work, class Setup = NoSetup>
void time_with_events(benchmark::State& state, Work&& work, Setup&& setup = {}) {
  cudaEvent_t start, stop;
  ALLOY_CUDA_CHECK(cudaEventCreate(&start));
  ALLOY_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) {  // warm-up
    setup();
    work();
  }
  ALLOY_CUDA_CHECK(cudaDeviceSynchronize());
  for (auto _ : state) {
    setup();
    ALLOY_CUDA_CHECK(cudaEventRecord(start));
    work();
    ALLOY_CUDA_CHECK(cudaEventRecord(stop));
    ALLOY_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    ALLOY_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(ms / 1e3);
  }
  ALLOY_CUDA_CHECK(cudaEventDestroy(start));
  ALLOY_CUDA_CHECK(cudaEventDestroy(stop));
}

// Bytes moved per iteration, reported as a rate (bytes_per_second) and as a plain count.
inline void report_bytes(benchmark::State& state, double bytes_per_iteration) {
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes_per_iteration * state.iterations()));
  state.counters["bytes"] = bytes_per_iteration;
}

// Skips the benchmark, with its reason, where no GPU is present.
inline bool skip_without_device(benchmark::State& state) {
  if (has_cuda_device()) return false;
  state.SkipWithError("no CUDA device");
  return true;
}

}  // namespace alloy::bench
