// Trains GPT-2 (gpt2_model.hpp) on a text, bytes as tokens, or on random tokens, then samples.
//   alloy_gpt2 [--size tiny|small|medium|124M] [--backend host|cuda] [--precision fp32|tf32|bf16|fp16]
//              [--checkpointing] [--recompute-gelu] [--timed-gemm | --heuristic-gemm | --timed-gemm-any]
//              [--gemm-plans FILE] [--graph | --no-graph]
//              [--steps N] [--batch B] [--seq T] [--head-chunk ROWS] [--lr X] [--accumulate N]
//              [--data FILE | --random] [--csv PATH] [--export FILE] [--import FILE]
//              [--logits-out FILE [--tokens-in FILE]] [--sample N] [--temperature X] [--top-k K] [--seed S]
//              [--data-parallel [--ranks N] [--id-dir DIR]]
// On the GPU when there is one (124M, 16 x 1024 tokens per step by default), on the Host backend
// otherwise (tiny: d 64, 2 layers, 64 positions, bytes as tokens; the loss falls within a minute).
// Without --data it trains on alloy's own README and docs (nothing is downloaded). On Cuda each
// step after the first two replays a CUDA graph of the step (Trainer::Config::graph) unless
// --no-graph (or --data-parallel, whose NCCL calls are not captured) is given.
//
// --export writes the weights after training under Hugging Face GPT2LMHeadModel's names and
// layouts; --import reads such a file before training; --logits-out writes the logits of a batch
// after training (scripts/gpt2_hf_check.py compares them with transformers'). --steps 0 trains
// nothing.
//
// --data-parallel trains bf16 replicas (data_parallel.hpp): on the GPU one process per GPU under a
// launcher, e.g. `torchrun --nproc_per_node 2 --no-python build/gpu/examples/alloy_gpt2
// --data-parallel --random` with NCCL_NVLS_ENABLE=0; on the Host --ranks N threads.
#include "run_gpt2.hpp"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

[[noreturn]] void usage(const char* why) {
  std::fprintf(
      stderr,
      "%s\nusage: alloy_gpt2 [--size tiny|small|medium|124M] [--backend host|cuda] "
      "[--precision fp32|tf32|bf16|fp16] [--checkpointing] [--recompute-gelu] [--timed-gemm | --heuristic-gemm | "
      "--timed-gemm-any] "
      "[--gemm-plans FILE] [--graph | --no-graph] [--steps N] [--batch B] [--seq T] [--head-chunk ROWS] [--lr X] "
      "[--accumulate N] [--data FILE | --random] [--csv PATH] [--export FILE] [--import FILE] "
      "[--logits-out FILE [--tokens-in FILE]] [--sample N] [--temperature X] [--top-k K] [--seed S] "
      "[--data-parallel [--ranks N (host)] [--id-dir DIR (cuda)]]\n",
      why);
  std::exit(2);
}

gpt2::Options parse(int argc, char** argv) {
  gpt2::Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + a).c_str());
      return argv[++i];
    };
    if (a == "--precision")
      o.precision = value();
    else if (a == "--size")
      o.size = value();
    else if (a == "--backend")
      o.backend = value();
    else if (a == "--checkpointing")
      o.checkpointing = true;
    else if (a == "--recompute-gelu")
      o.recompute_gelu = true;
    // --timed-gemm, --heuristic-gemm, --timed-gemm-any, --gemm-plans FILE, --graph, --no-graph
    else if (o.step.parse(a, value))
      continue;
    else if (a == "--steps")
      o.steps = std::atoi(value().c_str());
    else if (a == "--batch")
      o.batch = std::strtoull(value().c_str(), nullptr, 10);
    else if (a == "--seq")
      o.seq = std::strtoull(value().c_str(), nullptr, 10);
    else if (a == "--head-chunk")  // rows of logits the head holds at once
      o.head_chunk = std::strtoull(value().c_str(), nullptr, 10);
    else if (a == "--lr")
      o.lr = std::strtof(value().c_str(), nullptr);
    else if (a == "--accumulate")
      o.accumulate = std::atoi(value().c_str());
    else if (a == "--data")
      o.data = value();
    else if (a == "--random")
      o.random = true;
    else if (a == "--csv")
      o.csv = value();
    else if (a == "--export")
      o.export_hf = value();
    else if (a == "--import")
      o.import_hf = value();
    else if (a == "--logits-out")
      o.logits_out = value();
    else if (a == "--tokens-in")
      o.tokens_in = value();
    else if (a == "--sample")
      o.sample_tokens = std::atoi(value().c_str());
    else if (a == "--temperature")
      o.temperature = std::strtof(value().c_str(), nullptr);
    else if (a == "--top-k")
      o.top_k = std::atoi(value().c_str());
    else if (a == "--seed")
      o.seed = std::strtoull(value().c_str(), nullptr, 10);
    else if (a == "--data-parallel")
      o.data_parallel = true;
    else if (a == "--ranks")
      o.ranks = std::atoi(value().c_str());
    else if (a == "--id-dir")
      o.id_dir = value();
    else
      usage(("unknown option " + a).c_str());
  }
  if (o.accumulate < 1) usage("--accumulate needs N >= 1");
  if (o.backend != "" && o.backend != "host" && o.backend != "cuda") usage("--backend takes host or cuda");
  if (o.random && !o.data.empty()) usage("--data and --random: give one");
  if (o.temperature <= 0) usage("--temperature needs X > 0");
  if (!o.tokens_in.empty() && o.logits_out.empty()) usage("--tokens-in goes with --logits-out");
  if (o.ranks < 1) usage("--ranks needs N >= 1");
  return o;
}

int with_precision(const gpt2::Options& o, const gpt2::Config& c, const gpt2::TokenSource& d, bool gpu) {
  if (o.precision == "fp32") return gpt2::run_precision<gpt2::Fp32>(o, c, d, gpu);
  if (o.precision == "tf32") return gpt2::run_precision<gpt2::Tf32>(o, c, d, gpu);
  if (o.precision == "bf16") return gpt2::run_precision<gpt2::Bf16>(o, c, d, gpu);
  if (o.precision == "fp16") return gpt2::run_precision<gpt2::Fp16>(o, c, d, gpu);
  usage(("unknown precision " + o.precision).c_str());
}

}  // namespace

int main(int argc, char** argv) {
  gpt2::Options o = parse(argc, argv);
  bool gpu = false;
#if ALLOY_HAS_CUDA_KERNELS
  gpu = o.backend != "host" && alloy::has_cuda_device();
#endif
  if (o.backend == "cuda" && !gpu) {
    std::fprintf(stderr, "--backend cuda: no CUDA device (or this build has no CUDA kernels)\n");
    return 1;
  }
  if (o.backend.empty() && !gpu) std::printf("no CUDA device: running on the Host backend\n");
  if (o.size.empty()) o.size = gpu ? "124M" : "tiny";
  o.step.resolve(gpu, o.data_parallel);
  const auto preset = gpt2::preset(o.size);
  if (!preset) usage(("unknown size " + o.size).c_str());
  gpt2::Config c = *preset;
  const bool big = c.dim >= 768;
  if (o.seq) c.seq = o.seq;
  if (o.head_chunk) c.head_chunk_rows = o.head_chunk;
  c.keep_gelu_output = !o.recompute_gelu;
  if (!o.batch) o.batch = big ? 16 : 8;
  if (o.steps < 0) o.steps = gpu ? (big ? 50 : 300) : (big ? 3 : 150);
  if (o.lr == 0) o.lr = big ? 6e-4f : 2e-3f;
  try {
    const gpt2::TokenSource data = o.random         ? gpt2::TokenSource::random(c)
                                   : o.data.empty() ? gpt2::TokenSource::text(gpt2::default_text(), c)
                                                    : gpt2::TokenSource::text(gpt2::read_file(o.data), c);
    if (o.data_parallel) return gpt2::run_data_parallel(o, c, data, gpu);
    return with_precision(o, c, data, gpu);
  } catch (const alloy::error& e) {
    std::fprintf(stderr, "alloy error: %s\n", e.what());
    return 1;
  }
}
