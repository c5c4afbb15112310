// Causal self-attention on Cuda against the Host backend, on fresh random inputs in GPT-2's
// fused layout (q, k, v the column blocks of a [batch * seq, 3 channels + padding] matrix; out,
// dout [batch * seq, channels + padding]), every output array poisoned first, its padding checked
// afterwards, and the backward fed the Host forward's out and lse so that each pass is compared
// on identical inputs. Every case asserts which kernels it meant to reach
// (attention_uses_tensor_cores) before comparing.
//
// The row kernels (head_dim other than 64 and 128, misaligned strides) perform the Host's fp32
// operations in its order, tf32's roundings included: out, dq, dk and dv must be the Host's bits;
// lse within the bound below (the device's logf and the host's log differ by up to 2 ulp).
//
// The tensor-core kernels sum in another order (the mma's) and use exp2f (ex2.approx, 2 ulp)
// where the Host uses its own exp2, so their fp32 values differ from the Host's by fp32 rounding
// errors; rounded to T, P, dS and the outputs then differ where a value falls near a rounding
// boundary. Per element, with A, M, F, E as in tests/support/attention_reference.hpp:
//   |cuda - host| <= 2 ulp_T(|host|) + 8 u_T M + 2 E(host depth) + 2 E(any order) + 4 f_T F + 2 f_T
//     2 ulp_T: the two results' own rounding to T, each within half an ulp of values that differ
//              by far less than an ulp;
//     8 u_T M: a P or dS rounded to the neighbouring T value on one side only moves its term by at
//              most 2 u_T |term| <= 2 u_T M; this allows four such terms at the largest size.
//              (Flips of many small terms are rarer in proportion to the fp32 difference, and
//              their expected sum is what E covers: e.g. dS near dP = delta, where the fp32
//              difference is large relative to dS but dS's terms are small.)
//     2 E + 2 E: each path's first-order fp32 error against the exact value, the Host's with its
//              32-lane dot products, the tensor cores' with any order of head_dim + 8 additions;
//              twice, for margin;
//     4 f_T F + 2 f_T: fp16's subnormals, where rounding errs by up to 2^-25 absolutely.
//   lse: |cuda - host| <= 2 E_lse(host depth) + 2 E_lse(any order).
// tf32 takes the same bound with u_T = 2^-11 and the outputs' ulp that of float, their storage: both
// sides round q, k, v, dout, P and dS to tf32 with the same function (round_to_tf32), so only P
// and dS can round differently, where their fp32 values straddle a tf32 rounding boundary.
// fp32 on the tensor cores is 3xTF32, not fp32 multiplication: each product is within 3 2^-22 of
// the exact one (12 u, u = 2^-24) and takes three mmas per k-step, so its side of the bound is
// 2 E(3 (head_dim + 8) + 12) (three accumulations per step, the products' error as depth) and
// 24 u A (the same error in the sums of P v, dS k, dS q, P dout):
//   |cuda - host| <= 2 ulp_fp32(|host|) + 2 E(host depth) + 2 E(3 (head_dim + 8) + 12) + 24 u A,
//   lse likewise without the ulp and A terms.
// A host model of the kernels' arithmetic (tf32 or 3xTF32 factors, each mma's sum rounded toward
// zero or its terms truncated at the largest one's exponent, exp2 and log correctly rounded; a
// check made while writing the kernels, not kept) stayed within 0.2 of the tf32 bound and 0.025 of
// the fp32 bound on the shapes below, while the same model with one tf32 product for fp32 went
// past the fp32 bound by 1.1 to 6 times.
// The float paths are also held to float64 (the reference's exact values, relative Frobenius norm
// per output): fp32 (3xTF32) within 1e-4, tf32 within 1e-2; the host model measured at most 1.5e-5
// and 3.5e-3 on these shapes. Each run prints the measured values.
// Each run also checks that the same inputs give the same bits twice.
//
// Column parts (AttentionBackwardArgs::column_parts): every Cuda backward above is asked for them
// too, and they must equal, bit for bit, the definition (each column's stored values summed in
// fp32 in position order over each tile of 64 positions) computed here from that call's own dq,
// dk and dv; the second run must give the same bits; a run without them the same dq, dk, dv; on
// the row kernels, whose outputs are the Host's, the Host's parts too.
#include "../support/attention_reference.hpp"
#include "../support/test_support.hpp"
#include "../support/values.hpp"

#include <alloy/backend/buffer.hpp>
#include <alloy/backend/cuda/handles.hpp>
#include <alloy/kernels/attention.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using alloy::bf16;
using alloy::Buffer;
using alloy::Cuda;
using alloy::fp16;
using alloy::Host;
using alloy::storage_t;
using alloy::tf32;
using namespace alloy::test;

template <class T>
Buffer<T, Cuda> device_copy(const std::vector<T>& values, Cuda be) {
  Buffer<T, Cuda> b(values.size(), be);
  alloy::copy_from_host(b, std::span<const T>(values));
  return b;
}

// Device copies of a problem's arrays, in the same layout; outputs poisoned, scratch NaN (the
// kernels must not read it before writing it). lse has one poisoned element past its end.
template <class T>
struct DeviceProblem {
  using S = storage_t<T>;
  Cuda be;
  Buffer<S, Cuda> qkv, dout, out, dqkv;
  Buffer<float, Cuda> lse, scratch, parts;

  DeviceProblem(const AttentionProblem<T>& p, Cuda be_ = {})
      : be(be_),
        qkv(device_copy(p.qkv, be)),
        dout(device_copy(p.dout, be)),
        out(device_copy(std::vector<S>(p.out.size(), poison<S>()), be)),
        dqkv(device_copy(std::vector<S>(p.dqkv.size(), poison<S>()), be)),
        lse(device_copy(std::vector<float>(p.lse.size() + 1, poison<float>()), be)),
        scratch(alloy::attention_backward_scratch_floats(p.s.batch, p.s.heads, p.s.seq), be),
        parts(device_copy(std::vector<float>(parts_floats(p) + 1, poison<float>()), be)) {
    ALLOY_CUDA_CHECK(cudaMemsetAsync(scratch.data(), 0xff, scratch.bytes(), be.stream));
  }
  static std::size_t parts_floats(const AttentionProblem<T>& p) {
    return alloy::attention_column_parts_floats(p.s.batch, p.s.heads, p.s.seq, p.s.head_dim);
  }
  alloy::AttentionArgs<T> forward_args(const AttentionProblem<T>& p) {
    return p.forward_args(qkv.data(), out.data(), lse.data());
  }
  // The backward over this problem's inputs and the given out and lse (device arrays).
  alloy::AttentionBackwardArgs<T> backward_args(const AttentionProblem<T>& p, const S* out_, const float* lse_) {
    return p.backward_args(qkv.data(), out_, dout.data(), lse_, dqkv.data(), scratch.data());
  }
  // The same, with the column parts asked for (into `parts`, which has one poisoned float past them).
  alloy::AttentionBackwardArgs<T> backward_args_with_parts(const AttentionProblem<T>& p, const S* out_,
                                                           const float* lse_) {
    auto a = backward_args(p, out_, lse_);
    a.column_parts = parts.data();
    return a;
  }
};

// The device array's values; its elements outside `written` (the row padding; lse's extra
// element) must still hold the poison.
template <class T>
std::vector<T> read_back(const Buffer<T, Cuda>& b, std::size_t rows, std::size_t row_length, std::size_t written,
                         const char* what) {
  const auto all = alloy::to_host(b);
  std::size_t touched = 0;
  for (std::size_t i = 0; i < all.size(); ++i) {
    const bool inside = i < rows * row_length && i % row_length < written;
    if (!inside) touched += bits_of(all[i]) != bits_of(poison<T>());
  }
  EXPECT_EQ(touched, 0u) << what << ": elements written outside their places";
  return all;
}

template <class T>
void expect_same_bits(const std::vector<T>& got, const std::vector<T>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  std::size_t differ = 0, first = got.size();
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (bits_of(got[i]) != bits_of(want[i])) {
      if (differ++ == 0) first = i;
    }
  }
  EXPECT_EQ(differ, 0u) << what << ": elements whose bits differ; the first at " << first << " (Cuda "
                        << (first < got.size() ? value(got[first]) : 0.0) << ", expected "
                        << (first < got.size() ? value(want[first]) : 0.0) << ")";
}

// Counts elements outside tolerance; reports the first few with their position, and, at the end,
// how the failures spread over positions and dimensions (a pattern there points at a tile or a
// fragment layout).
class Compare {
 public:
  explicit Compare(std::string what) : what_(std::move(what)) {}
  void expect(double got, double want, double bound, std::size_t b, std::size_t h, std::size_t t, std::size_t d) {
    if (std::fabs(got - want) <= bound) return;  // NaN fails here too
    ++failures_;
    positions_mod_16_ |= 1u << (t % 16);
    dims_mod_16_ |= 1u << (d % 16);
    first_t_ = std::min(first_t_, t);
    if (failures_ <= 5) {
      ADD_FAILURE() << what_ << " at batch " << b << ", head " << h << ", position " << t << ", dimension " << d
                    << ": Cuda " << got << ", Host " << want << ", allowed difference " << bound;
    }
  }
  ~Compare() {
    if (failures_ > 0) {
      ADD_FAILURE() << what_ << ": " << failures_ << " elements out of tolerance in all; earliest position " << first_t_
                    << "; positions mod 16 seen: 0x" << std::hex << positions_mod_16_ << ", dimensions mod 16 seen: 0x"
                    << dims_mod_16_;
    }
  }

 private:
  std::string what_;
  std::size_t failures_ = 0, first_t_ = SIZE_MAX;
  unsigned positions_mod_16_ = 0, dims_mod_16_ = 0;
};

enum class Path { tensor_cores, rows };

const char* name_of(Path p) { return p == Path::tensor_cores ? "the tensor-core kernels" : "the row kernels"; }

// Relative Frobenius distance of the float paths' outputs from float64: sums of squares, per output.
class Float64Distance {
 public:
  // bound < 0: measured and printed, not checked.
  Float64Distance(std::string what, double bound) : what_(std::move(what)), bound_(bound) {}
  void add(double got, double exact) {
    error_ += (got - exact) * (got - exact);
    norm_ += exact * exact;
  }
  ~Float64Distance() {
    if (norm_ == 0) return;  // dq, dk at one position: exactly 0
    const double distance = std::sqrt(error_ / norm_);
    std::cout << "[ measured ] " << what_ << ": relative Frobenius distance from float64 " << distance;
    if (bound_ < 0) {
      std::cout << " (not checked: the exact value is 0)\n";
      return;
    }
    std::cout << " (bound " << bound_ << ")\n";
    EXPECT_LE(distance, bound_) << what_ << ": relative Frobenius distance from float64";
  }

 private:
  std::string what_;
  double bound_, error_ = 0, norm_ = 0;
};

template <class T>
void expect_cuda_matches_host(const AttentionShape& s, std::uint64_t seed, Path path, Cuda be = {}) {
  SCOPED_TRACE(describe(alloy::numeric_traits<T>::name, s) + ", on " + name_of(path));
  std::mt19937_64 rng(seed);
  AttentionProblem<T> p(s, rng);
  DeviceProblem<T> dev(p, be);
  ASSERT_EQ(alloy::attention_uses_tensor_cores(dev.forward_args(p)), path == Path::tensor_cores);
  ASSERT_EQ(alloy::attention_uses_tensor_cores(dev.backward_args(p, dev.out.data(), dev.lse.data())),
            path == Path::tensor_cores);

  alloy::attention_forward(Host{}, p.forward_args());
  alloy::attention_backward(Host{}, p.backward_args());
  // The backward on Cuda takes the Host forward's out and lse.
  const auto host_out = device_copy(p.out, be);
  const auto host_lse = device_copy(p.lse, be);
  try {
    alloy::attention_forward(be, dev.forward_args(p));
    alloy::attention_backward(be, dev.backward_args_with_parts(p, host_out.data(), host_lse.data()));
    alloy::synchronize(be);
  } catch (const alloy::error& e) {
    FAIL() << e.what();
  }
  const std::size_t rows = s.batch * s.seq;
  const auto out = read_back(dev.out, rows, p.out_row, p.channels, "out");
  const auto dqkv = read_back(dev.dqkv, rows, p.qkv_row, 3 * p.channels, "dq, dk, dv");
  auto lse = read_back(dev.lse, 1, p.lse.size() + 1, p.lse.size(), "lse");
  lse.pop_back();
  const std::size_t part_count = DeviceProblem<T>::parts_floats(p);
  auto parts = read_back(dev.parts, 1, part_count + 1, part_count, "column parts");
  parts.pop_back();
  expect_same_bits(parts, column_parts_of(p, dqkv),
                   "column parts (Cuda against the definition from Cuda's dq, dk, dv)");

  // Again: the same bits.
  DeviceProblem<T> again(p, be);
  alloy::attention_forward(be, again.forward_args(p));
  alloy::attention_backward(be, again.backward_args_with_parts(p, host_out.data(), host_lse.data()));
  expect_same_bits(alloy::to_host(again.out), out, "out, second run");
  expect_same_bits(alloy::to_host(again.dqkv), dqkv, "dq, dk, dv, second run");
  auto lse_again = alloy::to_host(again.lse);
  lse_again.pop_back();
  expect_same_bits(lse_again, lse, "lse, second run");
  auto parts_again = alloy::to_host(again.parts);
  parts_again.pop_back();
  expect_same_bits(parts_again, parts, "column parts, second run");
  // Without column parts: the same dq, dk, dv.
  DeviceProblem<T> without(p, be);
  alloy::attention_backward(be, without.backward_args(p, host_out.data(), host_lse.data()));
  expect_same_bits(alloy::to_host(without.dqkv), dqkv, "dq, dk, dv without column parts");

  const AttentionReference<T> ref(p, true, &p.out, &p.lse);
  // fp32 on the tensor cores: 3xTF32 (the bounds at the top of this file).
  const bool three_products = std::is_same_v<T, float> && path == Path::tensor_cores;
  const double host_depth = host_dot_depth(s.head_dim);
  const double any_depth = three_products ? 3 * any_dot_depth(s.head_dim) + 12 : any_dot_depth(s.head_dim);
  const double product_error = three_products ? 24 * fp32_unit : 0.0;
  Compare lse_check("lse");
  for (std::size_t b = 0; b < s.batch; ++b) {
    for (std::size_t h = 0; h < s.heads; ++h) {
      for (std::size_t t = 0; t < s.seq; ++t) {
        const std::size_t i = p.lse_at(b, h, t);
        lse_check.expect(lse[i], p.lse[i], 2 * ref.lse[i].fp32(host_depth) + 2 * ref.lse[i].fp32(any_depth), b, h, t,
                         0);
      }
    }
  }
  if (path == Path::rows) {
    expect_same_bits(out, p.out, "out (Cuda row kernels against Host)");
    expect_same_bits(dqkv, p.dqkv, "dq, dk, dv (Cuda row kernels against Host)");
    std::vector<float> host_parts(part_count);
    auto host_args = p.backward_args();
    host_args.column_parts = host_parts.data();
    alloy::attention_backward(Host{}, host_args);
    expect_same_bits(parts, host_parts, "column parts (Cuda row kernels against Host)");
    return;
  }
  const double u_t = rounding_unit<T>(), f_t = rounding_floor<T>();
  const auto bound = [&](const Bounded& r, double host) {
    return 2 * ulp<T>(std::fabs(host)) + 8 * u_t * r.max_term + 2 * r.fp32(host_depth) + 2 * r.fp32(any_depth) +
           product_error * r.abs_sum + 4 * f_t * r.factor_sum + 2 * f_t;
  };
  constexpr bool float_storage = std::is_same_v<storage_t<T>, float>;
  const double float64_bound = std::is_same_v<T, float> ? 1e-4 : 1e-2;
  const std::string name = alloy::numeric_traits<T>::name;
  // One position: the softmax over one key is constant, so dq and dk are exactly 0 and the float64
  // reference holds only rounding residue (tf32's delta, an unrounded fp32 dot, against dP from
  // tf32 factors leaves about 2^-11 sum |dout v| in the kernels and the Host alike): a relative
  // distance means nothing there, and the element-wise bounds against the Host above hold them.
  const double zero_gradient = s.seq == 1 ? -1.0 : float64_bound;
  Float64Distance out_64(name + " out", float64_bound), dq_64(name + " dq", zero_gradient),
      dk_64(name + " dk", zero_gradient), dv_64(name + " dv", float64_bound);
  Compare out_check("out"), dq_check("dq"), dk_check("dk"), dv_check("dv");
  for (std::size_t b = 0; b < s.batch; ++b) {
    for (std::size_t h = 0; h < s.heads; ++h) {
      for (std::size_t t = 0; t < s.seq; ++t) {
        for (std::size_t d = 0; d < s.head_dim; ++d) {
          const std::size_t i = p.lse_at(b, h, t) * s.head_dim + d;
          const std::size_t o = p.out_at(b, t, h, d), at = p.in_at(b, t, h, d);
          const double host_o = value(p.out[o]);
          out_check.expect(value(out[o]), host_o, bound(ref.out[i], host_o), b, h, t, d);
          const double host_dq = value(p.dqkv[at]), host_dk = value(p.dqkv[at + p.channels]),
                       host_dv = value(p.dqkv[at + 2 * p.channels]);
          dq_check.expect(value(dqkv[at]), host_dq, bound(ref.dq[i], host_dq), b, h, t, d);
          dk_check.expect(value(dqkv[at + p.channels]), host_dk, bound(ref.dk[i], host_dk), b, h, t, d);
          dv_check.expect(value(dqkv[at + 2 * p.channels]), host_dv, bound(ref.dv[i], host_dv), b, h, t, d);
          if constexpr (float_storage) {
            out_64.add(value(out[o]), ref.out[i].value);
            dq_64.add(value(dqkv[at]), ref.dq[i].value);
            dk_64.add(value(dqkv[at + p.channels]), ref.dk[i].value);
            dv_64.add(value(dqkv[at + 2 * p.channels]), ref.dv[i].value);
          }
        }
      }
    }
  }
}

template <class T>
class CudaAttention : public ::testing::Test {};

using TensorCoreDtypes = ::testing::Types<bf16, fp16>;
TYPED_TEST_SUITE(CudaAttention, TensorCoreDtypes, DtypeName);

// Positions 1 (one key), 7, 63 and 65 (around the 64-row tiles), 127, 200 (a tail of 8 past
// three tiles of 64; 72 past one of 128) and 1024 (GPT-2's context); batch x heads odd, so no
// tiling by pairs of heads can hide; one sharper softmax (q, k ~ N(0, 3)).
std::vector<AttentionShape> tensor_core_shapes(std::size_t head_dim) {
  return {{3, 5, 1, head_dim},           {1, 3, 7, head_dim},
          {3, 1, 63, head_dim},          {1, 5, 65, head_dim},
          {3, 3, 127, head_dim},         {1, 3, 200, head_dim},
          {1, 3, 200, head_dim, 8, 3.0}, {1, head_dim == 64 ? 3u : 1u, 1024, head_dim}};
}

TYPED_TEST(CudaAttention, HeadDim64MatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const AttentionShape& s : tensor_core_shapes(64)) {
    expect_cuda_matches_host<TypeParam>(s, seed + s.seq, Path::tensor_cores);
  }
}

TYPED_TEST(CudaAttention, HeadDim128MatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const AttentionShape& s : tensor_core_shapes(128)) {
    expect_cuda_matches_host<TypeParam>(s, seed + s.seq, Path::tensor_cores);
  }
}

// Other head sizes, and rows that are not 16-byte aligned (a row of 3 C + 1 elements), take the
// row kernels: the Host's bits.
TYPED_TEST(CudaAttention, RowKernelsGiveTheHostsBits) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const AttentionShape& s :
       {AttentionShape{3, 1, 65, 40}, AttentionShape{1, 3, 200, 40}, AttentionShape{1, 1, 1, 40},
        AttentionShape{1, 3, 130, 64, 1}, AttentionShape{1, 1, 70, 256}, AttentionShape{3, 1, 33, 1},
        AttentionShape{1, 3, 129, 128, 4}, AttentionShape{1, 1, 100, 96}}) {
    expect_cuda_matches_host<TypeParam>(s, seed + s.seq, Path::rows);
  }
}

TYPED_TEST(CudaAttention, RunsOnTheGivenStream) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const alloy::CudaStream stream = alloy::make_cuda_stream();
  expect_cuda_matches_host<TypeParam>({1, 3, 130, 64}, seed, Path::tensor_cores, Cuda::on(stream.get()));
  expect_cuda_matches_host<TypeParam>({1, 3, 130, 40}, seed, Path::rows, Cuda::on(stream.get()));
}

// The whole chain, forward then backward on the forward's own out and lse, twice: the same bits.
template <class T>
void expect_chain_runs_twice_alike(const AttentionShape& s, std::uint64_t seed) {
  SCOPED_TRACE(describe(alloy::numeric_traits<T>::name, s));
  std::mt19937_64 rng(seed);
  const AttentionProblem<T> p(s, rng);
  std::vector<storage_t<T>> outs[2], grads[2];
  std::vector<float> lses[2];
  for (int run = 0; run < 2; ++run) {
    DeviceProblem<T> dev(p);
    alloy::attention_forward(Cuda{}, dev.forward_args(p));
    alloy::attention_backward(Cuda{}, dev.backward_args(p, dev.out.data(), dev.lse.data()));
    outs[run] = alloy::to_host(dev.out);
    grads[run] = alloy::to_host(dev.dqkv);
    lses[run] = alloy::to_host(dev.lse);
  }
  expect_same_bits(outs[1], outs[0], "out");
  expect_same_bits(lses[1], lses[0], "lse");
  expect_same_bits(grads[1], grads[0], "dq, dk, dv");
}

TYPED_TEST(CudaAttention, RunsTwiceToTheSameBits) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  expect_chain_runs_twice_alike<TypeParam>({4, 12, 1024, 64}, seed);
  expect_chain_runs_twice_alike<TypeParam>({3, 5, 333, 128}, seed);
  expect_chain_runs_twice_alike<TypeParam>({3, 5, 333, 40}, seed);
}

// One position: P = 1, so out = v and dv = dout exactly on every path, and nothing is NaN (the
// row's maximum starts at -infinity; the tile's other 63 keys are masked).
TYPED_TEST(CudaAttention, OnePositionGivesValuesAndNoNaN) {
  using T = TypeParam;
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (std::size_t head_dim : {64, 128, 40}) {
    SCOPED_TRACE("head_dim " + std::to_string(head_dim));
    std::mt19937_64 rng(seed);
    const AttentionShape s{3, 5, 1, head_dim};
    const AttentionProblem<T> p(s, rng);
    DeviceProblem<T> dev(p);
    alloy::attention_forward(Cuda{}, dev.forward_args(p));
    alloy::attention_backward(Cuda{}, dev.backward_args(p, dev.out.data(), dev.lse.data()));
    const auto out = alloy::to_host(dev.out), dqkv = alloy::to_host(dev.dqkv);
    const auto lse = alloy::to_host(dev.lse);
    std::size_t wrong = 0, not_finite = 0;
    for (std::size_t b = 0; b < s.batch; ++b) {
      for (std::size_t h = 0; h < s.heads; ++h) {
        not_finite += !std::isfinite(lse[p.lse_at(b, h, 0)]);
        for (std::size_t d = 0; d < head_dim; ++d) {
          const std::size_t at = p.in_at(b, 0, h, d);
          wrong += bits_of(out[p.out_at(b, 0, h, d)]) != bits_of(p.qkv[at + 2 * p.channels]);
          wrong += bits_of(dqkv[at + 2 * p.channels]) != bits_of(p.dout[p.out_at(b, 0, h, d)]);
          // dq = dk = scale dS k, dS = dP - delta with both dot(dout, v): 0 up to their rounding.
          not_finite += !std::isfinite(value(dqkv[at])) || !std::isfinite(value(dqkv[at + p.channels]));
          wrong += std::fabs(value(dqkv[at])) > 1e-3 || std::fabs(value(dqkv[at + p.channels])) > 1e-3;
        }
      }
    }
    EXPECT_EQ(not_finite, 0u) << "NaN or infinite elements";
    EXPECT_EQ(wrong, 0u) << "elements other than out = v, dv = dout, dq = dk = 0";
  }
}

// ---- Float storage: fp32 (3xTF32) and tf32 on the tensor cores ----

template <class T>
class CudaAttentionFloat : public ::testing::Test {};

using FloatDtypes = ::testing::Types<float, tf32>;
TYPED_TEST_SUITE(CudaAttentionFloat, FloatDtypes, DtypeName);

// Positions 1 (one key), 37, 100, 129 (one past two 64-row tiles), 257 (one past four; past eight
// 32-key and sixteen 16-query tiles at head_dim 128) and 1024 (GPT-2's context); batch x heads
// odd; rows padded by 8 floats and by 4 (a 16-byte vector: still whole vectors); one sharper
// softmax (q, k ~ N(0, 3)).
std::vector<AttentionShape> float_tensor_core_shapes(std::size_t head_dim) {
  return {{3, 5, 1, head_dim},
          {1, 3, 37, head_dim},
          {3, 1, 100, head_dim, 4},
          {1, 5, 129, head_dim},
          {1, 3, 257, head_dim},
          {1, 3, 200, head_dim, 8, 3.0},
          {1, head_dim == 64 ? 3u : 1u, 1024, head_dim}};
}

TYPED_TEST(CudaAttentionFloat, HeadDim64MatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const AttentionShape& s : float_tensor_core_shapes(64)) {
    expect_cuda_matches_host<TypeParam>(s, seed + s.seq, Path::tensor_cores);
  }
}

TYPED_TEST(CudaAttentionFloat, HeadDim128MatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const AttentionShape& s : float_tensor_core_shapes(128)) {
    expect_cuda_matches_host<TypeParam>(s, seed + s.seq, Path::tensor_cores);
  }
}

// Other head sizes, and rows that are not whole 16-byte vectors (a row of 3 C + 1 or 3 C + 2
// floats), take the row kernels: the Host's bits, tf32's roundings included.
TYPED_TEST(CudaAttentionFloat, RowKernelsGiveTheHostsBits) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (const AttentionShape& s :
       {AttentionShape{3, 1, 65, 40}, AttentionShape{1, 3, 127, 64, 1}, AttentionShape{1, 1, 200, 128, 2},
        AttentionShape{3, 3, 7, 96}, AttentionShape{1, 1, 1, 32}, AttentionShape{1, 2, 70, 256}}) {
    expect_cuda_matches_host<TypeParam>(s, seed + s.seq, Path::rows);
  }
}

TYPED_TEST(CudaAttentionFloat, RunsOnTheGivenStream) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const alloy::CudaStream stream = alloy::make_cuda_stream();
  expect_cuda_matches_host<TypeParam>({1, 3, 130, 64}, seed, Path::tensor_cores, Cuda::on(stream.get()));
  expect_cuda_matches_host<TypeParam>({1, 3, 130, 40}, seed, Path::rows, Cuda::on(stream.get()));
}

TYPED_TEST(CudaAttentionFloat, RunsTwiceToTheSameBits) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  expect_chain_runs_twice_alike<TypeParam>({4, 12, 1024, 64}, seed);
  expect_chain_runs_twice_alike<TypeParam>({3, 5, 333, 128}, seed);
}

// One position: P = 1 up to the rounding of the score's scaling (exp2 of at most half an ulp of
// it), so out = v and dv = dout (for tf32 both rounded to tf32: the factors P multiplies) within
// 1e-5 relative, and nothing is NaN. dq = dk = scale dS k with dS = dP - delta, both dot(dout, v):
// for fp32 0 up to 1e-4 sum |dout v| (fp32 errors, generously); for tf32, whose dP rounds dout
// and v and whose delta does not, up to 2.5 2^-11 sum |dout v| more.
TYPED_TEST(CudaAttentionFloat, OnePositionGivesValuesAndNoNaN) {
  using T = TypeParam;
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const auto factor = [](float x) { return double(alloy::detail::attention_factor<T>(x)); };
  for (std::size_t head_dim : {64, 128}) {
    SCOPED_TRACE("head_dim " + std::to_string(head_dim));
    std::mt19937_64 rng(seed);
    const AttentionShape s{3, 5, 1, head_dim};
    const AttentionProblem<T> p(s, rng);
    DeviceProblem<T> dev(p);
    ASSERT_TRUE(alloy::attention_uses_tensor_cores(dev.forward_args(p)));
    alloy::attention_forward(Cuda{}, dev.forward_args(p));
    alloy::attention_backward(Cuda{}, dev.backward_args(p, dev.out.data(), dev.lse.data()));
    const auto out = alloy::to_host(dev.out), dqkv = alloy::to_host(dev.dqkv);
    const auto lse = alloy::to_host(dev.lse);
    std::size_t wrong = 0, not_finite = 0;
    for (std::size_t b = 0; b < s.batch; ++b) {
      for (std::size_t h = 0; h < s.heads; ++h) {
        not_finite += !std::isfinite(lse[p.lse_at(b, h, 0)]);
        double dout_v = 0, k_max = 0, q_max = 0;
        for (std::size_t d = 0; d < head_dim; ++d) {
          const std::size_t at = p.in_at(b, 0, h, d);
          dout_v += std::fabs(double(p.dout[p.out_at(b, 0, h, d)]) * p.qkv[at + 2 * p.channels]);
          q_max = std::max(q_max, std::fabs(double(p.qkv[at])));
          k_max = std::max(k_max, std::fabs(double(p.qkv[at + p.channels])));
        }
        const double ds_bound = (2.5 * rounding_unit<T>() + 1e-4) * dout_v, scale = 1 / std::sqrt(double(head_dim));
        for (std::size_t d = 0; d < head_dim; ++d) {
          const std::size_t at = p.in_at(b, 0, h, d);
          const double v = factor(p.qkv[at + 2 * p.channels]), g = factor(p.dout[p.out_at(b, 0, h, d)]);
          wrong += !(std::fabs(out[p.out_at(b, 0, h, d)] - v) <= 1e-5 * std::fabs(v));
          wrong += !(std::fabs(dqkv[at + 2 * p.channels] - g) <= 1e-5 * std::fabs(g));
          not_finite += !std::isfinite(dqkv[at]) || !std::isfinite(dqkv[at + p.channels]);
          wrong += !(std::fabs(dqkv[at]) <= 1.01 * ds_bound * scale * k_max);
          wrong += !(std::fabs(dqkv[at + p.channels]) <= 1.01 * ds_bound * scale * q_max);
        }
      }
    }
    EXPECT_EQ(not_finite, 0u) << "NaN or infinite elements";
    EXPECT_EQ(wrong, 0u) << "elements other than out = v, dv = dout, dq = dk = 0 (within the bounds above)";
  }
}

TEST(CudaAttentionArguments, BackwardWithoutScratchNamesIt) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(1);
  const AttentionProblem<bf16> p({2, 3, 10, 64}, rng);
  DeviceProblem<bf16> dev(p);
  auto a = dev.backward_args(p, dev.out.data(), dev.lse.data());
  a.scratch = nullptr;
  EXPECT_MENTIONS(message_of([&] { alloy::attention_backward(Cuda{}, a); }),
                  "attention_backward<bf16>: scratch is null; it needs attention_backward_scratch_floats(2, 3, 10) "
                  "= 60 floats");
}

// head_dim 64 in bf16 and fp16 runs wgmma where this test's device code was compiled for sm_90a
// (CMAKE_CUDA_ARCHITECTURES 90a: alloy_gpu_tests) and mma.sync where it was compiled for sm_90
// (alloy_gpu_tests_sm90, which builds this file again): the tests above then cover both paths.
#ifndef ALLOY_TEST_EXPECT_WGMMA
#error "tests/CMakeLists.txt defines ALLOY_TEST_EXPECT_WGMMA: 1 for device code compiled for sm_90a, 0 otherwise"
#endif
TEST(CudaAttentionPath, HeadDim64RunsTheKernelsCompiledForThisArchitecture) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  int device = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  EXPECT_EQ(alloy::detail::flash_wgmma_compiled(device), ALLOY_TEST_EXPECT_WGMMA != 0);
}

}  // namespace
