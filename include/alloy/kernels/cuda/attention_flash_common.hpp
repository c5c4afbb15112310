// What attention's tensor-core kernels share, whatever their dtype (cuda/attention_flash.hpp for
// bf16 and fp16, cuda/attention_flash_f32.hpp for fp32 and tf32): blocks of 4 warps, cp.async
// copies of whole 16-byte vectors into shared-memory tiles one tile ahead of the math, tiles of
// rows whose placement a layout gives (xor-swizzled 16-bit rows, padded float rows), outputs
// written back as whole 16-byte vectors, the column parts of the output tiles staged on the way
// (attention_args.hpp), and the launch helpers.
//
// A tile layout L has L::chunks, the 16-byte chunks of a row, and L::offset(row, chunk), the byte
// offset of a chunk in the tile.
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_KERNELS

#include <alloy/backend/cuda/warp_reduce.hpp>
#include <alloy/error.hpp>
#include <alloy/kernels/attention_args.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/rounding.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

namespace alloy::detail {

inline constexpr int flash_warps = 4;
inline constexpr int flash_threads = flash_warps * warp_size;
inline constexpr unsigned flash_full_mask = 0xffffffffu;

// ---- PTX: asynchronous copies ----

__device__ ALLOY_FORCEINLINE std::uint32_t flash_shared_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes from global to shared memory, or 16 zero bytes when !valid (src is then not read).
__device__ ALLOY_FORCEINLINE void flash_copy_16(std::uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ ALLOY_FORCEINLINE void flash_copy_4(std::uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}

__device__ ALLOY_FORCEINLINE void flash_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits for this thread's copies; __syncthreads() then makes every thread's visible.
__device__ ALLOY_FORCEINLINE void flash_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// ---- Tiles ----

// Rows first..first + Rows - 1 of one head's sequence (row t at base + t * row_stride) into a tile
// of layout L, by all threads of the block, thread i copying chunks i, i + flash_threads, ... (in
// row-major order of (row, chunk)); rows at or past seq are zeros.
template <class L, int Rows, class T>
__device__ ALLOY_FORCEINLINE void flash_load_rows(std::uint32_t tile, const T* base, std::size_t row_stride, int first,
                                                  int seq) {
  constexpr int chunks = L::chunks, elements = 16 / int(sizeof(T));
  static_assert(Rows * chunks % flash_threads == 0, "flash_load_rows: whole rounds of 16-byte copies");
  ALLOY_UNROLL
  for (int k = 0; k < Rows * chunks / flash_threads; ++k) {
    const int i = int(threadIdx.x) + k * flash_threads;
    const int r = i / chunks, c = i % chunks;
    const bool valid = first + r < seq;
    const T* src = valid ? base + std::size_t(first + r) * row_stride + c * elements : base;
    flash_copy_16(tile + L::offset(r, c), src, valid);
  }
}

// Rows first..first + Rows - 1 of a [seq] float vector (lse or delta) into shared memory; zeros past seq.
template <int Rows>
__device__ ALLOY_FORCEINLINE void flash_load_floats(std::uint32_t dst, const float* base, int first, int seq) {
  for (int i = int(threadIdx.x); i < Rows; i += flash_threads) {
    const bool valid = first + i < seq;
    flash_copy_4(dst + 4 * i, valid ? base + first + i : base, valid);
  }
}

// One warp writes tile rows row0..row0 + rows - 1 (positions first + row) to global memory, whole
// 16-byte chunks, rows at or past seq left alone.
template <class L, class T>
__device__ ALLOY_FORCEINLINE void flash_store_rows(T* base, std::size_t row_stride, const unsigned char* tile, int row0,
                                                   int rows, int first, int seq, int lane) {
  constexpr int chunks = L::chunks, elements = 16 / int(sizeof(T));
  for (int i = lane; i < rows * chunks; i += warp_size) {
    const int row = row0 + i / chunks, c = i % chunks;
    if (first + row < seq) {
      *reinterpret_cast<uint4*>(base + std::size_t(first + row) * row_stride + c * elements) =
          *reinterpret_cast<const uint4*>(tile + L::offset(row, c));
    }
  }
}

// ---- Column parts (attention_args.hpp) ----

// Where the column parts of output `which` (0 dq, 1 dk, 2 dv) of sequence b and head h lie for the
// tile of positions from `first` (a multiple of attention_column_tile).
template <class Args>
__device__ ALLOY_FORCEINLINE float* flash_column_part(const Args& a, std::size_t b, std::size_t h, int first,
                                                      int which) {
  const std::size_t tiles = attention_column_tiles(a.seq), width = a.heads * a.head_dim;
  const std::size_t tile = std::size_t(first) / attention_column_tile;
  return a.column_parts + ((b * tiles + tile) * 3 + std::size_t(which)) * width + h * a.head_dim;
}

// The column parts of Tiles output tiles of D columns of T that every warp of the block has
// staged in shared memory (a __syncthreads() between the staging and this), in layout L, tile k at
// tile0 + k * tile_bytes, rows 0..rows - 1 the tile's positions in order; tile k's parts go to
// parts + k * part_stride. Thread i sums columns i, i + flash_threads, ... of the tiles side by
// side, each over its rows in order from 0 (those at or past seq are not among the rows), with the
// loads of 8 rows in flight before their sums. Out of line: inlined at the kernels' ends it moved
// ptxas's register allocation of whole kernels (fp32's dq kernel at head_dim 128 went from 201
// registers to 168 and spilled); called, every kernel keeps its registers as they were.
template <class L, class T, int D, int Tiles>
__device__ __noinline__ void flash_column_parts(float* parts, std::size_t part_stride, const unsigned char* tile0,
                                                std::uint32_t tile_bytes, int rows) {
  constexpr int elements = 16 / int(sizeof(T)), columns = Tiles * D, group = 8;
  static_assert(columns < flash_threads || columns % flash_threads == 0, "flash_column_parts: whole rounds of columns");
  constexpr int per_thread = (columns + flash_threads - 1) / flash_threads;
  const int i = static_cast<int>(threadIdx.x);
  if (i >= columns) return;
  const auto element = [&](int r, int j) {
    const int column = i + j * flash_threads, c = column % D;
    return to_float(*reinterpret_cast<const T*>(tile0 + (column / D) * tile_bytes + L::offset(r, c / elements) +
                                                (c % elements) * sizeof(T)));
  };
  float sum[per_thread];
  ALLOY_UNROLL
  for (int j = 0; j < per_thread; ++j) sum[j] = 0.0f;
  int r = 0;
  for (; r + group <= rows; r += group) {
    float x[group][per_thread];
    ALLOY_UNROLL
    for (int k = 0; k < group; ++k) {
      ALLOY_UNROLL
      for (int j = 0; j < per_thread; ++j) x[k][j] = element(r + k, j);
    }
    ALLOY_UNROLL
    for (int k = 0; k < group; ++k) {
      ALLOY_UNROLL
      for (int j = 0; j < per_thread; ++j) sum[j] = fp::add(sum[j], x[k][j]);
    }
  }
  for (; r < rows; ++r) {
    ALLOY_UNROLL
    for (int j = 0; j < per_thread; ++j) sum[j] = fp::add(sum[j], element(r, j));
  }
  ALLOY_UNROLL
  for (int j = 0; j < per_thread; ++j) {
    const int column = i + j * flash_threads;
    parts[std::size_t(column / D) * part_stride + column % D] = sum[j];
  }
}

// ---- Launches ----

template <class Kernel>
void flash_allow_shared_bytes(Kernel* kernel, std::size_t bytes) {
  if (bytes > 48 * 1024) {
    ALLOY_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Blocks of a grid of tiles x (batch * heads); a 1-D grid, so at most 2^31 - 1.
inline unsigned flash_grid(std::size_t tiles, std::size_t heads_total, const char* where) {
  const std::size_t blocks = tiles * heads_total;
  if (blocks > 0x7fffffffu) {
    throw error(std::string(where) + ": " + std::to_string(blocks) + " blocks of tiles x batch x heads exceed " +
                "CUDA's 2^31 - 1");
  }
  return static_cast<unsigned>(blocks);
}

}  // namespace alloy::detail

#endif  // ALLOY_HAS_CUDA_KERNELS
