// ParamStore<Precision, Optimizer, Backend, MicroBatches>: the trainer-owned parameter memory.
// One contiguous arena per role, laid out by ArenaLayout: compute-dtype parameters, compute-
// dtype gradients (what the model writes), an optional gradient accumulator (fp32 when several
// micro-batches are summed in a 16-bit compute dtype), the fp32 master copy (with
// fp32_master), and the optimizer state in its declared width. Models see TensorViews.
// With an ArenaShard that shards (ZeroRedundancy), the master copy and the optimizer state hold
// one rank's contiguous range of the arenas alone; parameters and gradients stay whole.
#pragma once

#include <alloy/backend/backend.hpp>
#include <alloy/kernels/init.hpp>
#include <alloy/memory/adafactor_layout.hpp>
#include <alloy/memory/layout.hpp>
#include <alloy/memory/registry.hpp>
#include <alloy/memory/tensor_view.hpp>
#include <alloy/optim/adafactor.hpp>
#include <alloy/optim/optimizers.hpp>
#include <alloy/precision/precision.hpp>

#include <array>
#include <string>
#include <type_traits>

namespace alloy {

// Bytes held per role.
struct MemoryReport {
  std::size_t params = 0;
  std::size_t grads = 0;
  std::size_t grad_accumulator = 0;
  std::size_t master = 0;
  std::size_t optimizer_state = 0;  // q8 scales included
  std::size_t metadata = 0;         // per-block learning-rate and decay multipliers
  std::size_t total() const { return params + grads + grad_accumulator + master + optimizer_state + metadata; }
};

// How a store's arenas divide among `ranks` data-parallel replicas: padded to a multiple of
// ranks x the layout block, so they split into equal block-aligned ranges; with `sharded`, the
// master copy and the optimizer state hold range `rank` alone.
struct ArenaShard {
  int ranks = 1;
  int rank = 0;
  bool sharded = false;
};

template <class P, class O, backend B, int MicroBatches = 1>
class ParamStore {
  static_assert(is_precision_v<P>, "ParamStore<P, ...>: P must be a Precision<...>");
  static_assert(is_optimizer_v<O>,
                "ParamStore<P, O, ...>: O must be AdamW<...>, SGD<...>, Lion<...> or Adafactor<...>");
  static_assert(MicroBatches >= 1, "ParamStore: at least one micro-batch");

 public:
  using precision = P;
  using optimizer = O;
  using backend_type = B;
  using param_type = typename P::param_type;
  using grad_type = param_type;
  using accumulator_type = grad_accumulator_t<P, MicroBatches>;  // void: none
  static constexpr bool has_accumulator = !std::is_void_v<accumulator_type>;
  using optimizer_grad_type = std::conditional_t<has_accumulator, accumulator_type, grad_type>;
  using state_policy = typename O::state;
  using state_storage = typename state_policy::storage_type;
  static constexpr int slots = O::slots;
  static constexpr bool has_master = P::has_master;
  static constexpr std::size_t quant_block = static_cast<std::size_t>(state_policy::quant_block);
  static constexpr std::size_t layout_block = quant_block > 256 ? quant_block : 256;

  // Bytes per parameter of each role and in all (layout padding aside). Adafactor's statistics
  // grow with rows + columns, not with elements, and are left out.
  struct RoleBytes {
    double params, grads, grad_accumulator, master, optimizer_state;
    constexpr double total() const { return params + grads + grad_accumulator + master + optimizer_state; }
  };
  static constexpr RoleBytes bytes_per_param_by_role{double(sizeof(param_type)), double(sizeof(grad_type)),
                                                     has_accumulator ? double(sizeof(optimizer_grad_type)) : 0.0,
                                                     has_master ? 4.0 : 0.0,
                                                     is_adafactor_v<O> ? 0.0 : slots* state_policy::bytes_per_value};
  static constexpr double bytes_per_param = bytes_per_param_by_role.total();

  // with_accumulator = false leaves the accumulator unallocated: a Trainer that runs one
  // micro-batch per step never uses it (its step reads the compute-dtype gradients directly).
  explicit ParamStore(const ParamRegistry& registry, B be = {}, std::uint64_t seed = 0,
                      MemoryTracker* tracker = nullptr, bool with_accumulator = true, ArenaShard shard = {})
      : registry_(registry),
        layout_(registry, layout_block, shard.ranks > 1 ? static_cast<std::size_t>(shard.ranks) * layout_block : 0),
        be_(be),
        params_(layout_.padded_numel(), be, tracker),
        grads_(layout_.padded_numel(), be, tracker),
        block_scales_(layout_.block_scales().size(), be, tracker) {
    const std::size_t n = layout_.padded_numel();
    if (shard.ranks < 1 || shard.rank < 0 || shard.rank >= shard.ranks) {
      throw error("ParamStore: shard " + std::to_string(shard.rank) + " of " + std::to_string(shard.ranks));
    }
    if (shard.sharded) {
      if (is_adafactor_v<O>) throw error("ParamStore: Adafactor's factored state cannot be sharded by range");
      shard_count_ = n / static_cast<std::size_t>(shard.ranks);
      shard_begin_ = static_cast<std::size_t>(shard.rank) * shard_count_;
    } else {
      shard_count_ = n;
    }
    if constexpr (has_accumulator) {
      if (with_accumulator) accumulator_ = Buffer<optimizer_grad_type, B>(n, be, tracker);
    }
    if constexpr (has_master) master_ = Buffer<float, B>(shard_count_, be, tracker);
    for (int k = 0; k < slots; ++k) {
      state_[k] = Buffer<state_storage, B>(state_elements(), be, tracker);
      if constexpr (state_policy::quantized) absmax_[k] = Buffer<float, B>(shard_count_ / quant_block, be, tracker);
    }
    copy_from_host(block_scales_, std::span<const BlockScales>(layout_.block_scales()));
    zero_grads();
    reset_state();
    initialize(seed);
  }

  ParamStore(const ParamStore&) = delete;
  ParamStore& operator=(const ParamStore&) = delete;
  // Moving keeps every arena's memory (views taken before stay valid); the moved-from store is empty.
  ParamStore(ParamStore&&) = default;
  ParamStore& operator=(ParamStore&&) = default;

  const ParamRegistry& registry() const noexcept { return registry_; }
  const ArenaLayout& layout() const noexcept { return layout_; }
  B backend() const noexcept { return be_; }

  TensorView<param_type> param(ParamHandle h) { return view(params_.data(), h); }
  TensorView<param_type> param(const std::string& name) { return param(registry_.handle(name)); }
  TensorView<grad_type> grad(ParamHandle h) { return view(grads_.data(), h); }
  TensorView<grad_type> grad(const std::string& name) { return grad(registry_.handle(name)); }
  TensorView<float> master(ParamHandle h) requires has_master {
    if (sharded()) throw error("ParamStore::master: this store holds one shard of the master weights");
    return view(master_.data(), h);
  }
  TensorView<float> master(const std::string& name) requires has_master { return master(registry_.handle(name)); }

  // Whole arenas, for the optimizer step, checkpoints and tests.
  Buffer<param_type, B>& params_arena() noexcept { return params_; }
  Buffer<grad_type, B>& grads_arena() noexcept { return grads_; }
  Buffer<float, B>& master_arena() noexcept { return master_; }
  Buffer<optimizer_grad_type, B>& accumulator_arena() noexcept requires has_accumulator { return accumulator_; }
  // False for a store built without its accumulator (or a type that has none).
  bool accumulator_allocated() const noexcept { return has_accumulator && accumulator_.size() > 0; }
  Buffer<state_storage, B>& state_arena(int slot) { return state_.at(slot); }
  Buffer<float, B>& state_scale_arena(int slot) { return absmax_.at(slot); }
  const Buffer<BlockScales, B>& block_scales() const noexcept { return block_scales_; }

  // Elements of each state arena: one per parameter element (of the shard), or Adafactor's
  // compact statistics.
  std::size_t state_elements() const {
    if constexpr (is_adafactor_v<O>) {
      return adafactor_total_;
    } else {
      return shard_count_;
    }
  }

  // The range of the arenas the master copy and the optimizer state hold: [shard_begin(),
  // shard_begin() + shard_elements()), the whole arena unless sharded. Element i of the master
  // and state arenas is element shard_begin() + i of the others.
  std::size_t shard_begin() const noexcept { return shard_begin_; }
  std::size_t shard_elements() const noexcept { return shard_count_; }
  bool sharded() const noexcept { return shard_count_ != layout_.padded_numel(); }
  const std::vector<AdafactorPlacement>& adafactor_placements() const noexcept { return adafactor_; }

  // The gradients the optimizer reads: the accumulator when there is one.
  optimizer_grad_type* optimizer_grads() noexcept {
    if constexpr (has_accumulator)
      return accumulator_.data();
    else
      return grads_.data();
  }

  void zero_grads() {
    fill_zero(grads_);
    if constexpr (has_accumulator) fill_zero(accumulator_);
  }
  void reset_state() {
    for (int k = 0; k < slots; ++k) {
      fill_zero(state_[k]);
      if constexpr (state_policy::quantized) fill_zero(absmax_[k]);
    }
  }

  MemoryReport memory() const {
    MemoryReport r;
    r.params = params_.bytes();
    r.grads = grads_.bytes();
    r.grad_accumulator = accumulator_.bytes();
    r.master = master_.bytes();
    for (int k = 0; k < slots; ++k) r.optimizer_state += state_[k].bytes() + absmax_[k].bytes();
    r.metadata = block_scales_.bytes();
    return r;
  }

 private:
  template <class T>
  TensorView<T> view(T* base, ParamHandle h) const {
    const auto& spec = registry_[h];
    TensorView<T> v;
    v.data = base + layout_[h.index].offset;
    v.rank = static_cast<int>(spec.shape.size());
    std::int64_t stride = 1;
    for (int d = max_rank - 1; d >= 0; --d) {
      v.shape[d] = d < v.rank ? spec.shape[d] : 1;
      v.strides[d] = d < v.rank ? stride : 1;
      if (d < v.rank) stride *= spec.shape[d];
    }
    return v;
  }

  // A sharded master copy is initialized whole (every rank draws the same values) and its range kept.
  void initialize(std::uint64_t seed) {
    Buffer<float, B> whole;
    float* master = master_.data();
    if (has_master && sharded()) {
      whole = Buffer<float, B>(layout_.padded_numel(), be_);
      master = whole.data();
    }
    fill_zero(params_);
    if constexpr (has_master) {
      if (master == master_.data()) fill_zero(master_);
      if (master != master_.data()) fill_zero(whole);
    }
    for (std::size_t t = 0; t < registry_.size(); ++t) {
      const auto& place = layout_[t];
      detail::InitTensor<param_type> f{registry_.specs()[t].init, detail::init_key(seed, t),
                                       has_master ? master + place.offset : nullptr, params_.data() + place.offset};
      for_each_n(be_, place.numel, f);
    }
    if (has_master && sharded()) copy(be_, master_.data(), whole.data() + shard_begin_, shard_count_);
    synchronize(be_);
  }

  ParamRegistry registry_;
  ArenaLayout layout_;
  std::size_t shard_begin_ = 0;
  std::size_t shard_count_ = 0;
  std::size_t adafactor_total_ = 0;
  std::vector<AdafactorPlacement> adafactor_ = adafactor_layout(registry_, &adafactor_total_);
  B be_;
  Buffer<param_type, B> params_;
  Buffer<grad_type, B> grads_;
  Buffer<std::conditional_t<has_accumulator, optimizer_grad_type, float>, B> accumulator_;
  Buffer<float, B> master_;
  std::array<Buffer<state_storage, B>, slots> state_;
  std::array<Buffer<float, B>, slots> absmax_;
  Buffer<BlockScales, B> block_scales_;
};

}  // namespace alloy
