// LmHead: a language model's output projection fused with softmax cross-entropy, forward and
// backward in one call, over chunks of rows so that the logits of all rows never exist at once.
// With y [rows, dim] (after the final LayerNorm), W [padded_vocab, dim] and targets [rows]:
//   loss  = mean over rows whose target is not ignore_index of -log softmax(y W^T)[target]
//   dy    = d(loss * loss_scale) / dy,  dW (+)= d(loss * loss_scale) / dW
// For each chunk of at most chunk_rows rows:
//   logits  = y_chunk W^T              the compute dtype (bf16 logits as llm.c, fp32 for fp32/tf32)
//   logits <- dlogits, in place        softmax and loss in fp32 (kernels/softmax_cross_entropy.hpp)
//   dy_chunk = dlogits W
//   dW      += dlogits^T y_chunk       written by the first chunk unless ctx.accumulate_grads()
// The chunk buffer is the head's memory: min(rows, chunk_rows) x padded_vocab x sizeof(T) of the
// workspace (GPT-2, 8192 rows x 50304 x bf16: 824 MB), freed when the call returns. Products go
// through alloy's gemm (cuBLASLt), so the head runs at its speed; chunks of 8192 rows keep every
// product large (m, n or k of 8192 x 50304 x 768) while bounding that memory.
//
// Padding: columns from vocab to padded_vocab (GPT-2 pads 50257 to 50304, a multiple of 64, for
// the products) are masked out of the softmax; their gradient, and so their rows of dW, are zero.
// Any padded_vocab works on both backends; a multiple of 8 (16-bit) or 4 (fp32) keeps every row
// of the logits 16-byte aligned, which cuBLASLt's fast kernels and the row kernel's vectors need.
//
// Weight tying (tie_to): W is an Embedding's token table; the head's dW lands in the same
// gradient, and the Embedding's backward, which runs after it, adds its own part.
//
// Targets come from the batch on the host: each lies in [0, vocab) or equals ignore_index
// (checked before anything is launched); the mean is over the rows that are not ignored, and a
// micro-batch with none is an error.
#pragma once

#include <alloy/error.hpp>
#include <alloy/kernels/softmax_cross_entropy.hpp>
#include <alloy/memory/registry.hpp>
#include <alloy/nn/activation.hpp>
#include <alloy/nn/embedding.hpp>
#include <alloy/nn/input.hpp>
#include <alloy/nn/loss.hpp>

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <utility>

namespace alloy::nn {

struct LmHeadConfig {
  static constexpr std::size_t default_chunk_rows = 8192;

  std::size_t vocab = 0;         // classes: targets lie in [0, vocab)
  std::size_t padded_vocab = 0;  // rows of W, >= vocab; the columns past vocab are masked; 0: vocab
  std::size_t dim = 0;
  std::size_t chunk_rows = default_chunk_rows;  // rows of logits held at once
  std::int32_t ignore_index = -1;               // targets equal to it leave their row out; negative
  float init_stddev = 0.02f;                    // an own (untied) W's normal initialization

  std::size_t table_rows() const noexcept { return padded_vocab == 0 ? vocab : padded_vocab; }
};

class LmHead {
 public:
  // A head with its own projection `name.weight` [padded_vocab, dim], unless tie_to is called.
  LmHead(std::string name, LmHeadConfig config) : name_(std::move(name)), config_(config) {
    const std::string who = "LmHead '" + name_ + "'";
    if (config_.vocab == 0 || config_.dim == 0) throw error(who + ": vocab and dim must be positive");
    if (config_.table_rows() < config_.vocab) {
      throw error(who + ": padded_vocab = " + std::to_string(config_.padded_vocab) +
                  " is less than vocab = " + std::to_string(config_.vocab));
    }
    if (config_.chunk_rows == 0) throw error(who + ": chunk_rows must be positive");
    if (config_.ignore_index >= 0) {
      throw error(who + ": ignore_index = " + std::to_string(config_.ignore_index) +
                  " could be a class; use a negative one (-1, or PyTorch's -100)");
    }
  }

  // Declares the head's own projection; nothing when it is tied.
  void declare(ParamRegistry& r) {
    if (tied_) return;
    weight_ = r.declare(name_ + ".weight", {std::int64_t(config_.table_rows()), std::int64_t(config_.dim)},
                        Init::normal(config_.init_stddev));
    owns_weight_ = true;
  }

  // Uses the embedding's token table as W (call it in the model's declare, after the embedding's
  // declare, instead of this head's declare). The shapes must agree.
  void tie_to(Embedding& embedding) {
    const std::string who = "LmHead '" + name_ + "'";
    if (owns_weight_) throw error(who + ": declared its own projection already; tie it instead of declaring it");
    const EmbeddingConfig& e = embedding.config();
    if (e.vocab != config_.vocab || e.table_rows() != config_.table_rows() || e.dim != config_.dim) {
      throw error(who + " (vocab " + std::to_string(config_.vocab) + ", padded " +
                  std::to_string(config_.table_rows()) + ", dim " + std::to_string(config_.dim) +
                  ") cannot share the token table of Embedding '" + embedding.name() + "' (vocab " +
                  std::to_string(e.vocab) + ", padded " + std::to_string(e.table_rows()) + ", dim " +
                  std::to_string(e.dim) + ")");
    }
    weight_ = embedding.tie_token_table();
    tied_ = true;
  }

  const LmHeadConfig& config() const noexcept { return config_; }
  bool tied() const noexcept { return tied_; }
  ParamHandle weight() const noexcept { return weight_; }

  // Workspace bytes of the logits chunk for a micro-batch of `rows` rows in dtype T.
  template <class T>
  std::size_t chunk_bytes(std::size_t rows) const noexcept {
    return std::min(rows, config_.chunk_rows) * config_.table_rows() * sizeof(T);
  }

  // The mean loss (a device Loss on Cuda, nothing waits for it) and dy = d(loss * loss_scale)/dy;
  // dW written, or added when ctx.accumulate_grads().
  template <class Ctx, class R>
  requires detail::contiguous_of<R, std::int32_t> std::pair<Loss, Activation<detail::value_t<Ctx>>> forward_backward(
      Ctx& ctx, Activation<const detail::value_t<Ctx>> y, const R& targets) {
    return run(ctx, y, stage_targets(ctx, targets), true);
  }

  // Targets checked and uploaded ahead of forward (a model's stage(), alloy/train/model.hpp).
  struct Targets {
    const std::int32_t* device = nullptr;  // rows ids in the backend's memory
    std::size_t rows = 0;
    std::size_t counted = 0;  // the rows that are not ignore_index: the mean's divisor
  };

  // Checks and uploads the targets; the count of rows that are not ignored (the loss's divisor,
  // a launch argument) is noted for a step replayed as a CUDA graph.
  template <class Ctx, class R>
  requires detail::contiguous_of<R, std::int32_t> Targets stage_targets(Ctx& ctx, const R& targets) {
    const std::string who = "LmHead '" + name_ + "'";
    const std::span<const std::int32_t> t(std::ranges::data(targets), std::ranges::size(targets));
    const std::size_t counted = detail::check_indices(t, config_.vocab, who, "target", config_.ignore_index);
    if (counted == 0) {
      throw error(who + ": every one of the " + std::to_string(t.size()) + " targets is the ignore index " +
                  std::to_string(config_.ignore_index) + "; the mean loss of no rows is undefined");
    }
    if (auto* uploads = ctx.uploads()) uploads->note(counted);
    return {detail::upload_raw(ctx, t), t.size(), counted};
  }

  // forward_backward on staged targets.
  template <class Ctx>
  std::pair<Loss, Activation<detail::value_t<Ctx>>> forward_backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> y,
                                                                     const Targets& targets) {
    return run(ctx, y, targets, true);
  }

  // The mean loss alone: no gradient, nothing written but the workspace (evaluation).
  template <class Ctx, class R>
  requires detail::contiguous_of<R, std::int32_t> Loss loss(Ctx& ctx, Activation<const detail::value_t<Ctx>> y,
                                                            const R& targets) {
    return run(ctx, y, stage_targets(ctx, targets), false).first;
  }

  // The logits y W^T alone, rows x padded_vocab in the compute dtype, in ctx's workspace (for
  // sampling: pass the rows whose next token is wanted). Columns past vocab are the padding's.
  template <class Ctx, class T = detail::value_t<Ctx>>
  Activation<T> logits(Ctx& ctx, Activation<const T> y) {
    detail::check_width("LmHead", name_, config_.dim, y.cols);
    const std::size_t vocab = config_.table_rows(), d = config_.dim;
    const Activation<T> out = detail::allocate(ctx, y.rows, vocab);
    detail::gemm(ctx, {.transa = Transpose::no,
                       .transb = Transpose::yes,
                       .m = y.rows,
                       .n = vocab,
                       .k = d,
                       .a = y.data,
                       .lda = d,
                       .b = static_cast<const T*>(ctx.param(weight_).data),
                       .ldb = d,
                       .c = out.data,
                       .ldc = vocab});
    return out;
  }

 private:
  template <class Ctx, class T = detail::value_t<Ctx>>
  std::pair<Loss, Activation<T>> run(Ctx& ctx, Activation<const T> y, const Targets& targets, bool gradient) {
    detail::check_width("LmHead", name_, config_.dim, y.cols);
    if (targets.rows != y.rows) {
      throw error("LmHead '" + name_ + "': " + std::to_string(targets.rows) + " targets for " + std::to_string(y.rows) +
                  " rows");
    }
    const std::int32_t* device_targets = targets.device;
    const std::size_t counted = targets.counted;
    const Activation<T> dy = gradient ? detail::allocate(ctx, y.rows, config_.dim) : Activation<T>{};
    float* row_loss = ctx.template allocate<float>(y.rows);
    chunks(ctx, y, device_targets, row_loss, dy.data, ctx.loss_scale() / static_cast<float>(counted));
    return {detail::mean_loss(ctx, static_cast<const float*>(row_loss), y.rows, static_cast<float>(counted)), dy};
  }

  // Runs every chunk; the logits buffer is released afterwards (the work is queued in stream order,
  // so the memory's next user runs after it).
  template <class Ctx, class T>
  void chunks(Ctx& ctx, Activation<const T> y, const std::int32_t* targets, float* row_loss, T* dy, float grad_scale) {
    const std::size_t vocab = config_.table_rows(), d = config_.dim;
    const auto mark = ctx.workspace().mark();
    T* logits = ctx.template allocate<T>(std::min(y.rows, config_.chunk_rows) * vocab);
    const T* w = ctx.param(weight_).data;
    const SoftmaxCrossEntropyOptions options{.real_classes = config_.vocab, .ignore_index = config_.ignore_index};
    for (std::size_t first = 0; first < y.rows; first += config_.chunk_rows) {
      const std::size_t rows = std::min(config_.chunk_rows, y.rows - first);
      const T* y_chunk = y.data + first * d;
      detail::gemm(ctx, {.transa = Transpose::no,
                         .transb = Transpose::yes,
                         .m = rows,
                         .n = vocab,
                         .k = d,
                         .a = y_chunk,
                         .lda = d,
                         .b = w,
                         .ldb = d,
                         .c = logits,
                         .ldc = vocab});
      softmax_cross_entropy(ctx.backend(), static_cast<const T*>(logits), targets + first, rows, vocab,
                            row_loss + first, dy ? logits : nullptr, grad_scale, options);
      if (!dy) continue;
      detail::gemm(
          ctx,
          {.m = rows, .n = d, .k = vocab, .a = logits, .lda = vocab, .b = w, .ldb = d, .c = dy + first * d, .ldc = d});
      detail::gemm(ctx, {.transa = Transpose::yes,
                         .m = vocab,
                         .n = d,
                         .k = rows,
                         .a = logits,
                         .lda = vocab,
                         .b = y_chunk,
                         .ldb = d,
                         .c = ctx.grad(weight_).data,
                         .ldc = d,
                         .beta = first > 0 || ctx.accumulate_grads() ? 1.0f : 0.0f});
    }
    ctx.workspace().release(mark);
  }

  std::string name_;
  LmHeadConfig config_;
  ParamHandle weight_;
  bool tied_ = false, owns_weight_ = false;
};

}  // namespace alloy::nn
