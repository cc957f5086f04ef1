//! Shared-memory all-reduce (and reduce-scatter, all-gather) for a communicator whose
//! ranks all run on one host.
//!
//! # Why
//!
//! Between processes of one host the socket ring is bound by memory copies: every hop copies
//! user → kernel → user, and the receiver reduces on top. With more ranks than cores
//! (4 ranks on 2 cores) those copies are the whole cost. Here each rank copies its data into
//! a segment of shared memory once, reduces its share of everybody's data straight from
//! there, and copies the results of the others out: well under half the memory traffic of
//! the ring, and no system call per chunk besides the futex of a barrier. Measured on
//! loopback with 2 cores it is 2–3x the Unix-socket ring at 16–256 MiB and 2–5x at 1 KiB.
//!
//! # The segment
//!
//! A file in `/dev/shm` named `weaver-{prefix hash}-{group id}-{nonce}`, created by group
//! rank 0 with `O_EXCL` and mode 0600, its pages reserved with `posix_fallocate` (a full
//! tmpfs fails the setup cleanly instead of raising SIGBUS later), mapped by every rank and
//! unlinked by rank 0 as soon as everybody has it mapped — from then on nothing can leak,
//! whatever happens to the processes. The setup is a collective over the communicator's
//! sockets (see `TcpComm::shm_ready`): the ranks agree on the slot size and threshold and check
//! that they share a host, rank 0 creates, the others open and check the header, and all
//! agree that everybody succeeded; if anything fails the communicator keeps using the ring.
//!
//! Layout: a header line (magic, size, slot size, nonce), the barrier's arrival counter and
//! the failure word on their own cache lines, two sets (by call parity) of one descriptor
//! line per rank (the call's sequence number, element count, operation, dtype and row
//! width), then [`BUFS`] buffers of one *slot* of `slot` bytes per rank.
//!
//! # The algorithm
//!
//! The tensor is cut into chunks of one slot; each chunk into `n` 64-byte-aligned parts,
//! part `q` reduced by rank `q`. One barrier per step; at step `t` every rank
//!
//! 1. copies chunk `t` of its tensor into its slot of buffer `t % 3` — all but its own part,
//!    which only it reads, straight from the tensor;
//! 2. reduces part `r` (its own) of chunk `t - 1` across all slots **in rank order
//!    `0..n`**, a few KiB at a time through a private block that stays in L1, and writes the
//!    result both into its tensor and into part `r` of its own slot;
//! 3. copies parts `q != r` of chunk `t - 2` from slot `q` into its tensor;
//!
//! then arrives at the barrier. Every element is reduced by exactly one rank in one fixed
//! order, so every rank ends with the same bits (the trait's promise); the kernels are
//! those of the ring (`elem`: one rounding per hop for half types, `Avg` divides once at
//! the end, NaN wins `Max`/`Min`), so integer and exactly representable data give exactly
//! the ring's results. Three buffers make one barrier per step enough: a buffer is written
//! again (step `t + 3`) only after the barrier that ends the step in which its last reader
//! finished (step `t + 2`). Buffers rotate with a chunk counter that runs on across calls,
//! so the unsynchronized last step of one call never touches the buffer that the first
//! steps of the next call write.
//!
//! Reduce-scatter and all-gather are the two halves of this with two phases per step.
//! Reduce-scatter: every rank copies one piece of each other rank's shard into its slot
//! (the slot holds a piece per rank), then each rank reduces its own piece across the slots
//! and its own input, in rank order, straight into its output. All-gather: every rank
//! copies a piece of its shard into its slot, then everybody copies the others' out.
//!
//! # Barriers, failures
//!
//! A barrier is a shared arrival counter: rank `r` adds one and waits until the count
//! reaches `n` times the number of barriers so far. The last rank to arrive wakes the others
//! with `FUTEX_WAKE` (a process-shared futex: not `FUTEX_PRIVATE`). Waiters spin briefly
//! when there are at least as many CPUs as ranks, then sleep in the futex in slices of
//! [`SLICE`]. Every wait honours the call's deadline ([`CommError::Timeout`]) and
//! `abort()`. Any failure of a rank — a timeout, an abort, a broken communicator — stores
//! its world rank in the segment's failure word and wakes everybody, so that the others fail
//! at once with [`CommError::PeerLost`] naming it. A rank that dies without a word (SIGKILL)
//! is noticed between slices through the communicator's sockets, which the kernel closes
//! (hang-up); data arriving on them means that a peer runs a different collective
//! ([`CommError::Protocol`]). Every call publishes its descriptor before the first barrier
//! and checks everybody's after it, so ranks that disagree on the call fail with a typed
//! error before any of them reads another's data.

use std::fs::OpenOptions;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::engine::{Ctx, Header};
use super::{lock, op_name};
use crate::comm::elem::{self, Elem};
use crate::comm::{shard_range, CommError, ReduceOp};

/// Buffers the slots rotate through: three make one barrier per step enough (module docs).
pub(super) const BUFS: usize = 3;
/// Sleep at most this long in one futex wait before looking at the sockets again.
const SLICE: Duration = Duration::from_millis(50);
/// Parts of a chunk start on this boundary (no cache line written by two ranks).
const ALIGN: usize = 64;
/// Bytes reduced at a time through the private block (fits L1 with its `n` sources).
const BLOCK: usize = 16 << 10;
/// How long a waiter spins before it sleeps, when every rank can have its own CPU.
const SPIN: Duration = Duration::from_micros(30);
/// Control lines are this far apart (two cache lines: no false sharing with the adjacent
/// line prefetcher).
const LINE: usize = 128;
const MAGIC: u64 = u64::from_le_bytes(*b"WVRSHM01");
/// Exchanged at setup: ranks built from different versions of this protocol do not share.
pub(super) const VERSION: u64 = 1;

/// Header words (line 0).
const H_MAGIC: usize = 0;
const H_SIZE: usize = 8;
const H_SLOT: usize = 16;
const H_NONCE: usize = 24;
/// The barrier's arrival counter (futex word).
const ARRIVALS: usize = LINE;
/// World rank + 1 of the first rank that failed; 0 while all is well.
const FAILED: usize = 2 * LINE;
/// Descriptor lines: call parity `c`, rank `p` at `DESC + (c * n + p) * LINE` (two sets, so
/// that a rank that starts the next call never overwrites what a slower one still checks).
const DESC: usize = 3 * LINE;
const DESC_WORDS: usize = 4;

const PAGE: usize = 4096;

/// Bytes of the segment for `n` ranks and `slot` bytes per slot, and where the slots start.
fn layout(n: usize, slot: usize) -> (usize, usize) {
    let data = (DESC + 2 * n * LINE).div_ceil(PAGE) * PAGE;
    (data + BUFS * n * slot, data)
}

/// A mapped segment. Shared (`Arc`) between the call that uses it and the communicator's
/// abort/failure path, which only touches its atomics.
#[derive(Debug)]
pub(super) struct Segment {
    base: *mut u8,
    len: usize,
    data: usize,
    n: usize,
    slot: usize,
    world_rank: usize,
    /// The file, while it still has a name that this rank must remove (the creator, until
    /// everybody has mapped it).
    linked: Mutex<Option<PathBuf>>,
}

// SAFETY: the mapping is plain shared memory that lives as long as the `Segment`; every
// access from `&Segment` goes through atomics (the control words), and data slots are only
// touched by the one call that holds the communicator's call lock, following the protocol
// above. Nothing in it is tied to a thread.
unsafe impl Send for Segment {}
// SAFETY: as above: concurrent `&Segment` users only use the atomic control words.
unsafe impl Sync for Segment {}

impl Segment {
    /// Creates the segment `name` in `/dev/shm` for `n` ranks (group rank 0 does this).
    pub(super) fn create(
        name: &str,
        n: usize,
        slot: usize,
        nonce: u64,
        world_rank: usize,
    ) -> io::Result<Segment> {
        let path = PathBuf::from("/dev/shm").join(name);
        let (len, data) = layout(n, slot);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        // From here on the file exists: remove it on every error path (by dropping `seg`).
        let mut seg = Segment {
            base: std::ptr::null_mut(),
            len,
            data,
            n,
            slot,
            world_rank,
            linked: Mutex::new(Some(path)),
        };
        file.set_len(len as u64)?;
        // Reserve the pages now: on a full tmpfs this fails here instead of raising SIGBUS
        // when a page is first touched.
        // SAFETY: fallocate on a file we own; no memory is passed.
        let r = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if r != 0 && r != libc::EOPNOTSUPP && r != libc::ENOSYS {
            return Err(io::Error::from_raw_os_error(r));
        }
        seg.base = map(file.as_raw_fd(), len)?;
        seg.word(H_SIZE).store(n as u64, Ordering::Relaxed);
        seg.word(H_SLOT).store(slot as u64, Ordering::Relaxed);
        seg.word(H_NONCE).store(nonce, Ordering::Relaxed);
        seg.word(H_MAGIC).store(MAGIC, Ordering::Release);
        Ok(seg)
    }

    /// Opens and maps the segment `name` made by rank 0, checking that it is what the
    /// setup agreed on (our user's, mode 0600, size, slot size, nonce).
    pub(super) fn open(
        name: &str,
        n: usize,
        slot: usize,
        nonce: u64,
        world_rank: usize,
    ) -> io::Result<Segment> {
        let path = PathBuf::from("/dev/shm").join(name);
        let (len, data) = layout(n, slot);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        let meta = file.metadata()?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me || meta.mode() & 0o077 != 0 || meta.len() != len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not the segment this group agreed on", path.display()),
            ));
        }
        let seg = Segment {
            base: map(file.as_raw_fd(), len)?,
            len,
            data,
            n,
            slot,
            world_rank,
            linked: Mutex::new(None),
        };
        let ok = seg.word(H_MAGIC).load(Ordering::Acquire) == MAGIC
            && seg.word(H_SIZE).load(Ordering::Relaxed) == n as u64
            && seg.word(H_SLOT).load(Ordering::Relaxed) == slot as u64
            && seg.word(H_NONCE).load(Ordering::Relaxed) == nonce;
        if !ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} has an unexpected header", path.display()),
            ));
        }
        Ok(seg)
    }

    /// Removes the file's name (the creator, once everybody has mapped it). The mapping
    /// stays valid.
    pub(super) fn unlink(&self) {
        if let Some(path) = lock(&self.linked).take() {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("comm: could not remove {}: {e}", path.display());
            }
        }
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off + 8 <= self.data && off.is_multiple_of(8));
        // SAFETY: `off` is an 8-aligned offset inside the control area of the mapping (page
        // aligned), which lives as long as `self`; other processes access it only
        // atomically too.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }

    fn word32(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off + 4 <= self.data && off.is_multiple_of(4));
        // SAFETY: as in `word`.
        unsafe { &*self.base.add(off).cast::<AtomicU32>() }
    }

    /// Marks the segment failed (by this rank, unless another rank was first) and wakes
    /// every waiter: called when this rank's communicator aborts or breaks.
    pub(super) fn fail(&self) {
        let me = self.world_rank as u32 + 1;
        let _ = self
            .word32(FAILED)
            .compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst);
        // Change the futex word so that a waiter about to sleep on the old value does not.
        self.word32(ARRIVALS).fetch_add(1, Ordering::SeqCst);
        futex_wake(self.word32(ARRIVALS));
    }

    /// The world rank that failed the segment, if any.
    fn failed_by(&self) -> Option<usize> {
        match self.word32(FAILED).load(Ordering::SeqCst) {
            0 => None,
            r => Some(r as usize - 1),
        }
    }

    /// Start of the slot of rank `p` in buffer `b`.
    fn slot_ptr(&self, b: usize, p: usize) -> *mut u8 {
        debug_assert!(b < BUFS && p < self.n);
        // SAFETY: inside the mapping by construction of `layout`.
        unsafe { self.base.add(self.data + (b * self.n + p) * self.slot) }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
        if !self.base.is_null() {
            // SAFETY: the mapping made in `create`/`open`, unmapped once; nothing borrows it
            // any more (we are dropping the last owner).
            unsafe { libc::munmap(self.base.cast(), self.len) };
        }
    }
}

fn map(fd: RawFd, len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh shared mapping of a file we opened, `len` bytes (the file's size); the
    // kernel chooses the address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

fn futex_wait(word: &AtomicU32, expect: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is an aligned u32 in a shared mapping that outlives the call; a
    // process-shared FUTEX_WAIT (other processes wake it) with a relative timeout. Spurious
    // returns (EAGAIN, EINTR, ETIMEDOUT) are fine: the caller re-checks.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expect,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: as in `futex_wait`; FUTEX_WAKE only reads the address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
}

/// One of the communicator's connections, watched while waiting in a barrier.
#[derive(Debug, Clone, Copy)]
pub(super) struct Link {
    pub(super) fd: RawFd,
    /// World rank of the peer.
    pub(super) peer: usize,
    /// Whether the peer sends on it (data arriving there is a protocol error).
    pub(super) inbound: bool,
}

/// What the sockets say about the peers: a hang-up (the peer died, aborted or broke) or
/// data (the peer runs a socket collective while we run a shared-memory one).
fn check_links(links: &[Link], op: &'static str) -> Option<CommError> {
    if links.is_empty() {
        return None;
    }
    let mut pfds: Vec<libc::pollfd> = links
        .iter()
        .map(|l| libc::pollfd {
            fd: l.fd,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        })
        .collect();
    // SAFETY: a valid array of pollfd; timeout 0 (just look).
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) };
    if r <= 0 {
        return None;
    }
    for (l, p) in links.iter().zip(&pfds) {
        if p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Some(CommError::PeerLost { rank: l.peer, op });
        }
    }
    for (l, p) in links.iter().zip(&pfds) {
        if l.inbound && p.revents & libc::POLLIN != 0 {
            return Some(CommError::Protocol(format!(
                "{op}: world rank {} sent a message while this rank waited for it in a \
                 shared-memory {op} (collectives issued in a different order?)",
                l.peer
            )));
        }
    }
    None
}

/// The element-count, operation and dtype of a call, as published in the segment.
fn desc_words(h: &Header) -> [u64; DESC_WORDS] {
    let code = u64::from(h.op) | u64::from(h.dtype) << 8 | u64::from(h.rop) << 16;
    [h.seq, h.numel, code, h.extra]
}

/// Bytes `[start, end)` of a chunk of `len` bytes that rank `q` of `n` reduces: 64-byte
/// aligned cuts, as even as that allows.
pub(super) fn part(len: usize, n: usize, q: usize) -> Range<usize> {
    let units = len.div_ceil(ALIGN);
    let r = shard_range(units, n, q);
    (r.start * ALIGN).min(len)..(r.end * ALIGN).min(len)
}

/// A rank's side of a shared-memory communicator: the segment and where this rank is in
/// its sequence of barriers and chunks. Lives in the communicator's call state.
#[derive(Debug)]
pub(super) struct Shm {
    seg: Arc<Segment>,
    rank: usize,
    /// Barriers passed (all ranks pass the same ones).
    barriers: u64,
    /// Chunks processed (buffer rotation).
    chunks: u64,
    /// Calls made (descriptor parity).
    calls: u64,
    /// Private reduce block.
    block: Vec<u64>,
    spin: bool,
    /// All-reduces of at least this many bytes use the segment.
    pub(super) min_bytes: usize,
}

impl Shm {
    pub(super) fn new(seg: Arc<Segment>, rank: usize, min_bytes: usize) -> Shm {
        let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
        Shm {
            spin: seg.n <= cpus,
            seg,
            rank,
            barriers: 0,
            chunks: 0,
            calls: 0,
            block: vec![0u64; BLOCK / 8],
            min_bytes,
        }
    }

    /// Waits until every rank has arrived at the next barrier.
    fn barrier(&mut self, ctx: &Ctx<'_>, links: &[Link]) -> Result<(), CommError> {
        let seg = &*self.seg;
        let n = seg.n as u64;
        self.barriers += 1;
        let target = (self.barriers.wrapping_mul(n)) as u32;
        let arrivals = seg.word32(ARRIVALS);
        let reached = |c: u32| (c.wrapping_sub(target) as i32) >= 0;
        // AcqRel: publishes this rank's writes of the step to whoever sees the count, and
        // (for the last to arrive) acquires everybody else's.
        let now = arrivals.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
        if now == target {
            futex_wake(arrivals);
        }
        let spin_until = self.spin.then(|| Instant::now() + SPIN);
        loop {
            let c = arrivals.load(Ordering::SeqCst);
            if let Some(r) = seg.failed_by() {
                return Err(self.failure(ctx, r));
            }
            if reached(c) {
                // The acquire load above synchronizes with every arrival (a release
                // sequence of read-modify-writes).
                std::sync::atomic::fence(Ordering::Acquire);
                return Ok(());
            }
            if ctx.aborted.load(Ordering::SeqCst) {
                return Err(CommError::Aborted);
            }
            let now = Instant::now();
            if let Some(until) = spin_until {
                if now < until {
                    for _ in 0..64 {
                        std::hint::spin_loop();
                    }
                    continue;
                }
            }
            if now >= ctx.deadline {
                return Err(CommError::Timeout {
                    op: ctx.op,
                    after: ctx.timeout,
                });
            }
            let slice = (ctx.deadline - now).min(SLICE);
            futex_wait(arrivals, c, slice);
            if now.elapsed() >= slice {
                // A whole slice without progress: has a peer gone? Look again at the count
                // afterwards: a peer that passed the barrier and moved on to a socket
                // collective may already be talking to us.
                if let Some(e) = check_links(links, ctx.op) {
                    if !reached(arrivals.load(Ordering::SeqCst)) && seg.failed_by().is_none() {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn failure(&self, ctx: &Ctx<'_>, by: usize) -> CommError {
        if ctx.aborted.load(Ordering::SeqCst) || by == self.seg.world_rank {
            CommError::Aborted
        } else {
            CommError::PeerLost {
                rank: by,
                op: ctx.op,
            }
        }
    }

    /// Publishes this call's descriptor (before the first barrier).
    fn publish(&self, h: &Header) {
        for (i, w) in desc_words(h).into_iter().enumerate() {
            self.seg
                .word(self.desc_at(self.rank) + 8 * i)
                .store(w, Ordering::Relaxed);
        }
    }

    /// Where rank `p`'s descriptor of the current call lives.
    fn desc_at(&self, p: usize) -> usize {
        DESC + ((self.calls % 2) as usize * self.seg.n + p) * LINE
    }

    /// Checks every rank's descriptor against ours (after the first barrier).
    fn check_descriptors(&self, h: &Header, members: &[usize]) -> Result<(), CommError> {
        let mine = desc_words(h);
        for (p, &world) in members.iter().enumerate() {
            let at = |i: usize| {
                self.seg
                    .word(self.desc_at(p) + 8 * i)
                    .load(Ordering::Relaxed)
            };
            let theirs = [at(0), at(1), at(2), at(3)];
            if theirs == mine {
                continue;
            }
            let (op, dtype, rop) = (
                (theirs[2] & 0xff) as u8,
                (theirs[2] >> 8 & 0xff) as u8,
                (theirs[2] >> 16 & 0xff) as u8,
            );
            let name = op_name(h.op);
            return Err(if op != h.op || rop != h.rop {
                CommError::Protocol(format!(
                    "{name}: this rank runs operation {name}/{} but world rank {world} runs \
                     {}/{rop} (collectives issued in a different order?)",
                    h.rop,
                    op_name(op)
                ))
            } else if dtype != h.dtype {
                let kind = |c| {
                    Elem::from_code(c)
                        .map(|e| e.kind())
                        .unwrap_or(tch::Kind::Uint8)
                };
                CommError::DtypeMismatch {
                    op: name,
                    expected: kind(h.dtype),
                    got: kind(dtype),
                }
            } else if theirs[1] != h.numel {
                CommError::SizeMismatch {
                    op: name,
                    detail: format!(
                        "{} elements here, {} at world rank {world}",
                        h.numel, theirs[1]
                    ),
                }
            } else if theirs[0] != h.seq {
                CommError::Protocol(format!(
                    "{name}: this is collective #{} here but #{} at world rank {world}",
                    h.seq, theirs[0]
                ))
            } else {
                CommError::Protocol(format!(
                    "{name}: parameters differ at world rank {world} ({} vs {})",
                    h.extra, theirs[3]
                ))
            });
        }
        Ok(())
    }

    /// Runs one collective of `chunks` chunks through a pipeline of `phases` phases: step
    /// `t` (of `chunks + phases - 1`) runs `step(segment, block, t, buf)`, where `buf(k)` is
    /// the buffer of the call's chunk `k`, then waits at the barrier — except after the last
    /// step, which only reads what the previous steps completed. Publishes the call's
    /// descriptor before the first barrier and checks everybody's after it.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        ctx: &Ctx<'_>,
        hdr: &Header,
        members: &[usize],
        links: &[Link],
        chunks: usize,
        phases: usize,
        mut step: impl FnMut(&Segment, &mut [u8], usize, &dyn Fn(usize) -> usize),
    ) -> Result<(), CommError> {
        let first = self.chunks;
        let buf = move |k: usize| ((first + k as u64) % BUFS as u64) as usize;
        self.publish(hdr);
        let steps = chunks + phases - 1;
        for t in 0..steps {
            step(&self.seg, bytes_of(&mut self.block), t, &buf);
            if t + 1 < steps {
                self.barrier(ctx, links)?;
                if t == 0 {
                    self.check_descriptors(hdr, members)?;
                }
            }
        }
        self.chunks += chunks as u64;
        self.calls += 1;
        Ok(())
    }

    /// All-reduce of `bytes` bytes of `elem` at `base` (the caller's contiguous tensor)
    /// through the segment, in chunks of one slot and three phases: copy in, reduce own
    /// part, copy the others' parts out. `members` are the world ranks of the group; `links`
    /// the communicator's connections (watched for hang-ups while waiting).
    ///
    /// # Safety
    /// `base..base+bytes` must be valid for reads and writes for the whole call, not touched
    /// by anything else meanwhile, and aligned for `elem`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn all_reduce(
        &mut self,
        ctx: &Ctx<'_>,
        base: *mut u8,
        bytes: usize,
        elem: Elem,
        rop: ReduceOp,
        hdr: &Header,
        members: &[usize],
        links: &[Link],
    ) -> Result<(), CommError> {
        let (n, me, slot) = (self.seg.n, self.rank, self.seg.slot);
        let chunks = bytes.div_ceil(slot);
        let chunk = |k: usize| (k * slot, slot.min(bytes - k * slot));
        self.run(ctx, hdr, members, links, chunks, 3, |seg, block, t, buf| {
            if t < chunks {
                let (off, len) = chunk(t);
                // Our own part stays in the tensor: only we read it.
                let mine = part(len, n, me);
                let dst = seg.slot_ptr(buf(t), me);
                for r in [0..mine.start, mine.end..len] {
                    // SAFETY: chunk t of the caller's buffer, and this rank's slot of
                    // buffer buf(t), which no other rank reads during this step.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            base.add(off + r.start),
                            dst.add(r.start),
                            r.len(),
                        )
                    };
                }
            }
            if (1..=chunks).contains(&t) {
                let (off, len) = chunk(t - 1);
                let (b, mine) = (buf(t - 1), part(len, n, me));
                // SAFETY: part `me` of chunk t-1: in every other rank's slot of buffer b
                // (copied in before the last barrier, read by nobody else in this step)
                // and, ours, still in the caller's chunk; the result goes back there (each
                // block is read before it is written) and into our own slot's part, which
                // nobody reads before the next barrier.
                unsafe {
                    let own = base.add(off + mine.start);
                    reduce_blocks(
                        block,
                        elem,
                        rop,
                        n,
                        mine.len(),
                        |p| match p == me {
                            true => own as *const u8,
                            false => seg.slot_ptr(b, p).add(mine.start) as *const u8,
                        },
                        &[own, seg.slot_ptr(b, me).add(mine.start)],
                    )
                };
            }
            if t >= 2 {
                let (off, len) = chunk(t - 2);
                let b = buf(t - 2);
                for q in (0..n).filter(|&q| q != me) {
                    let r = part(len, n, q);
                    // SAFETY: part q of chunk t-2 in slot q of buffer b holds rank q's
                    // result (reduced before the last barrier, not written again before the
                    // next one); the destination is our tensor's chunk.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            seg.slot_ptr(b, q).add(r.start),
                            base.add(off + r.start),
                            r.len(),
                        )
                    };
                }
            }
        })
    }

    /// All-gather into `out`, whose segment `q` (byte offset, length) comes from rank `q`;
    /// ours is already in place. Chunks of one slot, two phases: copy ours in, copy the
    /// others' out.
    ///
    /// # Safety
    /// `out` must hold every segment, be valid for reads and writes for the whole call and
    /// not be touched by anything else meanwhile.
    pub(super) unsafe fn all_gather(
        &mut self,
        ctx: &Ctx<'_>,
        out: *mut u8,
        segs: &[(usize, usize)],
        hdr: &Header,
        members: &[usize],
        links: &[Link],
    ) -> Result<(), CommError> {
        let (n, me, slot) = (self.seg.n, self.rank, self.seg.slot);
        let chunks = segs.iter().map(|s| s.1).max().unwrap_or(0).div_ceil(slot);
        let piece = |q: usize, k: usize| (k * slot).min(segs[q].1)..((k + 1) * slot).min(segs[q].1);
        self.run(ctx, hdr, members, links, chunks, 2, |seg, _, t, buf| {
            if t < chunks {
                let r = piece(me, t);
                // SAFETY: our segment of the output, and our slot of buffer buf(t), which
                // nobody reads during this step.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        out.add(segs[me].0 + r.start),
                        seg.slot_ptr(buf(t), me),
                        r.len(),
                    )
                };
            }
            if t >= 1 {
                let b = buf(t - 1);
                for q in (0..n).filter(|&q| q != me) {
                    let r = piece(q, t - 1);
                    // SAFETY: rank q copied this piece into its slot of buffer b before the
                    // last barrier and does not write it again before the next one; the
                    // destination is segment q of our output.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            seg.slot_ptr(b, q),
                            out.add(segs[q].0 + r.start),
                            r.len(),
                        )
                    };
                }
            }
        })
    }

    /// Bytes of each rank's segment a reduce-scatter moves per step: a slot holds one piece
    /// for every rank. `None` when the slot is too small to cut that way (huge groups).
    pub(super) fn scatter_piece(&self) -> Option<usize> {
        let piece = self.seg.slot / self.seg.n / ALIGN * ALIGN;
        (piece > 0).then_some(piece)
    }

    /// Reduce-scatter of `input`, whose segment `q` (byte offset, length) is reduced into
    /// rank `q`'s `out`. Two phases: every rank copies one piece of every other rank's
    /// segment into its slot; each rank reduces its own piece across the slots (and its own
    /// input), in rank order, straight into `out`.
    ///
    /// # Safety
    /// `input` must hold every segment and be readable, `out` hold our segment's length and
    /// be writable, both for the whole call, aligned for `elem`, not overlapping, and not
    /// touched by anything else meanwhile. [`Shm::scatter_piece`] must be `Some`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn reduce_scatter(
        &mut self,
        ctx: &Ctx<'_>,
        input: *const u8,
        segs: &[(usize, usize)],
        out: *mut u8,
        elem: Elem,
        rop: ReduceOp,
        hdr: &Header,
        members: &[usize],
        links: &[Link],
    ) -> Result<(), CommError> {
        let (n, me) = (self.seg.n, self.rank);
        let Some(size) = self.scatter_piece() else {
            return Err(CommError::Protocol(
                "reduce_scatter: the shared-memory slot is too small (internal error)".into(),
            ));
        };
        let chunks = segs.iter().map(|s| s.1).max().unwrap_or(0).div_ceil(size);
        let piece = |q: usize, k: usize| (k * size).min(segs[q].1)..((k + 1) * size).min(segs[q].1);
        self.run(ctx, hdr, members, links, chunks, 2, |seg, block, t, buf| {
            if t < chunks {
                let dst = seg.slot_ptr(buf(t), me);
                for q in (0..n).filter(|&q| q != me) {
                    let r = piece(q, t);
                    // SAFETY: a piece of segment q of the input, and piece q of our slot of
                    // buffer buf(t), which nobody reads during this step.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            input.add(segs[q].0 + r.start),
                            dst.add(q * size),
                            r.len(),
                        )
                    };
                }
            }
            if t >= 1 {
                let (b, r) = (buf(t - 1), piece(me, t - 1));
                // SAFETY: piece `me` of every other rank's slot of buffer b (copied in
                // before the last barrier, read only by us), our own input's piece, and
                // the matching bytes of our output.
                unsafe {
                    reduce_blocks(
                        block,
                        elem,
                        rop,
                        n,
                        r.len(),
                        |p| match p == me {
                            true => input.add(segs[me].0 + r.start),
                            false => seg.slot_ptr(b, p).add(me * size) as *const u8,
                        },
                        &[out.add(r.start)],
                    )
                };
            }
        })
    }
}

/// Reduces `len` bytes of `n` sources (`src(p)`: where rank `p`'s bytes start) in rank
/// order through `block`, a few KiB at a time so that the partial result stays in L1, and
/// writes the result to every destination. `Avg` divides once at the end.
///
/// # Safety
/// Every source must be readable and every destination writable for `len` bytes, all
/// aligned for `elem`, and nothing else may write them meanwhile. A destination may be a
/// source only at the same address (each block is read before it is written).
unsafe fn reduce_blocks(
    block: &mut [u8],
    elem: Elem,
    rop: ReduceOp,
    n: usize,
    len: usize,
    src: impl Fn(usize) -> *const u8,
    dsts: &[*mut u8],
) {
    let mut at = 0;
    while at < len {
        let k = block.len().min(len - at);
        let acc = &mut block[..k];
        // SAFETY: the caller's promise for the sources; the slice ends before any write.
        let from = |p: usize| unsafe { std::slice::from_raw_parts(src(p).add(at), k) };
        acc.copy_from_slice(from(0));
        for p in 1..n {
            elem::reduce(elem, acc, from(p), rop);
        }
        if rop == ReduceOp::Avg {
            elem::divide(elem, acc, n);
        }
        for &d in dsts {
            // SAFETY: the caller's promise for the destinations; `acc` is private.
            unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), d.add(at), k) };
        }
        at += k;
    }
}

fn bytes_of(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 storage viewed as bytes.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 8) }
}

/// Process-wide defaults from the environment, read once.
#[derive(Debug, Clone, Copy)]
pub(super) struct Defaults {
    /// Whether shared memory may be used at all.
    pub(super) enabled: bool,
    /// All-reduces of at least this many bytes use it.
    pub(super) min_bytes: usize,
    /// Bytes per slot.
    pub(super) slot: usize,
}

/// Default threshold: none. Measured on loopback (2 cores, 2 to 8 ranks) shared memory beat
/// the Unix-socket one-shot exchange and ring at every size from 1 KiB (2.5–5x) to 256 MiB
/// (1.5–2.3x).
pub(super) const MIN_BYTES: usize = 0;
/// Default slot size. Measured from 64 KiB to 2 MiB: flat within noise up to 1 MiB, worse
/// at 2 MiB; 512 KiB keeps the segment small (6 MiB for 4 ranks) and its working set in
/// cache.
pub(super) const SLOT: usize = 512 << 10;
/// Budget for one segment: the slot shrinks (to at least [`MIN_SLOT`]) for large groups.
const SEGMENT_BUDGET: usize = 96 << 20;
const MIN_SLOT: usize = 64 << 10;

pub(super) fn defaults() -> Defaults {
    static D: std::sync::OnceLock<Defaults> = std::sync::OnceLock::new();
    *D.get_or_init(|| {
        let num = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
        };
        let transport = std::env::var("WEAVER_COMM_TRANSPORT").unwrap_or_default();
        Defaults {
            enabled: !matches!(transport.as_str(), "tcp" | "unix"),
            min_bytes: num("WEAVER_COMM_SHM_MIN_BYTES").unwrap_or(MIN_BYTES),
            slot: num("WEAVER_COMM_SHM_SLOT_BYTES").unwrap_or(SLOT),
        }
    })
}

/// The slot size for a group of `n`: the configured one, smaller for large groups so the
/// segment stays within its budget, a multiple of a page; `None` when too small.
pub(super) fn slot_for(n: usize, configured: usize) -> Option<usize> {
    let cap = SEGMENT_BUDGET / (BUFS * n.max(1));
    let s = configured.min(cap) / PAGE * PAGE;
    // A small configured slot is allowed (tests, tuning); one squeezed by the budget is not.
    (s > 0 && (s >= MIN_SLOT || cap >= MIN_SLOT)).then_some(s)
}

/// A name for a new segment, unique with high probability (and `O_EXCL` checks).
pub(super) fn segment_name(prefix_hash: u64, group: u64, nonce: u64) -> String {
    format!("weaver-{prefix_hash:016x}-{group:016x}-{nonce:016x}")
}

/// A fresh nonzero nonce: time, process and a counter, mixed.
pub(super) fn nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = super::fnv1a(&[
        &t.to_le_bytes(),
        &u64::from(std::process::id()).to_le_bytes(),
        &c.to_le_bytes(),
    ]);
    if h == 0 {
        h = 1;
    }
    h
}

/// A hash of [`super::net::host_id`]: equal on ranks that can share `/dev/shm` and futexes
/// (same boot, same network namespace — the same test the Unix sockets use).
pub(super) fn host_hash() -> u64 {
    static H: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *H.get_or_init(|| super::fnv1a(&[super::net::host_id().as_bytes()]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parts_tile_the_chunk_on_aligned_cuts(len in 0usize..100_000, n in 1usize..17) {
            let mut next = 0;
            for q in 0..n {
                let r = part(len, n, q);
                prop_assert_eq!(r.start, next);
                prop_assert!(r.start.is_multiple_of(ALIGN) || r.start == len);
                next = r.end;
            }
            prop_assert_eq!(next, len);
        }
    }

    #[test]
    fn slot_sizes() {
        assert_eq!(slot_for(4, SLOT), Some(SLOT));
        let big = slot_for(64, SLOT).expect("64 ranks still fit");
        assert!(big * BUFS * 64 <= SEGMENT_BUDGET && big.is_multiple_of(PAGE));
        assert_eq!(slot_for(100_000, SLOT), None);
        assert_eq!(slot_for(2, 5000), Some(4096));
    }

    #[test]
    fn create_open_unlink() {
        let nonce = nonce();
        let name = segment_name(1, 2, nonce);
        let a = Segment::create(&name, 2, 8192, nonce, 0).expect("create");
        assert!(Segment::create(&name, 2, 8192, nonce, 0).is_err(), "O_EXCL");
        assert!(
            Segment::open(&name, 2, 8192, nonce + 1, 1).is_err(),
            "wrong nonce"
        );
        assert!(
            Segment::open(&name, 3, 8192, nonce, 1).is_err(),
            "wrong size"
        );
        let b = Segment::open(&name, 2, 8192, nonce, 1).expect("open");
        a.unlink();
        assert!(!PathBuf::from("/dev/shm").join(&name).exists());
        // Both mappings see the same memory.
        b.word(H_NONCE).store(7, Ordering::SeqCst);
        assert_eq!(a.word(H_NONCE).load(Ordering::SeqCst), 7);
        a.fail();
        assert_eq!(b.failed_by(), Some(0));
        drop((a, b));
        // A creator that drops before unlinking removes the file.
        let name = segment_name(1, 2, nonce + 2);
        drop(Segment::create(&name, 2, 8192, nonce + 2, 0).expect("create"));
        assert!(!PathBuf::from("/dev/shm").join(&name).exists());
    }
}
