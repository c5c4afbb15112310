// expect: DataParallel<Comm>: the communicator runs on another backend than the trainer
// needs: CUDA runtime
#include <alloy/dist/host_communicator.hpp>
#include "../../../examples/custom_model/teacher_mlp.hpp"
using Tr = alloy::Trainer<teacher::StudentMlp, alloy::Cuda, alloy::DataParallel<alloy::HostCommunicator>>;
void f(alloy::HostCommunicator& c) { Tr t(teacher::StudentMlp(4, 4, 4), {}, c); }
