//! The worker-side library: a blocking facade over the coordinator for a training process.
//!
//! ```no_run
//! # use weaver_rpc::*;
//! # use std::time::Duration;
//! # fn train() -> Result<(), CoordinatorError> {
//! let token = JobToken::from_env()?.expect("WEAVER_JOB_TOKEN");
//! let session = WorkerSession::connect(SessionOptions::new("http://10.0.0.1:29400", token))?;
//! session.register(WorkerInfo::cpu(&WorkerInfo::local_host_name(), 0))?;
//! let events = session.events();
//! loop {
//!     let a = session.wait_assignment(Duration::from_secs(300))?;
//!     let store = session.store(); // rendezvous for this generation's communicators
//!     // ... build the shard and communicators from `a`, then per step:
//!     session.report_step(StepMetrics { step: 1, loss: Some(2.3), ..Default::default() });
//!     // ... and between steps check `events.try_recv()`: Abort → abort the communicators
//!     // and loop; SaveAt → checkpoint; Stop → exit.
//!     # let _ = (store, &events);
//!     session.report_done(1, Default::default())?;
//!     break;
//! }
//! # Ok(()) }
//! ```
//!
//! The session owns a small tokio runtime (two threads): the heartbeat task (every
//! `heartbeat_interval`, carrying the steps reported since the last beat), the `Watch`
//! stream of control events (heartbeat replies carry them too, as a backup), and every
//! blocking call, which spawns its future there and waits on a channel — so the facade
//! works from any thread, including one that runs inside another runtime. Events reach
//! the trainer through [`WorkerSession::events`] receivers and [`WorkerSession::on_event`]
//! callbacks; the callbacks run on the session's threads, so a trainer blocked inside a
//! collective can still be told to abort its communicator.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use weaver_config::store::{Store, StoreError};

use crate::client::{ClientTls, CoordinatorClient, MAX_WAIT};
use crate::error::{CoordinatorError, Result};
use crate::pb;
use crate::token::JobToken;
use crate::types::{Assignment, ControlEvent, StepMetrics, WorkerInfo};

/// Where and how to reach the coordinator.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// `http://host:port`, `https://host:port` or `host:port`.
    pub url: String,
    /// The job token.
    pub token: JobToken,
    /// Trust for a TLS coordinator.
    pub tls: Option<ClientTls>,
    /// How long `register` keeps retrying while the coordinator is unreachable (workers
    /// may start before it listens).
    pub connect_timeout: Duration,
}

impl SessionOptions {
    /// Plain-text gRPC, a generous connect timeout (300 s).
    pub fn new(url: &str, token: JobToken) -> SessionOptions {
        SessionOptions {
            url: url.to_string(),
            token,
            tls: None,
            connect_timeout: Duration::from_secs(300),
        }
    }
}

/// What registration returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration {
    /// The id of this registration.
    pub worker_id: u64,
    /// The generation joined.
    pub generation: u64,
    /// Workers the job needs.
    pub expected_workers: u32,
    /// How often the session beats.
    pub heartbeat_interval: Duration,
    /// Silence after which the coordinator declares a worker lost.
    pub heartbeat_timeout: Duration,
}

/// A callback for control events.
pub type EventHook = Arc<dyn Fn(&ControlEvent) + Send + Sync>;

/// Keeps the runtime alive while a session or one of its stores exists; shuts it down
/// without blocking (safe from any context).
struct Rt(Option<tokio::runtime::Runtime>);

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

struct Inner {
    handle: tokio::runtime::Handle,
    client: CoordinatorClient,
    connect_timeout: Duration,
    instance: String,
    info: Mutex<Option<pb::WorkerInfo>>,
    reg: Mutex<Option<(Registration, bool)>>,
    /// The newest generation announced by an Abort (u64::MAX once stopped).
    announced: watch::Sender<u64>,
    seen: Mutex<u64>,
    pending: Mutex<Vec<pb::StepMetrics>>,
    subscribers: Mutex<Vec<mpsc::Sender<ControlEvent>>>,
    hooks: Mutex<Vec<EventHook>>,
    assignment: Mutex<Option<Assignment>>,
    stopped: AtomicBool,
    started: AtomicBool,
    /// Why the coordinator counts as lost (no heartbeat got through for the heartbeat
    /// timeout); cleared when one gets through again.
    lost: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Most step records kept while the coordinator is unreachable.
const MAX_PENDING: usize = 10_000;
/// How often a standing-by worker asks for an assignment again.
const STANDBY_POLL: Duration = Duration::from_secs(1);

impl Inner {
    fn block<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| CoordinatorError::Runtime("the session's runtime stopped".into()))
    }

    fn registration(&self) -> Option<Registration> {
        lock(&self.reg).map(|(r, _)| r)
    }

    fn dispatch(&self, ev: &ControlEvent) {
        let hooks: Vec<EventHook> = lock(&self.hooks).clone();
        for h in hooks {
            h(ev);
        }
        lock(&self.subscribers).retain(|s| s.send(ev.clone()).is_ok());
    }

    /// Delivers each event once, in sequence order, whichever path brought it.
    fn deliver(&self, e: &pb::ControlEvent) {
        let mut seen = lock(&self.seen);
        if e.seq <= *seen {
            return;
        }
        *seen = e.seq;
        let Some(ev) = ControlEvent::from_pb(e) else {
            return;
        };
        match &ev {
            ControlEvent::Abort { generation, .. } => {
                self.announced.send_if_modified(|g| {
                    let newer = *generation > *g;
                    *g = (*g).max(*generation);
                    newer
                });
            }
            ControlEvent::Stop { .. } => {
                self.stopped.store(true, Ordering::SeqCst);
                self.announced.send_replace(u64::MAX);
            }
            _ => {}
        }
        tracing::info!(?ev, "control event");
        self.dispatch(&ev);
    }

    async fn register_once(self: &Arc<Self>) -> Result<Registration> {
        let info = lock(&self.info).clone().ok_or_else(|| {
            CoordinatorError::InvalidRequest("register before waiting for an assignment".into())
        })?;
        let deadline = Instant::now() + self.connect_timeout;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.client.register(info.clone()).await {
                Ok(r) => {
                    let reg = Registration {
                        worker_id: r.worker_id,
                        generation: r.generation,
                        expected_workers: r.expected_workers,
                        heartbeat_interval: Duration::from_millis(u64::from(
                            r.heartbeat_interval_ms.max(1),
                        )),
                        heartbeat_timeout: Duration::from_millis(u64::from(
                            r.heartbeat_timeout_ms.max(1),
                        )),
                    };
                    {
                        let mut seen = lock(&self.seen);
                        *seen = (*seen).max(r.event_seq);
                    }
                    *lock(&self.reg) = Some((reg, false));
                    return Ok(reg);
                }
                Err(CoordinatorError::Unavailable(m)) if Instant::now() < deadline => {
                    tracing::debug!("coordinator not reachable yet ({m}); retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(CoordinatorError::Unavailable(m)) => {
                    return Err(CoordinatorError::Unavailable(format!(
                        "{m} (still unreachable after {:.0} s)",
                        self.connect_timeout.as_secs_f64()
                    )))
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn take_pending(&self) -> Vec<pb::StepMetrics> {
        std::mem::take(&mut *lock(&self.pending))
    }

    fn requeue(&self, mut steps: Vec<pb::StepMetrics>) {
        let mut p = lock(&self.pending);
        steps.append(&mut p);
        let excess = steps.len().saturating_sub(MAX_PENDING);
        steps.drain(..excess);
        *p = steps;
    }

    /// One heartbeat with everything pending.
    async fn beat(self: &Arc<Self>, reg: Registration) -> Result<()> {
        let steps = self.take_pending();
        let req = pb::HeartbeatRequest {
            worker_id: reg.worker_id,
            steps: steps.clone(),
            seen_event_seq: *lock(&self.seen),
        };
        let r = tokio::time::timeout(reg.heartbeat_timeout, self.client.heartbeat(req)).await;
        match r {
            Ok(Ok(resp)) => {
                for e in &resp.events {
                    self.deliver(e);
                }
                if resp.stale {
                    if let Some((r, stale)) = lock(&self.reg).as_mut() {
                        if r.worker_id == reg.worker_id {
                            *stale = true;
                        }
                    }
                    // A new generation dropped this registration, and the coordinator did
                    // not record the steps: they go again, with their generation, once
                    // this worker has registered anew.
                    self.requeue(steps);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                self.requeue(steps);
                Err(e)
            }
            Err(_) => {
                self.requeue(steps);
                Err(CoordinatorError::Timeout {
                    op: "heartbeat".into(),
                    after: reg.heartbeat_timeout,
                })
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut last_ok = Instant::now();
        let mut lost = false;
        loop {
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            let Some(reg) = self.registration() else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let next = tokio::time::Instant::now() + reg.heartbeat_interval;
            match self.beat(reg).await {
                Ok(()) => {
                    last_ok = Instant::now();
                    lost = false;
                    *lock(&self.lost) = None;
                }
                Err(e) => {
                    if !lost
                        && last_ok.elapsed() > reg.heartbeat_timeout
                        && !self.stopped.load(Ordering::SeqCst)
                    {
                        lost = true;
                        let reason = format!(
                            "no heartbeat got through for {:.1} s: {e}",
                            last_ok.elapsed().as_secs_f64()
                        );
                        *lock(&self.lost) = Some(reason.clone());
                        let ev = ControlEvent::CoordinatorLost { reason };
                        tracing::error!(?ev, "coordinator lost");
                        self.dispatch(&ev);
                    }
                }
            }
            tokio::time::sleep_until(next).await;
        }
    }

    async fn watch_loop(self: Arc<Self>) {
        loop {
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            let Some(reg) = self.registration() else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let after = *lock(&self.seen);
            if let Ok(mut stream) = self.client.watch(reg.worker_id, after).await {
                while let Ok(Some(e)) = stream.message().await {
                    self.deliver(&e);
                }
            }
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A training process's connection to its coordinator. See the module documentation.
pub struct WorkerSession {
    inner: Arc<Inner>,
    rt: Arc<Rt>,
}

impl std::fmt::Debug for WorkerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSession")
            .field("registration", &self.inner.registration())
            .finish_non_exhaustive()
    }
}

impl WorkerSession {
    /// Starts the session's runtime and a lazy connection (no I/O yet).
    pub fn connect(options: SessionOptions) -> Result<WorkerSession> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("weaver-session")
            .enable_all()
            .build()
            .map_err(|e| {
                CoordinatorError::Runtime(format!("cannot start the session runtime: {e}"))
            })?;
        let handle = rt.handle().clone();
        let client = {
            let _enter = handle.enter();
            CoordinatorClient::connect_lazy(&options.url, &options.token, options.tls.as_ref())?
        };
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce)
            .map_err(|e| CoordinatorError::Runtime(format!("no OS randomness: {e}")))?;
        let instance = format!(
            "{}-{}",
            std::process::id(),
            nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        Ok(WorkerSession {
            inner: Arc::new(Inner {
                handle,
                client,
                connect_timeout: options.connect_timeout,
                instance,
                info: Mutex::new(None),
                reg: Mutex::new(None),
                announced: watch::channel(0).0,
                seen: Mutex::new(0),
                pending: Mutex::new(Vec::new()),
                subscribers: Mutex::new(Vec::new()),
                hooks: Mutex::new(Vec::new()),
                assignment: Mutex::new(None),
                stopped: AtomicBool::new(false),
                lost: Mutex::new(None),
                started: AtomicBool::new(false),
            }),
            rt: Arc::new(Rt(Some(rt))),
        })
    }

    /// Registers for the current generation (retrying while the coordinator is not up
    /// yet) and starts heartbeating and watching for control events.
    pub fn register(&self, info: WorkerInfo) -> Result<Registration> {
        *lock(&self.inner.info) = Some(info.to_pb(&self.inner.instance));
        let inner = self.inner.clone();
        let reg = self
            .inner
            .block(async move { inner.register_once().await })??;
        if !self.inner.started.swap(true, Ordering::SeqCst) {
            self.inner.handle.spawn(self.inner.clone().heartbeat_loop());
            self.inner.handle.spawn(self.inner.clone().watch_loop());
        }
        Ok(reg)
    }

    /// The current registration.
    pub fn registration(&self) -> Option<Registration> {
        self.inner.registration()
    }

    /// Waits for this worker's assignment in the current generation, registering again
    /// first when an `Abort` announced a newer generation. Fails with
    /// [`CoordinatorError::Timeout`] after `timeout`, and at once when the job is over.
    ///
    /// A worker the generation does not need (an elastic job shrank, or it came back after
    /// the generation was planned) stands by: it keeps heartbeating and asking, and joins
    /// the next generation that gathers, or stops when the job ends. While the coordinator
    /// answers that, `timeout` starts again: the wait is bounded by the job's life.
    pub fn wait_assignment(&self, timeout: Duration) -> Result<Assignment> {
        let mut deadline = Instant::now() + timeout;
        let mut standing_by = false;
        loop {
            let (reg, stale) = lock(&self.inner.reg)
                .ok_or_else(|| CoordinatorError::InvalidRequest("call register() first".into()))?;
            if let Some(why) = self.coordinator_lost() {
                return Err(CoordinatorError::Unavailable(format!(
                    "the coordinator is lost: {why}"
                )));
            }
            let announced = *self.inner.announced.borrow();
            if announced == u64::MAX {
                return Err(CoordinatorError::JobFailed(
                    "the coordinator told this worker to stop".into(),
                ));
            }
            let reg = if stale || reg.generation < announced {
                let inner = self.inner.clone();
                match self
                    .inner
                    .block(async move { inner.register_once().await })?
                {
                    Ok(reg) => reg,
                    Err(CoordinatorError::JobFull(m)) => {
                        self.stand_by(&m, &mut standing_by, &mut deadline, timeout);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                reg
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let client = self.inner.client.clone();
            let r = self.inner.block(async move {
                client
                    .get_assignment(reg.worker_id, remaining.min(MAX_WAIT))
                    .await
            })?;
            match r {
                Ok(a) => {
                    let a = Assignment::from_pb(a)?;
                    *lock(&self.inner.assignment) = Some(a.clone());
                    return Ok(a);
                }
                Err(CoordinatorError::StaleWorker(_)) => {
                    if let Some((_, s)) = lock(&self.inner.reg).as_mut() {
                        *s = true;
                    }
                }
                Err(CoordinatorError::Timeout { op, .. }) if Instant::now() >= deadline => {
                    return Err(CoordinatorError::Timeout {
                        op: format!("waiting for an assignment: {op}"),
                        after: timeout,
                    })
                }
                Err(CoordinatorError::Timeout { .. }) => {}
                Err(CoordinatorError::JobFull(m)) => {
                    self.stand_by(&m, &mut standing_by, &mut deadline, timeout)
                }
                Err(CoordinatorError::Unavailable(m)) => {
                    if Instant::now() >= deadline {
                        return Err(CoordinatorError::Unavailable(m));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One round of standing by (see [`WorkerSession::wait_assignment`]).
    fn stand_by(&self, why: &str, logged: &mut bool, deadline: &mut Instant, timeout: Duration) {
        if !*logged {
            tracing::info!("standing by: {why}");
            *logged = true;
        }
        *deadline = Instant::now() + timeout;
        std::thread::sleep(STANDBY_POLL);
    }

    /// The latest assignment received.
    pub fn assignment(&self) -> Option<Assignment> {
        lock(&self.inner.assignment).clone()
    }

    /// A receiver of every control event from now on.
    pub fn events(&self) -> mpsc::Receiver<ControlEvent> {
        let (tx, rx) = mpsc::channel();
        lock(&self.inner.subscribers).push(tx);
        rx
    }

    /// Calls `hook` on every control event, on the session's thread (keep it short: e.g.
    /// abort the communicators so that a rank stuck in a collective returns). A hook must
    /// not call the session's blocking methods: it runs on the threads they wait for.
    pub fn on_event(&self, hook: impl Fn(&ControlEvent) + Send + Sync + 'static) {
        lock(&self.inner.hooks).push(Arc::new(hook));
    }

    /// Queues a step's metrics for the next heartbeat; never blocks.
    pub fn report_step(&self, metrics: StepMetrics) {
        let mut m = metrics.to_pb();
        // Stamped with the generation training now, so that steps still pending when it
        // ends are not taken for the next generation's.
        m.generation = lock(&self.inner.assignment)
            .as_ref()
            .map_or(0, |a| a.generation);
        let mut p = lock(&self.inner.pending);
        if p.len() >= MAX_PENDING {
            p.remove(0);
        }
        p.push(m);
    }

    fn worker_id(&self) -> Result<u64> {
        self.inner
            .registration()
            .map(|r| r.worker_id)
            .ok_or_else(|| CoordinatorError::InvalidRequest("not registered".into()))
    }

    /// Sends the queued metrics now (instead of at the next beat).
    pub fn flush(&self) -> Result<()> {
        let reg = self
            .inner
            .registration()
            .ok_or_else(|| CoordinatorError::InvalidRequest("not registered".into()))?;
        let inner = self.inner.clone();
        self.inner.block(async move { inner.beat(reg).await })?
    }

    /// This rank's checkpoint shard of `step` is durable (`report`: the checkpoint
    /// crate's shard report); `stopping` when it is the checkpoint this rank's generation
    /// stopped at. Returns (received, expected) for the step.
    pub fn report_shard(&self, step: u64, report: Vec<u8>, stopping: bool) -> Result<(u32, u32)> {
        let id = self.worker_id()?;
        let client = self.inner.client.clone();
        let r = self
            .inner
            .block(async move { client.report_shard(id, step, report, stopping).await })??;
        Ok((r.received, r.expected))
    }

    /// Reports a failure: `retryable` (a collective error, a lost peer) starts a new
    /// generation; otherwise the job fails with `message`.
    pub fn report_error(&self, message: &str, retryable: bool) -> Result<()> {
        let id = self.worker_id()?;
        let client = self.inner.client.clone();
        let message = message.to_string();
        self.inner
            .block(async move { client.report_error(id, &message, retryable).await })?
    }

    /// The last step is done: flushes the metrics, then tells the coordinator. `summary`
    /// fields join the job's final `{"done": true, ...}` metrics line.
    pub fn report_done(
        &self,
        step: u64,
        summary: serde_json::Map<String, serde_json::Value>,
    ) -> Result<()> {
        self.flush()?;
        let id = self.worker_id()?;
        let client = self.inner.client.clone();
        let summary = if summary.is_empty() {
            String::new()
        } else {
            serde_json::Value::Object(summary).to_string()
        };
        self.inner
            .block(async move { client.report_done(id, step, summary).await })?
    }

    /// The rendezvous store of the current assignment's generation (keys prefixed with
    /// its `kv_prefix`; waits end early when a newer generation is announced).
    pub fn store(&self) -> Arc<dyn Store> {
        let (prefix, generation) = lock(&self.inner.assignment)
            .as_ref()
            .map_or((String::new(), 0), |a| (a.kv_prefix.clone(), a.generation));
        Arc::new(GrpcStore {
            inner: self.inner.clone(),
            _rt: self.rt.clone(),
            prefix,
            generation,
        })
    }

    /// The async client underneath (for tools).
    pub fn client(&self) -> &CoordinatorClient {
        &self.inner.client
    }

    /// True once a `Stop` event arrived.
    pub fn stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    /// The newest generation the coordinator announced (`u64::MAX` once the job is over).
    pub fn announced_generation(&self) -> u64 {
        *self.inner.announced.borrow()
    }

    /// Why the coordinator counts as lost, while no heartbeat gets through (see
    /// [`ControlEvent::CoordinatorLost`]).
    pub fn coordinator_lost(&self) -> Option<String> {
        lock(&self.inner.lost).clone()
    }
}

/// [`Store`] over the coordinator's rendezvous RPCs, for one generation.
pub struct GrpcStore {
    inner: Arc<Inner>,
    _rt: Arc<Rt>,
    prefix: String,
    generation: u64,
}

impl std::fmt::Debug for GrpcStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcStore")
            .field("prefix", &self.prefix)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

fn store_error(key: &str, e: CoordinatorError) -> StoreError {
    match e {
        CoordinatorError::Timeout { after, .. } => StoreError::Timeout {
            key: key.to_string(),
            after,
        },
        CoordinatorError::Unavailable(m) | CoordinatorError::Runtime(m) => {
            StoreError::Unreachable(m)
        }
        other => StoreError::Refused(other.to_string()),
    }
}

/// How long a store call retries an unreachable coordinator before giving up.
const STORE_RETRY: Duration = Duration::from_secs(5);

impl GrpcStore {
    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs one call, ending it early if a newer generation is announced.
    fn call<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let mut announced = self.inner.announced.subscribe();
        let generation = self.generation;
        self.inner.block(async move {
            tokio::select! {
                r = fut => r,
                _ = announced.wait_for(|g| generation > 0 && *g > generation) => {
                    Err(CoordinatorError::StaleWorker(format!(
                        "generation {generation} was aborted (the coordinator announced a newer one or stopped the job)"
                    )))
                }
            }
        })?
    }

    fn retrying<T: Send + 'static, F, Fut>(
        &self,
        key: &str,
        deadline: Option<Instant>,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(CoordinatorClient) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let first = Instant::now();
        loop {
            match self.call(f(self.inner.client.clone())) {
                Ok(v) => return Ok(v),
                Err(CoordinatorError::Unavailable(m))
                    if first.elapsed() < STORE_RETRY
                        && deadline.is_none_or(|d| Instant::now() < d) =>
                {
                    tracing::debug!("rendezvous store unreachable ({m}); retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(store_error(key, e)),
            }
        }
    }
}

impl Store for GrpcStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = self.key(key);
        let value = value.to_vec();
        let k = key.clone();
        self.retrying(&key, None, move |c| {
            let (k, v) = (k.clone(), value.clone());
            async move { c.kv_set(&k, v).await }
        })
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        let key = self.key(key);
        let deadline = Instant::now() + timeout;
        loop {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(MAX_WAIT);
            let k = key.clone();
            match self.retrying(&key, Some(deadline), move |c| {
                let k = k.clone();
                async move { c.kv_get(&k, wait).await }
            }) {
                Ok(v) => return Ok(v),
                Err(StoreError::Timeout { .. }) if Instant::now() < deadline => {}
                Err(StoreError::Timeout { key, .. }) => {
                    return Err(StoreError::Timeout {
                        key,
                        after: timeout,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let key = self.key(key);
        let k = key.clone();
        self.retrying(&key, None, move |c| {
            let k = k.clone();
            async move { c.kv_add(&k, delta).await }
        })
    }
}
