//! Where a rank's micro-batches come from: the [`BatchSource`] interface the step loop calls
//! once per step, and its first implementation, [`SyntheticSource`] (the seeded sampler over
//! the synthetic dataset). A prefetching loader (WebDataset shards prepared on a background
//! thread into pinned memory) implements the same trait.
//!
//! A source's [`DataPosition`] is saved in every checkpoint as its own piece
//! (`data.position`), apart from the step counter and the optimizer's step, and is global:
//! every rank draws from the same global batch order, so a position saved by one layout
//! resumes on any other.

use std::fmt::Debug;

use serde::{Deserialize, Serialize};
use tch::Device;
use weaver_models::data::{Batch, Dataset, Sampler, SamplerState, Split};
use weaver_models::JobConfig;

use crate::error::WorkerError;

/// A checkpointable data position: which source wrote it, and that source's state (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataPosition {
    /// The source kind (`"synthetic"`, ...): a position only resumes the same kind.
    pub source: String,
    /// The source's own state.
    pub state: serde_json::Value,
}

/// This rank's micro-batches, step after step.
pub trait BatchSource: Send + Debug {
    /// The micro-batches of the next step for this rank, in micro-batch order, on the
    /// compute device.
    fn next_step(&mut self) -> Result<Vec<Batch>, WorkerError>;

    /// The position after the last step handed out (what a checkpoint of that step saves;
    /// a prefetching source reports what training consumed, not what it prepared).
    fn position(&self) -> DataPosition;

    /// Continues from `pos` (the next step is the one after the step that saved it).
    fn seek(&mut self, pos: &DataPosition) -> Result<(), WorkerError>;
}

/// The synthetic dataset drawn by the seeded, resumable sampler: each step takes the next
/// `global_batch` indices, cuts them into `dp × microbatches` micro-batches, and this
/// data-parallel rank renders micro-batches `dp_rank·M .. (dp_rank+1)·M` — the micro-batches
/// a single process accumulates, so every layout computes the same function.
#[derive(Debug)]
pub struct SyntheticSource {
    data: Dataset,
    sampler: Sampler,
    seed: u64,
    size: u64,
    global_batch: usize,
    micro: usize,
    first: usize,
    count: usize,
    device: Device,
}

/// The source kind [`SyntheticSource`] writes in its positions.
pub const SYNTHETIC: &str = "synthetic";

impl SyntheticSource {
    /// The source of data-parallel rank `dp_rank` of `job` (its `[parallel]` layout), from
    /// the start of the first epoch.
    pub fn new(job: &JobConfig, data: Dataset, dp_rank: usize, device: Device) -> SyntheticSource {
        let m = job.parallel.microbatches;
        SyntheticSource {
            data,
            sampler: Sampler::new(job.data.seed, job.data.train_size, SamplerState::default()),
            seed: job.data.seed,
            size: job.data.train_size,
            global_batch: job.train.global_batch,
            micro: job.micro_batch_size(),
            first: dp_rank * m,
            count: m,
            device,
        }
    }

    /// The position of a sampler state (also how checkpoints of the older format, which
    /// stored the sampler in `train.state`, are read).
    pub fn position_of(state: SamplerState) -> DataPosition {
        DataPosition {
            source: SYNTHETIC.into(),
            state: serde_json::json!({"epoch": state.epoch, "position": state.position}),
        }
    }
}

impl BatchSource for SyntheticSource {
    fn next_step(&mut self) -> Result<Vec<Batch>, WorkerError> {
        let indices = self.sampler.next_indices(self.global_batch);
        let mbs = self.micro;
        (self.first..self.first + self.count)
            .map(|mb| {
                Ok(self.data.batch(
                    Split::Train,
                    &indices[mb * mbs..(mb + 1) * mbs],
                    self.device,
                )?)
            })
            .collect()
    }

    fn position(&self) -> DataPosition {
        SyntheticSource::position_of(self.sampler.state())
    }

    fn seek(&mut self, pos: &DataPosition) -> Result<(), WorkerError> {
        if pos.source != SYNTHETIC {
            return Err(WorkerError::Checkpoint(format!(
                "the checkpoint's data position is from a {:?} source; this job reads {SYNTHETIC:?} data",
                pos.source
            )));
        }
        let get = |k: &str| {
            pos.state.get(k).and_then(|v| v.as_u64()).ok_or_else(|| {
                WorkerError::Checkpoint(format!(
                    "the checkpoint's data position has no {k}: {}",
                    pos.state
                ))
            })
        };
        let state = SamplerState {
            epoch: get("epoch")?,
            position: get("position")?,
        };
        self.sampler = Sampler::new(self.seed, self.size, state);
        Ok(())
    }
}

/// The same micro-batches every step (benchmarks: a fixed batch, no data work in the timed
/// step). Its position never moves.
#[derive(Debug)]
pub struct FixedBatches {
    batches: Vec<Batch>,
}

impl FixedBatches {
    /// Hands out `batches` at every step.
    pub fn new(batches: Vec<Batch>) -> FixedBatches {
        FixedBatches { batches }
    }
}

impl BatchSource for FixedBatches {
    fn next_step(&mut self) -> Result<Vec<Batch>, WorkerError> {
        self.batches
            .iter()
            .map(|b| Ok(b.slice(0, b.len())?))
            .collect()
    }

    fn position(&self) -> DataPosition {
        DataPosition {
            source: "fixed".into(),
            state: serde_json::Value::Null,
        }
    }

    fn seek(&mut self, _pos: &DataPosition) -> Result<(), WorkerError> {
        Ok(())
    }
}
