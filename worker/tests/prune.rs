//! Pruning (`weaver ckpt prune`) and fine-tuning with the mask kept (`train.prune_mask`):
//! magnitude pruning zeroes the asked fraction of every block linear weight; fine-tuning on
//! a parallel layout keeps those entries exactly zero at every step (and without the mask
//! they do not stay zero: the check can fail); MLP pruning writes a smaller model that the
//! loader builds from the checkpoint's own config and that evaluates.

mod common;

use std::path::Path;

use common::{committer, with_ckpt};
use tch::{Kind, Tensor};
use weaver_compress::prune::{is_block_linear, prune, Method};
use weaver_models::JobConfig;

/// Trains a debug model 3 steps and checkpoints it; returns (job, its step directory).
fn trained(dir: &Path) -> (JobConfig, String) {
    let root = dir.join("dense");
    let job = with_ckpt(common::job(1, 1, 1, "1f1b", 1, &[]), &root);
    let sink = committer(&job);
    common::on_ranks(&job, dir, move |_, mut t| {
        t.enable_checkpoints(sink.clone()).unwrap();
        for _ in 0..3 {
            t.train_step().unwrap();
        }
        t.save_checkpoint().unwrap();
        t.finish_checkpoints().unwrap();
    });
    (job, format!("{}/step-{:08}", root.display(), 3))
}

/// Fine-tunes from `init` on pp 2 × dp 2 for 3 steps; returns, per rank, the largest
/// magnitude any entry that was zero at the start reached after each step, and how far the
/// other entries moved in all.
fn finetune(dir: &Path, init: &str, mask: bool) -> Vec<(Vec<f64>, f64)> {
    let job = common::job(
        1,
        2,
        2,
        "1f1b",
        1,
        &[
            format!("model.init_from=\"{init}\""),
            format!("train.prune_mask={mask}"),
        ],
    );
    common::on_ranks(&job, dir, |_, mut t| {
        let start: Vec<(String, Tensor)> = t
            .store()
            .params()
            .iter()
            .filter(|p| is_block_linear(&p.name))
            .map(|p| (p.name.clone(), p.tensor.detach().copy()))
            .collect();
        let mut worst = Vec::new();
        for _ in 0..3 {
            t.train_step().unwrap();
            let mut w = 0f64;
            for (name, s) in &start {
                let p = t.store().params().iter().find(|p| &p.name == name).unwrap();
                let pruned = s.eq(0.0).to_kind(Kind::Float);
                let v = (&p.tensor * &pruned).abs().max().double_value(&[]);
                w = w.max(v);
            }
            worst.push(w);
        }
        let moved: f64 = start
            .iter()
            .map(|(name, s)| {
                let p = t.store().params().iter().find(|p| &p.name == name).unwrap();
                (&p.tensor - s).abs().sum(Kind::Float).double_value(&[])
            })
            .sum();
        (worst, moved)
    })
}

#[test]
fn magnitude_pruned_weights_stay_exactly_zero_while_fine_tuning() {
    let dir = tempfile::tempdir().unwrap();
    let (job, url) = trained(dir.path());
    let out = dir.path().join("pruned");
    let r = prune(&url, out.to_str().unwrap(), &job, Method::Magnitude, 0.5).unwrap();
    // Every block linear weight lost exactly half of its entries (⌊0.5 · numel⌋).
    let loaded = weaver_compress::load(&r.url, &job, &weaver_compress::LoadOptions::cpu()).unwrap();
    let mut pruned_layers = 0;
    for p in loaded.store.params() {
        if is_block_linear(&p.name) {
            let z = p.tensor.eq(0.0).sum(Kind::Int64).int64_value(&[]);
            assert_eq!(z, p.tensor.numel() as i64 / 2, "{}", p.name);
            pruned_layers += 1;
        }
    }
    assert_eq!(pruned_layers, r.info.layers);
    assert!(pruned_layers > 0);
    let with_mask = finetune(dir.path(), &r.url, true);
    for (rank, (worst, moved)) in with_mask.iter().enumerate() {
        assert!(
            worst.iter().all(|&w| w == 0.0),
            "rank {rank}: a pruned entry left zero: {worst:?}"
        );
        assert!(*moved > 0.0, "rank {rank}: the kept weights did not train");
    }
    // The control: without the mask, the optimizer moves the pruned entries off zero.
    let without = finetune(dir.path(), &r.url, false);
    assert!(
        without.iter().any(|(w, _)| w.iter().any(|&v| v > 0.0)),
        "without train.prune_mask the zeros should move: {without:?}"
    );
}

#[test]
fn mlp_pruning_writes_a_smaller_model_that_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let (job, url) = trained(dir.path());
    let out = dir.path().join("mlp");
    let r = prune(&url, out.to_str().unwrap(), &job, Method::Mlp, 0.5).unwrap();
    assert!(r.params_after < r.params_before, "{r:?}");
    // The loader builds the smaller model from the checkpoint's own config (the caller's
    // job still says mlp_ratio 4).
    let loaded = weaver_compress::load(&r.url, &job, &weaver_compress::LoadOptions::cpu()).unwrap();
    assert_eq!(loaded.job.model.mlp_ratio, job.model.mlp_ratio / 2);
    let fc1 = loaded
        .store
        .params()
        .iter()
        .find(|p| p.name.ends_with("mlp.fc1.weight"))
        .unwrap()
        .global_shape
        .clone();
    assert_eq!(
        fc1[0],
        2 * job.model.text_width.min(job.model.vision_width) as i64
    );
    let data = weaver_worker::train::dataset(&loaded.job).unwrap();
    let e =
        weaver_worker::eval::evaluate(&loaded.model, &data, 64, 16, tch::Device::Cpu, 3).unwrap();
    assert!(e.i2t_r1.is_finite());
    // Whole channels went: the kept ones are the source's (fc2's columns are a subset).
    let src = weaver_compress::load(&url, &job, &weaver_compress::LoadOptions::cpu()).unwrap();
    let name = "text.unimodal.0.mlp.fc2.weight";
    let a = src.store.get(name).unwrap();
    let b = loaded.store.get(name).unwrap();
    for j in 0..b.size()[1] {
        let col = b.select(1, j);
        let found = (0..a.size()[1]).any(|k| a.select(1, k).equal(&col));
        assert!(found, "{name} column {j} is not a column of the source");
    }
}

#[test]
fn bad_pruning_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (job, url) = trained(dir.path());
    let out = dir.path().join("x");
    let out = out.to_str().unwrap();
    let e = prune(&url, out, &job, Method::Heads, 0.5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--method"), "{e}");
    let e = prune(&url, out, &job, Method::Mlp, 0.3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--sparsity"), "{e}");
    let e = prune(&url, out, &job, Method::Magnitude, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--sparsity"), "{e}");
    let e = JobConfig::parse(&job.to_toml(), &["train.prune_mask=true".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.init_from"), "{e}");
}
