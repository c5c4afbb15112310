// InputUploads<B>: the trainer's input pipeline, the path a micro-batch's host data takes to the
// device (PyTorch's DataLoader(pin_memory=True) plus non_blocking copies).
//
// On Cuda every upload is a cudaMemcpyAsync on a stream of its own (the copy stream), into one of
// two device slots that micro-batches use in turn, so the copy of micro-batch i + 1 runs while
// the GPU computes micro-batch i. The compute stream waits for a slot's copies (an event) before
// it reads them, and the copy stream waits for the compute of the slot's previous micro-batch
// before it overwrites it.
//   - Pinned sources (alloy::pinned_vector, cudaHostRegister'ed memory) are copied by DMA from
//     where they are; the host only waits, at the end of the micro-batch, for the copy to have
//     finished, so the batch may be freed when the micro-batch returns.
//   - Pageable sources are first copied on the host into the slot's pinned staging memory (that
//     memcpy is the host's cost of pageable input); the source may be freed at once.
// A slot grows when a micro-batch needs more; the larger size is kept, so steady state allocates
// nothing. On Host, an upload is a copy into the caller's memory and nothing is asynchronous.
//
// With one slot (slots = 1) a micro-batch's copies wait until the previous micro-batch's compute
// is done. The trainer takes one when a step is one micro-batch: its step() returns only after
// reading the gradient norm, which the device computes after that micro-batch's backward, so the
// next step's copies find the slot free and start at once, as with two, for half the memory.
//
// A step replayed as a CUDA graph (the trainer's Config::graph) reads every micro-batch's inputs
// at the addresses it was captured with: the trainer then gives micro-batch i slot i
// (begin_micro_batch_in), stages them all before the replay (set_staging: the compute stream is
// not told to wait for each copy; the trainer orders the replay after all of them), and compares
// the step's signature (each upload's slot, address and size, and what note() adds) with the
// captured one. While forward runs (close()), an upload is an error: a replay does not run it.
#pragma once

#include <alloy/backend/buffer.hpp>
#include <alloy/backend/cuda/handles.hpp>
#include <alloy/backend/pinned.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace alloy {

template <backend B>
class InputUploads;

// Host: nothing to overlap. upload() hands back the source itself, which outlives the micro-batch.
template <>
class InputUploads<Host> {
 public:
  explicit InputUploads(Host = {}, MemoryTracker* = nullptr, int = 2) {}
  void begin_micro_batch() {}
  void note(std::uint64_t) {}
  void end_micro_batch() {}
  void abandon_micro_batch() noexcept {}
  template <class T>
  const T* upload(std::span<const T> src) {
    return src.data();
  }
  std::size_t reserved_bytes() const noexcept { return 0; }
  std::size_t staging_bytes() const noexcept { return 0; }
};

#if ALLOY_HAS_CUDA_RUNTIME

namespace detail {

struct PinnedBytesDeleter {
  void operator()(std::byte* p) const noexcept { PinnedAllocator<std::byte>{}.deallocate(p, 0); }
};

}  // namespace detail

template <>
class InputUploads<Cuda> {
  using Event = CudaEvent;
  using PinnedBytes = std::unique_ptr<std::byte, detail::PinnedBytesDeleter>;

  struct Slot {
    std::vector<Buffer<std::byte, Cuda>> device;  // chunks; merged into one at the slot's next use
    std::size_t chunk = 0, offset = 0, used = 0, peak = 0;
    PinnedBytes staging;
    std::size_t staging_size = 0, staged = 0, staging_peak = 0;
    Event copied;    // on the copy stream: this slot's copies are done
    Event consumed;  // on the compute stream: the micro-batch that read this slot is done
    bool consumed_recorded = false;
    bool direct = false;  // copied straight from a caller's pinned memory this micro-batch
  };

 public:
  explicit InputUploads(Cuda compute = {}, MemoryTracker* tracker = nullptr, int slots = 2)
      : compute_(compute), tracker_(tracker) {
    if (slots < 1) throw error("InputUploads: " + std::to_string(slots) + " slots; at least 1");
    copy_ = make_cuda_stream();
    use_slots(slots);
    ready_ = make_cuda_event();
  }

  // At least n slots from the next micro-batch on (the round robin of begin_micro_batch() takes n).
  void use_slots(int n) {
    while (slots_.size() < static_cast<std::size_t>(n)) {
      Slot& slot = slots_.emplace_back();
      slot.copied = make_cuda_event();
      slot.consumed = make_cuda_event();
    }
    slots_in_use_ = n;
    if (current_ >= n) current_ = -1;
  }
  int slots() const noexcept { return slots_in_use_; }

  InputUploads(InputUploads&&) noexcept = default;
  InputUploads& operator=(InputUploads&&) noexcept = default;

  ~InputUploads() {
    // Copies still queued read staging memory and write device slots: let them finish first.
    wait_for_copies();
  }

  // Starts a micro-batch: takes the next slot, once the copies that last filled it (two
  // micro-batches ago, or the last one with a single slot) are done on the host's side and its
  // last reader is done on the device's.
  void begin_micro_batch() { begin_micro_batch_in((current_ + 1) % slots_in_use_); }

  // The same in slot `slot` (< slots()).
  void begin_micro_batch_in(int slot) {
    if (slot < 0 || slot >= slots_in_use_) {
      throw error("InputUploads: slot " + std::to_string(slot) + " of " + std::to_string(slots_in_use_));
    }
    current_ = slot;
    Slot& s = slots_[static_cast<std::size_t>(current_)];
    ALLOY_CUDA_CHECK(cudaEventSynchronize(s.copied.get()));  // staging free to refill
    if (s.consumed_recorded) ALLOY_CUDA_CHECK(cudaStreamWaitEvent(copy_.get(), s.consumed.get(), 0));
    if (s.device.size() > 1 || s.peak > capacity(s)) {
      // Grown last time: one chunk of the peak from now on. The old chunks are freed in the
      // compute stream's order, after their last reader.
      s.device.clear();
      s.device.emplace_back(std::max(s.peak, std::size_t(1) << 20), compute_, tracker_);
      allocated_on_compute();
    }
    s.chunk = s.offset = s.used = 0;
    s.staged = 0;
    s.direct = false;
  }

  // Ends the micro-batch: the compute stream has queued everything that reads the slot. Returns
  // once the copies from the caller's pinned memory are done, so the batch may be freed.
  void end_micro_batch() {
    Slot& s = slots_[static_cast<std::size_t>(current_)];
    record_for_waiters(s.consumed.get(), compute_.stream);  // by the graph each replay, when captured
    s.consumed_recorded = true;
    end_staging();
  }

  // The current micro-batch's uploads are all queued, and its compute is not (a step staged ahead
  // of its replay; end_micro_batch() marks the slot read when the replay has been queued).
  // Returns once the copies from the caller's pinned memory are done, unless told not to wait:
  // then the caller keeps the batch until wait_for_copies() or until it has waited for compute
  // queued after the copies (the trainer's staged steps, which launch before the copies finish).
  void end_staging(bool wait_for_pinned = true) {
    const Slot& s = slots_[static_cast<std::size_t>(current_)];
    if (wait_for_pinned && s.direct) ALLOY_CUDA_CHECK(cudaEventSynchronize(s.copied.get()));
  }
  // Every copy queued so far is done (on a path that gives up staged batches: they may be freed).
  void wait_for_copies() noexcept {
    if (copy_) (void)cudaStreamSynchronize(copy_.get());
  }

  // Staging ahead of a replay (on) or uploads the compute stream waits for one by one (off, as
  // always). On: each upload and note() is added to signature(), and the compute stream waits for
  // nothing until compute_waits_for_staged() or host_waits_for_staged().
  void set_staging(bool on) {
    staging_ = on;
    signature_.clear();
  }
  const std::vector<std::uint64_t>& signature() const noexcept { return signature_; }
  // A value of the micro-batch that the device work depends on other than through the uploaded
  // bytes (a count, a shape the sizes do not give), for the signature.
  void note(std::uint64_t value) {
    if (staging_) signature_.insert(signature_.end(), {~std::uint64_t(0), value});
  }
  // The compute stream waits for every staged copy (outside a capture: the replay is queued after).
  void compute_waits_for_staged() {
    ALLOY_CUDA_CHECK(cudaEventRecord(ready_.get(), copy_.get()));
    ALLOY_CUDA_CHECK(cudaStreamWaitEvent(compute_.stream, ready_.get(), 0));
  }
  // The host waits for every staged copy (the capture of a step reads them where they are).
  void host_waits_for_staged() { ALLOY_CUDA_CHECK(cudaStreamSynchronize(copy_.get())); }
  // While closed, upload() throws: forward must not upload when its step is captured and replayed.
  void close(bool closed) noexcept { closed_ = closed; }

  // A micro-batch that threw: its queued copies may still read the caller's memory, which is
  // about to go away; wait for them.
  void abandon_micro_batch() noexcept { wait_for_copies(); }

  // Copies src to device memory valid for the current micro-batch; the compute stream waits for
  // the copy before anything queued after this call.
  template <class T>
  const T* upload(std::span<const T> src) {
    static_assert(std::is_trivially_copyable_v<T>, "InputUploads::upload<T>: T must be trivially copyable");
    if (current_ < 0) throw error("InputUploads::upload: called outside a micro-batch (begin_micro_batch first)");
    if (closed_) {
      throw error(
          "InputUploads::upload: an upload during forward in a step captured as a CUDA graph (Trainer::Config::graph), "
          "which a replay would not repeat; upload the micro-batch's inputs in the model's stage(ctx, batch)");
    }
    Slot& s = slots_[static_cast<std::size_t>(current_)];
    const std::size_t bytes = src.size_bytes();
    std::byte* dst = take_device(s, bytes);
    if (bytes == 0) return reinterpret_cast<const T*>(dst);
    const void* from = src.data();
    if (is_pinned(src.data())) {
      s.direct = true;
    } else {
      std::byte* staging = take_staging(s, bytes);
      std::memcpy(staging, src.data(), bytes);
      from = staging;
    }
    ALLOY_CUDA_CHECK(cudaMemcpyAsync(dst, from, bytes, cudaMemcpyHostToDevice, copy_.get()));
    ALLOY_CUDA_CHECK(cudaEventRecord(s.copied.get(), copy_.get()));
    if (staging_) {
      signature_.insert(signature_.end(),
                        {std::uint64_t(current_), reinterpret_cast<std::uintptr_t>(dst), std::uint64_t(bytes)});
    } else {
      ALLOY_CUDA_CHECK(cudaStreamWaitEvent(compute_.stream, s.copied.get(), 0));
    }
    return reinterpret_cast<const T*>(dst);
  }

  // Device bytes the slots hold, and pinned staging bytes.
  std::size_t reserved_bytes() const noexcept {
    std::size_t n = 0;
    for (const auto& s : slots_) n += capacity(s);
    return n;
  }
  std::size_t staging_bytes() const noexcept {
    std::size_t n = 0;
    for (const auto& s : slots_) n += s.staging_size;
    return n;
  }

 private:
  static constexpr std::size_t alignment = 256;

  static std::size_t capacity(const Slot& s) noexcept {
    std::size_t n = 0;
    for (const auto& c : s.device) n += c.size();
    return n;
  }

  // A chunk allocated on the compute stream is used on the copy stream: order the copy stream after it.
  void allocated_on_compute() {
    ALLOY_CUDA_CHECK(cudaEventRecord(ready_.get(), compute_.stream));
    ALLOY_CUDA_CHECK(cudaStreamWaitEvent(copy_.get(), ready_.get(), 0));
  }

  std::byte* take_device(Slot& s, std::size_t bytes) {
    const std::size_t size = std::max(alignment, (bytes + alignment - 1) / alignment * alignment);
    while (s.chunk < s.device.size() && s.offset + size > s.device[s.chunk].size()) {
      s.used += s.device[s.chunk].size() - s.offset;
      ++s.chunk;
      s.offset = 0;
    }
    if (s.chunk == s.device.size()) {
      s.device.emplace_back(std::max(size, std::size_t(1) << 20), compute_, tracker_);
      allocated_on_compute();
    }
    std::byte* p = s.device[s.chunk].data() + s.offset;
    s.offset += size;
    s.used += size;
    s.peak = std::max(s.peak, s.used);
    return p;
  }

  std::byte* take_staging(Slot& s, std::size_t bytes) {
    const std::size_t size = (bytes + alignment - 1) / alignment * alignment;
    if (s.staged + size > s.staging_size) {
      // Everything staged so far in this micro-batch is still being copied from the old block.
      if (s.staged > 0) ALLOY_CUDA_CHECK(cudaStreamSynchronize(copy_.get()));
      const std::size_t grown = std::max({2 * s.staging_size, s.staged + size, s.staging_peak});
      s.staging.reset(PinnedAllocator<std::byte>{}.allocate(grown));
      s.staging_size = grown;
      // The earlier uploads of this micro-batch are copied already; the new block starts empty.
      s.staged = 0;
    }
    std::byte* p = s.staging.get() + s.staged;
    s.staged += size;
    s.staging_peak = std::max(s.staging_peak, s.staged);
    return p;
  }

  Cuda compute_;
  MemoryTracker* tracker_;
  CudaStream copy_;
  int slots_in_use_ = 2;
  std::vector<Slot> slots_;
  Event ready_;
  int current_ = -1;
  bool staging_ = false, closed_ = false;
  std::vector<std::uint64_t> signature_;
};

#endif  // ALLOY_HAS_CUDA_RUNTIME

}  // namespace alloy
