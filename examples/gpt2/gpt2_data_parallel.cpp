// The GPT-2 example's --data-parallel trainers (data_parallel.hpp), in a translation unit of their
// own: bf16 on Cuda over NCCL (with and without Checkpointing) and on the Host over threads.
#include "data_parallel.hpp"

namespace gpt2 {

int run_data_parallel(const Options& o, const Config& c, const TokenSource& data, bool gpu) {
  if (const std::string why = data_parallel_refusal(o, gpu); !why.empty()) throw alloy::error(why);
  if (gpu) {
#if ALLOY_HAS_CUDA_KERNELS && ALLOY_HAS_NCCL && ALLOY_GPT2_NCCL
    return o.checkpointing ? run_data_parallel_cuda<alloy::Checkpointing>(o, c, data)
                           : run_data_parallel_cuda<>(o, c, data);
#else
    throw alloy::error("--data-parallel on Cuda: this build of alloy_gpt2 has no NCCL (CMake found no alloy::nccl)");
#endif
  }
  return train_data_parallel_host(o, c, data).front().status;
}

}  // namespace gpt2
