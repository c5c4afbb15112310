// Per-backend objects a trainer owns for its model's layers: on Cuda, the cuBLASLt handle with
// its workspace and plan cache (created on first use); nothing on Host.
//
// This header names GemmHandle without its definition (kernels/cuda/gemm_cublaslt.hpp, which
// includes cuBLASLt's header): the handle is created by gemm(), a template instantiated only
// where a product is run, by code that includes kernels/gemm.hpp. A translation unit that merely
// holds a trainer (alloy/alloy.hpp) does not parse cuBLASLt's header.
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>
#include <alloy/kernels/gemm_args.hpp>

#include <concepts>
#include <memory>
#include <string>
#include <utility>

namespace alloy {

template <backend B>
class BackendResources {
 public:
  explicit BackendResources(B = {}, GemmTuning = GemmTuning::heuristic, std::string = {}) {}
};

#if ALLOY_HAS_CUDA_RUNTIME
class GemmHandle;  // kernels/cuda/gemm_cublaslt.hpp

namespace detail {
// Deletes the GemmHandle through a function made where its definition was seen.
struct GemmHandleDeleter {
  void (*destroy)(GemmHandle*) = nullptr;
  void operator()(GemmHandle* h) const noexcept { destroy(h); }
};
}  // namespace detail

template <>
class BackendResources<Cuda> {
 public:
  // plans_file: GemmHandle's (timed choices kept across runs); refused here, at construction,
  // with GemmTuning::heuristic.
  explicit BackendResources(Cuda be = {}, GemmTuning tuning = GemmTuning::heuristic, std::string plans_file = {})
      : be_(be), tuning_(tuning), plans_file_(std::move(plans_file)) {
    if (!plans_file_.empty() && tuning_ == GemmTuning::heuristic) {
      throw error("Trainer: gemm_plans_file '" + plans_file_ +
                  "' keeps timed choices of cuBLASLt algorithms; it needs gemm_tuning = GemmTuning::timed or "
                  "timed_any");
    }
  }
  // The handle stays where it is on the heap: a move hands it over.
  BackendResources(BackendResources&&) noexcept = default;
  BackendResources& operator=(BackendResources&&) noexcept = default;

  // Created on first use. Handle is GemmHandle, whose definition the caller includes
  // (kernels/gemm.hpp or kernels/cuda/gemm_cublaslt.hpp).
  template <std::same_as<GemmHandle> Handle = GemmHandle>
  Handle& gemm() {
    if (!gemm_) {
      gemm_ = std::unique_ptr<GemmHandle, detail::GemmHandleDeleter>(
          new Handle(be_, Handle::default_workspace_bytes, tuning_, plans_file_),
          detail::GemmHandleDeleter{[](GemmHandle* h) { delete static_cast<Handle*>(h); }});
    }
    return *static_cast<Handle*>(gemm_.get());
  }

 private:
  Cuda be_;
  GemmTuning tuning_;
  std::string plans_file_;
  std::unique_ptr<GemmHandle, detail::GemmHandleDeleter> gemm_;
};
#endif

}  // namespace alloy
