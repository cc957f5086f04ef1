//! The gRPC server: [`Coordinator`] owns the job state machine ([`crate::job`]), the
//! rendezvous store and the metrics file behind an `Arc`, and serves them on a listener the
//! caller bound (tests bind `127.0.0.1:0`), with tonic-health beside it, the job token
//! checked on every call, and TLS when a certificate and key are configured.
//!
//! Long waits (assignment, rendezvous keys, control events) wake on `watch` channels that
//! the state machine's changes publish; nothing polls. A ticker drives the time-based
//! transitions (heartbeat and gather timeouts).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use weaver_config::mesh::ModelLimits;
use weaver_config::JobConfig;

use crate::error::{CoordinatorError, Result};
use crate::job::{
    default_limits, even_stages, Effect, Job, JobSpec, Policy, ResumePoint, StagePlanner,
};
use crate::kv::Kv;
use crate::metrics::MetricsFile;
use crate::pb;
use crate::pb::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use crate::prometheus::JobMetrics;
use crate::token::{CheckToken, JobToken};
use crate::JobOutcome;

pub use crate::client::MAX_WAIT;
pub use crate::types::CheckpointCommitter;

/// The gRPC service name (for health checks).
pub const SERVICE_NAME: &str = "weaver.v1.Coordinator";

/// A PEM certificate chain and private key for the server's TLS.
#[derive(Clone)]
pub struct TlsIdentity {
    /// Certificate chain (PEM).
    pub cert_pem: Vec<u8>,
    /// Private key (PEM).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity { key: <redacted> }")
    }
}

impl TlsIdentity {
    /// Reads the two PEM files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<TlsIdentity> {
        let read = |p: &Path| {
            std::fs::read(p)
                .map_err(|e| CoordinatorError::Tls(format!("cannot read {}: {e}", p.display())))
        };
        Ok(TlsIdentity {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }
}

/// Everything a coordinator needs besides a listener.
#[derive(Clone)]
pub struct CoordinatorOptions {
    /// The job.
    pub config: JobConfig,
    /// The job token workers must present.
    pub token: JobToken,
    /// What the layout must divide (default: [`default_limits`], the model config's limits).
    pub limits: ModelLimits,
    /// Layer range of each pipeline stage (default: the limits' layers split evenly).
    pub stage_planner: StagePlanner,
    /// Commits checkpoints (none: shard reports are only logged).
    pub committer: Option<Arc<dyn CheckpointCommitter>>,
    /// Timeouts and restarts.
    pub policy: Policy,
    /// Where `metrics.jsonl` goes (none: no file).
    pub run_dir: Option<PathBuf>,
    /// Checkpoint the first generation resumes from.
    pub resume_from: Option<ResumePoint>,
    /// Serve TLS with this identity.
    pub tls: Option<TlsIdentity>,
    /// How long the server stays up after the job ends so that workers get their `Stop`
    /// event and last replies (it leaves earlier once every watcher has gone).
    pub linger: Duration,
    /// Where the launcher serves `/metrics` for Prometheus (none: nowhere); see
    /// [`Coordinator::serve_metrics`].
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// On SIGTERM (preemption) the launcher asks every rank for a checkpoint and waits at
    /// most this long for its commit before stopping (see
    /// [`Coordinator::checkpoint_and_stop`]); keep it under the scheduler's kill delay
    /// (SLURM's KillWait, Kubernetes' terminationGracePeriodSeconds). Default 25 s.
    pub preempt_grace: Duration,
}

impl std::fmt::Debug for CoordinatorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorOptions")
            .field("parallel", &self.config.parallel)
            .field("token", &self.token)
            .field("limits", &self.limits)
            .field("committer", &self.committer)
            .field("policy", &self.policy)
            .field("run_dir", &self.run_dir)
            .field("resume_from", &self.resume_from)
            .field("tls", &self.tls)
            .field("linger", &self.linger)
            .field("metrics_listen", &self.metrics_listen)
            .field("preempt_grace", &self.preempt_grace)
            .finish_non_exhaustive()
    }
}

impl CoordinatorOptions {
    /// Defaults: the model config's limits, even stages, default policy, no run dir, no TLS.
    pub fn new(config: JobConfig, token: JobToken) -> CoordinatorOptions {
        let limits = default_limits(&config);
        let layers = limits.layers;
        CoordinatorOptions {
            config,
            token,
            limits,
            stage_planner: Arc::new(move |_: &JobConfig, pp| Ok(even_stages(layers, pp))),
            committer: None,
            policy: Policy::default(),
            run_dir: None,
            resume_from: None,
            tls: None,
            linger: Duration::from_secs(3),
            metrics_listen: None,
            preempt_grace: Duration::from_secs(25),
        }
    }
}

struct Shared {
    job: Mutex<Job>,
    kv: Kv,
    events: watch::Sender<u64>,
    version: watch::Sender<u64>,
    generation: AtomicU64,
    metrics: Mutex<Option<MetricsFile>>,
    /// Where `metrics.jsonl` and the effective `config.toml` go.
    run_dir: Option<PathBuf>,
    prom: JobMetrics,
    committer: Option<Arc<dyn CheckpointCommitter>>,
    token: JobToken,
    tls: Option<TlsIdentity>,
    linger: Duration,
    watchers: AtomicUsize,
}

/// A job's coordinator. Cheap to clone (a handle on shared state).
#[derive(Clone)]
pub struct Coordinator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let job = self.shared.lock();
        f.debug_struct("Coordinator")
            .field("phase", &job.phase())
            .field("generation", &job.generation())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Job> {
        // The state machine never leaves a half-made change behind a panic in a way that
        // matters more than stopping the whole job would; keep serving.
        self.job.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the job, then publishes what changed and carries out its effects.
    fn update<T>(self: &Arc<Self>, f: impl FnOnce(&mut Job, Instant) -> T) -> T {
        let (out, effects, seq, version, generation) = {
            let mut job = self.lock();
            let out = f(&mut job, Instant::now());
            (
                out,
                job.drain_effects(),
                job.latest_event_seq(),
                job.version(),
                job.generation(),
            )
        };
        self.events
            .send_if_modified(|v| std::mem::replace(v, seq) != seq);
        self.version
            .send_if_modified(|v| std::mem::replace(v, version) != version);
        if self.generation.swap(generation, Ordering::Relaxed) != generation {
            self.kv.forget_before(generation.saturating_sub(1));
        }
        let mut lines = Vec::new();
        for e in effects {
            match e {
                Effect::Metrics(l) => {
                    self.prom.observe_line(&l);
                    lines.push(l);
                }
                Effect::Commit(c) => self.commit(c),
                Effect::Config(toml) => self.save_config(&toml),
            }
        }
        if !lines.is_empty() {
            let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(m) = m.as_mut() {
                m.write(&lines);
            }
        }
        out
    }

    /// Writes a generation's effective config to `<run dir>/config.toml`.
    fn save_config(&self, toml: &str) {
        let Some(dir) = &self.run_dir else {
            return;
        };
        let path = dir.join("config.toml");
        if let Err(e) = std::fs::write(&path, toml) {
            tracing::error!(path = %path.display(), "cannot write the effective config: {e}");
        }
    }

    fn commit(self: &Arc<Self>, c: crate::job::CommitRequest) {
        let Some(committer) = self.committer.clone() else {
            tracing::warn!(
                step = c.step,
                "every shard is durable but no committer is configured"
            );
            return;
        };
        let shared = self.clone();
        let run = move || {
            let step = c.step;
            let stats = committer.shard_stats(&c.reports);
            let started = Instant::now();
            let r = committer.commit(step, &c.layout, c.reports);
            match &r {
                Ok(_) => shared
                    .prom
                    .committed(step, &stats, started.elapsed().as_secs_f64()),
                Err(_) => shared.prom.commit_failed(),
            }
            shared.update(|job, now| job.commit_finished(step, r, now));
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(run);
            }
            Err(_) => run(),
        }
    }

    async fn finished(&self) {
        let mut rx = self.version.subscribe();
        loop {
            if self.lock().outcome().is_some() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Coordinator {
    /// Preemption (SIGTERM): asks every rank to checkpoint at the earliest step they can
    /// all still take and stop there, then waits, at most `grace`, until a checkpoint newer
    /// than the last one committed at the call is committed (the workers' own SIGTERM
    /// checkpoint counts too) or the job ends. Returns the step of that checkpoint; `None`
    /// when no new checkpoint was committed in time (the job then resumes from the last
    /// one, losing the steps since) or none could be asked for (the job is not training).
    pub async fn checkpoint_and_stop(&self, grace: Duration) -> Option<u64> {
        let before = self.shared.lock().resume_point().map(|r| r.step);
        match self.shared.update(|job, _| job.request_stop_checkpoint()) {
            Ok(step) => tracing::warn!(step, "checkpointing at step {step} before stopping"),
            // Too close to the end, say: while the job trains, the workers' own SIGTERM
            // checkpoint (if they were signalled too) may still come, so wait for it all
            // the same; a job that is not training has nothing to save.
            Err(e) => {
                tracing::warn!("cannot ask for a checkpoint before stopping: {e}");
                if self.shared.lock().phase() != crate::job::Phase::Running {
                    return None;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            {
                let job = self.shared.lock();
                let now = job.resume_point().map(|r| r.step);
                if now > before {
                    return now;
                }
                if job.outcome().is_some() {
                    return None;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Validates the job (layout against the model, stage plan) and prepares the run
    /// directory. Refuses impossible layouts here, before any worker is waited for, and a
    /// new job (no resume point) whose checkpoint URL already holds committed checkpoints
    /// ([`CoordinatorError::CheckpointUrlTaken`]): the job's later generations resume from
    /// its own checkpoints, but a new job there would fail at its first commit.
    pub fn new(options: CoordinatorOptions) -> Result<Coordinator> {
        if let (None, Some(c)) = (&options.resume_from, &options.committer) {
            let newest = c
                .newest_committed()
                .map_err(|message| CoordinatorError::Io {
                    path: c.url(),
                    message,
                })?;
            if let Some(step) = newest {
                return Err(CoordinatorError::CheckpointUrlTaken { url: c.url(), step });
            }
        }
        let (tensorboard, total_steps) =
            (options.config.train.tensorboard, options.config.train.steps);
        let spec = JobSpec::new(options.config, options.limits, &options.stage_planner)?;
        if options.policy.heartbeat_timeout <= options.policy.heartbeat_interval {
            return Err(CoordinatorError::BadConfig(format!(
                "the heartbeat timeout ({:?}) must exceed the heartbeat interval ({:?})",
                options.policy.heartbeat_timeout, options.policy.heartbeat_interval
            )));
        }
        let metrics = match &options.run_dir {
            Some(dir) => Some(MetricsFile::open(dir, tensorboard)?),
            None => None,
        };
        let job = Job::new(spec, options.policy, options.resume_from, Instant::now());
        Ok(Coordinator {
            shared: Arc::new(Shared {
                job: Mutex::new(job),
                kv: Kv::default(),
                events: watch::channel(0).0,
                version: watch::channel(0).0,
                generation: AtomicU64::new(1),
                metrics: Mutex::new(metrics),
                run_dir: options.run_dir.clone(),
                prom: JobMetrics::new(total_steps),
                committer: options.committer,
                token: options.token,
                tls: options.tls,
                linger: options.linger,
                watchers: AtomicUsize::new(0),
            }),
        })
    }

    /// Serves until the job ends (then lingers briefly, see
    /// [`CoordinatorOptions::linger`]) or `shutdown` resolves (then the job fails with
    /// "stopped" and workers are told to stop). Returns how the job ended.
    pub async fn serve<F>(&self, listener: TcpListener, shutdown: F) -> Result<JobOutcome>
    where
        F: Future<Output = ()> + Send,
    {
        let shared = self.shared.clone();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving)
            .await;
        let service = CoordinatorServer::with_interceptor(
            CoordinatorService {
                shared: shared.clone(),
            },
            CheckToken(shared.token.clone()),
        );
        let mut builder = Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        if let Some(tls) = &shared.tls {
            builder = builder
                .tls_config(
                    ServerTlsConfig::new()
                        .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem)),
                )
                .map_err(|e| CoordinatorError::Tls(e.to_string()))?;
        }
        let ticker = tokio::spawn(ticker(shared.clone()));
        let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
        let stopper = shared.clone();
        let stop = async move {
            tokio::select! {
                () = shutdown => {
                    stopper.update(|job, now| {
                        job.fail("the coordinator was stopped before the job ended".into(), now)
                    });
                }
                () = stopper.finished() => {}
            }
            reporter
                .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::NotServing)
                .await;
            // Let workers read their Stop event and last replies.
            let deadline = tokio::time::Instant::now() + stopper.linger;
            while stopper.watchers.load(Ordering::Relaxed) > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = fired_tx.send(());
        };
        let server = builder
            .add_service(health)
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop);
        tokio::pin!(server);
        // Graceful shutdown waits for open calls; a client holding one past the drain
        // time does not keep the coordinator alive.
        let served = tokio::select! {
            r = &mut server => r.map_err(|e| CoordinatorError::Unavailable(format!("server: {e}"))),
            () = async {
                if fired_rx.await.is_ok() {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => Ok(()),
        };
        ticker.abort();
        served?;
        Ok(self.outcome().unwrap_or_else(|| JobOutcome::Failed {
            reason: "the coordinator's server stopped before the job ended".into(),
        }))
    }

    /// Serves the job's metrics for Prometheus (`GET /metrics`, OpenMetrics text; see the
    /// [`crate::prometheus`] module) on `listener` until `shutdown` resolves. Each
    /// connection gets at most 30 s.
    pub async fn serve_metrics<F>(&self, listener: TcpListener, shutdown: F)
    where
        F: Future<Output = ()> + Send,
    {
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!("metrics endpoint: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let shared = self.shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let reply = metrics_reply(&shared, &req);
                    async move { Ok::<_, std::convert::Infallible>(reply) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            });
        }
    }

    /// The metrics text as `GET /metrics` returns it (after refreshing the job's state).
    pub fn metrics_text(&self) -> String {
        let (status, timeout) = {
            let job = self.shared.lock();
            (job.status(Instant::now()), job.policy().heartbeat_timeout)
        };
        self.shared
            .prom
            .refresh(&status, timeout.as_millis() as u64);
        self.shared.prom.encode()
    }

    /// How the job ended, once it has.
    pub fn outcome(&self) -> Option<JobOutcome> {
        self.shared.lock().outcome()
    }

    /// Waits until the job has ended.
    pub async fn wait_finished(&self) -> JobOutcome {
        self.shared.finished().await;
        self.outcome().unwrap_or_else(|| JobOutcome::Failed {
            reason: "the coordinator went away".into(),
        })
    }

    /// The operator's view (what `weaver status` prints).
    pub fn status(&self) -> pb::StatusResponse {
        self.shared.lock().status(Instant::now())
    }

    /// The launcher saw a worker process exit early: treat it as lost now rather than
    /// after the heartbeat timeout.
    pub fn worker_exited(&self, host: &str, local_rank: u32, how: &str) {
        self.shared
            .update(|job, now| job.worker_exited(host, local_rank, how, now));
    }

    /// Fails the job (e.g. the launcher cannot replace a worker).
    pub fn fail(&self, reason: &str) {
        self.shared
            .update(|job, now| job.fail(reason.to_string(), now));
    }

    /// New generations started so far, and the limit.
    pub fn restarts(&self) -> (u32, u32) {
        let job = self.shared.lock();
        (job.restarts(), job.policy().max_restarts)
    }

    /// The job token (for handing to local workers).
    pub fn token(&self) -> &JobToken {
        &self.shared.token
    }
}

async fn ticker(shared: Arc<Shared>) {
    let timeout = shared.lock().policy().heartbeat_timeout;
    let period = (timeout / 6).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let over = shared.update(|job, now| {
            job.tick(now);
            job.outcome().is_some()
        });
        if over {
            return;
        }
    }
}

/// OpenMetrics' content type (Prometheus negotiates it; the text is also valid for parsers of
/// the older Prometheus text format).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn metrics_reply<B>(
    shared: &Arc<Shared>,
    req: &hyper::Request<B>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let (code, kind, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            hyper::StatusCode::OK,
            OPENMETRICS,
            Coordinator {
                shared: shared.clone(),
            }
            .metrics_text(),
        ),
        (&hyper::Method::GET, "/") => (
            hyper::StatusCode::OK,
            "text/plain; charset=utf-8",
            "weaver coordinator: metrics at /metrics\n".to_string(),
        ),
        _ => (
            hyper::StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the metrics are at GET /metrics\n".to_string(),
        ),
    };
    let mut reply = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *reply.status_mut() = code;
    reply.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    reply
}

/// The tonic service: a plain struct over the shared state.
struct CoordinatorService {
    shared: Arc<Shared>,
}

fn reply<T>(r: Result<T>) -> std::result::Result<Response<T>, Status> {
    r.map(Response::new).map_err(CoordinatorError::into_status)
}

fn wait_of(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms)).min(MAX_WAIT)
}

struct WatchGuard(Arc<Shared>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> std::result::Result<Response<pb::RegisterResponse>, Status> {
        let info = req
            .into_inner()
            .info
            .ok_or_else(|| CoordinatorError::InvalidRequest("Register without worker info".into()));
        reply(info.and_then(|info| self.shared.update(|job, now| job.register(info, now))))
    }

    async fn get_assignment(
        &self,
        req: Request<pb::GetAssignmentRequest>,
    ) -> std::result::Result<Response<pb::Assignment>, Status> {
        let req = req.into_inner();
        let wait = wait_of(req.wait_ms);
        let deadline = tokio::time::Instant::now() + wait;
        let mut version = self.shared.version.subscribe();
        loop {
            match self
                .shared
                .update(|job, now| job.assignment(req.worker_id, now))
            {
                Ok(Some(a)) => return reply(Ok(a)),
                Ok(None) => {}
                Err(e) => return reply(Err(e)),
            }
            match tokio::time::timeout_at(deadline, version.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return reply(Err(CoordinatorError::Unavailable(
                        "the coordinator is stopping".into(),
                    )))
                }
                Err(_) => {
                    let (n, expected) = {
                        let job = self.shared.lock();
                        (job.registered(), job.expected())
                    };
                    return reply(Err(CoordinatorError::Timeout {
                        op: format!("assignment ({n} of {expected} workers registered)"),
                        after: wait,
                    }));
                }
            }
        }
    }

    type WatchStream = ReceiverStream<std::result::Result<pb::ControlEvent, Status>>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> std::result::Result<Response<Self::WatchStream>, Status> {
        let mut after = req.into_inner().after_seq;
        let (tx, rx) = mpsc::channel(16);
        let shared = self.shared.clone();
        shared.watchers.fetch_add(1, Ordering::Relaxed);
        let guard = WatchGuard(shared.clone());
        let mut seq = shared.events.subscribe();
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                let pending: Vec<pb::ControlEvent> = shared.lock().events_after(after).to_vec();
                for e in pending {
                    after = e.seq;
                    let last = matches!(e.kind, Some(pb::control_event::Kind::Stop(_)));
                    if tx.send(Ok(e)).await.is_err() || last {
                        return;
                    }
                }
                tokio::select! {
                    r = seq.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> std::result::Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        reply(Ok(self.shared.update(|job, now| {
            job.heartbeat(r.worker_id, &r.steps, r.seen_event_seq, now)
        })))
    }

    async fn kv_set(
        &self,
        req: Request<pb::KvSetRequest>,
    ) -> std::result::Result<Response<pb::KvSetResponse>, Status> {
        let r = req.into_inner();
        reply(
            self.shared
                .kv
                .set(&r.key, r.value)
                .map(|()| pb::KvSetResponse {}),
        )
    }

    async fn kv_get(
        &self,
        req: Request<pb::KvGetRequest>,
    ) -> std::result::Result<Response<pb::KvGetResponse>, Status> {
        let r = req.into_inner();
        let got = tokio::select! {
            v = self.shared.kv.get(&r.key, wait_of(r.wait_ms)) => v,
            () = self.shared.finished() => Err(self.shared.lock().outcome().map_or_else(
                || CoordinatorError::Unavailable("the coordinator is stopping".into()),
                |o| match o {
                    JobOutcome::Completed { .. } => CoordinatorError::JobCompleted(o.to_string()),
                    JobOutcome::Failed { reason } => CoordinatorError::JobFailed(reason),
                },
            )),
        };
        reply(got.map(|value| pb::KvGetResponse { value }))
    }

    async fn kv_add(
        &self,
        req: Request<pb::KvAddRequest>,
    ) -> std::result::Result<Response<pb::KvAddResponse>, Status> {
        let r = req.into_inner();
        reply(
            self.shared
                .kv
                .add(&r.key, r.delta)
                .map(|value| pb::KvAddResponse { value }),
        )
    }

    async fn report_shard(
        &self,
        req: Request<pb::ReportShardRequest>,
    ) -> std::result::Result<Response<pb::ReportShardResponse>, Status> {
        let r = req.into_inner();
        reply(
            self.shared
                .update(|job, _| job.report_shard(r.worker_id, r.step, r.report, r.stopping))
                .map(|(received, expected)| pb::ReportShardResponse { received, expected }),
        )
    }

    async fn report_error(
        &self,
        req: Request<pb::ReportErrorRequest>,
    ) -> std::result::Result<Response<pb::ReportErrorResponse>, Status> {
        let r = req.into_inner();
        self.shared
            .update(|job, now| job.report_error(r.worker_id, &r.message, r.retryable, now));
        reply(Ok(pb::ReportErrorResponse {}))
    }

    async fn report_done(
        &self,
        req: Request<pb::ReportDoneRequest>,
    ) -> std::result::Result<Response<pb::ReportDoneResponse>, Status> {
        let r = req.into_inner();
        reply(
            self.shared
                .update(|job, now| job.report_done(r.worker_id, r.step, &r.summary_json, now))
                .map(|()| pb::ReportDoneResponse {}),
        )
    }

    async fn save_checkpoint(
        &self,
        _req: Request<pb::SaveCheckpointRequest>,
    ) -> std::result::Result<Response<pb::SaveCheckpointResponse>, Status> {
        reply(
            self.shared
                .update(|job, _| job.request_save())
                .map(|step| pb::SaveCheckpointResponse { step }),
        )
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> std::result::Result<Response<pb::StatusResponse>, Status> {
        reply(Ok(self.shared.lock().status(Instant::now())))
    }

    async fn shutdown(
        &self,
        req: Request<pb::ShutdownRequest>,
    ) -> std::result::Result<Response<pb::ShutdownResponse>, Status> {
        let reason = req.into_inner().reason;
        let reason = if reason.is_empty() {
            "shut down by operator request".to_string()
        } else {
            format!("shut down by operator request: {reason}")
        };
        self.shared.update(|job, now| job.fail(reason, now));
        reply(Ok(pb::ShutdownResponse {}))
    }
}
