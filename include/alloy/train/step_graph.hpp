// A training step captured as a CUDA graph and replayed (Trainer::Config::graph).
//
// The trainer captures one whole step, every micro-batch's forward and backward, the accumulation
// and the optimizer's device part, on the compute stream (relaxed capture: nothing runs; other
// streams and host calls work as usual), instantiates it once and replays it while the step's
// key repeats: the micro-batch count, the loss scale and each upload's slot, address and size
// (memory/input_uploads.hpp), with the workspace where it was. What changes every step is not in the
// graph's launch arguments: the inputs are copied into the slots before the replay, and the
// optimizer reads its rate and step number from device memory (train/optimizer_step.hpp).
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_RUNTIME

#include <alloy/backend/cuda/handles.hpp>
#include <alloy/error.hpp>

#include <string>

namespace alloy {

// Captures what is queued on `stream` between construction and end(). Destroyed without end()
// (an exception while capturing), it ends the capture and drops what was captured, so the stream
// is usable again and nothing of it ran.
class StreamCapture {
 public:
  explicit StreamCapture(cudaStream_t stream) : stream_(stream) {
    ALLOY_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
    active_ = true;
  }
  StreamCapture(const StreamCapture&) = delete;
  StreamCapture& operator=(const StreamCapture&) = delete;
  ~StreamCapture() {
    if (!active_) return;
    cudaGraph_t g = nullptr;
    (void)cudaStreamEndCapture(stream_, &g);
    if (g) (void)cudaGraphDestroy(g);
    (void)cudaGetLastError();  // the capture's own error, if it was invalidated: reported already
  }

  // The captured graph. Throws, naming the runtime's error, when the capture was invalidated (an
  // operation a graph cannot hold, such as a synchronization of the captured stream).
  CudaGraph end() {
    active_ = false;
    cudaGraph_t g = nullptr;
    const cudaError_t e = cudaStreamEndCapture(stream_, &g);
    CudaGraph graph(g);
    if (e != cudaSuccess || !g) {
      (void)cudaGetLastError();
      throw error(std::string("the runtime ended it with ") + cudaGetErrorString(e) +
                  ": something queued during the step cannot be captured (a synchronization, a blocking copy or "
                  "an allocation on the compute stream inside forward or backward)");
    }
    return graph;
  }

 private:
  cudaStream_t stream_;
  bool active_ = false;
};

inline CudaGraphExec instantiate(const CudaGraph& graph) {
  cudaGraphExec_t exec = nullptr;
  ALLOY_CUDA_CHECK(cudaGraphInstantiate(&exec, graph.get(), 0));
  return CudaGraphExec(exec);
}

}  // namespace alloy

#endif  // ALLOY_HAS_CUDA_RUNTIME
