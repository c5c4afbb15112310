// Causal self-attention at GPT-2 124M's shape with its batch of 16: batch 16, heads 12, seq 1024,
// head_dim 64, q, k and v read from the fused QKV projection's output ([16384, 2304]) and dq, dk,
// dv written into its gradient, as the model calls it, in bf16 (target: forward + backward <= 0.83
// ms on the H200; FlashAttention-2 measures 0.831 ms), tf32 (float storage, tf32 products) and
// fp32 (float storage, 3xTF32 products: three mmas per product; PyTorch's fp32 SDPA, the
// memory-efficient backend, runs the same scheme). The float cases' aim: tf32 around 1.5-2.5 ms
// and fp32 around 4-6 ms for forward + backward (the row kernels took about 90 ms).
//
// FLOPs, counted as FlashAttention's benchmarks count them, over the causal pairs only: with
// pairs = seq (seq + 1) / 2 per (batch, head),
//   forward   4 head_dim pairs batch heads    (S = Q K^T and O = P V, 2 head_dim each)
//   backward  10 head_dim pairs batch heads   (S again, dP = dO V^T, dV = P^T dO, dK = dS^T Q, dQ = dS K)
// "TFLOP/s" divides those by the time. alloy's backward computes S and dP twice (its dq pass and
// its dk/dv pass; no atomics), 14 head_dim pairs batch heads: "executed TFLOP/s". Masked halves of
// the diagonal tiles are counted in neither, nor are 3xTF32's two extra mmas per product.
// "WithColumnParts" times the bf16 backward that also writes its column parts (GPT-2's c_attn bias
// gradient before its fold, AttentionBackwardArgs::column_parts): the cost of summing the staged
// output tiles, against the plain backward beside it.
#include "../support.hpp"

#include <alloy/kernels/attention.hpp>

namespace {

using alloy::bf16;
using alloy::Buffer;
using alloy::Cuda;
using alloy::storage_t;
using alloy::tf32;

constexpr std::size_t batch = 16, heads = 12, seq = 1024, head_dim = 64;
constexpr std::size_t channels = heads * head_dim, rows = batch * seq;
constexpr double pairs = double(seq) * (seq + 1) / 2 * batch * heads;
constexpr double forward_flops = 4.0 * head_dim * pairs;
constexpr double backward_flops = 10.0 * head_dim * pairs;
constexpr double backward_executed_flops = 14.0 * head_dim * pairs;

// Random values in [-1, 1) times `scale`: never time on zeros.
template <class T>
void fill_random(Buffer<T, Cuda>& b, std::uint64_t seed, float scale = 1.0f) {
  alloy::for_each_n(Cuda{}, b.size(), [p = b.data(), seed, scale] __device__(std::size_t i) {
    p[i] = T((static_cast<float>(alloy::random_bits(seed, i)) * 0x1p-31f - 1.0f) * scale);
  });
}

// Compute is the compute dtype: bf16, tf32 or float (fp32).
template <class Compute>
struct AttentionArrays {
  using T = storage_t<Compute>;
  Buffer<T, Cuda> qkv{rows * 3 * channels}, out{rows * channels}, dout{rows * channels}, dqkv{rows * 3 * channels};
  Buffer<float, Cuda> lse{batch * heads * seq}, scratch{alloy::attention_backward_scratch_floats(batch, heads, seq)};
  Buffer<float, Cuda> parts{alloy::attention_column_parts_floats(batch, heads, seq, head_dim)};

  AttentionArrays() {
    fill_random(qkv, 1, 2.0f);  // q k^T / 8 of magnitude ~1: softmaxes neither flat nor one-hot
    fill_random(dout, 2);
    forward();
  }
  const alloy::AttentionStrides in = alloy::AttentionStrides::rows(3 * channels, seq, head_dim);
  const alloy::AttentionStrides out_strides = alloy::AttentionStrides::rows(channels, seq, head_dim);

  void forward() {
    alloy::attention_forward(Cuda{}, alloy::AttentionArgs<Compute>{.batch = batch,
                                                                   .heads = heads,
                                                                   .seq = seq,
                                                                   .head_dim = head_dim,
                                                                   .q = qkv.data(),
                                                                   .k = qkv.data() + channels,
                                                                   .v = qkv.data() + 2 * channels,
                                                                   .qkv_strides = in,
                                                                   .out = out.data(),
                                                                   .out_strides = out_strides,
                                                                   .lse = lse.data()});
  }
  // With column_parts, the column parts into `parts` too.
  void backward(bool column_parts = false) {
    float* const into = column_parts ? parts.data() : nullptr;
    alloy::attention_backward(Cuda{}, alloy::AttentionBackwardArgs<Compute>{.batch = batch,
                                                                            .heads = heads,
                                                                            .seq = seq,
                                                                            .head_dim = head_dim,
                                                                            .q = qkv.data(),
                                                                            .k = qkv.data() + channels,
                                                                            .v = qkv.data() + 2 * channels,
                                                                            .qkv_strides = in,
                                                                            .out = out.data(),
                                                                            .dout = dout.data(),
                                                                            .out_strides = out_strides,
                                                                            .lse = lse.data(),
                                                                            .dq = dqkv.data(),
                                                                            .dk = dqkv.data() + channels,
                                                                            .dv = dqkv.data() + 2 * channels,
                                                                            .grad_strides = in,
                                                                            .scratch = scratch.data(),
                                                                            .column_parts = into});
  }
};

void report_flops(benchmark::State& state, double flops, double executed) {
  state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["executed TFLOP/s"] =
      benchmark::Counter(executed * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
}

template <class Compute>
void BM_AttentionForward(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  AttentionArrays<Compute> a;
  alloy::bench::time_with_events(state, [&] { a.forward(); });
  report_flops(state, forward_flops, forward_flops);
}

template <class Compute>
void BM_AttentionBackward(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  AttentionArrays<Compute> a;
  alloy::bench::time_with_events(state, [&] { a.backward(); });
  report_flops(state, backward_flops, backward_executed_flops);
}

template <class Compute>
void BM_AttentionBackwardWithColumnParts(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  AttentionArrays<Compute> a;
  alloy::bench::time_with_events(state, [&] { a.backward(true); });
  report_flops(state, backward_flops, backward_executed_flops);
}

template <class Compute>
void BM_AttentionForwardBackward(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  AttentionArrays<Compute> a;
  alloy::bench::time_with_events(state, [&] {
    a.forward();
    a.backward();
  });
  report_flops(state, forward_flops + backward_flops, forward_flops + backward_executed_flops);
}

void BM_AttentionForwardBf16_16x12x1024x64(benchmark::State& state) { BM_AttentionForward<bf16>(state); }
void BM_AttentionBackwardBf16_16x12x1024x64(benchmark::State& state) { BM_AttentionBackward<bf16>(state); }
void BM_AttentionBackwardWithColumnPartsBf16_16x12x1024x64(benchmark::State& state) {
  BM_AttentionBackwardWithColumnParts<bf16>(state);
}
void BM_AttentionForwardBackwardBf16_16x12x1024x64(benchmark::State& state) {
  BM_AttentionForwardBackward<bf16>(state);
}
void BM_AttentionForwardTf32_16x12x1024x64(benchmark::State& state) { BM_AttentionForward<tf32>(state); }
void BM_AttentionBackwardTf32_16x12x1024x64(benchmark::State& state) { BM_AttentionBackward<tf32>(state); }
void BM_AttentionForwardBackwardTf32_16x12x1024x64(benchmark::State& state) {
  BM_AttentionForwardBackward<tf32>(state);
}
void BM_AttentionForwardFp32_16x12x1024x64(benchmark::State& state) { BM_AttentionForward<float>(state); }
void BM_AttentionBackwardFp32_16x12x1024x64(benchmark::State& state) { BM_AttentionBackward<float>(state); }
void BM_AttentionForwardBackwardFp32_16x12x1024x64(benchmark::State& state) {
  BM_AttentionForwardBackward<float>(state);
}

#define ALLOY_ATTENTION_BENCHMARK(fn) \
  BENCHMARK(fn)                       \
      ->UseManualTime()               \
      ->Unit(benchmark::kMicrosecond) \
      ->MinTime(0.5)                  \
      ->Repetitions(5)                \
      ->ReportAggregatesOnly(true)

ALLOY_ATTENTION_BENCHMARK(BM_AttentionForwardBf16_16x12x1024x64);
ALLOY_ATTENTION_BENCHMARK(BM_AttentionBackwardBf16_16x12x1024x64);
ALLOY_ATTENTION_BENCHMARK(BM_AttentionBackwardWithColumnPartsBf16_16x12x1024x64);
ALLOY_ATTENTION_BENCHMARK(BM_AttentionForwardBackwardBf16_16x12x1024x64);
ALLOY_ATTENTION_BENCHMARK(BM_AttentionForwardTf32_16x12x1024x64);
ALLOY_ATTENTION_BENCHMARK(BM_AttentionBackwardTf32_16x12x1024x64);
ALLOY_ATTENTION_BENCHMARK(BM_AttentionForwardBackwardTf32_16x12x1024x64);
ALLOY_ATTENTION_BENCHMARK(BM_AttentionForwardFp32_16x12x1024x64);
ALLOY_ATTENTION_BENCHMARK(BM_AttentionBackwardFp32_16x12x1024x64);
ALLOY_ATTENTION_BENCHMARK(BM_AttentionForwardBackwardFp32_16x12x1024x64);

}  // namespace

BENCHMARK_MAIN();
