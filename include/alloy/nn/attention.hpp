// CausalSelfAttention: GPT-2's attention layer on rows of `channels` features, every `seq`
// consecutive rows one sequence (row b * seq + t is position t of sequence b):
//   qkv = x W_attn^T + b_attn          c_attn, channels -> 3 channels (q, k, v side by side)
//   att = causal attention per head    kernels/attention.hpp, scale 1 / sqrt(head_dim), in the
//                                      precision's compute dtype (fp32 runs 3xTF32 on the tensor
//                                      cores, tf32 tf32 products, as the GEMMs do)
//   y   = att W_proj^T + b_proj        c_proj, channels -> channels
// The kernel reads q, k and v out of qkv in place (AttentionStrides::rows(3 channels, ...)) and
// writes att as c_proj's input, and the backward writes dq, dk, dv into one [rows, 3 channels]
// gradient that is c_attn's dy: no transpose or copy anywhere.
//
// c_attn's bias gradient is the column sums of dqkv. The attention backward sums each column over
// every tile of 64 positions as it writes dq, dk and dv (AttentionBackwardArgs::column_parts), and
// the layer folds those parts (column_sums_of_parts: batch x ceil(seq / 64) of them per column)
// into the gradient, with c_attn told to leave its bias gradient alone, instead of c_attn's own
// pass over rows x 3 channels of dqkv. Both backends sum in that order (so their bits agree where
// their dqkv's do); a caller that has taken c_attn's bias gradient over itself
// (Linear::leave_bias_gradient) gets no parts and no fold.
//
// The sequence length is the layer's (a constructor argument, like the context length of a GPT-2
// config): an input of rows x channels holds rows / seq sequences, and rows must be a multiple of
// seq. A batch of shorter sequences needs a layer of that length (parameters are the registry's,
// so two layers of one name share them).
//
// Kept between forward and backward, in the workspace: qkv (rows x 3 channels), att (rows x
// channels) and the softmax's logsumexp (fp32, sequences x heads x seq); c_attn keeps its input's
// address. Backward recomputes the probabilities from lse (no seq x seq matrix exists), and every
// kernel is deterministic, so a recomputed forward (Checkpointing) gives the same bits. A
// recomputation whose output nothing reads calls forward_for_backward, which keeps the same and
// skips c_proj's product.
//
// Residual's fusion: forward_adding adds a residual in c_proj's product, as Linear's does, so
// Residual<Sequential<LayerNorm, CausalSelfAttention>> adds its input there, and its backward
// adds dy to dx in the LayerNorm's pass (sequential.hpp).
//
// Parameters: "<name>.c_attn.weight" [3 channels, channels], "<name>.c_attn.bias",
// "<name>.c_proj.weight" [channels, channels], "<name>.c_proj.bias": Hugging Face GPT-2's names;
// its Conv1D stores the weights transposed ([in, out]), see transformer.hpp.
#pragma once

#include <alloy/error.hpp>
#include <alloy/kernels/attention.hpp>
#include <alloy/kernels/column_sums.hpp>
#include <alloy/memory/registry.hpp>
#include <alloy/nn/activation.hpp>
#include <alloy/nn/linear.hpp>

#include <string>
#include <utility>

namespace alloy::nn {

class CausalSelfAttention {
 public:
  // c_attn and c_proj with PyTorch's default initialization (as Linear's).
  CausalSelfAttention(const std::string& name, std::size_t channels, std::size_t heads, std::size_t seq)
      : CausalSelfAttention(Linear(name + ".c_attn", channels, 3 * channels),
                            Linear(name + ".c_proj", channels, channels), heads, seq) {}

  // From the two projections as given (their names and initializations): c_attn channels ->
  // 3 channels, c_proj channels -> channels.
  CausalSelfAttention(Linear c_attn, Linear c_proj, std::size_t heads, std::size_t seq)
      : c_attn_(std::move(c_attn)),
        c_proj_(std::move(c_proj)),
        name_(layer_name(c_attn_.name())),
        channels_(c_proj_.in_features()),
        heads_(heads),
        seq_(seq) {
    const std::string where = "CausalSelfAttention '" + name_ + "': ";
    if (heads == 0 || channels_ == 0 || channels_ % heads != 0) {
      throw error(where + std::to_string(channels_) + " channels do not split into " + std::to_string(heads) +
                  " heads of equal size");
    }
    if (head_dim() > alloy::detail::attention_max_head_dim) {
      throw error(where + "heads of " + std::to_string(head_dim()) + " channels; attention supports up to " +
                  std::to_string(alloy::detail::attention_max_head_dim));
    }
    if (seq == 0) throw error(where + "the sequence length must be positive");
    if (c_attn_.in_features() != channels_ || c_attn_.out_features(0) != 3 * channels_ ||
        c_proj_.out_features(0) != channels_) {
      throw error(where + "c_attn is " + std::to_string(c_attn_.in_features()) + " -> " +
                  std::to_string(c_attn_.out_features(0)) + " and c_proj " + std::to_string(c_proj_.in_features()) +
                  " -> " + std::to_string(c_proj_.out_features(0)) + "; they must be C -> 3C and C -> C");
    }
  }

  void declare(ParamRegistry& r) {
    c_attn_.declare(r);
    c_proj_.declare(r);
  }
  std::size_t out_features(std::size_t) const noexcept { return channels_; }
  const std::string& name() const noexcept { return name_; }
  std::size_t channels() const noexcept { return channels_; }
  std::size_t heads() const noexcept { return heads_; }
  std::size_t head_dim() const noexcept { return channels_ / heads_; }
  std::size_t seq() const noexcept { return seq_; }
  Linear& c_attn() noexcept { return c_attn_; }
  Linear& c_proj() noexcept { return c_proj_; }

  template <class Ctx>
  Activation<detail::value_t<Ctx>> forward(Ctx& ctx, Activation<const detail::value_t<Ctx>> x) {
    return forward_adding(ctx, x, {});
  }

  // y = attention(x) + residual, the residual added in c_proj's product (none when residual.data
  // is null).
  template <class Ctx>
  Activation<detail::value_t<Ctx>> forward_adding(Ctx& ctx, Activation<const detail::value_t<Ctx>> x,
                                                  Activation<const detail::value_t<Ctx>> residual) {
    return c_proj_.forward_adding(ctx, attend(ctx, x), residual);
  }

  // Forward's work that backward needs, without c_proj's product, whose output backward never
  // reads (the recomputation of a checkpointed segment's last block, train/recompute.hpp): keeps
  // qkv, att and lse exactly as forward does.
  template <class Ctx>
  void forward_for_backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> x) {
    c_proj_.forward_for_backward(ctx, attend(ctx, x));
  }

  // dx from dy, the gradient of y; the four parameter gradients written (or added, when
  // ctx.accumulate_grads()).
  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy) {
    return backward_to(ctx, dy, false);
  }

  // As backward, with dx written over the input forward saw (c_attn's Linear::backward_over_input):
  // for a caller that knows nothing reads that input again (a Sequential whose LayerNorm produced it).
  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward_over_input(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy) {
    return backward_to(ctx, dy, true);
  }

 private:
  template <class Ctx>
  Activation<detail::value_t<Ctx>> backward_to(Ctx& ctx, Activation<const detail::value_t<Ctx>> dy, bool over_input) {
    using T = detail::value_t<Ctx>;
    using Compute = typename Ctx::compute_type;
    if (qkv_ == nullptr) throw error("CausalSelfAttention '" + name_ + "': backward before forward");
    if (dy.rows != batch_ * seq_ || dy.cols != channels_) {
      throw error("CausalSelfAttention '" + name_ + "': dy is " + std::to_string(dy.rows) + " x " +
                  std::to_string(dy.cols) + ", forward's output was " + std::to_string(batch_ * seq_) + " x " +
                  std::to_string(channels_));
    }
    // dqkv sits below d_att, the scratch and the column parts, which are given back once the
    // kernel has run and the parts are folded into c_attn's bias gradient.
    const Activation<T> dqkv = detail::allocate(ctx, dy.rows, 3 * channels_);
    const auto mark = ctx.workspace().mark();
    const Activation<T> d_att = c_proj_.backward(ctx, dy);
    float* scratch = ctx.template allocate<float>(attention_backward_scratch_floats(batch_, heads_, seq_));
    const bool fold_bias = c_attn_.has_bias() && !c_attn_.leaves_bias_gradient();
    float* parts = fold_bias
                       ? ctx.template allocate<float>(attention_column_parts_floats(batch_, heads_, seq_, head_dim()))
                       : nullptr;
    const auto fwd = attention_args<Compute>(static_cast<const T*>(qkv_), static_cast<T*>(att_), lse_, batch_);
    attention_backward(ctx.backend(),
                       attention_backward_args<Compute>(fwd, d_att.data, dqkv.data, channels_, scratch, parts));
    if (fold_bias) {
      column_sums_of_parts(ctx.backend(), static_cast<const float*>(parts), batch_ * attention_column_tiles(seq_),
                           3 * channels_, c_attn_.bias_gradient(ctx), ctx.accumulate_grads());
    }
    ctx.workspace().release(mark);
    const BiasGradientFolded folded(fold_bias ? &c_attn_ : nullptr);
    if (over_input) return c_attn_.backward_over_input(ctx, Activation<const T>(dqkv));
    return c_attn_.backward(ctx, Activation<const T>(dqkv));
  }

  // While c_attn runs its backward: its bias gradient left to the fold above (Linear's
  // leave_bias_gradient), and given back however the backward ends.
  struct BiasGradientFolded {
    Linear* layer;
    explicit BiasGradientFolded(Linear* l) noexcept : layer(l) {
      if (layer) layer->leave_bias_gradient(true);
    }
    ~BiasGradientFolded() {
      if (layer) layer->leave_bias_gradient(false);
    }
    BiasGradientFolded(const BiasGradientFolded&) = delete;
    BiasGradientFolded& operator=(const BiasGradientFolded&) = delete;
  };

 public:
  // The kernel's arguments for `batch` sequences in compute dtype Compute (a precision's
  // compute_type: tf32 for float storage with tf32 math): q, k, v the column blocks of qkv (rows x
  // 3 channels), out (rows x channels) and lse. Forward runs exactly these (tests ask
  // attention_uses_tensor_cores of them).
  template <class Compute>
  AttentionArgs<Compute> attention_args(const storage_t<Compute>* qkv, storage_t<Compute>* out, float* lse,
                                        std::size_t batch) const {
    return {.batch = batch,
            .heads = heads_,
            .seq = seq_,
            .head_dim = head_dim(),
            .q = qkv,
            .k = qkv + channels_,
            .v = qkv + 2 * channels_,
            .qkv_strides = AttentionStrides::rows(3 * channels_, seq_, head_dim()),
            .out = out,
            .out_strides = AttentionStrides::rows(channels_, seq_, head_dim()),
            .lse = lse};
  }

  // The backward's arguments from the forward's (attention_args): dout in out's layout, dq, dk
  // and dv into the three column ranges of dqkv (qkv's layout), column parts when given.
  template <class Compute>
  static AttentionBackwardArgs<Compute> attention_backward_args(const AttentionArgs<Compute>& fwd,
                                                                const storage_t<Compute>* dout,
                                                                storage_t<Compute>* dqkv, std::size_t channels,
                                                                float* scratch, float* column_parts = nullptr) {
    return {.batch = fwd.batch,
            .heads = fwd.heads,
            .seq = fwd.seq,
            .head_dim = fwd.head_dim,
            .q = fwd.q,
            .k = fwd.k,
            .v = fwd.v,
            .qkv_strides = fwd.qkv_strides,
            .out = fwd.out,
            .dout = dout,
            .out_strides = fwd.out_strides,
            .lse = fwd.lse,
            .dq = dqkv,
            .dk = dqkv + channels,
            .dv = dqkv + 2 * channels,
            .grad_strides = fwd.qkv_strides,
            .scratch = scratch,
            .column_parts = column_parts};
  }

  // The sequences in `rows` rows; alloy::error unless rows is a positive multiple of seq.
  std::size_t sequences(std::size_t rows) const {
    if (rows == 0 || rows % seq_ != 0) {
      throw error("CausalSelfAttention '" + name_ + "': " + std::to_string(rows) + " rows are not whole sequences of " +
                  std::to_string(seq_) + " positions (rows = batch * seq, one sequence after another)");
    }
    return rows / seq_;
  }

 private:
  // qkv = c_attn(x), then att (returned) and lse from the kernel; all three kept for backward.
  template <class Ctx, class T = detail::value_t<Ctx>>
  Activation<const T> attend(Ctx& ctx, Activation<const T> x) {
    detail::check_width("CausalSelfAttention", name_, channels_, x.cols);
    batch_ = sequences(x.rows);
    const Activation<T> qkv = c_attn_.forward(ctx, x);
    const Activation<T> att = detail::allocate(ctx, x.rows, channels_);
    float* lse = ctx.template allocate<float>(batch_ * heads_ * seq_);
    attention_forward(ctx.backend(), attention_args<typename Ctx::compute_type>(qkv.data, att.data, lse, batch_));
    qkv_ = qkv.data;
    att_ = att.data;
    lse_ = lse;
    return att;
  }

  // "<name>" for c_attn named "<name>.c_attn", else c_attn's name.
  static std::string layer_name(const std::string& c_attn) {
    const std::string suffix = ".c_attn";
    const bool ends =
        c_attn.size() > suffix.size() && c_attn.compare(c_attn.size() - suffix.size(), suffix.size(), suffix) == 0;
    return ends ? c_attn.substr(0, c_attn.size() - suffix.size()) : c_attn;
  }

  Linear c_attn_, c_proj_;
  std::string name_;
  std::size_t channels_, heads_, seq_;
  // Kept from forward for backward (the layer is not templated on the dtype).
  std::size_t batch_ = 0;
  const void* qkv_ = nullptr;
  void* att_ = nullptr;
  float* lse_ = nullptr;
};

}  // namespace alloy::nn
