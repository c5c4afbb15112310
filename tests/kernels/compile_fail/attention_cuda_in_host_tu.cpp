// expect: attention_backward on Cuda: compile this translation unit with nvcc (the Cuda kernels need it)
// needs: CUDA runtime
#include <alloy/kernels/attention.hpp>
int main() { alloy::attention_backward(alloy::Cuda{}, alloy::AttentionBackwardArgs<alloy::bf16>{}); }
