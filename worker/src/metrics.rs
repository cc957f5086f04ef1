//! The run directory's `metrics.jsonl`: one JSON object a line, flushed as written, so a
//! person can `tail -f` or plot it while the job runs (DESIGN.md, "The CLI contract").

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::WorkerError;

/// A training line.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer steps completed (1-based: the line after the first update says 1).
    pub step: u64,
    /// Weighted total loss, averaged over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used by this step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// (image patches + text tokens) × samples per second.
    pub tokens_per_s: f64,
    /// Contrastive loss.
    pub itc: f64,
    /// Captioning loss.
    pub caption: f64,
    /// Matching loss.
    pub itm: f64,
    /// Masked-language-modelling loss (`train.mlm_weight > 0` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlm: Option<f64>,
    /// VQA answer loss (`train.vqa_weight > 0` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vqa: Option<f64>,
    /// Wall time of the step in seconds.
    pub step_time_s: f64,
    /// Model FLOPs per second achieved (training FLOPs by formula / step time).
    pub flops_per_s: f64,
    /// Model FLOPs utilisation against `train.peak_tflops`, when that is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// The most memory any rank held during the step, in bytes: on CUDA the caching
    /// allocator's peak, on a CPU the counted bytes of live tensors (see
    /// [`crate::memory`]). Absent where it cannot be measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_mem_bytes: Option<u64>,
    /// Each rank's peak in the step, by world rank.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_mem_bytes_ranks: Option<Vec<u64>>,
    /// Counters of the shard loader over all ranks (`data.source = "shards"` only).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataCounts>,
    /// The distillation terms (`[distill]` jobs only).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillMetrics>,
}

/// The distillation terms of a step (unweighted, times `T²`), averaged over the step's
/// micro-batches (see [`crate::distill`]).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct DistillMetrics {
    /// KL of the image→text / text→image similarity distributions.
    pub distill_itc_kl: f64,
    /// KL of the caption next-token distributions.
    pub distill_caption_kl: f64,
    /// Feature-matching distance (0 without `distill.feature_weight`).
    pub distill_feature: f64,
    /// Interactive contrastive loss (0 without `distill.icl_weight`).
    pub distill_icl: f64,
}

/// The shard loader's counters, cumulative over the job (resumed runs included), summed
/// over the data-parallel replicas.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default)]
pub struct DataCounts {
    /// Samples trained on.
    pub data_samples: u64,
    /// Samples skipped because the image was missing or did not decode.
    pub data_bad_image: u64,
    /// Samples skipped because the caption was missing, empty or unreadable.
    pub data_bad_caption: u64,
    /// Unreadable tar members.
    pub data_bad_members: u64,
    /// Shards skipped after retries.
    pub data_shards_skipped: u64,
}

impl DataCounts {
    /// As a JSON object (for the coordinator's metrics lines).
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        }
    }
}

impl StepMetrics {
    /// The line of step `step` of `job`, which took `secs` on `devices` devices: throughput
    /// and FLOPs by formula over the global batch, MFU against `train.peak_tflops` per
    /// device when it is set.
    #[allow(clippy::too_many_arguments)]
    pub fn of_step(
        job: &weaver_models::JobConfig,
        step: u64,
        losses: &crate::train::StepLosses,
        lr: f64,
        grad_norm: f64,
        secs: f64,
        devices: usize,
    ) -> StepMetrics {
        let t = &job.train;
        let tokens = (t.global_batch
            * weaver_models::data::tokens_per_sample(
                job.model.num_patches(),
                job.model.max_text_len,
            )) as f64;
        let flops = job.model.train_flops_per_sample(t.itm_weight > 0.0) * t.global_batch as f64;
        StepMetrics {
            step,
            loss: losses.total,
            lr,
            grad_norm,
            tokens_per_s: tokens / secs,
            itc: losses.itc,
            caption: losses.caption,
            itm: losses.itm,
            mlm: (t.mlm_weight > 0.0).then_some(losses.mlm),
            vqa: (t.vqa_weight > 0.0).then_some(losses.vqa),
            step_time_s: secs,
            flops_per_s: flops / secs,
            mfu: (t.peak_tflops > 0.0)
                .then_some(flops / secs / (t.peak_tflops * 1e12 * devices as f64)),
            peak_mem_bytes: None,
            peak_mem_bytes_ranks: None,
            data: None,
            distill: None,
        }
    }
}

/// An evaluation line.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalMetrics {
    /// Always true.
    pub eval: bool,
    /// Step evaluated after.
    pub step: u64,
    /// Image→text recall@1 over the held-out pool.
    pub i2t_r1: f64,
    /// Text→image recall@1 over the held-out pool.
    pub t2i_r1: f64,
    /// Image→text recall@5 (the true caption among the 5 most similar).
    pub i2t_r5: f64,
    /// Image→text recall@10.
    pub i2t_r10: f64,
    /// Text→image recall@5.
    pub t2i_r5: f64,
    /// Text→image recall@10.
    pub t2i_r10: f64,
    /// Fraction of greedy captions equal to the reference.
    pub caption_exact: f64,
    /// Fraction of held-out questions whose greedy answer is exactly the reference
    /// (`train.vqa_weight > 0` only; over the same held-out pool).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vqa_acc: Option<f64>,
    /// The majority-answer baseline on the same questions: the fraction whose answer is
    /// the training split's most frequent answer (`train.vqa_weight > 0` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vqa_majority: Option<f64>,
    /// Pool size (chance recall@1 is 1/pool).
    pub pool: usize,
    /// Seconds the evaluation took.
    pub eval_time_s: f64,
}

/// Appends JSON lines to `<run dir>/metrics.jsonl`, and, with `train.tensorboard`, the same
/// values to a TensorBoard event file beside it.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    tensorboard: Option<weaver_tensorboard::EventWriter>,
}

impl MetricsWriter {
    /// [`MetricsWriter::open`], writing TensorBoard events too when `job.train.tensorboard`.
    pub fn for_job(
        dir: &Path,
        job: &weaver_models::JobConfig,
    ) -> Result<MetricsWriter, WorkerError> {
        let mut w = MetricsWriter::open(dir)?;
        if job.train.tensorboard {
            w.tensorboard = Some(
                weaver_tensorboard::EventWriter::create(dir)
                    .map_err(|e| WorkerError::Other(e.to_string()))?,
            );
        }
        Ok(w)
    }

    /// Opens (appending: a resumed run continues the same file) `dir/metrics.jsonl`.
    pub fn open(dir: &Path) -> Result<MetricsWriter, WorkerError> {
        std::fs::create_dir_all(dir).map_err(|e| WorkerError::io(dir, e))?;
        let path = dir.join("metrics.jsonl");
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| WorkerError::io(&path, e))?;
        Ok(MetricsWriter {
            path,
            out: BufWriter::new(f),
            tensorboard: None,
        })
    }

    /// Writes one line.
    pub fn write<T: Serialize>(&mut self, line: &T) -> Result<(), WorkerError> {
        let text = serde_json::to_string(line).map_err(|e| WorkerError::Other(e.to_string()))?;
        writeln!(self.out, "{text}")
            .and_then(|_| self.out.flush())
            .map_err(|e| WorkerError::io(&self.path, e))?;
        if let Some(tb) = &mut self.tensorboard {
            let value =
                serde_json::to_value(line).map_err(|e| WorkerError::Other(e.to_string()))?;
            tb.write_line(&value)
                .map_err(|e| WorkerError::Other(e.to_string()))?;
        }
        Ok(())
    }
}

/// Where a job's metrics go: `metrics.jsonl` in the run directory, or the coordinator.
pub trait MetricsSink: Send + std::fmt::Debug {
    /// A training step.
    fn step(&mut self, m: &StepMetrics) -> Result<(), WorkerError>;
    /// An evaluation.
    fn eval(&mut self, e: &EvalMetrics) -> Result<(), WorkerError>;
    /// The job's last line (`{"done": true, ...}`).
    fn done(&mut self, summary: &serde_json::Value) -> Result<(), WorkerError>;
}

impl MetricsSink for MetricsWriter {
    fn step(&mut self, m: &StepMetrics) -> Result<(), WorkerError> {
        self.write(m)
    }
    fn eval(&mut self, e: &EvalMetrics) -> Result<(), WorkerError> {
        self.write(e)
    }
    fn done(&mut self, summary: &serde_json::Value) -> Result<(), WorkerError> {
        self.write(summary)
    }
}
