// Causal self-attention on the Host backend: against a float64 formulation that holds the whole
// seq x seq matrix, on fresh random inputs of small odd sizes; the causal mask; gradients against
// central finite differences; strides; and the errors bad arguments raise.
//
// Bounds against float64 (tests/support/attention_reference.hpp defines A, F, E per element): an
// output of compute dtype T, stored as S, must lie within
//   2 (r_T u_T A + E(depth + i_T) + f_T F) + u_S |exact| + f_T
// of the exact value: u_T A covers rounding P or dS to T in every term (r_T = 2 for tf32, which
// rounds the term's other factor too; 1 otherwise), E the fp32 errors (of the Host's dot products,
// depth = head_dim / 32 + 6; i_T = 2^14 for tf32 counts the rounding of the scores' and dP's
// factors to tf32, 0 otherwise), f_T the absolute error of rounding to T near zero (fp16
// subnormals), u_S |exact| + f_T the output's own rounding; the factor 2 is the margin over these
// first-order bounds. lse must lie within 2 E(depth + i_T).
#include "../support/attention_reference.hpp"
#include "../support/test_support.hpp"
#include "../support/values.hpp"

#include <alloy/backend/cuda/warp_reduce.hpp>
#include <alloy/kernels/attention.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using alloy::AttentionArgs;
using alloy::AttentionBackwardArgs;
using alloy::AttentionStrides;
using alloy::bf16;
using alloy::fp16;
using alloy::Host;
using alloy::storage_t;
using alloy::tf32;
using namespace alloy::test;

// ---- The row arithmetic shared with the Cuda row kernels ----

TEST(AttentionExp2, IsWithinTwoUlpAcrossItsRange) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> anywhere(-125.0f, 127.99f);
  std::vector<float> xs;
  for (float x = -125.0f; x < 128.0f; x += 0.013f) xs.push_back(x);
  for (int i = 0; i < 200000; ++i) xs.push_back(anywhere(rng));
  for (float x : {-0.5f, 0.5f, -1e-30f, 1e-30f, 127.5f, 127.99998f, -124.99f}) xs.push_back(x);
  int failures = 0;
  for (float x : xs) {
    const double exact = std::exp2(double(x));
    const double got = alloy::detail::attention_exp2(x);
    const double allowed = 2 * std::ldexp(1.0, std::ilogb(exact) - 23);
    if (!(std::fabs(got - exact) <= allowed) && ++failures <= 5) {
      ADD_FAILURE() << "attention_exp2(" << x << ") = " << got << ", exact " << exact << ", allowed error " << allowed;
    }
  }
  EXPECT_EQ(failures, 0);
}

TEST(AttentionExp2, IsExactAtIntegersAndFlushesSaturatesAndPropagatesNaN) {
  for (int n = -125; n <= 127; ++n) EXPECT_EQ(alloy::detail::attention_exp2(float(n)), std::ldexp(1.0f, n)) << n;
  EXPECT_EQ(alloy::detail::attention_exp2(-125.5f), 0.0f);
  EXPECT_EQ(alloy::detail::attention_exp2(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(alloy::detail::attention_exp2(128.0f), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(alloy::detail::attention_exp2(std::numeric_limits<float>::quiet_NaN())));
}

// attention_dot_replay's tree is warp_allreduce's butterfly in lane 0 (butterfly_replay).
TEST(AttentionDotReplay, IsTheButterflyOverLaneShares) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  for (int head_dim : {1, 7, 32, 40, 64, 128, 200, 256}) {
    const auto a = normal<float>(head_dim, 0.0, 3.0, rng), b = normal<float>(head_dim, 0.0, 3.0, rng);
    float lanes[alloy::detail::warp_size];
    for (int l = 0; l < alloy::detail::warp_size; ++l) {
      float share = 0.0f;
      for (int d = l; d < head_dim; d += alloy::detail::warp_size) {
        share = alloy::fp::add(share, alloy::fp::mul(a[d], b[d]));
      }
      lanes[l] = share;
    }
    const float butterfly = alloy::detail::butterfly_replay(lanes, alloy::detail::AttentionSum{});
    EXPECT_EQ(bits_of(alloy::detail::attention_dot_replay<float>(a.data(), b.data(), head_dim)), bits_of(butterfly))
        << "head_dim " << head_dim;
  }
}

// ---- Host forward and backward against float64 ----

template <class T>
class AttentionHost : public ::testing::Test {};

using Dtypes = ::testing::Types<bf16, fp16, float, tf32>;
TYPED_TEST_SUITE(AttentionHost, Dtypes, DtypeName);

// Positions 1 and 7 (inside the first key block), 65 and 130 (past one and two blocks), head
// sizes from 1 to 256 (one to eight per lane, and lanes with none), batch x heads odd and even,
// and sharper softmaxes (q, k ~ N(0, 3)) whose running maximum moves from block to block.
const AttentionShape host_shapes[] = {
    {1, 1, 1, 8},    {2, 3, 7, 8}, {1, 2, 65, 40},  {3, 1, 130, 64},         {1, 3, 67, 128},
    {1, 1, 33, 256}, {2, 1, 5, 1}, {1, 2, 100, 33}, {1, 1, 150, 64, 8, 3.0}, {3, 1, 70, 16, 1, 3.0}};

template <class T>
void run_host(AttentionProblem<T>& p) {
  alloy::attention_forward(Host{}, p.forward_args());
  alloy::attention_backward(Host{}, p.backward_args());
}

// Elements of the row padding (outside every head's elements) still hold the poison.
template <class T>
void expect_padding_untouched(const AttentionProblem<T>& p) {
  std::size_t touched = 0;
  for (std::size_t r = 0; r < p.s.batch * p.s.seq; ++r) {
    for (std::size_t c = p.channels; c < p.out_row; ++c)
      touched += bits_of(p.out[r * p.out_row + c]) != bits_of(poison<storage_t<T>>());
    for (std::size_t c = 3 * p.channels; c < p.qkv_row; ++c)
      touched += bits_of(p.dqkv[r * p.qkv_row + c]) != bits_of(poison<storage_t<T>>());
  }
  EXPECT_EQ(touched, 0u) << "elements of the row padding written";
}

template <class T>
void expect_within_float64(const AttentionShape& s, std::uint64_t seed) {
  SCOPED_TRACE(describe(alloy::numeric_traits<T>::name, s));
  std::mt19937_64 rng(seed);
  AttentionProblem<T> p(s, rng);
  run_host(p);
  expect_padding_untouched(p);
  const AttentionReference<T> ref(p, true, &p.out, &p.lse);
  const double u_t = rounding_unit<T>(), u_s = rounding_unit<storage_t<T>>(), f_t = rounding_floor<T>();
  const double depth = host_dot_depth(s.head_dim) + input_rounding_depth<T>(), r_t = factor_roundings<T>();
  const auto bound = [&](const Bounded& r) {
    return 2 * (r_t * u_t * r.abs_sum + r.fp32(depth) + f_t * r.factor_sum) + u_s * std::fabs(r.value) + f_t;
  };
  BoundCheck out("out"), lse("lse"), dq("dq"), dk("dk"), dv("dv");
  for (std::size_t b = 0; b < s.batch; ++b) {
    for (std::size_t h = 0; h < s.heads; ++h) {
      for (std::size_t t = 0; t < s.seq; ++t) {
        const std::size_t row = p.lse_at(b, h, t);
        lse.expect(p.lse[row], ref.lse[row].value, 2 * ref.lse[row].fp32(depth), row, 0);
        for (std::size_t d = 0; d < s.head_dim; ++d) {
          const std::size_t i = row * s.head_dim + d, at = p.in_at(b, t, h, d);
          out.expect(value(p.out[p.out_at(b, t, h, d)]), ref.out[i].value, bound(ref.out[i]), row, d);
          dq.expect(value(p.dqkv[at]), ref.dq[i].value, bound(ref.dq[i]), row, d);
          dk.expect(value(p.dqkv[at + p.channels]), ref.dk[i].value, bound(ref.dk[i]), row, d);
          dv.expect(value(p.dqkv[at + 2 * p.channels]), ref.dv[i].value, bound(ref.dv[i]), row, d);
        }
      }
    }
  }
}

TYPED_TEST(AttentionHost, IsWithinItsBoundsOfFloat64) {
  ALLOY_SEEDED(seed);
  for (const AttentionShape& s : host_shapes) expect_within_float64<TypeParam>(s, seed + s.seq * 31 + s.head_dim);
}

// Keys and values after position t0 do not change out or lse at positions up to t0 (their bits).
TYPED_TEST(AttentionHost, FutureKeysDoNotReachEarlierRows) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const AttentionShape s{2, 3, 130, 40};
  AttentionProblem<T> p(s, rng);
  alloy::attention_forward(Host{}, p.forward_args());
  const auto out = p.out;
  const auto lse = p.lse;
  const std::size_t t0 = 66;
  const auto fresh = normal<storage_t<T>>(p.qkv.size(), 0.0, 1.0, rng);
  for (std::size_t b = 0; b < s.batch; ++b) {
    for (std::size_t t = t0 + 1; t < s.seq; ++t) {
      for (std::size_t c = p.channels; c < 3 * p.channels; ++c) {
        const std::size_t i = (b * s.seq + t) * p.qkv_row + c;
        p.qkv[i] = fresh[i];
      }
    }
  }
  alloy::attention_forward(Host{}, p.forward_args());
  std::size_t early_changed = 0, late_changed = 0;
  for (std::size_t b = 0; b < s.batch; ++b) {
    for (std::size_t t = 0; t < s.seq; ++t) {
      std::size_t changed = 0;
      for (std::size_t h = 0; h < s.heads; ++h) {
        changed += bits_of(p.lse[p.lse_at(b, h, t)]) != bits_of(lse[p.lse_at(b, h, t)]);
        for (std::size_t d = 0; d < s.head_dim; ++d)
          changed += bits_of(p.out[p.out_at(b, t, h, d)]) != bits_of(out[p.out_at(b, t, h, d)]);
      }
      (t <= t0 ? early_changed : late_changed) += changed;
    }
  }
  EXPECT_EQ(early_changed, 0u) << "elements of out and lse at positions <= " << t0 << " changed";
  EXPECT_GT(late_changed, 0u) << "the later positions should have seen the new keys";
}

// Queries (and their dout, out, lse) before position j0 do not change dk, dv or dq at positions
// from j0 on.
TYPED_TEST(AttentionHost, EarlierQueriesDoNotReachLaterKeysGradients) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const AttentionShape s{1, 3, 129, 64};
  AttentionProblem<T> p(s, rng);
  run_host(p);
  const auto dqkv = p.dqkv;
  const std::size_t j0 = 64;
  const auto fresh = normal<storage_t<T>>(p.qkv.size(), 0.0, 1.0, rng);
  const auto fresh_out = normal<storage_t<T>>(p.out.size(), 0.0, 1.0, rng);
  for (std::size_t t = 0; t < j0; ++t) {
    for (std::size_t c = 0; c < p.channels; ++c) {
      p.qkv[t * p.qkv_row + c] = fresh[t * p.qkv_row + c];
      p.dout[t * p.out_row + c] = fresh_out[t * p.out_row + c];
      p.out[t * p.out_row + c] = fresh_out[t * p.out_row + c + 1];
    }
    for (std::size_t h = 0; h < s.heads; ++h) p.lse[p.lse_at(0, h, t)] += 0.5f;
  }
  alloy::attention_backward(Host{}, p.backward_args());
  std::size_t later_changed = 0, earlier_changed = 0;
  for (std::size_t t = 0; t < s.seq; ++t) {
    for (std::size_t c = 0; c < 3 * p.channels; ++c) {
      const bool same = bits_of(p.dqkv[t * p.qkv_row + c]) == bits_of(dqkv[t * p.qkv_row + c]);
      (t >= j0 ? later_changed : earlier_changed) += !same;
    }
  }
  EXPECT_EQ(later_changed, 0u) << "elements of dq, dk, dv at positions >= " << j0 << " changed";
  EXPECT_GT(earlier_changed, 0u);
}

// The same problem through GPT-2's fused layout and through contiguous [batch, heads, seq, D]
// tensors gives the same bits.
TYPED_TEST(AttentionHost, StridesDoNotChangeTheBits) {
  using T = TypeParam;
  using S = storage_t<T>;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const AttentionShape s{2, 3, 70, 24};
  AttentionProblem<T> p(s, rng);
  run_host(p);
  const std::size_t n = s.batch * s.heads * s.seq * s.head_dim;
  std::vector<S> q(n), k(n), v(n), dout(n), out(n, poison<S>()), dq(n, poison<S>()), dk(n, poison<S>()),
      dv(n, poison<S>());
  std::vector<float> lse(s.batch * s.heads * s.seq, poison<float>());
  const AttentionStrides packed = AttentionStrides::heads_major(s.heads, s.seq, s.head_dim);
  const auto at = [&](std::size_t b, std::size_t t, std::size_t h, std::size_t d) {
    return b * packed.batch + t * packed.row + h * packed.head + d;
  };
  for (std::size_t b = 0; b < s.batch; ++b) {
    for (std::size_t t = 0; t < s.seq; ++t) {
      for (std::size_t h = 0; h < s.heads; ++h) {
        for (std::size_t d = 0; d < s.head_dim; ++d) {
          q[at(b, t, h, d)] = p.qkv[p.in_at(b, t, h, d)];
          k[at(b, t, h, d)] = p.qkv[p.in_at(b, t, h, d) + p.channels];
          v[at(b, t, h, d)] = p.qkv[p.in_at(b, t, h, d) + 2 * p.channels];
          dout[at(b, t, h, d)] = p.dout[p.out_at(b, t, h, d)];
        }
      }
    }
  }
  alloy::attention_forward(Host{}, AttentionArgs<T>{.batch = s.batch,
                                                    .heads = s.heads,
                                                    .seq = s.seq,
                                                    .head_dim = s.head_dim,
                                                    .q = q.data(),
                                                    .k = k.data(),
                                                    .v = v.data(),
                                                    .qkv_strides = packed,
                                                    .out = out.data(),
                                                    .out_strides = packed,
                                                    .lse = lse.data()});
  alloy::attention_backward(Host{}, AttentionBackwardArgs<T>{.batch = s.batch,
                                                             .heads = s.heads,
                                                             .seq = s.seq,
                                                             .head_dim = s.head_dim,
                                                             .q = q.data(),
                                                             .k = k.data(),
                                                             .v = v.data(),
                                                             .qkv_strides = packed,
                                                             .out = out.data(),
                                                             .dout = dout.data(),
                                                             .out_strides = packed,
                                                             .lse = lse.data(),
                                                             .dq = dq.data(),
                                                             .dk = dk.data(),
                                                             .dv = dv.data(),
                                                             .grad_strides = packed});
  std::size_t differ = 0;
  for (std::size_t b = 0; b < s.batch; ++b) {
    for (std::size_t t = 0; t < s.seq; ++t) {
      for (std::size_t h = 0; h < s.heads; ++h) {
        differ += bits_of(lse[p.lse_at(b, h, t)]) != bits_of(p.lse[p.lse_at(b, h, t)]);
        for (std::size_t d = 0; d < s.head_dim; ++d) {
          const std::size_t i = at(b, t, h, d), fused = p.in_at(b, t, h, d);
          differ += bits_of(out[i]) != bits_of(p.out[p.out_at(b, t, h, d)]);
          differ += bits_of(dq[i]) != bits_of(p.dqkv[fused]);
          differ += bits_of(dk[i]) != bits_of(p.dqkv[fused + p.channels]);
          differ += bits_of(dv[i]) != bits_of(p.dqkv[fused + 2 * p.channels]);
        }
      }
    }
  }
  EXPECT_EQ(differ, 0u) << "elements that differ between the fused and the contiguous layout";
}

// With one position, P = 1: out = v, dv = dout, exactly (for tf32: v and dout rounded to tf32,
// the factors P multiplies); lse = the one score. dq = dk = scale dS k with dS = dP - delta, both
// dot(dout, v): exactly 0, except for tf32, whose dP takes dout and v rounded to tf32 and whose
// delta does not (it is no tensor-core product), so |dS| <= 2^-11 sum |dout v| + fp32 errors.
TYPED_TEST(AttentionHost, OnePositionPassesValuesThrough) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const AttentionShape s{3, 5, 1, 64};
  AttentionProblem<T> p(s, rng);
  run_host(p);
  const auto factor = [](storage_t<T> x) { return alloy::detail::attention_factor<T>(x); };
  for (std::size_t b = 0; b < s.batch; ++b) {
    for (std::size_t h = 0; h < s.heads; ++h) {
      double score = 0, dout_v = 0, k_max = 0, q_max = 0;
      for (std::size_t d = 0; d < s.head_dim; ++d) {
        const std::size_t i = p.in_at(b, 0, h, d);
        score += double(factor(p.qkv[i])) * factor(p.qkv[i + p.channels]);
        dout_v += std::fabs(value(p.dout[p.out_at(b, 0, h, d)]) * value(p.qkv[i + 2 * p.channels]));
        k_max = std::max(k_max, std::fabs(value(p.qkv[i + p.channels])));
        q_max = std::max(q_max, std::fabs(value(p.qkv[i])));
      }
      const double ds_bound = rounding_unit<T>() * dout_v * 2.5 + 1e-5 * dout_v;
      for (std::size_t d = 0; d < s.head_dim; ++d) {
        const std::size_t i = p.in_at(b, 0, h, d);
        EXPECT_EQ(bits_of(p.out[p.out_at(b, 0, h, d)]), bits_of(storage_t<T>(factor(p.qkv[i + 2 * p.channels]))));
        EXPECT_EQ(bits_of(p.dqkv[i + 2 * p.channels]), bits_of(storage_t<T>(factor(p.dout[p.out_at(b, 0, h, d)]))));
        if constexpr (std::is_same_v<T, tf32>) {
          EXPECT_LE(std::fabs(value(p.dqkv[i])), ds_bound * k_max / 8.0);
          EXPECT_LE(std::fabs(value(p.dqkv[i + p.channels])), ds_bound * q_max / 8.0);
        } else {
          EXPECT_EQ(value(p.dqkv[i]), 0.0);
          EXPECT_EQ(value(p.dqkv[i + p.channels]), 0.0);
        }
      }
      EXPECT_NEAR(p.lse[p.lse_at(b, h, 0)], score / 8.0, 1e-5 * (1 + std::fabs(score)));
    }
  }
}

// ---- Column parts ----

// The column parts (attention_args.hpp) are dq's, dk's and dv's stored values summed per tile of 64
// positions in position order, as the definition computes them from the Host's own output, bit for
// bit; requesting them changes no output; nothing is written past them. Sequences of 1, 63, 64, 65,
// 77, 130 and 129 positions (one tile, short ones, a full one, a tail of one), head sizes 64 and
// 128 (the tensor cores' on Cuda) and odd ones.
TYPED_TEST(AttentionHost, ColumnPartsSumTheStoredGradientsOverEachTileInOrder) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  const AttentionShape shapes[] = {{1, 1, 1, 64},  {2, 3, 63, 64},   {1, 1, 64, 64},  {1, 2, 65, 128}, {3, 1, 77, 64},
                                   {1, 2, 130, 5}, {2, 1, 130, 128}, {1, 3, 129, 33}, {2, 1, 77, 1, 0}};
  for (const AttentionShape& s : shapes) {
    SCOPED_TRACE(describe(alloy::numeric_traits<T>::name, s));
    std::mt19937_64 rng(seed + s.seq * 7 + s.head_dim);
    AttentionProblem<T> p(s, rng);
    alloy::attention_forward(Host{}, p.forward_args());
    alloy::attention_backward(Host{}, p.backward_args());
    const auto without_parts = p.dqkv;

    const std::size_t floats = alloy::attention_column_parts_floats(s.batch, s.heads, s.seq, s.head_dim);
    ASSERT_EQ(floats, s.batch * ((s.seq + 63) / 64) * 3 * s.heads * s.head_dim);
    std::vector<float> parts(floats + 1, poison<float>());
    std::fill(p.dqkv.begin(), p.dqkv.end(), poison<storage_t<T>>());
    auto args = p.backward_args();
    args.column_parts = parts.data();
    alloy::attention_backward(Host{}, args);
    expect_padding_untouched(p);
    std::size_t changed = 0;
    for (std::size_t i = 0; i < p.dqkv.size(); ++i) changed += bits_of(p.dqkv[i]) != bits_of(without_parts[i]);
    EXPECT_EQ(changed, 0u) << "elements of dq, dk, dv that the column parts changed";
    EXPECT_EQ(bits_of(parts[floats]), bits_of(poison<float>())) << "written past the column parts";

    const std::vector<float> want = column_parts_of(p, p.dqkv);
    std::size_t differ = 0, nonzero = 0;
    for (std::size_t i = 0; i < floats; ++i) {
      differ += bits_of(parts[i]) != bits_of(want[i]);
      nonzero += want[i] != 0.0f;
    }
    EXPECT_EQ(differ, 0u) << "column parts whose bits differ from the definition's";
    // dq and dk of the one-position sequence are exactly 0 (but for tf32's rounding residue).
    EXPECT_GE(nonzero, s.seq == 1 ? floats / 3 : floats * 9 / 10) << "too few nonzero parts to test the sums";
  }
}

TEST(AttentionColumnParts, SizesCountEveryTileOfEverySequence) {
  EXPECT_EQ(alloy::attention_column_parts_floats(1, 1, 1, 1), 3u);
  EXPECT_EQ(alloy::attention_column_parts_floats(3, 2, 64, 5), 3u * 1 * 3 * 2 * 5);
  EXPECT_EQ(alloy::attention_column_parts_floats(3, 2, 65, 5), 3u * 2 * 3 * 2 * 5);
  EXPECT_EQ(alloy::attention_column_parts_floats(16, 12, 1024, 64), 16u * 16 * 2304);
  EXPECT_EQ(alloy::attention_column_parts_floats(2, 3, 0, 64), 0u);
}

// ---- tf32 ----

// tf32's factors are rounded to nearest even, as the tf32 GEMMs' Host reference rounds them, and
// P and dS the same way; the other dtypes' factors pass through.
TEST(AttentionTf32, RoundsFactorsToNearestEven) {
  using alloy::detail::attention_factor;
  using alloy::detail::float_from_bits;
  using alloy::detail::rounded_to;
  const float tie_down = float_from_bits(0x3f801000u), tie_up = float_from_bits(0x3f803000u);
  const float above = float_from_bits(0x3f801001u);
  EXPECT_EQ(bits_of(attention_factor<tf32>(tie_down)), 0x3f800000u);
  EXPECT_EQ(bits_of(attention_factor<tf32>(tie_up)), 0x3f804000u);
  EXPECT_EQ(bits_of(attention_factor<tf32>(above)), 0x3f802000u);
  EXPECT_EQ(bits_of(rounded_to<tf32>(-above)), 0xbf802000u);
  EXPECT_EQ(bits_of(attention_factor<float>(above)), bits_of(above));
  EXPECT_EQ(bits_of(rounded_to<float>(above)), bits_of(above));
  EXPECT_EQ(bits_of(rounded_to<bf16>(above)), 0x3f800000u);
}

// tf32 rounds q, k and v only as factors of products: the same problem with them rounded to tf32
// beforehand gives the same bits, forward and backward (whose delta takes out and dout as they
// are: both are the same here), while fp32 on the same inputs differs.
TEST(AttentionTf32, RoundsOnlyTheProductsFactors) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const AttentionShape s{2, 3, 100, 40};
  AttentionProblem<tf32> p(s, rng);
  AttentionProblem<tf32> rounded = p;
  AttentionProblem<float> fp32(s, rng);
  fp32.qkv = p.qkv;
  fp32.dout = p.dout;
  for (float& x : rounded.qkv) x = alloy::detail::round_to_tf32(x);
  run_host(p);
  run_host(rounded);
  run_host(fp32);
  std::size_t differ = 0, differ_from_fp32 = 0;
  for (std::size_t i = 0; i < p.out.size(); ++i) {
    differ += bits_of(p.out[i]) != bits_of(rounded.out[i]);
    differ_from_fp32 += bits_of(p.out[i]) != bits_of(fp32.out[i]);
  }
  for (std::size_t i = 0; i < p.lse.size(); ++i) differ += bits_of(p.lse[i]) != bits_of(rounded.lse[i]);
  for (std::size_t i = 0; i < p.dqkv.size(); ++i) differ += bits_of(p.dqkv[i]) != bits_of(rounded.dqkv[i]);
  EXPECT_EQ(differ, 0u) << "elements of out, lse, dq, dk, dv that differ";
  EXPECT_GT(differ_from_fp32, p.out.size() / 2) << "tf32 should round where fp32 does not";
}

// ---- Gradients against finite differences ----

// sum over t, d of w_td out_td, in float64, for q, k and v given in p's layout.
double weighted_output(const AttentionProblem<float>& p, const std::vector<double>& qkv) {
  const auto& s = p.s;
  const double scale = 1.0 / std::sqrt(double(s.head_dim));
  double loss = 0;
  std::vector<double> w(s.seq);
  for (std::size_t b = 0; b < s.batch; ++b) {
    for (std::size_t h = 0; h < s.heads; ++h) {
      for (std::size_t t = 0; t < s.seq; ++t) {
        double m = -INFINITY;
        for (std::size_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (std::size_t d = 0; d < s.head_dim; ++d)
            dot += qkv[p.in_at(b, t, h, d)] * qkv[p.in_at(b, j, h, d) + p.channels];
          w[j] = dot * scale;
          m = std::max(m, w[j]);
        }
        double sum = 0;
        for (std::size_t j = 0; j <= t; ++j) sum += (w[j] = std::exp(w[j] - m));
        for (std::size_t d = 0; d < s.head_dim; ++d) {
          double o = 0;
          for (std::size_t j = 0; j <= t; ++j) o += w[j] / sum * qkv[p.in_at(b, j, h, d) + 2 * p.channels];
          loss += double(p.dout[p.out_at(b, t, h, d)]) * o;
        }
      }
    }
  }
  return loss;
}

// The Host's fp32 backward against central differences (step 1e-4) of the float64 forward, for
// every element of q, k and v: the differences' own error is about 1e-8, the fp32 backward's
// about 1e-6 relative; allowed 1e-4 relative plus 1e-5.
TEST(AttentionGradients, MatchFiniteDifferences) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const AttentionShape s{2, 2, 6, 5};
  AttentionProblem<float> p(s, rng);
  run_host(p);
  std::vector<double> qkv(p.qkv.begin(), p.qkv.end());
  for (std::size_t b = 0; b < s.batch; ++b) {
    for (std::size_t t = 0; t < s.seq; ++t) {
      for (std::size_t c = 0; c < 3 * p.channels; ++c) {
        const std::size_t i = (b * s.seq + t) * p.qkv_row + c;
        const double keep = qkv[i], step = 1e-4;
        qkv[i] = keep + step;
        const double up = weighted_output(p, qkv);
        qkv[i] = keep - step;
        const double down = weighted_output(p, qkv);
        qkv[i] = keep;
        const double numeric = (up - down) / (2 * step);
        const char* which = c < p.channels ? "dq" : c < 2 * p.channels ? "dk" : "dv";
        EXPECT_NEAR(p.dqkv[i], numeric, 1e-4 * std::fabs(numeric) + 1e-5)
            << which << " at batch " << b << ", position " << t << ", column " << c % p.channels;
      }
    }
  }
}

// ---- Arguments ----

TEST(AttentionArguments, BadOnesNameWhatIsWrong) {
  std::mt19937_64 rng(1);
  AttentionProblem<bf16> p({1, 2, 5, 8}, rng);
  const auto forward = [&](auto change) {
    auto a = p.forward_args();
    change(a);
    return message_of([&] { alloy::attention_forward(Host{}, a); });
  };
  const auto backward = [&](auto change) {
    auto a = p.backward_args();
    change(a);
    return message_of([&] { alloy::attention_backward(Host{}, a); });
  };
  using F = AttentionArgs<bf16>;
  using G = AttentionBackwardArgs<bf16>;
  EXPECT_MENTIONS(forward([](F& a) { a.head_dim = 0; }), "attention_forward<bf16>: head_dim = 0 is outside 1..256");
  EXPECT_MENTIONS(forward([](F& a) { a.head_dim = 300; }), "head_dim = 300 is outside 1..256");
  EXPECT_MENTIONS(forward([](F& a) { a.q = nullptr; }), "q is null");
  EXPECT_MENTIONS(forward([](F& a) { a.v = nullptr; }), "v is null");
  EXPECT_MENTIONS(forward([](F& a) { a.out = nullptr; }), "out is null");
  EXPECT_MENTIONS(forward([](F& a) { a.scale = -1.0f; }), "scale = -1.000000 must be positive and finite");
  EXPECT_MENTIONS(forward([](F& a) { a.out_strides.row = 15; }),
                  "out_strides {batch 120, row 15, head 8} make rows of distinct (batch, position, head) overlap");
  EXPECT_MENTIONS(forward([](F& a) { a.out_strides.head = 4; }), "out_strides");
  EXPECT_MENTIONS(backward([](G& a) { a.lse = nullptr; }), "attention_backward<bf16>: lse is null");
  EXPECT_MENTIONS(backward([](G& a) { a.dk = nullptr; }), "dk is null");
  EXPECT_MENTIONS(backward([](G& a) { a.dout = nullptr; }), "dout is null");
  EXPECT_MENTIONS(backward([](G& a) { a.grad_strides.row = 8; }), "grad_strides");
}

// The tensor cores take float (fp32, tf32) at 16-byte alignment, 4 elements; 16-bit dtypes at 8.
TEST(AttentionArguments, TensorCoresNeedWhole16ByteVectors) {
  alignas(16) static float values[64 * 64];
  alignas(16) static bf16 halves[64 * 64];
  // Compute C over storage p: rows of `row` elements, q `offset` elements in.
  const auto args = []<class C>(C, storage_t<C>* p, std::size_t row, std::size_t head_dim, std::size_t offset) {
    return AttentionArgs<C>{.batch = 1,
                            .heads = 1,
                            .seq = 8,
                            .head_dim = head_dim,
                            .q = p + offset,
                            .k = p,
                            .v = p,
                            .qkv_strides = AttentionStrides::rows(row, 8, head_dim),
                            .out = p,
                            .out_strides = AttentionStrides::rows(row, 8, head_dim)};
  };
  EXPECT_TRUE(alloy::attention_uses_tensor_cores(args(tf32{}, values, 196, 64, 0)));
  EXPECT_TRUE(alloy::attention_uses_tensor_cores(args(tf32{}, values, 196, 128, 4)));
  EXPECT_FALSE(alloy::attention_uses_tensor_cores(args(tf32{}, values, 194, 64, 0)));
  EXPECT_FALSE(alloy::attention_uses_tensor_cores(args(tf32{}, values, 196, 64, 2)));
  EXPECT_FALSE(alloy::attention_uses_tensor_cores(args(tf32{}, values, 196, 96, 0)));
  EXPECT_TRUE(alloy::attention_uses_tensor_cores(args(float{}, values, 196, 64, 0)));
  EXPECT_FALSE(alloy::attention_uses_tensor_cores(args(bf16{}, halves, 196, 64, 0)))
      << "a row of 196 bf16 is not whole 16-byte vectors";
}

TEST(AttentionArguments, EmptyProblemsDoNothing) {
  for (const AttentionArgs<float>& a : {AttentionArgs<float>{.batch = 0, .heads = 2, .seq = 5, .head_dim = 8},
                                        AttentionArgs<float>{.batch = 2, .heads = 0, .seq = 5, .head_dim = 8},
                                        AttentionArgs<float>{.batch = 2, .heads = 2, .seq = 0, .head_dim = 8}}) {
    EXPECT_NO_THROW(alloy::attention_forward(Host{}, a));
  }
  EXPECT_NO_THROW(alloy::attention_backward(
      Host{}, AttentionBackwardArgs<float>{.batch = 1, .heads = 1, .seq = 0, .head_dim = 64}));
}

// lse is optional in the forward pass (inference); out does not depend on it.
TEST(AttentionArguments, ForwardWithoutLseGivesTheSameOut) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  AttentionProblem<bf16> p({2, 3, 40, 16}, rng);
  alloy::attention_forward(Host{}, p.forward_args());
  const auto out = p.out;
  auto a = p.forward_args();
  a.lse = nullptr;
  std::fill(p.out.begin(), p.out.end(), poison<bf16>());
  alloy::attention_forward(Host{}, a);
  for (std::size_t i = 0; i < out.size(); ++i) ASSERT_EQ(bits_of(p.out[i]), bits_of(out[i])) << i;
}

}  // namespace
