// How the examples run a step on Cuda, chosen on the command line the same way in each: how each
// product's cuBLASLt algorithm is chosen (--timed-gemm, the default: among those that give the
// heuristic's bits; --heuristic-gemm; --timed-gemm-any; --gemm-plans FILE keeps timed choices) and
// whether steps replay a CUDA graph (--graph, the default on Cuda; --no-graph). They become
// Trainer::Config's gemm_tuning, gemm_plans_file and graph.
#pragma once

#include <alloy/kernels/gemm_args.hpp>

#include <string>

namespace examples {

struct StepFlags {
  alloy::GemmTuning gemm = alloy::GemmTuning::timed;
  std::string gemm_plans;  // a file keeping the timed choices across runs (Config::gemm_plans_file)
  int graph = -1;          // 1: --graph, 0: --no-graph, -1: on Cuda only (resolve())

  // Takes `arg` when it is one of these flags (value() returns the argument after it); false when
  // it is not.
  template <class Value>
  bool parse(const std::string& arg, Value&& value) {
    if (arg == "--timed-gemm") {
      gemm = alloy::GemmTuning::timed;
    } else if (arg == "--heuristic-gemm") {
      gemm = alloy::GemmTuning::heuristic;
    } else if (arg == "--timed-gemm-any") {  // the bits can change between runs
      gemm = alloy::GemmTuning::timed_any;
    } else if (arg == "--gemm-plans") {
      gemm_plans = value();
      if (gemm == alloy::GemmTuning::heuristic) gemm = alloy::GemmTuning::timed;
    } else if (arg == "--graph") {
      graph = 1;
    } else if (arg == "--no-graph") {
      graph = 0;
    } else {
      return false;
    }
    return true;
  }

  // Graphs by default where they can run: on Cuda, outside data parallelism (NCCL inside a capture
  // is not built).
  void resolve(bool cuda, bool data_parallel = false) {
    if (graph < 0) graph = cuda && !data_parallel ? 1 : 0;
  }
  bool graphs() const noexcept { return graph == 1; }

  // What a run's header line adds for the tuning (nothing for the default).
  const char* gemm_words() const noexcept {
    return gemm == alloy::GemmTuning::timed       ? ""
           : gemm == alloy::GemmTuning::heuristic ? " + heuristic GEMM algorithms"
                                                  : " + timed GEMM algorithms (any order)";
  }
};

}  // namespace examples
