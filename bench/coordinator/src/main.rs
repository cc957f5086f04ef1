//! bench/coordinator: how the coordinator holds up with many workers.
//!
//! For each worker count (default 1k, 4k, 16k) the bench starts the coordinator as a
//! separate process (this binary with `serve N`, so that its CPU time can be read cleanly
//! from `/proc/<pid>/stat`), then simulates N workers as in-process gRPC clients sharing a
//! few HTTP/2 channels. Each simulated worker does what a real one does: Register, open
//! its `Watch` stream, long-poll `GetAssignment`, then heartbeat once a second (one step's
//! metrics per beat; worker 0 carries the loss). Measured:
//!
//! - rendezvous: from the first Register to the last assignment received;
//! - Register latency (p50/p99) under the simultaneous arrival of every worker;
//! - heartbeat latency (p50/p99) and the achieved beat rate over the steady window;
//! - the coordinator process's CPU (user + system) during the rendezvous and as a
//!   fraction of one core during the heartbeat window, and its resident memory.
//!
//! Clients and coordinator share the machine, so the latencies include the clients' own
//! scheduling; the "lag" column (how late beats left against their 1 Hz schedule) shows
//! when the client side, not the coordinator, was the bottleneck.
//!
//! Usage: `run.sh [--workers 1000,4000,16000] [--seconds 10] [--channels 16]`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;
use tonic::transport::Endpoint;
use weaver_config::JobConfig;
use weaver_coordinator::pb;
use weaver_coordinator::{
    Coordinator, CoordinatorClient, CoordinatorOptions, JobToken, Policy, TOKEN_ENV,
};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        let n: usize = args.get(1).context("serve N")?.parse()?;
        return serve(n);
    }
    let mut sizes = vec![1000, 4000, 16000];
    let mut seconds = 10u64;
    let mut channels = 16usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--workers" => sizes = v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--seconds" => seconds = v.parse()?,
            "--channels" => channels = v.parse()?,
            other => bail!("unknown option {other}; use --workers N,N --seconds S --channels C"),
        }
    }
    let mut rows = Vec::new();
    for &n in &sizes {
        eprintln!(
            "bench: {n} simulated workers over {channels} channels, {seconds} s of heartbeats"
        );
        rows.push(run(n, channels, seconds)?);
    }
    println!();
    println!(
        "{:>7} {:>5} {:>13} {:>12} {:>12} {:>9} {:>10} {:>10} {:>10} {:>14} {:>12} {:>8}",
        "workers",
        "chans",
        "rendezvous_s",
        "reg_p50_ms",
        "reg_p99_ms",
        "beats/s",
        "hb_p50_ms",
        "hb_p99_ms",
        "lag_p99_ms",
        "cpu_rdv_core_s",
        "cpu_hb_%core",
        "rss_MB"
    );
    for r in &rows {
        println!(
            "{:>7} {:>5} {:>13.2} {:>12.1} {:>12.1} {:>9.0} {:>10.2} {:>10.2} {:>10.1} {:>14.2} {:>12.1} {:>8.0}",
            r.workers,
            r.channels,
            r.rendezvous_s,
            r.register_p50_ms,
            r.register_p99_ms,
            r.beats_per_s,
            r.heartbeat_p50_ms,
            r.heartbeat_p99_ms,
            r.lag_p99_ms,
            r.cpu_rendezvous_s,
            r.cpu_heartbeat_pct,
            r.rss_mb
        );
    }
    for r in &rows {
        println!(
            "RESULT {}",
            serde_json::json!({
                "bench": "coordinator",
                "workers": r.workers,
                "channels": r.channels,
                "heartbeat_seconds": seconds,
                "rendezvous_s": r.rendezvous_s,
                "register_p50_ms": r.register_p50_ms,
                "register_p99_ms": r.register_p99_ms,
                "heartbeats_per_s": r.beats_per_s,
                "heartbeat_p50_ms": r.heartbeat_p50_ms,
                "heartbeat_p99_ms": r.heartbeat_p99_ms,
                "client_lag_p99_ms": r.lag_p99_ms,
                "coordinator_cpu_rendezvous_s": r.cpu_rendezvous_s,
                "coordinator_cpu_heartbeat_pct_of_core": r.cpu_heartbeat_pct,
                "coordinator_rss_mb": r.rss_mb,
                "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            })
        );
    }
    Ok(())
}

/// The coordinator side: serves a job of `n` workers (dp = n) until stdin closes.
fn serve(n: usize) -> Result<()> {
    let token = JobToken::from_env()?.context("the bench passes the token in WEAVER_JOB_TOKEN")?;
    let config = JobConfig::parse(
        "",
        &[
            format!("parallel.dp={n}"),
            format!("train.global_batch={}", 2 * n),
            "train.steps=1000000".into(),
        ],
    )?;
    let mut options = CoordinatorOptions::new(config, token);
    // Generous timeouts: the bench measures load, a slow client must not count as lost.
    options.policy = Policy {
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(60),
        gather_timeout: Duration::from_secs(600),
        regather_timeout: Duration::from_secs(600),
        max_restarts: 0,
        elastic_min_dp: None,
    };
    options.linger = Duration::from_millis(100);
    let coordinator = Coordinator::new(options)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        println!("PORT {}", listener.local_addr()?.port());
        std::io::stdout().flush()?;
        let stdin_closed = async {
            let _ = tokio::task::spawn_blocking(|| {
                let mut sink = String::new();
                while std::io::stdin()
                    .read_line(&mut sink)
                    .map(|n| n > 0)
                    .unwrap_or(false)
                {}
            })
            .await;
        };
        coordinator.serve(listener, stdin_closed).await?;
        anyhow::Ok(())
    })
}

struct Row {
    workers: usize,
    channels: usize,
    rendezvous_s: f64,
    register_p50_ms: f64,
    register_p99_ms: f64,
    beats_per_s: f64,
    heartbeat_p50_ms: f64,
    heartbeat_p99_ms: f64,
    lag_p99_ms: f64,
    cpu_rendezvous_s: f64,
    cpu_heartbeat_pct: f64,
    rss_mb: f64,
}

/// User + system CPU seconds of `pid`.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("odd /proc stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3.
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn run(n: usize, channels: usize, seconds: u64) -> Result<Row> {
    let token = JobToken::generate()?;
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["serve", &n.to_string()])
        .env(TOKEN_ENV, token.expose())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("child stdout")?).read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .strip_prefix("PORT ")
        .with_context(|| format!("the coordinator said {line:?}"))?
        .parse()?;
    let url = format!("http://127.0.0.1:{port}");

    let rt = tokio::runtime::Runtime::new()?;
    let row = rt.block_on(async {
        let mut clients = Vec::with_capacity(channels);
        for _ in 0..channels {
            let ch = Endpoint::from_shared(url.clone())?
                .tcp_nodelay(true)
                .connect()
                .await?;
            clients.push(CoordinatorClient::from_channel(ch, &token)?);
        }

        // Rendezvous: everyone registers at once, opens its Watch stream and waits for
        // its assignment.
        let cpu0 = cpu_seconds(pid)?;
        let t0 = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let c = clients[i % channels].clone();
            tasks.push(tokio::spawn(async move {
                let info = pb::WorkerInfo {
                    host: format!("node-{:05}", i / 8),
                    local_rank: (i % 8) as u32,
                    device_kind: "cpu".into(),
                    device: "cpu".into(),
                    instance: format!("sim-{i}"),
                    pid: i as u32,
                    ..Default::default()
                };
                let t = Instant::now();
                let reg = c.register(info).await?;
                let reg_ms = t.elapsed().as_secs_f64() * 1e3;
                let mut stream = c.watch(reg.worker_id, reg.event_seq).await?;
                tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
                let a = c
                    .get_assignment(reg.worker_id, Duration::from_secs(600))
                    .await?;
                anyhow::Ok((reg.worker_id, a.rank, reg_ms, Instant::now()))
            }));
        }
        let mut registered = Vec::with_capacity(n);
        for t in tasks {
            registered.push(t.await??);
        }
        let last = registered.iter().map(|r| r.3).max().context("no workers")?;
        let rendezvous_s = last.duration_since(t0).as_secs_f64();
        let cpu_rdv = cpu_seconds(pid)?;
        let mut reg_ms: Vec<f64> = registered.iter().map(|r| r.2).collect();
        reg_ms.sort_by(f64::total_cmp);

        // Steady state: one beat a second per worker, spread evenly over the second.
        let start = tokio::time::Instant::now() + Duration::from_millis(200);
        let mut tasks = Vec::with_capacity(n);
        for (i, &(worker_id, rank, _, _)) in registered.iter().enumerate() {
            let c = clients[i % channels].clone();
            let offset = Duration::from_secs_f64(i as f64 / n as f64);
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(seconds as usize);
                let mut lag = Vec::with_capacity(seconds as usize);
                let mut seen = 0;
                for k in 0..seconds {
                    let due = start + offset + Duration::from_secs(k);
                    tokio::time::sleep_until(due).await;
                    let t = tokio::time::Instant::now();
                    lag.push((t - due).as_secs_f64() * 1e3);
                    let r = c
                        .heartbeat(pb::HeartbeatRequest {
                            worker_id,
                            steps: vec![pb::StepMetrics {
                                step: k + 1,
                                loss: (rank == 0).then_some(1.0 / (k + 1) as f64),
                                tokens_per_s: Some(1.0e5),
                                ..Default::default()
                            }],
                            seen_event_seq: seen,
                        })
                        .await?;
                    seen = r.events.last().map_or(seen, |e| e.seq);
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                anyhow::Ok((lat, lag))
            }));
        }
        tokio::time::sleep_until(start).await;
        let cpu1 = cpu_seconds(pid)?;
        let t1 = Instant::now();
        let mut lat = Vec::with_capacity(n * seconds as usize);
        let mut lag = Vec::with_capacity(n * seconds as usize);
        for t in tasks {
            let (l, g) = t.await??;
            lat.extend(l);
            lag.extend(g);
        }
        let window = t1.elapsed().as_secs_f64();
        let cpu2 = cpu_seconds(pid)?;
        let rss = rss_mb(pid);
        lat.sort_by(f64::total_cmp);
        lag.sort_by(f64::total_cmp);
        anyhow::Ok(Row {
            workers: n,
            channels,
            rendezvous_s,
            register_p50_ms: percentile(&reg_ms, 0.50),
            register_p99_ms: percentile(&reg_ms, 0.99),
            beats_per_s: lat.len() as f64 / window,
            heartbeat_p50_ms: percentile(&lat, 0.50),
            heartbeat_p99_ms: percentile(&lat, 0.99),
            lag_p99_ms: percentile(&lag, 0.99),
            cpu_rendezvous_s: cpu_rdv - cpu0,
            cpu_heartbeat_pct: 100.0 * (cpu2 - cpu1) / window,
            rss_mb: rss,
        })
    })?;
    // Closing stdin stops the coordinator (the job ends as stopped).
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(row)
}
