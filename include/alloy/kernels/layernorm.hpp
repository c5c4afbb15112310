// LayerNorm over the last dimension of a row-major [rows, cols] tensor, with PyTorch's semantics
// (biased variance, eps inside the square root). Elements are T (float, bf16 or fp16, the compute
// dtype); every statistic and operation is fp32:
//   forward   mean = sum(x) / cols,  var = sum((x - mean)^2) / cols,  rstd = 1 / sqrt(var + eps)
//             y = (x - mean) * rstd * gamma + beta
//   backward  xhat = (x - mean) * rstd,  g = dy * gamma
//             dx = rstd * (g - sum(g) / cols - xhat * sum(g * xhat) / cols)  [+ dx_add]
//             dgamma = sum over rows of dy * xhat,  dbeta = sum over rows of dy
//             [dx_add_sums = sum over rows of dx_add: in a residual block whose inner path starts
//              with LayerNorm, dx_add is the gradient of the block's output, so these are the
//              bias gradient of the block's last projection, summed where dx_add is read anyway]
// The variance takes a second pass over the row (sum of squared deviations from the mean), which
// stays accurate when |mean| >> std, where E[x^2] - mean^2 cancels.
//
// Both backends run the same per-lane code (a row is split among 32 lanes, 16-byte vectors to
// consecutive lanes) and the same fixed reduction orders, written with alloy::fp so nothing is
// contracted. Where a row is exactly V vectors per lane (V small), the Cuda kernels keep the row
// in registers ("lane columns"; the backward's column sums, each lane its own, in shared memory);
// elsewhere they walk the row with for_each_run and keep column sums in shared memory. Both visit
// elements in the same order, so the path changes speed, never bits. dgamma and dbeta are deterministic without
// atomics: row r belongs to part r / ceil(rows / parts) and, within it, to warp (r - first row) % warps; each warp sums
// its rows in order per column, each part sums its warps in order into `scratch`, and a final pass sums part p into
// slot p % 32 in part order, then the 32 slots in order. dx_add's column sums, when asked for, are a third set of
// column sums in the same order. parts and warps depend only on rows and cols (never on the
// device), so the bits depend only on the inputs and on the pointers' addresses modulo 16 (which split the rows).
#pragma once

#include <alloy/backend/cuda/launch.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>
#include <alloy/kernels/detail/rows.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/rounding.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace alloy {

namespace detail {

inline constexpr std::size_t layernorm_min_rows_per_part = 8;    // below it, a part's fold costs more than its rows
inline constexpr std::size_t layernorm_max_parts = 1024;         // bounds scratch and the final pass's reads
inline constexpr std::size_t layernorm_part_warp_budget = 2048;  // parts x warps per part: 256 parts of 8 warps
inline constexpr std::size_t layernorm_part_shared_bytes = 64 * 1024;  // per-warp column sums of one part
inline constexpr std::size_t layernorm_max_part_warps = 8;
// The final pass: part p into slot p % 32, a warp each. With 8 slots each warp summed 32 of the
// 256 parts one after another, and the pass took 7.5 us whatever the rows (H200, a LayerNorm
// backward of 1024 columns): the loads' latency, chained.
inline constexpr std::size_t layernorm_final_slots = 32;
inline constexpr int layernorm_max_lane_columns = 32;  // forward lane columns: 32 columns of x per lane
// Backward lane columns: 4 vectors per lane (64 bytes each of dy and x) stays within 128
// registers without spilling, with each warp's column sums in shared memory.
inline constexpr int layernorm_max_backward_lane_vectors = 4;

// Floats between one warp's dgamma sums and its dbeta sums in shared memory: cols rounded up to
// whole 32-float rows of banks, so the swizzle below stays inside them.
ALLOY_HOST_DEVICE constexpr std::size_t layernorm_sums_stride(std::size_t cols) { return (cols + 31) / 32 * 32; }

// Where column c's sum lives within a warp's shared-memory sums: c with its bank (low 5 bits)
// xor-ed by its 32-float row. A lane owning L consecutive columns of every 32 L-th vector (L = 4
// or 8) then stores without bank conflicts (lanes 0, 4, 8... would otherwise share a bank), and
// consecutive threads still read consecutive columns' sums from distinct banks.
ALLOY_HOST_DEVICE constexpr std::size_t layernorm_swizzle(std::size_t c) { return c ^ ((c >> 5) & 7); }

// Where column c's sum lives within a warp's sums in layernorm_backward_lane_columns_kernel: a
// lane's L columns of a vector are L / 4 chunks of 4 floats, which it reads and writes 16 bytes
// at a time. A 16-byte access by a warp is served a quarter warp (8 lanes) at a time, conflict
// free when those 8 lanes touch 8 distinct 16-byte columns of banks (of 8). With L = 4 they do;
// with L = 8 lanes 4 apart would collide, so lanes 4-7 of every 8 swap their two chunks.
template <int L>
ALLOY_HOST_DEVICE constexpr unsigned layernorm_lane_sums_at(unsigned c) {
  static_assert(L == 4 || L == 8, "layernorm_lane_sums_at: 4 or 8 columns per vector");
  if constexpr (L == 8) {
    return c ^ ((c >> 3) & 4u);
  } else {
    return c;
  }
}

// Warps per part: as many (up to 8) as have room for their two column sums (dgamma, dbeta) in
// 64 KiB, at least 1.
inline std::size_t layernorm_part_warps(std::size_t cols) {
  const std::size_t fit = layernorm_part_shared_bytes / (2 * sizeof(float) * layernorm_sums_stride(cols));
  return fit < 1 ? 1 : (fit > layernorm_max_part_warps ? layernorm_max_part_warps : fit);
}

// Parts the backward pass splits the rows into (0 when there are none): one per 8 rows, at most
// 2048 warps' worth (256 parts of 8 warps) and at most 1024.
inline std::size_t layernorm_parts(std::size_t rows, std::size_t cols) {
  const std::size_t wanted = (rows + layernorm_min_rows_per_part - 1) / layernorm_min_rows_per_part;
  const std::size_t cap = std::min(layernorm_max_parts, layernorm_part_warp_budget / layernorm_part_warps(cols));
  return std::min(wanted, cap);
}

inline std::size_t layernorm_rows_in_part(std::size_t rows, std::size_t parts) {
  return parts == 0 ? 0 : (rows + parts - 1) / parts;
}

template <class T>
bool layernorm_vectorizable(std::size_t cols, const T* a, const T* b, const T* c, const T* d, const T* e = nullptr) {
  // Rows one after another keep their 16-byte phase only when a row is a whole number of vectors;
  // gamma and beta (indexed by column) must then share the rows' phase.
  return row_vector_lanes<T> > 1 && cols % row_vector_lanes<T> == 0 && same_alignment(a, b, c, d) &&
         (e == nullptr || same_alignment(a, e));
}

// Vectors per lane V when every row is exactly 32 V whole vectors from a 16-byte boundary and
// V <= max_vectors; 0 otherwise. The same walk as for_each_run's (no head, no tail, vector
// lane + 32 k at step k), so either path gives the same bits.
template <class T>
int layernorm_lane_vectors(std::size_t cols, const T* row0, bool vectorized, int max_vectors) {
  constexpr std::size_t L = row_vector_lanes<T>;
  if (!vectorized || reinterpret_cast<std::uintptr_t>(row0) % 16 != 0 || cols % (warp_size * L) != 0) return 0;
  const std::size_t v = cols / (warp_size * L);
  return v <= std::size_t(max_vectors) ? static_cast<int>(v) : 0;
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
  T* dx;            // may be dy itself
  const T* dx_add;  // may be null; may be dx itself
  G* dgamma;
  G* dbeta;
  G* dx_add_sums;  // may be null; needs dx_add: its column sums, written or added as dgamma and dbeta
  std::size_t rows;
  std::size_t cols;
  bool accumulate;
  bool vectorized;

  // Sets of column sums: dgamma's and dbeta's, and dx_add's when asked for.
  ALLOY_HOST_DEVICE std::size_t sum_sets() const { return dx_add_sums ? 3 : 2; }
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

// The arithmetic on one run of W consecutive elements, shared by every path on both backends.

template <int W, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void layernorm_run_sum(const T (&xv)[W], float& sum) {
  ALLOY_UNROLL
  for (int l = 0; l < W; ++l) sum = fp::add(sum, to_float(xv[l]));
}

template <int W, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void layernorm_run_squares(const T (&xv)[W], float mean, float& sum) {
  ALLOY_UNROLL
  for (int l = 0; l < W; ++l) {
    const float d = fp::sub(to_float(xv[l]), mean);
    sum = fp::add(sum, fp::mul(d, d));
  }
}

template <int W, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void layernorm_run_normalize(const T (&xv)[W], const T (&gv)[W], const T (&bv)[W],
                                                                 float mean, float rstd, T (&yv)[W]) {
  ALLOY_UNROLL
  for (int l = 0; l < W; ++l) {
    const float xhat = fp::mul(fp::sub(to_float(xv[l]), mean), rstd);
    yv[l] = round_nearest<T>(fp::add(fp::mul(xhat, to_float(gv[l])), to_float(bv[l])));
  }
}

// sum(g) and sum(g * xhat), g = dy * gamma, over the run, added to `sums`.
template <int W, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void layernorm_run_gradient_sums(const T (&dyv)[W], const T (&xv)[W],
                                                                     const T (&gv)[W], float mean, float rstd,
                                                                     FloatPair& sums) {
  ALLOY_UNROLL
  for (int l = 0; l < W; ++l) {
    const float xhat = fp::mul(fp::sub(to_float(xv[l]), mean), rstd);
    const float g = fp::mul(to_float(dyv[l]), to_float(gv[l]));
    sums.first = fp::add(sums.first, g);
    sums.second = fp::add(sums.second, fp::mul(g, xhat));
  }
}

// The run's dx (plus addv, when `add`, before the one rounding) and its terms of the column sums:
// dy * xhat for dgamma, dy for dbeta, addv for dx_add's. mean_g = sum(g) / cols, mean_gx = sum(g xhat) / cols.
template <int W, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void layernorm_run_backward(const T (&dyv)[W], const T (&xv)[W], const T (&gv)[W],
                                                                const T (&addv)[W], bool add, float mean, float rstd,
                                                                float mean_g, float mean_gx, T (&dxv)[W],
                                                                float (&dgamma_terms)[W], float (&dbeta_terms)[W],
                                                                float (&add_terms)[W]) {
  ALLOY_UNROLL
  for (int l = 0; l < W; ++l) {
    const float d = to_float(dyv[l]);
    const float xhat = fp::mul(fp::sub(to_float(xv[l]), mean), rstd);
    const float g = fp::mul(d, to_float(gv[l]));
    float dx = fp::mul(rstd, fp::sub(fp::sub(g, mean_g), fp::mul(xhat, mean_gx)));
    add_terms[l] = add ? to_float(addv[l]) : 0.0f;
    if (add) dx = fp::add(dx, add_terms[l]);
    dxv[l] = round_nearest<T>(dx);
    dgamma_terms[l] = fp::mul(d, xhat);
    dbeta_terms[l] = d;
  }
}

// Lane `lane` of `lanes`: its share of sum(x) over the row.
template <class T>
ALLOY_HOST_DEVICE float layernorm_lane_sum(const RowSplit& s, const T* x, std::size_t lane, std::size_t lanes) {
  float sum = 0.0f;
  for_each_run<row_vector_lanes<T>>(s, lane, lanes, [&](auto run, std::size_t first) {
    constexpr int W = decltype(run)::value;
    T v[W];
    load_run<W>(x + first, v);
    layernorm_run_sum(v, sum);
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
    layernorm_run_squares(v, mean, sum);
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
    layernorm_run_normalize(xv, gv, bv, mean, rstd, yv);
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
    layernorm_run_gradient_sums(dyv, xv, gv, mean, rstd, sums);
  });
  return sums;
}

// Lane `lane` of `lanes` writes its share of dx (plus dx_add, when not null) and hands each
// column's dy * xhat, dy and dx_add to add_to_sums(column, dgamma term, dbeta term, dx_add term),
// in its walk's order.
template <class T, class AddToSums>
ALLOY_HOST_DEVICE void layernorm_lane_backward(const RowSplit& s, const T* dy, const T* x, const T* gamma,
                                               const T* dx_add, T* dx, float mean, float rstd, float mean_g,
                                               float mean_gx, const AddToSums& add_to_sums, std::size_t lane,
                                               std::size_t lanes) {
  for_each_run<row_vector_lanes<T>>(s, lane, lanes, [&](auto run, std::size_t first) {
    constexpr int W = decltype(run)::value;
    T dyv[W], xv[W], gv[W], addv[W], dxv[W];
    float dgamma_terms[W], dbeta_terms[W], add_terms[W];
    load_run<W>(dy + first, dyv);
    load_run<W>(x + first, xv);
    load_run<W>(gamma + first, gv);
    if (dx_add) load_run<W>(dx_add + first, addv);
    layernorm_run_backward(dyv, xv, gv, addv, dx_add != nullptr, mean, rstd, mean_g, mean_gx, dxv, dgamma_terms,
                           dbeta_terms, add_terms);
    store_run<W>(dx + first, dxv);
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) add_to_sums(first + l, dgamma_terms[l], dbeta_terms[l], add_terms[l]);
  });
}

// One warp's column sums: add(c, dgamma term, dbeta term, dx_add term) adds to column c's, at c
// or, in shared memory, at layernorm_swizzle(c); dx_add's only where they are kept (dx_add_sums
// not null).
struct LayerNormColumnSums {
  float* dgamma;
  float* dbeta;
  float* dx_add_sums;  // may be null
  bool swizzled;
  ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void operator()(std::size_t c, float dgamma_term, float dbeta_term,
                                                      float add_term) const {
    const std::size_t at = swizzled ? layernorm_swizzle(c) : c;
    dgamma[at] = fp::add(dgamma[at], dgamma_term);
    dbeta[at] = fp::add(dbeta[at], dbeta_term);
    if (dx_add_sums) dx_add_sums[at] = fp::add(dx_add_sums[at], add_term);
  }
};

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
  layernorm_require(!a.dx_add_sums || a.dx_add, where, "dx_add_sums (the column sums of dx_add) needs dx_add");
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
  const std::size_t parts = layernorm_parts(rows, cols);
  const std::size_t rows_per_part = layernorm_rows_in_part(rows, parts);
  const std::size_t warps = layernorm_part_warps(cols);
  const std::size_t sets = a.sum_sets();
  const std::size_t span = sets * cols;  // a warp's column sums: dgamma's, dbeta's, then dx_add's
  std::vector<float> warp_sums(warps * span), slots(layernorm_final_slots * span, 0.0f);
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
      layernorm_lane_backward(
          s, dyr, xr, gamma, a.dx_add ? a.dx_add + r * cols : nullptr, a.dx + r * cols, mean[r], rstd[r],
          layernorm_mean(sums.first, cols), layernorm_mean(sums.second, cols),
          LayerNormColumnSums{sum_dgamma, sum_dgamma + cols, sets == 3 ? sum_dgamma + 2 * cols : nullptr, false}, 0, 1);
    }
    float* slot = slots.data() + (p % layernorm_final_slots) * span;
    for (std::size_t i = 0; i < span; ++i) {
      float part = 0.0f;
      for (std::size_t w = 0; w < warps; ++w) part = fp::add(part, warp_sums[w * span + i]);
      slot[i] = fp::add(slot[i], part);
    }
  }
  for (std::size_t i = 0; i < span; ++i) {
    float total = 0.0f;
    for (std::size_t k = 0; k < layernorm_final_slots; ++k) total = fp::add(total, slots[k * span + i]);
    G& out = i < cols ? a.dgamma[i] : i < 2 * cols ? a.dbeta[i - cols] : a.dx_add_sums[i - 2 * cols];
    layernorm_write_param_grad(out, total, a.accumulate);
  }
}

#if ALLOY_HAS_CUDA_KERNELS

inline constexpr int layernorm_block = cuda_block;  // forward: 8 warps, a row each
inline constexpr int layernorm_part_block = int(layernorm_max_part_warps) * warp_size;

// A warp per row, walking it three times (the second and third from cache). Per element: reads
// x, gamma and beta (cached, shared by all rows); writes y. DRAM: sizeof(T) read + sizeof(T)
// written, plus 8 bytes per row for mean and rstd.
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

// The forward pass on rows of exactly 32 V vectors from a 16-byte boundary: a warp per row, which
// it loads once (all V vectors per lane in flight together) and keeps in registers; each lane
// keeps its columns of gamma and beta in registers for all its rows. Same DRAM traffic as above,
// one pass over it.
template <class T, int V>
__global__ void __launch_bounds__(layernorm_block, 4) layernorm_forward_lane_columns_kernel(LayerNormForward<T> a) {
  constexpr int L = row_vector_lanes<T>;
  constexpr std::size_t warps_per_block = layernorm_block / warp_size;
  const unsigned lane = threadIdx.x % warp_size;
  const std::size_t stride = std::size_t(gridDim.x) * warps_per_block;
  for (std::size_t r = std::size_t(blockIdx.x) * warps_per_block + threadIdx.x / warp_size; r < a.rows; r += stride) {
    const T* xr = a.x + r * a.cols;
    T xv[V][L];
    ALLOY_UNROLL
    for (int k = 0; k < V; ++k) load_run<L>(xr + (lane + warp_size * k) * L, xv[k]);
    float sum = 0.0f;
    ALLOY_UNROLL
    for (int k = 0; k < V; ++k) layernorm_run_sum(xv[k], sum);
    const float m = layernorm_mean(warp_allreduce(sum, FloatSum{}), a.cols);
    float squares = 0.0f;
    ALLOY_UNROLL
    for (int k = 0; k < V; ++k) layernorm_run_squares(xv[k], m, squares);
    const float rs = layernorm_rstd(warp_allreduce(squares, FloatSum{}), a.cols, a.eps);
    if (lane == 0) {
      if (a.mean) a.mean[r] = m;
      if (a.rstd) a.rstd[r] = rs;
    }
    T* yr = a.y + r * a.cols;
    ALLOY_UNROLL
    for (int k = 0; k < V; ++k) {
      T gv[L], bv[L], yv[L];
      load_run<L>(a.gamma + (lane + warp_size * k) * L, gv);
      load_run<L>(a.beta + (lane + warp_size * k) * L, bv);
      layernorm_run_normalize(xv[k], gv, bv, m, rs, yv);
      store_run<L>(yr + (lane + warp_size * k) * L, yv);
    }
  }
}

// The end of a part: the sum over its warps, in warp order, of their column sums (`sums`, each
// warp's `sets` sets, dgamma's, dbeta's and dx_add's, `stride` floats apart, column c's at
// sums_at(c) within them) into the part's sets x cols floats of partials. I is the caller's index
// type (unsigned where the kernel knows cols is small). When sums is that slice itself (one warp,
// unswizzled), each thread reads the element it then writes.
template <class I, class SumsAt>
__device__ ALLOY_FORCEINLINE void layernorm_fold_part(const float* sums, I warps, I sets, I stride,
                                                      const SumsAt& sums_at, I cols, float* part_partials) {
  for (I i = threadIdx.x; i < sets * cols; i += blockDim.x) {
    const I set = i / cols, c = i - set * cols;
    const I at = set * stride + sums_at(c);
    float part = 0.0f;
    for (I w = 0; w < warps; ++w) part = fp::add(part, sums[w * sets * stride + at]);
    part_partials[i] = part;
  }
}

// One block per part, a warp per row, for any row. Per element: reads dy and x twice (the
// second time from cache), gamma (cached) and dx_add when given; writes dx. DRAM: 2 sizeof(T)
// read (3 with dx_add) + sizeof(T) written, plus 8 bytes per row for mean and rstd and 8 bytes
// per column per part for the partial sums. Each warp sums its rows' dy * xhat and dy (and dx_add)
// per column in `sums` (shared memory, swizzled, or the part's slice of `partials` when one warp's
// sums do not fit), then the part folds its warps into partials[part * sets * cols ...].
template <class T, class G>
__global__ void __launch_bounds__(layernorm_part_block)
    layernorm_backward_rows_kernel(LayerNormBackward<T, G> a, std::size_t rows_per_part, float* partials,
                                   bool sums_in_shared) {
  extern __shared__ float shared_sums[];
  const std::size_t cols = a.cols;
  const std::size_t sets = a.sum_sets();
  const std::size_t stride = sums_in_shared ? layernorm_sums_stride(cols) : cols;
  const std::size_t warps = blockDim.x / warp_size;
  const std::size_t warp = threadIdx.x / warp_size;
  const unsigned lane = threadIdx.x % warp_size;
  float* part_partials = partials + std::size_t(blockIdx.x) * sets * cols;
  float* sums = sums_in_shared ? shared_sums : part_partials;  // in partials only with one warp
  for (std::size_t i = threadIdx.x; i < warps * sets * stride; i += blockDim.x) sums[i] = 0.0f;
  __syncthreads();

  float* sum_dgamma = sums + warp * sets * stride;
  const LayerNormColumnSums add_to_sums{sum_dgamma, sum_dgamma + stride, sets == 3 ? sum_dgamma + 2 * stride : nullptr,
                                        sums_in_shared};
  const std::size_t first = std::size_t(blockIdx.x) * rows_per_part;
  const std::size_t end = first + rows_per_part < a.rows ? first + rows_per_part : a.rows;
  for (std::size_t r = first + warp; r < end; r += warps) {
    const T* dyr = a.dy + r * cols;
    const T* xr = a.x + r * cols;
    const float m = a.mean[r], rs = a.rstd[r];
    const RowSplit s = split_row(xr, cols, a.vectorized);
    const FloatPair totals =
        warp_allreduce(layernorm_lane_gradient_sums(s, dyr, xr, a.gamma, m, rs, lane, warp_size), FloatPairSum{});
    layernorm_lane_backward(s, dyr, xr, a.gamma, a.dx_add ? a.dx_add + r * cols : nullptr, a.dx + r * cols, m, rs,
                            layernorm_mean(totals.first, cols), layernorm_mean(totals.second, cols), add_to_sums, lane,
                            warp_size);
  }
  __syncthreads();
  layernorm_fold_part(
      sums, warps, sets, stride, [=](std::size_t c) { return sums_in_shared ? layernorm_swizzle(c) : c; }, cols,
      part_partials);
}

// v, through an empty asm the compiler cannot see through: it must treat the result as a new
// value (the same bits).
template <class U>
__device__ ALLOY_FORCEINLINE U* layernorm_opaque(U* v) {
  asm volatile("" : "+l"(v));
  return v;
}

// The same for each 32-bit word of a run of W elements (a whole number of words).
template <int W, class T>
__device__ ALLOY_FORCEINLINE void layernorm_opaque_run(T (&v)[W]) {
  static_assert(W * sizeof(T) % 4 == 0, "layernorm_opaque_run: whole 32-bit words");
  unsigned words[W * sizeof(T) / 4];
  memcpy(words, v, sizeof(words));
  ALLOY_UNROLL
  for (std::size_t i = 0; i < W * sizeof(T) / 4; ++i) asm volatile("" : "+r"(words[i]));
  memcpy(v, words, sizeof(words));
}

// The backward pass on rows of exactly 32 V vectors from a 16-byte boundary. One block of 8
// warps per part, a warp per row: each lane loads its V vectors of the row's dy and x (all in
// flight together) when it starts on the row and keeps them in registers for both passes. Each
// warp's column sums live in its own slice of shared memory, where each lane adds a row's terms
// to its own columns' sums (16-byte read and write, layernorm_lane_sums_at), which only it
// touches until the fold. The second pass converts dy and x again instead of keeping the first
// pass's floats live across the row's reduction: at most 128 registers, so 2 blocks of 8 warps
// fit on an SM (up to 256 parts, one block each: one wave on 132 SMs). DRAM: as
// layernorm_backward_rows_kernel's, reading dy and x once instead of twice. Shared memory: 8
// warps x 2 cols floats, 48 KiB for 768 bf16 columns, 64 KiB for 1024; with dx_add's column sums
// (AddSums) 3 cols floats, 72 and 96 KiB.
template <class T, class G, int V, bool Add, bool AddSums = false>
__global__ void __launch_bounds__(layernorm_part_block, 2)
    layernorm_backward_lane_columns_kernel(LayerNormBackward<T, G> a, std::size_t rows_per_part, float* partials) {
  static_assert(Add || !AddSums, "layernorm_backward_lane_columns_kernel: dx_add's sums need dx_add");
  constexpr unsigned sets = AddSums ? 3 : 2;
  constexpr int L = row_vector_lanes<T>;
  constexpr unsigned cols = warp_size * V * L;  // the kernel's precondition: cols is 32 V L
  constexpr int chunks = L / 4;                 // 16-byte chunks of column sums per vector
  extern __shared__ float4 shared_sums4[];
  float* const shared_sums = reinterpret_cast<float*>(shared_sums4);
  const unsigned warps = blockDim.x / warp_size;
  const unsigned warp = threadIdx.x / warp_size;
  const unsigned lane = threadIdx.x % warp_size;
  float* const sum_dgamma = shared_sums + warp * sets * cols;
  float* const sum_dbeta = sum_dgamma + cols;
  float* const sum_add = sum_dgamma + 2 * cols;  // AddSums only
  const auto sums_at = [&](int k, int h) { return layernorm_lane_sums_at<L>((lane + warp_size * k) * L + 4 * h); };
  ALLOY_UNROLL
  for (int k = 0; k < V; ++k) {
    ALLOY_UNROLL
    for (int h = 0; h < chunks; ++h) {
      *reinterpret_cast<float4*>(sum_dgamma + sums_at(k, h)) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      *reinterpret_cast<float4*>(sum_dbeta + sums_at(k, h)) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if constexpr (AddSums) {
        *reinterpret_cast<float4*>(sum_add + sums_at(k, h)) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
    }
  }

  const std::size_t first = std::size_t(blockIdx.x) * rows_per_part;
  const std::size_t end = first + rows_per_part < a.rows ? first + rows_per_part : a.rows;
  const auto column = [&](int k) { return (lane + warp_size * k) * L; };
  for (std::size_t r = first + warp; r < end; r += warps) {
    const std::size_t row = r * cols;
    const float m = a.mean[r], rs = a.rstd[r];
    T dyv[V][L], xv[V][L], gv[V][L], addv[V][L];
    ALLOY_UNROLL
    for (int k = 0; k < V; ++k) {
      load_run<L>(a.dy + row + column(k), dyv[k]);
      load_run<L>(a.x + row + column(k), xv[k]);
    }
    ALLOY_UNROLL
    for (int k = 0; k < V; ++k) {
      load_run<L>(a.gamma + column(k), gv[k]);
      if constexpr (Add) load_run<L>(a.dx_add + row + column(k), addv[k]);
    }
    FloatPair lane_sums{0.0f, 0.0f};
    ALLOY_UNROLL
    for (int k = 0; k < V; ++k) layernorm_run_gradient_sums(dyv[k], xv[k], gv[k], m, rs, lane_sums);
    const FloatPair totals = warp_allreduce(lane_sums, FloatPairSum{});
    const float mean_g = layernorm_mean(totals.first, cols), mean_gx = layernorm_mean(totals.second, cols);
    // The second pass converts dy and x again from their packed 16-bit values and reloads gamma
    // (from L1) rather than keeping the first pass's floats live across the reduction: they reach
    // it through layernorm_opaque, so the compiler cannot merge the two passes' conversions.
    const T* const gamma2 = layernorm_opaque(a.gamma);
    ALLOY_UNROLL
    for (int k = 0; k < V; ++k) {
      T dxv[L];
      float dgamma_terms[L], dbeta_terms[L], add_terms[L];
      layernorm_opaque_run(dyv[k]);
      layernorm_opaque_run(xv[k]);
      load_run<L>(gamma2 + column(k), gv[k]);
      layernorm_run_backward(dyv[k], xv[k], gv[k], addv[k], Add, m, rs, mean_g, mean_gx, dxv, dgamma_terms, dbeta_terms,
                             add_terms);
      store_run<L>(a.dx + row + column(k), dxv);
      ALLOY_UNROLL
      for (int h = 0; h < chunks; ++h) {
        float4* const dg = reinterpret_cast<float4*>(sum_dgamma + sums_at(k, h));
        float4* const db = reinterpret_cast<float4*>(sum_dbeta + sums_at(k, h));
        float4 g = *dg, b = *db;
        g.x = fp::add(g.x, dgamma_terms[4 * h]), b.x = fp::add(b.x, dbeta_terms[4 * h]);
        g.y = fp::add(g.y, dgamma_terms[4 * h + 1]), b.y = fp::add(b.y, dbeta_terms[4 * h + 1]);
        g.z = fp::add(g.z, dgamma_terms[4 * h + 2]), b.z = fp::add(b.z, dbeta_terms[4 * h + 2]);
        g.w = fp::add(g.w, dgamma_terms[4 * h + 3]), b.w = fp::add(b.w, dbeta_terms[4 * h + 3]);
        *dg = g, *db = b;
        if constexpr (AddSums) {
          float4* const ds = reinterpret_cast<float4*>(sum_add + sums_at(k, h));
          float4 t = *ds;
          t.x = fp::add(t.x, add_terms[4 * h]), t.y = fp::add(t.y, add_terms[4 * h + 1]);
          t.z = fp::add(t.z, add_terms[4 * h + 2]), t.w = fp::add(t.w, add_terms[4 * h + 3]);
          *ds = t;
        }
      }
    }
  }
  __syncthreads();
  // Consecutive threads read a permutation of 32 consecutive floats: no bank conflicts.
  layernorm_fold_part(
      shared_sums, warps, sets, cols, [](unsigned c) { return layernorm_lane_sums_at<L>(c); }, cols,
      partials + std::size_t(blockIdx.x) * sets * cols);
}

// 32 parameter-gradient elements (of dgamma, dbeta and dx_add's sums, one after another) per
// block: warp w sums parts w, w + 32, w + 64... in order (its slot), then warp 0 sums the 32 slots
// in order and writes. Per element: reads 4 bytes per part
// (and the old value when accumulating), writes sizeof(G).
template <class G>
__global__ void __launch_bounds__(layernorm_final_slots* warp_size)
    layernorm_param_grad_kernel(const float* partials, std::size_t parts, std::size_t cols, G* dgamma, G* dbeta,
                                G* dx_add_sums, bool accumulate) {
  __shared__ float slots[layernorm_final_slots][warp_size];
  const std::size_t span = (dx_add_sums ? 3 : 2) * cols;
  const unsigned lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size;
  const std::size_t i = std::size_t(blockIdx.x) * warp_size + lane;
  float sum = 0.0f;
  if (i < span) {
#pragma unroll 8
    for (std::size_t p = warp; p < parts; p += layernorm_final_slots) sum = fp::add(sum, partials[p * span + i]);
  }
  slots[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && i < span) {
    float total = 0.0f;
    ALLOY_UNROLL
    for (std::size_t k = 0; k < layernorm_final_slots; ++k) total = fp::add(total, slots[k][lane]);
    G& out = i < cols ? dgamma[i] : i < 2 * cols ? dbeta[i - cols] : dx_add_sums[i - 2 * cols];
    layernorm_write_param_grad(out, total, accumulate);
  }
}

// Calls launch(integral_constant<int, V>) for V = vectors, 1 <= vectors <= Max.
template <int Max, int V = 1, class Launch>
void layernorm_dispatch_lane_vectors(int vectors, Launch&& launch) {
  if constexpr (V <= Max) {
    if (vectors == V) return launch(std::integral_constant<int, V>{});
    layernorm_dispatch_lane_vectors<Max, V + 1>(vectors, launch);
  }
}

template <class T>
void layernorm_forward_on(Cuda be, const LayerNormForward<T>& a) {
  if (a.rows == 0) return;
  const int grid = grid_for(a.rows, layernorm_block / warp_size);
  constexpr int max_vectors = layernorm_max_lane_columns / row_vector_lanes<T>;
  const int vectors = layernorm_lane_vectors(a.cols, a.x, a.vectorized, max_vectors);
  if (vectors > 0) {
    layernorm_dispatch_lane_vectors<max_vectors>(vectors, [&](auto v) {
      layernorm_forward_lane_columns_kernel<T, decltype(v)::value><<<grid, layernorm_block, 0, be.stream>>>(a);
    });
  } else {
    layernorm_forward_kernel<<<grid, layernorm_block, 0, be.stream>>>(a);
  }
  ALLOY_CUDA_CHECK_LAUNCH();
}

// Lets `kernel` take shared_bytes of dynamic shared memory, with the largest shared-memory carveout
// of the L1 (the backward kernels' column sums take 48-64 KiB a block: two blocks per
// multiprocessor need the carveout the driver might otherwise size for one).
template <class Kernel>
void layernorm_allow_shared_bytes(Kernel* kernel, std::size_t shared_bytes) {
  if (shared_bytes > 48 * 1024) {
    ALLOY_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)));
  }
  if (shared_bytes > 0) {
    ALLOY_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
  }
}

template <class T, class G>
void layernorm_backward_on(Cuda be, const LayerNormBackward<T, G>& a, float* scratch) {
  const std::size_t rows = a.rows, cols = a.cols;
  const std::size_t parts = layernorm_parts(rows, cols);
  if (parts > 0) {
    const std::size_t warps = layernorm_part_warps(cols);
    const std::size_t rows_per_part = layernorm_rows_in_part(rows, parts);
    constexpr int max_vectors = layernorm_max_backward_lane_vectors;
    const int vectors = layernorm_lane_vectors(cols, a.x, a.vectorized, max_vectors);
    const std::size_t sets = a.sum_sets();
    if (vectors > 0) {
      // cols <= 32 lanes x 32 columns: 8 warps' sums fit in 64 KiB (96 KiB with dx_add's).
      const std::size_t shared_bytes = warps * sets * cols * sizeof(float);
      layernorm_dispatch_lane_vectors<max_vectors>(vectors, [&](auto v) {
        constexpr int V = decltype(v)::value;
        auto* kernel = a.dx_add_sums ? &layernorm_backward_lane_columns_kernel<T, G, V, true, true>
                       : a.dx_add    ? &layernorm_backward_lane_columns_kernel<T, G, V, true>
                                     : &layernorm_backward_lane_columns_kernel<T, G, V, false>;
        layernorm_allow_shared_bytes(kernel, shared_bytes);
        kernel<<<static_cast<int>(parts), static_cast<int>(warps) * warp_size, shared_bytes, be.stream>>>(
            a, rows_per_part, scratch);
      });
    } else {
      std::size_t shared_bytes = warps * sets * layernorm_sums_stride(cols) * sizeof(float);
      // A single warp's sums too large for a block's shared memory stay in scratch (L2). Either
      // way the order of additions, hence the bits, is the same.
      const bool sums_in_shared = shared_bytes <= current_device_max_shared_bytes_per_block();
      if (!sums_in_shared && warps > 1) {
        throw error("layernorm_backward: this device has too little shared memory per block for " +
                    std::to_string(warps) + " warps' column sums (" + std::to_string(shared_bytes) + " bytes)");
      }
      if (!sums_in_shared) shared_bytes = 0;
      auto* kernel = &layernorm_backward_rows_kernel<T, G>;
      layernorm_allow_shared_bytes(kernel, shared_bytes);
      kernel<<<static_cast<int>(parts), static_cast<int>(warps) * warp_size, shared_bytes, be.stream>>>(
          a, rows_per_part, scratch, sums_in_shared);
    }
    ALLOY_CUDA_CHECK_LAUNCH();
  }
  const std::size_t blocks = (a.sum_sets() * cols + warp_size - 1) / warp_size;
  layernorm_param_grad_kernel<<<static_cast<unsigned>(blocks), layernorm_final_slots * warp_size, 0, be.stream>>>(
      scratch, parts, cols, a.dgamma, a.dbeta, a.dx_add_sums, a.accumulate);
  ALLOY_CUDA_CHECK_LAUNCH();
}

#endif  // ALLOY_HAS_CUDA_KERNELS

}  // namespace detail

// Floats of `scratch` layernorm_backward needs for these sizes (with dx_add's column sums or
// without), on either backend (the Host backend does not use it and accepts null).
inline std::size_t layernorm_backward_scratch_floats(std::size_t rows, std::size_t cols) {
  return detail::layernorm_parts(rows, cols) * 3 * cols;
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
// fp16). When dx_add is not null (rows x cols, like dx; it may be dx itself), dx = LayerNorm's dx
// + dx_add, added in fp32 and rounded once: a residual block whose inner path starts with
// LayerNorm passes the gradient arriving on the skip path. dx may also be dy itself: every path
// reads a row's dy (each lane its own elements, the same ones in both walks) before it writes
// that row's dx, and no element is read after it is written. On Cuda `scratch` is device memory of
// layernorm_backward_scratch_floats(rows, cols) floats, and the call is ordered on be.stream; the
// Host backend ignores it. dx_add_sums (cols elements, may be null; needs dx_add) receives the
// column sums of dx_add, written or added as dgamma and dbeta: a residual block's last
// projection's bias gradient (nn::Sequential), from the reads of dx_add this pass makes anyway.
template <class T, class G, class B>
void layernorm_backward(B be, const T* dy, const T* x, const T* gamma, const float* mean, const float* rstd, T* dx,
                        G* dgamma, G* dbeta, std::size_t rows, std::size_t cols, bool accumulate, float* scratch,
                        std::type_identity_t<const T*> dx_add = nullptr,
                        std::type_identity_t<G*> dx_add_sums = nullptr) {
  static_assert(backend<B>, "layernorm_backward: B must be alloy::Host or alloy::Cuda");
  static_assert(detail::row_dtype<T>, "layernorm_backward<T, G>: T must be float, bf16 or fp16");
  static_assert(detail::row_dtype<G>, "layernorm_backward<T, G>: G must be float, bf16 or fp16");
  static_assert(detail::has_row_kernels<B>,
                "layernorm_backward on Cuda: compile this translation unit with nvcc (the Cuda kernels need it)");
  const detail::LayerNormBackward<T, G> a{dy,         x,
                                          gamma,      mean,
                                          rstd,       dx,
                                          dx_add,     dgamma,
                                          dbeta,      dx_add_sums,
                                          rows,       cols,
                                          accumulate, detail::layernorm_vectorizable(cols, dy, x, gamma, dx, dx_add)};
  detail::check_layernorm_backward(a, scratch, std::is_same_v<B, Host> ? false : rows > 0);
  detail::layernorm_backward_on(be, a, scratch);
}

}  // namespace alloy
