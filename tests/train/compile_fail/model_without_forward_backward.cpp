// expect: the model needs `float forward_backward
#include <alloy/alloy.hpp>
struct NoStep { using batch_type = int; void declare(alloy::ParamRegistry&) {} };
int main() { alloy::Trainer<NoStep, alloy::Host> t(NoStep{}); }
