// expect: LayeredModel: the model needs a member `std::pair<float, Activation<T>> head(Ctx&, Activation<const T> y, const batch_type&)`
#include <alloy/alloy.hpp>
#include <vector>
struct Block {
  template <class C> alloy::Activation<float> forward(C&, alloy::Activation<const float> x) { return {const_cast<float*>(x.data), x.rows, x.cols}; }
  template <class C> alloy::Activation<float> backward(C&, alloy::Activation<const float> d) { return {const_cast<float*>(d.data), d.rows, d.cols}; }
};
struct M {
  using batch_type = int;
  std::vector<Block> blocks;
  void declare(alloy::ParamRegistry&) {}
  std::vector<Block>& layers() { return blocks; }
  template <class C> alloy::Activation<float> input(C&, const int&) { return {}; }
};
int main() { alloy::Trainer<M, alloy::Checkpointing, alloy::Host> t(M{}); }
