// Would choosing cuBLASLt's algorithm by timing beat the heuristic's first choice, which alloy's
// gemm takes (detail::make_plan)? For each bf16 product of the two example models' training step,
// built as nn/linear.hpp, nn/fused_mlp.hpp and nn/lm_head.hpp build it (transposes, leading
// dimensions, epilogue, beta), this asks the heuristic for up to 16 algorithms, times each with
// CUDA events (3 warm-up launches, then the median of 20 launches, each between its own pair of
// events) and prints a Markdown row: the first choice's time, the best time and its index in the
// heuristic's list. The totals weigh each product by how often one training step runs it.
//
// Run on the GPU: build/gpu/benchmarks/alloy_gemm_algos
// Pointers come from cudaMalloc (256-byte aligned), as the workspace's and the parameter arena's
// are, so the heuristic is asked the question alloy's gemm asks.
#include <alloy/alloy.hpp>
#include <alloy/kernels/gemm.hpp>
#include <alloy/nn/lm_head.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <vector>

namespace {

using alloy::bf16;
using alloy::Buffer;
using alloy::Cuda;
using alloy::Epilogue;
using alloy::GemmArgs;
using alloy::Transpose;

constexpr int requested_algos = 16;
constexpr int warmup_launches = 3;
constexpr int timed_launches = 20;
constexpr int confirm_rounds = 3;

// Uniform values in [-scale, scale): random, so no kernel runs on zeros.
__global__ void fill_uniform(bf16* p, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    p[i] = bf16((static_cast<float>(alloy::random_bits(seed, i)) * 0x1p-31f - 1.0f) * scale);
  }
}

Buffer<bf16, Cuda> random_buffer(std::size_t n, std::uint64_t seed, float scale) {
  Buffer<bf16, Cuda> b(n);
  fill_uniform<<<1024, 256>>>(b.data(), n, seed, scale);
  ALLOY_CUDA_CHECK(cudaGetLastError());
  return b;
}

// One product of a training step; args has its shape, leading dimensions, epilogue and beta, and
// no pointers: the survey allocates what the epilogue reads or writes (bias, bias_grad, the
// pre-activation when ld_pre_activation != 0), and c_in when `residual`.
struct Product {
  std::string model;
  std::string name;
  GemmArgs<bf16> args;
  bool residual = false;
  int per_step = 1;
};

// Linear(in, out)'s products over `rows` rows, as nn/linear.hpp builds them (every Linear of both
// models has a bias).
// forward_into: y = x W^T + b (+ residual, beta = 1), or GELU of it keeping the pre-activation.
GemmArgs<bf16> linear_forward(std::size_t rows, std::size_t in, std::size_t out, bool residual, bool gelu) {
  return {.transa = Transpose::no,
          .transb = Transpose::yes,
          .m = rows,
          .n = out,
          .k = in,
          .lda = in,
          .ldb = in,
          .ldc = out,
          .beta = residual ? 1.0f : 0.0f,
          .epilogue = gelu ? Epilogue::bias_gelu_tanh : Epilogue::bias,
          .ld_pre_activation = gelu ? out : 0};
}

// input_gradient: dx = dy W, or (dy W) * gelu'(pre) when the layer before is GELU (16-bit
// mlp_backward: Epilogue::dgelu_tanh, without the previous layer's bias gradient).
GemmArgs<bf16> linear_input_gradient(std::size_t rows, std::size_t in, std::size_t out, bool dgelu) {
  return {.transa = Transpose::no,
          .transb = Transpose::no,
          .m = rows,
          .n = in,
          .k = out,
          .lda = out,
          .ldb = in,
          .ldc = in,
          .epilogue = dgelu ? Epilogue::dgelu_tanh : Epilogue::none,
          .ld_pre_activation = dgelu ? in : 0};
}

// weight_gradient: dW = dy^T x with db fused (Epilogue::bias_grad). beta = 0: with bf16 and fp32
// master weights the trainer has an fp32 accumulator, so ctx.accumulate_grads() is false.
GemmArgs<bf16> linear_weight_gradient(std::size_t rows, std::size_t in, std::size_t out) {
  return {.transa = Transpose::yes,
          .transb = Transpose::no,
          .m = out,
          .n = in,
          .k = rows,
          .lda = out,
          .ldb = in,
          .ldc = in,
          .beta = 0.0f,
          .epilogue = Epilogue::bias_grad};
}

// Linear(in, out)'s three products, each run `per_step` times.
void add_linear(std::vector<Product>& products, const std::string& model, const std::string& name, std::size_t rows,
                std::size_t in, std::size_t out, int per_step, bool residual, bool gelu_after, bool gelu_before) {
  products.push_back(
      {model, name + " forward", linear_forward(rows, in, out, residual, gelu_after), residual, per_step});
  products.push_back(
      {model, name + " input gradient", linear_input_gradient(rows, in, out, gelu_before), false, per_step});
  products.push_back({model, name + " weight gradient", linear_weight_gradient(rows, in, out), false, per_step});
}

std::vector<Product> products() {
  std::vector<Product> p;
  // examples/mlp at full size: 8192 rows, 8 residual blocks x + down(gelu(up(norm(x)))), 1024 ->
  // 4096 -> 1024; the residual is added in down's product (fused_mlp.hpp's mlp_forward).
  {
    constexpr std::size_t rows = 8192, d = 1024, hidden = 4096;
    add_linear(p, "mlp", "up", rows, d, hidden, 8, false, true, false);
    add_linear(p, "mlp", "down", rows, hidden, d, 8, true, false, true);
  }
  // examples/gpt2 on the GPU: 124M (12 layers, 768 channels), 16 sequences of 1024 tokens, one
  // micro-batch per step.
  {
    constexpr std::size_t rows = 16 * 1024, c = 768;
    add_linear(p, "gpt2", "attn.c_attn", rows, c, 3 * c, 12, false, false, false);
    add_linear(p, "gpt2", "attn.c_proj", rows, c, c, 12, true, false, false);
    add_linear(p, "gpt2", "mlp.c_fc", rows, c, 4 * c, 12, false, true, false);
    add_linear(p, "gpt2", "mlp.c_proj", rows, 4 * c, c, 12, true, false, true);
    // LmHead: chunks of 8192 rows (LmHeadConfig::default_chunk_rows), so two per micro-batch; W is
    // wte [50304, 768]. Per chunk: logits = y W^T; dy = dlogits W; dW (+)= dlogits^T y, written by
    // the first chunk (beta = 0) and added by the second (beta = 1, C read from dW itself).
    constexpr std::size_t chunk = alloy::nn::LmHeadConfig::default_chunk_rows, vocab = 50304;
    const std::size_t chunks = rows / chunk;
    p.push_back({"gpt2",
                 "lm_head logits",
                 {.transa = Transpose::no,
                  .transb = Transpose::yes,
                  .m = chunk,
                  .n = vocab,
                  .k = c,
                  .lda = c,
                  .ldb = c,
                  .ldc = vocab},
                 false,
                 int(chunks)});
    p.push_back({"gpt2",
                 "lm_head input gradient",
                 {.m = chunk, .n = c, .k = vocab, .lda = vocab, .ldb = c, .ldc = c},
                 false,
                 int(chunks)});
    for (const float beta : {0.0f, 1.0f}) {
      p.push_back(
          {"gpt2",
           beta == 0.0f ? "lm_head weight gradient (first chunk)" : "lm_head weight gradient (later chunks)",
           {.transa = Transpose::yes, .m = vocab, .n = c, .k = chunk, .lda = vocab, .ldb = c, .ldc = c, .beta = beta},
           false,
           beta == 0.0f ? 1 : int(chunks) - 1});
    }
  }
  return p;
}

// The operands of one product, random, and its arguments pointing at them.
struct Operands {
  Buffer<bf16, Cuda> a, b, c, c_in, bias, bias_grad, pre_activation;
  GemmArgs<bf16> args;

  explicit Operands(const Product& p) : args(p.args) {
    GemmArgs<bf16>& g = args;
    const std::size_t a_rows = g.transa == Transpose::yes ? g.k : g.m;
    const std::size_t b_rows = g.transb == Transpose::yes ? g.n : g.k;
    a = random_buffer(a_rows * g.lda, 1, 1.0f);
    b = random_buffer(b_rows * g.ldb, 2, 0.02f);
    c = random_buffer(g.m * g.ldc, 3, 1.0f);  // read when beta != 0 and there is no c_in
    g.a = a.data(), g.b = b.data(), g.c = c.data();
    if (p.residual) {
      c_in = random_buffer(g.m * g.ldc, 4, 1.0f);
      g.c_in = c_in.data();
    }
    if (alloy::detail::adds_bias(g.epilogue)) {
      bias = random_buffer(g.n, 5, 0.1f);
      g.bias = bias.data();
    }
    if (alloy::detail::writes_bias_grad(g.epilogue)) {
      bias_grad = Buffer<bf16, Cuda>(alloy::detail::bias_grad_size(g));
      g.bias_grad = bias_grad.data();
    }
    if (g.ld_pre_activation != 0) {  // written by GELU_AUX, read by DGELU
      pre_activation = random_buffer(g.m * g.ld_pre_activation, 6, 2.0f);
      g.pre_activation = pre_activation.data();
    }
    alloy::detail::check_gemm_args(g);
    ALLOY_CUDA_CHECK(cudaDeviceSynchronize());
  }
};

// cuBLASLt's call exactly as alloy::gemm makes it, with the algorithm given.
cublasStatus_t launch(cublasLtHandle_t handle, const alloy::detail::GemmPlan& plan, const cublasLtMatmulAlgo_t& algo,
                      const GemmArgs<bf16>& g, Buffer<std::byte, Cuda>& workspace, cudaStream_t stream) {
  return cublasLtMatmul(handle, plan.desc.get(), &g.alpha, g.b, plan.lt_a.get(), g.a, plan.lt_b.get(), &g.beta,
                        alloy::detail::c_in_of(g), plan.lt_c.get(), g.c, plan.lt_c.get(), &algo, workspace.data(),
                        workspace.bytes(), stream);
}

constexpr float failed = std::numeric_limits<float>::quiet_NaN();

// NaN (a failed launch) sorts anywhere, so a list holding one has no meaningful median: NaN.
float median(std::vector<float> v) {
  if (v.empty() || std::any_of(v.begin(), v.end(), [](float x) { return std::isnan(x); })) return failed;
  std::sort(v.begin(), v.end());
  const std::size_t h = v.size() / 2;
  return v.size() % 2 == 1 ? v[h] : 0.5f * (v[h - 1] + v[h]);
}

// The median time in microseconds of one algorithm, or NaN when a launch fails.
float time_algo(cublasLtHandle_t handle, const alloy::detail::GemmPlan& plan, const cublasLtMatmulAlgo_t& algo,
                const GemmArgs<bf16>& g, Buffer<std::byte, Cuda>& workspace, cudaStream_t stream,
                std::vector<alloy::CudaEvent>& events) {
  for (int i = 0; i < warmup_launches; ++i) {
    if (launch(handle, plan, algo, g, workspace, stream) != CUBLAS_STATUS_SUCCESS) return failed;
  }
  for (int i = 0; i < timed_launches; ++i) {
    ALLOY_CUDA_CHECK(cudaEventRecord(events[2 * i].get(), stream));
    if (launch(handle, plan, algo, g, workspace, stream) != CUBLAS_STATUS_SUCCESS) {
      ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
      return failed;
    }
    ALLOY_CUDA_CHECK(cudaEventRecord(events[2 * i + 1].get(), stream));
  }
  ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<float> us(timed_launches);
  for (int i = 0; i < timed_launches; ++i) {
    float ms = 0;
    ALLOY_CUDA_CHECK(cudaEventElapsedTime(&ms, events[2 * i].get(), events[2 * i + 1].get()));
    us[std::size_t(i)] = 1e3f * ms;
  }
  return median(us);
}

struct Totals {
  double first_us = 0, best_us = 0;
};

std::string shape_of(const GemmArgs<bf16>& g) {
  return std::to_string(g.m) + " " + std::to_string(g.n) + " " + std::to_string(g.k);
}

std::string epilogue_of(const Product& p) {
  std::string e = alloy::detail::name_of(p.args.epilogue);
  if (p.args.epilogue == Epilogue::bias_gelu_tanh && p.args.ld_pre_activation != 0) e += " (GELU_AUX)";
  if (p.args.epilogue == Epilogue::bias_grad) e += " (BGRADB)";
  if (p.residual) e += ", residual c_in";
  if (p.args.beta != 0.0f) e += ", beta 1";
  return e;
}

int survey() {
  if (!alloy::has_cuda_device()) {
    std::fprintf(stderr, "alloy_gemm_algos: no CUDA device\n");
    return 1;
  }
  cudaStream_t stream = nullptr;
  ALLOY_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  alloy::detail::LtHandle handle;
  {
    cublasLtHandle_t h = nullptr;
    ALLOY_CUBLAS_CHECK(cublasLtCreate(&h));
    handle.reset(h);
  }
  // The workspace alloy's GemmHandle gives every product.
  Buffer<std::byte, Cuda> workspace(alloy::GemmHandle::default_workspace_bytes);
  std::vector<alloy::CudaEvent> events;
  for (int i = 0; i < 2 * timed_launches; ++i) {
    cudaEvent_t e = nullptr;
    ALLOY_CUDA_CHECK(cudaEventCreate(&e));  // timing events (make_cuda_event's disable timing)
    events.emplace_back(e);
  }

  int device = 0;
  cudaDeviceProp prop{};
  ALLOY_CUDA_CHECK(cudaGetDevice(&device));
  ALLOY_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  std::printf(
      "cuBLASLt %zu on %s; bf16, fp32 accumulation, workspace %zu MiB; up to %d heuristic algorithms, "
      "each timed as the median of %d launches after %d warm-up ones\n\n",
      cublasLtGetVersion(), prop.name, alloy::GemmHandle::default_workspace_bytes >> 20, requested_algos,
      timed_launches, warmup_launches);
  std::printf(
      "| model | product | m n k | epilogue | first (us) | best (us) | best index | first / best | tried | "
      "failed | per step |\n");
  std::printf("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n");

  {  // clocks up before the first row: the LM head's logits product, about a second
    const std::vector<Product> all_products = products();
    const Product& big = *std::find_if(all_products.begin(), all_products.end(),
                                       [](const Product& p) { return p.name == "lm_head logits"; });
    const Operands operands(big);
    const alloy::detail::GemmPlan plan = alloy::detail::make_plan(handle.get(), operands.args, workspace.bytes());
    for (int i = 0; i < 1000; ++i)
      ALLOY_CUBLAS_CHECK(launch(handle.get(), plan, plan.algo, operands.args, workspace, stream));
    ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  Totals all;
  int mismatches = 0;
  std::vector<std::pair<std::string, Totals>> by_model;
  for (const Product& p : products()) {
    const Operands operands(p);
    const GemmArgs<bf16>& g = operands.args;
    const alloy::detail::GemmCandidates candidates =
        alloy::detail::heuristic_algos(handle.get(), g, workspace.bytes(), requested_algos);
    std::vector<float> us;
    int failures = 0;
    for (const cublasLtMatmulHeuristicResult_t& r : candidates.results) {
      const float t = r.state == CUBLAS_STATUS_SUCCESS
                          ? time_algo(handle.get(), candidates.plan, r.algo, g, workspace, stream, events)
                          : failed;
      failures += std::isnan(t) ? 1 : 0;
      us.push_back(t);
    }
    int best = -1;
    for (int i = 0; i < int(us.size()); ++i) {
      if (!std::isnan(us[std::size_t(i)]) && (best < 0 || us[std::size_t(i)] < us[std::size_t(best)])) best = i;
    }
    // A best other than the first may have won by noise: both are timed again, alternately, and
    // the rows report the median of those rounds.
    float first = us.empty() ? failed : us.front();
    float best_us = best < 0 ? failed : us[std::size_t(best)];
    if (best > 0 && !std::isnan(first)) {
      std::vector<float> again_first, again_best;
      for (int round = 0; round < confirm_rounds; ++round) {
        again_first.push_back(
            time_algo(handle.get(), candidates.plan, candidates.results.front().algo, g, workspace, stream, events));
        again_best.push_back(time_algo(handle.get(), candidates.plan, candidates.results[std::size_t(best)].algo, g,
                                       workspace, stream, events));
      }
      first = median(again_first);
      best_us = median(again_best);
      if (!(best_us < first)) best = 0, best_us = first;  // it won by noise: the first choice is as good
    }
    // What alloy's gemm would run: make_plan's algorithm, expected to be the list's first.
    if (candidates.results.empty()) {
      ++mismatches;
    } else {
      const cublasLtMatmulAlgo_t chosen = alloy::detail::make_plan(handle.get(), g, workspace.bytes()).algo;
      if (std::memcmp(&chosen, &candidates.results.front().algo, sizeof(cublasLtMatmulAlgo_t)) != 0) {
        std::fprintf(stderr, "%s: make_plan's algorithm is not the list's first\n", p.name.c_str());
        ++mismatches;
      }
    }
    std::printf("| %s | %s | %s | %s | %.1f | %.1f | %d | %.3f | %zu | %d | %d |\n", p.model.c_str(), p.name.c_str(),
                shape_of(g).c_str(), epilogue_of(p).c_str(), first, best_us, best, first / best_us, us.size(), failures,
                p.per_step);
    std::fflush(stdout);
    if (std::isnan(first) || std::isnan(best_us)) continue;  // left out of the totals; the row says why
    if (by_model.empty() || by_model.back().first != p.model) by_model.push_back({p.model, {}});
    for (Totals* t : {&by_model.back().second, &all}) {
      t->first_us += double(p.per_step) * first;
      t->best_us += double(p.per_step) * best_us;
    }
  }

  std::printf(
      "\nPer training step (each product's time times its runs per step; rows whose first choice failed "
      "are left out):\n\n");
  std::printf("| model | heuristic's first choice (ms) | best of the list (ms) | saved (ms) | first / best |\n");
  std::printf("|---|---:|---:|---:|---:|\n");
  by_model.push_back({"all", all});
  for (const auto& [model, t] : by_model) {
    std::printf("| %s | %.3f | %.3f | %.3f | %.3f |\n", model.c_str(), t.first_us * 1e-3, t.best_us * 1e-3,
                (t.first_us - t.best_us) * 1e-3, t.first_us / t.best_us);
  }
  std::printf(
      "\nNotes: index is the algorithm's place in the heuristic's list (0 is what alloy runs). Not surveyed: the "
      "MLP example's embed (1024 -> 1024) and head (1024 -> 1000) Linears, and GPT-2's attention kernels, which are "
      "not cuBLASLt products. Where the best is not index 0, first and best were timed again, alternately, %d rounds, "
      "and the rows give the median of those.\n",
      confirm_rounds);
  if (mismatches > 0)
    std::printf("%d products: make_plan chose other than the list's first (stderr names them)\n", mismatches);
  ALLOY_CUDA_CHECK(cudaStreamDestroy(stream));
  return mismatches == 0 ? 0 : 1;
}
}  // namespace

int main() {
  try {
    return survey();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "alloy_gemm_algos: %s\n", e.what());
    return 1;
  }
}
