//! VQA and MLM fine-tuning on WebDataset shards made by `weaver data pack` (a JSON-lines
//! file with `question` and `answer` beside each image's caption): a data-parallel run gives
//! one process's losses (total, MLM, VQA) step for step, a resumed run continues exactly, and
//! held-out VQA accuracy on `data.eval_shards` is the same on the layout as in `weaver eval`
//! (the whole model in one process, from the checkpoint).

mod common;

use std::path::Path;

use weaver_checkpoint::{block_on, Checkpoint};
use weaver_data::pack::{pack, PackOptions};
use weaver_data::shards::Stores;
use weaver_models::JobConfig;
use weaver_worker::ckpt::{is_param, open_resume};
use weaver_worker::eval::evaluate_weights;

const COLORS: [&str; 3] = ["red", "green", "blue"];
const SHAPES: [&str; 2] = ["circle", "square"];
const STEPS: u64 = 4;

/// Packs `n` test-pattern images (keys from `offset`) with their captions, questions and
/// answers (in the grammar tokenizer's words) into shards of 8 under `dir/out`. The answer
/// is "yes" for every third sample, "no" otherwise.
fn pack_set(dir: &Path, out: &str, n: u64, offset: u64) -> String {
    use weaver_data::image::{encode_png, test_pattern};
    let imgs = dir.join(format!("{out}-images"));
    std::fs::create_dir_all(&imgs).unwrap();
    let mut lines = String::new();
    for i in offset..offset + n {
        let name = format!("{i}.png");
        std::fs::write(
            imgs.join(&name),
            encode_png(&test_pattern(32, 32, i)).unwrap(),
        )
        .unwrap();
        let (color, shape) = (COLORS[(i % 3) as usize], SHAPES[(i / 3 % 2) as usize]);
        let line = serde_json::json!({
            "image": name,
            "caption": format!("a small {color} {shape}"),
            "question": format!("is the {shape} red ?"),
            "answer": if i % 3 == 0 { "yes" } else { "no" },
        });
        lines.push_str(&format!("{line}\n"));
    }
    let captions = dir.join(format!("{out}.jsonl"));
    std::fs::write(&captions, lines).unwrap();
    let shards = dir.join(out);
    pack(
        &PackOptions {
            images: imgs,
            captions,
            out: shards.to_string_lossy().into_owned(),
            shard_size: 8,
            image_size: None,
            prefix: out.into(),
            progress: false,
        },
        &Stores::default(),
    )
    .unwrap();
    shards.to_string_lossy().into_owned()
}

fn job(dp: usize, train: &str, eval: &str, ckpt: &Path) -> JobConfig {
    common::job(
        1,
        1,
        dp,
        "1f1b",
        1,
        &[
            "data.source=\"shards\"".into(),
            format!("data.shards=\"{train}\""),
            format!("data.eval_shards=\"{eval}\""),
            "data.streams=4".into(),
            "data.shuffle_buffer=3".into(),
            "data.workers=1".into(),
            "eval.pool=24".into(),
            "train.vqa_weight=1".into(),
            "train.mlm_weight=0.5".into(),
            format!("train.steps={STEPS}"),
            format!("checkpoint.url=\"{}\"", ckpt.display()),
        ],
    )
}

/// (total, MLM, VQA) losses of a step.
fn losses(m: &weaver_worker::metrics::StepMetrics) -> [f64; 3] {
    [m.loss, m.mlm.unwrap_or(-1.0), m.vqa.unwrap_or(-1.0)]
}

#[test]
fn vqa_and_mlm_from_packed_shards_match_one_process_resume_and_evaluate_alike() {
    let dir = tempfile::tempdir().unwrap();
    let train = pack_set(dir.path(), "train", 64, 0);
    let eval = pack_set(dir.path(), "heldout", 24, 1000);

    // One process.
    let solo_job = job(1, &train, &eval, &dir.path().join("ckpt1"));
    let solo = common::on_ranks(&solo_job, &dir.path().join("run1"), |_, mut t| {
        (0..STEPS)
            .map(|_| losses(&t.train_step().unwrap()))
            .collect::<Vec<_>>()
    })
    .remove(0);

    // dp = 2: a checkpoint after step 2 and after the last step, then an evaluation.
    let ckpt = dir.path().join("ckpt2");
    let dp_job = job(2, &train, &eval, &ckpt);
    let sink = common::committer(&dp_job);
    let results = common::on_ranks(&dp_job, &dir.path().join("run2"), move |_, mut t| {
        t.enable_checkpoints(sink.clone()).unwrap();
        let mut out = Vec::new();
        for _ in 0..STEPS {
            let m = t.train_step().unwrap();
            let d = m.data.expect("shard runs report data counters");
            assert_eq!(
                d.data_bad_image + d.data_bad_caption,
                0,
                "every sample has its question"
            );
            out.push(losses(&m));
            if t.step() == 2 || t.step() == STEPS {
                t.save_checkpoint().unwrap();
            }
        }
        t.finish_checkpoints().unwrap();
        (out, t.evaluate().unwrap())
    });
    let (dp2, layout_eval) = results[0].clone();
    for (r, (l, e)) in results.iter().enumerate() {
        assert_eq!(l, &dp2, "rank {r} reports other losses");
        assert_eq!(e.vqa_acc, layout_eval.vqa_acc, "rank {r}");
    }
    // Same samples, same questions, same masks: the losses agree up to the reduction order.
    for (step, (a, b)) in solo.iter().zip(&dp2).enumerate() {
        for (k, name) in ["total", "mlm", "vqa"].iter().enumerate() {
            assert!(a[k] > 0.0, "step {}: {name} {a:?}", step + 1);
            let rel = (a[k] - b[k]).abs() / a[k];
            assert!(
                rel < 1e-4,
                "step {} {name}: one process {} vs dp 2 {}",
                step + 1,
                a[k],
                b[k]
            );
        }
    }

    // Resumed from step 2 on the same layout: steps 3 and 4 exactly.
    let url = format!("{}/step-{:08}", ckpt.display(), 2);
    let resumed = common::on_ranks(&dp_job, &dir.path().join("run3"), move |_, mut t| {
        let c = open_resume(&url, &t.job().checkpoint.url).unwrap();
        assert_eq!(t.resume(c).unwrap(), 2);
        (0..STEPS - 2)
            .map(|_| losses(&t.train_step().unwrap()))
            .collect::<Vec<_>>()
    })
    .remove(0);
    assert_eq!(&dp2[2..], &resumed[..], "a resumed run continues exactly");

    // `weaver eval`'s path: the whole model in one process from the last checkpoint.
    let c = block_on(Checkpoint::open_url(&format!(
        "{}/step-{STEPS:08}",
        ckpt.display()
    )))
    .unwrap();
    let named: Vec<(String, tch::Tensor)> = c
        .manifest()
        .tensors
        .keys()
        .filter(|n| is_param(n))
        .map(|n| (n.clone(), block_on(c.read_tensor(n)).unwrap()))
        .collect();
    let reference = evaluate_weights(&dp_job, &named, tch::Device::Cpu, STEPS).unwrap();
    eprintln!("held-out shards: layout {layout_eval:?}\none process {reference:?}");
    assert_eq!(reference.pool, 24);
    // A third of the held-out answers are "yes": always answering "no" scores 2/3.
    assert_eq!(reference.vqa_majority, Some(16.0 / 24.0));
    // Four steps teach the decoder the answers' words: it answers at least the majority's
    // questions exactly (a pipeline that lost the questions or answers would score 0).
    assert!(reference.vqa_acc.unwrap() > 0.0, "{reference:?}");
    assert_eq!(
        (
            layout_eval.vqa_acc,
            layout_eval.vqa_majority,
            layout_eval.pool
        ),
        (reference.vqa_acc, reference.vqa_majority, reference.pool)
    );
    assert_eq!(
        (
            layout_eval.i2t_r1,
            layout_eval.t2i_r1,
            layout_eval.caption_exact
        ),
        (reference.i2t_r1, reference.t2i_r1, reference.caption_exact)
    );
}
