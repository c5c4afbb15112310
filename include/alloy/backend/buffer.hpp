// Buffer<T, Backend>: an owning array in the backend's memory. Host memory is 256-byte aligned;
// Cuda memory is stream-ordered (cudaMallocAsync / cudaFreeAsync on the backend's stream).
#pragma once

#include <alloy/backend/memory_tracker.hpp>
#include <alloy/error.hpp>
#include <alloy/numeric/rounding.hpp>

#include <cstring>
#include <new>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace alloy {

namespace detail {

inline constexpr std::size_t host_alignment = 256;  // as cudaMalloc: kernels and workspaces may assume it

inline void* allocate_bytes(Host, std::size_t bytes) {
  return ::operator new (bytes, std::align_val_t{host_alignment});
}
inline void free_bytes(Host, void* p) noexcept { ::operator delete (p, std::align_val_t{host_alignment}); }

#if ALLOY_HAS_CUDA_RUNTIME
// Refused on a stream that is being captured as a CUDA graph (Trainer::Config::graph): the
// memory would belong to the graph, and the buffer would outlive it. (A failed query, as on the
// legacy stream while another stream captures in global mode, leaves the answer to
// cudaMallocAsync.)
inline void* allocate_bytes(Cuda be, std::size_t bytes) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(be.stream, &capture) != cudaSuccess) {
    (void)cudaGetLastError();
  } else if (capture != cudaStreamCaptureStatusNone) {
    throw error("cudaMallocAsync of " + std::to_string(bytes) +
                " bytes on a stream that is being captured as a CUDA graph: allocate before the capture (with "
                "Trainer::Config::graph, a step allocates nothing that the step before it did not)");
  }
  void* p = nullptr;
  const std::string what = "cudaMallocAsync of " + std::to_string(bytes) + " bytes";
  check_cuda(cudaMallocAsync(&p, bytes, be.stream), what.c_str(), __FILE__, __LINE__);
  return p;
}
// A destructor cannot throw: a failed free leaves a sticky error that the next checked call
// reports.
inline void free_bytes(Cuda be, void* p) noexcept { (void)cudaFreeAsync(p, be.stream); }
#endif

}  // namespace detail

template <class T, backend B>
class Buffer {
  static_assert(std::is_trivially_copyable_v<T>, "Buffer<T>: T must be trivially copyable");

 public:
  Buffer() = default;

  // `count` uninitialized elements. Bytes are reported to `tracker` (the backend's default
  // tracker when null) for as long as the buffer holds them.
  explicit Buffer(std::size_t count, B be = {}, MemoryTracker* tracker = nullptr)
      : backend_(be), tracker_(tracker ? tracker : &default_memory_tracker<B>()), size_(count) {
    if (count == 0) return;
    data_ = static_cast<T*>(detail::allocate_bytes(be, bytes()));
    tracker_->on_allocate(bytes());
  }

  Buffer(Buffer&& other) noexcept { swap(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    Buffer(std::move(other)).swap(*this);
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  ~Buffer() { reset(); }

  void reset() noexcept {
    if (data_) {
      detail::free_bytes(backend_, data_);
      tracker_->on_free(bytes());
    }
    data_ = nullptr;
    size_ = 0;
  }

  void swap(Buffer& other) noexcept {
    std::swap(backend_, other.backend_);
    std::swap(tracker_, other.tracker_);
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
  }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::size_t bytes() const noexcept { return size_ * sizeof(T); }
  bool empty() const noexcept { return size_ == 0; }
  B backend() const noexcept { return backend_; }
  std::span<T> span() noexcept { return {data_, size_}; }
  std::span<const T> span() const noexcept { return {data_, size_}; }

 private:
  B backend_{};
  MemoryTracker* tracker_ = nullptr;
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

// Copies between host memory and a buffer. On Cuda the copy is ordered on the buffer's stream
// and waited for, so the host side may be reused on return.
template <class T, backend B>
void copy_from_host(Buffer<T, B>& dst, std::span<const T> src) {
  if (src.size() != dst.size()) {
    throw error("copy_from_host: source has " + std::to_string(src.size()) + " elements, buffer " +
                std::to_string(dst.size()));
  }
  if (src.empty()) return;
  if constexpr (std::is_same_v<B, Host>) {
    std::memcpy(dst.data(), src.data(), dst.bytes());
  } else {
#if ALLOY_HAS_CUDA_RUNTIME
    const auto stream = dst.backend().stream;
    ALLOY_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), dst.bytes(), cudaMemcpyHostToDevice, stream));
    ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
#endif
  }
}

// n elements of backend memory at src (raw pointers: workspace activations) copied to a host
// vector. On Cuda the copy is ordered on be.stream and waited for.
template <class T, backend B>
std::vector<T> to_host(B be, const T* src, std::size_t n) {
  std::vector<T> out(n);
  if (n == 0) return out;
  if constexpr (std::is_same_v<B, Host>) {
    (void)be;
    std::memcpy(out.data(), src, n * sizeof(T));
  } else {
#if ALLOY_HAS_CUDA_RUNTIME
    ALLOY_CUDA_CHECK(cudaMemcpyAsync(out.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost, be.stream));
    ALLOY_CUDA_CHECK(cudaStreamSynchronize(be.stream));
#endif
  }
  return out;
}

// The same, each element widened to float: 16-bit activations (logits, outputs) read back to be
// printed, sampled or compared.
template <class T, backend B>
std::vector<float> to_host_as_float(B be, const T* src, std::size_t n) {
  const std::vector<T> staged = to_host(be, src, n);
  std::vector<float> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = to_float(staged[i]);
  return out;
}

template <class T, backend B>
std::vector<T> to_host(const Buffer<T, B>& src) {
  return to_host(src.backend(), src.data(), src.size());
}

// Copies n elements from host memory to backend memory at dst (raw pointers: workspace
// activations). On Cuda the copy is ordered on the backend's stream; from pageable host memory
// the call returns once the source has been read, so the host side may be reused on return.
template <class T, backend B>
void upload(B be, T* dst, std::span<const T> src) {
  if (src.empty()) return;
  if constexpr (std::is_same_v<B, Host>) {
    std::memcpy(static_cast<void*>(dst), src.data(), src.size_bytes());
  } else {
#if ALLOY_HAS_CUDA_RUNTIME
    ALLOY_CUDA_CHECK(cudaMemcpyAsync(dst, src.data(), src.size_bytes(), cudaMemcpyHostToDevice, be.stream));
#endif
  }
  (void)be;
}

// Copies n elements between two arrays in backend memory (ordered on the backend's stream on Cuda).
template <class T, backend B>
void copy(B be, T* dst, const T* src, std::size_t n) {
  if (n == 0) return;
  if constexpr (std::is_same_v<B, Host>) {
    std::memmove(static_cast<void*>(dst), static_cast<const void*>(src), n * sizeof(T));
  } else {
#if ALLOY_HAS_CUDA_RUNTIME
    ALLOY_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToDevice, be.stream));
#endif
  }
  (void)be;
}

// Sets every byte of the buffer to zero (ordered on the buffer's stream on Cuda).
template <class T, backend B>
void fill_zero(Buffer<T, B>& b) {
  if (b.empty()) return;
  if constexpr (std::is_same_v<B, Host>) {
    std::memset(static_cast<void*>(b.data()), 0, b.bytes());
  } else {
#if ALLOY_HAS_CUDA_RUNTIME
    ALLOY_CUDA_CHECK(cudaMemsetAsync(b.data(), 0, b.bytes(), b.backend().stream));
#endif
  }
}

template <backend B>
void synchronize(B be) {
#if ALLOY_HAS_CUDA_RUNTIME
  if constexpr (std::is_same_v<B, Cuda>) ALLOY_CUDA_CHECK(cudaStreamSynchronize(be.stream));
#endif
  (void)be;
}

}  // namespace alloy
