// --data-parallel: the GPT-2 example as replicas of DataParallel<Comm> (docs/distributed.md).
//   Cuda: one process per GPU with NcclCommunicator; the launcher sets RANK / WORLD_SIZE /
//         LOCAL_RANK (torchrun --no-python, mpirun, srun, or scripts/nccl-ranks.sh's way), and
//         rank 0 leaves NCCL's id in --id-dir (default $ALLOY_NCCL_ID_DIR, else the temp
//         directory), which every rank must see. Without a launcher it is a world of one.
//   Host: --ranks N threads of this process with HostCommunicator (what CI can run).
// Each rank trains on its own batches (rank r draws with seed + 7919 r), so a step covers
// world x batch x seq tokens; the gradients are summed over the ranks once per step and every
// replica applies the same update. bf16 (fp32 master weights), with or without Checkpointing on
// Cuda; bf16 on Host. --export, --import and --logits-out are refused (each rank would write or
// rewrite the same files).
#pragma once

#include "run_gpt2.hpp"

#include <alloy/dist/host_communicator.hpp>
#include <alloy/dist/nccl_communicator.hpp>

#include <cstdlib>
#include <exception>
#include <filesystem>
#include <thread>
#include <vector>

namespace gpt2 {

// Why --data-parallel cannot run with these options, or empty.
inline std::string data_parallel_refusal(const Options& o, bool gpu) {
  if (o.precision != "bf16") return "--data-parallel trains in bf16 (--precision bf16)";
  if (!o.export_hf.empty() || !o.import_hf.empty() || !o.logits_out.empty()) {
    return "--data-parallel: --export, --import and --logits-out are one process's; run them without it";
  }
  if (!gpu && o.checkpointing) return "--data-parallel on the Host: without --checkpointing";
  return {};  // --ranks below 1: the command line refuses it, HostWorld too
}

// Host: o.ranks threads, each a replica with its own HostCommunicator. Returns every rank's result
// (rank order); the first rank's exception, if any, is rethrown after all have stopped.
inline std::vector<Trained> train_data_parallel_host(const Options& o, const Config& c, const TokenSource& data) {
  using Trainer = Gpt2Trainer<alloy::Host, Bf16, alloy::DataParallel<alloy::HostCommunicator>>;
  alloy::HostWorld world(o.ranks);
  std::vector<Trained> results(static_cast<std::size_t>(o.ranks));
  std::vector<std::exception_ptr> errors(results.size());
  std::vector<std::thread> threads;
  for (int r = 0; r < o.ranks; ++r) {
    threads.emplace_back([&, r] {
      try {
        alloy::HostCommunicator comm(world, r, o.ranks);
        Trainer trainer(Gpt2(c), trainer_config<Trainer>(o), comm);
        results[std::size_t(r)] = train(trainer, o, c, data, {r, o.ranks});
      } catch (...) {
        errors[std::size_t(r)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  return results;
}

#if ALLOY_HAS_CUDA_KERNELS && ALLOY_HAS_NCCL
template <class... Extra>
int run_data_parallel_cuda(const Options& o, const Config& c, const TokenSource& data) {
  using Trainer = Gpt2Trainer<alloy::Cuda, Bf16, Extra..., alloy::DataParallel<alloy::NcclCommunicator>>;
  alloy::NcclOptions nccl{.rank = alloy::rank_from_environment()};
  if (!o.id_dir.empty()) {
    nccl.id_directory = o.id_dir;
  } else if (const char* dir = std::getenv("ALLOY_NCCL_ID_DIR"); dir && *dir) {
    nccl.id_directory = dir;
  }
  alloy::NcclCommunicator comm(nccl);  // sets this rank's device (LOCAL_RANK) before anything else
  Trainer trainer(Gpt2(c), trainer_config<Trainer>(o), comm);
  return train(trainer, o, c, data, {comm.rank(), comm.world_size()}).status;
}
#endif

}  // namespace gpt2
