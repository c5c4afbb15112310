// A run's configuration as text, setting by setting ("optimizer.beta2" -> "0.999"), as a
// checkpoint records it, and what differs between two of them. Each Config names its settings
// with for_each_field(f), calling f(name, value) once per setting.
#pragma once

#include <alloy/precision/precision.hpp>
#include <alloy/train/schedule.hpp>

#include <charconv>
#include <map>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace alloy {

// Setting name -> its value as text.
using ConfigSettings = std::map<std::string, std::string>;

// One setting that differs between a checkpoint and the trainer loading it.
struct ConfigDifference {
  std::string name;     // "optimizer.beta2", "schedule.total_steps", "max_grad_norm"
  std::string saved;    // as the checkpoint records it; "(not recorded)" when it has none
  std::string loading;  // the loading trainer's; "(not a setting here)" when it has none
};

// "optimizer.beta2: saved 0.95, this trainer 0.999"
inline std::string to_string(const ConfigDifference& d) {
  return d.name + ": saved " + d.saved + ", this trainer " + d.loading;
}

// A float in the shortest text that reads back as the same float: equal text, equal value.
inline std::string setting_text(float v) {
  char buf[32];
  const auto end = std::to_chars(buf, buf + sizeof buf, v).ptr;
  return std::string(buf, end);
}
inline std::string setting_text(bool v) { return v ? "true" : "false"; }
template <class I>
requires(std::is_integral_v<I> && !std::is_same_v<I, bool>) std::string setting_text(I v) { return std::to_string(v); }
inline std::string setting_text(LrSchedule::Decay d) {
  switch (d) {
    case LrSchedule::Decay::linear:
      return "linear";
    case LrSchedule::Decay::cosine:
      return "cosine";
    default:
      return "constant";
  }
}
inline std::string setting_text(Rounding r) { return r == Rounding::stochastic ? "stochastic" : "nearest_even"; }

// Adds each setting of `config` (a type with for_each_field) as "<prefix>.<name>".
template <class C>
void add_settings(ConfigSettings& out, std::string_view prefix, const C& config) {
  config.for_each_field([&](const char* name, const auto& value) {
    std::string key(prefix);
    key += '.';
    key += name;
    out[key] = setting_text(value);
  });
}

// Each setting whose value differs, or that one side has and the other not, by name.
template <class = void>
std::vector<ConfigDifference> config_differences(const ConfigSettings& saved, const ConfigSettings& loading) {
  std::vector<ConfigDifference> out;
  auto s = saved.begin();
  auto l = loading.begin();
  while (s != saved.end() || l != loading.end()) {
    if (l == loading.end() || (s != saved.end() && s->first < l->first)) {
      out.push_back({s->first, s->second, "(not a setting here)"});
      ++s;
    } else if (s == saved.end() || l->first < s->first) {
      out.push_back({l->first, "(not recorded)", l->second});
      ++l;
    } else {
      if (s->second != l->second) out.push_back({s->first, s->second, l->second});
      ++s, ++l;
    }
  }
  return out;
}

}  // namespace alloy
