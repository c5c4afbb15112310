// cuBLASLt status checking: failures become alloy::cuda_error like CUDA runtime failures.
#pragma once

#include <alloy/error.hpp>

#include <cublasLt.h>

namespace alloy::detail {

inline void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw cuda_error(call, file, line, static_cast<int>(status),
                   std::string(cublasLtGetStatusName(status)) + ": " + cublasLtGetStatusString(status));
}

}  // namespace alloy::detail

#define ALLOY_CUBLAS_CHECK(call) ::alloy::detail::check_cublas((call), #call, __FILE__, __LINE__)
