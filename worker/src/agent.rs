//! The worker agent behind `weaver worker`: registers with the coordinator, builds its
//! shard and communicators from each generation's assignment, trains, reports, and starts
//! over in the next generation when the coordinator announces one (a lost peer).
//!
//! Failure recovery: the coordinator's `Abort` event aborts this generation's communicators
//! from the session's thread, so a rank blocked in a collective returns at once; the step
//! loop then fails, the agent drops the rank, waits for the next assignment (re-registering)
//! and resumes from the checkpoint that assignment names. A failure the agent notices itself
//! (a peer's connection closed, a timeout) is reported as retryable, which makes the
//! coordinator start that new generation. `SaveAt` and `Stop` events, and SIGTERM, become
//! requests to the step loop, which every rank agrees on at the same step.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{error, info, warn};
use weaver_checkpoint::{CkptStore, ShardReport};
use weaver_models::config::Backend;
use weaver_models::JobConfig;
use weaver_parallel::comm::{Communicator, NcclComm, TcpComm};
use weaver_rpc::{
    Assignment, CheckpointCommitter, ControlEvent, CoordinatorError, SessionOptions, ShardStats,
    StepMetrics as CoordMetrics, WorkerInfo, WorkerSession,
};

use crate::ckpt::{commit_and_retain, open_resume, ShardSink};
use crate::error::WorkerError;
use crate::metrics::{EvalMetrics, MetricsSink, StepMetrics};
use crate::parallel::{checkpoint_layout, Control, ParallelTrainer, Plan, RankSetup};

/// How `weaver worker` runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The coordinator's session options (URL, token, TLS).
    pub session: SessionOptions,
    /// What this worker registers as (host, local rank, device).
    pub info: WorkerInfo,
    /// The device was chosen automatically: a tcp job whose config asks for the CPU then
    /// runs there (see [`generation_device`]).
    pub device_auto: bool,
    /// The address peers reach this worker at for the tcp backend.
    pub listen_host: String,
    /// This worker's directory (created up front; metrics go to the coordinator, and the
    /// final weights are exported from the last checkpoint by whoever ends the job).
    pub run_dir: PathBuf,
    /// Workers on this host, when the launcher says (for thread counts).
    pub local_procs: Option<usize>,
    /// How long to wait for an assignment (the first one waits for every worker).
    pub assignment_timeout: Duration,
}

/// How the agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentExit {
    /// The job completed.
    Completed,
    /// The job was stopped (by the operator, a failure elsewhere, or SIGTERM here).
    Stopped(String),
}

/// The running generation's communicator and control, reachable from the event hook.
#[derive(Debug, Default)]
struct Current {
    /// The generation running (0: none yet).
    running: u64,
    world: Option<Arc<dyn Communicator>>,
    control: Option<Arc<Control>>,
    /// The newest generation an `Abort` announced: a running generation older than it is
    /// over (`u64::MAX` once the coordinator is lost).
    announced: u64,
}

impl Current {
    fn is_aborted(&self) -> bool {
        self.running != 0 && self.announced > self.running
    }
}

/// Reports durable shards to the coordinator (every rank reports every checkpointed step).
#[derive(Debug)]
struct SessionSink(Arc<WorkerSession>, Arc<Control>);

impl ShardSink for SessionSink {
    fn durable(
        &self,
        step: u64,
        _rank: usize,
        report: Option<ShardReport>,
    ) -> Result<(), WorkerError> {
        let bytes = serde_json::to_vec(&report).map_err(|e| WorkerError::Other(e.to_string()))?;
        // An unreachable coordinator is retried until the heartbeats call it lost: a blip
        // of the network does not end the job. (Reports are idempotent.)
        let give_up = std::time::Instant::now() + SHARD_REPORT_RETRY;
        loop {
            let stopping = self.1.stopped_at() == Some(step);
            match self.0.report_shard(step, bytes.clone(), stopping) {
                Ok(_) => return Ok(()),
                Err(CoordinatorError::Unavailable(m))
                    if self.0.coordinator_lost().is_none()
                        && !self.0.stopped()
                        && std::time::Instant::now() < give_up =>
                {
                    warn!(
                        step,
                        "the coordinator is unreachable, retrying the shard report: {m}"
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    return Err(coordinator_error(
                        e,
                        &format!("reporting the shard of step {step}"),
                    ))
                }
            }
        }
    }
}

/// Sends metrics to the coordinator, which writes the job's `metrics.jsonl`: rank 0 sends
/// everything, the others only their step (for `weaver status`).
#[derive(Debug)]
struct SessionMetrics {
    session: Arc<WorkerSession>,
    rank: usize,
}

impl MetricsSink for SessionMetrics {
    fn step(&mut self, m: &StepMetrics) -> Result<(), WorkerError> {
        let mut out = CoordMetrics {
            step: m.step,
            ..CoordMetrics::default()
        };
        if self.rank == 0 {
            out.loss = Some(m.loss);
            out.lr = Some(m.lr);
            out.grad_norm = Some(m.grad_norm);
            out.tokens_per_s = Some(m.tokens_per_s);
            out.step_time_s = Some(m.step_time_s);
            let mut extra = serde_json::Map::new();
            extra.insert("itc".into(), m.itc.into());
            extra.insert("caption".into(), m.caption.into());
            extra.insert("itm".into(), m.itm.into());
            for (k, v) in [("mlm", m.mlm), ("vqa", m.vqa)] {
                if let Some(v) = v {
                    extra.insert(k.into(), v.into());
                }
            }
            extra.insert("flops_per_s".into(), m.flops_per_s.into());
            if let Some(mfu) = m.mfu {
                extra.insert("mfu".into(), mfu.into());
            }
            if let Some(peak) = m.peak_mem_bytes {
                extra.insert("peak_mem_bytes".into(), peak.into());
            }
            if let Some(ranks) = &m.peak_mem_bytes_ranks {
                extra.insert("peak_mem_bytes_ranks".into(), ranks.clone().into());
            }
            if let Some(d) = &m.data {
                extra.extend(d.to_json());
            }
            if let Some(d) = &m.distill {
                extra.insert("distill_itc_kl".into(), d.distill_itc_kl.into());
                extra.insert("distill_caption_kl".into(), d.distill_caption_kl.into());
                extra.insert("distill_feature".into(), d.distill_feature.into());
            }
            out.extra = extra;
        }
        self.session.report_step(out);
        Ok(())
    }

    fn eval(&mut self, e: &EvalMetrics) -> Result<(), WorkerError> {
        let mut extra = serde_json::Map::new();
        extra.insert("i2t_r1".into(), e.i2t_r1.into());
        extra.insert("t2i_r1".into(), e.t2i_r1.into());
        extra.insert("i2t_r5".into(), e.i2t_r5.into());
        extra.insert("i2t_r10".into(), e.i2t_r10.into());
        extra.insert("t2i_r5".into(), e.t2i_r5.into());
        extra.insert("t2i_r10".into(), e.t2i_r10.into());
        extra.insert("caption_exact".into(), e.caption_exact.into());
        for (k, v) in [("vqa_acc", e.vqa_acc), ("vqa_majority", e.vqa_majority)] {
            if let Some(v) = v {
                extra.insert(k.into(), v.into());
            }
        }
        extra.insert("pool".into(), e.pool.into());
        extra.insert("eval_time_s".into(), e.eval_time_s.into());
        self.session.report_step(CoordMetrics {
            step: e.step,
            eval: true,
            extra,
            ..CoordMetrics::default()
        });
        Ok(())
    }

    fn done(&mut self, _summary: &serde_json::Value) -> Result<(), WorkerError> {
        // The agent reports completion itself (report_done), after the final checkpoint.
        Ok(())
    }
}

/// The coordinator's committer: writes the manifest when every rank's shard of a step is
/// durable, then applies retention.
#[derive(Debug)]
pub struct Committer {
    store: CkptStore,
    job: JobConfig,
}

impl Committer {
    /// A committer for `job`'s `[checkpoint] url`.
    pub fn new(job: &JobConfig) -> Result<Committer, WorkerError> {
        Ok(Committer {
            store: CkptStore::open(&job.checkpoint.url)?,
            job: job.clone(),
        })
    }
}

impl CheckpointCommitter for Committer {
    fn commit(
        &self,
        step: u64,
        layout: &serde_json::Value,
        reports: Vec<Vec<u8>>,
    ) -> Result<String, String> {
        let mut shards = Vec::new();
        for r in reports {
            let parsed: Option<ShardReport> = serde_json::from_slice(&r)
                .map_err(|e| format!("a shard report is not valid: {e}"))?;
            shards.extend(parsed);
        }
        let get = |k: &str| layout.get(k).and_then(|v| v.as_u64()).unwrap_or(1) as usize;
        let world = get("dp") * get("pp") * get("tp");
        let mut job = self.job.clone();
        job.parallel.dp = get("dp");
        let mut l = match Plan::new(&job, world) {
            Ok(plan) => checkpoint_layout(&job, &plan),
            Err(_) => weaver_checkpoint::Layout::new(get("dp"), get("pp"), get("tp")),
        };
        if let Some(g) = layout.get("generation") {
            l.extra["generation"] = g.clone();
        }
        // The coordinator calls this from its async runtime's blocking pool; the checkpoint
        // crate's blocking API refuses to run inside a runtime, so commit on a plain thread.
        let (store, keep) = (self.store.clone(), self.job.checkpoint.keep);
        std::thread::scope(|s| {
            s.spawn(move || commit_and_retain(&store, step, l, shards, keep))
                .join()
                .map_err(|_| "the commit thread panicked".to_string())?
                .map_err(|e| e.to_string())
        })
    }

    fn url(&self) -> String {
        self.store.url()
    }

    fn newest_committed(&self) -> Result<Option<u64>, String> {
        // Callers may hold an async runtime; the blocking API refuses to run inside one.
        let store = self.store.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                weaver_checkpoint::block_on(weaver_checkpoint::newest_committed(&store))
            })
            .join()
            .map_err(|_| "the listing thread panicked".to_string())?
            .map_err(|e| e.to_string())
        })
    }

    fn shard_stats(&self, reports: &[Vec<u8>]) -> ShardStats {
        let mut stats = ShardStats::default();
        let max = |a: Option<f64>, b: f64| Some(a.map_or(b, |a| a.max(b)));
        for r in reports {
            // A rank without state to save reports `null`.
            let Ok(Some(report)) = serde_json::from_slice::<Option<ShardReport>>(r) else {
                continue;
            };
            stats.bytes += report.shard.size;
            if let Some(t) = report.timing {
                stats.copy_s = max(stats.copy_s, t.copy_s);
                stats.upload_s = max(stats.upload_s, t.upload_s);
            }
        }
        stats
    }
}

fn build_world(
    job: &JobConfig,
    a: &Assignment,
    session: &WorkerSession,
    opts: &AgentOptions,
) -> Result<Arc<dyn Communicator>, WorkerError> {
    let timeout = Duration::from_secs(job.parallel.init_timeout_s);
    let prefix = format!("{}comm", a.kv_prefix);
    let comm: Arc<dyn Communicator> = match job.parallel.backend {
        Backend::Tcp => Arc::new(
            TcpComm::connect(
                session.store(),
                &prefix,
                a.rank,
                a.world_size,
                &opts.listen_host,
                timeout,
            )
            .map_err(|e| WorkerError::Comm(e.to_string()))?
            .with_device(weaver_models::device::parse_device(&job.train.device)?),
        ),
        Backend::Nccl => {
            let device = match weaver_models::device::parse_device(&opts.info.device)? {
                tch::Device::Cuda(k) => k,
                _ => {
                    return Err(WorkerError::Layout(format!(
                        "parallel.backend = \"nccl\" needs a CUDA device; this worker has {:?} (pass --device cuda:K)",
                        opts.info.device
                    )))
                }
            };
            Arc::new(
                NcclComm::new(
                    session.store(),
                    &prefix,
                    a.rank,
                    a.world_size,
                    device,
                    timeout,
                )
                .map_err(|e| WorkerError::Comm(e.to_string()))?,
            )
        }
    };
    Ok(comm)
}

/// Runs the agent until the job ends. `sigterm` is set by the process's SIGTERM handler.
pub fn run_agent(opts: AgentOptions, sigterm: Arc<AtomicBool>) -> Result<AgentExit, WorkerError> {
    let session = Arc::new(
        WorkerSession::connect(opts.session.clone())
            .map_err(|e| WorkerError::Comm(format!("coordinator: {e}")))?,
    );
    let current = Arc::new(Mutex::new(Current::default()));
    {
        let current = current.clone();
        session.on_event(move |e| {
            let Ok(mut c) = current.lock() else { return };
            match e {
                ControlEvent::Abort { generation, reason } => {
                    warn!(generation, reason = %reason, "abort: a new generation starts");
                    c.announced = c.announced.max(*generation);
                    if c.is_aborted() {
                        if let Some(w) = &c.world {
                            w.abort();
                        }
                    }
                }
                ControlEvent::CoordinatorLost { reason } => {
                    error!(reason = %reason, "lost the coordinator: aborting");
                    c.announced = u64::MAX;
                    if let Some(w) = &c.world {
                        w.abort();
                    }
                }
                ControlEvent::SaveAt { step, stop } => {
                    if let Some(ctl) = &c.control {
                        if *stop {
                            ctl.request_stop_at(*step);
                        } else {
                            ctl.request_save_at(*step);
                        }
                    }
                }
                ControlEvent::Stop { success, reason } => {
                    info!(success, reason = %reason, "stop");
                    if let Some(ctl) = &c.control {
                        ctl.request_stop();
                    }
                }
            }
        });
    }
    // SIGTERM (preemption) becomes a stop request of the generation running then: every
    // rank checkpoints at the same step and leaves the step loop.
    {
        let (current, sigterm) = (current.clone(), sigterm.clone());
        std::thread::Builder::new()
            .name("weaver-sigterm".into())
            .spawn(move || {
                while !sigterm.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                warn!("SIGTERM: checkpointing and stopping at the end of this step");
                if let Ok(c) = current.lock() {
                    if let Some(ctl) = &c.control {
                        ctl.request_stop();
                    }
                }
            })
            .map_err(|e| WorkerError::Other(format!("cannot start a thread: {e}")))?;
    }
    let reg = session
        .register(opts.info.clone())
        .map_err(|e| WorkerError::Comm(format!("registering with the coordinator: {e}")))?;
    info!(?reg, "registered");
    loop {
        if session.stopped() {
            return Ok(AgentExit::Stopped("the job is over".into()));
        }
        let a = match session.wait_assignment(opts.assignment_timeout) {
            Ok(a) => a,
            Err(e) if session.stopped() => {
                return Ok(AgentExit::Stopped(format!("the job is over ({e})")));
            }
            Err(e) => return Err(coordinator_error(e, "waiting for an assignment")),
        };
        info!(
            generation = a.generation,
            rank = a.rank,
            world = a.world_size,
            coord = %a.coord,
            resume = ?a.resume_from,
            "assignment"
        );
        match run_generation(&opts, &session, &current, &a, &sigterm) {
            Ok(GenerationEnd::Done) => return Ok(AgentExit::Completed),
            Ok(GenerationEnd::Stopped) => {
                if sigterm.load(Ordering::SeqCst) {
                    return Ok(AgentExit::Stopped("SIGTERM".into()));
                }
                if session.stopped() {
                    return Ok(AgentExit::Stopped("stopped by the coordinator".into()));
                }
                // Another rank was preempted, or the coordinator stopped this generation at
                // a checkpoint to grow: wait for the next generation (not this one again).
                info!(
                    generation = a.generation,
                    "the job stopped at a checkpoint; waiting for the next generation"
                );
                wait_for_generation(&session, a.generation, opts.assignment_timeout)?;
            }
            Err(e) => {
                let aborted = current.lock().map(|c| c.is_aborted()).unwrap_or(true);
                if let WorkerError::CoordinatorLost(_) = e {
                    return Err(e);
                }
                if let Some(why) = session.coordinator_lost() {
                    return Err(WorkerError::CoordinatorLost(format!(
                        "{why}; the generation ended with: {e}"
                    )));
                }
                if session.stopped() {
                    return Ok(AgentExit::Stopped(format!(
                        "stopped by the coordinator ({e})"
                    )));
                }
                if aborted {
                    warn!(error = %e, "generation aborted; waiting for the next one");
                } else {
                    // The coordinator decides: a retryable failure starts a new generation.
                    let retryable = matches!(e, WorkerError::Comm(_));
                    warn!(error = %e, retryable, "reporting the failure to the coordinator");
                    session
                        .report_error(&e.to_string(), retryable)
                        .map_err(|r| coordinator_error(r, &format!("reporting \"{e}\"")))?;
                    if !retryable {
                        return Err(e);
                    }
                }
            }
        }
        if let Ok(mut c) = current.lock() {
            c.world = None;
            c.control = None;
        }
    }
}

/// Waits until the coordinator announces a generation after `generation`.
fn wait_for_generation(
    session: &WorkerSession,
    generation: u64,
    timeout: Duration,
) -> Result<(), WorkerError> {
    let deadline = std::time::Instant::now() + timeout;
    while session.announced_generation() <= generation {
        if session.stopped() {
            return Ok(());
        }
        if let Some(why) = session.coordinator_lost() {
            return Err(WorkerError::CoordinatorLost(why));
        }
        if std::time::Instant::now() >= deadline {
            return Err(WorkerError::Comm(format!(
                "generation {generation} stopped at a checkpoint, and no new generation came within {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The longest a shard report retries an unreachable coordinator (the heartbeats usually
/// call it lost sooner).
const SHARD_REPORT_RETRY: Duration = Duration::from_secs(60);

/// A failed call to the coordinator: unreachable means the coordinator is lost.
fn coordinator_error(e: CoordinatorError, what: &str) -> WorkerError {
    match e {
        CoordinatorError::Unavailable(_) => WorkerError::CoordinatorLost(format!("{what}: {e}")),
        e => WorkerError::Comm(format!("{what}: {e}")),
    }
}

enum GenerationEnd {
    Done,
    Stopped,
}

/// The device a worker computes a generation on: the one it registered with, except that a
/// tcp job whose config says `train.device = "cpu"` (the default) stays on the CPU when the
/// worker chose its device itself (`--device auto` on a machine with GPUs). The tcp backend
/// moves CPU and CUDA tensors alike (CUDA staged through pinned host memory), so a tcp job
/// that asks for `cuda` runs its ranks on the machine's GPUs — several ranks sharing one GPU
/// is how the GPU check tests layouts on one H200. An nccl job always takes the worker's GPU.
fn generation_device(auto: bool, backend: Backend, job_device: &str, registered: &str) -> String {
    if auto && backend == Backend::Tcp && job_device == "cpu" {
        "cpu".into()
    } else {
        registered.to_string()
    }
}

fn run_generation(
    opts: &AgentOptions,
    session: &Arc<WorkerSession>,
    current: &Arc<Mutex<Current>>,
    a: &Assignment,
    sigterm: &AtomicBool,
) -> Result<GenerationEnd, WorkerError> {
    let mut job = a
        .config()
        .map_err(|e| WorkerError::Other(format!("the assignment's config: {e}")))?;
    job.train.device = generation_device(
        opts.device_auto,
        job.parallel.backend,
        &job.train.device,
        &opts.info.device,
    );
    let world = build_world(&job, a, session, opts)?;
    if let Ok(mut c) = current.lock() {
        c.running = a.generation;
        c.world = Some(world.clone());
        if c.is_aborted() {
            // The Abort came while this generation's communicator was being built.
            world.abort();
        }
    }
    if job.file.infer.enabled() {
        return run_inference(session, current, a, sigterm, &job, world);
    }
    let metrics: Box<dyn MetricsSink> = Box::new(SessionMetrics {
        session: session.clone(),
        rank: a.rank,
    });
    let mut trainer = ParallelTrainer::new(
        job.clone(),
        RankSetup {
            world,
            run_dir: opts.run_dir.clone(),
            local_procs: opts.local_procs.unwrap_or(a.local_world_size.max(1)),
            progress: false,
            metrics: Some(metrics),
        },
    )?;
    let control = trainer.control();
    if let Ok(mut c) = current.lock() {
        c.control = Some(control.clone());
    }
    if sigterm.load(Ordering::SeqCst) {
        control.request_stop();
    }
    if !job.checkpoint.url.is_empty() {
        trainer.enable_checkpoints(Arc::new(SessionSink(session.clone(), control.clone())))?;
    }
    if let Some(url) = &a.resume_from {
        let ckpt = open_resume(url, &job.checkpoint.url)?;
        trainer.resume(ckpt)?;
    }
    let summary = trainer.run()?;
    if summary.preempted {
        return Ok(GenerationEnd::Stopped);
    }
    let mut s = serde_json::Map::new();
    s.insert("final_loss".into(), summary.final_loss.into());
    s.insert("wall_s".into(), summary.wall_s.into());
    if let Some(e) = &summary.eval {
        s.insert("i2t_r1".into(), e.i2t_r1.into());
        s.insert("t2i_r1".into(), e.t2i_r1.into());
        s.insert("i2t_r5".into(), e.i2t_r5.into());
        s.insert("i2t_r10".into(), e.i2t_r10.into());
        s.insert("t2i_r5".into(), e.t2i_r5.into());
        s.insert("t2i_r10".into(), e.t2i_r10.into());
        s.insert("caption_exact".into(), e.caption_exact.into());
    }
    session
        .report_done(summary.steps, s)
        .map_err(|e| coordinator_error(e, "reporting completion"))?;
    Ok(GenerationEnd::Done)
}

/// A generation of an inference job (`[infer]`): this rank's part of the model, its
/// replica's input shards (those without a progress marker), one step report per shard
/// (the step counts the replica's finished shards), done when they are all committed.
/// A stop (SIGTERM, the coordinator) ends it between shards; the next generation, or a
/// new run, continues with the shards not yet committed.
fn run_inference(
    session: &Arc<WorkerSession>,
    current: &Arc<Mutex<Current>>,
    a: &Assignment,
    sigterm: &AtomicBool,
    job: &JobConfig,
    world: Arc<dyn Communicator>,
) -> Result<GenerationEnd, WorkerError> {
    let mut rank = crate::infer::InferRank::new(job, world)?;
    let control = Arc::new(Control::default());
    if let Ok(mut c) = current.lock() {
        c.control = Some(control.clone());
    }
    if sigterm.load(Ordering::SeqCst) {
        control.request_stop();
    }
    let writes = rank.writes();
    let mut finished = 0u64;
    let stop = || control.stop_requested();
    let summary = rank.run(&stop, &mut |d| {
        finished += 1;
        if writes {
            let mut extra = serde_json::Map::new();
            extra.insert("infer_shard".into(), d.name.clone().into());
            extra.insert("samples".into(), d.samples.into());
            extra.insert("skipped".into(), d.skipped.into());
            extra.insert("bad_samples".into(), d.bad_samples.into());
            extra.insert("seconds".into(), d.seconds.into());
            extra.insert("rank".into(), a.rank.into());
            session.report_step(CoordMetrics {
                step: finished,
                extra,
                ..CoordMetrics::default()
            });
        }
    })?;
    if summary.stopped {
        return Ok(GenerationEnd::Stopped);
    }
    let mut s = serde_json::Map::new();
    if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(&summary) {
        for (k, v) in m {
            s.insert(format!("infer_{k}"), v);
        }
    }
    session
        .report_done(finished, s)
        .map_err(|e| coordinator_error(e, "reporting completion"))?;
    Ok(GenerationEnd::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_job_runs_where_its_config_asks_when_the_worker_chose_its_device() {
        // `--device auto` on a machine with a GPU registers cuda:K.
        assert_eq!(
            generation_device(true, Backend::Tcp, "cpu", "cuda:1"),
            "cpu"
        );
        assert_eq!(
            generation_device(true, Backend::Tcp, "cuda", "cuda:1"),
            "cuda:1"
        );
        assert_eq!(
            generation_device(true, Backend::Tcp, "cuda:0", "cuda:1"),
            "cuda:1"
        );
        assert_eq!(
            generation_device(true, Backend::Nccl, "cpu", "cuda:1"),
            "cuda:1"
        );
        // An explicit `--device` always wins; a machine without GPUs registers cpu.
        assert_eq!(
            generation_device(false, Backend::Tcp, "cpu", "cuda:0"),
            "cuda:0"
        );
        assert_eq!(generation_device(true, Backend::Tcp, "cuda", "cpu"), "cpu");
    }
}
