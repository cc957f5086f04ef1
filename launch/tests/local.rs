//! The local launcher with real child processes. The children are this test binary run
//! again as a minimal worker (the `fake_worker` test, a no-op unless
//! `WEAVER_FAKE_WORKER=1`): it registers through a real `WorkerSession`, rendezvouses,
//! reports steps, and obeys control events — a real client, only the training is missing.
//! Children log when they receive Abort/Stop (and when one kills itself) with wall-clock
//! timestamps, so the tests can measure how fast the others learn of a SIGKILL.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use weaver_config::JobConfig;
use weaver_coordinator::{
    ControlEvent, CoordinatorOptions, JobOutcome, JobToken, Policy, SessionOptions, StepMetrics,
    WorkerInfo, WorkerSession,
};
use weaver_launch::{launch, resolve_token, LaunchError, LaunchOptions, ProgressMode, WorkerEnv};

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn log(dir: &Option<PathBuf>, file: &str, what: &str) {
    if let Some(d) = dir {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join(file))
            .unwrap();
        writeln!(f, "{what} {}", now_us()).unwrap();
    }
}

/// The child side. Exit codes: 0 job completed, 1 job failed, 2 setup error, 4 no Stop.
#[test]
fn fake_worker() {
    if std::env::var("WEAVER_FAKE_WORKER").as_deref() != Ok("1") {
        return;
    }
    let env = WorkerEnv::from_env().unwrap();
    let step_ms = env_num("FAKE_STEP_MS", 30);
    let kill_rank = env_num("FAKE_KILL_RANK", u64::MAX);
    let kill_step = env_num("FAKE_KILL_STEP", 3);
    let dir = std::env::var("FAKE_LOG_DIR").ok().map(PathBuf::from);
    let file = format!("w{}.{}.log", env.local_rank, env.restart);

    let token = resolve_token(None).unwrap();
    let session = WorkerSession::connect(SessionOptions::new(
        env.coordinator.as_deref().unwrap(),
        token,
    ))
    .unwrap();
    let events = session.events();
    {
        let (dir, file) = (dir.clone(), file.clone());
        session.on_event(move |e| match e {
            ControlEvent::Abort { .. } => log(&dir, &file, "abort"),
            ControlEvent::Stop { .. } => log(&dir, &file, "stop"),
            _ => {}
        });
    }
    session
        .register(WorkerInfo::cpu(&env.host, env.local_rank))
        .unwrap();
    fn exit_for(success: bool) -> ! {
        std::process::exit(if success { 0 } else { 1 })
    }
    'generation: loop {
        let a = match session.wait_assignment(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(e) if e.is_terminal() => exit_for(matches!(
                e,
                weaver_coordinator::CoordinatorError::JobCompleted(_)
            )),
            Err(e) => {
                eprintln!("no assignment: {e}");
                std::process::exit(2)
            }
        };
        let steps = a.config().unwrap().train.steps;
        let store = session.store();
        if store.set(&format!("hello/{}", a.rank), b"hi").is_err() {
            continue 'generation;
        }
        for r in 0..a.world_size {
            if store
                .get(&format!("hello/{r}"), Duration::from_secs(20))
                .is_err()
            {
                continue 'generation;
            }
        }
        for step in a.resume_step + 1..=steps {
            std::thread::sleep(Duration::from_millis(step_ms));
            while let Ok(e) = events.try_recv() {
                match e {
                    ControlEvent::Abort { .. } => continue 'generation,
                    ControlEvent::Stop { success, .. } => exit_for(success),
                    ControlEvent::CoordinatorLost { .. } => std::process::exit(3),
                    ControlEvent::SaveAt { .. } => {}
                }
            }
            if u64::from(env.local_rank) == kill_rank && step == kill_step && env.restart == 0 {
                log(&dir, &file, "kill");
                // SAFETY: raise(3) signals this very process; it touches no memory.
                unsafe {
                    libc::raise(libc::SIGKILL);
                }
            }
            session.report_step(StepMetrics {
                step,
                loss: (a.rank == 0).then_some(5.0 / step as f64),
                tokens_per_s: Some(1000.0),
                ..Default::default()
            });
        }
        if session.report_done(steps, Default::default()).is_err() {
            continue 'generation;
        }
        loop {
            match events.recv_timeout(Duration::from_secs(20)) {
                Ok(ControlEvent::Stop { success, .. }) => exit_for(success),
                Ok(ControlEvent::Abort { .. }) => continue 'generation,
                Ok(_) => {}
                Err(_) => std::process::exit(4),
            }
        }
    }
}

fn config(dp: usize, tp: usize, steps: u64) -> JobConfig {
    JobConfig::parse(
        "",
        &[
            format!("parallel.dp={dp}"),
            format!("parallel.tp={tp}"),
            "train.global_batch=64".into(),
            format!("train.steps={steps}"),
        ],
    )
    .unwrap()
}

const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

fn options(
    config: JobConfig,
    nproc: usize,
    max_restarts: u32,
    logs: &Path,
    extra: &[(&str, &str)],
) -> LaunchOptions {
    let mut c = CoordinatorOptions::new(config, JobToken::generate().unwrap());
    c.policy = Policy {
        heartbeat_interval: Duration::from_millis(250),
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        gather_timeout: Duration::from_secs(60),
        regather_timeout: Duration::from_secs(60),
        max_restarts,
        elastic_min_dp: None,
    };
    c.run_dir = Some(logs.to_path_buf());
    c.linger = Duration::from_millis(500);
    let exe = std::env::current_exe().unwrap();
    let command: Vec<OsString> = vec![
        exe.into(),
        "fake_worker".into(),
        "--exact".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ];
    let mut o = LaunchOptions::new(c, nproc, command);
    o.host = "testhost".into();
    o.progress = ProgressMode::Never;
    o.grace = Duration::from_secs(5);
    o.threads_per_worker = Some(1);
    o.env = [
        ("WEAVER_FAKE_WORKER", "1"),
        ("FAKE_LOG_DIR", logs.to_str().unwrap()),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (OsString::from(k), OsString::from(v)))
    .collect();
    o
}

/// Timestamps (µs) of `what` in every log file, by file name.
fn stamps(dir: &Path, what: &str) -> Vec<(String, u128)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".log") {
            continue;
        }
        for line in std::fs::read_to_string(&p).unwrap().lines() {
            if let Some(t) = line.strip_prefix(&format!("{what} ")) {
                out.push((name.clone(), t.parse().unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn four_workers_run_a_job_to_completion() {
    if std::env::var("TRACE").is_ok() {
        let _ = tracing_subscriber::fmt().with_env_filter("info").try_init();
    }
    let dir = tempfile::tempdir().unwrap();
    let report = launch(options(config(2, 2, 10), 4, 0, dir.path(), &[])).unwrap();
    assert_eq!(
        report.outcome,
        JobOutcome::Completed {
            step: 10,
            generation: 1
        }
    );
    assert!(
        report.exits.iter().all(|e| e.is_some_and(|s| s.success())),
        "{:?}",
        report.exits
    );
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 11, "{text}");
    assert_eq!(lines[9]["step"], serde_json::json!(10));
    assert_eq!(lines[10]["done"], serde_json::json!(true));
}

/// SIGKILL of one worker with restarts disabled: the job fails with the reason, the other
/// workers are told to stop within the heartbeat timeout, and nothing hangs.
#[test]
fn sigkill_of_a_worker_stops_the_others_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let report = launch(options(
        config(4, 1, 200),
        4,
        0,
        dir.path(),
        &[("FAKE_KILL_RANK", "1")],
    ))
    .unwrap();
    let took = t.elapsed();
    let JobOutcome::Failed { reason } = &report.outcome else {
        panic!("{:?}", report.outcome)
    };
    assert!(
        reason.contains("testhost/1") && reason.contains("killed by signal 9"),
        "{reason}"
    );
    assert!(reason.contains("max_restarts = 0"), "{reason}");
    let kill = stamps(dir.path(), "kill");
    assert_eq!(kill.len(), 1);
    let stops = stamps(dir.path(), "stop");
    assert_eq!(stops.len(), 3, "{stops:?}");
    for (who, t) in &stops {
        let after = Duration::from_micros((t - kill[0].1) as u64);
        eprintln!("{who}: Stop {after:?} after the SIGKILL");
        assert!(
            after < HEARTBEAT_TIMEOUT,
            "{who} stopped {after:?} after the kill"
        );
    }
    // 200 steps of 30 ms would take 6 s; the job ended long before.
    assert!(took < Duration::from_secs(15), "{took:?}");
}

/// SIGKILL with a restart allowed: the others abort promptly, the launcher starts the dead
/// rank again, and the job completes in generation 2.
#[test]
fn sigkill_with_a_restart_left_respawns_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let report = launch(options(
        config(4, 1, 8),
        4,
        1,
        dir.path(),
        &[("FAKE_KILL_RANK", "2")],
    ))
    .unwrap();
    assert_eq!(
        report.outcome,
        JobOutcome::Completed {
            step: 8,
            generation: 2
        }
    );
    assert_eq!(report.respawns, 1);
    let kill = stamps(dir.path(), "kill");
    assert_eq!(kill.len(), 1);
    let aborts = stamps(dir.path(), "abort");
    assert_eq!(aborts.len(), 3, "{aborts:?}");
    for (who, t) in &aborts {
        let after = Duration::from_micros((t - kill[0].1) as u64);
        eprintln!("{who}: Abort {after:?} after the SIGKILL");
        assert!(
            after < HEARTBEAT_TIMEOUT,
            "{who} aborted {after:?} after the kill"
        );
    }
}

#[test]
fn a_worker_that_cannot_start_fails_the_job_fast() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(config(2, 1, 5), 2, 1, dir.path(), &[]);
    o.command = vec!["sh".into(), "-c".into(), "echo starting; exit 3".into()];
    let t = Instant::now();
    let report = launch(o).unwrap();
    let JobOutcome::Failed { reason } = &report.outcome else {
        panic!("{:?}", report.outcome)
    };
    assert!(
        reason.contains("exited with status 3") && reason.contains("no restart is left"),
        "{reason}"
    );
    assert_eq!(report.respawns, 1);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn refuses_a_process_count_that_does_not_match_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let e = launch(options(config(2, 2, 5), 3, 0, dir.path(), &[])).unwrap_err();
    assert!(
        matches!(&e, LaunchError::BadOptions(m) if m.contains("--nproc 3")),
        "{e}"
    );
}

/// Two network namespaces stand for two hosts: the workers reach the coordinator over
/// veth links at different addresses, and register with different host names.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

fn sh(args: &[&str]) -> bool {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes namespace `ns` reachable from the root namespace: root side `10.X.i.1`, namespace
/// side `10.X.i.2`. Returns the address the namespace uses to reach the root side.
fn link(ns: &str, tag: &str, subnet: &str) -> Option<String> {
    let (outer, inner) = (format!("{tag}o"), format!("{tag}i"));
    let ok = sh(&[
        "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
    ]) && sh(&["ip", "link", "set", &inner, "netns", ns])
        && sh(&[
            "ip",
            "addr",
            "add",
            &format!("{subnet}.1/24"),
            "dev",
            &outer,
        ])
        && sh(&["ip", "link", "set", &outer, "up"])
        && sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "ip",
            "addr",
            "add",
            &format!("{subnet}.2/24"),
            "dev",
            &inner,
        ])
        && sh(&["ip", "netns", "exec", ns, "ip", "link", "set", &inner, "up"])
        && sh(&["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]);
    ok.then(|| format!("{subnet}.1"))
}

#[test]
fn workers_on_two_hosts_in_network_namespaces() {
    let pid = std::process::id();
    let names = [format!("wv{pid}a"), format!("wv{pid}b")];
    // Needs root and iproute2; skipped (and says so) elsewhere.
    if !sh(&["ip", "netns", "add", &names[0]]) {
        eprintln!("skipped: cannot create network namespaces here (needs root and iproute2)");
        return;
    }
    let mut guard = Namespaces(vec![names[0].clone()]);
    assert!(sh(&["ip", "netns", "add", &names[1]]));
    guard.0.push(names[1].clone());
    let x = 100 + pid % 100;
    let gateways: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            link(ns, &format!("wv{pid}{i}"), &format!("10.{x}.{}", i + 1)).expect("veth setup")
        })
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let token = JobToken::generate().unwrap();
    let mut o = CoordinatorOptions::new(config(2, 2, 6), token.clone());
    o.policy.heartbeat_interval = Duration::from_millis(250);
    o.linger = Duration::from_millis(500);
    o.run_dir = Some(dir.path().to_path_buf());
    let coordinator = weaver_coordinator::Coordinator::new(o).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("0.0.0.0:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let c = coordinator.clone();
    let served = rt.spawn(async move { c.serve(listener, std::future::pending()).await });

    let exe = std::env::current_exe().unwrap();
    let mut children = Vec::new();
    for (h, ns) in names.iter().enumerate() {
        for k in 0..2 {
            children.push(
                std::process::Command::new("ip")
                    .args(["netns", "exec", ns])
                    .arg(&exe)
                    .args(["fake_worker", "--exact", "--nocapture", "--test-threads=1"])
                    .env("WEAVER_FAKE_WORKER", "1")
                    .env(
                        "WEAVER_COORDINATOR",
                        format!("http://{}:{port}", gateways[h]),
                    )
                    .env("WEAVER_JOB_TOKEN", token.expose())
                    .env("WEAVER_HOST", format!("host-{h}"))
                    .env("WEAVER_LOCAL_RANK", k.to_string())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        }
    }
    let outcome = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), served).await })
        .expect("job did not finish")
        .unwrap()
        .unwrap();
    assert_eq!(
        outcome,
        JobOutcome::Completed {
            step: 6,
            generation: 1
        }
    );
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    // TP groups (ranks {0,1} and {2,3}) each on one host.
    let status = coordinator.status();
    let host_of = |rank: i64| {
        status
            .workers
            .iter()
            .find(|w| w.rank == rank)
            .unwrap()
            .host
            .clone()
    };
    assert_eq!(host_of(0), host_of(1));
    assert_eq!(host_of(2), host_of(3));
    assert_ne!(host_of(0), host_of(2));
}

/// `weaver coordinator` / `weaver status` / `weaver ckpt save` / shutdown, end to end.
#[test]
fn cluster_entry_points_serve_report_and_stop() {
    let token = JobToken::generate().unwrap();
    let options = CoordinatorOptions::new(config(2, 1, 5), token.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        weaver_launch::serve_coordinator(options, "127.0.0.1:0".parse().unwrap(), |addr| {
            tx.send(addr).unwrap()
        })
    });
    let url = format!("http://{}", rx.recv().unwrap());
    let table = weaver_launch::status(&url, &token, None).unwrap();
    assert!(
        table.starts_with("job: gathering") && table.contains("0 of 2 workers registered"),
        "{table}"
    );
    let e = weaver_launch::request_checkpoint(&url, &token, None).unwrap_err();
    assert!(e.to_string().contains("while it runs"), "{e}");
    let wrong = weaver_launch::status(&url, &JobToken::generate().unwrap(), None).unwrap_err();
    assert!(wrong.to_string().contains("wrong job token"), "{wrong}");
    weaver_launch::shutdown(&url, &token, None, "test over").unwrap();
    let outcome = server.join().unwrap().unwrap();
    assert_eq!(
        outcome,
        JobOutcome::Failed {
            reason: "shut down by operator request: test over".into()
        }
    );
}
