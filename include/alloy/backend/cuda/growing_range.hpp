// GrowingDeviceRange: device memory at one address that grows in place (the CUDA driver's virtual
// memory management: a range of addresses reserved once, physical memory mapped onto its end as
// it is needed). The activation workspace uses it on Cuda, so its first steps take no more memory
// than the later ones: a stack that has to grow into a new block keeps the old one (its
// allocations live on), and the blocks' sum exceeds the peak until they are merged; a range that
// grows in place never holds more than the peak, rounded up to the mapping granularity (2 MiB on
// the H200). PyTorch's allocator has the same idea as `expandable_segments`.
//
// The driver's calls are found through the runtime (cudaGetDriverEntryPointByVersion), so nothing
// links libcuda. Where the device or the driver lacks them, supported() is false and the caller
// keeps its blocks.
#pragma once

#include <alloy/config.hpp>

#if ALLOY_HAS_CUDA_RUNTIME

#include <alloy/backend/memory_tracker.hpp>
#include <alloy/backend/tags.hpp>
#include <alloy/error.hpp>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

namespace alloy::detail {

// The driver's virtual memory calls, or ok == false where the driver does not have them.
struct DriverVmm {
  CUresult (*reserve)(CUdeviceptr*, std::size_t, std::size_t, CUdeviceptr, unsigned long long) = nullptr;
  CUresult (*free_addresses)(CUdeviceptr, std::size_t) = nullptr;
  CUresult (*create)(CUmemGenericAllocationHandle*, std::size_t, const CUmemAllocationProp*,
                     unsigned long long) = nullptr;
  CUresult (*release)(CUmemGenericAllocationHandle) = nullptr;
  CUresult (*map)(CUdeviceptr, std::size_t, std::size_t, CUmemGenericAllocationHandle, unsigned long long) = nullptr;
  CUresult (*unmap)(CUdeviceptr, std::size_t) = nullptr;
  CUresult (*set_access)(CUdeviceptr, std::size_t, const CUmemAccessDesc*, std::size_t) = nullptr;
  CUresult (*granularity)(std::size_t*, const CUmemAllocationProp*, CUmemAllocationGranularity_flags) = nullptr;
  CUresult (*error_string)(CUresult, const char**) = nullptr;
  CUresult (*device_get)(CUdevice*, int) = nullptr;
  CUresult (*device_attribute)(int*, CUdevice_attribute, CUdevice) = nullptr;
  bool ok = false;
};

inline const DriverVmm& driver_vmm() {
  static const DriverVmm api = [] {
    DriverVmm a;
    const auto find = [](const char* name, auto& fn) {
      void* p = nullptr;
      cudaDriverEntryPointQueryResult found{};
      if (cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &found) != cudaSuccess ||
          found != cudaDriverEntryPointSuccess || p == nullptr) {
        (void)cudaGetLastError();
        return false;
      }
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
      return true;
    };
    a.ok = find("cuMemAddressReserve", a.reserve) && find("cuMemAddressFree", a.free_addresses) &&
           find("cuMemCreate", a.create) && find("cuMemRelease", a.release) && find("cuMemMap", a.map) &&
           find("cuMemUnmap", a.unmap) && find("cuMemSetAccess", a.set_access) &&
           find("cuMemGetAllocationGranularity", a.granularity) && find("cuGetErrorString", a.error_string) &&
           find("cuDeviceGet", a.device_get) && find("cuDeviceGetAttribute", a.device_attribute);
    return a;
  }();
  return api;
}

inline void check_driver(CUresult r, const char* call, const std::string& what) {
  if (r == CUDA_SUCCESS) return;
  const char* text = nullptr;
  if (driver_vmm().error_string == nullptr || driver_vmm().error_string(r, &text) != CUDA_SUCCESS || !text) {
    text = "unknown driver error";
  }
  throw cuda_error(call, __FILE__, __LINE__, static_cast<int>(r), what + ": " + text);
}

inline CUmemAllocationProp device_allocation(int device) {
  CUmemAllocationProp p{};
  p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  p.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  p.location.id = device;
  return p;
}

class GrowingDeviceRange {
 public:
  // Whether the current device and the driver support growing in place.
  static bool supported() {
    const DriverVmm& d = driver_vmm();
    if (!d.ok) return false;
    int ordinal = 0, vmm = 0;
    if (cudaGetDevice(&ordinal) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    CUdevice device{};
    return d.device_get(&device, ordinal) == CUDA_SUCCESS &&
           d.device_attribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, device) == CUDA_SUCCESS &&
           vmm != 0;
  }

  // Reserves addresses for as much memory as the current device has (nothing is mapped yet).
  // Memory is used on be.stream: the destructor waits for it before unmapping.
  explicit GrowingDeviceRange(Cuda be, MemoryTracker* tracker = nullptr)
      : be_(be), tracker_(tracker ? tracker : &default_memory_tracker<Cuda>()) {
    const DriverVmm& d = driver_vmm();
    if (!d.ok) throw error("GrowingDeviceRange: the driver has no virtual memory management calls");
    check_cuda(cudaGetDevice(&device_), "cudaGetDevice", __FILE__, __LINE__);
    const CUmemAllocationProp prop = device_allocation(device_);
    check_driver(d.granularity(&granularity_, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
                 "cuMemGetAllocationGranularity", "the workspace's mapping granularity");
    std::size_t free_bytes = 0, total = 0;
    check_cuda(cudaMemGetInfo(&free_bytes, &total), "cudaMemGetInfo", __FILE__, __LINE__);
    reserved_ = round_up(total);
    check_driver(d.reserve(&base_, reserved_, granularity_, 0, 0), "cuMemAddressReserve",
                 "reserving " + std::to_string(reserved_) + " bytes of addresses for the workspace");
  }

  GrowingDeviceRange(const GrowingDeviceRange&) = delete;
  GrowingDeviceRange& operator=(const GrowingDeviceRange&) = delete;

  ~GrowingDeviceRange() {
    const DriverVmm& d = driver_vmm();
    if (!chunks_.empty()) (void)cudaStreamSynchronize(be_.stream);  // queued work may still use it
    std::size_t offset = 0;
    for (const Chunk& c : chunks_) {
      (void)d.unmap(base_ + offset, c.bytes);
      (void)d.release(c.handle);
      tracker_->on_free(c.bytes);
      offset += c.bytes;
    }
    if (base_ != 0) (void)d.free_addresses(base_, reserved_);
  }

  std::byte* data() const noexcept { return reinterpret_cast<std::byte*>(base_); }
  std::size_t size() const noexcept { return mapped_; }
  std::size_t granularity() const noexcept { return granularity_; }

  // Maps memory onto the end until size() >= bytes (a multiple of the granularity). On failure
  // (out of memory, or more than the device has) throws cuda_error and maps nothing.
  void grow_to(std::size_t bytes) {
    if (bytes <= mapped_) return;
    const std::size_t target = round_up(bytes);
    if (target > reserved_) {
      throw cuda_error("GrowingDeviceRange::grow_to", __FILE__, __LINE__, int(CUDA_ERROR_OUT_OF_MEMORY),
                       "the workspace needs " + std::to_string(bytes) + " bytes, more than the device's " +
                           std::to_string(reserved_));
    }
    const DriverVmm& d = driver_vmm();
    const std::size_t add = target - mapped_;
    const CUmemAllocationProp prop = device_allocation(device_);
    CUmemGenericAllocationHandle handle{};
    check_driver(d.create(&handle, add, &prop, 0), "cuMemCreate",
                 "growing the workspace by " + std::to_string(add) + " bytes to " + std::to_string(target));
    const CUresult mapped = d.map(base_ + mapped_, add, 0, handle, 0);
    if (mapped != CUDA_SUCCESS) {
      (void)d.release(handle);
      check_driver(mapped, "cuMemMap", "mapping the workspace's growth");
    }
    CUmemAccessDesc access{};
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    const CUresult allowed = d.set_access(base_ + mapped_, add, &access, 1);
    if (allowed != CUDA_SUCCESS) {
      (void)d.unmap(base_ + mapped_, add);
      (void)d.release(handle);
      check_driver(allowed, "cuMemSetAccess", "opening the workspace's growth to the device");
    }
    chunks_.push_back({handle, add});
    mapped_ = target;
    tracker_->on_allocate(add);
  }

 private:
  struct Chunk {
    CUmemGenericAllocationHandle handle;
    std::size_t bytes;
  };

  std::size_t round_up(std::size_t bytes) const noexcept {
    return (bytes + granularity_ - 1) / granularity_ * granularity_;
  }

  Cuda be_;
  MemoryTracker* tracker_;
  int device_ = 0;
  std::size_t granularity_ = 0, reserved_ = 0, mapped_ = 0;
  CUdeviceptr base_ = 0;
  std::vector<Chunk> chunks_;
};

}  // namespace alloy::detail

#endif  // ALLOY_HAS_CUDA_RUNTIME
