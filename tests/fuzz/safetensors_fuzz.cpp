// libFuzzer target: SafetensorsFile::open over arbitrary bytes. Opening either succeeds or throws
// alloy::error; anything else (another exception, a sanitizer report, a leak, a hang) is a
// finding. A file it accepts must then behave: every tensor reads whole and in chunks with the
// same bytes (or fails its checksum, with alloy::error: the file is refused as it is read), finds
// by name, and writes back through write_safetensors, as it was and with checksums computed
// afresh, into files that read the same (names, dtypes, shapes, offsets, bytes, metadata).

#include "fuzz_support.hpp"

#include <alloy/io/safetensors.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace {

using namespace alloy;
using fuzz::finding;

fuzz::Counts counts{"alloy_fuzz_safetensors", "inputs"};

// Everything but the checksums.
std::map<std::string, std::string> without_checksums(const std::map<std::string, std::string>& metadata) {
  std::map<std::string, std::string> out = metadata;
  std::erase_if(out, [](const auto& entry) { return entry.first.starts_with(safetensors_checksum_prefix); });
  return out;
}

// Written with `metadata` and `options`, then read back: the same tensors, bytes and metadata.
void round_trip(const SafetensorsFile& file, const std::vector<std::vector<std::byte>>& contents,
                const std::map<std::string, std::string>& metadata, const SafetensorsWriteOptions& options,
                const std::filesystem::path& path) {
  const std::string how = options.checksums ? " (with checksums)" : "";
  std::vector<TensorToWrite> rewrite;
  for (std::size_t i = 0; i < file.tensors().size(); ++i) {
    const StoredTensor& t = file.tensors()[i];
    rewrite.push_back({t.name, t.dtype, t.shape, std::span<const std::byte>(contents[i])});
  }
  try {
    write_safetensors(path, rewrite, metadata, options);
  } catch (const alloy::error& e) {
    finding("write_safetensors" + how + " refused what the reader accepted: " + e.what());
  }
  std::optional<SafetensorsFile> again;
  try {
    again.emplace(SafetensorsFile::open(path));
    if (without_checksums(again->metadata()) != without_checksums(file.metadata())) {
      finding("metadata changed in a write" + how + " and read");
    }
    if (again->tensors().size() != file.tensors().size()) {
      finding("the number of tensors changed in a write" + how + " and read");
    }
    for (std::size_t i = 0; i < file.tensors().size(); ++i) {
      const StoredTensor& a = file.tensors()[i];
      const StoredTensor& b = again->tensors()[i];
      if (a.name != b.name || a.dtype != b.dtype || a.shape != b.shape || a.offset != b.offset || a.size != b.size) {
        finding("tensor " + a.name + " changed its description in a write" + how + " and read");
      }
      if (options.checksums && !b.crc32c) finding("tensor " + a.name + " was written without its checksum");
      std::vector<std::byte> bytes(static_cast<std::size_t>(b.size));
      again->read(b.name, bytes);
      if (bytes != contents[i]) finding("tensor " + a.name + " changed its bytes in a write" + how + " and read");
    }
  } catch (const alloy::error& e) {
    finding("the reader refused what write_safetensors" + how + " wrote from an accepted file: " + e.what());
  }
}

// Returns false when a tensor fails its checksum (the file is refused as it is read).
bool check_accepted(const SafetensorsFile& file, std::size_t file_size, const fuzz::ScratchDirectory& scratch) {
  std::vector<std::vector<std::byte>> contents;
  std::uint64_t previous_end = 0;
  for (const StoredTensor& t : file.tensors()) {
    if (t.offset != previous_end) finding("tensors() is not in offset order or leaves a gap");
    previous_end = t.offset + t.size;
    if (file.find(t.name) != &t) finding("find() does not return the tensor tensors() lists");
    contents.emplace_back(static_cast<std::size_t>(t.size));
    try {
      file.read(t.name, contents.back());
    } catch (const alloy::error& e) {
      if (!t.crc32c) finding(std::string("reading a tensor of an accepted file failed: ") + e.what());
      return false;
    }
    std::vector<std::byte> chunked;
    std::byte buffer[7];
    file.read_chunks(t.name, buffer, [&](std::size_t offset, std::span<const std::byte> chunk) {
      if (offset != chunked.size()) finding("read_chunks handed over a chunk out of order");
      chunked.insert(chunked.end(), chunk.begin(), chunk.end());
    });
    if (chunked != contents.back()) finding("read_chunks and read disagree on tensor " + t.name);
  }
  if (file.data_offset() + previous_end != file_size) finding("the tensors do not cover the data section exactly");
  // As it was (its checksums, if any, still hold), and with checksums computed afresh.
  round_trip(file, contents, file.metadata(), {}, scratch / "rewritten.safetensors");
  SafetensorsWriteOptions checked;
  checked.checksums = true;
  round_trip(file, contents, without_checksums(file.metadata()), checked, scratch / "rewritten.safetensors");
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static fuzz::InputFile input;
  static fuzz::ScratchDirectory scratch;
  ++counts.inputs;
  std::optional<SafetensorsFile> file;
  try {
    fuzz::only_alloy_errors("SafetensorsFile::open",
                            [&] { file.emplace(SafetensorsFile::open(input.hold(data, size))); });
  } catch (const alloy::error&) {
    ++counts.refused;
    return 0;
  }
  try {
    bool whole = false;
    fuzz::only_alloy_errors("reading an accepted file", [&] { whole = check_accepted(*file, size, scratch); });
    ++(whole ? counts.accepted : counts.refused);
  } catch (const alloy::error& e) {
    finding(std::string("reading a file the reader accepted failed: ") + e.what());
  }
  return 0;
}
