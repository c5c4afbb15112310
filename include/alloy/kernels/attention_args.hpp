// Causal multi-head self-attention, the arguments and the checks both backends make. For each
// batch b, head h and position t (queries attend to keys 0..t only):
//   forward   s_tj = scale * dot(q_t, k_j),  P_tj = exp(s_tj - lse_t),  lse_t = log(sum_{j<=t} exp(s_tj))
//             out_t = sum_{j<=t} P_tj v_j
//   backward  delta_t = dot(dout_t, out_t),  dP_tj = dot(dout_t, v_j),  dS_tj = P_tj (dP_tj - delta_t)
//             dq_t = scale sum_{j<=t} dS_tj k_j,  dk_j = scale sum_{t>=j} dS_tj q_t,  dv_j = sum_{t>=j} P_tj dout_t
// scale is 1/sqrt(head_dim) unless given. The forward keeps lse (fp32, [batch, heads, seq]) for the
// backward, which recomputes P from it: no seq x seq matrix is ever stored, on either backend.
//
// Every tensor is [batch, seq, heads, head_dim] at any strides: element (b, t, h, d) of q lives at
// q[b * batch + t * row + h * head + d] (AttentionStrides). GPT-2's fused QKV projection writes a
// row-major [batch * seq, 3 * channels] matrix; q, k and v are its three column blocks (q = qkv,
// k = qkv + channels, v = qkv + 2 * channels) with AttentionStrides::rows(3 * channels, seq,
// head_dim), and dq, dk, dv go into the same places of its gradient, so no transpose is copied.
// The attention output, rows of `channels`, is the next projection's input as it stands.
//
// Compute dtypes, as for matrix products (gemm_args.hpp): bf16 and fp16 (16-bit storage), fp32 and
// tf32 (float storage; AttentionArgs<tf32> holds float pointers). Products and softmax statistics
// are fp32; outputs are rounded once to the storage type. Two intermediate values are rounded to T
// too, as a tensor-core product needs them in T: P before it multiplies v (forward) and dout (dv),
// and dS before it multiplies k (dq) and q (dk). For tf32 every factor of every product is rounded
// to tf32 (round_to_tf32, to nearest even): q and k in the scores, dout and v in dP, P and v, dS
// and k, dS and q, P and dout; delta = dot(dout, out) stays fp32. For fp32 nothing is rounded but
// in fp32. Every path of a dtype rounds at the same points, so they differ only in the order of
// their fp32 sums and in exp2, except fp32 on the tensor cores, whose products are 3xTF32
// (below) rather than fp32 multiplications.
//
// Which Cuda kernels run (attention_uses_tensor_cores says it for given arguments):
//  - head_dim 64 or 128, every pointer 16-byte aligned and every stride a whole number of 16-byte
//    vectors (8 elements of bf16 or fp16, 4 of float): flash-style tiled kernels on the tensor
//    cores. bf16 and fp16: mma m16n8k16 (cuda/attention_flash.hpp). tf32: mma m16n8k8 on the
//    tf32-rounded factors. fp32: mma m16n8k8 three times per product (3xTF32, CUTLASS's
//    OpMultiplyAddFastF32: a = big + small with big = tf32(a) and small = tf32(a - big), and
//    a b ~ small_a big_b + big_a small_b + big_a big_b), whose products are within about 3 2^-22
//    of the exact one where an fp32 multiplication is within 2^-24 (cuda/attention_flash_f32.hpp);
//  - anything else: the row kernels (cuda/attention_rows.hpp), a warp per query or key row, any
//    head_dim up to 256, which give the Host reference's bits exactly (host/attention.hpp).
// Both are deterministic: every output element is summed by one thread in a fixed order; nothing
// is added atomically (attention.hpp says how the backward does without).
//
// Column parts (AttentionBackwardArgs::column_parts): the backward can also sum its outputs per
// column over tiles of 64 positions, for GPT-2's c_attn bias gradient (the column sums of dqkv,
// nn/attention.hpp), which a fold over the parts then finishes (column_sums_of_parts) instead of
// a pass over the whole gradient. For sequence b, tile t of positions 64 t..min(64 t + 64, seq) - 1,
// which = 0 (dq), 1 (dk) or 2 (dv), head h and dimension d, the part is
//   s = 0; s = fp32(s + float(x)) for x = the stored value at each position of the tile, in order
// at column_parts[(b tiles + t) 3 heads head_dim + which heads head_dim + h head_dim + d], tiles =
// ceil(seq / 64): in GPT-2's layout the index's last part is the dqkv column. The sums are of the
// values as stored (rounded to the storage type), in position order, so every path and both
// backends give the same parts for the same outputs: the tensor-core kernels sum each 64-row
// output tile where they staged it in shared memory, before their blocks end; the row kernels and
// the Host sum what they wrote, in a pass of their own.
#pragma once

#include <alloy/config.hpp>
#include <alloy/error.hpp>
#include <alloy/numeric/traits.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

namespace alloy {

// Where element (b, t, h, d) of a [batch, seq, heads, head_dim] tensor lives, in elements from its
// pointer: b * batch + t * row + h * head + d.
struct AttentionStrides {
  std::size_t batch = 0;
  std::size_t row = 0;
  std::size_t head = 0;

  // A row-major [batch * seq, row_length] matrix whose rows hold the heads side by side, head_dim
  // elements each: GPT-2's activations (row_length = channels) or one of q, k, v within the fused
  // QKV projection's output (row_length = 3 * channels).
  static constexpr AttentionStrides rows(std::size_t row_length, std::size_t seq, std::size_t head_dim) {
    return {seq * row_length, row_length, head_dim};
  }
  // A contiguous [batch, heads, seq, head_dim] tensor.
  static constexpr AttentionStrides heads_major(std::size_t heads, std::size_t seq, std::size_t head_dim) {
    return {heads * seq * head_dim, head_dim, seq * head_dim};
  }
};

// The forward pass: out and lse from q, k and v. T is the compute dtype: bf16, fp16, float or tf32,
// whose tensors hold storage_t<T> (float for tf32).
template <class T>
struct AttentionArgs {
  using value_type = storage_t<T>;

  std::size_t batch = 0;
  std::size_t heads = 0;
  std::size_t seq = 0;
  std::size_t head_dim = 0;
  float scale = 0.0f;  // the scores' factor; 0 means 1 / sqrt(head_dim)
  const value_type* q = nullptr;
  const value_type* k = nullptr;
  const value_type* v = nullptr;
  AttentionStrides qkv_strides = {};  // q's, k's and v's
  value_type* out = nullptr;
  AttentionStrides out_strides = {};
  float* lse = nullptr;  // [batch, heads, seq]: log(sum_j exp(s_tj)), for the backward; may be null
};

// The backward pass: dq, dk and dv (overwritten) from the forward's inputs, its out and lse, and
// dout, the gradient arriving at out (same strides as out).
template <class T>
struct AttentionBackwardArgs {
  using value_type = storage_t<T>;

  std::size_t batch = 0;
  std::size_t heads = 0;
  std::size_t seq = 0;
  std::size_t head_dim = 0;
  float scale = 0.0f;  // as in the forward pass
  const value_type* q = nullptr;
  const value_type* k = nullptr;
  const value_type* v = nullptr;
  AttentionStrides qkv_strides = {};
  const value_type* out = nullptr;
  const value_type* dout = nullptr;
  AttentionStrides out_strides = {};  // out's and dout's
  const float* lse = nullptr;
  value_type* dq = nullptr;
  value_type* dk = nullptr;
  value_type* dv = nullptr;
  AttentionStrides grad_strides = {};  // dq's, dk's and dv's
  // Cuda: device memory of attention_backward_scratch_floats(batch, heads, seq) floats (delta_t).
  // The Host backend does not use it and accepts null.
  float* scratch = nullptr;
  // When not null: attention_column_parts_floats(batch, heads, seq, head_dim) floats (memory of the
  // backend), written with the column sums of dq, dk and dv over each tile of 64 positions of each
  // sequence (the top of this file gives their order and layout); null computes none.
  float* column_parts = nullptr;
};

// Floats of scratch attention_backward needs: delta_t, one per query row.
inline std::size_t attention_backward_scratch_floats(std::size_t batch, std::size_t heads, std::size_t seq) {
  return batch * heads * seq;
}

// Positions per tile of AttentionBackwardArgs::column_parts: the tensor-core kernels' output tiles.
inline constexpr std::size_t attention_column_tile = 64;

// Tiles of attention_column_tile positions a sequence of seq positions takes (the last may be short).
ALLOY_HOST_DEVICE inline constexpr std::size_t attention_column_tiles(std::size_t seq) {
  return (seq + attention_column_tile - 1) / attention_column_tile;
}

// Floats of AttentionBackwardArgs::column_parts: for each sequence and tile, one per column of dq,
// dk and dv (3 heads head_dim).
ALLOY_HOST_DEVICE inline constexpr std::size_t attention_column_parts_floats(std::size_t batch, std::size_t heads,
                                                                             std::size_t seq, std::size_t head_dim) {
  return batch * attention_column_tiles(seq) * 3 * heads * head_dim;
}

namespace detail {

inline constexpr std::size_t attention_max_head_dim = 256;  // the row kernels: 8 dimensions per lane

template <class T>
inline constexpr bool attention_16_bit = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

// float storage: fp32 (3xTF32 on the tensor cores) and tf32.
template <class T>
inline constexpr bool attention_float_storage = std::is_same_v<T, float> || std::is_same_v<T, tf32>;

template <class T>
inline constexpr bool attention_dtype = attention_16_bit<T> || attention_float_storage<T>;

// Elements of T's storage in a 16-byte vector, the unit of the tensor-core kernels' copies.
template <class T>
inline constexpr std::size_t attention_vector_elements = 16 / sizeof(storage_t<T>);

template <class T>
std::string attention_where(const char* function) {
  return std::string(function) + "<" + numeric_traits<T>::name + ">: ";
}

// The factor the scores are multiplied by: the given one, or 1 / sqrt(head_dim).
inline float attention_scale(float scale, std::size_t head_dim) {
  return scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
}

inline std::string describe_strides(const AttentionStrides& s) {
  return "{batch " + std::to_string(s.batch) + ", row " + std::to_string(s.row) + ", head " + std::to_string(s.head) +
         "}";
}

// Whether distinct (b, t, h) of a tensor start head_dim-element runs that never overlap: taking the
// dimensions of extent above 1 from the smallest stride up, each stride is at least the span of
// the ones below it.
inline bool attention_rows_disjoint(const AttentionStrides& s, std::size_t batch, std::size_t seq, std::size_t heads,
                                    std::size_t head_dim) {
  struct Dimension {
    std::size_t stride, extent;
  };
  Dimension dims[3] = {{s.batch, batch}, {s.row, seq}, {s.head, heads}};
  std::sort(dims, dims + 3, [](Dimension x, Dimension y) { return x.stride < y.stride; });
  std::size_t span = head_dim;
  for (const Dimension& d : dims) {
    if (d.extent <= 1) continue;
    if (d.stride < span) return false;
    span += d.stride * (d.extent - 1);
  }
  return true;
}

inline bool aligned_16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

inline bool strides_in_vectors(const AttentionStrides& s, std::size_t elements_per_vector) {
  return s.batch % elements_per_vector == 0 && s.row % elements_per_vector == 0 && s.head % elements_per_vector == 0;
}

// The shape checks shared by the forward and the backward pass.
template <class Args>
void check_attention_shape(const std::string& where, const Args& a) {
  if (a.head_dim == 0 || a.head_dim > attention_max_head_dim) {
    throw error(where + "head_dim = " + std::to_string(a.head_dim) + " is outside 1.." +
                std::to_string(attention_max_head_dim) + ", the head sizes attention supports");
  }
  const float scale = attention_scale(a.scale, a.head_dim);
  if (!(scale > 0.0f) || !std::isfinite(scale)) {
    throw error(where + "scale = " + std::to_string(a.scale) + " must be positive and finite (0 gives 1/sqrt(" +
                std::to_string(a.head_dim) + "))");
  }
  if (a.seq > std::size_t(0x7fffffff)) {
    throw error(where + "seq = " + std::to_string(a.seq) + " is longer than 2^31 - 1 positions");
  }
}

template <class T>
void require_tensor(const std::string& where, const char* name, const T* p, const AttentionStrides& s) {
  if (p == nullptr) {
    throw error(where + name + " is null; it must point to a [batch, seq, heads, head_dim] tensor with strides " +
                describe_strides(s));
  }
}

template <class Args>
void require_disjoint(const std::string& where, const char* name, const AttentionStrides& s, const Args& a) {
  if (!attention_rows_disjoint(s, a.batch, a.seq, a.heads, a.head_dim)) {
    throw error(where + name + " " + describe_strides(s) +
                " make rows of distinct (batch, position, head) overlap for " + "batch " + std::to_string(a.batch) +
                ", seq " + std::to_string(a.seq) + ", heads " + std::to_string(a.heads) + ", head_dim " +
                std::to_string(a.head_dim) + "; an output must not");
  }
}

// Returns false when there is nothing to compute (an empty batch, head count or sequence).
template <class T>
bool check_attention_forward(const AttentionArgs<T>& a) {
  const std::string where = attention_where<T>("attention_forward");
  check_attention_shape(where, a);
  if (a.batch == 0 || a.heads == 0 || a.seq == 0) return false;
  require_tensor(where, "q", a.q, a.qkv_strides);
  require_tensor(where, "k", a.k, a.qkv_strides);
  require_tensor(where, "v", a.v, a.qkv_strides);
  require_tensor(where, "out", a.out, a.out_strides);
  require_disjoint(where, "out_strides", a.out_strides, a);
  return true;
}

template <class T>
bool check_attention_backward(const AttentionBackwardArgs<T>& a, bool needs_scratch) {
  const std::string where = attention_where<T>("attention_backward");
  check_attention_shape(where, a);
  if (a.batch == 0 || a.heads == 0 || a.seq == 0) return false;
  require_tensor(where, "q", a.q, a.qkv_strides);
  require_tensor(where, "k", a.k, a.qkv_strides);
  require_tensor(where, "v", a.v, a.qkv_strides);
  require_tensor(where, "out", a.out, a.out_strides);
  require_tensor(where, "dout", a.dout, a.out_strides);
  require_tensor(where, "dq", a.dq, a.grad_strides);
  require_tensor(where, "dk", a.dk, a.grad_strides);
  require_tensor(where, "dv", a.dv, a.grad_strides);
  require_disjoint(where, "grad_strides", a.grad_strides, a);
  if (a.lse == nullptr) {
    throw error(where + "lse is null; the backward pass needs the forward pass's logsumexp ([batch, heads, seq] = " +
                std::to_string(a.batch * a.heads * a.seq) + " floats)");
  }
  if (needs_scratch && a.scratch == nullptr) {
    throw error(where + "scratch is null; it needs attention_backward_scratch_floats(" + std::to_string(a.batch) +
                ", " + std::to_string(a.heads) + ", " + std::to_string(a.seq) +
                ") = " + std::to_string(attention_backward_scratch_floats(a.batch, a.heads, a.seq)) + " floats");
  }
  return true;
}

}  // namespace detail

// Whether the Cuda backend runs these arguments on the tensor cores (else on the row kernels).
template <class T>
bool attention_uses_tensor_cores(const AttentionArgs<T>& a) {
  constexpr std::size_t n = detail::attention_vector_elements<T>;
  return (a.head_dim == 64 || a.head_dim == 128) && detail::strides_in_vectors(a.qkv_strides, n) &&
         detail::strides_in_vectors(a.out_strides, n) && detail::aligned_16(a.q) && detail::aligned_16(a.k) &&
         detail::aligned_16(a.v) && detail::aligned_16(a.out);
}

template <class T>
bool attention_uses_tensor_cores(const AttentionBackwardArgs<T>& a) {
  constexpr std::size_t n = detail::attention_vector_elements<T>;
  return (a.head_dim == 64 || a.head_dim == 128) && detail::strides_in_vectors(a.qkv_strides, n) &&
         detail::strides_in_vectors(a.out_strides, n) && detail::strides_in_vectors(a.grad_strides, n) &&
         detail::aligned_16(a.q) && detail::aligned_16(a.k) && detail::aligned_16(a.v) && detail::aligned_16(a.out) &&
         detail::aligned_16(a.dout) && detail::aligned_16(a.dq) && detail::aligned_16(a.dk) && detail::aligned_16(a.dv);
}

}  // namespace alloy
