// The consumer program's nvcc translation unit: built without any nvcc flag of its own (no
// -std, no --extended-lambda): what alloy::alloy passes must be enough.
#include "consumer.hpp"

#include <cstdio>

namespace consumer {

Report cuda_translation_unit() { return this_translation_unit("nvcc"); }

int train_default_trainer_on_cuda() {
  static_assert(std::is_same_v<DefaultTrainer::backend_type, alloy::Cuda>, "nvcc with the CUDA runtime: Cuda");
  if (!alloy::has_cuda_device()) return 2;  // compiled all the same
  DefaultTrainer trainer(Quadratic{}, {.schedule = alloy::LrSchedule::constant(0.05f), .seed = 1});
  const float first = trainer.step([] { return 0.25f; }).loss;
  float last = first;
  for (int s = 0; s < 20; ++s) last = trainer.step([] { return 0.25f; }).loss;
  std::printf("  Cuda trainer in the nvcc TU: loss %.6f -> %.6f\n", first, last);
  return last < 0.5f * first ? 0 : 1;
}

}  // namespace consumer
