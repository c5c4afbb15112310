// numeric_traits<T>: the facts about a dtype that kernels and policies need, at compile time.
#pragma once

#include <alloy/numeric/dtype.hpp>

#include <concepts>
#include <cstddef>

namespace alloy {

template <class T>
struct numeric_traits;  // defined for float, tf32, fp16, bf16

template <>
struct numeric_traits<float> {
  using storage_type = float;
  static constexpr const char* name = "fp32";
  static constexpr std::size_t bytes = 4;
  static constexpr int mantissa_bits = 23;  // stored fraction bits
  static constexpr bool has_inf = true;
  ALLOY_HOST_DEVICE static constexpr float max() noexcept { return detail::float_from_bits(0x7f7fffffu); }
  // Smallest positive normal value.
  ALLOY_HOST_DEVICE static constexpr float lowest_normal() noexcept { return detail::float_from_bits(0x00800000u); }
  // Distance from 1 to the next representable value.
  ALLOY_HOST_DEVICE static constexpr float epsilon() noexcept { return detail::float_from_bits(0x34000000u); }
};

// tf32 keeps float storage; its matrix-product inputs carry 10 fraction bits.
template <>
struct numeric_traits<tf32> : numeric_traits<float> {
  static constexpr const char* name = "tf32";
  static constexpr int mantissa_bits = 10;
  ALLOY_HOST_DEVICE static constexpr float epsilon() noexcept { return detail::float_from_bits(0x3a800000u); }
};

template <>
struct numeric_traits<fp16> {
  using storage_type = fp16;
  static constexpr const char* name = "fp16";
  static constexpr std::size_t bytes = 2;
  static constexpr int mantissa_bits = 10;
  static constexpr bool has_inf = true;
  ALLOY_HOST_DEVICE static constexpr fp16 max() noexcept { return fp16::from_bits(0x7bff); }            // 65504
  ALLOY_HOST_DEVICE static constexpr fp16 lowest_normal() noexcept { return fp16::from_bits(0x0400); }  // 2^-14
  ALLOY_HOST_DEVICE static constexpr fp16 epsilon() noexcept { return fp16::from_bits(0x1400); }        // 2^-10
};

template <>
struct numeric_traits<bf16> {
  using storage_type = bf16;
  static constexpr const char* name = "bf16";
  static constexpr std::size_t bytes = 2;
  static constexpr int mantissa_bits = 7;
  static constexpr bool has_inf = true;
  ALLOY_HOST_DEVICE static constexpr bf16 max() noexcept { return bf16::from_bits(0x7f7f); }            // ~3.39e38
  ALLOY_HOST_DEVICE static constexpr bf16 lowest_normal() noexcept { return bf16::from_bits(0x0080); }  // 2^-126
  ALLOY_HOST_DEVICE static constexpr bf16 epsilon() noexcept { return bf16::from_bits(0x3c00); }        // 2^-7
};

// A dtype alloy can store and convert: float, tf32, fp16 or bf16.
template <class T>
concept floating_dtype = requires {
  typename numeric_traits<T>::storage_type;
  { numeric_traits<T>::bytes } -> std::convertible_to<std::size_t>;
};

}  // namespace alloy
