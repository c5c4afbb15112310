// The policies a Trainer takes after the model, in any order, each kind at most once:
//   Precision<...>, Accumulate<N>, Checkpointing (every block) or CheckpointEvery<k>,
//   an optimizer (AdamW<...>, SGD<...>, Lion<...>, Adafactor<...>), a backend (Cuda, Host),
//   DataParallel<Comm> or ZeroRedundancy<Comm> (dist/data_parallel.hpp).
// resolve_policies<Policies...> finds each kind, fills in defaults, and stops compilation with
// a message naming the problem and the fix.
#pragma once

#include <alloy/backend/tags.hpp>
#include <alloy/dist/data_parallel.hpp>
#include <alloy/optim/adafactor.hpp>
#include <alloy/optim/optimizers.hpp>
#include <alloy/precision/precision.hpp>

#include <type_traits>

namespace alloy {

template <int N>
struct Accumulate {
  static_assert(N >= 1, "Accumulate<0>: at least one micro-batch per optimizer step; use Accumulate<1> or more");
  static constexpr int steps = N;
};

// Activation recomputation: keep the input of every k-th block during forward and re-run the
// blocks in between inside backward. (C++ cannot give one name both a plain type and a
// template, so the spacing has its own name: Checkpointing is CheckpointEvery<1>.)
template <int K>
struct CheckpointEvery {
  static_assert(K >= 1, "CheckpointEvery<k>: k must be at least 1 (k = 1 recomputes every block)");
  static constexpr int every = K;
};
using Checkpointing = CheckpointEvery<1>;

template <class T>
inline constexpr bool is_accumulate_v = false;
template <int N>
inline constexpr bool is_accumulate_v<Accumulate<N>> = true;

template <class T>
inline constexpr bool is_checkpointing_v = false;
template <int K>
inline constexpr bool is_checkpointing_v<CheckpointEvery<K>> = true;

namespace detail {

template <class T>
inline constexpr int policy_kinds = int(is_precision_v<T>) + int(is_accumulate_v<T>) + int(is_checkpointing_v<T>) +
                                    int(is_optimizer_v<T>) + int(is_backend_v<T>) + int(is_data_parallel_v<T>);

template <template <class> class Trait, class Default, class... Ps>
struct find_policy {
  using type = Default;
};
template <template <class> class Trait, class Default, class P, class... Ps>
struct find_policy<Trait, Default, P, Ps...> {
  using type = std::conditional_t<Trait<P>::value, P, typename find_policy<Trait, Default, Ps...>::type>;
};

template <class T>
struct precision_trait : std::bool_constant<is_precision_v<T>> {};
template <class T>
struct accumulate_trait : std::bool_constant<is_accumulate_v<T>> {};
template <class T>
struct checkpointing_trait : std::bool_constant<is_checkpointing_v<T>> {};
template <class T>
struct optimizer_trait : std::bool_constant<is_optimizer_v<T>> {};
template <class T>
struct backend_trait : std::bool_constant<is_backend_v<T>> {};
template <class T>
struct data_parallel_trait : std::bool_constant<is_data_parallel_v<T>> {};

template <template <class> class Trait, class... Ps>
inline constexpr int count_of = (0 + ... + int(Trait<Ps>::value));

struct no_checkpointing {
  static constexpr int every = 0;
};

// A trainer without DataParallel: one replica, no communicator.
struct NoCommunicator {};
struct no_data_parallel {
  using communicator_type = NoCommunicator;
  static constexpr bool shards_state = false;
};

// Cuda wherever the build has the CUDA runtime, whatever compiler reads this: a Trainer type
// must mean the same in every translation unit of a program (g++ and nvcc ones alike). A g++
// translation unit may name a Cuda Trainer but not construct one (the constructor says so).
#if ALLOY_HAS_CUDA_RUNTIME
using default_backend = Cuda;
#else
using default_backend = Host;
#endif

}  // namespace detail

template <class... Ps>
struct resolve_policies {
  static_assert((... && (detail::policy_kinds<Ps> == 1)),
                "Trainer: unknown policy type. After the model, a Trainer takes Precision<...>, Accumulate<N>, "
                "Checkpointing or CheckpointEvery<k>, an optimizer (AdamW<...>, SGD<...>, Lion<...>, "
                "Adafactor<...>), a backend (Cuda or Host) and DataParallel<Comm>");
  static_assert(detail::count_of<detail::precision_trait, Ps...> <= 1,
                "Trainer: two Precision policies; give one Precision<Compute, ...> (one compute dtype per trainer)");
  static_assert(detail::count_of<detail::accumulate_trait, Ps...> <= 1, "Trainer: two Accumulate policies; give one");
  static_assert(detail::count_of<detail::checkpointing_trait, Ps...> <= 1,
                "Trainer: two Checkpointing policies; give one");
  static_assert(detail::count_of<detail::optimizer_trait, Ps...> <= 1, "Trainer: two optimizers; give one");
  static_assert(detail::count_of<detail::backend_trait, Ps...> <= 1, "Trainer: two backends; give Cuda or Host");
  static_assert(detail::count_of<detail::data_parallel_trait, Ps...> <= 1,
                "Trainer: two DataParallel policies; give one DataParallel<Comm>");

  using precision = typename detail::find_policy<detail::precision_trait, Precision<fp32>, Ps...>::type;
  using accumulate = typename detail::find_policy<detail::accumulate_trait, Accumulate<1>, Ps...>::type;
  using checkpointing =
      typename detail::find_policy<detail::checkpointing_trait, detail::no_checkpointing, Ps...>::type;
  using optimizer = typename detail::find_policy<detail::optimizer_trait, AdamW<State<float>>, Ps...>::type;
  using backend = typename detail::find_policy<detail::backend_trait, detail::default_backend, Ps...>::type;
  using data_parallel =
      typename detail::find_policy<detail::data_parallel_trait, detail::no_data_parallel, Ps...>::type;
  static constexpr bool recompute = is_checkpointing_v<checkpointing>;
};

}  // namespace alloy
