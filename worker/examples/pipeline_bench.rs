//! bench/pipeline: the measured bubble (idle fraction per pipeline stage) of each schedule
//! against theory. Ranks are threads of this process talking over the tcp backend on
//! 127.0.0.1, each with one intra-op thread; run it through bench/pipeline/run.sh.
//!
//! Measured bubble of a rank = 1 − (time computing) / (time of the whole schedule), over
//! the timed steps; the table gives the mean and the worst rank. Theory: (p − 1)/(m + p − 1)
//! per the 1F1B analysis, divided by v for interleaved (Narayanan et al. 2021), and the
//! exact ideal (p − 1)/(v·m + p − 1) for equal stages and free transfers.

use std::sync::Arc;
use std::time::Duration;

use weaver_models::JobConfig;
use weaver_parallel::comm::{Communicator, TcpComm};
use weaver_parallel::pp::Schedule;
use weaver_parallel::store::Store;
use weaver_parallel::tcp_store::{TcpStore, TcpStoreServer};
use weaver_worker::parallel::{ParallelTrainer, Plan, RankSetup};

const WARMUP: u64 = 2;
const TIMED: u64 = 4;

fn job(p: usize, m: usize, schedule: &str, v: usize) -> JobConfig {
    // Near-equal layers: image and text blocks of one width and token count, no matching
    // negatives; the two multimodal blocks cost 1.33× (cross-attention). 8 layers, so every
    // stage count below divides them.
    let text = format!(
        "[model]\nflavor = \"debug\"\nvision_width = 128\ntext_width = 128\nembed_dim = 128\n\
         vision_layers = 3\nunimodal_layers = 3\nmultimodal_layers = 2\n\
         [train]\nsteps = {}\nglobal_batch = {}\nthreads = 1\nitm_weight = 0.0\n\
         [parallel]\npp = {p}\nmicrobatches = {m}\nschedule = \"{schedule}\"\nvirtual_stages = {v}\n",
        WARMUP + TIMED,
        16 * m
    );
    JobConfig::parse(&text, &[]).expect("bench config")
}

fn measure(p: usize, m: usize, schedule: &str, v: usize) -> (f64, f64) {
    let j = job(p, m, schedule, v);
    let server = TcpStoreServer::bind("127.0.0.1:0").expect("store");
    let addr = server.addr();
    let dir = std::env::temp_dir().join(format!("weaver-pipeline-bench-{}", std::process::id()));
    let prefix = format!("bench-{schedule}-{p}-{m}-{v}");
    let handles: Vec<_> = (0..p)
        .map(|rank| {
            let (j, dir, prefix) = (j.clone(), dir.clone(), prefix.clone());
            std::thread::spawn(move || {
                let store: Arc<dyn Store> = Arc::new(TcpStore::new(addr, Duration::from_secs(30)));
                let comm: Arc<dyn Communicator> = Arc::new(
                    TcpComm::connect(
                        store,
                        &prefix,
                        rank,
                        p,
                        "127.0.0.1",
                        Duration::from_secs(120),
                    )
                    .expect("connect"),
                );
                let mut t = ParallelTrainer::new(
                    j,
                    RankSetup {
                        world: comm,
                        run_dir: dir,
                        local_procs: p,
                        progress: false,
                        metrics: None,
                    },
                )
                .expect("rank");
                let (mut busy, mut total) = (0.0, 0.0);
                for step in 0..WARMUP + TIMED {
                    t.train_step().expect("step");
                    if step >= WARMUP {
                        let (b, a) = t.last_schedule_times();
                        busy += b;
                        total += a;
                    }
                }
                1.0 - busy / total
            })
        })
        .collect();
    let idle: Vec<f64> = handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    let mean = idle.iter().sum::<f64>() / idle.len() as f64;
    let worst = idle.iter().cloned().fold(0.0, f64::max);
    (mean, worst)
}

fn main() {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cases: [(&str, usize, usize, usize); 9] = [
        ("gpipe", 2, 4, 1),
        ("1f1b", 2, 4, 1),
        ("interleaved", 2, 4, 2),
        ("gpipe", 2, 8, 1),
        ("1f1b", 2, 8, 1),
        ("interleaved", 2, 8, 2),
        ("gpipe", 4, 8, 1),
        ("1f1b", 4, 8, 1),
        ("interleaved", 4, 8, 2),
    ];
    let mut rows = Vec::new();
    for (schedule, p, m, v) in cases {
        let j = job(p, m, schedule, v);
        let plan = Plan::new(&j, p).expect("plan");
        let s = Schedule::new(plan.kind, p, m, v).expect("schedule");
        let theory = (p as f64 - 1.0) / (m as f64 + p as f64 - 1.0) / v as f64;
        let exact = s.theoretical_bubble();
        let (mean, worst) = measure(p, m, schedule, v);
        rows.push((schedule, p, m, v, theory, exact, mean, worst));
    }
    println!("pipeline bubble: idle fraction per stage ({cores} cores; ranks above the core count share them)");
    println!(
        "{:<12} {:>3} {:>3} {:>3} {:>16} {:>14} {:>14} {:>14}",
        "schedule",
        "p",
        "m",
        "v",
        "theory (p-1)/..",
        "exact ideal",
        "measured mean",
        "measured worst"
    );
    for (s, p, m, v, th, ex, mean, worst) in &rows {
        println!("{s:<12} {p:>3} {m:>3} {v:>3} {th:>16.3} {ex:>14.3} {mean:>14.3} {worst:>14.3}");
    }
    for (s, p, m, v, th, ex, mean, worst) in &rows {
        println!(
            "RESULT {}",
            serde_json::json!({
                "bench": "pipeline", "schedule": s, "p": p, "m": m, "v": v,
                "theory_bubble": th, "exact_bubble": ex,
                "measured_bubble_mean": mean, "measured_bubble_worst": worst,
                "cores": cores,
            })
        );
    }
}
