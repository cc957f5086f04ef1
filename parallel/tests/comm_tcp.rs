//! The conformance suite on the tcp backend (world sizes 1, 2, 3, 4 and 8, ranks as
//! threads), plus what only real processes can show: a rank SIGKILLed in the middle of a
//! collective makes the others fail with a typed error within their timeout.

mod conformance;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use conformance::{Backend, Maker};
use tch::{Device, Kind, Tensor};
use weaver_parallel::comm::{CommError, Communicator, ReduceOp, TcpComm};
use weaver_parallel::store::Store;
use weaver_parallel::tcp_store::{TcpStore, TcpStoreServer};

struct Tcp;

fn store_server() -> &'static TcpStoreServer {
    static SERVER: OnceLock<TcpStoreServer> = OnceLock::new();
    SERVER.get_or_init(|| TcpStoreServer::bind("127.0.0.1:0").expect("bind the store"))
}

impl Backend for Tcp {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn world(&self, n: usize, timeout: Duration) -> Vec<Maker> {
        static WORLDS: AtomicUsize = AtomicUsize::new(0);
        // A fresh prefix per world: like a new job generation, it never sees old keys.
        let prefix = format!(
            "test/{}/gen{}",
            std::process::id(),
            WORLDS.fetch_add(1, Ordering::SeqCst)
        );
        let addr = store_server().addr();
        (0..n)
            .map(|r| {
                let prefix = prefix.clone();
                Box::new(move || {
                    let store: Arc<dyn Store> =
                        Arc::new(TcpStore::new(addr, Duration::from_secs(10)));
                    TcpComm::connect(store, &prefix, r, n, "127.0.0.1", timeout)
                        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
                }) as Maker
            })
            .collect()
    }

    fn detects_p2p_mismatch(&self) -> bool {
        true
    }
}

macro_rules! per_world {
    ($name:ident, $f:path) => {
        mod $name {
            #[test]
            fn world_1() {
                $f(&super::Tcp, 1)
            }
            #[test]
            fn world_2() {
                $f(&super::Tcp, 2)
            }
            #[test]
            fn world_3() {
                $f(&super::Tcp, 3)
            }
            #[test]
            fn world_4() {
                $f(&super::Tcp, 4)
            }
            #[test]
            fn world_8() {
                $f(&super::Tcp, 8)
            }
        }
    };
}

per_world!(all_reduce, crate::conformance::all_reduce_all);
per_world!(gather_scatter, crate::conformance::gather_scatter);
per_world!(broadcast, crate::conformance::broadcast_all);
per_world!(point_to_point, crate::conformance::point_to_point);
per_world!(barrier, crate::conformance::barrier_orders);
per_world!(subgroups, crate::conformance::subgroups);
per_world!(argument_errors, crate::conformance::argument_errors);

#[test]
fn p2p_mismatch() {
    conformance::p2p_mismatch(&Tcp)
}

#[test]
fn collective_mismatch() {
    conformance::collective_mismatch(&Tcp)
}

#[test]
fn timeout() {
    conformance::timeout(&Tcp)
}

#[test]
fn abort() {
    conformance::abort(&Tcp)
}

/// A rank that never even joins (never publishes its address) makes the others time out,
/// typed, within their timeout.
#[test]
fn a_rank_that_never_joins_is_a_timeout() {
    conformance::init();
    let mut makers = Tcp.world(2, Duration::from_millis(600));
    let _never_started = makers.pop();
    let c = (makers.pop().expect("rank 0"))().expect("rank 0 joins");
    let t0 = Instant::now();
    let e = c
        .all_reduce(
            &mut Tensor::ones([4], (Kind::Float, Device::Cpu)),
            ReduceOp::Sum,
        )
        .unwrap_err();
    assert!(matches!(e, CommError::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

/// The suite above runs over Unix sockets (all ranks share a host); run a cross-section of
/// it again with TCP connections forced, in a child process (the transport is chosen once
/// per process).
#[test]
fn the_suite_over_tcp_connections() {
    if std::env::var("WEAVER_COMM_TRANSPORT").as_deref() == Ok("tcp") {
        return; // already the child, or the whole run forces TCP
    }
    let exe = std::env::current_exe().expect("test binary");
    let status = Command::new(exe)
        .args([
            "--exact",
            "all_reduce::world_3",
            "gather_scatter::world_4",
            "broadcast::world_3",
            "point_to_point::world_2",
            "subgroups::world_8",
            "p2p_mismatch",
            "abort",
            "--test-threads=2",
        ])
        .env("WEAVER_COMM_TRANSPORT", "tcp")
        .status()
        .expect("run the child");
    assert!(status.success(), "the suite over TCP failed: {status}");
}

const CHILD_ENV: &str = "WEAVER_COMM_TEST_CHILD";

/// One rank of the kill test, run in a child process (this test binary, re-executed).
/// Loops on 8 MiB all-reduces until one fails; the victim SIGKILLs itself once it has
/// finished two and started the third.
#[test]
fn child_rank() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(',').collect();
    let [addr, prefix, rank, size, victim, timeout_ms] = parts[..] else {
        panic!("bad spec {spec}")
    };
    let (rank, size, victim): (usize, usize, usize) = (
        rank.parse().unwrap(),
        size.parse().unwrap(),
        victim.parse().unwrap(),
    );
    let timeout = Duration::from_millis(timeout_ms.parse().unwrap());
    tch::set_num_threads(1);
    let store: Arc<dyn Store> = Arc::new(TcpStore::new(
        addr.parse().unwrap(),
        Duration::from_secs(30),
    ));
    let comm = TcpComm::connect(
        store,
        prefix,
        rank,
        size,
        "127.0.0.1",
        Duration::from_secs(60),
    )
    .unwrap();
    comm.barrier().unwrap();
    comm.set_timeout(timeout);
    let mut t = Tensor::ones([2 << 20], (Kind::Float, Device::Cpu));
    for it in 0.. {
        if rank == victim && it == 2 {
            // Die from another thread while this one is inside the third all-reduce.
            std::thread::spawn(|| {
                // SAFETY: sending a signal to our own process.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            });
        }
        let t0 = Instant::now();
        if let Err(e) = comm.all_reduce(&mut t, ReduceOp::Sum) {
            let kind = match e {
                CommError::PeerLost { .. } => "PeerLost",
                CommError::Timeout { .. } => "Timeout",
                _ => "other",
            };
            println!(
                "OUTCOME rank={rank} iter={it} kind={kind} ms={} err={e}",
                t0.elapsed().as_millis()
            );
            return;
        }
    }
}

#[test]
fn peer_killed_mid_collective_fails_typed_within_timeout() {
    let server = TcpStoreServer::bind("127.0.0.1:0").expect("store");
    let (size, victim, timeout) = (4usize, 2usize, Duration::from_secs(8));
    let exe = std::env::current_exe().expect("test binary");
    let prefix = format!("kill/{}", std::process::id());
    let mut children = Vec::new();
    for rank in 0..size {
        let spec = format!(
            "{},{prefix},{rank},{size},{victim},{}",
            server.addr(),
            timeout.as_millis()
        );
        let child = Command::new(&exe)
            .args(["--exact", "child_rank", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, spec)
            .env("WEAVER_COMM_TRANSPORT", "tcp")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a rank");
        children.push(child);
    }
    // A watchdog so a regression shows up as a failure, not a hung test.
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if stop_rx.recv_timeout(Duration::from_secs(120)).is_err() {
            for pid in pids {
                // SAFETY: signalling our own children.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    });
    let mut outcomes = Vec::new();
    for (rank, mut child) in children.into_iter().enumerate() {
        let out = child.stdout.take().expect("stdout");
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            // The harness prints "test child_rank ... " on the same line.
            if let Some(at) = line.find("OUTCOME") {
                outcomes.push(line[at..].to_string());
            }
        }
        let status = child.wait().expect("wait");
        if rank == victim {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "the victim should have been killed"
            );
        } else {
            assert!(status.success(), "rank {rank} exited with {status}");
        }
    }
    let _ = stop_tx.send(());
    watchdog.join().unwrap();
    assert_eq!(
        outcomes.len(),
        size - 1,
        "every survivor reports: {outcomes:?}"
    );
    for o in &outcomes {
        assert!(
            o.contains("kind=PeerLost") || o.contains("kind=Timeout"),
            "untyped failure: {o}"
        );
        let ms: u128 = o
            .split("ms=")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .expect("ms");
        assert!(
            ms < timeout.as_millis() + 2000,
            "failed only after {ms} ms: {o}"
        );
    }
    eprintln!("{}", outcomes.join("\n"));
}
