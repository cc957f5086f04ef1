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

#include <ATen/record_function.h>
#include <c10/core/CachingDeviceAllocator.h>
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

}  // extern "C"
