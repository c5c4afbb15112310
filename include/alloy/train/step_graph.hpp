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

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

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

#if ALLOY_HAS_CUDA_KERNELS

// Memsets of at most this many bytes become kernel nodes (graph_memsets_as_kernels).
inline constexpr std::size_t graph_memset_kernel_max_bytes = 4096;

namespace detail {

// One block: `height` rows of `width` elements of `element_size` bytes (1, 2 or 4), rows `pitch`
// bytes apart, each element the low bytes of `value`, as cudaMemset2D writes them. (A template, so
// that every translation unit including this header may define it.)
template <int = 0>
__global__ void __launch_bounds__(128)
    graph_memset_kernel(unsigned char* dst, std::size_t pitch, unsigned value, unsigned element_size, std::size_t width,
                        std::size_t height) {
  for (std::size_t i = threadIdx.x; i < width * height; i += blockDim.x) {
    unsigned char* p = dst + (i / width) * pitch + (i % width) * element_size;
    if (element_size == 4) {
      *reinterpret_cast<unsigned*>(p) = value;
    } else if (element_size == 2) {
      *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(value);
    } else {
      *p = static_cast<unsigned char>(value);
    }
  }
}

}  // namespace detail

// Every memset node of `graph` that writes at most graph_memset_kernel_max_bytes of device memory
// of the current device is replaced by a kernel node writing the same bytes, with the same
// dependencies both ways. Returns how many were replaced.
//
// Why: cuBLASLt queues a 4-byte memset into its workspace before most of its products. In a
// replayed graph each such memset node and the waits around it took about 3 us on the H200, where
// dependent kernel nodes start within 0.3 us of each other (docs/benchmarks.md, session 14): 100 of
// them were 0.3 ms of a GPT-2 124M step. A kernel node writes the same bytes in the same place in
// the graph's order, so nothing the graph computes changes.
inline std::size_t graph_memsets_as_kernels(cudaGraph_t graph) {
  std::size_t count = 0;
  ALLOY_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &count));
  std::vector<cudaGraphNode_t> nodes(count);
  ALLOY_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &count));
  nodes.resize(count);
  int device = 0;
  ALLOY_CUDA_CHECK(cudaGetDevice(&device));
  std::size_t replaced = 0;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type{};
    ALLOY_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
    if (type != cudaGraphNodeTypeMemset) continue;
    cudaMemsetParams m{};
    ALLOY_CUDA_CHECK(cudaGraphMemsetNodeGetParams(node, &m));
    const std::size_t bytes = m.width * m.height * m.elementSize;
    if (bytes == 0 || bytes > graph_memset_kernel_max_bytes ||
        (m.elementSize != 1 && m.elementSize != 2 && m.elementSize != 4) ||
        reinterpret_cast<std::uintptr_t>(m.dst) % m.elementSize != 0 ||
        (m.height > 1 && m.pitch % m.elementSize != 0)) {
      continue;
    }
    cudaPointerAttributes where{};
    if (cudaPointerGetAttributes(&where, m.dst) != cudaSuccess) {
      (void)cudaGetLastError();
      continue;
    }
    if ((where.type != cudaMemoryTypeDevice && where.type != cudaMemoryTypeManaged) || where.device != device) continue;

    std::size_t n_in = 0, n_out = 0;
    ALLOY_CUDA_CHECK(cudaGraphNodeGetDependencies(node, nullptr, nullptr, &n_in));
    ALLOY_CUDA_CHECK(cudaGraphNodeGetDependentNodes(node, nullptr, nullptr, &n_out));
    std::vector<cudaGraphNode_t> from(n_in), to(n_out);
    std::vector<cudaGraphEdgeData> in_edges(n_in), out_edges(n_out);
    ALLOY_CUDA_CHECK(cudaGraphNodeGetDependencies(node, from.data(), in_edges.data(), &n_in));
    ALLOY_CUDA_CHECK(cudaGraphNodeGetDependentNodes(node, to.data(), out_edges.data(), &n_out));

    unsigned char* dst = static_cast<unsigned char*>(m.dst);
    std::size_t pitch = m.pitch, width = m.width, height = m.height;
    unsigned value = m.value, element_size = m.elementSize;
    void* args[] = {&dst, &pitch, &value, &element_size, &width, &height};
    cudaKernelNodeParams k{};
    k.func = reinterpret_cast<void*>(&detail::graph_memset_kernel<>);
    k.gridDim = dim3(1);
    k.blockDim = dim3(128);
    k.kernelParams = args;
    cudaGraphNode_t kernel = nullptr;
    ALLOY_CUDA_CHECK(cudaGraphAddKernelNode(&kernel, graph, nullptr, 0, &k));
    for (std::size_t i = 0; i < n_in; ++i) {
      ALLOY_CUDA_CHECK(cudaGraphAddDependencies(graph, &from[i], &kernel, &in_edges[i], 1));
    }
    for (std::size_t i = 0; i < n_out; ++i) {
      ALLOY_CUDA_CHECK(cudaGraphAddDependencies(graph, &kernel, &to[i], &out_edges[i], 1));
    }
    ALLOY_CUDA_CHECK(cudaGraphDestroyNode(node));
    ++replaced;
  }
  return replaced;
}

#endif  // ALLOY_HAS_CUDA_KERNELS

inline CudaGraphExec instantiate(const CudaGraph& graph) {
  cudaGraphExec_t exec = nullptr;
  ALLOY_CUDA_CHECK(cudaGraphInstantiate(&exec, graph.get(), 0));
  return CudaGraphExec(exec);
}

}  // namespace alloy

#endif  // ALLOY_HAS_CUDA_RUNTIME
