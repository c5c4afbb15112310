// export_weights / import_weights on the Host backend, and moving a Trainer.
#include "../../examples/custom_model/teacher_mlp.hpp"
#include "../optim/reference.hpp"
#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"
#include "odd_model.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <random>

namespace {

using namespace alloy;
using test::OddModel;
using test::TempDir;

using Bf16Master = Trainer<OddModel, Precision<bf16, fp32_master>, AdamW<>, Host>;
using Fp16Master = Trainer<OddModel, Precision<fp16, fp32_master>, Accumulate<2>, AdamW<State<q8>>, Host>;
using Fp32Plain = Trainer<OddModel, Precision<fp32>, SGD<>, Host>;
using Bf16Plain = Trainer<OddModel, Precision<bf16>, Lion<State<bf16>>, Host>;
using Fp16Plain = Trainer<OddModel, Precision<fp16>, Adafactor<>, Host>;

template <class Tr>
typename Tr::Config config(std::uint64_t seed) {
  typename Tr::Config c;
  c.schedule = LrSchedule::constant(1e-2f);
  c.max_grad_norm = 1.0f;
  c.seed = seed;
  if constexpr (!Tr::precision::has_master && !std::is_same_v<typename Tr::compute_type, fp32>) {
    c.param_rounding = Rounding::stochastic;
  }
  return c;
}

template <class Tr>
void train(Tr& trainer, std::uint64_t seed, int steps) {
  const OddModel shapes(trainer.model());
  std::mt19937_64 rng(seed);
  for (int s = 0; s < steps; ++s) trainer.step([&] { return shapes.batch(rng); });
}

// Each parameter's fp32 values: the master, or the compute copy widened.
template <class Tr>
std::vector<std::vector<float>> fp32_values(Tr& trainer) {
  auto& store = trainer.store();
  std::vector<float> flat;
  if constexpr (Tr::precision::has_master) {
    flat = to_host(store.master_arena());
  } else {
    for (const auto v : to_host(store.params_arena())) flat.push_back(to_float(v));
  }
  std::vector<std::vector<float>> out;
  for (std::size_t t = 0; t < store.registry().size(); ++t) {
    const auto& place = store.layout()[t];
    out.emplace_back(flat.begin() + place.offset, flat.begin() + place.offset + place.numel);
  }
  return out;
}

template <class Tr>
std::size_t numel_of(Tr& trainer, const std::string& name) {
  return trainer.store().layout()[trainer.store().registry().handle(name).index].numel;
}

template <class T>
std::vector<std::byte> bytes_in(const std::vector<float>& values) {
  std::vector<std::byte> out(values.size() * sizeof(T));
  for (std::size_t i = 0; i < values.size(); ++i) {
    const T v = round_nearest<T>(values[i]);
    std::memcpy(out.data() + i * sizeof(T), &v, sizeof(T));
  }
  return out;
}

std::vector<std::byte> tensor_bytes(const SafetensorsFile& f, const std::string& name) {
  std::vector<std::byte> out(f.tensor(name).size);
  f.read(name, out);
  return out;
}

template <class T, backend B>
std::vector<std::uint8_t> raw_bytes(const Buffer<T, B>& buffer) {
  const auto v = to_host(buffer);
  const auto* p = reinterpret_cast<const std::uint8_t*>(v.data());
  return {p, p + v.size() * sizeof(T)};
}

// The parameters' compute copies and masters, flat, as bytes.
template <class Tr>
std::vector<std::uint8_t> weight_bytes(Tr& trainer) {
  auto add = [](std::vector<std::uint8_t>& out, const auto& buffer) {
    const auto v = to_host(buffer);
    const auto* p = reinterpret_cast<const std::uint8_t*>(v.data());
    out.insert(out.end(), p, p + v.size() * sizeof(v[0]));
  };
  std::vector<std::uint8_t> out;
  add(out, trainer.store().params_arena());
  add(out, trainer.store().master_arena());
  return out;
}

template <class Tr>
void round_trip(std::uint64_t seed) {
  SCOPED_TRACE(Tr::signature());
  TempDir dir;
  Tr source(OddModel(seed), config<Tr>(seed));
  train(source, seed, 3);
  const auto values = fp32_values(source);
  const auto& specs = source.store().registry().specs();
  for (const WeightsDtype dtype : {WeightsDtype::fp32, WeightsDtype::bf16, WeightsDtype::fp16}) {
    SCOPED_TRACE(std::string(weights_dtype_name(dtype)));
    const auto path = dir / (std::string(weights_dtype_name(dtype)) + ".safetensors");
    source.export_weights(path, dtype);

    // The file: the declared tensors, in declared order, with their shapes, in the dtype asked.
    const SafetensorsFile file = SafetensorsFile::open(path);
    ASSERT_EQ(file.tensors().size(), specs.size());
    EXPECT_EQ(file.metadata().at("format"), "pt");
    for (std::size_t t = 0; t < specs.size(); ++t) {
      const StoredTensor& stored = file.tensors()[t];  // by offset
      EXPECT_EQ(stored.name, specs[t].name);
      EXPECT_EQ(stored.shape, specs[t].shape);
      EXPECT_EQ(stored.dtype, safetensors_dtype(dtype));
      const auto expected = dtype == WeightsDtype::fp32   ? bytes_in<float>(values[t])
                            : dtype == WeightsDtype::bf16 ? bytes_in<bf16>(values[t])
                                                          : bytes_in<fp16>(values[t]);
      EXPECT_TRUE(tensor_bytes(file, specs[t].name) == expected) << specs[t].name;
    }

    // Into a trainer of another initialization: the file's values as master, their rounding as
    // the compute copy; the optimizer state and counters untouched.
    Tr target(OddModel(seed), config<Tr>(seed + 1));
    train(target, seed + 2, 2);
    const auto before = test::snapshot(target.store());
    const auto state_before = raw_bytes(target.store().state_arena(0));
    const auto steps = target.steps();
    const auto applied = target.optimizer().steps();
    target.import_weights(path);
    EXPECT_NE(test::snapshot(target.store()), before);
    EXPECT_EQ(raw_bytes(target.store().state_arena(0)), state_before);
    EXPECT_EQ(target.steps(), steps);
    EXPECT_EQ(target.optimizer().steps(), applied);
    const auto imported = fp32_values(target);
    using Param = typename Tr::store_type::param_type;
    const auto params = to_host(target.store().params_arena());
    for (std::size_t t = 0; t < specs.size(); ++t) {
      const auto& place = target.store().layout()[t];
      for (std::size_t i = 0; i < place.numel; ++i) {
        const float in_file = dtype == WeightsDtype::fp32   ? values[t][i]
                              : dtype == WeightsDtype::bf16 ? to_float(round_nearest<bf16>(values[t][i]))
                                                            : to_float(round_nearest<fp16>(values[t][i]));
        if constexpr (Tr::precision::has_master) {
          ASSERT_EQ(imported[t][i], in_file) << specs[t].name << " " << i;
        }
        const Param rounded = round_nearest<Param>(in_file);
        ASSERT_EQ(std::memcmp(&params[place.offset + i], &rounded, sizeof(Param)), 0) << specs[t].name << " " << i;
      }
    }
    if (dtype == WeightsDtype::fp32) {
      EXPECT_EQ(weight_bytes(target), weight_bytes(source)) << "an fp32 round trip is exact";
    }
    // Training goes on from the imported weights.
    train(target, seed + 3, 1);
    EXPECT_EQ(target.steps(), steps + 1);
  }
}

TEST(Weights, ExportImportRoundTripInEachDtype) {
  ALLOY_SEEDED(seed);
  round_trip<Bf16Master>(seed);
  round_trip<Fp16Master>(seed);
  round_trip<Fp32Plain>(seed);
  round_trip<Bf16Plain>(seed);
  round_trip<Fp16Plain>(seed);
}

// Importing what a trainer just exported in fp32 changes none of its bytes.
TEST(Weights, ImportingItsOwnFp32ExportChangesNothing) {
  ALLOY_SEEDED(seed);
  TempDir dir;
  Fp16Master trainer(OddModel(seed), config<Fp16Master>(seed));
  train(trainer, seed, 4);
  const auto before = test::snapshot(trainer.store());
  trainer.export_weights(dir / "w.safetensors");
  trainer.import_weights(dir / "w.safetensors");
  EXPECT_EQ(test::snapshot(trainer.store()), before);
}

// A safetensors file put together here byte by byte, as another program would write it: tensors
// in another order than declared, in another dtype than the trainer's, with torch's metadata.
struct HandTensor {
  std::string name, dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;
};

void write_by_hand(const std::filesystem::path& path, const std::vector<HandTensor>& tensors) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  std::size_t offset = 0;
  for (const auto& t : tensors) {
    header += ",\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":[";
    for (std::size_t d = 0; d < t.shape.size(); ++d) {
      if (d) header += ',';
      header += std::to_string(t.shape[d]);
    }
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + t.bytes.size()) + "]}";
    offset += t.bytes.size();
  }
  header += "}";
  std::ofstream out(path, std::ios::binary);
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((header.size() >> (8 * i)) & 0xFF));
  out << header;
  for (const auto& t : tensors)
    out.write(reinterpret_cast<const char*>(t.bytes.data()), std::streamsize(t.bytes.size()));
}

// Values k / 1024 with |k| <= 2048: exact in fp16 and in fp32, not all exact in bf16.
std::vector<float> fp16_exact_values(std::mt19937_64& rng, std::size_t n) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(static_cast<int>(rng() % 4097) - 2048) / 1024.0f;
  return v;
}

std::vector<std::byte> fp16_bytes(const std::vector<float>& values) {
  std::vector<std::byte> out;
  for (const float x : values) {
    const std::uint16_t bits = fp16(x).bits();
    out.push_back(static_cast<std::byte>(bits & 0xFF));
    out.push_back(static_cast<std::byte>(bits >> 8));
  }
  return out;
}

TEST(Weights, ImportsAFileWrittenElsewhereInAnotherDtype) {
  ALLOY_SEEDED(seed);
  TempDir dir;
  const OddModel model(seed);
  std::mt19937_64 rng(seed);
  std::vector<HandTensor> tensors;
  std::map<std::string, std::vector<float>> values;
  for (const auto& p : model.params()) {
    values[p.name] = fp16_exact_values(rng, static_cast<std::size_t>(p.numel()));
    tensors.push_back({p.name, "F16", p.shape, fp16_bytes(values[p.name])});
  }
  std::reverse(tensors.begin(), tensors.end());
  write_by_hand(dir / "torch.safetensors", tensors);

  Bf16Master trainer(OddModel(seed), config<Bf16Master>(seed));
  trainer.import_weights(dir / "torch.safetensors");
  for (const auto& p : model.params()) {
    const auto master = trainer.store().master(p.name);
    const auto param = trainer.store().param(p.name);
    const auto& v = values[p.name];
    for (std::size_t i = 0; i < v.size(); ++i) {
      ASSERT_EQ(master[i], v[i]) << p.name << " " << i;
      ASSERT_EQ(param[i].bits(), bf16(v[i]).bits()) << p.name << " " << i;  // the rounding of the master
    }
  }
  // Nothing of the padding was written: the arenas' padding stays zero.
  const auto master = to_host(trainer.store().master_arena());
  const auto& layout = trainer.store().layout();
  for (std::size_t t = 0; t < layout.tensors(); ++t) {
    const std::size_t end = t + 1 < layout.tensors() ? layout[t + 1].offset : layout.padded_numel();
    for (std::size_t i = layout[t].offset + layout[t].numel; i < end; ++i) ASSERT_EQ(master[i], 0.0f) << i;
  }

  // The same values in BF16 (the fp16 values rounded by hand: round to nearest even on the bits),
  // into an fp32 trainer without a master copy.
  std::vector<HandTensor> brain;
  for (const auto& p : model.params()) {
    std::vector<std::byte> bytes;
    for (const float x : values[p.name]) {
      std::uint32_t u;
      std::memcpy(&u, &x, 4);
      const std::uint16_t bits = static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
      bytes.push_back(static_cast<std::byte>(bits & 0xFF));
      bytes.push_back(static_cast<std::byte>(bits >> 8));
    }
    brain.push_back({p.name, "BF16", p.shape, bytes});
  }
  write_by_hand(dir / "bf16.safetensors", brain);
  Fp32Plain full(OddModel(seed), config<Fp32Plain>(seed));
  full.import_weights(dir / "bf16.safetensors");
  for (const auto& p : model.params()) {
    const auto param = full.store().param(p.name);
    for (std::size_t i = 0; i < values[p.name].size(); ++i) {
      ASSERT_EQ(param[i], to_float(bf16(values[p.name][i]))) << p.name << " " << i;
    }
  }
}

// Every tensor of a weights file, to rewrite with one change.
std::vector<HandTensor> read_all(const std::filesystem::path& path) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  std::vector<HandTensor> out;
  for (const auto& t : f.tensors()) {
    out.push_back({t.name, std::string(safetensors_name(t.dtype)), t.shape, tensor_bytes(f, t.name)});
  }
  return out;
}

// A refused import names `mentions` and the file, and leaves every byte and counter as it was.
template <class Tr>
void expect_refused(Tr& trainer, const std::filesystem::path& path, const std::vector<std::string>& mentions) {
  const auto before = test::snapshot(trainer.store());
  const auto steps = trainer.steps();
  const auto scale = trainer.loss_scale();
  const std::string message = test::message_of([&] { trainer.import_weights(path); });
  EXPECT_MENTIONS(message, path.string());
  for (const auto& m : mentions) EXPECT_MENTIONS(message, m);
  EXPECT_EQ(test::snapshot(trainer.store()), before);
  EXPECT_EQ(trainer.steps(), steps);
  EXPECT_EQ(trainer.loss_scale(), scale);
}

TEST(Weights, RefusesMissingExtraMisshapedAndBadValuesChangingNothing) {
  ALLOY_SEEDED(seed);
  TempDir dir;
  Bf16Master source(OddModel(seed), config<Bf16Master>(seed));
  train(source, seed, 2);
  const auto good = dir / "good.safetensors";
  source.export_weights(good);
  Bf16Master target(OddModel(seed), config<Bf16Master>(seed + 1));
  train(target, seed + 1, 2);
  std::mt19937_64 rng(seed);
  // The last declared tensor is the one spoiled, so an import that wrote as it went would
  // already have changed the others.
  const std::string last = target.store().registry().specs().back().name;
  auto variant = [&](const std::string& file, auto&& change) {
    auto tensors = read_all(good);
    change(tensors);
    write_by_hand(dir / file, tensors);
    return dir / file;
  };
  auto find = [](std::vector<HandTensor>& ts, const std::string& name) -> HandTensor& {
    return *std::find_if(ts.begin(), ts.end(), [&](const HandTensor& t) { return t.name == name; });
  };

  expect_refused(target, variant("missing.safetensors", [&](auto& ts) { ts.pop_back(); }),
                 {"missing", "'" + last + "'"});
  expect_refused(target,
                 variant("extra.safetensors",
                         [&](auto& ts) {
                           ts.push_back({"head.weight", "F32", {3}, std::vector<std::byte>(12)});
                         }),
                 {"not parameters of this model", "'head.weight'"});
  expect_refused(target, variant("renamed.safetensors", [&](auto& ts) { ts.front().name = "layer.weight_"; }),
                 {"missing 'layer.weight'", "'layer.weight_'"});
  expect_refused(target,
                 variant("misshaped.safetensors",
                         [&](auto& ts) {
                           auto& t = find(ts, "layer.weight");  // transposed, or flattened if square
                           if (t.shape[0] != t.shape[1]) {
                             std::swap(t.shape[0], t.shape[1]);
                           } else {
                             t.shape = {t.shape[0] * t.shape[1]};
                           }
                         }),
                 {"tensor 'layer.weight' has shape"});
  expect_refused(target, variant("int.safetensors", [&](auto& ts) { ts.back().dtype = "I32"; }),
                 {"tensor '" + last + "' is I32, not F32, BF16 or F16"});
  const std::size_t at = rng() % numel_of(target, last);
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
    expect_refused(
        target,
        variant("nonfinite.safetensors", [&](auto& ts) { std::memcpy(ts.back().bytes.data() + 4 * at, &bad, 4); }),
        {"tensor '" + last + "' holds a non-finite value", "at element " + std::to_string(at)});
  }
  // Beyond bf16's range: finite in fp32, infinite as the compute copy.
  expect_refused(target,
                 variant("huge.safetensors",
                         [&](auto& ts) {
                           const float huge = 3.4e38f;
                           std::memcpy(ts.back().bytes.data() + 4 * at, &huge, 4);
                         }),
                 {"tensor '" + last + "' element " + std::to_string(at), "beyond the range", "bf16"});
  // A full checkpoint is not a weights file.
  source.save(dir / "checkpoint.safetensors");
  expect_refused(target, dir / "checkpoint.safetensors", {"'alloy/master/layer.weight'", "use load()"});
  // A damaged file.
  std::filesystem::copy_file(good, dir / "truncated.safetensors");
  std::filesystem::resize_file(dir / "truncated.safetensors", std::filesystem::file_size(good) - 7);
  expect_refused(target, dir / "truncated.safetensors", {});
  expect_refused(target, dir / "absent.safetensors", {"cannot open"});

  // After all that, the good file imports.
  target.import_weights(good);
  EXPECT_EQ(weight_bytes(target), weight_bytes(source));
}

TEST(Weights, ExportRefusesValuesTheFileCannotHoldAndKeepsTheOldFile) {
  ALLOY_SEEDED(seed);
  TempDir dir;
  Bf16Master trainer(OddModel(seed), config<Bf16Master>(seed));
  const auto path = dir / "w.safetensors";
  trainer.export_weights(path, WeightsDtype::fp16);
  const auto old = tensor_bytes(SafetensorsFile::open(path), "vector");
  std::mt19937_64 rng(seed);
  const std::size_t at = rng() % numel_of(trainer, "vector");
  trainer.store().master("vector")[at] = 70000.0f;  // finite, past fp16's 65504
  EXPECT_MENTIONS(test::message_of([&] { trainer.export_weights(path, WeightsDtype::fp16); }),
                  "parameter 'vector' element " + std::to_string(at) + " is 70000, beyond the range of fp16");
  trainer.export_weights(dir / "bf16.safetensors", WeightsDtype::bf16);  // bf16 holds it
  trainer.store().master("vector")[at] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_MENTIONS(test::message_of([&] { trainer.export_weights(path, WeightsDtype::fp32); }),
                  "parameter 'vector' element " + std::to_string(at) + " is nan");
  EXPECT_EQ(tensor_bytes(SafetensorsFile::open(path), "vector"), old) << "the old file was replaced";
  std::size_t files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) files += e.is_regular_file();
  EXPECT_EQ(files, 2u) << "a temporary file was left behind";
}

TEST(Weights, DtypeNames) {
  EXPECT_EQ(weights_dtype_named("bf16"), WeightsDtype::bf16);
  EXPECT_EQ(weights_dtype_named("fp16"), WeightsDtype::fp16);
  EXPECT_EQ(weights_dtype_named("fp32"), WeightsDtype::fp32);
  EXPECT_FALSE(weights_dtype_named("f32").has_value());
  EXPECT_EQ(safetensors_dtype(WeightsDtype::fp16), SafetensorsDtype::f16);
  EXPECT_EQ(weights_dtype_name(WeightsDtype::bf16), "bf16");
}

// ---- Moving a trainer ---------------------------------------------------------------------

using MovedTrainer = Trainer<teacher::StudentMlp, Precision<bf16, fp32_master>, Accumulate<2>, AdamW<State<q8>>, Host>;
static_assert(std::is_move_constructible_v<MovedTrainer> && std::is_move_assignable_v<MovedTrainer>);
static_assert(!std::is_copy_constructible_v<MovedTrainer> && !std::is_copy_assignable_v<MovedTrainer>);

// 2 steps, move-construct, 2 steps, move-assign over a trainer with a history of its own, 2 steps:
// the bytes, reports and memory accounting of 6 steps straight.
TEST(Trainer, MovedTrainerTrainsOnBitExactly) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 dims(seed);
  const int in = 5 + int(dims() % 20), hid = 9 + int(dims() % 40), out = 1 + int(dims() % 7);
  const teacher::Teacher t(in, hid, out, seed);
  std::mt19937_64 rng(seed);
  std::vector<teacher::Batch> data;
  for (int i = 0; i < 12; ++i) data.push_back(t.batch(7 + int(rng() % 30), rng));
  const MovedTrainer::Config c{.schedule = LrSchedule::warmup_cosine(3e-3f, 2, 6), .max_grad_norm = 1.0f, .seed = seed};

  MovedTrainer straight(teacher::StudentMlp(in, hid, out), c);
  std::vector<StepReport> expected;
  auto it = data.begin();
  for (int s = 0; s < 6; ++s) expected.push_back(straight.step(it));

  auto it2 = data.begin();
  std::optional<MovedTrainer> first(std::in_place, teacher::StudentMlp(in, hid, out), c);
  EXPECT_EQ(first->step(it2).loss, expected[0].loss);
  EXPECT_EQ(first->step(it2).loss, expected[1].loss);
  MovedTrainer second(std::move(*first));
  first.reset();  // the moved-from trainer goes; the moved-to one keeps its memory
  EXPECT_EQ(second.step(it2).loss, expected[2].loss);
  EXPECT_EQ(second.step(it2).loss, expected[3].loss);
  MovedTrainer third(teacher::StudentMlp(in, hid, out), {.seed = seed + 1});
  third.step(data.begin());
  third = std::move(second);
  EXPECT_EQ(third.steps(), 4u);
  const auto r4 = third.step(it2);
  const auto r5 = third.step(it2);
  EXPECT_EQ(r4.loss, expected[4].loss);
  EXPECT_EQ(r5.loss, expected[5].loss);
  EXPECT_EQ(r5.grad_norm, expected[5].grad_norm);
  EXPECT_EQ(r5.applied_steps, expected[5].applied_steps);
  EXPECT_EQ(test::snapshot(third.store()), test::snapshot(straight.store()));
  // The tracker moved with the memory it counts: the old third's arenas were released from the
  // old tracker, not from this one.
  EXPECT_EQ(third.memory().backend.current_bytes, straight.memory().backend.current_bytes);
  EXPECT_EQ(third.memory().arenas.total(), straight.memory().arenas.total());
  EXPECT_EQ(third.memory().activations_peak, straight.memory().activations_peak);
}

// Trainers in a growing vector move on every reallocation and keep training.
TEST(Trainer, TrainersLiveInAVector) {
  ALLOY_SEEDED(seed);
  using Tr = Trainer<teacher::StudentMlp, Precision<fp32>, SGD<>, Host>;
  const teacher::Teacher t(11, 13, 3, seed);
  std::mt19937_64 rng(seed);
  const auto b = t.batch(17, rng);
  std::vector<Tr> trainers;
  const Tr::Config config{.schedule = LrSchedule::constant(1e-2f), .seed = seed};
  Tr alone(teacher::StudentMlp(11, 13, 3), config);
  const float loss = alone.step([&] { return b; }).loss;
  for (int i = 0; i < 9; ++i) {
    trainers.emplace_back(teacher::StudentMlp(11, 13, 3), config);
    EXPECT_EQ(trainers.back().step([&] { return b; }).loss, loss);
  }
  for (auto& tr : trainers) EXPECT_LT(tr.step([&] { return b; }).loss, loss);
}

}  // namespace

namespace {

// Exported files carry each tensor's checksum; import checks it and names the tensor.
TEST(Weights, ExportsChecksumsThatImportChecks) {
  ALLOY_SEEDED(seed);
  TempDir dir;
  Bf16Master source(OddModel(seed), config<Bf16Master>(seed));
  train(source, seed, 2);
  source.export_weights(dir / "w.safetensors", WeightsDtype::bf16);
  const SafetensorsFile file = SafetensorsFile::open(dir / "w.safetensors");
  EXPECT_EQ(file.metadata().at("format"), "pt");
  for (const auto& t : file.tensors()) EXPECT_TRUE(t.crc32c.has_value()) << t.name;
  const StoredTensor& victim = file.tensors().back();
  auto bytes = test::read_all(dir / "w.safetensors");
  bytes[file.data_offset() + victim.offset + victim.size - 1] ^= std::byte{0x01};
  std::ofstream(dir / "flipped.safetensors", std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  Bf16Master target(OddModel(seed), config<Bf16Master>(seed + 1));
  expect_refused(target, dir / "flipped.safetensors", {"tensor '" + victim.name + "' fails its checksum"});
  target.import_weights(dir / "w.safetensors");
}

}  // namespace
