// Parameter initialization, run on the store's backend. Values depend only on (seed, tensor
// index, element index), so every backend and every run draws the same numbers.
#pragma once

#include <alloy/memory/registry.hpp>
#include <alloy/numeric/random.hpp>
#include <alloy/numeric/rounding.hpp>

#include <cmath>

namespace alloy::detail {

// One draw from `init` for element i of a tensor. Uniform words map to (0, 1) exactly; the
// normal draw is Box-Muller in double precision, rounded once to float.
ALLOY_HOST_DEVICE inline float draw_init(const Init& init, std::uint64_t key, std::uint64_t i) {
  if (init.kind == Init::Kind::constant) return init.a;
  const double u1 = (static_cast<double>(random_bits(key, 2 * i)) + 0.5) * 0x1p-32;
  if (init.kind == Init::Kind::uniform) {
    return static_cast<float>(init.a + (static_cast<double>(init.b) - init.a) * u1);
  }
  const double u2 = (static_cast<double>(random_bits(key, 2 * i + 1)) + 0.5) * 0x1p-32;
  const double z = ::sqrt(-2.0 * ::log(u1)) * ::cos(6.283185307179586 * u2);
  return static_cast<float>(init.a + static_cast<double>(init.b) * z);
}

inline std::uint64_t init_key(std::uint64_t seed, std::uint64_t tensor) {
  return seed ^ (0x9e3779b97f4a7c15ull * (tensor + 1));
}

// Writes a tensor's first values: the fp32 master (when there is one) and the compute copy,
// rounded to nearest even from the same float.
template <class Param>
struct InitTensor {
  Init init;
  std::uint64_t key;
  float* master;  // null without a master copy
  Param* params;
  ALLOY_HOST_DEVICE void operator()(std::size_t i) const {
    const float v = draw_init(init, key, i);
    if (master) master[i] = v;
    params[i] = round_nearest<Param>(v);
  }
};

}  // namespace alloy::detail
