// expect: LayeredModel: layers() must return a random-access, sized range of blocks
#include <alloy/alloy.hpp>
struct M {
  using batch_type = int;
  int n = 0;
  void declare(alloy::ParamRegistry&) {}
  int& layers() { return n; }
};
int main() { alloy::Trainer<M, alloy::Checkpointing, alloy::Host> t(M{}); }
