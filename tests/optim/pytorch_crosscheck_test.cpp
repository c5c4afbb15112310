// alloy's update rules against numbers PyTorch computed on the same problem: three steps on a
// 6x5 matrix and a 5-vector whose values and gradients are fixed formulas. The expected values
// come from tests/optim/pytorch_reference.py, run with torch 2.11.0+cu130 on an NVIDIA H200
// (float32, 2026-11-23); everything else in the optim tests checks the same rules against
// float64 formulas.
#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace {

using namespace alloy;

#include "pytorch_reference_values.inc"

ParamRegistry problem() {
  ParamRegistry r;
  r.declare("w", {6, 5});
  r.declare("b", {5});
  return r;
}

template <class O>
std::vector<float> run(const typename O::Config& config) {
  using P = Precision<fp32>;
  ParamStore<P, O, Host> store(problem());
  OptimizerStep<P, O, Host> opt({.optimizer = config});
  auto w = store.param("w"), b = store.param("b");
  for (int i = 0; i < 30; ++i) w[i] = static_cast<float>(std::sin(0.7 * i + 0.3));
  for (int i = 0; i < 5; ++i) b[i] = static_cast<float>(0.5 * std::cos(0.9 * i));
  for (int t = 1; t <= 3; ++t) {
    auto gw = store.grad("w"), gb = store.grad("b");
    for (int i = 0; i < 30; ++i) gw[i] = static_cast<float>(0.1 * std::cos(1.3 * i + 0.5 * t));
    for (int i = 0; i < 5; ++i) gb[i] = static_cast<float>(0.1 * std::sin(0.4 * i - 0.2 * t));
    EXPECT_FALSE(opt.step(store, {.lr = config.lr}).skipped);
  }
  std::vector<float> out(w.data, w.data + 30);
  out.insert(out.end(), b.data, b.data + 5);
  return out;
}

void expect_close(const std::vector<float>& got, const std::vector<float>& torch) {
  ASSERT_EQ(got.size(), torch.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], torch[i], 2e-6 * std::max(1.0f, std::fabs(torch[i]))) << "element " << i;
  }
}

TEST(PyTorchCrossCheck, AdamW) {
  expect_close(run<AdamW<>>({.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f, .weight_decay = 0.1f}),
               torch_adamw);
}

TEST(PyTorchCrossCheck, SgdNesterov) {
  expect_close(run<SGD<>>({.lr = 0.1f, .momentum = 0.9f, .dampening = 0.0f, .weight_decay = 0.01f, .nesterov = true}),
               torch_sgd);
}

TEST(PyTorchCrossCheck, Lion) {
  expect_close(run<Lion<>>({.lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.99f, .weight_decay = 0.1f}), torch_lion);
}

TEST(PyTorchCrossCheck, Adafactor) {
  expect_close(run<Adafactor<>>({.lr = 1e-2f, .weight_decay = 0.05f}), torch_adafactor);
}

}  // namespace
