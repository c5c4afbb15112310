// Shared by alloy's tests: fresh random seeds (reproducible on demand), the GPU gate, and the
// message of the alloy::error a call throws.
#pragma once

#include <alloy/backend/device.hpp>
#include <alloy/error.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>

namespace alloy::test {

// A new seed for every run, so each run draws fresh inputs; ALLOY_TEST_SEED=<n> repeats a run.
// Tests print it through SCOPED_TRACE, so a failure names the seed that reproduces it.
inline std::uint64_t fresh_seed() {
  if (const char* fixed = std::getenv("ALLOY_TEST_SEED")) return std::strtoull(fixed, nullptr, 10);
  std::random_device device;
  return (static_cast<std::uint64_t>(device()) << 32) ^ device();
}

inline std::string seed_note(std::uint64_t seed) {
  return "random seed " + std::to_string(seed) + " (set ALLOY_TEST_SEED to repeat)";
}

// ALLOY_REQUIRE_GPU=1 (the GPU script sets it) turns a missing device into a failure, so a
// GPU run cannot pass by skipping.
inline bool gpu_required() {
  const char* v = std::getenv("ALLOY_REQUIRE_GPU");
  return v && *v && std::string(v) != "0";
}

// The message of the alloy::error that f() throws; a failure, and "no error", if it throws none.
template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const alloy::error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no alloy::error was thrown";
  return "no error";
}

inline ::testing::AssertionResult mentions(const std::string& message, const std::string& text) {
  if (message.find(text) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "message: " << message << "\nexpected to mention: " << text;
}

}  // namespace alloy::test

#define ALLOY_SKIP_WITHOUT_CUDA_DEVICE()                                                          \
  do {                                                                                            \
    if (!::alloy::has_cuda_device()) {                                                            \
      if (::alloy::test::gpu_required()) FAIL() << "ALLOY_REQUIRE_GPU is set but no CUDA device"; \
      GTEST_SKIP() << "no CUDA device";                                                           \
    }                                                                                             \
  } while (0)

// The message (a std::string or a C string) contains text.
#define EXPECT_MENTIONS(message, text) EXPECT_TRUE(::alloy::test::mentions((message), (text)))

#define ALLOY_SEEDED(name)                                \
  const std::uint64_t name = ::alloy::test::fresh_seed(); \
  SCOPED_TRACE(::alloy::test::seed_note(name))
