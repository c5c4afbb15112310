// GPT-2's weights to and from Hugging Face's GPT2LMHeadModel layout, as safetensors files
// (fp32). The model declares HF's names already (gpt2_model.hpp); what differs is the layout:
//   - the four Conv1D weights of each block (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
//     are [in, out] in HF and [out, in] (nn.Linear's, alloy's) here: transposed both ways;
//   - transformer.wte.weight has padded_vocab rows here and vocab rows in HF: the padding rows
//     are dropped on export and zero on import;
//   - lm_head.weight is tied to transformer.wte.weight: export leaves it out (as save_pretrained
//     does); import accepts it when it equals the token table, as a tied model's state_dict has it.
// Both go through alloy's own export_weights / import_weights on a file in alloy's layout beside
// the target (removed afterwards), so every check of those (names, shapes, finite values, the
// compute dtype's range, the store untouched on error) applies.
#pragma once

#include "gpt2_model.hpp"

#include <alloy/alloy.hpp>
#include <alloy/nn/transformer.hpp>

#include <filesystem>
#include <string>
#include <vector>

namespace gpt2 {

namespace detail {

// rows x cols -> cols x rows.
inline std::vector<float> transposed(const std::vector<float>& v, std::size_t rows, std::size_t cols) {
  std::vector<float> t(v.size());
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t c = 0; c < cols; ++c) t[c * rows + r] = v[r * cols + c];
  }
  return t;
}

inline std::vector<float> read_floats(const alloy::SafetensorsFile& file, const alloy::StoredTensor& t) {
  std::vector<float> v(t.numel());
  alloy::detail::read_as_float(file, t, v);
  return v;
}

// Rewrites every tensor of `from` into `to` (fp32): convert(name, shape, values) may change the
// shape and values in place and returns false to leave the tensor out.
template <class Convert>
void rewrite(const std::filesystem::path& from, const std::filesystem::path& to, Convert convert, bool checksums) {
  const auto file = alloy::SafetensorsFile::open(from);
  std::vector<std::vector<float>> values;
  std::vector<alloy::TensorToWrite> out;
  values.reserve(file.tensors().size());
  for (const auto& t : file.tensors()) {
    if (!alloy::detail::is_weights_dtype(t.dtype)) {
      throw alloy::error("GPT-2 weights '" + from.string() + "': tensor '" + t.name + "' is " +
                         std::string(alloy::safetensors_name(t.dtype)) + ", not F32, BF16 or F16");
    }
    std::vector<std::int64_t> shape = t.shape;
    values.push_back(read_floats(file, t));
    if (!convert(t.name, shape, values.back())) {
      values.pop_back();
      continue;
    }
    out.push_back({t.name, alloy::SafetensorsDtype::f32, shape, std::as_bytes(std::span<const float>(values.back()))});
  }
  alloy::SafetensorsWriteOptions options;
  options.checksums = checksums;
  alloy::write_safetensors(to, out, {{"format", "pt"}}, options);
}

// A file beside `target`, removed when this goes out of scope.
struct ScratchFile {
  std::filesystem::path path;
  explicit ScratchFile(const std::filesystem::path& target) : path(target.string() + ".alloy-layout.tmp") {}
  ~ScratchFile() {
    std::error_code ignored;
    std::filesystem::remove(path, ignored);
  }
};

}  // namespace detail

// Writes the trainer's weights (fp32: the master copy when there is one) in GPT2LMHeadModel's
// names and layouts: `GPT2LMHeadModel(config).load_state_dict(load_file(path), strict=False)`
// takes them, leaving out only the tied lm_head.weight.
template <class Trainer>
void export_hf(Trainer& trainer, const std::filesystem::path& path) {
  const Config& c = trainer.model().config();
  const detail::ScratchFile scratch(path);
  trainer.export_weights(scratch.path, alloy::WeightsDtype::fp32);
  detail::rewrite(
      scratch.path, path,
      [&](const std::string& name, std::vector<std::int64_t>& shape, std::vector<float>& v) {
        if (alloy::nn::hf_gpt2_stores_transposed(name)) {
          v = detail::transposed(v, std::size_t(shape[0]), std::size_t(shape[1]));
          std::swap(shape[0], shape[1]);
        } else if (name == "transformer.wte.weight") {
          v.resize(c.vocab * c.dim);
          shape[0] = std::int64_t(c.vocab);
        }
        return true;
      },
      false);
}

// Sets the trainer's weights from a file in GPT2LMHeadModel's names and layouts (a state_dict
// saved with safetensors.torch.save_file, or export_hf's). Buffers a GPT2LMHeadModel state_dict
// may hold besides parameters (attn.bias, attn.masked_bias in older transformers) are skipped.
template <class Trainer>
void import_hf(Trainer& trainer, const std::filesystem::path& path) {
  const Config& c = trainer.model().config();
  const detail::ScratchFile scratch(path);
  std::vector<float> wte;
  const auto file = alloy::SafetensorsFile::open(path);
  if (const auto* t = file.find("transformer.wte.weight")) wte = detail::read_floats(file, *t);
  detail::rewrite(
      path, scratch.path,
      [&](const std::string& name, std::vector<std::int64_t>& shape, std::vector<float>& v) {
        if (name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")) return false;
        if (name == "lm_head.weight") {
          if (v != wte) {
            throw alloy::error("GPT-2 weights '" + path.string() +
                               "': lm_head.weight differs from transformer.wte.weight; this model ties them");
          }
          return false;
        }
        if (shape.size() == 2 && alloy::nn::hf_gpt2_stores_transposed(name)) {
          v = detail::transposed(v, std::size_t(shape[0]), std::size_t(shape[1]));
          std::swap(shape[0], shape[1]);
        } else if (name == "transformer.wte.weight" && shape.size() == 2 && shape[0] == std::int64_t(c.vocab) &&
                   c.padded_vocab > c.vocab) {
          v.resize(c.padded_vocab * std::size_t(shape[1]), 0.0f);
          shape[0] = std::int64_t(c.padded_vocab);
        }
        return true;
      },
      true);
  trainer.import_weights(scratch.path);
}

}  // namespace gpt2
