// The arithmetic of attention's row kernels, written once for the Host reference and the Cuda row
// kernels (cuda/attention_rows.hpp), which therefore give the same bits. A row of head_dim elements
// is split among 32 lanes, lane l holding dimensions l, l + 32, ... (at most 8: head_dim <= 256);
// a dot product is each lane's sum over its dimensions in order, then warp_allreduce's butterfly,
// which the Host replays (attention_dot_replay). exp2 is attention_exp2, built from alloy::fp's
// correctly rounded operations, so it too is the same on both sides; only log, used once per row
// for lse, is each side's own (numeric/math.hpp: within 2 ulp). T is the compute dtype
// (attention_args.hpp): for tf32 the factors of every product pass through attention_factor and
// rounded_to, which round them to tf32 as the tensor-core kernels do.
#pragma once

#include <alloy/backend/cuda/warp_reduce.hpp>
#include <alloy/backend/reduce_ops.hpp>
#include <alloy/kernels/attention_args.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/math.hpp>
#include <alloy/numeric/rounding.hpp>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace alloy::detail {

// Keys per step of the online softmax (one running maximum per block of 64 keys, blocks starting
// at key 0) on every path, the tensor-core forward included: all round P relative to the same
// maxima.
inline constexpr int attention_key_block = 64;
inline constexpr int attention_lane_dims = int(attention_max_head_dim) / warp_size;

inline constexpr float attention_log2e = 1.44269504088896340736f;
inline constexpr float attention_ln2 = 0.69314718055994530942f;
inline constexpr float attention_negative_infinity = float_from_bits(0xff800000u);

// 2^x, within 2 ulp, from fp32 additions and multiplications alone: x = n + f with n the nearest
// integer and |f| <= 1/2, 2^f by its Taylor series to the 7th power (the remainder is below 5e-9
// there), times 2^n. Results below 2^-125 (x < -125, -infinity included) are flushed to zero, as
// the tensor-core kernels' exp2f flushes subnormals; x >= 128 gives infinity, NaN stays NaN.
ALLOY_HOST_DEVICE inline float attention_exp2(float x) {
  if (x != x) return x;
  if (x >= 128.0f) return float_from_bits(0x7f800000u);
  if (x < -125.0f) return 0.0f;
  constexpr float shifter = 12582912.0f;  // 1.5 * 2^23: adding it leaves no fraction bits
  const float n = fp::sub(fp::add(x, shifter), shifter);
  const float f = fp::sub(x, n);  // exact
  constexpr float c[8] = {1.0f,
                          0.693147180559945309f,
                          0.240226506959100712f,
                          0.0555041086648215800f,
                          0.00961812910762847717f,
                          0.00133335581464284434f,
                          0.000154035303933816099f,
                          0.0000152527338040598403f};
  float p = c[7];
  ALLOY_UNROLL
  for (int i = 6; i >= 0; --i) p = fp::add(fp::mul(p, f), c[i]);
  int e = static_cast<int>(n);
  if (e > 127) {  // x in [127.5, 128): 2^128 has no float exponent of its own
    p = fp::mul(p, 2.0f);
    e -= 1;
  }
  return fp::mul(p, float_from_bits(static_cast<std::uint32_t>(e + 127) << 23));
}

struct AttentionSum {
  ALLOY_HOST_DEVICE float operator()(float a, float b) const { return fp::add(a, b); }
};

// The first element of row (b, t, h).
template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE T* attention_row(T* p, const AttentionStrides& s, std::size_t b, std::size_t t,
                                                     std::size_t h) {
  return p + b * s.batch + t * s.row + h * s.head;
}

// A value as a tensor-core product with compute dtype T takes it: rounded to T, back in fp32
// (tf32: to 10 fraction bits, to nearest even; float: unchanged).
template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float rounded_to(float x) {
  if constexpr (std::is_same_v<T, tf32>) {
    return round_to_tf32(x);
  } else {
    return to_float(round_nearest<T>(x));
  }
}

// An element of q, k, v or dout (or a float holding one) as a factor of a product with compute
// dtype T: its value, rounded to tf32 for tf32 (the other dtypes' elements are already in T).
template <class T, class S>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float attention_factor(S x) {
  if constexpr (std::is_same_v<T, tf32>) {
    return round_to_tf32(to_float(x));
  } else {
    return to_float(x);
  }
}

// Lane `lane`'s dimensions of a row, as floats (0 past head_dim).
template <class S>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void attention_lane_values(const S* row, int lane, int head_dim,
                                                               float (&v)[attention_lane_dims]) {
  ALLOY_UNROLL
  for (int i = 0; i < attention_lane_dims; ++i) {
    const int d = lane + warp_size * i;
    v[i] = d < head_dim ? to_float(row[d]) : 0.0f;
  }
}

// Lane `lane`'s share of dot(a, row): its dimensions in order, each factor as a product of compute
// dtype T takes it (T = float: as they are, for delta, which is no tensor-core product).
template <class T, class S>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float attention_lane_dot(const float (&a)[attention_lane_dims], const S* row,
                                                             int lane, int head_dim) {
  float sum = 0.0f;
  ALLOY_UNROLL
  for (int i = 0; i < attention_lane_dims; ++i) {
    const int d = lane + warp_size * i;
    if (d < head_dim) sum = fp::add(sum, fp::mul(attention_factor<T>(a[i]), attention_factor<T>(row[d])));
  }
  return sum;
}

// The Host's replay of a warp's dot product (factors as attention_lane_dot takes them): the 32
// lanes' shares, then warp_allreduce's butterfly, whose value in lane 0 (and, fp32 addition being
// commutative, in every lane) is the tree below: at mask m = 16, 8, 4, 2, 1, lane i < m adds lane
// i + m.
template <class T, class A, class B>
float attention_dot_replay(const A* a, const B* b, int head_dim) {
  float lanes[warp_size];
  for (int l = 0; l < warp_size; ++l) {
    float sum = 0.0f;
    for (int d = l; d < head_dim; d += warp_size) {
      sum = fp::add(sum, fp::mul(attention_factor<T>(a[d]), attention_factor<T>(b[d])));
    }
    lanes[l] = sum;
  }
  for (int m = warp_size / 2; m > 0; m /= 2) {
    for (int i = 0; i < m; ++i) lanes[i] = fp::add(lanes[i], lanes[i + m]);
  }
  return lanes[0];
}

// The online softmax of one row over blocks of keys, in base 2: x_j = s_j * scale * log2(e),
// `max` the largest x so far, `sum` the sum of 2^(x_j - max) so far.
struct OnlineSoftmax {
  float max = attention_negative_infinity;
  float sum = 0.0f;

  // Takes in a block whose largest x is block_max; returns the factor by which everything summed
  // relative to the old maximum must be multiplied (0 for the first block: 2^-inf).
  ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float rescale(float block_max) {
    const float next = Max{}(max, block_max);
    const float factor = attention_exp2(fp::sub(max, next));
    max = next;
    sum = fp::mul(sum, factor);
    return factor;
  }
  // Adds key x (of the block last taken in) and returns its weight 2^(x - max), unrounded.
  ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float add(float x) {
    const float p = attention_exp2(fp::sub(x, max));
    sum = fp::add(sum, p);
    return p;
  }
  // log(sum_j exp(s_j scale)) = max ln 2 + log(sum).
  ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float logsumexp() const {
    return fp::add(fp::mul(max, attention_ln2), log_of(sum));
  }
};

// P_tj recomputed from the score and lse_t * log2(e).
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float attention_probability(float score, float scale_log2, float lse_log2) {
  return attention_exp2(fp::sub(fp::mul(score, scale_log2), lse_log2));
}

// dS_tj = P_tj (dP_tj - delta_t).
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float attention_score_grad(float p, float dp, float delta) {
  return fp::mul(p, fp::sub(dp, delta));
}

}  // namespace alloy::detail
