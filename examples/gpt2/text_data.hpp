// Batches for the GPT-2 example: windows of a text (bytes as tokens) at random offsets, each
// token's target the byte after it; or random tokens (benchmarks: the same work per step, nothing
// to learn but the unigram distribution).
#pragma once

#include "gpt2_model.hpp"

#include <algorithm>
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
    const std::size_t T = config_.seq;
    Batch b{alloy::pinned_vector<std::int32_t>(rows * T), alloy::pinned_vector<std::int32_t>(rows * T)};
    if (is_random()) {
      std::uniform_int_distribution<std::int32_t> d(0, std::int32_t(config_.vocab) - 1);
      for (std::size_t r = 0; r < rows; ++r) {
        std::int32_t next = d(rng);
        for (std::size_t t = 0; t < T; ++t) {
          b.tokens[r * T + t] = next;
          next = d(rng);
          b.targets[r * T + t] = next;
        }
      }
      return b;
    }
    std::uniform_int_distribution<std::size_t> start(0, tokens_.size() - T - 1);
    for (std::size_t r = 0; r < rows; ++r) {
      const std::size_t o = start(rng);
      std::copy_n(tokens_.begin() + std::ptrdiff_t(o), T, b.tokens.begin() + std::ptrdiff_t(r * T));
      std::copy_n(tokens_.begin() + std::ptrdiff_t(o + 1), T, b.targets.begin() + std::ptrdiff_t(r * T));
    }
    return b;
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
