// Summing micro-batch gradients into the gradient accumulator, with the optimizer's pass 1
// folded into the last one. The accumulator has one owner (the trainer, through
// OptimizerStep::accumulate): the first micro-batch writes acc = g without reading acc, the
// middle ones add, and the last one adds and, from the values it writes, sums the squares of the
// unscaled gradients, so the step does not read the gradients again to learn their norm. A
// non-finite gradient makes the sum non-finite (every term is >= 0), as in pass 1.
// Bytes per element: first micro-batch read g, write acc (2 + 4 for bf16 into fp32); later ones
// read g and acc, write acc (2 + 4 + 4); the sums add 4 bytes per 16,384 elements.
//
// The order of the sum is fixed and independent of the device, so Host and Cuda give the same
// bits: the arena is cut into segments of 16,384 elements, a segment into 8 rounds of 2,048, a
// round into 256 vectors of 8. Thread t of a 256-thread block adds, in order, the squares of
// vector t of each round, lane by lane; the block folds its threads' sums with
// block_allreduce (backend/cuda/warp_reduce.hpp) into the segment's partial; one block then
// folds the partials (thread t takes partials t, t + 256, ... in order) the same way.
#pragma once

#include <alloy/backend/algorithms.hpp>
#include <alloy/backend/cuda/launch.hpp>
#include <alloy/backend/cuda/vector_io.hpp>
#include <alloy/backend/cuda/warp_reduce.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/rounding.hpp>

#include <alloy/error.hpp>

#include <cstddef>
#include <string>
#include <vector>

namespace alloy {

namespace detail {

inline constexpr int grad_stats_threads = 256;  // threads per segment (Cuda: one block)
inline constexpr int grad_stats_lanes = 8;      // consecutive elements a thread takes at a time
inline constexpr int grad_stats_rounds = 8;     // vectors per thread per segment
inline constexpr std::size_t grad_stats_segment =
    std::size_t(grad_stats_threads) * grad_stats_lanes * grad_stats_rounds;  // 16,384

ALLOY_HOST_DEVICE inline std::size_t grad_stats_segments(std::size_t n) {
  return (n + grad_stats_segment - 1) / grad_stats_segment;
}

inline void check_whole_vectors(std::size_t n) {
  if (n % grad_stats_lanes != 0) {
    throw error("accumulate_grads_with_stats_async: " + std::to_string(n) + " elements, not a multiple of " +
                std::to_string(grad_stats_lanes) + " (arenas are padded to 256)");
  }
}

struct SquaresSum {
  ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float operator()(float a, float b) const { return fp::add(a, b); }
};

// acc = g: the first micro-batch (acc is not read).
template <class G, class Acc>
struct CopyGrads {
  ALLOY_HOST_DEVICE void operator()(const G& g, Acc& acc) const { acc = round_nearest<Acc>(to_float(g)); }
};

// acc += g.
template <class G, class Acc>
struct AddGrads {
  ALLOY_HOST_DEVICE void operator()(const G& g, Acc& acc) const {
    acc = round_nearest<Acc>(fp::add(to_float(acc), to_float(g)));
  }
};

// The value the last micro-batch writes into the accumulator, and its unscaled square.
template <bool First, class G, class Acc>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE Acc summed_grad(const G& g, const Acc& acc) {
  if constexpr (First) {
    return round_nearest<Acc>(to_float(g));
  } else {
    return round_nearest<Acc>(fp::add(to_float(acc), to_float(g)));
  }
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float unscaled_square(float x, float inv_scale) {
  const float u = fp::mul(x, inv_scale);
  return fp::mul(u, u);
}

// Host: the same sums in the same order as the Cuda kernels below.
template <bool First, class G, class Acc>
float accumulate_with_stats_host(const G* g, Acc* acc, std::size_t n, float inv_scale) {
  constexpr int T = grad_stats_threads, L = grad_stats_lanes;
  std::vector<float> partials(grad_stats_segments(n));
  for (std::size_t s = 0; s < partials.size(); ++s) {
    float sums[T] = {};
    for (int r = 0; r < grad_stats_rounds; ++r) {
      for (int t = 0; t < T; ++t) {
        const std::size_t first = s * grad_stats_segment + (std::size_t(r) * T + t) * L;
        if (first >= n) continue;
        for (int l = 0; l < L; ++l) {
          const Acc a = summed_grad<First>(g[first + l], acc[first + l]);
          acc[first + l] = a;
          sums[t] = fp::add(sums[t], unscaled_square(to_float(a), inv_scale));
        }
      }
    }
    partials[s] = block_replay<T>(sums, SquaresSum{});
  }
  float sums[T] = {};
  for (int t = 0; t < T; ++t) {
    for (std::size_t i = t; i < partials.size(); i += T) sums[t] = fp::add(sums[t], partials[i]);
  }
  return block_replay<T>(sums, SquaresSum{});
}

#if ALLOY_HAS_CUDA_KERNELS

static_assert(grad_stats_threads == cuda_block);

// One segment per block per pass, 4 of a thread's 8 vectors in flight at a time. Reads g with
// the read-only path (the kernel never writes it); acc is read (not on the first micro-batch)
// and written.
template <bool First, class G, class Acc>
__global__ void __launch_bounds__(cuda_block)
    accumulate_with_stats_kernel(const G* g, Acc* acc, std::size_t n, float inv_scale, float* partials) {
  constexpr int L = grad_stats_lanes, R = grad_stats_rounds, U = 4;
  __shared__ float warp_totals[cuda_block / warp_size];
  const std::size_t segments = grad_stats_segments(n);
  for (std::size_t s = blockIdx.x; s < segments; s += gridDim.x) {
    float sum = 0.0f;
#pragma unroll
    for (int r0 = 0; r0 < R; r0 += U) {
      G gv[U][L];
      Acc av[U][L];
      std::size_t first[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        first[u] = s * grad_stats_segment + (std::size_t(r0 + u) * cuda_block + threadIdx.x) * L;
        if (first[u] < n) {
          load_vector<LoadPath::read_only>(g + first[u], gv[u]);
          if constexpr (!First) load_vector(acc + first[u], av[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (first[u] < n) {
          Acc out[L];
#pragma unroll
          for (int l = 0; l < L; ++l) {
            out[l] = summed_grad<First>(gv[u][l], av[u][l]);
            sum = fp::add(sum, unscaled_square(to_float(out[l]), inv_scale));
          }
          store_vector(acc + first[u], out);
        }
      }
    }
    const float total = block_allreduce<cuda_block>(sum, SquaresSum{}, warp_totals);
    if (threadIdx.x == 0) partials[s] = total;
    __syncthreads();  // warp_totals is reused by the next segment
  }
}

// A template (of the block size), so that the header defines no non-inline kernel.
template <int Block>
__global__ void __launch_bounds__(Block)
    grad_stats_final_kernel(const float* partials, std::size_t count, float* result) {
  __shared__ float warp_totals[Block / warp_size];
  float sum = 0.0f;
  for (std::size_t i = threadIdx.x; i < count; i += Block) sum = fp::add(sum, partials[i]);
  const float total = block_allreduce<Block>(sum, SquaresSum{}, warp_totals);
  if (threadIdx.x == 0) *result = total;
}

#endif  // ALLOY_HAS_CUDA_KERNELS

}  // namespace detail

// Micro-batch `first ? 0 : later` of several: acc = g (first) or acc += g.
template <class B, class G, class Acc>
void accumulate_grads(B be, const G* g, Acc* acc, std::size_t n, bool first) {
  if (first) {
    for_each_n(be, n, detail::CopyGrads<G, Acc>{}, in(g), out(acc));
  } else {
    for_each_n(be, n, detail::AddGrads<G, Acc>{}, in(g), inout(acc));
  }
}

// Elements of the partial sums accumulate_grads_with_stats_async needs (Cuda; none on Host).
inline std::size_t grad_stats_partials(std::size_t n) { return detail::grad_stats_segments(n); }

// The last micro-batch: acc = g (first, with a single micro-batch) or acc += g, and *result =
// the sum over [0, n) of (acc[i] * inv_scale)^2 in the fixed order above. n is a multiple of 8.
// On Cuda the call is ordered on be.stream, `partials` (grad_stats_partials(n) floats) and
// `result` are device memory; on Host *result holds the value on return.
template <class G, class Acc>
void accumulate_grads_with_stats_async(Host, const G* g, Acc* acc, std::size_t n, bool first, float inv_scale,
                                       float* /*partials*/, float* result) {
  detail::check_whole_vectors(n);
  *result = first ? detail::accumulate_with_stats_host<true>(g, acc, n, inv_scale)
                  : detail::accumulate_with_stats_host<false>(g, acc, n, inv_scale);
}

#if ALLOY_HAS_CUDA_KERNELS
template <class G, class Acc>
void accumulate_grads_with_stats_async(Cuda be, const G* g, Acc* acc, std::size_t n, bool first, float inv_scale,
                                       float* partials, float* result) {
  detail::check_whole_vectors(n);
  const std::size_t segments = detail::grad_stats_segments(n);
  const int grid = detail::grid_for(segments, 1);
  if (n > 0) {
    if (first) {
      detail::accumulate_with_stats_kernel<true>
          <<<grid, detail::cuda_block, 0, be.stream>>>(g, acc, n, inv_scale, partials);
    } else {
      detail::accumulate_with_stats_kernel<false>
          <<<grid, detail::cuda_block, 0, be.stream>>>(g, acc, n, inv_scale, partials);
    }
    ALLOY_CUDA_CHECK_LAUNCH();
  }
  detail::grad_stats_final_kernel<detail::grad_stats_threads>
      <<<1, detail::grad_stats_threads, 0, be.stream>>>(partials, segments, result);
  ALLOY_CUDA_CHECK_LAUNCH();
}
#endif

}  // namespace alloy
