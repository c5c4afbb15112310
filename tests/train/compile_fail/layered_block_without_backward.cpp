// expect: LayeredModel: each block in layers() needs a member `Activation<T> backward(Ctx&, Activation<const T> dy)`
#include <alloy/alloy.hpp>
#include <utility>
#include <vector>
struct ForwardOnly { template <class C> alloy::Activation<float> forward(C&, alloy::Activation<const float> x) { return {const_cast<float*>(x.data), x.rows, x.cols}; } };
struct M {
  using batch_type = int;
  std::vector<ForwardOnly> blocks;
  void declare(alloy::ParamRegistry&) {}
  std::vector<ForwardOnly>& layers() { return blocks; }
  template <class C> alloy::Activation<float> input(C&, const int&) { return {}; }
  template <class C> std::pair<float, alloy::Activation<float>> head(C&, alloy::Activation<const float>, const int&) { return {}; }
};
int main() { alloy::Trainer<M, alloy::Checkpointing, alloy::Host> t(M{}); }
