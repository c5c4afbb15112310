// GPT-2 (Radford et al. 2019) as an alloy LayeredModel, built from alloy::nn layers:
//   x = wte[tokens] + wpe[positions]                         nn::Embedding
//   n blocks of x += attn(ln_1(x)); x += mlp(ln_2(x))        nn::gpt2_block (pre-LayerNorm)
//   logits = ln_f(x) wte^T; softmax cross-entropy            nn::LayerNorm + nn::LmHead tied to wte
// Parameters are declared under Hugging Face GPT2LMHeadModel's names (transformer.wte.weight,
// transformer.h.<i>.attn.c_attn.weight, ...), so hf_weights.hpp only transposes the Conv1D
// weights and trims the token table's padding on the way out.
//
// The trainer runs the blocks itself (input / layers / head / input_backward), so Checkpointing
// keeps the blocks' inputs alone and recomputes each block's activations in backward.
#pragma once

#include <alloy/alloy.hpp>
#include <alloy/nn/nn.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace gpt2 {

namespace nn = alloy::nn;

struct Config {
  std::size_t vocab = 256, padded_vocab = 256;  // GPT-2's tokenizer: 50257, padded to 50304
  std::size_t dim = 64, layers = 2, heads = 4;
  std::size_t seq = 64;  // positions of wpe, and the sequence length trained on
  // The MLPs keep GELU's output for backward (nn::GeluOptions): 4 x dim values per token per
  // block more memory, one element-wise pass less each way. --recompute-gelu turns it off.
  bool keep_gelu_output = true;
  // Rows of logits the head holds at once (nn::LmHeadConfig::chunk_rows): memory against the
  // number of products; --head-chunk sets it.
  std::size_t head_chunk_rows = nn::LmHeadConfig::default_chunk_rows;

  std::size_t head_dim() const { return dim / heads; }
};

// Named sizes: "124M" is GPT-2 small; the others use bytes as tokens (vocab 256).
inline std::optional<Config> preset(const std::string& name) {
  if (name == "tiny") return Config{256, 256, 64, 2, 4, 64};
  if (name == "small") return Config{256, 256, 128, 4, 4, 128};
  if (name == "medium") return Config{256, 256, 384, 6, 6, 256};
  if (name == "124M") return Config{50257, 50304, 768, 12, 12, 1024};
  return std::nullopt;
}

// One micro-batch: rows of `seq` tokens and, for each, the token that follows it. Pinned host
// memory: the trainer's input pipeline copies it to the GPU by DMA on its copy stream.
struct Batch {
  alloy::pinned_vector<std::int32_t> tokens, targets;  // batch x seq each
};

class Gpt2 {
 public:
  using batch_type = Batch;

  explicit Gpt2(const Config& c)
      : config_(c),
        embed_("transformer.wte", "transformer.wpe",
               {.vocab = c.vocab,
                .padded_vocab = c.padded_vocab,
                .dim = c.dim,
                .max_positions = c.seq,
                .token_stddev = 0.02f,
                .position_stddev = 0.02f}),  // Hugging Face's initializer_range for both tables
        ln_f_("transformer.ln_f", c.dim),
        lm_head_("lm_head",
                 {.vocab = c.vocab, .padded_vocab = c.padded_vocab, .dim = c.dim, .chunk_rows = c.head_chunk_rows}) {
    if (c.heads == 0 || c.dim % c.heads != 0) {
      throw alloy::error("GPT-2: dim " + std::to_string(c.dim) + " is not a multiple of " + std::to_string(c.heads) +
                         " heads");
    }
    for (std::size_t i = 0; i < c.layers; ++i) {
      blocks_.push_back(nn::gpt2_block("transformer.h." + std::to_string(i), c.dim, c.heads, c.seq, c.layers, 0.02f,
                                       {.keep_output = c.keep_gelu_output}));
    }
  }

  const Config& config() const noexcept { return config_; }

  // In Hugging Face's state_dict order; lm_head shares the token table (declares nothing).
  void declare(alloy::ParamRegistry& r) {
    embed_.declare(r);
    for (auto& b : blocks_) b.declare(r);
    ln_f_.declare(r);
    lm_head_.tie_to(embed_);
  }

  std::vector<nn::Gpt2Block>& layers() noexcept { return blocks_; }

  // The micro-batch's host part (alloy/train/model.hpp): a batch of the wrong shape is refused
  // here, before anything is copied or launched; the tokens (grouped for the embedding's backward)
  // and the targets go up through the trainer's input pipeline.
  template <class Ctx>
  void stage(Ctx& ctx, const Batch& b) {
    check(b);
    embed_.stage(ctx, b.tokens, config_.seq);
    targets_ = lm_head_.stage_targets(ctx, b.targets);
  }

  template <class Ctx>
  auto input(Ctx& ctx, const Batch&) {
    return embed_.forward(ctx);
  }

  // ln_f forward, the tied head forward and backward (loss and its gradient in one pass over
  // chunks of rows), ln_f backward: the loss and d(loss * scale) / (the blocks' output).
  template <class Ctx>
  auto head(Ctx& ctx, alloy::Activation<const nn::detail::value_t<Ctx>> y, const Batch&) {
    using T = nn::detail::value_t<Ctx>;
    const auto x = ln_f_.forward(ctx, y);
    const auto [loss, dx] = lm_head_.forward_backward(ctx, alloy::Activation<const T>(x), targets_);
    return std::make_pair(loss, ln_f_.backward(ctx, alloy::Activation<const T>(dx)));
  }

  template <class Ctx>
  void input_backward(Ctx& ctx, alloy::Activation<const nn::detail::value_t<Ctx>> dx, const Batch&) {
    embed_.backward(ctx, dx);
  }

  // The same micro-batch driven by hand (tests): stages it and recomputes every
  // ctx.checkpoint_every() blocks.
  template <class Ctx>
  float forward_backward(Ctx& ctx, const Batch& b) {
    stage(ctx, b);
    return alloy::run_layered(ctx, *this, b, ctx.checkpoint_every(), kept_);
  }

  // Forward alone over whole sequences of `seq` tokens (rows = tokens.size()): the logits,
  // tokens.size() x padded_vocab in the compute dtype, of the rows listed in `rows` (each in
  // [0, tokens.size())), in that order, in ctx's workspace. Nothing is written but the workspace.
  template <class Ctx>
  alloy::Activation<const nn::detail::value_t<Ctx>> logits(Ctx& ctx, std::span<const std::int32_t> tokens,
                                                           std::span<const std::size_t> rows) {
    using T = nn::detail::value_t<Ctx>;
    alloy::Activation<const T> y = embed_.forward(ctx, tokens, config_.seq);
    for (auto& b : blocks_) y = b.forward(ctx, y);
    // The chosen rows gathered into one activation (a copy per row), then ln_f and the head.
    const auto picked = nn::detail::allocate(ctx, rows.size(), config_.dim);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      if (rows[i] >= y.rows)
        throw alloy::error("GPT-2 logits: row " + std::to_string(rows[i]) + " of " + std::to_string(y.rows));
      alloy::for_each_n(ctx.backend(), config_.dim, alloy::detail::CopyActivation<T>{},
                        alloy::in(y.data + rows[i] * config_.dim), alloy::out(picked.data + i * config_.dim));
    }
    const auto x = ln_f_.forward(ctx, alloy::Activation<const T>(picked));
    return lm_head_.logits(ctx, alloy::Activation<const T>(x));
  }

 private:
  void check(const Batch& b) const {
    if (b.tokens.empty() || b.tokens.size() % config_.seq != 0 || b.targets.size() != b.tokens.size()) {
      throw alloy::error("GPT-2: a batch of " + std::to_string(b.tokens.size()) + " tokens and " +
                         std::to_string(b.targets.size()) + " targets; it needs rows of " +
                         std::to_string(config_.seq) + " tokens and one target per token");
    }
  }

  Config config_;
  nn::Embedding embed_;
  std::vector<nn::Gpt2Block> blocks_;
  nn::LayerNorm ln_f_;
  nn::LmHead lm_head_;
  alloy::KeptInputs kept_;
  nn::LmHead::Targets targets_;  // this micro-batch's, uploaded by stage()
};

}  // namespace gpt2
