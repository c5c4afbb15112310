// expect: the model needs `void declare(alloy::ParamRegistry&)`
#include <alloy/alloy.hpp>
struct NoDeclare { using batch_type = int; template <class C> float forward_backward(C&, const int&) { return 0; } };
int main() { alloy::Trainer<NoDeclare, alloy::Host> t(NoDeclare{}); }
