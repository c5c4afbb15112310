// expect: backend Cuda runs kernels: construct this Trainer in a .cu file compiled by nvcc, or name alloy::Host
// needs: CUDA runtime
#include <alloy/alloy.hpp>

struct Model {
  using batch_type = int;
  void declare(alloy::ParamRegistry&) {}
  template <class Ctx>
  float forward_backward(Ctx&, const batch_type&) {
    return 0.0f;
  }
};

// With the CUDA runtime the default backend is Cuda in a g++ translation unit too; it may be
// named and asked about there, but constructing it needs nvcc.
int main() { alloy::Trainer<Model, alloy::AdamW<>> t(Model{}); }
