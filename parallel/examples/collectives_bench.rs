//! bench/collectives: all-reduce bus bandwidth of the tcp backend against
//! `torch.distributed`'s gloo backend, on loopback, in one run (run it with
//! `bench/collectives/run.sh`).
//!
//! For each world size W this starts W weaver ranks (this binary, as configured: shared
//! memory between ranks of one host, or whatever `WEAVER_COMM_*` says), W weaver ranks
//! forced onto TCP loopback (`WEAVER_COMM_TRANSPORT=tcp`: sockets only), and W gloo
//! ranks (`gloo_allreduce.py`), keeps all three sets alive, and for each size asks each in
//! turn to time it — interleaved, so a load change on the machine hits all alike. Each
//! measurement: one warm-up repeat, then REPS repeats of ITERS float32 SUM all-reduces, a
//! barrier before each repeat; the median repeat's time per all-reduce on rank 0 counts. Bus
//! bandwidth as nccl-tests defines it: `bytes / time * 2(W-1)/W`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use weaver_parallel::comm::{Communicator, ReduceOp, TcpComm};
use weaver_parallel::store::Store;
use weaver_parallel::tcp_store::{TcpStore, TcpStoreServer};

const WORKER_ENV: &str = "WEAVER_BENCH_WORKER";

struct Opts {
    worlds: Vec<usize>,
    min: usize,
    max: usize,
    python: Option<String>,
    gloo: Option<String>,
}

fn parse() -> Opts {
    let mut o = Opts {
        worlds: vec![2, 4],
        min: 1 << 10,
        max: 256 << 20,
        python: None,
        gloo: None,
    };
    let mut args = std::env::args().skip(1);
    let mut no_gloo = false;
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--worlds" => {
                o.worlds = val()
                    .split(',')
                    .map(|w| w.parse().expect("world size"))
                    .collect()
            }
            "--min" => o.min = val().parse().expect("bytes"),
            "--max" => o.max = val().parse().expect("bytes"),
            "--python" => o.python = Some(val()),
            "--gloo" => o.gloo = Some(val()),
            "--no-gloo" => no_gloo = true,
            other => panic!("unknown argument {other}"),
        }
    }
    if no_gloo {
        o.gloo = None;
    }
    o
}

/// Iterations per repeat and repeats, from the size: ~tens of ms per repeat for small
/// messages, at least two all-reduces per repeat for large ones.
fn plan(bytes: usize) -> (usize, usize) {
    let iters = ((64usize << 20) / bytes).clamp(2, 400);
    let reps = if bytes >= 64 << 20 { 3 } else { 7 };
    (iters, reps)
}

fn worker(spec: &str) {
    let p: Vec<&str> = spec.split(',').collect();
    let (addr, prefix, rank, world) = (
        p[0],
        p[1],
        p[2].parse::<usize>().unwrap(),
        p[3].parse::<usize>().unwrap(),
    );
    tch::set_num_threads(1);
    let store: Arc<dyn Store> = Arc::new(TcpStore::new(
        addr.parse().unwrap(),
        Duration::from_secs(60),
    ));
    let comm = TcpComm::connect(
        store,
        prefix,
        rank,
        world,
        "127.0.0.1",
        Duration::from_secs(300),
    )
    .unwrap();
    comm.barrier().unwrap();
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        let cmd: Vec<&str> = line.split_whitespace().collect();
        if cmd.first() != Some(&"run") {
            break;
        }
        let (bytes, iters, reps): (usize, usize, usize) = (
            cmd[1].parse().unwrap(),
            cmd[2].parse().unwrap(),
            cmd[3].parse().unwrap(),
        );
        let mut t = Tensor::zeros([(bytes / 4) as i64], (Kind::Float, Device::Cpu));
        for _ in 0..iters {
            comm.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        }
        let mut times = Vec::new();
        let cpu0 = cpu_seconds();
        for _ in 0..reps {
            comm.barrier().unwrap();
            let t0 = Instant::now();
            for _ in 0..iters {
                comm.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            }
            times.push(t0.elapsed().as_secs_f64() / iters as f64);
        }
        let cpu = (cpu_seconds() - cpu0) / (iters * reps) as f64;
        if rank == 0 {
            let ts: Vec<String> = times.iter().map(|t| t.to_string()).collect();
            println!("RES {bytes} {cpu} {}", ts.join(" "));
        }
    }
}

/// CPU time (user + system, all threads) this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// A set of W ranks driven over stdin/stdout.
struct Side {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    rank0: BufReader<ChildStdout>,
}

impl Side {
    fn start(mut cmds: Vec<Command>) -> Side {
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        let mut rank0 = None;
        for (r, c) in cmds.iter_mut().enumerate() {
            let mut child = c
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn a rank");
            stdins.push(child.stdin.take().unwrap());
            let out = child.stdout.take().unwrap();
            if r == 0 {
                rank0 = Some(BufReader::new(out));
            }
            children.push(child);
        }
        Side {
            children,
            stdins,
            rank0: rank0.unwrap(),
        }
    }

    /// Median seconds per all-reduce, and rank 0's CPU seconds per all-reduce.
    fn measure(&mut self, bytes: usize) -> (f64, f64) {
        let (iters, reps) = plan(bytes);
        for s in &mut self.stdins {
            writeln!(s, "run {bytes} {iters} {reps}").unwrap();
            s.flush().unwrap();
        }
        let mut line = String::new();
        loop {
            line.clear();
            if self.rank0.read_line(&mut line).unwrap() == 0 {
                panic!("rank 0 exited");
            }
            if let Some(rest) = line.strip_prefix("RES ") {
                let mut v: Vec<f64> = rest
                    .split_whitespace()
                    .skip(1)
                    .map(|x| x.parse().unwrap())
                    .collect();
                let cpu = v.remove(0);
                v.sort_by(|a, b| a.total_cmp(b));
                return (v[v.len() / 2], cpu);
            }
        }
    }

    fn stop(mut self) {
        for s in &mut self.stdins {
            let _ = writeln!(s, "quit");
        }
        self.stdins.clear();
        for mut c in self.children {
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn busbw(bytes: usize, secs: f64, world: usize) -> f64 {
    bytes as f64 / secs * 2.0 * (world - 1) as f64 / world as f64 / 1e9
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{} KiB", b >> 10),
    }
}

/// One measured size.
struct Row {
    world: usize,
    bytes: usize,
    /// Seconds per all-reduce: weaver as configured (shared memory between local ranks),
    /// weaver over TCP loopback, gloo.
    weaver: f64,
    weaver_tcp: f64,
    gloo: Option<f64>,
}

fn weaver_side(
    exe: &std::path::Path,
    store: std::net::SocketAddr,
    tag: &str,
    world: usize,
    tcp_only: bool,
) -> Side {
    Side::start(
        (0..world)
            .map(|r| {
                let mut c = Command::new(exe);
                c.env(
                    WORKER_ENV,
                    format!("{store},bench/{tag}/w{world},{r},{world}"),
                );
                if tcp_only {
                    c.env("WEAVER_COMM_TRANSPORT", "tcp");
                }
                c
            })
            .collect(),
    )
}

fn main() {
    if let Ok(spec) = std::env::var(WORKER_ENV) {
        return worker(&spec);
    }
    let o = parse();
    let exe = std::env::current_exe().unwrap();
    let mut rows = Vec::new();
    for &world in &o.worlds {
        let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
        let mut weaver = weaver_side(&exe, server.addr(), "auto", world, false);
        let mut weaver_tcp = weaver_side(&exe, server.addr(), "tcp", world, true);
        let port = free_port();
        let mut gloo = match (&o.python, &o.gloo) {
            (Some(py), Some(script)) => Some(Side::start(
                (0..world)
                    .map(|r| {
                        let mut c = Command::new(py);
                        c.args([
                            script.as_str(),
                            "--rank",
                            &r.to_string(),
                            "--world",
                            &world.to_string(),
                            "--port",
                            &port.to_string(),
                        ]);
                        c
                    })
                    .collect(),
            )),
            _ => None,
        };
        let mut bytes = o.min;
        while bytes <= o.max {
            let (tw, cw) = weaver.measure(bytes);
            let (tt, ct) = weaver_tcp.measure(bytes);
            let g = gloo.as_mut().map(|g| g.measure(bytes));
            eprintln!(
                "measured world {world} {}: weaver {:.3} GB/s (cpu {:.0} us/op), over tcp {:.3} GB/s (cpu {:.0} us/op){}",
                human(bytes),
                busbw(bytes, tw, world),
                cw * 1e6,
                busbw(bytes, tt, world),
                ct * 1e6,
                g.map(|(t, c)| format!(", gloo {:.3} GB/s (cpu {:.0} us/op)", busbw(bytes, t, world), c * 1e6))
                    .unwrap_or_default()
            );
            rows.push(Row {
                world,
                bytes,
                weaver: tw,
                weaver_tcp: tt,
                gloo: g.map(|g| g.0),
            });
            bytes *= 4;
        }
        weaver.stop();
        weaver_tcp.stop();
        if let Some(g) = gloo {
            g.stop();
        }
    }
    println!("all-reduce, float32 sum, one host; bus bandwidth = bytes / time * 2(W-1)/W, GB/s");
    println!("weaver: tcp backend as configured (shared memory between ranks of one host);");
    println!("weaver/tcp: the same over TCP loopback (WEAVER_COMM_TRANSPORT=tcp); gloo: torch.distributed");
    println!(
        "{:>5} {:>9} | {:>10} {:>8} | {:>10} {:>8} | {:>10} {:>8} | {:>7} {:>10}",
        "world",
        "size",
        "weaver",
        "GB/s",
        "weaver/tcp",
        "GB/s",
        "gloo",
        "GB/s",
        "ratio",
        "tcp ratio"
    );
    let us = |t: f64| format!("{:.1} us", t * 1e6);
    for r in &rows {
        let (bw, bt) = (
            busbw(r.bytes, r.weaver, r.world),
            busbw(r.bytes, r.weaver_tcp, r.world),
        );
        let (gt, gb, ratio, tratio) = match r.gloo {
            Some(t) => {
                let g = busbw(r.bytes, t, r.world);
                (
                    us(t),
                    format!("{g:.3}"),
                    format!("{:.2}x", bw / g),
                    format!("{:.2}x", bt / g),
                )
            }
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:>5} {:>9} | {:>10} {bw:>8.3} | {:>10} {bt:>8.3} | {gt:>10} {gb:>8} | {ratio:>7} {tratio:>10}",
            r.world,
            human(r.bytes),
            us(r.weaver),
            us(r.weaver_tcp)
        );
    }
    for r in &rows {
        let g = r
            .gloo
            .map(|t| format!("{:.4}", busbw(r.bytes, t, r.world)))
            .unwrap_or_else(|| "null".into());
        println!(
            "RESULT {{\"world\":{},\"bytes\":{},\"weaver_busbw_gbps\":{:.4},\"gloo_busbw_gbps\":{g},\"weaver_tcp_busbw_gbps\":{:.4}}}",
            r.world,
            r.bytes,
            busbw(r.bytes, r.weaver, r.world),
            busbw(r.bytes, r.weaver_tcp, r.world)
        );
    }
}
