// LayerNorm over the last dimension of a row-major [rows, cols] tensor, with PyTorch's semantics
// (biased variance, eps inside the square root). Elements are T (float, bf16 or fp16, the compute
// dtype); every statistic and operation is fp32:
//   forward   mean = sum(x) / cols,  var = sum((x - mean)^2) / cols,  rstd = 1 / sqrt(var + eps)
//             y = (x - mean) * rstd * gamma + beta
//   backward  xhat = (x - mean) * rstd,  g = dy * gamma
//             dx = rstd * (g - sum(g) / cols - xhat * sum(g * xhat) / cols)
//             dgamma = sum over rows of dy * xhat,  dbeta = sum over rows of dy
// The variance takes a second pass over the row (sum of squared deviations from the mean), which
// stays accurate when |mean| >> std, where E[x^2] - mean^2 cancels.
//
// Both backends run the same per-lane code (a row is split among 32 lanes, 16-byte vectors to
// consecutive lanes) and the same fixed reduction orders, written with alloy::fp so nothing is
// contracted. dgamma and dbeta are deterministic without atomics: row r belongs to part
// r / ceil(rows / parts) and, within it, to warp (r - first row) % warps; each warp sums its rows
// in order per column, each part sums its warps in order into `scratch`, and a final pass sums
// the parts in order. parts and warps depend only on rows and cols (never on the device), so the
// bits depend only on the inputs and on the pointers' addresses modulo 16 (which split the rows).
#pragma once

#include <alloy/backend/cuda/launch.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>
#include <alloy/kernels/detail/rows.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/rounding.hpp>

#include <algorithm>
#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

namespace alloy {

namespace detail {

inline constexpr std::size_t layernorm_rows_per_part = 16;  // rows each part folds before writing its partial sums
inline constexpr std::size_t layernorm_max_parts = 1024;    // bounds scratch and the final pass's reads
inline constexpr std::size_t layernorm_part_shared_bytes = 64 * 1024;  // per-warp column sums of one part
inline constexpr std::size_t layernorm_max_part_warps = 8;

// Parts the backward pass splits the rows into (0 when there are none).
inline std::size_t layernorm_parts(std::size_t rows) {
  const std::size_t parts = (rows + layernorm_rows_per_part - 1) / layernorm_rows_per_part;
  return parts < layernorm_max_parts ? parts : layernorm_max_parts;
}

inline std::size_t layernorm_rows_in_part(std::size_t rows, std::size_t parts) {
  return parts == 0 ? 0 : (rows + parts - 1) / parts;
}

// Warps per part: as many (up to 8) as have room for their two column sums (dgamma, dbeta) in
// 64 KiB, at least 1.
inline std::size_t layernorm_part_warps(std::size_t cols) {
  const std::size_t fit = layernorm_part_shared_bytes / (2 * sizeof(float) * cols);
  return fit < 1 ? 1 : (fit > layernorm_max_part_warps ? layernorm_max_part_warps : fit);
}

template <class T>
bool layernorm_vectorizable(std::size_t cols, const T* a, const T* b, const T* c, const T* d) {
  // Rows one after another keep their 16-byte phase only when a row is a whole number of vectors;
  // gamma and beta (indexed by column) must then share the rows' phase.
  return row_vector_lanes<T> > 1 && cols % row_vector_lanes<T> == 0 && same_alignment(a, b, c, d);
}

template <class T>
struct LayerNormForward {
  const T* x;
  const T* gamma;
  const T* beta;
  T* y;
  float* mean;  // may be null
  float* rstd;  // may be null
  std::size_t rows;
  std::size_t cols;
  float eps;
  bool vectorized;
};

template <class T, class G>
struct LayerNormBackward {
  const T* dy;
  const T* x;
  const T* gamma;
  const float* mean;
  const float* rstd;
  T* dx;
  G* dgamma;
  G* dbeta;
  std::size_t rows;
  std::size_t cols;
  bool accumulate;
  bool vectorized;
};

struct FloatSum {
  ALLOY_HOST_DEVICE float operator()(float a, float b) const { return fp::add(a, b); }
};

struct FloatPair {
  float first;
  float second;
};

struct FloatPairSum {
  ALLOY_HOST_DEVICE FloatPair operator()(FloatPair a, FloatPair b) const {
    return {fp::add(a.first, b.first), fp::add(a.second, b.second)};
  }
};

// Lane `lane` of `lanes`: its share of sum(x) over the row.
template <class T>
ALLOY_HOST_DEVICE float layernorm_lane_sum(const RowSplit& s, const T* x, std::size_t lane, std::size_t lanes) {
  float sum = 0.0f;
  for_each_run<row_vector_lanes<T>>(s, lane, lanes, [&](auto run, std::size_t first) {
    constexpr int W = decltype(run)::value;
    T v[W];
    load_run<W>(x + first, v);
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) sum = fp::add(sum, to_float(v[l]));
  });
  return sum;
}

// Lane `lane` of `lanes`: its share of sum((x - mean)^2) over the row.
template <class T>
ALLOY_HOST_DEVICE float layernorm_lane_squares(const RowSplit& s, const T* x, float mean, std::size_t lane,
                                               std::size_t lanes) {
  float sum = 0.0f;
  for_each_run<row_vector_lanes<T>>(s, lane, lanes, [&](auto run, std::size_t first) {
    constexpr int W = decltype(run)::value;
    T v[W];
    load_run<W>(x + first, v);
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) {
      const float d = fp::sub(to_float(v[l]), mean);
      sum = fp::add(sum, fp::mul(d, d));
    }
  });
  return sum;
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float layernorm_mean(float sum, std::size_t cols) {
  return fp::div(sum, static_cast<float>(cols));
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float layernorm_rstd(float squares, std::size_t cols, float eps) {
  const float var = fp::div(squares, static_cast<float>(cols));
  return fp::div(1.0f, fp::sqrt(fp::add(var, eps)));
}

// Lane `lane` of `lanes` writes its share of y = (x - mean) * rstd * gamma + beta.
template <class T>
ALLOY_HOST_DEVICE void layernorm_lane_normalize(const RowSplit& s, const T* x, const T* gamma, const T* beta, T* y,
                                                float mean, float rstd, std::size_t lane, std::size_t lanes) {
  for_each_run<row_vector_lanes<T>>(s, lane, lanes, [&](auto run, std::size_t first) {
    constexpr int W = decltype(run)::value;
    T xv[W], gv[W], bv[W], yv[W];
    load_run<W>(x + first, xv);
    load_run<W>(gamma + first, gv);
    load_run<W>(beta + first, bv);
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) {
      const float xhat = fp::mul(fp::sub(to_float(xv[l]), mean), rstd);
      yv[l] = round_nearest<T>(fp::add(fp::mul(xhat, to_float(gv[l])), to_float(bv[l])));
    }
    store_run<W>(y + first, yv);
  });
}

// Lane `lane` of `lanes`: its share of sum(g) and sum(g * xhat), g = dy * gamma.
template <class T>
ALLOY_HOST_DEVICE FloatPair layernorm_lane_gradient_sums(const RowSplit& s, const T* dy, const T* x, const T* gamma,
                                                         float mean, float rstd, std::size_t lane, std::size_t lanes) {
  FloatPair sums{0.0f, 0.0f};
  for_each_run<row_vector_lanes<T>>(s, lane, lanes, [&](auto run, std::size_t first) {
    constexpr int W = decltype(run)::value;
    T dyv[W], xv[W], gv[W];
    load_run<W>(dy + first, dyv);
    load_run<W>(x + first, xv);
    load_run<W>(gamma + first, gv);
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) {
      const float xhat = fp::mul(fp::sub(to_float(xv[l]), mean), rstd);
      const float g = fp::mul(to_float(dyv[l]), to_float(gv[l]));
      sums.first = fp::add(sums.first, g);
      sums.second = fp::add(sums.second, fp::mul(g, xhat));
    }
  });
  return sums;
}

// Lane `lane` of `lanes` writes its share of dx and adds dy * xhat and dy into its columns of
// the warp's column sums (sum_dgamma, sum_dbeta). mean_g = sum(g) / cols, mean_gx = sum(g xhat) / cols.
template <class T>
ALLOY_HOST_DEVICE void layernorm_lane_backward(const RowSplit& s, const T* dy, const T* x, const T* gamma, T* dx,
                                               float mean, float rstd, float mean_g, float mean_gx, float* sum_dgamma,
                                               float* sum_dbeta, std::size_t lane, std::size_t lanes) {
  for_each_run<row_vector_lanes<T>>(s, lane, lanes, [&](auto run, std::size_t first) {
    constexpr int W = decltype(run)::value;
    T dyv[W], xv[W], gv[W], dxv[W];
    load_run<W>(dy + first, dyv);
    load_run<W>(x + first, xv);
    load_run<W>(gamma + first, gv);
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) {
      const float d = to_float(dyv[l]);
      const float xhat = fp::mul(fp::sub(to_float(xv[l]), mean), rstd);
      const float g = fp::mul(d, to_float(gv[l]));
      dxv[l] = round_nearest<T>(fp::mul(rstd, fp::sub(fp::sub(g, mean_g), fp::mul(xhat, mean_gx))));
      sum_dgamma[first + l] = fp::add(sum_dgamma[first + l], fp::mul(d, xhat));
      sum_dbeta[first + l] = fp::add(sum_dbeta[first + l], d);
    }
    store_run<W>(dx + first, dxv);
  });
}

// The final write of a parameter gradient: the fp32 sum over parts, added to the old value
// when accumulating.
template <class G>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void layernorm_write_param_grad(G& out, float sum, bool accumulate) {
  out = round_nearest<G>(accumulate ? fp::add(to_float(out), sum) : sum);
}

inline void layernorm_require(bool ok, const char* where, const std::string& what) {
  if (!ok) throw error(std::string(where) + ": " + what);
}

template <class T>
void check_layernorm_forward(const LayerNormForward<T>& a) {
  constexpr const char* where = "layernorm_forward";
  layernorm_require(a.cols > 0, where, "cols must be positive (LayerNorm normalizes over the last dimension)");
  if (a.rows == 0) return;
  layernorm_require(a.x && a.gamma && a.beta && a.y, where, "x, gamma, beta and y must not be null");
}

template <class T, class G>
void check_layernorm_backward(const LayerNormBackward<T, G>& a, const float* scratch, bool needs_scratch) {
  constexpr const char* where = "layernorm_backward";
  layernorm_require(a.cols > 0, where, "cols must be positive (LayerNorm normalizes over the last dimension)");
  layernorm_require(a.dgamma && a.dbeta, where, "dgamma and dbeta must not be null");
  if (a.rows == 0) return;
  layernorm_require(a.dy && a.x && a.gamma && a.mean && a.rstd && a.dx, where,
                    "dy, x, gamma, mean, rstd and dx must not be null");
  layernorm_require(!needs_scratch || scratch, where,
                    "scratch is null; it needs layernorm_backward_scratch_floats(" + std::to_string(a.rows) + ", " +
                        std::to_string(a.cols) + ") floats");
}

// The Host reference: plain loops replaying the Cuda kernel's per-lane order.
template <class T>
void layernorm_forward_on(Host, const LayerNormForward<T>& a) {
  const T* x = a.x;
  const std::size_t rows = a.rows, cols = a.cols;
  for (std::size_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    const RowSplit s = split_row(xr, cols, a.vectorized);
    float lanes[warp_size];
    for (int l = 0; l < warp_size; ++l) lanes[l] = layernorm_lane_sum(s, xr, l, warp_size);
    const float m = layernorm_mean(butterfly_replay(lanes, FloatSum{}), cols);
    for (int l = 0; l < warp_size; ++l) lanes[l] = layernorm_lane_squares(s, xr, m, l, warp_size);
    const float rs = layernorm_rstd(butterfly_replay(lanes, FloatSum{}), cols, a.eps);
    if (a.mean) a.mean[r] = m;
    if (a.rstd) a.rstd[r] = rs;
    layernorm_lane_normalize(s, xr, a.gamma, a.beta, a.y + r * cols, m, rs, 0, 1);
  }
}

// The Host reference: the Cuda kernels' parts, warps and reduction orders, replayed in loops.
template <class T, class G>
void layernorm_backward_on(Host, const LayerNormBackward<T, G>& a, float*) {
  const T *dy = a.dy, *x = a.x, *gamma = a.gamma;
  const float *mean = a.mean, *rstd = a.rstd;
  const std::size_t rows = a.rows, cols = a.cols;
  const std::size_t parts = layernorm_parts(rows);
  const std::size_t rows_per_part = layernorm_rows_in_part(rows, parts);
  const std::size_t warps = layernorm_part_warps(cols);
  const std::size_t span = 2 * cols;  // a warp's column sums: dgamma's, then dbeta's
  std::vector<float> warp_sums(warps * span), total(span, 0.0f);
  for (std::size_t p = 0; p < parts; ++p) {
    std::fill(warp_sums.begin(), warp_sums.end(), 0.0f);
    const std::size_t first = p * rows_per_part;
    const std::size_t end = first + rows_per_part < rows ? first + rows_per_part : rows;
    for (std::size_t r = first; r < end; ++r) {
      const T* dyr = dy + r * cols;
      const T* xr = x + r * cols;
      const RowSplit s = split_row(xr, cols, a.vectorized);
      FloatPair lanes[warp_size];
      for (int l = 0; l < warp_size; ++l) {
        lanes[l] = layernorm_lane_gradient_sums(s, dyr, xr, gamma, mean[r], rstd[r], l, warp_size);
      }
      const FloatPair sums = butterfly_replay(lanes, FloatPairSum{});
      float* sum_dgamma = warp_sums.data() + ((r - first) % warps) * span;
      layernorm_lane_backward(s, dyr, xr, gamma, a.dx + r * cols, mean[r], rstd[r], layernorm_mean(sums.first, cols),
                              layernorm_mean(sums.second, cols), sum_dgamma, sum_dgamma + cols, 0, 1);
    }
    for (std::size_t i = 0; i < span; ++i) {
      float part = 0.0f;
      for (std::size_t w = 0; w < warps; ++w) part = fp::add(part, warp_sums[w * span + i]);
      total[i] = fp::add(total[i], part);
    }
  }
  for (std::size_t c = 0; c < cols; ++c) {
    layernorm_write_param_grad(a.dgamma[c], total[c], a.accumulate);
    layernorm_write_param_grad(a.dbeta[c], total[cols + c], a.accumulate);
  }
}

#if ALLOY_HAS_CUDA_KERNELS

inline constexpr int layernorm_block = cuda_block;  // forward: 8 warps, a row each

// A warp per row. Per element: reads x three times (the second and third from cache), gamma
// and beta (cached, shared by all rows); writes y. DRAM: sizeof(T) read + sizeof(T) written,
// plus 8 bytes per row for mean and rstd.
template <class T>
__global__ void __launch_bounds__(layernorm_block) layernorm_forward_kernel(LayerNormForward<T> a) {
  constexpr std::size_t warps_per_block = layernorm_block / warp_size;
  const unsigned lane = threadIdx.x % warp_size;
  const std::size_t stride = std::size_t(gridDim.x) * warps_per_block;
  for (std::size_t r = std::size_t(blockIdx.x) * warps_per_block + threadIdx.x / warp_size; r < a.rows; r += stride) {
    const T* xr = a.x + r * a.cols;
    const RowSplit s = split_row(xr, a.cols, a.vectorized);
    const float m = layernorm_mean(warp_allreduce(layernorm_lane_sum(s, xr, lane, warp_size), FloatSum{}), a.cols);
    const float rs =
        layernorm_rstd(warp_allreduce(layernorm_lane_squares(s, xr, m, lane, warp_size), FloatSum{}), a.cols, a.eps);
    if (lane == 0) {
      if (a.mean) a.mean[r] = m;
      if (a.rstd) a.rstd[r] = rs;
    }
    layernorm_lane_normalize(s, xr, a.gamma, a.beta, a.y + r * a.cols, m, rs, lane, warp_size);
  }
}

// One block per part, a warp per row. Per element: reads dy and x twice (the second time from
// cache) and gamma (cached); writes dx. DRAM: 2 sizeof(T) read + sizeof(T) written, plus 8 bytes
// per row for mean and rstd and 8 bytes per column per part for the partial sums. Each warp sums
// its rows' dy * xhat and dy per column in `sums` (shared memory, or the part's slice of
// `partials` when one warp's sums do not fit), then the part writes the sum over its warps, in
// warp order, to partials[part * 2 cols ...].
template <class T, class G>
__global__ void __launch_bounds__(layernorm_max_part_warps* warp_size)
    layernorm_backward_rows_kernel(LayerNormBackward<T, G> a, std::size_t rows_per_part, float* partials,
                                   bool sums_in_shared) {
  extern __shared__ float shared_sums[];
  const std::size_t span = 2 * a.cols;
  const std::size_t warps = blockDim.x / warp_size;
  const std::size_t warp = threadIdx.x / warp_size;
  const unsigned lane = threadIdx.x % warp_size;
  float* part_partials = partials + std::size_t(blockIdx.x) * span;
  float* sums = sums_in_shared ? shared_sums : part_partials;  // in partials only with one warp
  for (std::size_t i = threadIdx.x; i < warps * span; i += blockDim.x) sums[i] = 0.0f;
  __syncthreads();

  float* sum_dgamma = sums + warp * span;
  const std::size_t first = std::size_t(blockIdx.x) * rows_per_part;
  const std::size_t end = first + rows_per_part < a.rows ? first + rows_per_part : a.rows;
  for (std::size_t r = first + warp; r < end; r += warps) {
    const T* dyr = a.dy + r * a.cols;
    const T* xr = a.x + r * a.cols;
    const float m = a.mean[r], rs = a.rstd[r];
    const RowSplit s = split_row(xr, a.cols, a.vectorized);
    const FloatPair totals =
        warp_allreduce(layernorm_lane_gradient_sums(s, dyr, xr, a.gamma, m, rs, lane, warp_size), FloatPairSum{});
    layernorm_lane_backward(s, dyr, xr, a.gamma, a.dx + r * a.cols, m, rs, layernorm_mean(totals.first, a.cols),
                            layernorm_mean(totals.second, a.cols), sum_dgamma, sum_dgamma + a.cols, lane, warp_size);
  }
  __syncthreads();
  for (std::size_t i = threadIdx.x; i < span; i += blockDim.x) {
    float part = 0.0f;
    for (std::size_t w = 0; w < warps; ++w) part = fp::add(part, sums[w * span + i]);
    part_partials[i] = part;
  }
}

// A thread per parameter-gradient element: sums the parts' partial sums in part order. Per
// element: reads 4 bytes per part (and the old value when accumulating), writes sizeof(G).
template <class G>
__global__ void __launch_bounds__(cuda_block)
    layernorm_param_grad_kernel(const float* partials, std::size_t parts, std::size_t cols, G* dgamma, G* dbeta,
                                bool accumulate) {
  const std::size_t span = 2 * cols;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < span; i += stride) {
    float sum = 0.0f;
    for (std::size_t p = 0; p < parts; ++p) sum = fp::add(sum, partials[p * span + i]);
    layernorm_write_param_grad(i < cols ? dgamma[i] : dbeta[i - cols], sum, accumulate);
  }
}

template <class T>
void layernorm_forward_on(Cuda be, const LayerNormForward<T>& a) {
  if (a.rows == 0) return;
  layernorm_forward_kernel<<<grid_for(a.rows, layernorm_block / warp_size), layernorm_block, 0, be.stream>>>(a);
  ALLOY_CUDA_CHECK_LAUNCH();
}

template <class T, class G>
void layernorm_backward_on(Cuda be, const LayerNormBackward<T, G>& a, float* scratch) {
  const std::size_t rows = a.rows, cols = a.cols;
  const std::size_t parts = layernorm_parts(rows);
  if (parts > 0) {
    const std::size_t warps = layernorm_part_warps(cols);
    std::size_t shared_bytes = warps * 2 * cols * sizeof(float);
    // Devices before sm_70 cannot give 64 KiB; a single warp's sums that do not fit stay in
    // scratch (L2). Either way the order of additions, hence the bits, is the same.
    const bool sums_in_shared = shared_bytes <= current_device_max_shared_bytes_per_block();
    if (!sums_in_shared && warps > 1) {
      throw error("layernorm_backward: this device has too little shared memory per block for " +
                  std::to_string(warps) + " warps' column sums (" + std::to_string(shared_bytes) + " bytes)");
    }
    if (!sums_in_shared) shared_bytes = 0;
    auto* kernel = &layernorm_backward_rows_kernel<T, G>;
    if (shared_bytes > 48 * 1024) {
      ALLOY_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)));
    }
    kernel<<<static_cast<int>(parts), static_cast<int>(warps) * warp_size, shared_bytes, be.stream>>>(
        a, layernorm_rows_in_part(rows, parts), scratch, sums_in_shared);
    ALLOY_CUDA_CHECK_LAUNCH();
  }
  layernorm_param_grad_kernel<<<grid_for(2 * cols), cuda_block, 0, be.stream>>>(scratch, parts, cols, a.dgamma, a.dbeta,
                                                                                a.accumulate);
  ALLOY_CUDA_CHECK_LAUNCH();
}

#endif  // ALLOY_HAS_CUDA_KERNELS

}  // namespace detail

// Floats of `scratch` layernorm_backward needs for these sizes, on either backend (the Host
// backend does not use it and accepts null).
inline std::size_t layernorm_backward_scratch_floats(std::size_t rows, std::size_t cols) {
  return detail::layernorm_parts(rows) * 2 * cols;
}

// y = LayerNorm(x) over each of `rows` rows of `cols` elements; mean and rstd (rows floats each,
// may be null) are kept for the backward pass. On Cuda: device pointers, ordered on be.stream.
template <class T, class B>
void layernorm_forward(B be, const T* x, const T* gamma, const T* beta, T* y, float* mean, float* rstd,
                       std::size_t rows, std::size_t cols, float eps = 1e-5f) {
  static_assert(backend<B>, "layernorm_forward: B must be alloy::Host or alloy::Cuda");
  static_assert(detail::row_dtype<T>, "layernorm_forward<T>: T must be float, bf16 or fp16");
  static_assert(detail::has_row_kernels<B>,
                "layernorm_forward on Cuda: compile this translation unit with nvcc (the Cuda kernels need it)");
  const detail::LayerNormForward<T> a{x,    gamma, beta, y,   mean,
                                      rstd, rows,  cols, eps, detail::layernorm_vectorizable(cols, x, gamma, beta, y)};
  detail::check_layernorm_forward(a);
  detail::layernorm_forward_on(be, a);
}

// dx (overwritten), dgamma and dbeta (overwritten, or added to when `accumulate`) from dy and the
// forward pass's x, gamma, mean and rstd. G is the parameter gradients' dtype (float, bf16 or
// fp16). On Cuda `scratch` is device memory of layernorm_backward_scratch_floats(rows, cols)
// floats, and the call is ordered on be.stream; the Host backend ignores it.
template <class T, class G, class B>
void layernorm_backward(B be, const T* dy, const T* x, const T* gamma, const float* mean, const float* rstd, T* dx,
                        G* dgamma, G* dbeta, std::size_t rows, std::size_t cols, bool accumulate, float* scratch) {
  static_assert(backend<B>, "layernorm_backward: B must be alloy::Host or alloy::Cuda");
  static_assert(detail::row_dtype<T>, "layernorm_backward<T, G>: T must be float, bf16 or fp16");
  static_assert(detail::row_dtype<G>, "layernorm_backward<T, G>: G must be float, bf16 or fp16");
  static_assert(detail::has_row_kernels<B>,
                "layernorm_backward on Cuda: compile this translation unit with nvcc (the Cuda kernels need it)");
  const detail::LayerNormBackward<T, G> a{
      dy,     x,     gamma, mean, rstd,       dx,
      dgamma, dbeta, rows,  cols, accumulate, detail::layernorm_vectorizable(cols, dy, x, gamma, dx)};
  detail::check_layernorm_backward(a, scratch, std::is_same_v<B, Host> ? false : rows > 0);
  detail::layernorm_backward_on(be, a, scratch);
}

}  // namespace alloy
