// A consumer's program: uses alloy's public header and checks a few results.
#include <alloy/alloy.hpp>

#include <cstdio>
#include <vector>

int main() {
  std::vector<float> x(1000);
  std::vector<alloy::bf16> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.5f * static_cast<float>(i);
  alloy::for_each_n(
      alloy::Host{}, x.size(), [](const float& a, alloy::bf16& b) { b = alloy::bf16(a); }, alloy::in(x.data()),
      alloy::out(y.data()));
  const float sum = alloy::reduce_sum(alloy::Host{}, x.data(), x.size());
  const bool ok = sum == 249750.0f && static_cast<float>(y[3]) == 1.5f && alloy::fp16(2.0f).bits() == 0x4000;
  std::printf("alloy %d.%d.%d consumer: %s\n", ALLOY_VERSION_MAJOR, ALLOY_VERSION_MINOR, ALLOY_VERSION_PATCH,
              ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
