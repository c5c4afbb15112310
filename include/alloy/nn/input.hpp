// Moving a micro-batch from host memory into the workspace: features converted to the compute
// dtype, class targets checked against the class count first (a bad label is bad input, not
// a NaN loss). Every check runs before anything is copied or launched.
//
// Sources are any contiguous range (std::vector, alloy::pinned_vector, std::span, ...). Under a
// trainer the copies go through its input pipeline (memory/input_uploads.hpp): on a copy stream,
// overlapped with the previous micro-batch's compute, by DMA from pinned memory. In a context
// made by hand they are copied on the compute stream.
#pragma once

#include <alloy/error.hpp>
#include <alloy/nn/activation.hpp>

#include <cstdint>
#include <optional>
#include <ranges>
#include <span>
#include <string>
#include <type_traits>

namespace alloy::nn {

namespace detail {
template <class T>
struct FromFloat {
  ALLOY_HOST_DEVICE void operator()(const float& x, T& y) const { y = round_nearest<T>(x); }
};

template <class R, class T>
concept contiguous_of = std::ranges::contiguous_range<R> && std::ranges::sized_range<R> &&
    std::is_same_v<std::remove_cv_t<std::ranges::range_value_t<R>>, T>;

// Throws, naming `who` and the first offending row, unless every value lies in [0, limit) or
// equals `ignored`: "<who>: <what> 99 at row 7 is outside [0, 5)". Returns how many values are not
// `ignored`.
inline std::size_t check_indices(std::span<const std::int32_t> values, std::size_t limit, const std::string& who,
                                 const char* what, std::optional<std::int32_t> ignored = {}) {
  std::size_t counted = 0;
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (ignored && values[i] == *ignored) continue;
    if (values[i] < 0 || static_cast<std::size_t>(values[i]) >= limit) {
      throw error(who + ": " + what + " " + std::to_string(values[i]) + " at row " + std::to_string(i) +
                  " is outside [0, " + std::to_string(limit) + ")" +
                  (ignored ? " and is not the ignore index " + std::to_string(*ignored) : std::string()));
    }
    ++counted;
  }
  return counted;
}

// The host values as device (or, on Host, addressable) memory valid for this micro-batch.
template <class Ctx, class T>
const T* upload_raw(Ctx& ctx, std::span<const T> v) {
  if (auto* uploads = ctx.uploads()) return uploads->upload(v);
  T* p = ctx.template allocate<T>(v.size());
  if constexpr (std::is_same_v<typename Ctx::backend_type, Host>) {
    std::copy(v.begin(), v.end(), p);
  } else {
#if ALLOY_HAS_CUDA_RUNTIME
    ALLOY_CUDA_CHECK(cudaMemcpyAsync(p, v.data(), v.size_bytes(), cudaMemcpyHostToDevice, ctx.backend().stream));
#endif
  }
  return p;
}
}  // namespace detail

// rows x cols floats (row-major), uploaded as they are: device memory on Cuda, valid for this
// micro-batch. For a model that reads its features more than once (features_as), where keeping
// their compute-dtype copy from forward to backward would cost more memory than converting again.
template <class Ctx, class R>
requires detail::contiguous_of<R, float> Activation<const float> upload_float_features(Ctx& ctx, const R& x,
                                                                                       std::size_t cols) {
  const std::span<const float> values(std::ranges::data(x), std::ranges::size(x));
  if (cols == 0 || values.size() % cols != 0) {
    throw error("upload_features: " + std::to_string(values.size()) + " values do not make rows of " +
                std::to_string(cols) + " features");
  }
  return {detail::upload_raw(ctx, values), values.size() / cols, cols};
}

// Uploaded floats as a compute-dtype activation (a new buffer in the workspace), rounded to
// nearest even: the same bits each time.
template <class Ctx>
Activation<detail::value_t<Ctx>> features_as(Ctx& ctx, Activation<const float> features) {
  using T = detail::value_t<Ctx>;
  auto a = detail::allocate(ctx, features.rows, features.cols);
  for_each_n(ctx.backend(), features.size(), detail::FromFloat<T>{}, in(features.data), out(a.data));
  return a;
}

// rows x cols floats (row-major) as a compute-dtype activation.
template <class Ctx, class R>
requires detail::contiguous_of<R, float> Activation<detail::value_t<Ctx>> upload_features(Ctx& ctx, const R& x,
                                                                                          std::size_t cols) {
  return features_as(ctx, upload_float_features(ctx, x, cols));
}

// Class indices, each checked to lie in [0, classes).
template <class Ctx, class R>
requires detail::contiguous_of<R, std::int32_t>
const std::int32_t* upload_targets(Ctx& ctx, const R& targets, std::size_t classes) {
  const std::span<const std::int32_t> values(std::ranges::data(targets), std::ranges::size(targets));
  detail::check_indices(values, classes, "upload_targets", "target");
  return detail::upload_raw(ctx, values);
}

}  // namespace alloy::nn
