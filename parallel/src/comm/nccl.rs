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
//!   owning thread); the public [`NcclComm`] and its [`Work`]s send it messages.
//! * **Streams.** Every operation is queued on the communicator's own non-blocking stream,
//!   which first waits (an event) for everything already queued on libtorch's current
//!   stream — the legacy default stream: tch cannot select another and weaver never does —
//!   and is followed by a completion event. The host does not wait for the device:
//!   `*_start` returns once the message is sent; [`Work::wait`] makes libtorch's stream wait
//!   on the completion event (the host only waits for the owner to have queued that), so
//!   kernels the caller queues afterwards see the result; `is_done` says whether the owner
//!   has seen that event complete. Blocking calls are started operations whose caller then
//!   waits (host) until the device has finished. Different communicators (groups) use
//!   different streams and run concurrently; one communicator's operations run in start
//!   order. The owner keeps each operation's tensors alive until the device has finished
//!   with them, so libtorch's allocator cannot hand their memory out early.
//! * **Timeouts and abort.** Communicators are created non-blocking
//!   (`ncclConfig_t.blocking = 0`); the owner polls completion events and NCCL's
//!   asynchronous error while anything is in flight, and calls `ncclCommAbort` when the
//!   oldest operation has run for the timeout (counted from when the one before it
//!   finished). `abort()` sets a flag the owner polls and wakes it, so `ncclCommAbort` runs
//!   within milliseconds even mid-collective. Either way every operation in flight fails
//!   (its `wait` returns the error), and so does every later call. An error found after a
//!   `wait` already returned surfaces at the next call (as `Broken`); libtorch's stream is
//!   released because the aborted kernels end.
//! * **Semantics** follow the trait; uneven `all_gather` / `reduce_scatter` use grouped
//!   broadcasts / reduces. NCCL sends no headers, so a point-to-point size or dtype mismatch
//!   between ranks cannot be detected: it corrupts or times out. Data-movement operations
//!   accept any dtype (moved as bytes); reductions take f32, f64, bf16, f16, i64, i32, i8
//!   and u8.

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::result as cu;
use cudarc::driver::sys as cusys;
use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclUniqueId};
use tch::{Device, Kind, Tensor};

use super::{shard_range, CommError, Communicator, P2POp, P2POwned, ReduceOp, Work};
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
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: a non-null pointer from NCCL's error functions: a NUL-terminated
                // string that NCCL keeps alive (static, or per communicator).
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        // SAFETY: takes any code, returns a static string (or null).
        let what = text(unsafe { (self.f.error_string)(code) });
        // SAFETY: `comm` is our handle or null (allowed: the last error of the thread).
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

/// Queues one operation's NCCL calls on the communicator's stream; gets the operation's
/// tensors (which the owner keeps alive until the device has finished with them).
type Enqueue =
    Box<dyn FnOnce(&NcclLibrary, ncclComm_t, Stream, &[Tensor]) -> Result<(), CommError> + Send>;

enum Msg {
    /// Run a job on the owner and answer through the channel it carries (init, split).
    Run(Job),
    /// Start an operation: queue it on the stream, record its completion event, and watch it.
    Start {
        id: u64,
        op: &'static str,
        tensors: Vec<Tensor>,
        enqueue: Enqueue,
        slot: Arc<Slot>,
    },
    /// Make libtorch's stream wait for operation `id` (if it is still running), then answer.
    StreamWait {
        id: u64,
        reply: mpsc::Sender<Result<(), CommError>>,
    },
    Abort,
    Close,
}

/// Where a started operation's outcome lands: `Ok` once the device has finished it.
#[derive(Debug, Default)]
struct Slot {
    result: Mutex<Option<Result<(), CommError>>>,
    filled: Condvar,
}

impl Slot {
    fn fill(&self, r: Result<(), CommError>) {
        let mut g = lock(&self.result);
        if g.is_none() {
            *g = Some(r);
        }
        drop(g);
        self.filled.notify_all();
    }

    fn is_filled(&self) -> bool {
        lock(&self.result).is_some()
    }

    /// The error, if the operation failed (leaves an `Ok` in place).
    fn error(&self) -> Option<CommError> {
        let mut g = lock(&self.result);
        match g.take() {
            Some(Err(e)) => Some(e),
            other => {
                *g = other;
                None
            }
        }
    }

    /// Waits up to `limit` for the outcome.
    fn wait(&self, op: &'static str, limit: Duration, timeout: Duration) -> Result<(), CommError> {
        let deadline = Instant::now() + limit;
        let mut g = lock(&self.result);
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CommError::Timeout { op, after: timeout });
            }
            g = self
                .filled
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
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

/// An operation queued on the stream and not yet seen complete.
struct InFlight {
    id: u64,
    op: &'static str,
    /// Recorded on the stream after the operation.
    done: cusys::CUevent,
    /// The operation's tensors: alive until the device has finished with them.
    tensors: Vec<Tensor>,
    slot: Arc<Slot>,
}

/// Everything that lives on the owner thread.
struct Owner {
    lib: &'static NcclLibrary,
    comm: ncclComm_t,
    stream: cusys::CUstream,
    /// Recorded on libtorch's stream before each operation, waited on by ours.
    before: cusys::CUevent,
    device: cusys::CUdevice,
    ctl: Arc<Control>,
    /// Set once the handle was aborted (by `abort()`, a timeout or an error).
    dead: Option<String>,
    /// Started operations, in stream order.
    inflight: VecDeque<InFlight>,
    /// Since when the oldest in-flight operation may have been running (its timeout counts
    /// from here: the later ones wait for it on the stream).
    head_since: Instant,
    /// Completion events to reuse.
    spare: Vec<cusys::CUevent>,
    /// Tensors of failed operations, kept until the stream is idle (an aborted kernel may
    /// still touch them for a moment).
    graveyard: Vec<Tensor>,
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
        let before = cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| cuda_err(op, e))?;
        Ok(Owner {
            lib,
            comm,
            stream,
            before,
            device,
            ctl,
            dead: None,
            inflight: VecDeque::new(),
            head_since: Instant::now(),
            spare: Vec::new(),
            graveyard: Vec::new(),
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

    /// Aborts the handle (once) and fails every in-flight operation: the oldest (the one
    /// that was running) with `cause`, the rest with Aborted after an abort, else Broken
    /// naming the first failure.
    fn kill(&mut self, cause: &CommError) {
        if self.dead.is_none() && !self.comm.is_null() {
            // SAFETY: aborting our own live handle; it is not used afterwards.
            unsafe { (self.lib.f.abort)(self.comm) };
        }
        let first = self.dead.get_or_insert_with(|| cause.to_string()).clone();
        let mut head = true;
        while let Some(w) = self.inflight.pop_front() {
            let err = match cause {
                CommError::Aborted => CommError::Aborted,
                CommError::Timeout { op, after } if head => {
                    CommError::Timeout { op, after: *after }
                }
                CommError::Device { op, message } if head => CommError::Device {
                    op,
                    message: message.clone(),
                },
                _ => CommError::Broken {
                    cause: first.clone(),
                },
            };
            head = false;
            // An aborted kernel may touch these for a moment yet: keep them until the
            // stream is idle.
            self.graveyard.extend(w.tensors);
            self.spare.push(w.done);
            w.slot.fill(Err(err));
        }
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

    fn event(&mut self, op: &'static str) -> Result<cusys::CUevent, CommError> {
        match self.spare.pop() {
            Some(e) => Ok(e),
            None => cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(|e| cuda_err(op, e)),
        }
    }

    /// Starts an operation: our stream waits for what libtorch queued on its stream so far,
    /// then gets the NCCL calls and a completion event; the host does not wait for it.
    fn start(
        &mut self,
        id: u64,
        op: &'static str,
        tensors: Vec<Tensor>,
        enqueue: Enqueue,
        slot: Arc<Slot>,
    ) {
        if let Err(e) = self.usable() {
            // Nothing was queued: the tensors can go.
            slot.fill(Err(e));
            return;
        }
        let timeout = self.ctl.timeout();
        let deadline = Instant::now() + timeout;
        let queued = (|| {
            // SAFETY: our own event and stream; the null stream is the legacy default stream,
            // libtorch's current stream (weaver never sets another).
            unsafe {
                cu::event::record(self.before, cu::stream::null()).map_err(|e| cuda_err(op, e))?;
                cu::stream::wait_event(
                    self.stream,
                    self.before,
                    cusys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(|e| cuda_err(op, e))?;
            }
            enqueue(self.lib, self.comm, self.stream.cast(), &tensors)?;
            let comm = self.comm;
            self.settle(op, comm, deadline, timeout)?;
            let done = self.event(op)?;
            // SAFETY: our own event, recorded on our own stream.
            if let Err(e) = unsafe { cu::event::record(done, self.stream) } {
                self.spare.push(done);
                return Err(cuda_err(op, e));
            }
            Ok(done)
        })();
        match queued {
            Ok(done) => {
                if self.inflight.is_empty() {
                    self.head_since = Instant::now();
                }
                self.inflight.push_back(InFlight {
                    id,
                    op,
                    done,
                    tensors,
                    slot,
                });
            }
            Err(e) => {
                // Part of the operation may be on the stream: keep its tensors until idle.
                self.graveyard.extend(tensors);
                self.kill(&e);
                slot.fill(Err(e));
            }
        }
    }

    /// Retires what the device has finished, and enforces the oldest operation's deadline,
    /// NCCL's asynchronous errors and `abort()`.
    fn poll(&mut self) {
        while let Some(head) = self.inflight.front() {
            // SAFETY: our own event.
            match unsafe { cu::event::query(head.done) } {
                Ok(()) => {
                    if let Some(w) = self.inflight.pop_front() {
                        self.spare.push(w.done);
                        // Done on the device: its tensors may go.
                        w.slot.fill(Ok(()));
                    }
                    self.head_since = Instant::now();
                }
                Err(e) if e.0 == cusys::cudaError_enum::CUDA_ERROR_NOT_READY => break,
                Err(e) => {
                    let err = cuda_err(head.op, e);
                    self.kill(&err);
                    break;
                }
            }
        }
        if !self.graveyard.is_empty() && self.stream_idle() {
            self.graveyard.clear();
        }
        let Some(head) = self.inflight.front() else {
            return;
        };
        let op = head.op;
        if self.ctl.aborted.load(Ordering::SeqCst) {
            self.kill(&CommError::Aborted);
            return;
        }
        let mut state: c_int = NCCL_SUCCESS;
        // SAFETY: our live handle.
        let rc = unsafe { (self.lib.f.async_error)(self.comm, &mut state) };
        let failed = self.lib.check(op, rc, self.comm).err().or_else(|| {
            (state != NCCL_SUCCESS && state != NCCL_IN_PROGRESS)
                .then(|| self.lib.error(op, state, self.comm))
        });
        if let Some(e) = failed {
            self.kill(&e);
            return;
        }
        let timeout = self.ctl.timeout();
        if self.head_since.elapsed() >= timeout {
            self.kill(&CommError::Timeout { op, after: timeout });
        }
    }

    /// Makes libtorch's stream wait for operation `id` if it is still in flight (finished
    /// ones need nothing; failed ones were answered through their slot).
    fn stream_wait(&mut self, id: u64) -> Result<(), CommError> {
        let Some(w) = self.inflight.iter().find(|w| w.id == id) else {
            return Ok(());
        };
        // SAFETY: the legacy default stream waits on our live event; the wait refers to
        // the event's current record, so reusing the event later does not disturb it.
        unsafe {
            cu::stream::wait_event(
                cu::stream::null(),
                w.done,
                cusys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| cuda_err(w.op, e))
    }

    /// Whether everything queued on our stream has finished (an error counts as not idle).
    fn stream_idle(&self) -> bool {
        // SAFETY: our own live stream.
        let rc = unsafe { cusys::cuStreamQuery(self.stream) };
        rc == cusys::CUresult::CUDA_SUCCESS
    }

    /// How long to sleep for messages before looking at the in-flight work again.
    fn poll_interval(spins: &mut u32) -> Duration {
        *spins = (*spins + 1).min(10);
        Duration::from_micros(20 << *spins).min(Duration::from_millis(1))
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        // Abort rather than finalize: it never waits on peers. In-flight work was drained
        // by the owner loop before this.
        self.kill(&CommError::Broken {
            cause: "the communicator was dropped".into(),
        });
        // Give aborted kernels a moment to leave the stream before their tensors go; if
        // they do not, leak the tensors rather than let libtorch reuse memory a kernel may
        // still write.
        let t0 = Instant::now();
        while !self.stream_idle() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.stream_idle() {
            self.graveyard.clear();
        } else {
            for t in self.graveyard.drain(..) {
                std::mem::forget(t);
            }
        }
        // SAFETY: our own stream and events; the primary context was retained once.
        unsafe {
            let _ = cu::event::destroy(self.before);
            for e in self.spare.drain(..) {
                let _ = cu::event::destroy(e);
            }
            let _ = cu::stream::destroy(self.stream);
            let _ = cu::primary_ctx::release(self.device);
        }
    }
}

fn owner_loop(rx: mpsc::Receiver<Msg>, mut owner: Owner) {
    let mut spins = 0u32;
    let mut closing = false;
    loop {
        let msg = if owner.inflight.is_empty() {
            if closing {
                return;
            }
            spins = 0;
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => return,
            }
        } else {
            match rx.recv_timeout(Owner::poll_interval(&mut spins)) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                // The communicator is gone: finish what is in flight, then end.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    closing = true;
                    std::thread::sleep(Owner::poll_interval(&mut spins));
                    None
                }
            }
        };
        if let Some(msg) = msg {
            spins = 0;
            match msg {
                Msg::Run(job) => job(&mut owner),
                Msg::Start {
                    id,
                    op,
                    tensors,
                    enqueue,
                    slot,
                } => owner.start(id, op, tensors, enqueue, slot),
                Msg::StreamWait { id, reply } => {
                    let _ = reply.send(owner.stream_wait(id));
                }
                Msg::Abort => owner.kill(&CommError::Aborted),
                // Finish what is in flight (each within its timeout), then end.
                Msg::Close => closing = true,
            }
        }
        owner.poll();
    }
}

/// The nccl communicator. See the module documentation.
pub struct NcclComm {
    rank: usize,
    members: Vec<usize>,
    device: usize,
    ctl: Arc<Control>,
    tx: mpsc::Sender<Msg>,
    /// Identifies started operations to the owner.
    next_id: AtomicU64,
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

/// A started operation of the nccl backend.
struct NcclWork {
    op: &'static str,
    id: u64,
    slot: Arc<Slot>,
    tx: mpsc::Sender<Msg>,
    timeout: Duration,
    /// `(caller's tensor, contiguous copy the operation wrote)`: copied back by `wait`.
    copy_back: Vec<(Tensor, Tensor)>,
}

impl fmt::Debug for NcclWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclWork")
            .field("op", &self.op)
            .field("id", &self.id)
            .field("done", &self.slot.is_filled())
            .finish()
    }
}

impl NcclWork {
    fn copy_back(self) -> Result<(), CommError> {
        for (mut dst, src) in self.copy_back {
            // On libtorch's stream, which is ordered after the operation.
            dst.f_copy_(&src)?;
        }
        Ok(())
    }

    /// The blocking calls: waits (host) until the device has finished.
    fn finish(self) -> Result<(), CommError> {
        self.slot
            .wait(self.op, self.timeout + GRACE, self.timeout)?;
        self.copy_back()
    }
}

impl Work for NcclWork {
    fn wait(self: Box<Self>) -> Result<(), CommError> {
        if let Some(e) = self.slot.error() {
            return Err(e);
        }
        if self.slot.is_filled() {
            // Finished on the device already: nothing to order after.
            return (*self).copy_back();
        }
        // libtorch's stream waits for the completion event; the host waits only for the
        // owner to have queued that (it handles messages in order, right after the start).
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .send(Msg::StreamWait {
                id: self.id,
                reply: reply_tx,
            })
            .map_err(|_| CommError::Broken {
                cause: "the NCCL owner thread is gone".into(),
            })?;
        match reply_rx.recv_timeout(self.timeout + GRACE) {
            Ok(r) => r?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(CommError::Timeout {
                    op: self.op,
                    after: self.timeout,
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(CommError::Broken {
                    cause: "the NCCL owner thread is gone".into(),
                })
            }
        }
        // It may have failed meanwhile (then it is no longer in flight).
        if let Some(e) = self.slot.error() {
            return Err(e);
        }
        (*self).copy_back()
    }

    fn is_done(&self) -> bool {
        self.slot.is_filled()
    }
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
            next_id: AtomicU64::new(0),
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

    /// Hands an operation to the owner, which queues it on the stream; returns without
    /// waiting. `tensors` are what `enqueue` gets (contiguous, on our device); `copy_back`
    /// is the caller's tensor and the contiguous copy the operation writes, if it had to be
    /// copied.
    fn launch(
        &self,
        op: &'static str,
        tensors: Vec<Tensor>,
        copy_back: Vec<(Tensor, Tensor)>,
        enqueue: Enqueue,
    ) -> Result<NcclWork, CommError> {
        if self.ctl.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted);
        }
        let _span = tracing::trace_span!("collective", backend = "nccl", op).entered();
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let slot = Arc::new(Slot::default());
        self.tx
            .send(Msg::Start {
                id,
                op,
                tensors,
                enqueue,
                slot: slot.clone(),
            })
            .map_err(|_| CommError::Broken {
                cause: "the NCCL owner thread is gone".into(),
            })?;
        Ok(NcclWork {
            op,
            id,
            slot,
            tx: self.tx.clone(),
            timeout: self.ctl.timeout(),
            copy_back,
        })
    }

    /// A contiguous version of a tensor on this communicator's device (the device rule),
    /// and whether it is a copy.
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

    fn all_reduce_work(&self, tensor: &Tensor, op: ReduceOp) -> Result<NcclWork, CommError> {
        let name = "all_reduce";
        let (work, copied) = self.view(name, tensor)?;
        let dt = Self::dtype(name, tensor)?;
        let back: Vec<_> = copied
            .then(|| (tensor.shallow_clone(), work.shallow_clone()))
            .into_iter()
            .collect();
        self.launch(
            name,
            vec![work],
            back,
            Box::new(move |lib, comm, s, t| {
                let (p, n) = (t[0].data_ptr(), t[0].numel());
                // SAFETY: p is the device buffer of a live contiguous tensor of n elements
                // (kept alive by the owner until the operation completes).
                let rc = unsafe { (lib.f.all_reduce)(p, p, n, dt, red_op(op), comm, s) };
                lib.check(name, rc, comm)
            }),
        )
    }

    fn all_gather_work(&self, input: &Tensor, output: &Tensor) -> Result<NcclWork, CommError> {
        let name = "all_gather";
        let (n, r) = (self.size(), self.rank);
        let (inp, _) = self.view(name, input)?;
        let (out, copied) = self.view(name, output)?;
        let total_rows = rows(&out).0;
        let row = check_parts(name, &inp, &out, shard_range(total_rows, n, r).len())?;
        let es = out.kind().elt_size_in_bytes();
        let back: Vec<_> = copied
            .then(|| (output.shallow_clone(), out.shallow_clone()))
            .into_iter()
            .collect();
        self.launch(
            name,
            vec![inp, out],
            back,
            Box::new(move |lib, comm, s, t| {
                let (ip, op) = (t[0].data_ptr(), t[1].data_ptr().cast::<u8>());
                if total_rows.is_multiple_of(n) {
                    let count = bytes(&t[0]);
                    // SAFETY: device buffers of live tensors; the output holds n * count
                    // bytes (checked shapes).
                    let rc =
                        unsafe { (lib.f.all_gather)(ip, op.cast(), count, NCCL_UINT8, comm, s) };
                    return lib.check(name, rc, comm);
                }
                // Uneven rows: one broadcast per rank, grouped.
                // SAFETY: opens a group on this thread; closed below.
                lib.check(name, unsafe { (lib.f.group_start)() }, comm)?;
                for p in 0..n {
                    let seg = shard_range(total_rows, n, p);
                    let (off, len) = (seg.start * row * es, seg.len() * row * es);
                    if len == 0 {
                        continue;
                    }
                    // SAFETY: `off + len` is within the output (segments of its rows).
                    let dst = unsafe { op.add(off) };
                    let src = if p == r {
                        ip.cast_const()
                    } else {
                        dst.cast_const().cast()
                    };
                    // SAFETY: device buffers of live tensors, `len` bytes each (the input
                    // holds this rank's segment).
                    let rc = unsafe {
                        (lib.f.broadcast)(src, dst.cast(), len, NCCL_UINT8, p as c_int, comm, s)
                    };
                    lib.check(name, rc, comm)?;
                }
                // SAFETY: closes the group opened above.
                lib.check(name, unsafe { (lib.f.group_end)() }, comm)
            }),
        )
    }

    fn reduce_scatter_work(
        &self,
        input: &Tensor,
        output: &Tensor,
        op: ReduceOp,
    ) -> Result<NcclWork, CommError> {
        let name = "reduce_scatter";
        let (n, r) = (self.size(), self.rank);
        let (inp, _) = self.view(name, input)?;
        let (out, copied) = self.view(name, output)?;
        let dt = Self::dtype(name, input)?;
        let total_rows = rows(&inp).0;
        let row = check_parts(name, &out, &inp, shard_range(total_rows, n, r).len())?;
        let es = inp.kind().elt_size_in_bytes();
        let back: Vec<_> = copied
            .then(|| (output.shallow_clone(), out.shallow_clone()))
            .into_iter()
            .collect();
        self.launch(
            name,
            vec![inp, out],
            back,
            Box::new(move |lib, comm, s, t| {
                let (ip, op_) = (t[0].data_ptr().cast::<u8>(), t[1].data_ptr());
                if total_rows.is_multiple_of(n) {
                    let count = t[1].numel();
                    // SAFETY: device buffers of live tensors; the input holds n * count
                    // elements (checked shapes).
                    let rc = unsafe {
                        (lib.f.reduce_scatter)(ip.cast(), op_, count, dt, red_op(op), comm, s)
                    };
                    return lib.check(name, rc, comm);
                }
                // Uneven rows: one reduce per rank to that rank, grouped.
                // SAFETY: opens a group on this thread; closed below.
                lib.check(name, unsafe { (lib.f.group_start)() }, comm)?;
                for p in 0..n {
                    let seg = shard_range(total_rows, n, p);
                    let count = seg.len() * row;
                    if count == 0 {
                        continue;
                    }
                    // SAFETY: inside the input (segment p of its rows).
                    let src = unsafe { ip.add(seg.start * row * es) };
                    let dst = if p == r { op_ } else { src.cast() };
                    // SAFETY: device buffers of live tensors, `count` elements each; the
                    // receive buffer is only written on the root.
                    let rc = unsafe {
                        (lib.f.reduce)(src.cast(), dst, count, dt, red_op(op), p as c_int, comm, s)
                    };
                    lib.check(name, rc, comm)?;
                }
                // SAFETY: closes the group opened above.
                lib.check(name, unsafe { (lib.f.group_end)() }, comm)
            }),
        )
    }

    fn batch_p2p_work(&self, ops: &[(&Tensor, usize, bool)]) -> Result<NcclWork, CommError> {
        let name = "send/recv";
        let mut tensors = Vec::with_capacity(ops.len());
        let mut sends = Vec::with_capacity(ops.len());
        let mut back: Vec<(Tensor, Tensor)> = Vec::new();
        for &(t, peer, send) in ops {
            if peer >= self.size() || peer == self.rank {
                return Err(CommError::InvalidArgument(format!(
                    "{name}: peer {peer} of {} (no self messages)",
                    self.size()
                )));
            }
            let (v, copied) = self.view(name, t)?;
            if copied && !send {
                back.push((t.shallow_clone(), v.shallow_clone()));
            }
            tensors.push(v);
            sends.push((peer, send));
        }
        self.launch(
            name,
            tensors,
            back,
            Box::new(move |lib, comm, s, t| {
                // SAFETY: opens a group on this thread; closed below.
                lib.check(name, unsafe { (lib.f.group_start)() }, comm)?;
                for (t, &(peer, send)) in t.iter().zip(&sends) {
                    let (p, b) = (t.data_ptr(), bytes(t));
                    // SAFETY: device buffers of live tensors of `b` bytes.
                    let rc = unsafe {
                        if send {
                            (lib.f.send)(p, b, NCCL_UINT8, peer as c_int, comm, s)
                        } else {
                            (lib.f.recv)(p, b, NCCL_UINT8, peer as c_int, comm, s)
                        }
                    };
                    lib.check(name, rc, comm)?;
                }
                // SAFETY: closes the group opened above.
                lib.check(name, unsafe { (lib.f.group_end)() }, comm)
            }),
        )
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

/// Borrowed (tensor, peer, is a send) of each op of a batch.
fn p2p_list<'a>(
    ops: impl Iterator<Item = (&'a Tensor, usize, bool)>,
) -> Vec<(&'a Tensor, usize, bool)> {
    ops.collect()
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

    // Blocking calls are started operations whose caller waits (host) until the device has
    // finished them.

    fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        self.all_reduce_work(tensor, op)?.finish()
    }

    fn all_gather(&self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        self.all_gather_work(input, output)?.finish()
    }

    fn reduce_scatter(
        &self,
        input: &Tensor,
        output: &mut Tensor,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.reduce_scatter_work(input, output, op)?.finish()
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CommError> {
        let name = "broadcast";
        let (work, copied) = self.view(name, tensor)?;
        if root >= self.size() {
            return Err(CommError::InvalidArgument(format!(
                "broadcast: root {root} of {} ranks",
                self.size()
            )));
        }
        let back: Vec<_> = copied
            .then(|| (tensor.shallow_clone(), work.shallow_clone()))
            .into_iter()
            .collect();
        self.launch(
            name,
            vec![work],
            back,
            Box::new(move |lib, comm, s, t| {
                let (p, b) = (t[0].data_ptr(), bytes(&t[0]));
                // SAFETY: device buffer of a live tensor of b bytes.
                let rc = unsafe { (lib.f.broadcast)(p, p, b, NCCL_UINT8, root as c_int, comm, s) };
                lib.check(name, rc, comm)
            }),
        )?
        .finish()
    }

    fn batch_p2p(&self, ops: &mut [P2POp<'_>]) -> Result<(), CommError> {
        let list = p2p_list(ops.iter().map(|o| match o {
            P2POp::Send { tensor, peer } => (&**tensor, *peer, true),
            P2POp::Recv { tensor, peer } => (&**tensor, *peer, false),
        }));
        self.batch_p2p_work(&list)?.finish()
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut t = Tensor::f_zeros([1], (Kind::Float, self.device()))?;
        self.all_reduce(&mut t, ReduceOp::Sum)
    }

    // Started operations: queued on the communicator's stream after libtorch's pending work;
    // `wait` makes libtorch's stream wait for them, the host never does.

    fn all_reduce_start(&self, tensor: Tensor, op: ReduceOp) -> Result<Box<dyn Work>, CommError> {
        Ok(Box::new(self.all_reduce_work(&tensor, op)?))
    }

    fn reduce_scatter_start(
        &self,
        input: Tensor,
        output: Tensor,
        op: ReduceOp,
    ) -> Result<Box<dyn Work>, CommError> {
        Ok(Box::new(self.reduce_scatter_work(&input, &output, op)?))
    }

    fn all_gather_start(&self, input: Tensor, output: Tensor) -> Result<Box<dyn Work>, CommError> {
        Ok(Box::new(self.all_gather_work(&input, &output)?))
    }

    fn batch_p2p_start(&self, ops: Vec<P2POwned>) -> Result<Box<dyn Work>, CommError> {
        let list = p2p_list(ops.iter().map(|o| match o {
            P2POwned::Send { tensor, peer } => (tensor, *peer, true),
            P2POwned::Recv { tensor, peer } => (tensor, *peer, false),
        }));
        Ok(Box::new(self.batch_p2p_work(&list)?))
    }

    fn split(
        &self,
        color: Option<u32>,
        key: usize,
    ) -> Result<Option<Arc<dyn Communicator>>, CommError> {
        let n = self.size();
        // Learn everyone's (color, key) first, to know the new group's world ranks. This
        // blocking call also leaves nothing of ours in flight on the stream.
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
        // The owner finishes what is in flight (within its timeout), then ends.
        let _ = self.tx.send(Msg::Close);
        if let Some(t) = lock(&self.owner).take() {
            let _ = t.join();
        }
    }
}
