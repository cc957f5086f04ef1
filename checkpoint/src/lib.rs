//! weaver-checkpoint: sharded checkpoints on object storage.
//!
//! Each rank that owns state writes one safetensors shard (parameters, optimizer moments,
//! step counters, RNG state, sampler position), streamed in the background with an
//! `object_store` multipart upload; the committer (the coordinator, or a single-process
//! trainer) writes `MANIFEST.json` with a create-only put once every shard is durable, and
//! only then moves `latest`. A checkpoint without a manifest does not exist. Loading reads
//! exactly the slices a rank needs with ranged gets and checks a CRC-32C on every block it
//! uses, so a checkpoint saved with one (dp, pp, tp) layout loads into another.
//!
//! | module | owns |
//! |---|---|
//! | [`store`] | URLs → object stores (local fsync'd files, S3, GCS, Azure) |
//! | [`writer`] | [`ShardWriter`]: snapshot → background upload → [`ShardReport`] |
//! | [`commit`](mod@commit) | [`commit()`](commit::commit), [`retain`], [`list`], [`ensure_unused`] (a new run's URL holds no checkpoint) |
//! | [`manifest`] | the manifest format, object names, validation |
//! | [`reader`] | [`Checkpoint`]: open (newest complete / step / before), slice reads, verify |
//! | [`slice`](mod@slice) | slice intersection and copy runs (pure logic) |
//! | [`export`](mod@export) | one consolidated safetensors file |
//! | [`cli`] | `weaver ckpt ls/inspect/verify/export` as functions |
//! | [`runtime`] | the I/O runtime and [`block_on`] |
//!
//! Saving (every rank), then committing (one place):
//!
//! ```ignore
//! let store = CkptStore::open(&cfg.checkpoint.url)?;
//! let snap = Snapshotter::new(); // keep it across saves: warm (pinned) host buffers
//! let tensors = vec![
//!     snap.piece("layers.0.wq", &wq, vec![4096, 1024], vec![tp * 2048, 0])?,
//!     SavedTensor::from_i64s("train.step", &[step as i64]),
//!     SavedTensor::from_bytes(&format!("rng.rank{rank}"), &rng_state),
//! ];
//! let pending = ShardWriter::new(&store).start(step, rank, tensors)?; // returns at once
//! // ... keep training; later (or from a poll in the step loop):
//! let report = pending.wait()?;                 // durable; send it to the committer
//! let manifest = block_on(commit(&store, step, Layout::new(dp, pp, tp), reports))?;
//! block_on(retain(&store, cfg.checkpoint.keep))?;
//! ```
//!
//! Resuming, falling back past checkpoints whose data turns out corrupt:
//!
//! ```ignore
//! let mut selector = Selector::Latest;
//! let state = loop {
//!     let ckpt = block_on(Checkpoint::open(&store, selector))?; // skips incomplete ones
//!     match block_on(ckpt.read_slices(&my_requests)) {
//!         Ok(tensors) => break tensors,
//!         Err(e @ CheckpointError::Corrupt { .. }) => {
//!             tracing::warn!(error = %e, "falling back");
//!             selector = Selector::Before(ckpt.step());
//!         }
//!         Err(e) => return Err(e.into()),
//!     }
//! };
//! ```

pub mod cli;
pub mod commit;
pub mod dtype;
mod error;
pub mod export;
mod format;
mod local;
pub mod manifest;
pub mod reader;
pub mod runtime;
pub mod slice;
pub mod store;
pub mod writer;

pub use commit::{commit, ensure_unused, list, newest_committed, retain, ListedStep, StepState};
pub use dtype::Dtype;
pub use error::{CheckpointError, Result};
pub use export::{export, ExportReport};
pub use manifest::{Layout, Manifest, Piece, ShardInfo, ShardReport, ShardTiming, TensorInfo};
pub use reader::{resolve, Checkpoint, ReadOptions, Selector, SliceRequest, VerifyReport};
pub use runtime::block_on;
pub use slice::Slice;
pub use store::{CkptStore, StoreUrl};
pub use writer::{snapshot, PendingShard, SavedTensor, ShardWriter, Snapshotter, WriterOptions};
