// The Cuda backend's algorithms: grid-stride kernels over 16-byte vectors with a scalar tail,
// and deterministic two-stage reductions built on block_allreduce (backend/cuda/warp_reduce.hpp:
// warp butterflies, then the warps' totals in warp order). Needs nvcc. Block size, grid
// and vector accesses come from backend/cuda/ (launch.hpp, vector_io.hpp), shared by all kernels.
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_KERNELS

#include <alloy/backend/access.hpp>
#include <alloy/backend/buffer.hpp>
#include <alloy/backend/cuda/launch.hpp>
#include <alloy/backend/cuda/vector_io.hpp>
#include <alloy/backend/device.hpp>
#include <alloy/backend/tags.hpp>

#include <alloy/backend/cuda/warp_reduce.hpp>

#include <cstddef>
#include <utility>

namespace alloy {

namespace detail {

inline constexpr int cuda_unroll = 4;  // vectors each thread has in flight

// One array's share of a vector step: L consecutive elements held in registers.
template <class W, int L>
struct Lanes {
  typename W::value_type v[L];
};

// An `in` array is never written by the kernel, so it is read through the read-only path
// (backend/cuda/vector_io.hpp states the rule).
template <int L, class W>
__device__ ALLOY_FORCEINLINE void load_lanes(Lanes<W, L>& r, const W& w, std::size_t first) {
  using T = typename W::value_type;
  if constexpr (W::reads) {
    if constexpr ((L * sizeof(T)) % 16 == 0) {
      load_vector<W::writes ? LoadPath::plain : LoadPath::read_only>(w.data + first, r.v);
    } else {
#pragma unroll
      for (int l = 0; l < L; ++l) r.v[l] = w.data[first + l];
    }
  }
}

template <int L, class W>
__device__ ALLOY_FORCEINLINE void store_lanes(const Lanes<W, L>& r, const W& w, std::size_t first) {
  using T = typename W::value_type;
  if constexpr (W::writes) {
    if constexpr ((L * sizeof(T)) % 16 == 0) {
      store_vector(w.data + first, r.v);
    } else {
#pragma unroll
      for (int l = 0; l < L; ++l) w.data[first + l] = r.v[l];
    }
  }
}

// Every array's lanes of one vector step, as a tuple (element I derives from LaneSlot<I, ...>),
// each value-initialized. Alloy's own rather than cuda::std::tuple, whose header brings 11K
// preprocessed lines of libcu++ (and CUDA's fp8/fp6/fp4 headers) into every CUDA translation unit.
template <std::size_t I, class T>
struct LaneSlot {
  T value{};
};

template <class Seq, class... T>
struct LaneSlots;

template <std::size_t... I, class... T>
struct LaneSlots<std::index_sequence<I...>, T...> : LaneSlot<I, T>... {};

template <int L, class... W>
using LaneTuple = LaneSlots<std::index_sequence_for<W...>, Lanes<W, L>...>;

template <std::size_t I, class T>
__device__ ALLOY_FORCEINLINE T& lane_get(LaneSlot<I, T>& s) {
  return s.value;
}

template <std::size_t I, class T>
__device__ ALLOY_FORCEINLINE const T& lane_get(const LaneSlot<I, T>& s) {
  return s.value;
}

template <int L, class R, class... W, std::size_t... I>
__device__ ALLOY_FORCEINLINE void load_all(R& r, std::size_t first, std::index_sequence<I...>, const W&... w) {
  (load_lanes<L>(lane_get<I>(r), w, first), ...);
}

template <int L, class R, class... W, std::size_t... I>
__device__ ALLOY_FORCEINLINE void store_all(const R& r, std::size_t first, std::index_sequence<I...>, const W&... w) {
  (store_lanes<L>(lane_get<I>(r), w, first), ...);
}

template <int L, bool Indexed, class F, class R, std::size_t... I>
__device__ ALLOY_FORCEINLINE void apply_lanes(F& f, std::size_t first, R& r, std::index_sequence<I...>) {
#pragma unroll
  for (int l = 0; l < L; ++l) {
    if constexpr (Indexed) {
      f(first + l, lane_get<I>(r).v[l]...);
    } else {
      f(lane_get<I>(r).v[l]...);
    }
  }
}

template <bool Indexed, class F, class... W>
__device__ ALLOY_FORCEINLINE void apply_scalar(F& f, std::size_t i, const W&... w) {
  if constexpr (Indexed) {
    f(i, w.element(i)...);
  } else {
    f(w.element(i)...);
  }
}

// f(i) for i in [0, n). Reads and writes whatever f touches.
template <class F>
__global__ void __launch_bounds__(cuda_block) for_each_index_kernel(std::size_t n, F f) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}

// f(a[i], b[i], ...) (or f(i, a[i], b[i], ...) when Indexed) for i in [0, n): per element,
// reads sizeof of each `in`/`inout` array and writes sizeof of each `out`/`inout` array, L
// elements (16 bytes or more per array) at a time, Unroll vectors in flight per thread.
template <int L, int Unroll, bool Indexed, class F, class... W>
__global__ void __launch_bounds__(cuda_block) for_each_vector_kernel(std::size_t n, F f, W... w) {
  using Seq = std::index_sequence_for<W...>;
  const std::size_t vectors = n / L;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  std::size_t v = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (Unroll > 1) {
    for (; v + (Unroll - 1) * stride < vectors; v += Unroll * stride) {
      LaneTuple<L, W...> r[Unroll];
#pragma unroll
      for (int u = 0; u < Unroll; ++u) load_all<L>(r[u], (v + u * stride) * L, Seq{}, w...);
#pragma unroll
      for (int u = 0; u < Unroll; ++u) {
        apply_lanes<L, Indexed>(f, (v + u * stride) * L, r[u], Seq{});
        store_all<L>(r[u], (v + u * stride) * L, Seq{}, w...);
      }
    }
  }
  for (; v < vectors; v += stride) {
    LaneTuple<L, W...> r;
    load_all<L>(r, v * L, Seq{}, w...);
    apply_lanes<L, Indexed>(f, v * L, r, Seq{});
    store_all<L>(r, v * L, Seq{}, w...);
  }
  for (std::size_t i = vectors * L + std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    apply_scalar<Indexed>(f, i, w...);
  }
}

template <int Unroll, bool Indexed, class F, class... W>
void launch_for_each(Cuda be, std::size_t n, F f, W... w) {
  if (n == 0) return;
  constexpr int L = vector_lanes<W...>();
  if (L > 1 && all_aligned(16, w...)) {
    for_each_vector_kernel<L, Unroll, Indexed><<<grid_for(n / L), cuda_block, 0, be.stream>>>(n, f, w...);
  } else {
    for_each_vector_kernel<1, Unroll, Indexed><<<grid_for(n), cuda_block, 0, be.stream>>>(n, f, w...);
  }
  ALLOY_CUDA_CHECK_LAUNCH();
}

// Shared memory for one block_allreduce of Acc over cuda_block threads: one value per warp. Raw
// storage, since __shared__ variables take no constructor.
template <class Acc>
__device__ ALLOY_FORCEINLINE Acc* block_reduce_slots() {
  __shared__ alignas(Acc) unsigned char slots[sizeof(Acc) * (cuda_block / warp_size)];
  return reinterpret_cast<Acc*>(slots);
}

// Stage 1 of a reduction: each block folds its grid-stride share and writes one partial.
// Per element it reads sizeof of each array; nothing is written but the partials.
template <int L, class Acc, class Reduce, class Transform, class... W>
__global__ void __launch_bounds__(cuda_block)
    reduce_partials_kernel(std::size_t n, Acc init, Reduce reduce, Transform transform, Acc* partials, W... w) {
  using Seq = std::index_sequence_for<W...>;
  const std::size_t vectors = n / L;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  std::size_t v = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  Acc acc = init;
  auto fold = [&](auto const&... x) { acc = reduce(acc, static_cast<Acc>(transform(x...))); };
  constexpr bool not_indexed = false;
  for (; v + (cuda_unroll - 1) * stride < vectors; v += cuda_unroll * stride) {
    LaneTuple<L, W...> r[cuda_unroll];
#pragma unroll
    for (int u = 0; u < cuda_unroll; ++u) load_all<L>(r[u], (v + u * stride) * L, Seq{}, w...);
#pragma unroll
    for (int u = 0; u < cuda_unroll; ++u) apply_lanes<L, not_indexed>(fold, 0, r[u], Seq{});
  }
  for (; v < vectors; v += stride) {
    LaneTuple<L, W...> r;
    load_all<L>(r, v * L, Seq{}, w...);
    apply_lanes<L, not_indexed>(fold, 0, r, Seq{});
  }
  for (std::size_t i = vectors * L + std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    fold(w.element(i)...);
  }
  const Acc block_total = block_allreduce<cuda_block>(acc, reduce, block_reduce_slots<Acc>());
  if (threadIdx.x == 0) partials[blockIdx.x] = block_total;
}

// Stage 2: one block folds the partials in a fixed order, so a given size and device always
// give the same bits.
template <class Acc, class Reduce>
__global__ void __launch_bounds__(cuda_block)
    reduce_final_kernel(int count, Acc init, Reduce reduce, const Acc* partials, Acc* result) {
  Acc acc = init;
  for (int i = threadIdx.x; i < count; i += cuda_block) acc = reduce(acc, partials[i]);
  const Acc total = block_allreduce<cuda_block>(acc, reduce, block_reduce_slots<Acc>());
  if (threadIdx.x == 0) *result = total;
}

}  // namespace detail

// Calls f(i) for every i in [0, n), ordered on the backend's stream.
template <class F>
void for_each_n(Cuda be, std::size_t n, F f) {
  if (n == 0) return;
  detail::for_each_index_kernel<<<detail::grid_for(n), detail::cuda_block, 0, be.stream>>>(n, f);
  ALLOY_CUDA_CHECK_LAUNCH();
}

// Calls f(a[i], b[i], ...) for every i in [0, n), ordered on the backend's stream. Arrays all
// 16-byte aligned move 16 bytes per access; otherwise every access is scalar.
template <class F, element_access... W>
requires(sizeof...(W) > 0) void for_each_n(Cuda be, std::size_t n, F f, W... w) {
  detail::launch_for_each<detail::cuda_unroll, false>(be, n, f, w...);
}

// As for_each_n, calling f(i, a[i], b[i], ...). Unroll: vectors each thread has in flight
// (fewer for functors that hold many registers).
template <int Unroll = detail::cuda_unroll, class F, element_access... W>
void for_each_indexed_n(Cuda be, std::size_t n, F f, W... w) {
  detail::launch_for_each<Unroll, true>(be, n, f, w...);
}

// Workspace bytes transform_reduce_async needs on the current device for accumulator Acc.
template <class Acc>
std::size_t reduce_workspace_bytes(Cuda) {
  return static_cast<std::size_t>(detail::resident_blocks()) * sizeof(Acc);
}

// reduce(init, transform(a[i], b[i], ...)) over [0, n) into *result (device memory), ordered on
// the stream. The caller owns `workspace` (reduce_workspace_bytes<Acc> bytes, Acc-aligned).
// The result is deterministic for a given n, device and pointer alignment.
template <class Acc, class Reduce, class Transform, element_access... W>
void transform_reduce_async(Cuda be, void* workspace, std::size_t workspace_bytes, Acc* result, std::size_t n, Acc init,
                            Reduce reduce, Transform transform, W... w) {
  constexpr int L = detail::vector_lanes<W...>();
  const bool vectorized = L > 1 && detail::all_aligned(16, w...);
  const int grid = detail::grid_for(vectorized ? n / L : n);
  if (workspace_bytes < grid * sizeof(Acc)) {
    throw error("transform_reduce_async: workspace of " + std::to_string(workspace_bytes) + " bytes, needs " +
                std::to_string(grid * sizeof(Acc)));
  }
  Acc* partials = static_cast<Acc*>(workspace);
  if (vectorized) {
    detail::reduce_partials_kernel<L>
        <<<grid, detail::cuda_block, 0, be.stream>>>(n, init, reduce, transform, partials, w...);
  } else {
    detail::reduce_partials_kernel<1>
        <<<grid, detail::cuda_block, 0, be.stream>>>(n, init, reduce, transform, partials, w...);
  }
  ALLOY_CUDA_CHECK_LAUNCH();
  detail::reduce_final_kernel<<<1, detail::cuda_block, 0, be.stream>>>(grid, init, reduce, partials, result);
  ALLOY_CUDA_CHECK_LAUNCH();
}

// Synchronous form: allocates its workspace on the stream and returns the value on the host.
template <class Acc, class Reduce, class Transform, element_access... W>
Acc transform_reduce(Cuda be, std::size_t n, Acc init, Reduce reduce, Transform transform, W... w) {
  const std::size_t bytes = reduce_workspace_bytes<Acc>(be);
  Buffer<Acc, Cuda> workspace(bytes / sizeof(Acc), be);
  Buffer<Acc, Cuda> result(1, be);
  transform_reduce_async(be, workspace.data(), bytes, result.data(), n, init, reduce, transform, w...);
  return to_host(result)[0];
}

}  // namespace alloy

#endif  // ALLOY_HAS_CUDA_KERNELS
