// One GPT-2 124M transformer block (nn::gpt2_block: 768 channels, 12 heads of 64, MLP 3072) at
// the batch of issue 12, 16 sequences of 1024 tokens (16384 rows), forward alone and forward +
// backward, outside a trainer: the blocks are 12 of the step's 13 parts (the LM head the 13th),
// so 12 x this is what a GPT-2 step spends in its blocks. benchmarks/peers/gpt2.py --part block
// times PyTorch's block at the same shape.
//
// FLOPs per block, counted as PyTorch's and llm.c's model-FLOPs figures count them: the four
// products 2 rows (3C C + C C + 4C C + 4C C) = 24 rows C^2 forward, twice that backward; attention
// over the causal pairs only (attention_bench.cu), 4 head_dim pairs forward and 10 backward.
// LayerNorm, GELU and the adds are not counted.
#include "../support.hpp"

#include <alloy/nn/nn.hpp>

namespace {

using namespace alloy;

constexpr std::size_t batch = 16, seq = 1024, channels = 768, heads = 12, rows = batch * seq;
constexpr double pairs = double(seq) * (seq + 1) / 2 * batch * heads;
constexpr double product_flops = 24.0 * rows * channels * channels;
constexpr double forward_flops = product_flops + 4.0 * (channels / heads) * pairs;
constexpr double backward_flops = 2 * product_flops + 10.0 * (channels / heads) * pairs;

// x = a random value in [-1, 1), rounded to T.
template <class T>
struct FillRandom {
  std::uint64_t seed;
  ALLOY_HOST_DEVICE void operator()(std::size_t i, T& x) const {
    x = round_nearest<T>(static_cast<float>(random_bits(seed, i)) * 0x1p-31f - 1.0f);
  }
};

template <class P>
struct BlockRun {
  using Store = ParamStore<P, SGD<>, Cuda>;
  using T = typename Store::param_type;

  nn::Gpt2Block block = nn::gpt2_block("h.0", channels, heads, seq, 12);
  ParamRegistry registry;
  std::unique_ptr<Store> store;
  Workspace<Cuda> ws;
  BackendResources<Cuda> res;
  Buffer<T, Cuda> x{rows * channels}, dy{rows * channels};
  std::size_t kept_bytes = 0;

  BlockRun() {
    block.declare(registry);
    store = std::make_unique<Store>(registry, Cuda{}, 1);
    for_each_indexed_n(Cuda{}, x.size(), FillRandom<T>{1}, out(x.data()));  // never time on zeros
    for_each_indexed_n(Cuda{}, dy.size(), FillRandom<T>{2}, out(dy.data()));
  }
  Context<Store> context() {
    ws.reset();
    return Context<Store>(*store, ws, 1.0f, false, 0, 1, 0, 0, &res);
  }
  void forward() {
    auto ctx = context();
    block.forward(ctx, Activation<const T>(x.data(), rows, channels));
    kept_bytes = ws.bytes_in_use();
  }
  void forward_backward() {
    auto ctx = context();
    const auto y = block.forward(ctx, Activation<const T>(x.data(), rows, channels));
    block.backward(ctx, Activation<const T>(dy.data(), y.rows, y.cols));
  }
};

void report(benchmark::State& state, double flops, std::size_t kept_bytes) {
  state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["kept MiB"] = double(kept_bytes) / (1 << 20);  // activations forward keeps for backward
}

template <class P>
void BM_Gpt2BlockForward(benchmark::State& state) {
  if (bench::skip_without_device(state)) return;
  BlockRun<P> run;
  bench::time_with_events(state, [&] { run.forward(); });
  report(state, forward_flops, run.kept_bytes);
}

template <class P>
void BM_Gpt2BlockForwardBackward(benchmark::State& state) {
  if (bench::skip_without_device(state)) return;
  BlockRun<P> run;
  run.forward();
  const std::size_t kept = run.kept_bytes;
  bench::time_with_events(state, [&] { run.forward_backward(); });
  report(state, forward_flops + backward_flops, kept);
}

#define ALLOY_BLOCK_BENCHMARK(fn, precision, label) \
  BENCHMARK_TEMPLATE(fn, precision)                 \
      ->Name(#fn "/" label)                         \
      ->UseManualTime()                             \
      ->Unit(benchmark::kMicrosecond)               \
      ->MinTime(0.5)                                \
      ->Repetitions(5)                              \
      ->ReportAggregatesOnly(true)

ALLOY_BLOCK_BENCHMARK(BM_Gpt2BlockForward, Precision<bf16>, "bf16");
ALLOY_BLOCK_BENCHMARK(BM_Gpt2BlockForwardBackward, Precision<bf16>, "bf16");
ALLOY_BLOCK_BENCHMARK(BM_Gpt2BlockForward, Precision<fp16>, "fp16");
ALLOY_BLOCK_BENCHMARK(BM_Gpt2BlockForwardBackward, Precision<fp16>, "fp16");
// tf32 products; fp32 attention on the row kernels.
ALLOY_BLOCK_BENCHMARK(BM_Gpt2BlockForwardBackward, Precision<tf32>, "tf32");

}  // namespace

BENCHMARK_MAIN();
