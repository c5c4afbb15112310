// The Host reference of causal self-attention (kernels/attention_args.hpp gives the semantics):
// plain loops, one query or key row at a time, holding at most one block of 64 scores and one row
// of head_dim sums; no seq x seq matrix. It performs the Cuda row kernels' fp32 operations in
// their order (kernels/detail/attention_rows.hpp), so those give its bits, and rounds to T where
// the tensor-core kernels do (P and dS; for tf32 also q, k, v and dout as factors of products), so
// those differ from it only by fp32 summation order and exp2 (and, for fp32, by 3xTF32's products).
// The backward's column parts, when asked for, are summed from dq, dk and dv as written, after them.
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/kernels/attention_args.hpp>
#include <alloy/kernels/detail/attention_rows.hpp>

#include <algorithm>
#include <cstddef>
#include <vector>

namespace alloy::detail {

// Row t of every (b, h): the online softmax over key blocks of 64 (a running maximum per block),
// out_t = (sum_j round_T(2^(x_j - max)) v_j) / sum_j 2^(x_j - max), both sums in key order.
template <class T>
void attention_forward_on(Host, const AttentionArgs<T>& a, float scale) {
  using S = storage_t<T>;
  const int head_dim = static_cast<int>(a.head_dim);
  const float scale_log2 = fp::mul(scale, attention_log2e);
  std::vector<float> o(a.head_dim);
  float x[attention_key_block];
  for (std::size_t b = 0; b < a.batch; ++b) {
    for (std::size_t h = 0; h < a.heads; ++h) {
      for (std::size_t t = 0; t < a.seq; ++t) {
        const S* q = attention_row(a.q, a.qkv_strides, b, t, h);
        OnlineSoftmax row;
        std::fill(o.begin(), o.end(), 0.0f);
        for (std::size_t first = 0; first <= t; first += attention_key_block) {
          const std::size_t end = std::min(first + attention_key_block, t + 1);
          float block_max = attention_negative_infinity;
          for (std::size_t j = first; j < end; ++j) {
            x[j - first] =
                fp::mul(attention_dot_replay<T>(q, attention_row(a.k, a.qkv_strides, b, j, h), head_dim), scale_log2);
            block_max = Max{}(block_max, x[j - first]);
          }
          const float factor = row.rescale(block_max);
          for (float& od : o) od = fp::mul(od, factor);
          for (std::size_t j = first; j < end; ++j) {
            const float p = rounded_to<T>(row.add(x[j - first]));
            const S* v = attention_row(a.v, a.qkv_strides, b, j, h);
            for (int d = 0; d < head_dim; ++d) o[d] = fp::add(o[d], fp::mul(p, attention_factor<T>(v[d])));
          }
        }
        const float inverse = fp::div(1.0f, row.sum);
        S* out = attention_row(a.out, a.out_strides, b, t, h);
        for (int d = 0; d < head_dim; ++d) out[d] = round_nearest<S>(fp::mul(o[d], inverse));
        if (a.lse) a.lse[(b * a.heads + h) * a.seq + t] = row.logsumexp();
      }
    }
  }
}

// a.column_parts from a's dq, dk and dv (attention_args.hpp): each tile's rows in position order, a
// row's columns side by side, so each column is summed in position order.
template <class T>
void attention_column_parts(Host, const AttentionBackwardArgs<T>& a) {
  using S = storage_t<T>;
  const std::size_t tiles = attention_column_tiles(a.seq), width = a.heads * a.head_dim;
  const S* outputs[3] = {a.dq, a.dk, a.dv};
  for (std::size_t b = 0; b < a.batch; ++b) {
    for (std::size_t t = 0; t < tiles; ++t) {
      float* part = a.column_parts + (b * tiles + t) * 3 * width;
      std::fill(part, part + 3 * width, 0.0f);
      const std::size_t end = std::min(a.seq, (t + 1) * attention_column_tile);
      for (std::size_t position = t * attention_column_tile; position < end; ++position) {
        for (std::size_t which = 0; which < 3; ++which) {
          for (std::size_t h = 0; h < a.heads; ++h) {
            const S* row = attention_row(outputs[which], a.grad_strides, b, position, h);
            float* sums = part + which * width + h * a.head_dim;
            for (std::size_t d = 0; d < a.head_dim; ++d) sums[d] = fp::add(sums[d], to_float(row[d]));
          }
        }
      }
    }
  }
}

// For every (b, h): delta_t for each query row; dq_t over keys j <= t in order; then dk_j and dv_j
// over queries t >= j in order, recomputing P and dS (the same bits as for dq).
template <class T>
void attention_backward_on(Host, const AttentionBackwardArgs<T>& a, float scale) {
  using S = storage_t<T>;
  const int head_dim = static_cast<int>(a.head_dim);
  const float scale_log2 = fp::mul(scale, attention_log2e);
  std::vector<float> delta(a.seq), lse_log2(a.seq), first_sum(a.head_dim), second_sum(a.head_dim);
  const AttentionStrides& in = a.qkv_strides;
  for (std::size_t b = 0; b < a.batch; ++b) {
    for (std::size_t h = 0; h < a.heads; ++h) {
      const float* lse = a.lse + (b * a.heads + h) * a.seq;
      for (std::size_t t = 0; t < a.seq; ++t) {
        delta[t] = attention_dot_replay<float>(attention_row(a.dout, a.out_strides, b, t, h),
                                               attention_row(a.out, a.out_strides, b, t, h), head_dim);
        lse_log2[t] = fp::mul(lse[t], attention_log2e);
      }
      // p and round_T(dS) of query t and key j.
      const auto probability_and_grad = [&](std::size_t t, std::size_t j, float& p, float& ds) {
        const S* dout = attention_row(a.dout, a.out_strides, b, t, h);
        const float s =
            attention_dot_replay<T>(attention_row(a.q, in, b, t, h), attention_row(a.k, in, b, j, h), head_dim);
        p = attention_probability(s, scale_log2, lse_log2[t]);
        const float dp = attention_dot_replay<T>(dout, attention_row(a.v, in, b, j, h), head_dim);
        ds = rounded_to<T>(attention_score_grad(p, dp, delta[t]));
      };
      for (std::size_t t = 0; t < a.seq; ++t) {
        std::fill(first_sum.begin(), first_sum.end(), 0.0f);
        for (std::size_t j = 0; j <= t; ++j) {
          float p, ds;
          probability_and_grad(t, j, p, ds);
          const S* k = attention_row(a.k, in, b, j, h);
          for (int d = 0; d < head_dim; ++d) {
            first_sum[d] = fp::add(first_sum[d], fp::mul(ds, attention_factor<T>(k[d])));
          }
        }
        S* dq = attention_row(a.dq, a.grad_strides, b, t, h);
        for (int d = 0; d < head_dim; ++d) dq[d] = round_nearest<S>(fp::mul(first_sum[d], scale));
      }
      for (std::size_t j = 0; j < a.seq; ++j) {
        std::fill(first_sum.begin(), first_sum.end(), 0.0f);    // dk
        std::fill(second_sum.begin(), second_sum.end(), 0.0f);  // dv
        for (std::size_t t = j; t < a.seq; ++t) {
          float p, ds;
          probability_and_grad(t, j, p, ds);
          const float pt = rounded_to<T>(p);
          const S* q = attention_row(a.q, in, b, t, h);
          const S* dout = attention_row(a.dout, a.out_strides, b, t, h);
          for (int d = 0; d < head_dim; ++d) {
            first_sum[d] = fp::add(first_sum[d], fp::mul(ds, attention_factor<T>(q[d])));
            second_sum[d] = fp::add(second_sum[d], fp::mul(pt, attention_factor<T>(dout[d])));
          }
        }
        S* dk = attention_row(a.dk, a.grad_strides, b, j, h);
        S* dv = attention_row(a.dv, a.grad_strides, b, j, h);
        for (int d = 0; d < head_dim; ++d) {
          dk[d] = round_nearest<S>(fp::mul(first_sum[d], scale));
          dv[d] = round_nearest<S>(second_sum[d]);
        }
      }
    }
  }
  if (a.column_parts) attention_column_parts(Host{}, a);
}

}  // namespace alloy::detail
