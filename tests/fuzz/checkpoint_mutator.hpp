// A mutation that keeps a checkpoint a well-formed safetensors file, so that inputs get past the
// header and reach what the loader checks about the values themselves, and what training does
// with the values it lets through: one metadata value set to an edge case (a counter at its
// limit, a sign, a space, an exponent) or removed, or one tensor element set to an edge value
// (zero, a denormal, the largest finite, an infinity, a NaN), a master element together with
// its compute copy's rounding so the pair stays consistent; one to three such edits at a time,
// with the file's checksums, if it has them, computed again.
// An input that is no safetensors file is replaced by a valid checkpoint first. libFuzzer's own
// byte-level mutations take the other half of the turns (checkpoint_fuzz.cpp).
#pragma once

#include "fuzz_support.hpp"

#include <alloy/io/safetensors.hpp>
#include <alloy/numeric/numeric.hpp>

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace alloy::fuzz {

inline constexpr std::array<const char*, 26> metadata_edges = {"0",
                                                               "1",
                                                               "2",
                                                               "2147483647",
                                                               "2147483648",
                                                               "4294967295",
                                                               "4294967296",
                                                               "18446744073709551615",
                                                               "18446744073709551616",
                                                               "-1",
                                                               "+1",
                                                               " 1",
                                                               "1 ",
                                                               "01",
                                                               "0x10",
                                                               "",
                                                               "1e3",
                                                               "0x1p-126",
                                                               "0x1p-149",
                                                               "0x1.fffffep+127",
                                                               "3.5e38",
                                                               "inf",
                                                               "nan",
                                                               "-0x1p+16",
                                                               "0x1p+24",
                                                               "alloy-checkpoint-1"};

inline constexpr std::array<std::uint32_t, 12> float_edges = {0x00000000u, 0x80000000u, 0x00000001u, 0x00800000u,
                                                              0x7f7fffffu, 0xff7fffffu, 0x7f800000u, 0xff800000u,
                                                              0x7fc00000u, 0x3f800000u, 0x4b800000u, 0x7effffffu};

inline constexpr std::array<std::uint16_t, 10> half_edges = {0x0000, 0x8000, 0x0001, 0x0400, 0x7bff,
                                                             0xfbff, 0x7c00, 0x7e00, 0x3c00, 0x3555};

template <class T>
void put(std::vector<std::byte>& bytes, std::size_t element, T value) {
  std::memcpy(bytes.data() + element * sizeof(T), &value, sizeof(T));
}

class CheckpointMutator {
 public:
  // `valid`: checkpoints to start from when the input is not a safetensors file.
  explicit CheckpointMutator(std::vector<std::vector<std::uint8_t>> valid) : valid_(std::move(valid)) {}

  // `data` (or, when it is no safetensors file or fails a checksum, one of the valid checkpoints)
  // with one to three values changed; nothing when there is nothing to change.
  std::optional<std::vector<std::uint8_t>> mutate(const std::uint8_t* data, std::size_t size, std::minstd_rand& rng) {
    std::optional<Parsed> parsed = parse(data, size);
    if (!parsed) {
      if (valid_.empty()) return std::nullopt;
      const auto& base = valid_[rng() % valid_.size()];
      parsed = parse(base.data(), base.size());
      if (!parsed) finding("a valid checkpoint the mutator starts from does not read");
    }
    // Checksums are set aside and, if the file had any, computed again after the edits, so the
    // edit is what the loader meets.
    std::map<std::string, std::string> metadata = parsed->file.metadata();
    SafetensorsWriteOptions options;
    options.checksums = std::erase_if(metadata, [](const auto& entry) {
                          return entry.first.starts_with(safetensors_checksum_prefix);
                        }) > 0;
    std::vector<std::vector<std::byte>>& contents = parsed->contents;
    const auto tensors = parsed->file.tensors();
    for (int edits = 1 + static_cast<int>(rng() % 3); edits > 0; --edits) {
      if (!edit(metadata, tensors, contents, rng)) return std::nullopt;
    }

    std::vector<TensorToWrite> rewrite;
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      rewrite.push_back({tensors[i].name, tensors[i].dtype, tensors[i].shape, std::span<const std::byte>(contents[i])});
    }
    const auto path = scratch_ / "mutated.safetensors";
    try {
      write_safetensors(path, rewrite, metadata, options);
    } catch (const alloy::error&) {
      return std::nullopt;
    }
    return file_bytes(path);
  }

 private:
  struct Parsed {
    SafetensorsFile file;
    std::vector<std::vector<std::byte>> contents;  // each tensor's bytes, in file order
  };

  // The file and its tensors' bytes, or nothing when it is no safetensors file or a tensor fails
  // its checksum.
  std::optional<Parsed> parse(const std::uint8_t* data, std::size_t size) {
    try {
      Parsed p{SafetensorsFile::open(input_.hold(data, size)), {}};
      for (const StoredTensor& t : p.file.tensors()) {
        p.contents.emplace_back(static_cast<std::size_t>(t.size));
        p.file.read(t.name, p.contents.back());
      }
      return p;
    } catch (const alloy::error&) {
      return std::nullopt;
    }
  }

  // One metadata value set to an edge case or removed, or one tensor element set to an edge value.
  static bool edit(std::map<std::string, std::string>& metadata, std::span<const StoredTensor> tensors,
                   std::vector<std::vector<std::byte>>& contents, std::minstd_rand& rng) {
    const bool change_metadata = !metadata.empty() && (tensors.empty() || rng() % 2 == 0);
    if (change_metadata) {
      auto it = std::next(metadata.begin(), static_cast<std::ptrdiff_t>(rng() % metadata.size()));
      if (rng() % 8 == 0) {
        metadata.erase(it);
      } else {
        it->second = metadata_edges[rng() % metadata_edges.size()];
      }
    } else {
      if (tensors.empty()) return false;
      const std::size_t i = rng() % tensors.size();
      const StoredTensor& t = tensors[i];
      const std::uint64_t n = t.numel();
      if (n == 0) return false;
      const auto element = static_cast<std::size_t>(rng() % n);
      const std::uint32_t edge = float_edges[rng() % float_edges.size()];
      set_element(contents[i], t.dtype, element, edge, rng);
      // A master element moves its compute copy along: the rounding the loader expects.
      constexpr std::string_view master = "alloy/master/";
      if (t.name.starts_with(master) && rng() % 4 != 0) {
        for (std::size_t j = 0; j < tensors.size(); ++j) {
          if (tensors[j].name == t.name.substr(master.size())) {
            const float v = std::bit_cast<float>(edge);
            if (tensors[j].dtype == SafetensorsDtype::bf16) put(contents[j], element, round_nearest<bf16>(v));
            if (tensors[j].dtype == SafetensorsDtype::f16) put(contents[j], element, round_nearest<fp16>(v));
          }
        }
      }
    }
    return true;
  }

  static void set_element(std::vector<std::byte>& bytes, SafetensorsDtype dtype, std::size_t element,
                          std::uint32_t float_bits, std::minstd_rand& rng) {
    switch (element_size(dtype)) {
      case 4:
        put(bytes, element, float_bits);
        break;
      case 2:
        put(bytes, element,
            dtype == SafetensorsDtype::bf16 ? static_cast<std::uint16_t>(float_bits >> 16)
                                            : half_edges[rng() % half_edges.size()]);
        break;
      case 1:
        put(bytes, element, static_cast<std::uint8_t>(rng()));
        break;
      default:
        put(bytes, element, std::uint64_t(rng()) << 32 | rng());
    }
  }

  std::vector<std::vector<std::uint8_t>> valid_;
  InputFile input_;
  ScratchDirectory scratch_;
};

}  // namespace alloy::fuzz
