// DynamicLossScaleConfig::grad_scaler() against torch.amp.GradScaler's update rule, step by step,
// over long pseudo-random sequences of overflowing and finite steps. The reference below is
// torch's _amp_update_scale_ (aten/src/ATen/native/cpu/AmpGradScalerKernels.cpp), transcribed:
//   found_inf: scale = scale * backoff (in double, stored as float); tracker = 0
//   otherwise: tracker + 1; on reaching growth_interval: scale * growth when that is finite,
//              and tracker = 0
// tests/precision/gradscaler_reference.py runs the real torch._amp_update_scale_ over the same
// sequences (the same LCG and seeds) and checks the same digests; run it where PyTorch is.
// With ALLOY_GRADSCALER_TRACE=<dir> set, this test writes each scenario's scales, one step a line
// ("step scale_bits tracker", the bits in hex), as the script's --trace does, for a diff.
#include <alloy/precision/loss_scale.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using alloy::DynamicLossScaleConfig;
using alloy::LossScaleState;

// Knuth's MMIX LCG; the script has the same.
struct Lcg {
  std::uint64_t state;
  std::uint32_t next() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<std::uint32_t>(state >> 32);
  }
};

// A run of `steps` steps, each overflowing when the generator draws below `threshold` (so with
// probability threshold / 2^32).
struct Phase {
  std::uint64_t steps;
  std::uint32_t threshold;
};

// The overflow pattern of one scenario; the script builds it the same way.
std::vector<bool> overflow_sequence(std::uint64_t seed, const std::vector<Phase>& fixed_head,
                                    std::uint64_t random_steps, std::uint32_t max_phase,
                                    const std::vector<std::uint32_t>& thresholds,
                                    const std::vector<Phase>& fixed_tail) {
  Lcg rng{seed};
  std::vector<bool> out;
  auto run = [&](const Phase& p) {
    for (std::uint64_t i = 0; i < p.steps; ++i) out.push_back(rng.next() < p.threshold);
  };
  for (const Phase& p : fixed_head) run(p);
  for (std::uint64_t done = 0; done < random_steps;) {
    const std::uint64_t length = std::min<std::uint64_t>(1 + rng.next() % max_phase, random_steps - done);
    const std::uint32_t threshold = thresholds[rng.next() % thresholds.size()];
    run({length, threshold});
    done += length;
  }
  for (const Phase& p : fixed_tail) run(p);
  return out;
}

struct TorchScaler {
  float scale;
  std::int32_t growth_tracker = 0;
  void update(bool found_inf, double growth_factor, double backoff_factor, std::int32_t growth_interval) {
    if (found_inf) {
      scale = static_cast<float>(scale * backoff_factor);
      growth_tracker = 0;
    } else {
      const std::int32_t successful = growth_tracker + 1;
      if (successful == growth_interval) {
        const float next = static_cast<float>(scale * growth_factor);
        if (std::isfinite(next)) scale = next;
        growth_tracker = 0;
      } else {
        growth_tracker = successful;
      }
    }
  }
};

std::uint32_t bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

struct Coverage {
  std::uint64_t digest = 14695981039346656037ull;  // FNV-1a over (scale bits, tracker) after each step
  float largest = 0.0f;
  float smallest_positive = INFINITY;
  bool reached_zero = false;
  std::uint64_t grew = 0, backed_off = 0, growth_refused = 0;  // refused: interval done, result not finite

  void absorb(std::uint32_t word) {
    for (int b = 0; b < 4; ++b) {
      digest ^= (word >> (8 * b)) & 0xffu;
      digest *= 1099511628211ull;
    }
  }
};

// Runs alloy's update and the torch reference side by side; returns what the run covered.
Coverage compare(const char* name, const DynamicLossScaleConfig& c, const std::vector<bool>& overflows) {
  LossScaleState ours = alloy::initial_loss_scale_state(c);
  TorchScaler torch{c.init_scale};
  Coverage cov;
  FILE* trace = nullptr;
  if (const char* dir = std::getenv("ALLOY_GRADSCALER_TRACE")) {
    trace = std::fopen((std::string(dir) + "/" + name + ".cpp.txt").c_str(), "w");
  }
  for (std::size_t i = 0; i < overflows.size(); ++i) {
    const float before = torch.scale;
    const std::int32_t tracker_before = torch.growth_tracker;
    const alloy::ScaleEvent e = alloy::update_loss_scale(ours, c, overflows[i]);
    torch.update(overflows[i], c.growth_factor, c.backoff_factor, c.growth_interval);
    if (bits(ours.scale) != bits(torch.scale) || ours.growth_tracker != torch.growth_tracker) {
      ADD_FAILURE() << name << ", step " << i << (overflows[i] ? " (overflow)" : " (finite)") << ": alloy scale "
                    << ours.scale << " tracker " << ours.growth_tracker << ", GradScaler scale " << torch.scale
                    << " tracker " << torch.growth_tracker << " (before: " << before << ", " << tracker_before
                    << "), event " << int(e);
      break;
    }
    cov.absorb(bits(torch.scale));
    cov.absorb(static_cast<std::uint32_t>(torch.growth_tracker));
    if (trace) std::fprintf(trace, "%zu %08x %d\n", i, static_cast<unsigned>(bits(torch.scale)), torch.growth_tracker);
    cov.largest = std::max(cov.largest, torch.scale);
    if (torch.scale > 0.0f) cov.smallest_positive = std::min(cov.smallest_positive, torch.scale);
    cov.reached_zero |= torch.scale == 0.0f;
    cov.grew += torch.scale > before;
    cov.backed_off += overflows[i] && torch.scale < before;
    cov.growth_refused += !overflows[i] && tracker_before + 1 == c.growth_interval && torch.scale == before;
  }
  if (trace) std::fclose(trace);
  std::printf(
      "%s: %zu steps, digest %016llx, largest %.9g, smallest positive %.9g, zero %d, grew %llu, backed off %llu, "
      "growth refused %llu\n",
      name, overflows.size(), static_cast<unsigned long long>(cov.digest), static_cast<double>(cov.largest),
      static_cast<double>(cov.smallest_positive), int(cov.reached_zero), static_cast<unsigned long long>(cov.grew),
      static_cast<unsigned long long>(cov.backed_off), static_cast<unsigned long long>(cov.growth_refused));
  return cov;
}

constexpr std::uint32_t p(double probability) { return static_cast<std::uint32_t>(probability * 4294967296.0); }

TEST(GradScalerPreset, IsGradScalersDefaultsWithoutAlloysBounds) {
  constexpr DynamicLossScaleConfig g = DynamicLossScaleConfig::grad_scaler();
  static_assert(g.init_scale == 65536.0f && g.growth_factor == 2.0f && g.backoff_factor == 0.5f);
  static_assert(g.growth_interval == 2000 && g.hysteresis == 1);
  static_assert(g.min_scale == 0.0f && g.max_scale == 0x1.fffffep+127f);
  // The same knobs as alloy's defaults but the two bounds.
  constexpr DynamicLossScaleConfig d;
  EXPECT_EQ(d.init_scale, g.init_scale);
  EXPECT_EQ(d.growth_factor, g.growth_factor);
  EXPECT_EQ(d.backoff_factor, g.backoff_factor);
  EXPECT_EQ(d.growth_interval, g.growth_interval);
  EXPECT_EQ(d.hysteresis, g.hysteresis);
  EXPECT_EQ(d.min_scale, 1.0f);
  EXPECT_EQ(d.max_scale, 16777216.0f);
  // Usable as a policy's compile-time defaults.
  static_assert(alloy::DynamicLossScale<DynamicLossScaleConfig::grad_scaler()>::defaults.min_scale == 0.0f);
}

// Climbs to float's largest power of two (and is refused growth past it), wanders, then backs
// off through the denormals to 0, where it stays (0 * 2 is finite, as in torch).
TEST(GradScalerPreset, MatchesTorchUpdateFromTheFloatLimitIntoDenormals) {
  const auto seq = overflow_sequence(20261201, {{240000, 0}}, 200000, 20000, {0, p(0x1p-14), p(0x1p-11), p(0x1p-8)},
                                     {{600, p(7.0 / 8.0)}, {5000, p(1.0 / 16.0)}});
  const Coverage cov = compare("preset_limits", DynamicLossScaleConfig::grad_scaler(), seq);
  EXPECT_EQ(cov.largest, 0x1p127f);
  EXPECT_GT(cov.growth_refused, 0u);
  EXPECT_LT(cov.smallest_positive, 0x1p-126f);  // a denormal
  EXPECT_TRUE(cov.reached_zero);
  EXPECT_EQ(cov.digest, 0x5f845280bd4a980dull);  // gradscaler_reference.py checks torch against it
}

// GradScaler's rule with a short interval, so a million random steps grow and back off often,
// touching float's largest power of two and its denormals without settling at 0.
TEST(GradScalerPreset, MatchesTorchUpdateOnAMillionRandomSteps) {
  DynamicLossScaleConfig c = DynamicLossScaleConfig::grad_scaler();
  c.growth_interval = 3;
  const auto seq = overflow_sequence(7, {}, 1000000, 1024, {p(1.0 / 32), p(1.0 / 8), p(1.0 / 5), p(1.0 / 4)}, {});
  const Coverage cov = compare("interval3_random", c, seq);
  EXPECT_GT(cov.grew, 100000u);
  EXPECT_GT(cov.backed_off, 100000u);
  EXPECT_EQ(cov.largest, 0x1p127f);
  EXPECT_GT(cov.growth_refused, 0u);
  EXPECT_LT(cov.smallest_positive, 0x1p-126f);
  EXPECT_FALSE(cov.reached_zero);
  EXPECT_EQ(cov.digest, 0x7c917be76a5f58aaull);  // gradscaler_reference.py checks torch against it
}

// alloy's defaults part from GradScaler at the bounds, and only there.
TEST(DynamicLossScale, DefaultBoundsAreWhereItPartsFromGradScaler) {
  const DynamicLossScaleConfig d;
  const DynamicLossScaleConfig g = DynamicLossScaleConfig::grad_scaler();
  LossScaleState sd = alloy::initial_loss_scale_state(d), sg = alloy::initial_loss_scale_state(g);
  for (int i = 0; i < 8 * 2000; ++i) {  // 8 intervals without overflow
    alloy::update_loss_scale(sd, d, false);
    alloy::update_loss_scale(sg, g, false);
  }
  EXPECT_EQ(sd.scale, 0x1p24f);  // capped
  EXPECT_EQ(sg.scale, 0x1p24f);
  for (int i = 0; i < 2000; ++i) {
    alloy::update_loss_scale(sd, d, false);
    alloy::update_loss_scale(sg, g, false);
  }
  EXPECT_EQ(sd.scale, 0x1p24f);
  EXPECT_EQ(sg.scale, 0x1p25f);
  // Down: alloy's stops at 1 with an error event; GradScaler's goes on below 1.
  alloy::ScaleEvent last{};
  int backoffs = 0;
  while ((last = alloy::update_loss_scale(sd, d, true)) == alloy::ScaleEvent::backed_off) ++backoffs;
  EXPECT_EQ(last, alloy::ScaleEvent::underflow);
  EXPECT_EQ(backoffs, 24);
  EXPECT_EQ(sd.scale, 1.0f);
  for (int i = 0; i < 30; ++i) EXPECT_EQ(alloy::update_loss_scale(sg, g, true), alloy::ScaleEvent::backed_off);
  EXPECT_EQ(sg.scale, 0x1p-5f);
}

TEST(DynamicLossScale, NeverGrowsToInfinityWhateverMaxScaleSays) {
  DynamicLossScaleConfig c;
  c.init_scale = 0x1p126f;
  c.growth_interval = 1;
  c.max_scale = INFINITY;
  LossScaleState s = alloy::initial_loss_scale_state(c);
  EXPECT_EQ(alloy::update_loss_scale(s, c, false), alloy::ScaleEvent::grew);
  EXPECT_EQ(s.scale, 0x1p127f);
  EXPECT_EQ(alloy::update_loss_scale(s, c, false), alloy::ScaleEvent::kept);
  EXPECT_EQ(s.scale, 0x1p127f);
  EXPECT_EQ(s.growth_tracker, 0);
}

}  // namespace
