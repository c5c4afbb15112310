// Attention's tensor-core kernels, flash-style (the FlashAttention-2 algorithm: tiles of queries
// against tiles of keys in shared memory, an online softmax, P and dS never leaving registers),
// for bf16 and fp16 with head_dim 64 or 128: mma.sync m16n8k16 (16-bit inputs, fp32 accumulators)
// fed by ldmatrix from shared-memory tiles that cp.async fills one tile ahead of the math. fp32 and
// tf32 (float storage) run the same algorithm on m16n8k8 tf32 mmas in cuda/attention_flash_f32.hpp;
// the copies, tile loads and stores and launch helpers both use are in attention_flash_common.hpp.
//
// Every kernel has 4 warps. Tiles are rows of head_dim 16-bit elements in shared memory, their
// 16-byte chunks xor-swizzled by row % 8 so that the 8 rows one ldmatrix reads fall in distinct
// banks. Rows past seq are zero-filled by cp.async (so no NaN from stale memory reaches an mma)
// and masked by the causal test (key > query), which covers them: every real query precedes them.
//  forward  a block per (query tile, batch * head), longest rows first: 16 (head_dim 128) or 32
//           (64) query rows per warp, their Q fragments in registers; key tiles of 64 (the online
//           softmax's block, as on the Host); S = Q K^T, the running maximum and sum, P rounded
//           to T in registers as the A operand of O += P V. Key tiles past the tile's last query
//           are skipped, and a warp skips a tile all of whose keys follow its rows.
//  dq       a block per (query tile of 64, batch * head): delta_t = dot(dout_t, out_t) into
//           scratch, then per key tile (64, or 32 for head_dim 128) S = Q K^T, dP = dO V^T,
//           dS = P (dP - delta) in registers, dQ += dS K.
//  dk, dv   a block per (key tile of 64, batch * head), 16 keys per warp, after the dq kernel:
//           per query tile (64, or 32) S^T = K Q^T, dP^T = V dO^T, then dV += P^T dO and
//           dK += dS^T Q with P^T and dS^T in registers, lse and delta from shared memory.
// On sm_90a (device code compiled for CMAKE_CUDA_ARCHITECTURES 90a) the three kernels for head_dim
// 64 run Hopper's warpgroup MMA instead (attention_flash_wgmma.hpp, the "Hopper" section below):
// the same blocks, tiles and sums, Q, K, V and dO read by wgmma from the same swizzled tiles, and
// each block's softmax arithmetic overlapping its own products in flight.
// dq and dk/dv are separate kernels so that each output element is summed by one thread in a
// fixed order: no atomics, the same bits every run. The price is computing S and dP twice (7
// products where FlashAttention-2's atomic dq needs 5). Outputs are staged through shared memory
// and written as whole 16-byte rows; a block's dq, or dk and dv, are 64 positions, so when the
// backward's column parts are asked for (attention_args.hpp) the block then sums each staged
// column over its rows, a thread per column, after a __syncthreads (flash_column_parts).
// scripts/attention_fragments.py emulates the fragment helpers lane by lane (from the PTX ISA's
// ldmatrix and mma layouts) and checks every product above; scripts/attention_tiles.py mirrors the
// tile loops, skips, masks and tails against float64.
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_KERNELS

#include <alloy/backend/cuda/warp_reduce.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/kernels/attention_args.hpp>
#include <alloy/kernels/cuda/attention_flash_common.hpp>
#include <alloy/kernels/cuda/attention_flash_wgmma.hpp>
#include <alloy/kernels/detail/attention_rows.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace alloy::detail {

// Tile sizes per head_dim: 128 keeps the accumulators of each warp within 255 registers.
template <int D>
struct FlashTiles;
template <>
struct FlashTiles<64> {
  static constexpr int forward_m_tiles = 2;  // 32 query rows per warp, 128 per block
  static constexpr int dq_keys = 64;
  static constexpr int dkdv_queries = 64;
};
template <>
struct FlashTiles<128> {
  static constexpr int forward_m_tiles = 1;  // 16 query rows per warp, 64 per block
  static constexpr int dq_keys = 32;
  static constexpr int dkdv_queries = 32;
};

// ---- PTX: ldmatrix, mma ----

__device__ ALLOY_FORCEINLINE void flash_ldmatrix(std::uint32_t (&r)[4], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ ALLOY_FORCEINLINE void flash_ldmatrix_transposed(std::uint32_t (&r)[4], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// c += a b for a 16 x 16 A (row-major fragments) and a 16 x 8 B (column-major), fp32 accumulators.
template <class T>
__device__ ALLOY_FORCEINLINE void flash_mma(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                            std::uint32_t b1) {
  if constexpr (std::is_same_v<T, bf16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---- Fragments ----
// In an m16n8 accumulator c, lane = 4 g + tq holds (row g, columns 2 tq, 2 tq + 1) in c[0], c[1]
// and (row g + 8, the same columns) in c[2], c[3]. An A fragment holds, in order, (row g, columns
// 2 tq..) (row g + 8, 2 tq..) (row g, 8 + 2 tq..) (row g + 8, 8 + 2 tq..), two 16-bit values per
// register, the lower column in the low half; a B fragment (k = 2 tq.., n = g) then (k = 8 + 2 tq..,
// n = g). So the accumulators of two adjacent n-tiles, rounded and packed, are an A fragment.

template <class T>
__device__ ALLOY_FORCEINLINE std::uint32_t flash_pack(float low, float high) {
  return std::uint32_t(round_nearest<T>(low).bits()) | (std::uint32_t(round_nearest<T>(high).bits()) << 16);
}

template <class T>
__device__ ALLOY_FORCEINLINE void flash_a_from_accumulators(std::uint32_t (&a)[4], const float (&left)[4],
                                                            const float (&right)[4]) {
  a[0] = flash_pack<T>(left[0], left[1]);
  a[1] = flash_pack<T>(left[2], left[3]);
  a[2] = flash_pack<T>(right[0], right[1]);
  a[3] = flash_pack<T>(right[2], right[3]);
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of rows of D elements.
template <int D>
__device__ ALLOY_FORCEINLINE std::uint32_t flash_offset(int row, int chunk) {
  return static_cast<std::uint32_t>((row * (D / 8) + (chunk ^ (row & 7))) * 16);
}

// The 16-bit kernels' tile layout (attention_flash_common.hpp): rows of D elements, unpadded,
// chunks swizzled by flash_offset.
template <int D>
struct FlashSwizzledRows {
  static constexpr int chunks = D / 8;
  __device__ static ALLOY_FORCEINLINE std::uint32_t offset(int row, int chunk) { return flash_offset<D>(row, chunk); }
};

// The A fragment of rows row0..row0 + 15, columns 16 kk..16 kk + 15 of a row-major tile. ldmatrix's
// four 8 x 8 matrices come from lanes 0-7 (rows 0-7, columns 0-7), 8-15 (rows 8-15), 16-23 (rows
// 0-7, columns 8-15) and 24-31.
template <int D>
__device__ ALLOY_FORCEINLINE void flash_load_a(std::uint32_t (&a)[4], std::uint32_t tile, int row0, int kk, int lane) {
  flash_ldmatrix(a, tile + flash_offset<D>(row0 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * kk + (lane >> 4)));
}

// B fragments of two n-tiles from a tile whose rows are n and columns k (K for S = Q K^T):
// b[0], b[1] for rows n0..n0 + 7 and b[2], b[3] for n0 + 8..n0 + 15, columns 16 kk..16 kk + 15.
template <int D>
__device__ ALLOY_FORCEINLINE void flash_load_b(std::uint32_t (&b)[4], std::uint32_t tile, int n0, int kk, int lane) {
  flash_ldmatrix(b, tile + flash_offset<D>(n0 + (lane & 7) + (lane >> 4) * 8, 2 * kk + ((lane >> 3) & 1)));
}

// B fragments of two n-tiles from a tile whose rows are k and columns n (V for O = P V), transposed
// by ldmatrix: rows k0..k0 + 15; b[0], b[1] for columns 16 np..16 np + 7, b[2], b[3] for the next 8.
template <int D>
__device__ ALLOY_FORCEINLINE void flash_load_b_transposed(std::uint32_t (&b)[4], std::uint32_t tile, int k0, int np,
                                                          int lane) {
  flash_ldmatrix_transposed(b, tile + flash_offset<D>(k0 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * np + (lane >> 4)));
}

// Rows first..first + Rows - 1 of one head's sequence into a swizzled tile (flash_load_rows).
template <int Rows, int D, class T>
__device__ ALLOY_FORCEINLINE void flash_load_tile(std::uint32_t tile, const T* base, std::size_t row_stride, int first,
                                                  int seq) {
  flash_load_rows<FlashSwizzledRows<D>, Rows>(tile, base, row_stride, first, seq);
}

// Rounds one warp's accumulator rows (16 of them: local rows row0 + g and row0 + g + 8, times
// `factor`) into its own rows of a swizzled tile.
template <class T, int D>
__device__ ALLOY_FORCEINLINE void flash_stage_rows(unsigned char* tile, const float (&acc)[D / 8][4], int row0,
                                                   float factor, int lane) {
  const int g = lane / 4, tq = lane % 4;
  ALLOY_UNROLL
  for (int half = 0; half < 2; ++half) {
    ALLOY_UNROLL
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<std::uint32_t*>(tile + flash_offset<D>(row0 + g + 8 * half, n) + 4 * tq) =
          flash_pack<T>(acc[n][2 * half] * factor, acc[n][2 * half + 1] * factor);
    }
  }
}

// ---- Forward ----

// The query block of a forward or dq launch: its head (blocks of the longest rows first), its
// first query and how many key tiles of Bc its causal rows reach.
template <class T, int Br, int Bc>
struct FlashQueryBlock {
  int seq;
  std::size_t bh, b, h;
  const T *q, *k, *v;
  int q0, key_tiles;

  template <class Args>
  __device__ ALLOY_FORCEINLINE explicit FlashQueryBlock(const Args& a) : seq(static_cast<int>(a.seq)) {
    const std::size_t heads_total = a.batch * a.heads;
    const int query_tiles = (seq + Br - 1) / Br;
    const int qb = query_tiles - 1 - static_cast<int>(blockIdx.x / heads_total);
    bh = blockIdx.x % heads_total, b = bh / a.heads, h = bh % a.heads;
    const AttentionStrides& in = a.qkv_strides;
    q = a.q + b * in.batch + h * in.head;
    k = a.k + b * in.batch + h * in.head;
    v = a.v + b * in.batch + h * in.head;
    q0 = qb * Br;
    key_tiles = ((q0 + Br < seq ? q0 + Br : seq) - 1) / Bc + 1;
  }
};

template <class T, int D, int MTiles>
__device__ ALLOY_FORCEINLINE void flash_forward_mma(const AttentionArgs<T>& a, float scale_log2) {
  extern __shared__ __align__(128) unsigned char attention_shared[];
  constexpr int Bc = attention_key_block;
  constexpr int warp_rows = 16 * MTiles;
  constexpr int Br = flash_warps * warp_rows;
  constexpr int KD = D / 16;  // k-steps over head dimensions
  constexpr int NK = Bc / 8;  // n-tiles of keys
  constexpr int ND = D / 8;   // n-tiles of head dimensions
  constexpr std::uint32_t kv_bytes = Bc * D * sizeof(T);
  const std::uint32_t q_tile = flash_shared_address(attention_shared);
  const std::uint32_t k_tiles = q_tile + Br * D * sizeof(T);
  const std::uint32_t v_tiles = k_tiles + 2 * kv_bytes;

  const FlashQueryBlock<T, Br, Bc> block(a);
  const int seq = block.seq, q0 = block.q0, key_tiles = block.key_tiles;
  const std::size_t bh = block.bh, b = block.b, h = block.h;
  const AttentionStrides& in = a.qkv_strides;
  const T *q = block.q, *k = block.k, *v = block.v;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size, g = lane / 4, tq = lane % 4;
  const int warp_row0 = warp * warp_rows;
  const int warp_last = q0 + warp_row0 + warp_rows - 1;  // the warp's last query position

  flash_load_tile<Br, D>(q_tile, q, in.row, q0, seq);
  flash_load_tile<Bc, D>(k_tiles, k, in.row, 0, seq);
  flash_load_tile<Bc, D>(v_tiles, v, in.row, 0, seq);
  flash_commit();

  std::uint32_t qf[MTiles][KD][4];
  float o[MTiles][ND][4];
  float row_max[MTiles][2], row_sum[MTiles][2];
  ALLOY_UNROLL
  for (int mt = 0; mt < MTiles; ++mt) {
    ALLOY_UNROLL
    for (int n = 0; n < ND; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
    row_max[mt][0] = row_max[mt][1] = attention_negative_infinity;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }

  for (int j = 0; j < key_tiles; ++j) {
    flash_wait_all();
    __syncthreads();  // tile j is in; every warp is done with tile j - 1, whose buffers refill now
    if (j == 0) {
      ALLOY_UNROLL
      for (int mt = 0; mt < MTiles; ++mt) {
        ALLOY_UNROLL
        for (int kk = 0; kk < KD; ++kk) flash_load_a<D>(qf[mt][kk], q_tile, warp_row0 + 16 * mt, kk, lane);
      }
    }
    if (j + 1 < key_tiles) {
      const std::uint32_t next = ((j + 1) & 1) * kv_bytes;
      flash_load_tile<Bc, D>(k_tiles + next, k, in.row, (j + 1) * Bc, seq);
      flash_load_tile<Bc, D>(v_tiles + next, v, in.row, (j + 1) * Bc, seq);
      flash_commit();
    }
    const int k0 = j * Bc;
    if (k0 > warp_last) continue;  // every key of the tile follows the warp's rows
    const std::uint32_t kt = k_tiles + (j & 1) * kv_bytes, vt = v_tiles + (j & 1) * kv_bytes;

    float s[MTiles][NK][4];
    ALLOY_UNROLL
    for (int mt = 0; mt < MTiles; ++mt) {
      ALLOY_UNROLL
      for (int n = 0; n < NK; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
    }
    ALLOY_UNROLL
    for (int kk = 0; kk < KD; ++kk) {
      ALLOY_UNROLL
      for (int np = 0; np < NK / 2; ++np) {
        std::uint32_t bf[4];
        flash_load_b<D>(bf, kt, 16 * np, kk, lane);
        ALLOY_UNROLL
        for (int mt = 0; mt < MTiles; ++mt) {
          flash_mma<T>(s[mt][2 * np], qf[mt][kk], bf[0], bf[1]);
          flash_mma<T>(s[mt][2 * np + 1], qf[mt][kk], bf[2], bf[3]);
        }
      }
    }
    if (k0 + Bc - 1 > q0 + warp_row0) {  // some key of the tile follows some row of the warp
      ALLOY_UNROLL
      for (int mt = 0; mt < MTiles; ++mt) {
        ALLOY_UNROLL
        for (int n = 0; n < NK; ++n) {
          ALLOY_UNROLL
          for (int e = 0; e < 4; ++e) {
            const int row = q0 + warp_row0 + 16 * mt + g + 8 * (e >> 1);
            const int key = k0 + 8 * n + 2 * tq + (e & 1);
            if (key > row) s[mt][n][e] = attention_negative_infinity;
          }
        }
      }
    }
    // The online softmax: each row's maximum over the tile (its 4 lanes' shares), the rescaling
    // of what was summed before, then P = 2^(s scale log2(e) - max) in place of s.
    ALLOY_UNROLL
    for (int mt = 0; mt < MTiles; ++mt) {
      ALLOY_UNROLL
      for (int half = 0; half < 2; ++half) {
        float tile_max = attention_negative_infinity;
        ALLOY_UNROLL
        for (int n = 0; n < NK; ++n) tile_max = fmaxf(tile_max, fmaxf(s[mt][n][2 * half], s[mt][n][2 * half + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(flash_full_mask, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(flash_full_mask, tile_max, 2));
        const float next_max = fmaxf(row_max[mt][half], tile_max * scale_log2);
        const float factor = exp2f(row_max[mt][half] - next_max);
        row_max[mt][half] = next_max;
        float sum = row_sum[mt][half] * factor;
        ALLOY_UNROLL
        for (int n = 0; n < ND; ++n) {
          o[mt][n][2 * half] *= factor;
          o[mt][n][2 * half + 1] *= factor;
        }
        ALLOY_UNROLL
        for (int n = 0; n < NK; ++n) {
          ALLOY_UNROLL
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            const float p = exp2f(fmaf(s[mt][n][e], scale_log2, -next_max));
            s[mt][n][e] = p;
            sum += p;
          }
        }
        row_sum[mt][half] = sum;
      }
    }
    // O += P V, P rounded to T: k-steps of 16 keys.
    ALLOY_UNROLL
    for (int kk = 0; kk < NK / 2; ++kk) {
      std::uint32_t pa[MTiles][4];
      ALLOY_UNROLL
      for (int mt = 0; mt < MTiles; ++mt) flash_a_from_accumulators<T>(pa[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
      ALLOY_UNROLL
      for (int np = 0; np < ND / 2; ++np) {
        std::uint32_t bf[4];
        flash_load_b_transposed<D>(bf, vt, 16 * kk, np, lane);
        ALLOY_UNROLL
        for (int mt = 0; mt < MTiles; ++mt) {
          flash_mma<T>(o[mt][2 * np], pa[mt], bf[0], bf[1]);
          flash_mma<T>(o[mt][2 * np + 1], pa[mt], bf[2], bf[3]);
        }
      }
    }
  }

  // out = O / sum, staged in the warp's own rows of the Q tile (only this warp read them, into
  // registers before the key loop's first __syncthreads; the __syncwarp keeps the order explicit).
  __syncwarp();
  const std::size_t lse_row0 = bh * a.seq;
  ALLOY_UNROLL
  for (int mt = 0; mt < MTiles; ++mt) {
    float inverse[2];
    ALLOY_UNROLL
    for (int half = 0; half < 2; ++half) {
      float sum = row_sum[mt][half];
      sum += __shfl_xor_sync(flash_full_mask, sum, 1);
      sum += __shfl_xor_sync(flash_full_mask, sum, 2);
      inverse[half] = 1.0f / sum;
      const int row = q0 + warp_row0 + 16 * mt + g + 8 * half;
      if (tq == 0 && row < seq && a.lse) {
        a.lse[lse_row0 + row] = row_max[mt][half] * attention_ln2 + logf(sum);
      }
    }
    ALLOY_UNROLL
    for (int half = 0; half < 2; ++half) {
      ALLOY_UNROLL
      for (int n = 0; n < ND; ++n) {
        *reinterpret_cast<std::uint32_t*>(attention_shared + flash_offset<D>(warp_row0 + 16 * mt + g + 8 * half, n) +
                                          4 * tq) =
            flash_pack<T>(o[mt][n][2 * half] * inverse[half], o[mt][n][2 * half + 1] * inverse[half]);
      }
    }
  }
  __syncwarp();
  T* out = a.out + b * a.out_strides.batch + h * a.out_strides.head;
  flash_store_rows<FlashSwizzledRows<D>>(out, a.out_strides.row, attention_shared, warp_row0, warp_rows, q0, seq, lane);
}

// ---- Backward: dq (and delta) ----

// dq's column parts (attention_args.hpp), when asked for, from the block's 64-row dq tile, which
// every warp has staged in its rows of `shared` (layout FlashSwizzledRows<D>).
template <class T, int D>
__device__ ALLOY_FORCEINLINE void flash_dq_column_parts(const AttentionBackwardArgs<T>& a, const unsigned char* shared,
                                                        std::size_t b, std::size_t h, int q0) {
  static_assert(flash_warps * 16 == attention_column_tile, "flash_dq_column_parts: the dq tile is a parts tile");
  if (a.column_parts == nullptr) return;
  __syncthreads();  // every warp's rows are staged
  const int rows = static_cast<int>(a.seq) - q0 < flash_warps * 16 ? static_cast<int>(a.seq) - q0 : flash_warps * 16;
  flash_column_parts<FlashSwizzledRows<D>, T, D, 1>(flash_column_part(a, b, h, q0, 0), a.heads * a.head_dim, shared, 0,
                                                    rows);
}

template <class T, int D, int Bc>
__device__ ALLOY_FORCEINLINE void flash_backward_dq_mma(const AttentionBackwardArgs<T>& a, float scale,
                                                        float scale_log2) {
  extern __shared__ __align__(128) unsigned char attention_shared[];
  constexpr int Br = flash_warps * 16;
  constexpr int KD = D / 16, NK = Bc / 8, ND = D / 8;
  constexpr std::uint32_t row_tile_bytes = Br * D * sizeof(T), kv_bytes = Bc * D * sizeof(T);
  const std::uint32_t q_tile = flash_shared_address(attention_shared);
  const std::uint32_t do_tile = q_tile + row_tile_bytes;
  const std::uint32_t k_tiles = do_tile + row_tile_bytes;
  const std::uint32_t v_tiles = k_tiles + 2 * kv_bytes;

  const FlashQueryBlock<T, Br, Bc> block(a);
  const int seq = block.seq, q0 = block.q0, key_tiles = block.key_tiles;
  const std::size_t bh = block.bh, b = block.b, h = block.h;
  const AttentionStrides &in = a.qkv_strides, &os = a.out_strides;
  const T *q = block.q, *k = block.k, *v = block.v;
  const T* out = a.out + b * os.batch + h * os.head;
  const T* dout = a.dout + b * os.batch + h * os.head;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size, g = lane / 4, tq = lane % 4;
  const int warp_row0 = warp * 16;
  const int warp_last = q0 + warp_row0 + 15;
  const std::size_t row0 = bh * a.seq;

  flash_load_tile<Br, D>(q_tile, q, in.row, q0, seq);
  flash_load_tile<Br, D>(do_tile, dout, os.row, q0, seq);
  flash_load_tile<Bc, D>(k_tiles, k, in.row, 0, seq);
  flash_load_tile<Bc, D>(v_tiles, v, in.row, 0, seq);
  flash_commit();
  flash_wait_all();
  __syncthreads();

  std::uint32_t qf[KD][4], dof[KD][4];
  ALLOY_UNROLL
  for (int kk = 0; kk < KD; ++kk) {
    flash_load_a<D>(qf[kk], q_tile, warp_row0, kk, lane);
    flash_load_a<D>(dof[kk], do_tile, warp_row0, kk, lane);
  }

  // delta_t = dot(dout_t, out_t) for the warp's 16 rows: lanes 2 r and 2 r + 1 take row r's two
  // halves, then each thread fetches those of its rows g and g + 8.
  float delta[2];
  {
    const int local = warp_row0 + lane / 2, t = q0 + local;
    float part = 0.0f;
    if (t < seq) {
      ALLOY_UNROLL
      for (int cc = 0; cc < ND / 2; ++cc) {
        const int c = (lane & 1) * (ND / 2) + cc;
        T dov[8], ov[8];
        const uint4 du = *reinterpret_cast<const uint4*>(attention_shared + row_tile_bytes + flash_offset<D>(local, c));
        const uint4 ou = *reinterpret_cast<const uint4*>(out + std::size_t(t) * os.row + c * 8);
        memcpy(dov, &du, 16);
        memcpy(ov, &ou, 16);
        ALLOY_UNROLL
        for (int e = 0; e < 8; ++e) part = fmaf(to_float(dov[e]), to_float(ov[e]), part);
      }
    }
    const float total = part + __shfl_xor_sync(flash_full_mask, part, 1);
    if ((lane & 1) == 0 && t < seq) a.scratch[row0 + t] = total;
    delta[0] = __shfl_sync(flash_full_mask, total, 2 * g);
    delta[1] = __shfl_sync(flash_full_mask, total, 2 * g + 16);
  }
  float lse_log2[2];
  ALLOY_UNROLL
  for (int half = 0; half < 2; ++half) {
    const int t = q0 + warp_row0 + g + 8 * half;
    lse_log2[half] = t < seq ? a.lse[row0 + t] * attention_log2e : 0.0f;
  }

  float dq[ND][4];
  ALLOY_UNROLL
  for (int n = 0; n < ND; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;

  for (int j = 0; j < key_tiles; ++j) {
    if (j > 0) {
      flash_wait_all();
      __syncthreads();
    }
    if (j + 1 < key_tiles) {
      const std::uint32_t next = ((j + 1) & 1) * kv_bytes;
      flash_load_tile<Bc, D>(k_tiles + next, k, in.row, (j + 1) * Bc, seq);
      flash_load_tile<Bc, D>(v_tiles + next, v, in.row, (j + 1) * Bc, seq);
      flash_commit();
    }
    const int k0 = j * Bc;
    if (k0 > warp_last) continue;
    const std::uint32_t kt = k_tiles + (j & 1) * kv_bytes, vt = v_tiles + (j & 1) * kv_bytes;

    float s[NK][4], dp[NK][4];
    ALLOY_UNROLL
    for (int n = 0; n < NK; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
    }
    ALLOY_UNROLL
    for (int kk = 0; kk < KD; ++kk) {
      ALLOY_UNROLL
      for (int np = 0; np < NK / 2; ++np) {
        std::uint32_t bf[4];
        flash_load_b<D>(bf, kt, 16 * np, kk, lane);
        flash_mma<T>(s[2 * np], qf[kk], bf[0], bf[1]);
        flash_mma<T>(s[2 * np + 1], qf[kk], bf[2], bf[3]);
        flash_load_b<D>(bf, vt, 16 * np, kk, lane);
        flash_mma<T>(dp[2 * np], dof[kk], bf[0], bf[1]);
        flash_mma<T>(dp[2 * np + 1], dof[kk], bf[2], bf[3]);
      }
    }
    // dS = P (dP - delta) in place of s, P recomputed from lse; 0 where the key follows the row.
    const bool masking = k0 + Bc - 1 > q0 + warp_row0;
    ALLOY_UNROLL
    for (int n = 0; n < NK; ++n) {
      ALLOY_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int half = e >> 1;
        float p = exp2f(fmaf(s[n][e], scale_log2, -lse_log2[half]));
        if (masking && k0 + 8 * n + 2 * tq + (e & 1) > q0 + warp_row0 + g + 8 * half) p = 0.0f;
        s[n][e] = p * (dp[n][e] - delta[half]);
      }
    }
    // dQ += dS K, dS rounded to T: k-steps of 16 keys.
    ALLOY_UNROLL
    for (int kk = 0; kk < NK / 2; ++kk) {
      std::uint32_t da[4];
      flash_a_from_accumulators<T>(da, s[2 * kk], s[2 * kk + 1]);
      ALLOY_UNROLL
      for (int np = 0; np < ND / 2; ++np) {
        std::uint32_t bf[4];
        flash_load_b_transposed<D>(bf, kt, 16 * kk, np, lane);
        flash_mma<T>(dq[2 * np], da, bf[0], bf[1]);
        flash_mma<T>(dq[2 * np + 1], da, bf[2], bf[3]);
      }
    }
  }

  __syncwarp();  // every lane's last read of the warp's Q rows before any lane writes them
  flash_stage_rows<T, D>(attention_shared, dq, warp_row0, scale, lane);  // the warp's own Q rows
  __syncwarp();
  T* dq_out = a.dq + b * a.grad_strides.batch + h * a.grad_strides.head;
  flash_store_rows<FlashSwizzledRows<D>>(dq_out, a.grad_strides.row, attention_shared, warp_row0, 16, q0, seq, lane);
  flash_dq_column_parts<T, D>(a, attention_shared, b, h, q0);
}

// ---- Backward: dk and dv ----

// What a dk/dv block works on, on either path (mma.sync, wgmma): its batch and head, its Bc keys
// from k0, the query tiles it visits (first_tile..last_tile), and its shared memory from `base`:
// the K tile, the V tile, then two buffers each of Q, dO, lse and delta, refilled in turn.
template <class T, int D, int Bq>
struct FlashDkdvBlock {
  static constexpr int Bc = flash_warps * 16;
  static constexpr std::uint32_t key_tile_bytes = Bc * D * sizeof(T), query_tile_bytes = Bq * D * sizeof(T);
  static constexpr std::uint32_t v_offset = key_tile_bytes;
  static constexpr std::uint32_t q_offset = 2 * key_tile_bytes;
  static constexpr std::uint32_t do_offset = q_offset + 2 * query_tile_bytes;
  static constexpr std::uint32_t lse_offset = do_offset + 2 * query_tile_bytes;
  static constexpr std::uint32_t delta_offset = lse_offset + 2 * Bq * sizeof(float);

  const AttentionBackwardArgs<T>& a;
  std::uint32_t base;
  int seq;
  std::size_t b, h;
  const T *q, *k, *v, *dout;
  const float *lse, *delta;
  int k0, first_tile, last_tile;

  __device__ ALLOY_FORCEINLINE FlashDkdvBlock(const AttentionBackwardArgs<T>& args, std::uint32_t shared)
      : a(args), base(shared), seq(static_cast<int>(args.seq)) {
    const std::size_t heads_total = a.batch * a.heads;
    const int kb = static_cast<int>(blockIdx.x / heads_total);  // the longest columns (first keys) first
    const std::size_t bh = blockIdx.x % heads_total;
    b = bh / a.heads, h = bh % a.heads;
    const AttentionStrides &in = a.qkv_strides, &os = a.out_strides;
    q = a.q + b * in.batch + h * in.head;
    k = a.k + b * in.batch + h * in.head;
    v = a.v + b * in.batch + h * in.head;
    dout = a.dout + b * os.batch + h * os.head;
    const std::size_t row0 = bh * a.seq;
    lse = a.lse + row0;
    delta = a.scratch + row0;
    k0 = kb * Bc;
    first_tile = k0 / Bq, last_tile = (seq - 1) / Bq;
  }

  // Query tile `tile`'s Q, dO, lse and delta into buffer `buffer`.
  __device__ ALLOY_FORCEINLINE void load_query_tile(int tile, int buffer) const {
    flash_load_tile<Bq, D>(base + q_offset + buffer * query_tile_bytes, q, a.qkv_strides.row, tile * Bq, seq);
    flash_load_tile<Bq, D>(base + do_offset + buffer * query_tile_bytes, dout, a.out_strides.row, tile * Bq, seq);
    flash_load_floats<Bq>(base + lse_offset + buffer * Bq * 4, lse, tile * Bq, seq);
    flash_load_floats<Bq>(base + delta_offset + buffer * Bq * 4, delta, tile * Bq, seq);
  }

  // The block's K and V and the first query tile, one commit group.
  __device__ ALLOY_FORCEINLINE void load_keys_and_first_queries() const {
    flash_load_tile<Bc, D>(base, k, a.qkv_strides.row, k0, seq);
    flash_load_tile<Bc, D>(base + v_offset, v, a.qkv_strides.row, k0, seq);
    load_query_tile(first_tile, 0);
    flash_commit();
  }

  // dK (times scale) and dV, staged in the warp's own rows of the K and V tiles (`shared` is the
  // block's shared memory; every read of those rows must be done), then written as whole rows, and
  // their column parts when asked for.
  __device__ ALLOY_FORCEINLINE void store(unsigned char* shared, const float (&dk)[D / 8][4],
                                          const float (&dv)[D / 8][4], float scale, int warp, int lane) const {
    flash_stage_rows<T, D>(shared, dk, warp * 16, scale, lane);
    flash_stage_rows<T, D>(shared + v_offset, dv, warp * 16, 1.0f, lane);
    __syncwarp();
    const AttentionStrides& gs = a.grad_strides;
    flash_store_rows<FlashSwizzledRows<D>>(a.dk + b * gs.batch + h * gs.head, gs.row, shared, warp * 16, 16, k0, seq,
                                           lane);
    flash_store_rows<FlashSwizzledRows<D>>(a.dv + b * gs.batch + h * gs.head, gs.row, shared + v_offset, warp * 16, 16,
                                           k0, seq, lane);
    if (a.column_parts != nullptr) {  // dk's and dv's column parts (attention_args.hpp) from the staged tiles
      static_assert(Bc == attention_column_tile, "FlashDkdvBlock: the key tile is a parts tile");
      __syncthreads();  // every warp's rows are staged
      flash_column_parts<FlashSwizzledRows<D>, T, D, 2>(flash_column_part(a, b, h, k0, 1), a.heads * a.head_dim, shared,
                                                        v_offset, seq - k0 < Bc ? seq - k0 : Bc);
    }
  }
};

template <class T, int D, int Bq>
__device__ ALLOY_FORCEINLINE void flash_backward_dkdv_mma(const AttentionBackwardArgs<T>& a, float scale,
                                                          float scale_log2) {
  extern __shared__ __align__(128) unsigned char attention_shared[];
  constexpr int KD = D / 16, NQ = Bq / 8, ND = D / 8;
  using Block = FlashDkdvBlock<T, D, Bq>;
  constexpr std::uint32_t v_offset = Block::v_offset, q_offset = Block::q_offset, do_offset = Block::do_offset;
  constexpr std::uint32_t lse_offset = Block::lse_offset, delta_offset = Block::delta_offset;
  constexpr std::uint32_t query_tile_bytes = Block::query_tile_bytes;
  const Block block(a, flash_shared_address(attention_shared));
  const std::uint32_t base = block.base;
  const int seq = block.seq, k0 = block.k0, first_tile = block.first_tile, last_tile = block.last_tile;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size, g = lane / 4, tq = lane % 4;
  const int warp_key0 = k0 + warp * 16;  // the warp's first key position
  block.load_keys_and_first_queries();

  float dk[ND][4], dv[ND][4];
  ALLOY_UNROLL
  for (int n = 0; n < ND; ++n) {
    dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
    dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;
  }

  for (int i = first_tile; i <= last_tile; ++i) {
    const int buffer = (i - first_tile) & 1;
    flash_wait_all();
    __syncthreads();
    if (i < last_tile) {
      block.load_query_tile(i + 1, buffer ^ 1);
      flash_commit();
    }
    const int q0 = i * Bq;
    if (q0 + Bq - 1 < warp_key0) continue;  // every query of the tile precedes the warp's keys
    const std::uint32_t qt = base + q_offset + buffer * query_tile_bytes;
    const std::uint32_t dot = base + do_offset + buffer * query_tile_bytes;
    const float* lse_tile = reinterpret_cast<const float*>(attention_shared + lse_offset + buffer * Bq * 4);
    const float* delta_tile = reinterpret_cast<const float*>(attention_shared + delta_offset + buffer * Bq * 4);

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys (rows) and the tile's queries (columns).
    float s[NQ][4], dp[NQ][4];
    ALLOY_UNROLL
    for (int n = 0; n < NQ; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
    }
    ALLOY_UNROLL
    for (int kk = 0; kk < KD; ++kk) {
      std::uint32_t ka[4], va[4];
      flash_load_a<D>(ka, base, warp * 16, kk, lane);
      flash_load_a<D>(va, base + v_offset, warp * 16, kk, lane);
      ALLOY_UNROLL
      for (int np = 0; np < NQ / 2; ++np) {
        std::uint32_t bf[4];
        flash_load_b<D>(bf, qt, 16 * np, kk, lane);
        flash_mma<T>(s[2 * np], ka, bf[0], bf[1]);
        flash_mma<T>(s[2 * np + 1], ka, bf[2], bf[3]);
        flash_load_b<D>(bf, dot, 16 * np, kk, lane);
        flash_mma<T>(dp[2 * np], va, bf[0], bf[1]);
        flash_mma<T>(dp[2 * np + 1], va, bf[2], bf[3]);
      }
    }
    // P^T in place of s, dS^T in place of dp; 0 where the key follows the query or the query is
    // past the sequence.
    const bool masking = q0 < warp_key0 + 15 || q0 + Bq > seq;
    ALLOY_UNROLL
    for (int n = 0; n < NQ; ++n) {
      ALLOY_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int column = 8 * n + 2 * tq + (e & 1);
        const int query = q0 + column, key = warp_key0 + g + 8 * (e >> 1);
        float p = exp2f(fmaf(s[n][e], scale_log2, -lse_tile[column] * attention_log2e));
        if (masking && (key > query || query >= seq)) p = 0.0f;
        dp[n][e] = p * (dp[n][e] - delta_tile[column]);
        s[n][e] = p;
      }
    }
    // dV += P^T dO and dK += dS^T Q, P^T and dS^T rounded to T: k-steps of 16 queries.
    ALLOY_UNROLL
    for (int kk = 0; kk < NQ / 2; ++kk) {
      std::uint32_t pa[4], da[4];
      flash_a_from_accumulators<T>(pa, s[2 * kk], s[2 * kk + 1]);
      flash_a_from_accumulators<T>(da, dp[2 * kk], dp[2 * kk + 1]);
      ALLOY_UNROLL
      for (int np = 0; np < ND / 2; ++np) {
        std::uint32_t bf[4];
        flash_load_b_transposed<D>(bf, dot, 16 * kk, np, lane);
        flash_mma<T>(dv[2 * np], pa, bf[0], bf[1]);
        flash_mma<T>(dv[2 * np + 1], pa, bf[2], bf[3]);
        flash_load_b_transposed<D>(bf, qt, 16 * kk, np, lane);
        flash_mma<T>(dk[2 * np], da, bf[0], bf[1]);
        flash_mma<T>(dk[2 * np + 1], da, bf[2], bf[3]);
      }
    }
  }

  // Staged in the warp's own rows of the K and V tiles (only this warp read them). Every lane's
  // last ldmatrix of those rows comes before any lane's write: racecheck reported the write-after-
  // read between lanes of one warp without this __syncwarp (H200, 2026-12-02).
  __syncwarp();
  block.store(attention_shared, dk, dv, scale, warp, lane);
}

// ---- Hopper: the same three kernels on wgmma (head_dim 64, sm_90a) ----
// The block's warpgroup multiplies 64 rows at a time (attention_flash_wgmma.hpp): in each m-block
// of 64 rows warp w holds rows 16 w + g and 16 w + g + 8, and Q, K, V and dO are read by wgmma
// from the swizzled tiles in place, without ldmatrix. The tiles, the online softmax, the masks
// and the order of every sum over keys or queries are those of the mma.sync kernels above; what
// a warp skipped alone (a tile all of whose keys follow its rows) the warpgroup now skips only for
// a whole m-block, and the masks zero the rest.

#if ALLOY_FLASH_WGMMA

// The dynamic shared memory of the wgmma kernels: tiles on 1024-byte boundaries (the 128-byte
// swizzle's repeating pattern), checked once per block.
__device__ ALLOY_FORCEINLINE std::uint32_t flash_wgmma_shared(const unsigned char* shared) {
  const std::uint32_t base = flash_shared_address(shared);
  if (base % 1024 != 0) __trap();
  return base;
}

template <class T, int MTiles>
__device__ ALLOY_FORCEINLINE void flash_forward_wgmma(const AttentionArgs<T>& a, float scale_log2) {
  extern __shared__ __align__(1024) unsigned char attention_shared_wgmma[];
  constexpr int D = 64, Bc = attention_key_block;
  static_assert(Bc == 64, "flash_forward_wgmma: key tiles of 64 (one m64n64 S per m-block)");
  constexpr int Br = 64 * MTiles, NK = Bc / 8, ND = D / 8;
  constexpr std::uint32_t row_bytes = D * sizeof(T), kv_bytes = Bc * row_bytes;
  const std::uint32_t q_tile = flash_wgmma_shared(attention_shared_wgmma);
  const std::uint32_t k_tiles = q_tile + Br * row_bytes;
  const std::uint32_t v_tiles = k_tiles + 2 * kv_bytes;

  const FlashQueryBlock<T, Br, Bc> block(a);
  const int seq = block.seq, q0 = block.q0, key_tiles = block.key_tiles;
  const std::size_t bh = block.bh, b = block.b, h = block.h;
  const AttentionStrides& in = a.qkv_strides;
  const T *q = block.q, *k = block.k, *v = block.v;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size, g = lane / 4, tq = lane % 4;

  flash_load_tile<Br, D>(q_tile, q, in.row, q0, seq);
  flash_load_tile<Bc, D>(k_tiles, k, in.row, 0, seq);
  flash_load_tile<Bc, D>(v_tiles, v, in.row, 0, seq);
  flash_commit();

  float o[MTiles][ND][4];
  float row_max[MTiles][2], row_sum[MTiles][2];
  ALLOY_UNROLL
  for (int mt = 0; mt < MTiles; ++mt) {
    ALLOY_UNROLL
    for (int n = 0; n < ND; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
    row_max[mt][0] = row_max[mt][1] = attention_negative_infinity;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }

  for (int j = 0; j < key_tiles; ++j) {
    flash_wait_all();
    wgmma_fence_shared();
    __syncthreads();  // tile j is in; every wgmma of tile j - 1 is done, its buffers refill now
    if (j + 1 < key_tiles) {
      const std::uint32_t next = ((j + 1) & 1) * kv_bytes;
      flash_load_tile<Bc, D>(k_tiles + next, k, in.row, (j + 1) * Bc, seq);
      flash_load_tile<Bc, D>(v_tiles + next, v, in.row, (j + 1) * Bc, seq);
      flash_commit();
    }
    const int k0 = j * Bc;
    const std::uint32_t kt = k_tiles + (j & 1) * kv_bytes, vt = v_tiles + (j & 1) * kv_bytes;
    // The m-blocks that take part (some key of the tile does not follow all of their rows): all
    // of them but on the last tile, where the first of two may not. Each case is code of its own
    // without branches around its wgmmas (ptxas adds a fence of its own at such a branch's join).
    const auto tile = [&](auto first) {
      constexpr int First = decltype(first)::value;
      // S of every m-block, a commit group each; then per m-block: wait for its S (the later
      // groups may still run: MTiles - 1 - First of them, S of the next blocks or P V of the
      // previous), its softmax, and its O += P V, so that one block's softmax overlaps the
      // tensor cores' work on the other.
      float s[MTiles][NK][4];
      std::uint32_t pa[MTiles][NK / 2][4];
      wgmma_fence();
      ALLOY_UNROLL
      for (int mt = First; mt < MTiles; ++mt) {
        wgmma_rows_by_rows<T>(s[mt], q_tile + mt * 64 * row_bytes, kt);
        wgmma_commit();
      }
      ALLOY_UNROLL
      for (int mt = First; mt < MTiles; ++mt) {
        wgmma_wait<MTiles - 1 - First>();
        wgmma_hold(s[mt]);
        const int first_row = q0 + 64 * mt + 16 * warp;
        if (k0 + Bc - 1 > first_row) {  // some key of the tile follows some row of the warp
          ALLOY_UNROLL
          for (int n = 0; n < NK; ++n) {
            ALLOY_UNROLL
            for (int e = 0; e < 4; ++e) {
              if (k0 + 8 * n + 2 * tq + (e & 1) > first_row + g + 8 * (e >> 1))
                s[mt][n][e] = attention_negative_infinity;
            }
          }
        }
        ALLOY_UNROLL
        for (int half = 0; half < 2; ++half) {
          float tile_max = attention_negative_infinity;
          ALLOY_UNROLL
          for (int n = 0; n < NK; ++n) tile_max = fmaxf(tile_max, fmaxf(s[mt][n][2 * half], s[mt][n][2 * half + 1]));
          tile_max = fmaxf(tile_max, __shfl_xor_sync(flash_full_mask, tile_max, 1));
          tile_max = fmaxf(tile_max, __shfl_xor_sync(flash_full_mask, tile_max, 2));
          const float next_max = fmaxf(row_max[mt][half], tile_max * scale_log2);
          const float factor = exp2f(row_max[mt][half] - next_max);
          row_max[mt][half] = next_max;
          float sum = row_sum[mt][half] * factor;
          ALLOY_UNROLL
          for (int n = 0; n < ND; ++n) {
            o[mt][n][2 * half] *= factor;
            o[mt][n][2 * half + 1] *= factor;
          }
          ALLOY_UNROLL
          for (int n = 0; n < NK; ++n) {
            ALLOY_UNROLL
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
              const float p = exp2f(fmaf(s[mt][n][e], scale_log2, -next_max));
              s[mt][n][e] = p;
              sum += p;
            }
          }
          row_sum[mt][half] = sum;
        }
        // O += P V, P rounded to T in registers: k-steps of 16 keys, V's rows 2048 bytes apart.
        // The holds keep the rescaling of O and the packing of P ahead of the fence.
        ALLOY_UNROLL
        for (int kk = 0; kk < NK / 2; ++kk) {
          flash_a_from_accumulators<T>(pa[mt][kk], s[mt][2 * kk], s[mt][2 * kk + 1]);
          wgmma_hold(pa[mt][kk]);
        }
        wgmma_hold(o[mt]);
        wgmma_fence();
        ALLOY_UNROLL
        for (int kk = 0; kk < NK / 2; ++kk) wgmma_rs<T>(o[mt], pa[mt][kk], wgmma_descriptor(vt + kk * 16 * row_bytes));
        wgmma_commit();
      }
      wgmma_wait<0>();
      ALLOY_UNROLL
      for (int mt = First; mt < MTiles; ++mt) {
        wgmma_hold(o[mt]);
        ALLOY_UNROLL
        for (int kk = 0; kk < NK / 2; ++kk) wgmma_hold(pa[mt][kk]);
      }
    };
    if (k0 <= q0 + 63) {
      tile(std::integral_constant<int, 0>{});
    } else {
      tile(std::integral_constant<int, MTiles - 1>{});
    }
  }

  // out = O / sum, staged in the warp's own rows of the Q tile once every wgmma's reads of it are done.
  __syncthreads();
  const std::size_t lse_row0 = bh * a.seq;
  ALLOY_UNROLL
  for (int mt = 0; mt < MTiles; ++mt) {
    const int local0 = 64 * mt + 16 * warp;
    float inverse[2];
    ALLOY_UNROLL
    for (int half = 0; half < 2; ++half) {
      float sum = row_sum[mt][half];
      sum += __shfl_xor_sync(flash_full_mask, sum, 1);
      sum += __shfl_xor_sync(flash_full_mask, sum, 2);
      inverse[half] = 1.0f / sum;
      const int row = q0 + local0 + g + 8 * half;
      if (tq == 0 && row < seq && a.lse) a.lse[lse_row0 + row] = row_max[mt][half] * attention_ln2 + logf(sum);
    }
    ALLOY_UNROLL
    for (int half = 0; half < 2; ++half) {
      ALLOY_UNROLL
      for (int n = 0; n < ND; ++n) {
        *reinterpret_cast<std::uint32_t*>(attention_shared_wgmma + flash_offset<D>(local0 + g + 8 * half, n) + 4 * tq) =
            flash_pack<T>(o[mt][n][2 * half] * inverse[half], o[mt][n][2 * half + 1] * inverse[half]);
      }
    }
  }
  __syncwarp();
  T* out = a.out + b * a.out_strides.batch + h * a.out_strides.head;
  ALLOY_UNROLL
  for (int mt = 0; mt < MTiles; ++mt) {
    flash_store_rows<FlashSwizzledRows<D>>(out, a.out_strides.row, attention_shared_wgmma, 64 * mt + 16 * warp, 16, q0,
                                           seq, lane);
  }
}

template <class T, int Bc>
__device__ ALLOY_FORCEINLINE void flash_backward_dq_wgmma(const AttentionBackwardArgs<T>& a, float scale,
                                                          float scale_log2) {
  extern __shared__ __align__(1024) unsigned char attention_shared_wgmma[];
  constexpr int D = 64, Br = 64, NK = Bc / 8, ND = D / 8;
  static_assert(Bc == 32 || Bc == 64, "flash_backward_dq_wgmma: key tiles of 32 or 64");
  constexpr std::uint32_t row_bytes = D * sizeof(T), row_tile_bytes = Br * row_bytes, kv_bytes = Bc * row_bytes;
  const std::uint32_t q_tile = flash_wgmma_shared(attention_shared_wgmma);
  const std::uint32_t do_tile = q_tile + row_tile_bytes;
  const std::uint32_t k_tiles = do_tile + row_tile_bytes;
  const std::uint32_t v_tiles = k_tiles + 2 * kv_bytes;

  const FlashQueryBlock<T, Br, Bc> block(a);
  const int seq = block.seq, q0 = block.q0, key_tiles = block.key_tiles;
  const std::size_t bh = block.bh, b = block.b, h = block.h;
  const AttentionStrides &in = a.qkv_strides, &os = a.out_strides;
  const T *q = block.q, *k = block.k, *v = block.v;
  const T* out = a.out + b * os.batch + h * os.head;
  const T* dout = a.dout + b * os.batch + h * os.head;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size, g = lane / 4, tq = lane % 4;
  const int warp_row0 = warp * 16;
  const std::size_t row0 = bh * a.seq;

  flash_load_tile<Br, D>(q_tile, q, in.row, q0, seq);
  flash_load_tile<Br, D>(do_tile, dout, os.row, q0, seq);
  flash_load_tile<Bc, D>(k_tiles, k, in.row, 0, seq);
  flash_load_tile<Bc, D>(v_tiles, v, in.row, 0, seq);
  flash_commit();
  flash_wait_all();
  wgmma_fence_shared();
  __syncthreads();

  // delta_t = dot(dout_t, out_t) for the warp's 16 rows, as in flash_backward_dq_mma.
  float delta[2];
  {
    const int local = warp_row0 + lane / 2, t = q0 + local;
    float part = 0.0f;
    if (t < seq) {
      ALLOY_UNROLL
      for (int cc = 0; cc < ND / 2; ++cc) {
        const int c = (lane & 1) * (ND / 2) + cc;
        T dov[8], ov[8];
        const uint4 du =
            *reinterpret_cast<const uint4*>(attention_shared_wgmma + row_tile_bytes + flash_offset<D>(local, c));
        const uint4 ou = *reinterpret_cast<const uint4*>(out + std::size_t(t) * os.row + c * 8);
        memcpy(dov, &du, 16);
        memcpy(ov, &ou, 16);
        ALLOY_UNROLL
        for (int e = 0; e < 8; ++e) part = fmaf(to_float(dov[e]), to_float(ov[e]), part);
      }
    }
    const float total = part + __shfl_xor_sync(flash_full_mask, part, 1);
    if ((lane & 1) == 0 && t < seq) a.scratch[row0 + t] = total;
    delta[0] = __shfl_sync(flash_full_mask, total, 2 * g);
    delta[1] = __shfl_sync(flash_full_mask, total, 2 * g + 16);
  }
  float lse_log2[2];
  ALLOY_UNROLL
  for (int half = 0; half < 2; ++half) {
    const int t = q0 + warp_row0 + g + 8 * half;
    lse_log2[half] = t < seq ? a.lse[row0 + t] * attention_log2e : 0.0f;
  }

  float dq[ND][4];
  ALLOY_UNROLL
  for (int n = 0; n < ND; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;

  for (int j = 0; j < key_tiles; ++j) {
    if (j > 0) {
      flash_wait_all();
      wgmma_fence_shared();
      __syncthreads();
    }
    if (j + 1 < key_tiles) {
      const std::uint32_t next = ((j + 1) & 1) * kv_bytes;
      flash_load_tile<Bc, D>(k_tiles + next, k, in.row, (j + 1) * Bc, seq);
      flash_load_tile<Bc, D>(v_tiles + next, v, in.row, (j + 1) * Bc, seq);
      flash_commit();
    }
    const int k0 = j * Bc;
    const std::uint32_t kt = k_tiles + (j & 1) * kv_bytes, vt = v_tiles + (j & 1) * kv_bytes;

    // S and dP, a commit group each: P is recomputed from lse while dP is still on the tensor cores.
    float s[NK][4], dp[NK][4];
    wgmma_fence();
    wgmma_rows_by_rows<T>(s, q_tile, kt);
    wgmma_commit();
    wgmma_rows_by_rows<T>(dp, do_tile, vt);
    wgmma_commit();
    wgmma_wait<1>();
    wgmma_hold(s);
    // P in place of s, 0 where the key follows the row; then dS = P (dP - delta) in its place.
    const bool masking = k0 + Bc - 1 > q0 + warp_row0;
    ALLOY_UNROLL
    for (int n = 0; n < NK; ++n) {
      ALLOY_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int half = e >> 1;
        const float p = exp2f(fmaf(s[n][e], scale_log2, -lse_log2[half]));
        s[n][e] = masking && k0 + 8 * n + 2 * tq + (e & 1) > q0 + warp_row0 + g + 8 * half ? 0.0f : p;
      }
    }
    wgmma_wait<0>();
    wgmma_hold(dp);
    ALLOY_UNROLL
    for (int n = 0; n < NK; ++n) {
      ALLOY_UNROLL
      for (int e = 0; e < 4; ++e) s[n][e] *= dp[n][e] - delta[e >> 1];
    }
    // dQ += dS K, dS rounded to T in registers: k-steps of 16 keys.
    std::uint32_t da[NK / 2][4];
    ALLOY_UNROLL
    for (int kk = 0; kk < NK / 2; ++kk) {
      flash_a_from_accumulators<T>(da[kk], s[2 * kk], s[2 * kk + 1]);
      wgmma_hold(da[kk]);
    }
    wgmma_fence();
    ALLOY_UNROLL
    for (int kk = 0; kk < NK / 2; ++kk) wgmma_rs<T>(dq, da[kk], wgmma_descriptor(kt + kk * 16 * row_bytes));
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(dq);
    ALLOY_UNROLL
    for (int kk = 0; kk < NK / 2; ++kk) wgmma_hold(da[kk]);
  }

  __syncthreads();  // every wgmma's reads of the Q tile are done before its rows are rewritten
  flash_stage_rows<T, D>(attention_shared_wgmma, dq, warp_row0, scale, lane);
  __syncwarp();
  T* dq_out = a.dq + b * a.grad_strides.batch + h * a.grad_strides.head;
  flash_store_rows<FlashSwizzledRows<D>>(dq_out, a.grad_strides.row, attention_shared_wgmma, warp_row0, 16, q0, seq,
                                         lane);
  flash_dq_column_parts<T, D>(a, attention_shared_wgmma, b, h, q0);
}

template <class T, int Bq>
__device__ ALLOY_FORCEINLINE void flash_backward_dkdv_wgmma(const AttentionBackwardArgs<T>& a, float scale,
                                                            float scale_log2) {
  extern __shared__ __align__(1024) unsigned char attention_shared_wgmma[];
  constexpr int D = 64, NQ = Bq / 8, ND = D / 8;
  static_assert(Bq == 64, "flash_backward_dkdv_wgmma: query tiles of 64, one lse or delta value per thread (below)");
  constexpr std::uint32_t row_bytes = D * sizeof(T);
  using Block = FlashDkdvBlock<T, D, Bq>;
  constexpr std::uint32_t v_offset = Block::v_offset, q_offset = Block::q_offset, do_offset = Block::do_offset;
  constexpr std::uint32_t lse_offset = Block::lse_offset, delta_offset = Block::delta_offset;
  constexpr std::uint32_t query_tile_bytes = Block::query_tile_bytes;
  const Block block(a, flash_wgmma_shared(attention_shared_wgmma));
  const std::uint32_t base = block.base;
  const int seq = block.seq, k0 = block.k0, first_tile = block.first_tile, last_tile = block.last_tile;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size, g = lane / 4, tq = lane % 4;
  const int warp_key0 = k0 + warp * 16;  // the warp's first key position
  block.load_keys_and_first_queries();
  // In the loop, thread t copies row t % Bq of lse (t < Bq) or of delta (the rest: 2 Bq = flash_threads) for the
  // next query tile, one predicated cp.async a thread. flash_load_floats' loop over threadIdx.x < Bq left a branch
  // there that ptxas could not prove uniform, and at 168 registers (3 blocks) it then serialized every wgmma (C7520).
  const int float_row = static_cast<int>(threadIdx.x) % Bq;
  const bool float_delta = static_cast<int>(threadIdx.x) >= Bq;
  const float* const float_src = (float_delta ? block.delta : block.lse) + float_row;
  const std::uint32_t float_tile = base + (float_delta ? delta_offset : lse_offset) + 4 * float_row;

  float dk[ND][4], dv[ND][4];
  ALLOY_UNROLL
  for (int n = 0; n < ND; ++n) {
    dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
    dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;
  }

  for (int i = first_tile; i <= last_tile; ++i) {
    const int buffer = (i - first_tile) & 1;
    flash_wait_all();
    wgmma_fence_shared();
    __syncthreads();
    if (i < last_tile) {
      // Query tile i + 1 into the other buffer, as block.load_query_tile but for lse and delta (above).
      const int next = (i + 1) * Bq, other = buffer ^ 1;
      flash_load_tile<Bq, D>(base + q_offset + other * query_tile_bytes, block.q, a.qkv_strides.row, next, seq);
      flash_load_tile<Bq, D>(base + do_offset + other * query_tile_bytes, block.dout, a.out_strides.row, next, seq);
      const bool valid = next + float_row < seq;
      flash_copy_4(float_tile + other * Bq * 4, valid ? float_src + next : float_src, valid);
      flash_commit();
    }
    const int q0 = i * Bq;
    const std::uint32_t qt = base + q_offset + buffer * query_tile_bytes;
    const std::uint32_t dot = base + do_offset + buffer * query_tile_bytes;
    const float* lse_tile = reinterpret_cast<const float*>(attention_shared_wgmma + lse_offset + buffer * Bq * 4);
    const float* delta_tile = reinterpret_cast<const float*>(attention_shared_wgmma + delta_offset + buffer * Bq * 4);

    // S^T = K Q^T and dP^T = V dO^T for the block's 64 keys (rows) and the tile's queries (columns).
    // Four commit groups in flight by turns: S^T, dP^T, then dV += P^T dO once P^T is in
    // registers (while dP^T may still run), then dK += dS^T Q (while dV runs).
    float s[NQ][4], dp[NQ][4];
    wgmma_fence();
    wgmma_rows_by_rows<T>(s, base, qt);
    wgmma_commit();
    wgmma_rows_by_rows<T>(dp, base + v_offset, dot);
    wgmma_commit();
    wgmma_wait<1>();
    wgmma_hold(s);
    // P^T in place of s; 0 where the key follows the query or the query is past the sequence.
    const bool masking = q0 < warp_key0 + 15 || q0 + Bq > seq;
    ALLOY_UNROLL
    for (int n = 0; n < NQ; ++n) {
      ALLOY_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int column = 8 * n + 2 * tq + (e & 1);
        const int query = q0 + column, key = warp_key0 + g + 8 * (e >> 1);
        const float p = exp2f(fmaf(s[n][e], scale_log2, -lse_tile[column] * attention_log2e));
        s[n][e] = masking && (key > query || query >= seq) ? 0.0f : p;
      }
    }
    // dV += P^T dO, P^T rounded to T in registers: k-steps of 16 queries, dO's rows 2048 bytes apart.
    std::uint32_t pa[NQ / 2][4], da[NQ / 2][4];
    ALLOY_UNROLL
    for (int kk = 0; kk < NQ / 2; ++kk) {
      flash_a_from_accumulators<T>(pa[kk], s[2 * kk], s[2 * kk + 1]);
      wgmma_hold(pa[kk]);
    }
    wgmma_fence();
    ALLOY_UNROLL
    for (int kk = 0; kk < NQ / 2; ++kk) wgmma_rs<T>(dv, pa[kk], wgmma_descriptor(dot + kk * 16 * row_bytes));
    wgmma_commit();
    wgmma_wait<1>();  // dP^T is in; dV may still run
    wgmma_hold(dp);
    // dS^T = P^T (dP^T - delta) in place of dp, then dK += dS^T Q.
    ALLOY_UNROLL
    for (int n = 0; n < NQ; ++n) {
      ALLOY_UNROLL
      for (int e = 0; e < 4; ++e) dp[n][e] = s[n][e] * (dp[n][e] - delta_tile[8 * n + 2 * tq + (e & 1)]);
    }
    ALLOY_UNROLL
    for (int kk = 0; kk < NQ / 2; ++kk) {
      flash_a_from_accumulators<T>(da[kk], dp[2 * kk], dp[2 * kk + 1]);
      wgmma_hold(da[kk]);
    }
    wgmma_fence();
    ALLOY_UNROLL
    for (int kk = 0; kk < NQ / 2; ++kk) wgmma_rs<T>(dk, da[kk], wgmma_descriptor(qt + kk * 16 * row_bytes));
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(dv);
    wgmma_hold(dk);
    ALLOY_UNROLL
    for (int kk = 0; kk < NQ / 2; ++kk) {
      wgmma_hold(pa[kk]);
      wgmma_hold(da[kk]);
    }
  }

  __syncthreads();  // every wgmma's reads of the K and V tiles are done before their rows are rewritten
  block.store(attention_shared_wgmma, dk, dv, scale, warp, lane);
}

#endif  // ALLOY_FLASH_WGMMA

// ---- The kernels: wgmma where it was compiled in (sm_90a) for head_dim 64, mma.sync otherwise ----

template <class T, int D, int MTiles>
__global__ void __launch_bounds__(flash_threads) flash_forward_kernel(AttentionArgs<T> a, float scale_log2) {
#if ALLOY_FLASH_WGMMA
  if constexpr (D == 64)
    flash_forward_wgmma<T, MTiles>(a, scale_log2);
  else
#endif
    flash_forward_mma<T, D, MTiles>(a, scale_log2);
}

template <class T, int D, int Bc>
__global__ void __launch_bounds__(flash_threads)
    flash_backward_dq_kernel(AttentionBackwardArgs<T> a, float scale, float scale_log2) {
#if ALLOY_FLASH_WGMMA
  if constexpr (D == 64)
    flash_backward_dq_wgmma<T, Bc>(a, scale, scale_log2);
  else
#endif
    flash_backward_dq_mma<T, D, Bc>(a, scale, scale_log2);
}

// The blocks per multiprocessor dk/dv is compiled for: on wgmma (head_dim 64) three, which holds it
// to 168 registers (it needs about 180 left alone, and 2 blocks of 4 warps then leave the tensor
// cores idle while both wait on their softmax arithmetic); otherwise what its registers allow.
template <int D>
constexpr int flash_dkdv_min_blocks() {
  return ALLOY_FLASH_WGMMA && D == 64 ? 3 : 1;
}

template <class T, int D, int Bq>
__global__ void __launch_bounds__(flash_threads, flash_dkdv_min_blocks<D>())
    flash_backward_dkdv_kernel(AttentionBackwardArgs<T> a, float scale, float scale_log2) {
#if ALLOY_FLASH_WGMMA
  if constexpr (D == 64)
    flash_backward_dkdv_wgmma<T, Bq>(a, scale, scale_log2);
  else
#endif
    flash_backward_dkdv_mma<T, D, Bq>(a, scale, scale_log2);
}

// ---- Launches ----

template <class T, int D>
void flash_forward(Cuda be, const AttentionArgs<T>& a, float scale) {
  constexpr int m_tiles = FlashTiles<D>::forward_m_tiles;
  constexpr int rows = flash_warps * 16 * m_tiles;
  constexpr std::size_t bytes = std::size_t(rows + 4 * attention_key_block) * D * sizeof(T);
  auto* kernel = &flash_forward_kernel<T, D, m_tiles>;
  flash_allow_shared_bytes(kernel, bytes);
  const unsigned grid = flash_grid((a.seq + rows - 1) / rows, a.batch * a.heads, "attention_forward");
  kernel<<<grid, flash_threads, bytes, be.stream>>>(a, fp::mul(scale, attention_log2e));
  ALLOY_CUDA_CHECK_LAUNCH();
}

template <class T, int D>
void flash_backward(Cuda be, const AttentionBackwardArgs<T>& a, float scale) {
  const float scale_log2 = fp::mul(scale, attention_log2e);
  const std::size_t heads_total = a.batch * a.heads;
  constexpr int rows = flash_warps * 16;
  {
    constexpr int keys = FlashTiles<D>::dq_keys;
    constexpr std::size_t bytes = std::size_t(2 * rows + 4 * keys) * D * sizeof(T);
    auto* kernel = &flash_backward_dq_kernel<T, D, keys>;
    flash_allow_shared_bytes(kernel, bytes);
    const unsigned grid = flash_grid((a.seq + rows - 1) / rows, heads_total, "attention_backward");
    kernel<<<grid, flash_threads, bytes, be.stream>>>(a, scale, scale_log2);
    ALLOY_CUDA_CHECK_LAUNCH();
  }
  {
    constexpr int queries = FlashTiles<D>::dkdv_queries;
    constexpr std::size_t bytes =
        std::size_t(2 * rows + 4 * queries) * D * sizeof(T) + std::size_t(4 * queries) * sizeof(float);
    auto* kernel = &flash_backward_dkdv_kernel<T, D, queries>;
    flash_allow_shared_bytes(kernel, bytes);
    const unsigned grid = flash_grid((a.seq + rows - 1) / rows, heads_total, "attention_backward");
    kernel<<<grid, flash_threads, bytes, be.stream>>>(a, scale, scale_log2);
    ALLOY_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace alloy::detail

#endif  // ALLOY_HAS_CUDA_KERNELS
