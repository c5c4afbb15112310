// expect: accumulating gradients narrower than the compute dtype loses bits
#include <alloy/precision/precision.hpp>
using P = alloy::Precision<alloy::fp32, alloy::no_master, alloy::NoLossScale, alloy::bf16>;
int main() { return P::has_master; }
