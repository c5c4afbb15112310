// Matrix products for the Linear layer, C = epilogue(alpha * op(A) * op(B) + beta * C) with
// row-major matrices: the arguments and checks (gemm_args.hpp), the Host reference
// (host/gemm.hpp) and the Cuda path through cuBLASLt (cuda/gemm_cublaslt.hpp).
#pragma once

#include <alloy/kernels/cuda/gemm_cublaslt.hpp>
#include <alloy/kernels/gemm_args.hpp>
#include <alloy/kernels/host/gemm.hpp>
