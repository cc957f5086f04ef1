//! Same seed, same losses bit for bit on CPU (the trainer `weaver train` runs, and a
//! 2-rank parallel layout run twice); the bf16 compute path with f32 master weights trains.

use std::sync::Arc;
use std::time::Duration;

use tch::Kind;
use weaver_models::JobConfig;
use weaver_parallel::comm::{Communicator, TcpComm};
use weaver_parallel::store::Store;
use weaver_parallel::tcp_store::{TcpStore, TcpStoreServer};
use weaver_worker::parallel::{ParallelTrainer, RankSetup};

fn job(overrides: &[&str]) -> JobConfig {
    let mut o: Vec<String> = vec![
        "train.global_batch=8".into(),
        "parallel.microbatches=2".into(),
        "train.steps=6".into(),
        "train.warmup_steps=2".into(),
        "train.threads=1".into(),
    ];
    o.extend(overrides.iter().map(|s| s.to_string()));
    JobConfig::parse("[model]\nflavor = \"debug\"\n", &o).unwrap()
}

fn solo(overrides: &[&str], dir: &std::path::Path) -> ParallelTrainer {
    ParallelTrainer::solo(job(overrides), dir.to_path_buf(), false).unwrap()
}

fn losses(t: &mut ParallelTrainer, n: usize) -> Vec<f64> {
    (0..n).map(|_| t.train_step().unwrap().loss).collect()
}

#[test]
fn same_seed_same_losses_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let a = losses(&mut solo(&[], &dir.path().join("a")), 4);
    let b = losses(&mut solo(&[], &dir.path().join("b")), 4);
    assert_eq!(a, b, "two runs of one seed must agree exactly");
    let c = losses(&mut solo(&["train.seed=1"], &dir.path().join("c")), 4);
    assert_ne!(a[0], c[0], "another init seed must give other losses");
    let d = losses(&mut solo(&["data.seed=9"], &dir.path().join("d")), 4);
    assert_ne!(a[0], d[0], "another data seed must give other losses");
}

fn two_ranks(o: &[&str]) -> Vec<f64> {
    let j = job(o);
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let addr = server.addr();
    let dir = tempfile::tempdir().unwrap();
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let (j, run_dir) = (j.clone(), dir.path().to_path_buf());
            std::thread::spawn(move || {
                let store: Arc<dyn Store> = Arc::new(TcpStore::new(addr, Duration::from_secs(30)));
                let comm: Arc<dyn Communicator> = Arc::new(
                    TcpComm::connect(store, "det", rank, 2, "127.0.0.1", Duration::from_secs(60))
                        .unwrap(),
                );
                let setup = RankSetup {
                    world: comm,
                    run_dir,
                    local_procs: 2,
                    progress: false,
                    metrics: None,
                };
                let mut t = ParallelTrainer::new(j, setup).unwrap();
                losses(&mut t, 4)
            })
        })
        .collect();
    let mut out: Vec<Vec<f64>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    out.remove(0)
}

#[test]
fn a_parallel_layout_is_bit_for_bit_repeatable() {
    for layout in [["parallel.tp=2"], ["parallel.pp=2"]] {
        let a = two_ranks(&layout);
        let b = two_ranks(&layout);
        assert_eq!(a, b, "{layout:?} run twice");
    }
}

#[test]
fn overlapping_the_gradient_all_reduce_changes_no_bit() {
    // The buckets' sums are the same whether they start during the backward or after it.
    let off = two_ranks(&["parallel.dp=2", "parallel.overlap=false"]);
    let on = two_ranks(&["parallel.dp=2", "parallel.overlap=true"]);
    assert_eq!(off, on);
}

#[test]
fn bf16_compute_keeps_f32_masters_and_learns() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = solo(&["train.dtype=bf16", "train.lr=3e-3"], dir.path());
    assert_eq!(t.store().kind, Kind::BFloat16);
    assert!(t.optimizer().has_masters());
    for i in 0..t.store().params().len() {
        assert_eq!(t.optimizer().state(i).unwrap().value.kind(), Kind::Float);
    }
    let l = losses(&mut t, 6);
    assert!(l.iter().all(|x| x.is_finite()), "{l:?}");
    assert!(l[5] < l[0], "bf16 training should lower the loss: {l:?}");
    // The bf16 parameters are the rounded masters.
    for (i, p) in t.store().params().iter().enumerate() {
        let m = t
            .optimizer()
            .state(i)
            .unwrap()
            .value
            .to_kind(Kind::BFloat16);
        assert!(p.tensor.equal(&m), "{} drifted from its master", p.name);
    }
}
