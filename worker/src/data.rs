//! The trainer's batch source, built from `[data]`: the synthetic dataset or WebDataset
//! shards (weaver-data), both prepared ahead on background threads (into pinned memory and
//! copied without blocking when the device is CUDA). The step loop makes one call per step
//! ([`BatchSource::next_step`], weaver-data's trait: the one interface for every source) to
//! get this rank's micro-batches; the data position goes into checkpoints as its own pieces
//! (`data.sampler`, or one `data.stream.NNNNN` per stream, written by the pipeline-stage-0,
//! tensor-rank-0 rank of each replica), apart from the step counter and the optimizer's
//! step. [`FixedBatches`] hands out one fixed batch (benchmarks).

use std::sync::Arc;
use std::time::Duration;

use tch::Device;
use weaver_data::loader::{DpRank, LoaderConfig};
use weaver_data::sample::{Fields, QaFields};
use weaver_data::shards::{ReadPolicy, Stores};
use weaver_data::source::{
    BatchSource, Piece, PieceReader, RankPlace, ShardSource, StepData, SyntheticSource,
};
use weaver_models::config::{DataSource, TextPool};
use weaver_models::data::{Batch, Dataset, SamplerState};
use weaver_models::JobConfig;

use crate::error::WorkerError;

/// Whether the trainer trims each micro-batch's text after its last token
/// ([`Batch::trim_text`]): a different mechanism for the same values, applied where it is
/// exact and free. Exact: the text layers are causal, so the padding columns cut feed only
/// positions whose caption targets are padding (ignored), and EOS pooling and the matching
/// head read a position at or before every row's EOS. Only with EOS pooling (a text class
/// token sits after the padding, at the last position's embedding), not with MLM or VQA rows (lengths
/// of their own), a distillation teacher (its caption terms cover the whole length) or
/// sequence parallelism (whose shards are cut from the full length); nor on an
/// accelerator, where the batch's length would cost a host sync per micro-batch.
pub fn trims_text(job: &JobConfig, device: Device) -> bool {
    let (m, t) = (&job.model, &job.train);
    device == Device::Cpu
        && m.text_pool == TextPool::Eos
        && t.mlm_weight == 0.0
        && t.vqa_weight == 0.0
        && !job.distill.enabled()
        && !job.parallel.sequence_parallel
}

/// Decoding threads for `data.workers` (0: the cores divided by the local processes).
pub fn decode_workers(job: &JobConfig, local_procs: usize) -> usize {
    if job.data.workers > 0 {
        return job.data.workers;
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (cores / local_procs.max(1)).max(1)
}

/// The shard loader's settings for `job`.
pub fn loader_config(
    job: &JobConfig,
    data: &Dataset,
    local_procs: usize,
) -> Result<LoaderConfig, WorkerError> {
    let d = &job.data;
    let stores = Stores::default();
    Ok(LoaderConfig {
        shards: stores.expand("data.shards", &d.shards)?,
        seed: d.seed,
        streams: d.streams,
        shuffle_buffer: d.shuffle_buffer,
        fields: Fields::new(&d.image_key, &d.caption_key, &d.caption_field),
        // VQA reads each sample's question and answer (training and held-out shards).
        qa: (job.train.vqa_weight > 0.0).then(|| QaFields {
            question: d.question_field.clone(),
            answer: d.answer_field.clone(),
        }),
        image_size: job.model.image_size,
        text_len: job.model.max_text_len,
        tokenizer: Arc::clone(&data.tokenizer),
        train: true,
        workers: decode_workers(job, local_procs),
        global_batch: job.train.global_batch,
        max_bad_fraction: d.max_bad_fraction,
        policy: ReadPolicy {
            retries: d.retries,
            backoff: Duration::from_millis(d.retry_backoff_ms),
            timeout: Duration::from_secs(d.timeout_s),
        },
        prefetch: d.prefetch,
    })
}

/// Starts `job`'s batch source for data-parallel rank `dp_rank` of `dp`, resumed from the
/// checkpoint pieces `read` finds (none: from the start). `fallback` is the synthetic
/// sampler's position from a checkpoint that predates the `data.sampler` piece.
#[allow(clippy::too_many_arguments)]
pub fn start_source(
    job: &JobConfig,
    data: &Dataset,
    dp: usize,
    dp_rank: usize,
    writes_position: bool,
    device: Device,
    local_procs: usize,
    read: Option<&mut PieceReader<'_>>,
    fallback: SamplerState,
) -> Result<Box<dyn BatchSource>, WorkerError> {
    let place = RankPlace {
        dp: DpRank { dp, rank: dp_rank },
        microbatches: job.parallel.microbatches,
        writes_position,
    };
    Ok(match job.data.source {
        DataSource::Synthetic => {
            let state = match read {
                Some(r) => SyntheticSource::resume_state(r)?.unwrap_or(fallback),
                None => fallback,
            };
            Box::new(SyntheticSource::start(
                data.clone(),
                job.data.train_size,
                job.train.global_batch,
                place,
                state,
                device,
                job.data.prefetch,
            )?)
        }
        DataSource::Shards => Box::new(ShardSource::start(
            loader_config(job, data, local_procs)?,
            place,
            device,
            read,
        )?),
    })
}

/// The same micro-batches every step (benchmarks: a fixed batch, no data work in the timed
/// step). It has no position to save.
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
    fn next_step(&mut self) -> weaver_data::Result<StepData> {
        let micro = self
            .batches
            .iter()
            .map(|b| b.slice(0, b.len()))
            .collect::<Result<Vec<_>, _>>()?;
        let keys = self
            .batches
            .iter()
            .flat_map(|b| b.indices.iter().map(|i| i.to_string()))
            .collect();
        Ok(StepData {
            micro,
            keys,
            stats: Default::default(),
        })
    }

    fn position(&self) -> Vec<Piece> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weaver_models::config::TextPool;

    /// The trainer trims the text only where `Batch::trim_text` is exact and free.
    #[test]
    fn text_is_trimmed_only_where_exact_and_free() {
        let job = JobConfig::parse("[model]\nflavor = \"debug\"\n", &[]).unwrap();
        assert!(trims_text(&job, Device::Cpu), "the default CPU job trims");
        assert!(
            !trims_text(&job, Device::Cuda(0)),
            "a sync per micro-batch on a GPU"
        );
        let mut cases: Vec<(JobConfig, &str)> = Vec::new();
        let mut j = job.clone();
        j.model.text_pool = TextPool::ClassToken;
        cases.push((j, "a class token after the padding"));
        let mut j = job.clone();
        j.model.text_pool = TextPool::Argmax;
        cases.push((j, "argmax pooling"));
        let mut j = job.clone();
        j.train.mlm_weight = 0.5;
        cases.push((j, "MLM rows"));
        let mut j = job.clone();
        j.train.vqa_weight = 0.5;
        cases.push((j, "VQA rows"));
        let mut j = job.clone();
        j.parallel.sequence_parallel = true;
        cases.push((j, "sequence parallelism"));
        let mut j = job.clone();
        j.distill.teacher = "teacher/run".into();
        cases.push((j, "a distillation teacher"));
        for (j, what) in cases {
            assert!(!trims_text(&j, Device::Cpu), "not with {what}");
        }
    }
}
