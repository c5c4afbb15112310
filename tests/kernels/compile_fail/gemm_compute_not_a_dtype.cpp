// expect: GemmArgs<Compute>: Compute must be fp32, tf32, fp16 or bf16
#include <alloy/kernels/gemm.hpp>
int main() { return static_cast<int>(alloy::GemmArgs<double>{}.m); }
