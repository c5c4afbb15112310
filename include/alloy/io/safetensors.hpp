// Reading and writing safetensors files (https://github.com/huggingface/safetensors): an 8-byte
// little-endian header length N, N bytes of JSON naming each tensor's dtype, shape and byte
// range, then the data section. Files stay readable by PyTorch and Hugging Face tools.
//
// The writer streams tensor bytes from the caller's memory or from a callback that fills one
// chunk at a time (a copy from the GPU in pieces), so no whole-file buffer ever exists. The
// reader trusts no length it reads: it checks what safetensors checks before handing out a
// single tensor, and reads tensors with pread at their offsets rather than mapping the file.
//
// Checksums (SafetensorsWriteOptions::checksums): the metadata gets "crc32c:<tensor>" for each
// tensor, the CRC-32C of its bytes as 8 lowercase hex digits, computed as the bytes are written
// (the header is written with placeholders first and rewritten in place once the data is out),
// and "crc32c:__metadata__", the CRC-32C of every other metadata entry (checksum_of_metadata).
// The reader checks the metadata's at open and each tensor's as it reads it, whenever the file
// has them; readers that ignore metadata (safetensors.torch.load_file) load the file as before.
#pragma once

#include <alloy/error.hpp>
#include <alloy/io/atomic_file.hpp>
#include <alloy/io/crc32c.hpp>
#include <alloy/io/detail/json.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace alloy {

// The element types a safetensors file can name, each a whole number of bytes.
enum class SafetensorsDtype : std::uint8_t {
  boolean,
  u8,
  i8,
  f8_e5m2,
  f8_e4m3,
  i16,
  u16,
  f16,
  bf16,
  i32,
  u32,
  f32,
  i64,
  u64,
  f64,
};

namespace detail {

struct SafetensorsDtypeInfo {
  SafetensorsDtype dtype;
  std::string_view name;  // as the header spells it
  std::size_t size;       // bytes per element
};

inline constexpr std::array<SafetensorsDtypeInfo, 15> safetensors_dtypes{{
    {SafetensorsDtype::boolean, "BOOL", 1},
    {SafetensorsDtype::u8, "U8", 1},
    {SafetensorsDtype::i8, "I8", 1},
    {SafetensorsDtype::f8_e5m2, "F8_E5M2", 1},
    {SafetensorsDtype::f8_e4m3, "F8_E4M3", 1},
    {SafetensorsDtype::i16, "I16", 2},
    {SafetensorsDtype::u16, "U16", 2},
    {SafetensorsDtype::f16, "F16", 2},
    {SafetensorsDtype::bf16, "BF16", 2},
    {SafetensorsDtype::i32, "I32", 4},
    {SafetensorsDtype::u32, "U32", 4},
    {SafetensorsDtype::f32, "F32", 4},
    {SafetensorsDtype::i64, "I64", 8},
    {SafetensorsDtype::u64, "U64", 8},
    {SafetensorsDtype::f64, "F64", 8},
}};

}  // namespace detail

// "F32", "BF16", ...: the dtype's name in a safetensors header.
constexpr std::string_view safetensors_name(SafetensorsDtype dtype) {
  return detail::safetensors_dtypes[static_cast<std::size_t>(dtype)].name;
}

constexpr std::size_t element_size(SafetensorsDtype dtype) {
  return detail::safetensors_dtypes[static_cast<std::size_t>(dtype)].size;
}

constexpr std::optional<SafetensorsDtype> safetensors_dtype_named(std::string_view name) {
  for (const auto& info : detail::safetensors_dtypes) {
    if (info.name == name) return info.dtype;
  }
  return std::nullopt;
}

// The largest header a reader accepts (safetensors' own limit): beyond it a file is refused
// before any allocation.
inline constexpr std::uint64_t safetensors_max_header_bytes = 100'000'000;

inline constexpr std::size_t safetensors_default_chunk_bytes = std::size_t(16) << 20;

namespace detail {
// Reads and writes of host memory go in pieces of this size, each summed while in cache.
inline constexpr std::size_t checksum_piece_bytes = std::size_t(4) << 20;
}  // namespace detail

// Metadata keys "crc32c:<tensor name>" hold a tensor's CRC-32C; "crc32c:__metadata__" holds the
// metadata's ("__metadata__" is no tensor name).
inline constexpr std::string_view safetensors_checksum_prefix = "crc32c:";
inline constexpr std::string_view safetensors_metadata_checksum_key = "crc32c:__metadata__";

// Fills `chunk` with bytes [offset, offset + chunk.size()) of one tensor's data.
using TensorChunkSource = std::function<void(std::size_t offset, std::span<std::byte> chunk)>;

// Receives bytes [offset, offset + chunk.size()) of one tensor's data.
using TensorChunkSink = std::function<void(std::size_t offset, std::span<const std::byte> chunk)>;

// One tensor to save: its bytes either lie in host memory, written straight from there, or
// come from a callback asked for one chunk at a time.
struct TensorToWrite {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::f32;
  std::vector<std::int64_t> shape;  // {} is a scalar
  std::variant<std::span<const std::byte>, TensorChunkSource> bytes;
};

struct SafetensorsWriteOptions {
  // Chunk size for tensors given as a TensorChunkSource.
  std::size_t chunk_bytes = safetensors_default_chunk_bytes;
  // When not empty, chunks are filled here instead of in a buffer the writer allocates, e.g.
  // pinned host memory the caller's GPU copies can target.
  std::span<std::byte> chunk_buffer;
  // Store the CRC-32C of each tensor and of the metadata in the metadata (see the top of this
  // file); metadata keys starting "crc32c:" are then the writer's own.
  bool checksums = false;
};

// A tensor as a safetensors file stores it.
struct StoredTensor {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::f32;
  std::vector<std::int64_t> shape;
  std::uint64_t offset = 0;             // from the start of the data section
  std::uint64_t size = 0;               // bytes
  std::optional<std::uint32_t> crc32c;  // from the metadata, when the file has it

  std::uint64_t numel() const { return size / element_size(dtype); }
};

namespace detail {

// numel x element size, or nothing when it does not fit in 64 bits.
inline std::optional<std::uint64_t> checked_tensor_bytes(std::span<const std::int64_t> shape, SafetensorsDtype dtype) {
  std::uint64_t bytes = element_size(dtype);
  for (const std::int64_t d : shape) {
    const auto dim = static_cast<std::uint64_t>(d);
    if (dim != 0 && bytes > std::numeric_limits<std::uint64_t>::max() / dim) return std::nullopt;
    bytes *= dim;
  }
  return bytes;
}

inline std::string shape_text(std::span<const std::int64_t> shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

inline std::string quoted_name(std::string_view name) {
  std::string out = "'";  // built by appends: GCC 12 warns falsely on "'" + std::string&&
  out += json::printable(name);
  out += '\'';
  return out;
}

inline std::string byte_range(std::uint64_t begin, std::uint64_t end) {
  // Appended, not "[" + std::to_string(...): g++ 12 inlines that insert at the front and warns
  // -Wrestrict about it (a false positive, GCC bug 105329) in some translation units.
  std::string out = "[";
  out += std::to_string(begin);
  out += ", ";
  out += std::to_string(end);
  out += ')';
  return out;
}

inline std::array<std::byte, 8> little_endian(std::uint64_t value) {
  std::array<std::byte, 8> out{};
  for (std::size_t i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((value >> (8 * i)) & 0xFF);
  return out;
}

inline std::uint64_t from_little_endian(std::span<const std::byte, 8> bytes) {
  std::uint64_t value = 0;
  for (std::size_t i = 0; i < 8; ++i) value |= std::to_integer<std::uint64_t>(bytes[i]) << (8 * i);
  return value;
}

inline bool is_checksum_key(std::string_view key) { return key.starts_with(safetensors_checksum_prefix); }

// 8 lowercase hex digits, always: the writer's placeholders and final values have one length.
inline std::string checksum_text(std::uint32_t crc) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out(8, '0');
  for (int i = 7; i >= 0; --i, crc >>= 4) out[static_cast<std::size_t>(i)] = digits[crc & 0xF];
  return out;
}

inline std::optional<std::uint32_t> parse_checksum(std::string_view text) {
  if (text.size() != 8) return std::nullopt;
  std::uint32_t crc = 0;
  for (const char ch : text) {
    const int digit = ch >= '0' && ch <= '9' ? ch - '0' : (ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1);
    if (digit < 0) return std::nullopt;
    crc = crc << 4 | static_cast<std::uint32_t>(digit);
  }
  return crc;
}

}  // namespace detail

// The CRC-32C of the metadata entries other than checksums ("crc32c:..."), in key order, each
// as its key's length (8 bytes, little-endian), the key, its value's length, the value.
template <class = void>
std::uint32_t checksum_of_metadata(const std::map<std::string, std::string>& metadata) {
  std::uint32_t crc = 0;
  for (const auto& [key, value] : metadata) {
    if (detail::is_checksum_key(key)) continue;
    for (const std::string* s : {&key, &value}) {
      crc = crc32c(detail::little_endian(s->size()), crc);
      crc = crc32c(std::as_bytes(std::span(*s)), crc);
    }
  }
  return crc;
}

namespace detail {

// The header JSON, padded with spaces to a multiple of 8 bytes so the data section starts
// 8-byte aligned; tensors in the order given, back to back. Checks the writer's input.
template <class = void>
std::string safetensors_header(std::span<const TensorToWrite> tensors,
                               const std::map<std::string, std::string>& metadata, std::vector<std::uint64_t>& sizes) {
  const std::string where = "write_safetensors: ";
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [key, value] : metadata) {
      if (!json::is_valid_utf8(key) || !json::is_valid_utf8(value)) {
        throw error(where + "metadata entry " + quoted_name(key) + " is not valid UTF-8");
      }
      if (!first) header += ',';
      first = false;
      json::append_string(header, key);
      header += ':';
      json::append_string(header, value);
    }
    header += "},";
  }
  std::set<std::string_view> names;
  std::uint64_t offset = 0;
  sizes.clear();
  for (const TensorToWrite& t : tensors) {
    const std::string name = quoted_name(t.name);
    if (t.name.empty()) throw error(where + "a tensor needs a name");
    if (t.name == "__metadata__") throw error(where + "'__metadata__' is reserved, not a tensor name");
    if (!json::is_valid_utf8(t.name)) throw error(where + "tensor name " + name + " is not valid UTF-8");
    if (!names.insert(t.name).second) throw error(where + "tensor " + name + " is given twice");
    if (static_cast<std::size_t>(t.dtype) >= safetensors_dtypes.size()) {
      throw error(where + "tensor " + name + " has an unknown dtype");
    }
    for (const std::int64_t d : t.shape) {
      if (d < 0) throw error(where + "tensor " + name + " has a negative dimension in " + shape_text(t.shape));
    }
    const auto bytes = checked_tensor_bytes(t.shape, t.dtype);
    if (!bytes || *bytes > std::numeric_limits<std::uint64_t>::max() - offset) {
      throw error(where + "tensor " + name + " of shape " + shape_text(t.shape) + " is too large");
    }
    if (const auto* span = std::get_if<std::span<const std::byte>>(&t.bytes); span && span->size() != *bytes) {
      throw error(where + "tensor " + name + " of shape " + shape_text(t.shape) + " and dtype " +
                  std::string(safetensors_name(t.dtype)) + " needs " + std::to_string(*bytes) + " bytes, got " +
                  std::to_string(span->size()));
    }
    if (const auto* source = std::get_if<TensorChunkSource>(&t.bytes); source && !*source) {
      throw error(where + "tensor " + name + " has an empty chunk source");
    }
    json::append_string(header, t.name);
    header += ":{\"dtype\":\"";
    header += safetensors_name(t.dtype);
    header += "\",\"shape\":[";
    for (std::size_t i = 0; i < t.shape.size(); ++i) {
      if (i) header += ',';
      header += std::to_string(t.shape[i]);
    }
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + *bytes) + "]},";
    offset += *bytes;
    sizes.push_back(*bytes);
  }
  if (header.size() > 1) header.pop_back();  // the last ','
  header += '}';
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > safetensors_max_header_bytes) {
    throw error(where + "the header would be " + std::to_string(header.size()) + " bytes, more than the " +
                std::to_string(safetensors_max_header_bytes) + " readers accept");
  }
  return header;
}

}  // namespace detail

// Writes `tensors` and `metadata` to `path` as a safetensors file, atomically (see
// write_file_atomically). Tensors appear in the header and the data section in the order
// given, without gaps: to keep every tensor aligned to its element size, put wider dtypes
// first. A chunk source is called with consecutive offsets, in order, each chunk full but the
// last. Exceptions from a chunk source pass through and leave `path` as it was.
template <class = void>
void write_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata = {},
                       const SafetensorsWriteOptions& options = {}) {
  std::map<std::string, std::string> with_checksums;
  if (options.checksums) {
    with_checksums = metadata;
    for (const auto& [key, value] : metadata) {
      if (detail::is_checksum_key(key)) {
        throw error("write_safetensors: metadata key " + detail::quoted_name(key) +
                    " is the writer's own when it writes checksums");
      }
    }
    with_checksums.emplace(safetensors_metadata_checksum_key, detail::checksum_text(checksum_of_metadata(metadata)));
    for (const TensorToWrite& t : tensors) {
      with_checksums[std::string(safetensors_checksum_prefix) + t.name] = detail::checksum_text(0);  // placeholder
    }
  }
  std::vector<std::uint64_t> sizes;
  const std::string header = detail::safetensors_header(tensors, options.checksums ? with_checksums : metadata, sizes);

  std::uint64_t largest_chunked = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    if (std::holds_alternative<TensorChunkSource>(tensors[i].bytes)) {
      largest_chunked = std::max(largest_chunked, sizes[i]);
    }
  }
  if (largest_chunked > 0 && options.chunk_buffer.empty() && options.chunk_bytes == 0) {
    throw error("write_safetensors: chunk_bytes is 0 and no chunk_buffer is given");
  }

  write_file_atomically(path, [&](FileWriter& out) {
    out.write(detail::little_endian(header.size()));
    out.write(std::as_bytes(std::span(header)));
    std::vector<std::byte> owned;
    std::span<std::byte> buffer = options.chunk_buffer;
    if (buffer.empty() && largest_chunked > 0) {
      owned.resize(static_cast<std::size_t>(std::min<std::uint64_t>(largest_chunked, options.chunk_bytes)));
      buffer = owned;
    }
    // Each piece is summed just before it is written, while it is still in cache.
    std::uint32_t crc = 0;
    auto write = [&](std::span<const std::byte> piece) {
      if (options.checksums) crc = crc32c(piece, crc);
      out.write(piece);
    };
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      crc = 0;
      if (const auto* span = std::get_if<std::span<const std::byte>>(&tensors[i].bytes)) {
        for (std::size_t offset = 0; offset < span->size(); offset += detail::checksum_piece_bytes) {
          write(span->subspan(offset, std::min(detail::checksum_piece_bytes, span->size() - offset)));
        }
      } else {
        const auto& source = std::get<TensorChunkSource>(tensors[i].bytes);
        const auto size = static_cast<std::size_t>(sizes[i]);
        for (std::size_t offset = 0; offset < size;) {
          const auto chunk = buffer.first(std::min(buffer.size(), size - offset));
          source(offset, chunk);
          write(chunk);
          offset += chunk.size();
        }
      }
      if (options.checksums) {
        with_checksums[std::string(safetensors_checksum_prefix) + tensors[i].name] = detail::checksum_text(crc);
      }
    }
    if (options.checksums) {
      const std::string final_header = detail::safetensors_header(tensors, with_checksums, sizes);
      if (final_header.size() != header.size()) {
        throw error("write_safetensors: '" + path.string() + "': the header with checksums is " +
                    std::to_string(final_header.size()) + " bytes, its placeholder " + std::to_string(header.size()));
      }
      out.write_at(8, std::as_bytes(std::span(final_header)));
    }
  });
}

// An open safetensors file whose header has been validated (SafetensorsFile, below: a class
// template only so that its members are compiled where they are used, not in every file that
// includes this header). Reads are const and use pread on
// one descriptor, so threads may read different tensors at once.
template <class Unused = void>
class BasicSafetensorsFile {
 public:
  // Opens and validates `path`; throws alloy::error saying what is wrong and where.
  static BasicSafetensorsFile open(const std::filesystem::path& path) {
    BasicSafetensorsFile file;
    file.path_ = path;
    file.load();
    return file;
  }

  BasicSafetensorsFile(BasicSafetensorsFile&& other) noexcept { swap(other); }
  BasicSafetensorsFile& operator=(BasicSafetensorsFile&& other) noexcept {
    BasicSafetensorsFile moved(std::move(other));
    swap(moved);
    return *this;
  }
  BasicSafetensorsFile(const BasicSafetensorsFile&) = delete;
  BasicSafetensorsFile& operator=(const BasicSafetensorsFile&) = delete;
  ~BasicSafetensorsFile() {
    if (fd_ >= 0) ::close(fd_);
  }

  const std::filesystem::path& path() const noexcept { return path_; }

  // Every tensor, in file order (by offset).
  std::span<const StoredTensor> tensors() const noexcept { return tensors_; }

  // nullptr when the file has no tensor of that name.
  const StoredTensor* find(std::string_view name) const {
    const auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : &tensors_[it->second];
  }

  // Throws alloy::error naming the file when there is no tensor of that name.
  const StoredTensor& tensor(std::string_view name) const {
    if (const StoredTensor* t = find(name)) return *t;
    throw error("SafetensorsFile: '" + path_.string() + "' has no tensor " + detail::quoted_name(name));
  }

  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }

  // Where the data section starts in the file.
  std::uint64_t data_offset() const noexcept { return data_offset_; }

  // Reads a whole tensor; `out` must be exactly its size. When the file holds the tensor's
  // checksum, throws alloy::error naming the tensor if the bytes read do not match it (`out`
  // then holds them, damaged).
  void read(std::string_view name, std::span<std::byte> out) const {
    const StoredTensor& t = tensor(name);
    if (out.size() != t.size) {
      throw error("SafetensorsFile::read: '" + path_.string() + "': tensor " + detail::quoted_name(name) + " has " +
                  std::to_string(t.size) + " bytes, the destination " + std::to_string(out.size()));
    }
    std::uint32_t crc = 0;
    for (std::size_t offset = 0; offset < out.size(); offset += detail::checksum_piece_bytes) {
      const auto piece = out.subspan(offset, std::min(detail::checksum_piece_bytes, out.size() - offset));
      read_at(data_offset_ + t.offset + offset, piece, "tensor " + detail::quoted_name(t.name));
      if (t.crc32c) crc = crc32c(piece, crc);
    }
    check_checksum(t, crc);
  }

  // Reads a tensor chunk by chunk through `buffer` (pinned memory, say), handing each chunk to
  // `consume` in order. A checksum is checked after the last chunk: a caller that must not act
  // on damaged bytes keeps what it consumed aside until the call returns.
  void read_chunks(std::string_view name, std::span<std::byte> buffer, const TensorChunkSink& consume) const {
    const StoredTensor& t = tensor(name);
    if (buffer.empty() && t.size > 0) {
      throw error("SafetensorsFile::read_chunks: '" + path_.string() + "': the chunk buffer is empty");
    }
    std::uint32_t crc = 0;
    for (std::uint64_t offset = 0; offset < t.size;) {
      const auto chunk =
          buffer.first(static_cast<std::size_t>(std::min<std::uint64_t>(buffer.size(), t.size - offset)));
      read_at(data_offset_ + t.offset + offset, chunk, "tensor " + detail::quoted_name(t.name));
      if (t.crc32c) crc = crc32c(chunk, crc);
      consume(static_cast<std::size_t>(offset), chunk);
      offset += chunk.size();
    }
    check_checksum(t, crc);
  }

  // As above, through a buffer of up to `chunk_bytes` that this call allocates.
  void read_chunks(std::string_view name, const TensorChunkSink& consume,
                   std::size_t chunk_bytes = safetensors_default_chunk_bytes) const {
    const StoredTensor& t = tensor(name);
    std::vector<std::byte> buffer(static_cast<std::size_t>(std::min<std::uint64_t>(t.size, chunk_bytes)));
    read_chunks(name, buffer, consume);
  }

 private:
  BasicSafetensorsFile() = default;

  void swap(BasicSafetensorsFile& other) noexcept {
    std::swap(path_, other.path_);
    std::swap(fd_, other.fd_);
    std::swap(tensors_, other.tensors_);
    std::swap(by_name_, other.by_name_);
    std::swap(metadata_, other.metadata_);
    std::swap(data_offset_, other.data_offset_);
    std::swap(data_size_, other.data_size_);
  }

  [[noreturn]] void invalid(const std::string& what) const {
    throw error("SafetensorsFile::open: '" + path_.string() + "': " + what);
  }

  void check_checksum(const StoredTensor& t, std::uint32_t crc) const {
    if (t.crc32c && *t.crc32c != crc) {
      throw error("SafetensorsFile: '" + path_.string() + "': tensor " + detail::quoted_name(t.name) +
                  " fails its checksum: its bytes have CRC-32C " + detail::checksum_text(crc) + ", the file records " +
                  detail::checksum_text(*t.crc32c) + " (the file is damaged)");
    }
  }

  // The metadata's checksum is checked now; each tensor's is kept for its reads.
  void take_checksums() {
    for (const auto& [key, value] : metadata_) {
      if (!detail::is_checksum_key(key)) continue;
      const auto crc = detail::parse_checksum(value);
      if (!crc) {
        invalid("metadata " + detail::quoted_name(key) + " = " + detail::quoted_name(value) +
                " is not a CRC-32C (8 lowercase hex digits)");
      }
      if (key == safetensors_metadata_checksum_key) {
        if (const std::uint32_t actual = checksum_of_metadata(metadata_); actual != *crc) {
          invalid("the metadata fails its checksum: its entries have CRC-32C " + detail::checksum_text(actual) +
                  ", the file records " + value + " (the header is damaged)");
        }
        continue;
      }
      const std::string_view name = std::string_view(key).substr(safetensors_checksum_prefix.size());
      const auto it = by_name_.find(name);
      if (it == by_name_.end()) {
        invalid("metadata " + detail::quoted_name(key) + " is the checksum of a tensor the file does not hold");
      }
      tensors_[it->second].crc32c = *crc;
    }
  }

  // Fills `out` from `file_offset`; the file may have shrunk since it was validated.
  void read_at(std::uint64_t file_offset, std::span<std::byte> out, const std::string& what) const {
    while (!out.empty()) {
      const ::ssize_t n = ::pread(fd_, out.data(), out.size(), static_cast<::off_t>(file_offset));
      if (n < 0) {
        if (errno == EINTR) continue;
        throw error("SafetensorsFile: '" + path_.string() + "': reading " + what + " at byte " +
                    std::to_string(file_offset) + " failed: " + detail::errno_text(errno));
      }
      if (n == 0) {
        throw error("SafetensorsFile: '" + path_.string() + "': the file ends at byte " + std::to_string(file_offset) +
                    ", inside " + what + " (truncated after it was opened?)");
      }
      out = out.subspan(static_cast<std::size_t>(n));
      file_offset += static_cast<std::uint64_t>(n);
    }
  }

  void load() {
    // O_NONBLOCK: opening a FIFO (or a device) for reading would otherwise wait for a writer,
    // forever, before fstat could say it is no regular file. Regular files ignore the flag.
    do {
      fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    } while (fd_ < 0 && errno == EINTR);
    if (fd_ < 0) invalid("cannot open: " + detail::errno_text(errno));
    struct stat info {};
    if (::fstat(fd_, &info) != 0) invalid("fstat failed: " + detail::errno_text(errno));
    if (!S_ISREG(info.st_mode)) {
      invalid(S_ISFIFO(info.st_mode)  ? "a named pipe (FIFO), not a regular file"
              : S_ISDIR(info.st_mode) ? "a directory, not a regular file"
                                      : "not a regular file");
    }
    const auto file_size = static_cast<std::uint64_t>(info.st_size);

    if (file_size < 8) {
      invalid("the file is " + std::to_string(file_size) + " bytes, too short for the 8-byte header length");
    }
    std::array<std::byte, 8> length_bytes{};
    read_at(0, length_bytes, "the header length");
    const std::uint64_t header_size = detail::from_little_endian(length_bytes);
    if (header_size > safetensors_max_header_bytes) {
      invalid("header length " + std::to_string(header_size) + " exceeds the limit of " +
              std::to_string(safetensors_max_header_bytes) + " bytes");
    }
    if (header_size > file_size - 8) {
      invalid("header length " + std::to_string(header_size) + " runs past the end of the file (" +
              std::to_string(file_size) + " bytes)");
    }
    std::string header(static_cast<std::size_t>(header_size), '\0');
    read_at(8, std::as_writable_bytes(std::span(header)), "the header");
    data_offset_ = 8 + header_size;
    data_size_ = file_size - data_offset_;

    try {
      detail::json::parse_root_members(header, [&](detail::json::Member&& m) { add_entry(std::move(m)); });
    } catch (const detail::json::ParseError& e) {
      invalid("the header is not valid JSON: " + e.reason() + " at header byte " + std::to_string(e.offset()));
    }
    check_tiling();
    for (std::size_t i = 0; i < tensors_.size(); ++i) by_name_.emplace(tensors_[i].name, i);
    take_checksums();
  }

  void add_entry(detail::json::Member&& m) {
    using Kind = detail::json::Value::Kind;
    if (m.key == "__metadata__") {
      if (m.value.kind != Kind::object) {
        invalid("__metadata__ is " + std::string(detail::json::kind_name(m.value.kind)) + ", not an object of strings");
      }
      for (auto& entry : m.value.members) {
        if (entry.value.kind != Kind::string) {
          invalid("__metadata__ entry " + detail::quoted_name(entry.key) + " is " +
                  detail::json::kind_name(entry.value.kind) + ", not a string");
        }
        metadata_.emplace(std::move(entry.key), std::move(entry.value.string));
      }
      return;
    }
    if (m.key.empty()) invalid("a tensor has an empty name (header byte " + std::to_string(m.key_offset) + ")");
    const std::string name = "tensor " + detail::quoted_name(m.key);
    if (m.value.kind != Kind::object) {
      invalid(name + " is " + detail::json::kind_name(m.value.kind) + ", not an object");
    }
    const detail::json::Value* dtype = nullptr;
    const detail::json::Value* shape = nullptr;
    const detail::json::Value* offsets = nullptr;
    for (const auto& field : m.value.members) {
      if (field.key == "dtype") {
        dtype = &field.value;
      } else if (field.key == "shape") {
        shape = &field.value;
      } else if (field.key == "data_offsets") {
        offsets = &field.value;
      } else {
        invalid(name + " has an unexpected field " + detail::quoted_name(field.key));
      }
    }
    if (!dtype) invalid(name + " has no 'dtype'");
    if (!shape) invalid(name + " has no 'shape'");
    if (!offsets) invalid(name + " has no 'data_offsets'");

    StoredTensor t;
    if (dtype->kind != Kind::string) invalid(name + ": 'dtype' is " + detail::json::kind_name(dtype->kind));
    const auto known = safetensors_dtype_named(dtype->string);
    if (!known) invalid(name + " has unknown dtype " + detail::quoted_name(dtype->string));
    t.dtype = *known;

    if (shape->kind != Kind::array) invalid(name + ": 'shape' is " + detail::json::kind_name(shape->kind));
    for (std::size_t i = 0; i < shape->items.size(); ++i) {
      const auto& d = shape->items[i];
      const std::string at = "shape[" + std::to_string(i) + "]";
      if (d.kind != Kind::integer) invalid(name + ": " + at + " is " + detail::json::kind_name(d.kind));
      if (d.integer.negative) {
        invalid(name + " has a negative dimension -" + std::to_string(d.integer.magnitude) + " at " + at);
      }
      if (d.integer.magnitude > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        invalid(name + ": dimension " + std::to_string(d.integer.magnitude) + " at " + at + " overflows 64 bits");
      }
      t.shape.push_back(static_cast<std::int64_t>(d.integer.magnitude));
    }

    if (offsets->kind != Kind::array || offsets->items.size() != 2 || offsets->items[0].kind != Kind::integer ||
        offsets->items[1].kind != Kind::integer || offsets->items[0].integer.negative ||
        offsets->items[1].integer.negative) {
      invalid(name + ": 'data_offsets' is not a pair of non-negative integers");
    }
    const std::uint64_t begin = offsets->items[0].integer.magnitude;
    const std::uint64_t end = offsets->items[1].integer.magnitude;
    const std::string range = "data_offsets " + detail::byte_range(begin, end);
    if (end < begin) invalid(name + " has " + range + ", which ends before it begins");

    const auto bytes = detail::checked_tensor_bytes(t.shape, t.dtype);
    const std::string described =
        "shape " + detail::shape_text(t.shape) + " of " + std::string(safetensors_name(t.dtype));
    if (!bytes) invalid(name + ": " + described + " overflows a 64-bit byte count");
    if (*bytes != end - begin) {
      invalid(name + ": " + described + " needs " + std::to_string(*bytes) + " bytes but " + range + " hold " +
              std::to_string(end - begin));
    }
    if (end > data_size_) {
      invalid(name + ": " + range + " runs past the end of the data section (" + std::to_string(data_size_) +
              " bytes)");
    }
    t.offset = begin;
    t.size = end - begin;
    t.name = std::move(m.key);
    tensors_.push_back(std::move(t));
  }

  // Tensors must cover the data section exactly: no gaps, no overlaps, nothing after the last.
  void check_tiling() {
    std::sort(tensors_.begin(), tensors_.end(), [](const StoredTensor& a, const StoredTensor& b) {
      return std::pair(a.offset, a.size) < std::pair(b.offset, b.size);
    });
    std::uint64_t covered = 0;
    const StoredTensor* previous = nullptr;
    for (const StoredTensor& t : tensors_) {
      const std::string range = detail::byte_range(t.offset, t.offset + t.size);
      if (t.offset > covered) {
        invalid("gap in the data section: bytes " + detail::byte_range(covered, t.offset) +
                " belong to no tensor (next is tensor " + detail::quoted_name(t.name) + " at " + range + ")");
      }
      if (t.offset < covered) {
        invalid("tensor " + detail::quoted_name(t.name) + " at " + range + " overlaps tensor " +
                detail::quoted_name(previous->name) + " at " +
                detail::byte_range(previous->offset, previous->offset + previous->size));
      }
      covered = t.offset + t.size;
      previous = &t;
    }
    if (covered != data_size_) {
      invalid("the data section has " + std::to_string(data_size_) + " bytes but the tensors cover only " +
              std::to_string(covered) + ": bytes " + detail::byte_range(covered, data_size_) + " belong to no tensor");
    }
  }

  std::filesystem::path path_;
  int fd_ = -1;
  std::vector<StoredTensor> tensors_;
  std::map<std::string, std::size_t, std::less<>> by_name_;
  std::map<std::string, std::string> metadata_;
  std::uint64_t data_offset_ = 0;
  std::uint64_t data_size_ = 0;
};

using SafetensorsFile = BasicSafetensorsFile<>;

}  // namespace alloy
