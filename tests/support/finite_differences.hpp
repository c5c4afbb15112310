// Gradients against central finite differences, for a fp32 store on the Host backend: the
// first, middle and last element of each named parameter, stepped by 1e-2 * max(1, |p|).
// `loss()` runs the model at the store's current parameters; `grads` holds the analytic
// gradients (the gradient arena after one loss()).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace alloy::test {

template <class Store, class Loss>
void expect_gradients_match_finite_differences(Store& store, const std::vector<float>& grads,
                                               std::initializer_list<const char*> names, Loss&& loss) {
  for (const char* name : names) {
    const auto h = store.registry().handle(name);
    auto p = store.param(h);
    const std::size_t offset = store.layout()[h.index].offset;
    for (std::int64_t i : {std::int64_t(0), p.numel() / 2, p.numel() - 1}) {
      const float keep = p[i];
      const float step = 1e-2f * std::max(1.0f, std::fabs(keep));
      p[i] = keep + step;
      const double up = loss();
      p[i] = keep - step;
      const double down = loss();
      p[i] = keep;
      const double numeric = (up - down) / (2.0 * step);
      EXPECT_NEAR(grads[offset + i], numeric, 2e-3 * std::fabs(numeric) + 2e-4) << name << "[" << i << "]";
    }
  }
}

}  // namespace alloy::test
