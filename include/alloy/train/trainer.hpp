// Trainer<Model, Policies...>: the API users see.
//
//   using Tr = alloy::Trainer<MyModel, alloy::Precision<alloy::bf16, alloy::fp32_master>,
//                             alloy::Accumulate<16>, alloy::AdamW<>>;
//   Tr trainer(MyModel{...}, {.schedule = alloy::LrSchedule::warmup_cosine(3e-4f, 100, 10000),
//                             .max_grad_norm = 1.0f});
//   alloy::StepReport r = trainer.step(next_batch);  // pulls 16 micro-batches
//
// One step: for each micro-batch, forward/backward with backward seeded by scale / N, the
// gradients summed into the accumulator when there is one (OptimizerStep::accumulate, which
// sums the squares for the norm on the last micro-batch); then the optimizer step (pass 1 where
// the accumulation did not already sum the squares, skip/clip decision, pass 2). step() returns
// with pass 2 queued, not finished.
//
// With DataParallel<Comm> (train/data_parallel.hpp) each rank is one replica: backward is seeded
// with scale / (N x world size), the gradients are summed over the ranks (a LayeredModel's in
// buckets of blocks, each as soon as the last micro-batch's backward of its blocks is done:
// train/gradient_buckets.hpp; any other model's after the last micro-batch), the reported loss
// is the mean over every rank's micro-batches, and checkpoints are written by rank 0 and loaded
// by every rank. With ZeroRedundancy<Comm> (ZeRO-1) each rank's master weights and optimizer
// state are one range of the arenas: the gradients are reduce-scattered, each rank updates its
// range, and the parameters are all-gathered.
#pragma once

#include <alloy/memory/workspace.hpp>
#include <alloy/train/checkpoint.hpp>
#include <alloy/train/context.hpp>
#include <alloy/train/data_parallel.hpp>
#include <alloy/train/gradient_buckets.hpp>
#include <alloy/train/model.hpp>
#include <alloy/train/optimizer_step.hpp>
#include <alloy/train/param_store.hpp>
#include <alloy/train/policies.hpp>
#include <alloy/train/recompute.hpp>
#include <alloy/train/schedule.hpp>
#include <alloy/train/step_graph.hpp>
#include <alloy/train/step_losses.hpp>
#include <alloy/train/weights.hpp>

#include <time.h>  // clock_gettime: POSIX, as the file code (io/atomic_file.hpp)

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <span>
#include <type_traits>
#include <utility>

namespace alloy {

namespace detail {
// The monotonic clock in nanoseconds, as std::chrono::steady_clock::now() reads it on Linux
// (clock_gettime(CLOCK_MONOTONIC)), without <chrono>'s 1,600 preprocessed lines in every
// translation unit that holds a Trainer.
inline std::int64_t steady_nanoseconds() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}
}  // namespace detail

struct StepReport {
  float loss = 0.0f;             // mean of the micro-batch losses
  double grad_norm = 0.0;        // global norm of the unscaled gradients, before clipping
  float lr = 0.0f;               // the learning rate this step used
  float loss_scale = 1.0f;       // the scale this step's gradients carried
  bool skipped = false;          // a non-finite gradient: nothing was updated
  std::string first_non_finite;  // when skipped: the first parameter (declared order) with a non-finite gradient
  std::uint64_t step = 0;        // steps attempted so far, this one included
  std::uint64_t applied_steps = 0;
  std::uint64_t skipped_steps = 0;
  std::uint64_t overflows = 0;
  double seconds = 0.0;  // wall time until step() returned (the update may still be running)
  // Config::graph: the step ran as a replay of a captured CUDA graph (false for a step that ran
  // its launches one by one, the capturing step included).
  bool replayed = false;
};

namespace detail {
// Trainer::run's callback: void, or bool (false stops the run).
template <class F>
bool call_on_step(F& f, const StepReport& r) {
  if constexpr (std::is_void_v<std::invoke_result_t<F&, const StepReport&>>) {
    f(r);
    return true;
  } else {
    return static_cast<bool>(f(r));
  }
}
}  // namespace detail

// Config::graph: how the trainer's steps ran.
struct GraphStats {
  std::uint64_t captures = 0;  // steps captured (each replayed at once, as its own step)
  std::uint64_t replays = 0;   // steps replayed from a graph captured earlier
  std::uint64_t eager = 0;     // steps that ran their launches one by one (a new key: see train/step_graph.hpp)
  // The last captured graph's small memsets made kernel nodes (graph_memsets_as_kernels, such as
  // cuBLASLt's 4-byte ones before its products).
  std::size_t memset_kernels = 0;
};

struct TrainerMemory {
  MemoryReport arenas;               // parameters, gradients, accumulator, master, state
  std::size_t activations_peak = 0;  // the largest micro-batch's workspace use
  std::size_t workspace_reserved = 0;
  std::size_t input_slots = 0;    // device memory of the input pipeline's slots (one or two)
  std::size_t input_staging = 0;  // its pinned host staging memory (pageable input only)
  MemoryStats backend;            // everything this trainer allocated: current and peak
};

template <class M, class... Policies>
class Trainer {
  using policies = resolve_policies<Policies...>;

 public:
  using model_type = M;
  using precision = typename policies::precision;
  using optimizer_type = typename policies::optimizer;
  using backend_type = typename policies::backend;
  static constexpr int accumulation_steps = policies::accumulate::steps;
  using store_type = ParamStore<precision, optimizer_type, backend_type, accumulation_steps>;
  using step_type = OptimizerStep<precision, optimizer_type, backend_type, accumulation_steps>;
  using context_type = Context<store_type>;
  using compute_type = typename precision::compute_type;
  using master_type = std::conditional_t<precision::has_master, float, void>;
  using scaler_type = typename precision::scaler_type;
  static constexpr double bytes_per_param = store_type::bytes_per_param;
  static constexpr bool recomputes = policies::recompute;
  using communicator_type = typename policies::data_parallel::communicator_type;
  static constexpr bool data_parallel = is_data_parallel_v<typename policies::data_parallel>;
  static constexpr bool shards_state = policies::data_parallel::shards_state;  // ZeroRedundancy
  // Bytes per parameter on each of `world` ranks: with ZeroRedundancy the master weights and the
  // optimizer state divide among them (padding aside); otherwise every rank holds bytes_per_param.
  static constexpr double bytes_per_param_on_each_of(int world) {
    const auto r = store_type::bytes_per_param_by_role;
    if (!shards_state || world < 1) return bytes_per_param;
    return r.params + r.grads + r.grad_accumulator + (r.master + r.optimizer_state) / world;
  }

  static_assert(has_batch_type<M>,
                "Trainer<Model>: the model must declare `using batch_type = ...;` (one micro-batch)");
  static_assert(declares_parameters<M>,
                "Trainer<Model>: the model needs `void declare(alloy::ParamRegistry&)` naming each parameter");
  // The trainer runs a LayeredModel's blocks itself (Checkpointing or not); any other model
  // runs its own forward_backward.
  static constexpr bool layered = LayeredModel<M, context_type>;
  // Checkpointing, or a model without forward_backward that shows layers(), needs every
  // LayeredModel member; each missing one gets its own message.
  static constexpr bool needs_layers = recomputes || (!runs_forward_backward<M, context_type> && has_layers<M>);
  // DataParallel (replicated state) over a LayeredModel reduces its gradients in buckets that
  // start while backward runs (train/gradient_buckets.hpp); ZeroRedundancy's reduce-scatter and
  // any other model reduce the whole arena after backward.
  static constexpr bool reduces_in_buckets = data_parallel && !shards_state && layered;
  // The model's stage(ctx, batch) (train/model.hpp): its host part, called before each micro-batch.
  static constexpr bool stages = has_stage<M, context_type>;
  // Config::graph is possible: Cuda, one replica, an optimizer whose step is decided on the device
  // (every one but Adafactor), and a model that stages its inputs.
  // A stream of the trainer's own (Config::graph on the legacy default stream), or nothing.
#if ALLOY_HAS_CUDA_RUNTIME
  using OwnStream = std::conditional_t<std::is_same_v<backend_type, Cuda>, CudaStream, std::nullptr_t>;
#else
  using OwnStream = std::nullptr_t;
#endif
  static constexpr bool can_replay_graphs =
      !std::is_same_v<backend_type, Host> && !data_parallel && step_type::decides_on_device && stages;

  static_assert(runs_forward_backward<M, context_type> || has_layers<M>,
                "Trainer<Model>: the model needs `float forward_backward(Ctx&, const batch_type&)` returning the "
                "micro-batch loss and writing gradients of loss * ctx.loss_scale() (a Model), or layers(), input() "
                "and head() (a LayeredModel; see alloy/train/model.hpp)");
  static_assert(!recomputes || has_layers<M>,
                "Checkpointing needs a LayeredModel: the model has no layers(). Give it `layers()` (a range of blocks "
                "with forward and backward), `input(ctx, batch)` and `head(ctx, y, batch)` so the trainer can run and "
                "recompute the blocks (see alloy/train/model.hpp), or remove Checkpointing");
  static_assert(!needs_layers || !has_layers<M> || layers_are_a_range<M>,
                "LayeredModel: layers() must return a random-access, sized range of blocks (std::vector<Block>&, "
                "std::span<Block>, std::array<Block, N>&)");
  static_assert(!needs_layers || !layers_are_a_range<M> || layer_blocks_run_forward<M, context_type>,
                "LayeredModel: each block in layers() needs a member `Activation<T> forward(Ctx&, "
                "Activation<const T> x)` (T = Ctx::param_type)");
  static_assert(!needs_layers || !layers_are_a_range<M> || layer_blocks_run_backward<M, context_type>,
                "LayeredModel: each block in layers() needs a member `Activation<T> backward(Ctx&, "
                "Activation<const T> dy)` returning dx and writing the block's parameter gradients");
  static_assert(!needs_layers || !has_layers<M> || has_input<M, context_type>,
                "LayeredModel: the model needs a member `Activation<T> input(Ctx&, const batch_type&)` giving the "
                "first block's input");
  static_assert(!needs_layers || !has_layers<M> || has_head<M, context_type>,
                "LayeredModel: the model needs a member `std::pair<float, Activation<T>> head(Ctx&, Activation<const "
                "T> y, const batch_type&)` returning the loss and the gradient of loss * ctx.loss_scale() w.r.t. y");

  struct Config {
    typename optimizer_type::Config optimizer{};
    typename scaler_type::Config scaler{};
    // The rate each step uses. Unset, it is optimizer.lr, constant: a rate set in one place is
    // the rate. A schedule and an optimizer.lr that disagree are refused (see the constructor).
    LrSchedule schedule = LrSchedule::constant(optimizer.lr);
    float max_grad_norm = 0.0f;  // 0: no clipping
    Rounding param_rounding = Rounding::nearest_even;
    std::uint64_t seed = 0;  // initialization and stochastic rounding
    // Micro-batches per step at run time; 0 takes Accumulate<N>'s N. With a 16-bit compute
    // dtype and Accumulate<1> there is no fp32 accumulator, so more than one is refused.
    int micro_batches = 0;
    // A checkpoint saved under another configuration (settings()): load() reports each
    // difference (report), or refuses the file and changes nothing (refuse).
    ConfigChange on_config_change = ConfigChange::report;
    // Where load() writes a line per changed setting, or a note that the file records no
    // configuration to compare; unset, to standard error.
    std::function<void(const std::string&)> load_log = nullptr;
    // Cuda: how each matrix product's cuBLASLt algorithm is chosen (kernels/gemm_args.hpp):
    // the heuristic's (the same bits run after run), or timed, the fastest of its 8 candidates
    // on the product's first call (a few percent faster; the last bits may change between runs).
    GemmTuning gemm_tuning = GemmTuning::heuristic;
    // Cuda, with gemm_tuning = timed: a file that keeps the timed choices across runs (as a
    // timing cache). Problems it holds for this device, cuBLASLt version and workspace are not
    // timed again, and run the recorded algorithms: the same bits as the run that recorded them,
    // so a resumed or repeated run reproduces it. Problems timed in this run are added to it as
    // they are timed (the file replaced atomically). Empty: none. Refused at construction
    // without timed tuning; a file that does not parse is an error naming its line.
    std::string gemm_plans_file = {};
    // DataParallel with a LayeredModel: the gradients are all-reduced in buckets of consecutive
    // blocks holding at least this many bytes (of the arena the optimizer reads), each as soon as
    // the step's last backward of its blocks is done, overlapping the blocks below (as DDP's
    // bucket_cap_mb). 0: one all-reduce of the whole arena after backward. Every rank must agree.
    std::size_t gradient_bucket_bytes = std::size_t(25) << 20;
    // Cuda: capture a whole step (every micro-batch's forward and backward, the accumulation, the
    // optimizer's passes) as a CUDA graph and replay it while the step's shapes repeat, instead of
    // launching its kernels one by one: the device no longer waits between dependent kernels for
    // the host's launches. Needs a model with stage(ctx, batch) (train/model.hpp), one replica and
    // an optimizer other than Adafactor; refused at construction otherwise. A step whose key
    // (micro-batches, loss scale, each upload's size and slot) is new runs eagerly,
    // the next with the same key is captured, and later ones replay it (StepReport::replayed,
    // graph_stats()). Each micro-batch gets its own input slot. The same bits as without.
    bool graph = false;
  };

  explicit Trainer(M model, Config config = {}, backend_type be = {}) : Trainer(std::move(model), config, nullptr, be) {
    static_assert(!data_parallel,
                  "Trainer with DataParallel<Comm>: pass this rank's communicator: Trainer(model, config, comm)");
  }

  // One replica of a data-parallel job (DataParallel<Comm>). Every rank constructs its trainer
  // together (collectives): the ranks check that they agree and take rank 0's parameters.
  // `comm` must outlive the trainer.
  Trainer(M model, Config config, communicator_type& comm, backend_type be = {})
      : Trainer(std::move(model), config, &comm, be) {
    static_assert(data_parallel, "Trainer(model, config, comm): a communicator needs the DataParallel<Comm> policy");
  }

 private:
  Trainer(M model, Config config, communicator_type* comm, backend_type given)
      : own_stream_(own_stream_for(config, given)),
        model_(std::move(model)),
        config_(config),
        be_(on_own_stream(given)),
        // The accumulator only where more than one micro-batch makes a step.
        store_(declared(model_), be_, config.seed, tracker_.get(),
               (config.micro_batches == 0 ? accumulation_steps : config.micro_batches) > 1, shard_of(comm)),
        step_({config.optimizer, config.scaler, config.param_rounding, config.seed}, be_),
        workspace_(be_, tracker_.get()),
        resources_(be_, config.gemm_tuning, config.gemm_plans_file),
        // Two input slots overlap a micro-batch's uploads with the previous one's compute; with
        // one micro-batch per step, one does the same (memory/input_uploads.hpp says why).
        uploads_(be_, tracker_.get(),
                 (config.micro_batches == 0 ? accumulation_steps : config.micro_batches) > 1 ? 2 : 1),
        losses_(be_, tracker_.get()),
        micro_batches_(config.micro_batches == 0 ? accumulation_steps : config.micro_batches),
        comm_(comm) {
    static_assert(std::is_same_v<backend_type, Host> || ALLOY_HAS_CUDA_KERNELS,
                  "Trainer: backend Cuda runs kernels: construct this Trainer in a .cu file compiled by nvcc, or "
                  "name alloy::Host among its policies to train on the CPU");
    check_learning_rate(config_);
    if (micro_batches_ < 1) {
      throw error("Trainer: micro_batches = " + std::to_string(config.micro_batches) + "; at least one per step");
    }
    if (micro_batches_ > 1 && !store_type::has_accumulator && numeric_traits<compute_type>::bytes < 4) {
      throw error("Trainer: " + std::to_string(micro_batches_) + " micro-batches with " +
                  numeric_traits<compute_type>::name + " gradients and no fp32 accumulator would sum them in " +
                  numeric_traits<compute_type>::name + "; use Accumulate<N> with N > 1");
    }
    if (config_.graph) {
      if constexpr (can_replay_graphs) {
        uploads_.use_slots(micro_batches_);  // micro-batch i in slot i: a replay reads them where they were captured
      } else {
        throw error(graph_refusal());
      }
    }
    if constexpr (data_parallel) {
      static_assert(std::is_same_v<typename communicator_type::backend_type, backend_type>,
                    "DataParallel<Comm>: the communicator runs on another backend than the trainer "
                    "(HostCommunicator with alloy::Host, NcclCommunicator with alloy::Cuda)");
      static_assert(!shards_state || !is_adafactor_v<optimizer_type>,
                    "ZeroRedundancy: Adafactor's factored statistics do not divide into ranges of the arena; use "
                    "DataParallel<Comm> (replicated state) with Adafactor");
      detail::check_replicas_agree(*comm_, be_,
                                   {{"the parameter count", store_.layout().padded_numel()},
                                    {"micro_batches", static_cast<std::uint64_t>(micro_batches_)},
                                    {"the seed", config_.seed},
                                    {"the policies (signature)", detail::fnv1a(signature())}});
      detail::replicate_parameters(*comm_, be_, store_);
    }
  }

 public:
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Movable: the arenas, the workspace and the backend objects move with their memory, and the
  // memory tracker they report to lives on the heap, so its address survives the move. A
  // moved-from trainer may only be destroyed or assigned to.
  Trainer(Trainer&&) = default;
  Trainer& operator=(Trainer&& other) {
    if (this == &other) return *this;
    // Every member, by hand (keep the list complete): memory first, while the tracker its release
    // is reported to still exists; the tracker after it.
    store_ = std::move(other.store_);
    step_ = std::move(other.step_);
    workspace_ = std::move(other.workspace_);
    resources_ = std::move(other.resources_);
    uploads_ = std::move(other.uploads_);
    losses_ = std::move(other.losses_);
    tracker_ = std::move(other.tracker_);
    model_ = std::move(other.model_);
    config_ = std::move(other.config_);
    be_ = other.be_;
    micro_batches_ = other.micro_batches_;
    comm_ = other.comm_;
    attempted_ = other.attempted_;
    kept_ = std::move(other.kept_);
    buckets_ = std::move(other.buckets_);
    graph_ = std::move(other.graph_);
    graph_stats_ = other.graph_stats_;
    in_on_step_ = other.in_on_step_;
    own_stream_ = std::move(other.own_stream_);  // last: the memory above was given back on it
    return *this;
  }

  // One optimizer step over micro_batches() micro-batches. `source` is a callable returning
  // a batch_type, or an input iterator (advanced once per micro-batch).
  template <class Source>
  StepReport step(Source&& source) {
    refuse_inside_on_step("step");
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (can_replay_graphs) {
      if (config_.graph) return step_with_graph(source);
    }
#endif
    const std::int64_t start = detail::steady_nanoseconds();
    const float lr = config_.schedule.lr_at(attempted_);
    const float scale = step_.loss_scale();
    losses_.begin(micro_batches_);
    // Every rank's micro-batches make the step's batch: the seed averages over all of them.
    const int seeded = micro_batches_ * world_size();
    bool reduced_in_buckets = false;
    for (int mb = 0; mb < micro_batches_; ++mb) {
      workspace_.reset();
      const bool in_place = !store_type::has_accumulator && mb > 0;
      BackwardObserver* observer = nullptr;
      if constexpr (reduces_in_buckets) {
        observer = buckets_.begin_micro_batch(*comm_, store_, step_, mb, micro_batches_, config_.gradient_bucket_bytes);
      }
      context_type ctx(store_, workspace_, scale / static_cast<float>(seeded), in_place, mb, micro_batches_, attempted_,
                       policies::checkpointing::every, &resources_, &uploads_, observer);
      uploads_.begin_micro_batch();
      try {
        // Nothing here waits for the device: the loss stays there (see backend/loss.hpp) and the
        // next micro-batch's uploads overlap this one's compute.
        decltype(auto) batch = next_batch(source);
        if constexpr (stages) model_.stage(ctx, batch);
        losses_.record(mb, forward_backward(ctx, batch));
      } catch (...) {
        uploads_.abandon_micro_batch();
        throw;
      }
      uploads_.end_micro_batch();
      if constexpr (reduces_in_buckets) reduced_in_buckets = buckets_.end_micro_batch();
      // With DataParallel the squares are summed after the all-reduce (pass 1 in step()).
      if (!reduced_in_buckets) step_.accumulate(store_, mb, micro_batches_, !data_parallel);
    }
    // The losses come back while the optimizer step runs; the step waits for the gradient norm
    // (for its report; on Cuda the update is queued before, behind the device's skip and clip
    // decision) and returns with the update queued: the next step's uploads overlap it, and
    // anything that reads the arenas is ordered after it on the stream.
    losses_.fetch();
    float loss = 0.0f;
    if constexpr (data_parallel) {
      // The optimizer reads the sum over the ranks; wait() bounds the wait for a missing rank.
      if constexpr (shards_state) {
        detail::reduce_scatter_gradients(*comm_, be_, store_, micro_batches_ > 1);
      } else if (!reduced_in_buckets) {
        detail::all_reduce_gradients(*comm_, be_, store_, micro_batches_ > 1);
      }
      comm_->wait(be_);
      double sum = static_cast<double>(losses_.mean());
      comm_->all_reduce_host(be_, &sum, 1, ReduceOp::sum);
      loss = static_cast<float>(sum / world_size());
    }
    StepStats s;
    if constexpr (shards_state) {
      s = step_.step(store_, {lr, config_.max_grad_norm},
                     detail::ReplicaReduction<communicator_type, backend_type>{*comm_, be_});
      if (!s.skipped) detail::all_gather_parameters(*comm_, be_, store_);
    } else {
      s = step_.step(store_, {lr, config_.max_grad_norm});
    }
    ++attempted_;
    return report(s, lr, data_parallel ? loss : losses_.mean(), start);
  }

  // Exactly micro_batches() batches.
  StepReport step(std::span<const typename M::batch_type> batches) {
    if (batches.size() != static_cast<std::size_t>(micro_batches_)) {
      throw error("Trainer::step: " + std::to_string(batches.size()) + " batches given, the trainer accumulates " +
                  std::to_string(micro_batches_));
    }
    auto it = batches.begin();
    return step(it);
  }

  // Runs `steps` optimizer steps, each pulling its batches from `source` as step(source) does,
  // and hands each step's report to on_step(const StepReport&), which returns void, or bool:
  // false stops the run. Returns the number of steps run.
  // With Config::graph, step k + 1's batches are pulled and staged (checked, their uploads queued
  // on the copy stream) before the host waits for step k's gradient norm, so that their copies
  // run under step k's compute instead of between its decision and step k + 1 (a DataLoader's
  // prefetch): the source is read one step ahead. When on_step stops the run, the step staged
  // next is dropped with its batches; when staging step k + 1 throws, step k is finished and
  // reported first, then the error propagates, with the trainer as after step k. model.stage()
  // for step k + 1 runs before step k's decision: its context has step k's loss scale (a dynamic
  // scale may change there; the launch uses the new one). Otherwise run() is a loop of step().
  // on_step must not call step() or run() (with a graph, the next step's batches are staged
  // already): that is refused with alloy::error, which run() passes on.
  template <class Source, class OnStep>
  std::uint64_t run(Source&& source, std::uint64_t steps, OnStep&& on_step) {
    refuse_inside_on_step("run");
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (can_replay_graphs) {
      if (config_.graph) return run_pipelined(source, steps, on_step);
    }
#endif
    std::uint64_t done = 0;
    while (done < steps) {
      const StepReport r = step(source);
      ++done;
      if (!report_to(on_step, r)) break;
    }
    return done;
  }

  // Writes a checkpoint atomically, with the run's configuration (settings()) and checksums
  // (see train/checkpoint.hpp). With DataParallel every rank calls it; rank 0 writes (the
  // replicas hold the same bits), and every rank throws if its write failed.
  void save(const std::filesystem::path& path) {
    if constexpr (data_parallel) {
      std::exception_ptr failure;
      if constexpr (shards_state) {
        store_type whole = gathered_store();
        if (comm_->rank() == 0) {
          try {
            save_here(path, whole);
          } catch (...) {
            failure = std::current_exception();
          }
        }
      } else if (comm_->rank() == 0) {
        try {
          save_here(path, store_);
        } catch (...) {
          failure = std::current_exception();
        }
      }
      detail::agree_or_throw(*comm_, be_, failure, "saving checkpoint '" + path.string() + "' (on rank 0)");
    } else {
      save_here(path, store_);
    }
  }

  // Restores a checkpoint written by a trainer of the same model and policies. Resuming is
  // bit-exact: N steps, save, load into a fresh trainer, M steps gives the bytes of N + M steps.
  // Throws alloy::error and changes nothing when the file is damaged or does not match.
  // A checkpoint saved under another configuration loads with this trainer's, and each
  // difference is written to Config::load_log and listed in the report; with
  // Config::on_config_change = refuse it is refused instead. The seed is the file's (state).
  // With DataParallel every rank calls it and reads the file (a path every rank sees); if it
  // fails on any rank, it throws on every rank, and those that loaded keep what they loaded.
  LoadReport load(const std::filesystem::path& path) {
    if constexpr (data_parallel) {
      std::exception_ptr failure;
      LoadReport report;
      try {
        if constexpr (shards_state) {
          store_type whole = whole_store();
          report = load_here(path, whole);
          detail::keep_shard(be_, whole, store_);
        } else {
          report = load_here(path, store_);
        }
      } catch (...) {
        failure = std::current_exception();
      }
      detail::agree_or_throw(*comm_, be_, failure, "loading checkpoint '" + path.string() + "'");
      return report;
    } else {
      return load_here(path, store_);
    }
  }

  // The run's configuration as checkpoints record it, setting by setting: optimizer.<name> and
  // scaler.<name> (each Config's for_each_field), schedule.<name>, max_grad_norm, param_rounding
  // and micro_batches (the number in use). The seed is not among them: a checkpoint restores it.
  ConfigSettings settings() const {
    ConfigSettings out;
    add_settings(out, "optimizer", config_.optimizer);
    add_settings(out, "scaler", config_.scaler);
    add_settings(out, "schedule", config_.schedule);
    out["max_grad_norm"] = setting_text(config_.max_grad_norm);
    out["param_rounding"] = setting_text(config_.param_rounding);
    out["micro_batches"] = setting_text(micro_batches_);
    return out;
  }

  // Writes the model's parameters alone, under their declared names and shapes, in `dtype`: fp32
  // from the master copy when there is one, bf16 or fp16 their rounding to nearest even. A
  // torch.nn.Module with the same parameter names loads the file with
  // load_state_dict(safetensors.torch.load_file(path), strict=True). Atomic, as save().
  // With DataParallel every rank calls it and rank 0 writes; a failure throws on every rank.
  void export_weights(const std::filesystem::path& path, WeightsDtype dtype = WeightsDtype::fp32) {
    if constexpr (data_parallel) {
      std::exception_ptr failure;
      try {
        if constexpr (shards_state) {
          store_type whole = gathered_store();
          if (comm_->rank() == 0) alloy::export_weights(path, whole, dtype);
        } else if (comm_->rank() == 0) {
          alloy::export_weights(path, store_, dtype);
        }
      } catch (...) {
        failure = std::current_exception();
      }
      detail::agree_or_throw(*comm_, be_, failure, "exporting weights to '" + path.string() + "' (on rank 0)");
    } else {
      alloy::export_weights(path, store_, dtype);
    }
  }

  // Initializes the parameters (master and compute copies) from a weights file: one tensor per
  // declared parameter, by name, with its shape, in F32, BF16 or F16 (export_weights' files, or
  // safetensors.torch.save_file(module.state_dict())). The compute copy is the master rounded to
  // nearest even. Optimizer state, the step counters and the loss scale are kept as they are
  // (as torch's load_state_dict leaves the optimizer alone): call it before training, or
  // construct a fresh trainer to restart the optimizer. Throws alloy::error naming the file and
  // each missing, extra or mis-shaped tensor, or a non-finite value, and then changes nothing.
  // With DataParallel every rank calls it and reads the file; a failure on any rank throws on
  // every rank.
  void import_weights(const std::filesystem::path& path) {
    if constexpr (data_parallel) {
      std::exception_ptr failure;
      try {
        if constexpr (shards_state) {
          store_type whole = gathered_store();
          alloy::import_weights(path, whole);
          detail::keep_shard(be_, whole, store_);
        } else {
          alloy::import_weights(path, store_);
        }
      } catch (...) {
        failure = std::current_exception();
      }
      detail::agree_or_throw(*comm_, be_, failure, "importing weights from '" + path.string() + "'");
    } else {
      alloy::import_weights(path, store_);
    }
  }

  // What a checkpoint must match: the dtypes, the scaler kind, the optimizer and its state width.
  static std::string signature() {
    std::string s = std::string("compute=") + numeric_traits<compute_type>::name +
                    ";master=" + (precision::has_master ? "fp32" : "none") + ";scaler=" + scaler_type::name +
                    ";optimizer=" + optimizer_type::name + ";state=";
    using W = typename optimizer_type::state::width;
    if constexpr (is_q8_v<W>) {
      s += "q8/" + std::to_string(W::block);
    } else {
      s += numeric_traits<W>::name;
    }
    return s;
  }

  TrainerMemory memory() const {
    TrainerMemory m;
    m.arenas = store_.memory();
    m.activations_peak = workspace_.peak_bytes();
    m.workspace_reserved = workspace_.reserved_bytes();
    m.input_slots = uploads_.reserved_bytes();
    m.input_staging = uploads_.staging_bytes();
    m.backend = tracker_->stats();
    return m;
  }

  // Starts a new window for memory().backend.peak_bytes at what the trainer holds now (after
  // warm-up, as torch.cuda.reset_peak_memory_stats. On Cuda the workspace grows in place where
  // the device manages virtual memory, so the first step peaks no higher than the next; elsewhere
  // the first step also holds the workspace's growth, merged into one block at the next micro-batch).
  void reset_memory_peak() noexcept { tracker_->reset_peak(); }

  // Waits until everything the trainer queued has finished on the device (step() returns with its
  // update queued; whatever reads the arenas through the backend is ordered after it anyway).
  void synchronize() const { alloy::synchronize(be_); }

  M& model() noexcept { return model_; }
  store_type& store() noexcept { return store_; }
  step_type& optimizer() noexcept { return step_; }
  const Config& config() const noexcept { return config_; }
  std::uint64_t steps() const noexcept { return attempted_; }
  int micro_batches() const noexcept { return micro_batches_; }
  float loss_scale() const noexcept { return step_.loss_scale(); }
  // Config::graph: steps captured, replayed and run eagerly so far.
  const GraphStats& graph_stats() const noexcept { return graph_stats_; }
  // The number of replicas (1 without DataParallel) and this one's communicator.
  int world_size() const noexcept {
    if constexpr (data_parallel) {
      return comm_->world_size();
    } else {
      return 1;
    }
  }
  communicator_type& communicator() noexcept requires data_parallel { return *comm_; }

 private:
  void save_here(const std::filesystem::path& path, store_type& store) {
    const auto& s = step_.scale_state();
    save_checkpoint(path, store, {attempted_, step_.steps(), step_.skipped_steps(), s, config_.seed}, signature(),
                    settings());
  }

  LoadReport load_here(const std::filesystem::path& path, store_type& store) {
    const DynamicLossScaleConfig* dynamic = nullptr;
    if constexpr (scaler_type::dynamic) dynamic = &config_.scaler;
    auto [c, report] = load_checkpoint(path, store, signature(), settings(), config_.on_config_change, dynamic);
    const std::string where = "alloy: load checkpoint '" + path.string() + "': ";
    auto log = [&](const std::string& line) {
      if (config_.load_log) {
        config_.load_log(line);
      } else {
        std::fprintf(stderr, "%s\n", line.c_str());  // not <iostream>: every TU including alloy would pay for it
      }
    };
    std::string fitted;
    if constexpr (!scaler_type::dynamic) {
      // A fixed scale is this trainer's configuration, not state: it keeps its own (the file's
      // scaler is the same kind, or the signature would have refused it); the count of
      // overflows is history and comes from the file.
      const LossScaleState own = step_.scale_state();
      c.scale.scale = own.scale;
      c.scale.growth_tracker = own.growth_tracker;
      c.scale.hysteresis_left = own.hysteresis_left;
    } else {
      // A state saved under a wider scaler configuration is brought within this trainer's, which
      // the next save records beside it (kept as it was, that save would not load).
      const LossScaleState s = fit_loss_scale_state(c.scale, config_.scaler);
      if (s.hysteresis_left != c.scale.hysteresis_left) {
        fitted +=
            " hysteresis_left " + std::to_string(c.scale.hysteresis_left) + " -> " + std::to_string(s.hysteresis_left);
      }
      if (s.growth_tracker != c.scale.growth_tracker) {
        fitted +=
            " growth_tracker " + std::to_string(c.scale.growth_tracker) + " -> " + std::to_string(s.growth_tracker);
      }
      if (s.scale != c.scale.scale) {
        fitted += " scale " + detail::exact_float(c.scale.scale) + " -> " + detail::exact_float(s.scale);
      }
      c.scale = s;
    }
    step_.restore(c.scale, c.applied_steps, c.skipped_steps);
    step_.config().seed = c.seed;
    config_.seed = c.seed;
    attempted_ = c.attempted_steps;
    if (!report.config_compared) {
      log(where + "written in format '" + report.format +
          "', which records no configuration: it could not be compared with this trainer's (nor its bytes checked "
          "against checksums)");
    }
    for (const ConfigDifference& d : report.config_differences) {
      log(where + "resuming under a changed configuration: " + to_string(d));
    }
    if (!fitted.empty())
      log(where + "the loss scaler's state brought within this trainer's scaler configuration:" + fitted);
    return report;
  }

  static OwnStream own_stream_for([[maybe_unused]] const Config& config, [[maybe_unused]] backend_type given) {
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<backend_type, Cuda>) {
      if (config.graph && given.stream == nullptr) {
        cudaStream_t s = nullptr;
        ALLOY_CUDA_CHECK(cudaStreamCreate(&s));  // blocking: ordered with the legacy default stream
        return CudaStream(s);
      }
    }
#endif
    return OwnStream{};
  }
  backend_type on_own_stream(backend_type given) const {
#if ALLOY_HAS_CUDA_RUNTIME
    if constexpr (std::is_same_v<backend_type, Cuda>) {
      if (own_stream_) given.stream = own_stream_.get();
    }
#endif
    return given;
  }

  StepReport report(const StepStats& s, float lr, float loss, std::int64_t start) const {
    StepReport r;
    r.loss = loss;
    r.grad_norm = s.grad_norm;
    r.lr = lr;
    r.loss_scale = s.loss_scale;
    r.skipped = s.skipped;
    r.first_non_finite = s.first_non_finite;
    r.step = attempted_;
    r.applied_steps = s.step;
    r.skipped_steps = s.skipped_steps;
    r.overflows = s.overflows;
    r.seconds = static_cast<double>(detail::steady_nanoseconds() - start) / 1e9;
    return r;
  }

  // Why Config::graph cannot be had with these policies and this model.
  static std::string graph_refusal() {
    std::string why = "Trainer: Config::graph (a step captured as a CUDA graph and replayed) needs";
    if constexpr (std::is_same_v<backend_type, Host>) return why + " the Cuda backend; this trainer runs on Host";
    if constexpr (data_parallel) return why + " one replica; this trainer is DataParallel";
    if constexpr (!step_type::decides_on_device) {
      return why + " an optimizer whose step is decided on the device; Adafactor's per-tensor scalars are the host's";
    }
    return why +
           " the model's `template <class Ctx> void stage(Ctx&, const batch_type&)`: its host part (checks and "
           "uploads), which a replay runs for each new batch without its forward (see alloy/train/model.hpp)";
  }

  // run()'s callback, with step() and run() refused while it runs.
  template <class OnStep>
  bool report_to(OnStep& on_step, const StepReport& r) {
    struct InOnStep {
      bool& flag;
      explicit InOnStep(bool& f) : flag(f) { flag = true; }
      ~InOnStep() { flag = false; }
    } inside{in_on_step_};
    return detail::call_on_step(on_step, r);
  }
  void refuse_inside_on_step(const char* what) const {
    if (in_on_step_) {
      throw error(std::string("Trainer::") + what +
                  ": called from run()'s on_step, while the next step may be staged already; return false from "
                  "on_step to end the run, then call it");
    }
  }

  context_type make_context(int mb, float seed_scale, std::uint64_t steps_before) {
    return context_type(store_, workspace_, seed_scale, !store_type::has_accumulator && mb > 0, mb, micro_batches_,
                        steps_before, policies::checkpointing::every, &resources_, &uploads_, nullptr);
  }
  context_type make_context(int mb, float seed_scale) { return make_context(mb, seed_scale, attempted_); }

  // The batches of one step, kept until its micro-batches have run: references where the source
  // hands out references (a container's iterator), the values themselves where it returns them.
  template <class Ref>
  struct HeldBatches {
    using batch_type = typename M::batch_type;
    static constexpr bool by_reference = std::is_lvalue_reference_v<Ref>;
    std::vector<std::conditional_t<by_reference, const batch_type*, std::remove_cvref_t<Ref>>> items;
    const batch_type& add(Ref&& b) {
      if constexpr (by_reference) {
        items.push_back(&b);
        return *items.back();
      } else {
        items.push_back(std::move(b));
        return items.back();
      }
    }
    const batch_type& operator[](std::size_t i) const {
      if constexpr (by_reference) {
        return *items[i];
      } else {
        return items[i];
      }
    }
  };

#if ALLOY_HAS_CUDA_RUNTIME
  // Config::graph (Cuda): the step's batches are staged first, each micro-batch into its own input
  // slot; their signature with the micro-batch count and the loss scale makes the step's key. The graph of that key is
  // replayed; without one, a key seen on the previous step is captured and launched (the previous step made the plans,
  // the workspace and the slots it needs), and a new key runs eagerly. Either way stage() ran once more per micro-batch
  // before its forward when there are several (the model keeps only the last staged batch's pointers).
  //
  // Three parts, so that run() can stage step k + 1 between step k's launch and the host's wait for
  // step k's gradient norm: stage_graph_step (the batches pulled and held, their uploads queued on
  // the copy stream), launch_graph_step (the rate, the key, the replay or the launches), and
  // finish_graph_step (the wait for the sum of squares, the report). A staged step holds its
  // batches until its copies are done: the host does not wait for the copies from pinned memory
  // before the launch (the replay waits for them on the device), and a staged step given up
  // (an error, or run() stopping) waits for them before its batches go.
  template <class Ref>
  struct StagedStep {
    enum class State { staged, launched, finished };
    HeldBatches<Ref> batches;
    std::vector<std::uint64_t> signature;  // the uploads' and noted values', as InputUploads kept them
    std::int64_t start = 0;
    float lr = 0.0f;
    bool replayed = false;
    typename step_type::QueuedUpdate queued;
    InputUploads<backend_type>* uploads = nullptr;
    State state = State::staged;

    explicit StagedStep(InputUploads<backend_type>& u) : uploads(&u) {}
    StagedStep(StagedStep&& o) noexcept
        : batches(std::move(o.batches)),
          signature(std::move(o.signature)),
          start(o.start),
          lr(o.lr),
          replayed(o.replayed),
          queued(o.queued),
          uploads(std::exchange(o.uploads, nullptr)),
          state(o.state) {}
    StagedStep(const StagedStep&) = delete;
    StagedStep& operator=(const StagedStep&) = delete;
    StagedStep& operator=(StagedStep&&) = delete;
    // Finished: the host waited for the sum of squares, which the device computes after the
    // copies it waited for. Otherwise the copies may still read the batches held here.
    ~StagedStep() {
      if (uploads && state != State::finished) uploads->wait_for_copies();
    }
  };

  template <class Source>
  StepReport step_with_graph(Source& source) {
    auto staged = stage_graph_step(source, 0);
    launch_graph_step(staged);
    return finish_graph_step(staged);
  }

  // Pulls micro_batches() batches from `source` and stages them (model.stage: their checks and
  // uploads, micro-batch i into slot i), `ahead` steps before the step that runs them (0, or 1 in
  // run(): the contexts say that step). Nothing is launched on the compute stream.
  template <class Source>
  auto stage_graph_step(Source& source, std::uint64_t ahead) {
    using Ref = decltype(next_batch(source));
    StagedStep<Ref> st(uploads_);
    st.start = detail::steady_nanoseconds();
    const float seed_scale = step_.loss_scale() / static_cast<float>(micro_batches_);
    st.batches.items.reserve(static_cast<std::size_t>(micro_batches_));
    uploads_.set_staging(true);
    struct StagingOff {
      InputUploads<backend_type>& u;
      ~StagingOff() { u.set_staging(false); }
    } staging_off{uploads_};
    for (int mb = 0; mb < micro_batches_; ++mb) {
      context_type ctx = make_context(mb, seed_scale, attempted_ + ahead);
      uploads_.begin_micro_batch_in(mb);
      // A throw leaves st, whose destructor waits for the copies queued so far.
      model_.stage(ctx, st.batches.add(next_batch(source)));
      uploads_.end_staging(false);
    }
    if constexpr (HeldBatches<Ref>::by_reference) {
      // A step that is not replayed stages each batch again before its forward: they must all
      // still be there, distinct.
      for (std::size_t i = 1; i < st.batches.items.size(); ++i) {
        for (std::size_t j = 0; j < i; ++j) {
          if (st.batches.items[i] == st.batches.items[j]) {
            throw error("Trainer: Config::graph with " + std::to_string(micro_batches_) +
                        " micro-batches: the source returned the same batch object for micro-batches " +
                        std::to_string(j) + " and " + std::to_string(i) +
                        "; a step keeps its batches until it has run (a container's iterator, or a callable "
                        "returning batches by value, or references to distinct batches). Nothing was launched");
          }
        }
      }
    }
    st.signature = uploads_.signature();
    return st;
  }

  // The staged step's rate and key (the loss scale now, after the previous step's decision), then
  // its replay, capture or eager launches, with the update queued behind the device's decision.
  template <class Ref>
  void launch_graph_step(StagedStep<Ref>& st) {
    st.lr = config_.schedule.lr_at(attempted_);
    const float scale = step_.loss_scale();
    step_.set_rate(store_, st.lr);
    const float seed_scale = scale / static_cast<float>(micro_batches_);
    uploads_.set_staging(true);  // run_staged stages again with several micro-batches
    struct StagingOff {
      InputUploads<backend_type>& u;
      ~StagingOff() {
        u.close(false);
        u.set_staging(false);
      }
    } staging_off{uploads_};

    std::uint32_t scale_bits = 0;
    std::memcpy(&scale_bits, &scale, sizeof scale_bits);  // not std::bit_cast: <bit> is 4.6K lines in every TU
    std::vector<std::uint64_t> key = {static_cast<std::uint64_t>(micro_batches_), scale_bits};
    key.insert(key.end(), st.signature.begin(), st.signature.end());

    // The workspace holds still while a graph is kept (only a step that is not replayed runs
    // forward, and such a step drops the graph): its address is checked, not part of the key.
    if (graph_.exec && key == graph_.key && workspace_.base_address() == graph_.workspace) {
      uploads_.compute_waits_for_staged();
      losses_.replayed(micro_batches_);
      ALLOY_CUDA_CHECK(cudaGraphLaunch(graph_.exec.get(), be_.stream));
      st.queued = graph_.queued;
      st.replayed = true;
      ++graph_stats_.replays;
    } else {
      graph_.exec.reset();
      const bool capture = key == graph_.last_key;
      graph_.last_key = key;
      if (capture) {
        const MemoryStats before = tracker_->stats();
        CudaGraph graph;
        try {
          StreamCapture capturing(be_.stream);
          st.queued = run_staged(st.batches, seed_scale, true);
          graph = capturing.end();
        } catch (const std::exception& e) {
          throw error(std::string("Trainer: Config::graph: the capture of the step as a CUDA graph failed: ") +
                      e.what() + ". Nothing of this step ran");
        }
        const MemoryStats after = tracker_->stats();
        if (after.allocations != before.allocations || after.current_bytes != before.current_bytes) {
          throw error("Trainer: Config::graph: memory was allocated while the step was captured as a CUDA graph (" +
                      std::to_string(after.current_bytes) + " bytes held, " + std::to_string(before.current_bytes) +
                      " before); the step's launches must allocate the same as the step before. Nothing of this "
                      "step ran");
        }
        if (!losses_.all_on_device()) {
          throw error(
              "Trainer: Config::graph: the model's loss is a host float, which a replayed step would repeat; return "
              "the device alloy::Loss (nn::SoftmaxCrossEntropy, nn::LmHead do). Nothing of this step ran");
        }
#if ALLOY_HAS_CUDA_KERNELS  // a Cuda trainer is built by nvcc (see the constructor)
        graph_stats_.memset_kernels = graph_memsets_as_kernels(graph.get());
#endif
        graph_.exec = instantiate(graph);
        graph_.key = std::move(key);
        graph_.workspace = workspace_.base_address();
        graph_.queued = st.queued;
        ALLOY_CUDA_CHECK(cudaGraphLaunch(graph_.exec.get(), be_.stream));
        ++graph_stats_.captures;
      } else {
        st.queued = run_staged(st.batches, seed_scale, false);
        ++graph_stats_.eager;
      }
    }
    st.state = StagedStep<Ref>::State::launched;
  }

  // Waits for the launched step's sum of squares (the host's decision, the scaler, the counters).
  template <class Ref>
  StepReport finish_graph_step(StagedStep<Ref>& st) {
    const StepStats s = step_.finish_update(store_, {st.lr, config_.max_grad_norm}, st.queued);
    st.state = StagedStep<Ref>::State::finished;
    ++attempted_;
    StepReport r = report(s, st.lr, losses_.mean(), st.start);
    r.replayed = st.replayed;
    return r;
  }

  // run() with Config::graph: step k + 1 is staged before the host waits for step k.
  template <class Source, class OnStep>
  std::uint64_t run_pipelined(Source& source, std::uint64_t steps, OnStep& on_step) {
    if (steps == 0) return 0;
    using Staged = decltype(stage_graph_step(source, 0));
    std::optional<Staged> current(stage_graph_step(source, 0));
    std::uint64_t done = 0;
    while (true) {
      launch_graph_step(*current);
      std::optional<Staged> next;
      std::exception_ptr staging_failed;
      if (done + 1 < steps) {
        try {
          next.emplace(stage_graph_step(source, 1));
        } catch (...) {
          staging_failed = std::current_exception();  // after step k has finished and been reported
        }
      }
      const StepReport r = finish_graph_step(*current);
      current.reset();
      ++done;
      const bool go_on = report_to(on_step, r);
      if (staging_failed) std::rethrow_exception(staging_failed);
      if (!go_on || done == steps) return done;  // a step staged and not run gives its batches back
      current.emplace(std::move(*next));
    }
  }

  // The micro-batches of a staged step, launched (or captured: then nothing waits on the host for
  // the device, and the copies are waited for by the host, before the capture reads the slots).
  template <class Held>
  typename step_type::QueuedUpdate run_staged(const Held& batches, float seed_scale, bool capturing) {
    losses_.begin(micro_batches_);
    for (int mb = 0; mb < micro_batches_; ++mb) {
      workspace_.reset();
      context_type ctx = make_context(mb, seed_scale);
      const auto& batch = batches[static_cast<std::size_t>(mb)];
      if (micro_batches_ > 1) {  // one micro-batch: the model holds its staged inputs already
        uploads_.begin_micro_batch_in(mb);
        model_.stage(ctx, batch);
        uploads_.end_staging();
      }
      if (capturing) {
        uploads_.host_waits_for_staged();
      } else {
        uploads_.compute_waits_for_staged();
      }
      uploads_.close(true);
      losses_.record(mb, forward_backward(ctx, batch));
      uploads_.close(false);
      uploads_.end_micro_batch();
      step_.accumulate(store_, mb, micro_batches_, true);
    }
    losses_.fetch();
    return step_.queue_update(store_, config_.max_grad_norm);
  }
#endif

  // ZeroRedundancy: this rank's share of the arenas; every other trainer: the whole.
  static ArenaShard shard_of(communicator_type* comm) {
    if constexpr (shards_state) {
      return {comm->world_size(), comm->rank(), true};
    } else {
      (void)comm;
      return {};
    }
  }

  // ZeroRedundancy: a store of the same layout that holds every range, fresh (whole_store) or
  // with every rank's master weights and state (gathered_store; every rank calls it). Transient:
  // a checkpoint or weights file costs one unsharded copy of the arenas while it is written or read.
  store_type whole_store() {
    return store_type(store_.registry(), be_, config_.seed, nullptr, false, ArenaShard{comm_->world_size(), 0, false});
  }
  store_type gathered_store() {
    store_type whole = whole_store();
    detail::gather_store(*comm_, be_, store_, whole);
    return whole;
  }

  // optimizer.lr changed from its default and a schedule whose peak differs: two rates, and
  // whichever the trainer picked would surprise someone.
  static void check_learning_rate(const Config& c) {
    const float default_lr = typename optimizer_type::Config{}.lr;
    if (c.optimizer.lr != default_lr && c.schedule.peak_lr != c.optimizer.lr) {
      throw error("Trainer: two learning rates: optimizer.lr = " + std::to_string(c.optimizer.lr) +
                  " and a schedule with peak " + std::to_string(c.schedule.peak_lr) +
                  "; the schedule sets each step's rate: set the rate in the schedule (and leave optimizer.lr), or "
                  "leave the schedule out to train at optimizer.lr");
    }
  }

  static ParamRegistry declared(M& model) {
    ParamRegistry r;
    model.declare(r);
    if (r.size() == 0) throw error("Trainer: the model declared no parameters");
    return r;
  }

  // One micro-batch: the model's own forward_backward, or for a LayeredModel input, the blocks
  // (with recomputation every policies::checkpointing::every blocks), head, the blocks backward.
  Loss forward_backward(context_type& ctx, const typename M::batch_type& batch) {
    if constexpr (layered) {
      return run_layered(ctx, model_, batch, policies::checkpointing::every, kept_);
    } else {
      return Loss(model_.forward_backward(ctx, batch));
    }
  }

  template <class Source>
  static decltype(auto) next_batch(Source& source) {
    if constexpr (std::is_invocable_v<Source&>) {
      return source();
    } else {
      static_assert(std::input_iterator<std::remove_cvref_t<Source>>,
                    "Trainer::step(source): source must be a callable returning a batch or an input iterator");
      return *source++;
    }
  }

  // Config::graph on the legacy default stream, which cannot be captured: a stream of the
  // trainer's own, which (as the default stream's other users expect) synchronizes with it.
  OwnStream own_stream_;
  M model_;
  Config config_;
  backend_type be_;
  std::unique_ptr<MemoryTracker> tracker_ = std::make_unique<MemoryTracker>();  // on the heap: see the move
  store_type store_;
  step_type step_;
  Workspace<backend_type> workspace_;
  BackendResources<backend_type> resources_;
  InputUploads<backend_type> uploads_;
  StepLosses<backend_type> losses_;
  int micro_batches_;
  communicator_type* comm_ = nullptr;  // DataParallel: this rank's communicator
  std::uint64_t attempted_ = 0;
  KeptInputs kept_;  // a LayeredModel's segment inputs, between forward and backward
  struct NoBuckets {};
  [[no_unique_address]] std::conditional_t<reduces_in_buckets,
                                           detail::GradientBuckets<communicator_type, store_type, step_type>, NoBuckets>
      buckets_;
#if ALLOY_HAS_CUDA_RUNTIME
  struct GraphState {
    CudaGraphExec exec;                   // the captured step, while its key repeats
    std::vector<std::uint64_t> key;       // its key
    std::vector<std::uint64_t> last_key;  // the previous step's key
    std::uintptr_t workspace = 0;         // the workspace's base when captured
    typename step_type::QueuedUpdate queued;
  };
  struct NoGraph {};
  [[no_unique_address]] std::conditional_t<can_replay_graphs, GraphState, NoGraph> graph_;
#else
  struct NoGraph {};
  [[no_unique_address]] NoGraph graph_;
#endif
  GraphStats graph_stats_;
  bool in_on_step_ = false;  // run()'s callback is running
};

}  // namespace alloy
