// Does compute-sanitizer's initcheck see what cuBLASLt's kernels write? (docs/reliability.md,
// issue 11's open initcheck finding.) One bf16 product y = x W^T + b + r (the residual MLP
// block's down product: bias epilogue, residual through C, beta = 1) into fresh device memory,
// then a kernel of ours that reads every element of y. Run twice under initcheck:
//   probe fresh    y is never touched before the product
//   probe memset   y is filled with 0xFF bytes (NaN) first, so initcheck counts it as written
// and each run checks, element by element, that y equals a host fp32 reference of the product:
// with the NaN fill, a match everywhere proves the product wrote every element. Then initcheck
// reports on the fresh run and none on the memset run mean initcheck does not track the
// product's stores. Build and run on the GPU machine (scripts/probes/run-initcheck-probe.sh).
#include <alloy/backend/cuda.hpp>
#include <alloy/kernels/cuda/gemm_cublaslt.hpp>
#include <alloy/numeric/bf16.hpp>
#include <alloy/numeric/rounding.hpp>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

using alloy::bf16;

__global__ void copy_out(const bf16* y, bf16* z, std::size_t n) {
  const std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  if (i < n) z[i] = y[i];
}

static void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(2);
  }
}

int run(std::size_t rows, std::size_t in, std::size_t out, bool fill_first, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<bf16> x(rows * in), w(out * in), b(out), r(rows * out);
  for (auto* v : {&x, &w, &b, &r}) {
    for (auto& e : *v) e = alloy::round_nearest<bf16>(u(rng));
  }
  bf16 *dx, *dw, *db, *dr, *dy, *dz;
  check(cudaMalloc(&dx, x.size() * 2), "malloc");
  check(cudaMalloc(&dw, w.size() * 2), "malloc");
  check(cudaMalloc(&db, b.size() * 2), "malloc");
  check(cudaMalloc(&dr, r.size() * 2), "malloc");
  check(cudaMalloc(&dy, r.size() * 2), "malloc");
  check(cudaMalloc(&dz, r.size() * 2), "malloc");
  check(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice), "copy");
  check(cudaMemcpy(dw, w.data(), w.size() * 2, cudaMemcpyHostToDevice), "copy");
  check(cudaMemcpy(db, b.data(), b.size() * 2, cudaMemcpyHostToDevice), "copy");
  check(cudaMemcpy(dr, r.data(), r.size() * 2, cudaMemcpyHostToDevice), "copy");
  if (fill_first) check(cudaMemset(dy, 0xFF, r.size() * 2), "memset");
  {
    alloy::GemmHandle handle;
    alloy::gemm(alloy::Cuda{}, handle,
                alloy::GemmArgs<bf16>{.transa = alloy::Transpose::no, .transb = alloy::Transpose::yes,
                                      .m = rows, .n = out, .k = in, .a = dx, .lda = in, .b = dw, .ldb = in,
                                      .c = dy, .ldc = out, .c_in = dr, .beta = 1.0f,
                                      .epilogue = alloy::Epilogue::bias, .bias = db});
    const std::size_t n = r.size();
    copy_out<<<unsigned((n + 255) / 256), 256>>>(dy, dz, n);
    check(cudaDeviceSynchronize(), "sync");
  }
  std::vector<bf16> z(r.size());
  check(cudaMemcpy(z.data(), dz, z.size() * 2, cudaMemcpyDeviceToHost), "copy back");
  std::size_t bad = 0;
  for (std::size_t i = 0; i < rows; ++i) {
    for (std::size_t j = 0; j < out; ++j) {
      double ref = alloy::to_float(b[j]) + alloy::to_float(r[i * out + j]);
      for (std::size_t k = 0; k < in; ++k) ref += double(alloy::to_float(x[i * in + k])) * alloy::to_float(w[j * in + k]);
      const double got = alloy::to_float(z[i * out + j]);
      if (!(std::fabs(got - ref) <= 2e-2 * (1.0 + std::fabs(ref)))) ++bad;
    }
  }
  std::printf("rows %zu in %zu out %zu, y %s first: %zu of %zu elements differ from the reference\n", rows, in, out,
              fill_first ? "filled with NaN" : "fresh", bad, r.size());
  for (auto* p : {dx, dw, db, dr, dy, dz}) check(cudaFree(p), "free");
  return bad == 0 ? 0 : 1;
}

int main(int argc, char** argv) {
  const bool fill = argc > 1 && std::strcmp(argv[1], "memset") == 0;
  std::mt19937 rng(20261202);
  int status = 0;
  // The block shapes of GpuFusedMlp.ResidualBlockMatchesHost (hidden -> d) and the MLP's own.
  for (auto [rows, in, out] : {std::array<std::size_t, 3>{37, 256, 64}, {129, 160, 40}, {256, 1024, 256},
                               {512, 4096, 1024}}) {
    status |= run(rows, in, out, fill, rng);
  }
  return status;
}
