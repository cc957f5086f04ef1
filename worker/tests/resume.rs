//! Checkpoints through the trainer: a resumed run continues exactly where the interrupted
//! one left off (bit for bit on CPU, one process and a parallel layout), a checkpoint saved
//! by one layout resumes on others, and a corrupt newest checkpoint falls back to the one
//! before.

mod common;

use std::path::Path;

use common::{committer, with_ckpt};
use tch::Tensor;
use weaver_models::JobConfig;
use weaver_worker::ckpt::open_resume;

/// Trains `steps` steps on every rank, checkpointing after step `save_at`; returns rank 0's
/// losses and the model (assembled from every rank's part) right after the save.
fn train_and_save(
    job: &JobConfig,
    steps: u64,
    save_at: u64,
    dir: &Path,
) -> (Vec<f64>, Vec<(String, Tensor)>) {
    let sink = committer(job);
    let out = common::on_ranks(job, dir, move |_, mut t| {
        t.enable_checkpoints(sink.clone()).unwrap();
        let mut losses = Vec::new();
        let mut saved = None;
        for _ in 0..steps {
            losses.push(t.train_step().unwrap().loss);
            if t.step() == save_at {
                t.save_checkpoint().unwrap();
                saved = Some(common::local_params(&t));
            }
        }
        t.finish_checkpoints().unwrap();
        (losses, saved.expect("the save step was reached"))
    });
    let losses = out[0].0.clone();
    (
        losses,
        common::assemble(out.into_iter().map(|(_, p)| p).collect()),
    )
}

/// Resumes `job` from `url` on every rank and trains `steps` more; returns rank 0's losses
/// and the model (assembled) right after loading.
fn resume_and_train(
    job: &JobConfig,
    url: &str,
    steps: u64,
    dir: &Path,
) -> (u64, Vec<f64>, Vec<(String, Tensor)>) {
    let url = url.to_string();
    let out = common::on_ranks(job, dir, move |_, mut t| {
        let ckpt = open_resume(&url, &t.job().checkpoint.url).unwrap();
        let step = t.resume(ckpt).unwrap();
        let loaded = common::local_params(&t);
        let losses: Vec<f64> = (0..steps).map(|_| t.train_step().unwrap().loss).collect();
        (step, losses, loaded)
    });
    let (step, losses) = (out[0].0, out[0].1.clone());
    (
        step,
        losses,
        common::assemble(out.into_iter().map(|(_, _, p)| p).collect()),
    )
}

fn step_url(root: &Path, step: u64) -> String {
    format!("{}/step-{step:08}", root.display())
}

fn assert_same_params(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: parameter count");
    for (name, x) in a {
        let (_, y) = b.iter().find(|(n, _)| n == name).unwrap();
        assert!(x.equal(y), "{what}: {name} differs after loading");
    }
}

#[test]
fn one_process_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let job = with_ckpt(common::job(1, 1, 1, "1f1b", 1, &[]), &ckpt);
    let (full, saved) = train_and_save(&job, 6, 3, dir.path());
    let (step, rest, loaded) = resume_and_train(&job, &step_url(&ckpt, 3), 3, dir.path());
    assert_eq!(step, 3);
    assert_same_params(&saved, &loaded, "one process");
    assert_eq!(
        &full[3..],
        &rest[..],
        "losses after resuming must equal the uninterrupted run's"
    );
}

#[test]
fn a_parallel_layout_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let job = with_ckpt(common::job(2, 2, 1, "1f1b", 1, &[]), &ckpt);
    let (full, saved) = train_and_save(&job, 6, 3, dir.path());
    let (_, rest, loaded) = resume_and_train(&job, &step_url(&ckpt, 3), 3, dir.path());
    assert_same_params(&saved, &loaded, "tp 2, pp 2");
    assert_eq!(&full[3..], &rest[..]);
}

#[test]
fn a_2x2x2_checkpoint_resumes_on_other_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let source = with_ckpt(common::job(2, 2, 2, "1f1b", 1, &[]), &ckpt);
    let (full, saved) = train_and_save(&source, 5, 3, dir.path());
    for (tp, pp, dp, schedule, v) in [
        (1, 1, 1, "1f1b", 1),
        (2, 1, 2, "1f1b", 1),
        (1, 2, 1, "gpipe", 1),
        (1, 2, 2, "interleaved", 2),
        (2, 1, 1, "1f1b", 1),
    ] {
        let what = format!("(2,2,2) → (tp {tp}, pp {pp}, dp {dp})");
        let target = with_ckpt(common::job(tp, pp, dp, schedule, v, &[]), &ckpt);
        let (step, rest, loaded) = resume_and_train(&target, &step_url(&ckpt, 3), 2, dir.path());
        assert_eq!(step, 3, "{what}");
        // The weights arrive exactly; the next losses differ from the uninterrupted run
        // only by the reduction order of the new layout (see parallel_parity.rs).
        assert_same_params(&saved, &loaded, &what);
        for (a, b) in full[3..].iter().zip(&rest) {
            let rel = (a - b).abs() / a.abs();
            assert!(rel < 1e-4, "{what}: {a} vs {b}");
        }
    }
}

#[test]
fn latest_falls_back_past_a_corrupt_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let job = with_ckpt(common::job(1, 1, 1, "1f1b", 1, &[]), &ckpt);
    let (_, _) = train_and_save(&job, 4, 2, dir.path());
    let _ = train_and_save(&with_ckpt(job.clone(), &ckpt), 4, 4, &dir.path().join("b"));
    // Flip a byte in the middle of the newest shard (parameter data).
    let shard = ckpt.join("step-00000004").join("shard-00000.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&shard, bytes).unwrap();
    let (step, _, _) = resume_and_train(&job, "latest", 1, dir.path());
    assert_eq!(step, 2, "the corrupt step 4 is passed over for step 2");
}
