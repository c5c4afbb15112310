// The Cuda matrix product through cuBLASLt (kernels/gemm_args.hpp gives the semantics): the
// mapping of row-major products and epilogues onto cuBLASLt's column-major ones, plans cached per
// problem in a GemmHandle, and gemm(Cuda, handle, args). Needs the CUDA runtime, not nvcc.
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_RUNTIME

#include <alloy/backend/buffer.hpp>
#include <alloy/backend/cuda/handles.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/cublas_error.hpp>
#include <alloy/error.hpp>
#include <alloy/io/atomic_file.hpp>
#include <alloy/kernels/detail/gemm_plans.hpp>
#include <alloy/kernels/gemm_args.hpp>

#include <cublasLt.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace alloy {

namespace detail {

template <class Compute>
inline constexpr cudaDataType_t cuda_data_type = CUDA_R_32F;  // fp32 and tf32
template <>
inline constexpr cudaDataType_t cuda_data_type<fp16> = CUDA_R_16F;
template <>
inline constexpr cudaDataType_t cuda_data_type<bf16> = CUDA_R_16BF;

template <class Compute>
inline constexpr cublasComputeType_t cublas_compute_type =
    std::is_same_v<Compute, tf32> ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;

// cuBLASLt is column-major. A row-major m x n matrix with leading dimension ld is, read
// column-major, its n x m transpose with the same ld. So C = op(A) op(B) is computed as
// C^T = op(B)^T op(A)^T: cuBLASLt's "A" is our B and its "B" is our A, the transpose flags
// carry over unchanged, and cuBLASLt's m and n are our n and m. Consequences for the epilogues:
// cuBLASLt's bias runs along the rows of its D (our columns: one per output feature), and its
// BGRADB (a reduction over k of its op(B), our op(A)) is our per-row bias gradient. The dGELU
// bias gradient (DGELU_BGRAD) has, like every bias vector, one element per row of D ("bias vector
// length must match matrix D rows count", cublasLt.h): a sum over D's columns, our rows, so one
// per column of our C, the per-feature gradient of the bias added before GELU. The GELU input
// (the AUX matrix) is m x n of D in its own leading dimension: our pre_activation as stored.
// C and D are separate pointers with one layout, so c_in is cuBLASLt's C and c its D.
inline cublasLtEpilogue_t cublaslt_epilogue(Epilogue e, bool keeps_pre_activation) {
  switch (e) {
    case Epilogue::none:
      return CUBLASLT_EPILOGUE_DEFAULT;
    case Epilogue::bias:
      return CUBLASLT_EPILOGUE_BIAS;
    case Epilogue::gelu_tanh:
      return keeps_pre_activation ? CUBLASLT_EPILOGUE_GELU_AUX : CUBLASLT_EPILOGUE_GELU;
    case Epilogue::bias_gelu_tanh:
      return keeps_pre_activation ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_BIAS;
    case Epilogue::bias_grad:
      return CUBLASLT_EPILOGUE_BGRADB;
    case Epilogue::dgelu_tanh:
      return CUBLASLT_EPILOGUE_DGELU;
    case Epilogue::dgelu_tanh_bias_grad:
      return CUBLASLT_EPILOGUE_DGELU_BGRAD;
  }
  throw error(std::string("gemm: ") + name_of(e) + " has no cuBLASLt epilogue");
}

inline cublasOperation_t cublas_operation(Transpose t) { return t == Transpose::yes ? CUBLAS_OP_T : CUBLAS_OP_N; }

// The largest power of two, up to 256, that divides the address: cuBLASLt picks kernels for
// the alignment it is promised (256 unless told otherwise), so plans are made per alignment.
inline std::uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

// The matrix beta scales: cuBLASLt's C.
template <class Compute>
const storage_t<Compute>* c_in_of(const GemmArgs<Compute>& g) {
  return g.c_in != nullptr ? g.c_in : g.c;
}

template <class Compute>
GemmPlanKey plan_key(const GemmArgs<Compute>& g) {
  const void* vector = writes_bias_grad(g.epilogue) ? static_cast<const void*>(g.bias_grad) : g.bias;
  const bool keeps = g.pre_activation != nullptr;
  return {cuda_data_type<Compute>,
          cublas_compute_type<Compute>,
          g.transa,
          g.transb,
          g.m,
          g.n,
          g.k,
          g.lda,
          g.ldb,
          g.ldc,
          keeps ? g.ld_pre_activation : 0,
          g.epilogue,
          keeps,
          alignment_of(g.a),
          alignment_of(g.b),
          alignment_of(g.c),
          alignment_of(c_in_of(g)),
          alignment_of(vector),
          alignment_of(g.pre_activation)};
}

struct MatmulDescDeleter {
  void operator()(cublasLtMatmulDesc_t d) const noexcept { (void)cublasLtMatmulDescDestroy(d); }
};
struct MatrixLayoutDeleter {
  void operator()(cublasLtMatrixLayout_t l) const noexcept { (void)cublasLtMatrixLayoutDestroy(l); }
};
struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreference_t p) const noexcept { (void)cublasLtMatmulPreferenceDestroy(p); }
};
struct LtHandleDeleter {
  void operator()(cublasLtHandle_t h) const noexcept { (void)cublasLtDestroy(h); }
};

using MatmulDesc = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulDesc_t>, MatmulDescDeleter>;
using MatrixLayout = std::unique_ptr<std::remove_pointer_t<cublasLtMatrixLayout_t>, MatrixLayoutDeleter>;
using MatmulPreference = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, PreferenceDeleter>;
using LtHandle = std::unique_ptr<std::remove_pointer_t<cublasLtHandle_t>, LtHandleDeleter>;
using Event = CudaEvent;

// A problem's descriptors and chosen algorithm, in cuBLASLt's (swapped) roles.
struct GemmPlan {
  MatmulDesc desc;
  MatrixLayout lt_a;  // our B
  MatrixLayout lt_b;  // our A
  MatrixLayout lt_c;  // our C, also the output D
  cublasLtMatmulAlgo_t algo{};
};

template <class V>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const V& value) {
  ALLOY_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
}

inline MatrixLayout make_layout(cudaDataType_t type, std::size_t rows, std::size_t cols, std::size_t ld) {
  cublasLtMatrixLayout_t layout = nullptr;
  ALLOY_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, rows, cols, static_cast<std::int64_t>(ld)));
  return MatrixLayout(layout);
}

// The per-call pointers the epilogue reads or writes. cuBLASLt's heuristic also reads them
// (for their alignment), so they are set before the plan is made too.
template <class Compute>
void set_epilogue_pointers(cublasLtMatmulDesc_t desc, const GemmArgs<Compute>& g) {
  if (adds_bias(g.epilogue)) set_attribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(g.bias));
  if (writes_bias_grad(g.epilogue)) {
    set_attribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<void*>(g.bias_grad));
  }
  if (g.pre_activation) {
    set_attribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, static_cast<void*>(g.pre_activation));
  }
}

// One of the heuristic's answers: cuBLASLt's result itself (algo, workspaceSize, state, ...). Named
// because nvcc 13.0 stops with an internal error ("find_allocated_name_reference") on a
// std::vector of cuBLASLt's unnamed typedef'd structs, whose destruction it cannot spell.
struct HeuristicResult : cublasLtMatmulHeuristicResult_t {};

// A problem's descriptors (GemmPlan, its algo left unset) and up to `count` of the heuristic's
// algorithms for it, in the heuristic's order (best first); none when it has no algorithm.
struct GemmCandidates {
  GemmPlan plan;
  std::vector<HeuristicResult> results;
};

template <class Compute>
GemmCandidates heuristic_algos(cublasLtHandle_t handle, const GemmArgs<Compute>& g, std::size_t workspace_bytes,
                               int count) {
  constexpr cudaDataType_t type = cuda_data_type<Compute>;
  GemmCandidates candidates;
  GemmPlan& plan = candidates.plan;
  cublasLtMatmulDesc_t desc = nullptr;
  ALLOY_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, cublas_compute_type<Compute>, CUDA_R_32F));
  plan.desc.reset(desc);
  set_attribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, cublas_operation(g.transb));
  set_attribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, cublas_operation(g.transa));
  set_attribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, cublaslt_epilogue(g.epilogue, g.pre_activation != nullptr));
  if (g.pre_activation) {
    set_attribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, static_cast<std::int64_t>(g.ld_pre_activation));
  }
  set_epilogue_pointers(desc, g);

  const bool ta = g.transa == Transpose::yes;
  const bool tb = g.transb == Transpose::yes;
  // Column-major shapes of the stored matrices: a row-major r x c matrix is c x r here.
  plan.lt_a = make_layout(type, tb ? g.k : g.n, tb ? g.n : g.k, g.ldb);
  plan.lt_b = make_layout(type, ta ? g.m : g.k, ta ? g.k : g.m, g.lda);
  plan.lt_c = make_layout(type, g.n, g.m, g.ldc);

  cublasLtMatmulPreference_t preference_handle = nullptr;
  ALLOY_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference_handle));
  const MatmulPreference preference(preference_handle);
  const auto set_preference = [&](cublasLtMatmulPreferenceAttributes_t attribute, auto value) {
    ALLOY_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference_handle, attribute, &value, sizeof(value)));
  };
  set_preference(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<std::uint64_t>(workspace_bytes));
  set_preference(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(g.b));
  set_preference(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(g.a));
  set_preference(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(c_in_of(g)));
  set_preference(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(g.c));

  if (count <= 0) return candidates;
  const std::unique_ptr<cublasLtMatmulHeuristicResult_t[]> results(new cublasLtMatmulHeuristicResult_t[count]());
  int found = 0;
  ALLOY_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, desc, plan.lt_a.get(), plan.lt_b.get(), plan.lt_c.get(),
                                                    plan.lt_c.get(), preference_handle, count, results.get(), &found));
  for (int i = 0; i < found; ++i) candidates.results.push_back({results[i]});
  return candidates;
}

// The descriptors and the heuristic's first algorithm.
template <class Compute>
GemmPlan make_plan(cublasLtHandle_t handle, const GemmArgs<Compute>& g, std::size_t workspace_bytes) {
  GemmCandidates candidates = heuristic_algos(handle, g, workspace_bytes, 1);
  if (candidates.results.empty()) {
    throw cuda_error("cublasLtMatmulAlgoGetHeuristic", __FILE__, __LINE__, CUBLAS_STATUS_NOT_SUPPORTED,
                     std::string("no cuBLASLt algorithm for gemm<") + numeric_traits<Compute>::name +
                         "> m = " + std::to_string(g.m) + ", n = " + std::to_string(g.n) +
                         ", k = " + std::to_string(g.k) + ", transa = " + name_of(g.transa) +
                         ", transb = " + name_of(g.transb) + ", " + name_of(g.epilogue));
  }
  candidates.plan.algo = candidates.results.front().algo;
  return std::move(candidates.plan);
}

// What fixes the order of an algorithm's sums: the kernel (cuBLASLt's algorithm id), how K is
// split and how the splits are reduced. Tiles, stages, cluster shape and swizzle only say which
// block computes which outputs (GemmTuning::timed; benchmarks/kernels/gemm_algos.cu hashes every
// candidate's output on two random fillings: on the H200, in every product of both examples whose
// first choice does not split K, every candidate shared its algorithm and gave its bits; the
// split-K weight gradients' candidates gave them 2 or 3 times in 8). The output samples check it.
struct AlgoOrder {
  std::int32_t id = -1, split_k = -1;
  std::uint32_t reduction = 0;
  bool operator==(const AlgoOrder&) const = default;
};

inline AlgoOrder algo_order(const cublasLtMatmulAlgo_t& algo) {
  AlgoOrder o;
  std::size_t written = 0;
  const auto get = [&](cublasLtMatmulAlgoConfigAttributes_t attribute, auto& value) {
    return cublasLtMatmulAlgoConfigGetAttribute(&algo, attribute, &value, sizeof(value), &written) ==
               CUBLAS_STATUS_SUCCESS &&
           written == sizeof(value);
  };
  if (!get(CUBLASLT_ALGO_CONFIG_ID, o.id) || !get(CUBLASLT_ALGO_CONFIG_SPLITK_NUM, o.split_k) ||
      !get(CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, o.reduction)) {
    o.id = -1;  // unknown: matches nothing but itself, and the first choice is always kept
  }
  return o;
}

// Up to 3 x 16 KiB of every output a product writes (C, the kept pre-activation, the bias
// gradient): their first, middle and last bytes, copied to the host after the stream's work.
// Two algorithms that sum in different orders differ in most elements of real operands, so
// equal samples say the candidate computed what the first choice did.
template <class Compute>
std::vector<std::byte> output_sample(const GemmArgs<Compute>& g, cudaStream_t stream) {
  using V = typename GemmArgs<Compute>::value_type;
  constexpr std::size_t piece = std::size_t(16) << 10;
  std::vector<std::byte> out;
  const auto add = [&](const V* p, std::size_t rows, std::size_t cols, std::size_t ld) {
    if (!p || rows == 0 || cols == 0) return;
    const std::size_t bytes = ((rows - 1) * ld + cols) * sizeof(V);
    const std::size_t len = bytes < piece ? bytes : piece;
    for (const std::size_t at : {std::size_t(0), (bytes - len) / 2 / sizeof(V) * sizeof(V), bytes - len}) {
      const std::size_t old = out.size();
      out.resize(old + len);
      ALLOY_CUDA_CHECK(cudaMemcpyAsync(out.data() + old, reinterpret_cast<const std::byte*>(p) + at, len,
                                       cudaMemcpyDeviceToHost, stream));
    }
  };
  add(g.c, g.m, g.n, g.ldc);
  if (applies_gelu(g.epilogue)) add(g.pre_activation, g.m, g.n, g.ld_pre_activation);
  if (g.bias_grad) add(g.bias_grad, 1, g.epilogue == Epilogue::bias_grad ? g.m : g.n, 0);
  ALLOY_CUDA_CHECK(cudaStreamSynchronize(stream));
  return out;
}

}  // namespace detail

// GemmTuning::timed and timed_any: how many of the heuristic's candidates are timed.
inline constexpr int gemm_timed_candidates = 8;

// What the Cuda gemm needs across calls: the cuBLASLt handle, a workspace, and one plan
// (descriptors and the algorithm) per problem, since making them costs far more than a small
// product. Belongs to the device current at construction. Not thread-safe; calls on different
// streams are ordered one after another (the workspace is shared), so give each stream its own
// handle when products should overlap.
class GemmHandle {
 public:
  static constexpr std::size_t default_workspace_bytes = std::size_t(32) << 20;
  // Plans kept before the cache starts over: far more shapes than a model has.
  static constexpr std::size_t max_cached_plans = 1024;

  // plans_file (GemmTuning::timed or timed_any): where timed choices are kept across runs. The plans it
  // holds for this device, cuBLASLt version and workspace size are used instead of timing (the
  // same algorithms, hence the same bits, as the run that timed them); each problem timed here is
  // added to it at once (the file is replaced atomically). A file recorded elsewhere is not used,
  // and is replaced by this run's plans; one that does not parse is an error naming its line.
  explicit GemmHandle(Cuda be = {}, std::size_t workspace_bytes = default_workspace_bytes,
                      GemmTuning tuning = GemmTuning::heuristic, std::string plans_file = {})
      : workspace_(workspace_bytes, be), last_stream_(be.stream), tuning_(tuning), plans_file_(std::move(plans_file)) {
    if (!plans_file_.empty() && tuning_ == GemmTuning::heuristic) {
      throw error("GemmHandle: the gemm plans file '" + plans_file_ +
                  "' keeps timed choices; it needs GemmTuning::timed or timed_any (the heuristic's choice is the same "
                  "run after run without one)");
    }
    ALLOY_CUDA_CHECK(cudaGetDevice(&device_));
    cublasLtHandle_t handle = nullptr;
    ALLOY_CUBLAS_CHECK(cublasLtCreate(&handle));
    handle_.reset(handle);
    stream_switch_ = make_cuda_event();
    if (!plans_file_.empty()) read_plans_file();
  }

  GemmHandle(GemmHandle&&) noexcept = default;
  GemmHandle& operator=(GemmHandle&&) = delete;
  GemmHandle(const GemmHandle&) = delete;
  GemmHandle& operator=(const GemmHandle&) = delete;

  // The workspace is freed in its own stream's order: that stream first waits for the last
  // product, which may have run on another.
  ~GemmHandle() {
    if (!stream_switch_) return;
    const cudaStream_t own = workspace_.backend().stream;
    if (last_stream_ != own && cudaEventRecord(stream_switch_.get(), last_stream_) == cudaSuccess) {
      (void)cudaStreamWaitEvent(own, stream_switch_.get(), 0);
    }
  }

  std::size_t cached_plans() const noexcept { return plans_.size(); }
  std::size_t workspace_bytes() const noexcept { return workspace_.bytes(); }
  int device() const noexcept { return device_; }
  GemmTuning tuning() const noexcept { return tuning_; }
  // Problems whose algorithm was chosen by timing, how many of those chose another than the
  // heuristic's first, and (GemmTuning::timed) the candidates passed over for computing in another
  // order than the first choice or giving other bits.
  std::size_t timed_plans() const noexcept { return timed_plans_; }
  std::size_t retuned_plans() const noexcept { return retuned_plans_; }
  std::size_t other_order_candidates() const noexcept { return other_order_; }
  // With a plans file: the problems whose plan came from it, untimed; whether the file was
  // recorded on another device, cuBLASLt version or workspace size (so none of it is used); and
  // the running identity its first lines must carry.
  const std::string& plans_file() const noexcept { return plans_file_; }
  std::size_t loaded_plans() const noexcept { return loaded_plans_; }
  bool plans_file_foreign() const noexcept { return plans_file_foreign_; }
  const std::string& identity() const noexcept { return identity_; }

 private:
  template <class Compute>
  friend void gemm(Cuda be, GemmHandle& handle, const GemmArgs<Compute>& g);

  // The plan for g's problem, made on first use (on `stream`, where the call runs: the timed
  // choice runs the candidates there, after the work that writes g's inputs).
  template <class Compute>
  detail::GemmPlan& plan_for(const GemmArgs<Compute>& g, cudaStream_t stream) {
    const detail::GemmPlanKey key = detail::plan_key(g);
    if (auto found = plans_.find(key); found != plans_.end()) return found->second;
    if (plans_.size() >= max_cached_plans) plans_.clear();
    const bool adds_to_output = g.beta != 0.0f && detail::c_in_of(g) == g.c;
    if (tuning_ == GemmTuning::heuristic || adds_to_output) {
      return plans_.emplace(key, detail::make_plan(handle_.get(), g, workspace_.bytes())).first->second;
    }
    if (const auto kept = recorded_.find(key); kept != recorded_.end()) {
      detail::GemmCandidates c = detail::heuristic_algos(handle_.get(), g, workspace_.bytes(), 0);
      std::memcpy(c.plan.algo.data, kept->second.data(), sizeof(c.plan.algo.data));
      cublasLtMatmulHeuristicResult_t checked{};
      if (cublasLtMatmulAlgoCheck(handle_.get(), c.plan.desc.get(), c.plan.lt_a.get(), c.plan.lt_b.get(),
                                  c.plan.lt_c.get(), c.plan.lt_c.get(), &c.plan.algo,
                                  &checked) == CUBLAS_STATUS_SUCCESS &&
          checked.workspaceSize <= workspace_.bytes()) {
        ++loaded_plans_;
        return plans_.emplace(key, std::move(c.plan)).first->second;
      }
      // cuBLASLt refuses the kept algorithm for this problem: timed again, and replaced below.
    }
    detail::GemmPlan& plan = plans_.emplace(key, timed_plan(g, stream)).first->second;
    if (!plans_file_.empty()) {
      detail::GemmAlgoWords words{};
      std::memcpy(words.data(), plan.algo.data, sizeof(plan.algo.data));
      recorded_[key] = words;
      write_plans_file();
    }
    return plan;
  }

  void read_plans_file() {
    cudaDeviceProp p{};
    ALLOY_CUDA_CHECK(cudaGetDeviceProperties(&p, device_));
    identity_ = std::string(p.name) + ", sm_" + std::to_string(p.major) + std::to_string(p.minor) + ", " +
                std::to_string(p.multiProcessorCount) + " SMs, cuBLASLt " + std::to_string(cublasLtGetVersion()) +
                ", workspace " + std::to_string(workspace_.bytes()) + " bytes";
    const std::filesystem::path path(plans_file_);
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) {
      const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
      if (!std::filesystem::is_directory(dir, ec)) {
        throw error("GemmHandle: the gemm plans file '" + plans_file_ + "' cannot be written: no directory '" +
                    dir.string() + "'");
      }
      return;  // made when the first problem is timed
    }
    std::string text;
    {
      const std::unique_ptr<std::FILE, int (*)(std::FILE*)> in(std::fopen(plans_file_.c_str(), "rb"), &std::fclose);
      char chunk[4096];
      std::size_t got = 0;
      while (in && (got = std::fread(chunk, 1, sizeof chunk, in.get())) > 0) text.append(chunk, got);
      if (!in || std::ferror(in.get())) {
        throw error("GemmHandle: cannot read the gemm plans file '" + plans_file_ + "': " + detail::errno_text(errno));
      }
    }
    detail::GemmPlansFile f = detail::parse_gemm_plans(text, plans_file_);
    if (f.identity == identity_) {
      recorded_ = std::move(f.plans);
    } else {
      plans_file_foreign_ = true;
    }
  }

  void write_plans_file() const {
    const std::string text = detail::format_gemm_plans({identity_, recorded_});
    write_file_atomically(plans_file_, [&](FileWriter& out) {
      out.write(std::span<const std::byte>(reinterpret_cast<const std::byte*>(text.data()), text.size()));
    });
  }

  // The fastest of the heuristic's candidates: each launched once, then timed over 3 launches;
  // ties go to the heuristic's order. A candidate cuBLASLt refuses to launch is passed over, and
  // with GemmTuning::timed so is one of another order than the first choice (algo_order) or whose
  // output after its first launch differs from the first choice's (output_sample).
  template <class Compute>
  detail::GemmPlan timed_plan(const GemmArgs<Compute>& g, cudaStream_t stream) {
    detail::GemmCandidates c = detail::heuristic_algos(handle_.get(), g, workspace_.bytes(), gemm_timed_candidates);
    if (c.results.size() <= 1) return detail::make_plan(handle_.get(), g, workspace_.bytes());
    if (capturing(stream)) {
      throw error("GemmTuning::timed: a product first seen (" + std::to_string(g.m) + " x " + std::to_string(g.n) +
                  " x " + std::to_string(g.k) +
                  ") while its stream is captured as a CUDA graph, where nothing runs to be timed; run a step with "
                  "the same shapes before capturing");
    }
    if (!timing_start_) {
      cudaEvent_t e = nullptr;
      ALLOY_CUDA_CHECK(cudaEventCreate(&e));
      timing_start_.reset(e);
      ALLOY_CUDA_CHECK(cudaEventCreate(&e));
      timing_end_.reset(e);
    }
    const auto launch = [&](const cublasLtMatmulAlgo_t& algo) {
      return cublasLtMatmul(handle_.get(), c.plan.desc.get(), &g.alpha, g.b, c.plan.lt_a.get(), g.a, c.plan.lt_b.get(),
                            &g.beta, detail::c_in_of(g), c.plan.lt_c.get(), g.c, c.plan.lt_c.get(), &algo,
                            workspace_.data(), workspace_.bytes(), stream);
    };
    const bool same_bits = tuning_ == GemmTuning::timed;
    const detail::AlgoOrder first_order = detail::algo_order(c.results.front().algo);
    std::vector<std::byte> first_sample;
    std::size_t best = c.results.size();
    float best_ms = 0.0f;
    for (std::size_t i = 0; i < c.results.size(); ++i) {
      const cublasLtMatmulAlgo_t& algo = c.results[i].algo;
      if (same_bits && i > 0 && (first_sample.empty() || detail::algo_order(algo) != first_order)) {
        ++other_order_;
        continue;
      }
      if (launch(algo) != CUBLAS_STATUS_SUCCESS) continue;
      if (same_bits) {
        std::vector<std::byte> sample = detail::output_sample(g, stream);
        if (i == 0) {
          first_sample = std::move(sample);
        } else if (sample != first_sample) {
          ++other_order_;
          continue;
        }
      }
      ALLOY_CUDA_CHECK(cudaEventRecord(timing_start_.get(), stream));
      bool launched = true;
      for (int r = 0; r < 3 && launched; ++r) launched = launch(algo) == CUBLAS_STATUS_SUCCESS;
      ALLOY_CUDA_CHECK(cudaEventRecord(timing_end_.get(), stream));
      ALLOY_CUDA_CHECK(cudaEventSynchronize(timing_end_.get()));
      float ms = 0.0f;
      ALLOY_CUDA_CHECK(cudaEventElapsedTime(&ms, timing_start_.get(), timing_end_.get()));
      if (launched && (best == c.results.size() || ms < best_ms)) {
        best = i;
        best_ms = ms;
      }
    }
    if (best == c.results.size()) return detail::make_plan(handle_.get(), g, workspace_.bytes());
    ++timed_plans_;
    if (best != 0) ++retuned_plans_;
    c.plan.algo = c.results[best].algo;
    return std::move(c.plan);
  }

  // Orders this call after the previous one when it comes on another stream.
  void enter_stream(cudaStream_t stream) {
    if (stream == last_stream_) return;
    ALLOY_CUDA_CHECK(cudaEventRecord(stream_switch_.get(), last_stream_));
    ALLOY_CUDA_CHECK(cudaStreamWaitEvent(stream, stream_switch_.get(), 0));
    last_stream_ = stream;
  }

  Buffer<std::byte, Cuda> workspace_;
  detail::LtHandle handle_;
  detail::Event stream_switch_;
  cudaStream_t last_stream_;
  int device_ = 0;
  GemmTuning tuning_ = GemmTuning::heuristic;
  detail::Event timing_start_, timing_end_;  // GemmTuning::timed and timed_any, made on first use
  std::size_t timed_plans_ = 0, retuned_plans_ = 0, other_order_ = 0;
  std::map<detail::GemmPlanKey, detail::GemmPlan> plans_;
  std::string plans_file_, identity_;                              // timed tuning with a plans file
  std::map<detail::GemmPlanKey, detail::GemmAlgoWords> recorded_;  // the file's plans and this run's
  std::size_t loaded_plans_ = 0;
  bool plans_file_foreign_ = false;
};

// The product on the backend's stream, asynchronously. Pointers are device memory.
template <class Compute>
void gemm(Cuda be, GemmHandle& handle, const GemmArgs<Compute>& g) {
  detail::check_gemm_args(g);
  int device = 0;
  ALLOY_CUDA_CHECK(cudaGetDevice(&device));
  if (device != handle.device()) {
    throw error("gemm: the GemmHandle belongs to device " + std::to_string(handle.device()) + " but device " +
                std::to_string(device) + " is current");
  }
  handle.enter_stream(be.stream);
  detail::GemmPlan& plan = handle.plan_for(g, be.stream);
  detail::set_epilogue_pointers(plan.desc.get(), g);
  ALLOY_CUBLAS_CHECK(cublasLtMatmul(handle.handle_.get(), plan.desc.get(), &g.alpha, g.b, plan.lt_a.get(), g.a,
                                    plan.lt_b.get(), &g.beta, detail::c_in_of(g), plan.lt_c.get(), g.c, plan.lt_c.get(),
                                    &plan.algo, handle.workspace_.data(), handle.workspace_.bytes(), be.stream));
}

}  // namespace alloy

#endif  // ALLOY_HAS_CUDA_RUNTIME
