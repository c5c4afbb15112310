// Trains the residual MLP (residual_mlp.hpp) on its synthetic task and writes the loss curve.
//   alloy_mlp [--precision fp32|tf32|bf16|fp16] [--accumulate N] [--checkpointing]
//             [--timed-gemm | --heuristic-gemm | --timed-gemm-any] [--gemm-plans FILE] [--keep-gelu N]
//             [--graph | --no-graph] [--steps N]
//             [--size small|full] [--rows N] [--save PATH] [--resume PATH] [--csv PATH] [--host]
//             [--import-weights PATH] [--export-dtype fp32|bf16|fp16] [--export-weights PATH]...
//             [--eval-input PATH --eval-output PATH]
// On the GPU when there is one (full size by default: 1024 -> 1024 x 8 blocks -> 1000 classes,
// 8192 rows), on the Host backend otherwise (small by default). On Cuda each step after the
// first two replays a CUDA graph of the step (Trainer::Config::graph); --no-graph launches every
// step eagerly.
//
// Weights move to and from PyTorch (scripts/torch_weights_roundtrip.py): --import-weights sets
// the parameters from a safetensors file (after --resume, before training); each
// --export-weights writes them after training, in the dtype of the last --export-dtype before
// it (fp32 by default); --eval-input reads "x" and "labels" and writes the logits and the loss to
// --eval-output. --steps 0 trains nothing.
#include "run_mlp.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace {

[[noreturn]] void usage(const char* why) {
  std::fprintf(
      stderr,
      "%s\nusage: alloy_mlp [--precision fp32|tf32|bf16|fp16] [--accumulate N] [--checkpointing] "
      "[--timed-gemm | --heuristic-gemm | --timed-gemm-any] [--gemm-plans FILE] [--keep-gelu N] [--graph | --no-graph] "
      "[--steps N] [--size small|full] [--rows N] [--save PATH] [--resume PATH] [--csv PATH] [--host] "
      "[--import-weights PATH] [--export-dtype fp32|bf16|fp16] [--export-weights PATH]... "
      "[--eval-input PATH --eval-output PATH]\n",
      why);
  std::exit(2);
}

mlp::Options parse(int argc, char** argv) {
  mlp::Options o;
  alloy::WeightsDtype export_dtype = alloy::WeightsDtype::fp32;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + a).c_str());
      return argv[++i];
    };
    if (a == "--precision")
      o.precision = value();
    else if (a == "--accumulate")
      o.accumulate = std::atoi(value().c_str());
    else if (a == "--checkpointing")
      o.checkpointing = true;
    // --timed-gemm, --heuristic-gemm, --timed-gemm-any, --gemm-plans FILE, --graph, --no-graph
    else if (o.step.parse(a, value))
      continue;
    else if (a == "--steps")
      o.steps = std::atoi(value().c_str());
    else if (a == "--size")
      o.size = value();
    else if (a == "--keep-gelu")  // the first N blocks keep GELU's output for backward
      o.keep_gelu = std::strtoull(value().c_str(), nullptr, 10);
    else if (a == "--rows")
      o.rows = std::strtoull(value().c_str(), nullptr, 10);
    else if (a == "--save")
      o.save = value();
    else if (a == "--resume")
      o.resume = value();
    else if (a == "--csv")
      o.csv = value();
    else if (a == "--host")
      o.host = true;
    else if (a == "--import-weights")
      o.import_weights = value();
    else if (a == "--export-dtype") {
      const auto d = alloy::weights_dtype_named(value());
      if (!d) usage("--export-dtype takes fp32, bf16 or fp16");
      export_dtype = *d;
    } else if (a == "--export-weights")
      o.export_weights.emplace_back(value(), export_dtype);
    else if (a == "--eval-input")
      o.eval_input = value();
    else if (a == "--eval-output")
      o.eval_output = value();
    else
      usage(("unknown option " + a).c_str());
  }
  if (o.accumulate < 1) usage("--accumulate needs N >= 1");
  if (o.steps < 0) usage("--steps needs N >= 0");
  if (o.eval_input.empty() != o.eval_output.empty()) usage("--eval-input and --eval-output go together");
  return o;
}

int with_precision(const mlp::Options& o, const mlp::Shape& s, bool gpu) {
  if (o.precision == "fp32") return mlp::run_precision<mlp::Fp32>(o, s, gpu);
  if (o.precision == "tf32") return mlp::run_precision<mlp::Tf32>(o, s, gpu);
  if (o.precision == "bf16") return mlp::run_precision<mlp::Bf16>(o, s, gpu);
  if (o.precision == "fp16") return mlp::run_precision<mlp::Fp16>(o, s, gpu);
  usage(("unknown precision " + o.precision).c_str());
}

}  // namespace

int main(int argc, char** argv) {
  mlp::Options o = parse(argc, argv);
  bool gpu = false;
#if ALLOY_HAS_CUDA_KERNELS
  gpu = !o.host && alloy::has_cuda_device();
#endif
  o.step.resolve(gpu);
  mlp::Shape shape;
  if (o.size == "full" || (o.size.empty() && gpu)) shape = {1024, 1024, 8, 1000, 8192};
  if (o.rows) shape.rows = o.rows;
  if (o.keep_gelu > shape.blocks)
    usage(("--keep-gelu " + std::to_string(o.keep_gelu) + ": the model has " + std::to_string(shape.blocks) + " blocks")
              .c_str());
  shape.keep_gelu = o.keep_gelu;
  try {
    if (!gpu && !o.host) std::printf("no CUDA device: running on the Host backend\n");
    return with_precision(o, shape, gpu);
  } catch (const alloy::error& e) {
    std::fprintf(stderr, "alloy error: %s\n", e.what());
    return 1;
  }
}
