// A model that owns its forward and backward (teacher_mlp.hpp), trained by alloy with bf16
// compute and fp32 master weights, on the GPU when there is one and on the Host backend when
// not. Prints one line per 50 steps (loss, gradient norm, learning rate, loss scale, skipped
// steps) and a summary.
//   ./alloy_custom_model [steps]
#include "teacher_mlp.hpp"

#include <cstdio>
#include <cstdlib>

namespace {

template <class Backend>
int train(int steps) {
  using Trainer = alloy::Trainer<teacher::StudentMlp, alloy::Precision<alloy::bf16, alloy::fp32_master>,
                                 alloy::Accumulate<2>, alloy::AdamW<>, Backend>;
  constexpr int inputs = 32, hidden = 64, outputs = 8, rows = 128;
  const teacher::Teacher source(inputs, hidden, outputs, 2026);
  std::mt19937_64 rng(7);
  Trainer trainer(teacher::StudentMlp(inputs, hidden, outputs),
                  {.optimizer = {.weight_decay = 0.0f},
                   .schedule = alloy::LrSchedule::warmup_cosine(3e-3f, steps / 20, steps, 1e-4f),
                   .max_grad_norm = 1.0f});
  std::printf("training on %s: %d steps of %d micro-batches of %d rows, %.1f bytes per parameter\n", Backend::name,
              steps, Trainer::accumulation_steps, rows, Trainer::bytes_per_param);
  std::printf("%6s %10s %10s %10s %8s %8s\n", "step", "loss", "grad norm", "lr", "scale", "skipped");
  alloy::StepReport first, last;
  double seconds = 0;
  for (int s = 0; s < steps; ++s) {
    last = trainer.step([&] { return source.batch(rows, rng); });
    if (s == 0) first = last;
    seconds += last.seconds;
    if (s % 50 == 0 || s == steps - 1) {
      std::printf("%6llu %10.5f %10.4f %10.2e %8g %8llu\n", static_cast<unsigned long long>(last.step), last.loss,
                  last.grad_norm, last.lr, last.loss_scale, static_cast<unsigned long long>(last.skipped_steps));
    }
  }
  const auto mem = trainer.memory();
  std::printf("loss %.5f -> %.5f in %d steps (%.2f ms per step); %llu skipped\n", first.loss, last.loss, steps,
              1e3 * seconds / steps, static_cast<unsigned long long>(last.skipped_steps));
  std::printf(
      "memory: parameters %zu B, gradients %zu B, master %zu B, optimizer state %zu B, activations peak %zu B\n",
      mem.arenas.params, mem.arenas.grads, mem.arenas.master, mem.arenas.optimizer_state, mem.activations_peak);
  return last.loss < 0.5f * first.loss ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 300;
  try {
#if ALLOY_HAS_CUDA_KERNELS
    if (alloy::has_cuda_device()) return train<alloy::Cuda>(steps);
    std::printf("no CUDA device: running on the Host backend\n");
#endif
    return train<alloy::Host>(steps);
  } catch (const alloy::error& e) {
    std::fprintf(stderr, "alloy error: %s\n", e.what());
    return 1;
  }
}
