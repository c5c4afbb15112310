// A timeline of a CUDA program without Nsight Systems (not on the GPU machines): a CUPTI
// activity tracer loaded by the CUDA driver into any program through CUDA_INJECTION64_PATH.
// It records every kernel, memcpy, memset and synchronization on the device and every CUDA
// runtime call on the host (start and end in ns on one clock, and the correlation id that ties
// a launch call to the kernel it launched), and writes them as CSV at exit:
//   kind,name,start,end,stream,correlation,bytes
//
//   g++ -O2 -shared -fPIC scripts/probes/cupti_trace.cpp -I/usr/local/cuda/include
//     -L/usr/local/cuda/lib64 -lcupti -o libcupti_trace.so   (one line)
//   CUDA_INJECTION64_PATH=$PWD/libcupti_trace.so ALLOY_TRACE=trace.csv build/gpu/examples/alloy_mlp ...
//   python3 scripts/trace_table.py trace.csv <kernel that starts a step>
#include <cupti.h>
#include <cxxabi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

namespace {

constexpr std::size_t buffer_bytes = 16u << 20;
std::FILE* out = nullptr;
std::mutex out_mutex;

#define TRACE_CHECK(call)                                                                 \
  do {                                                                                    \
    CUptiResult r_ = (call);                                                              \
    if (r_ != CUPTI_SUCCESS) {                                                            \
      const char* s_ = nullptr;                                                           \
      cuptiGetResultString(r_, &s_);                                                      \
      std::fprintf(stderr, "cupti_trace: %s failed: %s\n", #call, s_ ? s_ : "(unknown)"); \
    }                                                                                     \
  } while (0)

// Kernel names can hold commas (template arguments): quote them.
void write_row(const char* kind, const char* name, unsigned long long start, unsigned long long end, unsigned stream,
               unsigned correlation, unsigned long long bytes) {
  std::string n = name ? name : "";
  if (n.rfind("_Z", 0) == 0) {
    int status = 0;
    char* d = abi::__cxa_demangle(n.c_str(), nullptr, nullptr, &status);
    if (status == 0 && d) n = d;
    std::free(d);
  }
  for (char& c : n)
    if (c == '"') c = '\'';
  std::fprintf(out, "%s,\"%s\",%llu,%llu,%u,%u,%llu\n", kind, n.c_str(), start, end, stream, correlation, bytes);
}

void CUPTIAPI requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, buffer_bytes));
  *size = buffer_bytes;
  *max_records = 0;
}

void CUPTIAPI completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(out_mutex);
  CUpti_Activity* record = nullptr;
  while (out && cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    switch (record->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
      case CUPTI_ACTIVITY_KIND_KERNEL: {
        auto* k = reinterpret_cast<CUpti_ActivityKernel10*>(record);
        write_row("kernel", k->name, k->start, k->end, k->streamId, k->correlationId, 0);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        auto* m = reinterpret_cast<CUpti_ActivityMemcpy6*>(record);
        const char* kinds[] = {"unknown", "HtoD", "DtoH", "HtoA", "AtoH", "AtoA", "AtoD", "DtoA", "DtoD", "HtoH"};
        write_row("memcpy", m->copyKind < 10 ? kinds[m->copyKind] : "other", m->start, m->end, m->streamId,
                  m->correlationId, m->bytes);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        auto* m = reinterpret_cast<CUpti_ActivityMemset4*>(record);
        write_row("memset", "memset", m->start, m->end, m->streamId, m->correlationId, m->bytes);
        break;
      }
      case CUPTI_ACTIVITY_KIND_SYNCHRONIZATION: {
        auto* s = reinterpret_cast<CUpti_ActivitySynchronization2*>(record);
        const char* types[] = {"unknown", "event_synchronize", "stream_wait_event", "stream_synchronize",
                               "context_synchronize"};
        write_row("sync", s->type < 5 ? types[s->type] : "other", s->start, s->end, s->streamId, s->correlationId, 0);
        break;
      }
      case CUPTI_ACTIVITY_KIND_RUNTIME:
      case CUPTI_ACTIVITY_KIND_DRIVER: {
        auto* a = reinterpret_cast<CUpti_ActivityAPI*>(record);
        const char* name = nullptr;
        cuptiGetCallbackName(record->kind == CUPTI_ACTIVITY_KIND_RUNTIME ? CUPTI_CB_DOMAIN_RUNTIME_API
                                                                         : CUPTI_CB_DOMAIN_DRIVER_API,
                             a->cbid, &name);
        write_row(record->kind == CUPTI_ACTIVITY_KIND_RUNTIME ? "runtime" : "driver", name, a->start, a->end,
                  a->threadId & 0xffffffffu, a->correlationId, 0);
        break;
      }
      default:
        break;
    }
  }
  std::free(buffer);
}

void finish() {
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  std::lock_guard<std::mutex> lock(out_mutex);
  if (out) {
    std::fclose(out);
    out = nullptr;
  }
}

}  // namespace

extern "C" int InitializeInjection() {
  const char* path = std::getenv("ALLOY_TRACE");
  out = std::fopen(path ? path : "trace.csv", "w");
  if (!out) {
    std::perror("cupti_trace: cannot open the output");
    return 0;
  }
  std::fprintf(out, "kind,name,start,end,stream,correlation,bytes\n");
  TRACE_CHECK(cuptiActivityRegisterCallbacks(requested, completed));
  TRACE_CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL));
  TRACE_CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY));
  TRACE_CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET));
  TRACE_CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_SYNCHRONIZATION));
  TRACE_CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME));
  std::atexit(finish);
  return 1;
}
