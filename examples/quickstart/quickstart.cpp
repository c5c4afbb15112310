// alloy quickstart: the numeric and backend layers alone, without a trainer (README.md shows one).
// Rounds a vector of floats to bf16 with round-to-nearest-even and with stochastic rounding, and
// compares the sums, on the GPU when there is one and on the Host backend when not.
//   ./alloy_quickstart [n]
#include <alloy/alloy.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

// 1 + 2^-9: a quarter of a bf16 step above 1, so round-to-nearest always drops the excess
// while stochastic rounding keeps it on average.
constexpr float value = 1.0f + 0x1p-9f;

// Element i: both roundings of x[i]. A functor rather than a lambda, so one definition serves
// host and device.
struct RoundBoth {
  const float* x;
  alloy::bf16* nearest;
  alloy::bf16* stochastic;
  std::uint64_t seed;
  ALLOY_HOST_DEVICE void operator()(std::size_t i) const {
    nearest[i] = alloy::bf16(x[i]);
    stochastic[i] = alloy::round_stochastic<alloy::bf16>(x[i], alloy::random_bits(seed, i));
  }
};

template <class Backend>
int run(Backend be, std::size_t n) {
  std::vector<float> host(n, value);
  alloy::Buffer<float, Backend> x(n, be);
  alloy::Buffer<alloy::bf16, Backend> nearest(n, be), stochastic(n, be);
  alloy::copy_from_host(x, std::span<const float>(host));
  alloy::for_each_n(be, n, RoundBoth{x.data(), nearest.data(), stochastic.data(), 2026});
  const double exact = static_cast<double>(value) * static_cast<double>(n);
  const float sum_x = alloy::reduce_sum(be, x.data(), n);
  const float sum_nearest = alloy::reduce_sum(be, nearest.data(), n);
  const float sum_stochastic = alloy::reduce_sum(be, stochastic.data(), n);
  std::printf("backend %s, %zu elements of %.9g\n", Backend::name, n, static_cast<double>(value));
  std::printf("  exact sum                     %.1f\n", exact);
  std::printf("  fp32 sum                      %.1f\n", static_cast<double>(sum_x));
  std::printf("  bf16 round-to-nearest sum     %.1f  (every element rounded to 1)\n", static_cast<double>(sum_nearest));
  std::printf("  bf16 stochastic rounding sum  %.1f  (unbiased)\n", static_cast<double>(sum_stochastic));
  const auto mem = alloy::memory_stats(be);
  std::printf("  %s memory: %zu bytes held, peak %zu\n", Backend::name, mem.current_bytes, mem.peak_bytes);
  const double error = std::abs(sum_stochastic - exact) / exact;
  return error < 1e-3 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::size_t n = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : std::size_t(1) << 22;
  try {
#if ALLOY_HAS_CUDA_KERNELS
    if (alloy::has_cuda_device()) return run(alloy::Cuda{}, n);
    std::printf("no CUDA device: running on the Host backend\n");
#endif
    return run(alloy::Host{}, n);
  } catch (const alloy::error& e) {
    std::fprintf(stderr, "alloy error: %s\n", e.what());
    return 1;
  }
}
