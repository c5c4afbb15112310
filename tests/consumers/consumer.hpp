// The consumer programs' model and the per-translation-unit report. The program has a g++
// translation unit (main.cpp) and, where CUDA is enabled, an nvcc one (consumer.cu); each
// describes what alloy's types are in it, and main fails when the two descriptions differ
// (one name meaning two types in one program is an ODR violation).
#pragma once

#include <alloy/alloy.hpp>

// A g++ translation unit that converts to and from CUDA's 16-bit types includes their headers
// (alloy's nvcc translation units include them; its g++ ones only declare the types).
#if ALLOY_HAS_CUDA_RUNTIME
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstring>
#include <type_traits>
#include <typeinfo>

namespace consumer {

// loss = mean over i of (w[i] - target)^2, on whichever backend the trainer gives.
struct SquaredError {
  float target;
  ALLOY_HOST_DEVICE float operator()(const float& w) const { return (w - target) * (w - target); }
};
struct SquaredErrorGrad {
  float target, factor;  // factor = 2 * loss_scale / n
  bool accumulate;
  ALLOY_HOST_DEVICE void operator()(const float& w, float& g) const {
    const float d = factor * (w - target);
    g = accumulate ? g + d : d;
  }
};

struct Quadratic {
  using batch_type = float;  // the target every weight should reach
  static constexpr std::int64_t n = 256;
  alloy::ParamHandle w;

  void declare(alloy::ParamRegistry& r) { w = r.declare("w", {n}, alloy::Init::uniform(-1.0f, 1.0f)); }

  template <class Ctx>
  float forward_backward(Ctx& ctx, const float& target) {
    const float* p = ctx.param(w).data;
    float* g = ctx.grad(w).data;
    const float inv_n = 1.0f / static_cast<float>(n);
    alloy::for_each_n(ctx.backend(), n,
                      SquaredErrorGrad{target, 2.0f * ctx.loss_scale() * inv_n, ctx.accumulate_grads()}, alloy::in(p),
                      alloy::inout(g));
    return alloy::transform_reduce(ctx.backend(), n, 0.0f, alloy::Sum{}, SquaredError{target}, alloy::in(p)) * inv_n;
  }
};

// The trainer a user writes without naming a backend.
using DefaultTrainer = alloy::Trainer<Quadratic, alloy::AdamW<>>;
// Named, never constructed: more of the library's class templates (dynamic loss scale, fp32
// accumulator, q8 state) whose layout both translation units must agree on.
using FullTrainer = alloy::Trainer<Quadratic, alloy::Precision<alloy::fp16, alloy::fp32_master>, alloy::Accumulate<2>,
                                   alloy::AdamW<alloy::State<alloy::q8>>>;
using FullHostTrainer = alloy::Trainer<Quadratic, alloy::Precision<alloy::bf16, alloy::fp32_master>,
                                       alloy::Accumulate<4>, alloy::Adafactor<>, alloy::Host>;

struct Report {
  const char* compiler;
  bool cuda_runtime;             // ALLOY_HAS_CUDA_RUNTIME
  const char* policies_backend;  // resolve_policies<AdamW<>>::backend
  const char* trainer_backend;   // DefaultTrainer::backend_type
  const char* trainer_type;      // typeid(DefaultTrainer).name()
  std::size_t trainer_size;
  double bytes_per_param;
  std::size_t other_sizes[2];  // sizeof FullTrainer, FullHostTrainer
  bool bf16_converts_to_cuda;  // bf16 <-> __nv_bfloat16 and fp16 <-> __half are part of the class
};

// Internal linkage: each translation unit gets its own copy, so the answer is its own.
namespace {
inline Report this_translation_unit(const char* compiler) {
  bool converts = false;
#if ALLOY_HAS_CUDA_RUNTIME
  converts = std::is_constructible_v<alloy::bf16, __nv_bfloat16> &&
             std::is_constructible_v<__nv_bfloat16, alloy::bf16> && std::is_constructible_v<alloy::fp16, __half> &&
             std::is_constructible_v<__half, alloy::fp16>;
#endif
  return {compiler,
          ALLOY_HAS_CUDA_RUNTIME != 0,
          alloy::resolve_policies<alloy::AdamW<>>::backend::name,
          DefaultTrainer::backend_type::name,
          typeid(DefaultTrainer).name(),
          sizeof(DefaultTrainer),
          DefaultTrainer::bytes_per_param,
          {sizeof(FullTrainer), sizeof(FullHostTrainer)},
          converts};
}
}  // namespace

inline bool same(const Report& a, const Report& b) {
  return a.cuda_runtime == b.cuda_runtime && std::strcmp(a.policies_backend, b.policies_backend) == 0 &&
         std::strcmp(a.trainer_backend, b.trainer_backend) == 0 && std::strcmp(a.trainer_type, b.trainer_type) == 0 &&
         a.trainer_size == b.trainer_size && a.bytes_per_param == b.bytes_per_param &&
         a.other_sizes[0] == b.other_sizes[0] && a.other_sizes[1] == b.other_sizes[1] &&
         a.bf16_converts_to_cuda == b.bf16_converts_to_cuda;
}

// Defined in consumer.cu (nvcc).
Report cuda_translation_unit();
// Trains the default trainer (Cuda) for a few steps: 0 when the loss fell, 1 when not, 2 when
// there is no CUDA device to run on.
int train_default_trainer_on_cuda();

}  // namespace consumer
