// expect: unknown policy type
#include <alloy/train/policies.hpp>
struct MyPolicy {};
using R = alloy::resolve_policies<alloy::Accumulate<2>, MyPolicy>::accumulate;
int main() {}
