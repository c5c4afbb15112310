// Launch configuration for every kernel: one block size and one grid policy. A grid has as many
// blocks as the work needs and at most as many as the device keeps resident at once; kernels
// stride over the rest, so for element-wise and row kernels any grid computes the same values.
// The two-stage reduction (backend/cuda.hpp) writes one partial per block, so its bits depend on
// the grid, and through it only on the work size and the device. The multiprocessor count is
// read once per device (backend/device.hpp), not on every launch.
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_RUNTIME

#include <alloy/backend/device.hpp>

#include <algorithm>
#include <cstddef>

namespace alloy::detail {

inline constexpr int cuda_block = 256;        // threads per block of every kernel but LayerNorm's backward
inline constexpr int cuda_blocks_per_sm = 8;  // 8 x 256 = 2048 threads: a full sm_80 or sm_90 multiprocessor

// Blocks of cuda_block threads the current device keeps resident at once: the grid's cap.
inline int resident_blocks() { return current_device_sm_count() * cuda_blocks_per_sm; }

// The grid for `work_items` items when a block takes `items_per_block` of them per pass:
// ceil(work_items / items_per_block) blocks, at least 1, at most resident_blocks().
inline int grid_for(std::size_t work_items, std::size_t items_per_block = cuda_block) {
  const std::size_t wanted = (work_items + items_per_block - 1) / items_per_block;
  const auto cap = static_cast<std::size_t>(resident_blocks());
  return static_cast<int>(std::max<std::size_t>(1, std::min(wanted, cap)));
}

}  // namespace alloy::detail

#endif  // ALLOY_HAS_CUDA_RUNTIME
