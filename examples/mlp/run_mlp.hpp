// The training loop of the MLP example, shared by its per-precision translation units (one
// Trainer configuration family per file keeps each compile short and lets them build in parallel).
#pragma once

#include "../step_flags.hpp"
#include "residual_mlp.hpp"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

namespace mlp {

struct Options {
  std::string precision = "bf16";
  int accumulate = 1;
  bool checkpointing = false;
  examples::StepFlags step;  // Cuda: GEMM tuning and CUDA graphs (../step_flags.hpp)
  int steps = 200;
  std::string size;
  std::size_t rows = 0;
  std::size_t keep_gelu = 0;  // --keep-gelu N: the first N blocks keep GELU's output (Shape::keep_gelu)
  std::string save, resume, csv = "mlp_loss.csv";
  bool host = false;
  // Weights in and out (PyTorch interop): imported after --resume and before training, exported
  // after training, each path in its dtype; then the model is evaluated on --eval-input.
  std::string import_weights;
  std::vector<std::pair<std::string, alloy::WeightsDtype>> export_weights;
  std::string eval_input, eval_output;
};

// Reads features "x" (F32, rows x inputs) and class labels "labels" (I32 or I64, rows) from a
// safetensors file, runs the model forward on them (nothing is updated) and writes "logits" (F32,
// rows x classes) and their mean cross-entropy "loss" (F32, a scalar) to o.eval_output.
template <class Trainer>
void evaluate(Trainer& trainer, const Options& o, const Shape& shape) {
  using B = typename Trainer::backend_type;
  const auto file = alloy::SafetensorsFile::open(o.eval_input);
  const std::string where = "--eval-input " + o.eval_input + ": ";
  const auto& xt = file.tensor("x");
  if (xt.dtype != alloy::SafetensorsDtype::f32 || xt.shape.size() != 2 ||
      xt.shape[1] != static_cast<std::int64_t>(shape.inputs)) {
    throw alloy::error(where + "'x' must be F32 [rows, " + std::to_string(shape.inputs) + "]");
  }
  const auto rows = static_cast<std::size_t>(xt.shape[0]);
  std::vector<float> x(rows * shape.inputs);
  file.read("x", std::as_writable_bytes(std::span(x)));
  const auto& lt = file.tensor("labels");
  if (lt.shape != std::vector<std::int64_t>{xt.shape[0]} ||
      (lt.dtype != alloy::SafetensorsDtype::i32 && lt.dtype != alloy::SafetensorsDtype::i64)) {
    throw alloy::error(where + "'labels' must be I32 or I64 [" + std::to_string(rows) + "]");
  }
  std::vector<std::int32_t> labels(rows);
  if (lt.dtype == alloy::SafetensorsDtype::i32) {
    file.read("labels", std::as_writable_bytes(std::span(labels)));
  } else {
    std::vector<std::int64_t> wide(rows);
    file.read("labels", std::as_writable_bytes(std::span(wide)));
    for (std::size_t i = 0; i < rows; ++i) labels[i] = static_cast<std::int32_t>(wide[i]);
  }
  const B be = trainer.store().backend();
  alloy::Workspace<B> workspace(be);
  alloy::BackendResources<B> resources(be);
  typename Trainer::context_type ctx(trainer.store(), workspace, 1.0f, false, 0, 1, trainer.steps(), 0, &resources);
  const auto [logits, loss] = trainer.model().evaluate(ctx, x, labels);
  const std::vector<float> values = alloy::to_host_as_float(be, logits.data, logits.size());
  const std::vector<alloy::TensorToWrite> out = {
      {"logits",
       alloy::SafetensorsDtype::f32,
       {static_cast<std::int64_t>(rows), static_cast<std::int64_t>(shape.classes)},
       std::as_bytes(std::span(values))},
      {"loss", alloy::SafetensorsDtype::f32, {}, std::as_bytes(std::span(&loss, 1))},
  };
  alloy::write_safetensors(o.eval_output, out, {{"format", "pt"}});
  std::printf("evaluated %zu rows: loss %.6f; logits and loss written to %s\n", rows, loss, o.eval_output.c_str());
}

template <class Backend, class P, class... Extra>
int run(const Options& o, Shape shape) {
  // Accumulate<2> gives 16-bit precisions their fp32 accumulator; --accumulate sets the count.
  using Trainer = alloy::Trainer<ResidualMlp, P, alloy::Accumulate<2>, alloy::AdamW<>, Backend, Extra...>;
  const TeacherTask task(shape, 2026);
  std::mt19937_64 rng(11);
  // At full size, labelling on the host would dominate the step: cycle through a pool of batches.
  // The trainer reads each batch where it is (a reference, no copy).
  std::vector<Batch> pool;
  const bool use_pool = shape.rows * shape.inputs >= (std::size_t(1) << 20);
  for (int i = 0; use_pool && i < 16; ++i) pool.push_back(task.batch(rng));
  std::size_t drawn = 0;
  // Small batches are drawn fresh, into one buffer per micro-batch of two steps: with --graph a
  // step keeps its batches until it has run, and Trainer::run stages the next step's meanwhile.
  std::vector<Batch> fresh(2 * static_cast<std::size_t>(o.accumulate));
  auto next = [&]() -> const Batch& {
    if (use_pool) return pool[drawn++ % pool.size()];
    Batch& b = fresh[drawn++ % fresh.size()];
    b = task.batch(rng);
    return b;
  };
  Trainer trainer(ResidualMlp(shape), {.optimizer = {.weight_decay = 0.01f},
                                       .schedule = alloy::LrSchedule::warmup_cosine(2e-3f, o.steps / 10, o.steps),
                                       .max_grad_norm = 1.0f,
                                       .seed = 1,
                                       .micro_batches = o.accumulate,
                                       .gemm_tuning = o.step.gemm,
                                       .gemm_plans_file = o.step.gemm_plans,
                                       .graph = o.step.graphs()});
  if (!o.resume.empty()) {
    trainer.load(o.resume);
    for (std::uint64_t s = 0; s < trainer.steps() * std::uint64_t(o.accumulate); ++s) (void)next();
    std::printf("resumed from %s at step %llu\n", o.resume.c_str(), static_cast<unsigned long long>(trainer.steps()));
  }
  if (!o.import_weights.empty()) {
    trainer.import_weights(o.import_weights);
    std::printf("imported weights from %s\n", o.import_weights.c_str());
  }
  std::printf(
      "residual MLP on %s, %s%s%s%s: %zu -> %zu x %zu blocks -> %zu classes, %d x %zu rows per step, %zu "
      "parameters%s\n",
      Backend::name, o.precision.c_str(), o.checkpointing ? " + checkpointing" : "", o.step.gemm_words(),
      o.step.graphs() ? " + CUDA graph" : "", shape.inputs, shape.width, shape.blocks, shape.classes, o.accumulate,
      shape.rows, trainer.store().layout().numel(),
      shape.keep_gelu ? (", GELU's output kept in " + std::to_string(shape.keep_gelu) + " blocks").c_str() : "");
  std::ofstream csv(o.csv);
  csv << "step,loss,grad_norm,lr,loss_scale,skipped\n";
  alloy::StepReport first{}, last{};
  std::size_t first_peak = 0;
  const auto start_step = trainer.steps();
  // Wall time of the steps after two warm-up steps, until the last one has finished on the device
  // (a step's report comes with its update still queued).
  auto timed_from = std::chrono::steady_clock::now();
  // Trainer::run: with --graph, each step's batches are staged (their 32 MB of features copied to
  // the device) while the step before computes, instead of after its gradient norm is known.
  const auto to_run = o.steps > 0 && static_cast<std::uint64_t>(o.steps) > start_step
                          ? static_cast<std::uint64_t>(o.steps) - start_step
                          : std::uint64_t(0);
  trainer.run(next, to_run, [&](const alloy::StepReport& r) {
    last = r;
    if (last.step == start_step + 1) first = last;
    if (last.step == start_step + 2) {
      first_peak = trainer.memory().backend.peak_bytes;
      trainer.reset_memory_peak();  // the steady-state peak, as PyTorch's after its warm-up
      trainer.synchronize();
      timed_from = std::chrono::steady_clock::now();
    }
    csv << last.step << ',' << last.loss << ',' << last.grad_norm << ',' << last.lr << ',' << last.loss_scale << ','
        << last.skipped << '\n';
    if (last.step % 20 == 0 || last.step == start_step + 1 || last.step == static_cast<std::uint64_t>(o.steps)) {
      std::printf("step %5llu  loss %8.5f  grad norm %8.4f  lr %.2e  scale %g  skipped %llu\n",
                  static_cast<unsigned long long>(last.step), last.loss, last.grad_norm, last.lr, last.loss_scale,
                  static_cast<unsigned long long>(last.skipped_steps));
    }
  });
  trainer.synchronize();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - timed_from).count();
  if (!o.save.empty()) {
    trainer.save(o.save);
    std::printf("saved %s\n", o.save.c_str());
  }
  for (const auto& [path, dtype] : o.export_weights) {
    trainer.export_weights(path, dtype);
    std::printf("exported the weights in %s to %s\n", std::string(alloy::weights_dtype_name(dtype)).c_str(),
                path.c_str());
  }
  if (!o.eval_input.empty()) evaluate(trainer, o, shape);
  if (trainer.steps() == start_step) return 0;  // nothing trained (--steps 0, or already there)
  const auto mem = trainer.memory();
  const double timed = static_cast<double>(o.steps - start_step > 2 ? o.steps - start_step - 2 : 1);
  std::printf("loss %.5f -> %.5f; %.3f ms per step, %.0f rows/s; activations peak %.1f MiB, all memory peak %.1f MiB\n",
              first.loss, last.loss, 1e3 * seconds / timed, double(shape.rows) * o.accumulate * timed / seconds,
              mem.activations_peak / 1048576.0, mem.backend.peak_bytes / 1048576.0);
  std::printf(
      "memory: arenas %.1f MiB (%.2f bytes/param), activation workspace %.1f MiB, input slots %.1f MiB; "
      "peak in the first two steps %.1f MiB\n",
      mem.arenas.total() / 1048576.0, double(mem.arenas.total()) / trainer.store().layout().numel(),
      mem.workspace_reserved / 1048576.0, mem.input_slots / 1048576.0,
      std::max(first_peak, mem.backend.peak_bytes) / 1048576.0);
  if (o.step.graphs()) {
    const auto& g = trainer.graph_stats();
    std::printf("CUDA graph: %llu steps captured, %llu replayed, %llu run eagerly; %zu memsets as kernels\n",
                static_cast<unsigned long long>(g.captures), static_cast<unsigned long long>(g.replays),
                static_cast<unsigned long long>(g.eager), g.memset_kernels);
  }
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
