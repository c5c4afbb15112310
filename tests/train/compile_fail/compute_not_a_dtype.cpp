// expect: Compute must be fp32, tf32, fp16 or bf16
#include <alloy/precision/precision.hpp>
using P = alloy::Precision<double>;
int main() { return P::has_master; }
