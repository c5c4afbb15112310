// Matrix products for the Linear layer: C = epilogue(alpha * op(A) * op(B) + beta * C_in), every
// matrix row-major, on Host (a blocked loop, the reference) and on Cuda (cuBLASLt). C_in is C
// itself unless c_in names another matrix of the same shape (a residual added in the product).
//
// Element types follow the Compute dtype: for bf16 and fp16, A, B, C (and bias, bias_grad,
// pre_activation) are 16-bit values, products accumulate in fp32 and alpha/beta are fp32; for
// fp32 everything is float with plain fp32 math; for tf32 storage is float and the product's
// inputs are rounded to tf32 (10 fraction bits) before they are multiplied, accumulating in fp32
// (CUBLAS_COMPUTE_32F_FAST_TF32 on Cuda; the Host loop rounds to nearest even to model it: how
// the tensor cores' conversion breaks ties or truncates is not documented, and any of those
// stays within one tf32 step of each input).
//
// Linear, with x[rows, in], W[out, in] (PyTorch's layout), b[out], y[rows, out]:
//   forward   y  = x * W^T + b      transb = yes, m = rows, n = out, k = in, Epilogue::bias
//   backward  dx = dy * W           m = rows, n = in, k = out
//             dW = dy^T * x         transa = yes, m = out, n = in, k = rows, Epilogue::bias_grad
//                                   writes db = column sums of dy in the same pass
// Gradient accumulation across uses of one weight: beta = 1 adds into C. The bias gradient is
// always written, never accumulated (cuBLASLt's bias-gradient epilogue has no beta).
//
// Linear -> GELU -> Linear (up: in -> hidden, down: hidden -> out), fused:
//   forward   h  = gelu(x Wu^T + bu)  Epilogue::bias_gelu_tanh, keeping pre_activation = x Wu^T + bu
//             y  = h Wd^T + bd + r    Epilogue::bias, c_in = r, beta = 1 (a residual added in the product)
//   backward  dPre = (dy Wd) * gelu'(pre_activation)   m = rows, n = hidden, k = out,
//                                   Epilogue::dgelu_tanh_bias_grad writes dbu = column sums of dPre
// cuBLASLt's bias vectors (bias and the dGELU bias gradient) run along the rows of its
// column-major D, which are our columns: one per output feature, as both need. Its BGRADB
// reduces its op(B), our op(A), over k: one per row of our C (Epilogue::bias_grad).
//
// This header holds the arguments and the checks both backends make; host/gemm.hpp is the Host
// reference and cuda/gemm_cublaslt.hpp the Cuda path (kernels/gemm.hpp includes all three).
#pragma once

#include <alloy/error.hpp>
#include <alloy/numeric/rounding.hpp>
#include <alloy/numeric/traits.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>

namespace alloy {

enum class Transpose { no, yes };

// How the Cuda gemm (a GemmHandle) picks a problem's cuBLASLt algorithm.
enum class GemmTuning {
  // cuBLASLt's heuristic's first choice: the same algorithm, hence the same bits, run after run.
  heuristic,
  // The fastest of those of the heuristic's first gemm_timed_candidates (8) that compute what its
  // first choice computes, timed on the problem's first call (PyTorch's cudnn.benchmark idea): that
  // call waits for the device and runs each candidate a few times. A candidate takes part when it
  // is the first choice's algorithm with the same split-K and reduction scheme (it differs in
  // tiles, stages, cluster shape or swizzle, which do not change the order of any sum) and its
  // output on the call's own operands has the first choice's bits (sampled). So the results are
  // the heuristic's bits whichever candidate wins: run after run, and on every rank. A product
  // that adds to its own output (beta != 0 with c_in == c) cannot be run more than once, and keeps
  // the heuristic's choice.
  timed,
  // As timed, over all the heuristic's first gemm_timed_candidates: split-K and other orders of
  // the sums too. Which candidate wins can change between runs, and with it the last bits of the
  // products' results; within a run a problem keeps its algorithm (recomputation gives the same
  // bits). A plans file (GemmHandle) keeps the choices, and with them the bits, across runs.
  timed_any,
};

// What happens to each element v = alpha * (op(A) op(B))[i, j] + beta * C_in[i, j] before it is
// rounded into C[i, j]. All of it is fp32 arithmetic. The bias is added after beta * C_in (cuBLASLt's
// order: its bias is part of the epilogue, which follows the scaling).
enum class Epilogue {
  none,            // C = v
  bias,            // C = v + bias[j]: one bias per output column, i.e. per output feature
  gelu_tanh,       // C = gelu_tanh(v)
  bias_gelu_tanh,  // C = gelu_tanh(v + bias[j])
  bias_grad,       // C = v, and bias_grad[i] = sum over k of op(A)[i, k] (needs alpha == 1 and transa == yes)
  // GELU's backward: pre_activation (GELU's input, kept by the forward product) is read, and
  // C = v * gelu_tanh'(pre_activation[i, j]). Needs beta == 0.
  dgelu_tanh,
  // As dgelu_tanh, and bias_grad[j] = sum over i of those C values in fp32, before they are
  // rounded: one per column of C (n elements), the gradient of the bias the forward product
  // added before GELU. Needs alpha == 1 and beta == 0.
  dgelu_tanh_bias_grad,
};

// The dtypes a matrix product computes in.
template <class T>
concept gemm_dtype = std::same_as<T, float> || std::same_as<T, tf32> || std::same_as<T, fp16> || std::same_as<T, bf16>;

// One product. op(A) is m x k, op(B) is k x n, C is m x n; each matrix is stored row-major with
// the given leading dimension (elements from one row to the next, at least the row length).
// A stored matrix is op(X) itself when its transpose is `no`, op(X)'s transpose when `yes`.
template <class Compute>
struct GemmArgs {
  static_assert(gemm_dtype<Compute>, "GemmArgs<Compute>: Compute must be fp32, tf32, fp16 or bf16");
  using value_type = storage_t<Compute>;

  Transpose transa = Transpose::no;
  Transpose transb = Transpose::no;
  std::size_t m = 0;
  std::size_t n = 0;
  std::size_t k = 0;
  const value_type* a = nullptr;
  std::size_t lda = 0;
  const value_type* b = nullptr;
  std::size_t ldb = 0;
  value_type* c = nullptr;  // read only when beta != 0 and c_in is null, so it may hold anything (NaN) otherwise
  std::size_t ldc = 0;
  // Optional: the matrix beta scales, m x n with leading dimension ldc, read instead of c, so the
  // product writes c without first holding C_in there (y = x + (h W^T + b) in one product). It may
  // be c itself (in place) but no other overlap with c; reading it needs beta != 0.
  const value_type* c_in = nullptr;
  float alpha = 1.0f;
  float beta = 0.0f;
  Epilogue epilogue = Epilogue::none;
  const value_type* bias = nullptr;  // n elements: Epilogue::bias and bias_gelu_tanh
  // Written by Epilogue::bias_grad (m elements, per row) and dgelu_tanh_bias_grad (n, per column).
  value_type* bias_grad = nullptr;
  // GELU's input (bias included), m x n: optionally written by the GELU epilogues, for the
  // backward pass; read by the dGELU ones, which need it. Its leading dimension must be a multiple
  // of 8 (cuBLASLt's rule, kept on every backend so code tested on Host runs on Cuda).
  value_type* pre_activation = nullptr;
  std::size_t ld_pre_activation = 0;
};

namespace detail {

inline const char* name_of(Transpose t) { return t == Transpose::no ? "no" : "yes"; }

inline const char* name_of(Epilogue e) {
  switch (e) {
    case Epilogue::none:
      return "Epilogue::none";
    case Epilogue::bias:
      return "Epilogue::bias";
    case Epilogue::gelu_tanh:
      return "Epilogue::gelu_tanh";
    case Epilogue::bias_gelu_tanh:
      return "Epilogue::bias_gelu_tanh";
    case Epilogue::bias_grad:
      return "Epilogue::bias_grad";
    case Epilogue::dgelu_tanh:
      return "Epilogue::dgelu_tanh";
    case Epilogue::dgelu_tanh_bias_grad:
      return "Epilogue::dgelu_tanh_bias_grad";
  }
  return "an unknown Epilogue";
}

inline bool adds_bias(Epilogue e) { return e == Epilogue::bias || e == Epilogue::bias_gelu_tanh; }
inline bool applies_gelu(Epilogue e) { return e == Epilogue::gelu_tanh || e == Epilogue::bias_gelu_tanh; }
inline bool applies_gelu_gradient(Epilogue e) {
  return e == Epilogue::dgelu_tanh || e == Epilogue::dgelu_tanh_bias_grad;
}
inline bool writes_bias_grad(Epilogue e) { return e == Epilogue::bias_grad || e == Epilogue::dgelu_tanh_bias_grad; }
// Elements of bias_grad the epilogue writes: one per row of C, or one per column.
template <class Compute>
std::size_t bias_grad_size(const GemmArgs<Compute>& g) {
  return g.epilogue == Epilogue::bias_grad ? g.m : g.n;
}

// Byte range [first, last) a stored rows x cols matrix spans.
struct Extent {
  std::uintptr_t first;
  std::uintptr_t last;
};

template <class T>
Extent extent_of(const T* p, std::size_t rows, std::size_t cols, std::size_t ld) {
  const auto first = reinterpret_cast<std::uintptr_t>(p);
  return {first, first + ((rows - 1) * ld + cols) * sizeof(T)};
}

inline bool overlap(Extent x, Extent y) { return x.first < y.last && y.first < x.last; }

template <class T>
void check_matrix(const std::string& where, const char* name, const T* p, std::size_t rows, std::size_t cols,
                  std::size_t ld, const char* ld_name, const std::string& layout) {
  if (p == nullptr) {
    throw error(where + name + " is null; it must point to " + std::to_string(rows) + " x " + std::to_string(cols) +
                " elements" + layout);
  }
  if (ld < cols) {
    throw error(where + ld_name + " = " + std::to_string(ld) + " is less than " + std::to_string(cols) +
                ", the row length of " + name + " (" + std::to_string(rows) + " x " + std::to_string(cols) + layout +
                ")");
  }
}

// The checks both backends make, so a mistake reads the same on each and nothing reaches
// cuBLASLt that it would reject or misread.
template <class Compute>
void check_gemm_args(const GemmArgs<Compute>& g) {
  const std::string where = std::string("gemm<") + numeric_traits<Compute>::name + ">: ";
  if (g.m == 0 || g.n == 0 || g.k == 0) {
    throw error(where + "m, n and k must be positive (got m = " + std::to_string(g.m) + ", n = " + std::to_string(g.n) +
                ", k = " + std::to_string(g.k) + ")");
  }
  const bool ta = g.transa == Transpose::yes;
  const bool tb = g.transb == Transpose::yes;
  const std::size_t a_rows = ta ? g.k : g.m, a_cols = ta ? g.m : g.k;
  const std::size_t b_rows = tb ? g.n : g.k, b_cols = tb ? g.k : g.n;
  check_matrix(where, "a", g.a, a_rows, a_cols, g.lda, "lda",
               std::string(", row-major, transa = ") + name_of(g.transa) + ", m = " + std::to_string(g.m) +
                   ", k = " + std::to_string(g.k));
  check_matrix(where, "b", g.b, b_rows, b_cols, g.ldb, "ldb",
               std::string(", row-major, transb = ") + name_of(g.transb) + ", k = " + std::to_string(g.k) +
                   ", n = " + std::to_string(g.n));
  check_matrix(where, "c", static_cast<const storage_t<Compute>*>(g.c), g.m, g.n, g.ldc, "ldc",
               ", row-major, m = " + std::to_string(g.m) + ", n = " + std::to_string(g.n));
  const Extent c = extent_of(g.c, g.m, g.n, g.ldc);
  if (overlap(c, extent_of(g.a, a_rows, a_cols, g.lda))) {
    throw error(where + "c overlaps a; the output may not alias an input");
  }
  if (overlap(c, extent_of(g.b, b_rows, b_cols, g.ldb))) {
    throw error(where + "c overlaps b; the output may not alias an input");
  }
  if (g.c_in != nullptr) {
    if (g.beta == 0.0f) {
      throw error(where + "c_in is set but beta = 0, so it would not be read (give beta, or leave c_in null)");
    }
    if (g.c_in != g.c && overlap(c, extent_of(g.c_in, g.m, g.n, g.ldc))) {
      throw error(where + "c_in overlaps c without being c; it may be c itself (in place) or apart from it");
    }
  }

  const std::string epilogue = name_of(g.epilogue);
  if (adds_bias(g.epilogue) && g.bias == nullptr) {
    throw error(where + epilogue + " needs bias, a vector of n = " + std::to_string(g.n) +
                " elements (one per column of C)");
  }
  if (!adds_bias(g.epilogue) && g.bias != nullptr) {
    throw error(where + "bias is set but " + epilogue + " does not add it (use Epilogue::bias or bias_gelu_tanh)");
  }
  if (g.epilogue == Epilogue::dgelu_tanh_bias_grad) {
    if (g.bias_grad == nullptr) {
      throw error(where + epilogue + " needs bias_grad, a vector of n = " + std::to_string(g.n) +
                  " elements (one per column of C)");
    }
    if (g.alpha != 1.0f) {
      throw error(where + epilogue +
                  " needs alpha = 1 (the bias gradient is the column sum of the unscaled GELU gradient); got "
                  "alpha = " +
                  std::to_string(g.alpha));
    }
  } else if (g.epilogue == Epilogue::bias_grad) {
    if (g.bias_grad == nullptr) {
      throw error(where + epilogue + " needs bias_grad, a vector of m = " + std::to_string(g.m) +
                  " elements (one per row of C)");
    }
    if (g.alpha != 1.0f) {
      throw error(where + epilogue +
                  " needs alpha = 1 (the bias gradient is the unscaled row sum of op(A)); got alpha = " +
                  std::to_string(g.alpha));
    }
    if (g.transa != Transpose::yes) {
      // cuBLASLt (13.0, H200) fuses the bias gradient only into this layout: NOT_SUPPORTED otherwise.
      throw error(where + epilogue +
                  " needs transa = yes: it belongs to the weight-gradient product dW = dy^T x, the only layout "
                  "cuBLASLt fuses it into");
    }
  } else if (g.bias_grad != nullptr) {
    throw error(where + "bias_grad is set but " + epilogue +
                " does not write it (use Epilogue::bias_grad or dgelu_tanh_bias_grad)");
  }
  if (applies_gelu_gradient(g.epilogue)) {
    if (g.pre_activation == nullptr) {
      throw error(where + epilogue + " needs pre_activation, GELU's input (" + std::to_string(g.m) + " x " +
                  std::to_string(g.n) + ", as the forward product kept it)");
    }
    if (g.beta != 0.0f) {
      // Whether cuBLASLt adds beta * C before or after the GELU gradient is not documented; the
      // layers never need it (the product's output is an activation gradient, not accumulated).
      throw error(where + epilogue + " needs beta = 0; got beta = " + std::to_string(g.beta));
    }
  }
  if (g.pre_activation != nullptr) {
    if (!applies_gelu(g.epilogue) && !applies_gelu_gradient(g.epilogue)) {
      throw error(where + "pre_activation is set but " + epilogue +
                  " has no activation (use Epilogue::gelu_tanh, bias_gelu_tanh, dgelu_tanh or dgelu_tanh_bias_grad)");
    }
    if (g.ld_pre_activation < g.n || g.ld_pre_activation % 8 != 0) {
      throw error(where + "ld_pre_activation = " + std::to_string(g.ld_pre_activation) +
                  " must be at least n = " + std::to_string(g.n) +
                  " and a multiple of 8 (cuBLASLt's rule for the GELU input, kept on every backend)");
    }
    if (overlap(c, extent_of(g.pre_activation, g.m, g.n, g.ld_pre_activation))) {
      throw error(where + "pre_activation overlaps c");
    }
  }
}

}  // namespace detail
}  // namespace alloy
