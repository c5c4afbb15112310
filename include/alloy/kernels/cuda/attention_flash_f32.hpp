// Attention's tensor-core kernels for float storage, head_dim 64 or 128: the algorithm, the tile
// loops and the determinism of the 16-bit kernels (cuda/attention_flash.hpp: FlashAttention-2's
// tiling, an online softmax over key blocks of 64, lse kept; a backward of a dq kernel then a dk/dv
// kernel, each output element summed by one thread in a fixed order, no atomics), on
// mma.sync m16n8k8 with tf32 inputs and fp32 accumulators, for two compute dtypes:
//  tf32  one mma per product. Every factor is rounded to tf32 by round_to_tf32 (to nearest even,
//        as the Host reference rounds it): q, k, v and dout in shared memory, once per tile, by
//        the thread that copied them; P and dS in registers.
//  fp32  3xTF32 (CUTLASS's OpMultiplyAddFastF32): each factor a is split into big = tf32(a) and
//        small = tf32(a - big) (a - big is exact) as its fragment is loaded, and a b is taken as
//        small_a big_b + big_a small_b + big_a big_b, three mmas into one accumulator in that
//        order; what is lost (small_a small_b and the two splits' remainders) is below 3 2^-22 of
//        |a b|. The splits round half away from zero ((bits + 0x1000) & ~0x1fff): nothing models
//        their bits.
//
// Fragments (PTX ISA, mma.m16n8k8 with .tf32): lane = 4 g + tq holds A (16 x 8, row-major) as
// a0 (row g, column tq), a1 (g + 8, tq), a2 (g, tq + 4), a3 (g + 8, tq + 4); B (8 x 8, column-
// major) as b0 (row tq, column g), b1 (tq + 4, g); the accumulator as c0, c1 (row g, columns 2 tq,
// 2 tq + 1) and c2, c3 (row g + 8, the same). An accumulator n-tile becomes the A fragment of the
// next product with no shuffle by taking its 8 columns (keys, or queries in the dk/dv kernel) in
// the order 0, 2, 4, 6, 1, 3, 5, 7: k index tq is column 2 tq, k index tq + 4 is column 2 tq + 1,
// so a = (c0, c2, c1, c3), and that product's B fragment reads rows 2 tq and 2 tq + 1 of its tile.
//
// Tiles are rows of head_dim floats padded to head_dim + 4 (16 bytes, so rows stay 16-byte
// aligned for cp.async): with 32 four-byte banks and head_dim a multiple of 32, element (row,
// column) is in bank (4 row + column) % 32, so every fragment load is free of bank conflicts: A
// and K's B fragments read rows g, columns tq (banks 4 g + tq, distinct for 32 lanes), V's rows
// 2 tq (+1), column g (banks 8 tq + g (+ 4)). All loads are plain 32-bit loads.
//
// Every kernel has 4 warps of 16 rows each.
//  forward  a block per (query tile of 64, batch * head), longest rows first; key tiles of 64 (the
//           online softmax's block, as on every path), double-buffered; S = Q K^T, the running
//           maximum and sum, O += P V. Q's fragments stay in registers at head_dim 64 (split ones
//           too) and are reloaded per key tile at 128, where they would not fit beside O's.
//  dq       a block per (query tile of 64, batch * head): delta_t = dot(dout_t, out_t) (fp32, from
//           global memory, so unrounded) into scratch, then per key tile (64, or 32 for head_dim
//           128) S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K. Q's and dO's fragments
//           stay in registers for tf32 at head_dim 64, and are reloaded per key tile otherwise.
//  dk, dv   a block per (key tile of 64, batch * head), after the dq kernel: per query tile (64, or
//           16 for head_dim 128) S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q; lse and
//           delta in shared memory.
// Each kernel stages its 64-row output tile (dq, or dk and dv) in shared memory before writing it
// and, when the column parts are asked for (attention_args.hpp), sums its columns there.
// Shared memory (dynamic, cudaFuncSetAttribute past 48 KiB): forward 85 KiB (head_dim 64) and
// 165 KiB (128); dq 102 and 132 KiB; dk/dv 103 and 99 KiB. Registers (ptxas, CUDA 13.0, sm_90;
// tf32 / fp32): forward 168 / 229 (head_dim 64), 254 / 252 (128); dq 244 / 217, 168 / 201; dk/dv
// 252 / 248, 246 / 249; no spills (dk/dv at head_dim 128 spilled with 32-query tiles, hence 16).
// scripts/attention_fragments_tf32.py emulates the fragment helpers lane by lane and checks every
// product and the bank conflicts; scripts/attention_tiles.py mirrors the tile loops with these
// tile sizes.
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_KERNELS

#include <alloy/backend/cuda/warp_reduce.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/kernels/attention_args.hpp>
#include <alloy/kernels/cuda/attention_flash_common.hpp>
#include <alloy/kernels/detail/attention_rows.hpp>
#include <alloy/numeric/rounding.hpp>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace alloy::detail {

// fp32 compute takes 3xTF32; tf32 one product.
template <class Compute>
inline constexpr bool flash_3xtf32 = std::is_same_v<Compute, float>;

// Key tiles of the dq kernel and query tiles of the dk/dv kernel: smaller at head_dim 128 to keep
// shared memory and the registers in bounds.
template <int D>
struct FlashFloatTiles;
template <>
struct FlashFloatTiles<64> {
  static constexpr int dq_keys = 64;
  static constexpr int dkdv_queries = 64;
};
template <>
struct FlashFloatTiles<128> {
  static constexpr int dq_keys = 32;
  static constexpr int dkdv_queries = 16;
};

// Rows of D floats, D + 4 apart (attention_flash_common.hpp's tile layout).
template <int D>
struct FlashPaddedRows {
  static_assert(D % 32 == 0, "FlashPaddedRows: the bank arithmetic needs D a multiple of 32");
  static constexpr int stride = D + 4;  // floats from one row to the next
  static constexpr int chunks = D / 4;
  ALLOY_HOST_DEVICE static constexpr std::uint32_t bytes(int rows) { return std::uint32_t(rows * stride) * 4u; }
  __device__ static ALLOY_FORCEINLINE std::uint32_t offset(int row, int chunk) {
    return static_cast<std::uint32_t>(row * stride + 4 * chunk) * 4u;
  }
};

// ---- tf32 operands and the mma ----

// The registers of one fragment of N elements: tf32 bits, and for 3xTF32 the small parts too.
template <int N, bool Split>
struct Tf32Operand {
  std::uint32_t big[N];
  std::uint32_t small[N];
};
template <int N>
struct Tf32Operand<N, false> {
  std::uint32_t big[N];
};

// (bits + half a tf32 step) with the low 13 bits cleared: to nearest, ties away from zero.
__device__ ALLOY_FORCEINLINE std::uint32_t flash_tf32_bits(float x) { return (float_bits(x) + 0x1000u) & ~0x1fffu; }

// An operand from fp32 values: tf32 rounds them (to nearest even, as the Host), 3xTF32 splits them.
template <bool Split, int N>
__device__ ALLOY_FORCEINLINE void flash_operand(Tf32Operand<N, Split>& o, const float (&x)[N]) {
  ALLOY_UNROLL
  for (int i = 0; i < N; ++i) {
    if constexpr (Split) {
      o.big[i] = flash_tf32_bits(x[i]);
      o.small[i] = flash_tf32_bits(x[i] - float_from_bits(o.big[i]));
    } else {
      o.big[i] = float_bits(round_to_tf32(x[i]));
    }
  }
}

// An operand from tile elements: for tf32 the tile already holds tf32 values (flash_round_rows).
template <bool Split, int N>
__device__ ALLOY_FORCEINLINE void flash_tile_operand(Tf32Operand<N, Split>& o, const float (&x)[N]) {
  if constexpr (Split) {
    flash_operand(o, x);
  } else {
    ALLOY_UNROLL
    for (int i = 0; i < N; ++i) o.big[i] = float_bits(x[i]);
  }
}

// c += a b for a 16 x 8 A (row-major) and an 8 x 8 B (column-major), tf32 inputs, fp32 accumulators.
__device__ ALLOY_FORCEINLINE void flash_mma_tf32(float (&c)[4], const std::uint32_t (&a)[4],
                                                 const std::uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// c += a b: one mma, or 3xTF32's three (the small products first, then the big one).
template <bool Split>
__device__ ALLOY_FORCEINLINE void flash_product(float (&c)[4], const Tf32Operand<4, Split>& a,
                                                const Tf32Operand<2, Split>& b) {
  if constexpr (Split) {
    flash_mma_tf32(c, a.small, b.big);
    flash_mma_tf32(c, a.big, b.small);
  }
  flash_mma_tf32(c, a.big, b.big);
}

// ---- Fragments from padded tiles (`tile` points at row 0) ----

// The A fragment of rows row0..row0 + 15, columns k0..k0 + 7 of a row-major tile.
template <int D>
__device__ ALLOY_FORCEINLINE void flash_load_a_f32(float (&a)[4], const float* tile, int row0, int k0, int g, int tq) {
  constexpr int s = FlashPaddedRows<D>::stride;
  const float* p = tile + (row0 + g) * s + k0 + tq;
  a[0] = p[0];
  a[1] = p[8 * s];
  a[2] = p[4];
  a[3] = p[8 * s + 4];
}

// The B fragment of n-tile n0..n0 + 7, k-step k0..k0 + 7, from a tile whose rows are n and columns
// k (K in S = Q K^T, V in dP = dO V^T, Q and dO in the dk/dv kernel's S^T and dP^T).
template <int D>
__device__ ALLOY_FORCEINLINE void flash_load_b_f32(float (&b)[2], const float* tile, int n0, int k0, int g, int tq) {
  const float* p = tile + (n0 + g) * FlashPaddedRows<D>::stride + k0 + tq;
  b[0] = p[0];
  b[1] = p[4];
}

// The B fragment of columns n0..n0 + 7 from a tile whose rows are k (V in O = P V, K in dQ = dS K,
// dO and Q in dV and dK), rows k0..k0 + 7 in the order of flash_a_from_accumulator: k index tq is
// row k0 + 2 tq, k index tq + 4 is row k0 + 2 tq + 1.
template <int D>
__device__ ALLOY_FORCEINLINE void flash_load_b_rows_f32(float (&b)[2], const float* tile, int k0, int n0, int g,
                                                        int tq) {
  constexpr int s = FlashPaddedRows<D>::stride;
  const float* p = tile + (k0 + 2 * tq) * s + n0 + g;
  b[0] = p[0];
  b[1] = p[s];
}

// An accumulator n-tile (its 8 columns the next product's k) as an A fragment, columns taken in
// the order 0, 2, 4, 6, 1, 3, 5, 7.
__device__ ALLOY_FORCEINLINE void flash_a_from_accumulator(float (&a)[4], const float (&c)[4]) {
  a[0] = c[0];
  a[1] = c[2];
  a[2] = c[1];
  a[3] = c[3];
}

// tf32: rounds, in place, the chunks of a tile this thread copied with flash_load_rows<L, Rows>
// (the same chunks: call it after flash_wait_all and before the __syncthreads that publishes the
// tile).
template <class L, int Rows>
__device__ ALLOY_FORCEINLINE void flash_round_rows(unsigned char* tile) {
  constexpr int chunks = L::chunks;
  ALLOY_UNROLL
  for (int k = 0; k < Rows * chunks / flash_threads; ++k) {
    const int i = int(threadIdx.x) + k * flash_threads;
    float4* p = reinterpret_cast<float4*>(tile + L::offset(i / chunks, i % chunks));
    float4 v = *p;
    v.x = round_to_tf32(v.x);
    v.y = round_to_tf32(v.y);
    v.z = round_to_tf32(v.z);
    v.w = round_to_tf32(v.w);
    *p = v;
  }
}

// One warp's accumulator rows (local rows row0 + g and row0 + g + 8, times `factor`) into its own
// rows of a padded tile.
template <int D>
__device__ ALLOY_FORCEINLINE void flash_stage_rows_f32(unsigned char* tile, const float (&acc)[D / 8][4], int row0,
                                                       float factor, int lane) {
  const int g = lane / 4, tq = lane % 4;
  float* rows = reinterpret_cast<float*>(tile);
  ALLOY_UNROLL
  for (int half = 0; half < 2; ++half) {
    ALLOY_UNROLL
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<float2*>(rows + (row0 + g + 8 * half) * FlashPaddedRows<D>::stride + 8 * n + 2 * tq) =
          make_float2(acc[n][2 * half] * factor, acc[n][2 * half + 1] * factor);
    }
  }
}

// ---- Forward ----

template <class Compute, int D, bool HoldQ>
__global__ void __launch_bounds__(flash_threads)
    flash_float_forward_kernel(AttentionArgs<Compute> a, float scale_log2) {
  extern __shared__ __align__(128) unsigned char attention_shared[];
  using L = FlashPaddedRows<D>;
  constexpr bool split = flash_3xtf32<Compute>;
  constexpr int Bc = attention_key_block;
  constexpr int Br = flash_warps * 16;
  constexpr int KD = D / 8;   // k-steps over head dimensions
  constexpr int NK = Bc / 8;  // n-tiles of keys, and k-steps of O += P V
  constexpr int ND = D / 8;   // n-tiles of head dimensions
  constexpr std::uint32_t kv_bytes = L::bytes(Bc);
  constexpr std::uint32_t k_offset = L::bytes(Br), v_offset = k_offset + 2 * kv_bytes;
  const std::uint32_t base = flash_shared_address(attention_shared);
  const float* q_tile = reinterpret_cast<const float*>(attention_shared);

  const int seq = static_cast<int>(a.seq);
  const std::size_t heads_total = a.batch * a.heads;
  const int query_tiles = (seq + Br - 1) / Br;
  const int qb = query_tiles - 1 - static_cast<int>(blockIdx.x / heads_total);  // longest rows first
  const std::size_t bh = blockIdx.x % heads_total, b = bh / a.heads, h = bh % a.heads;
  const AttentionStrides& in = a.qkv_strides;
  const float* q = a.q + b * in.batch + h * in.head;
  const float* k = a.k + b * in.batch + h * in.head;
  const float* v = a.v + b * in.batch + h * in.head;
  const int q0 = qb * Br;
  const int key_tiles = ((q0 + Br < seq ? q0 + Br : seq) - 1) / Bc + 1;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size, g = lane / 4, tq = lane % 4;
  const int warp_row0 = warp * 16;
  const int warp_last = q0 + warp_row0 + 15;  // the warp's last query position

  flash_load_rows<L, Br>(base, q, in.row, q0, seq);
  flash_load_rows<L, Bc>(base + k_offset, k, in.row, 0, seq);
  flash_load_rows<L, Bc>(base + v_offset, v, in.row, 0, seq);
  flash_commit();

  [[maybe_unused]] Tf32Operand<4, split> qf[HoldQ ? KD : 1];
  float o[ND][4];
  ALLOY_UNROLL
  for (int n = 0; n < ND; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float row_max[2] = {attention_negative_infinity, attention_negative_infinity};
  float row_sum[2] = {0.0f, 0.0f};

  for (int j = 0; j < key_tiles; ++j) {
    const std::uint32_t buffer = (j & 1) * kv_bytes;
    flash_wait_all();
    if constexpr (!split) {
      if (j == 0) flash_round_rows<L, Br>(attention_shared);
      flash_round_rows<L, Bc>(attention_shared + k_offset + buffer);
      flash_round_rows<L, Bc>(attention_shared + v_offset + buffer);
    }
    __syncthreads();  // tile j is in; every warp is done with tile j - 1, whose buffers refill now
    if constexpr (HoldQ) {
      if (j == 0) {
        ALLOY_UNROLL
        for (int kk = 0; kk < KD; ++kk) {
          float x[4];
          flash_load_a_f32<D>(x, q_tile, warp_row0, 8 * kk, g, tq);
          flash_tile_operand(qf[kk], x);
        }
      }
    }
    if (j + 1 < key_tiles) {
      const std::uint32_t next = ((j + 1) & 1) * kv_bytes;
      flash_load_rows<L, Bc>(base + k_offset + next, k, in.row, (j + 1) * Bc, seq);
      flash_load_rows<L, Bc>(base + v_offset + next, v, in.row, (j + 1) * Bc, seq);
      flash_commit();
    }
    const int k0 = j * Bc;
    if (k0 > warp_last) continue;  // every key of the tile follows the warp's rows
    const float* kt = reinterpret_cast<const float*>(attention_shared + k_offset + buffer);
    const float* vt = reinterpret_cast<const float*>(attention_shared + v_offset + buffer);

    float s[NK][4];
    ALLOY_UNROLL
    for (int n = 0; n < NK; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    ALLOY_UNROLL
    for (int kk = 0; kk < KD; ++kk) {
      Tf32Operand<4, split> qa;
      if constexpr (HoldQ) {
        qa = qf[kk];
      } else {
        float x[4];
        flash_load_a_f32<D>(x, q_tile, warp_row0, 8 * kk, g, tq);
        flash_tile_operand(qa, x);
      }
      ALLOY_UNROLL
      for (int n = 0; n < NK; ++n) {
        float x[2];
        flash_load_b_f32<D>(x, kt, 8 * n, 8 * kk, g, tq);
        Tf32Operand<2, split> kb;
        flash_tile_operand(kb, x);
        flash_product(s[n], qa, kb);
      }
    }
    if (k0 + Bc - 1 > q0 + warp_row0) {  // some key of the tile follows some row of the warp
      ALLOY_UNROLL
      for (int n = 0; n < NK; ++n) {
        ALLOY_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int row = q0 + warp_row0 + g + 8 * (e >> 1);
          const int key = k0 + 8 * n + 2 * tq + (e & 1);
          if (key > row) s[n][e] = attention_negative_infinity;
        }
      }
    }
    // The online softmax: each row's maximum over the tile (its 4 lanes' shares), the rescaling
    // of what was summed before, then P = 2^(s scale log2(e) - max) in place of s.
    ALLOY_UNROLL
    for (int half = 0; half < 2; ++half) {
      float tile_max = attention_negative_infinity;
      ALLOY_UNROLL
      for (int n = 0; n < NK; ++n) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * half], s[n][2 * half + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(flash_full_mask, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(flash_full_mask, tile_max, 2));
      const float next_max = fmaxf(row_max[half], tile_max * scale_log2);
      const float factor = exp2f(row_max[half] - next_max);
      row_max[half] = next_max;
      float sum = row_sum[half] * factor;
      ALLOY_UNROLL
      for (int n = 0; n < ND; ++n) {
        o[n][2 * half] *= factor;
        o[n][2 * half + 1] *= factor;
      }
      ALLOY_UNROLL
      for (int n = 0; n < NK; ++n) {
        ALLOY_UNROLL
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          const float p = exp2f(fmaf(s[n][e], scale_log2, -next_max));
          s[n][e] = p;
          sum += p;
        }
      }
      row_sum[half] = sum;
    }
    // O += P V: k-steps of 8 keys, P rounded to tf32 or split.
    ALLOY_UNROLL
    for (int kk = 0; kk < NK; ++kk) {
      float x[4];
      flash_a_from_accumulator(x, s[kk]);
      Tf32Operand<4, split> pa;
      flash_operand(pa, x);
      ALLOY_UNROLL
      for (int n = 0; n < ND; ++n) {
        float y[2];
        flash_load_b_rows_f32<D>(y, vt, 8 * kk, 8 * n, g, tq);
        Tf32Operand<2, split> vb;
        flash_tile_operand(vb, y);
        flash_product(o[n], pa, vb);
      }
    }
  }

  // out = O / sum, staged in the warp's own rows of the Q tile (only this warp reads them; the
  // __syncwarp orders every lane's last read before any lane's write).
  __syncwarp();
  const std::size_t lse_row0 = bh * a.seq;
  float inverse[2];
  ALLOY_UNROLL
  for (int half = 0; half < 2; ++half) {
    float sum = row_sum[half];
    sum += __shfl_xor_sync(flash_full_mask, sum, 1);
    sum += __shfl_xor_sync(flash_full_mask, sum, 2);
    inverse[half] = 1.0f / sum;
    const int row = q0 + warp_row0 + g + 8 * half;
    if (tq == 0 && row < seq && a.lse) a.lse[lse_row0 + row] = row_max[half] * attention_ln2 + logf(sum);
  }
  ALLOY_UNROLL
  for (int n = 0; n < ND; ++n) {
    o[n][0] *= inverse[0];
    o[n][1] *= inverse[0];
    o[n][2] *= inverse[1];
    o[n][3] *= inverse[1];
  }
  flash_stage_rows_f32<D>(attention_shared, o, warp_row0, 1.0f, lane);
  __syncwarp();
  float* out = a.out + b * a.out_strides.batch + h * a.out_strides.head;
  flash_store_rows<L>(out, a.out_strides.row, attention_shared, warp_row0, 16, q0, seq, lane);
}

// ---- Backward: dq (and delta) ----

template <class Compute, int D, int Bc, bool Hold>
__global__ void __launch_bounds__(flash_threads)
    flash_float_backward_dq_kernel(AttentionBackwardArgs<Compute> a, float scale, float scale_log2) {
  extern __shared__ __align__(128) unsigned char attention_shared[];
  using L = FlashPaddedRows<D>;
  constexpr bool split = flash_3xtf32<Compute>;
  constexpr int Br = flash_warps * 16;
  constexpr int KD = D / 8, NK = Bc / 8, ND = D / 8;
  constexpr std::uint32_t row_tile_bytes = L::bytes(Br), kv_bytes = L::bytes(Bc);
  constexpr std::uint32_t do_offset = row_tile_bytes, k_offset = 2 * row_tile_bytes;
  constexpr std::uint32_t v_offset = k_offset + 2 * kv_bytes;
  const std::uint32_t base = flash_shared_address(attention_shared);
  const float* q_tile = reinterpret_cast<const float*>(attention_shared);
  const float* do_tile = reinterpret_cast<const float*>(attention_shared + do_offset);

  const int seq = static_cast<int>(a.seq);
  const std::size_t heads_total = a.batch * a.heads;
  const int query_tiles = (seq + Br - 1) / Br;
  const int qb = query_tiles - 1 - static_cast<int>(blockIdx.x / heads_total);
  const std::size_t bh = blockIdx.x % heads_total, b = bh / a.heads, h = bh % a.heads;
  const AttentionStrides &in = a.qkv_strides, &os = a.out_strides;
  const float* q = a.q + b * in.batch + h * in.head;
  const float* k = a.k + b * in.batch + h * in.head;
  const float* v = a.v + b * in.batch + h * in.head;
  const float* out = a.out + b * os.batch + h * os.head;
  const float* dout = a.dout + b * os.batch + h * os.head;
  const int q0 = qb * Br;
  const int key_tiles = ((q0 + Br < seq ? q0 + Br : seq) - 1) / Bc + 1;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size, g = lane / 4, tq = lane % 4;
  const int warp_row0 = warp * 16;
  const int warp_last = q0 + warp_row0 + 15;
  const std::size_t row0 = bh * a.seq;

  flash_load_rows<L, Br>(base, q, in.row, q0, seq);
  flash_load_rows<L, Br>(base + do_offset, dout, os.row, q0, seq);
  flash_load_rows<L, Bc>(base + k_offset, k, in.row, 0, seq);
  flash_load_rows<L, Bc>(base + v_offset, v, in.row, 0, seq);
  flash_commit();

  // delta_t = dot(dout_t, out_t) for the warp's 16 rows, from global memory (the tf32 path rounds
  // the dO tile): lanes 2 r and 2 r + 1 take row r's two halves, then each thread fetches those
  // of its rows g and g + 8.
  float delta[2];
  {
    const int local = warp_row0 + lane / 2, t = q0 + local;
    float part = 0.0f;
    if (t < seq) {
      ALLOY_UNROLL
      for (int cc = 0; cc < D / 8; ++cc) {
        const int c = (lane & 1) * (D / 8) + cc;
        const float4 d4 = *reinterpret_cast<const float4*>(dout + std::size_t(t) * os.row + 4 * c);
        const float4 o4 = *reinterpret_cast<const float4*>(out + std::size_t(t) * os.row + 4 * c);
        part = fmaf(d4.x, o4.x, part);
        part = fmaf(d4.y, o4.y, part);
        part = fmaf(d4.z, o4.z, part);
        part = fmaf(d4.w, o4.w, part);
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

  [[maybe_unused]] Tf32Operand<4, split> qf[Hold ? KD : 1], dof[Hold ? KD : 1];
  float dq[ND][4];
  ALLOY_UNROLL
  for (int n = 0; n < ND; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;

  for (int j = 0; j < key_tiles; ++j) {
    const std::uint32_t buffer = (j & 1) * kv_bytes;
    flash_wait_all();
    if constexpr (!split) {
      if (j == 0) {
        flash_round_rows<L, Br>(attention_shared);
        flash_round_rows<L, Br>(attention_shared + do_offset);
      }
      flash_round_rows<L, Bc>(attention_shared + k_offset + buffer);
      flash_round_rows<L, Bc>(attention_shared + v_offset + buffer);
    }
    __syncthreads();
    if constexpr (Hold) {
      if (j == 0) {
        ALLOY_UNROLL
        for (int kk = 0; kk < KD; ++kk) {
          float x[4];
          flash_load_a_f32<D>(x, q_tile, warp_row0, 8 * kk, g, tq);
          flash_tile_operand(qf[kk], x);
          flash_load_a_f32<D>(x, do_tile, warp_row0, 8 * kk, g, tq);
          flash_tile_operand(dof[kk], x);
        }
      }
    }
    if (j + 1 < key_tiles) {
      const std::uint32_t next = ((j + 1) & 1) * kv_bytes;
      flash_load_rows<L, Bc>(base + k_offset + next, k, in.row, (j + 1) * Bc, seq);
      flash_load_rows<L, Bc>(base + v_offset + next, v, in.row, (j + 1) * Bc, seq);
      flash_commit();
    }
    const int k0 = j * Bc;
    if (k0 > warp_last) continue;
    const float* kt = reinterpret_cast<const float*>(attention_shared + k_offset + buffer);
    const float* vt = reinterpret_cast<const float*>(attention_shared + v_offset + buffer);

    float s[NK][4], dp[NK][4];
    ALLOY_UNROLL
    for (int n = 0; n < NK; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
    }
    ALLOY_UNROLL
    for (int kk = 0; kk < KD; ++kk) {
      Tf32Operand<4, split> qa, da;
      if constexpr (Hold) {
        qa = qf[kk];
        da = dof[kk];
      } else {
        float x[4];
        flash_load_a_f32<D>(x, q_tile, warp_row0, 8 * kk, g, tq);
        flash_tile_operand(qa, x);
        flash_load_a_f32<D>(x, do_tile, warp_row0, 8 * kk, g, tq);
        flash_tile_operand(da, x);
      }
      ALLOY_UNROLL
      for (int n = 0; n < NK; ++n) {
        float x[2];
        Tf32Operand<2, split> bf;
        flash_load_b_f32<D>(x, kt, 8 * n, 8 * kk, g, tq);
        flash_tile_operand(bf, x);
        flash_product(s[n], qa, bf);
        flash_load_b_f32<D>(x, vt, 8 * n, 8 * kk, g, tq);
        flash_tile_operand(bf, x);
        flash_product(dp[n], da, bf);
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
    // dQ += dS K, dS rounded to tf32 or split: k-steps of 8 keys.
    ALLOY_UNROLL
    for (int kk = 0; kk < NK; ++kk) {
      float x[4];
      flash_a_from_accumulator(x, s[kk]);
      Tf32Operand<4, split> dsa;
      flash_operand(dsa, x);
      ALLOY_UNROLL
      for (int n = 0; n < ND; ++n) {
        float y[2];
        flash_load_b_rows_f32<D>(y, kt, 8 * kk, 8 * n, g, tq);
        Tf32Operand<2, split> kb;
        flash_tile_operand(kb, y);
        flash_product(dq[n], dsa, kb);
      }
    }
  }

  __syncwarp();  // every lane's last read of the warp's Q rows before any lane writes them
  flash_stage_rows_f32<D>(attention_shared, dq, warp_row0, scale, lane);  // the warp's own Q rows
  __syncwarp();
  float* dq_out = a.dq + b * a.grad_strides.batch + h * a.grad_strides.head;
  flash_store_rows<L>(dq_out, a.grad_strides.row, attention_shared, warp_row0, 16, q0, seq, lane);
  if (a.column_parts != nullptr) {  // dq's column parts (attention_args.hpp) from the staged tile
    static_assert(Br == attention_column_tile, "flash_float_backward_dq_kernel: the query tile is a parts tile");
    __syncthreads();  // every warp's rows are staged
    flash_column_parts<L, float, D, 1>(flash_column_part(a, b, h, q0, 0), a.heads * a.head_dim, attention_shared, 0,
                                       seq - q0 < Br ? seq - q0 : Br);
  }
}

// ---- Backward: dk and dv ----

template <class Compute, int D, int Bq>
__global__ void __launch_bounds__(flash_threads)
    flash_float_backward_dkdv_kernel(AttentionBackwardArgs<Compute> a, float scale, float scale_log2) {
  extern __shared__ __align__(128) unsigned char attention_shared[];
  using L = FlashPaddedRows<D>;
  constexpr bool split = flash_3xtf32<Compute>;
  constexpr int Bc = flash_warps * 16;
  constexpr int KD = D / 8, NQ = Bq / 8, ND = D / 8;
  constexpr std::uint32_t key_tile_bytes = L::bytes(Bc), query_tile_bytes = L::bytes(Bq);
  constexpr std::uint32_t v_offset = key_tile_bytes;
  constexpr std::uint32_t q_offset = 2 * key_tile_bytes;
  constexpr std::uint32_t do_offset = q_offset + 2 * query_tile_bytes;
  constexpr std::uint32_t lse_offset = do_offset + 2 * query_tile_bytes;
  constexpr std::uint32_t delta_offset = lse_offset + 2 * Bq * sizeof(float);
  const std::uint32_t base = flash_shared_address(attention_shared);
  const float* k_tile = reinterpret_cast<const float*>(attention_shared);
  const float* v_tile = reinterpret_cast<const float*>(attention_shared + v_offset);

  const int seq = static_cast<int>(a.seq);
  const std::size_t heads_total = a.batch * a.heads;
  const int kb = static_cast<int>(blockIdx.x / heads_total);  // the longest columns (first keys) first
  const std::size_t bh = blockIdx.x % heads_total, b = bh / a.heads, h = bh % a.heads;
  const AttentionStrides &in = a.qkv_strides, &os = a.out_strides;
  const float* q = a.q + b * in.batch + h * in.head;
  const float* k = a.k + b * in.batch + h * in.head;
  const float* v = a.v + b * in.batch + h * in.head;
  const float* dout = a.dout + b * os.batch + h * os.head;
  const std::size_t row0 = bh * a.seq;
  const float* lse = a.lse + row0;
  const float* delta = a.scratch + row0;
  const int k0 = kb * Bc;
  const int first_tile = k0 / Bq, last_tile = (seq - 1) / Bq;
  const int lane = threadIdx.x % warp_size, warp = threadIdx.x / warp_size, g = lane / 4, tq = lane % 4;
  const int warp_key0 = k0 + warp * 16;  // the warp's first key position

  const auto load_query_tile = [&](int tile, int buffer) {
    flash_load_rows<L, Bq>(base + q_offset + buffer * query_tile_bytes, q, in.row, tile * Bq, seq);
    flash_load_rows<L, Bq>(base + do_offset + buffer * query_tile_bytes, dout, os.row, tile * Bq, seq);
    flash_load_floats<Bq>(base + lse_offset + buffer * Bq * 4, lse, tile * Bq, seq);
    flash_load_floats<Bq>(base + delta_offset + buffer * Bq * 4, delta, tile * Bq, seq);
  };
  flash_load_rows<L, Bc>(base, k, in.row, k0, seq);
  flash_load_rows<L, Bc>(base + v_offset, v, in.row, k0, seq);
  load_query_tile(first_tile, 0);
  flash_commit();

  float dk[ND][4], dv[ND][4];
  ALLOY_UNROLL
  for (int n = 0; n < ND; ++n) {
    dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
    dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;
  }

  for (int i = first_tile; i <= last_tile; ++i) {
    const int buffer = (i - first_tile) & 1;
    flash_wait_all();
    if constexpr (!split) {
      if (i == first_tile) {
        flash_round_rows<L, Bc>(attention_shared);
        flash_round_rows<L, Bc>(attention_shared + v_offset);
      }
      flash_round_rows<L, Bq>(attention_shared + q_offset + buffer * query_tile_bytes);
      flash_round_rows<L, Bq>(attention_shared + do_offset + buffer * query_tile_bytes);
    }
    __syncthreads();
    if (i < last_tile) {
      load_query_tile(i + 1, buffer ^ 1);
      flash_commit();
    }
    const int q0 = i * Bq;
    if (q0 + Bq - 1 < warp_key0) continue;  // every query of the tile precedes the warp's keys
    const float* qt = reinterpret_cast<const float*>(attention_shared + q_offset + buffer * query_tile_bytes);
    const float* dot = reinterpret_cast<const float*>(attention_shared + do_offset + buffer * query_tile_bytes);
    const float* lse_tile = reinterpret_cast<const float*>(attention_shared + lse_offset + buffer * Bq * 4);
    const float* delta_tile = reinterpret_cast<const float*>(attention_shared + delta_offset + buffer * Bq * 4);

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys (rows) and the tile's queries (columns).
    float s[NQ][4], dp[NQ][4];
    ALLOY_UNROLL
    for (int n = 0; n < NQ; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
    }
    // One A operand live at a time (K's, then V's): fp32 at head_dim 128 spills otherwise.
    ALLOY_UNROLL
    for (int kk = 0; kk < KD; ++kk) {
      float x[4];
      Tf32Operand<4, split> ka;
      flash_load_a_f32<D>(x, k_tile, warp * 16, 8 * kk, g, tq);
      flash_tile_operand(ka, x);
      ALLOY_UNROLL
      for (int n = 0; n < NQ; ++n) {
        float y[2];
        Tf32Operand<2, split> bf;
        flash_load_b_f32<D>(y, qt, 8 * n, 8 * kk, g, tq);
        flash_tile_operand(bf, y);
        flash_product(s[n], ka, bf);
      }
      Tf32Operand<4, split> va;
      flash_load_a_f32<D>(x, v_tile, warp * 16, 8 * kk, g, tq);
      flash_tile_operand(va, x);
      ALLOY_UNROLL
      for (int n = 0; n < NQ; ++n) {
        float y[2];
        Tf32Operand<2, split> bf;
        flash_load_b_f32<D>(y, dot, 8 * n, 8 * kk, g, tq);
        flash_tile_operand(bf, y);
        flash_product(dp[n], va, bf);
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
    // dV += P^T dO and dK += dS^T Q, P^T and dS^T rounded to tf32 or split: k-steps of 8 queries.
    ALLOY_UNROLL
    for (int kk = 0; kk < NQ; ++kk) {
      float x[4];
      Tf32Operand<4, split> pa;
      flash_a_from_accumulator(x, s[kk]);
      flash_operand(pa, x);
      ALLOY_UNROLL
      for (int n = 0; n < ND; ++n) {
        float y[2];
        Tf32Operand<2, split> bf;
        flash_load_b_rows_f32<D>(y, dot, 8 * kk, 8 * n, g, tq);
        flash_tile_operand(bf, y);
        flash_product(dv[n], pa, bf);
      }
      Tf32Operand<4, split> dsa;
      flash_a_from_accumulator(x, dp[kk]);
      flash_operand(dsa, x);
      ALLOY_UNROLL
      for (int n = 0; n < ND; ++n) {
        float y[2];
        Tf32Operand<2, split> bf;
        flash_load_b_rows_f32<D>(y, qt, 8 * kk, 8 * n, g, tq);
        flash_tile_operand(bf, y);
        flash_product(dk[n], dsa, bf);
      }
    }
  }

  // Staged in the warp's own rows of the K and V tiles (only this warp read them), after every
  // lane's last read of them.
  __syncwarp();
  flash_stage_rows_f32<D>(attention_shared, dk, warp * 16, scale, lane);
  flash_stage_rows_f32<D>(attention_shared + v_offset, dv, warp * 16, 1.0f, lane);
  __syncwarp();
  const AttentionStrides& gs = a.grad_strides;
  flash_store_rows<L>(a.dk + b * gs.batch + h * gs.head, gs.row, attention_shared, warp * 16, 16, k0, seq, lane);
  flash_store_rows<L>(a.dv + b * gs.batch + h * gs.head, gs.row, attention_shared + v_offset, warp * 16, 16, k0, seq,
                      lane);
  if (a.column_parts != nullptr) {  // dk's and dv's column parts (attention_args.hpp) from the staged tiles
    static_assert(Bc == attention_column_tile, "flash_float_backward_dkdv_kernel: the key tile is a parts tile");
    __syncthreads();  // every warp's rows are staged
    flash_column_parts<L, float, D, 2>(flash_column_part(a, b, h, k0, 1), a.heads * a.head_dim, attention_shared,
                                       v_offset, seq - k0 < Bc ? seq - k0 : Bc);
  }
}

// ---- Launches ----

template <class Compute, int D>
void flash_float_forward(Cuda be, const AttentionArgs<Compute>& a, float scale) {
  constexpr bool hold_q = D == 64;  // at 128, Q's fragments and O's accumulators would not fit
  constexpr int rows = flash_warps * 16;
  constexpr std::size_t bytes = FlashPaddedRows<D>::bytes(rows + 4 * attention_key_block);
  auto* kernel = &flash_float_forward_kernel<Compute, D, hold_q>;
  flash_allow_shared_bytes(kernel, bytes);
  const unsigned grid = flash_grid((a.seq + rows - 1) / rows, a.batch * a.heads, "attention_forward");
  kernel<<<grid, flash_threads, bytes, be.stream>>>(a, fp::mul(scale, attention_log2e));
  ALLOY_CUDA_CHECK_LAUNCH();
}

template <class Compute, int D>
void flash_float_backward(Cuda be, const AttentionBackwardArgs<Compute>& a, float scale) {
  const float scale_log2 = fp::mul(scale, attention_log2e);
  const std::size_t heads_total = a.batch * a.heads;
  constexpr int rows = flash_warps * 16;
  {
    constexpr int keys = FlashFloatTiles<D>::dq_keys;
    constexpr bool hold = !flash_3xtf32<Compute> && D == 64;
    constexpr std::size_t bytes = FlashPaddedRows<D>::bytes(2 * rows + 4 * keys);
    auto* kernel = &flash_float_backward_dq_kernel<Compute, D, keys, hold>;
    flash_allow_shared_bytes(kernel, bytes);
    const unsigned grid = flash_grid((a.seq + rows - 1) / rows, heads_total, "attention_backward");
    kernel<<<grid, flash_threads, bytes, be.stream>>>(a, scale, scale_log2);
    ALLOY_CUDA_CHECK_LAUNCH();
  }
  {
    constexpr int queries = FlashFloatTiles<D>::dkdv_queries;
    constexpr std::size_t bytes =
        FlashPaddedRows<D>::bytes(2 * rows + 4 * queries) + std::size_t(4 * queries) * sizeof(float);
    auto* kernel = &flash_float_backward_dkdv_kernel<Compute, D, queries>;
    flash_allow_shared_bytes(kernel, bytes);
    const unsigned grid = flash_grid((a.seq + rows - 1) / rows, heads_total, "attention_backward");
    kernel<<<grid, flash_threads, bytes, be.stream>>>(a, scale, scale_log2);
    ALLOY_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace alloy::detail

#endif  // ALLOY_HAS_CUDA_KERNELS
