#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"

#include <alloy/io/safetensors.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using alloy::SafetensorsDtype;
using alloy::SafetensorsFile;
using alloy::TensorToWrite;
using alloy::test::message_of;
using alloy::test::random_bytes;
using alloy::test::read_all;

class Safetensors : public ::testing::Test {
 protected:
  // A file with the given header text and data section, and a header length that may lie.
  fs::path raw_file(const std::string& header, std::size_t data_bytes,
                    std::optional<std::uint64_t> declared_length = std::nullopt) {
    fs::path path = dir_ / ("raw" + std::to_string(raw_files_++) + ".safetensors");
    std::ofstream out(path, std::ios::binary);
    const std::uint64_t length = declared_length.value_or(header.size());
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>((length >> (8 * i)) & 0xFF));
    out << header << std::string(data_bytes, '\x5a');
    return path;
  }

  // The message of the alloy::error that opening `path` throws.
  static std::string open_error(const fs::path& path) {
    try {
      (void)SafetensorsFile::open(path);
    } catch (const alloy::error& e) {
      return e.what();
    }
    return "no error";
  }

  alloy::test::TempDir dir_{"alloy_safetensors"};
  int raw_files_ = 0;
};

struct Sample {
  std::string name;
  SafetensorsDtype dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;
};

std::size_t byte_count(SafetensorsDtype dtype, const std::vector<std::int64_t>& shape) {
  std::size_t n = alloy::element_size(dtype);
  for (auto d : shape) n *= static_cast<std::size_t>(d);
  return n;
}

// Odd shapes in several dtypes, including a scalar and an empty tensor, with fresh data.
std::vector<Sample> samples(std::mt19937_64& rng) {
  std::vector<Sample> out = {
      {"encoder.weight", SafetensorsDtype::f32, {3, 5, 7}, {}},
      {"encoder.bias", SafetensorsDtype::bf16, {13}, {}},
      {"head", SafetensorsDtype::f16, {1, 1, 3}, {}},
      {"empty", SafetensorsDtype::f16, {0, 4}, {}},
      {"mask", SafetensorsDtype::u8, {11}, {}},
      {"flags", SafetensorsDtype::boolean, {2, 3}, {}},
      {"positions", SafetensorsDtype::i32, {2, 1, 3}, {}},
      {"step", SafetensorsDtype::i64, {}, {}},
      {"master", SafetensorsDtype::f64, {9}, {}},
      {"state.q8", SafetensorsDtype::f8_e4m3, {5, 3}, {}},
  };
  for (auto& s : out) s.bytes = random_bytes(rng, byte_count(s.dtype, s.shape));
  return out;
}

std::vector<TensorToWrite> to_write(const std::vector<Sample>& samples) {
  std::vector<TensorToWrite> out;
  for (const auto& s : samples) out.push_back({s.name, s.dtype, s.shape, std::span<const std::byte>(s.bytes)});
  return out;
}

const std::map<std::string, std::string> some_metadata = {
    {"format", "pt"},
    {"alloy.step", "1234"},
    {"quote\"and\\slash", "line\nbreak\ttab\x01"},
    {"unicode", "caf\xc3\xa9 \xf0\x9f\x98\x80"},
};

TEST_F(Safetensors, RoundTripsSeveralDtypesAndOddShapes) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const auto tensors = samples(rng);
  const fs::path path = dir_ / "model.safetensors";
  alloy::write_safetensors(path, to_write(tensors), some_metadata);

  const auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file.metadata(), some_metadata);
  ASSERT_EQ(file.tensors().size(), tensors.size());
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& stored = file.tensors()[i];  // file order is the order given
    SCOPED_TRACE(tensors[i].name);
    EXPECT_EQ(stored.name, tensors[i].name);
    EXPECT_EQ(stored.dtype, tensors[i].dtype);
    EXPECT_EQ(stored.shape, tensors[i].shape);
    EXPECT_EQ(stored.offset, offset);
    EXPECT_EQ(stored.size, tensors[i].bytes.size());
    offset += stored.size;
    std::vector<std::byte> back(stored.size);
    file.read(stored.name, back);
    EXPECT_EQ(back, tensors[i].bytes);
  }
  EXPECT_EQ(file.tensor("step").numel(), 1u);
  EXPECT_EQ(file.tensor("empty").numel(), 0u);
  EXPECT_EQ(file.data_offset() % 8, 0u);
}

TEST_F(Safetensors, EmptyFileRoundTrips) {
  const fs::path path = dir_ / "empty.safetensors";
  alloy::write_safetensors(path, {});
  const auto bytes = read_all(path);
  ASSERT_EQ(bytes.size(), 16u);  // length, then "{}" padded to 8 bytes
  const auto file = SafetensorsFile::open(path);
  EXPECT_TRUE(file.tensors().empty());
  EXPECT_TRUE(file.metadata().empty());
}

// The parts of one header entry, found by plain string search in the writer's compact output.
struct ScannedEntry {
  std::string dtype;
  std::vector<long long> shape;
  unsigned long long begin = 0, end = 0;
};

std::vector<long long> scan_numbers(const std::string& list) {
  std::vector<long long> out;
  const char* p = list.c_str();
  while (*p) {
    char* next = nullptr;
    out.push_back(std::strtoll(p, &next, 10));
    p = *next == ',' ? next + 1 : next;
  }
  return out;
}

std::string between(const std::string& text, const std::string& open, char close) {
  const auto start = text.find(open);
  if (start == std::string::npos) return "<missing " + open + ">";
  const auto from = start + open.size();
  return text.substr(from, text.find(close, from) - from);
}

ScannedEntry scan_entry(const std::string& header, const std::string& name) {
  const std::string key = "\"" + name + "\":{";
  const auto at = header.find(key);
  if (at == std::string::npos) return {"<no entry>", {}, 0, 0};
  const std::string body = header.substr(at + key.size(), header.find('}', at) - at - key.size());
  ScannedEntry e;
  e.dtype = between(body, "\"dtype\":\"", '"');
  e.shape = scan_numbers(between(body, "\"shape\":[", ']'));
  const auto offsets = scan_numbers(between(body, "\"data_offsets\":[", ']'));
  if (offsets.size() == 2) {
    e.begin = static_cast<unsigned long long>(offsets[0]);
    e.end = static_cast<unsigned long long>(offsets[1]);
  }
  return e;
}

// Checks the bytes on disk against the format description, without alloy's reader.
TEST_F(Safetensors, IndependentScanAgreesWithTheFormat) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const auto tensors = samples(rng);
  const fs::path path = dir_ / "scan.safetensors";
  alloy::write_safetensors(path, to_write(tensors), {{"alloy.step", "1234"}});

  const auto bytes = read_all(path);
  ASSERT_GE(bytes.size(), 8u);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | std::to_integer<std::uint64_t>(bytes[static_cast<std::size_t>(i)]);
  ASSERT_LE(8 + n, bytes.size());
  EXPECT_EQ(n % 8, 0u);
  const std::string header(reinterpret_cast<const char*>(bytes.data()) + 8, n);
  const auto last = header.find_last_not_of(' ');
  EXPECT_EQ(header.front(), '{');
  EXPECT_EQ(header[last], '}');
  EXPECT_LT(header.size() - last - 1, 8u);  // padding is spaces, less than 8 of them
  EXPECT_NE(header.find("\"__metadata__\":{\"alloy.step\":\"1234\"}"), std::string::npos) << header;

  unsigned long long data_end = 0;
  for (const auto& t : tensors) {
    SCOPED_TRACE(t.name);
    const ScannedEntry e = scan_entry(header, t.name);
    EXPECT_EQ(e.dtype, std::string(alloy::safetensors_name(t.dtype)));
    EXPECT_EQ(e.shape, std::vector<long long>(t.shape.begin(), t.shape.end()));
    ASSERT_EQ(e.end - e.begin, t.bytes.size());
    ASSERT_LE(8 + n + e.end, bytes.size());
    const auto data = std::span(bytes).subspan(8 + n + e.begin, t.bytes.size());
    EXPECT_TRUE(std::equal(data.begin(), data.end(), t.bytes.begin()));
    data_end = std::max(data_end, e.end);
  }
  EXPECT_EQ(8 + n + data_end, bytes.size());  // nothing after the last tensor
  EXPECT_EQ(std::string(alloy::safetensors_name(SafetensorsDtype::bf16)), "BF16");
  EXPECT_EQ(alloy::element_size(SafetensorsDtype::f64), 8u);
}

TEST_F(Safetensors, ChunkSourceFillsConsecutiveChunks) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const auto big = random_bytes(rng, 4 * 1000 * 37);
  const auto small = random_bytes(rng, 2 * 3);
  std::vector<std::pair<std::size_t, std::size_t>> calls;  // (offset, size)
  const std::vector<TensorToWrite> tensors = {
      {"streamed",
       SafetensorsDtype::f32,
       {1000, 37},
       alloy::TensorChunkSource([&](std::size_t offset, std::span<std::byte> chunk) {
         calls.emplace_back(offset, chunk.size());
         std::memcpy(chunk.data(), big.data() + offset, chunk.size());
       })},
      {"plain", SafetensorsDtype::bf16, {3}, std::span<const std::byte>(small)},
  };
  const fs::path path = dir_ / "chunked.safetensors";
  alloy::SafetensorsWriteOptions options;
  options.chunk_bytes = 4099;
  alloy::write_safetensors(path, tensors, {}, options);

  std::size_t expected_offset = 0;
  for (std::size_t i = 0; i < calls.size(); ++i) {
    EXPECT_EQ(calls[i].first, expected_offset);
    if (i + 1 < calls.size()) {
      EXPECT_EQ(calls[i].second, 4099u);  // full chunks but the last
    }
    expected_offset += calls[i].second;
  }
  EXPECT_EQ(expected_offset, big.size());

  const auto file = SafetensorsFile::open(path);
  std::vector<std::byte> back(big.size());
  std::size_t next = 0;
  file.read_chunks(
      "streamed",
      [&](std::size_t offset, std::span<const std::byte> chunk) {
        EXPECT_EQ(offset, next);
        EXPECT_LE(chunk.size(), 1000u);
        std::memcpy(back.data() + offset, chunk.data(), chunk.size());
        next += chunk.size();
      },
      1000);
  EXPECT_EQ(back, big);
  std::vector<std::byte> small_back(small.size());
  file.read("plain", small_back);
  EXPECT_EQ(small_back, small);
}

TEST_F(Safetensors, CallerChunkBuffersAreUsed) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const auto data = random_bytes(rng, 8 * 500);
  std::vector<std::byte> write_buffer(333);
  const std::vector<TensorToWrite> tensors = {
      {"t", SafetensorsDtype::u64, {500}, alloy::TensorChunkSource([&](std::size_t offset, std::span<std::byte> chunk) {
         EXPECT_GE(chunk.data(), write_buffer.data());
         EXPECT_LE(chunk.data() + chunk.size(), write_buffer.data() + write_buffer.size());
         std::memcpy(chunk.data(), data.data() + offset, chunk.size());
       })}};
  const fs::path path = dir_ / "buffers.safetensors";
  alloy::SafetensorsWriteOptions options;
  options.chunk_buffer = write_buffer;
  alloy::write_safetensors(path, tensors, {}, options);

  const auto file = SafetensorsFile::open(path);
  std::vector<std::byte> read_buffer(77), back;
  file.read_chunks("t", read_buffer, [&](std::size_t, std::span<const std::byte> chunk) {
    EXPECT_EQ(chunk.data(), read_buffer.data());
    back.insert(back.end(), chunk.begin(), chunk.end());
  });
  EXPECT_EQ(back, data);
}

TEST_F(Safetensors, FailingChunkSourceLeavesTheOldFile) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const auto tensors = samples(rng);
  const fs::path path = dir_ / "ckpt.safetensors";
  alloy::write_safetensors(path, to_write(tensors));
  const auto before = read_all(path);

  const std::vector<TensorToWrite> failing = {
      {"t", SafetensorsDtype::f32, {1 << 20}, alloy::TensorChunkSource([](std::size_t offset, std::span<std::byte>) {
         if (offset > 0) throw std::runtime_error("cudaMemcpy failed");
       })}};
  alloy::SafetensorsWriteOptions options;
  options.chunk_bytes = 1 << 16;
  EXPECT_THROW(alloy::write_safetensors(path, failing, {}, options), std::runtime_error);
  EXPECT_EQ(read_all(path), before);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_.path()), fs::directory_iterator()), 1);
}

TEST_F(Safetensors, WriterRejectsInconsistentTensors) {
  const std::vector<std::byte> eight(8);
  auto write = [&](std::vector<TensorToWrite> tensors) {
    return message_of([&] { alloy::write_safetensors(dir_ / "bad.safetensors", tensors); });
  };
  EXPECT_MENTIONS(write({{"w", SafetensorsDtype::f32, {3}, std::span<const std::byte>(eight)}}),
                  "tensor 'w' of shape [3] and dtype F32 needs 12 bytes, got 8");
  EXPECT_MENTIONS(write({{"w", SafetensorsDtype::u8, {8}, std::span<const std::byte>(eight)},
                         {"w", SafetensorsDtype::u8, {8}, std::span<const std::byte>(eight)}}),
                  "tensor 'w' is given twice");
  EXPECT_MENTIONS(write({{"", SafetensorsDtype::u8, {8}, std::span<const std::byte>(eight)}}), "needs a name");
  EXPECT_MENTIONS(write({{"__metadata__", SafetensorsDtype::u8, {8}, std::span<const std::byte>(eight)}}), "reserved");
  EXPECT_MENTIONS(write({{"w", SafetensorsDtype::u8, {-8}, std::span<const std::byte>(eight)}}), "negative dimension");
  EXPECT_MENTIONS(write({{"w", SafetensorsDtype::u8, {8}, alloy::TensorChunkSource()}}), "empty chunk source");
  EXPECT_FALSE(fs::exists(dir_ / "bad.safetensors"));
}

TEST_F(Safetensors, ReadsCheckTheNameAndTheDestination) {
  const std::vector<std::byte> bytes(12);
  const fs::path path = dir_ / "r.safetensors";
  alloy::write_safetensors(path, std::vector<TensorToWrite>{{"w", SafetensorsDtype::f32, {3}, std::span(bytes)}});
  const auto file = SafetensorsFile::open(path);
  std::vector<std::byte> wrong(8);
  EXPECT_MENTIONS(message_of([&] { file.read("w", wrong); }), "tensor 'w' has 12 bytes, the destination 8");
  EXPECT_MENTIONS(message_of([&] { file.read("nope", wrong); }), "has no tensor 'nope'");
  EXPECT_EQ(file.find("nope"), nullptr);
}

TEST_F(Safetensors, ReadNoticesAFileTruncatedAfterOpening) {
  const std::vector<std::byte> bytes(4000);
  const fs::path path = dir_ / "shrinking.safetensors";
  alloy::write_safetensors(path, std::vector<TensorToWrite>{{"w", SafetensorsDtype::f32, {1000}, std::span(bytes)}});
  const auto file = SafetensorsFile::open(path);
  fs::resize_file(path, fs::file_size(path) - 100);
  std::vector<std::byte> out(4000);
  EXPECT_MENTIONS(message_of([&] { file.read("w", out); }), "truncated after it was opened");
}

// Foreign writers may list tensors in any order, fields in any order, with whitespace.
TEST_F(Safetensors, AcceptsForeignLayoutAndEscapedNames) {
  const std::string header =
      " { \"b\" : {\"data_offsets\":[8,16], \"shape\":[2], \"dtype\":\"I32\"},\n"
      "\"caf\\u00e9 \\ud83d\\ude00 \\\"q\\\"\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[16,17]},"
      "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},"
      "\"a\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}\t";
  const auto file = SafetensorsFile::open(raw_file(header, 17));
  ASSERT_EQ(file.tensors().size(), 4u);
  EXPECT_EQ(file.tensors()[0].name, "z");  // file order: by offset
  EXPECT_EQ(file.tensors()[1].name, "a");
  EXPECT_EQ(file.tensors()[2].name, "b");
  EXPECT_EQ(file.tensors()[3].name, "caf\xc3\xa9 \xf0\x9f\x98\x80 \"q\"");
  EXPECT_EQ(file.tensor("b").dtype, SafetensorsDtype::i32);
}

TEST_F(Safetensors, RejectsAFileShorterThanTheLengthField) {
  const fs::path path = dir_ / "tiny.safetensors";
  std::ofstream(path, std::ios::binary) << "abc";
  const std::string message = open_error(path);
  EXPECT_MENTIONS(message, "3 bytes, too short");
  EXPECT_MENTIONS(message, path.string());
}

TEST_F(Safetensors, RejectsAMissingFileOrADirectory) {
  EXPECT_MENTIONS(open_error(dir_ / "absent.safetensors"), "cannot open: No such file or directory");
  EXPECT_MENTIONS(open_error(dir_.path()), "not a regular file");
}

TEST_F(Safetensors, RejectsAHeaderLengthPastTheEndOfTheFile) {
  const std::string header = "{}      ";
  EXPECT_MENTIONS(open_error(raw_file(header, 0, 9)), "header length 9 runs past the end of the file (16 bytes)");
}

TEST_F(Safetensors, RejectsAHeaderLengthOverTheLimit) {
  EXPECT_MENTIONS(open_error(raw_file("{}", 0, 100'000'001)), "header length 100000001 exceeds the limit");
  // The largest length must not wrap around when the 8 length bytes are added to it.
  EXPECT_MENTIONS(open_error(raw_file("{}", 0, ~std::uint64_t(0))), "exceeds the limit");
}

TEST_F(Safetensors, RejectsInvalidJson) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"a\":", "unexpected end"},
      {"{\"a\" 1}", "expected ':'"},
      {"[1, 2]", "expected an object"},
      {"{'a':1}", "expected a string key"},
      {"{\"__metadata__\":{},}", "expected a string key"},
      {"{\"a\":\"open}", "unterminated string"},
      {"{\"a\\x\":1}", "unknown escape"},
      {"{\"\\ud800\":1}", "unpaired high surrogate"},
      {"{\"\\udc00\":1}", "unpaired low surrogate"},
      {"{\"\\u12g4\":1}", "bad hex digit"},
      {"{\"\xc3\x28\":1}", "invalid UTF-8"},
      {"{\"\xed\xa0\x80\":1}", "invalid UTF-8"},  // an encoded surrogate
      {"{\"\xc0\xaf\":1}", "invalid UTF-8"},      // an overlong '/'
      {"{\"a\nb\":1}", "control character"},
      {"{\"__metadata__\":{\"a\":\"b\"},\"t\":{\"shape\":[1.5]}}", "only integers"},
      {"{\"t\":{\"shape\":[01]}}", "leading zero"},
      {"{\"t\":{\"shape\":[18446744073709551616]}}", "does not fit in 64 bits"},
      {"{\"t\":tru}", "unexpected character"},
      {"", "expected an object"},
  };
  for (const auto& [header, problem] : cases) {
    SCOPED_TRACE(header);
    const std::string message = open_error(raw_file(header, 0));
    EXPECT_MENTIONS(message, "the header is not valid JSON");
    EXPECT_MENTIONS(message, problem);
    EXPECT_MENTIONS(message, "at header byte");
  }
}

TEST_F(Safetensors, RejectsTrailingGarbage) {
  const std::string header = "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}  x";
  EXPECT_MENTIONS(open_error(raw_file(header, 1)),
                  "trailing bytes after the document at header byte " + std::to_string(header.find('x')));
}

TEST_F(Safetensors, RejectsDuplicateTensorNames) {
  const std::string header =
      "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
      "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}";
  EXPECT_MENTIONS(open_error(raw_file(header, 2)), "duplicate key 'w'");
}

TEST_F(Safetensors, RejectsAnUnknownDtype) {
  const std::string header = "{\"w\":{\"dtype\":\"F7\",\"shape\":[1],\"data_offsets\":[0,1]}}";
  EXPECT_MENTIONS(open_error(raw_file(header, 1)), "tensor 'w' has unknown dtype 'F7'");
}

TEST_F(Safetensors, RejectsAShapeThatDisagreesWithTheByteRange) {
  const std::string header = "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}";
  EXPECT_MENTIONS(open_error(raw_file(header, 20)),
                  "tensor 'w': shape [2, 3] of F32 needs 24 bytes but data_offsets [0, 20) hold 20");
}

TEST_F(Safetensors, RejectsOverlappingTensors) {
  const std::string header =
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}";
  EXPECT_MENTIONS(open_error(raw_file(header, 12)), "tensor 'b' at [4, 12) overlaps tensor 'a' at [0, 8)");
}

TEST_F(Safetensors, RejectsAGapBetweenTensors) {
  const std::string header =
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}";
  EXPECT_MENTIONS(open_error(raw_file(header, 20)), "gap in the data section: bytes [8, 12) belong to no tensor");
}

TEST_F(Safetensors, RejectsATensorPastTheEndOfTheData) {
  const std::string header = "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";
  EXPECT_MENTIONS(open_error(raw_file(header, 12)),
                  "tensor 'a': data_offsets [0, 16) runs past the end of the data section (12 bytes)");
}

TEST_F(Safetensors, RejectsBytesAfterTheLastTensor) {
  const std::string header = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
  EXPECT_MENTIONS(open_error(raw_file(header, 9)), "bytes [8, 9) belong to no tensor");
  EXPECT_MENTIONS(open_error(raw_file("{}", 3)), "the data section has 3 bytes but the tensors cover only 0");
}

TEST_F(Safetensors, RejectsANegativeDimension) {
  const std::string header = "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,-3],\"data_offsets\":[0,0]}}";
  EXPECT_MENTIONS(open_error(raw_file(header, 0)), "tensor 'w' has a negative dimension -3 at shape[1]");
}

TEST_F(Safetensors, RejectsAnElementCountThatOverflows) {
  // 2^32 x 2^32 x 4 bytes wraps to 0 in 64 bits, which would match the empty byte range.
  const std::string header = "{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}";
  EXPECT_MENTIONS(open_error(raw_file(header, 0)), "tensor 'w': shape [4294967296, 4294967296] of F32 overflows");
  const std::string huge = "{\"w\":{\"dtype\":\"U8\",\"shape\":[9223372036854775808],\"data_offsets\":[0,0]}}";
  EXPECT_MENTIONS(open_error(raw_file(huge, 0)), "overflows 64 bits");
}

TEST_F(Safetensors, RejectsNonStringMetadata) {
  EXPECT_MENTIONS(open_error(raw_file("{\"__metadata__\":{\"step\":42}}", 0)),
                  "__metadata__ entry 'step' is an integer, not a string");
  EXPECT_MENTIONS(open_error(raw_file("{\"__metadata__\":[\"a\"]}", 0)), "__metadata__ is an array");
}

TEST_F(Safetensors, RejectsAnEmptyTensorName) {
  const std::string header = "{\"\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}";
  EXPECT_MENTIONS(open_error(raw_file(header, 1)), "a tensor has an empty name (header byte 1)");
}

TEST_F(Safetensors, RejectsOffsetsThatEndBeforeTheyBegin) {
  const std::string header = "{\"w\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[5,4]}}";
  EXPECT_MENTIONS(open_error(raw_file(header, 5)), "tensor 'w' has data_offsets [5, 4), which ends before it begins");
}

TEST_F(Safetensors, RejectsMalformedTensorEntries) {
  EXPECT_MENTIONS(open_error(raw_file("{\"w\":[]}", 0)), "tensor 'w' is an array, not an object");
  EXPECT_MENTIONS(open_error(raw_file("{\"w\":{\"shape\":[],\"data_offsets\":[0,1]}}", 1)),
                  "tensor 'w' has no 'dtype'");
  EXPECT_MENTIONS(
      open_error(raw_file("{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"extra\":1}}", 1)),
      "tensor 'w' has an unexpected field 'extra'");
  EXPECT_MENTIONS(open_error(raw_file("{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}", 1)),
                  "'data_offsets' is not a pair of non-negative integers");
  EXPECT_MENTIONS(open_error(raw_file("{\"w\":{\"dtype\":\"U8\",\"shape\":[\"1\"],\"data_offsets\":[0,1]}}", 1)),
                  "tensor 'w': shape[0] is a string");
}

TEST_F(Safetensors, RejectsDeepNestingAndLongArrays) {
  EXPECT_MENTIONS(open_error(raw_file("{\"__metadata__\":{\"a\":[[[[[[[[[]]]]]]]]]}}", 0)), "nesting deeper than 8");
  std::string ones = "1";
  for (int i = 0; i < 2000; ++i) ones += ",1";
  EXPECT_MENTIONS(open_error(raw_file("{\"w\":{\"dtype\":\"U8\",\"shape\":[" + ones + "],\"data_offsets\":[0,1]}}", 1)),
                  "array longer than 1024 items");
}

TEST_F(Safetensors, RejectsEveryTruncation) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const auto tensors = samples(rng);
  const fs::path path = dir_ / "whole.safetensors";
  alloy::write_safetensors(path, to_write(tensors), some_metadata);
  const auto bytes = read_all(path);
  const fs::path cut = dir_ / "cut.safetensors";
  for (std::size_t length = 0; length < bytes.size(); ++length) {
    std::ofstream(cut, std::ios::binary | std::ios::trunc)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(length));
    EXPECT_NE(open_error(cut), "no error") << "truncated to " << length << " of " << bytes.size() << " bytes";
  }
}

// Random corruption of the header: opening either succeeds, with every tensor readable, or
// throws alloy::error; never another exception, never a read outside the file.
TEST_F(Safetensors, CorruptedHeadersFailCleanly) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const auto tensors = samples(rng);
  const fs::path path = dir_ / "whole.safetensors";
  alloy::write_safetensors(path, to_write(tensors), some_metadata);
  const auto original = read_all(path);
  const fs::path mutated = dir_ / "mutated.safetensors";
  const char interesting[] = "{}[]\":,-0123456789 \\u";
  int opened = 0;
  for (int round = 0; round < 3000; ++round) {
    auto bytes = original;
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      const std::size_t at = rng() % (original.size() < 600 ? original.size() : 600);
      bytes[at] = rng() % 2 ? static_cast<std::byte>(rng() & 0xFF)
                            : static_cast<std::byte>(interesting[rng() % (sizeof(interesting) - 1)]);
    }
    std::ofstream(mutated, std::ios::binary | std::ios::trunc)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    try {
      const auto file = SafetensorsFile::open(mutated);
      ++opened;
      for (const auto& t : file.tensors()) {
        std::vector<std::byte> out(t.size);
        file.read(t.name, out);
      }
    } catch (const alloy::error&) {
    } catch (...) {
      ADD_FAILURE() << "a non-alloy exception in round " << round;
    }
  }
  EXPECT_GT(opened, 0);  // some edits (inside names or metadata) leave a valid file
}

}  // namespace

namespace {

// The file as bytes, one bit flipped at `at`, written to `to`.
void flip_bit(const fs::path& from, const fs::path& to, std::size_t at, int bit = 0) {
  auto bytes = read_all(from);
  bytes[at] ^= std::byte(1 << bit);
  std::ofstream(to, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

alloy::SafetensorsWriteOptions with_checksums() {
  alloy::SafetensorsWriteOptions o;
  o.checksums = true;
  o.chunk_bytes = 5;  // chunk sources in odd pieces
  return o;
}

TEST_F(Safetensors, ChecksumsAreWrittenPerTensorAndForTheMetadata) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const auto tensors = samples(rng);
  auto to = to_write(tensors);
  const std::vector<std::byte>& chunked = tensors[1].bytes;  // one tensor from a chunk source
  to[1].bytes = alloy::TensorChunkSource([&](std::size_t at, std::span<std::byte> chunk) {
    std::memcpy(chunk.data(), chunked.data() + at, chunk.size());
  });
  const fs::path path = dir_ / "sums.safetensors";
  alloy::write_safetensors(path, to, some_metadata, with_checksums());
  const auto file = SafetensorsFile::open(path);
  auto expected_metadata = some_metadata;
  expected_metadata["crc32c:__metadata__"] = alloy::detail::checksum_text(alloy::checksum_of_metadata(some_metadata));
  for (const auto& s : tensors) {
    expected_metadata["crc32c:" + s.name] = alloy::detail::checksum_text(alloy::crc32c(s.bytes));
    ASSERT_TRUE(file.tensor(s.name).crc32c.has_value());
    EXPECT_EQ(*file.tensor(s.name).crc32c, alloy::crc32c(s.bytes)) << s.name;
    std::vector<std::byte> back(s.bytes.size());
    file.read(s.name, back);
    EXPECT_EQ(back, s.bytes);
  }
  EXPECT_EQ(file.metadata(), expected_metadata);
  EXPECT_EQ(alloy::detail::checksum_text(0xE3069283u), "e3069283");
  // The same tensors without checksums: the data section is byte for byte the same.
  alloy::write_safetensors(dir_ / "plain.safetensors", to_write(tensors), some_metadata);
  const auto plain = SafetensorsFile::open(dir_ / "plain.safetensors");
  const auto a = read_all(path), b = read_all(dir_ / "plain.safetensors");
  EXPECT_TRUE(std::equal(a.begin() + static_cast<std::ptrdiff_t>(file.data_offset()), a.end(),
                         b.begin() + static_cast<std::ptrdiff_t>(plain.data_offset()), b.end()));
  EXPECT_FALSE(plain.tensor("head").crc32c.has_value());
}

TEST_F(Safetensors, AFlippedDataBitFailsItsTensorsChecksum) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const auto tensors = samples(rng);
  const fs::path path = dir_ / "sums.safetensors";
  alloy::write_safetensors(path, to_write(tensors), some_metadata, with_checksums());
  const auto good = SafetensorsFile::open(path);
  const auto& victim = good.tensor("encoder.weight");
  const std::size_t at = good.data_offset() + victim.offset + rng() % victim.size;
  flip_bit(path, dir_ / "flipped.safetensors", at, static_cast<int>(rng() % 8));
  const auto file = SafetensorsFile::open(dir_ / "flipped.safetensors");  // the header is intact
  std::vector<std::byte> out(victim.size);
  const std::string message = message_of([&] { file.read("encoder.weight", out); });
  EXPECT_MENTIONS(message, "tensor 'encoder.weight' fails its checksum");
  EXPECT_MENTIONS(message, "the file records " + alloy::detail::checksum_text(*victim.crc32c));
  EXPECT_MENTIONS(message_of([&] {
                    file.read_chunks(
                        "encoder.weight", [](std::size_t, auto) {}, 7);
                  }),
                  "tensor 'encoder.weight' fails its checksum");
  std::vector<std::byte> other(good.tensor("head").size);
  file.read("head", other);  // the other tensors read as before
}

TEST_F(Safetensors, DamagedMetadataFailsItsChecksum) {
  const fs::path path = dir_ / "sums.safetensors";
  const std::vector<std::byte> data(8, std::byte{1});
  alloy::write_safetensors(path, std::vector<TensorToWrite>{{"x", SafetensorsDtype::f32, {2}, data}},
                           {{"alloy.step", "1234"}}, with_checksums());
  const auto bytes = read_all(path);
  const std::string text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  const std::size_t digit = text.find("1234") + 3;  // "1234" -> "1235": valid JSON, a wrong count
  flip_bit(path, dir_ / "flipped.safetensors", digit, 0);
  EXPECT_MENTIONS(open_error(dir_ / "flipped.safetensors"), "the metadata fails its checksum");
}

TEST_F(Safetensors, RejectsMalformedOrOrphanChecksums) {
  EXPECT_MENTIONS(
      open_error(raw_file(
          R"({"__metadata__":{"crc32c:x":"E3069283"},"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1)),
      "metadata 'crc32c:x' = 'E3069283' is not a CRC-32C (8 lowercase hex digits)");
  EXPECT_MENTIONS(
      open_error(raw_file(
          R"({"__metadata__":{"crc32c:y":"e3069283"},"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1)),
      "metadata 'crc32c:y' is the checksum of a tensor the file does not hold");
  // A correct checksum written by hand is accepted: one byte 0x5a.
  const std::byte z{0x5a};
  const std::string crc = alloy::detail::checksum_text(alloy::crc32c(std::span(&z, 1)));
  const auto path = raw_file(
      R"({"__metadata__":{"crc32c:x":")" + crc + R"("},"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1);
  std::byte out{};
  SafetensorsFile::open(path).read("x", std::span(&out, 1));
  EXPECT_EQ(out, z);
}

TEST_F(Safetensors, AWriterWithChecksumsKeepsItsKeys) {
  EXPECT_MENTIONS(message_of([&] {
                    alloy::write_safetensors(dir_ / "x.safetensors", {}, {{"crc32c:x", "00000000"}}, with_checksums());
                  }),
                  "metadata key 'crc32c:x' is the writer's own");
  EXPECT_FALSE(fs::exists(dir_ / "x.safetensors"));
}

}  // namespace
