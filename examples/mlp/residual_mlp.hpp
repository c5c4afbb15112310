// The residual MLP of ../shared/PEERS.md, built from alloy::nn layers:
//   Linear(in, d); n blocks of x + Linear(4d, d)(GELU(Linear(d, 4d)(LayerNorm(x))));
//   LayerNorm; Linear(d, classes); softmax cross-entropy.
// Its synthetic task: labels from a fixed random "teacher" (argmax of tanh(x A) B), so there is
// something to learn and the loss must go down.
#pragma once

#include <alloy/alloy.hpp>
#include <alloy/nn/nn.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <utility>
#include <vector>

namespace mlp {

struct Shape {
  std::size_t inputs = 64, width = 64, blocks = 2, classes = 10, rows = 256;
  // How many blocks, the first ones, keep GELU's output for backward instead of recomputing it
  // there (nn::GeluOptions::keep_output): 4 x width values a row more activation memory each.
  std::size_t keep_gelu = 0;
};

// Features in pinned host memory (alloy::pinned_vector): the trainer's input pipeline copies them
// to the GPU by DMA on its copy stream, overlapped with compute. Labels are small and pageable:
// they go through the pipeline's staging memory.
struct Batch {
  alloy::pinned_vector<float> x;    // rows x inputs
  std::vector<std::int32_t> label;  // rows
};

class TeacherTask {
 public:
  // A low-rank teacher (at most 32 hidden units): cheap enough to label 8192 x 1024 on the host.
  TeacherTask(const Shape& s, std::uint64_t seed) : s_(s), hidden_(std::min<std::size_t>(2 * s.classes, 32)) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> d(0.0f, 1.0f);
    a_.resize(s.inputs * hidden_);
    b_.resize(hidden_ * s.classes);
    for (auto& v : a_) v = d(rng) / std::sqrt(float(s.inputs));
    for (auto& v : b_) v = d(rng);
  }

  Batch batch(std::mt19937_64& rng) const {
    std::normal_distribution<float> d(0.0f, 1.0f);
    Batch b{alloy::pinned_vector<float>(s_.rows * s_.inputs), std::vector<std::int32_t>(s_.rows)};
    for (auto& v : b.x) v = d(rng);
    std::vector<float> h(hidden_), logits(s_.classes);
    for (std::size_t r = 0; r < s_.rows; ++r) {
      for (std::size_t j = 0; j < hidden_; ++j) {
        float acc = 0;
        for (std::size_t i = 0; i < s_.inputs; ++i) acc += b.x[r * s_.inputs + i] * a_[i * hidden_ + j];
        h[j] = std::tanh(acc);
      }
      std::size_t best = 0;
      for (std::size_t c = 0; c < s_.classes; ++c) {
        float acc = 0;
        for (std::size_t j = 0; j < hidden_; ++j) acc += h[j] * b_[j * s_.classes + c];
        logits[c] = acc;
        if (logits[c] > logits[best]) best = c;
      }
      b.label[r] = static_cast<std::int32_t>(best);
    }
    return b;
  }

 private:
  Shape s_;
  std::size_t hidden_;
  std::vector<float> a_, b_;
};

namespace nn = alloy::nn;
using Block = nn::Residual<nn::Sequential<nn::LayerNorm, nn::Linear, nn::Gelu, nn::Linear>>;

inline std::vector<Block> blocks(const Shape& s) {
  std::vector<Block> b;
  for (std::size_t i = 0; i < s.blocks; ++i) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    b.emplace_back(nn::Sequential(nn::LayerNorm(p + "norm", s.width), nn::Linear(p + "up", s.width, 4 * s.width),
                                  nn::Gelu(nn::GeluOptions{.keep_output = i < s.keep_gelu}),
                                  nn::Linear(p + "down", 4 * s.width, s.width)));
  }
  return b;
}

// A LayeredModel (alloy/train/model.hpp): the trainer runs the residual blocks itself, so
// Checkpointing keeps only every k-th block's input and recomputes the rest in backward.
//   input: the batch uploaded and embedded; layers: the blocks; head: final LayerNorm, the
//   classifier and softmax cross-entropy, forward and backward; input_backward: the embedding.
class ResidualMlp {
 public:
  using batch_type = Batch;

  explicit ResidualMlp(const Shape& s)
      : shape_(s),
        embed_("embed", s.inputs, s.width),
        blocks_(mlp::blocks(s)),
        final_norm_("final_norm", s.width),
        head_("head", s.width, s.classes) {}

  void declare(alloy::ParamRegistry& r) {
    embed_.declare(r);
    for (auto& b : blocks_) b.declare(r);
    final_norm_.declare(r);
    head_.declare(r);
  }

  std::vector<Block>& layers() noexcept { return blocks_; }

  // Forward alone, nothing updated and no gradients written: the logits of rows of features (in
  // the compute dtype, in ctx's workspace) and their mean cross-entropy against `labels`.
  template <class Ctx>
  std::pair<nn::Activation<const nn::detail::value_t<Ctx>>, float> evaluate(Ctx& ctx, const std::vector<float>& x,
                                                                            const std::vector<std::int32_t>& labels) {
    const auto input = nn::upload_features(ctx, x, shape_.inputs);
    const auto* targets = nn::upload_targets(ctx, labels, shape_.classes);
    alloy::Activation<const nn::detail::value_t<Ctx>> y = embed_.forward(ctx, input);
    for (auto& b : blocks_) y = b.forward(ctx, y);
    const auto logits = head_.forward(ctx, final_norm_.forward(ctx, y));
    return {logits, loss_.forward_backward(ctx, logits, targets).first};
  }

  // The micro-batch's host part (alloy/train/model.hpp): a batch of the wrong shape is refused
  // here, before anything is copied or launched; the features and labels go up through the
  // trainer's input pipeline, and forward reads them there.
  template <class Ctx>
  void stage(Ctx& ctx, const Batch& b) {
    check(b);
    features_ = nn::upload_float_features(ctx, b.x, shape_.inputs);
    targets_ = nn::upload_targets(ctx, b.label, shape_.classes);
  }

  // The features' compute-dtype copy, which the embedding's weight gradient reads at the very end
  // of backward, is not kept from forward: input_backward converts the uploaded floats again (they
  // stay valid for the micro-batch). Its rows x width output goes below the copy, which is given
  // back at once, so the copy is not live at the step's peak.
  template <class Ctx>
  auto input(Ctx& ctx, const Batch&) {
    const auto y = nn::detail::allocate(ctx, features_.rows, shape_.width);
    const auto mark = ctx.workspace().mark();
    embed_.forward_into(ctx, alloy::Activation<const nn::detail::value_t<Ctx>>(nn::features_as(ctx, features_)),
                        y.data);
    ctx.workspace().release(mark);
    return y;
  }

  template <class Ctx>
  auto head(Ctx& ctx, alloy::Activation<const nn::detail::value_t<Ctx>> y, const Batch&) {
    const auto logits = head_.forward(ctx, final_norm_.forward(ctx, y));
    const auto [loss, dlogits] = loss_.forward_backward(ctx, logits, targets_);
    return std::make_pair(loss, final_norm_.backward(ctx, head_.backward(ctx, dlogits)));
  }

  // The embedding's weight and bias gradients; nothing reads the features' gradient, so its
  // product does not run.
  template <class Ctx>
  void input_backward(Ctx& ctx, alloy::Activation<const nn::detail::value_t<Ctx>> dx, const Batch&) {
    const auto x = nn::features_as(ctx, features_);
    embed_.weight_gradient(ctx, dx, static_cast<const nn::detail::value_t<Ctx>*>(x.data), embed_.has_bias());
  }

  // The same micro-batch driven by hand (tests): stages it and recomputes every
  // ctx.checkpoint_every() blocks.
  template <class Ctx>
  float forward_backward(Ctx& ctx, const Batch& b) {
    stage(ctx, b);
    return alloy::run_layered(ctx, *this, b, ctx.checkpoint_every(), kept_);
  }

 private:
  void check(const Batch& b) const {
    if (b.x.empty() || b.x.size() % shape_.inputs != 0 || b.label.size() != b.x.size() / shape_.inputs) {
      throw alloy::error("ResidualMlp: a batch of " + std::to_string(b.x.size()) + " features and " +
                         std::to_string(b.label.size()) + " labels; it needs rows x " + std::to_string(shape_.inputs) +
                         " features and one label per row");
    }
  }

  Shape shape_;
  nn::Linear embed_;
  std::vector<Block> blocks_;
  nn::LayerNorm final_norm_;
  nn::Linear head_;
  nn::SoftmaxCrossEntropy loss_;
  alloy::KeptInputs kept_;
  alloy::Activation<const float> features_;  // this micro-batch's, uploaded by stage()
  const std::int32_t* targets_ = nullptr;    // the same
};

}  // namespace mlp
