// expect: Trainer(model, config, comm): a communicator needs the DataParallel<Comm> policy
#include "../../../examples/custom_model/teacher_mlp.hpp"
using Tr = alloy::Trainer<teacher::StudentMlp, alloy::Host>;
void f(alloy::detail::NoCommunicator& c) { Tr t(teacher::StudentMlp(4, 4, 4), {}, c); }
