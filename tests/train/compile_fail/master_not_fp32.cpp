// expect: Master must be fp32_master or no_master
#include <alloy/precision/precision.hpp>
using P = alloy::Precision<alloy::fp32, alloy::bf16>;
int main() { return P::has_master; }
