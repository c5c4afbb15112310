// What the Cuda matrix product's plan cache is keyed by (GemmPlanKey: everything cuBLASLt's choice
// of algorithm depends on), and the text file that keeps timed choices across runs
// (GemmTuning::timed with a plans file, kernels/cuda/gemm_cublaslt.hpp). Host code only: the
// algorithm is kept as the eight 64-bit words of cuBLASLt's opaque cublasLtMatmulAlgo_t, which
// cuBLASLt documents as reusable with the same library version on the same device.
//
// The file, one record per line:
//   alloy-gemm-plans 1
//   identity <the device, its compute capability and multiprocessor count, cuBLASLt's version, the workspace>
//   plan <the key's 19 fields as integers> algo <8 words, 16 hex digits each>
// A file whose identity is not the running one's is not used (its algorithms may not exist
// there); a file that does not parse is an error naming its path and line.
#pragma once

#include <alloy/error.hpp>
#include <alloy/kernels/gemm_args.hpp>

#include <array>
#include <charconv>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace alloy::detail {

// Everything cuBLASLt's choice of algorithm depends on.
struct GemmPlanKey {
  int data_type;
  int compute_type;
  Transpose transa;
  Transpose transb;
  std::size_t m, n, k, lda, ldb, ldc, ld_pre_activation;
  Epilogue epilogue;
  bool keeps_pre_activation;
  std::uint32_t align_a, align_b, align_c, align_c_in, align_vector, align_pre_activation;

  auto operator<=>(const GemmPlanKey&) const = default;
};

using GemmAlgoWords = std::array<std::uint64_t, 8>;  // cublasLtMatmulAlgo_t::data

struct GemmPlansFile {
  std::string identity;
  std::map<GemmPlanKey, GemmAlgoWords> plans;
};

inline constexpr std::string_view gemm_plans_magic = "alloy-gemm-plans 1";
inline constexpr std::size_t gemm_plan_key_fields = 19;

inline std::array<std::uint64_t, gemm_plan_key_fields> gemm_plan_key_fields_of(const GemmPlanKey& k) {
  return {std::uint64_t(std::int64_t(k.data_type)),
          std::uint64_t(std::int64_t(k.compute_type)),
          k.transa == Transpose::yes,
          k.transb == Transpose::yes,
          k.m,
          k.n,
          k.k,
          k.lda,
          k.ldb,
          k.ldc,
          k.ld_pre_activation,
          static_cast<std::uint64_t>(k.epilogue),
          k.keeps_pre_activation,
          k.align_a,
          k.align_b,
          k.align_c,
          k.align_c_in,
          k.align_vector,
          k.align_pre_activation};
}

inline std::string format_gemm_plans(const GemmPlansFile& f) {
  std::string out(gemm_plans_magic);
  out += "\nidentity ";
  out += f.identity;
  out += '\n';
  char hex[17];
  for (const auto& [key, algo] : f.plans) {
    out += "plan";
    for (std::uint64_t v : gemm_plan_key_fields_of(key)) {
      out += ' ';
      out += std::to_string(v);
    }
    out += " algo";
    for (std::uint64_t w : algo) {
      for (int i = 0; i < 16; ++i) hex[i] = "0123456789abcdef"[(w >> (60 - 4 * i)) & 0xf];
      hex[16] = '\0';
      out += ' ';
      out += hex;
    }
    out += '\n';
  }
  return out;
}

// Parses a plans file's text; `where` (the path) names it in errors, with the line.
inline GemmPlansFile parse_gemm_plans(std::string_view text, const std::string& where) {
  GemmPlansFile f;
  std::size_t line_number = 0;
  const auto fail = [&](const std::string& what) {
    throw error("gemm plans file '" + where + "', line " + std::to_string(line_number) + ": " + what);
  };
  bool has_identity = false;
  while (!text.empty()) {
    const std::size_t end = text.find('\n');
    const std::string_view line = text.substr(0, end);
    text = end == std::string_view::npos ? std::string_view{} : text.substr(end + 1);
    ++line_number;
    if (line_number == 1) {
      if (line != gemm_plans_magic)
        fail("not an alloy gemm plans file (the first line must be '" + std::string(gemm_plans_magic) + "')");
      continue;
    }
    if (line.empty()) continue;
    if (line.starts_with("identity ")) {
      if (has_identity) fail("a second identity line");
      f.identity = std::string(line.substr(9));
      has_identity = true;
      continue;
    }
    if (!line.starts_with("plan "))
      fail("expected 'identity' or 'plan', found '" + std::string(line.substr(0, 32)) + "'");
    if (!has_identity) fail("a plan before the identity line");
    std::vector<std::string_view> words;
    for (std::size_t i = 5; i < line.size();) {
      const std::size_t j = std::min(line.find(' ', i), line.size());
      if (j > i) words.push_back(line.substr(i, j - i));
      i = j + 1;
    }
    if (words.size() != gemm_plan_key_fields + 1 + 8 || words[gemm_plan_key_fields] != "algo") {
      fail("a plan is " + std::to_string(gemm_plan_key_fields) + " integers, 'algo' and 8 hex words; found " +
           std::to_string(words.size()) + " words");
    }
    std::array<std::uint64_t, gemm_plan_key_fields> v{};
    for (std::size_t i = 0; i < gemm_plan_key_fields; ++i) {
      const std::string_view w = words[i];
      const bool negative = w.starts_with('-');
      std::uint64_t u = 0;
      const auto r = std::from_chars(w.data() + (negative ? 1 : 0), w.data() + w.size(), u);
      if (r.ec != std::errc{} || r.ptr != w.data() + w.size())
        fail("field " + std::to_string(i + 1) + " '" + std::string(w) + "' is not an integer");
      v[i] = negative ? std::uint64_t(-std::int64_t(u)) : u;
    }
    GemmAlgoWords algo{};
    for (std::size_t i = 0; i < 8; ++i) {
      const std::string_view w = words[gemm_plan_key_fields + 1 + i];
      const auto r = std::from_chars(w.data(), w.data() + w.size(), algo[i], 16);
      if (w.size() != 16 || r.ec != std::errc{} || r.ptr != w.data() + w.size()) {
        fail("algo word " + std::to_string(i + 1) + " '" + std::string(w) + "' is not 16 hex digits");
      }
    }
    const auto flag = [&](std::size_t i) {
      if (v[i] > 1) fail("field " + std::to_string(i + 1) + " must be 0 or 1");
      return v[i] == 1;
    };
    const auto alignment = [&](std::size_t i) {
      if (v[i] == 0 || v[i] > 256 || (v[i] & (v[i] - 1)) != 0)
        fail("field " + std::to_string(i + 1) + " is not an alignment (a power of two up to 256)");
      return static_cast<std::uint32_t>(v[i]);
    };
    if (v[11] > static_cast<std::uint64_t>(Epilogue::dgelu_tanh_bias_grad)) fail("field 12 is not an epilogue");
    const GemmPlanKey key{static_cast<int>(std::int64_t(v[0])),
                          static_cast<int>(std::int64_t(v[1])),
                          flag(2) ? Transpose::yes : Transpose::no,
                          flag(3) ? Transpose::yes : Transpose::no,
                          v[4],
                          v[5],
                          v[6],
                          v[7],
                          v[8],
                          v[9],
                          v[10],
                          static_cast<Epilogue>(v[11]),
                          flag(12),
                          alignment(13),
                          alignment(14),
                          alignment(15),
                          alignment(16),
                          alignment(17),
                          alignment(18)};
    if (!f.plans.emplace(key, algo).second) fail("a second plan for the same problem");
  }
  if (line_number == 0) fail("empty file");
  if (!has_identity) fail("no identity line");
  return f;
}

}  // namespace alloy::detail
