// Per-backend objects a trainer owns for its model's layers: on Cuda, the cuBLASLt handle with
// its workspace and plan cache (created on first use); nothing on Host.
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/kernels/cuda/gemm_cublaslt.hpp>
#include <alloy/kernels/gemm_args.hpp>

#include <optional>
#include <utility>

namespace alloy {

template <backend B>
class BackendResources {
 public:
  explicit BackendResources(B = {}, GemmTuning = GemmTuning::heuristic) {}
};

#if ALLOY_HAS_CUDA_RUNTIME
template <>
class BackendResources<Cuda> {
 public:
  explicit BackendResources(Cuda be = {}, GemmTuning tuning = GemmTuning::heuristic) : be_(be), tuning_(tuning) {}
  BackendResources(BackendResources&& other) noexcept : be_(other.be_), tuning_(other.tuning_) { take(other); }
  BackendResources& operator=(BackendResources&& other) noexcept {
    if (this != &other) {
      gemm_.reset();
      be_ = other.be_;
      tuning_ = other.tuning_;
      take(other);
    }
    return *this;
  }
  GemmHandle& gemm() {
    if (!gemm_) gemm_.emplace(be_, GemmHandle::default_workspace_bytes, tuning_);
    return *gemm_;
  }

 private:
  // GemmHandle moves by construction only (it cannot be assigned).
  void take(BackendResources& other) noexcept {
    if (other.gemm_) {
      gemm_.emplace(std::move(*other.gemm_));
      other.gemm_.reset();
    }
  }

  Cuda be_;
  GemmTuning tuning_;
  std::optional<GemmHandle> gemm_;
};
#endif

}  // namespace alloy
