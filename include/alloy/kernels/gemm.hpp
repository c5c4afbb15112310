// Matrix products for the Linear layer: C = epilogue(alpha * op(A) * op(B) + beta * C), every
// matrix row-major, on Host (a blocked loop, the reference) and on Cuda (cuBLASLt).
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
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>
#include <alloy/kernels/activations.hpp>
#include <alloy/numeric/rounding.hpp>
#include <alloy/numeric/traits.hpp>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#if ALLOY_HAS_CUDA_RUNTIME
#include <alloy/backend/buffer.hpp>
#include <alloy/cublas_error.hpp>

#include <cublasLt.h>

#include <map>
#include <memory>
#endif

namespace alloy {

enum class Transpose { no, yes };

// What happens to each element v = alpha * (op(A) op(B))[i, j] + beta * C[i, j] before it is
// rounded into C[i, j]. All of it is fp32 arithmetic.
enum class Epilogue {
  none,            // C = v
  bias,            // C = v + bias[j]: one bias per output column, i.e. per output feature
  gelu_tanh,       // C = gelu_tanh(v)
  bias_gelu_tanh,  // C = gelu_tanh(v + bias[j])
  bias_grad,       // C = v, and bias_grad[i] = sum over k of op(A)[i, k] (needs alpha == 1 and transa == yes)
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
  value_type* c = nullptr;  // read only when beta != 0, so it may hold anything (NaN) when beta == 0
  std::size_t ldc = 0;
  float alpha = 1.0f;
  float beta = 0.0f;
  Epilogue epilogue = Epilogue::none;
  const value_type* bias = nullptr;  // n elements: Epilogue::bias and bias_gelu_tanh
  value_type* bias_grad = nullptr;   // m elements, written by Epilogue::bias_grad
  // Optional with the GELU epilogues: GELU's input (bias included), m x n, for the backward pass.
  // Its leading dimension must be a multiple of 8 (cuBLASLt's rule, kept on every backend so
  // code tested on Host runs on Cuda).
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
  }
  return "an unknown Epilogue";
}

inline bool adds_bias(Epilogue e) { return e == Epilogue::bias || e == Epilogue::bias_gelu_tanh; }
inline bool applies_gelu(Epilogue e) { return e == Epilogue::gelu_tanh || e == Epilogue::bias_gelu_tanh; }

// float -> the nearest tf32 value (10 fraction bits), ties to even, held in a float. Infinities
// and NaN pass through; values past tf32's largest round to infinity.
ALLOY_HOST_DEVICE constexpr float round_to_tf32(float x) noexcept {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) >= 0x7f800000u) return x;
  const std::uint32_t rounding_bias = 0xfffu + ((u >> 13) & 1u);
  return float_from_bits((u + rounding_bias) & ~0x1fffu);
}

// An element of A or B as the product's multiplier sees it.
template <class Compute>
inline float gemm_input(storage_t<Compute> x) {
  if constexpr (std::is_same_v<Compute, tf32>) {
    return round_to_tf32(x);
  } else {
    return to_float(x);
  }
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

  const std::string epilogue = name_of(g.epilogue);
  if (adds_bias(g.epilogue) && g.bias == nullptr) {
    throw error(where + epilogue + " needs bias, a vector of n = " + std::to_string(g.n) +
                " elements (one per column of C)");
  }
  if (!adds_bias(g.epilogue) && g.bias != nullptr) {
    throw error(where + "bias is set but " + epilogue + " does not add it (use Epilogue::bias or bias_gelu_tanh)");
  }
  if (g.epilogue == Epilogue::bias_grad) {
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
    throw error(where + "bias_grad is set but " + epilogue + " does not write it (use Epilogue::bias_grad)");
  }
  if (g.pre_activation != nullptr) {
    if (!applies_gelu(g.epilogue)) {
      throw error(where + "pre_activation is set but " + epilogue +
                  " has no activation (use Epilogue::gelu_tanh or bias_gelu_tanh)");
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

// Host tile sizes: a k-block of op(B) rows (128 x 512 floats, 256 KiB) stays in cache while
// every row of C takes its share.
inline constexpr std::size_t host_gemm_k_block = 128;
inline constexpr std::size_t host_gemm_n_block = 512;

}  // namespace detail

// The reference: op(A) and op(B) are widened to float (rounded to tf32 first for tf32), each
// C[i, j] is sum over k of the products in k order, in fp32, then the epilogue, then one rounding
// to the output dtype.
template <class Compute>
void gemm(Host, const GemmArgs<Compute>& g) {
  using T = storage_t<Compute>;
  detail::check_gemm_args(g);
  const std::size_t m = g.m, n = g.n, k = g.k;
  const bool ta = g.transa == Transpose::yes;
  const bool tb = g.transb == Transpose::yes;
  auto a_at = [&](std::size_t i, std::size_t p) -> const T& { return ta ? g.a[p * g.lda + i] : g.a[i * g.lda + p]; };
  auto b_at = [&](std::size_t p, std::size_t j) -> const T& { return tb ? g.b[j * g.ldb + p] : g.b[p * g.ldb + j]; };

  std::vector<float> a(m * k), b(k * n);
  for (std::size_t i = 0; i < m; ++i) {
    for (std::size_t p = 0; p < k; ++p) a[i * k + p] = detail::gemm_input<Compute>(a_at(i, p));
  }
  for (std::size_t p = 0; p < k; ++p) {
    for (std::size_t j = 0; j < n; ++j) b[p * n + j] = detail::gemm_input<Compute>(b_at(p, j));
  }

  std::vector<float> sum(m * n, 0.0f);
  for (std::size_t p0 = 0; p0 < k; p0 += detail::host_gemm_k_block) {
    const std::size_t p1 = std::min(k, p0 + detail::host_gemm_k_block);
    for (std::size_t j0 = 0; j0 < n; j0 += detail::host_gemm_n_block) {
      const std::size_t j1 = std::min(n, j0 + detail::host_gemm_n_block);
      for (std::size_t i = 0; i < m; ++i) {
        float* row = sum.data() + i * n;
        for (std::size_t p = p0; p < p1; ++p) {
          const float a_ip = a[i * k + p];
          const float* b_row = b.data() + p * n;
          for (std::size_t j = j0; j < j1; ++j) row[j] += a_ip * b_row[j];
        }
      }
    }
  }

  for (std::size_t i = 0; i < m; ++i) {
    for (std::size_t j = 0; j < n; ++j) {
      T& c = g.c[i * g.ldc + j];
      float v = g.alpha * sum[i * n + j];
      if (g.beta != 0.0f) v += g.beta * to_float(c);
      if (detail::adds_bias(g.epilogue)) v += to_float(g.bias[j]);
      if (detail::applies_gelu(g.epilogue)) {
        if (g.pre_activation) g.pre_activation[i * g.ld_pre_activation + j] = round_nearest<T>(v);
        v = gelu_tanh(v);
      }
      c = round_nearest<T>(v);
    }
  }

  if (g.epilogue == Epilogue::bias_grad) {
    for (std::size_t i = 0; i < m; ++i) {
      float s = 0.0f;
      for (std::size_t p = 0; p < k; ++p) s += to_float(a_at(i, p));
      g.bias_grad[i] = round_nearest<T>(s);
    }
  }
}

#if ALLOY_HAS_CUDA_RUNTIME

namespace detail {

template <class Compute>
inline constexpr cudaDataType_t cuda_data_type = CUDA_R_32F;  // fp32 and tf32
template <>
inline constexpr cudaDataType_t cuda_data_type<fp16> = CUDA_R_16F;
template <>
inline constexpr cudaDataType_t cuda_data_type<bf16> = CUDA_R_16BF;

template <class Compute>
inline constexpr cublasComputeType_t cublas_compute_type =
    std::is_same_v<Compute, tf32> ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;

// cuBLASLt is column-major. A row-major m x n matrix with leading dimension ld is, read
// column-major, its n x m transpose with the same ld. So C = op(A) op(B) is computed as
// C^T = op(B)^T op(A)^T: cuBLASLt's "A" is our B and its "B" is our A, the transpose flags
// carry over unchanged, and cuBLASLt's m and n are our n and m. Consequences for the epilogues:
// cuBLASLt's bias runs along the rows of its D (our columns: one per output feature), and its
// BGRADB (a reduction over k of its op(B), our op(A)) is our per-row bias gradient.
inline cublasLtEpilogue_t cublaslt_epilogue(Epilogue e, bool keeps_pre_activation) {
  switch (e) {
    case Epilogue::none:
      return CUBLASLT_EPILOGUE_DEFAULT;
    case Epilogue::bias:
      return CUBLASLT_EPILOGUE_BIAS;
    case Epilogue::gelu_tanh:
      return keeps_pre_activation ? CUBLASLT_EPILOGUE_GELU_AUX : CUBLASLT_EPILOGUE_GELU;
    case Epilogue::bias_gelu_tanh:
      return keeps_pre_activation ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_BIAS;
    case Epilogue::bias_grad:
      return CUBLASLT_EPILOGUE_BGRADB;
  }
  throw error(std::string("gemm: ") + name_of(e) + " has no cuBLASLt epilogue");
}

inline cublasOperation_t cublas_operation(Transpose t) { return t == Transpose::yes ? CUBLAS_OP_T : CUBLAS_OP_N; }

// The largest power of two, up to 256, that divides the address: cuBLASLt picks kernels for
// the alignment it is promised (256 unless told otherwise), so plans are made per alignment.
inline std::uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

// Everything cuBLASLt's choice of algorithm depends on.
struct GemmPlanKey {
  int data_type;
  int compute_type;
  Transpose transa;
  Transpose transb;
  std::size_t m, n, k, lda, ldb, ldc, ld_pre_activation;
  Epilogue epilogue;
  bool keeps_pre_activation;
  std::uint32_t align_a, align_b, align_c, align_vector, align_pre_activation;

  auto operator<=>(const GemmPlanKey&) const = default;
};

template <class Compute>
GemmPlanKey plan_key(const GemmArgs<Compute>& g) {
  const void* vector = g.epilogue == Epilogue::bias_grad ? static_cast<const void*>(g.bias_grad) : g.bias;
  const bool keeps = g.pre_activation != nullptr;
  return {cuda_data_type<Compute>,
          cublas_compute_type<Compute>,
          g.transa,
          g.transb,
          g.m,
          g.n,
          g.k,
          g.lda,
          g.ldb,
          g.ldc,
          keeps ? g.ld_pre_activation : 0,
          g.epilogue,
          keeps,
          alignment_of(g.a),
          alignment_of(g.b),
          alignment_of(g.c),
          alignment_of(vector),
          alignment_of(g.pre_activation)};
}

struct MatmulDescDeleter {
  void operator()(cublasLtMatmulDesc_t d) const noexcept { (void)cublasLtMatmulDescDestroy(d); }
};
struct MatrixLayoutDeleter {
  void operator()(cublasLtMatrixLayout_t l) const noexcept { (void)cublasLtMatrixLayoutDestroy(l); }
};
struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreference_t p) const noexcept { (void)cublasLtMatmulPreferenceDestroy(p); }
};
struct LtHandleDeleter {
  void operator()(cublasLtHandle_t h) const noexcept { (void)cublasLtDestroy(h); }
};
struct EventDeleter {
  void operator()(cudaEvent_t e) const noexcept { (void)cudaEventDestroy(e); }
};

using MatmulDesc = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulDesc_t>, MatmulDescDeleter>;
using MatrixLayout = std::unique_ptr<std::remove_pointer_t<cublasLtMatrixLayout_t>, MatrixLayoutDeleter>;
using MatmulPreference = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, PreferenceDeleter>;
using LtHandle = std::unique_ptr<std::remove_pointer_t<cublasLtHandle_t>, LtHandleDeleter>;
using Event = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDeleter>;

// A problem's descriptors and chosen algorithm, in cuBLASLt's (swapped) roles.
struct GemmPlan {
  MatmulDesc desc;
  MatrixLayout lt_a;  // our B
  MatrixLayout lt_b;  // our A
  MatrixLayout lt_c;  // our C, also the output D
  cublasLtMatmulAlgo_t algo{};
};

template <class V>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const V& value) {
  ALLOY_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
}

inline MatrixLayout make_layout(cudaDataType_t type, std::size_t rows, std::size_t cols, std::size_t ld) {
  cublasLtMatrixLayout_t layout = nullptr;
  ALLOY_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, rows, cols, static_cast<std::int64_t>(ld)));
  return MatrixLayout(layout);
}

// The per-call pointers the epilogue reads or writes. cuBLASLt's heuristic also reads them
// (for their alignment), so they are set before the plan is made too.
template <class Compute>
void set_epilogue_pointers(cublasLtMatmulDesc_t desc, const GemmArgs<Compute>& g) {
  if (adds_bias(g.epilogue)) set_attribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(g.bias));
  if (g.epilogue == Epilogue::bias_grad) {
    set_attribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<void*>(g.bias_grad));
  }
  if (g.pre_activation) {
    set_attribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, static_cast<void*>(g.pre_activation));
  }
}

template <class Compute>
GemmPlan make_plan(cublasLtHandle_t handle, const GemmArgs<Compute>& g, std::size_t workspace_bytes) {
  constexpr cudaDataType_t type = cuda_data_type<Compute>;
  GemmPlan plan;
  cublasLtMatmulDesc_t desc = nullptr;
  ALLOY_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, cublas_compute_type<Compute>, CUDA_R_32F));
  plan.desc.reset(desc);
  set_attribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, cublas_operation(g.transb));
  set_attribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, cublas_operation(g.transa));
  set_attribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, cublaslt_epilogue(g.epilogue, g.pre_activation != nullptr));
  if (g.pre_activation) {
    set_attribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, static_cast<std::int64_t>(g.ld_pre_activation));
  }
  set_epilogue_pointers(desc, g);

  const bool ta = g.transa == Transpose::yes;
  const bool tb = g.transb == Transpose::yes;
  // Column-major shapes of the stored matrices: a row-major r x c matrix is c x r here.
  plan.lt_a = make_layout(type, tb ? g.k : g.n, tb ? g.n : g.k, g.ldb);
  plan.lt_b = make_layout(type, ta ? g.m : g.k, ta ? g.k : g.m, g.lda);
  plan.lt_c = make_layout(type, g.n, g.m, g.ldc);

  cublasLtMatmulPreference_t preference_handle = nullptr;
  ALLOY_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference_handle));
  const MatmulPreference preference(preference_handle);
  const auto set_preference = [&](cublasLtMatmulPreferenceAttributes_t attribute, auto value) {
    ALLOY_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference_handle, attribute, &value, sizeof(value)));
  };
  set_preference(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<std::uint64_t>(workspace_bytes));
  set_preference(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(g.b));
  set_preference(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(g.a));
  set_preference(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(g.c));
  set_preference(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(g.c));

  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  ALLOY_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, desc, plan.lt_a.get(), plan.lt_b.get(), plan.lt_c.get(),
                                                    plan.lt_c.get(), preference_handle, 1, &result, &found));
  if (found == 0) {
    throw cuda_error("cublasLtMatmulAlgoGetHeuristic", __FILE__, __LINE__, CUBLAS_STATUS_NOT_SUPPORTED,
                     std::string("no cuBLASLt algorithm for gemm<") + numeric_traits<Compute>::name +
                         "> m = " + std::to_string(g.m) + ", n = " + std::to_string(g.n) +
                         ", k = " + std::to_string(g.k) + ", transa = " + name_of(g.transa) +
                         ", transb = " + name_of(g.transb) + ", " + name_of(g.epilogue));
  }
  plan.algo = result.algo;
  return plan;
}

}  // namespace detail

// What the Cuda gemm needs across calls: the cuBLASLt handle, a workspace, and one plan
// (descriptors and the heuristic's algorithm) per problem, since making them costs far more
// than a small product. Belongs to the device current at construction. Not thread-safe; calls
// on different streams are ordered one after another (the workspace is shared), so give each
// stream its own handle when products should overlap.
class GemmHandle {
 public:
  static constexpr std::size_t default_workspace_bytes = std::size_t(32) << 20;
  // Plans kept before the cache starts over: far more shapes than a model has.
  static constexpr std::size_t max_cached_plans = 1024;

  explicit GemmHandle(Cuda be = {}, std::size_t workspace_bytes = default_workspace_bytes)
      : workspace_(workspace_bytes, be), last_stream_(be.stream) {
    ALLOY_CUDA_CHECK(cudaGetDevice(&device_));
    cublasLtHandle_t handle = nullptr;
    ALLOY_CUBLAS_CHECK(cublasLtCreate(&handle));
    handle_.reset(handle);
    cudaEvent_t event = nullptr;
    ALLOY_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    stream_switch_.reset(event);
  }

  GemmHandle(GemmHandle&&) noexcept = default;
  GemmHandle& operator=(GemmHandle&&) = delete;
  GemmHandle(const GemmHandle&) = delete;
  GemmHandle& operator=(const GemmHandle&) = delete;

  // The workspace is freed in its own stream's order: that stream first waits for the last
  // product, which may have run on another.
  ~GemmHandle() {
    if (!stream_switch_) return;
    const cudaStream_t own = workspace_.backend().stream;
    if (last_stream_ != own && cudaEventRecord(stream_switch_.get(), last_stream_) == cudaSuccess) {
      (void)cudaStreamWaitEvent(own, stream_switch_.get(), 0);
    }
  }

  std::size_t cached_plans() const noexcept { return plans_.size(); }
  std::size_t workspace_bytes() const noexcept { return workspace_.bytes(); }
  int device() const noexcept { return device_; }

 private:
  template <class Compute>
  friend void gemm(Cuda be, GemmHandle& handle, const GemmArgs<Compute>& g);

  // The plan for g's problem, made on first use.
  template <class Compute>
  detail::GemmPlan& plan_for(const GemmArgs<Compute>& g) {
    const detail::GemmPlanKey key = detail::plan_key(g);
    if (auto found = plans_.find(key); found != plans_.end()) return found->second;
    if (plans_.size() >= max_cached_plans) plans_.clear();
    return plans_.emplace(key, detail::make_plan(handle_.get(), g, workspace_.bytes())).first->second;
  }

  // Orders this call after the previous one when it comes on another stream.
  void enter_stream(cudaStream_t stream) {
    if (stream == last_stream_) return;
    ALLOY_CUDA_CHECK(cudaEventRecord(stream_switch_.get(), last_stream_));
    ALLOY_CUDA_CHECK(cudaStreamWaitEvent(stream, stream_switch_.get(), 0));
    last_stream_ = stream;
  }

  Buffer<std::byte, Cuda> workspace_;
  detail::LtHandle handle_;
  detail::Event stream_switch_;
  cudaStream_t last_stream_;
  int device_ = 0;
  std::map<detail::GemmPlanKey, detail::GemmPlan> plans_;
};

// The product on the backend's stream, asynchronously. Pointers are device memory.
template <class Compute>
void gemm(Cuda be, GemmHandle& handle, const GemmArgs<Compute>& g) {
  detail::check_gemm_args(g);
  int device = 0;
  ALLOY_CUDA_CHECK(cudaGetDevice(&device));
  if (device != handle.device()) {
    throw error("gemm: the GemmHandle belongs to device " + std::to_string(handle.device()) + " but device " +
                std::to_string(device) + " is current");
  }
  detail::GemmPlan& plan = handle.plan_for(g);
  detail::set_epilogue_pointers(plan.desc.get(), g);
  handle.enter_stream(be.stream);
  ALLOY_CUBLAS_CHECK(cublasLtMatmul(handle.handle_.get(), plan.desc.get(), &g.alpha, g.b, plan.lt_a.get(), g.a,
                                    plan.lt_b.get(), &g.beta, g.c, plan.lt_c.get(), g.c, plan.lt_c.get(), &plan.algo,
                                    handle.workspace_.data(), handle.workspace_.bytes(), be.stream));
}

#endif  // ALLOY_HAS_CUDA_RUNTIME

}  // namespace alloy
