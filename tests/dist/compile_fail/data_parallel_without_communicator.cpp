// expect: Trainer with DataParallel<Comm>: pass this rank's communicator
#include <alloy/dist/host_communicator.hpp>
#include "../../../examples/custom_model/teacher_mlp.hpp"
using Tr = alloy::Trainer<teacher::StudentMlp, alloy::Host, alloy::DataParallel<alloy::HostCommunicator>>;
void f() { Tr t(teacher::StudentMlp(4, 4, 4)); }
