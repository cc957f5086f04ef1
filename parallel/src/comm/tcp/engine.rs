//! The progress engine of the tcp backend. One thread drives every byte stream of a call —
//! outgoing ([`Out`]) and incoming ([`In`]) — on non-blocking sockets with `poll(2)`: it
//! writes whatever may be sent, reads whatever has arrived, reduces each chunk as soon as it
//! is complete, and sleeps in `poll` only when nothing can move. Sending, receiving and
//! reducing therefore overlap: while a chunk is being reduced the kernel keeps filling the
//! receive buffer and draining the send buffer, and a reduced chunk is forwarded at once.
//!
//! An outgoing stream may be *gated* on an incoming one ([`Gate::Follow`]): it can only send
//! what that stream has already completed. This one rule expresses the pipelined ring (a
//! rank forwards each chunk it has reduced) and the chain broadcast (a rank forwards what it
//! has received).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::super::elem::{self, Elem};
use super::super::{CommError, ReduceOp};

/// Bytes of a message header.
pub(super) const HDR: usize = 32;
const MAGIC: u16 = 0x5756; // "WV"

/// Reduction granularity: a chunk is received into scratch, reduced into the tensor, and
/// becomes forwardable. Small enough to stay in L2, large enough to amortize syscalls.
pub(super) const CHUNK: usize = 256 << 10;

/// Most data bytes one stream moves before the engine turns to the others: one chunk, so
/// that a chunk is forwarded right after it is reduced, while it is still in cache (measured:
/// a quarter less CPU per byte at 256 MiB than with 1 MiB slices).
const SLICE: usize = CHUNK;

/// What the first bytes of every message say, so that ranks that disagree fail with a typed
/// error instead of misreading each other's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    /// Operation code (see `tcp::op`).
    pub(super) op: u8,
    /// Element type code.
    pub(super) dtype: u8,
    /// Reduce op code (0 when none).
    pub(super) rop: u8,
    /// Per-communicator collective sequence number (0 for point to point).
    pub(super) seq: u64,
    /// Element count of the logical tensor.
    pub(super) numel: u64,
    /// Op-specific: broadcast root, row width, shape hash, ...
    pub(super) extra: u64,
}

impl Header {
    pub(super) fn encode(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = self.op;
        b[3] = self.dtype;
        b[4] = self.rop;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.numel.to_le_bytes());
        b[24..32].copy_from_slice(&self.extra.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HDR]) -> Option<Header> {
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        (u16::from_le_bytes([b[0], b[1]]) == MAGIC).then(|| Header {
            op: b[2],
            dtype: b[3],
            rop: b[4],
            seq: u64_at(8),
            numel: u64_at(16),
            extra: u64_at(24),
        })
    }
}

/// What to do when an incoming header differs from the expected one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnMismatch {
    /// Fail the call (collectives: the ranks no longer agree on the stream).
    Fail,
    /// Read and drop the peer's payload, finish the rest of the call, then report the
    /// mismatch (point to point: the connection stays in step and the communicator usable).
    Drain,
}

/// What happens to incoming data bytes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mode {
    /// Written to the destination as they arrive.
    Copy,
    /// Combined into the destination chunk by chunk, then divided by `divide` if set.
    Reduce {
        elem: Elem,
        op: ReduceOp,
        divide: Option<usize>,
    },
    /// Dropped.
    Discard,
}

#[derive(Debug)]
enum OutPart {
    Header([u8; HDR]),
    Data { ptr: *const u8, len: usize },
}

impl OutPart {
    fn len(&self) -> usize {
        match self {
            OutPart::Header(_) => HDR,
            OutPart::Data { len, .. } => *len,
        }
    }
}

/// When an outgoing stream may send.
#[derive(Debug, Clone, Copy)]
pub(super) enum Gate {
    /// Everything is available from the start.
    Open,
    /// The first `prefix` bytes are available; after them, only as many bytes as incoming
    /// stream `input` (an index into the `ins` of the same run) has completed.
    Follow { prefix: usize, input: usize },
}

/// An outgoing byte stream on one connection.
#[derive(Debug)]
pub(super) struct Out {
    fd: RawFd,
    peer: usize,
    parts: Vec<OutPart>,
    gate: Gate,
    total: usize,
    pos: usize,
    pi: usize,
    poff: usize,
}

impl Out {
    /// A stream to world rank `peer` over `sock`.
    pub(super) fn new(sock: &impl AsRawFd, peer: usize, gate: Gate) -> Out {
        Out {
            fd: sock.as_raw_fd(),
            peer,
            parts: Vec::new(),
            gate,
            total: 0,
            pos: 0,
            pi: 0,
            poff: 0,
        }
    }

    pub(super) fn header(&mut self, h: Header) {
        self.parts.push(OutPart::Header(h.encode()));
        self.total += HDR;
    }

    /// Appends `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid and readable until the run that uses this stream ends,
    /// and nothing may write it while the run could still send it.
    pub(super) unsafe fn data(&mut self, ptr: *const u8, len: usize) {
        if len > 0 {
            self.parts.push(OutPart::Data { ptr, len });
            self.total += len;
        }
    }

    fn done(&self) -> bool {
        self.pos == self.total
    }
}

#[derive(Debug)]
enum InPart {
    Header {
        expect: Header,
        on_mismatch: OnMismatch,
    },
    Data {
        ptr: *mut u8,
        len: usize,
        mode: Mode,
    },
}

/// An incoming byte stream on one connection.
#[derive(Debug)]
pub(super) struct In {
    fd: RawFd,
    peer: usize,
    parts: Vec<InPart>,
    pi: usize,
    /// Bytes of the current part completed (header bytes read, data copied or reduced).
    poff: usize,
    /// Bytes of the current reduce chunk sitting in scratch.
    fill: usize,
    hdr: [u8; HDR],
    /// Data bytes completed, over all parts (what a following `Out` may forward).
    data_done: usize,
    scratch: Option<usize>,
    discard: Vec<u8>,
    error: Option<CommError>,
}

impl In {
    /// A stream from world rank `peer` over `sock`.
    pub(super) fn new(sock: &impl AsRawFd, peer: usize) -> In {
        In {
            fd: sock.as_raw_fd(),
            peer,
            parts: Vec::new(),
            pi: 0,
            poff: 0,
            fill: 0,
            hdr: [0; HDR],
            data_done: 0,
            scratch: None,
            discard: Vec::new(),
            error: None,
        }
    }

    pub(super) fn header(&mut self, expect: Header, on_mismatch: OnMismatch) {
        self.parts.push(InPart::Header {
            expect,
            on_mismatch,
        });
    }

    /// Appends a destination of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid and writable until the run ends, not overlap another
    /// destination, and nothing else may access it while the run could still write it —
    /// except an `Out` gated on this stream, which reads only completed bytes.
    pub(super) unsafe fn data(&mut self, ptr: *mut u8, len: usize, mode: Mode) {
        if len > 0 {
            self.parts.push(InPart::Data { ptr, len, mode });
        }
    }

    fn done(&self) -> bool {
        self.pi == self.parts.len()
    }

    fn needs_scratch(&self) -> bool {
        self.parts.iter().any(|p| {
            matches!(
                p,
                InPart::Data {
                    mode: Mode::Reduce { .. },
                    ..
                }
            )
        })
    }
}

/// Everything a run needs besides its streams.
#[derive(Debug)]
pub(super) struct Ctx<'a> {
    pub(super) op: &'static str,
    pub(super) deadline: Instant,
    pub(super) timeout: Duration,
    pub(super) aborted: &'a AtomicBool,
}

fn peer_lost(peer: usize, op: &'static str) -> CommError {
    CommError::PeerLost { rank: peer, op }
}

fn io_error(e: std::io::Error, peer: usize, op: &'static str) -> CommError {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected | UnexpectedEof => {
            peer_lost(peer, op)
        }
        _ => CommError::Io { op, source: e },
    }
}

enum Step {
    Moved(usize),
    Blocked,
}

fn send_some(
    fd: RawFd,
    buf: *const u8,
    len: usize,
    peer: usize,
    op: &'static str,
) -> Result<Step, CommError> {
    loop {
        // SAFETY: buf..buf+len is readable (the caller's contract on `Out::data` / owned
        // header bytes); MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe { libc::send(fd, buf.cast(), len, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(Step::Moved(n as usize));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock => return Ok(Step::Blocked),
            std::io::ErrorKind::Interrupted => continue,
            _ => return Err(io_error(e, peer, op)),
        }
    }
}

fn recv_some(
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    peer: usize,
    op: &'static str,
) -> Result<Step, CommError> {
    loop {
        // SAFETY: buf..buf+len is writable (the caller's contract on `In::data`, or scratch).
        let n = unsafe { libc::recv(fd, buf.cast(), len, libc::MSG_DONTWAIT) };
        if n > 0 {
            return Ok(Step::Moved(n as usize));
        }
        if n == 0 {
            return Err(peer_lost(peer, op));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock => return Ok(Step::Blocked),
            std::io::ErrorKind::Interrupted => continue,
            _ => return Err(io_error(e, peer, op)),
        }
    }
}

/// Sends what the gate allows; returns whether anything moved and whether it is blocked on
/// the socket (as opposed to waiting on its gate).
fn pump_out(o: &mut Out, avail: usize, op: &'static str) -> Result<(bool, bool), CommError> {
    let avail = avail.min(o.total);
    let mut moved = false;
    let mut budget = SLICE;
    while o.pos < avail && budget > 0 {
        let part = &o.parts[o.pi];
        let part_left = part.len() - o.poff;
        let want = part_left.min(avail - o.pos).min(budget);
        let ptr = match part {
            OutPart::Header(h) => h[o.poff..].as_ptr(),
            // SAFETY: poff < len, inside the region the caller vouched for.
            OutPart::Data { ptr, .. } => unsafe { ptr.add(o.poff) },
        };
        match send_some(o.fd, ptr, want, o.peer, op)? {
            Step::Blocked => return Ok((moved, true)),
            Step::Moved(n) => {
                moved = true;
                o.pos += n;
                o.poff += n;
                budget = budget.saturating_sub(n);
                if o.poff == o.parts[o.pi].len() {
                    o.pi += 1;
                    o.poff = 0;
                }
            }
        }
    }
    Ok((moved, false))
}

/// Reads what has arrived, reducing completed chunks; returns whether anything moved.
fn pump_in(i: &mut In, scratch: &mut [u8], op: &'static str) -> Result<bool, CommError> {
    let mut moved = false;
    let mut budget = SLICE;
    while i.pi < i.parts.len() && budget > 0 {
        match i.parts[i.pi] {
            InPart::Header {
                expect,
                on_mismatch,
            } => {
                let at = i.hdr[i.poff..].as_mut_ptr();
                match recv_some(i.fd, at, HDR - i.poff, i.peer, op)? {
                    Step::Blocked => return Ok(moved),
                    Step::Moved(n) => {
                        moved = true;
                        i.poff += n;
                        if i.poff < HDR {
                            continue;
                        }
                        i.poff = 0;
                        i.pi += 1;
                        let got = Header::decode(&i.hdr);
                        if got == Some(expect) {
                            continue;
                        }
                        let err = mismatch(&expect, got.as_ref(), i.peer, op);
                        let payload = got.and_then(|g| {
                            Elem::from_code(g.dtype)
                                .map(|e| (g.numel as usize).saturating_mul(e.size()))
                        });
                        match (on_mismatch, payload) {
                            (OnMismatch::Drain, Some(bytes)) => {
                                // The data this rank expected becomes a drain of what the
                                // peer actually sends, so the stream stays in step.
                                if matches!(i.parts.get(i.pi), Some(InPart::Data { .. })) {
                                    i.parts.remove(i.pi);
                                }
                                if bytes > 0 {
                                    let drain = InPart::Data {
                                        ptr: std::ptr::null_mut(),
                                        len: bytes,
                                        mode: Mode::Discard,
                                    };
                                    i.parts.insert(i.pi, drain);
                                }
                                i.error.get_or_insert(err);
                            }
                            _ => return Err(err),
                        }
                    }
                }
            }
            InPart::Data { ptr, len, mode } => {
                let left = len - i.poff;
                match mode {
                    Mode::Copy => {
                        let want = left.min(budget);
                        // SAFETY: poff < len, inside the destination the caller vouched for.
                        match recv_some(i.fd, unsafe { ptr.add(i.poff) }, want, i.peer, op)? {
                            Step::Blocked => return Ok(moved),
                            Step::Moved(n) => {
                                moved = true;
                                budget = budget.saturating_sub(n);
                                i.poff += n;
                                i.data_done += n;
                            }
                        }
                    }
                    Mode::Discard => {
                        if i.discard.is_empty() {
                            i.discard = vec![0u8; 64 << 10];
                        }
                        let want = left.min(i.discard.len());
                        match recv_some(i.fd, i.discard.as_mut_ptr(), want, i.peer, op)? {
                            Step::Blocked => return Ok(moved),
                            Step::Moved(n) => {
                                moved = true;
                                i.poff += n;
                            }
                        }
                    }
                    Mode::Reduce {
                        elem,
                        op: rop,
                        divide,
                    } => {
                        let chunk = left.min(scratch.len());
                        let at = scratch[i.fill..chunk].as_mut_ptr();
                        match recv_some(i.fd, at, chunk - i.fill, i.peer, op)? {
                            Step::Blocked => return Ok(moved),
                            Step::Moved(n) => {
                                moved = true;
                                i.fill += n;
                                if i.fill == chunk {
                                    // SAFETY: [poff, poff+chunk) lies inside the destination,
                                    // which nothing else touches until it is completed.
                                    let dst = unsafe {
                                        std::slice::from_raw_parts_mut(ptr.add(i.poff), chunk)
                                    };
                                    elem::reduce(elem, dst, &scratch[..chunk], rop);
                                    if let Some(k) = divide {
                                        elem::divide(elem, dst, k);
                                    }
                                    i.fill = 0;
                                    i.poff += chunk;
                                    i.data_done += chunk;
                                    budget = budget.saturating_sub(chunk);
                                }
                            }
                        }
                    }
                }
                if i.poff == len {
                    i.poff = 0;
                    i.pi += 1;
                }
            }
        }
    }
    Ok(moved)
}

fn mismatch(expect: &Header, got: Option<&Header>, peer: usize, op: &'static str) -> CommError {
    let Some(got) = got else {
        return CommError::Protocol(format!("{op}: rank {peer} sent a corrupt message header"));
    };
    if got.op != expect.op || got.rop != expect.rop {
        return CommError::Protocol(format!(
            "{op}: this rank expected operation {}/{} but world rank {peer} sent {}/{} \
             (collectives issued in a different order?)",
            super::op_name(expect.op),
            expect.rop,
            super::op_name(got.op),
            got.rop
        ));
    }
    if got.dtype != expect.dtype {
        let kind = |c| {
            Elem::from_code(c)
                .map(|e| e.kind())
                .unwrap_or(tch::Kind::Uint8)
        };
        return CommError::DtypeMismatch {
            op,
            expected: kind(expect.dtype),
            got: kind(got.dtype),
        };
    }
    if got.numel != expect.numel {
        return CommError::SizeMismatch {
            op,
            detail: format!(
                "{} elements here, {} at world rank {peer}",
                expect.numel, got.numel
            ),
        };
    }
    if got.seq != expect.seq {
        return CommError::Protocol(format!(
            "{op}: this is collective #{} here but #{} at world rank {peer}",
            expect.seq, got.seq
        ));
    }
    if expect.op == super::op::P2P {
        return CommError::SizeMismatch {
            op,
            detail: format!("same element count, different shape at world rank {peer}"),
        };
    }
    CommError::Protocol(format!(
        "{op}: parameters differ at world rank {peer} ({} vs {})",
        expect.extra, got.extra
    ))
}

/// Drives `outs` and `ins` to completion, or fails on the first error, the deadline, or an
/// abort. `scratch` is reused across calls. `Ok(Some(e))`: everything completed, but a
/// message announced by a header marked [`OnMismatch::Drain`] did not match and was dropped.
pub(super) fn run(
    outs: &mut [Out],
    ins: &mut [In],
    scratch: &mut Vec<u64>,
    ctx: &Ctx<'_>,
) -> Result<Option<CommError>, CommError> {
    let reducers = ins.iter().filter(|i| i.needs_scratch()).count();
    if scratch.len() * 8 < reducers * CHUNK {
        scratch.resize(reducers * CHUNK / 8, 0);
    }
    // SAFETY: a u64 buffer viewed as bytes (8-aligned, as the reduce kernels need).
    let scratch_bytes = unsafe {
        std::slice::from_raw_parts_mut(scratch.as_mut_ptr().cast::<u8>(), scratch.len() * 8)
    };
    let mut slices: Vec<&mut [u8]> = Vec::with_capacity(ins.len());
    {
        let mut rest = scratch_bytes;
        for i in ins.iter_mut().filter(|i| i.needs_scratch()) {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(CHUNK);
            i.scratch = Some(slices.len());
            slices.push(mine);
            rest = tail;
        }
    }
    run_streams(outs, ins, &mut slices, ctx)?;
    Ok(ins.iter_mut().find_map(|i| i.error.take()))
}

fn scratch_of<'s>(i: &In, slices: &'s mut [&mut [u8]]) -> &'s mut [u8] {
    match i.scratch {
        Some(k) => &mut slices[k][..],
        None => &mut [],
    }
}

fn poll(pfds: &mut [libc::pollfd], wait: Duration, op: &'static str) -> Result<(), CommError> {
    let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: pfds is a valid array of pollfd of the given length.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(CommError::Io { op, source: e });
        }
    }
    Ok(())
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Time left, or the timeout error.
fn left(ctx: &Ctx<'_>) -> Result<Duration, CommError> {
    let now = Instant::now();
    if now >= ctx.deadline {
        Err(CommError::Timeout {
            op: ctx.op,
            after: ctx.timeout,
        })
    } else {
        Ok(ctx.deadline - now)
    }
}

/// The loop itself. One thread per call is enough: on loopback the copies of sending and
/// receiving are done by the two processes' own CPUs, and across hosts the NIC moves data
/// while we reduce. (A helper thread for sending was measured on a 2-core machine: it cost
/// more CPU per byte than it saved, at every size.)
fn run_streams(
    outs: &mut [Out],
    ins: &mut [In],
    slices: &mut [&mut [u8]],
    ctx: &Ctx<'_>,
) -> Result<(), CommError> {
    let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(outs.len() + ins.len());
    let mut want_write = vec![false; outs.len()];
    loop {
        if ctx.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted);
        }
        let mut moved = false;
        for i in ins.iter_mut().filter(|i| !i.done()) {
            let s = scratch_of(i, slices);
            moved |= pump_in(i, s, ctx.op)?;
        }
        want_write.fill(false);
        for (k, o) in outs.iter_mut().enumerate().filter(|(_, o)| !o.done()) {
            let avail = match o.gate {
                Gate::Open => o.total,
                Gate::Follow { prefix, input } => prefix + ins[input].data_done,
            };
            let (m, blocked) = pump_out(o, avail, ctx.op)?;
            moved |= m;
            want_write[k] = blocked;
        }
        if outs.iter().all(Out::done) && ins.iter().all(In::done) {
            return Ok(());
        }
        if moved {
            continue;
        }
        let wait = left(ctx)?;
        pfds.clear();
        for (k, o) in outs.iter().enumerate() {
            if want_write[k] {
                pfds.push(pollfd(o.fd, libc::POLLOUT));
            }
        }
        for i in ins.iter().filter(|i| !i.done()) {
            pfds.push(pollfd(i.fd, libc::POLLIN));
        }
        poll(&mut pfds, wait, ctx.op)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = Header {
            op: 3,
            dtype: 2,
            rop: 1,
            seq: 77,
            numel: 1 << 40,
            extra: 5,
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        let mut bad = h.encode();
        bad[0] = 0;
        assert_eq!(Header::decode(&bad), None);
    }
}
