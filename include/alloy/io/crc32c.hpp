// CRC-32C (Castagnoli: polynomial 0x1EDC6F41, bits reflected 0x82F63B78, register and result
// inverted), as iSCSI, ext4 and the SSE4.2 crc32 instruction compute it:
// crc32c("123456789") = 0xE3069283. safetensors files carry it per tensor (io/safetensors.hpp).
//
// On x86-64 with SSE4.2 (checked once, at run time) the crc32 instruction runs three
// independent streams over three lanes of a block, and the lanes' CRCs are joined with a table
// of "append lane_bytes zeros", since one instruction's latency is three cycles and its
// throughput one per cycle. Elsewhere, a table eight bytes at a time (slicing-by-8).
// benchmarks/io/checksum_bench.cpp measures both.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define ALLOY_CRC32C_X86 1
#else
#define ALLOY_CRC32C_X86 0
#endif

namespace alloy {

namespace detail {

inline constexpr std::uint32_t crc32c_polynomial = 0x82F63B78u;  // reflected

// The hardware path's lane: blocks of three lanes run as three streams.
inline constexpr std::size_t crc32c_lane_bytes = 8192;

// table[k][b]: the register after byte b followed by k zero bytes, from a zero register.
inline constexpr std::array<std::array<std::uint32_t, 256>, 8> crc32c_tables = [] {
  std::array<std::array<std::uint32_t, 256>, 8> t{};
  for (std::uint32_t b = 0; b < 256; ++b) {
    std::uint32_t r = b;
    for (int bit = 0; bit < 8; ++bit) r = (r >> 1) ^ ((r & 1u) ? crc32c_polynomial : 0u);
    t[0][b] = r;
  }
  for (std::size_t k = 1; k < 8; ++k) {
    for (std::size_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFF];
  }
  return t;
}();

// The register (not inverted) after `n` bytes at `p`, from register `r`. The bytes are read as
// little-endian words, so this is the byte-at-a-time definition on any host.
inline std::uint32_t crc32c_portable(std::uint32_t r, const std::byte* p, std::size_t n) {
  const auto& t = crc32c_tables;
  auto byte = [&](std::size_t i) { return std::to_integer<std::uint32_t>(p[i]); };
  for (; n >= 8; p += 8, n -= 8) {
    const std::uint32_t lo = r ^ (byte(0) | byte(1) << 8 | byte(2) << 16 | byte(3) << 24);
    r = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^ t[3][byte(4)] ^
        t[2][byte(5)] ^ t[1][byte(6)] ^ t[0][byte(7)];
  }
  for (std::size_t i = 0; i < n; ++i) r = (r >> 8) ^ t[0][(r ^ byte(i)) & 0xFF];
  return r;
}

#if ALLOY_CRC32C_X86

inline bool crc32c_hardware_available() {
  static const bool available = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_SSE4_2) != 0;
  }();
  return available;
}

// Inline assembly rather than the _mm_crc32 intrinsics: no -msse4.2 or target attribute is
// needed, so every translation unit (nvcc's host pass too) compiles the same function.
inline std::uint64_t crc32c_word(std::uint64_t r, std::uint64_t word) {
  __asm__("crc32q %1, %0" : "+r"(r) : "rm"(word));
  return r;
}

inline std::uint32_t crc32c_byte(std::uint32_t r, std::uint8_t byte) {
  __asm__("crc32b %1, %0" : "+r"(r) : "rm"(byte));
  return r;
}

inline std::uint64_t load_word(const std::byte* p) {
  std::uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// Appending crc32c_lane_bytes zero bytes is linear in the register: one table per register byte.
inline const std::array<std::array<std::uint32_t, 256>, 4>& crc32c_lane_shift() {
  static const auto tables = [] {
    std::array<std::uint32_t, 32> basis{};
    for (int bit = 0; bit < 32; ++bit) {
      std::uint64_t r = std::uint64_t(1) << bit;
      for (std::size_t i = 0; i < crc32c_lane_bytes; i += 8) r = crc32c_word(r, 0);
      basis[bit] = static_cast<std::uint32_t>(r);
    }
    std::array<std::array<std::uint32_t, 256>, 4> t{};
    for (int k = 0; k < 4; ++k) {
      for (std::uint32_t v = 0; v < 256; ++v) {
        for (int bit = 0; bit < 8; ++bit) {
          if (v >> bit & 1u) t[k][v] ^= basis[8 * k + bit];
        }
      }
    }
    return t;
  }();
  return tables;
}

inline std::uint32_t crc32c_shift_lane(std::uint32_t r) {
  const auto& t = crc32c_lane_shift();
  return t[0][r & 0xFF] ^ t[1][(r >> 8) & 0xFF] ^ t[2][(r >> 16) & 0xFF] ^ t[3][r >> 24];
}

// As crc32c_portable, with the crc32 instruction. Three lanes A, B, C of one block: with
// Z(r) = r after crc32c_lane_bytes zeros, crc(r, ABC) = Z(Z(crc(r, A)) ^ crc(0, B)) ^ crc(0, C).
inline std::uint32_t crc32c_hardware(std::uint32_t r32, const std::byte* p, std::size_t n) {
  constexpr std::size_t lane = crc32c_lane_bytes;
  std::uint64_t r = r32;
  for (; n >= 3 * lane; p += 3 * lane, n -= 3 * lane) {
    std::uint64_t a = r, b = 0, c = 0;
    for (std::size_t i = 0; i < lane; i += 8) {
      a = crc32c_word(a, load_word(p + i));
      b = crc32c_word(b, load_word(p + lane + i));
      c = crc32c_word(c, load_word(p + 2 * lane + i));
    }
    r = crc32c_shift_lane(crc32c_shift_lane(static_cast<std::uint32_t>(a)) ^ static_cast<std::uint32_t>(b)) ^
        static_cast<std::uint32_t>(c);
  }
  for (; n >= 8; p += 8, n -= 8) r = crc32c_word(r, load_word(p));
  auto r_tail = static_cast<std::uint32_t>(r);
  for (std::size_t i = 0; i < n; ++i) r_tail = crc32c_byte(r_tail, std::to_integer<std::uint8_t>(p[i]));
  return r_tail;
}

#else

inline bool crc32c_hardware_available() { return false; }

inline std::uint32_t crc32c_hardware(std::uint32_t r, const std::byte* p, std::size_t n) {
  return crc32c_portable(r, p, n);
}

#endif

}  // namespace detail

// The CRC-32C of `bytes`, continued from `crc`, the CRC of whatever came before them (0 for
// nothing): crc32c(b, crc32c(a)) == crc32c(a followed by b).
inline std::uint32_t crc32c(std::span<const std::byte> bytes, std::uint32_t crc = 0) {
  const std::uint32_t r = ~crc;
  return ~(detail::crc32c_hardware_available() ? detail::crc32c_hardware(r, bytes.data(), bytes.size())
                                               : detail::crc32c_portable(r, bytes.data(), bytes.size()));
}

}  // namespace alloy
