// expect: DataParallel<Comm>: Comm must be a communicator
#include <alloy/train/policies.hpp>
struct NotAComm {};
alloy::DataParallel<NotAComm> p;
