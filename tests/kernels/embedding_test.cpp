// The embedding kernels on the Host backend: the grouping of rows by token, the lookup against
// exact sums, and the backward's gathers against float64 sums.
#include "../support/test_support.hpp"
#include "../support/values.hpp"

#include <alloy/kernels/embedding.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <vector>

namespace {

using alloy::bf16;
using alloy::Host;
using alloy::TokenGroups;
using namespace alloy::test;

// n tokens in [0, vocab), `heavy` of them one token (spread through the batch).
std::vector<std::int32_t> tokens_with_a_heavy_one(std::size_t n, std::size_t vocab, std::size_t heavy,
                                                  std::mt19937_64& rng) {
  auto t = random_targets(n, vocab, rng);
  for (std::size_t i = 0; i < heavy; ++i) t[(i * 7919) % n] = 5;
  return t;
}

TEST(TokenGroups, EveryRowOnceBySegmentsOfAtMost32) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const std::size_t rows = 1000, vocab = 50;
  const auto tokens = tokens_with_a_heavy_one(rows, vocab, 300, rng);
  TokenGroups groups;
  groups.build(tokens, vocab);
  const auto g = groups.view(groups.packed().data());
  ASSERT_EQ(g.rows, rows);
  std::map<std::int32_t, std::vector<std::int32_t>> by_token;
  for (std::size_t r = 0; r < rows; ++r) by_token[tokens[r]].push_back(std::int32_t(r));
  std::map<std::int32_t, std::vector<std::int32_t>> seen;
  std::size_t slots = 0;
  ASSERT_LE(g.segments_in_use(), g.segment_count);
  ASSERT_LE(g.merges_in_use(), g.merge_count);
  for (std::size_t s = 0; s < g.segments_in_use(); ++s) {
    const std::int32_t* seg = g.segments + 4 * s;
    EXPECT_LE(seg[2] - seg[1], 32);
    EXPECT_GT(seg[2] - seg[1], 0);
    for (std::int32_t i = seg[1]; i < seg[2]; ++i) {
      EXPECT_EQ(tokens[std::size_t(g.rows_by_token[i])], seg[0]);
      seen[seg[0]].push_back(g.rows_by_token[i]);
    }
    const bool merged = by_token[seg[0]].size() > 32;
    EXPECT_EQ(seg[3] >= 0, merged) << "token " << seg[0];
    slots += merged;
  }
  EXPECT_EQ(seen, by_token) << "every row once, ascending within its token";
  EXPECT_LE(slots, g.partial_slots) << "the scratch has room for every merged segment";
  ASSERT_EQ(g.merges_in_use(), 1u);
  EXPECT_EQ(g.merges[0], 5);
  EXPECT_EQ(g.merges[2], std::int32_t((by_token[5].size() + 31) / 32));
}

// A TokenGroups reused from batch to batch (as an Embedding does; its segment scratch only
// grows) gives what a fresh one gives, in every part in use (the room past them keeps what it
// held, and nothing reads it), and a view's sizes depend on the row count alone: a large batch, then smaller ones with
// tokens of exactly 32 and 33 rows (one segment; two merged), every row of one token, and a batch of one row. The
// segments come in ascending token order.
TEST(TokenGroups, ReusedForAnotherBatchGivesWhatAFreshOneGives) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  std::vector<std::vector<std::int32_t>> batches;
  batches.push_back(random_targets(5000, 50257, rng));
  batches.push_back(tokens_with_a_heavy_one(333, 97, 100, rng));
  std::vector<std::int32_t> edges(32, 3);
  edges.insert(edges.end(), 33, 1);
  edges.push_back(0);
  std::shuffle(edges.begin(), edges.end(), rng);
  batches.push_back(edges);
  batches.push_back(std::vector<std::int32_t>(100, 96));
  batches.push_back({42});
  TokenGroups reused;
  for (const auto& tokens : batches) {
    SCOPED_TRACE(std::to_string(tokens.size()) + " rows");
    TokenGroups fresh;
    fresh.build(tokens, 50257);
    reused.build(tokens, 50257);
    ASSERT_EQ(fresh.packed().size(), reused.packed().size());
    const auto f = fresh.view(fresh.packed().data());
    const auto g = reused.view(reused.packed().data());
    ASSERT_EQ(f.segments_in_use(), g.segments_in_use());
    ASSERT_EQ(f.merges_in_use(), g.merges_in_use());
    const auto in_use = [](const alloy::TokenGroupsView& v) {
      std::vector<std::int32_t> out(v.rows_by_token, v.rows_by_token + v.rows);
      out.insert(out.end(), v.segments, v.segments + 4 * v.segments_in_use());
      out.insert(out.end(), v.merges, v.merges + 3 * v.merges_in_use());
      return out;
    };
    EXPECT_EQ(in_use(f), in_use(g));
    EXPECT_EQ(g.segment_count, alloy::token_group_segment_room(tokens.size()));
    EXPECT_EQ(g.merge_count, alloy::token_group_merge_room(tokens.size()));
    for (std::size_t s = 1; s < g.segments_in_use(); ++s) {
      EXPECT_LE(g.segments[4 * (s - 1)], g.segments[4 * s]) << "segment " << s;
      EXPECT_EQ(g.segments[4 * (s - 1) + 2], g.segments[4 * s + 1]) << "segments tile the rows, segment " << s;
    }
    EXPECT_EQ(g.segments[4 * (g.segments_in_use() - 1) + 2], std::int32_t(tokens.size()));
  }
  // The edges batch: token 0 (1 row), token 1 (33 rows: two merged segments), token 3 (32 rows: one).
  TokenGroups edge_groups;
  edge_groups.build(batches[2], 50257);
  const auto g = edge_groups.view(edge_groups.packed().data());
  ASSERT_EQ(g.segments_in_use(), 4u);
  EXPECT_EQ(std::vector<std::int32_t>(g.segments, g.segments + 16),
            (std::vector<std::int32_t>{0, 0, 1, -1, 1, 1, 33, 0, 1, 33, 34, 1, 3, 34, 66, -1}));
  ASSERT_EQ(g.merges_in_use(), 1u);
  EXPECT_EQ(std::vector<std::int32_t>(g.merges, g.merges + 3), (std::vector<std::int32_t>{1, 0, 2}));
}

TEST(TokenGroups, ABadTokenIsAnError) {
  TokenGroups groups;
  const std::vector<std::int32_t> tokens = {1, 2, 10, 3};
  EXPECT_MENTIONS(message_of([&] { groups.build(tokens, 10); }), "token 10 at row 2 is outside [0, 10)");
}

template <class T>
class EmbeddingKernels : public ::testing::Test {};
using Dtypes = ::testing::Types<float, bf16>;
TYPED_TEST_SUITE(EmbeddingKernels, Dtypes, DtypeName);

TYPED_TEST(EmbeddingKernels, ForwardAddsTheTokenAndPositionRows) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const std::size_t vocab = 31, positions = 9, dim = 13, seq = 7, rows = 5 * seq;
  const auto wte = random_values<T>(vocab * dim, rng), wpe = random_values<T>(positions * dim, rng);
  const auto tokens = random_targets(rows, vocab, rng);
  std::vector<T> x(rows * dim + 1, poison<T>()), plain(rows * dim, poison<T>());
  alloy::embedding_forward(Host{}, tokens.data(), wte.data(), wpe.data(), x.data(), rows, dim, seq);
  alloy::embedding_forward(Host{}, tokens.data(), wte.data(), static_cast<const T*>(nullptr), plain.data(), rows, dim,
                           seq);
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t c = 0; c < dim; ++c) {
      const T w = wte[std::size_t(tokens[r]) * dim + c], p = wpe[(r % seq) * dim + c];
      // The fp32 sum of two values of T is exact in double; one rounding to T.
      ASSERT_EQ(bits_of(x[r * dim + c]), bits_of(alloy::round_nearest<T>(float(value(w) + value(p)))))
          << r << ", " << c;
      ASSERT_EQ(bits_of(plain[r * dim + c]), bits_of(w));
    }
  }
  EXPECT_EQ(bits_of(x.back()), bits_of(poison<T>())) << "written past rows x dim";
}

// dwte gathers every row of dx to its token (a heavy token spans several 32-row segments),
// written over random values or added to them; dwpe sums over the batch, and positions past the
// sequence are zeroed when writing and kept when accumulating.
TYPED_TEST(EmbeddingKernels, BackwardMatchesFloat64Sums) {
  using T = TypeParam;
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const std::size_t vocab = 23, padded = 24, positions = 50, dim = 37, seq = 45, rows = 9 * seq;
  const auto tokens = tokens_with_a_heavy_one(rows, vocab, 150, rng);
  const auto dx = random_values<T>(rows * dim, rng);
  TokenGroups groups;
  groups.build(tokens, vocab);
  const auto g = groups.view(groups.packed().data());
  ASSERT_GT(g.merges_in_use(), 0u);
  std::vector<float> scratch(alloy::embedding_token_backward_scratch_floats(g, dim));
  const double bound = std::is_same_v<T, float> ? 1e-5 : 1e-2;  // fp32 sums of <= 200 terms, one rounding to T
  for (bool accumulate : {false, true}) {
    SCOPED_TRACE(accumulate ? "accumulating" : "writing");
    const auto before_wte = random_values<T>(padded * dim, rng), before_wpe = random_values<T>(positions * dim, rng);
    auto dwte = before_wte, dwpe = before_wpe;
    alloy::embedding_token_backward(Host{}, dx.data(), g, dim, dwte.data(), padded, accumulate, scratch.data());
    alloy::embedding_position_backward(Host{}, dx.data(), rows, dim, seq, dwpe.data(), positions, accumulate);
    std::vector<double> want_wte(padded * dim, 0.0), want_wpe(positions * dim, 0.0);
    if (accumulate) {
      for (std::size_t i = 0; i < want_wte.size(); ++i) want_wte[i] = value(before_wte[i]);
      for (std::size_t i = 0; i < want_wpe.size(); ++i) want_wpe[i] = value(before_wpe[i]);
    }
    for (std::size_t r = 0; r < rows; ++r) {
      for (std::size_t c = 0; c < dim; ++c) {
        want_wte[std::size_t(tokens[r]) * dim + c] += value(dx[r * dim + c]);
        want_wpe[(r % seq) * dim + c] += value(dx[r * dim + c]);
      }
    }
    BoundCheck wte_check("dwte"), wpe_check("dwpe");
    for (std::size_t i = 0; i < want_wte.size(); ++i) {
      wte_check.expect(value(dwte[i]), want_wte[i], bound * (1 + std::fabs(want_wte[i])), i / dim, i % dim);
    }
    for (std::size_t i = 0; i < want_wpe.size(); ++i) {
      wpe_check.expect(value(dwpe[i]), want_wpe[i], bound * (1 + std::fabs(want_wpe[i])), i / dim, i % dim);
    }
    // Untouched rows keep their exact bits when accumulating (no rounding of an addition of 0).
    if (accumulate) {
      EXPECT_EQ(bits_of(dwpe.back()), bits_of(before_wpe.back()));
    }
  }
}

TEST(EmbeddingArguments, ShapesThatDoNotFitAreErrors) {
  std::vector<float> dx(12), table(12);
  const std::vector<std::int32_t> tokens = {0, 1, 2};
  EXPECT_MENTIONS(message_of([&] {
                    alloy::embedding_forward(Host{}, tokens.data(), table.data(), table.data(), dx.data(), 3, 4, 2);
                  }),
                  "3 rows are not a whole number of sequences of 2");
  EXPECT_MENTIONS(
      message_of([&] { alloy::embedding_position_backward(Host{}, dx.data(), 3, 4, 3, table.data(), 2, false); }),
      "3 rows in sequences of 3 for a table of 2 positions");
}

}  // namespace
