// libFuzzer target: SafetensorsFile::open over arbitrary bytes. Opening either succeeds or throws
// alloy::error; anything else (another exception, a sanitizer report, a leak, a hang) is a
// finding. A file it accepts must then behave: every tensor reads whole and in chunks with the
// same bytes, finds by name, and writes back through write_safetensors into a file that reads
// the same (names, dtypes, shapes, offsets, bytes, metadata).

#include "fuzz_support.hpp"

#include <alloy/io/safetensors.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

using namespace alloy;
using fuzz::finding;

fuzz::Counts counts{"alloy_fuzz_safetensors", "inputs"};

std::vector<std::byte> read_whole(const SafetensorsFile& file, const StoredTensor& t) {
  std::vector<std::byte> bytes(static_cast<std::size_t>(t.size));
  file.read(t.name, bytes);
  return bytes;
}

void check_accepted(const SafetensorsFile& file, std::size_t file_size, const fuzz::ScratchDirectory& scratch) {
  std::vector<std::vector<std::byte>> contents;
  std::vector<TensorToWrite> rewrite;
  std::uint64_t previous_end = 0;
  for (const StoredTensor& t : file.tensors()) {
    if (t.offset != previous_end) finding("tensors() is not in offset order or leaves a gap");
    previous_end = t.offset + t.size;
    if (file.find(t.name) != &t) finding("find() does not return the tensor tensors() lists");
    contents.push_back(read_whole(file, t));
    std::vector<std::byte> chunked;
    std::byte buffer[7];
    file.read_chunks(t.name, buffer, [&](std::size_t offset, std::span<const std::byte> chunk) {
      if (offset != chunked.size()) finding("read_chunks handed over a chunk out of order");
      chunked.insert(chunked.end(), chunk.begin(), chunk.end());
    });
    if (chunked != contents.back()) finding("read_chunks and read disagree on tensor " + t.name);
  }
  if (file.data_offset() + previous_end != file_size) finding("the tensors do not cover the data section exactly");
  for (std::size_t i = 0; i < file.tensors().size(); ++i) {
    const StoredTensor& t = file.tensors()[i];
    rewrite.push_back({t.name, t.dtype, t.shape, std::span<const std::byte>(contents[i])});
  }

  const auto path = scratch / "rewritten.safetensors";
  try {
    write_safetensors(path, rewrite, file.metadata());
  } catch (const alloy::error& e) {
    finding(std::string("write_safetensors refused what the reader accepted: ") + e.what());
  }
  std::optional<SafetensorsFile> again;
  try {
    again.emplace(SafetensorsFile::open(path));
  } catch (const alloy::error& e) {
    finding(std::string("the reader refused what write_safetensors wrote from an accepted file: ") + e.what());
  }
  if (again->metadata() != file.metadata()) finding("metadata changed in a write and read");
  if (again->tensors().size() != file.tensors().size()) finding("the number of tensors changed in a write and read");
  for (std::size_t i = 0; i < file.tensors().size(); ++i) {
    const StoredTensor& a = file.tensors()[i];
    const StoredTensor& b = again->tensors()[i];
    if (a.name != b.name || a.dtype != b.dtype || a.shape != b.shape || a.offset != b.offset || a.size != b.size) {
      finding("tensor " + a.name + " changed its description in a write and read");
    }
    if (read_whole(*again, b) != contents[i]) finding("tensor " + a.name + " changed its bytes in a write and read");
  }
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
  ++counts.accepted;
  try {
    fuzz::only_alloy_errors("reading an accepted file", [&] { check_accepted(*file, size, scratch); });
  } catch (const alloy::error& e) {
    finding(std::string("reading a file the reader accepted failed: ") + e.what());
  }
  return 0;
}
