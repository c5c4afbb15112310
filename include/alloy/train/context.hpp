// Context: what the trainer hands a model for one micro-batch: the compute-dtype parameter and
// gradient views, the factor that seeds backward, whether gradients are added or written, the
// backend (and so the stream) to launch on, and the activation workspace.
#pragma once

#include <alloy/memory/input_uploads.hpp>
#include <alloy/memory/workspace.hpp>
#include <alloy/train/backward_observer.hpp>
#include <alloy/train/param_store.hpp>
#include <alloy/train/resources.hpp>

namespace alloy {

template <class Store>
class Context {
 public:
  using param_type = typename Store::param_type;
  using grad_type = typename Store::grad_type;
  using backend_type = typename Store::backend_type;
  using compute_type = typename Store::precision::compute_type;  // tf32 for float storage with tf32 math

  Context(Store& store, Workspace<backend_type>& workspace, float loss_scale, bool accumulate, int micro_batch,
          int micro_batches, std::uint64_t step, int checkpoint_every = 0,
          BackendResources<backend_type>* resources = nullptr, InputUploads<backend_type>* uploads = nullptr,
          BackwardObserver* observer = nullptr)
      : store_(store),
        workspace_(workspace),
        resources_(resources),
        uploads_(uploads),
        observer_(observer),
        checkpoint_every_(checkpoint_every),
        loss_scale_(loss_scale),
        accumulate_(accumulate),
        micro_batch_(micro_batch),
        micro_batches_(micro_batches),
        step_(step) {}

  TensorView<param_type> param(ParamHandle h) const { return store_.param(h); }
  TensorView<param_type> param(const std::string& name) const { return store_.param(name); }
  TensorView<grad_type> grad(ParamHandle h) const {
    if (observer_) observer_->gradient_taken(h.index);
    return store_.grad(h);
  }
  TensorView<grad_type> grad(const std::string& name) const { return grad(store_.registry().handle(name)); }

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

  // Activation recomputation: keep every k-th block's input and recompute the rest inside
  // backward (train/recompute.hpp: the trainer for a LayeredModel's blocks, and
  // alloy::nn::Repeated); 0 keeps everything.
  int checkpoint_every() const noexcept { return checkpoint_every_; }
  // The same context with another spacing (0 inside a segment that is itself recomputed).
  Context with_checkpoint_every(int k) const {
    Context c(*this);
    c.checkpoint_every_ = k;
    return c;
  }
  // The trainer's per-backend objects (the cuBLASLt handle on Cuda).
  BackendResources<backend_type>& resources() const {
    if (!resources_) throw error("Context::resources: this context was made without backend resources");
    return *resources_;
  }

  // The trainer's input pipeline (memory/input_uploads.hpp): host data for this micro-batch goes
  // to the device on a copy stream, overlapped with compute. Null in a context made by hand;
  // nn::upload_features and nn::upload_targets then copy on the compute stream.
  InputUploads<backend_type>* uploads() const noexcept { return uploads_; }

  // The trainer's observer of backward, or null (train/recompute.hpp reports the blocks to it).
  BackwardObserver* backward_observer() const noexcept { return observer_; }

  int micro_batch() const noexcept { return micro_batch_; }
  int micro_batches() const noexcept { return micro_batches_; }
  std::uint64_t step() const noexcept { return step_; }  // optimizer steps attempted before this one

 private:
  Store& store_;
  Workspace<backend_type>& workspace_;
  BackendResources<backend_type>* resources_;
  InputUploads<backend_type>* uploads_;
  BackwardObserver* observer_;
  int checkpoint_every_;
  float loss_scale_;
  bool accumulate_;
  int micro_batch_, micro_batches_;
  std::uint64_t step_;
};

}  // namespace alloy
