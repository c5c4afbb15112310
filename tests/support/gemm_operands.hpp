// One matrix product for the gemm tests: its shape, and host-side operands drawn at random,
// stored with padding (or packed) and with every output poisoned, so an element written outside
// its block, or never written, shows.
#pragma once

#include "values.hpp"

#include <alloy/kernels/gemm.hpp>

#include <cstddef>
#include <random>
#include <string>
#include <vector>

namespace alloy::test {

struct GemmCase {
  Transpose transa = Transpose::no;
  Transpose transb = Transpose::no;
  std::size_t m = 1, n = 1, k = 1;
  float alpha = 1.0f;
  float beta = 0.0f;
  Epilogue epilogue = Epilogue::none;
  bool keep_pre_activation = false;
  bool packed = false;         // leading dimensions equal to the row lengths; otherwise padded
  bool separate_c_in = false;  // beta scales a matrix c_in apart from C (C starts poisoned)

  // Elements of bias_grad the epilogue writes.
  std::size_t bias_grad_length() const { return epilogue == Epilogue::dgelu_tanh_bias_grad ? n : m; }
  // pre_activation is read (dGELU) or written (GELU keeping it).
  bool reads_pre_activation() const { return alloy::detail::applies_gelu_gradient(epilogue); }
  bool uses_pre_activation() const { return keep_pre_activation || reads_pre_activation(); }
};

inline std::string describe(const GemmCase& c) {
  return "m=" + std::to_string(c.m) + " n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) +
         " transa=" + alloy::detail::name_of(c.transa) + " transb=" + alloy::detail::name_of(c.transb) +
         " alpha=" + std::to_string(c.alpha) + " beta=" + std::to_string(c.beta) + " " +
         alloy::detail::name_of(c.epilogue) + (c.keep_pre_activation ? " keeping pre_activation" : "") +
         (c.packed ? " packed" : " padded") + (c.separate_c_in ? " with c_in" : "");
}

inline constexpr Epilogue every_epilogue[] = {
    Epilogue::none,      Epilogue::bias,       Epilogue::gelu_tanh,           Epilogue::bias_gelu_tanh,
    Epilogue::bias_grad, Epilogue::dgelu_tanh, Epilogue::dgelu_tanh_bias_grad};

template <class Compute>
struct GemmOperands {
  using T = storage_t<Compute>;
  GemmCase shape;
  std::size_t lda, ldb, ldc, ldp;
  std::vector<T> a, b, c, c_in, bias, bias_grad, pre_activation;

  GemmOperands(const GemmCase& s, std::mt19937_64& rng) : shape(s) {
    constexpr Transpose yes = Transpose::yes;
    const std::size_t a_rows = s.transa == yes ? s.k : s.m, a_cols = s.transa == yes ? s.m : s.k;
    const std::size_t b_rows = s.transb == yes ? s.n : s.k, b_cols = s.transb == yes ? s.k : s.n;
    lda = a_cols + (s.packed ? 0 : 3);
    ldb = b_cols + (s.packed ? 0 : 1);
    ldc = s.n + (s.packed ? 0 : 2);
    ldp = s.packed ? (s.n + 7) / 8 * 8 : (s.n / 8 + 1) * 8;  // a multiple of 8; padded, with room to spare
    a = random_values<T>(a_rows * lda, rng);
    b = random_values<T>(b_rows * ldb, rng);
    c.assign(s.m * ldc, poison<T>());
    c_in.assign(s.m * ldc, poison<T>());
    if (s.beta != 0.0f) {
      const auto fresh = random_values<T>(s.m * s.n, rng);
      auto& read = s.separate_c_in ? c_in : c;
      for (std::size_t i = 0; i < s.m; ++i) {
        for (std::size_t j = 0; j < s.n; ++j) read[i * ldc + j] = fresh[i * s.n + j];
      }
    }
    bias = random_values<T>(s.n, rng);
    bias_grad.assign(s.bias_grad_length() + 1, poison<T>());
    pre_activation.assign(s.m * ldp, poison<T>());
    if (s.reads_pre_activation()) {
      // GELU inputs over [-4, 4]: both of GELU's bends and its flat tails.
      const auto fresh = uniform<T>(s.m * s.n, -4.0, 4.0, rng);
      for (std::size_t i = 0; i < s.m; ++i) {
        for (std::size_t j = 0; j < s.n; ++j) pre_activation[i * ldp + j] = fresh[i * s.n + j];
      }
    }
  }

  // The product's arguments with the operands at the given addresses: these vectors, or copies
  // of them in device memory.
  template <class P, class Q>
  GemmArgs<Compute> args(const P* a_, const P* b_, Q* c_, const P* bias_, Q* bias_grad_, Q* pre_,
                         const P* c_in_) const {
    return {.transa = shape.transa,
            .transb = shape.transb,
            .m = shape.m,
            .n = shape.n,
            .k = shape.k,
            .a = a_,
            .lda = lda,
            .b = b_,
            .ldb = ldb,
            .c = c_,
            .ldc = ldc,
            .c_in = shape.separate_c_in ? c_in_ : nullptr,
            .alpha = shape.alpha,
            .beta = shape.beta,
            .epilogue = shape.epilogue,
            .bias = alloy::detail::adds_bias(shape.epilogue) ? bias_ : nullptr,
            .bias_grad = alloy::detail::writes_bias_grad(shape.epilogue) ? bias_grad_ : nullptr,
            .pre_activation = shape.uses_pre_activation() ? pre_ : nullptr,
            .ld_pre_activation = shape.uses_pre_activation() ? ldp : 0};
  }

  // The product's arguments on these vectors.
  GemmArgs<Compute> args() {
    return args(a.data(), b.data(), c.data(), bias.data(), bias_grad.data(), pre_activation.data(), c_in.data());
  }
};

}  // namespace alloy::test
