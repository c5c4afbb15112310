// expect: Accumulate<0>: at least one micro-batch
#include <alloy/train/policies.hpp>
using R = alloy::resolve_policies<alloy::Accumulate<0>>::accumulate;
int main() { return R::steps; }
