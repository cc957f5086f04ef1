//! Counted, not estimated: what one region of tensor work made libtorch do, and how much
//! CUDA memory it held at its peak. For benchmarks (worker/examples/model_bench, bench/gpu).
//!
//! * [`count`] runs a closure under libtorch's Kineto profiler (the engine behind
//!   `torch.profiler`) and counts its events: ATen operator calls on every device, and on
//!   CUDA, through CUPTI, the kernels that ran on the GPU, its copies and memsets, the
//!   host's kernel-launch calls and the host calls that block on the device
//!   (`cudaStreamSynchronize`, `cudaDeviceSynchronize`, `cudaEventSynchronize`, blocking
//!   `cudaMemcpy`). Backward passes are counted too: the autograd engine carries the
//!   profiler's state to its device threads.
//! * [`cuda_memory`] reads and resets the CUDA caching allocator's peak (the figure
//!   `torch.cuda.max_memory_allocated` reports), through libtorch's device-allocator
//!   interface, so no CUDA headers are needed to build.
//! * [`cpu_memory`] counts the bytes of live CPU tensors and their peak, through a CPU
//!   allocator installed in libtorch's place (a CPU has no caching allocator to ask).
//!
//! libtorch exposes neither in its C API, so a small C++ shim (src/shim.cpp, compiled by
//! build.rs against the linked torch's headers) calls them; every exception it meets comes
//! back as a [`ProfError`].
//!
//! Profiling slows the region it watches: time a step without it, and count a separate one.

use std::ffi::{c_char, c_int, CStr};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfError {
    /// The profiler would not start or stop (libtorch's message).
    #[error("libtorch's profiler failed: {0}")]
    Profiler(String),
    /// A profile is already being taken in this process (libtorch allows one at a time).
    #[error("a profile is already being taken in this process; stop it first")]
    Busy,
    /// The CUDA caching allocator could not be queried (no CUDA device, or libtorch_cuda
    /// is not loaded: link it with `-Wl,--no-as-needed -ltorch_cuda`).
    #[error("the CUDA caching allocator is not available: {0}")]
    CudaAllocator(String),
    /// The counting CPU allocator could not be installed (libtorch's message).
    #[error("the counting CPU allocator could not be installed: {0}")]
    CpuAllocator(String),
    /// The work inside [`count`] failed.
    #[error("the profiled work failed: {0}")]
    Work(String),
}

/// Events of one profiled region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// ATen operator calls recorded by the dispatcher, nested calls included
    /// (`aten::linear` and the `aten::addmm` it calls are two), on every thread that ran
    /// the work (the autograd engine's too).
    pub aten_ops: u64,
    /// Kernels that ran on a GPU (0 on a CPU run).
    pub gpu_kernels: u64,
    /// Copies done by a GPU's copy engines (host↔device, device↔device).
    pub gpu_memcpys: u64,
    /// Memsets on a GPU.
    pub gpu_memsets: u64,
    /// Host-side kernel-launch API calls (`cudaLaunchKernel*`, `cuLaunchKernel*`,
    /// `cudaGraphLaunch`).
    pub kernel_launch_calls: u64,
    /// Host calls that block until the device catches up (`*Synchronize`, blocking
    /// `cudaMemcpy`).
    pub sync_calls: u64,
    /// Every event the profiler returned.
    pub events: u64,
}

/// One CPU operator's share of a profiled region: its calls and its self time (its own
/// span less the operators it called), what `torch.profiler`'s `key_averages()` sorts by
/// "self CPU".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpTime {
    /// The operator's name (`aten::mm`, `autograd::engine::evaluate_function: ...`).
    pub name: String,
    /// How many times it ran.
    pub calls: u64,
    /// Its summed self time.
    pub self_ns: u64,
}

/// Parses the shim's table: `name\tcalls\tself_ns` lines, slowest first.
fn parse_ops(table: &str) -> Vec<OpTime> {
    let mut ops: Vec<OpTime> = table
        .lines()
        .filter_map(|l| {
            let mut f = l.rsplitn(3, '\t');
            let self_ns = f.next()?.parse().ok()?;
            let calls = f.next()?.parse().ok()?;
            Some(OpTime {
                name: f.next()?.to_string(),
                calls,
                self_ns,
            })
        })
        .collect();
    ops.sort_by(|a, b| b.self_ns.cmp(&a.self_ns).then_with(|| a.name.cmp(&b.name)));
    ops
}

/// Mirrors `WeaverProfCounts` in src/shim.cpp.
#[repr(C)]
#[derive(Default)]
struct RawCounts {
    aten_ops: u64,
    gpu_kernels: u64,
    gpu_memcpys: u64,
    gpu_memsets: u64,
    kernel_launch_calls: u64,
    sync_calls: u64,
    events: u64,
}

extern "C" {
    fn weaver_prof_start(cuda: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn weaver_prof_stop(
        out: *mut RawCounts,
        ops: *mut *mut c_char,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn weaver_prof_free(p: *mut c_char);
    fn weaver_cuda_memory_peak(
        device: c_int,
        allocated: *mut u64,
        reserved: *mut u64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn weaver_cuda_reset_peak(device: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn weaver_cuda_memory_info(
        device: c_int,
        free: *mut u64,
        total: *mut u64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn weaver_cuda_empty_cache(err: *mut c_char, err_len: usize) -> c_int;
    fn weaver_cpu_count_install(err: *mut c_char, err_len: usize) -> c_int;
    fn weaver_cpu_count_read(current: *mut i64, peak: *mut i64, allocations: *mut u64);
    fn weaver_cpu_count_reset_peak();
    fn weaver_cpu_count_claim() -> c_int;
    fn weaver_cpu_count_release(owner: c_int);
    fn weaver_cpu_count_claimed() -> c_int;
    fn weaver_cpu_count_set_thread_owner(owner: c_int);
    fn weaver_cpu_count_read_owner(owner: c_int, current: *mut i64, peak: *mut i64);
    fn weaver_cpu_count_reset_owner_peak(owner: c_int);
}

const ERR_LEN: usize = 1024;

/// Calls a shim function with an error buffer; a non-zero return becomes `wrap(message)`.
fn call(
    wrap: fn(String) -> ProfError,
    f: impl FnOnce(*mut c_char, usize) -> c_int,
) -> Result<(), ProfError> {
    let mut buf = [0 as c_char; ERR_LEN];
    if f(buf.as_mut_ptr(), ERR_LEN) == 0 {
        return Ok(());
    }
    // SAFETY: the shim writes a NUL-terminated string of at most ERR_LEN bytes
    // (strncpy with an explicit terminator), and the buffer starts zeroed.
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Err(wrap(msg.to_string_lossy().into_owned()))
}

static RUNNING: AtomicBool = AtomicBool::new(false);

/// A profile being taken. libtorch keeps the profiler's state per thread, so it must be
/// stopped on the thread that started it: this type is neither `Send` nor `Sync`.
#[derive(Debug)]
pub struct Profiling {
    stopped: bool,
    _same_thread: PhantomData<*const ()>,
}

/// Starts a profile of the work this thread (and the autograd engine on its behalf) does
/// from now on; `cuda` also collects GPU activity through CUPTI.
pub fn start(cuda: bool) -> Result<Profiling, ProfError> {
    if RUNNING.swap(true, Ordering::SeqCst) {
        return Err(ProfError::Busy);
    }
    // SAFETY: the shim catches every C++ exception; the buffer outlives the call.
    let started = call(ProfError::Profiler, |e, n| unsafe {
        weaver_prof_start(c_int::from(cuda), e, n)
    });
    if started.is_err() {
        RUNNING.store(false, Ordering::SeqCst);
    }
    started.map(|()| Profiling {
        stopped: false,
        _same_thread: PhantomData,
    })
}

impl Profiling {
    /// Stops the profile and counts its events. On CUDA, synchronize the device first, or
    /// kernels still queued are missed.
    pub fn stop(self) -> Result<Counts, ProfError> {
        self.finish(false).map(|(c, _)| c)
    }

    /// As [`Profiling::stop`], with each CPU operator's calls and self time, slowest first.
    pub fn stop_with_ops(self) -> Result<(Counts, Vec<OpTime>), ProfError> {
        self.finish(true)
    }

    fn finish(mut self, want_ops: bool) -> Result<(Counts, Vec<OpTime>), ProfError> {
        self.stopped = true;
        let mut raw = RawCounts::default();
        let mut table: *mut c_char = std::ptr::null_mut();
        let ops_out: *mut *mut c_char = if want_ops {
            &mut table
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: `raw` is a valid RawCounts for the shim to fill and `ops_out` null or a
        // valid out-pointer; exceptions are caught.
        let r = call(ProfError::Profiler, |e, n| unsafe {
            weaver_prof_stop(&mut raw, ops_out, e, n)
        });
        RUNNING.store(false, Ordering::SeqCst);
        r?;
        let ops = if table.is_null() {
            Vec::new()
        } else {
            // SAFETY: the shim returned a NUL-terminated malloc'd string, released once here.
            let text = unsafe { CStr::from_ptr(table) }
                .to_string_lossy()
                .into_owned();
            unsafe { weaver_prof_free(table) };
            parse_ops(&text)
        };
        let counts = Counts {
            aten_ops: raw.aten_ops,
            gpu_kernels: raw.gpu_kernels,
            gpu_memcpys: raw.gpu_memcpys,
            gpu_memsets: raw.gpu_memsets,
            kernel_launch_calls: raw.kernel_launch_calls,
            sync_calls: raw.sync_calls,
            events: raw.events,
        };
        Ok((counts, ops))
    }
}

impl Drop for Profiling {
    fn drop(&mut self) {
        if !self.stopped {
            let mut raw = RawCounts::default();
            // SAFETY: as in `stop`; the result is discarded (the profile was abandoned).
            let _ = call(ProfError::Profiler, |e, n| unsafe {
                weaver_prof_stop(&mut raw, std::ptr::null_mut(), e, n)
            });
            RUNNING.store(false, Ordering::SeqCst);
        }
    }
}

/// Runs `work` under the profiler and returns its result with the counts. On CUDA the
/// device is synchronized before the profile stops, so every kernel the work queued is
/// counted. A failing `work` stops the profile and returns [`ProfError::Work`].
pub fn count<T, E: std::fmt::Display>(
    cuda_device: Option<usize>,
    work: impl FnOnce() -> Result<T, E>,
) -> Result<(T, Counts), ProfError> {
    let p = start(cuda_device.is_some())?;
    let out = work();
    if let Some(d) = cuda_device {
        tch::Cuda::synchronize(d as i64);
    }
    let counts = p.stop()?;
    let out = out.map_err(|e| ProfError::Work(e.to_string()))?;
    Ok((out, counts))
}

/// As [`count`], with each CPU operator's calls and self time ([`OpTime`]), slowest first:
/// where the region's host time went.
pub fn count_ops<T, E: std::fmt::Display>(
    cuda_device: Option<usize>,
    work: impl FnOnce() -> Result<T, E>,
) -> Result<(T, Counts, Vec<OpTime>), ProfError> {
    let p = start(cuda_device.is_some())?;
    let out = work();
    if let Some(d) = cuda_device {
        tch::Cuda::synchronize(d as i64);
    }
    let (counts, ops) = p.stop_with_ops()?;
    let out = out.map_err(|e| ProfError::Work(e.to_string()))?;
    Ok((out, counts, ops))
}

/// The CUDA caching allocator's statistics (what `torch.cuda.max_memory_allocated` and
/// friends read).
pub mod cuda_memory {
    use super::*;

    /// Peak bytes since the last [`reset_peak`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Peak {
        /// Peak bytes in allocated tensors (`torch.cuda.max_memory_allocated`).
        pub allocated: u64,
        /// Peak bytes the allocator held from the driver (`max_memory_reserved`).
        pub reserved: u64,
    }

    /// The peak on `device` since the last reset.
    pub fn peak(device: usize) -> Result<Peak, ProfError> {
        let (mut allocated, mut reserved) = (0u64, 0u64);
        // SAFETY: two valid u64 out-pointers; exceptions are caught by the shim.
        call(ProfError::CudaAllocator, |e, n| unsafe {
            weaver_cuda_memory_peak(device as c_int, &mut allocated, &mut reserved, e, n)
        })?;
        Ok(Peak {
            allocated,
            reserved,
        })
    }

    /// The device's free and total memory in bytes (`torch.cuda.mem_get_info`).
    pub fn info(device: usize) -> Result<(u64, u64), ProfError> {
        let (mut free, mut total) = (0u64, 0u64);
        // SAFETY: two valid u64 out-pointers; exceptions are caught by the shim.
        call(ProfError::CudaAllocator, |e, n| unsafe {
            weaver_cuda_memory_info(device as c_int, &mut free, &mut total, e, n)
        })?;
        Ok((free, total))
    }

    /// Starts a new peak on `device` (`torch.cuda.reset_peak_memory_stats`).
    pub fn reset_peak(device: usize) -> Result<(), ProfError> {
        // SAFETY: exceptions are caught by the shim.
        call(ProfError::CudaAllocator, |e, n| unsafe {
            weaver_cuda_reset_peak(device as c_int, e, n)
        })
    }

    /// Returns cached, unused blocks to the driver (`torch.cuda.empty_cache`), so that
    /// another process on the same GPU can have them.
    pub fn empty_cache() -> Result<(), ProfError> {
        // SAFETY: exceptions are caught by the shim.
        call(ProfError::CudaAllocator, |e, n| unsafe {
            weaver_cuda_empty_cache(e, n)
        })
    }
}

/// Counted CPU memory: the bytes of live CPU tensors (every storage libtorch allocates on
/// the CPU, on any thread of the process), their high-water mark, and the allocations made.
///
/// [`install`] puts a counting allocator in place of libtorch's CPU allocator; it forwards
/// to c10's own `alloc_cpu`/`free_cpu` (what the default allocator calls) and keeps each
/// block's size in a 64-byte header, so a free on any thread subtracts what was added.
/// Install it before the tensors to be counted exist: storages allocated earlier belong to
/// the allocator that made them and are never counted. What is *not* counted: memory
/// libraries take outside libtorch's allocator (oneDNN scratch space, BLAS workspaces,
/// Rust `Vec`s such as the tcp backend's staging buffers), allocator slack and the process's
/// code and stacks — this is the figure of the tensors themselves, the one CUDA's
/// `max_memory_allocated` gives for a GPU.
///
/// **Owners.** Several ranks of a job may run as threads of one process (the tests do):
/// an [`Owner`] claimed by a rank and set on its thread counts every allocation that thread
/// makes to the rank (each block remembers its owner, so a free on any thread subtracts
/// from the right one), with its own live bytes and peak. Allocations on threads no owner
/// was set on (a data loader's, libtorch's intra-op pool's) count to no owner; they are in
/// the process-wide figures only.
pub mod cpu_memory {
    use super::*;

    /// What the counter says now.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Reading {
        /// Bytes in live CPU tensor storages.
        pub current: u64,
        /// The most there were at once since the last [`reset_peak`] (or [`install`]).
        pub peak: u64,
        /// Allocations counted since [`install`].
        pub allocations: u64,
    }

    /// Installs the counting CPU allocator (idempotent). Fails if another allocator with
    /// a higher priority holds libtorch's CPU slot.
    pub fn install() -> Result<(), ProfError> {
        // SAFETY: the shim catches every C++ exception; the buffer outlives the call.
        call(ProfError::CpuAllocator, |e, n| unsafe {
            weaver_cpu_count_install(e, n)
        })
    }

    /// The current reading (zeros before [`install`]).
    pub fn read() -> Reading {
        let (mut current, mut peak, mut allocations) = (0i64, 0i64, 0u64);
        // SAFETY: three valid out-pointers; the shim only loads atomics.
        unsafe { weaver_cpu_count_read(&mut current, &mut peak, &mut allocations) };
        Reading {
            current: current.max(0) as u64,
            peak: peak.max(0) as u64,
            allocations,
        }
    }

    /// Starts a new peak at the bytes live now.
    pub fn reset_peak() {
        // SAFETY: the shim only stores an atomic.
        unsafe { weaver_cpu_count_reset_peak() }
    }

    /// A claimed owner slot (see the module docs); released on drop.
    #[derive(Debug)]
    pub struct Owner {
        slot: c_int,
    }

    impl Owner {
        /// Claims a free slot; `None` when all 63 are taken.
        pub fn claim() -> Option<Owner> {
            // SAFETY: the shim only touches atomics.
            let slot = unsafe { weaver_cpu_count_claim() };
            (slot > 0).then_some(Owner { slot })
        }

        /// Counts the calling thread's allocations to this owner from now on.
        pub fn enter(&self) {
            // SAFETY: sets a thread-local int.
            unsafe { weaver_cpu_count_set_thread_owner(self.slot) }
        }

        /// Live bytes counted to this owner and their peak since its last reset.
        pub fn read(&self) -> (u64, u64) {
            let (mut current, mut peak) = (0i64, 0i64);
            // SAFETY: two valid out-pointers; the shim only loads atomics.
            unsafe { weaver_cpu_count_read_owner(self.slot, &mut current, &mut peak) };
            (current.max(0) as u64, peak.max(0) as u64)
        }

        /// Starts this owner's new peak at its live bytes of now.
        pub fn reset_peak(&self) {
            // SAFETY: the shim only stores an atomic.
            unsafe { weaver_cpu_count_reset_owner_peak(self.slot) }
        }
    }

    impl Drop for Owner {
        fn drop(&mut self) {
            // SAFETY: the shim only stores atomics; the thread-local of the dropping thread
            // is cleared if it still names this slot's number (another thread's tag stays
            // until it sets its own, and then counts to whoever claims the slot next).
            unsafe {
                weaver_cpu_count_set_thread_owner(0);
                weaver_cpu_count_release(self.slot);
            }
        }
    }

    /// Owner slots claimed now in this process.
    pub fn claimed() -> usize {
        // SAFETY: the shim only loads atomics.
        unsafe { weaver_cpu_count_claimed() }.max(0) as usize
    }
}
