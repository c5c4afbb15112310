// The residual MLP's matrix products (8192 rows, 1024 -> 4096 -> 1024, bf16) with and without
// cuBLASLt's epilogues, beside the element-wise passes they would replace: what each fusion
// saves or costs on this GPU and cuBLASLt version (nn/fused_mlp.hpp decides from these).
//   up forward      h = x Wu^T + bu: plain bias, GELU with the pre-activation kept (GELU_AUX)
//   down backward   dh = dy Wd: plain, or with GELU's gradient in the epilogue (DGELU)
//   passes          GELU forward (h from pre) and GELU backward (dPre from pre and dh)
#include "../support.hpp"

#include <alloy/kernels/gemm.hpp>
#include <alloy/nn/gelu.hpp>

namespace {

using alloy::bf16;
using alloy::Buffer;
using alloy::Cuda;
using alloy::Epilogue;
using alloy::GemmArgs;
using alloy::Transpose;

constexpr std::size_t rows = 8192, width = 1024, hidden = 4096;

template <class T>
void fill_random(Buffer<T, Cuda>& b, std::uint64_t seed, float scale) {
  alloy::for_each_n(Cuda{}, b.size(), [p = b.data(), seed, scale] __device__(std::size_t i) {
    p[i] = T((static_cast<float>(alloy::random_bits(seed, i)) * 0x1p-31f - 1.0f) * scale);
  });
}

struct MlpArrays {
  Buffer<bf16, Cuda> x{rows * width}, wu{hidden * width}, bu{hidden}, wd{width * hidden};
  Buffer<bf16, Cuda> h{rows * hidden}, pre{rows * hidden}, dy{rows * width}, dh{rows * hidden};
  alloy::GemmHandle handle{Cuda{}};
  MlpArrays() {
    fill_random(x, 1, 1.0f);
    fill_random(wu, 2, 0.03f);
    fill_random(bu, 3, 0.1f);
    fill_random(wd, 4, 0.015f);
    fill_random(dy, 5, 1.0f);
    up(Epilogue::bias_gelu_tanh, true);  // pre holds real pre-activations
  }
  void up(Epilogue e, bool keep_pre) {
    GemmArgs<bf16> g;
    g.transb = Transpose::yes;
    g.m = rows, g.n = hidden, g.k = width;
    g.a = x.data(), g.lda = width, g.b = wu.data(), g.ldb = width, g.c = h.data(), g.ldc = hidden;
    g.epilogue = e;
    g.bias = bu.data();
    if (keep_pre) g.pre_activation = pre.data(), g.ld_pre_activation = hidden;
    alloy::gemm(Cuda{}, handle, g);
  }
  void down_input_gradient(Epilogue e) {
    GemmArgs<bf16> g;
    g.m = rows, g.n = hidden, g.k = width;
    g.a = dy.data(), g.lda = width, g.b = wd.data(), g.ldb = hidden, g.c = dh.data(), g.ldc = hidden;
    g.epilogue = e;
    if (e == Epilogue::dgelu_tanh) g.pre_activation = pre.data(), g.ld_pre_activation = hidden;
    alloy::gemm(Cuda{}, handle, g);
  }
};

constexpr double product_flops = 2.0 * rows * width * hidden;

void report_flops(benchmark::State& state) {
  state.counters["TFLOP/s"] =
      benchmark::Counter(product_flops * 1e-12 * double(state.iterations()), benchmark::Counter::kIsRate);
}

void BM_UpBias(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  MlpArrays a;
  alloy::bench::time_with_events(state, [&] { a.up(Epilogue::bias, false); });
  report_flops(state);
}

void BM_UpBiasGeluKeepingPre(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  MlpArrays a;
  alloy::bench::time_with_events(state, [&] { a.up(Epilogue::bias_gelu_tanh, true); });
  report_flops(state);
}

void BM_UpBiasGelu(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  MlpArrays a;
  alloy::bench::time_with_events(state, [&] { a.up(Epilogue::bias_gelu_tanh, false); });
  report_flops(state);
}

void BM_DownInputGradient(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  MlpArrays a;
  alloy::bench::time_with_events(state, [&] { a.down_input_gradient(Epilogue::none); });
  report_flops(state);
}

void BM_DownInputGradientDgelu(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  MlpArrays a;
  alloy::bench::time_with_events(state, [&] { a.down_input_gradient(Epilogue::dgelu_tanh); });
  report_flops(state);
}

void BM_GeluForwardPass(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  MlpArrays a;
  alloy::bench::time_with_events(state, [&] {
    alloy::for_each_n(Cuda{}, a.h.size(), alloy::nn::detail::GeluForward<bf16>{}, alloy::in(a.pre.data()),
                      alloy::out(a.h.data()));
  });
  alloy::bench::report_bytes(state, 2.0 * rows * hidden * sizeof(bf16));
}

void BM_GeluBackwardPass(benchmark::State& state) {
  if (alloy::bench::skip_without_device(state)) return;
  MlpArrays a;
  alloy::bench::time_with_events(state, [&] {
    alloy::for_each_n(Cuda{}, a.h.size(), alloy::nn::detail::GeluBackward<bf16>{}, alloy::in(a.pre.data()),
                      alloy::in(a.dh.data()), alloy::out(a.h.data()));
  });
  alloy::bench::report_bytes(state, 3.0 * rows * hidden * sizeof(bf16));
}

}  // namespace

BENCHMARK(BM_UpBias)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_UpBiasGeluKeepingPre)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_UpBiasGelu)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DownInputGradient)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DownInputGradientDgelu)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_GeluForwardPass)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_GeluBackwardPass)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_MAIN();
