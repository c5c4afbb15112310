// The training loop of the GPT-2 example, shared by its per-precision translation units (one
// Trainer configuration family per file keeps each nvcc compile short and lets them build in
// parallel).
#pragma once

#include "../step_flags.hpp"
#include "gpt2_model.hpp"
#include "hf_weights.hpp"
#include "sampling.hpp"
#include "text_data.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace gpt2 {

struct Options {
  std::string precision = "bf16";
  std::string size;  // a preset name; empty: 124M on the GPU, tiny on the Host
  bool checkpointing = false;
  bool recompute_gelu = false;  // the MLPs recompute GELU's output in backward instead of keeping it
  examples::StepFlags step;     // Cuda: GEMM tuning and CUDA graphs (../step_flags.hpp)
  int steps = -1;               // -1: the default for the size and backend
  std::size_t batch = 0, seq = 0;
  std::size_t head_chunk = 0;  // rows of logits held at once; 0: the head's default
  float lr = 0;                // 0: the size's default
  int accumulate = 1;
  std::string backend;  // "host", "cuda" or empty (Cuda when there is a device)
  std::string data;     // a text file (bytes as tokens); empty: alloy's docs
  bool random = false;  // random tokens (benchmarks)
  std::string csv = "gpt2_loss.csv";
  std::string export_hf, import_hf;
  std::string logits_out;  // after training: the logits of the first batch's tokens (HF check)
  std::string tokens_in;   // tokens for --logits-out, a raw int32 file (batch x seq); else drawn
  int sample_tokens = 160;
  float temperature = 0.8f;
  int top_k = 40;
  std::uint64_t seed = 1;
  // --data-parallel: one replica per process (Cuda, NCCL; the launcher's RANK / WORLD_SIZE /
  // LOCAL_RANK) or per thread (Host, `ranks` of them); data_parallel.hpp.
  bool data_parallel = false;
  int ranks = 2;       // Host: threads
  std::string id_dir;  // Cuda: where rank 0 leaves NCCL's id (default $ALLOY_NCCL_ID_DIR, else the temp dir)
};

// --logits-out: the logits of every position of a batch (the --tokens-in file, or one drawn from
// the data) and the tokens themselves, F32 [rows, seq, vocab] and I32 [rows, seq], for
// scripts/gpt2_hf_check.py; with the batch's mean loss against next tokens ("loss", F32 scalar).
template <class Trainer>
void write_logits(Trainer& trainer, const Options& o, const TokenSource& data, std::size_t rows) {
  const Config& c = trainer.model().config();
  std::vector<std::int32_t> tokens;
  if (!o.tokens_in.empty()) {
    const std::string bytes = read_file(o.tokens_in);
    if (bytes.empty() || bytes.size() % (4 * c.seq) != 0) {
      throw alloy::error("--tokens-in " + o.tokens_in + ": " + std::to_string(bytes.size()) +
                         " bytes are not whole sequences of " + std::to_string(c.seq) + " int32 tokens");
    }
    tokens.resize(bytes.size() / 4);
    std::memcpy(tokens.data(), bytes.data(), bytes.size());
  } else {
    std::mt19937_64 rng(o.seed + 99);
    const Batch b = data.batch(rows, rng);
    tokens.assign(b.tokens.begin(), b.tokens.end());
  }
  std::vector<std::size_t> all(tokens.size());
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = i;
  Evaluation<Trainer> eval(trainer);
  const std::vector<float> padded = eval.logits(tokens, all);
  std::vector<float> logits(tokens.size() * c.vocab);
  double loss = 0;
  std::size_t counted = 0;
  for (std::size_t r = 0; r < tokens.size(); ++r) {
    std::copy_n(padded.begin() + std::ptrdiff_t(r * c.padded_vocab), c.vocab,
                logits.begin() + std::ptrdiff_t(r * c.vocab));
    if ((r + 1) % c.seq == 0) continue;  // the last position has no next token here
    const float* l = logits.data() + r * c.vocab;
    const float m = *std::max_element(l, l + c.vocab);
    double sum = 0;
    for (std::size_t v = 0; v < c.vocab; ++v) sum += std::exp(double(l[v]) - m);
    loss += std::log(sum) + m - l[tokens[r + 1]];
    ++counted;
  }
  const float mean = counted ? float(loss / double(counted)) : 0.0f;
  const auto n = std::int64_t(tokens.size() / c.seq), T = std::int64_t(c.seq);
  const std::vector<alloy::TensorToWrite> out = {
      {"tokens", alloy::SafetensorsDtype::i32, {n, T}, std::as_bytes(std::span(tokens))},
      {"logits", alloy::SafetensorsDtype::f32, {n, T, std::int64_t(c.vocab)}, std::as_bytes(std::span(logits))},
      {"loss", alloy::SafetensorsDtype::f32, {}, std::as_bytes(std::span(&mean, 1))},
  };
  alloy::write_safetensors(o.logits_out, out, {{"format", "pt"}});
  std::printf("logits of %lld x %lld tokens (next-token loss %.6f) written to %s\n", static_cast<long long>(n),
              static_cast<long long>(T), mean, o.logits_out.c_str());
}

// Accumulate<2> gives 16-bit precisions their fp32 accumulator; --accumulate sets the count.
template <class Backend, class P, class... Extra>
using Gpt2Trainer = alloy::Trainer<Gpt2, P, alloy::Accumulate<2>, alloy::AdamW<>, Backend, Extra...>;

template <class Trainer>
typename Trainer::Config trainer_config(const Options& o) {
  return {.optimizer = {.beta2 = 0.95f, .weight_decay = 0.1f},
          .schedule = alloy::LrSchedule::warmup_cosine(o.lr, std::max(o.steps / 10, 1), o.steps),
          .max_grad_norm = 1.0f,
          .seed = o.seed,
          .micro_batches = o.accumulate,
          .gemm_tuning = o.step.gemm,
          .gemm_plans_file = o.step.gemm_plans,
          .graph = o.step.graphs()};
}

// Which replica this process (or thread) is with --data-parallel: rank 0 prints, writes the loss
// curve and samples; each rank draws its own batches (rank 0 the ones one process would).
struct Replica {
  int rank = 0, world = 1;
};

struct Trained {
  int status = 0;  // the example's exit status
  alloy::StepReport first, last;
};

// The training loop, the summary and the samples, for any of the example's trainers.
template <class Trainer>
Trained train(Trainer& trainer, const Options& o, const Config& c, const TokenSource& data, Replica who = {}) {
  const bool speaks = who.rank == 0;
  std::mt19937_64 rng(o.seed + 7919 * static_cast<std::uint64_t>(who.rank));
  if (!o.import_hf.empty()) {
    import_hf(trainer, o.import_hf);
    if (speaks) std::printf("imported Hugging Face GPT-2 weights from %s\n", o.import_hf.c_str());
  }
  using Backend = typename Trainer::backend_type;
  const std::size_t params = trainer.store().layout().numel();
  if (speaks && who.world > 1) {
    std::printf("data parallel: %d ranks (%s), each with its own batches; rank 0 speaks\n", who.world,
                std::is_same_v<Backend, alloy::Host> ? "threads, HostCommunicator" : "processes, NCCL");
  }
  if (speaks)
    std::printf(
        "GPT-2 on %s, %s%s%s%s: d %zu, %zu layers, %zu heads, vocab %zu (padded %zu), %d x %zu x %zu tokens per step, "
        "%zu parameters; data: %s\n",
        Backend::name, o.precision.c_str(),
        o.checkpointing ? " + checkpointing" : (o.recompute_gelu ? " + GELU recomputed" : ""), o.step.gemm_words(),
        o.step.graphs() ? " + CUDA graph" : "", c.dim, c.layers, c.heads, c.vocab, c.padded_vocab, o.accumulate,
        o.batch, c.seq, params,
        data.is_random()
            ? "random tokens"
            : ((o.data.empty() ? std::string("alloy's docs") : o.data) + ", " + std::to_string(data.size()) + " bytes")
                  .c_str());
  std::ofstream csv;
  if (speaks) {
    csv.open(o.csv);
    csv << "step,loss,grad_norm,lr,loss_scale,skipped,ms\n";
  }
  alloy::StepReport first{}, last{};
  std::size_t first_peak = 0;
  const double tokens_per_step = double(o.batch) * double(c.seq) * o.accumulate * who.world;
  // Wall time of the steps after two warm-up steps, until the last one has finished on the device
  // (step() returns with its update still queued).
  auto timed_from = std::chrono::steady_clock::now();
  auto previous = timed_from;
  // One batch per micro-batch of a step, refilled in place: step() has finished with a step's
  // batches (its uploads included) when it returns.
  std::vector<Batch> ring(static_cast<std::size_t>(o.accumulate));
  std::size_t drawn = 0;
  auto next = [&]() -> const Batch& {
    Batch& b = ring[drawn++ % ring.size()];
    data.fill(b, o.batch, rng);
    return b;
  };
  while (trainer.steps() < static_cast<std::uint64_t>(o.steps)) {
    last = trainer.step(next);
    if (last.step == 1) first = last;
    if (last.step == 2) {
      first_peak = trainer.memory().backend.peak_bytes;
      trainer.reset_memory_peak();  // the steady-state peak, as PyTorch's after its warm-up
      trainer.synchronize();
      timed_from = std::chrono::steady_clock::now();
    }
    const auto now = std::chrono::steady_clock::now();
    const double ms = 1e3 * std::chrono::duration<double>(now - previous).count();
    previous = now;
    if (!speaks) continue;
    csv << last.step << ',' << last.loss << ',' << last.grad_norm << ',' << last.lr << ',' << last.loss_scale << ','
        << last.skipped << ',' << ms << '\n';
    std::printf("step %5llu/%d  loss %8.5f  grad norm %8.4f  lr %.2e  scale %g  %8.1f ms  %8.0f tokens/s\n",
                static_cast<unsigned long long>(last.step), o.steps, last.loss, last.grad_norm, last.lr,
                last.loss_scale, ms, tokens_per_step / (ms / 1e3));
    std::fflush(stdout);
  }
  trainer.synchronize();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - timed_from).count();
  // --export, --logits-out and the samples are one process's (the example refuses them with
  // --data-parallel, whose ranks would each write them).
  if (!o.export_hf.empty()) {
    export_hf(trainer, o.export_hf);
    std::printf("exported the weights in Hugging Face GPT2LMHeadModel's layout to %s\n", o.export_hf.c_str());
  }
  if (!o.logits_out.empty()) write_logits(trainer, o, data, std::max<std::size_t>(o.batch, 1));
  if (o.steps > 0 && speaks) {
    const auto mem = trainer.memory();
    const double timed = static_cast<double>(o.steps > 2 ? o.steps - 2 : o.steps);
    std::printf(
        "loss %.5f -> %.5f; %.3f ms per step, %.0f tokens/s%s; activations peak %.1f MiB, all memory peak "
        "%.1f MiB\n",
        first.loss, last.loss, 1e3 * seconds / timed, tokens_per_step * timed / seconds,
        who.world > 1 ? " (all ranks)" : "", mem.activations_peak / 1048576.0, mem.backend.peak_bytes / 1048576.0);
    std::printf(
        "memory%s: arenas %.1f MiB (%.2f bytes/param), activation workspace %.1f MiB, input slots %.1f MiB; "
        "peak in the first two steps %.1f MiB\n",
        who.world > 1 ? " (rank 0)" : "", mem.arenas.total() / 1048576.0, double(mem.arenas.total()) / double(params),
        mem.workspace_reserved / 1048576.0, mem.input_slots / 1048576.0,
        std::max(first_peak, mem.backend.peak_bytes) / 1048576.0);
    if constexpr (requires { trainer.graph_stats(); }) {
      if (o.step.graphs()) {
        const auto& g = trainer.graph_stats();
        std::printf("CUDA graph: %llu steps captured, %llu replayed, %llu run eagerly; %zu memsets as kernels\n",
                    static_cast<unsigned long long>(g.captures), static_cast<unsigned long long>(g.replays),
                    static_cast<unsigned long long>(g.eager), g.memset_kernels);
      }
    }
    std::printf("loss curve: %s\n", o.csv.c_str());
  }
  if (o.sample_tokens > 0 && !data.is_random() && speaks) {
    std::mt19937_64 sampling(o.seed + 7);
    for (int i = 0; i < 3; ++i) {
      const Batch b = data.batch(1, sampling);
      const std::vector<std::int32_t> prompt(b.tokens.begin(),
                                             b.tokens.begin() + std::ptrdiff_t(std::min<std::size_t>(24, c.seq)));
      const auto text = sample(trainer, prompt, o.sample_tokens, o.temperature, o.top_k, sampling);
      std::printf("--- sample %d: prompt \"%s\"\n%s\n", i + 1, as_text(prompt).c_str(), as_text(text).c_str());
    }
  }
  // Exit status 1 when a text did not train (random tokens have nothing to learn).
  return {o.steps < 3 || data.is_random() || last.loss < first.loss ? 0 : 1, first, last};
}

template <class Backend, class P, class... Extra>
int run(const Options& o, const Config& c, const TokenSource& data) {
  using Trainer = Gpt2Trainer<Backend, P, Extra...>;
  Trainer trainer(Gpt2(c), trainer_config<Trainer>(o));
  return train(trainer, o, c, data).status;
}

template <class Backend, class P>
int with_checkpointing(const Options& o, const Config& c, const TokenSource& d) {
  return o.checkpointing ? run<Backend, P, alloy::Checkpointing>(o, c, d) : run<Backend, P>(o, c, d);
}

// The trainers of one precision, on Cuda when `gpu`, else on Host. Each precision is compiled
// in its own translation unit, generated from gpt2_precision.cpp.in by CMake.
template <class P>
int run_precision(const Options& o, const Config& c, const TokenSource& d, bool gpu) {
#if ALLOY_HAS_CUDA_KERNELS
  if (gpu) return with_checkpointing<alloy::Cuda, P>(o, c, d);
#endif
  (void)gpu;
  return with_checkpointing<alloy::Host, P>(o, c, d);
}

using Fp32 = alloy::Precision<alloy::fp32>;
using Tf32 = alloy::Precision<alloy::tf32>;
using Bf16 = alloy::Precision<alloy::bf16, alloy::fp32_master>;
using Fp16 = alloy::Precision<alloy::fp16, alloy::fp32_master>;
// --data-parallel's bf16 replicas (data_parallel.hpp), defined in gpt2_data_parallel.cpp.
int run_data_parallel(const Options& o, const Config& c, const TokenSource& data, bool gpu);

extern template int run_precision<Fp32>(const Options&, const Config&, const TokenSource&, bool);
extern template int run_precision<Tf32>(const Options&, const Config&, const TokenSource&, bool);
extern template int run_precision<Bf16>(const Options&, const Config&, const TokenSource&, bool);
extern template int run_precision<Fp16>(const Options&, const Config&, const TokenSource&, bool);

}  // namespace gpt2
