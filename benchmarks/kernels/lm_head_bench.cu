// GPT-2 124M's input and output layers at its micro-batch (16 x 1024 rows, d 768, vocab 50257
// padded to 50304, bf16), the token table tied to the head:
//   LmHead/chunk       nn::LmHead::forward_backward: per chunk the logits product, the softmax
//                      cross-entropy row kernel (in place) and the dy and dW products. TFLOP/s
//                      counts the three products (3 x 2 x 16384 x 768 x 50304 = 3.8 TFLOP).
//   LmHeadProducts     the same three products alone, in chunks of 8192: the cuBLASLt floor.
//   LmHeadRowKernel    the row kernel alone on one chunk of 8192 rows (reads the logits twice,
//                      writes them once); .../BlocksPerSm/n with n blocks per multiprocessor.
//   EmbeddingForward   x = wte[token] + wpe[t], with what the host does per micro-batch (checking
//                      the ids, grouping rows by token) and the ids' upload from pageable memory on
//                      the compute stream (a trainer's input pipeline overlaps that copy).
//   EmbeddingBackward  dwte += dx gathered by token (tied: always added), dwpe = sums over the batch;
//                      tokens drawn from a Zipf law (GPT-2's text: the commonest token fills about
//                      one row in eleven), so the frequent tokens take several segments.
//   TokenGroupsBuild   the host's grouping of a micro-batch's rows by token (per micro-batch).
#include "../support.hpp"

#include <alloy/nn/embedding.hpp>
#include <alloy/nn/lm_head.hpp>

#include <random>
#include <vector>

namespace {

using alloy::bf16;
using alloy::Buffer;
using alloy::Cuda;

constexpr std::size_t batch = 16, seq = 1024, rows = batch * seq, dim = 768, vocab = 50257, padded = 50304;

template <class T>
void fill_random(Buffer<T, Cuda>& b, std::uint64_t seed, float scale) {
  alloy::for_each_n(Cuda{}, b.size(), [p = b.data(), seed, scale] __device__(std::size_t i) {
    p[i] = T((static_cast<float>(alloy::random_bits(seed, i)) * 0x1p-31f - 1.0f) * scale);
  });
}

// Token ids from a Zipf law over the vocabulary (p_k proportional to 1 / (k + 1)).
std::vector<std::int32_t> zipf_tokens(std::size_t n, std::uint64_t seed) {
  std::vector<double> weights(vocab);
  for (std::size_t k = 0; k < vocab; ++k) weights[k] = 1.0 / double(k + 1);
  std::discrete_distribution<std::int32_t> d(weights.begin(), weights.end());
  std::mt19937_64 rng(seed);
  std::vector<std::int32_t> t(n);
  for (auto& v : t) v = d(rng);
  return t;
}

struct Gpt2Io {
  using P = alloy::Precision<bf16>;
  using Store = alloy::ParamStore<P, alloy::SGD<>, Cuda>;

  alloy::nn::Embedding embed{"wte", "wpe", {.vocab = vocab, .padded_vocab = padded, .dim = dim, .max_positions = seq}};
  alloy::nn::LmHead head;
  Store store;
  alloy::Workspace<Cuda> ws;
  alloy::BackendResources<Cuda> res;
  Buffer<bf16, Cuda> y{rows * dim};
  std::vector<std::int32_t> tokens = zipf_tokens(rows, 1), targets = zipf_tokens(rows, 2);

  explicit Gpt2Io(std::size_t chunk_rows)
      : head("lm_head", {.vocab = vocab, .padded_vocab = padded, .dim = dim, .chunk_rows = chunk_rows}),
        store(declared(embed, head)) {
    fill_random(y, 3, 1.0f);
  }

  static alloy::ParamRegistry declared(alloy::nn::Embedding& e, alloy::nn::LmHead& h) {
    alloy::ParamRegistry r;
    e.declare(r);
    h.tie_to(e);
    return r;
  }

  alloy::Context<Store> context() {
    ws.reset();
    return alloy::Context<Store>(store, ws, 1.0f, false, 0, 1, 0, 0, &res);
  }
};

constexpr double head_flops = 3 * 2.0 * rows * dim * padded;

void report_flops(benchmark::State& state, double flops) {
  state.counters["TFLOP/s"] =
      benchmark::Counter(flops * 1e-12 * double(state.iterations()), benchmark::Counter::kIsRate);
}

void BM_LmHead(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  Gpt2Io io(static_cast<std::size_t>(state.range(0)));
  alloy::bench::time_with_events(state, [&] {
    auto ctx = io.context();
    (void)io.head.forward_backward(ctx, alloy::Activation<const bf16>(io.y.data(), rows, dim), io.targets);
  });
  report_flops(state, head_flops);
  state.counters["logits MB"] = double(io.head.chunk_bytes<bf16>(rows)) / 1e6;
}

void BM_LmHeadProducts(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  constexpr std::size_t chunk = 8192;
  Buffer<bf16, Cuda> y(rows * dim), w(padded * dim), dw(padded * dim), logits(chunk * padded), dy(rows * dim);
  fill_random(y, 1, 1.0f);
  fill_random(w, 2, 0.02f);
  alloy::GemmHandle handle{Cuda{}};
  using alloy::Transpose;
  alloy::bench::time_with_events(state, [&] {
    for (std::size_t first = 0; first < rows; first += chunk) {
      alloy::gemm(Cuda{}, handle,
                  alloy::GemmArgs<bf16>{.transb = Transpose::yes,
                                        .m = chunk,
                                        .n = padded,
                                        .k = dim,
                                        .a = y.data() + first * dim,
                                        .lda = dim,
                                        .b = w.data(),
                                        .ldb = dim,
                                        .c = logits.data(),
                                        .ldc = padded});
      alloy::gemm(Cuda{}, handle,
                  alloy::GemmArgs<bf16>{.m = chunk,
                                        .n = dim,
                                        .k = padded,
                                        .a = logits.data(),
                                        .lda = padded,
                                        .b = w.data(),
                                        .ldb = dim,
                                        .c = dy.data() + first * dim,
                                        .ldc = dim});
      alloy::gemm(Cuda{}, handle,
                  alloy::GemmArgs<bf16>{.transa = Transpose::yes,
                                        .m = padded,
                                        .n = dim,
                                        .k = chunk,
                                        .a = logits.data(),
                                        .lda = padded,
                                        .b = y.data() + first * dim,
                                        .ldb = dim,
                                        .c = dw.data(),
                                        .ldc = dim,
                                        .beta = first > 0 ? 1.0f : 0.0f});
    }
  });
  report_flops(state, head_flops);
}

void BM_LmHeadRowKernel(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  constexpr std::size_t chunk = 8192;
  Buffer<bf16, Cuda> logits(chunk * padded), saved(chunk * padded);
  Buffer<float, Cuda> loss(chunk);
  Buffer<std::int32_t, Cuda> targets(chunk);
  const auto t = zipf_tokens(chunk, 4);
  alloy::copy_from_host(targets, std::span<const std::int32_t>(t));
  fill_random(saved, 5, 4.0f);
  alloy::bench::time_with_events(
      state,
      [&] {
        alloy::softmax_cross_entropy(Cuda{}, static_cast<const bf16*>(logits.data()), targets.data(), chunk, padded,
                                     loss.data(), logits.data(), 1.0f / rows, {.real_classes = vocab});
      },
      [&] {  // fresh logits each time: the gradient was written over them
        ALLOY_CUDA_CHECK(
            cudaMemcpyAsync(logits.data(), saved.data(), saved.size() * sizeof(bf16), cudaMemcpyDeviceToDevice));
      });
  alloy::bench::report_bytes(state, 3.0 * chunk * padded * sizeof(bf16));
}

// The row kernel launched by hand with Threads threads per row and blocks_per_sm blocks per
// multiprocessor (the library: softmax_block = 256 threads, up to 8 blocks): fewer rows in flight
// at once (a row is 100 KB) let the second read of each row come from L2 (50 MB) instead of DRAM;
// fewer threads may not keep DRAM busy. Which wins decides the library's launch for rows this long.
template <int Threads>
void time_row_kernel(benchmark::State& state, int blocks_per_sm) {
  constexpr std::size_t chunk = 8192;
  Buffer<bf16, Cuda> logits(chunk * padded), saved(chunk * padded);
  Buffer<float, Cuda> loss(chunk);
  Buffer<std::int32_t, Cuda> targets(chunk);
  const auto t = zipf_tokens(chunk, 4);
  alloy::copy_from_host(targets, std::span<const std::int32_t>(t));
  fill_random(saved, 5, 4.0f);
  const alloy::detail::SoftmaxCrossEntropy<bf16> args{logits.data(), targets.data(), chunk, padded, vocab, loss.data(),
                                                      logits.data(), 1.0f / rows,    -1,    true,   true};
  const int grid = alloy::current_device_sm_count() * blocks_per_sm;
  alloy::bench::time_with_events(
      state,
      [&] {
        alloy::detail::softmax_cross_entropy_kernel<bf16, Threads><<<grid, Threads>>>(args);
        ALLOY_CUDA_CHECK_LAUNCH();
      },
      [&] {
        ALLOY_CUDA_CHECK(
            cudaMemcpyAsync(logits.data(), saved.data(), saved.size() * sizeof(bf16), cudaMemcpyDeviceToDevice));
      });
  alloy::bench::report_bytes(state, 3.0 * chunk * padded * sizeof(bf16));
}

// range(0) threads per row, range(1) blocks per multiprocessor: more threads per row put as many
// loads in flight with fewer rows at once (session 14 on the H200: no faster than 256 x 8).
void BM_LmHeadRowKernelThreads(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  const int blocks_per_sm = static_cast<int>(state.range(1));
  switch (state.range(0)) {
    case 256:
      return time_row_kernel<256>(state, blocks_per_sm);
    case 512:
      return time_row_kernel<512>(state, blocks_per_sm);
    case 1024:
      return time_row_kernel<1024>(state, blocks_per_sm);
    default:
      state.SkipWithError("threads per row: 256, 512 or 1024");
  }
}

// The library's 256 threads per row with range(0) blocks per multiprocessor.
void BM_LmHeadRowKernelBlocksPerSm(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  time_row_kernel<alloy::detail::softmax_block>(state, static_cast<int>(state.range(0)));
}

void BM_EmbeddingForward(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  Gpt2Io io(8192);
  alloy::bench::time_with_events(state, [&] {
    auto ctx = io.context();
    (void)io.embed.forward(ctx, io.tokens, seq);
  });
  alloy::bench::report_bytes(state, 3.0 * rows * dim * sizeof(bf16));
}

void BM_EmbeddingBackward(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  Gpt2Io io(8192);
  auto ctx = io.context();
  (void)io.embed.forward(ctx, io.tokens, seq);
  const alloy::Activation<const bf16> dx(io.y.data(), rows, dim);
  alloy::bench::time_with_events(state, [&] {
    const auto mark = io.ws.mark();  // the backward's scratch, freed each time
    io.embed.backward(ctx, dx);
    io.ws.release(mark);
  });
  // dx read once; a gradient row read and written per distinct token; dwpe written once.
  alloy::bench::report_bytes(state, double(rows * dim * sizeof(bf16)));
}

void BM_TokenGroupsBuild(benchmark::State& state) {
  const auto tokens = zipf_tokens(rows, 6);
  alloy::TokenGroups groups;
  for (auto _ : state) {
    groups.build(tokens, vocab);
    benchmark::DoNotOptimize(groups.packed().data());
  }
  state.counters["segments"] = double(groups.view(groups.packed().data()).segments_in_use());
  state.counters["merged tokens"] = double(groups.view(groups.packed().data()).merges_in_use());
}

}  // namespace

BENCHMARK(BM_LmHead)->Arg(4096)->Arg(8192)->Arg(16384)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LmHeadProducts)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LmHeadRowKernel)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_LmHeadRowKernelBlocksPerSm)->DenseRange(1, 8)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_LmHeadRowKernelThreads)
    ->ArgsProduct({{256}, {8}})
    ->ArgsProduct({{512}, {2, 3, 4}})
    ->ArgsProduct({{1024}, {1, 2}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_EmbeddingForward)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_EmbeddingBackward)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_TokenGroupsBuild)->Unit(benchmark::kMicrosecond);
BENCHMARK_MAIN();
