// Trainer checkpoints: one safetensors file. Tensors: each parameter by its declared name in
// the compute dtype (readable by PyTorch and Hugging Face tools as they are), its fp32 master as
// "alloy/master/<name>", and the optimizer state arenas as "alloy/state/<slot>" (with
// "alloy/state_scale/<slot>" for q8 block scales). Metadata: the format version, the policy
// signature, step counters, loss-scaler state and the random seed (stochastic rounding draws
// from (seed, step, element), so that is the whole RNG state).
//
// Writing goes through write_file_atomically: a crash leaves the old checkpoint or the new one.
// Loading validates the whole file (format, signature, every tensor's presence, dtype and shape,
// finite weights) and reads it into host staging before touching the store, so a refused or
// failed load leaves the trainer as it was.
#pragma once

#include <alloy/io/safetensors.hpp>
#include <alloy/precision/loss_scale.hpp>
#include <alloy/train/param_store.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
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

inline constexpr const char* checkpoint_format = "alloy-checkpoint-1";

namespace detail {

inline std::string exact_float(float x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%a", static_cast<double>(x));
  return buf;
}

inline const std::string& required_metadata(const SafetensorsFile& f, const std::string& key) {
  const auto it = f.metadata().find(key);
  if (it == f.metadata().end()) {
    throw error("load checkpoint '" + f.path().string() + "': metadata '" + key + "' is missing");
  }
  return it->second;
}

inline std::uint64_t metadata_u64(const SafetensorsFile& f, const std::string& key) {
  const std::string& v = required_metadata(f, key);
  char* end = nullptr;
  errno = 0;
  const unsigned long long x = std::strtoull(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno == ERANGE || v[0] == '-') {
    throw error("load checkpoint '" + f.path().string() + "': metadata '" + key + "' = '" + v +
                "' is not an unsigned integer");
  }
  return x;
}

inline float metadata_float(const SafetensorsFile& f, const std::string& key) {
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

}  // namespace detail

template <class Store>
void save_checkpoint(const std::filesystem::path& path, Store& store, const CheckpointCounters& c,
                     const std::string& signature) {
  synchronize(store.backend());
  const auto& registry = store.registry();
  const auto& layout = store.layout();
  using Param = typename Store::param_type;
  using State = typename Store::state_storage;
  // Wider dtypes first, so every tensor's offset is a multiple of its element size.
  std::vector<TensorToWrite> f32, narrow, bytes;
  for (std::size_t t = 0; t < registry.size(); ++t) {
    const auto& spec = registry.specs()[t];
    const auto& place = layout[t];
    (sizeof(Param) == 4 ? f32 : narrow)
        .push_back({spec.name, safetensors_dtype_of<Param>(), spec.shape,
                    detail::arena_bytes(store.params_arena(), place.offset, place.numel)});
    if constexpr (Store::has_master) {
      f32.push_back({"alloy/master/" + spec.name, SafetensorsDtype::f32, spec.shape,
                     detail::arena_bytes(store.master_arena(), place.offset, place.numel)});
    }
  }
  for (int k = 0; k < Store::slots; ++k) {
    auto& arena = store.state_arena(k);
    auto& list = sizeof(State) == 4 ? f32 : (sizeof(State) == 2 ? narrow : bytes);
    list.push_back({"alloy/state/" + std::to_string(k),
                    safetensors_dtype_of<State>(),
                    {static_cast<std::int64_t>(arena.size())},
                    detail::arena_bytes(arena, 0, arena.size())});
    if constexpr (Store::state_policy::quantized) {
      auto& scales = store.state_scale_arena(k);
      f32.push_back({"alloy/state_scale/" + std::to_string(k),
                     SafetensorsDtype::f32,
                     {static_cast<std::int64_t>(scales.size())},
                     detail::arena_bytes(scales, 0, scales.size())});
    }
  }
  std::vector<TensorToWrite> all;
  for (auto* list : {&f32, &narrow, &bytes}) {
    for (auto& t : *list) all.push_back(std::move(t));
  }
  const std::map<std::string, std::string> metadata = {
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
  write_safetensors(path, all, metadata);
}

// Validates `path` against `store`, then replaces the store's parameters, master and state with
// the file's and returns its counters. Throws alloy::error, with the store untouched, when the
// file is damaged, foreign, or from another model, precision or optimizer.
template <class Store>
CheckpointCounters load_checkpoint(const std::filesystem::path& path, Store& store, const std::string& signature) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  const std::string where = "load checkpoint '" + path.string() + "': ";
  const auto format = file.metadata().find("alloy.format");
  if (format == file.metadata().end() || format->second != checkpoint_format) {
    throw error(where + "not an alloy checkpoint (metadata alloy.format is " +
                (format == file.metadata().end() ? std::string("missing") : "'" + format->second + "'") +
                ", expected '" + checkpoint_format + "')");
  }
  const std::string& theirs = detail::required_metadata(file, "alloy.signature");
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
  for (const auto& spec : registry.specs()) {
    check(spec.name, safetensors_dtype_of<Param>(), spec.shape);
    if constexpr (Store::has_master) check("alloy/master/" + spec.name, SafetensorsDtype::f32, spec.shape);
  }
  for (int k = 0; k < Store::slots; ++k) {
    check("alloy/state/" + std::to_string(k), safetensors_dtype_of<State>(),
          {static_cast<std::int64_t>(store.state_arena(k).size())});
    if constexpr (Store::state_policy::quantized) {
      check("alloy/state_scale/" + std::to_string(k), SafetensorsDtype::f32,
            {static_cast<std::int64_t>(store.state_scale_arena(k).size())});
    }
  }
  for (const auto& t : file.tensors()) {
    if (!expected.count(t.name)) {
      throw error(where + "tensor '" + t.name + "' is not a parameter of this model (a checkpoint of another model?)");
    }
  }
  CheckpointCounters c;
  c.attempted_steps = detail::metadata_u64(file, "alloy.attempted_steps");
  c.applied_steps = detail::metadata_u64(file, "alloy.applied_steps");
  c.skipped_steps = detail::metadata_u64(file, "alloy.skipped_steps");
  c.scale.scale = detail::metadata_float(file, "alloy.loss_scale");
  c.scale.growth_tracker = static_cast<std::int32_t>(detail::metadata_u64(file, "alloy.loss_scale_growth_tracker"));
  c.scale.hysteresis_left = static_cast<std::int32_t>(detail::metadata_u64(file, "alloy.loss_scale_hysteresis_left"));
  c.scale.overflows = detail::metadata_u64(file, "alloy.loss_scale_overflows");
  c.seed = detail::metadata_u64(file, "alloy.seed");
  if (!(c.scale.scale > 0.0f)) throw error(where + "metadata alloy.loss_scale is not positive");

  // Stage everything on the host; check the weights are finite.
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
    }
  }
  std::vector<std::vector<State>> state(Store::slots);
  std::vector<std::vector<float>> scales(Store::slots);
  for (int k = 0; k < Store::slots; ++k) {
    state[k].resize(store.state_arena(k).size());
    read_into("alloy/state/" + std::to_string(k), state[k].data(), state[k].size() * sizeof(State));
    if constexpr (Store::state_policy::quantized) {
      scales[k].resize(store.state_scale_arena(k).size());
      read_into("alloy/state_scale/" + std::to_string(k), scales[k].data(), scales[k].size() * sizeof(float));
    }
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
  return c;
}

}  // namespace alloy
