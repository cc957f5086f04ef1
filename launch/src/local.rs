//! The local launcher behind `weaver launch` (torchrun's standalone mode): the coordinator
//! in-process on a loopback port, N child processes of any command line with the worker
//! environment (see [`crate::env`]), their output forwarded with a `[wK]` prefix, their
//! exits watched.
//!
//! Exit policy: a child that dies (non-zero status or a signal) before the job ended is
//! reported to the coordinator as lost at once (no heartbeat timeout to wait for), which
//! starts a new generation; the launcher then starts that local rank again if `respawn` is
//! on and fewer than `max_restarts` respawns happened, else it fails the job with the
//! reason. Once the job ends, children get `grace` to exit on their own (they receive a
//! `Stop` event), then SIGTERM, then SIGKILL two seconds later. Ctrl-C stops the job.
//! Each child runs in its own process group so that the terminal's Ctrl-C reaches the
//! launcher only, and a kill reaches the child's own children.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use weaver_coordinator::{Coordinator, CoordinatorOptions, JobOutcome, TOKEN_ENV};

use crate::env::{
    COORDINATOR_ENV, HOST_ENV, LOCAL_RANK_ENV, LOCAL_WORLD_SIZE_ENV, RESTART_ENV, THREADS_ENV,
};
use crate::progress::{self, ProgressMode};
use crate::LaunchError;

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The job's coordinator.
    pub coordinator: CoordinatorOptions,
    /// Worker processes to start.
    pub nproc: usize,
    /// Program and arguments of every worker (e.g. `weaver worker`); workers find the
    /// coordinator, token and local rank in their environment.
    pub command: Vec<OsString>,
    /// Extra environment for the workers.
    pub env: Vec<(OsString, OsString)>,
    /// Where the coordinator listens (default `127.0.0.1:0`).
    pub listen: SocketAddr,
    /// The host name workers register with (default: this machine's).
    pub host: String,
    /// Start a dead worker again while restarts remain.
    pub respawn: bool,
    /// The progress bar.
    pub progress: ProgressMode,
    /// Forward the workers' output with a `[wK]` prefix (else it is discarded).
    pub forward_output: bool,
    /// Intra-op threads per worker (default: the cores divided by `nproc`, at least 1).
    pub threads_per_worker: Option<usize>,
    /// After the job ends, how long workers get to exit before SIGTERM.
    pub grace: Duration,
}

impl LaunchOptions {
    /// Defaults: loopback, this host's name, respawn on, progress bar on terminals.
    pub fn new(
        coordinator: CoordinatorOptions,
        nproc: usize,
        command: Vec<OsString>,
    ) -> LaunchOptions {
        LaunchOptions {
            coordinator,
            nproc,
            command,
            env: Vec::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            host: weaver_coordinator::WorkerInfo::local_host_name(),
            respawn: true,
            progress: ProgressMode::Auto,
            forward_output: true,
            threads_per_worker: None,
            grace: Duration::from_secs(10),
        }
    }
}

/// How a launch went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchReport {
    /// The job's outcome.
    pub outcome: JobOutcome,
    /// The coordinator's URL while it ran.
    pub url: String,
    /// The last exit status of each local rank (`None`: it never exited on its own).
    pub exits: Vec<Option<ExitStatus>>,
    /// Workers started again after dying.
    pub respawns: u32,
}

/// "exited with status 3", "was killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(9) => "was killed by signal 9 (SIGKILL)".into(),
        Some(15) => "was killed by signal 15 (SIGTERM)".into(),
        Some(11) => "was killed by signal 11 (SIGSEGV)".into(),
        Some(6) => "was killed by signal 6 (SIGABRT)".into(),
        Some(s) => format!("was killed by signal {s}"),
        None => "exited".into(),
    }
}

/// Runs [`launch_async`] on a runtime of its own.
pub fn launch(options: LaunchOptions) -> Result<LaunchReport, LaunchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("weaver-launch")
        .enable_all()
        .build()
        .map_err(|e| LaunchError::Io(format!("cannot start the launcher runtime: {e}")))?;
    rt.block_on(launch_async(options))
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Waiting,
    TermAt(tokio::time::Instant),
    KillAt(tokio::time::Instant),
    Killed,
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

struct Slot {
    pid: Option<u32>,
    running: bool,
    incarnation: u32,
    last: Option<ExitStatus>,
}

struct Spawner {
    command: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    forward: bool,
    bar: Option<ProgressBar>,
    exits: mpsc::UnboundedSender<(usize, u32, std::io::Result<ExitStatus>)>,
}

impl Spawner {
    fn spawn(&self, rank: usize, incarnation: u32) -> Result<u32, LaunchError> {
        let mut cmd = tokio::process::Command::new(&self.command[0]);
        cmd.args(&self.command[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(LOCAL_RANK_ENV, rank.to_string())
            .env(RESTART_ENV, incarnation.to_string())
            .stdin(Stdio::null())
            .stdout(if self.forward {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(if self.forward {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| LaunchError::Spawn {
            command: self.command[0].to_string_lossy().into_owned(),
            message: e.to_string(),
        })?;
        let pid = child.id().unwrap_or(0);
        tracing::info!(local_rank = rank, pid, incarnation, "worker started");
        let prefix = format!("[w{rank}] ");
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward(out, prefix.clone(), false, self.bar.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward(err, prefix, true, self.bar.clone()));
        }
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = exits.send((rank, incarnation, status));
        });
        Ok(pid)
    }
}

async fn forward(
    r: impl AsyncRead + Unpin,
    prefix: String,
    to_stderr: bool,
    bar: Option<ProgressBar>,
) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        match &bar {
            Some(b) => b.println(format!("{prefix}{l}")),
            None if to_stderr => eprintln!("{prefix}{l}"),
            None => println!("{prefix}{l}"),
        }
    }
}

fn signal_group(pid: u32, sig: libc::c_int) {
    if pid == 0 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals the child's process group (each child
    // leads its own); it touches no memory of ours.
    unsafe {
        libc::kill(-(pid as libc::pid_t), sig);
    }
}

/// Starts the coordinator and the workers, supervises them, and returns when the job has
/// ended and every worker has exited.
pub async fn launch_async(options: LaunchOptions) -> Result<LaunchReport, LaunchError> {
    if options.nproc == 0 || options.command.is_empty() {
        return Err(LaunchError::BadOptions(
            "launch needs at least one process and a command".into(),
        ));
    }
    // dp × pp × tp, or `parallel.workers` for a layout the coordinator chooses.
    let expected = options.coordinator.config.parallel.world();
    if expected != options.nproc {
        let p = &options.coordinator.config.parallel;
        return Err(LaunchError::BadOptions(format!(
            "--nproc {} but [parallel] asks for {expected} workers (dp × pp × tp = {} × {} × {}, \
             or parallel.workers with layout = \"auto\"); make them equal",
            options.nproc, p.dp, p.pp, p.tp
        )));
    }
    let tls = options.coordinator.tls.is_some();
    let token = options.coordinator.token.clone();
    let coordinator = Coordinator::new(options.coordinator.clone())?;
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|e| LaunchError::Io(format!("cannot listen on {}: {e}", options.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| LaunchError::Io(format!("listener address: {e}")))?;
    let url = if tls {
        format!("https://localhost:{}", addr.port())
    } else {
        format!("http://{addr}")
    };
    tracing::info!(%url, nproc = options.nproc, "coordinator listening");
    let (metrics_stop, metrics_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics = match options.coordinator.metrics_listen {
        Some(addr) => Some(
            crate::cluster::spawn_metrics(&coordinator, addr, async {
                let _ = metrics_rx.await;
            })
            .await?,
        ),
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let c = coordinator.clone();
        tokio::spawn(async move {
            c.serve(listener, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };

    let bar = progress::start(&coordinator, options.progress);
    let threads = options.threads_per_worker.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / options.nproc).max(1)
    });
    let mut env = vec![
        (OsString::from(COORDINATOR_ENV), OsString::from(&url)),
        (OsString::from(TOKEN_ENV), OsString::from(token.expose())),
        (
            OsString::from(LOCAL_WORLD_SIZE_ENV),
            OsString::from(options.nproc.to_string()),
        ),
        (OsString::from(HOST_ENV), OsString::from(&options.host)),
        (
            OsString::from(THREADS_ENV),
            OsString::from(threads.to_string()),
        ),
    ];
    if std::env::var_os("OMP_NUM_THREADS").is_none() {
        env.push(("OMP_NUM_THREADS".into(), threads.to_string().into()));
    }
    env.extend(options.env.iter().cloned());
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
    let spawner = Spawner {
        command: options.command.clone(),
        env,
        forward: options.forward_output,
        bar: bar.clone(),
        exits: exit_tx,
    };
    let mut slots: Vec<Slot> = Vec::with_capacity(options.nproc);
    for rank in 0..options.nproc {
        match spawner.spawn(rank, 0) {
            Ok(pid) => slots.push(Slot {
                pid: Some(pid),
                running: true,
                incarnation: 0,
                last: None,
            }),
            Err(e) => {
                coordinator.fail(&format!("cannot start local rank {rank}: {e}"));
                for s in &slots {
                    if let Some(pid) = s.pid {
                        signal_group(pid, libc::SIGKILL);
                    }
                }
                let _ = stop_tx.send(());
                let _ = server.await;
                return Err(e);
            }
        }
    }

    let mut respawns = 0u32;
    let mut ended = false;
    let mut interrupted = false;
    // After the job ends: SIGTERM at the first instant, SIGKILL at the second.
    let mut stage = Stage::Waiting;
    loop {
        if ended && slots.iter().all(|s| !s.running) {
            break;
        }
        let deadline = match stage {
            Stage::TermAt(t) | Stage::KillAt(t) => Some(t),
            Stage::Waiting | Stage::Killed => None,
        };
        tokio::select! {
            Some((rank, incarnation, status)) = exit_rx.recv() => {
                let slot = &mut slots[rank];
                if incarnation != slot.incarnation {
                    continue;
                }
                slot.running = false;
                let status = match status {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(local_rank = rank, "cannot wait for the worker: {e}");
                        continue;
                    }
                };
                slot.last = Some(status);
                if coordinator.outcome().is_some() {
                    continue;
                }
                if status.success() {
                    if slots.iter().all(|s| !s.running) {
                        coordinator.fail("every worker exited before the job completed");
                    }
                    continue;
                }
                let how = describe_exit(&status);
                tracing::warn!(local_rank = rank, "worker {how}");
                coordinator.worker_exited(&options.host, rank as u32, &how);
                let (_, max) = coordinator.restarts();
                if coordinator.outcome().is_some() {
                    continue;
                }
                if options.respawn && respawns < max {
                    respawns += 1;
                    let incarnation = slots[rank].incarnation + 1;
                    match spawner.spawn(rank, incarnation) {
                        Ok(pid) => {
                            slots[rank] = Slot { pid: Some(pid), running: true, incarnation, last: Some(status) };
                        }
                        Err(e) => coordinator.fail(&format!("local rank {rank} {how}, and restarting it failed: {e}")),
                    }
                } else {
                    let why = if options.respawn {
                        format!("no restart is left (max_restarts = {max})")
                    } else {
                        "the launcher does not respawn workers".to_string()
                    };
                    coordinator.fail(&format!("local rank {rank} (host {}) {how}, and {why}", options.host));
                }
            }
            outcome = coordinator.wait_finished(), if !ended => {
                ended = true;
                tracing::info!(%outcome, "job ended; waiting for the workers to exit");
                stage = Stage::TermAt(tokio::time::Instant::now() + options.grace);
            }
            () = sleep_until_opt(deadline), if deadline.is_some() => {
                let running: Vec<u32> = slots.iter().filter(|s| s.running).filter_map(|s| s.pid).collect();
                stage = match stage {
                    Stage::TermAt(_) => {
                        tracing::warn!(workers = running.len(), "workers still running after the grace period: SIGTERM");
                        for pid in running {
                            signal_group(pid, libc::SIGTERM);
                        }
                        Stage::KillAt(tokio::time::Instant::now() + Duration::from_secs(2))
                    }
                    _ => {
                        tracing::warn!(workers = running.len(), "workers ignored SIGTERM: SIGKILL");
                        for pid in running {
                            signal_group(pid, libc::SIGKILL);
                        }
                        Stage::Killed
                    }
                };
            }
            r = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                if r.is_ok() {
                    coordinator.fail("interrupted (Ctrl-C)");
                }
            }
        }
    }
    let _ = stop_tx.send(());
    let served = server
        .await
        .map_err(|e| LaunchError::Io(format!("coordinator task: {e}")))?;
    let _ = metrics_stop.send(());
    if let Some(m) = metrics {
        let _ = m.await;
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let outcome = served?;
    Ok(LaunchReport {
        outcome,
        url,
        exits: slots.iter().map(|s| s.last).collect(),
        respawns,
    })
}
