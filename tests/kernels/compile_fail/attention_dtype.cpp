// expect: attention_forward<T>: T must be float, tf32, bf16 or fp16
#include <alloy/kernels/attention.hpp>
int main() { alloy::attention_forward(alloy::Host{}, alloy::AttentionArgs<double>{}); }
