// The gemm plans file (kernels/detail/gemm_plans.hpp): what GemmTuning::timed keeps across runs.
// Written and read back to the same plans; every malformed line is refused with the file's name
// and the line's number.
#include <alloy/error.hpp>
#include <alloy/kernels/detail/gemm_plans.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>

namespace {

using alloy::Epilogue;
using alloy::Transpose;
using alloy::detail::format_gemm_plans;
using alloy::detail::GemmAlgoWords;
using alloy::detail::GemmPlanKey;
using alloy::detail::GemmPlansFile;
using alloy::detail::parse_gemm_plans;

GemmPlanKey random_key(std::mt19937_64& rng) {
  const auto alignment = [&] { return std::uint32_t(1) << (rng() % 9); };
  return {int(rng() % 40) - 3,  // a negative data type survives too
          int(rng() % 100),
          rng() % 2 ? Transpose::yes : Transpose::no,
          rng() % 2 ? Transpose::yes : Transpose::no,
          rng() % 100000,
          rng() % 100000,
          rng() % 100000,
          rng(),  // any 64-bit value
          rng() % 100000,
          rng() % 100000,
          rng() % 100000,
          static_cast<Epilogue>(rng() % (static_cast<int>(Epilogue::dgelu_tanh_bias_grad) + 1)),
          rng() % 2 == 1,
          alignment(),
          alignment(),
          alignment(),
          alignment(),
          alignment(),
          alignment()};
}

GemmPlansFile random_file(std::mt19937_64& rng, std::size_t plans) {
  GemmPlansFile f;
  f.identity = "NVIDIA H200, sm_90, 132 SMs, cuBLASLt 130000, workspace 33554432 bytes";
  while (f.plans.size() < plans) {
    GemmAlgoWords algo;
    for (auto& w : algo) w = rng();
    f.plans.emplace(random_key(rng), algo);
  }
  return f;
}

TEST(GemmPlansFile, WrittenAndReadBackGivesTheSamePlans) {
  std::mt19937_64 rng(20261202);
  for (std::size_t plans : {0, 1, 7, 60}) {
    const GemmPlansFile f = random_file(rng, plans);
    const std::string text = format_gemm_plans(f);
    const GemmPlansFile back = parse_gemm_plans(text, "plans.txt");
    EXPECT_EQ(back.identity, f.identity);
    EXPECT_EQ(back.plans, f.plans) << text;
    EXPECT_EQ(format_gemm_plans(back), text);
  }
}

// The error for `text`, which must be refused.
std::string refusal(const std::string& text) {
  try {
    (void)parse_gemm_plans(text, "dir/plans.txt");
  } catch (const alloy::error& e) {
    return e.what();
  }
  ADD_FAILURE() << "accepted:\n" << text;
  return {};
}

TEST(GemmPlansFile, EveryMalformedLineIsRefusedWithTheFileAndLine) {
  std::mt19937_64 rng(7);
  const std::string good = format_gemm_plans(random_file(rng, 3));
  ASSERT_NO_THROW((void)parse_gemm_plans(good, "x"));
  const std::string header = good.substr(0, good.find("plan "));
  const std::string plan = good.substr(header.size(), good.find('\n', header.size()) + 1 - header.size());
  const auto replaced = [&](std::string line, const std::string& from, const std::string& to) {
    const auto at = line.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return line.replace(at, from.size(), to);
  };
  const std::string words_of_plan = plan.substr(5);
  struct Case {
    std::string text, expected;
  };
  const Case cases[] = {
      {"", "line 0: empty file"},
      {"alloy-gemm-plans 2\n", "line 1: not an alloy gemm plans file"},
      {"alloy-gemm-plans 1\n", "no identity line"},
      {"alloy-gemm-plans 1\n" + plan, "line 2: a plan before the identity line"},
      {header + "identity again\n", "line 3: a second identity line"},
      {header + "plans " + words_of_plan, "line 3: expected 'identity' or 'plan'"},
      {header + replaced(plan, " algo ", " 1 algo "), "line 3: a plan is 19 integers, 'algo' and 8 hex words"},
      {header + replaced(plan, " algo ", " "), "line 3: a plan is 19 integers"},
      {header + "plan x" + plan.substr(plan.find(' ', 5)), "line 3: field 1 'x' is not an integer"},
      {header + replaced(plan, " algo ", " algo zz"), "line 3: algo word 1"},
      {header + plan + plan, "line 4: a second plan for the same problem"},
  };
  for (const Case& c : cases) {
    const std::string what = refusal(c.text);
    EXPECT_NE(what.find("gemm plans file 'dir/plans.txt'"), std::string::npos) << what;
    EXPECT_NE(what.find(c.expected), std::string::npos) << "expected \"" << c.expected << "\" in: " << what;
  }
}

TEST(GemmPlansFile, FlagsAlignmentsAndEpiloguesOutOfRangeAreRefused) {
  std::mt19937_64 rng(11);
  GemmPlansFile f = random_file(rng, 1);
  const std::string text = format_gemm_plans(f);
  const std::size_t start = text.find("plan ") + 5;
  // Field i (0-based) of the one plan replaced by `value`.
  const auto with_field = [&](std::size_t i, const std::string& value) {
    std::size_t b = start;
    for (std::size_t j = 0; j < i; ++j) b = text.find(' ', b) + 1;
    const std::size_t e = text.find(' ', b);
    return text.substr(0, b) + value + text.substr(e);
  };
  EXPECT_NE(refusal(with_field(2, "2")).find("field 3 must be 0 or 1"), std::string::npos);
  EXPECT_NE(refusal(with_field(12, "5")).find("field 13 must be 0 or 1"), std::string::npos);
  EXPECT_NE(refusal(with_field(11, "99")).find("field 12 is not an epilogue"), std::string::npos);
  for (const char* bad : {"0", "3", "512", "96"}) {
    EXPECT_NE(refusal(with_field(15, bad)).find("field 16 is not an alignment"), std::string::npos) << bad;
  }
  EXPECT_NO_THROW((void)parse_gemm_plans(with_field(15, "128"), "x"));
}

}  // namespace
