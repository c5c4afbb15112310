// Would choosing cuBLASLt's algorithm by timing beat the heuristic's first choice, which alloy's
// gemm takes (detail::make_plan), and how much of that gain is there among the algorithms that give
// exactly the first choice's bits? For each bf16 product of the two example models' training step,
// built as nn/linear.hpp, nn/fused_mlp.hpp and nn/lm_head.hpp build it on Cuda (transposes,
// leading dimensions, epilogue, beta), this asks the heuristic for up to 16 algorithms and
//   - times each with CUDA events (3 warm-up launches, then the median of 20 launches, each between
//     its own pair of events);
//   - reads each one's configuration (algorithm id, tile, stages, split-K and its reduction scheme,
//     CTA swizzling, cluster shape);
//   - compares each one's output bits with the first choice's: on two random fillings of the
//     inputs, each run starts from the same outputs (C refilled, so a product with beta = 1 adding
//     to its own output reads the same C every time), and a 64-bit hash of the raw bits of what the
//     product writes (C, the pre-activation of a GELU_AUX epilogue, a bias gradient) is compared
//     with the first choice's; "same bits" means equal on both fillings. The first choice is run
//     again after the others on each filling, to check it reproduces itself.
// It prints a Markdown row per product: the first choice's time, the best time of the list and of
// its same-bits algorithms (with their indices in the heuristic's list), then every candidate of
// the GPT-2 LM head's products and of GPT-2's dGELU product (mlp.c_proj's input gradient), then
// the totals of one training step (each product weighed by how often a step runs it).
//
// Run on the GPU: build/gpu/benchmarks/alloy_gemm_algos [--all] (--all lists every product's
// candidates). It takes about 4 s on the H200 (cuBLASLt 13.1).
// Pointers come from cudaMalloc (256-byte aligned), as the workspace's and the parameter arena's
// are, so the heuristic is asked the question alloy's gemm asks.
#include <alloy/alloy.hpp>
#include <alloy/kernels/gemm.hpp>
#include <alloy/nn/lm_head.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <sstream>
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
constexpr int bit_fillings = 2;  // random fillings of the inputs a candidate must match the first choice on

// Uniform values in [-scale, scale): random, so no kernel runs on zeros.
__global__ void fill_uniform(bf16* p, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    p[i] = bf16((static_cast<float>(alloy::random_bits(seed, i)) * 0x1p-31f - 1.0f) * scale);
  }
}

void fill(Buffer<bf16, Cuda>& b, std::uint64_t seed, float scale, cudaStream_t stream) {
  if (b.size() == 0) return;
  fill_uniform<<<1024, 256, 0, stream>>>(b.data(), b.size(), seed, scale);
  ALLOY_CUDA_CHECK(cudaGetLastError());
}

// splitmix64's finalizer: a bijection of 64-bit words that mixes every input bit into every output bit.
__device__ std::uint64_t mix64(std::uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Adds to *sum a hash of n 16-bit words: the sum (mod 2^64) of mix64(index << 16 | bits, salted),
// one term per element, distinct for each (index, bits) pair. Addition is commutative, so the
// result does not depend on the order the atomics land in.
__global__ void hash_bits(const std::uint16_t* p, std::size_t n, std::uint64_t salt, unsigned long long* sum) {
  unsigned long long h = 0;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    h += mix64(((std::uint64_t(i) << 16) | p[i]) ^ salt);
  }
  for (int offset = 16; offset > 0; offset /= 2) h += __shfl_xor_sync(0xffffffffu, h, offset);
  if (threadIdx.x % 32 == 0) atomicAdd(sum, h);
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

// Linear(in, out)'s products over `rows` rows, as nn/linear.hpp builds them on Cuda (every Linear
// of both models has a bias).
// forward_into: y = x W^T + b (+ residual as c_in, beta = 1), or GELU of it keeping the
// pre-activation (GELU_AUX_BIAS).
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

// input_gradient_into: dx = dy W, or (dy W) * gelu'(pre) when the layer before is GELU (16-bit
// mlp_backward: Epilogue::dgelu_tanh, without the previous layer's bias gradient, which up's own
// weight gradient gives).
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

// weight_gradient on Cuda: dW = dy^T x with Epilogue::none; db comes afterwards from alloy's
// column sums kernel, not from the product. beta = 0: with bf16 and fp32 master weights the
// trainer has an fp32 accumulator, so ctx.accumulate_grads() is false.
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
          .epilogue = Epilogue::none};
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
  // micro-batch per step. Per block: attn.c_attn (after ln_1), attn.c_proj (adds the residual),
  // mlp.c_fc (after ln_2, GELU in its epilogue), mlp.c_proj (adds the residual; its input gradient
  // carries GELU's gradient).
  {
    constexpr std::size_t rows = 16 * 1024, c = 768;
    add_linear(p, "gpt2", "attn.c_attn", rows, c, 3 * c, 12, false, false, false);
    add_linear(p, "gpt2", "attn.c_proj", rows, c, c, 12, true, false, false);
    add_linear(p, "gpt2", "mlp.c_fc", rows, c, 4 * c, 12, false, true, false);
    add_linear(p, "gpt2", "mlp.c_proj", rows, 4 * c, c, 12, true, false, true);
    // LmHead: chunks of 8192 rows (LmHeadConfig::default_chunk_rows), so two per micro-batch; W is
    // wte [50304, 768]. Per chunk (lm_head.hpp's chunks): logits = y W^T; dy = dlogits W;
    // dW (+)= dlogits^T y, written by the first chunk (beta = 0) and added by the second (beta = 1,
    // C read from dW itself: no c_in). No epilogue on any of them.
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
                 {.transa = Transpose::no,
                  .transb = Transpose::no,
                  .m = chunk,
                  .n = c,
                  .k = vocab,
                  .lda = vocab,
                  .ldb = c,
                  .ldc = c},
                 false,
                 int(chunks)});
    for (const float beta : {0.0f, 1.0f}) {
      p.push_back({"gpt2",
                   beta == 0.0f ? "lm_head weight gradient (first chunk)" : "lm_head weight gradient (later chunks)",
                   {.transa = Transpose::yes,
                    .transb = Transpose::no,
                    .m = vocab,
                    .n = c,
                    .k = chunk,
                    .lda = vocab,
                    .ldb = c,
                    .ldc = c,
                    .beta = beta},
                   false,
                   beta == 0.0f ? 1 : int(chunks) - 1});
    }
  }
  return p;
}

// The operands of one product, random, and its arguments pointing at them. fill_inputs and
// reset_outputs (on `stream`) give every run the same starting state for a given filling.
struct Operands {
  Buffer<bf16, Cuda> a, b, c, c_in, bias, pre_activation;
  Buffer<bf16, Cuda> bias_grad;
  GemmArgs<bf16> args;

  Operands(const Product& p, cudaStream_t stream) : args(p.args) {
    GemmArgs<bf16>& g = args;
    const std::size_t a_rows = g.transa == Transpose::yes ? g.k : g.m;
    const std::size_t b_rows = g.transb == Transpose::yes ? g.n : g.k;
    a = Buffer<bf16, Cuda>(a_rows * g.lda);
    b = Buffer<bf16, Cuda>(b_rows * g.ldb);
    c = Buffer<bf16, Cuda>(g.m * g.ldc);
    g.a = a.data(), g.b = b.data(), g.c = c.data();
    if (p.residual) {
      c_in = Buffer<bf16, Cuda>(g.m * g.ldc);
      g.c_in = c_in.data();
    }
    if (alloy::detail::adds_bias(g.epilogue)) {
      bias = Buffer<bf16, Cuda>(g.n);
      g.bias = bias.data();
    }
    if (alloy::detail::writes_bias_grad(g.epilogue)) {
      bias_grad = Buffer<bf16, Cuda>(alloy::detail::bias_grad_size(g));
      g.bias_grad = bias_grad.data();
    }
    if (g.ld_pre_activation != 0) {  // written by GELU_AUX, read by DGELU
      pre_activation = Buffer<bf16, Cuda>(g.m * g.ld_pre_activation);
      g.pre_activation = pre_activation.data();
    }
    alloy::detail::check_gemm_args(g);
    fill_inputs(0, stream);
    reset_outputs(0, stream);
    ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  // What the product reads, random (filling 0 is what the times are measured on).
  void fill_inputs(int filling, cudaStream_t stream) {
    const std::uint64_t base = 100 * std::uint64_t(filling);
    fill(a, base + 1, 1.0f, stream);
    fill(b, base + 2, 0.02f, stream);
    fill(c_in, base + 4, 1.0f, stream);
    fill(bias, base + 5, 0.1f, stream);
    if (alloy::detail::applies_gelu_gradient(args.epilogue)) fill(pre_activation, base + 6, 2.0f, stream);
  }

  // What the product writes, back to the state every run of this filling starts from: C (read
  // too when beta != 0 and there is no c_in), GELU_AUX's pre-activation, the bias gradient.
  void reset_outputs(int filling, cudaStream_t stream) {
    const std::uint64_t base = 100 * std::uint64_t(filling);
    fill(c, base + 3, 1.0f, stream);
    if (alloy::detail::applies_gelu(args.epilogue)) fill(pre_activation, base + 7, 2.0f, stream);
    if (bias_grad.size() > 0) ALLOY_CUDA_CHECK(cudaMemsetAsync(bias_grad.data(), 0, bias_grad.bytes(), stream));
  }
};

// A hash of the raw bits of everything the product writes: C, GELU_AUX's pre-activation, the
// bias gradient (one word each).
using OutputHash = std::array<std::uint64_t, 3>;

class Hasher {
 public:
  Hasher() : sums_(std::tuple_size_v<OutputHash>) {}

  OutputHash operator()(const Operands& o, cudaStream_t stream) {
    ALLOY_CUDA_CHECK(cudaMemsetAsync(sums_.data(), 0, sums_.bytes(), stream));
    add(o.c, 0, stream);
    if (alloy::detail::applies_gelu(o.args.epilogue)) add(o.pre_activation, 1, stream);
    add(o.bias_grad, 2, stream);
    OutputHash h{};
    ALLOY_CUDA_CHECK(cudaMemcpyAsync(h.data(), sums_.data(), sums_.bytes(), cudaMemcpyDeviceToHost, stream));
    ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
    return h;
  }

 private:
  void add(const Buffer<bf16, Cuda>& b, std::size_t slot, cudaStream_t stream) {
    if (b.size() == 0) return;
    static_assert(sizeof(bf16) == sizeof(std::uint16_t));
    hash_bits<<<1024, 256, 0, stream>>>(reinterpret_cast<const std::uint16_t*>(b.data()), b.size(),
                                        0x9e3779b97f4a7c15ull * (slot + 1),
                                        reinterpret_cast<unsigned long long*>(sums_.data() + slot));
    ALLOY_CUDA_CHECK(cudaGetLastError());
  }

  Buffer<std::uint64_t, Cuda> sums_;
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

// ---- an algorithm's configuration, as cuBLASLt reports it ----

// An attribute's value without a name: "#" and the number. (Built with snprintf: GCC 12 warns
// falsely, -Wrestrict, about "#" + std::to_string(...).)
std::string numbered(std::uint32_t id) {
  char text[16];
  std::snprintf(text, sizeof text, "#%u", id);
  return text;
}

// The values of cublasLtMatmulTile_t (cublasLt.h of CUDA 13.0), in order from 0.
constexpr const char* tile_names =
    "- 8x8 8x16 16x8 8x32 16x16 32x8 8x64 16x32 32x16 64x8 32x32 32x64 64x32 32x128 64x64 128x32 64x128 "
    "128x64 64x256 128x128 256x64 64x512 128x256 256x128 512x64 64x96 96x64 96x128 128x160 160x128 192x128 "
    "128x192 128x96 32x256 256x32 8x128 8x192 8x256 8x320 8x384 8x448 8x512 8x576 8x640 8x704 8x768 16x64 "
    "16x128 16x192 16x256 16x320 16x384 16x448 16x512 16x576 16x640 16x704 16x768 24x64 24x128 24x192 24x256 "
    "24x320 24x384 24x448 24x512 24x576 24x640 24x704 24x768 32x192 32x320 32x384 32x448 32x512 32x576 "
    "32x640 32x704 32x768 40x64 40x128 40x192 40x256 40x320 40x384 40x448 40x512 40x576 40x640 40x704 40x768 "
    "48x64 48x128 48x192 48x256 48x320 48x384 48x448 48x512 48x576 48x640 48x704 48x768 56x64 56x128 56x192 "
    "56x256 56x320 56x384 56x448 56x512 56x576 56x640 56x704 56x768 64x192 64x320 64x384 64x448 64x576 "
    "64x640 64x704 64x768 72x64 72x128 72x192 72x256 72x320 72x384 72x448 72x512 72x576 72x640 80x64 80x128 "
    "80x192 80x256 80x320 80x384 80x448 80x512 80x576 88x64 88x128 88x192 88x256 88x320 88x384 88x448 88x512 "
    "96x192 96x256 96x320 96x384 96x448 96x512 104x64 104x128 104x192 104x256 104x320 104x384 104x448 112x64 "
    "112x128 112x192 112x256 112x320 112x384 120x64 120x128 120x192 120x256 120x320 120x384 128x320 128x384 "
    "136x64 136x128 136x192 136x256 136x320 144x64 144x128 144x192 144x256 144x320 152x64 152x128 152x192 "
    "152x256 152x320 160x64 160x192 160x256 168x64 168x128 168x192 168x256 176x64 176x128 176x192 176x256 "
    "184x64 184x128 184x192 184x256 192x64 192x192 192x256 200x64 200x128 200x192 208x64 208x128 208x192 "
    "216x64 216x128 216x192 224x64 224x128 224x192 232x64 232x128 232x192 240x64 240x128 240x192 248x64 "
    "248x128 248x192 256x192 264x64 264x128 272x64 272x128 280x64 280x128 288x64 288x128 296x64 296x128 "
    "304x64 304x128 312x64 312x128 320x64 320x128 328x64 328x128 336x64 336x128 344x64 344x128 352x64 "
    "352x128 360x64 360x128 368x64 368x128 376x64 376x128 384x64 384x128 392x64 400x64 408x64 416x64 424x64 "
    "432x64 440x64 448x64 456x64 464x64 472x64 480x64 488x64 496x64 504x64 520x64 528x64 536x64 544x64 "
    "552x64 560x64 568x64 576x64 584x64 592x64 600x64 608x64 616x64 624x64 632x64 640x64 648x64 656x64 "
    "664x64 672x64 680x64 688x64 696x64 704x64 712x64 720x64 728x64 736x64 744x64 752x64 760x64 768x64 64x16 "
    "64x24 64x40 64x48 64x56 64x72 64x80 64x88 64x104 64x112 64x120 64x136 64x144 64x152 64x160 64x168 "
    "64x176 64x184 64x200 64x208 64x216 64x224 64x232 64x240 64x248 64x264 64x272 64x280 64x288 64x296 "
    "64x304 64x312 64x328 64x336 64x344 64x352 64x360 64x368 64x376 64x392 64x400 64x408 64x416 64x424 "
    "64x432 64x440 64x456 64x464 64x472 64x480 64x488 64x496 64x504 64x520 64x528 64x536 64x544 64x552 "
    "64x560 64x568 64x584 64x592 64x600 64x608 64x616 64x624 64x632 64x648 64x656 64x664 64x672 64x680 "
    "64x688 64x696 64x712 64x720 64x728 64x736 64x744 64x752 64x760 128x8 128x16 128x24 128x40 128x48 128x56 "
    "128x72 128x80 128x88 128x104 128x112 128x120 128x136 128x144 128x152 128x168 128x176 128x184 128x200 "
    "128x208 128x216 128x224 128x232 128x240 128x248 128x264 128x272 128x280 128x288 128x296 128x304 128x312 "
    "128x328 128x336 128x344 128x352 128x360 128x368 128x376 128x392 128x400 128x408 128x416 128x424 128x432 "
    "128x440 128x448 128x456 128x464 128x472 128x480 128x488 128x496 128x504 128x512 192x8 192x16 192x24 "
    "192x32 192x40 192x48 192x56 192x72 192x80 192x88 192x96 192x104 192x112 192x120 192x136 192x144 192x152 "
    "192x160 192x168 192x176 192x184 192x200 192x208 192x216 192x224 192x232 192x240 192x248 192x264 192x272 "
    "192x280 192x288 192x296 192x304 192x312 192x320 192x328 192x336 256x8 256x16 256x24 256x40 256x48 "
    "256x56 256x72 256x80 256x88 256x96 256x104 256x112 256x120 256x136 256x144 256x152 256x160 256x168 "
    "256x176 256x184 256x200 256x208 256x216 256x224 256x232 256x240 256x248 256x256 320x8 320x16 320x24 "
    "320x32 320x40 320x48 320x56 320x72 320x80 320x88 320x96 320x104 320x112 320x120 320x136 320x144 320x152 "
    "320x160 320x168 320x176 320x184 320x192 320x200 384x8 384x16 384x24 384x32 384x40 384x48 384x56 384x72 "
    "384x80 384x88 384x96 384x104 384x112 384x120 384x136 384x144 384x152 384x160 384x168 448x8 448x16 "
    "448x24 448x32 448x40 448x48 448x56 448x72 448x80 448x88 448x96 448x104 448x112 448x120 448x128 448x136 "
    "448x144 512x8 512x16 512x24 512x32 512x40 512x48 512x56 512x72 512x80 512x88 512x96 512x104 512x112 "
    "512x120 512x128 576x8 576x16 576x24 576x32 576x40 576x48 576x56 576x72 576x80 576x88 576x96 576x104 "
    "576x112 640x8 640x16 640x24 640x32 640x40 640x48 640x56 640x72 640x80 640x88 640x96 704x8 704x16 704x24 "
    "704x32 704x40 704x48 704x56 704x72 704x80 704x88 768x8 768x16 768x24 768x32 768x40 768x48 768x56 768x72 "
    "768x80 256x512 256x1024 512x512 512x1024";

std::string tile_name(std::uint32_t id) {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    std::istringstream in(tile_names);
    for (std::string s; in >> s;) v.push_back(s);
    return v;
  }();
  // Names only when this cublasLt.h has the table's values; the id otherwise.
  if (names.size() == std::size_t(CUBLASLT_MATMUL_TILE_END) && id < names.size()) return names[id];
  return numbered(id);
}

struct Named {
  std::uint32_t id;
  const char* name;
};

// cublasLtMatmulStages_t and cublasLtClusterShape_t of cublasLt.h (CUDA 13.0).
constexpr Named stage_names[] = {{0, "-"},         {1, "16x1"},     {2, "16x2"},     {3, "16x3"},     {4, "16x4"},
                                 {5, "16x5"},      {6, "16x6"},     {7, "32x1"},     {8, "32x2"},     {9, "32x3"},
                                 {10, "32x4"},     {11, "32x5"},    {12, "32x6"},    {13, "64x1"},    {14, "64x2"},
                                 {15, "64x3"},     {16, "64x4"},    {17, "64x5"},    {18, "64x6"},    {19, "128x1"},
                                 {20, "128x2"},    {21, "128x3"},   {22, "128x4"},   {23, "128x5"},   {24, "128x6"},
                                 {25, "32x10"},    {26, "8x4"},     {27, "16x10"},   {28, "8x5"},     {31, "8x3"},
                                 {32, "8xAUTO"},   {33, "16xAUTO"}, {34, "32xAUTO"}, {35, "64xAUTO"}, {36, "128xAUTO"},
                                 {37, "256xAUTO"}, {38, "768xAUTO"}};
constexpr Named cluster_names[] = {
    {0, "auto"},    {2, "1x1x1"},   {3, "2x1x1"},   {4, "4x1x1"},   {5, "1x2x1"},   {6, "2x2x1"},   {7, "4x2x1"},
    {8, "1x4x1"},   {9, "2x4x1"},   {10, "4x4x1"},  {11, "8x1x1"},  {12, "1x8x1"},  {13, "8x2x1"},  {14, "2x8x1"},
    {15, "16x1x1"}, {16, "1x16x1"}, {17, "3x1x1"},  {18, "5x1x1"},  {19, "6x1x1"},  {20, "7x1x1"},  {21, "9x1x1"},
    {22, "10x1x1"}, {23, "11x1x1"}, {24, "12x1x1"}, {25, "13x1x1"}, {26, "14x1x1"}, {27, "15x1x1"}, {28, "3x2x1"},
    {29, "5x2x1"},  {30, "6x2x1"},  {31, "7x2x1"},  {32, "1x3x1"},  {33, "2x3x1"},  {34, "3x3x1"},  {35, "4x3x1"},
    {36, "5x3x1"},  {37, "3x4x1"},  {38, "1x5x1"},  {39, "2x5x1"},  {40, "3x5x1"},  {41, "1x6x1"},  {42, "2x6x1"},
    {43, "1x7x1"},  {44, "2x7x1"},  {45, "1x9x1"},  {46, "1x10x1"}, {47, "1x11x1"}, {48, "1x12x1"}, {49, "1x13x1"},
    {50, "1x14x1"}, {51, "1x15x1"}};

template <std::size_t N>
std::string name_in(const Named (&table)[N], bool current, std::uint32_t id) {
  if (current) {
    for (const Named& n : table) {
      if (n.id == id) return n.name;
    }
  }
  return numbered(id);
}

std::string stages_name(std::uint32_t id) { return name_in(stage_names, CUBLASLT_MATMUL_STAGES_END == 39, id); }
std::string cluster_name(std::uint32_t id) { return name_in(cluster_names, CUBLASLT_CLUSTER_SHAPE_END == 52, id); }

std::string reduction_name(std::uint32_t scheme) {
  switch (scheme) {
    case CUBLASLT_REDUCTION_SCHEME_NONE:
      return "none";
    case CUBLASLT_REDUCTION_SCHEME_INPLACE:
      return "inplace";
    case CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE:
      return "compute type";
    case CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE:
      return "output type";
    default:
      return numbered(scheme);
  }
}

struct AlgoConfig {
  std::int32_t id = -1, split_k = 1;
  std::uint32_t tile = 0, stages = 0, reduction = 0, swizzle = 0;
  std::uint16_t cluster = 0;
  bool complete = true;  // every attribute was read
};

AlgoConfig config_of(const cublasLtMatmulAlgo_t& algo) {
  AlgoConfig c;
  const auto get = [&](cublasLtMatmulAlgoConfigAttributes_t attribute, auto& value) {
    std::size_t written = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(&algo, attribute, &value, sizeof(value), &written) !=
            CUBLAS_STATUS_SUCCESS ||
        written != sizeof(value)) {
      c.complete = false;
    }
  };
  get(CUBLASLT_ALGO_CONFIG_ID, c.id);
  get(CUBLASLT_ALGO_CONFIG_TILE_ID, c.tile);
  get(CUBLASLT_ALGO_CONFIG_STAGES_ID, c.stages);
  get(CUBLASLT_ALGO_CONFIG_SPLITK_NUM, c.split_k);
  get(CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, c.reduction);
  get(CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, c.swizzle);
  get(CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, c.cluster);
  return c;
}

// Split-K as "1", or "4, compute type" with its reduction scheme.
std::string split_k_of(const AlgoConfig& c) {
  if (c.split_k <= 1) return std::to_string(c.split_k);
  return std::to_string(c.split_k) + ", " + reduction_name(c.reduction);
}

// ---- one product surveyed ----

enum class Bits { same, differ, failed };

const char* name_of(Bits b) { return b == Bits::same ? "yes" : b == Bits::differ ? "no" : "failed"; }

struct Candidate {
  AlgoConfig config;
  std::size_t workspace = 0;
  float us = failed;
  Bits bits = Bits::failed;
};

struct Survey {
  const Product* product = nullptr;
  std::vector<Candidate> candidates;
  float first_us = failed, best_us = failed, best_same_us = failed;
  int best = -1, best_same = -1;  // indices in the heuristic's list; best_same -1: no other one has the first's bits
  int same = 0, failures = 0;     // candidates with the first's bits (the first included), failed launches
  bool reproducible = false;      // the first choice gave its own bits again on every filling
  bool plan_mismatch = false;     // make_plan chose other than the list's first
};

// Which candidates give the first choice's bits, on bit_fillings random fillings of the inputs.
void compare_bits(cublasLtHandle_t handle, const alloy::detail::GemmCandidates& list, Operands& operands,
                  Buffer<std::byte, Cuda>& workspace, cudaStream_t stream, Hasher& hash, Survey& s) {
  const std::size_t n = list.results.size();
  std::vector<int> matches(n, 0);
  std::vector<bool> launched(n, true);
  for (int filling = 0; filling < bit_fillings; ++filling) {
    operands.fill_inputs(filling, stream);
    const auto run = [&](std::size_t i) -> std::optional<OutputHash> {
      operands.reset_outputs(filling, stream);
      if (list.results[i].state != CUBLAS_STATUS_SUCCESS ||
          launch(handle, list.plan, list.results[i].algo, operands.args, workspace, stream) != CUBLAS_STATUS_SUCCESS) {
        launched[i] = false;
        return std::nullopt;
      }
      return hash(operands, stream);
    };
    const std::optional<OutputHash> reference = run(0);
    if (!reference) break;
    for (std::size_t i = 1; i < n; ++i) {
      const std::optional<OutputHash> h = run(i);
      if (h && *h == *reference) ++matches[i];
    }
    const std::optional<OutputHash> again = run(0);
    if (again && *again == *reference) ++matches[0];
  }
  for (std::size_t i = 0; i < n; ++i) {  // nothing compares with a first choice that failed
    s.candidates[i].bits = !launched[i] || !launched[0] ? Bits::failed
                           : matches[i] == bit_fillings ? Bits::same
                                                        : Bits::differ;
  }
  s.reproducible = s.candidates[0].bits == Bits::same;
  // Back to the filling the times are measured on.
  operands.fill_inputs(0, stream);
  operands.reset_outputs(0, stream);
}

Survey survey_product(cublasLtHandle_t handle, const Product& p, Buffer<std::byte, Cuda>& workspace,
                      cudaStream_t stream, std::vector<alloy::CudaEvent>& events, Hasher& hash) {
  Survey s;
  s.product = &p;
  Operands operands(p, stream);
  const GemmArgs<bf16>& g = operands.args;
  const alloy::detail::GemmCandidates list =
      alloy::detail::heuristic_algos(handle, g, workspace.bytes(), requested_algos);
  if (list.results.empty()) return s;
  // What alloy's gemm would run: make_plan's algorithm, expected to be the list's first.
  const cublasLtMatmulAlgo_t chosen = alloy::detail::make_plan(handle, g, workspace.bytes()).algo;
  if (std::memcmp(&chosen, &list.results.front().algo, sizeof(cublasLtMatmulAlgo_t)) != 0) {
    std::fprintf(stderr, "%s: make_plan's algorithm is not the list's first\n", p.name.c_str());
    s.plan_mismatch = true;
  }
  for (const cublasLtMatmulHeuristicResult_t& r : list.results) {
    s.candidates.push_back({.config = config_of(r.algo), .workspace = r.workspaceSize});
  }
  // The bits first, so that the timings and their re-timing below run back to back, as before.
  compare_bits(handle, list, operands, workspace, stream, hash, s);
  ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (std::size_t i = 0; i < list.results.size(); ++i) {
    const cublasLtMatmulHeuristicResult_t& r = list.results[i];
    Candidate& c = s.candidates[i];
    c.us =
        r.state == CUBLAS_STATUS_SUCCESS ? time_algo(handle, list.plan, r.algo, g, workspace, stream, events) : failed;
    s.failures += std::isnan(c.us) ? 1 : 0;
  }

  const auto fastest = [&](bool same_only) {
    int best = -1;
    for (int i = 0; i < int(s.candidates.size()); ++i) {
      const Candidate& c = s.candidates[std::size_t(i)];
      if (std::isnan(c.us) || (same_only && c.bits != Bits::same)) continue;
      if (best < 0 || c.us < s.candidates[std::size_t(best)].us) best = i;
    }
    return best;
  };
  for (const Candidate& c : s.candidates) s.same += c.bits == Bits::same ? 1 : 0;
  s.first_us = s.candidates.front().us;
  s.best = fastest(false);
  s.best_same = s.same > 1 ? std::max(fastest(true), 0) : -1;  // -1: no candidate but the first has its bits
  s.best_us = s.best < 0 ? failed : s.candidates[std::size_t(s.best)].us;
  s.best_same_us = s.best_same < 0 ? s.first_us : s.candidates[std::size_t(s.best_same)].us;
  if (std::isnan(s.first_us)) return s;

  // A best other than the first may have won by noise: the first and the bests are timed again,
  // alternately, and the rows report the median of those rounds.
  std::vector<int> again;
  for (const int i : {0, s.best, s.best_same}) {
    if (i >= 0 && std::find(again.begin(), again.end(), i) == again.end()) again.push_back(i);
  }
  if (again.size() > 1) {
    std::vector<std::vector<float>> rounds(again.size());
    for (int round = 0; round < confirm_rounds; ++round) {
      for (std::size_t j = 0; j < again.size(); ++j) {
        rounds[j].push_back(
            time_algo(handle, list.plan, list.results[std::size_t(again[j])].algo, g, workspace, stream, events));
      }
    }
    const auto retimed = [&](int i) {
      return median(rounds[std::size_t(std::find(again.begin(), again.end(), i) - again.begin())]);
    };
    s.first_us = retimed(0);
    if (s.best > 0) s.best_us = retimed(s.best);
    if (s.best_same > 0) s.best_same_us = retimed(s.best_same);
    // One that won by noise: the first choice is as good.
    if (!(s.best_us < s.first_us)) s.best = 0, s.best_us = s.first_us;
    if (s.best_same >= 0 && !(s.best_same_us < s.first_us)) s.best_same = 0, s.best_same_us = s.first_us;
    if (s.best_same < 0) s.best_same_us = s.first_us;
    if (s.best_same_us < s.best_us) s.best = s.best_same, s.best_us = s.best_same_us;  // same bits is a subset
  } else {
    s.best_same_us = s.first_us;
  }

  return s;
}

struct Totals {
  double first_us = 0, best_us = 0, best_same_us = 0;
};

std::string shape_of(const GemmArgs<bf16>& g) {
  return std::to_string(g.m) + " " + std::to_string(g.n) + " " + std::to_string(g.k);
}

std::string epilogue_of(const Product& p) {
  std::string e = alloy::detail::name_of(p.args.epilogue);
  if (alloy::detail::applies_gelu(p.args.epilogue) && p.args.ld_pre_activation != 0) e += " (GELU_AUX)";
  if (p.residual) e += ", residual c_in";
  if (p.args.beta != 0.0f) e += ", beta 1";
  return e;
}

std::string time_at(float us, int index) {
  char text[64];
  std::snprintf(text, sizeof text, "%.1f (%d)", double(us), index);
  return text;
}

// Every candidate of one product: a row each.
void print_candidates(const Survey& s) {
  for (std::size_t i = 0; i < s.candidates.size(); ++i) {
    const Candidate& c = s.candidates[i];
    const AlgoConfig& a = c.config;
    std::printf("| %s | %zu | %.1f | %s | %d | %s | %s | %s | %u | %s | %zu |%s\n", s.product->name.c_str(), i,
                double(c.us), name_of(c.bits), a.id, tile_name(a.tile).c_str(), stages_name(a.stages).c_str(),
                split_k_of(a).c_str(), a.swizzle, cluster_name(a.cluster).c_str(), c.workspace >> 10,
                a.complete ? "" : " (some attributes unread)");
  }
}

bool detailed(const Product& p) {
  return p.model == "gpt2" && (p.name.rfind("lm_head", 0) == 0 || p.name == "mlp.c_proj input gradient");
}

int survey(bool all_candidates) {
  if (!alloy::has_cuda_device()) {
    std::fprintf(stderr, "alloy_gemm_algos: no CUDA device\n");
    return 1;
  }
  const auto start = std::chrono::steady_clock::now();
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
  Hasher hash;

  int device = 0;
  cudaDeviceProp prop{};
  ALLOY_CUDA_CHECK(cudaGetDevice(&device));
  ALLOY_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  std::printf(
      "cuBLASLt %zu on %s; bf16, fp32 accumulation, workspace %zu MiB; up to %d heuristic algorithms, each timed as "
      "the median of %d launches after %d warm-up ones; same bits: the first choice's output hash on %d random "
      "fillings\n\n",
      cublasLtGetVersion(), prop.name, alloy::GemmHandle::default_workspace_bytes >> 20, requested_algos,
      timed_launches, warmup_launches, bit_fillings);

  const std::vector<Product> all_products = products();
  {  // clocks up before the first row: the LM head's logits product, about a second
    const Product& big = *std::find_if(all_products.begin(), all_products.end(),
                                       [](const Product& p) { return p.name == "lm_head logits"; });
    const Operands operands(big, stream);
    const alloy::detail::GemmPlan plan = alloy::detail::make_plan(handle.get(), operands.args, workspace.bytes());
    for (int i = 0; i < 1000; ++i)
      ALLOY_CUBLAS_CHECK(launch(handle.get(), plan, plan.algo, operands.args, workspace, stream));
    ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  std::printf(
      "| model | product | m n k | epilogue | per step | first (us) | best (us) (index) | best same bits (us) "
      "(index) | same bits / tried | first's split-K |\n");
  std::printf("|---|---|---|---|---:|---:|---:|---:|---:|---|\n");
  Totals all;
  int mismatches = 0, unreproducible = 0;
  std::vector<std::pair<std::string, Totals>> by_model;
  std::vector<Survey> surveys;
  for (const Product& p : all_products) {
    Survey s = survey_product(handle.get(), p, workspace, stream, events, hash);
    if (s.candidates.empty() || s.plan_mismatch) ++mismatches;
    if (!s.candidates.empty() && !s.reproducible) ++unreproducible;
    const std::string first_split = s.candidates.empty() ? "-" : split_k_of(s.candidates.front().config);
    std::string tried = std::to_string(s.same) + " / " + std::to_string(s.candidates.size());
    if (s.failures > 0) tried += " (" + std::to_string(s.failures) + " failed)";
    if (!s.candidates.empty() && !s.reproducible) tried += ", first not reproducible";
    std::printf("| %s | %s | %s | %s | %d | %.1f | %s | %s | %s | %s |\n", p.model.c_str(), p.name.c_str(),
                shape_of(p.args).c_str(), epilogue_of(p).c_str(), p.per_step, double(s.first_us),
                time_at(s.best_us, s.best).c_str(),
                s.best_same < 0 ? "-" : time_at(s.best_same_us, s.best_same).c_str(), tried.c_str(),
                first_split.c_str());
    std::fflush(stdout);
    surveys.push_back(std::move(s));
    const Survey& done = surveys.back();
    if (std::isnan(done.first_us) || std::isnan(done.best_us) || std::isnan(done.best_same_us)) continue;
    if (by_model.empty() || by_model.back().first != p.model) by_model.push_back({p.model, {}});
    for (Totals* t : {&by_model.back().second, &all}) {
      t->first_us += double(p.per_step) * done.first_us;
      t->best_us += double(p.per_step) * done.best_us;
      t->best_same_us += double(p.per_step) * done.best_same_us;
    }
  }

  std::printf(
      "\nEvery candidate of %s (us: the first timing, before any re-timing; workspace: what the algorithm asks "
      "for):\n\n",
      all_candidates ? "every product" : "the GPT-2 LM head's products and GPT-2's dGELU product");
  std::printf(
      "| product | index | us | same bits | algo | tile | stages | split-K | swizzle | cluster | workspace (KiB) |\n");
  std::printf("|---|---:|---:|---|---:|---|---|---|---:|---|---:|\n");
  for (const Survey& s : surveys) {
    if (all_candidates || detailed(*s.product)) print_candidates(s);
  }

  std::printf(
      "\nPer training step (each product's time times its runs per step; rows whose first choice failed are left "
      "out):\n\n");
  std::printf(
      "| model | heuristic's first choice (ms) | best of the list (ms) | best with the first's bits (ms) | first / "
      "best | first / best same bits |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  by_model.push_back({"all", all});
  for (const auto& [model, t] : by_model) {
    std::printf("| %s | %.3f | %.3f | %.3f | %.3f | %.3f |\n", model.c_str(), t.first_us * 1e-3, t.best_us * 1e-3,
                t.best_same_us * 1e-3, t.first_us / t.best_us, t.first_us / t.best_same_us);
  }
  std::printf(
      "\nNotes: index is the algorithm's place in the heuristic's list (0 is what alloy runs; GemmTuning::timed "
      "tries the first %d, and not for a product adding to its own output, the LM head's later chunks). \"-\": no "
      "candidate but the first gives its bits. Where a best is not index 0, it and the first were timed again, "
      "alternately, %d rounds, and the rows give the median of those. Not surveyed: the MLP example's embed "
      "(1024 -> 1024) and head (1024 -> 1000) Linears, the bias gradients' column sums, and GPT-2's attention "
      "kernels, which are not cuBLASLt products.\n",
      alloy::gemm_timed_candidates, confirm_rounds);
  if (unreproducible > 0) {
    std::printf("%d products: the first choice did not reproduce its own bits (its same-bits column means little)\n",
                unreproducible);
  }
  if (mismatches > 0)
    std::printf("%d products: make_plan chose other than the list's first, or there was no list (stderr names them)\n",
                mismatches);
  ALLOY_CUDA_CHECK(cudaStreamDestroy(stream));
  std::printf("\nSurvey took %.1f s.\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return mismatches == 0 ? 0 : 1;
}
}  // namespace

int main(int argc, char** argv) {
  bool all_candidates = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--all") == 0) {
      all_candidates = true;
    } else {
      std::fprintf(stderr, "usage: alloy_gemm_algos [--all]\n");
      return 2;
    }
  }
  try {
    return survey(all_candidates);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "alloy_gemm_algos: %s\n", e.what());
    return 1;
  }
}
