// The full post-backward step (pass 1, the host's decision, pass 2) on GPT-2 parameter lists,
// for the configurations PEERS.md's PyTorch pipelines do: bf16 + fp32 master + clip 1.0 +
// AdamW, fp16 + fp32 master + dynamic loss scale, and 8-bit AdamW state. The `bytes` counter is
// the floor's byte count per step, so TB/s is effective bandwidth against that floor.
#include "../gpt2_shapes.hpp"
#include "../support.hpp"

namespace {

using namespace alloy;

// Gradients in [-0.01, 0.01) times the loss scale: random, never zero.
template <class G>
struct FillGrad {
  G* g;
  float scale;
  std::uint64_t seed;
  __device__ void operator()(std::size_t i) const {
    g[i] = round_nearest<G>((static_cast<float>(random_bits(seed, i)) * 0x1p-31f - 1.0f) * 0.01f * scale);
  }
};

constexpr bench::Gpt2Shape shapes[] = {bench::gpt2_124m, bench::gpt2_1558m};

template <class P, class O>
void step_benchmark(benchmark::State& state, double floor_bytes_per_param, bool pass1_only = false) {
  if (bench::skip_without_device(state)) return;
  const auto shape = shapes[state.range(0)];
  const auto registry = bench::gpt2_registry(shape);
  ParamStore<P, O, Cuda> store(registry, Cuda{}, 1);
  OptimizerStep<P, O, Cuda> step({.optimizer = {.lr = 1e-4f, .beta1 = 0.9f, .beta2 = 0.95f, .weight_decay = 0.1f}},
                                 Cuda{});
  using G = typename ParamStore<P, O, Cuda>::optimizer_grad_type;
  const std::size_t n = store.layout().padded_numel();
  for_each_n(Cuda{}, n, FillGrad<G>{store.optimizer_grads(), step.loss_scale(), 7});
  ALLOY_CUDA_CHECK(cudaDeviceSynchronize());
  std::uint64_t skipped = 0;
  bench::time_with_events(state, [&] {
    if (pass1_only) {
      benchmark::DoNotOptimize(step.grad_sum_of_squares(store));
    } else {
      skipped += step.step(store, {.lr = 1e-4f, .max_grad_norm = 1.0f}).skipped;
    }
  });
  if (skipped) state.SkipWithError("steps were skipped: the benchmark's gradients overflowed");
  const double params = static_cast<double>(store.layout().numel());
  bench::report_bytes(state, params * floor_bytes_per_param);
  state.counters["params"] = params;
  state.counters["tensors"] = static_cast<double>(registry.size());
  state.SetLabel(shape.name);
}

// bf16 grad 2 (read twice: 4) + fp32 master 4+4 + m 4+4 + v 4+4 + bf16 param 2 = 30.
void BM_StepBf16MasterAdamW(benchmark::State& s) { step_benchmark<Precision<bf16, fp32_master>, AdamW<>>(s, 30); }
void BM_StepFp16MasterDynamicAdamW(benchmark::State& s) {
  step_benchmark<Precision<fp16, fp32_master>, AdamW<>>(s, 30);
}
// bf16 grad 4 + master 8 + 8-bit m 1+1 + v 1+1 + param 2 = 18 (block scales: 0.03).
void BM_StepBf16MasterAdamWq8(benchmark::State& s) {
  step_benchmark<Precision<bf16, fp32_master>, AdamW<State<q8>>>(s, 18);
}
// Pass 1 alone: one read of the bf16 gradients.
void BM_Pass1Bf16(benchmark::State& s) { step_benchmark<Precision<bf16, fp32_master>, AdamW<>>(s, 2, true); }

#define ALLOY_STEP_BENCHMARK(fn)      \
  BENCHMARK(fn)                       \
      ->Arg(0)                        \
      ->Arg(1)                        \
      ->UseManualTime()               \
      ->Unit(benchmark::kMillisecond) \
      ->MinTime(0.3)                  \
      ->Repetitions(5)                \
      ->ReportAggregatesOnly(true)

ALLOY_STEP_BENCHMARK(BM_StepBf16MasterAdamW);
ALLOY_STEP_BENCHMARK(BM_StepFp16MasterDynamicAdamW);
ALLOY_STEP_BENCHMARK(BM_StepBf16MasterAdamWq8);
ALLOY_STEP_BENCHMARK(BM_Pass1Bf16);

}  // namespace

BENCHMARK_MAIN();
