// The full post-backward step (pass 1, the host's decision, pass 2) on GPT-2 parameter lists,
// for the configurations PEERS.md's PyTorch pipelines do: bf16 + fp32 master + clip 1.0 +
// AdamW, fp16 + fp32 master + dynamic loss scale, and 8-bit AdamW state; and the trainer's path
// with accumulation (Accumulate<2>), where the last micro-batch's accumulation sums the squares
// (OptimizerStep::accumulate) and the step is pass 2 alone. Counters: `bytes` is the floor's
// byte count per step and `bytes_per_param` the count per parameter it assumes, so
// bytes_per_second is effective bandwidth against that floor.
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

enum class Timed {
  step,                // OptimizerStep::step as a caller that owns its gradients calls it: pass 1 and pass 2
  pass1,               // pass 1 alone
  accumulated,         // the trainer's path: the last micro-batch's accumulate() untimed, then step(): pass 2
  last_micro_batch,    // accumulate() of the last of 2 micro-batches: acc += g and the sums
  middle_micro_batch,  // accumulate() of the middle one of 3 micro-batches: acc += g
};

template <class P, class O, int MicroBatches = 1>
void step_benchmark(benchmark::State& state, double floor_bytes_per_param, Timed timed = Timed::step) {
  if (bench::skip_without_device(state)) return;
  const auto shape = shapes[state.range(0)];
  const auto registry = bench::gpt2_registry(shape);
  using Store = ParamStore<P, O, Cuda, MicroBatches>;
  Store store(registry, Cuda{}, 1);
  OptimizerStep<P, O, Cuda, MicroBatches> step(
      {.optimizer = {.lr = 1e-4f, .beta1 = 0.9f, .beta2 = 0.95f, .weight_decay = 0.1f}}, Cuda{});
  const std::size_t n = store.layout().padded_numel();
  if constexpr (Store::has_accumulator) {
    using G = typename Store::grad_type;
    using Acc = typename Store::optimizer_grad_type;
    for_each_n(Cuda{}, n, FillGrad<G>{store.grads_arena().data(), step.loss_scale() / MicroBatches, 7});
    for_each_n(Cuda{}, n, FillGrad<Acc>{store.accumulator_arena().data(), step.loss_scale() / MicroBatches, 8});
  } else {
    using G = typename Store::optimizer_grad_type;
    for_each_n(Cuda{}, n, FillGrad<G>{store.optimizer_grads(), step.loss_scale(), 7});
  }
  ALLOY_CUDA_CHECK(cudaDeviceSynchronize());
  std::uint64_t skipped = 0;
  const StepOptions options{.lr = 1e-4f, .max_grad_norm = 1.0f};
  switch (timed) {
    case Timed::step:
      bench::time_with_events(state, [&] { skipped += step.step(store, options).skipped; });
      break;
    case Timed::pass1:
      bench::time_with_events(state, [&] { benchmark::DoNotOptimize(step.grad_sum_of_squares(store)); });
      break;
    case Timed::accumulated:
      // acc += g each iteration: the accumulator grows by 1e-2 per step, far from overflowing.
      bench::time_with_events(
          state, [&] { skipped += step.step(store, options).skipped; },
          [&] { step.accumulate(store, MicroBatches - 1, MicroBatches); });
      break;
    case Timed::last_micro_batch:
      bench::time_with_events(state, [&] { step.accumulate(store, MicroBatches - 1, MicroBatches); });
      break;
    case Timed::middle_micro_batch:
      bench::time_with_events(state, [&] { step.accumulate(store, 1, MicroBatches + 1); });
      break;
  }
  if (skipped) state.SkipWithError("steps were skipped: the benchmark's gradients overflowed");
  const double params = static_cast<double>(store.layout().numel());
  bench::report_bytes(state, params * floor_bytes_per_param);
  state.counters["bytes_per_param"] = floor_bytes_per_param;
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
void BM_Pass1Bf16(benchmark::State& s) { step_benchmark<Precision<bf16, fp32_master>, AdamW<>>(s, 2, Timed::pass1); }
// With accumulation (the trainer's path): pass 2 alone, reading the fp32 accumulator once and
// leaving it (the next step's first micro-batch overwrites it): acc 4 + master 8 + m 8 + v 8 +
// param 2 = 30. (HEAD before issue 10: pass 1 on the accumulator 4 + pass 2 with the clear 34
// = 38.)
void BM_StepBf16MasterAdamWAccumulated(benchmark::State& s) {
  step_benchmark<Precision<bf16, fp32_master>, AdamW<>, 2>(s, 30, Timed::accumulated);
}
// q8 with accumulation: acc 4 + master 8 + codes 4 + param 2 = 18.
void BM_StepBf16MasterAdamWq8Accumulated(benchmark::State& s) {
  step_benchmark<Precision<bf16, fp32_master>, AdamW<State<q8>>, 2>(s, 18, Timed::accumulated);
}
// The last micro-batch's accumulation with the sums (read g 2 + acc 4, write acc 4 = 10), and a
// middle one without them (the same 10): the difference is what the sums cost.
void BM_LastMicroBatchWithSums(benchmark::State& s) {
  step_benchmark<Precision<bf16, fp32_master>, AdamW<>, 2>(s, 10, Timed::last_micro_batch);
}
void BM_MiddleMicroBatch(benchmark::State& s) {
  step_benchmark<Precision<bf16, fp32_master>, AdamW<>, 2>(s, 10, Timed::middle_micro_batch);
}

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
ALLOY_STEP_BENCHMARK(BM_StepBf16MasterAdamWAccumulated);
ALLOY_STEP_BENCHMARK(BM_StepBf16MasterAdamWq8Accumulated);
ALLOY_STEP_BENCHMARK(BM_LastMicroBatchWithSums);
ALLOY_STEP_BENCHMARK(BM_MiddleMicroBatch);

}  // namespace

BENCHMARK_MAIN();
