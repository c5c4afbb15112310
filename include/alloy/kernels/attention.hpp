// Causal multi-head self-attention, forward and backward, with one call shape on both backends:
//   attention_forward(be, AttentionArgs<T>{...})          out and lse from q, k, v
//   attention_backward(be, AttentionBackwardArgs<T>{...}) dq, dk, dv from q, k, v, out, dout, lse
// T is the compute dtype: bf16, fp16, float (fp32) or tf32 (float storage, tf32 products), as a
// Precision's compute_type names it. The semantics, layouts and which kernels run are in
// attention_args.hpp; the Host reference in host/attention.hpp; the Cuda kernels in
// cuda/attention_flash.hpp (tensor cores, bf16 and fp16), cuda/attention_flash_f32.hpp (tensor
// cores, fp32 as 3xTF32 and tf32) and cuda/attention_rows.hpp (everything else).
//
// Determinism: no path adds anything atomically. The backward computes dq in one pass over query
// rows or tiles (each dq_t summed over its keys by one thread, in key order) and dk, dv in a second
// pass over key rows or tiles (each summed over its queries in order), recomputing P and dS in
// each, so the bits depend only on the inputs, the dtype and the path (which depends only on the
// arguments: dtype, head_dim, alignment and strides), never on the device's scheduling.
//
// Given column_parts, the backward also writes the column sums of dq, dk and dv over every tile of
// 64 positions (attention_args.hpp defines them: the stored values, in position order, so every
// path and both backends give the same parts for the same outputs): GPT-2's c_attn bias gradient,
// the column sums of dqkv, is then a fold over the parts (column_sums_of_parts,
// kernels/column_sums.hpp; nn/attention.hpp) instead of a pass over dqkv.
//
// On Cuda, pointers are device memory and the calls are ordered on be.stream; the backward's
// scratch holds delta_t between its two kernels. The Host backend needs no scratch.
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/kernels/attention_args.hpp>
#include <alloy/kernels/cuda/attention_flash.hpp>
#include <alloy/kernels/cuda/attention_flash_f32.hpp>
#include <alloy/kernels/cuda/attention_rows.hpp>
#include <alloy/kernels/host/attention.hpp>

#include <type_traits>

namespace alloy {

namespace detail {

// Whether this translation unit can run attention on backend B (Cuda needs nvcc).
template <class B>
inline constexpr bool has_attention_kernels = std::is_same_v<B, Host> || (backend<B> && ALLOY_HAS_CUDA_KERNELS);

#if ALLOY_HAS_CUDA_KERNELS

template <class T, int D>
void attention_forward_on_tensor_cores(Cuda be, const AttentionArgs<T>& a, float scale) {
  if constexpr (attention_16_bit<T>) {
    flash_forward<T, D>(be, a, scale);
  } else {
    flash_float_forward<T, D>(be, a, scale);
  }
}

template <class T, int D>
void attention_backward_on_tensor_cores(Cuda be, const AttentionBackwardArgs<T>& a, float scale) {
  if constexpr (attention_16_bit<T>) {
    flash_backward<T, D>(be, a, scale);
  } else {
    flash_float_backward<T, D>(be, a, scale);
  }
}

template <class T>
void attention_forward_on(Cuda be, const AttentionArgs<T>& a, float scale) {
  if (!attention_uses_tensor_cores(a)) {
    attention_forward_rows(be, a, scale);
  } else if (a.head_dim == 64) {
    attention_forward_on_tensor_cores<T, 64>(be, a, scale);
  } else {
    attention_forward_on_tensor_cores<T, 128>(be, a, scale);
  }
}

template <class T>
void attention_backward_on(Cuda be, const AttentionBackwardArgs<T>& a, float scale) {
  if (!attention_uses_tensor_cores(a)) {
    attention_backward_rows(be, a, scale);
  } else if (a.head_dim == 64) {
    attention_backward_on_tensor_cores<T, 64>(be, a, scale);
  } else {
    attention_backward_on_tensor_cores<T, 128>(be, a, scale);
  }
}

#endif  // ALLOY_HAS_CUDA_KERNELS

}  // namespace detail

// out (and lse, when not null) for causal self-attention over q, k and v.
template <class T, class B>
void attention_forward(B be, const AttentionArgs<T>& a) {
  static_assert(backend<B>, "attention_forward: B must be alloy::Host or alloy::Cuda");
  static_assert(detail::attention_dtype<T>, "attention_forward<T>: T must be float, tf32, bf16 or fp16");
  static_assert(detail::has_attention_kernels<B>,
                "attention_forward on Cuda: compile this translation unit with nvcc (the Cuda kernels need it)");
  if constexpr (detail::attention_dtype<T> && detail::has_attention_kernels<B>) {
    if (!detail::check_attention_forward(a)) return;
    detail::attention_forward_on(be, a, detail::attention_scale(a.scale, a.head_dim));
  }
}

// dq, dk and dv (overwritten) for the forward pass that gave out and lse, and the gradient dout.
template <class T, class B>
void attention_backward(B be, const AttentionBackwardArgs<T>& a) {
  static_assert(backend<B>, "attention_backward: B must be alloy::Host or alloy::Cuda");
  static_assert(detail::attention_dtype<T>, "attention_backward<T>: T must be float, tf32, bf16 or fp16");
  static_assert(detail::has_attention_kernels<B>,
                "attention_backward on Cuda: compile this translation unit with nvcc (the Cuda kernels need it)");
  if constexpr (detail::attention_dtype<T> && detail::has_attention_kernels<B>) {  // only the assertion above
    if (!detail::check_attention_backward(a, !std::is_same_v<B, Host>)) return;
    detail::attention_backward_on(be, a, detail::attention_scale(a.scale, a.head_dim));
  }
}

}  // namespace alloy
