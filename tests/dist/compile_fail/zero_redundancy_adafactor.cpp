// expect: ZeroRedundancy: Adafactor's factored statistics do not divide into ranges
#include <alloy/dist/host_communicator.hpp>
#include "../../../examples/custom_model/teacher_mlp.hpp"
using Tr = alloy::Trainer<teacher::StudentMlp, alloy::Host, alloy::Adafactor<>,
                          alloy::ZeroRedundancy<alloy::HostCommunicator>>;
void f(alloy::HostCommunicator& c) { Tr t(teacher::StudentMlp(4, 4, 4), {}, c); }
