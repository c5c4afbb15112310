// The numeric types on the device: alloy's conversions against CUDA's own intrinsics and
// against the host implementation, bit for bit.
#include "../support/edge_floats.hpp"
#include "../support/test_support.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace {

using alloy::bf16;
using alloy::Buffer;
using alloy::Cuda;
using alloy::fp16;

static_assert(sizeof(fp16) == sizeof(__half) && alignof(fp16) == alignof(__half));
static_assert(sizeof(bf16) == sizeof(__nv_bfloat16) && alignof(bf16) == alignof(__nv_bfloat16));

TEST(GpuConversion, TypesShareTheBitsOfCudasTypes) {
  const __half h = __float2half_rn(-2.5f);
  const __nv_bfloat16 b = __float2bfloat16_rn(-2.5f);
  EXPECT_EQ(fp16(h).bits(), __half_as_ushort(h));
  EXPECT_EQ(bf16(b).bits(), __bfloat16_as_ushort(b));
  EXPECT_EQ(fp16(-2.5f).bits(), __half_as_ushort(h));
  EXPECT_EQ(__half2float(static_cast<__half>(fp16(-2.5f))), -2.5f);
  EXPECT_EQ(__bfloat162float(static_cast<__nv_bfloat16>(bf16(-2.5f))), -2.5f);
}

// 2^26 random floats, half with uniformly random bits (every exponent, NaNs and infinities
// included) and half with exponents in 16-bit range, followed by every edge class of both types.
std::vector<float> conversion_inputs(std::uint64_t seed) {
  std::vector<float> xs;
  xs.reserve((1u << 26) + 1000000);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> exponent(-30, 20);
  for (std::size_t i = 0; i < (1u << 25); ++i) {
    const std::uint64_t r = rng();
    xs.push_back(alloy::detail::float_from_bits(static_cast<std::uint32_t>(r)));
    const float m = alloy::detail::float_from_bits(0x3f800000u | static_cast<std::uint32_t>(r >> 41));  // [1, 2)
    const float x = std::ldexp(m, exponent(rng));
    xs.push_back((r >> 40) & 1 ? -x : x);
  }
  for (const auto* ref : {&alloy::test::binary16, &alloy::test::bfloat16}) {
    const auto edges = alloy::test::edge_floats(alloy::test::RoundingReference(*ref));
    xs.insert(xs.end(), edges.begin(), edges.end());
  }
  return xs;
}

// Device lambdas may not live in a test body (a private member): the launches are free functions.
void narrow_on_device(std::size_t n, const float* x, std::uint16_t* a, std::uint16_t* b, std::uint16_t* c,
                      std::uint16_t* d, std::uint16_t* e, std::uint16_t* f) {
  alloy::for_each_n(Cuda{}, n, [=] __device__(std::size_t i) {
    const float v = x[i];
    a[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    b[i] = bf16(v).bits();
    c[i] = alloy::detail::float_to_bf16_bits(v);
    d[i] = __half_as_ushort(__float2half_rn(v));
    e[i] = fp16(v).bits();
    f[i] = alloy::detail::float_to_fp16_bits(v);
  });
}

void widen_on_device(float* a, float* b, float* c, float* d) {
  alloy::for_each_n(Cuda{}, std::size_t(1) << 16, [=] __device__(std::size_t i) {
    const auto bits = static_cast<std::uint16_t>(i);
    a[i] = __bfloat162float(__ushort_as_bfloat16(bits));
    b[i] = static_cast<float>(bf16::from_bits(bits));
    c[i] = __half2float(__ushort_as_half(bits));
    d[i] = static_cast<float>(fp16::from_bits(bits));
  });
}

void round_stochastic_on_device(std::size_t n, const float* x, bf16* bf, fp16* h, std::uint64_t seed) {
  alloy::for_each_n(Cuda{}, n, [=] __device__(std::size_t i) {
    bf[i] = alloy::round_stochastic<bf16>(x[i], alloy::random_bits(seed, 2 * i));
    h[i] = alloy::round_stochastic<fp16>(x[i], alloy::random_bits(seed, 2 * i + 1));
  });
}

TEST(GpuConversion, FloatTo16BitMatchesCudaIntrinsicsAndHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const auto xs = conversion_inputs(seed);
  const std::size_t n = xs.size();
  ASSERT_GE(n, std::size_t(1) << 26);
  Buffer<float, Cuda> x(n);
  alloy::copy_from_host(x, std::span<const float>(xs));
  // Per float: CUDA intrinsic, alloy's type on the device, alloy's bit routine on the device.
  Buffer<std::uint16_t, Cuda> bf_intrinsic(n), bf_type(n), bf_bits(n), h_intrinsic(n), h_type(n), h_bits(n);
  narrow_on_device(n, x.data(), bf_intrinsic.data(), bf_type.data(), bf_bits.data(), h_intrinsic.data(), h_type.data(),
                   h_bits.data());
  const auto a = alloy::to_host(bf_intrinsic), b = alloy::to_host(bf_type), c = alloy::to_host(bf_bits);
  const auto d = alloy::to_host(h_intrinsic), e = alloy::to_host(h_type), f = alloy::to_host(h_bits);
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < n && mismatches < 10; ++i) {
    const std::uint16_t bf_host = bf16(xs[i]).bits(), h_host = fp16(xs[i]).bits();
    if (a[i] != bf_host || b[i] != bf_host || c[i] != bf_host || d[i] != h_host || e[i] != h_host || f[i] != h_host) {
      ++mismatches;
      ADD_FAILURE() << std::hexfloat << "x=" << xs[i] << std::hex << " bf16 host " << bf_host << " intrinsic " << a[i]
                    << " type " << b[i] << " bits " << c[i] << "; fp16 host " << h_host << " intrinsic " << d[i]
                    << " type " << e[i] << " bits " << f[i];
    }
  }
  EXPECT_EQ(mismatches, 0u);
}

TEST(GpuConversion, EverySixteenBitPatternWidensLikeTheIntrinsics) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  constexpr std::size_t n = 1u << 16;
  Buffer<float, Cuda> from_bf_intrinsic(n), from_bf_type(n), from_h_intrinsic(n), from_h_type(n);
  widen_on_device(from_bf_intrinsic.data(), from_bf_type.data(), from_h_intrinsic.data(), from_h_type.data());
  const auto a = alloy::to_host(from_bf_intrinsic), b = alloy::to_host(from_bf_type);
  const auto c = alloy::to_host(from_h_intrinsic), d = alloy::to_host(from_h_type);
  for (std::size_t i = 0; i < n; ++i) {
    const auto bits = static_cast<std::uint16_t>(i);
    const float bf_host = static_cast<float>(bf16::from_bits(bits));
    const float h_host = static_cast<float>(fp16::from_bits(bits));
    if (std::isnan(h_host)) {
      ASSERT_TRUE(std::isnan(c[i]) && std::isnan(d[i])) << std::hex << i;
    } else {
      ASSERT_EQ(alloy::detail::float_bits(c[i]), alloy::detail::float_bits(h_host)) << std::hex << i;
      ASSERT_EQ(alloy::detail::float_bits(d[i]), alloy::detail::float_bits(h_host)) << std::hex << i;
    }
    if (std::isnan(bf_host)) {
      ASSERT_TRUE(std::isnan(a[i]) && std::isnan(b[i])) << std::hex << i;
    } else {
      ASSERT_EQ(alloy::detail::float_bits(a[i]), alloy::detail::float_bits(bf_host)) << std::hex << i;
      ASSERT_EQ(alloy::detail::float_bits(b[i]), alloy::detail::float_bits(bf_host)) << std::hex << i;
    }
  }
}

TEST(GpuConversion, StochasticRoundingMatchesHostBitForBit) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  constexpr std::size_t n = 1u << 22;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> exponent(-28, 18);
  std::vector<float> xs(n);
  for (auto& x : xs) x = std::ldexp(std::uniform_real_distribution<float>(-2.0f, 2.0f)(rng), exponent(rng));
  Buffer<float, Cuda> x(n);
  alloy::copy_from_host(x, std::span<const float>(xs));
  Buffer<bf16, Cuda> bf(n);
  Buffer<fp16, Cuda> h(n);
  const std::uint64_t stream_seed = rng();
  round_stochastic_on_device(n, x.data(), bf.data(), h.data(), stream_seed);
  const auto bf_dev = alloy::to_host(bf);
  const auto h_dev = alloy::to_host(h);
  for (std::size_t i = 0; i < n; ++i) {
    ASSERT_EQ(bf_dev[i].bits(), alloy::round_stochastic<bf16>(xs[i], alloy::random_bits(stream_seed, 2 * i)).bits());
    ASSERT_EQ(h_dev[i].bits(), alloy::round_stochastic<fp16>(xs[i], alloy::random_bits(stream_seed, 2 * i + 1)).bits());
  }
}

}  // namespace
