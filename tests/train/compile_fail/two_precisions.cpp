// expect: two Precision policies
#include <alloy/train/policies.hpp>
using R = alloy::resolve_policies<alloy::Precision<alloy::bf16>, alloy::Precision<alloy::fp16>>::precision;
int main() {}
