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
// differ only in their exp2f/logf, so results are deterministic for given inputs and alignment.
// On Cuda, a row whose 16-byte vectors give each of the 256 threads at most
// softmax_register_vectors of them (bf16 and fp16 rows up to 51207 classes, float up to 25603:
// GPT-2's vocabulary in bf16) is read once, into registers, and the gradient written from them;
// longer rows, and rows whose logits and dlogits are not equally aligned, are read twice. Both
// kernels perform the same operations in the same order, so they give the same bits.
#pragma once

#include <alloy/backend/cuda/launch.hpp>
#include <alloy/backend/reduce_ops.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>
#include <alloy/kernels/detail/rows.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/math.hpp>
#include <alloy/numeric/rounding.hpp>

#include <algorithm>
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

// One run of W consecutive elements added to a thread's (max, sum): the step both kernels and the
// Host take, so their per-thread sums are the same operations in the same order.
template <int W, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE MaxSum add_run(MaxSum acc, const T (&v)[W]) {
  float m = acc.max;
  ALLOY_UNROLL
  for (int l = 0; l < W; ++l) m = Max{}(m, to_float(v[l]));
  if (m == negative_infinity) return acc;
  float sum = rescaled_sum(acc, m);
  ALLOY_UNROLL
  for (int l = 0; l < W; ++l) sum = fp::add(sum, softmax_exp(fp::sub(to_float(v[l]), m)));
  return {m, sum};
}

// Thread `thread` of `threads`: (max, sum of exp(x - max)) over its share of the row.
template <class T>
ALLOY_HOST_DEVICE MaxSum softmax_thread_max_sum(const RowSplit& s, const T* x, std::size_t thread,
                                                std::size_t threads) {
  MaxSum acc = empty_max_sum();
  for_each_run<row_vector_lanes<T>>(s, thread, threads, [&](auto run, std::size_t first) {
    constexpr int W = decltype(run)::value;
    T v[W];
    load_run<W>(x + first, v);
    acc = add_run(acc, v);
  });
  return acc;
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float cross_entropy_loss(MaxSum total, float target_logit) {
  return fp::add(log_of(total.sum), fp::sub(total.max, target_logit));
}

// dlogits of one run but the target's: softmax * grad_scale, inv_sum = 1 / total.sum.
template <int W, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void gradient_run(const T (&v)[W], T (&d)[W], float max, float inv_sum,
                                                      float grad_scale) {
  ALLOY_UNROLL
  for (int l = 0; l < W; ++l) {
    const float p = fp::mul(softmax_exp(fp::sub(to_float(v[l]), max)), inv_sum);
    d[l] = round_nearest<T>(fp::mul(p, grad_scale));
  }
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
    gradient_run(v, d, total.max, inv_sum, grad_scale);
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

// The most 16-byte vectors of a row one thread of the register kernel holds: 25 x 16 bytes is
// 100 registers, what two blocks of 256 threads per multiprocessor leave room for (128 a thread).
// 25 x 256 vectors hold GPT-2's 50257 classes in bf16 (6282 vectors).
inline constexpr int softmax_register_vectors = 25;

// The Cuda kernel a row takes: `registers` reads it once into registers, `two_reads` walks it
// twice (rows longer than the registers hold, and rows not split into vectors).
enum class SoftmaxKernel { registers, two_reads };

// A row of `real_classes` classes split into vectors (its logits and dlogits equally aligned)
// has at most real_classes / lanes vectors, the count of a row that starts on a 16-byte boundary.
template <class T>
constexpr SoftmaxKernel softmax_kernel_for(std::size_t real_classes, bool vectorized) {
  constexpr std::size_t lanes = row_vector_lanes<T>;
  const bool fits = real_classes / lanes <= std::size_t(softmax_block) * softmax_register_vectors;
  return vectorized && lanes > 1 && fits ? SoftmaxKernel::registers : SoftmaxKernel::two_reads;
}

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
template <class T>
__global__ void __launch_bounds__(softmax_block) softmax_cross_entropy_kernel(SoftmaxCrossEntropy<T> a) {
  __shared__ MaxSum warp_totals[softmax_block / warp_size];
  for (std::size_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const T* x = a.logits + r * a.classes;
    T* dx = a.dlogits ? a.dlogits + r * a.classes : nullptr;
    const std::int32_t t = a.targets[r];
    if (ignored_row(a, t) || !valid_target(t, a.real_classes)) {  // the same for the whole block
      const float fill = ignored_row(a, t) ? 0.0f : quiet_nan;
      if (threadIdx.x == 0) a.row_loss[r] = fill;
      if (dx) {
        for (std::size_t c = threadIdx.x; c < a.classes; c += softmax_block) dx[c] = round_nearest<T>(fill);
      }
      continue;
    }
    // Read by every thread before block_allreduce's barrier, so before any thread writes dx (which
    // may be x).
    const float target_logit = to_float(x[t]);
    const RowSplit s = split_row(x, a.real_classes, a.vectorized);
    const MaxSum total = block_allreduce<softmax_block>(softmax_thread_max_sum(s, x, threadIdx.x, softmax_block),
                                                        CombineMaxSum{}, warp_totals);
    if (threadIdx.x == 0) a.row_loss[r] = cross_entropy_loss(total, target_logit);
    if (dx) {
      softmax_thread_gradient(s, x, dx, total, a.grad_scale, threadIdx.x, softmax_block);
      for (std::size_t c = a.real_classes + threadIdx.x; c < a.classes; c += softmax_block) {
        dx[c] = round_nearest<T>(0.0f);
      }
    }
    __syncthreads();  // warp_totals is read by every thread before the next row writes it; dx[t] is written
    if (dx && threadIdx.x == 0) dx[t] = softmax_target_gradient<T>(target_logit, total, a.grad_scale);
  }
}

// Blocks of the register kernel a multiprocessor holds: its __launch_bounds__, which cap it at
// 128 registers a thread, and its grid per multiprocessor.
inline constexpr int softmax_register_blocks_per_sm = 2;

// The same values as softmax_cross_entropy_kernel with one read of the logits: a block per row,
// each thread's share of a vectorized row (at most one head element, at most MaxVectors vectors,
// at most one tail element: a head or tail is shorter than a vector) loaded into registers at
// once, so a thread has all its 16-byte loads in flight; (max, sum) taken over them in
// for_each_run's order; dlogits written from them. Per element: reads sizeof(T) once and, with
// dlogits, writes sizeof(T). Per row: reads the target (4 bytes) and writes the loss (4 bytes).
// Registers cannot be indexed at run time, so the loops are unrolled over MaxVectors and each
// step tests the thread's count.
template <class T, int MaxVectors>
__global__ void __launch_bounds__(softmax_block, softmax_register_blocks_per_sm)
    softmax_cross_entropy_registers_kernel(SoftmaxCrossEntropy<T> a) {
  constexpr int L = row_vector_lanes<T>;
  static_assert(L > 1 && L < softmax_block, "a head and a tail must be one element a thread at most");
  __shared__ MaxSum warp_totals[softmax_block / warp_size];
  const std::size_t thread = threadIdx.x;
  for (std::size_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const T* x = a.logits + r * a.classes;
    T* dx = a.dlogits ? a.dlogits + r * a.classes : nullptr;
    const std::int32_t t = a.targets[r];
    if (ignored_row(a, t) || !valid_target(t, a.real_classes)) {  // the same for the whole block
      const float fill = ignored_row(a, t) ? 0.0f : quiet_nan;
      if (thread == 0) a.row_loss[r] = fill;
      if (dx) {
        for (std::size_t c = thread; c < a.classes; c += softmax_block) dx[c] = round_nearest<T>(fill);
      }
      continue;
    }
    const float target_logit = to_float(x[t]);  // before block_allreduce's barrier, so before any write
    const RowSplit s = split_row(x, a.real_classes, true);
    const std::size_t tail = s.head + s.vectors * L + thread;
    const bool has_head = thread < s.head, has_tail = tail < s.length;
    const int count = thread < s.vectors ? int((s.vectors - thread + softmax_block - 1) / softmax_block) : 0;
    const std::size_t first = s.head + thread * L;  // the thread's vector i starts at first + i * 256 L
    T head[1], last[1], v[MaxVectors][L];
    if (has_head) head[0] = x[thread];
    ALLOY_UNROLL
    for (int i = 0; i < MaxVectors; ++i) {
      if (i < count) load_run<L>(x + first + std::size_t(i) * softmax_block * L, v[i]);
    }
    if (has_tail) last[0] = x[tail];

    MaxSum acc = empty_max_sum();
    if (has_head) acc = add_run(acc, head);
    ALLOY_UNROLL
    for (int i = 0; i < MaxVectors; ++i) {
      if (i < count) acc = add_run(acc, v[i]);
    }
    if (has_tail) acc = add_run(acc, last);
    const MaxSum total = block_allreduce<softmax_block>(acc, CombineMaxSum{}, warp_totals);
    if (thread == 0) a.row_loss[r] = cross_entropy_loss(total, target_logit);
    if (dx) {
      const float inv_sum = fp::div(1.0f, total.sum);
      if (has_head) {
        T d[1];
        gradient_run(head, d, total.max, inv_sum, a.grad_scale);
        dx[thread] = d[0];
      }
      ALLOY_UNROLL
      for (int i = 0; i < MaxVectors; ++i) {
        if (i < count) {
          T d[L];
          gradient_run(v[i], d, total.max, inv_sum, a.grad_scale);
          store_run<L>(dx + first + std::size_t(i) * softmax_block * L, d);
        }
      }
      if (has_tail) {
        T d[1];
        gradient_run(last, d, total.max, inv_sum, a.grad_scale);
        dx[tail] = d[0];
      }
      for (std::size_t c = a.real_classes + thread; c < a.classes; c += softmax_block) dx[c] = round_nearest<T>(0.0f);
    }
    __syncthreads();  // warp_totals is read by every thread before the next row writes it; dx[t] is written
    if (dx && thread == 0) dx[t] = softmax_target_gradient<T>(target_logit, total, a.grad_scale);
  }
}

// Launches `kernel` for `a`: softmax_cross_entropy_on picks it with softmax_kernel_for; tests
// and benchmarks name it.
template <class T>
void launch_softmax_cross_entropy(Cuda be, const SoftmaxCrossEntropy<T>& a, SoftmaxKernel kernel) {
  if (kernel == SoftmaxKernel::registers) {
    if (softmax_kernel_for<T>(a.real_classes, a.vectorized) != SoftmaxKernel::registers) {
      throw error("softmax_cross_entropy: a row of " + std::to_string(a.real_classes) +
                  " classes does not fit the register kernel");
    }
    if (a.rows == 0) return;
    const int grid = static_cast<int>(
        std::min<std::size_t>(a.rows, std::size_t(current_device_sm_count()) * softmax_register_blocks_per_sm));
    softmax_cross_entropy_registers_kernel<T, softmax_register_vectors><<<grid, softmax_block, 0, be.stream>>>(a);
  } else {
    if (a.rows == 0) return;
    softmax_cross_entropy_kernel<<<grid_for(a.rows, 1), softmax_block, 0, be.stream>>>(a);  // a row per block at a time
  }
  ALLOY_CUDA_CHECK_LAUNCH();
}

template <class T>
void softmax_cross_entropy_on(Cuda be, const SoftmaxCrossEntropy<T>& a) {
  launch_softmax_cross_entropy(be, a, softmax_kernel_for<T>(a.real_classes, a.vectorized));
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
