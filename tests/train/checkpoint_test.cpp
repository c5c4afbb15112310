#include "../../examples/custom_model/teacher_mlp.hpp"
#include "../optim/reference.hpp"
#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <regex>

namespace {

using namespace alloy;
using teacher::Batch;
using teacher::StudentMlp;
using test::TempDir;

std::vector<Batch> batches(std::uint64_t seed, int count, bool poison_one = false) {
  const teacher::Teacher t(16, 32, 4, seed);
  std::mt19937_64 rng(seed);
  std::vector<Batch> out;
  for (int i = 0; i < count; ++i) out.push_back(t.batch(24, rng));
  if (poison_one) out[count / 3].x[5] = std::numeric_limits<float>::infinity();  // one skipped step on the way
  return out;
}

template <class Tr>
typename Tr::Config config(std::uint64_t seed) {
  typename Tr::Config c;
  c.schedule = LrSchedule::warmup_cosine(2e-3f, 3, 40);
  c.max_grad_norm = 1.0f;
  c.seed = seed;
  if constexpr (!Tr::precision::has_master && !std::is_same_v<typename Tr::compute_type, fp32>) {
    c.param_rounding = Rounding::stochastic;
  }
  return c;
}

// N steps, save, load into a fresh trainer, M steps: the same bytes (and reports) as N + M steps.
template <class Tr>
void resume_is_bit_exact(std::uint64_t seed) {
  TempDir dir;
  const int n = 7, m = 5;
  const auto data = batches(seed, (n + m) * Tr::accumulation_steps, true);
  Tr straight(StudentMlp(16, 32, 4), config<Tr>(seed));
  auto it = data.begin();
  for (int s = 0; s < n; ++s) straight.step(it);
  straight.save(dir / "ckpt.safetensors");
  Tr resumed(StudentMlp(16, 32, 4), config<Tr>(seed + 1000));  // another initialization, overwritten by load
  resumed.load(dir / "ckpt.safetensors");
  EXPECT_EQ(resumed.steps(), std::uint64_t(n));
  auto it2 = it;
  for (int s = 0; s < m; ++s) {
    const auto a = straight.step(it);
    const auto b = resumed.step(it2);
    EXPECT_EQ(a.loss, b.loss) << "step " << n + s;
    EXPECT_EQ(a.lr, b.lr);
    EXPECT_EQ(a.loss_scale, b.loss_scale);
    EXPECT_EQ(a.skipped_steps, b.skipped_steps);
    EXPECT_EQ(a.applied_steps, b.applied_steps);
  }
  EXPECT_EQ(test::snapshot(resumed.store()), test::snapshot(straight.store()));
}

TEST(Checkpoint, ResumeIsBitExact) {
  ALLOY_SEEDED(seed);
  resume_is_bit_exact<Trainer<StudentMlp, Precision<bf16, fp32_master>, AdamW<>, Host>>(seed);
  resume_is_bit_exact<Trainer<StudentMlp, Precision<fp16, fp32_master>, Accumulate<2>, AdamW<State<q8>>, Host>>(seed);
  resume_is_bit_exact<Trainer<StudentMlp, Precision<bf16>, Lion<State<bf16>>, Host>>(seed);
  resume_is_bit_exact<Trainer<StudentMlp, Precision<fp32>, Adafactor<>, Host>>(seed);
  resume_is_bit_exact<Trainer<StudentMlp, Precision<fp32>, Accumulate<3>, SGD<State<q8_blockwise<2048>>>, Host>>(seed);
}

using Bf16Trainer = Trainer<StudentMlp, Precision<bf16, fp32_master>, AdamW<>, Host>;

// Reads the checkpoint with a scan written here, not the library's reader: the 8-byte length,
// then each "name":{"dtype":...,"shape":[...],"data_offsets":[b,e]} entry.
TEST(Checkpoint, IsSafetensorsThatAnIndependentParserReads) {
  TempDir dir;
  Bf16Trainer trainer(StudentMlp(16, 32, 4), {.seed = 5});
  const auto data = batches(5, 2);
  trainer.step(data.begin());
  trainer.save(dir / "c.safetensors");
  std::ifstream in(dir / "c.safetensors", std::ios::binary);
  std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(file[i]);
  ASSERT_LE(8 + header_len, file.size());
  const std::string header = file.substr(8, header_len);
  const std::string data_section = file.substr(8 + header_len);
  const std::regex entry(
      "\"([^\"]+)\":\\{\"dtype\":\"([A-Z0-9]+)\",\"shape\":\\[([0-9,]*)\\],\"data_offsets\":\\[([0-9]+),([0-9]+)\\]"
      "\\}");
  std::map<std::string, std::tuple<std::string, std::string, std::uint64_t, std::uint64_t>> found;
  for (std::sregex_iterator m(header.begin(), header.end(), entry), end; m != end; ++m) {
    found[(*m)[1]] = {(*m)[2], (*m)[3], std::stoull((*m)[4]), std::stoull((*m)[5])};
  }
  ASSERT_TRUE(found.count("w1") && found.count("alloy/master/w1") && found.count("alloy/state/0"));
  EXPECT_EQ(std::get<0>(found["w1"]), "BF16");
  EXPECT_EQ(std::get<1>(found["w1"]), "32,16");
  EXPECT_EQ(std::get<0>(found["alloy/master/w1"]), "F32");
  EXPECT_NE(header.find("\"alloy.format\":\"alloy-checkpoint-1\""), std::string::npos);
  // The master tensor's bytes are the trainer's fp32 master values.
  const auto [dtype, shape, begin, end] = found["alloy/master/w1"];
  ASSERT_EQ(end - begin, 32u * 16u * 4u);
  const auto master = trainer.store().master("w1");
  for (int i = 0; i < 32 * 16; ++i) {
    float v;
    std::memcpy(&v, data_section.data() + begin + 4 * i, 4);
    ASSERT_EQ(v, master[i]) << i;
  }
  // Tensors tile the data section: the last one ends at its end.
  std::uint64_t last = 0;
  for (auto& [name, t] : found) last = std::max(last, std::get<3>(t));
  EXPECT_EQ(last, data_section.size());
}

// A refused load leaves every byte and counter of the trainer as it was.
template <class Tr>
void expect_refused(Tr& trainer, const std::filesystem::path& path, const std::string& mentions) {
  const auto before = test::snapshot(trainer.store());
  const auto steps = trainer.steps();
  const auto scale = trainer.loss_scale();
  try {
    trainer.load(path);
    ADD_FAILURE() << "loaded " << path;
  } catch (const alloy::error& e) {
    EXPECT_NE(std::string(e.what()).find(mentions), std::string::npos) << e.what();
  }
  EXPECT_EQ(test::snapshot(trainer.store()), before);
  EXPECT_EQ(trainer.steps(), steps);
  EXPECT_EQ(trainer.loss_scale(), scale);
}

TEST(Checkpoint, RefusesTruncatedCorruptForeignAndMismatchedFiles) {
  TempDir dir;
  const auto data = batches(9, 4);
  Bf16Trainer source(StudentMlp(16, 32, 4), {.seed = 9});
  source.step(data.begin());
  const auto good = dir / "good.safetensors";
  source.save(good);
  Bf16Trainer target(StudentMlp(16, 32, 4), {.seed = 10});
  target.step(data.begin() + 1);

  const auto size = std::filesystem::file_size(good);
  std::filesystem::copy_file(good, dir / "truncated.safetensors");
  std::filesystem::resize_file(dir / "truncated.safetensors", size - 100);
  expect_refused(target, dir / "truncated.safetensors", "truncated.safetensors");

  {  // a byte of the JSON header damaged
    std::filesystem::copy_file(good, dir / "corrupt.safetensors");
    std::fstream f(dir / "corrupt.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(12);
    f.put('#');
  }
  expect_refused(target, dir / "corrupt.safetensors", "corrupt.safetensors");

  write_safetensors(dir / "foreign.safetensors", std::vector<TensorToWrite>{});
  expect_refused(target, dir / "foreign.safetensors", "not an alloy checkpoint");

  Trainer<StudentMlp, Precision<bf16, fp32_master>, AdamW<>, Host> wider(StudentMlp(16, 48, 4));
  wider.save(dir / "other_model.safetensors");
  expect_refused(target, dir / "other_model.safetensors", "tensor 'w1' is BF16 [48, 16], this model has BF16 [32, 16]");

  Trainer<StudentMlp, Precision<fp16, fp32_master>, AdamW<>, Host> half(StudentMlp(16, 32, 4));
  half.save(dir / "fp16.safetensors");
  expect_refused(target, dir / "fp16.safetensors", "compute=fp16");

  Trainer<StudentMlp, Precision<bf16, fp32_master>, SGD<>, Host> sgd(StudentMlp(16, 32, 4));
  sgd.save(dir / "sgd.safetensors");
  expect_refused(target, dir / "sgd.safetensors", "optimizer=SGD");

  Trainer<StudentMlp, Precision<bf16, fp32_master>, AdamW<State<q8>>, Host> q8(StudentMlp(16, 32, 4));
  q8.save(dir / "q8.safetensors");
  expect_refused(target, dir / "q8.safetensors", "state=q8/256");

  // After all that, the good file still loads and training continues.
  target.load(good);
  EXPECT_EQ(target.steps(), 1u);
  EXPECT_FALSE(target.step(data.begin() + 2).skipped);
}

TEST(Checkpoint, RefusesNonFiniteWeights) {
  TempDir dir;
  Bf16Trainer trainer(StudentMlp(16, 32, 4));
  trainer.store().master("b2")[1] = std::numeric_limits<float>::quiet_NaN();
  trainer.save(dir / "nan.safetensors");
  Bf16Trainer other(StudentMlp(16, 32, 4));
  expect_refused(other, dir / "nan.safetensors", "parameter 'b2' holds a non-finite value at element 1");
}

TEST(Checkpoint, SavingReplacesTheOldFileWhole) {
  TempDir dir;
  const auto data = batches(3, 3);
  Bf16Trainer trainer(StudentMlp(16, 32, 4));
  trainer.save(dir / "c.safetensors");
  trainer.step(data.begin());
  trainer.save(dir / "c.safetensors");
  Bf16Trainer other(StudentMlp(16, 32, 4));
  other.load(dir / "c.safetensors");
  EXPECT_EQ(other.steps(), 1u);
  std::size_t entries = 0;
  for (auto& e : std::filesystem::directory_iterator(dir.path())) entries += e.is_regular_file();
  EXPECT_EQ(entries, 1u) << "a temporary file was left behind";
}

}  // namespace
