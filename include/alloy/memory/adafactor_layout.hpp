// Where Adafactor (optim/adafactor.hpp) keeps each tensor's statistics in its compact state arena:
// for a matrix (the last two dimensions; leading ones are a batch) its row statistics, then its
// column statistics, per batch entry (m + n values instead of m n); for a vector one value per
// element. Each tensor's share starts 16-byte aligned.
#pragma once

#include <alloy/memory/registry.hpp>

#include <cstddef>
#include <vector>

namespace alloy {

// Where each tensor's statistics live in the compact state arena.
struct AdafactorPlacement {
  std::size_t offset = 0;  // first statistic
  std::size_t batch = 1, rows = 1, cols = 1;
  bool factored = false;  // rank >= 2: rows then columns; else one value per element
};

inline std::vector<AdafactorPlacement> adafactor_layout(const ParamRegistry& registry, std::size_t* total) {
  std::vector<AdafactorPlacement> out;
  std::size_t offset = 0;
  for (const auto& spec : registry.specs()) {
    AdafactorPlacement a;
    a.offset = offset;
    const auto& s = spec.shape;
    if (s.size() >= 2) {
      a.factored = true;
      a.rows = static_cast<std::size_t>(s[s.size() - 2]);
      a.cols = static_cast<std::size_t>(s[s.size() - 1]);
      for (std::size_t d = 0; d + 2 < s.size(); ++d) a.batch *= static_cast<std::size_t>(s[d]);
      offset += a.batch * (a.rows + a.cols);
    } else {
      a.cols = static_cast<std::size_t>(spec.numel());
      offset += a.cols;
    }
    offset = (offset + 3) / 4 * 4;  // keep every tensor's statistics 16-byte aligned
    out.push_back(a);
  }
  *total = offset;
  return out;
}

}  // namespace alloy
