//! 3-D parallel training equals single-process training: for each layout and schedule,
//! the losses of several steps and the final parameters match a single process that
//! accumulates the same micro-batches (the plain reference trainer).

mod common;

use tch::Tensor;
use weaver_models::JobConfig;
use weaver_worker::train::Trainer;

const STEPS: u64 = 5;

/// Losses of every step and the final global parameters of the reference trainer.
fn single(job: &JobConfig) -> (Vec<f64>, Vec<(String, Tensor)>) {
    let mut t = Trainer::new(job.clone()).unwrap();
    let losses = (0..STEPS).map(|_| t.train_step().unwrap().loss).collect();
    let params = t
        .store
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.tensor.detach().copy()))
        .collect();
    (losses, params)
}

/// The same with every rank a thread.
fn parallel(job: &JobConfig) -> (Vec<f64>, Vec<(String, Tensor)>) {
    let dir = tempfile::tempdir().unwrap();
    let results = common::on_ranks(job, dir.path(), |_, mut t| {
        let losses: Vec<f64> = (0..STEPS).map(|_| t.train_step().unwrap().loss).collect();
        (losses, common::local_params(&t))
    });
    let losses0 = results[0].0.clone();
    for (r, (l, _)) in results.iter().enumerate().skip(1) {
        assert_eq!(l, &losses0, "rank {r} reports other losses than rank 0");
    }
    let pieces = results.into_iter().map(|(_, p)| p).collect();
    (losses0, common::assemble(pieces))
}

fn check(tp: usize, pp: usize, dp: usize, schedule: &str, v: usize) {
    let j = common::job(tp, pp, dp, schedule, v, &[]);
    let (ref_losses, ref_params) = single(&j);
    let (losses, params) = parallel(&j);
    let what = format!("(tp {tp}, pp {pp}, dp {dp}, {schedule}, v {v})");
    // Tolerance (f32): a layout changes only the order of floating-point sums — TP splits
    // the inner sums of row-parallel products and the vocabulary softmax, DP sums
    // micro-batch gradients in another order — so each result moves by a few ulps (~1e-7
    // relative) per operation, amplified mildly over 5 AdamW steps. Measured: losses within
    // 1e-7 relative, parameters within 1e-5 absolute. 1e-4 (relative on losses, absolute on
    // parameters of magnitude ≲ 1) leaves margin, while any real error (a missing
    // all-reduce, a wrong slice, a dropped micro-batch) moves them by 1e-2 or more.
    let mut worst_loss = 0f64;
    for (step, (a, b)) in ref_losses.iter().zip(&losses).enumerate() {
        let rel = (a - b).abs() / a.abs();
        worst_loss = worst_loss.max(rel);
        assert!(
            rel < 1e-4,
            "{what} step {}: single {a} vs parallel {b}",
            step + 1
        );
    }
    assert_eq!(params.len(), ref_params.len(), "{what}: parameter count");
    let mut worst_param = 0f64;
    for (name, r) in &ref_params {
        let (_, p) = params
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{what}: {name} missing from the assembled model"));
        let diff = (r - p).abs().max().double_value(&[]);
        worst_param = worst_param.max(diff);
        assert!(diff < 1e-4, "{what}: {name} differs by {diff:e}");
    }
    eprintln!("{what}: worst loss rel diff {worst_loss:e}, worst param abs diff {worst_param:e}");
    // The runs really trained: the loss fell.
    assert!(
        ref_losses[STEPS as usize - 1] < ref_losses[0],
        "{what}: {ref_losses:?}"
    );
}

#[test]
fn tp2() {
    check(2, 1, 1, "1f1b", 1);
}

#[test]
fn dp2() {
    check(1, 1, 2, "1f1b", 1);
}

#[test]
fn pp2_every_schedule() {
    check(1, 2, 1, "gpipe", 1);
    check(1, 2, 1, "1f1b", 1);
    check(1, 2, 1, "interleaved", 2);
}

#[test]
fn tp2_pp2_every_schedule() {
    check(2, 2, 1, "gpipe", 1);
    check(2, 2, 1, "1f1b", 1);
    check(2, 2, 1, "interleaved", 2);
}

#[test]
fn pp2_dp2_every_schedule() {
    check(1, 2, 2, "gpipe", 1);
    check(1, 2, 2, "1f1b", 1);
    check(1, 2, 2, "interleaved", 2);
}

#[test]
fn tp2_pp2_dp2_every_schedule() {
    check(2, 2, 2, "gpipe", 1);
    check(2, 2, 2, "1f1b", 1);
    check(2, 2, 2, "interleaved", 2);
}
