//! The `tcp` backend: collectives between processes on one host or many, on CPU tensors.
//!
//! * **Rendezvous.** Each process listens on TCP (`listen_host`, port chosen by the OS) and
//!   on an abstract Unix-domain socket, and publishes both under
//!   `{prefix}/weaver/tcp/{rank}/addr` in the [`Store`]; put the job and generation in the
//!   prefix so a restarted generation never reads stale addresses.
//! * **Connections** are one-way and made on first use: the sender connects to the
//!   receiver and says which communicator and rank it speaks for; the receiver's acceptor
//!   parks the connection until that communicator claims it. Peers on the same host (and
//!   network namespace) use the Unix socket — the same byte stream at about twice the
//!   throughput of TCP loopback — others TCP (see [`net`]). Every communicator (the world
//!   and each group from
//!   [`Communicator::split`]) has its own connections, so groups never share a byte stream
//!   and run concurrently from different threads without any demultiplexing.
//! * **Algorithms.** Large all-reduce, reduce-scatter and all-gather use the bandwidth-optimal
//!   ring (each rank sends and receives `2(n-1)/n` of the data for an all-reduce), pipelined
//!   in 256 KiB chunks by the [`engine`]: a chunk is forwarded as soon as it is reduced, and
//!   the kernel keeps moving data while the next one is reduced. Small messages (≤ 64 KiB,
//!   ≤ 8 ranks) use one-shot exchanges (every rank sends its data straight to every other
//!   and reduces locally, in rank order so all ranks get the same bits): one network
//!   latency instead of `2(n-1)`. Broadcast is a flat tree for small tensors and a
//!   pipelined chain for large ones; barrier is a dissemination barrier.
//! * **Shared memory.** When all ranks of a communicator share a host (boot id and network
//!   namespace, as for the Unix sockets), all-reduce, reduce-scatter and all-gather go
//!   through a segment of shared memory instead (see [`shm`]): one copy in, a reduction
//!   straight from the segment, one copy out, futex barriers — no kernel copies. It beat
//!   the sockets at every size measured, so by default every such call uses it. The first
//!   of these calls on a communicator has the ranks agree on the settings over the sockets
//!   (so they always pick the same path); the first one above the threshold creates the
//!   segment. Broadcast, point to point and barrier stay on the sockets.
//! * **Environment** (read once per process; every rank should see the same values, and
//!   the ranks agree on the most conservative ones):
//!   - `WEAVER_COMM_TRANSPORT`: `auto` (default: shared memory and Unix sockets between
//!     ranks of one host, TCP between hosts), `unix` (no shared memory: sockets only, to
//!     measure or debug the ring), `tcp` (TCP only, no shared memory, even on one host).
//!   - `WEAVER_COMM_SHM_MIN_BYTES`: all-reduces (reduce-scatters, all-gathers: of the whole
//!     tensor) of at least this many bytes use shared memory (default 0: all). [`TcpComm::with_shm_min_bytes`] overrides it, and the
//!     transport's choice, per communicator.
//!   - `WEAVER_COMM_SHM_SLOT_BYTES`: bytes per rank and pipeline step in the segment
//!     (default 512 KiB; the segment holds `3 × ranks` slots).
//!   - `WEAVER_COMM_SOCKET_BUFFER`: socket send buffer (see [`net`]).
//! * **Checks.** Each message starts with a 32-byte header (operation, dtype, reduce op,
//!   sequence number, element count), so ranks that disagree fail with a typed error.
//! * **Failures.** Timeouts are enforced per call with `poll(2)`; `abort()` shuts every socket
//!   of the communicator and its groups down and fails their shared-memory segments, which
//!   wakes any blocked call at once, here and at the peers.

mod engine;
mod net;
mod queue;
mod shm;
mod stage;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

use self::engine::{Ctx, Gate, Header, In, Mode, OnMismatch, Out, HDR};
use self::net::{Address, Hello, Listeners, Sock};
use self::queue::{Job, Queue};
use self::stage::{Fill, Host, HostMode, Staging};
use super::elem::{self, Elem};
use super::{shard_range, CommError, Communicator, P2POp, P2POwned, ReduceOp, Work};
use crate::store::{Store, StoreError};

/// Operation codes carried in headers.
pub(super) mod op {
    pub(crate) const ALL_REDUCE: u8 = 1;
    pub(crate) const ALL_GATHER: u8 = 2;
    pub(crate) const REDUCE_SCATTER: u8 = 3;
    pub(crate) const BROADCAST: u8 = 4;
    pub(crate) const P2P: u8 = 5;
    pub(crate) const BARRIER: u8 = 6;
    pub(crate) const SPLIT: u8 = 7;
    pub(crate) const SHM_SETUP: u8 = 8;
}

pub(super) fn op_name(code: u8) -> &'static str {
    match code {
        op::ALL_REDUCE => "all_reduce",
        op::ALL_GATHER => "all_gather",
        op::REDUCE_SCATTER => "reduce_scatter",
        op::BROADCAST => "broadcast",
        op::P2P => "send/recv",
        op::BARRIER => "barrier",
        op::SPLIT => "split",
        op::SHM_SETUP => "shared-memory setup",
        _ => "unknown",
    }
}

fn rop_code(op: ReduceOp) -> u8 {
    match op {
        ReduceOp::Sum => 1,
        ReduceOp::Avg => 2,
        ReduceOp::Max => 3,
        ReduceOp::Min => 4,
    }
}

/// Below this many bytes (and at most [`ONE_SHOT_RANKS`] ranks) collectives use one-shot
/// exchanges: latency beats bandwidth there.
const SMALL: usize = 64 << 10;
const ONE_SHOT_RANKS: usize = 8;

/// FNV-1a: a hash that is the same in every process and build.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent across a panic (maps of sockets, flags).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Incoming connections waiting for their communicator, by (communicator id, world rank of
/// the sender).
#[derive(Debug, Default)]
struct Registry {
    conns: Mutex<HashMap<(u64, usize), Sock>>,
    arrived: Condvar,
}

impl Registry {
    fn wake_all(&self) {
        // Taking the lock orders this wake-up after any waiter's flag check.
        drop(lock(&self.conns));
        self.arrived.notify_all();
    }
}

/// One per process and world communicator: the listeners, the store, peers' addresses.
#[derive(Debug)]
struct Endpoint {
    prefix: String,
    prefix_hash: u64,
    world_rank: usize,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    addrs: Mutex<HashMap<usize, Address>>,
    listeners: Listeners,
}

impl Endpoint {
    fn addr_key(prefix: &str, rank: usize) -> String {
        format!("{prefix}/weaver/tcp/{rank}/addr")
    }

    /// The published address of `world`, waiting for it until `deadline` — in slices, so
    /// that `abort()` also ends a wait for a peer that never showed up.
    fn addr_of(&self, world: usize, ctx: &Ctx<'_>) -> Result<Address, CommError> {
        if let Some(a) = lock(&self.addrs).get(&world) {
            return Ok(a.clone());
        }
        let key = Endpoint::addr_key(&self.prefix, world);
        let raw = loop {
            if ctx.aborted.load(Ordering::SeqCst) {
                return Err(CommError::Aborted);
            }
            let left = ctx.deadline.saturating_duration_since(Instant::now());
            match self.store.get(&key, left.min(Duration::from_millis(250))) {
                Ok(v) => break v,
                Err(StoreError::Timeout { .. }) if left > Duration::from_millis(250) => continue,
                // The peer never published its address: the call ran out of time.
                Err(StoreError::Timeout { .. }) => {
                    return Err(CommError::Timeout {
                        op: ctx.op,
                        after: ctx.timeout,
                    })
                }
                Err(e) => return Err(e.into()),
            }
        };
        let addr = std::str::from_utf8(&raw)
            .ok()
            .and_then(Address::parse)
            .ok_or_else(|| {
                CommError::Protocol(format!(
                    "world rank {world} published a bad address {raw:?}"
                ))
            })?;
        lock(&self.addrs).insert(world, addr.clone());
        Ok(addr)
    }
}

/// Abort and failure state of one communicator, shared with the groups split from it.
#[derive(Debug)]
struct Control {
    aborted: AtomicBool,
    broken: Mutex<Option<String>>,
    timeout_ns: AtomicU64,
    sockets: Mutex<Vec<Arc<Sock>>>,
    /// The shared-memory segment, once set up: failing it wakes peers waiting in it.
    segments: Mutex<Vec<Arc<shm::Segment>>>,
    children: Mutex<Vec<Weak<Control>>>,
    registry: Arc<Registry>,
}

impl Control {
    fn new(timeout: Duration, registry: Arc<Registry>) -> Control {
        Control {
            aborted: AtomicBool::new(false),
            broken: Mutex::new(None),
            timeout_ns: AtomicU64::new(timeout.as_nanos().min(u64::MAX as u128) as u64),
            sockets: Mutex::new(Vec::new()),
            segments: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            registry,
        }
    }

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

    /// Closes the connections and fails the shared-memory segment: peers blocked on this
    /// rank notice at once.
    fn shutdown_sockets(&self) {
        for s in lock(&self.sockets).iter() {
            s.shutdown();
        }
        for s in lock(&self.segments).iter() {
            s.fail();
        }
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.shutdown_sockets();
        self.registry.wake_all();
        for c in lock(&self.children).iter().filter_map(Weak::upgrade) {
            c.abort();
        }
    }

    /// Marks the communicator unusable and closes its connections, so that peers waiting
    /// on this rank fail now rather than at their timeout.
    fn poison(&self, cause: &CommError) {
        lock(&self.broken).get_or_insert_with(|| cause.to_string());
        self.shutdown_sockets();
    }

    fn check(&self) -> Result<(), CommError> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted);
        }
        match lock(&self.broken).as_ref() {
            Some(cause) => Err(CommError::Broken {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// What one call at a time may touch.
#[derive(Debug, Default)]
struct Io {
    out: HashMap<usize, Arc<Sock>>,
    inn: HashMap<usize, Arc<Sock>>,
    seq: u64,
    splits: u64,
    /// Reduce chunks.
    scratch: Vec<u64>,
    /// Whole-message working space (one-shot exchanges, reduce-scatter input copy).
    work: Vec<u64>,
    shm: ShmState,
    /// Host memory for staged calls (see [`stage`]).
    stage: Staging,
}

/// Whether the communicator's all-reduces, reduce-scatters and all-gathers may use shared
/// memory (see [`shm`]).
#[derive(Debug, Default)]
enum ShmState {
    /// Not agreed yet: the first of those calls exchanges each rank's settings.
    #[default]
    Unknown,
    /// Not on this communicator (disabled somewhere, ranks on several hosts, or the setup
    /// failed): the sockets carry everything.
    Off,
    /// Agreed; the segment is made by the first such call of at least `min_bytes`.
    Agreed { min_bytes: usize, slot: usize },
    /// Set up.
    On(Box<shm::Shm>),
}

/// A communicator's shared-memory settings (inherited by its groups).
#[derive(Debug, Clone, Copy)]
struct ShmConfig {
    enabled: bool,
    min_bytes: usize,
    slot: usize,
}

impl ShmConfig {
    fn from_env() -> ShmConfig {
        let d = shm::defaults();
        ShmConfig {
            enabled: d.enabled,
            min_bytes: d.min_bytes,
            slot: d.slot,
        }
    }
}

/// The tcp communicator. See the module documentation.
pub struct TcpComm {
    g: Arc<Group>,
    /// Started operations, run in order by the communicator's own thread.
    queue: Arc<Queue>,
}

/// Everything the algorithms use: shared by the communicator and its thread.
struct Group {
    ep: Arc<Endpoint>,
    id: u64,
    path: String,
    rank: usize,
    /// World rank of each group rank.
    members: Vec<usize>,
    ctl: Arc<Control>,
    io: Mutex<Io>,
    shm: ShmConfig,
    /// Where the tensors handed to this communicator live.
    device: Device,
    /// How calls reach host memory (see [`stage`]).
    mode: HostMode,
}

impl fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpComm")
            .field("prefix", &self.g.ep.prefix)
            .field("group", &self.g.path)
            .field("rank", &self.g.rank)
            .field("size", &self.g.members.len())
            .field("device", &self.g.device)
            .field("staging", &self.g.mode)
            .finish()
    }
}

fn bytes_of_u64(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 storage viewed as bytes.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 8) }
}

fn round8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Shape hash for point-to-point headers (the element count is checked separately).
fn shape_hash(size: &[i64]) -> u64 {
    let bytes: Vec<u8> = size.iter().flat_map(|d| d.to_le_bytes()).collect();
    fnv1a(&[&bytes])
}

/// How a communicator on `device` reaches host memory: CUDA (any non-CPU) tensors are
/// staged, pinned for CUDA; CPU tensors are used directly unless `force` asks for staging.
fn mode_for(device: Device, force: bool) -> HostMode {
    match device {
        Device::Cpu if !force => HostMode::Direct,
        Device::Cpu => HostMode::Staged { pin: None },
        Device::Cuda(_) => HostMode::Staged { pin: Some(device) },
        _ => HostMode::Staged { pin: None },
    }
}

impl TcpComm {
    /// Joins the world communicator of `size` processes as `rank`: binds a listener on
    /// `listen_host` (an address the peers can reach: `127.0.0.1` on one host, the host's
    /// address across hosts) and publishes it in `store` under `prefix`. Returns at once;
    /// connections are made by the first calls, within `timeout` (the generous rendezvous
    /// timeout; tighten it with `set_timeout` after the first step). Its tensors live on the
    /// CPU; [`TcpComm::with_device`] moves it to a GPU.
    pub fn connect(
        store: Arc<dyn Store>,
        prefix: &str,
        rank: usize,
        size: usize,
        listen_host: &str,
        timeout: Duration,
    ) -> Result<TcpComm, CommError> {
        if size == 0 || rank >= size {
            return Err(CommError::InvalidArgument(format!(
                "rank {rank} of a world of {size}"
            )));
        }
        let prefix_hash = fnv1a(&[prefix.as_bytes()]);
        let registry = Arc::new(Registry::default());
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let unix_name = format!(
            "weaver-{prefix_hash:016x}-{rank}-{}-{nonce}",
            std::process::id()
        );
        let reg = registry.clone();
        let listeners = Listeners::start(
            listen_host,
            unix_name,
            move |h: &Hello| h.prefix_hash == prefix_hash && h.to == rank,
            move |h: Hello, s: Sock| {
                lock(&reg.conns).insert((h.group, h.from), s);
                reg.arrived.notify_all();
            },
        )
        .map_err(|e| CommError::Io {
            op: "connect",
            source: e,
        })?;
        if listeners.address.tcp.ip().is_unspecified() {
            return Err(CommError::InvalidArgument(format!(
                "listen_host {listen_host:?}: give an address the peers can reach, not a wildcard"
            )));
        }
        store.set(
            &Endpoint::addr_key(prefix, rank),
            listeners.address.encode().as_bytes(),
        )?;
        let ep = Arc::new(Endpoint {
            prefix: prefix.to_string(),
            prefix_hash,
            world_rank: rank,
            store,
            registry: registry.clone(),
            addrs: Mutex::new(HashMap::new()),
            listeners,
        });
        let path = "w".to_string();
        Ok(TcpComm::new(Group {
            id: fnv1a(&[prefix.as_bytes(), path.as_bytes()]),
            ep,
            path,
            rank,
            members: (0..size).collect(),
            ctl: Arc::new(Control::new(timeout, registry)),
            io: Mutex::new(Io::default()),
            shm: ShmConfig::from_env(),
            device: Device::Cpu,
            mode: HostMode::Direct,
        }))
    }

    fn new(g: Group) -> TcpComm {
        TcpComm {
            g: Arc::new(g),
            queue: Arc::new(Queue::default()),
        }
    }

    /// The group, to reconfigure: ends the communicator's thread first (once what was
    /// started has run), after which nothing else holds it.
    fn configure(&mut self, f: impl FnOnce(&mut Group)) {
        self.queue.close();
        match Arc::get_mut(&mut self.g) {
            Some(g) => f(g),
            // Unreachable: only the thread, now ended, shares the group.
            None => tracing::error!(
                group = %self.g.path,
                "comm: cannot reconfigure a communicator that is still shared (internal error)"
            ),
        }
    }

    /// Moves the communicator to `device`: every tensor handed to it must live there
    /// (others are refused with [`CommError::WrongDevice`]). On a CUDA device each call
    /// stages its tensors through a pinned host buffer that the communicator keeps (see
    /// the module docs), so several processes can share one GPU, or use GPUs without
    /// NCCL. Groups split later inherit it. Ranks may use different devices. Call it right
    /// after [`TcpComm::connect`].
    pub fn with_device(mut self, device: Device) -> TcpComm {
        self.configure(|g| {
            let force = g.mode != HostMode::Direct && g.device == Device::Cpu;
            g.device = device;
            g.mode = mode_for(device, force);
        });
        self
    }

    /// On the CPU, stages every call through the communicator's host buffer (copy in, the
    /// algorithm, copy out) exactly as a CUDA communicator does, instead of working in the
    /// caller's tensors: to test that path without a GPU. No effect on a CUDA device
    /// (always staged). Groups split later inherit it.
    pub fn with_host_staging(mut self, staging: bool) -> TcpComm {
        self.configure(|g| g.mode = mode_for(g.device, staging));
        self
    }

    /// Sets from which size on (bytes of the whole tensor) all-reduces, reduce-scatters and
    /// all-gathers among ranks of one host go through shared memory (`Some(0)`: all of
    /// them), or turns that off (`None`); the default comes from the environment (see the
    /// module docs). Groups split later inherit it. Every rank
    /// should pass the same value: the ranks agree on the largest threshold, and shared
    /// memory is used only if no rank turned it off.
    pub fn with_shm_min_bytes(mut self, min_bytes: Option<usize>) -> TcpComm {
        self.configure(|g| match min_bytes {
            Some(b) => {
                g.shm.enabled = true;
                g.shm.min_bytes = b;
            }
            None => g.shm.enabled = false,
        });
        self
    }

    /// The TCP address this process listens on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.g.ep.listeners.address.tcp
    }

    /// Bytes of host memory the communicator keeps for staging, and how many times it
    /// allocated it (a CUDA or staged communicator allocates only when a call needs more
    /// than it holds).
    pub fn staging_stats(&self) -> (usize, u64) {
        lock(&self.g.io).stage.stats()
    }

    /// Runs a blocking call after everything started before it.
    fn blocking<T>(&self, f: impl FnOnce(&Group) -> Result<T, CommError>) -> Result<T, CommError> {
        self.queue.drain(&self.g.ctl)?;
        f(&self.g)
    }

    fn start(&self, op: &'static str, job: Job) -> Result<Box<dyn Work>, CommError> {
        self.g.ctl.check()?;
        self.queue.push(&self.g, op, job)
    }
}

impl Drop for TcpComm {
    fn drop(&mut self) {
        // What was started still runs (peers expect it), then the thread ends.
        self.queue.close();
    }
}

/// Element type and row count of a tensor whose rows a gather or scatter cuts.
fn rows_of(t: &Tensor) -> usize {
    t.size().first().copied().unwrap_or(0).max(0) as usize
}

/// Checks that `part` (dtype `pe`) is `want_rows` rows of `full` (dtype `fe`): same dtype,
/// same trailing shape; returns the elements per row.
fn check_rows(
    opname: &'static str,
    (part, pe): (&Tensor, Elem),
    (full, fe): (&Tensor, Elem),
    want_rows: usize,
) -> Result<usize, CommError> {
    if pe != fe {
        return Err(CommError::DtypeMismatch {
            op: opname,
            expected: fe.kind(),
            got: pe.kind(),
        });
    }
    let (ps, fs) = (part.size(), full.size());
    if ps.is_empty() || fs.len() != ps.len() || ps[1..] != fs[1..] {
        return Err(CommError::SizeMismatch {
            op: opname,
            detail: format!(
                "shapes {ps:?} and {fs:?} must have at least one dim and equal trailing dims"
            ),
        });
    }
    let rows = ps[0] as usize;
    if rows != want_rows {
        return Err(CommError::SizeMismatch {
            op: opname,
            detail: format!(
                "this rank's part must have {want_rows} rows of the {} (shard_range), got {rows}",
                fs[0]
            ),
        });
    }
    Ok(fs[1..].iter().product::<i64>() as usize)
}

fn reducible(opname: &'static str, e: Elem) -> Result<Elem, CommError> {
    if e.reducible() {
        Ok(e)
    } else {
        Err(CommError::InvalidArgument(format!(
            "{opname}: cannot reduce {:?} tensors",
            e.kind()
        )))
    }
}

/// Byte offset and length of each rank's rows when `rows` rows of `row_bytes` are cut `n`
/// ways.
fn segments(rows: usize, n: usize, row_bytes: usize) -> Vec<(usize, usize)> {
    (0..n)
        .map(|p| {
            let s = shard_range(rows, n, p);
            (s.start * row_bytes, s.len() * row_bytes)
        })
        .collect()
}

impl Group {
    /// The rule every call checks first: the tensor lives on this communicator's device and
    /// has a dtype the collectives move. Returns its element type.
    fn arg(&self, opname: &'static str, t: &Tensor) -> Result<Elem, CommError> {
        let got = t.device();
        if got != self.device {
            return Err(CommError::WrongDevice {
                op: opname,
                expected: self.device,
                got,
            });
        }
        let kind = t.f_kind()?;
        Elem::from_kind(kind).ok_or_else(|| {
            CommError::InvalidArgument(format!("{opname}: unsupported dtype {kind:?}"))
        })
    }

    /// Host memory for the tensors of one call (see [`stage`]).
    fn hosts(&self, io: &mut Io, args: &[(&Tensor, Fill)]) -> Result<Vec<Host>, CommError> {
        io.stage.host(self.mode, args)
    }

    fn n(&self) -> usize {
        self.members.len()
    }

    fn peer_of(&self, offset: isize) -> usize {
        let n = self.n() as isize;
        ((self.rank as isize + offset).rem_euclid(n)) as usize
    }

    /// Runs one call: checks the state, holds the call lock, enforces the deadline, and
    /// turns a communication failure into an unusable communicator.
    fn call<T>(
        &self,
        opname: &'static str,
        f: impl FnOnce(&Group, &mut Io, &Ctx<'_>) -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        self.ctl.check()?;
        let mut io = lock(&self.io);
        self.ctl.check()?;
        let timeout = self.ctl.timeout();
        let ctx = Ctx {
            op: opname,
            deadline: Instant::now() + timeout,
            timeout,
            aborted: &self.ctl.aborted,
        };
        let _span =
            tracing::trace_span!("collective", backend = "tcp", op = opname, group = %self.path)
                .entered();
        f(self, &mut io, &ctx).map_err(|e| {
            if self.ctl.aborted.load(Ordering::SeqCst) {
                return CommError::Aborted;
            }
            self.ctl.poison(&e);
            e
        })
    }

    fn remaining(ctx: &Ctx<'_>) -> Result<Duration, CommError> {
        let left = ctx.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(CommError::Timeout {
                op: ctx.op,
                after: ctx.timeout,
            })
        } else {
            Ok(left)
        }
    }

    /// The connection on which this rank sends to group rank `peer`.
    fn out_link(&self, io: &mut Io, peer: usize, ctx: &Ctx<'_>) -> Result<Arc<Sock>, CommError> {
        if let Some(s) = io.out.get(&peer) {
            return Ok(s.clone());
        }
        let world = self.members[peer];
        let addr = self.ep.addr_of(world, ctx)?;
        let s = net::connect(
            &addr,
            &self.ep.listeners.address.host,
            Self::remaining(ctx)?,
        )
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => CommError::PeerLost {
                rank: world,
                op: ctx.op,
            },
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => CommError::Timeout {
                op: ctx.op,
                after: ctx.timeout,
            },
            _ => CommError::Io {
                op: ctx.op,
                source: e,
            },
        })?;
        let hello = Hello {
            prefix_hash: self.ep.prefix_hash,
            group: self.id,
            from: self.ep.world_rank,
            to: world,
        };
        hello
            .send(&s, Self::remaining(ctx)?)
            .map_err(|_| CommError::PeerLost {
                rank: world,
                op: ctx.op,
            })?;
        self.adopt(s, io, peer, true)
    }

    /// Registers a new connection (so that abort can close it) and caches it.
    fn adopt(&self, s: Sock, io: &mut Io, peer: usize, out: bool) -> Result<Arc<Sock>, CommError> {
        let s = Arc::new(s);
        lock(&self.ctl.sockets).push(s.clone());
        if self.ctl.aborted.load(Ordering::SeqCst) {
            // abort() may have run between our check and the registration above.
            s.shutdown();
            return Err(CommError::Aborted);
        }
        if out {
            io.out.insert(peer, s.clone());
        } else {
            io.inn.insert(peer, s.clone());
        }
        Ok(s)
    }

    /// The connection on which this rank receives from group rank `peer`.
    fn in_link(&self, io: &mut Io, peer: usize, ctx: &Ctx<'_>) -> Result<Arc<Sock>, CommError> {
        if let Some(s) = io.inn.get(&peer) {
            return Ok(s.clone());
        }
        let world = self.members[peer];
        let reg = &self.ep.registry;
        let mut conns = lock(&reg.conns);
        let s = loop {
            if let Some(s) = conns.remove(&(self.id, world)) {
                break s;
            }
            if self.ctl.aborted.load(Ordering::SeqCst) {
                return Err(CommError::Aborted);
            }
            let left = Self::remaining(ctx)?;
            conns = reg
                .arrived
                .wait_timeout(conns, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        drop(conns);
        s.prepare().map_err(|e| CommError::Io {
            op: ctx.op,
            source: e,
        })?;
        self.adopt(s, io, peer, false)
    }

    /// The pipelined ring over `segs` (byte offset and length of each rank's segment of the
    /// buffer at `base`), steps `steps` of the combined schedule: at step `s` this rank sends
    /// segment `rank - s - 1` and receives segment `rank - s - 2` (mod n), reducing during
    /// the first `n - 1` steps (reduce-scatter) and copying after (all-gather). Whatever a
    /// step receives is what the next step sends, so the send stream simply follows the
    /// receive stream.
    #[allow(clippy::too_many_arguments)]
    fn ring(
        &self,
        io: &mut Io,
        ctx: &Ctx<'_>,
        base: *mut u8,
        segs: &[(usize, usize)],
        steps: std::ops::Range<usize>,
        reduce: Option<(Elem, ReduceOp)>,
        hdr: Header,
    ) -> Result<(), CommError> {
        let n = self.n();
        let seg = |back: usize| segs[self.peer_of(-(back as isize))];
        let (next, prev) = (self.peer_of(1), self.peer_of(-1));
        let out_sock = self.out_link(io, next, ctx)?;
        let in_sock = self.in_link(io, prev, ctx)?;
        let first = seg(steps.start + 1);
        let mut out = Out::new(
            &out_sock,
            self.members[next],
            Gate::Follow {
                prefix: HDR + first.1,
                input: 0,
            },
        );
        let mut inn = In::new(&in_sock, self.members[prev]);
        out.header(hdr);
        inn.header(hdr, OnMismatch::Fail);
        // SAFETY (all `data` calls): the regions are segments of the caller's buffer, which
        // outlives the run; received segments are disjoint from each other within each
        // phase, and a segment is only overwritten after its earlier bytes were sent (see
        // the module docs of `engine`: the ring's data dependencies order them).
        unsafe { out.data(base.add(first.0), first.1) };
        for s in steps.clone() {
            let (off, len) = seg(s + 2);
            let mode = match reduce {
                Some((elem, op)) if s + 1 < n => Mode::Reduce {
                    elem,
                    op,
                    divide: (op == ReduceOp::Avg && s + 2 == n).then_some(n),
                },
                _ => Mode::Copy,
            };
            // SAFETY: as above: segment `off..off+len` of the caller's buffer.
            unsafe { inn.data(base.add(off), len, mode) };
            if s + 1 < steps.end {
                // SAFETY: as above; sent only once received (the gate).
                unsafe { out.data(base.add(off), len) };
            }
        }
        engine::run(&mut [out], &mut [inn], &mut io.scratch, ctx)?.map_or(Ok(()), Err)
    }

    /// Every rank sends `send(peer)` to every other rank and receives into `recv(peer)`.
    fn exchange(
        &self,
        io: &mut Io,
        ctx: &Ctx<'_>,
        hdr: Header,
        send: &dyn Fn(usize) -> (*const u8, usize),
        recv: &dyn Fn(usize) -> (*mut u8, usize),
    ) -> Result<(), CommError> {
        let mut outs = Vec::new();
        let mut ins = Vec::new();
        let mut socks = Vec::new();
        for p in (0..self.n()).filter(|&p| p != self.rank) {
            socks.push((p, self.out_link(io, p, ctx)?, self.in_link(io, p, ctx)?));
        }
        for (p, o, i) in &socks {
            let mut out = Out::new(o, self.members[*p], Gate::Open);
            out.header(hdr);
            let (ptr, len) = send(*p);
            // SAFETY: the callers pass regions of buffers that outlive the run; receive
            // regions are disjoint and distinct from the send regions.
            unsafe { out.data(ptr, len) };
            outs.push(out);
            let mut inn = In::new(i, self.members[*p]);
            inn.header(hdr, OnMismatch::Fail);
            let (ptr, len) = recv(*p);
            // SAFETY: as above.
            unsafe { inn.data(ptr, len, Mode::Copy) };
            ins.push(inn);
        }
        engine::run(&mut outs, &mut ins, &mut io.scratch, ctx)?.map_or(Ok(()), Err)
    }

    /// One-shot all-reduce of `bytes` at `base`: everybody exchanges everything, then each
    /// rank combines the n inputs in rank order (so every rank computes the same bits).
    #[allow(clippy::too_many_arguments)]
    fn all_reduce_one_shot(
        &self,
        io: &mut Io,
        ctx: &Ctx<'_>,
        base: *mut u8,
        bytes: usize,
        elem: Elem,
        rop: ReduceOp,
        hdr: Header,
    ) -> Result<(), CommError> {
        let n = self.n();
        let stride = round8(bytes);
        let mut work = std::mem::take(&mut io.work);
        if work.len() * 8 < n * stride {
            work.resize(n * stride / 8, 0);
        }
        let wb = bytes_of_u64(&mut work).as_mut_ptr();
        // SAFETY: slot p of `work` is [p*stride, p*stride+bytes), inside the buffer.
        let result = self.exchange(io, ctx, hdr, &|_| (base as *const u8, bytes), &|p| {
            (unsafe { wb.add(p * stride) }, bytes)
        });
        if result.is_ok() {
            let w = bytes_of_u64(&mut work);
            // SAFETY: base holds `bytes` bytes of the caller's tensor, not aliased by `work`.
            let mine = unsafe { std::slice::from_raw_parts_mut(base, bytes) };
            w[self.rank * stride..self.rank * stride + bytes].copy_from_slice(mine);
            let (acc, rest) = w.split_at_mut(stride);
            for p in 1..n {
                elem::reduce(
                    elem,
                    &mut acc[..bytes],
                    &rest[(p - 1) * stride..(p - 1) * stride + bytes],
                    rop,
                );
            }
            if rop == ReduceOp::Avg {
                elem::divide(elem, &mut acc[..bytes], n);
            }
            mine.copy_from_slice(&acc[..bytes]);
        }
        io.work = work;
        result
    }

    fn next_seq(io: &mut Io) -> u64 {
        io.seq += 1;
        io.seq
    }

    /// Gathers `per_rank` bytes from every rank into `buf` (rank order), own slot filled.
    fn gather_bytes(
        &self,
        io: &mut Io,
        ctx: &Ctx<'_>,
        buf: &mut [u8],
        per_rank: usize,
        hdr: Header,
    ) -> Result<(), CommError> {
        let n = self.n();
        let base = buf.as_mut_ptr();
        let segs: Vec<(usize, usize)> = (0..n).map(|p| (p * per_rank, per_rank)).collect();
        if per_rank * n <= SMALL && n <= ONE_SHOT_RANKS {
            let me = self.rank;
            self.exchange(
                io,
                ctx,
                hdr,
                // SAFETY: slot `me` of `buf` (n slots of per_rank bytes).
                &|_| (unsafe { base.add(me * per_rank) } as *const u8, per_rank),
                // SAFETY: slot p of `buf`; the slots are disjoint.
                &|p| (unsafe { base.add(p * per_rank) }, per_rank),
            )
        } else {
            self.ring(io, ctx, base, &segs, n - 1..2 * n - 2, None, hdr)
        }
    }

    /// Whether this all-reduce, reduce-scatter or all-gather of `bytes` (the whole tensor)
    /// goes through shared memory, setting it up on the way: the first such call has the
    /// ranks agree on the settings (so that they all take the same path whatever their
    /// environment), the first one above the agreed threshold makes the segment. Both steps
    /// are collective, over the sockets, at the same call on every rank.
    fn shm_ready(
        &self,
        io: &mut Io,
        ctx: &Ctx<'_>,
        seq: u64,
        bytes: usize,
    ) -> Result<bool, CommError> {
        if matches!(io.shm, ShmState::Unknown) {
            io.shm = self.shm_agree(io, ctx, seq)?;
        }
        if let ShmState::Agreed { min_bytes, slot } = io.shm {
            if bytes >= min_bytes {
                io.shm = self.shm_create(io, ctx, seq, min_bytes, slot)?;
            }
        }
        Ok(matches!(&io.shm, ShmState::On(s) if bytes >= s.min_bytes))
    }

    fn shm_header(&self, seq: u64, per_rank: usize, round: u64) -> Header {
        Header {
            op: op::SHM_SETUP,
            dtype: Elem::U8.code(),
            rop: 0,
            seq,
            numel: (per_rank * self.n()) as u64,
            extra: round,
        }
    }

    /// Round one of the setup: every rank's host, slot size, threshold and protocol
    /// version. Shared memory is on only if all ranks share a host and want it with the
    /// same slot size; the threshold is the largest asked for.
    fn shm_agree(&self, io: &mut Io, ctx: &Ctx<'_>, seq: u64) -> Result<ShmState, CommError> {
        let (n, r) = (self.n(), self.rank);
        let slot = match self.shm.enabled {
            true => shm::slot_for(n, self.shm.slot).unwrap_or(0),
            false => 0,
        };
        let mut table = vec![0u64; 4 * n];
        table[4 * r..4 * r + 4].copy_from_slice(&[
            shm::host_hash(),
            slot as u64,
            self.shm.min_bytes as u64,
            shm::VERSION,
        ]);
        let hdr = self.shm_header(seq, 32, 0);
        self.gather_bytes(io, ctx, bytes_of_u64(&mut table), 32, hdr)?;
        let rows: Vec<&[u64]> = table.chunks(4).collect();
        let first = rows[0];
        let agreed = rows
            .iter()
            .all(|w| w[0] == first[0] && w[1] == first[1] && w[3] == first[3]);
        if !agreed || first[1] == 0 {
            tracing::debug!(group = %self.path, "comm: no shared memory (disabled, or ranks on several hosts)");
            return Ok(ShmState::Off);
        }
        let min_bytes = rows.iter().map(|w| w[2]).max().unwrap_or(u64::MAX);
        Ok(ShmState::Agreed {
            min_bytes: usize::try_from(min_bytes).unwrap_or(usize::MAX),
            slot: first[1] as usize,
        })
    }

    /// Rounds two and three: rank 0 creates the segment and tells everybody its nonce; the
    /// others map it; all learn whether everybody did; rank 0 removes the name.
    fn shm_create(
        &self,
        io: &mut Io,
        ctx: &Ctx<'_>,
        seq: u64,
        min_bytes: usize,
        slot: usize,
    ) -> Result<ShmState, CommError> {
        let (n, r) = (self.n(), self.rank);
        let world = self.ep.world_rank;
        let name = |nonce| shm::segment_name(self.ep.prefix_hash, self.id, nonce);
        let mut seg = None;
        let mut words = vec![0u64; n];
        if r == 0 {
            for _ in 0..3 {
                let nonce = shm::nonce();
                match shm::Segment::create(&name(nonce), n, slot, nonce, world) {
                    Ok(s) => {
                        seg = Some(s);
                        words[0] = nonce;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => {
                        tracing::warn!(group = %self.path, "comm: no shared-memory segment ({e}); using sockets");
                        break;
                    }
                }
            }
        }
        self.gather_bytes(
            io,
            ctx,
            bytes_of_u64(&mut words),
            8,
            self.shm_header(seq, 8, 1),
        )?;
        let nonce = words[0];
        if nonce == 0 {
            return Ok(ShmState::Off);
        }
        if r != 0 {
            seg = shm::Segment::open(&name(nonce), n, slot, nonce, world)
                .map_err(|e| {
                    tracing::warn!(group = %self.path, "comm: cannot map the shared-memory segment ({e}); using sockets");
                })
                .ok();
        }
        let mut ok = vec![0u64; n];
        ok[r] = u64::from(seg.is_some());
        // On an error here `seg` is dropped, which removes the name on rank 0.
        self.gather_bytes(
            io,
            ctx,
            bytes_of_u64(&mut ok),
            8,
            self.shm_header(seq, 8, 2),
        )?;
        let Some(seg) = seg.filter(|_| ok.iter().all(|&x| x == 1)) else {
            return Ok(ShmState::Off);
        };
        seg.unlink();
        let seg = Arc::new(seg);
        lock(&self.ctl.segments).push(seg.clone());
        if self.ctl.aborted.load(Ordering::SeqCst) {
            // abort() may have run before the registration above.
            seg.fail();
            return Err(CommError::Aborted);
        }
        tracing::debug!(group = %self.path, slot, min_bytes, "comm: shared memory on");
        Ok(ShmState::On(Box::new(shm::Shm::new(seg, r, min_bytes))))
    }

    /// The communicator's connections, for the shared-memory waits to watch.
    fn links(&self, io: &Io) -> Vec<shm::Link> {
        let link = |inbound: bool| {
            move |(p, s): (&usize, &Arc<Sock>)| shm::Link {
                fd: s.as_raw_fd(),
                peer: self.members[*p],
                inbound,
            }
        };
        io.inn
            .iter()
            .map(link(true))
            .chain(io.out.iter().map(link(false)))
            .collect()
    }
}

impl Group {
    fn all_reduce(&self, tensor: &mut Tensor, rop: ReduceOp) -> Result<(), CommError> {
        let opname = "all_reduce";
        let elem = reducible(opname, self.arg(opname, tensor)?)?;
        let n = self.n();
        let (numel, es) = (tensor.numel(), elem.size());
        let bytes = numel * es;
        self.call(opname, |c, io, ctx| {
            let hdr = Header {
                op: op::ALL_REDUCE,
                dtype: elem.code(),
                rop: rop_code(rop),
                seq: Self::next_seq(io),
                numel: numel as u64,
                extra: 0,
            };
            if n == 1 || bytes == 0 {
                return Ok(());
            }
            let mut h = c.hosts(io, &[(&*tensor, Fill::In)])?;
            let base = h[0].ptr();
            let res = (|| {
                if c.shm_ready(io, ctx, hdr.seq, bytes)? {
                    let links = c.links(io);
                    if let ShmState::On(s) = &mut io.shm {
                        // SAFETY: `base` is contiguous host memory of `bytes` bytes
                        // (element-aligned: libtorch storage or a staging region), ours
                        // alone during the call.
                        return unsafe {
                            s.all_reduce(ctx, base, bytes, elem, rop, &hdr, &c.members, &links)
                        };
                    }
                }
                if bytes <= SMALL && n <= ONE_SHOT_RANKS {
                    c.all_reduce_one_shot(io, ctx, base, bytes, elem, rop, hdr)
                } else {
                    let segs = segments(numel, n, es);
                    c.ring(io, ctx, base, &segs, 0..2 * n - 2, Some((elem, rop)), hdr)
                }
            })();
            res?;
            h.swap_remove(0).finish(tensor)
        })
    }

    fn all_gather(&self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        let opname = "all_gather";
        let ie = self.arg(opname, input)?;
        let oe = self.arg(opname, output)?;
        let (n, r) = (self.n(), self.rank);
        let total_rows = rows_of(output);
        let row_elems = check_rows(
            opname,
            (input, ie),
            (output, oe),
            shard_range(total_rows, n, r).len(),
        )?;
        let segs = segments(total_rows, n, row_elems * oe.size());
        let total = output.numel() * oe.size();
        let numel = output.numel();
        self.call(opname, |c, io, ctx| {
            let hdr = Header {
                op: op::ALL_GATHER,
                dtype: oe.code(),
                rop: 0,
                seq: Self::next_seq(io),
                numel: numel as u64,
                extra: row_elems as u64,
            };
            let mut h = c.hosts(io, &[(input, Fill::In), (&*output, Fill::Out)])?;
            let (inp, base) = (h[0].ptr(), h[1].ptr());
            // Own rows first (a local copy), then the others arrive.
            if segs[r].1 > 0 {
                // SAFETY: the input holds segs[r].1 bytes (check_rows); the output's segment
                // r has that size; the two are distinct buffers, or (direct mode) equal
                // views that copy onto themselves.
                unsafe { std::ptr::copy(inp, base.add(segs[r].0), segs[r].1) };
            }
            let res = (|| {
                if n == 1 || total == 0 {
                    return Ok(());
                }
                if c.shm_ready(io, ctx, hdr.seq, total)? {
                    let links = c.links(io);
                    if let ShmState::On(s) = &mut io.shm {
                        // SAFETY: the output's contiguous host memory holds every segment,
                        // ours already filled in, and is ours alone during the call.
                        return unsafe { s.all_gather(ctx, base, &segs, &hdr, &c.members, &links) };
                    }
                }
                if total <= SMALL && n <= ONE_SHOT_RANKS {
                    c.exchange(
                        io,
                        ctx,
                        hdr,
                        // SAFETY: our segment of the output buffer.
                        &|_| (unsafe { base.add(segs[r].0) } as *const u8, segs[r].1),
                        // SAFETY: segment p of the output buffer; segments are disjoint.
                        &|p| (unsafe { base.add(segs[p].0) }, segs[p].1),
                    )
                } else {
                    c.ring(io, ctx, base, &segs, n - 1..2 * n - 2, None, hdr)
                }
            })();
            res?;
            h.swap_remove(1).finish(output)
        })
    }

    fn reduce_scatter(
        &self,
        input: &Tensor,
        output: &mut Tensor,
        rop: ReduceOp,
    ) -> Result<(), CommError> {
        let opname = "reduce_scatter";
        let ie = reducible(opname, self.arg(opname, input)?)?;
        let oe = self.arg(opname, output)?;
        let (n, r) = (self.n(), self.rank);
        let total_rows = rows_of(input);
        let row_elems = check_rows(
            opname,
            (output, oe),
            (input, ie),
            shard_range(total_rows, n, r).len(),
        )?;
        let segs = segments(total_rows, n, row_elems * ie.size());
        let total = input.numel() * ie.size();
        let numel = input.numel();
        self.call(opname, |c, io, ctx| {
            let hdr = Header {
                op: op::REDUCE_SCATTER,
                dtype: ie.code(),
                rop: rop_code(rop),
                seq: Self::next_seq(io),
                numel: numel as u64,
                extra: row_elems as u64,
            };
            let mut h = c.hosts(io, &[(input, Fill::In), (&*output, Fill::Out)])?;
            let (in_ptr, out_ptr) = (h[0].ptr(), h[1].ptr());
            c.reduce_scatter_bytes(io, ctx, in_ptr, out_ptr, &segs, ie, rop, hdr, total)?;
            h.swap_remove(1).finish(output)
        })
    }

    /// The reduce-scatter of `total` bytes at `in_ptr` (segments `segs`) into this rank's
    /// segment at `out_ptr` (host memory; the output may overlap the input).
    #[allow(clippy::too_many_arguments)]
    fn reduce_scatter_bytes(
        &self,
        io: &mut Io,
        ctx: &Ctx<'_>,
        in_ptr: *mut u8,
        out_ptr: *mut u8,
        segs: &[(usize, usize)],
        elem: Elem,
        rop: ReduceOp,
        hdr: Header,
        total: usize,
    ) -> Result<(), CommError> {
        let (n, r) = (self.n(), self.rank);
        let mine = segs[r];
        if n == 1 || total == 0 {
            if mine.1 > 0 {
                // SAFETY: both hold mine.1 bytes (checked); copy handles overlap.
                unsafe { std::ptr::copy(in_ptr.add(mine.0), out_ptr, mine.1) };
            }
            return Ok(());
        }
        if self.shm_ready(io, ctx, hdr.seq, total)? {
            let links = self.links(io);
            if let ShmState::On(s) = &mut io.shm {
                if s.scatter_piece().is_some() {
                    let (a, b) = (in_ptr as usize, out_ptr as usize);
                    let input = if a < b + mine.1 && b < a + total {
                        // The output overlaps the input: reduce from a copy.
                        if io.work.len() * 8 < total {
                            io.work.resize(total.div_ceil(8), 0);
                        }
                        let w = bytes_of_u64(&mut io.work).as_mut_ptr();
                        // SAFETY: work holds at least `total` bytes, the input `total`.
                        unsafe { std::ptr::copy_nonoverlapping(in_ptr, w, total) };
                        w as *const u8
                    } else {
                        in_ptr as *const u8
                    };
                    // SAFETY: `input` holds every segment (the tensor or our copy of it),
                    // the output our segment's bytes, no overlap; both contiguous and
                    // element-aligned, ours alone during the call.
                    return unsafe {
                        s.reduce_scatter(
                            ctx,
                            input,
                            segs,
                            out_ptr,
                            elem,
                            rop,
                            &hdr,
                            &self.members,
                            &links,
                        )
                    };
                }
            }
        }
        let mut work = std::mem::take(&mut io.work);
        let result = if total <= SMALL && n <= ONE_SHOT_RANKS {
            // Each peer gets its own segment of our input; we receive everybody's version
            // of ours, then combine in rank order.
            let stride = round8(mine.1);
            if work.len() * 8 < n * stride {
                work.resize(n * stride / 8, 0);
            }
            let wb = bytes_of_u64(&mut work).as_mut_ptr();
            let res = self.exchange(
                io,
                ctx,
                hdr,
                // SAFETY: segment p of the input.
                &|p| (unsafe { in_ptr.add(segs[p].0) } as *const u8, segs[p].1),
                // SAFETY: slot p of `work` (n slots of `stride` bytes), disjoint.
                &|p| (unsafe { wb.add(p * stride) }, mine.1),
            );
            if res.is_ok() && mine.1 > 0 {
                let w = bytes_of_u64(&mut work);
                // SAFETY: input holds segment r.
                let own = unsafe { std::slice::from_raw_parts(in_ptr.add(mine.0), mine.1) };
                w[r * stride..r * stride + mine.1].copy_from_slice(own);
                let (acc, rest) = w.split_at_mut(stride);
                for p in 1..n {
                    elem::reduce(
                        elem,
                        &mut acc[..mine.1],
                        &rest[(p - 1) * stride..(p - 1) * stride + mine.1],
                        rop,
                    );
                }
                if rop == ReduceOp::Avg {
                    elem::divide(elem, &mut acc[..mine.1], n);
                }
                // SAFETY: the output holds mine.1 bytes.
                unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), out_ptr, mine.1) };
            }
            res
        } else {
            // The ring reduces in place: work on a copy of the input.
            if work.len() * 8 < total {
                work.resize(total.div_ceil(8), 0);
            }
            let wb = bytes_of_u64(&mut work).as_mut_ptr();
            // SAFETY: work holds at least `total` bytes; input holds `total` bytes.
            unsafe { std::ptr::copy_nonoverlapping(in_ptr, wb, total) };
            let res = self.ring(io, ctx, wb, segs, 0..n - 1, Some((elem, rop)), hdr);
            if res.is_ok() && mine.1 > 0 {
                // SAFETY: segment r of work and the output both hold mine.1 bytes.
                unsafe { std::ptr::copy_nonoverlapping(wb.add(mine.0), out_ptr, mine.1) };
            }
            res
        };
        io.work = work;
        result
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CommError> {
        let opname = "broadcast";
        let elem = self.arg(opname, tensor)?;
        let n = self.n();
        if root >= n {
            return Err(CommError::InvalidArgument(format!(
                "broadcast: root {root} of {n} ranks"
            )));
        }
        let numel = tensor.numel();
        let bytes = numel * elem.size();
        let r = self.rank;
        self.call(opname, |c, io, ctx| {
            let hdr = Header {
                op: op::BROADCAST,
                dtype: elem.code(),
                rop: 0,
                seq: Self::next_seq(io),
                numel: numel as u64,
                extra: root as u64,
            };
            if n == 1 {
                return Ok(());
            }
            // Only the root's values are read.
            let fill = if r == root { Fill::In } else { Fill::Out };
            let mut h = c.hosts(io, &[(&*tensor, fill)])?;
            let base = h[0].ptr();
            let mut outs = Vec::new();
            let mut ins = Vec::new();
            let flat = bytes <= SMALL || n == 2;
            let pos = (r + n - root) % n;
            let targets: Vec<usize> = match (flat, pos) {
                (true, 0) => (0..n).filter(|&p| p != root).collect(),
                (true, _) => vec![],
                (false, p) if p + 1 < n => vec![c.peer_of(1)],
                (false, _) => vec![],
            };
            let source = match (flat, pos) {
                (_, 0) => None,
                (true, _) => Some(root),
                (false, _) => Some(c.peer_of(-1)),
            };
            let gate = if source.is_some() {
                Gate::Follow {
                    prefix: HDR,
                    input: 0,
                }
            } else {
                Gate::Open
            };
            let mut socks = Vec::new();
            for &t in &targets {
                socks.push((t, c.out_link(io, t, ctx)?));
            }
            let src_sock = match source {
                Some(s) => Some((s, c.in_link(io, s, ctx)?)),
                None => None,
            };
            if let Some((s, sock)) = &src_sock {
                let mut inn = In::new(sock, c.members[*s]);
                inn.header(hdr, OnMismatch::Fail);
                // SAFETY: the host bytes of the tensor; forwarded only once received (the
                // gate).
                unsafe { inn.data(base, bytes, Mode::Copy) };
                ins.push(inn);
            }
            for (t, sock) in &socks {
                let mut out = Out::new(sock, c.members[*t], gate);
                out.header(hdr);
                // SAFETY: as above.
                unsafe { out.data(base, bytes) };
                outs.push(out);
            }
            engine::run(&mut outs, &mut ins, &mut io.scratch, ctx)?.map_or(Ok(()), Err)?;
            let host = h.swap_remove(0);
            if r == root {
                Ok(())
            } else {
                host.finish(tensor)
            }
        })
    }

    fn batch_p2p(&self, ops: &mut [P2POp<'_>]) -> Result<(), CommError> {
        let opname = "send/recv";
        let n = self.n();
        let mut elems = Vec::with_capacity(ops.len());
        for o in ops.iter() {
            let (t, peer) = match o {
                P2POp::Send { tensor, peer } => (&**tensor, *peer),
                P2POp::Recv { tensor, peer } => (&**tensor, *peer),
            };
            if peer >= n || peer == self.rank {
                return Err(CommError::InvalidArgument(format!(
                    "{opname}: peer {peer} (this is rank {} of {n}; no messages to self)",
                    self.rank
                )));
            }
            elems.push(self.arg(opname, t)?);
        }
        self.call(opname, |c, io, ctx| {
            let args: Vec<(&Tensor, Fill)> = ops
                .iter()
                .map(|o| match o {
                    P2POp::Send { tensor, .. } => (&**tensor, Fill::In),
                    P2POp::Recv { tensor, .. } => (&**tensor, Fill::Out),
                })
                .collect();
            let hosts = c.hosts(io, &args)?;
            drop(args);
            let mut outs: BTreeMap<usize, Out> = BTreeMap::new();
            let mut ins: BTreeMap<usize, In> = BTreeMap::new();
            let mut socks = Vec::new();
            for ((o, h), elem) in ops.iter().zip(&hosts).zip(&elems) {
                let t = h.tensor();
                let bytes = t.numel() * elem.size();
                let header = Header {
                    op: op::P2P,
                    dtype: elem.code(),
                    rop: 0,
                    seq: 0,
                    numel: t.numel() as u64,
                    extra: shape_hash(&t.size()),
                };
                match o {
                    P2POp::Send { peer, .. } => {
                        let s = c.out_link(io, *peer, ctx)?;
                        let out = outs
                            .entry(*peer)
                            .or_insert_with(|| Out::new(&s, c.members[*peer], Gate::Open));
                        out.header(header);
                        // SAFETY: the host bytes outlive the run and are only read.
                        unsafe { out.data(h.ptr(), bytes) };
                        socks.push(s);
                    }
                    P2POp::Recv { peer, .. } => {
                        let s = c.in_link(io, *peer, ctx)?;
                        let inn = ins
                            .entry(*peer)
                            .or_insert_with(|| In::new(&s, c.members[*peer]));
                        inn.header(header, OnMismatch::Drain);
                        // SAFETY: each receive has its own host buffer (a distinct tensor the
                        // caller lent us mutably, or its own staging region).
                        unsafe { inn.data(h.ptr(), bytes, Mode::Copy) };
                        socks.push(s);
                    }
                }
            }
            let mut outs: Vec<Out> = outs.into_values().collect();
            let mut ins: Vec<In> = ins.into_values().collect();
            if let Some(e) = engine::run(&mut outs, &mut ins, &mut io.scratch, ctx)? {
                // The mismatched message was read and dropped: the stream is still in
                // step. Raised outside `call` so that it does not break the communicator.
                return Ok(Some(e));
            }
            for (o, h) in ops.iter_mut().zip(hosts) {
                if let P2POp::Recv { tensor, .. } = o {
                    h.finish(tensor)?;
                }
            }
            Ok(None)
        })?
        .map_or(Ok(()), Err)
    }

    fn barrier(&self) -> Result<(), CommError> {
        let n = self.n();
        self.call("barrier", |c, io, ctx| {
            let seq = Self::next_seq(io);
            // Dissemination: after round k every rank has heard (transitively) from 2^(k+1)
            // ranks; ceil(log2 n) rounds.
            let mut dist = 1;
            let mut round = 0u64;
            while dist < n {
                let hdr = Header {
                    op: op::BARRIER,
                    dtype: 0,
                    rop: 0,
                    seq,
                    numel: 0,
                    extra: round,
                };
                let (to, from) = (c.peer_of(dist as isize), c.peer_of(-(dist as isize)));
                let o = c.out_link(io, to, ctx)?;
                let i = c.in_link(io, from, ctx)?;
                let mut out = Out::new(&o, c.members[to], Gate::Open);
                out.header(hdr);
                let mut inn = In::new(&i, c.members[from]);
                inn.header(hdr, OnMismatch::Fail);
                if let Some(e) = engine::run(&mut [out], &mut [inn], &mut io.scratch, ctx)? {
                    return Err(e);
                }
                dist *= 2;
                round += 1;
            }
            Ok(())
        })
    }

    fn split(&self, color: Option<u32>, key: usize) -> Result<Option<Group>, CommError> {
        let n = self.n();
        let (table, ordinal) = self.call("split", |c, io, ctx| {
            let seq = Self::next_seq(io);
            io.splits += 1;
            let mut table = vec![0u64; 2 * n];
            table[2 * c.rank] = color.map_or(u64::MAX, u64::from);
            table[2 * c.rank + 1] = key as u64;
            if n > 1 {
                let hdr = Header {
                    op: op::SPLIT,
                    dtype: Elem::U8.code(),
                    rop: 0,
                    seq,
                    numel: 16 * n as u64,
                    extra: 0,
                };
                c.gather_bytes(io, ctx, bytes_of_u64(&mut table), 16, hdr)?;
            }
            Ok((table, io.splits))
        })?;
        let Some(color) = color else { return Ok(None) };
        let mut members: Vec<(u64, usize)> = (0..n)
            .filter(|&p| table[2 * p] == u64::from(color))
            .map(|p| (table[2 * p + 1], p))
            .collect();
        members.sort_unstable();
        let rank = members
            .iter()
            .position(|&(_, p)| p == self.rank)
            .ok_or_else(|| {
                CommError::Protocol("split: this rank is missing from its own color".into())
            })?;
        let path = format!("{}/s{ordinal}c{color}", self.path);
        let ctl = Arc::new(Control::new(self.ctl.timeout(), self.ep.registry.clone()));
        lock(&self.ctl.children).push(Arc::downgrade(&ctl));
        if self.ctl.aborted.load(Ordering::SeqCst) {
            ctl.abort();
        }
        Ok(Some(Group {
            ep: self.ep.clone(),
            id: fnv1a(&[self.ep.prefix.as_bytes(), path.as_bytes()]),
            path,
            rank,
            members: members.iter().map(|&(_, p)| self.members[p]).collect(),
            ctl,
            io: Mutex::new(Io::default()),
            shm: self.shm,
            device: self.device,
            mode: self.mode,
        }))
    }
}

/// Receive, send and receive-into tensors of a started `batch_p2p`, borrowed for the call.
fn borrow_ops(ops: &mut [P2POwned]) -> Vec<P2POp<'_>> {
    ops.iter_mut()
        .map(|op| match op {
            P2POwned::Send { tensor, peer } => P2POp::Send {
                tensor,
                peer: *peer,
            },
            P2POwned::Recv { tensor, peer } => P2POp::Recv {
                tensor,
                peer: *peer,
            },
        })
        .collect()
}

impl Communicator for TcpComm {
    fn backend(&self) -> &'static str {
        "tcp"
    }

    fn device(&self) -> Device {
        self.g.device
    }

    fn rank(&self) -> usize {
        self.g.rank
    }

    fn size(&self) -> usize {
        self.g.n()
    }

    fn world_rank(&self, rank: usize) -> usize {
        self.g.members[rank]
    }

    fn timeout(&self) -> Duration {
        self.g.ctl.timeout()
    }

    fn set_timeout(&self, timeout: Duration) {
        self.g.ctl.set_timeout(timeout);
    }

    fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        self.blocking(|g| g.all_reduce(tensor, op))
    }

    fn all_gather(&self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        self.blocking(|g| g.all_gather(input, output))
    }

    fn reduce_scatter(
        &self,
        input: &Tensor,
        output: &mut Tensor,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.blocking(|g| g.reduce_scatter(input, output, op))
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CommError> {
        self.blocking(|g| g.broadcast(tensor, root))
    }

    fn batch_p2p(&self, ops: &mut [P2POp<'_>]) -> Result<(), CommError> {
        self.blocking(|g| g.batch_p2p(ops))
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.blocking(|g| g.barrier())
    }

    // The started operations check their arguments here, at once (an argument error is
    // returned by the start call and leaves the communicator usable), then run the very
    // code of the blocking calls on the communicator's thread, which checks them again.

    fn all_reduce_start(&self, tensor: Tensor, op: ReduceOp) -> Result<Box<dyn Work>, CommError> {
        let opname = "all_reduce";
        reducible(opname, self.g.arg(opname, &tensor)?)?;
        let mut tensor = tensor;
        self.start(opname, Box::new(move |g| g.all_reduce(&mut tensor, op)))
    }

    fn reduce_scatter_start(
        &self,
        input: Tensor,
        output: Tensor,
        op: ReduceOp,
    ) -> Result<Box<dyn Work>, CommError> {
        let opname = "reduce_scatter";
        let ie = reducible(opname, self.g.arg(opname, &input)?)?;
        let oe = self.g.arg(opname, &output)?;
        let (n, r) = (self.g.n(), self.g.rank);
        let want = shard_range(rows_of(&input), n, r).len();
        check_rows(opname, (&output, oe), (&input, ie), want)?;
        let mut output = output;
        self.start(
            opname,
            Box::new(move |g| g.reduce_scatter(&input, &mut output, op)),
        )
    }

    fn all_gather_start(&self, input: Tensor, output: Tensor) -> Result<Box<dyn Work>, CommError> {
        let opname = "all_gather";
        let ie = self.g.arg(opname, &input)?;
        let oe = self.g.arg(opname, &output)?;
        let (n, r) = (self.g.n(), self.g.rank);
        let want = shard_range(rows_of(&output), n, r).len();
        check_rows(opname, (&input, ie), (&output, oe), want)?;
        let mut output = output;
        self.start(opname, Box::new(move |g| g.all_gather(&input, &mut output)))
    }

    fn batch_p2p_start(&self, ops: Vec<P2POwned>) -> Result<Box<dyn Work>, CommError> {
        let opname = "send/recv";
        let n = self.g.n();
        for o in &ops {
            let (t, peer) = match o {
                P2POwned::Send { tensor, peer } | P2POwned::Recv { tensor, peer } => {
                    (tensor, *peer)
                }
            };
            if peer >= n || peer == self.g.rank {
                return Err(CommError::InvalidArgument(format!(
                    "{opname}: peer {peer} (this is rank {} of {n}; no messages to self)",
                    self.g.rank
                )));
            }
            self.g.arg(opname, t)?;
        }
        let mut ops = ops;
        self.start(
            opname,
            Box::new(move |g| g.batch_p2p(&mut borrow_ops(&mut ops))),
        )
    }

    fn split(
        &self,
        color: Option<u32>,
        key: usize,
    ) -> Result<Option<Arc<dyn Communicator>>, CommError> {
        Ok(self
            .blocking(|g| g.split(color, key))?
            .map(|g| Arc::new(TcpComm::new(g)) as Arc<dyn Communicator>))
    }

    fn abort(&self) {
        self.g.ctl.abort();
    }

    fn is_aborted(&self) -> bool {
        self.g.ctl.aborted.load(Ordering::SeqCst)
    }
}
