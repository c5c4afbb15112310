// Damaged and foreign checkpoints, one table: each is refused with an alloy::error naming the
// problem, and leaves the trainer's every byte and counter as it was.
#include "../../examples/custom_model/teacher_mlp.hpp"
#include "../optim/reference.hpp"
#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"

#include <alloy/alloy.hpp>

#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace alloy;
namespace fs = std::filesystem;
using teacher::Batch;
using teacher::StudentMlp;

using Tr = Trainer<StudentMlp, Precision<bf16, fp32_master>, AdamW<>, Host>;
using Q8 = Trainer<StudentMlp, Precision<bf16, fp32_master>, AdamW<State<q8>>, Host>;
using Fp16 = Trainer<StudentMlp, Precision<fp16, fp32_master>, AdamW<>, Host>;  // a dynamic loss scale

// Fixed seeds: the expected messages name elements and byte counts of these files.
constexpr std::uint64_t source_seed = 31, target_seed = 32;

std::vector<Batch> batches(int count) {
  const teacher::Teacher t(16, 32, 4, source_seed);
  std::mt19937_64 rng(source_seed);
  std::vector<Batch> out;
  for (int i = 0; i < count; ++i) out.push_back(t.batch(24, rng));
  return out;
}

// A trainer as the good checkpoint's was (two steps), for files saved from a poisoned copy.
template <class T = Tr>
T trained(StudentMlp model = StudentMlp(16, 32, 4)) {
  T t(std::move(model), {.seed = source_seed, .load_log = [](const std::string&) {}});
  const auto data = batches(2);
  for (const auto& b : data) t.step(std::span(&b, 1));
  return t;
}

// A good checkpoint, its bytes and its header.
struct Good {
  fs::path path;
  std::vector<std::byte> bytes;
  std::string header;  // the JSON, padding included
  std::uint64_t data_offset = 0;
  std::map<std::string, StoredTensor> tensors;

  explicit Good(fs::path p) : path(std::move(p)), bytes(test::read_all(path)) {
    const auto file = SafetensorsFile::open(path);
    data_offset = file.data_offset();
    header.assign(reinterpret_cast<const char*>(bytes.data()) + 8, data_offset - 8);
    for (const auto& t : file.tensors()) tensors[t.name] = t;
  }

  // Where byte `at` of tensor `name`'s data lies in the file.
  std::size_t byte_of(const std::string& name, std::size_t at) const {
    return data_offset + tensors.at(name).offset + at;
  }

  std::string offsets_text(const std::string& name) const {
    const auto& t = tensors.at(name);
    return "\"data_offsets\":[" + std::to_string(t.offset) + "," + std::to_string(t.offset + t.size) + "]";
  }
};

void write_bytes(const fs::path& to, const std::vector<std::byte>& bytes) {
  std::ofstream(to, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

std::vector<std::byte> length_field(std::uint64_t n) {
  std::vector<std::byte> out(8);
  for (int i = 0; i < 8; ++i) out[i] = std::byte((n >> (8 * i)) & 0xFF);
  return out;
}

// The good file with its header replaced by `header` (its length field to match).
void with_header(const Good& g, const fs::path& to, const std::string& header) {
  auto bytes = length_field(header.size());
  const auto* h = reinterpret_cast<const std::byte*>(header.data());
  bytes.insert(bytes.end(), h, h + header.size());
  bytes.insert(bytes.end(), g.bytes.begin() + static_cast<std::ptrdiff_t>(g.data_offset), g.bytes.end());
  write_bytes(to, bytes);
}

// The good file's header with the first `from` replaced by `to_text`.
void edit_header(const Good& g, const fs::path& to, const std::string& from, const std::string& to_text) {
  std::string h = g.header;
  const auto at = h.find(from);
  if (at == std::string::npos) throw std::logic_error("the header has no " + from);
  h.replace(at, from.size(), to_text);
  with_header(g, to, h);
}

void truncated(const Good& g, const fs::path& to, std::size_t length) {
  write_bytes(to, std::vector<std::byte>(g.bytes.begin(), g.bytes.begin() + static_cast<std::ptrdiff_t>(length)));
}

void with_length(const Good& g, const fs::path& to, std::uint64_t length) {
  auto bytes = g.bytes;
  const auto field = length_field(length);
  std::copy(field.begin(), field.end(), bytes.begin());
  write_bytes(to, bytes);
}

void flipped(const Good& g, const fs::path& to, std::size_t at, int bit) {
  auto bytes = g.bytes;
  bytes[at] ^= std::byte(1 << bit);
  write_bytes(to, bytes);
}

using Tensors = std::map<std::string, std::pair<StoredTensor, std::vector<std::byte>>>;
using Metadata = std::map<std::string, std::string>;

// The good file rewritten through write_safetensors, with fresh checksums, after `edit`: a file
// whose damage only the checkpoint's own checks can find.
void rewritten(const Good& g, const fs::path& to, const std::function<void(Tensors&, Metadata&)>& edit) {
  const auto file = SafetensorsFile::open(g.path);
  Tensors tensors;
  for (const auto& t : file.tensors()) {
    std::vector<std::byte> data(t.size);
    file.read(t.name, std::span(data));
    tensors[t.name] = {t, std::move(data)};
  }
  Metadata metadata = file.metadata();
  std::erase_if(metadata, [](const auto& e) { return e.first.starts_with("crc32c:"); });
  edit(tensors, metadata);
  std::vector<TensorToWrite> out;
  for (const auto& [name, t] : tensors) {
    out.push_back({name, t.first.dtype, t.first.shape, std::span<const std::byte>(t.second)});
  }
  // Wider dtypes first, as save() writes them.
  std::stable_sort(out.begin(), out.end(),
                   [](const auto& a, const auto& b) { return element_size(a.dtype) > element_size(b.dtype); });
  SafetensorsWriteOptions options;
  options.checksums = true;
  write_safetensors(to, out, metadata, options);
}

void with_metadata(const Good& g, const fs::path& to, const std::string& key, const std::string& value) {
  rewritten(g, to, [&](Tensors&, Metadata& m) { m[key] = value; });
}

// A checkpoint of a trained copy of the source after `poison`.
template <class T = Tr>
void saved_after(const fs::path& to, const std::type_identity_t<std::function<void(T&)>>& poison) {
  T t = trained<T>();
  poison(t);
  t.save(to);
}

// Which trainer a case's file is for (and made from).
enum class For : std::uint8_t { adamw, q8, fp16 };

struct BadFile {
  const char* name;
  std::function<void(const Good&, const fs::path&)> make;
  const char* says;
  For target = For::adamw;
};

float& master(Tr& t, const char* name, std::size_t i) { return t.store().master(name)[i]; }

std::vector<BadFile> bad_files() {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  return {
      // Truncations and the length field.
      {"empty file", [](const Good& g, const fs::path& p) { truncated(g, p, 0); },
       "the file is 0 bytes, too short for the 8-byte header length"},
      {"truncated in the length field", [](const Good& g, const fs::path& p) { truncated(g, p, 5); },
       "the file is 5 bytes, too short"},
      {"truncated in the header", [](const Good& g, const fs::path& p) { truncated(g, p, 8 + g.header.size() / 2); },
       "runs past the end of the file"},
      {"truncated in the data",
       [](const Good& g, const fs::path& p) { truncated(g, p, g.data_offset + g.tensors.at("w1").offset + 100); },
       "runs past the end of the data section"},
      {"truncated by its last byte", [](const Good& g, const fs::path& p) { truncated(g, p, g.bytes.size() - 1); },
       "runs past the end of the data section"},
      {"header length zero", [](const Good& g, const fs::path& p) { with_length(g, p, 0); },
       "the header is not valid JSON: expected an object"},
      {"header length over the limit", [](const Good& g, const fs::path& p) { with_length(g, p, 1ull << 40); },
       "header length 1099511627776 exceeds the limit of 100000000 bytes"},
      {"header length past the end of the file",
       [](const Good& g, const fs::path& p) { with_length(g, p, g.bytes.size()); }, "runs past the end of the file"},
      {"header length odd, one byte short",  // the header's last byte, padding, becomes data
       [](const Good& g, const fs::path& p) { with_length(g, p, g.header.size() - 1); }, "belong to no tensor"},
      // The JSON.
      {"malformed JSON", [](const Good& g, const fs::path& p) { edit_header(g, p, "\"shape\":[", "\"shape\":[["); },
       "the header is not valid JSON"},
      {"duplicate keys",
       [](const Good& g, const fs::path& p) {
         edit_header(g, p, "\"__metadata__\":{", "\"__metadata__\":{\"alloy.seed\":\"0\",");
       },
       "duplicate key 'alloy.seed'"},
      {"metadata value not a string",
       [](const Good& g, const fs::path& p) { edit_header(g, p, "\"alloy.seed\":\"31\"", "\"alloy.seed\":31"); },
       "__metadata__ entry 'alloy.seed' is an integer, not a string"},
      {"a tensor entry with an unknown field",
       [](const Good& g, const fs::path& p) { edit_header(g, p, "\"dtype\":", "\"stride\":[1],\"dtype\":"); },
       "has an unexpected field 'stride'"},
      // Offsets.
      {"offsets overlapping",
       [](const Good& g, const fs::path& p) {
         const auto& t = g.tensors.at("alloy/master/w2");
         edit_header(
             g, p, g.offsets_text("alloy/master/w2"),
             "\"data_offsets\":[" + std::to_string(t.offset - 4) + "," + std::to_string(t.offset + t.size - 4) + "]");
       },
       "overlaps tensor"},
      {"offsets out of range",
       [](const Good& g, const fs::path& p) {
         const auto& t = g.tensors.at("b2");  // the last tensor
         edit_header(
             g, p, g.offsets_text("b2"),
             "\"data_offsets\":[" + std::to_string(t.offset + 8) + "," + std::to_string(t.offset + t.size + 8) + "]");
       },
       "runs past the end of the data section"},
      {"offsets that do not match the dtype's size",
       [](const Good& g, const fs::path& p) {
         const auto& t = g.tensors.at("alloy/master/b1");
         edit_header(
             g, p, g.offsets_text("alloy/master/b1"),
             "\"data_offsets\":[" + std::to_string(t.offset) + "," + std::to_string(t.offset + t.size - 2) + "]");
       },
       "needs 128 bytes but data_offsets"},
      // Dtypes and shapes.
      {"wrong dtype (same width)",
       [](const Good& g, const fs::path& p) {
         edit_header(g, p, "\"alloy/master/w1\":{\"dtype\":\"F32\"", "\"alloy/master/w1\":{\"dtype\":\"I32\"");
       },
       "tensor 'alloy/master/w1' is I32 [32, 16], this model has F32 [32, 16]"},
      {"compute copy in fp16",
       [](const Good& g, const fs::path& p) {
         edit_header(g, p, "\"w1\":{\"dtype\":\"BF16\"", "\"w1\":{\"dtype\":\"F16\"");
       },
       "tensor 'w1' is F16 [32, 16], this model has BF16 [32, 16]"},
      {"unknown dtype",
       [](const Good& g, const fs::path& p) { edit_header(g, p, "{\"dtype\":\"F32\"", "{\"dtype\":\"F33\""); },
       "unknown dtype 'F33'"},
      {"wrong shape",
       [](const Good& g, const fs::path& p) {
         edit_header(g, p, "\"alloy/state/w1/exp_avg\":{\"dtype\":\"F32\",\"shape\":[32,16]",
                     "\"alloy/state/w1/exp_avg\":{\"dtype\":\"F32\",\"shape\":[16,32]");
       },
       "tensor 'alloy/state/w1/exp_avg' is F32 [16, 32], this model has F32 [32, 16]"},
      {"negative dimension",
       [](const Good& g, const fs::path& p) { edit_header(g, p, "\"shape\":[32,16]", "\"shape\":[-32,16]"); },
       "negative dimension -32"},
      // Missing, extra, foreign.
      {"missing tensor",
       [](const Good& g, const fs::path& p) {
         rewritten(g, p, [](Tensors& t, Metadata&) { t.erase("alloy/state/b1/exp_avg"); });
       },
       "tensor 'alloy/state/b1/exp_avg' is missing"},
      {"extra tensor",
       [](const Good& g, const fs::path& p) {
         rewritten(g, p, [](Tensors& t, Metadata&) {
           auto extra = t.at("b2");
           extra.first.name = "b3";
           t["b3"] = extra;
         });
       },
       "tensor 'b3' is not a parameter of this model"},
      {"another model", [](const Good&, const fs::path& p) { trained(StudentMlp(16, 48, 4)).save(p); },
       "tensor 'w1' is BF16 [48, 16], this model has BF16 [32, 16]"},
      {"another precision policy",
       [](const Good&, const fs::path& p) {
         Trainer<StudentMlp, Precision<fp16, fp32_master>, AdamW<>, Host>(StudentMlp(16, 32, 4)).save(p);
       },
       "written by a trainer with policies {compute=fp16"},
      {"another optimizer",
       [](const Good&, const fs::path& p) {
         Trainer<StudentMlp, Precision<bf16, fp32_master>, SGD<>, Host>(StudentMlp(16, 32, 4)).save(p);
       },
       "optimizer=SGD"},
      {"another state width", [](const Good&, const fs::path& p) { Q8(StudentMlp(16, 32, 4)).save(p); },
       "state=q8/256"},
      {"the signature edited",
       [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.signature", "compute=bf16"); },
       "written by a trainer with policies {compute=bf16}"},
      // Values.
      {"NaN in a master",
       [=](const Good&, const fs::path& p) { saved_after(p, [=](Tr& t) { master(t, "w2", 7) = nan; }); },
       "parameter 'w2' holds a non-finite value at element 7"},
      {"Inf in a master",
       [=](const Good&, const fs::path& p) { saved_after(p, [=](Tr& t) { master(t, "b1", 0) = -inf; }); },
       "parameter 'b1' holds a non-finite value at element 0"},
      {"NaN in optimizer state",
       [=](const Good&, const fs::path& p) {
         saved_after(p, [=](Tr& t) { t.store().state_arena(0).data()[t.store().layout()[2].offset + 5] = nan; });
       },
       "optimizer state 'alloy/state/w2/exp_avg' holds a non-finite value at element 5"},
      {"negative second moment",
       [](const Good&, const fs::path& p) {
         saved_after(p, [](Tr& t) { t.store().state_arena(1).data()[t.store().layout()[1].offset + 3] = -1e-9f; });
       },
       "optimizer state 'alloy/state/b1/exp_avg_sq' holds a negative value at element 3"},
      {"q8 scale negative",
       [](const Good&, const fs::path& p) {
         saved_after<Q8>(p, [](Q8& t) { t.store().state_scale_arena(1).data()[0] = -0.5f; });
       },
       "optimizer state 'alloy/state/w1/exp_avg_sq.absmax' holds a negative value at element 0", For::q8},
      {"compute copy not a rounding of its master",
       [](const Good&, const fs::path& p) {
         saved_after(p, [](Tr& t) { t.store().param("b2").data[2] = bf16(0.0f); });
       },
       "parameter 'b2': its bf16 copy at element 2 is 0x0p+0, not a rounding of its fp32 master"},
      // Counters and the scaler.
      {"counter ' -1'", [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.attempted_steps", " -1"); },
       "metadata 'alloy.attempted_steps' = ' -1' is not an unsigned integer"},
      {"counter missing",
       [](const Good& g, const fs::path& p) { rewritten(g, p, [](Tensors&, Metadata& m) { m.erase("alloy.seed"); }); },
       "metadata 'alloy.seed' is missing"},
      {"growth tracker over int32",
       [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.loss_scale_growth_tracker", "2147483648"); },
       "is above 2147483647"},
      {"hysteresis 0",
       [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.loss_scale_hysteresis_left", "0"); },
       "hysteresis_left is 0"},
      {"applied more than attempted",
       [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.applied_steps", "3"); },
       "step counters disagree: 3 applied"},
      {"more overflows than steps",
       [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.loss_scale_overflows", "3"); },
       "more than the 2 attempted steps"},
      {"denormal loss scale",
       [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.loss_scale", "0x1p-140"); },
       "is not a positive normal float"},
      {"infinite loss scale", [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.loss_scale", "inf"); },
       "metadata 'alloy.loss_scale' = 'inf' is not a finite number"},
      // A dynamic scaler's state out of its machine's reach (DynamicLossScaleConfig's defaults:
      // hysteresis 1, growth_interval 2000, scale in [1, 2^24]).
      {"hysteresis_left above the scaler's hysteresis",
       [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.loss_scale_hysteresis_left", "2147483647"); },
       "hysteresis_left = 2147483647 is above the hysteresis of the scaler configuration it was saved with (1)",
       For::fp16},
      {"growth tracker at the growth interval",
       [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.loss_scale_growth_tracker", "2000"); },
       "growth_tracker = 2000 is not below the growth_interval", For::fp16},
      {"loss scale above max_scale",
       [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.loss_scale", "0x1p+30"); },
       "metadata alloy.loss_scale = 0x1p+30 is outside [0x1p+0, 0x1p+24]", For::fp16},
      {"loss scale below min_scale",
       [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.loss_scale", "0.25"); },
       "metadata alloy.loss_scale = 0x1p-2 is outside [0x1p+0, 0x1p+24]", For::fp16},
      // Checksums.
      {"flipped bit in a master",
       [](const Good& g, const fs::path& p) { flipped(g, p, g.byte_of("alloy/master/w1", 4 * 37), 0); },
       "tensor 'alloy/master/w1' fails its checksum"},
      {"flipped bit in optimizer state",
       [](const Good& g, const fs::path& p) { flipped(g, p, g.byte_of("alloy/state/w2/exp_avg_sq", 9), 3); },
       "tensor 'alloy/state/w2/exp_avg_sq' fails its checksum"},
      {"flipped bit in a compute copy", [](const Good& g, const fs::path& p) { flipped(g, p, g.byte_of("w2", 1), 0); },
       "tensor 'w2' fails its checksum"},
      {"flipped bit in a counter",
       [](const Good& g, const fs::path& p) {
         flipped(g, p, 8 + g.header.find("\"alloy.attempted_steps\":\"2\"") + 25, 0);  // "2" -> "3"
       },
       "the metadata fails its checksum"},
      {"a tensor's checksum missing",
       [](const Good& g, const fs::path& p) {
         const std::string key = "\"crc32c:b1\":\"";
         const auto at = g.header.find(key);
         edit_header(g, p, g.header.substr(at, key.size() + 10), "");  // "crc32c:b1":"xxxxxxxx",
       },
       "tensor 'b1' has no checksum"},
      {"the metadata's checksum missing",
       [](const Good& g, const fs::path& p) {
         const std::string key = "\"crc32c:__metadata__\":\"";
         edit_header(g, p, g.header.substr(g.header.find(key), key.size() + 10), "");
       },
       "metadata 'crc32c:__metadata__' is missing"},
      {"a checksum that is not one",
       [](const Good& g, const fs::path& p) {
         const std::string key = "\"crc32c:w1\":\"";
         const auto at = g.header.find(key) + key.size();
         edit_header(g, p, g.header.substr(at, 8), "zzzzzzzz");
       },
       "metadata 'crc32c:w1' = 'zzzzzzzz' is not a CRC-32C"},
      // Formats and foreign files.
      {"format 1", [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.format", "alloy-checkpoint-1"); },
       "written in format 'alloy-checkpoint-1', which this version of alloy does not read"},
      {"a future format",
       [](const Good& g, const fs::path& p) { with_metadata(g, p, "alloy.format", "alloy-checkpoint-4"); },
       "written in format 'alloy-checkpoint-4'"},
      {"format missing",
       [](const Good& g, const fs::path& p) {
         rewritten(g, p, [](Tensors&, Metadata& m) { m.erase("alloy.format"); });
       },
       "not an alloy checkpoint (metadata alloy.format is missing"},
      {"exported weights", [](const Good&, const fs::path& p) { trained().export_weights(p); },
       "not an alloy checkpoint (metadata alloy.format is missing"},
      {"not safetensors at all",
       [](const Good&, const fs::path& p) {
         std::ofstream(p) << "step 2, loss 0.31, lr 1e-3 -- a log, not a checkpoint\n";
       },
       "exceeds the limit of 100000000 bytes"},
      {"a named pipe", [](const Good&, const fs::path& p) { ASSERT_EQ(::mkfifo(p.c_str(), 0600), 0); },
       "a named pipe (FIFO), not a regular file"},
      {"a directory", [](const Good&, const fs::path& p) { fs::create_directory(p); },
       "a directory, not a regular file"},
      {"no file", [](const Good&, const fs::path&) {}, "cannot open: No such file or directory"},
  };
}

// Every byte of the trainer's state, its counters, its scale and its seed.
template <class T>
auto state_of(T& t) {
  return std::tuple(test::snapshot(t.store()), t.steps(), t.optimizer().steps(), t.optimizer().skipped_steps(),
                    t.loss_scale(), t.config().seed);
}

template <class T>
void expect_refused(T& target, const fs::path& path, const std::string& says) {
  const auto before = state_of(target);
  try {
    target.load(path);
    ADD_FAILURE() << "loaded";
  } catch (const alloy::error& e) {
    EXPECT_MENTIONS(e.what(), says);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not an alloy::error: " << e.what();
  }
  EXPECT_TRUE(state_of(target) == before) << "the trainer changed";
}

TEST(CheckpointBadFiles, EachIsRefusedNamingTheProblemAndChangesNothing) {
  test::TempDir dir;
  Tr source = trained();
  source.save(dir / "good.safetensors");
  trained<Q8>().save(dir / "good_q8.safetensors");
  trained<Fp16>().save(dir / "good_fp16.safetensors");
  const Good good(dir / "good.safetensors"), good_q8(dir / "good_q8.safetensors"),
      good_fp16(dir / "good_fp16.safetensors");
  // Targets that trained a few steps of their own, with another seed.
  Tr target(StudentMlp(16, 32, 4), {.seed = target_seed});
  Q8 target_q8(StudentMlp(16, 32, 4), {.seed = target_seed});
  Fp16 target_fp16(StudentMlp(16, 32, 4), {.seed = target_seed});
  const auto data = batches(5);
  for (int s = 2; s < 5; ++s) {
    target.step(std::span(&data[s], 1));
    target_q8.step(std::span(&data[s], 1));
    target_fp16.step(std::span(&data[s], 1));
  }

  const auto cases = bad_files();
  EXPECT_GE(cases.size(), 30u);
  int i = 0;
  for (const BadFile& c : cases) {
    SCOPED_TRACE(c.name);
    const fs::path path = dir / ("bad" + std::to_string(i++) + ".safetensors");
    switch (c.target) {
      case For::adamw:
        c.make(good, path);
        expect_refused(target, path, c.says);
        break;
      case For::q8:
        c.make(good_q8, path);
        expect_refused(target_q8, path, c.says);
        break;
      case For::fp16:
        c.make(good_fp16, path);
        expect_refused(target_fp16, path, c.says);
        break;
    }
  }
  // The good files still load, and training goes on.
  target.load(good.path);
  target_q8.load(good_q8.path);
  target_fp16.load(good_fp16.path);
  EXPECT_EQ(test::snapshot(target.store()), test::snapshot(source.store()));
  EXPECT_FALSE(target.step(std::span(&data[2], 1)).skipped);
}

}  // namespace
