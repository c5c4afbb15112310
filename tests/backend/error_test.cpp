#include <alloy/backend/device.hpp>
#include <alloy/error.hpp>
#if ALLOY_HAS_CUDA_RUNTIME
#include <alloy/cublas_error.hpp>
#endif

#include <gtest/gtest.h>

namespace {

// The runtime's and cuBLASLt's error checks exist where the CUDA runtime does (not in a
// host-only build, ALLOY_NO_CUDA).
#if ALLOY_HAS_CUDA_RUNTIME

TEST(CudaError, FailedRuntimeCallBecomesCudaErrorWithCallFileAndLine) {
  // Fails with or without a GPU: device -1 never exists.
  try {
    ALLOY_CUDA_CHECK(cudaSetDevice(-1));
    FAIL() << "cudaSetDevice(-1) did not fail";
  } catch (const alloy::cuda_error& e) {
    EXPECT_EQ(e.call(), "cudaSetDevice(-1)");
    EXPECT_NE(e.file().find("error_test.cpp"), std::string::npos);
    EXPECT_GT(e.line(), 0);
    EXPECT_NE(e.code(), 0);
    EXPECT_FALSE(e.message().empty());
    EXPECT_NE(std::string(e.what()).find("cudaSetDevice(-1) failed"), std::string::npos);
  }
}

TEST(CudaError, IsAnAlloyError) {
  EXPECT_THROW(ALLOY_CUDA_CHECK(cudaErrorInvalidValue), alloy::error);
  EXPECT_NO_THROW(ALLOY_CUDA_CHECK(cudaSuccess));
}

TEST(CudaError, CublasStatusCarriesTheLibraryMessage) {
  try {
    ALLOY_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE);
    FAIL() << "no throw";
  } catch (const alloy::cuda_error& e) {
    EXPECT_EQ(e.code(), static_cast<int>(CUBLAS_STATUS_INVALID_VALUE));
    EXPECT_NE(e.message().find("CUBLAS_STATUS_INVALID_VALUE"), std::string::npos);
  }
}

#endif

TEST(CudaDevice, CountIsNeverNegativeAndNeverThrows) {
  const int n = alloy::cuda_device_count();
  EXPECT_GE(n, 0);
  EXPECT_EQ(alloy::has_cuda_device(), n > 0);
}

}  // namespace
