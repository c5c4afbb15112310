// Attention's Cuda row kernels: the path for every dtype, head_dim (up to 256) and stride the
// tensor cores do not take (kernels/attention_args.hpp). A warp per query row (forward, dq) or key
// row (dk, dv), lane l holding dimensions l, l + 32, ... in registers, performing the Host
// reference's fp32 operations in its order (kernels/detail/attention_rows.hpp), tf32's roundings
// included: outputs are the Host's bits; lse may differ from it in the last bits, where the
// device's logf does. The backward's column parts, when asked for, are summed from dq, dk and dv
// as written, by a kernel of their own after them (the Host's bits too).
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_KERNELS

#include <alloy/backend/cuda/launch.hpp>
#include <alloy/backend/cuda/warp_reduce.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>
#include <alloy/kernels/attention_args.hpp>
#include <alloy/kernels/detail/attention_rows.hpp>

#include <cstddef>

namespace alloy::detail {

inline constexpr int attention_row_warps = 4;
inline constexpr int attention_row_block = attention_row_warps * warp_size;

// A warp per query row t: for each block of 64 keys, the scores (one warp_allreduce each, kept in
// shared memory), the block's maximum, then the weighted sum of v. Per row: reads q_t once and
// k_j, v_j for j <= t (from L2 after the first rows of a head); writes out_t and lse_t.
template <class T>
__global__ void __launch_bounds__(attention_row_block)
    attention_forward_rows_kernel(AttentionArgs<T> a, float scale_log2) {
  using S = storage_t<T>;
  __shared__ float block_x[attention_row_warps][attention_key_block];
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size;
  const int head_dim = static_cast<int>(a.head_dim);
  float* x = block_x[warp];
  const std::size_t rows = a.batch * a.heads * a.seq;
  for (std::size_t r = std::size_t(blockIdx.x) * attention_row_warps + warp; r < rows;
       r += std::size_t(gridDim.x) * attention_row_warps) {
    const std::size_t t = r % a.seq, bh = r / a.seq, b = bh / a.heads, h = bh % a.heads;
    float q[attention_lane_dims], o[attention_lane_dims];
    attention_lane_values(attention_row(a.q, a.qkv_strides, b, t, h), lane, head_dim, q);
    ALLOY_UNROLL
    for (int i = 0; i < attention_lane_dims; ++i) o[i] = 0.0f;
    OnlineSoftmax row;
    for (std::size_t first = 0; first <= t; first += attention_key_block) {
      const std::size_t end = first + attention_key_block < t + 1 ? first + attention_key_block : t + 1;
      float block_max = attention_negative_infinity;
      for (std::size_t j = first; j < end; ++j) {
        const float s = warp_allreduce(
            attention_lane_dot<T>(q, attention_row(a.k, a.qkv_strides, b, j, h), lane, head_dim), AttentionSum{});
        const float xj = fp::mul(s, scale_log2);
        if (lane == 0) x[j - first] = xj;
        block_max = Max{}(block_max, xj);
      }
      __syncwarp();
      const float factor = row.rescale(block_max);
      ALLOY_UNROLL
      for (int i = 0; i < attention_lane_dims; ++i) o[i] = fp::mul(o[i], factor);
      for (std::size_t j = first; j < end; ++j) {
        const float p = rounded_to<T>(row.add(x[j - first]));
        const S* v = attention_row(a.v, a.qkv_strides, b, j, h);
        ALLOY_UNROLL
        for (int i = 0; i < attention_lane_dims; ++i) {
          const int d = lane + warp_size * i;
          if (d < head_dim) o[i] = fp::add(o[i], fp::mul(p, attention_factor<T>(v[d])));
        }
      }
      __syncwarp();  // x is rewritten by the next block
    }
    const float inverse = fp::div(1.0f, row.sum);
    S* out = attention_row(a.out, a.out_strides, b, t, h);
    ALLOY_UNROLL
    for (int i = 0; i < attention_lane_dims; ++i) {
      const int d = lane + warp_size * i;
      if (d < head_dim) out[d] = round_nearest<S>(fp::mul(o[i], inverse));
    }
    if (lane == 0 && a.lse) a.lse[bh * a.seq + t] = row.logsumexp();
  }
}

// A warp per query row t: delta_t (written to scratch for the dk/dv kernel), then dq_t over keys
// j <= t in order. Per row: reads q_t, dout_t, out_t once and k_j, v_j for j <= t; writes dq_t.
template <class T>
__global__ void __launch_bounds__(attention_row_block)
    attention_backward_dq_rows_kernel(AttentionBackwardArgs<T> a, float scale, float scale_log2) {
  using S = storage_t<T>;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size;
  const int head_dim = static_cast<int>(a.head_dim);
  const AttentionStrides& in = a.qkv_strides;
  const std::size_t rows = a.batch * a.heads * a.seq;
  for (std::size_t r = std::size_t(blockIdx.x) * attention_row_warps + warp; r < rows;
       r += std::size_t(gridDim.x) * attention_row_warps) {
    const std::size_t t = r % a.seq, bh = r / a.seq, b = bh / a.heads, h = bh % a.heads;
    float q[attention_lane_dims], dout[attention_lane_dims], sum[attention_lane_dims];
    attention_lane_values(attention_row(a.q, in, b, t, h), lane, head_dim, q);
    attention_lane_values(attention_row(a.dout, a.out_strides, b, t, h), lane, head_dim, dout);
    ALLOY_UNROLL
    for (int i = 0; i < attention_lane_dims; ++i) sum[i] = 0.0f;
    const float delta = warp_allreduce(
        attention_lane_dot<float>(dout, attention_row(a.out, a.out_strides, b, t, h), lane, head_dim), AttentionSum{});
    if (lane == 0) a.scratch[r] = delta;
    const float lse_log2 = fp::mul(a.lse[r], attention_log2e);
    for (std::size_t j = 0; j <= t; ++j) {
      const S* k = attention_row(a.k, in, b, j, h);
      const float s = warp_allreduce(attention_lane_dot<T>(q, k, lane, head_dim), AttentionSum{});
      const float p = attention_probability(s, scale_log2, lse_log2);
      const float dp =
          warp_allreduce(attention_lane_dot<T>(dout, attention_row(a.v, in, b, j, h), lane, head_dim), AttentionSum{});
      const float ds = rounded_to<T>(attention_score_grad(p, dp, delta));
      ALLOY_UNROLL
      for (int i = 0; i < attention_lane_dims; ++i) {
        const int d = lane + warp_size * i;
        if (d < head_dim) sum[i] = fp::add(sum[i], fp::mul(ds, attention_factor<T>(k[d])));
      }
    }
    S* dq = attention_row(a.dq, a.grad_strides, b, t, h);
    ALLOY_UNROLL
    for (int i = 0; i < attention_lane_dims; ++i) {
      const int d = lane + warp_size * i;
      if (d < head_dim) dq[d] = round_nearest<S>(fp::mul(sum[i], scale));
    }
  }
}

// A warp per key row j: dk_j and dv_j over queries t >= j in order, with delta_t from scratch.
// Per row: reads k_j, v_j once and q_t, dout_t, lse_t, delta_t for t >= j; writes dk_j, dv_j.
template <class T>
__global__ void __launch_bounds__(attention_row_block)
    attention_backward_dkdv_rows_kernel(AttentionBackwardArgs<T> a, float scale, float scale_log2) {
  using S = storage_t<T>;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size;
  const int head_dim = static_cast<int>(a.head_dim);
  const AttentionStrides& in = a.qkv_strides;
  const std::size_t rows = a.batch * a.heads * a.seq;
  for (std::size_t r = std::size_t(blockIdx.x) * attention_row_warps + warp; r < rows;
       r += std::size_t(gridDim.x) * attention_row_warps) {
    const std::size_t j = r % a.seq, bh = r / a.seq, b = bh / a.heads, h = bh % a.heads;
    float k[attention_lane_dims], v[attention_lane_dims], dk[attention_lane_dims], dv[attention_lane_dims];
    attention_lane_values(attention_row(a.k, in, b, j, h), lane, head_dim, k);
    attention_lane_values(attention_row(a.v, in, b, j, h), lane, head_dim, v);
    ALLOY_UNROLL
    for (int i = 0; i < attention_lane_dims; ++i) dk[i] = dv[i] = 0.0f;
    for (std::size_t t = j; t < a.seq; ++t) {
      const S* q = attention_row(a.q, in, b, t, h);
      const S* dout = attention_row(a.dout, a.out_strides, b, t, h);
      const std::size_t row_t = bh * a.seq + t;
      const float s = warp_allreduce(attention_lane_dot<T>(k, q, lane, head_dim), AttentionSum{});
      const float p = attention_probability(s, scale_log2, fp::mul(a.lse[row_t], attention_log2e));
      const float dp = warp_allreduce(attention_lane_dot<T>(v, dout, lane, head_dim), AttentionSum{});
      const float ds = rounded_to<T>(attention_score_grad(p, dp, a.scratch[row_t]));
      const float pt = rounded_to<T>(p);
      ALLOY_UNROLL
      for (int i = 0; i < attention_lane_dims; ++i) {
        const int d = lane + warp_size * i;
        if (d < head_dim) {
          dk[i] = fp::add(dk[i], fp::mul(ds, attention_factor<T>(q[d])));
          dv[i] = fp::add(dv[i], fp::mul(pt, attention_factor<T>(dout[d])));
        }
      }
    }
    S* dk_row = attention_row(a.dk, a.grad_strides, b, j, h);
    S* dv_row = attention_row(a.dv, a.grad_strides, b, j, h);
    ALLOY_UNROLL
    for (int i = 0; i < attention_lane_dims; ++i) {
      const int d = lane + warp_size * i;
      if (d < head_dim) {
        dk_row[d] = round_nearest<S>(fp::mul(dk[i], scale));
        dv_row[d] = round_nearest<S>(dv[i]);
      }
    }
  }
}

// A thread per (sequence b, tile t, column c of dq, dk and dv side by side): c's values over the
// tile's positions in order, as attention_args.hpp defines the column parts. Reads dq, dk and dv
// once (a warp's threads read consecutive columns of one row); writes 4 bytes per column and tile.
template <class T>
__global__ void __launch_bounds__(cuda_block) attention_column_parts_kernel(AttentionBackwardArgs<T> a) {
  using S = storage_t<T>;
  const std::size_t tiles = attention_column_tiles(a.seq), width = a.heads * a.head_dim;
  const std::size_t parts = a.batch * tiles * 3 * width;
  const AttentionStrides& gs = a.grad_strides;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < parts;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t c = i % (3 * width), bt = i / (3 * width), b = bt / tiles, t = bt % tiles;
    const std::size_t which = c / width, h = c % width / a.head_dim, d = c % a.head_dim;
    const S* column = (which == 0 ? a.dq : which == 1 ? a.dk : a.dv) + b * gs.batch + h * gs.head + d;
    const std::size_t first = t * attention_column_tile;
    const std::size_t end = first + attention_column_tile < a.seq ? first + attention_column_tile : a.seq;
    float sum = 0.0f;
    for (std::size_t position = first; position < end; ++position) {
      sum = fp::add(sum, to_float(column[position * gs.row]));
    }
    a.column_parts[i] = sum;
  }
}

// a.column_parts from the dq, dk and dv that the backward's kernels wrote before it on be.stream.
template <class T>
void attention_column_parts(Cuda be, const AttentionBackwardArgs<T>& a) {
  const std::size_t parts = attention_column_parts_floats(a.batch, a.heads, a.seq, a.head_dim);
  attention_column_parts_kernel<<<grid_for(parts), cuda_block, 0, be.stream>>>(a);
  ALLOY_CUDA_CHECK_LAUNCH();
}

template <class T>
void attention_forward_rows(Cuda be, const AttentionArgs<T>& a, float scale) {
  const std::size_t rows = a.batch * a.heads * a.seq;
  attention_forward_rows_kernel<<<grid_for(rows, attention_row_warps), attention_row_block, 0, be.stream>>>(
      a, fp::mul(scale, attention_log2e));
  ALLOY_CUDA_CHECK_LAUNCH();
}

template <class T>
void attention_backward_rows(Cuda be, const AttentionBackwardArgs<T>& a, float scale) {
  const std::size_t rows = a.batch * a.heads * a.seq;
  const int grid = grid_for(rows, attention_row_warps);
  const float scale_log2 = fp::mul(scale, attention_log2e);
  attention_backward_dq_rows_kernel<<<grid, attention_row_block, 0, be.stream>>>(a, scale, scale_log2);
  ALLOY_CUDA_CHECK_LAUNCH();
  attention_backward_dkdv_rows_kernel<<<grid, attention_row_block, 0, be.stream>>>(a, scale, scale_log2);
  ALLOY_CUDA_CHECK_LAUNCH();
  if (a.column_parts) attention_column_parts(be, a);
}

}  // namespace alloy::detail

#endif  // ALLOY_HAS_CUDA_KERNELS
