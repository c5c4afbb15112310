#include "../../examples/custom_model/teacher_mlp.hpp"
#include "../optim/reference.hpp"
#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"
#include "odd_model.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <array>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <regex>
#include <set>
#include <sstream>

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

// The same on parameters of irregular shapes (a rank-3 tensor, [1], [k, 1], tensors past one q8
// block), whose per-parameter state tensors leave the arenas' padding out.
template <class Tr>
void odd_resume_is_bit_exact(std::uint64_t seed) {
  SCOPED_TRACE(Tr::signature());
  TempDir dir;
  const test::OddModel shapes(seed);
  std::mt19937_64 rng(seed);
  std::vector<test::OddBatch> data;
  for (int i = 0; i < 7 * Tr::accumulation_steps; ++i) data.push_back(shapes.batch(rng));
  const typename Tr::Config config{.schedule = LrSchedule::constant(1e-2f), .max_grad_norm = 1.0f, .seed = seed};
  Tr straight(test::OddModel(seed), config);
  auto it = data.begin();
  for (int s = 0; s < 4; ++s) straight.step(it);
  straight.save(dir / "ckpt.safetensors");
  auto other = config;
  other.seed = seed + 1;  // another initialization, overwritten by load (the seed too)
  Tr resumed(test::OddModel(seed), other);
  resumed.load(dir / "ckpt.safetensors");
  EXPECT_EQ(test::snapshot(resumed.store()), test::snapshot(straight.store()));
  auto it2 = it;
  for (int s = 0; s < 3; ++s) EXPECT_EQ(straight.step(it).loss, resumed.step(it2).loss);
  EXPECT_EQ(test::snapshot(resumed.store()), test::snapshot(straight.store()));
}

TEST(Checkpoint, ResumeIsBitExactOnIrregularShapes) {
  ALLOY_SEEDED(seed);
  odd_resume_is_bit_exact<Trainer<test::OddModel, Precision<bf16, fp32_master>, AdamW<State<q8>>, Host>>(seed);
  odd_resume_is_bit_exact<Trainer<test::OddModel, Precision<fp32>, Adafactor<>, Host>>(seed);
  odd_resume_is_bit_exact<
      Trainer<test::OddModel, Precision<fp16, fp32_master>, Accumulate<2>, SGD<State<q8_blockwise<2048>>>, Host>>(seed);
  odd_resume_is_bit_exact<Trainer<test::OddModel, Precision<bf16>, Lion<State<bf16>>, Host>>(seed);
}

// What a checkpoint holds for each parameter of `trainer`: name -> (dtype, shape, the values).
template <class Tr>
void expect_state_per_parameter(Tr& trainer, const std::filesystem::path& path, const std::vector<std::string>& slots,
                                SafetensorsDtype state_dtype) {
  SCOPED_TRACE(Tr::signature());
  using Store = typename Tr::store_type;
  using S = typename Store::state_storage;
  trainer.save(path);
  const SafetensorsFile file = SafetensorsFile::open(path);
  auto& store = trainer.store();
  std::set<std::string> expected;
  auto expect_tensor = [&](const std::string& name, SafetensorsDtype dtype, const std::vector<std::int64_t>& shape,
                           const auto& arena, std::size_t offset) {
    expected.insert(name);
    const StoredTensor* t = file.find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->dtype, dtype) << name;
    EXPECT_EQ(t->shape, shape) << name;
    const auto all = to_host(arena);
    using T = typename std::decay_t<decltype(all)>::value_type;
    std::vector<T> values(t->numel());
    file.read(name, std::as_writable_bytes(std::span(values)));
    ASSERT_LE(offset + values.size(), all.size());
    EXPECT_EQ(0, std::memcmp(values.data(), all.data() + offset, values.size() * sizeof(T))) << name;
  };
  for (std::size_t t = 0; t < store.registry().size(); ++t) {
    const auto& spec = store.registry().specs()[t];
    const auto& place = store.layout()[t];
    expected.insert(spec.name);
    if constexpr (Store::has_master) expected.insert("alloy/master/" + spec.name);
    if constexpr (is_adafactor_v<typename Tr::optimizer_type>) {
      const auto& a = store.adafactor_placements()[t];
      if (spec.shape.size() >= 2) {
        auto rows = spec.shape, cols = spec.shape;
        rows.back() = 1;
        cols[cols.size() - 2] = 1;
        expect_tensor("alloy/state/" + spec.name + "/row_var", state_dtype, rows, store.state_arena(0), a.offset);
        expect_tensor("alloy/state/" + spec.name + "/col_var", state_dtype, cols, store.state_arena(0),
                      a.offset + a.batch * a.rows);
      } else {
        expect_tensor("alloy/state/" + spec.name + "/variance", state_dtype, spec.shape, store.state_arena(0),
                      a.offset);
      }
    } else {
      for (std::size_t k = 0; k < slots.size(); ++k) {
        const std::string name = "alloy/state/" + spec.name + "/" + slots[k];
        expect_tensor(name, state_dtype, spec.shape, store.state_arena(int(k)), place.offset);
        if constexpr (Store::state_policy::quantized) {
          const std::size_t block = Store::quant_block;
          expect_tensor(name + ".absmax", SafetensorsDtype::f32,
                        {static_cast<std::int64_t>((place.numel + block - 1) / block)}, store.state_scale_arena(int(k)),
                        place.offset / block);
        }
      }
    }
  }
  std::set<std::string> found;
  for (const auto& t : file.tensors()) found.insert(t.name);
  EXPECT_EQ(found, expected);
  (void)sizeof(S);
}

TEST(Checkpoint, StoresOptimizerStatePerParameterUnderItsName) {
  ALLOY_SEEDED(seed);
  TempDir dir;
  const test::OddModel shapes(seed);
  auto trained = [&](auto& trainer) -> auto& {
    std::mt19937_64 rng(seed);
    for (int s = 0; s < 3; ++s) trainer.step([&] { return shapes.batch(rng); });
    return trainer;
  };
  {
    Trainer<test::OddModel, Precision<bf16, fp32_master>, AdamW<>, Host> t(test::OddModel(seed), {.seed = seed});
    expect_state_per_parameter(trained(t), dir / "adamw.safetensors", {"exp_avg", "exp_avg_sq"}, SafetensorsDtype::f32);
  }
  {
    Trainer<test::OddModel, Precision<fp32>, SGD<State<bf16>>, Host> t(test::OddModel(seed),
                                                                       {.optimizer = {.momentum = 0.9f}, .seed = seed});
    expect_state_per_parameter(trained(t), dir / "sgd.safetensors", {"momentum_buffer"}, SafetensorsDtype::bf16);
  }
  {
    Trainer<test::OddModel, Precision<bf16>, Lion<>, Host> t(test::OddModel(seed), {.seed = seed});
    expect_state_per_parameter(trained(t), dir / "lion.safetensors", {"exp_avg"}, SafetensorsDtype::f32);
  }
  {
    Trainer<test::OddModel, Precision<fp32>, Adafactor<>, Host> t(test::OddModel(seed), {.seed = seed});
    expect_state_per_parameter(trained(t), dir / "adafactor.safetensors", {}, SafetensorsDtype::f32);
  }
  {
    Trainer<test::OddModel, Precision<fp16, fp32_master>, AdamW<State<q8>>, Host> t(test::OddModel(seed),
                                                                                    {.seed = seed});
    expect_state_per_parameter(trained(t), dir / "q8.safetensors", {"exp_avg", "exp_avg_sq"}, SafetensorsDtype::u8);
  }
  {
    Trainer<test::OddModel, Precision<bf16, fp32_master>, Lion<State<q8_blockwise<2048>>>, Host> t(test::OddModel(seed),
                                                                                                   {.seed = seed});
    expect_state_per_parameter(trained(t), dir / "q8_2048.safetensors", {"exp_avg"}, SafetensorsDtype::u8);
  }
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
  ASSERT_TRUE(found.count("w1") && found.count("alloy/master/w1") && found.count("alloy/state/w1/exp_avg") &&
              found.count("alloy/state/w1/exp_avg_sq"));
  EXPECT_EQ(std::get<0>(found["w1"]), "BF16");
  EXPECT_EQ(std::get<1>(found["w1"]), "32,16");
  EXPECT_EQ(std::get<0>(found["alloy/master/w1"]), "F32");
  EXPECT_EQ(std::get<0>(found["alloy/state/b2/exp_avg_sq"]), "F32");
  EXPECT_EQ(std::get<1>(found["alloy/state/b2/exp_avg_sq"]), "4");
  EXPECT_EQ(found.size(), 4u * 4u) << "each of 4 parameters: itself, its master, exp_avg, exp_avg_sq";
  EXPECT_NE(header.find("\"alloy.format\":\"alloy-checkpoint-3\""), std::string::npos);
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

TEST(Checkpoint, RefusesOlderFormatsSayingSo) {
  TempDir dir;
  Bf16Trainer trainer(StudentMlp(16, 32, 4));
  write_safetensors(dir / "v1.safetensors", std::vector<TensorToWrite>{},
                    {{"alloy.format", "alloy-checkpoint-1"}, {"alloy.signature", Bf16Trainer::signature()}});
  expect_refused(trainer, dir / "v1.safetensors", "written in format 'alloy-checkpoint-1'");
  expect_refused(trainer, dir / "v1.safetensors", "it reads 'alloy-checkpoint-3' and 'alloy-checkpoint-2'");
}

// Optimizer state is validated as the weights are: finite, second moments not negative.
TEST(Checkpoint, RefusesBadOptimizerState) {
  ALLOY_SEEDED(seed);
  TempDir dir;
  const auto data = batches(seed, 3);
  Bf16Trainer source(StudentMlp(16, 32, 4), {.seed = seed});
  source.step(data.begin());
  source.step(data.begin() + 1);
  Bf16Trainer target(StudentMlp(16, 32, 4), {.seed = seed + 1});
  target.step(data.begin() + 2);
  std::mt19937_64 rng(seed);
  const std::size_t at = rng() % 4;
  const std::size_t offset = source.store().layout()[3].offset;  // b2, the last parameter
  auto& v = source.store().state_arena(1);
  const float kept = v.data()[offset + at];
  v.data()[offset + at] = -1e-3f;
  source.save(dir / "negative.safetensors");
  expect_refused(target, dir / "negative.safetensors",
                 "optimizer state 'alloy/state/b2/exp_avg_sq' holds a negative value at element " + std::to_string(at));
  v.data()[offset + at] = kept;
  source.store().state_arena(0).data()[offset + at] = std::numeric_limits<float>::infinity();
  source.save(dir / "infinite.safetensors");
  expect_refused(target, dir / "infinite.safetensors",
                 "optimizer state 'alloy/state/b2/exp_avg' holds a non-finite value at element " + std::to_string(at));
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

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <future>

namespace {

// A copy of `from` at `to` (every tensor as it was) with its metadata edited, written with fresh
// checksums (or, `checksums` false, none).
void rewrite(const std::filesystem::path& from, const std::filesystem::path& to,
             const std::function<void(std::map<std::string, std::string>&)>& edit, bool checksums = true) {
  const auto file = SafetensorsFile::open(from);
  std::vector<std::vector<std::byte>> data;
  std::vector<TensorToWrite> tensors;
  data.reserve(file.tensors().size());
  for (const auto& t : file.tensors()) {
    data.emplace_back(t.size);
    file.read(t.name, std::span<std::byte>(data.back()));
    tensors.push_back({t.name, t.dtype, t.shape, std::span<const std::byte>(data.back())});
  }
  auto metadata = file.metadata();
  std::erase_if(metadata, [](const auto& entry) { return entry.first.starts_with("crc32c:"); });
  edit(metadata);
  SafetensorsWriteOptions options;
  options.checksums = checksums;
  write_safetensors(to, tensors, metadata, options);
}

// A copy of `from` at `to` with metadata[key] = value.
void rewrite_metadata(const std::filesystem::path& from, const std::filesystem::path& to, const std::string& key,
                      const std::string& value) {
  rewrite(from, to, [&](auto& metadata) { metadata[key] = value; });
}

// A named pipe is refused at once; opening it for reading must not wait for a writer.
TEST(Checkpoint, RefusesANamedPipeWithoutWaitingForAWriter) {
  TempDir dir;
  const auto fifo = dir / "ckpt.safetensors";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  Bf16Trainer trainer(StudentMlp(16, 32, 4));
  auto refused = std::async(std::launch::async, [&] { expect_refused(trainer, fifo, "named pipe"); });
  if (refused.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    // Free the blocked reader so the test can end, then fail.
    const int fd = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
    refused.wait();
    if (fd >= 0) ::close(fd);
    FAIL() << "load() waited on the FIFO for 10 s";
  }
  refused.get();
  expect_refused(trainer, dir.path(), "directory");
}

// Counters are digits only and in range, and agree with each other; the scaler's state is valid.
TEST(Checkpoint, RefusesCountersThatParseLooselyOrContradictEachOther) {
  TempDir dir;
  const auto data = batches(5, 4);
  Bf16Trainer source(StudentMlp(16, 32, 4), {.seed = 5});
  source.step(data.begin());
  source.step(data.begin() + 1);
  const auto good = dir / "good.safetensors";
  source.save(good);
  Bf16Trainer target(StudentMlp(16, 32, 4), {.seed = 6});
  const struct {
    const char* key;
    const char* value;
    const char* says;
  } cases[] = {
      {"alloy.attempted_steps", " -1", "is not an unsigned integer"},
      {"alloy.attempted_steps", "+2", "is not an unsigned integer"},
      {"alloy.attempted_steps", "0x2", "is not an unsigned integer"},
      {"alloy.attempted_steps", "", "is not an unsigned integer"},
      {"alloy.attempted_steps", "99999999999999999999999", "is not an unsigned integer"},
      {"alloy.loss_scale_growth_tracker", "2147483648", "is above 2147483647"},
      {"alloy.loss_scale_growth_tracker", "4294967296", "is above 2147483647"},
      {"alloy.loss_scale_hysteresis_left", "0", "hysteresis_left is 0"},
      {"alloy.applied_steps", "3", "step counters disagree"},
      {"alloy.skipped_steps", "1", "step counters disagree"},
      {"alloy.loss_scale", "0x1p-140", "is not a positive normal float"},
      {"alloy.loss_scale", "-1", "is not a positive normal float"},
      {"alloy.loss_scale_overflows", "3", "more than the 2 attempted steps"},
  };
  for (const auto& c : cases) {
    const auto bad = dir / "bad.safetensors";
    rewrite_metadata(good, bad, c.key, c.value);
    SCOPED_TRACE(std::string(c.key) + " = '" + c.value + "'");
    expect_refused(target, bad, c.says);
  }
  rewrite_metadata(good, dir / "same.safetensors", "alloy.attempted_steps", "2");  // the helper itself is sound
  target.load(dir / "same.safetensors");
  EXPECT_EQ(target.steps(), 2u);
}

// A fixed scale is configuration: a trainer keeps its own; a different scaler kind is refused.
TEST(Checkpoint, AFixedScaleIsTheTrainersOwnAndOtherScalerKindsAreRefused) {
  TempDir dir;
  const auto data = batches(7, 4);
  using Fixed1k = Trainer<StudentMlp, Precision<fp16, fp32_master, StaticLossScale<1024.0f>>, AdamW<>, Host>;
  using Fixed64k = Trainer<StudentMlp, Precision<fp16, fp32_master, StaticLossScale<65536.0f>>, AdamW<>, Host>;
  using Dynamic = Trainer<StudentMlp, Precision<fp16, fp32_master>, AdamW<>, Host>;
  Fixed64k source(StudentMlp(16, 32, 4), {.seed = 7});
  source.step(data.begin());
  source.save(dir / "fixed64k.safetensors");
  Fixed1k target(StudentMlp(16, 32, 4), {.seed = 8});
  target.load(dir / "fixed64k.safetensors");
  EXPECT_EQ(target.loss_scale(), 1024.0f);
  EXPECT_EQ(target.steps(), 1u);
  EXPECT_FALSE(target.step(data.begin() + 1).skipped);
  Dynamic dynamic(StudentMlp(16, 32, 4), {.seed = 9});
  expect_refused(dynamic, dir / "fixed64k.safetensors", "scaler=StaticLossScale");
}

}  // namespace

namespace {

// The compute copy must be a rounding of its master (nearest, or stochastic: down or up).
TEST(Checkpoint, RefusesACompute16BitCopyThatIsNotARoundingOfItsMaster) {
  TempDir dir;
  const auto data = batches(11, 6);
  Bf16Trainer source(StudentMlp(16, 32, 4), {.seed = 11});
  source.step(data.begin());
  Bf16Trainer target(StudentMlp(16, 32, 4), {.seed = 12});
  auto w1 = source.store().param("w1");
  const bf16 kept = w1.data[3];
  w1.data[3] = bf16(std::numeric_limits<float>::infinity());
  source.save(dir / "inf.safetensors");
  expect_refused(target, dir / "inf.safetensors", "parameter 'w1': its bf16 copy at element 3 is inf");
  w1.data[3] = bf16(0.0f);
  source.save(dir / "zero.safetensors");
  expect_refused(target, dir / "zero.safetensors", "not a rounding of its fp32 master");
  w1.data[3] = bf16::from_bits(static_cast<std::uint16_t>(kept.bits() ^ 0x0400));  // one flipped exponent bit
  source.save(dir / "flipped.safetensors");
  expect_refused(target, dir / "flipped.safetensors", "parameter 'w1'");
  w1.data[3] = kept;

  // Stochastic rounding leaves copies rounded down or up: they load.
  Trainer<StudentMlp, Precision<bf16, fp32_master>, AdamW<>, Host> stochastic(
      StudentMlp(16, 32, 4), {.param_rounding = Rounding::stochastic, .seed = 13});
  for (int s = 0; s < 4; ++s) stochastic.step(data.begin() + s);
  stochastic.save(dir / "stochastic.safetensors");
  target.load(dir / "stochastic.safetensors");
  EXPECT_EQ(target.steps(), 4u);
}

// save() onto a symbolic link replaces the file it names and keeps the link; a link to no file
// yet creates it.
TEST(Checkpoint, SavingThroughASymbolicLinkReplacesItsTargetAndKeepsTheLink) {
  TempDir dir;
  const auto data = batches(13, 4);
  Bf16Trainer trainer(StudentMlp(16, 32, 4), {.seed = 13});
  trainer.step(data.begin());
  trainer.save(dir / "run1.safetensors");
  std::filesystem::create_symlink(dir / "run1.safetensors", dir / "latest.safetensors");
  trainer.step(data.begin() + 1);
  trainer.save(dir / "latest.safetensors");
  EXPECT_TRUE(std::filesystem::is_symlink(dir / "latest.safetensors"));
  Bf16Trainer reader(StudentMlp(16, 32, 4));
  reader.load(dir / "run1.safetensors");
  EXPECT_EQ(reader.steps(), 2u);
  std::filesystem::create_symlink(dir / "run2.safetensors", dir / "next.safetensors");  // dangling
  trainer.save(dir / "next.safetensors");
  EXPECT_TRUE(std::filesystem::is_symlink(dir / "next.safetensors"));
  EXPECT_TRUE(std::filesystem::is_regular_file(dir / "run2.safetensors"));
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos) << "left behind: " << e.path();
  }
}

}  // namespace

namespace {

// Metadata as format 2 wrote it: no configuration (and, written without checksums, none).
void as_format_2(std::map<std::string, std::string>& metadata) {
  std::erase_if(metadata, [](const auto& entry) { return entry.first.starts_with("alloy.config."); });
  metadata["alloy.format"] = "alloy-checkpoint-2";
}

// The file's bytes with one bit flipped: bit `bit` of byte `at` of tensor `name`'s data.
void flip_tensor_bit(const std::filesystem::path& from, const std::filesystem::path& to, const std::string& name,
                     std::size_t at, int bit) {
  const auto file = SafetensorsFile::open(from);
  auto bytes = test::read_all(from);
  bytes[file.data_offset() + file.tensor(name).offset + at] ^= std::byte(1 << bit);
  std::ofstream(to, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// One flipped bit, in a master weight's lowest mantissa bit, leaves a finite master whose bf16
// copy is still its rounding: only the checksum can tell, and it names the tensor.
TEST(Checkpoint, RefusesAFlippedBitInAMasterWeightByItsChecksum) {
  ALLOY_SEEDED(seed);
  TempDir dir;
  const auto data = batches(seed, 3);
  Bf16Trainer source(StudentMlp(16, 32, 4), {.seed = seed});
  source.step(data.begin());
  source.save(dir / "good.safetensors");
  Bf16Trainer target(StudentMlp(16, 32, 4), {.seed = seed + 1});
  target.step(data.begin() + 1);
  std::mt19937_64 rng(seed);
  const std::size_t element = rng() % (32 * 16);
  flip_tensor_bit(dir / "good.safetensors", dir / "flipped.safetensors", "alloy/master/w1", 4 * element, 0);
  expect_refused(target, dir / "flipped.safetensors", "tensor 'alloy/master/w1' fails its checksum");
  // The same bit in a file without checksums passes every other check: the checksum is the guard.
  rewrite(dir / "good.safetensors", dir / "unchecked.safetensors", as_format_2, false);
  flip_tensor_bit(dir / "unchecked.safetensors", dir / "unchecked_flipped.safetensors", "alloy/master/w1", 4 * element,
                  0);
  Bf16Trainer quiet(StudentMlp(16, 32, 4), {.load_log = [](const std::string&) {}});
  EXPECT_NO_THROW(quiet.load(dir / "unchecked_flipped.safetensors"));
}

// Format 2 (before checksums and configurations) loads, and says it could not compare.
TEST(Checkpoint, LoadsFormat2WithANoteThatTheConfigurationCouldNotBeCompared) {
  TempDir dir;
  const auto data = batches(17, 4);
  Bf16Trainer source(StudentMlp(16, 32, 4), {.seed = 17});
  source.step(data.begin());
  source.step(data.begin() + 1);
  source.save(dir / "v3.safetensors");
  rewrite(dir / "v3.safetensors", dir / "v2.safetensors", as_format_2, false);
  std::vector<std::string> lines;
  Bf16Trainer target(StudentMlp(16, 32, 4), {.load_log = [&](const std::string& l) { lines.push_back(l); }});
  const LoadReport report = target.load(dir / "v2.safetensors");
  EXPECT_EQ(report.format, "alloy-checkpoint-2");
  EXPECT_FALSE(report.config_compared);
  EXPECT_TRUE(report.config_differences.empty());
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_MENTIONS(lines[0], "v2.safetensors': written in format 'alloy-checkpoint-2', which records no configuration");
  EXPECT_EQ(target.steps(), 2u);
  EXPECT_EQ(test::snapshot(target.store()), test::snapshot(source.store()));
  Bf16Trainer strict(StudentMlp(16, 32, 4), {.on_config_change = ConfigChange::refuse});
  expect_refused(strict, dir / "v2.safetensors",
                 "records no configuration, and this trainer refuses one it cannot compare");
}

// A run resumed under a scaler configuration that holds less (a lower hysteresis, a shorter growth
// interval, a lower max_scale) brings the scaler's state within it, and what it saves then loads.
// Found by the checkpoint fuzz target: the state was kept, and the trainer's next checkpoint was
// refused by its own load (hysteresis_left above the hysteresis recorded beside it).
TEST(Checkpoint, AResumeUnderANarrowerScalerConfigurationSavesACheckpointThatLoads) {
  TempDir dir;
  using Tr = Trainer<StudentMlp, Precision<fp16, fp32_master>, AdamW<>, Host>;
  Tr before(StudentMlp(16, 32, 4),
            {.scaler = {.init_scale = 4096.0f, .growth_interval = 50, .hysteresis = 4, .max_scale = 65536.0f}});
  const auto data = batches(3, 8);
  for (int s = 0; s < 8; ++s) before.step(data.begin() + s);  // growth count 8, hysteresis left 4
  before.save(dir / "wide.safetensors");
  std::vector<std::string> lines;
  Tr after(StudentMlp(16, 32, 4),
           {.scaler = {.init_scale = 1024.0f, .growth_interval = 5, .hysteresis = 1, .max_scale = 2048.0f},
            .load_log = [&](const std::string& l) { lines.push_back(l); }});
  after.load(dir / "wide.safetensors");
  const LossScaleState s = after.optimizer().scale_state();
  EXPECT_EQ(s.hysteresis_left, 1);
  EXPECT_EQ(s.growth_tracker, 4);  // the next finite step grows, as it would have
  EXPECT_EQ(s.scale, 2048.0f);
  ASSERT_FALSE(lines.empty());
  EXPECT_MENTIONS(lines.back(), "loss scaler's state brought within this trainer's scaler configuration");
  after.save(dir / "narrow.safetensors");
  Tr again(StudentMlp(16, 32, 4), after.config());
  EXPECT_NO_THROW(again.load(dir / "narrow.safetensors"));
}

TEST(Checkpoint, RecordsTheRunsConfiguration) {
  TempDir dir;
  using Tr = Trainer<StudentMlp, Precision<fp16, fp32_master>, Accumulate<2>, SGD<>, Host>;
  Tr trainer(StudentMlp(16, 32, 4), {.optimizer = {.momentum = 0.9f, .nesterov = true},
                                     .scaler = {.growth_interval = 100},
                                     .schedule = LrSchedule::warmup_linear(0.1f, 10, 1000, 1e-3f),
                                     .max_grad_norm = 2.5f,
                                     .param_rounding = Rounding::stochastic,
                                     .micro_batches = 3});
  trainer.save(dir / "c.safetensors");
  const auto m = SafetensorsFile::open(dir / "c.safetensors").metadata();
  const std::map<std::string, std::string> expected = {
      {"max_grad_norm", "2.5"},          {"micro_batches", "3"},
      {"optimizer.dampening", "0"},      {"optimizer.lr", "0.001"},
      {"optimizer.momentum", "0.9"},     {"optimizer.nesterov", "true"},
      {"optimizer.weight_decay", "0"},   {"param_rounding", "stochastic"},
      {"scaler.backoff_factor", "0.5"},  {"scaler.growth_factor", "2"},
      {"scaler.growth_interval", "100"}, {"scaler.hysteresis", "1"},
      {"scaler.init_scale", "65536"},    {"scaler.max_scale", "16777216"},
      {"scaler.min_scale", "1"},         {"schedule.decay", "linear"},
      {"schedule.min_lr", "0.001"},      {"schedule.peak_lr", "0.1"},
      {"schedule.total_steps", "1000"},  {"schedule.warmup_steps", "10"},
  };
  std::map<std::string, std::string> recorded;
  for (const auto& [key, value] : m) {
    if (key.starts_with("alloy.config.")) recorded[key.substr(13)] = value;
  }
  EXPECT_EQ(recorded, expected);
  EXPECT_EQ(trainer.settings(), expected);
}

// A resume under a changed configuration is allowed, never silent: each changed setting, with
// both values, in the report and in the log (standard error unless Config::load_log is set).
TEST(Checkpoint, SaysWhichSettingsChangedOnLoad) {
  TempDir dir;
  const auto data = batches(19, 4);
  Bf16Trainer source(StudentMlp(16, 32, 4), {.optimizer = {.beta2 = 0.95f},
                                             .schedule = LrSchedule::warmup_cosine(2e-3f, 3, 40),
                                             .max_grad_norm = 1.0f,
                                             .seed = 19});
  source.step(data.begin());
  source.save(dir / "c.safetensors");
  std::vector<std::string> lines;
  Bf16Trainer target(StudentMlp(16, 32, 4), {.schedule = LrSchedule::warmup_cosine(2e-3f, 3, 100),
                                             .max_grad_norm = 0.5f,
                                             .load_log = [&](const std::string& l) { lines.push_back(l); }});
  const LoadReport report = target.load(dir / "c.safetensors");
  EXPECT_TRUE(report.config_compared);
  ASSERT_EQ(report.config_differences.size(), 3u);
  const std::vector<std::array<std::string, 3>> expected = {
      {"max_grad_norm", "1", "0.5"}, {"optimizer.beta2", "0.95", "0.999"}, {"schedule.total_steps", "40", "100"}};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(report.config_differences[i].name, expected[i][0]);
    EXPECT_EQ(report.config_differences[i].saved, expected[i][1]);
    EXPECT_EQ(report.config_differences[i].loading, expected[i][2]);
  }
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_MENTIONS(lines[1],
                  "c.safetensors': resuming under a changed configuration: optimizer.beta2: saved 0.95, "
                  "this trainer 0.999");
  EXPECT_EQ(test::snapshot(target.store()), test::snapshot(source.store()));  // loaded all the same
  EXPECT_EQ(target.config().max_grad_norm, 0.5f);                             // with its own configuration

  // Without a load_log, the lines go to standard error.
  Bf16Trainer plain(StudentMlp(16, 32, 4), {.max_grad_norm = 1.0f});
  ::testing::internal::CaptureStderr();
  plain.load(dir / "c.safetensors");
  const std::string captured = ::testing::internal::GetCapturedStderr();
  EXPECT_MENTIONS(captured, "optimizer.beta2: saved 0.95, this trainer 0.999\n");
  EXPECT_MENTIONS(captured, "schedule.decay: saved cosine, this trainer constant\n");

  // The same configuration: nothing to say.
  lines.clear();
  Bf16Trainer same(StudentMlp(16, 32, 4), {.optimizer = {.beta2 = 0.95f},
                                           .schedule = LrSchedule::warmup_cosine(2e-3f, 3, 40),
                                           .max_grad_norm = 1.0f,
                                           .load_log = [&](const std::string& l) { lines.push_back(l); }});
  EXPECT_TRUE(same.load(dir / "c.safetensors").config_differences.empty());
  EXPECT_TRUE(lines.empty());
}

TEST(Checkpoint, RefusesAChangedConfigurationWhenAskedAndChangesNothing) {
  TempDir dir;
  const auto data = batches(23, 4);
  Bf16Trainer source(StudentMlp(16, 32, 4), {.optimizer = {.weight_decay = 0.1f}, .seed = 23});
  source.step(data.begin());
  source.save(dir / "c.safetensors");
  std::vector<std::string> lines;
  Bf16Trainer strict(StudentMlp(16, 32, 4), {.seed = 24,
                                             .on_config_change = ConfigChange::refuse,
                                             .load_log = [&](const std::string& l) { lines.push_back(l); }});
  strict.step(data.begin() + 1);
  expect_refused(strict, dir / "c.safetensors", "optimizer.weight_decay: saved 0.1, this trainer 0.01");
  expect_refused(strict, dir / "c.safetensors", "refuses a changed one (Config::on_config_change = refuse)");
  EXPECT_TRUE(lines.empty());
  Bf16Trainer agreeing(StudentMlp(16, 32, 4),
                       {.optimizer = {.weight_decay = 0.1f}, .on_config_change = ConfigChange::refuse});
  agreeing.load(dir / "c.safetensors");
  EXPECT_EQ(agreeing.steps(), 1u);
}

}  // namespace
