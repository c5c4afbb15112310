// Context: what the trainer hands a model for one micro-batch: the compute-dtype parameter and
// gradient views, the factor that seeds backward, whether gradients are added or written, the
// backend (and so the stream) to launch on, and the activation workspace.
#pragma once

#include <alloy/memory/param_store.hpp>
#include <alloy/train/workspace.hpp>

namespace alloy {

template <class Store>
class Context {
 public:
  using param_type = typename Store::param_type;
  using grad_type = typename Store::grad_type;
  using backend_type = typename Store::backend_type;

  Context(Store& store, Workspace<backend_type>& workspace, float loss_scale, bool accumulate, int micro_batch,
          int micro_batches, std::uint64_t step)
      : store_(store),
        workspace_(workspace),
        loss_scale_(loss_scale),
        accumulate_(accumulate),
        micro_batch_(micro_batch),
        micro_batches_(micro_batches),
        step_(step) {}

  TensorView<param_type> param(ParamHandle h) const { return store_.param(h); }
  TensorView<param_type> param(const std::string& name) const { return store_.param(name); }
  TensorView<grad_type> grad(ParamHandle h) const { return store_.grad(h); }
  TensorView<grad_type> grad(const std::string& name) const { return store_.grad(name); }

  // Backward must produce gradients of loss * loss_scale(): the loss scale divided by the
  // number of micro-batches, so the step sees the scaled mean over the micro-batches.
  float loss_scale() const noexcept { return loss_scale_; }
  // True: add this micro-batch's gradients to what the views hold. False: overwrite them.
  bool accumulate_grads() const noexcept { return accumulate_; }

  backend_type backend() const noexcept { return store_.backend(); }
  Workspace<backend_type>& workspace() const noexcept { return workspace_; }
  template <class T>
  T* allocate(std::size_t n) const {
    return workspace_.template allocate<T>(n);
  }

  int micro_batch() const noexcept { return micro_batch_; }
  int micro_batches() const noexcept { return micro_batches_; }
  std::uint64_t step() const noexcept { return step_; }  // optimizer steps attempted before this one

 private:
  Store& store_;
  Workspace<backend_type>& workspace_;
  float loss_scale_;
  bool accumulate_;
  int micro_batch_, micro_batches_;
  std::uint64_t step_;
};

}  // namespace alloy
