//! The job state machine, pure: no I/O, no clock (every call takes `now`), no gRPC. The
//! server wraps it in a mutex, runs [`Job::tick`] periodically and carries out the
//! [`Effect`]s it queues (metrics lines, checkpoint commits).
//!
//! ```text
//!            all expected workers registered        every worker fetched its assignment
//! gathering ───────────────────────────────► planning ───────────────────────────► running
//!    ▲  │ gather timeout / impossible layout    │                                  │  │
//!    │  └──────────────────────────────► failed ◄───── error not retryable, ─────┘  │ all done
//!    │                                          ▲      restarts exhausted, shutdown   ▼
//!    └─── worker lost (missed heartbeats, exit, collective error): new generation  completed
//! ```
//!
//! Policies (DESIGN.md "Coordinator"; documented here because they are decisions):
//! - **Lost worker.** During planning or running, a worker that misses heartbeats for
//!   `heartbeat_timeout`, whose process exit the launcher reports, or that reports a
//!   retryable (collective) error starts a new generation: every worker gets an `Abort`
//!   event, all registrations are dropped, and the coordinator gathers again. While
//!   gathering, a silent worker is only dropped from the gathered set.
//! - **Re-gathering.** The new generation waits for the full count (the survivors plus the
//!   lost worker restarted, or any replacement) up to `regather_timeout`, then fails
//!   clearly — unless `elastic_min_dp` is set: then it shrinks dp to the largest value
//!   ≥ `elastic_min_dp` that the workers present and the config (global batch) allow, and
//!   workers beyond the shrunk layout are told they are not needed. Assignments resume from
//!   the latest committed checkpoint. More than `max_restarts` new generations fail the job.
//! - **Growing back.** With `elastic_min_dp` set and checkpoints on, a worker that
//!   registers while a shrunk generation runs joins as a spare (no rank). Once the spares
//!   and the running workers can hold a larger dp, the coordinator has the workers
//!   checkpoint and stop a few steps ahead (`SaveAt` with `stop`) and, when that checkpoint
//!   is committed, starts a new generation on the larger layout from it: no step is
//!   trained twice (if the commit fails, it starts from the checkpoint before). Growing is
//!   not a failure: it does not count against `max_restarts`. A spare that stops beating
//!   is dropped.
//! - **Registering twice.** A retried Register of the same process (same instance id) in
//!   the same generation is idempotent. Another process claiming a (host, local rank) slot
//!   that a live registration holds is refused (`AlreadyRegistered`): the slot frees when
//!   the holder is lost (heartbeat timeout or reported exit). Registering while a
//!   generation is planned is refused (`JobFull`), unless the job is elastic and may grow
//!   (above).
//! - **`parallel.layout = "auto"`.** The job gathers `parallel.workers` workers (as many
//!   as `weaver launch --nproc`), then chooses the layout once, with
//!   `weaver_plan::auto::choose`, from what they registered: hosts and their workers (a
//!   tensor-parallel group stays inside a host), each worker's device kind and memory (a
//!   GPU's total, a CPU worker's share of its host's available RAM; the smallest counts).
//!   It logs why, and from then on the job is the chosen one: the effective config the
//!   workers receive and `<run dir>/config.toml` carry the chosen dp, pp, tp,
//!   micro-batches, schedule and memory features. Elastic shrinking and growing keep the
//!   chosen pp × tp and change dp, as for a written layout (the per-rank memory does not
//!   grow: parameters, gradients and optimizer state are per pp × tp rank, and the
//!   micro-batch stays where dp × microbatches divides). A job that fits nowhere fails
//!   when its workers have gathered, with the planner's error: the smallest layout's
//!   memory per device against the usable memory.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::{Range, RangeInclusive};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use weaver_config::config::LayoutMode;
use weaver_config::mesh::{ModelLimits, ParallelDims};
use weaver_config::JobConfig;
use weaver_plan::auto::Host;
use weaver_plan::DeviceKind;

use crate::error::{CoordinatorError, Result};
use crate::pb;
use crate::placement::{place, Candidate};

/// The registration id handed to a worker.
pub type WorkerId = u64;

/// Timeouts and restart rules (STYLE.md rule 9: generous for gathering, tight for
/// heartbeats).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// How often workers beat.
    pub heartbeat_interval: Duration,
    /// A worker silent this long is lost (default: three missed beats).
    pub heartbeat_timeout: Duration,
    /// How long the first generation may take to gather every worker.
    pub gather_timeout: Duration,
    /// How long a later generation may take to gather again after a loss.
    pub regather_timeout: Duration,
    /// New generations allowed before the job fails.
    pub max_restarts: u32,
    /// If set, a re-gathering that times out with too few workers shrinks dp down to at
    /// least this value instead of failing.
    pub elastic_min_dp: Option<usize>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(3),
            gather_timeout: Duration::from_secs(300),
            regather_timeout: Duration::from_secs(300),
            max_restarts: 3,
            elastic_min_dp: None,
        }
    }
}

/// A committed checkpoint a generation resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// Its URL.
    pub url: String,
    /// Its step (0 if unknown).
    pub step: u64,
}

/// One layer range per pipeline stage, from the job config and the stage count.
pub type StagePlanner = std::sync::Arc<
    dyn Fn(&JobConfig, usize) -> std::result::Result<Vec<Range<usize>>, String> + Send + Sync,
>;

/// The default planner: `layers` split as evenly as possible, earlier stages taking the
/// remainder.
pub fn even_stages(layers: usize, pp: usize) -> Vec<Range<usize>> {
    let (base, extra) = (layers / pp.max(1), layers % pp.max(1));
    let mut start = 0;
    (0..pp)
        .map(|s| {
            let len = base + usize::from(s < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// The model's divisibility limits from its config ([`weaver_config::ModelConfig::limits`],
/// the same that `weaver_models::Model::limits` returns): both encoders' heads, the MLP
/// widths and the vocabulary split by tp, and every block as a pipeline cut.
pub fn default_limits(config: &JobConfig) -> ModelLimits {
    config.model.limits()
}

/// What the job is, fixed at start: the validated layout and its stages.
#[derive(Debug, Clone)]
pub struct JobSpec {
    config: JobConfig,
    limits: ModelLimits,
    dims: ParallelDims,
    stages: Vec<Range<usize>>,
    /// `layout = "auto"` not chosen yet: the stage planner to cut the chosen layout with.
    /// Until then `dims` is `dp = workers`, a placeholder for the count to gather.
    auto: Option<AutoPlanner>,
}

/// The stage planner kept for a `layout = "auto"` job until its layout is chosen.
#[derive(Clone)]
struct AutoPlanner(StagePlanner);

impl std::fmt::Debug for AutoPlanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AutoPlanner")
    }
}

impl JobSpec {
    /// Validates the requested layout against the model before any worker is waited for.
    pub fn new(config: JobConfig, limits: ModelLimits, planner: &StagePlanner) -> Result<JobSpec> {
        let p = &config.parallel;
        let auto = p.layout == LayoutMode::Auto;
        let (dp, pp, tp) = if auto {
            (p.world(), 1, 1)
        } else {
            (p.dp, p.pp, p.tp)
        };
        let dims = ParallelDims::new(dp, pp, tp, dp * pp * tp, &limits)
            .map_err(|e| CoordinatorError::BadConfig(e.to_string()))?;
        let stages = planner(&config, dims.pp).map_err(CoordinatorError::BadConfig)?;
        if stages.len() != dims.pp || stages.iter().any(|r| r.is_empty()) {
            return Err(CoordinatorError::BadConfig(format!(
                "the stage planner returned {:?} for pp = {}: it must give one non-empty layer range per stage",
                stages, dims.pp
            )));
        }
        Ok(JobSpec {
            config,
            limits,
            dims,
            stages,
            auto: auto.then(|| AutoPlanner(planner.clone())),
        })
    }

    /// The requested layout.
    pub fn dims(&self) -> ParallelDims {
        self.dims
    }

    /// The config and layout with dp shrunk to `dp`, if the config allows it.
    ///
    /// The global batch stays; so does the micro-batch — the unit of contrastive and
    /// matching negatives — when the lost replicas' micro-batches can move to the
    /// survivors (dp × microbatches unchanged): then the shrunk job trains on the same
    /// micro-batches in the same order and its losses match the unshrunk job's up to
    /// reduction order. Otherwise the micro-batches grow, which changes the loss; the
    /// coordinator warns.
    fn shrunk(&self, dp: usize) -> std::result::Result<(ParallelDims, String), String> {
        let mut file = self.config.file.clone();
        let p = &self.config.parallel;
        let slots = p.dp * p.microbatches;
        file.parallel.dp = dp;
        if slots.is_multiple_of(dp) {
            file.parallel.microbatches = slots / dp;
        } else {
            tracing::warn!(
                "dp × microbatches = {slots} does not divide by the shrunk dp = {dp}: micro-batches \
                 grow, which changes the contrastive loss's negatives"
            );
        }
        let config = JobConfig::from_file_config(file).map_err(|e| e.to_string())?;
        let dims = ParallelDims::new(
            dp,
            self.dims.pp,
            self.dims.tp,
            dp * self.dims.pp * self.dims.tp,
            &self.limits,
        )
        .map_err(|e| e.to_string())?;
        Ok((dims, config.to_toml()))
    }
}

/// Something the server must do after a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Append this line to `metrics.jsonl`.
    Metrics(Value),
    /// Every shard of `step` is durable: commit the checkpoint.
    Commit(CommitRequest),
    /// A generation was planned with this effective config (TOML): save it as the run
    /// directory's `config.toml`.
    Config(String),
}

/// The inputs of a checkpoint commit.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitRequest {
    /// The step.
    pub step: u64,
    /// The layout that wrote it: `{dp, pp, tp, world_size, generation, stages}`.
    pub layout: Value,
    /// Every rank's shard report, by rank.
    pub reports: Vec<Vec<u8>>,
}

/// The phase, as the protocol names it.
pub type Phase = pb::Phase;

#[derive(Debug, Clone)]
struct Worker {
    info: pb::WorkerInfo,
    last_beat: Instant,
    last_step: Option<u64>,
    rank: Option<usize>,
    fetched: bool,
    done: Option<(u64, Map<String, Value>)>,
}

#[derive(Debug, Clone)]
struct Plan {
    dims: ParallelDims,
    config_toml: String,
    by_rank: Vec<WorkerId>,
    /// Planned workers per host.
    per_host: HashMap<String, usize>,
    /// Planned workers that have not fetched their assignment, or not reported done: kept
    /// as counts so that each call stays O(1) with thousands of workers.
    unfetched: usize,
    not_done: usize,
}

/// The job's state.
#[derive(Debug)]
pub struct Job {
    spec: JobSpec,
    policy: Policy,
    started: Instant,
    phase: Phase,
    phase_since: Instant,
    message: String,
    generation: u64,
    restarts: u32,
    next_id: WorkerId,
    workers: BTreeMap<WorkerId, Worker>,
    /// (host, local rank) → registration in the current generation.
    slots: HashMap<(String, u32), WorkerId>,
    plan: Option<Plan>,
    events: Vec<pb::ControlEvent>,
    resume: Option<ResumePoint>,
    shards: BTreeMap<u64, BTreeMap<usize, Vec<u8>>>,
    last_commit_error: Option<String>,
    save_at: Option<u64>,
    /// A larger layout to move to once the checkpoint the workers stop at is committed.
    grow: Option<(ParallelDims, String)>,
    /// The checkpoint the running generation stopped at, once a rank reported it: growing
    /// starts from that one, not from a periodic checkpoint committed while the stop
    /// request was on its way.
    stopped_at: Option<u64>,
    /// The layout the gathering generation plans as soon as it has enough workers (set
    /// when growing; else the requested layout once every worker is back).
    target: Option<(ParallelDims, String)>,
    /// (generation, step) already in metrics.jsonl: every rank reports each step; a later
    /// generation that trains a step again after resuming logs it again, under its own
    /// generation number. Kept for the current and the previous generation (whose last
    /// steps may arrive late).
    written_train: HashSet<(u64, u64)>,
    written_eval: HashSet<(u64, u64)>,
    /// (generation, rank, step) of reports with neither a loss nor an evaluation, only
    /// extras (an inference job's per-shard lines: each replica counts its own shards, so
    /// the rank tells them apart), already in metrics.jsonl.
    written_events: HashSet<(u64, Option<usize>, u64)>,
    step: Option<u64>,
    loss: Option<f64>,
    tokens_per_s: Option<f64>,
    progress: Option<((Instant, u64), (Instant, u64))>,
    final_step: u64,
    outbox: Vec<Effect>,
    version: u64,
}

impl Job {
    /// A job gathering its first generation from `now`.
    pub fn new(spec: JobSpec, policy: Policy, resume: Option<ResumePoint>, now: Instant) -> Job {
        Job {
            spec,
            policy,
            started: now,
            phase: Phase::Gathering,
            phase_since: now,
            message: String::new(),
            generation: 1,
            restarts: 0,
            next_id: 1,
            workers: BTreeMap::new(),
            slots: HashMap::new(),
            plan: None,
            events: Vec::new(),
            resume,
            shards: BTreeMap::new(),
            last_commit_error: None,
            save_at: None,
            grow: None,
            stopped_at: None,
            target: None,
            written_train: HashSet::new(),
            written_eval: HashSet::new(),
            written_events: HashSet::new(),
            step: None,
            loss: None,
            tokens_per_s: None,
            progress: None,
            final_step: 0,
            outbox: Vec::new(),
            version: 0,
        }
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The current generation (1 for the first).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// New generations started so far.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Workers the layout needs.
    pub fn expected(&self) -> usize {
        self.target
            .as_ref()
            .map_or(self.spec.dims.world_size(), |(d, _)| d.world_size())
    }

    /// Workers registered in the current generation.
    pub fn registered(&self) -> usize {
        self.workers.len()
    }

    /// Increases whenever the phase or plan changes (long-polls wait on it).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The sequence number of the latest control event (0: none).
    pub fn latest_event_seq(&self) -> u64 {
        self.events.len() as u64
    }

    /// Control events after `seq`.
    pub fn events_after(&self, seq: u64) -> &[pb::ControlEvent] {
        let from = (seq as usize).min(self.events.len());
        &self.events[from..]
    }

    /// The failure reason once failed.
    pub fn failure(&self) -> Option<&str> {
        (self.phase == Phase::Failed).then_some(self.message.as_str())
    }

    /// The resume point of the next generation.
    pub fn resume_point(&self) -> Option<&ResumePoint> {
        self.resume.as_ref()
    }

    /// The outcome once the job is over.
    pub fn outcome(&self) -> Option<crate::JobOutcome> {
        match self.phase {
            Phase::Completed => Some(crate::JobOutcome::Completed {
                step: self.final_step,
                generation: self.generation,
            }),
            Phase::Failed => Some(crate::JobOutcome::Failed {
                reason: self.message.clone(),
            }),
            _ => None,
        }
    }

    /// Effects queued since the last drain.
    pub fn drain_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.outbox)
    }

    fn terminal_error(&self) -> Option<CoordinatorError> {
        match self.phase {
            Phase::Completed => Some(CoordinatorError::JobCompleted(format!(
                "the job completed at step {}",
                self.final_step
            ))),
            Phase::Failed => Some(CoordinatorError::JobFailed(self.message.clone())),
            _ => None,
        }
    }

    fn set_phase(&mut self, phase: Phase, now: Instant) {
        self.phase = phase;
        self.phase_since = now;
        self.version += 1;
    }

    fn push_event(&mut self, kind: pb::control_event::Kind) {
        let seq = self.events.len() as u64 + 1;
        self.events.push(pb::ControlEvent {
            seq,
            kind: Some(kind),
        });
    }

    fn describe(&self, id: WorkerId) -> String {
        match self.workers.get(&id) {
            Some(w) => {
                let rank = w.rank.map(|r| format!("rank {r}, ")).unwrap_or_default();
                format!(
                    "worker {}/{} ({rank}pid {})",
                    w.info.host, w.info.local_rank, w.info.pid
                )
            }
            None => format!("worker {id}"),
        }
    }

    /// A worker joins the current generation.
    pub fn register(&mut self, info: pb::WorkerInfo, now: Instant) -> Result<pb::RegisterResponse> {
        if let Some(e) = self.terminal_error() {
            return Err(e);
        }
        if info.host.is_empty() || info.instance.is_empty() {
            return Err(CoordinatorError::InvalidRequest(
                "a registration needs a host name and an instance id".into(),
            ));
        }
        let existing = self
            .slots
            .get(&(info.host.clone(), info.local_rank))
            .and_then(|id| self.workers.get(id).map(|w| (*id, w)))
            .map(|(id, w)| {
                (
                    id,
                    w.info.instance == info.instance,
                    w.info.pid,
                    w.last_beat,
                )
            });
        let id = match existing {
            Some((id, true, _, _)) => id,
            Some((_, false, pid, beat)) => {
                return Err(CoordinatorError::AlreadyRegistered(format!(
                    "host {} local rank {} is already registered in generation {} by pid {pid} \
                     (last heartbeat {:.1} s ago); two processes claim the same slot — give each \
                     its own local rank, or, if pid {pid} died, retry after its heartbeat timeout ({:.1} s)",
                    info.host,
                    info.local_rank,
                    self.generation,
                    now.saturating_duration_since(beat).as_secs_f64(),
                    self.policy.heartbeat_timeout.as_secs_f64()
                )))
            }
            None => {
                if self.phase != Phase::Gathering && !self.may_grow() {
                    return Err(CoordinatorError::JobFull(format!(
                        "generation {} is already planned with its {} workers; host {} local rank {} \
                         is not needed (it may join when a new generation gathers)",
                        self.generation,
                        self.plan.as_ref().map_or(0, |p| p.by_rank.len()),
                        info.host,
                        info.local_rank
                    )));
                }
                let id = self.next_id;
                self.next_id += 1;
                tracing::info!(
                    worker = id,
                    host = %info.host,
                    local_rank = info.local_rank,
                    generation = self.generation,
                    "worker registered ({} of {})",
                    self.workers.len() + 1,
                    self.expected()
                );
                self.slots.insert((info.host.clone(), info.local_rank), id);
                self.workers.insert(
                    id,
                    Worker {
                        info,
                        last_beat: now,
                        last_step: None,
                        rank: None,
                        fetched: false,
                        done: None,
                    },
                );
                if self.phase == Phase::Gathering {
                    let (dims, toml) = match &self.target {
                        Some((d, t)) => (*d, Some(t.clone())),
                        None => (self.spec.dims, None),
                    };
                    if self.workers.len() == dims.world_size() {
                        if self.spec.auto.is_some() {
                            match self.choose_layout() {
                                Ok(chosen) => self.plan(chosen, None, now),
                                Err(reason) => self.fail(reason, now),
                            }
                        } else {
                            self.plan(dims, toml, now);
                        }
                    }
                } else {
                    tracing::info!(
                        worker = id,
                        "host {} local rank {} joins as a spare",
                        self.workers[&id].info.host,
                        self.workers[&id].info.local_rank
                    );
                    self.consider_growing();
                }
                id
            }
        };
        Ok(pb::RegisterResponse {
            worker_id: id,
            generation: self.generation,
            event_seq: self.latest_event_seq(),
            expected_workers: self.expected() as u32,
            heartbeat_interval_ms: self.policy.heartbeat_interval.as_millis() as u32,
            heartbeat_timeout_ms: self.policy.heartbeat_timeout.as_millis() as u32,
        })
    }

    fn plan(&mut self, dims: ParallelDims, config_toml: Option<String>, now: Instant) {
        match place(&self.candidates(), dims.world_size(), dims.tp, self.nccl()) {
            Err(reason) => self.fail(format!("generation {}: {reason}", self.generation), now),
            Ok(placement) => {
                let mut per_host: HashMap<String, usize> = HashMap::new();
                for (rank, id) in placement.by_rank.iter().enumerate() {
                    if let Some(w) = self.workers.get_mut(id) {
                        w.rank = Some(rank);
                        *per_host.entry(w.info.host.clone()).or_default() += 1;
                    }
                }
                tracing::info!(
                    generation = self.generation,
                    %dims,
                    unused = placement.unused.len(),
                    "generation planned"
                );
                let n = placement.by_rank.len();
                self.target = None;
                let config_toml = config_toml.unwrap_or_else(|| self.spec.config.to_toml());
                self.outbox.push(Effect::Config(config_toml.clone()));
                self.plan = Some(Plan {
                    dims,
                    config_toml,
                    by_rank: placement.by_rank,
                    per_host,
                    unfetched: n,
                    not_done: n,
                });
                self.set_phase(Phase::Planning, now);
            }
        }
    }

    /// The hosts that registered, as the planner sees them: workers per host, their device
    /// kind, the smallest memory any of them reported.
    fn hosts(&self) -> std::result::Result<Vec<Host>, String> {
        let mut by_host: BTreeMap<&str, Vec<&pb::WorkerInfo>> = BTreeMap::new();
        for w in self.workers.values() {
            by_host.entry(&w.info.host).or_default().push(&w.info);
        }
        by_host
            .into_iter()
            .map(|(host, infos)| {
                let kind = if infos.iter().any(|i| i.device_kind == "cuda") {
                    DeviceKind::Gpu
                } else {
                    DeviceKind::Cpu
                };
                let reported = infos.iter().map(|i| i.device_memory).min().unwrap_or(0);
                let memory_bytes = match (reported, kind) {
                    (0, DeviceKind::Gpu) => {
                        let assumed = weaver_plan::Hardware::h200(1, 1).memory_bytes;
                        tracing::warn!(
                            host,
                            "a GPU worker did not report its memory: planning with {assumed} bytes per GPU"
                        );
                        assumed
                    }
                    (0, DeviceKind::Cpu) => {
                        return Err(format!(
                            "parallel.layout = \"auto\": a worker on host {host} reported no memory (its /proc/meminfo is unreadable, or it is an older weaver); set the layout by hand"
                        ))
                    }
                    (m, _) => m,
                };
                Ok(Host {
                    kind,
                    devices: infos.len(),
                    memory_bytes,
                })
            })
            .collect()
    }

    /// `layout = "auto"`: chooses the layout from the registered workers and makes it the
    /// job's (see the module docs); the reason why not, for the job's failure.
    fn choose_layout(&mut self) -> std::result::Result<ParallelDims, String> {
        let Some(AutoPlanner(planner)) = self.spec.auto.clone() else {
            return Ok(self.spec.dims);
        };
        let world = self.spec.dims.world_size();
        let hosts = self.hosts()?;
        let choice = weaver_plan::auto::choose(&self.spec.config, &hosts, None)
            .map_err(|e| format!("parallel.layout = \"auto\" on {world} workers: {e}"))?;
        let mut file = choice.plan.job.file.clone();
        file.parallel.workers = world;
        let config = JobConfig::from_file_config(file)
            .map_err(|e| format!("parallel.layout = \"auto\": the chosen layout: {e}"))?;
        let p = &config.parallel;
        let dims = ParallelDims::new(p.dp, p.pp, p.tp, world, &self.spec.limits)
            .map_err(|e| format!("parallel.layout = \"auto\": the chosen layout: {e}"))?;
        let stages = planner(&config, dims.pp)?;
        if stages.len() != dims.pp || stages.iter().any(|r| r.is_empty()) {
            return Err(format!(
                "the stage planner returned {stages:?} for the chosen pp = {}",
                dims.pp
            ));
        }
        let m = choice.plan.memory;
        tracing::info!(
            generation = self.generation,
            %dims,
            microbatches = p.microbatches,
            schedule = ?p.schedule,
            virtual_stages = p.virtual_stages,
            recompute = p.recompute.name(),
            shard_optimizer = p.shard_optimizer,
            sequence_parallel = p.sequence_parallel,
            memory_per_device = m.total(),
            step_s = choice.plan.time.total(),
            "parallel.layout = \"auto\" chose {}: {}",
            choice.plan.describe(),
            choice.reasons
        );
        self.spec.config = config;
        self.spec.dims = dims;
        self.spec.stages = stages;
        self.spec.auto = None;
        Ok(dims)
    }

    fn worker(&self, id: WorkerId) -> Result<&Worker> {
        self.workers.get(&id).ok_or_else(|| {
            CoordinatorError::StaleWorker(format!(
                "worker {id} is not registered in generation {}: register again",
                self.generation
            ))
        })
    }

    /// The worker's assignment once planned (`None` while gathering).
    pub fn assignment(&mut self, id: WorkerId, now: Instant) -> Result<Option<pb::Assignment>> {
        if let Some(e) = self.terminal_error() {
            return Err(e);
        }
        let w = self.worker(id)?;
        let Some(plan) = &self.plan else {
            return Ok(None);
        };
        let Some(rank) = w.rank else {
            return Err(CoordinatorError::JobFull(format!(
                "generation {} runs on {} workers ({}); host {} local rank {} is not part of it",
                self.generation,
                plan.by_rank.len(),
                plan.dims,
                w.info.host,
                w.info.local_rank
            )));
        };
        let dims = plan.dims;
        let c = dims.coord(rank);
        let local_world_size = plan.per_host.get(&w.info.host).copied().unwrap_or(1);
        let first_fetch = !w.fetched;
        let a = pb::Assignment {
            generation: self.generation,
            rank: rank as u32,
            world_size: dims.world_size() as u32,
            dims: Some(pb::Dims {
                dp: dims.dp as u32,
                pp: dims.pp as u32,
                tp: dims.tp as u32,
            }),
            coord: Some(pb::Coord {
                dp: c.dp as u32,
                pp: c.pp as u32,
                tp: c.tp as u32,
            }),
            stages: self
                .spec
                .stages
                .iter()
                .map(|r| pb::LayerRange {
                    start: r.start as u32,
                    end: r.end as u32,
                })
                .collect(),
            config_toml: plan.config_toml.clone(),
            resume_from: self
                .resume
                .as_ref()
                .map(|r| r.url.clone())
                .unwrap_or_default(),
            resume_step: self.resume.as_ref().map_or(0, |r| r.step),
            kv_prefix: format!("g{}/", self.generation),
            local_world_size: local_world_size as u32,
        };
        if first_fetch {
            if let Some(w) = self.workers.get_mut(&id) {
                w.fetched = true;
            }
            if let Some(p) = self.plan.as_mut() {
                p.unfetched = p.unfetched.saturating_sub(1);
            }
        }
        if self.phase == Phase::Planning && self.plan.as_ref().is_some_and(|p| p.unfetched == 0) {
            self.set_phase(Phase::Running, now);
        }
        Ok(Some(a))
    }

    /// A heartbeat with the steps since the last one.
    pub fn heartbeat(
        &mut self,
        id: WorkerId,
        steps: &[pb::StepMetrics],
        seen_seq: u64,
        now: Instant,
    ) -> pb::HeartbeatResponse {
        let stale = !self.workers.contains_key(&id);
        if let Some(w) = self.workers.get_mut(&id) {
            w.last_beat = now;
            let rank = w.rank;
            let generation = self.generation;
            // Steps of an earlier generation (sent late) go to the metrics, not the progress.
            for m in steps
                .iter()
                .filter(|m| m.generation == 0 || m.generation == generation)
            {
                w.last_step = Some(w.last_step.map_or(m.step, |s| s.max(m.step)));
            }
            let max_step = w.last_step;
            for m in steps {
                self.record_metrics(m, rank, now);
            }
            if let Some(s) = max_step {
                if self.step.is_none_or(|cur| s > cur) {
                    self.progress = Some(match self.progress {
                        Some((first, _)) => (first, (now, s)),
                        None => ((now, s), (now, s)),
                    });
                    self.step = Some(s);
                }
            }
        }
        pb::HeartbeatResponse {
            generation: self.generation,
            phase: self.phase as i32,
            stale,
            events: self.events_after(seen_seq).to_vec(),
        }
    }

    fn record_metrics(&mut self, m: &pb::StepMetrics, rank: Option<usize>, now: Instant) {
        if let Some(t) = m.tokens_per_s {
            self.tokens_per_s = Some(t);
        }
        let generation = if m.generation == 0 {
            self.generation
        } else {
            m.generation
        };
        let fresh = if m.eval {
            self.written_eval.insert((generation, m.step))
        } else if m.loss.is_some() {
            if generation == self.generation {
                self.loss = m.loss;
            }
            self.written_train.insert((generation, m.step))
        } else if !m.extra_json.is_empty() {
            self.written_events.insert((generation, rank, m.step))
        } else {
            return;
        };
        if !fresh {
            return;
        }
        let mut line = Map::new();
        if m.eval {
            line.insert("eval".into(), json!(true));
        }
        line.insert("step".into(), json!(m.step));
        for (k, v) in [
            ("loss", m.loss),
            ("lr", m.lr),
            ("grad_norm", m.grad_norm),
            ("tokens_per_s", m.tokens_per_s),
            ("step_time_s", m.step_time_s),
        ] {
            if let Some(v) = v {
                line.insert(k.into(), json!(v));
            }
        }
        if !m.extra_json.is_empty() {
            match serde_json::from_str::<Map<String, Value>>(&m.extra_json) {
                Ok(extra) => {
                    for (k, v) in extra {
                        line.entry(k).or_insert(v);
                    }
                }
                Err(e) => {
                    tracing::warn!(step = m.step, "metrics extras are not a JSON object: {e}")
                }
            }
        }
        line.insert("generation".into(), json!(generation));
        if let Some(r) = rank.filter(|_| generation == self.generation) {
            line.insert("rank".into(), json!(r));
        }
        line.insert(
            "elapsed_s".into(),
            json!((now.saturating_duration_since(self.started).as_secs_f64() * 1e3).round() / 1e3),
        );
        self.outbox.push(Effect::Metrics(Value::Object(line)));
    }

    /// A worker's error. Retryable errors start a new generation; others fail the job.
    /// Errors from registrations of an older generation are ignored (already handled).
    pub fn report_error(&mut self, id: WorkerId, message: &str, retryable: bool, now: Instant) {
        if !self.workers.contains_key(&id) || self.terminal_error().is_some() {
            return;
        }
        let who = self.describe(id);
        if retryable {
            self.lost(id, format!("{who} reported: {message}"), now);
        } else {
            self.fail(format!("{who} failed: {message}"), now);
        }
    }

    /// The launcher saw a worker's process exit before the job ended.
    pub fn worker_exited(&mut self, host: &str, local_rank: u32, how: &str, now: Instant) {
        let found = self
            .workers
            .iter()
            .find(|(_, w)| {
                w.info.host == host && w.info.local_rank == local_rank && w.done.is_none()
            })
            .map(|(&id, _)| id);
        if let Some(id) = found {
            let who = self.describe(id);
            self.lost(id, format!("{who} {how}"), now);
        }
    }

    fn lost(&mut self, id: WorkerId, reason: String, now: Instant) {
        let spare = self.workers.get(&id).is_some_and(|w| w.rank.is_none());
        if self.phase == Phase::Gathering || spare {
            tracing::warn!(
                generation = self.generation,
                "{reason}; dropped (a new generation is not needed)"
            );
            if let Some(w) = self.workers.remove(&id) {
                self.slots.remove(&(w.info.host, w.info.local_rank));
            }
            if spare && self.grow.take().is_some() {
                // Grow only as far as the workers still here allow.
                self.consider_growing();
            }
        } else {
            self.restart(reason, now);
        }
    }

    /// Starts a new generation (or fails when the restarts are used up).
    fn restart(&mut self, reason: String, now: Instant) {
        if self.terminal_error().is_some() {
            return;
        }
        if self.restarts >= self.policy.max_restarts {
            let why = if self.policy.max_restarts == 0 {
                "restarts are disabled (max_restarts = 0)".to_string()
            } else {
                format!(
                    "the job already restarted {} times (max_restarts = {})",
                    self.restarts, self.policy.max_restarts
                )
            };
            self.fail(format!("{reason}; {why}"), now);
            return;
        }
        self.restarts += 1;
        self.target = None;
        self.begin_generation(reason, now);
    }

    /// Aborts the running generation and gathers the next one.
    fn begin_generation(&mut self, reason: String, now: Instant) {
        self.generation += 1;
        self.grow = None;
        self.stopped_at = None;
        // The new generation goes on from the resume point, not from where this one got.
        self.step = self.resume.as_ref().map(|r| r.step);
        let keep = self.generation - 1;
        self.written_train.retain(|(g, _)| *g >= keep);
        self.written_eval.retain(|(g, _)| *g >= keep);
        self.written_events.retain(|(g, _, _)| *g >= keep);
        tracing::warn!(
            generation = self.generation,
            "{reason}: starting a new generation"
        );
        self.message = reason.clone();
        self.push_event(pb::control_event::Kind::Abort(pb::Abort {
            generation: self.generation,
            reason,
        }));
        self.workers.clear();
        self.slots.clear();
        self.plan = None;
        self.shards.clear();
        self.save_at = None;
        self.progress = None;
        self.set_phase(Phase::Gathering, now);
    }

    /// Ends the job as failed and tells every worker to stop.
    pub fn fail(&mut self, reason: String, now: Instant) {
        if self.terminal_error().is_some() {
            return;
        }
        tracing::error!("job failed: {reason}");
        self.message = reason.clone();
        self.push_event(pb::control_event::Kind::Stop(pb::Stop {
            success: false,
            reason,
        }));
        self.set_phase(Phase::Failed, now);
    }

    /// A worker finished its last step.
    pub fn report_done(
        &mut self,
        id: WorkerId,
        step: u64,
        summary: &str,
        now: Instant,
    ) -> Result<()> {
        if self.phase == Phase::Completed {
            return Ok(());
        }
        if let Some(e) = self.terminal_error() {
            return Err(e);
        }
        let summary = if summary.is_empty() {
            Map::new()
        } else {
            serde_json::from_str(summary).map_err(|e| {
                CoordinatorError::InvalidRequest(format!(
                    "the done summary is not a JSON object: {e}"
                ))
            })?
        };
        let w = self.workers.get_mut(&id).ok_or_else(|| {
            CoordinatorError::StaleWorker(format!(
                "worker {id} is not registered in generation {}",
                self.generation
            ))
        })?;
        if w.rank.is_none() {
            return Err(CoordinatorError::InvalidRequest(format!(
                "worker {id} has no rank in generation {}: it cannot report done",
                self.generation
            )));
        }
        let first = w.done.is_none();
        let planned_worker = w.rank.is_some();
        w.done = Some((step, summary));
        w.last_step = Some(w.last_step.map_or(step, |s| s.max(step)));
        let Some(plan) = self.plan.as_mut() else {
            return Ok(());
        };
        if first && planned_worker {
            plan.not_done = plan.not_done.saturating_sub(1);
        }
        if plan.not_done > 0 {
            return Ok(());
        }
        let planned: Vec<&Worker> = self.workers.values().filter(|w| w.rank.is_some()).collect();
        let step = planned
            .iter()
            .filter_map(|w| w.done.as_ref())
            .map(|d| d.0)
            .max()
            .unwrap_or(0);
        let mut by_rank: Vec<&Worker> = planned;
        by_rank.sort_by_key(|w| w.rank);
        let mut line = Map::new();
        line.insert("done".into(), json!(true));
        line.insert("step".into(), json!(step));
        for w in &by_rank {
            if let Some((_, s)) = &w.done {
                for (k, v) in s {
                    line.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
        line.insert("generation".into(), json!(self.generation));
        line.insert("restarts".into(), json!(self.restarts));
        line.insert(
            "elapsed_s".into(),
            json!((now.saturating_duration_since(self.started).as_secs_f64() * 1e3).round() / 1e3),
        );
        self.outbox.push(Effect::Metrics(Value::Object(line)));
        self.final_step = step;
        self.message = format!("completed at step {step}");
        tracing::info!(step, generation = self.generation, "job completed");
        self.push_event(pb::control_event::Kind::Stop(pb::Stop {
            success: true,
            reason: format!("training completed at step {step}"),
        }));
        self.set_phase(Phase::Completed, now);
        Ok(())
    }

    /// A rank's shard of `step` is durable. Returns (received, expected); queues a commit
    /// when the last one arrives.
    /// `stopping`: the rank's generation stopped at this checkpoint (a growing job's).
    pub fn report_shard(
        &mut self,
        id: WorkerId,
        step: u64,
        report: Vec<u8>,
        stopping: bool,
    ) -> Result<(u32, u32)> {
        if let Some(e) = self.terminal_error() {
            return Err(e);
        }
        let rank = self.worker(id)?.rank.ok_or_else(|| {
            CoordinatorError::InvalidRequest(format!(
                "worker {id} has no rank: it cannot report shards"
            ))
        })?;
        let Some(plan) = &self.plan else {
            return Err(CoordinatorError::InvalidRequest("no plan yet".into()));
        };
        let dims = plan.dims;
        let expected = dims.world_size();
        if stopping {
            self.stopped_at = Some(step);
        }
        let got = self.shards.entry(step).or_default();
        got.insert(rank, report);
        let received = got.len();
        if received == expected {
            let reports = self
                .shards
                .remove(&step)
                .unwrap_or_default()
                .into_values()
                .collect();
            let stages: Vec<[usize; 2]> =
                self.spec.stages.iter().map(|r| [r.start, r.end]).collect();
            self.outbox.push(Effect::Commit(CommitRequest {
                step,
                layout: json!({
                    "dp": dims.dp, "pp": dims.pp, "tp": dims.tp,
                    "world_size": expected, "generation": self.generation, "stages": stages,
                }),
                reports,
            }));
        }
        Ok((received as u32, expected as u32))
    }

    /// The committer finished `step`.
    pub fn commit_finished(
        &mut self,
        step: u64,
        result: std::result::Result<String, String>,
        now: Instant,
    ) {
        let failed = match result {
            Ok(url) => {
                tracing::info!(step, %url, "checkpoint committed");
                if self.resume.as_ref().is_none_or(|r| step >= r.step) {
                    self.resume = Some(ResumePoint { url, step });
                }
                self.last_commit_error = None;
                None
            }
            Err(e) => {
                tracing::error!(step, "checkpoint commit failed: {e}");
                self.last_commit_error = Some(format!("step {step}: {e}"));
                Some(e)
            }
        };
        // The checkpoint a growing job stopped at: start the grown generation from it, or,
        // if its commit failed, from the last one that did commit.
        let Some((dims, toml)) = self.grow.clone() else {
            return;
        };
        if self.stopped_at != Some(step) || self.phase != Phase::Running {
            return;
        }
        let reason = match failed {
            None => format!(
                "{} workers are available: growing to {dims} from the checkpoint at step {step}",
                self.workers.len()
            ),
            Some(e) => format!(
                "growing to {dims}, from the checkpoint before step {step} (its commit failed: {e})"
            ),
        };
        self.target = Some((dims, toml));
        self.begin_generation(reason, now);
    }

    /// Whether a spare could let this job grow: elastic, checkpointing, and running on
    /// fewer replicas than requested.
    fn may_grow(&self) -> bool {
        self.policy.elastic_min_dp.is_some()
            && !self.spec.config.checkpoint.url.is_empty()
            && matches!(self.phase, Phase::Planning | Phase::Running)
            && self
                .plan
                .as_ref()
                .is_some_and(|p| p.dims.dp < self.spec.dims.dp)
    }

    /// Plans growing to the largest dp the registered workers (running and spare) can
    /// hold: asks for a checkpoint, after which [`Job::commit_finished`] starts the new
    /// generation.
    fn consider_growing(&mut self) {
        if !self.may_grow() || self.phase != Phase::Running || self.grow.is_some() {
            return;
        }
        let Some(current) = self.plan.as_ref().map(|p| p.dims.dp) else {
            return;
        };
        let Some((dims, toml)) = self.largest_layout(current + 1..=self.spec.dims.dp) else {
            return;
        };
        let Ok(step) = self.save_step() else {
            return;
        };
        let total = self.spec.config.train.steps;
        if total > 0 && step + 1 >= total {
            // Too close to the end to be worth a new generation.
            return;
        }
        // The workers checkpoint at `step` and stop there: the new generation starts from
        // that checkpoint and no step is trained twice.
        self.save_at = Some(step);
        self.push_event(pb::control_event::Kind::SaveAt(pb::SaveAt {
            step,
            stop: true,
        }));
        tracing::info!(
            generation = self.generation,
            "{} workers are available: growing to {dims} after the checkpoint at step {step}",
            self.workers.len()
        );
        self.grow = Some((dims, toml));
    }

    /// The registered workers as placement candidates.
    fn candidates(&self) -> Vec<Candidate<'_>> {
        self.workers
            .iter()
            .map(|(&id, w)| Candidate { id, info: &w.info })
            .collect()
    }

    fn nccl(&self) -> bool {
        self.spec.config.parallel.backend == weaver_config::config::Backend::Nccl
    }

    /// The largest dp in `dps` that the config allows (see [`JobSpec::shrunk`]) and the
    /// registered workers can be placed in, with its layout and config.
    fn largest_layout(&self, dps: RangeInclusive<usize>) -> Option<(ParallelDims, String)> {
        let d = self.spec.dims;
        let n = self.workers.len();
        dps.rev()
            .filter(|dp| dp * d.pp * d.tp <= n)
            .filter_map(|dp| self.spec.shrunk(dp).ok())
            .find(|(dims, _)| {
                place(&self.candidates(), dims.world_size(), dims.tp, self.nccl()).is_ok()
            })
    }

    /// An on-demand checkpoint: picks a step every rank has not reached yet (the latest
    /// reported step plus the steps that fit in two heartbeat intervals and a second, at
    /// the measured rate) and tells the workers.
    pub fn request_save(&mut self) -> Result<u64> {
        let step = self.save_step()?;
        if let Some(pending) = self.save_at {
            if pending > self.step.unwrap_or(0) {
                return Ok(pending);
            }
        }
        self.save_at = Some(step);
        self.push_event(pb::control_event::Kind::SaveAt(pb::SaveAt {
            step,
            stop: false,
        }));
        Ok(step)
    }

    /// Preemption: every rank checkpoints at the earliest step they can all still take
    /// (as [`Job::request_save`]) and stops there. The checkpoint is committed as usual;
    /// no new generation starts from it (the coordinator is going away).
    pub fn request_stop_checkpoint(&mut self) -> Result<u64> {
        let step = self.save_step()?;
        self.save_at = Some(step);
        self.push_event(pb::control_event::Kind::SaveAt(pb::SaveAt {
            step,
            stop: true,
        }));
        Ok(step)
    }

    /// The step an on-demand checkpoint asked for now can be taken at (see
    /// [`Job::request_save`]).
    fn save_step(&self) -> Result<u64> {
        if let Some(e) = self.terminal_error() {
            return Err(e);
        }
        if self.phase != Phase::Running {
            return Err(CoordinatorError::InvalidRequest(format!(
                "the job is {}; a checkpoint can be requested while it runs",
                phase_name(self.phase)
            )));
        }
        let current = self.step.unwrap_or(0);
        let rate = match self.progress {
            Some(((t0, s0), (t1, s1))) if t1 > t0 => (s1 - s0) as f64 / (t1 - t0).as_secs_f64(),
            _ => 0.0,
        };
        let lead = (2.0 * self.policy.heartbeat_interval.as_secs_f64() + 1.0) * rate;
        let mut step = current + lead.ceil() as u64 + 1;
        let total = self.spec.config.train.steps;
        if total > 0 {
            step = step.min(total);
        }
        Ok(step)
    }

    /// Time-driven transitions: heartbeat timeouts, gather timeouts.
    pub fn tick(&mut self, now: Instant) {
        match self.phase {
            Phase::Gathering => {
                let timeout = self.policy.heartbeat_timeout;
                let silent: Vec<WorkerId> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| now.saturating_duration_since(w.last_beat) > timeout)
                    .map(|(&id, _)| id)
                    .collect();
                for id in silent {
                    let who = self.describe(id);
                    self.lost(
                        id,
                        format!("{who} missed heartbeats for {:.1} s", timeout.as_secs_f64()),
                        now,
                    );
                }
                let limit = if self.generation == 1 {
                    self.policy.gather_timeout
                } else {
                    self.policy.regather_timeout
                };
                if now.saturating_duration_since(self.phase_since) >= limit {
                    self.gather_timed_out(limit, now);
                }
            }
            Phase::Planning | Phase::Running => {
                let timeout = self.policy.heartbeat_timeout;
                let silent = self
                    .workers
                    .iter()
                    .find(|(_, w)| {
                        w.rank.is_some()
                            && w.done.is_none()
                            && now.saturating_duration_since(w.last_beat) > timeout
                    })
                    .map(|(&id, w)| (id, now.saturating_duration_since(w.last_beat)));
                if let Some((id, silence)) = silent {
                    let who = self.describe(id);
                    self.lost(
                        id,
                        format!("{who} missed heartbeats for {:.1} s", silence.as_secs_f64()),
                        now,
                    );
                    return;
                }
                if self.may_grow() {
                    let silent_spares: Vec<WorkerId> = self
                        .workers
                        .iter()
                        .filter(|(_, w)| {
                            w.rank.is_none() && now.saturating_duration_since(w.last_beat) > timeout
                        })
                        .map(|(&id, _)| id)
                        .collect();
                    for id in silent_spares {
                        let who = self.describe(id);
                        self.lost(id, format!("spare {who} went silent"), now);
                    }
                    self.consider_growing();
                }
            }
            Phase::Completed | Phase::Failed | Phase::Unspecified => {}
        }
    }

    fn gather_timed_out(&mut self, limit: Duration, now: Instant) {
        let n = self.workers.len();
        let d = self.spec.dims;
        if self.generation > 1 {
            if let Some(min_dp) = self.policy.elastic_min_dp {
                if let Some((dims, toml)) = self.largest_layout(min_dp.max(1)..=d.dp - 1) {
                    tracing::warn!(
                        generation = self.generation,
                        "only {n} of {} workers came back within {:.0} s: shrinking to {dims}",
                        self.expected(),
                        limit.as_secs_f64()
                    );
                    self.plan(dims, Some(toml), now);
                    return;
                }
            }
        }
        let mut hosts: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
        for w in self.workers.values() {
            hosts
                .entry(&w.info.host)
                .or_default()
                .insert(w.info.local_rank);
        }
        let listing = if hosts.is_empty() {
            "none".to_string()
        } else {
            hosts
                .iter()
                .map(|(h, ranks)| {
                    let r: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
                    format!("{h} (local ranks {})", r.join(", "))
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let reason = if self.generation == 1 {
            format!(
                "expected {} workers (dp × pp × tp = {}), {n} registered within {}: {listing}; \
                 start the missing workers (weaver worker --coordinator URL) or change [parallel]",
                self.expected(),
                d,
                secs(limit)
            )
        } else {
            format!(
                "generation {}: expected {} workers, {n} registered again within {} after {}: {listing}",
                self.generation,
                self.expected(),
                secs(limit),
                self.message
            )
        };
        self.fail(reason, now);
    }

    /// The operator's view.
    pub fn status(&self, now: Instant) -> pb::StatusResponse {
        let dims = self.plan.as_ref().map_or(self.spec.dims, |p| p.dims);
        let mut workers: Vec<pb::WorkerStatus> = self
            .workers
            .iter()
            .map(|(&id, w)| {
                let c = w.rank.map(|r| dims.coord(r));
                pb::WorkerStatus {
                    worker_id: id,
                    host: w.info.host.clone(),
                    local_rank: w.info.local_rank,
                    rank: w.rank.map_or(-1, |r| r as i64),
                    coord: c.map(|c| pb::Coord {
                        dp: c.dp as u32,
                        pp: c.pp as u32,
                        tp: c.tp as u32,
                    }),
                    last_step: w.last_step.map_or(-1, |s| s as i64),
                    heartbeat_age_ms: now.saturating_duration_since(w.last_beat).as_millis() as u64,
                    device: w.info.device.clone(),
                    pid: w.info.pid,
                    done: w.done.is_some(),
                }
            })
            .collect();
        workers.sort_by_key(|w| (w.rank < 0, w.rank, w.host.clone(), w.local_rank));
        let message = match self.phase {
            Phase::Gathering => {
                let mut m = format!(
                    "{} of {} workers registered",
                    self.workers.len(),
                    self.expected()
                );
                if self.generation > 1 {
                    m.push_str(&format!(" (restarted after: {})", self.message));
                }
                m
            }
            _ => {
                let mut m = self.message.clone();
                if let Some(e) = &self.last_commit_error {
                    m.push_str(&format!(" [last checkpoint commit failed: {e}]"));
                }
                m
            }
        };
        pb::StatusResponse {
            phase: self.phase as i32,
            generation: self.generation,
            restarts: self.restarts,
            expected_workers: self.expected() as u32,
            message,
            total_steps: self.spec.config.train.steps,
            step: self.step.map_or(-1, |s| s as i64),
            loss: self.loss,
            tokens_per_s: self.tokens_per_s,
            resume_from: self
                .resume
                .as_ref()
                .map(|r| r.url.clone())
                .unwrap_or_default(),
            resume_step: self.resume.as_ref().map_or(0, |r| r.step),
            dims: Some(pb::Dims {
                dp: dims.dp as u32,
                pp: dims.pp as u32,
                tp: dims.tp as u32,
            }),
            workers,
            elapsed_ms: now.saturating_duration_since(self.started).as_millis() as u64,
        }
    }
}

/// A duration for messages: "0.5 s", "300 s".
pub(crate) fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.1} s")
    } else {
        format!("{s:.0} s")
    }
}

/// The phase's name for people.
pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Unspecified => "unknown",
        Phase::Gathering => "gathering",
        Phase::Planning => "planning",
        Phase::Running => "running",
        Phase::Completed => "completed",
        Phase::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn spec(dp: usize, pp: usize, tp: usize) -> JobSpec {
        let config = JobConfig::parse(
            "",
            &[
                format!("parallel.dp={dp}"),
                format!("parallel.pp={pp}"),
                format!("parallel.tp={tp}"),
                "train.global_batch=48".into(),
                "train.steps=10".into(),
            ],
        )
        .unwrap();
        let limits = default_limits(&config);
        let planner: StagePlanner = Arc::new(|_: &JobConfig, pp| Ok(even_stages(6, pp)));
        JobSpec::new(config, limits, &planner).unwrap()
    }

    fn policy() -> Policy {
        Policy {
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_millis(300),
            gather_timeout: Duration::from_secs(10),
            regather_timeout: Duration::from_secs(5),
            max_restarts: 2,
            elastic_min_dp: None,
        }
    }

    fn info(host: &str, local_rank: u32) -> pb::WorkerInfo {
        pb::WorkerInfo {
            host: host.into(),
            local_rank,
            device_kind: "cpu".into(),
            device: "cpu".into(),
            instance: format!("{host}-{local_rank}-x"),
            pid: 100 + local_rank,
            ..Default::default()
        }
    }

    fn gather(job: &mut Job, hosts: &[(&str, u32)], now: Instant) -> Vec<WorkerId> {
        let mut ids = Vec::new();
        for (h, n) in hosts {
            for l in 0..*n {
                ids.push(job.register(info(h, l), now).unwrap().worker_id);
            }
        }
        ids
    }

    fn assign_all(job: &mut Job, ids: &[WorkerId], now: Instant) -> Vec<pb::Assignment> {
        ids.iter()
            .map(|&id| job.assignment(id, now).unwrap().unwrap())
            .collect()
    }

    /// A `layout = "auto"` job of `workers` on the debug flavor.
    fn auto_spec(workers: usize) -> JobSpec {
        let config = JobConfig::parse(
            "",
            &[
                "parallel.layout=\"auto\"".into(),
                format!("parallel.workers={workers}"),
                "train.global_batch=32".into(),
                "train.steps=10".into(),
            ],
        )
        .unwrap();
        let limits = default_limits(&config);
        let layers = config.model.num_layers();
        let planner: StagePlanner = Arc::new(move |_: &JobConfig, pp| Ok(even_stages(layers, pp)));
        JobSpec::new(config, limits, &planner).unwrap()
    }

    fn with_memory(host: &str, local_rank: u32, bytes: u64) -> pb::WorkerInfo {
        pb::WorkerInfo {
            device_memory: bytes,
            ..info(host, local_rank)
        }
    }

    #[test]
    fn an_auto_layout_is_chosen_from_the_registered_workers() {
        let t0 = Instant::now();
        let mut job = Job::new(auto_spec(4), policy(), None, t0);
        assert_eq!(job.expected(), 4);
        let mut ids = Vec::new();
        for (h, l) in [("a", 0), ("a", 1), ("b", 0), ("b", 1)] {
            ids.push(
                job.register(with_memory(h, l, 4 << 30), t0)
                    .unwrap()
                    .worker_id,
            );
        }
        assert_eq!(job.phase(), Phase::Planning);
        let fx = job.drain_effects();
        let [Effect::Config(saved)] = &fx[..] else {
            panic!("{fx:?}")
        };
        let a = assign_all(&mut job, &ids, t0);
        // What every worker receives is what the run directory keeps: the chosen layout,
        // valid for the four workers, with tensor parallelism inside a host of two.
        assert_eq!(&a[0].config_toml, saved);
        let chosen = JobConfig::parse(saved, &[]).unwrap();
        let p = &chosen.parallel;
        assert_eq!(p.layout, LayoutMode::Auto);
        assert_eq!(p.workers, 4);
        assert_eq!(p.dp * p.pp * p.tp, 4);
        assert!(p.tp <= 2, "{p:?}");
        weaver_config::layout::ParallelLayout::new(&chosen, 4).unwrap();
        let d = a[0].dims.unwrap();
        assert_eq!(
            (d.dp as usize, d.pp as usize, d.tp as usize),
            (p.dp, p.pp, p.tp)
        );
        assert_eq!(a[0].stages.len(), p.pp);
        assert_eq!(job.phase(), Phase::Running);
        // A lost worker: the next generation gathers four again and keeps the choice.
        job.report_error(ids[3], "peer lost", true, t0);
        let again = gather(&mut job, &[("a", 2), ("b", 2)], t0);
        assert_eq!(job.phase(), Phase::Planning);
        let b = assign_all(&mut job, &again, t0);
        assert_eq!(b[0].config_toml, *saved);
    }

    #[test]
    fn an_auto_layout_that_fits_nowhere_fails_naming_the_memory_it_needs() {
        let t0 = Instant::now();
        let mut job = Job::new(auto_spec(2), policy(), None, t0);
        job.register(with_memory("a", 0, 1 << 20), t0).unwrap();
        job.register(with_memory("a", 1, 1 << 20), t0).unwrap();
        assert_eq!(job.phase(), Phase::Failed);
        let why = job.failure().unwrap();
        assert!(why.contains("layout = \"auto\" on 2 workers"), "{why}");
        assert!(why.contains("nothing fits in"), "{why}");
        assert!(why.contains("the smallest is"), "{why}");
        assert!(why.contains("more per device"), "{why}");
        // A CPU worker that reported no memory cannot be planned for: said by name.
        let mut job = Job::new(auto_spec(1), policy(), None, t0);
        job.register(info("h", 0), t0).unwrap();
        let why = job.failure().unwrap();
        assert!(why.contains("host h reported no memory"), "{why}");
    }

    #[test]
    fn even_stages_cover_the_layers() {
        assert_eq!(even_stages(7, 3), vec![0..3, 3..5, 5..7]);
        assert_eq!(even_stages(4, 4), vec![0..1, 1..2, 2..3, 3..4]);
    }

    #[test]
    fn refuses_a_layout_that_does_not_divide_before_gathering() {
        let config = JobConfig::parse("", &["parallel.tp=3".into()]).unwrap();
        let limits = default_limits(&config);
        let planner: StagePlanner = Arc::new(|_: &JobConfig, pp| Ok(even_stages(6, pp)));
        let e = JobSpec::new(config, limits, &planner).unwrap_err();
        assert!(e.to_string().contains("tp = 3"), "{e}");
    }

    #[test]
    fn gathers_plans_runs_and_completes() {
        let t0 = Instant::now();
        let mut job = Job::new(spec(2, 2, 2), policy(), None, t0);
        let ids = gather(&mut job, &[("b", 4), ("a", 4)], t0);
        assert_eq!(job.phase(), Phase::Planning);
        // The effective config goes to the run directory.
        let fx = job.drain_effects();
        assert!(
            matches!(&fx[..], [Effect::Config(t)] if t.contains("dp = 2")),
            "{fx:?}"
        );
        let a = assign_all(&mut job, &ids, t0);
        assert_eq!(job.phase(), Phase::Running);
        // Host a's workers (registered last) hold ranks 0-3: hosts are placed in name order.
        for (x, &id) in a.iter().zip(&ids) {
            let host = if x.rank < 4 { "a" } else { "b" };
            assert_eq!(job.workers[&id].info.host, host);
            assert_eq!(x.local_world_size, 4);
            assert_eq!(x.kv_prefix, "g1/");
        }
        let mut ranks: Vec<u32> = a.iter().map(|x| x.rank).collect();
        ranks.sort();
        assert_eq!(ranks, (0..8).collect::<Vec<_>>());
        for (i, &id) in ids.iter().enumerate() {
            job.heartbeat(
                id,
                &[pb::StepMetrics {
                    step: 1,
                    loss: (i == 0).then_some(2.5),
                    ..Default::default()
                }],
                0,
                t0,
            );
        }
        let fx = job.drain_effects();
        assert_eq!(fx.len(), 1, "only the loss-carrying rank writes a line");
        for &id in &ids {
            job.report_done(id, 10, "", t0).unwrap();
        }
        assert_eq!(job.phase(), Phase::Completed);
        let fx = job.drain_effects();
        let Effect::Metrics(done) = &fx[0] else {
            panic!()
        };
        assert_eq!(done["done"], json!(true));
        assert_eq!(done["step"], json!(10));
        assert!(matches!(
            job.register(info("c", 0), t0),
            Err(CoordinatorError::JobCompleted(_))
        ));
    }

    #[test]
    fn never_gathered_fails_with_a_clear_reason() {
        let t0 = Instant::now();
        let mut job = Job::new(spec(2, 2, 2), policy(), None, t0);
        let mut ids = gather(&mut job, &[("a", 5)], t0);
        let mut t = t0;
        // Keep them alive while the gather timeout runs out.
        while job.phase() == Phase::Gathering {
            t += Duration::from_millis(100);
            for id in &ids {
                job.heartbeat(*id, &[], 0, t);
            }
            job.tick(t);
        }
        ids.clear();
        assert_eq!(job.phase(), Phase::Failed);
        let reason = job.failure().unwrap();
        assert!(
            reason.starts_with(
                "expected 8 workers (dp × pp × tp = dp=2 pp=2 tp=2), 5 registered within 10 s"
            ),
            "{reason}"
        );
        assert!(reason.contains("a (local ranks 0, 1, 2, 3, 4)"), "{reason}");
        assert_eq!(job.events_after(0).len(), 1, "workers are told to stop");
    }

    #[test]
    fn registering_twice_is_idempotent_for_a_retry_and_refused_for_another_process() {
        let t0 = Instant::now();
        let mut job = Job::new(spec(2, 1, 1), policy(), None, t0);
        let a = job.register(info("h", 0), t0).unwrap();
        assert_eq!(
            job.register(info("h", 0), t0).unwrap().worker_id,
            a.worker_id
        );
        let mut impostor = info("h", 0);
        impostor.instance = "other".into();
        let e = job.register(impostor.clone(), t0).unwrap_err();
        assert!(matches!(e, CoordinatorError::AlreadyRegistered(_)), "{e}");
        assert!(e.to_string().contains("host h local rank 0"), "{e}");
        // Once the holder is lost, the slot is free.
        let t1 = t0 + Duration::from_millis(400);
        job.tick(t1);
        assert!(job.register(impostor, t1).is_ok());
    }

    #[test]
    fn a_lost_worker_starts_a_new_generation_that_resumes_from_the_checkpoint() {
        let t0 = Instant::now();
        let mut job = Job::new(spec(2, 1, 2), policy(), None, t0);
        let ids = gather(&mut job, &[("a", 2), ("b", 2)], t0);
        assign_all(&mut job, &ids, t0);
        for &id in &ids {
            job.report_shard(id, 5, format!("{id}").into_bytes(), false)
                .unwrap();
        }
        let Some(Effect::Commit(c)) = job.drain_effects().pop() else {
            panic!("no commit")
        };
        assert_eq!(c.reports.len(), 4);
        assert_eq!(c.layout["tp"], json!(2));
        job.commit_finished(5, Ok("file:///ckpt/step-5".into()), t0);
        // Three beat, one goes silent.
        let t1 = t0 + Duration::from_millis(350);
        for &id in &ids[1..] {
            job.heartbeat(id, &[], 0, t1);
        }
        job.tick(t1);
        assert_eq!(job.phase(), Phase::Gathering);
        assert_eq!(job.generation(), 2);
        let ev = &job.events_after(0)[0];
        let Some(pb::control_event::Kind::Abort(a)) = &ev.kind else {
            panic!()
        };
        assert_eq!(a.generation, 2);
        assert!(
            a.reason.contains("worker a/0") && a.reason.contains("missed heartbeats"),
            "{}",
            a.reason
        );
        // Old registrations are stale.
        assert!(job.heartbeat(ids[1], &[], 0, t1).stale);
        assert!(matches!(
            job.assignment(ids[1], t1),
            Err(CoordinatorError::StaleWorker(_))
        ));
        // Everyone (the lost one restarted) registers again.
        let ids = gather(&mut job, &[("a", 2), ("b", 2)], t1);
        let a = assign_all(&mut job, &ids, t1);
        assert_eq!(a[0].generation, 2);
        assert_eq!(a[0].kv_prefix, "g2/");
        assert_eq!(a[0].resume_from, "file:///ckpt/step-5");
        assert_eq!(a[0].resume_step, 5);
    }

    #[test]
    fn restarts_are_bounded_and_non_retryable_errors_fail() {
        let t0 = Instant::now();
        let mut job = Job::new(spec(2, 1, 1), policy(), None, t0);
        for g in 1..=3 {
            let ids = gather(&mut job, &[("a", 2)], t0);
            assign_all(&mut job, &ids, t0);
            job.report_error(ids[0], "peer lost in all_reduce", true, t0);
            if g < 3 {
                assert_eq!(job.generation(), g + 1);
            }
        }
        assert_eq!(job.phase(), Phase::Failed);
        assert!(
            job.failure().unwrap().contains("already restarted 2 times"),
            "{:?}",
            job.failure()
        );

        let mut job = Job::new(spec(2, 1, 1), policy(), None, t0);
        let ids = gather(&mut job, &[("a", 2)], t0);
        job.report_error(ids[1], "model does not fit", false, t0);
        assert!(job.failure().unwrap().contains("model does not fit"));
    }

    #[test]
    fn exit_reported_by_the_launcher_is_a_loss() {
        let t0 = Instant::now();
        let mut p = policy();
        p.max_restarts = 0;
        let mut job = Job::new(spec(2, 1, 1), p, None, t0);
        let ids = gather(&mut job, &[("a", 2)], t0);
        assign_all(&mut job, &ids, t0);
        job.worker_exited("a", 1, "was killed by signal 9", t0);
        let reason = job.failure().unwrap();
        assert!(
            reason.contains("killed by signal 9") && reason.contains("max_restarts = 0"),
            "{reason}"
        );
    }

    #[test]
    fn elastic_shrinks_dp_when_not_everyone_comes_back() {
        let t0 = Instant::now();
        let mut p = policy();
        p.elastic_min_dp = Some(1);
        let mut job = Job::new(spec(4, 1, 1), p, None, t0);
        let ids = gather(&mut job, &[("a", 4)], t0);
        assign_all(&mut job, &ids, t0);
        job.worker_exited("a", 3, "exited with status 1", t0);
        let ids = gather(&mut job, &[("a", 3)], t0);
        job.tick(t0 + Duration::from_millis(200));
        assert_eq!(job.phase(), Phase::Gathering);
        let t1 = t0 + Duration::from_secs(5);
        for &id in &ids {
            job.heartbeat(id, &[], 0, t1);
        }
        job.tick(t1);
        // 48 samples split over dp = 3 works (global_batch 48, 1 micro-batch).
        assert_eq!(job.phase(), Phase::Planning);
        let a = job.assignment(ids[0], t1).unwrap().unwrap();
        assert_eq!(a.dims.unwrap().dp, 3);
        assert!(a.config_toml.contains("dp = 3"), "{}", a.config_toml);
    }

    /// An elastic, checkpointing job of `dp` replicas on host "a" that lost its last worker
    /// and, after the regather timeout, runs shrunk on the others. Returns the job, the
    /// running workers and the time.
    fn shrunk_elastic_job(dp: usize) -> (Job, Vec<WorkerId>, Instant) {
        let t0 = Instant::now();
        let mut p = policy();
        p.elastic_min_dp = Some(1);
        let config = JobConfig::parse(
            "",
            &[
                format!("parallel.dp={dp}"),
                "train.global_batch=48".into(),
                "train.steps=100".into(),
                "checkpoint.url=/tmp/ckpt".into(),
            ],
        )
        .unwrap();
        let planner: StagePlanner = Arc::new(|_: &JobConfig, pp| Ok(even_stages(6, pp)));
        let spec = JobSpec::new(config.clone(), default_limits(&config), &planner).unwrap();
        let mut job = Job::new(spec, p, None, t0);
        let n = dp as u32;
        let ids = gather(&mut job, &[("a", n)], t0);
        assign_all(&mut job, &ids, t0);
        job.worker_exited("a", n - 1, "exited with status 1", t0);
        let ids = gather(&mut job, &[("a", n - 1)], t0);
        let t1 = t0 + Duration::from_secs(5);
        for &id in &ids {
            job.heartbeat(id, &[], 0, t1);
        }
        job.tick(t1);
        assign_all(&mut job, &ids, t1);
        assert_eq!(job.phase(), Phase::Running);
        assert_eq!(job.plan.as_ref().unwrap().dims.dp, dp - 1);
        (job, ids, t1)
    }

    #[test]
    fn an_elastic_job_grows_back_through_a_checkpoint_when_workers_return() {
        let (mut job, ids, t1) = shrunk_elastic_job(4);
        let m = pb::StepMetrics {
            step: 10,
            loss: Some(1.0),
            ..Default::default()
        };
        for &id in &ids {
            job.heartbeat(id, std::slice::from_ref(&m), 0, t1);
        }
        // The lost worker comes back: a spare, no rank; the coordinator asks for a save.
        let seq = job.latest_event_seq();
        let spare = job.register(info("a", 3), t1).unwrap().worker_id;
        assert!(matches!(
            job.assignment(spare, t1),
            Err(CoordinatorError::JobFull(_))
        ));
        let save = match &job.events_after(seq)[0].kind {
            Some(pb::control_event::Kind::SaveAt(s)) if s.stop => s.step,
            other => panic!("{other:?}"),
        };
        assert!(save > 10);
        assert_eq!(job.generation(), 2);
        // Neither an earlier commit nor a periodic one taken at or after the save step
        // while the workers had not yet stopped triggers it; the one they stopped at does.
        job.commit_finished(8, Ok("file:///tmp/ckpt/step-8".into()), t1);
        job.commit_finished(save, Ok(format!("file:///tmp/ckpt/step-{save}")), t1);
        assert_eq!(job.generation(), 2);
        let stop = save + 1;
        for (k, &id) in ids.iter().enumerate() {
            job.report_shard(id, stop, vec![], k == 0).unwrap();
        }
        job.commit_finished(stop, Ok(format!("file:///tmp/ckpt/step-{stop}")), t1);
        assert_eq!(job.generation(), 3);
        assert_eq!(job.phase(), Phase::Gathering);
        assert_eq!(job.restarts(), 1, "growing is not a failure");
        assert_eq!(job.expected(), 4);
        let ids = gather(&mut job, &[("a", 4)], t1);
        let a = assign_all(&mut job, &ids, t1);
        assert_eq!(a[0].dims.unwrap().dp, 4);
        assert_eq!(a[0].resume_step, stop);
        assert_eq!(job.phase(), Phase::Running);
        // Back at the requested size: nobody else may join.
        assert!(matches!(
            job.register(info("b", 0), t1),
            Err(CoordinatorError::JobFull(_))
        ));
    }

    #[test]
    fn a_spare_that_leaves_is_dropped_without_a_new_generation() {
        let (mut job, _, t1) = shrunk_elastic_job(2);
        // No step measured yet: the save lands a step ahead; the spare leaves before it.
        job.register(info("a", 1), t1).unwrap();
        assert!(job.grow.is_some());
        job.worker_exited("a", 1, "exited with status 1", t1);
        assert_eq!(job.generation(), 2);
        assert_eq!(job.phase(), Phase::Running);
        assert_eq!(job.registered(), 1);
        assert!(job.grow.is_none(), "nothing left to grow with");
        job.commit_finished(2, Ok("file:///tmp/ckpt/step-2".into()), t1);
        assert_eq!(job.generation(), 2);
    }

    #[test]
    fn shrinking_keeps_the_micro_batch_when_it_can() {
        let mut c = JobConfig::parse(
            "[model]\nflavor = \"debug\"\n[train]\nglobal_batch = 48\n[parallel]\ndp = 4\nmicrobatches = 3\n",
            &[],
        )
        .unwrap();
        let planner: StagePlanner = Arc::new(|_: &JobConfig, pp| Ok(even_stages(6, pp)));
        let spec = JobSpec::new(c.clone(), default_limits(&c), &planner).unwrap();
        // 12 micro-batches of 4 samples: on dp 2 each replica takes 6 of them.
        let (dims, toml) = spec.shrunk(2).unwrap();
        assert_eq!(dims.dp, 2);
        let s = JobConfig::parse(&toml, &[]).unwrap();
        assert_eq!(s.parallel.microbatches, 6);
        assert_eq!(s.micro_batch_size(), c.micro_batch_size());
        // 12 does not divide by dp 5 (nor does 48): refused; by dp 3 it does.
        assert!(spec.shrunk(5).is_err());
        let (_, toml) = spec.shrunk(3).unwrap();
        assert_eq!(
            JobConfig::parse(&toml, &[]).unwrap().parallel.microbatches,
            4
        );
        // When dp × microbatches does not divide, the micro-batch grows but the global
        // batch stays.
        c = JobConfig::parse(
            "[model]\nflavor = \"debug\"\n[train]\nglobal_batch = 60\n[parallel]\ndp = 3\nmicrobatches = 1\n",
            &[],
        )
        .unwrap();
        let spec = JobSpec::new(c.clone(), default_limits(&c), &planner).unwrap();
        let (_, toml) = spec.shrunk(2).unwrap();
        let s = JobConfig::parse(&toml, &[]).unwrap();
        assert_eq!(s.parallel.microbatches, 1);
        assert_eq!(s.train.global_batch, 60);
    }

    #[test]
    fn metrics_are_deduplicated_by_step() {
        let t0 = Instant::now();
        let mut job = Job::new(spec(1, 1, 1), policy(), None, t0);
        let id = gather(&mut job, &[("a", 1)], t0)[0];
        let m = |step, loss| pb::StepMetrics {
            step,
            loss: Some(loss),
            extra_json: r#"{"mfu": 0.4}"#.into(),
            ..Default::default()
        };
        job.heartbeat(id, &[m(1, 3.0), m(2, 2.0)], 0, t0);
        job.heartbeat(id, &[m(2, 9.0), m(3, 1.0)], 0, t0);
        let eval = pb::StepMetrics {
            step: 3,
            eval: true,
            extra_json: r#"{"i2t_r1": 0.5}"#.into(),
            ..Default::default()
        };
        job.heartbeat(id, &[eval], 0, t0);
        let lines: Vec<Value> = job
            .drain_effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Metrics(v) => Some(v),
                Effect::Config(_) => None,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[1]["loss"], json!(2.0));
        assert_eq!(lines[0]["mfu"], json!(0.4));
        assert_eq!(lines[3]["eval"], json!(true));
        assert_eq!(lines[3]["i2t_r1"], json!(0.5));
    }

    /// Reports with only extras (an inference job's per-shard lines) are written once per
    /// rank and step; a rank's empty reports (no loss: not rank 0 of a training step) are not.
    #[test]
    fn extra_only_reports_are_written_once_per_rank_and_step() {
        let t0 = Instant::now();
        let mut job = Job::new(spec(1, 1, 1), policy(), None, t0);
        let id = gather(&mut job, &[("a", 1)], t0)[0];
        let shard = |step, name: &str| pb::StepMetrics {
            step,
            extra_json: format!(r#"{{"infer_shard": "{name}", "skipped": false}}"#),
            ..Default::default()
        };
        let empty = pb::StepMetrics {
            step: 3,
            ..Default::default()
        };
        job.heartbeat(id, &[shard(1, "s0"), shard(2, "s1")], 0, t0);
        job.heartbeat(id, &[shard(2, "s1"), empty], 0, t0);
        let lines: Vec<Value> = job
            .drain_effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Metrics(v) => Some(v),
                _ => None,
            })
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["infer_shard"], json!("s0"));
        assert_eq!(lines[1]["infer_shard"], json!("s1"));
        assert_eq!(lines[1]["skipped"], json!(false));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Register(u8),
        Beat(u8),
        Fetch(u8),
        Error(u8, bool),
        Exit(u8),
        Done(u8),
        Shard(u8),
        Advance(u16),
        Save,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6).prop_map(Op::Register),
            (0u8..6).prop_map(Op::Beat),
            (0u8..6).prop_map(Op::Fetch),
            ((0u8..6), any::<bool>()).prop_map(|(w, r)| Op::Error(w, r)),
            (0u8..6).prop_map(Op::Exit),
            (0u8..6).prop_map(Op::Done),
            (0u8..6).prop_map(Op::Shard),
            (0u16..800).prop_map(Op::Advance),
            Just(Op::Save),
        ]
    }

    proptest! {
        /// Whatever happens, the machine keeps its invariants, never panics, and never
        /// waits forever: with no worker doing anything, ticks end the job.
        #[test]
        fn invariants_hold_under_any_sequence(ops in proptest::collection::vec(op(), 0..120)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut job = Job::new(spec(2, 1, 2), policy(), None, t0);
            let mut ids: BTreeMap<u8, WorkerId> = BTreeMap::new();
            let mut last_gen = 1;
            for o in ops {
                match o {
                    Op::Register(w) => {
                        if let Ok(r) = job.register(info(if w < 3 { "a" } else { "b" }, u32::from(w % 3)), now) {
                            ids.insert(w, r.worker_id);
                        }
                    }
                    Op::Beat(w) => { if let Some(&id) = ids.get(&w) { job.heartbeat(id, &[pb::StepMetrics { step: 1, loss: Some(1.0), ..Default::default() }], 0, now); } }
                    Op::Fetch(w) => { if let Some(&id) = ids.get(&w) { let _ = job.assignment(id, now); } }
                    Op::Error(w, r) => { if let Some(&id) = ids.get(&w) { job.report_error(id, "boom", r, now); } }
                    Op::Exit(w) => job.worker_exited(if w < 3 { "a" } else { "b" }, u32::from(w % 3), "exited", now),
                    Op::Done(w) => { if let Some(&id) = ids.get(&w) { let _ = job.report_done(id, 10, "", now); } }
                    Op::Shard(w) => { if let Some(&id) = ids.get(&w) { let _ = job.report_shard(id, 4, vec![w], false); } }
                    Op::Advance(ms) => { now += Duration::from_millis(u64::from(ms)); job.tick(now); }
                    Op::Save => { let _ = job.request_save(); }
                }
                prop_assert!(job.generation() >= last_gen);
                last_gen = job.generation();
                prop_assert!(job.restarts() <= job.policy().max_restarts);
                prop_assert!(job.workers.len() <= job.expected());
                if let Some(plan) = &job.plan {
                    let mut r = plan.by_rank.clone();
                    r.sort();
                    r.dedup();
                    prop_assert_eq!(r.len(), plan.dims.world_size());
                    for g in plan.by_rank.chunks(plan.dims.tp) {
                        let h = &job.workers[&g[0]].info.host;
                        prop_assert!(g.iter().all(|id| &job.workers[id].info.host == h));
                    }
                }
                let seqs: Vec<u64> = job.events_after(0).iter().map(|e| e.seq).collect();
                prop_assert!(seqs.iter().enumerate().all(|(i, &s)| s == i as u64 + 1));
            }
            // Silence: the job must end on its own.
            for _ in 0..200 {
                now += Duration::from_millis(100);
                job.tick(now);
            }
            prop_assert!(matches!(job.phase(), Phase::Completed | Phase::Failed), "{:?}", job.phase());
        }
    }
}
