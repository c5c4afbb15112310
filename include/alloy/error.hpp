// alloy's exceptions: `error` for bad input, `cuda_error` for failed CUDA or cuBLAS calls.
#pragma once

#include <alloy/config.hpp>

#include <stdexcept>
#include <string>

#if ALLOY_HAS_CUDA_RUNTIME
#include <cuda_runtime_api.h>
#endif

namespace alloy {

// Bad runtime input: the message says what was wrong and where.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A CUDA runtime, driver-side or library call that did not succeed.
class cuda_error : public error {
 public:
  cuda_error(std::string call, std::string file, int line, int code, std::string message)
      : error(file + ":" + std::to_string(line) + ": " + call + " failed: " + message + " (code " +
              std::to_string(code) + ")"),
        call_(std::move(call)),
        file_(std::move(file)),
        line_(line),
        code_(code),
        message_(std::move(message)) {}

  const std::string& call() const noexcept { return call_; }
  const std::string& file() const noexcept { return file_; }
  int line() const noexcept { return line_; }
  // The library's own status value (cudaError_t or cublasStatus_t).
  int code() const noexcept { return code_; }
  // The runtime's description of the failure.
  const std::string& message() const noexcept { return message_; }

 private:
  std::string call_;
  std::string file_;
  int line_;
  int code_;
  std::string message_;
};

namespace detail {

#if ALLOY_HAS_CUDA_RUNTIME
inline void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  // Clear a non-sticky error so the next check reports its own call, not this one.
  (void)cudaGetLastError();
  throw cuda_error(call, file, line, static_cast<int>(status),
                   std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status));
}
#endif

}  // namespace detail
}  // namespace alloy

// Throws alloy::cuda_error naming the call, file and line when a CUDA runtime call fails.
#define ALLOY_CUDA_CHECK(call) ::alloy::detail::check_cuda((call), #call, __FILE__, __LINE__)

// After a kernel launch: launch-configuration errors surface here, not at the next call.
#define ALLOY_CUDA_CHECK_LAUNCH() ::alloy::detail::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
