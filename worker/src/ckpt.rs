//! Checkpoints of a training job (weaver-checkpoint's format): what each rank saves, who
//! commits, and loading a checkpoint of any layout into this rank.
//!
//! Each (pp, tp) cell's data-parallel rank 0 saves its parameters and their AdamW moments
//! as pieces of the global tensors (replicated parameters from TP rank 0 only, so every
//! element is stored once); world rank 0 adds the training state (`train.state`: step,
//! sampler epoch and position, optimizer step) and the job's config. Parameters are saved
//! in f32 — the master copy when the model computes in bf16 — so that a resumed run starts
//! from the exact optimizer state. Training consumes no random numbers (no dropout; data is
//! a function of sample indices), so there is no RNG state to save.
//!
//! Saving stalls training only for the host copy ([`Snapshotter`], buffers reused across
//! saves); the upload runs in the background and is reported, once durable, to a
//! [`ShardSink`]: the coordinator in a cluster job, a [`LocalCommitter`] in one process.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::Range;
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};
use tracing::{info, warn};
use weaver_checkpoint::{
    block_on, commit, retain, Checkpoint, CheckpointError, CkptStore, Layout, PendingShard,
    SavedTensor, Selector, ShardReport, ShardWriter, SliceRequest, Snapshotter,
};
use weaver_models::nn::Param;

use crate::error::WorkerError;

/// Name of the optimizer's first moment of parameter `name`.
pub fn exp_avg_name(name: &str) -> String {
    format!("optim.exp_avg.{name}")
}

/// Name of the optimizer's second moment of parameter `name`.
pub fn exp_avg_sq_name(name: &str) -> String {
    format!("optim.exp_avg_sq.{name}")
}

/// The training state tensor: `[step, sampler epoch, sampler position, optimizer step]`.
pub const STATE: &str = "train.state";
/// The job's config (TOML bytes).
pub const CONFIG: &str = "train.config";

/// Prefixes of the checkpoint pieces that are not model parameters: optimizer moments,
/// the training state and config, and the data position (`data.sampler`,
/// `data.stream.NNNNN`).
pub const NON_PARAM_PREFIXES: [&str; 3] = ["optim.", "train.", "data."];

/// Whether a checkpoint tensor is a model parameter (what `weaver ckpt export` keeps).
pub fn is_param(name: &str) -> bool {
    !NON_PARAM_PREFIXES.iter().any(|p| name.starts_with(p))
}

impl From<CheckpointError> for WorkerError {
    fn from(e: CheckpointError) -> Self {
        WorkerError::Checkpoint(e.to_string())
    }
}

/// Where ranks report a durable shard (or that they had nothing to save) for a step.
pub trait ShardSink: Send + Sync + Debug {
    /// Rank `rank`'s part of checkpoint `step` is durable.
    fn durable(
        &self,
        step: u64,
        rank: usize,
        report: Option<ShardReport>,
    ) -> Result<(), WorkerError>;
}

/// Commits a checkpoint when every rank of an in-process world has reported (one process,
/// or ranks that are threads of one process), then applies retention.
#[derive(Debug)]
pub struct LocalCommitter {
    store: CkptStore,
    world: usize,
    keep: usize,
    layout: Layout,
    pending: Mutex<BTreeMap<u64, Vec<Option<ShardReport>>>>,
}

impl LocalCommitter {
    /// A committer for `world` ranks of `layout` writing to `store`, keeping the last `keep`
    /// checkpoints (0: all).
    pub fn new(store: CkptStore, world: usize, keep: usize, layout: Layout) -> LocalCommitter {
        LocalCommitter {
            store,
            world,
            keep,
            layout,
            pending: Mutex::new(BTreeMap::new()),
        }
    }
}

/// Commits `reports` of `step` (the committer's side: coordinator or local), then keeps the
/// newest `keep`. Returns the checkpoint's URL.
pub fn commit_and_retain(
    store: &CkptStore,
    step: u64,
    layout: Layout,
    reports: Vec<ShardReport>,
    keep: usize,
) -> Result<String, WorkerError> {
    let manifest = block_on(commit(store, step, layout, reports))?;
    let url = format!(
        "{}/{}",
        store.url().trim_end_matches('/'),
        weaver_checkpoint::manifest::step_dir(manifest.step)
    );
    info!(step, url = %url, tensors = manifest.tensors.len(), "checkpoint committed");
    if keep > 0 {
        let deleted = block_on(retain(store, keep))?;
        if !deleted.is_empty() {
            info!(?deleted, keep, "old checkpoints deleted");
        }
    }
    Ok(url)
}

impl ShardSink for LocalCommitter {
    fn durable(
        &self,
        step: u64,
        _rank: usize,
        report: Option<ShardReport>,
    ) -> Result<(), WorkerError> {
        let ready = {
            let mut p = self
                .pending
                .lock()
                .map_err(|_| WorkerError::Checkpoint("committer lock poisoned".into()))?;
            let entry = p.entry(step).or_default();
            entry.push(report);
            if entry.len() == self.world {
                p.remove(&step)
            } else {
                None
            }
        };
        if let Some(reports) = ready {
            let reports: Vec<ShardReport> = reports.into_iter().flatten().collect();
            commit_and_retain(&self.store, step, self.layout.clone(), reports, self.keep)?;
        }
        Ok(())
    }
}

/// A rank's saving machinery.
#[derive(Debug)]
pub struct Saver {
    store: CkptStore,
    writer: ShardWriter,
    snap: Snapshotter,
    pending: Option<(u64, Option<PendingShard>)>,
    sink: std::sync::Arc<dyn ShardSink>,
    rank: usize,
}

impl Saver {
    /// Saves to `url`, reporting to `sink`.
    pub fn new(
        url: &str,
        rank: usize,
        sink: std::sync::Arc<dyn ShardSink>,
    ) -> Result<Saver, WorkerError> {
        let store = CkptStore::open(url)?;
        Ok(Saver {
            writer: ShardWriter::new(&store),
            store,
            snap: Snapshotter::new(),
            pending: None,
            sink,
            rank,
        })
    }

    /// The store.
    pub fn store(&self) -> &CkptStore {
        &self.store
    }

    /// Starts saving `tensors` as this rank's shard of `step` (none: nothing to save here);
    /// returns once they are copied to host memory. A save still uploading is finished
    /// first (one checkpoint in flight at a time).
    pub fn start(&mut self, step: u64, tensors: Vec<SavedTensor>) -> Result<(), WorkerError> {
        self.finish()?;
        let pending = if tensors.is_empty() {
            None
        } else {
            Some(self.writer.start(step, self.rank, tensors)?)
        };
        self.pending = Some((step, pending));
        Ok(())
    }

    /// Reports the save in flight if its upload is durable; does not wait.
    pub fn poll(&mut self) -> Result<(), WorkerError> {
        let done = match &self.pending {
            Some((_, Some(p))) => p.is_finished(),
            Some((_, None)) => true,
            None => false,
        };
        if done {
            self.finish()?;
        }
        Ok(())
    }

    /// Waits for the save in flight and reports it.
    pub fn finish(&mut self) -> Result<(), WorkerError> {
        if let Some((step, pending)) = self.pending.take() {
            let report = match pending {
                Some(p) => Some(p.wait()?),
                None => None,
            };
            self.sink.durable(step, self.rank, report)?;
        }
        Ok(())
    }

    /// Host copies of a parameter-shaped tensor as its piece of the global tensor `name`.
    pub fn piece(&self, name: String, t: &Tensor, p: &Param) -> Result<SavedTensor, WorkerError> {
        let global: Vec<u64> = p.global_shape.iter().map(|&d| d as u64).collect();
        let mut offset = vec![0u64; global.len()];
        if p.shard.world > 1 {
            let (dim, start, _) = p.shard.range(&p.global_shape);
            offset[dim] = start as u64;
        }
        Ok(self.snap.piece(name, t, global, offset)?)
    }

    /// Reserves host buffers like `tensors` (so the first save does not allocate).
    pub fn reserve(&self, tensors: &[&Tensor]) -> Result<(), WorkerError> {
        Ok(self.snap.reserve(tensors)?)
    }
}

/// The global ranges of parameter `p`'s local part.
pub fn param_ranges(p: &Param) -> Vec<Range<u64>> {
    let mut r: Vec<Range<u64>> = p.global_shape.iter().map(|&d| 0..d as u64).collect();
    if p.shard.world > 1 {
        let (dim, start, len) = p.shard.range(&p.global_shape);
        r[dim] = start as u64..(start + len) as u64;
    }
    r
}

/// Opens the checkpoint to resume from: `latest` (under the job's `[checkpoint] url`) or a
/// URL (a checkpoint root: its newest complete step; or a step directory).
pub fn open_resume(spec: &str, job_url: &str) -> Result<Checkpoint, WorkerError> {
    let ckpt = if spec == "latest" {
        if job_url.is_empty() {
            return Err(WorkerError::Checkpoint(
                "--resume latest needs [checkpoint] url in the config (or pass the checkpoint's URL)".into(),
            ));
        }
        let store = CkptStore::open(job_url)?;
        block_on(Checkpoint::open(&store, Selector::Latest))?
    } else {
        block_on(Checkpoint::open_url(spec))?
    };
    Ok(ckpt)
}

/// Reads `requests` from `ckpt`, falling back to older checkpoints of the same store while
/// the data turns out corrupt (a checkpoint whose manifest is fine but whose bytes are not).
pub fn read_with_fallback(
    mut ckpt: Checkpoint,
    requests: &[SliceRequest],
    fallback: bool,
) -> Result<(Checkpoint, Vec<Tensor>), WorkerError> {
    loop {
        match block_on(ckpt.read_slices(requests)) {
            Ok(t) => return Ok((ckpt, t)),
            Err(e @ CheckpointError::Corrupt { .. }) if fallback => {
                warn!(step = ckpt.step(), error = %e, "checkpoint data is corrupt; falling back to the one before");
                let store = ckpt.store().clone();
                ckpt = block_on(Checkpoint::open(&store, Selector::Before(ckpt.step())))?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A tensor read from a checkpoint, on `device` in `kind`.
pub fn to_param(t: &Tensor, kind: Kind, device: Device) -> Result<Tensor, WorkerError> {
    Ok(t.f_to_kind(kind)?.f_to_device(device)?)
}
