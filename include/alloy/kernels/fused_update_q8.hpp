// Pass 2 of the optimizer step for State<q8> (kernels/fused_update.hpp has the rest): the state
// is 8-bit codes relative to a per-block absolute maximum, so a quantization block is updated as
// a whole. Each element's update is the same as with unquantized state; the block's new maximum
// is then reduced and every code rewritten against it.
// Bytes per element (Precision<bf16, fp32_master> + AdamW<State<q8>>): read grad 2, master 4,
// m 1, v 1; write master 4, m 1, v 1, param 2: 16 (18 reading an fp32 accumulator); and per
// quantization block, each slot's fp32 scale read and written. At 16 bytes an element the
// arithmetic per byte (two decodes, the rule with its square root and division, two encodes) is
// the highest of alloy's element-wise kernels; the codec's integer-rounding form
// (numeric/minifloat8.hpp) is what lets the memory traffic hide it: 9.89 ms at 1.56B with the
// field-by-field codec, 7.13 ms with it (H200, 18 B/param at 3.93 TB/s). Keeping the next
// block's loads in flight as well (software pipelining) took 78 registers instead of 58 and
// was slower (8.11 ms): occupancy hides the latency better here.
#pragma once

#include <alloy/backend/algorithms.hpp>
#include <alloy/backend/cuda/launch.hpp>
#include <alloy/backend/cuda/vector_io.hpp>
#include <alloy/backend/cuda/warp_reduce.hpp>
#include <alloy/kernels/fused_update.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/minifloat8.hpp>
#include <alloy/numeric/rounding.hpp>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace alloy::detail {

template <bool Signed>
using q8_codec = std::conditional_t<Signed, SignedE4M3, UnsignedE5M3>;

inline constexpr int q8_lanes = 8;  // elements per thread

// Updates the 8 consecutive elements starting at `first` (inside one quantization block),
// held in registers: gradients, fp32 parameters (in and out), the state codes with their
// block's old scales. Leaves the new state values in `values` and the compute copy in `out`.
// Shared by Host and Cuda so both compute the same bits.
template <class Rule, class Param, class Grad, int Slots>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void q8_update_lanes(const UpdateScalars<Rule>& s, BlockScales b, std::size_t first,
                                                         const Grad (&grad)[q8_lanes], float (&p)[q8_lanes],
                                                         const std::uint8_t (&codes)[Slots][q8_lanes],
                                                         const float (&old_absmax)[Slots], Param (&out)[q8_lanes],
                                                         float (&values)[Slots][q8_lanes]) {
  ALLOY_UNROLL
  for (int l = 0; l < q8_lanes; ++l) {
    const float g = fp::mul(to_float(grad[l]), s.grad_mult);
    float st[Slots];
    ALLOY_UNROLL
    for (int k = 0; k < Slots; ++k) {
      const float decoded =
          Rule::slot_signed(k) ? q8_codec<true>::decode(codes[k][l]) : q8_codec<false>::decode(codes[k][l]);
      st[k] = fp::mul(decoded, old_absmax[k]);
    }
    s.rule(g, p[l], st, b);
    out[l] = round_to<Param>(p[l], s.stochastic_params, update_bits(s.seed, s.stream, first + l, 0));
    ALLOY_UNROLL
    for (int k = 0; k < Slots; ++k) values[k][l] = st[k];
  }
}

template <bool Signed>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE std::uint8_t q8_encode(float x, float inv_absmax) {
  return q8_codec<Signed>::encode(fp::mul(x, inv_absmax));
}

ALLOY_HOST_DEVICE ALLOY_FORCEINLINE float q8_inverse(float absmax) {
  return absmax > 0.0f ? fp::div(1.0f, absmax) : 0.0f;
}

// Host: one quantization block at a time.
template <int QBlock, bool ClearGrad, class Rule, class Param, class Grad, int Slots>
void fused_update_q8(Host, const UpdateArenas<Param, Grad, std::uint8_t, Slots>& a,
                     const UpdateScalars<Rule>& scalars) {
  UpdateScalars<Rule> s = scalars;  // with the decision's grad_mult, where there is one
  if (!take_step_scalars(s)) return;
  std::vector<float> values(static_cast<std::size_t>(Slots) * QBlock);
  for (std::size_t q = 0; q * QBlock < a.n; ++q) {
    float old_absmax[Slots], new_absmax[Slots] = {};
    for (int k = 0; k < Slots; ++k) old_absmax[k] = a.absmax[k][q];
    for (int c = 0; c < QBlock; c += q8_lanes) {
      const std::size_t first = q * QBlock + c;
      Grad grad[q8_lanes];
      float p[q8_lanes], chunk[Slots][q8_lanes];
      std::uint8_t codes[Slots][q8_lanes];
      Param out[q8_lanes];
      for (int l = 0; l < q8_lanes; ++l) {
        grad[l] = a.grads[first + l];
        if constexpr (ClearGrad) a.grads[first + l] = round_nearest<Grad>(0.0f);
        p[l] = a.master ? a.master[first + l] : to_float(a.params[first + l]);
        for (int k = 0; k < Slots; ++k) codes[k][l] = a.state[k][first + l];
      }
      q8_update_lanes<Rule, Param, Grad, Slots>(s, a.blocks[first / block_scales_granularity], first, grad, p, codes,
                                                old_absmax, out, chunk);
      for (int l = 0; l < q8_lanes; ++l) {
        if (a.master) a.master[first + l] = p[l];
        a.params[first + l] = out[l];
        for (int k = 0; k < Slots; ++k) {
          values[k * QBlock + c + l] = chunk[k][l];
          new_absmax[k] = Max{}(new_absmax[k], chunk[k][l] < 0 ? -chunk[k][l] : chunk[k][l]);
        }
      }
    }
    for (int k = 0; k < Slots; ++k) {
      a.absmax[k][q] = new_absmax[k];
      const float inv = q8_inverse(new_absmax[k]);
      for (int e = 0; e < QBlock; ++e) {
        const float v = values[k * QBlock + e];
        a.state[k][q * QBlock + e] = Rule::slot_signed(k) ? q8_encode<true>(v, inv) : q8_encode<false>(v, inv);
      }
    }
  }
}

#if ALLOY_HAS_CUDA_KERNELS

// The largest |state value| of each slot: a warp or a block reduces them together.
template <int Slots>
struct SlotMaxima {
  float m[Slots];
};

struct FloatMax {
  __device__ ALLOY_FORCEINLINE float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct SlotMaximaMax {
  template <int Slots>
  __device__ ALLOY_FORCEINLINE SlotMaxima<Slots> operator()(SlotMaxima<Slots> a, const SlotMaxima<Slots>& b) const {
#pragma unroll
    for (int k = 0; k < Slots; ++k) a.m[k] = fmaxf(a.m[k], b.m[k]);
    return a;
  }
};

// Cuda: QBlock / 8 threads per quantization block, 8 elements each; the block's new absolute
// maximum comes from a warp (QBlock 256) or whole-block (QBlock 2048) reduction.
template <int QBlock, bool ClearGrad, class Rule, class Param, class Grad, int Slots>
__global__ void __launch_bounds__(cuda_block)
    fused_update_q8_kernel(UpdateArenas<Param, Grad, std::uint8_t, Slots> a, UpdateScalars<Rule> s) {
  if (!take_step_scalars(s)) return;  // a skipped step returns before reading anything
  constexpr int threads_per_q = QBlock / q8_lanes;
  constexpr int groups = cuda_block / threads_per_q;
  static_assert(threads_per_q == warp_size || threads_per_q == cuda_block, "q8 block must be 256 or 2048");
  const int group = threadIdx.x / threads_per_q;
  const int lane = threadIdx.x % threads_per_q;
  const std::size_t blocks = a.n / QBlock;
  __shared__ SlotMaxima<Slots> shared_max[cuda_block / warp_size];
  for (std::size_t q = std::size_t(blockIdx.x) * groups + group; q < blocks; q += std::size_t(gridDim.x) * groups) {
    float old_absmax[Slots];
#pragma unroll
    for (int k = 0; k < Slots; ++k) old_absmax[k] = a.absmax[k][q];
    const std::size_t first = q * QBlock + std::size_t(lane) * q8_lanes;
    Grad grad[q8_lanes];
    float p[q8_lanes], values[Slots][q8_lanes];
    std::uint8_t codes[Slots][q8_lanes];
    Param out[q8_lanes];
    load_vector(a.grads + first, grad);
    if constexpr (ClearGrad) {
      Grad zeros[q8_lanes];
#pragma unroll
      for (int l = 0; l < q8_lanes; ++l) zeros[l] = round_nearest<Grad>(0.0f);
      store_vector(a.grads + first, zeros);
    }
    if (a.master) {
      load_vector(a.master + first, p);
    } else {
      load_vector(a.params + first, out);
#pragma unroll
      for (int l = 0; l < q8_lanes; ++l) p[l] = to_float(out[l]);
    }
#pragma unroll
    for (int k = 0; k < Slots; ++k) load_vector(a.state[k] + first, codes[k]);
    q8_update_lanes<Rule, Param, Grad, Slots>(s, a.blocks[first / block_scales_granularity], first, grad, p, codes,
                                              old_absmax, out, values);
    if (a.master) store_vector(a.master + first, p);
    store_vector(a.params + first, out);
    // Each slot's largest |value|: a warp's butterfly (QBlock 256), or the whole block's
    // reduction (QBlock 2048). Every |value| is >= +0 and fmaxf drops NaN, so a thread's maximum
    // starts from +0 and is never NaN or -0, and the block fold may start from the first warp's.
    SlotMaxima<Slots> absmax;
#pragma unroll
    for (int k = 0; k < Slots; ++k) {
      float m = 0.0f;
#pragma unroll
      for (int l = 0; l < q8_lanes; ++l) m = fmaxf(m, fabsf(values[k][l]));
      if constexpr (threads_per_q == warp_size) m = warp_allreduce(m, FloatMax{});
      absmax.m[k] = m;
    }
    if constexpr (threads_per_q > warp_size) {
      __syncthreads();  // the previous iteration's readers are done with shared_max
      absmax = block_allreduce<cuda_block>(absmax, SlotMaximaMax{}, shared_max);
    }
#pragma unroll
    for (int k = 0; k < Slots; ++k) {
      if (lane == 0) a.absmax[k][q] = absmax.m[k];
      const float inv = q8_inverse(absmax.m[k]);
      std::uint8_t new_codes[q8_lanes];
#pragma unroll
      for (int l = 0; l < q8_lanes; ++l) {
        new_codes[l] = Rule::slot_signed(k) ? q8_encode<true>(values[k][l], inv) : q8_encode<false>(values[k][l], inv);
      }
      store_vector(a.state[k] + first, new_codes);
    }
  }
}

template <int QBlock, bool ClearGrad, class Rule, class Param, class Grad, int Slots>
void fused_update_q8(Cuda be, const UpdateArenas<Param, Grad, std::uint8_t, Slots>& a, const UpdateScalars<Rule>& s) {
  if (a.n == 0) return;
  constexpr int groups = cuda_block / (QBlock / q8_lanes);
  const int grid = grid_for(a.n / QBlock, groups);
  fused_update_q8_kernel<QBlock, ClearGrad><<<grid, cuda_block, 0, be.stream>>>(a, s);
  ALLOY_CUDA_CHECK_LAUNCH();
}

#endif  // ALLOY_HAS_CUDA_KERNELS

}  // namespace alloy::detail
