// Per-backend objects a trainer owns for its model's layers: on Cuda, the cuBLASLt handle with
// its workspace and plan cache (created on first use); nothing on Host.
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/kernels/cuda/gemm_cublaslt.hpp>

#include <optional>

namespace alloy {

template <backend B>
class BackendResources {
 public:
  explicit BackendResources(B = {}) {}
};

#if ALLOY_HAS_CUDA_RUNTIME
template <>
class BackendResources<Cuda> {
 public:
  explicit BackendResources(Cuda be = {}) : be_(be) {}
  GemmHandle& gemm() {
    if (!gemm_) gemm_.emplace(be_);
    return *gemm_;
  }

 private:
  Cuda be_;
  std::optional<GemmHandle> gemm_;
};
#endif

}  // namespace alloy
