// The Host backend's algorithms: plain loops on the calling thread, the reference for Cuda.
#pragma once

#include <alloy/backend/access.hpp>
#include <alloy/backend/tags.hpp>

#include <algorithm>
#include <cstddef>
#include <vector>

namespace alloy {

// Calls f(i) for every i in [0, n).
template <class F>
void for_each_n(Host, std::size_t n, F f) {
  for (std::size_t i = 0; i < n; ++i) f(i);
}

// Calls f(a[i], b[i], ...) for every i in [0, n); `in` arrays give const references,
// `out` and `inout` arrays references f may assign.
template <class F, element_access... W>
requires(sizeof...(W) > 0) void for_each_n(Host, std::size_t n, F f, W... w) {
  for (std::size_t i = 0; i < n; ++i) f(w.element(i)...);
}

// Calls f(i, a[i], b[i], ...) for every i in [0, n).
template <int Unroll = 1, class F, element_access... W>
void for_each_indexed_n(Host, std::size_t n, F f, W... w) {
  for (std::size_t i = 0; i < n; ++i) f(i, w.element(i)...);
}

namespace detail {
// Host reductions fold in chunks, then fold the chunk results: the same two-level shape as
// the Cuda backend's, which keeps float sums accurate (error grows with chunk count plus chunk
// length, not with n).
inline constexpr std::size_t host_reduce_chunk = 4096;
}  // namespace detail

// reduce(init, transform(a[i], b[i], ...)) over i in [0, n).
template <class Acc, class Reduce, class Transform, element_access... W>
Acc transform_reduce(Host, std::size_t n, Acc init, Reduce reduce, Transform transform, W... w) {
  Acc total = init;
  for (std::size_t begin = 0; begin < n; begin += detail::host_reduce_chunk) {
    const std::size_t end = std::min(n, begin + detail::host_reduce_chunk);
    Acc chunk = init;
    for (std::size_t i = begin; i < end; ++i) chunk = reduce(chunk, static_cast<Acc>(transform(w.element(i)...)));
    total = reduce(total, chunk);
  }
  return total;
}

// The two-phase form, with the Cuda backend's call shape: the Host needs no workspace, and the
// result is in *result (host memory) on return.
template <class Acc>
std::size_t reduce_workspace_bytes(Host) {
  return 0;
}

template <class Acc, class Reduce, class Transform, element_access... W>
void transform_reduce_async(Host be, void* /*workspace*/, std::size_t /*workspace_bytes*/, Acc* result, std::size_t n,
                            Acc init, Reduce reduce, Transform transform, W... w) {
  *result = transform_reduce(be, n, init, reduce, transform, w...);
}

}  // namespace alloy
