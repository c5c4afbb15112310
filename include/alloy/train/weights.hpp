// Weights in and out: a model's parameters alone, as a safetensors file that PyTorch reads.
//
//   export_weights(path, store, WeightsDtype::bf16)
//     One tensor per declared parameter, under its declared name, with its declared shape, in
//     declared order, all in one dtype: fp32 (from the master copy when there is one, else the
//     compute copy widened), or bf16 / fp16 (the round-to-nearest-even of those fp32 values).
//     Metadata {"format": "pt"}, as safetensors.torch.save_file writes, and the CRC-32C of each
//     tensor and of the metadata (io/safetensors.hpp), which import_weights checks and PyTorch
//     ignores. When the names match a torch.nn.Module's,
//     `module.load_state_dict(safetensors.torch.load_file(path), strict=True)` accepts it. A
//     non-finite value, or one that overflows the chosen dtype, is refused (naming the
//     parameter) and the file is not written. Written atomically (write_file_atomically).
//
//   import_weights(path, store)
//     Sets every parameter from a file of that shape (one written by export_weights or by
//     safetensors.torch.save_file(module.state_dict())): F32, BF16 or F16 tensors, converted
//     to the fp32 master and to the compute copy, which is the round-to-nearest-even of the
//     master, as an optimizer step with Rounding::nearest_even writes it. The file must hold
//     exactly the declared parameters with their declared shapes, finite, and representable in
//     the compute dtype; otherwise alloy::error names the file and every missing, extra or
//     mis-shaped tensor (or the first bad value, or a tensor that fails its checksum when the
//     file has one), and the store is left as it was: everything is read and checked in host
//     memory before the store changes. Optimizer state, gradients and step counters are not
//     touched.
#pragma once

#include <alloy/io/safetensors.hpp>
#include <alloy/train/checkpoint.hpp>
#include <alloy/train/param_store.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace alloy {

// The dtype of an exported weights file.
enum class WeightsDtype : std::uint8_t { fp32, bf16, fp16 };

constexpr SafetensorsDtype safetensors_dtype(WeightsDtype d) {
  switch (d) {
    case WeightsDtype::bf16:
      return SafetensorsDtype::bf16;
    case WeightsDtype::fp16:
      return SafetensorsDtype::f16;
    default:
      return SafetensorsDtype::f32;
  }
}

// "fp32", "bf16", "fp16" (alloy's dtype names).
constexpr std::string_view weights_dtype_name(WeightsDtype d) {
  switch (d) {
    case WeightsDtype::bf16:
      return "bf16";
    case WeightsDtype::fp16:
      return "fp16";
    default:
      return "fp32";
  }
}

// Parses "fp32", "bf16" or "fp16"; nothing for anything else.
constexpr std::optional<WeightsDtype> weights_dtype_named(std::string_view name) {
  for (const WeightsDtype d : {WeightsDtype::fp32, WeightsDtype::bf16, WeightsDtype::fp16}) {
    if (weights_dtype_name(d) == name) return d;
  }
  return std::nullopt;
}

namespace detail {

inline std::string value_text(float v) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(v));
  return buf;
}

// Tensor bytes in dtype Out, converted chunk by chunk from `numel` elements of an arena at
// `offset` (copied from the device first on Cuda). Throws alloy::error naming the parameter
// when a value is non-finite or overflows Out.
template <class Out, class Src, backend B>
TensorChunkSource converted_source(const Buffer<Src, B>& arena, std::size_t offset, std::string name,
                                   std::string path) {
  auto staging = std::make_shared<std::vector<Src>>();
  return [&arena, offset, staging, name = std::move(name), path = std::move(path)](std::size_t at,
                                                                                   std::span<std::byte> chunk) {
    if (at % sizeof(Out) != 0 || chunk.size() % sizeof(Out) != 0) {
      throw error("export weights '" + path + "': a chunk of tensor '" + name + "' is not a whole number of elements");
    }
    const std::size_t first = at / sizeof(Out), count = chunk.size() / sizeof(Out);
    staging->resize(count);
    read_arena(arena, offset + first, std::span<Src>(*staging));
    for (std::size_t i = 0; i < count; ++i) {
      const float v = to_float((*staging)[i]);
      const Out o = round_nearest<Out>(v);
      if (!std::isfinite(to_float(o))) {
        throw error("export weights '" + path + "': parameter '" + name + "' element " + std::to_string(first + i) +
                    " is " + value_text(v) +
                    (std::isfinite(v) ? std::string(", beyond the range of ") + numeric_traits<Out>::name
                                      : std::string(" (weights files hold finite values; save() keeps everything)")));
      }
      std::memcpy(chunk.data() + i * sizeof(Out), &o, sizeof(Out));
    }
  };
}

// Writes the weights in dtype Out from the arena `source` (master or compute copy).
template <class Out, class Store, class Src, backend B>
void export_weights_as(const std::filesystem::path& path, Store& store, const Buffer<Src, B>& source) {
  const auto& registry = store.registry();
  const auto& layout = store.layout();
  std::vector<TensorToWrite> tensors;
  tensors.reserve(registry.size());
  for (std::size_t t = 0; t < registry.size(); ++t) {
    const auto& spec = registry.specs()[t];
    tensors.push_back({spec.name, safetensors_dtype_of<Out>(), spec.shape,
                       converted_source<Out>(source, layout[t].offset, spec.name, path.string())});
  }
  // "format": "pt" is what safetensors.torch.save_file writes, and what Hugging Face loaders expect.
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {"alloy.weights_source",
       Store::has_master ? "fp32 master" : std::string(numeric_traits<Src>::name) + " compute copy"},
  };
  SafetensorsWriteOptions options;
  options.checksums = true;
  write_safetensors(path, tensors, metadata, options);
}

inline bool is_weights_dtype(SafetensorsDtype d) {
  return d == SafetensorsDtype::f32 || d == SafetensorsDtype::bf16 || d == SafetensorsDtype::f16;
}

// A tensor's values as floats (exact for F32, BF16 and F16), read from the file.
template <class = void>
void read_as_float(const SafetensorsFile& file, const StoredTensor& t, std::span<float> out) {
  if (t.dtype == SafetensorsDtype::f32) {
    file.read(t.name, std::as_writable_bytes(out));
    return;
  }
  std::vector<std::uint16_t> bits(out.size());
  file.read(t.name, std::as_writable_bytes(std::span(bits)));
  for (std::size_t i = 0; i < out.size(); ++i) {
    out[i] =
        t.dtype == SafetensorsDtype::bf16 ? to_float(bf16::from_bits(bits[i])) : to_float(fp16::from_bits(bits[i]));
  }
}

// "'a', 'b', 'c'" for up to `limit` names, then how many more.
template <class = void>
std::string name_list(const std::vector<std::string>& names, std::size_t limit = 8) {
  std::string out;
  for (std::size_t i = 0; i < names.size() && i < limit; ++i) {
    if (i) out += ", ";
    out += quoted_name(names[i]);
  }
  if (names.size() > limit) out += " and " + std::to_string(names.size() - limit) + " more";
  return out;
}

}  // namespace detail

// See the top of this file.
template <class Store>
void export_weights(const std::filesystem::path& path, Store& store, WeightsDtype dtype) {
  synchronize(store.backend());
  auto write = [&](const auto& source) {
    switch (dtype) {
      case WeightsDtype::fp32:
        return detail::export_weights_as<float>(path, store, source);
      case WeightsDtype::bf16:
        return detail::export_weights_as<bf16>(path, store, source);
      case WeightsDtype::fp16:
        return detail::export_weights_as<fp16>(path, store, source);
    }
    throw error("export weights '" + path.string() + "': unknown WeightsDtype " +
                std::to_string(static_cast<int>(dtype)));
  };
  if constexpr (Store::has_master) {
    write(store.master_arena());
  } else {
    write(store.params_arena());
  }
}

// See the top of this file.
template <class Store>
void import_weights(const std::filesystem::path& path, Store& store) {
  using Param = typename Store::param_type;
  const SafetensorsFile file = SafetensorsFile::open(path);
  const std::string where = "import weights '" + path.string() + "': ";
  const auto& registry = store.registry();
  const auto& layout = store.layout();

  // The file must name exactly the declared parameters, each with its shape and a float dtype.
  std::vector<std::string> missing, extra, problems;
  std::set<std::string_view> declared;
  for (const auto& spec : registry.specs()) {
    declared.insert(spec.name);
    const StoredTensor* t = file.find(spec.name);
    if (!t) {
      missing.push_back(spec.name);
    } else if (!detail::is_weights_dtype(t->dtype)) {
      problems.push_back("tensor " + detail::quoted_name(spec.name) + " is " + std::string(safetensors_name(t->dtype)) +
                         ", not F32, BF16 or F16");
    } else if (t->shape != spec.shape) {
      problems.push_back("tensor " + detail::quoted_name(spec.name) + " has shape " + detail::shape_text(t->shape) +
                         ", the model declares " + detail::shape_text(spec.shape));
    }
  }
  for (const auto& t : file.tensors()) {
    if (!declared.count(t.name)) extra.push_back(t.name);
  }
  if (!missing.empty() || !extra.empty() || !problems.empty()) {
    std::string msg = where + "the file does not match the model's parameters:";
    if (!missing.empty()) msg += " missing " + detail::name_list(missing) + ";";
    if (!extra.empty()) msg += " not parameters of this model: " + detail::name_list(extra) + ";";
    for (const auto& p : problems) msg += " " + p + ";";
    msg.pop_back();
    if (file.metadata().count("alloy.format")) msg += " (this is a full alloy checkpoint: use load())";
    throw error(msg);
  }

  // Stage both copies in host memory (padding zero, as in the arenas) and check every value.
  const std::size_t n = layout.padded_numel();
  std::vector<float> master(n, 0.0f);
  std::vector<Param> params(n, round_nearest<Param>(0.0f));
  for (std::size_t t = 0; t < registry.size(); ++t) {
    const auto& spec = registry.specs()[t];
    const auto& place = layout[t];
    const StoredTensor& stored = file.tensor(spec.name);
    const std::span<float> values(master.data() + place.offset, place.numel);
    detail::read_as_float(file, stored, values);
    for (std::size_t i = 0; i < place.numel; ++i) {
      const float v = values[i];
      if (!std::isfinite(v)) {
        throw error(where + "tensor " + detail::quoted_name(spec.name) + " holds a non-finite value (" +
                    detail::value_text(v) + ") at element " + std::to_string(i));
      }
      const Param p = round_nearest<Param>(v);
      if (!std::isfinite(to_float(p))) {
        throw error(where + "tensor " + detail::quoted_name(spec.name) + " element " + std::to_string(i) + " is " +
                    detail::value_text(v) + ", beyond the range of this trainer's compute dtype " +
                    numeric_traits<Param>::name);
      }
      params[place.offset + i] = p;
    }
  }

  // Commit.
  copy_from_host(store.params_arena(), std::span<const Param>(params));
  if constexpr (Store::has_master) copy_from_host(store.master_arena(), std::span<const float>(master));
}

}  // namespace alloy
