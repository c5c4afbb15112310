// The MLP example's fp16 trainers (Host and, under nvcc, Cuda).
#include "run_mlp.hpp"

namespace mlp {

int run_fp16(const Options& o, const Shape& s, bool gpu) {
  using P = alloy::Precision<alloy::fp16, alloy::fp32_master>;
#if ALLOY_HAS_CUDA_KERNELS
  if (gpu) return with_checkpointing<alloy::Cuda, P>(o, s);
#endif
  (void)gpu;
  return with_checkpointing<alloy::Host, P>(o, s);
}

}  // namespace mlp
