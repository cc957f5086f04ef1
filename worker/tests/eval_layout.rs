//! Evaluation on the layout (each rank its shard, forward only through the pipeline, tensor
//! parallelism inside, the pool split over the data-parallel replicas) gives the numbers of
//! the single-process evaluation of the same weights — the one `weaver eval` runs.

mod common;

use std::sync::Arc;

use weaver_checkpoint::{block_on, Checkpoint, CkptStore};
use weaver_models::JobConfig;
use weaver_worker::ckpt::{is_param, open_resume, LocalCommitter};
use weaver_worker::eval::evaluate_weights;
use weaver_worker::parallel::{checkpoint_layout, ParallelTrainer, Plan};

const STEPS: u64 = 30;

fn job(tp: usize, pp: usize, dp: usize, ckpt: &std::path::Path) -> JobConfig {
    job_scheduled(tp, pp, dp, "1f1b", 1, ckpt)
}

/// [`job`] with pipeline schedule `schedule` and `v` virtual stages per pipeline rank.
fn job_scheduled(
    tp: usize,
    pp: usize,
    dp: usize,
    schedule: &str,
    v: usize,
    ckpt: &std::path::Path,
) -> JobConfig {
    common::job(
        tp,
        pp,
        dp,
        schedule,
        v,
        &[
            format!("train.steps={STEPS}"),
            "train.lr=3e-3".into(),
            "eval.pool=24".into(),
            // VQA accuracy is measured on the layout too (its rows cross the pipeline).
            "train.vqa_weight=0.5".into(),
            format!("checkpoint.url=\"{}\"", ckpt.display()),
        ],
    )
}

/// Everything an evaluation reports, to compare.
fn scores(e: &weaver_worker::metrics::EvalMetrics) -> [f64; 8] {
    [
        e.i2t_r1,
        e.i2t_r5,
        e.i2t_r10,
        e.t2i_r1,
        e.t2i_r5,
        e.t2i_r10,
        e.caption_exact,
        e.pool as f64,
    ]
}

#[test]
fn the_layout_evaluates_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    // Weights trained for a while (random ones would retrieve and caption at chance).
    let base = job(1, 1, 1, &ckpt);
    let mut t = ParallelTrainer::solo(base.clone(), dir.path().join("solo"), false).unwrap();
    let plan = Plan::new(t.job(), 1).unwrap();
    t.enable_checkpoints(Arc::new(LocalCommitter::new(
        CkptStore::open(&base.checkpoint.url).unwrap(),
        1,
        0,
        checkpoint_layout(t.job(), &plan),
    )))
    .unwrap();
    for _ in 0..STEPS {
        t.step_once(false).unwrap();
    }
    t.save_checkpoint().unwrap();
    t.finish_checkpoints().unwrap();
    let solo = t.evaluate().unwrap();

    // The reference: the whole model in one process, from the checkpoint's parameters.
    let c = block_on(Checkpoint::open_url(&base.checkpoint.url)).unwrap();
    let named: Vec<(String, tch::Tensor)> = c
        .manifest()
        .tensors
        .keys()
        .filter(|n| is_param(n))
        .map(|n| (n.clone(), block_on(c.read_tensor(n)).unwrap()))
        .collect();
    let reference = evaluate_weights(&base, &named, tch::Device::Cpu, STEPS).unwrap();
    eprintln!("one process: {reference:?}");
    assert!(reference.vqa_acc.is_some() && reference.vqa_majority.is_some());
    let same = |what: &str, e: &weaver_worker::metrics::EvalMetrics| {
        assert_eq!(scores(e), scores(&reference), "{what}: {e:?}");
        assert_eq!(
            (e.vqa_acc, e.vqa_majority),
            (reference.vqa_acc, reference.vqa_majority),
            "{what}: {e:?}"
        );
    };
    same("the one-process trainer", &solo);
    assert!(
        solo.i2t_r1 <= solo.i2t_r5 && solo.i2t_r5 <= solo.i2t_r10,
        "{solo:?}"
    );

    // Captions decode with the key/value cache on the stage models of a layout with one
    // chunk per pipeline rank, and without it through the schedule's chunks on an
    // interleaved one: both give the one-process decoder's captions.
    for (tp, pp, dp, v) in [(2, 2, 1, 1), (1, 1, 2, 1), (1, 2, 1, 2)] {
        let what = format!("(dp {dp}, pp {pp}, tp {tp}, {v} chunks per pipeline rank)");
        let schedule = if v > 1 { "interleaved" } else { "1f1b" };
        let j = job_scheduled(tp, pp, dp, schedule, v, &ckpt);
        let url = base.checkpoint.url.clone();
        let got = common::on_ranks(&j, &dir.path().join(&what), move |_, mut t| {
            let c = open_resume(&url, &t.job().checkpoint.url).unwrap();
            t.resume(c).unwrap();
            t.evaluate().unwrap()
        });
        for e in &got {
            same(&what, e);
        }
    }
}

/// Held-out shards (`data.eval_shards`, issue 11 item 7): a job trained on shards evaluates
/// on them — on the layout as in one process (`weaver eval`'s path), recall@1/5/10 both ways
/// in the metrics file's eval lines — and a pool larger than the shards is a clear error.
#[test]
fn held_out_shards_evaluate_on_the_layout_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (train, held) = (dir.path().join("train"), dir.path().join("held"));
    common::write_shards(&train, "train", 4, 0);
    common::write_shards(&held, "held", 2, 1000);
    let ckpt = dir.path().join("ckpt");
    let job = |tp: usize, pp: usize, dp: usize, extra: &[&str]| {
        let mut o: Vec<String> = vec![
            "train.steps=6".into(),
            "train.eval_every=3".into(),
            "eval.pool=20".into(),
            "data.source=\"shards\"".into(),
            format!("data.shards=\"{}\"", train.display()),
            format!("data.eval_shards=\"{}\"", held.display()),
            "data.workers=1".into(),
            "data.streams=4".into(),
            format!("checkpoint.url=\"{}\"", ckpt.display()),
        ];
        o.extend(extra.iter().map(|s| s.to_string()));
        common::job(tp, pp, dp, "1f1b", 1, &o)
    };
    let base = job(1, 1, 1, &[]);
    let run_dir = dir.path().join("solo");
    let mut t = ParallelTrainer::solo(base.clone(), run_dir.clone(), false).unwrap();
    let plan = Plan::new(t.job(), 1).unwrap();
    t.enable_checkpoints(Arc::new(LocalCommitter::new(
        CkptStore::open(&base.checkpoint.url).unwrap(),
        1,
        0,
        checkpoint_layout(t.job(), &plan),
    )))
    .unwrap();
    let summary = t.run().unwrap();
    let solo = summary.eval.expect("a job with held-out shards evaluates");
    assert_eq!(solo.pool, 20, "{solo:?}");
    assert!(
        solo.i2t_r1 <= solo.i2t_r5 && solo.i2t_r5 <= solo.i2t_r10,
        "{solo:?}"
    );
    // The eval lines of the metrics file (at step 3 and at the end) carry every recall.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["eval"] == true)
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for k in ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"] {
        assert!(lines[1][k].as_f64().is_some(), "{k} missing: {}", lines[1]);
    }
    assert_eq!(lines[1]["i2t_r5"].as_f64(), Some(solo.i2t_r5));

    // One process from the checkpoint's parameters (`weaver eval`).
    let c = block_on(Checkpoint::open_url(&base.checkpoint.url)).unwrap();
    let named: Vec<(String, tch::Tensor)> = c
        .manifest()
        .tensors
        .keys()
        .filter(|n| is_param(n))
        .map(|n| (n.clone(), block_on(c.read_tensor(n)).unwrap()))
        .collect();
    let reference = evaluate_weights(&base, &named, tch::Device::Cpu, 6).unwrap();
    assert_eq!(
        scores(&solo),
        scores(&reference),
        "{solo:?} vs {reference:?}"
    );
    for (tp, pp, dp) in [(2, 2, 1), (1, 1, 2)] {
        let what = format!("(dp {dp}, pp {pp}, tp {tp})");
        let j = job(tp, pp, dp, &[]);
        let url = base.checkpoint.url.clone();
        let got = common::on_ranks(&j, &dir.path().join(&what), move |_, mut t| {
            let c = open_resume(&url, &t.job().checkpoint.url).unwrap();
            t.resume(c).unwrap();
            t.evaluate().unwrap()
        });
        for e in &got {
            assert_eq!(scores(e), scores(&reference), "{what}: {e:?}");
        }
    }

    // More pairs asked for than the held-out shards hold.
    let big = job(1, 1, 1, &["eval.pool=40"]);
    let err = evaluate_weights(&big, &named, tch::Device::Cpu, 6).unwrap_err();
    assert!(err.to_string().contains("eval.pool"), "{err}");
}
