//! Fine-tuning controls through the trainer (issue 13 item 4): frozen parts stay bitwise
//! unchanged and out of the optimizer, on one process and under a (dp, pp, tp) layout;
//! learning-rate multipliers (0 keeps a part, 1 is the default run bit for bit); frozen
//! checkpoints resume unfrozen and the reverse; LoRA starts as the base model, trains only
//! its adapters, matches the collapsed run under a 3-D layout, and its merged export
//! computes what the adapted model does.

mod common;

use std::path::Path;
use std::sync::Arc;

use tch::{Device, Tensor};
use weaver_checkpoint::{Checkpoint, CkptStore};
use weaver_config::finetune::{is_lora, part_of};
use weaver_models::data::Split;
use weaver_models::model::{Acts, LossWeights};
use weaver_models::JobConfig;
use weaver_parallel::tp::NoTp;
use weaver_worker::ckpt::{export_params, LocalCommitter, ShardSink};
use weaver_worker::init::{load_init_from, Values};
use weaver_worker::parallel::{checkpoint_layout, collapse, ParallelTrainer, Plan};
use weaver_worker::train::build;

type Params = Vec<(String, Tensor)>;

fn open(url: &str) -> Checkpoint {
    weaver_checkpoint::block_on(Checkpoint::open_url(url)).unwrap()
}

/// `job` with `extra` overrides applied.
fn with(job: &JobConfig, extra: &[&str]) -> JobConfig {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    JobConfig::parse(&job.to_toml(), &extra).unwrap()
}

/// A one-process debug job (4 micro-batches of 4).
fn solo_job(extra: &[&str]) -> JobConfig {
    with(&collapse(common::job(1, 1, 1, "1f1b", 1, &[])), extra)
}

/// Trains `steps` steps on every rank of `job`; rank 0's losses and the assembled model,
/// before and after.
fn run(job: &JobConfig, steps: u64) -> (Vec<f64>, Params, Params) {
    let dir = tempfile::tempdir().unwrap();
    let out = common::on_ranks(job, dir.path(), move |_, mut t| {
        let before = common::local_params(&t);
        let losses: Vec<f64> = (0..steps).map(|_| t.train_step().unwrap().loss).collect();
        (losses, before, common::local_params(&t))
    });
    let losses = out[0].0.clone();
    let (before, after): (Vec<_>, Vec<_>) = out.into_iter().map(|(_, b, a)| (b, a)).unzip();
    (losses, common::assemble(before), common::assemble(after))
}

fn get<'a>(p: &'a Params, name: &str) -> &'a Tensor {
    &p.iter().find(|(n, _)| n == name).unwrap().1
}

/// Asserts which parameters kept their values bit for bit (`kept(name)`) and that the
/// others all moved.
fn assert_kept(before: &Params, after: &Params, kept: impl Fn(&str) -> bool, what: &str) {
    let mut moved = 0;
    for (name, b) in before {
        let same = get(after, name).equal(b);
        if kept(name) {
            assert!(same, "{what}: {name} changed");
        } else if !same {
            moved += 1;
        }
    }
    let free = before.iter().filter(|(n, _)| !kept(n)).count();
    // Every trained parameter moves (Adam's first step moves each by ~lr); a few could in
    // principle get an all-zero gradient, none does in these runs.
    assert_eq!(
        moved, free,
        "{what}: {moved} of {free} trained parameters moved"
    );
}

/// Parallel vs collapsed: same losses and parameters up to the reordering of f32 sums a
/// layout makes (see parallel_parity.rs: measured ≤ 1e-7 relative on losses and 1e-5
/// absolute on parameters; 1e-4 leaves margin while a missing reduction moves them ≥ 1e-2).
fn assert_parity(a: &(Vec<f64>, Params, Params), b: &(Vec<f64>, Params, Params), what: &str) {
    for (x, y) in a.0.iter().zip(&b.0) {
        assert!(
            (x - y).abs() / x.abs() < 1e-4,
            "{what}: losses {:?} vs {:?}",
            a.0,
            b.0
        );
    }
    assert_eq!(a.2.len(), b.2.len(), "{what}: parameter count");
    for (name, t) in &a.2 {
        let d = (t - get(&b.2, name)).abs().max().double_value(&[]);
        assert!(d < 1e-4, "{what}: {name} differs by {d:e}");
    }
}

#[test]
fn frozen_parts_stay_bitwise_under_a_3d_layout_with_lr_mults() {
    let extra = [
        "train.freeze=[\"vision\"]".to_string(),
        "train.lr_mult.multimodal=0.5".to_string(),
    ];
    let par_job = common::job(2, 2, 2, "1f1b", 1, &extra);
    let par = run(&par_job, 4);
    let solo = run(&collapse(par_job.clone()), 4);
    assert_parity(
        &par,
        &solo,
        "freeze vision, lr_mult.multimodal 0.5, (dp 2, pp 2, tp 2)",
    );
    let frozen = |n: &str| part_of(n) == Some("vision");
    assert_kept(&par.1, &par.2, frozen, "3-D layout");
    assert_kept(&solo.1, &solo.2, frozen, "one process");
    // The multiplier mattered: the collapsed run without it ends elsewhere.
    let plain = run(&with(&collapse(par_job), &["train.lr_mult={}"]), 4);
    let mm = "text.multimodal.0.attn.q.weight";
    assert!(!get(&plain.2, mm).equal(get(&solo.2, mm)));
}

#[test]
fn frozen_parameters_get_no_gradient_no_state_and_no_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let job = solo_job(&["train.freeze=[\"vision\", \"head.logit_scale\"]"]);
    let mut t = ParallelTrainer::solo(job, dir.path().to_path_buf(), false).unwrap();
    t.train_step().unwrap();
    let mut trainable = 0;
    for (i, p) in t.store().params().iter().enumerate() {
        let frozen = p.name.starts_with("vision.") || p.name == "head.logit_scale";
        assert_eq!(p.tensor.requires_grad(), !frozen, "{}", p.name);
        assert_eq!(p.tensor.grad().defined(), !frozen, "{}", p.name);
        assert_eq!(t.optimizer().trains(i), !frozen, "{}", p.name);
        if !frozen {
            trainable += p.tensor.numel() as i64;
        }
    }
    // The gradient buckets (what data parallelism reduces) hold the trained parameters only.
    let bucketed: i64 = t.grads().layout().iter().map(|b| b.numel).sum();
    assert_eq!(bucketed, trainable);
    // A typo selects nothing: the job stops naming the key.
    let typo = solo_job(&["train.freeze=[\"vison\"]"]);
    let e = ParallelTrainer::solo(typo, dir.path().join("x"), false).unwrap_err();
    assert!(e.to_string().starts_with("train.freeze:"), "{e}");
}

#[test]
fn lr_mult_zero_keeps_a_part_and_one_is_the_default_bitwise() {
    let default = run(&solo_job(&[]), 3);
    let one = run(&solo_job(&["train.lr_mult.vision=1.0"]), 3);
    assert_eq!(default.0, one.0);
    for (name, t) in &default.2 {
        assert!(get(&one.2, name).equal(t), "lr_mult 1: {name} differs");
    }
    let zero = run(&solo_job(&["train.lr_mult.text=0.0"]), 3);
    assert_kept(
        &zero.1,
        &zero.2,
        |n| part_of(n) == Some("text"),
        "lr_mult.text = 0",
    );
}

fn with_ckpt(job: JobConfig, url: &Path) -> JobConfig {
    with(&job, &[&format!("checkpoint.url=\"{}\"", url.display())])
}

fn committer(job: &JobConfig) -> Arc<dyn ShardSink> {
    let plan = Plan::new(job, 1).unwrap();
    Arc::new(LocalCommitter::new(
        CkptStore::open(&job.checkpoint.url).unwrap(),
        1,
        0,
        checkpoint_layout(job, &plan),
    ))
}

/// Trains `steps` steps of `job` (after resuming `from`, if given, and calling `check` on
/// the resumed trainer) and saves at the end; returns the parameters after the resume and
/// at the end.
fn train_saving(
    job: &JobConfig,
    from: Option<&str>,
    check: impl Fn(&ParallelTrainer),
    steps: u64,
    dir: &Path,
) -> (Params, Params) {
    let mut t = ParallelTrainer::solo(job.clone(), dir.to_path_buf(), false).unwrap();
    t.enable_checkpoints(committer(job)).unwrap();
    if let Some(url) = from {
        t.resume(open(url)).unwrap();
        check(&t);
    }
    let resumed = common::local_params(&t)
        .into_iter()
        .map(|(n, _, _, v)| (n, v))
        .collect();
    for _ in 0..steps {
        t.train_step().unwrap();
    }
    t.save_checkpoint().unwrap();
    t.finish_checkpoints().unwrap();
    let end = common::local_params(&t)
        .into_iter()
        .map(|(n, _, _, v)| (n, v))
        .collect();
    (resumed, end)
}

#[test]
fn a_frozen_checkpoint_resumes_unfrozen_and_the_reverse() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ckpt");
    let base = with_ckpt(solo_job(&["train.steps=10"]), &root);
    let frozen = with(&base, &["train.freeze=[\"vision\"]"]);
    // Frozen run, 2 steps: its checkpoint holds the vision values but no vision moments.
    let (_, saved) = train_saving(&frozen, None, |_| {}, 2, &dir.path().join("a"));
    let url2 = format!("{}/step-2", root.display());
    let ckpt = open(&url2);
    let names = &ckpt.manifest().tensors;
    assert!(names.contains_key("vision.pos"));
    assert!(!names.contains_key("optim.exp_avg.vision.pos"));
    assert!(names.contains_key("optim.exp_avg.text.pos"));
    // Resumed unfrozen: the values continue, the vision moments start at zero, and vision
    // trains from there.
    let zero_vision_moments = |t: &ParallelTrainer| {
        for (i, p) in t.store().params().iter().enumerate() {
            let st = t.optimizer().state(i).unwrap();
            let m = st.exp_avg.abs().max().double_value(&[]);
            let v = st.exp_avg_sq.abs().max().double_value(&[]);
            if p.name.starts_with("vision.") {
                assert_eq!((m, v), (0.0, 0.0), "{}: moments not fresh", p.name);
            } else {
                assert!(v > 0.0, "{}: moments not resumed", p.name);
            }
        }
    };
    let (resumed, end) = train_saving(
        &base,
        Some(&url2),
        zero_vision_moments,
        1,
        &dir.path().join("b"),
    );
    for (n, v) in &saved {
        assert!(get(&resumed, n).equal(v), "{n} not resumed");
    }
    assert!(!get(&end, "vision.pos").equal(get(&saved, "vision.pos")));
    // And the reverse: that unfrozen checkpoint (step 3) resumed frozen keeps vision as
    // saved while the rest trains on.
    let url3 = format!("{}/step-3", root.display());
    let (resumed, end) = train_saving(&frozen, Some(&url3), |_| {}, 1, &dir.path().join("c"));
    assert_kept(
        &resumed,
        &end,
        |n| part_of(n) == Some("vision"),
        "resumed frozen",
    );
}

const LORA: [&str; 3] = [
    "train.lora_rank=4",
    "train.lora_alpha=8.0",
    "train.lora_targets=[\"attn.q\", \"attn.v\", \"attn.o\", \"mlp.fc1\", \"mlp.fc2\", \"xattn.k\"]",
];

#[test]
fn lora_starts_as_the_base_model_trains_adapters_and_exports_merged() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ckpt");
    let base = with_ckpt(solo_job(&["train.steps=10"]), &root);
    let lora = with(&base, &LORA);
    let (base_losses, _, _) = run(&base, 1);
    let (losses, before, after) = run(&lora, 3);
    // B = 0: the first step's forward is the base model's, bit for bit.
    assert_eq!(losses[0], base_losses[0]);
    assert!(before.iter().any(|(n, _)| n.ends_with("xattn.k.lora_a")));
    assert!(before
        .iter()
        .filter(|(n, _)| n.ends_with(".lora_b"))
        .all(|(_, t)| t.abs().max().double_value(&[]) == 0.0));
    assert_kept(&before, &after, |n| !is_lora(n), "LoRA");

    // Train and save, then export merged: a plain model that computes the same outputs.
    train_saving(&lora, None, |_| {}, 3, &dir.path().join("run"));
    let url = format!("{}/step-3", root.display());
    let file = dir.path().join("merged.safetensors");
    export_params(&open(&url), &file).unwrap();
    let merged = Tensor::read_safetensors(&file).unwrap();
    assert!(merged.iter().all(|(n, _)| !is_lora(n)));

    let mut adapted_job = lora.clone();
    adapted_job.model.init_from = Some(url);
    let adapted = build(&adapted_job).unwrap();
    load_init_from(&adapted_job.model, &adapted.store, Values::None).unwrap();
    let mut plain = build(&base).unwrap();
    plain.store.load_local(&merged).unwrap();
    let batch = adapted
        .data
        .batch(Split::Heldout, &(0..8).collect::<Vec<u64>>(), Device::Cpu)
        .unwrap();
    let w = LossWeights {
        itc: 1.0,
        caption: 1.0,
        itm: 0.5,
        mlm: 0.0,
        vqa: 0.0,
    };
    let outputs = |m: &weaver_models::Model| {
        tch::no_grad(|| {
            let mut acts = Acts::default();
            m.forward(&mut NoTp, &mut acts, &batch, true).unwrap();
            let ie = acts.image_emb.as_ref().unwrap().copy();
            let te = acts.text_emb.as_ref().unwrap().copy();
            let l = m.losses(&mut NoTp, &mut acts, &batch, w).unwrap();
            (ie, te, l.total.double_value(&[]))
        })
    };
    let (ai, at, al) = outputs(&adapted.model);
    let (pi, pt, pl) = outputs(&plain.model);
    // The merged weight W + s·B·A sums the same products in another order than
    // x·Wᵀ + s·(x·Aᵀ)·Bᵀ: a few f32 ulps per layer, ~1e-6 after the debug model's layers;
    // 1e-5 leaves margin while an unmerged or wrongly scaled adapter moves them ≥ 1e-3.
    let rel = |a: &Tensor, b: &Tensor| ((a - b).abs().max() / b.abs().max()).double_value(&[]);
    assert!(
        rel(&ai, &pi) < 1e-5,
        "image embeddings: {:e}",
        rel(&ai, &pi)
    );
    assert!(rel(&at, &pt) < 1e-5, "text embeddings: {:e}", rel(&at, &pt));
    assert!((al - pl).abs() / pl.abs() < 1e-5, "loss {al} vs {pl}");
    // The adapters changed the model: the base model's outputs differ.
    let untouched = build(&base).unwrap();
    let (bi, _, _) = outputs(&untouched.model);
    assert!(rel(&bi, &pi) > 1e-4);
}

#[test]
fn lora_under_a_3d_layout_matches_the_collapsed_run() {
    let extra: Vec<String> = LORA.iter().map(|s| s.to_string()).collect();
    let par_job = common::job(2, 2, 2, "1f1b", 1, &extra);
    let par = run(&par_job, 4);
    let solo = run(&collapse(par_job), 4);
    assert_parity(&par, &solo, "LoRA, (dp 2, pp 2, tp 2)");
    assert_kept(&par.1, &par.2, |n| !is_lora(n), "LoRA 3-D layout");
}

#[test]
fn freeze_lr_mults_and_lora_under_the_sharded_optimizer() {
    // ZeRO-1 (parallel.shard_optimizer): frozen parameters have no state to shard, lr
    // groups are cut at each replica's shard, and LoRA's TP sums commute with the
    // reduce-scatter.
    for extra in [
        vec![
            "train.freeze=[\"text\"]".to_string(),
            "train.lr_mult.vision=0.25".to_string(),
            "parallel.shard_optimizer=true".to_string(),
        ],
        LORA.iter()
            .map(|s| s.to_string())
            .chain(["parallel.shard_optimizer=true".to_string()])
            .collect(),
    ] {
        let par_job = common::job(2, 1, 2, "1f1b", 1, &extra);
        let par = run(&par_job, 3);
        let solo = run(
            &with(&collapse(par_job), &["parallel.shard_optimizer=false"]),
            3,
        );
        let what = format!("sharded optimizer, (dp 2, tp 2), {extra:?}");
        assert_parity(&par, &solo, &what);
        let kept = |n: &str| {
            if extra[0].starts_with("train.freeze") {
                part_of(n) == Some("text")
            } else {
                !is_lora(n)
            }
        };
        assert_kept(&par.1, &par.2, kept, &what);
    }
}
