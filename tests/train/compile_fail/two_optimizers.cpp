// expect: two optimizers
#include <alloy/train/policies.hpp>
using R = alloy::resolve_policies<alloy::AdamW<>, alloy::Lion<>>::optimizer;
int main() {}
