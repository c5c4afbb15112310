// expect: Adafactor<S>: its factored statistics are small and kept in fp32
#include <alloy/optim/adafactor.hpp>
using O = alloy::Adafactor<alloy::State<alloy::q8>>;
int main() { return O::slots; }
