// expect: LayeredModel: each block in layers() needs a member `Activation<T> forward(Ctx&, Activation<const T> x)`
#include <alloy/alloy.hpp>
#include <utility>
#include <vector>
struct BackwardOnly { template <class C> alloy::Activation<float> backward(C&, alloy::Activation<const float> d) { return {const_cast<float*>(d.data), d.rows, d.cols}; } };
struct M {
  using batch_type = int;
  std::vector<BackwardOnly> blocks;
  void declare(alloy::ParamRegistry&) {}
  std::vector<BackwardOnly>& layers() { return blocks; }
  template <class C> alloy::Activation<float> input(C&, const int&) { return {}; }
  template <class C> std::pair<float, alloy::Activation<float>> head(C&, alloy::Activation<const float>, const int&) { return {}; }
};
int main() { alloy::Trainer<M, alloy::CheckpointEvery<2>, alloy::Host> t(M{}); }
