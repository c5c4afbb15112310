// The training loop of the MLP example, shared by its per-precision translation units (one
// Trainer configuration family per file keeps each compile short and lets them build in parallel).
#pragma once

#include "residual_mlp.hpp"

#include <cstdio>
#include <fstream>
#include <string>

namespace mlp {

struct Options {
  std::string precision = "bf16";
  int accumulate = 1;
  bool checkpointing = false;
  int steps = 200;
  std::string size;
  std::size_t rows = 0;
  std::string save, resume, csv = "mlp_loss.csv";
  bool host = false;
};

template <class Backend, class P, class... Extra>
int run(const Options& o, Shape shape) {
  // Accumulate<2> gives 16-bit precisions their fp32 accumulator; --accumulate sets the count.
  using Trainer = alloy::Trainer<ResidualMlp, P, alloy::Accumulate<2>, alloy::AdamW<>, Backend, Extra...>;
  const TeacherTask task(shape, 2026);
  std::mt19937_64 rng(11);
  // At full size, labelling on the host would dominate the step: cycle through a pool of batches.
  std::vector<Batch> pool;
  const bool use_pool = shape.rows * shape.inputs >= (std::size_t(1) << 20);
  for (int i = 0; use_pool && i < 16; ++i) pool.push_back(task.batch(rng));
  std::size_t drawn = 0;
  auto next = [&] { return use_pool ? pool[drawn++ % pool.size()] : task.batch(rng); };
  Trainer trainer(ResidualMlp(shape), {.optimizer = {.weight_decay = 0.01f},
                                       .schedule = alloy::LrSchedule::warmup_cosine(2e-3f, o.steps / 10, o.steps),
                                       .max_grad_norm = 1.0f,
                                       .seed = 1,
                                       .micro_batches = o.accumulate});
  if (!o.resume.empty()) {
    trainer.load(o.resume);
    for (std::uint64_t s = 0; s < trainer.steps() * std::uint64_t(o.accumulate); ++s) (void)next();
    std::printf("resumed from %s at step %llu\n", o.resume.c_str(), static_cast<unsigned long long>(trainer.steps()));
  }
  std::printf(
      "residual MLP on %s, %s%s: %zu -> %zu x %zu blocks -> %zu classes, %d x %zu rows per step, %zu parameters\n",
      Backend::name, o.precision.c_str(), o.checkpointing ? " + checkpointing" : "", shape.inputs, shape.width,
      shape.blocks, shape.classes, o.accumulate, shape.rows, trainer.store().layout().numel());
  std::ofstream csv(o.csv);
  csv << "step,loss,grad_norm,lr,loss_scale,skipped\n";
  alloy::StepReport first{}, last{};
  double seconds = 0;
  const auto start_step = trainer.steps();
  while (trainer.steps() < static_cast<std::uint64_t>(o.steps)) {
    last = trainer.step(next);
    if (last.step == start_step + 1) first = last;
    if (last.step > start_step + 2) seconds += last.seconds;  // after warm-up
    csv << last.step << ',' << last.loss << ',' << last.grad_norm << ',' << last.lr << ',' << last.loss_scale << ','
        << last.skipped << '\n';
    if (last.step % 20 == 0 || last.step == start_step + 1 || last.step == static_cast<std::uint64_t>(o.steps)) {
      std::printf("step %5llu  loss %8.5f  grad norm %8.4f  lr %.2e  scale %g  skipped %llu\n",
                  static_cast<unsigned long long>(last.step), last.loss, last.grad_norm, last.lr, last.loss_scale,
                  static_cast<unsigned long long>(last.skipped_steps));
    }
  }
  if (!o.save.empty()) {
    trainer.save(o.save);
    std::printf("saved %s\n", o.save.c_str());
  }
  const auto mem = trainer.memory();
  const double timed = static_cast<double>(o.steps - start_step > 2 ? o.steps - start_step - 2 : 1);
  std::printf("loss %.5f -> %.5f; %.3f ms per step, %.0f rows/s; activations peak %.1f MiB, all memory peak %.1f MiB\n",
              first.loss, last.loss, 1e3 * seconds / timed, double(shape.rows) * o.accumulate * timed / seconds,
              mem.activations_peak / 1048576.0, mem.backend.peak_bytes / 1048576.0);
  std::printf("loss curve: %s\n", o.csv.c_str());
  return last.loss < first.loss ? 0 : 1;
}

template <class Backend, class P>
int with_checkpointing(const Options& o, const Shape& s) {
  return o.checkpointing ? run<Backend, P, alloy::Checkpointing>(o, s) : run<Backend, P>(o, s);
}

// The trainers of one precision, on Cuda when `gpu`, else on Host. Each precision is compiled
// in its own translation unit, generated from mlp_precision.cpp.in by CMake.
template <class P>
int run_precision(const Options& o, const Shape& s, bool gpu) {
#if ALLOY_HAS_CUDA_KERNELS
  if (gpu) return with_checkpointing<alloy::Cuda, P>(o, s);
#endif
  (void)gpu;
  return with_checkpointing<alloy::Host, P>(o, s);
}

using Fp32 = alloy::Precision<alloy::fp32>;
using Tf32 = alloy::Precision<alloy::tf32>;
using Bf16 = alloy::Precision<alloy::bf16, alloy::fp32_master>;
using Fp16 = alloy::Precision<alloy::fp16, alloy::fp32_master>;
extern template int run_precision<Fp32>(const Options&, const Shape&, bool);
extern template int run_precision<Tf32>(const Options&, const Shape&, bool);
extern template int run_precision<Bf16>(const Options&, const Shape&, bool);
extern template int run_precision<Fp16>(const Options&, const Shape&, bool);

}  // namespace mlp
