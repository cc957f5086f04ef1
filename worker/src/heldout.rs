//! Held-out shards (`data.eval_shards`) read batch by batch outside training: what
//! `weaver ckpt quantize`'s calibration pass runs the float model on when the job trains
//! on shards (issue 15). The samples right after the evaluation pool (its first
//! `eval.pool` samples), in the shards' seeded order with centre crops, as [`EvalPool`]
//! reads them, so that calibration never sees the samples evaluation scores.

use std::collections::HashSet;

use tch::Device;
use weaver_data::source::{BatchSource, RankPlace, ShardSource};
use weaver_models::data::Batch;
use weaver_models::JobConfig;

use crate::error::WorkerError;
use crate::eval::EvalPool;

/// `samples` held-out samples of a job's shards, in batches, on the CPU (an iterator).
#[derive(Debug)]
pub struct HeldoutBatches {
    source: ShardSource,
    /// Samples per batch read.
    chunk: usize,
    /// The evaluation pool (skipped) and the samples asked for after it.
    pool: usize,
    samples: usize,
    /// Samples read from the shards so far.
    read: usize,
    seen: HashSet<String>,
}

/// Reads `samples` held-out samples of `job` (its `data.eval_shards`) after the
/// evaluation pool, in batches of `batch` (the batch that straddles the pool's end, and the
/// last, cut). An error when the job names no held-out shards; the iterator's last item is
/// an error when the shards hold fewer than the pool and the samples.
pub fn heldout_shards(
    job: &JobConfig,
    samples: usize,
    batch: usize,
) -> Result<HeldoutBatches, WorkerError> {
    let data = crate::train::dataset(job)?;
    let Some(EvalPool::Shards { cfg, .. }) = EvalPool::for_job(job, &data, 1)? else {
        return Err(WorkerError::Other(
            "the job names no held-out shards (data.eval_shards) to read".into(),
        ));
    };
    let chunk = batch.clamp(1, samples.max(1));
    let mut cfg = *cfg;
    cfg.global_batch = chunk;
    let place = RankPlace {
        dp: weaver_data::loader::DpRank { dp: 1, rank: 0 },
        microbatches: 1,
        writes_position: false,
    };
    Ok(HeldoutBatches {
        source: ShardSource::start(cfg, place, Device::Cpu, None)?,
        chunk,
        pool: job.eval.pool,
        samples,
        read: 0,
        seen: HashSet::new(),
    })
}

impl HeldoutBatches {
    /// The next `chunk` samples of the shards, an error once a sample used comes round
    /// again (the shards ran out; the last batch's samples past the end are not used).
    fn read(&mut self) -> Result<Batch, WorkerError> {
        let step = self.source.next_step()?;
        let used = (self.pool + self.samples).saturating_sub(self.read);
        for k in step.keys.iter().take(used) {
            if !self.seen.insert(k.clone()) {
                return Err(WorkerError::Other(format!(
                    "--calibrate: data.eval_shards hold {} samples (sample {k} came round again), fewer than the evaluation pool (eval.pool = {}) and the {} calibration samples after it: lower --calibrate",
                    self.seen.len(),
                    self.pool,
                    self.samples
                )));
            }
        }
        let b =
            step.micro.into_iter().next().ok_or_else(|| {
                WorkerError::Other("the held-out shards gave an empty step".into())
            })?;
        if b.len() != self.chunk {
            return Err(WorkerError::Other(format!(
                "the held-out shards gave {} samples for a batch of {}",
                b.len(),
                self.chunk
            )));
        }
        self.read += self.chunk;
        Ok(b)
    }
}

impl Iterator for HeldoutBatches {
    type Item = Result<Batch, WorkerError>;

    fn next(&mut self) -> Option<Self::Item> {
        let end = self.pool + self.samples;
        while self.read < end {
            let start = self.read;
            let b = match self.read() {
                Ok(b) => b,
                Err(e) => {
                    // Nothing more after an error.
                    self.read = end;
                    return Some(Err(e));
                }
            };
            // The part of samples `start..start + chunk` in `pool..end`.
            let (lo, hi) = (start.max(self.pool), (start + self.chunk).min(end));
            if lo < hi {
                return Some(b.slice(lo - start, hi - lo).map_err(WorkerError::from));
            }
        }
        None
    }
}
