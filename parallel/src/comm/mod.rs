//! Collectives: the [`Communicator`] trait every parallel building block codes against, its
//! errors, and the backends — [`tcp`] (ring algorithms over TCP and Unix sockets, and
//! shared memory between processes of one host: CI, laptops, CPU clusters; CPU tensors, or
//! CUDA tensors staged through pinned host memory, so several processes can share one GPU
//! or run without NCCL), [`nccl`] (libnccl loaded at run time, CUDA tensors) and
//! [`SoloComm`] (a world of one).
//!
//! # Semantics shared by every backend
//!
//! * **Device.** A communicator works on one device ([`Communicator::device`]: the CPU, or
//!   a CUDA device) and every tensor handed to it must live there. Each call checks that
//!   first and refuses a tensor elsewhere with [`CommError::WrongDevice`] before any
//!   communication, so the communicator stays usable.
//! * **Blocking calls.** Every method returns when the operation is complete on this rank (the
//!   tensor holds the result), or with an error. Every call fails with
//!   [`CommError::Timeout`] once it has run for the communicator's timeout
//!   ([`Communicator::set_timeout`]; STYLE rule 9: generous for rendezvous and the first step,
//!   tight afterwards). Nothing ever waits forever.
//! * **Ordering.** Collective calls on one communicator must be issued in the same order on all
//!   its members. Calls on *different* communicators (the world and the groups made by
//!   [`Communicator::split`]) are independent: they may run at the same time from different
//!   threads and interleave in any order. One communicator runs one call at a time; two
//!   threads calling the same communicator are serialized in an unspecified order, so give
//!   each thread its own group.
//! * **Failures.** After an error that happened while talking to peers (timeout, peer lost,
//!   a mismatch discovered from a peer's header), the communicator is unusable: later calls
//!   return [`CommError::Broken`] naming the first cause. Argument errors found before any
//!   communication (a bad rank, a wrong output shape, an unsupported dtype) leave it usable.
//!   Recovery is `abort()` everywhere and a new communicator (a new rendezvous prefix).
//! * **`abort()`** makes every pending and future call on this communicator and on every
//!   group split from it fail with [`CommError::Aborted`] promptly (milliseconds). Peers
//!   blocked on this rank see [`CommError::PeerLost`] (its connections closed) or their own
//!   timeout.
//! * **Reductions** ([`ReduceOp`]): `Sum`, `Avg`, `Max`, `Min` on f32, f64, bf16, f16, i64,
//!   i32, i8 and u8. Every rank receives bit-identical results. Partial sums are rounded to
//!   the tensor's dtype at each hop (as NCCL does): a bf16 sum over n ranks has up to
//!   `n - 1` roundings. `Avg` divides the sum once at the end (integers: truncating
//!   division). `Max`/`Min` propagate NaN.
//! * **Uneven lengths** ([`Communicator::all_gather`], [`Communicator::reduce_scatter`]): the
//!   gathered / scattered tensor is cut along dim 0 by [`shard_range`] — the first
//!   `len % size` ranks hold one more row — so any length works and the two are inverses.
//! * **Point to point.** `send` returns once the data is handed to the transport; it may
//!   block until the receiver posts the matching `recv` (large tensors do). Two ranks that
//!   send to each other at the same time must use [`Communicator::batch_p2p`], which runs all
//!   its sends and receives concurrently (like `torch.distributed.batch_isend_irecv` or an
//!   NCCL group). Messages between a pair of ranks arrive in the order they were sent.
//! * **Started operations** (`*_start`, returning a [`Work`]). The call checks its arguments
//!   (errors come back at once, the communicator usable) and returns without waiting; the
//!   operation runs in the background — on the communicator's own thread for tcp, on its
//!   own CUDA stream for nccl. Started operations of one communicator run in start order,
//!   on every rank, and before any blocking call issued after them (which therefore also
//!   returns after them). The caller leaves the tensors alone until [`Work::wait`]; `wait`
//!   returns the operation's error, if any (timeouts, abort, lost peers and the "broken
//!   after a failure" rule apply as to blocking calls; a timeout counts from when the
//!   operation begins to run). For a CPU communicator the result is in the tensors when
//!   `wait` returns; for a device backend, kernels the caller queues afterwards on its
//!   current stream run after the operation, and the host does not wait for the device.
//!   [`Work::is_done`] polls, and eventually says true for every operation that ends.
//!
//! # Example
//!
//! ```ignore
//! use weaver_parallel::comm::{mesh_groups, Communicator, ReduceOp, TcpComm};
//! // Every process: join the world (the store comes from the coordinator or a TcpStore).
//! let world = TcpComm::connect(store, "job7/gen3", rank, size, "127.0.0.1", generous)?
//!     .with_device(device); // CPU, or cuda:K (staged through pinned host memory)
//! let groups = mesh_groups(&world, &dims)?; // TP, PP and DP groups, collectively
//! world.set_timeout(tight); // after the first step; reaches the groups too
//! // A bucket's gradients are complete: reduce them while the backward goes on.
//! let work = groups.dp.all_reduce_start(bucket.shallow_clone(), ReduceOp::Avg)?;
//! // ... more backward ...
//! work.wait()?; // then the optimizer reads `bucket`
//! ```

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::mesh::{Axis, ParallelDims};
use crate::store::StoreError;

mod elem;
pub mod nccl;
mod solo;
pub mod tcp;

pub use nccl::NcclComm;
pub use solo::SoloComm;
pub use tcp::TcpComm;

/// How [`Communicator::all_reduce`] and [`Communicator::reduce_scatter`] combine values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum (integers wrap on overflow).
    Sum,
    /// Sum divided by the group size once at the end (integers: truncating division).
    Avg,
    /// Maximum; NaN wins.
    Max,
    /// Minimum; NaN wins.
    Min,
}

/// One operation of [`Communicator::batch_p2p`].
#[derive(Debug)]
pub enum P2POp<'a> {
    /// Send `tensor` to group rank `peer`.
    Send {
        /// What to send (any shape; the receiver's tensor must match shape and dtype).
        tensor: &'a Tensor,
        /// Destination rank in this communicator.
        peer: usize,
    },
    /// Receive from group rank `peer` into `tensor` (preallocated, same shape and dtype as
    /// what the peer sends).
    Recv {
        /// Where the data lands.
        tensor: &'a mut Tensor,
        /// Source rank in this communicator.
        peer: usize,
    },
}

/// Why a collective failed. Variants name what happened so callers can act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommError {
    /// The connection to a peer closed during `op`: the peer died, or gave up on this group
    /// after its own error. `rank` is the peer's rank in the world communicator.
    #[error("peer rank {rank} was lost during {op} (its connection closed)")]
    PeerLost {
        /// World rank of the peer.
        rank: usize,
        /// The operation that noticed.
        op: &'static str,
    },
    /// `op` did not complete within the communicator's timeout.
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The timeout in force.
        after: Duration,
    },
    /// `abort()` was called on this communicator or the one it was split from.
    #[error("the communicator was aborted")]
    Aborted,
    /// The communicator failed earlier and cannot be used any more; `cause` is the first
    /// error. Abort and build a new one.
    #[error("the communicator is unusable after an earlier failure: {cause}")]
    Broken {
        /// The first failure.
        cause: String,
    },
    /// Element counts do not agree (between this call's tensors, or with a peer's).
    #[error("{op}: size mismatch: {detail}")]
    SizeMismatch {
        /// The operation.
        op: &'static str,
        /// What was expected and what was found.
        detail: String,
    },
    /// Dtypes do not agree (between this call's tensors, or with a peer's).
    #[error("{op}: dtype mismatch: expected {expected:?}, got {got:?}")]
    DtypeMismatch {
        /// The operation.
        op: &'static str,
        /// This rank's dtype.
        expected: Kind,
        /// The other dtype.
        got: Kind,
    },
    /// Ranks issued different operations (or the same one in a different order).
    #[error("ranks disagree on the operation: {0}")]
    Protocol(String),
    /// A tensor handed to `op` is not on the communicator's device
    /// ([`Communicator::device`]); found before any communication, so the communicator stays
    /// usable. Move the tensor (`to_device`) or use a communicator built for its device.
    #[error("{op}: the tensor is on {got:?} but this communicator works on {expected:?}")]
    WrongDevice {
        /// The operation.
        op: &'static str,
        /// The communicator's device.
        expected: Device,
        /// The tensor's device.
        got: Device,
    },
    /// A bad argument found before any communication (bad rank, dtype that cannot be
    /// reduced, ...). The communicator stays usable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The backend cannot run here (no NCCL library, no GPU, ...); the message says what is
    /// missing and how to provide it.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The rendezvous store failed.
    #[error("rendezvous failed: {0}")]
    Rendezvous(#[from] StoreError),
    /// An unexpected I/O error.
    #[error("{op}: I/O error: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// NCCL or CUDA reported an error.
    #[error("{op}: {message}")]
    Device {
        /// The call that failed.
        op: &'static str,
        /// NCCL's or CUDA's message.
        message: String,
    },
    /// A libtorch call failed.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A collective started by one of the `*_start` methods of [`Communicator`], in flight.
///
/// The tensors handed to the start call are owned by the work (shallow clones share their
/// storage with the caller's): the caller must neither read nor write that storage until
/// [`Work::wait`] has returned. Dropping a work without waiting is allowed only after an
/// error or abort (the operation still completes or fails on its own; the result is lost).
pub trait Work: Send + Debug {
    /// Waits until the result may be used: on return the output tensors hold it for the host
    /// (CPU tensors) or, for device backends, every kernel the caller enqueues afterwards on
    /// its current stream is ordered after the collective (the host need not wait for the
    /// device). Fails like the blocking call would (timeout, peer lost, aborted).
    fn wait(self: Box<Self>) -> Result<(), CommError>;

    /// Whether the operation has finished on this rank (a poll; never blocks). Device
    /// backends answer for the device work.
    fn is_done(&self) -> bool;
}

/// A work that completed before its start call returned (what the default `*_start`
/// methods give back: they run the blocking operation).
#[derive(Debug)]
pub struct Completed;

impl Work for Completed {
    fn wait(self: Box<Self>) -> Result<(), CommError> {
        Ok(())
    }
    fn is_done(&self) -> bool {
        true
    }
}

/// One owned operation of [`Communicator::batch_p2p_start`] (the tensors travel with the
/// work).
#[derive(Debug)]
pub enum P2POwned {
    /// Send `tensor` to group rank `peer`.
    Send {
        /// What to send.
        tensor: Tensor,
        /// Destination rank in this communicator.
        peer: usize,
    },
    /// Receive from group rank `peer` into `tensor` (preallocated, the sender's shape and
    /// dtype).
    Recv {
        /// Where the data lands.
        tensor: Tensor,
        /// Source rank in this communicator.
        peer: usize,
    },
}

/// A group of processes that run collectives together. Shared between threads (`&self`
/// everywhere); see the module documentation for the ordering, timeout and failure rules.
pub trait Communicator: Send + Sync + Debug {
    /// The backend's name (`"tcp"`, `"nccl"`).
    fn backend(&self) -> &'static str;
    /// The device every tensor handed to this communicator must live on: each call checks
    /// it first and refuses a tensor elsewhere with [`CommError::WrongDevice`], before any
    /// communication (the communicator stays usable).
    fn device(&self) -> Device;
    /// This process's rank in the communicator, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// The world rank (rank in the communicator everything was split from) of group rank
    /// `rank`. Panics if `rank >= size()` (a programming error).
    fn world_rank(&self, rank: usize) -> usize;

    /// The timeout every call runs under.
    fn timeout(&self) -> Duration;
    /// Sets the timeout of this communicator and of every group split from it (now or
    /// later).
    fn set_timeout(&self, timeout: Duration);

    /// Reduces `tensor` across ranks in place; every rank gets the same bits.
    fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CommError>;

    /// Concatenates every rank's `input` along dim 0 into `output`, in rank order. `output`
    /// has `L` rows and the trailing shape of `input`; rank `r` contributes
    /// `shard_range(L, size, r).len()` rows (so `L` need not divide by the size).
    fn all_gather(&self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError>;

    /// Reduces `input` (`L` rows, the same shape on every rank) across ranks and leaves rows
    /// `shard_range(L, size, rank)` of the result in `output`.
    fn reduce_scatter(
        &self,
        input: &Tensor,
        output: &mut Tensor,
        op: ReduceOp,
    ) -> Result<(), CommError>;

    /// Copies `tensor` of rank `root` into `tensor` of every other rank.
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CommError>;

    /// Sends `tensor` to rank `dst`. Returns once the data is handed to the transport; may
    /// block until `dst` receives. Crossing sends need [`Communicator::batch_p2p`].
    fn send(&self, tensor: &Tensor, dst: usize) -> Result<(), CommError> {
        self.batch_p2p(&mut [P2POp::Send { tensor, peer: dst }])
    }

    /// Receives from rank `src` into `tensor`, which must have the sender's shape and dtype
    /// (else [`CommError::SizeMismatch`] / [`CommError::DtypeMismatch`]).
    fn recv(&self, tensor: &mut Tensor, src: usize) -> Result<(), CommError> {
        self.batch_p2p(&mut [P2POp::Recv { tensor, peer: src }])
    }

    /// Runs all `ops` concurrently and returns when all are done. Ops with the same peer and
    /// direction happen in list order.
    fn batch_p2p(&self, ops: &mut [P2POp<'_>]) -> Result<(), CommError>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<(), CommError>;

    /// Starts [`Communicator::all_reduce`] of `tensor` (in place) and returns without waiting
    /// for it; see [`Work`] for the rules on the tensor until `wait`. Started operations on
    /// one communicator run in the order they were started, on every rank, and before any
    /// blocking call issued after them. Backends that cannot overlap run the operation
    /// before returning (this default).
    fn all_reduce_start(&self, tensor: Tensor, op: ReduceOp) -> Result<Box<dyn Work>, CommError> {
        let mut tensor = tensor;
        self.all_reduce(&mut tensor, op)?;
        Ok(Box::new(Completed))
    }

    /// Starts [`Communicator::reduce_scatter`] (`output` is written in place); see
    /// [`Communicator::all_reduce_start`].
    fn reduce_scatter_start(
        &self,
        input: Tensor,
        output: Tensor,
        op: ReduceOp,
    ) -> Result<Box<dyn Work>, CommError> {
        let mut output = output;
        self.reduce_scatter(&input, &mut output, op)?;
        Ok(Box::new(Completed))
    }

    /// Starts [`Communicator::all_gather`] (`output` is written in place); see
    /// [`Communicator::all_reduce_start`].
    fn all_gather_start(&self, input: Tensor, output: Tensor) -> Result<Box<dyn Work>, CommError> {
        let mut output = output;
        self.all_gather(&input, &mut output)?;
        Ok(Box::new(Completed))
    }

    /// Starts [`Communicator::batch_p2p`] of `ops` (receives are written in place); see
    /// [`Communicator::all_reduce_start`].
    fn batch_p2p_start(&self, ops: Vec<P2POwned>) -> Result<Box<dyn Work>, CommError> {
        let mut ops = ops;
        let mut borrowed: Vec<P2POp<'_>> = ops
            .iter_mut()
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
            .collect();
        self.batch_p2p(&mut borrowed)?;
        Ok(Box::new(Completed))
    }

    /// Splits the communicator (MPI's `comm_split`, NCCL's `ncclCommSplit`): collective over
    /// every rank of this communicator. Ranks passing the same `Some(color)` form a new
    /// communicator, ordered by `(key, rank)`; ranks passing `None` take part and get `None`.
    /// The new communicator inherits the timeout and is aborted with its parent.
    fn split(
        &self,
        color: Option<u32>,
        key: usize,
    ) -> Result<Option<Arc<dyn Communicator>>, CommError>;

    /// Makes every pending and future call on this communicator and its groups fail with
    /// [`CommError::Aborted`]. Never blocks for long; safe to call from any thread, twice.
    fn abort(&self);

    /// Whether [`Communicator::abort`] was called here or on an ancestor.
    fn is_aborted(&self) -> bool;
}

/// Rows `[start, end)` of `len` rows that part `index` of `parts` holds: the first
/// `len % parts` parts get one more row. Used by `all_gather` and `reduce_scatter`.
pub fn shard_range(len: usize, parts: usize, index: usize) -> Range<usize> {
    assert!(parts > 0 && index < parts, "shard {index} of {parts}");
    let base = len / parts;
    let extra = len % parts;
    let start = index * base + index.min(extra);
    let size = base + usize::from(index < extra);
    start..start + size
}

/// A communicator over `ranks` of `comm` (group rank `i` is `ranks[i]`), built with
/// [`Communicator::split`]: every rank of `comm` must call it with the same `ranks`;
/// non-members get `None`.
pub fn new_group(
    comm: &dyn Communicator,
    ranks: &[usize],
) -> Result<Option<Arc<dyn Communicator>>, CommError> {
    let mut seen = vec![false; comm.size()];
    for &r in ranks {
        if r >= comm.size() || seen[r] {
            return Err(CommError::InvalidArgument(format!(
                "new_group: ranks {ranks:?} must be distinct ranks below {}",
                comm.size()
            )));
        }
        seen[r] = true;
    }
    match ranks.iter().position(|&r| r == comm.rank()) {
        Some(i) => comm.split(Some(0), i),
        None => comm.split(None, 0),
    }
}

/// The tensor-, pipeline- and data-parallel groups of one rank.
#[derive(Debug, Clone)]
pub struct MeshComms {
    /// Ranks that differ only in their tp coordinate (rank in group = tp index).
    pub tp: Arc<dyn Communicator>,
    /// Ranks that differ only in their pp coordinate (rank in group = stage).
    pub pp: Arc<dyn Communicator>,
    /// Ranks that differ only in their dp coordinate (rank in group = replica).
    pub dp: Arc<dyn Communicator>,
}

/// Splits `world` into the TP, PP and DP groups of `dims` (three collective splits, in that
/// order, on every rank). Group rank = the rank's coordinate on that axis.
pub fn mesh_groups(world: &dyn Communicator, dims: &ParallelDims) -> Result<MeshComms, CommError> {
    if world.size() != dims.world_size() {
        return Err(CommError::InvalidArgument(format!(
            "mesh_groups: the communicator has {} ranks but {dims} needs {}",
            world.size(),
            dims.world_size()
        )));
    }
    let rank = world.rank();
    let split_axis = |axis: Axis| -> Result<Arc<dyn Communicator>, CommError> {
        let groups = dims.all_groups(axis);
        let color = groups
            .iter()
            .position(|g| g.contains(&rank))
            .expect("every rank is in exactly one group of each axis");
        let key = groups[color].iter().position(|&r| r == rank).unwrap_or(0);
        world
            .split(Some(color as u32), key)?
            .ok_or_else(|| CommError::Protocol("split returned no group for a member".into()))
    };
    let tp = split_axis(Axis::Tp)?;
    let pp = split_axis(Axis::Pp)?;
    let dp = split_axis(Axis::Dp)?;
    Ok(MeshComms { tp, pp, dp })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn shard_ranges_tile_the_rows(len in 0usize..1000, parts in 1usize..17) {
            let mut next = 0;
            for i in 0..parts {
                let r = shard_range(len, parts, i);
                prop_assert_eq!(r.start, next);
                prop_assert!(r.len() == len / parts || r.len() == len / parts + 1);
                next = r.end;
            }
            prop_assert_eq!(next, len);
        }
    }
}
