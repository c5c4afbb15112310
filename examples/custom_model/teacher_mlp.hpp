// A model that owns its forward and backward, using no alloy layers: a two-layer perceptron
// (tanh hidden layer) that learns to imitate a fixed random "teacher" network of the same shape.
// Every loop is an alloy::for_each_n over a functor, so the same model runs on the Host and the
// Cuda backend. Matrix products are one thread per output element: plain and correct, not fast.
#pragma once

#include <alloy/alloy.hpp>

#include <cmath>
#include <random>
#include <vector>

namespace teacher {

struct Batch {
  std::vector<float> x;  // rows x inputs
  std::vector<float> y;  // rows x outputs: the teacher's answers
};

// Draws batches from the teacher: x ~ N(0, 1), y = teacher(x).
class Teacher {
 public:
  Teacher(int inputs, int hidden, int outputs, std::uint64_t seed)
      : in_(inputs),
        hid_(hidden),
        out_(outputs),
        w1_(hidden * inputs),
        b1_(hidden),
        w2_(outputs * hidden),
        b2_(outputs) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (auto& v : w1_) v = d(rng) / std::sqrt(float(inputs));
    for (auto& v : b1_) v = 0.1f * d(rng);
    for (auto& v : w2_) v = d(rng) / std::sqrt(float(hidden));
    for (auto& v : b2_) v = 0.1f * d(rng);
  }

  Batch batch(int rows, std::mt19937_64& rng) const {
    std::normal_distribution<float> d(0.0f, 1.0f);
    Batch b{std::vector<float>(rows * in_), std::vector<float>(rows * out_)};
    for (auto& v : b.x) v = d(rng);
    std::vector<float> h(hid_);
    for (int r = 0; r < rows; ++r) {
      for (int j = 0; j < hid_; ++j) {
        float s = b1_[j];
        for (int i = 0; i < in_; ++i) s += w1_[j * in_ + i] * b.x[r * in_ + i];
        h[j] = std::tanh(s);
      }
      for (int k = 0; k < out_; ++k) {
        float s = b2_[k];
        for (int j = 0; j < hid_; ++j) s += w2_[k * hid_ + j] * h[j];
        b.y[r * out_ + k] = s;
      }
    }
    return b;
  }

 private:
  int in_, hid_, out_;
  std::vector<float> w1_, b1_, w2_, b2_;
};

namespace kernels {

// h[r, j] = tanh(sum_i x[r, i] w1[j, i] + b1[j])
template <class P>
struct Hidden {
  const float* x;
  const P* w1;
  const P* b1;
  float* h;
  int in, hid;
  ALLOY_HOST_DEVICE void operator()(std::size_t e) const {
    const int r = int(e) / hid, j = int(e) % hid;
    float s = alloy::to_float(b1[j]);
    for (int i = 0; i < in; ++i) s += x[r * in + i] * alloy::to_float(w1[j * in + i]);
    h[e] = tanhf(s);
  }
};

// dy[r, k] = (y[r, k] - target) * seed, where y = h w2^T + b2; also the squared error.
template <class P>
struct OutputAndError {
  const float* h;
  const P* w2;
  const P* b2;
  const float* target;
  float* dy;
  float* sq;
  int hid, out;
  float seed;
  ALLOY_HOST_DEVICE void operator()(std::size_t e) const {
    const int r = int(e) / out, k = int(e) % out;
    float s = alloy::to_float(b2[k]);
    for (int j = 0; j < hid; ++j) s += h[r * hid + j] * alloy::to_float(w2[k * hid + j]);
    const float diff = s - target[e];
    sq[e] = diff * diff;
    dy[e] = diff * seed;
  }
};

// dh[r, j] = (sum_k dy[r, k] w2[k, j]) (1 - h^2)
template <class P>
struct HiddenGrad {
  const float* dy;
  const P* w2;
  const float* h;
  float* dh;
  int hid, out;
  ALLOY_HOST_DEVICE void operator()(std::size_t e) const {
    const int r = int(e) / hid, j = int(e) % hid;
    float s = 0.0f;
    for (int k = 0; k < out; ++k) s += dy[r * out + k] * alloy::to_float(w2[k * hid + j]);
    dh[e] = s * (1.0f - h[e] * h[e]);
  }
};

// dw[a, b] = sum_r d[r, a] v[r, b]; with v null, db[a] = sum_r d[r, a]. Written or added.
template <class G>
struct WeightGrad {
  const float* d;
  const float* v;  // null for a bias
  G* grad;
  int rows, da, dv;
  bool add;
  ALLOY_HOST_DEVICE void operator()(std::size_t e) const {
    const int a = v ? int(e) / dv : int(e), b = v ? int(e) % dv : 0;
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += d[r * da + a] * (v ? v[r * dv + b] : 1.0f);
    grad[e] = alloy::round_nearest<G>(add ? alloy::to_float(grad[e]) + s : s);
  }
};

}  // namespace kernels

class StudentMlp {
 public:
  using batch_type = Batch;

  StudentMlp(int inputs, int hidden, int outputs) : in_(inputs), hid_(hidden), out_(outputs) {}

  void declare(alloy::ParamRegistry& r) {
    w1_ = r.declare("w1", {hid_, in_}, alloy::Init::normal(1.0f / std::sqrt(float(in_))));
    b1_ = r.declare("b1", {hid_}, alloy::Init::zeros(), {.weight_decay = false});
    w2_ = r.declare("w2", {out_, hid_}, alloy::Init::normal(1.0f / std::sqrt(float(hid_))));
    b2_ = r.declare("b2", {out_}, alloy::Init::zeros(), {.weight_decay = false});
  }

  // Mean squared error / 2 over the batch; gradients of loss * ctx.loss_scale().
  template <class Ctx>
  float forward_backward(Ctx& ctx, const Batch& batch) {
    using P = typename Ctx::param_type;
    using G = typename Ctx::grad_type;
    const auto be = ctx.backend();
    const int rows = static_cast<int>(batch.x.size()) / in_;
    if (rows * in_ != static_cast<int>(batch.x.size()) || batch.y.size() != std::size_t(rows) * out_) {
      throw alloy::error("StudentMlp: batch has " + std::to_string(batch.x.size()) + " inputs and " +
                         std::to_string(batch.y.size()) + " targets, not a multiple of " + std::to_string(in_) +
                         " and " + std::to_string(out_));
    }
    float* x = upload(ctx, batch.x);
    float* target = upload(ctx, batch.y);
    float* h = ctx.template allocate<float>(std::size_t(rows) * hid_);
    float* dy = ctx.template allocate<float>(std::size_t(rows) * out_);
    float* sq = ctx.template allocate<float>(std::size_t(rows) * out_);
    float* dh = ctx.template allocate<float>(std::size_t(rows) * hid_);
    const float count = float(rows) * float(out_);
    const bool add = ctx.accumulate_grads();
    alloy::for_each_n(be, std::size_t(rows) * hid_,
                      kernels::Hidden<P>{x, ctx.param(w1_).data, ctx.param(b1_).data, h, in_, hid_});
    alloy::for_each_n(be, std::size_t(rows) * out_,
                      kernels::OutputAndError<P>{h, ctx.param(w2_).data, ctx.param(b2_).data, target, dy, sq, hid_,
                                                 out_, ctx.loss_scale() / count});
    alloy::for_each_n(be, std::size_t(rows) * hid_, kernels::HiddenGrad<P>{dy, ctx.param(w2_).data, h, dh, hid_, out_});
    alloy::for_each_n(be, std::size_t(out_) * hid_,
                      kernels::WeightGrad<G>{dy, h, ctx.grad(w2_).data, rows, out_, hid_, add});
    alloy::for_each_n(be, std::size_t(out_),
                      kernels::WeightGrad<G>{dy, nullptr, ctx.grad(b2_).data, rows, out_, 1, add});
    alloy::for_each_n(be, std::size_t(hid_) * in_,
                      kernels::WeightGrad<G>{dh, x, ctx.grad(w1_).data, rows, hid_, in_, add});
    alloy::for_each_n(be, std::size_t(hid_),
                      kernels::WeightGrad<G>{dh, nullptr, ctx.grad(b1_).data, rows, hid_, 1, add});
    return alloy::reduce_sum(be, static_cast<const float*>(sq), std::size_t(rows) * out_) / (2.0f * count);
  }

 private:
  template <class Ctx>
  static float* upload(Ctx& ctx, const std::vector<float>& v) {
    float* p = ctx.template allocate<float>(v.size());
    if constexpr (std::is_same_v<typename Ctx::backend_type, alloy::Host>) {
      std::copy(v.begin(), v.end(), p);
    } else {
#if ALLOY_HAS_CUDA_RUNTIME  // a host-only build (ALLOY_NO_CUDA) has no Cuda backend to copy to
      ALLOY_CUDA_CHECK(
          cudaMemcpyAsync(p, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice, ctx.backend().stream));
#endif
    }
    return p;
  }

  int in_, hid_, out_;
  alloy::ParamHandle w1_, b1_, w2_, b2_;
};

}  // namespace teacher
