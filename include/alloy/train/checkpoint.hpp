// Trainer checkpoints: one safetensors file (format "alloy-checkpoint-3"). Tensors, each with
// its real (unpadded) shape:
//   <name>                          the parameter in the compute dtype, as declared (readable by
//                                   PyTorch and Hugging Face tools as it is)
//   alloy/master/<name>             its fp32 master copy (with fp32_master)
//   alloy/state/<name>/<slot>       its optimizer state, slots named as PyTorch names them:
//                                   AdamW exp_avg, exp_avg_sq; SGD momentum_buffer; Lion exp_avg;
//                                   in the state width (F32, BF16, or U8 codes for q8), the
//                                   parameter's shape; Adafactor row_var [..., rows, 1] and
//                                   col_var [..., 1, cols] for rank >= 2, variance for vectors
//   alloy/state/<name>/<slot>.absmax  q8 only: the F32 scale of each block of quant_block codes
//                                   (value = decode(code) * absmax[i / quant_block])
// Metadata: the format version, the policy signature, step counters, loss-scaler state and the
// random seed (stochastic rounding draws from (seed, step, element), so that is the whole RNG
// state); the run's configuration, "alloy.config.<setting>" (train/run_config.hpp); and
// checksums: "crc32c:<tensor>" for every tensor and "crc32c:__metadata__" for the rest of the
// metadata (io/safetensors.hpp), computed as the bytes are written.
//
// Writing goes through write_file_atomically: a crash leaves the old checkpoint or the new one;
// saving onto a symbolic link replaces the file it names and keeps the link.
// Loading validates the whole file (a regular file, refused at once if it is a FIFO or a
// directory; format, the metadata's checksum, signature, every tensor's presence, dtype, shape
// and checksum, nothing else; finite weights and state, non-negative second moments and q8
// scales; a compute copy that is a rounding of its master; counters that are plain digits, in
// range and consistent, and a valid scaler state: a dynamic one within reach of the scaler
// configuration it was saved with) and reads it into host staging before touching the store,
// so a refused or failed load leaves the trainer as it was. A fixed loss scale is the loading
// trainer's own. The saved configuration is compared with the loading trainer's: each
// difference is reported, or, with ConfigChange::refuse, the load is refused.
//
// Format 2 (before checksums and configurations; otherwise the same tensors and metadata) still
// loads: without the integrity check, and with a report that the configuration could not be
// compared. Format 1 is refused with a message saying so.
#pragma once

#include <alloy/io/safetensors.hpp>
#include <alloy/precision/loss_scale.hpp>
#include <alloy/train/param_store.hpp>
#include <alloy/train/run_config.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace alloy {

template <class T>
constexpr SafetensorsDtype safetensors_dtype_of() {
  if constexpr (std::is_same_v<T, float>)
    return SafetensorsDtype::f32;
  else if constexpr (std::is_same_v<T, bf16>)
    return SafetensorsDtype::bf16;
  else if constexpr (std::is_same_v<T, fp16>)
    return SafetensorsDtype::f16;
  else {
    static_assert(std::is_same_v<T, std::uint8_t>, "safetensors_dtype_of: no safetensors dtype for this type");
    return SafetensorsDtype::u8;
  }
}

// Everything outside the arenas that a bit-exact resume needs.
struct CheckpointCounters {
  std::uint64_t attempted_steps = 0;  // drives the learning-rate schedule
  std::uint64_t applied_steps = 0;    // the optimizer's t: bias correction, random streams
  std::uint64_t skipped_steps = 0;
  LossScaleState scale{};
  std::uint64_t seed = 0;
};

// Version 1 stored the optimizer state as padded flat arenas ("alloy/state/<k>"); version 2 stores
// it per parameter; version 3 adds checksums and the run's configuration. Version 2 loads
// unchecked; version 1 is refused with a message saying so.
inline constexpr const char* checkpoint_format = "alloy-checkpoint-3";
inline constexpr const char* checkpoint_format_unchecked = "alloy-checkpoint-2";

// What load_checkpoint does when the checkpoint was saved under another configuration.
enum class ConfigChange : std::uint8_t {
  report,  // load it, and list each difference
  refuse,  // throw alloy::error listing them, changing nothing
};

// What a load found besides the state it restored.
struct LoadReport {
  std::string format;                                // the file's: checkpoint_format, or checkpoint_format_unchecked
  bool config_compared = false;                      // false: the file records no configuration (format 2)
  std::vector<ConfigDifference> config_differences;  // by name; empty when nothing changed
};

struct LoadedCheckpoint {
  CheckpointCounters counters;
  LoadReport report;
};

namespace detail {

inline constexpr std::string_view config_key_prefix = "alloy.config.";

inline std::string exact_float(float x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%a", static_cast<double>(x));
  return buf;
}

template <class = void>
const std::string& required_metadata(const SafetensorsFile& f, const std::string& key) {
  const auto it = f.metadata().find(key);
  if (it == f.metadata().end()) {
    throw error("load checkpoint '" + f.path().string() + "': metadata '" + key + "' is missing");
  }
  return it->second;
}

// Digits only (no sign, no space, no base prefix), at most `limit`. strtoull alone would read
// " -1" as 2^64 - 1.
template <class = void>
std::uint64_t metadata_u64(const SafetensorsFile& f, const std::string& key,
                           std::uint64_t limit = std::numeric_limits<std::uint64_t>::max()) {
  const std::string& v = required_metadata(f, key);
  const bool digits =
      !v.empty() && v.size() <= 20 && std::all_of(v.begin(), v.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  errno = 0;
  const unsigned long long x = digits ? std::strtoull(v.c_str(), nullptr, 10) : 0;
  if (!digits || errno == ERANGE) {
    throw error("load checkpoint '" + f.path().string() + "': metadata '" + key + "' = '" + v +
                "' is not an unsigned integer (digits only)");
  }
  if (x > limit) {
    throw error("load checkpoint '" + f.path().string() + "': metadata '" + key + "' = " + v + " is above " +
                std::to_string(limit));
  }
  return x;
}

template <class = void>
float metadata_float(const SafetensorsFile& f, const std::string& key) {
  const std::string& v = required_metadata(f, key);
  char* end = nullptr;
  const float x = std::strtof(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !std::isfinite(x)) {
    throw error("load checkpoint '" + f.path().string() + "': metadata '" + key + "' = '" + v +
                "' is not a finite number");
  }
  return x;
}

template <class T>
std::span<const std::byte> bytes_of(const T* p, std::size_t n) {
  return {reinterpret_cast<const std::byte*>(p), n * sizeof(T)};
}

// A tensor's bytes from an arena on either backend: a span on Host, chunked copies on Cuda.
template <class T, backend B>
std::variant<std::span<const std::byte>, TensorChunkSource> arena_bytes(const Buffer<T, B>& arena, std::size_t offset,
                                                                        std::size_t n) {
  const T* p = arena.data() + offset;
  if constexpr (std::is_same_v<B, Host>) {
    return bytes_of(p, n);
  } else {
#if ALLOY_HAS_CUDA_RUNTIME
    const auto stream = arena.backend().stream;
    return TensorChunkSource([p, stream](std::size_t at, std::span<std::byte> chunk) {
      ALLOY_CUDA_CHECK(cudaMemcpyAsync(chunk.data(), reinterpret_cast<const std::byte*>(p) + at, chunk.size(),
                                       cudaMemcpyDeviceToHost, stream));
      ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
    });
#else
    return bytes_of(p, n);
#endif
  }
}

// Elements [offset, offset + out.size()) of an arena, copied into host memory on either backend.
template <class T, backend B>
void read_arena(const Buffer<T, B>& arena, std::size_t offset, std::span<T> out) {
  if (out.empty()) return;
  if constexpr (std::is_same_v<B, Host>) {
    std::memcpy(out.data(), arena.data() + offset, out.size_bytes());
  } else {
#if ALLOY_HAS_CUDA_RUNTIME
    const auto stream = arena.backend().stream;
    ALLOY_CUDA_CHECK(
        cudaMemcpyAsync(out.data(), arena.data() + offset, out.size_bytes(), cudaMemcpyDeviceToHost, stream));
    ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
#endif
  }
}

// One optimizer-state tensor of one parameter: where it lies in its state arena and how it is
// stored in a checkpoint.
struct StateTensor {
  std::string name;                   // alloy/state/<param>/<slot>
  int slot = 0;                       // which state arena
  std::size_t offset = 0, numel = 0;  // in that arena
  std::vector<std::int64_t> shape;
  bool non_negative = false;  // a second moment
};

inline std::string state_tensor_name(const std::string& param, std::string_view slot) {
  std::string out = "alloy/state/";
  out += param;
  out += '/';
  out += slot;
  return out;
}

// The state tensors of parameter t of `store`, in slot order.
template <class Store>
std::vector<StateTensor> state_tensors(Store& store, std::size_t t) {
  using O = typename Store::optimizer;
  const auto& spec = store.registry().specs()[t];
  std::vector<StateTensor> out;
  if constexpr (is_adafactor_v<O>) {
    const AdafactorPlacement& a = store.adafactor_placements()[t];
    if (a.factored) {
      // torch.optim.Adafactor's shapes: row_var keeps the rows (columns reduced to 1),
      // col_var the columns.
      std::vector<std::int64_t> rows = spec.shape, cols = spec.shape;
      rows.back() = 1;
      cols[cols.size() - 2] = 1;
      out.push_back({state_tensor_name(spec.name, "row_var"), 0, a.offset, a.batch * a.rows, rows, true});
      out.push_back(
          {state_tensor_name(spec.name, "col_var"), 0, a.offset + a.batch * a.rows, a.batch * a.cols, cols, true});
    } else {
      out.push_back({state_tensor_name(spec.name, "variance"), 0, a.offset, a.cols, spec.shape, true});
    }
  } else {
    const auto& place = store.layout()[t];
    for (int k = 0; k < Store::slots; ++k) {
      out.push_back({state_tensor_name(spec.name, O::state_names[k]), k, place.offset, place.numel, spec.shape,
                     !O::rule_type::slot_signed(k)});
    }
  }
  return out;
}

// q8: the block scales of a state tensor, "<state tensor>.absmax", one per quant_block codes.
template <class Store>
StateTensor state_scale_tensor(const StateTensor& s) {
  constexpr std::size_t block = Store::quant_block;
  const std::size_t blocks = (s.numel + block - 1) / block;
  return {s.name + ".absmax", s.slot, s.offset / block, blocks, {static_cast<std::int64_t>(blocks)}, true};
}

// A dynamic scaler's state is one its machine can reach under the configuration it ran with:
// hysteresis_left counts down from hysteresis, growth_tracker resets on reaching growth_interval,
// the scale stays within [min_scale, max_scale] (or at init_scale). A state outside them (an
// edited hysteresis_left of 2^31 - 1 would skip overflowing steps for ever without backing off)
// is refused. The bounds are the recorded configuration's where the file has one, since a resume
// may change the configuration.
template <class = void>
void check_dynamic_scale(const SafetensorsFile& file, const std::string& where, const LossScaleState& s,
                         DynamicLossScaleConfig c) {
  const std::string prefix = std::string(config_key_prefix) + "scaler.";
  const bool recorded = file.metadata().count(prefix + "hysteresis") != 0;
  if (recorded) {
    constexpr auto int32_max = static_cast<std::uint64_t>(std::numeric_limits<std::int32_t>::max());
    c.hysteresis = static_cast<int>(metadata_u64(file, prefix + "hysteresis", int32_max));
    c.growth_interval = static_cast<int>(metadata_u64(file, prefix + "growth_interval", int32_max));
    c.init_scale = metadata_float(file, prefix + "init_scale");
    c.min_scale = metadata_float(file, prefix + "min_scale");
    c.max_scale = metadata_float(file, prefix + "max_scale");
  }
  const std::string whose = recorded ? "the scaler configuration it was saved with" : "this trainer's scaler";
  if (s.hysteresis_left > c.hysteresis) {
    throw error(where + "metadata alloy.loss_scale_hysteresis_left = " + std::to_string(s.hysteresis_left) +
                " is above the hysteresis of " + whose + " (" + std::to_string(c.hysteresis) +
                "), from which it counts down");
  }
  if (s.growth_tracker >= c.growth_interval) {
    throw error(where + "metadata alloy.loss_scale_growth_tracker = " + std::to_string(s.growth_tracker) +
                " is not below the growth_interval of " + whose + " (" + std::to_string(c.growth_interval) +
                "), at which it resets");
  }
  const float low = std::min(c.min_scale, c.init_scale), high = std::max(c.max_scale, c.init_scale);
  if (!(s.scale >= low && s.scale <= high)) {
    throw error(where + "metadata alloy.loss_scale = " + exact_float(s.scale) + " is outside [" + exact_float(low) +
                ", " + exact_float(high) + "], the range of " + whose + " (min_scale, max_scale and init_scale)");
  }
}

}  // namespace detail

// Writes `store`, the counters, the policy signature and the run's configuration (`config`,
// recorded as "alloy.config.<name>") to `path`, atomically.
template <class Store>
void save_checkpoint(const std::filesystem::path& path, Store& store, const CheckpointCounters& c,
                     const std::string& signature, const ConfigSettings& config = {}) {
  synchronize(store.backend());
  const auto& registry = store.registry();
  const auto& layout = store.layout();
  using Param = typename Store::param_type;
  using State = typename Store::state_storage;
  // Wider dtypes first, so every tensor's offset is a multiple of its element size.
  std::vector<TensorToWrite> f32, narrow, bytes;
  auto by_size = [&](std::size_t size) -> std::vector<TensorToWrite>& {
    return size == 4 ? f32 : (size == 2 ? narrow : bytes);
  };
  for (std::size_t t = 0; t < registry.size(); ++t) {
    const auto& spec = registry.specs()[t];
    const auto& place = layout[t];
    by_size(sizeof(Param))
        .push_back({spec.name, safetensors_dtype_of<Param>(), spec.shape,
                    detail::arena_bytes(store.params_arena(), place.offset, place.numel)});
    if constexpr (Store::has_master) {
      f32.push_back({"alloy/master/" + spec.name, SafetensorsDtype::f32, spec.shape,
                     detail::arena_bytes(store.master_arena(), place.offset, place.numel)});
    }
    for (const auto& s : detail::state_tensors(store, t)) {
      by_size(sizeof(State))
          .push_back({s.name, safetensors_dtype_of<State>(), s.shape,
                      detail::arena_bytes(store.state_arena(s.slot), s.offset, s.numel)});
      if constexpr (Store::state_policy::quantized) {
        const auto scale = detail::state_scale_tensor<Store>(s);
        f32.push_back({scale.name, SafetensorsDtype::f32, scale.shape,
                       detail::arena_bytes(store.state_scale_arena(s.slot), scale.offset, scale.numel)});
      }
    }
  }
  std::vector<TensorToWrite> all;
  for (auto* list : {&f32, &narrow, &bytes}) {
    for (auto& t : *list) all.push_back(std::move(t));
  }
  std::map<std::string, std::string> metadata = {
      {"alloy.format", checkpoint_format},
      {"alloy.signature", signature},
      {"alloy.attempted_steps", std::to_string(c.attempted_steps)},
      {"alloy.applied_steps", std::to_string(c.applied_steps)},
      {"alloy.skipped_steps", std::to_string(c.skipped_steps)},
      {"alloy.loss_scale", detail::exact_float(c.scale.scale)},
      {"alloy.loss_scale_growth_tracker", std::to_string(c.scale.growth_tracker)},
      {"alloy.loss_scale_hysteresis_left", std::to_string(c.scale.hysteresis_left)},
      {"alloy.loss_scale_overflows", std::to_string(c.scale.overflows)},
      {"alloy.seed", std::to_string(c.seed)},
  };
  for (const auto& [name, value] : config) metadata[std::string(detail::config_key_prefix) + name] = value;
  SafetensorsWriteOptions options;
  options.checksums = true;
  write_safetensors(path, all, metadata, options);
}

// Validates `path` against `store`, compares the configuration it records with `config` (the
// loading run's), checks a dynamic scaler's state against the scaler configuration it was saved
// under (recorded, or else `scaler`, the loading run's; nullptr: the scaler is not dynamic), then
// replaces the store's parameters, master and state with the file's and returns its counters and
// what differs. Throws alloy::error, with the store untouched, when the file is damaged, foreign,
// of an older format, or from another model, precision or optimizer, and, with
// ConfigChange::refuse, when the configurations differ.
template <class Store>
LoadedCheckpoint load_checkpoint(const std::filesystem::path& path, Store& store, const std::string& signature,
                                 const ConfigSettings& config = {}, ConfigChange on_change = ConfigChange::report,
                                 const DynamicLossScaleConfig* scaler = nullptr) {
  const SafetensorsFile file = SafetensorsFile::open(path);  // checks the metadata's checksum
  const std::string where = "load checkpoint '" + path.string() + "': ";
  const auto format = file.metadata().find("alloy.format");
  const bool known_format = format != file.metadata().end() &&
                            (format->second == checkpoint_format || format->second == checkpoint_format_unchecked);
  if (format != file.metadata().end() && !known_format && format->second.rfind("alloy-checkpoint-", 0) == 0) {
    throw error(where + "written in format '" + format->second +
                "', which this version of alloy does not read (it reads '" + checkpoint_format + "' and '" +
                checkpoint_format_unchecked +
                "'; format 1 stored optimizer state as flat arenas, format 2 per parameter): resume it with the alloy "
                "version that wrote it, or carry its weights over with export_weights / import_weights");
  }
  if (!known_format) {
    throw error(where + "not an alloy checkpoint (metadata alloy.format is " +
                (format == file.metadata().end() ? std::string("missing") : "'" + format->second + "'") +
                ", expected '" + checkpoint_format + "')");
  }
  const bool checked = format->second == checkpoint_format;
  if (checked && !file.metadata().count(std::string(safetensors_metadata_checksum_key))) {
    throw error(where + "metadata '" + std::string(safetensors_metadata_checksum_key) + "' is missing (format '" +
                checkpoint_format + "' records the metadata's checksum)");
  }
  // A copy: g++ 13 cannot see that a reference would outlive the key's temporary.
  const std::string theirs = detail::required_metadata(file, "alloy.signature");
  if (theirs != signature) {
    throw error(where + "written by a trainer with policies {" + theirs + "}, this trainer has {" + signature + "}");
  }
  using Param = typename Store::param_type;
  using State = typename Store::state_storage;
  const auto& registry = store.registry();
  const auto& layout = store.layout();
  std::set<std::string> expected;
  auto check = [&](const std::string& name, SafetensorsDtype dtype, const std::vector<std::int64_t>& shape) {
    expected.insert(name);
    const StoredTensor* t = file.find(name);
    if (!t) throw error(where + "tensor '" + name + "' is missing (a checkpoint of another model?)");
    if (t->dtype != dtype || t->shape != shape) {
      throw error(where + "tensor '" + name + "' is " + std::string(safetensors_name(t->dtype)) + " " +
                  detail::shape_text(t->shape) + ", this model has " + std::string(safetensors_name(dtype)) + " " +
                  detail::shape_text(shape));
    }
  };
  std::vector<std::vector<detail::StateTensor>> state_tensors(registry.size());
  for (std::size_t t = 0; t < registry.size(); ++t) {
    const auto& spec = registry.specs()[t];
    check(spec.name, safetensors_dtype_of<Param>(), spec.shape);
    if constexpr (Store::has_master) check("alloy/master/" + spec.name, SafetensorsDtype::f32, spec.shape);
    state_tensors[t] = detail::state_tensors(store, t);
    for (const auto& s : state_tensors[t]) {
      check(s.name, safetensors_dtype_of<State>(), s.shape);
      if constexpr (Store::state_policy::quantized) {
        const auto scale = detail::state_scale_tensor<Store>(s);
        check(scale.name, SafetensorsDtype::f32, scale.shape);
      }
    }
  }
  for (const auto& t : file.tensors()) {
    if (!expected.count(t.name)) {
      throw error(where + "tensor '" + t.name + "' is not a parameter of this model (a checkpoint of another model?)");
    }
    if (checked && !t.crc32c) {
      throw error(where + "tensor '" + t.name + "' has no checksum (format '" + checkpoint_format +
                  "' records one per tensor, metadata 'crc32c:" + t.name + "')");
    }
  }
  CheckpointCounters c;
  c.attempted_steps = detail::metadata_u64(file, "alloy.attempted_steps");
  c.applied_steps = detail::metadata_u64(file, "alloy.applied_steps");
  c.skipped_steps = detail::metadata_u64(file, "alloy.skipped_steps");
  c.scale.scale = detail::metadata_float(file, "alloy.loss_scale");
  constexpr auto int32_max = static_cast<std::uint64_t>(std::numeric_limits<std::int32_t>::max());
  c.scale.growth_tracker =
      static_cast<std::int32_t>(detail::metadata_u64(file, "alloy.loss_scale_growth_tracker", int32_max));
  c.scale.hysteresis_left =
      static_cast<std::int32_t>(detail::metadata_u64(file, "alloy.loss_scale_hysteresis_left", int32_max));
  c.scale.overflows = detail::metadata_u64(file, "alloy.loss_scale_overflows");
  c.seed = detail::metadata_u64(file, "alloy.seed");
  // The invariants of the counters and of the scaler's state.
  if (!(c.scale.scale >= std::numeric_limits<float>::min())) {
    throw error(where + "metadata alloy.loss_scale = " + detail::exact_float(c.scale.scale) +
                " is not a positive normal float");
  }
  if (c.scale.hysteresis_left < 1) {
    throw error(where +
                "metadata alloy.loss_scale_hysteresis_left is 0; a scaler always tolerates at least one "
                "more overflow before backing off (1 or more)");
  }
  if (c.applied_steps > c.attempted_steps || c.skipped_steps > c.attempted_steps - c.applied_steps) {
    throw error(where + "step counters disagree: " + std::to_string(c.applied_steps) + " applied and " +
                std::to_string(c.skipped_steps) + " skipped steps, " + std::to_string(c.attempted_steps) +
                " attempted");
  }
  if (c.scale.overflows > c.attempted_steps) {
    throw error(where + "metadata alloy.loss_scale_overflows = " + std::to_string(c.scale.overflows) +
                " is more than the " + std::to_string(c.attempted_steps) + " attempted steps");
  }
  if (scaler) detail::check_dynamic_scale(file, where, c.scale, *scaler);

  // Stage everything on the host (padding zero, as in every arena); check the weights are finite.
  const std::size_t n = layout.padded_numel();
  std::vector<Param> params(n, round_nearest<Param>(0.0f));
  std::vector<float> master(Store::has_master ? n : 0, 0.0f);
  auto read_into = [&](const std::string& name, void* dst, std::size_t bytes) {
    file.read(name, std::span<std::byte>(static_cast<std::byte*>(dst), bytes));
  };
  for (std::size_t t = 0; t < registry.size(); ++t) {
    const auto& spec = registry.specs()[t];
    const auto& place = layout[t];
    read_into(spec.name, params.data() + place.offset, place.numel * sizeof(Param));
    if constexpr (Store::has_master) {
      read_into("alloy/master/" + spec.name, master.data() + place.offset, place.numel * sizeof(float));
    }
    for (std::size_t i = 0; i < place.numel; ++i) {
      const float v = Store::has_master ? master[place.offset + i] : to_float(params[place.offset + i]);
      if (!std::isfinite(v)) {
        throw error(where + "parameter '" + spec.name + "' holds a non-finite value at element " + std::to_string(i));
      }
      if constexpr (Store::has_master) {
        // The compute copy is the master rounded (to nearest, or stochastically: down or up);
        // anything else (an Inf, zeros, a flipped bit) would be trained on, not the master.
        const float p = to_float(params[place.offset + i]);
        const bool rounding = p == to_float(round_nearest<Param>(v)) || p == to_float(round_stochastic<Param>(v, 0u)) ||
                              p == to_float(round_stochastic<Param>(v, 0xffffffffu));
        if (!rounding) {
          throw error(where + "parameter '" + spec.name + "': its " + numeric_traits<Param>::name +
                      " copy at element " + std::to_string(i) + " is " + detail::exact_float(p) +
                      ", not a rounding of its fp32 master " + detail::exact_float(v));
        }
      }
    }
  }
  // Optimizer state: finite, second moments and q8 scales non-negative.
  auto check_values = [&](const std::string& name, const auto* values, std::size_t count, bool non_negative) {
    for (std::size_t i = 0; i < count; ++i) {
      const float v = to_float(values[i]);
      if (!std::isfinite(v)) {
        throw error(where + "optimizer state '" + name + "' holds a non-finite value at element " + std::to_string(i));
      }
      if (non_negative && v < 0.0f) {
        throw error(where + "optimizer state '" + name + "' holds a negative value at element " + std::to_string(i) +
                    " (a second moment or scale cannot be negative)");
      }
    }
  };
  std::vector<std::vector<State>> state(Store::slots);
  std::vector<std::vector<float>> scales(Store::slots);
  for (int k = 0; k < Store::slots; ++k) {
    state[k].assign(store.state_arena(k).size(), State{});
    if constexpr (Store::state_policy::quantized) scales[k].assign(store.state_scale_arena(k).size(), 0.0f);
  }
  for (std::size_t t = 0; t < registry.size(); ++t) {
    for (const auto& s : state_tensors[t]) {
      State* dst = state[s.slot].data() + s.offset;
      read_into(s.name, dst, s.numel * sizeof(State));
      if constexpr (Store::state_policy::quantized) {
        const auto scale = detail::state_scale_tensor<Store>(s);
        float* sdst = scales[s.slot].data() + scale.offset;
        read_into(scale.name, sdst, scale.numel * sizeof(float));
        check_values(scale.name, sdst, scale.numel, true);
      } else {
        check_values(s.name, dst, s.numel, s.non_negative);
      }
    }
  }

  // The configuration: what the file records against the loading run's.
  LoadReport report;
  report.format = format->second;
  ConfigSettings saved;
  for (const auto& [key, value] : file.metadata()) {
    if (key.rfind(detail::config_key_prefix, 0) == 0) saved[key.substr(detail::config_key_prefix.size())] = value;
  }
  report.config_compared = checked;
  if (checked) report.config_differences = config_differences(saved, config);
  if (on_change == ConfigChange::refuse && !checked) {
    throw error(where + "written in format '" + format->second +
                "', which records no configuration, and this trainer refuses one it cannot compare "
                "(Config::on_config_change = refuse; report loads it)");
  }
  if (on_change == ConfigChange::refuse && !report.config_differences.empty()) {
    std::string list;
    for (const auto& d : report.config_differences) list += (list.empty() ? "" : "; ") + to_string(d);
    throw error(where +
                "saved under another configuration, and this trainer refuses a changed one "
                "(Config::on_config_change = refuse): " +
                list);
  }

  // Commit.
  copy_from_host(store.params_arena(), std::span<const Param>(params));
  if constexpr (Store::has_master) copy_from_host(store.master_arena(), std::span<const float>(master));
  for (int k = 0; k < Store::slots; ++k) {
    copy_from_host(store.state_arena(k), std::span<const State>(state[k]));
    if constexpr (Store::state_policy::quantized) {
      copy_from_host(store.state_scale_arena(k), std::span<const float>(scales[k]));
    }
  }
  store.zero_grads();
  return {c, std::move(report)};
}

}  // namespace alloy
