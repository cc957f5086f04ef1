//! The conformance suite on the tcp backend (world sizes 1, 2, 3, 4 and 8, ranks as
//! threads), plus what only real processes can show: a rank SIGKILLed in the middle of a
//! collective makes the others fail with a typed error within their timeout.
//!
//! All ranks of these tests share a host, so by default every all-reduce goes through
//! shared memory: the whole suite runs on that path. The all-reduce tests run again with
//! shared memory off (the socket one-shot exchange and ring) and with a threshold of
//! 64 KiB (small all-reduces on the sockets, large ones in shared memory, on one
//! communicator), and shared-memory specifics follow the suite: results equal to the
//! ring's, abort and timeout while ranks wait in a barrier, groups in use at once, no
//! files left in /dev/shm.
//!
//! Then the staged path (CPU tensors copied through the communicator's host buffer, the
//! path of CUDA tensors) runs the suite, the device rule is checked (on a communicator for
//! `cuda:0`, which needs no GPU to refuse CPU tensors), the started (`*_start`) operations
//! run the suite's async part and show that they overlap the caller's work, and, where a
//! GPU is present, the suite runs on CUDA tensors with several ranks sharing it.

mod conformance;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use conformance::{Backend, Maker};
use tch::{Device, Kind, Tensor};
use weaver_parallel::comm::{shard_range, CommError, Communicator, ReduceOp, TcpComm};
use weaver_parallel::store::Store;
use weaver_parallel::tcp_store::{TcpStore, TcpStoreServer};

/// The tcp backend with a shared-memory setting, a device and a staging setting.
struct Tcp {
    name: &'static str,
    /// `None`: the environment's default; else `with_shm_min_bytes(x)`.
    shm: Option<Option<usize>>,
    /// `with_device`.
    device: Device,
    /// `with_host_staging`.
    staging: bool,
}

/// As configured by the environment (by default: shared memory for every all-reduce).
const TCP: Tcp = Tcp {
    name: "tcp",
    shm: None,
    device: Device::Cpu,
    staging: false,
};
/// Shared memory for every all-reduce, whatever the environment says.
const SHM: Tcp = Tcp {
    name: "tcp with shared memory",
    shm: Some(Some(0)),
    ..TCP
};
/// Shared memory off: sockets only.
const RING: Tcp = Tcp {
    name: "tcp without shared memory",
    shm: Some(None),
    ..TCP
};
/// Shared memory from 64 KiB: both paths on one communicator.
const MIXED: Tcp = Tcp {
    name: "tcp with shared memory from 64 KiB",
    shm: Some(Some(64 << 10)),
    ..TCP
};
/// CPU tensors staged through the communicator's host buffer: the code path of CUDA
/// tensors (copy in, the CPU algorithms, copy out), run without a GPU.
const STAGED: Tcp = Tcp {
    name: "tcp staged through host buffers",
    staging: true,
    ..TCP
};
/// The same on the sockets.
const STAGED_RING: Tcp = Tcp {
    name: "tcp staged through host buffers, without shared memory",
    shm: Some(None),
    staging: true,
    ..TCP
};
/// A communicator for CUDA device 0: on a machine with a GPU the whole suite runs on CUDA
/// tensors, ranks sharing the GPU; without one it still refuses CPU tensors.
const CUDA: Tcp = Tcp {
    name: "tcp on cuda:0",
    device: Device::Cuda(0),
    ..TCP
};

fn store_server() -> &'static TcpStoreServer {
    static SERVER: OnceLock<TcpStoreServer> = OnceLock::new();
    SERVER.get_or_init(|| TcpStoreServer::bind("127.0.0.1:0").expect("bind the store"))
}

impl Backend for Tcp {
    fn name(&self) -> &'static str {
        self.name
    }

    fn device(&self) -> Device {
        self.device
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
        let (shm, device, staging) = (self.shm, self.device, self.staging);
        (0..n)
            .map(|r| {
                let prefix = prefix.clone();
                Box::new(move || {
                    let store: Arc<dyn Store> =
                        Arc::new(TcpStore::new(addr, Duration::from_secs(10)));
                    let c = TcpComm::connect(store, &prefix, r, n, "127.0.0.1", timeout)?;
                    let c = match shm {
                        Some(min) => c.with_shm_min_bytes(min),
                        None => c,
                    };
                    let c = c.with_device(device).with_host_staging(staging);
                    Ok(Arc::new(c) as Arc<dyn Communicator>)
                }) as Maker
            })
            .collect()
    }

    fn detects_p2p_mismatch(&self) -> bool {
        true
    }

    fn other_device(&self) -> Option<Device> {
        match self.device {
            Device::Cpu => tch::Cuda::is_available().then_some(Device::Cuda(0)),
            _ => Some(Device::Cpu),
        }
    }
}

macro_rules! per_world {
    ($name:ident, $f:path) => {
        per_world!($name, $f, TCP);
    };
    ($name:ident, $f:path, $backend:ident) => {
        mod $name {
            #[test]
            fn world_1() {
                $f(&super::$backend, 1)
            }
            #[test]
            fn world_2() {
                $f(&super::$backend, 2)
            }
            #[test]
            fn world_3() {
                $f(&super::$backend, 3)
            }
            #[test]
            fn world_4() {
                $f(&super::$backend, 4)
            }
            #[test]
            fn world_8() {
                $f(&super::$backend, 8)
            }
        }
    };
}

/// One test running `$f` at each of the given world sizes in turn.
macro_rules! at_sizes {
    ($name:ident, $f:path, $backend:ident, [$($n:literal),+]) => {
        #[test]
        fn $name() {
            for n in [$($n),+] {
                $f(&$backend, n)
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
per_world!(
    all_reduce_without_shm,
    crate::conformance::all_reduce_all,
    RING
);
per_world!(subgroups_without_shm, crate::conformance::subgroups, RING);
per_world!(
    gather_scatter_without_shm,
    crate::conformance::gather_scatter,
    RING
);
per_world!(
    all_reduce_shm_from_64k,
    crate::conformance::all_reduce_all,
    MIXED
);
per_world!(subgroups_shm_from_64k, crate::conformance::subgroups, MIXED);
per_world!(
    gather_scatter_shm_from_64k,
    crate::conformance::gather_scatter,
    MIXED
);

/// Stream order (trivially kept on CPU tensors; the same check runs on NCCL on a GPU).
mod stream_order {
    #[test]
    fn world_1() {
        crate::conformance::collective_after_compute(&super::TCP, 1, 64)
    }
    #[test]
    fn world_3() {
        crate::conformance::collective_after_compute(&super::TCP, 3, 64)
    }
}

// The staged path (what CUDA tensors take), on CPU tensors.
at_sizes!(
    staged_all_reduce,
    conformance::all_reduce_all,
    STAGED,
    [1, 2, 3]
);
at_sizes!(
    staged_gather_scatter,
    conformance::gather_scatter,
    STAGED,
    [2, 4]
);
at_sizes!(staged_broadcast, conformance::broadcast_all, STAGED, [3]);
at_sizes!(
    staged_point_to_point,
    conformance::point_to_point,
    STAGED,
    [2, 3]
);
at_sizes!(staged_subgroups, conformance::subgroups, STAGED, [4]);
at_sizes!(
    staged_argument_errors,
    conformance::argument_errors,
    STAGED,
    [2]
);
at_sizes!(
    staged_ring_all_reduce,
    conformance::all_reduce_all,
    STAGED_RING,
    [2, 3]
);
at_sizes!(
    staged_ring_gather_scatter,
    conformance::gather_scatter,
    STAGED_RING,
    [3]
);

// The device rule.
at_sizes!(
    wrong_device_on_a_cuda_communicator,
    conformance::wrong_device,
    CUDA,
    [1, 2, 3]
);
at_sizes!(
    wrong_device_on_a_cpu_communicator,
    conformance::wrong_device,
    TCP,
    [2]
);
at_sizes!(wrong_device_staged, conformance::wrong_device, STAGED, [2]);

// Started operations.
per_world!(
    started_match_blocking,
    crate::conformance::started_match_blocking
);
per_world!(started_in_flight, crate::conformance::started_in_flight);
at_sizes!(
    started_argument_errors,
    conformance::started_argument_errors,
    TCP,
    [1, 3]
);
at_sizes!(
    started_in_flight_without_shm,
    conformance::started_in_flight,
    RING,
    [2, 3]
);
at_sizes!(
    started_match_blocking_without_shm,
    conformance::started_match_blocking,
    RING,
    [3]
);
at_sizes!(
    started_in_flight_staged,
    conformance::started_in_flight,
    STAGED,
    [2, 4]
);
at_sizes!(
    started_match_blocking_staged,
    conformance::started_match_blocking,
    STAGED,
    [2]
);

#[test]
fn started_timeout() {
    conformance::started_timeout(&TCP)
}

#[test]
fn started_timeout_without_shm() {
    conformance::started_timeout(&RING)
}

#[test]
fn started_abort() {
    conformance::started_abort(&TCP)
}

#[test]
fn started_abort_without_shm() {
    conformance::started_abort(&RING)
}

/// With a GPU: the suite on CUDA tensors over tcp, two and three ranks sharing device 0
/// (each call staged through pinned host memory). Without one there is nothing to run.
#[test]
fn the_suite_on_cuda_tensors() {
    if !tch::Cuda::is_available() {
        eprintln!("SKIPPED: no GPU here: the suite on CUDA tensors over tcp needs one");
        return;
    }
    for n in [1, 2, 3] {
        conformance::all_reduce_all(&CUDA, n);
        conformance::gather_scatter(&CUDA, n);
        conformance::broadcast_all(&CUDA, n);
        conformance::point_to_point(&CUDA, n);
        conformance::argument_errors(&CUDA, n);
        conformance::started_match_blocking(&CUDA, n);
        conformance::started_in_flight(&CUDA, n);
    }
    conformance::subgroups(&CUDA, 4);
    conformance::started_abort(&CUDA);
}

/// Started work really runs in the background: right after `all_reduce_start` returns the
/// operation cannot have finished (the peer has not even started its part, which it does
/// only once told so), the caller computes meanwhile (matrix products) without calling
/// the communicator, and the operation completes on its own — `is_done` turns true while
/// the caller is still computing, before any `wait`. Not a timing assertion: the order of
/// events is what is checked.
#[test]
fn started_work_overlaps_the_callers_computation() {
    for backend in [&TCP, &RING, &STAGED] {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Mutex::new(go_rx);
        conformance::run_world(backend, 2, conformance::TIMEOUT, |c| {
            let len = 4 << 20; // 16 MiB of f32
            let t = Tensor::full([len], c.rank() as f64 + 1.0, (Kind::Float, Device::Cpu));
            c.all_reduce(
                &mut Tensor::ones([8], (Kind::Float, Device::Cpu)),
                ReduceOp::Sum,
            )
            .expect("warm-up");
            if c.rank() == 0 {
                let w = c
                    .all_reduce_start(t.shallow_clone(), ReduceOp::Sum)
                    .expect("start");
                // The caller has control back and the work is pending: rank 1 has not
                // started its part.
                assert!(
                    !w.is_done(),
                    "{}: done before the peer took part",
                    backend.name
                );
                go_tx.send(()).expect("signal");
                let a = Tensor::ones([96, 96], (Kind::Float, Device::Cpu));
                let mut products = 0u64;
                let t0 = Instant::now();
                while !w.is_done() {
                    let _ = a.matmul(&a).sum(Kind::Float).double_value(&[]);
                    products += 1;
                    assert!(
                        t0.elapsed() < Duration::from_secs(60),
                        "{}: the started all-reduce made no progress",
                        backend.name
                    );
                }
                w.wait().expect("wait");
                assert!(t.eq(3.0).all().int64_value(&[]) == 1, "sum of 1 and 2");
                eprintln!(
                    "{}: {products} matrix products computed while the all-reduce ran",
                    backend.name
                );
            } else {
                go_rx.lock().expect("lock").recv().expect("wait for rank 0");
                let mut t = t;
                c.all_reduce(&mut t, ReduceOp::Sum).expect("rank 1's part");
            }
        });
    }
}

/// The host buffer of a staged communicator is allocated once and reused while calls fit.
#[test]
fn staging_reuses_its_host_buffer() {
    let prefix = fresh_prefix("stage-reuse");
    run_worlds_with(
        2,
        &prefix,
        |c| c.with_host_staging(true),
        |_, c| {
            for it in 0..20i64 {
                let mut t = Tensor::full([100_000], it, (Kind::Float, Device::Cpu));
                c.all_reduce(&mut t, ReduceOp::Sum).expect("all_reduce");
                let w = c
                    .all_reduce_start(t.shallow_clone(), ReduceOp::Sum)
                    .expect("start");
                w.wait().expect("wait");
                assert_eq!(t.double_value(&[0]), 4.0 * it as f64);
            }
            let (bytes, allocations) = c.staging_stats();
            assert_eq!(allocations, 1, "one allocation for 40 calls");
            assert!(bytes >= 400_000, "{bytes}");
        },
    );
}

#[test]
fn p2p_mismatch() {
    conformance::p2p_mismatch(&TCP)
}

#[test]
fn collective_mismatch() {
    conformance::collective_mismatch(&TCP)
}

#[test]
fn collective_mismatch_without_shm() {
    conformance::collective_mismatch(&RING)
}

#[test]
fn timeout() {
    conformance::timeout(&TCP)
}

#[test]
fn timeout_after_warm_up() {
    conformance::timeout_after_warm_up(&TCP, 1000)
}

#[test]
fn timeout_after_warm_up_in_shared_memory() {
    conformance::timeout_after_warm_up(&SHM, 3_000_001)
}

#[test]
fn timeout_after_warm_up_without_shm() {
    conformance::timeout_after_warm_up(&RING, 1000)
}

#[test]
fn abort() {
    conformance::abort(&TCP)
}

#[test]
fn abort_without_shm() {
    conformance::abort(&RING)
}

/// A rank that never even joins (never publishes its address) makes the others time out,
/// typed, within their timeout.
#[test]
fn a_rank_that_never_joins_is_a_timeout() {
    conformance::init();
    let mut makers = TCP.world(2, Duration::from_millis(600));
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
/// Loops on 8 MiB all-reduces (blocking, or started and waited for: `mode`) until one
/// fails; the victim SIGKILLs itself once it has finished two and started the third.
#[test]
fn child_rank() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(',').collect();
    let [addr, prefix, rank, size, victim, timeout_ms, mode] = parts[..] else {
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
        let result = match mode {
            "start" => {
                // Two in flight: the second queues behind the first.
                let a = comm.all_reduce_start(t.shallow_clone(), ReduceOp::Sum);
                let b = comm.all_reduce_start(
                    Tensor::ones([1000], (Kind::Float, Device::Cpu)),
                    ReduceOp::Sum,
                );
                match (a, b) {
                    (Ok(a), Ok(b)) => {
                        let first = a.wait();
                        let second = b.wait();
                        if first.is_err() {
                            assert!(second.is_err(), "queued work after a failure");
                        }
                        first.and(second)
                    }
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
            _ => comm.all_reduce(&mut t, ReduceOp::Sum),
        };
        if let Err(e) = result {
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
    kill_a_peer("tcp", "kill-tcp", "block");
}

/// The same while the collectives run as started work on the communicators' threads.
#[test]
fn peer_killed_during_started_work_fails_typed() {
    kill_a_peer("tcp", "kill-tcp-start", "start");
    let prefix = kill_a_peer("auto", "kill-shm-start", "start");
    assert_eq!(
        shm_files(&prefix),
        Vec::<String>::new(),
        "files left in /dev/shm"
    );
}

/// The same in shared memory (the ranks' default on one host): the survivors wait in a
/// barrier, notice the hang-up of the victim's sockets and fail with PeerLost long before
/// their timeout; the segment leaves nothing behind in /dev/shm.
#[test]
fn peer_killed_mid_shared_memory_all_reduce_fails_typed_fast() {
    let prefix = kill_a_peer("auto", "kill-shm", "block");
    assert_eq!(
        shm_files(&prefix),
        Vec::<String>::new(),
        "files left in /dev/shm"
    );
}

/// Runs four ranks as processes with `WEAVER_COMM_TRANSPORT=transport`, kills one in the
/// middle of an all-reduce (blocking or started: `mode`), checks the survivors' errors;
/// returns the prefix.
fn kill_a_peer(transport: &str, tag: &str, mode: &str) -> String {
    let server = TcpStoreServer::bind("127.0.0.1:0").expect("store");
    let (size, victim, timeout) = (4usize, 2usize, Duration::from_secs(8));
    let shm = transport != "tcp";
    let exe = std::env::current_exe().expect("test binary");
    let prefix = format!("{tag}/{}", std::process::id());
    let mut children = Vec::new();
    for rank in 0..size {
        let spec = format!(
            "{},{prefix},{rank},{size},{victim},{},{mode}",
            server.addr(),
            timeout.as_millis()
        );
        let child = Command::new(&exe)
            .args(["--exact", "child_rank", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, spec)
            .env("WEAVER_COMM_TRANSPORT", transport)
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
            o.contains("kind=PeerLost") || (!shm && o.contains("kind=Timeout")),
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
        if shm {
            // Noticed through the sockets' hang-up, checked every 50 ms while waiting.
            assert!(ms < 3000, "noticed the dead peer only after {ms} ms: {o}");
        }
    }
    eprintln!("{}", outcomes.join("\n"));
    prefix
}

// ---- Shared memory -------------------------------------------------------------------------

/// FNV-1a as the backend hashes a prefix; segments are named
/// `weaver-{hash(prefix)}-{group}-{nonce}` (see `comm::tcp::shm`).
fn prefix_hash(prefix: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in prefix.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= 0xff;
    h.wrapping_mul(0x0000_0100_0000_01b3)
}

fn segment_stem(prefix: &str) -> String {
    format!("weaver-{:016x}-", prefix_hash(prefix))
}

/// Files of `prefix`'s segments still in /dev/shm (there should never be any once a call
/// has returned: the creator removes the name as soon as everybody has mapped it).
fn shm_files(prefix: &str) -> Vec<String> {
    let stem = segment_stem(prefix);
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&stem))
                .collect()
        })
        .unwrap_or_default()
}

/// This process's mappings of `prefix`'s segments: (mappings, distinct segments).
fn shm_mappings(prefix: &str) -> (usize, usize) {
    let stem = format!("/dev/shm/{}", segment_stem(prefix));
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    let lines: Vec<&str> = maps.lines().filter(|l| l.contains(&stem)).collect();
    let mut names: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    names.sort_unstable();
    names.dedup();
    (lines.len(), names.len())
}

static PREFIXES: AtomicUsize = AtomicUsize::new(0);

fn fresh_prefix(tag: &str) -> String {
    format!(
        "{tag}/{}/{}",
        std::process::id(),
        PREFIXES.fetch_add(1, Ordering::SeqCst)
    )
}

/// Rank `r` of `n` under `prefix`, with `with_shm_min_bytes(shm)`.
fn join(prefix: &str, r: usize, n: usize, shm: Option<usize>) -> Arc<dyn Communicator> {
    let store: Arc<dyn Store> = Arc::new(TcpStore::new(
        store_server().addr(),
        Duration::from_secs(10),
    ));
    let c = TcpComm::connect(store, prefix, r, n, "127.0.0.1", conformance::TIMEOUT)
        .expect("connect")
        .with_shm_min_bytes(shm);
    Arc::new(c)
}

/// Runs `body(rank, comms)` on `n` rank threads, where `comms[k]` is the rank's member of
/// world `prefixes[k]` with shared-memory setting `shm[k]`.
fn run_worlds<F>(n: usize, prefixes: &[String], shm: &[Option<usize>], body: F)
where
    F: Fn(usize, Vec<Arc<dyn Communicator>>) + Sync,
{
    conformance::init();
    let body = &body;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                s.spawn(move || {
                    let comms = prefixes
                        .iter()
                        .zip(shm)
                        .map(|(p, &m)| join(p, r, n, m))
                        .collect();
                    body(r, comms)
                })
            })
            .collect();
        for (r, h) in handles.into_iter().enumerate() {
            if let Err(p) = h.join() {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("rank {r}: {msg}");
            }
        }
    });
}

/// Runs `body(rank, comm)` on `n` rank threads of world `prefix`, each rank's communicator
/// configured by `configure`.
fn run_worlds_with<C, F>(n: usize, prefix: &str, configure: C, body: F)
where
    C: Fn(TcpComm) -> TcpComm + Sync,
    F: Fn(usize, &TcpComm) + Sync,
{
    conformance::init();
    let (configure, body) = (&configure, &body);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                s.spawn(move || {
                    let store: Arc<dyn Store> = Arc::new(TcpStore::new(
                        store_server().addr(),
                        Duration::from_secs(10),
                    ));
                    let c =
                        TcpComm::connect(store, prefix, r, n, "127.0.0.1", conformance::TIMEOUT)
                            .expect("connect");
                    body(r, &configure(c))
                })
            })
            .collect();
        for (r, h) in handles.into_iter().enumerate() {
            if let Err(p) = h.join() {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("rank {r}: {msg}");
            }
        }
    });
}

/// A deterministic pseudo-random stream (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Rank `r`'s input for a comparison case: integers over (most of) their range, whose
/// sums wrap the same in any order; for floats, small integers for Sum/Avg (exact in any
/// order) and reals with NaNs for Max/Min (order-free, no zeros whose sign could differ).
fn compare_input(kind: Kind, op: ReduceOp, r: usize, len: usize, salt: u64) -> Tensor {
    let f = |i: usize| mix(salt ^ (r as u64) << 40 ^ i as u64);
    match kind {
        Kind::Int64 | Kind::Int | Kind::Int8 | Kind::Uint8 => {
            let v: Vec<i64> = (0..len).map(|i| (f(i) >> 1) as i64).collect();
            // to_kind wraps (two's complement truncation), like the data a peer sends.
            Tensor::from_slice(&v).to_kind(kind)
        }
        _ if matches!(op, ReduceOp::Sum | ReduceOp::Avg) => {
            let v: Vec<f64> = (0..len).map(|i| (f(i) % 17) as f64 - 8.0).collect();
            Tensor::from_slice(&v).to_kind(kind)
        }
        _ => {
            let v: Vec<f64> = (0..len)
                .map(|i| match f(i) % 97 {
                    0 => f64::NAN,
                    x => (x as f64 + 0.5) * if f(i) & 1 == 1 { -1.37 } else { 2.11 },
                })
                .collect();
            Tensor::from_slice(&v).to_kind(kind)
        }
    }
}

/// Equal values and equal NaN positions.
fn same(a: &Tensor, b: &Tensor) -> bool {
    let (na, nb) = (a.isnan(), b.isnan());
    na.equal(&nb) && a.masked_fill(&na, 0.0).equal(&b.masked_fill(&nb, 0.0))
}

/// Shared memory gives exactly the ring's results (all-reduce, reduce-scatter, all-gather)
/// on every dtype and op for data whose reduction does not depend on the order, and the
/// path really is taken (the segment is mapped) — at world sizes 2, 3, 4 and 8, with
/// lengths that cut chunks, parts and shards unevenly, and a reduce-scatter whose output is
/// a view of its input.
#[test]
fn shared_memory_matches_the_ring_exactly() {
    for n in [2usize, 3, 4, 8] {
        let prefixes = [fresh_prefix("cmp-shm"), fresh_prefix("cmp-ring")];
        run_worlds(n, &prefixes, &[Some(0), None], |r, comms| {
            let (shm, ring) = (&comms[0], &comms[1]);
            let kinds = [
                Kind::Float,
                Kind::Double,
                Kind::BFloat16,
                Kind::Half,
                Kind::Int64,
                Kind::Int,
                Kind::Int8,
                Kind::Uint8,
            ];
            let mut salt = 0;
            for kind in kinds {
                for op in conformance::OPS {
                    for len in [1usize, 7, 4097, 131_075, 700_001] {
                        if len == 700_001 && !matches!(kind, Kind::Float | Kind::BFloat16) {
                            continue; // the long case once per element size class is enough
                        }
                        salt += 1;
                        let mut a = compare_input(kind, op, r, len, salt);
                        let mut b = a.copy();
                        shm.all_reduce(&mut a, op)
                            .unwrap_or_else(|e| panic!("shm {kind:?} {op:?} {len}: {e}"));
                        ring.all_reduce(&mut b, op)
                            .unwrap_or_else(|e| panic!("ring {kind:?} {op:?} {len}: {e}"));
                        assert!(same(&a, &b), "{kind:?} {op:?} len {len}: shm != ring");
                    }
                }
                for (rows, width) in [(1usize, 1usize), (n + 1, 3), (5003, 1), (300_007, 2)] {
                    salt += 1;
                    let len = rows * width;
                    let mine = shard_range(rows, n, r);
                    let shape = |k: usize| [k as i64, width as i64];
                    for op in conformance::OPS {
                        let full = compare_input(kind, op, r, len, salt).view(shape(rows));
                        let mut a = Tensor::zeros(shape(mine.len()), (kind, Device::Cpu));
                        let mut b = a.copy();
                        shm.reduce_scatter(&full, &mut a, op)
                            .unwrap_or_else(|e| panic!("shm rs {kind:?} {op:?} {rows}: {e}"));
                        ring.reduce_scatter(&full, &mut b, op)
                            .unwrap_or_else(|e| panic!("ring rs {kind:?} {op:?} {rows}: {e}"));
                        assert!(
                            same(&a, &b),
                            "reduce_scatter {kind:?} {op:?} {rows}x{width}"
                        );
                        // The output as a view of the input's own shard.
                        let mut view = full.narrow(0, mine.start as i64, mine.len() as i64);
                        shm.reduce_scatter(&full, &mut view, op)
                            .unwrap_or_else(|e| panic!("shm rs in place {kind:?} {op:?}: {e}"));
                        assert!(same(&view, &b), "in-place reduce_scatter {kind:?} {op:?}");
                    }
                    let part = compare_input(kind, ReduceOp::Max, r, mine.len() * width, salt)
                        .view(shape(mine.len()));
                    let mut a = Tensor::zeros(shape(rows), (kind, Device::Cpu));
                    let mut b = a.copy();
                    shm.all_gather(&part, &mut a)
                        .unwrap_or_else(|e| panic!("shm ag {kind:?} {rows}: {e}"));
                    ring.all_gather(&part, &mut b)
                        .unwrap_or_else(|e| panic!("ring ag {kind:?} {rows}: {e}"));
                    assert!(same(&a, &b), "all_gather {kind:?} {rows}x{width}");
                }
            }
            shm.barrier().expect("barrier");
            if r == 0 {
                let (maps, segs) = shm_mappings(&prefixes[0]);
                assert_eq!((maps, segs), (n, 1), "every rank maps the one segment");
                assert_eq!(
                    shm_mappings(&prefixes[1]),
                    (0, 0),
                    "the ring world maps none"
                );
                assert!(shm_files(&prefixes[0]).is_empty(), "the name is gone");
            }
            shm.barrier().expect("barrier");
        });
        assert_eq!(shm_mappings(&prefixes[0]), (0, 0), "unmapped on drop");
    }
}

/// The world and two groups split from it all-reduce at the same time from three threads
/// of every rank: each communicator has its own segment, and none disturbs the others.
#[test]
fn groups_all_reduce_at_once_in_their_own_segments() {
    let n = 4;
    let prefix = fresh_prefix("groups-shm");
    run_worlds(n, std::slice::from_ref(&prefix), &[Some(0)], |r, comms| {
        let world = comms[0].clone();
        let all = world.split(Some(0), n - r).expect("split").expect("member");
        let pair = world
            .split(Some(r as u32 % 2), r)
            .expect("split")
            .expect("member");
        let work = |c: &Arc<dyn Communicator>, tag: i64| {
            for it in 0..8i64 {
                let len = [3i64, 70_001, 1_000_003][it as usize % 3];
                let mine = tag * 1000 + it * 10 + c.rank() as i64;
                let mut t = Tensor::full([len], mine, (Kind::Int64, Device::Cpu));
                c.all_reduce(&mut t, ReduceOp::Sum)
                    .unwrap_or_else(|e| panic!("group {tag} iteration {it}: {e}"));
                let want: i64 = (0..c.size()).map(|p| tag * 1000 + it * 10 + p as i64).sum();
                let ends = Tensor::cat(&[t.narrow(0, 0, 1), t.narrow(0, len - 1, 1)], 0);
                assert_eq!(Vec::<i64>::try_from(&ends).unwrap(), vec![want, want]);
                assert!(t.eq(want).all().int64_value(&[]) == 1, "group {tag}");
            }
        };
        std::thread::scope(|s| {
            let a = s.spawn(|| work(&all, 1));
            let b = s.spawn(|| work(&pair, 2));
            work(&world, 3);
            a.join().expect("group thread");
            b.join().expect("pair thread");
        });
        world.barrier().expect("barrier");
        if r == 0 {
            // World, all and two pairs: four segments, mapped once per member.
            assert_eq!(shm_mappings(&prefix), (3 * n, 4));
        }
        world.barrier().expect("barrier");
    });
    assert!(shm_files(&prefix).is_empty());
}

/// abort() of a rank that waits in a shared-memory barrier ends its call at once, and the
/// peer waiting with it fails right away with PeerLost (not at its timeout); a rank that
/// arrives later fails too.
#[test]
fn abort_while_ranks_wait_in_shared_memory() {
    let (tx, rx) = mpsc::channel::<()>();
    let rx = Mutex::new(rx);
    conformance::run_world(&SHM, 3, conformance::TIMEOUT, |c| {
        let mut t = Tensor::ones([1_000_003], (Kind::Float, Device::Cpu));
        c.all_reduce(&mut t, ReduceOp::Sum).expect("warm-up");
        let t0 = Instant::now();
        match c.rank() {
            0 => {
                // Waits for ranks 1 and 2; rank 1 is aborted meanwhile.
                let e = c.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
                assert!(matches!(e, CommError::PeerLost { rank: 1, .. }), "{e}");
                assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
                tx.send(()).expect("signal");
            }
            1 => {
                let e = std::thread::scope(|s| {
                    s.spawn(|| {
                        // Not a readiness wait: the abort is meant to land while we wait
                        // (if it came first the call would fail the same way).
                        std::thread::sleep(Duration::from_millis(300));
                        c.abort();
                    });
                    c.all_reduce(&mut t, ReduceOp::Sum).unwrap_err()
                });
                assert!(matches!(e, CommError::Aborted), "{e}");
                assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
            }
            _ => {
                rx.lock().expect("lock").recv().expect("wait for rank 0");
                let e = c.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
                assert!(matches!(e, CommError::PeerLost { .. }), "{e}");
            }
        }
    });
}
