// A consumer's program: uses alloy's public header from a g++ translation unit, checks a few
// results, trains on the Host backend, and (with CONSUMER_HAS_CUDA_TU) checks that its nvcc
// translation unit sees the same types and trains the default trainer there.
#include "consumer.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

void print(const consumer::Report& r) {
  std::printf(
      "  %-4s TU: CUDA runtime %d, resolve_policies<AdamW<>>::backend %s, Trainer<M, AdamW<>>::backend_type %s, "
      "sizeof %zu (others %zu, %zu), %.2f bytes/param, bf16<->__nv_bfloat16 %d\n    type %s\n",
      r.compiler, int(r.cuda_runtime), r.policies_backend, r.trainer_backend, r.trainer_size, r.other_sizes[0],
      r.other_sizes[1], r.bytes_per_param, int(r.bf16_converts_to_cuda), r.trainer_type);
}

int fail(const char* what) {
  std::printf("FAILED: %s\n", what);
  return 1;
}

}  // namespace

int main() {
  std::vector<float> x(1000);
  std::vector<alloy::bf16> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.5f * static_cast<float>(i);
  alloy::for_each_n(
      alloy::Host{}, x.size(), [](const float& a, alloy::bf16& b) { b = alloy::bf16(a); }, alloy::in(x.data()),
      alloy::out(y.data()));
  const float sum = alloy::reduce_sum(alloy::Host{}, x.data(), x.size());
  const bool ok = sum == 249750.0f && static_cast<float>(y[3]) == 1.5f && alloy::fp16(2.0f).bits() == 0x4000;
  std::printf("alloy %d.%d.%d consumer: %s\n", ALLOY_VERSION_MAJOR, ALLOY_VERSION_MINOR, ALLOY_VERSION_PATCH,
              ok ? "ok" : "WRONG");
  if (!ok) return fail("host algorithms or conversions");

  // Both translation units first, then the agreement between them, then the expected default:
  // Cuda wherever the CUDA runtime is, whatever compiler reads the header.
  const consumer::Report cpp = consumer::this_translation_unit("g++");
  print(cpp);
#ifdef CONSUMER_HAS_CUDA_TU
  const consumer::Report cu = consumer::cuda_translation_unit();
  print(cu);
  if (!consumer::same(cpp, cu)) return fail("the g++ and nvcc translation units disagree on alloy's types");
#endif
  if (cpp.cuda_runtime != bool(CONSUMER_EXPECT_CUDA_RUNTIME)) return fail("CUDA runtime not as the build expects");
  if (std::strcmp(cpp.trainer_backend, cpp.cuda_runtime ? "Cuda" : "Host") != 0) return fail("default backend");

  // A g++ translation unit trains by naming Host (constructing the Cuda default would not compile).
  alloy::Trainer<consumer::Quadratic, alloy::AdamW<>, alloy::Host> host(
      consumer::Quadratic{}, {.schedule = alloy::LrSchedule::constant(0.05f), .seed = 1});
  const float first = host.step([] { return 0.25f; }).loss;
  float last = first;
  for (int s = 0; s < 20; ++s) last = host.step([] { return 0.25f; }).loss;
  std::printf("  Host trainer in the g++ TU: loss %.6f -> %.6f\n", first, last);
  if (!(last < 0.5f * first)) return fail("the Host trainer did not learn");

#ifdef CONSUMER_HAS_CUDA_TU
  switch (consumer::train_default_trainer_on_cuda()) {
    case 0:
      break;
    case 2: {
      // ALLOY_REQUIRE_GPU=1 (the GPU runs set it) makes a missing device a failure, as in the tests.
      const char* required = std::getenv("ALLOY_REQUIRE_GPU");
      if (required && *required && std::strcmp(required, "0") != 0) return fail("ALLOY_REQUIRE_GPU but no device");
      std::printf("  no CUDA device: the default (Cuda) trainer was compiled in the nvcc TU but not run\n");
      break;
    }
    default:
      return fail("the default trainer did not learn on Cuda");
  }
#endif
  std::printf("consumer: ok\n");
  return 0;
}
