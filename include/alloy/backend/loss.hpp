// Loss: a micro-batch's loss as a model hands it to the trainer: a float on the host, or a float
// in device memory that a kernel wrote on a stream and nobody has read yet.
//
// A loss computed on the GPU and read back at once costs a synchronization: the host waits for
// the whole forward pass before it can queue the backward, and the GPU idles while it does. A
// device Loss lets the trainer collect each micro-batch's loss on the device (a 4-byte copy on
// the stream) and read them all once, after the optimizer step. Models that return a float keep
// working: the conversion is implicit.
//
// A device Loss points into memory that lives as long as the micro-batch's workspace (until the
// trainer's next micro-batch): value() reads it (waiting for its stream) and is valid until then.
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>

namespace alloy {

class Loss {
 public:
  Loss() = default;
  Loss(float value) noexcept : host_(value) {}  // NOLINT(google-explicit-constructor): a model may return a float

#if ALLOY_HAS_CUDA_RUNTIME
  // The float at `device` (device memory), written in `stream`'s order.
  Loss(const float* device, cudaStream_t stream) noexcept : device_(device), stream_(stream) {}
  cudaStream_t stream() const noexcept { return stream_; }
#endif

  bool on_device() const noexcept { return device_ != nullptr; }
  const float* device_pointer() const noexcept { return device_; }

  // The value. A device loss is copied back after its stream's work: one synchronization.
  float value() const {
#if ALLOY_HAS_CUDA_RUNTIME
    if (device_) {
      float v = 0.0f;
      ALLOY_CUDA_CHECK(cudaMemcpyAsync(&v, device_, sizeof(float), cudaMemcpyDeviceToHost, stream_));
      ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream_));
      return v;
    }
#endif
    return host_;
  }
  operator float() const { return value(); }  // NOLINT(google-explicit-constructor)

 private:
  float host_ = 0.0f;
  const float* device_ = nullptr;
#if ALLOY_HAS_CUDA_RUNTIME
  cudaStream_t stream_ = nullptr;
#endif
};

}  // namespace alloy
