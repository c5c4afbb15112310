// State<W>: the width optimizer state (moments) is stored in.
//   State<fp32>  4 bytes per value.
//   State<bf16>  2 bytes per value, written with stochastic rounding (round-to-nearest would
//                stall moments whose updates are below half a bf16 step).
//   State<q8>    1 byte per value: block-wise 8-bit codes relative to a per-block absolute
//                maximum (an fp32 scale per block of 256 values; q8_blockwise<2048> for 2048),
//                first moments as signed E4M3 codes, second moments as unsigned E5M3.
#pragma once

#include <alloy/numeric/minifloat8.hpp>
#include <alloy/numeric/traits.hpp>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace alloy {

template <int Block>
struct q8_blockwise {
  static_assert(Block == 256 || Block == 2048, "q8_blockwise<Block>: Block must be 256 or 2048");
  static constexpr int block = Block;
};
using q8 = q8_blockwise<256>;

template <class T>
inline constexpr bool is_q8_v = false;
template <int B>
inline constexpr bool is_q8_v<q8_blockwise<B>> = true;

template <class W>
struct State {
  static_assert(std::is_same_v<W, float> || std::is_same_v<W, bf16> || is_q8_v<W>,
                "State<W>: W must be fp32, bf16 or q8 (q8_blockwise<256 or 2048>)");
  using width = W;
  static constexpr bool quantized = is_q8_v<W>;
  // What one state value occupies in its arena.
  using storage_type = std::conditional_t<quantized, std::uint8_t, W>;
  static constexpr int quant_block = [] {
    if constexpr (is_q8_v<W>)
      return W::block;
    else
      return 1;
  }();
  // Bytes per parameter per state slot, the per-block scale included.
  static constexpr double bytes_per_value = sizeof(storage_type) + (quantized ? 4.0 / quant_block : 0.0);
};

template <class T>
inline constexpr bool is_state_v = false;
template <class W>
inline constexpr bool is_state_v<State<W>> = true;

}  // namespace alloy
