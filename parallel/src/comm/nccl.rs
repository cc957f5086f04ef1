//! The `nccl` backend: NCCL collectives on CUDA tensors, with NCCL and the CUDA driver both
//! loaded at run time, so that weaver builds and runs on machines without CUDA and says
//! plainly ([`CommError::Unavailable`]) what is missing.
//!
//! * **Loading.** cudarc (feature `dynamic-loading`) supplies the CUDA driver API and NCCL's
//!   types. NCCL itself is resolved here by [`NcclLibrary`], because cudarc only looks for
//!   `libnccl.so` while the pip package (`nvidia-nccl-cu13`) ships `libnccl.so.2`. Tried in
//!   order: `$WEAVER_NCCL_LIB` (a file or a folder; when set, nothing else is tried),
//!   `libnccl.so.2` and `libnccl.so` on the loader's path (`LD_LIBRARY_PATH`, ldconfig),
//!   then the `nvidia/nccl/lib` folder of the Python environment (`$VIRTUAL_ENV`, the venv
//!   of `$WEAVER_PYTHON`, and the torch this binary was built against).
//! * **Threads.** Each communicator lives on its own owner thread, which alone touches the
//!   NCCL handle, its CUDA stream and events (STYLE: keep each NCCL communicator on its
//!   owning thread); the public [`NcclComm`] sends it jobs and waits for the answer.
//! * **Streams.** Work runs on the communicator's own non-blocking stream, ordered after
//!   everything already queued on the legacy default stream (which libtorch uses) by an
//!   event; calls return when the GPU has finished, so later libtorch kernels see the
//!   result. Different communicators (groups) use different streams and run concurrently.
//! * **Timeouts and abort.** Communicators are created non-blocking
//!   (`ncclConfig_t.blocking = 0`); the owner polls completion and NCCL's asynchronous error
//!   until the deadline, then calls `ncclCommAbort`. `abort()` sets a flag the owner polls
//!   and wakes it, so `ncclCommAbort` runs within milliseconds even mid-collective.
//! * **Semantics** follow the trait; uneven `all_gather` / `reduce_scatter` use grouped
//!   broadcasts / reduces. NCCL sends no headers, so a point-to-point size or dtype mismatch
//!   between ranks cannot be detected: it corrupts or times out. Data-movement operations
//!   accept any dtype (moved as bytes); reductions take f32, f64, bf16, f16, i64, i32, i8
//!   and u8.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::result as cu;
use cudarc::driver::sys as cusys;
use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclUniqueId};
use tch::{Device, Kind, Tensor};

use super::{shard_range, CommError, Communicator, P2POp, ReduceOp};
use crate::store::Store;

type Stream = *mut c_void;

/// NCCL's C API, resolved from the library file at run time. Enums travel as plain
/// integers so that a newer library returning a code these bindings do not know is no
/// undefined behaviour.
struct Fns {
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> c_int,
    init_rank_config: unsafe extern "C" fn(
        *mut ncclComm_t,
        c_int,
        ncclUniqueId,
        c_int,
        *mut ncclConfig_t,
    ) -> c_int,
    split:
        unsafe extern "C" fn(ncclComm_t, c_int, c_int, *mut ncclComm_t, *mut ncclConfig_t) -> c_int,
    abort: unsafe extern "C" fn(ncclComm_t) -> c_int,
    async_error: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    last_error: unsafe extern "C" fn(ncclComm_t) -> *const c_char,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        ncclComm_t,
        Stream,
    ) -> c_int,
    all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, ncclComm_t, Stream) -> c_int,
    reduce_scatter: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        ncclComm_t,
        Stream,
    ) -> c_int,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        ncclComm_t,
        Stream,
    ) -> c_int,
    reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        c_int,
        ncclComm_t,
        Stream,
    ) -> c_int,
    send: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, ncclComm_t, Stream) -> c_int,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, ncclComm_t, Stream) -> c_int,
    group_start: unsafe extern "C" fn() -> c_int,
    group_end: unsafe extern "C" fn() -> c_int,
}

const NCCL_SUCCESS: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;
const NCCL_SPLIT_NOCOLOR: c_int = -1;
const NCCL_UINT8: c_int = 1;

/// A loaded NCCL library.
pub struct NcclLibrary {
    path: String,
    version: c_int,
    f: Fns,
    // Keeps the code behind `f` mapped; declared last so it is dropped last.
    _lib: libloading::Library,
}

impl fmt::Debug for NcclLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclLibrary")
            .field("path", &self.path)
            .field("version", &self.version_string())
            .finish()
    }
}

impl NcclLibrary {
    /// Loads NCCL from `path` (a file name the dynamic loader searches for, or a path).
    pub fn open(path: &str) -> Result<NcclLibrary, CommError> {
        // SAFETY: loading a shared library runs its initializers; NCCL's are benign.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| CommError::Unavailable(format!("cannot load NCCL from {path}: {e}")))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol is NCCL's C function of that name, whose signature
                // (nccl.h) is the one of the field it is stored in.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.map_err(|e| {
                    CommError::Unavailable(format!(
                        "{path} lacks {} (NCCL 2.18 or newer is required): {e}",
                        $name
                    ))
                })?
            };
        }
        let f = Fns {
            get_version: sym!("ncclGetVersion"),
            get_unique_id: sym!("ncclGetUniqueId"),
            init_rank_config: sym!("ncclCommInitRankConfig"),
            split: sym!("ncclCommSplit"),
            abort: sym!("ncclCommAbort"),
            async_error: sym!("ncclCommGetAsyncError"),
            error_string: sym!("ncclGetErrorString"),
            last_error: sym!("ncclGetLastError"),
            all_reduce: sym!("ncclAllReduce"),
            all_gather: sym!("ncclAllGather"),
            reduce_scatter: sym!("ncclReduceScatter"),
            broadcast: sym!("ncclBroadcast"),
            reduce: sym!("ncclReduce"),
            send: sym!("ncclSend"),
            recv: sym!("ncclRecv"),
            group_start: sym!("ncclGroupStart"),
            group_end: sym!("ncclGroupEnd"),
        };
        let mut version: c_int = 0;
        // SAFETY: writes one int.
        let rc = unsafe { (f.get_version)(&mut version) };
        if rc != NCCL_SUCCESS {
            return Err(CommError::Unavailable(format!(
                "{path}: ncclGetVersion failed ({rc})"
            )));
        }
        Ok(NcclLibrary {
            path: path.to_string(),
            version,
            f,
            _lib: lib,
        })
    }

    /// The process-wide NCCL, found as the module documentation says (loaded once).
    pub fn load() -> Result<&'static NcclLibrary, CommError> {
        static LIB: OnceLock<Result<NcclLibrary, String>> = OnceLock::new();
        LIB.get_or_init(|| {
            let mut tried = Vec::new();
            for c in NcclLibrary::candidates() {
                match NcclLibrary::open(&c) {
                    Ok(lib) => return Ok(lib),
                    Err(e) => tried.push(e.to_string()),
                }
            }
            Err(format!(
                "libnccl not found ({}); set WEAVER_NCCL_LIB to libnccl.so.2 (pip package \
                 nvidia-nccl-cu13: site-packages/nvidia/nccl/lib) or add its folder to \
                 LD_LIBRARY_PATH",
                tried.join("; ")
            ))
        })
        .as_ref()
        .map_err(|e| CommError::Unavailable(e.clone()))
    }

    /// Where [`NcclLibrary::load`] looks, in order.
    pub fn candidates() -> Vec<String> {
        if let Some(explicit) = std::env::var_os("WEAVER_NCCL_LIB") {
            let p = PathBuf::from(explicit);
            return if p.is_dir() {
                vec![p.join("libnccl.so.2"), p.join("libnccl.so")]
            } else {
                vec![p]
            }
            .into_iter()
            .map(|p| p.display().to_string())
            .collect();
        }
        let mut out = vec!["libnccl.so.2".to_string(), "libnccl.so".to_string()];
        let mut envs: Vec<PathBuf> = Vec::new();
        if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
            envs.push(v.into());
        }
        if let Some(py) = std::env::var_os("WEAVER_PYTHON") {
            if let Some(root) = Path::new(&py).parent().and_then(Path::parent) {
                envs.push(root.to_path_buf());
            }
        }
        for env in envs {
            let Ok(dir) = std::fs::read_dir(env.join("lib")) else {
                continue;
            };
            for py in dir
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            {
                let f = py.path().join("site-packages/nvidia/nccl/lib/libnccl.so.2");
                if f.exists() {
                    out.push(f.display().to_string());
                }
            }
        }
        if let Some(torch_lib) = option_env!("WEAVER_TORCH_LIB_DIR") {
            let f = Path::new(torch_lib).join("../../nvidia/nccl/lib/libnccl.so.2");
            if f.exists() {
                out.push(f.display().to_string());
            }
        }
        out.dedup();
        out
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// NCCL's version, e.g. `"2.28.9"`.
    pub fn version_string(&self) -> String {
        let v = self.version;
        format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
    }

    fn error(&self, op: &'static str, code: c_int, comm: ncclComm_t) -> CommError {
        // SAFETY: NCCL returns static strings (or null); comm may be null for last_error.
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        let what = text(unsafe { (self.f.error_string)(code) });
        let last = text(unsafe { (self.f.last_error)(comm) });
        CommError::Device {
            op,
            message: format!("NCCL error {code} ({what}) {last}"),
        }
    }

    fn check(&self, op: &'static str, code: c_int, comm: ncclComm_t) -> Result<(), CommError> {
        if code == NCCL_SUCCESS || code == NCCL_IN_PROGRESS {
            Ok(())
        } else {
            Err(self.error(op, code, comm))
        }
    }
}

fn cuda_err(op: &'static str, e: cu::DriverError) -> CommError {
    CommError::Device {
        op,
        message: format!("CUDA error {:?}", e.0),
    }
}

/// NCCL's data type code for reductions.
fn reduce_type(kind: Kind) -> Option<c_int> {
    Some(match kind {
        Kind::Int8 => 0,
        Kind::Uint8 => 1,
        Kind::Int => 2,
        Kind::Int64 => 4,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::BFloat16 => 9,
        _ => return None,
    })
}

fn red_op(op: ReduceOp) -> c_int {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Max => 2,
        ReduceOp::Min => 3,
        ReduceOp::Avg => 4,
    }
}

/// An NCCL communicator handle. NCCL lets a communicator be used from any thread as long as
/// no two threads use it at once; a `RawComm` is handed to its owner thread once (after
/// `ncclCommInitRank` or `ncclCommSplit` completed) and only that thread touches it.
struct RawComm(ncclComm_t);

// SAFETY: moving the handle to another thread is allowed by NCCL (see above); the type is
// not Sync and never shared.
unsafe impl Send for RawComm {}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Job = Box<dyn FnOnce(&mut Owner) + Send>;

enum Msg {
    Run(Job),
    Abort,
    Close,
}

/// Shared between a communicator, its owner thread and the groups split from it.
struct Control {
    aborted: AtomicBool,
    timeout_ns: AtomicU64,
    wake: Mutex<mpsc::Sender<Msg>>,
    children: Mutex<Vec<Weak<Control>>>,
}

impl Control {
    fn timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout_ns.load(Ordering::SeqCst))
    }

    fn set_timeout(&self, t: Duration) {
        self.timeout_ns
            .store(t.as_nanos().min(u64::MAX as u128) as u64, Ordering::SeqCst);
        for c in lock(&self.children).iter().filter_map(Weak::upgrade) {
            c.set_timeout(t);
        }
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        let _ = lock(&self.wake).send(Msg::Abort);
        for c in lock(&self.children).iter().filter_map(Weak::upgrade) {
            c.abort();
        }
    }
}

/// Everything that lives on the owner thread.
struct Owner {
    lib: &'static NcclLibrary,
    comm: ncclComm_t,
    stream: cusys::CUstream,
    before: cusys::CUevent,
    after: cusys::CUevent,
    device: cusys::CUdevice,
    ctl: Arc<Control>,
    /// Set once the handle was aborted (by `abort()`, a timeout or an error).
    dead: Option<String>,
}

impl Owner {
    /// Makes the device's primary context (the one libtorch uses) current on this thread
    /// and creates the stream and events.
    fn on_device(
        lib: &'static NcclLibrary,
        ordinal: usize,
        comm: ncclComm_t,
        ctl: Arc<Control>,
    ) -> Result<Owner, CommError> {
        let op = "cuda setup";
        let device = cu::device::get(ordinal as c_int).map_err(|e| cuda_err(op, e))?;
        // SAFETY: retaining and setting the primary context of a valid device.
        unsafe {
            let ctx = cu::primary_ctx::retain(device).map_err(|e| cuda_err(op, e))?;
            cu::ctx::set_current(ctx).map_err(|e| cuda_err(op, e))?;
        }
        let stream =
            cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(|e| cuda_err(op, e))?;
        let flags = cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let before = cu::event::create(flags).map_err(|e| cuda_err(op, e))?;
        let after = cu::event::create(flags).map_err(|e| cuda_err(op, e))?;
        Ok(Owner {
            lib,
            comm,
            stream,
            before,
            after,
            device,
            ctl,
            dead: None,
        })
    }

    fn usable(&self) -> Result<(), CommError> {
        if self.ctl.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted);
        }
        match &self.dead {
            Some(cause) => Err(CommError::Broken {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn kill(&mut self, cause: &CommError) {
        if self.dead.is_none() && !self.comm.is_null() {
            // SAFETY: aborting our own live handle; it is not used afterwards.
            unsafe { (self.lib.f.abort)(self.comm) };
        }
        self.dead.get_or_insert_with(|| cause.to_string());
    }

    /// Waits until `comm` has no NCCL call in progress (non-blocking mode), or fails.
    fn settle(
        &mut self,
        op: &'static str,
        comm: ncclComm_t,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), CommError> {
        let mut spins = 0u32;
        loop {
            let mut state: c_int = NCCL_SUCCESS;
            // SAFETY: comm is a live handle owned by this thread.
            let rc = unsafe { (self.lib.f.async_error)(comm, &mut state) };
            self.lib.check(op, rc, comm)?;
            if state == NCCL_SUCCESS {
                return Ok(());
            }
            if state != NCCL_IN_PROGRESS {
                return Err(self.lib.error(op, state, comm));
            }
            self.pause(op, &mut spins, deadline, timeout)?;
        }
    }

    /// One polling step: fails on abort or deadline, else backs off briefly. (CUDA has no
    /// wait-with-timeout on events, so completion is polled, as PyTorch's watchdog does.)
    fn pause(
        &self,
        op: &'static str,
        spins: &mut u32,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), CommError> {
        if self.ctl.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted);
        }
        if Instant::now() >= deadline {
            return Err(CommError::Timeout { op, after: timeout });
        }
        *spins += 1;
        if *spins < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(u64::from((*spins).min(1000))));
        }
        Ok(())
    }

    /// Queues NCCL work on the stream after the default stream's pending work, waits for
    /// completion, and turns any failure into an aborted handle.
    fn exec(
        &mut self,
        op: &'static str,
        deadline: Instant,
        timeout: Duration,
        enqueue: impl FnOnce(&NcclLibrary, ncclComm_t, Stream) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        self.usable()?;
        let result = self.exec_inner(op, deadline, timeout, enqueue);
        if let Err(e) = &result {
            self.kill(e);
        }
        result
    }

    fn exec_inner(
        &mut self,
        op: &'static str,
        deadline: Instant,
        timeout: Duration,
        enqueue: impl FnOnce(&NcclLibrary, ncclComm_t, Stream) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        // SAFETY: our own events and stream; the null stream is libtorch's default stream.
        unsafe {
            cu::event::record(self.before, cu::stream::null()).map_err(|e| cuda_err(op, e))?;
            cu::stream::wait_event(
                self.stream,
                self.before,
                cusys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(|e| cuda_err(op, e))?;
        }
        enqueue(self.lib, self.comm, self.stream.cast())?;
        self.settle(op, self.comm, deadline, timeout)?;
        // SAFETY: as above.
        unsafe { cu::event::record(self.after, self.stream) }.map_err(|e| cuda_err(op, e))?;
        let mut spins = 0u32;
        loop {
            // SAFETY: our own event.
            match unsafe { cu::event::query(self.after) } {
                Ok(()) => return Ok(()),
                Err(e) if e.0 == cusys::cudaError_enum::CUDA_ERROR_NOT_READY => {}
                Err(e) => return Err(cuda_err(op, e)),
            }
            let mut state: c_int = NCCL_SUCCESS;
            // SAFETY: live handle.
            let rc = unsafe { (self.lib.f.async_error)(self.comm, &mut state) };
            self.lib.check(op, rc, self.comm)?;
            if state != NCCL_SUCCESS && state != NCCL_IN_PROGRESS {
                return Err(self.lib.error(op, state, self.comm));
            }
            self.pause(op, &mut spins, deadline, timeout)?;
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        // Abort rather than finalize: it never waits on peers, and a communicator is only
        // dropped once the work on it is over.
        if self.dead.is_none() && !self.comm.is_null() {
            // SAFETY: our handle, not used afterwards.
            unsafe { (self.lib.f.abort)(self.comm) };
        }
        // SAFETY: our own stream and events; the primary context was retained once.
        unsafe {
            let _ = cu::event::destroy(self.before);
            let _ = cu::event::destroy(self.after);
            let _ = cu::stream::destroy(self.stream);
            let _ = cu::primary_ctx::release(self.device);
        }
    }
}

fn owner_loop(rx: mpsc::Receiver<Msg>, mut owner: Owner) {
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Run(job) => job(&mut owner),
            Msg::Abort => owner.kill(&CommError::Aborted),
            Msg::Close => break,
        }
    }
}

/// The nccl communicator. See the module documentation.
pub struct NcclComm {
    rank: usize,
    members: Vec<usize>,
    device: usize,
    ctl: Arc<Control>,
    tx: mpsc::Sender<Msg>,
    /// One call at a time (the trait's rule); also keeps job order = call order.
    call: Mutex<()>,
    owner: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("size", &self.members.len())
            .field("device", &self.device)
            .finish()
    }
}

/// Extra time the caller waits for the owner's answer beyond the deadline the owner
/// enforces itself (covers an NCCL call that blocks despite non-blocking mode).
const GRACE: Duration = Duration::from_secs(10);

fn nonblocking_config() -> ncclConfig_t {
    // NCCL_CONFIG_INITIALIZER: size, magic, version, then every field "undefined".
    const UNDEF: c_int = c_int::MIN;
    ncclConfig_t {
        size: std::mem::size_of::<ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 22800,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

/// Checks that NCCL, the CUDA driver and device `device` are all there.
fn check_available(device: usize) -> Result<&'static NcclLibrary, CommError> {
    let lib = NcclLibrary::load()?;
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { cusys::is_culib_present() } {
        return Err(CommError::Unavailable(format!(
            "NCCL {} found at {}, but no NVIDIA driver (libcuda.so.1): this machine has no usable GPU",
            lib.version_string(),
            lib.path()
        )));
    }
    cu::init().map_err(|e| {
        CommError::Unavailable(format!("CUDA driver failed to initialize: {:?}", e.0))
    })?;
    let count =
        cu::device::get_count().map_err(|e| CommError::Unavailable(format!("CUDA: {:?}", e.0)))?;
    if device >= count.max(0) as usize {
        return Err(CommError::Unavailable(format!(
            "no CUDA device {device}: {count} visible"
        )));
    }
    Ok(lib)
}

impl NcclComm {
    /// Joins the world communicator of `size` processes as `rank` on CUDA device
    /// `device_index`. Rank 0 creates NCCL's unique id and publishes it in `store` under
    /// `{prefix}/weaver/nccl/uid`; the others read it (within `timeout`). Fails with
    /// [`CommError::Unavailable`] when NCCL, the driver or the device is missing.
    pub fn new(
        store: Arc<dyn Store>,
        prefix: &str,
        rank: usize,
        size: usize,
        device_index: usize,
        timeout: Duration,
    ) -> Result<NcclComm, CommError> {
        if size == 0 || rank >= size {
            return Err(CommError::InvalidArgument(format!(
                "rank {rank} of a world of {size}"
            )));
        }
        let lib = check_available(device_index)?;
        let key = format!("{prefix}/weaver/nccl/uid");
        let mut uid = ncclUniqueId { internal: [0; 128] };
        if rank == 0 {
            // SAFETY: writes the 128-byte id.
            lib.check(
                "ncclGetUniqueId",
                unsafe { (lib.f.get_unique_id)(&mut uid) },
                std::ptr::null_mut(),
            )?;
            let bytes: Vec<u8> = uid.internal.iter().map(|&c| c as u8).collect();
            store.set(&key, &bytes)?;
        } else {
            let bytes = store.get(&key, timeout)?;
            if bytes.len() != 128 {
                return Err(CommError::Protocol(format!(
                    "{key} holds {} bytes, not an NCCL id",
                    bytes.len()
                )));
            }
            for (d, s) in uid.internal.iter_mut().zip(bytes) {
                *d = s as c_char;
            }
        }
        let deadline = Instant::now() + timeout;
        NcclComm::spawn(
            rank,
            (0..size).collect(),
            device_index,
            timeout,
            move |ctl| {
                let mut owner = Owner::on_device(lib, device_index, std::ptr::null_mut(), ctl)?;
                let mut comm: ncclComm_t = std::ptr::null_mut();
                let mut config = nonblocking_config();
                // SAFETY: valid out pointer, id and config; CUDA context current on this thread.
                let rc = unsafe {
                    (lib.f.init_rank_config)(
                        &mut comm,
                        size as c_int,
                        uid,
                        rank as c_int,
                        &mut config,
                    )
                };
                lib.check("ncclCommInitRankConfig", rc, comm)?;
                owner.comm = comm;
                if let Err(e) = owner.settle("ncclCommInitRankConfig", comm, deadline, timeout) {
                    owner.kill(&e);
                    return Err(e);
                }
                Ok(owner)
            },
        )
    }

    /// Starts the owner thread, which builds its [`Owner`] with `init`, then serves jobs.
    fn spawn(
        rank: usize,
        members: Vec<usize>,
        device: usize,
        timeout: Duration,
        init: impl FnOnce(Arc<Control>) -> Result<Owner, CommError> + Send + 'static,
    ) -> Result<NcclComm, CommError> {
        let (tx, rx) = mpsc::channel();
        let ctl = Arc::new(Control {
            aborted: AtomicBool::new(false),
            timeout_ns: AtomicU64::new(timeout.as_nanos().min(u64::MAX as u128) as u64),
            wake: Mutex::new(tx.clone()),
            children: Mutex::new(Vec::new()),
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let c = ctl.clone();
        let thread = std::thread::Builder::new()
            .name(format!("weaver-nccl-{rank}"))
            .spawn(move || match init(c) {
                Ok(owner) => {
                    let _ = ready_tx.send(Ok(()));
                    owner_loop(rx, owner);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| CommError::Io {
                op: "nccl init",
                source: e,
            })?;
        let comm = NcclComm {
            rank,
            members,
            device,
            ctl,
            tx,
            call: Mutex::new(()),
            owner: Mutex::new(Some(thread)),
        };
        match ready_rx.recv_timeout(timeout + GRACE) {
            Ok(Ok(())) => Ok(comm),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                comm.abort();
                Err(CommError::Timeout {
                    op: "nccl init",
                    after: timeout,
                })
            }
        }
    }

    /// Runs `job` on the owner thread and waits for its answer.
    fn submit<T: Send + 'static>(
        &self,
        op: &'static str,
        job: impl FnOnce(&mut Owner, Instant, Duration) -> Result<T, CommError> + Send + 'static,
    ) -> Result<T, CommError> {
        if self.ctl.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted);
        }
        let _one_at_a_time = lock(&self.call);
        let timeout = self.ctl.timeout();
        let deadline = Instant::now() + timeout;
        let (tx, rx) = mpsc::channel();
        let _span = tracing::trace_span!("collective", backend = "nccl", op).entered();
        self.tx
            .send(Msg::Run(Box::new(move |o: &mut Owner| {
                let _ = tx.send(job(o, deadline, timeout));
            })))
            .map_err(|_| CommError::Broken {
                cause: "the NCCL owner thread is gone".into(),
            })?;
        match rx.recv_timeout(timeout + GRACE) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(CommError::Timeout { op, after: timeout }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(CommError::Broken {
                cause: "the NCCL owner thread is gone".into(),
            }),
        }
    }

    /// A contiguous view of a tensor on this communicator's device.
    fn view(&self, op: &'static str, t: &Tensor) -> Result<(Tensor, bool), CommError> {
        let got = t.device();
        if got != self.device() {
            return Err(CommError::WrongDevice {
                op,
                expected: self.device(),
                got,
            });
        }
        Ok(if t.is_contiguous() {
            (t.shallow_clone(), false)
        } else {
            (t.f_contiguous()?, true)
        })
    }

    fn dtype(op: &'static str, t: &Tensor) -> Result<c_int, CommError> {
        reduce_type(t.kind()).ok_or_else(|| {
            CommError::InvalidArgument(format!(
                "{op}: cannot reduce {:?} tensors with NCCL",
                t.kind()
            ))
        })
    }
}

fn bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// Rows of `t` and elements per row.
fn rows(t: &Tensor) -> (usize, usize) {
    let s = t.size();
    let r = s.first().copied().unwrap_or(0).max(0) as usize;
    (r, s.iter().skip(1).product::<i64>().max(0) as usize)
}

fn check_parts(
    op: &'static str,
    part: &Tensor,
    full: &Tensor,
    want_rows: usize,
) -> Result<usize, CommError> {
    if part.kind() != full.kind() {
        return Err(CommError::DtypeMismatch {
            op,
            expected: full.kind(),
            got: part.kind(),
        });
    }
    let (ps, fs) = (part.size(), full.size());
    if ps.is_empty() || ps.len() != fs.len() || ps[1..] != fs[1..] || ps[0] as usize != want_rows {
        return Err(CommError::SizeMismatch {
            op,
            detail: format!(
                "this rank's part must be {want_rows} rows of {fs:?} (shard_range), got {ps:?}"
            ),
        });
    }
    Ok(rows(full).1)
}

impl Communicator for NcclComm {
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn device(&self) -> Device {
        Device::Cuda(self.device)
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn world_rank(&self, rank: usize) -> usize {
        self.members[rank]
    }

    fn timeout(&self) -> Duration {
        self.ctl.timeout()
    }

    fn set_timeout(&self, timeout: Duration) {
        self.ctl.set_timeout(timeout);
    }

    fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        let name = "all_reduce";
        let dt = Self::dtype(name, tensor)?;
        let (work, copied) = self.view(name, tensor)?;
        let w = work.shallow_clone();
        self.submit(name, move |o, deadline, timeout| {
            let (p, n) = (w.data_ptr(), w.numel());
            o.exec(name, deadline, timeout, |lib, comm, s| {
                // SAFETY: p is the device buffer of a live contiguous tensor of n elements.
                lib.check(
                    name,
                    unsafe { (lib.f.all_reduce)(p, p, n, dt, red_op(op), comm, s) },
                    comm,
                )
            })
        })?;
        if copied {
            tensor.f_copy_(&work)?;
        }
        Ok(())
    }

    fn all_gather(&self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        let name = "all_gather";
        let (n, r) = (self.size(), self.rank);
        let (inp, _) = self.view(name, input)?;
        let (out, copied) = self.view(name, output)?;
        let total_rows = rows(&out).0;
        let row = check_parts(name, &inp, &out, shard_range(total_rows, n, r).len())?;
        let es = out.kind().elt_size_in_bytes();
        let (i2, o2) = (inp.shallow_clone(), out.shallow_clone());
        self.submit(name, move |o, deadline, timeout| {
            let (ip, op) = (i2.data_ptr(), o2.data_ptr().cast::<u8>());
            o.exec(name, deadline, timeout, |lib, comm, s| {
                if total_rows.is_multiple_of(n) {
                    let count = bytes(&i2);
                    // SAFETY: device buffers of live tensors; output holds n * count bytes.
                    return lib.check(
                        name,
                        unsafe { (lib.f.all_gather)(ip, op.cast(), count, NCCL_UINT8, comm, s) },
                        comm,
                    );
                }
                // Uneven rows: one broadcast per rank, grouped.
                // SAFETY: group calls on our handle; every pointer lies inside the output.
                lib.check(name, unsafe { (lib.f.group_start)() }, comm)?;
                for p in 0..n {
                    let seg = shard_range(total_rows, n, p);
                    let (off, len) = (seg.start * row * es, seg.len() * row * es);
                    if len == 0 {
                        continue;
                    }
                    let dst = unsafe { op.add(off) };
                    let src = if p == r {
                        ip.cast_const()
                    } else {
                        dst.cast_const().cast()
                    };
                    let rc = unsafe {
                        (lib.f.broadcast)(src, dst.cast(), len, NCCL_UINT8, p as c_int, comm, s)
                    };
                    lib.check(name, rc, comm)?;
                }
                lib.check(name, unsafe { (lib.f.group_end)() }, comm)
            })
        })?;
        if copied {
            output.f_copy_(&out)?;
        }
        Ok(())
    }

    fn reduce_scatter(
        &self,
        input: &Tensor,
        output: &mut Tensor,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let name = "reduce_scatter";
        let (n, r) = (self.size(), self.rank);
        let dt = Self::dtype(name, input)?;
        let (inp, _) = self.view(name, input)?;
        let (out, copied) = self.view(name, output)?;
        let total_rows = rows(&inp).0;
        let row = check_parts(name, &out, &inp, shard_range(total_rows, n, r).len())?;
        let es = inp.kind().elt_size_in_bytes();
        let (i2, o2) = (inp.shallow_clone(), out.shallow_clone());
        self.submit(name, move |o, deadline, timeout| {
            let (ip, op_) = (i2.data_ptr().cast::<u8>(), o2.data_ptr());
            o.exec(name, deadline, timeout, |lib, comm, s| {
                if total_rows.is_multiple_of(n) {
                    let count = o2.numel();
                    // SAFETY: device buffers of live tensors; input holds n * count elements.
                    return lib.check(
                        name,
                        unsafe {
                            (lib.f.reduce_scatter)(ip.cast(), op_, count, dt, red_op(op), comm, s)
                        },
                        comm,
                    );
                }
                // Uneven rows: one reduce per rank to that rank, grouped.
                lib.check(name, unsafe { (lib.f.group_start)() }, comm)?;
                for p in 0..n {
                    let seg = shard_range(total_rows, n, p);
                    let count = seg.len() * row;
                    if count == 0 {
                        continue;
                    }
                    // SAFETY: inside the input; the receive buffer is only used on the root.
                    let src = unsafe { ip.add(seg.start * row * es) };
                    let dst = if p == r { op_ } else { src.cast() };
                    let rc = unsafe {
                        (lib.f.reduce)(src.cast(), dst, count, dt, red_op(op), p as c_int, comm, s)
                    };
                    lib.check(name, rc, comm)?;
                }
                lib.check(name, unsafe { (lib.f.group_end)() }, comm)
            })
        })?;
        if copied {
            output.f_copy_(&out)?;
        }
        Ok(())
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CommError> {
        let name = "broadcast";
        if root >= self.size() {
            return Err(CommError::InvalidArgument(format!(
                "broadcast: root {root} of {} ranks",
                self.size()
            )));
        }
        let (work, copied) = self.view(name, tensor)?;
        let w = work.shallow_clone();
        self.submit(name, move |o, deadline, timeout| {
            let (p, b) = (w.data_ptr(), bytes(&w));
            o.exec(name, deadline, timeout, |lib, comm, s| {
                // SAFETY: device buffer of a live tensor of b bytes.
                lib.check(
                    name,
                    unsafe { (lib.f.broadcast)(p, p, b, NCCL_UINT8, root as c_int, comm, s) },
                    comm,
                )
            })
        })?;
        if copied {
            tensor.f_copy_(&work)?;
        }
        Ok(())
    }

    fn batch_p2p(&self, ops: &mut [P2POp<'_>]) -> Result<(), CommError> {
        let name = "send/recv";
        let mut jobs = Vec::with_capacity(ops.len());
        for o in ops.iter() {
            let (t, peer, send) = match o {
                P2POp::Send { tensor, peer } => (&**tensor, *peer, true),
                P2POp::Recv { tensor, peer } => (&**tensor, *peer, false),
            };
            if peer >= self.size() || peer == self.rank {
                return Err(CommError::InvalidArgument(format!(
                    "{name}: peer {peer} of {} (no self messages)",
                    self.size()
                )));
            }
            let (v, copied) = self.view(name, t)?;
            jobs.push((v, copied, peer, send));
        }
        let list: Vec<(Tensor, usize, bool)> = jobs
            .iter()
            .map(|(v, _, p, s)| (v.shallow_clone(), *p, *s))
            .collect();
        self.submit(name, move |o, deadline, timeout| {
            o.exec(name, deadline, timeout, |lib, comm, s| {
                // SAFETY: group of sends/receives on device buffers of live tensors.
                lib.check(name, unsafe { (lib.f.group_start)() }, comm)?;
                for (t, peer, send) in &list {
                    let rc = if *send {
                        unsafe {
                            (lib.f.send)(
                                t.data_ptr(),
                                bytes(t),
                                NCCL_UINT8,
                                *peer as c_int,
                                comm,
                                s,
                            )
                        }
                    } else {
                        unsafe {
                            (lib.f.recv)(
                                t.data_ptr(),
                                bytes(t),
                                NCCL_UINT8,
                                *peer as c_int,
                                comm,
                                s,
                            )
                        }
                    };
                    lib.check(name, rc, comm)?;
                }
                lib.check(name, unsafe { (lib.f.group_end)() }, comm)
            })
        })?;
        for (o, (v, copied, _, _)) in ops.iter_mut().zip(jobs) {
            if let (P2POp::Recv { tensor, .. }, true) = (o, copied) {
                tensor.f_copy_(&v)?;
            }
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut t = Tensor::f_zeros([1], (Kind::Float, self.device()))?;
        self.all_reduce(&mut t, ReduceOp::Sum)
    }

    fn split(
        &self,
        color: Option<u32>,
        key: usize,
    ) -> Result<Option<Arc<dyn Communicator>>, CommError> {
        let n = self.size();
        // Learn everyone's (color, key) first, to know the new group's world ranks.
        let mine = [color.map_or(-1, i64::from), key as i64];
        let local = Tensor::f_from_slice(&mine)?.f_to_device(self.device())?;
        let mut all = Tensor::f_zeros([2 * n as i64], (Kind::Int64, self.device()))?;
        self.all_gather(&local, &mut all)?;
        let table: Vec<i64> = Vec::<i64>::try_from(all.f_to_device(Device::Cpu)?)?;
        let ncolor = color.map_or(NCCL_SPLIT_NOCOLOR, |c| (c & 0x7fff_ffff) as c_int);
        let raw = self.submit("split", move |o, deadline, timeout| {
            o.usable()?;
            let mut child: ncclComm_t = std::ptr::null_mut();
            let mut config = nonblocking_config();
            // SAFETY: our live handle, valid out pointer and config.
            let rc =
                unsafe { (o.lib.f.split)(o.comm, ncolor, key as c_int, &mut child, &mut config) };
            let res = o.lib.check("ncclCommSplit", rc, o.comm).and_then(|()| {
                let comm = o.comm;
                o.settle("ncclCommSplit", comm, deadline, timeout)?;
                if !child.is_null() {
                    o.settle("ncclCommSplit", child, deadline, timeout)?;
                }
                Ok(())
            });
            if let Err(e) = res {
                o.kill(&e);
                return Err(e);
            }
            Ok((!child.is_null()).then_some(RawComm(child)))
        })?;
        let Some(raw) = raw else { return Ok(None) };
        let Some(color) = color else { return Ok(None) };
        let mut members: Vec<(i64, usize)> = (0..n)
            .filter(|&p| table[2 * p] == i64::from(color))
            .map(|p| (table[2 * p + 1], p))
            .collect();
        members.sort_unstable();
        let rank = members
            .iter()
            .position(|&(_, p)| p == self.rank)
            .ok_or_else(|| {
                CommError::Protocol("split: this rank is missing from its own color".into())
            })?;
        let world: Vec<usize> = members.iter().map(|&(_, p)| self.members[p]).collect();
        let device = self.device;
        let lib = NcclLibrary::load()?;
        let child = NcclComm::spawn(rank, world, device, self.ctl.timeout(), move |ctl| {
            let raw = raw;
            Owner::on_device(lib, device, raw.0, ctl).inspect_err(|_| {
                // SAFETY: the new handle is ours and not used after this.
                unsafe { (lib.f.abort)(raw.0) };
            })
        })?;
        lock(&self.ctl.children).push(Arc::downgrade(&child.ctl));
        if self.ctl.aborted.load(Ordering::SeqCst) {
            child.abort();
        }
        Ok(Some(Arc::new(child)))
    }

    fn abort(&self) {
        self.ctl.abort();
    }

    fn is_aborted(&self) -> bool {
        self.ctl.aborted.load(Ordering::SeqCst)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Close);
        if let Some(t) = lock(&self.owner).take() {
            let _ = t.join();
        }
    }
}
