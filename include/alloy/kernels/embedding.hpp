// Embedding lookups (GPT-2's token and learned position embeddings) and their deterministic
// backward pass. T is the compute dtype (float, bf16 or fp16); every sum is fp32, rounded once.
//   forward   x[r, :] = wte[tokens[r], :] + wpe[r % seq, :]        (wpe optional)
//   backward  dwte[v, :] += sum over rows r with tokens[r] == v of dx[r, :]
//             dwpe[t, :] (+)= sum over b of dx[b seq + t, :]
//
// The token gradient is a scatter with collisions (a frequent token fills hundreds of rows of a
// GPT-2 micro-batch), so it is done as a gather, without atomics: the host, which holds the
// token ids anyway, groups the rows by token (TokenGroups: a stable counting sort, O(rows +
// vocab) per micro-batch, 3 to 4 int32 per row uploaded) and cuts each token's rows into
// segments of at most 32. Each segment is summed by one warp (per 32 L columns), in row order;
// a token of one segment adds its sum to its gradient row at once, a token of several writes
// each segment's sum to fp32 scratch, and a second pass adds those in segment order. The order of
// every addition is fixed by the token ids alone, so Host and Cuda give the same bits, run after
// run. Cost on Cuda: dx is read once, each touched gradient row read and written once, plus
// 8 bytes per column per extra segment of the frequent tokens; the host's grouping costs about
// what zeroing a vocab-sized array of int32 does.
//
// Token ids are not checked on the device: TokenGroups::build and the nn layer check them on the
// host before anything is uploaded or launched.
#pragma once

#include <alloy/backend/algorithms.hpp>
#include <alloy/backend/cuda/launch.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>
#include <alloy/kernels/detail/rows.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/rounding.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace alloy {

// Rows one warp sums before a token's sum is split into segments (the backward's unit of work).
inline constexpr std::size_t embedding_segment_rows = 32;

// A micro-batch's rows grouped by token, as the backward kernels read them: three int32 arrays,
// on the host or the device.
//
// The arrays have room for any grouping of `rows` rows (segments, merges and scratch slots at
// most as many as the rows allow), and the counts in use follow them (`in_use`): the sizes of the
// upload, of the scratch and of every launch depend on the row count alone, so a step captured as
// a CUDA graph stays valid for any tokens of the same count.
struct TokenGroupsView {
  const std::int32_t* rows_by_token = nullptr;  // every row, by token, rows ascending within a token
  const std::int32_t* segments = nullptr;       // 4 per segment: token, begin, end (in rows_by_token), slot or -1
  const std::int32_t* merges = nullptr;         // 3 per token of several segments: token, first slot, slots
  const std::int32_t* in_use = nullptr;         // segments and merges in use: 2 int32, where the kernels read them
  std::size_t rows = 0;
  std::size_t segment_count = 0;  // room for this many segments
  std::size_t merge_count = 0;    // room for this many merges
  std::size_t partial_slots = 0;  // room for this many segment sums kept in scratch (one per segment of a merged token)

  ALLOY_HOST_DEVICE std::size_t segments_in_use() const { return std::size_t(in_use[0]); }
  ALLOY_HOST_DEVICE std::size_t merges_in_use() const { return std::size_t(in_use[1]); }
};

// Room for a grouping of `rows` rows: every segment holds a row at least, a merged token more
// than embedding_segment_rows, and its slots are its segments.
inline std::size_t token_group_segment_room(std::size_t rows) { return rows; }
inline std::size_t token_group_merge_room(std::size_t rows) { return rows / (embedding_segment_rows + 1); }
inline std::size_t token_group_slot_room(std::size_t rows) {
  return rows / embedding_segment_rows + token_group_merge_room(rows);
}

// Builds the grouping on the host, into one packed int32 array (one upload): rows_by_token, then
// room for the segments, then room for the merges, then the two counts in use.
class TokenGroups {
 public:
  // Groups rows 0 .. tokens.size() - 1 by token id; every id must lie in [0, vocab).
  void build(std::span<const std::int32_t> tokens, std::size_t vocab) {
    const std::size_t rows = tokens.size();
    if (rows > std::size_t(INT32_MAX)) throw error("TokenGroups: " + std::to_string(rows) + " rows is too many");
    counts_.assign(vocab + 1, 0);
    for (std::size_t r = 0; r < rows; ++r) {
      const std::int32_t t = tokens[r];
      if (t < 0 || static_cast<std::size_t>(t) >= vocab) {
        throw error("TokenGroups: token " + std::to_string(t) + " at row " + std::to_string(r) + " is outside [0, " +
                    std::to_string(vocab) + ")");
      }
      ++counts_[std::size_t(t) + 1];
    }
    for (std::size_t v = 0; v < vocab; ++v) counts_[v + 1] += counts_[v];  // counts_[v]: first place of token v

    // The segments, in token order, read off the places before the scatter below moves them:
    // token v's rows are places counts_[v] .. counts_[v + 1]. A token of one segment (at most
    // embedding_segment_rows rows; every token but the commonest few) takes no branch: its entry
    // is written whether or not the token occurs and kept only if it does (the host builds this
    // between two steps while the device waits; a branch per token mispredicted about as often as
    // tokens occur). There is at most one segment per row, and room for one more entry (the
    // scratch only grows: no clearing per build).
    if (segments_.size() < 4 * (rows + 1)) segments_.resize(4 * (rows + 1));
    merges_.clear();
    std::int32_t* seg = segments_.data();
    std::size_t n = 0;
    std::int32_t slots = 0;
    for (std::size_t v = 0; v < vocab; ++v) {
      const std::int32_t begin = counts_[v], end = counts_[v + 1], token = static_cast<std::int32_t>(v);
      if (static_cast<std::size_t>(end - begin) > embedding_segment_rows) {
        const std::size_t pieces = (std::size_t(end - begin) + embedding_segment_rows - 1) / embedding_segment_rows;
        merges_.insert(merges_.end(), {token, slots, std::int32_t(pieces)});
        for (std::int32_t b = begin; b < end; b += std::int32_t(embedding_segment_rows)) {
          const std::int32_t e = std::min(b + std::int32_t(embedding_segment_rows), end);
          seg[4 * n] = token, seg[4 * n + 1] = b, seg[4 * n + 2] = e, seg[4 * n + 3] = slots++;
          ++n;
        }
        continue;
      }
      seg[4 * n] = token, seg[4 * n + 1] = begin, seg[4 * n + 2] = end, seg[4 * n + 3] = -1;
      n += end > begin ? 1 : 0;
    }

    rows_ = rows;
    const std::size_t segment_room = token_group_segment_room(rows), merge_room = token_group_merge_room(rows);
    // The room past what is in use keeps whatever it held: nothing reads it.
    packed_.resize(rows + 4 * segment_room + 3 * merge_room + 2);
    for (std::size_t r = 0; r < rows; ++r) packed_[counts_[std::size_t(tokens[r])]++] = static_cast<std::int32_t>(r);
    std::copy(segments_.begin(), segments_.begin() + std::ptrdiff_t(4 * n), packed_.begin() + std::ptrdiff_t(rows));
    std::copy(merges_.begin(), merges_.end(), packed_.begin() + std::ptrdiff_t(rows + 4 * segment_room));
    packed_[packed_.size() - 2] = static_cast<std::int32_t>(n);
    packed_[packed_.size() - 1] = static_cast<std::int32_t>(merges_.size() / 3);
  }

  std::span<const std::int32_t> packed() const noexcept { return packed_; }

  // The groups read from `packed`: packed().data() itself, or a device copy of packed().
  TokenGroupsView view(const std::int32_t* packed) const noexcept {
    const std::size_t segment_room = token_group_segment_room(rows_), merge_room = token_group_merge_room(rows_);
    return {packed,
            packed + rows_,
            packed + rows_ + 4 * segment_room,
            packed + rows_ + 4 * segment_room + 3 * merge_room,
            rows_,
            segment_room,
            merge_room,
            token_group_slot_room(rows_)};
  }

 private:
  std::vector<std::int32_t> packed_, segments_, merges_, counts_;  // segments_: scratch, its first 4 n in use
  std::size_t rows_ = 0;
};

namespace detail {

template <class T>
struct EmbeddingForward {
  const std::int32_t* tokens;
  const T* token_table;
  const T* position_table;  // may be null: no position embedding
  T* x;
  std::size_t rows;
  std::size_t dim;
  std::size_t sequence_length;
  bool vectorized;
};

template <class T>
struct EmbeddingBackward {
  const T* dx;
  std::size_t rows;
  std::size_t dim;
  T* dtable;
  std::size_t table_rows;
  bool vectorized;
};

// Columns one warp covers per work item: 32 lanes of L elements.
template <int L>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE std::size_t embedding_tiles(std::size_t dim) {
  return (dim + warp_size * L - 1) / (warp_size * L);
}

// acc[l] = the fp32 sum, in order i = 0 .. count - 1, of src[row_of(i) dim + col + l]. Loads of
// four rows are issued before their additions; the order of the additions stays the same.
template <int L, class T, class RowOf>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void embedding_sum_rows(const T* src, std::size_t dim, std::size_t col,
                                                            std::size_t count, RowOf row_of, float (&acc)[L]) {
  ALLOY_UNROLL
  for (int l = 0; l < L; ++l) acc[l] = 0.0f;
  std::size_t i = 0;
  for (; i + 4 <= count; i += 4) {
    T v[4][L];
    ALLOY_UNROLL
    for (int k = 0; k < 4; ++k) load_run<L>(src + row_of(i + k) * dim + col, v[k]);
    ALLOY_UNROLL
    for (int k = 0; k < 4; ++k) {
      ALLOY_UNROLL
      for (int l = 0; l < L; ++l) acc[l] = fp::add(acc[l], to_float(v[k][l]));
    }
  }
  for (; i < count; ++i) {
    T v[L];
    load_run<L>(src + row_of(i) * dim + col, v);
    ALLOY_UNROLL
    for (int l = 0; l < L; ++l) acc[l] = fp::add(acc[l], to_float(v[l]));
  }
}

// g = g + sum (accumulate) or g = sum, rounded once.
template <int L, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void embedding_store_sums(T* g, const float (&sum)[L], bool accumulate) {
  T v[L];
  if (accumulate) load_run<L>(g, v);
  ALLOY_UNROLL
  for (int l = 0; l < L; ++l) v[l] = round_nearest<T>(accumulate ? fp::add(to_float(v[l]), sum[l]) : sum[l]);
  store_run<L>(g, v);
}

// The work of one warp (lane `lane`, columns col .. col + L - 1) on one item of each pass. The
// Host replays them lane by lane; per column, the additions are the same.

template <int L, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void embedding_forward_vector(const EmbeddingForward<T>& a, std::size_t r,
                                                                  std::size_t col) {
  T w[L], p[L];
  load_run<L>(a.token_table + std::size_t(a.tokens[r]) * a.dim + col, w);
  if (a.position_table != nullptr) {
    load_run<L>(a.position_table + (r % a.sequence_length) * a.dim + col, p);
    ALLOY_UNROLL
    for (int l = 0; l < L; ++l) w[l] = round_nearest<T>(fp::add(to_float(w[l]), to_float(p[l])));
  }
  store_run<L>(a.x + r * a.dim + col, w);
}

template <int L, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void embedding_segment(const EmbeddingBackward<T>& a, const TokenGroupsView& g,
                                                           std::size_t segment, std::size_t col, float* partials) {
  const std::int32_t* s = g.segments + 4 * segment;
  const std::int32_t* rows = g.rows_by_token + s[1];
  float sum[L];
  embedding_sum_rows<L>(
      a.dx, a.dim, col, std::size_t(s[2] - s[1]), [&](std::size_t i) { return std::size_t(rows[i]); }, sum);
  if (s[3] < 0) {
    embedding_store_sums<L>(a.dtable + std::size_t(s[0]) * a.dim + col, sum, true);
  } else {
    float* p = partials + std::size_t(s[3]) * a.dim + col;
    ALLOY_UNROLL
    for (int l = 0; l < L; ++l) p[l] = sum[l];
  }
}

template <int L, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void embedding_merge(const EmbeddingBackward<T>& a, const TokenGroupsView& g,
                                                         std::size_t merge, std::size_t col, const float* partials) {
  const std::int32_t* m = g.merges + 3 * merge;
  float sum[L];
  ALLOY_UNROLL
  for (int l = 0; l < L; ++l) sum[l] = 0.0f;
  for (std::int32_t k = 0; k < m[2]; ++k) {
    const float* p = partials + std::size_t(m[1] + k) * a.dim + col;
    ALLOY_UNROLL
    for (int l = 0; l < L; ++l) sum[l] = fp::add(sum[l], p[l]);
  }
  embedding_store_sums<L>(a.dtable + std::size_t(m[0]) * a.dim + col, sum, true);
}

// Position t's gradient: the sum over the batch of dx at position t; zero (or left as it was,
// when accumulating) for positions past the sequence.
template <int L, class T>
ALLOY_HOST_DEVICE ALLOY_FORCEINLINE void embedding_position(const EmbeddingBackward<T>& a, std::size_t seq,
                                                            std::size_t t, std::size_t col, bool accumulate) {
  float sum[L];
  if (t < seq) {
    embedding_sum_rows<L>(
        a.dx, a.dim, col, a.rows / seq, [&](std::size_t b) { return b * seq + t; }, sum);
  } else if (accumulate) {
    return;
  } else {
    ALLOY_UNROLL
    for (int l = 0; l < L; ++l) sum[l] = 0.0f;
  }
  embedding_store_sums<L>(a.dtable + t * a.dim + col, sum, accumulate);
}

// Host references: the device's per-column order, one column at a time.

template <class T>
void embedding_forward_on(Host, const EmbeddingForward<T>& a) {
  for (std::size_t r = 0; r < a.rows; ++r) {
    for (std::size_t c = 0; c < a.dim; ++c) embedding_forward_vector<1>(a, r, c);
  }
}

template <class T>
void embedding_token_backward_on(Host, const EmbeddingBackward<T>& a, const TokenGroupsView& g, float* partials) {
  for (std::size_t s = 0; s < g.segments_in_use(); ++s) {
    for (std::size_t c = 0; c < a.dim; ++c) embedding_segment<1>(a, g, s, c, partials);
  }
  for (std::size_t m = 0; m < g.merges_in_use(); ++m) {
    for (std::size_t c = 0; c < a.dim; ++c) embedding_merge<1>(a, g, m, c, partials);
  }
}

template <class T>
void embedding_position_backward_on(Host, const EmbeddingBackward<T>& a, std::size_t seq, bool accumulate) {
  for (std::size_t t = 0; t < a.table_rows; ++t) {
    for (std::size_t c = 0; c < a.dim; ++c) embedding_position<1>(a, seq, t, c, accumulate);
  }
}

#if ALLOY_HAS_CUDA_KERNELS

// A thread per L elements of x. Per element: reads a token-table and a position-table element
// (sizeof(T) each) and writes sizeof(T); 4 bytes per row for the token id (from cache).
template <int L, class T>
__global__ void __launch_bounds__(cuda_block) embedding_forward_kernel(EmbeddingForward<T> a) {
  const std::size_t per_row = a.dim / L;
  const std::size_t n = a.rows * per_row;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    embedding_forward_vector<L>(a, i / per_row, (i % per_row) * L);
  }
}

// Work item w of `items` (each tiles wide) for the warp: calls work(item, col) with this lane's
// first column, lanes past the row's end left out.
template <int L, class Work>
__device__ ALLOY_FORCEINLINE void embedding_warp_items(std::size_t items, std::size_t dim, Work&& work) {
  const std::size_t tiles = embedding_tiles<L>(dim);
  const std::size_t warps = std::size_t(gridDim.x) * (blockDim.x / warp_size);
  const std::size_t lane = threadIdx.x % warp_size;
  for (std::size_t w = std::size_t(blockIdx.x) * (blockDim.x / warp_size) + threadIdx.x / warp_size; w < items * tiles;
       w += warps) {
    const std::size_t col = (w % tiles) * warp_size * L + lane * L;
    if (col < dim) work(w / tiles, col);
  }
}

// A warp per (segment, 32 L columns), launched for the room and reading the count in use. Per element of dx: read once
// (sizeof(T)); per gradient row of a single-segment token: read and written once; per segment of a merged token: 4
// bytes written per column.
template <int L, class T>
__global__ void __launch_bounds__(cuda_block)
    embedding_segments_kernel(EmbeddingBackward<T> a, TokenGroupsView g, float* partials) {
  embedding_warp_items<L>(g.segments_in_use(), a.dim,
                          [&](std::size_t s, std::size_t col) { embedding_segment<L>(a, g, s, col, partials); });
}

// A warp per (merged token, 32 L columns): reads its segments' sums (4 bytes per column each),
// reads and writes the gradient row.
template <int L, class T>
__global__ void __launch_bounds__(cuda_block)
    embedding_merges_kernel(EmbeddingBackward<T> a, TokenGroupsView g, const float* partials) {
  embedding_warp_items<L>(g.merges_in_use(), a.dim,
                          [&](std::size_t m, std::size_t col) { embedding_merge<L>(a, g, m, col, partials); });
}

// A warp per (position, 32 L columns): reads dx once (sizeof(T) per element), writes the
// position table's gradient (reading it too when accumulating).
template <int L, class T>
__global__ void __launch_bounds__(cuda_block)
    embedding_positions_kernel(EmbeddingBackward<T> a, std::size_t seq, bool accumulate) {
  embedding_warp_items<L>(a.table_rows, a.dim,
                          [&](std::size_t t, std::size_t col) { embedding_position<L>(a, seq, t, col, accumulate); });
}

inline int embedding_warp_grid(std::size_t items, std::size_t tiles) {
  return grid_for(items * tiles, cuda_block / warp_size);
}

template <class T>
void embedding_forward_on(Cuda be, const EmbeddingForward<T>& a) {
  if (a.rows == 0) return;
  constexpr int L = row_vector_lanes<T>;
  if (a.vectorized) {
    embedding_forward_kernel<L><<<grid_for(a.rows * a.dim / L), cuda_block, 0, be.stream>>>(a);
  } else {
    embedding_forward_kernel<1><<<grid_for(a.rows * a.dim), cuda_block, 0, be.stream>>>(a);
  }
  ALLOY_CUDA_CHECK_LAUNCH();
}

template <int L, class T>
void embedding_token_backward_launch(Cuda be, const EmbeddingBackward<T>& a, const TokenGroupsView& g,
                                     float* partials) {
  const std::size_t tiles = embedding_tiles<L>(a.dim);
  if (g.segment_count > 0) {
    embedding_segments_kernel<L>
        <<<embedding_warp_grid(g.segment_count, tiles), cuda_block, 0, be.stream>>>(a, g, partials);
    ALLOY_CUDA_CHECK_LAUNCH();
  }
  if (g.merge_count > 0) {
    embedding_merges_kernel<L><<<embedding_warp_grid(g.merge_count, tiles), cuda_block, 0, be.stream>>>(a, g, partials);
    ALLOY_CUDA_CHECK_LAUNCH();
  }
}

template <class T>
void embedding_token_backward_on(Cuda be, const EmbeddingBackward<T>& a, const TokenGroupsView& g, float* partials) {
  if (a.vectorized) {
    embedding_token_backward_launch<row_vector_lanes<T>>(be, a, g, partials);
  } else {
    embedding_token_backward_launch<1>(be, a, g, partials);
  }
}

template <class T>
void embedding_position_backward_on(Cuda be, const EmbeddingBackward<T>& a, std::size_t seq, bool accumulate) {
  constexpr int L = row_vector_lanes<T>;
  if (a.vectorized) {
    embedding_positions_kernel<L>
        <<<embedding_warp_grid(a.table_rows, embedding_tiles<L>(a.dim)), cuda_block, 0, be.stream>>>(a, seq,
                                                                                                     accumulate);
  } else {
    embedding_positions_kernel<1>
        <<<embedding_warp_grid(a.table_rows, embedding_tiles<1>(a.dim)), cuda_block, 0, be.stream>>>(a, seq,
                                                                                                     accumulate);
  }
  ALLOY_CUDA_CHECK_LAUNCH();
}

#endif  // ALLOY_HAS_CUDA_KERNELS

// Rows of dim elements move as 16-byte vectors when every row starts on a 16-byte boundary.
template <class T, class... P>
bool embedding_vectorizable(std::size_t dim, const P*... p) {
  return row_vector_lanes<T> > 1 && dim % row_vector_lanes<T> == 0 &&
         ((reinterpret_cast<std::uintptr_t>(p) % 16 == 0) && ...);
}

template <class T>
struct ZeroElement {
  ALLOY_HOST_DEVICE void operator()(T& v) const { v = round_nearest<T>(0.0f); }
};

template <class T, class B>
constexpr void embedding_static_checks() {
  static_assert(backend<B>, "embedding: B must be alloy::Host or alloy::Cuda");
  static_assert(row_dtype<T>, "embedding<T>: T must be float, bf16 or fp16");
  static_assert(has_row_kernels<B>,
                "embedding on Cuda: compile this translation unit with nvcc (the Cuda kernels need it)");
}

inline void embedding_require(bool ok, const char* where, const std::string& what) {
  if (!ok) throw error(std::string(where) + ": " + what);
}

}  // namespace detail

// x (rows x dim) = token_table[tokens[r]] + position_table[r % sequence_length], in fp32 and
// rounded once; position_table may be null (x = the token rows). Token ids must be valid rows of
// token_table: the caller checks them on the host (TokenGroups::build does). On Cuda: device
// pointers, ordered on be.stream.
template <class T, class B>
void embedding_forward(B be, const std::int32_t* tokens, const T* token_table, const T* position_table, T* x,
                       std::size_t rows, std::size_t dim, std::size_t sequence_length) {
  detail::embedding_static_checks<T, B>();
  constexpr const char* where = "embedding_forward";
  detail::embedding_require(dim > 0, where, "dim must be positive");
  detail::embedding_require(
      sequence_length > 0 && rows % sequence_length == 0, where,
      std::to_string(rows) + " rows are not a whole number of sequences of " + std::to_string(sequence_length));
  if (rows == 0) return;
  detail::embedding_require(tokens && token_table && x, where, "tokens, token_table and x must not be null");
  const bool vectorized = position_table ? detail::embedding_vectorizable<T>(dim, token_table, position_table, x)
                                         : detail::embedding_vectorizable<T>(dim, token_table, x);
  detail::embedding_forward_on(
      be, detail::EmbeddingForward<T>{tokens, token_table, position_table, x, rows, dim, sequence_length, vectorized});
}

// Floats of scratch embedding_token_backward needs: one dim-long fp32 sum per partial slot.
inline std::size_t embedding_token_backward_scratch_floats(const TokenGroupsView& groups, std::size_t dim) {
  return groups.partial_slots * dim;
}

// The token table's gradient (table_rows x dim) from dx (groups.rows x dim): each row of dx added
// to its token's row, in fp32, rounded once per gradient row. accumulate = false first sets the
// whole gradient to zero (a table that nothing else wrote this micro-batch); true adds to what it
// holds (accumulation, or a table tied to an output projection that wrote its gradient first).
// `groups` and `scratch` (embedding_token_backward_scratch_floats) are device memory on Cuda.
template <class T, class B>
void embedding_token_backward(B be, const T* dx, const TokenGroupsView& groups, std::size_t dim, T* dtable,
                              std::size_t table_rows, bool accumulate, float* scratch) {
  detail::embedding_static_checks<T, B>();
  constexpr const char* where = "embedding_token_backward";
  detail::embedding_require(dim > 0 && table_rows > 0, where, "dim and table_rows must be positive");
  detail::embedding_require(dtable != nullptr, where, "dtable must not be null");
  if (!accumulate) for_each_n(be, table_rows * dim, detail::ZeroElement<T>{}, out(dtable));
  if (groups.rows == 0) return;
  detail::embedding_require(dx != nullptr && groups.rows_by_token != nullptr, where, "dx and groups must not be null");
  detail::embedding_require(groups.partial_slots == 0 || scratch != nullptr, where,
                            "scratch must hold " + std::to_string(groups.partial_slots * dim) + " floats");
  const detail::EmbeddingBackward<T> a{dx,     groups.rows, dim,
                                       dtable, table_rows,  detail::embedding_vectorizable<T>(dim, dx, dtable)};
  detail::embedding_token_backward_on(be, a, groups, scratch);
}

// The position table's gradient (table_rows x dim): row t the sum over the batch of dx's rows at
// position t (rows = batch x sequence_length), written or added; rows from sequence_length on are
// zeroed when writing and left alone when accumulating.
template <class T, class B>
void embedding_position_backward(B be, const T* dx, std::size_t rows, std::size_t dim, std::size_t sequence_length,
                                 T* dtable, std::size_t table_rows, bool accumulate) {
  detail::embedding_static_checks<T, B>();
  constexpr const char* where = "embedding_position_backward";
  detail::embedding_require(dim > 0, where, "dim must be positive");
  detail::embedding_require(sequence_length > 0 && sequence_length <= table_rows && rows % sequence_length == 0, where,
                            std::to_string(rows) + " rows in sequences of " + std::to_string(sequence_length) +
                                " for a table of " + std::to_string(table_rows) + " positions");
  detail::embedding_require(dtable != nullptr && (rows == 0 || dx != nullptr), where, "dx and dtable must not be null");
  const detail::EmbeddingBackward<T> a{dx,     rows,       dim,
                                       dtable, table_rows, detail::embedding_vectorizable<T>(dim, dx, dtable)};
  detail::embedding_position_backward_on(be, a, sequence_length, accumulate);
}

}  // namespace alloy
