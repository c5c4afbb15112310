// BackwardObserver: what the trainer follows of a LayeredModel's backward (DataParallel's
// gradient buckets, train/gradient_buckets.hpp): the parameter gradients the model takes from its
// context (Context::grad), and where each outermost block's backward begins and ends
// (backward_blocks in train/recompute.hpp reports them).
#pragma once

#include <cstddef>

namespace alloy {

class BackwardObserver {
 public:
  virtual void gradient_taken(std::size_t tensor) = 0;
  virtual void block_backward_begin(std::size_t block) = 0;
  virtual void block_backward_end(std::size_t block) = 0;

 protected:
  BackwardObserver() = default;
  BackwardObserver(const BackwardObserver&) = default;
  BackwardObserver& operator=(const BackwardObserver&) = default;
  ~BackwardObserver() = default;
};

namespace detail {

// ctx's observer: a Context's (null unless the trainer set one); none for another context type.
template <class Ctx>
BackwardObserver* backward_observer_of(const Ctx& ctx) {
  if constexpr (requires { ctx.backward_observer(); }) {
    return ctx.backward_observer();
  } else {
    return nullptr;
  }
}

}  // namespace detail

}  // namespace alloy
