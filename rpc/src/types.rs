//! The Rust side of the protocol for the training process: [`Assignment`] with the mesh
//! types of `weaver_config::mesh`, [`ControlEvent`], [`StepMetrics`] and [`WorkerInfo`], and
//! their conversions from and to the generated `pb` messages.

use std::ops::Range;

use weaver_config::mesh::{Axis, Coord, ParallelDims};
use weaver_config::JobConfig;

use crate::error::{CoordinatorError, Result};
use crate::pb;

/// What a worker tells the coordinator about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Host name (workers of one host may share a TP group).
    pub host: String,
    /// The process's index on its host.
    pub local_rank: u32,
    /// `cpu` or `cuda`.
    pub device_kind: String,
    /// The device it will use: `cpu` or `cuda:K`.
    pub device: String,
    /// Memory of the worker's device in bytes, for `parallel.layout = "auto"` (0: unknown):
    /// a GPU's total memory; a CPU worker's share of the host's available RAM
    /// ([`WorkerInfo::cpu_share`]).
    pub device_memory: u64,
}

impl WorkerInfo {
    /// A CPU worker on `host`.
    pub fn cpu(host: &str, local_rank: u32) -> WorkerInfo {
        WorkerInfo {
            host: host.into(),
            local_rank,
            device_kind: "cpu".into(),
            device: "cpu".into(),
            device_memory: 0,
        }
    }

    /// A CPU worker's memory: the host's available RAM (`MemAvailable` in /proc/meminfo,
    /// what can be allocated without swapping) divided among the `local_workers` processes
    /// on the host; 0 where /proc/meminfo cannot be read.
    pub fn cpu_share(local_workers: u32) -> u64 {
        let available = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("MemAvailable:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kib| kib.parse::<u64>().ok())
            })
            .unwrap_or(0);
        available * 1024 / u64::from(local_workers.max(1))
    }

    /// This machine's host name (`$HOSTNAME`, `/proc/sys/kernel/hostname`, else `localhost`).
    pub fn local_host_name() -> String {
        if let Ok(h) = std::env::var("WEAVER_HOST") {
            if !h.is_empty() {
                return h;
            }
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "localhost".into())
    }

    pub(crate) fn to_pb(&self, instance: &str) -> pb::WorkerInfo {
        pb::WorkerInfo {
            host: self.host.clone(),
            local_rank: self.local_rank,
            device_kind: self.device_kind.clone(),
            device: self.device.clone(),
            device_memory: self.device_memory,
            instance: instance.to_string(),
            pid: std::process::id(),
        }
    }
}

/// Where a worker stands in one generation of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The generation this assignment belongs to.
    pub generation: u64,
    /// Global rank.
    pub rank: usize,
    /// Ranks in the job.
    pub world_size: usize,
    /// The layout (validated by the coordinator).
    pub dims: ParallelDims,
    /// This rank's coordinates.
    pub coord: Coord,
    /// Global ranks of this rank's TP group, in tp order.
    pub tp_group: Vec<usize>,
    /// Global ranks of this rank's pipeline, in stage order.
    pub pp_group: Vec<usize>,
    /// Global ranks of this rank's DP group, in replica order.
    pub dp_group: Vec<usize>,
    /// Layer range of every pipeline stage (index = pp coordinate).
    pub stages: Vec<Range<usize>>,
    /// The job configuration as TOML (parse with [`Assignment::config`]).
    pub config_toml: String,
    /// Checkpoint to resume from, if any.
    pub resume_from: Option<String>,
    /// Its step (0 when unknown: read it from the manifest).
    pub resume_step: u64,
    /// Prefix of this generation's rendezvous keys.
    pub kv_prefix: String,
    /// Workers of this generation on this host (for thread counts).
    pub local_world_size: usize,
}

impl Assignment {
    /// The job configuration.
    pub fn config(&self) -> Result<JobConfig> {
        JobConfig::parse(&self.config_toml, &[])
            .map_err(|e| CoordinatorError::BadConfig(format!("the assignment's config: {e}")))
    }

    /// This rank's layer range.
    pub fn stage_layers(&self) -> Range<usize> {
        self.stages.get(self.coord.pp).cloned().unwrap_or(0..0)
    }

    pub(crate) fn from_pb(a: pb::Assignment) -> Result<Assignment> {
        let bad =
            |what: &str| CoordinatorError::InvalidRequest(format!("assignment without {what}"));
        let d = a.dims.ok_or_else(|| bad("dims"))?;
        let c = a.coord.ok_or_else(|| bad("coord"))?;
        let dims = ParallelDims {
            dp: d.dp as usize,
            pp: d.pp as usize,
            tp: d.tp as usize,
        };
        let rank = a.rank as usize;
        let coord = Coord {
            dp: c.dp as usize,
            pp: c.pp as usize,
            tp: c.tp as usize,
        };
        // The mesh functions assert their inputs; check what came over the wire first.
        if dims.dp == 0
            || dims.pp == 0
            || dims.tp == 0
            || dims.world_size() != a.world_size as usize
            || rank >= dims.world_size()
            || dims.coord(rank) != coord
        {
            return Err(CoordinatorError::InvalidRequest(format!(
                "inconsistent assignment: rank {rank}, world size {}, {dims}, {coord}",
                a.world_size
            )));
        }
        Ok(Assignment {
            generation: a.generation,
            rank,
            world_size: dims.world_size(),
            dims,
            coord,
            tp_group: dims.group(rank, Axis::Tp),
            pp_group: dims.group(rank, Axis::Pp),
            dp_group: dims.group(rank, Axis::Dp),
            stages: a
                .stages
                .iter()
                .map(|r| r.start as usize..r.end as usize)
                .collect(),
            config_toml: a.config_toml,
            resume_from: Some(a.resume_from).filter(|s| !s.is_empty()),
            resume_step: a.resume_step,
            kv_prefix: a.kv_prefix,
            local_world_size: a.local_world_size as usize,
        })
    }
}

/// What the coordinator (or the session itself) tells a running worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// A worker was lost: abort every communicator, then call
    /// [`crate::WorkerSession::wait_assignment`] for the new generation.
    Abort {
        /// The new generation.
        generation: u64,
        /// Why.
        reason: String,
    },
    /// Checkpoint after finishing `step` (every rank at the same step).
    SaveAt {
        /// The step.
        step: u64,
        /// Then stop training and wait for the next generation.
        stop: bool,
    },
    /// The job is over: exit (with failure if `!success`).
    Stop {
        /// Whether the job completed.
        success: bool,
        /// Why it stopped.
        reason: String,
    },
    /// Heartbeats have failed for longer than the heartbeat timeout: the coordinator is
    /// gone or unreachable. Abort the communicators; the job cannot go on.
    CoordinatorLost {
        /// The last error.
        reason: String,
    },
}

impl ControlEvent {
    pub(crate) fn from_pb(e: &pb::ControlEvent) -> Option<ControlEvent> {
        use pb::control_event::Kind;
        Some(match e.kind.as_ref()? {
            Kind::Abort(a) => ControlEvent::Abort {
                generation: a.generation,
                reason: a.reason.clone(),
            },
            Kind::SaveAt(s) => ControlEvent::SaveAt {
                step: s.step,
                stop: s.stop,
            },
            Kind::Stop(s) => ControlEvent::Stop {
                success: s.success,
                reason: s.reason.clone(),
            },
        })
    }
}

/// One step's metrics, reported with [`crate::WorkerSession::report_step`]. The rank that
/// fills `loss` (or sets `eval`) produces the job's `metrics.jsonl` lines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepMetrics {
    /// The optimizer step just finished.
    pub step: u64,
    /// Training loss (only the reporting rank fills it).
    pub loss: Option<f64>,
    /// Learning rate.
    pub lr: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: Option<f64>,
    /// Throughput of the job.
    pub tokens_per_s: Option<f64>,
    /// Wall time of the step.
    pub step_time_s: Option<f64>,
    /// An evaluation line (`"eval": true`) rather than a training line.
    pub eval: bool,
    /// Anything else (e.g. `i2t_r1`, `mfu`), copied into the metrics line.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl StepMetrics {
    pub(crate) fn to_pb(&self) -> pb::StepMetrics {
        pb::StepMetrics {
            step: self.step,
            loss: self.loss,
            lr: self.lr,
            grad_norm: self.grad_norm,
            tokens_per_s: self.tokens_per_s,
            step_time_s: self.step_time_s,
            eval: self.eval,
            extra_json: if self.extra.is_empty() {
                String::new()
            } else {
                serde_json::Value::Object(self.extra.clone()).to_string()
            },
            generation: 0,
        }
    }
}

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// Every worker reported done.
    Completed {
        /// The last step.
        step: u64,
        /// Generations it took (1 without restarts).
        generation: u64,
    },
    /// The job failed; the reason says why and what to do.
    Failed {
        /// Why.
        reason: String,
    },
}

impl JobOutcome {
    /// True for [`JobOutcome::Completed`].
    pub fn is_success(&self) -> bool {
        matches!(self, JobOutcome::Completed { .. })
    }
}

impl std::fmt::Display for JobOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobOutcome::Completed { step, generation } => {
                write!(f, "completed at step {step} (generation {generation})")
            }
            JobOutcome::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

/// Commits a checkpoint once every rank's shard of a step is durable: writes the manifest
/// (create-only) and returns the checkpoint's URL. Runs on a blocking thread.
pub trait CheckpointCommitter: Send + Sync + std::fmt::Debug {
    /// `layout` is `{dp, pp, tp, world_size, generation, stages}`; `reports` are the ranks'
    /// shard reports in rank order.
    fn commit(
        &self,
        step: u64,
        layout: &serde_json::Value,
        reports: Vec<Vec<u8>>,
    ) -> std::result::Result<String, String>;

    /// Where the checkpoints go, for messages.
    fn url(&self) -> String {
        String::new()
    }

    /// The newest step already committed where this committer writes (`None`: nothing).
    /// Asked once, when a job without a resume point starts: such a job refuses a location
    /// that holds checkpoints. Called outside any async runtime.
    fn newest_committed(&self) -> std::result::Result<Option<u64>, String> {
        Ok(None)
    }

    /// What the shard reports of one checkpoint say about its size and timing, for the
    /// metrics endpoint (default: nothing known).
    fn shard_stats(&self, _reports: &[Vec<u8>]) -> ShardStats {
        ShardStats::default()
    }
}

/// The size and timing of one checkpoint's shards, summarised over the ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ShardStats {
    /// Bytes of all shards.
    pub bytes: u64,
    /// The longest host copy of one rank: how long training stalled for the save.
    pub copy_s: Option<f64>,
    /// The longest upload of one rank (start to durable).
    pub upload_s: Option<f64>,
}
