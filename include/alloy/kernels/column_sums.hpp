// Column sums of a row-major matrix, a Linear layer's bias gradient (db = the column sums of dy):
//   out[j] = sum over rows i of x[i, j]            (accumulate: out[j] + that sum)
// summed in fp32 and rounded once into out's dtype. On Cuda it replaces cuBLASLt's bias-gradient
// epilogue, which cuBLASLt 13.0 runs as a kernel of its own after the weight-gradient product at
// about 2.2 TB/s (scripts/trace_table.py on GPT-2 124M); this one reads x once, 16 bytes at a time.
//
// Cuda: blocks of 8 warps; a block owns a tile of 32 x V columns (V elements of 16 bytes per lane,
// or 1 where the rows are not aligned) over one part of the rows, each warp summing every 8th row
// of the part; the block folds its warps in order into one fp32 partial per column and part, and
// a second kernel sums the parts (8 warps per 32 columns, each every 8th part, then the 8 in order)
// and writes out. The parts depend on rows, cols and the
// device's multiprocessor count alone, so the bits are the same run after run (not the Host's:
// the Host sums each column in row order).
//
// column_sums_of_parts finishes sums whose parts another kernel wrote (attention's backward, for
// GPT-2's c_attn bias gradient: kernels/attention_args.hpp): out[j] = the sum over parts p of
// parts[p * cols + j], by the second kernel above on Cuda and in its order on the Host (warp w of
// 8 adds parts w, w + 8, ... in turn, then the 8 warp sums are added in order), so both backends
// give the same bits.
#pragma once

#include <alloy/backend/cuda/launch.hpp>
#include <alloy/backend/cuda/vector_io.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/rounding.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

namespace alloy {

template <class T, class G = T>
struct ColumnSums {
  const T* x = nullptr;  // rows x cols, row i at x + i * ld
  std::size_t rows = 0, cols = 0, ld = 0;
  G* out = nullptr;  // cols elements
  bool accumulate = false;
};

namespace detail {

inline constexpr int column_sums_warps = 8;

template <class T, class G>
void check_column_sums(const ColumnSums<T, G>& a) {
  const std::string where = "column_sums(rows = " + std::to_string(a.rows) + ", cols = " + std::to_string(a.cols) +
                            ", ld = " + std::to_string(a.ld) + "): ";
  if (a.cols > 0 && !a.out) throw error(where + "out is null");
  if (a.rows > 0 && a.cols > 0 && !a.x) throw error(where + "x is null");
  if (a.ld < a.cols) throw error(where + "ld is smaller than cols");
}

// Parts the rows are cut into on Cuda: enough blocks to fill the device about four times over,
// each part at least 4 rows per warp.
inline std::size_t column_sums_parts(std::size_t rows, std::size_t tiles, int sm_count) {
  const std::size_t wanted = std::max<std::size_t>(1, std::size_t(sm_count) * 4 / std::max<std::size_t>(1, tiles));
  const std::size_t most = std::max<std::size_t>(1, rows / (4 * column_sums_warps));
  return std::min(wanted, most);
}

#if ALLOY_HAS_CUDA_KERNELS

template <int V, class T, class G>
__global__ void __launch_bounds__(column_sums_warps * 32)
    column_sums_kernel(ColumnSums<T, G> a, std::size_t rows_per_part, float* partials) {
  constexpr int W = column_sums_warps;
  __shared__ float warp_sums[W][32 * V];
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const std::size_t tile_begin = std::size_t(blockIdx.x) * 32 * V;
  const std::size_t c = tile_begin + std::size_t(lane) * V;
  const std::size_t begin = std::size_t(blockIdx.y) * rows_per_part;
  const std::size_t end = begin + rows_per_part < a.rows ? begin + rows_per_part : a.rows;
  float s[V];
#pragma unroll
  for (int k = 0; k < V; ++k) s[k] = 0.0f;
  if (c < a.cols) {  // V > 1: cols is a multiple of V, so the whole vector is in the row
    std::size_t r = begin + std::size_t(warp);
    // Four rows' loads in flight before their sums.
    for (; r + 3 * W < end; r += 4 * W) {
      T v[4][V];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const T* p = a.x + (r + std::size_t(u) * W) * a.ld + c;
        if constexpr (V > 1) {
          load_vector<LoadPath::read_only>(p, v[u]);
        } else {
          v[u][0] = p[0];
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int k = 0; k < V; ++k) s[k] = fp::add(s[k], to_float(v[u][k]));
      }
    }
    for (; r < end; r += W) {
      T v[V];
      const T* p = a.x + r * a.ld + c;
      if constexpr (V > 1) {
        load_vector<LoadPath::read_only>(p, v);
      } else {
        v[0] = p[0];
      }
#pragma unroll
      for (int k = 0; k < V; ++k) s[k] = fp::add(s[k], to_float(v[k]));
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) warp_sums[warp][lane * V + k] = s[k];
  __syncthreads();
  for (int j = static_cast<int>(threadIdx.x); j < 32 * V; j += W * 32) {
    const std::size_t col = tile_begin + std::size_t(j);
    if (col >= a.cols) break;
    float t = warp_sums[0][j];
#pragma unroll
    for (int w = 1; w < W; ++w) t = fp::add(t, warp_sums[w][j]);
    partials[std::size_t(blockIdx.y) * a.cols + col] = t;
  }
}

// Sums the parts of 32 columns per block: warp w adds parts w, w + 8, ... of its lane's column,
// then the first warp adds the 8 warps' sums in order and writes.
template <class G>
__global__ void __launch_bounds__(column_sums_warps * 32)
    column_sums_final_kernel(const float* partials, std::size_t parts, std::size_t cols, G* out, bool accumulate) {
  constexpr int W = column_sums_warps;
  __shared__ float warp_sums[W][32];
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const std::size_t j = std::size_t(blockIdx.x) * 32 + std::size_t(lane);
  float t = 0.0f;
  if (j < cols) {
    // Eight parts' loads in flight before their sums, which are added in the same order.
    constexpr int U = 8;
    std::size_t p = std::size_t(warp);
    for (; p + (U - 1) * W < parts; p += U * W) {
      float v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) v[u] = partials[(p + std::size_t(u) * W) * cols + j];
#pragma unroll
      for (int u = 0; u < U; ++u) t = fp::add(t, v[u]);
    }
    for (; p < parts; p += W) t = fp::add(t, partials[p * cols + j]);
  }
  warp_sums[warp][lane] = t;
  __syncthreads();
  if (warp == 0 && j < cols) {
    float total = warp_sums[0][lane];
#pragma unroll
    for (int w = 1; w < W; ++w) total = fp::add(total, warp_sums[w][lane]);
    out[j] = round_nearest<G>(accumulate ? fp::add(to_float(out[j]), total) : total);
  }
}

template <class G>
void column_sums_final_launch(Cuda be, const float* partials, std::size_t parts, std::size_t cols, G* out,
                              bool accumulate) {
  column_sums_final_kernel<<<static_cast<unsigned>((cols + 31) / 32), column_sums_warps * 32, 0, be.stream>>>(
      partials, parts, cols, out, accumulate);
  ALLOY_CUDA_CHECK_LAUNCH();
}

template <int V, class T, class G>
void column_sums_launch(Cuda be, const ColumnSums<T, G>& a, float* partials) {
  const std::size_t tiles = (a.cols + 32 * V - 1) / (32 * V);
  const std::size_t parts = column_sums_parts(a.rows, tiles, current_device_sm_count());
  const std::size_t rows_per_part = (a.rows + parts - 1) / parts;
  column_sums_kernel<V>
      <<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(parts)), column_sums_warps * 32, 0, be.stream>>>(
          a, rows_per_part, partials);
  ALLOY_CUDA_CHECK_LAUNCH();
  column_sums_final_launch(be, partials, parts, a.cols, a.out, a.accumulate);
}

#endif  // ALLOY_HAS_CUDA_KERNELS

// Elements per 16-byte vector where x's rows allow it, else 1.
template <class T>
constexpr int column_sums_lanes = 16 % sizeof(T) == 0 ? int(16 / sizeof(T)) : 1;

template <class G>
void check_column_sums_of_parts(const float* parts, std::size_t parts_count, std::size_t cols, const G* out) {
  const std::string where =
      "column_sums_of_parts(parts_count = " + std::to_string(parts_count) + ", cols = " + std::to_string(cols) + "): ";
  if (cols > 0 && !out) throw error(where + "out is null; it must point to cols elements");
  if (cols > 0 && parts_count > 0 && !parts) {
    throw error(where + "parts is null; it must point to parts_count * cols = " + std::to_string(parts_count * cols) +
                " floats");
  }
}

template <class T, class G>
bool column_sums_vectorized(const ColumnSums<T, G>& a) {
  constexpr std::size_t v = column_sums_lanes<T>;
  return v > 1 && a.cols % v == 0 && a.ld % v == 0 && reinterpret_cast<std::uintptr_t>(a.x) % 16 == 0;
}

}  // namespace detail

// Floats of scratch column_sums needs for these sizes (none on the Host).
inline std::size_t column_sums_scratch_floats(Host, std::size_t, std::size_t) { return 0; }
#if ALLOY_HAS_CUDA_RUNTIME
inline std::size_t column_sums_scratch_floats(Cuda, std::size_t rows, std::size_t cols) {
  // The widest tiles (32 lanes x 8 columns) give the most parts.
  return detail::column_sums_parts(rows, (cols + 255) / 256, current_device_sm_count()) * cols;
}
#endif

// Each column summed in row order, in fp32.
template <class T, class G>
void column_sums(Host, const ColumnSums<T, G>& a, float* = nullptr) {
  detail::check_column_sums(a);
  for (std::size_t j = 0; j < a.cols; ++j) {
    float s = 0.0f;
    for (std::size_t i = 0; i < a.rows; ++i) s = fp::add(s, to_float(a.x[i * a.ld + j]));
    a.out[j] = round_nearest<G>(a.accumulate ? fp::add(to_float(a.out[j]), s) : s);
  }
}

// out[j] = the sum over p of parts[p * cols + j] (accumulate: out[j] plus it), rounded once into
// out's dtype: warp w of column_sums_final_kernel's 8 adds parts w, w + 8, ... in fp32, then the
// warps' sums are added in order, as on Cuda, for the same bits.
template <class G>
void column_sums_of_parts(Host, const float* parts, std::size_t parts_count, std::size_t cols, G* out,
                          bool accumulate) {
  detail::check_column_sums_of_parts(parts, parts_count, cols, out);
  constexpr std::size_t W = detail::column_sums_warps;
  for (std::size_t j = 0; j < cols; ++j) {
    float warp_sums[W];
    for (std::size_t w = 0; w < W; ++w) {
      warp_sums[w] = 0.0f;
      for (std::size_t p = w; p < parts_count; p += W) warp_sums[w] = fp::add(warp_sums[w], parts[p * cols + j]);
    }
    float total = warp_sums[0];
    for (std::size_t w = 1; w < W; ++w) total = fp::add(total, warp_sums[w]);
    out[j] = round_nearest<G>(accumulate ? fp::add(to_float(out[j]), total) : total);
  }
}

#if ALLOY_HAS_CUDA_KERNELS
// parts: parts_count * cols floats of device memory; out: cols elements of device memory.
template <class G>
void column_sums_of_parts(Cuda be, const float* parts, std::size_t parts_count, std::size_t cols, G* out,
                          bool accumulate) {
  detail::check_column_sums_of_parts(parts, parts_count, cols, out);
  if (cols == 0) return;
  detail::column_sums_final_launch(be, parts, parts_count, cols, out, accumulate);
}

// scratch: column_sums_scratch_floats(be, rows, cols) floats of device memory.
template <class T, class G>
void column_sums(Cuda be, const ColumnSums<T, G>& a, float* scratch) {
  detail::check_column_sums(a);
  if (a.cols == 0) return;
  if (!scratch) throw error("column_sums: scratch is null (column_sums_scratch_floats gives its size)");
  if (detail::column_sums_vectorized(a)) {
    detail::column_sums_launch<detail::column_sums_lanes<T>>(be, a, scratch);
  } else {
    detail::column_sums_launch<1>(be, a, scratch);
  }
}
#endif

}  // namespace alloy
