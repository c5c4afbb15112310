// expect: two DataParallel policies
#include <alloy/dist/host_communicator.hpp>
#include <alloy/train/policies.hpp>
using R = alloy::resolve_policies<alloy::DataParallel<alloy::HostCommunicator>,
                                  alloy::DataParallel<alloy::HostCommunicator>>::data_parallel;
R* r = nullptr;
