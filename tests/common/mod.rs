//! Helpers shared by the top-level integration tests (tests/*.rs), which run the `weaver`
//! binary as users do: commands and their output, job configs, the run directory's
//! metrics, child processes waited on with a timeout, `weaver coordinator` and
//! `weaver worker` processes, loopback ports, the venv's python.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The `weaver` binary of this build, logging at `level` (`RUST_LOG`).
pub(crate) fn weaver_logging(level: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weaver"));
    c.env("RUST_LOG", level);
    c
}

/// The `weaver` binary of this build, logging warnings and errors only.
pub(crate) fn weaver() -> Command {
    weaver_logging("warn")
}

/// Runs `weaver ARGS` in `cwd` (logging warnings and errors) to its end.
pub(crate) fn run(args: &[&str], cwd: &Path) -> Output {
    weaver()
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("cannot run weaver")
}

/// Asserts that `out` is a success, showing both streams if not; its stdout.
pub(crate) fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stderr of `o` as text.
pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes `body` to `<dir>/job.toml`; its path.
pub(crate) fn job_config(dir: &Path, body: &str) -> String {
    let p = dir.join("job.toml");
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

/// The JSON lines of `<run_dir>/metrics.jsonl` (none while it does not exist).
pub(crate) fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The newest step with a training loss in `<run_dir>/metrics.jsonl` (0: none yet).
pub(crate) fn last_step(run_dir: &Path) -> u64 {
    metrics(run_dir)
        .iter()
        .filter(|l| l.get("loss").is_some())
        .filter_map(|l| l["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Training losses by step (the first line of each step).
pub(crate) fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    let mut out: Vec<(u64, f64)> = Vec::new();
    for l in metrics(run_dir) {
        if let (Some(s), Some(x)) = (l["step"].as_u64(), l["loss"].as_f64()) {
            if !out.iter().any(|(t, _)| *t == s) {
                out.push((s, x));
            }
        }
    }
    out.sort_by_key(|(s, _)| *s);
    out
}

/// Polls `ready` every 100 ms until it holds; panics when `child` ends first or `limit`
/// passes (`what` names the awaited thing in both messages).
pub(crate) fn wait_until(
    what: &str,
    child: &mut Child,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) {
    let start = Instant::now();
    while !ready() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the job ended ({status}) before {what}");
        }
        assert!(start.elapsed() < limit, "no {what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the run directory of the job `child` logs a training loss of step `step`.
pub(crate) fn wait_for_step(run_dir: &Path, step: u64, child: &mut Child, limit: Duration) {
    wait_until(&format!("step {step}"), child, limit, || {
        last_step(run_dir) >= step
    });
}

/// Waits for `child` to end; kills it and panics when it is still running after `limit`.
pub(crate) fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the job did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `weaver coordinator ARGS` (logging at info to `log`) and returns it with the
/// address it listens on.
pub(crate) fn start_coordinator(args: &[&str], log: &Path) -> (Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = weaver_logging("info")
        .arg("coordinator")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("coordinator listening on ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the coordinator's address");
    (child, addr)
}

/// Starts `n` `weaver worker`s of host `node-a`, logging to `<dir>/<tag>-K.log`.
pub(crate) fn start_workers(
    n: usize,
    addr: &str,
    token: &Path,
    dir: &Path,
    tag: &str,
) -> Vec<Child> {
    (0..n)
        .map(|k| spawn_worker(k, n, addr, token, dir, tag))
        .collect()
}

/// Starts `weaver worker` local rank `k` of `n` on host `node-a` (one thread, logging at
/// info to `<dir>/<tag>-K.log`, run directory `<dir>/out`).
pub(crate) fn spawn_worker(
    k: usize,
    n: usize,
    addr: &str,
    token: &Path,
    dir: &Path,
    tag: &str,
) -> Child {
    // Appends: a worker started again in the same slot keeps the earlier one's log.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{tag}-{k}.log")))
        .unwrap();
    weaver_logging("info")
        .args([
            "worker",
            "--coordinator",
            addr,
            "--token-file",
            token.to_str().unwrap(),
            "--run-dir",
            dir.join("out").to_str().unwrap(),
        ])
        .env("WEAVER_HOST", "node-a")
        .env("WEAVER_LOCAL_RANK", k.to_string())
        .env("WEAVER_LOCAL_WORLD_SIZE", n.to_string())
        .env("WEAVER_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// `n` loopback ports that were free a moment ago (all bound at once, so they are
/// distinct; released for the children to take).
pub(crate) fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    free_ports(1)[0]
}

/// The project venv's python (`WEAVER_PYTHON`, which scripts/env.sh sets).
pub(crate) fn python() -> String {
    std::env::var("WEAVER_PYTHON").unwrap_or_else(|_| {
        panic!(
            "WEAVER_PYTHON is not set: run the tests through scripts/test.sh (or source \
             scripts/env.sh), which creates the venv with torch and the packages the tests \
             read their results with (prometheus_client, tensorboard, ...)"
        )
    })
}

/// The worker processes a launcher (`weaver launch`, pid `launcher`) has started.
pub(crate) fn worker_pids(launcher: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command's closing parenthesis: state, ppid, ...
        let Some(rest) = stat.rsplit(')').next() else {
            continue;
        };
        let ppid: u32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == launcher && String::from_utf8_lossy(&cmd).contains("worker") {
            out.push(pid);
        }
    }
    out
}
