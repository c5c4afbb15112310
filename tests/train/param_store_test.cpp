#include "../support/test_support.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>

namespace {

using namespace alloy;

ParamRegistry small_model() {
  ParamRegistry r;
  r.declare("embed", {50, 7}, Init::normal(0.02f), {.weight_decay = false});
  r.declare("w", {7, 13}, Init::uniform(-0.5f, 0.5f));
  r.declare("b", {13}, Init::constant(0.25f), {.weight_decay = false, .lr_scale = 2.0f});
  return r;
}

TEST(ParamRegistry, RejectsBadDeclarationsWithTheirName) {
  ParamRegistry r;
  r.declare("w", {3, 4});
  EXPECT_MENTIONS(test::message_of([&] { r.declare("w", {2}); }), "'w' is declared twice");
  EXPECT_MENTIONS(test::message_of([&] { r.declare("z", {3, 0}); }), "'z' has a dimension of 0");
  EXPECT_MENTIONS(test::message_of([&] { r.declare("r5", {1, 1, 1, 1, 1}); }), "'r5' has rank 5");
  EXPECT_MENTIONS(test::message_of([&] { r.declare("", {1}); }), "needs a name");
  EXPECT_MENTIONS(test::message_of([&] { (void)r.handle("nope"); }), "no parameter named 'nope'");
  EXPECT_EQ(r.size(), 1u);  // failed declarations added nothing
}

TEST(ArenaLayout, TensorsStartOnBlocksAndPaddingIsCounted) {
  const auto r = small_model();
  const ArenaLayout l(r, 256);
  ASSERT_EQ(l.tensors(), 3u);
  EXPECT_EQ(l[0].offset, 0u);
  EXPECT_EQ(l[1].offset, 512u);  // 350 elements round up to two blocks
  EXPECT_EQ(l[2].offset, 768u);
  EXPECT_EQ(l.padded_numel(), 1024u);
  EXPECT_EQ(l.numel(), 350u + 91u + 13u);
  ASSERT_EQ(l.block_scales().size(), 4u);
  EXPECT_EQ(l.block_scales()[0].decay, 0.0f);
  EXPECT_EQ(l.block_scales()[2].decay, 1.0f);
  EXPECT_EQ(l.block_scales()[3].lr, 2.0f);
  const ArenaLayout q(r, 2048);
  EXPECT_EQ(q[1].offset, 2048u);
  EXPECT_EQ(q.padded_numel(), 3 * 2048u);
  EXPECT_EQ(q.block_scales().size(), 3 * 8u);
}

// Bytes per parameter count every role, at compile time.
using BfMaster = ParamStore<Precision<bf16, fp32_master>, AdamW<>, Host>;
static_assert(BfMaster::bytes_per_param == 2 + 2 + 4 + 8);  // param, grad, master, m and v
using Q8Store = ParamStore<Precision<bf16, fp32_master>, AdamW<State<q8>>, Host>;
static_assert(Q8Store::bytes_per_param == 2 + 2 + 4 + 2 + 8.0 / 256);
using AccumStore = ParamStore<Precision<bf16, fp32_master>, AdamW<State<bf16>>, Host, 16>;
static_assert(AccumStore::bytes_per_param == 2 + 2 + 4 + 4 + 4);
static_assert(AccumStore::has_accumulator && std::is_same_v<AccumStore::optimizer_grad_type, float>);
static_assert(AccumStore::bytes_per_param_by_role.grad_accumulator == 4 &&
              AccumStore::bytes_per_param_by_role.optimizer_state == 4 &&
              AccumStore::bytes_per_param_by_role.master == 4);
static_assert(Q8Store::bytes_per_param_by_role.optimizer_state == 2 + 8.0 / 256);
using DirectStore = ParamStore<Precision<bf16>, Lion<State<bf16>>, Host>;
static_assert(DirectStore::bytes_per_param == 2 + 2 + 2);

TEST(ParamStore, ArenasAreSixteenByteAlignedPerTensorAndReportTheirBytes) {
  ParamStore<Precision<bf16, fp32_master>, AdamW<State<q8>>, Host> s(small_model());
  for (const char* name : {"embed", "w", "b"}) {
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(s.param(name).data) % 16, 0u) << name;
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(s.grad(name).data) % 16, 0u) << name;
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(s.master(name).data) % 16, 0u) << name;
  }
  const auto m = s.memory();
  EXPECT_EQ(m.params, 1024u * 2);
  EXPECT_EQ(m.grads, 1024u * 2);
  EXPECT_EQ(m.master, 1024u * 4);
  EXPECT_EQ(m.optimizer_state, 2 * (1024u + 4 * 4));  // two slots of codes and four block scales
  EXPECT_EQ(m.grad_accumulator, 0u);
}

TEST(ParamStore, ViewsHaveTheDeclaredShapes) {
  ParamStore<Precision<fp32>, SGD<>, Host> s(small_model());
  const auto w = s.param("w");
  EXPECT_EQ(w.rank, 2);
  EXPECT_EQ(w.size(0), 7);
  EXPECT_EQ(w.size(1), 13);
  EXPECT_EQ(w.strides[0], 13);
  EXPECT_EQ(w.numel(), 91);
  EXPECT_EQ(&w(2, 3), &w[2 * 13 + 3]);
  EXPECT_EQ(s.param(s.registry().handle("b")).numel(), 13);
}

TEST(ParamStore, InitializationFollowsEachInitAndIsReproducible) {
  ParamStore<Precision<bf16, fp32_master>, AdamW<>, Host> a(small_model(), Host{}, 42);
  ParamStore<Precision<bf16, fp32_master>, AdamW<>, Host> b(small_model(), Host{}, 42);
  ParamStore<Precision<bf16, fp32_master>, AdamW<>, Host> c(small_model(), Host{}, 43);
  const auto ea = a.master("embed"), eb = b.master("embed"), ec = c.master("embed");
  double sum = 0, sq = 0;
  bool differs = false;
  for (std::int64_t i = 0; i < ea.numel(); ++i) {
    ASSERT_EQ(ea[i], eb[i]);
    differs |= ea[i] != ec[i];
    sum += ea[i];
    sq += double(ea[i]) * ea[i];
    // The compute copy is the master rounded to nearest.
    ASSERT_EQ(a.param("embed")[i].bits(), bf16(ea[i]).bits());
  }
  EXPECT_TRUE(differs) << "another seed drew the same values";
  const double n = double(ea.numel()), mean = sum / n, sd = std::sqrt(sq / n - mean * mean);
  EXPECT_NEAR(mean, 0.0, 5 * 0.02 / std::sqrt(n));
  EXPECT_NEAR(sd, 0.02, 0.2 * 0.02);
  const auto w = a.master("w");
  for (std::int64_t i = 0; i < w.numel(); ++i) ASSERT_TRUE(w[i] >= -0.5f && w[i] <= 0.5f);
  const auto bias = a.master("b");
  for (std::int64_t i = 0; i < bias.numel(); ++i) ASSERT_EQ(bias[i], 0.25f);
  // Padding is zero in every arena.
  const auto* p = a.master_arena().data();
  for (std::size_t i = 350; i < 512; ++i) ASSERT_EQ(p[i], 0.0f);
}

}  // namespace
