// Embedding: token ids -> rows of a [padded_vocab, dim] table, plus, optionally, a learned
// position embedding (rows 0 .. seq - 1 of a [max_positions, dim] table), summed into the model's
// first activation (GPT-2's wte and wpe):
//   x[b seq + t, :] = wte[tokens[b seq + t], :] + wpe[t, :]
// The backward pass is deterministic (kernels/embedding.hpp): rows are grouped by token on the
// host at forward time, and the gradients are gathered without atomics.
//
// Token ids come from the batch on the host; every id is checked to lie in [0, vocab) before
// anything is uploaded or launched (a bad id is an alloy::error naming the row). The ids and the
// grouping go to the device through the trainer's input pipeline (nn/input.hpp).
//
// Weight tying: an LmHead tied to this layer (LmHead::tie_to) uses the token table as its output
// projection. Its backward runs first and writes (or adds) the table's gradient; this layer's
// backward then always adds to it, so the gradient is the sum of both uses.
#pragma once

#include <alloy/error.hpp>
#include <alloy/kernels/embedding.hpp>
#include <alloy/memory/registry.hpp>
#include <alloy/nn/activation.hpp>
#include <alloy/nn/input.hpp>

#include <cstdint>
#include <span>
#include <string>

namespace alloy::nn {

struct EmbeddingConfig {
  std::size_t vocab = 0;          // token ids lie in [0, vocab)
  std::size_t padded_vocab = 0;   // rows of the token table, >= vocab (GPT-2: 50257 -> 50304); 0: vocab
  std::size_t dim = 0;            // features of a row
  std::size_t max_positions = 0;  // rows of the position table; 0: no position embedding
  float token_stddev = 0.02f;     // normal initialization (GPT-2's; llm.c starts wpe at 0.01)
  float position_stddev = 0.01f;
  bool weight_decay = true;  // GPT-2 (nanoGPT, llm.c) decays both tables, the tied wte included

  std::size_t table_rows() const noexcept { return padded_vocab == 0 ? vocab : padded_vocab; }
};

class Embedding {
 public:
  // A token table `token_name.weight` alone.
  Embedding(std::string token_name, EmbeddingConfig config) : Embedding(std::move(token_name), {}, config) {}

  // A token table and, when config.max_positions > 0, a position table `position_name.weight`.
  Embedding(std::string token_name, std::string position_name, EmbeddingConfig config)
      : token_name_(std::move(token_name)), position_name_(std::move(position_name)), config_(config) {
    const std::string who = "Embedding '" + token_name_ + "'";
    if (config_.vocab == 0 || config_.dim == 0) throw error(who + ": vocab and dim must be positive");
    if (config_.table_rows() < config_.vocab) {
      throw error(who + ": padded_vocab = " + std::to_string(config_.padded_vocab) +
                  " is less than vocab = " + std::to_string(config_.vocab));
    }
    if ((config_.max_positions > 0) != !position_name_.empty()) {
      throw error(who + ": a position table needs both a name and max_positions > 0 (got '" + position_name_ +
                  "' and " + std::to_string(config_.max_positions) + ")");
    }
  }

  void declare(ParamRegistry& r) {
    const ParamOptions options{.weight_decay = config_.weight_decay};
    wte_ = r.declare(token_name_ + ".weight", {std::int64_t(config_.table_rows()), std::int64_t(config_.dim)},
                     Init::normal(config_.token_stddev), options);
    if (has_positions()) {
      wpe_ = r.declare(position_name_ + ".weight", {std::int64_t(config_.max_positions), std::int64_t(config_.dim)},
                       Init::normal(config_.position_stddev), options);
    }
    declared_ = true;
  }

  const EmbeddingConfig& config() const noexcept { return config_; }
  const std::string& name() const noexcept { return token_name_; }
  bool has_positions() const noexcept { return config_.max_positions > 0; }
  bool tied() const noexcept { return tied_; }

  // The token table's handle, for an output projection that shares it and whose backward runs
  // before this layer's: from now on this layer's backward adds to the table's gradient. Called
  // by LmHead::tie_to, after declare.
  ParamHandle tie_token_table() {
    if (!declared_) throw error("Embedding '" + token_name_ + "': tie the token table after declare()");
    tied_ = true;
    return wte_;
  }

  // x (rows x dim) for rows = tokens.size() = batch x sequence_length, row b seq + t at position t.
  template <class Ctx, class R>
  requires detail::contiguous_of<R, std::int32_t> Activation<detail::value_t<Ctx>> forward(
      Ctx& ctx, const R& tokens, std::size_t sequence_length) {
    stage(ctx, tokens, sequence_length);
    return forward(ctx);
  }

  // forward's host part (a model's stage(), alloy/train/model.hpp): checks the tokens, groups them
  // by token for backward and uploads the ids and the groups, whose sizes depend on the row count
  // alone; the sequence length is noted for a step replayed as a CUDA graph.
  template <class Ctx, class R>
  requires detail::contiguous_of<R, std::int32_t>
  void stage(Ctx& ctx, const R& tokens, std::size_t sequence_length) {
    const std::span<const std::int32_t> ids(std::ranges::data(tokens), std::ranges::size(tokens));
    const std::string who = "Embedding '" + token_name_ + "'";
    if (ids.empty() || sequence_length == 0 || ids.size() % sequence_length != 0) {
      throw error(who + ": " + std::to_string(ids.size()) + " tokens are not a whole number of sequences of " +
                  std::to_string(sequence_length));
    }
    if (has_positions() && sequence_length > config_.max_positions) {
      throw error(who + ": sequences of " + std::to_string(sequence_length) + " tokens, but the position table '" +
                  position_name_ + "' has " + std::to_string(config_.max_positions) + " positions");
    }
    detail::check_indices(ids, config_.vocab, who, "token");
    groups_.build(ids, config_.vocab);
    tokens_ = detail::upload_raw(ctx, ids);
    groups_view_ = groups_.view(detail::upload_raw(ctx, groups_.packed()));
    rows_ = ids.size();
    sequence_length_ = sequence_length;
    if (auto* uploads = ctx.uploads()) uploads->note(sequence_length);
  }

  // forward of the tokens staged last.
  template <class Ctx>
  Activation<detail::value_t<Ctx>> forward(Ctx& ctx) {
    if (tokens_ == nullptr) throw error("Embedding '" + token_name_ + "': forward(ctx) before any stage()");
    auto x = detail::allocate(ctx, rows_, config_.dim);
    embedding_forward(ctx.backend(), tokens_, ctx.param(wte_).data, has_positions() ? ctx.param(wpe_).data : nullptr,
                      x.data, rows_, config_.dim, sequence_length_);
    return x;
  }

  // Adds each row of dx to its token's gradient row (the table's gradient written first when
  // neither tied nor accumulating) and writes or adds the position table's gradient.
  template <class Ctx>
  void backward(Ctx& ctx, Activation<const detail::value_t<Ctx>> dx) {
    if (dx.rows != rows_ || dx.cols != config_.dim) {
      throw error("Embedding '" + token_name_ + "': the gradient is " + std::to_string(dx.rows) + " x " +
                  std::to_string(dx.cols) + ", the forward pass made " + std::to_string(rows_) + " x " +
                  std::to_string(config_.dim));
    }
    float* scratch =
        ctx.template allocate<float>(embedding_token_backward_scratch_floats(groups_view_, config_.dim) + 1);
    embedding_token_backward(ctx.backend(), dx.data, groups_view_, config_.dim, ctx.grad(wte_).data,
                             config_.table_rows(), tied_ || ctx.accumulate_grads(), scratch);
    if (has_positions()) {
      embedding_position_backward(ctx.backend(), dx.data, rows_, config_.dim, sequence_length_, ctx.grad(wpe_).data,
                                  config_.max_positions, ctx.accumulate_grads());
    }
  }

 private:
  std::string token_name_, position_name_;
  EmbeddingConfig config_;
  ParamHandle wte_, wpe_;
  bool declared_ = false, tied_ = false;
  // The last forward pass's micro-batch, for backward.
  TokenGroups groups_;
  TokenGroupsView groups_view_;
  const std::int32_t* tokens_ = nullptr;
  std::size_t rows_ = 0, sequence_length_ = 0;
};

}  // namespace alloy::nn
