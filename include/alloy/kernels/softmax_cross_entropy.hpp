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
// Two Cuda kernels, chosen by the arguments alone (the dtype, real_classes and whether logits and
// dlogits share their 16-byte phase), never by the device:
//   - the register kernel, for vectorized rows of up to 1024 x 7 16-byte vectors (57344 bf16 or
//     fp16 classes, 28672 float): a block of 1024 threads reads the row once into registers; each
//     thread takes the maximum of what it holds, then the sum of exp(x - max); the threads' pairs
//     are combined by two levels of warp butterflies; dlogits is computed from the registers.
//   - the row-walking kernel, for every other row: a block of 256 threads reads the row twice. In
//     one pass each thread keeps (max, sum of exp(x - max)) over its elements, rescaling its sum
//     when a vector raises its maximum; the threads' pairs are folded in a fixed order. A second
//     pass writes dlogits.
// The Host replays the kernel the same arguments choose on Cuda: the same per-thread code, the
// same split of the row among threads and the same combination order. The backends differ only
// in their expf/logf, so results are deterministic for given inputs and alignment.
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
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>

namespace alloy {

namespace detail {

inline constexpr int softmax_block = 256;           // threads sharing one row in the row-walking kernel
inline constexpr int softmax_register_vectors = 7;  // 16-byte vectors per thread in the register kernel

inline constexpr float negative_infinity = float_from_bits(0xff800000u);
inline constexpr float quiet_nan = float_from_bits(0x7fc00000u);

// A running maximum and the sum of exp(x - max) over the elements seen so far.
struct MaxSum {
  float max;
  float sum;
};

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE constexpr MaxSum empty_max_sum() { return {negative_infinity, 0.0f}; }

// s.sum expressed relative to a maximum m >= s.max.
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float rescaled_sum(MaxSum s, float m) {
  return s.max == m ? s.sum : fp::mul(s.sum, exp_of(fp::sub(s.max, m)));
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
    for (int l = 0; l < W; ++l) sum = fp::add(sum, exp_of(fp::sub(to_float(v[l]), m)));
    acc = {m, sum};
  });
  return acc;
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float cross_entropy_loss(MaxSum total, float target_logit) {
  return fp::add(log_of(total.sum), fp::sub(total.max, target_logit));
}

// Thread `thread` of `threads` writes its share of dlogits = (softmax - onehot(target)) * grad_scale.
template <class T>
ALLOY_HOST_DEVICE void softmax_thread_gradient(const RowSplit& s, const T* x, T* dx, MaxSum total, std::size_t target,
                                               float grad_scale, std::size_t thread, std::size_t threads) {
  const float inv_sum = fp::div(1.0f, total.sum);
  for_each_run<row_vector_lanes<T>>(s, thread, threads, [&](auto run, std::size_t first) {
    constexpr int W = decltype(run)::value;
    T v[W], d[W];
    load_run<W>(x + first, v);
    ALLOY_UNROLL
    for (int l = 0; l < W; ++l) {
      const float p = fp::mul(exp_of(fp::sub(to_float(v[l]), total.max)), inv_sum);
      const float onehot = first + l == target ? 1.0f : 0.0f;
      d[l] = round_nearest<T>(fp::mul(fp::sub(p, onehot), grad_scale));
    }
    store_run<W>(dx + first, d);
  });
}

// Whether rows of real_classes classes take the register kernel: the rows are vectorized and none
// has more than softmax_register_vectors vectors per thread of a wide_block (a head and a tail,
// each shorter than a vector, add at most one element per thread).
template <class T>
constexpr bool softmax_in_registers(std::size_t real_classes, bool vectorized) {
  return vectorized && real_classes <= std::size_t(wide_block) * softmax_register_vectors * row_vector_lanes<T>;
}

// What thread `thread` of the register kernel holds of a row: head element `thread`, vectors
// thread + 1024 k for k < count, tail element `thread` (for_each_run's runs for 1024 threads).
// A vector is kept as its four 32-bit words, two 16-bit elements to a register (as T elements,
// each would take a register of its own).
template <class T>
struct HeldRow {
  static constexpr int lanes = row_vector_lanes<T>;
  std::uint32_t vectors[softmax_register_vectors][4];
  T head, tail;
  int count;
  bool has_head, has_tail;
};

// Element l of a vector held as words (little-endian on both backends: element 0 is the low half).
template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float held_element(const std::uint32_t (&words)[4], int l) {
  if constexpr (std::is_same_v<T, float>) {
    return float_from_bits(words[l]);
  } else if constexpr (std::is_same_v<T, bf16>) {
    const std::uint32_t w = words[l / 2];
    return float_from_bits(l % 2 == 0 ? w << 16 : w & 0xffff0000u);
  } else {
    return to_float(T::from_bits(static_cast<std::uint16_t>(words[l / 2] >> (16 * (l % 2)))));
  }
}

template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void load_held_vector(const T* p, std::uint32_t (&words)[4]) {
#if ALLOY_DEVICE_CODE && ALLOY_HAS_CUDA_KERNELS
  load_vector(reinterpret_cast<const std::uint32_t*>(p), words);
#else
  std::memcpy(words, p, sizeof(words));
#endif
}

// Where vector k of `thread` starts, for rows in registers (indices within a row fit 32 bits,
// which keeps addresses out of the registers the row needs).
template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE std::uint32_t held_vector_first(const RowSplit& s, std::uint32_t thread, int k) {
  return static_cast<std::uint32_t>(s.head) + (thread + std::uint32_t(k) * wide_block) * HeldRow<T>::lanes;
}

template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE std::uint32_t held_tail_index(const RowSplit& s, std::uint32_t thread) {
  return static_cast<std::uint32_t>(s.head + s.vectors * HeldRow<T>::lanes) + thread;
}

// Loads what `thread` holds of row x, every load issued before any value is used.
template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE HeldRow<T> load_held_row(const RowSplit& s, const T* x, std::uint32_t thread) {
  HeldRow<T> h;
  const auto vectors = static_cast<std::uint32_t>(s.vectors);
  h.count = thread < vectors ? static_cast<int>((vectors - thread + wide_block - 1) / wide_block) : 0;
  ALLOY_UNROLL
  for (int k = 0; k < softmax_register_vectors; ++k) {
    if (k < h.count) load_held_vector(x + held_vector_first<T>(s, thread, k), h.vectors[k]);
  }
  const std::uint32_t tail = held_tail_index<T>(s, thread);
  h.has_head = thread < s.head;
  h.has_tail = tail < s.length;
  h.head = h.has_head ? x[thread] : T{};
  h.tail = h.has_tail ? x[tail] : T{};
  return h;
}

// (max, sum of exp(x - max)) over what a thread holds: the maximum first, then the sum, each in
// the order head, vectors, tail.
template <class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE MaxSum held_max_sum(const HeldRow<T>& h) {
  float m = negative_infinity;
  if (h.has_head) m = Max{}(m, to_float(h.head));
  ALLOY_UNROLL
  for (int k = 0; k < softmax_register_vectors; ++k) {
    if (k >= h.count) continue;
    ALLOY_UNROLL
    for (int l = 0; l < HeldRow<T>::lanes; ++l) m = Max{}(m, held_element<T>(h.vectors[k], l));
  }
  if (h.has_tail) m = Max{}(m, to_float(h.tail));
  if (m == negative_infinity) return {m, 0.0f};  // nothing held, or nothing but -infinity
  float sum = 0.0f;
  if (h.has_head) sum = fp::add(sum, exp_of(fp::sub(to_float(h.head), m)));
  ALLOY_UNROLL
  for (int k = 0; k < softmax_register_vectors; ++k) {
    if (k >= h.count) continue;
    ALLOY_UNROLL
    for (int l = 0; l < HeldRow<T>::lanes; ++l) {
      sum = fp::add(sum, exp_of(fp::sub(held_element<T>(h.vectors[k], l), m)));
    }
  }
  if (h.has_tail) sum = fp::add(sum, exp_of(fp::sub(to_float(h.tail), m)));
  return {m, sum};
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

// The Host reference: plain loops replaying, per row, the block of the kernel Cuda would run.
template <class T>
void softmax_cross_entropy_on(Host, const SoftmaxCrossEntropy<T>& a) {
  const bool in_registers = softmax_in_registers<T>(a.real_classes, a.vectorized);
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
    MaxSum total;
    if (in_registers) {
      MaxSum threads[wide_block];
      for (std::uint32_t i = 0; i < wide_block; ++i) threads[i] = held_max_sum(load_held_row(s, x, i));
      total = wide_block_replay(threads, CombineMaxSum{});
    } else {
      MaxSum threads[softmax_block];
      for (int i = 0; i < softmax_block; ++i) threads[i] = softmax_thread_max_sum(s, x, i, softmax_block);
      total = block_replay(threads, CombineMaxSum{});
    }
    // The gradient of an element does not depend on the thread that computes it.
    a.row_loss[r] = cross_entropy_loss(total, to_float(x[t]));
    if (dx) {
      softmax_thread_gradient(s, x, dx, total, static_cast<std::size_t>(t), a.grad_scale, 0, 1);
      for (std::size_t c = a.real_classes; c < a.classes; ++c) dx[c] = round_nearest<T>(0.0f);
    }
  }
}

#if ALLOY_HAS_CUDA_KERNELS

// dlogits from what a thread holds. p - 0 is p, bit for bit, so only the target's element
// subtracts its one (the same values as softmax_thread_gradient's).
template <class T>
__device__ ALLOY_FORCEINLINE void held_gradient(const HeldRow<T>& h, const RowSplit& s, T* dx, MaxSum total,
                                                std::uint32_t target, float grad_scale, std::uint32_t thread) {
  constexpr int L = HeldRow<T>::lanes;
  const float inv_sum = fp::div(1.0f, total.sum);
  const auto probability = [&](float v) { return fp::mul(exp_of(fp::sub(v, total.max)), inv_sum); };
  const auto gradient = [&](float v, std::uint32_t i) {
    const float p = probability(v);
    return round_nearest<T>(fp::mul(i == target ? fp::sub(p, 1.0f) : p, grad_scale));
  };
  if (h.has_head) dx[thread] = gradient(to_float(h.head), thread);
  ALLOY_UNROLL
  for (int k = 0; k < softmax_register_vectors; ++k) {
    if (k >= h.count) continue;
    const std::uint32_t first = held_vector_first<T>(s, thread, k);
    T d[L];
    ALLOY_UNROLL
    for (int l = 0; l < L; ++l) {
      d[l] = round_nearest<T>(fp::mul(probability(held_element<T>(h.vectors[k], l)), grad_scale));
    }
    if (target - first < std::uint32_t(L)) {  // this vector holds the target (unsigned: target >= first)
      ALLOY_UNROLL
      for (int l = 0; l < L; ++l) {
        if (first + l == target) d[l] = gradient(held_element<T>(h.vectors[k], l), target);
      }
    }
    store_run<L>(dx + first, d);
  }
  const std::uint32_t tail = held_tail_index<T>(s, thread);
  if (h.has_tail) dx[tail] = gradient(to_float(h.tail), tail);
}

// Thread i of 1024 asks L2 for lines i, i + 1024, ... of the first `length` elements of row x.
template <class T>
__device__ ALLOY_FORCEINLINE void prefetch_row_l2(const T* x, std::size_t length) {
  constexpr std::uintptr_t line = 128;
  const std::uintptr_t end = reinterpret_cast<std::uintptr_t>(x + length);
  for (std::uintptr_t p = reinterpret_cast<std::uintptr_t>(x) / line * line + threadIdx.x * line; p < end;
       p += wide_block * line) {
    prefetch_l2(reinterpret_cast<const void*>(p));
  }
}

// The register kernel: a block of 1024 threads per row, rows one after another. Per element: reads
// the logit once (from L2 when the prefetch brought it there) and, with dlogits, writes sizeof(T).
// Per row: reads the target (4 bytes) and writes the loss (4 bytes). Padding columns are not read;
// with dlogits they are written (zeros).
//
// Occupancy. GPT-2's rows (50257 bf16 logits, 100 KB) are 25K of a multiprocessor's 64K 32-bit
// registers: one row fits per multiprocessor, never two. Two blocks of 1024 threads would leave
// 32 registers a thread, 28 of them the row's 7 vectors; so one block per multiprocessor, up to
// 64 registers a thread. Each thread issues its 7 16-byte loads before using any: 1024 x 112 B =
// 114 KB in flight per multiprocessor as a row starts, far above the ~30 KB an H200
// multiprocessor needs to keep HBM busy. Between two rows' loads, though, a block computes (two
// exps per element: ~6 us a row, against ~7.5 us to read and write 100 KB at a 132nd of
// 3.6 TB/s), and its HBM traffic would stop; so each block asks L2 for its next row
// (prefetch.global.L2: no registers) as it starts a row, and warps that finish a row go on to the
// next without waiting for the others (the warp totals alternate between two buffers, so a row
// ends without a barrier). 132 blocks x 2 rows of 100 KB = 26 MB of the 50 MB L2.
// PrefetchNextRow is a parameter for the benchmark that measures what the prefetch is worth.
template <class T, bool PrefetchNextRow = true>
__global__ void __launch_bounds__(wide_block, 1) softmax_cross_entropy_registers_kernel(SoftmaxCrossEntropy<T> a) {
  __shared__ MaxSum warp_totals[2][warp_size];
  int buffer = 0;
  for (std::size_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const T* x = a.logits + r * a.classes;
    T* dx = a.dlogits ? a.dlogits + r * a.classes : nullptr;
    if (PrefetchNextRow && r + gridDim.x < a.rows) prefetch_row_l2(x + gridDim.x * a.classes, a.real_classes);
    const std::int32_t t = a.targets[r];
    if (ignored_row(a, t) || !valid_target(t, a.real_classes)) {  // the same for the whole block
      const float fill = ignored_row(a, t) ? 0.0f : quiet_nan;
      if (threadIdx.x == 0) a.row_loss[r] = fill;
      if (dx) {
        for (std::size_t c = threadIdx.x; c < a.classes; c += wide_block) dx[c] = round_nearest<T>(fill);
      }
      continue;
    }
    const RowSplit s = split_row(x, a.real_classes, true);
    const HeldRow<T> h = load_held_row(s, x, threadIdx.x);
    // Read before the barrier in wide_block_allreduce, so before any thread writes dx (which may be x).
    const float target_logit = to_float(x[t]);
    const MaxSum total = wide_block_allreduce(held_max_sum(h), CombineMaxSum{}, warp_totals[buffer]);
    buffer ^= 1;
    if (threadIdx.x == 0) a.row_loss[r] = cross_entropy_loss(total, target_logit);
    if (dx) {
      held_gradient(h, s, dx, total, static_cast<std::uint32_t>(t), a.grad_scale, threadIdx.x);
      for (std::size_t c = a.real_classes + threadIdx.x; c < a.classes; c += wide_block) {
        dx[c] = round_nearest<T>(0.0f);
      }
    }
  }
}

// The row-walking kernel: a block per row. Per element: reads the logit twice (the second time
// from L2 or L1 when the row is still there; GPT-2's 100 KB rows, about a thousand at once, are
// not) and, with dlogits, writes sizeof(T). Per row: reads the target (4 bytes) and writes the
// loss (4 bytes). Padding columns are not read; with dlogits they are written (zeros).
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
      softmax_thread_gradient(s, x, dx, total, static_cast<std::size_t>(t), a.grad_scale, threadIdx.x, softmax_block);
      for (std::size_t c = a.real_classes + threadIdx.x; c < a.classes; c += softmax_block) {
        dx[c] = round_nearest<T>(0.0f);
      }
    }
    __syncthreads();  // warp_totals is read by every thread before the next row writes it
  }
}

template <class T>
void softmax_cross_entropy_on(Cuda be, const SoftmaxCrossEntropy<T>& a) {
  if (a.rows == 0) return;
  if (softmax_in_registers<T>(a.real_classes, a.vectorized)) {
    // One block per multiprocessor (the most its registers hold; see the kernel), each striding over rows.
    const int grid = static_cast<int>(std::min<std::size_t>(a.rows, current_device_sm_count()));
    softmax_cross_entropy_registers_kernel<<<grid, wide_block, 0, be.stream>>>(a);
  } else {
    softmax_cross_entropy_kernel<<<grid_for(a.rows, 1), softmax_block, 0, be.stream>>>(a);  // a row per block at a time
  }
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
