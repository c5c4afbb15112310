// expect: the model must declare `using batch_type
#include <alloy/alloy.hpp>
struct NoBatch { void declare(alloy::ParamRegistry&) {} };
int main() { alloy::Trainer<NoBatch, alloy::Host> t(NoBatch{}); }
