// Causal multi-head self-attention, forward and backward, with one call shape on both backends:
//   attention_forward(be, AttentionArgs<T>{...})          out and lse from q, k, v
//   attention_backward(be, AttentionBackwardArgs<T>{...}) dq, dk, dv from q, k, v, out, dout, lse
// The semantics, layouts and which kernels run are in attention_args.hpp; the Host reference in
// host/attention.hpp; the Cuda kernels in cuda/attention_flash.hpp (tensor cores) and
// cuda/attention_rows.hpp (everything else).
//
// Determinism: no path adds anything atomically. The backward computes dq in one pass over query
// rows or tiles (each dq_t summed over its keys by one thread, in key order) and dk, dv in a second
// pass over key rows or tiles (each summed over its queries in order), recomputing P and dS in
// each, so the bits depend only on the inputs, the dtype and the path (which depends only on the
// arguments: dtype, head_dim, alignment and strides), never on the device's scheduling.
//
// On Cuda, pointers are device memory and the calls are ordered on be.stream; the backward's
// scratch holds delta_t between its two kernels. The Host backend needs no scratch.
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/kernels/attention_args.hpp>
#include <alloy/kernels/cuda/attention_flash.hpp>
#include <alloy/kernels/cuda/attention_rows.hpp>
#include <alloy/kernels/host/attention.hpp>

#include <type_traits>

namespace alloy {

namespace detail {

// Whether this translation unit can run attention on backend B (Cuda needs nvcc).
template <class B>
inline constexpr bool has_attention_kernels = std::is_same_v<B, Host> || (backend<B> && ALLOY_HAS_CUDA_KERNELS);

#if ALLOY_HAS_CUDA_KERNELS

template <class T>
void attention_forward_on(Cuda be, const AttentionArgs<T>& a, float scale) {
  if constexpr (attention_tensor_core_dtype<T>) {
    if (attention_uses_tensor_cores(a)) {
      if (a.head_dim == 64) {
        flash_forward<T, 64>(be, a, scale);
      } else {
        flash_forward<T, 128>(be, a, scale);
      }
      return;
    }
  }
  attention_forward_rows(be, a, scale);
}

template <class T>
void attention_backward_on(Cuda be, const AttentionBackwardArgs<T>& a, float scale) {
  if constexpr (attention_tensor_core_dtype<T>) {
    if (attention_uses_tensor_cores(a)) {
      if (a.head_dim == 64) {
        flash_backward<T, 64>(be, a, scale);
      } else {
        flash_backward<T, 128>(be, a, scale);
      }
      return;
    }
  }
  attention_backward_rows(be, a, scale);
}

#endif  // ALLOY_HAS_CUDA_KERNELS

}  // namespace detail

// out (and lse, when not null) for causal self-attention over q, k and v.
template <class T, class B>
void attention_forward(B be, const AttentionArgs<T>& a) {
  static_assert(backend<B>, "attention_forward: B must be alloy::Host or alloy::Cuda");
  static_assert(detail::attention_dtype<T>, "attention_forward<T>: T must be float, bf16 or fp16");
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
  static_assert(detail::attention_dtype<T>, "attention_backward<T>: T must be float, bf16 or fp16");
  static_assert(detail::has_attention_kernels<B>,
                "attention_backward on Cuda: compile this translation unit with nvcc (the Cuda kernels need it)");
  if constexpr (detail::attention_dtype<T> && detail::has_attention_kernels<B>) {  // only the assertion above
    if (!detail::check_attention_backward(a, !std::is_same_v<B, Host>)) return;
    detail::attention_backward_on(be, a, detail::attention_scale(a.scale, a.head_dim));
  }
}

}  // namespace alloy
