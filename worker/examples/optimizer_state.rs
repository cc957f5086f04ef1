//! Optimizer-state bytes per rank with and without the distributed optimizer
//! (`parallel.shard_optimizer`): the `small` flavor (or `--config`/`--set`) built at dp = 1,
//! 2 and 4 (ranks as threads over the tcp backend, nothing trained), each rank's
//! [`FlatAdamW::state_bytes`](weaver_worker::optim::FlatAdamW::state_bytes) — both AdamW
//! moments and, when parameters compute in another dtype than f32, the f32 masters.
//!
//!     cargo run --release -p weaver-worker --example optimizer_state [--set k=v]...
//!
//! Prints a table, then one `RESULT {json}` line per (dp, sharded) measurement.

use std::sync::Arc;
use std::time::Duration;

use weaver_models::JobConfig;
use weaver_parallel::comm::{Communicator, TcpComm};
use weaver_parallel::store::Store;
use weaver_parallel::tcp_store::{TcpStore, TcpStoreServer};
use weaver_worker::parallel::{ParallelTrainer, RankSetup};

const DEFAULT: &str = "[model]\nflavor = \"small\"\n\
    [train]\nglobal_batch = 16\nthreads = 1\n\
    [parallel]\ninit_timeout_s = 300\ntimeout_s = 300\n";

/// Each rank's optimizer-state bytes for `job` at `dp` (sharded or not).
fn per_rank(base: &JobConfig, dp: usize, sharded: bool) -> Vec<u64> {
    let job = JobConfig::parse(
        &base.to_toml(),
        &[
            format!("parallel.dp={dp}"),
            format!("parallel.microbatches={}", 4 / dp),
            format!("parallel.shard_optimizer={sharded}"),
        ],
    )
    .expect("config");
    let server = TcpStoreServer::bind("127.0.0.1:0").expect("store");
    let addr = server.addr();
    let dir = std::env::temp_dir().join(format!("weaver-optimizer-state-{}", std::process::id()));
    let handles: Vec<_> = (0..dp)
        .map(|rank| {
            let (job, dir) = (job.clone(), dir.clone());
            std::thread::spawn(move || {
                let store: Arc<dyn Store> = Arc::new(TcpStore::new(addr, Duration::from_secs(60)));
                let comm: Arc<dyn Communicator> = Arc::new(
                    TcpComm::connect(
                        store,
                        "state",
                        rank,
                        dp,
                        "127.0.0.1",
                        Duration::from_secs(300),
                    )
                    .expect("connect"),
                );
                let setup = RankSetup {
                    world: comm,
                    run_dir: dir,
                    local_procs: dp,
                    progress: false,
                    metrics: None,
                };
                let t = ParallelTrainer::new(job, setup).expect("rank");
                t.optimizer().state_bytes()
            })
        })
        .collect();
    let out = handles
        .into_iter()
        .map(|h| h.join().expect("rank"))
        .collect();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn main() {
    let mut sets = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--set" => sets.push(it.next().expect("--set k=v")),
            other => panic!("unknown argument {other} (only --set k=v)"),
        }
    }
    let base = JobConfig::parse(DEFAULT, &sets).expect("config");
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "flavor {} dtype {}: optimizer state per rank (AdamW moments + f32 masters if not f32)",
        base.model.flavor, base.train.dtype
    );
    println!("| dp | sharded | MiB per rank (max) | × of dp=1 |");
    println!("|---|---|---|---|");
    let whole = *per_rank(&base, 1, false).iter().max().expect("one rank");
    let mut results = Vec::new();
    for dp in [1usize, 2, 4] {
        for sharded in [false, true] {
            if dp == 1 && sharded {
                continue;
            }
            let bytes = per_rank(&base, dp, sharded);
            let max = *bytes.iter().max().expect("ranks");
            println!(
                "| {dp} | {sharded} | {:.2} | {:.3} |",
                mib(max),
                max as f64 / whole as f64
            );
            results.push(serde_json::json!({
                "bench": "optimizer_state",
                "flavor": base.model.flavor,
                "dtype": base.train.dtype,
                "dp": dp,
                "shard_optimizer": sharded,
                "state_bytes_per_rank": bytes,
            }));
        }
    }
    for r in results {
        println!("RESULT {r}");
    }
}
