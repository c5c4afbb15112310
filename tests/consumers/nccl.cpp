// The consumer's NCCL program: alloy::nccl (alloy with NCCL) is enough to build and link a
// program using NcclCommunicator. It starts no communicator (that needs a GPU per rank); it asks
// the linked libnccl its version.
#include <alloy/dist/nccl_communicator.hpp>

#include <cstdio>

static_assert(ALLOY_HAS_NCCL, "alloy::nccl gives <nccl.h>: NcclCommunicator must be defined");
static_assert(alloy::Communicator<alloy::NcclCommunicator>);

int main() {
  int version = 0;
  if (ncclGetVersion(&version) != ncclSuccess) return 1;
  std::printf("  NcclCommunicator's program links NCCL %d\n", version);
  return version > 0 ? 0 : 1;
}
