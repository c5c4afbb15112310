// Softmax cross-entropy over the rows of logits [rows, classes] (T: float, bf16 or fp16) with
// int32 targets, in fp32, and its fused backward:
//   row_loss[r] = logsumexp(x) - x[t] = log(sum_c exp(x_c - max)) + (max - x[t])
//   dlogits[r, c] = (softmax(x)_c - [c == t]) * grad_scale,  softmax(x)_c = exp(x_c - max) / sum
// with x the row, t = targets[r]. The loss is written as log(sum) + (max - x[t]), two terms >= 0,
// so nothing cancels, and max is subtracted before exp, so logits of any finite size are safe.
// A NaN logit makes its row's loss and gradient NaN; so does +infinity (as in PyTorch); -infinity
// is a logit of probability 0, and a row of them all has a NaN loss.
//
// A target outside [0, classes) gives row_loss = NaN and a NaN dlogits row: device code cannot
// throw, so the caller validates targets on the host when it needs an error.
//
// A language-model head (nn::LmHead) adds two things through SoftmaxCrossEntropyOptions:
//   - padded classes: only the first real_classes of each row's `classes` columns are classes.
//     The rest (a vocabulary padded to a multiple of 64 for the products) are never read, take
//     no probability, and get a zero gradient; a target must lie in [0, real_classes).
//   - an ignore index: a row whose target equals it has loss 0 and a zero gradient row (the
//     caller leaves it out of the mean).
// dlogits may be logits itself (the gradient written over the logits, in place): every element
// is read and then written by the same thread, and the target's logit is read before any thread
// writes.
//
// One pass finds the maximum and the sum together: each thread keeps (max, sum of exp(x - max))
// over its elements, rescaling its sum when a vector raises its maximum; the threads' pairs are
// then combined in a fixed order. A second pass writes dlogits. Both backends run the same
// per-thread code and the same combination order (the Host replays a block of 256 threads), and
// differ only in their expf/logf, so results are deterministic for given inputs and alignment.
#pragma once

#include <alloy/backend/cuda/launch.hpp>
#include <alloy/backend/reduce_ops.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>
#include <alloy/kernels/detail/rows.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/math.hpp>
#include <alloy/numeric/rounding.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

namespace alloy {

namespace detail {

inline constexpr int softmax_block = 256;  // threads sharing one row (the Host replays this many)

inline constexpr float negative_infinity = float_from_bits(0xff800000u);
inline constexpr float quiet_nan = float_from_bits(0x7fc00000u);

// A running maximum and the sum of exp(x - max) over the elements seen so far.
struct MaxSum {
  float max;
  float sum;
};

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE constexpr MaxSum empty_max_sum() { return {negative_infinity, 0.0f}; }

// e^d for d = x - max <= 0, as 2^(d log2(e)): CUDA's exp2f is a few instructions where expf is
// about ten, and the kernel, two exponentials per logit, was bound by them rather than by memory.
// The product d log2(e) is rounded alike on both backends; the result is within 2 ulp of
// 2^(that product), whose relative distance from e^d is at most |d| 2^-24 (a few ulp where d is
// small and the term matters; only negligible terms have large |d|).
inline constexpr float softmax_log2e = 1.44269504088896340736f;
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float softmax_exp(float d) { return exp2_of(fp::mul(d, softmax_log2e)); }

// s.sum expressed relative to a maximum m >= s.max.
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float rescaled_sum(MaxSum s, float m) {
  return s.max == m ? s.sum : fp::mul(s.sum, softmax_exp(fp::sub(s.max, m)));
}

// Combines two threads' pairs. Commutative bit for bit in `sum` (the two rescaled sums are
// added), as the warp butterfly needs.
struct CombineMaxSum {
  ALLOY_HOST_DEVICE MaxSum operator()(MaxSum a, MaxSum b) const {
    const float m = Max{}(a.max, b.max);
    if (m == negative_infinity) return {m, 0.0f};  // nothing but -infinity yet: -inf - -inf would be NaN
    return {m, fp::add(rescaled_sum(a, m), rescaled_sum(b, m))};
  }
};

// Thread `thread` of `threads`: (max, sum of exp(x - max)) over its share of the row.
template <class T>
ALLOY_HOST_DEVICE MaxSum softmax_thread_max_sum(const RowSplit& s, const T* x, std::size_t thread,
                                                std::size_t threads) {
  MaxSum acc = empty_max_sum();
  for_each_run<row_vector_lanes<T>>(s, thread, threads, [&](auto run, std::size_t first) {
    constexpr int W = decltype(run)::value;
    T v[W];
    load_run<W>(x + first, v);
    float m = acc.max;
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) m = Max{}(m, to_float(v[l]));
    if (m == negative_infinity) return;
    float sum = rescaled_sum(acc, m);
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) sum = fp::add(sum, softmax_exp(fp::sub(to_float(v[l]), m)));
    acc = {m, sum};
  });
  return acc;
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float cross_entropy_loss(MaxSum total, float target_logit) {
  return fp::add(log_of(total.sum), fp::sub(total.max, target_logit));
}

// Thread `thread` of `threads` writes its share of dlogits = softmax * grad_scale, the target's
// element included; softmax_target_gradient then writes the target's (softmax - 1) * grad_scale.
// (p - 0 is p: every other element has the bits of (softmax - onehot) * grad_scale; the compare
// with the target per element is gone from the loop.)
template <class T>
ALLOY_HOST_DEVICE void softmax_thread_gradient(const RowSplit& s, const T* x, T* dx, MaxSum total, float grad_scale,
                                               std::size_t thread, std::size_t threads) {
  const float inv_sum = fp::div(1.0f, total.sum);
  for_each_run<row_vector_lanes<T>>(s, thread, threads, [&](auto run, std::size_t first) {
    constexpr int W = decltype(run)::value;
    T v[W], d[W];
    load_run<W>(x + first, v);
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) {
      const float p = fp::mul(softmax_exp(fp::sub(to_float(v[l]), total.max)), inv_sum);
      d[l] = round_nearest<T>(fp::mul(p, grad_scale));
    }
    store_run<W>(dx + first, d);
  });
}

// The target's element of dlogits, (softmax - 1) * grad_scale, from its logit (read before
// anything was written: dx may be x), with the operations softmax_thread_gradient uses.
template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE T softmax_target_gradient(float target_logit, MaxSum total, float grad_scale) {
  const float inv_sum = fp::div(1.0f, total.sum);
  const float p = fp::mul(softmax_exp(fp::sub(target_logit, total.max)), inv_sum);
  return round_nearest<T>(fp::mul(fp::sub(p, 1.0f), grad_scale));
}

template <class T>
struct SoftmaxCrossEntropy {
  const T* logits;
  const std::int32_t* targets;
  std::size_t rows;
  std::size_t classes;       // columns per row (the row stride)
  std::size_t real_classes;  // the first real_classes columns are classes; the rest padding
  float* row_loss;
  T* dlogits;  // may be null (loss only), or logits itself
  float grad_scale;
  std::int32_t ignore_index;
  bool ignores;  // whether ignore_index is in use
  bool vectorized;
};

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE bool valid_target(std::int32_t t, std::size_t classes) {
  return t >= 0 && static_cast<std::size_t>(t) < classes;
}

template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE bool ignored_row(const SoftmaxCrossEntropy<T>& a, std::int32_t t) {
  return a.ignores && t == a.ignore_index;
}

// The Host reference: plain loops replaying a 256-thread block per row.
template <class T>
void softmax_cross_entropy_on(Host, const SoftmaxCrossEntropy<T>& a) {
  for (std::size_t r = 0; r < a.rows; ++r) {
    const T* x = a.logits + r * a.classes;
    T* dx = a.dlogits ? a.dlogits + r * a.classes : nullptr;
    const std::int32_t t = a.targets[r];
    if (ignored_row(a, t) || !valid_target(t, a.real_classes)) {
      const float fill = ignored_row(a, t) ? 0.0f : quiet_nan;
      a.row_loss[r] = fill;
      if (dx) {
        for (std::size_t c = 0; c < a.classes; ++c) dx[c] = round_nearest<T>(fill);
      }
      continue;
    }
    const RowSplit s = split_row(x, a.real_classes, a.vectorized);
    MaxSum threads[softmax_block];
    for (int i = 0; i < softmax_block; ++i) threads[i] = softmax_thread_max_sum(s, x, i, softmax_block);
    const MaxSum total = block_replay(threads, CombineMaxSum{});
    a.row_loss[r] = cross_entropy_loss(total, to_float(x[t]));
    if (dx) {
      const float target_logit = to_float(x[t]);
      softmax_thread_gradient(s, x, dx, total, a.grad_scale, 0, 1);
      dx[t] = softmax_target_gradient<T>(target_logit, total, a.grad_scale);
      for (std::size_t c = a.real_classes; c < a.classes; ++c) dx[c] = round_nearest<T>(0.0f);
    }
  }
}

#if ALLOY_HAS_CUDA_KERNELS

// A block per row. Per element: reads the logit twice (the second time from L2 when the row was
// too large for L1) and, with dlogits, writes sizeof(T). Per row: reads the target (4 bytes) and
// writes the loss (4 bytes). Padding columns are not read; with dlogits they are written (zeros).
// Block (threads per row) is softmax_block in the library, whose order the Host replays; the
// benchmarks time others.
template <class T, int Block = softmax_block>
__global__ void __launch_bounds__(Block) softmax_cross_entropy_kernel(SoftmaxCrossEntropy<T> a) {
  __shared__ MaxSum warp_totals[Block / warp_size];
  for (std::size_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const T* x = a.logits + r * a.classes;
    T* dx = a.dlogits ? a.dlogits + r * a.classes : nullptr;
    const std::int32_t t = a.targets[r];
    if (ignored_row(a, t) || !valid_target(t, a.real_classes)) {  // the same for the whole block
      const float fill = ignored_row(a, t) ? 0.0f : quiet_nan;
      if (threadIdx.x == 0) a.row_loss[r] = fill;
      if (dx) {
        for (std::size_t c = threadIdx.x; c < a.classes; c += Block) dx[c] = round_nearest<T>(fill);
      }
      continue;
    }
    // Read by every thread before block_allreduce's barrier, so before any thread writes dx (which
    // may be x).
    const float target_logit = to_float(x[t]);
    const RowSplit s = split_row(x, a.real_classes, a.vectorized);
    const MaxSum total =
        block_allreduce<Block>(softmax_thread_max_sum(s, x, threadIdx.x, Block), CombineMaxSum{}, warp_totals);
    if (threadIdx.x == 0) a.row_loss[r] = cross_entropy_loss(total, target_logit);
    if (dx) {
      softmax_thread_gradient(s, x, dx, total, a.grad_scale, threadIdx.x, Block);
      for (std::size_t c = a.real_classes + threadIdx.x; c < a.classes; c += Block) {
        dx[c] = round_nearest<T>(0.0f);
      }
    }
    __syncthreads();  // warp_totals is read by every thread before the next row writes it; dx[t] is written
    if (dx && threadIdx.x == 0) dx[t] = softmax_target_gradient<T>(target_logit, total, a.grad_scale);
  }
}

template <class T>
void softmax_cross_entropy_on(Cuda be, const SoftmaxCrossEntropy<T>& a) {
  if (a.rows == 0) return;
  softmax_cross_entropy_kernel<<<grid_for(a.rows, 1), softmax_block, 0, be.stream>>>(a);  // a row per block at a time
  ALLOY_CUDA_CHECK_LAUNCH();
}

#endif  // ALLOY_HAS_CUDA_KERNELS

}  // namespace detail

// What a language-model head adds to the plain softmax cross-entropy (see the top of this file).
struct SoftmaxCrossEntropyOptions {
  std::size_t real_classes = 0;  // classes before the padding columns; 0: every column is a class
  std::optional<std::int32_t> ignore_index = std::nullopt;  // rows with this target: loss 0, zero gradient
};

// row_loss[r] (fp32) for each of `rows` rows of `classes` logits and, when dlogits is not null,
// dlogits = (softmax - onehot(target)) * grad_scale in T. grad_scale is what the caller wants the
// gradient multiplied by (loss_scale / rows for a mean loss). Reduce row_loss with
// alloy::reduce_sum. dlogits may be logits (in place). On Cuda: device pointers, ordered on
// be.stream.
template <class T, class B>
void softmax_cross_entropy(B be, const T* logits, const std::int32_t* targets, std::size_t rows, std::size_t classes,
                           float* row_loss, T* dlogits, float grad_scale,
                           const SoftmaxCrossEntropyOptions& options = {}) {
  static_assert(backend<B>, "softmax_cross_entropy: B must be alloy::Host or alloy::Cuda");
  static_assert(detail::row_dtype<T>, "softmax_cross_entropy<T>: T must be float, bf16 or fp16");
  static_assert(detail::has_row_kernels<B>,
                "softmax_cross_entropy on Cuda: compile this translation unit with nvcc (the Cuda kernels need it)");
  if (classes == 0) throw error("softmax_cross_entropy: classes must be positive");
  const std::size_t real_classes = options.real_classes == 0 ? classes : options.real_classes;
  if (real_classes > classes) {
    throw error("softmax_cross_entropy: real_classes = " + std::to_string(real_classes) + " is more than the " +
                std::to_string(classes) + " columns of a row");
  }
  if (options.ignore_index && detail::valid_target(*options.ignore_index, real_classes)) {
    throw error("softmax_cross_entropy: the ignore index " + std::to_string(*options.ignore_index) +
                " is a class (in [0, " + std::to_string(real_classes) + ")); use a negative one");
  }
  if (rows == 0) return;
  if (!logits || !targets || !row_loss)
    throw error("softmax_cross_entropy: logits, targets and row_loss must not be null");
  // Rows are split at the logits' 16-byte boundaries; dlogits follows the same split.
  const bool vectorized = dlogits ? detail::same_alignment(logits, dlogits) : true;
  const detail::SoftmaxCrossEntropy<T> a{logits,
                                         targets,
                                         rows,
                                         classes,
                                         real_classes,
                                         row_loss,
                                         dlogits,
                                         grad_scale,
                                         options.ignore_index.value_or(0),
                                         options.ignore_index.has_value(),
                                         vectorized};
  detail::softmax_cross_entropy_on(be, a);
}

}  // namespace alloy
