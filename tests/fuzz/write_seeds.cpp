// Writes the fuzz targets' seed corpora: valid checkpoints of every trainer in fuzz_model.hpp
// (fresh, after steps, after a skipped step), and safetensors files at the format's edges (no
// tensors, metadata alone, every dtype, scalars, empty tensors, escaped and non-ASCII names,
// hand-spaced headers, CRC-32C checksums), with a few near-misses; and a libFuzzer dictionary for each target (JSON
// syntax, keys, dtype names, and every tensor name, metadata key and value of the checkpoints
// written, so it follows the format). Usage: alloy_fuzz_seeds <directory>; it makes
// <directory>/checkpoint, <directory>/safetensors and <directory>/{checkpoint,safetensors}.dict afresh.

#include "fuzz_model.hpp"

#include <alloy/io/safetensors.hpp>

#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace {

using namespace alloy;
namespace fs = std::filesystem;

std::vector<std::byte> bytes_of(const std::string& s) {
  std::vector<std::byte> out(s.size());
  std::memcpy(out.data(), s.data(), s.size());
  return out;
}

void write_raw(const fs::path& path, const std::vector<std::byte>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

// A file from a header written by hand (not padded) and a data section.
std::vector<std::byte> raw_file(const std::string& header, std::size_t data_bytes, std::uint64_t length_field) {
  std::vector<std::byte> out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::byte>((length_field >> (8 * i)) & 0xFF));
  const auto h = bytes_of(header);
  out.insert(out.end(), h.begin(), h.end());
  for (std::size_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<std::byte>(i * 37 + 5));
  return out;
}

std::vector<std::byte> raw_file(const std::string& header, std::size_t data_bytes) {
  return raw_file(header, data_bytes, header.size());
}

template <class Tr>
void checkpoints(const fs::path& dir, int index) {
  const std::string prefix = "trainer" + std::to_string(index);
  Tr trainer(fuzz::SmallModel{}, fuzz::config<Tr>(5));
  trainer.save(dir / (prefix + "_fresh.safetensors"));
  const std::vector<fuzz::TargetBatch> batches(static_cast<std::size_t>(trainer.micro_batches()),
                                               fuzz::SmallModel::batch(3));
  for (int s = 0; s < 3; ++s) trainer.step(std::span<const fuzz::TargetBatch>(batches));
  trainer.save(dir / (prefix + "_3_steps.safetensors"));
  std::vector<fuzz::TargetBatch> poisoned = batches;
  poisoned[0].target[4] = std::numeric_limits<float>::infinity();  // a non-finite gradient: a skipped step
  const StepReport r = trainer.step(std::span<const fuzz::TargetBatch>(poisoned));
  if (!r.skipped) throw std::runtime_error(Tr::signature() + ": the poisoned step was not skipped");
  trainer.step(std::span<const fuzz::TargetBatch>(batches));
  trainer.save(dir / (prefix + "_skipped_step.safetensors"));
}

void safetensors_edges(const fs::path& dir) {
  write_safetensors(dir / "no_tensors.safetensors", std::span<const TensorToWrite>{});
  write_safetensors(dir / "metadata_only.safetensors", std::span<const TensorToWrite>{},
                    {{"format", "pt"}, {"", ""}, {"caf\xc3\xa9", "\"quoted\"\\\n\t"}});

  std::vector<std::vector<std::byte>> storage;
  std::vector<TensorToWrite> all;
  for (const auto& info : detail::safetensors_dtypes) {
    const std::vector<std::int64_t> shape = {2, 3};
    storage.emplace_back(6 * info.size);
    for (std::size_t i = 0; i < storage.back().size(); ++i) storage.back()[i] = static_cast<std::byte>(i * 11 + 1);
    all.push_back({std::string(info.name) + ".tensor", info.dtype, shape, std::span<const std::byte>(storage.back())});
  }
  storage.emplace_back(4);
  all.push_back({"scalar", SafetensorsDtype::f32, {}, std::span<const std::byte>(storage.back())});
  all.push_back({"empty", SafetensorsDtype::bf16, {3, 0, 2}, std::span<const std::byte>()});
  all.push_back({"zero-d empty", SafetensorsDtype::u8, {0}, std::span<const std::byte>()});
  storage.emplace_back(2);
  all.push_back({"na\xc3\xafve/\xf0\x9f\x98\x80 \"q\" \\ \x01",
                 SafetensorsDtype::f16,
                 {1, 1, 1, 1},
                 std::span<const std::byte>(storage.back())});
  write_safetensors(dir / "every_dtype.safetensors", all, {{"note", "every dtype, scalars, empty tensors"}});
  SafetensorsWriteOptions checksums;
  checksums.checksums = true;
  write_safetensors(dir / "every_dtype_checksums.safetensors", all, {{"note", "and a CRC-32C of each"}}, checksums);

  // Headers as other writers space them, with escapes the writer never emits.
  write_raw(dir / "spaced.safetensors",
            raw_file("{ \"a\" : { \"dtype\" : \"F32\", \"shape\" : [ 1, 2 ], \"data_offsets\" : [ 0, 8 ] },\n"
                     "  \"__metadata__\" : { \"k\" : \"v\" } }  ",
                     8));
  write_raw(dir / "escapes.safetensors",
            raw_file("{\"\\u00e9\\ud83d\\ude00\\/\\b\\f\\n\\r\\t\":{\"data_offsets\":[0,2],\"shape\":[],"
                     "\"dtype\":\"BF16\"},\"z\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[2,10]}}",
                     10));
  // Near-misses: a header length past the end, a truncated data section, overlapping tensors.
  write_raw(dir / "length_past_end.safetensors", raw_file("{}", 0, 1000));
  write_raw(dir / "truncated.safetensors",
            raw_file("{\"a\":{\"dtype\":\"F64\",\"shape\":[4],\"data_offsets\":[0,32]}}", 31));
  write_raw(dir / "overlap.safetensors", raw_file("{\"a\":{\"dtype\":\"U16\",\"shape\":[2],\"data_offsets\":[0,4]},"
                                                  "\"b\":{\"dtype\":\"U16\",\"shape\":[2],\"data_offsets\":[2,6]}}",
                                                  6));
}

// libFuzzer's dictionary format: one quoted token a line, \" \\ and \xNN escaped.
void write_dictionary(const fs::path& path, const std::set<std::string>& tokens) {
  std::ofstream out(path);
  for (const std::string& token : tokens) {
    std::string line = "\"";
    for (const char c : token) {
      const auto u = static_cast<unsigned char>(c);
      if (c == '"' || c == '\\') {
        line += '\\';
        line += c;
      } else if (u < 0x20 || u >= 0x7f) {
        char hex[8];
        std::snprintf(hex, sizeof hex, "\\x%02X", u);
        line += hex;
      } else {
        line += c;
      }
    }
    out << line << "\"\n";
  }
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

std::set<std::string> safetensors_tokens() {
  std::set<std::string> t = {"{",
                             "}",
                             "[",
                             "]",
                             ":",
                             ",",
                             "\"",
                             "\\u",
                             "\\ud83d",
                             "\\ude00",
                             "null",
                             "true",
                             "false",
                             "-1",
                             "-0",
                             "1e3",
                             "0.5",
                             "\"dtype\"",
                             "\"shape\"",
                             "\"data_offsets\"",
                             "\"__metadata__\"",
                             "\"crc32c:",
                             "\"crc32c:__metadata__\"",
                             "18446744073709551615",
                             "18446744073709551616",
                             "9223372036854775808"};
  for (const auto& info : detail::safetensors_dtypes) t.insert("\"" + std::string(info.name) + "\"");
  return t;
}

// Every tensor name, metadata key and value of the checkpoints in `dir`, quoted as in a header.
std::set<std::string> checkpoint_tokens(const fs::path& dir) {
  std::set<std::string> t = safetensors_tokens();
  for (const auto& entry : fs::directory_iterator(dir)) {
    const SafetensorsFile file = SafetensorsFile::open(entry.path());
    for (const auto& tensor : file.tensors()) t.insert("\"" + tensor.name + "\"");
    for (const auto& [key, value] : file.metadata()) {
      t.insert("\"" + key + "\"");
      if (!key.starts_with(safetensors_checksum_prefix)) t.insert("\"" + value + "\"");  // not a CRC's digits
    }
  }
  for (const char* extra :
       {"alloy-checkpoint-1", "0x1p+0", "0x1.fffffep+127", "inf", "nan", "4294967295", "2147483648", "2147483647"}) {
    t.insert(std::string("\"") + extra + "\"");
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <directory>\n", argv[0]);
    return 2;
  }
  try {
    const fs::path root = argv[1];
    fs::remove_all(root / "checkpoint");
    fs::remove_all(root / "safetensors");
    fs::create_directories(root / "checkpoint");
    fs::create_directories(root / "safetensors");
    int index = 0;
    fuzz::for_each_trainer_type(
        [&]<class Tr>(std::type_identity<Tr>) { checkpoints<Tr>(root / "checkpoint", index++); });
    safetensors_edges(root / "safetensors");
    // One checkpoint among the safetensors seeds: many tensors, long names, metadata.
    fs::copy_file(root / "checkpoint" / "trainer0_3_steps.safetensors",
                  root / "safetensors" / "checkpoint.safetensors");
    write_dictionary(root / "safetensors.dict", safetensors_tokens());
    write_dictionary(root / "checkpoint.dict", checkpoint_tokens(root / "checkpoint"));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "alloy_fuzz_seeds: %s\n", e.what());
    return 1;
  }
  return 0;
}
