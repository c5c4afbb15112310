// expect: Checkpointing needs a LayeredModel: the model has no layers()
#include <alloy/alloy.hpp>
struct Flat { using batch_type = int; void declare(alloy::ParamRegistry&) {} template <class C> float forward_backward(C&, const int&) { return 0; } };
int main() { alloy::Trainer<Flat, alloy::Checkpointing, alloy::Host> t(Flat{}); }
