// StepLosses<B>: the losses of one step's micro-batches, collected without waiting for any of
// them. A float loss is stored as it comes; a device loss (alloy::Loss in the workspace) is copied
// on the compute stream into the trainer's own device array before the workspace is reused, and
// the array comes back in one copy, queued after the last micro-batch; mean() waits for that copy
// alone (an event), not for the optimizer step queued after it.
#pragma once

#include <alloy/backend/buffer.hpp>
#include <alloy/backend/cuda/handles.hpp>
#include <alloy/backend/loss.hpp>
#include <alloy/backend/pinned.hpp>

#include <vector>

namespace alloy {

template <backend B>
class StepLosses {
 public:
  explicit StepLosses(B be = {}, MemoryTracker* tracker = nullptr) : be_(be), tracker_(tracker) {}

  void begin(int micro_batches) {
    host_.assign(static_cast<std::size_t>(micro_batches), 0.0f);
    on_device_.assign(static_cast<std::size_t>(micro_batches), false);
    any_on_device_ = false;
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<B, Cuda>) {
      if (device_.size() < host_.size()) {
        device_ = Buffer<float, Cuda>(host_.size(), be_, tracker_);
        pinned_.resize(host_.size());
      }
      if (!fetched_) fetched_ = make_cuda_event();
    }
#endif
  }

  void record(int micro_batch, const Loss& loss) {
    const auto i = static_cast<std::size_t>(micro_batch);
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<B, Cuda>) {
      if (loss.on_device()) {
        ALLOY_CUDA_CHECK(cudaMemcpyAsync(device_.data() + i, loss.device_pointer(), sizeof(float),
                                         cudaMemcpyDeviceToDevice, be_.stream));
        on_device_[i] = true;
        any_on_device_ = true;
        return;
      }
    }
#endif
    host_[i] = loss.value();
  }

  // Queues the copy back, after the last micro-batch's loss.
  void fetch() {
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<B, Cuda>) {
      if (any_on_device_) {
        ALLOY_CUDA_CHECK(cudaMemcpyAsync(pinned_.data(), device_.data(), host_.size() * sizeof(float),
                                         cudaMemcpyDeviceToHost, be_.stream));
        record_for_waiters(fetched_.get(), be_.stream);
      }
    }
#endif
  }

  // Whether every micro-batch's loss so far is on the device (a step captured as a CUDA graph
  // needs that: a float the host got during capture would be the same in every replay).
  bool all_on_device() const noexcept {
    for (bool d : on_device_)
      if (!d) return false;
    return !on_device_.empty();
  }

  // A replayed step (a CUDA graph of record() and fetch() for `micro_batches` device losses):
  // mean() reads what the replay copies back.
  void replayed(int micro_batches) {
    begin(micro_batches);
    on_device_.assign(host_.size(), true);
    any_on_device_ = true;
  }

  // The mean of the micro-batch losses, summed in order in double; waits for fetch()'s copy.
  float mean() const {
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<B, Cuda>) {
      if (any_on_device_) ALLOY_CUDA_CHECK(cudaEventSynchronize(fetched_.get()));
    }
#endif
    double sum = 0.0;
    for (std::size_t i = 0; i < host_.size(); ++i) {
#if ALLOY_HAS_CUDA_RUNTIME
      if (on_device_[i]) {
        sum += static_cast<double>(pinned_[i]);
        continue;
      }
#endif
      sum += static_cast<double>(host_[i]);
    }
    return static_cast<float>(sum / static_cast<double>(host_.size()));
  }

 private:
  B be_;
  MemoryTracker* tracker_;
  std::vector<float> host_;
  std::vector<bool> on_device_;
  bool any_on_device_ = false;
#if ALLOY_HAS_CUDA_RUNTIME
  Buffer<float, Cuda> device_;
  pinned_vector<float> pinned_;
  CudaEvent fetched_;
#endif
};

}  // namespace alloy
