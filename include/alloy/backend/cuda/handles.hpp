// Owning handles for CUDA streams, events and graphs (std::unique_ptr with a destroying deleter),
// shared by everything that keeps one: the input pipeline, the GEMM handle, the step's loss
// read-back, the trainer's captured step.
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_RUNTIME

#include <alloy/error.hpp>

#include <memory>
#include <type_traits>

namespace alloy {

namespace detail {
struct StreamDeleter {
  void operator()(cudaStream_t s) const noexcept { (void)cudaStreamDestroy(s); }
};
struct EventDeleter {
  void operator()(cudaEvent_t e) const noexcept { (void)cudaEventDestroy(e); }
};
struct GraphDeleter {
  void operator()(cudaGraph_t g) const noexcept { (void)cudaGraphDestroy(g); }
};
struct GraphExecDeleter {
  void operator()(cudaGraphExec_t g) const noexcept { (void)cudaGraphExecDestroy(g); }
};
}  // namespace detail

using CudaStream = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, detail::StreamDeleter>;
using CudaEvent = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, detail::EventDeleter>;
// A captured graph and its executable form (train/step_graph.hpp).
using CudaGraph = std::unique_ptr<std::remove_pointer_t<cudaGraph_t>, detail::GraphDeleter>;
using CudaGraphExec = std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, detail::GraphExecDeleter>;

// An event for ordering only (no timing: cheaper to record and to wait on).
inline CudaEvent make_cuda_event() {
  cudaEvent_t e = nullptr;
  ALLOY_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return CudaEvent(e);
}

// A stream that does not synchronize with the legacy default stream.
inline CudaStream make_cuda_stream() {
  cudaStream_t s = nullptr;
  ALLOY_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return CudaStream(s);
}

// Whether work queued on `stream` is being captured into a CUDA graph (not run) now.
inline bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  ALLOY_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Records `event` on `stream` for someone outside the stream to wait on (the host, or another
// stream). While the stream is captured into a CUDA graph, a plain record only orders the graph's
// own nodes; an external record puts a node in the graph that records the event each time the
// graph runs.
inline void record_for_waiters(cudaEvent_t event, cudaStream_t stream) {
  if (capturing(stream)) {
    ALLOY_CUDA_CHECK(cudaEventRecordWithFlags(event, stream, cudaEventRecordExternal));
  } else {
    ALLOY_CUDA_CHECK(cudaEventRecord(event, stream));
  }
}

}  // namespace alloy

#endif  // ALLOY_HAS_CUDA_RUNTIME
