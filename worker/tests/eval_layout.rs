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
    common::job(
        tp,
        pp,
        dp,
        "1f1b",
        1,
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
        assert_eq!(
            (e.i2t_r1, e.t2i_r1, e.caption_exact, e.pool),
            (
                reference.i2t_r1,
                reference.t2i_r1,
                reference.caption_exact,
                reference.pool
            ),
            "{what}: {e:?}"
        );
        assert_eq!(
            (e.vqa_acc, e.vqa_majority),
            (reference.vqa_acc, reference.vqa_majority),
            "{what}: {e:?}"
        );
    };
    same("the one-process trainer", &solo);

    for (tp, pp, dp) in [(2, 2, 1), (1, 1, 2)] {
        let what = format!("(dp {dp}, pp {pp}, tp {tp})");
        let j = job(tp, pp, dp, &ckpt);
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
