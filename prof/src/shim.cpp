// The C side of weaver-prof (see src/lib.rs): libtorch's Kineto profiler and the CUDA
// caching allocator's statistics, behind a C ABI. Every entry point catches C++
// exceptions and returns them as a message: nothing unwinds into Rust.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>
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

// Each CPU operator's self time (its span less the spans of the operators it called, on
// the same thread), summed per name: "name\tcalls\tself_ns\n" lines, the table
// torch.profiler's key_averages() sorts by self CPU time.
std::string self_times(const std::vector<prof::KinetoEvent>& events) {
  struct Span {
    uint64_t start, end;
    std::string name;
    int64_t self;
  };
  std::map<uint64_t, std::vector<Span>> by_thread;
  for (const prof::KinetoEvent& e : events) {
    if (static_cast<libkineto::ActivityType>(e.activityType()) != libkineto::ActivityType::CPU_OP)
      continue;
    const uint64_t d = e.durationNs();
    by_thread[e.startThreadId()].push_back(
        Span{e.startNs(), e.startNs() + d, e.name(), static_cast<int64_t>(d)});
  }
  std::map<std::string, std::pair<uint64_t, int64_t>> total;
  for (auto& [tid, spans] : by_thread) {
    (void)tid;
    // Parents before their children: by start, the longer first.
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
      return a.start != b.start ? a.start < b.start : a.end > b.end;
    });
    std::vector<size_t> open;
    for (size_t i = 0; i < spans.size(); i++) {
      while (!open.empty() && spans[open.back()].end <= spans[i].start) open.pop_back();
      if (!open.empty()) spans[open.back()].self -= static_cast<int64_t>(spans[i].end - spans[i].start);
      open.push_back(i);
    }
    for (const Span& s : spans) {
      auto& t = total[s.name];
      t.first++;
      t.second += std::max<int64_t>(s.self, 0);
    }
  }
  std::string out;
  for (const auto& [name, t] : total) {
    out += name;
    out += '\t';
    out += std::to_string(t.first);
    out += '\t';
    out += std::to_string(t.second);
    out += '\n';
  }
  return out;
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

// Stops the profiler started by weaver_prof_start and counts what it saw. With `ops` non-null,
// *ops becomes a malloc'd, NUL-terminated table of each CPU operator's calls and self time
// (see self_times), for the caller to release with weaver_prof_free.
int weaver_prof_stop(WeaverProfCounts* out, char** ops, char* err, size_t err_len) {
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
    if (ops != nullptr) {
      const std::string table = result ? self_times(result->events()) : std::string();
      *ops = strdup(table.c_str());
      if (*ops == nullptr) throw std::bad_alloc();
    }
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return -1;
  } catch (...) {
    set_error(err, err_len, "unknown C++ exception in weaver_prof_stop");
    return -1;
  }
}

// Releases a table weaver_prof_stop returned.
void weaver_prof_free(char* p) { std::free(p); }

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

// The device's free and total memory in bytes (torch.cuda.mem_get_info).
int weaver_cuda_memory_info(int device, uint64_t* free_bytes, uint64_t* total_bytes, char* err,
                            size_t err_len) {
  try {
    const auto info = c10::getDeviceAllocator(c10::DeviceType::CUDA)
                          ->getMemoryInfo(static_cast<c10::DeviceIndex>(device));
    *free_bytes = static_cast<uint64_t>(info.first);
    *total_bytes = static_cast<uint64_t>(info.second);
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return -1;
  } catch (...) {
    set_error(err, err_len, "unknown C++ exception in weaver_cuda_memory_info");
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
// aligned as the default allocator aligns it. The header holds the block's size and the
// owner it was counted to.
constexpr size_t kHeader = 64;

// Owners: slot 0 counts allocations made by threads no owner claimed; slots 1.. are
// claimed by weaver_cpu_count_claim (one per rank that runs in this process).
constexpr int kOwners = 64;

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};
std::atomic<uint64_t> g_allocations{0};
std::atomic<int64_t> g_owner_current[kOwners];
std::atomic<int64_t> g_owner_peak[kOwners];
std::atomic<bool> g_owner_claimed[kOwners];
thread_local int t_owner = 0;

void raise_peak(std::atomic<int64_t>& peak_slot, int64_t now) {
  int64_t peak = peak_slot.load(std::memory_order_relaxed);
  while (now > peak &&
         !peak_slot.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

void counted_free(void* data) {
  if (data == nullptr) return;
  char* base = static_cast<char*>(data) - kHeader;
  size_t n = 0;
  int32_t owner = 0;
  std::memcpy(&n, base, sizeof n);
  std::memcpy(&owner, base + sizeof n, sizeof owner);
  g_current.fetch_sub(static_cast<int64_t>(n), std::memory_order_relaxed);
  if (owner >= 0 && owner < kOwners) {
    g_owner_current[owner].fetch_sub(static_cast<int64_t>(n), std::memory_order_relaxed);
  }
  c10::free_cpu(base);
}

struct CountingCpuAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* base = c10::alloc_cpu(n + kHeader);
    const int32_t owner = t_owner;
    std::memcpy(base, &n, sizeof n);
    std::memcpy(static_cast<char*>(base) + sizeof n, &owner, sizeof owner);
    const int64_t now =
        g_current.fetch_add(static_cast<int64_t>(n), std::memory_order_relaxed) +
        static_cast<int64_t>(n);
    raise_peak(g_peak, now);
    const int64_t mine =
        g_owner_current[owner].fetch_add(static_cast<int64_t>(n), std::memory_order_relaxed) +
        static_cast<int64_t>(n);
    raise_peak(g_owner_peak[owner], mine);
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

// Claims a free owner slot (1..63) and returns it, or 0 when all are taken. Its live
// bytes start at what is still counted to it (tensors of a previous holder that outlived
// it), its peak at that.
int weaver_cpu_count_claim() {
  for (int i = 1; i < kOwners; ++i) {
    bool expected = false;
    if (g_owner_claimed[i].compare_exchange_strong(expected, true)) {
      g_owner_peak[i].store(g_owner_current[i].load(std::memory_order_relaxed),
                            std::memory_order_relaxed);
      return i;
    }
  }
  return 0;
}

// Frees an owner slot (tensors counted to it stay counted to it until freed).
void weaver_cpu_count_release(int owner) {
  if (owner > 0 && owner < kOwners) g_owner_claimed[owner].store(false);
}

// Owner slots claimed now.
int weaver_cpu_count_claimed() {
  int n = 0;
  for (int i = 1; i < kOwners; ++i) n += g_owner_claimed[i].load() ? 1 : 0;
  return n;
}

// Counts this thread's allocations from now on to `owner` (0: to no owner).
void weaver_cpu_count_set_thread_owner(int owner) {
  t_owner = (owner > 0 && owner < kOwners) ? owner : 0;
}

// Live bytes counted to `owner` and their peak since its last reset.
void weaver_cpu_count_read_owner(int owner, int64_t* current, int64_t* peak) {
  if (owner < 0 || owner >= kOwners) {
    *current = 0;
    *peak = 0;
    return;
  }
  *current = g_owner_current[owner].load(std::memory_order_relaxed);
  *peak = g_owner_peak[owner].load(std::memory_order_relaxed);
}

// Starts `owner`'s new peak at its live bytes of now.
void weaver_cpu_count_reset_owner_peak(int owner) {
  if (owner < 0 || owner >= kOwners) return;
  g_owner_peak[owner].store(g_owner_current[owner].load(std::memory_order_relaxed),
                            std::memory_order_relaxed);
}

}  // extern "C"
