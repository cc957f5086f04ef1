// The C side of weaver-prof (see src/lib.rs): libtorch's Kineto profiler and the CUDA
// caching allocator's statistics, behind a C ABI. Every entry point catches C++
// exceptions and returns them as a message: nothing unwinds into Rust.

#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <set>
#include <string>
#include <unordered_set>

#include <atomic>

#include <ATen/record_function.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <kineto/ActivityType.h>
#include <torch/csrc/autograd/profiler_kineto.h>

namespace prof = torch::autograd::profiler;
namespace impl = torch::profiler::impl;

extern "C" {

// What one profiled region did. Mirrors `Counts` in src/lib.rs.
struct WeaverProfCounts {
  uint64_t aten_ops;         // ATen operator calls (dispatcher-level, nested included)
  uint64_t gpu_kernels;      // kernels that ran on a GPU (CUPTI)
  uint64_t gpu_memcpys;      // copies done by a GPU's copy engines
  uint64_t gpu_memsets;      // memsets on a GPU
  uint64_t kernel_launch_calls;  // host-side launch API calls (cudaLaunchKernel*, cuLaunchKernel*)
  uint64_t sync_calls;       // host-blocking runtime/driver calls (*Synchronize, cudaMemcpy)
  uint64_t events;           // every event the profiler returned
};

}  // extern "C"

namespace {

void set_error(char* err, size_t len, const char* what) {
  if (err == nullptr || len == 0) return;
  std::strncpy(err, what, len - 1);
  err[len - 1] = '\0';
}

bool starts_with(const std::string& s, const char* prefix) {
  return s.rfind(prefix, 0) == 0;
}

// Host calls that block until the device has caught up. cudaMemcpy without Async is
// synchronous; the *Async copies are not (libtorch follows a blocking D2H copy with a
// cudaStreamSynchronize, which is counted).
bool is_sync_call(const std::string& name) {
  return name.find("Synchronize") != std::string::npos || name == "cudaMemcpy" ||
         name == "cudaMemcpy2D" || name == "cuMemcpy" || name == "cuMemcpyDtoH_v2" ||
         name == "cuMemcpyHtoD_v2";
}

bool is_launch_call(const std::string& name) {
  return starts_with(name, "cudaLaunchKernel") || starts_with(name, "cuLaunchKernel") ||
         starts_with(name, "cudaLaunchCooperativeKernel") || name == "cudaGraphLaunch";
}

}  // namespace

extern "C" {

// Starts the Kineto profiler: CPU ops always, CUDA activities (kernels, copies, runtime
// and driver calls, via CUPTI) when `cuda` is non-zero. Returns 0 or -1 with `err` set.
int weaver_prof_start(int cuda, char* err, size_t err_len) {
  try {
    std::set<impl::ActivityType> activities{impl::ActivityType::CPU};
    if (cuda != 0) activities.insert(impl::ActivityType::CUDA);
    impl::ProfilerConfig config(impl::ProfilerState::KINETO);
    prof::prepareProfiler(config, activities);
    prof::enableProfiler(config, activities, {at::RecordScope::FUNCTION});
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return -1;
  } catch (...) {
    set_error(err, err_len, "unknown C++ exception in weaver_prof_start");
    return -1;
  }
}

// Stops the profiler started by weaver_prof_start and counts what it saw.
int weaver_prof_stop(WeaverProfCounts* out, char* err, size_t err_len) {
  try {
    std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();
    WeaverProfCounts c{};
    if (result) {
      for (const prof::KinetoEvent& e : result->events()) {
        c.events++;
        const auto kind = static_cast<libkineto::ActivityType>(e.activityType());
        switch (kind) {
          case libkineto::ActivityType::CPU_OP:
            if (e.scope() == static_cast<uint8_t>(at::RecordScope::FUNCTION) &&
                starts_with(e.name(), "aten::"))
              c.aten_ops++;
            break;
          case libkineto::ActivityType::CONCURRENT_KERNEL:
            c.gpu_kernels++;
            break;
          case libkineto::ActivityType::GPU_MEMCPY:
            c.gpu_memcpys++;
            break;
          case libkineto::ActivityType::GPU_MEMSET:
            c.gpu_memsets++;
            break;
          case libkineto::ActivityType::CUDA_RUNTIME:
          case libkineto::ActivityType::CUDA_DRIVER: {
            const std::string name = e.name();
            if (is_launch_call(name)) c.kernel_launch_calls++;
            if (is_sync_call(name)) c.sync_calls++;
            break;
          }
          default:
            break;
        }
      }
    }
    *out = c;
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return -1;
  } catch (...) {
    set_error(err, err_len, "unknown C++ exception in weaver_prof_stop");
    return -1;
  }
}

// The CUDA caching allocator's peak allocated and reserved bytes on `device` since the
// last reset (torch.cuda.max_memory_allocated / max_memory_reserved).
int weaver_cuda_memory_peak(int device, uint64_t* allocated, uint64_t* reserved, char* err,
                            size_t err_len) {
  try {
    auto* a = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    const auto stats = a->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = static_cast<uint64_t>(stats.allocated_bytes[all].peak);
    *reserved = static_cast<uint64_t>(stats.reserved_bytes[all].peak);
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return -1;
  } catch (...) {
    set_error(err, err_len, "unknown C++ exception in weaver_cuda_memory_peak");
    return -1;
  }
}

// torch.cuda.reset_peak_memory_stats(device).
int weaver_cuda_reset_peak(int device, char* err, size_t err_len) {
  try {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)
        ->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return -1;
  } catch (...) {
    set_error(err, err_len, "unknown C++ exception in weaver_cuda_reset_peak");
    return -1;
  }
}

// torch.cuda.empty_cache(): hands cached, unused blocks back to the driver.
int weaver_cuda_empty_cache(char* err, size_t err_len) {
  try {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->emptyCache();
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return -1;
  } catch (...) {
    set_error(err, err_len, "unknown C++ exception in weaver_cuda_empty_cache");
    return -1;
  }
}

// ---- Counted CPU memory -------------------------------------------------------------
//
// A CPU allocator that forwards to c10's own (alloc_cpu / free_cpu, what the default CPU
// allocator calls) and counts the bytes of every live allocation: each block carries its
// size in a header before the data, so a free on any thread subtracts exactly what was
// added. Installed once, process-wide, with a priority above the default's; blocks
// allocated before stay with the allocator that made them and are not counted.

}  // extern "C"

namespace {

// A multiple of c10's alignment (64 on x86-64 and aarch64 Linux), so the data stays
// aligned as the default allocator aligns it.
constexpr size_t kHeader = 64;

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};
std::atomic<uint64_t> g_allocations{0};

void counted_free(void* data) {
  if (data == nullptr) return;
  char* base = static_cast<char*>(data) - kHeader;
  size_t n = 0;
  std::memcpy(&n, base, sizeof n);
  g_current.fetch_sub(static_cast<int64_t>(n), std::memory_order_relaxed);
  c10::free_cpu(base);
}

struct CountingCpuAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* base = c10::alloc_cpu(n + kHeader);
    std::memcpy(base, &n, sizeof n);
    const int64_t now =
        g_current.fetch_add(static_cast<int64_t>(n), std::memory_order_relaxed) +
        static_cast<int64_t>(n);
    int64_t peak = g_peak.load(std::memory_order_relaxed);
    while (now > peak &&
           !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
    g_allocations.fetch_add(1, std::memory_order_relaxed);
    void* data = static_cast<char*>(base) + kHeader;
    return {data, data, &counted_free, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &counted_free; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

extern "C" {

// Installs the counting allocator as libtorch's CPU allocator (once; later calls do
// nothing). Returns 0 or -1 with `err` set.
int weaver_cpu_count_install(char* err, size_t err_len) {
  try {
    static CountingCpuAllocator* installed = [] {
      auto* a = new CountingCpuAllocator();  // lives as long as the process
      c10::SetCPUAllocator(a, /*priority=*/100);
      return a;
    }();
    if (c10::GetCPUAllocator() != installed) {
      set_error(err, err_len,
                "another CPU allocator with a higher priority is installed; counting is off");
      return -1;
    }
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return -1;
  } catch (...) {
    set_error(err, err_len, "unknown C++ exception in weaver_cpu_count_install");
    return -1;
  }
}

// Live bytes, their peak since the last reset, and allocations made so far.
void weaver_cpu_count_read(int64_t* current, int64_t* peak, uint64_t* allocations) {
  *current = g_current.load(std::memory_order_relaxed);
  *peak = g_peak.load(std::memory_order_relaxed);
  *allocations = g_allocations.load(std::memory_order_relaxed);
}

// Starts a new peak at the live bytes of now.
void weaver_cpu_count_reset_peak() {
  g_peak.store(g_current.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

}  // extern "C"
