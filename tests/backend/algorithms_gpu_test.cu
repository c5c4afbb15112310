// The Cuda backend against the Host backend on the same fresh random inputs.
#include "../support/test_support.hpp"
#include "../support/values.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <algorithm>

#include <cmath>

namespace {

using alloy::bf16;
using alloy::Buffer;
using alloy::Cuda;
using alloy::Host;
using alloy::test::random_floats;

template <class T>
Buffer<T, Cuda> on_device(const std::vector<T>& v) {
  Buffer<T, Cuda> b(v.size());
  alloy::copy_from_host(b, std::span<const T>(v));
  return b;
}

// Device lambdas may not live in a test body (a private member): they live here.
void fill_zero(unsigned* h, std::size_t n) {
  alloy::for_each_n(Cuda{}, n, [=] __device__(std::size_t i) { h[i] = 0; });
}
void count_visits(unsigned* h, std::size_t n) {
  alloy::for_each_n(Cuda{}, n, [=] __device__(std::size_t i) { atomicAdd(h + i, 1u); });
}
// y += 2x, z = bf16(x / 2): exact arithmetic, so Host and Cuda must agree bit for bit.
struct AxpyAndNarrow {
  __host__ __device__ void operator()(const float& x, float& y, bf16& z) const {
    y += 2.0f * x;
    z = bf16(x * 0.5f);
  }
};
struct Square {
  __host__ __device__ float operator()(const bf16& x) const {
    const float v = static_cast<float>(x);
    return v * v;
  }
};

// Sizes that are not multiples of any vector width, and offsets that break 16-byte alignment.
constexpr std::size_t odd_sizes[] = {1, 7, 4099, 1000003};

TEST(CudaBuffer, AllocatesTracksAndRoundTrips) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  alloy::MemoryTracker tracker;
  const auto v = random_floats(12345, seed);
  {
    Buffer<float, Cuda> b(v.size(), Cuda{}, &tracker);
    EXPECT_EQ(tracker.stats().current_bytes, v.size() * 4);
    alloy::copy_from_host(b, std::span<const float>(v));
    EXPECT_EQ(alloy::to_host(b), v);
    const auto part = alloy::to_host(Cuda{}, b.data() + 3, 1001);  // a range by pointer
    EXPECT_TRUE(std::equal(part.begin(), part.end(), v.begin() + 3));
    EXPECT_EQ(alloy::to_host_as_float(Cuda{}, b.data() + 3, 1001), part);
  }
  EXPECT_EQ(tracker.stats().current_bytes, 0u);
  EXPECT_EQ(tracker.stats().peak_bytes, v.size() * 4);
}

TEST(CudaBuffer, OutOfMemoryIsACudaErrorNamingTheSize) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  try {
    Buffer<float, Cuda> huge(std::size_t(1) << 50);
    FAIL() << "a 4 PiB allocation succeeded";
  } catch (const alloy::cuda_error& e) {
    EXPECT_NE(std::string(e.what()).find("4503599627370496 bytes"), std::string::npos) << e.what();
  }
}

TEST(CudaError, ANonStickyErrorIsClearedOnceThrown) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  EXPECT_THROW(ALLOY_CUDA_CHECK(cudaSetDevice(-1)), alloy::cuda_error);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << "the failure leaked into the next call's check";
}

TEST(CudaForEach, IndexFormVisitsEveryIndexOnce) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  for (std::size_t n : odd_sizes) {
    Buffer<unsigned, Cuda> hits(n);
    fill_zero(hits.data(), n);
    count_visits(hits.data(), n);
    for (unsigned h : alloy::to_host(hits)) ASSERT_EQ(h, 1u) << "n=" << n;
  }
}

TEST(CudaForEach, MatchesHostBitwiseAlignedAndMisaligned) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  const AxpyAndNarrow op;
  for (std::size_t n : odd_sizes) {
    for (std::size_t offset : {0, 1}) {  // offset 1 breaks 16-byte alignment: the scalar path
      const auto a = random_floats(n + offset, seed + n);
      const auto b0 = random_floats(n + offset, seed + n + 1);
      auto d_a = on_device(a);
      auto d_b = on_device(b0);
      auto d_c = on_device(std::vector<bf16>(n + offset, bf16(7.0f)));  // initialized: element 0 is read back
      alloy::for_each_n(Cuda{}, n, op, alloy::in(d_a.data() + offset), alloy::inout(d_b.data() + offset),
                        alloy::out(d_c.data() + offset));
      auto b = b0;
      std::vector<bf16> c(n + offset, bf16(7.0f));
      alloy::for_each_n(Host{}, n, op, alloy::in(a.data() + offset), alloy::inout(b.data() + offset),
                        alloy::out(c.data() + offset));
      const auto gb = alloy::to_host(d_b);
      const auto gc = alloy::to_host(d_c);
      for (std::size_t i = offset; i < n + offset; ++i) {
        ASSERT_EQ(alloy::detail::float_bits(gb[i]), alloy::detail::float_bits(b[i])) << "n=" << n << " i=" << i;
        ASSERT_EQ(gc[i].bits(), c[i].bits()) << "n=" << n << " i=" << i;
      }
      if (offset) {
        ASSERT_EQ(gb[0], b0[0]) << "element before the range was written";
        ASSERT_EQ(gc[0].bits(), bf16(7.0f).bits()) << "element before the range was written";
      }
    }
  }
}

TEST(CudaReduce, SumIsAccurateAndDeterministic) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (std::size_t n :
       {std::size_t(0), std::size_t(1), std::size_t(4099), std::size_t(1000003), std::size_t(1) << 24}) {
    const auto a = random_floats(n, seed + n);
    double exact = 0, magnitude = 0;
    for (float x : a) exact += x, magnitude += std::fabs(x);
    auto d = on_device(a);
    const float s1 = alloy::reduce_sum(Cuda{}, d.data(), n);
    const float s2 = alloy::reduce_sum(Cuda{}, d.data(), n);
    EXPECT_NEAR(s1, exact, 1e-6 * magnitude + 1e-30) << "n=" << n;
    EXPECT_EQ(alloy::detail::float_bits(s1), alloy::detail::float_bits(s2)) << "n=" << n;
    EXPECT_NEAR(s1, alloy::reduce_sum(Host{}, a.data(), n), 2e-6 * magnitude + 1e-30) << "n=" << n;
  }
}

TEST(CudaReduce, MaxEqualsHostAndPropagatesNaN) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (std::size_t n : odd_sizes) {
    auto a = random_floats(n, seed + n);
    auto d = on_device(a);
    EXPECT_EQ(alloy::reduce_max(Cuda{}, d.data(), n), alloy::reduce_max(Host{}, a.data(), n)) << "n=" << n;
    a[(seed + n) % n] = std::nanf("");
    auto dn = on_device(a);
    EXPECT_TRUE(std::isnan(alloy::reduce_max(Cuda{}, dn.data(), n))) << "n=" << n;
  }
}

TEST(CudaReduce, Bf16SumOfSquaresMatchesHost) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  ALLOY_SEEDED(seed);
  for (std::size_t n : odd_sizes) {
    const auto f = random_floats(n + 1, seed + n);
    std::vector<bf16> g(f.size());
    double exact = 0;
    for (std::size_t i = 0; i < f.size(); ++i) g[i] = bf16(f[i]);
    for (std::size_t i = 1; i < f.size(); ++i) exact += double(float(g[i])) * float(g[i]);
    auto d = on_device(g);
    for (std::size_t offset : {0, 1}) {
      const float gpu =
          alloy::transform_reduce(Cuda{}, n + 1 - offset, 0.0f, alloy::Sum{}, Square{}, alloy::in(d.data() + offset));
      double expect = exact + (offset ? 0.0 : double(float(g[0])) * float(g[0]));
      EXPECT_NEAR(gpu, expect, 1e-6 * expect) << "n=" << n << " offset=" << offset;
    }
  }
}

TEST(CudaReduce, AsyncFormRefusesATooSmallWorkspace) {
  ALLOY_SKIP_WITHOUT_CUDA_DEVICE();
  Buffer<float, Cuda> d(1 << 20), result(1);
  Buffer<std::byte, Cuda> workspace(8);
  EXPECT_THROW(alloy::transform_reduce_async(Cuda{}, workspace.data(), workspace.size(), result.data(), d.size(), 0.0f,
                                             alloy::Sum{}, alloy::ToAccumulator{}, alloy::in(d.data())),
               alloy::error);
}

}  // namespace
