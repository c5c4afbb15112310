// Batches for the GPT-2 example: windows of a text (bytes as tokens) at random offsets, each
// token's target the byte after it; or random tokens (benchmarks: the same work per step, nothing
// to learn but the unigram distribution).
#pragma once

#include "gpt2_model.hpp"

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

namespace gpt2 {

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw alloy::error("cannot read " + path.string());
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The text trained on when no --data is given: alloy's own README and docs/*.md, found through
// ALLOY_SOURCE_DIR (set by examples/CMakeLists.txt), about 100 KB; nothing is downloaded.
inline std::string default_text() {
#ifdef ALLOY_SOURCE_DIR
  const std::filesystem::path root = ALLOY_SOURCE_DIR;
  std::vector<std::filesystem::path> files = {root / "README.md"};
  std::error_code ec;
  std::vector<std::filesystem::path> docs;
  for (const auto& e : std::filesystem::directory_iterator(root / "docs", ec)) {
    if (e.path().extension() == ".md") docs.push_back(e.path());
  }
  std::sort(docs.begin(), docs.end());
  files.insert(files.end(), docs.begin(), docs.end());
  std::string text;
  for (const auto& f : files) {
    if (std::filesystem::exists(f)) text += read_file(f) + "\n";
  }
  if (!text.empty()) return text;
#endif
  throw alloy::error("no default text (alloy's README.md and docs/ were not found); give one with --data FILE");
}

// The next value of a splitmix64 stream (Steele, Lea and Flood's generator, as in Java's
// SplittableRandom): state advances by a fixed odd constant, the output is its mix.
inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

class TokenSource {
 public:
  // Bytes of `text` as tokens.
  static TokenSource text(std::string text, const Config& c) {
    if (text.size() < c.seq + 2) {
      throw alloy::error("the text has " + std::to_string(text.size()) + " bytes; sequences of " +
                         std::to_string(c.seq) + " need at least " + std::to_string(c.seq + 2));
    }
    if (c.vocab < 256) throw alloy::error("bytes as tokens need a vocabulary of at least 256");
    TokenSource s(c);
    s.tokens_.assign(text.begin(), text.end());
    for (auto& t : s.tokens_) t &= 0xff;  // char may be signed
    return s;
  }

  static TokenSource random(const Config& c) { return TokenSource(c); }

  bool is_random() const noexcept { return tokens_.empty(); }
  std::size_t size() const noexcept { return tokens_.size(); }

  Batch batch(std::size_t rows, std::mt19937_64& rng) const {
    Batch b;
    fill(b, rows, rng);
    return b;
  }

  // Refills b in place: its pinned memory is allocated once (cudaMallocHost is slow and may
  // synchronize the device), and reused once the trainer is done with it.
  void fill(Batch& b, std::size_t rows, std::mt19937_64& rng) const {
    const std::size_t T = config_.seq;
    b.tokens.resize(rows * T);
    b.targets.resize(rows * T);
    if (is_random()) {
      // One draw of rng per batch seeds a splitmix64 stream, two tokens per 64-bit value, each
      // mapped to [0, vocab) by a multiply and shift (bias below 2^-16 for GPT-2's vocabulary).
      // The host fills a batch between two steps while the device has only the update left to
      // run: std::uniform_int_distribution over std::mt19937_64 took about 110 us for 16 x 1024
      // tokens on the CPU machine, this about a tenth.
      std::uint64_t state = rng();
      const auto token = [vocab = std::uint64_t(config_.vocab)](std::uint32_t u) {
        return static_cast<std::int32_t>((std::uint64_t(u) * vocab) >> 32);
      };
      for (std::size_t r = 0; r < rows; ++r) {
        std::uint64_t v = splitmix64(state);
        std::int32_t next = token(static_cast<std::uint32_t>(v));
        for (std::size_t t = 0; t < T; ++t) {
          b.tokens[r * T + t] = next;
          if (t % 2 == 0) {
            next = token(static_cast<std::uint32_t>(v >> 32));
          } else {
            v = splitmix64(state);
            next = token(static_cast<std::uint32_t>(v));
          }
          b.targets[r * T + t] = next;
        }
      }
      return;
    }
    std::uniform_int_distribution<std::size_t> start(0, tokens_.size() - T - 1);
    for (std::size_t r = 0; r < rows; ++r) {
      const std::size_t o = start(rng);
      std::copy_n(tokens_.begin() + std::ptrdiff_t(o), T, b.tokens.begin() + std::ptrdiff_t(r * T));
      std::copy_n(tokens_.begin() + std::ptrdiff_t(o + 1), T, b.targets.begin() + std::ptrdiff_t(r * T));
    }
  }

  // The first `n` tokens (a prompt for sampling).
  std::vector<std::int32_t> prefix(std::size_t n) const {
    return std::vector<std::int32_t>(tokens_.begin(), tokens_.begin() + std::ptrdiff_t(std::min(n, tokens_.size())));
  }

 private:
  explicit TokenSource(const Config& c) : config_(c) {}
  Config config_;
  std::vector<std::int32_t> tokens_;
};

}  // namespace gpt2
