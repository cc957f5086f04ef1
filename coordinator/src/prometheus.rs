//! The job's metrics for Prometheus: [`Coordinator::serve_metrics`] answers `GET /metrics`
//! in the OpenMetrics text format (which Prometheus scrapes, and which the official
//! clients' text parsers read), encoded by the `prometheus-client` crate.
//!
//! Values come from three places: every `metrics.jsonl` line the job writes (step, losses,
//! learning rate, gradient norm, throughput, MFU, step time, the data loader's counters,
//! held-out recall), each checkpoint commit (bytes, host-copy, upload and commit seconds),
//! and, at scrape time, the job's state (workers, generation, restarts, phase). Every name
//! starts with `weaver_`; docs/operations.md lists them.
//!
//! [`Coordinator::serve_metrics`]: crate::Coordinator::serve_metrics

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use serde_json::Value;
use weaver_rpc::ShardStats;

use crate::pb;

type F64 = Gauge<f64, AtomicU64>;
type Labels = Vec<(String, String)>;

/// Every exported metric (cheap atomic handles; the registry holds the same ones).
#[derive(Debug)]
pub(crate) struct JobMetrics {
    registry: Registry,
    step: Gauge,
    total_steps: Gauge,
    loss: Family<Labels, F64>,
    lr: F64,
    grad_norm: F64,
    tokens_per_s: F64,
    flops_per_s: F64,
    mfu: F64,
    step_time: Histogram,
    eval_step: Gauge,
    recall: Family<Labels, F64>,
    caption_exact: F64,
    workers_registered: Gauge,
    workers_alive: Gauge,
    workers_spare: Gauge,
    workers_expected: Gauge,
    generation: Gauge,
    restarts: Counter,
    phase: Family<Labels, Gauge>,
    ckpt_step: Gauge,
    ckpt_bytes: Gauge,
    ckpt_save_s: F64,
    ckpt_upload_s: F64,
    ckpt_commit_s: F64,
    ckpt_committed: Counter,
    ckpt_failed: Counter,
    ckpt_bytes_total: Counter,
    data: Family<Labels, Gauge>,
    data_skipped: Gauge,
    peak_memory: Family<Labels, Gauge>,
}

/// The data loader's counters in `metrics.jsonl` (cumulative over the job, summed over the
/// replicas), exported as `weaver_data_samples{kind=...}`.
const DATA_KEYS: [(&str, &str); 5] = [
    ("data_samples", "trained"),
    ("data_bad_image", "bad_image"),
    ("data_bad_caption", "bad_caption"),
    ("data_bad_members", "bad_member"),
    ("data_shards_skipped", "shards_skipped"),
];

/// Phases as label values.
const PHASES: [(pb::Phase, &str); 5] = [
    (pb::Phase::Gathering, "gathering"),
    (pb::Phase::Planning, "planning"),
    (pb::Phase::Running, "running"),
    (pb::Phase::Completed, "completed"),
    (pb::Phase::Failed, "failed"),
];

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

impl JobMetrics {
    pub(crate) fn new(total_steps: u64) -> JobMetrics {
        let mut r = Registry::with_prefix("weaver");
        let m = JobMetrics {
            registry: Registry::default(),
            step: Gauge::default(),
            total_steps: Gauge::default(),
            loss: Family::default(),
            lr: F64::default(),
            grad_norm: F64::default(),
            tokens_per_s: F64::default(),
            flops_per_s: F64::default(),
            mfu: F64::default(),
            // 5 ms to about 160 s per step.
            step_time: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            eval_step: Gauge::default(),
            recall: Family::default(),
            caption_exact: F64::default(),
            workers_registered: Gauge::default(),
            workers_alive: Gauge::default(),
            workers_spare: Gauge::default(),
            workers_expected: Gauge::default(),
            generation: Gauge::default(),
            restarts: Counter::default(),
            phase: Family::default(),
            ckpt_step: Gauge::default(),
            ckpt_bytes: Gauge::default(),
            ckpt_save_s: F64::default(),
            ckpt_upload_s: F64::default(),
            ckpt_commit_s: F64::default(),
            ckpt_committed: Counter::default(),
            ckpt_failed: Counter::default(),
            ckpt_bytes_total: Counter::default(),
            data: Family::default(),
            data_skipped: Gauge::default(),
            peak_memory: Family::default(),
        };
        m.total_steps.set(total_steps as i64);
        r.register(
            "step",
            "Optimizer steps completed (the latest training line)",
            m.step.clone(),
        );
        r.register(
            "total_steps",
            "Optimizer steps the job runs (train.steps)",
            m.total_steps.clone(),
        );
        r.register(
            "loss",
            "Training loss of the latest step: term=total (weighted sum), itc, caption, itm, and with [distill] distill_itc_kl, distill_caption_kl, distill_feature, distill_icl (unweighted)",
            m.loss.clone(),
        );
        r.register(
            "learning_rate",
            "Learning rate of the latest step",
            m.lr.clone(),
        );
        r.register(
            "grad_norm",
            "Global gradient norm before clipping, latest step",
            m.grad_norm.clone(),
        );
        r.register(
            "tokens_per_second",
            "Throughput of the latest step: (image patches + text tokens) x samples per second",
            m.tokens_per_s.clone(),
        );
        r.register(
            "flops_per_second",
            "Model FLOP/s of the latest step (training FLOPs by formula / step time)",
            m.flops_per_s.clone(),
        );
        r.register(
            "mfu",
            "Model FLOPs utilisation of the latest step against train.peak_tflops (0 when unset)",
            m.mfu.clone(),
        );
        r.register_with_unit(
            "step_time",
            "Wall time of each training step",
            Unit::Seconds,
            m.step_time.clone(),
        );
        r.register(
            "eval_step",
            "Step of the latest held-out evaluation",
            m.eval_step.clone(),
        );
        r.register(
            "eval_recall_at_1",
            "Held-out retrieval recall@1 of the latest evaluation: direction=i2t, t2i",
            m.recall.clone(),
        );
        r.register(
            "eval_caption_exact",
            "Fraction of held-out greedy captions equal to the reference, latest evaluation",
            m.caption_exact.clone(),
        );
        r.register(
            "workers_registered",
            "Workers registered in the current generation",
            m.workers_registered.clone(),
        );
        r.register(
            "workers_alive",
            "Registered workers whose last heartbeat is within the heartbeat timeout",
            m.workers_alive.clone(),
        );
        r.register(
            "workers_spare",
            "Registered workers the current layout does not use (standing by)",
            m.workers_spare.clone(),
        );
        r.register(
            "workers_expected",
            "Workers the current layout needs",
            m.workers_expected.clone(),
        );
        r.register(
            "generation",
            "The job's generation (1, then one more per restart, shrink or grow)",
            m.generation.clone(),
        );
        r.register(
            "restarts",
            "New generations started after the first",
            m.restarts.clone(),
        );
        r.register(
            "job_phase",
            "1 for the job's current phase, 0 for the others",
            m.phase.clone(),
        );
        r.register(
            "checkpoint_step",
            "Step of the latest committed checkpoint",
            m.ckpt_step.clone(),
        );
        r.register_with_unit(
            "checkpoint_size",
            "Size of the latest committed checkpoint (all shards)",
            Unit::Bytes,
            m.ckpt_bytes.clone(),
        );
        r.register_with_unit(
            "checkpoint_save",
            "Latest checkpoint: the longest host copy of one rank (training stalls this long)",
            Unit::Seconds,
            m.ckpt_save_s.clone(),
        );
        r.register_with_unit(
            "checkpoint_upload",
            "Latest checkpoint: the longest shard upload of one rank (start to durable)",
            Unit::Seconds,
            m.ckpt_upload_s.clone(),
        );
        r.register_with_unit(
            "checkpoint_commit",
            "Latest checkpoint: writing the manifest and applying retention",
            Unit::Seconds,
            m.ckpt_commit_s.clone(),
        );
        r.register(
            "checkpoints_committed",
            "Checkpoints committed by this coordinator",
            m.ckpt_committed.clone(),
        );
        r.register(
            "checkpoint_commit_failures",
            "Checkpoint commits that failed",
            m.ckpt_failed.clone(),
        );
        r.register_with_unit(
            "checkpoint_written",
            "Bytes of all checkpoints committed by this coordinator",
            Unit::Bytes,
            m.ckpt_bytes_total.clone(),
        );
        r.register(
            "data_samples",
            "Data loader counters over the job (data.source = shards): kind=trained, \
             bad_image, bad_caption (samples skipped), bad_member (unreadable tar members), \
             shards_skipped",
            m.data.clone(),
        );
        r.register(
            "data_samples_skipped",
            "Samples skipped by the data loader over the job (bad image or caption)",
            m.data_skipped.clone(),
        );
        r.register_with_unit(
            "peak_memory",
            "Peak memory of each rank in the latest step (rank=N; CUDA: the caching \
             allocator's peak, CPU: counted bytes of live tensors)",
            Unit::Bytes,
            m.peak_memory.clone(),
        );
        JobMetrics { registry: r, ..m }
    }

    /// Takes in one `metrics.jsonl` line.
    pub(crate) fn observe_line(&self, line: &Value) {
        let get = |k: &str| line.get(k).and_then(Value::as_f64);
        let Some(step) = line.get("step").and_then(Value::as_u64) else {
            return;
        };
        if line.get("done").is_some() {
            return;
        }
        if line.get("eval") == Some(&Value::Bool(true)) {
            self.eval_step.set(step as i64);
            for (key, dir) in [("i2t_r1", "i2t"), ("t2i_r1", "t2i")] {
                if let Some(v) = get(key) {
                    self.recall.get_or_create(&label("direction", dir)).set(v);
                }
            }
            if let Some(v) = get("caption_exact") {
                self.caption_exact.set(v);
            }
            return;
        }
        self.step.set(step as i64);
        for (key, term) in [
            ("loss", "total"),
            ("itc", "itc"),
            ("caption", "caption"),
            ("itm", "itm"),
            ("distill_itc_kl", "distill_itc_kl"),
            ("distill_caption_kl", "distill_caption_kl"),
            ("distill_feature", "distill_feature"),
            ("distill_icl", "distill_icl"),
        ] {
            if let Some(v) = get(key) {
                self.loss.get_or_create(&label("term", term)).set(v);
            }
        }
        for (key, gauge) in [
            ("lr", &self.lr),
            ("grad_norm", &self.grad_norm),
            ("tokens_per_s", &self.tokens_per_s),
            ("flops_per_s", &self.flops_per_s),
            ("mfu", &self.mfu),
        ] {
            if let Some(v) = get(key) {
                gauge.set(v);
            }
        }
        if let Some(t) = get("step_time_s") {
            self.step_time.observe(t);
        }
        if let Some(ranks) = line.get("peak_mem_bytes_ranks").and_then(Value::as_array) {
            for (r, v) in ranks.iter().enumerate() {
                if let Some(b) = v.as_u64() {
                    self.peak_memory
                        .get_or_create(&label("rank", &r.to_string()))
                        .set(b as i64);
                }
            }
        }
        let mut skipped = None;
        for (key, kind) in DATA_KEYS {
            if let Some(v) = line.get(key).and_then(Value::as_u64) {
                self.data.get_or_create(&label("kind", kind)).set(v as i64);
                if matches!(key, "data_bad_image" | "data_bad_caption") {
                    skipped = Some(skipped.unwrap_or(0) + v as i64);
                }
            }
        }
        if let Some(n) = skipped {
            self.data_skipped.set(n);
        }
    }

    /// A checkpoint was committed (`commit_s`: how long the commit took).
    pub(crate) fn committed(&self, step: u64, stats: &ShardStats, commit_s: f64) {
        self.ckpt_step.set(step as i64);
        self.ckpt_bytes.set(stats.bytes as i64);
        self.ckpt_bytes_total.inc_by(stats.bytes);
        if let Some(s) = stats.copy_s {
            self.ckpt_save_s.set(s);
        }
        if let Some(s) = stats.upload_s {
            self.ckpt_upload_s.set(s);
        }
        self.ckpt_commit_s.set(commit_s);
        self.ckpt_committed.inc();
    }

    /// A checkpoint commit failed.
    pub(crate) fn commit_failed(&self) {
        self.ckpt_failed.inc();
    }

    /// The job's state at scrape time; `alive_within_ms`: the heartbeat timeout.
    pub(crate) fn refresh(&self, s: &pb::StatusResponse, alive_within_ms: u64) {
        let n = |x: usize| x as i64;
        self.workers_registered.set(n(s.workers.len()));
        self.workers_alive.set(n(s
            .workers
            .iter()
            .filter(|w| w.heartbeat_age_ms < alive_within_ms)
            .count()));
        let planned = matches!(
            pb::Phase::try_from(s.phase),
            Ok(pb::Phase::Planning | pb::Phase::Running)
        );
        self.workers_spare.set(if planned {
            n(s.workers.iter().filter(|w| w.rank < 0).count())
        } else {
            0
        });
        self.workers_expected.set(i64::from(s.expected_workers));
        self.generation.set(s.generation as i64);
        let counted = self.restarts.get();
        if u64::from(s.restarts) > counted {
            self.restarts.inc_by(u64::from(s.restarts) - counted);
        }
        for (p, name) in PHASES {
            self.phase
                .get_or_create(&label("phase", name))
                .set(i64::from(s.phase == p as i32));
        }
    }

    /// The exposition text.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_commits_and_state_become_metrics() {
        let m = JobMetrics::new(10);
        m.observe_line(
            &json!({"step": 4, "loss": 2.5, "itc": 1.0, "caption": 1.25, "itm": 0.5,
            "lr": 0.001, "grad_norm": 0.7, "tokens_per_s": 1000.0, "step_time_s": 0.3,
            "mfu": 0.1, "data_samples": 64, "data_bad_image": 2, "data_bad_caption": 1,
            "generation": 1, "rank": 0, "peak_mem_bytes": 2048,
            "peak_mem_bytes_ranks": [1024, 2048], "distill_itc_kl": 0.75,
            "distill_caption_kl": 0.5, "distill_feature": 0.125}),
        );
        m.observe_line(
            &json!({"eval": true, "step": 4, "i2t_r1": 0.5, "t2i_r1": 0.25,
            "caption_exact": 0.0}),
        );
        m.observe_line(&json!({"done": true, "step": 10}));
        m.committed(
            4,
            &ShardStats {
                bytes: 1000,
                copy_s: Some(0.01),
                upload_s: Some(0.2),
            },
            0.05,
        );
        let status = pb::StatusResponse {
            phase: pb::Phase::Running as i32,
            generation: 2,
            restarts: 1,
            expected_workers: 2,
            workers: vec![
                pb::WorkerStatus {
                    rank: 0,
                    heartbeat_age_ms: 100,
                    ..Default::default()
                },
                pb::WorkerStatus {
                    rank: 1,
                    heartbeat_age_ms: 60_000,
                    ..Default::default()
                },
                pb::WorkerStatus {
                    rank: -1,
                    heartbeat_age_ms: 0,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        m.refresh(&status, 10_000);
        m.refresh(&status, 10_000);
        let text = m.encode();
        for line in [
            "weaver_step 4",
            "weaver_total_steps 10",
            "weaver_loss{term=\"caption\"} 1.25",
            "weaver_loss{term=\"distill_itc_kl\"} 0.75",
            "weaver_loss{term=\"distill_caption_kl\"} 0.5",
            "weaver_loss{term=\"distill_feature\"} 0.125",
            "weaver_learning_rate 0.001",
            "weaver_step_time_seconds_count 1",
            "weaver_eval_recall_at_1{direction=\"t2i\"} 0.25",
            "weaver_workers_registered 3",
            "weaver_workers_alive 2",
            "weaver_workers_spare 1",
            "weaver_generation 2",
            "weaver_restarts_total 1",
            "weaver_job_phase{phase=\"running\"} 1",
            "weaver_checkpoint_size_bytes 1000",
            "weaver_checkpoint_upload_seconds 0.2",
            "weaver_checkpoints_committed_total 1",
            "weaver_data_samples{kind=\"bad_image\"} 2",
            "weaver_data_samples_skipped 3",
            "weaver_peak_memory_bytes{rank=\"1\"} 2048",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
