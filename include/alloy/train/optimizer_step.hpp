// OptimizerStep: what happens between "gradients exist" and "the next forward can start".
//   1. pass 1 (one read of the gradients): sum of squares of the unscaled gradients
//      (kernels/grad_stats.hpp), unless the last micro-batch's accumulation already summed
//      them (accumulate(), kernels/accumulate_grads.hpp);
//   2. the decision (kernels/step_decision.hpp): non-finite means the step is skipped (master,
//      state and parameters left bit-identical), counted and reported with the first parameter
//      whose gradient was non-finite, and the scaler backs off; otherwise the global norm gives
//      the clip coefficient and the scaler counts toward growth;
//   3. pass 2 (one fused pass over all arenas): the update (kernels/fused_update.hpp).
//
// Where step 2 happens: on Cuda, for one replica and the fused optimizers (all but Adafactor), a
// one-thread kernel decides skip and grad_mult from the sum on the device, and pass 2 is queued
// behind it, reading the decision there, before the host waits for the sum (an event after its
// copy back): the device goes from pass 1 to pass 2 without waiting for the host. The host then
// computes the same decision from the same float (the same correctly rounded double operations,
// so the same bits) for the counters, the scaler and StepStats, and on a skip looks for the
// first non-finite parameter, which pass 2 has left as it was. A scale that would fall below its
// minimum is an error thrown after the device skipped the update, so it still changes nothing.
// The Host backend, Adafactor (per-tensor passes with host-side scalars) and the sharded path
// (step with replicas: the sum is combined over the ranks on the host) decide on the host and
// queue pass 2 after.
//
// Who owns the gradient accumulator (stores with one: a 16-bit compute dtype and
// Accumulate<N>, N > 1):
//  - the caller of accumulate() (the Trainer): accumulate(store, mb, count) after each
//    micro-batch's backward writes acc = g (mb 0, acc not read) or acc += g, and the last one
//    also sums the squares, so step() reads the gradients once (pass 2 only) and does not clear
//    the accumulator: the next step's first micro-batch overwrites it. With count == 1 nothing
//    is copied: step() runs pass 1 and pass 2 on the compute-dtype gradients themselves.
//  - otherwise (code that fills accumulator_arena() itself and calls step()): step() runs
//    pass 1 on the accumulator and clears it (in pass 2, or on a skipped step), as it always has.
//
// A sharded store (ZeroRedundancy) holds master weights and state for one range of the arenas:
// pass 1 and pass 2 run over that range, and step(store, options, replicas) combines the ranks'
// sums of squares (and the first non-finite tensor) through `replicas`, so every rank decides alike.
#pragma once

#include <alloy/kernels/accumulate_grads.hpp>
#include <alloy/kernels/adafactor_update.hpp>
#include <alloy/kernels/fused_update.hpp>
#include <alloy/kernels/fused_update_q8.hpp>
#include <alloy/kernels/grad_stats.hpp>
#include <alloy/kernels/step_decision.hpp>
#include <alloy/train/param_store.hpp>

#if ALLOY_HAS_CUDA_RUNTIME
#include <alloy/backend/cuda/handles.hpp>
#include <alloy/backend/pinned.hpp>
#endif

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <utility>

namespace alloy {

struct StepOptions {
  float lr = 0.0f;             // this step's learning rate (schedules live with the caller)
  float max_grad_norm = 0.0f;  // clip the global norm to this; 0 disables clipping
};

struct StepStats {
  bool skipped = false;    // a non-finite gradient: nothing was updated
  double grad_norm = 0.0;  // global L2 norm of the unscaled gradients, before clipping
  double clip_coefficient = 1.0;
  float loss_scale = 1.0f;       // the scale this step's gradients carried
  float next_loss_scale = 1.0f;  // the scale for the next backward
  ScaleEvent scale_event = ScaleEvent::kept;
  std::uint64_t step = 0;  // applied steps so far (the optimizer's t)
  std::uint64_t skipped_steps = 0;
  std::uint64_t overflows = 0;
  // A skipped step: the first parameter, in declaration order, whose gradient holds a non-finite
  // value (found after the decision, on skipped steps only); empty otherwise.
  std::string first_non_finite;
};

namespace detail {
// One replica alone: what pass 1 finds is the step's.
struct SingleReplica {
  double sum(double local) const { return local; }
  std::size_t min(std::size_t local) const { return local; }
};

// |x| as float; NaN stays NaN, so Max over it flags NaN and both infinities.
struct AbsAsFloat {
  template <class T>
  ALLOY_HOST_DEVICE float operator()(const T& x) const {
    const auto f = static_cast<float>(x);
    return f < 0.0f ? -f : f;
  }
};
}  // namespace detail

// Runtime settings of a step engine. The scaler config is used by DynamicLossScale only.
template <class O, class Scaler>
struct StepConfig {
  typename O::Config optimizer{};
  typename Scaler::Config scaler{};
  Rounding param_rounding = Rounding::nearest_even;  // writing the compute copy
  std::uint64_t seed = 0;                            // stochastic rounding's random stream
};

template <class P, class O, backend B, int MicroBatches = 1>
class OptimizerStep {
  // Where this step's gradients are, as accumulate() left them.
  enum class Gradients {
    caller_owned,  // no accumulate() since the last step: the optimizer's gradients, as the caller left them
    accumulating,  // accumulate() ran, but not for the last micro-batch: the accumulator, not summed
    summed,        // the last micro-batch summed into the accumulator, with the squares
    compute,       // one micro-batch: the compute-dtype gradients, the accumulator unused
  };

 public:
  using store_type = ParamStore<P, O, B, MicroBatches>;
  using scaler_type = typename P::scaler_type;
  using config_type = StepConfig<O, scaler_type>;

 private:
  template <class Opt>
  struct VaryingOf {
    using type = std::byte;  // Adafactor: its scalars are per tensor, computed on the host
  };
  template <class Opt>
  requires requires { typename Opt::rule_type; }
  struct VaryingOf<Opt> {
    using type = detail::StepVarying<typename Opt::rule_type>;
  };
  using varying_type = typename VaryingOf<O>::type;

 public:
  explicit OptimizerStep(config_type config = {}, B be = {}) : config_(config), be_(be) {
    scale_.scale = scaler_type::initial_scale(config_.scaler);
    if constexpr (scaler_type::dynamic) scale_ = initial_loss_scale_state(config_.scaler);
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<B, Cuda>) {
      workspace_ = Buffer<std::byte, Cuda>(reduce_workspace_bytes<float>(be), be);
      sum_ = Buffer<float, Cuda>(1, be);
      decision_ = Buffer<detail::StepDecision, Cuda>(1, be);
      if constexpr (decides_on_device) {
        device_varying_ = Buffer<varying_type, Cuda>(1, be);
        host_varying_.resize(1);
      }
      sum_ready_ = make_cuda_event();
      void* pinned = nullptr;  // the runtime's C signature: clang as the host compiler sees no typed overload
      ALLOY_CUDA_CHECK(cudaMallocHost(&pinned, sizeof(float)));
      host_sum_ = static_cast<float*>(pinned);
    }
#endif
  }
  ~OptimizerStep() {
#if ALLOY_HAS_CUDA_RUNTIME
    if (host_sum_) (void)cudaFreeHost(host_sum_);
#endif
  }
  OptimizerStep(const OptimizerStep&) = delete;
  OptimizerStep& operator=(const OptimizerStep&) = delete;
  // Movable, as the Trainer that owns it: buffers and the pinned scalar change hands.
  OptimizerStep(OptimizerStep&& other) noexcept
      : config_(other.config_),
        be_(other.be_),
        scale_(other.scale_),
        step_(other.step_),
        skipped_(other.skipped_),
        adafactor_u_(std::move(other.adafactor_u_)),
        adafactor_scalars_(std::move(other.adafactor_scalars_)),
        grads_(other.grads_),
        host_result_(other.host_result_)
#if ALLOY_HAS_CUDA_RUNTIME
        ,
        workspace_(std::move(other.workspace_)),
        sum_(std::move(other.sum_)),
        partials_(std::move(other.partials_)),
        decision_(std::move(other.decision_)),
        device_varying_(std::move(other.device_varying_)),
        host_varying_(std::move(other.host_varying_)),
        sum_ready_(std::move(other.sum_ready_)),
        host_sum_(std::exchange(other.host_sum_, nullptr))
#endif
  {
  }
  OptimizerStep& operator=(OptimizerStep&& other) noexcept {
    if (this == &other) return *this;
    config_ = other.config_;
    be_ = other.be_;
    scale_ = other.scale_;
    step_ = other.step_;
    skipped_ = other.skipped_;
    adafactor_u_ = std::move(other.adafactor_u_);
    adafactor_scalars_ = std::move(other.adafactor_scalars_);
    grads_ = other.grads_;
    host_result_ = other.host_result_;
#if ALLOY_HAS_CUDA_RUNTIME
    workspace_ = std::move(other.workspace_);
    sum_ = std::move(other.sum_);
    partials_ = std::move(other.partials_);
    decision_ = std::move(other.decision_);
    device_varying_ = std::move(other.device_varying_);
    host_varying_ = std::move(other.host_varying_);
    sum_ready_ = std::move(other.sum_ready_);
    if (host_sum_) (void)cudaFreeHost(host_sum_);
    host_sum_ = std::exchange(other.host_sum_, nullptr);
#endif
    return *this;
  }

  // The scale the next backward pass must be seeded with.
  float loss_scale() const noexcept { return scale_.scale; }
  const LossScaleState& scale_state() const noexcept { return scale_; }
  std::uint64_t steps() const noexcept { return step_; }
  std::uint64_t skipped_steps() const noexcept { return skipped_; }
  const config_type& config() const noexcept { return config_; }
  config_type& config() noexcept { return config_; }

  // Restores counters from a checkpoint.
  void restore(const LossScaleState& scale, std::uint64_t steps, std::uint64_t skipped) {
    scale_ = scale;
    step_ = steps;
    skipped_ = skipped;
  }

  // Sum of squares of the unscaled gradients the optimizer reads (pass 1 alone), over the
  // store's range (the whole arena unless sharded).
  double grad_sum_of_squares(store_type& store) {
    return sum_of_squares(store.optimizer_grads() + store.shard_begin(), store.shard_elements());
  }

  // Call after micro-batch `micro_batch` (0-based) of `micro_batches` has written its
  // gradients, before the next one starts: makes this step engine the owner of the accumulator
  // until the next step() (see the top of this file). The first micro-batch writes acc = g, the
  // middle ones add, the last adds and sums the squares of the result for the step's norm and
  // skip decision; with one micro-batch the step reads the compute-dtype gradients directly. A
  // no-op for stores without an accumulator. Ordered on the backend's stream; nothing waits.
  // sum_squares = false leaves the last micro-batch's sum without its squares, for a caller that
  // changes the accumulator before the step (DataParallel sums it over the ranks); step() then
  // runs pass 1 on it.
  void accumulate(store_type& store, int micro_batch, int micro_batches, bool sum_squares = true) {
    if (micro_batches < 1 || micro_batch < 0 || micro_batch >= micro_batches) {
      throw error("OptimizerStep::accumulate: micro-batch " + std::to_string(micro_batch) + " of " +
                  std::to_string(micro_batches));
    }
    if constexpr (store_type::has_accumulator) {
      if (micro_batches == 1) {
        grads_ = Gradients::compute;
        return;
      }
      require_accumulator(store);
      const std::size_t n = store.layout().padded_numel();
      if (micro_batch + 1 < micro_batches || !sum_squares) {
        accumulate_range(store, micro_batch, micro_batches, 0, n);
        return;
      }
      const auto* g = store.grads_arena().data();
      auto* acc = store.accumulator_arena().data();
      const bool first = micro_batch == 0;
      const float inv_scale = 1.0f / scale_.scale;
      if constexpr (std::is_same_v<B, Host>) {
        accumulate_grads_with_stats_async(be_, g, acc, n, first, inv_scale, nullptr, &host_result_);
      } else {
#if ALLOY_HAS_CUDA_KERNELS
        if (partials_.size() < grad_stats_partials(n)) partials_ = Buffer<float, Cuda>(grad_stats_partials(n), be_);
        accumulate_grads_with_stats_async(be_, g, acc, n, first, inv_scale, partials_.data(), sum_.data());
#endif
      }
      grads_ = Gradients::summed;
    }
  }

  // accumulate() without the squares, over elements [begin, begin + count) of the arenas alone:
  // DataParallel's gradient buckets accumulate each block's range of the last micro-batch as soon
  // as the block's backward is done, and the rest of the arena after backward, so every element
  // is accumulated once, as one accumulate(store, micro_batch, micro_batches, false) would.
  void accumulate_range(store_type& store, int micro_batch, int micro_batches, std::size_t begin, std::size_t count) {
    if (micro_batches < 1 || micro_batch < 0 || micro_batch >= micro_batches) {
      throw error("OptimizerStep::accumulate_range: micro-batch " + std::to_string(micro_batch) + " of " +
                  std::to_string(micro_batches));
    }
    if (begin > store.layout().padded_numel() || count > store.layout().padded_numel() - begin) {
      throw error("OptimizerStep::accumulate_range: elements [" + std::to_string(begin) + ", " +
                  std::to_string(begin + count) + ") of an arena of " + std::to_string(store.layout().padded_numel()));
    }
    if constexpr (store_type::has_accumulator) {
      if (micro_batches == 1) {
        grads_ = Gradients::compute;
        return;
      }
      require_accumulator(store);
      if (count > 0) {
        accumulate_grads(be_, store.grads_arena().data() + begin, store.accumulator_arena().data() + begin, count,
                         micro_batch == 0);
      }
      grads_ = Gradients::accumulating;
    }
  }

  // One optimizer step over `store`. Throws alloy::error, leaving everything as it was, when a
  // dynamic scale would fall below its minimum. On Cuda the update is queued before the host
  // reads the gradient norm (see the top of this file).
  StepStats step(store_type& store, const StepOptions& options) {
    return step(store, options, detail::SingleReplica{});
  }

  // The same, for one range of a sharded store: replicas.sum(local sum of squares) and
  // replicas.min(local first non-finite tensor index, or the tensor count) give every rank's
  // combined value, the same on every rank.
  template <class Replicas>
  StepStats step(store_type& store, const StepOptions& options, const Replicas& replicas) {
    check(options);
    if constexpr (decides_on_device && std::is_same_v<Replicas, detail::SingleReplica>) {
      set_rate(store, options.lr);
      return finish_update(store, options, queue_update(store, options.max_grad_norm));
    } else {
      const Gradients source = grads_;
      if constexpr (store_type::has_accumulator) {
        if (source != Gradients::compute) require_accumulator(store);
      }
      const double sum_sq =
          replicas.sum(source == Gradients::summed ? summed_squares()
                       : source == Gradients::compute
                           ? sum_of_squares(store.grads_arena().data() + store.shard_begin(), store.shard_elements())
                           : grad_sum_of_squares(store));
      return conclude<false>(store, options, source, sum_sq, replicas);
    }
  }

  // Cuda, one replica, a fused optimizer (every optimizer but Adafactor): step() in three parts,
  // so that a trainer can capture the device's part into a CUDA graph and replay it
  // (train/trainer.hpp, Config::graph). Nothing the device part launches takes an argument that
  // changes from step to step at a fixed loss scale: the rate, the bias corrections and the
  // random stream's start are read from device memory, where the step's copy puts what
  // set_rate() wrote.
  static constexpr bool decides_on_device = !std::is_same_v<B, Host> && !is_adafactor_v<O>;

  // What queue_update() queued, for finish_update().
  class QueuedUpdate {
    friend class OptimizerStep;
    Gradients source_ = Gradients::caller_owned;
  };

  // Host only: this step's rate and step number (steps() + 1) into the pinned scalars that the
  // next queued (or replayed) update's first copy reads. Call it after the previous step's
  // finish_update(), which waited past that copy.
  void set_rate(store_type& store, float lr) requires decides_on_device {
    check({lr, 0.0f});
#if ALLOY_HAS_CUDA_RUNTIME
    const std::uint64_t t = step_ + 1;
    host_varying_[0] = {O::rule(config_.optimizer, lr, t), t * store.layout().tensors_end() + store.shard_begin()};
#else
    (void)store;
#endif
  }

  // The device's part, queued on the stream and waiting for nothing: the varying scalars' copy,
  // pass 1 where accumulate() did not sum the squares, the decision, the sum's copy back (an
  // event the host waits on: recorded by the graph when captured), and pass 2 behind the decision.
  QueuedUpdate queue_update(store_type& store, float max_grad_norm) requires decides_on_device {
    check({0.0f, max_grad_norm});
    QueuedUpdate q;
    q.source_ = grads_;
    if constexpr (store_type::has_accumulator) {
      if (q.source_ != Gradients::compute) require_accumulator(store);
    }
#if ALLOY_HAS_CUDA_KERNELS
    ALLOY_CUDA_CHECK(cudaMemcpyAsync(device_varying_.data(), host_varying_.data(), sizeof(varying_type),
                                     cudaMemcpyHostToDevice, be_.stream));
    if (q.source_ == Gradients::compute) {
      sum_of_squares_async(store.grads_arena().data() + store.shard_begin(), store.shard_elements());
    } else if (q.source_ != Gradients::summed) {
      sum_of_squares_async(store.optimizer_grads() + store.shard_begin(), store.shard_elements());
    }
    detail::decide_step_async(be_, sum_.data(), max_grad_norm, scale_.scale, decision_.data());
    ALLOY_CUDA_CHECK(cudaMemcpyAsync(host_sum_, sum_.data(), sizeof(float), cudaMemcpyDeviceToHost, be_.stream));
    record_for_waiters(sum_ready_.get(), be_.stream);
    // The rate and t given here are placeholders: the launch reads this step's from device_varying_.
    apply<detail::UpdateDecision::on_device>(store, q.source_, 0.0f, 0.0f, 0, decision_.data(), device_varying_.data());
#else
    static_assert(std::is_same_v<B, Host>, "OptimizerStep<..., Cuda>: compile this translation unit with nvcc");
    (void)store;
#endif
    grads_ = Gradients::caller_owned;
    return q;
  }

  // The host's part: waits for the sum's copy (not for pass 2) and makes the device's decision
  // again from the same float, for the counters, the scaler and the report.
  StepStats finish_update(store_type& store, const StepOptions& options, QueuedUpdate q) requires decides_on_device {
#if ALLOY_HAS_CUDA_RUNTIME
    ALLOY_CUDA_CHECK(cudaEventSynchronize(sum_ready_.get()));
    const double sum_sq = *host_sum_;
#else
    const double sum_sq = 0.0;
#endif
    return conclude<true>(store, options, q.source_, sum_sq, detail::SingleReplica{});
  }

 private:
  static void check(const StepOptions& options) {
    if (!(options.lr >= 0.0f) || !std::isfinite(options.lr)) {
      throw error("OptimizerStep::step: learning rate " + std::to_string(options.lr) + " is not a finite value >= 0");
    }
    if (!(options.max_grad_norm >= 0.0f)) {
      throw error("OptimizerStep::step: max_grad_norm " + std::to_string(options.max_grad_norm) + " is negative");
    }
  }

  // The step from its sum of squares: the decision (the device's, made again, where OnDevice: pass
  // 2 is queued already), the scaler, the counters, and on the host's path pass 2.
  template <bool OnDevice, class Replicas>
  StepStats conclude(store_type& store, const StepOptions& options, Gradients source, double sum_sq,
                     const Replicas& replicas) {
    StepStats stats;
    stats.loss_scale = scale_.scale;
    const bool non_finite = !std::isfinite(sum_sq);
    stats.grad_norm = detail::grad_norm_of(sum_sq);

    LossScaleState next = scale_;
    if constexpr (scaler_type::dynamic) {
      stats.scale_event = update_loss_scale(next, config_.scaler, non_finite);
      if (stats.scale_event == ScaleEvent::underflow) {
        // Only an overflow backs off, so where the device decided, it skipped the update: the
        // arenas, the accumulator and this engine are as they were.
        std::ostringstream msg;
        msg << "loss scale fell below min_scale=" << config_.scaler.min_scale << " (at scale " << scale_.scale
            << ", backoff " << config_.scaler.backoff_factor
            << "): gradients overflow at any scale; check the learning rate or the data";
        throw error(msg.str());
      }
    } else if (non_finite) {
      ++next.overflows;
    }

    grads_ = Gradients::caller_owned;
    if (non_finite) {
      stats.skipped = true;
      const std::size_t bad = replicas.min(first_non_finite(store, source));
      if (bad < store.layout().tensors()) stats.first_non_finite = store.registry().specs()[bad].name;
      ++skipped_;
      if constexpr (store_type::has_accumulator) {
        if (source == Gradients::caller_owned) fill_zero(store.accumulator_arena());
      }
    } else {
      stats.clip_coefficient = detail::clip_coefficient_of(options.max_grad_norm, stats.grad_norm);
      ++step_;
      if constexpr (!OnDevice) {
        apply<detail::UpdateDecision::none>(store, source, options.lr,
                                            detail::grad_mult_of(stats.clip_coefficient, scale_.scale), step_, nullptr);
      }
    }
    scale_ = next;
    stats.next_loss_scale = scale_.scale;
    stats.step = step_;
    stats.skipped_steps = skipped_;
    stats.overflows = scale_.overflows;
    return stats;
  }

  template <class G>
  double sum_of_squares(const G* g, std::size_t n) {
    const float inv_scale = 1.0f / scale_.scale;
    if constexpr (std::is_same_v<B, Host>) {
      float sum = 0.0f;
      grad_sum_of_squares_async(be_, g, n, inv_scale, nullptr, 0, &sum);
      return sum;
    } else {
#if ALLOY_HAS_CUDA_KERNELS
      sum_of_squares_async(g, n);
      return read_sum();
#else
      static_assert(std::is_same_v<B, Host>, "OptimizerStep<..., Cuda>: compile this translation unit with nvcc");
      return 0.0;
#endif
    }
  }

#if ALLOY_HAS_CUDA_KERNELS
  // Cuda: pass 1 into sum_, ordered on the stream.
  template <class G>
  void sum_of_squares_async(const G* g, std::size_t n) {
    grad_sum_of_squares_async(be_, g, n, 1.0f / scale_.scale, workspace_.data(), workspace_.size(), sum_.data());
  }
#endif

  static void require_accumulator(const store_type& store) {
    if (!store.accumulator_allocated()) {
      throw error(
          "OptimizerStep: the gradients are in the accumulator, but this store was built without one "
          "(with_accumulator = false: one micro-batch per step, accumulate(store, 0, 1))");
    }
  }

  // The index of the first parameter whose gradient (where this step read them, in the store's
  // range) is non-finite, or the tensor count: one reduction per tensor, in order, up to that
  // one. Runs on skipped steps alone.
  std::size_t first_non_finite(store_type& store, Gradients source) {
    if constexpr (store_type::has_accumulator) {
      if (source != Gradients::compute) return first_non_finite_in(store, store.accumulator_arena().data());
    }
    return first_non_finite_in(store, store.grads_arena().data());
  }

  template <class G>
  std::size_t first_non_finite_in(store_type& store, const G* g) {
    const auto& layout = store.layout();
    const std::size_t lo = store.shard_begin(), hi = lo + store.shard_elements();
    for (std::size_t k = 0; k < layout.tensors(); ++k) {
      const std::size_t begin = std::max(lo, layout[k].offset), end = std::min(hi, layout[k].offset + layout[k].numel);
      if (begin >= end) continue;
      const float m = transform_reduce(be_, end - begin, 0.0f, Max{}, detail::AbsAsFloat{}, in(g + begin));
      if (!std::isfinite(m)) return k;
    }
    return layout.tensors();
  }

  // The sum the last accumulate() left.
  double summed_squares() {
    if constexpr (std::is_same_v<B, Host>) {
      return host_result_;
    } else {
      return read_sum();
    }
  }

  double read_sum() {
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<B, Cuda>) {
      ALLOY_CUDA_CHECK(cudaMemcpyAsync(host_sum_, sum_.data(), sizeof(float), cudaMemcpyDeviceToHost, be_.stream));
      ALLOY_CUDA_CHECK(cudaStreamSynchronize(be_.stream));
      return *host_sum_;
    }
#endif
    return 0.0;
  }

  // Pass 2 as the optimizer's step t. decision: null to apply with grad_mult (D = none); otherwise
  // the device's decision, which replaces grad_mult and may skip (D = on_device, fused optimizers
  // only). D and the master copy are known here, so only the kernels of this path are compiled.
  template <detail::UpdateDecision D>
  void apply(store_type& store, Gradients source, float lr, float grad_mult, std::uint64_t t,
             const detail::StepDecision* decision, const void* varying = nullptr) {
    const Update u{lr, grad_mult, t, decision, varying};
    if constexpr (store_type::has_accumulator) {
      auto* acc = store.accumulator_arena().data();
      if (source == Gradients::compute) {
        apply_from<false, D>(store, store.grads_arena().data(), u);
      } else if (source == Gradients::caller_owned) {
        apply_from<true, D>(store, acc, u);
      } else {
        apply_from<false, D>(store, acc, u);
      }
    } else {
      apply_from<false, D>(store, store.grads_arena().data(), u);
    }
  }

  struct Update {
    float lr;
    float grad_mult;
    std::uint64_t t;
    const detail::StepDecision* decision;
    const void* varying;  // null, or this step's detail::StepVarying<O::rule_type> in device memory
  };

  // Clear: zero the accumulator `grads` as it is read (the caller-owned accumulator).
  template <bool Clear, detail::UpdateDecision D, class Grad>
  void apply_from(store_type& store, Grad* grads, const Update& u) {
    if constexpr (is_adafactor_v<O>) {
      apply_adafactor(store, grads, u.lr, u.grad_mult, u.t);
      if constexpr (Clear) fill_zero(store.accumulator_arena());
    } else {
      apply_fused<Clear, D>(store, grads, u);
    }
  }

  template <class Grad>
  void apply_adafactor(store_type& store, const Grad* grads, float lr, float grad_mult, std::uint64_t t) {
    const auto& layout = store.layout();
    std::size_t largest = 0;
    for (std::size_t k = 0; k < layout.tensors(); ++k) largest = std::max(largest, layout[k].numel);
    if (adafactor_u_.size() < largest) adafactor_u_ = Buffer<float, B>(largest, be_);
    if (adafactor_scalars_.size() < detail::adafactor_scalars * layout.tensors()) {
      adafactor_scalars_ = Buffer<float, B>(detail::adafactor_scalars * layout.tensors(), be_);
    }
    void* ws = nullptr;
    std::size_t ws_bytes = 0;
#if ALLOY_HAS_CUDA_RUNTIME
    ws = workspace_.data();
    ws_bytes = workspace_.size();
#endif
    detail::adafactor_update(be_, store.registry(), layout, store.adafactor_placements(), store.params_arena().data(),
                             store_type::has_master ? store.master_arena().data() : nullptr, grads,
                             store.state_arena(0).data(), adafactor_u_.data(), adafactor_scalars_.data(), ws, ws_bytes,
                             config_.optimizer, lr, grad_mult, t, config_.seed,
                             config_.param_rounding == Rounding::stochastic);
  }

  template <bool Clear, detail::UpdateDecision D, class Grad>
  void apply_fused(store_type& store, Grad* grads, const Update& u) {
    using Rule = typename O::rule_type;
    using Param = typename store_type::param_type;
    using S = typename store_type::state_storage;
    constexpr int slots = store_type::slots;
    // The random stream advances by the model's padded size each step (not by the tail a sharded
    // layout adds), and element i of the launch is element begin + i of the arenas and of the
    // stream: a shard draws the bits one process draws for those elements.
    const std::size_t n = store.layout().tensors_end();
    const std::size_t begin = store.shard_begin();
    detail::UpdateArenas<Param, Grad, S, slots> a;
    a.n = store.shard_elements();
    a.params = store.params_arena().data() + begin;
    a.grads = grads + begin;
    a.master = store_type::has_master ? store.master_arena().data() : nullptr;
    for (int k = 0; k < slots; ++k) {
      a.state[k] = store.state_arena(k).data();
      if constexpr (store_type::state_policy::quantized) a.absmax[k] = store.state_scale_arena(k).data();
    }
    a.blocks = store.block_scales().data() + begin / block_scales_granularity;
    const detail::UpdateScalars<Rule> s{.rule = O::rule(config_.optimizer, u.lr, u.t),
                                        .grad_mult = u.grad_mult,
                                        .seed = config_.seed,
                                        .stream = u.t * n + begin,
                                        .stochastic_params = config_.param_rounding == Rounding::stochastic,
                                        .decision = u.decision,
                                        .varying = static_cast<const detail::StepVarying<Rule>*>(u.varying)};
    if constexpr (store_type::state_policy::quantized) {
      detail::fused_update_q8<static_cast<int>(store_type::quant_block), Clear>(be_, a, s);
    } else {
      detail::fused_update_as<Clear, store_type::has_master, D>(be_, a, s);
    }
  }

  config_type config_;
  B be_;
  LossScaleState scale_{};
  std::uint64_t step_ = 0;
  std::uint64_t skipped_ = 0;
  Buffer<float, B> adafactor_u_;
  Buffer<float, B> adafactor_scalars_;
  Gradients grads_ = Gradients::caller_owned;
  float host_result_ = 0.0f;  // Host: the sum the last accumulate() left
#if ALLOY_HAS_CUDA_RUNTIME
  Buffer<std::byte, Cuda> workspace_;
  Buffer<float, Cuda> sum_;
  Buffer<float, Cuda> partials_;                 // accumulate(): one partial sum per 16,384 elements
  Buffer<detail::StepDecision, Cuda> decision_;  // the device's decision, read by pass 2
  // decides_on_device: the step's varying scalars, written by set_rate(), copied by queue_update()
  Buffer<varying_type, Cuda> device_varying_;
  pinned_vector<varying_type> host_varying_;
  CudaEvent sum_ready_;  // the sum's copy into host_sum_ is done
  float* host_sum_ = nullptr;
#endif
};

}  // namespace alloy
