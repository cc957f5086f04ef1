//! Same seed, same losses bit for bit on CPU; the bf16 compute path with f32 master
//! weights trains.

use tch::Kind;
use weaver_models::JobConfig;
use weaver_worker::train::{TrainOptions, Trainer};

fn trainer(overrides: &[&str], dir: &std::path::Path) -> Trainer {
    let mut o: Vec<String> = vec![
        "train.global_batch=8".into(),
        "parallel.microbatches=2".into(),
        "train.steps=6".into(),
        "train.warmup_steps=2".into(),
        "train.threads=1".into(),
    ];
    o.extend(overrides.iter().map(|s| s.to_string()));
    let job = JobConfig::parse("[model]\nflavor = \"debug\"\npatch_size = 8\n", &o).unwrap();
    Trainer::new(
        job,
        TrainOptions {
            run_dir: dir.to_path_buf(),
            progress: false,
            local_procs: 1,
        },
    )
    .unwrap()
}

fn losses(t: &mut Trainer, n: usize) -> Vec<f64> {
    (0..n).map(|_| t.train_step().unwrap().loss).collect()
}

#[test]
fn same_seed_same_losses_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let a = losses(&mut trainer(&[], &dir.path().join("a")), 4);
    let b = losses(&mut trainer(&[], &dir.path().join("b")), 4);
    assert_eq!(a, b, "two runs of one seed must agree exactly");
    let c = losses(&mut trainer(&["train.seed=1"], &dir.path().join("c")), 4);
    assert_ne!(a[0], c[0], "another init seed must give other losses");
    let d = losses(&mut trainer(&["data.seed=9"], &dir.path().join("d")), 4);
    assert_ne!(a[0], d[0], "another data seed must give other losses");
}

#[test]
fn bf16_compute_keeps_f32_masters_and_learns() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(&["train.dtype=bf16", "train.lr=3e-3"], dir.path());
    assert_eq!(t.store.kind, Kind::BFloat16);
    assert!(t
        .opt
        .states
        .iter()
        .all(|s| s.master.as_ref().map(|m| m.kind()) == Some(Kind::Float)));
    let l = losses(&mut t, 6);
    assert!(l.iter().all(|x| x.is_finite()), "{l:?}");
    assert!(l[5] < l[0], "bf16 training should lower the loss: {l:?}");
    // The bf16 parameters are the rounded masters.
    for (p, s) in t.store.params().iter().zip(&t.opt.states) {
        let m = s.master.as_ref().unwrap().to_kind(Kind::BFloat16);
        assert!(p.tensor.equal(&m), "{} drifted from its master", p.name);
    }
}
