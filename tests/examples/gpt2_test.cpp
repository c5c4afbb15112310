// The GPT-2 example's model (examples/gpt2) on the Host backend at a tiny size: gradients against
// finite differences, Checkpointing's bits, the logits path against the training loss, the
// Hugging Face layout (names, transposes, padding) both ways, the loss falling on a text, and
// --data-parallel's replicas on Host threads.
#include "../../examples/gpt2/data_parallel.hpp"
#include "../../examples/gpt2/hf_weights.hpp"
#include "../../examples/gpt2/sampling.hpp"
#include "../../examples/gpt2/text_data.hpp"
#include "../support/finite_differences.hpp"
#include "../support/test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

using namespace alloy;

// vocab 250 padded to 256 (so the padding is exercised), d 32, 2 blocks of 2 heads, 16 positions.
constexpr gpt2::Config tiny{250, 256, 32, 2, 2, 16};

gpt2::Batch random_batch(const gpt2::Config& c, std::size_t rows, std::mt19937_64& rng) {
  return gpt2::TokenSource::random(c).batch(rows, rng);
}

std::vector<std::string> names_of(const gpt2::Gpt2& m) {
  gpt2::Gpt2 copy = m;
  ParamRegistry r;
  copy.declare(r);
  std::vector<std::string> names;
  for (const auto& s : r.specs()) names.push_back(s.name);
  return names;
}

std::filesystem::path temp_path(const std::string& name) {
  return std::filesystem::temp_directory_path() /
         ("alloy_gpt2_test_" + name + "_" + std::to_string(test::fresh_seed()) + ".safetensors");
}

template <class Store>
float loss_and_grads(Store& store, gpt2::Gpt2& model, const gpt2::Batch& b, Workspace<Host>& ws, int every) {
  ws.reset();
  Context<Store> ctx(store, ws, 1.0f, false, 0, 1, 0, every);
  return model.forward_backward(ctx, b);
}

TEST(Gpt2, DeclaresHuggingFaceNames) {
  const auto names = names_of(gpt2::Gpt2(tiny));
  ASSERT_EQ(names.size(), 2 + 2 * 12 + 2u);
  EXPECT_EQ(names[0], "transformer.wte.weight");
  EXPECT_EQ(names[1], "transformer.wpe.weight");
  EXPECT_EQ(names[2], "transformer.h.0.ln_1.weight");
  EXPECT_EQ(names[4], "transformer.h.0.attn.c_attn.weight");
  EXPECT_EQ(names[13], "transformer.h.0.mlp.c_proj.bias");
  EXPECT_EQ(names.back(), "transformer.ln_f.bias");
}

// Random tokens (the benchmarks' batches): every token and target in [0, vocab), each target the
// next token of its row, fresh tokens each batch, and tokens spread over the whole vocabulary
// (GPT-2's 50257: a 16 x 1024 batch reaches both ends of it and every tenth of it).
TEST(Gpt2, RandomBatchesAreShiftedSequencesOverTheWholeVocabulary) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const gpt2::Config c{50257, 50304, 32, 1, 1, 1024};
  const auto source = gpt2::TokenSource::random(c);
  const gpt2::Batch a = source.batch(16, rng), b = source.batch(16, rng);
  ASSERT_EQ(a.tokens.size(), 16u * 1024);
  ASSERT_EQ(a.targets.size(), a.tokens.size());
  std::set<std::int32_t> tenths;
  std::int32_t lowest = c.vocab, highest = -1;
  std::size_t same = 0;
  for (std::size_t i = 0; i < a.tokens.size(); ++i) {
    ASSERT_GE(a.tokens[i], 0);
    ASSERT_LT(std::size_t(a.tokens[i]), c.vocab);
    ASSERT_GE(a.targets[i], 0);
    ASSERT_LT(std::size_t(a.targets[i]), c.vocab);
    if (i % 1024 != 1023) {
      ASSERT_EQ(a.targets[i], a.tokens[i + 1]) << "position " << i;
    }
    tenths.insert(a.tokens[i] * 10 / std::int32_t(c.vocab));
    lowest = std::min(lowest, a.tokens[i]);
    highest = std::max(highest, a.tokens[i]);
    same += a.tokens[i] == b.tokens[i];
  }
  EXPECT_EQ(tenths.size(), 10u);
  EXPECT_LT(lowest, 50);
  EXPECT_GT(highest, 50207);
  EXPECT_LT(same, 10u) << "the second batch repeats the first";
}

TEST(Gpt2, GradientsMatchFiniteDifferences) {
  ALLOY_SEEDED(seed);
  gpt2::Gpt2 model(tiny);
  ParamRegistry r;
  model.declare(r);
  using Store = ParamStore<Precision<fp32>, SGD<>, Host>;
  Store store(r, Host{}, seed);
  // Parameters larger than GPT-2's 0.02 initialization, so every path carries gradient (at 0.02
  // the blocks are nearly the identity and the attention nearly uniform).
  {
    std::mt19937_64 init(seed);
    std::normal_distribution<float> d(0.0f, 0.3f);
    std::vector<float> p = to_host(store.params_arena());
    for (auto& v : p) v = d(init);
    copy_from_host(store.params_arena(), std::span<const float>(p));
  }
  Workspace<Host> ws;
  std::mt19937_64 rng(seed);
  const auto batch = random_batch(tiny, 2, rng);
  loss_and_grads(store, model, batch, ws, 0);
  const auto grads = to_host(store.grads_arena());
  test::expect_gradients_match_finite_differences(
      store, grads,
      {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
       "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.1.mlp.c_fc.weight",
       "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"},
      [&] { return loss_and_grads(store, model, batch, ws, 0); });
}

template <class... Extra>
std::pair<std::vector<float>, std::vector<bf16>> train_bf16(std::uint64_t seed, int steps) {
  Trainer<gpt2::Gpt2, Precision<bf16, fp32_master>, AdamW<>, Host, Extra...> trainer(gpt2::Gpt2(tiny), {.seed = seed});
  std::mt19937_64 rng(seed);
  std::vector<float> losses;
  for (int i = 0; i < steps; ++i) {
    const auto b = random_batch(tiny, 3, rng);
    losses.push_back(trainer.step(std::span(&b, 1)).loss);
  }
  return {losses, to_host(trainer.store().params_arena())};
}

TEST(Gpt2, CheckpointingGivesTheSameBits) {
  ALLOY_SEEDED(seed);
  const auto kept = train_bf16(seed, 3);
  const auto recomputed = train_bf16<Checkpointing>(seed, 3);
  EXPECT_EQ(kept.first, recomputed.first);
  ASSERT_EQ(kept.second.size(), recomputed.second.size());
  for (std::size_t i = 0; i < kept.second.size(); ++i) {
    ASSERT_EQ(kept.second[i].bits(), recomputed.second[i].bits()) << "parameter element " << i;
  }
}

// The logits path (sampling, --logits-out) gives the loss the training step gives, and a row's
// logits do not depend on the tokens after it (so sampling may pad the window).
TEST(Gpt2, LogitsGiveTheTrainingLossAndIgnoreLaterTokens) {
  ALLOY_SEEDED(seed);
  using Tr = Trainer<gpt2::Gpt2, Precision<fp32>, AdamW<>, Host>;
  Tr trainer(gpt2::Gpt2(tiny), {.seed = seed});
  std::mt19937_64 rng(seed);
  const auto b = random_batch(tiny, 2, rng);
  gpt2::Evaluation<Tr> eval(trainer);
  std::vector<std::size_t> all(b.tokens.size());
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = i;
  const std::vector<float> logits = eval.logits(b.tokens, all);
  ASSERT_EQ(logits.size(), all.size() * tiny.padded_vocab);
  double loss = 0;
  for (std::size_t r = 0; r < all.size(); ++r) {
    const float* l = logits.data() + r * tiny.padded_vocab;
    double m = -INFINITY, sum = 0;
    for (std::size_t v = 0; v < tiny.vocab; ++v) m = std::max(m, double(l[v]));
    for (std::size_t v = 0; v < tiny.vocab; ++v) sum += std::exp(l[v] - m);
    loss += std::log(sum) + m - l[b.targets[r]];
  }
  loss /= double(all.size());
  const float trained = trainer.step(std::span(&b, 1)).loss;  // the loss before the update
  EXPECT_NEAR(loss, trained, 1e-5 * loss);

  // Row 5 of the first sequence, with the tokens after it changed.
  std::vector<std::int32_t> window(b.tokens.begin(), b.tokens.begin() + tiny.seq);
  const std::size_t row = 5;
  gpt2::Evaluation<Tr> after(trainer);
  const auto before = after.logits(window, std::span(&row, 1));
  for (std::size_t t = row + 1; t < tiny.seq; ++t) window[t] = std::int32_t((window[t] + 7) % tiny.vocab);
  EXPECT_EQ(after.logits(window, std::span(&row, 1)), before);
  window[row] = std::int32_t((window[row] + 1) % tiny.vocab);
  EXPECT_NE(after.logits(window, std::span(&row, 1)), before);
}

using Fp32Trainer = Trainer<gpt2::Gpt2, Precision<fp32>, AdamW<>, Host>;

float param_at(Fp32Trainer& t, const std::string& name, std::size_t i) {
  const auto h = t.store().registry().handle(name);
  return to_host(t.store().params_arena())[t.store().layout()[h.index].offset + i];
}

TEST(Gpt2, HuggingFaceExportTransposesConv1DAndDropsPadding) {
  ALLOY_SEEDED(seed);
  Fp32Trainer trainer(gpt2::Gpt2(tiny), {.seed = seed});
  const auto path = temp_path("export");
  gpt2::export_hf(trainer, path);
  const auto file = SafetensorsFile::open(path);
  std::set<std::string> names;
  for (const auto& t : file.tensors()) names.insert(t.name);
  const auto declared = names_of(trainer.model());
  EXPECT_EQ(names, std::set<std::string>(declared.begin(), declared.end())) << "no lm_head.weight: it is tied";
  EXPECT_FALSE(std::filesystem::exists(path.string() + ".alloy-layout.tmp"));

  const std::int64_t d = tiny.dim;
  EXPECT_EQ(file.tensor("transformer.wte.weight").shape, (std::vector<std::int64_t>{250, d}));
  EXPECT_EQ(file.tensor("transformer.wpe.weight").shape, (std::vector<std::int64_t>{16, d}));
  EXPECT_EQ(file.tensor("transformer.h.0.attn.c_attn.weight").shape, (std::vector<std::int64_t>{d, 3 * d}));
  EXPECT_EQ(file.tensor("transformer.h.0.attn.c_proj.weight").shape, (std::vector<std::int64_t>{d, d}));
  EXPECT_EQ(file.tensor("transformer.h.1.mlp.c_fc.weight").shape, (std::vector<std::int64_t>{d, 4 * d}));
  EXPECT_EQ(file.tensor("transformer.h.1.mlp.c_proj.weight").shape, (std::vector<std::int64_t>{4 * d, d}));
  EXPECT_EQ(file.tensor("transformer.h.1.mlp.c_fc.bias").shape, (std::vector<std::int64_t>{4 * d}));

  // HF's c_fc.weight[i][j] (in i, out j) is alloy's [j][i].
  std::vector<float> c_fc(std::size_t(d * 4 * d));
  file.read("transformer.h.1.mlp.c_fc.weight", std::as_writable_bytes(std::span(c_fc)));
  for (std::size_t i : {std::size_t(0), std::size_t(3), std::size_t(d - 1)}) {
    for (std::size_t j : {std::size_t(0), std::size_t(17), std::size_t(4 * d - 1)}) {
      EXPECT_EQ(c_fc[i * 4 * d + j], param_at(trainer, "transformer.h.1.mlp.c_fc.weight", j * d + i)) << i << ", " << j;
    }
  }
  std::vector<float> wte(std::size_t(250 * d));
  file.read("transformer.wte.weight", std::as_writable_bytes(std::span(wte)));
  EXPECT_EQ(wte.back(), param_at(trainer, "transformer.wte.weight", 250 * d - 1));
  std::filesystem::remove(path);
}

TEST(Gpt2, HuggingFaceImportRestoresTheExportedModel) {
  ALLOY_SEEDED(seed);
  Fp32Trainer a(gpt2::Gpt2(tiny), {.seed = seed}), b(gpt2::Gpt2(tiny), {.seed = seed + 1});
  std::mt19937_64 rng(seed);
  const auto batch = random_batch(tiny, 2, rng);
  a.step(std::span(&batch, 1));  // trained a little, so the import is not the initialization
  const auto path = temp_path("roundtrip");
  gpt2::export_hf(a, path);
  gpt2::import_hf(b, path);
  const auto pa = to_host(a.store().params_arena()), pb = to_host(b.store().params_arena());
  const auto& layout = a.store().layout();
  for (std::size_t t = 0; t < a.store().registry().size(); ++t) {
    const std::string& name = a.store().registry().specs()[t].name;
    for (std::size_t i = 0; i < layout[t].numel; ++i) {
      const bool padding = name == "transformer.wte.weight" && i >= tiny.vocab * tiny.dim;
      ASSERT_EQ(pb[layout[t].offset + i], padding ? 0.0f : pa[layout[t].offset + i]) << name << "[" << i << "]";
    }
  }
  // The same loss on the same batch (padding rows are masked out of the softmax).
  EXPECT_EQ(a.step(std::span(&batch, 1)).loss, b.step(std::span(&batch, 1)).loss);
  std::filesystem::remove(path);
}

// A state_dict as transformers saves it may carry lm_head.weight (tied: equal to wte) and the
// attention's causal-mask buffers; a different lm_head.weight is refused and nothing changes.
TEST(Gpt2, HuggingFaceImportTakesATiedLmHeadAndRefusesAnUntiedOne) {
  ALLOY_SEEDED(seed);
  Fp32Trainer a(gpt2::Gpt2(tiny), {.seed = seed}), b(gpt2::Gpt2(tiny), {.seed = seed + 1});
  const auto exported = temp_path("plain"), with_head = temp_path("head");
  gpt2::export_hf(a, exported);
  auto write_with_head = [&](float change) {
    const auto file = SafetensorsFile::open(exported);
    std::vector<std::vector<float>> values;
    std::vector<TensorToWrite> out;
    values.reserve(file.tensors().size() + 2);
    for (const auto& t : file.tensors()) {
      values.emplace_back(t.numel());
      file.read(t.name, std::as_writable_bytes(std::span(values.back())));
      out.push_back({t.name, SafetensorsDtype::f32, t.shape, std::as_bytes(std::span<const float>(values.back()))});
      if (t.name == "transformer.wte.weight") {
        values.push_back(values.back());
        values.back()[7] += change;
        out.push_back(
            {"lm_head.weight", SafetensorsDtype::f32, t.shape, std::as_bytes(std::span<const float>(values.back()))});
      }
    }
    values.emplace_back(std::size_t(tiny.seq * tiny.seq), 1.0f);
    out.push_back({"transformer.h.0.attn.bias",
                   SafetensorsDtype::f32,
                   {1, 1, std::int64_t(tiny.seq), std::int64_t(tiny.seq)},
                   std::as_bytes(std::span<const float>(values.back()))});
    write_safetensors(with_head, out, {{"format", "pt"}});
  };
  write_with_head(0.0f);
  gpt2::import_hf(b, with_head);
  EXPECT_EQ(param_at(b, "transformer.wte.weight", 7), param_at(a, "transformer.wte.weight", 7));

  Fp32Trainer c(gpt2::Gpt2(tiny), {.seed = seed + 2});
  const auto before = to_host(c.store().params_arena());
  write_with_head(0.5f);
  EXPECT_MENTIONS(test::message_of([&] { gpt2::import_hf(c, with_head); }), "lm_head.weight differs");
  EXPECT_EQ(to_host(c.store().params_arena()), before);
  std::filesystem::remove(exported);
  std::filesystem::remove(with_head);
}

TEST(Gpt2, LossFallsOnASmallText) {
  std::string text;
  for (int i = 0; i < 40; ++i) {
    text += "the trainer owns the parameters; the model declares them. line " + std::to_string(i % 7) + ".\n";
  }
  const gpt2::Config c{256, 256, 32, 2, 2, 32};
  const auto data = gpt2::TokenSource::text(text, c);
  Trainer<gpt2::Gpt2, Precision<fp32>, AdamW<>, Host> trainer(gpt2::Gpt2(c), {.optimizer = {.lr = 3e-3f}, .seed = 5});
  std::mt19937_64 rng(5);
  std::vector<float> losses;
  for (int i = 0; i < 60; ++i) {
    const auto b = data.batch(4, rng);
    losses.push_back(trainer.step(std::span(&b, 1)).loss);
  }
  const double first = losses[0], last = (losses[57] + losses[58] + losses[59]) / 3;
  std::printf("loss %.4f -> %.4f over 60 steps\n", first, last);
  EXPECT_NEAR(first, std::log(256.0), 0.2) << "a fresh model is near uniform";
  EXPECT_LT(last, first - 2.0);
}

// --data-parallel on the Host (data_parallel.hpp): two threads, each a DataParallel replica
// drawing its own batches. The report is the step's, after the sum over the ranks: the same loss
// and gradient norm on both, and the loss falls on a text.
TEST(Gpt2, DataParallelReplicasOnHostThreadsAgreeAndTrain) {
  std::string text;
  for (int i = 0; i < 40; ++i) {
    text += "every rank draws its own batch; the sum is the same everywhere. line " + std::to_string(i % 5) + ".\n";
  }
  const gpt2::Config c{256, 256, 32, 2, 2, 32, true};
  const auto data = gpt2::TokenSource::text(text, c);
  gpt2::Options o;
  o.steps = 12;
  o.batch = 4;
  o.lr = 3e-3f;
  o.sample_tokens = 0;
  o.ranks = 2;
  o.seed = test::fresh_seed();
  o.csv = (std::filesystem::temp_directory_path() / ("alloy_gpt2_dp_" + std::to_string(o.seed) + ".csv")).string();
  ASSERT_EQ(gpt2::data_parallel_refusal(o, false), "");
  const auto ranks = gpt2::train_data_parallel_host(o, c, data);
  std::filesystem::remove(o.csv);
  ASSERT_EQ(ranks.size(), 2u);
  EXPECT_EQ(ranks[0].last.step, 12u);
  EXPECT_EQ(ranks[0].last.loss, ranks[1].last.loss) << "the loss reported is the mean over every rank";
  EXPECT_EQ(ranks[0].last.grad_norm, ranks[1].last.grad_norm) << "every replica steps on the same summed gradients";
  EXPECT_EQ(ranks[0].first.loss, ranks[1].first.loss);
  EXPECT_LT(ranks[0].last.loss, ranks[0].first.loss - 0.5);
  EXPECT_EQ(ranks[0].status, 0);
}

TEST(Gpt2, DataParallelRefusesWhatItCannotRun) {
  gpt2::Options o;
  EXPECT_EQ(gpt2::data_parallel_refusal(o, true), "");
  o.precision = "fp32";
  EXPECT_MENTIONS(gpt2::data_parallel_refusal(o, true), "bf16");
  o.precision = "bf16";
  o.export_hf = "w.safetensors";
  EXPECT_MENTIONS(gpt2::data_parallel_refusal(o, true), "--export");
  o.export_hf.clear();
  o.checkpointing = true;
  EXPECT_EQ(gpt2::data_parallel_refusal(o, true), "") << "Cuda replicas may recompute";
  EXPECT_MENTIONS(gpt2::data_parallel_refusal(o, false), "--checkpointing");
}

}  // namespace
