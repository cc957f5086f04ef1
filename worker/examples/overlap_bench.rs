//! bench/overlap: a dp = 2 training step with `parallel.overlap` off (every gradient
//! bucket all-reduced after the whole backward) and on (each bucket's all-reduce started as
//! soon as the backward has passed its layers), two ranks as threads over the tcp backend,
//! the same fixed batch every step. Run it through bench/overlap/run.sh.
//!
//!     overlap_bench [--config FILE] [--set k=v]... [--steps N] [--warmup N]
//!
//! Reported per mode (medians over the timed steps, rank 0): the step, the pipeline schedule
//! (forwards and backwards, including any reduction run inside the backward), and the wait
//! for reductions after the backward (communication left exposed). Both modes compute the
//! same bits; the bench checks that the two runs end with equal losses.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weaver_models::data::Split;
use weaver_models::JobConfig;
use weaver_parallel::comm::{Communicator, TcpComm};
use weaver_parallel::store::Store;
use weaver_parallel::tcp_store::{TcpStore, TcpStoreServer};
use weaver_worker::data::FixedBatches;
use weaver_worker::parallel::{ParallelTrainer, RankSetup};
use weaver_worker::train::dataset;

struct Args {
    config: Option<PathBuf>,
    sets: Vec<String>,
    steps: usize,
    warmup: usize,
}

fn args() -> Args {
    let mut a = Args {
        config: None,
        sets: Vec::new(),
        steps: 8,
        warmup: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--config" => a.config = Some(it.next().expect("--config FILE").into()),
            "--set" => a.sets.push(it.next().expect("--set k=v")),
            "--steps" => a.steps = it.next().and_then(|s| s.parse().ok()).expect("--steps N"),
            "--warmup" => a.warmup = it.next().and_then(|s| s.parse().ok()).expect("--warmup N"),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// The default: the `small` flavor, 16 samples per rank, one thread per rank.
const DEFAULT: &str = "[model]\nflavor = \"small\"\n\
    [train]\nglobal_batch = 32\nthreads = 1\n\
    [parallel]\ninit_timeout_s = 300\ntimeout_s = 300\n";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// (step, schedule, exposed wait) medians in seconds and the last loss, for one mode.
fn measure(base: &JobConfig, overlap: bool, a: &Args) -> (f64, f64, f64, f64) {
    let job = JobConfig::parse(
        &base.to_toml(),
        &[
            "parallel.dp=2".into(),
            "parallel.pp=1".into(),
            "parallel.tp=1".into(),
            format!("parallel.overlap={overlap}"),
        ],
    )
    .expect("bench config");
    let server = TcpStoreServer::bind("127.0.0.1:0").expect("store");
    let addr = server.addr();
    let dir = std::env::temp_dir().join(format!("weaver-overlap-bench-{}", std::process::id()));
    let (steps, warmup) = (a.steps, a.warmup);
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let (job, dir) = (job.clone(), dir.clone());
            std::thread::spawn(move || {
                let store: Arc<dyn Store> = Arc::new(TcpStore::new(addr, Duration::from_secs(60)));
                let comm: Arc<dyn Communicator> = Arc::new(
                    TcpComm::connect(
                        store,
                        &format!("overlap-{overlap}"),
                        rank,
                        2,
                        "127.0.0.1",
                        Duration::from_secs(300),
                    )
                    .expect("connect"),
                );
                let mut t = ParallelTrainer::new(
                    job.clone(),
                    RankSetup {
                        world: comm,
                        run_dir: dir,
                        local_procs: 2,
                        progress: false,
                        metrics: Some(Box::new(NoMetrics)),
                    },
                )
                .expect("rank");
                // This rank's micro-batches of one fixed global batch.
                let data = dataset(&job).expect("dataset");
                let m = job.parallel.microbatches;
                let mbs = job.micro_batch_size();
                let device = t.store().device;
                let micro = (rank * m..(rank + 1) * m)
                    .map(|k| {
                        let idx: Vec<u64> = (k * mbs..(k + 1) * mbs).map(|i| i as u64).collect();
                        data.batch(Split::Train, &idx, device).expect("batch")
                    })
                    .collect();
                t.set_source(Box::new(FixedBatches::new(micro)));
                let (mut step, mut sched, mut wait) = (Vec::new(), Vec::new(), Vec::new());
                for s in 0..warmup + steps {
                    let t0 = Instant::now();
                    t.step_once(false).expect("step");
                    if s >= warmup {
                        step.push(t0.elapsed().as_secs_f64());
                        sched.push(t.last_schedule_times().1);
                        wait.push(t.last_sync_wait());
                    }
                }
                let loss = t.train_step().expect("logged step").loss;
                (median(step), median(sched), median(wait), loss)
            })
        })
        .collect();
    let mut out: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect();
    drop(server);
    out.remove(0)
}

/// Metrics go nowhere (the bench prints its own table).
#[derive(Debug)]
struct NoMetrics;

impl weaver_worker::metrics::MetricsSink for NoMetrics {
    fn step(
        &mut self,
        _: &weaver_worker::metrics::StepMetrics,
    ) -> Result<(), weaver_worker::WorkerError> {
        Ok(())
    }
    fn eval(
        &mut self,
        _: &weaver_worker::metrics::EvalMetrics,
    ) -> Result<(), weaver_worker::WorkerError> {
        Ok(())
    }
    fn done(&mut self, _: &serde_json::Value) -> Result<(), weaver_worker::WorkerError> {
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let a = args();
    let base = match &a.config {
        Some(p) => JobConfig::load(p, &a.sets)?,
        None => JobConfig::parse(DEFAULT, &a.sets)?,
    };
    let params = base.model.num_params();
    println!(
        "overlap bench: flavor {} ({params} params, {:.1} MiB of f32 gradients per rank), dp 2 over tcp, global batch {}, {} micro-batch(es) per rank, bucket {} MiB",
        base.model.flavor,
        params as f64 * 4.0 / (1 << 20) as f64,
        base.train.global_batch,
        base.parallel.microbatches,
        base.parallel.bucket_mib
    );
    let rows: Vec<(bool, (f64, f64, f64, f64))> = [false, true]
        .into_iter()
        .map(|o| (o, measure(&base, o, &a)))
        .collect();
    println!(
        "{:<10} {:>12} {:>16} {:>22}",
        "overlap", "step (ms)", "schedule (ms)", "exposed wait (ms)"
    );
    for (o, (step, sched, wait, _)) in &rows {
        println!(
            "{:<10} {:>12.1} {:>16.1} {:>22.1}",
            if *o { "on" } else { "off" },
            step * 1e3,
            sched * 1e3,
            wait * 1e3
        );
    }
    let (off, on) = (rows[0].1, rows[1].1);
    println!("step time on / off: {:.3}", on.0 / off.0);
    if off.3 != on.3 {
        anyhow::bail!(
            "the two modes ended with different losses: {} vs {}",
            off.3,
            on.3
        );
    }
    for (o, (step, sched, wait, loss)) in &rows {
        let r = serde_json::json!({
            "bench": "overlap", "flavor": base.model.flavor, "dp": 2, "overlap": o,
            "step_s": step, "schedule_s": sched, "exposed_wait_s": wait, "final_loss": loss,
            "global_batch": base.train.global_batch, "bucket_mib": base.parallel.bucket_mib,
        });
        println!("RESULT {r}");
    }
    Ok(())
}
