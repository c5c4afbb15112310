// Causal self-attention for the kernel tests: problems in GPT-2's layout (q, k, v the column
// blocks of a fused [batch * seq, 3 channels] matrix, out and dout [batch * seq, channels], rows
// padded so that an element written outside its place shows), and a float64 reference that
// keeps, beside each output element, what its error bounds are made of.
//
// Each output is a sum of terms (out_td: P_tj v_jd; dq_td: scale dS_tj k_jd; dk_jd: scale dS_tj q_td;
// dv_jd: P_tj dout_td) whose first factor (P or dS) the kernels round to T. For each element:
//   abs_sum   A, the sum of |term|;   max_term  M, the largest |term|;
//   factor_sum F, the sum of |second factor| (what an absolute error in the rounded factor scales);
//   fp32      E(depth), a first-order bound on the fp32 rounding errors of a path whose dot
//             products add `depth` numbers in sequence: per term, the relative error of its
//             factor (the score's dot product, exp2, lse) times |term|, plus, for dS, P times the
//             errors of dP and delta (which do not shrink with dS when dP - delta cancels), plus
//             (terms + 3) u |A| for the sum itself and the final scaling.
// The tests derive their tolerances from these (stated where they are used).
#pragma once

#include "values.hpp"

#include <alloy/kernels/attention_args.hpp>
#include <alloy/numeric/fp_ops.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <string>
#include <vector>

namespace alloy::test {

struct AttentionShape {
  std::size_t batch, heads, seq, head_dim;
  std::size_t qkv_pad = 8;  // elements after each row of qkv (and dqkv), and of out (and dout)
  double spread = 1.0;      // q and k ~ N(0, spread): 1 gives softmaxes of moderate sharpness
};

inline std::string describe(const char* dtype, const AttentionShape& s) {
  return std::string(dtype) + " batch=" + std::to_string(s.batch) + " heads=" + std::to_string(s.heads) +
         " seq=" + std::to_string(s.seq) + " head_dim=" + std::to_string(s.head_dim) +
         " row padding=" + std::to_string(s.qkv_pad) + " q,k ~ N(0, " + std::to_string(s.spread) + ")";
}

// One problem's host arrays, for compute dtype T (their elements storage_t<T>: float for tf32).
// Outputs start poisoned.
template <class T>
struct AttentionProblem {
  using S = storage_t<T>;
  AttentionShape s;
  std::size_t channels, qkv_row, out_row;
  std::vector<S> qkv, dout, out, dqkv;
  std::vector<float> lse;

  AttentionProblem(const AttentionShape& shape, std::mt19937_64& rng)
      : s(shape),
        channels(shape.heads * shape.head_dim),
        qkv_row(3 * channels + shape.qkv_pad),
        out_row(channels + shape.qkv_pad),
        qkv(shape.batch * shape.seq * qkv_row),
        dout(normal<S>(shape.batch * shape.seq * out_row, 0.0, 1.0, rng)),
        out(shape.batch * shape.seq * out_row, poison<S>()),
        dqkv(qkv.size(), poison<S>()),
        lse(shape.batch * shape.heads * shape.seq, poison<float>()) {
    const auto qk = normal<S>(qkv.size(), 0.0, shape.spread, rng);
    const auto v = normal<S>(qkv.size(), 0.0, 1.0, rng);
    for (std::size_t i = 0; i < qkv.size(); ++i) {
      const std::size_t column = i % qkv_row;
      qkv[i] = column >= 2 * channels ? v[i] : qk[i];
    }
  }

  std::size_t in_at(std::size_t b, std::size_t t, std::size_t h, std::size_t d) const {
    return (b * s.seq + t) * qkv_row + h * s.head_dim + d;
  }
  std::size_t out_at(std::size_t b, std::size_t t, std::size_t h, std::size_t d) const {
    return (b * s.seq + t) * out_row + h * s.head_dim + d;
  }
  std::size_t lse_at(std::size_t b, std::size_t h, std::size_t t) const { return (b * s.heads + h) * s.seq + t; }
  AttentionStrides in_strides() const { return AttentionStrides::rows(qkv_row, s.seq, s.head_dim); }
  AttentionStrides out_strides() const { return AttentionStrides::rows(out_row, s.seq, s.head_dim); }

  // Arguments over arrays laid out as these (host vectors or device copies of them).
  AttentionArgs<T> forward_args(const S* qkv_, S* out_, float* lse_) const {
    return {.batch = s.batch,
            .heads = s.heads,
            .seq = s.seq,
            .head_dim = s.head_dim,
            .q = qkv_,
            .k = qkv_ + channels,
            .v = qkv_ + 2 * channels,
            .qkv_strides = in_strides(),
            .out = out_,
            .out_strides = out_strides(),
            .lse = lse_};
  }
  AttentionBackwardArgs<T> backward_args(const S* qkv_, const S* out_, const S* dout_, const float* lse_, S* dqkv_,
                                         float* scratch) const {
    return {.batch = s.batch,
            .heads = s.heads,
            .seq = s.seq,
            .head_dim = s.head_dim,
            .q = qkv_,
            .k = qkv_ + channels,
            .v = qkv_ + 2 * channels,
            .qkv_strides = in_strides(),
            .out = out_,
            .dout = dout_,
            .out_strides = out_strides(),
            .lse = lse_,
            .dq = dqkv_,
            .dk = dqkv_ + channels,
            .dv = dqkv_ + 2 * channels,
            .grad_strides = in_strides(),
            .scratch = scratch};
  }
  AttentionArgs<T> forward_args() { return forward_args(qkv.data(), out.data(), lse.data()); }
  AttentionBackwardArgs<T> backward_args() {
    return backward_args(qkv.data(), out.data(), dout.data(), lse.data(), dqkv.data(), nullptr);
  }
};

// AttentionBackwardArgs::column_parts by their definition, straight from a dq, dk, dv gradient in
// GPT-2's layout (dqkv: batch sequences of seq rows, qkv_row elements apart, columns 0..3 channels
// - 1 of each row dq, dk and dv side by side): for each sequence and tile of 64 positions, each
// column's stored values added in fp32 in position order, from 0.
template <class S>
std::vector<float> column_parts_of(const std::vector<S>& dqkv, std::size_t batch, std::size_t seq, std::size_t channels,
                                   std::size_t qkv_row) {
  const std::size_t tiles = (seq + 63) / 64, width = 3 * channels;
  std::vector<float> parts(batch * tiles * width);
  for (std::size_t b = 0; b < batch; ++b) {
    for (std::size_t t = 0; t < tiles; ++t) {
      for (std::size_t c = 0; c < width; ++c) {
        float sum = 0.0f;
        for (std::size_t position = 64 * t; position < std::min(seq, 64 * t + 64); ++position) {
          sum = alloy::fp::add(sum, alloy::to_float(dqkv[(b * seq + position) * qkv_row + c]));
        }
        parts[(b * tiles + t) * width + c] = sum;
      }
    }
  }
  return parts;
}

template <class T>
std::vector<float> column_parts_of(const AttentionProblem<T>& p, const std::vector<storage_t<T>>& dqkv) {
  return column_parts_of(dqkv, p.s.batch, p.s.seq, p.channels, p.qkv_row);
}

// One output element of the float64 reference and the pieces of its bounds.
struct Bounded {
  double value = 0;
  double abs_sum = 0;
  double max_term = 0;
  double factor_sum = 0;
  double fp32_per_depth = 0;  // E's part proportional to the dot products' depth
  double fp32_rest = 0;
  double fp32(double depth) const { return fp32_per_depth * depth + fp32_rest; }
  void add_term(double term, double other_factor) {
    value += term;
    abs_sum += std::fabs(term);
    max_term = std::max(max_term, std::fabs(term));
    factor_sum += std::fabs(other_factor);
  }
};

// Additions in sequence in the Host's (and the row kernels') dot products: up to head_dim / 32
// per lane, 5 in the butterfly, 1 for the product's rounding.
inline double host_dot_depth(std::size_t head_dim) { return double((head_dim + 31) / 32) + 6; }
// A bound for any order of summation (the tensor cores'): head_dim + 8.
inline double any_dot_depth(std::size_t head_dim) { return double(head_dim) + 8; }

// The float64 reference: exact softmax over the stored values the kernels read (for tf32 before
// their rounding to tf32, whose error the tests' bounds count). The backward part
// takes `out` and `lse` as the backward pass does, from the forward pass that ran (so it is the
// exact gradient given those inputs).
template <class T>
struct AttentionReference {
  std::vector<Bounded> out, lse, dq, dk, dv;  // [batch, heads, seq, head_dim]; lse [batch, heads, seq]

  AttentionReference(const AttentionProblem<T>& p, bool backward, const std::vector<storage_t<T>>* ran_out = nullptr,
                     const std::vector<float>* ran_lse = nullptr) {
    const auto& s = p.s;
    const std::size_t D = s.head_dim, n = s.seq;
    const double u = fp32_unit;
    const double scale_f = double(1.0f / std::sqrt(static_cast<float>(D)));  // the kernels' scale
    out.resize(s.batch * s.heads * n * D);
    lse.resize(s.batch * s.heads * n);
    if (backward) {
      dq.resize(out.size());
      dk.resize(out.size());
      dv.resize(out.size());
    }
    const auto in = [&](std::size_t b, std::size_t t, std::size_t h, std::size_t which, std::size_t d) {
      return value(p.qkv[p.in_at(b, t, h, d) + which * p.channels]);
    };
    std::vector<double> score(n), score_abs(n), prob(n);
    for (std::size_t b = 0; b < s.batch; ++b) {
      for (std::size_t h = 0; h < s.heads; ++h) {
        const std::size_t base = (b * s.heads + h) * n;
        for (std::size_t t = 0; t < n; ++t) {
          double m = -INFINITY;
          for (std::size_t j = 0; j <= t; ++j) {
            double dot = 0, dot_abs = 0;
            for (std::size_t d = 0; d < D; ++d) {
              dot += in(b, t, h, 0, d) * in(b, j, h, 1, d);
              dot_abs += std::fabs(in(b, t, h, 0, d) * in(b, j, h, 1, d));
            }
            score[j] = dot * scale_f;
            score_abs[j] = dot_abs * scale_f;
            m = std::max(m, score[j]);
          }
          double sum = 0;
          for (std::size_t j = 0; j <= t; ++j) sum += std::exp(score[j] - m);
          const double lse_t = m + std::log(sum);
          const double rescales = double(t / 64 + 1);
          // Relative error of each P_tj: the score's dot product (depth u |q||k| scale, per unit
          // of depth), its scaling and subtraction in base 2, exp2, the running-maximum rescales.
          double worst_rest = 0, worst_per_depth = 0;
          std::vector<double> rest(t + 1), per_depth(t + 1);
          for (std::size_t j = 0; j <= t; ++j) {
            prob[j] = std::exp(score[j] - lse_t);
            per_depth[j] = u * score_abs[j];
            rest[j] = 2 * u * (std::fabs(score[j]) + std::fabs(m)) + 4 * u * (rescales + 1);
            worst_rest = std::max(worst_rest, rest[j]);
            worst_per_depth = std::max(worst_per_depth, per_depth[j]);
          }
          for (std::size_t d = 0; d < D; ++d) {
            Bounded& o = out[(base + t) * D + d];
            for (std::size_t j = 0; j <= t; ++j) {
              const double term = prob[j] * in(b, j, h, 2, d);
              o.add_term(term, in(b, j, h, 2, d));
              o.fp32_per_depth += per_depth[j] * std::fabs(term);
              o.fp32_rest += rest[j] * std::fabs(term);
            }
            // Dividing by the sum of P, whose error is the worst P's plus its own additions.
            o.fp32_per_depth += worst_per_depth * o.abs_sum;
            o.fp32_rest += (worst_rest + 2 * (double(t) + 3) * u) * o.abs_sum;
          }
          Bounded& l = lse[base + t];
          l.value = lse_t;
          l.abs_sum = std::fabs(lse_t);
          l.fp32_per_depth = worst_per_depth;
          l.fp32_rest = worst_rest + (double(t) + 3) * u + 4 * u * (std::fabs(lse_t) + std::fabs(m));
        }
        if (!backward) continue;

        // The backward, given the forward that ran: its out in delta, its lse in P.
        for (std::size_t t = 0; t < n; ++t) {
          const double lse_t = ran_lse ? double((*ran_lse)[p.lse_at(b, h, t)]) : lse[base + t].value;
          double delta = 0, delta_abs = 0;
          for (std::size_t d = 0; d < D; ++d) {
            const double o = ran_out ? value((*ran_out)[p.out_at(b, t, h, d)]) : out[(base + t) * D + d].value;
            const double g = value(p.dout[p.out_at(b, t, h, d)]);
            delta += g * o;
            delta_abs += std::fabs(g * o);
          }
          for (std::size_t j = 0; j <= t; ++j) {
            double dot = 0, dot_abs = 0, dp = 0, dp_abs = 0;
            for (std::size_t d = 0; d < D; ++d) {
              const double g = value(p.dout[p.out_at(b, t, h, d)]);
              dot += in(b, t, h, 0, d) * in(b, j, h, 1, d);
              dot_abs += std::fabs(in(b, t, h, 0, d) * in(b, j, h, 1, d));
              dp += g * in(b, j, h, 2, d);
              dp_abs += std::fabs(g * in(b, j, h, 2, d));
            }
            const double x = dot * scale_f;
            const double pr = std::exp(x - lse_t);
            const double ds = pr * (dp - delta);
            // P's relative error; dS's absolute error (before its rounding to T).
            const double p_per_depth = u * dot_abs * scale_f;
            const double p_rest = 2 * u * (std::fabs(x) + std::fabs(lse_t)) + 4 * u;
            const double ds_per_depth = std::fabs(ds) * p_per_depth + pr * u * (dp_abs + delta_abs);
            const double ds_rest = std::fabs(ds) * (p_rest + 2 * u);
            for (std::size_t d = 0; d < D; ++d) {
              const double kd = in(b, j, h, 1, d), qd = in(b, t, h, 0, d);
              const double g = value(p.dout[p.out_at(b, t, h, d)]);
              Bounded& q_grad = dq[(base + t) * D + d];
              q_grad.add_term(scale_f * ds * kd, scale_f * kd);
              q_grad.fp32_per_depth += scale_f * ds_per_depth * std::fabs(kd);
              q_grad.fp32_rest += scale_f * ds_rest * std::fabs(kd);
              Bounded& k_grad = dk[(base + j) * D + d];
              k_grad.add_term(scale_f * ds * qd, scale_f * qd);
              k_grad.fp32_per_depth += scale_f * ds_per_depth * std::fabs(qd);
              k_grad.fp32_rest += scale_f * ds_rest * std::fabs(qd);
              Bounded& v_grad = dv[(base + j) * D + d];
              v_grad.add_term(pr * g, g);
              v_grad.fp32_per_depth += pr * p_per_depth * std::fabs(g);
              v_grad.fp32_rest += pr * p_rest * std::fabs(g);
            }
          }
        }
        for (std::size_t t = 0; t < n; ++t) {
          for (std::size_t d = 0; d < D; ++d) {
            Bounded& q_grad = dq[(base + t) * D + d];
            q_grad.fp32_rest += (double(t) + 4) * u * q_grad.abs_sum;
            Bounded& k_grad = dk[(base + t) * D + d];
            k_grad.fp32_rest += (double(n - t) + 4) * u * k_grad.abs_sum;
            Bounded& v_grad = dv[(base + t) * D + d];
            v_grad.fp32_rest += (double(n - t) + 4) * u * v_grad.abs_sum;
          }
        }
      }
    }
  }
};

// Rounding to T: u_T, the relative error of rounding a float to T (0 for float: nothing is
// rounded but in fp32, which the fp32 bound covers; 2^-11 for tf32), and the absolute error it can
// add near zero (fp16's subnormal half-spacing; bf16's, tf32's and float's are far below anything
// these sums carry).
template <class T>
double rounding_unit() {
  return std::is_same_v<T, float> ? 0.0 : std::ldexp(1.0, -(alloy::numeric_traits<T>::mantissa_bits + 1));
}
template <class T>
double rounding_floor() {
  return std::is_same_v<T, fp16> ? std::ldexp(1.0, -25) : std::ldexp(1.0, -126);
}

// Roundings to T of each term of an output sum: P or dS, and for tf32 also the other factor (v,
// k, q or dout; the 16-bit dtypes' inputs are already in T).
template <class T>
double factor_roundings() {
  return std::is_same_v<T, alloy::tf32> ? 2.0 : 1.0;
}

// tf32 rounds q and k (the scores) and dout and v (dP) before their products: a relative error of
// at most 2 u_tf32 per product term, which the fp32 bound E counts at a depth of 2 u_tf32 / u_fp32
// = 2^14 (E's per-depth part is u_fp32 per unit of depth on the same terms). 0 for the others.
template <class T>
double input_rounding_depth() {
  return std::is_same_v<T, alloy::tf32> ? 2 * rounding_unit<T>() / fp32_unit : 0.0;
}

// The spacing of T's values at magnitude v (subnormal spacing below the normal range); for tf32,
// whose outputs are stored as float, float's.
template <class T>
double ulp(double v) {
  if constexpr (std::is_same_v<T, alloy::tf32>) {
    return ulp<float>(v);
  } else {
    const int min_exponent = std::is_same_v<T, fp16> ? -14 : -126;
    const int exponent = v == 0 ? min_exponent : std::max(std::ilogb(v), min_exponent);
    return std::ldexp(1.0, exponent - alloy::numeric_traits<T>::mantissa_bits);
  }
}

}  // namespace alloy::test
